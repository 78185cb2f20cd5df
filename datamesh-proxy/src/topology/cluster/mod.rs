//! Redis Cluster backends: the [`Cluster`] topology. It keeps the slot map ([`SlotMap`]),
//! fetched with `CLUSTER SHARDS` (or `SLOTS`) from any reachable node by a background
//! [`Follower`](super::follow::Follower) every `refresh_interval`, after each MOVED and after
//! a reported node failure (coalesced: one refresh in flight, at most one per
//! `min_refresh_gap`). `pick` reads the in-memory map and never does I/O.
//!
//! - [`slots`]: hashing, redirects, the slot map;
//! - [`split`]: multi-key split and merge;
//! - [`view`]: the one-node cluster the proxy shows its clients.

pub mod slots;
pub mod split;
pub mod view;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info};

pub use slots::{common_slot, crossslot_error, key_slot, parse_redirect, Redirect, SlotMap, SLOTS};

use super::control::{ControlConn, ControlError, ControlSpec};
use super::follow::{self, Follower};
use super::{Topology, TopologyError, TopologyKind};
use crate::backend::Backoff;
use crate::resp::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cluster node {addr} gave an unusable slot map: {what}: is it a cluster node (cluster-enabled yes)?")]
    BadReply { addr: SocketAddr, what: String },
    #[error("no cluster node answered with a slot map ({tried} tried, last error: {last}): are the configured cluster nodes reachable?")]
    NoNodeReachable { tried: usize, last: String },
}

/// Fetches the slot map from one node: `CLUSTER SHARDS`, and `CLUSTER SLOTS` when the node
/// does not know SHARDS (Redis < 7) or its answer is unusable.
pub async fn fetch_slot_map(addr: SocketAddr, spec: &ControlSpec) -> Result<SlotMap, ClusterError> {
    let mut c = ControlConn::connect(addr, spec).await?;
    let shards = c.command(&[b"CLUSTER", b"SHARDS"]).await?;
    let shards_err = match &shards {
        Value::Error(e) => String::from_utf8_lossy(e).into_owned(),
        v => match SlotMap::from_shards_reply(v, addr) {
            Ok(m) if m.assigned() > 0 => return Ok(m),
            Ok(_) => "CLUSTER SHARDS assigned no slot".to_string(),
            Err(e) => e,
        },
    };
    debug!(%addr, reason = %shards_err, "CLUSTER SHARDS unusable, trying CLUSTER SLOTS");
    match c.command(&[b"CLUSTER", b"SLOTS"]).await? {
        Value::Error(e) => Err(ClusterError::BadReply {
            addr,
            what: format!(
                "CLUSTER SHARDS: {shards_err}; CLUSTER SLOTS: {}",
                String::from_utf8_lossy(&e)
            ),
        }),
        v => SlotMap::from_slots_reply(&v, addr)
            .map_err(|what| ClusterError::BadReply { addr, what }),
    }
}

/// Configuration of one cluster backend.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Seed nodes (any node of the cluster); tried in order when the known nodes fail.
    pub seeds: Vec<SocketAddr>,
    /// Send read-only commands to replicas (round-robin); the pools then send `READONLY` on
    /// every connection.
    pub read_from_replicas: bool,
    /// Periodic refresh interval (default 10 s).
    pub refresh_interval: Duration,
    /// Minimum gap between two refreshes triggered by MOVED or node failures.
    pub min_refresh_gap: Duration,
    /// How control connections connect (bypass mark, credentials, timeouts).
    pub control: ControlSpec,
}

impl ClusterConfig {
    pub fn new(seeds: Vec<SocketAddr>) -> Self {
        Self {
            seeds,
            read_from_replicas: false,
            refresh_interval: Duration::from_secs(10),
            min_refresh_gap: Duration::from_millis(100),
            control: ControlSpec::plain(),
        }
    }
}

struct ClusterInner {
    cfg: ClusterConfig,
    map: RwLock<SlotMap>,
    generation: watch::Sender<u64>,
    /// Wakes the refresher early (MOVED, node failure). A stored permit coalesces bursts
    /// into one more refresh: never more than one in flight.
    refresh: Notify,
    rr: AtomicUsize,
    /// Nodes reported failed since the last good refresh: asked last, so a dead (possibly
    /// black-holed) master does not cost a connect timeout before every refresh.
    suspects: Mutex<Vec<SocketAddr>>,
}

impl ClusterInner {
    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, SlotMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, SlotMap> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Nodes to ask for the map: known masters (rotated so load spreads), their replicas,
    /// then the configured seeds; suspects last.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        {
            let map = self.read_map();
            let mut masters = map.masters().to_vec();
            if !masters.is_empty() {
                let k = self.rr.fetch_add(1, Ordering::Relaxed) % masters.len();
                masters.rotate_left(k);
            }
            out.extend(masters);
            for s in map.shards() {
                out.extend(s.replicas.iter().copied());
            }
        }
        out.extend(self.cfg.seeds.iter().copied());
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(*a));
        let suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        // Stable partition: healthy candidates first, in their order.
        out.sort_by_key(|a| suspects.contains(a));
        out
    }

    async fn refresh_once(&self) -> Result<bool, ClusterError> {
        let candidates = self.candidates();
        let mut last = String::from("no candidate nodes configured");
        for addr in &candidates {
            match fetch_slot_map(*addr, &self.cfg.control).await {
                Ok(map) if map.assigned() == 0 => {
                    // A node that just (re)started outside the cluster knows no slots;
                    // never let it wipe a good map.
                    last = format!("{addr} knows no slot owners");
                }
                Ok(map) => {
                    self.suspects
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    let changed = {
                        let mut cur = self.write_map();
                        if *cur != map {
                            *cur = map;
                            true
                        } else {
                            false
                        }
                    };
                    if changed {
                        self.bump();
                        info!(from = %addr, ranges = ?self.read_map().ranges(), "cluster slot map updated");
                    }
                    return Ok(changed);
                }
                Err(e) => {
                    debug!(node = %addr, error = %e, "slot map fetch failed, trying the next node");
                    last = e.to_string();
                }
            }
        }
        Err(ClusterError::NoNodeReachable {
            tried: candidates.len(),
            last,
        })
    }
}

impl Follower for ClusterInner {
    type Error = ClusterError;

    fn what(&self) -> String {
        "cluster slot map".into()
    }

    /// Refreshes at once, then every `refresh_interval` and on demand, until a refresh
    /// fails (the old map stays in use meanwhile).
    async fn follow(&self, _round: u64, backoff: &mut Backoff) -> ClusterError {
        loop {
            if let Err(e) = self.refresh_once().await {
                return e;
            }
            backoff.reset();
            let done = Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.refresh_interval) => {}
                _ = self.refresh.notified() => {
                    tokio::time::sleep_until(done + self.cfg.min_refresh_gap).await;
                }
            }
        }
    }
}

/// A Redis Cluster backend as a [`Topology`]. Dropping it stops its refresher.
pub struct Cluster {
    inner: Arc<ClusterInner>,
    follower: Option<AbortOnDropHandle<()>>,
}

impl Cluster {
    /// Starts the refresher (first fetch immediately) and returns at once; `pick` reports
    /// [`TopologyError::SlotUnassigned`] / [`TopologyError::NoNodes`] until the first map
    /// arrives (see [`super::wait_ready`]). Must be called inside a tokio runtime.
    pub fn spawn(cfg: ClusterConfig) -> Self {
        let mut c = Self::with_map(cfg, SlotMap::empty());
        let base = Duration::from_millis(100);
        let max = c.inner.cfg.refresh_interval.max(base);
        c.follower = Some(follow::spawn(c.inner.clone(), base, max));
        c
    }

    /// A cluster topology with a fixed map and no refresher (tests and tools); MOVED replies
    /// still update it.
    pub fn with_map(cfg: ClusterConfig, map: SlotMap) -> Self {
        Self {
            inner: Arc::new(ClusterInner {
                cfg,
                map: RwLock::new(map),
                generation: watch::channel(0).0,
                refresh: Notify::new(),
                rr: AtomicUsize::new(0),
                suspects: Mutex::new(Vec::new()),
            }),
            follower: None,
        }
    }

    /// A copy of the current slot map.
    pub fn slot_map(&self) -> SlotMap {
        self.inner.read_map().clone()
    }

    /// True when `addr` is a replica in the current map.
    pub fn is_replica(&self, addr: SocketAddr) -> bool {
        self.inner
            .read_map()
            .shards()
            .iter()
            .any(|s| s.replicas.contains(&addr))
    }
}

impl Topology for Cluster {
    fn kind(&self) -> TopologyKind {
        TopologyKind::Cluster
    }

    fn pick(&self, slot: Option<u16>, readonly: bool) -> Result<SocketAddr, TopologyError> {
        let map = self.inner.read_map();
        let rr = self.inner.rr.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = slot else {
            // Keyless command: any master will do; spread them.
            let masters = map.masters();
            if masters.is_empty() {
                return Err(TopologyError::NoNodes {
                    what: "the cluster (slot map not loaded yet)".into(),
                });
            }
            return Ok(masters[rr % masters.len()]);
        };
        let shard = map
            .shard_of(slot)
            .ok_or(TopologyError::SlotUnassigned { slot })?;
        if readonly && self.inner.cfg.read_from_replicas && !shard.replicas.is_empty() {
            return Ok(shard.replicas[rr % shard.replicas.len()]);
        }
        Ok(shard.master)
    }

    fn redirected(&self, slot: u16, addr: SocketAddr, ask: bool) {
        if ask {
            // ASK is a one-shot detour during a migration; the owner is still the old node.
            return;
        }
        let changed = self.inner.write_map().assign(slot, addr);
        if changed {
            self.inner.bump();
        }
        debug!(slot, %addr, changed, "MOVED: slot owner updated, scheduling a refresh");
        // Other slots probably moved too (resharding, failover): refresh the whole map.
        self.inner.refresh.notify_one();
    }

    fn node_failed(&self, addr: SocketAddr) {
        debug!(node = %addr, "cluster node failed, scheduling a slot map refresh");
        {
            let mut suspects = self
                .inner
                .suspects
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !suspects.contains(&addr) {
                suspects.push(addr);
            }
        }
        self.inner.refresh.notify_one();
    }

    fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn is_ready(&self) -> bool {
        self.inner.read_map().assigned() > 0
    }

    fn nodes(&self) -> Vec<SocketAddr> {
        let map = self.inner.read_map();
        let mut out = map.masters().to_vec();
        if self.inner.cfg.read_from_replicas {
            for s in map.shards() {
                out.extend(s.replicas.iter().copied());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn masters(&self) -> Vec<SocketAddr> {
        self.inner.read_map().masters().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::slots::RangeEntry;
    use super::*;
    use crate::testing::{addr, Peer, Script};

    fn test_cluster(map: SlotMap, read_from_replicas: bool) -> Cluster {
        let mut cfg = ClusterConfig::new(vec![]);
        cfg.read_from_replicas = read_from_replicas;
        Cluster::with_map(cfg, map)
    }

    #[test]
    fn cluster_pick_and_moved() {
        let a = addr("127.0.0.1:7000");
        let b_ = addr("127.0.0.1:7001");
        let r = addr("127.0.0.1:7003");
        let map = SlotMap::from_ranges(vec![
            RangeEntry {
                start: 0,
                end: 8191,
                master: a,
                replicas: vec![r],
            },
            RangeEntry {
                start: 8192,
                end: 16383,
                master: b_,
                replicas: vec![],
            },
        ]);
        let c = test_cluster(map.clone(), false);
        assert!(c.is_cluster() && c.is_ready());
        assert_eq!(c.pick(Some(0), true), Ok(a));
        assert_eq!(c.pick(Some(9000), false), Ok(b_));
        let keyless: std::collections::HashSet<_> =
            (0..4).map(|_| c.pick(None, false).expect("pick")).collect();
        assert_eq!(keyless.len(), 2);
        assert_eq!(c.nodes(), vec![a, b_]);
        assert_eq!(c.masters(), vec![a, b_]);
        // ASK changes nothing.
        let changes = c.changes();
        c.redirected(5, b_, true);
        assert_eq!((c.pick(Some(5), false), c.generation()), (Ok(a), 0));
        // MOVED takes effect at once, bumps the generation and wakes watchers.
        c.redirected(5, b_, false);
        assert_eq!((c.pick(Some(5), false), c.generation()), (Ok(b_), 1));
        assert!(changes.has_changed().expect("watch"));
        c.redirected(5, b_, false);
        assert_eq!(c.generation(), 1);

        // Refresh candidates: masters, replicas, seeds; failed nodes asked last.
        assert_eq!(c.inner.candidates().len(), 3);
        c.node_failed(a);
        assert_eq!(c.inner.candidates().last(), Some(&a));

        let c = test_cluster(map, true);
        assert_eq!(c.pick(Some(0), true), Ok(r));
        assert_eq!(c.pick(Some(0), false), Ok(a));
        assert_eq!(c.pick(Some(9000), true), Ok(b_));
        assert!(c.is_replica(r));
        assert_eq!(c.nodes(), vec![a, b_, r]);

        let empty = test_cluster(SlotMap::empty(), false);
        assert!(!empty.is_ready());
        assert_eq!(
            empty.pick(Some(3), false),
            Err(TopologyError::SlotUnassigned { slot: 3 })
        );
        assert!(matches!(
            empty.pick(None, false),
            Err(TopologyError::NoNodes { .. })
        ));
    }

    /// The refresher against scripted nodes: the first seed is refused, the second answers
    /// CLUSTER SHARDS with an error and CLUSTER SLOTS with a map; a node failure triggers a
    /// refresh that finds the map unchanged (no generation bump).
    #[tokio::test]
    async fn refresher_falls_back_to_slots_and_skips_dead_seeds() {
        // The map names a node that refuses connections: refreshes must skip it.
        let dead = Peer::refused_addr().await;
        let slots_reply = format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{}\r\n",
            dead.port()
        );
        let peer = Peer::start(
            Script::new()
                .expect("CLUSTER", b"-ERR unknown subcommand 'SHARDS'\r\n")
                .expect("CLUSTER", slots_reply.as_bytes())
                .expect("CLUSTER", b"-ERR unknown subcommand 'SHARDS'\r\n")
                .expect("CLUSTER", slots_reply.as_bytes()),
        )
        .await;
        let mut cfg = ClusterConfig::new(vec![dead, peer.addr()]);
        cfg.refresh_interval = Duration::from_secs(3600);
        cfg.min_refresh_gap = Duration::from_millis(1);
        let c = Cluster::spawn(cfg);
        assert!(super::super::wait_ready(&c, Duration::from_secs(5)).await);
        assert_eq!(c.pick(Some(100), false), Ok(dead));
        assert_eq!(c.generation(), 1);
        c.node_failed(dead);
        peer.wait_received(6).await;
        assert_eq!(c.generation(), 1, "an unchanged map does not bump");
    }
}
