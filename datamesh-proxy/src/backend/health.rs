//! Node health: per backend node in use, its [`NodeStatus`] and an active check on a
//! connection of its own.
//!
//! - A dropped or refused data connection marks its node `Down` at once ([`NodeHealth::failed`],
//!   called by the connection itself) and wakes the node's checker for a probe now.
//! - The checker PINGs every `interval` (default 500 ms). No answer within `interval`: `Suspect`
//!   (still used); none within `timeout` (default 1000 ms): `Down`. A hung node (SIGSTOP, a
//!   partition that drops packets) is therefore detected within `timeout` plus one `interval`.
//! - `-LOADING` (a restarted server reading its data) or `-MASTERDOWN` is `Loading`: alive, but
//!   commands would be refused.
//! - While a node is `Down` or `Loading` it is probed every [`DOWN_PROBE`], so a restarted
//!   server is back in use within that of answering PONG; the first PONG makes it `Up`, and
//!   that ends the backoff of its data connections (they reconnect at their next command
//!   instead of sitting out a backoff while the node is already back).
//!
//! Every status change bumps a generation ([`Health::changes`]) that the hold queue follows.
//!
//! Architecture Invariant: a node nobody has seen fail is `Up`. Health only ever keeps
//! commands off a node that failed; it never delays the first use of a new node (a promoted
//! replica is used the moment the topology names it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use super::{connect, handshake, Cause, ConnectSpec};
use crate::resp::{Limits, ReplyDecoder};

/// How often a node that is down or loading is probed.
pub const DOWN_PROBE: Duration = Duration::from_millis(50);

/// Health check settings of a backend group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    /// PING every `interval` while the node is up.
    pub interval: Duration,
    /// No answer within `timeout`: the node is down.
    pub timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(1000),
        }
    }
}

/// What the proxy believes about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum NodeStatus {
    Up = 0,
    /// A health PING is late (past `interval`, not yet `timeout`): still used.
    Suspect = 1,
    /// Refused, dropped or silent past `timeout`: commands for it are held.
    Down = 2,
    /// Answers, but `-LOADING` (or `-MASTERDOWN`): commands for it are held.
    Loading = 3,
}

impl NodeStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => NodeStatus::Suspect,
            2 => NodeStatus::Down,
            3 => NodeStatus::Loading,
            _ => NodeStatus::Up,
        }
    }

    /// The name `/backends` and errors use.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Up => "up",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Down => "down",
            NodeStatus::Loading => "loading",
        }
    }

    /// Commands may be sent to the node.
    pub fn usable(self) -> bool {
        matches!(self, NodeStatus::Up | NodeStatus::Suspect)
    }
}

#[derive(Debug)]
struct Detail {
    /// When the status last changed.
    since: Instant,
    /// Why it is not up.
    cause: Option<String>,
    /// When the node stopped being usable (None while usable).
    down_since: Option<Instant>,
    /// When it last became usable again (a connection that failed before that may reconnect
    /// at once).
    up_at: Option<Instant>,
}

/// One node's health (see the module docs).
#[derive(Debug)]
pub struct NodeHealth {
    pub addr: SocketAddr,
    status: AtomicU8,
    detail: Mutex<Detail>,
    /// Wakes the checker for a probe now.
    poke: Notify,
    /// An active checker runs: failures mark the node down (without one nothing would bring
    /// it back, so failures are left to the connections' own backoff).
    checked: bool,
    changes: Arc<watch::Sender<u64>>,
    outages: crate::metrics::Durations,
}

/// What `/backends` shows of a node's health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthInfo {
    pub status: NodeStatus,
    pub for_ms: u64,
    pub cause: Option<String>,
}

impl NodeHealth {
    fn new(
        addr: SocketAddr,
        checked: bool,
        changes: Arc<watch::Sender<u64>>,
        outages: crate::metrics::Durations,
    ) -> Self {
        Self {
            addr,
            status: AtomicU8::new(NodeStatus::Up as u8),
            detail: Mutex::new(Detail {
                since: Instant::now(),
                cause: None,
                down_since: None,
                up_at: None,
            }),
            poke: Notify::new(),
            checked,
            changes,
            outages,
        }
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Commands may be sent to the node now (read without a lock, per command).
    pub fn usable(&self) -> bool {
        self.status().usable()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn info(&self) -> HealthInfo {
        let d = self.lock();
        HealthInfo {
            status: self.status(),
            for_ms: d.since.elapsed().as_millis() as u64,
            cause: d.cause.clone(),
        }
    }

    /// Why the node is not usable, for the errors of commands that waited for it.
    pub fn cause(&self) -> Option<String> {
        self.lock().cause.clone()
    }

    /// True when the node became usable again after `t` (a connection that failed at `t` need
    /// not sit out its backoff).
    pub fn recovered_since(&self, t: Instant) -> bool {
        self.usable() && self.lock().up_at.is_some_and(|u| u > t)
    }

    /// Sets the status; logs and publishes a change.
    fn set(&self, status: NodeStatus, cause: Option<String>) {
        let old = self.status();
        if old == status {
            if !status.usable() {
                // Keep the latest cause (refused, then loading ...).
                self.lock().cause = cause;
            }
            return;
        }
        let now = Instant::now();
        {
            let mut d = self.lock();
            d.since = now;
            match (old.usable(), status.usable()) {
                (true, false) => {
                    d.down_since = Some(now);
                    warn!(backend = %self.addr, status = ?status, cause = cause.as_deref().unwrap_or(""), "backend node not usable: commands for it are held");
                }
                (false, true) => {
                    let down = d.down_since.take().map(|t| now - t).unwrap_or_default();
                    d.up_at = Some(now);
                    self.outages.observe(down.as_secs_f64());
                    info!(backend = %self.addr, down_ms = down.as_millis() as u64, "backend node usable again");
                }
                _ => {}
            }
            d.cause = if status.usable() { None } else { cause };
            self.status.store(status as u8, Ordering::Release);
        }
        self.changes.send_modify(|g| *g += 1);
    }

    /// A data connection to the node was refused, dropped or timed out: down at once, and
    /// probed now.
    pub fn failed(&self, cause: &Cause) {
        if self.checked && !matches!(cause, Cause::ClosedByProxy) {
            self.set(NodeStatus::Down, Some(cause.to_string()));
            self.poke.notify_one();
        }
    }

    /// The node answered a command with `-LOADING`/`-MASTERDOWN`: held until it answers PING.
    pub fn loading(&self, reply: &str) {
        if !self.checked {
            return;
        }
        self.set(NodeStatus::Loading, Some(format!("it answered {reply}")));
        self.poke.notify_one();
    }
}

/// A tracked node and its checker (stopped when dropped).
type Tracked = (Arc<NodeHealth>, Option<AbortOnDropHandle<()>>);

/// The health of every node a backend group uses (see the module docs).
pub struct Health {
    settings: Option<HealthSettings>,
    spec: Arc<ConnectSpec>,
    nodes: Mutex<HashMap<SocketAddr, Tracked>>,
    changes: Arc<watch::Sender<u64>>,
    outages: crate::metrics::Durations,
}

impl Health {
    /// `settings` None: no active checks (nodes still go down on failures, and come back at
    /// their connection's next successful connect).
    pub fn new(
        settings: Option<HealthSettings>,
        spec: Arc<ConnectSpec>,
        outages: crate::metrics::Durations,
    ) -> Self {
        Self {
            settings,
            spec,
            nodes: Mutex::new(HashMap::new()),
            changes: Arc::new(watch::channel(0).0),
            outages,
        }
    }

    /// Every status change of any node.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The node's health, checked from now on (must run inside tokio).
    pub fn track(&self, addr: SocketAddr) -> Arc<NodeHealth> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = nodes.get(&addr) {
            return n.clone();
        }
        let node = Arc::new(NodeHealth::new(
            addr,
            self.settings.is_some(),
            self.changes.clone(),
            self.outages.clone(),
        ));
        let task = self.settings.map(|s| {
            AbortOnDropHandle::new(tokio::spawn(check(node.clone(), self.spec.clone(), s)))
        });
        nodes.insert(addr, (node.clone(), task));
        node
    }

    /// The node's health if it is tracked.
    pub fn get(&self, addr: SocketAddr) -> Option<Arc<NodeHealth>> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .map(|(n, _)| n.clone())
    }

    /// Whether commands may go to `addr` now (untracked nodes are up).
    pub fn usable(&self, addr: SocketAddr) -> bool {
        self.get(addr).is_none_or(|n| n.usable())
    }

    /// Stops checking nodes not in `keep`.
    pub fn retain(&self, keep: &[SocketAddr]) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a, _| keep.contains(a));
    }

    pub fn snapshot(&self) -> Vec<(SocketAddr, HealthInfo)> {
        let mut out: Vec<_> = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(n, _)| (n.addr, n.info()))
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }
}

/// What one probe found.
enum Probe {
    Pong,
    Loading(String),
}

/// The checker of one node (see the module docs).
async fn check(node: Arc<NodeHealth>, spec: Arc<ConnectSpec>, s: HealthSettings) {
    let mut spec = (*spec).clone();
    spec.client_name = format!("{}-health", spec.client_name);
    let mut conn: Option<(TcpStream, BytesMut)> = None;
    loop {
        let wait = if node.usable() {
            s.interval
        } else {
            DOWN_PROBE
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = node.poke.notified() => {}
        }
        let result = {
            let probe = probe(&mut conn, node.addr, &spec);
            tokio::pin!(probe);
            let late = tokio::time::sleep(s.interval.min(s.timeout));
            tokio::pin!(late);
            let deadline = tokio::time::sleep(s.timeout);
            tokio::pin!(deadline);
            let mut suspect = false;
            loop {
                tokio::select! {
                    r = &mut probe => break Some(r),
                    _ = &mut late, if !suspect => {
                        suspect = true;
                        if node.status() == NodeStatus::Up {
                            node.set(NodeStatus::Suspect, None);
                        }
                    }
                    _ = &mut deadline => break None,
                }
            }
        };
        match result {
            Some(Ok(Probe::Pong)) => node.set(NodeStatus::Up, None),
            Some(Ok(Probe::Loading(text))) => {
                node.set(NodeStatus::Loading, Some(format!("it answers {text}")))
            }
            Some(Err(cause)) => {
                conn = None;
                node.set(NodeStatus::Down, Some(cause.to_string()));
            }
            None => {
                conn = None;
                node.set(
                    NodeStatus::Down,
                    Some(format!(
                        "no answer to the health check PING within {} ms (health_timeout_ms)",
                        s.timeout.as_millis()
                    )),
                );
            }
        }
    }
}

/// Connects when needed and sends one PING on the checker's own connection.
async fn probe(
    conn: &mut Option<(TcpStream, BytesMut)>,
    addr: SocketAddr,
    spec: &ConnectSpec,
) -> Result<Probe, Cause> {
    if conn.is_none() {
        let mut stream = connect::connect_marked(addr, spec.mark, spec.connect_timeout).await?;
        let learned = handshake::run(
            &mut stream,
            &handshake::control_steps(spec),
            spec.connect_timeout,
        )
        .await?;
        *conn = Some((stream, learned.leftover));
    }
    let Some((stream, buf)) = conn.as_mut() else {
        return Err(Cause::ClosedByProxy);
    };
    let r = async {
        stream
            .write_all(b"*1\r\n$4\r\nPING\r\n")
            .await
            .map_err(|e| Cause::Write(e.to_string()))?;
        let mut dec = ReplyDecoder::default();
        loop {
            match dec.decode(buf, &Limits::control()) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(Cause::Protocol(e)),
            }
            match stream.read_buf(buf).await {
                Ok(0) => return Err(Cause::Eof),
                Ok(_) => {}
                Err(e) => return Err(Cause::Read(e.to_string())),
            }
        }
    }
    .await;
    let reply = match r {
        Ok(r) => r,
        Err(e) => {
            *conn = None;
            return Err(e);
        }
    };
    let text = reply.error_text();
    if reply.is_error() && (text.starts_with(b"LOADING") || text.starts_with(b"MASTERDOWN")) {
        let word = Bytes::copy_from_slice(text.split(|b| *b == b' ').next().unwrap_or(b""));
        return Ok(Probe::Loading(String::from_utf8_lossy(&word).into_owned()));
    }
    // PONG, or any other answer (BUSY, NOAUTH ...): the node is alive and reading.
    Ok(Probe::Pong)
}
