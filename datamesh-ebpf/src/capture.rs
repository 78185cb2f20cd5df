//! `dm_connect4` / `dm_connect6`: capture of pods' connects to configured endpoints.
//!
//! A TCP connect whose destination is in `dm_endpoints` is rewritten to the node proxy, and the
//! original destination and the pod (netns cookie) are left in `dm_sock_orig` for sock_ops.
//! Everything else leaves the connect untouched (return 1 without writing the context): other
//! destinations, the agent's own sockets (bypass mark, agent netns) and, when the agent's
//! heartbeat is stale or the endpoint's proxy listener is not in `dm_listeners` (the agent is
//! gone: the kernel drops a closed listener from the map), endpoint connects too (fail-open,
//! counted). Over the pod's connection-rate limit the connect is refused with `ECONNREFUSED`
//! (counted).
//!
//! The proxy listeners themselves are in `dm_endpoints` too (flag `ENDPOINT_LISTENER`, pointing
//! at themselves): a pod that dials the node proxy address and port directly is recorded and
//! rate-limited exactly like a captured connect, but its destination is left as it is. So the
//! proxy knows the pod of every connection a pod makes to it, whatever address it dialled.

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_map_lookup_elem, bpf_set_retval, bpf_sk_release,
    },
    programs::SockAddrContext,
};
use datamesh_common::{
    capture_selected, gcra_allow, EndpointKey, EndpointValue, RateState, SockOrig, AF_INET,
    AF_INET6, ENDPOINT_LISTENER, SETTINGS_CAPTURE,
};

use crate::{
    flow::{ctx_read, is_v4_mapped, V4_MAPPED_PREFIX},
    maps::{
        count, Counter, ENDPOINTS, LISTENERS, NETNS_CGROUP, POD_POLICY, POD_RATE, SETTINGS,
        SOCK_ORIG,
    },
};

/// Return value of a cgroup sock_addr program that lets the connect go on.
pub const ALLOW: i32 = 1;
/// Return value that fails the connect (with the errno set through `bpf_set_retval`).
pub const REJECT: i32 = 0;

/// What to do with the connect. The entry point maps it to a literal 0 or 1: the verifier
/// insists on seeing a return value in [0, 1], which it cannot prove for an integer passed
/// back through memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the connect go on (rewritten or not).
    Allow,
    /// Fail the connect with the errno set by `bpf_set_retval`.
    Reject,
}
const ECONNREFUSED: i32 = 111;
const SOCK_STREAM: u32 = 1;

/// Which hook runs: the destination is read from `user_ip4` or `user_ip6`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
}

/// Error of a capture step; the entry point turns it into "allow unmodified".
pub struct CaptureError;

#[inline(always)]
pub fn try_connect(ctx: &SockAddrContext, hook: Hook) -> Result<Verdict, CaptureError> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;

    // Every connect (UDP too: a pod's DNS lookup comes before its Redis connect) records the
    // process's cgroup for its netns, so the agent knows the pod before its first capture.
    // SAFETY: bpf_get_netns_cookie accepts the sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    record_cgroup(netns);

    // Endpoints are Redis (TCP); a UDP connect() to the same address is none of our business.
    if ctx_read!((*sa).type_) != SOCK_STREAM {
        return Ok(Verdict::Allow);
    }
    let Some(settings) = SETTINGS.get(0) else {
        return Ok(Verdict::Allow);
    };
    if settings.flags & SETTINGS_CAPTURE == 0 {
        return Ok(Verdict::Allow);
    }

    // The destination as the pod dialled it, folded to the ABI key form.
    let port = u16::from_be(ctx_read!((*sa).user_port) as u16);
    let (key, mapped) = match hook {
        Hook::Connect4 => (
            endpoint_key(AF_INET, [ctx_read!((*sa).user_ip4), 0, 0, 0], port),
            false,
        ),
        Hook::Connect6 => {
            let ip6 = [
                ctx_read!((*sa).user_ip6[0]),
                ctx_read!((*sa).user_ip6[1]),
                ctx_read!((*sa).user_ip6[2]),
                ctx_read!((*sa).user_ip6[3]),
            ];
            if is_v4_mapped(&ip6) {
                (endpoint_key(AF_INET, [ip6[3], 0, 0, 0], port), true)
            } else {
                (endpoint_key(AF_INET6, ip6, port), false)
            }
        }
    };
    // SAFETY: the value is copied out at once; the agent replaces entries only as a whole.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&key) }).copied() else {
        // Architecture Invariant: a destination not in dm_endpoints is never modified.
        return Ok(Verdict::Allow);
    };

    // A direct dial of a proxy listener: recorded and rate-limited, never rewritten.
    let direct = endpoint.flags & ENDPOINT_LISTENER != 0;

    // The proxy address must be reachable with the socket's family: v4 endpoints through
    // connect6 (v4-mapped) get the v4-mapped proxy address.
    let v6_target = hook == Hook::Connect6 && !mapped;
    let want_family = if v6_target { AF_INET6 } else { AF_INET };
    if endpoint.proxy_family != want_family {
        // A configuration the agent should not produce (e.g. a v6 endpoint without a v6 proxy
        // address): the connect goes to the real endpoint rather than nowhere.
        return Ok(Verdict::Allow);
    }

    // Never capture the agent's own sockets: the proxy must not loop into itself.
    if settings.bypass_mark != 0 {
        let sk = ctx_read!((*sa).__bindgen_anon_1.sk);
        // SAFETY: in sock_addr programs `ctx->sk` is a non-null PTR_TO_SOCKET and `mark` is a
        // readable u32 field of `struct bpf_sock`.
        let mark = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).mark)) };
        if mark == settings.bypass_mark {
            return Ok(Verdict::Allow);
        }
    }
    if settings.agent_netns_cookie != 0 && netns == settings.agent_netns_cookie {
        return Ok(Verdict::Allow);
    }
    // Architecture Invariant: a pod not selected for capture is never rewritten (opt-in mode:
    // a network namespace the agent has not selected has no entry, so it is not captured).
    if !direct {
        // SAFETY: the flags are copied out at once.
        let pod_flags = unsafe { POD_POLICY.get(netns) }.map(|p| p.flags);
        if !capture_selected(settings.flags, pod_flags) {
            return Ok(Verdict::Allow);
        }
    }

    // Architecture Invariant: capture fails open when the agent's heartbeat is stale.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let hb = settings.heartbeat_ns;
    if hb == 0 || now.saturating_sub(hb) > settings.failopen_after_ns {
        // A direct dial has nothing to fail open to: it goes where it was going, uncounted.
        if !direct {
            count(netns, Counter::ConnectsFailopen, 1);
        }
        return Ok(Verdict::Allow);
    }
    // Architecture Invariant: capture rewrites a connect only while the endpoint's proxy
    // listener exists. The kernel removes a closed socket from dm_listeners, so once the whole
    // agent is gone (supervisor and workers: every copy of the listener closed) connects fail
    // open at once instead of being refused until the heartbeat goes stale.
    if !direct && !listener_alive(endpoint.id) {
        count(netns, Counter::ConnectsFailopen, 1);
        return Ok(Verdict::Allow);
    }

    if !rate_allow(
        netns,
        now,
        settings.default_conn_rate,
        settings.default_conn_burst,
    ) {
        // SAFETY: bpf_set_retval is available to cgroup programs (kernel >= 5.18); with it the
        // rejected connect fails with ECONNREFUSED instead of EPERM.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        count(netns, Counter::ConnectsRefused, 1);
        return Ok(Verdict::Reject);
    }

    // Record before rewriting: if the record cannot be stored the proxy could not tell the pod
    // or the original destination, so the connect stays direct (Err → allow unmodified).
    // SAFETY: bpf_get_socket_cookie accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = SockOrig {
        orig: key,
        endpoint_id: endpoint.id,
        _pad0: 0,
        netns_cookie: netns,
    };
    SOCK_ORIG
        .insert(cookie, orig, BPF_ANY as u64)
        .map_err(|_| CaptureError)?;

    if !direct {
        rewrite(sa, hook, mapped, &endpoint);
    }
    count(netns, Counter::ConnectsCaptured, 1);
    Ok(Verdict::Allow)
}

/// Whether the proxy's listening socket of endpoint `id` is in `dm_listeners`.
///
/// A lookup in a sockmap from a program returns a referenced socket (or NULL) that the verifier
/// insists is released on every path; aya-ebpf 0.2.1 wraps that only for sk_lookup programs,
/// so the raw helpers are called here.
#[inline(always)]
fn listener_alive(id: u32) -> bool {
    let key = id;
    // SAFETY: the map pointer is the BTF map's own static (relocated to the map by the loader)
    // and the key a u32 on the stack, the map's key size. The result is a socket reference or
    // null, released at once below.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(LISTENERS).cast_mut().cast(),
            core::ptr::addr_of!(key).cast(),
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the non-null socket the lookup acquired; released exactly once.
    unsafe { bpf_sk_release(sk) };
    true
}

/// Remembers the connecting process's cgroup for its network namespace (the agent's way from a
/// netns to its kubelet pod). Written only when absent or changed: one lookup per connect.
#[inline(always)]
fn record_cgroup(netns: u64) {
    // SAFETY: helper without arguments, allowed in cgroup sock_addr programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once.
    if unsafe { NETNS_CGROUP.get(netns) }.copied() != Some(cgroup) {
        // Best effort: a full LRU evicts the oldest namespace, which is recorded again on its
        // next connect.
        let _ = NETNS_CGROUP.insert(netns, cgroup, BPF_ANY as u64);
    }
}

#[inline(always)]
fn endpoint_key(family: u16, addr: [u32; 4], port: u16) -> EndpointKey {
    EndpointKey {
        family,
        port,
        _pad0: 0,
        addr,
    }
}

/// GCRA connection-rate check for the pod; `true` lets the connect through.
#[inline(always)]
fn rate_allow(netns: u64, now: u64, default_rate: u32, default_burst: u32) -> bool {
    // SAFETY: the policy is copied out at once; the agent replaces entries only as a whole.
    let (rate, burst) = match unsafe { POD_POLICY.get(netns) } {
        Some(p) => (p.conn_rate, p.conn_burst),
        None => (default_rate, default_burst),
    };
    if rate == 0 {
        return true;
    }
    match POD_RATE.get_ptr_mut(netns) {
        Some(state) => {
            // SAFETY: `state` is a live map value. Two CPUs racing here may both read the same
            // TAT and both pass: the limit is approximate by at most the number of CPUs.
            unsafe {
                match gcra_allow((*state).tat_ns, now, rate, burst) {
                    Some(tat) => {
                        (*state).tat_ns = tat;
                        true
                    }
                    None => {
                        crate::maps::atomic_add(core::ptr::addr_of_mut!((*state).refused), 1);
                        false
                    }
                }
            }
        }
        None => match gcra_allow(0, now, rate, burst) {
            Some(tat) => {
                // If the bucket cannot be stored the connect still passes: the limit is a
                // protection, not a reason to fail a pod when the map is full.
                let _ = POD_RATE.insert(
                    netns,
                    RateState {
                        tat_ns: tat,
                        refused: 0,
                    },
                    BPF_ANY as u64,
                );
                true
            }
            None => false,
        },
    }
}

/// Points the connect at the proxy. Ports in `user_port` are in network byte order; every
/// store is a single 4-byte write, which is what the verifier accepts for these fields.
#[inline(always)]
fn rewrite(sa: *mut bpf_sock_addr, hook: Hook, mapped: bool, ep: &EndpointValue) {
    let port = ep.proxy_port.to_be() as u32;
    // SAFETY: `sa` is the program's context; connect4/6 may write user_ip4/user_ip6/user_port.
    unsafe {
        match hook {
            Hook::Connect4 => {
                core::ptr::write_volatile(
                    core::ptr::addr_of_mut!((*sa).user_ip4),
                    ep.proxy_addr[0],
                );
            }
            Hook::Connect6 => {
                let ip6 = if mapped {
                    [0, 0, V4_MAPPED_PREFIX, ep.proxy_addr[0]]
                } else {
                    ep.proxy_addr
                };
                core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[0]), ip6[0]);
                core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[1]), ip6[1]);
                core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[2]), ip6[2]);
                core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[3]), ip6[3]);
            }
        }
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_port), port);
    }
}
