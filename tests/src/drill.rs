//! Failover drills: one fault under load, the same load sent at the same time straight to Redis
//! ("direct") and through the proxy ("datamesh"), so the result table is side by side. Used by
//! `cargo xtask drill failover` (release agent, long loads) and `tests/tests/failover.rs`
//! (debug agent, short loads, assertions on the datamesh side).
//!
//! A drill owns, for one [`Scenario`]: the servers (on the instance's service IP, in its
//! `-outside` cgroup, files under its run dir), the agent's endpoint (`cache`, backend map
//! per topology plus [`DrillOptions::backend`]), the two load processes, the fault and its
//! follow-up, and the [`DrillReport`]. The scenarios:
//!
//! | name | topology | fault |
//! |---|---|---|
//! | `sentinel-kill` | master + replica + 3 sentinels (down-after 1000 ms) | master SIGKILLed; the sentinels promote the replica |
//! | `sentinel-stop` | the same, down-after 10 s (no failover) | master SIGSTOPped for [`DrillOptions::stop_for`], then SIGCONT |
//! | `standalone-restart` | one server, `appendonly yes`, `appendfsync always`, preloaded | SIGKILL, started again after 1 s on the same port and dir (it answers `-LOADING` while it loads) |
//! | `standby` | a primary and a standby (`--replicaof`) | primary SIGKILLed; 300 ms later the drill promotes the standby with `REPLICAOF NO ONE`, as an operator would |
//! | `cluster-kill` | 3 masters + 3 replicas, `cluster-node-timeout` 1000 ms | the master owning the load's keys SIGKILLed; its replica takes over |
//!
//! The load is `tests/tools/failover_load.py` (redis-py), one process per target, with distinct
//! key prefixes (in a cluster, hash tags whose slot the victim owns, so every key of both loads
//! is on the killed master). "direct" is redis-py's own topology support: `Sentinel.master_for`,
//! `RedisCluster`, or a plain `Redis` on the primary; "datamesh" is a plain `Redis` on the
//! proxy listener. The script's header says what each figure means; times are CLOCK_MONOTONIC
//! seconds shared by this process and the script ([`mono_now`]), and the fault time is taken
//! right after the fault took effect (the SIGKILLed server reaped, the SIGSTOP delivered).
//!
//! Timeline: servers, agent, both loads until every client has had a success, warm-up load,
//! fault, follow-up (waiting for the topology's own switch, restarting, promoting, SIGCONT),
//! load until `after` past the fault (and at least 1 s past the switch), stop, read back.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::agent::{yaml_list, BackendSpec};
use crate::cluster::{key_in_slot, RedisCluster};
use crate::env::ENDPOINT_NAME;
use crate::proc::status_text;
use crate::redis::RedisServer;
use crate::resp::Reply;
use crate::sentinel::{SentinelGroup, MASTER_NAME};
use crate::{tail, wait_until, Env};

/// Error kind of the proxy's "the command may have been executed" (see the load script).
pub const UNKNOWN_OUTCOME: &str = "unknown-outcome";
/// Error kind of the proxy's "no usable backend node after holding N ms".
pub const HOLD_EXPIRED: &str = "hold-expired";
/// Error kind of the proxy's `command_timeout_ms` for a command that cannot have run twice
/// ("no reply within N ms (command_timeout_ms) (safe to retry)").
pub const COMMAND_TIMEOUT: &str = "command-timeout";

/// Ports on the instance's service IP (test-owned, so fixed ports cannot collide).
const DATA_PORT: u16 = 6500;
const SENTINEL_PORT: u16 = 26500;
const CLUSTER_PORT: u16 = 7100;
/// sentinel-stop: down-after far above any stop, so the sentinels never fail over.
const NO_FAILOVER_DOWN_AFTER_MS: u32 = 10_000;
/// cluster-kill: how long a master may be unreachable before its replica takes over.
const CLUSTER_NODE_TIMEOUT_MS: u32 = 1000;
/// Load after the topology's own switch, so the table shows recovery, not just the outage.
const AFTER_SWITCH: Duration = Duration::from_secs(1);

/// One failover scenario (module docs: the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    SentinelKill,
    SentinelStop,
    StandaloneRestart,
    Standby,
    ClusterKill,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::SentinelKill,
        Scenario::SentinelStop,
        Scenario::StandaloneRestart,
        Scenario::Standby,
        Scenario::ClusterKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::SentinelKill => "sentinel-kill",
            Scenario::SentinelStop => "sentinel-stop",
            Scenario::StandaloneRestart => "standalone-restart",
            Scenario::Standby => "standby",
            Scenario::ClusterKill => "cluster-kill",
        }
    }

    /// Every scenario's name, in table order.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|s| s.name()).collect()
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                anyhow!(
                    "no failover scenario {name:?} (known: {})",
                    Self::names().join(", ")
                )
            })
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What each load process runs (the script's options).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Threads doing acknowledged SETs of unique keys.
    pub set_clients: u32,
    /// Threads doing INCR, each on its own counter.
    pub incr_clients: u32,
    /// Commands per pipeline of the pipelined client (mixed SET/GET).
    pub pipeline: u32,
    /// Pause after each command of every client, ms (keeps two loads, the proxy and the
    /// servers within the machine's two cores).
    pub pace_ms: f64,
    /// Socket timeout of every client, seconds.
    pub timeout_s: f64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            set_clients: 4,
            incr_clients: 2,
            pipeline: 10,
            pace_ms: 2.0,
            timeout_s: 5.0,
        }
    }
}

/// How a drill runs.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// Load before the fault.
    pub warmup: Duration,
    /// Load after the fault (at least until 1 s after the topology's own switch).
    pub after: Duration,
    /// sentinel-stop: how long the master stays SIGSTOPped.
    pub stop_for: Duration,
    /// standalone-restart: how long the killed server stays down.
    pub restart_after: Duration,
    /// standby: how long after the kill the standby gets `REPLICAOF NO ONE`.
    pub promote_after: Duration,
    /// standalone-restart: keys preloaded with `DEBUG POPULATE` (so loading takes a while).
    pub preload_keys: u64,
    /// Keys set in the endpoint's `backend:` map on top of the scenario's own, as YAML flow
    /// values (`("failover_hold_ms", "1000")`).
    pub backend: Vec<(String, String)>,
    /// Whether to set the failover keys a scenario needs (standby: `standby: [...]`); false for
    /// an agent that does not know them yet.
    pub failover_keys: bool,
    /// After the stop, read the INCR counters again this much later (nothing may change).
    pub recheck: Option<Duration>,
    pub load: LoadOptions,
}

impl Default for DrillOptions {
    fn default() -> Self {
        Self {
            warmup: Duration::from_secs(1),
            after: Duration::from_secs(5),
            stop_for: Duration::from_secs(4),
            restart_after: Duration::from_secs(1),
            promote_after: Duration::from_millis(300),
            preload_keys: 300_000,
            backend: Vec::new(),
            failover_keys: true,
            recheck: None,
            load: LoadOptions::default(),
        }
    }
}

impl DrillOptions {
    /// Adds (or replaces) a key of the endpoint's backend map.
    pub fn backend(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.backend.retain(|(k, _)| k != key);
        self.backend.push((key.to_string(), value.to_string()));
        self
    }
}

/// One INCR client's counter at the end.
#[derive(Clone, Debug, Default)]
pub struct CounterResult {
    pub key: String,
    /// INCRs the client issued (each sent at most once).
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// Failed with an unknown-outcome error (may have run).
    pub unknown: u64,
    /// The counter's value after the load stopped (None: it could not be read).
    pub final_value: Option<i64>,
    /// The same, [`DrillOptions::recheck`] later.
    pub final_later: Option<i64>,
}

/// What one load process measured (the script's header defines each figure).
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub label: String,
    pub ops: u64,
    pub ops_ok: u64,
    /// Errors by kind (the script's `classify`).
    pub errors: BTreeMap<String, u64>,
    pub error_samples: BTreeMap<String, Vec<String>>,
    /// Established data connections the peer closed.
    pub dropped: u64,
    pub connects: u64,
    pub unknown: u64,
    /// Most unknown-outcome events on one connection (a pipeline counts once).
    pub max_unknown_per_conn: u64,
    pub acked_writes: u64,
    /// Acknowledged writes absent (or with another value) at the end.
    pub missing: u64,
    /// Of those, acknowledged more than 200 ms before the fault.
    pub missing_old: u64,
    pub missing_samples: Vec<String>,
    pub wrong_values: u64,
    /// Acknowledged writes the final read could not read at all.
    pub unread: u64,
    pub exec_twice: u64,
    pub counters: Vec<CounterResult>,
    /// INCRs redis-py wrote more than once (a client-side retry; must be 0).
    pub incr_resends: u64,
    /// INCRs written to a socket, and acknowledged: writes >= acked proves the resend count
    /// counts.
    pub incr_writes: u64,
    pub incr_acked: u64,
    pub max_stall_ms: f64,
    pub max_stall_at_ms: f64,
    /// Fault -> first success of a command sent after the fault.
    pub first_ok_ms: Option<f64>,
    /// Fault -> end of the last failed command.
    pub last_error_ms: Option<f64>,
    pub pub_acked: u64,
    pub sub_received: u64,
    pub sub_lost: u64,
    /// Of those, PUBLISH said no subscriber received them (published before the subscriber
    /// was subscribed where the message went).
    pub sub_lost_unheard: u64,
    pub sub_gaps: u64,
    /// The first gaps: when their first and last message was acknowledged (ms after the
    /// fault) and how many messages they lost.
    pub sub_gap_spans: Vec<(f64, f64, u64)>,
    pub sub_dups: u64,
    pub sub_resubscribes: u64,
    /// The subscriber received the publisher's last acknowledged message.
    pub sub_got_last: bool,
    /// Clients still running after the stop (stuck in a command).
    pub stuck: Vec<String>,
    /// Per client: name, ops, errors, drops, connects, unknown.
    pub clients: Vec<Value>,
    pub raw: Value,
}

impl LoadResult {
    fn from_json(v: &Value) -> Result<Self> {
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        let strings = |x: Option<&Value>| -> Vec<String> {
            x.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let label = v
            .get("label")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("load result without a label: {v}"))?
            .to_string();
        if let Some(fatal) = v.get("fatal").and_then(Value::as_object) {
            ensure!(
                fatal.is_empty(),
                "load clients of {label} died of a bug in {}: {fatal:?}",
                load_script().display()
            );
        }
        let mut errors = BTreeMap::new();
        if let Some(o) = v.get("errors").and_then(Value::as_object) {
            for (k, n) in o {
                errors.insert(k.clone(), n.as_u64().unwrap_or(0));
            }
        }
        let mut error_samples = BTreeMap::new();
        if let Some(o) = v.get("error_samples").and_then(Value::as_object) {
            for (k, s) in o {
                error_samples.insert(k.clone(), strings(Some(s)));
            }
        }
        let counters = v
            .get("counters")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|c| {
                        let cu = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
                        CounterResult {
                            key: c
                                .get("key")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            sent: cu("sent"),
                            acked: cu("acked"),
                            failed: cu("failed"),
                            unknown: cu("unknown"),
                            final_value: c.get("final").and_then(Value::as_i64),
                            final_later: c.get("final_later").and_then(Value::as_i64),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let missing_samples = v
            .get("missing_samples")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|m| {
                        format!(
                            "{} (acked {} ms after the fault)",
                            m.get("key").and_then(Value::as_str).unwrap_or("?"),
                            m.get("acked_ms")
                                .and_then(Value::as_f64)
                                .unwrap_or(f64::NAN)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            label,
            ops: u("ops"),
            ops_ok: u("ops_ok"),
            errors,
            error_samples,
            dropped: u("dropped"),
            connects: u("connects"),
            unknown: u("unknown"),
            max_unknown_per_conn: u("max_unknown_per_conn"),
            acked_writes: u("acked_writes"),
            missing: u("missing"),
            missing_old: u("missing_old"),
            missing_samples,
            wrong_values: u("wrong_values"),
            unread: u("unread"),
            exec_twice: u("exec_twice"),
            counters,
            incr_resends: u("incr_resends"),
            incr_writes: u("incr_writes"),
            incr_acked: u("incr_acked"),
            max_stall_ms: f("max_stall_ms").unwrap_or(0.0),
            max_stall_at_ms: f("max_stall_at_ms").unwrap_or(0.0),
            first_ok_ms: f("first_ok_ms"),
            last_error_ms: f("last_error_ms"),
            pub_acked: u("pub_acked"),
            sub_received: u("sub_received"),
            sub_lost: u("sub_lost"),
            sub_lost_unheard: u("sub_lost_unheard"),
            sub_gaps: u("sub_gaps"),
            sub_gap_spans: v
                .get("sub_gap_spans")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|g| {
                            let g = g.as_array()?;
                            Some((
                                g.first()?.as_f64()?,
                                g.get(1)?.as_f64()?,
                                g.get(2)?.as_u64()?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            sub_dups: u("sub_dups"),
            sub_resubscribes: u("sub_resubscribes"),
            sub_got_last: v
                .get("sub_got_last")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            stuck: strings(v.get("stuck")),
            clients: v
                .get("clients")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            raw: v.clone(),
        })
    }

    /// Errors of every kind except `allowed`.
    pub fn errors_except(&self, allowed: &[&str]) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .filter(|(k, n)| **n > 0 && !allowed.contains(&k.as_str()))
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    pub fn error_count(&self, kind: &str) -> u64 {
        self.errors.get(kind).copied().unwrap_or(0)
    }

    pub fn total_errors(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The error kinds with a sample text each, for failure messages.
    pub fn error_summary(&self) -> String {
        let mut s = String::new();
        for (k, n) in &self.errors {
            let sample = self
                .error_samples
                .get(k)
                .and_then(|v| v.first())
                .map(String::as_str)
                .unwrap_or("");
            let _ = write!(s, "\n    {k} x{n}: {sample}");
        }
        s
    }
}

/// One drill's outcome: what the topology did and what each load saw.
#[derive(Clone, Debug)]
pub struct DrillReport {
    pub scenario: Scenario,
    /// The topology's own switch: what (e.g. "+switch-master") and when, ms after the fault.
    pub switch_what: String,
    pub switch_ms: Option<f64>,
    /// Facts of the run worth printing (sentinels' agreement time, loading time, the agent's
    /// failover keys left out, ...).
    pub notes: Vec<String>,
    pub direct: LoadResult,
    pub datamesh: LoadResult,
}

impl DrillReport {
    pub fn targets(&self) -> [&LoadResult; 2] {
        [&self.direct, &self.datamesh]
    }
}

/// CLOCK_MONOTONIC in seconds: the clock Python's `time.monotonic()` reads on Linux, so times
/// taken here and in the load script compare directly.
pub fn mono_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// `tests/tools/failover_load.py`.
pub fn load_script() -> PathBuf {
    crate::project_root()
        .join("tests")
        .join("tools")
        .join("failover_load.py")
}

/// Runs `scenario` in `env`, which must have been built without an agent (`.agent(false)`,
/// with `.agent_bin(...)` for another binary): starts the servers and the agent, the loads,
/// the fault, and returns the report. The servers and the loads are gone when it returns; the
/// agent stays in `env` (its log, its `/metrics`) and goes with it.
pub fn run(env: &mut Env, scenario: Scenario, opts: &DrillOptions) -> Result<DrillReport> {
    let mut topo = Topology::start(env, scenario, opts)
        .with_context(|| format!("{scenario}: starting the servers"))?;
    let mut backend = topo.backend.clone();
    for (k, v) in &opts.backend {
        backend = backend.with(k, v);
    }
    let mut cfg = env.base_agent_config()?;
    cfg.endpoints[0].backend = backend;
    env.start_agent(cfg)
        .with_context(|| format!("{scenario}: starting the agent"))?;
    let proxy = env.agent().proxy_addr(ENDPOINT_NAME)?;

    let mut direct_args = topo.direct.clone();
    direct_args.extend(["--prefix".into(), topo.prefixes[0].clone()]);
    let mut datamesh_args = plain(proxy);
    datamesh_args.extend(["--prefix".into(), topo.prefixes[1].clone()]);
    let mut loads = [
        Loader::spawn("direct", direct_args, &opts.load, env.run_dir())?,
        Loader::spawn("datamesh", datamesh_args, &opts.load, env.run_dir())?,
    ];
    for l in &mut loads {
        l.wait_ready(Duration::from_secs(45))?;
    }
    // The warm-up is load time, not a wait for a condition.
    std::thread::sleep(opts.warmup);

    let fault = topo
        .fault(opts)
        .with_context(|| format!("{scenario}: the fault"))?;
    let switch = topo
        .follow_up(fault, opts)
        .with_context(|| format!("{scenario}: after the fault"))?;
    // More load time: until `after` past the fault, and past the switch.
    sleep_until((fault + opts.after.as_secs_f64()).max(switch + AFTER_SWITCH.as_secs_f64()));
    for l in &mut loads {
        l.stop(fault, opts.recheck)?;
    }
    let [direct, datamesh] = loads;
    let direct = direct.finish(Duration::from_secs(120))?;
    let datamesh = datamesh.finish(Duration::from_secs(120))?;
    Ok(DrillReport {
        scenario,
        switch_what: topo.switch_what.to_string(),
        switch_ms: Some((switch - fault) * 1000.0),
        notes: topo.notes,
        direct,
        datamesh,
    })
}

/// The servers of a scenario and what the loads and the agent need to reach them.
struct Topology {
    scenario: Scenario,
    servers: Servers,
    /// The agent endpoint's backend.
    backend: BackendSpec,
    /// The direct load's target options (`--kind ...`).
    direct: Vec<String>,
    /// Key prefixes of the direct and the datamesh load.
    prefixes: [String; 2],
    switch_what: &'static str,
    notes: Vec<String>,
}

enum Servers {
    Sentinel {
        group: SentinelGroup,
        master: SocketAddr,
    },
    Standalone(RedisServer),
    Standby {
        primary: RedisServer,
        standby: Box<RedisServer>,
    },
    Cluster {
        cluster: RedisCluster,
        victim: usize,
        replica: usize,
    },
}

impl Topology {
    fn start(env: &Env, scenario: Scenario, opts: &DrillOptions) -> Result<Self> {
        match scenario {
            Scenario::SentinelKill | Scenario::SentinelStop => Self::sentinel(env, scenario),
            Scenario::StandaloneRestart => Self::standalone(env, opts),
            Scenario::Standby => Self::standby(env, opts),
            Scenario::ClusterKill => Self::cluster(env),
        }
    }

    fn new(
        scenario: Scenario,
        servers: Servers,
        backend: BackendSpec,
        direct: Vec<String>,
    ) -> Self {
        Self {
            scenario,
            servers,
            backend,
            direct,
            prefixes: ["direct:".into(), "datamesh:".into()],
            switch_what: match scenario {
                Scenario::SentinelKill => "+switch-master",
                Scenario::SentinelStop => "SIGCONT",
                Scenario::StandaloneRestart => "restarted server loaded",
                Scenario::Standby => "standby promoted",
                Scenario::ClusterKill => "replica promoted",
            },
            notes: Vec::new(),
        }
    }

    /// Master, replica, 3 sentinels; down-after 1000 ms to fail over, 10 s not to.
    fn sentinel(env: &Env, scenario: Scenario) -> Result<Self> {
        let down_after = match scenario {
            Scenario::SentinelKill => 1000,
            _ => NO_FAILOVER_DOWN_AFTER_MS,
        };
        let group = SentinelGroup::start_with(
            IpAddr::V4(env.service_ip()),
            DATA_PORT,
            SENTINEL_PORT,
            down_after,
            env.outside_cgroup(),
            env.run_dir(),
        )?;
        let master = group.master_per_sentinel(0)?;
        let sentinels = group.sentinel_addrs();
        let direct = vec![
            "--kind".into(),
            "sentinel".into(),
            "--sentinels".into(),
            join(&sentinels),
            "--master-name".into(),
            MASTER_NAME.into(),
        ];
        Ok(Self::new(
            scenario,
            Servers::Sentinel { group, master },
            BackendSpec::sentinel(&sentinels, MASTER_NAME),
            direct,
        ))
    }

    /// One server that fsyncs every write, preloaded so that loading takes a while.
    fn standalone(env: &Env, opts: &DrillOptions) -> Result<Self> {
        let addr = SocketAddr::new(IpAddr::V4(env.service_ip()), DATA_PORT);
        let dir = env.run_dir().join("standalone");
        std::fs::create_dir_all(&dir)?;
        let durable = [
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--enable-debug-command",
            "yes",
        ];
        let server = RedisServer::start_with(addr, env.outside_cgroup(), &dir, &durable)?;
        preload(&server, opts.preload_keys)?;
        Ok(Self::new(
            Scenario::StandaloneRestart,
            Servers::Standalone(server),
            BackendSpec::standalone(addr),
            plain(addr),
        ))
    }

    /// A primary and its standby (`--replicaof`), in sync.
    fn standby(env: &Env, opts: &DrillOptions) -> Result<Self> {
        let ip = IpAddr::V4(env.service_ip());
        let (paddr, saddr) = (
            SocketAddr::new(ip, DATA_PORT),
            SocketAddr::new(ip, DATA_PORT + 1),
        );
        let start = |a: SocketAddr, extra: &[&str]| -> Result<RedisServer> {
            let d = env.run_dir().join(format!("standby-{}", a.port()));
            std::fs::create_dir_all(&d)?;
            let args = [&["--repl-diskless-sync-delay", "0"][..], extra].concat();
            RedisServer::start_with(a, env.outside_cgroup(), &d, &args)
        };
        let primary = start(paddr, &[])?;
        let standby = start(
            saddr,
            &["--replicaof", &ip.to_string(), &paddr.port().to_string()],
        )?;
        wait_until(
            &format!("standby {saddr} to sync with {paddr}"),
            Duration::from_secs(30),
            || {
                let info = standby.info("replication")?;
                let up = info.get("master_link_status").map(String::as_str) == Some("up");
                Ok(up.then_some(()))
            },
        )?;
        let mut backend = BackendSpec::standalone(paddr);
        if opts.failover_keys {
            backend = backend.with("standby", yaml_list(&[saddr]));
        }
        // The direct client knows only the primary; its final reads go to the promoted
        // standby, to see which acknowledged writes survived.
        let mut direct = plain(paddr);
        direct.extend(["--verify".into(), saddr.to_string()]);
        let mut topo = Self::new(
            Scenario::Standby,
            Servers::Standby {
                primary,
                standby: Box::new(standby),
            },
            backend,
            direct,
        );
        if !opts.failover_keys {
            topo.notes
                .push("the agent got no `standby:` key (it does not know it)".into());
        }
        Ok(topo)
    }

    /// 3 masters + 3 replicas; every key of both loads on master 0 (the victim): one hash tag
    /// per load, in two of its slots.
    fn cluster(env: &Env) -> Result<Self> {
        let cluster = RedisCluster::start_with_replicas(
            IpAddr::V4(env.service_ip()),
            CLUSTER_PORT,
            3,
            1,
            CLUSTER_NODE_TIMEOUT_MS,
            env.outside_cgroup(),
            env.run_dir(),
        )?;
        let victim = 0;
        let replica = cluster.replica_of(victim)?;
        let slots = cluster.slots_of(victim)?;
        ensure!(slots.len() >= 2, "node {victim} owns {} slots", slots.len());
        let tag = |name: &str, slot: u16| format!("{{{}}}:", key_in_slot(name, slot));
        let prefixes = [
            tag("direct", slots[0]),
            tag("datamesh", slots[slots.len() / 2]),
        ];
        let addrs = cluster.addrs();
        let direct = vec![
            "--kind".into(),
            "cluster".into(),
            "--nodes".into(),
            join(&addrs),
        ];
        let mut topo = Self::new(
            Scenario::ClusterKill,
            Servers::Cluster {
                cluster,
                victim,
                replica,
            },
            BackendSpec::cluster(&addrs),
            direct,
        );
        topo.prefixes = prefixes;
        Ok(topo)
    }

    /// Injects the fault; returns when it took effect ([`mono_now`]).
    fn fault(&mut self, opts: &DrillOptions) -> Result<f64> {
        match (&mut self.servers, self.scenario) {
            (Servers::Sentinel { group, master }, Scenario::SentinelKill) => {
                group.server_mut(*master)?.kill9()?;
            }
            (Servers::Sentinel { group, master }, _) => {
                group.server_mut(*master)?.sigstop()?;
            }
            (Servers::Standalone(server), _) => server.kill9()?,
            (Servers::Standby { primary, .. }, _) => primary.kill9()?,
            (
                Servers::Cluster {
                    cluster, victim, ..
                },
                _,
            ) => cluster.nodes[*victim].kill9()?,
        }
        let at = mono_now();
        let what = match self.scenario {
            Scenario::SentinelStop => format!("SIGSTOP for {:?}", opts.stop_for),
            _ => "SIGKILL".to_string(),
        };
        self.notes.insert(0, format!("fault: {what}"));
        Ok(at)
    }

    /// What follows the fault; returns when the topology itself switched ([`mono_now`]).
    fn follow_up(&mut self, fault: f64, opts: &DrillOptions) -> Result<f64> {
        let ms = |t: f64| (t - fault) * 1000.0;
        match (&mut self.servers, self.scenario) {
            (Servers::Sentinel { group, master }, Scenario::SentinelKill) => {
                let (first, all, new) = wait_sentinels_switch(group, *master)?;
                self.notes.push(format!(
                    "sentinels: first named {new} {:.0} ms after the kill, all {:.0} ms",
                    ms(first),
                    ms(all)
                ));
                Ok(first)
            }
            (Servers::Sentinel { group, master }, _) => {
                sleep_until(fault + opts.stop_for.as_secs_f64());
                group.server_mut(*master)?.sigcont()?;
                let cont = mono_now();
                let now_master = group.master_per_sentinel(0)?;
                if now_master != *master {
                    self.notes.push(format!(
                        "the sentinels failed over to {now_master} during the stop"
                    ));
                }
                Ok(cont)
            }
            (Servers::Standalone(server), _) => {
                sleep_until(fault + opts.restart_after.as_secs_f64());
                let started = mono_now();
                server.restart()?;
                let loaded = mono_now();
                self.notes.push(format!(
                    "restarted {:.0} ms after the kill, answered PONG {:.0} ms later ({})",
                    ms(started),
                    (loaded - started) * 1000.0,
                    loading_time(server.log())
                ));
                Ok(loaded)
            }
            (Servers::Standby { standby, .. }, _) => {
                sleep_until(fault + opts.promote_after.as_secs_f64());
                match standby.command(&[b"REPLICAOF", b"NO", b"ONE"])? {
                    Reply::Simple(s) if s == "OK" => {}
                    other => bail!("REPLICAOF NO ONE on the standby answered {other:?}"),
                }
                Ok(mono_now())
            }
            (
                Servers::Cluster {
                    cluster, replica, ..
                },
                _,
            ) => {
                let r = *replica;
                let addr = cluster.nodes[r].addr();
                wait_until(
                    &format!("replica {addr} to become master"),
                    Duration::from_secs(30),
                    || Ok((cluster.role(r)? == "master").then_some(())),
                )?;
                let at = mono_now();
                self.notes.push(format!(
                    "replica {addr} is master {:.0} ms after the kill",
                    ms(at)
                ));
                Ok(at)
            }
        }
    }
}

/// Polls every sentinel until all name a master other than `old` (and it answers ROLE
/// master); returns when the first and when the last did, and the new master.
fn wait_sentinels_switch(group: &SentinelGroup, old: SocketAddr) -> Result<(f64, f64, SocketAddr)> {
    let mut first: Option<f64> = None;
    let n = group.sentinels.len();
    wait_until(
        &format!("the sentinels to switch the master away from {old}"),
        Duration::from_secs(30),
        || {
            let mut switched = 0;
            let mut new = None;
            for i in 0..n {
                // A sentinel that does not answer this round simply has not switched yet.
                if let Ok(m) = group.master_per_sentinel(i) {
                    if m != old {
                        first.get_or_insert_with(mono_now);
                        switched += 1;
                        new = Some(m);
                    }
                }
            }
            let all = mono_now();
            match (switched == n, new) {
                (true, Some(new)) if group.role(new)? == "master" => {
                    Ok(Some((first.unwrap_or(all), all, new)))
                }
                _ => Ok(None),
            }
        },
    )
}

/// `DEBUG POPULATE n`, then an AOF rewrite (so the restart loads the keys from an RDB
/// preamble), waiting until the rewrite is done.
fn preload(server: &RedisServer, keys: u64) -> Result<()> {
    if keys == 0 {
        return Ok(());
    }
    let n = keys.to_string();
    match server.command(&[b"DEBUG", b"POPULATE", n.as_bytes(), b"drill:pre", b"32"])? {
        Reply::Simple(s) if s == "OK" => {}
        other => bail!("DEBUG POPULATE answered {other:?}"),
    }
    match server.command(&[b"BGREWRITEAOF"])? {
        Reply::Simple(_) => {}
        other => bail!("BGREWRITEAOF answered {other:?}"),
    }
    wait_until(
        "the AOF rewrite after the preload",
        Duration::from_secs(60),
        || {
            let info = server.info("persistence")?;
            let flag = |k: &str| info.get(k).map(String::as_str) == Some("0");
            Ok((flag("aof_rewrite_in_progress") && flag("aof_rewrite_scheduled")).then_some(()))
        },
    )?;
    let status = server.info("persistence")?;
    ensure!(
        status.get("aof_last_bgrewrite_status").map(String::as_str) == Some("ok"),
        "the AOF rewrite failed: {status:?}"
    );
    Ok(())
}

/// The server log's last "DB loaded from ..." line, as "loading took X s".
fn loading_time(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| {
            l.split_once("DB loaded from ")
                .map(|(_, rest)| rest.to_string())
        })
        .map(|rest| format!("log: loaded from {rest}"))
        .unwrap_or_else(|| "no loading time in its log".into())
}

fn sleep_until(t: f64) {
    let left = t - mono_now();
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

/// The load script's options for a plain client of `addr`.
fn plain(addr: SocketAddr) -> Vec<String> {
    vec![
        "--kind".into(),
        "plain".into(),
        "--addr".into(),
        addr.to_string(),
    ]
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A load script run as a child process: JSON objects on its stdout, one line on its stdin
/// (what the script waits for to stop), stderr to a file. Killed on drop. The drills' loads
/// (`failover_load.py` here, `restart_load.py` in [`crate::restartdrill`]) run through it.
pub struct JsonLoad {
    pub label: String,
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    reader: Option<JoinHandle<()>>,
    pub stderr: PathBuf,
}

impl JsonLoad {
    /// Starts `cmd` (its arguments set) with piped stdin/stdout and stderr to `stderr`.
    pub fn spawn(label: &str, mut cmd: Command, stderr: PathBuf) -> Result<Self> {
        let err_file = std::fs::File::create(&stderr)
            .with_context(|| format!("creating {}", stderr.display()))?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err_file);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting `{}` (is python3 with redis-py installed? `cargo xtask setup`)",
                crate::proc::describe(&cmd)
            )
        })?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            label: label.to_string(),
            child,
            stdin,
            lines,
            reader: Some(reader),
            stderr,
        })
    }

    /// The next JSON object the script prints, within `timeout` (other lines are echoed).
    pub fn next_json(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => return Ok(v),
                    _ => eprintln!("{} load: {line}", self.label),
                },
                Err(RecvTimeoutError::Timeout) => bail!(
                    "the {} load printed nothing within {timeout:?}; its stderr:\n{}",
                    self.label,
                    tail(&self.stderr, 30)
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait()?;
                    bail!(
                        "the {} load exited ({}); its stderr:\n{}",
                        self.label,
                        status_text(st),
                        tail(&self.stderr, 30)
                    )
                }
            }
        }
    }

    /// Waits for the script's `{"event": "ready"}`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let v = self.next_json(timeout)?;
        ensure!(
            v.get("event").and_then(Value::as_str) == Some("ready"),
            "the {} load did not get ready: {v}",
            self.label
        );
        Ok(())
    }

    /// Writes the one line the script waits for to stop.
    pub fn send_stop(&mut self, line: &Value) -> Result<()> {
        let mut stdin = self
            .stdin
            .take()
            .ok_or_else(|| anyhow!("the {} load was already stopped", self.label))?;
        writeln!(stdin, "{line}")
            .with_context(|| format!("writing the stop line to the {} load", self.label))
    }
}

impl Drop for JsonLoad {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// One failover load process (`tests/tools/failover_load.py`).
struct Loader(JsonLoad);

impl Loader {
    fn spawn(label: &str, target: Vec<String>, load: &LoadOptions, dir: &Path) -> Result<Self> {
        let script = load_script();
        ensure!(
            script.is_file(),
            "the load script {} is missing",
            script.display()
        );
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .args(["--label", label])
            .args(&target)
            .args(["--set-clients", &load.set_clients.to_string()])
            .args(["--incr-clients", &load.incr_clients.to_string()])
            .args(["--pipeline", &load.pipeline.to_string()])
            .args(["--pace-ms", &load.pace_ms.to_string()])
            .args(["--timeout", &load.timeout_s.to_string()]);
        let stderr = dir.join(format!("load-{label}.stderr"));
        Ok(Self(JsonLoad::spawn(label, cmd, stderr)?))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.0.wait_ready(timeout)
    }

    /// Tells the script to stop, with the fault time its figures are relative to.
    fn stop(&mut self, fault: f64, recheck: Option<Duration>) -> Result<()> {
        self.0.send_stop(&serde_json::json!({
            "stop": true,
            "fault": fault,
            "recheck_ms": recheck.map_or(0, |d| d.as_millis()),
        }))
    }

    /// The script's result, once it has read everything back.
    fn finish(mut self, timeout: Duration) -> Result<LoadResult> {
        let l = &mut self.0;
        let v = l.next_json(timeout)?;
        let r = v
            .get("result")
            .ok_or_else(|| anyhow!("the {} load printed {v} instead of a result", l.label))?;
        let label = l.label.clone();
        let st = wait_until(
            &format!("the {label} load to exit after its result"),
            Duration::from_secs(10),
            || Ok(l.child.try_wait()?),
        )?;
        ensure!(
            st.success(),
            "the {} load exited with {} after its result; stderr:\n{}",
            l.label,
            status_text(st),
            tail(&l.stderr, 30)
        );
        LoadResult::from_json(r)
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// The side-by-side table: one row per scenario and target.
pub fn table(reports: &[DrillReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<18} {:<8} {:>6} {:>6} {:>5} {:>7} {:>11} {:>5} {:>7} {:>8} {:>8} {:>14}  errors by kind",
        "scenario",
        "target",
        "ops",
        "errors",
        "drops",
        "unk/max",
        "lost/old",
        "twice",
        "stall",
        "first-ok",
        "switch",
        "sub lost/dup/ok"
    );
    for r in reports {
        for t in r.targets() {
            let kinds: Vec<String> = t.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let lost = if t.unread > 0 {
                format!("{}/{}+{}?", t.missing, t.missing_old, t.unread)
            } else {
                format!("{}/{}", t.missing, t.missing_old)
            };
            let _ = writeln!(
                s,
                "{:<18} {:<8} {:>6} {:>6} {:>5} {:>7} {:>11} {:>5} {:>7.0} {:>8} {:>8} {:>14}  {}",
                r.scenario.name(),
                t.label,
                t.ops,
                t.total_errors(),
                t.dropped,
                format!("{}/{}", t.unknown, t.max_unknown_per_conn),
                lost,
                t.exec_twice,
                t.max_stall_ms,
                ms(t.first_ok_ms),
                ms(r.switch_ms),
                format!(
                    "{}/{}/{}",
                    t.sub_lost,
                    t.sub_dups,
                    if t.sub_got_last { "yes" } else { "NO" }
                ),
                if kinds.is_empty() {
                    "-".into()
                } else {
                    kinds.join(", ")
                }
            );
        }
    }
    let _ = writeln!(
        s,
        "ops: commands (a pipeline is one); drops: connections the peer closed; unk/max: \
         unknown-outcome errors / most on one connection; lost/old: acknowledged writes missing \
         at the end / of those acknowledged >200 ms before the fault (+N? unreadable); twice: INCR \
         counters above the INCRs sent; stall: longest command, ms; first-ok: fault -> first \
         success of a command sent after it, ms; switch: fault -> the topology's own switch, ms; \
         sub: messages lost / duplicated / last one received"
    );
    s
}

/// Notes, error samples and anomalies of one drill, for reading below the table.
pub fn details(r: &DrillReport) -> String {
    let mut s = format!(
        "{}: switch = {} at {} ms after the fault\n",
        r.scenario,
        r.switch_what,
        ms(r.switch_ms)
    );
    for n in &r.notes {
        let _ = writeln!(s, "  {n}");
    }
    for t in r.targets() {
        let _ = writeln!(
            s,
            "  {}: {} ops ({} ok), {} acked writes, {} connects, last error {} ms after the fault, \
             longest command at {:.0} ms, {} messages received ({} re-subscriptions, {} gaps, \
             {} of the lost published to no subscriber)",
            t.label,
            t.ops,
            t.ops_ok,
            t.acked_writes,
            t.connects,
            ms(t.last_error_ms),
            t.max_stall_at_ms,
            t.sub_received,
            t.sub_resubscribes,
            t.sub_gaps,
            t.sub_lost_unheard
        );
        for (k, samples) in &t.error_samples {
            if let Some(first) = samples.first() {
                let _ = writeln!(s, "    {k}: {first}");
            }
        }
        for (first, last, n) in &t.sub_gap_spans {
            let _ = writeln!(
                s,
                "    subscriber gap: {n} messages acknowledged {first:.0}..{last:.0} ms after the fault"
            );
        }
        for m in &t.missing_samples {
            let _ = writeln!(s, "    missing: {m}");
        }
        for c in &t.counters {
            let over =
                c.final_value.is_some_and(|f| f > c.sent as i64) || c.final_later != c.final_value;
            if over {
                let _ = writeln!(
                    s,
                    "    counter {}: sent {} acked {} unknown {} final {:?} later {:?}",
                    c.key, c.sent, c.acked, c.unknown, c.final_value, c.final_later
                );
            }
        }
        if t.incr_resends > 0 {
            let _ = writeln!(s, "    redis-py resent {} INCRs", t.incr_resends);
        }
        if !t.stuck.is_empty() {
            let _ = writeln!(s, "    clients stuck after the stop: {:?}", t.stuck);
        }
    }
    s
}
