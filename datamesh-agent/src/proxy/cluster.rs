//! Redis Cluster backends. This module owns:
//! - key → slot hashing ([`key_slot`], CRC16-XMODEM with `{hash tag}` rules);
//! - parsing `-MOVED` / `-ASK` redirections ([`parse_redirect`]);
//! - the slot map ([`SlotMap`]: 16384 slots → shard, each shard a master and its replicas),
//!   fetched from any reachable node with `CLUSTER SHARDS` (Redis >= 7) or `CLUSTER SLOTS`;
//! - the [`Cluster`] topology (routing, MOVED updates, periodic and on-demand refresh);
//! - splitting multi-key commands across slots and merging the answers ([`split_multikey`],
//!   [`merge`]) and the CROSSSLOT refusal for the others;
//! - the proxy's own answers to cluster-only commands ([`cluster_reply`]);
//! - [`wire`], a minimal RESP2 client the control plane (slot map fetch, and `sentinel.rs`)
//!   uses over its own short-lived connections, never the data path's pooled ones.
//!
//! How the session/backend code uses it (see each item's docs):
//! 1. route: `slot = key_slot(first_key)`, `addr = topology.pick(Some(slot), readonly)`;
//! 2. a reply starting with `-MOVED`/`-ASK`: [`parse_redirect`] with the node that answered;
//!    MOVED → `topology.redirected(slot, addr, false)` then resend to `addr`; ASK → send
//!    `ASKING` + the command on one connection to `addr` (same pipeline, back to back),
//!    `topology.redirected(slot, addr, true)` (a no-op kept for symmetry and metrics);
//! 3. a connect or I/O failure to a cluster node: [`Cluster::node_failed`] (refresh soon).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::topology::{Topology, TopologyError};
use wire::{Client, ClientError, ConnectOptions, Value};

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// `slots[]` value for a slot no shard serves.
const UNASSIGNED: u16 = u16::MAX;

/// The `-CROSSSLOT` error Redis answers for multi-key commands across slots (with CRLF).
pub const CROSSSLOT_ERROR: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

// ---------------------------------------------------------------------------------------
// Hashing
// ---------------------------------------------------------------------------------------

/// CRC16-XMODEM (poly 0x1021, init 0, no reflection), the checksum Redis Cluster hashes
/// keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `key` that is hashed: the bytes between the first `{` and the first `}` after
/// it, if that is non-empty; otherwise the whole key (Redis Cluster spec, "hash tags").
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(len) = rest.iter().position(|&b| b == b'}') {
            if len > 0 {
                return &rest[..len];
            }
        }
    }
    key
}

/// The hash slot (0..16383) of `key`.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) & (SLOTS as u16 - 1)
}

/// Returned by [`common_slot`] when keys map to different slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("keys in request don't hash to the same slot ({first} and {other})")]
pub struct CrossSlot {
    pub first: u16,
    pub other: u16,
}

/// The one slot all `keys` hash to (`Ok(None)` for no keys), or [`CrossSlot`]. For the
/// multi-key commands that are not split (e.g. `SUNION`, `RENAME`, `EVAL` keys): on `Err`
/// answer [`crossslot_error`].
pub fn common_slot<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Option<u16>, CrossSlot> {
    let mut slot = None;
    for k in keys {
        let s = key_slot(k);
        match slot {
            None => slot = Some(s),
            Some(first) if first != s => return Err(CrossSlot { first, other: s }),
            Some(_) => {}
        }
    }
    Ok(slot)
}

/// `-CROSSSLOT Keys in request don't hash to the same slot\r\n`, exactly as Redis says it.
pub fn crossslot_error() -> Bytes {
    Bytes::from_static(CROSSSLOT_ERROR)
}

// ---------------------------------------------------------------------------------------
// Redirections
// ---------------------------------------------------------------------------------------

/// A cluster redirection from a backend error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// The slot now lives at `addr` for good: update the map, resend there.
    Moved { slot: u16, addr: SocketAddr },
    /// The slot is being migrated: send `ASKING` then the command to `addr`, once; the map
    /// does not change.
    Ask { slot: u16, addr: SocketAddr },
}

impl Redirect {
    pub fn slot(&self) -> u16 {
        match *self {
            Redirect::Moved { slot, .. } | Redirect::Ask { slot, .. } => slot,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match *self {
            Redirect::Moved { addr, .. } | Redirect::Ask { addr, .. } => addr,
        }
    }

    pub fn is_ask(&self) -> bool {
        matches!(self, Redirect::Ask { .. })
    }
}

/// Parses `-MOVED <slot> <ip>:<port>` / `-ASK <slot> <ip>:<port>` (the leading `-` and the
/// trailing CRLF are optional, so both `Reply::raw` and the bare text work). An empty host
/// (`MOVED 3999 :6381`, sent by nodes whose preferred endpoint is unknown to them) means the
/// host of `current`, the node that answered. Hostnames and `?` endpoints give `None`: the
/// caller then treats the reply as an ordinary error and should call
/// [`Cluster::node_failed`] so the map gets refreshed.
pub fn parse_redirect(err: &[u8], current: SocketAddr) -> Option<Redirect> {
    let err = err.strip_prefix(b"-").unwrap_or(err);
    let err = err.strip_suffix(b"\r\n").unwrap_or(err);
    let (kind, is_ask) = if let Some(rest) = err.strip_prefix(b"MOVED ") {
        (rest, false)
    } else if let Some(rest) = err.strip_prefix(b"ASK ") {
        (rest, true)
    } else {
        return None;
    };
    let text = std::str::from_utf8(kind).ok()?;
    let mut parts = text.split_ascii_whitespace();
    let slot: u16 = parts.next()?.parse().ok()?;
    if usize::from(slot) >= SLOTS {
        return None;
    }
    let addr = parse_host_port(parts.next()?, current.ip())?;
    if parts.next().is_some() {
        return None;
    }
    Some(if is_ask {
        Redirect::Ask { slot, addr }
    } else {
        Redirect::Moved { slot, addr }
    })
}

/// `ip:port`, `[v6]:port` or `:port` (meaning `same_host`).
fn parse_host_port(s: &str, same_host: std::net::IpAddr) -> Option<SocketAddr> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Some(SocketAddr::new(same_host, port));
    }
    host.parse().ok().map(|ip| SocketAddr::new(ip, port))
}

// ---------------------------------------------------------------------------------------
// Slot map
// ---------------------------------------------------------------------------------------

/// One shard: the master serving its slots and the replicas that were healthy when the map
/// was fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub master: SocketAddr,
    pub replicas: Vec<SocketAddr>,
}

/// Which shard serves each of the 16384 slots.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Slot → index into `shards`, or [`UNASSIGNED`].
    slots: Vec<u16>,
    shards: Vec<Shard>,
    /// Masters of shards that own at least one slot, in shard order (derived from `slots`;
    /// cached because keyless commands pick among them on the data path).
    masters: Vec<SocketAddr>,
}

impl std::fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotMap")
            .field("ranges", &self.ranges())
            .field("shards", &self.shards)
            .finish()
    }
}

impl Default for SlotMap {
    fn default() -> Self {
        Self::empty()
    }
}

/// One contiguous slot range as a node reported it, before normalisation.
#[derive(Debug, Clone)]
struct RangeEntry {
    start: u16,
    end: u16,
    master: SocketAddr,
    replicas: Vec<SocketAddr>,
}

impl SlotMap {
    /// No slot assigned (before the first successful fetch).
    pub fn empty() -> Self {
        Self {
            slots: vec![UNASSIGNED; SLOTS],
            shards: Vec::new(),
            masters: Vec::new(),
        }
    }

    /// Builds a map from `(start, end, master, replicas)` ranges. Shards are numbered in
    /// slot order and replicas sorted, so two fetches of the same cluster compare equal
    /// whichever node answered.
    fn from_ranges(mut ranges: Vec<RangeEntry>) -> Self {
        ranges.sort_by_key(|r| r.start);
        let mut map = Self::empty();
        let mut index: HashMap<SocketAddr, u16> = HashMap::new();
        for r in ranges {
            let idx = match index.get(&r.master) {
                Some(&i) => i,
                None => {
                    let i = map.shards.len() as u16;
                    let mut replicas = r.replicas.clone();
                    replicas.sort();
                    replicas.dedup();
                    map.shards.push(Shard {
                        master: r.master,
                        replicas,
                    });
                    index.insert(r.master, i);
                    i
                }
            };
            for s in r.start..=r.end.min(SLOTS as u16 - 1) {
                map.slots[usize::from(s)] = idx;
            }
        }
        map.recompute_masters();
        map
    }

    /// The shard serving `slot`.
    pub fn shard_of(&self, slot: u16) -> Option<&Shard> {
        let idx = *self.slots.get(usize::from(slot))?;
        self.shards.get(usize::from(idx))
    }

    /// The master serving `slot`.
    #[cfg(test)]
    pub fn master_of(&self, slot: u16) -> Option<SocketAddr> {
        self.shard_of(slot).map(|s| s.master)
    }

    /// All shards (including ones left without slots by MOVED updates).
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Masters that serve at least one slot, in shard order.
    pub fn masters(&self) -> &[SocketAddr] {
        &self.masters
    }

    fn recompute_masters(&mut self) {
        let mut used = vec![false; self.shards.len()];
        for &i in &self.slots {
            if let Some(u) = used.get_mut(usize::from(i)) {
                *u = true;
            }
        }
        self.masters = self
            .shards
            .iter()
            .zip(used)
            .filter(|(_, u)| *u)
            .map(|(s, _)| s.master)
            .collect();
    }

    /// How many slots have an owner (16384 for a healthy cluster).
    pub fn assigned(&self) -> usize {
        self.slots.iter().filter(|&&i| i != UNASSIGNED).count()
    }

    /// Contiguous ranges `(start, end, master)`.
    pub fn ranges(&self) -> Vec<(u16, u16, SocketAddr)> {
        let mut out: Vec<(u16, u16, SocketAddr)> = Vec::new();
        for (slot, &idx) in self.slots.iter().enumerate() {
            let Some(shard) = self.shards.get(usize::from(idx)) else {
                continue;
            };
            let slot = slot as u16;
            match out.last_mut() {
                Some(last) if last.2 == shard.master && last.1 + 1 == slot => last.1 = slot,
                _ => out.push((slot, slot, shard.master)),
            }
        }
        out
    }

    /// Applies a MOVED: `slot` is now served by master `addr`. Returns whether anything
    /// changed.
    pub fn assign(&mut self, slot: u16, addr: SocketAddr) -> bool {
        let Some(cur) = self.slots.get(usize::from(slot)).copied() else {
            return false;
        };
        if self.shards.get(usize::from(cur)).map(|s| s.master) == Some(addr) {
            return false;
        }
        let idx = match self.shards.iter().position(|s| s.master == addr) {
            Some(i) => i as u16,
            None => {
                self.shards.push(Shard {
                    master: addr,
                    replicas: Vec::new(),
                });
                (self.shards.len() - 1) as u16
            }
        };
        self.slots[usize::from(slot)] = idx;
        self.recompute_masters();
        true
    }

    /// Parses a `CLUSTER SHARDS` reply (RESP2 flat key/value arrays or RESP3 maps). `queried`
    /// is the node that answered (its IP stands in for empty `ip` fields). Only `online`
    /// replicas are kept; a master is kept whatever its health because it still owns the
    /// slots until a failover says otherwise.
    pub fn from_shards_reply(reply: &Value, queried: SocketAddr) -> Result<Self, String> {
        let shards = reply
            .as_array()
            .ok_or("CLUSTER SHARDS reply is not an array")?;
        let mut ranges = Vec::new();
        for shard in shards {
            let slots = shard.field("slots").ok_or("shard without \"slots\"")?;
            let slots = slots.as_array().ok_or("shard \"slots\" is not an array")?;
            let nodes = shard.field("nodes").ok_or("shard without \"nodes\"")?;
            let nodes = nodes.as_array().ok_or("shard \"nodes\" is not an array")?;
            let mut master: Option<(SocketAddr, bool)> = None;
            let mut replicas = Vec::new();
            for node in nodes {
                let ip = node.field("ip").and_then(Value::as_str).unwrap_or("");
                let port = node
                    .field("port")
                    .or_else(|| node.field("tls-port"))
                    .and_then(Value::as_int)
                    .ok_or("shard node without \"port\"")?;
                let Ok(port) = u16::try_from(port) else {
                    return Err(format!("shard node port {port} out of range"));
                };
                let Some(addr) = node_addr(ip, port, queried) else {
                    continue;
                };
                let role = node.field("role").and_then(Value::as_str).unwrap_or("");
                let health = node
                    .field("health")
                    .and_then(Value::as_str)
                    .unwrap_or("online");
                if role == "master" {
                    // With shard ids (Redis >= 7.2) a failed-over old master stays in its
                    // shard, still flagged master but not online: the online one owns the
                    // slots.
                    let online = health == "online";
                    if master.is_none_or(|(_, was_online)| online && !was_online) {
                        master = Some((addr, online));
                    }
                } else if health == "online" {
                    replicas.push(addr);
                }
            }
            let Some((master, _)) = master else {
                // A shard whose master is unknown (all nodes failed/hostname-only): its slots
                // stay unassigned and pick() reports them.
                continue;
            };
            if slots.len() % 2 != 0 {
                return Err("shard \"slots\" has an odd number of bounds".into());
            }
            for pair in slots.chunks(2) {
                let (Some(start), Some(end)) = (pair[0].as_int(), pair[1].as_int()) else {
                    return Err("shard slot bound is not an integer".into());
                };
                let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end)) else {
                    return Err(format!("shard slot range {start}-{end} out of range"));
                };
                if start > end || usize::from(end) >= SLOTS {
                    return Err(format!("shard slot range {start}-{end} is invalid"));
                }
                ranges.push(RangeEntry {
                    start,
                    end,
                    master,
                    replicas: replicas.clone(),
                });
            }
        }
        Ok(Self::from_ranges(ranges))
    }

    /// Parses a `CLUSTER SLOTS` reply: `[[start, end, [ip, port, id, ...], replica...], ...]`.
    pub fn from_slots_reply(reply: &Value, queried: SocketAddr) -> Result<Self, String> {
        let entries = reply
            .as_array()
            .ok_or("CLUSTER SLOTS reply is not an array")?;
        let mut ranges = Vec::new();
        for e in entries {
            let e = e.as_array().ok_or("CLUSTER SLOTS entry is not an array")?;
            if e.len() < 3 {
                return Err("CLUSTER SLOTS entry has fewer than 3 elements".into());
            }
            let (Some(start), Some(end)) = (e[0].as_int(), e[1].as_int()) else {
                return Err("CLUSTER SLOTS bound is not an integer".into());
            };
            let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end)) else {
                return Err(format!("CLUSTER SLOTS range {start}-{end} out of range"));
            };
            if start > end || usize::from(end) >= SLOTS {
                return Err(format!("CLUSTER SLOTS range {start}-{end} is invalid"));
            }
            let node = |v: &Value| -> Option<SocketAddr> {
                let n = v.as_array()?;
                let ip = match n.first()? {
                    Value::Nil => return None,
                    other => other.as_str()?,
                };
                let port = u16::try_from(n.get(1)?.as_int()?).ok()?;
                node_addr(ip, port, queried)
            };
            let Some(master) = node(&e[2]) else {
                continue;
            };
            let replicas = e[3..].iter().filter_map(node).collect();
            ranges.push(RangeEntry {
                start,
                end,
                master,
                replicas,
            });
        }
        Ok(Self::from_ranges(ranges))
    }
}

/// A node address from a slot-map reply. Empty ip = the node we asked; `?` or a hostname
/// cannot be used without DNS and is skipped.
fn node_addr(ip: &str, port: u16, queried: SocketAddr) -> Option<SocketAddr> {
    if port == 0 {
        return None;
    }
    if ip.is_empty() {
        return Some(SocketAddr::new(queried.ip(), port));
    }
    ip.parse().ok().map(|ip| SocketAddr::new(ip, port))
}

/// Fetches the slot map from one node: `CLUSTER SHARDS`, and `CLUSTER SLOTS` when the node
/// does not know SHARDS (Redis < 7) or its answer is unusable.
pub async fn fetch_slot_map(
    addr: SocketAddr,
    opts: &ConnectOptions,
) -> Result<SlotMap, ClusterError> {
    let mut c = Client::connect(addr, opts).await?;
    let shards = c.command(&[b"CLUSTER", b"SHARDS"]).await?;
    let shards_err = match &shards {
        Value::Error(e) => e.clone(),
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
            what: format!("CLUSTER SHARDS: {shards_err}; CLUSTER SLOTS: {e}"),
        }),
        v => SlotMap::from_slots_reply(&v, addr)
            .map_err(|what| ClusterError::BadReply { addr, what }),
    }
}

// ---------------------------------------------------------------------------------------
// The Cluster topology
// ---------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cluster node {addr} gave an unusable slot map: {what}: is it a cluster node (cluster-enabled yes)?")]
    BadReply { addr: SocketAddr, what: String },
    #[error("no cluster node answered with a slot map ({tried} tried, last error: {last}): are the configured cluster nodes reachable?")]
    NoNodeReachable { tried: usize, last: String },
    #[error("cluster slot map not loaded within {timeout:?}")]
    NotReady { timeout: Duration },
}

/// Configuration of one cluster backend group.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Seed nodes (any node of the cluster); tried in order when the known nodes fail.
    pub seeds: Vec<SocketAddr>,
    /// Send read-only commands to replicas (round-robin). The backend must then send
    /// `READONLY` on every connection to a node for which [`Cluster::is_replica`] is true.
    pub read_from_replicas: bool,
    /// Periodic refresh interval (default 10 s).
    pub refresh_interval: Duration,
    /// Minimum gap between two refreshes triggered by MOVED or node failures.
    pub min_refresh_gap: Duration,
    /// How control connections connect (bypass mark, credentials, timeouts).
    pub conn: ConnectOptions,
}

impl ClusterConfig {
    pub fn new(seeds: Vec<SocketAddr>) -> Self {
        Self {
            seeds,
            read_from_replicas: false,
            refresh_interval: Duration::from_secs(10),
            min_refresh_gap: Duration::from_millis(200),
            conn: ConnectOptions::default(),
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
    suspects: std::sync::Mutex<Vec<SocketAddr>>,
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
    /// then the configured seeds.
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
            match fetch_slot_map(*addr, &self.cfg.conn).await {
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

    async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.cfg.refresh_interval);
        let mut last_refresh: Option<Instant> = None;
        // The first fetch happens at once; after a failure, retry with backoff rather than
        // waiting the whole interval.
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.refresh.notified() => {
                    if let Some(t) = last_refresh {
                        let since = t.elapsed();
                        if since < self.cfg.min_refresh_gap {
                            tokio::time::sleep(self.cfg.min_refresh_gap - since).await;
                        }
                    }
                }
            }
            last_refresh = Some(Instant::now());
            match self.refresh_once().await {
                Ok(_) => {
                    backoff.reset();
                    wait = self.cfg.refresh_interval;
                }
                Err(e) => {
                    wait = backoff.next_delay();
                    warn!(error = %e, retry_in = ?wait, "cluster slot map refresh failed; keeping the old map");
                }
            }
        }
    }
}

/// A Redis Cluster backend group as a [`Topology`]. `pick` never does I/O: it reads the
/// in-memory [`SlotMap`], which a background task refreshes every `refresh_interval`, after
/// each MOVED and after [`Cluster::node_failed`] (coalesced: one refresh in flight, at most
/// one per `min_refresh_gap`). Dropping the `Cluster` stops that task.
pub struct Cluster {
    inner: Arc<ClusterInner>,
    task: JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cluster {
    /// Starts the refresher (first fetch immediately) and returns at once; `pick` reports
    /// [`TopologyError::SlotUnassigned`] / [`TopologyError::NoNodes`] until the first map
    /// arrives (see [`Cluster::ready`]). Must be called inside a tokio runtime.
    pub fn spawn(cfg: ClusterConfig) -> Self {
        let inner = Arc::new(ClusterInner {
            cfg,
            map: RwLock::new(SlotMap::empty()),
            generation: watch::channel(0).0,
            refresh: Notify::new(),
            rr: AtomicUsize::new(0),
            suspects: std::sync::Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(inner.clone().run());
        Self { inner, task }
    }

    /// Like [`Cluster::spawn`] but waits up to `timeout` for the first slot map.
    #[cfg(test)]
    pub async fn connect(cfg: ClusterConfig, timeout: Duration) -> Result<Self, ClusterError> {
        let c = Self::spawn(cfg);
        c.ready(timeout).await?;
        Ok(c)
    }

    /// Waits until a slot map with at least one assigned slot is loaded.
    pub async fn ready(&self, timeout: Duration) -> Result<(), ClusterError> {
        let mut rx = self.inner.generation.subscribe();
        let wait = async {
            loop {
                if self.inner.read_map().assigned() > 0 {
                    return;
                }
                if rx.changed().await.is_err() {
                    // Sender lives in `inner`, which we hold: cannot happen; avoid a spin.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClusterError::NotReady { timeout })
    }

    /// Asks for a refresh soon (coalesced with any pending one). Call on a connect/I/O error
    /// to `addr` or on an unparsable redirect: the node may have failed over.
    pub fn node_failed(&self, addr: SocketAddr) {
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

    /// A copy of the current slot map.
    #[cfg(test)]
    pub fn slot_map(&self) -> SlotMap {
        self.inner.read_map().clone()
    }

    /// Masters that own slots.
    pub fn masters(&self) -> Vec<SocketAddr> {
        self.inner.read_map().masters().to_vec()
    }

    /// True when `addr` is a replica in the current map: connections to it need `READONLY`
    /// before serving reads (only relevant with `read_from_replicas`).
    #[cfg(test)]
    pub fn is_replica(&self, addr: SocketAddr) -> bool {
        self.inner
            .read_map()
            .shards()
            .iter()
            .any(|s| s.replicas.contains(&addr))
    }
}

impl Topology for Cluster {
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

    fn is_cluster(&self) -> bool {
        true
    }

    fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
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
}

// ---------------------------------------------------------------------------------------
// Multi-key split and merge
// ---------------------------------------------------------------------------------------

/// The multi-key commands the proxy splits across slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiKeyKind {
    Mget,
    Mset,
    Del,
    Unlink,
    Exists,
    Touch,
}

impl MultiKeyKind {
    /// Case-insensitive lookup of a command name.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        const TABLE: [(&[u8], MultiKeyKind); 6] = [
            (b"MGET", MultiKeyKind::Mget),
            (b"MSET", MultiKeyKind::Mset),
            (b"DEL", MultiKeyKind::Del),
            (b"UNLINK", MultiKeyKind::Unlink),
            (b"EXISTS", MultiKeyKind::Exists),
            (b"TOUCH", MultiKeyKind::Touch),
        ];
        TABLE
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, k)| k)
    }

    pub fn name(self) -> &'static str {
        match self {
            MultiKeyKind::Mget => "MGET",
            MultiKeyKind::Mset => "MSET",
            MultiKeyKind::Del => "DEL",
            MultiKeyKind::Unlink => "UNLINK",
            MultiKeyKind::Exists => "EXISTS",
            MultiKeyKind::Touch => "TOUCH",
        }
    }

    /// Arguments per key (MSET: key and value).
    fn step(self) -> usize {
        if self == MultiKeyKind::Mset {
            2
        } else {
            1
        }
    }

    /// Read-only commands may go to replicas.
    pub fn readonly(self) -> bool {
        matches!(self, MultiKeyKind::Mget | MultiKeyKind::Exists)
    }
}

/// One per-slot part of a split multi-key command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubCommand {
    pub slot: u16,
    /// The full command: name first, then this slot's keys (and values for MSET).
    pub args: Vec<Bytes>,
    /// For each key of this part, its index among the original command's keys (MSET: pair
    /// index). [`merge`] puts MGET values back in that order.
    pub positions: Vec<usize>,
}

impl SubCommand {
    /// The RESP2 array encoding of `args`, ready to write to a backend.
    pub fn encode(&self) -> Bytes {
        let args: Vec<&[u8]> = self.args.iter().map(|a| a.as_ref()).collect();
        Bytes::from(wire::encode_command(&args))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("{name} is not a command the proxy splits across slots")]
    NotMultiKey { name: String },
    /// Answer to the client as `-ERR wrong number of arguments for '<name>' command`.
    #[error("wrong number of arguments for '{name}' command")]
    WrongArity { name: String },
}

/// Splits MGET/MSET/DEL/UNLINK/EXISTS/TOUCH into one [`SubCommand`] per slot, in order of
/// first appearance. `args` are the arguments after the command name. When the result has
/// one element, every key is in one slot: forward the client's original bytes instead.
/// Otherwise send every part to `pick(Some(part.slot), kind.readonly())` (handle MOVED/ASK
/// per part exactly as for a single command) and give the replies, in part order, to
/// [`merge`].
pub fn split_multikey(cmd_name: &[u8], args: &[Bytes]) -> Result<Vec<SubCommand>, SplitError> {
    let name = String::from_utf8_lossy(cmd_name).to_ascii_lowercase();
    let kind =
        MultiKeyKind::from_name(cmd_name).ok_or(SplitError::NotMultiKey { name: name.clone() })?;
    let step = kind.step();
    if args.is_empty() || !args.len().is_multiple_of(step) {
        return Err(SplitError::WrongArity { name });
    }
    let mut parts: Vec<SubCommand> = Vec::new();
    let mut by_slot: HashMap<u16, usize> = HashMap::new();
    for (pos, chunk) in args.chunks(step).enumerate() {
        let slot = key_slot(&chunk[0]);
        let i = *by_slot.entry(slot).or_insert_with(|| {
            parts.push(SubCommand {
                slot,
                args: vec![Bytes::from_static(kind.name().as_bytes())],
                positions: Vec::new(),
            });
            parts.len() - 1
        });
        let part = &mut parts[i];
        part.args.extend(chunk.iter().cloned());
        part.positions.push(pos);
    }
    Ok(parts)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("{kind}: {subs} parts but {replies} replies")]
    Count {
        kind: &'static str,
        subs: usize,
        replies: usize,
    },
    #[error("{kind}: part {part} answered an unexpected reply: {what}")]
    Unexpected {
        kind: &'static str,
        part: usize,
        what: String,
    },
}

/// Merges the raw replies (complete RESP frames, e.g. `Reply::raw`) of the parts from
/// [`split_multikey`] into the one reply the client gets:
/// - MGET: one array with the values in the original key order (element bytes copied as
///   the backends sent them, RESP2 or RESP3);
/// - MSET: `+OK` when every part said OK, else the first part's error;
/// - DEL/UNLINK/EXISTS/TOUCH: the sum of the integers.
///
/// Any part's error reply (after redirects were followed) becomes the whole reply, as Redis
/// would fail the command. A malformed part is a [`MergeError`] (answer `-ERR` with it).
pub fn merge(
    kind: MultiKeyKind,
    subs: &[SubCommand],
    replies: &[Bytes],
) -> Result<Bytes, MergeError> {
    if subs.len() != replies.len() {
        return Err(MergeError::Count {
            kind: kind.name(),
            subs: subs.len(),
            replies: replies.len(),
        });
    }
    if let Some(err) = replies
        .iter()
        .find(|r| r.first() == Some(&b'-') || r.first() == Some(&b'!'))
    {
        return Ok(err.clone());
    }
    let unexpected = |part: usize, what: &str| MergeError::Unexpected {
        kind: kind.name(),
        part,
        what: what.to_string(),
    };
    match kind {
        MultiKeyKind::Mget => {
            let total: usize = subs.iter().map(|s| s.positions.len()).sum();
            let mut slots: Vec<Option<&[u8]>> = vec![None; total];
            for (i, (sub, raw)) in subs.iter().zip(replies).enumerate() {
                let elems =
                    wire::array_elements(raw).ok_or_else(|| unexpected(i, "not an array"))?;
                if elems.len() != sub.positions.len() {
                    return Err(unexpected(
                        i,
                        &format!("{} values for {} keys", elems.len(), sub.positions.len()),
                    ));
                }
                for (&pos, e) in sub.positions.iter().zip(elems) {
                    let slot = slots
                        .get_mut(pos)
                        .ok_or_else(|| unexpected(i, "key position out of range"))?;
                    *slot = Some(e);
                }
            }
            let mut out = BytesMut::new();
            out.put_slice(format!("*{total}\r\n").as_bytes());
            for (pos, v) in slots.into_iter().enumerate() {
                let v = v.ok_or_else(|| unexpected(0, &format!("no value for key {pos}")))?;
                out.put_slice(v);
            }
            Ok(out.freeze())
        }
        MultiKeyKind::Mset => {
            for (i, r) in replies.iter().enumerate() {
                if r.as_ref() != b"+OK\r\n" {
                    return Err(unexpected(i, &String::from_utf8_lossy(r)));
                }
            }
            Ok(Bytes::from_static(b"+OK\r\n"))
        }
        MultiKeyKind::Del | MultiKeyKind::Unlink | MultiKeyKind::Exists | MultiKeyKind::Touch => {
            let mut sum: i64 = 0;
            for (i, r) in replies.iter().enumerate() {
                let n = r
                    .strip_prefix(b":")
                    .and_then(|r| r.strip_suffix(b"\r\n"))
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| unexpected(i, "not an integer"))?;
                sum = sum.saturating_add(n);
            }
            Ok(Bytes::from(format!(":{sum}\r\n")))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cluster-only commands answered by the proxy
// ---------------------------------------------------------------------------------------

/// A stable 40-hex-digit node id for the proxy listener at `addr` (what CLUSTER MYID/NODES/
/// SLOTS/SHARDS show), derived from the address so every answer agrees.
pub fn proxy_node_id(addr: SocketAddr) -> String {
    // FNV-1a 64 over the address text, stretched to 160 bits with different seeds.
    let text = addr.to_string();
    let mut out = String::with_capacity(40);
    for seed in 0u64..3 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out.truncate(40);
    out
}

fn bulk(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(format!("${}\r\n", s.len()).as_bytes());
    out.put_slice(s);
    out.put_slice(b"\r\n");
}

fn bulk_reply(s: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(s.len() + 16);
    bulk(&mut out, s);
    out.freeze()
}

/// `CLUSTER INFO`.
///
/// The proxy presents itself to clients as a healthy cluster of ONE node (itself) owning all
/// 16384 slots. Cluster-aware clients (redis-py `RedisCluster`, go-redis `ClusterClient`,
/// Jedis `JedisCluster`) then send every command to the proxy, which does the real routing,
/// redirects, splitting and failover handling; the backend cluster's shape (and its
/// changes) stays invisible to them, and pod connections stay on the captured address.
pub fn cluster_info_reply() -> Bytes {
    let text = [
        "cluster_state:ok",
        "cluster_slots_assigned:16384",
        "cluster_slots_ok:16384",
        "cluster_slots_pfail:0",
        "cluster_slots_fail:0",
        "cluster_known_nodes:1",
        "cluster_size:1",
        "cluster_current_epoch:1",
        "cluster_my_epoch:1",
        "cluster_stats_messages_sent:0",
        "cluster_stats_messages_received:0",
        "total_cluster_links_buffer_limit_exceeded:0",
        "",
    ]
    .join("\r\n");
    bulk_reply(text.as_bytes())
}

/// `CLUSTER SLOTS`: one range 0-16383 owned by `addr` (the address the client should use
/// for the proxy: the endpoint address it dialled when captured, else the listener).
pub fn cluster_slots_reply(addr: SocketAddr) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n");
    bulk(&mut out, addr.ip().to_string().as_bytes());
    out.put_slice(format!(":{}\r\n", addr.port()).as_bytes());
    bulk(&mut out, proxy_node_id(addr).as_bytes());
    out.freeze()
}

/// `CLUSTER SHARDS`: one shard, slots 0-16383, one master node `addr`. `resp3` selects maps
/// instead of flat key/value arrays, as Redis does per protocol.
pub fn cluster_shards_reply(addr: SocketAddr, resp3: bool) -> Bytes {
    let (map2, map7) = if resp3 {
        ("%2\r\n", "%7\r\n")
    } else {
        ("*4\r\n", "*14\r\n")
    };
    let ip = addr.ip().to_string();
    let mut out = BytesMut::new();
    out.put_slice(b"*1\r\n");
    out.put_slice(map2.as_bytes());
    bulk(&mut out, b"slots");
    out.put_slice(b"*2\r\n:0\r\n:16383\r\n");
    bulk(&mut out, b"nodes");
    out.put_slice(b"*1\r\n");
    out.put_slice(map7.as_bytes());
    bulk(&mut out, b"id");
    bulk(&mut out, proxy_node_id(addr).as_bytes());
    bulk(&mut out, b"port");
    out.put_slice(format!(":{}\r\n", addr.port()).as_bytes());
    bulk(&mut out, b"ip");
    bulk(&mut out, ip.as_bytes());
    bulk(&mut out, b"endpoint");
    bulk(&mut out, ip.as_bytes());
    bulk(&mut out, b"role");
    bulk(&mut out, b"master");
    bulk(&mut out, b"replication-offset");
    out.put_slice(b":0\r\n");
    bulk(&mut out, b"health");
    bulk(&mut out, b"online");
    out.freeze()
}

/// `CLUSTER NODES`: one line, the proxy as `myself,master` with all slots.
pub fn cluster_nodes_reply(addr: SocketAddr) -> Bytes {
    let line = format!(
        "{} {}:{}@0 myself,master - 0 0 1 connected 0-16383\n",
        proxy_node_id(addr),
        addr.ip(),
        addr.port()
    );
    bulk_reply(line.as_bytes())
}

/// `CLUSTER MYID`.
pub fn cluster_myid_reply(addr: SocketAddr) -> Bytes {
    bulk_reply(proxy_node_id(addr).as_bytes())
}

/// `READONLY` / `READWRITE` from a client: the proxy decides where reads go
/// (`read_from_replicas`), so both are accepted and change nothing.
pub fn readonly_reply() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

/// Answers `CLUSTER <sub> ...` locally; `args` are the arguments after `CLUSTER`. `addr` is
/// the address shown as the proxy node (see [`cluster_slots_reply`]). Subcommands that
/// would reveal or change the backend cluster (MEET, FAILOVER, SETSLOT, GETKEYSINSLOT, ...)
/// get `-ERR ... not supported`, consistent with the single-node view.
pub fn cluster_reply(args: &[Bytes], addr: SocketAddr, resp3: bool) -> Bytes {
    let Some(sub) = args.first() else {
        return Bytes::from_static(b"-ERR wrong number of arguments for 'cluster' command\r\n");
    };
    let sub_up = sub.to_ascii_uppercase();
    match sub_up.as_slice() {
        b"INFO" => cluster_info_reply(),
        b"SLOTS" => cluster_slots_reply(addr),
        b"SHARDS" => cluster_shards_reply(addr, resp3),
        b"NODES" => cluster_nodes_reply(addr),
        b"MYID" => cluster_myid_reply(addr),
        // One shard: its id is the node id.
        b"MYSHARDID" => cluster_myid_reply(addr),
        b"KEYSLOT" => match args.get(1) {
            Some(k) if args.len() == 2 => Bytes::from(format!(":{}\r\n", key_slot(k))),
            _ => Bytes::from_static(b"-ERR wrong number of arguments for 'cluster|keyslot' command\r\n"),
        },
        _ => Bytes::from(format!(
            "-ERR CLUSTER {} is not supported by the datamesh proxy: it presents the cluster as one node\r\n",
            String::from_utf8_lossy(&sub_up)
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------

/// Exponential backoff with ±50 % jitter, so many agents reconnecting after an outage do
/// not arrive in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    cur: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x2545_f491_4f6c_dd1d)
            ^ (std::process::id() as u64).rotate_left(32);
        let base = base.max(Duration::from_millis(1));
        Self {
            base,
            max: max.max(base),
            cur: base,
            rng: seed | 1,
        }
    }

    pub fn reset(&mut self) {
        self.cur = self.base;
    }

    /// The next delay: the current step scaled by a random factor in [0.5, 1.5), then the
    /// step doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64*: enough randomness for jitter, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 bits
        let f = 0.5 + (r as f64) / ((1u64 << 53) as f64);
        let d = self.cur.mul_f64(f).min(self.max);
        self.cur = (self.cur * 2).min(self.max);
        d
    }
}

// ---------------------------------------------------------------------------------------
// Minimal RESP2 client for control connections
// ---------------------------------------------------------------------------------------

/// A small RESP client for the topology control plane: slot-map fetches, sentinel queries
/// and the sentinel event subscription. It is deliberately separate from the data path's
/// pooled connections: control traffic never queues behind client commands.
pub mod wire {
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::{Buf, Bytes, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    const MAX_DEPTH: usize = 16;
    const MAX_LINE: usize = 64 * 1024;
    const MAX_BULK: i64 = 64 * 1024 * 1024;
    const MAX_ARRAY: i64 = 1 << 20;

    /// A parsed reply. RESP3 types map onto the nearest RESP2 shape.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Simple(String),
        Error(String),
        Int(i64),
        Bulk(Bytes),
        Nil,
        Array(Vec<Value>),
        /// RESP3 map (`%`) or attribute, as key/value pairs.
        Map(Vec<(Value, Value)>),
        /// RESP3 push (`>`): pub/sub messages on RESP3 connections.
        Push(Vec<Value>),
    }

    impl Value {
        /// Simple strings and UTF-8 bulk strings.
        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::Simple(s) => Some(s),
                Value::Bulk(b) => std::str::from_utf8(b).ok(),
                _ => None,
            }
        }

        /// Integers, and strings holding one (sentinel replies send ports as strings).
        pub fn as_int(&self) -> Option<i64> {
            match self {
                Value::Int(n) => Some(*n),
                other => other.as_str()?.parse().ok(),
            }
        }

        pub fn as_array(&self) -> Option<&[Value]> {
            match self {
                Value::Array(a) | Value::Push(a) => Some(a),
                _ => None,
            }
        }

        /// `name`'s value in a RESP2 flat `[k1, v1, k2, v2, ...]` array or a RESP3 map.
        pub fn field(&self, name: &str) -> Option<&Value> {
            match self {
                Value::Map(kv) => kv
                    .iter()
                    .find(|(k, _)| k.as_str() == Some(name))
                    .map(|(_, v)| v),
                Value::Array(a) => a
                    .chunks(2)
                    .find(|kv| kv.len() == 2 && kv[0].as_str() == Some(name))
                    .map(|kv| &kv[1]),
                _ => None,
            }
        }
    }

    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("malformed RESP: {0}")]
    pub struct WireError(pub String);

    fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
        buf.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    }

    fn line_int(line: &[u8]) -> Result<i64, WireError> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| WireError(format!("bad integer {:?}", String::from_utf8_lossy(line))))
    }

    /// Parses one reply at the start of `buf`: `Ok(None)` if incomplete, else the value and
    /// the number of bytes it took.
    pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, WireError> {
        parse_at(buf, 0, 0)
    }

    fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Value, usize)>, WireError> {
        if depth > MAX_DEPTH {
            return Err(WireError("nesting too deep".into()));
        }
        let Some(&tag) = buf.get(pos) else {
            return Ok(None);
        };
        let Some(eol) = find_crlf(buf, pos + 1) else {
            if buf.len() - pos > MAX_LINE {
                return Err(WireError("header line too long".into()));
            }
            return Ok(None);
        };
        let line = &buf[pos + 1..eol];
        let next = eol + 2;
        let text = || String::from_utf8_lossy(line).into_owned();
        Ok(Some(match tag {
            b'+' | b',' | b'(' => (Value::Simple(text()), next),
            b'-' => (Value::Error(text()), next),
            b':' => (Value::Int(line_int(line)?), next),
            b'#' => (Value::Int(i64::from(line == b"t")), next),
            b'_' => (Value::Nil, next),
            b'$' | b'=' | b'!' => {
                let n = line_int(line)?;
                if n < 0 {
                    return Ok(Some((Value::Nil, next)));
                }
                if n > MAX_BULK {
                    return Err(WireError(format!("bulk of {n} bytes")));
                }
                let end = next + n as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(WireError("bulk not terminated by CRLF".into()));
                }
                let mut data = &buf[next..end];
                if tag == b'=' && data.len() >= 4 {
                    // Verbatim string: drop the "txt:" format prefix.
                    data = &data[4..];
                }
                let v = if tag == b'!' {
                    Value::Error(String::from_utf8_lossy(data).into_owned())
                } else {
                    Value::Bulk(Bytes::copy_from_slice(data))
                };
                (v, end + 2)
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = line_int(line)?;
                if n < 0 {
                    return Ok(Some((Value::Nil, next)));
                }
                if n > MAX_ARRAY {
                    return Err(WireError(format!("aggregate of {n} elements")));
                }
                let count = if matches!(tag, b'%' | b'|') { 2 * n } else { n } as usize;
                let mut items = Vec::with_capacity(count.min(1024));
                let mut p = next;
                for _ in 0..count {
                    match parse_at(buf, p, depth + 1)? {
                        Some((v, np)) => {
                            items.push(v);
                            p = np;
                        }
                        None => return Ok(None),
                    }
                }
                let v = match tag {
                    b'>' => Value::Push(items),
                    b'%' | b'|' => {
                        let mut kv = Vec::with_capacity(items.len() / 2);
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            kv.push((k, v));
                        }
                        Value::Map(kv)
                    }
                    _ => Value::Array(items),
                };
                if tag == b'|' {
                    // An attribute precedes the real reply; return that reply.
                    return match parse_at(buf, p, depth)? {
                        Some(r) => Ok(Some(r)),
                        None => Ok(None),
                    };
                }
                (v, p)
            }
            other => return Err(WireError(format!("unknown type byte {other:#04x}"))),
        }))
    }

    /// End offset of the complete frame starting at `pos` (no allocation).
    fn frame_end(buf: &[u8], pos: usize, depth: usize) -> Option<usize> {
        if depth > MAX_DEPTH {
            return None;
        }
        let tag = *buf.get(pos)?;
        let eol = find_crlf(buf, pos + 1)?;
        let next = eol + 2;
        match tag {
            b'$' | b'=' | b'!' => {
                let n = line_int(&buf[pos + 1..eol]).ok()?;
                if n < 0 {
                    return Some(next);
                }
                let end = next.checked_add(usize::try_from(n).ok()?)?;
                (buf.get(end..end + 2)? == b"\r\n").then_some(end + 2)
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = line_int(&buf[pos + 1..eol]).ok()?;
                let count = if matches!(tag, b'%' | b'|') {
                    n.checked_mul(2)?
                } else {
                    n
                };
                let mut p = next;
                for _ in 0..count.max(0) {
                    p = frame_end(buf, p, depth + 1)?;
                }
                if tag == b'|' {
                    return frame_end(buf, p, depth);
                }
                Some(p)
            }
            _ => Some(next),
        }
    }

    /// The raw bytes of each element of the array frame `raw` (exactly one complete frame),
    /// or `None` if it is not one.
    pub fn array_elements(raw: &[u8]) -> Option<Vec<&[u8]>> {
        if !matches!(raw.first(), Some(b'*') | Some(b'~')) {
            return None;
        }
        let eol = find_crlf(raw, 1)?;
        let n = usize::try_from(line_int(&raw[1..eol]).ok()?).ok()?;
        let mut out = Vec::with_capacity(n.min(1 << 16));
        let mut p = eol + 2;
        for _ in 0..n {
            let end = frame_end(raw, p, 1)?;
            out.push(&raw[p..end]);
            p = end;
        }
        (p == raw.len()).then_some(out)
    }

    /// RESP array-of-bulk-strings encoding of a command.
    pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// How control connections are made.
    #[derive(Clone)]
    pub struct ConnectOptions {
        /// SO_MARK for the socket (the agent's bypass mark, so eBPF capture skips it);
        /// 0 = none.
        pub mark: u32,
        /// ACL user for `AUTH <username> <password>`; `None` with a password = `AUTH <pw>`.
        pub username: Option<String>,
        pub password: Option<String>,
        pub connect_timeout: Duration,
        /// Bound on each request/reply exchange.
        pub io_timeout: Duration,
    }

    impl Default for ConnectOptions {
        fn default() -> Self {
            Self {
                mark: 0,
                username: None,
                password: None,
                connect_timeout: Duration::from_secs(1),
                io_timeout: Duration::from_secs(2),
            }
        }
    }

    impl std::fmt::Debug for ConnectOptions {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            // Never log the password.
            f.debug_struct("ConnectOptions")
                .field("mark", &self.mark)
                .field("username", &self.username)
                .field("password", &self.password.as_ref().map(|_| "<redacted>"))
                .field("connect_timeout", &self.connect_timeout)
                .field("io_timeout", &self.io_timeout)
                .finish()
        }
    }

    #[derive(Debug, thiserror::Error)]
    pub enum ClientError {
        #[error("connect to {addr} failed: {source}: is the node up and reachable?")]
        Connect {
            addr: SocketAddr,
            #[source]
            source: std::io::Error,
        },
        #[error("{addr}: {what} timed out after {after:?}")]
        Timeout {
            addr: SocketAddr,
            what: &'static str,
            after: Duration,
        },
        #[error("{addr}: I/O error: {source}")]
        Io {
            addr: SocketAddr,
            #[source]
            source: std::io::Error,
        },
        #[error("{addr} closed the connection")]
        Closed { addr: SocketAddr },
        #[error("{addr} sent {source}")]
        Protocol {
            addr: SocketAddr,
            #[source]
            source: WireError,
        },
        #[error("{addr} refused AUTH: {message}: are the configured username/password right?")]
        Auth { addr: SocketAddr, message: String },
    }

    /// One control connection.
    pub struct Client {
        stream: TcpStream,
        buf: BytesMut,
        addr: SocketAddr,
        io_timeout: Duration,
    }

    impl Client {
        /// Connects (bypass mark set before connect), then authenticates if configured.
        pub async fn connect(addr: SocketAddr, opts: &ConnectOptions) -> Result<Self, ClientError> {
            let connect = async {
                let sock = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if opts.mark != 0 {
                    // Before connect: the data plane's connect hooks skip marked sockets.
                    nix::sys::socket::setsockopt(
                        &sock,
                        nix::sys::socket::sockopt::Mark,
                        &opts.mark,
                    )
                    .map_err(std::io::Error::from)?;
                }
                sock.connect(addr).await
            };
            let stream = match tokio::time::timeout(opts.connect_timeout, connect).await {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => return Err(ClientError::Connect { addr, source }),
                Err(_) => {
                    return Err(ClientError::Timeout {
                        addr,
                        what: "connect",
                        after: opts.connect_timeout,
                    })
                }
            };
            let _ = stream.set_nodelay(true);
            let mut c = Self {
                stream,
                buf: BytesMut::with_capacity(16 * 1024),
                addr,
                io_timeout: opts.io_timeout,
            };
            if let Some(pw) = &opts.password {
                let reply = match &opts.username {
                    Some(u) => c.command(&[b"AUTH", u.as_bytes(), pw.as_bytes()]).await?,
                    None => c.command(&[b"AUTH", pw.as_bytes()]).await?,
                };
                if let Value::Error(message) = reply {
                    return Err(ClientError::Auth { addr, message });
                }
            }
            Ok(c)
        }

        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        /// Sends one command and reads its reply (an error reply is `Ok(Value::Error)`),
        /// bounded by the I/O timeout.
        pub async fn command(&mut self, args: &[&[u8]]) -> Result<Value, ClientError> {
            let after = self.io_timeout;
            let addr = self.addr;
            let exchange = async {
                self.send(args).await?;
                self.read().await
            };
            match tokio::time::timeout(after, exchange).await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Timeout {
                    addr,
                    what: "command",
                    after,
                }),
            }
        }

        /// Sends several commands in one write and reads all replies in order.
        #[cfg(test)]
        pub async fn pipeline(&mut self, cmds: &[Vec<&[u8]>]) -> Result<Vec<Value>, ClientError> {
            let mut out = Vec::new();
            for c in cmds {
                out.extend_from_slice(&encode_command(c));
            }
            let addr = self.addr;
            self.stream
                .write_all(&out)
                .await
                .map_err(|source| ClientError::Io { addr, source })?;
            let mut replies = Vec::with_capacity(cmds.len());
            for _ in cmds {
                let after = self.io_timeout;
                match tokio::time::timeout(after, self.read()).await {
                    Ok(r) => replies.push(r?),
                    Err(_) => {
                        return Err(ClientError::Timeout {
                            addr,
                            what: "pipeline",
                            after,
                        })
                    }
                }
            }
            Ok(replies)
        }

        /// Writes one command without reading.
        pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), ClientError> {
            let addr = self.addr;
            self.stream
                .write_all(&encode_command(args))
                .await
                .map_err(|source| ClientError::Io { addr, source })
        }

        /// Reads the next reply, without a timeout (pub/sub waits for events).
        /// Cancel-safe: bytes read so far stay buffered.
        pub async fn read(&mut self) -> Result<Value, ClientError> {
            let addr = self.addr;
            loop {
                match parse(&self.buf) {
                    Ok(Some((v, n))) => {
                        self.buf.advance(n);
                        return Ok(v);
                    }
                    Ok(None) => {}
                    Err(source) => return Err(ClientError::Protocol { addr, source }),
                }
                let n = self
                    .stream
                    .read_buf(&mut self.buf)
                    .await
                    .map_err(|source| ClientError::Io { addr, source })?;
                if n == 0 {
                    return Err(ClientError::Closed { addr });
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn crc16_matches_the_redis_spec_vector() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"123456789"), 0x31C3 & 0x3FFF);
    }

    #[test]
    fn hash_tags_follow_the_spec() {
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Empty tag: the whole key is hashed.
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        // First '{' to the first '}' after it.
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"{}"), b"{}");
        assert_eq!(hash_tag(b"no-brace}{"), b"no-brace}{");
        assert_eq!(hash_tag(b""), b"");
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn common_slot_and_crossslot() {
        let keys: [&[u8]; 2] = [b"{a}1", b"{a}2"];
        assert_eq!(common_slot(keys), Ok(Some(key_slot(b"a"))));
        let none: [&[u8]; 0] = [];
        assert_eq!(common_slot(none), Ok(None));
        let keys: [&[u8]; 2] = [b"foo", b"bar"];
        assert_eq!(
            common_slot(keys),
            Err(CrossSlot {
                first: 12182,
                other: 5061
            })
        );
        assert_eq!(
            crossslot_error().as_ref(),
            b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
        );
    }

    #[test]
    fn redirects_parse() {
        let cur = addr("10.0.0.5:7000");
        let check = |input: &[u8], want: Option<Redirect>| {
            assert_eq!(
                parse_redirect(input, cur),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            )
        };
        check(
            b"MOVED 3999 127.0.0.1:6381",
            Some(Redirect::Moved {
                slot: 3999,
                addr: addr("127.0.0.1:6381"),
            }),
        );
        check(
            b"-MOVED 3999 127.0.0.1:6381\r\n",
            Some(Redirect::Moved {
                slot: 3999,
                addr: addr("127.0.0.1:6381"),
            }),
        );
        check(
            b"-ASK 3999 127.0.0.1:6381\r\n",
            Some(Redirect::Ask {
                slot: 3999,
                addr: addr("127.0.0.1:6381"),
            }),
        );
        check(
            b"-MOVED 3999 :6381\r\n",
            Some(Redirect::Moved {
                slot: 3999,
                addr: addr("10.0.0.5:6381"),
            }),
        );
        check(
            b"-ASK 0 :6381",
            Some(Redirect::Ask {
                slot: 0,
                addr: addr("10.0.0.5:6381"),
            }),
        );
        check(
            b"-MOVED 16383 [::1]:6381",
            Some(Redirect::Moved {
                slot: 16383,
                addr: addr("[::1]:6381"),
            }),
        );
        check(
            b"-MOVED 16383 ::1:6381",
            Some(Redirect::Moved {
                slot: 16383,
                addr: addr("[::1]:6381"),
            }),
        );
        check(b"-MOVED 16384 127.0.0.1:6381", None);
        check(b"-MOVED x 127.0.0.1:6381", None);
        check(b"-MOVED 1 redis-0.redis:6381", None);
        check(b"-MOVED 1 ?:6381", None);
        check(b"-MOVED 1 127.0.0.1:99999", None);
        check(b"-MOVED 1", None);
        check(b"-MOVED 1 127.0.0.1:6381 extra", None);
        check(b"-ERR MOVED 1 127.0.0.1:6381", None);
        check(b"-ASKING 1 127.0.0.1:6381", None);
        check(b"", None);
        let r = parse_redirect(b"-ASK 7 1.2.3.4:5", cur).expect("ask");
        assert!(r.is_ask());
        assert_eq!((r.slot(), r.addr()), (7, addr("1.2.3.4:5")));
    }

    fn parse_all(raw: &[u8]) -> Value {
        let (v, n) = wire::parse(raw).expect("parse").expect("complete");
        assert_eq!(n, raw.len());
        // Split-at-every-byte: every strict prefix is incomplete, never an error.
        for i in 0..raw.len() {
            assert_eq!(wire::parse(&raw[..i]).expect("prefix"), None, "prefix {i}");
        }
        v
    }

    #[test]
    fn wire_parses_resp2_and_resp3() {
        assert_eq!(parse_all(b"+OK\r\n"), Value::Simple("OK".into()));
        assert_eq!(parse_all(b"-ERR x\r\n"), Value::Error("ERR x".into()));
        assert_eq!(parse_all(b":-5\r\n"), Value::Int(-5));
        assert_eq!(parse_all(b"$-1\r\n"), Value::Nil);
        assert_eq!(parse_all(b"_\r\n"), Value::Nil);
        assert_eq!(parse_all(b"$3\r\na\r\n\r\n"), Value::Bulk(b("a\r\n")));
        assert_eq!(parse_all(b"=8\r\ntxt:abcd\r\n"), Value::Bulk(b("abcd")));
        assert_eq!(
            parse_all(b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n"),
            Value::Array(vec![Value::Bulk(b("a")), Value::Array(vec![Value::Int(1)])])
        );
        let m = parse_all(b"%1\r\n+k\r\n:2\r\n");
        assert_eq!(m.field("k"), Some(&Value::Int(2)));
        assert_eq!(
            parse_all(b">1\r\n+x\r\n"),
            Value::Push(vec![Value::Simple("x".into())])
        );
        assert!(wire::parse(b"?x\r\n").is_err());
        assert!(wire::parse(b"$99999999999\r\n").is_err());
        assert!(wire::parse(b"$1\r\nab\r\n").is_err());
        let deep = "*1\r\n".repeat(40);
        assert!(wire::parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn array_elements_slices_raw_frames() {
        let raw = b"*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:7\r\n";
        let e = wire::array_elements(raw).expect("array");
        assert_eq!(e, vec![&b"$1\r\na\r\n"[..], b"$-1\r\n", b"*1\r\n:7\r\n"]);
        assert_eq!(
            wire::array_elements(b"*1\r\n_\r\n"),
            Some(vec![&b"_\r\n"[..]])
        );
        assert_eq!(wire::array_elements(b"*2\r\n$1\r\na\r\n"), None);
        assert_eq!(wire::array_elements(b"+OK\r\n"), None);
        assert_eq!(wire::array_elements(b"*0\r\n"), Some(vec![]));
    }

    fn node2(id: &str, ip: &str, port: i64, role: &str, health: &str) -> Value {
        let s = |x: &str| Value::Bulk(b(x));
        Value::Array(vec![
            s("id"),
            s(id),
            s("port"),
            Value::Int(port),
            s("ip"),
            s(ip),
            s("endpoint"),
            s(ip),
            s("role"),
            s(role),
            s("replication-offset"),
            Value::Int(1),
            s("health"),
            s(health),
        ])
    }

    #[test]
    fn slot_map_from_shards_resp2() {
        let s = |x: &str| Value::Bulk(b(x));
        let reply = Value::Array(vec![
            Value::Array(vec![
                s("slots"),
                Value::Array(vec![Value::Int(5461), Value::Int(10922)]),
                s("nodes"),
                Value::Array(vec![
                    node2("b", "127.0.0.1", 7001, "master", "online"),
                    node2("e", "127.0.0.1", 7004, "replica", "online"),
                    node2("f", "127.0.0.1", 7005, "replica", "failed"),
                ]),
            ]),
            Value::Array(vec![
                s("slots"),
                Value::Array(vec![
                    Value::Int(0),
                    Value::Int(5460),
                    Value::Int(10923),
                    Value::Int(16383),
                ]),
                s("nodes"),
                Value::Array(vec![node2("a", "", 7000, "master", "online")]),
            ]),
            // A shard without slots (e.g. a new empty master) assigns nothing.
            Value::Array(vec![
                s("slots"),
                Value::Array(vec![]),
                s("nodes"),
                Value::Array(vec![node2("c", "127.0.0.1", 7002, "master", "online")]),
            ]),
        ]);
        let m = SlotMap::from_shards_reply(&reply, addr("127.0.0.9:7000")).expect("map");
        assert_eq!(m.assigned(), SLOTS);
        assert_eq!(m.master_of(0), Some(addr("127.0.0.9:7000")));
        assert_eq!(m.master_of(5461), Some(addr("127.0.0.1:7001")));
        assert_eq!(m.master_of(16383), Some(addr("127.0.0.9:7000")));
        assert_eq!(
            m.shard_of(6000).map(|s| s.replicas.clone()),
            Some(vec![addr("127.0.0.1:7004")])
        );
        assert_eq!(
            m.masters(),
            vec![addr("127.0.0.9:7000"), addr("127.0.0.1:7001")]
        );
        assert_eq!(m.ranges().len(), 3);
        // The same cluster described in another order compares equal.
        let Value::Array(mut shards) = reply.clone() else {
            unreachable!()
        };
        shards.reverse();
        let m2 =
            SlotMap::from_shards_reply(&Value::Array(shards), addr("127.0.0.9:7000")).expect("map");
        assert_eq!(m, m2);
    }

    #[test]
    fn slot_map_from_shards_resp3_map() {
        let s = |x: &str| Value::Bulk(b(x));
        let node = Value::Map(vec![
            (s("port"), Value::Int(7000)),
            (s("ip"), s("10.1.1.1")),
            (s("role"), s("master")),
            (s("health"), s("online")),
        ]);
        let reply = Value::Array(vec![Value::Map(vec![
            (
                s("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(16383)]),
            ),
            (s("nodes"), Value::Array(vec![node])),
        ])]);
        let m = SlotMap::from_shards_reply(&reply, addr("127.0.0.1:1")).expect("map");
        assert_eq!(m.master_of(9999), Some(addr("10.1.1.1:7000")));
    }

    #[test]
    fn slot_map_prefers_the_online_master_of_a_shard() {
        let s = |x: &str| Value::Bulk(b(x));
        for order in [[0, 1], [1, 0]] {
            let nodes = [
                node2("old", "127.0.0.1", 7000, "master", "failed"),
                node2("new", "127.0.0.1", 7003, "master", "online"),
            ];
            let reply = Value::Array(vec![Value::Array(vec![
                s("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(16383)]),
                s("nodes"),
                Value::Array(order.iter().map(|&i| nodes[i].clone()).collect()),
            ])]);
            let m = SlotMap::from_shards_reply(&reply, addr("127.0.0.1:1")).expect("map");
            assert_eq!(m.master_of(0), Some(addr("127.0.0.1:7003")));
        }
    }

    #[test]
    fn slot_map_rejects_bad_shards() {
        let s = |x: &str| Value::Bulk(b(x));
        let bad = Value::Array(vec![Value::Array(vec![
            s("slots"),
            Value::Array(vec![Value::Int(10), Value::Int(5)]),
            s("nodes"),
            Value::Array(vec![node2("a", "127.0.0.1", 7000, "master", "online")]),
        ])]);
        assert!(SlotMap::from_shards_reply(&bad, addr("127.0.0.1:1")).is_err());
        assert!(SlotMap::from_shards_reply(&Value::Int(1), addr("127.0.0.1:1")).is_err());
    }

    #[test]
    fn slot_map_from_slots() {
        let s = |x: &str| Value::Bulk(b(x));
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                Value::Array(vec![
                    s("127.0.0.1"),
                    Value::Int(7000),
                    s("id-a"),
                    Value::Array(vec![]),
                ]),
                Value::Array(vec![s(""), Value::Int(7003), s("id-d")]),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                Value::Array(vec![s("127.0.0.1"), Value::Int(7001), s("id-b")]),
                Value::Array(vec![s("?"), Value::Int(7004), s("id-e")]),
            ]),
        ]);
        let m = SlotMap::from_slots_reply(&reply, addr("10.0.0.1:7000")).expect("map");
        assert_eq!(m.assigned(), SLOTS);
        assert_eq!(m.master_of(8191), Some(addr("127.0.0.1:7000")));
        assert_eq!(
            m.shard_of(0).map(|s| s.replicas.clone()),
            Some(vec![addr("10.0.0.1:7003")])
        );
        assert_eq!(m.shard_of(8192).map(|s| s.replicas.len()), Some(0));
        assert_eq!(m.master_of(16383), Some(addr("127.0.0.1:7001")));
    }

    #[test]
    fn slot_map_assign_moves_one_slot() {
        let mut m = SlotMap::from_ranges(vec![RangeEntry {
            start: 0,
            end: 16383,
            master: addr("127.0.0.1:1"),
            replicas: vec![],
        }]);
        assert!(!m.assign(5, addr("127.0.0.1:1")));
        assert!(m.assign(5, addr("127.0.0.1:2")));
        assert_eq!(m.master_of(5), Some(addr("127.0.0.1:2")));
        assert_eq!(m.master_of(4), Some(addr("127.0.0.1:1")));
        assert_eq!(m.ranges().len(), 3);
        assert!(m.assign(6, addr("127.0.0.1:2")));
        assert_eq!(m.shards().len(), 2);
        assert!(SlotMap::empty().master_of(0).is_none());
    }

    fn test_cluster(map: SlotMap, read_from_replicas: bool) -> Cluster {
        let mut cfg = ClusterConfig::new(vec![]);
        cfg.read_from_replicas = read_from_replicas;
        let inner = Arc::new(ClusterInner {
            cfg,
            map: RwLock::new(map),
            generation: watch::channel(0).0,
            refresh: Notify::new(),
            rr: AtomicUsize::new(0),
            suspects: std::sync::Mutex::new(Vec::new()),
        });
        // No runtime in these tests: a task that is never polled stands in for the refresher.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let task = rt.spawn(async {});
        Cluster { inner, task }
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
        assert!(c.is_cluster());
        assert_eq!(c.pick(Some(0), true), Ok(a));
        assert_eq!(c.pick(Some(9000), false), Ok(b_));
        let keyless: std::collections::HashSet<_> =
            (0..4).map(|_| c.pick(None, false).expect("pick")).collect();
        assert_eq!(keyless.len(), 2);
        assert_eq!(c.nodes(), vec![a, b_]);
        // ASK changes nothing.
        c.redirected(5, b_, true);
        assert_eq!((c.pick(Some(5), false), c.generation()), (Ok(a), 0));
        // MOVED takes effect at once and bumps the generation.
        c.redirected(5, b_, false);
        assert_eq!((c.pick(Some(5), false), c.generation()), (Ok(b_), 1));
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
        assert_eq!(
            empty.pick(Some(3), false),
            Err(TopologyError::SlotUnassigned { slot: 3 })
        );
        assert!(matches!(
            empty.pick(None, false),
            Err(TopologyError::NoNodes { .. })
        ));
    }

    #[test]
    fn split_groups_keys_by_slot_in_order() {
        let args: Vec<Bytes> = ["{a}1", "foo", "{a}2", "bar", "{a}3"]
            .into_iter()
            .map(b)
            .collect();
        let parts = split_multikey(b"mget", &args).expect("split");
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].slot, key_slot(b"a"));
        assert_eq!(
            parts[0].args,
            vec![b("MGET"), b("{a}1"), b("{a}2"), b("{a}3")]
        );
        assert_eq!(parts[0].positions, vec![0, 2, 4]);
        assert_eq!(parts[1].positions, vec![1]);
        assert_eq!(parts[2].args, vec![b("MGET"), b("bar")]);
        assert_eq!(
            parts[2].encode().as_ref(),
            b"*2\r\n$4\r\nMGET\r\n$3\r\nbar\r\n"
        );

        let mset: Vec<Bytes> = ["foo", "1", "bar", "2", "{foo}x", "3"]
            .into_iter()
            .map(b)
            .collect();
        let parts = split_multikey(b"MSET", &mset).expect("split");
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0].args,
            vec![b("MSET"), b("foo"), b("1"), b("{foo}x"), b("3")]
        );
        assert_eq!(parts[0].positions, vec![0, 2]);

        assert_eq!(
            split_multikey(b"MSET", &mset[..3]),
            Err(SplitError::WrongArity {
                name: "mset".into()
            })
        );
        assert_eq!(
            split_multikey(b"DEL", &[]),
            Err(SplitError::WrongArity { name: "del".into() })
        );
        assert!(matches!(
            split_multikey(b"SUNION", &args),
            Err(SplitError::NotMultiKey { .. })
        ));
        for n in ["del", "UNLINK", "Exists", "touch"] {
            assert_eq!(split_multikey(n.as_bytes(), &args).expect("split").len(), 3);
        }
    }

    #[test]
    fn merge_reassembles_and_sums() {
        let args: Vec<Bytes> = ["{a}1", "foo", "{a}2", "bar"].into_iter().map(b).collect();
        let parts = split_multikey(b"MGET", &args).expect("split");
        let replies = vec![
            b("*2\r\n$2\r\nA1\r\n$-1\r\n"),
            b("*1\r\n$3\r\nFOO\r\n"),
            b("*1\r\n_\r\n"),
        ];
        let merged = merge(MultiKeyKind::Mget, &parts, &replies).expect("merge");
        assert_eq!(
            merged.as_ref(),
            b"*4\r\n$2\r\nA1\r\n$3\r\nFOO\r\n$-1\r\n_\r\n"
        );
        // Errors win, wrong shapes are MergeErrors.
        let with_err = vec![
            replies[0].clone(),
            b("-MOVED 1 1.2.3.4:5\r\n"),
            replies[2].clone(),
        ];
        assert_eq!(
            merge(MultiKeyKind::Mget, &parts, &with_err)
                .expect("merge")
                .as_ref(),
            b"-MOVED 1 1.2.3.4:5\r\n"
        );
        assert!(merge(MultiKeyKind::Mget, &parts, &replies[..2]).is_err());
        let short = vec![
            b("*1\r\n$2\r\nA1\r\n"),
            replies[1].clone(),
            replies[2].clone(),
        ];
        assert!(merge(MultiKeyKind::Mget, &parts, &short).is_err());

        let ok = vec![b("+OK\r\n"); 3];
        assert_eq!(
            merge(MultiKeyKind::Mset, &parts, &ok)
                .expect("merge")
                .as_ref(),
            b"+OK\r\n"
        );
        let mixed = vec![b("+OK\r\n"), b("-OOM no\r\n"), b("-ERR later\r\n")];
        assert_eq!(
            merge(MultiKeyKind::Mset, &parts, &mixed)
                .expect("merge")
                .as_ref(),
            b"-OOM no\r\n"
        );

        let ints = vec![b(":2\r\n"), b(":0\r\n"), b(":1\r\n")];
        for k in [
            MultiKeyKind::Del,
            MultiKeyKind::Unlink,
            MultiKeyKind::Exists,
            MultiKeyKind::Touch,
        ] {
            assert_eq!(merge(k, &parts, &ints).expect("merge").as_ref(), b":3\r\n");
        }
        assert!(merge(
            MultiKeyKind::Del,
            &parts,
            &[b(":1\r\n"), b("+OK\r\n"), b(":1\r\n")]
        )
        .is_err());
    }

    #[test]
    fn cluster_answers_describe_one_node() {
        let a = addr("198.19.3.1:6379");
        let id = proxy_node_id(a);
        assert_eq!(id.len(), 40);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, proxy_node_id(a));
        assert_ne!(id, proxy_node_id(addr("198.19.3.1:6380")));

        let info = parse_all(&cluster_reply(&[b("info")], a, false));
        let text = info.as_str().expect("bulk").to_string();
        assert!(
            text.contains("cluster_state:ok\r\n") && text.contains("cluster_slots_assigned:16384")
        );

        // Our own parser reads our SLOTS/SHARDS answers back as "the proxy owns everything".
        let slots = parse_all(&cluster_reply(&[b("SLOTS")], a, false));
        let m = SlotMap::from_slots_reply(&slots, a).expect("slots");
        assert_eq!((m.assigned(), m.masters().to_vec()), (SLOTS, vec![a]));
        for resp3 in [false, true] {
            let shards = parse_all(&cluster_reply(&[b("shards")], a, resp3));
            let m = SlotMap::from_shards_reply(&shards, a).expect("shards");
            assert_eq!((m.assigned(), m.masters().to_vec()), (SLOTS, vec![a]));
        }
        let nodes = parse_all(&cluster_reply(&[b("NODES")], a, false));
        assert_eq!(
            nodes.as_str(),
            Some(
                format!("{id} 198.19.3.1:6379@0 myself,master - 0 0 1 connected 0-16383\n")
                    .as_str()
            )
        );
        assert_eq!(
            parse_all(&cluster_reply(&[b("myid")], a, false)).as_str(),
            Some(id.as_str())
        );
        assert_eq!(
            cluster_reply(&[b("KEYSLOT"), b("foo")], a, false).as_ref(),
            b":12182\r\n"
        );
        assert!(cluster_reply(&[b("FAILOVER")], a, false)
            .starts_with(b"-ERR CLUSTER FAILOVER is not supported"));
        assert!(cluster_reply(&[], a, false).starts_with(b"-ERR wrong number"));
        assert_eq!(readonly_reply().as_ref(), b"+OK\r\n");
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        let mut bo = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| bo.next_delay()).collect();
        assert!(
            d[0] >= Duration::from_millis(50) && d[0] < Duration::from_millis(150),
            "{d:?}"
        );
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)), "{d:?}");
        assert!(d[7] >= Duration::from_millis(500), "{d:?}");
        bo.reset();
        assert!(bo.next_delay() < Duration::from_millis(150));
    }
}

/// Shared by the live tests here and in `sentinel.rs`: real redis-server / redis-sentinel
/// processes on free 127.0.0.1 ports in a temp dir, all killed and removed on drop (also
/// when the test panics). Missing binaries fail the test loudly, never skip it.
#[cfg(test)]
pub(crate) mod testkit {
    use std::fs::File;
    use std::net::{SocketAddr, TcpListener};
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use super::wire::{Client, ConnectOptions, Value};

    static NEXT: AtomicU32 = AtomicU32::new(0);

    /// A temp dir and the processes started in it.
    pub struct Lab {
        pub dir: PathBuf,
        procs: Vec<(String, Child)>,
    }

    impl Lab {
        pub fn new(tag: &str) -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("datamesh-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create lab dir");
            Self {
                dir,
                procs: Vec::new(),
            }
        }

        /// The path of `name` on PATH, or a loud failure naming the package.
        pub fn bin(name: &str) -> PathBuf {
            let path = std::env::var_os("PATH").unwrap_or_default();
            for d in std::env::split_paths(&path) {
                let p = d.join(name);
                if p.is_file() {
                    return p;
                }
            }
            panic!(
                "live test needs `{name}` on PATH and it is missing: install the Debian packages \
                 redis-server, redis-sentinel and redis-tools (apt-get install -y redis-server \
                 redis-sentinel redis-tools)"
            );
        }

        /// Starts `bin args`, output to `<dir>/<label>.out`; the child dies with the test.
        pub fn spawn(&mut self, label: &str, bin: &Path, args: &[String]) {
            let out = File::create(self.dir.join(format!("{label}.out"))).expect("log file");
            let err = out.try_clone().expect("log file");
            let mut cmd = Command::new(bin);
            cmd.args(args)
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err));
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
            // the parent; it makes the server die if the test process is killed outright,
            // when no Drop runs.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            self.procs.push((label.to_string(), child));
        }

        /// Kills one process by label (SIGKILL) and reaps it.
        pub fn kill(&mut self, label: &str) {
            if let Some(i) = self.procs.iter().position(|(l, _)| l == label) {
                let (_, mut c) = self.procs.remove(i);
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        pub fn path(&self, name: &str) -> String {
            self.dir.join(name).to_string_lossy().into_owned()
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            for (label, c) in &mut self.procs {
                if let Ok(Some(status)) = c.try_wait() {
                    eprintln!("lab: {label} had already exited: {status}");
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            if std::thread::panicking() {
                // Show the servers' logs to explain the failure.
                if let Ok(rd) = std::fs::read_dir(&self.dir) {
                    for e in rd.flatten() {
                        let p = e.path();
                        if p.extension().is_some_and(|x| x == "log" || x == "out") {
                            let text = std::fs::read_to_string(&p).unwrap_or_default();
                            let tail: Vec<&str> = text.lines().rev().take(15).collect();
                            eprintln!("--- {} (tail)", p.display());
                            for l in tail.into_iter().rev() {
                                eprintln!("{l}");
                            }
                        }
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A port that was free a moment ago on 127.0.0.1.
    pub fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        l.local_addr().expect("local addr").port()
    }

    pub fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Polls `f` every 10 ms until it returns `Some`, or panics after `timeout`.
    pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One command on a fresh connection; `None` on any connection error.
    pub async fn try_cmd(addr: SocketAddr, args: &[&str]) -> Option<Value> {
        let mut c = Client::connect(addr, &ConnectOptions::default())
            .await
            .ok()?;
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        c.command(&args).await.ok()
    }

    pub async fn cmd(addr: SocketAddr, args: &[&str]) -> Value {
        match try_cmd(addr, args).await {
            Some(v) => v,
            None => panic!("{addr}: {args:?} failed to connect or answer"),
        }
    }

    /// Waits until the server at `addr` answers PING.
    pub async fn wait_ping(addr: SocketAddr) {
        eventually(
            &format!("{addr} to answer PING"),
            Duration::from_secs(10),
            || async move {
                match try_cmd(addr, &["PING"]).await {
                    Some(Value::Simple(s)) if s == "PONG" => Some(()),
                    _ => None,
                }
            },
        )
        .await
    }

    /// `field:value` from an INFO-style bulk reply.
    pub fn info_field(v: &Value, field: &str) -> Option<String> {
        let text = v.as_str()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(|s| s.trim().to_string())
    }

    /// Common redis-server flags for a throwaway node.
    pub fn server_args(lab: &Lab, port: u16) -> Vec<String> {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &lab.dir.to_string_lossy(),
            "--logfile",
            &lab.path(&format!("redis-{port}.log")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A tiny deterministic RNG for test data.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A random key of 1..=24 bytes drawn from an alphabet rich in braces, so hash tags
        /// (empty, nested, unterminated) are exercised.
        pub fn key(&mut self) -> String {
            const ALPHA: &[u8] = b"abcxyz0129{}{}:._-";
            let len = 1 + (self.next() % 24) as usize;
            (0..len)
                .map(|_| ALPHA[(self.next() % ALPHA.len() as u64) as usize] as char)
                .collect()
        }
    }
}

/// Live tests against a real 3-master / 3-replica Redis Cluster (`redis-server
/// --cluster-enabled yes` + `redis-cli --cluster create`).
#[cfg(test)]
mod live_tests {
    use super::testkit::*;
    use super::wire::{Client, ConnectOptions, Value};
    use super::*;

    struct LiveCluster {
        lab: Lab,
        nodes: Vec<SocketAddr>,
    }

    async fn start_cluster() -> LiveCluster {
        let redis = Lab::bin("redis-server");
        let cli = Lab::bin("redis-cli");
        let mut lab = Lab::new("cluster");
        let mut nodes = Vec::new();
        for i in 0..6 {
            let port = free_port();
            let bus = free_port();
            let mut args = server_args(&lab, port);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &lab.path(&format!("nodes-{port}.conf")),
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-node-timeout",
                    "3000",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            lab.spawn(&format!("node{i}"), &redis, &args);
            nodes.push(local(port));
        }
        for a in &nodes {
            wait_ping(*a).await;
        }
        let t = Instant::now();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|a| a.to_string()));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = std::process::Command::new(&cli)
            .args(&args)
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Ready = every node says cluster_state:ok and serves a full map with 3 masters
        // that each have one online replica.
        for a in nodes.clone() {
            eventually(
                &format!("{a}: cluster_state:ok and a full shard map"),
                Duration::from_secs(30),
                || async move {
                    let info = try_cmd(a, &["CLUSTER", "INFO"]).await?;
                    if info_field(&info, "cluster_state").as_deref() != Some("ok") {
                        return None;
                    }
                    let m = fetch_slot_map(a, &ConnectOptions::default()).await.ok()?;
                    let full = m.assigned() == SLOTS
                        && m.masters().len() == 3
                        && m.shards().iter().all(|s| s.replicas.len() == 1);
                    full.then_some(())
                },
            )
            .await;
        }
        eprintln!(
            "live cluster: 6 nodes created and converged in {:?}",
            t.elapsed()
        );
        LiveCluster { lab, nodes }
    }

    /// Sends `cmd` to the node `topo` picks for `slot`, following one MOVED (as the core
    /// will). Returns the reply and whether a MOVED was seen.
    async fn routed(topo: &Cluster, slot: u16, args: &[&[u8]]) -> (Value, bool) {
        let addr = topo.pick(Some(slot), false).expect("pick");
        let mut c = Client::connect(addr, &ConnectOptions::default())
            .await
            .expect("connect");
        let v = c.command(args).await.expect("command");
        if let Value::Error(e) = &v {
            if let Some(Redirect::Moved { slot, addr: to }) = parse_redirect(e.as_bytes(), addr) {
                topo.redirected(slot, to, false);
                let mut c = Client::connect(to, &ConnectOptions::default())
                    .await
                    .expect("connect");
                return (c.command(args).await.expect("command"), true);
            }
        }
        (v, false)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_cluster_slot_map_hashing_split_merge_and_redirects() {
        let lc = start_cluster().await;
        let seed = lc.nodes[0];

        // 1. SHARDS and SLOTS describe the same map.
        let shards_map = fetch_slot_map(seed, &ConnectOptions::default())
            .await
            .expect("fetch");
        let slots_reply = cmd(seed, &["CLUSTER", "SLOTS"]).await;
        let slots_map = SlotMap::from_slots_reply(&slots_reply, seed).expect("slots map");
        assert_eq!(
            shards_map, slots_map,
            "CLUSTER SHARDS and CLUSTER SLOTS disagree"
        );
        assert_eq!(shards_map.assigned(), SLOTS);
        eprintln!("live cluster: slot map {:?}", shards_map.ranges());

        // 2. key_slot agrees with CLUSTER KEYSLOT for 1000 random keys (one pipeline).
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let keys: Vec<String> = (0..1000).map(|_| rng.key()).collect();
        let mut c = Client::connect(seed, &ConnectOptions::default())
            .await
            .expect("connect");
        let cmds: Vec<Vec<&[u8]>> = keys
            .iter()
            .map(|k| vec![&b"CLUSTER"[..], b"KEYSLOT", k.as_bytes()])
            .collect();
        let replies = c.pipeline(&cmds).await.expect("pipeline");
        let mut tagged = 0;
        for (k, r) in keys.iter().zip(&replies) {
            assert_eq!(
                r,
                &Value::Int(i64::from(key_slot(k.as_bytes()))),
                "key {k:?}"
            );
            if hash_tag(k.as_bytes()).len() != k.len() {
                tagged += 1;
            }
        }
        eprintln!(
            "live cluster: key_slot == CLUSTER KEYSLOT for 1000 keys ({tagged} with a hash tag)"
        );

        // 3. The topology: first seed dead, second alive.
        let mut cfg = ClusterConfig::new(vec![local(free_port()), lc.nodes[3]]);
        cfg.refresh_interval = Duration::from_secs(60);
        let t = Instant::now();
        let topo = Cluster::connect(cfg, Duration::from_secs(10))
            .await
            .expect("cluster topology");
        eprintln!(
            "live cluster: topology ready in {:?} (first seed dead)",
            t.elapsed()
        );
        assert_eq!(topo.slot_map(), shards_map);
        assert_eq!(topo.nodes().len(), 3);
        let gen0 = topo.generation();

        // 4. Routing by key_slot never meets a MOVED.
        let mut moved = 0;
        for i in 0..300 {
            let k = format!("key:{i}");
            let (v, m) = routed(&topo, key_slot(k.as_bytes()), &[b"SET", k.as_bytes(), b"v"]).await;
            assert_eq!(v, Value::Simple("OK".into()));
            moved += usize::from(m);
        }
        assert_eq!(moved, 0, "routing by key_slot got MOVED");

        // 5. A wrong pick gets a MOVED naming the map's owner.
        let slot = key_slot(b"key:7");
        let owner = shards_map.master_of(slot).expect("owner");
        let wrong = *shards_map
            .masters()
            .iter()
            .find(|a| **a != owner)
            .expect("other master");
        let v = cmd(wrong, &["GET", "key:7"]).await;
        let Value::Error(e) = v else {
            panic!("expected MOVED from {wrong}, got {v:?}")
        };
        assert_eq!(
            parse_redirect(e.as_bytes(), wrong),
            Some(Redirect::Moved { slot, addr: owner })
        );

        // 6. Split + merge against the real nodes.
        let keys: Vec<Bytes> = (0..40).map(|i| Bytes::from(format!("mk:{i}"))).collect();
        let mut mset = Vec::new();
        for k in &keys {
            mset.push(k.clone());
            mset.push(Bytes::from(format!("val-{}", String::from_utf8_lossy(k))));
        }
        async fn run_split(topo: &Cluster, name: &[u8], args: &[Bytes]) -> Bytes {
            let kind = MultiKeyKind::from_name(name).expect("kind");
            let parts = split_multikey(name, args).expect("split");
            let mut raws = Vec::new();
            for p in &parts {
                let addr = topo.pick(Some(p.slot), false).expect("pick");
                let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                c.write_all(&p.encode()).await.expect("write");
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = c.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "closed");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some((_, len)) = wire::parse(&buf).expect("parse") {
                        assert_eq!(len, buf.len());
                        break;
                    }
                }
                raws.push(Bytes::from(buf));
            }
            eprintln!(
                "live cluster: {} split into {} parts",
                String::from_utf8_lossy(name),
                parts.len()
            );
            merge(kind, &parts, &raws).expect("merge")
        }
        assert_eq!(run_split(&topo, b"MSET", &mset).await.as_ref(), b"+OK\r\n");
        let mut with_missing = keys.clone();
        with_missing.insert(5, Bytes::from_static(b"mk:missing"));
        let merged = run_split(&topo, b"MGET", &with_missing).await;
        let Value::Array(vals) = wire::parse(&merged).expect("parse").expect("complete").0 else {
            panic!("MGET merge is not an array")
        };
        assert_eq!(vals.len(), 41);
        for (k, v) in with_missing.iter().zip(&vals) {
            if k.as_ref() == b"mk:missing" {
                assert_eq!(v, &Value::Nil);
            } else {
                assert_eq!(
                    v.as_str().map(String::from),
                    Some(format!("val-{}", String::from_utf8_lossy(k)))
                );
            }
        }
        assert_eq!(
            run_split(&topo, b"EXISTS", &with_missing).await.as_ref(),
            b":40\r\n"
        );
        assert_eq!(run_split(&topo, b"TOUCH", &keys).await.as_ref(), b":40\r\n");
        assert_eq!(
            run_split(&topo, b"DEL", &keys[..20]).await.as_ref(),
            b":20\r\n"
        );
        assert_eq!(
            run_split(&topo, b"UNLINK", &with_missing).await.as_ref(),
            b":20\r\n"
        );
        assert_eq!(run_split(&topo, b"EXISTS", &keys).await.as_ref(), b":0\r\n");

        // 7. Replica reads: pick gives the replica; it serves reads only after READONLY.
        let mut rcfg = ClusterConfig::new(vec![seed]);
        rcfg.read_from_replicas = true;
        let rtopo = Cluster::connect(rcfg, Duration::from_secs(10))
            .await
            .expect("replica topology");
        let slot = key_slot(b"key:1");
        let replica = rtopo.pick(Some(slot), true).expect("pick");
        assert!(
            rtopo.is_replica(replica) && replica != rtopo.pick(Some(slot), false).expect("pick")
        );
        assert_eq!(rtopo.nodes().len(), 6);
        let master = rtopo.pick(Some(slot), false).expect("pick");
        assert_eq!(cmd(master, &["WAIT", "1", "2000"]).await, Value::Int(1));
        let mut rc = Client::connect(replica, &ConnectOptions::default())
            .await
            .expect("connect");
        let v = rc.command(&[b"GET", b"key:1"]).await.expect("get");
        assert!(
            matches!(&v, Value::Error(e) if e.starts_with("MOVED")),
            "replica without READONLY: {v:?}"
        );
        assert_eq!(
            rc.command(&[b"READONLY"]).await.expect("readonly"),
            Value::Simple("OK".into())
        );
        assert_eq!(
            rc.command(&[b"GET", b"key:1"]).await.expect("get"),
            Value::Bulk(Bytes::from_static(b"v"))
        );

        // 8. Slot migration: ASK while migrating, MOVED after; the topology follows a MOVED
        //    at once and the refresh it triggers picks up the other migrated slot.
        let s1 = key_slot(b"mig:a");
        let a = topo.pick(Some(s1), false).expect("pick");
        let s2 = (0..SLOTS as u16)
            .find(|&s| s != s1 && shards_map.master_of(s) == Some(a))
            .expect("second slot of the same master");
        let b_ = *shards_map
            .masters()
            .iter()
            .find(|m| **m != a)
            .expect("target master");
        let id = |v: Value| v.as_str().expect("id").to_string();
        let id_a = id(cmd(a, &["CLUSTER", "MYID"]).await);
        let id_b = id(cmd(b_, &["CLUSTER", "MYID"]).await);
        for s in [s1, s2] {
            let s = s.to_string();
            assert_eq!(
                cmd(b_, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &id_a]).await,
                Value::Simple("OK".into())
            );
            assert_eq!(
                cmd(a, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &id_b]).await,
                Value::Simple("OK".into())
            );
        }
        let v = cmd(a, &["GET", "mig:a"]).await;
        let Value::Error(e) = &v else {
            panic!("expected ASK, got {v:?}")
        };
        let ask = parse_redirect(e.as_bytes(), a).expect("ASK parses");
        assert_eq!(ask, Redirect::Ask { slot: s1, addr: b_ });
        topo.redirected(s1, b_, true);
        assert_eq!(
            topo.pick(Some(s1), false),
            Ok(a),
            "ASK must not change the map"
        );
        // ASKING + command back to back on one connection is served by the importing node.
        let mut cb = Client::connect(b_, &ConnectOptions::default())
            .await
            .expect("connect");
        let r = cb
            .pipeline(&[vec![&b"ASKING"[..]], vec![&b"GET"[..], b"mig:a"]])
            .await
            .expect("asking");
        assert_eq!(r, vec![Value::Simple("OK".into()), Value::Nil]);
        for s in [s1, s2] {
            let s = s.to_string();
            for node in shards_map.masters().to_vec() {
                assert_eq!(
                    cmd(node, &["CLUSTER", "SETSLOT", &s, "NODE", &id_b]).await,
                    Value::Simple("OK".into())
                );
            }
        }
        let v = cmd(a, &["GET", "mig:a"]).await;
        let Value::Error(e) = &v else {
            panic!("expected MOVED, got {v:?}")
        };
        let mv = parse_redirect(e.as_bytes(), a).expect("MOVED parses");
        assert_eq!(mv, Redirect::Moved { slot: s1, addr: b_ });
        assert_eq!(topo.pick(Some(s2), false), Ok(a), "stale before the MOVED");
        let t = Instant::now();
        let (v, was_moved) = routed(&topo, s1, &[b"SET", b"mig:a", b"1"]).await;
        assert!(was_moved && v == Value::Simple("OK".into()), "{v:?}");
        assert_eq!(topo.pick(Some(s1), false), Ok(b_), "MOVED applies at once");
        assert!(topo.generation() > gen0);
        eventually(
            "the MOVED-triggered refresh to move the second slot",
            Duration::from_secs(5),
            || async { (topo.pick(Some(s2), false) == Ok(b_)).then_some(()) },
        )
        .await;
        eprintln!(
            "live cluster: after a MOVED, refresh moved the other migrated slot in {:?}",
            t.elapsed()
        );
        let (v, was_moved) = routed(&topo, s1, &[b"GET", b"mig:a"]).await;
        assert_eq!(
            (v, was_moved),
            (Value::Bulk(Bytes::from_static(b"1")), false)
        );

        // 9. Kill a master: the core reports each failed connect with node_failed(); once
        //    the cluster has promoted the replica, the refresh routes the slot there.
        let victim_slot = key_slot(b"key:1");
        let victim = topo.pick(Some(victim_slot), false).expect("pick");
        let promoted = shards_map.shard_of(victim_slot).expect("shard").replicas[0];
        let i = lc
            .nodes
            .iter()
            .position(|a| *a == victim)
            .expect("victim node");
        let mut lab = lc.lab;
        lab.kill(&format!("node{i}"));
        let t = Instant::now();
        eventually(
            "routing to the promoted replica",
            Duration::from_secs(30),
            || {
                let topo = &topo;
                async move {
                    match topo.pick(Some(victim_slot), false) {
                        Ok(a) if a == victim => {
                            if Client::connect(a, &ConnectOptions::default())
                                .await
                                .is_err()
                            {
                                topo.node_failed(a);
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            None
                        }
                        Ok(a) => Some(a),
                        Err(e) => panic!("pick failed during failover: {e}"),
                    }
                }
            },
        )
        .await;
        assert_eq!(topo.pick(Some(victim_slot), false), Ok(promoted));
        eprintln!(
            "live cluster: master {victim} killed; routing moved to promoted {promoted} after {:?} (cluster-node-timeout 3 s)",
            t.elapsed()
        );
        let (v, was_moved) = routed(&topo, victim_slot, &[b"GET", b"key:1"]).await;
        assert_eq!(
            (v, was_moved),
            (Value::Bulk(Bytes::from_static(b"v")), false)
        );
        drop(lab);
    }

    /// Control connections authenticate (ACL user or `requirepass`) and carry the bypass
    /// mark.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_wire_auth_and_mark() {
        let redis = Lab::bin("redis-server");
        let mut lab = Lab::new("wire");
        let port = free_port();
        let mut args = server_args(&lab, port);
        args.extend(["--requirepass", "topsecret"].map(String::from));
        lab.spawn("auth", &redis, &args);
        let a = local(port);
        eventually(
            "the server to accept AUTH",
            Duration::from_secs(10),
            || async move {
                let opts = ConnectOptions {
                    password: Some("topsecret".into()),
                    ..Default::default()
                };
                Client::connect(a, &opts).await.ok().map(|_| ())
            },
        )
        .await;
        let admin = ConnectOptions {
            password: Some("topsecret".into()),
            ..Default::default()
        };
        let mut c = Client::connect(a, &admin).await.expect("AUTH as default");
        let v = c
            .command(&[
                b"ACL",
                b"SETUSER",
                b"proxy",
                b"on",
                b">proxypw",
                b"~*",
                b"&*",
                b"+@all",
            ])
            .await
            .expect("ACL SETUSER");
        assert_eq!(v, Value::Simple("OK".into()));
        let ping = |opts: ConnectOptions| async move {
            let mut c = Client::connect(a, &opts).await?;
            c.command(&[b"PING"]).await
        };
        let user = ConnectOptions {
            username: Some("proxy".into()),
            password: Some("proxypw".into()),
            mark: 0x444d,
            ..Default::default()
        };
        assert_eq!(
            ping(user).await.expect("ACL user"),
            Value::Simple("PONG".into())
        );
        let wrong = ConnectOptions {
            password: Some("nope".into()),
            ..Default::default()
        };
        let err = ping(wrong).await.expect_err("wrong password");
        assert!(matches!(err, wire::ClientError::Auth { .. }), "{err}");
        assert!(err.to_string().contains("username/password"), "{err}");
        let v = ping(ConnectOptions::default()).await.expect("no auth");
        assert!(
            matches!(&v, Value::Error(e) if e.starts_with("NOAUTH")),
            "{v:?}"
        );
        // Not a cluster node: the fetch fails with a clear error rather than an empty map.
        let opts = ConnectOptions {
            password: Some("topsecret".into()),
            ..Default::default()
        };
        let err = fetch_slot_map(a, &opts).await.expect_err("not a cluster");
        assert!(err.to_string().contains("cluster-enabled"), "{err}");
        drop(lab);
    }
}
