//! What a session answers from the proxy-wide registries rather than from its own state:
//! `CLIENT LIST/INFO/KILL` over the proxy's client connections ([`crate::clients`], scoped to
//! what the caller may see), `ACL WHOAMI/USERS/CAT/LOG` from the proxy's users and its
//! [`crate::acl_log`]; and the view of this client that others see, republished only when it
//! changes (never per command).

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::state::wrong_args;
use super::Session;
use crate::acl_log::{AclLog, Denial, Reason, DEFAULT_COUNT};
use crate::budget::{ClientMem, Closed};
use crate::clients::{verbatim, ClientView, Flags, KillFilter, Line, ListFilter, Names, Viewer};
use crate::commands::acl::{catalog, Catalog};
use crate::commands::{refusal, ACL_REFUSED};
use crate::resp::{Command, Reply, Value};

/// What `CLIENT KILL` did.
pub(super) struct Kill {
    pub reply: Reply,
    /// The caller matched: it is closed once the reply is written.
    pub close_self: bool,
    /// Other clients it closed: the reply waits until their connections are (like Redis,
    /// which frees them before it answers).
    pub victims: Vec<Arc<ClientMem>>,
}

impl Session {
    /// The state flags others see.
    fn flags_now(&self) -> Flags {
        let (sub, psub, ssub) = self
            .state
            .pubsub
            .as_ref()
            .map(|p| p.subs.counts())
            .unwrap_or_default();
        let n = |c: usize| u32::try_from(c).unwrap_or(u32::MAX);
        let (sub, psub, ssub) = (n(sub), n(psub), n(ssub));
        Flags {
            pubsub: self.state.pubsub.is_some(),
            multi: self.state.tx.in_multi(),
            sub,
            psub,
            ssub,
        }
    }

    /// This client as others see it.
    pub(super) fn view_now(&self) -> ClientView {
        let s = &self.state;
        ClientView {
            names: Names::boxed(Names {
                name: s.name.clone(),
                lib_name: s.lib_name.clone(),
                lib_ver: s.lib_ver.clone(),
            }),
            user: s.user.clone(),
            db: s.db,
            resp: s.proto,
            flags: self.flags_now(),
        }
    }

    /// Republishes the view (after the local commands that may change it: AUTH, HELLO,
    /// SELECT, CLIENT, RESET; rare, so one short lock each).
    pub(super) fn publish_view(&mut self) {
        let v = self.view_now();
        self.view_flags = v.flags;
        if let Some(info) = self.mem.info() {
            info.publish(v);
        }
    }

    /// Republishes the flags if they changed (once per loop: a comparison, no lock).
    pub(super) fn publish_flags(&mut self) {
        let f = self.flags_now();
        if f != self.view_flags {
            self.view_flags = f;
            if let Some(info) = self.mem.info() {
                info.publish_flags(f);
            }
        }
    }

    /// The caller's user when it is a configured proxy user (not the implicit `default` of a
    /// proxy without users).
    fn named_user(&self) -> Option<&str> {
        let u = self.state.user.as_deref()?;
        self.settings.users.iter().any(|x| x.name == u).then_some(u)
    }

    fn viewer(&self) -> Viewer<'_> {
        Viewer {
            id: self.state.id,
            endpoint: Arc::as_ptr(&self.ep) as usize,
            pod: self.pod.cookie,
            named_user: self.named_user(),
            operator: self.is_operator(),
        }
    }

    /// This client's own line (what the registry cannot know: its query buffer, its current
    /// command), with its newline.
    pub(super) fn own_line(&self, cmd: &str) -> String {
        let view = self.view_now();
        let mut out = String::new();
        Line {
            id: self.state.id,
            peer: self.state.peer,
            laddr: self.state.advertised,
            age: self.state.created.elapsed().as_secs(),
            idle: 0,
            view: &view,
            blocked: self.blocked_on_dedicated() && self.state.pubsub.is_none(),
            qbuf: (self.rbuf.len(), self.rbuf.capacity()),
            omem: self.mem.output(),
            tot_mem: self.mem.total(),
            cmd,
        }
        .render(&mut out);
        out
    }

    /// `CLIENT <sub> ...` but `REPLY`: LIST, INFO and KILL from the registry, the rest from the
    /// client's state. The view is republished after (SETNAME, SETINFO).
    pub(super) fn client_command(&mut self, cmd: &Command) -> Kill {
        let proto = self.state.proto;
        let reply = if cmd.arg_is(1, "LIST") {
            self.client_list(cmd)
        } else if cmd.arg_is(1, "INFO") && cmd.args.len() == 2 {
            verbatim(&self.own_line("client|info"), proto)
        } else if cmd.arg_is(1, "KILL") && cmd.args.len() >= 3 {
            return self.client_kill(cmd);
        } else if cmd.arg_is(1, "INFO") || cmd.arg_is(1, "KILL") {
            let sub = String::from_utf8_lossy(cmd.arg(1)).to_ascii_lowercase();
            wrong_args(format!("client|{sub}").as_bytes())
        } else {
            let r = self.state.client(cmd);
            self.publish_view();
            r
        };
        Kill {
            reply,
            close_self: false,
            victims: Vec::new(),
        }
    }

    fn client_list(&self, cmd: &Command) -> Reply {
        let filter = match ListFilter::parse(&cmd.args) {
            Ok(f) => f,
            Err(r) => return r,
        };
        let viewer = self.viewer();
        let now = Instant::now();
        let mut out = String::new();
        let clients = self.shared.budget.snapshot();
        let mut emit = |m: &crate::budget::ClientMem| {
            let Some(info) = m.info() else {
                return;
            };
            if m.id == self.state.id {
                let mine = self.own_line("client|list");
                let keep = match &filter {
                    ListFilter::Type(t) => *t == info.client_type(&self.view_now()),
                    _ => true,
                };
                if keep {
                    out.push_str(&mine);
                }
                return;
            }
            let view = info.view();
            if m.closed().is_some() || !viewer.sees(info, &view) {
                return;
            }
            if let ListFilter::Type(t) = &filter {
                if *t != info.client_type(&view) {
                    return;
                }
            }
            out.push_str(&crate::clients::line_of(
                info,
                &view,
                (m.output(), m.total()),
                now,
            ));
        };
        match &filter {
            ListFilter::Ids(ids) => {
                // In the order asked, like Redis.
                for id in ids {
                    if let Some(m) = clients.iter().find(|m| m.id == *id) {
                        emit(m);
                    }
                }
            }
            _ => clients.iter().for_each(|m| emit(m)),
        }
        verbatim(&out, self.state.proto)
    }

    fn client_kill(&mut self, cmd: &Command) -> Kill {
        let done = |reply| Kill {
            reply,
            close_self: false,
            victims: Vec::new(),
        };
        let f = match KillFilter::parse(&cmd.args) {
            Ok(f) => f,
            Err(r) => return done(r),
        };
        let viewer = self.viewer();
        let now = Instant::now();
        let clients = self.shared.budget.snapshot();
        if let Some(u) = &f.user {
            // Redis answers "No such user" for a user it does not have; a tenant learns
            // nothing about users it cannot see.
            let known = if viewer.operator {
                u == "default" || self.settings.users.iter().any(|x| x.name == *u)
            } else {
                self.state.user.as_deref().unwrap_or("default") == u
                    || clients.iter().any(|m| {
                        m.info().is_some_and(|i| {
                            let v = i.view();
                            v.user.as_deref() == Some(u.as_str()) && viewer.sees(i, &v)
                        })
                    })
            };
            if !known {
                return done(Reply::error(&format!("ERR No such user '{u}'")));
            }
        }
        let mut killed = 0i64;
        let mut close_self = false;
        let mut victims = Vec::new();
        for m in &clients {
            let Some(info) = m.info() else {
                continue;
            };
            let view = if m.id == self.state.id {
                self.view_now()
            } else {
                info.view()
            };
            if !viewer.sees(info, &view) || !f.matches(self.state.id, info, &view, now) {
                continue;
            }
            if m.id == self.state.id {
                close_self = true;
                killed += 1;
            } else if m.close(Closed::Killed) {
                tracing::debug!(client_id = m.id, by = self.state.id, pod = %self.pod.name(), "CLIENT KILL");
                killed += 1;
                victims.push(m.clone());
            }
        }
        let reply = if !f.old_form {
            Reply::integer_reply(killed)
        } else if killed > 0 {
            Reply::ok()
        } else {
            Reply::error("ERR No such client")
        };
        Kill {
            reply,
            close_self,
            victims,
        }
    }

    /// `ACL <sub> ...`: WHOAMI, USERS, CAT and LOG answered from the proxy's users and log; the
    /// other subcommands refused (they would act on or show the backend's users).
    pub(super) fn acl_command(&mut self, cmd: &Command) -> Reply {
        let argc = cmd.args.len();
        let proto = self.state.proto;
        let sub = String::from_utf8_lossy(cmd.arg(1)).into_owned();
        let me = self.state.user.as_deref().unwrap_or("default");
        let bulks = |v: Vec<&str>| Value::Array(v.into_iter().map(Value::bulk).collect());
        match sub.to_ascii_lowercase().as_str() {
            "whoami" if argc == 2 => Reply::bulk(me.as_bytes()),
            "users" if argc == 2 => {
                let mut names: Vec<&str> = if self.is_operator() {
                    self.settings
                        .users
                        .iter()
                        .map(|u| u.name.as_str())
                        .collect()
                } else {
                    vec![me]
                };
                if names.is_empty() {
                    names.push("default");
                }
                names.sort_unstable();
                names.dedup();
                bulks(names).into_reply(proto)
            }
            "whoami" | "users" => {
                wrong_args(format!("acl|{}", sub.to_ascii_lowercase()).as_bytes())
            }
            "cat" if argc == 2 => bulks(Catalog::categories().to_vec()).into_reply(proto),
            "cat" if argc == 3 => {
                let cat = String::from_utf8_lossy(cmd.arg(2));
                match catalog().commands_in(&cat) {
                    Some(cmds) => bulks(cmds).into_reply(proto),
                    None => {
                        let shown: String = cat.chars().take(128).collect();
                        Reply::error(&format!("ERR Unknown category '{shown}'"))
                    }
                }
            }
            "log" if argc <= 3 => self.acl_log(cmd),
            _ if catalog().has_subcommand("acl", cmd.arg(1)) => {
                if cmd.arg_is(1, "CAT") || cmd.arg_is(1, "LOG") {
                    Reply::error(&format!(
                        "ERR unknown subcommand or wrong number of arguments for '{sub}'. Try ACL HELP."
                    ))
                } else {
                    Reply::error(&refusal(b"acl", ACL_REFUSED))
                }
            }
            _ => {
                let shown: String = sub.chars().take(128).collect();
                Reply::error(&format!("ERR unknown subcommand '{shown}'. Try ACL HELP."))
            }
        }
    }

    /// `ACL LOG [count | RESET]`: the caller's pod's entries (an operator: all).
    fn acl_log(&mut self, cmd: &Command) -> Reply {
        let scope = (!self.is_operator()).then_some(self.pod.cookie);
        let mut count = DEFAULT_COUNT;
        if cmd.args.len() == 3 {
            if cmd.arg_is(2, "RESET") {
                self.shared.acl_log.reset(scope);
                return Reply::ok();
            }
            match std::str::from_utf8(cmd.arg(2))
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(n) => count = n.max(0) as usize,
                None => return Reply::error("ERR value is not an integer or out of range"),
            }
        }
        let entries = self.shared.acl_log.entries(scope, count);
        AclLog::reply(&entries, self.state.proto)
    }

    /// Logs a failed AUTH or a policy refusal of the front command (`ACL LOG`).
    pub(super) fn log_denial(&self, reason: Reason, object: &str, username: &str) {
        let cmd = match reason {
            Reason::Auth | Reason::Key => self
                .front()
                .map(|c| String::from_utf8_lossy(c.name()).to_ascii_lowercase())
                .unwrap_or_default(),
            Reason::Command => object.to_string(),
        };
        let mut info = self.own_line(&cmd);
        info.pop();
        self.shared.acl_log.add(Denial {
            reason,
            in_multi: self.state.tx.in_multi(),
            object,
            username,
            pod: self.pod.cookie,
            client_info: info,
        });
    }

    /// The name of the front command as typed (an auth failure's `object`, like Redis).
    pub(super) fn front_name(&self) -> String {
        self.front()
            .map(|c| {
                let n = c.name();
                String::from_utf8_lossy(&n[..n.len().min(64)]).into_owned()
            })
            .unwrap_or_default()
    }

    /// The caller closes itself with `CLIENT KILL` (after its reply, like Redis's
    /// close-after-reply): nothing after it runs.
    pub(super) fn killed_self(&mut self) {
        self.closing = true;
        self.inbox.clear();
        self.shared.budget.count_closed(Closed::Killed);
    }

    /// Whether CLIENT or ACL is answered by the proxy while subscribed (RESP3 allows any
    /// command then; RESP2 only the subscription commands, like Redis).
    pub(super) fn pubsub_local_error(&self, name: &Bytes, sub: &[u8]) -> Option<Reply> {
        (self.state.proto < 3).then(|| {
            Reply::error(&format!(
                "ERR Can't execute '{}|{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                String::from_utf8_lossy(name).to_ascii_lowercase(),
                String::from_utf8_lossy(sub).to_ascii_lowercase()
            ))
        })
    }
}
