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

/// A memory-limited cgroup for the agent (the DaemonSet's `resources.limits.memory`): cgroup
/// v2 `memory.max` under the instance's attached cgroup when the host delegates the memory
/// controller there, else cgroup v1 `memory.limit_in_bytes` under `/sys/fs/cgroup/memory`
/// (hybrid hosts, like this machine). The agent joins it before exec, so it reads the limit at
/// start; removed on drop (after its processes are killed).
#[derive(Debug)]
pub struct MemoryCgroup {
    path: PathBuf,
    /// The file whose value is the limit, and the one tasks join through.
    procs: PathBuf,
}

/// Where cgroup v1's memory controller is mounted on hybrid hosts.
pub const MEMORY_V1_ROOT: &str = "/sys/fs/cgroup/memory";

impl MemoryCgroup {
    /// A memory cgroup named `name` (it must start with `datamesh-test-`) limited to `bytes`.
    pub fn create(name: &str, attached: &Path, bytes: u64) -> Result<Self> {
        if !name.starts_with("datamesh-test-") {
            bail!("refusing to create memory cgroup {name}: not a harness name");
        }
        let v2 = std::fs::read_to_string(Path::new(CGROUP2_ROOT).join("cgroup.subtree_control"))
            .is_ok_and(|s| s.split_whitespace().any(|c| c == "memory"));
        let (path, limit_file) = if v2 {
            std::fs::write(attached.join("cgroup.subtree_control"), "+memory").with_context(
                || format!("enabling the memory controller in {}", attached.display()),
            )?;
            (attached.join(name), "memory.max")
        } else if Path::new(MEMORY_V1_ROOT)
            .join("memory.limit_in_bytes")
            .exists()
        {
            (
                Path::new(MEMORY_V1_ROOT).join(name),
                "memory.limit_in_bytes",
            )
        } else {
            bail!(
                "no memory controller: neither {CGROUP2_ROOT}/cgroup.subtree_control lists memory nor is cgroup v1 memory mounted at {MEMORY_V1_ROOT}"
            );
        };
        std::fs::create_dir(&path)
            .with_context(|| format!("creating memory cgroup {}", path.display()))?;
        let cg = Self {
            procs: path.join("cgroup.procs"),
            path,
        };
        std::fs::write(cg.path.join(limit_file), bytes.to_string())
            .with_context(|| format!("setting {limit_file} of {}", cg.path.display()))?;
        Ok(cg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file a process writes "0" to in order to join.
    pub fn procs(&self) -> &Path {
        &self.procs
    }

    /// Times the kernel OOM-killed something in it (v2 `memory.events` oom_kill, v1
    /// `memory.oom_control` oom_kill).
    pub fn oom_kills(&self) -> u64 {
        for (file, key) in [
            ("memory.events", "oom_kill"),
            ("memory.oom_control", "oom_kill"),
        ] {
            if let Ok(s) = std::fs::read_to_string(self.path.join(file)) {
                if let Some(v) = s
                    .lines()
                    .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse().unwrap_or(0)))
                {
                    return v;
                }
            }
        }
        0
    }

    /// Peak memory use in bytes (v2 `memory.peak`, v1 `memory.max_usage_in_bytes`).
    pub fn peak_bytes(&self) -> u64 {
        ["memory.peak", "memory.max_usage_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(self.path.join(f)).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The agent was stopped before; kill anything left, then remove the directory.
        if let Ok(pids) = std::fs::read_to_string(&self.procs) {
            for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) with a pid read from our own test cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let res = wait_until(
            &format!("rmdir {}", self.path.display()),
            Duration::from_secs(10),
            || match std::fs::remove_dir(&self.path) {
                Ok(()) => Ok(Some(())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(())),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(None),
                Err(e) => Err(anyhow::Error::from(e)),
            },
        );
        if let Err(e) = res {
            eprintln!("datamesh-tests: {e:#}");
        }
    }
}
