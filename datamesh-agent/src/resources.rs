//! What the agent's container gives it: the memory limit (cgroup v2 `memory.max`, the
//! DaemonSet's `resources.limits.memory`) the proxy's memory budget is sized from, and the
//! file-descriptor limit client connections must leave room under. Read once at start.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tracing::{info, warn};

/// Descriptors kept for everything that is not a client connection: backend and control
/// connections (pools, dedicated connections, health checks), the admin endpoint, eBPF maps
/// and links, files. `max_clients` is lowered at start so that these always fit.
pub const FD_RESERVE: u64 = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// The tightest `memory.max` of the agent's cgroup and its ancestors (None: no limit).
    pub memory_limit: Option<u64>,
    /// The soft `RLIMIT_NOFILE` after raising it to the hard limit.
    pub nofile: u64,
}

static RESOURCES: OnceLock<Resources> = OnceLock::new();

/// The resources, read (and the descriptor limit raised) on first use.
pub fn get() -> Resources {
    *RESOURCES.get_or_init(|| {
        let r = Resources {
            memory_limit: container_memory_limit(),
            nofile: raise_nofile(),
        };
        info!(memory_limit = ?r.memory_limit, nofile = r.nofile, "container resources");
        r
    })
}

/// Large buffers (request and reply bodies) come and go at the rate clients send them. glibc
/// raises its mmap threshold after freeing a large mapped block, so later large blocks come
/// from the heap, whose freed memory is often not given back: RSS would stay near the peak
/// of buffered bytes long after, and count against the container limit as if still in use.
/// A fixed threshold keeps every block over 128 KiB in its own mapping, returned on free.
pub fn pin_malloc_mmap_threshold() {
    // SAFETY: mallopt only changes allocator parameters; called first thing in main, before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Raises the soft descriptor limit to the hard one (the usual container default is a soft
/// 1024 under a far higher hard limit); returns the soft limit in force.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!(soft, hard, error = %e, "cannot raise the descriptor limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            warn!(error = %e, "cannot read the descriptor limit; assuming 1024");
            1024
        }
    }
}

/// The tightest memory limit on the path from the agent's cgroup up to the root, from
/// `/proc/self/cgroup`: cgroup v2 `memory.max` under `/sys/fs/cgroup` (or
/// `/sys/fs/cgroup/unified`), or cgroup v1 `memory.limit_in_bytes` under
/// `/sys/fs/cgroup/memory` on hybrid hosts.
pub fn container_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<u64> = None;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, rel) = (parts.next()?, parts.next()?, parts.next()?);
        let found = if controllers.is_empty() {
            ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .iter()
                .find_map(|root| memory_limit_under(Path::new(root), rel, "memory.max"))
        } else if controllers.split(',').any(|c| c == "memory") {
            memory_limit_under(
                Path::new("/sys/fs/cgroup/memory"),
                rel,
                "memory.limit_in_bytes",
            )
        } else {
            None
        };
        if let Some(v) = found {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    }
    best
}

/// A v1 "no limit" is a page-rounded `i64::MAX`; anything this large is no limit.
const NO_LIMIT: u64 = 1 << 60;

fn memory_limit_under(root: &Path, rel: &str, file: &str) -> Option<u64> {
    let mut dir: PathBuf = root.join(rel.trim_start_matches('/'));
    let mut best: Option<u64> = None;
    loop {
        if let Ok(s) = std::fs::read_to_string(dir.join(file)) {
            if let Ok(v) = s.trim().parse::<u64>() {
                if v < NO_LIMIT {
                    best = Some(best.map_or(v, |b| b.min(v)));
                }
            }
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return best;
        }
    }
}

/// `max_clients` as it can be honoured under the descriptor limit `nofile` (0 = no cap
/// configured: as many as fit).
pub fn effective_max_clients(configured: u32, nofile: u64) -> u32 {
    let fit = nofile.saturating_sub(FD_RESERVE).clamp(64, u32::MAX as u64) as u32;
    if configured == 0 {
        fit
    } else {
        configured.min(fit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tightest_limit_on_the_path_wins() {
        let tmp = std::env::temp_dir().join(format!("dm-memmax-{}", std::process::id()));
        let leaf = tmp.join("kubepods/pod1/agent");
        std::fs::create_dir_all(&leaf).expect("dirs");
        std::fs::write(tmp.join("kubepods/memory.max"), "8589934592\n").expect("write");
        std::fs::write(tmp.join("kubepods/pod1/memory.max"), "268435456\n").expect("write");
        std::fs::write(leaf.join("memory.max"), "max\n").expect("write");
        assert_eq!(
            memory_limit_under(&tmp, "/kubepods/pod1/agent", "memory.max"),
            Some(256 * 1024 * 1024)
        );
        assert_eq!(memory_limit_under(&tmp, "/", "memory.max"), None);
        std::fs::write(leaf.join("memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
        assert_eq!(
            memory_limit_under(&tmp, "/kubepods/pod1/agent", "memory.limit_in_bytes"),
            None,
            "v1's no-limit value"
        );
        std::fs::remove_dir_all(&tmp).expect("cleanup");
    }

    #[test]
    fn max_clients_leaves_the_reserve() {
        assert_eq!(effective_max_clients(10_000, 1_048_576), 10_000);
        assert_eq!(
            effective_max_clients(10_000, 4096),
            4096 - FD_RESERVE as u32
        );
        assert_eq!(
            effective_max_clients(0, 1_048_576),
            1_048_576 - FD_RESERVE as u32
        );
        assert_eq!(effective_max_clients(10_000, 1024), 64);
    }
}
