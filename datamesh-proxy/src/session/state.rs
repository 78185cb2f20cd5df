//! A client's state as the proxy keeps it: who it is (id, addresses, user, name, library),
//! what it selected (database, protocol, reply mode), and what it holds (a transaction or
//! WATCH on a dedicated connection, a subscription connection). The answers that depend only
//! on this state (AUTH, HELLO, SELECT, CLIENT ...) are computed here, without I/O.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::{BackendError, Dedicated};
use crate::commands::acl::Policy;
use crate::config::{SessionSettings, User};
use crate::resp::{Command, Reply, Value};

/// MULTI/WATCH state.
pub enum Tx {
    None,
    /// WATCH sent on this connection; MULTI may follow.
    Watching(Dedicated),
    /// Inside MULTI. `conn` is opened at the first command that needs it (in cluster mode the
    /// first key decides the node); `deferred` holds what was answered locally and must be
    /// sent first (MULTI and keyless commands); `failed` = a command was refused while
    /// queueing, so EXEC answers EXECABORT like Redis.
    Multi {
        conn: Option<Dedicated>,
        deferred: Vec<Bytes>,
        failed: bool,
    },
}

impl Tx {
    pub fn in_multi(&self) -> bool {
        matches!(self, Tx::Multi { .. })
    }

    /// The connection holding the WATCHes or the open transaction, if any.
    pub fn conn(&self) -> Option<&Dedicated> {
        match self {
            Tx::Watching(d) | Tx::Multi { conn: Some(d), .. } => Some(d),
            _ => None,
        }
    }

    /// Marks a MULTI as failed (a command was refused while queueing).
    pub fn fail(&mut self) {
        if let Tx::Multi { failed, .. } = self {
            *failed = true;
        }
    }
}

/// The client's subscription connection: every frame from it goes to the client (but those
/// of a resync, see [`super::pubsub`]).
pub struct PubSub {
    pub conn: Dedicated,
    pub rx: mpsc::UnboundedReceiver<Result<Reply, BackendError>>,
    pub node: SocketAddr,
    /// Where a new subscription connection goes when this one dies.
    pub target: crate::upstream::Target,
    pub subs: super::pubsub::Subscriptions,
    /// When the connection died (None: it is up).
    pub lost_at: Option<tokio::time::Instant>,
}

/// What `AUTH` or `HELLO` computed.
pub struct Answer {
    pub reply: Reply,
    /// A wrong user or password (counted as an auth error).
    pub auth_failed: bool,
}

/// The user name an AUTH or HELLO AUTH tried (for the failed-AUTH log; bounded).
pub fn attempted_user(auth_args: &[Bytes]) -> String {
    let name = match auth_args {
        [u, _] => &u[..],
        _ => b"default",
    };
    String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned()
}

impl Answer {
    fn ok(reply: Reply) -> Self {
        Self {
            reply,
            auth_failed: false,
        }
    }
}

/// What the backend side tells HELLO and CLIENT INFO.
pub struct ServerFacts {
    pub version: String,
    pub cluster: bool,
    pub databases: u32,
}

pub struct ClientState {
    pub id: u64,
    pub peer: SocketAddr,
    /// Address shown to cluster-aware clients as the (only) cluster node: what they dialled.
    pub advertised: SocketAddr,
    /// None until authenticated (when users are configured).
    pub user: Option<String>,
    pub db: u32,
    pub proto: u8,
    pub name: Option<Bytes>,
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
    /// `CLIENT REPLY OFF`: no reply is written.
    pub reply_off: bool,
    /// `CLIENT REPLY SKIP`: the next command's reply is not written.
    pub skip_next: bool,
    pub tx: Tx,
    /// Boxed: most clients never subscribe, and every session carries this field.
    pub pubsub: Option<Box<PubSub>>,
    pub created: Instant,
    /// The user's command policy, resolved from the settings in `acl_from` (None until the
    /// client is authenticated, and again when its user changes).
    pub acl: Option<Arc<Policy>>,
    acl_from: Weak<SessionSettings>,
    /// Failed AUTH attempts on this connection.
    pub auth_failures: u32,
}

/// Whether a client must AUTH first: users are configured and there is no password-less
/// "default" user.
pub fn auth_required(users: &[User]) -> bool {
    !users.is_empty()
        && !users
            .iter()
            .any(|u| u.name == "default" && u.password.is_none())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Constant time in the length of `b` (the configured password).
    let mut diff = (a.len() != b.len()) as u8;
    for (i, y) in b.iter().enumerate() {
        diff |= a.get(i).copied().unwrap_or(0) ^ y;
    }
    diff == 0
}

pub fn wrong_args(name: &[u8]) -> Reply {
    Reply::error(&format!(
        "ERR wrong number of arguments for '{}' command",
        String::from_utf8_lossy(name).to_ascii_lowercase()
    ))
}

/// The longest client or library name kept: they are held for the connection's life and shown
/// in every CLIENT LIST (Redis bounds them only by the bulk length).
pub const MAX_CLIENT_NAME: usize = 1024;

fn check_client_name(name: &[u8]) -> Result<(), Reply> {
    check_client_attr("Client names", name)
}

/// Redis 7.2's rule for names and `CLIENT SETINFO` values (so no value can break a CLIENT
/// LIST line into two), plus a length bound.
fn check_client_attr(what: &str, value: &[u8]) -> Result<(), Reply> {
    if value.iter().any(|b| *b <= b' ' || *b > b'~') {
        return Err(Reply::error(&format!(
            "ERR {what} cannot contain spaces, newlines or special characters."
        )));
    }
    if value.len() > MAX_CLIENT_NAME {
        return Err(Reply::error(&format!(
            "ERR {what} longer than {MAX_CLIENT_NAME} bytes are not supported by the datamesh proxy"
        )));
    }
    Ok(())
}

fn check_user(users: &[User], user: &[u8], pass: &[u8]) -> Result<(), Reply> {
    let wrong = || Reply::error("WRONGPASS invalid username-password pair or user is disabled.");
    match users.iter().find(|u| u.name.as_bytes() == user) {
        Some(u) => match &u.password {
            None => Ok(()),
            Some(p) if ct_eq(pass, p.expose().as_bytes()) => Ok(()),
            Some(_) => Err(wrong()),
        },
        // No users configured: the default user has no password and accepts any.
        None if users.is_empty() && user == b"default" => Ok(()),
        None => Err(wrong()),
    }
}

impl ClientState {
    pub fn new(id: u64, peer: SocketAddr, advertised: SocketAddr, users: &[User]) -> Self {
        Self {
            id,
            peer,
            advertised,
            user: (!auth_required(users)).then(|| "default".to_string()),
            db: 0,
            proto: 2,
            name: None,
            lib_name: None,
            lib_ver: None,
            reply_off: false,
            skip_next: false,
            tx: Tx::None,
            pubsub: None,
            created: Instant::now(),
            acl: None,
            acl_from: Weak::new(),
            auth_failures: 0,
        }
    }

    /// Resolves the user's policy if the user or the settings changed (a reload swaps the
    /// settings whole): a pointer comparison per command otherwise.
    pub fn refresh_acl(&mut self, settings: &Arc<SessionSettings>) {
        if self.acl.is_some() && std::ptr::eq(self.acl_from.as_ptr(), Arc::as_ptr(settings)) {
            return;
        }
        self.acl = self
            .user
            .as_deref()
            .map(|u| settings.acl.for_user(u).clone());
        self.acl_from = Arc::downgrade(settings);
    }

    pub fn authenticated(&self) -> bool {
        self.user.is_some()
    }

    /// Whether the reply of the command being answered is written (CLIENT REPLY); consumes a
    /// pending SKIP.
    pub fn reply_silenced(&mut self) -> bool {
        self.reply_off || std::mem::take(&mut self.skip_next)
    }

    /// RESET: back to a fresh connection's state (dropping a transaction or subscription
    /// closes their connections, which ends them on the backend).
    pub fn reset(&mut self, users: &[User]) {
        self.tx = Tx::None;
        self.pubsub = None;
        self.db = 0;
        self.proto = 2;
        self.name = None;
        self.reply_off = false;
        self.skip_next = false;
        self.user = (!auth_required(users)).then(|| "default".to_string());
        self.acl = None;
    }

    pub fn auth(&mut self, users: &[User], args: &[Bytes]) -> Answer {
        let (user, pass) = match args {
            [p] => {
                if users.is_empty() {
                    return Answer::ok(Reply::error("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"));
                }
                (&b"default"[..], &p[..])
            }
            [u, p] => (&u[..], &p[..]),
            _ => return Answer::ok(Reply::error("ERR syntax error")),
        };
        match check_user(users, user, pass) {
            Ok(()) => {
                self.user = Some(String::from_utf8_lossy(user).into_owned());
                self.acl = None;
                Answer::ok(Reply::ok())
            }
            Err(reply) => Answer {
                reply,
                auth_failed: true,
            },
        }
    }

    pub fn hello(&mut self, users: &[User], facts: &ServerFacts, args: &[Bytes]) -> Answer {
        let mut proto = self.proto;
        let mut i = 0;
        if let Some(v) = args.first() {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(2) => proto = 2,
                Some(3) => proto = 3,
                Some(_) => return Answer::ok(Reply::error("NOPROTO unsupported protocol version")),
                None => {
                    return Answer::ok(Reply::error(
                        "ERR Protocol version is not an integer or out of range",
                    ))
                }
            }
            i = 1;
        }
        let mut new_user = None;
        let mut new_name = None;
        while i < args.len() {
            let opt = &args[i];
            if opt.eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
                if let Err(reply) = check_user(users, &args[i + 1], &args[i + 2]) {
                    return Answer {
                        reply,
                        auth_failed: true,
                    };
                }
                new_user = Some(String::from_utf8_lossy(&args[i + 1]).into_owned());
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"SETNAME") && i + 1 < args.len() {
                if let Err(r) = check_client_name(&args[i + 1]) {
                    return Answer::ok(r);
                }
                new_name = Some(args[i + 1].clone());
                i += 2;
            } else {
                return Answer::ok(Reply::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(opt)
                )));
            }
        }
        if self.user.is_none() && new_user.is_none() {
            return Answer::ok(Reply::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"));
        }
        if let Some(u) = new_user {
            self.user = Some(u);
            self.acl = None;
        }
        if let Some(n) = new_name {
            self.name = if n.is_empty() { None } else { Some(n) };
        }
        self.proto = proto;
        let mode = if facts.cluster {
            "cluster"
        } else {
            "standalone"
        };
        Answer::ok(
            Value::Map(vec![
                (Value::bulk("server"), Value::bulk("redis")),
                (Value::bulk("version"), Value::bulk(&facts.version)),
                (Value::bulk("proto"), Value::Int(proto as i64)),
                (Value::bulk("id"), Value::Int(self.id as i64)),
                (Value::bulk("mode"), Value::bulk(mode)),
                (Value::bulk("role"), Value::bulk("master")),
                (Value::bulk("modules"), Value::Array(vec![])),
            ])
            .into_reply(proto),
        )
    }

    pub fn select(&mut self, facts: &ServerFacts, arg: &[u8]) -> Reply {
        let Some(db) = std::str::from_utf8(arg)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        else {
            return Reply::error("ERR value is not an integer or out of range");
        };
        if facts.cluster && db != 0 {
            return Reply::error("ERR SELECT is not allowed in cluster mode");
        }
        if db < 0 || db >= facts.databases as i64 {
            return Reply::error("ERR DB index is out of range");
        }
        self.db = db as u32;
        Reply::ok()
    }

    /// `CLIENT <sub> ...` from the client's own state (`REPLY` is applied by the dispatcher,
    /// since it decides whether its own reply is written; `LIST`, `INFO` and `KILL` are
    /// answered from the client registry, `session/admin.rs`).
    pub fn client(&mut self, cmd: &Command) -> Reply {
        let args = &cmd.args;
        let is = |w: &str| cmd.arg_is(1, w);
        if is("ID") {
            Reply::integer_reply(self.id as i64)
        } else if is("SETNAME") && args.len() == 3 {
            match check_client_name(&args[2]) {
                Ok(()) => {
                    self.name = if args[2].is_empty() {
                        None
                    } else {
                        Some(args[2].clone())
                    };
                    Reply::ok()
                }
                Err(r) => r,
            }
        } else if is("GETNAME") {
            match &self.name {
                Some(n) => Reply::bulk(n),
                None => Reply::null(self.proto),
            }
        } else if is("SETINFO") && args.len() == 4 {
            let what = if cmd.arg_is(2, "LIB-NAME") {
                "lib-name"
            } else {
                "lib-ver"
            };
            if let Err(r) = check_client_attr(what, &args[3]) {
                return r;
            }
            if cmd.arg_is(2, "LIB-NAME") {
                self.lib_name = Some(args[3].clone());
            } else if cmd.arg_is(2, "LIB-VER") {
                self.lib_ver = Some(args[3].clone());
            } else {
                return Reply::error(&format!(
                    "ERR Unrecognized option '{}'",
                    String::from_utf8_lossy(&args[2])
                ));
            }
            Reply::ok()
        } else if is("GETREDIR") {
            Reply::integer_reply(-1)
        } else if is("TRACKING") || is("CACHING") || is("TRACKINGINFO") {
            Reply::error(&crate::commands::refusal(
                &client_sub(cmd),
                "client-side caching needs invalidations for this client, but backend connections are shared",
            ))
        } else if ["PAUSE", "UNPAUSE", "UNBLOCK", "NO-EVICT", "NO-TOUCH"]
            .iter()
            .any(|w| is(w))
        {
            Reply::error(&crate::commands::refusal(
                &client_sub(cmd),
                "it acts on backend connections that are shared by many clients",
            ))
        } else if args.len() < 2 {
            wrong_args(b"client")
        } else {
            Reply::error(&format!(
                "ERR unknown subcommand or wrong number of arguments for 'CLIENT|{}' command",
                String::from_utf8_lossy(&args[1]).to_ascii_lowercase()
            ))
        }
    }
}

/// "CLIENT <SUB>" for refusal messages.
fn client_sub(cmd: &Command) -> Vec<u8> {
    let mut out = b"CLIENT ".to_vec();
    out.extend(cmd.arg(1).to_ascii_uppercase());
    out
}

/// The frames Redis answers an UNSUBSCRIBE-family command with when the client is not
/// subscribed: one per named channel, or one with a null channel.
pub fn unsubscribed_reply(kind: &str, channels: &[Bytes], proto: u8) -> Reply {
    let mut out = BytesMut::new();
    let names: Vec<Value> = if channels.is_empty() {
        vec![Value::Null]
    } else {
        channels.iter().map(|c| Value::Bulk(c.clone())).collect()
    };
    for ch in names {
        Value::Push(vec![Value::bulk(kind), ch, Value::Int(0)]).encode(proto, &mut out);
    }
    Reply {
        raw: out.freeze(),
        kind: crate::resp::ReplyKind::Push,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().expect("addr")
    }

    fn user(n: &str, p: Option<&str>) -> User {
        User {
            name: n.into(),
            password: p.map(|p| Secret(p.into())),
            acl: None,
        }
    }

    fn cmd(s: &str) -> Command {
        Command::from_args(s.split(' ').map(|a| Bytes::copy_from_slice(a.as_bytes())))
    }

    fn facts() -> ServerFacts {
        ServerFacts {
            version: "7.0.15".into(),
            cluster: false,
            databases: 16,
        }
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secreT", b"secret"));
        assert!(!ct_eq(b"secret1", b"secret"));
        assert!(!ct_eq(b"", b"secret"));
    }

    #[test]
    fn auth_requirement() {
        assert!(!auth_required(&[]));
        assert!(auth_required(&[user("default", Some("x"))]));
        assert!(!auth_required(&[
            user("default", None),
            user("app", Some("y"))
        ]));
        assert!(auth_required(&[user("app", Some("y"))]));
    }

    #[test]
    fn auth_hello_and_reset() {
        let users = [user("app", Some("pw"))];
        let mut s = ClientState::new(7, addr(), addr(), &users);
        assert!(!s.authenticated());
        let a = s.auth(&users, &[Bytes::from("app"), Bytes::from("bad")]);
        assert!(a.auth_failed && a.reply.is_error());
        let h = s.hello(&users, &facts(), &[Bytes::from("3")]);
        assert!(h.reply.error_text().starts_with(b"NOAUTH"));
        let h = s.hello(
            &users,
            &facts(),
            &[
                Bytes::from("3"),
                Bytes::from("auth"),
                Bytes::from("app"),
                Bytes::from("pw"),
                Bytes::from("setname"),
                Bytes::from("w1"),
            ],
        );
        assert!(!h.auth_failed, "{:?}", h.reply);
        assert_eq!((s.proto, s.user.as_deref()), (3, Some("app")));
        assert_eq!(s.name.as_deref(), Some(&b"w1"[..]));
        assert!(h.reply.raw.starts_with(b"%7\r\n"));
        s.reply_off = true;
        s.reset(&users);
        assert!(!s.authenticated() && s.proto == 2 && s.name.is_none() && !s.reply_off);
    }

    #[test]
    fn select_and_client_subcommands() {
        let mut s = ClientState::new(9, addr(), addr(), &[]);
        assert!(s.select(&facts(), b"16").is_error());
        assert!(s.select(&facts(), b"x").is_error());
        assert!(s.select(&facts(), b"3").is_ok());
        assert_eq!(s.db, 3);
        let cluster = ServerFacts {
            cluster: true,
            ..facts()
        };
        assert!(s.select(&cluster, b"1").is_error());
        assert_eq!(s.client(&cmd("CLIENT ID")).integer(), Some(9));
        assert!(s.client(&cmd("client setname a b")).is_error());
        assert!(s.client(&cmd("client setname w")).is_ok());
        assert_eq!(&s.client(&cmd("CLIENT GETNAME")).raw[..], b"$1\r\nw\r\n");
        let pause = s.client(&cmd("CLIENT PAUSE 10"));
        assert!(pause
            .error_text()
            .starts_with(b"ERR CLIENT PAUSE is not supported"));
        assert!(s.client(&cmd("CLIENT NOPE")).is_error());
    }

    #[test]
    fn names_cannot_break_a_client_list_line_or_grow_without_bound() {
        let mut s = ClientState::new(1, addr(), addr(), &[]);
        let with =
            |parts: &[&[u8]]| Command::from_args(parts.iter().map(|p| Bytes::copy_from_slice(p)));
        // A newline would forge a second line in another client's CLIENT LIST.
        let forged: &[u8] = b"x\nid=1";
        for c in [
            with(&[b"CLIENT", b"SETNAME", forged]),
            with(&[b"CLIENT", b"SETINFO", b"LIB-NAME", forged]),
            with(&[b"CLIENT", b"SETINFO", b"LIB-VER", b"1 2"]),
        ] {
            assert!(s
                .client(&c)
                .error_text()
                .ends_with(b"cannot contain spaces, newlines or special characters."));
        }
        let long = vec![b'n'; MAX_CLIENT_NAME + 1];
        assert!(s.client(&with(&[b"CLIENT", b"SETNAME", &long])).is_error());
        assert!(s
            .client(&with(&[b"CLIENT", b"SETINFO", b"LIB-NAME", &long]))
            .is_error());
        let fine = vec![b'n'; MAX_CLIENT_NAME];
        assert!(!s.client(&with(&[b"CLIENT", b"SETNAME", &fine])).is_error());
        assert!(!s
            .client(&with(&[b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py"]))
            .is_error());
    }

    #[test]
    fn the_users_policy_follows_the_user_and_reloads() {
        let users = [user("app", Some("pw")), user("ops", Some("pw2"))];
        let mut users_acl = users.to_vec();
        users_acl[1].acl = Some("+@all".into());
        let settings = |default: &str| {
            Arc::new(SessionSettings {
                users: users_acl.clone(),
                acl: Arc::new(
                    crate::config::AclSettings::build(&users_acl, default).expect("valid"),
                ),
                ..Default::default()
            })
        };
        let s1 = settings("-@all +get");
        let mut s = ClientState::new(1, addr(), addr(), &users);
        s.refresh_acl(&s1);
        assert!(s.acl.is_none(), "not authenticated");
        s.auth(&users, &[Bytes::from("app"), Bytes::from("pw")]);
        s.refresh_acl(&s1);
        assert_eq!(s.acl.as_ref().map(|p| p.text()), Some("-@all +get"));
        s.auth(&users, &[Bytes::from("ops"), Bytes::from("pw2")]);
        s.refresh_acl(&s1);
        assert!(s.acl.as_ref().is_some_and(|p| p.is_operator()));
        s.auth(&users, &[Bytes::from("app"), Bytes::from("pw")]);
        s.refresh_acl(&s1);
        // A reload: the new default applies at the next command.
        let s2 = settings("-@all +set");
        s.refresh_acl(&s2);
        assert_eq!(s.acl.as_ref().map(|p| p.text()), Some("-@all +set"));
        assert_eq!(attempted_user(&[Bytes::from("pw")]), "default");
        assert_eq!(
            attempted_user(&[Bytes::from("bob"), Bytes::from("pw")]),
            "bob"
        );
    }

    #[test]
    fn reply_skip_is_consumed_once() {
        let mut s = ClientState::new(1, addr(), addr(), &[]);
        assert!(!s.reply_silenced());
        s.skip_next = true;
        assert!(s.reply_silenced());
        assert!(!s.reply_silenced());
        s.reply_off = true;
        assert!(s.reply_silenced() && s.reply_silenced());
    }

    #[test]
    fn unsubscribe_when_not_subscribed() {
        let r = unsubscribed_reply("unsubscribe", &[], 2);
        assert_eq!(&r.raw[..], b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");
        let r = unsubscribed_reply("punsubscribe", &[Bytes::from("a"), Bytes::from("b")], 3);
        assert_eq!(
            &r.raw[..],
            b">3\r\n$12\r\npunsubscribe\r\n$1\r\na\r\n:0\r\n>3\r\n$12\r\npunsubscribe\r\n$1\r\nb\r\n:0\r\n"
        );
    }
}
