//! The eBPF data plane's life cycle: load, pin, adopt, upgrade and uninstall of the programs and
//! maps; the settings entry (flags, heartbeat) and the endpoints map.
//!
//! Start-up decides between three paths by looking at what is pinned under the pin directory:
//! - adopt: the pinned maps have this build's layout (`Settings.abi_version` and the type, key
//!   and value size and size of every map as defined in the object) and the three pinned cgroup
//!   links run programs with the same kernel tag as this object's programs, using the pinned
//!   maps. Nothing is attached or detached; the links stay as they are.
//! - fresh: nothing pinned: load, pin maps, attach sk_msg to `dm_socks`, attach the cgroup
//!   programs and pin their links.
//! - upgrade: pins exist but differ. Maps of another layout are unpinned (the old programs keep
//!   them alive) so new ones are created; new links are attached *before* the old ones are
//!   dropped (a cgroup bpf_link attach is always multi), then pinned over the old pins with an
//!   atomic rename, so capture has no gap.
//!
//! To compare programs the object's programs are loaded (verified) but not attached: the kernel
//! tag is a hash of the instructions with map references blanked, so it is equal for the same
//! object whatever maps the programs were bound to.

use std::collections::HashMap as StdHashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{Array, HashMap, IterableMap, Map, MapData, MapError, MapInfo, SockHash};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkMsg, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
use datamesh_common::{
    ConnInfo, EndpointKey, EndpointValue, FlowKey, PodCounters, PodPolicy, PodState, Settings,
    ABI_VERSION, AF_INET, AF_INET6, ALL_MAPS, CGROUP_PROGS, ENDPOINT_LISTENER, FASTPATH_TCP,
    LINKS_SUBDIR, MAP_CONNS, MAP_ENDPOINTS, MAP_LISTENERS, MAP_NETNS_CGROUP, MAP_POD_COUNTERS,
    MAP_POD_POLICY, MAP_POD_STATE, MAP_SETTINGS, MAP_SOCKS, PROG_CONNECT4, PROG_CONNECT6,
    PROG_SKMSG, SETTINGS_CAPTURE, SETTINGS_CAPTURE_SELECTED, SETTINGS_FASTPATH,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;

use datamesh_proxy::stopped;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The eBPF object built by `cargo xtask build-ebpf`, copied into OUT_DIR by build.rs.
pub static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datamesh.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the eBPF object: {reason}: was it built by `cargo xtask build-ebpf`?")]
    ObjectParse { reason: String },
    #[error("cannot load the eBPF object: {source}: is CAP_BPF missing, or was the object built for another kernel?")]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("the eBPF object has no program {name}: object and agent are from different builds")]
    ProgramMissing { name: &'static str },
    #[error("program {name}: {action}: {source}")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("link of {name}: {action}: {source}")]
    Link {
        name: &'static str,
        action: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("pinning the link of {name} at {path}: {source}: is {path} on bpffs?")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {name} at {path}: {source}: is the data plane installed (run the agent first) and is this pin dir right?")]
    Map {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {name}: {action}: {source}")]
    MapOp {
        name: &'static str,
        action: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cgroup {path} cannot be opened: {source}: does the cgroup exist?")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned maps at {pin_dir} have ABI version {found}, this tool speaks {ABI_VERSION}: use the datamesh-agent binary that matches the running data plane")]
    AbiMismatch { pin_dir: PathBuf, found: u32 },
}

/// How the data plane came up (the ready file's and /metrics' `dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Attached,
    Adopted,
    Upgraded,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Attached => "attached",
            Mode::Adopted => "adopted",
            Mode::Upgraded => "upgraded",
        }
    }
}

/// Handles on the pinned maps the agent reads and writes. Writers go through a mutex so the
/// read-modify-writes of settings and pod state never interleave inside the agent.
pub struct Maps {
    pub settings: Mutex<Array<MapData, Settings>>,
    pub endpoints: Mutex<HashMap<MapData, EndpointKey, EndpointValue>>,
    pub conns: HashMap<MapData, FlowKey, ConnInfo>,
    /// A second handle on `dm_conns` for the one write the agent makes there
    /// ([`Maps::conn_to_tcp`]), so the reads above take no lock.
    conns_w: Mutex<HashMap<MapData, FlowKey, ConnInfo>>,
    pub pod_policy: Mutex<HashMap<MapData, u64, PodPolicy>>,
    pub pod_state: Mutex<HashMap<MapData, u64, PodState>>,
    /// netns cookie → cgroup id of the last connecting process (read by pod discovery).
    pub netns_cgroup: HashMap<MapData, u64, u64>,
    /// endpoint id → the proxy's listening socket (connect4/6 rewrite only while it is there).
    pub listeners: Mutex<SockHash<MapData, u32>>,
    /// The pinned `dm_conns` when it is not ours (see [`Maps::conn_info`]).
    foreign_conns: Mutex<ForeignConns>,
    pin_dir: PathBuf,
}

/// Another build's `dm_conns`, pinned over ours (or ours pinned over it) during a zero-error
/// upgrade across a layout change: both workers accept on the same listeners for a moment, so
/// each may accept a connection the other build's programs recorded.
#[derive(Default)]
struct ForeignConns {
    checked: Option<std::time::Instant>,
    /// The pinned map (when it is not ours), its layout and ours.
    map: Option<(MapData, crate::carryover::Layout, crate::carryover::Layout)>,
}

impl Maps {
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            settings: Mutex::new(open_typed(pin_dir, MAP_SETTINGS)?),
            endpoints: Mutex::new(open_typed(pin_dir, MAP_ENDPOINTS)?),
            conns: open_typed(pin_dir, MAP_CONNS)?,
            conns_w: Mutex::new(open_typed(pin_dir, MAP_CONNS)?),
            pod_policy: Mutex::new(open_typed(pin_dir, MAP_POD_POLICY)?),
            pod_state: Mutex::new(open_typed(pin_dir, MAP_POD_STATE)?),
            netns_cgroup: open_typed(pin_dir, MAP_NETNS_CGROUP)?,
            foreign_conns: Mutex::default(),
            pin_dir: pin_dir.to_path_buf(),
            listeners: Mutex::new(open_typed(pin_dir, MAP_LISTENERS)?),
        })
    }

    /// Puts endpoint `id`'s listening socket into `dm_listeners` (replacing any entry): from
    /// now on connect4/6 rewrite connects of that endpoint, for as long as some process keeps
    /// the socket open (the kernel removes a closed socket from the map by itself).
    pub fn set_listener(&self, id: u32, listener: RawFd) -> Result<(), DataplaneError> {
        let mut map = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(id, listener, 0)
            .map_err(|source| DataplaneError::MapOp {
                name: MAP_LISTENERS,
                action: "insert (is the socket a TCP listener?)",
                source,
            })
    }

    /// Removes endpoint `id`'s listener from `dm_listeners` (an endpoint removed by a reload
    /// whose socket the supervisor still holds). A missing entry is not an error.
    pub fn remove_listener(&self, id: u32) {
        let mut map = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = map.remove(&id) {
            if !matches!(&e, MapError::KeyNotFound) {
                warn!(endpoint_id = id, error = %e, "cannot remove the dm_listeners entry");
            }
        }
    }

    /// Read-modify-write of the settings entry. Only the fields `f` touches change, so a
    /// `datamesh-agent fastpath` toggle and the heartbeat writer do not undo each other.
    pub fn update_settings(
        &self,
        f: impl FnOnce(&mut Settings),
    ) -> Result<Settings, DataplaneError> {
        let mut map = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        update_settings_in(&mut map, f)
    }

    /// The capture's record of a connection: in our `dm_conns`, or, while a zero-error upgrade
    /// across a layout change runs, in the other build's (converted by field name).
    pub fn conn_info(&self, key: &FlowKey) -> Option<ConnInfo> {
        match self.conns.get(key, 0) {
            Ok(v) => Some(v),
            Err(_) => self.foreign_conn_info(key),
        }
    }

    fn foreign_conn_info(&self, key: &FlowKey) -> Option<ConnInfo> {
        use crate::carryover::{convert, layout, lookup_raw, Carry};
        let mut f = self.foreign_conns.lock().unwrap_or_else(|p| p.into_inner());
        // The pin is looked at again at most every 100 ms (misses of uncaptured clients must
        // stay cheap).
        let stale = f
            .checked
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if stale {
            f.checked = Some(std::time::Instant::now());
            f.map = None;
            let ours = self.conns.map().info().ok().map(|i| i.id());
            if let Ok(pinned) = MapData::from_pin(self.pin_dir.join(MAP_CONNS)) {
                let theirs = pinned.info().ok().map(|i| i.id());
                if theirs.is_some() && theirs != ours {
                    let our_fd = self.conns.map().fd().as_fd().as_raw_fd();
                    if let (Ok(tl), Ok(ol)) =
                        (layout(pinned.fd().as_fd().as_raw_fd()), layout(our_fd))
                    {
                        if tl.key == ol.key && tl.key_size == std::mem::size_of::<FlowKey>() {
                            f.map = Some((pinned, tl, ol));
                        }
                    }
                }
            }
        }
        let (map, tl, ol) = f.map.as_ref()?;
        // SAFETY: FlowKey is #[repr(C)] plain integers with explicit padding (aya::Pod).
        let kb = unsafe {
            std::slice::from_raw_parts(
                (key as *const FlowKey).cast::<u8>(),
                std::mem::size_of::<FlowKey>(),
            )
        };
        let mut raw = vec![0u8; tl.value_size];
        if !lookup_raw(map.fd().as_fd().as_raw_fd(), kb, &mut raw) {
            return None;
        }
        let mut ours = vec![0u8; std::mem::size_of::<ConnInfo>()];
        convert(tl, ol, Carry::IfAbsent, &raw, &mut ours);
        // SAFETY: `ours` holds size_of::<ConnInfo>() bytes; ConnInfo is plain integers
        // (aya::Pod), valid for any bytes; read_unaligned has no alignment need.
        Some(unsafe { std::ptr::read_unaligned(ours.as_ptr().cast::<ConnInfo>()) })
    }

    /// Moves a fast-path connection back to TCP (a drain closes it next): sk_msg then lets
    /// both directions' bytes take TCP, so the proxy's last reply and its FIN arrive
    /// together. Safe in this direction: redirected bytes are delivered when they are sent,
    /// and the receiver reads its redirected queue before its TCP queue. Only an existing
    /// entry is updated (`BPF_EXIST`), so a connection already gone is not recreated.
    pub fn conn_to_tcp(&self, key: &FlowKey) -> Result<(), DataplaneError> {
        let mut map = self.conns_w.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(mut info) = map.get(key, 0) else {
            return Ok(());
        };
        if info.fastpath == FASTPATH_TCP {
            return Ok(());
        }
        info.fastpath = FASTPATH_TCP;
        // BPF_EXIST (linux/bpf.h): update an existing element only.
        const BPF_EXIST: u64 = 2;
        map.insert(key, info, BPF_EXIST)
            .map_err(|source| DataplaneError::MapOp {
                name: MAP_CONNS,
                action: "write",
                source,
            })
    }
}

fn update_settings_in(
    map: &mut Array<MapData, Settings>,
    f: impl FnOnce(&mut Settings),
) -> Result<Settings, DataplaneError> {
    let mut s = map.get(&0, 0).map_err(|source| DataplaneError::MapOp {
        name: MAP_SETTINGS,
        action: "read",
        source,
    })?;
    f(&mut s);
    map.set(0, s, 0).map_err(|source| DataplaneError::MapOp {
        name: MAP_SETTINGS,
        action: "write",
        source,
    })?;
    Ok(s)
}

/// Opens a pinned map and checks its key and value size against the typed view.
pub fn open_typed<T>(pin_dir: &Path, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_dir.join(name);
    let err = |source| DataplaneError::Map {
        name,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    let map = Map::from_map_data(data).map_err(err)?;
    T::try_from(map).map_err(err)
}

/// The running data plane: its mode, the map handles and the links this process holds.
pub struct Dataplane {
    pub mode: Mode,
    pub maps: Maps,
    /// Held so the links stay referenced while the agent runs; they are pinned, so dropping
    /// these never detaches anything.
    pub links: Vec<FdLink>,
}

/// What the agent writes into the maps at start-up.
pub struct DesiredState {
    pub settings: Settings,
    pub endpoints: Vec<(EndpointKey, EndpointValue)>,
    /// (endpoint id, listening socket) of every endpoint served; the descriptors must stay
    /// open for the call. Written before the endpoints, and other ids' entries are removed.
    pub listeners: Vec<(u32, RawFd)>,
}

/// Brings the data plane up at `pin_dir` for `cgroup_path` (adopt, fresh attach or upgrade),
/// then writes `desired` into the maps before any new program is attached.
pub fn setup(
    object: &[u8],
    pin_dir: &Path,
    cgroup_path: &Path,
    desired: &DesiredState,
) -> Result<Dataplane, DataplaneError> {
    let links_dir = pin_dir.join(LINKS_SUBDIR);
    for dir in [pin_dir, links_dir.as_path()] {
        std::fs::create_dir_all(dir).map_err(|source| DataplaneError::Io {
            action: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let expected = expected_maps(object)?;

    // 1. Are the pinned maps of this build's layout?
    let verdict = inspect_maps(pin_dir, &expected);
    // The old maps of another layout, held open to carry their entries over (step 9).
    let mut old_maps: StdHashMap<String, std::os::fd::OwnedFd> = StdHashMap::new();
    let replaced_maps = matches!(verdict, MapsVerdict::Incompatible(_));
    let maps_reused = match &verdict {
        MapsVerdict::Compatible => true,
        MapsVerdict::Absent => false,
        MapsVerdict::Incompatible(reason) => {
            warn!(%reason, pin_dir = %pin_dir.display(), "pinned maps have another layout: unpinning them so new maps are created (old programs keep theirs until detached); their entries are carried over by field name");
            for (name, _) in crate::carryover::CARRIED {
                let p = pin_dir.join(name);
                if let Ok(m) = MapData::from_pin(&p) {
                    if let Ok(fd) = m.fd().as_fd().try_clone_to_owned() {
                        old_maps.insert(name.to_string(), fd);
                    }
                }
            }
            for name in ALL_MAPS {
                let p = pin_dir.join(name);
                match std::fs::remove_file(&p) {
                    Ok(()) => debug!(path = %p.display(), "unpinned old map"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(DataplaneError::Io {
                            action: "unpinning",
                            path: p,
                            source,
                        })
                    }
                }
            }
            false
        }
    };

    // 2. The pinned links, if any (held open: they keep the old programs attached until the
    //    new ones are pinned over them).
    let mut old_links: Vec<(&'static str, Option<FdLink>)> = Vec::new();
    for name in CGROUP_PROGS {
        let p = links_dir.join(name);
        let link = if p.exists() {
            match aya::programs::links::PinnedLink::from_pin(&p) {
                Ok(l) => Some(FdLink::from(l)),
                Err(e) => {
                    warn!(path = %p.display(), error = %e, "cannot open pinned link: it will be replaced");
                    None
                }
            }
        } else {
            None
        };
        old_links.push((name, link));
    }

    // 3. Load the object (maps from pins, or created and pinned) and its programs.
    let mut loader = EbpfLoader::new();
    for name in ALL_MAPS {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader
        .load(object)
        .map_err(|source| DataplaneError::Load { source })?;
    for name in CGROUP_PROGS.iter().copied().chain([PROG_SKMSG]) {
        load_program(&mut ebpf, name)?;
    }

    // 4. Write settings and endpoints before any new program can run. The heartbeat is stamped
    //    now, not when `desired` was made: loading and verifying the programs above can take
    //    longer than failopen_after_ms (a debug build on a busy node), and a heartbeat already
    //    stale when written makes the first connects fail open until the next beat.
    let maps = Maps::open(pin_dir)?;
    let mut stamped = DesiredState {
        settings: desired.settings,
        endpoints: desired.endpoints.clone(),
        listeners: desired.listeners.clone(),
    };
    if stamped.settings.heartbeat_ns != 0 {
        stamped.settings.heartbeat_ns = monotonic_ns();
    }
    write_desired(&maps, &stamped)?;

    // 5. Adopt if every pinned link runs this object's program on these maps.
    let adopt_reason = if maps_reused {
        adoptable(&ebpf, &old_links, pin_dir, cgroup_path)
    } else {
        Err("maps were (re)created".to_string())
    };
    match adopt_reason {
        Ok(()) => {
            info!(pin_dir = %pin_dir.display(), "adopted pinned links and maps: nothing attached or detached");
            // The verification copies of the programs are unloaded when `ebpf` drops.
            drop(ebpf);
            let links = old_links.into_iter().filter_map(|(_, l)| l).collect();
            return Ok(Dataplane {
                mode: Mode::Adopted,
                maps,
                links,
            });
        }
        Err(reason) => {
            if old_links.iter().any(|(_, l)| l.is_some()) {
                info!(%reason, "pinned data plane differs from this build: upgrading (new links attached before old ones are dropped)");
            }
        }
    }
    let had_links = old_links.iter().any(|(_, l)| l.is_some()) || replaced_maps;

    // 6. sk_msg first, so every socket sock_ops inserts already has it (a socket keeps the
    //    programs it was inserted with).
    attach_skmsg(&mut ebpf, pin_dir)?;

    // 7. Attach the new cgroup programs (the old links, if any, are still attached).
    let cgroup = File::open(cgroup_path).map_err(|source| DataplaneError::Cgroup {
        path: cgroup_path.to_path_buf(),
        source,
    })?;
    let mut new_links = Vec::new();
    for name in CGROUP_PROGS {
        new_links.push((name, attach_cgroup(&mut ebpf, name, &cgroup)?));
    }

    // 8. Pin each new link over the old pin: pin to a temporary name, then rename over (bpffs
    //    supports rename), so the path always names an attached link.
    let mut held = Vec::new();
    for (name, link) in new_links {
        let final_path = links_dir.join(name);
        // bpffs refuses names with a dot, hence the underscore.
        let tmp = links_dir.join(format!("{name}_next"));
        let _ = std::fs::remove_file(&tmp);
        let pinned = link.pin(&tmp).map_err(|source| DataplaneError::PinLink {
            name,
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &final_path).map_err(|source| DataplaneError::Io {
            action: "renaming link pin to",
            path: final_path.clone(),
            source,
        })?;
        held.push(FdLink::from(pinned));
    }
    // 9. Only now let the old links go. Their pins are gone, but a draining old agent (a
    //    zero-error upgrade) still holds them open: detach them explicitly, so the old
    //    programs stop at once instead of running beside the new ones until it exits.
    let dropped = old_links.iter().filter(|(_, l)| l.is_some()).count();
    for (name, link) in &old_links {
        let Some(link) = link else { continue };
        match link.info() {
            Ok(i) => {
                if let Err(e) = crate::carryover::detach_link(i.id()) {
                    warn!(link = name, error = %e, "could not detach the old link (it stops when its last holder exits)");
                }
            }
            Err(e) => warn!(link = name, error = %e, "old link info"),
        }
    }
    drop(old_links);
    // 10. The old programs are detached: carry what their maps hold into the new ones.
    if !old_maps.is_empty() {
        let new_maps: Vec<(String, MapData)> = crate::carryover::CARRIED
            .iter()
            .filter_map(|(n, _)| {
                MapData::from_pin(pin_dir.join(n))
                    .ok()
                    .map(|m| (n.to_string(), m))
            })
            .collect();
        let new_fds = new_maps
            .iter()
            .map(|(n, m)| (n.clone(), m.fd().as_fd().as_raw_fd()))
            .collect();
        crate::carryover::carry_over(&old_maps, &new_fds);
        drop(old_maps);
    }
    drop(ebpf);
    let mode = if had_links {
        Mode::Upgraded
    } else {
        Mode::Attached
    };
    info!(mode = mode.as_str(), cgroup = %cgroup_path.display(), pin_dir = %pin_dir.display(), old_links_dropped = dropped, maps_reused, "data plane attached and pinned");
    Ok(Dataplane {
        mode,
        maps,
        links: held,
    })
}

/// Loads (verifies) one program by its type; nothing is attached.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DataplaneError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::ProgramMissing { name })?;
    let res = match prog {
        aya::programs::Program::CgroupSockAddr(p) => p.load(),
        aya::programs::Program::SockOps(p) => p.load(),
        aya::programs::Program::SkMsg(p) => p.load(),
        _ => {
            return Err(DataplaneError::Program {
                name,
                action: "type check",
                source: ProgramError::UnexpectedProgramType,
            })
        }
    };
    res.map_err(|source| DataplaneError::Program {
        name,
        action: "load (verifier)",
        source,
    })
}

fn attach_skmsg(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), DataplaneError> {
    let socks: SockHash<MapData, FlowKey> = open_typed(pin_dir, MAP_SOCKS)?;
    let prog: &mut SkMsg = ebpf
        .program_mut(PROG_SKMSG)
        .ok_or(DataplaneError::ProgramMissing { name: PROG_SKMSG })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name: PROG_SKMSG,
            action: "type",
            source,
        })?;
    let id = prog
        .attach(socks.fd())
        .map_err(|source| DataplaneError::Program {
            name: PROG_SKMSG,
            action: "attach to dm_socks",
            source,
        })?;
    let link = prog
        .take_link(id)
        .map_err(|source| DataplaneError::Program {
            name: PROG_SKMSG,
            action: "take link",
            source,
        })?;
    // The sk_msg attachment is owned by the map (it cannot be pinned): dropping aya's handle
    // would detach it, so the handle is deliberately leaked and the program lives as long as
    // dm_socks does. A later attach replaces it.
    std::mem::forget(link);
    Ok(())
}

fn attach_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
) -> Result<FdLink, DataplaneError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::ProgramMissing { name })?;
    let perr = |action, source| DataplaneError::Program {
        name,
        action,
        source,
    };
    let lerr = |source| DataplaneError::Link {
        name,
        action: "into fd link",
        source,
    };
    // Single is the mode aya 0.14's bpf_link cgroup attach accepts; the kernel still allows
    // several links on one cgroup, which is what makes attach-new-then-drop-old work.
    if let Ok(p) = <&mut CgroupSockAddr>::try_from(&mut *prog) {
        let id = p
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|e| perr("attach to cgroup", e))?;
        let link = p.take_link(id).map_err(|e| perr("take link", e))?;
        return FdLink::try_from(link).map_err(lerr);
    }
    let p: &mut SockOps = prog.try_into().map_err(|e| perr("type", e))?;
    let id = p
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|e| perr("attach to cgroup", e))?;
    let link = p.take_link(id).map_err(|e| perr("take link", e))?;
    FdLink::try_from(link).map_err(lerr)
}

/// Why the pinned links cannot be adopted, or Ok.
fn adoptable(
    ebpf: &Ebpf,
    old_links: &[(&'static str, Option<FdLink>)],
    pin_dir: &Path,
    cgroup_path: &Path,
) -> Result<(), String> {
    let cgroup =
        File::open(cgroup_path).map_err(|e| format!("cgroup {}: {e}", cgroup_path.display()))?;
    let pinned_ids: StdHashMap<String, u32> = ALL_MAPS
        .iter()
        .filter_map(|n| {
            MapInfo::from_pin(pin_dir.join(n))
                .ok()
                .map(|i| (n.to_string(), i.id()))
        })
        .collect();
    for (name, link) in old_links {
        let link = link
            .as_ref()
            .ok_or_else(|| format!("link pin {name} missing"))?;
        let link_info = link.info().map_err(|e| format!("link {name}: {e}"))?;
        let old = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == link_info.program_id())
            .ok_or_else(|| format!("program behind link {name} not found"))?;
        let new = ebpf
            .program(name)
            .ok_or_else(|| format!("object has no {name}"))?
            .info()
            .map_err(|e| format!("info of new {name}: {e}"))?;
        if old.name_as_str() != new.name_as_str() || old.tag() != new.tag() {
            return Err(format!(
                "{name}: pinned program {:?} tag {:016x}, this build {:?} tag {:016x}",
                old.name_as_str(),
                old.tag(),
                new.name_as_str(),
                new.tag()
            ));
        }
        // The link must be attached to the configured cgroup (cgroup_path may have changed).
        let attached = cgroup_prog_ids(&cgroup, cgroup_attach_type(name))
            .map_err(|e| format!("querying programs of {}: {e}", cgroup_path.display()))?;
        if !attached.contains(&link_info.program_id()) {
            return Err(format!(
                "{name} is attached to another cgroup than {}",
                cgroup_path.display()
            ));
        }
        // The pinned program must use the pinned maps (not maps orphaned by an interrupted upgrade).
        if let Ok(Some(ids)) = old.map_ids() {
            for id in ids {
                let Ok(mi) = MapInfo::from_id(id) else {
                    continue;
                };
                let Some(mname) = mi.name_as_str() else {
                    continue;
                };
                if let Some(pid) = pinned_ids.get(mname) {
                    if *pid != id {
                        return Err(format!("{name} uses a {mname} that is not the pinned one"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The kernel's `bpf_attach_type` of each cgroup program.
fn cgroup_attach_type(prog: &str) -> u32 {
    const BPF_CGROUP_SOCK_OPS: u32 = 3;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_CGROUP_INET6_CONNECT: u32 = 11;
    match prog {
        PROG_CONNECT4 => BPF_CGROUP_INET4_CONNECT,
        PROG_CONNECT6 => BPF_CGROUP_INET6_CONNECT,
        _ => BPF_CGROUP_SOCK_OPS,
    }
}

/// Ids of the programs attached directly to `cgroup` for `attach_type` (BPF_PROG_QUERY; aya
/// 0.14 has no public query for cgroup programs).
fn cgroup_prog_ids(cgroup: &File, attach_type: u32) -> std::io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut ids = vec![0u32; 64];
    // union bpf_attr, `query` member: target_fd u32 @0, attach_type u32 @4, query_flags u32 @8,
    // attach_flags u32 @12, prog_ids u64 @16, prog_cnt u32 @24, then fields we leave zero.
    let mut attr = [0u8; 72];
    attr[0..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    // SAFETY: bpf(2) reads the attr buffer (72 bytes, as passed) and writes at most prog_cnt
    // u32 ids into `ids`, which outlives the call, and the count back into `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let cnt = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
    ids.truncate(cnt.min(ids.len()));
    Ok(ids)
}

/// Type, key size, value size and max entries of each map, as the object defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapShape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn expected_maps(object: &[u8]) -> Result<StdHashMap<String, MapShape>, DataplaneError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DataplaneError::ObjectParse {
        reason: e.to_string(),
    })?;
    let mut out = StdHashMap::new();
    for name in ALL_MAPS {
        let m = obj
            .maps
            .get(name)
            .ok_or_else(|| DataplaneError::ObjectParse {
                reason: format!("map {name} missing"),
            })?;
        out.insert(
            name.to_string(),
            MapShape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
            },
        );
    }
    Ok(out)
}

enum MapsVerdict {
    /// No map is pinned.
    Absent,
    /// Every map is pinned with this build's shape and ABI version.
    Compatible,
    Incompatible(String),
}

fn inspect_maps(pin_dir: &Path, expected: &StdHashMap<String, MapShape>) -> MapsVerdict {
    let present: Vec<&str> = ALL_MAPS
        .iter()
        .copied()
        .filter(|n| pin_dir.join(n).exists())
        .collect();
    if present.is_empty() {
        return MapsVerdict::Absent;
    }
    for name in ALL_MAPS {
        let info = match MapInfo::from_pin(pin_dir.join(name)) {
            Ok(i) => i,
            Err(e) => {
                return MapsVerdict::Incompatible(format!("{name}: not pinned or unreadable ({e})"))
            }
        };
        let Some(want) = expected.get(name) else {
            continue;
        };
        // aya's MapType discriminants are the kernel's BPF_MAP_TYPE_* numbers.
        let map_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let got = MapShape {
            map_type,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if got != *want {
            return MapsVerdict::Incompatible(format!(
                "{name}: pinned {got:?}, this build {want:?}"
            ));
        }
    }
    match open_typed::<Array<MapData, Settings>>(pin_dir, MAP_SETTINGS).and_then(|a| {
        a.get(&0, 0).map_err(|source| DataplaneError::MapOp {
            name: MAP_SETTINGS,
            action: "read",
            source,
        })
    }) {
        Ok(s) if s.abi_version == ABI_VERSION => MapsVerdict::Compatible,
        Ok(s) => MapsVerdict::Incompatible(format!(
            "dm_settings abi_version {} != {ABI_VERSION}",
            s.abi_version
        )),
        Err(e) => MapsVerdict::Incompatible(format!("dm_settings unreadable: {e}")),
    }
}

/// A restarted worker of the same supervisor (same binary and object, which its predecessor
/// already set up): opens the pinned maps and writes `desired` without loading and verifying
/// the programs again (that costs ~200 ms of a debug build's restart). The heartbeat stays as
/// the supervisor wrote it. `None` when anything is missing or of another layout: then the
/// caller does the full [`setup`].
pub fn reopen(pin_dir: &Path, desired: &DesiredState) -> Option<Dataplane> {
    let links_dir = pin_dir.join(LINKS_SUBDIR);
    if !CGROUP_PROGS.iter().all(|n| links_dir.join(n).exists()) {
        return None;
    }
    let maps = Maps::open(pin_dir).ok()?;
    let current = maps
        .settings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&0, 0)
        .ok()?;
    if current.abi_version != ABI_VERSION {
        return None;
    }
    let mut d = DesiredState {
        settings: desired.settings,
        endpoints: desired.endpoints.clone(),
        listeners: desired.listeners.clone(),
    };
    d.settings.heartbeat_ns = current.heartbeat_ns;
    write_desired(&maps, &d).ok()?;
    info!(pin_dir = %pin_dir.display(), "worker restart: reopened the pinned maps (links stay pinned)");
    Some(Dataplane {
        mode: Mode::Adopted,
        maps,
        links: Vec::new(),
    })
}

fn write_desired(maps: &Maps, desired: &DesiredState) -> Result<(), DataplaneError> {
    // Listeners first: an endpoint entry is never rewritten to a port whose listener the
    // programs cannot see (they would fail open, not refuse, but capture would have a gap).
    for (id, fd) in &desired.listeners {
        maps.set_listener(*id, *fd)?;
    }
    {
        let mut settings = maps.settings.lock().unwrap_or_else(|p| p.into_inner());
        settings
            .set(0, desired.settings, 0)
            .map_err(|source| DataplaneError::MapOp {
                name: MAP_SETTINGS,
                action: "write",
                source,
            })?;
    }
    let mut eps = maps.endpoints.lock().unwrap_or_else(|p| p.into_inner());
    for (k, v) in &desired.endpoints {
        eps.insert(k, v, 0)
            .map_err(|source| DataplaneError::MapOp {
                name: MAP_ENDPOINTS,
                action: "insert",
                source,
            })?;
    }
    let stale: Vec<EndpointKey> = eps
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !desired.endpoints.iter().any(|(d, _)| d == k))
        .collect();
    for k in stale {
        debug!(?k, "removing endpoint no longer configured");
        let _ = eps.remove(&k);
    }
    drop(eps);
    // Entries of endpoints this agent does not serve (a previous agent's, whose supervisor
    // still lives, or a reload's): a connect to such an id must not be rewritten.
    let stale: Vec<u32> = {
        let map = maps.listeners.lock().unwrap_or_else(|p| p.into_inner());
        map.keys()
            .filter_map(Result::ok)
            .filter(|id| !desired.listeners.iter().any(|(d, _)| d == id))
            .collect()
    };
    for id in stale {
        debug!(
            endpoint_id = id,
            "removing a listener entry of an endpoint not served"
        );
        maps.remove_listener(id);
    }
    Ok(())
}

/// Address family and the four address words in network byte order, v4-mapped folded to v4.
pub fn addr_words(ip: IpAddr) -> (u16, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => addr_words(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (AF_INET6, [w(0), w(4), w(8), w(12)])
            }
        },
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(family: u32, words: [u32; 4]) -> Option<IpAddr> {
    match family as u16 {
        AF_INET => Some(IpAddr::from(words[0].to_ne_bytes())),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::from(o))
        }
        _ => None,
    }
}

pub fn endpoint_key(addr: SocketAddr) -> EndpointKey {
    let (family, words) = addr_words(addr.ip());
    EndpointKey {
        family,
        port: addr.port(),
        _pad0: 0,
        addr: words,
    }
}

pub fn endpoint_value(id: u32, proxy: SocketAddr) -> EndpointValue {
    let (family, words) = addr_words(proxy.ip());
    EndpointValue {
        id,
        proxy_port: proxy.port(),
        proxy_family: family,
        proxy_addr: words,
        flags: 0,
        _pad0: 0,
    }
}

/// The `dm_endpoints` entry of a proxy listener itself (`local`, the bound address), pointing
/// at itself with [`ENDPOINT_LISTENER`]: pods that dial it directly are recorded and
/// rate-limited like captured ones, and not rewritten.
pub fn listener_entry(id: u32, local: SocketAddr) -> (EndpointKey, EndpointValue) {
    let mut v = endpoint_value(id, local);
    v.flags = ENDPOINT_LISTENER;
    (endpoint_key(local), v)
}

/// Both `dm_endpoints` entries of an endpoint: its service address (rewritten to the
/// listener) and the listener address (direct dials, recorded).
pub fn endpoint_entries(
    id: u32,
    address: SocketAddr,
    local: SocketAddr,
) -> [(EndpointKey, EndpointValue); 2] {
    [
        (endpoint_key(address), endpoint_value(id, local)),
        listener_entry(id, local),
    ]
}

/// The key under which sock_ops stored a proxied connection: the pod's view (src = pod = the
/// accepted socket's peer, dst = the proxy listener = its local address).
pub fn flow_key(peer: SocketAddr, local: SocketAddr) -> FlowKey {
    let (family, src) = addr_words(peer.ip());
    let (_, dst) = addr_words(local.ip());
    FlowKey {
        family: family as u32,
        src_port: peer.port() as u32,
        dst_port: local.port() as u32,
        _pad0: 0,
        src_addr: src,
        dst_addr: dst,
    }
}

pub fn settings_flags(fastpath: bool, selected: bool) -> u32 {
    SETTINGS_CAPTURE
        | if fastpath { SETTINGS_FASTPATH } else { 0 }
        | if selected {
            SETTINGS_CAPTURE_SELECTED
        } else {
            0
        }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        // CLOCK_MONOTONIC cannot fail on Linux; 0 would read as "heartbeat stale" (fail open).
        Err(_) => 0,
    }
}

/// `fastpath on|off`: flips SETTINGS_FASTPATH in the pinned settings (read-modify-write).
pub fn set_fastpath(pin_dir: &Path, on: bool) -> Result<Settings, DataplaneError> {
    let mut map: Array<MapData, Settings> = open_typed(pin_dir, MAP_SETTINGS)?;
    let s = map.get(&0, 0).map_err(|source| DataplaneError::MapOp {
        name: MAP_SETTINGS,
        action: "read",
        source,
    })?;
    if s.abi_version != ABI_VERSION {
        return Err(DataplaneError::AbiMismatch {
            pin_dir: pin_dir.to_path_buf(),
            found: s.abi_version,
        });
    }
    update_settings_in(&mut map, |s| {
        if on {
            s.flags |= SETTINGS_FASTPATH;
        } else {
            s.flags &= !SETTINGS_FASTPATH;
        }
    })
}

/// `uninstall`: unpins the links (the programs detach once no process holds them), removes every
/// map pin and the pin directory. Idempotent. Returns the paths it removed.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    let mut removed = Vec::new();
    let links_dir = pin_dir.join(LINKS_SUBDIR);
    let remove = |p: PathBuf, removed: &mut Vec<PathBuf>| -> Result<(), DataplaneError> {
        match std::fs::remove_file(&p) {
            Ok(()) => {
                removed.push(p);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DataplaneError::Io {
                action: "removing",
                path: p,
                source,
            }),
        }
    };
    // Links first, so capture stops before the maps it reads disappear from the pin dir.
    for name in CGROUP_PROGS {
        remove(links_dir.join(name), &mut removed)?;
        remove(links_dir.join(format!("{name}_next")), &mut removed)?;
    }
    for name in ALL_MAPS {
        remove(pin_dir.join(name), &mut removed)?;
    }
    for dir in [links_dir, pin_dir.to_path_buf()] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DataplaneError::Io {
                    action: "removing directory (not ours if it holds other pins)",
                    path: dir,
                    source,
                })
            }
        }
    }
    Ok(removed)
}

pub type PodCountersMap = HashMap<MapData, u64, PodCounters>;
pub type PodStateMap = HashMap<MapData, u64, PodState>;

/// Opens the per-pod maps read-only for the `pods` table (works with the agent dead).
pub fn open_pod_maps(pin_dir: &Path) -> Result<(PodCountersMap, PodStateMap), DataplaneError> {
    Ok((
        open_typed(pin_dir, MAP_POD_COUNTERS)?,
        open_typed(pin_dir, MAP_POD_STATE)?,
    ))
}

/// The data plane's metrics: heartbeats written and how it came up.
#[derive(Default)]
pub struct DataplaneMetrics {
    pub heartbeats: Counter,
}

impl DataplaneMetrics {
    pub fn register(&self, registry: &mut Registry, mode: Mode) {
        registry.register(
            "dataplane_heartbeats",
            "Heartbeats written to dm_settings",
            self.heartbeats.clone(),
        );
        registry.register(
            "dataplane",
            "How the data plane came up (attached, adopted, upgraded)",
            Info::new(vec![("mode".to_string(), mode.as_str().to_string())]),
        );
    }
}

/// Writes `heartbeat_ns = now` every `interval` (read-modify-write, so toggles made with
/// `datamesh-agent fastpath` stick) until `stop` turns true.
pub fn spawn_heartbeat(
    maps: Arc<Maps>,
    interval: Duration,
    metrics: Arc<DataplaneMetrics>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = tick.tick() => {
                    let now = monotonic_ns();
                    match maps.update_settings(|s| s.heartbeat_ns = now) {
                        Ok(_) => {
                            metrics.heartbeats.inc();
                            if failing {
                                info!("heartbeat writes recovered");
                                failing = false;
                            }
                        }
                        Err(e) if !failing => {
                            warn!(error = %e, "heartbeat write failed: capture will fail open");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_words_are_network_order_bytes() {
        let (fam, w) = addr_words(IpAddr::V4(Ipv4Addr::new(198, 19, 3, 1)));
        assert_eq!(fam, AF_INET);
        assert_eq!(w[0].to_ne_bytes(), [198, 19, 3, 1]);
        assert_eq!(&w[1..], &[0, 0, 0]);
        assert_eq!(
            words_addr(AF_INET as u32, w),
            Some(IpAddr::V4(Ipv4Addr::new(198, 19, 3, 1)))
        );
    }

    #[test]
    fn v4_mapped_folds() {
        let mapped: IpAddr = "::ffff:198.19.3.1".parse().expect("ip");
        assert_eq!(
            addr_words(mapped),
            addr_words(IpAddr::V4(Ipv4Addr::new(198, 19, 3, 1)))
        );
        let v6: IpAddr = "fd00::1".parse().expect("ip");
        let (fam, w) = addr_words(v6);
        assert_eq!(fam, AF_INET6);
        assert_eq!(words_addr(fam as u32, w), Some(v6));
    }

    #[test]
    fn flow_key_is_pod_view() {
        let peer: SocketAddr = "198.18.3.10:40000".parse().expect("addr");
        let local: SocketAddr = "198.18.3.1:40123".parse().expect("addr");
        let k = flow_key(peer, local);
        assert_eq!(k.family, AF_INET as u32);
        assert_eq!((k.src_port, k.dst_port), (40000, 40123));
        assert_eq!(k.src_addr[0].to_ne_bytes(), [198, 18, 3, 10]);
        assert_eq!(k.dst_addr[0].to_ne_bytes(), [198, 18, 3, 1]);
    }

    #[test]
    fn endpoint_entries() {
        let k = endpoint_key("198.19.3.1:6379".parse().expect("addr"));
        assert_eq!((k.family, k.port), (AF_INET, 6379));
        let v = endpoint_value(2, "198.18.3.1:40123".parse().expect("addr"));
        assert_eq!((v.id, v.proxy_port, v.proxy_family), (2, 40123, AF_INET));
        assert_eq!(v.flags, 0);
        // The listener's own entry points at itself and is flagged.
        let local: SocketAddr = "198.18.3.1:40123".parse().expect("addr");
        let [svc, (lk, lv)] =
            super::endpoint_entries(2, "198.19.3.1:6379".parse().expect("a"), local);
        assert_eq!(svc.0, k);
        assert_eq!(lk, endpoint_key(local));
        assert_eq!((lv.proxy_port, lv.proxy_addr), (v.proxy_port, v.proxy_addr));
        assert_eq!(lv.flags, ENDPOINT_LISTENER);
    }

    #[test]
    fn monotonic_is_nonzero() {
        assert!(monotonic_ns() > 0);
    }
}
