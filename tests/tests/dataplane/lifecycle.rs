//! Agent lifecycle: a SIGKILLed agent fails open within the heartbeat bound (pods reach Redis
//! directly; since ABI 4 at once, see `supervisor.rs`) while `pods` still reads the pinned
//! counters; a restarted agent re-adopts the pinned links and maps (same link ids, counters
//! carried over) and capture resumes; maps of the previous layout (no `dm_listeners`) are
//! replaced by an upgrade (new links, capture works).

use std::time::Instant;

use anyhow::{ensure, Context};
use datamesh_tests::env::run_test;
use datamesh_tests::Env;
use serde_json::Value;

use crate::common::{
    assert_capture_works, counter, counters, is_pod_addr, probe_in_pod, redis_cli_client_addr,
};

/// failopen_after_ms of these envs.
const FAILOPEN_MS: u64 = 1000;
/// What fail-open may take on top of the bound: one heartbeat interval (100 ms), spawning the
/// probe, and scheduling on a busy 2-core machine.
const MARGIN_MS: u64 = 400;

#[test]
fn sigkilled_agent_fails_open_within_bound_then_restart_readopts() {
    run_test(
        Env::builder().pods(["a"]).failopen_after_ms(FAILOPEN_MS),
        |env| {
            let svc = env.service_addr();
            assert_capture_works(env, env.pod("a"), "dmbefore")?;
            let before = counters(env, env.pod("a"))?;

            let t_kill = Instant::now();
            env.agent_mut().kill9()?;
            let pod = env.pod("a");
            let spawn_after = t_kill.elapsed();
            let summary = probe_in_pod(
                pod,
                svc,
                &["connect-loop", "--until-ok", "--timeout-ms", "5000"],
            )?;
            let total = t_kill.elapsed();
            let first_ok_ms = summary["first_ok_ms"].as_u64().context("first_ok_ms")?;
            let from_kill = spawn_after.as_millis() as u64 + first_ok_ms;
            eprintln!("fail-open: first success {from_kill} ms after SIGKILL (probe: {summary}; wall {total:?})");
            ensure!(
            from_kill <= FAILOPEN_MS + MARGIN_MS,
            "first successful connect came {from_kill} ms after SIGKILL; bound is {FAILOPEN_MS} ms + {MARGIN_MS} ms margin ({summary})"
        );

            // Those connects went straight to Redis: it sees the pod's own address.
            let seen = redis_cli_client_addr(pod.cmd("redis-cli"), svc, "dmfailopen")?;
            ensure!(
                is_pod_addr(pod, seen),
                "after fail-open Redis saw {seen}, not the pod {}",
                pod.ip()
            );

            // `pods` reads the pinned counters with the agent dead.
            let dead = counters(env, pod)?;
            ensure!(
                counter(&dead, "connects_captured") >= counter(&before, "connects_captured"),
                "counters went backwards with the agent dead: before {before:?}, now {dead:?}"
            );
            ensure!(
                counter(&dead, "connects_failopen") >= 2,
                "connects_failopen did not count the direct connects: {dead:?}"
            );

            // A new agent re-adopts the pinned data plane and capture resumes.
            let ids = env.agent().link_ids()?;
            env.agent_mut().spawn()?;
            let ready = env.agent().ready()?.clone();
            ensure!(
                ready.dataplane == "adopted",
                "restarted agent reports dataplane {:?}, expected \"adopted\"",
                ready.dataplane
            );
            ensure!(
                env.agent().link_ids()? == ids,
                "link ids changed across the restart: the links were re-attached"
            );
            assert_capture_works(env, env.pod("a"), "dmafter")?;
            Ok(())
        },
    );
}

#[test]
fn restarted_agent_readopts_pinned_links_and_maps() {
    run_test(Env::builder().pods(["a"]), |env| {
        {
            let ready = env.agent().ready()?;
            ensure!(
                ready.dataplane == "attached",
                "first start reports dataplane {:?}, expected \"attached\"",
                ready.dataplane
            );
        }
        assert_capture_works(env, env.pod("a"), "dmfirst")?;
        let ids_before = env.agent().link_ids()?;
        let before = counters(env, env.pod("a"))?;

        let status = env.agent_mut().restart()?;
        ensure!(
            status.success(),
            "agent exited with {status} on SIGTERM; expected 0"
        );
        let ready = env.agent().ready()?.clone();
        ensure!(
            ready.dataplane == "adopted",
            "restarted agent reports dataplane {:?}, expected \"adopted\" ({})",
            ready.dataplane,
            ready.raw
        );

        let ids_after = env.agent().link_ids()?;
        ensure!(
            ids_after == ids_before,
            "pinned link ids changed across restart: {ids_before:?} -> {ids_after:?}"
        );

        assert_capture_works(env, env.pod("a"), "dmsecond")?;
        let after = counters(env, env.pod("a"))?;
        ensure!(
            counter(&after, "connects_captured") > counter(&before, "connects_captured"),
            "counters restarted from zero or did not move: the maps were not re-adopted ({before:?} -> {after:?})"
        );
        let (status, body) = env.agent().http_get("/ready")?;
        ensure!(
            status == 200,
            "/ready answered {status} {body:?} after the restart"
        );
        let cfg = env.agent().http_get("/config_dump")?;
        let v: Value = serde_json::from_str(&cfg.1).context("/config_dump is not JSON")?;
        ensure!(v.is_object(), "/config_dump is not a JSON object: {v}");
        Ok(())
    });
}

#[test]
fn maps_of_the_previous_layout_are_replaced_on_upgrade() {
    run_test(Env::builder().pods(["a"]), |env| {
        assert_capture_works(env, env.pod("a"), "dmfirst")?;
        let ids_before = env.agent().link_ids()?;
        // An ABI 3 data plane: every map but dm_listeners pinned, links attached.
        env.agent_mut().kill9()?;
        std::fs::remove_file(env.pin_dir().join("dm_listeners"))
            .context("unpinning dm_listeners")?;
        env.agent_mut().spawn()?;
        let ready = env.agent().ready()?.clone();
        ensure!(
            ready.dataplane == "upgraded",
            "agent over maps without dm_listeners reports dataplane {:?}, expected \"upgraded\"",
            ready.dataplane
        );
        ensure!(
            env.agent().link_ids()? != ids_before,
            "the links were not replaced"
        );
        ensure!(
            env.pin_dir().join("dm_listeners").exists(),
            "dm_listeners was not pinned by the upgrade"
        );
        assert_capture_works(env, env.pod("a"), "dmsecond")?;
        Ok(())
    });
}
