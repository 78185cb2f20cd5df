//! The properties the fuzz targets check (`fuzz_targets/` are one-line wrappers). The codec
//! targets are here; the session target is [`session`].
//!
//! Every input is decoded as a byte stream arriving in several ways (all at once, byte by
//! byte, in pseudo-random chunks derived from the input) under several [`Limits`] (the
//! defaults, an unauthenticated client's, tiny ones that make every limit reachable). Each
//! way must give the same commands (or replies) and the same end (incomplete or a protocol
//! error), and every frame must hold the properties the proxy relies on. A failed property
//! panics, which libFuzzer reports as a crash with the input saved under `fuzz/artifacts/`.

pub mod lists;
pub mod session;

use bytes::{Bytes, BytesMut};
use datamesh_proxy::resp::{
    array_elements, encode_command, split_args, CommandDecoder, Limits, Reply, ReplyDecoder,
    ReplyKind, Value,
};

/// Largest input fed byte by byte (the decoders rescan an incomplete line on every call, so
/// byte-by-byte feeding is quadratic in a line's length).
const BYTEWISE_MAX: usize = 512;

/// Limits small enough that inputs of a few hundred bytes reach every one of them.
pub fn tiny_limits() -> Limits {
    Limits {
        max_bulk_len: 32,
        max_array_len: 4,
        max_depth: 3,
        max_inline_len: 24,
    }
}

/// The ways the input arrives: chunk lengths, in order, covering the whole input.
fn splits(data: &[u8]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![data.len()]];
    if data.len() <= BYTEWISE_MAX {
        out.push(vec![1; data.len()]);
    }
    // Pseudo-random chunks of 1..=64 bytes, seeded by the input (so a crash reproduces).
    let mut seed = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    let mut chunks = Vec::new();
    let mut left = data.len();
    while left > 0 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = ((seed % 64) as usize + 1).min(left);
        chunks.push(n);
        left -= n;
    }
    out.push(chunks);
    out
}

/// How a stream of client bytes ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Waiting for more input, with this many bytes buffered.
    Incomplete(usize),
    /// A protocol error: the session answers it and closes.
    Error,
}

/// Decodes `data` as client commands arriving in `chunks`, the way the session's read loop
/// does, checking each command. Returns the argument lists and the end.
fn commands_in_chunks(data: &[u8], chunks: &[usize], limits: &Limits) -> (Vec<Vec<Bytes>>, End) {
    let mut buf = BytesMut::new();
    let mut dec = CommandDecoder::default();
    let mut cmds = Vec::new();
    // Stream offset of buf[0].
    let mut offset = 0usize;
    let mut fed = 0usize;
    for n in chunks {
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        loop {
            let before = buf.len();
            match dec.decode(&mut buf, limits) {
                Ok(Some(cmd)) => {
                    let used = before - buf.len();
                    assert!(offset + used <= fed, "consumed more than was fed");
                    check_command(&data[offset..offset + used], &cmd.args, &cmd.raw, limits);
                    offset += used;
                    cmds.push(cmd.args);
                }
                Ok(None) => {
                    offset += before - buf.len();
                    assert_eq!(offset + buf.len(), fed, "bytes lost while incomplete");
                    break;
                }
                // The session answers the error, drops the buffer and reads no more.
                Err(_) => return (cmds, End::Error),
            }
        }
    }
    if dec.in_progress() {
        assert!(
            !buf.is_empty(),
            "a command in progress with an empty buffer"
        );
    }
    (cmds, End::Incomplete(buf.len()))
}

/// One decoded command against the bytes its decode call consumed.
fn check_command(consumed: &[u8], args: &[Bytes], raw: &Bytes, limits: &Limits) {
    assert!(!args.is_empty(), "a command without arguments");
    assert!(
        args.len() as u64 <= limits.max_array_len,
        "{} arguments over the limit {}",
        args.len(),
        limits.max_array_len
    );
    // What is forwarded is exactly the canonical encoding of what was decoded: the backend
    // (Redis, which refuses non-canonical headers) reads the same command.
    assert_eq!(
        &raw[..],
        &encode_command(args)[..],
        "forwarded bytes are not the encoding of the arguments"
    );
    let prefix_len = if consumed.ends_with(raw) {
        // A RESP command: forwarded as the client's bytes.
        for a in args {
            assert!(
                a.len() as u64 <= limits.max_bulk_len,
                "a bulk over the limit"
            );
        }
        consumed.len() - raw.len()
    } else {
        // An inline command: its line, split as Redis splits it.
        assert_eq!(
            consumed.last(),
            Some(&b'\n'),
            "an inline command not ending a line"
        );
        let body = &consumed[..consumed.len() - 1];
        let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let mut line = &body[start..];
        assert!(
            line.len() <= limits.max_inline_len,
            "inline line over the limit"
        );
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let want = split_args(line).expect("the line of a decoded inline command splits");
        let got: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        assert_eq!(got, want, "inline arguments differ from the line's split");
        start
    };
    // Whatever was consumed before the command (blank lines, `*0`, `*-1`) is nothing.
    let mut skipped = BytesMut::from(&consumed[..prefix_len]);
    let r = CommandDecoder::default().decode(&mut skipped, limits);
    assert_eq!(r, Ok(None), "skipped bytes hold a command or an error");
    assert!(skipped.is_empty(), "skipped bytes are not all skippable");
}

/// The client-command target: no panic, the properties of [`check_command`], and the same
/// result however the input is split.
pub fn check_commands(data: &[u8]) {
    for limits in [
        Limits::default(),
        Limits::default().unauthenticated(),
        tiny_limits(),
    ] {
        let mut first: Option<(Vec<Vec<Bytes>>, End)> = None;
        for chunks in splits(data) {
            let got = commands_in_chunks(data, &chunks, &limits);
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(&got, f, "result depends on how the input is split"),
            }
        }
    }
}

/// Decodes `data` as backend replies arriving in `chunks` (as a backend connection does).
fn replies_in_chunks(data: &[u8], chunks: &[usize], limits: &Limits) -> (Vec<Reply>, End) {
    let mut buf = BytesMut::new();
    let mut dec = ReplyDecoder::default();
    let mut replies: Vec<Reply> = Vec::new();
    let mut offset = 0usize;
    let mut fed = 0usize;
    for n in chunks {
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        loop {
            match dec.decode(&mut buf, limits) {
                Ok(Some(r)) => {
                    // Replies are never skipped nor re-encoded: they tile the stream.
                    assert_eq!(
                        &r.raw[..],
                        &data[offset..offset + r.raw.len()],
                        "a reply is not the next bytes of the stream"
                    );
                    offset += r.raw.len();
                    check_reply(&r, limits);
                    replies.push(r);
                }
                Ok(None) => {
                    assert_eq!(offset + buf.len(), fed, "bytes lost while incomplete");
                    break;
                }
                Err(_) => return (replies, End::Error),
            }
        }
    }
    (replies, End::Incomplete(buf.len()))
}

fn check_reply(r: &Reply, limits: &Limits) {
    let first = r.raw.first().copied().expect("an empty reply");
    assert_eq!(
        r.kind,
        kind_of(first),
        "reply kind differs from its type byte"
    );
    assert!(r.raw.ends_with(b"\r\n"), "a reply not ending in CRLF");
    // One frame: decoded alone it is the same frame, with nothing left.
    let mut alone = BytesMut::from(&r.raw[..]);
    let again = ReplyDecoder::default()
        .decode(&mut alone, limits)
        .expect("a decoded reply decodes again");
    assert_eq!(again.as_ref(), Some(r), "a reply decoded alone differs");
    assert!(alone.is_empty(), "a reply decoded alone leaves bytes");
    // The helpers the proxy calls on replies never panic.
    let _ = r.error_text();
    let _ = r.integer();
    let _ = r.is_ok();
    // The control plane parses frames into values (with redis-protocol).
    let _ = Value::parse(&r.raw);
    // Merges split arrays into their elements' raw frames.
    if let Some(elems) = array_elements(&r.raw) {
        let header = r.raw.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
        let joined: Vec<u8> = elems.iter().flat_map(|e| e.to_vec()).collect();
        assert_eq!(
            &joined[..],
            &r.raw[header..],
            "array elements do not tile the array"
        );
    }
}

fn kind_of(b: u8) -> ReplyKind {
    match b {
        b'+' => ReplyKind::Simple,
        b'-' | b'!' => ReplyKind::Error,
        b':' => ReplyKind::Integer,
        b'$' => ReplyKind::Bulk,
        b'*' => ReplyKind::Array,
        b'>' => ReplyKind::Push,
        b'%' => ReplyKind::Map,
        b'~' => ReplyKind::Set,
        b'|' => ReplyKind::Attribute,
        _ => ReplyKind::Other,
    }
}

/// The backend-reply target: no panic, the properties of [`check_reply`], the same result
/// however the input is split.
pub fn check_replies(data: &[u8]) {
    for limits in [Limits::backend(), Limits::control(), tiny_limits()] {
        let mut first: Option<(Vec<Reply>, End)> = None;
        for chunks in splits(data) {
            let got = replies_in_chunks(data, &chunks, &limits);
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(&got, f, "result depends on how the input is split"),
            }
        }
    }
}
