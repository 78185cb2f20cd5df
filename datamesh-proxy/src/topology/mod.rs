//! Backend topology: where a command goes. The [`Topology`] trait is all the rest of the proxy
//! sees of a backend's shape ("which node serves this slot, for a read or a write?", "this
//! node failed, look again", "tell me when the routing changes"); [`Standalone`] is the
//! single-node case, [`sentinel::Sentinel`] and [`cluster::Cluster`] the others. Nothing
//! outside this module branches on the backend kind except through [`Topology::is_cluster`]
//! (cluster mode changes what clients may send: slots, CROSSSLOT, one database).
//!
//! - [`control`]: the control-plane client (same connect, handshake and codec as the data
//!   path);
//! - [`follow`]: the one shape of the Sentinel and Cluster background tasks.
//!
//! Architecture Invariant: a `Topology` never performs I/O inside `pick`; discovery and
//! refreshes run in their own task and publish a new generation on a watch channel, which the
//! endpoint follows at once (no polling).

pub mod cluster;
pub mod control;
pub mod follow;
pub mod sentinel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

/// Why no backend node can be picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Sentinel has not (yet) told us a master, or the master is being failed over.
    #[error("no master known for {master_name}: are the sentinels reachable and is the master name right?")]
    NoMaster { master_name: String },
    /// The cluster slot map has no owner for this slot (map not loaded yet, or a hole).
    #[error("slot {slot} is not served by any known cluster node: is the cluster slot map complete (CLUSTER SHARDS)?")]
    SlotUnassigned { slot: u16 },
    /// The topology knows no node at all.
    #[error("no backend node is known for {what}")]
    NoNodes { what: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyKind {
    Standalone,
    Sentinel,
    Cluster,
}

/// Routing view of one endpoint's backend.
pub trait Topology: Send + Sync + 'static {
    fn kind(&self) -> TopologyKind;

    /// True for Redis Cluster: commands are routed by key slot and multi-key commands are
    /// split or refused with CROSSSLOT.
    fn is_cluster(&self) -> bool {
        self.kind() == TopologyKind::Cluster
    }

    /// The node for a command on `slot` (cluster mode; `None` elsewhere or for keyless
    /// commands); `readonly` lets an implementation send reads to replicas when configured.
    fn pick(&self, slot: Option<u16>, readonly: bool) -> Result<SocketAddr, TopologyError>;

    /// A backend answered `-MOVED` (`ask == false`) or `-ASK` (`ask == true`) for `slot`,
    /// naming `addr`. MOVED updates the slot map (and schedules a refresh); ASK does not.
    fn redirected(&self, _slot: u16, _addr: SocketAddr, _ask: bool) {}

    /// A node failed (connect refused, connection lost, a command timed out) or answered as
    /// if it were no longer what we believe (READONLY from a "master", LOADING): look again
    /// soon. Calls are coalesced; a burst costs one discovery round.
    fn node_failed(&self, _addr: SocketAddr) {}

    /// The routing generation: increases whenever the routing changes (new master, new slot
    /// map), so cached decisions can tell they are stale.
    fn generation(&self) -> u64;

    /// A receiver that sees every generation change (the endpoint retires pools of nodes
    /// that left and warms new ones from it; a held command can wait on it).
    fn changes(&self) -> watch::Receiver<u64>;

    /// True once the first view is known (a Sentinel master, a cluster slot map).
    fn is_ready(&self) -> bool;

    /// Every node currently used (masters and, where reads go to them, replicas).
    fn nodes(&self) -> Vec<SocketAddr>;

    /// The masters: every slot owner of a cluster (broadcast commands), else the one master.
    fn masters(&self) -> Vec<SocketAddr>;

    /// True when another node may be named for a standalone endpoint (standby addresses).
    fn has_standby(&self) -> bool {
        false
    }
}

/// Waits up to `timeout` until `t` has its first view. True when it has.
pub async fn wait_ready(t: &dyn Topology, timeout: Duration) -> bool {
    let mut rx = t.changes();
    let wait = async {
        loop {
            if t.is_ready() {
                return;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the topology, which the caller holds.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}

/// A standalone backend: one node, and optionally standby nodes the proxy switches to when the
/// primary has been down past `standby_after` and a standby answers `ROLE` master (an operator
/// or an external failover tool promoted it; the proxy never sends `REPLICAOF`). The switch is
/// logged with its duration and published as a new generation.
pub struct Standalone {
    inner: Arc<StandaloneInner>,
    _watch: Option<AbortOnDropHandle<()>>,
}

struct StandaloneInner {
    /// The primary first, then the standbys.
    nodes: Vec<SocketAddr>,
    current: AtomicUsize,
    generation: watch::Sender<u64>,
    /// When the node in use was first reported failed (None: not failing).
    failed_since: Mutex<Option<Instant>>,
    wake: Notify,
}

/// Settings of the standby watch.
#[derive(Debug, Clone)]
pub struct StandbyConfig {
    pub standbys: Vec<SocketAddr>,
    /// How long the node in use must be down before a standby is looked for.
    pub after: Duration,
    /// How the `ROLE`/`PING` checks connect (backend credentials, bypass mark).
    pub control: control::ControlSpec,
}

impl Standalone {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            inner: Arc::new(StandaloneInner {
                nodes: vec![addr],
                current: AtomicUsize::new(0),
                generation: watch::channel(0).0,
                failed_since: Mutex::new(None),
                wake: Notify::new(),
            }),
            _watch: None,
        }
    }

    /// A primary with standbys (must run inside tokio: the standby watch starts here).
    pub fn with_standby(addr: SocketAddr, cfg: StandbyConfig) -> Self {
        let mut nodes = vec![addr];
        nodes.extend(cfg.standbys.iter().copied().filter(|a| *a != addr));
        let inner = Arc::new(StandaloneInner {
            nodes,
            current: AtomicUsize::new(0),
            generation: watch::channel(0).0,
            failed_since: Mutex::new(None),
            wake: Notify::new(),
        });
        let task = tokio::spawn(watch_standby(inner.clone(), cfg));
        Self {
            inner,
            _watch: Some(AbortOnDropHandle::new(task)),
        }
    }

    fn current(&self) -> SocketAddr {
        self.inner.nodes[self.inner.current.load(Ordering::Acquire)]
    }
}

impl StandaloneInner {
    fn failed_since(&self) -> Option<Instant> {
        *self.failed_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_failed_since(&self, t: Option<Instant>) {
        *self.failed_since.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }
}

/// The answer of `ROLE` on `addr` ("master", "slave"), if it answers.
async fn role_of(addr: SocketAddr, spec: &control::ControlSpec) -> Option<String> {
    let mut c = control::ControlConn::connect(addr, spec).await.ok()?;
    let v = c.command(&[b"ROLE"]).await.ok()?;
    v.as_array()?.first()?.as_str().map(str::to_string)
}

/// Watches the node in use once it is reported failed: when it stays down past `after`, the
/// first standby answering `ROLE` master becomes the node in use.
async fn watch_standby(inner: Arc<StandaloneInner>, cfg: StandbyConfig) {
    loop {
        let Some(since) = inner.failed_since() else {
            inner.wake.notified().await;
            continue;
        };
        let cur = inner.current.load(Ordering::Acquire);
        // Still down? Any answer to ROLE means it is up (a restarted primary is used again).
        if role_of(inner.nodes[cur], &cfg.control).await.is_some() {
            inner.set_failed_since(None);
            continue;
        }
        if since.elapsed() >= cfg.after {
            for (i, addr) in inner.nodes.iter().enumerate() {
                if i == cur {
                    continue;
                }
                if role_of(*addr, &cfg.control).await.as_deref() == Some("master") {
                    inner.current.store(i, Ordering::Release);
                    inner.set_failed_since(None);
                    inner.generation.send_modify(|g| *g += 1);
                    tracing::warn!(from = %inner.nodes[cur], to = %addr, after_ms = since.elapsed().as_millis() as u64, "standalone: the node in use is down and a standby is master: switched to it");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Topology for Standalone {
    fn kind(&self) -> TopologyKind {
        TopologyKind::Standalone
    }

    fn pick(&self, _slot: Option<u16>, _readonly: bool) -> Result<SocketAddr, TopologyError> {
        Ok(self.current())
    }

    fn node_failed(&self, addr: SocketAddr) {
        if self.has_standby() && addr == self.current() && self.inner.failed_since().is_none() {
            self.inner.set_failed_since(Some(Instant::now()));
            self.inner.wake.notify_one();
        }
    }

    fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn nodes(&self) -> Vec<SocketAddr> {
        vec![self.current()]
    }

    fn masters(&self) -> Vec<SocketAddr> {
        vec![self.current()]
    }

    fn has_standby(&self) -> bool {
        self.inner.nodes.len() > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn standalone_always_picks_its_node() {
        let a: SocketAddr = "127.0.0.1:6379".parse().expect("addr");
        let t = Standalone::new(a);
        assert_eq!(t.pick(Some(5), true), Ok(a));
        assert_eq!(t.pick(None, false), Ok(a));
        assert!(!t.is_cluster());
        assert_eq!(t.nodes(), vec![a]);
        assert_eq!(t.masters(), vec![a]);
        assert!(wait_ready(&t, Duration::from_millis(1)).await);
    }
}
