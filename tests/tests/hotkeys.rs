//! Hot-key detection with the real agent, a real redis-server and real clients in pods: one pod
//! hammers one key among another pod's spread traffic (redis-benchmark in both); `/hotkeys`
//! names the key and the hammering pod within a few seconds, `datamesh-agent hotkeys` prints
//! them, `datamesh_proxy_hotkey_ops_per_second` exports them (rank-bounded), and after a
//! reload to `key_display: hashed` the key appears nowhere outside the proxy.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::proc::run_ok;
use datamesh_tests::{wait_until, Env};
use serde_json::Value;

const HOT_KEY: &str = "hot:user:42";

/// A load process of the test's own, killed when dropped (also on failure).
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench(pod_cmd: Command, svc: std::net::SocketAddr, args: &[&str]) -> Result<Load> {
    let mut cmd = pod_cmd;
    cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Load(
        cmd.spawn().context("starting redis-benchmark in a pod")?,
    ))
}

fn hotkeys(env: &Env) -> Result<Value> {
    let (status, body) = env.agent().http_get("/hotkeys")?;
    ensure!(status == 200, "/hotkeys answered {status}: {body}");
    serde_json::from_str(&body).context("/hotkeys is not JSON")
}

/// The top key of the first endpoint and its top pod.
fn top(v: &Value) -> Option<(String, String, f64)> {
    let k = v.get("endpoints")?.get(0)?.get("keys")?.get(0)?;
    Some((
        k.get("key")?.as_str()?.to_string(),
        k.get("pods")?.get(0)?.get("pod")?.as_str()?.to_string(),
        k.get("ops_per_s")?.as_f64()?,
    ))
}

#[test]
fn a_hammered_key_and_its_pod_are_named() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .extra_config("hotkeys:\n  window_s: 4\n  key_display: raw\n"),
        |env| {
            let svc = env.service_addr();
            let pod_b = format!("dmt{}-b", env.n());
            let started = Instant::now();
            // Pod a: spread traffic (GET/SET over 100,000 keys); pod b: one key, hammered.
            let _spread = bench(
                env.pod("a").cmd("redis-benchmark"),
                svc,
                &[
                    "-t",
                    "set,get",
                    "-r",
                    "100000",
                    "-n",
                    "100000000",
                    "-c",
                    "4",
                    "-q",
                ],
            )?;
            let _hammer = bench(
                env.pod("b").cmd("redis-benchmark"),
                svc,
                &["-n", "100000000", "-c", "2", "-q", "GET", HOT_KEY],
            )?;
            let (key, pod, rate) = wait_until(
                "/hotkeys to name the hammered key and its pod",
                Duration::from_secs(10),
                || {
                    let v = hotkeys(env)?;
                    Ok(top(&v).filter(|(k, p, _)| k == HOT_KEY && *p == pod_b))
                },
            )?;
            let detect = started.elapsed();
            eprintln!("detected {key} from {pod} at {rate:.0} ops/s after {detect:?}");
            let v = hotkeys(env)?;
            let k = &v["endpoints"][0]["keys"][0];
            ensure!(
                k["reads"].as_u64().unwrap_or(0) > 0 && k["writes"].as_u64() == Some(0),
                "GETs counted as reads only: {k}"
            );

            // The CLI's table.
            let admin = env.agent().ready()?.admin.to_string();
            let out = run_ok(
                env.agent().cli().args(["hotkeys", "--admin", &admin]),
                Duration::from_secs(10),
            )?;
            let table = String::from_utf8_lossy(&out.stdout);
            eprintln!("datamesh-agent hotkeys:\n{table}");
            let line = table
                .lines()
                .find(|l| l.contains(HOT_KEY))
                .with_context(|| format!("no {HOT_KEY} line in\n{table}"))?;
            ensure!(
                line.contains(&pod_b),
                "{HOT_KEY}'s line lacks {pod_b}: {line}"
            );

            // The metric: rank 1 is the key; every series is within metrics_top ranks.
            let (status, m) = env.agent().http_get("/metrics")?;
            ensure!(status == 200, "/metrics answered {status}");
            let series: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("datamesh_proxy_hotkey_ops_per_second{"))
                .collect();
            ensure!(
                series
                    .iter()
                    .any(|l| l.contains("rank=\"1\"") && l.contains(&format!("key=\"{HOT_KEY}\""))),
                "no rank-1 series for {HOT_KEY}: {series:#?}"
            );
            ensure!(
                !series.is_empty() && series.len() <= 10,
                "{} series (metrics_top 10)",
                series.len()
            );

            // Hashed display, by reload: the key leaves the proxy nowhere.
            let mut cfg = env.agent().config().clone();
            cfg.extra_yaml = cfg
                .extra_yaml
                .replace("key_display: raw", "key_display: hashed");
            env.agent_mut().write_config(cfg)?;
            env.agent().sighup()?;
            let v = wait_until(
                "the reload to hash the keys",
                Duration::from_secs(10),
                || {
                    let v = hotkeys(env)?;
                    Ok((v["key_display"] == "hashed").then_some(v))
                },
            )?;
            let (key, pod, _) = top(&v).context("no top key after the reload")?;
            ensure!(
                key.starts_with("h:") && pod == pod_b,
                "hashed top key {key:?} from {pod:?}"
            );
            let text = v.to_string();
            ensure!(!text.contains(HOT_KEY), "/hotkeys shows the key: {text}");
            let (_, m) = env.agent().http_get("/metrics")?;
            ensure!(!m.contains(HOT_KEY), "/metrics shows the key");
            let out = run_ok(
                env.agent().cli().args(["hotkeys", "--admin", &admin]),
                Duration::from_secs(10),
            )?;
            let table = String::from_utf8_lossy(&out.stdout);
            ensure!(
                !table.contains(HOT_KEY) && table.contains(&key),
                "CLI after hashing:\n{table}"
            );
            Ok(())
        },
    );
}
