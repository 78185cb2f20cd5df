//! Tests of the harness itself: preflight, complete teardown, reaping a dead run's leftovers,
//! and the correctness battery against plain Redis (which proves the probe's checks are right,
//! so a battery failure through the proxy is the proxy's).

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::instance::Instance;
use datamesh_tests::{pid_alive, require_privileges, Env, BPFFS, CGROUP2_ROOT, NETNS_DIR, RUN_DIR};

use crate::common::{is_pod_addr, redis_cli_client_addr};

#[test]
fn preflight_privileges_are_present() {
    // Fails (never skips) with the reason when this machine cannot run the privileged tests.
    require_privileges();
}

#[test]
fn env_teardown_leaves_nothing_behind() {
    require_privileges();
    let env = Env::builder()
        .pods(["a", "b"])
        .build()
        .expect("building the env");
    let names = env.resource_names();
    for p in &names {
        assert!(
            p.exists(),
            "{} should exist while the env lives",
            p.display()
        );
    }
    let agent_pid = env.agent().pid().expect("agent running");
    let redis_pid = env.redis().pid();
    drop(env);
    for p in &names {
        assert!(!p.exists(), "{} is left behind after teardown", p.display());
    }
    assert!(
        !pid_alive(agent_pid),
        "agent pid {agent_pid} is still alive after teardown"
    );
    assert!(
        !pid_alive(redis_pid),
        "redis-server pid {redis_pid} is still alive after teardown"
    );
}

#[test]
fn stale_leftovers_of_a_dead_run_are_reaped() {
    require_privileges();
    let res = (|| -> Result<()> {
        // A pid that certainly belonged to a process that has exited.
        let mut child = Command::new("true").spawn().context("spawning true")?;
        child.wait()?;
        let dead = child.id();
        ensure!(!pid_alive(dead), "pid {dead} was reused immediately; rerun");
        // Take an instance number, then hand it to the dead pid as if that run had been killed.
        let inst = Instance::allocate()?;
        let n = inst.n();
        // Other tests reap concurrently: build the whole dead run under the harness lock.
        let lock_guarded = datamesh_tests::instance::with_lock(|| -> Result<_> {
            std::fs::write(
                Path::new(RUN_DIR).join(format!("inst-{n}")),
                format!("{dead}\n"),
            )?;
            // The reaper removes the owner file; our guard must not remove a later owner's file.
            std::mem::forget(inst);
            let id = format!("datamesh-test-{dead}-{n}");
            let cg = Path::new(CGROUP2_ROOT).join(&id);
            std::fs::create_dir(&cg)?;
            std::fs::create_dir(cg.join("pod-x"))?;
            let outside = Path::new(CGROUP2_ROOT).join(format!("{id}-outside"));
            std::fs::create_dir(&outside)?;
            let pin = Path::new(BPFFS).join(&id);
            std::fs::create_dir(&pin)?;
            let run = Path::new(RUN_DIR).join(&id);
            std::fs::create_dir_all(&run)?;
            let ns = format!("dmt{n}-stale");
            datamesh_tests::proc::run_checked(Command::new("ip").args(["netns", "add", &ns]))?;
            datamesh_tests::proc::run_checked(Command::new("ip").args([
                "link",
                "add",
                &format!("dmtbr{n}"),
                "type",
                "bridge",
            ]))?;
            // A process still running in the dead run's cgroup (like an orphaned redis-server).
            let mut sleeper = Command::new("sleep");
            sleeper.arg("300");
            datamesh_tests::pod::enter_cgroup_with_nofile(&mut sleeper, &cg.join("pod-x"), 1024);
            let sleeper = sleeper.spawn()?;
            Ok((sleeper, cg, outside, pin, run, ns))
        });
        let (mut sleeper, cg, outside, pin, run, ns) = lock_guarded?;

        // Any reaper may get there first (another test's env build); either way it must be gone.
        let removed = datamesh_tests::reap_stale()?;
        let status = sleeper.wait()?;
        ensure!(
            !status.success(),
            "the orphan in the dead run's cgroup was not killed"
        );
        for p in [
            cg,
            outside,
            pin,
            run,
            Path::new(NETNS_DIR).join(&ns),
            Path::new(RUN_DIR).join(format!("inst-{n}")),
        ] {
            ensure!(
                !p.exists(),
                "{} survived reap_stale (removed: {removed:?})",
                p.display()
            );
        }
        ensure!(
            !datamesh_tests::net::link_exists(&format!("dmtbr{n}")),
            "bridge dmtbr{n} survived reap_stale (removed: {removed:?})"
        );
        Ok(())
    })();
    if let Err(e) = res {
        // Whatever this test made must not outlive it: reap again before failing.
        let _ = datamesh_tests::reap_stale();
        panic!("{e:#}");
    }
}

#[test]
fn without_agent_pods_reach_redis_directly() {
    // Baseline of the network layout: with no agent, a pod reaches the service address itself
    // and Redis sees the pod's own address.
    run_test(Env::builder().pods(["a"]).agent(false), |env| {
        let pod = env.pod("a");
        let seen = redis_cli_client_addr(pod.cmd("redis-cli"), env.service_addr(), "dmbase")?;
        ensure!(
            is_pod_addr(pod, seen),
            "Redis saw {seen}, expected the pod's address {}",
            pod.ip()
        );
        Ok(())
    });
}

#[test]
fn battery_against_plain_redis() {
    run_test(Env::builder().pods(["a"]).agent(false), |env| {
        crate::battery::battery(env, "a")
    });
}
