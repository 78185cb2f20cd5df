//! Per-pod command accounting and the per-pod command-rate limit.
//!
//! Every client session holds the [`PodStats`] of its pod (resolved once per connection from
//! the pod id the agent's attribution gave it; node-local clients share pod "node", id 0).
//! Counting is two atomic adds per command. A task flushes the deltas every 200 ms to the
//! metrics and to a [`PodDirectory`] (the agent writes them to the pinned `dm_pod_counters`
//! map, so `datamesh-agent pods` shows them), and refreshes each pod's name and policy
//! (config `pods[].cmd_rate/cmd_burst`, else `default_cmd_rate/burst`).
//!
//! A pod may also have a command policy (config `pods[].acl`, Redis ACL rules): a command runs
//! only when both the user's policy and the pod's allow it. Each pod also keeps what the
//! failed-AUTH limit and SCRIPT KILL need: its recent failed AUTHs (a progressive delay of
//! each failure reply, a rate-bounded warning), and the scripts its users have in flight.
//!
//! The limit is GCRA (the same [`datamesh_common::gcra_allow`] the eBPF connection limit uses).
//! A command over the limit waits until its slot comes if that is within
//! `proxy.throttle_max_delay_ms`, else it is answered with an error; both count as throttled.
//!
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use datamesh_common::gcra_allow;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::commands::acl::Policy;
use crate::ratelog::RateLimited;
use crate::stopped;

/// Where per-pod names come from and per-pod counts go (the agent: pod discovery and the
/// pinned `dm_pod_counters` map).
pub trait PodDirectory: Send + Sync + 'static {
    /// The pod's name, when discovery knows it.
    fn name_of(&self, pod: u64) -> Option<String>;
    /// Adds command and throttled counts of one flush to the pod's counters.
    fn add_counts(&self, pod: u64, commands: u64, throttled: u64);
}

/// A pod's command-rate policy, connection caps and command policy by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRate {
    pub name: String,
    pub cmd_rate: u32,
    pub cmd_burst: u32,
    /// Client connections of the pod at once (0: the default).
    pub max_connections: u32,
    /// Dedicated backend connections (transactions, blocking commands, subscriptions) the
    /// pod's clients hold at once (0: the default).
    pub max_dedicated: u32,
    /// Commands the pod's clients may run, whatever their user (`pods[].acl`).
    pub acl: Option<Arc<Policy>>,
}

/// What a pod's policy resolves to.
#[derive(Debug, Clone, Default)]
struct Resolved {
    rate: u32,
    burst: u32,
    max_connections: u32,
    max_dedicated: u32,
    acl: Option<Arc<Policy>>,
}

/// Failed AUTHs of a pod that are answered at once; each further one within
/// [`AUTH_QUIET`] of the previous is answered after a delay that doubles from
/// [`AUTH_FIRST_DELAY`] up to [`AUTH_MAX_DELAY`].
pub const AUTH_FREE_FAILURES: u32 = 5;
pub const AUTH_FIRST_DELAY: Duration = Duration::from_millis(50);
pub const AUTH_MAX_DELAY: Duration = Duration::from_secs(1);
/// A pod's failure count starts again after this long without a failed AUTH.
pub const AUTH_QUIET: Duration = Duration::from_secs(10);
/// At most one warning per pod this often (with the count since the last one).
pub const AUTH_WARN_EVERY: Duration = Duration::from_secs(10);

/// What one failed AUTH costs its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthPenalty {
    /// How long the failure reply waits (the session reads nothing meanwhile).
    pub delay: Duration,
    /// Log a warning now with this many failures since the last one.
    pub warn: Option<u64>,
}

/// A pod's recent failed AUTHs.
struct AuthFailures {
    /// Failures since the last quiet period.
    recent: AtomicU32,
    last_ns: AtomicU64,
    /// One warning per [`AUTH_WARN_EVERY`].
    log: RateLimited,
}

impl Default for AuthFailures {
    fn default() -> Self {
        Self {
            recent: AtomicU32::new(0),
            last_ns: AtomicU64::new(0),
            log: RateLimited::new(AUTH_WARN_EVERY),
        }
    }
}

/// Scripts of one user on one endpoint (and node, in cluster mode) in flight.
struct ScriptRun {
    endpoint: String,
    user: String,
    node: Option<SocketAddr>,
    count: u32,
}

/// Held while a script or function call of a pod's user is in flight; dropping it (the reply
/// came, or the client went away) ends it.
pub struct ScriptGuard {
    pod: Arc<PodStats>,
    slot: usize,
}

impl Drop for ScriptGuard {
    fn drop(&mut self) {
        let mut runs = self.pod.scripts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = runs.get_mut(self.slot) {
            r.count = r.count.saturating_sub(1);
        }
    }
}

/// Name of the pseudo-pod of clients whose connection was not captured (node-local).
pub const NODE_POD: &str = "node";

/// A rate-limit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    Allow,
    /// Allowed after waiting this long (the slot is reserved).
    Delay(Duration),
    /// Over the limit by more than the allowed delay.
    Refuse,
}

/// One pod's counters, bucket and policy, shared by all its sessions.
pub struct PodStats {
    pub cookie: u64,
    name: RwLock<String>,
    rate: AtomicU32,
    burst: AtomicU32,
    tat_ns: AtomicU64,
    max_connections: AtomicU32,
    max_dedicated: AtomicU32,
    /// Client connections and dedicated backend connections held now.
    connections: AtomicU32,
    dedicated: AtomicU32,
    commands: AtomicU64,
    throttled: AtomicU64,
    flushed_commands: AtomicU64,
    flushed_throttled: AtomicU64,
    /// The pod's command policy (`has_acl` says whether there is one, without the lock).
    acl: RwLock<Option<Arc<Policy>>>,
    has_acl: AtomicBool,
    auth: AuthFailures,
    /// Entries stay (count 0) once made: a user's next script costs no allocation.
    scripts: Mutex<Vec<ScriptRun>>,
    /// A temporary command rate set by the key-attack detection ([`crate::attacks`]): in force
    /// (tightening the configured one) until `auto_until_ns` (0 = none); `auto_kind` says why.
    auto_rate: AtomicU32,
    auto_until_ns: AtomicU64,
    auto_kind: AtomicU8,
}

impl PodStats {
    pub fn new(cookie: u64, name: String, rate: u32, burst: u32) -> Self {
        Self {
            cookie,
            name: RwLock::new(name),
            rate: AtomicU32::new(rate),
            burst: AtomicU32::new(burst),
            tat_ns: AtomicU64::new(0),
            max_connections: AtomicU32::new(0),
            max_dedicated: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            dedicated: AtomicU32::new(0),
            commands: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            flushed_commands: AtomicU64::new(0),
            flushed_throttled: AtomicU64::new(0),
            acl: RwLock::new(None),
            has_acl: AtomicBool::new(false),
            auth: AuthFailures::default(),
            scripts: Mutex::new(Vec::new()),
            auto_rate: AtomicU32::new(0),
            auto_until_ns: AtomicU64::new(0),
            auto_kind: AtomicU8::new(0),
        }
    }

    /// Limits the pod to `rate` commands/s (or its configured rate, if lower) until `until_ns`
    /// (the registry's clock), because it is suspected of `kind`.
    pub fn set_auto_throttle(&self, rate: u32, until_ns: u64, kind: crate::attacks::Kind) {
        self.auto_rate.store(rate.max(1), Ordering::Relaxed);
        self.auto_kind.store(
            match kind {
                crate::attacks::Kind::Penetration => 1,
                crate::attacks::Kind::Scan => 2,
            },
            Ordering::Relaxed,
        );
        self.auto_until_ns.store(until_ns, Ordering::Release);
    }

    /// The automatic throttle in force at `now_ns`: (rate, until_ns, why).
    pub fn auto_throttle(&self, now_ns: u64) -> Option<(u32, u64, crate::attacks::Kind)> {
        let until = self.auto_until_ns.load(Ordering::Acquire);
        if until == 0 || now_ns >= until {
            return None;
        }
        let kind = match self.auto_kind.load(Ordering::Relaxed) {
            2 => crate::attacks::Kind::Scan,
            _ => crate::attacks::Kind::Penetration,
        };
        Some((self.auto_rate.load(Ordering::Relaxed), until, kind))
    }

    /// Ends an automatic throttle whose time is up; true when there was one.
    pub fn clear_expired_auto_throttle(&self, now_ns: u64) -> bool {
        let until = self.auto_until_ns.load(Ordering::Acquire);
        until != 0
            && now_ns >= until
            && self
                .auto_until_ns
                .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// What the throttle error adds while an automatic throttle is in force ("" otherwise).
    pub fn throttle_note(&self, now_ns: u64) -> &'static str {
        match self.auto_throttle(now_ns) {
            Some((_, _, kind)) => kind.throttle_note(),
            None => "",
        }
    }

    /// The rate and burst in force at `now_ns` (an automatic throttle tightens the configured
    /// ones; its burst is a tenth of a second of commands).
    fn effective(&self, now_ns: u64) -> (u32, u32) {
        let rate = self.rate.load(Ordering::Relaxed);
        let burst = self.burst.load(Ordering::Relaxed);
        match self.auto_throttle(now_ns) {
            Some((auto, _, _)) if rate == 0 || auto < rate => (auto, (auto / 10).max(1)),
            _ => (rate, burst),
        }
    }

    /// Sets (or clears) the pod's command policy.
    pub fn set_acl(&self, acl: Option<Arc<Policy>>) {
        self.has_acl.store(acl.is_some(), Ordering::Relaxed);
        *self.acl.write().unwrap_or_else(|p| p.into_inner()) = acl;
    }

    /// Whether the pod's policy (if it has one) allows the command in `slot` (see
    /// [`Policy::allows`]).
    pub fn acl_allows(&self, slot: Option<u16>, name: &[u8]) -> bool {
        if !self.has_acl.load(Ordering::Relaxed) {
            return true;
        }
        match &*self.acl.read().unwrap_or_else(|p| p.into_inner()) {
            Some(p) => p.allows(slot, name),
            None => true,
        }
    }

    /// Whether the pod's policy (if it has one) allows every `@admin` command.
    pub fn acl_operator(&self) -> bool {
        match &*self.acl.read().unwrap_or_else(|p| p.into_inner()) {
            Some(p) => p.is_operator(),
            None => true,
        }
    }

    /// Counts a failed AUTH at `now_ns` (the registry's clock) and says what it costs.
    pub fn auth_failed(&self, now_ns: u64) -> AuthPenalty {
        let a = &self.auth;
        let last = a.last_ns.swap(now_ns, Ordering::Relaxed);
        if now_ns.saturating_sub(last) > AUTH_QUIET.as_nanos() as u64 {
            a.recent.store(0, Ordering::Relaxed);
        }
        let n = a.recent.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let delay = match n.checked_sub(AUTH_FREE_FAILURES + 1) {
            None => Duration::ZERO,
            Some(k) => AUTH_FIRST_DELAY
                .saturating_mul(1u32 << k.min(16))
                .min(AUTH_MAX_DELAY),
        };
        AuthPenalty {
            delay,
            // This failure and those not logged since the last warning.
            warn: a.log.check().map(|skipped| skipped + 1),
        }
    }

    /// True while failed AUTHs of the pod are recent (its stats must outlive its sessions, or
    /// reconnecting would reset the delay).
    fn auth_recent(&self, now_ns: u64) -> bool {
        self.auth.recent.load(Ordering::Relaxed) > 0
            && now_ns.saturating_sub(self.auth.last_ns.load(Ordering::Relaxed))
                <= AUTH_QUIET.as_nanos() as u64
    }

    /// A script of `user` on `endpoint` (on `node`, in cluster mode) is in flight until the
    /// guard drops.
    pub fn script_started(
        self: &Arc<Self>,
        endpoint: &str,
        user: &str,
        node: Option<SocketAddr>,
    ) -> ScriptGuard {
        let mut runs = self.scripts.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match runs
            .iter()
            .position(|r| r.endpoint == endpoint && r.user == user && r.node == node)
        {
            Some(i) => i,
            None => {
                runs.push(ScriptRun {
                    endpoint: endpoint.to_string(),
                    user: user.to_string(),
                    node,
                    count: 0,
                });
                runs.len() - 1
            }
        };
        if let Some(r) = runs.get_mut(slot) {
            r.count += 1;
        }
        ScriptGuard {
            pod: self.clone(),
            slot,
        }
    }

    /// Where `user` of this pod has scripts in flight on `endpoint`: None when nowhere, else
    /// the nodes (empty when not known: not a cluster).
    pub fn scripts_of(&self, endpoint: &str, user: &str) -> Option<Vec<SocketAddr>> {
        let runs = self.scripts.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = false;
        let mut nodes = Vec::new();
        for r in runs
            .iter()
            .filter(|r| r.count > 0 && r.endpoint == endpoint && r.user == user)
        {
            found = true;
            nodes.extend(r.node);
        }
        found.then_some(nodes)
    }

    pub fn name(&self) -> String {
        self.name.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `f` of the pod's name, without a copy (key rules' pod selectors).
    pub fn with_name<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        f(&self.name.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn commands(&self, n: u64) {
        self.commands.fetch_add(n, Ordering::Relaxed);
    }

    pub fn throttled(&self, n: u64) {
        self.throttled.fetch_add(n, Ordering::Relaxed);
    }

    pub fn totals(&self) -> (u64, u64) {
        (
            self.commands.load(Ordering::Relaxed),
            self.throttled.load(Ordering::Relaxed),
        )
    }

    /// True when the pod has a command-rate limit (checked before anything else per command),
    /// or had an automatic one not cleared yet ([`PodStats::check`] knows whether it is over).
    pub fn limited(&self) -> bool {
        self.rate.load(Ordering::Relaxed) != 0 || self.auto_until_ns.load(Ordering::Relaxed) != 0
    }

    pub fn set_policy(&self, rate: u32, burst: u32) {
        self.rate.store(rate, Ordering::Relaxed);
        self.burst.store(burst, Ordering::Relaxed);
    }

    fn set_resolved(&self, r: Resolved) {
        self.set_policy(r.rate, r.burst);
        self.max_connections
            .store(r.max_connections, Ordering::Relaxed);
        self.max_dedicated.store(r.max_dedicated, Ordering::Relaxed);
        if self.acl.read().unwrap_or_else(|p| p.into_inner()).as_ref() != r.acl.as_ref() {
            self.set_acl(r.acl);
        }
    }

    /// Takes one of the pod's client-connection slots (released when the returned slot
    /// drops); None when the pod is at its `max_connections`.
    pub fn take_connection(self: &Arc<Self>) -> Option<Slot> {
        Slot::take(
            self,
            &self.connections,
            &self.max_connections,
            SlotKind::Connection,
        )
    }

    /// Takes one of the pod's dedicated-connection slots; None at its `max_dedicated`.
    pub fn take_dedicated(self: &Arc<Self>) -> Option<Slot> {
        Slot::take(
            self,
            &self.dedicated,
            &self.max_dedicated,
            SlotKind::Dedicated,
        )
    }

    /// (client connections, dedicated connections) held now, and their caps (0 = none).
    pub fn holding(&self) -> (u32, u32, u32, u32) {
        (
            self.connections.load(Ordering::Relaxed),
            self.dedicated.load(Ordering::Relaxed),
            self.max_connections.load(Ordering::Relaxed),
            self.max_dedicated.load(Ordering::Relaxed),
        )
    }

    /// GCRA check of one command at `now_ns`, delaying up to `max_delay`.
    pub fn check(&self, now_ns: u64, max_delay: Duration) -> Throttle {
        let (rate, burst) = self.effective(now_ns);
        gcra_take(&self.tat_ns, now_ns, rate, burst, max_delay)
    }
}

/// One command through the GCRA bucket whose theoretical arrival time is `tat_ns` (`rate`
/// per second, `burst`; 0 = no limit) at `now_ns`: allowed, delayed up to `max_delay` (the
/// bucket is charged now, the command waits its turn), or refused past it. Lock-free: the pod
/// limit and the key rules' buckets ([`crate::keyrules`]) share it.
pub fn gcra_take(
    tat_ns: &AtomicU64,
    now_ns: u64,
    rate: u32,
    burst: u32,
    max_delay: Duration,
) -> Throttle {
    if rate == 0 {
        return Throttle::Allow;
    }
    let interval = 1_000_000_000u64 / u64::from(rate);
    let burst_ns = u64::from(burst.max(1)) * interval;
    loop {
        let tat = tat_ns.load(Ordering::Acquire);
        let (new_tat, wait) = match gcra_allow(tat, now_ns, rate, burst) {
            Some(t) => (t, 0),
            None => {
                // Allowed once `new_tat - t <= burst * interval`.
                let new_tat = tat.max(now_ns) + interval;
                let wait = new_tat.saturating_sub(burst_ns).saturating_sub(now_ns);
                if wait > max_delay.as_nanos() as u64 {
                    return Throttle::Refuse;
                }
                (new_tat, wait)
            }
        };
        if tat_ns
            .compare_exchange(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return if wait == 0 {
                Throttle::Allow
            } else {
                Throttle::Delay(Duration::from_nanos(wait))
            };
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Connection,
    Dedicated,
}

/// One held unit of a pod's cap (a client connection, a dedicated backend connection),
/// given back on drop.
pub struct Slot {
    pod: Arc<PodStats>,
    kind: SlotKind,
}

impl Slot {
    fn take(pod: &Arc<PodStats>, n: &AtomicU32, max: &AtomicU32, kind: SlotKind) -> Option<Self> {
        let cap = max.load(Ordering::Relaxed);
        let prev = n.fetch_add(1, Ordering::AcqRel);
        if cap != 0 && prev >= cap {
            n.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            pod: pod.clone(),
            kind,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let n = match self.kind {
            SlotKind::Connection => &self.pod.connections,
            SlotKind::Dedicated => &self.pod.dedicated,
        };
        n.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({:?} of pod {})", self.kind, self.pod.cookie)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub pod: String,
}

/// Per-pod metrics (`datamesh_proxy_pod_commands_total`, `..._pod_throttled_total`).
#[derive(Default)]
pub struct PodMetrics {
    pub commands: Family<PodLabels, Counter>,
    pub throttled: Family<PodLabels, Counter>,
}

/// The policy inputs: per-pod config and the defaults.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    pub pods: Vec<PodRate>,
    pub default_rate: u32,
    pub default_burst: u32,
    /// Caps for pods without their own (0 = none).
    pub default_max_connections: u32,
    pub default_max_dedicated: u32,
}

impl PolicySource {
    fn for_name(&self, name: Option<&str>) -> Resolved {
        let defaults = Resolved {
            rate: self.default_rate,
            burst: self.default_burst,
            max_connections: self.default_max_connections,
            max_dedicated: self.default_max_dedicated,
            acl: None,
        };
        let Some(name) = name else {
            // Node-local clients (trusted, and many tools share the pseudo-pod) are bounded
            // by the proxy-wide caps only.
            return Resolved {
                max_connections: 0,
                max_dedicated: 0,
                ..defaults
            };
        };
        match self
            .pods
            .iter()
            .find(|p| crate::keyrules::glob_match(p.name.as_bytes(), name.as_bytes()))
        {
            Some(p) => Resolved {
                rate: p.cmd_rate,
                burst: p.cmd_burst,
                max_connections: or(p.max_connections, defaults.max_connections),
                max_dedicated: or(p.max_dedicated, defaults.max_dedicated),
                acl: p.acl.clone(),
            },
            None => defaults,
        }
    }
}

fn or(v: u32, default: u32) -> u32 {
    if v == 0 {
        default
    } else {
        v
    }
}

/// All pods' stats, the policy source and the flusher.
pub struct PodRegistry {
    stats: Mutex<HashMap<u64, Arc<PodStats>>>,
    policy: RwLock<PolicySource>,
    directory: Option<Arc<dyn PodDirectory>>,
    base: Instant,
    pub metrics: Arc<PodMetrics>,
}

impl PodRegistry {
    /// `directory`: pod names and the counters' destination (None: counts go to the
    /// metrics only, pods are named `netns-<id>`).
    pub fn new(directory: Option<Arc<dyn PodDirectory>>, policy: PolicySource) -> Self {
        Self {
            stats: Mutex::new(HashMap::new()),
            policy: RwLock::new(policy),
            directory,
            base: Instant::now(),
            metrics: Arc::new(PodMetrics::default()),
        }
    }

    /// Nanoseconds on the (tokio) clock the buckets use; starts at 1 s so a fresh bucket's
    /// TAT of 0 is in the past.
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// [`PodRegistry::now_ns`] of an earlier instant (when a batch of commands arrived).
    pub fn ns_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64 + 1_000_000_000
    }

    /// The stats of the pod with `cookie` (0 = node-local clients), created on first use.
    pub fn get(&self, cookie: u64) -> Arc<PodStats> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stats.get(&cookie) {
            return s.clone();
        }
        let name = self.name_of(cookie);
        let r = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .for_name(if cookie == 0 { None } else { Some(&name) });
        let s = Arc::new(PodStats::new(cookie, name, r.rate, r.burst));
        s.set_resolved(r);
        stats.insert(cookie, s.clone());
        s
    }

    fn name_of(&self, cookie: u64) -> String {
        if cookie == 0 {
            return NODE_POD.to_string();
        }
        self.directory
            .as_ref()
            .and_then(|d| d.name_of(cookie))
            .unwrap_or_else(|| format!("netns-{cookie}"))
    }

    pub fn set_policy(&self, policy: PolicySource) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
        self.refresh();
    }

    /// The pods' stats as they are now, so the lock is not held while they are updated.
    fn snapshot(&self) -> Vec<Arc<PodStats>> {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Re-resolves names (discovery may have named a pod since) and policies.
    fn refresh(&self) {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stats = self.snapshot();
        for s in stats {
            let name = self.name_of(s.cookie);
            s.set_resolved(policy.for_name(if s.cookie == 0 { None } else { Some(&name) }));
            *s.name.write().unwrap_or_else(|p| p.into_inner()) = name;
        }
    }

    /// Writes counter deltas to the directory and the metrics; forgets pods without
    /// sessions whose counts are all flushed.
    pub fn flush(&self) {
        let stats = self.snapshot();
        for s in &stats {
            let (c, t) = s.totals();
            let dc = c - s.flushed_commands.swap(c, Ordering::Relaxed);
            let dt = t - s.flushed_throttled.swap(t, Ordering::Relaxed);
            if dc == 0 && dt == 0 {
                continue;
            }
            let labels = PodLabels { pod: s.name() };
            self.metrics.commands.get_or_create(&labels).inc_by(dc);
            self.metrics.throttled.get_or_create(&labels).inc_by(dt);
            // Node-local clients have no pod entry in the data plane's maps.
            if s.cookie == 0 {
                continue;
            }
            if let Some(d) = &self.directory {
                d.add_counts(s.cookie, dc, dt);
            }
        }
        drop(stats);
        let now = self.now_ns();
        let mut all = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, s| {
            let (c, t) = s.totals();
            Arc::strong_count(s) > 1
                || s.auth_recent(now)
                || c != s.flushed_commands.load(Ordering::Relaxed)
                || t != s.flushed_throttled.load(Ordering::Relaxed)
        });
    }

    /// Flushes every 200 ms (and once more at stop).
    pub fn spawn_flusher(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = tick.tick() => {
                        self.flush();
                        n += 1;
                        if n.is_multiple_of(5) {
                            self.refresh();
                        }
                    }
                }
            }
            self.flush();
            debug!("pod counters flushed");
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(pods: Vec<PodRate>, rate: u32, burst: u32) -> PodRegistry {
        PodRegistry::new(
            None,
            PolicySource {
                pods,
                default_rate: rate,
                default_burst: burst,
                default_max_connections: 2,
                default_max_dedicated: 1,
            },
        )
    }

    #[test]
    fn pod_caps_hold_and_release_their_slots() {
        let pods = vec![PodRate {
            name: "netns-9".into(),
            cmd_rate: 0,
            cmd_burst: 0,
            max_connections: 3,
            max_dedicated: 0,
            acl: None,
        }];
        let r = registry(pods, 0, 0);
        let pod = r.get(5);
        let a = pod.take_connection().expect("first");
        let _b = pod.take_connection().expect("second");
        assert!(pod.take_connection().is_none(), "default cap 2");
        drop(a);
        assert!(pod.take_connection().is_some(), "a slot came back");
        let d = pod.take_dedicated().expect("dedicated");
        assert!(pod.take_dedicated().is_none());
        drop(d);
        assert_eq!(pod.holding(), (1, 0, 2, 1));
        // A pod's own cap, and 0 = the default.
        let own = r.get(9);
        let slots: Vec<_> = (0..3).filter_map(|_| own.take_connection()).collect();
        assert_eq!(slots.len(), 3);
        assert!(own.take_dedicated().is_some());
        // Node-local clients have no per-pod caps.
        let node = r.get(0);
        let many: Vec<_> = (0..10).filter_map(|_| node.take_connection()).collect();
        assert_eq!(many.len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn gcra_burst_then_delay_then_refuse() {
        let r = registry(vec![], 10, 2);
        let node = r.get(0);
        let max = Duration::from_millis(100);
        // 10/s, burst 2: two at once, the third waits 100 ms, the fourth would wait 200 ms.
        assert_eq!(node.check(r.now_ns(), max), Throttle::Allow);
        assert_eq!(node.check(r.now_ns(), max), Throttle::Allow);
        assert_eq!(
            node.check(r.now_ns(), max),
            Throttle::Delay(Duration::from_millis(100))
        );
        assert_eq!(node.check(r.now_ns(), max), Throttle::Refuse);
        // Refusals do not consume the bucket: after 200 ms two more pass (one waits 0).
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(node.check(r.now_ns(), max), Throttle::Allow);
        assert_eq!(
            node.check(r.now_ns(), max),
            Throttle::Delay(Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_rate_is_the_configured_rate() {
        let r = registry(vec![], 50, 1);
        let s = r.get(0);
        let mut allowed = 0;
        for _ in 0..1000 {
            match s.check(r.now_ns(), Duration::ZERO) {
                Throttle::Allow => allowed += 1,
                Throttle::Delay(_) => unreachable!("max delay is 0"),
                Throttle::Refuse => {}
            }
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        // 2 s at 50/s.
        assert!((99..=101).contains(&allowed), "{allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_and_per_pod_policy() {
        let pods = vec![PodRate {
            name: "netns-7".into(),
            cmd_rate: 1,
            cmd_burst: 1,
            max_connections: 0,
            max_dedicated: 0,
            acl: None,
        }];
        let r = registry(pods, 0, 0);
        let node = r.get(0);
        for _ in 0..100 {
            assert_eq!(node.check(r.now_ns(), Duration::ZERO), Throttle::Allow);
        }
        let p = r.get(7);
        assert_eq!(p.name(), "netns-7");
        assert_eq!(p.check(r.now_ns(), Duration::ZERO), Throttle::Allow);
        assert_eq!(p.check(r.now_ns(), Duration::ZERO), Throttle::Refuse);
        // Policy reload: unlimited now.
        r.set_policy(PolicySource::default());
        assert_eq!(p.check(r.now_ns(), Duration::ZERO), Throttle::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_auths_are_delayed_progressively_per_pod() {
        let r = registry(vec![], 0, 0);
        let p = r.get(3);
        let delays: Vec<u64> = (0..12)
            .map(|_| p.auth_failed(r.now_ns()).delay.as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 0, 0, 0, 0, 50, 100, 200, 400, 800, 1000, 1000]);
        // One warning per window, with the count since the last one.
        tokio::time::advance(AUTH_WARN_EVERY).await;
        assert_eq!(p.auth_failed(r.now_ns()).warn, Some(12));
        assert_eq!(p.auth_failed(r.now_ns()).warn, None);
        // Another pod is not delayed.
        assert_eq!(r.get(4).auth_failed(r.now_ns()).delay, Duration::ZERO);
        // The pod's stats outlive its sessions while failures are recent, then go.
        drop(p);
        r.flush();
        assert!(r.stats.lock().expect("lock").contains_key(&3));
        tokio::time::advance(AUTH_QUIET + Duration::from_secs(1)).await;
        r.flush();
        assert!(!r.stats.lock().expect("lock").contains_key(&3));
        // After a quiet period failures are free again.
        let p = r.get(3);
        assert_eq!(p.auth_failed(r.now_ns()).delay, Duration::ZERO);
    }

    #[test]
    fn scripts_in_flight_by_user_and_endpoint() {
        let r = registry(vec![], 0, 0);
        let p = r.get(5);
        assert_eq!(p.scripts_of("cache", "app"), None);
        let node: SocketAddr = "10.0.0.1:6379".parse().expect("addr");
        let g1 = p.script_started("cache", "app", None);
        let g2 = p.script_started("cache", "app", Some(node));
        assert_eq!(p.scripts_of("cache", "app"), Some(vec![node]));
        assert_eq!(p.scripts_of("cache", "other"), None);
        assert_eq!(p.scripts_of("sessions", "app"), None);
        drop(g2);
        assert_eq!(p.scripts_of("cache", "app"), Some(vec![]));
        drop(g1);
        assert_eq!(p.scripts_of("cache", "app"), None);
    }

    #[test]
    fn pod_command_policy_is_set_and_reloaded() {
        let acl = Arc::new(Policy::parse("+@all -flushall -debug").expect("parses"));
        let pods = vec![PodRate {
            name: "netns-9".into(),
            cmd_rate: 0,
            cmd_burst: 0,
            max_connections: 0,
            max_dedicated: 0,
            acl: Some(acl),
        }];
        let r = registry(pods, 0, 0);
        let p = r.get(9);
        let slot = crate::commands::acl::catalog().slot_of(
            crate::commands::lookup(b"flushall"),
            &crate::resp::Command::from_args([bytes::Bytes::from_static(b"FLUSHALL")]),
        );
        assert!(!p.acl_allows(slot, b"flushall"));
        assert!(!p.acl_operator());
        assert!(r.get(8).acl_allows(slot, b"flushall"));
        r.set_policy(PolicySource::default());
        assert!(p.acl_allows(slot, b"flushall"));
    }

    #[test]
    fn flush_forgets_idle_pods() {
        let r = registry(vec![], 0, 0);
        let s = r.get(0);
        s.commands(3);
        s.throttled(1);
        drop(s);
        r.flush();
        let labels = PodLabels {
            pod: NODE_POD.into(),
        };
        assert_eq!(r.metrics.commands.get_or_create(&labels).get(), 3);
        assert_eq!(r.metrics.throttled.get_or_create(&labels).get(), 1);
        assert!(r.stats.lock().expect("lock").is_empty());
    }
}
