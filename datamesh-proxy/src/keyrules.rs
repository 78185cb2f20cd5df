//! Key rules: throttle or deny commands by endpoint, key (exact or glob), command and pod.
//!
//! A rule matches a command when every part it has matches: its `endpoint` (none: every
//! endpoint), its `commands` (none: any), its pod selector (`pods`: globs over the pod name,
//! `namespaces`: globs over the pod's namespace; none: any client, node-local ones included)
//! and its `key` (a Redis `KEYS`-style glob, `*` `?` `[a-z]` `[^a]` and `\` escapes; a
//! pattern without them is an exact key; none: the rule is by command only). A multi-key
//! command matches when any of its keys does.
//!
//! Actions:
//! - `deny`: the command is refused at once (`-NOPERM ... by key rule <id>`), logged in the
//!   ACL LOG (reason `key`, or `command` for a rule without a key).
//! - `throttle`: a GCRA token bucket of `rate` commands per second and `burst`. There is ONE
//!   bucket per rule: the keys (and pods) the rule matches share it ("the rule's keys
//!   together"), so a glob rule limits the keys it names as a group and memory stays one
//!   bucket per rule whatever the keys; give a hot key its own exact rule to limit it alone.
//!   A command over the limit waits (the session's throttle stall, like the pod's rate
//!   limit) up to `proxy.throttle_max_delay_ms`, and past that is answered
//!   `-ERR throttled: key <key> is over its rate limit (rule <id>)`.
//!
//! Deny rules are looked at first; then the first throttle rule that matches (rules in order:
//! config, runtime, auto) takes its token.
//!
//! Sources: the config (`key_rules:`, replaced on reload), the admin API (runtime rules: kept
//! across reloads, not across restarts) and the automatic mode (`hotkeys.auto_throttle_ops`:
//! a key the hot-key sketch sees above that rate gets a throttle rule at that rate for
//! `hotkeys.auto_throttle_s`).
//!
//! Pods: the namespace of a pod known from the kubelet (`shop/web-1`) is its Kubernetes
//! namespace; for a netns-only pod (test/demo fallback) it is the part of its netns name before
//! the first `.` (`shop.web-1`: namespace `shop`); a name with neither has no namespace and
//! matches no `namespaces` selector. Node-local clients (pod `node`) match
//! only rules without a pod selector.
//!
//! Cost: a session holds the rules of its endpoint (taken again when the rule set's
//! generation moves, one atomic load per dispatch round). With no rule for the endpoint the
//! command path does one `is_empty` branch: no glob, no lock, no allocation. Counts per rule
//! and pod are taken under a lock only when a rule acts (deny, delay, refuse), in a table
//! bounded to [`MAX_POD_ROWS`] pods per rule.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::accounting::{PodStats, Throttle};
use crate::commands::{self, first_key, key_indices, CommandSpec, Keys};
use crate::keydisplay::KeyDisplay;
use crate::resp::Command;

/// Rules held at most, of each origin (config, runtime, auto).
pub const MAX_RULES: usize = 1024;
/// Pods counted per rule; the rest are counted together as pod `other`.
pub const MAX_POD_ROWS: usize = 64;
/// Longest key pattern (bytes).
pub const MAX_PATTERN: usize = 1024;
/// Default `hotkeys.auto_throttle_s`.
pub const DEFAULT_AUTO_THROTTLE_S: u32 = 60;
/// How often the automatic mode looks at the hot keys (and expires its rules).
pub const AUTO_TICK: Duration = Duration::from_secs(1);
/// Pod row that counts the pods past [`MAX_POD_ROWS`].
const OTHER_POD: &str = "other";

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Throttle,
    Deny,
}

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Runtime,
    Auto,
}

/// A rule as written (config `key_rules[]` item, or the body of `POST /keyrules`). Unknown
/// fields are collected and reported with the rest.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawKeyRule {
    pub id: Option<String>,
    pub endpoint: Option<String>,
    pub key: Option<String>,
    #[serde(default)]
    pub commands: Vec<String>,
    #[serde(default)]
    pub pods: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub action: Option<String>,
    pub rate: Option<u32>,
    pub burst: Option<u32>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

/// A validated rule (shown at `/config_dump` and `/keyrules`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleSpec {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The key glob as written (auto rules: the key as `hotkeys.key_display` shows it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    pub action: Action,
    /// Commands per second (throttle; 0 for deny).
    pub rate: u32,
    pub burst: u32,
}

fn id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Validates `raw` (its fields named `<at>.<field>`), reporting every bad field through
/// `err`. `endpoints`: the endpoint names a rule may name; `default_id`: the id when none is
/// given.
pub fn validate_rule(
    raw: &RawKeyRule,
    at: &str,
    endpoints: &[&str],
    default_id: &str,
    err: &mut dyn FnMut(&str, String),
) -> Option<RuleSpec> {
    let f = |name: &str| {
        if at.is_empty() {
            name.to_string()
        } else {
            format!("{at}.{name}")
        }
    };
    let before = std::cell::Cell::new(false);
    let mut bad = |field: &str, msg: String| {
        before.set(true);
        err(&f(field), msg);
    };
    for k in raw.unknown.keys() {
        bad(k, "unknown field".into());
    }
    let id = raw.id.clone().unwrap_or_else(|| default_id.to_string());
    if !id_ok(&id) {
        bad(
            "id",
            format!("{id:?}: use 1 to 64 letters, digits, '-', '_' or '.' (it is a metric label)"),
        );
    }
    if let Some(e) = &raw.endpoint {
        if !endpoints.contains(&e.as_str()) {
            bad(
                "endpoint",
                format!(
                    "{e:?} is not a configured endpoint (endpoints: {}); leave it out to match every endpoint",
                    endpoints.join(", ")
                ),
            );
        }
    }
    if let Some(k) = &raw.key {
        if k.is_empty() || k.len() > MAX_PATTERN {
            bad(
                "key",
                format!("must be 1 to {MAX_PATTERN} bytes (a key or a glob such as user:*)"),
            );
        }
    }
    let mut commands = Vec::new();
    for (i, c) in raw.commands.iter().enumerate() {
        match commands::lookup(c.as_bytes()) {
            Some(spec) if spec.has(commands::NO_AUTH) => bad(
                &format!("commands[{i}]"),
                format!(
                    "{c:?} is never refused (a client can always authenticate, reset or leave)"
                ),
            ),
            Some(spec) => commands.push(spec.name.to_ascii_lowercase()),
            None => bad(
                &format!("commands[{i}]"),
                format!("{c:?} is not a Redis command the proxy knows"),
            ),
        }
    }
    for (list, name) in [(&raw.pods, "pods"), (&raw.namespaces, "namespaces")] {
        for (i, p) in list.iter().enumerate() {
            if p.is_empty() || p.len() > 253 {
                bad(
                    &format!("{name}[{i}]"),
                    "must be 1 to 253 bytes (a name or a glob such as web-*)".into(),
                );
            }
        }
    }
    let action = match raw.action.as_deref() {
        Some("throttle") => Some(Action::Throttle),
        Some("deny") => Some(Action::Deny),
        Some(a) => {
            bad("action", format!("{a:?} is not throttle or deny"));
            None
        }
        None => {
            bad("action", "missing: throttle or deny".into());
            None
        }
    };
    if raw.key.is_none() && raw.commands.is_empty() {
        bad(
            "key",
            "missing: a rule needs a key (or glob), commands, or both; a rule without either would match every command".into(),
        );
    }
    let (rate, burst) = match action {
        Some(Action::Throttle) => {
            let rate = raw.rate.unwrap_or(0);
            if rate == 0 {
                bad(
                    "rate",
                    "a throttle rule needs rate: commands per second, at least 1 (use action: deny to block)".into(),
                );
            }
            let burst = raw.burst.unwrap_or(rate.max(1));
            if burst == 0 {
                bad("burst", "0: at least 1 (commands allowed at once)".into());
            }
            (rate, burst)
        }
        Some(Action::Deny) => {
            for (v, name) in [(raw.rate, "rate"), (raw.burst, "burst")] {
                if v.is_some() {
                    bad(name, "only for action: throttle".into());
                }
            }
            (0, 0)
        }
        None => (0, 0),
    };
    if before.get() {
        return None;
    }
    Some(RuleSpec {
        id,
        endpoint: raw.endpoint.clone(),
        key: raw.key.clone(),
        commands,
        pods: raw.pods.clone(),
        namespaces: raw.namespaces.clone(),
        action: action?,
        rate,
        burst,
    })
}

/// Redis `stringmatchlen` glob over bytes: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`.
/// Iterative with one backtrack point per `*` (linear-ish; no recursion, no blow-up).
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while let Some(&b) = s.get(i) {
        if let Some(&c) = pat.get(p) {
            if c == b'*' {
                star = Some((p, i));
                p += 1;
                continue;
            }
            if let Some(next) = single(pat, p, b) {
                p = next;
                i += 1;
                continue;
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp + 1;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pat.get(p..)
        .is_none_or(|rest| rest.iter().all(|&c| c == b'*'))
}

/// Whether the one-byte token of `pat` at `p` matches `c`; the position after the token.
fn single(pat: &[u8], p: usize, c: u8) -> Option<usize> {
    match pat.get(p)? {
        b'?' => Some(p + 1),
        b'\\' => match pat.get(p + 1) {
            Some(&e) => (e == c).then_some(p + 2),
            None => (c == b'\\').then_some(p + 1),
        },
        b'[' => {
            let mut q = p + 1;
            let not = pat.get(q) == Some(&b'^');
            if not {
                q += 1;
            }
            let mut hit = false;
            loop {
                match pat.get(q) {
                    // Unclosed class: like Redis, the end of the pattern closes it.
                    None => break,
                    Some(b']') => {
                        q += 1;
                        break;
                    }
                    Some(b'\\') if pat.get(q + 1).is_some() => {
                        hit |= pat.get(q + 1) == Some(&c);
                        q += 2;
                    }
                    Some(&a) if pat.get(q + 1) == Some(&b'-') && pat.get(q + 2).is_some() => {
                        let b = pat.get(q + 2).copied().unwrap_or(a);
                        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                        hit |= (lo..=hi).contains(&c);
                        q += 3;
                    }
                    Some(&a) => {
                        hit |= a == c;
                        q += 1;
                    }
                }
            }
            (hit != not).then_some(q)
        }
        &l => (l == c).then_some(p + 1),
    }
}

/// The namespace of a pod name: the part before the `/` of a Kubernetes name
/// (`namespace/name`, known from the kubelet's layout), else by the netns fallback the part
/// before the first `.`.
pub fn namespace_of(pod: &str) -> Option<&str> {
    pod.split_once('/')
        .or_else(|| pod.split_once('.'))
        .map(|(ns, _)| ns)
        .filter(|ns| !ns.is_empty())
}

/// One pod's counts under a rule.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PodCounts {
    pub pod: String,
    /// Commands that waited for the bucket and then ran.
    pub delayed: u64,
    /// Commands answered with the throttle error.
    pub refused: u64,
    /// Commands denied.
    pub denied: u64,
}

/// A live rule: its spec, its bucket, its counts.
pub struct Rule {
    pub spec: RuleSpec,
    pub origin: Origin,
    /// The key bytes of the pattern (auto rules: the exact key), and whether it has no glob
    /// character (compared as bytes then).
    pattern: Option<(Vec<u8>, bool)>,
    /// Auto rules: when they end.
    expires: Option<Instant>,
    /// The GCRA theoretical arrival time, in the registry clock's nanoseconds.
    tat_ns: AtomicU64,
    counts: Mutex<Vec<PodCounts>>,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("spec", &self.spec)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Rule {
    pub fn new(spec: RuleSpec, origin: Origin) -> Self {
        let pattern = spec.key.as_ref().map(|k| {
            let b = k.as_bytes().to_vec();
            let literal = !b.iter().any(|c| matches!(c, b'*' | b'?' | b'[' | b'\\'));
            (b, literal)
        });
        Self {
            spec,
            origin,
            pattern,
            expires: None,
            tat_ns: AtomicU64::new(0),
            counts: Mutex::new(Vec::new()),
        }
    }

    /// The id as a metric label: auto rules are counted together (`auto`), so the series stay
    /// bounded by the rules an operator writes.
    pub fn metric_id(&self) -> &str {
        match self.origin {
            Origin::Auto => "auto",
            _ => &self.spec.id,
        }
    }

    fn key_matches(&self, key: &[u8]) -> bool {
        match &self.pattern {
            None => true,
            Some((p, true)) => p == key,
            Some((p, false)) => glob_match(p, key),
        }
    }

    fn pod_matches(&self, pod: &PodStats) -> bool {
        let s = &self.spec;
        if s.pods.is_empty() && s.namespaces.is_empty() {
            return true;
        }
        if pod.cookie == 0 {
            return false;
        }
        pod.with_name(|name| {
            (s.pods.is_empty()
                || s.pods
                    .iter()
                    .any(|g| glob_match(g.as_bytes(), name.as_bytes())))
                && (s.namespaces.is_empty()
                    || namespace_of(name).is_some_and(|ns| {
                        s.namespaces
                            .iter()
                            .any(|g| glob_match(g.as_bytes(), ns.as_bytes()))
                    }))
        })
    }

    /// The index (in `cmd.args`) of the key that matches, `Some(None)` for a match of a rule
    /// without a key, `None` for no match.
    /// `keys`: the command's key indices (taken once per command for all rules).
    fn matches(
        &self,
        spec: &CommandSpec,
        cmd: &Command,
        keys: &[usize],
        pod: &PodStats,
    ) -> Option<Option<usize>> {
        let s = &self.spec;
        if !s.commands.is_empty() && !s.commands.iter().any(|c| c.eq_ignore_ascii_case(spec.name)) {
            return None;
        }
        let key = match &self.pattern {
            None => None,
            Some(_) => Some(
                keys.iter()
                    .copied()
                    .find(|&i| cmd.args.get(i).is_some_and(|k| self.key_matches(k)))?,
            ),
        };
        self.pod_matches(pod).then_some(key)
    }

    /// GCRA check of one command at `now_ns`, waiting up to `max_delay` (the pod limit's
    /// algorithm, one bucket per rule).
    pub fn take(&self, now_ns: u64, max_delay: Duration) -> Throttle {
        crate::accounting::gcra_take(
            &self.tat_ns,
            now_ns,
            self.spec.rate,
            self.spec.burst,
            max_delay,
        )
    }

    /// Counts an action on `pod` (one short lock; only when the rule acts).
    pub fn count(&self, pod: &str, what: Counted) {
        let mut rows = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let i = match rows.iter().position(|r| r.pod == pod) {
            Some(i) => i,
            None if rows.len() < MAX_POD_ROWS => {
                rows.push(PodCounts {
                    pod: pod.to_string(),
                    ..Default::default()
                });
                rows.len() - 1
            }
            None => match rows.iter().position(|r| r.pod == OTHER_POD) {
                Some(i) => i,
                None => {
                    // The last row makes room for `other` (its counts stay, under `other`).
                    let last = rows.len().saturating_sub(1);
                    if let Some(r) = rows.get_mut(last) {
                        r.pod = OTHER_POD.to_string();
                    }
                    last
                }
            },
        };
        if let Some(r) = rows.get_mut(i) {
            match what {
                Counted::Delayed => r.delayed += 1,
                Counted::Refused => r.refused += 1,
                Counted::Denied => r.denied += 1,
            }
        }
    }

    pub fn counts(&self) -> Vec<PodCounts> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What [`Rule::count`] counts.
#[derive(Debug, Clone, Copy)]
pub enum Counted {
    Delayed,
    Refused,
    Denied,
}

/// The rules' verdict on one command.
pub enum Verdict<'a> {
    Pass,
    /// Refuse at once; the matched key's index, if the rule has a key.
    Deny(&'a Arc<Rule>, Option<usize>),
    /// A throttle rule matched: its bucket's answer.
    Throttle(&'a Arc<Rule>, Option<usize>, Throttle),
}

/// The verdict of `rules` (one endpoint's) on `cmd` from `pod` (`now_ns` in the pod
/// registry's clock).
pub fn check<'a>(
    rules: &'a [Arc<Rule>],
    spec: &CommandSpec,
    cmd: &Command,
    pod: &PodStats,
    now_ns: u64,
    max_delay: Duration,
) -> Verdict<'a> {
    // One look at the command's keys for every rule: none without a key rule, no allocation
    // for a single-key command (GET, SET, HGET ...), the key list for the others.
    let one;
    let many;
    let keys: &[usize] = if !rules.iter().any(|r| r.pattern.is_some()) {
        &[]
    } else if matches!(spec.keys, Keys::Range { first, last, .. } if last == first as isize) {
        one = first_key(spec, cmd).filter(|&i| i < cmd.args.len());
        one.as_slice()
    } else {
        many = key_indices(spec, cmd);
        &many
    };
    for r in rules.iter().filter(|r| r.spec.action == Action::Deny) {
        if let Some(k) = r.matches(spec, cmd, keys, pod) {
            return Verdict::Deny(r, k);
        }
    }
    for r in rules.iter().filter(|r| r.spec.action == Action::Throttle) {
        if let Some(k) = r.matches(spec, cmd, keys, pod) {
            return Verdict::Throttle(r, k, r.take(now_ns, max_delay));
        }
    }
    Verdict::Pass
}

/// Why a rule change was refused (the admin API's 4xx).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("a rule with id {0:?} exists already")]
    Exists(String),
    #[error("no rule with id {0:?}")]
    NotFound(String),
    #[error("rule {0:?} comes from the config file: remove it there and reload (SIGHUP)")]
    FromConfig(String),
    #[error("{MAX_RULES} runtime rules already: remove some first")]
    Full,
}

#[derive(Default)]
struct Sets {
    config: Vec<Arc<Rule>>,
    runtime: Vec<Arc<Rule>>,
    auto: Vec<Arc<Rule>>,
    next_runtime: u64,
    next_auto: u64,
}

impl Sets {
    fn all(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.config.iter().chain(&self.runtime).chain(&self.auto)
    }
}

/// Every key rule of the proxy (config, runtime, auto), with the generation sessions watch.
#[derive(Default)]
pub struct KeyRules {
    sets: RwLock<Sets>,
    generation: AtomicU64,
}

impl std::fmt::Debug for KeyRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRules").finish_non_exhaustive()
    }
}

impl KeyRules {
    /// Moves on whenever a rule is added or removed (one atomic load for a session).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The rules that can match on `endpoint` (config, runtime, auto order). Empty (no
    /// allocation) when there are none.
    pub fn for_endpoint(&self, endpoint: &str) -> Vec<Arc<Rule>> {
        let s = self.sets.read().unwrap_or_else(|p| p.into_inner());
        s.all()
            .filter(|r| r.spec.endpoint.as_deref().is_none_or(|e| e == endpoint))
            .cloned()
            .collect()
    }

    /// Replaces the config rules (a reload). A rule whose id and spec are unchanged keeps its
    /// bucket and counts. Runtime and auto rules stay; a runtime rule with the id of a config
    /// rule is dropped (the config wins; logged).
    pub fn set_config(&self, specs: &[RuleSpec]) {
        let mut s = self.sets.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::take(&mut s.config);
        s.config = specs
            .iter()
            .map(|spec| {
                old.iter()
                    .find(|r| r.spec == *spec)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Rule::new(spec.clone(), Origin::Config)))
            })
            .collect();
        let ids: Vec<String> = s.config.iter().map(|r| r.spec.id.clone()).collect();
        s.runtime.retain(|r| {
            let keep = !ids.contains(&r.spec.id);
            if !keep {
                tracing::warn!(rule = %r.spec.id, "key rule: the config now defines this id; its runtime rule is dropped");
            }
            keep
        });
        drop(s);
        self.changed();
    }

    /// Adds a runtime rule; its id (`rt-N` when the spec's id is empty).
    pub fn add_runtime(&self, mut spec: RuleSpec) -> Result<String, RuleError> {
        let mut s = self.sets.write().unwrap_or_else(|p| p.into_inner());
        if s.runtime.len() >= MAX_RULES {
            return Err(RuleError::Full);
        }
        if spec.id.is_empty() {
            loop {
                s.next_runtime += 1;
                let id = format!("rt-{}", s.next_runtime);
                if !s.all().any(|r| r.spec.id == id) {
                    spec.id = id;
                    break;
                }
            }
        } else if s.all().any(|r| r.spec.id == spec.id) {
            return Err(RuleError::Exists(spec.id));
        }
        let id = spec.id.clone();
        tracing::info!(rule = %id, spec = ?spec, "key rule added at runtime");
        s.runtime.push(Arc::new(Rule::new(spec, Origin::Runtime)));
        drop(s);
        self.changed();
        Ok(id)
    }

    /// Removes a runtime or auto rule.
    pub fn remove(&self, id: &str) -> Result<Origin, RuleError> {
        let mut s = self.sets.write().unwrap_or_else(|p| p.into_inner());
        if s.config.iter().any(|r| r.spec.id == id) {
            return Err(RuleError::FromConfig(id.to_string()));
        }
        let origin = if let Some(i) = s.runtime.iter().position(|r| r.spec.id == id) {
            s.runtime.remove(i);
            Origin::Runtime
        } else if let Some(i) = s.auto.iter().position(|r| r.spec.id == id) {
            s.auto.remove(i);
            Origin::Auto
        } else {
            return Err(RuleError::NotFound(id.to_string()));
        };
        drop(s);
        tracing::info!(rule = %id, "key rule removed");
        self.changed();
        Ok(origin)
    }

    /// Installs an auto throttle rule for `key` on `endpoint` until `now + ttl`, unless one is
    /// in force for it already (or [`MAX_RULES`] auto rules are). Returns its id when new.
    pub fn add_auto(
        &self,
        endpoint: &str,
        key: &[u8],
        rate: u32,
        ttl: Duration,
        display: KeyDisplay,
        now: Instant,
    ) -> Option<String> {
        let mut s = self.sets.write().unwrap_or_else(|p| p.into_inner());
        if s.auto.len() >= MAX_RULES
            || s.auto.iter().any(|r| {
                r.spec.endpoint.as_deref() == Some(endpoint)
                    && r.pattern.as_ref().is_some_and(|(p, _)| p == key)
            })
        {
            return None;
        }
        s.next_auto += 1;
        let id = format!("auto-{}", s.next_auto);
        let spec = RuleSpec {
            id: id.clone(),
            endpoint: Some(endpoint.to_string()),
            key: Some(display.show(key)),
            commands: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            action: Action::Throttle,
            rate,
            burst: (rate / 10).max(1),
        };
        let mut rule = Rule::new(spec, Origin::Auto);
        // The exact key, whatever the display shows.
        rule.pattern = Some((key.to_vec(), true));
        rule.expires = Some(now + ttl);
        s.auto.push(Arc::new(rule));
        drop(s);
        self.changed();
        Some(id)
    }

    /// Drops the auto rules whose time is over; their ids.
    pub fn expire(&self, now: Instant) -> Vec<String> {
        let mut s = self.sets.write().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        s.auto.retain(|r| {
            let keep = r.expires.is_none_or(|e| e > now);
            if !keep {
                gone.push(r.spec.id.clone());
            }
            keep
        });
        drop(s);
        if !gone.is_empty() {
            self.changed();
        }
        gone
    }

    /// `GET /keyrules`: every rule with its origin, its counts per pod, and (auto) the seconds
    /// it has left.
    pub fn json(&self) -> serde_json::Value {
        let now = Instant::now();
        let s = self.sets.read().unwrap_or_else(|p| p.into_inner());
        let rules: Vec<serde_json::Value> = s
            .all()
            .map(|r| {
                let mut v = serde_json::to_value(&r.spec).unwrap_or_default();
                if let serde_json::Value::Object(m) = &mut v {
                    m.insert("origin".into(), serde_json::json!(r.origin));
                    if let Some(e) = r.expires {
                        m.insert(
                            "expires_in_s".into(),
                            serde_json::json!(e.saturating_duration_since(now).as_secs_f64()),
                        );
                    }
                    m.insert("counts".into(), serde_json::json!(r.counts()));
                }
                v
            })
            .collect();
        serde_json::json!({ "rules": rules })
    }

    /// Every rule (config, runtime, auto).
    pub fn list(&self) -> Vec<Arc<Rule>> {
        self.sets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .all()
            .cloned()
            .collect()
    }
}

/// The automatic mode (see the module docs): every [`AUTO_TICK`], expires auto rules and, when
/// `hotkeys.auto_throttle_ops` is set, installs one for each key above it. Stops when
/// `shutdown` turns true.
pub fn spawn_auto(
    rules: Arc<KeyRules>,
    view: Arc<crate::hotkeys::HotKeysView>,
    shared: Arc<crate::shared::Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(AUTO_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => break,
                _ = tick.tick() => auto_round(&rules, &view, &shared, Instant::now()),
            }
        }
    })
}

/// One look of the automatic mode at `now`.
pub fn auto_round(
    rules: &KeyRules,
    view: &crate::hotkeys::HotKeysView,
    shared: &crate::shared::Shared,
    now: Instant,
) {
    for id in rules.expire(now) {
        tracing::info!(rule = %id, "auto key throttle ended");
    }
    let settings = shared.settings();
    let hk = &settings.hotkeys;
    if !hk.enabled || hk.auto_throttle_ops == 0 {
        return;
    }
    let ttl = Duration::from_secs(hk.auto_throttle_s.max(1).into());
    for ep in view.endpoints() {
        for (key, rate) in ep.hotkeys.over(f64::from(hk.auto_throttle_ops), hk, now) {
            if let Some(id) = rules.add_auto(
                &ep.name,
                &key,
                hk.auto_throttle_ops,
                ttl,
                hk.key_display,
                now,
            ) {
                tracing::warn!(
                    rule = %id,
                    endpoint = %ep.name,
                    key = %hk.key_display.show(&key),
                    ops_per_s = rate,
                    limit = hk.auto_throttle_ops,
                    for_s = ttl.as_secs(),
                    "hot key over hotkeys.auto_throttle_ops: throttling it"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::NODE_POD;
    use bytes::Bytes;

    fn cmd(args: &[&str]) -> Command {
        Command::from_args(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())))
    }

    fn spec_of(c: &Command) -> &'static CommandSpec {
        commands::lookup(c.name()).expect("known command")
    }

    fn rule(yaml: &str) -> Result<RuleSpec, Vec<String>> {
        let raw: RawKeyRule = serde_yaml::from_str(yaml).expect("yaml");
        let mut errs = Vec::new();
        let r = validate_rule(&raw, "r", &["cache", "other"], "r1", &mut |f, m| {
            errs.push(format!("{f}: {m}"))
        });
        r.ok_or(errs)
    }

    #[test]
    fn globs_like_redis() {
        for (p, s, m) in [
            ("user:*", "user:1", true),
            ("user:*", "user:", true),
            ("user:*", "use", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-c]llo", "hbllo", true),
            ("h[a-c]llo", "hdllo", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*:*:*", "a:b:c", true),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), m, "{p} ~ {s}");
        }
        // Many stars on a long miss stay fast (no exponential backtracking).
        let long = "a".repeat(10_000);
        let t = Instant::now();
        assert!(!glob_match(b"*a*a*a*a*a*a*a*b", long.as_bytes()));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn validation_reports_every_bad_field() {
        let s = rule("{id: hot, endpoint: cache, key: 'user:*', action: throttle, rate: 100}")
            .expect("valid");
        assert_eq!((s.rate, s.burst), (100, 100));
        let s =
            rule("{commands: [keys, FLUSHALL], namespaces: [shop], action: deny}").expect("valid");
        assert_eq!(s.id, "r1");
        assert_eq!(s.commands, ["keys", "flushall"]);
        let errs = rule(
            "{id: 'bad id', endpoint: nope, commands: [nosuch], action: throttle, burst: 0, pods: [''], extra: 1}",
        )
        .expect_err("invalid");
        for f in [
            "r.extra: unknown field",
            "r.id: \"bad id\"",
            "r.endpoint: \"nope\" is not a configured endpoint",
            "r.commands[0]: \"nosuch\"",
            "r.pods[0]: must be",
            "r.rate: a throttle rule needs rate",
            "r.burst: 0",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(f)), "{f} not in {errs:?}");
        }
        let errs = rule("{action: deny, rate: 5}").expect_err("invalid");
        assert!(
            errs.iter().any(|e| e.starts_with("r.key: missing")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("r.rate: only")),
            "{errs:?}"
        );
        let errs = rule("{commands: [auth], action: deny}").expect_err("invalid");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("r.commands[0]: \"auth\" is never refused")),
            "{errs:?}"
        );
        let errs = rule("{key: x, action: block}").expect_err("invalid");
        assert!(
            errs.iter().any(|e| e.starts_with("r.action: \"block\"")),
            "{errs:?}"
        );
    }

    #[test]
    fn selectors_commands_and_multi_key() {
        let web = PodStats::new(7, "shop.web-1".into(), 0, 0);
        let other = PodStats::new(8, "blog.web-1".into(), 0, 0);
        let plain = PodStats::new(9, "web-2".into(), 0, 0);
        let node = PodStats::new(0, NODE_POD.into(), 0, 0);
        assert_eq!(namespace_of("shop.web-1"), Some("shop"));
        assert_eq!(namespace_of("web-1"), None);
        assert_eq!(namespace_of("shop/web.1"), Some("shop"));
        let deny = Arc::new(Rule::new(
            rule("{key: 'secret:*', namespaces: [sh*], action: deny}").expect("valid"),
            Origin::Config,
        ));
        let rules = vec![deny];
        let get = cmd(&["GET", "secret:1"]);
        let mget = cmd(&["MGET", "a", "b", "secret:2"]);
        let ok = cmd(&["GET", "public"]);
        let d = Duration::ZERO;
        let denied = |c: &Command, p: &PodStats| {
            matches!(check(&rules, spec_of(c), c, p, 1, d), Verdict::Deny(..))
        };
        assert!(denied(&get, &web));
        assert!(denied(&mget, &web), "any key of a multi-key command");
        match check(&rules, spec_of(&mget), &mget, &web, 1, d) {
            Verdict::Deny(_, Some(i)) => assert_eq!(&mget.args[i][..], b"secret:2"),
            _ => panic!("deny with the key"),
        }
        assert!(!denied(&ok, &web));
        assert!(!denied(&get, &other), "another namespace");
        assert!(!denied(&get, &plain), "no namespace");
        assert!(
            !denied(&get, &node),
            "node-local clients match no pod selector"
        );
        // By command only, for pods by name.
        let rules = vec![Arc::new(Rule::new(
            rule("{commands: [keys], pods: ['*web-1'], action: deny}").expect("valid"),
            Origin::Config,
        ))];
        let keys = cmd(&["KEYS", "*"]);
        assert!(matches!(
            check(&rules, spec_of(&keys), &keys, &web, 1, d),
            Verdict::Deny(_, None)
        ));
        assert!(matches!(
            check(&rules, spec_of(&get), &get, &web, 1, d),
            Verdict::Pass
        ));
        assert!(matches!(
            check(&rules, spec_of(&keys), &keys, &plain, 1, d),
            Verdict::Pass
        ));
        // No pod selector: node-local clients too.
        let rules = vec![Arc::new(Rule::new(
            rule("{commands: [flushall], action: deny}").expect("valid"),
            Origin::Config,
        ))];
        let fa = cmd(&["FLUSHALL"]);
        assert!(matches!(
            check(&rules, spec_of(&fa), &fa, &node, 1, d),
            Verdict::Deny(..)
        ));
    }

    #[test]
    fn the_sketch_names_whole_keys_over_a_rate() {
        use crate::hotkeys::{HotKeySettings, HotKeys, Op};
        let hk = HotKeys::default();
        let s = HotKeySettings {
            sample_rate: 1,
            ..Default::default()
        };
        let pod = Arc::new(PodStats::new(1, "p".into(), 0, 0));
        let now = Instant::now();
        let long = Bytes::from(vec![b'k'; crate::hotkeys::MAX_STORED_KEY + 1]);
        let mut samples = vec![(Bytes::from_static(b"hot"), Op::Read); 500];
        samples.extend(vec![(long, Op::Read); 500]);
        samples.extend(vec![(Bytes::from_static(b"cool"), Op::Read); 5]);
        hk.record(&pod, &samples, &s, now);
        // 500 operations over the 0.1 s floor of the covered time: 5000 ops/s.
        let over = hk.over(1000.0, &s, now);
        assert_eq!(over.len(), 1, "only the whole key over the rate");
        assert_eq!(over[0].0, b"hot");
        assert!(over[0].1 > 1000.0);
    }

    #[test]
    fn bucket_allows_burst_then_delays_then_refuses() {
        let r = Rule::new(
            rule("{key: hot, action: throttle, rate: 10, burst: 2}").expect("valid"),
            Origin::Config,
        );
        let max = Duration::from_millis(250);
        let t0 = 1_000_000_000u64;
        assert!(matches!(r.take(t0, max), Throttle::Allow));
        assert!(matches!(r.take(t0, max), Throttle::Allow));
        // 100 ms per command past the burst: 100 ms and 200 ms waits, then over 250 ms.
        match r.take(t0, max) {
            Throttle::Delay(d) => assert_eq!(d, Duration::from_millis(100)),
            _ => panic!("delay"),
        }
        assert!(matches!(r.take(t0, max), Throttle::Delay(_)));
        assert!(matches!(r.take(t0, max), Throttle::Refuse));
        // A second later the bucket is full again.
        assert!(matches!(r.take(t0 + 1_000_000_000, max), Throttle::Allow));
        // Counts, bounded per pod.
        for i in 0..(MAX_POD_ROWS + 5) {
            r.count(&format!("p{i}"), Counted::Refused);
        }
        r.count("p0", Counted::Delayed);
        let c = r.counts();
        assert_eq!(c.len(), MAX_POD_ROWS);
        assert!(c.iter().any(|p| p.pod == "other" && p.refused >= 5));
        assert_eq!(
            c.iter().map(|p| p.refused).sum::<u64>(),
            (MAX_POD_ROWS + 5) as u64
        );
    }

    #[test]
    fn sources_ids_and_auto_expiry() {
        let k = KeyRules::default();
        let g0 = k.generation();
        let a = rule("{id: a, key: x, action: deny}").expect("valid");
        k.set_config(std::slice::from_ref(&a));
        assert!(k.generation() > g0);
        assert_eq!(k.for_endpoint("cache").len(), 1);
        let mut rt = rule("{endpoint: other, key: y, action: deny}").expect("valid");
        rt.id = String::new();
        let id = k.add_runtime(rt.clone()).expect("added");
        assert_eq!(id, "rt-1");
        assert_eq!(k.for_endpoint("cache").len(), 1, "endpoint filter");
        assert_eq!(k.for_endpoint("other").len(), 2);
        rt.id = "a".into();
        assert_eq!(k.add_runtime(rt), Err(RuleError::Exists("a".into())));
        assert_eq!(k.remove("a"), Err(RuleError::FromConfig("a".into())));
        // Runtime rules survive a config reload; unchanged config rules keep their state.
        let before = k.list()[0].clone();
        k.set_config(std::slice::from_ref(&a));
        assert!(Arc::ptr_eq(&before, &k.list()[0]));
        assert_eq!(k.list().len(), 2);
        assert_eq!(k.remove("rt-1"), Ok(Origin::Runtime));
        assert_eq!(k.remove("rt-1"), Err(RuleError::NotFound("rt-1".into())));
        // Auto: one per key, shown as the display says, gone when its time is over.
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let id = k
            .add_auto("cache", b"user:42", 50, ttl, KeyDisplay::Hashed, now)
            .expect("installed");
        assert!(k
            .add_auto("cache", b"user:42", 50, ttl, KeyDisplay::Hashed, now)
            .is_none());
        let v = k.json();
        let auto = &v["rules"][1];
        assert_eq!(auto["origin"], "auto");
        assert_eq!(auto["id"], id.as_str());
        assert!(
            auto["key"].as_str().is_some_and(|s| s.starts_with("h:")),
            "{auto}"
        );
        let rules = k.for_endpoint("cache");
        let hot = cmd(&["GET", "user:42"]);
        let pod = PodStats::new(1, "p".into(), 0, 0);
        assert!(matches!(
            check(&rules, spec_of(&hot), &hot, &pod, 1, Duration::ZERO),
            Verdict::Throttle(..)
        ));
        assert!(k.expire(now + Duration::from_secs(59)).is_empty());
        assert_eq!(k.expire(now + ttl), [id]);
        assert_eq!(k.for_endpoint("cache").len(), 1);
    }
}
