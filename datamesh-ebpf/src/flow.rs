//! Addresses, ports and `FlowKey`s as the kernel contexts hand them over, normalised to the
//! ABI's form: addresses in network byte order with IPv4 (and v4-mapped IPv6) in `[0]`,
//! ports in host byte order.

use datamesh_common::{FlowKey, AF_INET, AF_INET6};

/// Reads one context field with a single load of exactly its size.
///
/// The verifier accepts only loads of the declared field size for most `bpf_sock_ops` and
/// `sk_msg_md` fields; a volatile read keeps LLVM from merging two adjacent u32 loads into
/// one u64 load.
macro_rules! ctx_read {
    ($ptr:expr) => {
        // SAFETY: `$ptr` points into the program's context, valid for the whole program run.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($ptr)) }
    };
}
pub(crate) use ctx_read;

/// `::ffff:0:0/96` test on an IPv6 address in network byte order, word by word.
#[inline(always)]
pub fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0x0000_ffffu32.to_be()
}

/// The third word of a v4-mapped address, in network byte order.
pub const V4_MAPPED_PREFIX: u32 = 0x0000_ffffu32.to_be();

/// Address of a socket endpoint in ABI form: `(family, addr)`.
#[inline(always)]
pub fn fold_addr(family: u32, ip4: u32, ip6: [u32; 4]) -> Option<(u32, [u32; 4])> {
    if family == AF_INET as u32 {
        Some((AF_INET as u32, [ip4, 0, 0, 0]))
    } else if family == AF_INET6 as u32 {
        if is_v4_mapped(&ip6) {
            Some((AF_INET as u32, [ip6[3], 0, 0, 0]))
        } else {
            Some((AF_INET6 as u32, ip6))
        }
    } else {
        None
    }
}

/// `remote_port` of `bpf_sock_ops` / `sk_msg_md` to host order.
///
/// The field holds the port in network byte order; on little-endian kernels the 16-bit value
/// sits in the upper half of the u32 (the kernel shifts it left by 16) and older kernels left
/// it in the lower half. Exactly one half is non-zero for a non-zero port, so OR-ing them
/// gives the 16-bit network-order value either way.
#[inline(always)]
pub fn remote_port_host(raw: u32) -> u32 {
    let be16 = (raw | (raw >> 16)) as u16;
    u16::from_be(be16) as u32
}

/// A TCP socket's own view (`src` = local, `dst` = remote), in ABI form.
#[inline(always)]
pub fn own_view_key(
    family: u32,
    local_ip4: u32,
    local_ip6: [u32; 4],
    local_port_host: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    remote_port_raw: u32,
) -> Option<FlowKey> {
    let (fam, src_addr) = fold_addr(family, local_ip4, local_ip6)?;
    let (fam_dst, dst_addr) = fold_addr(family, remote_ip4, remote_ip6)?;
    if fam != fam_dst {
        return None;
    }
    Some(FlowKey {
        family: fam,
        src_port: local_port_host,
        dst_port: remote_port_host(remote_port_raw),
        _pad0: 0,
        src_addr,
        dst_addr,
    })
}

/// The same connection seen from the other end.
#[inline(always)]
pub fn swapped(key: &FlowKey) -> FlowKey {
    FlowKey {
        family: key.family,
        src_port: key.dst_port,
        dst_port: key.src_port,
        _pad0: 0,
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
    }
}
