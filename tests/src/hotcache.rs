//! Measuring the node-local cache (`local_cache`): a hot-key GET load through the proxy from a
//! pod with the cache off and on, in one run. Used by `cargo xtask bench hot-key-cache` and
//! callable from a drill (`measure` on an `Env` whose agent runs the release build).
//!
//! The load is redis-benchmark in the pod (captured into the proxy): `-t get` without `-r`
//! reads the one literal key `key:__rand_int__` (the caller seeds it). The cache is switched by
//! a config reload (`local_cache.enabled`, the rest of the agent's `extra_yaml` kept), and each
//! "on" case starts once the key is cached. Backend GET/s are `cmdstat_get` calls over the
//! run's wall time.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::env::ENDPOINT_NAME;
use crate::proc::run_ok;
use crate::proxy::parse_benchmark_csv;
use crate::{wait_until, Env};

/// The key redis-benchmark `-t get` reads without `-r`.
pub const KEY: &[u8] = b"key:__rand_int__";

/// One run: cache on or off, clients, client ops/s, p50 and p99 (ms), backend GET/s, and the
/// cache hits during the run.
#[derive(Clone, Debug)]
pub struct CacheSample {
    pub on: bool,
    pub clients: u32,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub backend_gets_per_s: f64,
    pub hits: f64,
}

/// The `local_cache:` section the measurement runs with (`enabled` flipped).
pub fn cache_yaml(on: bool) -> String {
    format!("local_cache:\n  enabled: {on}\n  min_ops: 100\n  ttl_ms: 1000\n")
}

/// `cmdstat_get` calls of the endpoint's redis-server.
pub fn backend_gets(env: &Env) -> Result<u64> {
    env.redis().command_calls("get")
}

/// The first sample of `name` for the endpoint (0 when absent).
pub fn metric(env: &Env, name: &str) -> Result<f64> {
    let (status, body) = env.agent().http_get("/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("endpoint=\"{ENDPOINT_NAME}\"")))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// Reloads the agent with the cache on or off (replacing a `local_cache:` section at the end
/// of its `extra_yaml`) and waits until the proxy runs with it.
pub fn set_cache(env: &mut Env, on: bool) -> Result<()> {
    let mut cfg = env.agent().config().clone();
    let keep = match cfg.extra_yaml.find("local_cache:") {
        Some(i) => cfg.extra_yaml[..i].to_string(),
        None => cfg.extra_yaml.clone(),
    };
    cfg.extra_yaml = format!("{keep}{}", cache_yaml(on));
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

/// redis-benchmark `-t get` from `pod` through the proxy: (ops/s, p50 ms, p99 ms).
pub fn run_benchmark(env: &Env, pod: &str, clients: u32, requests: u64) -> Result<(f64, f64, f64)> {
    let svc = env.service_addr();
    let mut cmd = env.pod(pod).cmd("redis-benchmark");
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

/// `rounds` x (off, on) x `clients`: the samples, in run order. The cache is left off.
pub fn measure(
    env: &mut Env,
    pod: &str,
    clients: &[u32],
    requests: u64,
    rounds: u32,
) -> Result<Vec<CacheSample>> {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        for on in [false, true] {
            set_cache(env, on)?;
            if on {
                // Hot first: a short load until the key is cached.
                wait_until("the hot key to be cached", Duration::from_secs(20), || {
                    run_benchmark(env, pod, 10, 20_000)?;
                    Ok((metric(env, "datamesh_proxy_local_cache_keys")? >= 1.0).then_some(()))
                })?;
            }
            for &c in clients {
                let hits0 = metric(env, "datamesh_proxy_local_cache_hits_total")?;
                let g0 = backend_gets(env)?;
                let t0 = Instant::now();
                let (rps, p50_ms, p99_ms) = run_benchmark(env, pod, c, requests)
                    .with_context(|| format!("cache {on}, {c} clients"))?;
                let secs = t0.elapsed().as_secs_f64();
                let gets = backend_gets(env)?.saturating_sub(g0);
                let hits = metric(env, "datamesh_proxy_local_cache_hits_total")? - hits0;
                if on {
                    ensure!(hits > 0.0, "the cache-on run had no cache hits");
                }
                samples.push(CacheSample {
                    on,
                    clients: c,
                    rps,
                    p50_ms,
                    p99_ms,
                    backend_gets_per_s: gets as f64 / secs,
                    hits,
                });
            }
        }
    }
    set_cache(env, false)?;
    Ok(samples)
}
