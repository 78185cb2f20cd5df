//! Per-pod command-rate limit: pod `a` (50 commands/s, burst 50) hammering the proxy through
//! capture gets delayed and then refused commands (`-ERR throttled: pod ...`), counted in its
//! `commands_throttled`; pod `b`, hammering at the same time without a limit, is not touched;
//! both pods' `commands` counters move.

use std::time::Duration;

use anyhow::{anyhow, ensure};
use datamesh_tests::env::run_test;
use datamesh_tests::{wait_until, Env};

use crate::common::{counter, pod_counters, py_pod};

const N: u64 = 500;

#[test]
fn pod_command_rate_limit_throttles_only_that_pod() {
    run_test(
        Env::builder().pods(["a", "b"]).cmd_limit("a", 50, 50),
        |env| {
            let svc = env.service_addr();
            let (pa, pb) = (
                env.pod("a").netns_name().to_string(),
                env.pod("b").netns_name().to_string(),
            );
            let n = N.to_string();
            let (ra, rb) = std::thread::scope(|s| {
                let ha = s.spawn(|| {
                    py_pod(
                        env.pod("a"),
                        "hammer",
                        svc,
                        &["--count", &n, "--prefix", "ha:"],
                    )
                });
                let hb = s.spawn(|| {
                    py_pod(
                        env.pod("b"),
                        "hammer",
                        svc,
                        &["--count", &n, "--prefix", "hb:"],
                    )
                });
                (
                    ha.join().map_err(|_| anyhow!("pod a thread panicked")),
                    hb.join().map_err(|_| anyhow!("pod b thread panicked")),
                )
            });
            let (ra, rb) = (ra??, rb??);
            let num = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);

            // Pod a: its burst gets through, the excess is throttled with a clear error.
            ensure!(
                num(&ra, "n_other") == 0,
                "pod a saw errors other than throttling: {ra}"
            );
            ensure!(
                num(&ra, "throttled") > 0,
                "pod a (50/s, burst 50) was never throttled by a {N}-command pipeline: {ra}"
            );
            ensure!(
                num(&ra, "ok") >= 50,
                "pod a got fewer than its burst of 50 through: {ra}"
            );
            ensure!(
                num(&ra, "ok") + num(&ra, "throttled") == N,
                "pod a lost replies: {ra}"
            );
            let msg = ra["first_throttle_error"].as_str().unwrap_or("");
            ensure!(
                msg.contains("throttled") && msg.contains(&pa),
                "the throttle error does not name the pod {pa}: {msg:?}"
            );
            // Pod b (no limit) is unaffected.
            ensure!(
                num(&rb, "ok") == N && num(&rb, "throttled") == 0 && num(&rb, "n_other") == 0,
                "pod b was affected: {rb}"
            );
            ensure!(
                num(&rb, "seq_throttled") == 0,
                "pod b's sequential commands were throttled: {rb}"
            );

            // The counters (flushed to the pinned map every ~200 ms).
            let refused_a = num(&ra, "throttled") + num(&ra, "seq_throttled");
            let (ca, cb) = wait_until(
                "the per-pod command counters to be flushed",
                Duration::from_secs(5),
                || {
                    let ca = pod_counters(env, &pa)?;
                    let cb = pod_counters(env, &pb)?;
                    let ready = counter(&ca, "commands_throttled") >= refused_a
                        && counter(&cb, "commands") >= N;
                    Ok(ready.then_some((ca, cb)))
                },
            )
            .map_err(|e| {
                let now = (pod_counters(env, &pa).ok(), pod_counters(env, &pb).ok());
                e.context(format!(
                    "pod a saw {refused_a} throttle errors; counters now {now:?}"
                ))
            })?;
            eprintln!("pod a: {ra}\n  counters {ca:?}\npod b: {rb}\n  counters {cb:?}");
            ensure!(
                counter(&ca, "commands") > 0,
                "pod a's commands counter did not move: {ca:?}"
            );
            ensure!(
                counter(&cb, "commands_throttled") == 0,
                "pod b has throttled commands: {cb:?}"
            );
            Ok(())
        },
    );
}
