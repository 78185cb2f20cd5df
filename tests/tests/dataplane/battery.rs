//! The correctness battery, run through the proxy with the fast path off and on (and against
//! plain Redis in `harness`): pipelined burst right after connect, 1 MiB and 16 MiB values, a
//! slow reader, resets mid-pipeline, 1000 concurrent connections; every reply byte-exact.

use anyhow::{ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::Env;

use crate::common::{assert_captured_entry, counter, counters, pod_connections, probe_in_pod};

/// Runs every battery case from pod `pod` against the service address.
pub fn battery(env: &Env, pod: &str) -> Result<()> {
    let pod = env.pod(pod);
    let addr = env.service_addr();
    let cases: [&[&str]; 7] = [
        &["burst", "--n", "1000"],
        &["bigvalue", "--size", "1048576"],
        &["bigvalue", "--size", "16777216"],
        &["slowreader", "--size", "1048576"],
        &["slowreader", "--size", "16777216"],
        &["reset", "--rounds", "5"],
        &["concurrent", "--conns", "1000"],
    ];
    for case in cases {
        let summary =
            probe_in_pod(pod, addr, case).with_context(|| format!("battery case {case:?}"))?;
        eprintln!("battery [{}]: {summary}", pod.netns_name());
    }
    Ok(())
}

fn battery_through_proxy(fastpath: bool) {
    run_test(Env::builder().pods(["a"]).fastpath(fastpath), |env| {
        battery(env, "a")?;
        let pod = env.pod("a");
        // The battery's connections really went through the proxy.
        let conns = pod_connections(env, pod)?;
        ensure!(
            conns.len() >= 1000,
            "only {} /connections entries from the pod after the battery",
            conns.len()
        );
        for c in conns.iter().take(20) {
            assert_captured_entry(env, pod, c)?;
        }
        let redirected = conns.iter().filter(|c| c["fastpath"] == "redirect").count();
        let m = counters(env, pod)?;
        eprintln!("counters after the battery (fastpath {fastpath}): {m:?}; /connections redirect entries: {redirected}");
        ensure!(
            counter(&m, "connects_captured") >= 1000,
            "connects_captured is {:?} after 1000+ connects: {m:?}",
            m.get("connects_captured")
        );
        if fastpath {
            ensure!(
                counter(&m, "fastpath_msgs") > 0,
                "fast path on, but fastpath_msgs is 0 for the pod: {m:?}"
            );
            ensure!(
                counter(&m, "fastpath_bytes") > 0,
                "fast path on, but fastpath_bytes is 0 for the pod: {m:?}"
            );
            ensure!(
                redirected > 0,
                "fast path on, but no /connections entry reports fastpath=redirect"
            );
        } else {
            ensure!(
                counter(&m, "fastpath_msgs") == 0,
                "fast path off, but fastpath_msgs moved: {m:?}"
            );
            ensure!(
                redirected == 0,
                "fast path off, but {redirected} /connections entries report fastpath=redirect"
            );
        }
        Ok(())
    });
}

#[test]
fn battery_fastpath_off() {
    battery_through_proxy(false);
}

#[test]
fn battery_fastpath_on() {
    battery_through_proxy(true);
}
