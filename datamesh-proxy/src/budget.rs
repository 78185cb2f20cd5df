//! The memory budget: every byte the proxy buffers for a client is counted against that
//! client and against one global budget, so that no client, and no crowd of clients, can push
//! the agent past its container's memory limit (an OOM-killed agent drops every pod of the
//! node at once).
//!
//! What is counted, per client ([`ClientMem`]):
//! - input: the read buffer's capacity, commands decoded but not dispatched, and the bytes of
//!   its commands on their way to a backend until their reply is in (in a backend queue, in
//!   flight, or in the hold queue: a request is kept for replay until answered);
//! - output: replies that are in but not written to the client yet (also those parked behind
//!   an earlier, slower reply), and pub/sub messages waiting to be written;
//! - held: memory kept for it outside those counts: a big reply a backend connection is still
//!   reading for it, and the written part of a big reply whose allocation is freed only once
//!   it is written in full (counted for the budget and the shedder's choice, not for the
//!   output limits, which count unwritten reply bytes as Redis does).
//!
//! Limits, with Redis's semantics (`client-output-buffer-limit`, `client-query-buffer-limit`,
//! `maxmemory-clients`):
//! - output: a hard limit closes the client at once; a soft limit closes it once it has been
//!   over it for the soft time. Subscribers have their own class (Redis: `pubsub 32mb 8mb 60`);
//! - input: past the query limit the client is not read further until its commands are
//!   answered (back-pressure, not a close: its bytes are bounded by the limit plus one read);
//! - global: past the budget nobody is read further, and the shedder closes the biggest
//!   clients first until the total is back under 90 % of the budget. Small clients are never
//!   shed while a bigger one exists.
//!
//! Cost: a client publishes its total to the global counter only when it moved by
//! [`PUBLISH_STEP`] or went back to zero, so small replies never touch a shared cache line;
//! each client's own counters are touched only by its session task (and read by the shedder).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use crate::accounting::PodStats;
use crate::clients::ClientInfo;
use crate::stopped;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// A client publishes its total to the global counter when it moved by this much.
pub const PUBLISH_STEP: u64 = 64 * 1024;
/// The shedder stops once the total is under this share of the budget.
const SHED_TO_PERCENT: u64 = 90;

/// When the budget was made (its clock for soft limits).
struct Epoch(Instant);

impl Default for Epoch {
    fn default() -> Self {
        Self(Instant::now())
    }
}

/// One output-buffer class: Redis's `<hard> <soft> <soft seconds>`; 0 = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutputLimit {
    pub hard: u64,
    pub soft: u64,
    pub soft_seconds: u64,
}

impl OutputLimit {
    pub const NONE: OutputLimit = OutputLimit {
        hard: 0,
        soft: 0,
        soft_seconds: 0,
    };
}

impl std::fmt::Display for OutputLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.hard, self.soft, self.soft_seconds)
    }
}

/// Why a client was closed by a limit or killed (also the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Closed {
    OutputHard = 1,
    OutputSoft = 2,
    /// Shed to bring the proxy back under its memory budget.
    Budget = 3,
    /// No command for `client_idle_timeout_s`.
    Idle = 4,
    /// A command was not complete `client_partial_timeout_ms` after its first byte.
    Partial = 5,
    /// Input not yet processed passed `client_query_buffer_limit`.
    QueryBuffer = 6,
    /// `CLIENT KILL` (closed without a last line, like Redis).
    Killed = 7,
    /// A drain (agent stop, worker retirement) closed it at a command boundary: every reply
    /// written, nothing unanswered, not in a transaction, subscription or blocking command
    /// (no last line: a clean close a pooled client sees before it reuses the connection).
    Drain = 8,
    /// A drain's deadline (`drain_timeout_ms`) closed it away from a command boundary (in a
    /// transaction, a subscription, a blocking command, or with replies owed).
    DrainDeadline = 9,
}

impl Closed {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Closed::OutputHard,
            2 => Closed::OutputSoft,
            3 => Closed::Budget,
            4 => Closed::Idle,
            5 => Closed::Partial,
            6 => Closed::QueryBuffer,
            7 => Closed::Killed,
            8 => Closed::Drain,
            9 => Closed::DrainDeadline,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Closed::OutputHard => "output_hard_limit",
            Closed::OutputSoft => "output_soft_limit",
            Closed::Budget => "memory_budget",
            Closed::Idle => "idle_timeout",
            Closed::Partial => "partial_command_timeout",
            Closed::QueryBuffer => "query_buffer_limit",
            Closed::Killed => "killed",
            Closed::Drain => "drain",
            Closed::DrainDeadline => "drain_deadline",
        }
    }

    /// The last line the client gets (when its socket takes it); empty for a killed or
    /// drained client (Redis closes connections on shutdown without a line either).
    pub fn message(self) -> &'static str {
        match self {
            Closed::OutputHard => "-ERR datamesh proxy: closing the connection: its replies not read passed the output buffer hard limit (client_output_buffer_limit)\r\n",
            Closed::OutputSoft => "-ERR datamesh proxy: closing the connection: its replies not read stayed over the output buffer soft limit (client_output_buffer_limit)\r\n",
            Closed::Budget => "-ERR datamesh proxy: closing the connection: the proxy is at its memory budget and this client buffers the most (memory_budget_bytes)\r\n",
            Closed::Idle => "-ERR datamesh proxy: closing the idle connection (client_idle_timeout_s)\r\n",
            Closed::Partial => "-ERR datamesh proxy: closing the connection: a command was not complete in time (client_partial_timeout_ms)\r\n",
            Closed::QueryBuffer => "-ERR datamesh proxy: closing the connection: its input not yet processed passed the query buffer limit (client_query_buffer_limit)\r\n",
            Closed::Killed | Closed::Drain | Closed::DrainDeadline => "",
        }
    }
}

/// The proxy-wide budget and the registry of clients the shedder chooses from.
#[derive(Default)]
pub struct Budget {
    limit: AtomicU64,
    used: AtomicI64,
    clients: Mutex<HashMap<u64, Arc<ClientMem>>>,
    over: Notify,
    /// Woken whenever a client's connection is closed ([`ClientMem::ended`]).
    ended: Notify,
    epoch: Epoch,
    pub metrics: BudgetMetrics,
}

/// The budget's metrics (registered by [`crate::metrics::ProxyMetrics::register`]).
#[derive(Default, Clone)]
pub struct BudgetMetrics {
    /// Bytes buffered for clients now (as published; within [`PUBLISH_STEP`] per client).
    pub buffered: Gauge,
    pub limit: Gauge,
    /// Clients closed by a limit or by `CLIENT KILL`, by kind ([`Closed::as_str`]).
    pub closed: Family<ReasonLabels, Counter>,
}

impl Budget {
    /// A budget of `limit` bytes (0 = no global budget).
    pub fn new(limit: u64, metrics: BudgetMetrics) -> Self {
        metrics.limit.set(limit as i64);
        Self {
            limit: AtomicU64::new(limit),
            used: AtomicI64::new(0),
            clients: Mutex::new(HashMap::new()),
            over: Notify::new(),
            ended: Notify::new(),
            epoch: Epoch::default(),
            metrics,
        }
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
        self.metrics.limit.set(limit as i64);
        self.over.notify_one();
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes counted now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed).max(0) as u64
    }

    /// True while the total is at or past the budget: nobody is read further.
    pub fn exhausted(&self) -> bool {
        let limit = self.limit();
        limit != 0 && self.used() >= limit
    }

    /// True past three quarters of the budget: clients then keep one command in flight.
    pub fn tight(&self) -> bool {
        let limit = self.limit();
        limit != 0 && self.used() >= limit / 4 * 3
    }

    fn now_ms(&self) -> u64 {
        self.epoch.0.elapsed().as_millis() as u64 + 1
    }

    /// A client's counters, registered for the shedder until [`ClientMem::release`].
    pub fn client(
        self: &Arc<Self>,
        id: u64,
        pod: Arc<PodStats>,
        limit: OutputLimit,
    ) -> Arc<ClientMem> {
        self.register(id, pod, limit, None)
    }

    /// [`Budget::client`] with the connection's entry for `CLIENT LIST`/`KILL`
    /// ([`crate::clients`]): sessions register this way, so the shedder's registry is also
    /// the client list (one map, one insert per connection).
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        pod: Arc<PodStats>,
        limit: OutputLimit,
        info: Option<ClientInfo>,
    ) -> Arc<ClientMem> {
        let m = Arc::new(ClientMem {
            id,
            pod,
            info,
            budget: self.clone(),
            input: AtomicU64::new(0),
            output: AtomicU64::new(0),
            held: AtomicU64::new(0),
            published: AtomicU64::new(0),
            hard: AtomicU64::new(limit.hard),
            soft: AtomicU64::new(limit.soft),
            soft_ms: AtomicU64::new(limit.soft_seconds * 1000),
            soft_since: AtomicU64::new(0),
            closed: AtomicU8::new(0),
            released: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        self.lock().insert(id, m.clone());
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ClientMem>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, delta: i64) {
        let now = self.used.fetch_add(delta, Ordering::Relaxed) + delta;
        self.metrics.buffered.set(now);
        let limit = self.limit();
        if delta > 0 && limit != 0 && now as u64 >= limit {
            self.over.notify_one();
        }
    }

    /// Closes the biggest clients until the total is under [`SHED_TO_PERCENT`] of the budget.
    /// Returns how many were closed.
    pub fn shed(&self) -> usize {
        let limit = self.limit();
        let used = self.used();
        if limit == 0 || used < limit {
            return 0;
        }
        let target = limit / 100 * SHED_TO_PERCENT;
        // Clients closed already release their bytes in a moment: not shed again, and the
        // others are not shed for those bytes.
        let mut releasing = 0;
        let mut by_size: Vec<(u64, Arc<ClientMem>)> = Vec::new();
        for m in self.lock().values() {
            if m.closed().is_some() {
                releasing += m.total();
            } else {
                by_size.push((m.total(), m.clone()));
            }
        }
        by_size.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        let mut left = used.saturating_sub(releasing);
        let mut n = 0;
        for (bytes, m) in by_size {
            if left < target || bytes == 0 {
                break;
            }
            if m.close(Closed::Budget) {
                warn!(client_id = m.id, pod = %m.pod.name(), buffered_bytes = bytes, used_bytes = used, budget_bytes = limit, "memory budget reached: closing the client that buffers the most");
                n += 1;
            }
            left = left.saturating_sub(bytes);
        }
        n
    }

    /// Runs the shedder until `stop`: woken when a client's publish passes the budget, and
    /// every 250 ms (closed clients release their bytes a moment later).
    pub fn spawn_shedder(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = self.over.notified() => {}
                    _ = tick.tick() => {}
                }
                self.check_soft_limits();
                if self.shed() > 0 {
                    // Let the closed sessions release their bytes before looking again.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    }

    /// Closes clients that stayed over their soft output limit for its time without new
    /// output (a client that stopped reading gets no new bytes, so its own checks stop).
    pub fn check_soft_limits(&self) {
        let over: Vec<Arc<ClientMem>> = self
            .lock()
            .values()
            .filter(|m| m.soft_since.load(Ordering::Relaxed) != 0 && m.closed().is_none())
            .cloned()
            .collect();
        for m in over {
            m.check_soft(m.output());
        }
    }

    /// Clients registered now (tests, `/debug`).
    /// Until every one of `clients` has its connection closed, or `bound` passed: `CLIENT
    /// KILL` answers after its victims are gone, as on Redis (a client that checks its socket
    /// before its next command, like phpredis, then reconnects instead of failing).
    pub async fn wait_ended(&self, clients: &[Arc<ClientMem>], bound: Duration) {
        let all = async {
            loop {
                let woken = self.ended.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if clients.iter().all(|c| c.has_ended()) {
                    return;
                }
                woken.await;
            }
        };
        let _ = tokio::time::timeout(bound, all).await;
    }

    pub fn clients(&self) -> usize {
        self.lock().len()
    }

    /// Every registered client with a [`ClientInfo`], by id (CLIENT LIST, CLIENT KILL).
    pub fn snapshot(&self) -> Vec<Arc<ClientMem>> {
        let mut v: Vec<Arc<ClientMem>> = self
            .lock()
            .values()
            .filter(|m| m.info.is_some())
            .cloned()
            .collect();
        v.sort_unstable_by_key(|m| m.id);
        v
    }

    /// Counts a close by `why` (the metric; [`ClientMem::close`] does it for closes it makes).
    pub fn count_closed(&self, why: Closed) {
        self.metrics
            .closed
            .get_or_create(&ReasonLabels {
                reason: why.as_str().to_string(),
            })
            .inc();
    }
}

/// One client's buffered bytes and limits (see the module docs). Written by its session task,
/// read by the shedder.
pub struct ClientMem {
    pub id: u64,
    pub pod: Arc<PodStats>,
    /// The connection as CLIENT LIST shows it (None for counters made without a session).
    info: Option<ClientInfo>,
    budget: Arc<Budget>,
    input: AtomicU64,
    output: AtomicU64,
    /// Bytes held outside `input` and `output` (see the module docs).
    held: AtomicU64,
    /// What this client has added to the global counter.
    published: AtomicU64,
    hard: AtomicU64,
    soft: AtomicU64,
    soft_ms: AtomicU64,
    /// When output went over the soft limit (ms since the budget's epoch; 0 = it is not).
    soft_since: AtomicU64,
    closed: AtomicU8,
    /// Its session ended: nothing more is published (a backend reader may still count a
    /// reply it assembles for it, until it sees the client gone).
    released: AtomicBool,
    /// Its connection is closed (after `closed`: the socket is shut down).
    ended: AtomicBool,
    /// A drain asks its session to close at its next command boundary
    /// ([`ClientMem::request_drain`]).
    drain: AtomicBool,
    waker: AtomicWaker,
}

impl ClientMem {
    pub fn info(&self) -> Option<&ClientInfo> {
        self.info.as_ref()
    }

    pub fn input(&self) -> u64 {
        self.input.load(Ordering::Relaxed)
    }

    pub fn output(&self) -> u64 {
        self.output.load(Ordering::Relaxed)
    }

    /// Bytes held for it outside its input and output counts (see the module docs).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.input() + self.output() + self.held()
    }

    /// The output class now in force (normal or pub/sub).
    pub fn set_output_limit(&self, l: OutputLimit) {
        self.hard.store(l.hard, Ordering::Relaxed);
        self.soft.store(l.soft, Ordering::Relaxed);
        self.soft_ms.store(l.soft_seconds * 1000, Ordering::Relaxed);
    }

    pub fn add_input(&self, n: u64) {
        if n != 0 {
            self.input.fetch_add(n, Ordering::Relaxed);
            self.sync();
        }
    }

    pub fn sub_input(&self, n: u64) {
        if n != 0 {
            self.input.fetch_sub(n, Ordering::Relaxed);
            self.sync();
        }
    }

    /// Reply or message bytes for the client: checks the output limits.
    pub fn add_output(&self, n: u64) {
        if n == 0 {
            return;
        }
        let out = self.output.fetch_add(n, Ordering::Relaxed) + n;
        let hard = self.hard.load(Ordering::Relaxed);
        if hard != 0 && out > hard {
            self.close(Closed::OutputHard);
        } else {
            self.check_soft(out);
        }
        self.sync();
    }

    /// Counts (`add`) or stops counting (`!add`) `n` bytes held for this client outside its
    /// input and output (a backend reader's reply still being assembled; a big reply's written
    /// part, until it is freed): they count for the global budget (and make this client the
    /// one to shed when they are the most), not for the output limits.
    pub fn held_bytes(&self, n: u64, add: bool) {
        if n == 0 {
            return;
        }
        if add {
            self.held.fetch_add(n, Ordering::Relaxed);
        } else {
            self.held.fetch_sub(n, Ordering::Relaxed);
        }
        self.sync();
    }

    /// Bytes written to the client (or dropped).
    pub fn sub_output(&self, n: u64) {
        if n == 0 {
            return;
        }
        let out = self.output.fetch_sub(n, Ordering::Relaxed) - n;
        self.check_soft(out);
        self.sync();
    }

    fn check_soft(&self, out: u64) {
        let soft = self.soft.load(Ordering::Relaxed);
        if soft == 0 || out <= soft {
            if self.soft_since.load(Ordering::Relaxed) != 0 {
                self.soft_since.store(0, Ordering::Relaxed);
            }
            return;
        }
        let now = self.budget.now_ms();
        let since = self.soft_since.load(Ordering::Relaxed);
        if since == 0 {
            self.soft_since.store(now, Ordering::Relaxed);
        } else if now - since >= self.soft_ms.load(Ordering::Relaxed) {
            self.close(Closed::OutputSoft);
        }
    }

    /// Publishes the client's total to the global counter when it moved enough. Safe from
    /// two threads at once (the session, and a backend reader counting a reply it is still
    /// holding): each publish moves `published` by a compare-and-swap and publishes exactly
    /// that move, and the total is looked at again after it, so the last caller leaves the
    /// global count matching the final total.
    fn sync(&self) {
        loop {
            if self.released.load(Ordering::SeqCst) {
                return;
            }
            let total = self.total();
            let published = self.published.load(Ordering::Relaxed);
            if total.abs_diff(published) < PUBLISH_STEP && (total != 0 || published == 0) {
                return;
            }
            if self
                .published
                .compare_exchange(published, total, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.budget.publish(total as i64 - published as i64);
                if self.released.load(Ordering::SeqCst) {
                    // Released meanwhile: what this call published is taken back.
                    self.unpublish();
                    return;
                }
            }
        }
    }

    fn unpublish(&self) {
        let published = self.published.swap(0, Ordering::Relaxed);
        if published != 0 {
            self.budget.publish(-(published as i64));
        }
    }

    /// Marks the client to be closed (the first reason wins) and wakes its session. False
    /// when it was closed already.
    pub fn close(&self, why: Closed) -> bool {
        let first = self
            .closed
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.budget.count_closed(why);
            self.waker.wake();
        }
        first
    }

    pub fn closed(&self) -> Option<Closed> {
        Closed::from_u8(self.closed.load(Ordering::Acquire))
    }

    /// Ready once the client is to be closed (a branch of the session's wait).
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<Closed> {
        if let Some(c) = self.closed() {
            return Poll::Ready(c);
        }
        self.waker.register(cx.waker());
        match self.closed() {
            Some(c) => Poll::Ready(c),
            None => Poll::Pending,
        }
    }

    /// Asks the session to close the connection at its next command boundary (a drain) and
    /// wakes it; unlike [`ClientMem::close`], nothing is closed yet.
    pub fn request_drain(&self) {
        if !self.drain.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// [`ClientMem::poll_closed`] that is also ready (with `None`) once a drain is requested,
    /// unless the session has `seen` it already: one more atomic load in the session's wait,
    /// nothing per command.
    pub fn poll_closed_or_drain(&self, cx: &mut Context<'_>, seen: bool) -> Poll<Option<Closed>> {
        if let Some(c) = self.closed() {
            return Poll::Ready(Some(c));
        }
        self.waker.register(cx.waker());
        // Looked at after the registration: a drain requested after this load wakes us.
        match self.closed() {
            Some(c) => Poll::Ready(Some(c)),
            None if !seen && self.drain.load(Ordering::Acquire) => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// The session ended: its bytes leave the global count and the shedder forgets it.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.unpublish();
        self.budget.lock().remove(&self.id);
        self.ended();
    }

    /// The client's connection is closed (its FIN is out): whoever waits for it
    /// ([`Budget::wait_ended`]) goes on.
    pub fn ended(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            self.budget.ended.notify_waiters();
        }
    }

    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

/// Parses Redis's `client-output-buffer-limit` class value: `<hard> <soft> <soft seconds>`,
/// sizes with Redis's units (`b`, `k`/`kb`, `m`/`mb`, `g`/`gb`; `k` = 1000, `kb` = 1024).
pub fn parse_output_limit(s: &str) -> Result<OutputLimit, String> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [hard, soft, secs] = parts[..] else {
        return Err(format!(
            "{s:?}: expected \"<hard> <soft> <soft seconds>\" like Redis's client-output-buffer-limit, e.g. \"32mb 8mb 60\""
        ));
    };
    Ok(OutputLimit {
        hard: parse_size(hard)?,
        soft: parse_size(soft)?,
        soft_seconds: secs
            .parse()
            .map_err(|_| format!("{secs:?}: soft seconds must be a whole number"))?,
    })
}

/// A size with Redis's units (see [`parse_output_limit`]).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let split = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 64mb, 512kb or 1048576"))?;
    let mul: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (b, k, kb, m, mb, g, gb)"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Arc<PodStats> {
        Arc::new(PodStats::new(0, name.into(), 0, 0))
    }

    fn limit(hard: u64, soft: u64, secs: u64) -> OutputLimit {
        OutputLimit {
            hard,
            soft,
            soft_seconds: secs,
        }
    }

    #[test]
    fn sizes_and_classes_parse_like_redis() {
        assert_eq!(parse_size("64mb"), Ok(64 << 20));
        assert_eq!(parse_size("1k"), Ok(1000));
        assert_eq!(parse_size("1KB"), Ok(1024));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("12xb").is_err());
        assert!(parse_size("mb").is_err());
        assert_eq!(
            parse_output_limit("32mb 8mb 60"),
            Ok(limit(32 << 20, 8 << 20, 60))
        );
        assert_eq!(parse_output_limit("0 0 0"), Ok(OutputLimit::NONE));
        assert!(parse_output_limit("32mb 8mb").is_err());
    }

    #[test]
    fn hard_limit_closes_at_once() {
        let b = Arc::new(Budget::new(0, BudgetMetrics::default()));
        let m = b.client(1, pod("p"), limit(1000, 0, 0));
        m.add_output(1000);
        assert_eq!(m.closed(), None);
        m.add_output(1);
        assert_eq!(m.closed(), Some(Closed::OutputHard));
        m.release();
        assert_eq!(b.clients(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn soft_limit_closes_after_its_time() {
        let b = Arc::new(Budget::new(0, BudgetMetrics::default()));
        let m = b.client(1, pod("p"), limit(0, 100, 2));
        m.add_output(150);
        tokio::time::advance(Duration::from_millis(1500)).await;
        m.add_output(1);
        assert_eq!(m.closed(), None);
        // Back under the soft limit: the clock starts again.
        m.sub_output(100);
        m.add_output(100);
        tokio::time::advance(Duration::from_millis(1500)).await;
        m.add_output(1);
        assert_eq!(m.closed(), None);
        tokio::time::advance(Duration::from_millis(600)).await;
        m.add_output(1);
        assert_eq!(m.closed(), Some(Closed::OutputSoft));
    }

    #[test]
    fn small_changes_stay_local_and_release_returns_everything() {
        let b = Arc::new(Budget::new(0, BudgetMetrics::default()));
        let m = b.client(1, pod("p"), OutputLimit::NONE);
        m.add_input(100);
        m.add_output(100);
        assert_eq!(b.used(), 0, "below the publish step");
        m.add_output(PUBLISH_STEP);
        assert_eq!(b.used(), PUBLISH_STEP + 200);
        m.sub_output(PUBLISH_STEP + 100);
        m.sub_input(100);
        assert_eq!(b.used(), 0, "back to zero is always published");
        m.add_input(PUBLISH_STEP * 2);
        m.release();
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn the_biggest_clients_are_shed_first() {
        let b = Arc::new(Budget::new(10 * PUBLISH_STEP, BudgetMetrics::default()));
        let small = b.client(1, pod("bystander"), OutputLimit::NONE);
        let big = b.client(2, pod("attacker"), OutputLimit::NONE);
        let mid = b.client(3, pod("other"), OutputLimit::NONE);
        small.add_output(PUBLISH_STEP);
        mid.add_output(3 * PUBLISH_STEP);
        assert_eq!(b.shed(), 0, "under the budget");
        big.add_input(7 * PUBLISH_STEP);
        assert!(b.exhausted());
        assert_eq!(b.shed(), 1);
        assert_eq!(big.closed(), Some(Closed::Budget));
        assert_eq!((small.closed(), mid.closed()), (None, None));
        // Until the closed client releases, it is not chosen again, and the others are not
        // shed for its bytes.
        assert_eq!(b.shed(), 0);
        big.release();
        assert!(!b.exhausted());
    }
}
