//! One endpoint's backend side: its topology and pools behind the [`Router`], and the task that
//! keeps the pools in step with the topology. A config reload builds a new
//! [`EndpointRuntime`] and swaps it into the [`EndpointHandle`]; sessions pick it up for their
//! next command and open client connections are never touched.
//!
//! The maintenance task follows [`Topology::changes`] (no polling): on every new generation it
//! drops the pools of nodes that left (their connections close once idle, so nothing in flight
//! is cut) and creates the pools of the masters, which opens their warm dedicated connections
//! (and the shared ones with `pool_prewarm`).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};

use crate::backend::pool::GroupSettings;
use crate::backend::HealthSettings;
use crate::backend::{BackendGroup, ConnectSpec, PoolKey};
use crate::config::{BackendKind, EndpointSpec};
use crate::metrics::ProxyMetrics;
use crate::topology::cluster::{Cluster, ClusterConfig};
use crate::topology::control::ControlSpec;
use crate::topology::sentinel::{Sentinel, SentinelConfig};
use crate::topology::{self, Standalone, StandbyConfig, Topology};
use crate::upstream::{HoldSettings, Router};

/// One endpoint's backend side (see the module docs).
pub struct EndpointRuntime {
    pub spec: EndpointSpec,
    pub router: Arc<Router>,
    /// The node-local cache of this backend ([`crate::localcache`]): a new runtime (another
    /// backend) starts with an empty one that serves nothing until it tracks.
    pub cache: Arc<crate::localcache::LocalCache>,
    /// Stops with the runtime.
    _maintenance: AbortOnDropHandle<()>,
}

impl Drop for EndpointRuntime {
    fn drop(&mut self) {
        self.router.group.shutdown();
    }
}

impl EndpointRuntime {
    /// Builds the runtime of `spec`: topology discovery and pool maintenance start at once
    /// (must run inside tokio). `mark` is the bypass mark of every backend socket.
    pub fn build(spec: &EndpointSpec, mark: u32, metrics: &ProxyMetrics) -> Arc<Self> {
        let b = &spec.backend;
        let connect_timeout = Duration::from_millis(b.connect_timeout_ms);
        let client_name = format!("datamesh-{}", spec.name);
        let conn = |username: Option<String>, password: Option<String>| ConnectSpec {
            mark,
            username,
            password,
            connect_timeout,
            readonly: false,
            client_name: client_name.clone(),
        };
        let control = |c: ConnectSpec| ControlSpec {
            conn: c,
            io_timeout: connect_timeout.max(Duration::from_secs(2)),
        };
        let backend_pass = b.password.as_ref().map(|p| p.expose().to_string());
        let data = conn(b.username.clone(), backend_pass);
        let (topology, readonly): (Arc<dyn Topology>, bool) = match &b.kind {
            BackendKind::Standalone {
                address,
                standby,
                standby_after_ms,
            } => {
                let t = if standby.is_empty() {
                    Standalone::new(*address)
                } else {
                    Standalone::with_standby(
                        *address,
                        StandbyConfig {
                            standbys: standby.clone(),
                            after: Duration::from_millis(*standby_after_ms),
                            control: control(data.clone()),
                        },
                    )
                };
                (Arc::new(t), false)
            }
            BackendKind::Sentinel {
                sentinels,
                master_name,
                read_from_replicas,
                sentinel_username,
                sentinel_password,
            } => {
                let mut c = SentinelConfig::new(sentinels.clone(), master_name.clone());
                c.read_from_replicas = *read_from_replicas;
                c.sentinel_conn = control(conn(
                    sentinel_username.clone(),
                    sentinel_password.as_ref().map(|p| p.expose().to_string()),
                ));
                c.backend_conn = control(data.clone());
                (Arc::new(Sentinel::spawn(c)), false)
            }
            BackendKind::Cluster {
                nodes,
                read_from_replicas,
            } => {
                let mut c = ClusterConfig::new(nodes.clone());
                c.read_from_replicas = *read_from_replicas;
                c.control = control(data.clone());
                // Replica reads need READONLY on every connection (harmless on masters).
                (Arc::new(Cluster::spawn(c)), *read_from_replicas)
            }
        };
        let group = Arc::new(BackendGroup::new(
            spec.name.clone(),
            ConnectSpec { readonly, ..data },
            GroupSettings {
                pool_size: b.pool_size,
                max_dedicated: b.max_dedicated,
                warm_dedicated: b.warm_dedicated,
                command_timeout: (b.command_timeout_ms > 0)
                    .then(|| Duration::from_millis(b.command_timeout_ms)),
                health: (b.health_interval_ms > 0).then(|| HealthSettings {
                    interval: Duration::from_millis(b.health_interval_ms),
                    timeout: Duration::from_millis(b.health_timeout_ms.max(1)),
                }),
            },
            metrics.group(&spec.name),
        ));
        let router = Router::new(
            topology,
            group,
            HoldSettings {
                hold: Duration::from_millis(b.failover_hold_ms),
                max_bytes: b.hold_max_bytes as usize,
                max_client_bytes: b.hold_max_client_bytes as usize,
            },
        );
        let maintenance = tokio::spawn(maintain(
            Arc::downgrade(&router),
            spec.name.clone(),
            b.pool_prewarm,
        ));
        Arc::new(Self {
            spec: spec.clone(),
            router,
            cache: Arc::new(crate::localcache::LocalCache::new(
                crate::localcache::CacheMetrics::resolve(metrics, &spec.name),
            )),
            _maintenance: AbortOnDropHandle::new(maintenance),
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn topology(&self) -> &Arc<dyn Topology> {
        &self.router.topology
    }

    pub fn group(&self) -> &Arc<BackendGroup> {
        &self.router.group
    }

    /// Waits up to `timeout` for the topology's first view (sentinel master, cluster slot
    /// map), so the agent reports ready with routable endpoints. Not fatal: a backend that is
    /// down must not keep the node's capture (and the other endpoints) from coming up.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let ready = topology::wait_ready(self.router.topology.as_ref(), timeout).await;
        if !ready {
            warn!(endpoint = %self.spec.name, kind = self.spec.backend.kind_name(), ?timeout, "backend topology not known yet (no master or slot map): commands fail until it is");
        }
        ready
    }
}

/// Keeps the pools in step with the topology (see the module docs); ends with the router.
async fn maintain(router: std::sync::Weak<Router>, endpoint: String, prewarm: bool) {
    let mut changes = match router.upgrade() {
        Some(r) => r.topology.changes(),
        None => return,
    };
    let mut prewarmed: Vec<SocketAddr> = Vec::new();
    let mut masters: Vec<SocketAddr> = Vec::new();
    loop {
        {
            let Some(r) = router.upgrade() else { return };
            let now = r.topology.masters();
            if !masters.is_empty() && !now.is_empty() && now != masters && !r.is_cluster() {
                // A new master (Sentinel failover, standalone standby): counted once.
                r.group.metrics.switches.inc();
                warn!(endpoint = %endpoint, from = ?masters, to = ?now, "switched to another node");
            }
            if !now.is_empty() {
                masters = now;
            }
            let nodes = r.topology.nodes();
            if !nodes.is_empty() {
                r.group.retain_nodes(&nodes);
                prewarmed.retain(|a| nodes.contains(a));
            }
            for master in r.topology.masters() {
                let pool = r.group.pool(PoolKey {
                    addr: master,
                    db: 0,
                    proto: 2,
                });
                if prewarm && !prewarmed.contains(&master) {
                    prewarmed.push(master);
                    let p = pool.clone();
                    tokio::spawn(async move { p.prewarm().await });
                }
            }
            debug!(endpoint = %endpoint, generation = r.topology.generation(), ?nodes, "pools follow the topology");
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// An endpoint as its listener and sessions see it: the runtime is swapped on reload, and
/// sessions pick up the new one for their next command.
pub struct EndpointHandle {
    pub name: String,
    /// The endpoint's hot keys (kept across backend swaps).
    pub hotkeys: crate::hotkeys::HotKeys,
    current: RwLock<Arc<EndpointRuntime>>,
}

impl EndpointHandle {
    pub fn new(rt: Arc<EndpointRuntime>) -> Self {
        Self {
            name: rt.spec.name.clone(),
            hotkeys: Default::default(),
            current: RwLock::new(rt),
        }
    }

    pub fn current(&self) -> Arc<EndpointRuntime> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace(&self, rt: Arc<EndpointRuntime>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = rt;
    }
}

/// What `/backends` shows: per endpoint, per pool, each connection's phase and in-flight queue.
pub fn backends_snapshot(handles: &[Arc<EndpointHandle>]) -> serde_json::Value {
    let mut out = Vec::new();
    for h in handles {
        let rt = h.current();
        let mut pools = Vec::new();
        for p in rt.group().pools() {
            let conns: Vec<serde_json::Value> = p
                .slots()
                .iter()
                .map(|c| serde_json::json!({"phase": c.phase(), "inflight": c.snapshot()}))
                .collect();
            pools.push(serde_json::json!({
                "node": p.key.addr.to_string(), "db": p.key.db, "proto": p.key.proto,
                "shared": conns, "idle_dedicated": p.idle_dedicated(),
            }));
        }
        let topo = rt.topology();
        let hold = rt.router.holder.snapshot();
        // A node that is down while commands wait for the topology to name another is being
        // switched away from.
        let replaceable =
            topo.kind() != crate::topology::TopologyKind::Standalone || topo.has_standby();
        let health: Vec<serde_json::Value> = rt
            .group()
            .health
            .snapshot()
            .into_iter()
            .map(|(addr, info)| {
                let switching = replaceable && !info.status.usable() && hold.depth > 0;
                serde_json::json!({
                    "node": addr.to_string(),
                    "state": if switching { serde_json::json!("switching") } else { serde_json::json!(info.status) },
                    "for_ms": info.for_ms,
                    "cause": info.cause,
                })
            })
            .collect();
        out.push(serde_json::json!({
            "endpoint": h.name,
            "kind": topo.kind(),
            "generation": topo.generation(),
            "ready": topo.is_ready(),
            "nodes": topo.nodes().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "health": health,
            "hold": hold,
            "pools": pools,
        }));
    }
    serde_json::Value::Array(out)
}
