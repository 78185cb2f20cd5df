//! The key drills of issue 10, shared by `cargo xtask drill hot-key|key-attack` (release agent,
//! longer phases) and `tests/tests/keydrills.rs` (debug agent, short phases, assertions).
//!
//! Both run real loads (`tests/py/key_load.py`, raw RESP sockets, one process per pod) against
//! the endpoint's service address from pods whose connects the data plane captures: two
//! bystander pods ("web-1", "web-2") doing ordinary GET/SET traffic over 1,000 existing keys,
//! paced, whose p99 the drill watches, and one offending pod. Phases run one after the other,
//! each with fresh load processes; between phases the config is reloaded (SIGHUP) where a
//! phase needs it. Times are CLOCK_MONOTONIC seconds shared with the load script.
//!
//! `hot-key` (pod "hammer"):
//! 1. baseline: bystanders only;
//! 2. hot key: the hammer GETs one key as fast as it can; `/hotkeys` is polled every 50 ms:
//!    time until the key is the endpoint's top key with the hammer as its top pod;
//! 3. local cache: the same with `local_cache` on (hot-reloaded): backend GETs/s (from the
//!    server's `INFO commandstats`), the hammer's rate and p99, cache hits;
//! 4. auto throttle: `hotkeys.auto_throttle_ops` on (cache off), the hammer on a key not hot
//!    before: time until its first `throttled` reply, and its rate under the rule.
//!
//! `key-attack` (pod "attacker"):
//! 1. baseline: bystanders only;
//! 2. flood: the attacker GETs random missing keys; `/attacks` is polled: time until the pod is
//!    suspected of cache penetration, time until its commands are throttled (automatic throttle
//!    of a suspected pod on), its rate after;
//! 3. block: the operator adds a deny rule for the attacker's pod at runtime (admin API, with
//!    the token): time from the POST until its first `NOPERM`; bystanders go on.
//!
//! In every phase the bystanders' errors and p99 are reported beside the baseline's.

use std::fmt::Write as _;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::drill::mono_now;
use crate::proxy::{python, RespConn};
use crate::resp::Reply;
use crate::tenant::metric;
use crate::Env;

/// The hot key of phases 2 and 3, and the one of the auto-throttle phase (not hot before it).
pub const HOT_KEY: &str = "hot:item:42";
pub const HOT_KEY_2: &str = "hot:item:43";
/// A key counts as detected once `/hotkeys` shows it at this rate or more (the top key of the
/// bystanders' spread traffic is at a few ops/s).
const DETECT_OPS: f64 = 1000.0;
/// Keys of the bystanders' traffic: `k:0` .. `k:999`.
const KEYS: u32 = 1000;
/// The admin token of the drills' agents (runtime rules need one).
pub const ADMIN_TOKEN: &str = "drill-admin-token";

/// Options of both drills.
#[derive(Debug, Clone)]
pub struct KeyDrillOptions {
    /// Seconds of each phase.
    pub seconds: f64,
    /// The offending pod's connections, and commands per batch on each.
    pub threads: u32,
    pub pipeline: u32,
    /// `hotkeys.auto_throttle_ops` of the auto-throttle phase (ops/s of one key).
    pub auto_throttle_ops: u32,
    /// `attacks.auto_throttle_rate` (commands/s of a suspected pod).
    pub attack_throttle_rate: u32,
}

impl Default for KeyDrillOptions {
    fn default() -> Self {
        Self {
            seconds: 4.0,
            threads: 4,
            pipeline: 8,
            auto_throttle_ops: 2000,
            attack_throttle_rate: 100,
        }
    }
}

/// One phase: what each load process printed, and the backend's GET rate meanwhile.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub what: String,
    /// The offending pod's load (None in the baseline).
    pub offender: Option<Value>,
    /// The bystanders' loads.
    pub web: Vec<Value>,
    /// GET calls per second the backend served during the phase.
    pub backend_gets_per_s: f64,
    pub seconds: f64,
}

impl Phase {
    /// The worst bystander p99 of the phase, ms.
    pub fn web_p99(&self) -> f64 {
        self.web
            .iter()
            .filter_map(|w| w["p99_ms"].as_f64())
            .fold(0.0, f64::max)
    }

    pub fn web_ops(&self) -> f64 {
        self.web
            .iter()
            .filter_map(|w| w["ok"].as_f64())
            .sum::<f64>()
            / self.seconds
    }

    pub fn web_errors(&self) -> u64 {
        self.web.iter().map(errors).sum::<u64>()
            + self
                .web
                .iter()
                .filter_map(|w| w["closed"].as_u64())
                .sum::<u64>()
    }

    pub fn offender_ops(&self) -> f64 {
        self.offender
            .as_ref()
            .and_then(|o| o["ok"].as_f64())
            .unwrap_or(0.0)
            / self.seconds
    }

    /// Commands/s of the offender's last second of the phase (under a rule, its steady rate).
    pub fn offender_last_second_ops(&self) -> Option<f64> {
        let o = self.offender.as_ref()?;
        let rows = o["per_second"].as_array()?;
        // The last full second (the final row is the partial one at the end).
        let row = rows.iter().rev().nth(1).or_else(|| rows.last())?;
        row["ok"].as_f64()
    }
}

fn errors(v: &Value) -> u64 {
    v["errors"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0)
}

/// What the hot-key drill measured.
#[derive(Debug, Clone)]
pub struct HotKeyReport {
    pub phases: Vec<Phase>,
    /// From the hammer's start until `/hotkeys` named the key with the hammer as top pod.
    pub detect_ms: Option<f64>,
    /// What `/hotkeys` named (key, top pod, ops/s).
    pub named: Option<(String, String, f64)>,
    /// From the auto-throttle phase's start until `/keyrules` listed an automatic rule for its
    /// key (the hammer's commands are delayed, then refused, from then on).
    pub throttle_ms: Option<f64>,
    /// That rule at the end of the phase, with its counts per pod.
    pub auto_rule: Option<Value>,
    /// Local-cache hits during the cache phase.
    pub cache_hits: f64,
    pub hammer_pod: String,
}

/// What the key-attack drill measured.
#[derive(Debug, Clone)]
pub struct KeyAttackReport {
    pub phases: Vec<Phase>,
    /// From the flood's start until `/attacks` listed the pod as suspected.
    pub detect_ms: Option<f64>,
    /// What `/attacks` said about the pod then.
    pub suspected: Option<Value>,
    /// From the flood's start until the attacker's first `throttled` reply.
    pub throttle_ms: Option<f64>,
    /// From the deny rule's POST until the attacker's first `NOPERM`.
    pub block_ms: Option<f64>,
    pub attacker_pod: String,
}

/// The env of the hot-key drill: pods "hammer", "web-1", "web-2"; the agent is started by
/// [`hot_key`].
pub fn hot_key_env(env: crate::env::EnvBuilder) -> crate::env::EnvBuilder {
    env.pods(["hammer", "web-1", "web-2"]).agent(false)
}

/// The env of the key-attack drill: pods "attacker", "web-1", "web-2"; the agent is started by
/// [`key_attack`].
pub fn key_attack_env(env: crate::env::EnvBuilder) -> crate::env::EnvBuilder {
    env.pods(["attacker", "web-1", "web-2"]).agent(false)
}

/// The hot-key drill's config: keys shown raw (the drill names the key), plus `extra`.
fn hot_key_yaml(extra: &str) -> String {
    format!("hotkeys:\n  key_display: raw\n{extra}")
}

/// The key-attack drill's config: penetration over a 5 s window (at least 500 lookups), the
/// automatic throttle of a suspected pod on.
fn key_attack_yaml(o: &KeyDrillOptions) -> String {
    format!(
        "attacks:\n  window_s: 5\n  penetration_min_reads: 500\n  auto_throttle: true\n  auto_throttle_rate: {}\n  auto_throttle_s: 60\n",
        o.attack_throttle_rate
    )
}

/// Starts the agent with an admin token (runtime rules need one; the harness sends it with
/// every admin request) and `yaml` as extra config.
fn start_agent(env: &mut Env, yaml: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let token_file = env.run_dir().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n"))?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let mut cfg = env.base_agent_config()?;
    cfg.extra_yaml.push_str(&format!(
        "admin_token_file: {}\n",
        crate::agent::yaml_str(&token_file.display().to_string())
    ));
    cfg.extra_yaml.push_str(yaml);
    env.start_agent(cfg)?;
    env.agent_mut().set_admin_token(Some(ADMIN_TOKEN));
    Ok(())
}

/// Writes the bystanders' keys and the hot keys straight to the backend.
fn seed(env: &Env) -> Result<()> {
    let mut c = RespConn::connect(env.redis().addr())?;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(100) {
        let mut args: Vec<Vec<u8>> = vec![b"MSET".to_vec()];
        for i in chunk {
            args.push(format!("k:{i}").into_bytes());
            args.push(vec![b'v'; 32]);
        }
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        ensure!(c.cmd_bytes(&refs)? == Reply::Simple("OK".into()), "MSET");
    }
    for k in [HOT_KEY, HOT_KEY_2] {
        ensure!(
            c.cmd_bytes(&[b"SET", k.as_bytes(), &[b'h'; 100]])? == Reply::Simple("OK".into()),
            "SET {k}"
        );
    }
    Ok(())
}

fn key_load(env: &Env, pod: &str, mode: &str, seconds: f64, extra: &[String]) -> Result<Value> {
    let svc = env.service_addr();
    let mut args = vec![
        mode.to_string(),
        "--host".into(),
        svc.ip().to_string(),
        "--port".into(),
        svc.port().to_string(),
        "--seconds".into(),
        seconds.to_string(),
    ];
    args.extend(extra.iter().cloned());
    python(env.pod(pod).cmd("python3"), "key_load.py", &args)
        .with_context(|| format!("key_load.py {mode} in pod {pod}"))
}

/// The offender of a phase: its pod, load mode and extra arguments.
struct Offender<'a> {
    pod: &'a str,
    mode: &'a str,
    args: Vec<String>,
}

/// Runs one phase: the bystanders, the offender (if any) and `watch` (given the phase's start
/// time, on this thread) at once.
fn phase<T: Send>(
    env: &Env,
    name: &'static str,
    what: String,
    seconds: f64,
    offender: Option<Offender<'_>>,
    watch: impl FnOnce(f64) -> Result<T> + Send,
) -> Result<(Phase, T)> {
    let gets0 = env.redis().command_calls("get")?;
    let start = mono_now();
    let web_args = vec![
        "--threads".to_string(),
        "2".into(),
        "--interval".into(),
        "0.002".into(),
        "--keys".into(),
        KEYS.to_string(),
    ];
    let (web, off, watched) = thread::scope(|s| {
        let webs: Vec<_> = ["web-1", "web-2"]
            .into_iter()
            .map(|p| {
                let a = web_args.clone();
                s.spawn(move || key_load(env, p, "normal", seconds, &a))
            })
            .collect();
        let off = offender
            .as_ref()
            .map(|o| s.spawn(|| key_load(env, o.pod, o.mode, seconds, &o.args)));
        let watched = watch(start);
        let web: Result<Vec<Value>> = webs
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("bystander thread panicked"))?)
            .collect();
        let off = off
            .map(|h| h.join().map_err(|_| anyhow!("offender thread panicked"))?)
            .transpose();
        (web, off, watched)
    });
    let elapsed = (mono_now() - start).max(0.001);
    let gets = env.redis().command_calls("get")?.saturating_sub(gets0) as f64 / elapsed;
    let p = Phase {
        name,
        what,
        offender: off?,
        web: web?,
        backend_gets_per_s: gets,
        seconds,
    };
    eprintln!(
        "phase {name}: offender {:.0}/s, web {:.0}/s p99 {:.2} ms errors {}, backend GET {:.0}/s",
        p.offender_ops(),
        p.web_ops(),
        p.web_p99(),
        p.web_errors(),
        p.backend_gets_per_s
    );
    Ok((p, watched?))
}

/// Polls `probe` every 50 ms until it returns something or `until` (monotonic) passes; the
/// value and when it was seen (ms after `start`).
fn poll<T>(
    start: f64,
    until: f64,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<(T, f64)>> {
    loop {
        if let Some(v) = probe()? {
            return Ok(Some((v, (mono_now() - start) * 1000.0)));
        }
        if mono_now() >= until {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn get_json(env: &Env, path: &str) -> Result<Value> {
    let (status, body) = env.agent().http_get(path)?;
    ensure!(status == 200, "{path} answered {status}: {body}");
    serde_json::from_str(&body).with_context(|| format!("{path} is not JSON: {body}"))
}

/// The top key of the endpoint at `/hotkeys`: (key, its top pod, ops/s).
fn top_key(env: &Env) -> Result<Option<(String, String, f64)>> {
    let v = get_json(env, "/hotkeys")?;
    let k = &v["endpoints"][0]["keys"][0];
    Ok(
        match (
            k["key"].as_str(),
            k["pods"][0]["pod"].as_str(),
            k["ops_per_s"].as_f64(),
        ) {
            (Some(key), Some(pod), Some(ops)) => Some((key.to_string(), pod.to_string(), ops)),
            _ => None,
        },
    )
}

/// Reloads the agent with `yaml` as the drill's sections of the config (the base config and
/// the admin token stay), and waits until the reload was applied.
fn reload(env: &mut Env, yaml: &str) -> Result<()> {
    const RELOADS: &str = "datamesh_proxy_config_reloads_total";
    let ok0 = metric(env, RELOADS, "result=\"ok\"")?;
    let bad0 = metric(env, RELOADS, "result=\"invalid\"")?;
    let mut cfg = env.agent().config().clone();
    let keep: String = cfg
        .extra_yaml
        .lines()
        .take_while(|l| {
            !l.starts_with("hotkeys:")
                && !l.starts_with("attacks:")
                && !l.starts_with("local_cache:")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    cfg.extra_yaml = format!("{keep}{yaml}");
    env.agent_mut().write_config(cfg)?;
    env.agent().sighup()?;
    crate::wait_until("the config reload", Duration::from_secs(10), || {
        if metric(env, RELOADS, "result=\"invalid\"")? > bad0 {
            bail!(
                "the agent refused the drill's config:\n{yaml}\n{}",
                env.agent().log_tail(20)
            );
        }
        Ok((metric(env, RELOADS, "result=\"ok\"")? > ok0).then_some(()))
    })
}

fn offender_args(o: &KeyDrillOptions, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--threads".to_string(),
        o.threads.to_string(),
        "--pipeline".into(),
        o.pipeline.to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn first_error_ms(p: &Phase, kind: &str, since: f64) -> Option<f64> {
    let t = p.offender.as_ref()?["first_error"][kind].as_f64()?;
    Some((t - since) * 1000.0)
}

/// Starts the agent with `yaml`, seeds the keys and runs the baseline phase.
fn begin(env: &mut Env, yaml: &str, seconds: f64) -> Result<Phase> {
    start_agent(env, yaml)?;
    seed(env)?;
    let (p, ()) = phase(
        env,
        "baseline",
        "bystanders only".into(),
        seconds,
        None,
        |_| Ok(()),
    )?;
    Ok(p)
}

/// The hot-key drill (module docs), in an env from [`hot_key_env`].
pub fn hot_key(env: &mut Env, o: &KeyDrillOptions) -> Result<HotKeyReport> {
    let mut phases = vec![begin(env, &hot_key_yaml(""), o.seconds)?];
    let hammer_pod = env.pod("hammer").netns_name().to_string();
    let secs = o.seconds;

    let hot = |key: &str| Offender {
        pod: "hammer",
        mode: "hot",
        args: offender_args(o, &["--key", key]),
    };
    let what = format!(
        "pod hammer GETs {HOT_KEY} ({} connections x pipeline {})",
        o.threads, o.pipeline
    );
    let (p, seen) = phase(env, "hot-key", what, secs, Some(hot(HOT_KEY)), |start| {
        poll(start, start + secs, || {
            Ok(top_key(env)?
                .filter(|(k, pod, ops)| k == HOT_KEY && *pod == hammer_pod && *ops >= DETECT_OPS))
        })
    })?;
    phases.push(p);
    let (named, detect_ms) = match seen {
        Some((n, ms)) => (Some(n), Some(ms)),
        None => (top_key(env)?, None),
    };

    reload(env, &hot_key_yaml("local_cache:\n  enabled: true\n"))?;
    let hits0 = metric(env, "datamesh_proxy_local_cache_hits_total", "")?;
    let (p, ()) = phase(
        env,
        "local-cache",
        "the same, local_cache on".to_string(),
        secs,
        Some(hot(HOT_KEY)),
        |_| Ok(()),
    )?;
    phases.push(p);
    let cache_hits = metric(env, "datamesh_proxy_local_cache_hits_total", "")? - hits0;

    reload(
        env,
        &hot_key_yaml(&format!(
            "  auto_throttle_ops: {}\n  auto_throttle_s: 60\n",
            o.auto_throttle_ops
        )),
    )?;
    let what = format!(
        "pod hammer GETs {HOT_KEY_2}, hotkeys.auto_throttle_ops {}",
        o.auto_throttle_ops
    );
    let (p, seen) = phase(
        env,
        "auto-throttle",
        what,
        secs,
        Some(hot(HOT_KEY_2)),
        |start| poll(start, start + secs, || auto_rule(env, HOT_KEY_2)),
    )?;
    phases.push(p);
    let throttle_ms = seen.map(|(_, ms)| ms);
    // The rule with its counts as the phase left it.
    let auto_rule = auto_rule(env, HOT_KEY_2)?;
    Ok(HotKeyReport {
        phases,
        detect_ms,
        named,
        throttle_ms,
        auto_rule,
        cache_hits,
        hammer_pod,
    })
}

/// The key-attack drill (module docs), in an env from [`key_attack_env`].
pub fn key_attack(env: &mut Env, o: &KeyDrillOptions) -> Result<KeyAttackReport> {
    let mut phases = vec![begin(env, &key_attack_yaml(o), o.seconds)?];
    let attacker_pod = env.pod("attacker").netns_name().to_string();
    let secs = o.seconds;

    let flood = || Offender {
        pod: "attacker",
        mode: "missing",
        args: offender_args(o, &["--prefix", "attack:"]),
    };
    let what = format!(
        "pod attacker GETs random missing keys ({} connections x pipeline {})",
        o.threads, o.pipeline
    );
    let (p, (start, seen)) = phase(env, "flood", what, secs, Some(flood()), |start| {
        let seen = poll(start, start + secs, || suspected(env, &attacker_pod))?;
        Ok((start, seen))
    })?;
    let throttle_ms = first_error_ms(&p, "throttled", start);
    phases.push(p);
    let (suspected, detect_ms) = match seen {
        Some((v, ms)) => (Some(v), Some(ms)),
        None => (None, None),
    };

    let what = "the operator denies GET to pod attacker at runtime (POST /keyrules)".to_string();
    let rule = serde_json::json!({
        "endpoint": crate::env::ENDPOINT_NAME,
        "action": "deny",
        "commands": ["GET"],
        "pods": [attacker_pod],
    });
    let (p, posted) = phase(env, "block", what, secs, Some(flood()), |start| {
        thread::sleep(Duration::from_millis((secs * 250.0) as u64).min(Duration::from_secs(1)));
        let at = mono_now();
        let (code, body) = env
            .agent()
            .http_request("POST", "/keyrules", &rule.to_string())?;
        ensure!(
            (200..300).contains(&code),
            "POST /keyrules answered {code}: {body}"
        );
        let _ = start;
        Ok(at)
    })?;
    let block_ms = first_error_ms(&p, "NOPERM", posted);
    phases.push(p);
    Ok(KeyAttackReport {
        phases,
        detect_ms,
        suspected,
        throttle_ms,
        block_ms,
        attacker_pod,
    })
}

/// The automatic throttle rule of `key` at `/keyrules`, if there is one.
fn auto_rule(env: &Env, key: &str) -> Result<Option<Value>> {
    let v = get_json(env, "/keyrules")?;
    Ok(v["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["origin"] == "auto" && r["key"].as_str() == Some(key))
        .cloned())
}

/// The pod's entry at `/attacks` (`endpoints: {name: [{pod, kind, ...}]}`) when it is
/// suspected.
fn suspected(env: &Env, pod: &str) -> Result<Option<Value>> {
    let v = get_json(env, "/attacks")?;
    let found = v["endpoints"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(|list| list.as_array().cloned().unwrap_or_default())
        .find(|s| s["pod"].as_str() == Some(pod));
    Ok(found)
}

fn last_second(p: Option<&Phase>) -> String {
    p.and_then(Phase::offender_last_second_ops)
        .map(|v| format!("{v:.0}"))
        .unwrap_or_else(|| "-".into())
}

fn ms(v: Option<f64>) -> String {
    v.map(|m| format!("{m:.0} ms"))
        .unwrap_or_else(|| "never".into())
}

fn phases_table(phases: &[Phase], offender: &str) -> String {
    let base = phases.first().map(|p| p.web_p99()).unwrap_or(0.0);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| phase | {offender} ok/s | {offender} p99 ms | {offender} errors | bystanders ok/s | bystanders p99 ms (baseline {base:.2}) | bystander errors | backend GET/s |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
    for p in phases {
        let (ops, p99, errs) = match &p.offender {
            Some(o) => (
                format!("{:.0}", p.offender_ops()),
                o["p99_ms"]
                    .as_f64()
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_default(),
                format!("{} {}", errors(o), o["errors"]),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            t,
            "| {} | {ops} | {p99} | {errs} | {:.0} | {:.2} | {} | {:.0} |",
            p.name,
            p.web_ops(),
            p.web_p99(),
            p.web_errors(),
            p.backend_gets_per_s
        );
    }
    t
}

/// The hot-key drill's table and figures.
pub fn hot_key_table(r: &HotKeyReport) -> String {
    let mut t = phases_table(&r.phases, "hammer");
    let named = r
        .named
        .as_ref()
        .map(|(k, p, ops)| format!("{k} (top pod {p}, {ops:.0} ops/s)"))
        .unwrap_or_else(|| "nothing".into());
    let gets = |n: &str| {
        r.phases
            .iter()
            .find(|p| p.name == n)
            .map(|p| p.backend_gets_per_s)
            .unwrap_or(0.0)
    };
    let _ = writeln!(
        t,
        "\ntime to detect (top key, top pod, >= {DETECT_OPS} ops/s): {} ({named}); time to throttle (auto rule installed for a new hot key): {} ({}; hammer {} ok/s in the phase's last second); local cache: {:.0} hits, backend GET/s {:.0} off -> {:.0} on",
        ms(r.detect_ms),
        ms(r.throttle_ms),
        r.auto_rule
            .as_ref()
            .map(|v| format!("rule {} rate {} counts {}", v["id"], v["rate"], v["counts"]))
            .unwrap_or_else(|| "no rule".into()),
        last_second(r.phases.iter().find(|p| p.name == "auto-throttle")),
        r.cache_hits,
        gets("hot-key"),
        gets("local-cache")
    );
    t
}

/// The key-attack drill's table and figures.
pub fn key_attack_table(r: &KeyAttackReport) -> String {
    let mut t = phases_table(&r.phases, "attacker");
    let _ = writeln!(
        t,
        "\ntime to detect: {} ({}); time to throttle (auto): {} (attacker {} ok/s in the flood's last second); time to block (runtime deny rule): {}",
        ms(r.detect_ms),
        r.suspected
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "not suspected".into()),
        ms(r.throttle_ms),
        last_second(r.phases.iter().find(|p| p.name == "flood")),
        ms(r.block_ms)
    );
    t
}
