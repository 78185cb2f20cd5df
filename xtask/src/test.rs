//! `cargo xtask test`: the one test command (README, `.ci/run`).
//!
//! Prepares the machine (`setup::ensure`), builds the eBPF object and every binary (the agent
//! and the harness's probe), then runs `cargo test --workspace` with its output streamed, so the
//! `test result:` summary lines reach the terminal and CI. The privileged data-plane tests run
//! for real here; they never skip. The client compatibility test (`tests/tests/compat.rs`, every
//! program of `tests/clients/` per topology against `docs/compatibility.md`) is one of them. Then the RESP codec's libFuzzer targets run for a bounded
//! time each ([`crate::fuzz`]; `--fuzz-secs`). Exits non-zero when any test or target fails.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::project_root;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Test threads (each privileged test builds its own instance; 2 fits the 2-core machines).
    #[arg(long, default_value_t = 2)]
    pub test_threads: u32,
    /// Seconds of fuzzing: each libFuzzer target of `fuzz/` (default 25), and the
    /// session-level fuzz test (`DATAMESH_FUZZ_SECS`, default 20). 0 skips the libFuzzer
    /// targets.
    #[arg(long)]
    pub fuzz_secs: Option<u64>,
    /// Extra arguments for the test binaries (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            test_threads: 2,
            fuzz_secs: None,
            test_args: Vec::new(),
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(project_root());
    c
}

fn run_step(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask test: {what}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot start cargo for {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    crate::setup::ensure()?;
    crate::build_ebpf::run(&crate::build_ebpf::Args::default())?;
    // The data-plane tests run target/debug/datamesh-agent and the probe binary.
    run_step(
        "building every binary",
        cargo().args(["build", "--workspace", "--bins"]),
    )?;

    // The upgrade drill's second build (another map layout), for tests/tests/upgradedrill.rs.
    let next = crate::demo::build_next_agent(false)?;
    let agent = datamesh_tests::target_dir()
        .join("debug")
        .join("datamesh-agent");
    let mut test = cargo();
    test.args([
        "test",
        "--workspace",
        "--",
        &format!("--test-threads={}", args.test_threads),
    ])
    .args(&args.test_args)
    .env("DATAMESH_AGENT_BIN", &agent)
    .env("DATAMESH_AGENT_NEXT_BIN", &next);
    if let Some(secs) = args.fuzz_secs {
        test.env("DATAMESH_FUZZ_SECS", secs.to_string());
    }
    eprintln!(
        "xtask test: cargo test --workspace -- --test-threads={} {}",
        args.test_threads,
        args.test_args.join(" ")
    );
    let st = test.status().context("cannot start cargo test")?;

    // A test binary that was killed cannot run its Drop guards; clean its leftovers now, so a
    // failed run leaves nothing behind either.
    match datamesh_tests::reap_stale() {
        Ok(removed) if !removed.is_empty() => {
            eprintln!(
                "xtask test: removed leftovers of a killed test run: {}",
                removed.join(", ")
            )
        }
        Ok(_) => {}
        Err(e) => eprintln!("xtask test: reaping leftovers failed: {e:#}"),
    }
    if !st.success() {
        bail!("cargo test failed ({st})");
    }
    // The codec's libFuzzer targets, for a bounded time each (after the tests, so a test
    // failure is reported first).
    let fuzz_secs = args.fuzz_secs.unwrap_or(crate::fuzz::DEFAULT_SECS);
    if fuzz_secs > 0 {
        crate::fuzz::run_targets(crate::fuzz::TARGETS, fuzz_secs)?;
    }
    Ok(())
}
