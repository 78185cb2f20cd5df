//! One client connection: read → decode every complete command → dispatch each (answered by
//! the proxy, sent to a shared pooled connection, to a dedicated connection, or split across
//! cluster nodes) → replies written in order, one write per batch of replies that are ready
//! together (never one per frame).
//!
//! The session owns the client's connection state: authenticated user, database, protocol
//! (2/3), client name and proxy-assigned id, MULTI/WATCH state, pub/sub mode.
//!
//! Ordering: a client's commands on the shared lane of one (database, protocol) go to one
//! pooled connection per node (chosen by client id), which answers in order. Switching lane
//! (shared ↔ dedicated, or another database/protocol) waits until every earlier reply is in,
//! so a pipelined `SET k v; MULTI; GET k; EXEC` or `LPUSH q x; BLPOP q 0` behaves as on Redis.
//! While it waits, replies already in are still written.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::backend::{BackendError, Conn, Dedicated, PoolKey};
use super::cluster;
use super::commands::{self, CommandSpec, MultiKey};
use super::pod_limits::{PodStats, Throttle};
use super::resp::{Command, CommandDecoder, Limits, ProtocolError, Reply, Value};
use super::{EndpointHandle, EndpointRuntime, Shared};

type BoxReply = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// A reply slot in the ordered queue. The common case (a shared-pool command) is a plain
/// oneshot receiver, without boxing.
enum Slot {
    Ready(Option<Reply>),
    Wait(oneshot::Receiver<Result<Reply, BackendError>>),
    Boxed(BoxReply),
}

fn backend_error_reply(e: &BackendError) -> Reply {
    // Say whether sending it again cannot apply it twice: clients and operators decide
    // retries from that, as the failover replay will.
    let safe = if e.retry_safe() {
        " (safe to retry)"
    } else {
        ""
    };
    Reply::error(&format!("ERR datamesh proxy: {e}{safe}"))
}

impl Future for Slot {
    type Output = Reply;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        match &mut *self {
            Slot::Ready(r) => Poll::Ready(
                r.take()
                    .unwrap_or_else(|| Reply::error("ERR datamesh proxy: reply polled twice")),
            ),
            Slot::Wait(rx) => rx.poll_unpin(cx).map(|r| match r {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => backend_error_reply(&e),
                Err(_) => Reply::error("ERR datamesh proxy: the backend connection was closed"),
            }),
            Slot::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

/// Awaits a backend reply as a `Result`.
async fn recv(
    rx: Result<oneshot::Receiver<Result<Reply, BackendError>>, BackendError>,
) -> Result<Reply, BackendError> {
    match rx {
        Ok(rx) => rx.await.unwrap_or_else(|_| {
            Err(BackendError::Closed {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            })
        }),
        Err(e) => Err(e),
    }
}

/// Which connection the previous backend commands went to (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Shared {
        db: u32,
        proto: u8,
    },
    /// One dedicated connection (by identity): two different ones are two lanes.
    Dedicated(usize),
}

fn ded_lane(d: &Dedicated) -> Lane {
    Lane::Dedicated(Arc::as_ptr(&d.conn) as usize)
}

/// MULTI/WATCH state.
enum Tx {
    None,
    /// WATCH sent on this connection; MULTI may follow.
    Watching(Dedicated),
    /// Inside MULTI. `conn` is opened at the first command that needs it (in cluster mode
    /// the first key decides the node); `deferred` holds what was answered locally and
    /// must be sent first (MULTI and keyless commands); `failed` = a command was refused
    /// while queueing, so EXEC answers EXECABORT like Redis.
    Multi {
        conn: Option<Dedicated>,
        deferred: Vec<Bytes>,
        failed: bool,
    },
}

/// The session's dedicated pub/sub connection: every frame from it goes to the client.
struct PubSub {
    conn: Dedicated,
    rx: mpsc::UnboundedReceiver<Result<Reply, BackendError>>,
    node: SocketAddr,
}

/// What a stalled dispatch is waiting for.
enum StallDone {
    /// A throttle delay is over: dispatch the front command (already admitted).
    Throttled,
    /// A dedicated connection for the front command (or an error to answer it with).
    Dedicated(Result<Dedicated, BackendError>),
}

type Stall = Pin<Box<dyn Future<Output = StallDone> + Send>>;

/// What the front command needs before it can run.
enum Need {
    /// Runs now.
    Go,
    /// Must wait until every earlier reply is in (lane switch).
    Barrier,
}

pub struct Session {
    shared: Arc<Shared>,
    ep: Arc<EndpointHandle>,
    pod: Arc<PodStats>,
    commands_total: Counter,
    pub id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    /// Address shown to cluster-aware clients as the (only) cluster node: what they dialled.
    advertised: SocketAddr,
    user: Option<String>,
    db: u32,
    proto: u8,
    name: Option<Bytes>,
    lib_name: Option<Bytes>,
    lib_ver: Option<Bytes>,
    tx: Tx,
    pubsub: Option<PubSub>,
    lane: Option<Lane>,
    // I/O
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: CommandDecoder,
    queue: VecDeque<Command>,
    pending: FuturesOrdered<Slot>,
    /// Pending replies that come from dedicated connections (blocking commands, EXEC).
    stall: Option<Stall>,
    /// The front command passed the pod's rate limit already (it waited its delay).
    front_admitted: bool,
    /// A dedicated connection acquired for the front command.
    acquired: Option<Dedicated>,
    closing: bool,
    eof: bool,
    created: tokio::time::Instant,
    /// When the commands in `queue` arrived: their rate-limit delay counts from then, so a
    /// pipelined burst over the limit is refused past `throttle_max_delay_ms`.
    arrival: tokio::time::Instant,
    /// Shared-pool commands of this dispatch round, queued on `outbox_conn` in one go.
    #[allow(clippy::type_complexity)]
    outbox: Vec<(Bytes, bool, oneshot::Sender<Result<Reply, BackendError>>)>,
    outbox_conn: Option<Arc<Conn>>,
    /// The shared connection last used (runtime identity, pool key, connection).
    conn_cache: Option<(usize, PoolKey, Arc<Conn>)>,
    /// Blocking commands whose reply is not in yet.
    blocking: Arc<std::sync::atomic::AtomicUsize>,
}

/// Whether a client must AUTH first: users are configured and there is no password-less
/// "default" user.
fn auth_required(users: &[crate::config::User]) -> bool {
    !users.is_empty()
        && !users
            .iter()
            .any(|u| u.name == "default" && u.password.is_none())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Constant time in the length of `b` (the configured password).
    let mut diff = (a.len() != b.len()) as u8;
    for (i, y) in b.iter().enumerate() {
        diff |= a.get(i).copied().unwrap_or(0) ^ y;
    }
    diff == 0
}

fn wrong_args(name: &[u8]) -> Reply {
    Reply::error(&format!(
        "ERR wrong number of arguments for '{}' command",
        String::from_utf8_lossy(name).to_ascii_lowercase()
    ))
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        ep: Arc<EndpointHandle>,
        pod: Arc<PodStats>,
        commands_total: Counter,
        peer: SocketAddr,
        local: SocketAddr,
        advertised: SocketAddr,
    ) -> Self {
        let id = shared.next_client_id();
        let user = if auth_required(&shared.settings().users) {
            None
        } else {
            Some("default".to_string())
        };
        Self {
            shared,
            ep,
            pod,
            commands_total,
            id,
            peer,
            local,
            advertised,
            user,
            db: 0,
            proto: 2,
            name: None,
            lib_name: None,
            lib_ver: None,
            tx: Tx::None,
            pubsub: None,
            lane: None,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            decoder: CommandDecoder::default(),
            queue: VecDeque::new(),
            pending: FuturesOrdered::new(),
            stall: None,
            front_admitted: false,
            acquired: None,
            closing: false,
            eof: false,
            created: tokio::time::Instant::now(),
            blocking: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            arrival: tokio::time::Instant::now(),
            outbox: Vec::new(),
            outbox_conn: None,
            conn_cache: None,
        }
    }

    fn limits(&self) -> Limits {
        let l = self.shared.settings().limits;
        if self.user.is_none() {
            l.unauthenticated()
        } else {
            l
        }
    }

    /// Serves the client until it closes, QUITs or breaks the protocol.
    pub async fn run(mut self, client: &mut TcpStream) {
        let settings = self.shared.settings();
        let max_pipeline = settings.max_pipeline as usize;
        let out_limit = settings.client_output_limit as usize;
        drop(settings);
        loop {
            self.dispatch_ready();
            if !self.wbuf.is_empty() && !self.flush(client) {
                return;
            }
            let done_reading = self.closing || self.eof;
            if done_reading
                && self.pending.is_empty()
                && self.queue.is_empty()
                && self.stall.is_none()
                && self.wbuf.is_empty()
            {
                return;
            }
            if self.eof && self.blocked_on_dedicated() {
                // A client that went away while blocked: drop it (the dedicated connection
                // closes, which cancels the blocking command on the backend).
                return;
            }
            let can_read = !done_reading
                && self.queue.is_empty()
                && self.stall.is_none()
                && self.pending.len() < max_pipeline
                && self.wbuf.len() < out_limit;
            if self.rbuf.is_empty()
                && !self.decoder.in_progress()
                && self.rbuf.capacity() > 0
                && self.pending.is_empty()
            {
                // Idle clients hold no buffers (10,000 idle clients must stay cheap).
                self.rbuf = BytesMut::new();
            }
            let has_stall = self.stall.is_some();
            let has_pubsub = self.pubsub.is_some();
            tokio::select! {
                biased;
                Some(reply) = self.pending.next(), if !self.pending.is_empty() => {
                    self.wbuf.extend_from_slice(&reply.raw);
                    self.gather_ready();
                }
                done = next_stall(&mut self.stall), if has_stall => {
                    self.stall = None;
                    match done {
                        StallDone::Throttled => self.front_admitted = true,
                        StallDone::Dedicated(Ok(d)) => self.acquired = Some(d),
                        StallDone::Dedicated(Err(e)) => {
                            // The front command is answered with the error.
                            self.queue.pop_front();
                            self.front_admitted = false;
                            self.push_reply(backend_error_reply(&e));
                            if let Tx::Multi { failed, .. } = &mut self.tx {
                                *failed = true;
                            }
                        }
                    }
                }
                msg = next_push(&mut self.pubsub), if has_pubsub => {
                    match msg {
                        Some(Ok(r)) => {
                            self.wbuf.extend_from_slice(&r.raw);
                            while let Some(Ok(r)) = self.pubsub.as_mut().and_then(|p| p.rx.try_recv().ok()) {
                                self.wbuf.extend_from_slice(&r.raw);
                            }
                        }
                        Some(Err(e)) => {
                            // Subscriptions cannot be restored behind the client's back.
                            self.wbuf.extend_from_slice(&backend_error_reply(&e).raw);
                            self.pubsub = None;
                            self.closing = true;
                        }
                        None => {
                            self.pubsub = None;
                            self.closing = true;
                        }
                    }
                }
                r = client.writable(), if !self.wbuf.is_empty() => {
                    if r.is_err() {
                        return;
                    }
                }
                r = client.readable(), if can_read => {
                    if r.is_err() {
                        return;
                    }
                    if !self.read(client) {
                        return;
                    }
                }
            }
        }
    }

    /// True while a blocking command waits, or the client is subscribed: nothing more will
    /// come for a client that has gone away.
    fn blocked_on_dedicated(&self) -> bool {
        self.blocking.load(std::sync::atomic::Ordering::Relaxed) > 0 || self.pubsub.is_some()
    }

    /// Appends every reply that is already in (one write for all of them).
    fn gather_ready(&mut self) {
        while let Some(Some(r)) = self.pending.next().now_or_never() {
            self.wbuf.extend_from_slice(&r.raw);
        }
    }

    fn push_reply(&mut self, r: Reply) {
        self.pending.push_back(Slot::Ready(Some(r)));
    }

    /// Writes what the socket takes now. False when the client is gone.
    fn flush(&mut self, client: &TcpStream) -> bool {
        while !self.wbuf.is_empty() {
            match client.try_write(&self.wbuf) {
                Ok(0) => return false,
                Ok(n) => {
                    let _ = self.wbuf.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        if self.wbuf.capacity() > 64 * 1024 {
            self.wbuf = BytesMut::new();
        }
        true
    }

    /// Reads what is there and decodes every complete command. False on a read error.
    fn read(&mut self, client: &mut TcpStream) -> bool {
        self.rbuf.reserve(16 * 1024);
        self.arrival = tokio::time::Instant::now();
        // Through AsyncRead, polled once: unlike try_read, a short read clears the socket's
        // readiness, so the next wait goes to epoll instead of costing a recv that answers
        // EAGAIN (one syscall per command at pipeline depth 1). Pending = nothing there.
        match tokio::io::AsyncReadExt::read_buf(client, &mut self.rbuf).now_or_never() {
            Some(Ok(0)) => {
                self.eof = true;
            }
            Some(Ok(_)) => {}
            None => return true,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Some(Err(_)) => return false,
        }
        let limits = self.limits();
        loop {
            match self.decoder.decode(&mut self.rbuf, &limits) {
                Ok(Some(cmd)) => self.queue.push_back(cmd),
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(e);
                    break;
                }
            }
        }
        if self.eof && !self.rbuf.is_empty() {
            debug!(
                id = self.id,
                bytes = self.rbuf.len(),
                "client closed mid-command"
            );
        }
        true
    }

    fn protocol_error(&mut self, e: ProtocolError) {
        debug!(id = self.id, error = %e, "protocol error: closing the client");
        self.shared.metrics.count_error(&self.ep.name, "protocol");
        self.shared.pods.error(self.pod.cookie);
        // Commands decoded before the bad bytes are answered first.
        let r = Reply::error(&format!("ERR Protocol error: {e}"));
        self.queue.push_back(Command {
            raw: r.raw.clone(),
            args: vec![Bytes::from_static(b"\0protocol-error"), r.raw],
        });
        self.rbuf.clear();
        self.closing = true;
    }

    /// Dispatches queued commands until one must wait, then hands the round's shared-pool
    /// commands to their connection (one lock and one writer wake-up per round).
    fn dispatch_ready(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let rt = self.ep.current();
        self.dispatch_round(&rt);
        self.flush_outbox(&rt);
    }

    fn flush_outbox(&mut self, rt: &Arc<EndpointRuntime>) {
        let Some(conn) = self.outbox_conn.take() else {
            return;
        };
        if let Err(e) = conn.submit_senders(&mut self.outbox) {
            rt.node_failed(conn.key.addr);
            for (_, _, tx) in self.outbox.drain(..) {
                let _ = tx.send(Err(e.clone()));
            }
        }
        if self.outbox.capacity() > 64 {
            // A deep pipeline's batch: do not keep it for the life of the client.
            self.outbox = Vec::new();
        }
    }

    /// The session's shared connection for `key` (cached; re-picked when it is failing).
    fn shared_conn(&mut self, rt: &Arc<EndpointRuntime>, key: PoolKey) -> Arc<Conn> {
        let rt_id = Arc::as_ptr(rt) as usize;
        if let Some((id, k, c)) = &self.conn_cache {
            if *id == rt_id && *k == key && !c.failing_fast() {
                return c.clone();
            }
        }
        let c = rt.group.pool(key).shared(self.id);
        self.conn_cache = Some((rt_id, key, c.clone()));
        c
    }

    fn dispatch_round(&mut self, rt: &Arc<EndpointRuntime>) {
        while self.stall.is_none() {
            let Some(cmd) = self.queue.front() else {
                return;
            };
            if cmd.name() == b"\0protocol-error" {
                let Some(cmd) = self.queue.pop_front() else {
                    return;
                };
                self.push_reply(Reply {
                    raw: cmd.args[1].clone(),
                    kind: super::resp::ReplyKind::Error,
                });
                self.queue.clear();
                return;
            }
            if !self.front_admitted && self.pod.limited() {
                let max_delay = self.shared.settings().throttle_max_delay;
                // Counted from arrival, but a command that already waited (behind a blocking
                // command) is not charged for that wait.
                let limits = &self.shared.pod_limits;
                let at = limits
                    .ns_at(self.arrival)
                    .max(limits.now_ns().saturating_sub(max_delay.as_nanos() as u64));
                match self.pod.check(at, max_delay) {
                    Throttle::Allow => {}
                    Throttle::Delay(d) => {
                        self.pod.throttled(1);
                        self.shared.metrics.throttled.inc();
                        let until = self.arrival + d;
                        self.stall = Some(Box::pin(async move {
                            tokio::time::sleep_until(until).await;
                            StallDone::Throttled
                        }));
                        return;
                    }
                    Throttle::Refuse => {
                        let Some(cmd) = self.queue.pop_front() else {
                            return;
                        };
                        self.pod.throttled(1);
                        self.pod.commands(1);
                        self.commands_total.inc();
                        self.shared.metrics.throttled.inc();
                        self.push_reply(Reply::error(&format!(
                            "ERR throttled: pod {} is over its command rate limit",
                            self.pod.name()
                        )));
                        let _ = cmd;
                        continue;
                    }
                }
                self.front_admitted = true;
            }
            match self.execute_front(rt) {
                Need::Go => {
                    self.front_admitted = false;
                    self.pod.commands(1);
                    self.commands_total.inc();
                }
                Need::Barrier => return,
            }
        }
    }

    /// Whether a command for `lane` may run now: every earlier reply is in, or they were on
    /// the same lane.
    fn lane_ok(&mut self, lane: Lane) -> bool {
        if self.lane == Some(lane) || self.pending.is_empty() {
            self.lane = Some(lane);
            true
        } else {
            false
        }
    }

    fn shared_lane(&self) -> Lane {
        Lane::Shared {
            db: self.db,
            proto: self.proto,
        }
    }

    /// Starts acquiring a dedicated connection to `node` for the front command, once every
    /// earlier reply is in (a new connection is a new lane).
    fn acquire(&mut self, rt: &Arc<EndpointRuntime>, node: SocketAddr) -> Need {
        if !self.pending.is_empty() {
            return Need::Barrier;
        }
        let pool = rt.group.pool(PoolKey {
            addr: node,
            db: self.db,
            proto: self.proto,
        });
        let rt = rt.clone();
        self.stall = Some(Box::pin(async move {
            let r = pool.dedicated().await;
            if let Err(BackendError::Unavailable { addr, .. }) = &r {
                rt.node_failed(*addr);
            }
            StallDone::Dedicated(r)
        }));
        Need::Barrier
    }

    /// Runs the front command, or says why it must wait (the command stays queued).
    fn execute_front(&mut self, rt: &Arc<EndpointRuntime>) -> Need {
        let argc = self.queue[0].args.len();
        let spec = commands::lookup(self.queue[0].name());

        // Authentication gate.
        if self.user.is_none() && !spec.is_some_and(|s| s.has(commands::NO_AUTH)) {
            self.pop_reply(Reply::error("NOAUTH Authentication required."));
            return Need::Go;
        }

        // Pub/sub mode: everything goes to the subscription connection, in order.
        if self.pubsub.is_some() {
            return self.execute_in_pubsub(rt, spec);
        }

        let Some(spec) = spec else {
            if let Tx::Multi { .. } = self.tx {
                return self.queue_in_multi(rt, None);
            }
            return self.forward_front(rt, None);
        };
        if spec.has(commands::REFUSED) {
            let r = Reply::error(&commands::refusal(self.queue[0].name(), spec.reason));
            return self.refuse_front(r);
        }
        if !spec.arity_ok(argc) {
            return self.refuse_front(wrong_args(self.queue[0].name()));
        }
        if let Some(reason) = commands::refused_subcommand(&self.queue[0]) {
            let r = Reply::error(&commands::refusal(self.queue[0].name(), reason));
            return self.refuse_front(r);
        }
        if spec.has(commands::TRANSACTION) {
            return self.execute_tx(rt, spec);
        }
        if let Tx::Multi { .. } = self.tx {
            // Inside MULTI: queued on the transaction's connection (PING and ECHO too, so
            // EXEC's array has their answers).
            if spec.has(commands::LOCAL) && !matches!(spec.name, "ping" | "echo") {
                if matches!(spec.name, "quit" | "reset") {
                    return self.execute_local(rt, spec);
                }
                let r = Reply::error(&format!(
                    "ERR {} inside MULTI is not supported by the datamesh proxy",
                    spec.name.to_ascii_uppercase()
                ));
                return self.refuse_front(r);
            }
            if spec.has(commands::PUBSUB) {
                let r = Reply::error(
                    "ERR SUBSCRIBE inside MULTI is not supported by the datamesh proxy",
                );
                return self.refuse_front(r);
            }
            return self.queue_in_multi(rt, Some(spec));
        }
        if spec.has(commands::LOCAL) {
            return self.execute_local(rt, spec);
        }
        if spec.has(commands::PUBSUB) {
            return self.enter_pubsub(rt, spec);
        }
        if commands::is_blocking(spec, &self.queue[0]) {
            return self.execute_blocking(rt, spec);
        }
        self.forward_front(rt, Some(spec))
    }

    /// Answers the front command with `r` (it never reaches a backend).
    fn pop_reply(&mut self, r: Reply) {
        self.queue.pop_front();
        self.push_reply(r);
    }

    /// Answers the front command with an error; inside MULTI that aborts the transaction.
    fn refuse_front(&mut self, r: Reply) -> Need {
        if let Tx::Multi { failed, .. } = &mut self.tx {
            *failed = true;
        }
        self.pop_reply(r);
        Need::Go
    }

    /// The node and slot for a keyed command (cluster routing), or an error reply.
    fn route(
        &self,
        rt: &EndpointRuntime,
        spec: Option<&CommandSpec>,
        cmd: &Command,
    ) -> Result<(SocketAddr, Option<u16>), Reply> {
        let readonly = spec.is_some_and(|s| s.has(commands::READONLY));
        let slot = if rt.topology.is_cluster() {
            let keys: Vec<&[u8]> = match spec {
                Some(s) => commands::key_indices(s, cmd)
                    .into_iter()
                    .map(|i| &cmd.args[i][..])
                    .collect(),
                // Unknown command: its first argument is taken as the key, if any.
                None => cmd.args.get(1).map(|a| &a[..]).into_iter().collect(),
            };
            match cluster::common_slot(keys) {
                Ok(s) => s,
                Err(_) => {
                    return Err(Reply {
                        raw: cluster::crossslot_error(),
                        kind: super::resp::ReplyKind::Error,
                    })
                }
            }
        } else {
            None
        };
        match rt.topology.pick(slot, readonly) {
            Ok(a) => Ok((a, slot)),
            Err(e) => Err(Reply::error(&format!("ERR datamesh proxy: {e}"))),
        }
    }

    /// Sends the front command to the shared pool (split across slots where needed).
    fn forward_front(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: Option<&'static CommandSpec>,
    ) -> Need {
        let lane = self.shared_lane();
        if !self.lane_ok(lane) {
            return Need::Barrier;
        }
        let Some(cmd) = self.queue.pop_front() else {
            return Need::Go;
        };
        let is_cluster = rt.topology.is_cluster();
        if is_cluster {
            if let Some(s) = spec {
                if s.name == "scan" {
                    self.push_reply(Reply::error(&commands::refusal(
                        b"scan",
                        "a cursor cannot span the nodes of a cluster backend; use SCAN on each node directly or a cluster-aware client",
                    )));
                    return Need::Go;
                }
                if let Some(b) = s.broadcast {
                    let f = broadcast(rt.clone(), b, cmd, self.db, self.proto, self.id);
                    self.pending.push_back(Slot::Boxed(f));
                    return Need::Go;
                }
                if s.multi != MultiKey::None && cmd.args.len() > 2 {
                    let parts = match cluster::split_multikey(cmd.name(), &cmd.args[1..]) {
                        Ok(p) => p,
                        Err(e) => {
                            self.push_reply(Reply::error(&format!("ERR {e}")));
                            return Need::Go;
                        }
                    };
                    if parts.len() > 1 {
                        let f = split_and_merge(rt.clone(), parts, self.db, self.proto, self.id);
                        self.pending.push_back(Slot::Boxed(f));
                        return Need::Go;
                    }
                }
            }
        }
        let (node, slot) = match self.route(rt, spec, &cmd) {
            Ok(x) => x,
            Err(r) => {
                self.push_reply(r);
                return Need::Go;
            }
        };
        let replay_safe = spec.is_some_and(|s| s.has(commands::READONLY));
        let key = PoolKey {
            addr: node,
            db: self.db,
            proto: self.proto,
        };
        if is_cluster || rt.group.command_timeout.is_some() || rt.sentinel.is_some() {
            let f = send_routed(rt.clone(), key, slot, cmd.raw, replay_safe, self.id);
            self.pending.push_back(Slot::Boxed(f));
        } else {
            let conn = self.shared_conn(rt, key);
            if self
                .outbox_conn
                .as_ref()
                .is_some_and(|c| !Arc::ptr_eq(c, &conn))
            {
                self.flush_outbox(rt);
            }
            let (tx, rx) = oneshot::channel();
            self.outbox.push((cmd.raw, replay_safe, tx));
            self.outbox_conn = Some(conn);
            self.pending.push_back(Slot::Wait(rx));
        }
        Need::Go
    }

    fn execute_blocking(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        let Some(conn) = self.acquired.take() else {
            let cmd = &self.queue[0];
            match self.route(rt, Some(spec), cmd) {
                Ok((node, _)) => return self.acquire(rt, node),
                Err(r) => {
                    self.pop_reply(r);
                    return Need::Go;
                }
            }
        };
        self.lane = Some(ded_lane(&conn));
        let Some(cmd) = self.queue.pop_front() else {
            return Need::Go;
        };
        let rx = conn.conn.submit(cmd.raw, false);
        let blocking = self.blocking.clone();
        blocking.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pending.push_back(Slot::Boxed(Box::pin(async move {
            let r = recv(rx).await;
            blocking.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            // Handed back to the pool once the reply is in (clean), closed otherwise.
            drop(conn);
            r.unwrap_or_else(|e| backend_error_reply(&e))
        })));
        Need::Go
    }

    // ---- transactions ----

    fn execute_tx(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        match spec.name {
            "multi" => match std::mem::replace(&mut self.tx, Tx::None) {
                tx @ Tx::Multi { .. } => {
                    self.tx = tx;
                    self.pop_reply(Reply::error("ERR MULTI calls can not be nested"));
                    Need::Go
                }
                Tx::Watching(d) => {
                    // The connection holds the WATCHes: MULTI goes there now.
                    if !self.lane_ok(ded_lane(&d)) {
                        self.tx = Tx::Watching(d);
                        return Need::Barrier;
                    }
                    let Some(cmd) = self.queue.pop_front() else {
                        return Need::Go;
                    };
                    let rx = d.conn.submit(cmd.raw, false);
                    self.pending.push_back(Slot::Boxed(Box::pin(async move {
                        recv(rx).await.unwrap_or_else(|e| backend_error_reply(&e))
                    })));
                    self.tx = Tx::Multi {
                        conn: Some(d),
                        deferred: Vec::new(),
                        failed: false,
                    };
                    Need::Go
                }
                Tx::None => {
                    let Some(cmd) = self.queue.pop_front() else {
                        return Need::Go;
                    };
                    self.tx = Tx::Multi {
                        conn: None,
                        deferred: vec![cmd.raw],
                        failed: false,
                    };
                    self.push_reply(Reply::ok());
                    Need::Go
                }
            },
            "exec" | "discard" => {
                let is_exec = spec.name == "exec";
                match std::mem::replace(&mut self.tx, Tx::None) {
                    Tx::Multi {
                        conn: Some(mut d),
                        deferred,
                        failed,
                    } => {
                        if !self.lane_ok(ded_lane(&d)) {
                            self.tx = Tx::Multi {
                                conn: Some(d),
                                deferred,
                                failed,
                            };
                            return Need::Barrier;
                        }
                        let Some(cmd) = self.queue.pop_front() else {
                            return Need::Go;
                        };
                        let abort = is_exec && failed;
                        let raw = if abort {
                            Bytes::from_static(b"*1\r\n$7\r\nDISCARD\r\n")
                        } else {
                            cmd.raw
                        };
                        let rx = d.conn.submit(raw, false);
                        self.pending.push_back(Slot::Boxed(Box::pin(async move {
                            let r = recv(rx).await;
                            // EXEC/DISCARD end MULTI and every WATCH: the connection is clean.
                            d.clean = matches!(&r, Ok(r) if !r.is_error() || abort);
                            drop(d);
                            if abort {
                                return Reply::error(
                                    "EXECABORT Transaction discarded because of previous errors.",
                                );
                            }
                            r.unwrap_or_else(|e| backend_error_reply(&e))
                        })));
                        Need::Go
                    }
                    tx @ Tx::Multi { conn: None, .. } => {
                        if is_exec && !matches!(tx, Tx::Multi { failed: true, .. }) {
                            // Nothing queued needed a node yet: open the transaction on any
                            // node now (MULTI and the queued commands first, then EXEC).
                            self.tx = tx;
                            return self.queue_in_multi(rt, None);
                        }
                        self.pop_reply(if is_exec {
                            Reply::error(
                                "EXECABORT Transaction discarded because of previous errors.",
                            )
                        } else {
                            Reply::ok()
                        });
                        Need::Go
                    }
                    other => {
                        // EXEC/DISCARD without MULTI keeps the WATCHes (as Redis does).
                        self.tx = other;
                        self.pop_reply(Reply::error(if is_exec {
                            "ERR EXEC without MULTI"
                        } else {
                            "ERR DISCARD without MULTI"
                        }));
                        Need::Go
                    }
                }
            }
            "watch" => match std::mem::replace(&mut self.tx, Tx::None) {
                tx @ Tx::Multi { .. } => {
                    self.tx = tx;
                    self.pop_reply(Reply::error("ERR WATCH inside MULTI is not allowed"));
                    Need::Go
                }
                Tx::Watching(d) => {
                    if !self.lane_ok(ded_lane(&d)) {
                        self.tx = Tx::Watching(d);
                        return Need::Barrier;
                    }
                    // In cluster mode further WATCHed keys must live on the same node.
                    if rt.topology.is_cluster() {
                        match self.route(rt, Some(spec), &self.queue[0]) {
                            Ok((node, _)) if node == d.conn.key.addr => {}
                            Ok(_) => {
                                self.tx = Tx::Watching(d);
                                self.pop_reply(Reply::error("ERR datamesh proxy: WATCH of keys on different cluster nodes is not supported"));
                                return Need::Go;
                            }
                            Err(r) => {
                                self.tx = Tx::Watching(d);
                                self.pop_reply(r);
                                return Need::Go;
                            }
                        }
                    }
                    let Some(cmd) = self.queue.pop_front() else {
                        return Need::Go;
                    };
                    let rx = d.conn.submit(cmd.raw, false);
                    self.pending.push_back(Slot::Boxed(Box::pin(async move {
                        recv(rx).await.unwrap_or_else(|e| backend_error_reply(&e))
                    })));
                    self.tx = Tx::Watching(d);
                    Need::Go
                }
                Tx::None => {
                    let Some(mut d) = self.acquired.take() else {
                        match self.route(rt, Some(spec), &self.queue[0]) {
                            Ok((node, _)) => return self.acquire(rt, node),
                            Err(r) => {
                                self.pop_reply(r);
                                return Need::Go;
                            }
                        }
                    };
                    self.lane = Some(ded_lane(&d));
                    let Some(cmd) = self.queue.pop_front() else {
                        return Need::Go;
                    };
                    d.clean = false;
                    let rx = d.conn.submit(cmd.raw, false);
                    self.pending.push_back(Slot::Boxed(Box::pin(async move {
                        recv(rx).await.unwrap_or_else(|e| backend_error_reply(&e))
                    })));
                    self.tx = Tx::Watching(d);
                    Need::Go
                }
            },
            "unwatch" => match std::mem::replace(&mut self.tx, Tx::None) {
                Tx::Watching(mut d) => {
                    if !self.lane_ok(ded_lane(&d)) {
                        self.tx = Tx::Watching(d);
                        return Need::Barrier;
                    }
                    let Some(cmd) = self.queue.pop_front() else {
                        return Need::Go;
                    };
                    let rx = d.conn.submit(cmd.raw, false);
                    self.pending.push_back(Slot::Boxed(Box::pin(async move {
                        let r = recv(rx).await;
                        d.clean = matches!(&r, Ok(r) if r.is_ok());
                        drop(d);
                        r.unwrap_or_else(|e| backend_error_reply(&e))
                    })));
                    Need::Go
                }
                tx @ Tx::Multi { .. } => {
                    self.tx = tx;
                    self.queue_in_multi(rt, Some(spec))
                }
                Tx::None => {
                    self.pop_reply(Reply::ok());
                    Need::Go
                }
            },
            _ => self.forward_front(rt, Some(spec)),
        }
    }

    /// Queues the front command inside MULTI: on the transaction's connection, opening it
    /// (and sending what was deferred) at the first command that needs a node.
    fn queue_in_multi(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: Option<&'static CommandSpec>,
    ) -> Need {
        let held = match &self.tx {
            Tx::Multi { conn: Some(d), .. } => Some(ded_lane(d)),
            _ => None,
        };
        if let Some(lane) = held {
            if !self.lane_ok(lane) {
                return Need::Barrier;
            }
        }
        let Tx::Multi { conn, deferred, .. } = &mut self.tx else {
            return Need::Go;
        };
        let cmd = &self.queue[0];
        let is_exec = cmd.name().eq_ignore_ascii_case(b"exec");
        // Keyless commands before the first key (cluster mode) are queued locally.
        let keyed = match spec {
            Some(s) => !commands::key_indices(s, cmd).is_empty(),
            None => cmd.args.len() > 1,
        };
        if conn.is_none() && rt.topology.is_cluster() && !keyed && !is_exec {
            let Some(cmd) = self.queue.pop_front() else {
                return Need::Go;
            };
            deferred.push(cmd.raw);
            self.push_reply(Reply::simple("QUEUED"));
            return Need::Go;
        }
        let route = {
            let cmd = &self.queue[0];
            let spec_for_route = if is_exec { None } else { spec };
            if is_exec {
                rt.topology
                    .pick(None, false)
                    .map(|a| (a, None))
                    .map_err(|e| Reply::error(&format!("ERR datamesh proxy: {e}")))
            } else {
                self.route(rt, spec_for_route, cmd)
            }
        };
        let Tx::Multi {
            conn,
            deferred,
            failed,
        } = &mut self.tx
        else {
            return Need::Go;
        };
        let node = match route {
            Ok((n, _)) => n,
            Err(r) => {
                *failed = true;
                self.pop_reply(r);
                return Need::Go;
            }
        };
        match conn {
            // Keyless commands and EXEC run wherever the transaction is.
            Some(d) if keyed && !is_exec && d.conn.key.addr != node && rt.topology.is_cluster() => {
                *failed = true;
                self.pop_reply(Reply::error("ERR datamesh proxy: a transaction must stay on one cluster node (keys of other nodes)"));
                Need::Go
            }
            Some(d) => {
                let Some(cmd) = self.queue.pop_front() else {
                    return Need::Go;
                };
                let rx = d.conn.submit(cmd.raw, false);
                // EXEC of a transaction opened lazily: the connection goes back to the pool
                // once EXEC's reply is in (the future owns it until then).
                let release = if is_exec {
                    match std::mem::replace(&mut self.tx, Tx::None) {
                        Tx::Multi { conn: Some(d), .. } => Some(d),
                        other => {
                            self.tx = other;
                            None
                        }
                    }
                } else {
                    None
                };
                self.pending.push_back(Slot::Boxed(Box::pin(async move {
                    let r = recv(rx).await;
                    if let Some(mut d) = release {
                        d.clean = r.is_ok();
                        drop(d);
                    }
                    r.unwrap_or_else(|e| backend_error_reply(&e))
                })));
                Need::Go
            }
            None => {
                let Some(mut d) = self.acquired.take() else {
                    let _ = (deferred, failed);
                    return self.acquire(rt, node);
                };
                d.clean = false;
                self.lane = Some(ded_lane(&d));
                // MULTI and the locally answered commands: their replies were given already.
                for raw in std::mem::take(deferred) {
                    let rx = d.conn.submit(raw, false);
                    self.pending.push_back(Slot::Boxed(Box::pin(async move {
                        // Answered already (MULTI's +OK, +QUEUED): the client gets nothing
                        // more; a failure shows at EXEC.
                        let _ = recv(rx).await;
                        Reply {
                            raw: Bytes::new(),
                            kind: super::resp::ReplyKind::Other,
                        }
                    })));
                }
                *conn = Some(d);
                self.queue_in_multi(rt, spec)
            }
        }
    }

    // ---- pub/sub ----

    fn enter_pubsub(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        if matches!(spec.name, "unsubscribe" | "punsubscribe" | "sunsubscribe") {
            // Not subscribed: Redis answers one frame per channel (or one with a null).
            let kind = Value::bulk(spec.name);
            let mut out = BytesMut::new();
            let cmd = &self.queue[0];
            let channels: Vec<Value> = if cmd.args.len() > 1 {
                cmd.args[1..]
                    .iter()
                    .map(|c| Value::Bulk(c.clone()))
                    .collect()
            } else {
                vec![Value::Null]
            };
            for ch in channels {
                let v = Value::Push(vec![kind.clone(), ch, Value::Int(0)]);
                v.encode(self.proto, &mut out);
            }
            let raw = out.freeze();
            self.pop_reply(Reply {
                raw,
                kind: super::resp::ReplyKind::Push,
            });
            return Need::Go;
        }
        let Some(mut d) = self.acquired.take() else {
            let node = if spec.name == "ssubscribe" {
                match self.route(rt, Some(spec), &self.queue[0]) {
                    Ok((n, _)) => n,
                    Err(r) => {
                        self.pop_reply(r);
                        return Need::Go;
                    }
                }
            } else {
                match rt.topology.pick(None, false) {
                    Ok(n) => n,
                    Err(e) => {
                        self.pop_reply(Reply::error(&format!("ERR datamesh proxy: {e}")));
                        return Need::Go;
                    }
                }
            };
            return self.acquire(rt, node);
        };
        self.lane = Some(ded_lane(&d));
        let (tx, rx) = mpsc::unbounded_channel();
        d.conn.set_push_sink(tx);
        d.clean = false;
        let node = d.conn.key.addr;
        self.pubsub = Some(PubSub { conn: d, rx, node });
        self.execute_in_pubsub(rt, Some(spec))
    }

    fn execute_in_pubsub(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: Option<&'static CommandSpec>,
    ) -> Need {
        let name = spec.map(|s| s.name).unwrap_or("");
        match name {
            "quit" | "reset" => {
                if let Some(spec) = spec {
                    return self.execute_local(rt, spec);
                }
            }
            "auth" | "hello" => {
                let r = Reply::error(&format!(
                    "ERR {} while subscribed is not supported by the datamesh proxy",
                    name.to_ascii_uppercase()
                ));
                self.write_now(r);
                self.queue.pop_front();
                return Need::Go;
            }
            "ssubscribe" if rt.topology.is_cluster() => {
                let node = self.pubsub.as_ref().map(|p| p.node);
                if let Ok((n, _)) = self.route(rt, spec, &self.queue[0]) {
                    if Some(n) != node {
                        self.write_now(Reply::error("ERR datamesh proxy: SSUBSCRIBE to channels of different cluster nodes on one connection is not supported"));
                        self.queue.pop_front();
                        return Need::Go;
                    }
                }
            }
            _ => {}
        }
        let Some(cmd) = self.queue.pop_front() else {
            return Need::Go;
        };
        if let Some(p) = &self.pubsub {
            if let Err(e) = p.conn.conn.send_untracked(cmd.raw) {
                self.write_now(backend_error_reply(&e));
                self.closing = true;
            }
        }
        Need::Go
    }

    /// In pub/sub mode replies do not go through the ordered queue.
    fn write_now(&mut self, r: Reply) {
        self.wbuf.extend_from_slice(&r.raw);
    }

    // ---- commands the proxy answers itself ----

    fn execute_local(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        let Some(cmd) = self.queue.front().cloned() else {
            return Need::Go;
        };
        let args = &cmd.args;
        let reply = match spec.name {
            "ping" => match args.len() {
                1 => Reply::simple("PONG"),
                2 => Reply::bulk(&args[1]),
                _ => wrong_args(b"ping"),
            },
            "echo" => Reply::bulk(&args[1]),
            "quit" => {
                self.closing = true;
                Reply::ok()
            }
            // RESET drops the dedicated connections: earlier replies from them come first.
            "reset" if !self.pending.is_empty() => return Need::Barrier,
            "reset" => {
                self.tx = Tx::None;
                self.pubsub = None;
                self.db = 0;
                self.proto = 2;
                self.name = None;
                self.user = if auth_required(&self.shared.settings().users) {
                    None
                } else {
                    Some("default".into())
                };
                Reply::simple("RESET")
            }
            "auth" => self.auth(&args[1..]),
            "hello" => self.hello(rt, &args[1..]),
            "select" => self.select(rt, &args[1]),
            "client" => self.client(rt, &cmd),
            "readonly" | "readwrite" | "asking" => Reply {
                raw: cluster::readonly_reply(),
                kind: super::resp::ReplyKind::Simple,
            },
            "cluster" if rt.topology.is_cluster() => {
                let raw = cluster::cluster_reply(&args[1..], self.advertised, self.proto >= 3);
                let kind = if raw.first() == Some(&b'-') {
                    super::resp::ReplyKind::Error
                } else {
                    super::resp::ReplyKind::Other
                };
                Reply { raw, kind }
            }
            // A standalone backend answers CLUSTER itself ("cluster support disabled").
            _ => return self.forward_front(rt, Some(spec)),
        };
        self.pop_reply(reply);
        if spec.name == "quit" {
            // Nothing after QUIT runs.
            self.queue.clear();
        }
        Need::Go
    }

    fn check_user(&self, user: &[u8], pass: &[u8]) -> Result<(), Reply> {
        let settings = self.shared.settings();
        let wrong =
            || Reply::error("WRONGPASS invalid username-password pair or user is disabled.");
        let found = settings.users.iter().find(|u| u.name.as_bytes() == user);
        match found {
            Some(u) => match &u.password {
                None => Ok(()),
                Some(p) if ct_eq(pass, p.expose().as_bytes()) => Ok(()),
                Some(_) => Err(wrong()),
            },
            // No users configured: the default user has no password and accepts any.
            None if settings.users.is_empty() && user == b"default" => Ok(()),
            None => Err(wrong()),
        }
    }

    fn auth(&mut self, args: &[Bytes]) -> Reply {
        let (user, pass) = match args {
            [p] => {
                if self.shared.settings().users.is_empty() {
                    return Reply::error("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?");
                }
                (&b"default"[..], &p[..])
            }
            [u, p] => (&u[..], &p[..]),
            _ => return Reply::error("ERR syntax error"),
        };
        match self.check_user(user, pass) {
            Ok(()) => {
                self.user = Some(String::from_utf8_lossy(user).into_owned());
                Reply::ok()
            }
            Err(r) => {
                self.shared.metrics.count_error(&self.ep.name, "auth");
                r
            }
        }
    }

    fn hello(&mut self, rt: &Arc<EndpointRuntime>, args: &[Bytes]) -> Reply {
        let mut proto = self.proto;
        let mut i = 0;
        if let Some(v) = args.first() {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(2) => proto = 2,
                Some(3) => proto = 3,
                Some(_) => return Reply::error("NOPROTO unsupported protocol version"),
                None => {
                    return Reply::error("ERR Protocol version is not an integer or out of range")
                }
            }
            i = 1;
        }
        let mut new_user = None;
        let mut new_name = None;
        while i < args.len() {
            let opt = String::from_utf8_lossy(&args[i]).to_ascii_uppercase();
            match opt.as_str() {
                "AUTH" if i + 2 < args.len() => {
                    if let Err(r) = self.check_user(&args[i + 1], &args[i + 2]) {
                        self.shared.metrics.count_error(&self.ep.name, "auth");
                        return r;
                    }
                    new_user = Some(String::from_utf8_lossy(&args[i + 1]).into_owned());
                    i += 3;
                }
                "SETNAME" if i + 1 < args.len() => {
                    if let Err(r) = check_client_name(&args[i + 1]) {
                        return r;
                    }
                    new_name = Some(args[i + 1].clone());
                    i += 2;
                }
                _ => {
                    return Reply::error(&format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    ))
                }
            }
        }
        if self.user.is_none() && new_user.is_none() {
            return Reply::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
        }
        if let Some(u) = new_user {
            self.user = Some(u);
        }
        if let Some(n) = new_name {
            self.name = if n.is_empty() { None } else { Some(n) };
        }
        self.proto = proto;
        let mode = if rt.topology.is_cluster() {
            "cluster"
        } else {
            "standalone"
        };
        Value::Map(vec![
            (Value::bulk("server"), Value::bulk("redis")),
            (
                Value::bulk("version"),
                Value::bulk(rt.group.server_version()),
            ),
            (Value::bulk("proto"), Value::Int(proto as i64)),
            (Value::bulk("id"), Value::Int(self.id as i64)),
            (Value::bulk("mode"), Value::bulk(mode)),
            (Value::bulk("role"), Value::bulk("master")),
            (Value::bulk("modules"), Value::Array(vec![])),
        ])
        .into_reply(proto)
    }

    fn select(&mut self, rt: &Arc<EndpointRuntime>, arg: &Bytes) -> Reply {
        let Some(db) = std::str::from_utf8(arg)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        else {
            return Reply::error("ERR value is not an integer or out of range");
        };
        if rt.topology.is_cluster() && db != 0 {
            return Reply::error("ERR SELECT is not allowed in cluster mode");
        }
        if db < 0 || db >= rt.cfg.backend.databases as i64 {
            return Reply::error("ERR DB index is out of range");
        }
        self.db = db as u32;
        Reply::ok()
    }

    fn client(&mut self, rt: &Arc<EndpointRuntime>, cmd: &Command) -> Reply {
        let sub = cmd.arg_upper(1);
        let args = &cmd.args;
        match sub.as_str() {
            "ID" => Reply::integer_reply(self.id as i64),
            "SETNAME" if args.len() == 3 => match check_client_name(&args[2]) {
                Ok(()) => {
                    self.name = if args[2].is_empty() { None } else { Some(args[2].clone()) };
                    Reply::ok()
                }
                Err(r) => r,
            },
            "GETNAME" => match &self.name {
                Some(n) => Reply::bulk(n),
                None => Reply::null(self.proto),
            },
            "INFO" => Reply::bulk(self.info_line(rt).as_bytes()),
            "LIST" => Reply::bulk(self.info_line(rt).as_bytes()),
            "SETINFO" if args.len() == 4 => {
                let attr = cmd.arg_upper(2);
                match attr.as_str() {
                    "LIB-NAME" => self.lib_name = Some(args[3].clone()),
                    "LIB-VER" => self.lib_ver = Some(args[3].clone()),
                    _ => return Reply::error(&format!("ERR Unrecognized option '{}'", String::from_utf8_lossy(&args[2]))),
                }
                Reply::ok()
            }
            "GETREDIR" => Reply::integer_reply(-1),
            "TRACKING" | "CACHING" | "TRACKINGINFO" => Reply::error(&commands::refusal(
                format!("CLIENT {sub}").as_bytes(),
                "client-side caching needs invalidations for this client, but backend connections are shared",
            )),
            "KILL" | "PAUSE" | "UNPAUSE" | "UNBLOCK" | "NO-EVICT" | "NO-TOUCH" | "REPLY" => Reply::error(&commands::refusal(
                format!("CLIENT {sub}").as_bytes(),
                "it acts on backend connections that are shared by many clients",
            )),
            "" => wrong_args(b"client"),
            _ => Reply::error(&format!(
                "ERR unknown subcommand or wrong number of arguments for 'CLIENT|{}' command",
                sub.to_ascii_lowercase()
            )),
        }
    }

    /// A `CLIENT INFO` line for this client as the proxy sees it.
    fn info_line(&self, _rt: &Arc<EndpointRuntime>) -> String {
        let s = |b: &Option<Bytes>| {
            b.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let multi = match &self.tx {
            Tx::Multi { .. } => 0,
            _ => -1,
        };
        format!(
            "id={} addr={} laddr={} fd=-1 name={} age={} idle=0 flags={} db={} sub=0 psub=0 ssub=0 multi={} watch=0 qbuf={} qbuf-free=0 argv-mem=0 multi-mem=0 rbs={} rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd=client|info user={} redir=-1 resp={} lib-name={} lib-ver={}\n",
            self.id,
            self.peer,
            self.local,
            s(&self.name),
            self.created.elapsed().as_secs(),
            if self.pubsub.is_some() { "P" } else { "N" },
            self.db,
            multi,
            self.rbuf.len(),
            self.rbuf.capacity(),
            self.user.as_deref().unwrap_or("default"),
            self.proto,
            s(&self.lib_name),
            s(&self.lib_ver),
        )
    }
}

async fn next_stall(stall: &mut Option<Stall>) -> StallDone {
    match stall {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn next_push(p: &mut Option<PubSub>) -> Option<Result<Reply, BackendError>> {
    match p {
        Some(p) => p.rx.recv().await,
        None => std::future::pending().await,
    }
}

fn check_client_name(name: &[u8]) -> Result<(), Reply> {
    if name.iter().any(|b| *b <= b' ' || *b > b'~') {
        return Err(Reply::error(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok(())
}

/// Sends a command to `key`'s pool and follows cluster redirects (MOVED: update the slot
/// map and resend; ASK: ASKING + the command back to back on one connection).
fn send_routed(
    rt: Arc<EndpointRuntime>,
    key: PoolKey,
    slot: Option<u16>,
    raw: Bytes,
    replay_safe: bool,
    affinity: u64,
) -> BoxReply {
    Box::pin(async move {
        match send_following(&rt, key, slot, raw, replay_safe, affinity).await {
            Ok(r) => r,
            Err(e) => backend_error_reply(&e),
        }
    })
}

async fn send_following(
    rt: &Arc<EndpointRuntime>,
    mut key: PoolKey,
    slot: Option<u16>,
    raw: Bytes,
    replay_safe: bool,
    affinity: u64,
) -> Result<Reply, BackendError> {
    let timeout = rt.group.command_timeout;
    let mut ask = false;
    for _ in 0..5 {
        let conn: Arc<Conn> = rt.group.pool(key).shared(affinity);
        let fut = async {
            if ask {
                let rxs = conn.submit_batch(vec![
                    (Bytes::from_static(b"*1\r\n$6\r\nASKING\r\n"), true),
                    (raw.clone(), replay_safe),
                ]);
                match rxs {
                    Ok(mut rxs) => {
                        let cmd_rx = rxs.pop();
                        let _ =
                            recv(rxs.pop().ok_or(BackendError::Closed { addr: key.addr })).await;
                        recv(cmd_rx.ok_or(BackendError::Closed { addr: key.addr })).await
                    }
                    Err(e) => Err(e),
                }
            } else {
                recv(conn.submit(raw.clone(), replay_safe)).await
            }
        };
        let r = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    conn.expire(t);
                    Err(BackendError::Timeout {
                        addr: key.addr,
                        timeout_ms: t.as_millis() as u64,
                    })
                }
            },
            None => fut.await,
        };
        let reply = match r {
            Ok(r) => r,
            Err(e) => {
                if matches!(
                    e,
                    BackendError::Unavailable { .. } | BackendError::ConnectionLost { .. }
                ) {
                    rt.node_failed(key.addr);
                }
                return Err(e);
            }
        };
        if reply.is_error() {
            let text = reply.error_text();
            if rt.topology.is_cluster() {
                if let Some(redirect) = cluster::parse_redirect(text, key.addr) {
                    let (s, addr) = (redirect.slot(), redirect.addr());
                    rt.topology.redirected(s, addr, redirect.is_ask());
                    ask = redirect.is_ask();
                    key.addr = addr;
                    let _ = slot;
                    continue;
                }
            } else if text.starts_with(b"READONLY") {
                // The node we believe is the master was demoted: ask the sentinels again.
                rt.node_failed(key.addr);
            }
        }
        return Ok(reply);
    }
    Err(BackendError::Unavailable {
        addr: key.addr,
        reason: "too many cluster redirects".into(),
    })
}

/// A multi-key command whose keys span slots: one part per slot, merged back in key order.
fn split_and_merge(
    rt: Arc<EndpointRuntime>,
    parts: Vec<cluster::SubCommand>,
    db: u32,
    proto: u8,
    affinity: u64,
) -> BoxReply {
    Box::pin(async move {
        let kind = match parts
            .first()
            .and_then(|p| cluster::MultiKeyKind::from_name(&p.args[0]))
        {
            Some(k) => k,
            None => return Reply::error("ERR datamesh proxy: bad split"),
        };
        let futs = parts.iter().map(|p| {
            let rt = rt.clone();
            let raw = p.encode();
            let slot = p.slot;
            async move {
                let addr = match rt.topology.pick(Some(slot), kind.readonly()) {
                    Ok(a) => a,
                    Err(e) => return Err(Reply::error(&format!("ERR datamesh proxy: {e}"))),
                };
                send_following(
                    &rt,
                    PoolKey { addr, db, proto },
                    Some(slot),
                    raw,
                    kind.readonly(),
                    affinity,
                )
                .await
                .map_err(|e| backend_error_reply(&e))
            }
        });
        let results = futures::future::join_all(futs).await;
        let mut raws = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(reply) => raws.push(reply.raw),
                Err(e) => return e,
            }
        }
        match cluster::merge(kind, &parts, &raws) {
            Ok(raw) => {
                let kind = super::resp::ReplyKind::Other;
                Reply { raw, kind }
            }
            Err(e) => Reply::error(&format!("ERR datamesh proxy: {e}")),
        }
    })
}

/// A keyless command run on every master of a cluster backend, replies merged.
fn broadcast(
    rt: Arc<EndpointRuntime>,
    how: commands::Broadcast,
    cmd: Command,
    db: u32,
    proto: u8,
    affinity: u64,
) -> BoxReply {
    Box::pin(async move {
        let masters = rt.masters();
        if masters.is_empty() {
            return Reply::error("ERR datamesh proxy: no cluster master known yet");
        }
        let futs = masters.iter().map(|a| {
            let rt = rt.clone();
            let raw = cmd.raw.clone();
            let key = PoolKey {
                addr: *a,
                db,
                proto,
            };
            async move { send_following(&rt, key, None, raw, false, affinity).await }
        });
        let results = futures::future::join_all(futs).await;
        let mut replies = Vec::new();
        for r in results {
            match r {
                Ok(r) if r.is_error() => return r,
                Ok(r) => replies.push(r),
                Err(e) => return backend_error_reply(&e),
            }
        }
        use commands::Broadcast as B;
        match how {
            B::AllOk | B::First => replies.into_iter().next().unwrap_or_else(Reply::ok),
            B::Sum => Reply::integer_reply(replies.iter().filter_map(|r| r.integer()).sum()),
            B::Concat => {
                let mut items: Vec<Bytes> = Vec::new();
                for r in &replies {
                    if let Some(f) = super::resp::parse_reply(&r.raw) {
                        for it in super::resp::frame_items(&f).unwrap_or_default() {
                            if let Some(b) = super::resp::frame_bytes(it) {
                                items.push(Bytes::copy_from_slice(b));
                            }
                        }
                    }
                }
                Value::Array(items.into_iter().map(Value::Bulk).collect()).into_reply(proto)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secreT", b"secret"));
        assert!(!ct_eq(b"secret1", b"secret"));
        assert!(!ct_eq(b"", b"secret"));
    }

    #[test]
    fn auth_requirement() {
        use crate::config::{Secret, User};
        assert!(!auth_required(&[]));
        let u = |n: &str, p: Option<&str>| User {
            name: n.into(),
            password: p.map(|p| Secret(p.into())),
        };
        assert!(auth_required(&[u("default", Some("x"))]));
        assert!(!auth_required(&[u("default", None), u("app", Some("y"))]));
        assert!(auth_required(&[u("app", Some("y"))]));
    }

    #[test]
    fn client_names() {
        assert!(check_client_name(b"worker-1").is_ok());
        assert!(check_client_name(b"a b").is_err());
        assert!(check_client_name(b"a\nb").is_err());
    }
}
