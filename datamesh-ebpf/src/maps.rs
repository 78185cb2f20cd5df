//! The BTF maps of the data plane and the per-pod counter helpers.
//!
//! Names, key/value types and sizes come from `datamesh-common` (the ABI the agent pins and
//! reads with aya). The `#[btf_map(name = ..)]` attribute needs a literal, so each literal is
//! checked against the ABI constant at compile time below.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, HashMap, LruHashMap, SockHash},
    macros::btf_map,
};
use datamesh_common::{
    ConnInfo, EndpointKey, EndpointValue, FlowKey, PodCounters, PodPolicy, PodState, RateState,
    Settings, SockOrig, CONNS_MAX, ENDPOINTS_MAX, LISTENERS_MAX, NETNS_CGROUP_MAX, PODS_MAX,
    SETTINGS_ENTRIES, SOCKS_MAX, SOCK_ORIG_MAX,
};

#[btf_map(name = "dm_settings")]
pub static SETTINGS: Array<Settings, { SETTINGS_ENTRIES as usize }> = Array::new();

#[btf_map(name = "dm_endpoints")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointValue, { ENDPOINTS_MAX as usize }> =
    HashMap::new();

#[btf_map(name = "dm_sock_orig")]
pub static SOCK_ORIG: LruHashMap<u64, SockOrig, { SOCK_ORIG_MAX as usize }> = LruHashMap::new();

#[btf_map(name = "dm_conns")]
pub static CONNS: LruHashMap<FlowKey, ConnInfo, { CONNS_MAX as usize }> = LruHashMap::new();

#[btf_map(name = "dm_socks")]
pub static SOCKS: SockHash<FlowKey, { SOCKS_MAX as usize }> = SockHash::new();

#[btf_map(name = "dm_pod_counters")]
pub static POD_COUNTERS: HashMap<u64, PodCounters, { PODS_MAX as usize }> = HashMap::new();

#[btf_map(name = "dm_pod_policy")]
pub static POD_POLICY: HashMap<u64, PodPolicy, { PODS_MAX as usize }> = HashMap::new();

/// Written only by the agent; defined here so the object carries it with its BTF and the
/// agent pins it together with the others.
#[btf_map(name = "dm_pod_state")]
pub static POD_STATE: HashMap<u64, PodState, { PODS_MAX as usize }> = HashMap::new();

#[btf_map(name = "dm_pod_rate")]
pub static POD_RATE: LruHashMap<u64, RateState, { PODS_MAX as usize }> = LruHashMap::new();

/// netns cookie -> cgroup id of the last process that connected from it: how the agent maps a
/// network namespace to its kubelet pod (cgroup id -> pod UID -> namespace/name).
#[btf_map(name = "dm_netns_cgroup")]
pub static NETNS_CGROUP: LruHashMap<u64, u64, { NETNS_CGROUP_MAX as usize }> = LruHashMap::new();

/// endpoint id -> the proxy's listening socket of that endpoint, inserted by the agent's worker.
/// The kernel drops a closed socket from the map, so an entry exists exactly while some process
/// (the supervisor, a worker) still holds the listener open: connect4/6 rewrite only then.
#[btf_map(name = "dm_listeners")]
pub static LISTENERS: SockHash<u32, { LISTENERS_MAX as usize }> = SockHash::new();

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// The attribute literals above must be the ABI's names (the agent opens the maps by them).
const _: () = {
    use datamesh_common as c;
    assert!(str_eq("dm_settings", c::MAP_SETTINGS));
    assert!(str_eq("dm_endpoints", c::MAP_ENDPOINTS));
    assert!(str_eq("dm_sock_orig", c::MAP_SOCK_ORIG));
    assert!(str_eq("dm_conns", c::MAP_CONNS));
    assert!(str_eq("dm_socks", c::MAP_SOCKS));
    assert!(str_eq("dm_pod_counters", c::MAP_POD_COUNTERS));
    assert!(str_eq("dm_pod_policy", c::MAP_POD_POLICY));
    assert!(str_eq("dm_pod_state", c::MAP_POD_STATE));
    assert!(str_eq("dm_pod_rate", c::MAP_POD_RATE));
    assert!(str_eq("dm_netns_cgroup", c::MAP_NETNS_CGROUP));
    assert!(str_eq("dm_listeners", c::MAP_LISTENERS));
    assert!(c::ALL_MAPS.len() == 11);
};

/// Which `PodCounters` field a program bumps.
#[derive(Clone, Copy)]
pub enum Counter {
    ConnectsCaptured,
    ConnectsFailopen,
    ConnectsRefused,
    FastpathMsgs,
    FastpathBytes,
    FastpathMisses,
}

/// Adds `n` to one counter of the pod, creating the pod's zeroed entry first if it has none.
///
/// Counting is best effort: a full map (more than `PODS_MAX` pods) loses the count, never the
/// connection.
#[inline(always)]
pub fn count(netns_cookie: u64, counter: Counter, n: u64) {
    let entry = match POD_COUNTERS.get_ptr_mut(netns_cookie) {
        Some(p) => p,
        None => {
            // BPF_NOEXIST: when two CPUs race to create the entry, the loser's insert fails
            // and both then add into the one entry that won.
            let _ = POD_COUNTERS.insert(netns_cookie, PodCounters::default(), BPF_NOEXIST as u64);
            match POD_COUNTERS.get_ptr_mut(netns_cookie) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: `entry` is a non-null pointer to a live map value returned by the kernel; the
    // field projection stays inside it. Other CPUs and the agent write the same fields, so
    // the add is atomic.
    unsafe {
        let field: *mut u64 = match counter {
            Counter::ConnectsCaptured => addr_of_mut!((*entry).connects_captured),
            Counter::ConnectsFailopen => addr_of_mut!((*entry).connects_failopen),
            Counter::ConnectsRefused => addr_of_mut!((*entry).connects_refused),
            Counter::FastpathMsgs => addr_of_mut!((*entry).fastpath_msgs),
            Counter::FastpathBytes => addr_of_mut!((*entry).fastpath_bytes),
            Counter::FastpathMisses => addr_of_mut!((*entry).fastpath_misses),
        };
        atomic_add(field, n);
    }
}

/// `lock *(u64 *)field += n` (BPF_ATOMIC | BPF_ADD). The BPF target has no compare-and-swap,
/// so `AtomicU64::fetch_add` is not available; the intrinsic lowers to the plain atomic add.
///
/// # Safety
/// `field` must point to a live, 8-byte aligned `u64` in a map value.
#[inline(always)]
pub unsafe fn atomic_add(field: *mut u64, n: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            field, n,
        );
    }
}
