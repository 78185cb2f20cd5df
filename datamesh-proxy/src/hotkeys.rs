//! Hot-key detection: per endpoint, a streaming top-K of keys by operations over a sliding
//! window, with the pods that send them and their reads and writes.
//!
//! The sketch is Metwally's space-saving: `capacity` counters (default 128) for the keys seen
//! most, each with an over-estimate bound (`error`); a key not tracked takes the smallest
//! counter's place with that count plus one. Any key with more than `n / capacity` of the `n`
//! operations is guaranteed to be tracked, so the one key hammered among spread traffic is
//! always found. Memory is bounded: per endpoint two epochs × `capacity` counters, each with
//! at most [`MAX_STORED_KEY`] key bytes and [`POD_SLOTS`] pods (about 300 KiB at the defaults
//! in the worst case); there is no map of all keys.
//!
//! The window slides by epochs: two halves of `window_s`. Counts go into the current epoch;
//! every half window the previous epoch is dropped and the current one becomes the previous.
//! A snapshot merges both, so what it shows covers between a half and a whole window.
//!
//! Cost on the command path: a session samples 1 command in `sample_rate` (a counter), puts
//! the first key of a sampled keyed command in its own small buffer (a `Bytes` clone: no
//! copy) and hands the buffer to its endpoint's sketch once per dispatch round: one short lock
//! per round, none per command. Counts shown are scaled back by `sample_rate`.
//!
//! Keys may be personal data: every place a key leaves the proxy (`/hotkeys`, the metrics,
//! the CLI that reads `/hotkeys`) shows it through [`KeyDisplay`]: raw, truncated (default,
//! 64 bytes) or hashed (SipHash with a per-process random key: stable while the agent runs,
//! not reversible by a dictionary built elsewhere).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use serde::Serialize;

use crate::accounting::PodStats;
use crate::commands::{self, first_key, CommandSpec, READONLY, WRITE};
use crate::endpoint::EndpointHandle;
pub use crate::keydisplay::{key_hash, show_key, KeyDisplay, TRUNCATED_BYTES};
use crate::resp::Command;
use crate::shared::Shared;

/// Key bytes kept per tracked key; longer keys are told apart by their hash and shown with
/// their length.
pub const MAX_STORED_KEY: usize = 512;
/// Pods remembered per tracked key (a space-saving of their own).
pub const POD_SLOTS: usize = 4;
/// Samples a session buffers before it hands them over within a round.
const SESSION_BUFFER: usize = 64;
/// `hotkeys:` settings (swapped with the session settings on reload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HotKeySettings {
    pub enabled: bool,
    /// One command in this many is sampled (1 = every command).
    pub sample_rate: u32,
    /// Keys shown (`/hotkeys`, the CLI).
    pub top_k: u32,
    /// Counters of the sketch (at least `top_k`).
    pub capacity: u32,
    /// The sliding window, in seconds (two epochs of half of it).
    pub window_s: u32,
    pub key_display: KeyDisplay,
    /// Keys exported as `datamesh_proxy_hotkey_ops_per_second`, per endpoint.
    pub metrics_top: u32,
    /// Automatic key throttle: a key above this many ops/s gets a throttle rule at this rate
    /// ([`crate::keyrules`]); 0 = off.
    pub auto_throttle_ops: u32,
    /// How long an automatic throttle rule lasts, in seconds.
    pub auto_throttle_s: u32,
}

/// 1 in 8: a key not tracked yet costs the sketch about 300 ns (a scan of the counts and two
/// index updates); sampled 1 in 8 that is about 2.5 % of the proxy's CPU per request at
/// pipeline 16 even when every key is new, and a key at 1,000 ops/s still gives 125 samples a
/// second.
pub const DEFAULT_SAMPLE_RATE: u32 = 8;
pub const DEFAULT_TOP_K: u32 = 32;
pub const DEFAULT_CAPACITY: u32 = 128;
pub const DEFAULT_WINDOW_S: u32 = 10;
pub const DEFAULT_METRICS_TOP: u32 = 10;

impl Default for HotKeySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_rate: DEFAULT_SAMPLE_RATE,
            top_k: DEFAULT_TOP_K,
            capacity: DEFAULT_CAPACITY,
            window_s: DEFAULT_WINDOW_S,
            key_display: KeyDisplay::Truncated,
            metrics_top: DEFAULT_METRICS_TOP,
            auto_throttle_ops: 0,
            auto_throttle_s: crate::keyrules::DEFAULT_AUTO_THROTTLE_S,
        }
    }
}

/// Whether an operation reads, writes, or neither (by the command table's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Other,
}

impl Op {
    pub fn of(spec: &CommandSpec) -> Self {
        if spec.has(WRITE) {
            Op::Write
        } else if spec.has(READONLY) {
            Op::Read
        } else {
            Op::Other
        }
    }
}

/// A session's sampler and buffer (see the module docs).
#[derive(Default)]
pub struct Sampler {
    tick: u32,
    /// The front command was considered already: a command that waits at the front of the
    /// inbox (a barrier) is looked at again next round but counted once. (Not by its bytes'
    /// address: a client that sends one command per round trip gets every command at the
    /// same address of its reused read buffer, and only its first would count.)
    seen: bool,
    buf: Vec<(Bytes, Op)>,
}

impl Sampler {
    /// Samples `cmd` if it is due (1 in `rate`); true when the buffer is full (hand it over
    /// now).
    #[inline]
    pub fn consider(&mut self, cmd: &Command, rate: u32) -> bool {
        if self.seen {
            return false;
        }
        self.seen = true;
        self.due(rate) && self.sample(cmd)
    }

    /// The front command left the inbox: the next one is considered.
    #[inline]
    pub fn next(&mut self) {
        self.seen = false;
    }

    /// True when the next command is to be sampled (`rate` 0 or 1: every one).
    #[inline]
    pub fn due(&mut self, rate: u32) -> bool {
        self.tick += 1;
        if self.tick >= rate {
            self.tick = 0;
            true
        } else {
            false
        }
    }

    /// Buffers `cmd`'s first key; true when the buffer is full (hand it over now).
    pub fn sample(&mut self, cmd: &Command) -> bool {
        let Some(spec) = commands::lookup(cmd.name()) else {
            return false;
        };
        if let Some(k) = first_key(spec, cmd).and_then(|i| cmd.args.get(i)) {
            self.buf.push((k.clone(), Op::of(spec)));
        }
        self.buf.len() >= SESSION_BUFFER
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Hands the buffer to `hk` (one lock) and empties it.
    pub fn flush(&mut self, hk: &HotKeys, pod: &Arc<PodStats>, s: &HotKeySettings) {
        if self.buf.is_empty() {
            return;
        }
        hk.record(pod, &self.buf, s, Instant::now());
        self.buf.clear();
    }
}

/// One pod's share of a tracked key.
#[derive(Clone)]
struct PodCount {
    pod: Arc<PodStats>,
    count: u64,
}

/// A space-saving counter.
#[derive(Clone)]
struct Counter {
    hash: u64,
    key: Vec<u8>,
    len: usize,
    count: u64,
    /// Over-estimate bound: the count of the key it replaced.
    error: u64,
    reads: u64,
    writes: u64,
    pods: Vec<PodCount>,
}

impl Counter {
    fn add_pod(&mut self, pod: &Arc<PodStats>) {
        if let Some(p) = self.pods.iter_mut().find(|p| p.pod.cookie == pod.cookie) {
            p.count += 1;
        } else if self.pods.len() < POD_SLOTS {
            self.pods.push(PodCount {
                pod: pod.clone(),
                count: 1,
            });
        } else if let Some(min) = self.pods.iter_mut().min_by_key(|p| p.count) {
            *min = PodCount {
                pod: pod.clone(),
                count: min.count + 1,
            };
        }
    }
}

/// The index's hasher: its keys are SipHash values already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// One epoch's space-saving sketch.
#[derive(Default)]
pub struct Sketch {
    counters: Vec<Counter>,
    /// The counters' counts again, packed: the smallest is found by scanning 1 KiB, not the
    /// counters (the cost of every key not tracked yet).
    counts: Vec<u64>,
    /// Key hash → counter index; at most `capacity` entries (the tracked keys only).
    index: HashMap<u64, usize, BuildHasherDefault<Prehashed>>,
    total: u64,
}

impl Sketch {
    fn add(&mut self, key: &[u8], op: Op, pod: &Arc<PodStats>, capacity: usize) {
        self.total += 1;
        let hash = key_hash(key);
        let i = match self.index.get(&hash) {
            Some(&i) => i,
            None if self.counters.len() < capacity => {
                self.counters.push(Counter {
                    hash,
                    key: key.get(..MAX_STORED_KEY).unwrap_or(key).to_vec(),
                    len: key.len(),
                    count: 0,
                    error: 0,
                    reads: 0,
                    writes: 0,
                    pods: Vec::with_capacity(POD_SLOTS),
                });
                self.counts.push(0);
                let i = self.counters.len() - 1;
                self.index.insert(hash, i);
                i
            }
            None => {
                let Some((i, min)) = self
                    .counts
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, c)| **c)
                    .map(|(i, c)| (i, *c))
                else {
                    return;
                };
                let Some(c) = self.counters.get_mut(i) else {
                    return;
                };
                self.index.remove(&c.hash);
                // The counter's allocations are reused: a stream of new keys allocates nothing.
                c.hash = hash;
                c.key.clear();
                c.key
                    .extend_from_slice(key.get(..MAX_STORED_KEY).unwrap_or(key));
                c.len = key.len();
                c.count = min;
                c.error = min;
                c.reads = 0;
                c.writes = 0;
                c.pods.clear();
                self.index.insert(hash, i);
                i
            }
        };
        let Some(c) = self.counters.get_mut(i) else {
            return;
        };
        if let Some(n) = self.counts.get_mut(i) {
            *n = c.count + 1;
        }
        c.count += 1;
        match op {
            Op::Read => c.reads += 1,
            Op::Write => c.writes += 1,
            Op::Other => {}
        }
        c.add_pod(pod);
    }

    /// Counters held (bounded by the capacity).
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }
}

struct Inner {
    /// `[previous, current]`.
    epochs: [Sketch; 2],
    epoch_start: Instant,
    /// When counting began (a fresh sketch covers only the time since).
    since: Instant,
    /// The settings the sketch was built for (a reload that changes the capacity or window
    /// starts afresh).
    capacity: usize,
    window: Duration,
}

impl Inner {
    fn half(&self) -> Duration {
        self.window / 2
    }

    /// Moves the epochs along to `now`.
    fn rotate(&mut self, now: Instant) {
        let half = self.half().max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(self.epoch_start);
        if elapsed < half {
            return;
        }
        if elapsed >= half * 2 {
            self.epochs = Default::default();
            self.epoch_start = now;
            self.since = now;
        } else {
            let [prev, cur] = &mut self.epochs;
            *prev = std::mem::take(cur);
            self.epoch_start += half;
        }
    }
}

/// One endpoint's hot keys (see the module docs).
pub struct HotKeys {
    inner: Mutex<Inner>,
    /// The hashes of the keys the local cache may hold, recomputed at most every
    /// [`ELIGIBLE_REFRESH`] by the first session that asks (see [`HotKeys::cache_eligible`]).
    eligible: RwLock<Eligible>,
}

/// How often the local cache's eligible set is recomputed from the sketch.
pub const ELIGIBLE_REFRESH: Duration = Duration::from_millis(250);

/// One key's counts over both epochs.
#[derive(Default)]
struct Merged {
    count: u64,
    reads: u64,
    writes: u64,
    /// The key, when it is stored whole.
    key: Option<Vec<u8>>,
}

#[derive(Default)]
struct Eligible {
    at: Option<Instant>,
    hashes: std::collections::HashSet<u64>,
}

impl Default for HotKeys {
    fn default() -> Self {
        let s = HotKeySettings::default();
        Self {
            inner: Mutex::new(Inner {
                epochs: Default::default(),
                epoch_start: Instant::now(),
                since: Instant::now(),
                capacity: s.capacity as usize,
                window: Duration::from_secs(s.window_s.into()),
            }),
            eligible: RwLock::default(),
        }
    }
}

/// A tracked key, as shown (`/hotkeys`, the CLI, the metrics).
#[derive(Debug, Clone, Serialize)]
pub struct HotKey {
    pub rank: usize,
    pub key: String,
    pub key_bytes: usize,
    pub ops_per_s: f64,
    /// Operations in the window (scaled back by the sample rate), and the reads and writes of
    /// them (the rest: neither, like TYPE or EXPIRE... by the command table).
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    /// The space-saving over-estimate bound of `ops` (scaled).
    pub error: u64,
    pub pods: Vec<HotPod>,
    /// In the endpoint's local cache now (`local_cache`).
    pub cached: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct HotPod {
    pub pod: String,
    pub ops: u64,
    pub ops_per_s: f64,
}

/// One endpoint's snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointHotKeys {
    pub endpoint: String,
    pub window_s: u32,
    /// The seconds the counts cover (between half the window and the window).
    pub covered_s: f64,
    pub sample_rate: u32,
    /// Sampled keyed operations in the window, scaled back.
    pub ops: u64,
    pub keys: Vec<HotKey>,
    /// The endpoint's local cache (`local_cache`): live, keys, bytes, hits...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_cache: Option<serde_json::Value>,
}

impl HotKeys {
    /// Counts a session's buffered samples (one lock).
    pub fn record(
        &self,
        pod: &Arc<PodStats>,
        samples: &[(Bytes, Op)],
        s: &HotKeySettings,
        now: Instant,
    ) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let capacity = s.capacity.max(s.top_k).max(1) as usize;
        let window = Duration::from_secs(s.window_s.max(1).into());
        if g.capacity != capacity || g.window != window {
            *g = Inner {
                epochs: Default::default(),
                epoch_start: now,
                since: now,
                capacity,
                window,
            };
        }
        g.rotate(now);
        let [_, cur] = &mut g.epochs;
        for (k, op) in samples {
            cur.add(k, *op, pod, capacity);
        }
    }

    /// The top keys over the window as of `now`.
    pub fn snapshot(
        &self,
        endpoint: &str,
        s: &HotKeySettings,
        top: usize,
        now: Instant,
    ) -> EndpointHotKeys {
        self.snapshot_with(endpoint, s, top, now, &|_| false)
    }

    /// [`Self::snapshot`], with `cached` telling which keys the local cache holds (by their
    /// stored bytes: a key longer than [`MAX_STORED_KEY`] never shows as cached).
    pub fn snapshot_with(
        &self,
        endpoint: &str,
        s: &HotKeySettings,
        top: usize,
        now: Instant,
        cached: &dyn Fn(&[u8]) -> bool,
    ) -> EndpointHotKeys {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.rotate(now);
        let covered = (g.half() + now.saturating_duration_since(g.epoch_start))
            .min(g.window)
            .min(now.saturating_duration_since(g.since));
        // At least 100 ms: a sketch a moment old does not report a burst as a huge rate.
        let covered_s = covered.as_secs_f64().max(0.1);
        let mut merged: HashMap<u64, Counter> = HashMap::new();
        let mut total = 0;
        for e in &g.epochs {
            total += e.total;
            for c in &e.counters {
                match merged.get_mut(&c.hash) {
                    Some(m) => {
                        m.count += c.count;
                        m.error += c.error;
                        m.reads += c.reads;
                        m.writes += c.writes;
                        for p in &c.pods {
                            match m.pods.iter_mut().find(|q| q.pod.cookie == p.pod.cookie) {
                                Some(q) => q.count += p.count,
                                None => m.pods.push(p.clone()),
                            }
                        }
                    }
                    None => {
                        merged.insert(c.hash, c.clone());
                    }
                }
            }
        }
        drop(g);
        let mut list: Vec<Counter> = merged.into_values().collect();
        list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        list.truncate(top);
        let rate = u64::from(s.sample_rate.max(1));
        let keys = list
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                c.pods.sort_by_key(|p| std::cmp::Reverse(p.count));
                c.pods.truncate(POD_SLOTS);
                HotKey {
                    cached: c.len == c.key.len() && cached(&c.key),
                    rank: i + 1,
                    key: show_key(&c.key, c.len, c.hash, s.key_display),
                    key_bytes: c.len,
                    ops_per_s: (c.count * rate) as f64 / covered_s,
                    ops: c.count * rate,
                    reads: c.reads * rate,
                    writes: c.writes * rate,
                    error: c.error * rate,
                    pods: c
                        .pods
                        .iter()
                        .map(|p| HotPod {
                            pod: p.pod.name(),
                            ops: p.count * rate,
                            ops_per_s: (p.count * rate) as f64 / covered_s,
                        })
                        .collect(),
                }
            })
            .collect();
        EndpointHotKeys {
            endpoint: endpoint.to_string(),
            window_s: s.window_s,
            covered_s,
            sample_rate: s.sample_rate,
            ops: total * rate,
            keys,
            local_cache: None,
        }
    }

    /// Every key counted in either epoch, merged by hash, and the seconds the counts cover.
    fn merged(&self, now: Instant) -> (HashMap<u64, Merged>, f64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.rotate(now);
        let covered = (g.half() + now.saturating_duration_since(g.epoch_start))
            .min(g.window)
            .min(now.saturating_duration_since(g.since));
        let covered_s = covered.as_secs_f64().max(0.1);
        let mut merged: HashMap<u64, Merged> = HashMap::new();
        for e in &g.epochs {
            for c in &e.counters {
                let m = merged.entry(c.hash).or_insert_with(|| Merged {
                    // Keys longer than MAX_STORED_KEY are not kept whole.
                    key: (c.len == c.key.len()).then(|| c.key.clone()),
                    ..Merged::default()
                });
                m.count += c.count;
                m.reads += c.reads;
                m.writes += c.writes;
            }
        }
        (merged, covered_s)
    }

    /// The keys above `min_ops_per_s` over the window as of `now`, whole (keys longer than
    /// [`MAX_STORED_KEY`] are not kept whole and are left out), with their rate: what the
    /// automatic key throttle acts on ([`crate::keyrules::auto_round`]).
    pub fn over(
        &self,
        min_ops_per_s: f64,
        s: &HotKeySettings,
        now: Instant,
    ) -> Vec<(Vec<u8>, f64)> {
        let (merged, covered_s) = self.merged(now);
        let rate = s.sample_rate.max(1) as f64;
        merged
            .into_values()
            .filter_map(|m| Some((m.key?, m.count as f64 * rate / covered_s)))
            .filter(|(_, r)| *r > min_ops_per_s)
            .collect()
    }

    /// Whether `key` is hot and read-mostly: at least `min_ops` operations per second over the
    /// window (scaled by the sample rate) and at least `min_read_ratio` of its reads and
    /// writes are reads. A set lookup on the command path; the set is recomputed from the
    /// sketch at most every [`ELIGIBLE_REFRESH`] (by whichever session asks first).
    pub fn cache_eligible(
        &self,
        key: &[u8],
        s: &HotKeySettings,
        min_ops: u32,
        min_read_ratio: f64,
        now: Instant,
    ) -> bool {
        if !s.enabled {
            return false;
        }
        let h = key_hash(key);
        {
            let g = self.eligible.read().unwrap_or_else(|p| p.into_inner());
            if g.at
                .is_some_and(|t| now.saturating_duration_since(t) < ELIGIBLE_REFRESH)
            {
                return g.hashes.contains(&h);
            }
        }
        let hashes = self.eligible_hashes(s, min_ops, min_read_ratio, now);
        let found = hashes.contains(&h);
        // Another session refreshing at the same time: its set is as good.
        if let Ok(mut g) = self.eligible.try_write() {
            *g = Eligible {
                at: Some(now),
                hashes,
            };
        }
        found
    }

    /// The hashes of the keys at or over `min_ops`/s with at least `min_read_ratio` reads.
    fn eligible_hashes(
        &self,
        s: &HotKeySettings,
        min_ops: u32,
        min_read_ratio: f64,
        now: Instant,
    ) -> std::collections::HashSet<u64> {
        let (merged, covered_s) = self.merged(now);
        let rate = f64::from(s.sample_rate.max(1));
        merged
            .into_iter()
            .filter(|(_, m)| {
                let rw = m.reads + m.writes;
                m.count as f64 * rate / covered_s >= f64::from(min_ops)
                    && rw > 0
                    && m.reads as f64 >= min_read_ratio * rw as f64
            })
            .map(|(h, _)| h)
            .collect()
    }

    /// Counters held in both epochs (bounded by twice the capacity).
    pub fn tracked(&self) -> usize {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.epochs.iter().map(Sketch::len).sum()
    }
}

/// What the admin endpoint and the metrics read: the endpoints served and the settings.
pub struct HotKeysView {
    shared: Arc<Shared>,
    endpoints: RwLock<Vec<Arc<EndpointHandle>>>,
}

impl std::fmt::Debug for HotKeysView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotKeysView").finish_non_exhaustive()
    }
}

impl HotKeysView {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            shared,
            endpoints: RwLock::new(Vec::new()),
        })
    }

    /// The endpoints served now (replaced on reload).
    pub fn set_endpoints(&self, eps: Vec<Arc<EndpointHandle>>) {
        *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) = eps;
    }

    /// The endpoints served now.
    pub fn endpoints(&self) -> Vec<Arc<EndpointHandle>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every endpoint's top `top_k` keys (`endpoint`: only that one).
    pub fn snapshot(&self, endpoint: Option<&str>) -> Vec<EndpointHotKeys> {
        let s = self.shared.settings();
        let hk = &s.hotkeys;
        let now = Instant::now();
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|h| endpoint.is_none_or(|e| e == h.name))
            .map(|h| {
                let rt = h.current();
                let on = s.local_cache.applies_to(&h.name);
                let cache = &rt.cache;
                let mut snap = h
                    .hotkeys
                    .snapshot_with(&h.name, hk, hk.top_k as usize, now, &|k| {
                        on && cache.contains(k)
                    });
                if on {
                    snap.local_cache = Some(cache.json());
                }
                snap
            })
            .collect()
    }

    /// `/hotkeys`: JSON.
    pub fn json(&self, endpoint: Option<&str>) -> serde_json::Value {
        let hk = self.shared.settings().hotkeys.clone();
        serde_json::json!({
            "enabled": hk.enabled,
            "key_display": hk.key_display,
            "endpoints": self.snapshot(endpoint),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HotKeyLabels {
    endpoint: String,
    rank: String,
    key: String,
}

/// The `datamesh_proxy_hotkey_ops_per_second` collector: made at each scrape from the
/// sketches, so only the current top `metrics_top` keys of each endpoint exist (a key that
/// left the top is gone at the next scrape; label values are bounded by rank).
#[derive(Debug)]
pub struct HotKeysCollector(pub Arc<HotKeysView>);

impl prometheus_client::collector::Collector for HotKeysCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.shared.settings();
        let hk = &s.hotkeys;
        if !hk.enabled || hk.metrics_top == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let eps = self
            .0
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut family = encoder.encode_descriptor(
            "proxy_hotkey_ops_per_second",
            "Operations per second of the endpoint's hottest keys over hotkeys.window_s (top hotkeys.metrics_top; keys shown as hotkeys.key_display)",
            None,
            MetricType::Gauge,
        )?;
        for h in &eps {
            let snap = h
                .hotkeys
                .snapshot(&h.name, hk, hk.metrics_top as usize, now);
            for k in snap.keys {
                let labels = HotKeyLabels {
                    endpoint: h.name.clone(),
                    rank: k.rank.to_string(),
                    key: k.key,
                };
                let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
                g.set(k.ops_per_s);
                g.encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::PodStats;

    fn pod(cookie: u64, name: &str) -> Arc<PodStats> {
        Arc::new(PodStats::new(cookie, name.to_string(), 0, 0))
    }

    fn settings() -> HotKeySettings {
        HotKeySettings::default()
    }

    /// What detection costs a command: the sampler's look at each command and, once per
    /// dispatch round, the hand-over of what it sampled (one lock), at rounds of 1 and 16
    /// commands (pipeline 1 and 16), keys spread over 100,000 (release:
    /// `cargo test --release -p datamesh-proxy --lib hotkeys::tests::cost -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost() {
        let hk = HotKeys::default();
        // The default rate (1 in 8), whatever the unit tests' settings use.
        let s = HotKeySettings {
            sample_rate: 8,
            ..settings()
        };
        let p = pod(1, "p");
        let cmds: Vec<Command> = (0..100_000)
            .map(|i| {
                Command::from_args(
                    ["GET".to_string(), format!("user:{i}")]
                        .into_iter()
                        .map(Bytes::from),
                )
            })
            .collect();
        for round in [1usize, 16] {
            let mut sm = Sampler::default();
            let n = 10_000_000usize;
            let start = std::time::Instant::now();
            for i in 0..n {
                let c = &cmds[i % cmds.len()];
                if sm.consider(std::hint::black_box(c), s.sample_rate) {
                    sm.flush(&hk, &p, &s);
                }
                sm.next();
                if i % round == round - 1 {
                    sm.flush(&hk, &p, &s);
                }
            }
            let ns = start.elapsed().as_nanos() as f64 / n as f64;
            eprintln!(
                "rounds of {round}: {ns:.1} ns per command (sample 1 in {})",
                s.sample_rate
            );
        }
    }

    /// A Zipf-ish stream: key `i` (1-based) about `n / i` times, over 5000 distinct keys,
    /// interleaved; plus one pod hammering `hot`.
    #[test]
    fn zipf_stream_top_keys_are_found_and_memory_stays_bounded() {
        let hk = HotKeys::default();
        let s = settings();
        let a = pod(1, "app");
        let b = pod(2, "hammer");
        let t0 = Instant::now();
        let mut batch = Vec::new();
        let mut x: u64 = 12345;
        for round in 0..200_000u64 {
            // A cheap PRNG drawing a Zipf-ish rank: 1/u over [1, 5000].
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x % 10_000) as f64 / 10_000.0 + 1e-4;
            let rank = ((1.0 / u) as u64).clamp(1, 5000);
            let op = if round % 4 == 0 { Op::Write } else { Op::Read };
            batch.push((Bytes::from(format!("key:{rank}")), op));
            if batch.len() == 32 {
                hk.record(&a, &batch, &s, t0);
                batch.clear();
            }
            {
                hk.record(&b, &[(Bytes::from_static(b"hot"), Op::Write)], &s, t0);
            }
        }
        let snap = hk.snapshot("ep", &s, 5, t0 + Duration::from_secs(1));
        let names: Vec<&str> = snap.keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(names[0], "hot", "{names:?}");
        assert_eq!(snap.keys[0].pods[0].pod, "hammer");
        assert_eq!(snap.keys[0].writes, snap.keys[0].ops - snap.keys[0].error);
        for k in ["key:1", "key:2", "key:3"] {
            assert!(names.contains(&k), "{k} missing from {names:?}");
        }
        let k1 = snap.keys.iter().find(|k| k.key == "key:1").expect("key:1");
        assert_eq!(k1.pods.len(), 1);
        assert_eq!(k1.pods[0].pod, "app");
        assert!(k1.reads > k1.writes * 2, "{k1:?}");
        // Bounded: never more than the capacity per epoch, whatever the distinct keys.
        assert!(hk.tracked() <= 2 * DEFAULT_CAPACITY as usize);
    }

    #[test]
    fn window_expiry_forgets_old_keys() {
        let hk = HotKeys::default();
        let s = HotKeySettings {
            window_s: 10,
            ..settings()
        };
        let p = pod(1, "p");
        let t0 = Instant::now();
        hk.record(&p, &[(Bytes::from_static(b"old"), Op::Read)], &s, t0);
        // 6 s later: "old" is in the previous epoch, still shown.
        let t1 = t0 + Duration::from_secs(6);
        hk.record(&p, &[(Bytes::from_static(b"new"), Op::Read)], &s, t1);
        let keys = |t| -> Vec<String> {
            hk.snapshot("e", &s, 10, t)
                .keys
                .into_iter()
                .map(|k| k.key)
                .collect()
        };
        assert_eq!(keys(t1).len(), 2);
        // 11 s: "old"'s epoch is gone, "new"'s is the previous one.
        assert_eq!(keys(t0 + Duration::from_secs(11)), vec!["new".to_string()]);
        // 30 s: all gone.
        assert!(keys(t0 + Duration::from_secs(30)).is_empty());
    }

    #[test]
    fn rates_scale_with_the_sample_rate() {
        let hk = HotKeys::default();
        let s = HotKeySettings {
            sample_rate: 10,
            ..settings()
        };
        let p = pod(1, "p");
        let t0 = Instant::now();
        let batch: Vec<_> = (0..50)
            .map(|_| (Bytes::from_static(b"k"), Op::Read))
            .collect();
        hk.record(&p, &batch, &s, t0);
        // 5 s later the first epoch is the previous one: the counts cover 5 s.
        let snap = hk.snapshot("e", &s, 10, t0 + Duration::from_secs(5));
        assert_eq!(snap.keys[0].ops, 500);
        assert!((snap.keys[0].ops_per_s - 100.0).abs() < 1.0, "{snap:?}");
    }

    #[test]
    fn first_keys_and_ops_by_the_table() {
        let cmd = |args: &[&str]| Command::from_args(args.iter().map(|a| a.as_bytes().to_vec()));
        let first = |args: &[&str]| {
            let c = cmd(args);
            let spec = commands::lookup(c.name()).expect("known");
            first_key(spec, &c).map(|i| String::from_utf8_lossy(&c.args[i]).into_owned())
        };
        assert_eq!(first(&["GET", "a"]).as_deref(), Some("a"));
        assert_eq!(first(&["MSET", "a", "1", "b", "2"]).as_deref(), Some("a"));
        assert_eq!(first(&["EVAL", "s", "1", "k", "x"]).as_deref(), Some("k"));
        assert_eq!(first(&["EVAL", "s", "0"]), None);
        assert_eq!(first(&["PING"]), None);
        assert_eq!(
            first(&["XREAD", "STREAMS", "s1", "0"]).as_deref(),
            Some("s1")
        );
        let op = |n: &str| Op::of(commands::lookup(n.as_bytes()).expect("known"));
        assert_eq!(op("get"), Op::Read);
        assert_eq!(op("set"), Op::Write);
    }

    #[test]
    fn cache_eligible_keys_are_hot_and_read_mostly() {
        let hk = HotKeys::default();
        let s = HotKeySettings {
            sample_rate: 1,
            ..settings()
        };
        let p = pod(1, "p");
        let t0 = Instant::now();
        let mut batch = Vec::new();
        for i in 0..1000 {
            batch.push((Bytes::from_static(b"hot-read"), Op::Read));
            // 1 write in 5: 80 % reads.
            let op = if i % 5 == 0 { Op::Write } else { Op::Read };
            batch.push((Bytes::from_static(b"hot-mixed"), op));
        }
        for _ in 0..10 {
            batch.push((Bytes::from_static(b"cold"), Op::Read));
        }
        hk.record(&p, &batch, &s, t0);
        // 5 s later: the counts cover 5 s: 200 ops/s for the hot keys, 2 for the cold one.
        let t = t0 + Duration::from_secs(5);
        assert!(hk.cache_eligible(b"hot-read", &s, 100, 0.9, t));
        assert!(!hk.cache_eligible(b"hot-mixed", &s, 100, 0.9, t));
        assert!(!hk.cache_eligible(b"cold", &s, 100, 0.9, t));
        assert!(!hk.cache_eligible(b"never-seen", &s, 100, 0.9, t));
        // The set is kept for ELIGIBLE_REFRESH, then recomputed with the new thresholds.
        let later = t + ELIGIBLE_REFRESH;
        assert!(hk.cache_eligible(b"hot-mixed", &s, 100, 0.8, later));
        assert!(!hk.cache_eligible(b"hot-read", &s, 1000, 0.9, later + ELIGIBLE_REFRESH));
        // Detection off: nothing is eligible.
        let off = HotKeySettings {
            enabled: false,
            ..s
        };
        assert!(!hk.cache_eligible(b"hot-read", &off, 1, 0.0, later));
    }

    #[test]
    fn sampler_counts_a_waiting_command_once_and_every_next_one() {
        let cmd = Command::from_args(["GET", "k"]);
        // The same bytes again, as a client sending one command per round trip gets them
        // from its reused read buffer.
        let again = cmd.clone();
        let mut s = Sampler::default();
        s.consider(&cmd, 1);
        s.consider(&cmd, 1); // still at the front (a barrier): not counted again
        s.next();
        s.consider(&again, 1);
        assert_eq!(s.buf.len(), 2);
    }

    #[test]
    fn sampler_samples_one_in_n() {
        let mut s = Sampler::default();
        let n = (0..100).filter(|_| s.due(10)).count();
        assert_eq!(n, 10);
        let mut s = Sampler::default();
        assert_eq!((0..100).filter(|_| s.due(1)).count(), 100);
        assert_eq!((0..100).filter(|_| s.due(0)).count(), 100);
    }
}
