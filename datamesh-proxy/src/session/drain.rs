//! When a draining session closes its connection: only at a command boundary, so a client
//! that reconnects on a clean close (a pooled client checks its connection before it reuses
//! it) sees no error. A pure decision over the session's facts, unit-tested here; the session
//! gathers the facts ([`super::Session`]) and the drain's deadline closes whatever never
//! reaches a boundary ([`crate::shared::Shared::drain`]).

use std::time::Duration;

/// A connection idle at a boundary when the drain reaches it, whose last command came less
/// than this ago, is given until then for its next command, and is closed right after that
/// command's reply: a client in a request loop is between a reply and its next command most
/// of the time it is not waiting, and a FIN that crosses its next command would fail that
/// command. A FIN right after a reply is seen by the client before it reuses the
/// connection. A connection quiet for longer is closed at once.
pub(crate) const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// What makes a command boundary: each field true means "not at one".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Owed {
    /// Replies not written to the socket yet (buffered or still to come).
    pub replies: bool,
    /// Commands decoded and not answered (the inbox, a stall, a dedicated connection being
    /// taken for one).
    pub unanswered: bool,
    /// Bytes read and not decoded, or a command begun and not complete.
    pub unparsed: bool,
    /// Inside MULTI, or holding WATCHes (a transaction spans commands).
    pub transaction: bool,
    /// Subscribed (RESP2 subscriber mode, or RESP3 with subscriptions), or restoring them.
    pub subscribed: bool,
    /// A blocking command (BLPOP ...) waits for its reply.
    pub blocked: bool,
}

impl Owed {
    pub(crate) fn at_boundary(&self) -> bool {
        *self == Owed::default()
    }
}

/// What a draining session does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DrainStep {
    /// Not at a boundary: keep serving (and close right after the boundary is reached).
    Busy,
    /// Close the connection now (its FIN follows its last reply).
    Close,
    /// At a boundary, but its last command was this long ago only: wait for its next command
    /// until [`DRAIN_QUIET`] after the last one.
    Quiet(Duration),
}

/// `busy`: the session was away from a boundary since the drain reached it (a reply it
/// owed was written since): it closes at the first boundary. `since_last`: time since its
/// last command arrived.
pub(crate) fn drain_step(owed: &Owed, busy: bool, since_last: Duration) -> DrainStep {
    if !owed.at_boundary() {
        DrainStep::Busy
    } else if busy || since_last >= DRAIN_QUIET {
        DrainStep::Close
    } else {
        DrainStep::Quiet(DRAIN_QUIET - since_last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(owed: Owed, busy: bool, since_ms: u64, want: DrainStep) {
        assert_eq!(
            drain_step(&owed, busy, Duration::from_millis(since_ms)),
            want,
            "{owed:?} busy={busy} since={since_ms}ms"
        );
    }

    #[test]
    fn an_idle_connection_closes_at_once() {
        check(Owed::default(), false, 10_000, DrainStep::Close);
        check(Owed::default(), false, 250, DrainStep::Close);
    }

    #[test]
    fn a_connection_just_answered_gets_its_next_command() {
        check(
            Owed::default(),
            false,
            50,
            DrainStep::Quiet(Duration::from_millis(200)),
        );
        check(Owed::default(), false, 0, DrainStep::Quiet(DRAIN_QUIET));
    }

    #[test]
    fn a_busy_connection_closes_right_after_its_reply() {
        // Its reply was written since the drain reached it: closed at the boundary, however
        // recent its last command.
        check(Owed::default(), true, 0, DrainStep::Close);
    }

    #[test]
    fn anything_owed_or_held_is_not_a_boundary() {
        let each = [
            Owed {
                replies: true,
                ..Owed::default()
            },
            Owed {
                unanswered: true,
                ..Owed::default()
            },
            Owed {
                unparsed: true,
                ..Owed::default()
            },
            Owed {
                transaction: true,
                ..Owed::default()
            },
            Owed {
                subscribed: true,
                ..Owed::default()
            },
            Owed {
                blocked: true,
                ..Owed::default()
            },
        ];
        for o in each {
            assert!(!o.at_boundary(), "{o:?}");
            check(o, true, 10_000, DrainStep::Busy);
            check(o, false, 0, DrainStep::Busy);
        }
        assert!(Owed::default().at_boundary());
    }
}
