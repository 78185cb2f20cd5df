//! Bad input from clients, over raw sockets: malformed RESP, oversized bulk and array headers,
//! nesting deeper than the limit, an over-long inline command, random garbage. Each gets an
//! error reply or a close (never a hang), the proxy stays up, and a client working next to
//! them all along is not disturbed. A half-closed client still gets every reply.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::proxy::{assert_alive, bulk, simple, Outcome, RespConn};
use datamesh_tests::resp::{self, Reply};
use datamesh_tests::Env;

use crate::common::{proxy_addr, Bystander};

/// What a bad input produced.
#[derive(Debug, Default)]
struct Seen {
    errors: Vec<String>,
    others: Vec<Reply>,
    closed: bool,
}

/// Sends `bytes` on a fresh connection and collects replies until the proxy closes the
/// connection or stays silent for 3 s.
fn send_bad(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<Seen> {
    let mut c = RespConn::connect(addr)?;
    // A proxy that closes early may reset the connection under our write: that is a close.
    let _ = c.send_raw(bytes);
    let mut seen = Seen::default();
    loop {
        match c.read_outcome(Duration::from_secs(3)) {
            Ok(Outcome::Reply(Reply::Error(e))) => seen.errors.push(e),
            Ok(Outcome::Reply(r)) => seen.others.push(r),
            Ok(Outcome::Closed) => {
                seen.closed = true;
                return Ok(seen);
            }
            Ok(Outcome::Silent) => return Ok(seen),
            // An unparsable reply would be a proxy bug; report it as such.
            Err(e) => bail!("reading the proxy's answer to bad input failed: {e:#}"),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
fn garbage(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.push((seed >> 24) as u8);
    }
    v
}

#[test]
fn bad_input_gets_an_error_or_a_close_and_others_are_unaffected() {
    run_test(Env::builder(), |env| {
        let proxy = proxy_addr(env)?;
        let bystander = Bystander::start(proxy, "badinput")?;
        let deep: Vec<u8> = b"*1\r\n"
            .repeat(100)
            .into_iter()
            .chain(b"$4\r\nPING\r\n".iter().copied())
            .collect();
        let mut long_inline = vec![b'a'; 128 * 1024];
        long_inline.extend_from_slice(b"\r\n");
        let mut garbage_line = garbage(4096, 0x9e37_79b9_7f4a_7c15);
        garbage_line.extend_from_slice(b"\r\n");
        // (name, bytes, must_be_protocol_error)
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("malformed bulk header", b"*1\r\n$x\r\n".to_vec(), true),
            (
                "oversized bulk header",
                b"*1\r\n$999999999999\r\n".to_vec(),
                true,
            ),
            (
                "oversized bulk header at top level",
                b"$999999999999\r\n".to_vec(),
                false,
            ),
            ("oversized array header", b"*99999999999\r\n".to_vec(), true),
            ("negative bulk length", b"*1\r\n$-5\r\n".to_vec(), true),
            (
                "integer inside a command",
                b"*2\r\n$3\r\nGET\r\n:5\r\n".to_vec(),
                true,
            ),
            ("nesting deeper than the limit", deep, true),
            (
                "inline command longer than max_inline_len",
                long_inline,
                true,
            ),
            ("random garbage bytes", garbage_line, false),
        ];
        let mut report = Vec::new();
        for (name, bytes, protocol) in &cases {
            let seen = send_bad(proxy, bytes)?;
            report.push(format!("{name}: {seen:?}"));
            ensure!(
                !seen.errors.is_empty() || seen.closed,
                "{name}: no error reply and no close within 3 s (the proxy waits for more input): {seen:?}"
            );
            if *protocol {
                ensure!(
                    seen.errors.iter().any(|e| e.starts_with("ERR Protocol error")) || (seen.closed && seen.errors.is_empty()),
                    "{name}: expected -ERR Protocol error (then a close) or a plain close, got {seen:?}"
                );
                ensure!(
                    seen.closed,
                    "{name}: the connection stayed open after a protocol error: {seen:?}"
                );
                ensure!(
                    seen.others.is_empty(),
                    "{name}: the bad input was executed: {seen:?}"
                );
            }
            assert_alive(proxy)?;
            bystander.wait_progress(3)?;
        }
        eprintln!("bad input:\n  {}", report.join("\n  "));
        let n = bystander.finish()?;
        eprintln!("the bystander made {n} round trips meanwhile, all correct");
        Ok(())
    });
}

#[test]
fn half_closed_client_still_gets_every_reply() {
    run_test(Env::builder(), |env| {
        let proxy = proxy_addr(env)?;
        for n in [100usize, 10_000] {
            let mut c = RespConn::connect(proxy)?;
            let mut batch = Vec::new();
            for i in 0..n {
                let k = format!("half:{i}");
                let v = format!("v{i}");
                batch.extend_from_slice(&resp::encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
                batch.extend_from_slice(&resp::encode(&[b"GET", k.as_bytes()]));
            }
            c.send_raw(&batch)?;
            c.shutdown_write()?;
            for i in 0..n {
                let r = c.read()?;
                ensure!(
                    r == simple("OK"),
                    "half-closed client, SET {i} of {n}: {r:?}"
                );
                let r = c.read()?;
                ensure!(
                    r == bulk(&format!("v{i}")),
                    "half-closed client, GET {i} of {n}: {r:?}"
                );
            }
            ensure!(
                c.closed_within(Duration::from_secs(5))?,
                "after the last reply to a half-closed client the proxy did not close"
            );
        }
        assert_alive(proxy)
    });
}
