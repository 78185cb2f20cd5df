//! `cargo xtask drill gray-release`: the gray-release drill of `datamesh_tests::graydrill` with
//! the release agent on both simulated nodes, `--seconds` per phase: stable and canary configs
//! side by side, the alerts watched, the canary widened and the stable node promoted by
//! reload, the canary rolled back. Prints the table per phase and node, the alerts and the
//! per-pod detail.
//!
//! It is a drill, not a test: it prints what the runbook's checks would find and fails only
//! when the drill itself cannot run, or when one of those checks fails (client errors, a
//! pod on the wrong path, an alert, a restart), so an operator rehearsing it sees a non-zero
//! exit.

use anyhow::{bail, ensure, Result};
use datamesh_tests::graydrill::{self, GrayOptions};
use datamesh_tests::Env;

use crate::drill::Args;

pub fn run(a: &Args) -> Result<()> {
    ensure!(
        a.seconds >= 2,
        "--seconds must be at least 2 for this drill"
    );
    let bin = match &a.agent_bin {
        // A release agent: a debug build's reload and proxy would add their own time.
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    let opts = GrayOptions {
        seconds: a.seconds as f64,
        agent_bin: Some(bin.clone()),
        ..GrayOptions::default()
    };
    let env = graydrill::env_builder(Env::builder().agent_bin(bin)).build()?;
    let r = graydrill::run(&env, &opts)?;
    println!(
        "gray-release drill ({} s per phase, a new connection per pod every {} ms, agent {}):\n{}",
        a.seconds,
        opts.interval * 1000.0,
        opts.agent_bin
            .as_ref()
            .map(|b| b.display().to_string())
            .unwrap_or_default(),
        graydrill::table(&r)
    );
    println!("{}", graydrill::alerts_table(&r));
    println!("{}", graydrill::pod_table(&r));
    let problems = graydrill::problems(&r);
    if !problems.is_empty() {
        bail!(
            "the gray-release drill found {} problems:\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    println!("gray-release drill: no client error, every pod on its selection's path, no alert, no restart");
    Ok(())
}
