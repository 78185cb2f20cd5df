//! Password guessing: a connection is closed after `proxy.auth_max_failures` wrong AUTHs, a
//! pod's failure replies are delayed progressively (up to 1 s), which bounds its guesses per
//! second, failures are counted and logged at a bounded rate, and a bystander pod
//! authenticates and works at full speed meanwhile.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::proxy::{python, redis_cli, simple, RespConn};
use datamesh_tests::resp::Reply;
use datamesh_tests::Env;

use crate::common::{metric_value, metrics, proxy_addr, users_yaml};

fn wrong_auth(c: &mut RespConn, i: usize) -> Result<String> {
    match c.cmd(&["AUTH", "app", &format!("guess-{i}")])? {
        Reply::Error(e) if e.starts_with("WRONGPASS") => Ok(e),
        other => anyhow::bail!("wrong AUTH {i} answered {other:?}"),
    }
}

/// Correct AUTHs per second on one connection (the speed a guesser had before the limits).
fn unlimited_auth_rate(proxy: SocketAddr) -> Result<f64> {
    let mut c = RespConn::connect(proxy)?;
    let n = 500;
    let t = Instant::now();
    for _ in 0..n {
        c.expect(&["AUTH", "app", "app-pw"], simple("OK"))?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

#[test]
fn password_guessing_is_closed_slowed_and_logged_while_a_bystander_pod_works() {
    run_test(Env::builder().pods(["a", "b"]).agent(false), |env| {
        let mut cfg = env.base_agent_config()?;
        cfg.extra_yaml = users_yaml(&[("app", "app-pw", None)]);
        env.start_agent(cfg)?;
        let proxy = proxy_addr(env)?;
        let svc = env.service_addr();
        let pod_a = env.pod("a").netns_name().to_string();
        let reference = unlimited_auth_rate(proxy)?;

        // One connection: closed after 10 wrong AUTHs, the last reply saying so.
        let mut c = RespConn::connect(proxy)?;
        let t = Instant::now();
        for i in 1..10 {
            let e = wrong_auth(&mut c, i)?;
            ensure!(!e.contains("closing"), "closed early at attempt {i}: {e}");
        }
        let last = wrong_auth(&mut c, 10)?;
        ensure!(
            last.contains("10 failed AUTH attempts") && last.contains("closing"),
            "the 10th wrong AUTH answered {last:?}"
        );
        ensure!(
            c.closed_within(Duration::from_secs(3))?,
            "the connection stayed open after 10 wrong AUTHs"
        );
        eprintln!(
            "one connection: 10 wrong AUTHs in {:?} (5 free, then 50..800 ms delays), then closed: -{last}",
            t.elapsed()
        );

        // HELLO ... AUTH counts the same way.
        let mut h = RespConn::connect(proxy)?;
        match h.cmd(&["HELLO", "3", "AUTH", "app", "nope"])? {
            Reply::Error(e) if e.starts_with("WRONGPASS") => {}
            other => anyhow::bail!("HELLO 3 AUTH with a wrong password answered {other:?}"),
        }
        let node_failures = metric_value(
            &metrics(env)?,
            "datamesh_proxy_auth_failures_total",
            &["pod=\"node\""],
        );
        ensure!(
            node_failures == Some(11.0),
            "datamesh_proxy_auth_failures_total for pod node is {node_failures:?}, expected 10 AUTH + 1 HELLO"
        );

        // Four connections of pod a guessing for 3 s (reconnecting when closed), while pod b
        // logs in and works.
        let a_cmd = env.pod("a").cmd("python3");
        let args: Vec<String> = [
            "--host",
            &svc.ip().to_string(),
            "--port",
            &svc.port().to_string(),
            "--connections",
            "4",
            "--seconds",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let hammer = std::thread::spawn(move || python(a_cmd, "auth_hammer.py", &args));
        std::thread::sleep(Duration::from_millis(500));
        let mut slowest = Duration::ZERO;
        for i in 0..5 {
            let t = Instant::now();
            let out = redis_cli(
                env.pod("b").cmd("redis-cli"),
                svc,
                &[
                    "--user",
                    "app",
                    "--pass",
                    "app-pw",
                    "--no-auth-warning",
                    "SET",
                    "by:k",
                    &format!("v{i}"),
                ],
            )?;
            let took = t.elapsed();
            slowest = slowest.max(took);
            ensure!(out.trim() == "OK", "bystander pod b: SET printed {out:?}");
            ensure!(
                took < Duration::from_millis(500),
                "bystander pod b's AUTH + SET took {took:?} while pod a guessed"
            );
        }
        let stats = hammer
            .join()
            .map_err(|_| anyhow::anyhow!("the hammer thread panicked"))??;
        let rate = stats["guesses_per_s"].as_f64().context("guesses_per_s")?;
        let guesses = stats["guesses"].as_f64().context("guesses")?;
        eprintln!(
            "pod a, 4 connections for 3 s: {stats} (bounded ~4/s: 1 s per failure per connection); \
             unlimited AUTH on one connection: {reference:.0}/s; bystander pod b AUTH+SET slowest {slowest:?}"
        );
        ensure!(
            rate <= 25.0,
            "pod a guessed {rate} passwords/s (expected the per-pod delay to bound it)"
        );
        ensure!(
            stats["closes"].as_u64().unwrap_or(0) >= 1 || guesses < 40.0,
            "no connection was closed: {stats}"
        );

        // Counted per pod, and logged (bounded) with pod and user.
        let m = metrics(env)?;
        let counted = metric_value(
            &m,
            "datamesh_proxy_auth_failures_total",
            &[&format!("pod=\"{pod_a}\""), "endpoint=\"cache\""],
        )
        .unwrap_or(0.0);
        ensure!(
            counted >= guesses,
            "datamesh_proxy_auth_failures_total for {pod_a} is {counted}, the hammer saw {guesses} replies"
        );
        let log = std::fs::read_to_string(env.agent().log_path())?;
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("failed AUTH attempts") && l.contains(&pod_a))
            .collect();
        ensure!(
            !warnings.is_empty() && warnings.len() <= 2,
            "expected 1-2 rate-bounded warnings for {pod_a}, got {}: {warnings:?}",
            warnings.len()
        );
        ensure!(
            warnings[0].contains("app"),
            "the warning names no user: {}",
            warnings[0]
        );
        Ok(())
    });
}
