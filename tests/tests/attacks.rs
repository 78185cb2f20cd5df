//! Key-attack detection with the real agent, a real redis-server and real clients in pods
//! (redis-benchmark, redis-cli, redis-py): a pod flooding GETs of random missing keys (RESP2,
//! and RESP3 after HELLO 3) is suspected of cache penetration within the window and named at
//! `/attacks`, in the metrics, in the log and by `datamesh-agent attacks`, while a bystander
//! with hits is not; a SCAN flood is suspected of key scanning; with `auto_throttle` on, the
//! flooding pod's commands are refused past its temporary rate while the bystander's flow.
//! Windows and thresholds are small so each test takes a few seconds.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::pod::Pod;
use datamesh_tests::proc::{run_ok, run_with_timeout};
use datamesh_tests::proxy::pod_cli;
use datamesh_tests::tenant::metric;
use datamesh_tests::{wait_until, Env};
use serde_json::Value;

/// A load process of the test's own, killed when dropped (also on failure).
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench(pod: &Pod, svc: std::net::SocketAddr, args: &[&str]) -> Result<Load> {
    let mut cmd: Command = pod.cmd("redis-benchmark");
    cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
        .args(["-n", "100000000", "-q"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Load(
        cmd.spawn().context("starting redis-benchmark in a pod")?,
    ))
}

fn attacks(env: &Env) -> Result<Value> {
    let (status, body) = env.agent().http_get("/attacks")?;
    ensure!(status == 200, "/attacks answered {status}: {body}");
    serde_json::from_str(&body).context("/attacks is not JSON")
}

/// The `/attacks` rows naming `pod` with `kind`.
fn suspected(v: &Value, pod: &str, kind: &str) -> Option<Value> {
    v.get("endpoints")?
        .as_object()?
        .values()
        .flat_map(|rows| rows.as_array().into_iter().flatten())
        .find(|r| r["pod"] == pod && r["kind"] == kind)
        .cloned()
}

fn named(v: &Value, pod: &str) -> bool {
    v.to_string().contains(&format!("\"pod\":\"{pod}\""))
}

#[test]
fn a_penetration_flood_is_named_and_the_bystander_is_not() {
    run_test(
        Env::builder().pods(["a", "b", "c"]).extra_config(
            "attacks:\n  window_s: 2\n  penetration_min_reads: 200\n  penetration_miss_ratio: 0.9\n",
        ),
        |env| {
            let svc = env.service_addr();
            let (pod_a, pod_b, pod_c) = (
                format!("dmt{}-a", env.n()),
                format!("dmt{}-b", env.n()),
                format!("dmt{}-c", env.n()),
            );
            // Pod a: reads that hit (one key it set), as many as the flood.
            let set = pod_cli(env, env.pod("a"), &["SET", "present", "v"])?;
            ensure!(set.contains("OK"), "SET: {set}");
            let started = Instant::now();
            let _hits = bench(env.pod("a"), svc, &["-c", "2", "GET", "present"])?;
            // Pod b: GETs of random missing keys (RESP2); pod c: the same in RESP3 (HELLO 3),
            // with MGETs so per-element nils count too.
            let _flood = bench(
                env.pod("b"),
                svc,
                &["-c", "2", "-r", "10000000", "GET", "miss:__rand_int__"],
            )?;
            let _flood3 = bench(
                env.pod("c"),
                svc,
                &[
                    "-3",
                    "-c",
                    "2",
                    "-r",
                    "10000000",
                    "MGET",
                    "m:__rand_int__",
                    "n:__rand_int__",
                ],
            )?;
            let v = wait_until(
                "/attacks to name both flooding pods",
                Duration::from_secs(10),
                || {
                    let v = attacks(env)?;
                    Ok((suspected(&v, &pod_b, "penetration").is_some()
                        && suspected(&v, &pod_c, "penetration").is_some())
                    .then_some(v))
                },
            )?;
            let detect = started.elapsed();
            let row = suspected(&v, &pod_b, "penetration").context("row of pod b")?;
            eprintln!("detected after {detect:?}: {v}");
            ensure!(
                row["miss_ratio"].as_f64().unwrap_or(0.0) > 0.99
                    && row["lookups"].as_u64().unwrap_or(0) >= 200
                    && row["auto_throttled_until"].is_null(),
                "pod b's row: {row}"
            );
            ensure!(!named(&v, &pod_a), "the bystander is listed: {v}");

            // Metrics: suspected gauges, lookups and misses per pod.
            let sus = |pod: &str| {
                metric(
                    env,
                    "datamesh_proxy_pod_suspected",
                    &format!("pod=\"{pod}\",kind=\"penetration\""),
                )
            };
            ensure!(sus(&pod_b)? == 1.0 && sus(&pod_c)? == 1.0, "gauges of b, c");
            ensure!(sus(&pod_a)? == 0.0, "bystander gauge");
            let lookups = |pod: &str| {
                metric(
                    env,
                    "datamesh_proxy_pod_lookups_total",
                    &format!("pod=\"{pod}\""),
                )
            };
            let misses = |pod: &str| {
                metric(
                    env,
                    "datamesh_proxy_pod_misses_total",
                    &format!("pod=\"{pod}\""),
                )
            };
            let (la, ma) = (lookups(&pod_a)?, misses(&pod_a)?);
            let (lc, mc) = (lookups(&pod_c)?, misses(&pod_c)?);
            eprintln!("bystander {la} lookups {ma} misses; RESP3 MGET pod {lc} lookups {mc} misses");
            ensure!(la > 200.0 && ma == 0.0, "bystander: {la} lookups, {ma} misses");
            ensure!(
                lc > 200.0 && mc > 0.99 * lc,
                "RESP3 pod: {lc} lookups, {mc} misses"
            );

            // The CLI's table and the log's warning.
            let admin = env.agent().ready()?.admin.to_string();
            let out = run_ok(
                env.agent().cli().args(["attacks", "--admin", &admin]),
                Duration::from_secs(10),
            )?;
            let table = String::from_utf8_lossy(&out.stdout);
            eprintln!("datamesh-agent attacks:\n{table}");
            ensure!(
                table
                    .lines()
                    .any(|l| l.contains(&pod_b) && l.contains("penetration")),
                "no line for {pod_b}:\n{table}"
            );
            ensure!(!table.contains(&pod_a), "bystander in the table:\n{table}");
            let log = std::fs::read_to_string(env.agent().log_path())?;
            ensure!(
                log.lines().any(|l| l.contains("pod suspected of a key attack")
                    && l.contains(&pod_b)),
                "no warning for {pod_b} in the log"
            );

            // The flood stops: the pod leaves the list within the window.
            drop((_flood, _flood3));
            wait_until(
                "the pods to leave /attacks once the floods stop",
                Duration::from_secs(10),
                || Ok((!named(&attacks(env)?, &pod_b)).then_some(())),
            )?;
            ensure!(sus(&pod_b)? == 0.0, "gauge back to 0");
            Ok(())
        },
    );
}

#[test]
fn a_scan_flood_is_detected() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .extra_config("attacks:\n  window_s: 2\n  scan_max_per_s: 20\n"),
        |env| {
            let svc = env.service_addr();
            let (pod_a, pod_b) = (format!("dmt{}-a", env.n()), format!("dmt{}-b", env.n()));
            let started = Instant::now();
            let _normal = bench(env.pod("a"), svc, &["-c", "1", "-t", "get,set"])?;
            // A few scans by the bystander are fine.
            for _ in 0..5 {
                pod_cli(env, env.pod("a"), &["SCAN", "0"])?;
            }
            let _scan = bench(env.pod("b"), svc, &["-c", "2", "SCAN", "0"])?;
            let v = wait_until(
                "/attacks to name the scanning pod",
                Duration::from_secs(10),
                || {
                    let v = attacks(env)?;
                    Ok(suspected(&v, &pod_b, "scan").map(|r| (v, r)))
                },
            )?;
            eprintln!("detected after {:?}: {}", started.elapsed(), v.1);
            ensure!(
                v.1["scans_per_s"].as_f64().unwrap_or(0.0) > 20.0,
                "scans/s: {}",
                v.1
            );
            ensure!(!named(&v.0, &pod_a), "the bystander is listed: {}", v.0);
            ensure!(
                metric(
                    env,
                    "datamesh_proxy_pod_suspected",
                    &format!("pod=\"{pod_b}\",kind=\"scan\"")
                )? == 1.0,
                "scan gauge"
            );
            ensure!(
                metric(
                    env,
                    "datamesh_proxy_pod_scans_total",
                    &format!("pod=\"{pod_b}\"")
                )? > 40.0,
                "scans counted"
            );

            // Hot reload: detection off clears the suspicion; /config_dump shows the section.
            let mut cfg = env.agent().config().clone();
            cfg.extra_yaml = cfg
                .extra_yaml
                .replace("attacks:\n", "attacks:\n  enabled: false\n");
            env.agent_mut().write_config(cfg)?;
            env.agent().sighup()?;
            wait_until(
                "the reload to turn detection off",
                Duration::from_secs(10),
                || {
                    let v = attacks(env)?;
                    Ok((v["enabled"] == false && !named(&v, &pod_b)).then_some(()))
                },
            )?;
            let (_, dump) = env.agent().http_get("/config_dump")?;
            let dump: Value = serde_json::from_str(&dump)?;
            ensure!(
                dump["attacks"]["enabled"] == false && dump["attacks"]["scan_max_per_s"] == 20,
                "config_dump: {}",
                dump["attacks"]
            );
            Ok(())
        },
    );
}

/// Pipelines `n` GETs through redis-py in `pod` (of `key`, or of missing keys when None):
/// (answered, first error).
fn pipelined_gets(
    env: &Env,
    pod: &Pod,
    n: usize,
    key: Option<&str>,
) -> Result<(usize, Option<String>)> {
    let svc = env.service_addr();
    let script = format!(
        r#"
import redis
r = redis.Redis(host="{ip}", port={port})
p = r.pipeline(transaction=False)
for i in range({n}):
    p.get({key})
res = p.execute(raise_on_error=False)
ok = sum(1 for x in res if not isinstance(x, Exception))
err = next((str(x) for x in res if isinstance(x, Exception)), "")
print(ok)
print(err)
"#,
        ip = svc.ip(),
        port = svc.port(),
        key = match key {
            Some(k) => format!("{k:?}"),
            None => "\"miss:py:%d\" % i".to_string(),
        }
    );
    let mut cmd = pod.cmd("python3");
    cmd.args(["-c", &script]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "redis-py: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let ok = lines.next().unwrap_or("0").trim().parse().unwrap_or(0);
    let err = lines.next().map(str::to_string).filter(|e| !e.is_empty());
    Ok((ok, err))
}

#[test]
fn auto_throttle_slows_the_flooding_pod_only() {
    run_test(
        Env::builder().pods(["a", "b"]).extra_config(
            "attacks:\n  window_s: 2\n  penetration_min_reads: 200\n  auto_throttle: true\n  auto_throttle_rate: 50\n  auto_throttle_s: 30\n",
        ),
        |env| {
            let svc = env.service_addr();
            let (pod_a, pod_b) = (format!("dmt{}-a", env.n()), format!("dmt{}-b", env.n()));
            pod_cli(env, env.pod("a"), &["SET", "present", "v"])?;
            let started = Instant::now();
            let flood = bench(
                env.pod("b"),
                svc,
                &["-c", "2", "-r", "10000000", "GET", "miss:__rand_int__"],
            )?;
            let row = wait_until(
                "the flooding pod to be throttled automatically",
                Duration::from_secs(10),
                || {
                    let v = attacks(env)?;
                    Ok(suspected(&v, &pod_b, "penetration")
                        .filter(|r| r["auto_throttled_until"].is_u64()))
                },
            )?;
            eprintln!("throttled after {:?}: {row}", started.elapsed());
            ensure!(
                metric(
                    env,
                    "datamesh_proxy_pod_auto_throttled",
                    &format!("pod=\"{pod_b}\"")
                )? == 1.0,
                "auto_throttled gauge"
            );
            // The flood's rate now: lookups over 2 s within the 50/s limit (a burst of 5).
            let lookups = || {
                metric(
                    env,
                    "datamesh_proxy_pod_lookups_total",
                    &format!("pod=\"{pod_b}\""),
                )
            };
            let l0 = lookups()?;
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs(2));
            let rate = (lookups()? - l0) / t0.elapsed().as_secs_f64();
            eprintln!("flooding pod's lookups while throttled: {rate:.0}/s");
            ensure!(rate < 80.0, "throttled pod still at {rate:.0} lookups/s");
            drop(flood);

            // A pipelined burst from the flooding pod: refused past the limit, with the reason.
            let (ok, err) = pipelined_gets(env, env.pod("b"), 300, None)?;
            eprintln!("flooding pod's burst of 300: {ok} answered, error {err:?}");
            let err = err.context("no command of the burst was refused")?;
            ensure!(
                err.contains("throttled") && err.contains("automatic: suspected cache penetration"),
                "refusal text: {err}"
            );
            ensure!(ok < 100, "{ok} of 300 answered");

            // The bystander's commands flow: a burst as large (of a key that is there), all
            // answered at once.
            let t = Instant::now();
            let (ok, err) = pipelined_gets(env, env.pod("a"), 300, Some("present"))?;
            let took = t.elapsed();
            eprintln!("bystander's burst of 300: {ok} answered in {took:?}");
            ensure!(ok == 300 && err.is_none(), "bystander: {ok} answered, {err:?}");
            let hit = pod_cli(env, env.pod("a"), &["GET", "present"])?;
            ensure!(hit.trim() == "v", "bystander GET: {hit}");
            ensure!(
                metric(
                    env,
                    "datamesh_proxy_pod_throttled_total",
                    &format!("pod=\"{pod_a}\"")
                )? == 0.0,
                "the bystander was throttled"
            );
            Ok(())
        },
    );
}
