//! What the listeners and every session share: the attribution, the metrics, per-pod
//! accounting, the memory budget and its client registry, the ACL log, the session settings
//! (swapped whole on reload), client ids, the count of open connections, and the drain.
//!
//! The drain (agent stop, worker retirement): [`Shared::drain`] marks every session (through
//! its [`ClientMem`](crate::budget::ClientMem), as `CLIENT KILL` does, never touching its
//! socket) to close its connection at its next command boundary; what is still open at the
//! deadline is closed there. Each close is counted by how
//! (`datamesh_proxy_drain_closed_total{how="boundary"|"deadline"}`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

use crate::accounting::PodRegistry;
use crate::acl_log::AclLog;
use crate::attribution::Attribution;
use crate::budget::{Budget, Closed};
use crate::config::SessionSettings;
use crate::metrics::{HowLabels, ProxyMetrics};

/// After the drain deadline, how long the connections closed there get to shut down (their
/// sessions see the close at once; this bounds a stuck one).
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// What a drain did ([`Shared::drain`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections closed at a command boundary.
    pub boundary: u64,
    /// Connections closed at the deadline, away from a boundary (in a transaction, a
    /// subscription or a blocking command, or with replies owed).
    pub deadline: u64,
    /// Connections still open when the drain returned (a stuck session; closed abruptly when
    /// the process exits).
    pub left: usize,
    /// How long the drain took.
    pub elapsed: Duration,
}

/// State shared by the listeners and the connection tasks.
pub struct Shared {
    pub attribution: Arc<dyn Attribution>,
    pub metrics: Arc<ProxyMetrics>,
    pub pod_limits: Arc<PodRegistry>,
    /// The memory budget every client's buffered bytes count against; its registry of
    /// clients is also the one CLIENT LIST and CLIENT KILL look at ([`crate::clients`]).
    pub budget: Arc<Budget>,
    /// Failed AUTHs and policy refusals (`ACL LOG`).
    pub acl_log: AclLog,
    /// Keys with big replies (`/bigkeys`).
    pub bigkeys: Arc<crate::bigkeys::BigKeys>,
    /// Key rules (throttle, deny): config, runtime and automatic ones.
    pub keyrules: Arc<crate::keyrules::KeyRules>,
    /// Cache-penetration and key-scan detection per pod and endpoint (`/attacks`).
    pub attacks: Arc<crate::attacks::Attacks>,
    settings: RwLock<Arc<SessionSettings>>,
    /// Bumped on every settings swap: sessions keep their copy and look only at this.
    generation: AtomicU64,
    client_ids: AtomicU64,
    open: AtomicUsize,
    idle: Notify,
    /// A drain has begun: sessions made from now on close at their first boundary.
    draining: AtomicBool,
    drained_boundary: AtomicU64,
    drained_deadline: AtomicU64,
}

impl Shared {
    pub fn new(
        attribution: Arc<dyn Attribution>,
        metrics: Arc<ProxyMetrics>,
        pod_limits: Arc<PodRegistry>,
        settings: SessionSettings,
    ) -> Self {
        let budget = metrics.budget.clone();
        budget.set_limit(settings.memory_budget);
        let attacks = Arc::new(crate::attacks::Attacks::new(
            pod_limits.clone(),
            metrics.attacks.clone(),
        ));
        Self {
            attribution,
            metrics,
            pod_limits,
            budget,
            acl_log: AclLog::default(),
            bigkeys: Arc::default(),
            keyrules: Arc::default(),
            attacks,
            settings: RwLock::new(Arc::new(settings)),
            generation: AtomicU64::new(0),
            client_ids: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            idle: Notify::new(),
            draining: AtomicBool::new(false),
            drained_boundary: AtomicU64::new(0),
            drained_deadline: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> Arc<SessionSettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_settings(&self, s: SessionSettings) {
        self.budget.set_limit(s.memory_budget);
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Changes whenever [`Shared::set_settings`] swaps the settings (one atomic load, where
    /// [`Shared::settings`] takes a lock).
    pub fn settings_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn next_client_id(&self) -> u64 {
        self.client_ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A client connection opened.
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Ordering::SeqCst);
    }

    /// A client connection closed (wakes a drain when it was the last).
    pub(crate) fn closed(&self) {
        if self.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Begins the drain: every session is asked to close its connection at its next command
    /// boundary (a session registered later sees [`Shared::is_draining`] when it starts: the
    /// flag is set before the registry is read, and a session registers before it reads the
    /// flag, so none is missed). Stop the accept loops first.
    pub fn start_drain(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        for m in self.budget.snapshot() {
            m.request_drain();
        }
    }

    /// A session closed its connection for a drain (`why` = [`Closed::Drain`] or
    /// [`Closed::DrainDeadline`]).
    pub(crate) fn count_drain_close(&self, why: Closed) {
        let (n, how) = match why {
            Closed::Drain => (&self.drained_boundary, "boundary"),
            Closed::DrainDeadline => (&self.drained_deadline, "deadline"),
            _ => return,
        };
        n.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .drain_closed
            .get_or_create(&HowLabels {
                how: how.to_string(),
            })
            .inc();
    }

    /// Drains: every connection is closed at its next command boundary (an idle one at
    /// once, a busy one right after the reply that ends its last command, one in a
    /// transaction, subscription or blocking command when it leaves it), and the ones still
    /// open after `timeout` are closed then. Returns when none is open (or, after the
    /// deadline, [`DEADLINE_GRACE`] later). Stop the accept loops first.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let t0 = tokio::time::Instant::now();
        self.start_drain();
        let mut left = self.wait_closed(t0 + timeout).await;
        if left > 0 {
            for m in self.budget.snapshot() {
                m.close(Closed::DrainDeadline);
            }
            left = self
                .wait_closed(tokio::time::Instant::now() + DEADLINE_GRACE)
                .await;
        }
        DrainReport {
            boundary: self.drained_boundary.load(Ordering::Relaxed),
            deadline: self.drained_deadline.load(Ordering::Relaxed),
            left,
            elapsed: t0.elapsed(),
        }
    }

    /// Waits until no connection is open, or `deadline`. Returns the number still open.
    async fn wait_closed(&self, deadline: tokio::time::Instant) -> usize {
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
