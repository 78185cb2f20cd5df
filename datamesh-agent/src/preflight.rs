//! Start-up checks that fail fast, each naming the likely operator cause: privileges
//! (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), kernel version (bpf_set_retval needs 5.18), kernel
//! BTF, the cgroup2 attach point, and bpffs under the pin directory (mounted at /sys/fs/bpf
//! when missing). It also raises RLIMIT_NOFILE and RLIMIT_MEMLOCK.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::config::Config;

/// `statfs` magic numbers (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The oldest kernel with everything the data plane uses (bpf_set_retval from cgroup sock_addr).
const MIN_KERNEL: (u32, u32) = (5, 18);

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("missing capabilities {missing}: run the agent as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (privileged: true in the DaemonSet)")]
    Capabilities { missing: String },
    #[error("cannot read {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {release} is too old: DataMesh needs Linux >= {}.{} (bpf_set_retval in cgroup programs)", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { release: String },
    #[error("/sys/kernel/btf/vmlinux is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF, or /sys is not mounted")]
    NoKernelBtf,
    #[error("cgroup_path {path} does not exist or is unreadable ({source}): create the cgroup, or fix cgroup_path (is the cgroup2 filesystem mounted?)")]
    CgroupMissing {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cgroup_path {path} is not on a cgroup2 filesystem (statfs magic {magic:#x}): point it at the unified hierarchy (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified)")]
    NotCgroup2 { path: PathBuf, magic: i64 },
    #[error("pin_dir {path}: its parent {parent} is not a bpffs mount (statfs magic {magic:#x}): mount bpffs there (mount -t bpf bpf {parent}) or choose a pin_dir under /sys/fs/bpf")]
    NotBpffs {
        path: PathBuf,
        parent: PathBuf,
        magic: i64,
    },
    #[error("pin_dir parent {parent} does not exist ({source}): is /sys/fs/bpf (bpffs) mounted into the container?")]
    PinParentMissing {
        parent: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot mount bpffs at /sys/fs/bpf ({source}): is CAP_SYS_ADMIN missing, or is /sys read-only in this container?")]
    MountBpffs {
        #[source]
        source: nix::Error,
    },
}

/// Runs every check for `run`. Mounts bpffs at /sys/fs/bpf if needed and raises rlimits.
pub fn check_all(cfg: &Config) -> Result<(), PreflightError> {
    check_capabilities()?;
    check_kernel()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoKernelBtf);
    }
    check_cgroup2(&cfg.cgroup_path)?;
    ensure_bpffs(&cfg.pin_dir)?;
    raise_rlimits();
    Ok(())
}

fn check_capabilities() -> Result<(), PreflightError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| PreflightError::Read {
            what: "/proc/self/status",
            source,
        })?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities {
            missing: missing.join(", "),
        })
    }
}

fn check_kernel() -> Result<(), PreflightError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|source| {
        PreflightError::Read {
            what: "/proc/sys/kernel/osrelease",
            source,
        }
    })?;
    let release = release.trim().to_string();
    match parse_kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(PreflightError::KernelTooOld { release }),
    }
}

/// "6.18.0-1-amd64" -> (6, 18).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn fs_magic(path: &Path) -> Result<i64, nix::Error> {
    let st = nix::sys::statfs::statfs(path)?;
    // The type of f_type differs between libc targets; the magic numbers fit in 32 bits.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.filesystem_type().0 as i64)
}

pub fn check_cgroup2(path: &Path) -> Result<(), PreflightError> {
    let magic = fs_magic(path).map_err(|source| PreflightError::CgroupMissing {
        path: path.to_path_buf(),
        source,
    })?;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(PreflightError::NotCgroup2 {
            path: path.to_path_buf(),
            magic,
        });
    }
    Ok(())
}

/// Makes sure the pin directory can live on bpffs; mounts bpffs at /sys/fs/bpf if that is
/// where it belongs and nothing is mounted yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), PreflightError> {
    if fs_magic(pin_dir)
        .map(|m| m == BPF_FS_MAGIC)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let parent = pin_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let magic = fs_magic(&parent).map_err(|source| PreflightError::PinParentMissing {
        parent: parent.clone(),
        source,
    })?;
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    if parent == sys_fs_bpf {
        nix::mount::mount(
            Some("bpf"),
            sys_fs_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| PreflightError::MountBpffs { source })?;
        info!("/sys/fs/bpf was not a bpffs mount: mounted bpffs there");
        return Ok(());
    }
    Err(PreflightError::NotBpffs {
        path: pin_dir.to_path_buf(),
        parent,
        magic,
    })
}

/// Raises RLIMIT_NOFILE to its hard limit (two fds per proxied connection) and RLIMIT_MEMLOCK
/// as far as allowed (map memory is charged to it on kernels before memcg accounting, 5.11).
fn raise_rlimits() {
    for (res, name) in [
        (libc::RLIMIT_NOFILE, "RLIMIT_NOFILE"),
        (libc::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK"),
    ] {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct we own.
        if unsafe { libc::getrlimit(res, &mut lim) } != 0 {
            warn!(
                "getrlimit({name}) failed: {}",
                std::io::Error::last_os_error()
            );
            continue;
        }
        let mut wanted = vec![libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        }];
        if res == libc::RLIMIT_MEMLOCK {
            // Raising the hard limit needs CAP_SYS_RESOURCE; fall back to soft = hard.
            wanted.insert(
                0,
                libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                },
            );
        }
        // SAFETY: setrlimit reads the struct we own.
        let ok = wanted
            .iter()
            .any(|w| unsafe { libc::setrlimit(res, w) } == 0);
        if !ok {
            warn!(
                "setrlimit({name}) failed: {} (continuing)",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0"), Some((5, 4)));
        assert!(parse_kernel_version("5.4.0").expect("v") < MIN_KERNEL);
        assert!(parse_kernel_version("5.18").expect("v") >= MIN_KERNEL);
        assert_eq!(parse_kernel_version("junk"), None);
    }
}
