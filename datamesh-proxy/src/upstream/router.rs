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
//!    - a reply that proves the command did not run is resent, at most [`MAX_ATTEMPTS`]
//!      times: `MOVED` (slot map updated, resent to the new owner), `ASK` (`ASKING` and the
//!      command back to back on one connection), `TRYAGAIN`/`CLUSTERDOWN`/`LOADING`/
//!      `MASTERDOWN` (resent after a wait doubling from 20 ms), `READONLY` from a node believed to
//!      be master (the topology re-polls; resent to the new master once it changes);
//!    - any other reply goes to the client as it is;
//!    - an unanswered command (connection lost, refused, timed out) reports its node to the
//!      topology and is decided by [`super::replay`] from its replay class.
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

use super::replay::{self, Outcome, ReplayClass, Request, Unanswered};
use crate::backend::conn::Submission;
use crate::backend::{BackendError, BackendGroup, Conn, Dedicated, PoolKey};
use crate::resp::Reply;
use crate::topology::cluster::{parse_redirect, Redirect};
use crate::topology::{Topology, TopologyError, TopologyKind};

/// Most times one command is resent (redirects and retryable errors together).
pub const MAX_ATTEMPTS: u8 = 5;
/// First wait before resending after TRYAGAIN/CLUSTERDOWN/LOADING/MASTERDOWN; doubles per
/// attempt (20, 40, 80, 160, 320 ms: about 0.6 s in all).
const RETRY_BASE: Duration = Duration::from_millis(20);
/// How long a command answered READONLY waits for the topology to name another master.
const REROUTE_WAIT: Duration = Duration::from_secs(1);

/// An error reply in the proxy's voice.
pub fn proxy_error(text: impl std::fmt::Display) -> Reply {
    Reply::error(&format!("ERR datamesh proxy: {text}"))
}

/// What a backend error reply says about the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Redirect(Redirect),
    /// TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN: not run, try again shortly.
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
            b"TRYAGAIN" | b"LOADING" => Some(Signal::Later { report: false }),
            b"CLUSTERDOWN" | b"MASTERDOWN" => Some(Signal::Later { report: true }),
            b"READONLY" => Some(Signal::Demoted),
            _ => None,
        }
    }
}

/// Where a command goes, as far as the session knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The cluster slot of its keys (None: keyless, or not a cluster).
    pub slot: Option<u16>,
    /// Read-only commands may go to replicas where configured.
    pub readonly: bool,
    pub db: u32,
    pub proto: u8,
}

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
    attempt: u8,
}

enum Wait {
    Now,
    After(Duration),
    /// Wait for the topology to name another node for the command, then resend there.
    Reroute,
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
        node: SocketAddr,
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
                CallState::Pinned { rx, router, node } => {
                    let outcome = match rx.poll_unpin(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    let reply = match outcome {
                        Ok(o) => router.finish_pinned(*node, o),
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

/// One endpoint's request path: its topology and its pools.
pub struct Router {
    pub topology: Arc<dyn Topology>,
    pub group: Arc<BackendGroup>,
}

impl Router {
    pub fn new(topology: Arc<dyn Topology>, group: Arc<BackendGroup>) -> Self {
        Self { topology, group }
    }

    pub fn is_cluster(&self) -> bool {
        self.topology.is_cluster()
    }

    /// The node for `target` now.
    pub fn pick(&self, target: Target) -> Result<SocketAddr, TopologyError> {
        self.topology.pick(target.slot, target.readonly)
    }

    fn key(&self, node: SocketAddr, target: Target) -> PoolKey {
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
        request: Request,
        affinity: u64,
    ) -> Call {
        let node = match node.map(Ok).unwrap_or_else(|| self.pick(target)) {
            Ok(n) => n,
            Err(e) => return Call::ready(proxy_error(e)),
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
                },
            },
        })
    }

    /// An exclusive connection to `node` (warm if one is idle). A refused connect reports the
    /// node to the topology.
    pub fn dedicated(
        self: &Arc<Self>,
        node: SocketAddr,
        target: Target,
    ) -> impl Future<Output = Result<Dedicated, BackendError>> + Send + 'static {
        let pool = self.group.pool(self.key(node, target));
        let router = self.clone();
        async move {
            let r = pool.dedicated().await;
            if let Err(e) = &r {
                if e.node_failure() {
                    router.topology.node_failed(e.addr());
                }
            }
            r
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
            node: d.node(),
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
    fn finish_pinned(&self, node: SocketAddr, outcome: Outcome) -> Reply {
        match outcome {
            Outcome::Replied { reply, .. } => {
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
            Signal::Later { report: false } => {}
        }
    }

    /// A command no reply will come for: its node is reported when it looks broken, and the
    /// client gets the answer its replay class allows.
    fn unanswered(&self, u: &Unanswered) -> Reply {
        if u.error.node_failure() {
            self.topology.node_failed(u.addr);
        }
        replay::failure_reply(u)
    }

    /// The one decision: what becomes of a command given its outcome (see the module docs).
    fn resolve(&self, ctx: &mut Step, outcome: Outcome) -> Resolved {
        let (reply, request) = match outcome {
            Outcome::Replied { reply, request } => (reply, request),
            Outcome::Unanswered(u) => return Resolved::Done(self.unanswered(&u)),
        };
        let node = ctx.node;
        let Some(signal) = self.signal(&reply, node) else {
            return Resolved::Done(reply);
        };
        if ctx.attempt >= MAX_ATTEMPTS
            || (signal == Signal::Demoted && self.topology.kind() == TopologyKind::Standalone)
        {
            // Out of attempts, or nobody will name another node: the reply as it is.
            return Resolved::Done(reply);
        }
        self.report(node, signal);
        ctx.attempt += 1;
        let (wait, asking) = match signal {
            Signal::Redirect(r) => {
                ctx.node = r.addr();
                (Wait::Now, r.is_ask())
            }
            Signal::Later { .. } => (
                Wait::After(RETRY_BASE * (1u32 << (ctx.attempt - 1).min(5))),
                false,
            ),
            Signal::Demoted => (Wait::Reroute, false),
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
            match retry.wait {
                Wait::Now => {}
                Wait::After(d) => tokio::time::sleep(d).await,
                Wait::Reroute => {
                    let old = ctx.step.node;
                    let mut changes = self.topology.changes();
                    let mut node = self.pick(ctx.step.target);
                    let deadline = tokio::time::Instant::now() + REROUTE_WAIT;
                    while node.as_ref().is_ok_and(|n| *n == old) {
                        match tokio::time::timeout_at(deadline, changes.changed()).await {
                            Ok(Ok(())) => node = self.pick(ctx.step.target),
                            _ => break,
                        }
                    }
                    match node {
                        Ok(n) if n != old => ctx.step.node = n,
                        // No other node named in time: the client gets the reply it got.
                        Ok(_) => return retry.reply,
                        Err(e) => return proxy_error(e),
                    }
                }
            }
            let key = self.key(ctx.step.node, ctx.step.target);
            let conn = self.group.pool(key).shared(ctx.step.affinity);
            let outcome = if retry.asking {
                submit_asking(&conn, retry.request).await
            } else {
                conn.submit(retry.request, true).await
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
        request: Request,
        affinity: u64,
    ) -> Call {
        let node = match router.pick(target) {
            Ok(n) => n,
            Err(e) => return Call::ready(proxy_error(e)),
        };
        let key = router.key(node, target);
        let conn = self.conn(router, key, affinity);
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
