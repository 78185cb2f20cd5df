//! The command table: for every command the proxy knows, its arity, its data flags
//! (read-only, write, blocking), how it runs ([`Kind`]: forwarded, split or broadcast in
//! cluster mode, answered by the proxy, transaction, pub/sub, refused with a reason), where its
//! keys are, and what resending it after a lost connection could do ([`ReplayClass`]). The
//! session dispatches on [`Kind`] and the enums inside it, never on command-name strings;
//! cluster mode uses the key positions for slots.
//!
//! Who may run what is the command policy's business ([`acl`]: Redis ACL rules over the
//! categories of a real server's `COMMAND` reply); [`Kind::Refused`] is only for commands that
//! cannot work through a multiplexing proxy whoever sends them.
//!
//! Commands not in the table are forwarded as they are (the backend answers its own
//! unknown-command error); in cluster mode they are routed by their first argument, and a lost
//! connection treats them as writes.

pub mod acl;

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::request::ReplayClass;
use crate::resp::Command;

/// Only reads data: may go to a replica when the endpoint reads from replicas, and may be
/// resent after its connection died.
pub const READONLY: u32 = 1 << 0;
/// Changes data.
pub const WRITE: u32 = 1 << 1;
/// Always blocks: runs on a dedicated backend connection.
pub const BLOCKING: u32 = 1 << 2;
/// Blocks when given the BLOCK option (XREAD, XREADGROUP).
pub const MAYBE_BLOCKING: u32 = 1 << 3;
/// Allowed before AUTH (like Redis: AUTH, HELLO, QUIT, RESET); never refused by the command
/// policy either (a client can always change user or leave).
pub const NO_AUTH: u32 = 1 << 4;
/// Runs a script or function (EVAL, EVALSHA, FCALL and their _RO forms): tracked while in
/// flight, so its user may SCRIPT KILL / FUNCTION KILL it.
pub const SCRIPT: u32 = 1 << 5;

/// Where the keys of a command are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    None,
    /// Arguments `first..=last` every `step`; a negative `last` counts from the end (-1 = last).
    Range {
        first: usize,
        last: isize,
        step: usize,
    },
    /// A count of keys at `at`, the keys right after it (LMPOP, ZUNION, EVAL at 2 ...).
    Counted {
        at: usize,
    },
    /// A destination key at 1, then a count at 2 and the keys (ZUNIONSTORE ...).
    DestCounted,
    /// Keys after the STREAMS option, the first half of what follows it (XREAD, XREADGROUP).
    Streams,
    /// A container command whose key is argument 2 (OBJECT ENCODING key, XINFO STREAM key).
    Sub,
}

/// How a multi-key command is split across cluster slots and merged back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiKey {
    /// MGET: array of values in key order.
    Mget,
    /// MSET: key/value pairs, reply +OK.
    Mset,
    /// DEL, UNLINK, EXISTS, TOUCH: sum of integers.
    Sum,
}

/// How a broadcast command's replies are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broadcast {
    /// Every node must answer +OK (FLUSHALL, FLUSHDB, SCRIPT FLUSH).
    AllOk,
    /// Sum of integers (DBSIZE).
    Sum,
    /// Concatenated arrays (KEYS).
    Concat,
    /// The first node's reply, after all succeeded (SCRIPT LOAD).
    First,
}

/// Connection-state commands the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Ping,
    Echo,
    Quit,
    Reset,
    Hello,
    Auth,
    Select,
    Client,
    ReadOnly,
    ReadWrite,
    Asking,
    /// Answered as a one-node cluster for cluster backends; forwarded to standalone ones.
    Cluster,
    /// `ACL WHOAMI/USERS/CAT/LOG` from the proxy's users and log; the rest refused
    /// ([`ACL_REFUSED`]).
    Acl,
}

/// Why the ACL subcommands the proxy does not answer are refused.
pub const ACL_REFUSED: &str = "users are configured at the proxy (users) and the backend credentials in the endpoint's backend config";

/// Transaction commands (run on the client's dedicated connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tx {
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
}

/// Pub/sub subscription commands (run on the client's subscription connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSub {
    Subscribe,
    PSubscribe,
    SSubscribe,
    Unsubscribe,
    PUnsubscribe,
    SUnsubscribe,
}

impl PubSub {
    /// True for the three unsubscribe commands.
    pub fn is_unsubscribe(self) -> bool {
        matches!(
            self,
            PubSub::Unsubscribe | PubSub::PUnsubscribe | PubSub::SUnsubscribe
        )
    }
}

/// How a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sent to a backend as it is (a dedicated connection when [`is_blocking`]).
    Forward,
    /// Forwarded; in cluster mode split per slot and merged back.
    Split(MultiKey),
    /// Forwarded; in cluster mode run on every master and merged.
    Broadcast(Broadcast),
    /// SCAN: forwarded, but refused in cluster mode (a cursor cannot span nodes).
    Scan,
    Local(Local),
    Tx(Tx),
    PubSub(PubSub),
    /// Answered with an error naming the reason.
    Refused(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    pub name: &'static str,
    /// Redis convention: positive = exact argument count (name included), negative = minimum.
    pub arity: i32,
    pub flags: u32,
    pub kind: Kind,
    pub keys: Keys,
    /// What resending it after its connection died could do (when it was written).
    pub replay: ReplayClass,
}

impl CommandSpec {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// True when `argc` (name included) fits the arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        if self.arity >= 0 {
            argc == self.arity as usize
        } else {
            argc >= (-self.arity) as usize
        }
    }
}

/// The replay class of a forwarded command from its flags: reads may be resent, blocking
/// commands hold connection state (a resent pop takes a second element), anything else is a
/// write whose outcome is unknown once written.
const fn replay_of(flags: u32) -> ReplayClass {
    if flags & (BLOCKING | MAYBE_BLOCKING) != 0 && flags & READONLY == 0 {
        ReplayClass::Stateful
    } else if flags & READONLY != 0 {
        ReplayClass::ReadOnly
    } else {
        ReplayClass::Write
    }
}

const fn c(name: &'static str, arity: i32, flags: u32, keys: Keys) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags,
        kind: Kind::Forward,
        keys,
        replay: replay_of(flags),
    }
}

const fn k1() -> Keys {
    Keys::Range {
        first: 1,
        last: 1,
        step: 1,
    }
}
const fn k12() -> Keys {
    Keys::Range {
        first: 1,
        last: 2,
        step: 1,
    }
}
const fn kall() -> Keys {
    Keys::Range {
        first: 1,
        last: -1,
        step: 1,
    }
}
const fn kblock() -> Keys {
    Keys::Range {
        first: 1,
        last: -2,
        step: 1,
    }
}
const fn kpairs() -> Keys {
    Keys::Range {
        first: 1,
        last: -1,
        step: 2,
    }
}
const N: Keys = Keys::None;
const R: u32 = READONLY;
const W: u32 = WRITE;

const fn kind(mut s: CommandSpec, k: Kind) -> CommandSpec {
    s.kind = k;
    s
}
const fn split(s: CommandSpec, m: MultiKey) -> CommandSpec {
    kind(s, Kind::Split(m))
}
const fn bcast(s: CommandSpec, b: Broadcast) -> CommandSpec {
    kind(s, Kind::Broadcast(b))
}
const fn local(name: &'static str, arity: i32, l: Local, flags: u32) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags,
        kind: Kind::Local(l),
        keys: Keys::None,
        replay: ReplayClass::Stateful,
    }
}
const fn tx(name: &'static str, arity: i32, t: Tx, keys: Keys) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags: 0,
        kind: Kind::Tx(t),
        keys,
        replay: ReplayClass::Stateful,
    }
}
const fn pubsub(name: &'static str, arity: i32, p: PubSub, keys: Keys) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags: 0,
        kind: Kind::PubSub(p),
        keys,
        replay: ReplayClass::PubSub,
    }
}
const fn refused(name: &'static str, reason: &'static str) -> CommandSpec {
    CommandSpec {
        name,
        arity: -1,
        flags: 0,
        kind: Kind::Refused(reason),
        keys: Keys::None,
        replay: ReplayClass::Write,
    }
}

const REPL: &str = "replication commands need a direct connection to the server";

static TABLE: &[CommandSpec] = &[
    // strings
    c("get", 2, R, k1()),
    c("set", -3, W, k1()),
    c("setnx", 3, W, k1()),
    c("setex", 4, W, k1()),
    c("psetex", 4, W, k1()),
    c("getset", 3, W, k1()),
    c("getdel", 2, W, k1()),
    c("getex", -2, W, k1()),
    c("append", 3, W, k1()),
    c("strlen", 2, R, k1()),
    c("incr", 2, W, k1()),
    c("decr", 2, W, k1()),
    c("incrby", 3, W, k1()),
    c("decrby", 3, W, k1()),
    c("incrbyfloat", 3, W, k1()),
    c("getrange", 4, R, k1()),
    c("substr", 4, R, k1()),
    c("setrange", 4, W, k1()),
    split(c("mget", -2, R, kall()), MultiKey::Mget),
    split(c("mset", -3, W, kpairs()), MultiKey::Mset),
    c("msetnx", -3, W, kpairs()),
    c("lcs", -3, R, k12()),
    // keyspace
    split(c("del", -2, W, kall()), MultiKey::Sum),
    split(c("unlink", -2, W, kall()), MultiKey::Sum),
    split(c("exists", -2, R, kall()), MultiKey::Sum),
    split(c("touch", -2, R, kall()), MultiKey::Sum),
    c("expire", -3, W, k1()),
    c("pexpire", -3, W, k1()),
    c("expireat", -3, W, k1()),
    c("pexpireat", -3, W, k1()),
    c("expiretime", 2, R, k1()),
    c("pexpiretime", 2, R, k1()),
    c("ttl", 2, R, k1()),
    c("pttl", 2, R, k1()),
    c("persist", 2, W, k1()),
    c("type", 2, R, k1()),
    c("rename", 3, W, k12()),
    c("renamenx", 3, W, k12()),
    c("copy", -3, W, k12()),
    c("move", 3, W, k1()),
    c("dump", 2, R, k1()),
    c("restore", -4, W, k1()),
    c("object", -2, R, Keys::Sub),
    c("memory", -2, R, Keys::Sub),
    c("randomkey", 1, R, N),
    bcast(c("keys", 2, R, N), Broadcast::Concat),
    kind(c("scan", -2, R, N), Kind::Scan),
    bcast(c("dbsize", 1, R, N), Broadcast::Sum),
    bcast(c("flushall", -1, W, N), Broadcast::AllOk),
    bcast(c("flushdb", -1, W, N), Broadcast::AllOk),
    c("sort", -2, W, k1()),
    c("sort_ro", -2, R, k1()),
    c("wait", 3, BLOCKING, N),
    c("waitaof", 4, BLOCKING, N),
    c("swapdb", 3, W, N),
    // lists
    c("lpush", -3, W, k1()),
    c("rpush", -3, W, k1()),
    c("lpushx", -3, W, k1()),
    c("rpushx", -3, W, k1()),
    c("lpop", -2, W, k1()),
    c("rpop", -2, W, k1()),
    c("llen", 2, R, k1()),
    c("lrange", 4, R, k1()),
    c("lindex", 3, R, k1()),
    c("lset", 4, W, k1()),
    c("lrem", 4, W, k1()),
    c("ltrim", 4, W, k1()),
    c("linsert", 5, W, k1()),
    c("lpos", -3, R, k1()),
    c("rpoplpush", 3, W, k12()),
    c("lmove", 5, W, k12()),
    c("lmpop", -4, W, Keys::Counted { at: 1 }),
    c("blpop", -3, W | BLOCKING, kblock()),
    c("brpop", -3, W | BLOCKING, kblock()),
    c("brpoplpush", 4, W | BLOCKING, k12()),
    c("blmove", 6, W | BLOCKING, k12()),
    c("blmpop", -5, W | BLOCKING, Keys::Counted { at: 2 }),
    // hashes
    c("hset", -4, W, k1()),
    c("hsetnx", 4, W, k1()),
    c("hmset", -4, W, k1()),
    c("hget", 3, R, k1()),
    c("hmget", -3, R, k1()),
    c("hdel", -3, W, k1()),
    c("hlen", 2, R, k1()),
    c("hstrlen", 3, R, k1()),
    c("hkeys", 2, R, k1()),
    c("hvals", 2, R, k1()),
    c("hgetall", 2, R, k1()),
    c("hexists", 3, R, k1()),
    c("hincrby", 4, W, k1()),
    c("hincrbyfloat", 4, W, k1()),
    c("hrandfield", -2, R, k1()),
    c("hscan", -3, R, k1()),
    c("hexpire", -6, W, k1()),
    c("hpexpire", -6, W, k1()),
    c("hexpireat", -6, W, k1()),
    c("hpexpireat", -6, W, k1()),
    c("httl", -5, R, k1()),
    c("hpttl", -5, R, k1()),
    c("hexpiretime", -5, R, k1()),
    c("hpexpiretime", -5, R, k1()),
    c("hpersist", -5, W, k1()),
    // sets
    c("sadd", -3, W, k1()),
    c("srem", -3, W, k1()),
    c("smembers", 2, R, k1()),
    c("sismember", 3, R, k1()),
    c("smismember", -3, R, k1()),
    c("scard", 2, R, k1()),
    c("spop", -2, W, k1()),
    c("srandmember", -2, R, k1()),
    c("smove", 4, W, k12()),
    c("sinter", -2, R, kall()),
    c("sunion", -2, R, kall()),
    c("sdiff", -2, R, kall()),
    c("sinterstore", -3, W, kall()),
    c("sunionstore", -3, W, kall()),
    c("sdiffstore", -3, W, kall()),
    c("sintercard", -3, R, Keys::Counted { at: 1 }),
    c("sscan", -3, R, k1()),
    // sorted sets
    c("zadd", -4, W, k1()),
    c("zincrby", 4, W, k1()),
    c("zrem", -3, W, k1()),
    c("zcard", 2, R, k1()),
    c("zscore", 3, R, k1()),
    c("zmscore", -3, R, k1()),
    c("zrank", -3, R, k1()),
    c("zrevrank", -3, R, k1()),
    c("zrange", -4, R, k1()),
    c("zrangestore", -5, W, k12()),
    c("zrevrange", -4, R, k1()),
    c("zrangebyscore", -4, R, k1()),
    c("zrevrangebyscore", -4, R, k1()),
    c("zrangebylex", -4, R, k1()),
    c("zrevrangebylex", -4, R, k1()),
    c("zcount", 4, R, k1()),
    c("zlexcount", 4, R, k1()),
    c("zremrangebyrank", 4, W, k1()),
    c("zremrangebyscore", 4, W, k1()),
    c("zremrangebylex", 4, W, k1()),
    c("zpopmin", -2, W, k1()),
    c("zpopmax", -2, W, k1()),
    c("zrandmember", -2, R, k1()),
    c("zscan", -3, R, k1()),
    c("zmpop", -4, W, Keys::Counted { at: 1 }),
    c("zunion", -3, R, Keys::Counted { at: 1 }),
    c("zinter", -3, R, Keys::Counted { at: 1 }),
    c("zdiff", -3, R, Keys::Counted { at: 1 }),
    c("zintercard", -3, R, Keys::Counted { at: 1 }),
    c("zunionstore", -4, W, Keys::DestCounted),
    c("zinterstore", -4, W, Keys::DestCounted),
    c("zdiffstore", -4, W, Keys::DestCounted),
    c("bzpopmin", -3, W | BLOCKING, kblock()),
    c("bzpopmax", -3, W | BLOCKING, kblock()),
    c("bzmpop", -5, W | BLOCKING, Keys::Counted { at: 2 }),
    // hyperloglog, geo, bitmaps
    c("pfadd", -2, W, k1()),
    c("pfcount", -2, R, kall()),
    c("pfmerge", -2, W, kall()),
    c("geoadd", -5, W, k1()),
    c("geodist", -4, R, k1()),
    c("geohash", -2, R, k1()),
    c("geopos", -2, R, k1()),
    c("georadius", -6, W, k1()),
    c("georadius_ro", -6, R, k1()),
    c("georadiusbymember", -5, W, k1()),
    c("georadiusbymember_ro", -5, R, k1()),
    c("geosearch", -7, R, k1()),
    c("geosearchstore", -8, W, k12()),
    c("setbit", 4, W, k1()),
    c("getbit", 3, R, k1()),
    c("bitcount", -2, R, k1()),
    c("bitpos", -3, R, k1()),
    c(
        "bitop",
        -4,
        W,
        Keys::Range {
            first: 2,
            last: -1,
            step: 1,
        },
    ),
    c("bitfield", -2, W, k1()),
    c("bitfield_ro", -2, R, k1()),
    // streams
    c("xadd", -5, W, k1()),
    c("xlen", 2, R, k1()),
    c("xrange", -4, R, k1()),
    c("xrevrange", -4, R, k1()),
    c("xdel", -3, W, k1()),
    c("xtrim", -4, W, k1()),
    c("xread", -4, R | MAYBE_BLOCKING, Keys::Streams),
    c("xreadgroup", -7, W | MAYBE_BLOCKING, Keys::Streams),
    c("xgroup", -2, W, Keys::Sub),
    c("xack", -4, W, k1()),
    c("xpending", -3, R, k1()),
    c("xclaim", -6, W, k1()),
    c("xautoclaim", -6, W, k1()),
    c("xinfo", -2, R, Keys::Sub),
    c("xsetid", -3, W, k1()),
    // scripting and functions
    c("eval", -3, W | SCRIPT, Keys::Counted { at: 2 }),
    c("evalsha", -3, W | SCRIPT, Keys::Counted { at: 2 }),
    c("eval_ro", -3, R | SCRIPT, Keys::Counted { at: 2 }),
    c("evalsha_ro", -3, R | SCRIPT, Keys::Counted { at: 2 }),
    c("fcall", -3, W | SCRIPT, Keys::Counted { at: 2 }),
    c("fcall_ro", -3, R | SCRIPT, Keys::Counted { at: 2 }),
    bcast(c("script", -2, 0, N), Broadcast::First),
    c("function", -2, 0, N),
    // pub/sub
    pubsub("subscribe", -2, PubSub::Subscribe, N),
    pubsub("psubscribe", -2, PubSub::PSubscribe, N),
    pubsub("ssubscribe", -2, PubSub::SSubscribe, kall()),
    pubsub("unsubscribe", -1, PubSub::Unsubscribe, N),
    pubsub("punsubscribe", -1, PubSub::PUnsubscribe, N),
    pubsub("sunsubscribe", -1, PubSub::SUnsubscribe, N),
    c("publish", 3, W, N),
    c("spublish", 3, W, k1()),
    c("pubsub", -2, R, N),
    // transactions
    tx("multi", 1, Tx::Multi, N),
    tx("exec", 1, Tx::Exec, N),
    tx("discard", 1, Tx::Discard, N),
    tx("watch", -2, Tx::Watch, kall()),
    tx("unwatch", 1, Tx::Unwatch, N),
    // connection state, answered by the proxy
    local("ping", -1, Local::Ping, 0),
    local("echo", 2, Local::Echo, 0),
    local("quit", -1, Local::Quit, NO_AUTH),
    local("reset", 1, Local::Reset, NO_AUTH),
    local("hello", -1, Local::Hello, NO_AUTH),
    local("auth", -2, Local::Auth, NO_AUTH),
    local("select", 2, Local::Select, 0),
    local("client", -2, Local::Client, 0),
    local("readonly", 1, Local::ReadOnly, 0),
    local("readwrite", 1, Local::ReadWrite, 0),
    local("asking", 1, Local::Asking, 0),
    local("cluster", -2, Local::Cluster, 0),
    local("acl", -2, Local::Acl, 0),
    // server, forwarded
    c("command", -1, 0, N),
    c("info", -1, 0, N),
    c("time", 1, 0, N),
    c("lastsave", 1, 0, N),
    c("config", -2, 0, N),
    c("latency", -2, 0, N),
    c("slowlog", -2, 0, N),
    c("role", 1, 0, N),
    c("lolwut", -1, 0, N),
    // administrative, forwarded: governed by the command policy (refused by the default tenant
    // policy, `-@admin -@dangerous`; an operator user with `+@all` may run them)
    c("replicaof", 3, 0, N),
    c("slaveof", 3, 0, N),
    c("failover", -1, 0, N),
    c("shutdown", -1, 0, N),
    c("debug", -2, 0, N),
    c("save", 1, 0, N),
    c("bgsave", -1, 0, N),
    c("bgrewriteaof", 1, 0, N),
    c("module", -2, 0, N),
    c("pfdebug", 3, W, Keys::Sub),
    c("pfselftest", 1, 0, N),
    // refused whoever sends them: they cannot work through a multiplexing proxy
    refused(
        "monitor",
        "it streams every command of the backend, which is shared by all clients of the proxy",
    ),
    refused("sync", REPL),
    refused("psync", REPL),
    refused("replconf", REPL),
    refused(
        "migrate",
        "it moves keys between servers behind the proxy's routing",
    ),
];

static BY_NAME: LazyLock<HashMap<&'static [u8], &'static CommandSpec>> =
    LazyLock::new(|| TABLE.iter().map(|s| (s.name.as_bytes(), s)).collect());

/// Every command the proxy knows (the docs' coverage table is checked against it).
#[cfg(test)]
pub fn table() -> &'static [CommandSpec] {
    TABLE
}

/// The position of `spec` in the table (the command policy's per-command arrays are indexed
/// by it). None for a spec that is not the table's own.
pub fn index_of(spec: &CommandSpec) -> Option<usize> {
    let base = TABLE.as_ptr() as usize;
    let at = spec as *const CommandSpec as usize;
    let i = at.checked_sub(base)? / std::mem::size_of::<CommandSpec>();
    TABLE.get(i).filter(|s| std::ptr::eq(*s, spec)).map(|_| i)
}

/// Looks a command name up, case-insensitively, without allocating.
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    let mut lower = [0u8; 32];
    if name.len() > lower.len() {
        return None;
    }
    for (d, s) in lower.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    BY_NAME.get(&lower[..name.len()]).copied()
}

/// The error a refused command gets.
pub fn refusal(name: &[u8], reason: &str) -> String {
    format!(
        "ERR {} is not supported by the datamesh proxy: {reason}",
        String::from_utf8_lossy(name).to_ascii_uppercase()
    )
}

fn eq_ic(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn parse_count(b: &[u8]) -> Option<usize> {
    std::str::from_utf8(b).ok()?.parse::<usize>().ok()
}

/// The index of the first key of `cmd` (what hot-key and big-key accounting name a command
/// by; no allocation but for stream layouts, unlike [`key_indices`]).
pub fn first_key(spec: &CommandSpec, cmd: &Command) -> Option<usize> {
    let argc = cmd.args.len();
    let i = match spec.keys {
        Keys::None => return None,
        Keys::Range { first, .. } => first,
        Keys::Counted { at } => {
            let n: usize = std::str::from_utf8(cmd.args.get(at)?).ok()?.parse().ok()?;
            if n == 0 {
                return None;
            }
            at + 1
        }
        Keys::DestCounted => 1,
        Keys::Streams | Keys::Sub => *key_indices(spec, cmd).first()?,
    };
    (i < argc).then_some(i)
}

/// Indices of the key arguments of `cmd` (empty for keyless commands or malformed counts).
pub fn key_indices(spec: &CommandSpec, cmd: &Command) -> Vec<usize> {
    let argc = cmd.args.len();
    match spec.keys {
        Keys::None => vec![],
        Keys::Range { first, last, step } => {
            let last = if last < 0 {
                argc as isize + last
            } else {
                last.min(argc as isize - 1)
            };
            if last < first as isize {
                return vec![];
            }
            (first..=last as usize).step_by(step.max(1)).collect()
        }
        Keys::Counted { at } => match cmd.args.get(at).and_then(|a| parse_count(a)) {
            Some(n) if at + n < argc => (at + 1..=at + n).collect(),
            _ => vec![],
        },
        Keys::DestCounted => match cmd.args.get(2).and_then(|a| parse_count(a)) {
            Some(n) if 2 + n < argc => std::iter::once(1).chain(3..3 + n).collect(),
            _ => vec![],
        },
        Keys::Streams => {
            let Some(s) = cmd.args.iter().position(|a| eq_ic(a, "STREAMS")) else {
                return vec![];
            };
            let rest = argc - s - 1;
            if rest == 0 || !rest.is_multiple_of(2) {
                return vec![];
            }
            (s + 1..s + 1 + rest / 2).collect()
        }
        Keys::Sub => {
            if argc > 2 && !eq_ic(&cmd.args[1], "HELP") {
                vec![2]
            } else {
                vec![]
            }
        }
    }
}

/// True when this invocation blocks (always for BLPOP & co, with BLOCK for XREAD/XREADGROUP).
pub fn is_blocking(spec: &CommandSpec, cmd: &Command) -> bool {
    if spec.has(BLOCKING) {
        return true;
    }
    if spec.has(MAYBE_BLOCKING) {
        let end = cmd
            .args
            .iter()
            .position(|a| eq_ic(a, "STREAMS"))
            .unwrap_or(cmd.args.len());
        return cmd.args[..end].iter().any(|a| eq_ic(a, "BLOCK"));
    }
    false
}

/// A reason to refuse this invocation of a command that is otherwise forwarded
/// (subcommands). Compares in place: nothing is allocated per command.
pub fn refused_subcommand(spec: &CommandSpec, cmd: &Command) -> Option<&'static str> {
    match spec.name {
        "script" if cmd.arg_is(1, "DEBUG") => {
            Some("the Lua debugger would take over a backend connection shared by many clients")
        }
        _ => None,
    }
}

/// True for `SCRIPT KILL` and `FUNCTION KILL` (the dispatcher checks who may send them and sends
/// them on a connection of their own).
pub fn is_script_kill(spec: &CommandSpec, cmd: &Command) -> bool {
    matches!(spec.name, "script" | "function") && cmd.arg_is(1, "KILL")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> Command {
        Command::from_args(
            s.split(' ')
                .map(|a| bytes::Bytes::copy_from_slice(a.as_bytes())),
        )
    }

    fn keys(s: &str) -> Vec<usize> {
        let c = cmd(s);
        let spec = lookup(c.name()).expect("known");
        key_indices(spec, &c)
    }

    #[test]
    fn key_positions() {
        assert_eq!(keys("GET k"), [1]);
        assert_eq!(keys("mget a b c"), [1, 2, 3]);
        assert_eq!(keys("MSET a 1 b 2"), [1, 3]);
        assert_eq!(keys("BLPOP a b 0"), [1, 2]);
        assert_eq!(keys("BLMOVE a b LEFT RIGHT 0"), [1, 2]);
        assert_eq!(keys("EVAL s 2 a b x"), [3, 4]);
        assert_eq!(keys("EVALSHA s 0 x"), Vec::<usize>::new());
        assert_eq!(keys("EVAL s 5 a"), Vec::<usize>::new());
        assert_eq!(keys("LMPOP 2 a b LEFT"), [2, 3]);
        assert_eq!(keys("BLMPOP 0 2 a b LEFT"), [3, 4]);
        assert_eq!(keys("BZMPOP 1 1 z MIN"), [3]);
        assert_eq!(keys("ZUNIONSTORE d 2 a b WEIGHTS 1 2"), [1, 3, 4]);
        assert_eq!(keys("XREAD COUNT 2 STREAMS s1 s2 0 0"), [4, 5]);
        assert_eq!(keys("XREADGROUP GROUP g c BLOCK 0 STREAMS s >"), [7]);
        assert_eq!(keys("XREAD STREAMS s1 s2 0"), Vec::<usize>::new());
        assert_eq!(keys("OBJECT ENCODING k"), [2]);
        assert_eq!(keys("XINFO STREAM s"), [2]);
        assert_eq!(keys("BITOP AND d a b"), [2, 3, 4]);
        assert_eq!(keys("PING"), Vec::<usize>::new());
    }

    #[test]
    fn flags_and_blocking() {
        let c = cmd("XREAD BLOCK 0 STREAMS s 0");
        assert!(is_blocking(lookup(b"xread").expect("known"), &c));
        let c = cmd("XREAD STREAMS BLOCK 0");
        assert!(!is_blocking(lookup(b"XREAD").expect("known"), &c));
        assert!(is_blocking(
            lookup(b"BrPoP").expect("known"),
            &cmd("BRPOP a 1")
        ));
        assert!(lookup(b"get").expect("known").has(READONLY));
        assert!(matches!(
            lookup(b"monitor").expect("known").kind,
            Kind::Refused(_)
        ));
        assert_eq!(
            lookup(b"mget").expect("known").kind,
            Kind::Split(MultiKey::Mget)
        );
        assert_eq!(
            lookup(b"client").expect("known").kind,
            Kind::Local(Local::Client)
        );
        assert!(lookup(b"nosuchcommand").is_none());
        assert!(lookup(&[b'a'; 100]).is_none());
        assert!(refusal(b"monitor", "x")
            .starts_with("ERR MONITOR is not supported by the datamesh proxy: "));
        let config = lookup(b"config").expect("known");
        assert_eq!(refused_subcommand(config, &cmd("CONFIG SET x 1")), None);
        assert_eq!(refused_subcommand(config, &cmd("config get x")), None);
        let script = lookup(b"script").expect("known");
        assert!(refused_subcommand(script, &cmd("SCRIPT DEBUG YES")).is_some());
        assert!(is_script_kill(script, &cmd("script kill")));
        assert!(!is_script_kill(script, &cmd("script load x")));
        assert!(matches!(
            lookup(b"migrate").expect("known").kind,
            Kind::Refused(_)
        ));
        assert_eq!(lookup(b"bgsave").expect("known").kind, Kind::Forward);
        for (i, s) in table().iter().enumerate() {
            assert_eq!(index_of(s), Some(i));
        }
        let copy = *lookup(b"get").expect("known");
        assert_eq!(index_of(&copy), None);
    }

    #[test]
    fn replay_classes_follow_the_flags() {
        let class = |n: &[u8]| lookup(n).expect("known").replay;
        assert_eq!(class(b"get"), ReplayClass::ReadOnly);
        assert_eq!(class(b"incr"), ReplayClass::Write);
        assert_eq!(class(b"set"), ReplayClass::Write);
        assert_eq!(class(b"blpop"), ReplayClass::Stateful);
        assert_eq!(class(b"xread"), ReplayClass::ReadOnly);
        assert_eq!(class(b"xreadgroup"), ReplayClass::Stateful);
        assert_eq!(class(b"exec"), ReplayClass::Stateful);
        assert_eq!(class(b"subscribe"), ReplayClass::PubSub);
        assert_eq!(class(b"eval"), ReplayClass::Write);
        assert_eq!(class(b"sort"), ReplayClass::Write);
        assert_eq!(class(b"sort_ro"), ReplayClass::ReadOnly);
    }

    #[test]
    fn arity() {
        let get = lookup(b"get").expect("known");
        assert!(get.arity_ok(2));
        assert!(!get.arity_ok(3));
        let set = lookup(b"set").expect("known");
        assert!(set.arity_ok(3) && set.arity_ok(5) && !set.arity_ok(2));
    }

    #[test]
    fn every_command_is_in_the_coverage_table() {
        let doc = include_str!("../../../docs/commands.md").to_ascii_uppercase();
        for s in table() {
            let cell = format!("| {} |", s.name.to_ascii_uppercase());
            assert!(
                doc.contains(&cell),
                "docs/commands.md has no row for {}",
                s.name
            );
        }
    }

    #[test]
    fn names_are_unique_and_lowercase() {
        let mut seen = std::collections::HashSet::new();
        for s in table() {
            assert_eq!(s.name, s.name.to_ascii_lowercase());
            assert!(seen.insert(s.name), "duplicate {}", s.name);
            assert!(s.name.len() <= 32);
        }
    }
}
