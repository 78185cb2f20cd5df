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
    Replied { reply: Reply, request: Request },
    /// No reply will come (boxed: the common outcome stays small).
    Unanswered(Box<Unanswered>),
}
