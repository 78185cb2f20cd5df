//! Instance numbering and ownership, and reaping the leftovers of dead runs.
//!
//! An instance number `N` (1..=250) picks the 198.18.N.0/24 and 198.19.N.1 addresses and the
//! `dmtbr<N>` / `dmt<N>-*` / `dmt<N>h*` network names, which are too short to carry a pid. So
//! ownership of `N` is a file `/run/datamesh-tests/inst-<N>` holding the owner's pid, created
//! (O_EXCL) before any resource of the instance and removed after all of them. Names that do
//! carry the pid (`datamesh-test-<pid>-<N>` cgroups, pin dirs, run dirs) are reaped when that pid
//! is gone. Allocation and reaping hold one `flock` so a reaper never races an allocator.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::{cgroup, net, pid_alive, BPFFS, CGROUP2_ROOT, NETNS_DIR, RUN_DIR};

/// Highest instance number (the third octet of the test networks).
pub const MAX_INSTANCE: u32 = 250;
const PREFIX: &str = "datamesh-test-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An owned instance number; dropping it releases the number (after every other guard).
#[derive(Debug)]
pub struct Instance {
    n: u8,
    pid: u32,
    owner_file: PathBuf,
}

impl Instance {
    /// Reserves a free instance number for this process.
    pub fn allocate() -> Result<Self> {
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        let _lock = Lock::acquire()?;
        let pid = std::process::id();
        // Spread processes apart so concurrent runs rarely probe the same numbers.
        let start = (pid.wrapping_mul(37)).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        for k in 0..MAX_INSTANCE {
            let n = (start.wrapping_add(k) % MAX_INSTANCE) + 1;
            let owner_file = owner_path(n);
            for _attempt in 0..2 {
                match OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&owner_file)
                {
                    Ok(mut f) => {
                        writeln!(f, "{pid}")
                            .with_context(|| format!("writing {}", owner_file.display()))?;
                        let n = u8::try_from(n).context("instance number out of range")?;
                        return Ok(Self { n, pid, owner_file });
                    }
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        match read_owner(&owner_file) {
                            Some(owner) if pid_alive(owner) => break,
                            // The owner died without cleaning up: reap its network and retry.
                            _ => {
                                reap_instance_net(n);
                                let _ = std::fs::remove_file(&owner_file);
                            }
                        }
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("creating {}", owner_file.display()))
                    }
                }
            }
        }
        bail!("all {MAX_INSTANCE} test instance numbers are in use (see {RUN_DIR}/inst-*)")
    }

    /// The instance number `N`.
    pub fn n(&self) -> u8 {
        self.n
    }

    /// `datamesh-test-<pid>-<N>`: the name of the instance's cgroup, pin dir and run dir.
    pub fn id(&self) -> String {
        format!("{PREFIX}{}-{}", self.pid, self.n)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.owner_file);
    }
}

fn owner_path(n: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("inst-{n}"))
}

fn read_owner(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// An exclusive `flock` on `/run/datamesh-tests/lock`, released when the file closes on drop.
struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn acquire() -> Result<Self> {
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        let path = Path::new(RUN_DIR).join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own; blocks until the lock is ours.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("flock on the harness lock");
        }
        Ok(Self(f))
    }
}

/// Runs `f` holding the harness lock, so no reaper or allocator runs meanwhile (the test that
/// fakes a dead run's leftovers uses it). `f` must not call [`reap_stale`] or allocate.
pub fn with_lock<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _lock = Lock::acquire()?;
    f()
}

/// Parses `datamesh-test-<pid>-<N>[suffix]`, returning (pid, N, suffix).
fn parse_id(name: &str) -> Option<(u32, u32, &str)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (n, suffix) = rest.split_at(digits);
    Some((pid.parse().ok()?, n.parse().ok()?, suffix))
}

/// Instance number of a harness network name: `dmtbr<N>`, `dmt<N>h<i>` or `dmt<N>-<pod>`.
fn net_instance(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("dmt")?;
    if let Some(n) = rest.strip_prefix("br") {
        return n.parse().ok();
    }
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    if digits == 0 {
        return None;
    }
    let (n, tail) = rest.split_at(digits);
    let ok = match tail.as_bytes().first() {
        Some(b'-') => true,
        Some(b'h') => tail[1..].parse::<u32>().is_ok(),
        _ => false,
    };
    if ok {
        n.parse().ok()
    } else {
        None
    }
}

/// True when instance `n` has a live owner.
fn instance_owned(n: u32) -> bool {
    read_owner(&owner_path(n)).is_some_and(pid_alive)
}

/// Removes the network objects (netns, veths, bridge) of instance `n`. Best effort.
fn reap_instance_net(n: u32) -> Vec<String> {
    let mut removed = Vec::new();
    for ns in list_netns() {
        if net_instance(&ns) == Some(n) {
            net::delete_netns(&ns);
            removed.push(format!("netns {ns}"));
        }
    }
    for link in net::list_links() {
        if net_instance(&link) == Some(n) {
            net::delete_link(&link);
            removed.push(format!("link {link}"));
        }
    }
    removed
}

fn list_netns() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn dir_names(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the leftovers of earlier harness runs whose process no longer exists: processes in
/// their cgroups, pinned programs and maps, cgroups, namespaces, links, run dirs and owner files.
/// Resources of live runs (this one included) are never touched. Returns what it removed.
pub fn reap_stale() -> Result<Vec<String>> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let _lock = Lock::acquire()?;
    let mut removed = Vec::new();

    // 1. Kill the processes of dead runs (agent, redis, pod clients) and drop their pins,
    //    so nothing holds a link when the cgroups go.
    let dead_cgroups: Vec<String> = dir_names(CGROUP2_ROOT)
        .into_iter()
        .filter(|name| {
            parse_id(name).is_some_and(|(pid, _, sfx)| {
                !pid_alive(pid) && (sfx.is_empty() || sfx == "-outside")
            })
        })
        .collect();
    for name in &dead_cgroups {
        cgroup::kill_tree(&Path::new(CGROUP2_ROOT).join(name));
    }
    for name in dir_names(BPFFS) {
        if parse_id(&name).is_some_and(|(pid, _, sfx)| !pid_alive(pid) && sfx.is_empty()) {
            let dir = Path::new(BPFFS).join(&name);
            uninstall_pins(&dir);
            removed.push(format!("pin dir {}", dir.display()));
        }
    }
    for name in &dead_cgroups {
        let path = Path::new(CGROUP2_ROOT).join(name);
        if let Err(e) = cgroup::remove_tree(&path) {
            eprintln!(
                "datamesh-tests: reap: cannot remove {}: {e:#}",
                path.display()
            );
        }
        removed.push(format!("cgroup {}", path.display()));
    }

    // Memory cgroups of dead runs on cgroup v1 hosts (on v2 they are inside the instance's
    // attached cgroup, removed above).
    for name in dir_names(cgroup::MEMORY_V1_ROOT) {
        if parse_id(&name).is_some_and(|(pid, _, sfx)| !pid_alive(pid) && sfx == "-mem") {
            let path = Path::new(cgroup::MEMORY_V1_ROOT).join(&name);
            if let Ok(pids) = std::fs::read_to_string(path.join("cgroup.procs")) {
                for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) with a pid read from a dead run's test cgroup.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            if std::fs::remove_dir(&path).is_ok() {
                removed.push(format!("memory cgroup {}", path.display()));
            }
        }
    }

    // 2. Network objects of instances whose owner is gone (or whose owner file is missing: the
    //    owner file is created before and removed after every resource of an instance).
    let mut stale_ns: Vec<u32> = Vec::new();
    for name in list_netns().iter().chain(net::list_links().iter()) {
        if let Some(n) = net_instance(name) {
            if !instance_owned(n) && !stale_ns.contains(&n) {
                stale_ns.push(n);
            }
        }
    }
    for n in stale_ns {
        removed.extend(reap_instance_net(n));
    }
    for name in dir_names(RUN_DIR) {
        if let Some(n) = name
            .strip_prefix("inst-")
            .and_then(|s| s.parse::<u32>().ok())
        {
            if !instance_owned(n) {
                let _ = std::fs::remove_file(owner_path(n));
                removed.push(format!("owner file inst-{n}"));
            }
        } else if parse_id(&name).is_some_and(|(pid, _, _)| !pid_alive(pid)) {
            let _ = std::fs::remove_dir_all(Path::new(RUN_DIR).join(&name));
            removed.push(format!("run dir {name}"));
        }
    }
    // 3. Output capture files of killed runs (`dmt-out-<pid>-*`, `dmt-in-<pid>-*`, see `proc`).
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("dmt-out-")
                .or_else(|| name.strip_prefix("dmt-in-"))
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !pid_alive(p)) && std::fs::remove_file(e.path()).is_ok() {
                removed.push(format!("capture file {name}"));
            }
        }
    }
    Ok(removed)
}

/// Unpins everything under a pin dir: `datamesh-agent uninstall` when the binary exists (it is
/// the tool for it), then a plain recursive removal (bpffs pins are unlinked like files).
pub fn uninstall_pins(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(bin) = crate::agent::agent_bin() {
        let _ = Command::new(bin)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!(
                "datamesh-tests: cannot remove pin dir {}: {e}",
                dir.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse() {
        assert_eq!(parse_id("datamesh-test-123-7"), Some((123, 7, "")));
        assert_eq!(
            parse_id("datamesh-test-123-7-outside"),
            Some((123, 7, "-outside"))
        );
        assert_eq!(parse_id("datamesh"), None);
        assert_eq!(parse_id("datamesh-test-x-7"), None);
    }

    #[test]
    fn net_names_parse() {
        assert_eq!(net_instance("dmtbr12"), Some(12));
        assert_eq!(net_instance("dmt12h0"), Some(12));
        assert_eq!(net_instance("dmt12-a"), Some(12));
        assert_eq!(net_instance("dmt12x"), None);
        assert_eq!(net_instance("dmtbr"), None);
        assert_eq!(net_instance("eth0"), None);
        assert_eq!(net_instance("dmt-a"), None);
    }
}
