//! Backend connections. Per endpoint a [`BackendGroup`]; per backend node, database and
//! protocol a [`NodePool`] of `pool_size` shared, multiplexed connections (created on first
//! use, or at start with `pool_prewarm`) and a bounded set of exclusive ("dedicated")
//! connections for transactions, blocking commands and pub/sub.
//!
//! Every connection ([`Conn`]) owns an explicit in-flight queue: each command is an
//! [`InFlight`] entry that is `Queued` until the writer task takes it into a write and
//! `Written` after that, and leaves the queue when the reader task matches its reply (Redis
//! answers in order). So at every moment the proxy knows which commands a connection holds,
//! written or not, answered or not ([`Conn::snapshot`]); when a connection dies each entry
//! fails with [`BackendError`] carrying `retry_safe` (never written, or read-only), which the
//! failover replay of the next issue builds on.
//!
//! The writer drains everything queued into ONE buffer and ONE write per batch. When woken it
//! first yields once, so that every session ready in the same runtime tick queues its
//! commands too: they go out in one write and the backend reads them at once. That batching
//! is what makes pipeline depth 1 fast (one send per tick per connection instead of one per
//! command; writing straight from each session instead of the writer task measured ~25%
//! slower for that reason). Shared
//! connections reconnect with jittered exponential backoff; while a node is in backoff,
//! commands for it fail fast instead of piling up.
//!
//! Architecture Invariant: a connection's reply is matched to the oldest `Written` entry and
//! nothing else; any reply without one (a desync) kills the connection rather than guess.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::resp::{self, Command, Limits, ProtocolError, Reply, ReplyDecoder, ReplyKind};

/// Why a command got no reply from the backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("backend {addr} is unavailable: {reason}")]
    Unavailable { addr: SocketAddr, reason: String },
    #[error("connection to backend {addr} was lost ({reason})")]
    ConnectionLost {
        addr: SocketAddr,
        reason: String,
        /// The command was never written, or it is read-only: replaying it cannot repeat a write.
        retry_safe: bool,
    },
    #[error("backend {addr} did not answer within {timeout_ms} ms (command_timeout_ms)")]
    Timeout { addr: SocketAddr, timeout_ms: u64 },
    #[error("all {max} dedicated connections to {addr} are in use (max_dedicated): too many transactions, blocking commands or subscribers at once")]
    DedicatedExhausted { addr: SocketAddr, max: u32 },
    #[error("backend {addr} refused the {step} of the connection handshake: {error}{hint}")]
    Handshake {
        addr: SocketAddr,
        step: &'static str,
        error: String,
        hint: &'static str,
    },
    #[error("backend {addr} sent invalid RESP: {source}")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: ProtocolError,
    },
    #[error("the backend connection to {addr} was closed by the proxy")]
    Closed { addr: SocketAddr },
}

impl BackendError {
    /// Whether sending the command again elsewhere cannot apply it twice.
    pub fn retry_safe(&self) -> bool {
        match self {
            BackendError::ConnectionLost { retry_safe, .. } => *retry_safe,
            BackendError::Unavailable { .. }
            | BackendError::DedicatedExhausted { .. }
            | BackendError::Handshake { .. } => true,
            BackendError::Timeout { .. }
            | BackendError::Protocol { .. }
            | BackendError::Closed { .. } => false,
        }
    }
}

/// How the proxy connects to every node of one backend group.
#[derive(Debug, Clone)]
pub struct ConnectSpec {
    /// SO_MARK on every backend socket: the data plane never captures it.
    pub mark: u32,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// Send READONLY after connecting (cluster replicas serving reads).
    pub readonly: bool,
    /// CLIENT SETNAME of backend connections, so operators see them in CLIENT LIST.
    pub client_name: String,
}

/// Which pool a connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    pub db: u32,
    /// 2 or 3 (HELLO); replies are forwarded as-is, so clients only share a protocol's pool.
    pub proto: u8,
}

/// Metrics handles of one backend group (resolved once, not per command).
#[derive(Clone, Default)]
pub struct GroupMetrics {
    pub shared_conns: Gauge,
    pub dedicated_conns: Gauge,
    pub connects_ok: Counter,
    pub connects_failed: Counter,
    pub inflight: Gauge,
    pub pool_waits: Counter,
}

/// Where an in-flight command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlightState {
    /// In the queue, not handed to the socket yet: always safe to send elsewhere.
    Queued,
    /// Taken into a write (possibly partially sent): the backend may have run it.
    Written,
}

/// One command on a connection.
pub struct InFlight {
    pub id: u64,
    pub cmd: Bytes,
    pub state: FlightState,
    pub replay_safe: bool,
    pub since: Instant,
    reply: Option<oneshot::Sender<Result<Reply, BackendError>>>,
}

/// What [`Conn::snapshot`] shows of an in-flight command.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InFlightInfo {
    pub id: u64,
    pub state: FlightState,
    pub replay_safe: bool,
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
    /// Closed by the proxy (pool dropped, dedicated connection not reusable).
    Closed,
}

struct State {
    phase: Phase,
    retry_at: Option<Instant>,
    /// Consecutive failed connects (backoff exponent).
    failures: u32,
    queue: VecDeque<InFlight>,
    /// `queue[..written]` are `Written`.
    written: usize,
    /// Bumped per connection attempt: tasks of an older attempt never touch the queue.
    generation: u64,
    tasks: Vec<AbortHandle>,
    /// Close once the queue is empty (the pool was replaced by a config reload).
    draining: bool,
}

/// Where replies go when a dedicated connection is in pub/sub mode: every frame, in order.
pub type PushSink = mpsc::UnboundedSender<Result<Reply, BackendError>>;

/// One backend connection with its in-flight queue (see the module docs).
pub struct Conn {
    pub key: PoolKey,
    spec: Arc<ConnectSpec>,
    metrics: GroupMetrics,
    dedicated: bool,
    /// Reconnect after failures (shared slots) or not (dedicated connections).
    reconnect: bool,
    state: Mutex<State>,
    wake_writer: Notify,
    /// Woken (notify_waiters) on every phase change, for [`Conn::connect_now`].
    phase_changed: Notify,
    next_id: AtomicU64,
    /// In pub/sub mode every frame goes here instead of being matched to the queue.
    push_sink: Mutex<Option<PushSink>>,
    /// Server version learned at the handshake (for HELLO answers).
    version: Arc<OnceLock<String>>,
    /// Writes made (tests check the batching).
    #[cfg(test)]
    writes: AtomicU64,
}

/// The jittered backoff delay for the `n`-th consecutive failure: 100 ms doubling up to 5 s,
/// times a random factor in [0.5, 1.5), so agents do not reconnect in lockstep.
pub fn backoff_delay(n: u32) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    let base = 100u64.saturating_mul(1u64 << (n - 1).min(6)).min(5000);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(7)
        ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let f = 0.5 + (x % 1000) as f64 / 1000.0;
    Duration::from_millis(((base as f64) * f) as u64)
}

impl Conn {
    fn new(
        key: PoolKey,
        spec: Arc<ConnectSpec>,
        metrics: GroupMetrics,
        dedicated: bool,
        version: Arc<OnceLock<String>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            key,
            spec,
            metrics,
            dedicated,
            reconnect: !dedicated,
            state: Mutex::new(State {
                phase: Phase::Idle,
                retry_at: None,
                failures: 0,
                queue: VecDeque::new(),
                written: 0,
                generation: 0,
                tasks: Vec::new(),
                draining: false,
            }),
            wake_writer: Notify::new(),
            phase_changed: Notify::new(),
            next_id: AtomicU64::new(1),
            push_sink: Mutex::new(None),
            version,
            #[cfg(test)]
            writes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        let st = self.lock();
        match &st.phase {
            Phase::Down { error, .. } => Phase::Down {
                error: error.clone(),
                retry_in_ms: st
                    .retry_at
                    .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64)
                    .unwrap_or(0),
            },
            p => p.clone(),
        }
    }

    /// True when a command submitted now would fail at once (connection down and in backoff).
    pub fn failing_fast(&self) -> bool {
        let st = self.lock();
        match st.phase {
            Phase::Down { .. } => st.retry_at.is_some_and(|t| Instant::now() < t),
            Phase::Closed => true,
            _ => false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.lock().phase == Phase::Up
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
                replay_safe: e.replay_safe,
                bytes: e.cmd.len(),
                age_ms: now.saturating_duration_since(e.since).as_millis() as u64,
            })
            .collect()
    }

    /// Queues `cmd`; the receiver gets its reply. Starts a connect when needed.
    pub fn submit(
        self: &Arc<Self>,
        cmd: Bytes,
        replay_safe: bool,
    ) -> Result<oneshot::Receiver<Result<Reply, BackendError>>, BackendError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(cmd, replay_safe, Some(tx))?;
        Ok(rx)
    }

    /// Queues several commands back to back (nothing of another client can come between
    /// them: ASKING + command).
    pub fn submit_batch(
        self: &Arc<Self>,
        cmds: Vec<(Bytes, bool)>,
    ) -> Result<Vec<oneshot::Receiver<Result<Reply, BackendError>>>, BackendError> {
        let mut st = self.lock();
        self.ready_to_queue(&mut st)?;
        let mut out = Vec::with_capacity(cmds.len());
        for (cmd, replay_safe) in cmds {
            let (tx, rx) = oneshot::channel();
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            st.queue.push_back(InFlight {
                id,
                cmd,
                state: FlightState::Queued,
                replay_safe,
                since: Instant::now(),
                reply: Some(tx),
            });
            self.metrics.inflight.inc();
            out.push(rx);
        }
        drop(st);
        self.wake_writer.notify_one();
        Ok(out)
    }

    /// Queues `cmd` without waiting for a matched reply (pub/sub mode: replies go to the sink).
    pub fn send_untracked(self: &Arc<Self>, cmd: Bytes) -> Result<(), BackendError> {
        self.enqueue(cmd, false, None)
    }

    fn enqueue(
        self: &Arc<Self>,
        cmd: Bytes,
        replay_safe: bool,
        reply: Option<oneshot::Sender<Result<Reply, BackendError>>>,
    ) -> Result<(), BackendError> {
        let mut st = self.lock();
        self.ready_to_queue(&mut st)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.queue.push_back(InFlight {
            id,
            cmd,
            state: FlightState::Queued,
            replay_safe,
            since: Instant::now(),
            reply,
        });
        drop(st);
        self.metrics.inflight.inc();
        self.wake_writer.notify_one();
        Ok(())
    }

    /// Queues a batch of a client's commands under one lock and one writer wake-up, draining
    /// `batch` (the caller reuses the Vec: no allocation per round). On error nothing is
    /// queued and `batch` is left as it was.
    #[allow(clippy::type_complexity)]
    pub fn submit_senders(
        self: &Arc<Self>,
        batch: &mut Vec<(Bytes, bool, oneshot::Sender<Result<Reply, BackendError>>)>,
    ) -> Result<(), BackendError> {
        let mut st = self.lock();
        self.ready_to_queue(&mut st)?;
        let now = Instant::now();
        let n = batch.len();
        for (cmd, replay_safe, tx) in batch.drain(..) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            st.queue.push_back(InFlight {
                id,
                cmd,
                state: FlightState::Queued,
                replay_safe,
                since: now,
                reply: Some(tx),
            });
        }
        drop(st);
        self.metrics.inflight.inc_by(n as i64);
        self.wake_writer.notify_one();
        Ok(())
    }

    /// Whether commands may be queued now; starts a connect when the slot is idle or its
    /// backoff is over.
    fn ready_to_queue(self: &Arc<Self>, st: &mut State) -> Result<(), BackendError> {
        let addr = self.key.addr;
        match &st.phase {
            Phase::Closed => Err(BackendError::Closed { addr }),
            Phase::Down { error, .. } => {
                if !self.reconnect || st.retry_at.is_some_and(|t| Instant::now() < t) {
                    return Err(BackendError::Unavailable {
                        addr,
                        reason: error.clone(),
                    });
                }
                self.start_connect(st);
                Ok(())
            }
            Phase::Idle => {
                self.start_connect(st);
                Ok(())
            }
            Phase::Connecting | Phase::Up => Ok(()),
        }
    }

    fn start_connect(self: &Arc<Self>, st: &mut State) {
        st.phase = Phase::Connecting;
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
            if st.phase == Phase::Idle {
                self.start_connect(&mut st);
            }
        }
        loop {
            let notified = self.phase_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.phase() {
                Phase::Up => return Ok(()),
                Phase::Down { error, .. } => {
                    return Err(BackendError::Unavailable {
                        addr: self.key.addr,
                        reason: error,
                    })
                }
                Phase::Closed => {
                    return Err(BackendError::Closed {
                        addr: self.key.addr,
                    })
                }
                _ => {}
            }
            // The timeout is only a safety net; phase changes wake us.
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    /// The connection's life: connect and handshake, then a writer and a reader task.
    async fn run(self: Arc<Self>, gen: u64) {
        let addr = self.key.addr;
        match self.handshake().await {
            Err(e) => {
                self.metrics.connects_failed.inc();
                warn!(backend = %addr, db = self.key.db, proto = self.key.proto, error = %e, "backend connect failed");
                self.fail(gen, e.to_string(), true);
            }
            Ok((stream, leftover)) => {
                self.metrics.connects_ok.inc();
                if self.dedicated {
                    self.metrics.dedicated_conns.inc();
                } else {
                    self.metrics.shared_conns.inc();
                }
                debug!(backend = %addr, db = self.key.db, proto = self.key.proto, dedicated = self.dedicated, "backend connected");
                let (rd, wr) = stream.into_split();
                let mut st = self.lock();
                if st.generation != gen || st.phase == Phase::Closed {
                    return;
                }
                st.phase = Phase::Up;
                st.failures = 0;
                st.retry_at = None;
                let w = tokio::spawn(self.clone().writer(gen, wr));
                let r = tokio::spawn(self.clone().reader(gen, rd, leftover));
                st.tasks = vec![w.abort_handle(), r.abort_handle()];
                drop(st);
                self.wake_writer.notify_one();
                self.phase_changed.notify_waiters();
            }
        }
    }

    async fn connect_socket(&self) -> std::io::Result<TcpStream> {
        connect_marked(self.key.addr, self.spec.mark, self.spec.connect_timeout).await
    }

    /// Connects and authenticates/selects; returns the stream and any bytes read past the
    /// handshake replies (none in practice: nothing else was sent yet).
    async fn handshake(&self) -> Result<(TcpStream, BytesMut), BackendError> {
        let addr = self.key.addr;
        let unavailable = |e: std::io::Error| BackendError::Unavailable {
            addr,
            reason: e.to_string(),
        };
        let mut stream = self.connect_socket().await.map_err(unavailable)?;
        let _ = stream.set_nodelay(true);
        let spec = &self.spec;
        let mut steps: Vec<(&'static str, Command)> = Vec::new();
        let auth_args = |args: &mut Vec<Bytes>| {
            if let Some(p) = &spec.password {
                args.push(Bytes::from_static(b"AUTH"));
                args.push(Bytes::from(
                    spec.username.clone().unwrap_or_else(|| "default".into()),
                ));
                args.push(Bytes::from(p.clone()));
            }
        };
        if self.key.proto >= 3 {
            let mut args = vec![Bytes::from_static(b"HELLO"), Bytes::from_static(b"3")];
            auth_args(&mut args);
            args.push(Bytes::from_static(b"SETNAME"));
            args.push(Bytes::from(spec.client_name.clone()));
            steps.push(("HELLO 3", Command::from_args(args)));
        } else {
            if let Some(p) = &spec.password {
                let mut args = vec![Bytes::from_static(b"AUTH")];
                if let Some(u) = &spec.username {
                    args.push(Bytes::from(u.clone()));
                }
                args.push(Bytes::from(p.clone()));
                steps.push(("AUTH", Command::from_args(args)));
            }
            steps.push((
                "CLIENT SETNAME",
                Command::from_args([
                    Bytes::from_static(b"CLIENT"),
                    Bytes::from_static(b"SETNAME"),
                    Bytes::from(spec.client_name.clone()),
                ]),
            ));
        }
        if self.key.db != 0 {
            steps.push((
                "SELECT",
                Command::from_args([
                    Bytes::from_static(b"SELECT"),
                    Bytes::from(self.key.db.to_string()),
                ]),
            ));
        }
        if spec.readonly {
            steps.push((
                "READONLY",
                Command::from_args([Bytes::from_static(b"READONLY")]),
            ));
        }
        let learn_version = self.version.get().is_none() && self.key.proto < 3;
        if learn_version {
            // HELLO without a version answers the server info in the current protocol.
            steps.push(("HELLO", Command::from_args([Bytes::from_static(b"HELLO")])));
        }
        let mut out = BytesMut::new();
        for (_, c) in &steps {
            out.extend_from_slice(&c.raw);
        }
        let io = |e: std::io::Error| BackendError::Unavailable {
            addr,
            reason: e.to_string(),
        };
        let deadline = self.spec.connect_timeout;
        let exchange = async {
            stream.write_all(&out).await.map_err(io)?;
            let mut rbuf = BytesMut::with_capacity(1024);
            let mut dec = ReplyDecoder::default();
            let limits = Limits::backend();
            for (step, _) in &steps {
                let reply = loop {
                    match dec.decode(&mut rbuf, &limits) {
                        Ok(Some(r)) => break r,
                        Ok(None) => {}
                        Err(source) => return Err(BackendError::Protocol { addr, source }),
                    }
                    if stream.read_buf(&mut rbuf).await.map_err(io)? == 0 {
                        return Err(BackendError::Unavailable {
                            addr,
                            reason: format!("closed the connection during {step}"),
                        });
                    }
                };
                if *step == "HELLO" || *step == "HELLO 3" {
                    if let Some(v) = hello_version(&reply) {
                        let _ = self.version.set(v);
                    }
                }
                if reply.is_error() && *step != "HELLO" && *step != "CLIENT SETNAME" {
                    let error = String::from_utf8_lossy(reply.error_text()).into_owned();
                    let hint = if error.starts_with("WRONGPASS")
                        || error.starts_with("NOAUTH")
                        || error.contains("AUTH")
                    {
                        ": are the endpoint's backend username/password right?"
                    } else if error.starts_with("NOPROTO") || error.contains("unknown command") {
                        ": the backend does not speak RESP3 (Redis >= 6 needed for HELLO 3)"
                    } else if *step == "SELECT" {
                        ": is the database index below the backend's `databases`?"
                    } else {
                        ""
                    };
                    return Err(BackendError::Handshake {
                        addr,
                        step,
                        error,
                        hint,
                    });
                }
            }
            Ok(rbuf)
        };
        let rbuf = tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| BackendError::Unavailable {
                addr,
                reason: format!("handshake timed out after {deadline:?}"),
            })??;
        Ok((stream, rbuf))
    }

    async fn writer(self: Arc<Self>, gen: u64, mut wr: tokio::net::tcp::OwnedWriteHalf) {
        // Large batches are cut so a huge pipeline does not need one huge buffer.
        const BATCH: usize = 256 * 1024;
        let mut buf = BytesMut::new();
        loop {
            let taken = {
                let mut st = self.lock();
                if st.generation != gen || st.phase != Phase::Up {
                    return;
                }
                let start = st.written;
                let mut end = start;
                while end < st.queue.len() && (end == start || buf.len() < BATCH) {
                    let e = &mut st.queue[end];
                    // Written from now on: once handed to the socket it may have run.
                    e.state = FlightState::Written;
                    buf.extend_from_slice(&e.cmd);
                    end += 1;
                }
                st.written = end;
                if self
                    .push_sink
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some()
                {
                    // Pub/sub mode: frames are not matched to commands, so nothing stays
                    // in flight once written.
                    let n = st.queue.drain(start..end).count();
                    st.written = start;
                    for _ in 0..n {
                        self.metrics.inflight.dec();
                    }
                }
                end - start
            };
            if taken == 0 {
                self.wake_writer.notified().await;
                // Let the other ready tasks (sessions) of this tick queue their commands
                // first, so they share this write (see the module docs).
                tokio::task::yield_now().await;
                continue;
            }
            #[cfg(test)]
            self.writes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = wr.write_all(&buf).await {
                self.fail(gen, format!("write failed: {e}"), false);
                return;
            }
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
        loop {
            loop {
                match dec.decode(&mut rbuf, &limits) {
                    Ok(Some(r)) => replies.push(r),
                    Ok(None) => break,
                    Err(source) => {
                        let e = BackendError::Protocol {
                            addr: self.key.addr,
                            source,
                        };
                        self.fail(gen, e.to_string(), false);
                        return;
                    }
                }
            }
            if !replies.is_empty() && !self.deliver(gen, &mut replies) {
                return;
            }
            if rbuf.capacity() - rbuf.len() < 4096 {
                rbuf.reserve(64 * 1024);
            }
            match rd.read_buf(&mut rbuf).await {
                Ok(0) => {
                    self.fail(gen, "closed by the backend".into(), false);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(gen, format!("read failed: {e}"), false);
                    return;
                }
            }
        }
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
        let mut close = false;
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
                    warn!(backend = %self.key.addr, "reply without a written command: closing the connection");
                    close = true;
                    break;
                }
                if let Some(e) = st.queue.pop_front() {
                    st.written -= 1;
                    done.push((e.reply, Ok(r)));
                }
            }
            if st.draining && st.queue.is_empty() {
                close = true;
            }
        }
        for (tx, r) in done {
            self.metrics.inflight.dec();
            if let Some(tx) = tx {
                let _ = tx.send(r);
            }
        }
        if close {
            self.fail(gen, "closed".into(), false);
            return false;
        }
        true
    }

    /// Ends the connection of generation `gen`: every in-flight command fails (retry-safe when
    /// never written or read-only), and the slot goes Down (backoff) or Closed.
    fn fail(&self, gen: u64, reason: String, connect_failed: bool) {
        let addr = self.key.addr;
        let (entries, tasks, was_up) = {
            let mut st = self.lock();
            if st.generation != gen || st.phase == Phase::Closed {
                return;
            }
            let was_up = st.phase == Phase::Up;
            if connect_failed {
                st.failures = st.failures.saturating_add(1);
            } else {
                // A live connection died: the first reconnect may happen at once.
                st.failures = 0;
            }
            st.retry_at = Some(Instant::now() + backoff_delay(st.failures));
            st.phase = if self.reconnect && !st.draining {
                Phase::Down {
                    error: reason.clone(),
                    retry_in_ms: 0,
                }
            } else {
                Phase::Closed
            };
            st.generation += 1;
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
        for (written, e) in entries {
            self.metrics.inflight.dec();
            let err = if connect_failed {
                BackendError::Unavailable {
                    addr,
                    reason: reason.clone(),
                }
            } else {
                BackendError::ConnectionLost {
                    addr,
                    reason: reason.clone(),
                    retry_safe: !written || e.replay_safe,
                }
            };
            if let Some(tx) = e.reply {
                let _ = tx.send(Err(err));
            }
        }
        if let Some(sink) = self
            .push_sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = sink.send(Err(BackendError::ConnectionLost {
                addr,
                reason: reason.clone(),
                retry_safe: false,
            }));
        }
        self.phase_changed.notify_waiters();
        for t in tasks {
            t.abort();
        }
    }

    /// Closes the connection now; in-flight commands fail.
    pub fn close(&self) {
        let gen = {
            let mut st = self.lock();
            st.draining = true;
            st.generation
        };
        self.fail(gen, "closed by the proxy".into(), false);
        let mut st = self.lock();
        st.phase = Phase::Closed;
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

    /// Fails the connection when its oldest command waits longer than `timeout` (a hung
    /// backend): the replies of a stuck connection can no longer be trusted to come.
    pub fn expire(&self, timeout: Duration) {
        let gen = {
            let st = self.lock();
            match st.queue.front() {
                Some(e) if e.state == FlightState::Written && e.since.elapsed() >= timeout => {
                    st.generation
                }
                _ => return,
            }
        };
        self.fail(
            gen,
            format!("no reply within {} ms", timeout.as_millis()),
            false,
        );
    }

    /// Switches the connection to pub/sub mode: every later frame goes to `sink`.
    pub fn set_push_sink(&self, sink: PushSink) {
        *self.push_sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }
}

/// The version in a HELLO reply (`server`/`version` map, RESP2 flat array or RESP3 map).
fn hello_version(reply: &Reply) -> Option<String> {
    let f = resp::parse_reply(&reply.raw)?;
    let pairs: Vec<(&resp::Frame, &resp::Frame)> = match &f {
        resp::Frame::Map { data, .. } => data.iter().collect(),
        resp::Frame::Array { data, .. } => data
            .chunks(2)
            .filter_map(|c| Some((c.first()?, c.get(1)?)))
            .collect(),
        _ => return None,
    };
    pairs.into_iter().find_map(|(k, v)| {
        if resp::frame_bytes(k)? == b"version" {
            Some(String::from_utf8_lossy(resp::frame_bytes(v)?).into_owned())
        } else {
            None
        }
    })
}

/// Opens a TCP connection to a backend with `SO_MARK = mark` set before connect.
pub async fn connect_marked(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if mark != 0 {
        // Set before connect: connect4/6 skip sockets with this mark, so the proxy never loops.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(std::io::Error::from)?;
    }
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// Shared connections and idle dedicated ones for one (node, db, protocol).
pub struct NodePool {
    pub key: PoolKey,
    slots: Vec<Arc<Conn>>,
    idle: Mutex<Vec<(Arc<Conn>, OwnedSemaphorePermit)>>,
    dedicated: Arc<Semaphore>,
    max_dedicated: u32,
    spec: Arc<ConnectSpec>,
    metrics: GroupMetrics,
    version: Arc<OnceLock<String>>,
}

/// Idle dedicated connections kept for reuse per pool; more are closed when returned.
const MAX_IDLE_DEDICATED: usize = 16;

impl NodePool {
    /// The shared connection for a client: fixed per client (`affinity`), so one client's
    /// commands stay in order on one connection; another slot only when that one is failing.
    pub fn shared(&self, affinity: u64) -> Arc<Conn> {
        let n = self.slots.len();
        let first = (affinity % n as u64) as usize;
        for i in 0..n {
            let c = &self.slots[(first + i) % n];
            if !c.failing_fast() {
                return c.clone();
            }
        }
        self.slots[first].clone()
    }

    pub fn slots(&self) -> &[Arc<Conn>] {
        &self.slots
    }

    /// An exclusive connection: an idle one if any, else a new one (waits for a free
    /// `max_dedicated` permit up to the connect timeout).
    pub async fn dedicated(self: &Arc<Self>) -> Result<Dedicated, BackendError> {
        loop {
            let popped = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match popped {
                Some((conn, permit)) if conn.is_up() && conn.queue_len() == 0 => {
                    return Ok(Dedicated {
                        conn,
                        permit: Some(permit),
                        pool: Arc::downgrade(self),
                        clean: true,
                    })
                }
                Some((conn, _permit)) => conn.close(),
                None => break,
            }
        }
        let permit = match self.dedicated.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.metrics.pool_waits.inc();
                match tokio::time::timeout(
                    self.spec.connect_timeout,
                    self.dedicated.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(BackendError::DedicatedExhausted {
                            addr: self.key.addr,
                            max: self.max_dedicated,
                        })
                    }
                }
            }
        };
        let conn = Conn::new(
            self.key,
            self.spec.clone(),
            self.metrics.clone(),
            true,
            self.version.clone(),
        );
        conn.connect_now().await?;
        Ok(Dedicated {
            conn,
            permit: Some(permit),
            pool: Arc::downgrade(self),
            clean: true,
        })
    }

    /// Connects every shared slot now (pool_prewarm).
    pub async fn prewarm(&self) {
        for s in &self.slots {
            if let Err(e) = s.connect_now().await {
                warn!(backend = %self.key.addr, error = %e, "pool prewarm: connect failed");
            }
        }
    }
}

impl Drop for NodePool {
    fn drop(&mut self) {
        for s in &self.slots {
            s.close_when_idle();
        }
        for (c, _) in self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            c.close();
        }
    }
}

/// An exclusive backend connection, handed back to its pool when dropped clean and idle,
/// closed otherwise (a transaction or subscription left open, a blocking command cut off).
pub struct Dedicated {
    pub conn: Arc<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Weak<NodePool>,
    /// Set false while the connection carries state (MULTI, WATCH, SUBSCRIBE).
    pub clean: bool,
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        let reusable = self.clean && self.conn.is_up() && self.conn.queue_len() == 0;
        if reusable {
            if let (Some(pool), Some(permit)) = (self.pool.upgrade(), self.permit.take()) {
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < MAX_IDLE_DEDICATED {
                    idle.push((self.conn.clone(), permit));
                    return;
                }
            }
        }
        self.conn.close();
    }
}

/// All pools of one endpoint's backend group.
pub struct BackendGroup {
    pub endpoint: String,
    spec: Arc<ConnectSpec>,
    pool_size: u32,
    max_dedicated: u32,
    pools: Mutex<HashMap<PoolKey, Arc<NodePool>>>,
    /// One `max_dedicated` budget per node, shared by its databases and protocols.
    node_budgets: Mutex<HashMap<SocketAddr, Arc<Semaphore>>>,
    pub metrics: GroupMetrics,
    pub version: Arc<OnceLock<String>>,
    pub command_timeout: Option<Duration>,
    closed: AtomicBool,
}

impl BackendGroup {
    pub fn new(
        endpoint: String,
        spec: ConnectSpec,
        pool_size: u32,
        max_dedicated: u32,
        command_timeout: Option<Duration>,
        metrics: GroupMetrics,
    ) -> Self {
        Self {
            endpoint,
            spec: Arc::new(spec),
            pool_size: pool_size.max(1),
            max_dedicated: max_dedicated.max(1),
            pools: Mutex::new(HashMap::new()),
            node_budgets: Mutex::new(HashMap::new()),
            metrics,
            version: Arc::new(OnceLock::new()),
            command_timeout,
            closed: AtomicBool::new(false),
        }
    }

    /// The pool for `key`, created on first use.
    pub fn pool(&self, key: PoolKey) -> Arc<NodePool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let budget = self
            .node_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.addr)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_dedicated as usize)))
            .clone();
        let slots = (0..self.pool_size)
            .map(|_| {
                Conn::new(
                    key,
                    self.spec.clone(),
                    self.metrics.clone(),
                    false,
                    self.version.clone(),
                )
            })
            .collect();
        let pool = Arc::new(NodePool {
            key,
            slots,
            idle: Mutex::new(Vec::new()),
            dedicated: budget,
            max_dedicated: self.max_dedicated,
            spec: self.spec.clone(),
            metrics: self.metrics.clone(),
            version: self.version.clone(),
        });
        info!(endpoint = %self.endpoint, backend = %key.addr, db = key.db, proto = key.proto, size = self.pool_size, "backend pool created");
        pools.insert(key, pool.clone());
        pool
    }

    /// Drops pools of nodes no longer in the topology (their connections close when idle).
    pub fn retain_nodes(&self, nodes: &[SocketAddr]) {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| nodes.contains(&k.addr));
    }

    /// Every pool (for `/backends` and metrics).
    pub fn pools(&self) -> Vec<Arc<NodePool>> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The server version learned from a backend handshake, or Redis 7.0.15.
    pub fn server_version(&self) -> String {
        self.version
            .get()
            .cloned()
            .unwrap_or_else(|| "7.0.15".into())
    }

    /// Closes every pool once its commands are answered (the group was replaced).
    pub fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for BackendGroup {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn spec() -> ConnectSpec {
        ConnectSpec {
            mark: 0,
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(2),
            readonly: false,
            client_name: "datamesh-test".into(),
        }
    }

    /// A fake backend that answers each command line-by-line with `+R<n>` and records what
    /// it read, so the test can check batching and order (the real-server tests live in the
    /// tests crate; this one checks the queue mechanics deterministically).
    async fn fake_backend() -> (SocketAddr, tokio::task::JoinHandle<Vec<usize>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut reads = Vec::new();
            let mut buf = BytesMut::new();
            let mut dec = crate::proxy::resp::CommandDecoder::default();
            let mut n = 0;
            loop {
                // Room for a whole batch, so one read shows one write.
                buf.reserve(64 * 1024);
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => reads.push(k),
                }
                let mut out = Vec::new();
                while let Ok(Some(c)) = dec.decode(&mut buf, &Limits::default()) {
                    if c.name().eq_ignore_ascii_case(b"CLIENT")
                        || c.name().eq_ignore_ascii_case(b"HELLO")
                    {
                        out.extend_from_slice(b"+OK\r\n");
                        continue;
                    }
                    n += 1;
                    out.extend_from_slice(format!("+R{n}\r\n").as_bytes());
                }
                if s.write_all(&out).await.is_err() {
                    break;
                }
            }
            reads
        });
        (addr, h)
    }

    #[tokio::test]
    async fn replies_match_commands_in_order_and_queue_empties() {
        let (addr, _h) = fake_backend().await;
        let group = BackendGroup::new("t".into(), spec(), 1, 4, None, GroupMetrics::default());
        let pool = group.pool(PoolKey {
            addr,
            db: 0,
            proto: 2,
        });
        let conn = pool.shared(7);
        let mut rxs = Vec::new();
        for i in 0..100 {
            let cmd = Command::from_args([Bytes::from_static(b"GET"), Bytes::from(i.to_string())]);
            rxs.push(conn.submit(cmd.raw, true).expect("queued"));
        }
        assert!(conn.snapshot().len() <= 100);
        for (i, rx) in rxs.into_iter().enumerate() {
            let r = rx.await.expect("answered").expect("ok");
            assert_eq!(&r.raw[..], format!("+R{}\r\n", i + 1).as_bytes());
        }
        assert!(conn.snapshot().is_empty());
        assert_eq!(group.metrics.inflight.get(), 0);
        assert_eq!(group.metrics.shared_conns.get(), 1);
    }

    /// Commands that many sessions queue in the same runtime tick share one write: the
    /// writer yields before taking its batch. Without that, the writer (woken into the
    /// worker's LIFO slot) would run after each session and write commands one by one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn commands_of_one_tick_share_one_write() {
        let (addr, h) = fake_backend().await;
        let group = BackendGroup::new("t".into(), spec(), 1, 4, None, GroupMetrics::default());
        let pool = group.pool(PoolKey {
            addr,
            db: 0,
            proto: 2,
        });
        let conn = pool.shared(0);
        conn.connect_now().await.expect("connected");
        const N: usize = 50;
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let mut sessions = Vec::new();
        for i in 0..N {
            let conn = conn.clone();
            let mut go = go_rx.clone();
            sessions.push(tokio::spawn(async move {
                let _ = go.wait_for(|g| *g).await;
                let cmd =
                    Command::from_args([Bytes::from_static(b"GET"), Bytes::from(i.to_string())]);
                let rx = conn.submit(cmd.raw, true).expect("queued");
                rx.await.expect("answered").expect("ok")
            }));
        }
        // Released from a task on the worker, so all sessions become ready in one tick.
        tokio::spawn(async move {
            let _ = go_tx.send(true);
            go_tx.closed().await;
        });
        for s in sessions {
            let r = s.await.expect("session");
            assert!(r.raw.starts_with(b"+R"), "{:?}", r.raw);
        }
        let writes = conn.writes.load(Ordering::Relaxed);
        assert!(writes <= 2, "{N} commands took {writes} writes");
        drop((pool, conn, group));
        let _ = h.await;
    }

    #[tokio::test]
    async fn connect_failure_fails_fast_and_is_retry_safe() {
        // A port nothing listens on.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let group = BackendGroup::new("t".into(), spec(), 2, 4, None, GroupMetrics::default());
        let pool = group.pool(PoolKey {
            addr,
            db: 0,
            proto: 2,
        });
        let conn = pool.shared(0);
        let rx = conn
            .submit(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), false)
            .expect("queued");
        let err = rx.await.expect("answered").expect_err("refused");
        assert!(err.retry_safe(), "{err}");
        assert!(matches!(err, BackendError::Unavailable { .. }), "{err}");
        // In backoff now: the next command fails at once, without a connect.
        let again = conn.submit(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), false);
        assert!(matches!(again, Err(BackendError::Unavailable { .. })));
        assert!(conn.failing_fast());
    }

    #[test]
    fn backoff_grows_and_is_jittered() {
        assert_eq!(backoff_delay(0), Duration::ZERO);
        let d1 = backoff_delay(1);
        assert!(
            d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(150),
            "{d1:?}"
        );
        let d9 = backoff_delay(9);
        assert!(
            d9 >= Duration::from_millis(2500) && d9 < Duration::from_millis(7500),
            "{d9:?}"
        );
    }
}
