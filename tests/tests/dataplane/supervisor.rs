//! Supervision: `datamesh-agent run` is a supervisor that keeps the listeners and the heartbeat
//! and runs the proxy in a worker child. A SIGKILLed worker is replaced while pods' connects
//! wait in the listen backlog (none refused); a SIGSTOPped one is found by the health check
//! and replaced; a crash loop makes capture fail open (pods reach Redis directly). When the
//! whole agent dies, its listeners leave `dm_listeners` and capture fails open at once, with no
//! connect refused; with no listener entry a connect is never rewritten.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use datamesh_tests::drill::mono_now;
use datamesh_tests::env::run_test;
use datamesh_tests::restartdrill::{self, signal, wait_ready};
use datamesh_tests::Env;
use serde_json::Value;

use crate::common::{assert_capture_works, counter, counters, probe_bin};

/// The bounds: a crashed worker is replaced within 500 ms, a hung one within 3 s.
const CRASH_BOUND_MS: u128 = 500;
const HANG_BOUND_MS: u128 = 3000;

/// Waits up to 2 s for metric `name` to reach `min` (the counts come with the supervisor's
/// pings); returns its last value.
fn metric_at_least(env: &Env, name: &str, min: f64) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        let v = metric(env, name)?;
        if v >= min || t0.elapsed() > Duration::from_secs(2) {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(env: &Env, name: &str) -> Result<f64> {
    let (_, body) = env.agent().http_get("/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| anyhow!("/metrics has no {name}"))
}

fn assert_captured(env: &Env, name: &str) -> Result<()> {
    assert_capture_works(env, env.pod("a"), name)
}

#[test]
fn sigkilled_worker_is_replaced_with_no_refused_connect() {
    run_test(Env::builder().pods(["a"]), |env| {
        assert_captured(env, "dmbefore")?;
        let before = counters(env, env.pod("a"))?;
        // An established connection (a blocking pop) that dies with the worker: counted lost
        // (the worker reports its open connections with every pong, once a second).
        let mut blocked = env
            .pod("a")
            .cmd("redis-cli")
            .args(["-h", &env.service_addr().ip().to_string()])
            .args(["-p", &env.service_addr().port().to_string()])
            .args(["BLPOP", "dm-supervisor-nokey", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-cli BLPOP")?;
        std::thread::sleep(Duration::from_millis(700));
        let probe = env
            .pod("a")
            .cmd(probe_bin())
            .args(["connect-loop", "--duration-ms", "2500", "--addr"])
            .arg(env.service_addr().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting dmprobe")?;
        std::thread::sleep(Duration::from_millis(600));
        let old = env.agent().worker_pid()?.context("no worker")?;
        let t0 = Instant::now();
        signal(old, libc::SIGKILL)?;
        let new = env
            .agent()
            .wait_new_worker(Some(old), Duration::from_secs(3))?;
        let spawned = t0.elapsed();
        wait_ready(env, Duration::from_secs(5))?;
        let replaced = t0.elapsed();
        let out = probe.wait_with_output().context("dmprobe")?;
        ensure!(out.status.success(), "dmprobe failed: {:?}", out);
        let summary: Value = serde_json::from_slice(&out.stdout)?;
        eprintln!(
            "worker SIGKILL: new worker {new} spawned after {spawned:?}, serving after {replaced:?}; probe {summary}"
        );
        // No connect is refused. The probe's one connection in flight in the killed worker
        // (accepted, PING not yet answered) may be reset, or closed if the worker had read its
        // PING: an established connection lost.
        let errors = summary["errors"].as_object().cloned().unwrap_or_default();
        let lost_kinds = ["ECONNRESET", "UnexpectedEof"];
        let resets: u64 = lost_kinds
            .iter()
            .filter_map(|k| errors.get(*k).and_then(Value::as_u64))
            .sum();
        ensure!(
            summary["refused"].as_u64() == Some(0)
                && resets <= 1
                && errors.keys().all(|k| lost_kinds.contains(&k.as_str())),
            "connects failed while the worker was replaced: {summary}"
        );
        ensure!(
            summary["ok"].as_u64().unwrap_or(0) > 10,
            "too few connects: {summary}"
        );
        ensure!(
            replaced.as_millis() <= CRASH_BOUND_MS,
            "worker replaced after {replaced:?}; bound {CRASH_BOUND_MS} ms"
        );
        // Capture stayed on (the supervisor kept the heartbeat): nothing failed open.
        let after = counters(env, env.pod("a"))?;
        ensure!(
            counter(&after, "connects_failopen") == counter(&before, "connects_failopen"),
            "connects failed open during the restart: before {before:?}, after {after:?}"
        );
        assert_captured(env, "dmafter")?;
        ensure!(
            metric_at_least(env, "datamesh_agent_worker_restarts_total", 1.0)? >= 1.0,
            "restart not counted"
        );
        // The supervisor writes the heartbeat; its count reaches the worker's /metrics (the
        // alerts read it), already for the new worker.
        ensure!(
            metric_at_least(env, "datamesh_dataplane_heartbeats_total", 5.0)? >= 5.0,
            "the supervisor's heartbeats are not exported"
        );
        let lost = metric_at_least(env, "datamesh_agent_worker_lost_connections_total", 1.0)?;
        let _ = blocked.kill();
        let _ = blocked.wait();
        ensure!(
            lost >= 1.0,
            "the BLPOP connection that died with the worker was not counted lost ({lost})"
        );
        Ok(())
    });
}

#[test]
fn sigstopped_worker_is_killed_and_replaced_within_3s() {
    run_test(Env::builder().pods(["a"]), |env| {
        assert_captured(env, "dmbefore")?;
        let old = env.agent().worker_pid()?.context("no worker")?;
        let t0 = Instant::now();
        signal(old, libc::SIGSTOP)?;
        let new = env
            .agent()
            .wait_new_worker(Some(old), Duration::from_secs(6))?;
        wait_ready(env, Duration::from_secs(5))?;
        let replaced = t0.elapsed();
        eprintln!("worker SIGSTOP: new worker {new} serving after {replaced:?}");
        ensure!(
            !datamesh_tests::pid_alive(old),
            "the hung worker {old} is still alive"
        );
        ensure!(
            replaced.as_millis() <= HANG_BOUND_MS,
            "hung worker replaced after {replaced:?}; bound {HANG_BOUND_MS} ms"
        );
        assert_captured(env, "dmafter")?;
        Ok(())
    });
}

#[test]
fn crash_looping_worker_fails_capture_open() {
    run_test(Env::builder().pods(["a"]), |env| {
        assert_captured(env, "dmbefore")?;
        let before = counters(env, env.pod("a"))?;
        // Kill every worker as soon as it shows, until a pod connect went straight to Redis.
        let t0 = Instant::now();
        let mut kills = 0;
        let mut direct = false;
        while t0.elapsed() < Duration::from_secs(10) {
            if let Some(w) = env.agent().worker_pid()? {
                let _ = signal(w, libc::SIGKILL);
                kills += 1;
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if kills >= 3 {
                let now = counters(env, env.pod("a"))?;
                if counter(&now, "connects_failopen") > counter(&before, "connects_failopen") {
                    direct = true;
                    break;
                }
                // One connect at a time: it reaches Redis directly once capture failed open.
                let out = env
                    .pod("a")
                    .cmd("redis-cli")
                    .args(["-h", &env.service_addr().ip().to_string()])
                    .args(["-p", &env.service_addr().port().to_string(), "PING"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                if let Ok(mut c) = out {
                    // A captured connect would wait for a worker; never wait on it long.
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_millis(300) {
                        if c.try_wait()?.is_some() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "crash loop: {kills} kills, direct connect after {:?}",
            t0.elapsed()
        );
        ensure!(
            direct,
            "no pod connect reached Redis directly after {kills} worker kills"
        );
        let log = std::fs::read_to_string(env.agent().log_path())?;
        ensure!(
            log.contains("capture fails open"),
            "the supervisor did not log the fail-open"
        );
        // Left alone, a worker comes back (after the backoff) and capture resumes.
        wait_ready(env, Duration::from_secs(10))?;
        ensure!(
            metric_at_least(env, "datamesh_agent_worker_restarts_total", 3.0)? >= 3.0,
            "restarts not counted"
        );
        // Capture resumes once the new worker answered a health check (the supervisor then
        // beats again): within a heartbeat interval of that.
        let t = Instant::now();
        loop {
            match assert_captured(env, "dmafter") {
                Ok(()) => break,
                Err(e) if t.elapsed() > Duration::from_secs(3) => {
                    return Err(e.context("capture did not resume after the crash loop"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        Ok(())
    });
}

#[test]
fn sigkilled_supervisor_takes_its_worker_along() {
    run_test(Env::builder().pods(["a"]), |env| {
        let worker = env.agent().worker_pid()?.context("no worker")?;
        env.agent_mut().kill9()?;
        // PR_SET_PDEATHSIG: the worker must not outlive the supervisor (it would hold the
        // listeners' ports and keep serving unsupervised).
        let t0 = Instant::now();
        // Dead (a zombie until whoever inherited it reaps it) is enough.
        while running(worker) {
            ensure!(
                t0.elapsed() < Duration::from_secs(2),
                "worker {worker} outlived its SIGKILLed supervisor"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // A new agent binds the same ports and captures again.
        env.agent_mut().spawn()?;
        assert_captured(env, "dmafter")?;
        Ok(())
    });
}

/// Whether `pid` exists and is not a zombie (a dead worker stays a zombie until init reaps it).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Endpoint ids whose proxy listener is in the agent's pinned `dm_listeners` (the kernel keeps
/// only sockets that are still open in it).
fn listener_ids(env: &Env) -> Result<Vec<u32>> {
    let pin = env.pin_dir().join("dm_listeners");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .context("running bpftool")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).with_context(|| {
        format!(
            "bpftool map dump {} printed no JSON: {text} {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let mut ids = Vec::new();
    for e in v.as_array().into_iter().flatten() {
        let bytes: Vec<u8> = e["key"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| {
                b.as_str()
                    .and_then(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            })
            .collect();
        let arr: [u8; 4] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| anyhow!("dm_listeners key is not 4 bytes: {e}"))?;
        ids.push(u32::from_ne_bytes(arr));
    }
    ids.sort_unstable();
    Ok(ids)
}

#[test]
fn without_a_listener_entry_connects_are_not_rewritten() {
    run_test(Env::builder().pods(["a"]), |env| {
        assert_captured(env, "dmbefore")?;
        ensure!(
            listener_ids(env)? == vec![0],
            "the worker did not insert endpoint 0's listener: {:?}",
            listener_ids(env)?
        );
        let before = counters(env, env.pod("a"))?;
        // The supervisor still holds the socket; only the map entry goes (as after a reload
        // that removed the endpoint, or once the whole agent is gone).
        let pin = env.pin_dir().join("dm_listeners");
        let st = std::process::Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(&pin)
            .args(["key", "0", "0", "0", "0"])
            .status()
            .context("bpftool map delete")?;
        ensure!(st.success(), "bpftool map delete failed: {st}");
        let out = env
            .pod("a")
            .cmd(probe_bin())
            .args(["timeline", "--duration-ms", "200", "--addr"])
            .arg(env.service_addr().to_string())
            .output()
            .context("dmprobe timeline")?;
        ensure!(out.status.success(), "dmprobe failed: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let totals = v["totals"].as_object().cloned().unwrap_or_default();
        ensure!(
            totals.keys().all(|k| k == "direct") && totals.contains_key("direct"),
            "with no listener entry, connects were not all direct: {totals:?}"
        );
        let after = counters(env, env.pod("a"))?;
        ensure!(
            counter(&after, "connects_failopen") > counter(&before, "connects_failopen"),
            "the direct connects were not counted as fail-open: {before:?} -> {after:?}"
        );
        // A new worker puts its listeners back: capture resumes.
        let old = env.agent().worker_pid()?.context("no worker")?;
        signal(old, libc::SIGKILL)?;
        env.agent()
            .wait_new_worker(Some(old), Duration::from_secs(3))?;
        wait_ready(env, Duration::from_secs(5))?;
        ensure!(
            listener_ids(env)? == vec![0],
            "the new worker did not insert the listener again"
        );
        assert_captured(env, "dmafter")?;
        Ok(())
    });
}

#[test]
fn sigkilled_agent_fails_open_at_once_with_no_refused_connect() {
    run_test(Env::builder().pods(["a"]), |env| {
        assert_captured(env, "dmbefore")?;
        let stop = env.run_dir().join("agentkill.stop");
        let probe = env
            .pod("a")
            .cmd(probe_bin())
            .args(["timeline", "--duration-ms", "20000", "--pause-ms", "1"])
            .arg("--stop-file")
            .arg(&stop)
            .arg("--addr")
            .arg(env.service_addr().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting dmprobe")?;
        std::thread::sleep(Duration::from_millis(500));
        let worker = env.agent().worker_pid()?.context("no worker")?;
        let t_kill = mono_now();
        env.agent_mut().kill9()?;
        let t0 = Instant::now();
        while running(worker) {
            ensure!(
                t0.elapsed() < Duration::from_secs(2),
                "worker {worker} outlived its SIGKILLed supervisor"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let worker_gone_ms = (mono_now() - t_kill) * 1000.0;
        // The kernel drops the closed listener from the map by itself (once the worker's last
        // thread has released its files: its leader may show as a zombie a moment before).
        while !listener_ids(env)?.is_empty() {
            ensure!(
                t0.elapsed() < Duration::from_secs(2),
                "dm_listeners still holds {:?} with the whole agent dead",
                listener_ids(env)?
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let entry_gone_ms = (mono_now() - t_kill) * 1000.0;
        std::thread::sleep(Duration::from_millis(700));
        let t_restart = mono_now();
        env.agent_mut().spawn()?;
        wait_ready(env, Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&stop, b"stop")?;
        let out = probe.wait_with_output().context("dmprobe")?;
        ensure!(out.status.success(), "dmprobe failed: {:?}", out.status);
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let attempts = restartdrill::parse_attempts(&v)?;
        let before = restartdrill::probe_phase(&attempts, 0.0, t_kill);
        let dead = restartdrill::probe_phase(&attempts, t_kill, t_restart);
        let back = restartdrill::probe_phase(&attempts, t_restart, f64::MAX);
        eprintln!(
            "whole-agent SIGKILL: worker gone after {worker_gone_ms:.1} ms, dm_listeners \
             empty after {entry_gone_ms:.1} ms; before {before:?}; \
             dead {dead:?}; restart {back:?}"
        );
        let all = restartdrill::probe_phase(&attempts, 0.0, f64::MAX);
        // The one refusal the gate cannot rule out: a connect rewritten in the microseconds
        // before the listener closed with the agent (seen once in about ten runs).
        let raced = restartdrill::refused_near(&attempts, t_kill, restartdrill::KILL_RACE_MS);
        ensure!(
            all.refused == raced && raced <= 1 && all.connect_errors == 0,
            "connects were refused or failed (raced with the kill: {raced}): {all:?}"
        );
        ensure!(
            before.direct == 0 && before.proxied > 0,
            "before the kill, capture was not on: {before:?}"
        );
        // Fail-open at once: the first direct connect within a few ms of the kill (measured
        // 3-5 ms; the bound leaves room for a loaded machine, far below the 1 s heartbeat
        // bound), and everything after it direct until the restart.
        let first = dead.first_direct_ms.unwrap_or(f64::MAX);
        ensure!(
            first < 300.0,
            "first direct connect {first:.1} ms after the SIGKILL: {dead:?}"
        );
        ensure!(
            dead.direct > 20,
            "too few direct connects while the agent was dead: {dead:?}"
        );
        // Connections the kernel had accepted into the dying listener's backlog are reset:
        // counted, never more than a handful (the probe has one in flight at a time).
        ensure!(
            all.lost_proxied <= 2 && all.lost_direct == 0,
            "established connections lost: {all:?}"
        );
        ensure!(
            back.proxied > 0,
            "capture did not resume after the restart: {back:?}"
        );
        Ok(())
    });
}

#[test]
fn reload_puts_added_listeners_in_and_takes_removed_ones_out() {
    run_test(Env::builder().pods(["a"]), |env| {
        let base = env.agent().config().clone();
        let mut two = base.clone();
        let extra = std::net::SocketAddr::new(env.service_ip().into(), 6390);
        two.endpoints.push(datamesh_tests::agent::Endpoint::new(
            "extra",
            extra,
            datamesh_tests::agent::BackendSpec::standalone(env.service_addr()),
        ));
        let wait_ids = |env: &Env, want: Vec<u32>| -> Result<()> {
            let t0 = Instant::now();
            loop {
                let ids = listener_ids(env)?;
                if ids == want {
                    return Ok(());
                }
                ensure!(
                    t0.elapsed() < Duration::from_secs(10),
                    "dm_listeners holds {ids:?}, expected {want:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        env.agent_mut().write_config(two)?;
        env.agent().sighup()?;
        // The worker binds the added endpoint itself and puts its listener in.
        wait_ids(env, vec![0, 1])?;
        // Its connects are captured (the extra service address has no Redis behind it: only a
        // captured connect can answer).
        let out = env
            .pod("a")
            .cmd(probe_bin())
            .args(["timeline", "--duration-ms", "100", "--addr"])
            .arg(extra.to_string())
            .output()
            .context("dmprobe timeline")?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            v["totals"]
                .as_object()
                .is_some_and(|t| t.keys().all(|k| k == "proxy")),
            "connects to the added endpoint were not captured: {}",
            v["totals"]
        );
        env.agent_mut().write_config(base)?;
        env.agent().sighup()?;
        wait_ids(env, vec![0])?;
        assert_captured(env, "dmafter")?;
        Ok(())
    });
}
