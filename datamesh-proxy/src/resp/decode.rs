//! Framing: where a client command or a backend reply ends, with the limits checked as
//! each header is seen. Nothing here allocates per argument beyond the argument list, and
//! nothing copies a body: commands and replies are slices of the bytes read.

use bytes::{Buf, Bytes, BytesMut};

use super::value::{encode_command, parse_int};
use super::{Command, Limits, ProtocolError, Reply, ReplyKind};

/// Finds `\r\n` at or after `from`; `Ok(None)` when not there yet, an error when the line is
/// longer than `max` (whether or not its end has arrived, so the answer does not depend on
/// how the bytes were split into reads).
pub(crate) fn find_crlf(
    buf: &[u8],
    from: usize,
    max: usize,
) -> Result<Option<usize>, ProtocolError> {
    let hay = &buf[from.min(buf.len())..];
    match hay.iter().position(|b| *b == b'\r') {
        Some(i) if from + i + 1 < buf.len() => {
            if buf[from + i + 1] != b'\n' {
                // A bare CR inside a header line is never valid RESP.
                Err(ProtocolError::InvalidInteger)
            } else if i > max {
                Err(ProtocolError::HeaderTooLong)
            } else {
                Ok(Some(from + i))
            }
        }
        Some(i) if i > max => Err(ProtocolError::HeaderTooLong),
        Some(_) => Ok(None),
        None if hay.len() > max => Err(ProtocolError::HeaderTooLong),
        None => Ok(None),
    }
}

/// A length in a client command's header, read as Redis reads it (`string2ll`): digits with
/// an optional `-`, no `+`, no leading zero, no `-0`. A command is forwarded as the client's
/// bytes, so a header Redis would refuse is refused here: forwarded, it would make the backend
/// answer a protocol error and close a pooled connection other clients share.
fn parse_len(s: &[u8]) -> Option<i64> {
    match s {
        [b'0'] => Some(0),
        [b'1'..=b'9', ..] | [b'-', b'1'..=b'9', ..] => parse_int(s),
        _ => None,
    }
}

/// Resumable decoder of client commands. Keep one per connection; the buffer must only grow
/// at its end between calls (bytes are removed only by the decoder when a command is complete).
#[derive(Debug, Default)]
pub struct CommandDecoder {
    /// Elements still expected of the multibulk being scanned (None: at a command start).
    remaining: Option<usize>,
    /// Scan position inside the buffer.
    pos: usize,
    /// Argument ranges found so far.
    args: Vec<(usize, usize)>,
}

impl CommandDecoder {
    /// True when part of a command has been scanned (the buffer must not be cleared).
    pub fn in_progress(&self) -> bool {
        self.remaining.is_some()
    }

    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Command>, ProtocolError> {
        loop {
            if self.remaining.is_none() {
                if buf.is_empty() {
                    return Ok(None);
                }
                if buf[0] != b'*' {
                    match decode_inline(buf, limits)? {
                        Some(Some(cmd)) => return Ok(Some(cmd)),
                        // An empty line: skipped, as Redis does.
                        Some(None) => continue,
                        None => return Ok(None),
                    }
                }
                let Some(end) = find_crlf(buf, 1, limits.max_inline_len)? else {
                    return Ok(None);
                };
                let n = parse_len(&buf[1..end]).ok_or(ProtocolError::InvalidMultibulkLength)?;
                if n > i32::MAX as i64 {
                    return Err(ProtocolError::InvalidMultibulkLength);
                }
                if n > 0 && n as u64 > limits.max_array_len {
                    return Err(if limits.max_array_len <= 10 {
                        ProtocolError::UnauthenticatedMultibulk
                    } else {
                        ProtocolError::MultibulkTooLong {
                            len: n,
                            max: limits.max_array_len,
                        }
                    });
                }
                if n <= 0 {
                    // `*0` and `*-1` are empty commands: Redis skips them.
                    buf.advance(end + 2);
                    continue;
                }
                self.remaining = Some(n as usize);
                self.pos = end + 2;
                self.args.clear();
                self.args.reserve((n as usize).min(64));
            }
            // Scan bulk strings.
            while let Some(rem) = self.remaining.filter(|r| *r > 0) {
                if self.pos >= buf.len() {
                    return Ok(None);
                }
                if buf[self.pos] != b'$' {
                    let got = buf[self.pos] as char;
                    self.reset();
                    return Err(ProtocolError::ExpectedBulk { got });
                }
                let Some(end) =
                    find_crlf(buf, self.pos + 1, limits.max_inline_len).map_err(|e| match e {
                        ProtocolError::HeaderTooLong => ProtocolError::InvalidBulkLength,
                        e => e,
                    })?
                else {
                    return Ok(None);
                };
                let len =
                    parse_len(&buf[self.pos + 1..end]).ok_or(ProtocolError::InvalidBulkLength)?;
                if len < 0 {
                    return Err(ProtocolError::InvalidBulkLength);
                }
                if len as u64 > limits.max_bulk_len {
                    return Err(if limits.max_bulk_len <= 16 * 1024 {
                        ProtocolError::UnauthenticatedBulk
                    } else {
                        ProtocolError::BulkTooLong {
                            len,
                            max: limits.max_bulk_len,
                        }
                    });
                }
                let start = end + 2;
                let stop = start + len as usize;
                if buf.len() < stop + 2 {
                    // Make room for the whole body at once instead of growing step by step.
                    buf.reserve(stop + 2 - buf.len());
                    return Ok(None);
                }
                if &buf[stop..stop + 2] != b"\r\n" {
                    return Err(ProtocolError::MissingCrlf);
                }
                self.args.push((start, stop));
                self.pos = stop + 2;
                self.remaining = Some(rem - 1);
            }
            let raw = buf.split_to(self.pos).freeze();
            let args = self.args.iter().map(|(a, b)| raw.slice(*a..*b)).collect();
            self.reset();
            return Ok(Some(Command { raw, args }));
        }
    }

    fn reset(&mut self) {
        self.remaining = None;
        self.pos = 0;
        self.args.clear();
    }
}

/// Decodes one client command (stateless form of [`CommandDecoder`]; the session keeps a
/// decoder so a large command is scanned once).
pub fn decode_command(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Command>, ProtocolError> {
    CommandDecoder::default().decode(buf, limits)
}

/// An inline command line: `Ok(None)` incomplete, `Ok(Some(None))` an empty line (consumed).
fn decode_inline(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Option<Command>>, ProtocolError> {
    let Some(nl) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > limits.max_inline_len {
            return Err(ProtocolError::InlineTooLong);
        }
        return Ok(None);
    };
    if nl > limits.max_inline_len {
        return Err(ProtocolError::InlineTooLong);
    }
    let line = buf.split_to(nl + 1);
    let mut text = &line[..nl];
    if text.last() == Some(&b'\r') {
        text = &text[..text.len() - 1];
    }
    let args = split_args(text)?;
    if args.is_empty() {
        return Ok(Some(None));
    }
    if args.len() as u64 > limits.max_array_len {
        return Err(ProtocolError::MultibulkTooLong {
            len: args.len() as i64,
            max: limits.max_array_len,
        });
    }
    let args: Vec<Bytes> = args.into_iter().map(Bytes::from).collect();
    let raw = encode_command(&args);
    // Arguments point into the re-encoded bytes, like those of RESP commands.
    Ok(Some(Some(Command { raw, args })))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline line like Redis's `sdssplitargs`: blanks separate arguments, "double
/// quotes" understand `\n \r \t \b \a \\ \" \xHH`, 'single quotes' only `\'`; a closing quote
/// must be followed by a blank or the end.
/// The position after the closing quote at `i`: like Redis, a closing quote must be followed
/// by a space or the end of the line.
fn after_closing_quote(line: &[u8], i: usize) -> Result<usize, ProtocolError> {
    match line.get(i + 1) {
        Some(c) if !c.is_ascii_whitespace() => Err(ProtocolError::UnbalancedQuotes),
        _ => Ok(i + 1),
    }
}

pub fn split_args(line: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let mut out = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Ok(out);
        }
        let mut cur = Vec::new();
        let (mut inq, mut insq) = (false, false);
        loop {
            if inq {
                if i >= n {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                let c = line[i];
                if c == b'\\' && i + 3 < n && line[i + 1] == b'x' {
                    if let (Some(h), Some(l)) = (hex(line[i + 2]), hex(line[i + 3])) {
                        cur.push(h * 16 + l);
                        i += 4;
                        continue;
                    }
                }
                if c == b'\\' && i + 1 < n {
                    let e = match line[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        o => o,
                    };
                    cur.push(e);
                    i += 2;
                    continue;
                }
                if c == b'"' {
                    i = after_closing_quote(line, i)?;
                    break;
                }
                cur.push(c);
                i += 1;
            } else if insq {
                if i >= n {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    cur.push(b'\'');
                    i += 2;
                    continue;
                }
                if c == b'\'' {
                    i = after_closing_quote(line, i)?;
                    break;
                }
                cur.push(c);
                i += 1;
            } else {
                if i >= n || line[i].is_ascii_whitespace() {
                    break;
                }
                match line[i] {
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    c => cur.push(c),
                }
                i += 1;
            }
        }
        out.push(cur);
    }
}

/// Most bytes the reply decoder reserves ahead for a body not yet received (a larger body
/// grows the buffer as it arrives).
const REPLY_RESERVE_MAX: usize = 64 * 1024 * 1024;

/// Resumable decoder of backend replies (any RESP2/RESP3 frame, nested).
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    pos: usize,
    /// Elements still expected per open aggregate; `true` marks an attribute (a prefix that
    /// does not count as an element of its parent).
    stack: Vec<(u64, bool)>,
    /// Discard mode ([`ReplyDecoder::discard`]): the frame in progress is consumed as it
    /// arrives and its bytes dropped.
    discarding: bool,
    /// Discard mode: bytes of a bulk body (and its CRLF) still to drop.
    skip: u64,
}

impl ReplyDecoder {
    /// True while a frame has begun but not ended in `buf` (its bytes are at the front).
    pub fn in_frame(&self, buf: &BytesMut) -> bool {
        self.discarding || !buf.is_empty()
    }

    /// Discard mode: the rest of the frame now in progress is dropped as it arrives instead
    /// of being kept (its client is gone, or it was over a limit); the bytes already in `buf`
    /// are dropped now. [`ReplyDecoder::decode`] then consumes the frame and returns
    /// [`ReplyDecoder::discarded`] in its place, and decodes normally after it.
    pub fn discard(&mut self, buf: &mut BytesMut) {
        buf.advance(self.pos);
        self.pos = 0;
        self.discarding = true;
    }

    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// What a discarded frame is delivered as (to the command it answered, whose client is
    /// gone).
    pub fn discarded() -> Reply {
        Reply::error("ERR reply discarded by the proxy: its client was closed")
    }

    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Reply>, ProtocolError> {
        loop {
            if self.discarding {
                if self.skip > 0 {
                    let n = self.skip.min(buf.len() as u64);
                    buf.advance(n as usize);
                    self.skip -= n;
                    if self.skip > 0 {
                        return Ok(None);
                    }
                    if self.complete_element() {
                        return Ok(Some(self.end_discard()));
                    }
                    continue;
                }
                // Parsed header lines are dropped as soon as they are read.
                buf.advance(self.pos);
                self.pos = 0;
            }
            if self.pos >= buf.len() {
                return Ok(None);
            }
            let t = buf[self.pos];
            let Some(end) = find_crlf(buf, self.pos + 1, limits.max_inline_len)? else {
                return Ok(None);
            };
            let line = &buf[self.pos + 1..end];
            let completed = match t {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    self.pos = end + 2;
                    true
                }
                b'$' | b'!' | b'=' => {
                    let len = parse_int(line).ok_or(ProtocolError::InvalidBulkLength)?;
                    if len == -1 && t == b'$' {
                        self.pos = end + 2;
                    } else {
                        if len < 0 {
                            return Err(ProtocolError::InvalidBulkLength);
                        }
                        if len as u64 > limits.max_bulk_len {
                            return Err(ProtocolError::BulkTooLong {
                                len,
                                max: limits.max_bulk_len,
                            });
                        }
                        let stop = end + 2 + len as usize;
                        if self.discarding {
                            // The body is dropped as it arrives, never buffered.
                            buf.advance(end + 2);
                            self.pos = 0;
                            self.skip = len as u64 + 2;
                            continue;
                        }
                        if buf.len() < stop + 2 {
                            // The length is the peer's word: room for at most
                            // REPLY_RESERVE_MAX at once (`$999999999999` from a confused
                            // peer must not abort the agent with a failed allocation).
                            buf.reserve((stop + 2 - buf.len()).min(REPLY_RESERVE_MAX));
                            return Ok(None);
                        }
                        if &buf[stop..stop + 2] != b"\r\n" {
                            return Err(ProtocolError::MissingCrlf);
                        }
                        self.pos = stop + 2;
                    }
                    true
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = parse_int(line).ok_or(ProtocolError::InvalidMultibulkLength)?;
                    self.pos = end + 2;
                    if n == -1 && t == b'*' {
                        true
                    } else {
                        if n < 0 {
                            return Err(ProtocolError::InvalidMultibulkLength);
                        }
                        if n as u64 > limits.max_array_len {
                            return Err(ProtocolError::MultibulkTooLong {
                                len: n,
                                max: limits.max_array_len,
                            });
                        }
                        if self.stack.len() + 1 > limits.max_depth {
                            return Err(ProtocolError::TooDeep {
                                max: limits.max_depth,
                            });
                        }
                        let elems = if t == b'%' || t == b'|' {
                            2 * n as u64
                        } else {
                            n as u64
                        };
                        if elems == 0 {
                            // An empty attribute still prefixes a value; an empty
                            // aggregate is a complete element.
                            t != b'|'
                        } else {
                            self.stack.push((elems, t == b'|'));
                            false
                        }
                    }
                }
                b => return Err(ProtocolError::InvalidType { byte: b }),
            };
            if completed && self.complete_element() {
                if self.discarding {
                    buf.advance(self.pos);
                    return Ok(Some(self.end_discard()));
                }
                let raw = buf.split_to(self.pos).freeze();
                self.pos = 0;
                let first = if raw[0] == b'|' { b'|' } else { raw[0] };
                return Ok(Some(Reply {
                    kind: ReplyKind::of(first),
                    raw,
                }));
            }
        }
    }

    fn end_discard(&mut self) -> Reply {
        self.pos = 0;
        self.discarding = false;
        Self::discarded()
    }

    /// An element finished: count it in the open aggregates. True when the frame is complete.
    fn complete_element(&mut self) -> bool {
        loop {
            match self.stack.last_mut() {
                None => return true,
                Some((n, attr)) => {
                    *n -= 1;
                    if *n > 0 {
                        return false;
                    }
                    let was_attr = *attr;
                    self.stack.pop();
                    if was_attr {
                        // The attribute's value still follows.
                        return false;
                    }
                }
            }
        }
    }
}

/// Decodes one backend reply (stateless form of [`ReplyDecoder`]).
pub fn decode_reply(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Reply>, ProtocolError> {
    ReplyDecoder::default().decode(buf, limits)
}

/// The raw frames of the elements of one complete array or set frame `raw` (zero-copy
/// slices), or `None` if it is not one. Merges copy elements as the backend sent them.
pub fn array_elements(raw: &Bytes) -> Option<Vec<Bytes>> {
    if !matches!(raw.first(), Some(b'*' | b'~')) {
        return None;
    }
    let eol = raw.iter().position(|b| *b == b'\n')?;
    let n = parse_int(raw.get(1..eol.checked_sub(1)?)?)?;
    let n = usize::try_from(n).ok()?;
    let mut rest = BytesMut::from(&raw[eol + 1..]);
    let mut dec = ReplyDecoder::default();
    let limits = Limits::backend();
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        out.push(dec.decode(&mut rest, &limits).ok()??.raw);
    }
    rest.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{DEFAULT_MAX_ARRAY_LEN, DEFAULT_MAX_BULK_LEN};

    /// Decodes every command of `input` (all at once and split at every byte), asserts both
    /// give `want` (the argument lists), and returns the forwarded bytes.
    fn check(input: &[u8], want: &[&[&str]]) -> Vec<Bytes> {
        let limits = Limits::default();
        let want: Vec<Vec<Bytes>> = want
            .iter()
            .map(|c| {
                c.iter()
                    .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                    .collect()
            })
            .collect();
        let mut buf = BytesMut::from(input);
        let mut d = CommandDecoder::default();
        let mut got = Vec::new();
        while let Some(c) = d.decode(&mut buf, &limits).expect("valid") {
            got.push(c);
        }
        assert_eq!(got.iter().map(|c| c.args.clone()).collect::<Vec<_>>(), want);
        for split in 0..=input.len() {
            let mut buf = BytesMut::new();
            let mut d = CommandDecoder::default();
            let mut got2 = Vec::new();
            for part in [&input[..split], &input[split..]] {
                buf.extend_from_slice(part);
                while let Some(c) = d.decode(&mut buf, &limits).expect("valid") {
                    got2.push(c);
                }
            }
            assert_eq!(got2, got, "split at {split}");
        }
        // Byte by byte.
        let mut buf = BytesMut::new();
        let mut d = CommandDecoder::default();
        let mut got3 = Vec::new();
        for b in input {
            buf.extend_from_slice(&[*b]);
            while let Some(c) = d.decode(&mut buf, &limits).expect("valid") {
                got3.push(c);
            }
        }
        assert_eq!(got3, got);
        got.into_iter().map(|c| c.raw).collect()
    }

    fn err(input: &[u8], limits: Limits) -> ProtocolError {
        let mut buf = BytesMut::from(input);
        let mut d = CommandDecoder::default();
        loop {
            match d.decode(&mut buf, &limits) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no error for {input:?}"),
                Err(e) => return e,
            }
        }
    }

    #[test]
    fn resp_commands_keep_their_bytes() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nv\r\nxx\r\n*1\r\n$4\r\nPING\r\n";
        let raws = check(input, &[&["SET", "k", "v\r\nxx"], &["PING"]]);
        assert_eq!(&raws[0][..], &input[..31]);
        assert_eq!(&raws[1][..], &input[31..]);
    }

    #[test]
    fn inline_commands() {
        let raws = check(
            b"PING\r\nset k \"a b\\x41\\n\"\n\r\n  \nget 'it\\'s'\r\n",
            &[&["PING"], &["set", "k", "a bA\n"], &["get", "it's"]],
        );
        assert_eq!(&raws[0][..], b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn empty_multibulks_are_skipped() {
        check(b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n", &[&["PING"]]);
    }

    #[test]
    fn empty_and_binary_args() {
        check(b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n", &[&["ECHO", ""]]);
        let mut input = b"*2\r\n$4\r\nECHO\r\n$3\r\n".to_vec();
        input.extend_from_slice(&[0, 255, b'\n']);
        input.extend_from_slice(b"\r\n");
        let mut buf = BytesMut::from(&input[..]);
        let c = decode_command(&mut buf, &Limits::default())
            .expect("ok")
            .expect("complete");
        assert_eq!(&c.args[1][..], &[0, 255, b'\n']);
    }

    #[test]
    fn limits_fail_on_the_header() {
        let l = Limits::default();
        assert_eq!(
            err(b"*1\r\n$999999999999\r\n", l),
            ProtocolError::BulkTooLong {
                len: 999_999_999_999,
                max: DEFAULT_MAX_BULK_LEN
            }
        );
        assert_eq!(
            err(b"*2000000\r\n", l),
            ProtocolError::MultibulkTooLong {
                len: 2_000_000,
                max: DEFAULT_MAX_ARRAY_LEN
            }
        );
        assert_eq!(err(b"*x\r\n", l), ProtocolError::InvalidMultibulkLength);
        assert_eq!(err(b"*1\r\n$-5\r\n", l), ProtocolError::InvalidBulkLength);
        assert_eq!(
            err(b"*1\r\n:1\r\n", l),
            ProtocolError::ExpectedBulk { got: ':' }
        );
        assert_eq!(err(b"*1\r\n$1\r\nabc", l), ProtocolError::MissingCrlf);
        let small = Limits {
            max_inline_len: 16,
            ..l
        };
        assert_eq!(err(&[b'a'; 40], small), ProtocolError::InlineTooLong);
        assert_eq!(
            err(b"*11111111111111111111111", small),
            ProtocolError::HeaderTooLong
        );
        assert_eq!(err(b"GET \"abc\r\n", l), ProtocolError::UnbalancedQuotes);
        assert_eq!(err(b"GET \"a\"b\r\n", l), ProtocolError::UnbalancedQuotes);
        let unauth = l.unauthenticated();
        assert_eq!(
            err(b"*11\r\n", unauth),
            ProtocolError::UnauthenticatedMultibulk
        );
        assert_eq!(
            err(b"*2\r\n$4\r\nAUTH\r\n$20000\r\n", unauth),
            ProtocolError::UnauthenticatedBulk
        );
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\n"[..]);
        let mut d = CommandDecoder::default();
        assert_eq!(d.decode(&mut buf, &Limits::default()), Ok(None));
        assert!(d.in_progress());
        buf.extend_from_slice(b"k\r\n");
        let c = d
            .decode(&mut buf, &Limits::default())
            .expect("ok")
            .expect("complete");
        assert_eq!(c.args.len(), 2);
        assert!(buf.is_empty());
    }

    fn check_replies(input: &[u8], want_kinds: &[ReplyKind]) {
        let limits = Limits::backend();
        for split in 0..=input.len() {
            let mut buf = BytesMut::new();
            let mut d = ReplyDecoder::default();
            let mut got = Vec::new();
            for part in [&input[..split], &input[split..]] {
                buf.extend_from_slice(part);
                while let Some(r) = d.decode(&mut buf, &limits).expect("valid") {
                    got.push(r);
                }
            }
            assert_eq!(
                got.iter().map(|r| r.kind).collect::<Vec<_>>(),
                want_kinds,
                "split {split}"
            );
            let joined: Vec<u8> = got.iter().flat_map(|r| r.raw.to_vec()).collect();
            assert_eq!(joined, input);
        }
    }

    /// Discard mode, started at every point of a nested frame (and fed in two parts split at
    /// every byte): the frame is consumed and answered as discarded, nothing of it is kept,
    /// and the next frame decodes intact.
    #[test]
    fn a_discarded_frame_is_consumed_and_the_next_one_decodes() {
        let limits = Limits::backend();
        let big: Vec<u8> =
            b"*3\r\n$10\r\n0123456789\r\n%1\r\n+k\r\n|1\r\n+a\r\n:1\r\n:2\r\n$-1\r\n".to_vec();
        let next = b"$3\r\nabc\r\n";
        let input: Vec<u8> = big.iter().chain(next.iter()).copied().collect();
        for start in 1..big.len() {
            for split in start..=input.len() {
                let mut buf = BytesMut::new();
                let mut d = ReplyDecoder::default();
                let mut got = Vec::new();
                buf.extend_from_slice(&input[..start]);
                assert!(d.decode(&mut buf, &limits).expect("valid").is_none());
                assert!(d.in_frame(&buf));
                d.discard(&mut buf);
                for part in [&input[start..split], &input[split..]] {
                    buf.extend_from_slice(part);
                    while let Some(r) = d.decode(&mut buf, &limits).expect("valid") {
                        got.push(r);
                    }
                }
                assert_eq!(got.len(), 2, "start {start} split {split}");
                assert_eq!(got[0], ReplyDecoder::discarded());
                assert_eq!(&got[1].raw[..], next);
                assert!(buf.is_empty() && !d.in_frame(&buf));
            }
        }
    }

    #[test]
    fn replies_of_every_type() {
        use ReplyKind::*;
        check_replies(
            b"+OK\r\n-ERR x\r\n:-5\r\n$3\r\nabc\r\n$-1\r\n*-1\r\n*0\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            &[Simple, Error, Integer, Bulk, Bulk, Array, Array, Array],
        );
        check_replies(
            b"%1\r\n+a\r\n,1.5\r\n~2\r\n#t\r\n_\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n=7\r\ntxt:abc\r\n(123\r\n!3\r\nERR\r\n",
            &[Map, Set, Push, Other, Other, Error],
        );
        // An attribute prefixes the value it describes.
        check_replies(b"|1\r\n+k\r\n+v\r\n:7\r\n:8\r\n", &[Attribute, Integer]);
    }

    #[test]
    fn reply_depth_and_bad_type() {
        let l = Limits {
            max_depth: 2,
            ..Limits::backend()
        };
        let mut buf = BytesMut::from(&b"*1\r\n*1\r\n*1\r\n:1\r\n"[..]);
        assert_eq!(
            decode_reply(&mut buf, &l),
            Err(ProtocolError::TooDeep { max: 2 })
        );
        let mut buf = BytesMut::from(&b"?x\r\n"[..]);
        assert_eq!(
            decode_reply(&mut buf, &l),
            Err(ProtocolError::InvalidType { byte: b'?' })
        );
    }

    #[test]
    fn array_elements_are_raw_slices() {
        let raw = Bytes::from_static(b"*3\r\n$1\r\na\r\n*1\r\n:1\r\n$-1\r\n");
        let e = array_elements(&raw).expect("array");
        assert_eq!(e.len(), 3);
        assert_eq!(&e[1][..], b"*1\r\n:1\r\n");
        assert_eq!(&e[2][..], b"$-1\r\n");
        assert_eq!(array_elements(&Bytes::from_static(b"*2\r\n:1\r\n")), None);
        assert_eq!(array_elements(&Bytes::from_static(b":1\r\n")), None);
    }
}
