//! The map ABI shared by the eBPF programs (`datamesh-ebpf`) and the agent (`datamesh-agent`).
//!
//! Everything that crosses the kernel boundary lives here: map names, sizes, flag bits and the
//! `#[repr(C)]` key and value structs. Every struct has explicit padding fields and a `const`
//! size assertion, so that a change to a layout is a compile error on both sides until
//! [`ABI_VERSION`] is bumped with it. The agent compares that version with the one stamped in
//! the pinned settings map and replaces pinned maps of an older layout instead of reusing them.
//!
//! Byte order: IP addresses are kept in network byte order exactly as the kernel hands them
//! over (`user_ip4`, `remote_ip4`, ...); ports are kept in host byte order. An IPv4 address is
//! stored in `addr[0]` with `addr[1..4]` zero and `family == AF_INET`; v4-mapped IPv6 addresses
//! are always folded to that IPv4 form before they are used as keys.
#![cfg_attr(not(test), no_std)]

/// Version of every layout in this file. Bump it with any change to a struct, a map's key or
/// value type, or a map's meaning.
pub const ABI_VERSION: u32 = if cfg!(feature = "abi-next") {
    ABI_LAYOUT + ABI_NEXT_OFFSET
} else {
    ABI_LAYOUT
};
/// The layout version of this source tree (what [`ABI_VERSION`] is in a normal build).
const ABI_LAYOUT: u32 = 4;
/// Added to the version by the `abi-next` feature (the upgrade drill's second build).
const ABI_NEXT_OFFSET: u32 = 1000;

/// Default directory under bpffs where maps (and, under [`LINKS_SUBDIR`], links) are pinned.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/datamesh";
/// Sub-directory of the pin directory that holds the pinned cgroup links.
pub const LINKS_SUBDIR: &str = "links";

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

// ---- map names (the kernel cuts map names at 15 characters) ----
pub const MAP_SETTINGS: &str = "dm_settings";
pub const MAP_ENDPOINTS: &str = "dm_endpoints";
pub const MAP_SOCK_ORIG: &str = "dm_sock_orig";
pub const MAP_CONNS: &str = "dm_conns";
pub const MAP_SOCKS: &str = "dm_socks";
pub const MAP_POD_COUNTERS: &str = "dm_pod_counters";
pub const MAP_POD_POLICY: &str = "dm_pod_policy";
pub const MAP_POD_STATE: &str = "dm_pod_state";
pub const MAP_POD_RATE: &str = "dm_pod_rate";
pub const MAP_NETNS_CGROUP: &str = "dm_netns_cgroup";
/// SOCKHASH: endpoint id (`EndpointValue.id`, u32) → the proxy's listening socket of that
/// endpoint. connect4/6 rewrite a connect only while its endpoint's entry exists; the kernel
/// removes a socket from every sockmap when it is closed, so when the last process holding a
/// listener dies (the whole agent), capture of its endpoint fails open at once.
pub const MAP_LISTENERS: &str = "dm_listeners";

/// Every map, in the order the agent pins, checks and removes them.
pub const ALL_MAPS: [&str; 11] = [
    MAP_SETTINGS,
    MAP_ENDPOINTS,
    MAP_SOCK_ORIG,
    MAP_CONNS,
    MAP_SOCKS,
    MAP_POD_COUNTERS,
    MAP_POD_POLICY,
    MAP_POD_STATE,
    MAP_POD_RATE,
    MAP_NETNS_CGROUP,
    MAP_LISTENERS,
];

// ---- program names (function names in the object; never equal to an ELF section name) ----
pub const PROG_CONNECT4: &str = "dm_connect4";
pub const PROG_CONNECT6: &str = "dm_connect6";
pub const PROG_SOCKOPS: &str = "dm_sockops";
pub const PROG_SKMSG: &str = "dm_skmsg";
/// The programs attached to the cgroup through pinned links (sk_msg attaches to `dm_socks`).
pub const CGROUP_PROGS: [&str; 3] = [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCKOPS];

// ---- map sizes ----
pub const SETTINGS_ENTRIES: u32 = 1;
pub const ENDPOINTS_MAX: u32 = 1024;
pub const SOCK_ORIG_MAX: u32 = 65_536;
pub const CONNS_MAX: u32 = 131_072;
pub const SOCKS_MAX: u32 = 131_072;
pub const PODS_MAX: u32 = 16_384;
/// Entries of `dm_listeners`: one per endpoint (each endpoint takes two `dm_endpoints` entries).
pub const LISTENERS_MAX: u32 = ENDPOINTS_MAX / 2;

// ---- Settings.flags ----
/// Capture is on: connect4/6 rewrite connects to configured endpoints.
pub const SETTINGS_CAPTURE: u32 = 1 << 0;
/// The sockmap fast path is on: sock_ops inserts captured sockets, sk_msg redirects.
pub const SETTINGS_FASTPATH: u32 = 1 << 1;
/// Opt-in capture (`capture.mode: selected`): only a pod whose `dm_pod_policy` entry carries
/// [`POD_CAPTURE_ON`] is rewritten; a network namespace without an entry is not (fail safe).
pub const SETTINGS_CAPTURE_SELECTED: u32 = 1 << 2;

// ---- PodPolicy.flags ----
/// The pod is selected for capture (needed when [`SETTINGS_CAPTURE_SELECTED`] is set).
pub const POD_CAPTURE_ON: u32 = 1 << 0;
/// The pod is never rewritten, whatever the mode (excluded, or not selected).
pub const POD_CAPTURE_OFF: u32 = 1 << 1;

// ---- EndpointValue.flags ----
/// The key is a proxy listener itself (node proxy address and an endpoint's `proxy_port`),
/// pointing at itself: a pod's connect to it is not rewritten, but recorded (`dm_sock_orig` →
/// `dm_conns` with the pod's netns cookie) and subject to the pod's connection-rate limit, so a
/// pod that dials the proxy directly is attributed and limited like one that was captured.
/// The original destination of such a connection is the listener address ("direct").
pub const ENDPOINT_LISTENER: u32 = 1 << 0;

// ---- ConnInfo.fastpath ----
/// No byte of the pod-to-proxy direction has been sent yet.
pub const FASTPATH_UNDECIDED: u32 = 0;
/// Pod-to-proxy bytes are redirected through the sockhash.
pub const FASTPATH_REDIRECT: u32 = 1;
/// Pod-to-proxy bytes take normal TCP for the life of the connection (the first write found no
/// proxy-side socket, so switching later could reorder the stream).
pub const FASTPATH_TCP: u32 = 2;

/// One entry (key 0) of `dm_settings`, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// [`ABI_VERSION`] of the agent that created the maps.
    pub abi_version: u32,
    /// `SETTINGS_*` bits.
    pub flags: u32,
    /// `CLOCK_MONOTONIC` nanoseconds (what `bpf_ktime_get_ns` reads) of the agent's last heartbeat.
    pub heartbeat_ns: u64,
    /// Capture stops (fails open) when the heartbeat is older than this.
    pub failopen_after_ns: u64,
    /// Connects from this network namespace are never captured (the agent's own, which is the
    /// host's for a hostNetwork agent); 0 disables the check.
    pub agent_netns_cookie: u64,
    /// Sockets carrying this `SO_MARK` are never captured (the proxy's upstream sockets); 0 disables.
    pub bypass_mark: u32,
    /// Connection-rate limit for pods without a `dm_pod_policy` entry, per second; 0 = unlimited.
    pub default_conn_rate: u32,
    /// Burst for the default connection-rate limit.
    pub default_conn_burst: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 48);

/// Key of `dm_endpoints`: a cache service address as pods dial it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Port, host byte order.
    pub port: u16,
    pub _pad0: u32,
    /// Address, network byte order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 24);

/// Value of `dm_endpoints`: where captured connects to that endpoint are sent (for a
/// [`ENDPOINT_LISTENER`] entry: the listener itself, no rewrite).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    /// Index of the endpoint in the agent's config.
    pub id: u32,
    /// Proxy listener port for this endpoint, host byte order.
    pub proxy_port: u16,
    /// Family of `proxy_addr` (always the endpoint's family).
    pub proxy_family: u16,
    /// Node proxy address, network byte order; IPv4 in `proxy_addr[0]`.
    pub proxy_addr: [u32; 4],
    /// `ENDPOINT_*` bits.
    pub flags: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 32);

/// Value of `dm_sock_orig` (key: socket cookie, u64): handed from connect4/6 to sock_ops.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOrig {
    /// The destination the pod asked for.
    pub orig: EndpointKey,
    pub endpoint_id: u32,
    pub _pad0: u32,
    /// The pod: network-namespace cookie of the connecting socket.
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<SockOrig>() == 40);

/// Key of `dm_conns` and `dm_socks`: a TCP 4-tuple seen from the sending socket.
///
/// In `dm_conns` the key is the pod side's view (`src` = pod, `dst` = proxy listener), which is
/// the proxy's accepted socket's (peer, local) pair. In `dm_socks` each socket is stored under
/// its own view (`src` = local, `dst` = remote), so a lookup with the fields swapped finds the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// [`AF_INET`] or [`AF_INET6`] (v4-mapped folded to `AF_INET`).
    pub family: u32,
    /// Host byte order.
    pub src_port: u32,
    /// Host byte order.
    pub dst_port: u32,
    pub _pad0: u32,
    /// Network byte order; IPv4 in `[0]`.
    pub src_addr: [u32; 4],
    /// Network byte order; IPv4 in `[0]`.
    pub dst_addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);

/// Value of `dm_conns`: a captured connection, for the proxy (which pod, which endpoint) and
/// for sk_msg (fast-path state). Written by sock_ops at ACTIVE_ESTABLISHED, removed at close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// The destination the pod asked for.
    pub orig: EndpointKey,
    pub endpoint_id: u32,
    /// `FASTPATH_*` state of the pod-to-proxy direction.
    pub fastpath: u32,
    /// The pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// Socket cookie of the pod-side socket.
    pub socket_cookie: u64,
    /// `bpf_ktime_get_ns` at establishment.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 56);

/// Value of `dm_pod_counters` (key: netns cookie, u64). Written by the eBPF programs with
/// atomic adds; `commands` and `commands_throttled` are written by the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// Connects rewritten to the proxy, and connects dialled directly to a proxy listener
    /// (recorded, not rewritten).
    pub connects_captured: u64,
    /// Connects to an endpoint let through to the real address because the agent's heartbeat
    /// was stale (fail-open).
    pub connects_failopen: u64,
    /// Connects refused by the pod's connection-rate limit.
    pub connects_refused: u64,
    /// Only in the `abi-next` build (the upgrade drill's second build): never written; it
    /// moves every later field, so that build's layout really differs.
    #[cfg(feature = "abi-next")]
    pub drill_next: u64,
    /// sk_msg redirects (messages) through the fast path, both directions.
    pub fastpath_msgs: u64,
    /// Bytes redirected through the fast path, both directions.
    pub fastpath_bytes: u64,
    /// Messages of captured connections that took normal TCP (peer socket missing, or the
    /// connection was pinned to TCP).
    pub fastpath_misses: u64,
    /// Commands the proxy served for this pod.
    pub commands: u64,
    /// Commands the proxy delayed or refused under the pod's command-rate limit.
    pub commands_throttled: u64,
}
#[cfg(not(feature = "abi-next"))]
const _: () = assert!(core::mem::size_of::<PodCounters>() == 64);
#[cfg(feature = "abi-next")]
const _: () = assert!(core::mem::size_of::<PodCounters>() == 72);

/// Value of `dm_pod_policy` (key: netns cookie, u64), written by the agent from its config.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    /// New connections per second; 0 = unlimited.
    pub conn_rate: u32,
    /// Connections allowed in a burst above the rate.
    pub conn_burst: u32,
    /// Commands per second, enforced by the proxy; 0 = unlimited.
    pub cmd_rate: u32,
    pub cmd_burst: u32,
    /// `POD_CAPTURE_*` bits.
    pub flags: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<PodPolicy>() == 24);

/// Capture decision for a pod from its `dm_pod_policy` flags (`None`: no entry) and the settings
/// flags; shared by connect4/6 and the agent's unit tests. A pod not selected is never rewritten.
#[inline(always)]
pub fn capture_selected(settings_flags: u32, pod_flags: Option<u32>) -> bool {
    match pod_flags {
        Some(f) if f & POD_CAPTURE_OFF != 0 => false,
        Some(f) if settings_flags & SETTINGS_CAPTURE_SELECTED != 0 => f & POD_CAPTURE_ON != 0,
        Some(_) => true,
        None => settings_flags & SETTINGS_CAPTURE_SELECTED == 0,
    }
}

/// Entries of `dm_netns_cgroup` (netns cookie -> cgroup id of the last connecting process).
pub const NETNS_CGROUP_MAX: u32 = 16_384;

/// Length of [`PodState::name`].
pub const POD_NAME_LEN: usize = 64;

/// Value of `dm_pod_state` (key: netns cookie, u64), written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodState {
    /// Pod name (`namespace/name`, or the netns name), NUL-padded, cut at 63 bytes.
    pub name: [u8; POD_NAME_LEN],
    /// FNV-1a hash of the full name, so a cut name stays unique.
    pub name_hash: u64,
    /// Client connections of this pod open at the proxy.
    pub open_conns: u32,
    /// Errors the proxy answered to this pod (backend failures, protocol errors).
    pub errors: u32,
    /// `CLOCK_MONOTONIC` ns of the pod's last activity at the proxy.
    pub last_active_ns: u64,
}
const _: () = assert!(core::mem::size_of::<PodState>() == 88);

impl Default for PodState {
    fn default() -> Self {
        Self {
            name: [0; POD_NAME_LEN],
            name_hash: 0,
            open_conns: 0,
            errors: 0,
            last_active_ns: 0,
        }
    }
}

/// Value of `dm_pod_rate` (key: netns cookie, u64): the pod's connection-rate bucket, written
/// by connect4/6. It is a GCRA token bucket: `tat_ns` is the theoretical arrival time; a connect
/// is allowed when `max(tat, now) + interval - now <= burst * interval`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub tat_ns: u64,
    /// Total connects refused (mirrors the counter, kept beside the bucket for debugging).
    pub refused: u64,
}
const _: () = assert!(core::mem::size_of::<RateState>() == 16);

/// GCRA decision shared by the eBPF programs and the agent's unit tests: returns the new TAT
/// when the event is allowed, `None` when it is over the limit. `rate == 0` means unlimited.
#[inline(always)]
pub fn gcra_allow(tat_ns: u64, now_ns: u64, rate: u32, burst: u32) -> Option<u64> {
    if rate == 0 {
        return Some(tat_ns);
    }
    let interval = 1_000_000_000u64 / rate as u64;
    let burst = if burst == 0 { 1 } else { burst as u64 };
    let base = if tat_ns > now_ns { tat_ns } else { now_ns };
    let new_tat = base + interval;
    if new_tat - now_ns > burst * interval {
        None
    } else {
        Some(new_tat)
    }
}

/// FNV-1a, 64 bit: the pod name hash stored in [`PodState::name_hash`].
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers and integer arrays, with every
    // padding byte spelled out as a field (checked by the size assertions above).
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for SockOrig {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConnInfo {}
    unsafe impl aya::Pod for PodCounters {}
    unsafe impl aya::Pod for PodPolicy {}
    unsafe impl aya::Pod for PodState {}
    unsafe impl aya::Pod for RateState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_burst_then_rate() {
        // 10/s with a burst of 3: three immediate connects pass, the fourth is refused,
        // and after one interval (100 ms) one more passes.
        let mut tat = 0u64;
        let now = 1_000_000_000u64;
        for _ in 0..3 {
            tat = gcra_allow(tat, now, 10, 3).expect("within burst");
        }
        assert_eq!(gcra_allow(tat, now, 10, 3), None);
        assert!(gcra_allow(tat, now + 100_000_000, 10, 3).is_some());
    }

    #[test]
    fn capture_selection() {
        let sel = SETTINGS_CAPTURE | SETTINGS_CAPTURE_SELECTED;
        assert!(capture_selected(SETTINGS_CAPTURE, None));
        assert!(capture_selected(SETTINGS_CAPTURE, Some(0)));
        assert!(!capture_selected(SETTINGS_CAPTURE, Some(POD_CAPTURE_OFF)));
        assert!(!capture_selected(sel, None));
        assert!(!capture_selected(sel, Some(0)));
        assert!(capture_selected(sel, Some(POD_CAPTURE_ON)));
        assert!(!capture_selected(
            sel,
            Some(POD_CAPTURE_ON | POD_CAPTURE_OFF)
        ));
    }

    #[test]
    fn gcra_unlimited() {
        assert_eq!(gcra_allow(5, 0, 0, 0), Some(5));
    }

    #[test]
    fn map_names_fit_the_kernel() {
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name} is longer than 15 characters");
        }
    }
}
