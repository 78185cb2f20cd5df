//! The RESP proxy. This module owns the listeners (one per endpoint on the node proxy
//! address), the identity of every accepted connection (pod and original destination, from
//! `dm_conns`, recorded for `/connections`), the per-endpoint runtime (backend topology and
//! pools, swapped on config reload without touching open client connections), the proxy's
//! metrics, and draining on shutdown.
//!
//! Codemap: `resp` (codec), `commands` (command table), `topology` (routing trait and
//! standalone), `sentinel` and `cluster` (the other topologies and cluster helpers),
//! `backend` (pools, in-flight queues), `session` (one client connection), `pod_limits`
//! (per-pod counting and command-rate limit).

pub mod backend;
pub mod cluster;
pub mod commands;
pub mod pod_limits;
pub mod resp;
pub mod sentinel;
pub mod session;
pub mod topology;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use datamesh_common::{FlowKey, FASTPATH_REDIRECT, FASTPATH_TCP, FASTPATH_UNDECIDED};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::app::stopped;
use crate::config::{fold_v4_mapped, BackendKind, Config, Endpoint, User};
use crate::dataplane::{flow_key, words_addr, Maps};
use crate::pods::Pods;

use backend::{BackendGroup, ConnectSpec, GroupMetrics};
use pod_limits::PodRegistry;
use resp::Limits;
use topology::{Standalone, Topology};

/// How many accepted connections `/connections` remembers.
pub const CONN_LOG_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("endpoint {endpoint}: cannot listen on {addr}: {source}: is {addr} an address of this node (proxy_address / DATAMESH_PROXY_ADDRESS), or is the port taken?")]
    Bind {
        endpoint: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub endpoint: String,
    pub captured: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub endpoint: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The proxy's metrics (registered under the `datamesh_` prefix by the admin registry).
#[derive(Default)]
pub struct ProxyMetrics {
    pub connections: Family<ConnLabels, Counter>,
    pub open: Family<EndpointLabels, Gauge>,
    pub backend_errors: Family<EndpointLabels, Counter>,
    pub commands: Family<EndpointLabels, Counter>,
    pub errors: Family<KindLabels, Counter>,
    pub backend_connections: Family<KindLabels, Gauge>,
    pub backend_connects: Family<KindLabels, Counter>,
    pub inflight: Family<EndpointLabels, Gauge>,
    pub pool_waits: Family<EndpointLabels, Counter>,
    pub throttled: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub pods: Arc<pod_limits::PodMetrics>,
}

impl ProxyMetrics {
    pub fn with_pods(pods: Arc<pod_limits::PodMetrics>) -> Self {
        Self {
            pods,
            ..Default::default()
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "proxy_connections",
            "Accepted proxy connections",
            self.connections.clone(),
        );
        registry.register(
            "proxy_open_connections",
            "Open proxy connections",
            self.open.clone(),
        );
        registry.register(
            "proxy_backend_errors",
            "Backend connect or forwarding failures",
            self.backend_errors.clone(),
        );
        registry.register(
            "proxy_commands",
            "Commands received from clients",
            self.commands.clone(),
        );
        registry.register(
            "proxy_errors",
            "Errors by kind (protocol, auth, backend kinds)",
            self.errors.clone(),
        );
        registry.register(
            "proxy_backend_connections",
            "Open backend connections (kind = shared | dedicated)",
            self.backend_connections.clone(),
        );
        registry.register(
            "proxy_backend_connects",
            "Backend connection attempts (kind = ok | failed)",
            self.backend_connects.clone(),
        );
        registry.register(
            "proxy_inflight",
            "Commands queued or written to backends without a reply yet",
            self.inflight.clone(),
        );
        registry.register(
            "proxy_pool_waits",
            "Waits for a dedicated connection because max_dedicated were in use",
            self.pool_waits.clone(),
        );
        registry.register(
            "proxy_throttled",
            "Commands delayed or refused by a pod's command-rate limit",
            self.throttled.clone(),
        );
        registry.register(
            "proxy_config_reloads",
            "Config reloads (result = ok | invalid)",
            self.config_reloads.clone(),
        );
        registry.register(
            "proxy_pod_commands",
            "Commands per pod (node = clients that were not captured)",
            self.pods.commands.clone(),
        );
        registry.register(
            "proxy_pod_throttled",
            "Throttled commands per pod",
            self.pods.throttled.clone(),
        );
    }

    pub fn count_error(&self, endpoint: &str, kind: &str) {
        self.errors
            .get_or_create(&KindLabels {
                endpoint: endpoint.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The metric handles of one backend group (resolved once).
    pub fn group(&self, endpoint: &str) -> GroupMetrics {
        let kl = |kind: &str| KindLabels {
            endpoint: endpoint.to_string(),
            kind: kind.to_string(),
        };
        let el = EndpointLabels {
            endpoint: endpoint.to_string(),
        };
        // One statement per handle: a Family's read guard lives to the end of its statement,
        // and a second get_or_create in the same statement would wait for it forever.
        let gauge = |f: &Family<KindLabels, Gauge>, kind: &str| -> Gauge {
            let g = f.get_or_create(&kl(kind));
            (*g).clone()
        };
        let counter = |f: &Family<KindLabels, Counter>, kind: &str| -> Counter {
            let c = f.get_or_create(&kl(kind));
            (*c).clone()
        };
        let shared_conns = gauge(&self.backend_connections, "shared");
        let dedicated_conns = gauge(&self.backend_connections, "dedicated");
        let connects_ok = counter(&self.backend_connects, "ok");
        let connects_failed = counter(&self.backend_connects, "failed");
        let inflight = (*self.inflight.get_or_create(&el)).clone();
        let pool_waits = (*self.pool_waits.get_or_create(&el)).clone();
        GroupMetrics {
            shared_conns,
            dedicated_conns,
            connects_ok,
            connects_failed,
            inflight,
            pool_waits,
        }
    }
}

/// One accepted connection as `/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub id: u64,
    pub peer: String,
    pub local: String,
    pub endpoint: String,
    pub captured: bool,
    pub orig_dst: Option<String>,
    pub netns_cookie: Option<u64>,
    pub pod: Option<String>,
    pub fastpath: &'static str,
    pub closed: bool,
    #[serde(skip)]
    key: FlowKey,
}

fn fastpath_name(state: u32) -> &'static str {
    match state {
        FASTPATH_UNDECIDED => "undecided",
        FASTPATH_REDIRECT => "redirect",
        FASTPATH_TCP => "tcp",
        _ => "undecided",
    }
}

/// The last [`CONN_LOG_LEN`] accepted connections.
#[derive(Default)]
pub struct ConnLog {
    records: Mutex<VecDeque<ConnRecord>>,
    next_id: AtomicU64,
}

impl ConnLog {
    fn push(&self, mut rec: ConnRecord) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        rec.id = id;
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= CONN_LOG_LEN {
            r.pop_front();
        }
        r.push_back(rec);
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ConnRecord)) {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        // Ids are increasing, so the record is found by its distance from the newest.
        if let Some(rec) = r.iter_mut().rev().find(|rec| rec.id == id) {
            f(rec);
        }
    }

    /// A copy of the log, with the fast-path state of open captured connections refreshed.
    pub fn snapshot(&self, maps: &Maps) -> Vec<ConnRecord> {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        for rec in r.iter_mut().filter(|rec| rec.captured && !rec.closed) {
            if let Some(info) = maps.conn_info(&rec.key) {
                rec.fastpath = fastpath_name(info.fastpath);
            }
        }
        r.iter().cloned().collect()
    }
}

/// Settings every session reads (swapped whole on reload).
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub limits: Limits,
    pub users: Vec<User>,
    pub throttle_max_delay: Duration,
    pub max_pipeline: u32,
    pub client_output_limit: u64,
}

impl RuntimeSettings {
    pub fn from_config(cfg: &Config) -> Self {
        let p = &cfg.proxy;
        Self {
            limits: Limits {
                max_bulk_len: p.max_bulk_len,
                max_array_len: p.max_array_len,
                max_depth: p.max_depth as usize,
                max_inline_len: p.max_inline_len as usize,
            },
            users: cfg.users.clone(),
            throttle_max_delay: Duration::from_millis(p.throttle_max_delay_ms),
            max_pipeline: p.max_pipeline,
            client_output_limit: p.client_output_limit_bytes,
        }
    }
}

/// One endpoint's backend side: topology, pools and the tasks that keep them current.
pub struct EndpointRuntime {
    pub cfg: Endpoint,
    pub topology: Arc<dyn Topology>,
    pub cluster: Option<Arc<cluster::Cluster>>,
    pub sentinel: Option<Arc<sentinel::Sentinel>>,
    pub group: Arc<BackendGroup>,
    maintenance: Option<JoinHandle<()>>,
}

impl Drop for EndpointRuntime {
    fn drop(&mut self) {
        if let Some(t) = self.maintenance.take() {
            t.abort();
        }
        self.group.shutdown();
    }
}

impl EndpointRuntime {
    /// Builds the runtime of `ep` (spawns topology discovery; must run inside tokio).
    pub fn build(ep: &Endpoint, bypass_mark: u32, metrics: &ProxyMetrics) -> Arc<Self> {
        let b = &ep.backend;
        let connect_timeout = Duration::from_millis(b.connect_timeout_ms);
        let wire_opts =
            |user: Option<String>, pass: Option<String>| cluster::wire::ConnectOptions {
                mark: bypass_mark,
                username: user,
                password: pass,
                connect_timeout,
                io_timeout: connect_timeout.max(Duration::from_secs(2)),
            };
        let backend_user = b.username.clone();
        let backend_pass = b.password.as_ref().map(|p| p.expose().to_string());
        let (topology, cluster, sentinel, readonly): (Arc<dyn Topology>, _, _, bool) = match &b.kind
        {
            BackendKind::Standalone { address } => {
                (Arc::new(Standalone::new(*address)), None, None, false)
            }
            BackendKind::Sentinel {
                sentinels,
                master_name,
                read_from_replicas,
                sentinel_username,
                sentinel_password,
            } => {
                let mut c = sentinel::SentinelConfig::new(sentinels.clone(), master_name.clone());
                c.read_from_replicas = *read_from_replicas;
                c.sentinel_conn = wire_opts(
                    sentinel_username.clone(),
                    sentinel_password.as_ref().map(|p| p.expose().to_string()),
                );
                c.backend_conn = wire_opts(backend_user.clone(), backend_pass.clone());
                let s = Arc::new(sentinel::Sentinel::spawn(c));
                (s.clone() as Arc<dyn Topology>, None, Some(s), false)
            }
            BackendKind::Cluster {
                nodes,
                read_from_replicas,
            } => {
                let mut c = cluster::ClusterConfig::new(nodes.clone());
                c.read_from_replicas = *read_from_replicas;
                c.conn = wire_opts(backend_user.clone(), backend_pass.clone());
                let cl = Arc::new(cluster::Cluster::spawn(c));
                (
                    cl.clone() as Arc<dyn Topology>,
                    Some(cl),
                    None,
                    *read_from_replicas,
                )
            }
        };
        let group = Arc::new(BackendGroup::new(
            ep.name.clone(),
            ConnectSpec {
                mark: bypass_mark,
                username: backend_user,
                password: backend_pass,
                connect_timeout,
                readonly,
                client_name: format!("datamesh-{}", ep.name),
            },
            b.pool_size,
            b.max_dedicated,
            (b.command_timeout_ms > 0).then(|| Duration::from_millis(b.command_timeout_ms)),
            metrics.group(&ep.name),
        ));
        // Maintenance: drop pools of nodes that left the topology; prewarm when asked.
        let maintenance = {
            let topo = Arc::downgrade(&topology);
            let grp = Arc::downgrade(&group);
            let prewarm = b.pool_prewarm;
            Some(tokio::spawn(async move {
                let mut last_gen = u64::MAX;
                let mut warmed: Vec<SocketAddr> = Vec::new();
                loop {
                    let (Some(topo), Some(grp)) = (topo.upgrade(), grp.upgrade()) else {
                        return;
                    };
                    let gen = topo.generation();
                    if gen != last_gen {
                        last_gen = gen;
                        let nodes = topo.nodes();
                        if !nodes.is_empty() {
                            grp.retain_nodes(&nodes);
                        }
                        if prewarm {
                            if let Ok(master) = topo.pick(None, false) {
                                if !warmed.contains(&master) {
                                    warmed.push(master);
                                    grp.pool(backend::PoolKey {
                                        addr: master,
                                        db: 0,
                                        proto: 2,
                                    })
                                    .prewarm()
                                    .await;
                                }
                            }
                        }
                    }
                    drop((topo, grp));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }))
        };
        Arc::new(Self {
            cfg: ep.clone(),
            topology,
            cluster,
            sentinel,
            group,
            maintenance,
        })
    }

    /// A backend node failed (connect error, connection lost, READONLY from the "master"):
    /// let the topology look again.
    pub fn node_failed(&self, addr: SocketAddr) {
        if let Some(c) = &self.cluster {
            c.node_failed(addr);
        }
        if let Some(s) = &self.sentinel {
            s.node_failed(addr);
        }
    }

    /// Waits up to `timeout` for the topology's first view (sentinel master, cluster slot
    /// map), so the agent reports ready with routable endpoints. Not fatal: a backend that is
    /// down must not keep the node's capture (and the other endpoints) from coming up.
    pub async fn wait_ready(&self, timeout: Duration) {
        let r = if let Some(c) = &self.cluster {
            c.ready(timeout).await.map_err(|e| e.to_string())
        } else if let Some(s) = &self.sentinel {
            s.ready(timeout).await.map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        if let Err(e) = r {
            warn!(endpoint = %self.cfg.name, error = %e, "backend topology not known yet; commands fail until it is");
        }
    }

    /// Masters of a cluster backend (for broadcast commands); the picked node otherwise.
    pub fn masters(&self) -> Vec<SocketAddr> {
        match &self.cluster {
            Some(c) => c.masters(),
            None => self.topology.pick(None, false).into_iter().collect(),
        }
    }
}

/// An endpoint as its listener and sessions see it: the runtime is swapped on reload, and
/// sessions pick up the new one for their next command.
pub struct EndpointHandle {
    pub name: String,
    current: RwLock<Arc<EndpointRuntime>>,
}

impl EndpointHandle {
    pub fn new(rt: Arc<EndpointRuntime>) -> Self {
        Self {
            name: rt.cfg.name.clone(),
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

/// State shared by the listeners and the connection tasks.
pub struct Shared {
    pub maps: Arc<Maps>,
    pub pods: Arc<Pods>,
    pub log: Arc<ConnLog>,
    pub metrics: Arc<ProxyMetrics>,
    pub pod_limits: Arc<PodRegistry>,
    settings: RwLock<Arc<RuntimeSettings>>,
    client_ids: AtomicU64,
    open: AtomicUsize,
    idle: Notify,
}

impl Shared {
    pub fn new(
        maps: Arc<Maps>,
        pods: Arc<Pods>,
        log: Arc<ConnLog>,
        metrics: Arc<ProxyMetrics>,
        pod_limits: Arc<PodRegistry>,
        settings: RuntimeSettings,
    ) -> Self {
        Self {
            maps,
            pods,
            log,
            metrics,
            pod_limits,
            settings: RwLock::new(Arc::new(settings)),
            client_ids: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    pub fn settings(&self) -> Arc<RuntimeSettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_settings(&self, s: RuntimeSettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    pub fn next_client_id(&self) -> u64 {
        self.client_ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, or `timeout` passes. Returns the number still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            let n = self.open_connections();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open_connections();
            }
        }
    }
}

/// Counts a connection as open for as long as it lives (also if its task is cancelled).
struct OpenGuard<'a>(&'a Shared);

impl<'a> OpenGuard<'a> {
    fn new(s: &'a Shared) -> Self {
        s.open.fetch_add(1, Ordering::SeqCst);
        Self(s)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A bound listener for one endpoint.
pub struct Bound {
    pub endpoint: Endpoint,
    pub id: u32,
    pub listener: TcpListener,
    pub local: SocketAddr,
}

/// Binds one endpoint's listener.
pub fn bind_one(cfg: &Config, ep: &Endpoint, id: u32) -> Result<Bound, ProxyError> {
    let addr = cfg.proxy_bind(ep);
    let err = |source| ProxyError::Bind {
        endpoint: ep.name.clone(),
        addr,
        source,
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    // A restarted agent must rebind its fixed port while old connections sit in TIME_WAIT.
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    let listener = sock.listen(4096).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    info!(endpoint = %ep.name, address = %ep.address, proxy = %local, backend = %ep.backend.primary_address(), kind = ep.backend.kind_name(), "proxy listening");
    Ok(Bound {
        endpoint: ep.clone(),
        id,
        listener,
        local,
    })
}

/// Binds every endpoint's listener (before the data plane points connects at them).
pub fn bind_all(cfg: &Config) -> Result<Vec<Bound>, ProxyError> {
    cfg.endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| bind_one(cfg, ep, i as u32))
        .collect()
}

/// A running listener.
pub struct Listener {
    pub handle: Arc<EndpointHandle>,
    pub id: u32,
    pub local: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Stops accepting (open connections stay).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the accept loop of `b`; it stops when `shutdown` or its own stop turns true.
pub fn spawn_listener(
    b: Bound,
    handle: Arc<EndpointHandle>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Listener {
    let (stop_tx, mut own_stop) = watch::channel(false);
    let mut shutdown = shutdown;
    let h = handle.clone();
    let local = b.local;
    let task = tokio::spawn(async move {
        let name = h.name.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => break,
                _ = stopped(&mut own_stop) => break,
                res = b.listener.accept() => match res {
                    Ok((sock, peer)) => {
                        let conn = handle_conn(shared.clone(), h.clone(), sock, peer);
                        // The per-connection span only when debug logs are on: entering and
                        // leaving it on every poll of the session measured ~2.5% of the
                        // proxy's CPU at pipeline depth 1. The events name the peer anyway.
                        if tracing::enabled!(tracing::Level::DEBUG) {
                            let span = info_span!("conn", endpoint = %name, %peer);
                            tokio::spawn(conn.instrument(span));
                        } else {
                            tokio::spawn(conn);
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(endpoint = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        debug!(endpoint = %name, "listener closed");
    });
    Listener {
        handle,
        id: b.id,
        local,
        stop: stop_tx,
        task,
    }
}

async fn handle_conn(
    shared: Arc<Shared>,
    endpoint: Arc<EndpointHandle>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let _open = OpenGuard::new(&shared);
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(endpoint = %endpoint.name, %peer, error = %e, "accepted socket has no local address");
            return;
        }
    };
    let (peer_f, local_f) = (fold_v4_mapped(peer), fold_v4_mapped(local));
    let key = flow_key(peer_f, local_f);
    let info = shared.maps.conn_info(&key);
    let captured = info.is_some();
    let cookie = info.map(|i| i.netns_cookie);
    let pod = cookie.and_then(|c| shared.pods.name_of(c));
    let orig = info.and_then(|i| {
        words_addr(i.orig.family as u32, i.orig.addr).map(|ip| SocketAddr::new(ip, i.orig.port))
    });
    let orig_dst = orig.map(|a| a.to_string());
    let id = shared.log.push(ConnRecord {
        id: 0,
        peer: peer_f.to_string(),
        local: local_f.to_string(),
        endpoint: endpoint.name.clone(),
        captured,
        orig_dst: orig_dst.clone(),
        netns_cookie: cookie,
        pod: pod.clone(),
        fastpath: info.map(|i| fastpath_name(i.fastpath)).unwrap_or("none"),
        closed: false,
        key,
    });
    let labels = EndpointLabels {
        endpoint: endpoint.name.clone(),
    };
    shared
        .metrics
        .connections
        .get_or_create(&ConnLabels {
            endpoint: endpoint.name.clone(),
            captured: captured.to_string(),
        })
        .inc();
    shared.metrics.open.get_or_create(&labels).inc();
    if let Some(c) = cookie {
        shared.pods.conn_opened(c);
    }
    debug!(id, captured, ?cookie, ?pod, ?orig_dst, "accepted");
    let _ = client.set_nodelay(true);

    let pod_stats = shared.pod_limits.get(cookie.unwrap_or(0));
    let commands_total = (*shared.metrics.commands.get_or_create(&labels)).clone();
    // Cluster-aware clients are told the address they dialled (the captured original
    // destination), so they keep coming back through the capture.
    let advertised = orig.unwrap_or(local_f);
    let session = session::Session::new(
        shared.clone(),
        endpoint.clone(),
        pod_stats,
        commands_total,
        peer_f,
        local_f,
        advertised,
    );
    let sid = session.id;
    session.run(&mut client).await;
    debug!(id, client_id = sid, "closed");

    let last = if captured {
        shared
            .maps
            .conn_info(&key)
            .map(|i| fastpath_name(i.fastpath))
    } else {
        None
    };
    shared.log.update(id, |r| {
        r.closed = true;
        if let Some(fp) = last {
            r.fastpath = fp;
        }
    });
    shared.metrics.open.get_or_create(&labels).dec();
    if let Some(c) = cookie {
        shared.pods.conn_closed(c);
    }
}

/// What `/backends` shows: per endpoint, per pool, each connection's phase and in-flight queue.
pub fn backends_snapshot(handles: &[Arc<EndpointHandle>]) -> serde_json::Value {
    let mut out = Vec::new();
    for h in handles {
        let rt = h.current();
        let mut pools = Vec::new();
        for p in rt.group.pools() {
            let conns: Vec<serde_json::Value> = p
                .slots()
                .iter()
                .map(|c| serde_json::json!({"phase": c.phase(), "inflight": c.snapshot()}))
                .collect();
            pools.push(serde_json::json!({
                "node": p.key.addr.to_string(), "db": p.key.db, "proto": p.key.proto, "shared": conns,
            }));
        }
        out.push(serde_json::json!({
            "endpoint": h.name,
            "kind": rt.cfg.backend.kind_name(),
            "generation": rt.topology.generation(),
            "nodes": rt.topology.nodes().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "pools": pools,
        }));
    }
    serde_json::Value::Array(out)
}

/// Listeners by endpoint name (for reload).
pub type ListenerMap = HashMap<String, Listener>;

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> ConnRecord {
        ConnRecord {
            id: 0,
            peer: format!("198.18.3.10:{n}"),
            local: "198.18.3.1:1".into(),
            endpoint: "cache".into(),
            captured: false,
            orig_dst: None,
            netns_cookie: None,
            pod: None,
            fastpath: "none",
            closed: false,
            key: FlowKey::default(),
        }
    }

    #[test]
    fn conn_log_keeps_the_last_1024() {
        let log = ConnLog::default();
        for n in 0..(CONN_LOG_LEN as u64 + 10) {
            log.push(rec(n));
        }
        let r = log.records.lock().expect("lock");
        assert_eq!(r.len(), CONN_LOG_LEN);
        assert_eq!(r.front().map(|x| x.id), Some(11));
        assert_eq!(r.back().map(|x| x.id), Some(CONN_LOG_LEN as u64 + 10));
    }

    #[test]
    fn conn_record_json_shape() {
        let mut r = rec(40000);
        r.id = 1;
        let v = serde_json::to_value(&r).expect("json");
        for k in [
            "id",
            "peer",
            "local",
            "endpoint",
            "captured",
            "orig_dst",
            "netns_cookie",
            "pod",
            "fastpath",
            "closed",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert!(v.get("key").is_none());
        assert_eq!(v["pod"], serde_json::Value::Null);
    }
}
