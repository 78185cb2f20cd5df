//! The unit tier of whole sessions: the proxy in process (an [`EndpointRuntime`] on a
//! standalone scripted peer, a listener, its accept loop) and a client speaking RESP over a
//! real socket, so every test goes through decode, dispatch, the router, the backend queue
//! and the ordered reply write.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::accounting::{PodRegistry, PolicySource};
use crate::attribution::NodeLocal;
use crate::backend::PoolKey;
use crate::config::{Backend, EndpointSpec, SessionSettings};
use crate::endpoint::{EndpointHandle, EndpointRuntime};
use crate::listener::{self, Listener, Shared};
use crate::metrics::ProxyMetrics;
use crate::resp::{encode_command, Limits, ReplyDecoder};
use crate::testing::{until, Peer, Script};

#[path = "tests_drain.rs"]
mod drain;

/// The proxy for one endpoint, in process.
struct Proxy {
    addr: SocketAddr,
    rt: Arc<EndpointRuntime>,
    _listener: Listener,
    /// The accept loop stops when this is dropped.
    _stop: watch::Sender<bool>,
    shared: Arc<Shared>,
}

fn start_proxy(backend: Backend) -> Proxy {
    let metrics = ProxyMetrics::default();
    let spec = EndpointSpec {
        name: "t".into(),
        backend,
    };
    let rt = EndpointRuntime::build(&spec, 0, &metrics);
    let shared = Arc::new(Shared::new(
        Arc::new(NodeLocal),
        Arc::new(metrics),
        Arc::new(PodRegistry::new(None, PolicySource::default())),
        SessionSettings::default(),
    ));
    let bound = listener::bind("t", "127.0.0.1:0".parse().expect("addr"), 0).expect("bind");
    let (stop, stop_rx) = watch::channel(false);
    let l = listener::spawn(
        bound,
        Arc::new(EndpointHandle::new(rt.clone())),
        shared.clone(),
        stop_rx,
    );
    Proxy {
        addr: l.local,
        rt,
        _listener: l,
        _stop: stop,
        shared,
    }
}

/// A RESP client: writes commands, reads whole reply frames.
struct Client {
    sock: TcpStream,
    buf: BytesMut,
    dec: ReplyDecoder,
}

impl Client {
    async fn connect(p: &Proxy) -> Client {
        Client {
            sock: TcpStream::connect(p.addr)
                .await
                .expect("connect to the proxy"),
            buf: BytesMut::new(),
            dec: ReplyDecoder::default(),
        }
    }

    /// Sends `cmds` in one write (a pipeline).
    async fn send(&mut self, cmds: &[&[&str]]) {
        let mut out = Vec::new();
        for c in cmds {
            let args: Vec<Bytes> = c
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect();
            out.extend_from_slice(&encode_command(&args));
        }
        self.send_raw(&out).await;
    }

    async fn send_raw(&mut self, raw: &[u8]) {
        self.sock.write_all(raw).await.expect("write to the proxy");
    }

    /// The next reply frame, as text.
    async fn reply(&mut self) -> String {
        loop {
            if let Some(r) = self
                .dec
                .decode(&mut self.buf, &Limits::backend())
                .expect("the proxy speaks RESP")
            {
                return String::from_utf8_lossy(&r.raw).into_owned();
            }
            let n = self
                .sock
                .read_buf(&mut self.buf)
                .await
                .expect("read from the proxy");
            assert!(
                n > 0,
                "the proxy closed the connection while a reply was due"
            );
        }
    }

    /// Asserts the proxy closes the connection with nothing more to say.
    async fn closed(&mut self) {
        let n = self
            .sock
            .read_buf(&mut self.buf)
            .await
            .expect("read from the proxy");
        assert_eq!(
            (n, &self.buf[..]),
            (0, &b""[..]),
            "expected the proxy to close the connection"
        );
    }
}

// Pipelined GETs are answered in order.
#[tokio::test]
async fn pipelined_gets_are_answered_in_order() {
    let mut script = Script::new();
    for i in 1..=5 {
        script = script.expect("GET", format!("$2\r\nv{i}\r\n").as_bytes());
    }
    let peer = Peer::start(script).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[
        &["GET", "k1"],
        &["GET", "k2"],
        &["GET", "k3"],
        &["GET", "k4"],
        &["GET", "k5"],
    ])
    .await;
    for i in 1..=5 {
        assert_eq!(c.reply().await, format!("$2\r\nv{i}\r\n"));
    }
    assert_eq!(
        peer.commands(),
        ["GET k1", "GET k2", "GET k3", "GET k4", "GET k5"]
    );
}

// CLIENT REPLY as on Redis: OFF silences every reply (forwarded commands still run) until ON,
// which answers +OK; SKIP drops only the next command's reply.
#[tokio::test]
async fn client_reply_off_skip_and_on_behave_like_redis() {
    let peer = Peer::start(
        Script::new()
            .expect("SET", b"+OK\r\n")
            .expect("GET", b"$1\r\n1\r\n")
            .expect("GET", b"$1\r\n2\r\n"),
    )
    .await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[
        &["CLIENT", "REPLY", "OFF"],
        &["SET", "a", "1"],
        &["PING"],
        &["CLIENT", "REPLY", "ON"],
        &["CLIENT", "REPLY", "SKIP"],
        &["GET", "a"],
        &["PING"],
        &["GET", "b"],
    ])
    .await;
    assert_eq!(c.reply().await, "+OK\r\n", "ON is the first reply");
    assert_eq!(c.reply().await, "+PONG\r\n", "GET a was skipped");
    assert_eq!(c.reply().await, "$1\r\n2\r\n");
    // Nothing else was queued behind them.
    c.send(&[&["PING", "end"]]).await;
    assert_eq!(c.reply().await, "$3\r\nend\r\n");
    assert_eq!(peer.commands(), ["SET a 1", "GET a", "GET b"]);
}

/// A standalone backend on `addr` with holding off (errors at once).
fn no_hold(addr: SocketAddr) -> Backend {
    Backend {
        failover_hold_ms: 0,
        ..Backend::standalone(addr)
    }
}

// Holding off, a refused backend: the client is told the backend is unavailable, with the
// connect error once, and that a retry is safe.
#[tokio::test]
async fn a_refused_backend_is_unavailable_and_the_error_says_it_once() {
    let addr = Peer::refused_addr().await;
    let proxy = start_proxy(no_hold(addr));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["GET", "k"]]).await;
    let r = c.reply().await;
    let prefix = format!("-ERR datamesh proxy: backend {addr} is unavailable: connect failed: ");
    assert!(r.starts_with(&prefix), "{r}");
    assert!(r.ends_with(" (safe to retry)\r\n"), "{r}");
    assert_eq!(r.matches("unavailable").count(), 1, "{r}");
    assert_eq!(r.matches("connect failed").count(), 1, "{r}");
    assert_eq!(r.matches("datamesh proxy").count(), 1, "{r}");
}

// SUBSCRIBE with a refused backend says the backend is unavailable, not that the proxy closed
// the connection.
#[tokio::test]
async fn subscribe_to_a_refused_backend_says_unavailable() {
    let addr = Peer::refused_addr().await;
    let proxy = start_proxy(no_hold(addr));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["SUBSCRIBE", "x"]]).await;
    let r = c.reply().await;
    assert!(
        r.starts_with(&format!(
            "-ERR datamesh proxy: backend {addr} is unavailable: connect failed: "
        )),
        "{r}"
    );
    assert!(!r.contains("closed by the proxy"), "{r}");
}

// A protocol error after valid commands: they are answered first, then the error, then the
// connection closes.
#[tokio::test]
async fn a_protocol_error_answers_the_commands_before_it_then_closes() {
    let peer = Peer::start(Script::new().expect("GET", b"$1\r\nv\r\n")).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send_raw(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$x\r\n")
        .await;
    assert_eq!(c.reply().await, "+PONG\r\n");
    assert_eq!(c.reply().await, "$1\r\nv\r\n");
    assert_eq!(
        c.reply().await,
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    c.closed().await;
}

// MULTI / SET / EXEC go out on one dedicated connection, in order.
#[tokio::test]
async fn a_transaction_goes_out_on_one_dedicated_connection_in_order() {
    let peer = Peer::start(
        Script::new()
            .expect("MULTI", b"+OK\r\n")
            .expect("SET", b"+QUEUED\r\n")
            .expect("EXEC", b"*1\r\n+OK\r\n"),
    )
    .await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["MULTI"], &["SET", "k", "v"], &["EXEC"]]).await;
    assert_eq!(c.reply().await, "+OK\r\n");
    assert_eq!(c.reply().await, "+QUEUED\r\n");
    assert_eq!(c.reply().await, "*1\r\n+OK\r\n");
    let i = peer.conn_of("MULTI").expect("MULTI reached the backend");
    assert_eq!(peer.conn_commands(i), ["MULTI", "SET k v", "EXEC"]);
    assert_eq!(peer.commands(), ["MULTI", "SET k v", "EXEC"]);
}

// A BLPOP goes out on a warm dedicated connection (opened before the client connected), so an
// LPUSH another client sends right after it reaches the backend after it, as on Redis.
#[tokio::test(start_paused = true)]
async fn a_blpop_on_a_warm_connection_reaches_the_backend_before_a_later_lpush() {
    let peer = Peer::start(
        Script::new()
            .expect("GET", b"$-1\r\n")
            .expect("BLPOP", b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n")
            .expect("LPUSH", b":1\r\n"),
    )
    .await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let pool = proxy.rt.group().pool(PoolKey {
        addr: peer.addr(),
        db: 0,
        proto: 2,
    });
    until("the warm dedicated connections", || {
        pool.idle_dedicated() == 2
    })
    .await;
    let warm = peer.connections();
    assert_eq!(warm, 2);

    let mut pusher = Client::connect(&proxy).await;
    // The pusher's shared connection is up before the race: neither command waits for a
    // connect.
    pusher.send(&[&["GET", "warmup"]]).await;
    assert_eq!(pusher.reply().await, "$-1\r\n");
    let mut popper = Client::connect(&proxy).await;
    popper.send(&[&["BLPOP", "q", "0"]]).await;
    pusher.send(&[&["LPUSH", "q", "x"]]).await;
    assert_eq!(popper.reply().await, "*2\r\n$1\r\nq\r\n$1\r\nx\r\n");
    assert_eq!(pusher.reply().await, ":1\r\n");

    assert_eq!(peer.commands(), ["GET warmup", "BLPOP q 0", "LPUSH q x"]);
    let blpop_conn = peer
        .conn_of("BLPOP q 0")
        .expect("BLPOP reached the backend");
    assert!(
        blpop_conn < warm,
        "BLPOP went out on connection #{blpop_conn}, not one of the {warm} warm ones"
    );
}

// UNSUBSCRIBE without channels while subscribed goes to the subscription connection, whose
// answer the client gets.
#[tokio::test]
async fn unsubscribe_without_arguments_goes_to_the_subscription_connection() {
    let peer = Peer::start(
        Script::new()
            .expect("SUBSCRIBE", b"*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n")
            .expect(
                "UNSUBSCRIBE",
                b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:0\r\n",
            ),
    )
    .await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["SUBSCRIBE", "x"]]).await;
    assert_eq!(
        c.reply().await,
        "*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n"
    );
    c.send(&[&["UNSUBSCRIBE"]]).await;
    assert_eq!(
        c.reply().await,
        "*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:0\r\n"
    );
    let sub = peer
        .conn_of("SUBSCRIBE x")
        .expect("SUBSCRIBE reached the backend");
    assert_eq!(peer.conn_commands(sub), ["SUBSCRIBE x", "UNSUBSCRIBE"]);
}

// A backend that is down when commands arrive and comes back (a restart): the commands are
// held, in order, and answered by the node once it is back; the client sees no error.
#[tokio::test]
async fn commands_for_a_down_backend_are_held_until_it_is_back() {
    let addr = Peer::refused_addr().await;
    let proxy = start_proxy(Backend::standalone(addr));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["SET", "a", "1"], &["GET", "a"], &["INCR", "n"]])
        .await;
    until_real(|| proxy.rt.router.holder.snapshot().depth == 3).await;
    // What an operator sees meanwhile: the node down with its cause, and the queue.
    let handle = Arc::new(EndpointHandle::new(proxy.rt.clone()));
    let view = crate::endpoint::backends_snapshot(&[handle]);
    let ep = &view[0];
    assert_eq!(ep["hold"]["depth"], 3, "{ep}");
    assert_eq!(ep["health"][0]["state"], "down", "{ep}");
    assert!(
        ep["health"][0]["cause"]
            .as_str()
            .is_some_and(|c| c.contains("refused")),
        "{ep}"
    );
    let peer = Peer::start_on(
        addr,
        Script::new()
            .expect("SET", b"+OK\r\n")
            .expect("GET", b"$1\r\n1\r\n")
            .expect("INCR", b":1\r\n"),
    )
    .await;
    assert_eq!(c.reply().await, "+OK\r\n");
    assert_eq!(c.reply().await, "$1\r\n1\r\n");
    assert_eq!(c.reply().await, ":1\r\n");
    assert_eq!(peer.commands(), ["SET a 1", "GET a", "INCR n"]);
    let m = &proxy.rt.group().metrics;
    assert!(m.held.get() >= 3, "held {}", m.held.get());
    assert_eq!(m.hold_expired.get(), 0);
}

// A client that closes its connection while its commands are held: they are never sent.
#[tokio::test]
async fn held_commands_of_a_client_that_left_are_never_sent() {
    let addr = Peer::refused_addr().await;
    let proxy = start_proxy(Backend::standalone(addr));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["INCR", "n"]]).await;
    until_real(|| proxy.rt.router.holder.snapshot().depth == 1).await;
    drop(c);
    let peer = Peer::start_on(addr, Script::new()).await;
    until_real(|| proxy.rt.router.holder.snapshot().depth == 0).await;
    // Give a wrongly sent command time to arrive.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(peer.commands().is_empty(), "{:?}", peer.commands());
    assert_eq!(proxy.rt.group().metrics.hold_gone.get(), 1);
}

/// Polls `cond` every 10 ms of real time for up to 10 s.
async fn until_real(mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not met within 10 s");
}

fn push3(kind: &str, ch: &str, n: &str) -> String {
    format!(
        "*3\r\n${}\r\n{kind}\r\n${}\r\n{ch}\r\n{n}\r\n",
        kind.len(),
        ch.len()
    )
}

// The subscription connection dies (the node closes it): the proxy takes a new one,
// subscribes again, swallows the confirmations the client had already, answers the PING whose
// reply was lost, and the client keeps getting messages on its connection.
#[tokio::test]
async fn subscriptions_survive_their_connection() {
    let confirms = format!(
        "{}{}",
        push3("subscribe", "a", ":1"),
        push3("subscribe", "b", ":2")
    );
    let peer = Peer::start(
        Script::new()
            .expect("SUBSCRIBE", confirms.as_bytes())
            .close_on("PING")
            .reply_then(
                "SUBSCRIBE",
                confirms.as_bytes(),
                std::time::Duration::from_millis(50),
                push3("message", "a", "$2\r\nhi").as_bytes(),
            ),
    )
    .await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["SUBSCRIBE", "a", "b"]]).await;
    assert_eq!(c.reply().await, push3("subscribe", "a", ":1"));
    assert_eq!(c.reply().await, push3("subscribe", "b", ":2"));
    c.send(&[&["PING"]]).await;
    assert_eq!(c.reply().await, "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    assert_eq!(c.reply().await, push3("message", "a", "$2\r\nhi"));
    assert_eq!(peer.commands(), ["SUBSCRIBE a b", "PING", "SUBSCRIBE a b"]);
    assert_eq!(proxy.rt.group().metrics.resubscribes.get(), 1);
}

// The connection of a transaction dies after a queued command: the command is answered as
// discarded (it had not run) and EXEC is refused with EXECABORT without being sent.
#[tokio::test]
async fn a_transaction_whose_connection_died_is_aborted_and_exec_never_sent() {
    let peer = Peer::start(Script::new().expect("MULTI", b"+OK\r\n").close_on("SET")).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["MULTI"], &["SET", "a", "1"]]).await;
    assert_eq!(c.reply().await, "+OK\r\n");
    let r = c.reply().await;
    assert!(
        r.contains("the transaction was discarded (it had not run)"),
        "{r}"
    );
    c.send(&[&["EXEC"]]).await;
    let r = c.reply().await;
    assert!(
        r.starts_with("-EXECABORT Transaction discarded: its backend connection was lost"),
        "{r}"
    );
    c.send(&[&["PING"]]).await;
    assert_eq!(c.reply().await, "+PONG\r\n");
    assert_eq!(peer.commands(), ["MULTI", "SET a 1"]);
}

/// The `id=` of every line of a CLIENT LIST/INFO reply frame.
fn ids_of(list: &str) -> Vec<u64> {
    list.lines()
        .filter_map(|l| {
            let at = l.find("id=")?;
            l[at + 3..].split(' ').next()?.parse().ok()
        })
        .collect()
}

// CLIENT LIST shows the proxy's own connections; CLIENT KILL closes another one without a
// last line (new form: a count; old form: +OK / No such client); a client may kill itself:
// its reply comes first, then the close.
#[tokio::test]
async fn client_list_and_kill_act_on_the_proxys_own_connections() {
    let peer = Peer::start(Script::new()).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut a = Client::connect(&proxy).await;
    let mut b = Client::connect(&proxy).await;
    let mut c = Client::connect(&proxy).await;
    a.send(&[&["CLIENT", "ID"], &["CLIENT", "SETNAME", "alpha"]])
        .await;
    let a_id: u64 = a.reply().await[1..].trim().parse().expect("an id");
    assert_eq!(a.reply().await, "+OK\r\n");
    b.send(&[&["CLIENT", "ID"], &["HELLO", "3"]]).await;
    let b_id: u64 = b.reply().await[1..].trim().parse().expect("an id");
    b.reply().await;
    c.send(&[&["CLIENT", "ID"]]).await;
    let c_id: u64 = c.reply().await[1..].trim().parse().expect("an id");

    c.send(&[&["CLIENT", "LIST"]]).await;
    let list = c.reply().await;
    assert_eq!(ids_of(&list), [a_id, b_id, c_id], "{list}");
    assert!(list.contains(&format!("id={a_id} ")) && list.contains(" name=alpha "));
    assert!(list.contains(&format!("id={c_id} ")) && list.contains(" cmd=client|list "));
    assert!(list.contains(" resp=3 "), "b's HELLO 3 is seen: {list}");
    // RESP3: a verbatim string, like Redis.
    b.send(&[&["CLIENT", "LIST", "ID", &a_id.to_string()]])
        .await;
    let one = b.reply().await;
    assert!(one.starts_with('=') && one.contains("\r\ntxt:id="), "{one}");
    assert_eq!(ids_of(&one), [a_id]);

    // New form: a count; the killed client is closed with nothing written.
    c.send(&[&["CLIENT", "KILL", "ID", &a_id.to_string()]])
        .await;
    assert_eq!(c.reply().await, ":1\r\n");
    a.closed().await;
    c.send(&[&["CLIENT", "KILL", "ID", &a_id.to_string()]])
        .await;
    assert_eq!(c.reply().await, ":0\r\n");
    // Old form.
    c.send(&[&["CLIENT", "KILL", "10.9.9.9:1"]]).await;
    assert_eq!(c.reply().await, "-ERR No such client\r\n");
    c.send(&[&["CLIENT", "KILL", "ID", "x"]]).await;
    assert_eq!(
        c.reply().await,
        "-ERR client-id should be greater than 0\r\n"
    );
    // Self: SKIPME yes by default, and the reply comes before the close.
    c.send(&[&["CLIENT", "KILL", "ID", &c_id.to_string()]])
        .await;
    assert_eq!(c.reply().await, ":0\r\n");
    c.send(&[
        &["CLIENT", "KILL", "ID", &c_id.to_string(), "SKIPME", "no"],
        &["PING"],
    ])
    .await;
    assert_eq!(c.reply().await, ":1\r\n");
    c.closed().await;
    // Who is left: b alone.
    b.send(&[&["CLIENT", "LIST"]]).await;
    let left = b.reply().await;
    assert_eq!(ids_of(&left), [b_id], "{left}");
    // Still refused: what acts on the shared backend.
    b.send(&[&["CLIENT", "PAUSE", "10"]]).await;
    assert!(b
        .reply()
        .await
        .starts_with("-ERR CLIENT PAUSE is not supported"));
}

// ACL WHOAMI/USERS/CAT/LOG from the proxy's users and log; a failed AUTH is logged.
#[tokio::test]
async fn acl_subcommands_answer_from_the_proxy() {
    let peer = Peer::start(Script::new()).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[
        &["ACL", "WHOAMI"],
        &["ACL", "USERS"],
        &["ACL", "CAT"],
        &["ACL", "CAT", "nosuch"],
        &["AUTH", "mallory", "guess"],
        &["ACL", "LOG", "1"],
        &["ACL", "LIST"],
        &["ACL", "NOPE"],
        &["ACL", "LOG", "RESET"],
        &["ACL", "LOG"],
    ])
    .await;
    assert_eq!(c.reply().await, "$7\r\ndefault\r\n");
    assert_eq!(c.reply().await, "*1\r\n$7\r\ndefault\r\n");
    assert!(c.reply().await.starts_with("*21\r\n$8\r\nkeyspace\r\n"));
    assert_eq!(c.reply().await, "-ERR Unknown category 'nosuch'\r\n");
    assert!(c.reply().await.starts_with("-WRONGPASS"));
    let log = c.reply().await;
    assert!(
        log.starts_with("*1\r\n*20\r\n$5\r\ncount\r\n:1\r\n$6\r\nreason\r\n$4\r\nauth\r\n")
            && log.contains("$6\r\nobject\r\n$4\r\nAUTH\r\n$8\r\nusername\r\n$7\r\nmallory\r\n")
            && log.contains(" cmd=auth "),
        "{log}"
    );
    assert!(c
        .reply()
        .await
        .starts_with("-ERR ACL is not supported by the datamesh proxy"));
    assert_eq!(
        c.reply().await,
        "-ERR unknown subcommand 'NOPE'. Try ACL HELP.\r\n"
    );
    assert_eq!(c.reply().await, "+OK\r\n");
    assert_eq!(c.reply().await, "*0\r\n");
}

// A subscribed client: others see it as `flags=P sub=1` (TYPE pubsub), and in RESP2 its own
// CLIENT command gets Redis's "only (P|S)SUBSCRIBE ..." error from the proxy: it never reaches
// the subscription connection (whose backend would answer about itself).
#[tokio::test]
async fn a_subscribed_client_is_listed_as_pubsub_and_its_client_commands_stay_local() {
    let peer = Peer::start(
        Script::new().expect("SUBSCRIBE", b"*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n"),
    )
    .await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut s = Client::connect(&proxy).await;
    let mut o = Client::connect(&proxy).await;
    s.send(&[&["SUBSCRIBE", "x"]]).await;
    s.reply().await;
    s.send(&[&["CLIENT", "LIST"]]).await;
    assert_eq!(
        s.reply().await,
        "-ERR Can't execute 'client|list': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );
    o.send(&[&["CLIENT", "LIST", "TYPE", "pubsub"]]).await;
    let list = o.reply().await;
    assert_eq!(ids_of(&list).len(), 1, "{list}");
    assert!(
        list.contains(" flags=P ") && list.contains(" sub=1 psub=0 "),
        "{list}"
    );
    o.send(&[&["CLIENT", "KILL", "TYPE", "pubsub"]]).await;
    assert_eq!(o.reply().await, ":1\r\n");
    s.closed().await;
    let sub = peer
        .conn_of("SUBSCRIBE x")
        .expect("SUBSCRIBE reached the backend");
    assert_eq!(peer.conn_commands(sub), ["SUBSCRIBE x"]);
}
