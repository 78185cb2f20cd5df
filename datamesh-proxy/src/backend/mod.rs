//! Connections to backend nodes. Per endpoint a [`BackendGroup`]; per node, database and
//! protocol a [`NodePool`] of `pool_size` shared, multiplexed connections and a bounded set of
//! exclusive ([`Dedicated`]) ones for transactions, blocking commands and pub/sub, a few of
//! them kept connected ahead of need.
//!
//! - [`conn`]: one connection ([`Conn`]) and its in-flight queue;
//! - [`flusher`]: one write per connection per tick, in the order they got commands;
//! - [`pool`]: pools, dedicated connections, the group;
//! - [`connect`]: the one place sockets to backends are opened (with the bypass mark);
//! - [`handshake`]: the one AUTH/HELLO/SELECT exchange, for data and control connections;
//! - [`backoff`]: the one jittered exponential backoff;
//! - [`health`]: each node's status and its active health check;
//! - [`outcome`]: what becomes of a command, and the way back for those a connection could not
//!   answer.
//!
//! Errors carry their cause as a value ([`Cause`]), so a message never repeats itself and the
//! router decides from data, not strings.

pub mod backoff;
pub mod conn;
pub mod connect;
pub mod flusher;
pub mod handshake;
pub mod health;
pub mod outcome;
pub mod pool;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::Duration;

pub use backoff::Backoff;
pub use conn::{Conn, FlightState, InFlightInfo, Phase, PushSink};
pub use health::{Health, HealthSettings, NodeHealth, NodeStatus};
pub use outcome::{Outcome, Returned, Returns, Unanswered};
pub use pool::{BackendGroup, Dedicated, NodePool};

use crate::resp::ProtocolError;

/// Why a backend connection could not be made or ended. Each message is one clause, so a
/// [`BackendError`] reads "backend X is unavailable: connect failed: Connection refused".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("connect timed out after {0} ms")]
    ConnectTimeout(u64),
    #[error("the {step} of the connection handshake was refused: {error}{hint}")]
    Handshake {
        step: &'static str,
        error: String,
        hint: &'static str,
    },
    #[error("the connection handshake timed out after {0} ms")]
    HandshakeTimeout(u64),
    #[error("closed by the backend")]
    Eof,
    #[error("read failed: {0}")]
    Read(String),
    #[error("write failed: {0}")]
    Write(String),
    #[error("invalid RESP from the backend: {0}")]
    Protocol(ProtocolError),
    #[error("a reply arrived that no command was waiting for")]
    Desync,
    #[error("no reply within {0} ms (command_timeout_ms)")]
    Timeout(u64),
    #[error("closed by the proxy")]
    ClosedByProxy,
    #[error("not usable now ({0})")]
    NodeDown(String),
}

/// Why a command got no reply from a backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No connection could be made (the command was never sent).
    #[error("backend {addr} is unavailable: {cause}")]
    Unavailable { addr: SocketAddr, cause: Cause },
    /// The connection ended while the command was queued or in flight.
    #[error("connection to backend {addr} was lost ({cause})")]
    Lost { addr: SocketAddr, cause: Cause },
    #[error("all {max} dedicated connections to {addr} are in use (max_dedicated): too many transactions, blocking commands or subscribers at once")]
    DedicatedExhausted { addr: SocketAddr, max: u32 },
    /// Held for a usable node past `failover_hold_ms` (never sent).
    #[error("endpoint {endpoint}: no usable backend node after holding {held_ms} ms (failover_hold_ms): {cause}")]
    HoldExpired {
        addr: SocketAddr,
        endpoint: String,
        held_ms: u64,
        cause: String,
    },
    /// The hold queue could not take the command (never sent).
    #[error("endpoint {endpoint}: {cause}, and the failover hold queue {why}")]
    NotHeld {
        addr: SocketAddr,
        endpoint: String,
        cause: String,
        why: String,
    },
    /// The client went away while the command was held (never sent).
    #[error("the client closed its connection while the command was held; it was not sent")]
    ClientGone { addr: SocketAddr },
}

/// Who is at fault for an error: the backend side, or the proxy's own limits and decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Upstream,
    Proxy,
}

impl BackendError {
    pub fn addr(&self) -> SocketAddr {
        match self {
            BackendError::Unavailable { addr, .. }
            | BackendError::Lost { addr, .. }
            | BackendError::DedicatedExhausted { addr, .. }
            | BackendError::HoldExpired { addr, .. }
            | BackendError::NotHeld { addr, .. }
            | BackendError::ClientGone { addr } => *addr,
        }
    }

    /// True when the command cannot have run (nothing was sent).
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable { .. }
                | BackendError::DedicatedExhausted { .. }
                | BackendError::HoldExpired { .. }
                | BackendError::NotHeld { .. }
                | BackendError::ClientGone { .. }
        )
    }

    pub fn origin(&self) -> Origin {
        match self {
            BackendError::Lost {
                cause: Cause::ClosedByProxy,
                ..
            }
            | BackendError::DedicatedExhausted { .. }
            | BackendError::HoldExpired { .. }
            | BackendError::NotHeld { .. }
            | BackendError::ClientGone { .. } => Origin::Proxy,
            _ => Origin::Upstream,
        }
    }

    /// True when the node itself looks broken (the topology should look again).
    pub fn node_failure(&self) -> bool {
        self.origin() == Origin::Upstream
    }
}

/// Which pool a connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    pub db: u32,
    /// 2 or 3 (HELLO); replies are forwarded as-is, so clients only share a protocol's pool.
    pub proto: u8,
}

/// How the proxy connects to every node of one backend group.
#[derive(Clone)]
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

impl std::fmt::Debug for ConnectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the password.
        f.debug_struct("ConnectSpec")
            .field("mark", &self.mark)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("readonly", &self.readonly)
            .field("client_name", &self.client_name)
            .finish()
    }
}

impl ConnectSpec {
    /// A spec for tests and tools: no mark, no credentials.
    pub fn plain(connect_timeout: Duration) -> Self {
        Self {
            mark: 0,
            username: None,
            password: None,
            connect_timeout,
            readonly: false,
            client_name: "datamesh".into(),
        }
    }
}
