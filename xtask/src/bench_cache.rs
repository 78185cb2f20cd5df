//! `cargo xtask bench hot-key-cache`: a hot-key read load through the proxy with the node-local
//! cache (`local_cache`) off and on, in one run; prints the clients' ops/s, p50 and p99, the
//! GETs per second redis-server executed (`cmdstat_get` calls over the run's wall time), and
//! the on/off ratios.
//!
//! Setup (the test harness): one pod, the real agent (release build), redis-server on the
//! service address; the measurement is `datamesh_tests::hotcache::measure` (a drill can call
//! it too): redis-benchmark `-t get` on one key (`--value-size` bytes) with 1 and 50 clients,
//! the cache switched by reload. Each case runs `--rounds` times interleaved; the table shows
//! medians. A benchmark, not a test: it asserts only that the "on" case was served from the
//! cache (the hits counter grew).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use datamesh_tests::hotcache::{self, cache_yaml, CacheSample, KEY};
use datamesh_tests::Env;

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
    let samples = hotcache::measure(&mut env, "bench", &[1, 50], a.requests, a.rounds)?;
    println!(
        "{:<10} {:>7} {:>12} {:>9} {:>9} {:>16}",
        "cache", "clients", "client ops/s", "p50 ms", "p99 ms", "backend GET/s"
    );
    let med = |on: bool, clients: u32, f: fn(&CacheSample) -> f64| -> f64 {
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
        let ratio = |f: fn(&CacheSample) -> f64| med(true, clients, f) / med(false, clients, f);
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
