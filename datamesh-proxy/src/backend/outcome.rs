//! What becomes of a command a connection took: a reply, or the whole request handed back
//! unanswered when the connection ends first (the way back to the router that sent it).

use std::net::SocketAddr;

use super::BackendError;
use crate::request::{ReplayClass, Request};
use crate::resp::Reply;

/// A command whose connection ended before its reply: handed back whole to the router that
/// sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub request: Request,
    /// The node it was sent to.
    pub addr: SocketAddr,
    /// Whether it was handed to the socket (the backend may have run it).
    pub written: bool,
    pub error: BackendError,
}

impl Unanswered {
    /// The effective class: [`ReplayClass::NeverWritten`] when it never reached a socket.
    pub fn class(&self) -> ReplayClass {
        if self.written {
            self.request.class
        } else {
            ReplayClass::NeverWritten
        }
    }
}

/// What became of a command the router sent.
#[derive(Debug)]
pub enum Outcome {
    /// The backend answered (possibly with an error reply); the request comes back too, so a
    /// redirect can resend it.
    Replied {
        reply: Reply,
        request: Request,
        /// The node that answered.
        node: SocketAddr,
    },
    /// No reply will come (boxed: the common outcome stays small).
    Unanswered(Box<Unanswered>),
}

/// A command a shared connection hands back when it failed or refused it: the way back to its
/// router and whether it was written.
pub struct Returned {
    pub request: Request,
    pub reply: super::conn::ReplyTx,
    pub written: bool,
    /// Its command deadline had passed (the connection timed out on it or after it).
    pub overdue: bool,
}

/// Where a shared connection hands back the commands it could not answer (the endpoint's hold
/// queue, which decides by replay class: hold and resend, or answer with an error).
pub trait Returns: Send + Sync {
    /// Whether commands are held at all (when not, a connection takes commands for a node
    /// that is down and answers them with its own error).
    fn holds(&self) -> bool;

    /// `entries` of a connection of pool `key` that failed with `error` (in queue order);
    /// `retry_at`: the connection refuses commands until then (it is backing off).
    fn returned(
        &self,
        key: super::PoolKey,
        entries: Vec<Returned>,
        error: &BackendError,
        retry_at: Option<tokio::time::Instant>,
    );
}
