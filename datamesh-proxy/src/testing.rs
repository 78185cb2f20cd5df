//! The unit tier's scripted RESP peer: an in-process server on 127.0.0.1:0 that answers each
//! command with the next step of a [`Script`] (a reply, a reply split across writes, a slow
//! reply, a close mid-reply, silence), so the backend queue, the router and sessions can be
//! tested against every way a node misbehaves, with tokio's paused time where timing matters.
//! Handshake commands (CLIENT SETNAME, HELLO, SELECT, READONLY, AUTH) are answered on their
//! own unless the script expects them next. Every command received is recorded, also per
//! connection ([`Peer::conn_commands`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use crate::request::{Order, ReplayClass, Request};
use crate::resp::{encode_command, Command, CommandDecoder, Limits};

/// What the peer does with one command.
#[derive(Debug, Clone)]
pub enum Action {
    Reply(Vec<u8>),
    /// The reply in two writes, split after `at` bytes.
    ReplySplit(Vec<u8>, usize),
    /// The reply after a delay (later commands of the connection wait too, as on Redis).
    Slow(Duration, Vec<u8>),
    /// Close the connection without a reply.
    Close,
    /// Write these bytes (part of a reply) and close.
    CloseMid(Vec<u8>),
    /// Never answer (a hung node); the connection stays open.
    Hang,
    /// The reply, then after a delay these bytes unasked (a desync), and serve on.
    ReplyThen(Vec<u8>, Duration, Vec<u8>),
}

/// What unscripted commands get once the script is used up.
#[derive(Debug, Clone, Copy)]
pub enum Fallback {
    /// `-ERR script: unexpected <command>`.
    Error,
    /// `+R<n>`, n counting every such command of the peer from 1 (order checks).
    Counter,
    /// `+OK`.
    Ok,
}

struct Step {
    name: String,
    action: Action,
}

/// The steps of a peer, shared by all its connections in arrival order.
pub struct Script {
    steps: VecDeque<Step>,
    fallback: Fallback,
    counter: u64,
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl Script {
    pub fn new() -> Self {
        Self {
            steps: VecDeque::new(),
            fallback: Fallback::Error,
            counter: 0,
        }
    }

    fn step(mut self, name: &str, action: Action) -> Self {
        self.steps.push_back(Step {
            name: name.to_ascii_uppercase(),
            action,
        });
        self
    }

    /// The next command must be `name` (case-insensitive); answer `reply`.
    pub fn expect(self, name: &str, reply: &[u8]) -> Self {
        self.step(name, Action::Reply(reply.to_vec()))
    }

    pub fn expect_split(self, name: &str, reply: &[u8], at: usize) -> Self {
        self.step(name, Action::ReplySplit(reply.to_vec(), at))
    }

    pub fn slow(self, name: &str, delay: Duration, reply: &[u8]) -> Self {
        self.step(name, Action::Slow(delay, reply.to_vec()))
    }

    pub fn close_on(self, name: &str) -> Self {
        self.step(name, Action::Close)
    }

    pub fn close_mid(self, name: &str, partial: &[u8]) -> Self {
        self.step(name, Action::CloseMid(partial.to_vec()))
    }

    pub fn hang_on(self, name: &str) -> Self {
        self.step(name, Action::Hang)
    }

    /// Answer `reply`, then write `extra` unasked after `delay` (on the same connection).
    pub fn reply_then(self, name: &str, reply: &[u8], delay: Duration, extra: &[u8]) -> Self {
        self.step(
            name,
            Action::ReplyThen(reply.to_vec(), delay, extra.to_vec()),
        )
    }

    pub fn otherwise(mut self, f: Fallback) -> Self {
        self.fallback = f;
        self
    }

    /// The action for `cmd` and whether it was scripted.
    fn next(&mut self, cmd: &Command) -> Action {
        let name = String::from_utf8_lossy(cmd.name()).to_ascii_uppercase();
        if self.steps.front().is_some_and(|s| s.name == name) {
            if let Some(s) = self.steps.pop_front() {
                return s.action;
            }
        }
        match name.as_str() {
            "CLIENT" | "SELECT" | "READONLY" | "AUTH" => return Action::Reply(b"+OK\r\n".to_vec()),
            "HELLO" if cmd.arg_is(1, "3") => {
                return Action::Reply(
                    b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.99\r\n"
                        .to_vec(),
                )
            }
            "HELLO" => {
                return Action::Reply(
                    b"*4\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.99\r\n"
                        .to_vec(),
                )
            }
            _ => {}
        }
        match self.fallback {
            Fallback::Error => match self.steps.front() {
                Some(s) => Action::Reply(
                    format!("-ERR script: expected {}, got {name}\r\n", s.name).into_bytes(),
                ),
                None => Action::Reply(format!("-ERR script: unexpected {name}\r\n").into_bytes()),
            },
            Fallback::Counter => {
                self.counter += 1;
                Action::Reply(format!("+R{}\r\n", self.counter).into_bytes())
            }
            Fallback::Ok => Action::Reply(b"+OK\r\n".to_vec()),
        }
    }
}

struct Shared {
    script: Mutex<Script>,
    received: Mutex<Vec<String>>,
    /// The commands of each connection, in accept order.
    by_conn: Mutex<Vec<Vec<String>>>,
    /// Bytes of each read, per connection in accept order (batching checks).
    reads: Mutex<Vec<Vec<usize>>>,
    arrived: Notify,
    conns: AtomicUsize,
    /// A stopped node (SIGSTOP): nothing is answered until resumed.
    paused: std::sync::atomic::AtomicBool,
    resumed: Notify,
}

/// A running scripted peer; stops when dropped.
pub struct Peer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _task: AbortOnDropHandle<()>,
}

/// True for the commands of the connection handshake (CLIENT SETNAME, HELLO).
fn is_handshake(c: &str) -> bool {
    c.starts_with("CLIENT SETNAME") || c == "HELLO" || c.starts_with("HELLO 3")
}

impl Peer {
    pub async fn start(script: Script) -> Peer {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::serve_on(l, script)
    }

    /// A peer on a given address (a node that comes back where it was, e.g. on a
    /// [`Peer::refused_addr`]).
    pub async fn start_on(addr: SocketAddr, script: Script) -> Peer {
        let l = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::serve_on(l, script)
    }

    fn serve_on(l: TcpListener, script: Script) -> Peer {
        let addr = l.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            received: Mutex::new(Vec::new()),
            by_conn: Mutex::new(Vec::new()),
            reads: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            conns: AtomicUsize::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
            resumed: Notify::new(),
        });
        let s = shared.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((sock, _)) = l.accept().await {
                let idx = s.conns.fetch_add(1, Ordering::SeqCst);
                s.reads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Vec::new());
                s.by_conn
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Vec::new());
                conns.push(AbortOnDropHandle::new(tokio::spawn(serve(
                    sock,
                    s.clone(),
                    idx,
                ))));
            }
        }));
        Peer {
            addr,
            shared,
            _task: task,
        }
    }

    /// An address where nothing listens (connects are refused at once).
    pub async fn refused_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        l.local_addr().expect("local addr")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every command received so far, as its arguments joined by spaces.
    pub fn received(&self) -> Vec<String> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The commands received so far, without the handshake (CLIENT SETNAME, HELLO).
    pub fn commands(&self) -> Vec<String> {
        self.received()
            .into_iter()
            .filter(|c| !is_handshake(c))
            .collect()
    }

    /// The commands connection `i` (in accept order) received, without the handshake.
    pub fn conn_commands(&self, i: usize) -> Vec<String> {
        self.shared
            .by_conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .map(|cmds| cmds.iter().filter(|c| !is_handshake(c)).cloned().collect())
            .unwrap_or_default()
    }

    /// The index (accept order) of the connection that received `command` first.
    pub fn conn_of(&self, command: &str) -> Option<usize> {
        self.shared
            .by_conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .position(|cmds| cmds.iter().any(|c| c == command))
    }

    /// Waits until at least `n` commands were received.
    pub async fn wait_received(&self, n: usize) {
        loop {
            let notified = self.shared.arrived.notified();
            if self.received().len() >= n {
                return;
            }
            notified.await;
        }
    }

    /// Stops answering on every connection, health checks included (a SIGSTOPped node);
    /// `false` resumes, and what arrived meanwhile is answered.
    pub fn pause(&self, on: bool) {
        self.shared.paused.store(on, Ordering::SeqCst);
        if !on {
            self.shared.resumed.notify_waiters();
        }
    }

    /// Connections accepted so far (health-check connections included).
    pub fn connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }

    /// The sizes of the reads of connection `i` (one read per batch the proxy wrote, when
    /// the buffer had room for it).
    pub fn reads(&self, i: usize) -> Vec<usize> {
        self.shared
            .reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .cloned()
            .unwrap_or_default()
    }
}

async fn serve(mut sock: TcpStream, s: Arc<Shared>, idx: usize) {
    // Without it, a small write behind an unacknowledged one waits for the proxy's delayed
    // ACK (Nagle): up to 40 ms of real time, which paused-time tests never wait for.
    let _ = sock.set_nodelay(true);
    let mut buf = BytesMut::new();
    let mut dec = CommandDecoder::default();
    let limits = Limits::default();
    // The proxy's health checker (CLIENT SETNAME ...-health): PONG to its PINGs, and none of
    // it recorded or scripted.
    let mut probe = false;
    loop {
        buf.reserve(64 * 1024);
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(r) = s
                    .reads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(idx)
                {
                    r.push(n)
                }
            }
        }
        while s.paused.load(Ordering::SeqCst) {
            let resumed = s.resumed.notified();
            if !s.paused.load(Ordering::SeqCst) {
                break;
            }
            resumed.await;
        }
        let mut out = Vec::new();
        while let Ok(Some(cmd)) = dec.decode(&mut buf, &limits) {
            if cmd.arg_is(0, "CLIENT")
                && cmd.arg_is(1, "SETNAME")
                && cmd.args.get(2).is_some_and(|n| n.ends_with(b"-health"))
            {
                probe = true;
            }
            if probe {
                out.extend_from_slice(if cmd.arg_is(0, "PING") {
                    b"+PONG\r\n"
                } else {
                    b"+OK\r\n"
                });
                continue;
            }
            let text = cmd
                .args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            let action = s
                .script
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next(&cmd);
            if let Some(c) = s
                .by_conn
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(idx)
            {
                c.push(text.clone());
            }
            s.received
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(text);
            s.arrived.notify_waiters();
            match action {
                Action::Reply(r) => out.extend_from_slice(&r),
                Action::ReplySplit(r, at) => {
                    let at = at.min(r.len());
                    out.extend_from_slice(&r[..at]);
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                    tokio::task::yield_now().await;
                    out.extend_from_slice(&r[at..]);
                }
                Action::Slow(d, r) => {
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                    tokio::time::sleep(d).await;
                    out.extend_from_slice(&r);
                }
                Action::Close => {
                    let _ = sock.write_all(&out).await;
                    return;
                }
                Action::CloseMid(partial) => {
                    out.extend_from_slice(&partial);
                    let _ = sock.write_all(&out).await;
                    return;
                }
                Action::ReplyThen(r, d, extra) => {
                    out.extend_from_slice(&r);
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                    tokio::time::sleep(d).await;
                    if sock.write_all(&extra).await.is_err() {
                        return;
                    }
                }
                Action::Hang => {
                    let _ = sock.write_all(&out).await;
                    // Keep the socket open, read nothing more.
                    std::future::pending::<()>().await;
                }
            }
        }
        if !out.is_empty() && sock.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Lets paused time run (1 ms per step, each once every task is idle) until `cond` holds.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{what}: still not the case after 10 s of paused time");
}

/// A request of client 1 for the command `args`, `seq`-th in its order.
pub fn request(args: &[&str], class: ReplayClass, seq: u64) -> Request {
    let args: Vec<Bytes> = args
        .iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect();
    Request {
        raw: encode_command(&args),
        class,
        order: Order { client: 1, seq },
        route: Default::default(),
        gate: None,
    }
}

/// A socket address literal of test data.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// The bytes of a string literal of test data.
pub fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}
