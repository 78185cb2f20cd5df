//! The proxy's `ACL LOG`: failed AUTHs (`AUTH`, `HELLO ... AUTH`) and commands refused by the
//! command policy (`-NOPERM`), proxy-wide, bounded like Redis's (`acllog-max-len` 128, the
//! oldest dropped), grouped like Redis's (an entry with the same reason, context, object and
//! username, updated less than 60 s ago, among the 10 newest, counts one more and takes the new
//! client info and time) and, in addition, by pod: a tenant sees and resets only its own pod's
//! entries (an operator all of them). Entries have Redis 7.2's shape (count, reason, context,
//! object, username, age-seconds, client-info, entry-id, timestamp-created,
//! timestamp-last-updated): a map in RESP3, a flat array in RESP2.
//!
//! Only failures write here (one short lock each); nothing on the command path reads it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::resp::{Reply, Value};

/// Entries kept (Redis's `acllog-max-len` default).
pub const MAX_ENTRIES: usize = 128;
/// A repeat within this time of the entry's last update is counted on it (Redis's
/// `ACL_LOG_GROUPING_MAX_TIME_DELTA`).
const GROUPING: Duration = Duration::from_secs(60);
/// How many of the newest entries a repeat is looked for in (Redis looks at 10).
const SCAN: usize = 10;
/// Entries `ACL LOG` shows without a count.
pub const DEFAULT_COUNT: usize = 10;

/// Why an entry was logged (Redis's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A failed AUTH or HELLO AUTH.
    Auth,
    /// A command refused by the command policy (or a key rule by command).
    Command,
    /// A command refused by a key rule for its key.
    Key,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Auth => "auth",
            Reason::Command => "command",
            Reason::Key => "key",
        }
    }
}

/// One failure to log.
pub struct Denial<'a> {
    pub reason: Reason,
    /// Inside MULTI (`multi`) or not (`toplevel`).
    pub in_multi: bool,
    /// The command as typed for auth failures (`AUTH`, `hello`), the ACL name for refusals
    /// (`config|set`).
    pub object: &'a str,
    pub username: &'a str,
    /// The pod's netns cookie (who may see the entry).
    pub pod: u64,
    /// The client's `CLIENT INFO` line (without its newline).
    pub client_info: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub count: u64,
    pub reason: Reason,
    pub in_multi: bool,
    pub object: String,
    pub username: String,
    pub pod: u64,
    pub client_info: String,
    pub entry_id: u64,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    updated: Instant,
}

#[derive(Default)]
struct Inner {
    /// Newest first.
    entries: VecDeque<Entry>,
    next_id: u64,
}

/// The log (one per proxy, in [`crate::shared::Shared`]).
#[derive(Default)]
pub struct AclLog {
    inner: Mutex<Inner>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl AclLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs a failure now.
    pub fn add(&self, d: Denial<'_>) {
        self.add_at(d, Instant::now(), unix_ms());
    }

    fn add_at(&self, d: Denial<'_>, now: Instant, unix_ms: u64) {
        // Bounded like the username the AUTH path passes: an object or name cannot grow the
        // log past a few KiB per entry.
        let bound = |s: &str| s.chars().take(128).collect::<String>();
        let (object, username) = (bound(d.object), bound(d.username));
        // The client line carries names the client chose (bounded when set, but two of them).
        let mut client_info = d.client_info;
        if client_info.len() > 4096 {
            let mut end = 4096;
            while !client_info.is_char_boundary(end) {
                end -= 1;
            }
            client_info.truncate(end);
        }
        let mut g = self.lock();
        let found = g.entries.iter().take(SCAN).position(|e| {
            e.reason == d.reason
                && e.in_multi == d.in_multi
                && e.pod == d.pod
                && e.object == object
                && e.username == username
                && now.saturating_duration_since(e.updated) <= GROUPING
        });
        if let Some(i) = found {
            if let Some(mut e) = g.entries.remove(i) {
                e.count += 1;
                e.client_info = client_info;
                e.updated = now;
                e.updated_unix_ms = unix_ms;
                g.entries.push_front(e);
            }
            return;
        }
        let entry_id = g.next_id;
        g.next_id += 1;
        g.entries.push_front(Entry {
            count: 1,
            reason: d.reason,
            in_multi: d.in_multi,
            object,
            username,
            pod: d.pod,
            client_info,
            entry_id,
            created_unix_ms: unix_ms,
            updated_unix_ms: unix_ms,
            updated: now,
        });
        g.entries.truncate(MAX_ENTRIES);
    }

    /// The newest `count` entries of `pod` (None: every pod), newest first.
    pub fn entries(&self, pod: Option<u64>, count: usize) -> Vec<Entry> {
        self.lock()
            .entries
            .iter()
            .filter(|e| pod.is_none_or(|p| p == e.pod))
            .take(count)
            .cloned()
            .collect()
    }

    /// Drops the entries of `pod` (None: all).
    pub fn reset(&self, pod: Option<u64>) {
        let mut g = self.lock();
        match pod {
            None => g.entries.clear(),
            Some(p) => g.entries.retain(|e| e.pod != p),
        }
    }

    /// The `ACL LOG` reply for `entries` (Redis 7.2's shape).
    pub fn reply(entries: &[Entry], proto: u8) -> Reply {
        Self::reply_at(entries, Instant::now(), proto)
    }

    fn reply_at(entries: &[Entry], now: Instant, proto: u8) -> Reply {
        let items = entries
            .iter()
            .map(|e| {
                let age = now.saturating_duration_since(e.updated).as_millis() as f64 / 1000.0;
                let context = if e.in_multi { "multi" } else { "toplevel" };
                Value::Map(vec![
                    (Value::bulk("count"), Value::Int(e.count as i64)),
                    (Value::bulk("reason"), Value::bulk(e.reason.as_str())),
                    (Value::bulk("context"), Value::bulk(context)),
                    (Value::bulk("object"), Value::bulk(&e.object)),
                    (Value::bulk("username"), Value::bulk(&e.username)),
                    (Value::bulk("age-seconds"), Value::Double(age)),
                    (Value::bulk("client-info"), Value::bulk(&e.client_info)),
                    (Value::bulk("entry-id"), Value::Int(e.entry_id as i64)),
                    (
                        Value::bulk("timestamp-created"),
                        Value::Int(e.created_unix_ms as i64),
                    ),
                    (
                        Value::bulk("timestamp-last-updated"),
                        Value::Int(e.updated_unix_ms as i64),
                    ),
                ])
            })
            .collect();
        Value::Array(items).into_reply(proto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial<'a>(reason: Reason, object: &'a str, user: &'a str, pod: u64) -> Denial<'a> {
        Denial {
            reason,
            in_multi: false,
            object,
            username: user,
            pod,
            client_info: format!("id={pod}"),
        }
    }

    #[test]
    fn repeats_are_grouped_per_pod_within_a_minute() {
        let log = AclLog::default();
        let t0 = Instant::now();
        log.add_at(denial(Reason::Auth, "AUTH", "bob", 1), t0, 1000);
        log.add_at(
            denial(Reason::Auth, "AUTH", "bob", 1),
            t0 + Duration::from_secs(30),
            31_000,
        );
        // Another pod, another user, another reason: entries of their own.
        log.add_at(denial(Reason::Auth, "AUTH", "bob", 2), t0, 1000);
        log.add_at(denial(Reason::Auth, "AUTH", "eve", 1), t0, 1000);
        log.add_at(denial(Reason::Command, "flushall", "bob", 1), t0, 1000);
        let mine = log.entries(Some(1), 10);
        assert_eq!(mine.len(), 3);
        let bob = mine
            .iter()
            .find(|e| e.username == "bob" && e.reason == Reason::Auth)
            .expect("bob's entry");
        assert_eq!(
            (bob.count, bob.created_unix_ms, bob.updated_unix_ms),
            (2, 1000, 31_000)
        );
        assert_eq!(log.entries(None, 10).len(), 4);
        // Past the minute: a new entry.
        log.add_at(
            denial(Reason::Auth, "AUTH", "bob", 1),
            t0 + Duration::from_secs(95),
            95_000,
        );
        assert_eq!(log.entries(Some(1), 10).len(), 4);
        assert_eq!(log.entries(Some(1), 1)[0].updated_unix_ms, 95_000);
        // A tenant's reset drops its pod's entries only.
        log.reset(Some(1));
        assert_eq!(log.entries(None, 10).len(), 1);
        log.reset(None);
        assert!(log.entries(None, 10).is_empty());
    }

    #[test]
    fn the_log_is_bounded_and_ids_grow() {
        let log = AclLog::default();
        let t0 = Instant::now();
        for i in 0..200 {
            let user = format!("u{i}");
            log.add_at(denial(Reason::Auth, "AUTH", &user, 1), t0, i);
        }
        let all = log.entries(None, usize::MAX);
        assert_eq!(all.len(), MAX_ENTRIES);
        assert_eq!((all[0].entry_id, all[0].username.as_str()), (199, "u199"));
    }

    #[test]
    fn replies_have_redis_shape() {
        let log = AclLog::default();
        let t0 = Instant::now();
        log.add_at(denial(Reason::Auth, "AUTH", "bob", 1), t0, 1000);
        let e = log.entries(None, 10);
        let r2 = AclLog::reply_at(&e, t0 + Duration::from_millis(1500), 2);
        let text = String::from_utf8_lossy(&r2.raw).into_owned();
        assert!(text.starts_with("*1\r\n*20\r\n$5\r\ncount\r\n:1\r\n$6\r\nreason\r\n$4\r\nauth\r\n$7\r\ncontext\r\n$8\r\ntoplevel\r\n$6\r\nobject\r\n$4\r\nAUTH\r\n$8\r\nusername\r\n$3\r\nbob\r\n$11\r\nage-seconds\r\n$3\r\n1.5\r\n"), "{text}");
        assert!(text.contains("$8\r\nentry-id\r\n:0\r\n$17\r\ntimestamp-created\r\n:1000\r\n$22\r\ntimestamp-last-updated\r\n:1000\r\n"), "{text}");
        let r3 = AclLog::reply_at(&e, t0 + Duration::from_millis(1500), 3);
        let text = String::from_utf8_lossy(&r3.raw).into_owned();
        assert!(text.starts_with("*1\r\n%10\r\n"), "{text}");
        assert!(text.contains("$11\r\nage-seconds\r\n,1.5\r\n"), "{text}");
        assert_eq!(&AclLog::reply(&[], 3).raw[..], b"*0\r\n");
    }
}
