//! Inputs the fuzz targets (`fuzz/`) found, kept as unit tests of the codec.

use bytes::BytesMut;

use super::{decode_command, decode_reply, CommandDecoder, Limits, ProtocolError, ReplyDecoder};

fn command_error(input: &[u8]) -> Option<ProtocolError> {
    let mut buf = BytesMut::from(input);
    let mut d = CommandDecoder::default();
    loop {
        match d.decode(&mut buf, &Limits::default()) {
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

// Headers Redis refuses (`string2ll`: a `+`, a leading zero, `-0`) are refused with Redis's
// message: the command is forwarded as the client's bytes, and the backend would answer a
// protocol error and close a pooled connection other clients share.
#[test]
fn non_canonical_header_lengths_are_refused_like_redis() {
    for input in [
        &b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n"[..],
        b"*2\r\n$3\r\nGET\r\n$+1\r\nk\r\n",
        b"*2\r\n$4\r\nECHO\r\n$-0\r\n\r\n",
        b"*2\r\n$4\r\nECHO\r\n$00\r\n\r\n",
    ] {
        assert_eq!(
            command_error(input),
            Some(ProtocolError::InvalidBulkLength),
            "{input:?}"
        );
    }
    for input in [
        &b"*02\r\n$3\r\nGET\r\n$1\r\nk\r\n"[..],
        b"*+1\r\n$4\r\nPING\r\n",
        b"*-0\r\n",
        b"*00\r\n",
    ] {
        assert_eq!(
            command_error(input),
            Some(ProtocolError::InvalidMultibulkLength),
            "{input:?}"
        );
    }
    // What Redis accepts still works: `*0`, `*-1` (skipped), `$0`.
    let mut buf = BytesMut::from(&b"*0\r\n*-1\r\n*2\r\n$4\r\nECHO\r\n$0\r\n\r\n"[..]);
    let c = decode_command(&mut buf, &Limits::default())
        .expect("valid")
        .expect("complete");
    assert_eq!(c.args.len(), 2);
    assert!(c.args[1].is_empty());
}

// A reply header announcing a body of a terabyte is not taken at its word: the decoder waits
// for the body without reserving it (it aborted the process with a failed allocation).
#[test]
fn a_huge_reply_length_reserves_little() {
    for input in [&b"$999999999999\r\n"[..], b"$9223372036854775807\r\n"] {
        let mut buf = BytesMut::from(input);
        assert_eq!(decode_reply(&mut buf, &Limits::backend()), Ok(None));
        assert!(buf.capacity() <= 65 * 1024 * 1024, "{}", buf.capacity());
    }
}

// A line longer than `max_inline_len` is refused whether its CRLF arrived in the same read or
// not (it was accepted when the whole line came at once).
#[test]
fn a_long_line_is_refused_however_it_arrives() {
    let limits = Limits {
        max_inline_len: 24,
        ..Limits::backend()
    };
    let line = b"-MOVED 3999 127.0.0.1:6381\r\n";
    let mut whole = BytesMut::from(&line[..]);
    assert_eq!(
        ReplyDecoder::default().decode(&mut whole, &limits),
        Err(ProtocolError::HeaderTooLong)
    );
    let mut d = ReplyDecoder::default();
    let mut buf = BytesMut::new();
    let mut result = Ok(None);
    for b in line {
        buf.extend_from_slice(&[*b]);
        result = d.decode(&mut buf, &limits);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(ProtocolError::HeaderTooLong));
}
