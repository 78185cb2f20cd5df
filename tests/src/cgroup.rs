//! cgroup2 directories of a test instance: the attached cgroup `datamesh-test-<pid>-<N>/` with
//! `agent/` and `pod-<name>/` children, and the sibling `datamesh-test-<pid>-<N>-outside/`.
//!
//! Removal kills every process left in the tree (`cgroup.kill`), waits until the kernel reports
//! it unpopulated, then removes the directories bottom-up. Only paths under the cgroup2 mount
//! whose name starts with `datamesh-test-` are ever removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{wait_until, CGROUP2_ROOT};

/// A cgroup directory removed (with its children and processes) on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `path` (a fresh directory: it must not exist yet).
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        guard_path(&path)?;
        std::fs::create_dir(&path).with_context(|| {
            format!(
                "creating cgroup {} (is cgroup2 mounted at {CGROUP2_ROOT}?)",
                path.display()
            )
        })?;
        Ok(Self { path })
    }

    /// Creates a child cgroup directory; it is removed with its parent.
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir(&p).with_context(|| format!("creating cgroup {}", p.display()))?;
        Ok(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_tree(&self.path);
        if let Err(e) = remove_tree(&self.path) {
            eprintln!("datamesh-tests: {e:#}");
        }
    }
}

/// Refuses to operate on anything but a harness cgroup.
fn guard_path(path: &Path) -> Result<()> {
    let under_root = path.parent() == Some(Path::new(CGROUP2_ROOT));
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("datamesh-test-"));
    if !under_root || !named {
        bail!(
            "refusing to manage cgroup {}: not a harness cgroup",
            path.display()
        );
    }
    Ok(())
}

/// Kills every process in the cgroup tree and waits (bounded) until it is unpopulated.
pub fn kill_tree(path: &Path) {
    if guard_path(path).is_err() || !path.exists() {
        return;
    }
    if let Err(e) = std::fs::write(path.join("cgroup.kill"), "1") {
        eprintln!(
            "datamesh-tests: cannot write {}/cgroup.kill: {e}",
            path.display()
        );
        return;
    }
    let res = wait_until(
        "cgroup to become unpopulated",
        Duration::from_secs(10),
        || {
            let events = std::fs::read_to_string(path.join("cgroup.events"))?;
            Ok(events
                .lines()
                .any(|l| l.trim() == "populated 0")
                .then_some(()))
        },
    );
    if let Err(e) = res {
        eprintln!("datamesh-tests: {}: {e:#}", path.display());
    }
}

/// Removes the cgroup tree bottom-up (the tree must be unpopulated: see [`kill_tree`]).
pub fn remove_tree(path: &Path) -> Result<()> {
    guard_path(path)?;
    if !path.exists() {
        return Ok(());
    }
    rmdir_recursive(path)
}

fn rmdir_recursive(path: &Path) -> Result<()> {
    for entry in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            rmdir_recursive(&entry.path())?;
        }
    }
    // A just-emptied cgroup can briefly report EBUSY while its last task exits.
    wait_until(
        &format!("rmdir {}", path.display()),
        Duration::from_secs(5),
        || match std::fs::remove_dir(path) {
            Ok(()) => Ok(Some(())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(())),
            Err(e) => Err(anyhow::Error::from(e)),
        },
    )
}
