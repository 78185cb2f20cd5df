//! Test harness for DataMesh: real kernel programs, network namespaces as pods, a real
//! redis-server as the endpoint and the real `datamesh-agent` attached to a cgroup the test made.
//!
//! The harness owns the per-instance test network layout (ARCHITECTURE.md, README): instance
//! `N`, cgroup `/sys/fs/cgroup/unified/datamesh-test-<pid>-<N>/`,
//! bridge `dmtbr<N>` with 198.18.N.1/24 (proxy) and 198.19.N.1/32 (service), pods as netns
//! `dmt<N>-<name>` with veth `dmt<N>h<i>`, pin dir `/sys/fs/bpf/datamesh-test-<pid>-<N>`.
//! Every resource is a Drop guard; [`env::Env`] drops them in reverse order (also while a test
//! panics), and [`reap_stale`] removes what a killed earlier run left behind.
//!
//! Modules: [`instance`] (numbering, ownership, reaping), [`net`] (bridge, veth, netns),
//! [`cgroup`], [`pod`], [`redis`], [`resp`] (a tiny RESP reader for checks), [`agent`],
//! [`env`] (the builder tests use), [`proc`] (running commands with deadlines), and for the RESP
//! proxy tests [`proxy`] (raw RESP connections, real-client runners), [`sentinel`] (master,
//! replica and three sentinels) and [`cluster`] (a 3-master Redis Cluster), and [`drill`]
//! (failover scenarios under load, direct vs through the proxy, for `cargo xtask drill` and
//! `tests/tests/failover.rs`), [`restartdrill`] (the agent's own failures under load, for
//! `cargo xtask drill restart` and `tests/tests/restartdrill.rs`), and [`clients`] (the client programs of `tests/clients/` and the
//! table of `docs/compatibility.md` they are held to, for `tests/tests/compat.rs`).

pub mod acl_table;
pub mod agent;
pub mod cgroup;
pub mod clients;
pub mod cluster;
pub mod drill;
pub mod env;
pub mod graydrill;
pub mod hotcache;
pub mod instance;
pub mod keydrill;
pub mod leakdrill;
pub mod net;
pub mod pod;
pub mod proc;
pub mod proxy;
pub mod redis;
pub mod resp;
pub mod restartdrill;
pub mod sentinel;
pub mod tenant;
pub mod upgradedrill;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use env::{CgroupDriver, Env, EnvBuilder, KubeletPod};
pub use instance::reap_stale;

/// Where the cgroup2 hierarchy is mounted on this machine kind (hybrid layout).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// bpffs mount point; pin dirs of test instances live directly under it.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where `ip netns add` creates named network namespaces (and where the agent discovers pods).
pub const NETNS_DIR: &str = "/var/run/netns";
/// Harness state: instance owner files, the allocation lock, per-instance run dirs (logs,
/// config, ready file). tmpfs, so it vanishes with a reboot like the namespaces do.
pub const RUN_DIR: &str = "/run/datamesh-tests";

/// The workspace root (parent of the `tests/` crate).
pub fn project_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                project_root().join(d)
            }
        }
        None => project_root().join("target"),
    }
}

/// Panics with a clear message when this process cannot run the privileged tests.
///
/// Privileged tests never skip silently: a machine that cannot run them fails them.
pub fn require_privileges() {
    if let Err(e) = check_privileges() {
        panic!(
            "privileged DataMesh tests cannot run here: {e:#}\n\
             These tests load real eBPF programs into cgroups and network namespaces they create; \
             run them as root on a Linux host with cgroup2 and bpffs (`cargo xtask test` prepares the machine)."
        );
    }
}

/// The checks behind [`require_privileges`], as a `Result` for xtask callers.
///
/// Mounts bpffs at /sys/fs/bpf when it is missing (as systemd would), since the pin dirs need it.
pub fn check_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("not running as root (euid {euid}); run the tests with sudo or as root");
    }
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .context("no CapEff line in /proc/self/status")?;
    let caps =
        u64::from_str_radix(cap_eff, 16).with_context(|| format!("bad CapEff {cap_eff:?}"))?;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    for (bit, name) in [
        (CAP_BPF, "CAP_BPF"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ] {
        if caps & (1u64 << bit) == 0 {
            bail!("{name} is missing from the effective capabilities (CapEff {cap_eff}); is this a restricted container?");
        }
    }
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if !has_mount(&mountinfo, CGROUP2_ROOT, "cgroup2") {
        bail!("no cgroup2 filesystem mounted at {CGROUP2_ROOT}; is the cgroup2 (unified) hierarchy mounted?");
    }
    if !has_mount(&mountinfo, BPFFS, "bpf") {
        proc::run_checked(std::process::Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
            .with_context(|| format!("bpffs is not mounted at {BPFFS} and mounting it failed"))?;
    }
    for tool in ["ip", "bpftool", "redis-server", "redis-cli"] {
        if which(tool).is_none() {
            bail!("`{tool}` is not on PATH; run `cargo xtask setup` (installs iproute2, bpftool, redis-server, redis-tools)");
        }
    }
    Ok(())
}

fn has_mount(mountinfo: &str, point: &str, fstype: &str) -> bool {
    // mountinfo: "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
    mountinfo.lines().any(|l| {
        let mut halves = l.splitn(2, " - ");
        let left = halves.next().unwrap_or("");
        let right = halves.next().unwrap_or("");
        left.split(' ').nth(4) == Some(point) && right.split(' ').next() == Some(fstype)
    })
}

/// Finds `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Polls `f` every 10 ms until it returns `Some`, failing after `timeout` with `what` in the error.
///
/// The harness never sleeps and hopes: everything it waits for is a condition checked here.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return match last_err {
                Some(e) => {
                    Err(e.context(format!("timed out after {timeout:?} waiting for {what}")))
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when a process with this pid exists (zombies included).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
