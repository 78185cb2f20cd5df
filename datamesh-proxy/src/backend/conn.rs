//! One backend connection and its in-flight queue.
//!
//! Every command is an [`InFlight`] entry holding the whole [`Request`] (bytes, replay class,
//! client order) and the way back to the router that sent it (a oneshot that receives an
//! [`Outcome`]). An entry is `Queued` until it is taken into a write and `Written` after
//! that; it leaves the queue when the reader task matches its reply (Redis
//! answers in order). When the connection dies, every entry goes back to its router as
//! [`Unanswered`], with its request and whether it was written, so nothing about a command is
//! lost with its connection ([`Conn::snapshot`] shows the queue at any moment).
//!
//! A shared connection's queue is written by its group's [`Flusher`]: once per runtime tick,
//! after every session ready in that tick has queued its commands, in ONE write, and the
//! connections in the order they got commands (see [`super::flusher`]). That batching is what
//! makes pipeline depth 1 fast (one send per tick per connection instead of one per command;
//! writing straight from each session measured ~25% slower for that reason). A dedicated
//! connection writes a client's commands straight to its socket when nothing else is being
//! written: it carries one client's commands, and writing them at once keeps them ahead of
//! other clients' commands read after them (an UNSUBSCRIBE before another client's PUBLISH, a
//! BLPOP before another client's LPUSH). Each connection's writer task writes what the socket
//! did not take whole, what was queued while connecting, and queues beyond one batch.
//!
//! Life of a connection ([`Phase`]): `Idle` → `Connecting` → `Up`; a shared connection that
//! fails goes `Down` and connects again at the first command after its jittered backoff (at
//! once after a live connection died, later after failed connects); while it is in backoff,
//! commands for it fail fast instead of piling up. A dedicated connection that fails is
//! `Failed` for good. `Closed` is the proxy's own decision (pool dropped, not reusable).
//!
//! With `command_timeout_ms`, the reader checks the oldest written entry's deadline on a
//! coarse tick (a quarter of the timeout): one timer per connection, none per command. A
//! connection whose oldest command is overdue is failed, since its later replies can no longer
//! be trusted to come.
//!
//! Architecture Invariant: a connection's reply is matched to the oldest `Written` entry and
//! nothing else; any reply without one (a desync, or unsolicited bytes on an idle connection)
//! kills the connection rather than guess.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::flusher::{Flush, Flusher};
use super::health::NodeHealth;
use super::outcome::{Returned, Returns};
use super::{
    connect, handshake, BackendError, Backoff, Cause, ConnectSpec, Outcome, PoolKey, Unanswered,
};
use crate::budget::ClientMem;
use crate::metrics::GroupMetrics;
use crate::request::{ClientGate, Request};
use crate::resp::{Limits, Reply, ReplyDecoder, ReplyKind};

/// Where an in-flight command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlightState {
    /// In the queue, not handed to the socket yet: always safe to send elsewhere.
    Queued,
    /// Taken into a write (possibly partially sent): the backend may have run it.
    Written,
}

/// Delivered reply bytes past which a reader yields before it reads more.
const YIELD_AFTER_BYTES: usize = 256 * 1024;

/// A backend read buffer that grew past this for a big reply is dropped once it is drained, so a
/// pooled connection does not keep its largest reply's allocation for its whole life (pool size
/// x the largest reply ever, outside the memory budget).
const READ_BUF_KEEP: usize = 256 * 1024;

/// A reply being assembled is counted against its client once the read buffer holding it is
/// this big (smaller ones are bounded per connection by this plus one read).
const CHARGE_FROM: usize = READ_BUF_KEEP;

/// How often a reader paused at the memory budget looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(10);

/// A reply still being assembled in a connection's read buffer, counted against the client it
/// answers ([`ClientMem::held_bytes`]): the global memory budget sees it while it
/// arrives, and the shedder can close that client for it, not only once it is complete.
#[derive(Default)]
struct Assembling {
    mem: Option<Arc<ClientMem>>,
    bytes: u64,
}

impl Assembling {
    /// Counts `bytes` against `mem` (and nothing against anyone else).
    fn set(&mut self, mem: Option<&Arc<ClientMem>>, bytes: u64) {
        let same = match (&self.mem, mem) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.clear();
            self.mem = mem.cloned();
        }
        let Some(m) = &self.mem else {
            return;
        };
        if bytes > self.bytes {
            m.held_bytes(bytes - self.bytes, true);
        } else {
            m.held_bytes(self.bytes - bytes, false);
        }
        self.bytes = bytes;
    }

    fn clear(&mut self) {
        if let Some(m) = self.mem.take() {
            m.held_bytes(self.bytes, false);
        }
        self.bytes = 0;
    }
}

impl Drop for Assembling {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The way back to the router that sent a command.
pub type ReplyTx = oneshot::Sender<Outcome>;

/// One command on a connection.
struct InFlight {
    id: u64,
    request: Request,
    state: FlightState,
    since: Instant,
    /// None for commands that may block (blocking pops): only the client's own timeout ends
    /// them.
    deadline: Option<Instant>,
    reply: Option<ReplyTx>,
}

/// What a session hands a connection: a request, where its outcome goes, whether the
/// command timeout applies.
pub struct Submission {
    pub request: Request,
    pub reply: ReplyTx,
    pub timed: bool,
}

/// What [`Conn::snapshot`] shows of an in-flight command.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InFlightInfo {
    pub id: u64,
    pub state: FlightState,
    pub class: crate::request::ReplayClass,
    pub client: u64,
    pub seq: u64,
    pub bytes: usize,
    pub age_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum Phase {
    /// Never connected (lazy pool slot).
    Idle,
    Connecting,
    Up,
    /// Failed; connects again at the first command after `retry_in_ms`.
    Down {
        error: String,
        retry_in_ms: u64,
    },
    /// A dedicated connection that failed: never used again.
    Failed {
        error: String,
    },
    /// Closed by the proxy (pool dropped, dedicated connection not reusable).
    Closed,
}

/// Where the connection is in its life, with its error as a value (what [`Phase`] shows as
/// text).
#[derive(Debug, Clone)]
enum Stage {
    Idle,
    Connecting,
    Up,
    Down {
        error: BackendError,
        retry_at: Instant,
        /// When it failed (a node back up since then ends the backoff).
        at: Instant,
    },
    Failed {
        error: BackendError,
    },
    Closed,
}

struct State {
    phase: Stage,
    backoff: Backoff,
    queue: VecDeque<InFlight>,
    /// `queue[..written]` are `Written`.
    written: usize,
    /// Bumped per connection attempt: tasks of an older attempt never touch the queue.
    generation: u64,
    tasks: Vec<AbortHandle>,
    /// Close once the queue is empty (the pool was replaced by a config reload).
    draining: bool,
    /// The socket's write side while up (a dedicated connection's commands are written
    /// through it at once when nothing is being written).
    wr: Option<Arc<OwnedWriteHalf>>,
    /// Bytes a write left unwritten, written next by the writer.
    carry: Bytes,
    /// The writer has bytes in a write: nobody else may write now.
    busy: bool,
    /// On the flusher's list for its next flush.
    listed: bool,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Largest write: a huge pipeline is cut so it does not need one huge buffer.
const BATCH: usize = 256 * 1024;
/// Commands at least this large are written from their own bytes, never copied.
const ZERO_COPY_MIN: usize = 64 * 1024;

/// Where replies go when a dedicated connection is in pub/sub mode: every frame, in order.
pub type PushSink = mpsc::UnboundedSender<Result<Reply, BackendError>>;

/// One backend connection with its in-flight queue (see the module docs).
pub struct Conn {
    /// Unique per process (a session's dedicated lane is identified by it).
    pub id: u64,
    pub key: PoolKey,
    spec: Arc<ConnectSpec>,
    metrics: GroupMetrics,
    dedicated: bool,
    command_timeout: Option<Duration>,
    state: Mutex<State>,
    wake_writer: Notify,
    /// Woken (notify_waiters) on every phase change, for [`Conn::connect_now`].
    phase_changed: Notify,
    next_id: AtomicU64,
    /// In pub/sub mode every frame goes here instead of being matched to the queue.
    push_sink: Mutex<Option<PushSink>>,
    /// Server version learned at the handshake (for HELLO answers).
    version: Arc<OnceLock<String>>,
    /// Writes a shared connection's commands once per tick, in order (dedicated: none).
    flusher: Option<Arc<Flusher>>,
    /// Down, failed or closed (a hint read per command without the lock; the phase decides).
    troubled: AtomicBool,
    /// The node's health: failures mark it down; its recovery ends this connection's backoff.
    node: Arc<NodeHealth>,
    /// Where a shared connection hands back what it could not answer (the hold queue); None:
    /// every such command goes back to its caller as [`Unanswered`] (dedicated connections).
    returns: Option<Arc<dyn Returns>>,
    /// Writes made (tests check the batching).
    #[cfg(test)]
    pub(crate) writes: AtomicU64,
}

/// What every connection of one pool shares.
#[derive(Clone)]
pub(crate) struct PoolCtx {
    pub key: PoolKey,
    pub spec: Arc<ConnectSpec>,
    pub metrics: GroupMetrics,
    pub command_timeout: Option<Duration>,
    pub version: Arc<OnceLock<String>>,
    pub node: Arc<NodeHealth>,
}

impl Conn {
    /// A connection of the pool `ctx`: shared ones have the group's `flusher` and hand what
    /// they cannot answer to `returns`; dedicated ones have neither.
    pub(crate) fn new(
        ctx: &PoolCtx,
        dedicated: bool,
        flusher: Option<Arc<Flusher>>,
        returns: Option<Arc<dyn Returns>>,
    ) -> Arc<Self> {
        let PoolCtx {
            key,
            spec,
            metrics,
            command_timeout,
            version,
            node,
        } = ctx.clone();
        Arc::new(Self {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            key,
            spec,
            metrics,
            dedicated,
            command_timeout,
            state: Mutex::new(State {
                phase: Stage::Idle,
                backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
                queue: VecDeque::new(),
                written: 0,
                generation: 0,
                tasks: Vec::new(),
                draining: false,
                wr: None,
                carry: Bytes::new(),
                busy: false,
                listed: false,
            }),
            wake_writer: Notify::new(),
            phase_changed: Notify::new(),
            next_id: AtomicU64::new(1),
            push_sink: Mutex::new(None),
            version,
            flusher,
            troubled: AtomicBool::new(false),
            node,
            returns,
            #[cfg(test)]
            writes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_dedicated(&self) -> bool {
        self.dedicated
    }

    pub fn phase(&self) -> Phase {
        let st = self.lock();
        match &st.phase {
            Stage::Idle => Phase::Idle,
            Stage::Connecting => Phase::Connecting,
            Stage::Up => Phase::Up,
            Stage::Down {
                error, retry_at, ..
            } => Phase::Down {
                error: error.to_string(),
                retry_in_ms: retry_at
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
            },
            Stage::Failed { error } => Phase::Failed {
                error: error.to_string(),
            },
            Stage::Closed => Phase::Closed,
        }
    }

    /// True when a command submitted now would fail at once (down and in backoff, failed or
    /// closed).
    pub fn failing_fast(&self) -> bool {
        // Asked once per command by the shared lane: the common answer needs no lock.
        if !self.troubled.load(Ordering::Relaxed) {
            return false;
        }
        let st = self.lock();
        match &st.phase {
            Stage::Down { retry_at, at, .. } => self.backing_off(*retry_at, *at),
            Stage::Failed { .. } | Stage::Closed => true,
            _ => false,
        }
    }

    /// A connection that failed at `at` waits until `retry_at`, unless its node came back
    /// since (the health check's success ends the backoff).
    fn backing_off(&self, retry_at: Instant, at: Instant) -> bool {
        Instant::now() < retry_at && !self.node.recovered_since(at)
    }

    /// The node's health.
    pub fn node(&self) -> &Arc<NodeHealth> {
        &self.node
    }

    pub fn is_up(&self) -> bool {
        matches!(self.lock().phase, Stage::Up)
    }

    pub fn queue_len(&self) -> usize {
        self.lock().queue.len()
    }

    /// The commands in flight, oldest first.
    pub fn snapshot(&self) -> Vec<InFlightInfo> {
        let now = Instant::now();
        self.lock()
            .queue
            .iter()
            .map(|e| InFlightInfo {
                id: e.id,
                state: e.state,
                class: e.request.class,
                client: e.request.order.client,
                seq: e.request.order.seq,
                bytes: e.request.raw.len(),
                age_ms: now.saturating_duration_since(e.since).as_millis() as u64,
            })
            .collect()
    }

    /// Queues one request; its outcome (reply or [`Unanswered`]) arrives on the receiver.
    /// Starts a connect when needed.
    pub fn submit(self: &Arc<Self>, request: Request, timed: bool) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let mut one = vec![Submission {
            request,
            reply: tx,
            timed,
        }];
        self.submit_batch(&mut one);
        rx
    }

    /// Queues a batch of requests back to back (nothing of another client comes between
    /// them) under one lock and one writer wake-up, draining `batch` (the caller reuses the
    /// Vec: no allocation per round). When the connection cannot take commands now, each
    /// request goes back to its router as [`Unanswered`] (never written).
    pub fn submit_batch(self: &Arc<Self>, batch: &mut Vec<Submission>) {
        if batch.is_empty() {
            return;
        }
        let mut st = self.lock();
        if let Err(error) = self.ready_to_queue(&mut st) {
            let retry_at = match &st.phase {
                Stage::Down { retry_at, .. } => Some(*retry_at),
                _ => None,
            };
            drop(st);
            if let Some(r) = &self.returns {
                let entries = batch
                    .drain(..)
                    .map(|s| Returned {
                        request: s.request,
                        reply: s.reply,
                        written: false,
                        overdue: false,
                    })
                    .collect();
                r.returned(self.key, entries, &error, retry_at);
                return;
            }
            for s in batch.drain(..) {
                let _ = s.reply.send(Outcome::Unanswered(Box::new(Unanswered {
                    request: s.request,
                    addr: self.key.addr,
                    written: false,
                    error: error.clone(),
                })));
            }
            return;
        }
        let now = Instant::now();
        let n = batch.len();
        let from = st.queue.len();
        for s in batch.drain(..) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            st.queue.push_back(InFlight {
                id,
                request: s.request,
                state: FlightState::Queued,
                since: now,
                deadline: self.command_timeout.filter(|_| s.timed).map(|t| now + t),
                reply: Some(s.reply),
            });
        }
        self.metrics.inflight.inc_by(n as i64);
        let done = self.write_through(&mut st, from);
        let flusher = self
            .flusher
            .as_ref()
            .filter(|_| matches!(st.phase, Stage::Up) && !st.listed);
        if flusher.is_some() {
            st.listed = true;
        }
        let listed = st.listed;
        drop(st);
        if let Some(f) = flusher {
            f.mark(self.clone());
        } else if !done && !listed {
            // Connecting (the writer drains the queue once up), or a dedicated connection
            // whose direct write could not go out whole.
            self.wake_writer.notify_one();
        }
    }

    /// Queues `raw` without a matched reply (pub/sub mode: replies go to the push sink).
    pub fn send_untracked(self: &Arc<Self>, request: Request) -> Result<(), BackendError> {
        let mut st = self.lock();
        self.ready_to_queue(&mut st)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let from = st.queue.len();
        st.queue.push_back(InFlight {
            id,
            request,
            state: FlightState::Queued,
            since: Instant::now(),
            deadline: None,
            reply: None,
        });
        self.metrics.inflight.inc();
        let done = self.write_through(&mut st, from);
        drop(st);
        if !done {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Takes queued entries (`written..`) into `buf`, at most about `limit` bytes but at least
    /// one entry, and marks them written. In pub/sub mode they leave the queue at once (their
    /// frames are not matched to commands). Returns how many were taken.
    fn take_batch(
        &self,
        st: &mut State,
        buf: &mut BytesMut,
        limit: usize,
    ) -> (usize, Option<Bytes>) {
        let start = st.written;
        let mut end = start;
        let mut dropped = 0;
        let mut whole = None;
        while end < st.queue.len() && (end == start || buf.len() < limit) {
            if st.queue[end]
                .request
                .gate
                .as_ref()
                .is_some_and(|g| g.is_closed_by_limit())
            {
                // Its client was closed by a limit (an output limit, the memory budget): never
                // sent, so the backend does no work (and sends no replies) nobody will read.
                // A client that closed by itself keeps what it sent: like Redis, commands
                // received before an EOF run.
                st.queue.remove(end);
                dropped += 1;
                continue;
            }
            let e = &mut st.queue[end];
            if e.request.raw.len() >= ZERO_COPY_MIN {
                if end != start {
                    break;
                }
                // A large command (an upload) is written from its own bytes, alone: copying
                // it into the batch would hold it twice.
                e.state = FlightState::Written;
                whole = Some(e.request.raw.clone());
                end += 1;
                break;
            }
            // Written from now on: once handed to the socket it may have run.
            e.state = FlightState::Written;
            buf.extend_from_slice(&e.request.raw);
            end += 1;
        }
        st.written = end;
        if dropped > 0 {
            self.metrics.inflight.dec_by(dropped);
        }
        if self
            .push_sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            let n = st.queue.drain(start..end).count();
            st.written = start;
            self.metrics.inflight.dec_by(n as i64);
        }
        (end - start, whole)
    }

    /// A dedicated connection writes what was just queued (`from..`) straight to its socket
    /// when nothing else is being written, so one client's command leaves before commands of
    /// other clients read after it (see the module docs). True when all of it was written;
    /// otherwise the writer finishes it.
    fn write_through(&self, st: &mut State, from: usize) -> bool {
        if !self.dedicated || st.written != from {
            return false;
        }
        let mut buf = BytesMut::new();
        !self.write_queued(st, &mut buf, usize::MAX)
    }

    /// Writes up to `limit` bytes of the queue with one `write`, when the connection is up and
    /// nothing else is being written. True when the writer task must go on: the socket did not
    /// take it all (the rest is in `carry`), more is queued, or a write is in progress.
    fn write_queued(&self, st: &mut State, buf: &mut BytesMut, limit: usize) -> bool {
        if !matches!(st.phase, Stage::Up) {
            // Connecting: the writer drains the queue once up.
            return false;
        }
        if st.busy || !st.carry.is_empty() {
            return true;
        }
        let Some(wr) = st.wr.clone() else {
            return false;
        };
        buf.clear();
        let (taken, whole) = self.take_batch(st, buf, limit);
        if taken == 0 {
            return false;
        }
        #[cfg(test)]
        self.writes.fetch_add(1, Ordering::Relaxed);
        let data = match whole {
            Some(b) => b,
            None => buf.split().freeze(),
        };
        match wr.try_write(&data) {
            Ok(n) if n == data.len() => st.written < st.queue.len(),
            Ok(n) => {
                st.carry = data.slice(n..);
                true
            }
            // A full socket or an error: the writer retries, and reports an error it meets.
            Err(_) => {
                st.carry = data;
                true
            }
        }
    }

    /// Whether commands may be queued now; starts a connect when the slot is idle or its
    /// backoff is over.
    fn ready_to_queue(self: &Arc<Self>, st: &mut State) -> Result<(), BackendError> {
        if self.returns.as_ref().is_some_and(|r| r.holds()) && !self.node.usable() {
            // The node is down or loading: its commands go to the hold queue, behind those
            // held already (so none overtakes an earlier one of its client).
            return Err(BackendError::Unavailable {
                addr: self.key.addr,
                cause: Cause::NodeDown(
                    self.node
                        .cause()
                        .unwrap_or_else(|| self.node.status().as_str().to_string()),
                ),
            });
        }
        match &st.phase {
            Stage::Closed => Err(BackendError::Lost {
                addr: self.key.addr,
                cause: Cause::ClosedByProxy,
            }),
            Stage::Failed { error } => Err(error.clone()),
            Stage::Down {
                error,
                retry_at,
                at,
            } => {
                if self.backing_off(*retry_at, *at) {
                    return Err(error.clone());
                }
                self.start_connect(st);
                Ok(())
            }
            Stage::Idle => {
                self.start_connect(st);
                Ok(())
            }
            Stage::Connecting | Stage::Up => Ok(()),
        }
    }

    fn start_connect(self: &Arc<Self>, st: &mut State) {
        st.phase = Stage::Connecting;
        self.troubled.store(false, Ordering::Relaxed);
        st.generation += 1;
        let gen = st.generation;
        let me = self.clone();
        let h = tokio::spawn(async move { me.run(gen).await });
        st.tasks = vec![h.abort_handle()];
    }

    /// Connects now (pool prewarm, dedicated connections); returns once up or failed.
    pub async fn connect_now(self: &Arc<Self>) -> Result<(), BackendError> {
        {
            let mut st = self.lock();
            let retry = match &st.phase {
                Stage::Idle => true,
                Stage::Down { retry_at, at, .. } => !self.backing_off(*retry_at, *at),
                _ => false,
            };
            if retry {
                self.start_connect(&mut st);
            }
        }
        loop {
            let notified = self.phase_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                match &st.phase {
                    Stage::Up => return Ok(()),
                    Stage::Down { error, .. } | Stage::Failed { error } => {
                        return Err(error.clone())
                    }
                    Stage::Closed => {
                        return Err(BackendError::Lost {
                            addr: self.key.addr,
                            cause: Cause::ClosedByProxy,
                        })
                    }
                    Stage::Idle | Stage::Connecting => {}
                }
            }
            notified.await;
        }
    }

    /// The connection's life: connect and handshake, then a writer and a reader task.
    async fn run(self: Arc<Self>, gen: u64) {
        let addr = self.key.addr;
        let opened = async {
            let mut stream =
                connect::connect_marked(addr, self.spec.mark, self.spec.connect_timeout).await?;
            let learn = self.version.get().is_none();
            let steps = handshake::data_steps(&self.spec, self.key.db, self.key.proto, learn);
            let learned = handshake::run(&mut stream, &steps, self.spec.connect_timeout).await?;
            Ok::<_, Cause>((stream, learned))
        };
        match opened.await {
            Err(cause) => {
                self.metrics.connects_failed.inc();
                warn!(backend = %addr, db = self.key.db, proto = self.key.proto, dedicated = self.dedicated, error = %cause, "backend connect failed");
                self.fail(gen, cause, true);
            }
            Ok((stream, learned)) => {
                self.metrics.connects_ok.inc();
                if let Some(v) = learned.version {
                    let _ = self.version.set(v);
                }
                debug!(backend = %addr, db = self.key.db, proto = self.key.proto, dedicated = self.dedicated, "backend connected");
                let (rd, wr) = stream.into_split();
                let wr = Arc::new(wr);
                let mut st = self.lock();
                if st.generation != gen || matches!(st.phase, Stage::Closed) {
                    return;
                }
                st.phase = Stage::Up;
                st.backoff.reset();
                st.wr = Some(wr.clone());
                if self.dedicated {
                    self.metrics.dedicated_conns.inc();
                } else {
                    self.metrics.shared_conns.inc();
                }
                let w = tokio::spawn(self.clone().writer(gen, wr));
                let r = tokio::spawn(self.clone().reader(gen, rd, learned.leftover));
                st.tasks = vec![w.abort_handle(), r.abort_handle()];
                drop(st);
                self.wake_writer.notify_one();
                self.phase_changed.notify_waiters();
            }
        }
    }

    async fn writer(self: Arc<Self>, gen: u64, wr: Arc<OwnedWriteHalf>) {
        let mut buf = BytesMut::new();
        loop {
            let taken = {
                let mut st = self.lock();
                if st.generation != gen || !matches!(st.phase, Stage::Up) {
                    return;
                }
                let (taken, whole) = if st.carry.is_empty() {
                    self.take_batch(&mut st, &mut buf, BATCH)
                } else {
                    // What a direct write left comes first.
                    (1, Some(std::mem::take(&mut st.carry)))
                };
                st.busy = taken > 0;
                (taken, whole)
            };
            let (taken, whole) = taken;
            if taken == 0 {
                self.wake_writer.notified().await;
                continue;
            }
            #[cfg(test)]
            self.writes.fetch_add(1, Ordering::Relaxed);
            let data: &[u8] = whole.as_deref().unwrap_or(&buf);
            if let Err(e) = write_all(&wr, data).await {
                self.fail(gen, Cause::Write(e.to_string()), false);
                return;
            }
            self.lock().busy = false;
            buf.clear();
            if buf.capacity() > 4 * BATCH {
                buf = BytesMut::new();
            }
        }
    }

    async fn reader(
        self: Arc<Self>,
        gen: u64,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        mut rbuf: BytesMut,
    ) {
        let limits = Limits::backend();
        let mut dec = ReplyDecoder::default();
        let mut replies: Vec<Reply> = Vec::new();
        // Whether rbuf (or the allocation it is a view of) grew past READ_BUF_KEEP.
        let mut grown = false;
        let mut assembling = Assembling::default();
        // The deadline watchdog: one coarse tick per connection, only with a command timeout.
        let mut tick = self.command_timeout.map(|t| {
            let period = (t / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            loop {
                match dec.decode(&mut rbuf, &limits) {
                    Ok(Some(r)) => replies.push(r),
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(gen, Cause::Protocol(e), false);
                        return;
                    }
                }
            }
            let delivered: usize = replies.iter().map(|r| r.raw.len()).sum();
            if !replies.is_empty() {
                // The reply it counted is complete: its session counts it from now on (counting
                // it twice could push its client over its output limit).
                assembling.clear();
                if !self.deliver(gen, &mut replies) {
                    return;
                }
            }
            // The replies own their bytes now; a drained buffer that grew for a big one is
            // let go (its allocation is freed with the last reply). A view's capacity can hide
            // the allocation behind it (`reserve` reclaims all of it), hence the flag.
            grown |= rbuf.capacity() > READ_BUF_KEEP;
            if grown && rbuf.is_empty() {
                rbuf = BytesMut::new();
                grown = false;
            }
            if delivered >= YIELD_AFTER_BYTES {
                // Let the sessions take (and count) what was just delivered before reading
                // more: replies waiting in their channels are not counted against the memory
                // budget yet, and a fast backend would otherwise fill the agent with them
                // before the budget is seen to be reached.
                tokio::task::yield_now().await;
            }
            self.count_assembling(&mut dec, &mut rbuf, &mut assembling, &mut grown);
            if self.metrics.budget.exhausted() && !dec.is_discarding() {
                // Back-pressure: while clients' buffered bytes are at the proxy's memory
                // budget, replies stay in the backend's socket and output buffer instead of
                // the agent's memory, until the shedder closed the biggest clients.
                tokio::time::sleep(BUDGET_RECHECK).await;
                continue;
            }
            if rbuf.capacity() - rbuf.len() < 4096 {
                rbuf.reserve(64 * 1024);
            }
            let read = tokio::select! {
                r = rd.read_buf(&mut rbuf) => r,
                _ = next_tick(&mut tick) => {
                    if let Some(ms) = self.overdue() {
                        self.fail(gen, Cause::Timeout(ms), false);
                        return;
                    }
                    continue;
                }
            };
            match read {
                Ok(0) => {
                    self.fail(gen, Cause::Eof, false);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(gen, Cause::Read(e.to_string()), false);
                    return;
                }
            }
        }
    }

    /// Counts a big reply still being assembled in `rbuf` against the client it answers, or,
    /// once that client is gone or closed (by the memory shedder, say), drops the rest of it as
    /// it arrives ([`ReplyDecoder::discard`]): the connection stays in step with the backend
    /// and no memory is held for a reply nobody will read.
    fn count_assembling(
        &self,
        dec: &mut ReplyDecoder,
        rbuf: &mut BytesMut,
        assembling: &mut Assembling,
        grown: &mut bool,
    ) {
        if dec.is_discarding() || !dec.in_frame(rbuf) {
            assembling.clear();
            return;
        }
        if rbuf.capacity() < CHARGE_FROM && assembling.bytes == 0 {
            return;
        }
        // A RESP3 push frame answers no command (and pub/sub connections deliver frames, not
        // replies): not counted here.
        if rbuf.first() == Some(&b'>') {
            return;
        }
        let Some(gate) = self.front_gate() else {
            return;
        };
        let Some(mem) = gate.mem() else {
            return;
        };
        if gate.is_gone() || mem.closed().is_some() {
            debug!(backend = %self.key.addr, client = mem.id, buffered = rbuf.len(), "the client of a reply being assembled is gone: discarding the rest of the reply");
            assembling.clear();
            dec.discard(rbuf);
            // The next decode drops what is buffered; the allocation goes once it is empty.
            *grown = true;
            return;
        }
        assembling.set(Some(mem), rbuf.capacity() as u64);
    }

    /// The gate of the client whose reply is next to come (the oldest written command's), on a
    /// connection that delivers replies (not a subscriber's).
    fn front_gate(&self) -> Option<ClientGate> {
        let sink = self.push_sink.lock().unwrap_or_else(|p| p.into_inner());
        if sink.is_some() {
            return None;
        }
        drop(sink);
        let st = self.lock();
        if st.written == 0 {
            return None;
        }
        st.queue.front()?.request.gate.clone()
    }

    /// The command timeout in ms when the oldest written command is past its deadline.
    fn overdue(&self) -> Option<u64> {
        let st = self.lock();
        let front = st.queue.front()?;
        let deadline = front.deadline?;
        (front.state == FlightState::Written && Instant::now() >= deadline)
            .then(|| self.command_timeout.map(|t| t.as_millis() as u64))
            .flatten()
    }

    /// Matches `replies` to the oldest written entries (or hands them to the push sink).
    /// False when the connection is finished.
    fn deliver(&self, gen: u64, replies: &mut Vec<Reply>) -> bool {
        let sink = self
            .push_sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut done = Vec::with_capacity(replies.len());
        let mut desync = false;
        let mut drained = false;
        {
            let mut st = self.lock();
            if st.generation != gen {
                return false;
            }
            for r in replies.drain(..) {
                if let Some(sink) = &sink {
                    // Pub/sub mode: the session gets every frame, in order.
                    let _ = sink.send(Ok(r));
                    continue;
                }
                if r.kind == ReplyKind::Push {
                    // Out-of-band data on a RESP3 connection (we never enable tracking):
                    // not the answer to any command.
                    debug!(backend = %self.key.addr, "dropping a RESP3 push frame");
                    continue;
                }
                if st.written == 0 {
                    desync = true;
                    break;
                }
                if let Some(e) = st.queue.pop_front() {
                    st.written -= 1;
                    done.push((e.reply, e.request, r));
                }
            }
            if st.draining && st.queue.is_empty() {
                drained = true;
            }
        }
        self.metrics.inflight.dec_by(done.len() as i64);
        for (tx, request, reply) in done {
            if let Some(tx) = tx {
                let _ = tx.send(Outcome::Replied {
                    reply,
                    request,
                    node: self.key.addr,
                });
            }
        }
        if desync {
            warn!(backend = %self.key.addr, "reply without a written command: closing the connection");
            self.fail(gen, Cause::Desync, false);
            return false;
        }
        if drained {
            self.fail(gen, Cause::ClosedByProxy, false);
            return false;
        }
        true
    }

    /// Ends the connection of generation `gen`: every in-flight command goes back to its
    /// router as [`Unanswered`], and the connection goes `Down` (shared: reconnect after the
    /// backoff), `Failed` (dedicated) or `Closed` (draining).
    fn fail(&self, gen: u64, cause: Cause, connecting: bool) {
        let addr = self.key.addr;
        let error = if connecting {
            BackendError::Unavailable {
                addr,
                cause: cause.clone(),
            }
        } else {
            BackendError::Lost {
                addr,
                cause: cause.clone(),
            }
        };
        let (entries, tasks, was_up) = {
            let mut st = self.lock();
            if st.generation != gen || matches!(st.phase, Stage::Closed) {
                return;
            }
            let was_up = matches!(st.phase, Stage::Up);
            self.troubled.store(true, Ordering::Relaxed);
            st.phase = if st.draining {
                Stage::Closed
            } else if self.dedicated {
                Stage::Failed {
                    error: error.clone(),
                }
            } else {
                // A live connection that died may reconnect at once; failed connects back off.
                let delay = if connecting {
                    st.backoff.next_delay()
                } else {
                    st.backoff.reset();
                    Duration::ZERO
                };
                Stage::Down {
                    error: error.clone(),
                    retry_at: Instant::now() + delay,
                    at: Instant::now(),
                }
            };
            st.generation += 1;
            st.wr = None;
            st.busy = false;
            st.listed = false;
            st.carry = Bytes::new();
            let written = st.written;
            st.written = 0;
            let entries: Vec<(bool, InFlight)> = st
                .queue
                .drain(..)
                .enumerate()
                .map(|(i, e)| (i < written, e))
                .collect();
            (entries, std::mem::take(&mut st.tasks), was_up)
        };
        if was_up {
            if self.dedicated {
                self.metrics.dedicated_conns.dec();
            } else {
                self.metrics.shared_conns.dec();
            }
        }
        self.metrics.inflight.dec_by(entries.len() as i64);
        self.node.failed(&cause);
        match &self.returns {
            Some(r) => {
                let now = Instant::now();
                let timed_out = matches!(cause, Cause::Timeout(_));
                let back: Vec<Returned> = entries
                    .into_iter()
                    .filter_map(|(written, e)| {
                        let overdue =
                            written && (timed_out || e.deadline.is_some_and(|d| now >= d));
                        e.reply.map(|reply| Returned {
                            request: e.request,
                            reply,
                            written,
                            overdue,
                        })
                    })
                    .collect();
                if !back.is_empty() {
                    r.returned(self.key, back, &error, None);
                }
            }
            None => {
                for (written, e) in entries {
                    if let Some(tx) = e.reply {
                        let _ = tx.send(Outcome::Unanswered(Box::new(Unanswered {
                            request: e.request,
                            addr,
                            written,
                            error: error.clone(),
                        })));
                    }
                }
            }
        }
        if let Some(sink) = self
            .push_sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = sink.send(Err(error));
        }
        self.phase_changed.notify_waiters();
        for t in tasks {
            t.abort();
        }
    }

    /// Closes the connection now; in-flight commands go back unanswered.
    pub fn close(&self) {
        let gen = {
            let mut st = self.lock();
            st.draining = true;
            if let Some(wr) = &st.wr {
                // Shut the socket down now rather than when the aborted tasks drop their
                // halves: the server ends what the connection held (a subscription, a
                // blocking command, a transaction) before the client hears back from us.
                let stream: &tokio::net::TcpStream = (**wr).as_ref();
                let _ = nix::sys::socket::shutdown(
                    stream.as_raw_fd(),
                    nix::sys::socket::Shutdown::Both,
                );
            }
            st.generation
        };
        self.fail(gen, Cause::ClosedByProxy, false);
        let mut st = self.lock();
        if !matches!(st.phase, Stage::Closed) {
            // Idle or already failed: nothing was running.
            st.phase = Stage::Closed;
            self.troubled.store(true, Ordering::Relaxed);
            drop(st);
            self.phase_changed.notify_waiters();
        }
    }

    /// Closes once every in-flight command has its reply (config reload replaced the pool).
    pub fn close_when_idle(&self) {
        let empty = {
            let mut st = self.lock();
            st.draining = true;
            st.queue.is_empty()
        };
        if empty {
            self.close();
        }
    }

    /// Switches the connection to pub/sub mode: every later frame goes to `sink`.
    pub fn set_push_sink(&self, sink: PushSink) {
        *self.push_sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }
}

impl Flush for Conn {
    /// The flusher's write of this connection's queue (one batch, one `write`); what the
    /// socket does not take, and any queue beyond one batch, is left to the writer task.
    fn flush_now(&self, buf: &mut BytesMut) {
        let mut st = self.lock();
        st.listed = false;
        let writer_needed = self.write_queued(&mut st, buf, BATCH);
        drop(st);
        if writer_needed {
            self.wake_writer.notify_one();
        }
    }
}

/// Writes all of `buf` through a shared write half (`try_write` when the socket is writable).
async fn write_all(wr: &OwnedWriteHalf, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        wr.writable().await?;
        match wr.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn next_tick(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}
