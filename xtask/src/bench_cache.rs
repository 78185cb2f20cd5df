//! `cargo xtask bench hot-key-cache`: a hot-key read load through the proxy with the node-local
//! cache (`local_cache`) off and on, in one run; prints the clients' ops/s, p50 and p99, the
//! GETs per second redis-server executed (`cmdstat_get` calls over the run's wall time), and
//! the on/off ratios.
//!
//! Setup (the test harness): one pod, the real agent (release build), redis-server on the
//! service address. The load is redis-benchmark in the pod (captured into the proxy): `-t get`
//! without `-r` reads the one literal key `key:__rand_int__` (a 64-byte value), with 1 and 50
//! clients. The cache is switched by a config reload between cases (`local_cache.enabled`),
//! and each "on" case starts once the key is cached. Each case runs `--rounds` times
//! interleaved; the table shows medians. A benchmark, not a test: it asserts only that the
//! "on" case was served from the cache (the hits counter grew).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use datamesh_tests::proc::run_ok;
use datamesh_tests::proxy::parse_benchmark_csv;
use datamesh_tests::{wait_until, Env};

use crate::util::median;

#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Requests per redis-benchmark run.
    #[arg(long, default_value_t = 200_000)]
    pub requests: u64,
    /// Rounds of every case (interleaved); the table shows the median.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Value size of the hot key, bytes.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
    /// An agent binary to use instead of building the release one.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

const KEY: &[u8] = b"key:__rand_int__";

/// `local_cache` as the bench sets it (`enabled` flipped by reload).
fn cache_yaml(on: bool) -> String {
    format!("local_cache:\n  enabled: {on}\n  min_ops: 100\n  ttl_ms: 1000\n")
}

struct Sample {
    on: bool,
    clients: u32,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    backend_gets_per_s: f64,
}

fn backend_gets(env: &Env) -> Result<u64> {
    let stats = env.redis().info("commandstats")?;
    Ok(stats
        .get("cmdstat_get")
        .and_then(|v| v.split(',').find_map(|f| f.strip_prefix("calls=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

fn metric(env: &Env, name: &str) -> Result<f64> {
    let (status, body) = env.agent().http_get("/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l.contains("endpoint=\"cache\""))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// Reloads the agent with the cache on or off and waits until the proxy runs with it.
fn set_cache(env: &mut Env, on: bool) -> Result<()> {
    let mut cfg = env.agent().config().clone();
    cfg.extra_yaml = cache_yaml(on);
    env.agent_mut().write_config(cfg)?;
    env.agent().sighup()?;
    wait_until(
        "the reload to switch the local cache",
        Duration::from_secs(10),
        || {
            let (_, body) = env.agent().http_get("/hotkeys")?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let live = v["endpoints"][0]["local_cache"]["live"] == true;
            Ok((live == on).then_some(()))
        },
    )
}

fn run_benchmark(env: &Env, clients: u32, requests: u64) -> Result<(f64, f64, f64)> {
    let svc = env.service_addr();
    let mut cmd = env.pod("bench").cmd("redis-benchmark");
    cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
        .args(["-t", "get", "--csv", "-e"])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()]);
    let out = run_ok(&mut cmd, Duration::from_secs(600))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains("Error from server") {
        bail!("redis-benchmark got server errors: {stdout}");
    }
    let rows = parse_benchmark_csv(&stdout)?;
    let [(_, rps, p50, p99)] = <[_; 1]>::try_from(rows)
        .map_err(|r| anyhow::anyhow!("{} result rows, expected 1", r.len()))?;
    Ok((rps, p50, p99))
}

pub fn run(a: &CacheArgs) -> Result<()> {
    ensure!(
        a.requests > 0 && a.rounds > 0,
        "--requests and --rounds must be positive"
    );
    let bin = match &a.agent_bin {
        Some(b) => b.clone(),
        // A release agent: a debug build's proxy would be the bottleneck being measured.
        None => crate::demo::build_agent(true)?,
    };
    let mut env = Env::builder()
        .pods(["bench"])
        .agent_bin(bin)
        .extra_config(&cache_yaml(false))
        .build()?;
    let value = vec![b'v'; a.value_size];
    env.redis().command(&[b"SET", KEY, &value])?;
    println!(
        "DataMesh hot-key cache benchmark (instance {}): redis-benchmark -t get (one key, {} bytes) in pod {} through the proxy",
        env.n(),
        a.value_size,
        env.pod("bench").netns_name()
    );
    println!(
        "  {} requests per run, {} rounds, medians shown; local_cache ttl_ms 1000, min_ops 100\n",
        a.requests, a.rounds
    );
    let mut samples = Vec::new();
    for _ in 0..a.rounds {
        for on in [false, true] {
            set_cache(&mut env, on)?;
            if on {
                // Hot first: a short load until the key is cached.
                wait_until("the hot key to be cached", Duration::from_secs(20), || {
                    run_benchmark(&env, 10, 20_000)?;
                    Ok((metric(&env, "datamesh_proxy_local_cache_keys")? >= 1.0).then_some(()))
                })?;
            }
            for clients in [1u32, 50] {
                let hits0 = metric(&env, "datamesh_proxy_local_cache_hits_total")?;
                let g0 = backend_gets(&env)?;
                let t0 = Instant::now();
                let (rps, p50_ms, p99_ms) = run_benchmark(&env, clients, a.requests)
                    .with_context(|| format!("cache {on}, {clients} clients"))?;
                let secs = t0.elapsed().as_secs_f64();
                let gets = backend_gets(&env)? - g0;
                let hits = metric(&env, "datamesh_proxy_local_cache_hits_total")? - hits0;
                if on {
                    ensure!(hits > 0.0, "the cache-on run had no cache hits");
                }
                samples.push(Sample {
                    on,
                    clients,
                    rps,
                    p50_ms,
                    p99_ms,
                    backend_gets_per_s: gets as f64 / secs,
                });
            }
        }
    }
    println!(
        "{:<10} {:>7} {:>12} {:>9} {:>9} {:>16}",
        "cache", "clients", "client ops/s", "p50 ms", "p99 ms", "backend GET/s"
    );
    let med = |on: bool, clients: u32, f: fn(&Sample) -> f64| -> f64 {
        median(
            samples
                .iter()
                .filter(|s| s.on == on && s.clients == clients)
                .map(f)
                .collect(),
        )
    };
    for clients in [1u32, 50] {
        for on in [false, true] {
            println!(
                "{:<10} {:>7} {:>12.0} {:>9.3} {:>9.3} {:>16.0}",
                if on { "on" } else { "off" },
                clients,
                med(on, clients, |s| s.rps),
                med(on, clients, |s| s.p50_ms),
                med(on, clients, |s| s.p99_ms),
                med(on, clients, |s| s.backend_gets_per_s),
            );
        }
        let ratio = |f: fn(&Sample) -> f64| med(true, clients, f) / med(false, clients, f);
        println!(
            "{:<10} {:>7} {:>11.2}x {:>8.2}x {:>8.2}x {:>15.4}x\n",
            "on/off",
            clients,
            ratio(|s| s.rps),
            ratio(|s| s.p50_ms),
            ratio(|s| s.p99_ms),
            ratio(|s| s.backend_gets_per_s),
        );
    }
    Ok(())
}
