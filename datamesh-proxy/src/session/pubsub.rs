//! A subscribed client's subscriptions, kept so they survive their backend connection.
//!
//! [`Subscriptions`] keeps what the client asked for (channels, patterns, shard channels, from
//! its own commands) and what it is still owed (the confirmation frames, pongs and replies of
//! commands sent but not answered yet, in order). When the subscription connection dies, the
//! session takes another one (through the hold queue's wait for a usable node) and sends one
//! SUBSCRIBE, PSUBSCRIBE and SSUBSCRIBE for the whole set; while their confirmations come in
//! ("resync"), a confirmation the client is owed is passed on and the others are swallowed
//! (the client subscribed long ago). When the resync is over, whatever is still owed is
//! answered by the proxy itself in order: an unsubscribe confirmation (the new connection never
//! had the channel), a pong, or an error for a command whose reply was lost. The client keeps
//! its connection; messages published during the gap are lost (pub/sub is at most once).

use std::collections::{BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};

use crate::commands::PubSub as Sub;
use crate::resp::{encode_command, Command, Reply, ReplyKind, Value};

/// A frame the client is still owed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owed {
    /// A (p|s)(un)subscribe confirmation for this channel (None: the null channel of an
    /// UNSUBSCRIBE with nothing subscribed).
    Confirm(&'static str, Option<Bytes>),
    /// PING's answer (RESP2: `["pong", arg]`).
    Pong(Bytes),
    /// Any other command's reply (RESP3 clients may send any command while subscribed);
    /// `readonly`: it cannot have changed anything.
    Reply { readonly: bool },
}

/// What a frame from the subscription connection is.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Message,
    Confirm(&'static str, Option<Bytes>),
    Pong,
    Other,
}

const CONFIRMS: [&str; 6] = [
    "subscribe",
    "psubscribe",
    "ssubscribe",
    "unsubscribe",
    "punsubscribe",
    "sunsubscribe",
];

/// Reads one `$len\r\n<data>\r\n` (or a null) at the front of `b`: (data, rest).
fn bulk_at(b: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    match b.first()? {
        b'$' | b'+' => {
            let eol = b.windows(2).position(|w| w == b"\r\n")?;
            if b[0] == b'+' {
                return Some((Some(&b[1..eol]), &b[eol + 2..]));
            }
            let n: i64 = std::str::from_utf8(&b[1..eol]).ok()?.parse().ok()?;
            if n < 0 {
                return Some((None, &b[eol + 2..]));
            }
            let start = eol + 2;
            let end = start.checked_add(usize::try_from(n).ok()?)?;
            Some((Some(b.get(start..end)?), b.get(end + 2..)?))
        }
        b'_' => Some((None, b.get(3..)?)),
        _ => None,
    }
}

/// Classifies a frame by its first element (and channel), without decoding the rest.
fn classify(raw: &[u8]) -> Frame {
    if !matches!(raw.first(), Some(b'*' | b'>')) {
        return Frame::Other;
    }
    let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
        return Frame::Other;
    };
    let Some((Some(kind), rest)) = bulk_at(&raw[eol + 2..]) else {
        return Frame::Other;
    };
    let kind = kind.to_ascii_lowercase();
    match kind.as_slice() {
        b"message" | b"pmessage" | b"smessage" => Frame::Message,
        b"pong" => Frame::Pong,
        k => match CONFIRMS.iter().find(|c| c.as_bytes() == k) {
            Some(c) => Frame::Confirm(
                c,
                bulk_at(rest).and_then(|(ch, _)| ch.map(Bytes::copy_from_slice)),
            ),
            None => Frame::Other,
        },
    }
}

/// A subscribed client's subscriptions (see the module docs).
#[derive(Debug, Default)]
pub struct Subscriptions {
    channels: BTreeSet<Bytes>,
    patterns: BTreeSet<Bytes>,
    shard: BTreeSet<Bytes>,
    owed: VecDeque<Owed>,
    /// During a resync: the confirmations the resubscribe commands will bring, in order.
    resync: Option<VecDeque<(&'static str, Bytes)>>,
}

impl Subscriptions {
    /// A command the client sent on the subscription connection: what it changes and what it
    /// is owed for it.
    pub fn sent(&mut self, sub: Option<Sub>, cmd: &Command, readonly: bool) {
        let args = &cmd.args[1..];
        let (kind, set) = match sub {
            Some(Sub::Subscribe) => ("subscribe", &mut self.channels),
            Some(Sub::PSubscribe) => ("psubscribe", &mut self.patterns),
            Some(Sub::SSubscribe) => ("ssubscribe", &mut self.shard),
            Some(Sub::Unsubscribe) => ("unsubscribe", &mut self.channels),
            Some(Sub::PUnsubscribe) => ("punsubscribe", &mut self.patterns),
            Some(Sub::SUnsubscribe) => ("sunsubscribe", &mut self.shard),
            None => {
                if cmd.name().eq_ignore_ascii_case(b"ping") {
                    let arg = args.first().cloned().unwrap_or_default();
                    self.owed.push_back(Owed::Pong(arg));
                } else {
                    self.owed.push_back(Owed::Reply { readonly });
                }
                return;
            }
        };
        if sub.is_some_and(Sub::is_unsubscribe) {
            // Without arguments: one confirmation per subscribed channel (or one null).
            let names: Vec<Bytes> = if args.is_empty() {
                set.iter().cloned().collect()
            } else {
                args.to_vec()
            };
            if names.is_empty() {
                self.owed.push_back(Owed::Confirm(kind, None));
            }
            for n in names {
                set.remove(&n);
                self.owed.push_back(Owed::Confirm(kind, Some(n)));
            }
        } else {
            for n in args {
                set.insert(n.clone());
                self.owed.push_back(Owed::Confirm(kind, Some(n.clone())));
            }
        }
    }

    /// True while a resync is under way (the client's next commands wait).
    pub fn resyncing(&self) -> bool {
        self.resync.is_some()
    }

    /// A frame from the subscription connection: whether the client gets it.
    pub fn received(&mut self, raw: &[u8]) -> bool {
        let frame = classify(raw);
        if frame == Frame::Message {
            return true;
        }
        if let Some(resync) = &mut self.resync {
            if let Frame::Confirm(kind, Some(ch)) = &frame {
                if resync.front().is_some_and(|(k, c)| k == kind && c == ch) {
                    resync.pop_front();
                }
            }
        }
        let at = match (&frame, self.owed.front()) {
            // An UNSUBSCRIBE without arguments is confirmed channel by channel in the server's
            // own order, not ours: any confirmation of the run of them at the front.
            (Frame::Confirm(fk, fc), _) => self
                .owed
                .iter()
                .take_while(|o| matches!(o, Owed::Confirm(..)))
                .position(|o| matches!(o, Owed::Confirm(k, c) if k == fk && c == fc)),
            (Frame::Pong | Frame::Other, Some(Owed::Pong(_) | Owed::Reply { .. })) => Some(0),
            _ => None,
        };
        if let Some(i) = at {
            self.owed.remove(i);
            return true;
        }
        // During a resync: a confirmation of a subscription the client made long ago.
        // Outside one: a frame we did not expect; the client gets it as Redis sent it.
        self.resync.is_none()
    }

    /// The commands that restore every subscription on a new connection; starts the resync.
    pub fn resubscribe(&mut self) -> Vec<Bytes> {
        let mut expect = VecDeque::new();
        let mut out = Vec::new();
        for (cmd, kind, set) in [
            ("SUBSCRIBE", "subscribe", &self.channels),
            ("PSUBSCRIBE", "psubscribe", &self.patterns),
            ("SSUBSCRIBE", "ssubscribe", &self.shard),
        ] {
            if set.is_empty() {
                continue;
            }
            let mut args = vec![Bytes::from_static(cmd.as_bytes())];
            for ch in set {
                args.push(ch.clone());
                expect.push_back((kind, ch.clone()));
            }
            out.push(encode_command(&args));
        }
        self.resync = Some(expect);
        out
    }

    /// Ends the resync once its confirmations are in: the frames the proxy answers itself
    /// for what the client is still owed (see the module docs), in order.
    pub fn finish_resync(&mut self, proto: u8) -> Option<Vec<Reply>> {
        if !self.resync.as_ref().is_some_and(VecDeque::is_empty) {
            return None;
        }
        self.resync = None;
        let count = |kind: &str| -> i64 {
            if kind.starts_with('s') {
                self.shard.len() as i64
            } else {
                (self.channels.len() + self.patterns.len()) as i64
            }
        };
        let mut out = Vec::new();
        for owed in std::mem::take(&mut self.owed) {
            let r = match owed {
                Owed::Confirm(kind, ch) => {
                    let mut b = BytesMut::new();
                    let ch = ch.map(Value::Bulk).unwrap_or(Value::Null);
                    Value::Push(vec![Value::bulk(kind), ch, Value::Int(count(kind))])
                        .encode(proto, &mut b);
                    Reply {
                        raw: b.freeze(),
                        kind: ReplyKind::Push,
                    }
                }
                Owed::Pong(arg) if proto < 3 => {
                    let mut b = BytesMut::new();
                    Value::Array(vec![Value::bulk("pong"), Value::Bulk(arg)]).encode(proto, &mut b);
                    Reply {
                        raw: b.freeze(),
                        kind: ReplyKind::Other,
                    }
                }
                Owed::Pong(arg) if arg.is_empty() => Reply::simple("PONG"),
                Owed::Pong(arg) => Reply::bulk(&arg),
                Owed::Reply { readonly } => Reply::error(&format!(
                    "ERR datamesh proxy: the subscription connection was lost before the reply{}",
                    if readonly {
                        " (safe to retry)"
                    } else {
                        "; the command may have been executed"
                    }
                )),
            };
            out.push(r);
        }
        Some(out)
    }

    /// Channels, patterns and shard channels subscribed now, apart (CLIENT LIST's `sub`,
    /// `psub`, `ssub`).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.channels.len(), self.patterns.len(), self.shard.len())
    }

    /// Channels, patterns and shard channels subscribed now.
    pub fn len(&self) -> usize {
        self.channels.len() + self.patterns.len() + self.shard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribed to nothing, with every confirmation and reply in and no resync under way:
    /// the client has left subscriber mode (Redis's count reached 0), and its next commands
    /// may go anywhere again.
    pub fn left(&self) -> bool {
        self.is_empty() && self.owed.is_empty() && self.resync.is_none()
    }

    /// Subscribed to nothing, but confirmations are still on their way: a command that is not
    /// a subscription waits for them, then runs like any other (not on this connection).
    pub fn leaving(&self) -> bool {
        self.is_empty() && !self.owed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> Command {
        Command::from_args(s.split(' ').map(|a| Bytes::copy_from_slice(a.as_bytes())))
    }

    fn frame(kind: &str, ch: &str, n: i64) -> Vec<u8> {
        format!(
            "*3\r\n${}\r\n{kind}\r\n${}\r\n{ch}\r\n:{n}\r\n",
            kind.len(),
            ch.len()
        )
        .into_bytes()
    }

    #[test]
    fn frames_are_classified_by_their_first_element() {
        assert_eq!(classify(&frame("message", "a", 0)), Frame::Message);
        assert_eq!(
            classify(&frame("subscribe", "a", 1)),
            Frame::Confirm("subscribe", Some(Bytes::from_static(b"a")))
        );
        assert_eq!(
            classify(b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n"),
            Frame::Confirm("unsubscribe", None)
        );
        assert_eq!(classify(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"), Frame::Pong);
        assert_eq!(classify(b"+OK\r\n"), Frame::Other);
    }

    // SUBSCRIBE a b confirmed; then SUBSCRIBE c, UNSUBSCRIBE a and PING are lost with the
    // connection. The resync subscribes b and c again: c's confirmation is passed on, b's is
    // swallowed, and the unsubscribe of a and the pong are answered by the proxy, in order.
    #[test]
    fn a_resync_passes_on_what_is_owed_and_answers_the_rest() {
        let mut s = Subscriptions::default();
        s.sent(Some(Sub::Subscribe), &cmd("SUBSCRIBE a b"), false);
        assert!(s.received(&frame("subscribe", "a", 1)));
        assert!(s.received(&frame("subscribe", "b", 2)));
        assert!(s.received(&frame("message", "a", 0)));
        s.sent(Some(Sub::Subscribe), &cmd("SUBSCRIBE c"), false);
        s.sent(Some(Sub::Unsubscribe), &cmd("UNSUBSCRIBE a"), false);
        s.sent(None, &cmd("PING"), true);
        // The connection dies here.
        let cmds = s.resubscribe();
        assert_eq!(
            cmds,
            vec![Bytes::from_static(
                b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\nb\r\n$1\r\nc\r\n"
            )]
        );
        assert!(s.resyncing());
        assert!(
            !s.received(&frame("subscribe", "b", 1)),
            "b was confirmed long ago"
        );
        assert!(s.finish_resync(2).is_none(), "c is still to come");
        assert!(s.received(&frame("subscribe", "c", 2)), "c is owed");
        let rest = s.finish_resync(2).expect("resync over");
        let rest: Vec<&[u8]> = rest.iter().map(|r| &r.raw[..]).collect();
        assert_eq!(
            rest,
            vec![
                &b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n"[..],
                &b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"[..],
            ]
        );
        assert!(!s.resyncing());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_client_leaves_once_every_unsubscription_is_confirmed() {
        let mut s = Subscriptions::default();
        s.sent(Some(Sub::Subscribe), &cmd("SUBSCRIBE a b"), false);
        assert!(s.received(&frame("subscribe", "a", 1)));
        assert!(s.received(&frame("subscribe", "b", 2)));
        assert!(!s.left() && !s.leaving());
        s.sent(Some(Sub::Unsubscribe), &cmd("UNSUBSCRIBE"), false);
        assert!(s.leaving() && !s.left());
        // The server confirms in its own order.
        assert!(s.received(&frame("unsubscribe", "b", 1)));
        assert!(s.leaving());
        assert!(s.received(&frame("unsubscribe", "a", 0)));
        assert!(s.left() && !s.leaving());
    }

    #[test]
    fn unsubscribe_without_arguments_owes_one_frame_per_channel() {
        let mut s = Subscriptions::default();
        s.sent(Some(Sub::Subscribe), &cmd("SUBSCRIBE a b"), false);
        s.sent(Some(Sub::Unsubscribe), &cmd("UNSUBSCRIBE"), false);
        assert_eq!(s.len(), 0);
        assert_eq!(s.owed.len(), 4);
        s.sent(Some(Sub::Unsubscribe), &cmd("UNSUBSCRIBE"), false);
        assert_eq!(s.owed.back(), Some(&Owed::Confirm("unsubscribe", None)));
    }
}
