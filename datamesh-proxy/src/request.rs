//! A command on its way to a backend, as the in-flight queues, the hold queue and the router
//! see it: its bytes, its client's order, where it goes ([`Route`]), its client's
//! [`ClientGate`] and what resending it after its connection died could do ([`ReplayClass`],
//! from the command table). The replay decision itself is [`crate::upstream::replay`]'s.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;

use crate::budget::ClientMem;

/// What resending a command after its connection died could do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayClass {
    /// Never handed to a socket: the backend cannot have seen it.
    NeverWritten,
    /// Reads only: resending changes nothing.
    ReadOnly,
    /// Changes data: once written, the outcome is unknown.
    Write,
    /// Lives in connection state (MULTI/EXEC, WATCH, blocking pops, local state): cannot be
    /// moved to another connection.
    Stateful,
    /// A subscription command: the subscription set can be rebuilt, the messages cannot.
    PubSub,
    /// Queued inside MULTI (MULTI itself included, EXEC not): it runs only at EXEC, so when
    /// its connection is lost it has not run and the transaction is discarded; it cannot be
    /// sent anywhere else either (outside the transaction it would run alone).
    InTransaction,
}

impl ReplayClass {
    /// True when sending the command again elsewhere cannot apply it twice.
    pub fn replay_safe(self) -> bool {
        matches!(self, ReplayClass::NeverWritten | ReplayClass::ReadOnly)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplayClass::NeverWritten => "never_written",
            ReplayClass::ReadOnly => "read_only",
            ReplayClass::Write => "write",
            ReplayClass::Stateful => "stateful",
            ReplayClass::PubSub => "pubsub",
            ReplayClass::InTransaction => "in_transaction",
        }
    }
}

/// A client's position in its own command stream: replay must never let a later command of a
/// client overtake an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Order {
    /// The proxy-assigned client id (`CLIENT ID`).
    pub client: u64,
    /// The command's sequence number within that client's commands.
    pub seq: u64,
}

/// Where a command goes, beyond its pool's database and protocol: what a held or replayed
/// command needs to be routed again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Route {
    /// The cluster slot of its keys (None: keyless, or not a cluster).
    pub slot: Option<u16>,
    /// May go to a replica where the endpoint reads from replicas.
    pub readonly: bool,
    /// Must go to this node (a part of a command broadcast to every master).
    pub node: Option<std::net::SocketAddr>,
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

/// One client's share of the hold queue, shared by its session and its requests: how many of
/// its commands are held (while any is, its later commands queue behind them, so none
/// overtakes an earlier one), their bytes (bounded per client), whether the client has gone
/// (its held commands are then dropped, never sent), and its unknown-outcome counter (per
/// endpoint and pod).
#[derive(Clone)]
pub struct ClientGate(Arc<GateInner>);

struct GateInner {
    held: AtomicUsize,
    held_bytes: AtomicUsize,
    gone: AtomicBool,
    closed_by_limit: AtomicBool,
    unknown_outcomes: Counter,
    /// The client's memory counters: a backend reply to it still being assembled is counted
    /// there ([`crate::backend`]'s reader).
    mem: Option<Arc<ClientMem>>,
}

impl ClientGate {
    pub fn new(unknown_outcomes: Counter) -> Self {
        Self::with_mem(unknown_outcomes, None)
    }

    pub fn with_mem(unknown_outcomes: Counter, mem: Option<Arc<ClientMem>>) -> Self {
        Self(Arc::new(GateInner {
            held: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
            closed_by_limit: AtomicBool::new(false),
            unknown_outcomes,
            mem,
        }))
    }

    /// The client's memory counters (None for gates made without a session).
    pub fn mem(&self) -> Option<&Arc<ClientMem>> {
        self.0.mem.as_ref()
    }

    /// Commands of this client in the hold queue now.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Acquire)
    }

    pub fn held_bytes(&self) -> usize {
        self.0.held_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn add_held(&self, bytes: usize) {
        self.0.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.0.held.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn release_held(&self, bytes: usize) {
        self.0.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }

    /// The client closed its connection: held commands are dropped, never sent.
    pub fn set_gone(&self) {
        self.0.gone.store(true, Ordering::Release);
    }

    pub fn is_gone(&self) -> bool {
        self.0.gone.load(Ordering::Acquire)
    }

    /// The proxy closed the client for a limit: its commands not yet written are dropped.
    pub fn set_closed_by_limit(&self) {
        self.0.closed_by_limit.store(true, Ordering::Release);
        self.set_gone();
    }

    pub fn is_closed_by_limit(&self) -> bool {
        self.0.closed_by_limit.load(Ordering::Acquire)
    }

    pub fn count_unknown_outcome(&self) {
        self.0.unknown_outcomes.inc();
    }
}

impl PartialEq for ClientGate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ClientGate {}

impl std::fmt::Debug for ClientGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientGate")
            .field("held", &self.held())
            .field("gone", &self.is_gone())
            .finish()
    }
}

/// One command on its way to a backend: everything a replay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The bytes to write (the client's own, never re-encoded).
    pub raw: Bytes,
    /// What resending it could do once written.
    pub class: ReplayClass,
    pub order: Order,
    pub route: Route,
    /// Its client's gate (None for the proxy's own commands and tools).
    pub gate: Option<ClientGate>,
}
