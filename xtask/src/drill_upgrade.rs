//! `cargo xtask drill upgrade`: the upgrade drill of `datamesh_tests::upgradedrill` with release
//! agents (the first build and its `abi-next` twin) and `--seconds` of load between the steps.

use std::path::Path;

use anyhow::Result;
use datamesh_tests::upgradedrill::{self, UpgradeOptions};

pub fn run(seconds: u64, agent_bin: Option<&Path>) -> Result<()> {
    let first = match agent_bin {
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    // The twin is always built from this tree: it is the same code with another layout.
    let next = crate::demo::build_next_agent(true)?;
    let mut env = upgradedrill::env_builder(&first).build()?;
    let o = UpgradeOptions {
        first,
        next,
        between: seconds as f64,
    };
    let r = upgradedrill::run(&mut env, &o)?;
    println!("{}", upgradedrill::table(&r));
    if let Err(e) = upgradedrill::check(&r) {
        println!("goal missed: {e:#}");
    }
    Ok(())
}
