//! What the listeners and every session share: the attribution, the metrics, per-pod
//! accounting, the memory budget and its client registry, the ACL log, the session settings
//! (swapped whole on reload), client ids, and the count of open connections that a drain
//! waits on.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

use crate::accounting::PodRegistry;
use crate::acl_log::AclLog;
use crate::attribution::Attribution;
use crate::budget::Budget;
use crate::config::SessionSettings;
use crate::metrics::ProxyMetrics;

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
