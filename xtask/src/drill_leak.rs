//! `cargo xtask drill resource-leak`: the resource-leak drill of `datamesh_tests::leakdrill`
//! with the release agent: each leak (descriptors, memory, dedicated backend connections)
//! induced under load, detected by the worker's watchdog and recovered by a graceful worker
//! replacement; `--seconds` of load after each old worker exited. One table.

use std::time::Duration;

use anyhow::Result;
use datamesh_tests::leakdrill::{self, LeakOptions};
use datamesh_tests::Env;

pub fn run(a: &crate::drill::Args) -> Result<()> {
    let bin = match &a.agent_bin {
        // A release agent: the figures (start of a successor, RSS) are the release build's.
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    let opts = LeakOptions {
        sustain_s: 2,
        settle: Duration::from_secs(a.seconds),
        pace_ms: a.pace_ms,
        clients: 8,
        timeout: Duration::from_secs(30),
        ..LeakOptions::default()
    };
    let env = leakdrill::env_builder(Env::builder().agent_bin(bin), &opts).build()?;
    let rows = leakdrill::run(&env, &opts)?;
    println!(
        "resource-leak drill (release agent, watchdog.sustain_s {}, drain_timeout_ms {}, {} pooled redis-py clients + a connect loop, {} s of load after each replacement; times in s from the leak):\n{}",
        opts.sustain_s,
        leakdrill::DRAIN_TIMEOUT_MS,
        opts.clients,
        a.seconds,
        leakdrill::table(&rows)
    );
    Ok(())
}
