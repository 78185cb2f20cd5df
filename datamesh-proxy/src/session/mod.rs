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

mod admin;
mod dispatch;
mod drain;
mod keyrule;
mod out;
pub mod pubsub;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
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

use crate::accounting::{PodStats, Slot};
use crate::attacks::{Look, Tally};
use crate::attribution::{ConnEvent, Identity};
use crate::backend::{BackendError, Dedicated};
use crate::bigkeys::BigTag;
use crate::budget::{ClientMem, Closed};
use crate::clients::{ClientInfo, ClientView, Flags};
use crate::config::SessionSettings;
use crate::endpoint::EndpointHandle;
use crate::metrics::{EndpointLabels, PodEndpointLabels};
use crate::request::ClientGate;
use crate::resp::{Command, CommandDecoder, Limits, ProtocolError, Reply};
use crate::shared::Shared;
use crate::upstream::{Call, SharedLane};
use out::OutBuf;
use state::{ClientState, PubSub};

/// What the decoder produced, in order.
pub(crate) enum Input {
    Command(Command),
    /// The bytes after the commands before it are not RESP: answer, then close.
    ProtocolError(ProtocolError),
}

/// Decoded input waiting for dispatch, and its bytes (counted against the memory budget).
#[derive(Default)]
pub(crate) struct Inbox {
    q: VecDeque<Input>,
    bytes: u64,
}

impl Inbox {
    fn size(i: &Input) -> u64 {
        match i {
            Input::Command(c) => c.raw.len() as u64,
            Input::ProtocolError(_) => 0,
        }
    }

    pub(crate) fn push_back(&mut self, i: Input) {
        self.bytes += Self::size(&i);
        self.q.push_back(i);
    }

    pub(crate) fn pop_front(&mut self) -> Option<Input> {
        let i = self.q.pop_front()?;
        self.bytes -= Self::size(&i);
        Some(i)
    }

    pub(crate) fn front(&self) -> Option<&Input> {
        self.q.front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.q.clear();
        self.bytes = 0;
    }
}

/// A reply slot in the ordered queue; `silent` replies are dropped (CLIENT REPLY OFF/SKIP,
/// commands of a transaction that were answered already). When its reply is in, the
/// command's bytes leave the client's input count and the reply's join its output count
/// (also when it waits behind an earlier, slower reply).
struct Pending {
    call: Call,
    silent: bool,
    mem: Arc<ClientMem>,
    /// The bytes of its request(s) on their way to a backend.
    req_bytes: u64,
    /// Its command and key, for the big-reply check (forwarded keyed commands only).
    big: Option<BigTag>,
    /// Whether its reply is a lookup's, for the key-attack detection.
    look: Look,
}

impl Future for Pending {
    type Output = (Reply, bool, Option<BigTag>, Look);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let silent = self.silent;
        let r = std::task::ready!(self.call.poll_unpin(cx));
        let req = std::mem::take(&mut self.req_bytes);
        self.mem.sub_input(req);
        if !silent {
            self.mem.add_output(r.raw.len() as u64);
        }
        Poll::Ready((r, silent, self.big.take(), self.look))
    }
}

/// Commands a new client may have in flight before its first replies are in (one command is
/// always allowed). Reply sizes
/// are unknown when commands are sent: a client pipelining GETs of large values it never
/// reads would otherwise make the backend produce every reply at once (on shared
/// connections, in front of other clients' replies). The window grows by one per reply the
/// client keeps up with (doubling per round trip, like TCP's slow start) up to
/// `max_pipeline`, and falls back when its unwritten replies reach `client_output_limit_bytes`.
const INITIAL_WINDOW: usize = 8;

/// How often a client paused because the memory budget is reached looks again.
const BUDGET_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// What a stalled dispatch is waiting for.
enum StallDone {
    /// A throttle delay is over: dispatch the front command (already admitted).
    Throttled,
    /// A dedicated connection for the front command (or an error to answer it with).
    Dedicated(Result<Dedicated, BackendError>),
    /// A failed AUTH's delay is over (its reply was due now): read and dispatch again.
    AuthDelay,
    /// A key rule's throttle delay is over: dispatch the front command (already admitted).
    KeyThrottled,
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
    wbuf: OutBuf,
    decoder: CommandDecoder,
    closing: bool,
    eof: bool,
    /// A drain reached this session: it closes at its next command boundary
    /// ([`drain::drain_step`]); `drain_busy`: it was away from a boundary since.
    draining: bool,
    drain_busy: bool,
    /// TCP_CORK is on: the drain's last reply waits for its FIN ([`Session::run`]).
    corked: bool,
    /// This client's buffered bytes (see [`crate::budget`]); `counted` is what of the read
    /// buffer and the inbox it holds now.
    mem: Arc<ClientMem>,
    counted: u64,
    /// Bytes of requests made for the next pushed reply slot.
    next_req_bytes: u64,
    /// Whether the pub/sub output class is in force.
    pubsub_class: bool,
    /// Commands in flight at most now (see [`Session::may_dispatch`]).
    window: usize,
    /// The session settings as of `settings_gen` (refreshed when the shared generation moves,
    /// so a command costs no lock).
    settings: Arc<SessionSettings>,
    settings_gen: u64,
    /// The pod's connection slot, held while the session lives.
    _conn_slot: Option<Slot>,
    /// When the last command arrived, and when the first byte of an incomplete one did.
    last_command: tokio::time::Instant,
    partial_since: Option<tokio::time::Instant>,
    // Dispatch
    inbox: Inbox,
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
    /// The state flags others see (CLIENT LIST), as last published.
    view_flags: Flags,
    /// The ACL catalog slot of the last command the table knows (CLIENT LIST's `cmd`).
    last_slot: Option<u16>,
    /// Replies shorter than this are not big ([`crate::bigkeys::BigKeySettings::floor`]).
    big_floor: usize,
    /// The big-reply tag of the next reply slot (set by the forwarding path).
    next_big: Option<BigTag>,
    /// `bigkeys.refuse`: the front command's identity, for its reply's tag.
    next_recent: std::cell::Cell<Option<u64>>,
    /// Hot-key samples of this round (handed to the endpoint once per round).
    hot: crate::hotkeys::Sampler,
    /// The key rules of this endpoint (empty: none, the one test per command) as of
    /// `key_rules_gen`; `key_admitted`: the front command passed them (it waited its delay).
    key_rules: Vec<Arc<crate::keyrules::Rule>>,
    key_rules_gen: u64,
    key_admitted: bool,
    /// Key-attack detection: the lookup tag of the next reply slot (set by the forwarding
    /// path), this session's counts since the last round, and where they go (this pod on this
    /// endpoint).
    next_look: Look,
    tally: Tally,
    attacks: Arc<crate::attacks::Entry>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Whatever of this client is still held is never sent.
        if let Some(g) = &self.gate {
            g.set_gone();
        }
        self.mem.release();
        self.tally.flush(&self.attacks);
    }
}

impl Session {
    /// A session for an accepted connection; `conn_slot` is its pod's connection slot,
    /// given back when the session ends.
    pub fn new(
        shared: Arc<Shared>,
        ep: Arc<EndpointHandle>,
        who: &Identity,
        peer: SocketAddr,
        local: SocketAddr,
        pod: Arc<PodStats>,
        conn_slot: Option<Slot>,
    ) -> Self {
        let id = shared.next_client_id();
        let settings_gen = shared.settings_generation();
        let settings = shared.settings();
        let settings_floor = settings.bigkeys.floor();
        // Cluster-aware clients are told the address they dialled (the captured original
        // destination), so they keep coming back through the capture.
        let advertised = who.orig_dst.unwrap_or(local);
        let state = ClientState::new(id, peer, advertised, &settings.users);
        let blocking = Arc::new(AtomicUsize::new(0));
        let view = ClientView {
            user: state.user.clone(),
            resp: state.proto,
            ..ClientView::default()
        };
        let info = ClientInfo::new(
            (id, pod.cookie),
            Arc::as_ptr(&ep) as usize,
            peer,
            advertised,
            blocking.clone(),
            view,
        );
        let mem = shared
            .budget
            .register(id, pod.clone(), settings.output_normal, Some(info));
        // Accepted while a drain began (the accept loops stop first, so rarely): closed at
        // its first boundary too. Registered first, then the flag read: see
        // [`Shared::start_drain`].
        if shared.is_draining() {
            mem.request_drain();
        }
        let commands_total = (*shared.metrics.commands.get_or_create(&EndpointLabels {
            endpoint: ep.name.clone(),
        }))
        .clone();
        let now = tokio::time::Instant::now();
        let attacks = shared.attacks.entry(&ep.name, &pod);
        Self {
            mem,
            counted: 0,
            next_req_bytes: 0,
            pubsub_class: false,
            window: INITIAL_WINDOW,
            settings,
            settings_gen,
            _conn_slot: conn_slot,
            last_command: now,
            partial_since: None,
            gate: None,
            resubscribe: None,
            shared,
            ep,
            pod,
            who: who.clone(),
            commands_total,
            state,
            rbuf: BytesMut::new(),
            wbuf: OutBuf::default(),
            decoder: CommandDecoder::default(),
            closing: false,
            eof: false,
            draining: false,
            drain_busy: false,
            corked: false,
            inbox: Inbox::default(),
            pending: FuturesOrdered::new(),
            stall: None,
            front_admitted: false,
            acquired: None,
            lane: None,
            upstream: SharedLane::default(),
            seq: 0,
            arrival: now,
            blocking,
            view_flags: Flags::default(),
            last_slot: None,
            big_floor: settings_floor,
            next_big: None,
            next_recent: std::cell::Cell::new(None),
            hot: Default::default(),
            key_rules: Vec::new(),
            // Not a generation the rule set has: the first round takes the rules.
            key_rules_gen: u64::MAX,
            key_admitted: false,
            next_look: Look::None,
            tally: Tally::default(),
            attacks,
        }
    }

    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Whether a drain closed the connection (at a boundary or at its deadline).
    pub fn closed_by_drain(&self) -> bool {
        matches!(
            self.mem.closed(),
            Some(Closed::Drain | Closed::DrainDeadline)
        )
    }

    fn limits(&self) -> Limits {
        let l = self.settings.limits;
        if self.state.authenticated() {
            l
        } else {
            l.unauthenticated()
        }
    }

    /// Serves the client until it closes, QUITs, breaks the protocol or is closed by a limit.
    pub async fn run(&mut self, client: &mut TcpStream) {
        let settings = self.settings.clone();
        let lim = RunLimits {
            max_pipeline: settings.max_pipeline as usize,
            output_pause: settings.client_output_limit,
            query: settings.client_query_limit,
            idle: settings.idle_timeout,
            partial: settings.partial_timeout,
        };
        let (normal, pubsub) = (settings.output_normal, settings.output_pubsub);
        drop(settings);
        let budget = self.shared.budget.clone();
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut undecoded = false;
        loop {
            self.dispatch_ready();
            self.count_buffers();
            self.publish_flags();
            if self.pubsub_class != self.state.pubsub.is_some() {
                self.pubsub_class = !self.pubsub_class;
                self.mem
                    .set_output_limit(if self.pubsub_class { pubsub } else { normal });
            }
            if let Some(why) = self.mem.closed() {
                return self.end(client, why);
            }
            // Draining: closed at the command boundary, in the same turn as the write of the
            // reply that reached it. Corked, that reply and the FIN leave in one segment, so
            // the client has the close by the time it has the reply, before it can reuse the
            // connection (a FIN a moment later can cross its next command).
            let drain_close =
                self.draining && !self.closing && !self.eof && self.drain_close_now(undecoded);
            if drain_close != self.corked && (!drain_close || !self.wbuf.is_empty()) {
                self.corked = drain_close;
                if drain_close {
                    if let (Ok(peer), Ok(local)) = (client.peer_addr(), client.local_addr()) {
                        self.shared
                            .attribution
                            .event(&self.who, ConnEvent::Closing { peer, local });
                    }
                }
                let _ = socket2::SockRef::from(&*client).set_tcp_cork(drain_close);
            }
            if !self.wbuf.is_empty() && !self.flush(client) {
                return;
            }
            if drain_close && self.wbuf.is_empty() {
                return self.end(client, Closed::Drain);
            }
            let done_reading = self.closing || self.eof;
            // Bytes read while the client could not be served yet (read ahead) are still
            // decoded after its EOF: like Redis, commands received before an EOF run.
            let decodable = undecoded && !self.closing;
            if done_reading
                && !decodable
                && self.pending.is_empty()
                && self.inbox.is_empty()
                && self.stall.is_none()
                && self.wbuf.is_empty()
            {
                return;
            }
            if done_reading && self.blocked_on_dedicated() {
                // A client that went away or broke the protocol while blocked: drop it (the
                // dedicated connection closes, which cancels the blocking command on the
                // backend; nothing more will come for it).
                return;
            }
            // Commands are decoded while the client is within its limits; otherwise it is not
            // read further (TCP back-pressure) until its replies are written and its
            // commands answered, or the budget is back.
            let within = !self.closing
                && self.inbox.is_empty()
                && self.stall.is_none()
                && self.pending.len() < lim.max_pipeline
                && self.mem.output() < lim.output_pause
                && self.mem.input().saturating_sub(self.counted) < lim.query;
            let over_budget = within && budget.exhausted();
            let can_decode = within && !over_budget;
            if can_decode && undecoded {
                undecoded = false;
                self.decode_buffered();
                continue;
            }
            // While waiting on something that may never end (a blocking command, a
            // subscription, a dedicated connection, the close after a protocol error), the
            // socket is still read, so a client that goes away is noticed and its resources
            // released; its input is kept up to the query limit, like Redis does.
            let read_ahead =
                !self.eof && (self.closing || self.stall.is_some() || self.blocked_on_dedicated());
            let can_read = (can_decode || read_ahead) && !self.eof;
            if self.rbuf.is_empty()
                && !self.decoder.in_progress()
                && self.rbuf.capacity() > 0
                && self.pending.is_empty()
            {
                // Idle clients hold no buffers (10,000 idle clients must stay cheap).
                self.rbuf = BytesMut::new();
            }
            let deadline = self.deadline(&lim);
            if let Some(d) = deadline {
                match timer.as_mut() {
                    Some(t) if t.deadline() <= d => {}
                    Some(t) => t.as_mut().reset(d),
                    None => timer = Some(Box::pin(tokio::time::sleep_until(d))),
                }
            }
            let has_stall = self.stall.is_some();
            let has_pubsub = self.state.pubsub.is_some() && self.resubscribe.is_none();
            let has_resubscribe = self.resubscribe.is_some();
            let drain_seen = self.draining;
            tokio::select! {
                biased;
                why = std::future::poll_fn(|cx| self.mem.poll_closed_or_drain(cx, drain_seen)) => {
                    match why {
                        Some(why) => return self.end(client, why),
                        // A drain began: the next turn looks for the boundary.
                        None => self.draining = true,
                    }
                }
                Some((reply, silent, big, look)) = self.pending.next(), if !self.pending.is_empty() => {
                    if !silent {
                        self.wbuf.push(&reply.raw);
                    }
                    if look.is_some() {
                        self.tally.reply(look, &reply.raw);
                    }
                    if reply.raw.len() >= self.big_floor {
                        self.big_reply(&reply, big);
                    }
                    let n = 1 + self.gather_ready();
                    self.replies_taken(n);
                    if self.pending.is_empty() {
                        // Nothing in flight: the last replies' lookups count now, not at the
                        // client's next command.
                        self.tally.flush(&self.attacks);
                    }
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
                    if self.closing {
                        // After a protocol error the rest is not RESP: only an EOF matters.
                        self.rbuf.clear();
                    } else if can_decode {
                        self.decode_buffered();
                    } else {
                        undecoded = true;
                        if self.rbuf.len() as u64 > lim.query {
                            return self.end(client, Closed::QueryBuffer);
                        }
                    }
                }
                // Paused for the budget: looked at again shortly (the shedder frees it).
                _ = recheck_after(BUDGET_RECHECK), if over_budget => {}
                _ = next_timer(&mut timer), if deadline.is_some() => {
                    let now = tokio::time::Instant::now();
                    if let Some(p) = self.partial_since.filter(|_| !lim.partial.is_zero()) {
                        if now >= p + lim.partial {
                            return self.end(client, Closed::Partial);
                        }
                    }
                    if self.idle_applies() && !lim.idle.is_zero() && now >= self.last_command + lim.idle {
                        return self.end(client, Closed::Idle);
                    }
                    // Not due yet (the deadline moved): the next loop sets the timer again.
                    timer = None;
                }
            }
        }
    }

    /// The earliest of the idle and partial-command deadlines in force (and, draining at a
    /// boundary, the end of the quiet wait for a next command).
    fn deadline(&self, lim: &RunLimits) -> Option<tokio::time::Instant> {
        let partial = self
            .partial_since
            .filter(|_| !lim.partial.is_zero())
            .map(|p| p + lim.partial);
        let idle =
            (!lim.idle.is_zero() && self.idle_applies()).then(|| self.last_command + lim.idle);
        let d = match (partial, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.draining && !self.drain_busy {
            let quiet = self.last_command + drain::DRAIN_QUIET;
            return Some(d.map_or(quiet, |d| d.min(quiet)));
        }
        d
    }

    /// Draining: whether the connection is to be closed now (see [`drain::drain_step`]).
    fn drain_close_now(&mut self, undecoded: bool) -> bool {
        // Replies already in the write buffer are written before the close (in this turn).
        let owed = drain::Owed {
            replies: !self.pending.is_empty(),
            unanswered: !self.inbox.is_empty() || self.stall.is_some() || self.acquired.is_some(),
            unparsed: undecoded || !self.rbuf.is_empty() || self.decoder.in_progress(),
            transaction: !matches!(self.state.tx, state::Tx::None),
            subscribed: self.state.pubsub.is_some() || self.resubscribe.is_some(),
            blocked: self.blocking.load(std::sync::atomic::Ordering::Relaxed) > 0,
        };
        // A reply still being written when the drain reached it: closed right after it.
        let busy = self.drain_busy || !self.wbuf.is_empty();
        match drain::drain_step(&owed, busy, self.last_command.elapsed()) {
            drain::DrainStep::Close => true,
            drain::DrainStep::Busy => {
                self.drain_busy = true;
                false
            }
            // The timer of [`Session::deadline`] brings the session back then.
            drain::DrainStep::Quiet(_) => false,
        }
    }

    /// Like Redis's `timeout`: not for subscribers, blocked clients or clients waiting for
    /// replies.
    fn idle_applies(&self) -> bool {
        self.pending.is_empty()
            && self.stall.is_none()
            && self.state.pubsub.is_none()
            && !self.blocked_on_dedicated()
    }

    /// The read buffer and the inbox as counted against the memory budget.
    fn count_buffers(&mut self) {
        let now = self.rbuf.capacity() as u64 + self.inbox.bytes;
        if now > self.counted {
            self.mem.add_input(now - self.counted);
        } else if now < self.counted {
            self.mem.sub_input(self.counted - now);
        }
        self.counted = now;
    }

    /// Closes the client for `why`: its last line (when nothing else is waiting to be
    /// written, so it lands on a reply boundary), then the connection ends.
    fn end(&mut self, client: &TcpStream, why: Closed) {
        self.mem.close(why);
        // The first reason wins (a drain's deadline may have marked it meanwhile).
        let why = self.mem.closed().unwrap_or(why);
        self.shared.count_drain_close(why);
        if let Some(g) = &self.gate {
            g.set_closed_by_limit();
        }
        debug!(id = self.state.id, pod = %self.pod.name(), reason = why.as_str(), input = self.mem.input(), output = self.mem.output(), "closing the client");
        if self.wbuf.is_empty() && !why.message().is_empty() {
            let _ = client.try_write(why.message().as_bytes());
        }
        // The FIN now, not when the task is done: a `CLIENT KILL` waits for it.
        let _ = nix::sys::socket::shutdown(client.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        self.mem.ended();
    }

    /// Whether the next command may be dispatched: within the window, and the client's
    /// unwritten replies under the pause threshold (back-pressure: a client that does not
    /// read gets nothing more from the backends).
    fn may_dispatch(&self) -> bool {
        self.pending.is_empty()
            || (self.pending.len() < self.window
                && self.mem.output() < self.settings.client_output_limit
                // Near the budget, one command at a time: replies already on their way
                // must not push the proxy past it.
                && !self.shared.budget.tight())
    }

    /// `n` replies were taken from the ordered queue: the window grows while the client keeps
    /// up, and starts again small when it does not.
    fn replies_taken(&mut self, n: usize) {
        let (pause, max) = (
            self.settings.client_output_limit,
            self.settings.max_pipeline as usize,
        );
        if self.mem.output() >= pause {
            self.window = INITIAL_WINDOW;
        } else if self.window < max && self.mem.output() < pause / 2 {
            self.window = (self.window + n).min(max);
        }
    }

    /// Takes the shared settings again if they were swapped (a reload) since the last look.
    fn refresh_settings(&mut self) {
        let g = self.shared.settings_generation();
        if g != self.settings_gen {
            self.settings = self.shared.settings();
            self.settings_gen = g;
            self.big_floor = self.settings.bigkeys.floor();
        }
        self.refresh_key_rules();
    }

    /// True while a blocking command waits, or the client is subscribed: nothing more will
    /// come for a client that has gone away.
    fn blocked_on_dedicated(&self) -> bool {
        self.blocking.load(std::sync::atomic::Ordering::Relaxed) > 0 || self.state.pubsub.is_some()
    }

    /// Appends every reply that is already in (one write for all of them); returns how many.
    fn gather_ready(&mut self) -> usize {
        let mut n = 0;
        while let Some(Some((r, silent, big, look))) = self.pending.next().now_or_never() {
            if !silent {
                self.wbuf.push(&r.raw);
            }
            if look.is_some() {
                self.tally.reply(look, &r.raw);
            }
            if r.raw.len() >= self.big_floor {
                self.big_reply(&r, big);
            }
            n += 1;
        }
        n
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
                        self.wbuf.push(&r.raw);
                        self.mem.add_output(r.raw.len() as u64);
                    }
                    if let Some(owed) = p.subs.finish_resync(proto) {
                        for r in owed {
                            self.wbuf.push(&r.raw);
                            self.mem.add_output(r.raw.len() as u64);
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
                _ => break,
            };
        }
        self.leave_pubsub_if_done();
    }

    /// Once the client has unsubscribed from everything and every confirmation is in, it is no
    /// longer a subscriber (as on Redis): the subscription connection goes (with its
    /// dedicated slot) and the next commands are routed like any other's. Kept, the client
    /// would stay pinned to that one connection, and in a cluster to that one node (`MOVED`
    /// for every other slot).
    fn leave_pubsub_if_done(&mut self) {
        if self
            .state
            .pubsub
            .as_ref()
            .is_some_and(|p| p.lost_at.is_none() && p.subs.left())
        {
            debug!(
                id = self.state.id,
                "unsubscribed from everything: leaving subscriber mode"
            );
            self.state.pubsub = None;
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
            self.wbuf.push(&r.raw);
            self.mem.add_output(r.raw.len() as u64);
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
                self.wbuf.push(&r.raw);
                self.mem.add_output(r.raw.len() as u64);
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
        // Subscription commands are not answered through reply slots.
        self.next_req_bytes = 0;
        let Some(p) = self.state.pubsub.as_mut() else {
            return;
        };
        // The new connection takes the old one's place in the pod's count.
        d.slot = p.conn.slot.take();
        p.conn = d;
        rt.group().metrics.resubscribes.inc();
        rt.group()
            .metrics
            .resubscribe_gap_ms
            .inc_by(gap.as_millis() as u64);
        tracing::info!(id = self.state.id, endpoint = %self.ep.name, node = %p.node, subscriptions = p.subs.len(), gap_ms = gap.as_millis() as u64, "subscriptions restored on a new connection (messages published in the gap are lost)");
        if let Some(owed) = p.subs.finish_resync(self.state.proto) {
            for r in owed {
                self.wbuf.push(&r.raw);
                self.mem.add_output(r.raw.len() as u64);
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
            match self.wbuf.write_to(client) {
                Ok((0, _)) => return false,
                Ok((written, freed)) => {
                    // Unwritten bytes leave the output count as they go (Redis's measure for
                    // the limits); a big reply's written part stays held until it is freed.
                    self.mem.sub_output(written as u64);
                    if written > freed {
                        self.mem.held_bytes((written - freed) as u64, true);
                    } else {
                        self.mem.held_bytes((freed - written) as u64, false);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        self.wbuf.shrink_if_idle();
        true
    }

    /// Reads what is there into the read buffer. False on a read error.
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
        true
    }

    /// Decodes every complete command in the read buffer into the inbox.
    fn decode_buffered(&mut self) {
        let limits = self.limits();
        let before = self.inbox.bytes;
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
        if self.inbox.bytes != before || !self.inbox.is_empty() {
            self.last_command = self.arrival;
        }
        // A command begun and not complete: its deadline runs from its first byte.
        if self.rbuf.is_empty() && !self.decoder.in_progress() {
            self.partial_since = None;
        } else if self.partial_since.is_none() || self.inbox.bytes != before {
            self.partial_since = Some(self.arrival);
        }
        if self.eof && !self.rbuf.is_empty() {
            debug!(
                id = self.state.id,
                bytes = self.rbuf.len(),
                "client closed mid-command"
            );
        }
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
                ClientGate::with_mem(
                    self.shared.metrics.unknown_outcomes(&self.ep.name, &pod),
                    Some(self.mem.clone()),
                )
            })
            .clone()
    }

    fn push(&mut self, call: Call) {
        let silent = self.state.reply_silenced();
        self.push_slot(call, silent);
    }

    fn push_slot(&mut self, call: Call, silent: bool) {
        let req_bytes = std::mem::take(&mut self.next_req_bytes);
        self.mem.add_input(req_bytes);
        self.pending.push_back(Pending {
            call,
            silent,
            mem: self.mem.clone(),
            req_bytes,
            big: self.next_big.take(),
            look: std::mem::take(&mut self.next_look),
        });
    }

    /// A reply at least [`Self::big_floor`] long: counted per pod, and per key at `/bigkeys`,
    /// when it is over a threshold.
    fn big_reply(&self, r: &Reply, big: Option<BigTag>) {
        let Some(tag) = big else {
            return;
        };
        let s = &self.settings.bigkeys;
        let Some(elements) = s.big(&r.raw) else {
            return;
        };
        let pod = self.pod.name();
        self.shared
            .metrics
            .big_replies
            .get_or_create(&PodEndpointLabels {
                endpoint: self.ep.name.clone(),
                pod: pod.clone(),
            })
            .inc();
        let key = match &tag.key {
            Some(k) => s.key_display.show(k),
            None => crate::bigkeys::NO_KEY.to_string(),
        };
        self.shared.bigkeys.record(
            &self.ep.name,
            &key,
            tag.command,
            &pod,
            r.raw.len() as u64,
            elements,
        );
        if let Some(id) = tag.recent {
            self.shared.bigkeys.note_recent(
                id,
                r.raw.len() as u64,
                elements,
                tokio::time::Instant::now().into_std(),
            );
        }
    }

    fn push_reply(&mut self, r: Reply) {
        self.push(Call::ready(r));
    }

    fn push_silent(&mut self, call: Call) {
        self.push_slot(call, true);
    }

    /// In pub/sub mode replies do not go through the ordered queue.
    fn write_now(&mut self, r: Reply) {
        self.write_raw(&r.raw);
    }

    /// Bytes for the client outside the ordered queue (counted as its output).
    fn write_raw(&mut self, raw: &[u8]) {
        self.wbuf.extend_from_slice(raw);
        self.mem.add_output(raw.len() as u64);
    }
}

/// The limits [`Session::run`] reads once per connection.
struct RunLimits {
    max_pipeline: usize,
    output_pause: u64,
    query: u64,
    idle: std::time::Duration,
    partial: std::time::Duration,
}

/// A timer made only when its select branch is polled: a disabled branch's future is still
/// built on every loop, and a `Sleep` costs a clock read and a runtime handle clone. Boxed, so
/// the session's task (10,000 idle clients) does not carry a `Sleep` it almost never uses.
async fn recheck_after(d: std::time::Duration) {
    Box::pin(tokio::time::sleep(d)).await
}

async fn next_timer(t: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match t {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
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
