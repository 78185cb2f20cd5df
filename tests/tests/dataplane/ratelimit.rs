//! Per-pod connection-rate limit: pod `a` (5/s, burst 5) gets ECONNREFUSED for the excess of a
//! quick loop of 20 connects, and the refusals are counted; pod `b` has no limit and is not
//! affected.

use anyhow::{ensure, Context};
use datamesh_tests::env::run_test;
use datamesh_tests::Env;

use crate::common::{counter, counters, probe_in_pod};

#[test]
fn conn_rate_limit_refuses_excess_per_pod() {
    run_test(
        Env::builder().pods(["a", "b"]).conn_limit("a", 5, 5),
        |env| {
            let svc = env.service_addr();
            let (a, b) = (env.pod("a"), env.pod("b"));

            let ra = probe_in_pod(a, svc, &["connect-loop", "--count", "20"])?;
            let rb = probe_in_pod(b, svc, &["connect-loop", "--count", "20"])?;
            eprintln!("rate limit: pod a {ra}; pod b {rb}");
            let ok_a = ra["ok"].as_u64().context("ok")?;
            let refused_a = ra["refused"].as_u64().context("refused")?;
            ensure!(
                refused_a > 0,
                "pod a (5/s, burst 5) saw no ECONNREFUSED in 20 quick connects: {ra}"
            );
            ensure!(
                ok_a >= 5,
                "pod a got fewer than its burst of 5 connects through: {ra}"
            );
            ensure!(
                ok_a + refused_a == 20,
                "pod a saw errors other than ECONNREFUSED: {ra}"
            );

            ensure!(
                rb["ok"].as_u64() == Some(20),
                "pod b (no limit) did not get all 20 connects through: {rb}"
            );

            let ca = counters(env, a)?;
            let cb = counters(env, b)?;
            ensure!(
                counter(&ca, "connects_refused") == refused_a,
                "pod a: connects_refused is {} but the pod saw {refused_a} refusals: {ca:?}",
                counter(&ca, "connects_refused")
            );
            ensure!(
                counter(&ca, "connects_captured") >= ok_a,
                "pod a: captured {ca:?} < {ok_a} successful connects"
            );
            ensure!(
                counter(&cb, "connects_refused") == 0,
                "pod b was refused: {cb:?}"
            );
            ensure!(counter(&cb, "connects_captured") >= 20, "pod b: {cb:?}");
            Ok(())
        },
    );
}
