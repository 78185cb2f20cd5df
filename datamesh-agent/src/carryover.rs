//! Carrying the pinned maps' state across a map layout change (an upgrade or a rollback between
//! builds of different `ABI_VERSION`), by field name, through the maps' own BTF.
//!
//! A build with another layout cannot reuse the pinned maps: it creates new ones (see
//! `dataplane::setup`). What the old maps hold is worth keeping for some of them: the per-pod
//! counters operators graph, the netns → cgroup records that identify pods (written only on a
//! pod's connect), the records of connects in flight. Each map's value type is read from the
//! kernel's BTF of the *old* map and of the *new* one, and values are converted field by field,
//! matched by name: a field the new layout added starts at zero, a field it dropped is dropped
//! (logged). This works in both directions without either build knowing the other's layout, so
//! an upgrade v1 → v2 and its rollback v2 → v1 both keep the counters.
//!
//! Counters (`dm_pod_counters`) are *added* into the new entry, since the new programs already
//! count from the moment they are attached; the other maps are copied where the new map has no
//! entry yet. Maps the agent rewrites from its config (policies, endpoints, settings) are not
//! carried; `dm_conns` is, for the connections the old programs recorded that the new worker
//! accepts (the listeners are shared during a handover).
//!
//! The raw `bpf(2)` calls are few and small; aya offers typed maps only, for types known at
//! compile time, which is exactly what this module cannot have.

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use datamesh_common::{
    MAP_CONNS, MAP_NETNS_CGROUP, MAP_POD_COUNTERS, MAP_POD_RATE, MAP_POD_STATE, MAP_SOCK_ORIG,
};
use tracing::{info, warn};

/// How a map's entries are carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    /// Every field with the same name is added into the new entry (counters).
    Add,
    /// Copied (by field name) where the new map has no entry for the key.
    IfAbsent,
}

/// The maps whose entries survive a layout change, and how.
pub const CARRIED: [(&str, Carry); 6] = [
    (MAP_POD_COUNTERS, Carry::Add),
    // Connections captured by the old programs that the new worker accepts (a handover).
    (MAP_CONNS, Carry::IfAbsent),
    (MAP_NETNS_CGROUP, Carry::IfAbsent),
    (MAP_POD_STATE, Carry::IfAbsent),
    (MAP_SOCK_ORIG, Carry::IfAbsent),
    (MAP_POD_RATE, Carry::IfAbsent),
];

/// One field of a map's key or value: name (empty for a scalar), byte offset and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// What a carry-over did, per map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub maps: Vec<(String, usize)>,
    pub dropped_fields: Vec<String>,
    pub skipped: Vec<String>,
}

// ---- raw bpf(2) ----

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_ANY: u64 = 0;

/// `union bpf_attr` is at most this big for the commands used here (zero-filled tail).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        if let Some(s) = self.0.get_mut(off..off + 4) {
            s.copy_from_slice(&v.to_ne_bytes());
        }
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        if let Some(s) = self.0.get_mut(off..off + 8) {
            s.copy_from_slice(&v.to_ne_bytes());
        }
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-filled, 8-byte aligned buffer laid out as the kernel's
    // `union bpf_attr` for `cmd`; pointers in it point at live buffers of the announced sizes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn get_next_key(fd: RawFd, key: Option<&[u8]>, next: &mut [u8]) -> std::io::Result<bool> {
    let mut a = Attr::new();
    a.put_u32(0, fd as u32);
    a.put_u64(8, key.map_or(0, |k| k.as_ptr() as u64));
    a.put_u64(16, next.as_mut_ptr() as u64);
    match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn lookup(fd: RawFd, key: &[u8], value: &mut [u8]) -> std::io::Result<bool> {
    let mut a = Attr::new();
    a.put_u32(0, fd as u32);
    a.put_u64(8, key.as_ptr() as u64);
    a.put_u64(16, value.as_mut_ptr() as u64);
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One lookup by raw key bytes; `false` when absent or on error.
pub fn lookup_raw(fd: RawFd, key: &[u8], value: &mut [u8]) -> bool {
    matches!(lookup(fd, key, value), Ok(true))
}

fn update(fd: RawFd, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, fd as u32);
    a.put_u64(8, key.as_ptr() as u64);
    a.put_u64(16, value.as_ptr() as u64);
    a.put_u64(24, BPF_ANY);
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

/// `struct bpf_map_info`, the fields read here.
#[derive(Clone, Copy, Debug, Default)]
struct MapInfoRaw {
    key_size: u32,
    value_size: u32,
    btf_id: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

fn map_info(fd: RawFd) -> std::io::Result<MapInfoRaw> {
    let mut info = [0u8; 96];
    let mut a = Attr::new();
    a.put_u32(0, fd as u32);
    a.put_u32(4, info.len() as u32);
    a.put_u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    let u = |off: usize| {
        info.get(off..off + 4)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u32::from_ne_bytes)
    };
    Ok(MapInfoRaw {
        key_size: u(8),
        value_size: u(12),
        btf_id: u(64),
        btf_key_type_id: u(68),
        btf_value_type_id: u(72),
    })
}

/// The raw BTF blob the kernel holds under `btf_id`.
fn btf_bytes(btf_id: u32) -> std::io::Result<Vec<u8>> {
    let mut a = Attr::new();
    a.put_u32(0, btf_id);
    let fd = sys_bpf(BPF_BTF_GET_FD_BY_ID, &mut a)? as RawFd;
    // SAFETY: the kernel just returned this descriptor to us; owned once here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let info_of = |buf: &mut Vec<u8>| -> std::io::Result<u32> {
        let mut info = [0u8; 32];
        info[0..8].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
        info[8..12].copy_from_slice(&(buf.len() as u32).to_ne_bytes());
        let mut a = Attr::new();
        a.put_u32(0, fd.as_raw_fd() as u32);
        a.put_u32(4, info.len() as u32);
        a.put_u64(8, info.as_mut_ptr() as u64);
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
        Ok(u32::from_ne_bytes([info[8], info[9], info[10], info[11]]))
    };
    let mut buf = Vec::new();
    let size = info_of(&mut buf)? as usize;
    buf.resize(size, 0);
    let got = info_of(&mut buf)? as usize;
    buf.truncate(got.min(size));
    Ok(buf)
}

/// Detaches a bpf_link by id (`BPF_LINK_DETACH`), whoever else holds it: its program stops
/// running at once even while another process (a draining old agent) still has the link open.
pub fn detach_link(link_id: u32) -> std::io::Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, link_id);
    let fd = sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut a)? as RawFd;
    // SAFETY: the kernel just returned this descriptor to us; owned once here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut a = Attr::new();
    a.put_u32(0, fd.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_DETACH, &mut a).map(|_| ())
}

// ---- BTF ----

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One BTF type record: kind, name, `size_or_type`, and where its trailing data starts.
#[derive(Clone, Copy, Debug)]
struct Ty {
    kind: u32,
    vlen: usize,
    kflag: bool,
    size_or_type: u32,
    extra: usize,
}

/// A parsed BTF blob: enough to lay out the structs of map keys and values.
pub struct Btf {
    data: Vec<u8>,
    types: Vec<Ty>,
    strings: (usize, usize),
}

impl Btf {
    pub fn parse(data: Vec<u8>) -> Result<Self, String> {
        let u32_at = |d: &[u8], off: usize| -> Result<u32, String> {
            d.get(off..off + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| format!("BTF truncated at {off}"))
        };
        let magic = data
            .get(0..2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
            .ok_or("BTF too short")?;
        if magic != BTF_MAGIC {
            return Err(format!("not little-endian BTF (magic {magic:#x})"));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let (tstart, tend) = (hdr_len + type_off, hdr_len + type_off + type_len);
        if tend > data.len() || hdr_len + str_off + str_len > data.len() {
            return Err("BTF sections out of bounds".into());
        }
        // Type id 0 is void.
        let mut types = vec![Ty {
            kind: 0,
            vlen: 0,
            kflag: false,
            size_or_type: 0,
            extra: 0,
        }];
        let mut off = tstart;
        while off < tend {
            let info = u32_at(&data, off + 4)?;
            let ty = Ty {
                kind: (info >> 24) & 0x1f,
                vlen: (info & 0xffff) as usize,
                kflag: info >> 31 == 1,
                size_or_type: u32_at(&data, off + 8)?,
                extra: off + 12,
            };
            let trailing = match ty.kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * ty.vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * ty.vlen,
                _ => 0,
            };
            types.push(ty);
            off += 12 + trailing;
        }
        Ok(Self {
            data,
            types,
            strings: (hdr_len + str_off, str_len),
        })
    }

    fn u32_at(&self, off: usize) -> u32 {
        self.data
            .get(off..off + 4)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    fn name(&self, name_off: u32) -> String {
        let start = self.strings.0 + name_off as usize;
        let end = self.strings.0 + self.strings.1;
        let s = self.data.get(start..end).unwrap_or_default();
        let n = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        String::from_utf8_lossy(s.get(..n).unwrap_or_default()).into_owned()
    }

    fn ty(&self, id: u32) -> Option<Ty> {
        self.types.get(id as usize).copied()
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<(u32, Ty)> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some((id, t)),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<usize> {
        let (_, t) = self.resolve(id)?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Some(t.size_or_type as usize)
            }
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let elem = self.u32_at(t.extra);
                let n = self.u32_at(t.extra + 8) as usize;
                Some(self.size_of(elem)? * n)
            }
            _ => None,
        }
    }

    /// The fields of type `id`: a struct's members (bitfields are refused), or one unnamed
    /// field for a scalar or an array.
    pub fn fields(&self, id: u32) -> Result<Vec<Field>, String> {
        let (_, t) = self
            .resolve(id)
            .ok_or_else(|| format!("BTF type {id} unknown"))?;
        if t.kind != KIND_STRUCT {
            let size = self
                .size_of(id)
                .ok_or_else(|| format!("BTF type {id} has no size"))?;
            return Ok(vec![Field {
                name: String::new(),
                offset: 0,
                size,
            }]);
        }
        let mut out = Vec::with_capacity(t.vlen);
        for i in 0..t.vlen {
            let m = t.extra + 12 * i;
            let name = self.name(self.u32_at(m));
            let mty = self.u32_at(m + 4);
            let raw_off = self.u32_at(m + 8);
            let (bit_off, bitfield) = if t.kflag {
                (raw_off & 0x00ff_ffff, raw_off >> 24)
            } else {
                (raw_off, 0)
            };
            if bitfield != 0 || bit_off % 8 != 0 {
                return Err(format!("field {name} is a bitfield"));
            }
            let size = self
                .size_of(mty)
                .ok_or_else(|| format!("field {name} has no size"))?;
            out.push(Field {
                name,
                offset: (bit_off / 8) as usize,
                size,
            });
        }
        Ok(out)
    }
}

/// A map's layout from its BTF: key and value fields and sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub key_size: usize,
    pub value_size: usize,
    pub key: Vec<Field>,
    pub value: Vec<Field>,
}

/// Reads the layout of the map behind `fd` from its BTF (a map without BTF: one unnamed field
/// each, so only an identical size can be carried).
pub fn layout(fd: RawFd) -> Result<Layout, String> {
    let info = map_info(fd).map_err(|e| format!("map info: {e}"))?;
    let (key_size, value_size) = (info.key_size as usize, info.value_size as usize);
    let scalar = |size| {
        vec![Field {
            name: String::new(),
            offset: 0,
            size,
        }]
    };
    if info.btf_id == 0 || info.btf_value_type_id == 0 {
        return Ok(Layout {
            key_size,
            value_size,
            key: scalar(key_size),
            value: scalar(value_size),
        });
    }
    let btf = Btf::parse(btf_bytes(info.btf_id).map_err(|e| format!("map BTF: {e}"))?)?;
    Ok(Layout {
        key_size,
        value_size,
        key: btf.fields(info.btf_key_type_id)?,
        value: btf.fields(info.btf_value_type_id)?,
    })
}

/// Converts one old value into the new layout, into `new` (which holds the new map's current
/// entry, or zeros): by field name, `Add` adding integers, `IfAbsent` copying.
pub fn convert(old: &Layout, new: &Layout, carry: Carry, from: &[u8], into: &mut [u8]) {
    for nf in &new.value {
        let Some(of) = old.value.iter().find(|f| f.name == nf.name) else {
            continue;
        };
        if of.size != nf.size {
            continue;
        }
        let (Some(src), Some(dst)) = (
            from.get(of.offset..of.offset + of.size),
            into.get_mut(nf.offset..nf.offset + nf.size),
        ) else {
            continue;
        };
        match (carry, nf.size) {
            (Carry::Add, 8) => {
                let a = u64::from_ne_bytes(dst.try_into().unwrap_or([0; 8]));
                let b = u64::from_ne_bytes(src.try_into().unwrap_or([0; 8]));
                dst.copy_from_slice(&a.wrapping_add(b).to_ne_bytes());
            }
            (Carry::Add, 4) => {
                let a = u32::from_ne_bytes(dst.try_into().unwrap_or([0; 4]));
                let b = u32::from_ne_bytes(src.try_into().unwrap_or([0; 4]));
                dst.copy_from_slice(&a.wrapping_add(b).to_ne_bytes());
            }
            _ => dst.copy_from_slice(src),
        }
    }
}

/// Carries the entries of the old maps (`old`, by name, opened before their pins were
/// replaced) into the new pinned ones (`new`, by name). Best effort: a map that cannot be read
/// or whose key changed is skipped and reported; nothing here fails the upgrade.
pub fn carry_over(old: &StdHashMap<String, OwnedFd>, new: &StdHashMap<String, RawFd>) -> Report {
    let mut report = Report::default();
    for (name, carry) in CARRIED {
        let (Some(ofd), Some(&nfd)) = (old.get(name), new.get(name)) else {
            continue;
        };
        let (ol, nl) = match (layout(ofd.as_raw_fd()), layout(nfd)) {
            (Ok(o), Ok(n)) => (o, n),
            (Err(e), _) | (_, Err(e)) => {
                warn!(map = name, error = %e, "layout unreadable: entries not carried");
                report.skipped.push(format!("{name}: {e}"));
                continue;
            }
        };
        if ol.key_size != nl.key_size || ol.key != nl.key {
            warn!(map = name, "key layout changed: entries not carried");
            report.skipped.push(format!("{name}: key layout changed"));
            continue;
        }
        for of in &ol.value {
            if !nl
                .value
                .iter()
                .any(|f| f.name == of.name && f.size == of.size)
            {
                report.dropped_fields.push(format!("{name}.{}", of.name));
            }
        }
        let n = copy_entries(ofd.as_raw_fd(), nfd, &ol, &nl, carry);
        report.maps.push((name.to_string(), n));
    }
    info!(
        carried = ?report.maps,
        dropped_fields = ?report.dropped_fields,
        skipped = ?report.skipped,
        "map entries carried over to the new layout"
    );
    report
}

fn copy_entries(ofd: RawFd, nfd: RawFd, ol: &Layout, nl: &Layout, carry: Carry) -> usize {
    let mut key = vec![0u8; ol.key_size];
    let mut next = vec![0u8; ol.key_size];
    let mut oval = vec![0u8; ol.value_size];
    let mut nval = vec![0u8; nl.value_size];
    let mut n = 0;
    let mut first = true;
    // Bounded: a map never holds more than its max_entries; an LRU map being written while
    // it is walked may restart the walk, which the bound stops.
    for _ in 0..1_000_000 {
        let more = get_next_key(ofd, (!first).then_some(key.as_slice()), &mut next);
        match more {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                warn!(error = %e, "walking an old map: stopped");
                break;
            }
        }
        first = false;
        key.copy_from_slice(&next);
        if !matches!(lookup(ofd, &key, &mut oval), Ok(true)) {
            continue;
        }
        nval.iter_mut().for_each(|b| *b = 0);
        let existing = matches!(lookup(nfd, &key, &mut nval), Ok(true));
        if existing && carry == Carry::IfAbsent {
            continue;
        }
        if !existing {
            nval.iter_mut().for_each(|b| *b = 0);
        }
        convert(ol, nl, carry, &oval, &mut nval);
        match update(nfd, &key, &nval) {
            Ok(()) => n += 1,
            Err(e) => warn!(error = %e, "writing a carried entry"),
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, offset: usize, size: usize) -> Field {
        Field {
            name: name.into(),
            offset,
            size,
        }
    }

    #[test]
    fn convert_by_name_adds_counters_and_drops_unknown_fields() {
        // v1: a, b; v2: a, x (new, in the middle), b.
        let v1 = Layout {
            key_size: 8,
            value_size: 16,
            key: vec![f("", 0, 8)],
            value: vec![f("a", 0, 8), f("b", 8, 8)],
        };
        let v2 = Layout {
            key_size: 8,
            value_size: 24,
            key: vec![f("", 0, 8)],
            value: vec![f("a", 0, 8), f("x", 8, 8), f("b", 16, 8)],
        };
        let old: Vec<u8> = [5u64, 7].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut new: Vec<u8> = [1u64, 9, 1].iter().flat_map(|v| v.to_ne_bytes()).collect();
        convert(&v1, &v2, Carry::Add, &old, &mut new);
        let got: Vec<u64> = new
            .chunks(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        assert_eq!(got, vec![6, 9, 8]);
        // Rollback: x is dropped, a and b copied.
        let mut back = vec![0u8; 16];
        convert(&v2, &v1, Carry::IfAbsent, &new, &mut back);
        let got: Vec<u64> = back
            .chunks(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        assert_eq!(got, vec![6, 8]);
    }

    #[test]
    fn btf_of_a_small_struct() {
        // Hand-made BTF: [1] int u64 (8 bytes); [2] struct s { u64 a; u64 b; } (16 bytes).
        let strings = b"\0u64\0s\0a\0b\0";
        let mut types = Vec::new();
        let mut rec = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        rec(&[1, KIND_INT << 24, 8, 64]);
        rec(&[5, (KIND_STRUCT << 24) | 2, 16]);
        rec(&[7, 1, 0]);
        rec(&[9, 1, 64]);
        let mut data = Vec::new();
        data.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(strings);
        let btf = Btf::parse(data).expect("parse");
        assert_eq!(
            btf.fields(2).expect("fields"),
            vec![f("a", 0, 8), f("b", 8, 8)]
        );
        assert_eq!(btf.fields(1).expect("scalar"), vec![f("", 0, 8)]);
    }
}
