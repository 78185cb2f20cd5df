//! Hot-key read relief: a node-local cache, per endpoint, of the values of keys that are hot
//! and read-mostly, kept correct by Redis's own invalidation (RESP3 `CLIENT TRACKING`).
//!
//! What is served from the cache: a plain `GET key` (two arguments) of a client in database
//! 0, not inside MULTI, not subscribed, after the command policy (user's and pod's ACL) let
//! it through, on a standalone or Sentinel endpoint, while the endpoint's tracking connection
//! is up. Only string values (a bulk reply) up to `max_value_bytes` are cached, never a nil
//! (a GET of a missing key is always forwarded); the reply is the backend's own bytes, which
//! are the same in RESP2 and RESP3. Cluster endpoints are never cached (one tracking
//! connection per master and slot moves are left for later).
//!
//! Which keys: the ones the hot-key detector ([`crate::hotkeys`]) reports at or over
//! `min_ops` operations per second with at least `min_read_ratio` of them reads. A session
//! whose GET misses on such a key asks the tracker to fill it.
//!
//! How it stays correct:
//! - The tracker task ([`track`]) keeps one connection per endpoint to the node the topology
//!   names as master, opened with `HELLO 3` (and AUTH with the endpoint's backend user) and
//!   `CLIENT TRACKING ON`. Values enter the cache only from `GET`s sent on that connection,
//!   so Redis tracks exactly the cached keys, and any write by anyone (through the proxy, a
//!   client straight to Redis, a script, an expiry, an eviction) sends `>2 invalidate [keys]`
//!   on it (a nil list after FLUSHALL/FLUSHDB: everything). Replies and pushes arrive on that
//!   connection in order, and the tracker handles them one at a time: a value read before a
//!   write is inserted before that write's invalidation is handled.
//! - Writes through this proxy do not wait for the push: at dispatch, every key of a write
//!   command (the command table's key positions; all keys for a keyless write such as
//!   FLUSHALL, and for EXEC) is dropped from the cache and marked "being written" until the
//!   write's reply is in; a fill whose GET was in flight while a key was being written is
//!   dropped (the "filling" mark is poisoned), and none is inserted while a write is in
//!   flight. So a client that got a write's reply never reads an older value from this node.
//!   A write by a client straight to Redis is seen once its push arrives (well under a
//!   millisecond on a LAN).
//! - The connection drops, the node in use changes (failover, standby, a reload with another
//!   backend), a frame does not parse, PINGs go unanswered for `IO_TIMEOUT`, or the cache is
//!   turned off: the whole cache is flushed at once and nothing is served until a new
//!   connection has `CLIENT TRACKING ON` answered.
//! - Every entry expires after `ttl_ms` whatever happens (a bound on staleness if everything
//!   above failed), and the cache holds at most `max_keys` entries and `max_bytes` bytes
//!   (key, value and a fixed overhead per entry); when full, new fills are refused until
//!   entries expire.
//!
//! Architecture Invariant: a cached value is served only while its tracking connection is up
//! and no invalidation for it arrived since it was read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::backend::{connect, handshake};
use crate::endpoint::{EndpointHandle, EndpointRuntime};
use crate::metrics::{EndpointLabels, ProxyMetrics};
use crate::resp::{encode_command, Limits, Reply, ReplyDecoder, ReplyKind, Value};
use crate::shared::Shared;

pub const DEFAULT_MIN_OPS: u32 = 1000;
pub const DEFAULT_MIN_READ_RATIO: f64 = 0.9;
pub const DEFAULT_TTL_MS: u64 = 1000;
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_MAX_KEYS: u32 = 10_000;
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 64 * 1024;
/// Bytes counted per entry besides its key and value (map slot, `Bytes` headers, expiry).
pub const ENTRY_OVERHEAD: usize = 96;
/// Fill requests waiting for the tracker at most (more are dropped: the next miss asks again).
const MAX_REQUESTS: usize = 256;
/// Keys remembered as not cacheable (missing, not a string, too big): not read again for the
/// cache until Redis invalidates them (it tracks them: the fill GET read them), so a hot GET
/// of a missing key does not cost Redis a second GET per miss. Cleared with the cache.
const MAX_UNCACHEABLE: usize = 1024;
/// The tracker's tick: settings, topology and PING checks.
const TICK: Duration = Duration::from_millis(100);
/// A PING on the tracking connection this often when nothing else is outstanding.
const PING_EVERY: Duration = Duration::from_millis(500);
/// The oldest request on the tracking connection unanswered this long: the connection is
/// taken as dead (flush, reconnect).
const IO_TIMEOUT: Duration = Duration::from_millis(1000);

/// `local_cache:` settings (swapped with the session settings on reload).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalCacheSettings {
    pub enabled: bool,
    /// Endpoints cached (empty: every standalone and Sentinel endpoint).
    pub endpoints: Vec<String>,
    /// A key is cached only at or above this many operations per second (hot-key detector).
    pub min_ops: u32,
    /// ... and with at least this share of reads among its reads and writes.
    pub min_read_ratio: f64,
    pub ttl_ms: u64,
    pub max_bytes: u64,
    pub max_keys: u32,
    pub max_value_bytes: u64,
}

// `min_read_ratio` is validated to a number in [0, 1] (never NaN).
impl Eq for LocalCacheSettings {}

impl Default for LocalCacheSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoints: Vec::new(),
            min_ops: DEFAULT_MIN_OPS,
            min_read_ratio: DEFAULT_MIN_READ_RATIO,
            ttl_ms: DEFAULT_TTL_MS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_keys: DEFAULT_MAX_KEYS,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl LocalCacheSettings {
    /// Whether endpoint `name` is cached.
    pub fn applies_to(&self, name: &str) -> bool {
        self.enabled && (self.endpoints.is_empty() || self.endpoints.iter().any(|e| e == name))
    }
}

/// The cache's metric handles (resolved once per endpoint runtime).
#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub invalidations: Counter,
    pub flushes: Counter,
    pub bytes: Gauge,
    pub keys: Gauge,
}

impl CacheMetrics {
    pub fn resolve(m: &ProxyMetrics, endpoint: &str) -> Self {
        let l = EndpointLabels {
            endpoint: endpoint.to_string(),
        };
        // One statement per handle (a Family's read guard lives to the end of its statement).
        let hits = (*m.local_cache_hits.get_or_create(&l)).clone();
        let misses = (*m.local_cache_misses.get_or_create(&l)).clone();
        let invalidations = (*m.local_cache_invalidations.get_or_create(&l)).clone();
        let flushes = (*m.local_cache_flushes.get_or_create(&l)).clone();
        let bytes = (*m.local_cache_bytes.get_or_create(&l)).clone();
        let keys = (*m.local_cache_keys.get_or_create(&l)).clone();
        Self {
            hits,
            misses,
            invalidations,
            flushes,
            bytes,
            keys,
        }
    }
}

struct Entry {
    /// The backend's reply to GET, as sent (`$<n>\r\n<value>\r\n`).
    raw: Bytes,
    expires: Instant,
}

impl Entry {
    fn cost(key: &[u8], raw: &[u8]) -> usize {
        key.len() + raw.len() + ENTRY_OVERHEAD
    }
}

#[derive(Default)]
struct State {
    /// Up and tracking: entries may be served and inserted.
    live: bool,
    entries: HashMap<Bytes, Entry>,
    bytes: usize,
    /// Keys whose fill GET is in flight → poisoned (an invalidation or a local write came
    /// meanwhile: the reply is dropped).
    filling: HashMap<Bytes, bool>,
    /// Fill requests not sent yet.
    requests: VecDeque<Bytes>,
    /// Keys written through this proxy, their writes' replies not in yet.
    writing: HashMap<Bytes, u32>,
    /// Keyless writes (FLUSHALL, EXEC...) not answered yet: nothing is inserted meanwhile.
    writing_all: u32,
    uncacheable: HashSet<Bytes>,
}

impl State {
    fn remove(&mut self, key: &[u8]) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.bytes = self.bytes.saturating_sub(Entry::cost(key, &e.raw));
                true
            }
            None => false,
        }
    }

    fn poison(&mut self, key: &[u8]) {
        if let Some(p) = self.filling.get_mut(key) {
            *p = true;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.uncacheable.clear();
        for p in self.filling.values_mut() {
            *p = true;
        }
    }

    fn purge_expired(&mut self, now: Instant) {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.expires > now);
        if self.entries.len() != before {
            self.bytes = self
                .entries
                .iter()
                .map(|(k, e)| Entry::cost(k, &e.raw))
                .sum();
        }
    }
}

/// Why the cache was flushed (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushCause {
    /// The tracking connection failed, hung, or sent what does not parse.
    Connection,
    /// The node in use changed, or the runtime was replaced.
    Backend,
    /// Turned off.
    Disabled,
    /// Redis said so (`invalidate` with a nil list: FLUSHALL/FLUSHDB).
    Server,
}

/// One endpoint runtime's cache (see the module docs).
pub struct LocalCache {
    /// `State::live`, readable without the lock (the fast "is it on" check on every GET).
    live: AtomicBool,
    /// The tracker is up or connecting: writes through the proxy are guarded.
    active: AtomicBool,
    state: Mutex<State>,
    wake: Notify,
    pub metrics: CacheMetrics,
}

impl LocalCache {
    pub fn new(metrics: CacheMetrics) -> Self {
        Self {
            live: AtomicBool::new(false),
            active: AtomicBool::new(false),
            state: Mutex::default(),
            wake: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serving (tracking is on).
    #[inline]
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Writes through the proxy must take a [`WriteGuard`].
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The cached GET reply of `key`, if any and fresh (a hit is counted).
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Bytes> {
        let mut g = self.lock();
        if !g.live {
            return None;
        }
        let raw = match g.entries.get(key) {
            Some(e) if e.expires > now => e.raw.clone(),
            Some(_) => {
                g.remove(key);
                self.publish(&g);
                return None;
            }
            None => return None,
        };
        drop(g);
        self.metrics.hits.inc();
        Some(raw)
    }

    /// A GET of a cache-eligible key missed: counted, and a fill requested.
    pub fn miss(&self, key: &Bytes) {
        self.metrics.misses.inc();
        let mut g = self.lock();
        if !g.live
            || g.requests.len() >= MAX_REQUESTS
            || g.filling.contains_key(key)
            || g.uncacheable.contains(key)
            || g.requests.contains(key)
        {
            return;
        }
        g.requests.push_back(key.clone());
        drop(g);
        self.wake.notify_one();
    }

    /// Marks `keys` as being written through the proxy until the guard drops (when the
    /// write's reply is in); empty `keys`: every key (a keyless write, EXEC).
    pub fn write_begin(self: &Arc<Self>, keys: Vec<Bytes>) -> WriteGuard {
        let mut g = self.lock();
        if keys.is_empty() {
            g.writing_all += 1;
            if !g.entries.is_empty() {
                self.metrics.flushes.inc();
            }
            g.clear();
        } else {
            for k in &keys {
                *g.writing.entry(k.clone()).or_insert(0) += 1;
                if g.remove(k) {
                    self.metrics.invalidations.inc();
                }
                g.poison(k);
            }
        }
        self.publish(&g);
        WriteGuard {
            cache: self.clone(),
            keys,
        }
    }

    fn write_end(&self, keys: &[Bytes]) {
        let mut g = self.lock();
        if keys.is_empty() {
            g.writing_all = g.writing_all.saturating_sub(1);
            for p in g.filling.values_mut() {
                *p = true;
            }
            return;
        }
        for k in keys {
            if let Some(n) = g.writing.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    g.writing.remove(k);
                }
            }
            g.poison(k);
        }
    }

    /// Redis invalidated `keys`.
    fn invalidate(&self, keys: &[Bytes]) {
        let mut g = self.lock();
        for k in keys {
            if g.remove(k) {
                self.metrics.invalidations.inc();
            }
            g.poison(k);
            g.uncacheable.remove(k);
        }
        self.publish(&g);
    }

    /// Drops everything at once; `down`: and serves nothing until [`Self::set_live`].
    pub fn flush(&self, cause: FlushCause, down: bool) {
        let mut g = self.lock();
        // Counted when something was dropped or a serving cache stops serving.
        let counted = !g.entries.is_empty() || (down && g.live) || cause == FlushCause::Server;
        if down {
            g.live = false;
            self.live.store(false, Ordering::Release);
            g.requests.clear();
        }
        if counted {
            self.metrics.flushes.inc();
            debug!(?cause, keys = g.entries.len(), "local cache flushed");
        }
        g.clear();
        self.publish(&g);
    }

    fn set_live(&self) {
        let mut g = self.lock();
        g.clear();
        g.filling.clear();
        g.live = true;
        self.live.store(true, Ordering::Release);
    }

    fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Release);
    }

    /// Fill requests to send now (each marked filling).
    fn take_requests(&self) -> Vec<Bytes> {
        let mut g = self.lock();
        let keys: Vec<Bytes> = g.requests.drain(..).collect();
        for k in &keys {
            g.filling.insert(k.clone(), false);
        }
        keys
    }

    /// The tracking connection's reply to the fill GET of `key`; inserted when it is a
    /// string within bounds and nothing touched the key since the GET was sent.
    fn filled(&self, key: &Bytes, reply: &Reply, s: &LocalCacheSettings, now: Instant) {
        let mut g = self.lock();
        let poisoned = g.filling.remove(key).unwrap_or(true);
        if poisoned || !g.live || g.writing_all > 0 || g.writing.contains_key(key) {
            return;
        }
        // A bulk reply (`$-1` is RESP2's nil: never cached; RESP3 nil is `_`, kind Other).
        // A nil is remembered (Redis tracks a missing key it was asked for, so its creation
        // is pushed); an error is not (whether a failed read is tracked is not something to
        // rely on).
        if reply.kind != ReplyKind::Bulk || reply.raw.starts_with(b"$-") {
            if reply.kind != ReplyKind::Error && g.uncacheable.len() < MAX_UNCACHEABLE {
                g.uncacheable.insert(key.clone());
            }
            return;
        }
        // `$<n>\r\n<value>\r\n`: the value is what is left after the header and the CRLF.
        let header = reply
            .raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(reply.raw.len(), |i| i + 2);
        let value_len = reply.raw.len().saturating_sub(header + 2);
        if value_len as u64 > s.max_value_bytes {
            if g.uncacheable.len() < MAX_UNCACHEABLE {
                g.uncacheable.insert(key.clone());
            }
            return;
        }
        let cost = Entry::cost(key, &reply.raw);
        if g.entries.len() >= s.max_keys as usize || (g.bytes + cost) as u64 > s.max_bytes {
            g.purge_expired(now);
            if g.entries.len() >= s.max_keys as usize || (g.bytes + cost) as u64 > s.max_bytes {
                self.publish(&g);
                return;
            }
        }
        g.remove(key);
        g.bytes += cost;
        g.entries.insert(
            key.clone(),
            Entry {
                raw: reply.raw.clone(),
                expires: now + Duration::from_millis(s.ttl_ms),
            },
        );
        self.publish(&g);
    }

    fn expire(&self, now: Instant) {
        let mut g = self.lock();
        g.purge_expired(now);
        self.publish(&g);
    }

    fn publish(&self, g: &State) {
        self.metrics.keys.set(g.entries.len() as i64);
        self.metrics.bytes.set(g.bytes as i64);
    }

    /// Entries and bytes held now.
    pub fn size(&self) -> (usize, usize) {
        let g = self.lock();
        (g.entries.len(), g.bytes)
    }

    /// Whether `key` is cached now (`/hotkeys`' `cached` column).
    pub fn contains(&self, key: &[u8]) -> bool {
        let g = self.lock();
        g.live && g.entries.contains_key(key)
    }

    /// `/hotkeys`: the cache's state (per endpoint, with the cache on).
    pub fn json(&self) -> serde_json::Value {
        let g = self.lock();
        serde_json::json!({
            "live": g.live,
            "keys": g.entries.len(),
            "bytes": g.bytes,
            "filling": g.filling.len(),
            "hits": self.metrics.hits.get(),
            "misses": self.metrics.misses.get(),
            "invalidations": self.metrics.invalidations.get(),
            "flushes": self.metrics.flushes.get(),
        })
    }
}

/// Held while a write through the proxy is in flight (see [`LocalCache::write_begin`]).
pub struct WriteGuard {
    cache: Arc<LocalCache>,
    keys: Vec<Bytes>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.cache.write_end(&self.keys);
    }
}

/// Flushes the cache and stops serving when the tracker's connection ends, however it ends
/// (returned, failed, or the task aborted).
struct DownOnDrop(Arc<LocalCache>, FlushCause);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        self.0.flush(self.1, true);
        self.0.set_active(false);
    }
}

/// Why a tracking connection ended.
#[derive(Debug)]
enum End {
    Disabled,
    Backend,
    Failed(String),
}

/// The tracker of one endpoint (spawned with its listener, ends with it): follows the
/// current runtime and settings; while the cache is on for the endpoint, keeps a tracking
/// connection to the node in use and fills the cache through it.
pub async fn track(handle: Arc<EndpointHandle>, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    // A backend that keeps refusing (an ACL without CLIENT, a wrong password) is retried
    // every 2 s at most, and logged every 30 s at most.
    let failures = crate::ratelog::RateLimited::new(Duration::from_secs(30));
    loop {
        let s = shared.settings();
        let rt = handle.current();
        let on = s.local_cache.applies_to(&handle.name) && !rt.router.is_cluster();
        let node = rt.topology().masters().first().copied();
        let (Some(node), true) = (node, on) else {
            rt.cache.flush(FlushCause::Disabled, true);
            rt.cache.set_active(false);
            tokio::time::sleep(TICK * 2).await;
            continue;
        };
        let started = Instant::now();
        match tracking(&handle, &rt, &shared, node).await {
            End::Disabled => info!(endpoint = %handle.name, "local cache off: flushed"),
            End::Backend => {
                info!(endpoint = %handle.name, %node, "local cache: the node in use changed: flushed")
            }
            End::Failed(e) => {
                if let Some(skipped) = failures.check() {
                    warn!(endpoint = %handle.name, %node, error = %e, skipped, "local cache: no tracking connection (flushed, not serving; retrying; logged at most every 30 s, skipped = failures since the last line)");
                }
            }
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One tracking connection, until it ends (see [`track`]).
async fn tracking(
    handle: &EndpointHandle,
    rt: &Arc<EndpointRuntime>,
    shared: &Shared,
    node: SocketAddr,
) -> End {
    let cache = rt.cache.clone();
    cache.set_active(true);
    // From here on, however this ends, the cache is flushed and stops serving.
    let _down = DownOnDrop(cache.clone(), FlushCause::Connection);
    let spec = rt.group().connect_spec();
    let mut stream = match connect::connect_marked(node, spec.mark, spec.connect_timeout).await {
        Ok(s) => s,
        Err(e) => return End::Failed(e.to_string()),
    };
    let steps = handshake::data_steps(spec, 0, 3, false);
    let learned = match handshake::run(&mut stream, &steps, spec.connect_timeout).await {
        Ok(l) => l,
        Err(e) => return End::Failed(e.to_string()),
    };
    let mut conn = Tracking {
        stream,
        buf: learned.leftover,
        dec: ReplyDecoder::default(),
        sent: VecDeque::new(),
    };
    let on = encode_command(&[
        Bytes::from_static(b"CLIENT"),
        Bytes::from_static(b"TRACKING"),
        Bytes::from_static(b"ON"),
    ]);
    if let Err(e) = conn.stream.write_all(&on).await {
        return End::Failed(format!("write: {e}"));
    }
    match tokio::time::timeout(spec.connect_timeout, conn.next()).await {
        Ok(Ok(r)) if r.kind == ReplyKind::Simple => {}
        Ok(Ok(r)) => {
            return End::Failed(format!(
                "CLIENT TRACKING ON refused: {} (does the backend user's ACL allow CLIENT?)",
                String::from_utf8_lossy(&r.raw).trim_end()
            ))
        }
        Ok(Err(e)) => return End::Failed(e),
        Err(_) => return End::Failed("CLIENT TRACKING ON timed out".into()),
    }
    cache.set_live();
    info!(endpoint = %handle.name, %node, "local cache: tracking, serving hot keys");
    let mut tick = tokio::time::interval(TICK);
    let mut last_ping = Instant::now();
    // A new topology generation (Sentinel +switch-master, a standby switch) is acted on at
    // once, not at the next tick.
    let mut changes = rt.topology().changes();
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() || rt.topology().masters().first() != Some(&node) {
                    return End::Backend;
                }
            }
            r = conn.next() => {
                let reply = match r {
                    Ok(r) => r,
                    Err(e) => return End::Failed(e),
                };
                if reply.kind == ReplyKind::Push {
                    match invalidated(&reply) {
                        Some(Invalidation::Keys(keys)) => cache.invalidate(&keys),
                        Some(Invalidation::All) => cache.flush(FlushCause::Server, false),
                        Some(Invalidation::Other) => {}
                        None => return End::Failed("an invalidation message that does not parse".into()),
                    }
                    continue;
                }
                let Some((what, _)) = conn.sent.pop_front() else {
                    return End::Failed("a reply nothing was sent for".into());
                };
                if let Sent::Fill(key) = what {
                    let s = shared.settings();
                    cache.filled(&key, &reply, &s.local_cache, Instant::now());
                }
            }
            _ = cache.wake.notified() => {
                let keys = cache.take_requests();
                if keys.is_empty() {
                    continue;
                }
                let mut out = BytesMut::new();
                let now = Instant::now();
                for k in keys {
                    out.extend_from_slice(&encode_command(&[Bytes::from_static(b"GET"), k.clone()]));
                    conn.sent.push_back((Sent::Fill(k), now));
                }
                if let Err(e) = conn.stream.write_all(&out).await {
                    return End::Failed(format!("write: {e}"));
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let s = shared.settings();
                if !s.local_cache.applies_to(&handle.name) {
                    return End::Disabled;
                }
                let current = handle.current();
                if !Arc::ptr_eq(&current, rt) || current.topology().masters().first() != Some(&node) {
                    return End::Backend;
                }
                if conn.sent.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) > IO_TIMEOUT) {
                    return End::Failed(format!("no reply within {IO_TIMEOUT:?}"));
                }
                cache.expire(now);
                if conn.sent.is_empty() && now.saturating_duration_since(last_ping) >= PING_EVERY {
                    last_ping = now;
                    if let Err(e) = conn.stream.write_all(b"*1\r\n$4\r\nPING\r\n").await {
                        return End::Failed(format!("write: {e}"));
                    }
                    conn.sent.push_back((Sent::Ping, now));
                }
            }
        }
    }
}

enum Sent {
    Fill(Bytes),
    Ping,
}

struct Tracking {
    stream: TcpStream,
    buf: BytesMut,
    dec: ReplyDecoder,
    sent: VecDeque<(Sent, Instant)>,
}

impl Tracking {
    /// The next frame (reply or push). Cancel-safe: bytes read stay buffered.
    async fn next(&mut self) -> Result<Reply, String> {
        let limits = Limits::backend();
        loop {
            match self.dec.decode(&mut self.buf, &limits) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(format!("protocol error: {e}")),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err("connection closed by the server".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Invalidation {
    Keys(Vec<Bytes>),
    All,
    /// Another push (not an invalidation): ignored.
    Other,
}

/// Parses a push: `>2 $10 invalidate *<n> keys...` (or `_`/`*-1` for all); `None` when it
/// does not parse (the caller flushes).
fn invalidated(reply: &Reply) -> Option<Invalidation> {
    let Value::Push(items) = Value::parse(&reply.raw)? else {
        return None;
    };
    let kind = items.first()?.as_bytes()?;
    if !kind.eq_ignore_ascii_case(b"invalidate") {
        return Some(Invalidation::Other);
    }
    match items.get(1)? {
        Value::Null => Some(Invalidation::All),
        Value::Array(keys) => keys
            .iter()
            .map(|k| k.as_bytes().map(Bytes::copy_from_slice))
            .collect::<Option<Vec<_>>>()
            .map(Invalidation::Keys),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<LocalCache> {
        let c = Arc::new(LocalCache::new(CacheMetrics::default()));
        c.set_live();
        c
    }

    fn bulk(v: &str) -> Reply {
        Reply {
            raw: Bytes::from(format!("${}\r\n{v}\r\n", v.len())),
            kind: ReplyKind::Bulk,
        }
    }

    fn settings() -> LocalCacheSettings {
        LocalCacheSettings {
            enabled: true,
            ..Default::default()
        }
    }

    /// Request, send (take), reply: the path of one fill.
    fn fill(c: &LocalCache, key: &'static str, v: &str, s: &LocalCacheSettings, now: Instant) {
        let k = Bytes::from_static(key.as_bytes());
        c.miss(&k);
        assert!(c.take_requests().contains(&k));
        c.filled(&k, &bulk(v), s, now);
    }

    #[test]
    fn fill_serve_and_ttl() {
        let c = cache();
        let s = settings();
        let t0 = Instant::now();
        fill(&c, "k", "v1", &s, t0);
        assert_eq!(c.get(b"k", t0).as_deref(), Some(&b"$2\r\nv1\r\n"[..]));
        assert_eq!(c.metrics.hits.get(), 1);
        // Expired after ttl_ms whatever happened.
        assert!(c.get(b"k", t0 + Duration::from_millis(s.ttl_ms)).is_none());
        assert_eq!(c.size(), (0, 0));
    }

    #[test]
    fn nil_errors_and_big_values_are_not_cached() {
        let c = cache();
        let s = LocalCacheSettings {
            max_value_bytes: 4,
            ..settings()
        };
        let t0 = Instant::now();
        for raw in [&b"$-1\r\n"[..], b"_\r\n", b"-WRONGTYPE x\r\n"] {
            let k = Bytes::from_static(b"k");
            // Forgotten as uncacheable once Redis says the key changed.
            c.invalidate(std::slice::from_ref(&k));
            c.miss(&k);
            assert_eq!(c.take_requests(), vec![k.clone()]);
            c.filled(
                &k,
                &Reply {
                    raw: Bytes::copy_from_slice(raw),
                    kind: ReplyKind::of(raw[0]),
                },
                &s,
                t0,
            );
            assert!(c.get(b"k", t0).is_none());
            // A nil is not read again for the cache (a hot missing key costs Redis no second
            // GET per miss); an error is.
            c.miss(&k);
            assert_eq!(c.take_requests().is_empty(), raw[0] != b'-');
            c.take_requests();
        }
        fill(&c, "big", "12345", &s, t0);
        assert!(c.get(b"big", t0).is_none());
        // Remembered as too big: no new fill request.
        c.miss(&Bytes::from_static(b"big"));
        assert!(c.take_requests().is_empty());
        fill(&c, "small", "1234", &s, t0);
        assert!(c.get(b"small", t0).is_some());
    }

    #[test]
    fn bounds_hold() {
        let c = cache();
        let s = LocalCacheSettings {
            max_keys: 3,
            ..settings()
        };
        let t0 = Instant::now();
        for k in ["a", "b", "c", "d"] {
            fill(&c, k, "v", &s, t0);
        }
        assert_eq!(c.size().0, 3);
        assert!(c.get(b"d", t0).is_none());
        // Room again once entries expire.
        let later = t0 + Duration::from_millis(s.ttl_ms + 1);
        fill(&c, "d", "v", &s, later);
        assert!(c.get(b"d", later).is_some());
        assert_eq!(c.size().0, 1);

        let c = cache();
        let per = Entry::cost(b"a", b"$1\r\nv\r\n") as u64;
        let s = LocalCacheSettings {
            max_bytes: per * 2,
            ..settings()
        };
        for k in ["a", "b", "c"] {
            fill(&c, k, "v", &s, t0);
        }
        assert_eq!(c.size(), (2, 2 * per as usize));
    }

    #[test]
    fn an_invalidation_during_a_fill_drops_its_reply() {
        let c = cache();
        let s = settings();
        let t0 = Instant::now();
        let k = Bytes::from_static(b"k");
        c.miss(&k);
        c.take_requests();
        // The push for a write that came after the GET was sent, before its reply was handled.
        c.invalidate(std::slice::from_ref(&k));
        c.filled(&k, &bulk("old"), &s, t0);
        assert!(c.get(b"k", t0).is_none());
        // An invalidation of a cached key drops it.
        fill(&c, "k", "v", &s, t0);
        assert!(c.get(b"k", t0).is_some());
        c.invalidate(std::slice::from_ref(&k));
        assert!(c.get(b"k", t0).is_none());
        assert_eq!(c.metrics.invalidations.get(), 1);
    }

    #[test]
    fn a_write_through_the_proxy_fences_fills() {
        let c = cache();
        let s = settings();
        let t0 = Instant::now();
        let k = Bytes::from_static(b"k");
        fill(&c, "k", "v", &s, t0);
        // A fill sent while the write is in flight, answered after its reply: dropped.
        let w = c.write_begin(vec![k.clone()]);
        assert!(c.get(b"k", t0).is_none(), "dropped at dispatch");
        c.miss(&k);
        c.take_requests();
        drop(w);
        c.filled(&k, &bulk("old"), &s, t0);
        assert!(c.get(b"k", t0).is_none());
        // A fill answered while a write is in flight: dropped too.
        let w = c.write_begin(vec![k.clone()]);
        c.miss(&k);
        c.take_requests();
        c.filled(&k, &bulk("old"), &s, t0);
        assert!(c.get(b"k", t0).is_none());
        drop(w);
        // After the write: fills go in again.
        fill(&c, "k", "new", &s, t0);
        assert_eq!(c.get(b"k", t0).as_deref(), Some(&b"$3\r\nnew\r\n"[..]));
        // A keyless write flushes everything and fences every fill.
        let w = c.write_begin(Vec::new());
        assert!(c.get(b"k", t0).is_none());
        fill(&c, "k", "v", &s, t0);
        assert!(c.get(b"k", t0).is_none());
        drop(w);
        fill(&c, "k", "v", &s, t0);
        assert!(c.get(b"k", t0).is_some());
    }

    #[test]
    fn down_flushes_and_serves_nothing() {
        let c = cache();
        let s = settings();
        let t0 = Instant::now();
        fill(&c, "k", "v", &s, t0);
        let k = Bytes::from_static(b"k");
        c.miss(&Bytes::from_static(b"other"));
        c.take_requests();
        c.flush(FlushCause::Connection, true);
        assert!(!c.is_live());
        assert!(c.get(b"k", t0).is_none());
        // A fill answered after the flush (the old connection's) is dropped, and none is
        // requested while down.
        c.filled(&Bytes::from_static(b"other"), &bulk("v"), &s, t0);
        c.miss(&k);
        assert!(c.take_requests().is_empty());
        assert_eq!(c.size(), (0, 0));
        assert_eq!(c.metrics.flushes.get(), 1);
    }

    #[test]
    fn invalidation_messages_parse() {
        let push = |raw: &[u8]| Reply {
            raw: Bytes::copy_from_slice(raw),
            kind: ReplyKind::Push,
        };
        assert_eq!(
            invalidated(&push(
                b">2\r\n$10\r\ninvalidate\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n"
            )),
            Some(Invalidation::Keys(vec![
                Bytes::from_static(b"a"),
                Bytes::from_static(b"b")
            ]))
        );
        assert_eq!(
            invalidated(&push(b">2\r\n$10\r\ninvalidate\r\n_\r\n")),
            Some(Invalidation::All)
        );
        assert_eq!(
            invalidated(&push(b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n")),
            Some(Invalidation::Other)
        );
        assert_eq!(
            invalidated(&push(b">2\r\n$10\r\ninvalidate\r\n:1\r\n")),
            None
        );
    }
}
