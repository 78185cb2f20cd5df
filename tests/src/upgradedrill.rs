//! The upgrade drill (issue 9): zero-error restart, upgrade and rollback of the agent under
//! client load.
//!
//! Three pods load the agent the whole time (`tests/py/conn_load.py`): `app-1` through a
//! redis-py connection pool with redis-py's default retries, `app-2` the same with retries off
//! (every error a lost connection would cause is seen), and `php` with a new connection per
//! command (PHP style), which counts refused connects. Meanwhile the agent is replaced three
//! times, each by [`Agent::upgrade_to`] (the successor takes the listening sockets over the
//! upgrade socket; the old agent drains and exits on SIGTERM, as Kubernetes deletes the old pod):
//! 1. restart: the same build (the data plane is adopted as it is);
//! 2. upgrade: to the `abi-next` build (another ABI version and a `PodCounters` field more in
//!    the middle of the struct: new maps, counters carried over by field name);
//! 3. rollback: back to the first build (maps replaced again, the extra field dropped).
//!
//! For each step: how long the successor took to serve and the old agent to drain, the data
//! plane mode the successor reported, and the pods' counters before and after (carried over:
//! never lower). Over the whole run: client errors, refused connects, and the capture gap
//! (connects the `php` pod made that the data plane did not count as captured: they would
//! have gone to Redis directly).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;

use crate::agent::Takeover;
use crate::proxy::python;
use crate::Env;

/// The pods and how each loads.
pub const POOL_POD: &str = "app-1";
pub const NORETRY_POD: &str = "app-2";
pub const SHORT_POD: &str = "php";

pub fn env_builder(bin: &Path) -> crate::env::EnvBuilder {
    Env::builder()
        .pods([POOL_POD, NORETRY_POD, SHORT_POD])
        .drain_timeout_ms(3000)
        .agent_bin(bin.to_path_buf())
}

#[derive(Clone, Debug)]
pub struct UpgradeOptions {
    /// The first build (running when the drill starts) and the `abi-next` build.
    pub first: PathBuf,
    pub next: PathBuf,
    /// Load between the steps, seconds.
    pub between: f64,
}

/// One replacement of the agent.
#[derive(Debug)]
pub struct Step {
    pub name: &'static str,
    pub takeover: Takeover,
    /// `dataplane` of the successor's ready file (adopted, upgraded, ...).
    pub dataplane: String,
    /// Per pod: (connects_captured, commands) before and after.
    pub before: BTreeMap<String, (u64, u64)>,
    pub after: BTreeMap<String, (u64, u64)>,
    pub failopen_after: u64,
}

#[derive(Debug)]
pub struct UpgradeReport {
    pub steps: Vec<Step>,
    /// conn_load.py's JSON per pod.
    pub loads: BTreeMap<String, Value>,
    /// Per pod at the end: connects_captured, connects_failopen, connects_refused.
    pub end_counters: BTreeMap<String, BTreeMap<String, u64>>,
}

impl UpgradeReport {
    pub fn errors(&self, pod: &str) -> u64 {
        self.loads
            .get(pod)
            .and_then(|v| v.get("errors"))
            .and_then(Value::as_object)
            .map(|o| o.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    }

    pub fn error_kind(&self, pod: &str, kind: &str) -> u64 {
        self.loads
            .get(pod)
            .and_then(|v| v.get("errors"))
            .and_then(|e| e.get(kind))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    pub fn ok(&self, pod: &str) -> u64 {
        self.loads
            .get(pod)
            .and_then(|v| v.get("ok"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// Connects the short-connection pod made.
    pub fn connects(&self) -> u64 {
        self.loads
            .get(SHORT_POD)
            .and_then(|v| v.get("connects"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    fn counter(&self, pod: &str, k: &str) -> u64 {
        self.end_counters
            .get(pod)
            .and_then(|m| m.get(k))
            .copied()
            .unwrap_or(0)
    }

    /// Connects of the short-connection pod the data plane did not count as captured.
    pub fn capture_gap(&self) -> u64 {
        self.connects()
            .saturating_sub(self.counter(SHORT_POD, "connects_captured"))
    }

    pub fn failopen(&self) -> u64 {
        [POOL_POD, NORETRY_POD, SHORT_POD]
            .iter()
            .map(|p| self.counter(p, "connects_failopen"))
            .sum()
    }

    /// Steps whose counters went down for some pod (not carried over).
    pub fn counters_lost(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.steps {
            for (pod, (c0, m0)) in &s.before {
                let (c1, m1) = s.after.get(pod).copied().unwrap_or_default();
                if c1 < *c0 || m1 < *m0 {
                    out.push(format!(
                        "{}: {pod} captured {c0} -> {c1}, commands {m0} -> {m1}",
                        s.name
                    ));
                }
            }
        }
        out
    }
}

fn counters(env: &Env) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut m = BTreeMap::new();
    for p in [POOL_POD, NORETRY_POD, SHORT_POD] {
        let c = env.agent().pod_counters(env.pod(p).netns_name())?;
        m.insert(
            p.to_string(),
            (
                c.get("connects_captured").copied().unwrap_or(0),
                c.get("commands").copied().unwrap_or(0),
            ),
        );
    }
    Ok(m)
}

fn load(
    cmd: std::process::Command,
    svc: std::net::SocketAddr,
    pod: &str,
    args: &[&str],
    stop: &Path,
) -> Result<Value> {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend([
        "--host".into(),
        svc.ip().to_string(),
        "--port".into(),
        svc.port().to_string(),
        "--seconds".into(),
        "600".into(),
        "--stop-file".into(),
        stop.display().to_string(),
    ]);
    python(cmd, "conn_load.py", &a).with_context(|| format!("conn_load.py in pod {pod}"))
}

/// Runs the drill on `env` (built with [`env_builder`] on `o.first`).
pub fn run(env: &mut Env, o: &UpgradeOptions) -> Result<UpgradeReport> {
    let stop = env.run_dir().join("upgrade-drill.stop");
    let _ = std::fs::remove_file(&stop);
    let pause = Duration::from_secs_f64(o.between);
    let plan: [(&'static str, PathBuf); 3] = [
        ("restart (same build)", o.first.clone()),
        ("upgrade to abi-next", o.next.clone()),
        ("rollback to the first build", o.first.clone()),
    ];
    let svc = env.service_addr();
    // The loads own their commands (the pods' netns and cgroups), so the steps may have the
    // env (its agent) mutably meanwhile.
    let loads_spec: [(&str, std::process::Command, &[&str]); 3] = [
        (
            POOL_POD,
            env.pod(POOL_POD).cmd("python3"),
            &["pool", "--threads", "4"],
        ),
        (
            NORETRY_POD,
            env.pod(NORETRY_POD).cmd("python3"),
            &["pool", "--threads", "4", "--retries", "0"],
        ),
        (
            SHORT_POD,
            env.pod(SHORT_POD).cmd("python3"),
            &["short", "--threads", "2", "--interval", "0.005"],
        ),
    ];
    let (loads, steps) = thread::scope(|s| -> Result<_> {
        let stop_ref = stop.as_path();
        let handles: Vec<_> = loads_spec
            .into_iter()
            .map(|(pod, cmd, args)| (pod, s.spawn(move || load(cmd, svc, pod, args, stop_ref))))
            .collect();
        let steps = run_steps(env, &plan, pause);
        let _ = std::fs::write(&stop, b"stop");
        let mut loads = BTreeMap::new();
        for (pod, h) in handles {
            let v = h
                .join()
                .map_err(|_| anyhow!("load thread of {pod} panicked"))??;
            loads.insert(pod.to_string(), v);
        }
        Ok((loads, steps?))
    })?;
    let mut end_counters = BTreeMap::new();
    for p in [POOL_POD, NORETRY_POD, SHORT_POD] {
        end_counters.insert(
            p.to_string(),
            env.agent().pod_counters(env.pod(p).netns_name())?,
        );
    }
    let _ = std::fs::remove_file(&stop);
    Ok(UpgradeReport {
        steps,
        loads,
        end_counters,
    })
}

fn run_steps(
    env: &mut Env,
    plan: &[(&'static str, PathBuf)],
    pause: Duration,
) -> Result<Vec<Step>> {
    thread::sleep(pause);
    let mut steps = Vec::new();
    for (name, bin) in plan {
        let before = counters(env)?;
        let takeover = env.agent_mut().upgrade_to(bin)?;
        let dataplane = env.agent().ready()?.dataplane.clone();
        eprintln!(
            "upgrade drill: {name}: successor ready after {} ms ({dataplane}), old agent gone after {} ms ({})",
            takeover.ready_after.as_millis(),
            takeover.old_exit_after.as_millis(),
            takeover.old_status
        );
        thread::sleep(pause);
        let after = counters(env)?;
        let failopen_after = [POOL_POD, NORETRY_POD, SHORT_POD]
            .iter()
            .map(|p| {
                env.agent()
                    .pod_counter(env.pod(p).netns_name(), "connects_failopen")
            })
            .sum::<Result<u64>>()?;
        steps.push(Step {
            name,
            takeover,
            dataplane,
            before,
            after,
            failopen_after,
        });
    }
    Ok(steps)
}

/// The drill's table.
pub fn table(r: &UpgradeReport) -> String {
    let mut t = String::new();
    t.push_str("| step | successor serves after | old agent drained after | data plane | php captured before → after | commands (all pods) before → after | fail-open connects so far |\n|---|---|---|---|---|---|---|\n");
    for s in &r.steps {
        let sum = |m: &BTreeMap<String, (u64, u64)>| m.values().map(|(_, c)| c).sum::<u64>();
        let php = |m: &BTreeMap<String, (u64, u64)>| m.get(SHORT_POD).map_or(0, |(c, _)| *c);
        t.push_str(&format!(
            "| {} | {} ms | {} ms | {} | {} → {} | {} → {} | {} |\n",
            s.name,
            s.takeover.ready_after.as_millis(),
            s.takeover.old_exit_after.as_millis(),
            s.dataplane,
            php(&s.before),
            php(&s.after),
            sum(&s.before),
            sum(&s.after),
            s.failopen_after
        ));
    }
    t.push_str("\n| client | ok | errors | detail |\n|---|---|---|---|\n");
    for (pod, what) in [
        (POOL_POD, "redis-py pool, default retries"),
        (NORETRY_POD, "redis-py pool, retries 0"),
        (SHORT_POD, "new connection per PING"),
    ] {
        let detail = r
            .loads
            .get(pod)
            .and_then(|v| v.get("errors"))
            .map(|e| e.to_string())
            .unwrap_or_default();
        t.push_str(&format!(
            "| {pod} ({what}) | {} | {} | {} |\n",
            r.ok(pod),
            r.errors(pod),
            detail
        ));
    }
    t.push_str(&format!(
        "\nrefused connects: {}; capture gap (php connects not captured): {} of {}; fail-open connects: {}; counters lost: {}\n",
        r.error_kind(SHORT_POD, "refused"),
        r.capture_gap(),
        r.connects(),
        r.failopen(),
        if r.counters_lost().is_empty() {
            "none".to_string()
        } else {
            r.counters_lost().join("; ")
        }
    ));
    t
}

/// The drill's goals: no refused connect, no capture gap, counters carried, no error for
/// clients that reconnect on a clean close.
pub fn check(r: &UpgradeReport) -> Result<()> {
    ensure!(
        r.error_kind(SHORT_POD, "refused") == 0,
        "refused connects during the upgrades:\n{}",
        table(r)
    );
    ensure!(r.capture_gap() == 0, "capture gap:\n{}", table(r));
    ensure!(r.failopen() == 0, "connects failed open:\n{}", table(r));
    ensure!(
        r.counters_lost().is_empty(),
        "counters not carried over:\n{}",
        table(r)
    );
    for p in [POOL_POD, SHORT_POD] {
        ensure!(r.errors(p) == 0, "{p} saw errors:\n{}", table(r));
        ensure!(r.ok(p) > 0, "{p} made no progress:\n{}", table(r));
    }
    Ok(())
}
