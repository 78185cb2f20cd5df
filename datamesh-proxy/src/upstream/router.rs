//! The one request path. Every command that goes to a backend, on a shared pooled connection
//! or a client's dedicated one, for a standalone, Sentinel or Cluster backend, is sent and
//! finished here:
//!
//! 1. choose the node ([`Topology::pick`] with the slot and read-only-ness);
//! 2. submit it to that connection's in-flight queue ([`SharedLane`] batches one dispatch
//!    round of a session into one submission: one lock, one listing for the flusher);
//! 3. the per-command deadline is the connection's (`command_timeout_ms`, checked by its
//!    reader on a coarse tick, see [`crate::backend::conn`]);
//! 4. finish it from its [`Outcome`] ([`Router::resolve`], the one decision function):
//!    - a redirect is followed at once, at most [`MAX_ATTEMPTS`] times: `MOVED` (slot map
//!      updated, resent to the new owner), `ASK` (`ASKING` and the command back to back on one
//!      connection);
//!    - another reply that proves the command did not run goes to the hold queue
//!      ([`super::hold`]) and is resent from there: `LOADING`/`MASTERDOWN` (the node is held
//!      back until its health check answers PONG), `TRYAGAIN`/`CLUSTERDOWN`/`NOAUTH` (after a
//!      wait doubling from 20 ms), `READONLY` from a node believed to be master (once the
//!      topology names another);
//!    - any other reply goes to the client as it is;
//!    - an unanswered command is decided by [`super::replay`] from its replay class (a shared
//!      connection hands replayable ones to the hold queue itself, see [`super::hold`]).
//!
//! A command for which no usable node exists at dispatch (no master known, the node down or
//! loading) or whose client has held commands goes to the hold queue instead of a connection.
//!
//! The common case costs one oneshot and one `Arc` clone: [`Call`] polls the reply inline and
//! only boxes a future when a command must be resent. On a dedicated connection nothing is
//! resent (a transaction or a blocking command cannot move), but redirects and failures are
//! still reported to the topology.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::oneshot;

use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::hold::{self, Held, HeldFor, HoldSettings, Holder, UNSPECIFIED};
use super::replay::{self, Outcome, ReplayClass, Request, Unanswered};
use crate::backend::conn::Submission;
use crate::backend::{BackendError, BackendGroup, Conn, Dedicated, PoolKey};
use crate::request::Route;
use crate::resp::Reply;
use crate::topology::cluster::{parse_redirect, Redirect};
use crate::topology::{Topology, TopologyKind};

/// Most times one command is resent (redirects and retryable errors together).
pub const MAX_ATTEMPTS: u8 = 5;
/// First wait before resending after TRYAGAIN/CLUSTERDOWN/NOAUTH; doubles per attempt up to
/// [`RETRY_MAX`], within the hold bound.
const RETRY_BASE: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(320);

/// An error reply in the proxy's voice.
pub fn proxy_error(text: impl std::fmt::Display) -> Reply {
    Reply::error(&format!("ERR datamesh proxy: {text}"))
}

/// What a backend error reply says about the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Redirect(Redirect),
    /// LOADING, MASTERDOWN (the word): the node is not ready; held until it answers PING.
    NotReady(&'static str),
    /// TRYAGAIN, CLUSTERDOWN, NOAUTH: not run, try again shortly.
    Later {
        report: bool,
    },
    /// READONLY: the node is no longer a master.
    Demoted,
}

impl Signal {
    /// Looks at the first word only: ordinary errors cost one comparison.
    fn of(text: &[u8], node: SocketAddr, cluster: bool) -> Option<Signal> {
        let word = text.split(|b| *b == b' ').next().unwrap_or(b"");
        match word {
            b"MOVED" | b"ASK" if cluster => parse_redirect(text, node).map(Signal::Redirect),
            b"LOADING" => Some(Signal::NotReady("LOADING")),
            b"MASTERDOWN" => Some(Signal::NotReady("MASTERDOWN")),
            b"TRYAGAIN" => Some(Signal::Later { report: false }),
            b"CLUSTERDOWN" | b"NOAUTH" => Some(Signal::Later { report: true }),
            b"READONLY" => Some(Signal::Demoted),
            _ => None,
        }
    }
}

pub use crate::request::Target;

/// What a call needs to be resent.
struct CallCtx {
    router: Arc<Router>,
    step: Step,
}

/// Where a call stands: the node it went to, its target, its attempts.
struct Step {
    node: SocketAddr,
    target: Target,
    affinity: u64,
    /// Redirects followed.
    attempt: u8,
    /// Resends through the hold queue (for the backoff).
    held: u8,
    /// When it first waited in the hold queue (the bound is for the whole command).
    first_held: Option<Instant>,
}

enum Wait {
    /// Resend to `Step::node` now (a redirect).
    Now,
    /// Through the hold queue: not before `not_before`, not to `avoid`.
    Hold {
        not_before: Option<Instant>,
        avoid: Option<SocketAddr>,
    },
}

struct Retry {
    request: Request,
    reply: Reply,
    wait: Wait,
    asking: bool,
}

enum Resolved {
    Done(Reply),
    Retry(Retry),
}

/// The reply to one command, in flight. Polls the connection's answer inline; boxes a future
/// only to resend.
pub struct Call(CallState);

enum CallState {
    Ready(Option<Reply>),
    Shared {
        rx: oneshot::Receiver<Outcome>,
        /// Inline: the future lives in the ordered queue's own allocation anyway.
        ctx: CallCtx,
    },
    Pinned {
        rx: oneshot::Receiver<Outcome>,
        router: Arc<Router>,
    },
    Boxed(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

impl Call {
    /// A reply known now (local answers, refusals).
    pub fn ready(r: Reply) -> Self {
        Call(CallState::Ready(Some(r)))
    }

    /// Any future producing the reply (split and merge, broadcasts, dedicated hand-backs).
    pub fn boxed(f: impl Future<Output = Reply> + Send + 'static) -> Self {
        Call(CallState::Boxed(Box::pin(f)))
    }
}

fn closed_reply() -> Reply {
    proxy_error("the backend connection was closed before the reply")
}

impl Future for Call {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        loop {
            match &mut self.0 {
                CallState::Ready(r) => {
                    return Poll::Ready(
                        r.take()
                            .unwrap_or_else(|| proxy_error("reply polled twice")),
                    )
                }
                CallState::Boxed(f) => return f.as_mut().poll(cx),
                CallState::Pinned { rx, router } => {
                    let outcome = match rx.poll_unpin(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    let reply = match outcome {
                        Ok(o) => router.finish_pinned(o),
                        Err(_) => closed_reply(),
                    };
                    return Poll::Ready(reply);
                }
                CallState::Shared { rx, ctx } => {
                    let outcome = match rx.poll_unpin(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(o)) => o,
                        Poll::Ready(Err(_)) => return Poll::Ready(closed_reply()),
                    };
                    match ctx.router.resolve(&mut ctx.step, outcome) {
                        Resolved::Done(r) => return Poll::Ready(r),
                        Resolved::Retry(retry) => {
                            let CallState::Shared { ctx, .. } =
                                std::mem::replace(&mut self.0, CallState::Ready(None))
                            else {
                                return Poll::Ready(proxy_error("call state lost"));
                            };
                            let router = ctx.router.clone();
                            self.0 = CallState::Boxed(Box::pin(router.resend(ctx, retry)));
                        }
                    }
                }
            }
        }
    }
}

/// One endpoint's request path: its topology, its pools and its hold queue.
pub struct Router {
    pub topology: Arc<dyn Topology>,
    pub group: Arc<BackendGroup>,
    pub holder: Arc<Holder>,
    /// Drains the hold queue; stops with the router.
    _drain: AbortOnDropHandle<()>,
}

impl Router {
    /// The router of `topology` and `group`, holding commands within `hold` (must run inside
    /// tokio: the hold queue's task starts here).
    pub fn new(
        topology: Arc<dyn Topology>,
        group: Arc<BackendGroup>,
        hold: HoldSettings,
    ) -> Arc<Self> {
        let holder = Arc::new(Holder::new(
            group.endpoint.clone(),
            hold,
            group.metrics.clone(),
        ));
        group.set_returns(holder.clone());
        Arc::new_cyclic(|me| {
            let me: std::sync::Weak<Router> = me.clone();
            let drain = tokio::spawn(hold::run(me, holder.clone()));
            Self {
                topology,
                group,
                holder,
                _drain: AbortOnDropHandle::new(drain),
            }
        })
    }

    pub fn is_cluster(&self) -> bool {
        self.topology.is_cluster()
    }

    /// The node for `target` now.
    pub fn pick(&self, target: Target) -> Result<SocketAddr, crate::topology::TopologyError> {
        self.topology.pick(target.slot, target.readonly)
    }

    /// The node for `target` if commands may go to it now (`pinned`: that node; `avoid`: not
    /// that one), else why not and the node to report to the topology. A read for a replica
    /// that is down goes to the master instead.
    pub(crate) fn usable_node(
        &self,
        target: Target,
        pinned: Option<SocketAddr>,
        avoid: Option<SocketAddr>,
    ) -> Result<SocketAddr, (String, Option<SocketAddr>)> {
        let node = match pinned.map(Ok).unwrap_or_else(|| self.pick(target)) {
            Ok(n) => n,
            Err(e) => return Err((e.to_string(), None)),
        };
        if Some(node) == avoid {
            return Err((
                format!("{node} answered READONLY and the topology names no other master yet"),
                Some(node),
            ));
        }
        let health = &self.group.health;
        if health.usable(node) || self.holder.settings().hold.is_zero() {
            // Holding off: the connection's own error tells the client.
            return Ok(node);
        }
        if target.readonly && pinned.is_none() {
            if let Ok(master) = self.topology.pick(target.slot, false) {
                if master != node && health.usable(master) {
                    return Ok(master);
                }
            }
        }
        if self.is_cluster() && target.slot.is_none() && pinned.is_none() {
            // A keyless command (a subscription, a cluster-wide read) may go to any master.
            if let Some(m) = self
                .topology
                .masters()
                .into_iter()
                .find(|m| health.usable(*m))
            {
                return Ok(m);
            }
        }
        let why = match health.get(node) {
            Some(h) => {
                let info = h.info();
                format!(
                    "backend {node} is {} ({})",
                    info.status.as_str(),
                    info.cause.unwrap_or_default()
                )
            }
            None => format!("backend {node} is not usable"),
        };
        Err((why, Some(node)))
    }

    /// Holds `request` (its route set) for a usable node and returns the call that finishes
    /// it.
    fn hold_call(
        self: &Arc<Self>,
        request: Request,
        target: Target,
        cause: String,
        affinity: u64,
    ) -> Call {
        if self.holder.settings().hold.is_zero() {
            return Call::ready(proxy_error(cause));
        }
        let rx = self.holder.hold_request(request, target, cause);
        self.shared_call(rx, UNSPECIFIED, target, affinity)
    }

    pub(crate) fn key(&self, node: SocketAddr, target: Target) -> PoolKey {
        PoolKey {
            addr: node,
            db: target.db,
            proto: target.proto,
        }
    }

    /// Sends `request` on its own (not batched with the session's other commands): the parts
    /// of split commands and broadcasts. `node` overrides the topology's choice (broadcasts
    /// go to every master).
    pub fn call(
        self: &Arc<Self>,
        node: Option<SocketAddr>,
        target: Target,
        mut request: Request,
        affinity: u64,
    ) -> Call {
        request.route = Route {
            node,
            ..route_of(target)
        };
        if request.gate.as_ref().is_some_and(|g| g.held() > 0) {
            return self.hold_call(
                request,
                target,
                "an earlier command of this client is held".into(),
                affinity,
            );
        }
        let node = match self.usable_node(target, node, None) {
            Ok(n) => n,
            Err((cause, _)) => return self.hold_call(request, target, cause, affinity),
        };
        let conn = self.group.pool(self.key(node, target)).shared(affinity);
        let rx = conn.submit(request, true);
        self.shared_call(rx, node, target, affinity)
    }

    /// The call that finishes a command submitted to a shared connection of `node`.
    fn shared_call(
        self: &Arc<Self>,
        rx: oneshot::Receiver<Outcome>,
        node: SocketAddr,
        target: Target,
        affinity: u64,
    ) -> Call {
        Call(CallState::Shared {
            rx,
            ctx: CallCtx {
                router: self.clone(),
                step: Step {
                    node,
                    target,
                    affinity,
                    attempt: 0,
                    held: 0,
                    first_held: None,
                },
            },
        })
    }

    /// An exclusive connection to the node for `target` (warm if one is idle). While no
    /// usable node is named (no master, the node down), it waits up to the hold bound for one;
    /// a refused connect reports the node to the topology and waits again.
    pub fn dedicated(
        self: &Arc<Self>,
        target: Target,
    ) -> impl Future<Output = Result<Dedicated, BackendError>> + Send + 'static {
        let router = self.clone();
        async move {
            let hold = router.holder.settings().hold;
            let since = Instant::now();
            let mut topology = router.topology.changes();
            let mut health = router.group.health.changes();
            let mut last_report: Option<Instant> = None;
            loop {
                let cause = match router.usable_node(target, None, None) {
                    Ok(node) => {
                        let pool = router.group.pool(router.key(node, target));
                        match pool.dedicated().await {
                            Ok(d) => return Ok(d),
                            Err(e) if e.never_sent() && e.node_failure() => {
                                router.topology.node_failed(e.addr());
                                if hold.is_zero() {
                                    return Err(e);
                                }
                                (e.to_string(), None)
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Err((cause, node)) => (cause, node),
                };
                let held_ms = since.elapsed().as_millis() as u64;
                if since.elapsed() >= hold {
                    let (cause, node) = cause;
                    return Err(if hold.is_zero() {
                        BackendError::NotHeld {
                            addr: node.unwrap_or(UNSPECIFIED),
                            endpoint: router.group.endpoint.clone(),
                            cause,
                            why: "is off (failover_hold_ms: 0)".into(),
                        }
                    } else {
                        BackendError::HoldExpired {
                            addr: node.unwrap_or(UNSPECIFIED),
                            endpoint: router.group.endpoint.clone(),
                            held_ms,
                            cause,
                        }
                    });
                }
                if let Some(node) = cause.1 {
                    if last_report.is_none_or(|t| t.elapsed() >= hold::REPORT_EVERY) {
                        last_report = Some(Instant::now());
                        router.topology.node_failed(node);
                    }
                }
                let wait = (since + hold).min(Instant::now() + hold::REPORT_EVERY);
                tokio::select! {
                    _ = topology.changed() => {}
                    _ = health.changed() => {}
                    _ = tokio::time::sleep_until(wait) => {}
                }
            }
        }
    }

    /// Submits `request` on a client's dedicated connection now (so commands on it keep
    /// their order) and returns the call that finishes it. `timed`: the command timeout
    /// applies (not to blocking commands, which end on the client's own timeout).
    pub fn call_on(self: &Arc<Self>, d: &Dedicated, request: Request, timed: bool) -> Call {
        let rx = d.conn.submit(request, timed);
        Call(CallState::Pinned {
            rx,
            router: self.clone(),
        })
    }

    /// Queues `request` on a subscription connection: its frames go to the push sink.
    pub fn send_untracked(&self, d: &Dedicated, request: Request) -> Result<(), BackendError> {
        d.conn.send_untracked(request).inspect_err(|e| {
            if e.node_failure() {
                self.topology.node_failed(e.addr());
            }
        })
    }

    /// Finishes a command of a dedicated connection: replies as they are (redirects and
    /// demotions only reported, since a transaction or a blocking command cannot move),
    /// unanswered ones by their replay class.
    fn finish_pinned(&self, outcome: Outcome) -> Reply {
        match outcome {
            Outcome::Replied { reply, node, .. } => {
                if let Some(signal) = self.signal(&reply, node) {
                    self.report(node, signal);
                }
                reply
            }
            Outcome::Unanswered(u) => self.unanswered(&u),
        }
    }

    /// What an error reply from `node` says, if anything (ordinary replies cost one check).
    fn signal(&self, reply: &Reply, node: SocketAddr) -> Option<Signal> {
        if !reply.is_error() {
            return None;
        }
        Signal::of(reply.error_text(), node, self.is_cluster())
    }

    /// Tells the topology what a reply from `node` showed: a new slot owner, or a node to
    /// look at again (demoted, or its cluster or link down).
    fn report(&self, node: SocketAddr, signal: Signal) {
        match signal {
            Signal::Redirect(r) => self.topology.redirected(r.slot(), r.addr(), r.is_ask()),
            Signal::Demoted | Signal::Later { report: true } => self.topology.node_failed(node),
            Signal::NotReady(word) => {
                if let Some(h) = self.group.health.get(node) {
                    h.loading(word);
                }
            }
            Signal::Later { report: false } => {}
        }
    }

    /// A command no reply will come for: its node is reported when it looks broken, and the
    /// client gets the answer its replay class allows (an unknown outcome is counted for its
    /// endpoint and pod).
    fn unanswered(&self, u: &Unanswered) -> Reply {
        if u.error.node_failure() {
            self.topology.node_failed(u.addr);
        }
        if replay::may_have_run(u) {
            if let Some(g) = &u.request.gate {
                g.count_unknown_outcome();
            }
            tracing::debug!(endpoint = %self.group.endpoint, backend = %u.addr, client = u.request.order.client, error = %u.error, "unknown outcome: the command may have been executed");
        }
        replay::failure_reply(u)
    }

    /// The one decision: what becomes of a command given its outcome (see the module docs).
    fn resolve(&self, ctx: &mut Step, outcome: Outcome) -> Resolved {
        let (reply, request, node) = match outcome {
            Outcome::Replied {
                reply,
                request,
                node,
            } => (reply, request, node),
            Outcome::Unanswered(u) => return Resolved::Done(self.unanswered(&u)),
        };
        ctx.node = node;
        let Some(signal) = self.signal(&reply, node) else {
            return Resolved::Done(reply);
        };
        let redirect = matches!(signal, Signal::Redirect(_));
        if (redirect && ctx.attempt >= MAX_ATTEMPTS)
            || (signal == Signal::Demoted
                && self.topology.kind() == TopologyKind::Standalone
                && !self.topology.has_standby())
            || self.holder.settings().hold.is_zero() && !redirect
        {
            // Out of attempts, nobody will name another node, or no holding: the reply as
            // it is.
            return Resolved::Done(reply);
        }
        self.report(node, signal);
        let (wait, asking) = match signal {
            Signal::Redirect(r) => {
                ctx.attempt += 1;
                ctx.node = r.addr();
                (Wait::Now, r.is_ask())
            }
            // Not ready: the node is held back until its health check answers PONG, and the
            // command waits its backoff too (without health checks, that is all it waits).
            Signal::NotReady(_) | Signal::Later { .. } => {
                ctx.held = ctx.held.saturating_add(1);
                let backoff = (RETRY_BASE * (1u32 << (ctx.held - 1).min(5))).min(RETRY_MAX);
                (
                    Wait::Hold {
                        not_before: Some(Instant::now() + backoff),
                        avoid: None,
                    },
                    false,
                )
            }
            Signal::Demoted => (
                Wait::Hold {
                    not_before: None,
                    avoid: Some(node),
                },
                false,
            ),
        };
        self.group.metrics.resent.inc();
        Resolved::Retry(Retry {
            request,
            reply,
            wait,
            asking,
        })
    }

    /// Resends until the command is finished (the slow path of [`Call`]).
    async fn resend(self: Arc<Self>, mut ctx: CallCtx, mut retry: Retry) -> Reply {
        loop {
            let outcome = match retry.wait {
                Wait::Now => {
                    let key = self.key(ctx.step.node, ctx.step.target);
                    let conn = self.group.pool(key).shared(ctx.step.affinity);
                    if retry.asking {
                        submit_asking(&conn, retry.request).await
                    } else {
                        conn.submit(retry.request, true).await
                    }
                }
                Wait::Hold { not_before, avoid } => {
                    let since = *ctx.step.first_held.get_or_insert_with(Instant::now);
                    let (tx, rx) = oneshot::channel();
                    let held = Held {
                        request: retry.request,
                        reply: tx,
                        target: ctx.step.target,
                        since,
                        not_before,
                        avoid,
                        cause: format!(
                            "backend {} answered {}",
                            ctx.step.node,
                            String::from_utf8_lossy(retry.reply.error_text())
                        ),
                    };
                    if self.holder.hold(held, HeldFor::NotRun).is_err() {
                        // The queue is full: the client gets the reply it got.
                        return retry.reply;
                    }
                    rx.await
                }
            };
            let Ok(outcome) = outcome else {
                return closed_reply();
            };
            match self.resolve(&mut ctx.step, outcome) {
                Resolved::Done(r) => return r,
                Resolved::Retry(next) => retry = next,
            }
        }
    }
}

impl hold::Path for Router {
    fn usable_node(
        &self,
        target: Target,
        pinned: Option<SocketAddr>,
        avoid: Option<SocketAddr>,
    ) -> Result<SocketAddr, (String, Option<SocketAddr>)> {
        Router::usable_node(self, target, pinned, avoid)
    }

    fn submit(&self, node: SocketAddr, target: Target, client: u64, batch: &mut Vec<Submission>) {
        self.group
            .pool(self.key(node, target))
            .shared(client)
            .submit_batch(batch);
    }

    fn report(&self, node: SocketAddr) {
        self.topology.node_failed(node);
    }

    fn changes(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<u64>,
        tokio::sync::watch::Receiver<u64>,
    ) {
        (self.topology.changes(), self.group.health.changes())
    }
}

/// The route of a command for `target`.
fn route_of(target: Target) -> Route {
    Route {
        slot: target.slot,
        readonly: target.readonly,
        node: None,
    }
}

/// `ASKING` and the command back to back on one connection (nothing of another client comes
/// between them); the outcome is the command's.
async fn submit_asking(
    conn: &Arc<Conn>,
    request: Request,
) -> Result<Outcome, oneshot::error::RecvError> {
    let (atx, arx) = oneshot::channel();
    let (tx, rx) = oneshot::channel();
    let asking = Request {
        raw: Bytes::from_static(b"*1\r\n$6\r\nASKING\r\n"),
        class: ReplayClass::Stateful,
        order: request.order,
        route: request.route,
        gate: None,
    };
    let mut batch = vec![
        Submission {
            request: asking,
            reply: atx,
            timed: true,
        },
        Submission {
            request,
            reply: tx,
            timed: true,
        },
    ];
    conn.submit_batch(&mut batch);
    let _ = arx.await;
    rx.await
}

/// A session's shared lane: its commands of one dispatch round go to their pooled
/// connections in one submission per connection, and the connection it used last is cached
/// (one pool lookup per connection change, not per command).
#[derive(Default)]
pub struct SharedLane {
    outbox: Vec<Submission>,
    outbox_conn: Option<Arc<Conn>>,
    /// (router identity, pool key, connection).
    cache: Option<(usize, PoolKey, Arc<Conn>)>,
}

impl SharedLane {
    fn conn(&mut self, router: &Arc<Router>, key: PoolKey, affinity: u64) -> Arc<Conn> {
        let id = Arc::as_ptr(router) as *const () as usize;
        if let Some((rid, k, c)) = &self.cache {
            if *rid == id && *k == key && !c.failing_fast() {
                return c.clone();
            }
        }
        let c = router.group.pool(key).shared(affinity);
        self.cache = Some((id, key, c.clone()));
        c
    }

    /// Routes `request` and queues it for this round; [`SharedLane::flush`] submits.
    pub fn send(
        &mut self,
        router: &Arc<Router>,
        target: Target,
        mut request: Request,
        affinity: u64,
    ) -> Call {
        // The common case: no held command of this client, a node named and usable. Anything
        // else takes the router's own path (which holds), after what this round queued.
        let held = request.gate.as_ref().is_some_and(|g| g.held() > 0);
        let conn = match router.pick(target) {
            Ok(node) if !held => Some(self.conn(router, router.key(node, target), affinity)),
            _ => None,
        };
        let Some(conn) = conn.filter(|c| c.node().usable()) else {
            self.flush();
            return router.call(None, target, request, affinity);
        };
        request.route = route_of(target);
        if self
            .outbox_conn
            .as_ref()
            .is_some_and(|c| !Arc::ptr_eq(c, &conn))
        {
            self.flush();
        }
        let (tx, rx) = oneshot::channel();
        self.outbox.push(Submission {
            request,
            reply: tx,
            timed: true,
        });
        let node = conn.key.addr;
        self.outbox_conn = Some(conn);
        router.shared_call(rx, node, target, affinity)
    }

    /// Submits what this round queued (one lock, one listing for the flusher).
    pub fn flush(&mut self) {
        if let Some(conn) = self.outbox_conn.take() {
            conn.submit_batch(&mut self.outbox);
        }
        if self.outbox.capacity() > 64 {
            // A deep pipeline's batch: do not keep it for the life of the client.
            self.outbox = Vec::new();
        }
    }
}
