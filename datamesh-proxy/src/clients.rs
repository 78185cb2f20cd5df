//! The proxy's own client connections as `CLIENT LIST`, `CLIENT INFO` and `CLIENT KILL` see
//! them. The registry is the memory budget's (`budget.rs`: every live session has a
//! [`crate::budget::ClientMem`] there, which the shedder closes); each entry carries a
//! [`ClientInfo`]: the fixed facts of the connection (id, addresses, endpoint, pod through the
//! `ClientMem`, when it opened) and a small [`ClientView`] the session republishes only when it
//! changes (AUTH, HELLO, SELECT, CLIENT SETNAME/SETINFO, RESET; entering or leaving MULTI or
//! pub/sub). The last command and the last activity are two relaxed stores per dispatch round,
//! never a lock; a blocked client is seen through the session's own blocking counter.
//!
//! Scope ([`Viewer`]): a client sees, and may kill, the connections of its endpoint that come
//! from its own pod, or that are authenticated as the same configured proxy user when it is
//! one itself (the implicit `default` of a proxy without users does not count); an operator
//! (user and pod policies allow every `@admin` command) sees and kills every connection of
//! the proxy. What a client cannot see does not exist for it: `CLIENT KILL` of it answers
//! `No such client` / 0, exactly like an address nobody has.
//!
//! Lines are in Redis 7's `CLIENT LIST` format (fields the proxy has no notion of, like `fd`
//! or the query buffer of other clients, read `-1`/0); `CLIENT LIST`/`INFO` are verbatim
//! strings in RESP3 like Redis's.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use crate::commands::acl::catalog;
use crate::resp::{Reply, ReplyKind};

/// What a client is now, as others see it (republished by its session on change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientView {
    /// CLIENT SETNAME / SETINFO (boxed: most clients set none, and every connection carries
    /// a view).
    pub names: Option<Box<Names>>,
    /// None until authenticated.
    pub user: Option<String>,
    pub db: u32,
    pub resp: u8,
    pub flags: Flags,
}

/// What a client named itself (`name`, `lib-name`, `lib-ver`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    pub name: Option<Bytes>,
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
}

impl Names {
    /// None when the client set none of them.
    pub fn boxed(names: Names) -> Option<Box<Names>> {
        (names != Names::default()).then(|| Box::new(names))
    }
}

/// The state flags others see: pub/sub (`P`) and MULTI (`x`), with the subscription counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub pubsub: bool,
    pub multi: bool,
    pub sub: u32,
    pub psub: u32,
    pub ssub: u32,
}

/// One connection's entry in the registry (see the module docs).
#[derive(Debug)]
pub struct ClientInfo {
    /// The client id (CLIENT ID).
    pub id: u64,
    /// Its pod's netns cookie ([`crate::accounting::PodStats::cookie`]).
    pub pod: u64,
    /// Which endpoint (an opaque key: the address of its handle, which every session of the
    /// endpoint holds, so no two live endpoints share it).
    pub endpoint: usize,
    pub peer: SocketAddr,
    /// The address the client dialled (CLIENT LIST's `laddr`).
    pub laddr: SocketAddr,
    pub created: Instant,
    view: Mutex<ClientView>,
    /// The ACL catalog slot + 1 of the last command (0: none yet).
    last_cmd: AtomicU32,
    /// When the last command arrived, in ms after `created`.
    last_active_ms: AtomicU64,
    /// Blocking commands in flight (the session's own counter).
    blocking: Arc<AtomicUsize>,
}

impl ClientInfo {
    pub fn new(
        (id, pod): (u64, u64),
        endpoint: usize,
        peer: SocketAddr,
        laddr: SocketAddr,
        blocking: Arc<AtomicUsize>,
        view: ClientView,
    ) -> Self {
        Self {
            id,
            pod,
            endpoint,
            peer,
            laddr,
            created: Instant::now(),
            view: Mutex::new(view),
            last_cmd: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(0),
            blocking,
        }
    }

    pub fn view(&self) -> ClientView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the view if it differs (called by the session after the local commands that
    /// may change it, never per command).
    pub fn publish(&self, view: ClientView) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if *v != view {
            *v = view;
        }
    }

    /// Changes only the flags.
    pub fn publish_flags(&self, flags: Flags) {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).flags = flags;
    }

    /// The last command (its catalog slot, if the table knows it) and when it arrived: two
    /// relaxed stores, once per dispatch round.
    pub fn touch(&self, slot: Option<u16>, at: Instant) {
        if let Some(s) = slot {
            self.last_cmd.store(u32::from(s) + 1, Ordering::Relaxed);
        }
        let ms = at.saturating_duration_since(self.created).as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    /// The last command's name (`get`, `client|list`), `NULL` before the first like Redis.
    pub fn last_cmd(&self) -> &'static str {
        match self.last_cmd.load(Ordering::Relaxed) {
            0 => "NULL",
            s => catalog().name((s - 1) as u16),
        }
    }

    /// Seconds since the last command (or since the connection opened).
    pub fn idle_secs(&self, now: Instant) -> u64 {
        let age = now.saturating_duration_since(self.created).as_millis() as u64;
        age.saturating_sub(self.last_active_ms.load(Ordering::Relaxed)) / 1000
    }

    pub fn blocked(&self) -> bool {
        self.blocking.load(Ordering::Relaxed) > 0
    }

    /// Redis's client type of this connection (the proxy has no master or replica clients).
    pub fn client_type(&self, view: &ClientView) -> ClientType {
        if view.flags.pubsub {
            ClientType::PubSub
        } else {
            ClientType::Normal
        }
    }
}

/// Redis's client types (`CLIENT LIST TYPE`, `CLIENT KILL TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientType {
    Normal,
    Replica,
    Master,
    PubSub,
}

impl ClientType {
    /// Redis's names (`slave` and `replica` are the same type); the error Redis gives
    /// otherwise.
    pub fn parse(name: &[u8]) -> Result<Self, Reply> {
        let n = name.to_ascii_lowercase();
        Ok(match &n[..] {
            b"normal" => Self::Normal,
            b"slave" | b"replica" => Self::Replica,
            b"master" => Self::Master,
            b"pubsub" => Self::PubSub,
            _ => {
                return Err(Reply::error(&format!(
                    "ERR Unknown client type '{}'",
                    String::from_utf8_lossy(name)
                )))
            }
        })
    }
}

/// Who is looking (see the module docs for the scope).
#[derive(Debug, Clone, Copy)]
pub struct Viewer<'a> {
    pub id: u64,
    /// [`ClientInfo::endpoint`] of the caller.
    pub endpoint: usize,
    pub pod: u64,
    /// The caller's user when it is a configured proxy user.
    pub named_user: Option<&'a str>,
    pub operator: bool,
}

impl Viewer<'_> {
    /// Whether this viewer sees (and may kill) the client.
    pub fn sees(&self, info: &ClientInfo, view: &ClientView) -> bool {
        if self.operator || info.id == self.id {
            return true;
        }
        if info.endpoint != self.endpoint {
            return false;
        }
        info.pod == self.pod
            || self
                .named_user
                .is_some_and(|u| view.user.as_deref() == Some(u))
    }
}

/// One line's values (the caller's own line overrides what the registry cannot know).
pub struct Line<'a> {
    pub id: u64,
    pub peer: SocketAddr,
    pub laddr: SocketAddr,
    pub age: u64,
    pub idle: u64,
    pub view: &'a ClientView,
    pub blocked: bool,
    pub qbuf: (usize, usize),
    pub omem: u64,
    pub tot_mem: u64,
    pub cmd: &'a str,
}

impl Line<'_> {
    /// The line in Redis 7's `CLIENT LIST` format, with its newline.
    pub fn render(&self, out: &mut String) {
        let v = self.view;
        let none = Names::default();
        let names = v.names.as_deref().unwrap_or(&none);
        let s = |b: &Option<Bytes>| {
            b.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let mut flags = String::new();
        if v.flags.pubsub {
            flags.push('P');
        }
        if v.flags.multi {
            flags.push('x');
        }
        if self.blocked {
            flags.push('b');
        }
        if flags.is_empty() {
            flags.push('N');
        }
        let multi = if v.flags.multi { 0 } else { -1 };
        let _ = writeln!(
            out,
            "id={} addr={} laddr={} fd=-1 name={} age={} idle={} flags={} db={} sub={} psub={} ssub={} multi={} watch=0 qbuf={} qbuf-free=0 argv-mem=0 multi-mem=0 rbs={} rbp=0 obl=0 oll=0 omem={} tot-mem={} events=r cmd={} user={} redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.peer,
            self.laddr,
            s(&names.name),
            self.age,
            self.idle,
            flags,
            v.db,
            v.flags.sub,
            v.flags.psub,
            v.flags.ssub,
            multi,
            self.qbuf.0,
            self.qbuf.1,
            self.omem,
            self.tot_mem,
            self.cmd,
            v.user.as_deref().unwrap_or("default"),
            v.resp,
            s(&names.lib_name),
            s(&names.lib_ver),
        );
    }
}

/// Another client's line, from the registry; `(omem, tot_mem)` from its memory counters.
pub fn line_of(
    info: &ClientInfo,
    view: &ClientView,
    (omem, tot_mem): (u64, u64),
    now: Instant,
) -> String {
    let mut out = String::new();
    Line {
        id: info.id,
        peer: info.peer,
        laddr: info.laddr,
        age: now.saturating_duration_since(info.created).as_secs(),
        idle: info.idle_secs(now),
        view,
        blocked: info.blocked(),
        qbuf: (0, 0),
        omem,
        tot_mem,
        cmd: info.last_cmd(),
    }
    .render(&mut out);
    out
}

/// `CLIENT LIST [TYPE t | ID id ...]`, parsed like Redis 7.0.
#[derive(Debug, PartialEq, Eq)]
pub enum ListFilter {
    All,
    Type(ClientType),
    Ids(Vec<u64>),
}

impl ListFilter {
    /// `args` from `CLIENT LIST` on (index 2 is the first option).
    pub fn parse(args: &[Bytes]) -> Result<Self, Reply> {
        let opts = args.get(2..).unwrap_or_default();
        match opts {
            [] => Ok(Self::All),
            [t, v] if t.eq_ignore_ascii_case(b"TYPE") => ClientType::parse(v).map(Self::Type),
            [t, ids @ ..] if t.eq_ignore_ascii_case(b"ID") && !ids.is_empty() => ids
                .iter()
                .map(|i| {
                    // A negative id is no client's (ids start at 1), not an error.
                    parse_i64(i)
                        .map(|n| u64::try_from(n).unwrap_or(0))
                        .ok_or_else(|| Reply::error("ERR Invalid client ID"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Ids),
            _ => Err(Reply::error("ERR syntax error")),
        }
    }
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// `CLIENT KILL`, parsed like Redis (the old form `CLIENT KILL addr`, or filters).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KillFilter {
    /// `CLIENT KILL addr`: `+OK` / `-ERR No such client`, and the caller may kill itself.
    pub old_form: bool,
    pub id: Option<u64>,
    pub addr: Option<String>,
    pub laddr: Option<String>,
    pub user: Option<String>,
    pub client_type: Option<ClientType>,
    /// Only clients older than this many seconds (Redis 7.4's MAXAGE).
    pub max_age: Option<u64>,
    pub skip_me: bool,
}

impl KillFilter {
    /// `args` from `CLIENT KILL` on; the errors are Redis's.
    pub fn parse(args: &[Bytes]) -> Result<Self, Reply> {
        let syntax = || Reply::error("ERR syntax error");
        let opts = args.get(2..).unwrap_or_default();
        if let [addr] = opts {
            return Ok(Self {
                old_form: true,
                addr: Some(String::from_utf8_lossy(addr).into_owned()),
                skip_me: false,
                ..Self::default()
            });
        }
        if opts.is_empty() {
            return Err(syntax());
        }
        let mut f = Self {
            skip_me: true,
            ..Self::default()
        };
        for pair in opts.chunks(2) {
            let [k, v] = pair else {
                return Err(syntax());
            };
            let text = || String::from_utf8_lossy(v).into_owned();
            let k = k.to_ascii_lowercase();
            match &k[..] {
                b"id" => {
                    let id = parse_i64(v)
                        .filter(|n| *n > 0)
                        .ok_or_else(|| Reply::error("ERR client-id should be greater than 0"))?;
                    f.id = Some(id as u64);
                }
                b"type" => f.client_type = Some(ClientType::parse(v)?),
                b"addr" => f.addr = Some(text()),
                b"laddr" => f.laddr = Some(text()),
                b"user" => f.user = Some(text()),
                b"skipme" => {
                    f.skip_me = if v.eq_ignore_ascii_case(b"yes") {
                        true
                    } else if v.eq_ignore_ascii_case(b"no") {
                        false
                    } else {
                        return Err(syntax());
                    }
                }
                b"maxage" => {
                    let age = parse_i64(v).filter(|n| *n > 0).ok_or_else(|| {
                        Reply::error("ERR value is not an integer or out of range")
                    })?;
                    f.max_age = Some(age as u64);
                }
                _ => return Err(syntax()),
            }
        }
        Ok(f)
    }

    /// Whether the client matches (scope is checked by the caller).
    pub fn matches(&self, me: u64, info: &ClientInfo, view: &ClientView, now: Instant) -> bool {
        if self.skip_me && info.id == me {
            return false;
        }
        if self.id.is_some_and(|id| id != info.id) {
            return false;
        }
        if self
            .addr
            .as_ref()
            .is_some_and(|a| *a != info.peer.to_string())
        {
            return false;
        }
        if self
            .laddr
            .as_ref()
            .is_some_and(|a| *a != info.laddr.to_string())
        {
            return false;
        }
        if self
            .user
            .as_ref()
            .is_some_and(|u| view.user.as_deref().unwrap_or("default") != u)
        {
            return false;
        }
        if self
            .client_type
            .is_some_and(|t| t != info.client_type(view))
        {
            return false;
        }
        if self.max_age.is_some_and(|max| {
            now.saturating_duration_since(info.created).as_millis() as u64 <= max * 1000
        }) {
            return false;
        }
        true
    }
}

/// Text as Redis answers CLIENT LIST/INFO: a bulk string in RESP2, a verbatim string
/// (`=<len>\r\ntxt:...`) in RESP3.
pub fn verbatim(text: &str, proto: u8) -> Reply {
    if proto < 3 {
        return Reply::bulk(text.as_bytes());
    }
    let mut out = BytesMut::with_capacity(text.len() + 16);
    out.put_slice(format!("={}\r\ntxt:", text.len() + 4).as_bytes());
    out.put_slice(text.as_bytes());
    out.put_slice(b"\r\n");
    Reply {
        raw: out.freeze(),
        kind: ReplyKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn err(r: Reply) -> String {
        String::from_utf8_lossy(r.error_text()).into_owned()
    }

    #[test]
    fn list_options_parse_like_redis() {
        assert_eq!(ListFilter::parse(&args("CLIENT LIST")), Ok(ListFilter::All));
        assert_eq!(
            ListFilter::parse(&args("client list type PubSub")),
            Ok(ListFilter::Type(ClientType::PubSub))
        );
        assert_eq!(
            ListFilter::parse(&args("CLIENT LIST ID 3 4")),
            Ok(ListFilter::Ids(vec![3, 4]))
        );
        assert_eq!(
            ListFilter::parse(&args("CLIENT LIST ID -1")),
            Ok(ListFilter::Ids(vec![0]))
        );
        let e = |s| err(ListFilter::parse(&args(s)).expect_err("refused"));
        assert_eq!(e("CLIENT LIST TYPE foo"), "ERR Unknown client type 'foo'");
        assert_eq!(e("CLIENT LIST ID x"), "ERR Invalid client ID");
        assert_eq!(e("CLIENT LIST ID"), "ERR syntax error");
        assert_eq!(e("CLIENT LIST foo"), "ERR syntax error");
    }

    #[test]
    fn kill_options_parse_like_redis() {
        let f = KillFilter::parse(&args("CLIENT KILL 1.2.3.4:5")).expect("old form");
        assert!(f.old_form && !f.skip_me);
        assert_eq!(f.addr.as_deref(), Some("1.2.3.4:5"));
        let f = KillFilter::parse(&args("CLIENT KILL ID 7 SKIPME no USER app MAXAGE 3"))
            .expect("new form");
        assert_eq!(
            (f.id, f.skip_me, f.user.as_deref(), f.max_age),
            (Some(7), false, Some("app"), Some(3))
        );
        assert!(
            KillFilter::parse(&args("CLIENT KILL LADDR 1.1.1.1:1"))
                .expect("laddr")
                .skip_me
        );
        let e = |s| err(KillFilter::parse(&args(s)).expect_err("refused"));
        assert_eq!(
            e("CLIENT KILL ID x"),
            "ERR client-id should be greater than 0"
        );
        assert_eq!(
            e("CLIENT KILL ID 0"),
            "ERR client-id should be greater than 0"
        );
        assert_eq!(e("CLIENT KILL TYPE foo"), "ERR Unknown client type 'foo'");
        assert_eq!(e("CLIENT KILL SKIPME maybe"), "ERR syntax error");
        assert_eq!(e("CLIENT KILL FOO bar"), "ERR syntax error");
        assert_eq!(e("CLIENT KILL ID 1 ADDR"), "ERR syntax error");
    }

    fn client(id: u64, pod: u64, user: Option<&str>) -> ClientInfo {
        ClientInfo::new(
            (id, pod),
            1,
            format!("10.0.0.{id}:1000").parse().expect("addr"),
            "10.96.0.10:6379".parse().expect("addr"),
            Arc::default(),
            ClientView {
                user: user.map(str::to_string),
                resp: 2,
                ..ClientView::default()
            },
        )
    }

    #[test]
    fn scope_and_matching() {
        let mine = client(1, 10, Some("app"));
        let same_pod = client(2, 10, Some("other"));
        let same_user = client(3, 20, Some("app"));
        let stranger = client(4, 20, Some("other"));
        let tenant = Viewer {
            id: 1,
            endpoint: 1,
            pod: 10,
            named_user: Some("app"),
            operator: false,
        };
        let seen = |v: &Viewer, info: &ClientInfo| v.sees(info, &info.view());
        assert!(seen(&tenant, &mine) && seen(&tenant, &same_pod) && seen(&tenant, &same_user));
        assert!(!seen(&tenant, &stranger));
        let unnamed = Viewer {
            named_user: None,
            ..tenant
        };
        assert!(!seen(&unnamed, &same_user));
        let other_endpoint = Viewer {
            endpoint: 2,
            ..tenant
        };
        assert!(!seen(&other_endpoint, &same_pod) && seen(&other_endpoint, &mine));
        let operator = Viewer {
            operator: true,
            ..other_endpoint
        };
        assert!(seen(&operator, &stranger));

        let now = Instant::now();
        let m = |f: &KillFilter, info: &ClientInfo| f.matches(1, info, &info.view(), now);
        let by_addr = KillFilter::parse(&args("CLIENT KILL 10.0.0.2:1000")).expect("parse");
        assert!(m(&by_addr, &same_pod) && !m(&by_addr, &mine));
        let me = KillFilter::parse(&args("CLIENT KILL ID 1")).expect("parse");
        assert!(!m(&me, &mine), "SKIPME yes is the default");
        let me = KillFilter::parse(&args("CLIENT KILL ID 1 SKIPME no")).expect("parse");
        assert!(m(&me, &mine));
        let users = KillFilter::parse(&args("CLIENT KILL USER app")).expect("parse");
        assert!(m(&users, &same_user) && !m(&users, &stranger));
        let pubsub = KillFilter::parse(&args("CLIENT KILL TYPE pubsub")).expect("parse");
        assert!(!m(&pubsub, &same_pod));
        same_pod.publish_flags(Flags {
            pubsub: true,
            sub: 1,
            ..Flags::default()
        });
        assert!(m(&pubsub, &same_pod));
        let old = KillFilter::parse(&args("CLIENT KILL MAXAGE 1")).expect("parse");
        assert!(!m(&old, &same_pod), "not a second old yet");
        let laddr = KillFilter::parse(&args("CLIENT KILL LADDR 10.96.0.10:6379")).expect("parse");
        assert!(m(&laddr, &stranger));
    }

    #[test]
    fn lines_look_like_redis() {
        let info = &client(5, 1, Some("app"));
        info.publish(ClientView {
            names: Names::boxed(Names {
                name: Some(Bytes::from("worker")),
                lib_name: Some(Bytes::from("redis-py")),
                lib_ver: None,
            }),
            user: Some("app".into()),
            db: 2,
            resp: 3,
            flags: Flags {
                multi: true,
                ..Flags::default()
            },
        });
        let slot = catalog()
            .slot_of(None, &crate::resp::Command::from_args(args("CLIENT LIST")))
            .expect("known");
        info.touch(Some(slot), info.created);
        let line = line_of(info, &info.view(), (0, 0), Instant::now());
        assert!(line.starts_with("id=5 addr=10.0.0.5:1000 laddr=10.96.0.10:6379 fd=-1 name=worker age=0 idle=0 flags=x db=2 sub=0 psub=0 ssub=0 multi=0 "), "{line}");
        assert!(
            line.ends_with(
                " cmd=client|list user=app redir=-1 resp=3 lib-name=redis-py lib-ver=\n"
            ),
            "{line}"
        );
        let v = verbatim("id=1\n", 3);
        assert_eq!(&v.raw[..], b"=9\r\ntxt:id=1\n\r\n");
        assert_eq!(&verbatim("", 2).raw[..], b"$0\r\n\r\n");
    }
}
