//! A command on its way to a backend, as the in-flight queues and the router see it: its
//! bytes, its client's order, and what resending it after its connection died could do
//! ([`ReplayClass`], from the command table). The replay decision itself is
//! [`crate::upstream::replay`]'s.

use bytes::Bytes;

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
}

impl ReplayClass {
    /// True when sending the command again elsewhere cannot apply it twice.
    pub fn replay_safe(self) -> bool {
        matches!(self, ReplayClass::NeverWritten | ReplayClass::ReadOnly)
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

/// One command on its way to a backend: everything a replay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The bytes to write (the client's own, never re-encoded).
    pub raw: Bytes,
    /// What resending it could do once written.
    pub class: ReplayClass,
    pub order: Order,
}
