//! Cluster addressing: key → slot hashing ([`key_slot`], CRC16-XMODEM with `{hash tag}`
//! rules), `-MOVED` / `-ASK` redirections ([`parse_redirect`]) and the slot map ([`SlotMap`]:
//! 16384 slots → shard, each shard a master and its replicas) parsed from `CLUSTER SHARDS`
//! (Redis >= 7) or `CLUSTER SLOTS`.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;

use crate::resp::Value;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// `slots[]` value for a slot no shard serves.
const UNASSIGNED: u16 = u16::MAX;

/// The `-CROSSSLOT` error Redis answers for multi-key commands across slots (with CRLF).
pub const CROSSSLOT_ERROR: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

// ---------------------------------------------------------------------------------------
// Hashing
// ---------------------------------------------------------------------------------------

/// CRC16-XMODEM (poly 0x1021, init 0, no reflection), the checksum Redis Cluster hashes
/// keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `key` that is hashed: the bytes between the first `{` and the first `}` after
/// it, if that is non-empty; otherwise the whole key (Redis Cluster spec, "hash tags").
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(len) = rest.iter().position(|&b| b == b'}') {
            if len > 0 {
                return &rest[..len];
            }
        }
    }
    key
}

/// The hash slot (0..16383) of `key`.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) & (SLOTS as u16 - 1)
}

/// Returned by [`common_slot`] when keys map to different slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("keys in request don't hash to the same slot ({first} and {other})")]
pub struct CrossSlot {
    pub first: u16,
    pub other: u16,
}

/// The one slot all `keys` hash to (`Ok(None)` for no keys), or [`CrossSlot`]. For the
/// multi-key commands that are not split (e.g. `SUNION`, `RENAME`, `EVAL` keys): on `Err`
/// answer [`crossslot_error`].
pub fn common_slot<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Option<u16>, CrossSlot> {
    let mut slot = None;
    for k in keys {
        let s = key_slot(k);
        match slot {
            None => slot = Some(s),
            Some(first) if first != s => return Err(CrossSlot { first, other: s }),
            Some(_) => {}
        }
    }
    Ok(slot)
}

/// `-CROSSSLOT Keys in request don't hash to the same slot\r\n`, exactly as Redis says it.
pub fn crossslot_error() -> Bytes {
    Bytes::from_static(CROSSSLOT_ERROR)
}

// ---------------------------------------------------------------------------------------
// Redirections
// ---------------------------------------------------------------------------------------

/// A cluster redirection from a backend error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// The slot now lives at `addr` for good: update the map, resend there.
    Moved { slot: u16, addr: SocketAddr },
    /// The slot is being migrated: send `ASKING` then the command to `addr`, once; the map
    /// does not change.
    Ask { slot: u16, addr: SocketAddr },
}

impl Redirect {
    pub fn slot(&self) -> u16 {
        match *self {
            Redirect::Moved { slot, .. } | Redirect::Ask { slot, .. } => slot,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match *self {
            Redirect::Moved { addr, .. } | Redirect::Ask { addr, .. } => addr,
        }
    }

    pub fn is_ask(&self) -> bool {
        matches!(self, Redirect::Ask { .. })
    }
}

/// Parses `-MOVED <slot> <ip>:<port>` / `-ASK <slot> <ip>:<port>` (the leading `-` and the
/// trailing CRLF are optional, so both `Reply::raw` and the bare text work). An empty host
/// (`MOVED 3999 :6381`, sent by nodes whose preferred endpoint is unknown to them) means the
/// host of `current`, the node that answered. Hostnames and `?` endpoints give `None`: the
/// caller then treats the reply as an ordinary error and should call
/// [`Cluster::node_failed`] so the map gets refreshed.
pub fn parse_redirect(err: &[u8], current: SocketAddr) -> Option<Redirect> {
    let err = err.strip_prefix(b"-").unwrap_or(err);
    let err = err.strip_suffix(b"\r\n").unwrap_or(err);
    let (kind, is_ask) = if let Some(rest) = err.strip_prefix(b"MOVED ") {
        (rest, false)
    } else if let Some(rest) = err.strip_prefix(b"ASK ") {
        (rest, true)
    } else {
        return None;
    };
    let text = std::str::from_utf8(kind).ok()?;
    let mut parts = text.split_ascii_whitespace();
    let slot: u16 = parts.next()?.parse().ok()?;
    if usize::from(slot) >= SLOTS {
        return None;
    }
    let addr = parse_host_port(parts.next()?, current.ip())?;
    if parts.next().is_some() {
        return None;
    }
    Some(if is_ask {
        Redirect::Ask { slot, addr }
    } else {
        Redirect::Moved { slot, addr }
    })
}

/// `ip:port`, `[v6]:port` or `:port` (meaning `same_host`).
fn parse_host_port(s: &str, same_host: std::net::IpAddr) -> Option<SocketAddr> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Some(SocketAddr::new(same_host, port));
    }
    host.parse().ok().map(|ip| SocketAddr::new(ip, port))
}

/// One shard: the master serving its slots and the replicas that were healthy when the map
/// was fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub master: SocketAddr,
    pub replicas: Vec<SocketAddr>,
}

/// Which shard serves each of the 16384 slots.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Slot → index into `shards`, or [`UNASSIGNED`].
    slots: Vec<u16>,
    shards: Vec<Shard>,
    /// Masters of shards that own at least one slot, in shard order (derived from `slots`;
    /// cached because keyless commands pick among them on the data path).
    masters: Vec<SocketAddr>,
}

impl std::fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotMap")
            .field("ranges", &self.ranges())
            .field("shards", &self.shards)
            .finish()
    }
}

impl Default for SlotMap {
    fn default() -> Self {
        Self::empty()
    }
}

/// One contiguous slot range as a node reported it, before normalisation.
#[derive(Debug, Clone)]
pub(crate) struct RangeEntry {
    pub(crate) start: u16,
    pub(crate) end: u16,
    pub(crate) master: SocketAddr,
    pub(crate) replicas: Vec<SocketAddr>,
}

impl SlotMap {
    /// No slot assigned (before the first successful fetch).
    pub fn empty() -> Self {
        Self {
            slots: vec![UNASSIGNED; SLOTS],
            shards: Vec::new(),
            masters: Vec::new(),
        }
    }

    /// A map with every slot served by one master (tests and tools).
    pub fn single(master: SocketAddr) -> Self {
        Self::from_ranges(vec![RangeEntry {
            start: 0,
            end: SLOTS as u16 - 1,
            master,
            replicas: Vec::new(),
        }])
    }

    /// Builds a map from `(start, end, master, replicas)` ranges. Shards are numbered in
    /// slot order and replicas sorted, so two fetches of the same cluster compare equal
    /// whichever node answered.
    pub(crate) fn from_ranges(mut ranges: Vec<RangeEntry>) -> Self {
        ranges.sort_by_key(|r| r.start);
        let mut map = Self::empty();
        let mut index: HashMap<SocketAddr, u16> = HashMap::new();
        for r in ranges {
            let idx = match index.get(&r.master) {
                Some(&i) => i,
                None => {
                    let i = map.shards.len() as u16;
                    let mut replicas = r.replicas.clone();
                    replicas.sort();
                    replicas.dedup();
                    map.shards.push(Shard {
                        master: r.master,
                        replicas,
                    });
                    index.insert(r.master, i);
                    i
                }
            };
            for s in r.start..=r.end.min(SLOTS as u16 - 1) {
                map.slots[usize::from(s)] = idx;
            }
        }
        map.recompute_masters();
        map
    }

    /// The shard serving `slot`.
    pub fn shard_of(&self, slot: u16) -> Option<&Shard> {
        let idx = *self.slots.get(usize::from(slot))?;
        self.shards.get(usize::from(idx))
    }

    /// The master serving `slot`.
    pub fn master_of(&self, slot: u16) -> Option<SocketAddr> {
        self.shard_of(slot).map(|s| s.master)
    }

    /// All shards (including ones left without slots by MOVED updates).
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Masters that serve at least one slot, in shard order.
    pub fn masters(&self) -> &[SocketAddr] {
        &self.masters
    }

    fn recompute_masters(&mut self) {
        let mut used = vec![false; self.shards.len()];
        for &i in &self.slots {
            if let Some(u) = used.get_mut(usize::from(i)) {
                *u = true;
            }
        }
        self.masters = self
            .shards
            .iter()
            .zip(used)
            .filter(|(_, u)| *u)
            .map(|(s, _)| s.master)
            .collect();
    }

    /// How many slots have an owner (16384 for a healthy cluster).
    pub fn assigned(&self) -> usize {
        self.slots.iter().filter(|&&i| i != UNASSIGNED).count()
    }

    /// Contiguous ranges `(start, end, master)`.
    pub fn ranges(&self) -> Vec<(u16, u16, SocketAddr)> {
        let mut out: Vec<(u16, u16, SocketAddr)> = Vec::new();
        for (slot, &idx) in self.slots.iter().enumerate() {
            let Some(shard) = self.shards.get(usize::from(idx)) else {
                continue;
            };
            let slot = slot as u16;
            match out.last_mut() {
                Some(last) if last.2 == shard.master && last.1 + 1 == slot => last.1 = slot,
                _ => out.push((slot, slot, shard.master)),
            }
        }
        out
    }

    /// Applies a MOVED: `slot` is now served by master `addr`. Returns whether anything
    /// changed.
    pub fn assign(&mut self, slot: u16, addr: SocketAddr) -> bool {
        let Some(cur) = self.slots.get(usize::from(slot)).copied() else {
            return false;
        };
        if self.shards.get(usize::from(cur)).map(|s| s.master) == Some(addr) {
            return false;
        }
        let idx = match self.shards.iter().position(|s| s.master == addr) {
            Some(i) => i as u16,
            None => {
                self.shards.push(Shard {
                    master: addr,
                    replicas: Vec::new(),
                });
                (self.shards.len() - 1) as u16
            }
        };
        self.slots[usize::from(slot)] = idx;
        self.recompute_masters();
        true
    }

    /// Parses a `CLUSTER SHARDS` reply (RESP2 flat key/value arrays or RESP3 maps). `queried`
    /// is the node that answered (its IP stands in for empty `ip` fields). Only `online`
    /// replicas are kept; a master is kept whatever its health because it still owns the
    /// slots until a failover says otherwise.
    pub fn from_shards_reply(reply: &Value, queried: SocketAddr) -> Result<Self, String> {
        let shards = reply
            .as_array()
            .ok_or("CLUSTER SHARDS reply is not an array")?;
        let mut ranges = Vec::new();
        for shard in shards {
            let slots = shard.field("slots").ok_or("shard without \"slots\"")?;
            let slots = slots.as_array().ok_or("shard \"slots\" is not an array")?;
            let nodes = shard.field("nodes").ok_or("shard without \"nodes\"")?;
            let nodes = nodes.as_array().ok_or("shard \"nodes\" is not an array")?;
            let mut master: Option<(SocketAddr, bool)> = None;
            let mut replicas = Vec::new();
            for node in nodes {
                let ip = node.field("ip").and_then(Value::as_str).unwrap_or("");
                let port = node
                    .field("port")
                    .or_else(|| node.field("tls-port"))
                    .and_then(Value::as_int)
                    .ok_or("shard node without \"port\"")?;
                let Ok(port) = u16::try_from(port) else {
                    return Err(format!("shard node port {port} out of range"));
                };
                let Some(addr) = node_addr(ip, port, queried) else {
                    continue;
                };
                let role = node.field("role").and_then(Value::as_str).unwrap_or("");
                let health = node
                    .field("health")
                    .and_then(Value::as_str)
                    .unwrap_or("online");
                if role == "master" {
                    // With shard ids (Redis >= 7.2) a failed-over old master stays in its
                    // shard, still flagged master but not online: the online one owns the
                    // slots.
                    let online = health == "online";
                    if master.is_none_or(|(_, was_online)| online && !was_online) {
                        master = Some((addr, online));
                    }
                } else if health == "online" {
                    replicas.push(addr);
                }
            }
            let Some((master, _)) = master else {
                // A shard whose master is unknown (all nodes failed/hostname-only): its slots
                // stay unassigned and pick() reports them.
                continue;
            };
            if slots.len() % 2 != 0 {
                return Err("shard \"slots\" has an odd number of bounds".into());
            }
            for pair in slots.chunks(2) {
                let (Some(start), Some(end)) = (pair[0].as_int(), pair[1].as_int()) else {
                    return Err("shard slot bound is not an integer".into());
                };
                let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end)) else {
                    return Err(format!("shard slot range {start}-{end} out of range"));
                };
                if start > end || usize::from(end) >= SLOTS {
                    return Err(format!("shard slot range {start}-{end} is invalid"));
                }
                ranges.push(RangeEntry {
                    start,
                    end,
                    master,
                    replicas: replicas.clone(),
                });
            }
        }
        Ok(Self::from_ranges(ranges))
    }

    /// Parses a `CLUSTER SLOTS` reply: `[[start, end, [ip, port, id, ...], replica...], ...]`.
    pub fn from_slots_reply(reply: &Value, queried: SocketAddr) -> Result<Self, String> {
        let entries = reply
            .as_array()
            .ok_or("CLUSTER SLOTS reply is not an array")?;
        let mut ranges = Vec::new();
        for e in entries {
            let e = e.as_array().ok_or("CLUSTER SLOTS entry is not an array")?;
            if e.len() < 3 {
                return Err("CLUSTER SLOTS entry has fewer than 3 elements".into());
            }
            let (Some(start), Some(end)) = (e[0].as_int(), e[1].as_int()) else {
                return Err("CLUSTER SLOTS bound is not an integer".into());
            };
            let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end)) else {
                return Err(format!("CLUSTER SLOTS range {start}-{end} out of range"));
            };
            if start > end || usize::from(end) >= SLOTS {
                return Err(format!("CLUSTER SLOTS range {start}-{end} is invalid"));
            }
            let node = |v: &Value| -> Option<SocketAddr> {
                let n = v.as_array()?;
                let ip = match n.first()? {
                    Value::Null => return None,
                    other => other.as_str()?,
                };
                let port = u16::try_from(n.get(1)?.as_int()?).ok()?;
                node_addr(ip, port, queried)
            };
            let Some(master) = node(&e[2]) else {
                continue;
            };
            let replicas = e[3..].iter().filter_map(node).collect();
            ranges.push(RangeEntry {
                start,
                end,
                master,
                replicas,
            });
        }
        Ok(Self::from_ranges(ranges))
    }
}

/// A node address from a slot-map reply. Empty ip = the node we asked; `?` or a hostname
/// cannot be used without DNS and is skipped.
fn node_addr(ip: &str, port: u16, queried: SocketAddr) -> Option<SocketAddr> {
    if port == 0 {
        return None;
    }
    if ip.is_empty() {
        return Some(SocketAddr::new(queried.ip(), port));
    }
    ip.parse().ok().map(|ip| SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{addr, bytes};

    #[test]
    fn crc16_matches_the_redis_spec_vector() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"123456789"), 0x31C3 & 0x3FFF);
    }

    #[test]
    fn hash_tags_follow_the_spec() {
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Empty tag: the whole key is hashed.
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        // First '{' to the first '}' after it.
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"{}"), b"{}");
        assert_eq!(hash_tag(b"no-brace}{"), b"no-brace}{");
        assert_eq!(hash_tag(b""), b"");
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn common_slot_and_crossslot() {
        let keys: [&[u8]; 2] = [b"{a}1", b"{a}2"];
        assert_eq!(common_slot(keys), Ok(Some(key_slot(b"a"))));
        let none: [&[u8]; 0] = [];
        assert_eq!(common_slot(none), Ok(None));
        let keys: [&[u8]; 2] = [b"foo", b"bar"];
        assert_eq!(
            common_slot(keys),
            Err(CrossSlot {
                first: 12182,
                other: 5061
            })
        );
        assert_eq!(
            crossslot_error().as_ref(),
            b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
        );
    }

    #[test]
    fn redirects_parse() {
        let cur = addr("10.0.0.5:7000");
        let check = |input: &[u8], want: Option<Redirect>| {
            assert_eq!(
                parse_redirect(input, cur),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            )
        };
        check(
            b"MOVED 3999 127.0.0.1:6381",
            Some(Redirect::Moved {
                slot: 3999,
                addr: addr("127.0.0.1:6381"),
            }),
        );
        check(
            b"-MOVED 3999 127.0.0.1:6381\r\n",
            Some(Redirect::Moved {
                slot: 3999,
                addr: addr("127.0.0.1:6381"),
            }),
        );
        check(
            b"-ASK 3999 127.0.0.1:6381\r\n",
            Some(Redirect::Ask {
                slot: 3999,
                addr: addr("127.0.0.1:6381"),
            }),
        );
        check(
            b"-MOVED 3999 :6381\r\n",
            Some(Redirect::Moved {
                slot: 3999,
                addr: addr("10.0.0.5:6381"),
            }),
        );
        check(
            b"-ASK 0 :6381",
            Some(Redirect::Ask {
                slot: 0,
                addr: addr("10.0.0.5:6381"),
            }),
        );
        check(
            b"-MOVED 16383 [::1]:6381",
            Some(Redirect::Moved {
                slot: 16383,
                addr: addr("[::1]:6381"),
            }),
        );
        check(
            b"-MOVED 16383 ::1:6381",
            Some(Redirect::Moved {
                slot: 16383,
                addr: addr("[::1]:6381"),
            }),
        );
        check(b"-MOVED 16384 127.0.0.1:6381", None);
        check(b"-MOVED x 127.0.0.1:6381", None);
        check(b"-MOVED 1 redis-0.redis:6381", None);
        check(b"-MOVED 1 ?:6381", None);
        check(b"-MOVED 1 127.0.0.1:99999", None);
        check(b"-MOVED 1", None);
        check(b"-MOVED 1 127.0.0.1:6381 extra", None);
        check(b"-ERR MOVED 1 127.0.0.1:6381", None);
        check(b"-ASKING 1 127.0.0.1:6381", None);
        check(b"", None);
        let r = parse_redirect(b"-ASK 7 1.2.3.4:5", cur).expect("ask");
        assert!(r.is_ask());
        assert_eq!((r.slot(), r.addr()), (7, addr("1.2.3.4:5")));
    }

    fn node2(id: &str, ip: &str, port: i64, role: &str, health: &str) -> Value {
        let s = |x: &str| Value::Bulk(bytes(x));
        Value::Array(vec![
            s("id"),
            s(id),
            s("port"),
            Value::Int(port),
            s("ip"),
            s(ip),
            s("endpoint"),
            s(ip),
            s("role"),
            s(role),
            s("replication-offset"),
            Value::Int(1),
            s("health"),
            s(health),
        ])
    }

    #[test]
    fn slot_map_from_shards_resp2() {
        let s = |x: &str| Value::Bulk(bytes(x));
        let reply = Value::Array(vec![
            Value::Array(vec![
                s("slots"),
                Value::Array(vec![Value::Int(5461), Value::Int(10922)]),
                s("nodes"),
                Value::Array(vec![
                    node2("b", "127.0.0.1", 7001, "master", "online"),
                    node2("e", "127.0.0.1", 7004, "replica", "online"),
                    node2("f", "127.0.0.1", 7005, "replica", "failed"),
                ]),
            ]),
            Value::Array(vec![
                s("slots"),
                Value::Array(vec![
                    Value::Int(0),
                    Value::Int(5460),
                    Value::Int(10923),
                    Value::Int(16383),
                ]),
                s("nodes"),
                Value::Array(vec![node2("a", "", 7000, "master", "online")]),
            ]),
            // A shard without slots (e.g. a new empty master) assigns nothing.
            Value::Array(vec![
                s("slots"),
                Value::Array(vec![]),
                s("nodes"),
                Value::Array(vec![node2("c", "127.0.0.1", 7002, "master", "online")]),
            ]),
        ]);
        let m = SlotMap::from_shards_reply(&reply, addr("127.0.0.9:7000")).expect("map");
        assert_eq!(m.assigned(), SLOTS);
        assert_eq!(m.master_of(0), Some(addr("127.0.0.9:7000")));
        assert_eq!(m.master_of(5461), Some(addr("127.0.0.1:7001")));
        assert_eq!(m.master_of(16383), Some(addr("127.0.0.9:7000")));
        assert_eq!(
            m.shard_of(6000).map(|s| s.replicas.clone()),
            Some(vec![addr("127.0.0.1:7004")])
        );
        assert_eq!(
            m.masters(),
            vec![addr("127.0.0.9:7000"), addr("127.0.0.1:7001")]
        );
        assert_eq!(m.ranges().len(), 3);
        // The same cluster described in another order compares equal.
        let Value::Array(mut shards) = reply.clone() else {
            unreachable!()
        };
        shards.reverse();
        let m2 =
            SlotMap::from_shards_reply(&Value::Array(shards), addr("127.0.0.9:7000")).expect("map");
        assert_eq!(m, m2);
    }

    #[test]
    fn slot_map_from_shards_resp3_map() {
        let s = |x: &str| Value::Bulk(bytes(x));
        let node = Value::Map(vec![
            (s("port"), Value::Int(7000)),
            (s("ip"), s("10.1.1.1")),
            (s("role"), s("master")),
            (s("health"), s("online")),
        ]);
        let reply = Value::Array(vec![Value::Map(vec![
            (
                s("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(16383)]),
            ),
            (s("nodes"), Value::Array(vec![node])),
        ])]);
        let m = SlotMap::from_shards_reply(&reply, addr("127.0.0.1:1")).expect("map");
        assert_eq!(m.master_of(9999), Some(addr("10.1.1.1:7000")));
    }

    #[test]
    fn slot_map_prefers_the_online_master_of_a_shard() {
        let s = |x: &str| Value::Bulk(bytes(x));
        for order in [[0, 1], [1, 0]] {
            let nodes = [
                node2("old", "127.0.0.1", 7000, "master", "failed"),
                node2("new", "127.0.0.1", 7003, "master", "online"),
            ];
            let reply = Value::Array(vec![Value::Array(vec![
                s("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(16383)]),
                s("nodes"),
                Value::Array(order.iter().map(|&i| nodes[i].clone()).collect()),
            ])]);
            let m = SlotMap::from_shards_reply(&reply, addr("127.0.0.1:1")).expect("map");
            assert_eq!(m.master_of(0), Some(addr("127.0.0.1:7003")));
        }
    }

    #[test]
    fn slot_map_rejects_bad_shards() {
        let s = |x: &str| Value::Bulk(bytes(x));
        let bad = Value::Array(vec![Value::Array(vec![
            s("slots"),
            Value::Array(vec![Value::Int(10), Value::Int(5)]),
            s("nodes"),
            Value::Array(vec![node2("a", "127.0.0.1", 7000, "master", "online")]),
        ])]);
        assert!(SlotMap::from_shards_reply(&bad, addr("127.0.0.1:1")).is_err());
        assert!(SlotMap::from_shards_reply(&Value::Int(1), addr("127.0.0.1:1")).is_err());
    }

    #[test]
    fn slot_map_from_slots() {
        let s = |x: &str| Value::Bulk(bytes(x));
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                Value::Array(vec![
                    s("127.0.0.1"),
                    Value::Int(7000),
                    s("id-a"),
                    Value::Array(vec![]),
                ]),
                Value::Array(vec![s(""), Value::Int(7003), s("id-d")]),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                Value::Array(vec![s("127.0.0.1"), Value::Int(7001), s("id-b")]),
                Value::Array(vec![s("?"), Value::Int(7004), s("id-e")]),
            ]),
        ]);
        let m = SlotMap::from_slots_reply(&reply, addr("10.0.0.1:7000")).expect("map");
        assert_eq!(m.assigned(), SLOTS);
        assert_eq!(m.master_of(8191), Some(addr("127.0.0.1:7000")));
        assert_eq!(
            m.shard_of(0).map(|s| s.replicas.clone()),
            Some(vec![addr("10.0.0.1:7003")])
        );
        assert_eq!(m.shard_of(8192).map(|s| s.replicas.len()), Some(0));
        assert_eq!(m.master_of(16383), Some(addr("127.0.0.1:7001")));
    }

    #[test]
    fn slot_map_assign_moves_one_slot() {
        let mut m = SlotMap::from_ranges(vec![RangeEntry {
            start: 0,
            end: 16383,
            master: addr("127.0.0.1:1"),
            replicas: vec![],
        }]);
        assert!(!m.assign(5, addr("127.0.0.1:1")));
        assert!(m.assign(5, addr("127.0.0.1:2")));
        assert_eq!(m.master_of(5), Some(addr("127.0.0.1:2")));
        assert_eq!(m.master_of(4), Some(addr("127.0.0.1:1")));
        assert_eq!(m.ranges().len(), 3);
        assert!(m.assign(6, addr("127.0.0.1:2")));
        assert_eq!(m.shards().len(), 2);
        assert!(SlotMap::empty().master_of(0).is_none());
    }
}
