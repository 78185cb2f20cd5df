//! Helpers shared by the xtask subcommands.

use std::path::PathBuf;

/// The workspace root (the parent of `xtask/`).
pub fn project_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

/// The median of `v` (the upper one for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// A prebuilt agent given with `--agent-bin`: the machine is prepared, privileges are there,
/// and the path is an executable file (made absolute).
pub fn prebuilt_agent(bin: &std::path::Path) -> anyhow::Result<PathBuf> {
    use anyhow::{ensure, Context};
    use std::os::unix::fs::PermissionsExt;
    crate::setup::ensure()?;
    datamesh_tests::check_privileges().context("this needs root with CAP_BPF and cgroup2")?;
    let meta = std::fs::metadata(bin)
        .with_context(|| format!("--agent-bin {}: cannot stat it", bin.display()))?;
    ensure!(
        meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        "--agent-bin {} is not an executable file",
        bin.display()
    );
    std::path::absolute(bin)
        .with_context(|| format!("--agent-bin {}: no absolute path", bin.display()))
}
