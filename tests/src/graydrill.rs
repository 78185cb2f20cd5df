//! The gray-release drill of issue 9, shared by `cargo xtask drill gray-release` (release agent,
//! `--seconds` per phase) and `tests/tests/graydrill.rs` (debug agent, short phases,
//! assertions). It walks the operator procedure of README "Gray release of the agent" on two
//! simulated nodes of one machine.
//!
//! Two nodes, one Redis: node A (the stable channel) and node B (the canary) are each an agent
//! attached to its own cgroup subtree of the test instance (`node-a/`, `node-b/`), with its own
//! pin dir (`<pin dir>/node-a`), run dir, admin port and proxy port; both proxy to the one real
//! redis-server on the service address. Each node has one pod in each of three namespaces
//! (`shop.web-a`, `blog.api-a`, `batch.job-a` on A; the same with `-b` on B: a netns-only pod's
//! namespace is its name up to the first `.`), its cgroup under that node's subtree, so only that
//! node's agent sees its connects.
//!
//! Every pod runs `tests/py/gray_load.py` (redis-py, no retries) in every phase: a new connection
//! every `interval` (CLIENT INFO, SET, GET checked, INCR; the proxy's CLIENT INFO line says
//! `fd=-1`, Redis's has a real descriptor, so each connection knows who answered) and one
//! long-lived connection. The phases:
//! 1. `stable`: A runs the stable config (`capture: {mode: all, exclude: ['*']}`: the agent runs,
//!    captures nothing), B the canary config (`capture: {mode: selected, namespaces: [shop]}`):
//!    on B only shop's connects go through the proxy, on A none.
//! 2. `watch`: the same load; both agents' `/metrics` before and after, and every alert of
//!    `deploy/monitoring/prometheusrule.yaml` evaluated on them over the phase (rates over the
//!    phase instead of 5 minutes, no `for:`; the traffic spikes against the `stable` phase).
//! 3. `promote`: B's selection widened to `mode: all` (config rewritten, SIGHUP), then A
//!    promoted to the same: time from each SIGHUP to the first captured connect of every newly
//!    selected pod; no restart (worker pids unchanged).
//! 4. `rollback`: B back to the stable config: time from the SIGHUP to each pod's first direct
//!    connect; A stays promoted.
//!
//! Per phase and node: connects the agent captured (`datamesh-agent pods`, the data plane's
//! per-pod `connects_captured`), connections the clients saw answered by the proxy and by Redis,
//! client commands and errors, and the time the selection change took. Times are CLOCK_MONOTONIC
//! seconds shared with the load script.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::agent::Agent;
use crate::drill::mono_now;
use crate::env::EnvBuilder;
use crate::proxy::python;
use crate::Env;

/// The namespaces of every node's pods, and each one's pod (app) name.
pub const NAMESPACES: [(&str, &str); 3] = [("shop", "web"), ("blog", "api"), ("batch", "job")];
/// The namespace the canary opts in first.
pub const CANARY_NAMESPACE: &str = "shop";

/// Options of the drill.
#[derive(Debug, Clone)]
pub struct GrayOptions {
    /// Seconds of each phase.
    pub seconds: f64,
    /// Each pod opens a new connection this often (seconds): the resolution of the measured
    /// switch times.
    pub interval: f64,
    /// The agent binary both nodes run (`None`: the harness's, `$DATAMESH_AGENT_BIN`).
    pub agent_bin: Option<PathBuf>,
}

impl Default for GrayOptions {
    fn default() -> Self {
        Self {
            seconds: 3.0,
            interval: 0.01,
            agent_bin: None,
        }
    }
}

/// A node's `capture:` configuration in the drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// The stable channel: the agent runs, no pod is captured.
    Stable,
    /// The canary: only [`CANARY_NAMESPACE`] is opted in.
    Canary,
    /// Promoted: every pod.
    All,
}

impl Capture {
    /// The config text (`n`: the instance, whose number prefixes the netns names).
    fn yaml(self, n: u8) -> String {
        match self {
            Self::Stable => "capture: {mode: all, exclude: ['*']}\n".into(),
            Self::Canary => {
                format!("capture: {{mode: selected, namespaces: ['dmt{n}-{CANARY_NAMESPACE}']}}\n")
            }
            Self::All => "capture: {mode: all}\n".into(),
        }
    }

    /// How the table shows it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Stable => "none (exclude *)",
            Self::Canary => "selected [shop]",
            Self::All => "all",
        }
    }

    /// Whether a pod of `namespace` is captured under this config.
    pub fn selects(self, namespace: &str) -> bool {
        match self {
            Self::Stable => false,
            Self::Canary => namespace == CANARY_NAMESPACE,
            Self::All => true,
        }
    }
}

/// The short pod names of node `node` ("a" or "b"): `shop.web-a`, ...
pub fn pod_names(node: &str) -> Vec<String> {
    NAMESPACES
        .iter()
        .map(|(ns, app)| format!("{ns}.{app}-{node}"))
        .collect()
}

/// The namespace of a short pod name (`shop.web-a` → `shop`).
fn namespace(short: &str) -> &str {
    short.split_once('.').map(|(ns, _)| ns).unwrap_or(short)
}

/// The env of the drill: the six pods, each pod's cgroup under its node's subtree; no agent
/// of the env's own (the drill starts one per node).
pub fn env_builder(b: EnvBuilder) -> EnvBuilder {
    let mut b = b.agent(false);
    let mut all = Vec::new();
    for node in ["a", "b"] {
        for p in pod_names(node) {
            b = b.pod_cgroup(&p, format!("node-{node}/pod-{p}"));
            all.push(p);
        }
    }
    b.pods(all)
}

/// One simulated node: its agent, attached under `node-<x>/` of the instance's cgroup.
pub struct Node {
    /// "A" or "B".
    pub name: &'static str,
    /// "stable" or "canary".
    pub role: &'static str,
    /// "a" or "b": the pods' suffix and the cgroup, pin and run sub-directory.
    key: &'static str,
    pub capture: Capture,
    pub agent: Agent,
    /// The worker's pid when the node came up (the drill checks it never changes).
    pub worker_pid: u32,
}

impl Node {
    /// Short names of this node's pods.
    pub fn pods(&self) -> Vec<String> {
        pod_names(self.key)
    }

    fn start(
        env: &Env,
        name: &'static str,
        role: &'static str,
        capture: Capture,
        bin: Option<PathBuf>,
    ) -> Result<Self> {
        let key = if name == "A" { "a" } else { "b" };
        let sub = format!("node-{key}");
        let cgroup = env.cgroup()?.path().join(&sub);
        // The agent's own process sits in its node's subtree, as a DaemonSet's pod sits under
        // the kubelet's cgroup it attaches to.
        let agent_cgroup = cgroup.join("agent");
        std::fs::create_dir_all(&agent_cgroup)
            .with_context(|| format!("creating cgroup {}", agent_cgroup.display()))?;
        let dir = env.run_dir().join(&sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cfg = env.base_agent_config()?;
        cfg.cgroup_path = cgroup.clone();
        cfg.cgroup_root = cgroup;
        cfg.pin_dir = env.pin_dir().join(&sub);
        cfg.extra_yaml = capture.yaml(env.n());
        let agent = Agent::start(cfg, &dir, &agent_cgroup, bin)
            .with_context(|| format!("starting node {name}'s agent"))?;
        let worker_pid = agent
            .worker_pid()?
            .ok_or_else(|| anyhow!("node {name}'s agent has no worker"))?;
        Ok(Self {
            name,
            role,
            key,
            capture,
            agent,
            worker_pid,
        })
    }

    /// Rewrites the node's config with `capture` and sends SIGHUP; returns the monotonic time
    /// of the signal.
    fn reload(&mut self, n: u8, capture: Capture) -> Result<f64> {
        let mut cfg = self.agent.config().clone();
        cfg.extra_yaml = capture.yaml(n);
        self.agent.write_config(cfg)?;
        let t = mono_now();
        self.agent.sighup()?;
        self.capture = capture;
        Ok(t)
    }

    /// `connects_captured` of each of the node's pods (`datamesh-agent pods`), by short name.
    fn captured(&self, env: &Env) -> Result<BTreeMap<String, u64>> {
        let rows = self.agent.pods_json()?;
        let mut m = BTreeMap::new();
        for p in self.pods() {
            let netns = env.pod(&p).netns_name().to_string();
            let v = rows
                .iter()
                .find(|r| r["pod"].as_str() == Some(netns.as_str()))
                .and_then(|r| r["connects_captured"].as_u64())
                .unwrap_or(0);
            m.insert(p, v);
        }
        Ok(m)
    }

    /// The worker's pid now, failing if the supervisor has none or replaced it.
    fn check_same_worker(&self) -> Result<()> {
        let now = self.agent.worker_pid()?;
        ensure!(
            now == Some(self.worker_pid),
            "node {}'s worker changed: {} at the start, {now:?} now (a restart)",
            self.name,
            self.worker_pid
        );
        Ok(())
    }
}

/// Removes the instance's pin dir (the parent of the nodes' pin dirs) after the nodes' agents
/// have uninstalled theirs.
struct PinParent(PathBuf);

impl Drop for PinParent {
    fn drop(&mut self) {
        if self.0.exists() {
            crate::instance::uninstall_pins(&self.0);
        }
    }
}

/// The two nodes; dropping it stops both agents (uninstalling their pins) before the env goes.
pub struct Nodes {
    pub nodes: Vec<Node>,
    _pins: PinParent,
}

impl Nodes {
    /// Starts node A (stable config) and node B (canary config) in `env` (from
    /// [`env_builder`]).
    pub fn start(env: &Env, o: &GrayOptions) -> Result<Self> {
        // The agents' preflight wants their pin dir's parent to exist (bpffs mounted).
        std::fs::create_dir_all(env.pin_dir())
            .with_context(|| format!("creating {}", env.pin_dir().display()))?;
        let pins = PinParent(env.pin_dir().to_path_buf());
        let a = Node::start(env, "A", "stable", Capture::Stable, o.agent_bin.clone())?;
        let b = Node::start(env, "B", "canary", Capture::Canary, o.agent_bin.clone())?;
        Ok(Self {
            nodes: vec![a, b],
            _pins: pins,
        })
    }

    fn log_tails(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "---- node {} agent log tail ----\n{}",
                n.name,
                n.agent.log_tail(30)
            );
        }
        s
    }
}

/// One pod's load in one phase, as `gray_load.py` printed it.
#[derive(Debug, Clone)]
pub struct PodLoad {
    pub pod: String,
    pub node: &'static str,
    /// [t, via, ok, errors] per short connection (via: 1 proxy, 0 Redis, 2 failed).
    pub conns: Vec<(f64, u8, u64, u64)>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// When the long-lived connection was opened (monotonic), who answered it (1 proxy,
    /// 0 Redis, 2 failed) and its errors.
    pub long_t: f64,
    pub long_via: u8,
    pub long_errors: u64,
    /// The data plane's captured connects of the pod during the phase.
    pub captured: u64,
}

impl PodLoad {
    fn parse(pod: &str, node: &'static str, v: &Value) -> Result<Self> {
        let conns = v["conns"]
            .as_array()
            .ok_or_else(|| anyhow!("gray_load.py output has no conns: {v}"))?
            .iter()
            .filter_map(|c| {
                let c = c.as_array()?;
                Some((
                    c.first()?.as_f64()?,
                    u8::try_from(c.get(1)?.as_u64()?).ok()?,
                    c.get(2)?.as_u64()?,
                    c.get(3)?.as_u64()?,
                ))
            })
            .collect();
        let errors = v["errors"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            pod: pod.to_string(),
            node,
            conns,
            ok: v["ok"].as_u64().unwrap_or(0),
            errors,
            long_t: v["long"]["t"].as_f64().unwrap_or(0.0),
            long_via: v["long"]["via"]
                .as_u64()
                .and_then(|x| u8::try_from(x).ok())
                .unwrap_or(2),
            long_errors: v["long"]["errors"].as_u64().unwrap_or(0),
            captured: 0,
        })
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Connections (short ones and the long one) the proxy answered, Redis answered, failed.
    pub fn via_counts(&self) -> (u64, u64, u64) {
        let mut c = [0u64; 3];
        for (_, via, _, _) in &self.conns {
            c[usize::from((*via).min(2))] += 1;
        }
        c[usize::from(self.long_via.min(2))] += 1;
        (c[1], c[0], c[2])
    }

    /// The first short connection at or after `since` answered by `via` (1 proxy, 0 Redis):
    /// ms after `since`; and how many connections after it were answered otherwise (a flap).
    fn switch_after(&self, since: f64, via: u8) -> (Option<f64>, u64) {
        let mut first = None;
        let mut flaps = 0;
        for (t, v, _, _) in &self.conns {
            if *t < since {
                continue;
            }
            match first {
                None if *v == via => first = Some((t - since) * 1000.0),
                Some(_) if *v != via => flaps += 1,
                _ => {}
            }
        }
        (first, flaps)
    }
}

/// A selection change during a phase: the node, the change, and per pod whose path changed
/// the time from the SIGHUP to its first connect on the new path.
#[derive(Debug, Clone)]
pub struct Switch {
    pub node: &'static str,
    pub from: Capture,
    pub to: Capture,
    /// Seconds into the phase of the SIGHUP.
    pub at: f64,
    /// (pod, ms until the first connect on the new path or None, connects on the old path after
    /// that one).
    pub pods: Vec<(String, Option<f64>, u64)>,
}

impl Switch {
    /// The slowest pod's switch time, ms (None when one never switched).
    pub fn worst_ms(&self) -> Option<f64> {
        self.pods
            .iter()
            .map(|(_, ms, _)| *ms)
            .try_fold(0.0f64, |acc, ms| ms.map(|m| acc.max(m)))
    }
}

/// One phase.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
    /// Each node's capture at the phase's start and end (A, B).
    pub capture_start: [Capture; 2],
    pub capture_end: [Capture; 2],
    pub loads: Vec<PodLoad>,
    pub switches: Vec<Switch>,
    /// The monotonic start of the phase.
    pub start: f64,
}

impl Phase {
    /// The loads of node `node` ("A"/"B").
    pub fn node_loads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodLoad> {
        self.loads.iter().filter(move |l| l.node == node)
    }
}

/// A snapshot of one agent's `/metrics`: (name, labels, value) per sample line.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<(String, String, f64)>,
    /// Whether the scrape answered (the `up` of `DataMeshAgentDown`).
    pub up: bool,
    pub at: f64,
}

impl Metrics {
    fn scrape(agent: &Agent) -> Self {
        let at = mono_now();
        match agent.http_get("/metrics") {
            Ok((200, text)) => Self {
                samples: text
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .filter_map(|l| {
                        let (series, value) = l.rsplit_once(' ')?;
                        let value = value.parse::<f64>().ok()?;
                        let (name, labels) = match series.split_once('{') {
                            Some((n, rest)) => (n, rest.trim_end_matches('}')),
                            None => (series, ""),
                        };
                        Some((name.to_string(), labels.to_string(), value))
                    })
                    .collect(),
                up: true,
                at,
            },
            _ => Self {
                up: false,
                at,
                ..Self::default()
            },
        }
    }

    /// Sum of the samples of `name` whose labels contain every one of `labels`.
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|x| l.contains(x)))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The samples of `name` summed by the value of their label `label` (`pod`, ...).
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let key = format!("{label}=\"");
        let mut m = BTreeMap::new();
        for (n, l, v) in &self.samples {
            if n != name {
                continue;
            }
            let Some(rest) = l.find(&key).map(|i| &l[i + key.len()..]) else {
                continue;
            };
            let value = rest.split('"').next().unwrap_or("").to_string();
            *m.entry(value).or_insert(0.0) += v;
        }
        m
    }

    /// Largest sample of `name` (0 when there is none).
    pub fn max(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v)
            .fold(0.0, f64::max)
    }
}

/// One alert of `deploy/monitoring/prometheusrule.yaml` evaluated on one node over the watch
/// phase: whether it would fire, and the figure it looked at.
#[derive(Debug, Clone)]
pub struct AlertEval {
    pub alert: &'static str,
    pub node: &'static str,
    pub firing: bool,
    pub value: String,
}

/// Every alert of the PrometheusRule, evaluated on the counters' increase over the phase
/// (`before` → `after`), with `base` (the stable phase's rates) as the traffic spikes'
/// baseline.
fn evaluate_alerts(
    node: &'static str,
    base: (&Metrics, &Metrics),
    before: &Metrics,
    after: &Metrics,
) -> Vec<AlertEval> {
    let secs = (after.at - before.at).max(0.001);
    let inc = |name: &str, labels: &[&str]| after.sum(name, labels) - before.sum(name, labels);
    let base_secs = (base.1.at - base.0.at).max(0.001);
    let mut v = Vec::new();
    let mut add = |alert: &'static str, firing: bool, value: String| {
        v.push(AlertEval {
            alert,
            node,
            firing,
            value,
        })
    };
    // Per pod and per endpoint: the busiest one's rate against its own rate in `base`.
    for (alert, metric, label) in [
        (
            "DataMeshPodTrafficSpike",
            "datamesh_proxy_pod_commands_total",
            "pod",
        ),
        (
            "DataMeshEndpointTrafficSpike",
            "datamesh_proxy_commands_total",
            "endpoint",
        ),
    ] {
        let rates = |a: &Metrics, b: &Metrics, secs: f64| -> BTreeMap<String, f64> {
            let before = a.by_label(metric, label);
            b.by_label(metric, label)
                .into_iter()
                .map(|(k, x)| {
                    let r = (x - before.get(&k).copied().unwrap_or(0.0)).max(0.0) / secs;
                    (k, r)
                })
                .collect()
        };
        let now = rates(before, after, secs);
        let then = rates(base.0, base.1, base_secs);
        let spiking =
            |(k, r): (&String, &f64)| *r > 3.0 * then.get(k).copied().unwrap_or(0.0) && *r > 100.0;
        let firing = now.iter().any(spiking);
        let busiest = now.iter().max_by(|a, b| a.1.total_cmp(b.1));
        let value = match busiest {
            Some((k, r)) => format!(
                "top {r:.0}/s vs {:.0}/s ({})",
                then.get(k).copied().unwrap_or(0.0),
                // A pod's netns name without the instance's `dmt<N>-` prefix.
                k.split_once('-').map_or(k.as_str(), |(_, r)| r)
            ),
            None => "no traffic".into(),
        };
        add(alert, firing, value);
    }
    let errors = inc("datamesh_proxy_errors_total", &[]);
    let commands = inc("datamesh_proxy_commands_total", &[]);
    add(
        "DataMeshErrorRate",
        commands > 0.0 && errors / commands > 0.01 && errors / secs > 0.1,
        format!("{errors:.0} errors / {commands:.0} commands"),
    );
    let unknown = inc("datamesh_proxy_unknown_outcomes_total", &[]);
    add(
        "DataMeshUnknownOutcomes",
        unknown > 0.0,
        format!("{unknown:.0}"),
    );
    let failed = inc(
        "datamesh_proxy_backend_connects_total",
        &["kind=\"failed\""],
    );
    add(
        "DataMeshBackendConnectFailures",
        failed > 0.0,
        format!("{failed:.0} failed"),
    );
    let depth = after.max("datamesh_proxy_hold_depth");
    add(
        "DataMeshHoldQueueNotDraining",
        depth > 0.0,
        format!("depth {depth:.0}"),
    );
    let expired = inc("datamesh_proxy_hold_total", &["kind=\"expired\""])
        + inc("datamesh_proxy_hold_total", &["kind=\"full\""]);
    add(
        "DataMeshHoldExpired",
        expired > 0.0,
        format!("{expired:.0}"),
    );
    add(
        "DataMeshAgentDown",
        !(before.up && after.up),
        format!("up {}", u8::from(after.up)),
    );
    let beats = inc("datamesh_dataplane_heartbeats_total", &[]);
    let fail_open = after.max("datamesh_agent_capture_fail_open");
    add(
        "DataMeshCaptureFailOpen",
        beats <= 0.0 || fail_open > 0.0,
        format!("{:.0} heartbeats/s", beats / secs),
    );
    let restarts = inc("datamesh_agent_worker_restarts_total", &[]);
    add(
        "DataMeshAgentRestarted",
        beats < 0.0 || restarts > 0.0,
        format!("{restarts:.0} worker restarts"),
    );
    let buffered = after.max("datamesh_proxy_buffered_bytes");
    let budget = after.max("datamesh_proxy_memory_budget_bytes");
    let share = if budget > 0.0 { buffered / budget } else { 0.0 };
    add(
        "DataMeshMemoryBudgetPressure",
        share > 0.8,
        format!("{:.1}% of the budget", share * 100.0),
    );
    let shed = inc(
        "datamesh_proxy_clients_closed_total",
        &["reason=\"memory_budget\""],
    );
    add(
        "DataMeshClientsClosedForMemory",
        shed > 0.0,
        format!("{shed:.0}"),
    );
    let throttled = inc("datamesh_proxy_pod_throttled_total", &[]);
    add(
        "DataMeshPodThrottled",
        throttled > 0.0,
        format!("{throttled:.0}"),
    );
    let key_throttled = inc("datamesh_proxy_key_throttled_total", &[]);
    add(
        "DataMeshKeyThrottled",
        key_throttled > 0.0,
        format!("{key_throttled:.0}"),
    );
    let suspected = after.max("datamesh_proxy_pod_suspected");
    add(
        "DataMeshKeyAttackSuspected",
        suspected > 0.0,
        format!("{suspected:.0}"),
    );
    let hot = after.max("datamesh_proxy_hotkey_ops_per_second");
    add("DataMeshHotKey", hot > 5000.0, format!("{hot:.0} ops/s"));
    v
}

/// What the drill measured.
#[derive(Debug, Clone)]
pub struct GrayReport {
    pub phases: Vec<Phase>,
    pub alerts: Vec<AlertEval>,
    /// Worker restarts seen (pid changes), per node, at the end.
    pub restarts: Vec<(&'static str, u64)>,
    /// The instance number (netns names are `dmt<N>-<pod>`).
    pub n: u8,
}

fn ready_file(env: &Env, short: &str) -> PathBuf {
    env.run_dir().join(format!("gray-ready-{short}"))
}

/// Created when every pod's load is ready: they all start then.
fn go_file(env: &Env) -> PathBuf {
    env.run_dir().join("gray-go")
}

fn load_pod(env: &Env, short: &str, o: &GrayOptions) -> Result<Value> {
    let svc = env.service_addr();
    let args = vec![
        "--host".to_string(),
        svc.ip().to_string(),
        "--port".into(),
        svc.port().to_string(),
        "--seconds".into(),
        o.seconds.to_string(),
        "--interval".into(),
        o.interval.to_string(),
        "--pod".into(),
        short.to_string(),
        "--ready-file".into(),
        ready_file(env, short).display().to_string(),
        "--go-file".into(),
        go_file(env).display().to_string(),
    ];
    python(env.pod(short).cmd("python3"), "gray_load.py", &args)
        .with_context(|| format!("gray_load.py in pod {short}"))
}

/// A selection change planned `at` seconds after every pod's load is running.
struct Planned {
    node: usize,
    at: f64,
    to: Capture,
}

/// Runs one phase: every pod's load, and the planned reloads at their times on this thread.
fn phase(
    env: &Env,
    nodes: &mut Nodes,
    name: &'static str,
    o: &GrayOptions,
    plan: &[Planned],
) -> Result<Phase> {
    let n = env.n();
    let captured0: Vec<BTreeMap<String, u64>> = nodes
        .nodes
        .iter()
        .map(|nd| nd.captured(env))
        .collect::<Result<_>>()?;
    let capture_start = [nodes.nodes[0].capture, nodes.nodes[1].capture];
    let pods: Vec<(String, &'static str)> = nodes
        .nodes
        .iter()
        .flat_map(|nd| nd.pods().into_iter().map(move |p| (p, nd.name)))
        .collect();
    let files = pods
        .iter()
        .map(|(p, _)| ready_file(env, p))
        .chain([go_file(env)]);
    for f in files {
        if f.exists() {
            std::fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
        }
    }
    let (outs, sighups, start) = thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(p, _)| s.spawn(move || load_pod(env, p, o)))
            .collect();
        // Every load waits for the go file once it is up (python's start-up on a busy machine
        // takes from a fraction of a second to seconds): they all start at once, and the
        // reloads are timed from there. A load that died before it got ready shows in its
        // result; the others start after 30 s anyway.
        let _ = crate::wait_until(
            "every pod's load to be ready",
            Duration::from_secs(30),
            || {
                Ok(pods
                    .iter()
                    .all(|(p, _)| ready_file(env, p).exists())
                    .then_some(()))
            },
        );
        let start = mono_now();
        if let Err(e) = std::fs::write(go_file(env), "go\n") {
            eprintln!("graydrill: cannot write the go file: {e}");
        }
        let mut sighups = Vec::new();
        for step in plan {
            let wait = start + step.at - mono_now();
            if wait > 0.0 {
                thread::sleep(Duration::from_secs_f64(wait));
            }
            let nd = &mut nodes.nodes[step.node];
            let from = nd.capture;
            sighups.push(nd.reload(n, step.to).map(|t| (step.node, from, step.to, t)));
        }
        let outs: Vec<Result<Value>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("load thread panicked"))
                    .and_then(|r| r)
            })
            .collect();
        (outs, sighups, start)
    });
    let mut loads = Vec::new();
    for ((p, node), out) in pods.iter().zip(outs) {
        loads.push(PodLoad::parse(p, node, &out?)?);
    }
    for (i, nd) in nodes.nodes.iter().enumerate() {
        let after = nd.captured(env)?;
        for l in loads.iter_mut().filter(|l| l.node == nd.name) {
            l.captured = after
                .get(&l.pod)
                .copied()
                .unwrap_or(0)
                .saturating_sub(captured0[i].get(&l.pod).copied().unwrap_or(0));
        }
    }
    let mut switches = Vec::new();
    for s in sighups {
        let (i, from, to, t) = s?;
        let nd = &nodes.nodes[i];
        let mut pods = Vec::new();
        for l in loads.iter().filter(|l| l.node == nd.name) {
            let ns = namespace(&l.pod);
            if from.selects(ns) == to.selects(ns) {
                continue;
            }
            let (ms, flaps) = l.switch_after(t, u8::from(to.selects(ns)));
            pods.push((l.pod.clone(), ms, flaps));
        }
        switches.push(Switch {
            node: nd.name,
            from,
            to,
            at: t - start,
            pods,
        });
    }
    let p = Phase {
        name,
        seconds: o.seconds,
        capture_start,
        capture_end: [nodes.nodes[0].capture, nodes.nodes[1].capture],
        loads,
        switches,
        start,
    };
    for node in ["A", "B"] {
        let (prox, direct, failed) = sum_via(p.node_loads(node));
        eprintln!(
            "phase {name} node {node}: {prox} connections through the proxy, {direct} direct, {failed} failed, {} errors",
            p.node_loads(node).map(PodLoad::error_count).sum::<u64>()
        );
    }
    Ok(p)
}

fn sum_via<'a>(loads: impl Iterator<Item = &'a PodLoad>) -> (u64, u64, u64) {
    loads.fold((0, 0, 0), |(a, b, c), l| {
        let (x, y, z) = l.via_counts();
        (a + x, b + y, c + z)
    })
}

/// The drill (module docs), in an env from [`env_builder`].
pub fn run(env: &Env, o: &GrayOptions) -> Result<GrayReport> {
    ensure!(o.seconds >= 1.0, "phases need at least 1 s");
    let mut nodes = Nodes::start(env, o)?;
    let r = run_phases(env, &mut nodes, o);
    match r {
        Ok(r) => Ok(r),
        Err(e) => Err(e.context(nodes.log_tails())),
    }
}

fn run_phases(env: &Env, nodes: &mut Nodes, o: &GrayOptions) -> Result<GrayReport> {
    let scrape = |nodes: &Nodes| -> Vec<Metrics> {
        nodes
            .nodes
            .iter()
            .map(|n| Metrics::scrape(&n.agent))
            .collect()
    };
    let m0 = scrape(nodes);
    let stable = phase(env, nodes, "stable", o, &[])?;
    let m1 = scrape(nodes);
    let watch = phase(env, nodes, "watch", o, &[])?;
    let m2 = scrape(nodes);
    let mut alerts = Vec::new();
    for (i, nd) in nodes.nodes.iter().enumerate() {
        alerts.extend(evaluate_alerts(nd.name, (&m0[i], &m1[i]), &m1[i], &m2[i]));
    }
    let s = o.seconds;
    let promote = phase(
        env,
        nodes,
        "promote",
        o,
        &[
            Planned {
                node: 1,
                at: s * 0.25,
                to: Capture::All,
            },
            Planned {
                node: 0,
                at: s * 0.6,
                to: Capture::All,
            },
        ],
    )?;
    let rollback = phase(
        env,
        nodes,
        "rollback",
        o,
        &[Planned {
            node: 1,
            at: s * 0.3,
            to: Capture::Stable,
        }],
    )?;
    let mut restarts = Vec::new();
    let m3 = scrape(nodes);
    for (i, nd) in nodes.nodes.iter().enumerate() {
        nd.check_same_worker()?;
        let r = m3[i].sum("datamesh_agent_worker_restarts_total", &[])
            - m0[i].sum("datamesh_agent_worker_restarts_total", &[]);
        restarts.push((nd.name, r.max(0.0) as u64));
    }
    Ok(GrayReport {
        phases: vec![stable, watch, promote, rollback],
        alerts,
        restarts,
        n: env.n(),
    })
}

/// The drill's main table: one row per phase and node.
pub fn table(r: &GrayReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:<9} {:<34} {:>8} {:>8} {:>7} {:>8} {:>7}  selection change took (SIGHUP -> first connect on the new path)",
        "phase",
        "node",
        "capture",
        "captured",
        "proxied",
        "direct",
        "ops",
        "errors"
    );
    for p in &r.phases {
        for (i, node) in ["A", "B"].into_iter().enumerate() {
            let role = if node == "A" { "stable" } else { "canary" };
            let capture = if p.capture_start[i] == p.capture_end[i] {
                p.capture_start[i].label().to_string()
            } else {
                format!(
                    "{} -> {}",
                    p.capture_start[i].label(),
                    p.capture_end[i].label()
                )
            };
            let loads: Vec<&PodLoad> = p.node_loads(node).collect();
            let captured: u64 = loads.iter().map(|l| l.captured).sum();
            let (prox, direct, _failed) = sum_via(loads.iter().copied());
            let ops: u64 = loads.iter().map(|l| l.ok).sum();
            // Failed connects are among the errors (the load counts each one).
            let errors: u64 = loads.iter().map(|l| l.error_count()).sum();
            let switch = p
                .switches
                .iter()
                .filter(|sw| sw.node == node)
                .map(|sw| {
                    sw.pods
                        .iter()
                        .map(|(pod, ms, _)| match ms {
                            Some(ms) => format!("{} {ms:.0} ms", namespace(pod)),
                            None => format!("{} never", namespace(pod)),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .collect::<Vec<_>>()
                .join("; ");
            let _ = writeln!(
                s,
                "{:<9} {:<9} {:<34} {:>8} {:>8} {:>7} {:>8} {:>7}  {}",
                p.name,
                format!("{node} {role}"),
                capture,
                captured,
                prox,
                direct,
                ops,
                errors,
                if switch.is_empty() { "-" } else { &switch }
            );
        }
    }
    let _ = writeln!(
        s,
        "captured: connects the node's data plane rewrote (datamesh-agent pods, connects_captured); \
         proxied/direct: the clients' connections answered by the proxy / by Redis itself; \
         ops: commands answered right; errors: client errors (exceptions, wrong values, failed connects)."
    );
    let restarts: Vec<String> = r
        .restarts
        .iter()
        .map(|(n, k)| format!("node {n}: {k}"))
        .collect();
    let _ = writeln!(
        s,
        "worker restarts over the drill: {} (worker pids unchanged)",
        restarts.join(", ")
    );
    s
}

/// Per pod: its namespace's captured connects and paths in each phase (the detail behind the
/// table).
pub fn pod_table(r: &GrayReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:<14} {:>8} {:>8} {:>7} {:>6}  long-lived connection",
        "phase", "pod", "captured", "proxied", "direct", "errors"
    );
    for p in &r.phases {
        for l in &p.loads {
            let (prox, direct, _failed) = l.via_counts();
            let _ = writeln!(
                s,
                "{:<9} {:<14} {:>8} {:>8} {:>7} {:>6}  {} ({} errors)",
                p.name,
                l.pod,
                l.captured,
                prox,
                direct,
                l.error_count(),
                match l.long_via {
                    1 => "proxy",
                    0 => "direct",
                    _ => "failed",
                },
                l.long_errors
            );
        }
    }
    s
}

/// The alerts evaluated over the watch phase, one row per alert, one column per node.
pub fn alerts_table(r: &GrayReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<32} {:<34} {:<34}",
        "alert (watch phase)", "node A stable", "node B canary"
    );
    let names: Vec<&'static str> = r
        .alerts
        .iter()
        .filter(|a| a.node == "A")
        .map(|a| a.alert)
        .collect();
    for name in names {
        let cell = |node: &str| {
            r.alerts
                .iter()
                .find(|a| a.alert == name && a.node == node)
                .map(|a| {
                    format!(
                        "{} ({})",
                        if a.firing { "FIRING" } else { "quiet" },
                        a.value
                    )
                })
                .unwrap_or_default()
        };
        let _ = writeln!(s, "{:<32} {:<34} {:<34}", name, cell("A"), cell("B"));
    }
    s
}

/// Every check the test makes, as one list of failures (empty: the drill went as the runbook
/// says).
pub fn problems(r: &GrayReport) -> Vec<String> {
    let mut v = Vec::new();
    for p in &r.phases {
        for l in &p.loads {
            let (prox, direct, failed) = l.via_counts();
            if l.error_count() > 0 || failed > 0 || l.long_errors > 0 {
                v.push(format!(
                    "phase {}: pod {} saw errors {:?} ({failed} failed connects)",
                    p.name, l.pod, l.errors
                ));
            }
            if l.captured != prox {
                v.push(format!(
                    "phase {}: pod {}: the data plane captured {} connects, the proxy answered {prox}",
                    p.name, l.pod, l.captured
                ));
            }
            let i = usize::from(l.node == "B");
            let ns = namespace(&l.pod);
            let (at_start, at_end) = (p.capture_start[i].selects(ns), p.capture_end[i].selects(ns));
            if at_start == at_end {
                let want_direct = !at_start;
                if (want_direct && prox > 0) || (!want_direct && direct > 0) {
                    v.push(format!(
                        "phase {}: pod {} ({}) expected only {} connections, got {prox} proxied and {direct} direct",
                        p.name,
                        l.pod,
                        p.capture_start[i].label(),
                        if want_direct { "direct" } else { "proxied" }
                    ));
                }
            }
            // The long-lived connection takes the path of the selection when it opened (and,
            // being one connection, keeps it through the reloads: its errors are above).
            let sel_then = p
                .switches
                .iter()
                .rfind(|sw| sw.node == l.node && p.start + sw.at <= l.long_t)
                .map_or(p.capture_start[i], |sw| sw.to);
            if l.long_via != u8::from(sel_then.selects(ns)) {
                v.push(format!(
                    "phase {}: pod {}'s long-lived connection went {} under {}",
                    p.name,
                    l.pod,
                    if l.long_via == 1 {
                        "through the proxy"
                    } else {
                        "direct"
                    },
                    sel_then.label()
                ));
            }
        }
        for sw in &p.switches {
            for (pod, ms, flaps) in &sw.pods {
                if ms.is_none() {
                    v.push(format!(
                        "phase {}: pod {pod} never switched after {} -> {}",
                        p.name,
                        sw.from.label(),
                        sw.to.label()
                    ));
                }
                if *flaps > 0 {
                    v.push(format!(
                        "phase {}: pod {pod} went back to the old path {flaps} times after switching",
                        p.name
                    ));
                }
            }
        }
    }
    for a in &r.alerts {
        if a.firing {
            v.push(format!(
                "alert {} would fire on node {} ({})",
                a.alert, a.node, a.value
            ));
        }
    }
    for (node, k) in &r.restarts {
        if *k > 0 {
            v.push(format!("node {node}: {k} worker restarts"));
        }
    }
    v
}

/// Fails with every problem and the tables when the drill did not go as the runbook says.
pub fn check(r: &GrayReport) -> Result<()> {
    let p = problems(r);
    if p.is_empty() {
        return Ok(());
    }
    bail!(
        "the gray-release drill found {} problems:\n  {}\n{}\n{}",
        p.len(),
        p.join("\n  "),
        table(r),
        pod_table(r)
    )
}
