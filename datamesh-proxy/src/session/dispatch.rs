//! Command → action. For the front command of the inbox: the authentication gate, the pod's
//! rate limit, the structural refusals, the command policy (the user's and the pod's ACL
//! rules: `-NOPERM`), the table's [`Kind`] (transaction, local answer, pub/sub, blocking,
//! forwarded), and then either an answer now, a call on the one request path (shared lane or
//! a dedicated connection), or a wait ([`Need::Barrier`]: earlier replies must come in first,
//! or a dedicated connection or a throttle delay is awaited). The command stays at the front
//! of the inbox until it goes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::state::{attempted_user, unsubscribed_reply, wrong_args, PubSub, ServerFacts, Tx};
use super::{Input, Lane, Session, StallDone};
use crate::accounting::Throttle;
use crate::acl_log::Reason;
use crate::attacks;
use crate::backend::Dedicated;
use crate::bigkeys::{self, BigTag};
use crate::commands::acl::{self, catalog};
use crate::commands::{
    self, is_blocking, key_indices, Broadcast, CommandSpec, Kind, Local, MultiKey, PubSub as Sub,
    Tx as TxCmd, NO_AUTH, READONLY, SCRIPT, WRITE,
};
use crate::endpoint::EndpointRuntime;
use crate::localcache::WriteGuard;
use crate::metrics::{PodEndpointLabels, PolicyLabels};
use crate::resp::{Command, Reply, ReplyKind, Value};
use crate::topology::cluster::{common_slot, crossslot_error, split, view};
use crate::upstream::replay::error_reply;
use crate::upstream::{proxy_error, Call, Order, ReplayClass, Request, Router, Target};

/// The rate limit's (and the key rules') verdict on the front command.
pub(super) enum Admit {
    /// Run it now.
    Go,
    /// It waits its delay (a stall).
    Wait,
    /// It was answered with a throttle error; the next command is up.
    Refused,
}

/// What the front command needs before it can run.
pub(super) enum Need {
    /// It ran (or was answered); the next command may follow.
    Go,
    /// It must wait (earlier replies, a dedicated connection, a throttle delay).
    Barrier,
}

impl Session {
    /// Dispatches inbox commands until one must wait, then submits the round's shared-lane
    /// commands (one lock and one writer wake-up per connection per round).
    pub(super) fn dispatch_ready(&mut self) {
        if self.inbox.is_empty() {
            return;
        }
        self.refresh_settings();
        let rt = self.ep.current();
        self.dispatch_round(&rt);
        self.upstream.flush();
        // CLIENT LIST's `cmd` and `idle`: two relaxed stores per round, not per command.
        if let Some(info) = self.mem.info() {
            info.touch(self.last_slot, self.last_command);
        }
        // Hot keys: one short lock per round, not per command.
        self.hot
            .flush(&self.ep.hotkeys, &self.pod, &self.settings.hotkeys);
        // Key-attack counts: three relaxed adds per round at most.
        self.tally.flush(&self.attacks);
    }

    pub(super) fn stall_done(&mut self, done: StallDone) {
        match done {
            StallDone::Throttled => self.front_admitted = true,
            StallDone::AuthDelay => {}
            StallDone::KeyThrottled => self.key_admitted = true,
            StallDone::Dedicated(Ok(d)) => self.acquired = Some(d),
            StallDone::Dedicated(Err(e)) => {
                // The front command is answered with the error.
                self.inbox.pop_front();
                self.hot.next();
                self.front_admitted = false;
                self.key_admitted = false;
                self.push_reply(error_reply(&e, e.never_sent()));
                self.state.tx.fail();
            }
        }
    }

    fn dispatch_round(&mut self, rt: &Arc<EndpointRuntime>) {
        while self.stall.is_none() && self.may_dispatch() {
            let Some(front) = self.inbox.front() else {
                return;
            };
            if let Input::ProtocolError(e) = front {
                let r = Reply::error(&format!("ERR Protocol error: {e}"));
                self.inbox.clear();
                // Written whatever CLIENT REPLY says: the connection closes after it.
                self.push_slot(Call::ready(r), false);
                return;
            }
            if !self.front_admitted && self.pod.limited() {
                match self.admit() {
                    Admit::Go => {}
                    Admit::Wait => return,
                    Admit::Refused => continue,
                }
            }
            // Key rules (throttle, deny): one branch when the endpoint has none.
            if !self.key_rules.is_empty() && !self.key_admitted {
                match self.key_rules_admit() {
                    Admit::Go => {}
                    Admit::Wait => return,
                    Admit::Refused => continue,
                }
            }
            self.state.refresh_acl(&self.settings);
            let hk = &self.settings.hotkeys;
            if hk.enabled {
                if let Some(Input::Command(c)) = self.inbox.front() {
                    if self.hot.consider(c, hk.sample_rate) {
                        self.hot.flush(&self.ep.hotkeys, &self.pod, hk);
                    }
                }
            }
            match self.execute_front(rt) {
                Need::Go => {
                    self.hot.next();
                    self.front_admitted = false;
                    self.key_admitted = false;
                    self.pod.commands(1);
                    self.commands_total.inc();
                }
                Need::Barrier => return,
            }
        }
    }

    /// The pod's rate limit for the front command.
    fn admit(&mut self) -> Admit {
        let max_delay = self.settings.throttle_max_delay;
        // Counted from arrival, but a command that already waited (behind a blocking command)
        // is not charged for that wait.
        let limits = &self.shared.pod_limits;
        let at = limits
            .ns_at(self.arrival)
            .max(limits.now_ns().saturating_sub(max_delay.as_nanos() as u64));
        match self.pod.check(at, max_delay) {
            Throttle::Allow => {
                self.front_admitted = true;
                Admit::Go
            }
            Throttle::Delay(d) => {
                self.pod.throttled(1);
                self.shared.metrics.throttled.inc();
                let until = self.arrival + d;
                self.stall = Some(Box::pin(async move {
                    tokio::time::sleep_until(until).await;
                    StallDone::Throttled
                }));
                Admit::Wait
            }
            Throttle::Refuse => {
                self.inbox.pop_front();
                self.pod.throttled(1);
                self.pod.commands(1);
                self.commands_total.inc();
                self.shared.metrics.throttled.inc();
                let r = Reply::error(&format!(
                    "ERR throttled: pod {} is over its command rate limit{}",
                    self.pod.name(),
                    self.pod.throttle_note(limits.now_ns())
                ));
                self.push_reply(r);
                Admit::Refused
            }
        }
    }

    pub(super) fn front(&self) -> Option<&Command> {
        match self.inbox.front() {
            Some(Input::Command(c)) => Some(c),
            _ => None,
        }
    }

    fn pop_command(&mut self) -> Option<Command> {
        match self.inbox.pop_front() {
            Some(Input::Command(c)) => Some(c),
            _ => None,
        }
    }

    /// Pops the front command and submits it on the dedicated connection `d` now (the
    /// connection's queue keeps the client's commands in order).
    fn front_on(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        d: &Dedicated,
        class: ReplayClass,
        timed: bool,
    ) -> Option<Call> {
        let cmd = self.pop_command()?;
        let req = self.request(cmd.raw, class);
        Some(rt.router.call_on(d, req, timed))
    }

    /// The front command's request, next in the client's order.
    pub(super) fn request(&mut self, raw: Bytes, class: ReplayClass) -> Request {
        self.seq += 1;
        // Counted as the client's input until the reply slot it goes with is answered.
        self.next_req_bytes += raw.len() as u64;
        Request {
            raw,
            class,
            order: Order {
                client: self.state.id,
                seq: self.seq,
            },
            route: Default::default(),
            gate: Some(self.gate()),
        }
    }

    fn facts(&self, rt: &EndpointRuntime) -> ServerFacts {
        ServerFacts {
            version: rt.group().server_version(),
            cluster: rt.router.is_cluster(),
            databases: rt.spec.backend.databases,
        }
    }

    /// Runs the front command, or says why it must wait (the command stays queued).
    fn execute_front(&mut self, rt: &Arc<EndpointRuntime>) -> Need {
        let Some(cmd) = self.front() else {
            return Need::Go;
        };
        let spec = commands::lookup(cmd.name());
        let argc = cmd.args.len();

        if !self.state.authenticated() && !spec.is_some_and(|s| s.has(NO_AUTH)) {
            return self.answer(Reply::error("NOAUTH Authentication required."));
        }
        // What cannot work through a multiplexing proxy, whoever sends it.
        if let Some(Kind::Refused(reason)) = spec.map(|s| s.kind) {
            let r = Reply::error(&commands::refusal(cmd.name(), reason));
            return self.deny(r);
        }
        let slot = catalog().slot_of(spec, cmd);
        self.last_slot = slot.or(self.last_slot);
        if let Some(r) = self.policy_refusal(spec, slot) {
            return self.deny(r);
        }
        let Some(cmd) = self.front() else {
            return Need::Go;
        };
        let config_get = spec.is_some_and(|s| s.name == "config") && cmd.arg_is(1, "GET");
        // Subscribed: everything goes to the subscription connection, in order.
        if self.state.pubsub.is_some() {
            if config_get {
                // Its reply would bypass the secret filter (RESP3 clients may send it now).
                return self.deny(Reply::error(
                    "ERR CONFIG GET while subscribed is not supported by the datamesh proxy",
                ));
            }
            return self.execute_in_pubsub(rt, spec);
        }
        let Some(spec) = spec else {
            if self.state.tx.in_multi() {
                return self.queue_in_multi(rt, None);
            }
            return self.forward_front(rt, None);
        };
        if !spec.arity_ok(argc) {
            let r = wrong_args(cmd.name());
            return self.refuse(r);
        }
        if let Some(reason) = commands::refused_subcommand(spec, cmd) {
            let r = Reply::error(&commands::refusal(cmd.name(), reason));
            return self.refuse(r);
        }
        if let Some(r) = self.big_value_refusal(spec) {
            return self.refuse(r);
        }
        if let Some(r) = self.big_reply_refusal(spec) {
            return self.refuse(r);
        }
        if config_get {
            if self.state.tx.in_multi() {
                // EXEC's array would carry the reply past the secret filter.
                return self.refuse(Reply::error(
                    "ERR CONFIG GET inside MULTI is not supported by the datamesh proxy",
                ));
            }
            return self.forward_redacted(rt, spec);
        }
        if commands::is_script_kill(spec, cmd) {
            if self.state.tx.in_multi() {
                return self.refuse(Reply::error(&format!(
                    "ERR {} KILL inside MULTI is not supported by the datamesh proxy",
                    spec.name.to_ascii_uppercase()
                )));
            }
            return self.script_kill(rt, spec);
        }
        match spec.kind {
            Kind::Tx(t) => self.execute_tx(rt, spec, t),
            // Inside MULTI: queued on the transaction's connection (PING and ECHO too, so
            // EXEC's array has their answers).
            _ if self.state.tx.in_multi() => match spec.kind {
                Kind::Local(Local::Quit | Local::Reset) => self.execute_local(rt, spec),
                Kind::Local(Local::Ping | Local::Echo) => self.queue_in_multi(rt, Some(spec)),
                Kind::Local(_) => self.refuse(Reply::error(&format!(
                    "ERR {} inside MULTI is not supported by the datamesh proxy",
                    spec.name.to_ascii_uppercase()
                ))),
                Kind::PubSub(_) => self.refuse(Reply::error(
                    "ERR SUBSCRIBE inside MULTI is not supported by the datamesh proxy",
                )),
                _ => self.queue_in_multi(rt, Some(spec)),
            },
            Kind::Local(_) => self.execute_local(rt, spec),
            Kind::PubSub(p) => self.enter_pubsub(rt, spec, p),
            _ if is_blocking(spec, cmd) => self.execute_blocking(rt, spec),
            _ if spec.name == "get" && argc == 2 && self.serve_cached(rt) => Need::Go,
            _ => self.forward_front(rt, Some(spec)),
        }
    }

    /// Answers the front `GET key` from the endpoint's local cache when it holds the key
    /// (see [`crate::localcache`]: database 0, not in MULTI or subscribed (earlier branches),
    /// not behind a command on a dedicated connection, after the command policy allowed it);
    /// on a miss of a hot read-mostly key, asks for a fill. False: the GET is forwarded.
    /// The reply goes in the client's order like any other; the value is the one cached when
    /// the GET is read (behind earlier shared-lane commands still in flight, but never behind
    /// an earlier write of this client to the key: that write fenced it).
    fn serve_cached(&mut self, rt: &Arc<EndpointRuntime>) -> bool {
        if self.state.db != 0 || !rt.cache.is_live() || !self.settings.local_cache.enabled {
            return false;
        }
        // Not past a command of this client on a dedicated connection (a blocking command, a
        // transaction's connection): the GET would then run after it in Redis, so it waits
        // (forwarded) like any shared-lane command.
        let lane = self.shared_lane();
        if !self.lane_ok(lane) {
            return false;
        }
        let Some(key) = self.front().and_then(|c| c.args.get(1)).cloned() else {
            return false;
        };
        let now = Instant::now();
        if let Some(raw) = rt.cache.get(&key, now) {
            self.inbox.pop_front();
            self.push_reply(Reply {
                raw,
                kind: ReplyKind::Bulk,
            });
            return true;
        }
        let lc = &self.settings.local_cache;
        if self.ep.hotkeys.cache_eligible(
            &key,
            &self.settings.hotkeys,
            lc.min_ops,
            lc.min_read_ratio,
            now,
        ) {
            rt.cache.miss(&key);
        }
        false
    }

    /// While the local cache tracks: the guard of a command that may write (its keys by the
    /// command table; every key for a keyless write, an unknown command or a script without
    /// declared keys), held until its reply is in.
    fn cache_guard(
        &self,
        rt: &Arc<EndpointRuntime>,
        spec: Option<&CommandSpec>,
        cmd: &Command,
    ) -> Option<WriteGuard> {
        if !rt.cache.is_active() {
            return None;
        }
        let keys = match spec {
            Some(s) if s.has(WRITE) || s.has(SCRIPT) => key_indices(s, cmd)
                .into_iter()
                .filter_map(|i| cmd.args.get(i).cloned())
                .collect(),
            Some(_) => return None,
            None => Vec::new(),
        };
        Some(rt.cache.write_begin(keys))
    }

    /// [`Self::cache_guard`] for every key (EXEC: the transaction's writes).
    fn cache_guard_all(&self, rt: &Arc<EndpointRuntime>) -> Option<WriteGuard> {
        rt.cache
            .is_active()
            .then(|| rt.cache.write_begin(Vec::new()))
    }

    /// Answers the front command with `r` (it never reaches a backend).
    fn answer(&mut self, r: Reply) -> Need {
        self.inbox.pop_front();
        self.push_reply(r);
        Need::Go
    }

    /// Answers the front command with an error; inside MULTI that aborts the transaction.
    fn refuse(&mut self, r: Reply) -> Need {
        self.state.tx.fail();
        self.answer(r)
    }

    /// [`Self::refuse`], also while subscribed (where replies do not go through the ordered
    /// queue).
    pub(super) fn deny(&mut self, r: Reply) -> Need {
        if self.state.pubsub.is_some() {
            self.inbox.pop_front();
            self.write_now(r);
            return Need::Go;
        }
        self.refuse(r)
    }

    /// The `-NOPERM` reply when the user's policy (or the default) or the pod's policy does not
    /// allow the front command; counted per endpoint, pod and command. AUTH, HELLO, QUIT and
    /// RESET are never refused (a client can always change user or leave), nor what the proxy
    /// answers from the connection's own state (PING, SELECT, CLIENT ID/SETNAME/LIST ...): the
    /// policy guards the shared backend and the other tenants, which those never reach.
    fn policy_refusal(
        &self,
        spec: Option<&'static CommandSpec>,
        slot: Option<u16>,
    ) -> Option<Reply> {
        let cmd = self.front()?;
        if spec.is_some_and(|s| {
            s.has(NO_AUTH) || matches!(s.kind, Kind::Local(l) if l != Local::Cluster)
        }) {
            return None;
        }
        let user_ok = self
            .state
            .acl
            .as_ref()
            .is_some_and(|p| p.allows(slot, cmd.name()));
        if user_ok && self.pod.acl_allows(slot, cmd.name()) {
            return None;
        }
        let pod = self.pod.name();
        self.shared
            .metrics
            .policy_denied
            .get_or_create(&PolicyLabels {
                endpoint: self.ep.name.clone(),
                pod: pod.clone(),
                command: acl::metric_name(slot).to_string(),
            })
            .inc();
        let user = self.state.user.as_deref().unwrap_or("default");
        let name = acl::display_name(slot, cmd);
        self.log_denial(Reason::Command, &name, user);
        Some(Reply::error(&acl::noperm(user, &pod, &name)))
    }

    /// `bigkeys.refuse`: the refusal of a pod's command that gave a big reply within
    /// `bigkeys.refuse_s` (the same command, key and arguments), counted per endpoint, pod and
    /// command. Otherwise notes the command's identity for its reply's check.
    fn big_reply_refusal(&self, spec: &'static CommandSpec) -> Option<Reply> {
        self.next_recent.set(None);
        let s = self.settings.bigkeys;
        if !s.refuse || self.pod.cookie == 0 || commands::first_key(spec, self.front()?).is_none() {
            return None;
        }
        let cmd = self.front()?;
        let id = bigkeys::recent_id(&self.ep.name, spec.name, cmd.args.get(1..)?);
        let now = tokio::time::Instant::now().into_std();
        let Some(r) =
            self.shared
                .bigkeys
                .recent(id, std::time::Duration::from_secs(s.refuse_s), now)
        else {
            self.next_recent.set(Some(id));
            return None;
        };
        let key = commands::first_key(spec, cmd)
            .and_then(|i| cmd.args.get(i))
            .map(|k| s.key_display.show(k))
            .unwrap_or_else(|| bigkeys::NO_KEY.to_string());
        self.shared
            .metrics
            .big_reply_refused
            .get_or_create(&PolicyLabels {
                endpoint: self.ep.name.clone(),
                pod: self.pod.name(),
                command: spec.name.to_string(),
            })
            .inc();
        Some(Reply::error(&bigkeys::reply_refusal(
            spec.name, &key, &r, s.refuse_s,
        )))
    }

    /// The refusal of a write whose value is over `proxy.max_value_bytes` (before it is
    /// forwarded, after the arity check); counted per endpoint, pod and command.
    fn big_value_refusal(&self, spec: &'static CommandSpec) -> Option<Reply> {
        let max = self.settings.bigkeys.max_value_bytes;
        if max == 0 {
            return None;
        }
        let n = bigkeys::largest_value(spec, self.front()?)?;
        if n as u64 <= max {
            return None;
        }
        self.shared
            .metrics
            .big_value_refused
            .get_or_create(&PolicyLabels {
                endpoint: self.ep.name.clone(),
                pod: self.pod.name(),
                command: spec.name.to_string(),
            })
            .inc();
        Some(Reply::error(&bigkeys::refusal(n, spec.name, max)))
    }

    /// An operator: the user's and the pod's policies allow every `@admin` command.
    pub(super) fn is_operator(&self) -> bool {
        self.state.acl.as_ref().is_some_and(|p| p.is_operator()) && self.pod.acl_operator()
    }

    /// `CONFIG GET` on the shared lane, its reply without the values of secret parameters.
    fn forward_redacted(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        let lane = self.shared_lane();
        if !self.lane_ok(lane) {
            return Need::Barrier;
        }
        let Some(cmd) = self.pop_command() else {
            return Need::Go;
        };
        let target = match self.target_for(rt, Some(spec), &cmd) {
            Ok(t) => t,
            Err(r) => {
                self.push_reply(r);
                return Need::Go;
            }
        };
        let req = self.request(cmd.raw, spec.replay);
        let call = self.upstream.send(&rt.router, target, req, self.state.id);
        self.push(Call::boxed(
            async move { acl::redact_config_get(call.await) },
        ));
        Need::Go
    }

    /// `SCRIPT KILL` / `FUNCTION KILL`: for a user with a script in flight on this endpoint
    /// (from this pod), or an operator; on a connection of its own (a shared one may be stuck
    /// behind the busy script): the master, or in cluster mode the nodes running the caller's
    /// scripts (every master for an operator). OK if any node killed one, else its error.
    fn script_kill(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        let user = self.state.user.clone().unwrap_or_else(|| "default".into());
        let own = self.pod.scripts_of(&self.ep.name, &user);
        let nodes = match own {
            Some(nodes) if !self.is_operator() => Some(nodes),
            _ if self.is_operator() => None,
            _ => {
                let pod = self.pod.name();
                let command = format!("{}|kill", spec.name);
                self.shared
                    .metrics
                    .policy_denied
                    .get_or_create(&PolicyLabels {
                        endpoint: self.ep.name.clone(),
                        pod: pod.clone(),
                        command: command.clone(),
                    })
                    .inc();
                self.log_denial(Reason::Command, &command, &user);
                return self.refuse(Reply::error(&format!(
                    "NOPERM User {user} (pod {pod}) has no script running on endpoint {} and may not run the '{command}' command on others' scripts (datamesh proxy policy)",
                    self.ep.name
                )));
            }
        };
        if !rt.router.is_cluster() {
            return self.execute_blocking(rt, spec);
        }
        let Some(cmd) = self.pop_command() else {
            return Need::Go;
        };
        let target = self.keyless(false);
        let nodes = match nodes {
            Some(n) if !n.is_empty() => n,
            _ => rt.router.topology.masters(),
        };
        let req = self.request(cmd.raw, spec.replay);
        self.push(Call::boxed(kill_on_nodes(
            rt.router.clone(),
            nodes,
            req,
            target,
        )));
        Need::Go
    }

    /// A failed AUTH or HELLO AUTH: counted, logged at a bounded rate, answered after the
    /// pod's delay (the session reads nothing meanwhile), and the connection closed after
    /// `proxy.auth_max_failures`.
    fn auth_failed(&mut self, reply: Reply, user: String) -> Need {
        self.log_denial(Reason::Auth, &self.front_name(), &user);
        let pod = self.pod.name();
        self.shared.metrics.count_error(&self.ep.name, "auth");
        self.shared
            .metrics
            .auth_failures
            .get_or_create(&PodEndpointLabels {
                endpoint: self.ep.name.clone(),
                pod: pod.clone(),
            })
            .inc();
        self.state.auth_failures = self.state.auth_failures.saturating_add(1);
        let penalty = self.pod.auth_failed(self.shared.pod_limits.now_ns());
        if let Some(n) = penalty.warn {
            tracing::warn!(
                endpoint = %self.ep.name,
                pod = %pod,
                user = %user,
                peer = %self.state.peer,
                failures = n,
                delay_ms = penalty.delay.as_millis() as u64,
                "failed AUTH attempts (logged at most every 10 s per pod; failures = since the last warning)"
            );
        }
        let max = self.settings.auth_max_failures;
        let close = max != 0 && self.state.auth_failures >= max;
        let reply = if close {
            Reply::error(&format!(
                "WRONGPASS invalid username-password pair or user is disabled. (datamesh proxy: {} failed AUTH attempts on this connection, closing it)",
                self.state.auth_failures
            ))
        } else {
            reply
        };
        self.inbox.pop_front();
        if close {
            self.closing = true;
            self.inbox.clear();
        }
        if penalty.delay.is_zero() {
            self.push_reply(reply);
        } else {
            let until = tokio::time::Instant::now() + penalty.delay;
            self.push(Call::boxed(async move {
                tokio::time::sleep_until(until).await;
                reply
            }));
            // Nothing more of this client is read or run until then.
            self.stall = Some(Box::pin(async move {
                tokio::time::sleep_until(until).await;
                StallDone::AuthDelay
            }));
        }
        Need::Go
    }

    /// Whether a command for `lane` may run now: every earlier reply is in, or they were on
    /// the same lane.
    fn lane_ok(&mut self, lane: Lane) -> bool {
        if self.lane == Some(lane) || self.pending.is_empty() {
            self.lane = Some(lane);
            true
        } else {
            false
        }
    }

    /// [`Self::lane_ok`] for the connection holding the transaction or the WATCHes, if any.
    fn tx_lane_ok(&mut self) -> bool {
        match self.state.tx.conn().map(|d| d.conn.id) {
            Some(id) => self.lane_ok(Lane::Dedicated(id)),
            None => true,
        }
    }

    fn shared_lane(&self) -> Lane {
        Lane::Shared {
            db: self.state.db,
            proto: self.state.proto,
        }
    }

    /// Where `cmd` goes: its cluster slot (CROSSSLOT refused), read-only-ness, and the
    /// client's database and protocol.
    fn target_for(
        &self,
        rt: &EndpointRuntime,
        spec: Option<&CommandSpec>,
        cmd: &Command,
    ) -> Result<Target, Reply> {
        let readonly = spec.is_some_and(|s| s.has(READONLY));
        let slot = if rt.router.is_cluster() {
            let keys: Vec<&[u8]> = match spec {
                Some(s) => key_indices(s, cmd)
                    .into_iter()
                    .map(|i| &cmd.args[i][..])
                    .collect(),
                // Unknown command: its first argument is taken as the key, if any.
                None => cmd.args.get(1).map(|a| &a[..]).into_iter().collect(),
            };
            common_slot(keys).map_err(|_| Reply {
                raw: crossslot_error(),
                kind: ReplyKind::Error,
            })?
        } else {
            None
        };
        Ok(Target {
            slot,
            ..self.keyless(readonly)
        })
    }

    /// The node for the front command's target now (for dedicated connections).
    fn node_for(
        &self,
        rt: &EndpointRuntime,
        spec: Option<&CommandSpec>,
    ) -> Result<(SocketAddr, Target), Reply> {
        let cmd = self.front().ok_or_else(|| proxy_error("no command"))?;
        let target = self.target_for(rt, spec, cmd)?;
        let node = rt.router.pick(target).map_err(proxy_error)?;
        Ok((node, target))
    }

    /// A target without a key: the client's database and protocol.
    fn keyless(&self, readonly: bool) -> Target {
        Target {
            slot: None,
            readonly,
            db: self.state.db,
            proto: self.state.proto,
        }
    }

    /// The front command's target (CROSSSLOT refused).
    fn front_target(
        &self,
        rt: &EndpointRuntime,
        spec: Option<&CommandSpec>,
    ) -> Result<Target, Reply> {
        let cmd = self.front().ok_or_else(|| proxy_error("no command"))?;
        self.target_for(rt, spec, cmd)
    }

    /// Starts acquiring a dedicated connection to the node for `target` for the front
    /// command, once every earlier reply is in (a new connection is a new lane). The router
    /// waits, within the hold bound, for a usable node.
    fn acquire(&mut self, rt: &Arc<EndpointRuntime>, target: Target) -> Need {
        if !self.pending.is_empty() {
            return Need::Barrier;
        }
        // One pod cannot take every dedicated connection of the node's pools.
        let Some(slot) = self.pod.take_dedicated() else {
            let (_, n, _, max) = self.pod.holding();
            let r = Reply::error(&format!(
                "ERR datamesh proxy: pod {} holds {n} dedicated backend connections (transactions, blocking commands, subscriptions); its max_dedicated is {max}",
                self.pod.name()
            ));
            return self.refuse(r);
        };
        let f = rt.router.dedicated(target);
        self.stall = Some(Box::pin(async move {
            StallDone::Dedicated(f.await.map(|mut d| {
                d.slot = Some(slot);
                d
            }))
        }));
        Need::Barrier
    }

    /// Sends the front command on the shared lane (split across slots, or to every master,
    /// where the cluster needs it).
    fn forward_front(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: Option<&'static CommandSpec>,
    ) -> Need {
        let lane = self.shared_lane();
        if !self.lane_ok(lane) {
            return Need::Barrier;
        }
        let Some(mut cmd) = self.pop_command() else {
            return Need::Go;
        };
        let cache_guard = self.cache_guard(rt, spec, &cmd);
        if let Some(s) = spec.filter(|_| self.settings.attacks.enabled) {
            // Key attacks: lookups tag their reply slot (pushed below on every path), scans
            // are counted.
            match attacks::look_of(s, &cmd) {
                attacks::Class::Lookup(l) => self.next_look = l,
                attacks::Class::Scan => self.tally.scans += 1,
                attacks::Class::Other => {}
            }
        }
        let class = spec.map(|s| s.replay).unwrap_or(ReplayClass::Write);
        if rt.router.is_cluster() {
            if let Some(s) = spec {
                match s.kind {
                    Kind::Scan => {
                        self.push_reply(Reply::error(&commands::refusal(
                            b"scan",
                            "a cursor cannot span the nodes of a cluster backend; use SCAN on each node directly or a cluster-aware client",
                        )));
                        return Need::Go;
                    }
                    Kind::Broadcast(b) => {
                        let target = self.keyless(s.has(READONLY));
                        let req = self.request(cmd.raw.clone(), class);
                        let f = broadcast(rt.router.clone(), b, req, target, self.state.id);
                        self.push(Call::boxed(f));
                        return Need::Go;
                    }
                    Kind::Split(m) if cmd.args.len() > 2 => {
                        let parts = match split::split_multikey(s.name, m, &cmd.args[1..]) {
                            Ok(p) => p,
                            Err(e) => {
                                self.push_reply(Reply::error(&format!("ERR {e}")));
                                return Need::Go;
                            }
                        };
                        if parts.len() > 1 {
                            let target = self.keyless(s.has(READONLY));
                            let req = self.request(cmd.raw.clone(), class);
                            let f = split_and_merge(
                                rt.router.clone(),
                                m,
                                parts,
                                req,
                                target,
                                self.state.id,
                            );
                            self.push(Call::boxed(f));
                            return Need::Go;
                        }
                    }
                    _ => {}
                }
            }
        }
        let target = match self.target_for(rt, spec, &cmd) {
            Ok(t) => t,
            Err(r) => {
                self.push_reply(r);
                return Need::Go;
            }
        };
        if self.big_floor != usize::MAX {
            if let Some(s) = spec {
                // For the big-reply check when the reply is in (the key is not used further).
                let key = commands::first_key(s, &cmd)
                    .and_then(|i| cmd.args.get_mut(i))
                    .map(std::mem::take);
                self.next_big = Some(BigTag {
                    key,
                    command: s.name,
                    recent: self.next_recent.take(),
                });
            }
        }
        let req = self.request(cmd.raw, class);
        let mut call = self.upstream.send(&rt.router, target, req, self.state.id);
        if spec.is_some_and(|s| s.has(SCRIPT)) {
            // In flight until its reply: its user may SCRIPT KILL it meanwhile.
            let node = if rt.router.is_cluster() {
                rt.router.pick(target).ok()
            } else {
                None
            };
            let user = self.state.user.as_deref().unwrap_or("default");
            let guard = self.pod.script_started(&self.ep.name, user, node);
            call = Call::boxed(async move {
                let r = call.await;
                drop(guard);
                r
            });
        }
        if let Some(guard) = cache_guard {
            call = guarded(call, guard);
        }
        self.push(call);
        Need::Go
    }

    fn execute_blocking(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        let Some(conn) = self.acquired.take() else {
            return match self.front_target(rt, Some(spec)) {
                Ok(target) => self.acquire(rt, target),
                Err(r) => self.answer(r),
            };
        };
        self.lane = Some(Lane::Dedicated(conn.conn.id));
        // No command timeout: a blocking command ends on its own timeout.
        let Some(call) = self.front_on(rt, &conn, spec.replay, false) else {
            return Need::Go;
        };
        let blocking = self.blocking.clone();
        blocking.fetch_add(1, Ordering::Relaxed);
        self.push(Call::boxed(async move {
            let r = call.await;
            blocking.fetch_sub(1, Ordering::Relaxed);
            // Handed back to the pool once the reply is in (clean), closed otherwise.
            drop(conn);
            r
        }));
        Need::Go
    }

    // ---- transactions ----

    fn execute_tx(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: &'static CommandSpec,
        t: TxCmd,
    ) -> Need {
        // Whatever the command, it waits for earlier replies unless they were on the
        // connection holding the transaction or the WATCHes.
        if !self.tx_lane_ok() {
            return Need::Barrier;
        }
        match t {
            TxCmd::Multi => match std::mem::replace(&mut self.state.tx, Tx::None) {
                tx @ Tx::Multi { .. } => {
                    self.state.tx = tx;
                    self.answer(Reply::error("ERR MULTI calls can not be nested"))
                }
                Tx::Watching(d) => {
                    // The connection holds the WATCHes: MULTI goes there now.
                    let Some(call) = self.front_on(rt, &d, ReplayClass::InTransaction, true) else {
                        return Need::Go;
                    };
                    self.push(call);
                    self.state.tx = Tx::Multi {
                        conn: Some(d),
                        deferred: Vec::new(),
                        failed: false,
                    };
                    Need::Go
                }
                Tx::None => {
                    let Some(cmd) = self.pop_command() else {
                        return Need::Go;
                    };
                    self.state.tx = Tx::Multi {
                        conn: None,
                        deferred: vec![cmd.raw],
                        failed: false,
                    };
                    self.push_reply(Reply::ok());
                    Need::Go
                }
            },
            TxCmd::Exec | TxCmd::Discard => {
                let is_exec = t == TxCmd::Exec;
                match std::mem::replace(&mut self.state.tx, Tx::None) {
                    Tx::Multi {
                        conn: Some(d),
                        failed,
                        ..
                    } => {
                        if is_exec && !failed && !d.conn.is_up() {
                            // Its connection died: EXEC is never sent (WATCH state is gone
                            // with it), and the transaction is discarded.
                            return self.answer(exec_abort_lost());
                        }
                        let Some(cmd) = self.pop_command() else {
                            return Need::Go;
                        };
                        let abort = is_exec && failed;
                        let raw = if abort {
                            Bytes::from_static(b"*1\r\n$7\r\nDISCARD\r\n")
                        } else {
                            cmd.raw
                        };
                        let req = self.request(raw, spec.replay);
                        // EXEC/DISCARD end MULTI and every WATCH: the connection is clean (a
                        // lost one is not up, so it is closed anyway).
                        let mut call = release_after(rt.router.call_on(&d, req, true), d, |_| true);
                        if !abort {
                            if let Some(g) = self.cache_guard_all(rt) {
                                call = guarded(call, g);
                            }
                        }
                        self.push(if abort {
                            Call::boxed(async move {
                                call.await;
                                Reply::error(EXECABORT)
                            })
                        } else {
                            call
                        });
                        Need::Go
                    }
                    tx @ Tx::Multi { conn: None, .. } => {
                        if is_exec && !matches!(tx, Tx::Multi { failed: true, .. }) {
                            // Nothing queued needed a node yet: open the transaction on any
                            // node now (MULTI and the queued commands first, then EXEC).
                            self.state.tx = tx;
                            return self.queue_in_multi(rt, None);
                        }
                        self.answer(if is_exec {
                            Reply::error(EXECABORT)
                        } else {
                            Reply::ok()
                        })
                    }
                    other => {
                        // EXEC/DISCARD without MULTI keeps the WATCHes (as Redis does).
                        self.state.tx = other;
                        self.answer(Reply::error(if is_exec {
                            "ERR EXEC without MULTI"
                        } else {
                            "ERR DISCARD without MULTI"
                        }))
                    }
                }
            }
            TxCmd::Watch => match std::mem::replace(&mut self.state.tx, Tx::None) {
                tx @ Tx::Multi { .. } => {
                    self.state.tx = tx;
                    self.answer(Reply::error("ERR WATCH inside MULTI is not allowed"))
                }
                Tx::Watching(d) => {
                    // In cluster mode further WATCHed keys must live on the same node.
                    if rt.router.is_cluster() {
                        match self.node_for(rt, Some(spec)) {
                            Ok((node, _)) if node == d.node() => {}
                            Ok(_) => {
                                self.state.tx = Tx::Watching(d);
                                return self.answer(proxy_error(
                                    "WATCH of keys on different cluster nodes is not supported",
                                ));
                            }
                            Err(r) => {
                                self.state.tx = Tx::Watching(d);
                                return self.answer(r);
                            }
                        }
                    }
                    let Some(call) = self.front_on(rt, &d, spec.replay, true) else {
                        return Need::Go;
                    };
                    self.push(call);
                    self.state.tx = Tx::Watching(d);
                    Need::Go
                }
                Tx::None => {
                    let Some(mut d) = self.acquired.take() else {
                        return match self.front_target(rt, Some(spec)) {
                            Ok(target) => self.acquire(rt, target),
                            Err(r) => self.answer(r),
                        };
                    };
                    self.lane = Some(Lane::Dedicated(d.conn.id));
                    d.clean = false;
                    let Some(call) = self.front_on(rt, &d, spec.replay, true) else {
                        return Need::Go;
                    };
                    self.push(call);
                    self.state.tx = Tx::Watching(d);
                    Need::Go
                }
            },
            TxCmd::Unwatch => match std::mem::replace(&mut self.state.tx, Tx::None) {
                Tx::Watching(d) => {
                    let Some(call) = self.front_on(rt, &d, spec.replay, true) else {
                        return Need::Go;
                    };
                    // UNWATCH answered: the connection is clean again.
                    self.push(release_after(call, d, Reply::is_ok));
                    Need::Go
                }
                tx @ Tx::Multi { .. } => {
                    self.state.tx = tx;
                    self.queue_in_multi(rt, Some(spec))
                }
                Tx::None => self.answer(Reply::ok()),
            },
        }
    }

    /// Queues the front command inside MULTI: on the transaction's connection, opening it
    /// (and sending what was deferred) at the first command that needs a node.
    fn queue_in_multi(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: Option<&'static CommandSpec>,
    ) -> Need {
        if !self.tx_lane_ok() {
            return Need::Barrier;
        }
        let Some(cmd) = self.front() else {
            return Need::Go;
        };
        let is_exec = spec.is_none() && cmd.name().eq_ignore_ascii_case(b"exec");
        // Keyless commands before the first key (cluster mode) are queued locally.
        let keyed = match spec {
            Some(s) => !key_indices(s, cmd).is_empty(),
            None => !is_exec && cmd.args.len() > 1,
        };
        let has_conn = matches!(&self.state.tx, Tx::Multi { conn: Some(_), .. });
        if !has_conn && rt.router.is_cluster() && !keyed && !is_exec {
            let Some(cmd) = self.pop_command() else {
                return Need::Go;
            };
            if let Tx::Multi { deferred, .. } = &mut self.state.tx {
                deferred.push(cmd.raw);
            }
            self.push_reply(Reply::simple("QUEUED"));
            return Need::Go;
        }
        let target = if is_exec {
            Ok(self.keyless(false))
        } else {
            self.front_target(rt, spec)
        };
        let target = match target {
            Ok(t) => t,
            Err(r) => return self.refuse(r),
        };
        // Queued commands run only at EXEC (see `ReplayClass::InTransaction`).
        let class = if is_exec {
            ReplayClass::Stateful
        } else {
            ReplayClass::InTransaction
        };
        match &self.state.tx {
            Tx::Multi { conn: Some(d), .. } => {
                // Keyless commands and EXEC run wherever the transaction is.
                if keyed
                    && !is_exec
                    && rt.router.is_cluster()
                    && rt.router.pick(target).is_ok_and(|n| n != d.node())
                {
                    return self.refuse(proxy_error(
                        "a transaction must stay on one cluster node (keys of other nodes)",
                    ));
                }
                if is_exec && !d.conn.is_up() {
                    // Its connection died: EXEC is never sent (WATCH state is gone with it).
                    self.state.tx = Tx::None;
                    return self.answer(exec_abort_lost());
                }
                let Some(cmd) = self.pop_command() else {
                    return Need::Go;
                };
                let req = self.request(cmd.raw, class);
                if is_exec {
                    // EXEC of a transaction opened lazily: the connection goes back to the
                    // pool once EXEC's reply is in (the call owns it until then).
                    let Tx::Multi { conn: Some(d), .. } =
                        std::mem::replace(&mut self.state.tx, Tx::None)
                    else {
                        return Need::Go;
                    };
                    let mut call = release_after(rt.router.call_on(&d, req, true), d, |_| true);
                    // The transaction's writes: every key fenced until EXEC's reply is in.
                    if let Some(g) = self.cache_guard_all(rt) {
                        call = guarded(call, g);
                    }
                    self.push(call);
                } else if let Tx::Multi { conn: Some(d), .. } = &self.state.tx {
                    let call = rt.router.call_on(d, req, true);
                    self.push(call);
                }
                Need::Go
            }
            _ => {
                let Some(mut d) = self.acquired.take() else {
                    return self.acquire(rt, target);
                };
                d.clean = false;
                self.lane = Some(Lane::Dedicated(d.conn.id));
                // MULTI and the locally answered commands: their replies were given already,
                // so theirs are dropped (a failure shows at EXEC).
                let deferred = match &mut self.state.tx {
                    Tx::Multi { deferred, .. } => std::mem::take(deferred),
                    _ => Vec::new(),
                };
                for raw in deferred {
                    let req = self.request(raw, ReplayClass::InTransaction);
                    let call = rt.router.call_on(&d, req, true);
                    self.push_silent(call);
                }
                if let Tx::Multi { conn, .. } = &mut self.state.tx {
                    *conn = Some(d);
                }
                self.queue_in_multi(rt, spec)
            }
        }
    }

    // ---- pub/sub ----

    fn enter_pubsub(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: &'static CommandSpec,
        p: Sub,
    ) -> Need {
        if p.is_unsubscribe() {
            // Not subscribed: Redis answers one frame per channel (or one with a null).
            let Some(cmd) = self.pop_command() else {
                return Need::Go;
            };
            let r = unsubscribed_reply(spec.name, &cmd.args[1..], self.state.proto);
            self.push_reply(r);
            return Need::Go;
        }
        let target = if p == Sub::SSubscribe {
            self.front_target(rt, Some(spec))
        } else {
            Ok(self.keyless(false))
        };
        let target = match target {
            Ok(t) => t,
            Err(r) => return self.answer(r),
        };
        let Some(mut d) = self.acquired.take() else {
            return self.acquire(rt, target);
        };
        self.lane = Some(Lane::Dedicated(d.conn.id));
        let (tx, rx) = mpsc::unbounded_channel();
        d.conn.set_push_sink(tx);
        d.clean = false;
        let node = d.node();
        self.state.pubsub = Some(Box::new(PubSub {
            conn: d,
            rx,
            node,
            target,
            subs: Default::default(),
            lost_at: None,
        }));
        self.execute_in_pubsub(rt, Some(spec))
    }

    fn execute_in_pubsub(
        &mut self,
        rt: &Arc<EndpointRuntime>,
        spec: Option<&'static CommandSpec>,
    ) -> Need {
        match spec.map(|s| s.kind) {
            Some(Kind::Local(Local::Quit | Local::Reset)) => {
                if let Some(spec) = spec {
                    return self.execute_local(rt, spec);
                }
            }
            // Answered by the proxy (the backend's answers would be about the backend).
            Some(Kind::Local(l @ (Local::Client | Local::Acl))) if !cmd_is_reply(self.front()) => {
                let Some(cmd) = self.pop_command() else {
                    return Need::Go;
                };
                if let Some(r) = self.pubsub_local_error(&cmd.args[0], cmd.arg(1)) {
                    self.write_now(r);
                    return Need::Go;
                }
                if l == Local::Acl {
                    let r = self.acl_command(&cmd);
                    self.write_now(r);
                } else {
                    let k = self.client_command(&cmd);
                    self.write_now(k.reply);
                    if k.close_self {
                        self.killed_self();
                    }
                }
                return Need::Go;
            }
            Some(Kind::Local(l @ (Local::Auth | Local::Hello))) => {
                let name = if l == Local::Auth { "AUTH" } else { "HELLO" };
                self.inbox.pop_front();
                self.write_now(Reply::error(&format!(
                    "ERR {name} while subscribed is not supported by the datamesh proxy"
                )));
                return Need::Go;
            }
            Some(Kind::PubSub(Sub::SSubscribe)) if rt.router.is_cluster() => {
                let node = self.state.pubsub.as_ref().map(|p| p.node);
                if let Ok((n, _)) = self.node_for(rt, spec) {
                    if Some(n) != node {
                        self.inbox.pop_front();
                        self.write_now(proxy_error("SSUBSCRIBE to channels of different cluster nodes on one connection is not supported"));
                        return Need::Go;
                    }
                }
            }
            _ => {}
        }
        if self
            .state
            .pubsub
            .as_ref()
            .is_some_and(|p| p.lost_at.is_some() || p.subs.resyncing())
        {
            // The subscription is being restored on a new connection: wait for it.
            return Need::Barrier;
        }
        let subscription = matches!(spec.map(|s| s.kind), Some(Kind::PubSub(_)));
        if !subscription && self.state.pubsub.as_ref().is_some_and(|p| p.subs.leaving()) {
            // Unsubscribed from everything, confirmations on their way: once they are in,
            // the client is no subscriber and this command is routed like any other.
            return Need::Barrier;
        }
        let Some(cmd) = self.pop_command() else {
            return Need::Go;
        };
        let class = spec.map(|s| s.replay).unwrap_or(ReplayClass::PubSub);
        let sub = match spec.map(|s| s.kind) {
            Some(Kind::PubSub(p)) => Some(p),
            _ => None,
        };
        let readonly = spec.is_some_and(|s| s.has(READONLY));
        if let Some(p) = &mut self.state.pubsub {
            p.subs.sent(sub, &cmd, readonly);
        }
        let req = self.request(cmd.raw, class);
        if let Some(p) = &self.state.pubsub {
            // A connection that just died: its end arrives on the push channel, and the
            // resync restores this command's effect or answers it.
            let _ = rt.router.send_untracked(&p.conn, req);
        }
        Need::Go
    }

    // ---- commands the proxy answers itself ----

    fn execute_local(&mut self, rt: &Arc<EndpointRuntime>, spec: &'static CommandSpec) -> Need {
        let Kind::Local(l) = spec.kind else {
            return self.forward_front(rt, Some(spec));
        };
        let Some(cmd) = self.front().cloned() else {
            return Need::Go;
        };
        let args = &cmd.args;
        let reply = match l {
            Local::Ping => match args.len() {
                1 => Reply::simple("PONG"),
                2 => Reply::bulk(&args[1]),
                _ => wrong_args(b"ping"),
            },
            Local::Echo => Reply::bulk(&args[1]),
            Local::Quit => {
                self.closing = true;
                // Nothing after QUIT runs.
                self.inbox.clear();
                self.push_reply(Reply::ok());
                return Need::Go;
            }
            // RESET drops the dedicated connections: earlier replies from them come first.
            Local::Reset if !self.pending.is_empty() => return Need::Barrier,
            Local::Reset => {
                self.state.reset(&self.settings.users);
                self.publish_view();
                Reply::simple("RESET")
            }
            Local::Auth => {
                let a = self.state.auth(&self.settings.users, &args[1..]);
                if a.auth_failed {
                    return self.auth_failed(a.reply, attempted_user(&args[1..]));
                }
                self.publish_view();
                a.reply
            }
            Local::Hello => {
                let facts = self.facts(rt);
                let a = self.state.hello(&self.settings.users, &facts, &args[1..]);
                if a.auth_failed {
                    let at = args
                        .iter()
                        .position(|a| a.eq_ignore_ascii_case(b"AUTH"))
                        .map(|i| i + 1)
                        .unwrap_or(args.len());
                    let creds = args.get(at..(at + 2).min(args.len())).unwrap_or_default();
                    return self.auth_failed(a.reply, attempted_user(creds));
                }
                self.publish_view();
                a.reply
            }
            Local::Select => {
                let facts = self.facts(rt);
                let r = self.state.select(&facts, &args[1]);
                self.publish_view();
                r
            }
            Local::Client if cmd.arg_is(1, "REPLY") => return self.client_reply(&cmd),
            Local::Client => {
                let k = self.client_command(&cmd);
                if !k.victims.is_empty() {
                    // Like Redis: the killed connections are closed before the reply.
                    let budget = self.shared.budget.clone();
                    let victims = k.victims;
                    let reply = k.reply;
                    self.inbox.pop_front();
                    self.push(Call::boxed(async move {
                        budget.wait_ended(&victims, KILL_WAIT).await;
                        reply
                    }));
                    if k.close_self {
                        self.killed_self();
                    }
                    return Need::Go;
                }
                if k.close_self {
                    // Like Redis: the reply, then the connection closes.
                    self.inbox.pop_front();
                    self.push_reply(k.reply);
                    self.killed_self();
                    return Need::Go;
                }
                k.reply
            }
            Local::Acl => self.acl_command(&cmd),
            Local::ReadOnly | Local::ReadWrite | Local::Asking => Reply {
                raw: view::readonly_reply(),
                kind: ReplyKind::Simple,
            },
            Local::Cluster if rt.router.is_cluster() => {
                let raw =
                    view::cluster_reply(&args[1..], self.state.advertised, self.state.proto >= 3);
                let kind = if raw.first() == Some(&b'-') {
                    ReplyKind::Error
                } else {
                    ReplyKind::Other
                };
                Reply { raw, kind }
            }
            // A standalone backend answers CLUSTER itself ("cluster support disabled").
            Local::Cluster => return self.forward_front(rt, Some(spec)),
        };
        self.answer(reply)
    }

    /// `CLIENT REPLY ON|OFF|SKIP`: whether the proxy writes replies. OFF and SKIP are not
    /// answered; SKIP drops the reply of the next command only.
    fn client_reply(&mut self, cmd: &Command) -> Need {
        if cmd.args.len() != 3 {
            return self.answer(Reply::error("ERR syntax error"));
        }
        self.inbox.pop_front();
        if cmd.arg_is(2, "ON") {
            self.state.reply_off = false;
            self.state.skip_next = false;
            self.push_reply(Reply::ok());
        } else if cmd.arg_is(2, "OFF") {
            self.push_silent(Call::ready(Reply::ok()));
            self.state.reply_off = true;
        } else if cmd.arg_is(2, "SKIP") {
            self.push_silent(Call::ready(Reply::ok()));
            self.state.skip_next = true;
        } else {
            self.push_reply(Reply::error("ERR syntax error"));
        }
        Need::Go
    }
}

/// `CLIENT REPLY` (which the dispatcher applies itself).
fn cmd_is_reply(cmd: Option<&Command>) -> bool {
    cmd.is_some_and(|c| c.arg_is(1, "REPLY"))
}

/// How long a `CLIENT KILL` reply waits for its victims' connections to close (their sessions
/// end on their own tasks, within a scheduling round unless the proxy is overloaded).
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";

/// EXEC of a transaction whose backend connection died before EXEC: never sent.
fn exec_abort_lost() -> Reply {
    Reply::error(
        "EXECABORT Transaction discarded: its backend connection was lost before EXEC (datamesh proxy); WATCHed keys are no longer watched, so the transaction was not sent",
    )
}

/// `call` on the dedicated connection `d`, which goes back to the pool once the reply is in
/// if `clean` says so for that reply (and is closed otherwise).
fn release_after(call: Call, mut d: Dedicated, clean: fn(&Reply) -> bool) -> Call {
    Call::boxed(async move {
        let r = call.await;
        d.clean = clean(&r);
        drop(d);
        r
    })
}

/// `SCRIPT KILL` / `FUNCTION KILL` on each of `nodes`, each on a dedicated connection of its
/// own: OK when any node killed a script, else the first error (`NOTBUSY ...` when none ran).
async fn kill_on_nodes(
    router: Arc<Router>,
    nodes: Vec<SocketAddr>,
    req: Request,
    target: Target,
) -> Reply {
    let calls = nodes.into_iter().map(|node| {
        let router = router.clone();
        let req = req.clone();
        async move {
            let pool = router.group.pool(router.key(node, target));
            match pool.dedicated().await {
                Ok(d) => {
                    let r = router.call_on(&d, req, false).await;
                    drop(d);
                    r
                }
                Err(e) => error_reply(&e, e.never_sent()),
            }
        }
    });
    let replies = futures::future::join_all(calls).await;
    if replies.iter().any(Reply::is_ok) {
        return Reply::ok();
    }
    replies
        .into_iter()
        .next()
        .unwrap_or_else(|| proxy_error("no cluster master known yet"))
}

/// A multi-key command whose keys span slots: one part per slot through the router, merged
/// back in key order.
async fn split_and_merge(
    router: Arc<Router>,
    kind: MultiKey,
    parts: Vec<split::SubCommand>,
    req: Request,
    target: Target,
    affinity: u64,
) -> Reply {
    let calls: Vec<Call> = parts
        .iter()
        .map(|p| {
            let part = Request {
                raw: p.encode(),
                ..req.clone()
            };
            let t = Target {
                slot: Some(p.slot),
                ..target
            };
            router.call(None, t, part, affinity)
        })
        .collect();
    let replies = futures::future::join_all(calls).await;
    let mut raws = Vec::with_capacity(replies.len());
    for r in replies {
        raws.push(r.raw);
    }
    match split::merge(kind, &parts, &raws) {
        Ok(raw) => Reply {
            kind: ReplyKind::of(raw.first().copied().unwrap_or(b'+')),
            raw,
        },
        Err(e) => proxy_error(e),
    }
}

/// A keyless command run on every master of a cluster backend, replies merged.
async fn broadcast(
    router: Arc<Router>,
    how: Broadcast,
    req: Request,
    target: Target,
    affinity: u64,
) -> Reply {
    let masters = router.topology.masters();
    if masters.is_empty() {
        return proxy_error("no cluster master known yet");
    }
    let calls: Vec<Call> = masters
        .iter()
        .map(|a| router.call(Some(*a), target, req.clone(), affinity))
        .collect();
    let replies = futures::future::join_all(calls).await;
    if let Some(e) = replies.iter().find(|r| r.is_error()) {
        return e.clone();
    }
    match how {
        Broadcast::AllOk | Broadcast::First => replies.into_iter().next().unwrap_or_else(Reply::ok),
        Broadcast::Sum => Reply::integer_reply(replies.iter().filter_map(|r| r.integer()).sum()),
        Broadcast::Concat => {
            let mut items: Vec<Value> = Vec::new();
            for r in &replies {
                if let Some(v) = Value::parse(&r.raw) {
                    for it in v.as_array().unwrap_or_default() {
                        if let Some(b) = it.as_bytes() {
                            items.push(Value::Bulk(Bytes::copy_from_slice(b)));
                        }
                    }
                }
            }
            Value::Array(items).into_reply(target.proto)
        }
    }
}

/// `call`, holding the local cache's write guard until its reply is in (or it is dropped).
fn guarded(call: Call, guard: WriteGuard) -> Call {
    Call::boxed(async move {
        let r = call.await;
        drop(guard);
        r
    })
}
