//! Pooling and multiplexing: a storm of short-lived clients never reaches the backend as new
//! connections, and blocking commands wait on dedicated connections while everyone else keeps
//! using the shared pool.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use datamesh_tests::env::run_test;
use datamesh_tests::proc::run_ok;
use datamesh_tests::proxy::{bulk, simple, RespConn};
use datamesh_tests::{wait_until, Env};

use crate::common::{proxy_addr, py_node};

const POOL_SIZE: u64 = 4;
/// The backend's default `warm_dedicated`.
const WARM_DEDICATED: u64 = 2;

/// INFO readings each open one connection of their own: the "after" reading's connection is
/// counted in the delta (the "before" one is counted before it). That one is the only slack.
const INFO_SLACK: u64 = 1;

#[test]
fn short_connection_storm_stays_within_the_pool() {
    run_test(
        Env::builder().backend_option("pool_size", POOL_SIZE),
        |env| {
            let proxy = proxy_addr(env)?;
            env.redis()
                .command(&[b"SET", b"key:__rand_int__", b"storm"])?;
            // The pool's warm dedicated connections are opened at start, not by clients:
            // wait until they are, so the count below is only what the storm caused.
            wait_until(
                "the warm dedicated connections to be open",
                Duration::from_secs(10),
                || {
                    let (_, body) = env.agent().http_get("/backends")?;
                    let v: serde_json::Value = serde_json::from_str(&body)?;
                    let idle = v[0]["pools"][0]["idle_dedicated"].as_u64().unwrap_or(0);
                    Ok((idle >= WARM_DEDICATED).then_some(()))
                },
            )?;
            // So is the node's health-check connection (its first PING after 500 ms).
            wait_until(
                "the health-check connection to be open",
                Duration::from_secs(10),
                || {
                    let clients = env.redis().client_list()?;
                    let health = clients
                        .iter()
                        .any(|c| c.get("name").is_some_and(|n| n.ends_with("-health")));
                    Ok(health.then_some(()))
                },
            )?;
            let before = env
                .redis()
                .info_u64("stats", "total_connections_received")?;
            // 20,000 x (connect, GET, close): redis-benchmark -k 0 reconnects for every request.
            let t0 = Instant::now();
            let mut cmd = Command::new("redis-benchmark");
            cmd.args([
                "-h",
                &proxy.ip().to_string(),
                "-p",
                &proxy.port().to_string(),
            ])
            .args(["-k", "0", "-c", "20", "-n", "20000", "-t", "get", "--csv"]);
            let out = run_ok(&mut cmd, Duration::from_secs(300))?;
            let elapsed = t0.elapsed();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let rows = datamesh_tests::proxy::parse_benchmark_csv(&stdout)?;
            let after = env
                .redis()
                .info_u64("stats", "total_connections_received")?;
            let delta = after - before;
            eprintln!(
            "storm: 20000 connect/GET/close cycles in {elapsed:?} ({rows:?}); backend total_connections_received +{delta}"
        );
            ensure!(
            delta <= POOL_SIZE + INFO_SLACK,
            "20,000 short-lived clients caused {delta} backend connections; the pool is {POOL_SIZE} (+{INFO_SLACK} for the INFO reading)"
        );
            // The proxy survived it and still serves.
            let mut c = RespConn::connect(proxy)?;
            c.expect(&["GET", "key:__rand_int__"], bulk("storm"))?;
            c.expect(&["PING"], simple("PONG"))?;
            Ok(())
        },
    );
}

#[test]
fn blocking_pops_wait_on_dedicated_connections_without_stalling_the_pool() {
    // 8 blocked BLPOPs against a shared pool of 2: if a blocking command sat on a shared
    // connection, the workers' commands queued behind it would wait for the pop.
    run_test(Env::builder().backend_option("pool_size", 2), |env| {
        let direct = env.service_addr().to_string();
        let v = py_node(
            "blocking",
            proxy_addr(env)?,
            &["--count", "8", "--direct", &direct],
        )?;
        let p99 = v["p99_ms"].as_f64().unwrap_or(f64::MAX);
        let max = v["max_ms"].as_f64().unwrap_or(f64::MAX);
        let wake = v["max_wake_ms"].as_f64().unwrap_or(f64::MAX);
        // Normal latency on this shared 2-core machine is ~1 ms; a stall behind a BLPOP would
        // be the pop's 30 s timeout. The bounds leave room for a busy machine.
        ensure!(
            p99 < 250.0,
            "shared-pool commands p99 {p99} ms while BLPOPs were blocked: {v}"
        );
        ensure!(
            max < 2000.0,
            "a shared-pool command took {max} ms while BLPOPs were blocked: {v}"
        );
        ensure!(wake < 2000.0, "a BLPOP woke {wake} ms after the push: {v}");
        Ok(())
    });
}
