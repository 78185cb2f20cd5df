//! `dm_sockops`: turns a captured connect into a `dm_conns` entry keyed by the 4-tuple, and
//! (fast path on) puts both ends of a captured connection into `dm_socks`.
//!
//! - ACTIVE_ESTABLISHED (pod side): `dm_sock_orig[socket cookie]` → `dm_conns[pod view]`,
//!   insert the pod socket into `dm_socks`.
//! - PASSIVE_ESTABLISHED (proxy side): when the reversed tuple is a captured connection,
//!   insert the accepted socket into `dm_socks`.
//!
//! `dm_conns` entries are not removed when the pod socket closes: a client that sends and
//! closes at once (fire and forget) reaches TCP_CLOSE (orphaned FIN_WAIT2 becomes TIME_WAIT)
//! before the proxy accepts its connection, and the proxy must still know whose it is. The map
//! is an LRU (`CONNS_MAX` entries); a reused 4-tuple is overwritten at its ACTIVE_ESTABLISHED.
//!
//! This program never fails a connection: every path returns 1.

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockOpsContext,
};
use datamesh_common::{ConnInfo, FlowKey, FASTPATH_UNDECIDED, SETTINGS_FASTPATH};

use crate::{
    flow::{ctx_read, own_view_key, swapped},
    maps::{CONNS, SETTINGS, SOCKS, SOCK_ORIG},
};

/// What sock_ops always returns: the program never changes a connection's fate.
pub const DONE: u32 = 1;

/// Error of a sock_ops step; the entry point ignores it (returns 1).
pub struct SockOpsError;

#[inline(always)]
pub fn try_sockops(ctx: &SockOpsContext) -> Result<(), SockOpsError> {
    let ops = ctx.ops;
    let op = ctx_read!((*ops).op);
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        active_established(ops)?;
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        passive_established(ops)?;
    }
    Ok(())
}

/// The socket's 4-tuple as it sees it (`src` = local, `dst` = remote). `local_port` is in
/// host byte order in `bpf_sock_ops`, `remote_port` in network byte order.
#[inline(always)]
fn own_view(ops: *mut bpf_sock_ops) -> Option<FlowKey> {
    own_view_key(
        ctx_read!((*ops).family),
        ctx_read!((*ops).local_ip4),
        [
            ctx_read!((*ops).local_ip6[0]),
            ctx_read!((*ops).local_ip6[1]),
            ctx_read!((*ops).local_ip6[2]),
            ctx_read!((*ops).local_ip6[3]),
        ],
        ctx_read!((*ops).local_port),
        ctx_read!((*ops).remote_ip4),
        [
            ctx_read!((*ops).remote_ip6[0]),
            ctx_read!((*ops).remote_ip6[1]),
            ctx_read!((*ops).remote_ip6[2]),
            ctx_read!((*ops).remote_ip6[3]),
        ],
        ctx_read!((*ops).remote_port),
    )
}

#[inline(always)]
fn fastpath_on() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|s| s.flags & SETTINGS_FASTPATH != 0)
}

/// Pod side: a connect rewritten by connect4/6 has just been established to the proxy.
#[inline(always)]
fn active_established(ops: *mut bpf_sock_ops) -> Result<(), SockOpsError> {
    // SAFETY: bpf_get_socket_cookie accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    // SAFETY: copied out at once, before this program removes the entry below.
    let Some(orig) = (unsafe { SOCK_ORIG.get(cookie) }).copied() else {
        return Ok(()); // not a captured connection
    };
    let mut key = own_view(ops).ok_or(SockOpsError)?;
    let info = ConnInfo {
        orig: orig.orig,
        endpoint_id: orig.endpoint_id,
        fastpath: FASTPATH_UNDECIDED,
        netns_cookie: orig.netns_cookie,
        socket_cookie: cookie,
        // SAFETY: helper without arguments.
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    CONNS
        .insert(key, info, BPF_ANY as u64)
        .map_err(|_| SockOpsError)?;
    let _ = SOCK_ORIG.remove(cookie);

    if fastpath_on() {
        // A failed insert (map full) leaves the connection on normal TCP: sk_msg never runs
        // for a socket that is not in the map.
        // SAFETY: `ops` is the program's context, valid for this run.
        let _ = SOCKS.update(&mut key, unsafe { &mut *ops }, BPF_ANY as u64);
    }
    Ok(())
}

/// Proxy side: an accepted socket whose reversed tuple is a captured pod connection.
#[inline(always)]
fn passive_established(ops: *mut bpf_sock_ops) -> Result<(), SockOpsError> {
    if !fastpath_on() {
        return Ok(());
    }
    let mut key = own_view(ops).ok_or(SockOpsError)?;
    if CONNS.get_ptr(swapped(&key)).is_none() {
        return Ok(()); // not a proxy socket of a captured connection
    }
    // SAFETY: `ops` is the program's context, valid for this run.
    let _ = SOCKS.update(&mut key, unsafe { &mut *ops }, BPF_ANY as u64);
    Ok(())
}
