//! The restart drill: the agent's own failures under client load from captured pods, one after
//! the other, with what the clients saw in each. Used by `cargo xtask drill restart` (release
//! agent, `--seconds` of load per phase) and `tests/tests/restartdrill.rs` (debug agent, short
//! phases, assertions).
//!
//! | fault | what the drill does | what should happen |
//! |---|---|---|
//! | `worker-kill` | SIGKILL of the proxy worker | the supervisor starts a new worker at once; pod connects wait in the listen backlog meanwhile (none refused) |
//! | `worker-stop` | SIGSTOP of the worker | the health check finds it hung, kills and replaces it within 3 s |
//! | `agent-kill` | SIGKILL of the whole agent (supervisor, and with it the worker), then a start of the agent again, as the kubelet would restart the container | the listeners close, the kernel drops them from `dm_listeners`, capture fails open at once: connects go straight to Redis until the new agent serves |
//!
//! The load, all from captured pods to the service address:
//! - pod `load`: two `tests/tools/restart_load.py` processes, pooled redis-py clients doing
//!   SET/GET, one with no client retry (every command that dies with a connection is an
//!   error), one that retries once on a connection error (what remains is what an application
//!   with a usual pooled client sees);
//! - pod `php`: `dmprobe timeline`, short-lived connections back to back (connect, PING, close,
//!   like PHP), each classified: served through the proxy, served directly (fail-open),
//!   refused (`ECONNREFUSED` at connect), or established and then lost (reset or EOF before
//!   the PONG: a connection the kernel had accepted into a listener's backlog that no worker
//!   ever accepted).
//!
//! Times are CLOCK_MONOTONIC, shared by this process, the load script and the probe.

use crate::drill::JsonLoad;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;

use crate::drill::mono_now;
use crate::proc::status_text;
use crate::{tail, Env, EnvBuilder};

/// Pod of the pooled redis-py loads.
pub const LOAD_POD: &str = "load";
/// Pod of the short-lived-connection loop.
pub const PHP_POD: &str = "php";

/// One fault of the drill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    WorkerKill,
    WorkerStop,
    AgentKill,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::WorkerKill, Fault::WorkerStop, Fault::AgentKill];

    pub fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker-kill",
            Fault::WorkerStop => "worker-stop",
            Fault::AgentKill => "agent-kill",
        }
    }
}

/// How the drill runs.
#[derive(Clone, Debug)]
pub struct RestartOptions {
    /// `dmprobe` (the tests' `CARGO_BIN_EXE_dmprobe`, or a release build for the xtask).
    pub probe_bin: PathBuf,
    /// Load before the first fault.
    pub warmup: Duration,
    /// Load after each fault once the agent serves again, before the next fault.
    pub settle: Duration,
    /// agent-kill: how long the agent stays dead before it is started again.
    pub dead_for: Duration,
    /// Threads of each redis-py load.
    pub clients: u32,
    /// Pause after each command of every redis-py client, ms.
    pub pace_ms: f64,
    /// Socket timeout of the redis-py clients, s (above the 3 s a hung worker may take).
    pub timeout_s: f64,
}

impl RestartOptions {
    pub fn new(probe_bin: PathBuf) -> Self {
        Self {
            probe_bin,
            warmup: Duration::from_secs(1),
            settle: Duration::from_secs(2),
            dead_for: Duration::from_secs(1),
            clients: 4,
            pace_ms: 2.0,
            timeout_s: 5.0,
        }
    }
}

/// What one redis-py load saw in one phase (commands started in it).
#[derive(Clone, Debug, Default)]
pub struct LoadPhase {
    pub ops: u64,
    pub ok: u64,
    pub errors: u64,
    pub samples: Vec<String>,
    pub max_stall_ms: f64,
}

/// The short-lived connections started in one phase, by outcome.
#[derive(Clone, Debug, Default)]
pub struct ProbePhase {
    pub attempts: u64,
    /// Served through the proxy.
    pub proxied: u64,
    /// Served by Redis directly (capture failed open).
    pub direct: u64,
    /// `ECONNREFUSED` at connect.
    pub refused: u64,
    /// Of `refused`, those started within [`KILL_RACE_MS`] after the phase's start (the
    /// fault): rewritten to the listener in the microseconds before it closed with its
    /// process. The one refusal the listener gate cannot rule out.
    pub refused_in_race: u64,
    /// Other connect failures (timeouts...), except a reset.
    pub connect_errors: u64,
    /// Their kinds (`connect:<kind>`), for messages.
    pub connect_error_kinds: std::collections::BTreeMap<String, u64>,
    /// Taken into the proxy listener's queue, then reset or closed before the PONG: at the
    /// connect (`ECONNRESET` during the handshake) or after it. These are the connections a
    /// listener closing with its process takes along.
    pub lost_proxied: u64,
    /// Established to Redis directly, then failed.
    pub lost_direct: u64,
    /// Fault -> start of the first direct connection, ms.
    pub first_direct_ms: Option<f64>,
    /// Fault -> start of the last connection that went to the proxy (served or not) before
    /// the first direct one, ms.
    pub last_proxied_before_direct_ms: Option<f64>,
    /// Fault -> start of the first connection served through the proxy again after a direct
    /// one, ms (agent-kill: capture resumed).
    pub proxied_again_ms: Option<f64>,
    /// The slowest attempt, ms (a connect waiting in a backlog shows here).
    pub slowest_ms: f64,
}

/// One fault's figures.
#[derive(Clone, Debug)]
pub struct PhaseReport {
    pub fault: Fault,
    /// Fault -> a new worker process exists (worker faults), ms.
    pub new_worker_ms: Option<f64>,
    /// Fault -> the agent answers `/ready` 200 again (a new worker, or the restarted agent), ms.
    pub recovered_ms: f64,
    pub probe: ProbePhase,
    pub noretry: LoadPhase,
    pub retry1: LoadPhase,
    /// Pod connects let through to Redis by capture (both pods), from the pods' counters.
    pub failopen_connects: u64,
}

/// The whole drill.
#[derive(Clone, Debug)]
pub struct RestartReport {
    pub phases: Vec<PhaseReport>,
    /// Phase `warmup` (before any fault): the same figures, the baseline.
    pub warmup: (ProbePhase, LoadPhase, LoadPhase),
}

/// The environment the drill needs: two pods under the agent.
pub fn env_builder(builder: EnvBuilder) -> EnvBuilder {
    builder.pods([LOAD_POD, PHP_POD])
}

/// `tests/tools/restart_load.py`.
pub fn load_script() -> PathBuf {
    crate::project_root()
        .join("tests")
        .join("tools")
        .join("restart_load.py")
}

/// One restart load process (`tests/tools/restart_load.py`) in the load pod.
struct Loader(JsonLoad);

impl Loader {
    fn spawn(env: &Env, label: &str, retries: u32, opts: &RestartOptions) -> Result<Self> {
        let script = load_script();
        ensure!(script.is_file(), "{} is missing", script.display());
        let mut cmd = env.pod(LOAD_POD).cmd("python3");
        cmd.arg(&script)
            .args(["--label", label])
            .args(["--addr", &env.service_addr().to_string()])
            .args(["--clients", &opts.clients.to_string()])
            .args(["--retries", &retries.to_string()])
            .args(["--pace-ms", &opts.pace_ms.to_string()])
            .args(["--timeout", &opts.timeout_s.to_string()]);
        let stderr = env.run_dir().join(format!("restart-load-{label}.stderr"));
        Ok(Self(JsonLoad::spawn(label, cmd, stderr)?))
    }

    fn wait_ready(&mut self) -> Result<()> {
        self.0.wait_ready(Duration::from_secs(40))
    }

    /// Stops the load and returns its per-phase figures.
    fn finish(mut self, phases: &[(String, f64, f64)]) -> Result<Value> {
        self.0.send_stop(&serde_json::json!({ "phases": phases }))?;
        let v = self.0.next_json(Duration::from_secs(30))?;
        let r = v
            .get("result")
            .cloned()
            .ok_or_else(|| anyhow!("the {} load printed {v}", self.0.label))?;
        if let Some(f) = r.get("fatal").and_then(Value::as_object) {
            ensure!(
                f.is_empty(),
                "{} load clients died of a bug: {f:?}",
                self.0.label
            );
        }
        Ok(r)
    }
}

/// kill(2) on an agent's worker (tests and drills).
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) on the agent's worker, a pid read from the supervisor's children.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill(2) on the worker");
    }
    Ok(())
}

/// Waits until the agent answers `/ready` 200 (served by a worker).
pub fn wait_ready(env: &Env, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok((200, _)) = env.agent().http_get("/ready") {
            return Ok(());
        }
        ensure!(t0.elapsed() < timeout, "/ready not 200 within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn failopen_total(env: &Env) -> Result<u64> {
    let mut n = 0;
    for pod in [LOAD_POD, PHP_POD] {
        n += env
            .agent()
            .pod_counter(env.pod(pod).netns_name(), "connects_failopen")?;
    }
    Ok(n)
}

/// Injects `fault` and waits until the agent serves again; returns (new worker ms, ready ms).
fn inject(env: &mut Env, fault: Fault, opts: &RestartOptions) -> Result<(Option<f64>, f64)> {
    let t0 = Instant::now();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match fault {
        Fault::WorkerKill | Fault::WorkerStop => {
            let old = env.agent().worker_pid()?.context("no worker")?;
            let sig = if fault == Fault::WorkerKill {
                libc::SIGKILL
            } else {
                libc::SIGSTOP
            };
            signal(old, sig)?;
            env.agent()
                .wait_new_worker(Some(old), Duration::from_secs(10))?;
            let spawned = ms(t0.elapsed());
            wait_ready(env, Duration::from_secs(30))?;
            Ok((Some(spawned), ms(t0.elapsed())))
        }
        Fault::AgentKill => {
            env.agent_mut().kill9()?;
            std::thread::sleep(opts.dead_for);
            // As the kubelet restarts the container: same config, same pin dir.
            env.agent_mut().spawn()?;
            wait_ready(env, Duration::from_secs(30))?;
            Ok((None, ms(t0.elapsed())))
        }
    }
}

/// Runs the drill in `env` (built with [`env_builder`] and an agent). The loads are gone when
/// it returns; the agent stays in `env`.
pub fn run(env: &mut Env, opts: &RestartOptions) -> Result<RestartReport> {
    ensure!(
        opts.probe_bin.is_file(),
        "dmprobe not found at {}",
        opts.probe_bin.display()
    );
    let stop_file = env.run_dir().join("restart-drill.stop");
    let _ = std::fs::remove_file(&stop_file);
    let mut noretry = Loader::spawn(env, "noretry", 0, opts)?;
    let mut retry1 = Loader::spawn(env, "retry1", 1, opts)?;
    noretry.wait_ready()?;
    retry1.wait_ready()?;
    let probe_out = env.run_dir().join("restart-drill.probe.json");
    let probe_file = std::fs::File::create(&probe_out)
        .with_context(|| format!("creating {}", probe_out.display()))?;
    let mut probe = env
        .pod(PHP_POD)
        .cmd(&opts.probe_bin)
        .args(["timeline", "--duration-ms", "3600000", "--stop-file"])
        .arg(&stop_file)
        .args(["--addr", &env.service_addr().to_string()])
        .stdout(probe_file)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting dmprobe timeline")?;
    let guard = KillOnDrop(&mut probe);

    let start = mono_now();
    std::thread::sleep(opts.warmup);
    let mut phases: Vec<(String, f64, f64)> = vec![("warmup".into(), start, mono_now())];
    let mut recov = Vec::new();
    for fault in Fault::ALL {
        let before = failopen_total(env)?;
        let t = mono_now();
        let (spawned, ready) = inject(env, fault, opts)
            .with_context(|| format!("{}: the agent did not come back", fault.name()))?;
        std::thread::sleep(opts.settle);
        let after = failopen_total(env)?;
        phases.push((fault.name().to_string(), t, mono_now()));
        recov.push((fault, spawned, ready, after.saturating_sub(before)));
    }
    std::fs::write(&stop_file, b"stop").context("writing the probe's stop file")?;
    let st = wait_exit(guard.0, Duration::from_secs(10))?;
    ensure!(
        st.success(),
        "dmprobe timeline failed ({})",
        status_text(st)
    );
    drop(guard);
    let text = std::fs::read_to_string(&probe_out)?;
    let timeline: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("dmprobe printed no JSON: {}", tail(&probe_out, 3)))?;
    let nr = noretry.finish(&phases)?;
    let r1 = retry1.finish(&phases)?;

    let attempts = parse_attempts(&timeline)?;
    let load_phase = |v: &Value, name: &str| -> LoadPhase {
        let p = &v["phases"][name];
        let samples = p["samples"]
            .as_object()
            .map(|o| {
                o.iter()
                    .flat_map(|(k, s)| {
                        s.as_array()
                            .into_iter()
                            .flatten()
                            .map(move |t| format!("{k}: {}", t.as_str().unwrap_or("")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        LoadPhase {
            ops: p["ops"].as_u64().unwrap_or(0),
            ok: p["ok"].as_u64().unwrap_or(0),
            errors: p["errors"]
                .as_object()
                .map(|o| o.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0),
            samples,
            max_stall_ms: p["max_stall_ms"].as_f64().unwrap_or(0.0),
        }
    };
    let warm = &phases[0];
    let warmup = (
        probe_phase(&attempts, warm.1, warm.2),
        load_phase(&nr, "warmup"),
        load_phase(&r1, "warmup"),
    );
    let mut out = Vec::new();
    for ((name, t0, t1), (fault, spawned, ready, failopen)) in phases[1..].iter().zip(recov) {
        out.push(PhaseReport {
            fault,
            new_worker_ms: spawned,
            recovered_ms: ready,
            probe: probe_phase(&attempts, *t0, *t1),
            noretry: load_phase(&nr, name),
            retry1: load_phase(&r1, name),
            failopen_connects: failopen,
        });
    }
    Ok(RestartReport {
        phases: out,
        warmup,
    })
}

struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        ensure!(
            t0.elapsed() < timeout,
            "process did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (start s, end s, outcome) of every attempt of `dmprobe timeline`.
pub fn parse_attempts(v: &Value) -> Result<Vec<(f64, f64, String)>> {
    v["attempts"]
        .as_array()
        .ok_or_else(|| anyhow!("dmprobe timeline output has no attempts"))?
        .iter()
        .map(|a| {
            let s = a[0].as_u64().ok_or_else(|| anyhow!("bad attempt {a}"))?;
            let e = a[1].as_u64().ok_or_else(|| anyhow!("bad attempt {a}"))?;
            let o = a[2].as_str().ok_or_else(|| anyhow!("bad attempt {a}"))?;
            Ok((s as f64 / 1e6, e as f64 / 1e6, o.to_string()))
        })
        .collect()
}

/// How long after a whole-agent kill a refused connect counts as the race with the listener's
/// close (see [`ProbePhase::refused_in_race`]).
pub const KILL_RACE_MS: f64 = 10.0;

/// Refused connects that started within `window_ms` of `t` (either side).
pub fn refused_near(attempts: &[(f64, f64, String)], t: f64, window_ms: f64) -> u64 {
    attempts
        .iter()
        .filter(|(s, _, o)| o == "connect:ECONNREFUSED" && ((s - t) * 1000.0).abs() < window_ms)
        .count() as u64
}

pub fn probe_phase(attempts: &[(f64, f64, String)], t0: f64, t1: f64) -> ProbePhase {
    let mut p = ProbePhase::default();
    let rel = |t: f64| (t - t0) * 1000.0;
    let mut last_proxied = None;
    for (s, e, o) in attempts.iter().filter(|(s, _, _)| *s >= t0 && *s < t1) {
        p.attempts += 1;
        p.slowest_ms = p.slowest_ms.max((e - s) * 1000.0);
        let proxied_side = o == "proxy" || o.starts_with("io-proxy");
        if proxied_side && p.first_direct_ms.is_none() {
            last_proxied = Some(rel(*s));
        }
        match o.as_str() {
            "proxy" => {
                p.proxied += 1;
                if p.first_direct_ms.is_some() && p.proxied_again_ms.is_none() {
                    p.proxied_again_ms = Some(rel(*s));
                }
            }
            "direct" => {
                p.direct += 1;
                if p.first_direct_ms.is_none() {
                    p.first_direct_ms = Some(rel(*s));
                    p.last_proxied_before_direct_ms = last_proxied;
                }
            }
            "connect:ECONNREFUSED" => {
                p.refused += 1;
                if (0.0..KILL_RACE_MS).contains(&rel(*s)) {
                    p.refused_in_race += 1;
                }
            }
            // A direct connect is never reset by Redis: this one was in a dying listener's
            // queue (handshake or accept queue).
            "connect:ECONNRESET" => p.lost_proxied += 1,
            o if o.starts_with("connect:") => {
                p.connect_errors += 1;
                *p.connect_error_kinds.entry(o.to_string()).or_insert(0) += 1;
            }
            o if o.starts_with("io-proxy") => p.lost_proxied += 1,
            _ => p.lost_direct += 1,
        }
    }
    p
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// The drill's table: one row per fault (and the warm-up baseline).
pub fn table(r: &RestartReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>9} {:>9} | {:>7} {:>7} {:>6} {:>7} {:>6} {:>7} {:>8} | {:>12} {:>12} | {:>8}",
        "fault",
        "worker_ms",
        "ready_ms",
        "conns",
        "refused",
        "direct",
        "lost",
        "errors",
        "1st_dir",
        "slow_ms",
        "noretry_err",
        "retry1_err",
        "failopen"
    );
    let (wp, wn, wr) = &r.warmup;
    let _ = writeln!(
        s,
        "{:<12} {:>9} {:>9} | {:>7} {:>7} {:>6} {:>7} {:>6} {:>7} {:>8.0} | {:>12} {:>12} | {:>8}",
        "(warm-up)",
        "-",
        "-",
        wp.attempts,
        wp.refused,
        wp.direct,
        wp.lost_proxied + wp.lost_direct,
        wp.connect_errors,
        "-",
        wp.slowest_ms,
        format!("{}/{}", wn.errors, wn.ops),
        format!("{}/{}", wr.errors, wr.ops),
        "-"
    );
    for p in &r.phases {
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>9.0} | {:>7} {:>7} {:>6} {:>7} {:>6} {:>7} {:>8.0} | {:>12} {:>12} | {:>8}",
            p.fault.name(),
            opt_ms(p.new_worker_ms),
            p.recovered_ms,
            p.probe.attempts,
            p.probe.refused,
            p.probe.direct,
            p.probe.lost_proxied + p.probe.lost_direct,
            p.probe.connect_errors,
            opt_ms(p.probe.first_direct_ms),
            p.probe.slowest_ms,
            format!("{}/{}", p.noretry.errors, p.noretry.ops),
            format!("{}/{}", p.retry1.errors, p.retry1.ops),
            p.failopen_connects
        );
    }
    let _ = writeln!(
        s,
        "worker_ms: fault -> new worker process; ready_ms: fault -> /ready 200 (agent-kill: \
         includes the time dead and the restart); conns: short-lived connections (connect, PING, \
         close) started in the phase; refused: ECONNREFUSED at connect; direct: served by Redis \
         directly (fail-open); lost: in the proxy listener's queue or established, then reset/EOF \
         before the PONG; errors: other connect failures; 1st_dir: fault -> first direct connection; slow_ms: slowest \
         connection; noretry_err / retry1_err: redis-py commands failed / started (no client \
         retry; one retry on a connection error); failopen: the pods' connects_failopen \
         counter in the phase."
    );
    s
}

/// Per-phase details: the first-direct window and error samples.
pub fn details(r: &RestartReport) -> String {
    let mut s = String::new();
    for p in &r.phases {
        let _ = writeln!(
            s,
            "{}: last proxied connect before the first direct one at {} ms, first direct at {} ms, \
             proxied again at {} ms; lost established (proxy side) {}; noretry stall {:.0} ms, \
             retry1 stall {:.0} ms",
            p.fault.name(),
            opt_ms(p.probe.last_proxied_before_direct_ms),
            opt_ms(p.probe.first_direct_ms),
            opt_ms(p.probe.proxied_again_ms),
            p.probe.lost_proxied,
            p.noretry.max_stall_ms,
            p.retry1.max_stall_ms
        );
        for (label, l) in [("noretry", &p.noretry), ("retry1", &p.retry1)] {
            for sample in l.samples.iter().take(2) {
                let _ = writeln!(s, "    {label}: {sample}");
            }
        }
    }
    s
}
