//! One client connection, as three parts:
//! - this module: the I/O loop. Read what is there, decode every complete command into the
//!   inbox (a protocol error is an inbox value after the commands before it), dispatch, write
//!   the replies that are ready together in one write (never one per frame), repeat;
//! - [`state`]: the client's state (user, database, protocol, name, reply mode, transaction,
//!   subscription) and the answers that depend only on it;
//! - [`dispatch`]: command → action (a local answer, the shared lane, a dedicated connection,
//!   a barrier) by the command table's [`Kind`](crate::commands::Kind), through the one
//!   request path ([`crate::upstream::Router`]).
//!
//! Ordering: replies are queued in command order ([`FuturesOrdered`]) whatever node or
//! connection serves them. A client's commands on the shared lane of one (database,
//! protocol) go to one pooled connection per node (chosen by client id), which answers in
//! order. Switching lane (shared ↔ dedicated, or another database/protocol) waits until every
//! earlier reply is in, so a pipelined `SET k v; MULTI; GET k; EXEC` or `LPUSH q x; BLPOP q 0`
//! behaves as on Redis. While it waits, replies already in are still written.

mod dispatch;
pub mod pubsub;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tracing::debug;

use crate::accounting::PodStats;
use crate::attribution::{ConnEvent, Identity};
use crate::backend::{BackendError, Dedicated};
use crate::endpoint::EndpointHandle;
use crate::metrics::EndpointLabels;
use crate::request::ClientGate;
use crate::resp::{Command, CommandDecoder, Limits, ProtocolError, Reply};
use crate::shared::Shared;
use crate::upstream::{Call, SharedLane};
use state::{ClientState, PubSub};

/// What the decoder produced, in order.
pub(crate) enum Input {
    Command(Command),
    /// The bytes after the commands before it are not RESP: answer, then close.
    ProtocolError(ProtocolError),
}

/// A reply slot in the ordered queue; `silent` replies are dropped (CLIENT REPLY OFF/SKIP,
/// commands of a transaction that were answered already).
struct Pending {
    call: Call,
    silent: bool,
}

impl Future for Pending {
    type Output = (Reply, bool);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(Reply, bool)> {
        let silent = self.silent;
        self.call.poll_unpin(cx).map(|r| (r, silent))
    }
}

/// What a stalled dispatch is waiting for.
enum StallDone {
    /// A throttle delay is over: dispatch the front command (already admitted).
    Throttled,
    /// A dedicated connection for the front command (or an error to answer it with).
    Dedicated(Result<Dedicated, BackendError>),
    /// A failed AUTH's delay is over (its reply was due now): read and dispatch again.
    AuthDelay,
}

type Stall = Pin<Box<dyn Future<Output = StallDone> + Send>>;

/// A new subscription connection on its way (the old one died).
type Resubscribe = Pin<Box<dyn Future<Output = Result<Dedicated, BackendError>> + Send>>;

/// Which connection the previous backend commands went to (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Shared {
        db: u32,
        proto: u8,
    },
    /// One dedicated connection, by its connection id.
    Dedicated(u64),
}

pub struct Session {
    shared: Arc<Shared>,
    ep: Arc<EndpointHandle>,
    pod: Arc<PodStats>,
    /// Who the client is (for attribution events).
    who: Identity,
    commands_total: Counter,
    state: ClientState,
    // I/O
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: CommandDecoder,
    closing: bool,
    eof: bool,
    // Dispatch
    inbox: VecDeque<Input>,
    pending: FuturesOrdered<Pending>,
    stall: Option<Stall>,
    /// The front command passed the pod's rate limit already (it waited its delay).
    front_admitted: bool,
    /// A dedicated connection acquired for the front command.
    acquired: Option<Dedicated>,
    lane: Option<Lane>,
    upstream: SharedLane,
    /// Sequence number of the client's next command (its order for replay).
    seq: u64,
    /// When the commands in the inbox arrived: their rate-limit delay counts from then, so a
    /// pipelined burst over the limit is refused past `throttle_max_delay_ms`.
    arrival: tokio::time::Instant,
    /// Blocking commands whose reply is not in yet.
    blocking: Arc<AtomicUsize>,
    /// The client's share of the hold queue (see [`ClientGate`]); made at its first command
    /// for a backend (an idle client costs nothing for it).
    gate: Option<ClientGate>,
    resubscribe: Option<Resubscribe>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Whatever of this client is still held is never sent.
        if let Some(g) = &self.gate {
            g.set_gone();
        }
    }
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        ep: Arc<EndpointHandle>,
        who: &Identity,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Self {
        let id = shared.next_client_id();
        let settings = shared.settings();
        let pod = shared.pod_limits.get(who.pod);
        let commands_total = (*shared.metrics.commands.get_or_create(&EndpointLabels {
            endpoint: ep.name.clone(),
        }))
        .clone();
        // Cluster-aware clients are told the address they dialled (the captured original
        // destination), so they keep coming back through the capture.
        let advertised = who.orig_dst.unwrap_or(local);
        let state = ClientState::new(id, peer, local, advertised, &settings.users);
        Self {
            gate: None,
            resubscribe: None,
            shared,
            ep,
            pod,
            who: who.clone(),
            commands_total,
            state,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            decoder: CommandDecoder::default(),
            closing: false,
            eof: false,
            inbox: VecDeque::new(),
            pending: FuturesOrdered::new(),
            stall: None,
            front_admitted: false,
            acquired: None,
            lane: None,
            upstream: SharedLane::default(),
            seq: 0,
            arrival: tokio::time::Instant::now(),
            blocking: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn id(&self) -> u64 {
        self.state.id
    }

    fn limits(&self) -> Limits {
        let l = self.shared.settings().limits;
        if self.state.authenticated() {
            l
        } else {
            l.unauthenticated()
        }
    }

    /// Serves the client until it closes, QUITs or breaks the protocol.
    pub async fn run(&mut self, client: &mut TcpStream) {
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
                && self.inbox.is_empty()
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
                && self.inbox.is_empty()
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
            let has_pubsub = self.state.pubsub.is_some() && self.resubscribe.is_none();
            let has_resubscribe = self.resubscribe.is_some();
            tokio::select! {
                biased;
                Some((reply, silent)) = self.pending.next(), if !self.pending.is_empty() => {
                    if !silent {
                        self.wbuf.extend_from_slice(&reply.raw);
                    }
                    self.gather_ready();
                }
                done = next_stall(&mut self.stall), if has_stall => {
                    self.stall = None;
                    self.stall_done(done);
                }
                msg = next_push(&mut self.state.pubsub), if has_pubsub => self.on_push(msg),
                d = next_resubscribe(&mut self.resubscribe), if has_resubscribe => {
                    self.resubscribe = None;
                    self.resubscribed(d);
                }
                r = client.writable(), if !self.wbuf.is_empty() => {
                    if r.is_err() {
                        return;
                    }
                }
                r = client.readable(), if can_read => {
                    if r.is_err() || !self.read(client) {
                        return;
                    }
                }
            }
        }
    }

    /// True while a blocking command waits, or the client is subscribed: nothing more will
    /// come for a client that has gone away.
    fn blocked_on_dedicated(&self) -> bool {
        self.blocking.load(std::sync::atomic::Ordering::Relaxed) > 0 || self.state.pubsub.is_some()
    }

    /// Appends every reply that is already in (one write for all of them).
    fn gather_ready(&mut self) {
        while let Some(Some((r, silent))) = self.pending.next().now_or_never() {
            if !silent {
                self.wbuf.extend_from_slice(&r.raw);
            }
        }
    }

    /// A frame from the subscription connection (or its end).
    fn on_push(&mut self, msg: Option<Result<Reply, BackendError>>) {
        let mut next = msg;
        loop {
            match next {
                Some(Ok(r)) => {
                    let proto = self.state.proto;
                    let Some(p) = self.state.pubsub.as_mut() else {
                        return;
                    };
                    if p.subs.received(&r.raw) {
                        self.wbuf.extend_from_slice(&r.raw);
                    }
                    if let Some(owed) = p.subs.finish_resync(proto) {
                        for r in owed {
                            self.wbuf.extend_from_slice(&r.raw);
                        }
                    }
                }
                Some(Err(e)) => return self.subscription_lost(e),
                None => {
                    self.state.pubsub = None;
                    self.closing = true;
                    return;
                }
            }
            // Everything else already there, in one write.
            next = match self.state.pubsub.as_mut().map(|p| p.rx.try_recv()) {
                Some(Ok(m)) => Some(m),
                _ => return,
            };
        }
    }

    /// The subscription connection died: take another one (waiting, within the hold bound,
    /// for a usable node) and restore the subscriptions there; the client keeps its
    /// connection. With holding off, or when the client is gone, the client gets the error
    /// and is closed.
    fn subscription_lost(&mut self, e: BackendError) {
        let rt = self.ep.current();
        let hold = !rt.router.holder.settings().hold.is_zero();
        let Some(p) = self.state.pubsub.as_mut() else {
            return;
        };
        if !hold || self.eof {
            let r = crate::upstream::replay::error_reply(&e, false);
            self.wbuf.extend_from_slice(&r.raw);
            self.state.pubsub = None;
            self.closing = true;
            return;
        }
        debug!(id = self.state.id, error = %e, subscriptions = p.subs.len(), "subscription connection lost: restoring it");
        p.lost_at.get_or_insert_with(tokio::time::Instant::now);
        let f = rt.router.dedicated(p.target);
        self.resubscribe = Some(Box::pin(f));
    }

    /// A new subscription connection (or why there is none): the subscriptions are sent
    /// again, and the resync begins (see [`pubsub`]).
    fn resubscribed(&mut self, d: Result<Dedicated, BackendError>) {
        let rt = self.ep.current();
        let mut d = match d {
            Ok(d) => d,
            Err(e) => {
                // No node within the hold bound: the subscriptions cannot be restored.
                let r = crate::upstream::replay::error_reply(&e, true);
                self.wbuf.extend_from_slice(&r.raw);
                self.state.pubsub = None;
                self.closing = true;
                return;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        d.conn.set_push_sink(tx);
        d.clean = false;
        self.lane = Some(Lane::Dedicated(d.conn.id));
        let Some(p) = self.state.pubsub.as_mut() else {
            return;
        };
        p.node = d.node();
        p.rx = rx;
        let gap = p.lost_at.take().map(|t| t.elapsed()).unwrap_or_default();
        let cmds = p.subs.resubscribe();
        let mut failed = None;
        for raw in cmds {
            let req = self.request(raw, crate::request::ReplayClass::PubSub);
            if let Err(e) = rt.router.send_untracked(&d, req) {
                failed = Some(e);
                break;
            }
        }
        let Some(p) = self.state.pubsub.as_mut() else {
            return;
        };
        p.conn = d;
        rt.group().metrics.resubscribes.inc();
        rt.group()
            .metrics
            .resubscribe_gap_ms
            .inc_by(gap.as_millis() as u64);
        tracing::info!(id = self.state.id, endpoint = %self.ep.name, node = %p.node, subscriptions = p.subs.len(), gap_ms = gap.as_millis() as u64, "subscriptions restored on a new connection (messages published in the gap are lost)");
        if let Some(owed) = p.subs.finish_resync(self.state.proto) {
            for r in owed {
                self.wbuf.extend_from_slice(&r.raw);
            }
        }
        if let Some(e) = failed {
            // The new connection died at once: its end is on the push channel already.
            debug!(id = self.state.id, error = %e, "the new subscription connection failed");
        }
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
                // A client that closed its connection: its held commands are never sent (it
                // may retry them elsewhere; sending them later could run them twice).
                if let Some(g) = &self.gate {
                    g.set_gone();
                }
            }
            Some(Ok(_)) => {}
            None => return true,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Some(Err(_)) => return false,
        }
        let limits = self.limits();
        loop {
            match self.decoder.decode(&mut self.rbuf, &limits) {
                Ok(Some(cmd)) => self.inbox.push_back(Input::Command(cmd)),
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(e);
                    break;
                }
            }
        }
        if self.eof && !self.rbuf.is_empty() {
            debug!(
                id = self.state.id,
                bytes = self.rbuf.len(),
                "client closed mid-command"
            );
        }
        true
    }

    /// The input is not RESP: the commands before it are answered first, then the error,
    /// then the connection closes.
    fn protocol_error(&mut self, e: ProtocolError) {
        debug!(id = self.state.id, error = %e, "protocol error: closing the client");
        self.shared.metrics.count_error(&self.ep.name, "protocol");
        self.shared
            .attribution
            .event(&self.who, ConnEvent::ProtocolError);
        self.inbox.push_back(Input::ProtocolError(e));
        self.rbuf.clear();
        self.closing = true;
    }

    /// The client's gate (made now if this is its first command for a backend).
    fn gate(&mut self) -> ClientGate {
        self.gate
            .get_or_insert_with(|| {
                let pod = self.pod.name();
                ClientGate::new(self.shared.metrics.unknown_outcomes(&self.ep.name, &pod))
            })
            .clone()
    }

    fn push(&mut self, call: Call) {
        let silent = self.state.reply_silenced();
        self.pending.push_back(Pending { call, silent });
    }

    fn push_reply(&mut self, r: Reply) {
        self.push(Call::ready(r));
    }

    fn push_silent(&mut self, call: Call) {
        self.pending.push_back(Pending { call, silent: true });
    }

    /// In pub/sub mode replies do not go through the ordered queue.
    fn write_now(&mut self, r: Reply) {
        self.wbuf.extend_from_slice(&r.raw);
    }
}

async fn next_stall(stall: &mut Option<Stall>) -> StallDone {
    match stall {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn next_resubscribe(r: &mut Option<Resubscribe>) -> Result<Dedicated, BackendError> {
    match r {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn next_push(p: &mut Option<Box<PubSub>>) -> Option<Result<Reply, BackendError>> {
    match p {
        Some(p) => p.rx.recv().await,
        None => std::future::pending().await,
    }
}
