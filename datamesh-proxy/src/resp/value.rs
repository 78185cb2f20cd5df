//! What the codec produces and what the proxy builds: [`Command`] (a client's bytes and
//! arguments), [`Reply`] (a backend's bytes and their type), [`Value`] (a parsed or built
//! frame), and the encoding helpers.

use bytes::{BufMut, Bytes, BytesMut};

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

    /// Argument `i`, or empty.
    pub fn arg(&self, i: usize) -> &[u8] {
        self.args.get(i).map(|a| &a[..]).unwrap_or(b"")
    }

    /// True when argument `i` is `word`, ASCII case-insensitively (subcommands, options);
    /// compares in place, without allocating.
    pub fn arg_is(&self, i: usize, word: &str) -> bool {
        self.args
            .get(i)
            .is_some_and(|a| a.eq_ignore_ascii_case(word.as_bytes()))
    }
}

/// A signed decimal integer of a RESP header (at most 20 bytes, no overflow).
pub(crate) fn parse_int(s: &[u8]) -> Option<i64> {
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
    pub(crate) fn of(b: u8) -> Self {
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

/// A RESP value, parsed from a frame or built for one. The one value type of the crate: local
/// answers are built from it, and the control plane and merges parse replies into it.
/// RESP3-only types are encoded as Redis downgrades them for RESP2 clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(Bytes),
    Error(Bytes),
    Int(i64),
    Bulk(Bytes),
    Null,
    Bool(bool),
    Double(f64),
    /// A RESP3 big number, as its decimal digits.
    BigNumber(Bytes),
    /// A RESP3 verbatim string: its text (the `txt:` format prefix removed).
    Verbatim(Bytes),
    Array(Vec<Value>),
    /// A map: `%` in RESP3, a flat array in RESP2.
    Map(Vec<(Value, Value)>),
    /// A set: `~` in RESP3, an array in RESP2.
    Set(Vec<Value>),
    /// A push: `>` in RESP3, an array in RESP2.
    Push(Vec<Value>),
}

impl Value {
    pub fn bulk(s: impl AsRef<[u8]>) -> Self {
        Self::Bulk(Bytes::copy_from_slice(s.as_ref()))
    }

    pub fn encode(&self, proto: u8, out: &mut BytesMut) {
        let resp3 = proto >= 3;
        match self {
            Value::Simple(s) => {
                out.put_u8(b'+');
                out.put_slice(s);
                out.put_slice(b"\r\n");
            }
            Value::Error(s) => {
                out.put_u8(b'-');
                out.put_slice(s);
                out.put_slice(b"\r\n");
            }
            Value::Int(n) => put_header(out, b':', *n),
            Value::Bulk(b) | Value::Verbatim(b) => put_bulk(out, b),
            Value::Null => out.put_slice(if resp3 { b"_\r\n" } else { b"$-1\r\n" }),
            Value::Bool(b) if resp3 => out.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Value::Bool(b) => put_header(out, b':', i64::from(*b)),
            Value::Double(d) => {
                let text = d.to_string();
                if resp3 {
                    out.put_u8(b',');
                    out.put_slice(text.as_bytes());
                    out.put_slice(b"\r\n");
                } else {
                    put_bulk(out, text.as_bytes());
                }
            }
            Value::BigNumber(n) if resp3 => {
                out.put_u8(b'(');
                out.put_slice(n);
                out.put_slice(b"\r\n");
            }
            Value::BigNumber(n) => put_bulk(out, n),
            Value::Array(v) => {
                put_header(out, b'*', v.len() as i64);
                v.iter().for_each(|e| e.encode(proto, out));
            }
            Value::Set(v) => {
                put_header(out, if resp3 { b'~' } else { b'*' }, v.len() as i64);
                v.iter().for_each(|e| e.encode(proto, out));
            }
            Value::Push(v) => {
                put_header(out, if resp3 { b'>' } else { b'*' }, v.len() as i64);
                v.iter().for_each(|e| e.encode(proto, out));
            }
            Value::Map(kv) => {
                if resp3 {
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

    /// Parses one complete frame (as framed by [`super::ReplyDecoder`], so its size was
    /// already checked against limits) with `redis-protocol`. RESP2 nulls (`$-1`, `*-1`)
    /// become [`Value::Null`]; attributes are dropped. `None` when `raw` is not one frame.
    pub fn parse(raw: &Bytes) -> Option<Value> {
        use redis_protocol::resp2::types::BytesFrame as F2;
        use redis_protocol::resp3::types::BytesFrame as F3;
        fn from2(f: F2) -> Value {
            match f {
                F2::SimpleString(s) => Value::Simple(s),
                F2::Error(e) => Value::Error(Bytes::copy_from_slice(e.as_bytes())),
                F2::Integer(n) => Value::Int(n),
                F2::BulkString(b) => Value::Bulk(b),
                F2::Array(v) => Value::Array(v.into_iter().map(from2).collect()),
                F2::Null => Value::Null,
            }
        }
        fn from3(f: F3) -> Value {
            match f {
                F3::BlobString { data, .. } => Value::Bulk(data),
                F3::BlobError { data, .. } => Value::Error(data),
                F3::SimpleString { data, .. } => Value::Simple(data),
                F3::SimpleError { data, .. } => {
                    Value::Error(Bytes::copy_from_slice(data.as_bytes()))
                }
                F3::Boolean { data, .. } => Value::Bool(data),
                F3::Null => Value::Null,
                F3::Number { data, .. } => Value::Int(data),
                F3::Double { data, .. } => Value::Double(data),
                F3::BigNumber { data, .. } => Value::BigNumber(data),
                F3::VerbatimString { data, .. } => Value::Verbatim(data),
                F3::Array { data, .. } => Value::Array(data.into_iter().map(from3).collect()),
                F3::Map { data, .. } => Value::Map(
                    data.into_iter()
                        .map(|(k, v)| (from3(k), from3(v)))
                        .collect(),
                ),
                F3::Set { data, .. } => Value::Set(data.into_iter().map(from3).collect()),
                F3::Push { data, .. } => Value::Push(data.into_iter().map(from3).collect()),
                F3::Hello { .. } | F3::ChunkedString(_) => Value::Null,
            }
        }
        // RESP2 first (its `$-1`/`*-1` nulls are not RESP3); a RESP2-looking aggregate that
        // holds RESP3 types (a RESP3 connection's array of maps) needs the RESP3 decoder.
        if let Ok(Some((f, used))) = redis_protocol::resp2::decode::decode_bytes(raw) {
            if used == raw.len() {
                return Some(from2(f));
            }
        }
        let (f, used) = redis_protocol::resp3::decode::complete::decode_bytes(raw).ok()??;
        (used == raw.len()).then(|| from3(f))
    }

    /// The text of simple, bulk and verbatim strings (UTF-8 only).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Simple(s) | Value::Bulk(s) | Value::Verbatim(s) => std::str::from_utf8(s).ok(),
            _ => None,
        }
    }

    /// The bytes of string-like values (simple, bulk, verbatim, error).
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Simple(s) | Value::Bulk(s) | Value::Verbatim(s) | Value::Error(s) => Some(s),
            _ => None,
        }
    }

    /// Integers, and strings holding one (Sentinel replies send ports as strings).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            other => other.as_str()?.parse().ok(),
        }
    }

    /// The elements of arrays, sets and pushes.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) | Value::Push(a) | Value::Set(a) => Some(a),
            _ => None,
        }
    }

    /// `name`'s value in a RESP2 flat `[k1, v1, k2, v2, ...]` array or a RESP3 map.
    pub fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Map(kv) => kv
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v),
            Value::Array(a) => a
                .chunks(2)
                .find(|kv| kv.len() == 2 && kv[0].as_str() == Some(name))
                .map(|kv| &kv[1]),
            _ => None,
        }
    }

    /// The text of an error value.
    pub fn error_text(&self) -> Option<&[u8]> {
        match self {
            Value::Error(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{decode_reply, Limits};

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
        let f = Value::parse(&Bytes::from_static(b"*2\r\n$1\r\na\r\n$-1\r\n")).expect("parses");
        let items = f.as_array().expect("array");
        assert_eq!(items[0].as_bytes(), Some(&b"a"[..]));
        assert_eq!(items[1], Value::Null);
        let m = Value::Map(vec![(Value::bulk("proto"), Value::Int(3))]);
        assert_eq!(
            &m.clone().into_reply(3).raw[..],
            b"%1\r\n$5\r\nproto\r\n:3\r\n"
        );
        assert_eq!(&m.into_reply(2).raw[..], b"*2\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(&Reply::error("ERR a\r\nb").raw[..], b"-ERR a  b\r\n");
    }

    #[test]
    fn values_parse_and_encode_per_protocol() {
        let raw = Bytes::from_static(b"%2\r\n+a\r\n#t\r\n$1\r\nb\r\n~1\r\n:7\r\n");
        let v = Value::parse(&raw).expect("parses");
        assert_eq!(v.field("a"), Some(&Value::Bool(true)));
        assert_eq!(
            v.field("b").and_then(Value::as_array),
            Some(&[Value::Int(7)][..])
        );
        let mut out = BytesMut::new();
        Value::Set(vec![Value::Bool(true), Value::Null]).encode(2, &mut out);
        assert_eq!(&out[..], b"*2\r\n:1\r\n$-1\r\n");
        assert_eq!(Value::parse(&Bytes::from_static(b"+OK\r\n+x\r\n")), None);
        assert_eq!(
            Value::parse(&Bytes::from_static(b"*2\r\n$2\r\n10\r\n:3\r\n")).and_then(|v| v
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_int).sum::<i64>())),
            Some(13)
        );
    }
}
