//! Big keys: the request-size guard and the big-reply table.
//!
//! The guard refuses a write whose value argument is over `max_value_bytes` before it is
//! forwarded (`-ERR datamesh proxy: value of N bytes for SET is over max_value_bytes (M)`).
//! Which arguments are values is decided per command class ([`value_args`]): the key
//! positions come from the command table, the values are what follows them. Each value is
//! checked on its own (a list of a million small members is a big key too, but it is found
//! by the reply detection, not refused on the way in). `proxy.max_bulk_len` stays the
//! decoder's limit on any bulk string (a protocol error that closes the connection); this
//! one is a per-command refusal that keeps the connection.
//!
//! Big replies: a reply over `reply_bytes`, or an aggregate reply with more than
//! `reply_elements` elements (its RESP header's count; a map's entries count twice, as in
//! RESP2), is counted per endpoint, key and command in a bounded table ([`BigKeys`]: at most
//! [`MAX_KEYS`] keys, the least-counted, then the oldest, evicted), with per-pod counts
//! (at most [`MAX_PODS`] pods per key). A reply smaller than [`BigKeySettings::floor`] costs
//! one comparison: an aggregate of `n` elements is at least `4 n` bytes (`:0\r\n`), so no
//! header is parsed below `min(reply_bytes, 4 * reply_elements)`. The table's lock is taken
//! only for a big reply.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use crate::commands::CommandSpec;
pub use crate::keydisplay::KeyDisplay;
use crate::resp::Command;

/// Keys the big-reply table holds at most.
pub const MAX_KEYS: usize = 256;
/// Pods counted per key at most (the rest are summed under `other`).
pub const MAX_PODS: usize = 8;
/// Key bytes shown with `key_display: truncated`.
pub const DEFAULT_REPLY_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_REPLY_ELEMENTS: u64 = 10_000;
/// How long a key and command that gave a big reply stay refused (`bigkeys.refuse_s`).
pub const DEFAULT_REFUSE_S: u64 = 300;

/// The big-key settings every session reads (part of the session settings, swapped on
/// reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BigKeySettings {
    /// Largest value argument of a write (0 = no guard).
    pub max_value_bytes: u64,
    /// A reply over this many bytes is big (0 = byte size not checked).
    pub reply_bytes: u64,
    /// An aggregate reply with more elements is big (0 = not checked).
    pub reply_elements: u64,
    pub key_display: KeyDisplay,
    /// Refuse a pod's command whose key and command gave a big reply within `refuse_s`
    /// (node-local clients are never refused).
    pub refuse: bool,
    pub refuse_s: u64,
}

impl Default for BigKeySettings {
    fn default() -> Self {
        Self {
            max_value_bytes: 0,
            reply_bytes: DEFAULT_REPLY_BYTES,
            reply_elements: DEFAULT_REPLY_ELEMENTS,
            key_display: KeyDisplay::Truncated,
            refuse: false,
            refuse_s: DEFAULT_REFUSE_S,
        }
    }
}

impl BigKeySettings {
    /// Replies shorter than this are never big (the one comparison on the reply path).
    pub fn floor(&self) -> usize {
        let by_bytes = match self.reply_bytes {
            0 => u64::MAX,
            b => b.saturating_add(1),
        };
        let by_elements = match self.reply_elements {
            0 => u64::MAX,
            n => n.saturating_add(1).saturating_mul(4),
        };
        usize::try_from(by_bytes.min(by_elements)).unwrap_or(usize::MAX)
    }

    /// The reply's element count when it is big, or 0 when only its size is; None when it is
    /// not big.
    pub fn big(&self, raw: &[u8]) -> Option<u64> {
        let elements = aggregate_len(raw).unwrap_or(0);
        let by_bytes = self.reply_bytes != 0 && raw.len() as u64 > self.reply_bytes;
        let by_elements = self.reply_elements != 0 && elements > self.reply_elements;
        (by_bytes || by_elements).then_some(elements)
    }
}

/// The element count of an aggregate reply from its header (`*n`, `~n`, `>n`; `%n` counts
/// `2 n`); None for other replies.
pub fn aggregate_len(raw: &[u8]) -> Option<u64> {
    let (&kind, rest) = raw.split_first()?;
    let end = rest.iter().take(21).position(|b| *b == b'\r')?;
    let digits = rest.get(..end)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })?;
    match kind {
        b'*' | b'~' | b'>' => Some(n),
        b'%' => Some(n.saturating_mul(2)),
        _ => None,
    }
}

/// Which arguments of a write are values, by command class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueArgs {
    /// One value at this position (SET key value ...: 2).
    At(usize),
    /// Every other argument from this position (MSET k v k v: 2; HSET key f v f v: 3).
    Pairs(usize),
    /// Every argument from this position (RPUSH key e e ...: 2); options and scores mixed in
    /// (ZADD's NX, XADD's MAXLEN) are small and never the largest.
    Rest(usize),
}

/// The value arguments of `spec`, or None when it takes no values the guard checks.
pub fn value_args(spec: &CommandSpec) -> Option<ValueArgs> {
    use ValueArgs::*;
    Some(match spec.name {
        "set" | "setnx" | "getset" | "append" | "publish" | "spublish" => At(2),
        "setex" | "psetex" | "setrange" | "lset" | "hsetnx" | "restore" | "smove" => At(3),
        "linsert" => At(4),
        "mset" | "msetnx" => Pairs(2),
        "hset" | "hmset" => Pairs(3),
        "rpush" | "lpush" | "rpushx" | "lpushx" | "sadd" | "zadd" | "xadd" | "pfadd" | "geoadd" => {
            Rest(2)
        }
        _ => return None,
    })
}

/// The size of `cmd`'s largest value argument (None: no values, or too few arguments: the
/// arity check answers those).
pub fn largest_value(spec: &CommandSpec, cmd: &Command) -> Option<usize> {
    let (from, step) = match value_args(spec)? {
        ValueArgs::At(i) => return cmd.args.get(i).map(Bytes::len),
        ValueArgs::Pairs(i) => (i, 2),
        ValueArgs::Rest(i) => (i, 1),
    };
    cmd.args
        .iter()
        .skip(from)
        .step_by(step)
        .map(Bytes::len)
        .max()
}

/// The text of a refusal by `bigkeys.refuse`.
pub fn reply_refusal(command: &str, key: &str, r: &Recent, refuse_s: u64) -> String {
    let hint = match command {
        "hgetall" | "hkeys" | "hvals" => "read it in parts with HSCAN",
        "smembers" | "sinter" | "sunion" | "sdiff" => "read it in parts with SSCAN",
        "lrange" => "read it in parts with smaller LRANGE ranges",
        "zrange" | "zrangebyscore" | "zrevrange" | "zrangebylex" => {
            "read it in parts with ZSCAN or smaller ranges"
        }
        "get" | "getex" | "getdel" | "getrange" => "read it in parts with GETRANGE",
        _ => "read it in parts",
    };
    format!(
        "ERR datamesh proxy: {} of key {key} gave a big reply ({} bytes, {} elements) within the last {refuse_s} s; big replies are refused for pods (bigkeys.refuse): {hint}",
        command.to_ascii_uppercase(),
        r.bytes,
        r.elements
    )
}

/// The refusal's text.
pub fn refusal(bytes: usize, command: &str, max: u64) -> String {
    format!(
        "ERR datamesh proxy: value of {bytes} bytes for {} is over max_value_bytes ({max})",
        command.to_ascii_uppercase()
    )
}

/// What a reply slot carries for the big-reply check: its command and first key (moved out
/// of the command's arguments once it is routed: no copy).
#[derive(Debug, Clone)]
pub struct BigTag {
    pub key: Option<Bytes>,
    pub command: &'static str,
    /// The command's [`recent_id`] while `bigkeys.refuse` is on (for a pod's command).
    pub recent: Option<u64>,
}

/// How a keyless command's big replies are listed (KEYS, SCAN ...).
pub const NO_KEY: &str = "(no key)";

/// One key's big replies.
#[derive(Debug, Clone, Serialize)]
pub struct BigKey {
    pub endpoint: String,
    pub key: String,
    pub command: &'static str,
    pub count: u64,
    pub max_bytes: u64,
    pub max_elements: u64,
    /// Unix seconds of the last big reply.
    pub last_seen: u64,
    /// Pods by count, highest first.
    pub top_pods: Vec<PodCount>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodCount {
    pub pod: String,
    pub count: u64,
}

/// The bounded table of big keys, shared by every session of the proxy.
#[derive(Default)]
pub struct BigKeys {
    table: Mutex<HashMap<(String, String, &'static str), BigKey>>,
    /// For `bigkeys.refuse`: the commands (endpoint, name, arguments: [`recent_id`]) that gave
    /// a big reply lately, with when and how big (the table's keys are shown as
    /// `key_display` says, which can collide: not usable to refuse). At most [`MAX_KEYS`].
    recent: RwLock<HashMap<u64, Recent>>,
}

/// A recent big reply, for the refusal.
#[derive(Debug, Clone, Copy)]
pub struct Recent {
    pub at: Instant,
    pub bytes: u64,
    pub elements: u64,
}

/// The identity of a command in [`BigKeys`]' recent set: its endpoint, its name and every
/// argument after it (so `LRANGE k 0 -1` that was big does not refuse `LRANGE k 0 99`).
pub fn recent_id(endpoint: &str, command: &str, args: &[Bytes]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // Keyed per process, like the hash maps' own hashing.
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = STATE
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    h.write(endpoint.as_bytes());
    h.write_u8(0);
    h.write(command.as_bytes());
    for a in args {
        h.write_usize(a.len());
        h.write(a);
    }
    h.finish()
}

impl BigKeys {
    /// Remembers a big reply of the command `id` ([`recent_id`]) for `bigkeys.refuse`.
    pub fn note_recent(&self, id: u64, bytes: u64, elements: u64, now: Instant) {
        let mut r = self.recent.write().unwrap_or_else(|p| p.into_inner());
        if !r.contains_key(&id) && r.len() >= MAX_KEYS {
            if let Some(oldest) = r.iter().min_by_key(|(_, v)| v.at).map(|(k, _)| *k) {
                r.remove(&oldest);
            }
        }
        r.insert(
            id,
            Recent {
                at: now,
                bytes,
                elements,
            },
        );
    }

    /// The big reply `id` gave within `within` of `now`, if it did.
    pub fn recent(&self, id: u64, within: Duration, now: Instant) -> Option<Recent> {
        let r = self.recent.read().unwrap_or_else(|p| p.into_inner());
        r.get(&id)
            .copied()
            .filter(|v| now.saturating_duration_since(v.at) < within)
    }

    /// Counts one big reply. `key` is shown as the settings say.
    pub fn record(
        &self,
        endpoint: &str,
        key: &str,
        command: &'static str,
        pod: &str,
        bytes: u64,
        elements: u64,
    ) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let id = (endpoint.to_string(), key.to_string(), command);
        if !t.contains_key(&id) && t.len() >= MAX_KEYS {
            // The least-counted, then the least recently seen, makes room.
            if let Some(victim) = t
                .iter()
                .min_by_key(|(_, e)| (e.count, e.last_seen))
                .map(|(k, _)| k.clone())
            {
                t.remove(&victim);
            }
        }
        let e = t.entry(id).or_insert_with(|| BigKey {
            endpoint: endpoint.to_string(),
            key: key.to_string(),
            command,
            count: 0,
            max_bytes: 0,
            max_elements: 0,
            last_seen: now,
            top_pods: Vec::new(),
        });
        e.count += 1;
        e.max_bytes = e.max_bytes.max(bytes);
        e.max_elements = e.max_elements.max(elements);
        e.last_seen = now;
        let name = if e.top_pods.iter().any(|p| p.pod == pod) || e.top_pods.len() < MAX_PODS {
            pod
        } else {
            "other"
        };
        match e.top_pods.iter_mut().find(|p| p.pod == name) {
            Some(p) => p.count += 1,
            None => e.top_pods.push(PodCount {
                pod: name.to_string(),
                count: 1,
            }),
        }
        e.top_pods.sort_by_key(|p| std::cmp::Reverse(p.count));
    }

    /// Every key, by endpoint, then count (highest first).
    pub fn snapshot(&self) -> Vec<BigKey> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<BigKey> = t.values().cloned().collect();
        v.sort_by(|a, b| {
            a.endpoint
                .cmp(&b.endpoint)
                .then(b.count.cmp(&a.count))
                .then(a.key.cmp(&b.key))
        });
        v
    }

    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::lookup;

    fn largest(args: &[&str]) -> Option<usize> {
        let cmd = Command::from_args(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())));
        let spec = lookup(cmd.name()).expect("known command");
        largest_value(spec, &cmd)
    }

    #[test]
    fn value_positions_per_class() {
        assert_eq!(largest(&["SET", "k", "12345", "EX", "100"]), Some(5));
        assert_eq!(largest(&["SETEX", "k", "100", "1234567"]), Some(7));
        assert_eq!(largest(&["MSET", "kkkkkkkkkk", "1", "k2", "123"]), Some(3));
        assert_eq!(
            largest(&["HSET", "h", "ffffffffffff", "1", "g", "12"]),
            Some(2)
        );
        assert_eq!(largest(&["RPUSH", "l", "a", "abcd", "ab"]), Some(4));
        assert_eq!(largest(&["ZADD", "z", "NX", "1", "member"]), Some(6));
        assert_eq!(largest(&["GET", "kkkkkkkkkkkkkkkk"]), None);
        // Odd or short argument lists never panic (arity errors are answered elsewhere).
        assert_eq!(largest(&["SET"]), None);
        assert_eq!(largest(&["SET", "k"]), None);
        assert_eq!(largest(&["HSET", "h", "f"]), None);
        assert_eq!(largest(&["MSET", "k"]), None);
        assert_eq!(largest(&["LINSERT", "l", "BEFORE"]), None);
    }

    #[test]
    fn refusal_names_the_limit() {
        assert_eq!(
            refusal(2048, "set", 1024),
            "ERR datamesh proxy: value of 2048 bytes for SET is over max_value_bytes (1024)"
        );
    }

    #[test]
    fn aggregate_headers() {
        assert_eq!(aggregate_len(b"*3\r\n:1\r\n:2\r\n:3\r\n"), Some(3));
        assert_eq!(aggregate_len(b"%2\r\n"), Some(4));
        assert_eq!(aggregate_len(b"~0\r\n"), Some(0));
        assert_eq!(aggregate_len(b"*-1\r\n"), None);
        assert_eq!(aggregate_len(b"$3\r\nabc\r\n"), None);
        assert_eq!(aggregate_len(b"*"), None);
        assert_eq!(aggregate_len(b""), None);
    }

    #[test]
    fn floor_and_big() {
        let s = BigKeySettings {
            reply_bytes: 1000,
            reply_elements: 10,
            ..Default::default()
        };
        assert_eq!(s.floor(), 44);
        let mut agg = b"*11\r\n".to_vec();
        agg.extend(std::iter::repeat_n(&b":1\r\n"[..], 11).flatten());
        assert!(agg.len() >= s.floor());
        assert_eq!(s.big(&agg), Some(11));
        assert_eq!(s.big(b"*2\r\n:1\r\n:2\r\n"), None);
        let bulk = vec![b'x'; 1001];
        assert_eq!(s.big(&bulk), Some(0));
        let off = BigKeySettings {
            reply_bytes: 0,
            reply_elements: 0,
            ..Default::default()
        };
        assert_eq!(off.floor(), usize::MAX);
    }

    #[test]
    fn table_is_bounded_and_counts_pods() {
        let t = BigKeys::default();
        t.record("cache", "big", "hgetall", "pod-a", 10, 20_000);
        t.record("cache", "big", "hgetall", "pod-a", 10, 20_000);
        t.record("cache", "big", "hgetall", "pod-b", 5, 30_000);
        let s = t.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].count, 3);
        assert_eq!(s[0].max_elements, 30_000);
        assert_eq!(s[0].top_pods[0].pod, "pod-a");
        assert_eq!(s[0].top_pods[0].count, 2);
        for i in 0..MAX_KEYS + 10 {
            t.record("cache", &format!("k{i}"), "get", "pod-a", 1, 0);
        }
        assert_eq!(t.len(), MAX_KEYS);
        // The most-counted key survived the churn.
        assert!(t.snapshot().iter().any(|e| e.key == "big"));
        for i in 0..MAX_PODS + 3 {
            t.record("cache", "big", "hgetall", &format!("p{i}"), 1, 0);
        }
        let big = t.snapshot().into_iter().find(|e| e.key == "big");
        let pods = big.map(|e| e.top_pods).unwrap_or_default();
        assert_eq!(pods.len(), MAX_PODS + 1);
        assert!(pods.iter().any(|p| p.pod == "other" && p.count == 5));
    }
}
