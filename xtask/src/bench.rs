//! `cargo xtask bench datapath`: pod-to-Redis round trips direct, through the proxy with the
//! fast path off, and with it on, in the same run; prints ops/s, p50, p99 and the ratios.
//! (`cargo xtask bench proxy`, the RESP proxy against twemproxy and Envoy, lives in
//! `bench_proxy.rs`; `cargo xtask bench hot-key-cache`, the node-local cache off and on, in
//! `bench_cache.rs`.)
//!
//! Setup (the test harness): one pod, the real agent (fast path off at start), redis-server on
//! the service address. redis-benchmark runs inside the pod's network namespace for every case:
//! - `direct`: in a cgroup outside the attached one, so its connects are not captured; same
//!   netns, same veth, same redis-server as the proxied cases (only the proxy hop differs);
//! - `proxy`: in the pod's cgroup, captured into the proxy, fast path off;
//! - `fastpath`: the same after `datamesh-agent fastpath on` (new connections take it).
//!
//! Tests: PING (`ping_mbulk`) and GET of a 1 KiB value, with 1 client (round-trip latency) and
//! 50 clients. Each case runs `--rounds` times interleaved; the table shows medians. It is a
//! benchmark, not a test: it asserts only that the traffic took the path it names (counters).

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use datamesh_tests::proc::run_ok;
use datamesh_tests::proxy::parse_benchmark_csv;
use datamesh_tests::Env;

use crate::util::median;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Bench {
    /// Pod-to-proxy round trips (PING, 1 KiB GET): direct vs fast path off vs on.
    Datapath(DatapathArgs),
    /// The RESP proxy vs twemproxy vs Envoy vs direct: GET/SET throughput and CPU time per
    /// request, connection storm, idle memory.
    Proxy(crate::bench_proxy::ProxyArgs),
    /// A hot-key read load through the proxy with the node-local cache off and on: client
    /// ops/s, p50, p99 and the GETs per second redis-server executed.
    HotKeyCache(crate::bench_cache::CacheArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct DatapathArgs {
    /// Requests per redis-benchmark run.
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// Rounds of every case (interleaved); the table shows the median.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Value size of the GET test, bytes.
    #[arg(long, default_value_t = 1024)]
    pub value_size: usize,
}

pub fn run(b: &Bench) -> Result<()> {
    match b {
        Bench::Datapath(a) => datapath(a),
        Bench::Proxy(a) => crate::bench_proxy::run(a),
        Bench::HotKeyCache(a) => crate::bench_cache::run(a),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Direct,
    Proxy,
    Fastpath,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Direct => "direct",
            Case::Proxy => "proxy (fast path off)",
            Case::Fastpath => "proxy (fast path on)",
        }
    }
}

/// One row of redis-benchmark's CSV output.
#[derive(Clone, Debug)]
struct Sample {
    case: Case,
    clients: u32,
    test: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn datapath(a: &DatapathArgs) -> Result<()> {
    ensure!(
        a.requests > 0 && a.rounds > 0,
        "--requests and --rounds must be positive"
    );
    // A release agent: a debug build's proxy would be the bottleneck being measured.
    let bin = crate::demo::build_agent(true)?;
    let env = Env::builder()
        .pods(["bench"])
        .fastpath(false)
        .agent_bin(bin)
        .build()?;
    let pod = env.pod("bench");
    let agent = env.agent();
    let svc = env.service_addr();

    // redis-benchmark's GET reads the literal key "key:__rand_int__" (no -r): seed it.
    let value = vec![b'v'; a.value_size];
    env.redis()
        .command(&[b"SET", b"key:__rand_int__", &value])?;

    println!(
        "DataMesh datapath benchmark (instance {}): pod {} -> {svc}",
        env.n(),
        pod.netns_name()
    );
    println!("  direct   = redis-benchmark in the pod's netns, cgroup outside the attached one (not captured)");
    println!(
        "  proxy    = same, in the pod's cgroup: captured into the proxy {}",
        agent.proxy_addr("cache")?
    );
    println!(
        "  requests {} per run, {} rounds, GET value {} bytes, medians shown\n",
        a.requests, a.rounds, a.value_size
    );

    let mut samples = Vec::new();
    let mut fp_before = None;
    let mut fp_after = None;
    for round in 0..a.rounds {
        for case in [Case::Direct, Case::Proxy, Case::Fastpath] {
            match case {
                Case::Proxy => agent.set_fastpath(false)?,
                Case::Fastpath => {
                    agent.set_fastpath(true)?;
                    if fp_before.is_none() {
                        fp_before = Some(agent.pod_counter(pod.netns_name(), "fastpath_msgs")?);
                    }
                }
                Case::Direct => {}
            }
            for clients in [1u32, 50] {
                let captured0 = agent.pod_counter(pod.netns_name(), "connects_captured")?;
                let mut cmd = match case {
                    Case::Direct => pod.cmd_in_cgroup(env.outside_cgroup(), "redis-benchmark"),
                    _ => pod.cmd("redis-benchmark"),
                };
                cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
                    .args(["-c", &clients.to_string(), "-n", &a.requests.to_string()])
                    .args([
                        "-t",
                        "ping_mbulk,get",
                        "-d",
                        &a.value_size.to_string(),
                        "--csv",
                    ]);
                let out = run_ok(&mut cmd, Duration::from_secs(600))?;
                let rows = parse_benchmark_csv(&String::from_utf8_lossy(&out.stdout))?;
                let captured =
                    agent.pod_counter(pod.netns_name(), "connects_captured")? - captured0;
                match case {
                    Case::Direct => ensure!(
                        captured == 0,
                        "the direct run was captured ({captured} connects)"
                    ),
                    _ => ensure!(
                        captured >= u64::from(clients),
                        "the {} run was not captured ({captured} connects)",
                        case.name()
                    ),
                }
                for (test, rps, p50, p99) in rows {
                    eprintln!("  round {} {:<22} c={clients:<3} {test:<11} {rps:>10.0} ops/s p50 {p50:.3} ms p99 {p99:.3} ms", round + 1, case.name());
                    samples.push(Sample {
                        case,
                        clients,
                        test,
                        rps,
                        p50_ms: p50,
                        p99_ms: p99,
                    });
                }
            }
            if case == Case::Fastpath {
                fp_after = Some(agent.pod_counter(pod.netns_name(), "fastpath_msgs")?);
            }
        }
    }
    agent.set_fastpath(false)?;

    print_tables(&samples);
    let (b, f) = (fp_before.unwrap_or(0), fp_after.unwrap_or(0));
    println!(
        "\nfast path proof: fastpath_msgs of {} went {b} -> {f} over the fast-path runs",
        pod.netns_name()
    );
    println!(
        "\n$ datamesh-agent pods --pin-dir {}",
        env.pin_dir().display()
    );
    let out = run_ok(
        agent.cli().args(["pods", "--pin-dir"]).arg(env.pin_dir()),
        Duration::from_secs(20),
    )?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if f <= b {
        bail!("the fast-path runs redirected no messages (fastpath_msgs {b} -> {f}): the fast path was not used");
    }
    Ok(())
}

fn print_tables(samples: &[Sample]) {
    let tests: Vec<String> = {
        let mut t: Vec<String> = samples.iter().map(|s| s.test.clone()).collect();
        t.dedup();
        t.sort();
        t.dedup();
        t
    };
    let med = |case: Case, clients: u32, test: &str| -> (f64, f64, f64) {
        let sel: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.case == case && s.clients == clients && s.test == test)
            .collect();
        (
            median(sel.iter().map(|s| s.rps).collect()),
            median(sel.iter().map(|s| s.p50_ms).collect()),
            median(sel.iter().map(|s| s.p99_ms).collect()),
        )
    };
    println!(
        "\n{:<22} {:>7} {:<11} {:>12} {:>9} {:>9}",
        "case", "clients", "test", "ops/s", "p50 ms", "p99 ms"
    );
    for clients in [1u32, 50] {
        for test in &tests {
            for case in [Case::Direct, Case::Proxy, Case::Fastpath] {
                let (rps, p50, p99) = med(case, clients, test);
                println!(
                    "{:<22} {:>7} {:<11} {:>12.0} {:>9.3} {:>9.3}",
                    case.name(),
                    clients,
                    test,
                    rps,
                    p50,
                    p99
                );
            }
        }
    }
    println!("\nratios (medians)            ops/s on/off  p50 on/off  p99 on/off  ops/s off/direct  ops/s on/direct");
    for clients in [1u32, 50] {
        for test in &tests {
            let (d, _, _) = med(Case::Direct, clients, test);
            let (off, off50, off99) = med(Case::Proxy, clients, test);
            let (on, on50, on99) = med(Case::Fastpath, clients, test);
            println!(
                "c={clients:<3} {test:<22} {:>12.2} {:>11.2} {:>11.2} {:>17.2} {:>16.2}",
                on / off,
                on50 / off50,
                on99 / off99,
                off / d,
                on / d
            );
        }
    }
}
