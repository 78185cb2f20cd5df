//! Session-level fuzzing of the RESP proxy: the agent in front of a real redis-server, several
//! attacker connections sending seeds of the checked-in corpus (`fuzz/corpus/commands/`),
//! mutations of them, generated pipelines and random bytes (split across writes, cut
//! mid-frame, closed abruptly or with a reset), while a bystander client checks every reply it
//! gets. The agent must stay up and ready, every attacker connection must get RESP replies (an
//! error then a close for a protocol error, exactly one reply per command where that can be
//! known), the bystander must see no error and no wrong reply, and every attacker's session
//! must be gone afterwards (the open-connections gauge is back to where it was).
//!
//! Runs 20 s by default; `DATAMESH_FUZZ_SECS` runs longer, `DATAMESH_FUZZ_ATTACKERS` sets the
//! number of attacker connections at once (4), `DATAMESH_FUZZ_SEED` replays a run (the seed is
//! printed at the start). A failing input is written under `target/fuzz-failures/` and printed
//! as a byte-string literal: add it to `fuzz/corpus/commands/` (and as a test here or in
//! `datamesh-proxy/src/resp/fuzz_regressions.rs`).
//!
//! The codec itself is fuzzed by the libFuzzer targets in `fuzz/` (`cargo xtask test` runs
//! both); modules: `gen` (inputs), `attack` (one attacker connection and its checks),
//! `bystander`.

#[path = "fuzz/attack.rs"]
mod attack;
#[path = "fuzz/bystander.rs"]
mod bystander;
#[path = "fuzz/gen.rs"]
mod gen;
#[path = "../../fuzz/src/lists.rs"]
mod lists;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use datamesh_proxy::resp::Limits;
use datamesh_tests::env::{run_test, ENDPOINT_NAME};
use datamesh_tests::proxy::{assert_alive, bulk, simple, Outcome, RespConn};
use datamesh_tests::resp::Reply;
use datamesh_tests::{wait_until, Env};

use attack::Ending;
use bystander::Bystander;
use gen::{Input, Rng};

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.with_context(|| format!("{name}={v:?} is not a number"))
        }
        Err(_) => Ok(default),
    }
}

/// The proxy's decoding limits, from `/config_dump` (so the expectations follow the agent's
/// configuration and defaults).
fn effective_limits(env: &Env) -> Result<Limits> {
    let (status, body) = env.agent().http_get("/config_dump")?;
    ensure!(status == 200, "/config_dump answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).context("/config_dump is not JSON")?;
    let p = &v["proxy"];
    // Sizes the file leaves to the memory budget are under `resolved`.
    let num = |k: &str| -> Result<u64> {
        p[k].as_u64()
            .or_else(|| v["resolved"][k].as_u64())
            .ok_or_else(|| anyhow!("/config_dump has no proxy.{k} or resolved.{k}: {}", v))
    };
    Ok(Limits {
        max_bulk_len: num("max_bulk_len")?,
        max_array_len: num("max_array_len")?,
        max_depth: num("max_depth")? as usize,
        max_inline_len: num("max_inline_len")? as usize,
    })
}

/// `datamesh_proxy_open_connections{endpoint="cache"}` from `/metrics` (`None` before the
/// endpoint's first connection: the series is made then).
fn open_connections(env: &Env) -> Result<Option<u64>> {
    let (status, body) = env.agent().http_get("/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    let Some(line) = body.lines().find(|l| {
        l.starts_with("datamesh_proxy_open_connections{")
            && l.contains(&format!("endpoint=\"{ENDPOINT_NAME}\""))
    }) else {
        return Ok(None);
    };
    line.rsplit(' ')
        .next()
        .and_then(|n| n.parse::<f64>().ok())
        .map(|n| Some(n as u64))
        .ok_or_else(|| anyhow!("bad metric line {line:?}"))
}

/// Fails unless the agent process is alive and `/ready` answers 200.
fn agent_ready(env: &Env) -> Result<()> {
    let pid = env
        .agent()
        .pid()
        .ok_or_else(|| anyhow!("the agent is not running"))?;
    ensure!(datamesh_tests::pid_alive(pid), "the agent (pid {pid}) died");
    let (status, body) = env.agent().http_get("/ready")?;
    ensure!(status == 200, "/ready answered {status}: {body}");
    Ok(())
}

/// Totals of one attacker.
#[derive(Debug, Default)]
struct Stats {
    connections: u64,
    by_origin: BTreeMap<String, u64>,
    by_ending: BTreeMap<String, u64>,
    denied_skipped: u64,
    bytes_sent: u64,
    frames: u64,
    protocol_errors: u64,
    closed: u64,
    resets: u64,
    silent: u64,
    fully_checked: u64,
    /// A few inputs after which the proxy neither closed nor answered for 5 s.
    silent_examples: Vec<String>,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.connections += o.connections;
        for (k, v) in &o.by_origin {
            *self.by_origin.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.by_ending {
            *self.by_ending.entry(k.clone()).or_default() += v;
        }
        self.denied_skipped += o.denied_skipped;
        self.bytes_sent += o.bytes_sent;
        self.frames += o.frames;
        self.protocol_errors += o.protocol_errors;
        self.closed += o.closed;
        self.resets += o.resets;
        self.silent += o.silent;
        self.fully_checked += o.fully_checked;
        self.silent_examples.extend(
            o.silent_examples
                .iter()
                .take(8 - self.silent_examples.len().min(8))
                .cloned(),
        );
    }
}

/// Writes a failing input where it can be copied into the corpus; returns the message.
fn report_failure(
    seed: u64,
    who: usize,
    iter: u64,
    input: &Input,
    ending: Ending,
    e: &anyhow::Error,
) -> String {
    let dir = datamesh_tests::target_dir().join("fuzz-failures");
    let path = dir.join(format!("session-{seed:x}-{who}-{iter}"));
    let saved = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(&path, &input.bytes))
        .map(|_| {
            format!(
                "saved as {} (copy it into fuzz/corpus/commands/ to keep it)",
                path.display()
            )
        })
        .unwrap_or_else(|err| format!("could not be saved: {err}"));
    format!(
        "attacker {who} connection {iter} ({:?}{}, ending {ending:?}) failed: {e:#}\n  input ({} bytes) {saved}:\n  {}\n  replay the run with DATAMESH_FUZZ_SEED=0x{seed:x}",
        input.origin,
        input.from.as_deref().map(|f| format!(" of seed {f}")).unwrap_or_default(),
        input.bytes.len(),
        gen::literal(&input.bytes),
    )
}

fn attacker(
    proxy: SocketAddr,
    who: usize,
    seed: u64,
    limits: Limits,
    corpus: &[(String, Vec<u8>)],
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Stats> {
    let mut rng = Rng::new(seed ^ (who as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut st = Stats::default();
    let mut iter = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        iter += 1;
        let input = gen::generate(&mut rng, corpus);
        let exp = attack::expect(&input.bytes, &limits);
        if exp.denied {
            st.denied_skipped += 1;
            continue;
        }
        let ending = match rng.below(4) {
            0 | 1 => Ending::Graceful,
            2 => Ending::Everything,
            _ => Ending::Abrupt,
        };
        match attack::run(proxy, &input, &exp, ending, &mut rng) {
            Ok(seen) => {
                st.connections += 1;
                *st.by_origin
                    .entry(format!("{:?}", input.origin))
                    .or_default() += 1;
                *st.by_ending.entry(format!("{ending:?}")).or_default() += 1;
                st.bytes_sent += seen.bytes_sent as u64;
                st.frames += seen.frames.len() as u64;
                st.protocol_errors += seen
                    .frames
                    .iter()
                    .filter(|f| f.error_text().starts_with(b"ERR Protocol error"))
                    .count() as u64;
                st.closed += u64::from(seen.closed);
                st.resets += u64::from(seen.reset);
                st.silent += u64::from(seen.silent);
                if seen.silent && st.silent_examples.len() < 8 {
                    st.silent_examples.push(format!(
                        "{ending:?} {} -> {:?}",
                        gen::literal(&input.bytes[..input.bytes.len().min(300)]),
                        attack::frames_text(&seen.frames)
                    ));
                }
                st.fully_checked +=
                    u64::from(ending == Ending::Graceful && exp.regular && !seen.reset);
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                bail!("{}", report_failure(seed, who, iter, &input, ending, &e));
            }
        }
    }
    Ok(st)
}

#[test]
fn attackers_never_disturb_a_bystander() {
    run_test(Env::builder(), |env| {
        let secs = env_u64("DATAMESH_FUZZ_SECS", 20)?;
        let attackers = env_u64("DATAMESH_FUZZ_ATTACKERS", 4)? as usize;
        let seed = env_u64(
            "DATAMESH_FUZZ_SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        )?;
        eprintln!("session fuzz: seed 0x{seed:x} (DATAMESH_FUZZ_SEED), {secs} s (DATAMESH_FUZZ_SECS), {attackers} attackers");
        let proxy = env.agent().proxy_addr(ENDPOINT_NAME)?;
        let limits = effective_limits(env)?;
        let corpus = Arc::new(gen::load_corpus()?);
        let baseline = open_connections(env)?.unwrap_or(0);
        let bystander = Bystander::start(proxy, seed)?;
        // The gauge counts the bystander (a renamed metric would make the last check vacuous).
        let with_bystander = open_connections(env)?;
        ensure!(
            with_bystander == Some(baseline + 1),
            "the open-connections gauge is {with_bystander:?} with the bystander connected (baseline {baseline})"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(secs);
        let handles: Vec<_> = (0..attackers)
            .map(|who| {
                let (corpus, stop) = (Arc::clone(&corpus), Arc::clone(&stop));
                std::thread::spawn(move || {
                    attacker(proxy, who, seed, limits, &corpus, deadline, &stop)
                })
            })
            .collect();
        // Meanwhile: the agent stays up and ready, the bystander keeps going.
        let mut watch = Ok(());
        while handles.iter().any(|h| !h.is_finished()) {
            if let Err(e) = agent_ready(env).and_then(|_| bystander.check()) {
                stop.store(true, Ordering::Relaxed);
                watch = Err(e);
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut total = Stats::default();
        let mut failures = Vec::new();
        for h in handles {
            match h.join() {
                Ok(Ok(s)) => total.add(&s),
                Ok(Err(e)) => failures.push(format!("{e:#}")),
                Err(_) => failures.push("an attacker thread panicked".into()),
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let by_round_trips = bystander.finish();
        watch?;
        if !failures.is_empty() {
            bail!("{}", failures.join("\n"));
        }
        let round_trips = by_round_trips?;
        eprintln!(
            "session fuzz: {} attacker connections in {elapsed:.1} s ({:.0}/s), {} bytes sent, {} reply frames, {} protocol errors answered; fully checked {}; closed by the proxy {}, reset {}, silent {} (irregular commands); skipped {} inputs with denied commands\n  by origin {:?}\n  by ending {:?}\n  bystander: {round_trips} round trips ({:.0}/s), all correct",
            total.connections,
            total.connections as f64 / elapsed,
            total.bytes_sent,
            total.frames,
            total.protocol_errors,
            total.fully_checked,
            total.closed,
            total.resets,
            total.silent,
            total.denied_skipped,
            total.by_origin,
            total.by_ending,
            round_trips as f64 / elapsed,
        );
        if !total.silent_examples.is_empty() {
            eprintln!(
                "  inputs after which the proxy stayed silent (irregular commands):\n    {}",
                total.silent_examples.join("\n    ")
            );
        }
        agent_ready(env)?;
        assert_alive(proxy)?;
        // Every attacker session is gone: the gauge is back where it was.
        let mut last = 0;
        wait_until(
            "the open-connections gauge to come back to its baseline",
            Duration::from_secs(10),
            || {
                last = open_connections(env)?.unwrap_or(0);
                Ok((last == baseline).then_some(()))
            },
        )
        .with_context(|| {
            let conns = env
                .agent()
                .connections()
                .map(|c| {
                    let open: Vec<_> = c.into_iter().filter(|c| c["closed"] == false).collect();
                    serde_json::Value::Array(open).to_string()
                })
                .unwrap_or_else(|e| format!("<{e:#}>"));
            format!(
                "baseline {baseline}, now {last}: sessions leaked; open in /connections: {conns}"
            )
        })?;
        ensure!(total.connections > 0, "no attacker connection was made");
        ensure!(round_trips > 0, "the bystander made no round trip");
        Ok(())
    });
}

/// What one raw connection gets for `input` before the proxy closes or goes quiet.
fn answers(proxy: SocketAddr, input: &[u8]) -> Result<(Vec<Reply>, bool)> {
    let mut c = RespConn::connect(proxy)?;
    c.send_raw(input)?;
    let mut replies = Vec::new();
    loop {
        match c.read_outcome(Duration::from_secs(2))? {
            Outcome::Reply(r) => replies.push(r),
            Outcome::Closed => return Ok((replies, true)),
            Outcome::Silent => return Ok((replies, false)),
        }
    }
}

// Found by the fuzz targets: a header Redis refuses (`$01`, `$+1`, `*02`, `$-0`) was accepted
// and forwarded as it was; Redis answered a protocol error and closed the pooled backend
// connection, and the client's connection stayed open. Now the proxy refuses it like Redis:
// the error, then a close; the bystander is not disturbed.
#[test]
fn non_canonical_lengths_are_refused_before_the_backend() {
    run_test(Env::builder(), |env| {
        let proxy = env.agent().proxy_addr(ENDPOINT_NAME)?;
        let mut by = RespConn::connect(proxy)?;
        by.expect(&["SET", "fz:by", "1"], simple("OK"))?;
        for (input, msg) in [
            (
                &b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n"[..],
                "invalid bulk length",
            ),
            (b"*2\r\n$3\r\nGET\r\n$+1\r\nk\r\n", "invalid bulk length"),
            (b"*2\r\n$4\r\nECHO\r\n$-0\r\n\r\n", "invalid bulk length"),
            (
                b"*02\r\n$3\r\nGET\r\n$1\r\nk\r\n",
                "invalid multibulk length",
            ),
        ] {
            let (replies, closed) = answers(proxy, input)?;
            let text = String::from_utf8_lossy(input);
            ensure!(
                replies == [Reply::Error(format!("ERR Protocol error: {msg}"))] && closed,
                "{text:?}: expected the protocol error and a close, got {replies:?} (closed: {closed})"
            );
            by.expect(&["GET", "fz:by"], bulk("1"))?;
        }
        Ok(())
    });
}
