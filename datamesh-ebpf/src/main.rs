//! The DataMesh kernel data plane: one ELF object with four programs and nine BTF maps.
//!
//! - `dm_connect4`, `dm_connect6` (cgroup/connect4, cgroup/connect6): capture ([`capture`]).
//! - `dm_sockops` (sockops): connection identity and sockhash inserts ([`sockops`]).
//! - `dm_skmsg` (sk_msg on `dm_socks`): the fast-path redirect ([`skmsg`]).
//!
//! Map names, layouts and flags are the ABI in `datamesh-common`; the maps live in [`maps`].
//! Program function names must differ from their ELF section names (bpf-linker rejects
//! `fn sockops` in section `sockops`), hence the `dm_` prefix, which is also the ABI's name.
//!
//! Each entry point is thin: `try_*` does the work and an error takes the deliberate fallback
//! of that hook, which is always "leave the connection alone".
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod capture;
mod flow;
mod maps;
mod skmsg;
mod sockops;

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};

use crate::capture::{try_connect, Hook, Verdict, ALLOW, REJECT};

#[cgroup_sock_addr(connect4)]
pub fn dm_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, Hook::Connect4) {
        Ok(Verdict::Allow) => ALLOW,
        Ok(Verdict::Reject) => REJECT,
        // Fallback: let the connect go to the address the pod asked for, unmodified. A capture
        // that cannot record the original destination must not happen at all.
        Err(_) => ALLOW,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn dm_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, Hook::Connect6) {
        Ok(Verdict::Allow) => ALLOW,
        Ok(Verdict::Reject) => REJECT,
        // Fallback: allow unmodified, as for connect4.
        Err(_) => ALLOW,
    }
}

#[sock_ops]
pub fn dm_sockops(ctx: SockOpsContext) -> u32 {
    match sockops::try_sockops(&ctx) {
        Ok(()) => sockops::DONE,
        // Fallback: never fail a connection; the worst case is a connection the proxy cannot
        // attribute or one that stays on normal TCP.
        Err(_) => sockops::DONE,
    }
}

#[sk_msg]
pub fn dm_skmsg(ctx: SkMsgContext) -> u32 {
    match skmsg::try_skmsg(&ctx) {
        // SK_PASS also completes a redirect the helper has set up.
        Ok(()) => SK_PASS,
        // Fallback: SK_PASS hands the bytes to normal TCP; SK_DROP would fail the write.
        Err(_) => SK_PASS,
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program (the verifier rejects any path that would get here);
    // required by no_std.
    loop {}
}
