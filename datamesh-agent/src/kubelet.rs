//! Pod identity on a real node, read without the API server: the data plane records the cgroup
//! id of the last process that connected from each network namespace (`dm_netns_cgroup`); the
//! kubelet's cgroup tree maps a cgroup id to its pod UID (the nearest ancestor that is a pod
//! cgroup), and the kubelet's pod log directories (`<namespace>_<name>_<uid>`) map the UID to
//! `namespace/name`.
//!
//! Layouts understood (cgroup v2, whose directory inode number is the cgroup id; in the hybrid
//! layout the unified hierarchy is `<cgroup_root>/unified`):
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, _ for ->.slice/<container>.scope`
//!   and `kubepods.slice/kubepods-pod<uid>.slice/...` (guaranteed);
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>/<container id>` and `kubepods/pod<uid>/...`.
//!
//! Cost: a walk of the kubepods subtree (a few directories per pod) and one `read_dir` of the
//! log directory, only when an unknown cgroup id shows up (at most once per discovery round,
//! 250 ms) and every [`FULL_RESCAN`] to forget pods that left.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::debug;

/// Pods that left are forgotten at this period even when nothing unknown shows up.
pub const FULL_RESCAN: Duration = Duration::from_secs(10);
/// Rescans triggered by an unknown cgroup id are at least this far apart (a namespace outside
/// any pod, like the host's, stays unknown and must not make every round rescan).
pub const MIN_RESCAN: Duration = Duration::from_millis(200);
/// Depth of the walk below `kubepods[.slice]` (qos, pod, container, and one spare level).
const MAX_DEPTH: usize = 5;

/// The pod UID a kubelet pod cgroup directory name carries, if it is one.
pub fn pod_uid_of_dir(name: &str) -> Option<String> {
    let uid = if let Some(stem) = name.strip_suffix(".slice") {
        // systemd: kubepods-pod<uid>.slice, kubepods-<qos>-pod<uid>.slice; '-' in the UID is '_'.
        let (_, uid) = stem.rsplit_once("-pod")?;
        uid.replace('_', "-")
    } else {
        // cgroupfs: pod<uid>.
        name.strip_prefix("pod")?.to_string()
    };
    let ok =
        (8..=64).contains(&uid.len()) && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then_some(uid)
}

/// `<namespace>_<name>_<uid>`: namespace and name are DNS names (no `_`), the UID neither.
pub fn parse_log_dir(name: &str) -> Option<(String, String, String)> {
    let mut it = name.splitn(3, '_');
    let (ns, pod, uid) = (it.next()?, it.next()?, it.next()?);
    if ns.is_empty() || pod.is_empty() || uid.is_empty() || uid.contains('_') {
        return None;
    }
    Some((ns.to_string(), pod.to_string(), uid.to_string()))
}

/// The unified (v2) hierarchy under `root`: `root/unified` in the hybrid layout, else `root`.
fn unified(root: &Path) -> PathBuf {
    let hybrid = root.join("unified");
    if hybrid.join("cgroup.controllers").exists() {
        hybrid
    } else {
        root.to_path_buf()
    }
}

/// Walks the kubelet's cgroup tree: every cgroup id at or below a pod cgroup → the pod's UID.
pub fn scan_cgroups(root: &Path) -> HashMap<u64, String> {
    let base = unified(root);
    let mut out = HashMap::new();
    for top in ["kubepods.slice", "kubepods"] {
        walk(&base.join(top), None, 0, &mut out);
    }
    out
}

fn walk(dir: &Path, pod: Option<&str>, depth: usize, out: &mut HashMap<u64, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let own = match pod {
            Some(p) => Some(p.to_string()),
            None => pod_uid_of_dir(&name),
        };
        if let Some(uid) = &own {
            if let Ok(md) = e.metadata() {
                out.insert(md.ino(), uid.clone());
            }
        }
        if depth < MAX_DEPTH {
            walk(&e.path(), own.as_deref(), depth + 1, out);
        }
    }
}

/// Reads the pod log directory: pod UID → `namespace/name`.
pub fn scan_logs(dir: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        debug!(dir = %dir.display(), "no pod log dir");
        return out;
    };
    for e in entries.flatten() {
        if let Some((ns, name, uid)) = parse_log_dir(&e.file_name().to_string_lossy()) {
            out.insert(uid, format!("{ns}/{name}"));
        }
    }
    out
}

/// Cached cgroup id → UID → `namespace/name`.
pub struct Kubelet {
    cgroup_root: PathBuf,
    log_dir: PathBuf,
    cgroups: HashMap<u64, String>,
    names: HashMap<String, String>,
    scanned: Option<Instant>,
}

impl Kubelet {
    pub fn new(cgroup_root: PathBuf, log_dir: PathBuf) -> Self {
        Self {
            cgroup_root,
            log_dir,
            cgroups: HashMap::new(),
            names: HashMap::new(),
            scanned: None,
        }
    }

    fn name_of(&self, cgroup: u64) -> Option<&String> {
        self.names.get(self.cgroups.get(&cgroup)?)
    }

    /// Names the network namespaces in `netns_cgroups` (netns cookie → cgroup id) that belong
    /// to kubelet pods. Rescans when a cgroup id is unknown (at most once per [`MIN_RESCAN`]).
    pub fn resolve(&mut self, netns_cgroups: &[(u64, u64)]) -> BTreeMap<u64, String> {
        let since = self.scanned.map(|t| t.elapsed());
        let stale = since.is_none_or(|d| d >= FULL_RESCAN);
        let unknown = since.is_none_or(|d| d >= MIN_RESCAN)
            && netns_cgroups
                .iter()
                .any(|(_, cg)| self.name_of(*cg).is_none());
        if stale || unknown {
            self.cgroups = scan_cgroups(&self.cgroup_root);
            self.names = scan_logs(&self.log_dir);
            self.scanned = Some(Instant::now());
        }
        netns_cgroups
            .iter()
            .filter_map(|(ns, cg)| Some((*ns, self.name_of(*cg)?.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroup_names() {
        let uid = "1f2e3d4c-0000-4111-8222-123456789abc";
        let us = uid.replace('-', "_");
        for n in [
            format!("kubepods-burstable-pod{us}.slice"),
            format!("kubepods-besteffort-pod{us}.slice"),
            format!("kubepods-pod{us}.slice"),
            format!("pod{uid}"),
        ] {
            assert_eq!(pod_uid_of_dir(&n).as_deref(), Some(uid), "{n}");
        }
        for n in [
            "kubepods-burstable.slice",
            "kubepods.slice",
            "burstable",
            "cri-containerd-abc.scope",
            "podman",
            "0123456789abcdef",
        ] {
            assert_eq!(pod_uid_of_dir(n), None, "{n}");
        }
    }

    #[test]
    fn log_dirs() {
        assert_eq!(
            parse_log_dir("shop_web-1_1f2e3d4c-0000-4111-8222-123456789abc"),
            Some((
                "shop".into(),
                "web-1".into(),
                "1f2e3d4c-0000-4111-8222-123456789abc".into()
            ))
        );
        assert_eq!(parse_log_dir("shop_web-1"), None);
        assert_eq!(parse_log_dir("a_b_c_d"), None);
    }

    #[test]
    fn walks_both_drivers() {
        let dir = std::env::temp_dir().join(format!("dm-kubelet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sd = dir.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podaaaaaaaa_1111.slice/cri-containerd-x.scope");
        let fs = dir.join("kubepods/podbbbbbbbb-2222/c0ffee");
        std::fs::create_dir_all(&sd).expect("mkdir");
        std::fs::create_dir_all(&fs).expect("mkdir");
        let m = scan_cgroups(&dir);
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(m.get(&ino(&sd)).map(String::as_str), Some("aaaaaaaa-1111"));
        assert_eq!(m.get(&ino(&fs)).map(String::as_str), Some("bbbbbbbb-2222"));
        assert_eq!(m.len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hybrid_layout_uses_the_unified_hierarchy() {
        let dir = std::env::temp_dir().join(format!("dm-kubelet-hy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pod = dir
            .join("unified/kubepods.slice/kubepods-podcccccccc_3333.slice/cri-containerd-y.scope");
        std::fs::create_dir_all(&pod).expect("mkdir");
        std::fs::write(dir.join("unified/cgroup.controllers"), "").expect("write");
        // A v1 controller hierarchy beside it is not looked at.
        std::fs::create_dir_all(dir.join("kubepods.slice/kubepods-poddddddddd_4444.slice"))
            .expect("mkdir");
        let m = scan_cgroups(&dir);
        let ino = std::fs::metadata(&pod).expect("stat").ino();
        assert_eq!(m.get(&ino).map(String::as_str), Some("cccccccc-3333"));
        assert!(m.values().all(|u| u == "cccccccc-3333"), "{m:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
