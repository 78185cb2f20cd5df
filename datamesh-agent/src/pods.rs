//! Pods: discovery (a network namespace whose processes belong to a kubelet pod is named
//! `namespace/name`, see `kubelet.rs`; each named network namespace in `netns_dir` is a pod
//! named after its file, the test/demo fallback; the identity in the data plane is the netns
//! cookie), the agent-written per-pod maps (`dm_pod_state` name, open connections, errors,
//! last activity; `dm_pod_policy` from the config: rates and the capture selection), and the
//! `pods` table.
//!
//! The cookie of a namespace is read by a short-lived thread that joins the namespace with
//! setns(2), creates a socket and asks for SO_NETNS_COOKIE; the thread then exits, so no
//! long-lived thread of the agent ever changes namespace.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use datamesh_common::{
    fnv1a, PodCounters, PodPolicy, PodState, MAP_POD_POLICY, MAP_POD_STATE, POD_CAPTURE_OFF,
    POD_CAPTURE_ON, POD_NAME_LEN,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::config::{CaptureConfig, CaptureMode, Config, PodPolicyConfig};
use crate::dataplane::{monotonic_ns, DataplaneError, Maps};
use crate::kubelet::Kubelet;

/// SO_NETNS_COOKIE (asm-generic/socket.h); not in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error("netns cookie: {action}: {source}: is SO_NETNS_COOKIE supported (Linux >= 5.14)?")]
    Cookie {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("entering netns {path}: {source}: is CAP_SYS_ADMIN missing?")]
    Setns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the netns probe thread for {path} panicked")]
    ThreadPanicked { path: PathBuf },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// The network-namespace cookie of the calling thread's namespace.
pub fn current_netns_cookie() -> Result<u64, PodsError> {
    // SAFETY: plain socket(2) call; the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(PodsError::Cookie {
            action: "socket",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh descriptor we own; OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(PodsError::Cookie {
            action: "getsockopt(SO_NETNS_COOKIE)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(cookie)
}

/// The cookie of the network namespace behind `path` (e.g. /var/run/netns/pod-a).
pub fn netns_cookie_of(path: &Path) -> Result<u64, PodsError> {
    let p = path.to_path_buf();
    let handle = std::thread::spawn(move || -> Result<u64, PodsError> {
        let f = File::open(&p).map_err(|source| PodsError::Setns {
            path: p.clone(),
            source,
        })?;
        // Only this thread moves; it exits right after, taking the namespace switch with it.
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            PodsError::Setns {
                path: p.clone(),
                source: std::io::Error::from(e),
            }
        })?;
        current_netns_cookie()
    });
    handle.join().map_err(|_| PodsError::ThreadPanicked {
        path: path.to_path_buf(),
    })?
}

/// Encodes a pod name into the fixed-size, NUL-padded field (cut at 63 bytes on a char boundary).
pub fn encode_name(name: &str) -> [u8; POD_NAME_LEN] {
    let mut out = [0u8; POD_NAME_LEN];
    let mut end = name.len().min(POD_NAME_LEN - 1);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&name.as_bytes()[..end]);
    out
}

pub fn decode_name(name: &[u8; POD_NAME_LEN]) -> String {
    let end = name.iter().position(|b| *b == 0).unwrap_or(POD_NAME_LEN);
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// Shared pod registry: cookie → name for the proxy, and the writers of the per-pod maps.
pub struct Pods {
    maps: Arc<Maps>,
    names: RwLock<HashMap<u64, String>>,
    /// The pods of the last discovery round, so a config reload re-applies at once.
    last: std::sync::Mutex<BTreeMap<u64, String>>,
}

impl Pods {
    pub fn new(maps: Arc<Maps>) -> Self {
        Self {
            maps,
            names: RwLock::new(HashMap::new()),
            last: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Re-applies the last discovered pods under new settings (config reload): the capture
    /// selection takes effect on the next connect, not the next discovery round.
    pub fn reapply(&self, settings: &PodSettings) {
        let found = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.apply(&found, settings);
    }

    pub fn name_of(&self, cookie: u64) -> Option<String> {
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cookie)
            .cloned()
    }

    /// Read-modify-write of one pod's state entry; a new entry gets the known name.
    fn update_state(&self, cookie: u64, f: impl FnOnce(&mut PodState)) {
        let name = self.name_of(cookie);
        let mut map = self
            .maps
            .pod_state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut st = map.get(&cookie, 0).unwrap_or_else(|_| {
            let mut s = PodState::default();
            if let Some(n) = &name {
                s.name = encode_name(n);
                s.name_hash = fnv1a(n.as_bytes());
            }
            s
        });
        f(&mut st);
        if let Err(e) = map.insert(cookie, st, 0) {
            warn!(cookie, error = %e, "cannot write {MAP_POD_STATE}");
        }
    }

    pub fn conn_opened(&self, cookie: u64) {
        let now = monotonic_ns();
        self.update_state(cookie, |s| {
            s.open_conns = s.open_conns.saturating_add(1);
            s.last_active_ns = now;
        });
    }

    pub fn conn_closed(&self, cookie: u64) {
        let now = monotonic_ns();
        self.update_state(cookie, |s| {
            s.open_conns = s.open_conns.saturating_sub(1);
            s.last_active_ns = now;
        });
    }

    pub fn error(&self, cookie: u64) {
        let now = monotonic_ns();
        self.update_state(cookie, |s| {
            s.errors = s.errors.saturating_add(1);
            s.last_active_ns = now;
        });
    }

    /// At start-up: connections counted by a previous agent died with it.
    pub fn reset_open_conns(&self) {
        let mut map = self
            .maps
            .pod_state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entries: Vec<(u64, PodState)> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| s.open_conns != 0)
            .collect();
        for (k, mut s) in entries {
            s.open_conns = 0;
            let _ = map.insert(k, s, 0);
        }
    }

    /// Applies one discovery round: `found` is every pod (cookie → name) present now.
    fn apply(&self, found: &BTreeMap<u64, String>, settings: &PodSettings) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = found.clone();
        let previous: BTreeSet<u64> = {
            let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
            let prev = names.keys().copied().collect();
            *names = found.iter().map(|(k, v)| (*k, v.clone())).collect();
            prev
        };
        {
            let mut map = self
                .maps
                .pod_state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (cookie, name) in found {
                let hash = fnv1a(name.as_bytes());
                let mut st = map.get(cookie, 0).unwrap_or_default();
                if st.name_hash != hash || st.name != encode_name(name) {
                    st.name = encode_name(name);
                    st.name_hash = hash;
                    if let Err(e) = map.insert(cookie, st, 0) {
                        warn!(cookie, pod = %name, error = %e, "cannot write {MAP_POD_STATE}");
                    } else if !previous.contains(cookie) {
                        info!(cookie, pod = %name, "pod discovered");
                    } else {
                        info!(cookie, pod = %name, "pod named");
                    }
                }
            }
            // Pods gone from netns_dir: their state goes once no proxied connection is open.
            for cookie in previous.iter().filter(|c| !found.contains_key(c)) {
                if map
                    .get(cookie, 0)
                    .map(|s| s.open_conns == 0)
                    .unwrap_or(true)
                {
                    let _ = map.remove(cookie);
                }
                debug!(cookie, "pod gone");
            }
        }
        let mut pol = self
            .maps
            .pod_policy
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut wanted: BTreeMap<u64, PodPolicy> = BTreeMap::new();
        for (cookie, name) in found {
            if let Some(p) = settings.policy_entry(name) {
                wanted.insert(*cookie, p);
            }
        }
        for (cookie, p) in &wanted {
            if pol.get(cookie, 0).ok().as_ref() != Some(p) {
                if let Err(e) = pol.insert(cookie, p, 0) {
                    warn!(cookie, error = %e, "cannot write {MAP_POD_POLICY}");
                }
            }
        }
        let stale: Vec<u64> = pol
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for k in stale {
            let _ = pol.remove(&k);
        }
    }
}

/// What discovery writes into `dm_pod_policy`: the pod policies (first whose `name` glob
/// matches the pod's name), the capture selection and the defaults for selected pods without a
/// policy of their own.
#[derive(Debug, Clone, Default)]
pub struct PodSettings {
    pub policies: Vec<PodPolicyConfig>,
    pub capture: CaptureConfig,
    pub default_conn_rate: u32,
    pub default_conn_burst: u32,
}

impl PodSettings {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            policies: cfg.pods.clone(),
            capture: cfg.capture.clone(),
            default_conn_rate: cfg.default_conn_rate,
            default_conn_burst: cfg.default_conn_burst,
        }
    }

    /// The `dm_pod_policy` entry of the pod named `name`, if it needs one: a pod policy, or a
    /// capture flag (selected in `selected` mode, not selected in any mode).
    pub fn policy_entry(&self, name: &str) -> Option<PodPolicy> {
        let policy = self
            .policies
            .iter()
            .find(|p| datamesh_proxy::keyrules::glob_match(p.name.as_bytes(), name.as_bytes()));
        let flags = match (self.capture.selects(Some(name)), self.capture.mode) {
            (false, _) => POD_CAPTURE_OFF,
            (true, CaptureMode::Selected) => POD_CAPTURE_ON,
            (true, CaptureMode::All) => 0,
        };
        if policy.is_none() && flags == 0 {
            return None;
        }
        Some(match policy {
            Some(p) => PodPolicy {
                conn_rate: p.conn_rate,
                conn_burst: p.conn_burst,
                cmd_rate: p.cmd_rate,
                cmd_burst: p.cmd_burst,
                flags,
                _pad0: 0,
            },
            // An entry overrides the default connection-rate limit in the data plane, so it
            // carries the default.
            None => PodPolicy {
                conn_rate: self.default_conn_rate,
                conn_burst: self.default_conn_burst,
                cmd_rate: 0,
                cmd_burst: 0,
                flags,
                _pad0: 0,
            },
        })
    }
}

/// What the data plane recorded: netns cookie → cgroup id of its last connecting process.
fn netns_cgroups(maps: &Maps) -> Vec<(u64, u64)> {
    maps.netns_cgroup.iter().filter_map(Result::ok).collect()
}

/// Discovery's tick: `dm_netns_cgroup` is read this often, so a new kubelet pod is named (and,
/// in `capture.mode: selected`, captured) within about this long of its first connect.
const TICK: Duration = Duration::from_millis(250);
/// A full round (netns directory, policies) runs at least every this many ticks (1 s).
const FULL_EVERY: u32 = 4;

/// Scans `netns_dir` once: every entry that is a network namespace is a pod named after the file.
/// `cache` maps (name, dev, inode) to cookies so setns runs once per namespace.
fn scan(netns_dir: &Path, cache: &mut HashMap<(String, u64, u64), u64>) -> BTreeMap<u64, String> {
    let mut found = BTreeMap::new();
    let entries = match std::fs::read_dir(netns_dir) {
        Ok(e) => e,
        Err(e) => {
            debug!(dir = %netns_dir.display(), error = %e, "no netns dir: no pods");
            cache.clear();
            return found;
        }
    };
    let mut seen = BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Ok(md) = std::fs::metadata(&path) else {
            continue;
        };
        let key = (name.clone(), md.dev(), md.ino());
        let cookie = match cache.get(&key) {
            Some(c) => *c,
            None => match netns_cookie_of(&path) {
                Ok(c) => {
                    cache.insert(key.clone(), c);
                    c
                }
                Err(e) => {
                    // Not a netns bind mount (or being torn down): not a pod.
                    debug!(path = %path.display(), error = %e, "skipping netns entry");
                    continue;
                }
            },
        };
        seen.insert(key);
        found.insert(cookie, name);
    }
    cache.retain(|k, _| seen.contains(k));
    found
}

/// The pod policies discovery writes into `dm_pod_policy`; replaced on config reload.
pub type SharedPolicies = Arc<RwLock<PodSettings>>;

/// Runs discovery (a full round every second, sooner when the data plane records a new
/// namespace or cgroup) until `stop` fires (or its sender is dropped).
pub fn spawn_discovery(
    pods: Arc<Pods>,
    netns_dir: PathBuf,
    mut kubelet: Kubelet,
    policies: SharedPolicies,
    stop: Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // The first scan runs before this returns, so that the agent reports ready only once it
    // knows the pods that exist: a connection accepted right after readiness gets its pod name
    // and a pod's connection limit is in the map before its first captured connect.
    let mut cache = HashMap::new();
    let mut seen = netns_cgroups(&pods.maps);
    let mut found = scan(&netns_dir, &mut cache);
    // Kubelet names win over netns file names (which are `cni-<uuid>` on a real node).
    found.extend(kubelet.resolve(&seen));
    pods.apply(
        &found,
        &policies.read().unwrap_or_else(|p| p.into_inner()).clone(),
    );
    std::thread::Builder::new()
        .name("pod-discovery".into())
        .spawn(move || {
            let mut tick = 0u32;
            while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(TICK) {
                tick = tick.wrapping_add(1);
                // Between full rounds only a change in what the data plane recorded (a new
                // namespace or a new cgroup for one) triggers a round.
                let now = netns_cgroups(&pods.maps);
                if now == seen && !tick.is_multiple_of(FULL_EVERY) {
                    continue;
                }
                seen = now;
                let mut found = scan(&netns_dir, &mut cache);
                found.extend(kubelet.resolve(&seen));
                let current = policies.read().unwrap_or_else(|p| p.into_inner()).clone();
                pods.apply(&found, &current);
            }
        })
}

/// One row of the `pods` table / JSON.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodRow {
    pub netns_cookie: u64,
    pub pod: Option<String>,
    pub connects_captured: u64,
    pub connects_failopen: u64,
    pub connects_refused: u64,
    pub fastpath_msgs: u64,
    pub fastpath_bytes: u64,
    pub fastpath_misses: u64,
    pub commands: u64,
    pub commands_throttled: u64,
    pub open_conns: u32,
    pub errors: u32,
    pub last_active_ns: u64,
}

/// Reads the pinned per-pod maps: every pod with a counters or a state entry.
pub fn read_rows(pin_dir: &Path) -> Result<Vec<PodRow>, PodsError> {
    let (counters, state) = crate::dataplane::open_pod_maps(pin_dir)?;
    let mut rows: BTreeMap<u64, (Option<PodCounters>, Option<PodState>)> = BTreeMap::new();
    for (k, v) in counters.iter().filter_map(Result::ok) {
        rows.entry(k).or_default().0 = Some(v);
    }
    for (k, v) in state.iter().filter_map(Result::ok) {
        rows.entry(k).or_default().1 = Some(v);
    }
    Ok(rows
        .into_iter()
        .map(|(cookie, (c, s))| {
            let c = c.unwrap_or_default();
            let s = s.unwrap_or_default();
            let name = decode_name(&s.name);
            PodRow {
                netns_cookie: cookie,
                pod: if name.is_empty() { None } else { Some(name) },
                connects_captured: c.connects_captured,
                connects_failopen: c.connects_failopen,
                connects_refused: c.connects_refused,
                fastpath_msgs: c.fastpath_msgs,
                fastpath_bytes: c.fastpath_bytes,
                fastpath_misses: c.fastpath_misses,
                commands: c.commands,
                commands_throttled: c.commands_throttled,
                open_conns: s.open_conns,
                errors: s.errors,
                last_active_ns: s.last_active_ns,
            }
        })
        .collect())
}

/// The human table; LAST_ACTIVE is shown as age ("1.2s ago") or "-".
pub fn format_table(rows: &[PodRow], now_ns: u64) -> String {
    let header = [
        "NETNS_COOKIE",
        "POD",
        "CAPTURED",
        "FAILOPEN",
        "REFUSED",
        "FP_MSGS",
        "FP_BYTES",
        "FP_MISSES",
        "COMMANDS",
        "THROTTLED",
        "OPEN",
        "ERRORS",
        "LAST_ACTIVE",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let last = if r.last_active_ns == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}s ago",
                now_ns.saturating_sub(r.last_active_ns) as f64 / 1e9
            )
        };
        table.push(vec![
            r.netns_cookie.to_string(),
            r.pod.clone().unwrap_or_else(|| "-".into()),
            r.connects_captured.to_string(),
            r.connects_failopen.to_string(),
            r.connects_refused.to_string(),
            r.fastpath_msgs.to_string(),
            r.fastpath_bytes.to_string(),
            r.fastpath_misses.to_string(),
            r.commands.to_string(),
            r.commands_throttled.to_string(),
            r.open_conns.to_string(),
            r.errors.to_string(),
            last,
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| table.iter().map(|row| row[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_and_padded() {
        let n = encode_name("pod-a");
        assert_eq!(&n[..5], b"pod-a");
        assert!(n[5..].iter().all(|b| *b == 0));
        assert_eq!(decode_name(&n), "pod-a");
        let long = "x".repeat(100);
        let n = encode_name(&long);
        assert_eq!(decode_name(&n).len(), 63);
        // A multi-byte char at the cut is dropped, not split.
        let tricky = format!("{}é", "a".repeat(62));
        assert_eq!(decode_name(&encode_name(&tricky)), "a".repeat(62));
    }

    #[test]
    fn own_netns_cookie_is_stable() {
        let a = current_netns_cookie().expect("SO_NETNS_COOKIE");
        let b = current_netns_cookie().expect("SO_NETNS_COOKIE");
        assert_eq!(a, b);
        assert_ne!(a, 0);
        // Through the probe thread, our own netns gives the same cookie.
        let c = netns_cookie_of(Path::new("/proc/self/ns/net")).expect("probe");
        assert_eq!(a, c);
    }

    #[test]
    fn policy_entries_carry_capture_flags_and_defaults() {
        let mut s = PodSettings {
            policies: vec![PodPolicyConfig {
                name: "shop/*".into(),
                conn_rate: 5,
                conn_burst: 2,
                cmd_rate: 0,
                cmd_burst: 0,
                max_connections: 0,
                max_dedicated: 0,
                acl: None,
            }],
            capture: CaptureConfig::default(),
            default_conn_rate: 100,
            default_conn_burst: 10,
        };
        // Mode all: only pods with a policy get an entry, without capture bits.
        assert_eq!(
            s.policy_entry("shop/web-1").map(|p| (p.conn_rate, p.flags)),
            Some((5, 0))
        );
        assert_eq!(s.policy_entry("blog/api-0"), None);
        s.capture = CaptureConfig {
            mode: CaptureMode::Selected,
            namespaces: vec!["blog".into()],
            pods: vec![],
            exclude: vec!["shop/web-2".into()],
        };
        let e = s.policy_entry("blog/api-0").expect("selected pod entry");
        assert_eq!(
            (e.conn_rate, e.conn_burst, e.flags),
            (100, 10, POD_CAPTURE_ON)
        );
        assert_eq!(
            s.policy_entry("shop/web-1").map(|p| p.flags),
            Some(POD_CAPTURE_OFF)
        );
        assert_eq!(
            s.policy_entry("shop/web-2").map(|p| p.flags),
            Some(POD_CAPTURE_OFF)
        );
    }

    #[test]
    fn table_has_the_contract_columns() {
        let rows = vec![PodRow {
            netns_cookie: 4097,
            pod: Some("dmt3-a".into()),
            connects_captured: 2,
            connects_failopen: 0,
            connects_refused: 1,
            fastpath_msgs: 0,
            fastpath_bytes: 0,
            fastpath_misses: 0,
            commands: 0,
            commands_throttled: 0,
            open_conns: 1,
            errors: 0,
            last_active_ns: 0,
        }];
        let t = format_table(&rows, 10);
        let mut lines = t.lines();
        let head: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
        assert_eq!(head[0], "NETNS_COOKIE");
        assert_eq!(head[12], "LAST_ACTIVE");
        let row: Vec<&str> = lines.next().expect("row").split_whitespace().collect();
        assert_eq!(
            row,
            ["4097", "dmt3-a", "2", "0", "1", "0", "0", "0", "0", "0", "1", "0", "-"]
        );
        let json = serde_json::to_value(&rows).expect("json");
        assert_eq!(json[0]["netns_cookie"], 4097);
        assert_eq!(json[0]["pod"], "dmt3-a");
        assert_eq!(json[0]["last_active_ns"], 0);
    }
}
