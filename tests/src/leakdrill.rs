//! The resource-leak drill: under client load from a captured pod, the agent's worker is made
//! to leak (admin `POST /debug/leak`, `debug.fault_injection: true`) file descriptors, memory
//! and dedicated backend connections, one leak per phase; its watchdog must detect the budget
//! breach and the supervisor replace the worker gracefully (a successor starts, the leaking
//! worker retires) with no refused connect. Used by `cargo xtask drill resource-leak` (release
//! agent, `--seconds` of load after each retirement) and `tests/tests/leakdrill.rs` (debug
//! agent, short).
//!
//! Each phase: the load (`tests/tools/leak_load.py`: pooled redis-py clients with one
//! reconnect-and-retry, and a connect loop counting refused connects) starts and has a success
//! on every client; the worker's value of the resource and the watchdog's threshold are read
//! (`/proc/<worker>`, `/metrics`); the leak is sized to cross the threshold; then the agent's
//! log is followed for the watchdog's breach, the successor's start, the successor serving
//! (the old worker retires), and the old worker's exit, each timed from the leak. The new
//! worker's value is read, the load runs `settle` more, and stops with its counts.
//!
//! With the minimal retire of this branch (the old worker waits for its connections up to
//! `drain_timeout_ms`, then exits), the pooled clients' connections to the old worker are
//! closed at the drain deadline: their next command fails on the closed connection and is
//! retried once on a new one (`retried`); `errors` counts what failed even then.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::env::{EnvBuilder, ENDPOINT_NAME};
use crate::Env;

/// What a phase leaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leak {
    Fds,
    Memory,
    Conns,
}

impl Leak {
    pub const ALL: [Leak; 3] = [Leak::Fds, Leak::Memory, Leak::Conns];

    /// The `resource=` of `POST /debug/leak`.
    pub fn param(self) -> &'static str {
        match self {
            Leak::Fds => "fds",
            Leak::Memory => "memory",
            Leak::Conns => "conns",
        }
    }

    /// The watchdog's resource label.
    fn resource(self) -> &'static str {
        match self {
            Leak::Fds => "fds",
            Leak::Memory => "memory",
            Leak::Conns => "backend_conns",
        }
    }

    fn scope(self) -> &'static str {
        match self {
            Leak::Conns => ENDPOINT_NAME,
            _ => "worker",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Leak::Fds => "fds",
            Leak::Memory => "MiB",
            Leak::Conns => "conns",
        }
    }
}

#[derive(Clone, Debug)]
pub struct LeakOptions {
    pub leaks: Vec<Leak>,
    /// `watchdog.sustain_s` of the drill's config.
    pub sustain_s: u64,
    /// Load after the old worker exited, per phase.
    pub settle: Duration,
    /// Pooled redis-py clients (plus one connect loop).
    pub clients: usize,
    pub pace_ms: f64,
    /// How long a phase may take from the leak to the old worker's exit.
    pub timeout: Duration,
}

impl Default for LeakOptions {
    fn default() -> Self {
        Self {
            leaks: Leak::ALL.to_vec(),
            sustain_s: 1,
            settle: Duration::from_millis(500),
            clients: 4,
            pace_ms: 2.0,
            timeout: Duration::from_secs(20),
        }
    }
}

/// Memory budget of the drill's proxy (the RSS threshold is `rss_percent` of it).
pub const MEMORY_BUDGET: u64 = 64 * 1024 * 1024;
/// `max_dedicated` of the drill's backend (the connection threshold grows with it).
pub const MAX_DEDICATED: u32 = 4;
/// The drill's `drain_timeout_ms` (the old worker's pooled connections close at it).
pub const DRAIN_TIMEOUT_MS: u64 = 2000;

/// The drill's environment: one pod, fault injection on, the watchdog's sustain and
/// replacement interval short.
pub fn env_builder(builder: EnvBuilder, opts: &LeakOptions) -> EnvBuilder {
    builder
        .pods(["a"])
        .drain_timeout_ms(DRAIN_TIMEOUT_MS)
        .proxy_setting("memory_budget_bytes", MEMORY_BUDGET)
        .backend_option("max_dedicated", MAX_DEDICATED)
        .extra_config(&format!(
            "watchdog: {{sustain_s: {}, interval_ms: 200, min_replace_interval_s: 1}}\ndebug: {{fault_injection: true}}\n",
            opts.sustain_s
        ))
}

/// One phase's figures. Times are from the leak (the admin request returned).
#[derive(Clone, Debug, Default)]
pub struct PhaseReport {
    pub leak: Option<Leak>,
    /// Leaked: descriptors, MiB or connections.
    pub amount: u64,
    /// The old worker's value before the leak, after it; the watchdog's threshold; the new
    /// worker's value (bytes for memory).
    pub before: u64,
    pub leaked: u64,
    pub threshold: u64,
    pub after: u64,
    pub detected: Option<Duration>,
    pub successor: Option<Duration>,
    pub serving: Option<Duration>,
    pub retired: Option<Duration>,
    pub old_pid: u32,
    pub new_pid: u32,
    pub load: LoadCounts,
}

/// What the load counted (see `tests/tools/leak_load.py`).
#[derive(Clone, Debug, Default)]
pub struct LoadCounts {
    pub ops: u64,
    pub retried: u64,
    pub errors: BTreeMap<String, u64>,
    pub connects: u64,
    pub refused: u64,
    pub connect_errors: BTreeMap<String, u64>,
}

impl LoadCounts {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn connect_errors_total(&self) -> u64 {
        self.connect_errors.values().sum()
    }

    fn from_json(v: &Value) -> Self {
        let map = |k: &str| -> BTreeMap<String, u64> {
            v[k].as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            ops: v["ops"].as_u64().unwrap_or(0),
            retried: v["retried"].as_u64().unwrap_or(0),
            errors: map("errors"),
            connects: v["connects"].as_u64().unwrap_or(0),
            refused: v["refused"].as_u64().unwrap_or(0),
            connect_errors: map("connect_errors"),
        }
    }
}

/// `tests/tools/leak_load.py`.
pub fn load_script() -> PathBuf {
    crate::project_root()
        .join("tests")
        .join("tools")
        .join("leak_load.py")
}

/// The drill's load (`tests/tools/leak_load.py`) in pod `a`, running until [`Load::stop`].
pub struct Load {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Load {
    /// Starts the load; returns once every client had a success.
    pub fn start(env: &Env, opts: &LeakOptions) -> Result<Self> {
        let addr = env.service_addr();
        let mut child = env
            .pod("a")
            .cmd("python3")
            .arg(load_script())
            .args(["--host", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--clients", &opts.clients.to_string()])
            .args(["--pace-ms", &opts.pace_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting leak_load.py (python3 with redis-py: `cargo xtask setup`)")?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().context("load stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut load = Self {
            child,
            stdin,
            lines,
        };
        load.wait_event("ready", Duration::from_secs(40))?;
        Ok(load)
    }

    fn wait_event(&mut self, key: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|_| anyhow!("the load printed no {key:?} within {timeout:?}"))?;
            let v: Value = serde_json::from_str(&line)
                .with_context(|| format!("load output is not JSON: {line}"))?;
            if v["event"] == key {
                return Ok(v);
            }
            if v.get(key).is_some() {
                return Ok(v[key].clone());
            }
        }
    }

    /// Stops the load; its counts.
    pub fn stop(mut self) -> Result<LoadCounts> {
        drop(self.stdin.take());
        let r = self.wait_event("result", Duration::from_secs(20));
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(LoadCounts::from_json(&r?))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The supervisor's children (workers: current, successor, retiring).
pub fn workers(env: &Env) -> Result<Vec<u32>> {
    let pid = env.agent().pid().context("agent is not running")?;
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect())
}

/// The only worker (waits until there is exactly one).
pub fn only_worker(env: &Env) -> Result<u32> {
    crate::wait_until("exactly one worker", Duration::from_secs(15), || {
        let w = workers(env)?;
        Ok((w.len() == 1).then(|| w[0]))
    })
}

fn open_fds(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count() as u64)
}

/// A sample of `/metrics` (`name{labels} value`).
fn metric(env: &Env, name: &str, labels: &str) -> Result<Option<f64>> {
    let (_, body) = env.agent().http_get("/metrics")?;
    let prefix = format!("{name}{{{labels}}} ");
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok())))
}

fn watchdog_metric(env: &Env, which: &str, leak: Leak) -> Result<u64> {
    let labels = format!(
        "resource=\"{}\",scope=\"{}\"",
        leak.resource(),
        leak.scope()
    );
    crate::wait_until(
        &format!("datamesh_agent_watchdog_{which}{{{labels}}}"),
        Duration::from_secs(5),
        || Ok(metric(env, &format!("datamesh_agent_watchdog_{which}"), &labels)?.map(|v| v as u64)),
    )
}

/// The worker's value of what `leak` leaks, read from outside where possible.
fn value(env: &Env, pid: u32, leak: Leak) -> Result<u64> {
    match leak {
        Leak::Fds => open_fds(pid),
        Leak::Memory => Ok(crate::proc::rss_kib(pid)? * 1024),
        Leak::Conns => watchdog_metric(env, "value", leak),
    }
}

/// The agent log's text from byte `from` on.
fn log_since(env: &Env, from: usize) -> String {
    let text = std::fs::read(env.agent().log_path()).unwrap_or_default();
    String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned()
}

fn log_len(env: &Env) -> usize {
    std::fs::metadata(env.agent().log_path()).map_or(0, |m| m.len() as usize)
}

/// Runs every phase of `opts.leaks` in `env` (built with [`env_builder`]).
pub fn run(env: &Env, opts: &LeakOptions) -> Result<Vec<PhaseReport>> {
    let mut out = Vec::new();
    for &leak in &opts.leaks {
        let r = phase(env, leak, opts).with_context(|| {
            format!(
                "leak {}; agent log tail:\n{}",
                leak.param(),
                crate::tail(env.agent().log_path(), 40)
            )
        })?;
        out.push(r);
    }
    Ok(out)
}

fn phase(env: &Env, leak: Leak, opts: &LeakOptions) -> Result<PhaseReport> {
    let load = Load::start(env, opts)?;
    // The last phase's replacement is over: one worker, the watchdog's interval passed.
    let old = only_worker(env)?;
    std::thread::sleep(Duration::from_millis(400));
    let before = value(env, old, leak)?;
    let threshold = watchdog_metric(env, "threshold", leak)?;
    ensure!(
        before < threshold,
        "{} is over its threshold before the leak: {before} > {threshold}",
        leak.resource()
    );
    let amount = match leak {
        Leak::Fds => threshold - before + 200,
        Leak::Memory => (threshold - before) / (1024 * 1024) + 32,
        Leak::Conns => threshold - before + 8,
    };
    let from = log_len(env);
    let (status, body) = env.agent().http_request(
        "POST",
        &format!("/debug/leak?resource={}&amount={amount}", leak.param()),
        "",
    )?;
    let t0 = Instant::now();
    ensure!(status == 200, "POST /debug/leak: {status} {body}");
    let leaked = match leak {
        // The gauge: once the watchdog sampled the leaked connections.
        Leak::Conns => crate::wait_until(
            "the leaked connections in the watchdog's gauge",
            Duration::from_secs(3),
            || {
                let v = value(env, old, leak)?;
                Ok((v > threshold).then_some(v))
            },
        )?,
        _ => value(env, old, leak)?,
    };
    let mut r = PhaseReport {
        leak: Some(leak),
        amount,
        before,
        leaked,
        threshold,
        old_pid: old,
        ..PhaseReport::default()
    };
    // Follow the log: breach, successor started, successor serving, old worker gone.
    loop {
        let log = log_since(env, from);
        let seen = |s: &str| log.contains(s);
        let now = t0.elapsed();
        if r.detected.is_none() && seen("watchdog: budget exceeded") {
            r.detected = Some(now);
        }
        if r.successor.is_none() && seen("replacing the worker gracefully") {
            r.successor = Some(now);
        }
        if r.serving.is_none() && seen("the successor serves") {
            r.serving = Some(now);
        }
        if r.retired.is_none() && seen("retired worker") {
            r.retired = Some(now);
        }
        if r.retired.is_some() {
            break;
        }
        if seen("graceful replacement failed") {
            bail!("the graceful replacement failed");
        }
        if now > opts.timeout {
            bail!(
                "the leaking worker was not replaced within {:?}",
                opts.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        !crate::pid_alive(old) || !workers(env)?.contains(&old),
        "the old worker {old} is still there"
    );
    r.new_pid = only_worker(env)?;
    // The new worker's own figure (the gauge once sampled).
    std::thread::sleep(Duration::from_millis(300));
    r.after = value(env, r.new_pid, leak)?;
    std::thread::sleep(opts.settle);
    r.load = load.stop()?;
    Ok(r)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn shown(leak: Leak, v: u64) -> String {
    match leak {
        Leak::Memory => format!("{} MiB", v / (1024 * 1024)),
        _ => v.to_string(),
    }
}

fn kinds(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "0".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The drill's table: one row per leak.
pub fn table(rows: &[PhaseReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| leak | amount | before | leaked | threshold | new worker | detected s | successor s | serving s | old exited s | refused connects | connects ok | client errors | retried cmds | cmds ok |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let Some(leak) = r.leak else { continue };
        let _ = writeln!(
            s,
            "| {} | {} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            leak.resource(),
            r.amount,
            leak.unit(),
            shown(leak, r.before),
            shown(leak, r.leaked),
            shown(leak, r.threshold),
            shown(leak, r.after),
            secs(r.detected),
            secs(r.successor),
            secs(r.serving),
            secs(r.retired),
            r.load.refused,
            r.load.connects,
            kinds(&r.load.errors),
            r.load.retried,
            r.load.ops,
        );
        if !r.load.connect_errors.is_empty() {
            let _ = writeln!(
                s,
                "|   connect errors: {} | | | | | | | | | | | | | | |",
                kinds(&r.load.connect_errors)
            );
        }
    }
    s
}
