//! The RESP codec, sans-IO: framing of client commands (RESP arrays of bulk strings, or inline
//! commands) and of backend replies (every RESP2 and RESP3 type), with configured limits that
//! are checked on each header as soon as it is seen (a `$999999999999` header fails before a
//! single byte of its body is buffered).
//!
//! The decoders only find frame boundaries; the bytes are forwarded as the peer sent them
//! (`raw`), never re-encoded, except inline commands, which become RESP arrays. Where the proxy
//! must look inside a reply (pub/sub, merges, topology answers) [`parse_reply`] does a full parse
//! with the `redis-protocol` crate.
//!
//! Incomplete input is `Ok(None)` ("read more"), never an error. The decoders keep their scan
//! position between calls, so a large frame arriving in many reads is scanned once.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Decoding limits (Redis's defaults where Redis has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Longest bulk string (Redis `proto-max-bulk-len`, 512 MiB).
    pub max_bulk_len: u64,
    /// Most elements in one array.
    pub max_array_len: u64,
    /// Deepest nesting of aggregates (replies; commands are flat).
    pub max_depth: usize,
    /// Longest inline command, and longest header line (Redis: 64 KiB).
    pub max_inline_len: usize,
}

pub const DEFAULT_MAX_BULK_LEN: u64 = 512 * 1024 * 1024;
pub const DEFAULT_MAX_ARRAY_LEN: u64 = 1_048_576;
pub const DEFAULT_MAX_DEPTH: usize = 32;
pub const DEFAULT_MAX_INLINE_LEN: usize = 64 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bulk_len: DEFAULT_MAX_BULK_LEN,
            max_array_len: DEFAULT_MAX_ARRAY_LEN,
            max_depth: DEFAULT_MAX_DEPTH,
            max_inline_len: DEFAULT_MAX_INLINE_LEN,
        }
    }
}

impl Limits {
    /// Limits for replies of our own backends: trusted, and a legitimate reply can be far
    /// larger than any command (LRANGE of millions of elements), so only framing sanity stays.
    pub fn backend() -> Self {
        Self {
            max_bulk_len: i64::MAX as u64,
            max_array_len: i64::MAX as u64,
            max_depth: 128,
            max_inline_len: 64 * 1024 * 1024,
        }
    }

    /// What Redis allows a client that has not authenticated yet (it refuses larger headers
    /// so an unauthenticated peer cannot make the server buffer much).
    pub fn unauthenticated(self) -> Self {
        Self {
            max_bulk_len: self.max_bulk_len.min(16 * 1024),
            max_array_len: self.max_array_len.min(10),
            ..self
        }
    }
}

/// Why the input is not RESP. Messages follow Redis's wording where Redis has one (they are
/// sent to the client as `-ERR Protocol error: <message>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("invalid multibulk length {len} (limit {max})")]
    MultibulkTooLong { len: i64, max: u64 },
    #[error("invalid bulk length")]
    InvalidBulkLength,
    #[error("invalid bulk length {len} (limit {max})")]
    BulkTooLong { len: i64, max: u64 },
    #[error("expected '$', got '{got}'")]
    ExpectedBulk { got: char },
    #[error("too big mbulk count string")]
    HeaderTooLong,
    #[error("too big inline request")]
    InlineTooLong,
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("expected CRLF after bulk data")]
    MissingCrlf,
    #[error("nesting deeper than {max}")]
    TooDeep { max: usize },
    #[error("invalid reply type byte 0x{byte:02x}")]
    InvalidType { byte: u8 },
    #[error("invalid integer in a header")]
    InvalidInteger,
    #[error("unauthenticated multibulk length")]
    UnauthenticatedMultibulk,
    #[error("unauthenticated bulk length")]
    UnauthenticatedBulk,
}

/// A client command: its original bytes and its arguments (slices of those bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// What is forwarded: the client's bytes (inline commands re-encoded as a RESP array).
    pub raw: Bytes,
    /// Argument 0 is the command name.
    pub args: Vec<Bytes>,
}

impl Command {
    /// Builds a command from arguments (for commands the proxy itself sends).
    pub fn from_args<I, A>(args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<Bytes>,
    {
        let args: Vec<Bytes> = args.into_iter().map(Into::into).collect();
        Self {
            raw: encode_command(&args),
            args,
        }
    }

    pub fn name(&self) -> &[u8] {
        self.args.first().map(|a| &a[..]).unwrap_or(b"")
    }

    /// Argument `i` upper-cased as a string (for subcommands and options), or "".
    pub fn arg_upper(&self, i: usize) -> String {
        self.args
            .get(i)
            .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
            .unwrap_or_default()
    }
}

/// Encodes arguments as a RESP array of bulk strings.
pub fn encode_command(args: &[Bytes]) -> Bytes {
    let len: usize = args.iter().map(|a| a.len() + 16).sum::<usize>() + 16;
    let mut out = BytesMut::with_capacity(len);
    put_header(&mut out, b'*', args.len() as i64);
    for a in args {
        put_bulk(&mut out, a);
    }
    out.freeze()
}

pub fn put_header(out: &mut BytesMut, kind: u8, n: i64) {
    out.put_u8(kind);
    put_int(out, n);
    out.put_slice(b"\r\n");
}

/// Writes the decimal digits of `n` without allocating (this runs once per forwarded frame).
fn put_int(out: &mut BytesMut, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.put_u8(b'-');
    }
    out.put_slice(&digits[i..]);
}

pub fn put_bulk(out: &mut BytesMut, data: &[u8]) {
    put_header(out, b'$', data.len() as i64);
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Finds `\r\n` at or after `from`; `Ok(None)` when not there yet, an error when the line is
/// already longer than `max`.
fn find_crlf(buf: &[u8], from: usize, max: usize) -> Result<Option<usize>, ProtocolError> {
    let hay = &buf[from.min(buf.len())..];
    match hay.iter().position(|b| *b == b'\r') {
        Some(i) if from + i + 1 < buf.len() => {
            if buf[from + i + 1] == b'\n' {
                Ok(Some(from + i))
            } else {
                // A bare CR inside a header line is never valid RESP.
                Err(ProtocolError::InvalidInteger)
            }
        }
        Some(i) if i > max => Err(ProtocolError::HeaderTooLong),
        Some(_) => Ok(None),
        None if hay.len() > max => Err(ProtocolError::HeaderTooLong),
        None => Ok(None),
    }
}

fn parse_int(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let (neg, digits) = match s[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as i64)?;
    }
    Some(if neg { -v } else { v })
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
                let n = parse_int(&buf[1..end]).ok_or(ProtocolError::InvalidMultibulkLength)?;
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
                    parse_int(&buf[self.pos + 1..end]).ok_or(ProtocolError::InvalidBulkLength)?;
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
#[allow(dead_code)]
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
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
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
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
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

/// The type of a reply, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Error,
    Integer,
    Bulk,
    Array,
    Push,
    Map,
    Set,
    Attribute,
    /// Null, double, boolean, big number, verbatim string.
    Other,
}

impl ReplyKind {
    fn of(b: u8) -> Self {
        match b {
            b'+' => Self::Simple,
            b'-' | b'!' => Self::Error,
            b':' => Self::Integer,
            b'$' => Self::Bulk,
            b'*' => Self::Array,
            b'>' => Self::Push,
            b'%' => Self::Map,
            b'~' => Self::Set,
            b'|' => Self::Attribute,
            _ => Self::Other,
        }
    }
}

/// A complete reply from a backend, as the backend sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub raw: Bytes,
    pub kind: ReplyKind,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.kind == ReplyKind::Error
    }

    /// The text of an error reply (without the `-` and CRLF), or empty.
    pub fn error_text(&self) -> &[u8] {
        if self.kind != ReplyKind::Error || self.raw.len() < 3 {
            return b"";
        }
        if self.raw[0] == b'-' {
            &self.raw[1..self.raw.len() - 2]
        } else {
            // Blob error: `!<len>\r\n<text>\r\n`.
            match self.raw.iter().position(|b| *b == b'\n') {
                Some(i) if i < self.raw.len() - 2 => &self.raw[i + 1..self.raw.len() - 2],
                _ => b"",
            }
        }
    }

    /// The value of an integer reply.
    pub fn integer(&self) -> Option<i64> {
        if self.kind != ReplyKind::Integer || self.raw.len() < 4 {
            return None;
        }
        parse_int(&self.raw[1..self.raw.len() - 2])
    }

    /// True for `+OK`.
    pub fn is_ok(&self) -> bool {
        &self.raw[..] == b"+OK\r\n"
    }

    pub fn simple(s: &str) -> Self {
        let mut b = BytesMut::with_capacity(s.len() + 3);
        b.put_u8(b'+');
        b.put_slice(s.as_bytes());
        b.put_slice(b"\r\n");
        Self {
            raw: b.freeze(),
            kind: ReplyKind::Simple,
        }
    }

    /// An error reply; CR and LF in `s` are replaced so the frame stays one line.
    pub fn error(s: &str) -> Self {
        let mut b = BytesMut::with_capacity(s.len() + 3);
        b.put_u8(b'-');
        for c in s.bytes() {
            b.put_u8(if c == b'\r' || c == b'\n' { b' ' } else { c });
        }
        b.put_slice(b"\r\n");
        Self {
            raw: b.freeze(),
            kind: ReplyKind::Error,
        }
    }

    pub fn integer_reply(n: i64) -> Self {
        let mut b = BytesMut::with_capacity(24);
        put_header(&mut b, b':', n);
        Self {
            raw: b.freeze(),
            kind: ReplyKind::Integer,
        }
    }

    pub fn bulk(data: &[u8]) -> Self {
        let mut b = BytesMut::with_capacity(data.len() + 16);
        put_bulk(&mut b, data);
        Self {
            raw: b.freeze(),
            kind: ReplyKind::Bulk,
        }
    }

    /// The null reply of the protocol version (`$-1` for RESP2, `_` for RESP3).
    pub fn null(proto: u8) -> Self {
        Self {
            raw: Bytes::from_static(if proto >= 3 { b"_\r\n" } else { b"$-1\r\n" }),
            kind: if proto >= 3 {
                ReplyKind::Other
            } else {
                ReplyKind::Bulk
            },
        }
    }

    pub fn ok() -> Self {
        Self {
            raw: Bytes::from_static(b"+OK\r\n"),
            kind: ReplyKind::Simple,
        }
    }
}

/// Builds a RESP value (for replies the proxy makes itself).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Bulk(Bytes),
    Null,
    Array(Vec<Value>),
    /// A map: `%` in RESP3, a flat array in RESP2.
    Map(Vec<(Value, Value)>),
    /// A push: `>` in RESP3, an array in RESP2.
    Push(Vec<Value>),
}

impl Value {
    pub fn bulk(s: impl AsRef<[u8]>) -> Self {
        Self::Bulk(Bytes::copy_from_slice(s.as_ref()))
    }

    pub fn encode(&self, proto: u8, out: &mut BytesMut) {
        match self {
            Value::Int(n) => put_header(out, b':', *n),
            Value::Bulk(b) => put_bulk(out, b),
            Value::Null => out.put_slice(if proto >= 3 { b"_\r\n" } else { b"$-1\r\n" }),
            Value::Array(v) => {
                put_header(out, b'*', v.len() as i64);
                v.iter().for_each(|e| e.encode(proto, out));
            }
            Value::Push(v) => {
                put_header(out, if proto >= 3 { b'>' } else { b'*' }, v.len() as i64);
                v.iter().for_each(|e| e.encode(proto, out));
            }
            Value::Map(kv) => {
                if proto >= 3 {
                    put_header(out, b'%', kv.len() as i64);
                } else {
                    put_header(out, b'*', 2 * kv.len() as i64);
                }
                for (k, v) in kv {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
        }
    }

    pub fn into_reply(self, proto: u8) -> Reply {
        let mut b = BytesMut::new();
        self.encode(proto, &mut b);
        let raw = b.freeze();
        let kind = ReplyKind::of(raw.first().copied().unwrap_or(b'+'));
        Reply { raw, kind }
    }
}

/// Resumable decoder of backend replies (any RESP2/RESP3 frame, nested).
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    pos: usize,
    /// Elements still expected per open aggregate; `true` marks an attribute (a prefix that
    /// does not count as an element of its parent).
    stack: Vec<(u64, bool)>,
}

impl ReplyDecoder {
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Reply>, ProtocolError> {
        loop {
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
                        if buf.len() < stop + 2 {
                            buf.reserve(stop + 2 - buf.len());
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
#[allow(dead_code)]
pub fn decode_reply(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Reply>, ProtocolError> {
    ReplyDecoder::default().decode(buf, limits)
}

/// A fully parsed reply, for the few places that look inside one.
pub type Frame = redis_protocol::resp3::types::BytesFrame;

/// Full parse of a complete reply. RESP2 nulls (`$-1`, `*-1`) become `Null`.
pub fn parse_reply(raw: &Bytes) -> Option<Frame> {
    use redis_protocol::resp2::types::BytesFrame as F2;
    use redis_protocol::resp3::types::BytesFrame as F3;
    match raw.first() {
        Some(b'+' | b'-' | b':' | b'$' | b'*') => {
            let (f, _) = redis_protocol::resp2::decode::decode_bytes(raw).ok()??;
            fn conv(f: F2) -> F3 {
                match f {
                    F2::SimpleString(data) => F3::SimpleString {
                        data,
                        attributes: None,
                    },
                    F2::Error(data) => F3::SimpleError {
                        data,
                        attributes: None,
                    },
                    F2::Integer(data) => F3::Number {
                        data,
                        attributes: None,
                    },
                    F2::BulkString(data) => F3::BlobString {
                        data,
                        attributes: None,
                    },
                    F2::Array(v) => F3::Array {
                        data: v.into_iter().map(conv).collect(),
                        attributes: None,
                    },
                    F2::Null => F3::Null,
                }
            }
            Some(conv(f))
        }
        Some(_) => redis_protocol::resp3::decode::complete::decode_bytes(raw)
            .ok()?
            .map(|(f, _)| f),
        None => None,
    }
}

/// The bytes of a string-like frame (simple, blob, verbatim, error).
pub fn frame_bytes(f: &Frame) -> Option<&[u8]> {
    use redis_protocol::resp3::types::BytesFrame as F;
    match f {
        F::SimpleString { data, .. }
        | F::BlobString { data, .. }
        | F::VerbatimString { data, .. } => Some(&data[..]),
        F::SimpleError { data, .. } => Some(data.as_bytes()),
        F::BlobError { data, .. } => Some(&data[..]),
        _ => None,
    }
}

/// The elements of an array/push/set frame.
pub fn frame_items(f: &Frame) -> Option<Vec<&Frame>> {
    match f {
        Frame::Array { data, .. } | Frame::Push { data, .. } => Some(data.iter().collect()),
        Frame::Set { data, .. } => Some(data.iter().collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn reply_helpers() {
        let mut buf = BytesMut::from(&b":42\r\n-MOVED 1 127.0.0.1:7000\r\n"[..]);
        let l = Limits::backend();
        assert_eq!(
            decode_reply(&mut buf, &l)
                .expect("ok")
                .expect("reply")
                .integer(),
            Some(42)
        );
        let e = decode_reply(&mut buf, &l).expect("ok").expect("reply");
        assert_eq!(e.error_text(), b"MOVED 1 127.0.0.1:7000");
        let f = parse_reply(&Bytes::from_static(b"*2\r\n$1\r\na\r\n$-1\r\n")).expect("parses");
        let items = frame_items(&f).expect("array");
        assert_eq!(frame_bytes(items[0]), Some(&b"a"[..]));
        assert_eq!(items[1], &Frame::Null);
        let m = Value::Map(vec![(Value::bulk("proto"), Value::Int(3))]);
        assert_eq!(
            &m.clone().into_reply(3).raw[..],
            b"%1\r\n$5\r\nproto\r\n:3\r\n"
        );
        assert_eq!(&m.into_reply(2).raw[..], b"*2\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(&Reply::error("ERR a\r\nb").raw[..], b"-ERR a  b\r\n");
    }
}
