//! Hostile-tenant helpers shared by the isolation tests and `cargo xtask drill tenant`: the
//! raw-socket attacks of `tests/py/tenant_attack.py` run inside a pod, a redis-py bystander
//! pod checking every reply, `/metrics` samples, and the tenant drill itself: each attack from
//! one pod at a time while a bystander pod works, the agent in a memory-limited cgroup, its
//! peak RSS sampled against its budget and limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::proxy::python;
use crate::Env;

pub const MIB: u64 = 1024 * 1024;

/// Runs a `tenant_attack.py` scenario in pod `pod` against `addr`.
pub fn attack(
    env: &Env,
    pod: &str,
    scenario: &str,
    addr: SocketAddr,
    extra: &[&str],
) -> Result<Value> {
    let mut args = vec![
        scenario.to_string(),
        "--host".into(),
        addr.ip().to_string(),
        "--port".into(),
        addr.port().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let v = python(env.pod(pod).cmd("python3"), "tenant_attack.py", &args)
        .with_context(|| format!("{scenario} from pod {pod}"))?;
    eprintln!("{scenario} (pod {pod}) -> {v}");
    Ok(v)
}

/// Runs `body` while pod "bystander" checks SET/GET for `seconds`; returns both results.
pub fn with_bystander(
    env: &Env,
    seconds: f64,
    body: impl FnOnce() -> Result<Value> + Send,
) -> Result<(Value, Value)> {
    let svc = env.service_addr();
    let secs = seconds.to_string();
    thread::scope(|s| {
        let b = s.spawn(|| {
            attack(
                env,
                "bystander",
                "bystander",
                svc,
                &["--seconds", &secs, "--interval", "0.005"],
            )
        });
        let a = body();
        let b = b.join().map_err(|_| anyhow!("bystander thread panicked"))?;
        Ok((a?, b?))
    })
}

/// Sum of the samples of metric `name` whose labels contain `label` ("" = all).
pub fn metric(env: &Env, name: &str, label: &str) -> Result<f64> {
    let (code, text) = env.agent().http_get("/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split([' ', '{']).next() == Some(name) && (label.is_empty() || l.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The value of the first metric line starting with `prefix` (`name{labels}`), 0 when absent.
pub fn metric_line(env: &Env, prefix: &str) -> Result<u64> {
    let (code, body) = env.agent().http_get("/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(body
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0))
}

/// Samples the agent's RSS every 50 ms while `body` runs; returns its result and the peak.
pub fn peak_rss_during<T>(env: &Env, body: impl FnOnce() -> Result<T> + Send) -> Result<(T, u64)>
where
    T: Send,
{
    // The proxy's memory is the worker's (the supervisor is small and steady).
    let pid = env
        .agent()
        .worker_pid()?
        .ok_or_else(|| anyhow!("agent has no worker"))?;
    let done = AtomicBool::new(false);
    let peak = AtomicU64::new(0);
    let r = thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok(kib) = crate::proc::rss_kib(pid) {
                    peak.fetch_max(kib * 1024, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let r = body();
        done.store(true, Ordering::Relaxed);
        r
    })?;
    Ok((r, peak.load(Ordering::Relaxed)))
}

/// Writes the 1 MiB value "big" straight to the backend (what [`no_read`] fetches).
pub fn seed_big(env: &Env) -> Result<()> {
    let mut c = crate::proxy::RespConn::connect(env.service_addr())?;
    c.cmd_bytes(&[b"SET", b"big", &vec![b'v'; MIB as usize]])?;
    Ok(())
}

/// `clients` connections from pod "attacker", each pipelining 120 GETs of key "big" (see
/// [`seed_big`]) and never reading, held for `seconds`.
pub fn no_read(env: &Env, clients: u32, seconds: &str) -> Result<Value> {
    let c = clients.to_string();
    attack(
        env,
        "attacker",
        "noread",
        env.service_addr(),
        &[
            "--clients",
            &c,
            "--gets",
            "120",
            "--key",
            "big",
            "--seconds",
            seconds,
        ],
    )
}

/// `clients` uploads of a 30 MiB SET body at once from pod "attacker", for up to `seconds`.
pub fn uploads(env: &Env, clients: u32, seconds: &str) -> Result<Value> {
    let c = clients.to_string();
    let size = (30 * MIB).to_string();
    attack(
        env,
        "attacker",
        "uploads",
        env.service_addr(),
        &[
            "--clients",
            &c,
            "--size",
            &size,
            "--seconds",
            seconds,
            "--interval",
            "0.002",
        ],
    )
}

/// One 221 MiB SET body from pod "attacker".
pub fn huge_upload(env: &Env) -> Result<Value> {
    let size = (221 * MIB).to_string();
    attack(
        env,
        "attacker",
        "upload",
        env.service_addr(),
        &["--size", &size],
    )
}

/// A subscriber in pod "attacker" that never reads `channel` for `seconds`, while pod
/// "bystander" publishes `count` messages of 1 MiB to it; `during` runs after the messages
/// were published, while the subscriber still holds its socket. Returns both results.
pub fn slow_subscriber(
    env: &Env,
    channel: &str,
    count: u32,
    seconds: &str,
    during: impl FnOnce() -> Result<()>,
) -> Result<Value> {
    let svc = env.service_addr();
    thread::scope(|s| {
        let sub = s.spawn(|| {
            attack(
                env,
                "attacker",
                "slowsub",
                svc,
                &["--channel", channel, "--seconds", seconds],
            )
        });
        thread::sleep(Duration::from_millis(300));
        let p = attack(
            env,
            "bystander",
            "publish",
            svc,
            &[
                "--channel",
                channel,
                "--count",
                &count.to_string(),
                "--size",
                &MIB.to_string(),
            ],
        );
        let checked = during();
        let sub = sub.join().map_err(|_| anyhow!("subscriber panicked"))??;
        checked?;
        Ok(serde_json::json!({"subscriber": sub, "publisher": p?}))
    })
}

/// One attack of the drill and what it did.
#[derive(Debug, Clone)]
pub struct PhaseReport {
    pub name: &'static str,
    pub what: String,
    /// Clients closed by a limit or shed during the phase (from the agent's counters).
    pub closed: u64,
    pub refused: u64,
    pub peak_rss: u64,
    pub bystander: Value,
    pub alive: bool,
}

/// What the whole tenant drill measured.
#[derive(Debug, Clone)]
pub struct TenantReport {
    pub limit: u64,
    pub budget: u64,
    pub phases: Vec<PhaseReport>,
    pub oom_kills: u64,
}

/// Options of the tenant drill.
#[derive(Debug, Clone)]
pub struct TenantOptions {
    /// Attacking clients of the memory phases.
    pub clients: u32,
    /// Seconds each phase runs.
    pub seconds: f64,
}

impl Default for TenantOptions {
    fn default() -> Self {
        Self {
            clients: 50,
            seconds: 6.0,
        }
    }
}

fn closes(env: &Env) -> Result<u64> {
    Ok(metric(env, "datamesh_proxy_clients_closed_total", "")? as u64)
}

fn refusals(env: &Env) -> Result<u64> {
    Ok(metric(env, "datamesh_proxy_refused_connections_total", "")? as u64)
}

/// The env the drill runs in: pods "attacker" and "bystander", the agent in a memory cgroup of
/// `limit` bytes (as the DaemonSet's), a 2 s partial-command deadline (so the slowloris phase
/// fits a short drill) and otherwise the defaults.
pub fn env_builder(limit: u64) -> crate::env::EnvBuilder {
    Env::builder()
        .pods(["attacker", "bystander"])
        .memory_limit(limit)
        .proxy_setting("client_partial_timeout_ms", 2000)
}

/// Runs the attacks from pod "attacker" one after the other while pod "bystander" works, in an
/// env from [`env_builder`].
pub fn run(env: &Env, limit: u64, opts: &TenantOptions) -> Result<TenantReport> {
    let svc = env.service_addr();
    seed_big(env)?;
    let budget = metric(env, "datamesh_proxy_memory_budget_bytes", "")? as u64;
    let n = opts.clients.to_string();
    let secs = opts.seconds;
    let hold = format!("{}", secs.max(2.0) - 1.0);
    type Attack<'a> = Box<dyn Fn() -> Result<Value> + Send + Sync + 'a>;
    let phases: Vec<(&'static str, String, Attack)> = vec![
        (
            "no-read",
            format!("{n} clients pipelining GETs of a 1 MiB value, never reading"),
            Box::new(|| no_read(env, opts.clients, &hold)),
        ),
        (
            "uploads",
            format!(
                "{} clients streaming 30 MiB SET bodies at once",
                opts.clients.min(12)
            ),
            Box::new(|| uploads(env, opts.clients.min(12), &hold)),
        ),
        (
            "huge-upload",
            "one 221 MiB SET body".into(),
            Box::new(|| huge_upload(env)),
        ),
        (
            "slow-subscriber",
            "a subscriber that never reads, 1 MiB messages".into(),
            Box::new(|| slow_subscriber(env, "drill", 60, &hold, || Ok(()))),
        ),
        (
            "slowloris",
            format!(
                "{} connections trickling one byte every 0.5 s",
                opts.clients * 10
            ),
            Box::new(|| {
                let c = (opts.clients * 10).to_string();
                attack(
                    env,
                    "attacker",
                    "slowloris",
                    svc,
                    &[
                        "--clients",
                        &c,
                        "--interval",
                        "0.5",
                        "--seconds",
                        &format!("{secs}"),
                    ],
                )
            }),
        ),
        (
            "conn-flood",
            "1500 idle connections from one pod".into(),
            Box::new(|| {
                attack(
                    env,
                    "attacker",
                    "hold",
                    svc,
                    &["--clients", "1500", "--seconds", "1"],
                )
            }),
        ),
        (
            "blocked-leak",
            "600 clients: BLPOP, a malformed frame, close".into(),
            Box::new(|| attack(env, "attacker", "blpop-close", svc, &["--clients", "600"])),
        ),
    ];
    let mut out = Vec::new();
    for (name, what, f) in phases {
        eprintln!("drill tenant: {name}: {what}");
        let (c0, r0) = (closes(env)?, refusals(env)?);
        let open0 = metric(env, "datamesh_proxy_open_connections", "")?;
        eprintln!("drill tenant: {name}: {open0} client connections open before");
        let started = Instant::now();
        let ((_, by), peak) = peak_rss_during(env, || with_bystander(env, secs, f))?;
        let alive = env
            .agent()
            .http_get("/ready")
            .map(|(c, _)| c == 200)
            .unwrap_or(false);
        out.push(PhaseReport {
            name,
            what,
            closed: closes(env)? - c0,
            refused: refusals(env)? - r0,
            peak_rss: peak,
            bystander: by,
            alive,
        });
        eprintln!(
            "drill tenant: {name} done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if let Ok((_, text)) = env.agent().http_get("/metrics") {
            for l in text.lines().filter(|l| {
                l.starts_with("datamesh_proxy_refused_connections_total")
                    || l.starts_with("datamesh_proxy_clients_closed_total")
            }) {
                eprintln!("drill tenant: {name}: {l}");
            }
        }
        // Let the closed clients and their backend replies drain before the next attack.
        thread::sleep(Duration::from_millis(500));
    }
    let oom_kills = env.memory_cgroup().map(|m| m.oom_kills()).unwrap_or(0);
    Ok(TenantReport {
        limit,
        budget,
        phases: out,
        oom_kills,
    })
}

/// The drill's table.
pub fn table(r: &TenantReport) -> String {
    let mib = |b: u64| format!("{:.0}", b as f64 / MIB as f64);
    let mut s = format!(
        "agent memory limit {} MiB, budget {} MiB, OOM kills {}\n\n| attack | what | closed by limits | refused | peak agent RSS MiB | agent alive | bystander ok / wrong / errors | bystander worst ms |\n|---|---|---|---|---|---|---|---|\n",
        mib(r.limit),
        mib(r.budget),
        r.oom_kills
    );
    for p in &r.phases {
        let b = &p.bystander;
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} / {} | {} |\n",
            p.name,
            p.what,
            p.closed,
            p.refused,
            mib(p.peak_rss),
            if p.alive { "yes" } else { "NO" },
            b["ok"],
            b["wrong"],
            b["errors"],
            b["worst_ms"]
        ));
    }
    s
}
