//! The resource-leak drill of issue 9 as a test (`datamesh_tests::leakdrill`, the debug agent,
//! sustain 1 s): `cargo xtask drill resource-leak` runs the same with the release agent.
//! Each leak (descriptors, memory, dedicated backend connections) is detected by the worker's
//! watchdog and the worker replaced gracefully, with no refused connect and no client error
//! (the pooled clients retry once on a closed connection).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use datamesh_tests::env::run_test;
use datamesh_tests::leakdrill::{self, LeakOptions};
use datamesh_tests::Env;

#[test]
fn resource_leak_drill() {
    let opts = LeakOptions::default();
    run_test(leakdrill::env_builder(Env::builder(), &opts), |env| {
        let rows = leakdrill::run(env, &opts)?;
        let table = leakdrill::table(&rows);
        eprintln!("resource-leak drill:\n{table}");
        for r in &rows {
            let leak = r.leak.map_or("?", |l| l.param());
            ensure!(
                r.leaked > r.threshold,
                "{leak}: the leak did not cross the threshold:\n{table}"
            );
            ensure!(
                r.detected.is_some() && r.serving.is_some() && r.retired.is_some(),
                "{leak}: not detected, replaced and retired:\n{table}"
            );
            // Detection needs the sustain (1 s) plus a sampling interval; the replacement a
            // pong (1 s) and the successor's start.
            ensure!(
                r.serving.unwrap_or_default() < Duration::from_secs(8),
                "{leak}: replaced too late:\n{table}"
            );
            ensure!(
                r.after < r.threshold,
                "{leak}: the new worker is over the threshold too:\n{table}"
            );
            ensure!(
                r.load.refused == 0 && r.load.connect_errors_total() == 0,
                "{leak}: connects failed during the replacement:\n{table}"
            );
            ensure!(
                r.load.errors_total() == 0,
                "{leak}: clients saw errors (after one retry):\n{table}"
            );
            ensure!(
                r.load.connects > 0 && r.load.ops > 0,
                "{leak}: no load:\n{table}"
            );
        }
        // The counts come with the supervisor's pings (once a second).
        let want = format!(
            "datamesh_agent_worker_replacements_total{{reason=\"watchdog\"}} {}",
            rows.len()
        );
        datamesh_tests::wait_until(&want, Duration::from_secs(3), || {
            Ok(env
                .agent()
                .http_get("/metrics")?
                .1
                .contains(&want)
                .then_some(()))
        })?;
        Ok(())
    });
}

/// The agent's log from byte `from` on.
fn log_since(env: &Env, from: usize) -> String {
    let text = std::fs::read(env.agent().log_path()).unwrap_or_default();
    String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned()
}

fn log_len(env: &Env) -> usize {
    std::fs::metadata(env.agent().log_path()).map_or(0, |m| m.len() as usize)
}

fn sigusr2(env: &Env) -> anyhow::Result<()> {
    let pid = env.agent().pid().context("agent not running")?;
    // SAFETY: kill(2) on the agent's supervisor, our child.
    ensure!(
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) } == 0,
        "kill(SIGUSR2): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// `datamesh-agent restart-worker` (SIGUSR2 to the supervisor, the operator's "restart the
/// worker gracefully"): a successor takes over, the old
/// worker drains and exits; no connect refused, no client error, nothing counted as a crash.
/// A successor that cannot start (here: the config file was made invalid) leaves the running
/// worker in place.
#[test]
fn sigusr2_replaces_the_worker_gracefully_and_a_failed_successor_leaves_it() {
    let opts = LeakOptions::default();
    run_test(leakdrill::env_builder(Env::builder(), &opts), |env| {
        let load = leakdrill::Load::start(env, &opts)?;
        let old = leakdrill::only_worker(env)?;
        let from = log_len(env);
        let t0 = Instant::now();
        // The operator's command: SIGUSR2 to the pid in the ready file.
        let ready = env.agent().config_path().with_file_name("ready.json");
        let out = std::process::Command::new(datamesh_tests::agent::agent_bin()?)
            .args(["restart-worker", "--ready-file"])
            .arg(&ready)
            .output()?;
        ensure!(
            out.status.success(),
            "datamesh-agent restart-worker: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        datamesh_tests::wait_until("the old worker's exit", Duration::from_secs(10), || {
            Ok(log_since(env, from)
                .contains("retired worker exited")
                .then_some(()))
        })?;
        let retired = t0.elapsed();
        let new = leakdrill::only_worker(env)?;
        std::thread::sleep(Duration::from_millis(300));
        let counts = load.stop()?;
        eprintln!("SIGUSR2: worker {old} -> {new}, old exited after {retired:?}; load {counts:?}");
        ensure!(new != old, "the worker was not replaced");
        ensure!(
            counts.refused == 0 && counts.connect_errors_total() == 0 && counts.errors_total() == 0,
            "connects or commands failed during the replacement: {counts:?}"
        );
        let want = "datamesh_agent_worker_replacements_total{reason=\"operator\"} 1";
        datamesh_tests::wait_until(want, Duration::from_secs(3), || {
            Ok(env
                .agent()
                .http_get("/metrics")?
                .1
                .contains(want)
                .then_some(()))
        })?;
        let m = env.agent().http_get("/metrics")?.1;
        for zero in [
            "datamesh_agent_worker_restarts_total 0",
            "datamesh_agent_worker_lost_connections_total 0",
        ] {
            ensure!(
                m.contains(zero),
                "a graceful replacement counted as a crash: no {zero:?}"
            );
        }

        // A successor that exits before it serves: the running worker stays.
        let path = env.agent().config_path().to_path_buf();
        let good = std::fs::read_to_string(&path)?;
        std::fs::write(&path, format!("{good}\nbogus_key: 1\n"))?;
        let from = log_len(env);
        sigusr2(env)?;
        let r =
            datamesh_tests::wait_until("the failed replacement", Duration::from_secs(10), || {
                Ok(log_since(env, from)
                    .contains("graceful replacement failed")
                    .then_some(()))
            });
        std::fs::write(&path, &good)?;
        r?;
        ensure!(
            leakdrill::only_worker(env)? == new,
            "the running worker did not stay"
        );
        ensure!(
            env.agent().http_get("/ready")?.0 == 200,
            "the running worker does not serve"
        );
        Ok(())
    });
}

/// Fault injection is for drills: no manifest in deploy/ turns it on.
#[test]
fn no_deploy_manifest_enables_fault_injection() {
    fn walk(dir: &std::path::Path, hits: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, hits);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                if text.contains("fault_injection") {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    let deploy = datamesh_tests::project_root().join("deploy");
    assert!(deploy.is_dir(), "no {}", deploy.display());
    let mut hits = Vec::new();
    walk(&deploy, &mut hits);
    assert!(
        hits.is_empty(),
        "deploy/ mentions debug.fault_injection: {hits:?}"
    );
}
