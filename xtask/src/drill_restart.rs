//! `cargo xtask drill restart`: the restart drill of `datamesh_tests::restartdrill` with the
//! release agent and a release `dmprobe`, `--seconds` of load after each fault (SIGKILL of the
//! worker, SIGSTOP of the worker, SIGKILL of the whole agent, which is then started again).
//! Prints one table row per fault and the details (the fail-open window, error samples).
//!
//! It is a drill, not a test: it asserts nothing (tests/tests/restartdrill.rs does) and fails
//! only when the drill itself cannot run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use datamesh_tests::restartdrill::{self, RestartOptions};
use datamesh_tests::Env;

use crate::util::project_root;

/// Builds the release `dmprobe` (the drill's short-lived-connection loop).
fn build_probe() -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root()).args([
        "build",
        "--release",
        "-p",
        "datamesh-tests",
        "--bin",
        "dmprobe",
    ]);
    let st = cmd.status().context("cannot start cargo build")?;
    if !st.success() {
        bail!("building dmprobe failed ({st})");
    }
    Ok(datamesh_tests::target_dir().join("release").join("dmprobe"))
}

pub fn run(a: &crate::drill::Args) -> Result<()> {
    let bin = match &a.agent_bin {
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    let probe = build_probe()?;
    let mut opts = RestartOptions::new(probe);
    opts.settle = Duration::from_secs(a.seconds);
    opts.warmup = Duration::from_secs(a.seconds.min(3));
    opts.pace_ms = a.pace_ms;
    let mut env = restartdrill::env_builder(Env::builder().agent_bin(bin)).build()?;
    eprintln!(
        "drill restart: worker SIGKILL, worker SIGSTOP, whole-agent SIGKILL (dead {:?}, then \
         started again), {} s of load after each",
        opts.dead_for, a.seconds
    );
    let r = restartdrill::run(&mut env, &opts)?;
    println!(
        "restart drill ({} s after each fault, pace {} ms, {} redis-py clients per load):\n{}",
        a.seconds,
        a.pace_ms,
        opts.clients,
        restartdrill::table(&r)
    );
    println!("{}", restartdrill::details(&r));
    Ok(())
}
