//! Capture: real clients in a pod dial the service address and end up at the proxy, which knows
//! the pod and the original destination; and what must stay untouched: a port that is not an
//! endpoint, and a process outside the attached cgroup (even in the pod's network namespace).

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::proc::run_ok;
use datamesh_tests::Env;

use crate::common::{
    assert_captured_entry, captured_by_proxy, counter, counters, is_pod_addr, pod_connections,
    redis_cli_client_addr, redis_py_client_addr,
};

#[test]
fn redis_cli_and_redis_py_are_captured() {
    run_test(Env::builder().pods(["a"]), |env| {
        let pod = env.pod("a");
        let svc = env.service_addr();
        let before = counters(env, pod)?;

        let cli_seen = redis_cli_client_addr(pod.cmd("redis-cli"), svc, "dmcli")?;
        ensure!(
            captured_by_proxy(env, pod, cli_seen)?,
            "the proxy has no record of redis-cli's connection {cli_seen}: not captured"
        );
        let py_seen = redis_py_client_addr(pod, svc, "dmpy")?;
        ensure!(
            captured_by_proxy(env, pod, py_seen)?,
            "the proxy has no record of redis-py's connection {py_seen}: not captured"
        );

        let conns = pod_connections(env, pod)?;
        ensure!(
            conns.len() >= 2,
            "expected the redis-cli and redis-py connections in /connections, got {conns:?}"
        );
        for c in &conns {
            assert_captured_entry(env, pod, c)?;
        }

        let after = counters(env, pod)?;
        ensure!(
            counter(&after, "connects_captured") >= counter(&before, "connects_captured") + 2,
            "connects_captured did not move by 2: before {before:?}, after {after:?}"
        );
        ensure!(
            counter(&after, "connects_failopen") == 0,
            "fail-open counted while the agent is up: {after:?}"
        );
        Ok(())
    });
}

#[test]
fn port_not_in_endpoints_is_untouched() {
    run_test(Env::builder().pods(["a"]), |env| {
        let other = env.start_redis(6380)?.addr();
        let pod = env.pod("a");
        let conns_before = env.agent().connections()?.len();
        let before = counters(env, pod)?;

        let seen = redis_cli_client_addr(pod.cmd("redis-cli"), other, "dmport")?;
        ensure!(
            is_pod_addr(pod, seen),
            "Redis on {other} saw {seen}, not the pod {}: the connect was modified",
            pod.ip()
        );
        ensure!(
            !captured_by_proxy(env, pod, seen)?,
            "the proxy recorded {seen}: a connect to a port not in endpoints was captured"
        );

        let conns_after = env.agent().connections()?.len();
        ensure!(
            conns_after == conns_before,
            "/connections grew from {conns_before} to {conns_after}"
        );
        let after = counters(env, pod)?;
        ensure!(
            counter(&after, "connects_captured") == counter(&before, "connects_captured"),
            "connects_captured moved for a port not in endpoints: before {before:?}, after {after:?}"
        );
        Ok(())
    });
}

#[test]
fn process_outside_attached_cgroup_is_untouched() {
    run_test(Env::builder().pods(["a"]), |env| {
        let pod = env.pod("a");
        let svc = env.service_addr();
        let conns_before = env.agent().connections()?.len();

        // Same netns as the pod, same destination, but a cgroup outside the attached one.
        let cmd = pod.cmd_in_cgroup(env.outside_cgroup(), "redis-cli");
        let seen = redis_cli_client_addr(cmd, svc, "dmoutside")?;
        ensure!(
            is_pod_addr(pod, seen),
            "Redis saw {seen}, not the pod {}: a process outside the cgroup was captured",
            pod.ip()
        );
        ensure!(
            !captured_by_proxy(env, pod, seen)?,
            "the proxy recorded {seen}: a process outside the cgroup was captured"
        );

        let conns_after = env.agent().connections()?.len();
        ensure!(
            conns_after == conns_before,
            "/connections grew from {conns_before} to {conns_after}"
        );

        // The same client inside the pod's cgroup is captured (the control).
        let seen = redis_cli_client_addr(pod.cmd("redis-cli"), svc, "dminside")?;
        ensure!(
            captured_by_proxy(env, pod, seen)?,
            "control: the in-pod client {seen} was not captured"
        );
        Ok(())
    });
}

#[test]
fn bpftool_dump_of_counters_prints_field_names() {
    run_test(Env::builder().pods(["a"]), |env| {
        let pod = env.pod("a");
        redis_cli_client_addr(pod.cmd("redis-cli"), env.service_addr(), "dmdump")?;
        let pin = env.pin_dir();
        let dump = |map: &str| -> Result<String> {
            let out = run_ok(
                Command::new("bpftool")
                    .args(["map", "dump", "pinned"])
                    .arg(pin.join(map)),
                Duration::from_secs(20),
            )?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let counters = dump("dm_pod_counters")?;
        for field in [
            "connects_captured",
            "connects_failopen",
            "connects_refused",
            "fastpath_msgs",
        ] {
            ensure!(
                counters.contains(field),
                "`bpftool map dump pinned dm_pod_counters` lacks {field:?}:\n{counters}"
            );
        }
        let settings = dump("dm_settings")?;
        ensure!(
            settings.contains("heartbeat_ns"),
            "`bpftool map dump pinned dm_settings` lacks field names:\n{settings}"
        );
        Ok(())
    });
}
