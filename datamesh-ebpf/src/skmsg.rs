//! `dm_skmsg`: the sockmap fast path. Runs for every write on a socket in `dm_socks` and
//! redirects it to the peer socket's receive queue.
//!
//! Architecture Invariant: every miss returns `SK_PASS`, so the bytes take normal TCP; this
//! program never returns `SK_DROP` (that would fail the application's write with EACCES).
//!
//! Ordering: a direction that has sent bytes by TCP must never switch to redirect (redirected
//! bytes would overtake TCP bytes still in flight). Redirect → TCP is safe (the receiver reads
//! its redirect queue first). So:
//! - pod → proxy decides once, at the first write (`ConnInfo.fastpath`);
//! - when the fast path is switched off, a pod socket still in the map pins its connection
//!   to TCP, and the proxy side follows a connection pinned to TCP, so switching the fast path
//!   back on later never flips a running connection back to redirect.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, sk_msg_md, BPF_F_INGRESS},
    programs::SkMsgContext,
};
use datamesh_common::{
    ConnInfo, FlowKey, FASTPATH_REDIRECT, FASTPATH_TCP, FASTPATH_UNDECIDED, SETTINGS_FASTPATH,
};

use crate::{
    flow::{ctx_read, own_view_key, swapped},
    maps::{count, Counter, CONNS, SETTINGS, SOCKS},
};

/// Error of an sk_msg step; the entry point turns it into `SK_PASS`.
pub struct SkMsgError;

/// Returns `Ok(())` for every handled message; the entry point returns `SK_PASS`, which also
/// completes a redirect set up by `bpf_msg_redirect_hash`.
#[inline(always)]
pub fn try_skmsg(ctx: &SkMsgContext) -> Result<(), SkMsgError> {
    let msg = ctx.msg;
    let fastpath = SETTINGS
        .get(0)
        .is_some_and(|s| s.flags & SETTINGS_FASTPATH != 0);
    let own = own_view(msg).ok_or(SkMsgError)?;
    let size = ctx_read!((*msg).size) as u64;

    // Pod side: its own view is the dm_conns key.
    if let Some(info) = CONNS.get_ptr_mut(own) {
        // SAFETY: `info` is a live map value; only this connection's pod socket (whose send
        // path holds the socket lock) writes `fastpath`.
        let (state, netns) = unsafe { ((*info).fastpath, (*info).netns_cookie) };
        if !fastpath || state == FASTPATH_TCP {
            if state != FASTPATH_TCP {
                set_state(info, FASTPATH_TCP);
            }
            count(netns, Counter::FastpathMisses, 1);
            return Ok(());
        }
        // The proxy's accepted socket is stored under its own view: the swapped tuple.
        let redirected = redirect(ctx, swapped(&own));
        if redirected {
            if state == FASTPATH_UNDECIDED {
                set_state(info, FASTPATH_REDIRECT);
            }
            count(netns, Counter::FastpathMsgs, 1);
            count(netns, Counter::FastpathBytes, size);
        } else {
            // No proxy-side socket (not accepted into the map yet, or gone): these bytes go
            // by TCP, and so must every later byte of an undecided connection.
            if state == FASTPATH_UNDECIDED {
                set_state(info, FASTPATH_TCP);
            }
            count(netns, Counter::FastpathMisses, 1);
        }
        return Ok(());
    }

    // Proxy side: the swapped tuple (pod view) is the dm_conns key, and also the pod socket's
    // own-view key in dm_socks.
    let pod_view = swapped(&own);
    // SAFETY: copied out at once.
    let Some(info) = (unsafe { CONNS.get(pod_view) }).copied() else {
        return Ok(()); // in the map but not a captured connection (stale entry)
    };
    if !fastpath || info.fastpath == FASTPATH_TCP {
        count(info.netns_cookie, Counter::FastpathMisses, 1);
        return Ok(());
    }
    if redirect(ctx, pod_view) {
        count(info.netns_cookie, Counter::FastpathMsgs, 1);
        count(info.netns_cookie, Counter::FastpathBytes, size);
    } else {
        count(info.netns_cookie, Counter::FastpathMisses, 1);
    }
    Ok(())
}

/// Asks for the message to be queued on the receive queue of the socket stored under `key`.
/// The helper returns `SK_PASS` when the socket was found (the redirect happens when the
/// program returns `SK_PASS`) and `SK_DROP` when not; the caller returns `SK_PASS` either way.
#[inline(always)]
fn redirect(ctx: &SkMsgContext, mut key: FlowKey) -> bool {
    SOCKS.redirect_msg(ctx, &mut key, BPF_F_INGRESS as u64) == SK_PASS as i64
}

#[inline(always)]
fn set_state(info: *mut ConnInfo, state: u32) {
    // SAFETY: `info` is a live map value returned by the kernel for this program run.
    unsafe { core::ptr::addr_of_mut!((*info).fastpath).write_volatile(state) };
}

/// The sending socket's own view. In `sk_msg_md`, `remote_port` is in network byte order and
/// `local_port` in host byte order.
#[inline(always)]
fn own_view(msg: *mut sk_msg_md) -> Option<FlowKey> {
    own_view_key(
        ctx_read!((*msg).family),
        ctx_read!((*msg).local_ip4),
        [
            ctx_read!((*msg).local_ip6[0]),
            ctx_read!((*msg).local_ip6[1]),
            ctx_read!((*msg).local_ip6[2]),
            ctx_read!((*msg).local_ip6[3]),
        ],
        ctx_read!((*msg).local_port),
        ctx_read!((*msg).remote_ip4),
        [
            ctx_read!((*msg).remote_ip6[0]),
            ctx_read!((*msg).remote_ip6[1]),
            ctx_read!((*msg).remote_ip6[2]),
            ctx_read!((*msg).remote_ip6[3]),
        ],
        ctx_read!((*msg).remote_port),
    )
}
