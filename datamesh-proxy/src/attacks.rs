//! Key-attack detection: cache penetration and key scanning, per pod and endpoint, with alerts
//! and an optional automatic throttle of the suspected pod.
//!
//! What is counted (no per-key state, ever):
//! - lookups and misses of the read commands in [`look_of`]: GET, GETEX, GETDEL, HGET, LINDEX,
//!   ZSCORE (one lookup each; a nil reply, RESP2 `$-1`/`*-1` or RESP3 `_`, is a miss), MGET and
//!   HMGET (one lookup per key or field; each nil element is a miss) and EXISTS (one lookup per
//!   key; `keys - reply` are misses). Error replies count as neither. SISMEMBER and the like
//!   are not lookups: a 0 there answers a question about a member, not a missing cache entry.
//! - key scans: SCAN, HSCAN, SSCAN, ZSCAN, KEYS and RANDOMKEY (one each).
//!
//! Only commands forwarded on the shared lane are looked at (the one place a session tags a
//! command, [`Look`]); commands queued in a transaction are not. The session counts into a
//! [`Tally`] of its own and adds it to its pod-and-endpoint [`Counters`] (three relaxed atomic
//! adds) once per dispatch round; only tagged replies are inspected, without allocation.
//!
//! Once a second [`Attacks::tick`] looks at every pod-and-endpoint's totals over the sliding
//! window (`attacks.window_s`, a ring of one total per second): a pod is suspected of cache
//! penetration when its lookups are at least `penetration_min_reads` and its misses at least
//! `penetration_miss_ratio` of them, and of key scanning when its scans are over
//! `scan_max_per_s` on average over the window. A pod becoming suspected is logged (a warning,
//! at most one per pod, endpoint and kind per [`WARN_EVERY`]), set in
//! `datamesh_proxy_pod_suspected`, and listed at `/attacks`. With `auto_throttle` on, the pod
//! gets a temporary command-rate limit ([`crate::accounting::PodStats::set_auto_throttle`]) of
//! `auto_throttle_rate` for `auto_throttle_s` seconds, on every endpoint (like its configured
//! limit); then its configured limit applies again (re-applied if it is still suspected).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::accounting::{PodLabels, PodRegistry, PodStats};
use crate::commands::CommandSpec;
use crate::metrics::PodEndpointLabels;
use crate::ratelog::RateLimited;
use crate::resp::Command;
use crate::shared::Shared;
use crate::stopped;

pub const DEFAULT_WINDOW_S: u32 = 10;
pub const DEFAULT_PENETRATION_MIN_READS: u64 = 1000;
pub const DEFAULT_PENETRATION_MISS_RATIO: f64 = 0.9;
pub const DEFAULT_SCAN_MAX_PER_S: u32 = 50;
pub const DEFAULT_AUTO_THROTTLE_RATE: u32 = 100;
pub const DEFAULT_AUTO_THROTTLE_S: u32 = 60;
/// At most one "suspected" warning per pod, endpoint and kind this often.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// `attacks:` settings (part of the session settings, swapped on reload).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttackSettings {
    /// Detection on (cheap: a name match per forwarded command, a header look per lookup
    /// reply).
    pub enabled: bool,
    /// The sliding window, in seconds.
    pub window_s: u32,
    /// Lookups in the window before the miss ratio means anything.
    pub penetration_min_reads: u64,
    /// Misses / lookups at or over this is penetration (0 < ratio <= 1).
    pub penetration_miss_ratio: f64,
    /// Scans per second (average over the window) over this is key scanning.
    pub scan_max_per_s: u32,
    /// Throttle a suspected pod automatically (off by default).
    pub auto_throttle: bool,
    /// Its command rate meanwhile (commands/s, all its endpoints).
    pub auto_throttle_rate: u32,
    /// For this many seconds.
    pub auto_throttle_s: u32,
}

// The ratio is a validated finite number: bitwise equality is equality (config reload compares
// the whole config).
impl PartialEq for AttackSettings {
    fn eq(&self, o: &Self) -> bool {
        self.enabled == o.enabled
            && self.window_s == o.window_s
            && self.penetration_min_reads == o.penetration_min_reads
            && self.penetration_miss_ratio.to_bits() == o.penetration_miss_ratio.to_bits()
            && self.scan_max_per_s == o.scan_max_per_s
            && self.auto_throttle == o.auto_throttle
            && self.auto_throttle_rate == o.auto_throttle_rate
            && self.auto_throttle_s == o.auto_throttle_s
    }
}

impl Eq for AttackSettings {}

impl Default for AttackSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: DEFAULT_WINDOW_S,
            penetration_min_reads: DEFAULT_PENETRATION_MIN_READS,
            penetration_miss_ratio: DEFAULT_PENETRATION_MISS_RATIO,
            scan_max_per_s: DEFAULT_SCAN_MAX_PER_S,
            auto_throttle: false,
            auto_throttle_rate: DEFAULT_AUTO_THROTTLE_RATE,
            auto_throttle_s: DEFAULT_AUTO_THROTTLE_S,
        }
    }
}

/// What a reply slot's reply is inspected for (set at dispatch; `None` for every command
/// outside the lookup set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Look {
    #[default]
    None,
    /// One lookup: a nil reply is a miss.
    One,
    /// An array of lookups (MGET, HMGET): each nil element is a miss.
    Many,
    /// EXISTS of this many keys: the reply counts those that exist.
    Exists(u32),
}

impl Look {
    pub fn is_some(self) -> bool {
        self != Look::None
    }
}

/// What a forwarded command is for the detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Other,
    Lookup(Look),
    Scan,
}

/// The class of a command by its table entry (a match on the name: no allocation).
#[inline]
pub fn look_of(spec: &CommandSpec, cmd: &Command) -> Class {
    match spec.name {
        "get" | "getex" | "getdel" | "hget" | "lindex" | "zscore" => Class::Lookup(Look::One),
        "mget" | "hmget" => Class::Lookup(Look::Many),
        "exists" => Class::Lookup(Look::Exists(
            u32::try_from(cmd.args.len().saturating_sub(1)).unwrap_or(u32::MAX),
        )),
        "scan" | "hscan" | "sscan" | "zscan" | "keys" | "randomkey" => Class::Scan,
        _ => Class::Other,
    }
}

/// (lookups, misses) a reply to a `look` command stands for; (0, 0) for errors and replies of
/// another shape.
pub fn misses(look: Look, raw: &[u8]) -> (u64, u64) {
    match look {
        Look::None => (0, 0),
        Look::One => match raw.first() {
            Some(b'-') | Some(b'!') | None => (0, 0),
            _ => (1, u64::from(is_nil(raw))),
        },
        Look::Many => many(raw),
        Look::Exists(n) => match int_reply(raw) {
            Some(found) => {
                let n = u64::from(n);
                (n, n.saturating_sub(found))
            }
            None => (0, 0),
        },
    }
}

/// A nil reply: RESP2 `$-1` or `*-1`, RESP3 `_`.
pub fn is_nil(raw: &[u8]) -> bool {
    raw.starts_with(b"$-1\r") || raw.starts_with(b"*-1\r") || raw.starts_with(b"_\r")
}

/// `:n` → n.
fn int_reply(raw: &[u8]) -> Option<u64> {
    let rest = raw.strip_prefix(b":")?;
    let (n, _) = header_num(rest)?;
    u64::try_from(n).ok()
}

/// The number before the `\r\n` at the start of `rest`, and the bytes after it.
#[inline]
fn header_num(rest: &[u8]) -> Option<(i64, &[u8])> {
    let (neg, digits) = match rest.first() {
        Some(b'-') => (true, rest.get(1..)?),
        _ => (false, rest),
    };
    let mut n: i64 = 0;
    let mut len = 0;
    for &b in digits.iter().take(19) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
        len += 1;
    }
    if len == 0 || digits.get(len) != Some(&b'\r') {
        return None;
    }
    Some((
        if neg { -n } else { n },
        digits.get(len + 2..).unwrap_or(&[]),
    ))
}

/// Walks an array of bulk strings and nils (MGET, HMGET replies in RESP2 and RESP3) by their
/// headers (values are skipped by length, never read).
fn many(raw: &[u8]) -> (u64, u64) {
    let Some(rest) = raw.strip_prefix(b"*") else {
        return (0, 0);
    };
    let Some((n, mut rest)) = header_num(rest) else {
        return (0, 0);
    };
    let mut seen = 0u64;
    let mut nils = 0u64;
    for _ in 0..n.max(0) {
        match rest.first() {
            Some(b'_') => {
                nils += 1;
                rest = rest.get(3..).unwrap_or(&[]);
            }
            Some(b'$') => match header_num(rest.get(1..).unwrap_or(&[])) {
                Some((-1, after)) => {
                    nils += 1;
                    rest = after;
                }
                Some((len, after)) => {
                    let skip = usize::try_from(len).unwrap_or(usize::MAX).saturating_add(2);
                    rest = after.get(skip..).unwrap_or(&[]);
                }
                None => break,
            },
            // Another element type: what was seen so far counts.
            _ => break,
        }
        seen += 1;
    }
    (seen, nils)
}

/// A session's counts since its last flush.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub lookups: u64,
    pub misses: u64,
    pub scans: u64,
}

impl Tally {
    #[inline]
    pub fn reply(&mut self, look: Look, raw: &[u8]) {
        let (l, m) = misses(look, raw);
        self.lookups += l;
        self.misses += m;
    }

    /// Adds the counts to `c` (three relaxed adds) and starts again.
    #[inline]
    pub fn flush(&mut self, c: &Entry) {
        if self.lookups | self.scans == 0 {
            return;
        }
        c.counters
            .lookups
            .fetch_add(self.lookups, Ordering::Relaxed);
        c.counters.misses.fetch_add(self.misses, Ordering::Relaxed);
        c.counters.scans.fetch_add(self.scans, Ordering::Relaxed);
        *self = Tally::default();
    }
}

/// A pod's totals on one endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    lookups: AtomicU64,
    misses: AtomicU64,
    scans: AtomicU64,
}

impl Counters {
    fn load(&self) -> [u64; 3] {
        [
            self.lookups.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.scans.load(Ordering::Relaxed),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Penetration,
    Scan,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Penetration => "penetration",
            Kind::Scan => "scan",
        }
    }

    /// What the pod's throttle error adds when this suspicion set it.
    pub fn throttle_note(self) -> &'static str {
        match self {
            Kind::Penetration => " (automatic: suspected cache penetration)",
            Kind::Scan => " (automatic: suspected key scanning)",
        }
    }
}

/// What the ticker keeps of one pod and endpoint.
struct Window {
    /// Totals at each of the last `window_s + 1` ticks, oldest first.
    ring: VecDeque<[u64; 3]>,
    /// Totals already added to the metrics.
    flushed: [u64; 3],
    /// Unix seconds since when suspected, per kind (penetration, scan).
    since: [Option<u64>; 2],
    warn: [RateLimited; 2],
    /// The same bound for "no longer suspected" (a pod hovering at a threshold).
    cleared: [RateLimited; 2],
    /// The window's counts as of the last tick.
    last: [u64; 3],
}

/// One pod on one endpoint: the counters its sessions add to, and the ticker's window.
pub struct Entry {
    endpoint: String,
    pod: Arc<PodStats>,
    counters: Counters,
    window: Mutex<Window>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SuspectLabels {
    pub endpoint: String,
    pub pod: String,
    pub kind: String,
}

/// `datamesh_proxy_pod_{suspected,lookups_total,misses_total,scans_total,auto_throttled}`.
/// Series per pod and endpoint: bounded by the pods of the node, like every per-pod metric.
#[derive(Default)]
pub struct AttackMetrics {
    pub suspected: Family<SuspectLabels, Gauge>,
    pub lookups: Family<PodEndpointLabels, Counter>,
    pub misses: Family<PodEndpointLabels, Counter>,
    pub scans: Family<PodEndpointLabels, Counter>,
    pub auto_throttled: Family<PodLabels, Gauge>,
}

impl AttackMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "proxy_pod_suspected",
            "1 while a pod is suspected of a key attack on an endpoint (kind = penetration | scan); see /attacks",
            self.suspected.clone(),
        );
        registry.register(
            "proxy_pod_lookups",
            "Key lookups (GET, MGET/HMGET per key, EXISTS per key ...) by endpoint and pod",
            self.lookups.clone(),
        );
        registry.register(
            "proxy_pod_misses",
            "Key lookups answered nil (or not existing) by endpoint and pod",
            self.misses.clone(),
        );
        registry.register(
            "proxy_pod_scans",
            "Key scans (SCAN, HSCAN, SSCAN, ZSCAN, KEYS, RANDOMKEY) by endpoint and pod",
            self.scans.clone(),
        );
        registry.register(
            "proxy_pod_auto_throttled",
            "1 while a pod's command rate is limited automatically (attacks.auto_throttle)",
            self.auto_throttled.clone(),
        );
    }
}

/// One row of `/attacks`: a suspected pod on an endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Suspect {
    pub endpoint: String,
    pub pod: String,
    pub kind: Kind,
    /// Unix seconds.
    pub since: u64,
    /// In the window.
    pub lookups: u64,
    pub misses: u64,
    pub miss_ratio: f64,
    pub scans_per_s: f64,
    /// Unix seconds until which the pod's command rate is limited automatically.
    pub auto_throttled_until: Option<u64>,
}

/// Every pod-and-endpoint's counters, the windows and the alerts.
pub struct Attacks {
    entries: Mutex<HashMap<(String, u64), Arc<Entry>>>,
    pods: Arc<PodRegistry>,
    pub metrics: Arc<AttackMetrics>,
    /// The settings of the last tick (for `/attacks`).
    settings: Mutex<AttackSettings>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Attacks {
    pub fn new(pods: Arc<PodRegistry>, metrics: Arc<AttackMetrics>) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            pods,
            metrics,
            settings: Mutex::new(AttackSettings::default()),
        }
    }

    /// The counters of `pod` on `endpoint` (once per connection).
    pub fn entry(&self, endpoint: &str, pod: &Arc<PodStats>) -> Arc<Entry> {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((endpoint.to_string(), pod.cookie))
            .or_insert_with(|| {
                Arc::new(Entry {
                    endpoint: endpoint.to_string(),
                    pod: pod.clone(),
                    counters: Counters::default(),
                    window: Mutex::new(Window {
                        // The counters start at 0 now: the first tick's window counts from here.
                        ring: VecDeque::from([[0; 3]]),
                        flushed: [0; 3],
                        since: [None, None],
                        warn: [RateLimited::new(WARN_EVERY), RateLimited::new(WARN_EVERY)],
                        cleared: [RateLimited::new(WARN_EVERY), RateLimited::new(WARN_EVERY)],
                        last: [0; 3],
                    }),
                })
            })
            .clone()
    }

    /// Every pod-and-endpoint entry now (a snapshot: the lock is held only to copy it).
    fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// One look at every window (once a second): metrics, suspicion, alerts, throttles.
    pub fn tick(&self, s: &AttackSettings) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = *s;
        let entries = self.entries();
        let now_ns = self.pods.now_ns();
        let wall = unix_now();
        // Per pod (its throttle covers all its endpoints): its name, whether throttled now.
        let mut throttled_pods: HashMap<u64, (String, bool, &Arc<PodStats>)> = HashMap::new();
        let mut idle = Vec::new();
        for e in &entries {
            let name = e.pod.name();
            let labels = PodEndpointLabels {
                endpoint: e.endpoint.clone(),
                pod: name.clone(),
            };
            let totals = e.counters.load();
            let mut w = e.window.lock().unwrap_or_else(|p| p.into_inner());
            let fam = [
                &self.metrics.lookups,
                &self.metrics.misses,
                &self.metrics.scans,
            ];
            if totals != w.flushed {
                // All three series once the pod counted anything (a 0 miss count is a figure).
                for (i, f) in fam.iter().enumerate() {
                    f.get_or_create(&labels)
                        .inc_by(totals[i].saturating_sub(w.flushed[i]));
                }
            }
            w.flushed = totals;
            w.ring.push_back(totals);
            while w.ring.len() > s.window_s as usize + 1 {
                w.ring.pop_front();
            }
            let oldest = w.ring.front().copied().unwrap_or(totals);
            let d = [
                totals[0].saturating_sub(oldest[0]),
                totals[1].saturating_sub(oldest[1]),
                totals[2].saturating_sub(oldest[2]),
            ];
            w.last = d;
            let verdict = if s.enabled {
                judge(s, d)
            } else {
                [false, false]
            };
            for (i, kind) in [Kind::Penetration, Kind::Scan].into_iter().enumerate() {
                let gauge = || {
                    self.metrics.suspected.get_or_create(&SuspectLabels {
                        endpoint: e.endpoint.clone(),
                        pod: name.clone(),
                        kind: kind.as_str().to_string(),
                    })
                };
                match (w.since[i].is_some(), verdict[i]) {
                    (false, true) => {
                        w.since[i] = Some(wall);
                        gauge().set(1);
                        if let Some(skipped) = w.warn[i].check() {
                            warn!(
                                endpoint = %e.endpoint,
                                pod = %name,
                                kind = kind.as_str(),
                                lookups = d[0],
                                misses = d[1],
                                scans = d[2],
                                window_s = s.window_s,
                                auto_throttle = s.auto_throttle,
                                not_logged = skipped,
                                "pod suspected of a key attack (see /attacks; logged at most once a minute per pod, endpoint and kind)"
                            );
                        }
                    }
                    (true, false) => {
                        w.since[i] = None;
                        gauge().set(0);
                        if let Some(skipped) = w.cleared[i].check() {
                            info!(endpoint = %e.endpoint, pod = %name, kind = kind.as_str(), not_logged = skipped, "pod no longer suspected of a key attack");
                        }
                    }
                    _ => {}
                }
                // Node-local clients (the pseudo-pod "node": trusted tools sharing one bucket)
                // are alerted on, never throttled automatically.
                if verdict[i]
                    && s.auto_throttle
                    && e.pod.cookie != 0
                    && e.pod.auto_throttle(now_ns).is_none()
                {
                    let until = now_ns
                        .saturating_add(u64::from(s.auto_throttle_s).saturating_mul(1_000_000_000));
                    e.pod.set_auto_throttle(s.auto_throttle_rate, until, kind);
                    warn!(
                        endpoint = %e.endpoint,
                        pod = %name,
                        kind = kind.as_str(),
                        rate = s.auto_throttle_rate,
                        seconds = s.auto_throttle_s,
                        "pod throttled automatically (attacks.auto_throttle): its command rate is limited on every endpoint until the time is up"
                    );
                }
            }
            let active = e.pod.auto_throttle(now_ns).is_some();
            let t = throttled_pods
                .entry(e.pod.cookie)
                .or_insert((name.clone(), false, &e.pod));
            t.1 |= active;
            let quiet = d == [0; 3] && w.since == [None, None] && !active;
            // Held by the map and this loop only: no session uses it.
            if quiet && Arc::strong_count(e) <= 2 {
                idle.push((e.endpoint.clone(), e.pod.cookie));
            }
        }
        for (name, active, pod) in throttled_pods.into_values() {
            if !active && pod.clear_expired_auto_throttle(now_ns) {
                info!(pod = %name, "automatic throttle of the pod expired: its configured command rate applies again");
            }
            let g = self
                .metrics
                .auto_throttled
                .get_or_create(&PodLabels { pod: name });
            g.set(i64::from(active));
        }
        drop(entries);
        if !idle.is_empty() {
            let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            for k in idle {
                if m.get(&k).is_some_and(|e| Arc::strong_count(e) == 1) {
                    m.remove(&k);
                }
            }
        }
    }

    /// The suspected pods, by endpoint then pod.
    pub fn suspects(&self) -> Vec<Suspect> {
        let s = *self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let entries = self.entries();
        let now_ns = self.pods.now_ns();
        let wall = unix_now();
        let mut out = Vec::new();
        for e in entries {
            let w = e.window.lock().unwrap_or_else(|p| p.into_inner());
            let until = e.pod.auto_throttle(now_ns).map(|(_, until_ns, _)| {
                wall + until_ns.saturating_sub(now_ns).div_ceil(1_000_000_000)
            });
            for (i, kind) in [Kind::Penetration, Kind::Scan].into_iter().enumerate() {
                let Some(since) = w.since[i] else { continue };
                let [lookups, misses, scans] = w.last;
                out.push(Suspect {
                    endpoint: e.endpoint.clone(),
                    pod: e.pod.name(),
                    kind,
                    since,
                    lookups,
                    misses,
                    miss_ratio: if lookups == 0 {
                        0.0
                    } else {
                        misses as f64 / lookups as f64
                    },
                    scans_per_s: scans as f64 / f64::from(s.window_s.max(1)),
                    auto_throttled_until: until,
                });
            }
        }
        out.sort_by(|a, b| {
            (a.endpoint.as_str(), a.pod.as_str(), a.kind.as_str()).cmp(&(
                b.endpoint.as_str(),
                b.pod.as_str(),
                b.kind.as_str(),
            ))
        });
        out
    }

    /// `/attacks`: `{"enabled", "window_s", "auto_throttle", "endpoints": {"<name>": [rows]}}`.
    pub fn json(&self) -> serde_json::Value {
        let s = *self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let mut eps = serde_json::Map::new();
        for r in self.suspects() {
            let rows = eps
                .entry(r.endpoint.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let (serde_json::Value::Array(a), Ok(v)) = (rows, serde_json::to_value(&r)) {
                a.push(v);
            }
        }
        serde_json::json!({
            "enabled": s.enabled,
            "window_s": s.window_s,
            "penetration_min_reads": s.penetration_min_reads,
            "penetration_miss_ratio": s.penetration_miss_ratio,
            "scan_max_per_s": s.scan_max_per_s,
            "auto_throttle": s.auto_throttle,
            "endpoints": eps,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// (penetration, scan) for the window's counts `d` = [lookups, misses, scans].
pub fn judge(s: &AttackSettings, d: [u64; 3]) -> [bool; 2] {
    let [lookups, misses, scans] = d;
    let penetration = lookups > 0
        && lookups >= s.penetration_min_reads
        && misses as f64 >= s.penetration_miss_ratio * lookups as f64;
    let scan = scans > u64::from(s.scan_max_per_s).saturating_mul(u64::from(s.window_s));
    [penetration, scan]
}

/// Ticks once a second until `stop`, with the settings in force.
pub fn spawn_ticker(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = tick.tick() => {
                    let s = shared.settings().attacks;
                    shared.attacks.tick(&s);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{PolicySource, Throttle};
    use crate::commands::lookup;
    use bytes::Bytes;

    fn class(args: &[&str]) -> Class {
        let cmd = Command::from_args(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())));
        let spec = lookup(cmd.name()).expect("known command");
        look_of(spec, &cmd)
    }

    #[test]
    fn lookup_set_and_scans() {
        assert_eq!(class(&["GET", "k"]), Class::Lookup(Look::One));
        assert_eq!(class(&["hget", "h", "f"]), Class::Lookup(Look::One));
        assert_eq!(class(&["MGET", "a", "b"]), Class::Lookup(Look::Many));
        assert_eq!(class(&["HMGET", "h", "a", "b"]), Class::Lookup(Look::Many));
        assert_eq!(
            class(&["EXISTS", "a", "b", "c"]),
            Class::Lookup(Look::Exists(3))
        );
        assert_eq!(class(&["SCAN", "0"]), Class::Scan);
        assert_eq!(class(&["KEYS", "*"]), Class::Scan);
        assert_eq!(class(&["RANDOMKEY"]), Class::Scan);
        assert_eq!(class(&["SET", "k", "v"]), Class::Other);
        assert_eq!(class(&["SISMEMBER", "s", "m"]), Class::Other);
    }

    #[test]
    fn nils_in_resp2_and_resp3() {
        assert_eq!(misses(Look::One, b"$-1\r\n"), (1, 1));
        assert_eq!(misses(Look::One, b"_\r\n"), (1, 1));
        assert_eq!(misses(Look::One, b"*-1\r\n"), (1, 1));
        assert_eq!(misses(Look::One, b"$3\r\nabc\r\n"), (1, 0));
        assert_eq!(misses(Look::One, b"$0\r\n\r\n"), (1, 0));
        assert_eq!(misses(Look::One, b"-WRONGTYPE x\r\n"), (0, 0));
        assert_eq!(misses(Look::One, b""), (0, 0));
        // MGET: RESP2 and RESP3 nils among values (a value that looks like a nil is skipped by
        // its length).
        assert_eq!(
            misses(
                Look::Many,
                b"*4\r\n$-1\r\n$5\r\n$-1\r\n\r\n_\r\n$2\r\nok\r\n"
            ),
            (4, 2)
        );
        assert_eq!(misses(Look::Many, b"*0\r\n"), (0, 0));
        assert_eq!(misses(Look::Many, b"-ERR x\r\n"), (0, 0));
        // Truncated or odd replies never panic and count what was seen.
        assert_eq!(misses(Look::Many, b"*3\r\n$-1\r\n$99\r\nab"), (2, 1));
        assert_eq!(misses(Look::Many, b"*2\r\n:1\r\n:2\r\n"), (0, 0));
        assert_eq!(misses(Look::Exists(3), b":1\r\n"), (3, 2));
        assert_eq!(misses(Look::Exists(1), b":1\r\n"), (1, 0));
        assert_eq!(misses(Look::Exists(1), b"-ERR\r\n"), (0, 0));
        assert_eq!(misses(Look::Exists(1), b":-5\r\n"), (0, 0));
        // Headers too long, without digits or without their CR: nothing counted, no panic.
        assert_eq!(misses(Look::Many, b"*9999999999999999999\r\n"), (0, 0));
        assert_eq!(misses(Look::Many, b"*\r\n"), (0, 0));
        assert_eq!(misses(Look::Many, b"*2"), (0, 0));
        assert_eq!(misses(Look::Many, b"*1\r\n$-\r\n"), (0, 0));
        assert_eq!(
            misses(Look::Exists(2), b":99999999999999999999999\r\n"),
            (0, 0)
        );
    }

    #[test]
    fn thresholds() {
        let s = AttackSettings {
            window_s: 10,
            penetration_min_reads: 1000,
            penetration_miss_ratio: 0.9,
            scan_max_per_s: 50,
            ..Default::default()
        };
        assert_eq!(judge(&s, [999, 999, 0]), [false, false]);
        assert_eq!(judge(&s, [1000, 900, 0]), [true, false]);
        assert_eq!(judge(&s, [1000, 899, 0]), [false, false]);
        assert_eq!(judge(&s, [0, 0, 500]), [false, false]);
        assert_eq!(judge(&s, [0, 0, 501]), [false, true]);
    }

    /// What detection costs a command (run in release: `cargo test --release -p datamesh-proxy
    /// --lib attacks::tests::cost -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost() {
        let cases: [(&[&str], &[u8]); 4] = [
            (&["GET", "user:1"], b"$5\r\nhello\r\n"),
            (&["GET", "user:1"], b"$-1\r\n"),
            (&["SET", "k", "v"], b"+OK\r\n"),
            (&["MGET", "a", "b"], b"*2\r\n$-1\r\n$1\r\nx\r\n"),
        ];
        for (args, reply) in cases {
            let c = Command::from_args(args.iter().map(|x| Bytes::copy_from_slice(x.as_bytes())));
            let spec = lookup(c.name()).expect("known");
            let mut t = Tally::default();
            let n = 20_000_000u32;
            let start = std::time::Instant::now();
            for _ in 0..n {
                match look_of(std::hint::black_box(spec), &c) {
                    Class::Lookup(l) => t.reply(l, std::hint::black_box(reply)),
                    Class::Scan => t.scans += 1,
                    Class::Other => {}
                }
            }
            let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
            eprintln!("{:<5} {ns:.1} ns per command; {t:?}", args[0]);
        }
    }

    fn attacks() -> (Arc<PodRegistry>, Attacks) {
        let pods = Arc::new(PodRegistry::new(None, PolicySource::default()));
        let a = Attacks::new(pods.clone(), Arc::default());
        (pods, a)
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_window_suspects_and_clears() {
        let (pods, a) = attacks();
        let s = AttackSettings {
            window_s: 3,
            penetration_min_reads: 100,
            ..Default::default()
        };
        let flood = pods.get(7);
        let bystander = pods.get(8);
        let ef = a.entry("cache", &flood);
        let eb = a.entry("cache", &bystander);
        for _ in 0..3 {
            let mut t = Tally::default();
            for _ in 0..50 {
                t.reply(Look::One, b"$-1\r\n");
                t.reply(Look::One, b"$1\r\nx\r\n");
            }
            t.flush(&eb);
            let mut t = Tally::default();
            for _ in 0..60 {
                t.reply(Look::Many, b"*2\r\n$-1\r\n_\r\n");
            }
            t.flush(&ef);
            a.tick(&s);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let sus = a.suspects();
        assert_eq!(sus.len(), 1, "{sus:?}");
        assert_eq!(sus[0].pod, "netns-7");
        assert_eq!(sus[0].kind, Kind::Penetration);
        assert!(sus[0].miss_ratio > 0.99);
        let g = a.metrics.suspected.get_or_create(&SuspectLabels {
            endpoint: "cache".into(),
            pod: "netns-7".into(),
            kind: "penetration".into(),
        });
        assert_eq!(g.get(), 1);
        let total = a.metrics.misses.get_or_create(&PodEndpointLabels {
            endpoint: "cache".into(),
            pod: "netns-7".into(),
        });
        assert_eq!(total.get(), 360);
        // Nothing more: out of the window after window_s ticks.
        for _ in 0..4 {
            a.tick(&s);
        }
        assert!(a.suspects().is_empty());
        assert_eq!(g.get(), 0);
        // Idle entries whose sessions are gone are forgotten.
        drop((ef, eb));
        a.tick(&s);
        assert!(a.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn scans_over_the_average() {
        let (pods, a) = attacks();
        let s = AttackSettings {
            window_s: 2,
            scan_max_per_s: 10,
            ..Default::default()
        };
        let e = a.entry("cache", &pods.get(3));
        let mut t = Tally {
            scans: 20,
            ..Default::default()
        };
        t.flush(&e);
        a.tick(&s);
        assert!(a.suspects().is_empty(), "20 scans in 2 s is 10/s: not over");
        t.scans = 1;
        t.flush(&e);
        a.tick(&s);
        let sus = a.suspects();
        assert_eq!(sus.len(), 1);
        assert_eq!(sus[0].kind, Kind::Scan);
    }

    #[tokio::test(start_paused = true)]
    async fn auto_throttle_tightens_then_expires() {
        let (pods, a) = attacks();
        let s = AttackSettings {
            window_s: 2,
            scan_max_per_s: 1,
            auto_throttle: true,
            auto_throttle_rate: 10,
            auto_throttle_s: 5,
            ..Default::default()
        };
        let p = pods.get(4);
        let bystander = pods.get(5);
        assert!(!p.limited());
        let e = a.entry("cache", &p);
        let mut t = Tally {
            scans: 100,
            ..Default::default()
        };
        t.flush(&e);
        a.tick(&s);
        assert!(p.limited());
        let (rate, _, kind) = p.auto_throttle(pods.now_ns()).expect("throttled");
        assert_eq!((rate, kind), (10, Kind::Scan));
        assert!(a.suspects()[0].auto_throttled_until.is_some());
        // 10/s, burst 1: the second command at once is refused (no delay allowed).
        assert_eq!(p.check(pods.now_ns(), Duration::ZERO), Throttle::Allow);
        assert_eq!(p.check(pods.now_ns(), Duration::ZERO), Throttle::Refuse);
        assert_eq!(p.throttle_note(pods.now_ns()), Kind::Scan.throttle_note());
        // The bystander is not limited.
        assert!(!bystander.limited());
        let g = a.metrics.auto_throttled.get_or_create(&PodLabels {
            pod: "netns-4".into(),
        });
        assert_eq!(g.get(), 1);
        // The scans leave the window; the throttle stays until its time is up.
        for _ in 0..3 {
            a.tick(&s);
        }
        assert!(a.suspects().is_empty());
        assert!(p.auto_throttle(pods.now_ns()).is_some());
        // Expiry: the configured limit (none) applies again.
        tokio::time::advance(Duration::from_secs(6)).await;
        a.tick(&s);
        assert!(p.auto_throttle(pods.now_ns()).is_none());
        assert!(!p.limited());
        assert_eq!(p.throttle_note(pods.now_ns()), "");
        for _ in 0..100 {
            assert_eq!(p.check(pods.now_ns(), Duration::ZERO), Throttle::Allow);
        }
        assert_eq!(g.get(), 0);
    }
}
