//! What a command that lost its connection may become: the replay class of each in-flight
//! entry and the decision taken from it.
//!
//! The rules are those of `shared/notes/failover-semantics.md`: bytes never written to the
//! dead socket may go anywhere; a written read-only command may be resent; a written write,
//! anything holding connection state (transactions, blocking pops) and pub/sub may not, because
//! its outcome is unknown (a resent `INCR` counts twice, a resent `SET` can overwrite a newer
//! write). The hold queue ([`super::hold`]) resends what is safe; what reaches a client as an
//! error says which it is: "(safe to retry)" when the command cannot have run, "the command
//! may have been executed" when its outcome is unknown.

pub use crate::backend::{Outcome, Unanswered};
pub use crate::request::{Order, ReplayClass, Request};

use crate::backend::BackendError;
use crate::resp::Reply;

/// The error reply a client gets for a command no reply will come for: "(safe to retry)"
/// when it cannot have run (never sent, or a read), "may have been executed" otherwise.
pub fn failure_reply(u: &Unanswered) -> Reply {
    if u.class() == ReplayClass::InTransaction {
        // Queued in MULTI: nothing ran, and EXEC will say the transaction is gone.
        return Reply::error(&format!(
            "ERR datamesh proxy: {}; the transaction was discarded (it had not run)",
            u.error
        ));
    }
    error_reply(&u.error, !may_have_run(u))
}

/// True when the command may have run: written, not read-only, not queued in a transaction,
/// and its error does not prove it was never sent (what the unknown-outcome metric counts).
pub fn may_have_run(u: &Unanswered) -> bool {
    !(u.class().replay_safe() || u.class() == ReplayClass::InTransaction || u.error.never_sent())
}

/// `-ERR datamesh proxy: <error>`, ending " (safe to retry)" when resending cannot apply the
/// command twice, or "; the command may have been executed" when it may have run: clients
/// and operators decide retries from that.
pub fn error_reply(e: &BackendError, retry_safe: bool) -> Reply {
    if retry_safe {
        Reply::error(&format!("ERR datamesh proxy: {e} (safe to retry)"))
    } else {
        Reply::error(&format!(
            "ERR datamesh proxy: {e}; the command may have been executed"
        ))
    }
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
                route: Default::default(),
                gate: None,
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
    fn a_command_queued_in_a_transaction_never_ran() {
        let u = unanswered(ReplayClass::InTransaction, true);
        assert!(!may_have_run(&u));
        assert!(
            !u.class().replay_safe(),
            "it cannot run outside its transaction"
        );
        let r = failure_reply(&u);
        assert!(
            r.raw
                .ends_with(b"; the transaction was discarded (it had not run)\r\n"),
            "{:?}",
            r.raw
        );
    }

    #[test]
    fn failure_replies_say_whether_a_retry_is_safe() {
        let r = failure_reply(&unanswered(ReplayClass::Write, true));
        assert_eq!(
            &r.raw[..],
            b"-ERR datamesh proxy: connection to backend 127.0.0.1:6379 was lost (closed by the backend); the command may have been executed\r\n"
        );
        let r = failure_reply(&unanswered(ReplayClass::Write, false));
        assert!(r.raw.ends_with(b"(safe to retry)\r\n"), "{:?}", r.raw);
    }
}
