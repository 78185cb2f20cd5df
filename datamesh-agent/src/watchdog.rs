//! The worker's resource watchdog: every `watchdog.interval_ms` it samples what a leak would
//! grow, against the worker's own budgets:
//!
//! - `fds`: open descriptors (`/proc/self/fd`) against `fd_percent` of the soft
//!   `RLIMIT_NOFILE` the agent runs with;
//! - `memory`: RSS (`/proc/self/statm`) against `rss_percent` of the proxy's memory budget
//!   (buffered client bytes are kept under the budget by the shedder, so RSS far above it for
//!   long is memory nobody accounts for; no check with `proxy.memory_budget_bytes: 0`);
//! - `backend_conns`: per endpoint, open backend connections (shared and dedicated) against
//!   `backend_conns_percent` of what its pools may hold (`pool_size` per pool, `max_dedicated`
//!   per node), and all endpoints' together against `max_backend_conns`.
//!
//! A budget exceeded for `sustain_s` is a breach: counted
//! (`datamesh_agent_watchdog_breaches_total{resource}`), logged (ERROR, with the value and the
//! budget), and reported to the supervisor with every pong until it is over; the supervisor
//! then replaces the worker gracefully (see `supervisor`). The sampled values and their
//! thresholds are gauges (`datamesh_agent_watchdog_value{resource,scope}`,
//! `datamesh_agent_watchdog_threshold{resource,scope}`).
//!
//! Fault injection (`debug.fault_injection: true` only; admin `POST /debug/leak`): leaks
//! descriptors, memory or dedicated backend connections for the resource-leak drill.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use datamesh_proxy::endpoint::EndpointHandle;
use datamesh_proxy::listener::Shared;

use crate::config::WatchdogConfig;

/// What the watchdog watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Fds,
    Memory,
    BackendConns,
}

impl Resource {
    pub const ALL: [Resource; 3] = [Resource::Fds, Resource::Memory, Resource::BackendConns];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Fds => "fds",
            Resource::Memory => "memory",
            Resource::BackendConns => "backend_conns",
        }
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == c)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    resource: String,
    /// `worker`, an endpoint's name, or `all` (every endpoint's backend connections).
    scope: String,
}

/// One sample: (resource, scope, value, threshold).
pub type Reading = (Resource, String, u64, u64);

/// Samples over their thresholds (`value > threshold`).
pub fn over(readings: &[Reading]) -> Vec<&Reading> {
    readings.iter().filter(|r| r.2 > r.3).collect()
}

/// `limit * percent / 100`, saturating.
fn percent_of(limit: u64, percent: u32) -> u64 {
    (u128::from(limit) * u128::from(percent) / 100).min(u128::from(u64::MAX)) as u64
}

/// The readings for what was sampled, with the config's thresholds.
pub fn readings(
    cfg: &WatchdogConfig,
    fds: u64,
    fd_limit: u64,
    rss: u64,
    memory_budget: u64,
    backends: &[(String, u64, u64)],
) -> Vec<Reading> {
    let mut v = vec![
        (
            Resource::Fds,
            "worker".to_string(),
            fds,
            percent_of(fd_limit, cfg.fd_percent),
        ),
        (
            Resource::Memory,
            "worker".to_string(),
            rss,
            // `proxy.memory_budget_bytes: 0` (no budget): nothing to compare RSS with.
            if memory_budget == 0 {
                u64::MAX
            } else {
                percent_of(memory_budget, cfg.rss_percent)
            },
        ),
    ];
    let mut total = 0u64;
    for (name, open, limit) in backends {
        total = total.saturating_add(*open);
        v.push((
            Resource::BackendConns,
            name.clone(),
            *open,
            percent_of(*limit, cfg.backend_conns_percent),
        ));
    }
    v.push((
        Resource::BackendConns,
        "all".to_string(),
        total,
        cfg.max_backend_conns,
    ));
    v
}

/// The open descriptors of this process.
pub fn open_fds() -> u64 {
    // The directory's own descriptor is one of them.
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1) as u64)
        .unwrap_or(0)
}

/// This process's resident set, bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.saturating_mul(u64::try_from(page).unwrap_or(4096))
}

/// The watchdog's state, shared by its task, the health task (which reports the breach) and
/// the admin endpoint (fault injection).
pub struct Watchdog {
    settings: RwLock<WatchdogConfig>,
    /// `debug.fault_injection` (hot-reloadable).
    pub fault_injection: AtomicBool,
    /// The resource in breach now (its code; 0 = none), reported with every pong.
    breach: AtomicU8,
    /// Since when each resource is over its threshold (and whether the breach was counted).
    since: Mutex<[(Option<Instant>, bool); 3]>,
    breaches: Family<ResourceLabels, Counter>,
    values: Family<ScopeLabels, Gauge>,
    thresholds: Family<ScopeLabels, Gauge>,
    /// Whether a supervisor replaces this worker on a breach (else the log says to restart).
    supervised: bool,
}

impl Watchdog {
    pub fn new(cfg: WatchdogConfig, fault_injection: bool, supervised: bool) -> Self {
        Self {
            settings: RwLock::new(cfg),
            fault_injection: AtomicBool::new(fault_injection),
            breach: AtomicU8::new(0),
            since: Mutex::new([(None, false); 3]),
            breaches: Family::default(),
            values: Family::default(),
            thresholds: Family::default(),
            supervised,
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agent_watchdog_breaches",
            "Budgets the worker exceeded for watchdog.sustain_s (resource = fds | memory | backend_conns)",
            self.breaches.clone(),
        );
        registry.register(
            "agent_watchdog_value",
            "What the watchdog last sampled: open descriptors, RSS bytes, backend connections (scope = worker | endpoint | all)",
            self.values.clone(),
        );
        registry.register(
            "agent_watchdog_threshold",
            "The watchdog's threshold for each sampled value (a breach once exceeded for watchdog.sustain_s)",
            self.thresholds.clone(),
        );
        for r in Resource::ALL {
            let _ = self.breaches.get_or_create(&ResourceLabels {
                resource: r.as_str().into(),
            });
        }
    }

    pub fn set_config(&self, cfg: WatchdogConfig, fault_injection: bool) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        self.fault_injection
            .store(fault_injection, Ordering::Relaxed);
    }

    fn config(&self) -> WatchdogConfig {
        *self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The resource in breach now, if any (what the pong reports).
    pub fn breach(&self) -> Option<Resource> {
        Resource::from_code(self.breach.load(Ordering::Relaxed))
    }

    /// Applies one round of readings at `now`: gauges, sustain tracking, breach, logs.
    pub fn apply(&self, readings: &[Reading], now: Instant) {
        let cfg = self.config();
        for (r, scope, value, threshold) in readings {
            let l = ScopeLabels {
                resource: r.as_str().into(),
                scope: scope.clone(),
            };
            self.values.get_or_create(&l).set(*value as i64);
            self.thresholds.get_or_create(&l).set(*threshold as i64);
        }
        let sustain = Duration::from_secs(cfg.sustain_s);
        let exceeded = over(readings);
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        let mut breach = None;
        for r in Resource::ALL {
            let slot = &mut since[r as usize];
            // The reading furthest over its threshold names the value in the logs.
            let worst = exceeded
                .iter()
                .filter(|x| x.0 == r)
                .max_by_key(|x| u128::from(x.2) * 1000 / u128::from(x.3.max(1)));
            match (worst, cfg.enabled) {
                (Some((_, scope, value, threshold)), true) => {
                    let first = *slot.0.get_or_insert(now);
                    if first == now {
                        warn!(resource = r.as_str(), scope = %scope, value, budget = threshold, sustain_s = cfg.sustain_s, "watchdog: over budget (a breach if it stays over)");
                    }
                    if now.duration_since(first) >= sustain {
                        if !slot.1 {
                            slot.1 = true;
                            self.breaches
                                .get_or_create(&ResourceLabels {
                                    resource: r.as_str().into(),
                                })
                                .inc();
                            if self.supervised {
                                error!(resource = r.as_str(), scope = %scope, value, budget = threshold, over_s = now.duration_since(first).as_secs(), "watchdog: budget exceeded (a leak?): asking the supervisor to replace this worker gracefully");
                            } else {
                                error!(resource = r.as_str(), scope = %scope, value, budget = threshold, over_s = now.duration_since(first).as_secs(), "watchdog: budget exceeded (a leak?); no supervisor runs this proxy: restart the agent");
                            }
                        }
                        breach.get_or_insert(r);
                    }
                }
                _ => {
                    if slot.1 {
                        info!(resource = r.as_str(), "watchdog: back under budget");
                    }
                    *slot = (None, false);
                }
            }
        }
        self.breach
            .store(breach.map_or(0, Resource::code), Ordering::Relaxed);
    }

    /// Samples once a `watchdog.interval_ms` until `stop`.
    pub fn spawn(
        self: Arc<Self>,
        shared: Arc<Shared>,
        endpoints: Arc<crate::admin::AdminState>,
        fd_limit: u64,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let every = Duration::from_millis(self.config().interval_ms.max(100));
                tokio::select! {
                    _ = datamesh_proxy::stopped(&mut stop) => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let handles: Vec<Arc<EndpointHandle>> = endpoints
                    .endpoints
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let backends: Vec<(String, u64, u64)> = handles
                    .iter()
                    .map(|h| {
                        let g = h.current().group().clone();
                        (h.name.clone(), g.open_connections(), g.connection_limit())
                    })
                    .collect();
                let r = readings(
                    &self.config(),
                    open_fds(),
                    fd_limit,
                    rss_bytes(),
                    shared.budget.limit(),
                    &backends,
                );
                self.apply(&r, Instant::now());
            }
        })
    }
}

/// Fault injection: `amount` descriptors on /dev/null, opened and forgotten.
pub fn leak_fds(amount: u64) -> std::io::Result<u64> {
    use std::os::fd::IntoRawFd;
    for _ in 0..amount {
        let f = std::fs::File::open("/dev/null")?;
        let _ = f.into_raw_fd();
    }
    Ok(amount)
}

/// Fault injection: `mib` MiB allocated, written (resident) and forgotten.
pub fn leak_memory(mib: u64) -> u64 {
    for _ in 0..mib {
        let block = vec![0x5au8; 1024 * 1024].into_boxed_slice();
        // black_box: an allocation nobody reads may be elided by the optimizer (seen in the
        // release build: no RSS grew).
        std::hint::black_box(Box::leak(block));
    }
    mib
}

/// Fault injection: `amount` dedicated connections to the first endpoint's (or `endpoint`'s)
/// backend, outside the pools' budget, never closed. Needs a pool (a command sent through
/// the endpoint first).
pub async fn leak_conns(
    handles: &[Arc<EndpointHandle>],
    endpoint: Option<&str>,
    amount: u64,
) -> Result<u64, String> {
    let h = match endpoint {
        Some(e) => handles.iter().find(|h| h.name == e),
        None => handles.first(),
    }
    .ok_or_else(|| format!("no endpoint {}", endpoint.unwrap_or("(none configured)")))?;
    let pool = h
        .current()
        .group()
        .pools()
        .into_iter()
        .next()
        .ok_or_else(|| {
            format!(
                "endpoint {} has no backend pool yet: send a command through it first",
                h.name
            )
        })?;
    for i in 0..amount {
        if let Err(e) = pool.leak_dedicated().await {
            return Err(format!("leaked {i} connections, then: {e}"));
        }
    }
    Ok(amount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WatchdogConfig {
        WatchdogConfig {
            sustain_s: 2,
            fd_percent: 80,
            rss_percent: 150,
            backend_conns_percent: 100,
            max_backend_conns: 100,
            ..WatchdogConfig::default()
        }
    }

    #[test]
    fn thresholds_from_the_budgets() {
        let r = readings(
            &cfg(),
            10,
            1000,
            100,
            200,
            &[("cache".into(), 5, 4), ("other".into(), 3, 4)],
        );
        assert_eq!(r[0], (Resource::Fds, "worker".into(), 10, 800));
        assert_eq!(r[1], (Resource::Memory, "worker".into(), 100, 300));
        assert_eq!(r[2], (Resource::BackendConns, "cache".into(), 5, 4));
        assert_eq!(r[4], (Resource::BackendConns, "all".into(), 8, 100));
        let o = over(&r);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].1, "cache");
        // Saturates instead of overflowing.
        assert_eq!(percent_of(u64::MAX, 150), u64::MAX);
        // No memory budget: RSS is never over.
        let r = readings(&cfg(), 0, 1000, u64::MAX - 1, 0, &[]);
        assert!(over(&r).is_empty());
    }

    #[test]
    fn a_breach_needs_the_sustain_and_ends_when_back_under() {
        let w = Watchdog::new(cfg(), false, true);
        let t0 = Instant::now();
        let high = readings(&cfg(), 900, 1000, 0, 100, &[]);
        let low = readings(&cfg(), 10, 1000, 0, 100, &[]);
        w.apply(&high, t0);
        assert_eq!(w.breach(), None);
        w.apply(&high, t0 + Duration::from_secs(1));
        assert_eq!(w.breach(), None);
        // A dip restarts the sustain.
        w.apply(&low, t0 + Duration::from_millis(1500));
        w.apply(&high, t0 + Duration::from_secs(2));
        assert_eq!(w.breach(), None);
        w.apply(&high, t0 + Duration::from_secs(4));
        assert_eq!(w.breach(), Some(Resource::Fds));
        w.apply(&high, t0 + Duration::from_secs(5));
        let counted = w
            .breaches
            .get_or_create(&ResourceLabels {
                resource: "fds".into(),
            })
            .get();
        assert_eq!(counted, 1, "one breach per episode");
        w.apply(&low, t0 + Duration::from_secs(6));
        assert_eq!(w.breach(), None);
        // Disabled: never a breach.
        w.set_config(
            WatchdogConfig {
                enabled: false,
                ..cfg()
            },
            false,
        );
        w.apply(&high, t0 + Duration::from_secs(7));
        w.apply(&high, t0 + Duration::from_secs(20));
        assert_eq!(w.breach(), None);
    }

    #[test]
    fn leaks_show_in_the_samples() {
        let before = open_fds();
        assert_eq!(leak_fds(10).expect("open /dev/null"), 10);
        assert!(open_fds() >= before + 10);
        let rss = rss_bytes();
        leak_memory(8);
        assert!(rss_bytes() >= rss + 7 * 1024 * 1024);
    }
}
