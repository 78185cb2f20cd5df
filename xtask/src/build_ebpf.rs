//! `cargo xtask build-ebpf`: builds the eBPF object (with BTF) and puts it where the agent's
//! build looks for it, `<root>/target/ebpf/datamesh.bpf.o`.
//!
//! The crate `datamesh-ebpf/` is built for `bpfel-unknown-none` with Debian's rustc 1.96
//! (`/usr/bin/rustc`, which ships a prebuilt `core` for that target) and bpf-linker, in its own
//! target directory so the host build's fingerprints are never disturbed.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{setup, util::project_root};

const TARGET: &str = "bpfel-unknown-none";
/// Debian's rustc-web; rustup's proxies come first on PATH, so it is named explicitly.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// The binary target of `datamesh-ebpf/Cargo.toml`.
const BIN_NAME: &str = "datamesh";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Build with the release profile (the only one the verifier is expected to accept).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub release: bool,
    /// Where to write the object.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Cargo features of datamesh-ebpf (e.g. `abi-next`, the upgrade drill's second build).
    #[arg(long, value_delimiter = ',')]
    pub features: Vec<String>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            release: true,
            out: None,
            features: Vec::new(),
        }
    }
}

/// The object's default location (the contract with the agent's build.rs).
pub fn default_object_path() -> PathBuf {
    project_root().join("target/ebpf/datamesh.bpf.o")
}

pub fn run(args: &Args) -> Result<()> {
    let out = build(args)?;
    println!("{}", out.display());
    Ok(())
}

/// Builds the object and returns where it was written; for the other xtask commands.
pub fn build(args: &Args) -> Result<PathBuf> {
    setup::ensure_ebpf_toolchain()?;

    let root = project_root();
    let crate_dir = root.join("datamesh-ebpf");
    let target_dir = root.join("target/ebpf-build");
    let profile = if args.release { "release" } else { "debug" };

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&crate_dir)
        .args(["build", "--target", TARGET])
        .env("RUSTC", DEBIAN_RUSTC)
        // The stable 1.96 compiler accepts the feature gates aya-ebpf uses only with this.
        .env("RUSTC_BOOTSTRAP", "1")
        // Debug info plus --btf is what gives the maps BTF (bpftool prints field names).
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env("PATH", path_with_first(&setup::tools_bin_dir())?)
        .env("CARGO_TARGET_DIR", &target_dir);
    if args.release {
        cmd.arg("--release");
    }
    if !args.features.is_empty() {
        cmd.arg("--features").arg(args.features.join(","));
    }
    // Settings an outer cargo or the user's shell may carry that would override the above or
    // feed host-only flags to the BPF build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running cargo build in {}", crate_dir.display()))?;
    if !status.success() {
        bail!("building the eBPF object failed ({status}); see the compiler output above");
    }

    let built = target_dir.join(TARGET).join(profile).join(BIN_NAME);
    let out = args.out.clone().unwrap_or_else(default_object_path);
    copy_object(&built, &out)?;
    Ok(out)
}

/// PATH with `dir` first, so cargo's linker lookup finds our bpf-linker.
fn path_with_first(dir: &Path) -> Result<OsString> {
    let rest = env::var_os("PATH").unwrap_or_default();
    env::join_paths(std::iter::once(dir.to_path_buf()).chain(env::split_paths(&rest)))
        .context("building PATH for the eBPF build")
}

/// Copies through a temporary file and a rename, so a reader (the agent's build.rs, a test)
/// never sees a half-written object.
fn copy_object(from: &Path, to: &Path) -> Result<()> {
    // An identical object is left alone: its mtime is what the agent's build script watches,
    // and a rewrite would rebuild the agent for nothing.
    if let (Ok(a), Ok(b)) = (fs::read(from), fs::read(to)) {
        if a == b {
            return Ok(());
        }
    }
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(())
}
