//! The hold queue: commands that wait for a usable node instead of failing.
//!
//! A command comes here when its endpoint has no usable node for it now:
//! - at dispatch: the topology names no node (no Sentinel master yet, a slot without owner),
//!   or the node is down or loading, or an earlier command of the same client is held;
//! - from a shared connection that failed or refused it ([`Returns`]): decided by replay class
//!   (never written, or written and read-only: held; written and a write: answered "may have
//!   been executed"; past its command deadline: answered with the timeout);
//! - from the router, after a reply proving the command did not run (`LOADING`,
//!   `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`, `READONLY`, `NOAUTH`).
//!
//! One task per endpoint drains it, in arrival order, whenever the topology, a node's health
//! or the queue changes: each command whose node is usable is submitted to that node's shared
//! connection for its client, the others wait. Per-client order: once a client has a command
//! that must wait, its later ones wait too ([`ClientGate`]), and a client with held commands
//! sends its new ones through the queue as well, so none overtakes an earlier one.
//!
//! Bounds: a command waits at most `failover_hold_ms` (then its client gets
//! [`BackendError::HoldExpired`], naming the endpoint and the cause); the queue holds at most
//! `hold_max_bytes` per endpoint and `hold_max_client_bytes` per client (beyond: answered at
//! once). A command of a client that has gone is dropped, never sent.
//!
//! While commands wait on a down node, the node is reported to the topology again every
//! [`REPORT_EVERY`] (100 ms), so Sentinel is asked again and the cluster slot map refreshed until the
//! topology names another node.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::debug;

use crate::backend::conn::{ReplyTx, Submission};
use crate::backend::{BackendError, Outcome, PoolKey, Returned, Returns, Unanswered};
use crate::metrics::GroupMetrics;
use crate::request::{ReplayClass, Request, Target};

/// What the hold queue needs of its endpoint's request path (the router).
pub trait Path: Send + Sync + 'static {
    /// The node for `target` if commands may go to it now, else why not and the node to
    /// report to the topology.
    fn usable_node(
        &self,
        target: Target,
        pinned: Option<SocketAddr>,
        avoid: Option<SocketAddr>,
    ) -> Result<SocketAddr, (String, Option<SocketAddr>)>;
    /// Submits `batch` (commands of `client`) to that client's shared connection of `node`.
    fn submit(&self, node: SocketAddr, target: Target, client: u64, batch: &mut Vec<Submission>);
    /// Tells the topology that `node`, which held commands wait for, is not usable.
    fn report(&self, node: SocketAddr);
    /// Topology generations and node health changes.
    fn changes(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<u64>,
        tokio::sync::watch::Receiver<u64>,
    );
}

/// How often a node that held commands wait for is reported to the topology again.
pub const REPORT_EVERY: Duration = Duration::from_millis(100);

/// Bounds of the hold queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldSettings {
    /// How long a command may wait for a usable node (zero: commands are never held).
    pub hold: Duration,
    pub max_bytes: usize,
    pub max_client_bytes: usize,
}

impl HoldSettings {
    /// No holding: every command that finds no usable node fails at once.
    pub fn off() -> Self {
        Self {
            hold: Duration::ZERO,
            max_bytes: 0,
            max_client_bytes: 0,
        }
    }
}

/// Why a command is held, for the replay metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldFor {
    /// No usable node when it was dispatched (not a replay).
    Dispatch,
    /// Handed back by a failed connection, by its class.
    Returned(ReplayClass),
    /// A reply proved it did not run.
    NotRun,
}

/// One held command.
pub struct Held {
    pub request: Request,
    pub reply: ReplyTx,
    /// Where it goes (its slot and read-only-ness are its route's).
    pub target: Target,
    /// When it started waiting (kept across waits, so the bound is for the whole command).
    pub since: Instant,
    /// Not before then (a backoff after TRYAGAIN/CLUSTERDOWN, a connection's backoff).
    pub not_before: Option<Instant>,
    /// Not to this node (it answered READONLY: wait for the topology to name another).
    pub avoid: Option<SocketAddr>,
    /// Why it waits now (the error its client gets when the wait is over).
    pub cause: String,
}

#[derive(Default)]
struct Queue {
    held: VecDeque<Held>,
    bytes: usize,
    last_report: Option<Instant>,
    /// Since when the queue is not empty.
    busy_since: Option<Instant>,
}

/// One endpoint's hold queue (see the module docs).
pub struct Holder {
    endpoint: String,
    settings: HoldSettings,
    queue: Mutex<Queue>,
    wake: Notify,
    metrics: GroupMetrics,
}

/// What [`Holder::snapshot`] shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HoldInfo {
    pub depth: usize,
    pub bytes: usize,
    pub oldest_ms: u64,
}

impl Holder {
    pub fn new(endpoint: String, settings: HoldSettings, metrics: GroupMetrics) -> Self {
        Self {
            endpoint,
            settings,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            metrics,
        }
    }

    pub fn settings(&self) -> HoldSettings {
        self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> HoldInfo {
        let q = self.lock();
        HoldInfo {
            depth: q.held.len(),
            bytes: q.bytes,
            oldest_ms: q
                .held
                .iter()
                .map(|h| h.since.elapsed().as_millis() as u64)
                .max()
                .unwrap_or(0),
        }
    }

    /// Queues `h`, or hands it back with the reason when holding is off or the queue is full.
    pub fn hold(&self, h: Held, why: HeldFor) -> Result<(), Box<(Held, String)>> {
        let len = h.request.raw.len();
        if self.settings.hold.is_zero() {
            return Err(Box::new((h, "is off (failover_hold_ms: 0)".into())));
        }
        if h.request
            .gate
            .as_ref()
            .is_some_and(|g| g.held_bytes() + len > self.settings.max_client_bytes)
        {
            self.metrics.hold_full.inc();
            return Err(Box::new((
                h,
                format!(
                    "is full for this client (hold_max_client_bytes: {})",
                    self.settings.max_client_bytes
                ),
            )));
        }
        {
            let mut q = self.lock();
            if q.bytes + len > self.settings.max_bytes {
                drop(q);
                self.metrics.hold_full.inc();
                return Err(Box::new((
                    h,
                    format!("is full (hold_max_bytes: {})", self.settings.max_bytes),
                )));
            }
            if let Some(g) = &h.request.gate {
                g.add_held(len);
            }
            q.busy_since.get_or_insert_with(Instant::now);
            q.bytes += len;
            q.held.push_back(h);
            self.metrics.hold_depth.set(q.held.len() as i64);
            self.metrics.hold_bytes.set(q.bytes as i64);
        }
        self.metrics.held.inc();
        match why {
            HeldFor::Dispatch => {}
            HeldFor::Returned(ReplayClass::NeverWritten) => {
                self.metrics.replay_never_written.inc();
            }
            HeldFor::Returned(_) => {
                self.metrics.replay_read_only.inc();
            }
            HeldFor::NotRun => {
                self.metrics.replay_not_run.inc();
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Holds `request` for a usable node; the returned receiver gets its outcome. When it
    /// cannot be held, the outcome is the error at once.
    pub fn hold_request(
        &self,
        request: Request,
        target: Target,
        cause: String,
    ) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let h = Held {
            request,
            reply: tx,
            target,
            since: Instant::now(),
            not_before: None,
            avoid: None,
            cause,
        };
        if let Err(e) = self.hold(h, HeldFor::Dispatch) {
            let (h, why) = *e;
            self.refuse(h, why);
        }
        rx
    }

    /// Answers a command that could not be held (never sent).
    fn refuse(&self, h: Held, why: String) {
        let error = BackendError::NotHeld {
            addr: h.request.route.node.unwrap_or(UNSPECIFIED),
            endpoint: self.endpoint.clone(),
            cause: h.cause.clone(),
            why,
        };
        answer(h.reply, h.request, error, false);
    }

    /// One pass over the queue (see the module docs). Returns when to look again at the
    /// latest (a deadline or a backoff ends), if anything still waits.
    pub(crate) fn drain(&self, router: &impl Path) -> Option<Instant> {
        let now = Instant::now();
        let mut out: Vec<(SocketAddr, Target, u64, Submission)> = Vec::new();
        let mut finished: Vec<(Held, BackendError)> = Vec::new();
        let mut report: Vec<SocketAddr> = Vec::new();
        let mut next: Option<Instant> = None;
        let mut released: Vec<(Option<crate::request::ClientGate>, usize)> = Vec::new();
        let wait = |next: &mut Option<Instant>, t: Instant| {
            *next = Some(next.map_or(t, |n| n.min(t)));
        };
        {
            let mut q = self.lock();
            if q.held.is_empty() {
                return None;
            }
            let mut keep: VecDeque<Held> = VecDeque::with_capacity(q.held.len());
            let mut blocked: HashSet<u64> = HashSet::new();
            let held = std::mem::take(&mut q.held);
            for mut h in held {
                let client = h.request.order.client;
                let gone =
                    h.reply.is_closed() || h.request.gate.as_ref().is_some_and(|g| g.is_gone());
                if gone {
                    self.metrics.hold_gone.inc();
                    released.push((h.request.gate.clone(), h.request.raw.len()));
                    finished.push((h, BackendError::ClientGone { addr: UNSPECIFIED }));
                    continue;
                }
                let deadline = h.since + self.settings.hold;
                if now >= deadline {
                    self.metrics.hold_expired.inc();
                    released.push((h.request.gate.clone(), h.request.raw.len()));
                    let error = BackendError::HoldExpired {
                        addr: h.request.route.node.unwrap_or(UNSPECIFIED),
                        endpoint: self.endpoint.clone(),
                        held_ms: now.duration_since(h.since).as_millis() as u64,
                        cause: h.cause.clone(),
                    };
                    finished.push((h, error));
                    continue;
                }
                if blocked.contains(&client) {
                    wait(&mut next, deadline);
                    keep.push_back(h);
                    continue;
                }
                if let Some(nb) = h.not_before.filter(|nb| *nb > now) {
                    wait(&mut next, nb.min(deadline));
                    blocked.insert(client);
                    keep.push_back(h);
                    continue;
                }
                match router.usable_node(h.target, h.request.route.node, h.avoid) {
                    Ok(node) => {
                        released.push((h.request.gate.clone(), h.request.raw.len()));
                        out.push((
                            node,
                            h.target,
                            client,
                            Submission {
                                request: h.request,
                                reply: h.reply,
                                timed: true,
                            },
                        ));
                    }
                    Err((cause, node)) => {
                        h.cause = cause;
                        report.extend(node);
                        wait(&mut next, deadline);
                        blocked.insert(client);
                        keep.push_back(h);
                    }
                }
            }
            q.held = keep;
            for (_, len) in &released {
                q.bytes -= len;
            }
            if q.held.is_empty() {
                if let Some(t) = q.busy_since.take() {
                    let waited = now.duration_since(t);
                    self.metrics.recoveries.observe(waited.as_secs_f64());
                    debug!(endpoint = %self.endpoint, waited_ms = waited.as_millis() as u64, "hold queue empty again");
                }
            }
            self.metrics.hold_depth.set(q.held.len() as i64);
            self.metrics.hold_bytes.set(q.bytes as i64);
            let due = q.last_report.is_none_or(|t| now >= t + REPORT_EVERY);
            if due && !report.is_empty() {
                q.last_report = Some(now);
            } else {
                report.clear();
            }
            if !q.held.is_empty() {
                // Look again at the next report at the latest.
                let r = now + REPORT_EVERY;
                next = Some(next.map_or(r, |n| n.min(r)));
            }
        }
        // Outside the lock: submitting may hand commands straight back (a connection that
        // refuses them), and answers wake sessions.
        report.sort();
        report.dedup();
        for node in report {
            router.report(node);
        }
        let sent = out.len();
        let mut batch: Vec<Submission> = Vec::new();
        let mut cur: Option<(SocketAddr, Target, u64)> = None;
        for (node, target, client, s) in out {
            if cur.is_some_and(|c| c != (node, target, client)) {
                if let Some((n, t, c)) = cur {
                    router.submit(n, t, c, &mut batch);
                }
            }
            cur = Some((node, target, client));
            batch.push(s);
        }
        if let Some((n, t, c)) = cur {
            router.submit(n, t, c, &mut batch);
        }
        self.metrics.hold_sent.inc_by(sent as u64);
        for (gate, len) in released {
            if let Some(g) = gate {
                g.release_held(len);
            }
        }
        for (h, error) in finished {
            answer(h.reply, h.request, error, false);
        }
        if sent > 0 {
            debug!(endpoint = %self.endpoint, sent, "held commands sent");
        }
        next
    }
}

/// Placeholder address of errors that concern no node, and of calls not sent yet.
pub(crate) const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Answers a command that gets no reply from a backend.
fn answer(reply: ReplyTx, request: Request, error: BackendError, written: bool) {
    let _ = reply.send(Outcome::Unanswered(Box::new(Unanswered {
        addr: error.addr(),
        request,
        written,
        error,
    })));
}

impl Returns for Holder {
    fn holds(&self) -> bool {
        !self.settings.hold.is_zero()
    }
    /// Decides each command a failed or refusing shared connection hands back (see the
    /// module docs).
    fn returned(
        &self,
        key: PoolKey,
        entries: Vec<Returned>,
        error: &BackendError,
        retry_at: Option<Instant>,
    ) {
        let now = Instant::now();
        let cause = error.to_string();
        for e in entries {
            let class = if e.written {
                e.request.class
            } else {
                ReplayClass::NeverWritten
            };
            if e.overdue || !class.replay_safe() {
                // Past its deadline, or it may have run: its client decides.
                answer(e.reply, e.request, error.clone(), e.written);
                continue;
            }
            let written = e.written;
            let target = Target {
                slot: e.request.route.slot,
                readonly: e.request.route.readonly,
                db: key.db,
                proto: key.proto,
            };
            let h = Held {
                request: e.request,
                reply: e.reply,
                target,
                since: now,
                not_before: retry_at,
                avoid: None,
                cause: cause.clone(),
            };
            if let Err(refused) = self.hold(h, HeldFor::Returned(class)) {
                let (h, why) = *refused;
                if self.settings.hold.is_zero() {
                    // Holding is off: the error as it is.
                    answer(h.reply, h.request, error.clone(), written);
                } else {
                    self.refuse(h, why);
                }
            }
        }
    }
}

/// Drains `holder` for `router` whenever the topology, a node's health or the queue changes,
/// or a wait ends; ends with the router.
pub(crate) async fn run<P: Path>(router: Weak<P>, holder: Arc<Holder>) {
    let (mut topology, mut health) = match router.upgrade() {
        Some(r) => r.changes(),
        None => return,
    };
    loop {
        let next = match router.upgrade() {
            Some(r) => holder.drain(r.as_ref()),
            None => return,
        };
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = holder.wake.notified() => {}
            r = topology.changed() => if r.is_err() { return },
            r = health.changed() => if r.is_err() { return },
            _ = sleep => {}
        }
    }
}
