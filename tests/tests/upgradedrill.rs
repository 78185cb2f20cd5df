//! The upgrade drill as a test (`datamesh_tests::upgradedrill`, the debug agents): a restart, an
//! upgrade to the `abi-next` build (a map layout change) and a rollback, under client load.
//! `cargo xtask drill upgrade` runs the same with release agents and longer loads.
//!
//! The second build comes from `cargo xtask test` (`DATAMESH_AGENT_NEXT_BIN`); run alone, build
//! it with `cargo xtask build-next` first. Without it the test fails: it never skips.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use datamesh_tests::agent::agent_bin;
use datamesh_tests::env::run_test;
use datamesh_tests::upgradedrill::{self, UpgradeOptions};

fn next_bin() -> Result<PathBuf> {
    let p = std::env::var_os("DATAMESH_AGENT_NEXT_BIN").map(PathBuf::from).ok_or_else(|| {
        anyhow!("DATAMESH_AGENT_NEXT_BIN is not set: run `cargo xtask test`, or `cargo xtask build-next` and set it to the path it prints")
    })?;
    if !p.is_file() {
        return Err(anyhow!(
            "DATAMESH_AGENT_NEXT_BIN={} is not a file",
            p.display()
        ));
    }
    Ok(p)
}

#[test]
fn upgrade_and_rollback_under_load() {
    let first = agent_bin().expect("the agent binary");
    let next = next_bin().expect("the abi-next agent binary");
    run_test(upgradedrill::env_builder(&first), |env| {
        let o = UpgradeOptions {
            first: first.clone(),
            next: next.clone(),
            between: 1.5,
        };
        let r = upgradedrill::run(env, &o)?;
        eprintln!("{}", upgradedrill::table(&r));
        upgradedrill::check(&r)
    });
}
