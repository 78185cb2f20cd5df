//! `cargo xtask fuzz`: runs the libFuzzer targets of `fuzz/` (the RESP client command decoder,
//! the backend reply decoder, and the session in process on a real redis-server) for a
//! bounded time each, with cargo-fuzz on the stable toolchain
//! (`--sanitizer none`: the sanitizers need nightly; the targets check their properties with
//! assertions, and safe Rust needs no AddressSanitizer). `cargo xtask test` runs them too.
//!
//! Seeds come from the checked-in corpus `fuzz/corpus/<target>/` (read only; the session
//! target uses `commands/`); what libFuzzer
//! learns goes to `target/fuzz-corpus/<target>/` and is reused by the next run. A failing
//! input is saved under `fuzz/artifacts/<target>/`, and the command to reproduce it is printed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::project_root;

/// The libFuzzer targets (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["commands", "replies", "session"];

/// The checked-in seeds of a target: `fuzz/corpus/<name>/` (the session target reads client
/// input, so it starts from the command decoder's seeds).
fn seed_corpus(target: &str) -> &str {
    match target {
        "session" => "commands",
        t => t,
    }
}

/// Seconds each target runs by default in `cargo xtask test`.
pub const DEFAULT_SECS: u64 = 25;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = DEFAULT_SECS)]
    pub secs: u64,
    /// Only these targets (default: all).
    pub targets: Vec<String>,
}

/// Builds the targets and runs each for `secs` seconds; fails on the first failing input.
pub fn run_targets(targets: &[&str], secs: u64) -> Result<()> {
    let cargo_fuzz = crate::setup::ensure_cargo_fuzz()?;
    let root = project_root();
    let fuzz_dir = root.join("fuzz");
    eprintln!("xtask fuzz: building the fuzz targets (cargo fuzz build --sanitizer none -O)");
    let st = cargo_fuzz_cmd(&cargo_fuzz, &fuzz_dir)
        .args(["build", "--sanitizer", "none", "-O"])
        .status()
        .context("running cargo fuzz build")?;
    if !st.success() {
        bail!("building the fuzz targets failed ({st})");
    }
    for target in targets {
        run_one(&cargo_fuzz, &fuzz_dir, target, secs)?;
    }
    Ok(())
}

fn cargo_fuzz_cmd(cargo_fuzz: &Path, fuzz_dir: &Path) -> Command {
    let mut c = Command::new(cargo_fuzz);
    c.arg("fuzz").current_dir(fuzz_dir).stdin(Stdio::null());
    // The fuzz crate has its own target dir and flags; nothing of an outer cargo's applies.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        c.env_remove(var);
    }
    c
}

fn run_one(cargo_fuzz: &Path, fuzz_dir: &Path, target: &str, secs: u64) -> Result<()> {
    let seeds = fuzz_dir.join("corpus").join(seed_corpus(target));
    let work = datamesh_tests::target_dir()
        .join("fuzz-corpus")
        .join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    eprintln!(
        "xtask fuzz: {target} for {secs} s (seeds {})",
        seeds.display()
    );
    let started = Instant::now();
    let out = cargo_fuzz_cmd(cargo_fuzz, fuzz_dir)
        .args(["run", "--sanitizer", "none", "-O", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .args([
            format!("-max_total_time={secs}"),
            "-max_len=4096".into(),
            "-timeout=10".into(),
            "-rss_limit_mb=4096".into(),
            "-print_final_stats=1".into(),
        ])
        .output()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // What failed (the panic message), then libFuzzer's summary with the input's path.
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.trim_start().starts_with("at ") && !is_frame(l))
            .collect();
        let mut report: Vec<&str> = Vec::new();
        if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
            report.extend(lines.iter().skip(i).take(6));
            report.push("...");
        }
        report.extend(lines.iter().skip(lines.len().saturating_sub(30)));
        bail!(
            "fuzz target {target} failed ({}):\n{}\n\
             The failing input is saved under fuzz/artifacts/{target}/ (its path is above); \
             reproduce it with `cd fuzz && cargo fuzz run --sanitizer none -O {target} <path>`, \
             and once fixed copy it into fuzz/corpus/{}/ and add a test \
             (datamesh-proxy/src/resp/fuzz_regressions.rs or tests/tests/fuzz.rs).",
            out.status,
            report.join("\n"),
            seed_corpus(target)
        );
    }
    // One line: how many inputs ran, how many the corpus holds.
    let runs = log
        .lines()
        .find_map(|l| l.strip_prefix("Done "))
        .unwrap_or("? runs")
        .to_string();
    let corpus = std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0);
    eprintln!(
        "xtask fuzz: {target}: no failure; {runs} ({:.0} s), {corpus} inputs in {}",
        started.elapsed().as_secs_f64(),
        work.display()
    );
    Ok(())
}

/// A backtrace frame line (`  12: name`).
fn is_frame(l: &str) -> bool {
    l.trim_start()
        .split_once(": ")
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "unknown fuzz target {t:?} (targets: {})",
                    TARGETS.join(", ")
                );
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    run_targets(&targets, args.secs)
}
