//! One attacker connection: what the proxy must answer an input (worked out with the proxy's
//! own decoder and limits), sending it in pieces, ending in one of several ways, and checking
//! what came back.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::BytesMut;
use datamesh_proxy::resp::{CommandDecoder, Limits, Reply, ReplyDecoder};

use crate::gen::{Input, Rng};

use crate::lists::IRREGULAR;

/// What the proxy must do with an input, from its own decoder under its own limits.
#[derive(Debug)]
pub struct Expect {
    /// Commands decoded before the end or the error.
    pub commands: usize,
    /// `ERR Protocol error: ...` when the input breaks the protocol.
    pub error: Option<String>,
    /// Bytes up to where the error shows (the whole input without one).
    pub error_at: usize,
    /// Every command answers exactly one reply.
    pub regular: bool,
    /// No command may be sent (see [`crate::gen::allowed`]).
    pub denied: bool,
}

fn decode_all(bytes: &[u8], limits: &Limits) -> (Vec<Vec<bytes::Bytes>>, Option<String>) {
    let mut buf = BytesMut::from(bytes);
    let mut dec = CommandDecoder::default();
    let mut cmds = Vec::new();
    loop {
        match dec.decode(&mut buf, limits) {
            Ok(Some(c)) => cmds.push(c.args),
            Ok(None) => return (cmds, None),
            Err(e) => return (cmds, Some(format!("ERR Protocol error: {e}"))),
        }
    }
}

pub fn expect(bytes: &[u8], limits: &Limits) -> Expect {
    let (cmds, mut error) = decode_all(bytes, limits);
    let mut error_at = bytes.len();
    if error.is_some() {
        // The shortest prefix that shows the error (an error in a prefix stays in longer
        // inputs: the fuzz targets check results do not depend on how input is split).
        let (mut lo, mut hi) = (0, bytes.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if decode_all(&bytes[..mid], limits).1.is_some() {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        error_at = lo;
        // What the proxy says when the input stops there (the graceful ending sends that
        // much; the error found in a prefix may be another than in the whole input). The
        // proxy's error replies stay one line: CR and LF become spaces.
        error = decode_all(&bytes[..lo], limits)
            .1
            .map(|e| e.replace(['\r', '\n'], " "));
    }
    let name = |c: &Vec<bytes::Bytes>| {
        String::from_utf8_lossy(c.first().map(|a| &a[..]).unwrap_or(b"")).to_ascii_uppercase()
    };
    Expect {
        commands: cmds.len(),
        regular: cmds.iter().all(|c| !IRREGULAR.contains(&name(c).as_str())),
        denied: cmds.iter().any(|c| !crate::gen::allowed(c)),
        error,
        error_at,
    }
}

/// How the attacker ends its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ending {
    /// Sends up to where the error shows (or everything), half-closes, reads to the end:
    /// every reply is checked.
    Graceful,
    /// Sends everything (also past an error), half-closes, reads what comes.
    Everything,
    /// Sends everything and closes at once, half the time with a reset.
    Abrupt,
}

/// What one connection saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub frames: Vec<Reply>,
    pub bytes_sent: usize,
    /// The proxy closed the connection (EOF).
    pub closed: bool,
    /// The connection was reset (by the proxy closing with unread input, or by us).
    pub reset: bool,
    /// Nothing more within the read timeout, connection still open.
    pub silent: bool,
    /// A write failed because the proxy had closed.
    pub write_failed: bool,
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// Runs one connection; the error says what was wrong (the caller prints the input).
pub fn run(
    addr: SocketAddr,
    input: &Input,
    exp: &Expect,
    ending: Ending,
    rng: &mut Rng,
) -> Result<Seen> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to the proxy {addr}"))?;
    s.set_nodelay(true)?;
    let send = match ending {
        Ending::Graceful => &input.bytes[..exp.error_at],
        _ => &input.bytes[..],
    };
    let mut seen = Seen::default();
    // In up to 5 pieces, with short pauses, so frames arrive split across reads.
    let mut cuts: Vec<usize> = (0..rng.below(5))
        .map(|_| rng.below(send.len() + 1))
        .collect();
    cuts.push(send.len());
    cuts.sort_unstable();
    let mut at = 0;
    for cut in cuts {
        if cut > at {
            if let Err(e) = s.write_all(&send[at..cut]) {
                if is_reset(&e) {
                    seen.write_failed = true;
                    break;
                }
                return Err(e).context("writing to the proxy");
            }
            seen.bytes_sent += cut - at;
            at = cut;
            if rng.chance(50) {
                std::thread::sleep(Duration::from_micros(rng.below(3000) as u64));
            }
        }
    }
    if ending == Ending::Abrupt {
        if rng.chance(50) {
            // SO_LINGER 0: close() sends a reset instead of a FIN.
            nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )
            .context("SO_LINGER 0")?;
        }
        if rng.chance(30) {
            s.set_read_timeout(Some(Duration::from_millis(1 + rng.below(20) as u64)))?;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
        }
        drop(s);
        return Ok(seen);
    }
    let _ = s.shutdown(Shutdown::Write);
    // Read until the proxy closes (or stays silent 5 s).
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                seen.closed = true;
                break;
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if is_reset(&e) => {
                seen.reset = true;
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                seen.silent = true;
                break;
            }
            Err(e) => return Err(e).context("reading from the proxy"),
        }
        ensure!(
            Instant::now() < deadline,
            "the proxy kept sending for 30 s ({} bytes)",
            raw.len()
        );
    }
    // Whatever came back is RESP, frame after frame.
    let mut rbuf = BytesMut::from(&raw[..]);
    let mut dec = ReplyDecoder::default();
    loop {
        match dec.decode(&mut rbuf, &Limits::backend()) {
            Ok(Some(r)) => seen.frames.push(r),
            Ok(None) => break,
            Err(e) => bail!(
                "the proxy sent bytes that are not RESP ({e}) after {} frames: {:?}",
                seen.frames.len(),
                String::from_utf8_lossy(&rbuf[..rbuf.len().min(200)])
            ),
        }
    }
    if seen.closed {
        ensure!(
            rbuf.is_empty(),
            "the proxy closed the connection in the middle of a reply: {:?}",
            String::from_utf8_lossy(&rbuf[..rbuf.len().min(200)])
        );
    }
    // A protocol error reply is the last thing the proxy says, and only when one is due.
    for (i, f) in seen.frames.iter().enumerate() {
        if f.error_text().starts_with(b"ERR Protocol error") {
            ensure!(
                i + 1 == seen.frames.len(),
                "the proxy answered more after a protocol error: {:?}",
                frames_text(&seen.frames)
            );
            ensure!(
                exp.error.is_some(),
                "the proxy answered a protocol error to input its decoder accepts: {:?}",
                frames_text(&seen.frames)
            );
        }
    }
    if ending == Ending::Graceful && exp.regular {
        // The proxy had no reason to close while the input (valid, or ending where the error
        // shows) was being sent.
        ensure!(
            !seen.write_failed,
            "the proxy closed the connection before the input was sent ({} of {} bytes): {:?}",
            seen.bytes_sent,
            exp.error_at,
            frames_text(&seen.frames)
        );
        check_graceful(exp, &seen)?;
    }
    Ok(seen)
}

/// Graceful ending, every command with one reply: exactly one reply per command, then the
/// protocol error if one is due, then a close.
fn check_graceful(exp: &Expect, seen: &Seen) -> Result<()> {
    if seen.reset {
        // Replies in flight may be lost with a reset; the frames we have were checked.
        return Ok(());
    }
    ensure!(
        !seen.silent,
        "the proxy neither answered everything nor closed within 5 s after the client \
         half-closed: {} commands, error {:?}, got {:?}",
        exp.commands,
        exp.error,
        frames_text(&seen.frames)
    );
    let want = exp.commands + usize::from(exp.error.is_some());
    ensure!(
        seen.frames.len() == want,
        "expected {} replies ({} commands{}), got {}: {:?}",
        want,
        exp.commands,
        if exp.error.is_some() {
            " and the protocol error"
        } else {
            ""
        },
        seen.frames.len(),
        frames_text(&seen.frames)
    );
    if let Some(msg) = &exp.error {
        let last = seen.frames.last().map(|f| &f.raw[..]).unwrap_or(b"");
        ensure!(
            last == format!("-{msg}\r\n").as_bytes(),
            "expected the last reply -{msg}, got {:?}",
            String::from_utf8_lossy(last)
        );
    }
    Ok(())
}

pub fn frames_text(frames: &[Reply]) -> Vec<String> {
    frames
        .iter()
        .map(|f| {
            let t = String::from_utf8_lossy(&f.raw);
            if t.chars().count() > 120 {
                format!("{}...", t.chars().take(120).collect::<String>())
            } else {
                t.into_owned()
            }
        })
        .collect()
}
