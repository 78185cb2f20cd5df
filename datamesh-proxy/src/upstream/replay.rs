//! What a command that lost its connection may become: the replay class of each in-flight
//! entry and the decision taken from it.
//!
//! The rules are those of `shared/notes/failover-semantics.md`: bytes never written to the
//! dead socket may go anywhere; a written read-only command may be resent; a written write,
//! anything holding connection state (transactions, blocking pops) and pub/sub may not, because
//! its outcome is unknown (a resent `INCR` counts twice, a resent `SET` can overwrite a newer
//! write). Today every unanswered command gets an error reply that says whether it is safe to
//! retry; holding and replaying them is the failover's job, and it decides from these values.

pub use crate::backend::{Outcome, Unanswered};
pub use crate::request::{Order, ReplayClass, Request};

use crate::backend::BackendError;
use crate::resp::Reply;

/// What the router does with an unanswered command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer the client with an error that says whether a retry is safe.
    Fail { retry_safe: bool },
}

/// The decision for `u`. Nothing is resent yet: the client gets an error saying whether it may
/// retry (never written or read-only).
pub fn decide(u: &Unanswered) -> Decision {
    Decision::Fail {
        retry_safe: u.class().replay_safe(),
    }
}

/// The error reply a client gets for an unanswered command.
pub fn failure_reply(u: &Unanswered) -> Reply {
    match decide(u) {
        Decision::Fail { retry_safe } => error_reply(&u.error, retry_safe),
    }
}

/// `-ERR datamesh proxy: <error>`, with " (safe to retry)" when resending cannot apply the
/// command twice: clients and operators decide retries from that.
pub fn error_reply(e: &BackendError, retry_safe: bool) -> Reply {
    let safe = if retry_safe { " (safe to retry)" } else { "" };
    Reply::error(&format!("ERR datamesh proxy: {e}{safe}"))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::Bytes;

    use super::*;
    use crate::backend::Cause;

    fn unanswered(class: ReplayClass, written: bool) -> Unanswered {
        let addr: SocketAddr = "127.0.0.1:6379".parse().expect("addr");
        Unanswered {
            request: Request {
                raw: Bytes::from_static(b"*1\r\n$4\r\nINCR\r\n"),
                class,
                order: Order { client: 1, seq: 7 },
            },
            addr,
            written,
            error: BackendError::Lost {
                addr,
                cause: Cause::Eof,
            },
        }
    }

    #[test]
    fn only_unwritten_or_read_only_commands_are_safe() {
        for class in [
            ReplayClass::Write,
            ReplayClass::Stateful,
            ReplayClass::PubSub,
            ReplayClass::ReadOnly,
        ] {
            assert_eq!(unanswered(class, false).class(), ReplayClass::NeverWritten);
            assert!(unanswered(class, false).class().replay_safe());
        }
        assert!(unanswered(ReplayClass::ReadOnly, true)
            .class()
            .replay_safe());
        assert!(!unanswered(ReplayClass::Write, true).class().replay_safe());
        assert!(!unanswered(ReplayClass::Stateful, true)
            .class()
            .replay_safe());
        assert!(!unanswered(ReplayClass::PubSub, true).class().replay_safe());
    }

    #[test]
    fn failure_replies_say_whether_a_retry_is_safe() {
        let r = failure_reply(&unanswered(ReplayClass::Write, true));
        assert_eq!(
            &r.raw[..],
            b"-ERR datamesh proxy: connection to backend 127.0.0.1:6379 was lost (closed by the backend)\r\n"
        );
        let r = failure_reply(&unanswered(ReplayClass::Write, false));
        assert!(r.raw.ends_with(b"(safe to retry)\r\n"), "{:?}", r.raw);
    }
}
