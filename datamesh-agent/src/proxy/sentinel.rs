//! Redis Sentinel backends: the [`Sentinel`] topology for one master name. It owns the
//! discovery of the master (`SENTINEL get-master-addr-by-name`, confirmed with `ROLE` on the
//! master itself) and of its healthy replicas (`SENTINEL replicas`), following
//! `+switch-master` events the moment a sentinel publishes them, re-polling every
//! `poll_interval` as a safety net, and rotating across the configured sentinels (with
//! jittered backoff) when one fails or gives a stale answer.
//!
//! How the proxy core uses it:
//! - `pick(None, readonly)` per command: the master, or (with `read_from_replicas` and a
//!   read-only command) a healthy replica, round-robin. `pick` never does I/O.
//! - Pools are keyed by node address, so after a switch new commands reach the new master
//!   without any further step. What a switch leaves behind are connections to the OLD master
//!   (now a replica that answers writes with `-READONLY`, or dead). Watch for it with
//!   [`Sentinel::subscribe`] (a `watch::Receiver<SentinelState>`; `changed()` fires on every
//!   generation bump) or compare [`Topology::generation`] per read batch, and on a change
//!   retire every pooled connection to an address that is no longer `state.master` (for
//!   write pools) or in `state.replicas` (replica read pools): finish or fail their in-flight
//!   commands, then close them. A `-READONLY` reply means the write was not executed, so it is
//!   safe to resend to the new master.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::cluster::wire::{Client, ClientError, ConnectOptions, Value};
use super::cluster::Backoff;
use super::topology::{Topology, TopologyError};

/// Sentinel event channels the topology subscribes to. `+switch-master` is applied at
/// once; the others (a replica going down or up, an old master turned replica, a new
/// replica) only trigger a re-poll.
const CHANNELS: [&[u8]; 6] = [
    b"+switch-master",
    b"+sdown",
    b"-sdown",
    b"+slave",
    b"+convert-to-slave",
    b"+slave-reconf-done",
];

#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("sentinel {sentinel} does not monitor a master named {master_name:?}: is master_name right?")]
    UnknownMaster {
        sentinel: SocketAddr,
        master_name: String,
    },
    #[error("sentinel {sentinel} gave an unusable reply to {what}")]
    BadReply { sentinel: SocketAddr, what: String },
    #[error("sentinel {sentinel} names {addr} as master of {master_name:?}, but {addr} says its role is {role:?}: the sentinel's view is stale")]
    NotMaster {
        sentinel: SocketAddr,
        master_name: String,
        addr: SocketAddr,
        role: String,
    },
    #[error(
        "no master for {master_name:?} discovered within {timeout:?}: are the sentinels reachable?"
    )]
    NotReady {
        master_name: String,
        timeout: Duration,
    },
}

/// Configuration of one sentinel-managed backend group.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    pub sentinels: Vec<SocketAddr>,
    pub master_name: String,
    /// Send read-only commands to healthy replicas (round-robin).
    pub read_from_replicas: bool,
    /// How to reach the sentinels (bypass mark, sentinel credentials, timeouts).
    pub sentinel_conn: ConnectOptions,
    /// How to reach the data nodes for the `ROLE` check (backend credentials).
    pub backend_conn: ConnectOptions,
    /// Safety-net re-poll interval (default 3 s).
    pub poll_interval: Duration,
}

impl SentinelConfig {
    pub fn new(sentinels: Vec<SocketAddr>, master_name: impl Into<String>) -> Self {
        Self {
            sentinels,
            master_name: master_name.into(),
            read_from_replicas: false,
            sentinel_conn: ConnectOptions::default(),
            backend_conn: ConnectOptions::default(),
            poll_interval: Duration::from_secs(3),
        }
    }
}

/// What the topology currently believes; published through a watch channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentinelState {
    /// Bumped on every change of `master` or `replicas`.
    pub generation: u64,
    pub master: Option<SocketAddr>,
    /// Healthy replicas (not s_down/o_down/disconnected, replication link ok), sorted.
    pub replicas: Vec<SocketAddr>,
}

/// A sentinel event relevant to our master.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// `+switch-master <name> <old-ip> <old-port> <new-ip> <new-port>`.
    Switch { new: SocketAddr },
    /// `+sdown slave <ip:port> <ip> <port> @ <name> ...`: drop that replica now.
    ReplicaDown { addr: SocketAddr },
    /// Something about our master's group changed: re-poll.
    Repoll,
}

/// Parses a pub/sub message `["message", channel, payload]` into an event for `name`.
fn parse_event(msg: &Value, name: &str) -> Option<Event> {
    let parts = msg.as_array()?;
    if parts.len() != 3 || parts[0].as_str() != Some("message") {
        return None;
    }
    let channel = parts[1].as_str()?;
    let payload = parts[2].as_str()?;
    let words: Vec<&str> = payload.split_ascii_whitespace().collect();
    if channel == "+switch-master" {
        if words.len() != 5 || words[0] != name {
            return None;
        }
        let ip = words[3].parse().ok()?;
        let port = words[4].parse().ok()?;
        return Some(Event::Switch {
            new: SocketAddr::new(ip, port),
        });
    }
    // "<type> <name> <ip> <port> @ <master-name> <master-ip> <master-port>"
    let at = words.iter().position(|w| *w == "@")?;
    if words.get(at + 1) != Some(&name) {
        return None;
    }
    if channel == "+sdown" && words.first() == Some(&"slave") && at == 4 {
        let ip = words[2].parse().ok()?;
        let port = words[3].parse().ok()?;
        return Some(Event::ReplicaDown {
            addr: SocketAddr::new(ip, port),
        });
    }
    Some(Event::Repoll)
}

/// Healthy replicas from a `SENTINEL replicas <name>` reply (flat key/value arrays).
fn parse_replicas(reply: &Value) -> Option<Vec<SocketAddr>> {
    let entries = reply.as_array()?;
    let mut out = Vec::new();
    for e in entries {
        let flags = e.field("flags").and_then(Value::as_str).unwrap_or("");
        if flags
            .split(',')
            .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
        {
            continue;
        }
        // A replica whose replication link is down serves stale data.
        if let Some(link) = e.field("master-link-status").and_then(Value::as_str) {
            if link != "ok" {
                continue;
            }
        }
        let ip = e
            .field("ip")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        let port = e
            .field("port")
            .and_then(Value::as_int)
            .and_then(|p| u16::try_from(p).ok());
        if let (Some(ip), Some(port)) = (ip, port) {
            out.push(SocketAddr::new(ip, port));
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// The master address from `SENTINEL get-master-addr-by-name` (`[ip, port]`).
fn parse_master_addr(reply: &Value) -> Option<SocketAddr> {
    let a = reply.as_array()?;
    if a.len() != 2 {
        return None;
    }
    let ip = a[0].as_str()?.parse().ok()?;
    let port = u16::try_from(a[1].as_int()?).ok()?;
    Some(SocketAddr::new(ip, port))
}

struct SentinelInner {
    cfg: SentinelConfig,
    state: watch::Sender<SentinelState>,
    repoll: Notify,
    rr: AtomicUsize,
    /// The sentinel currently followed (for logs, admin and tests).
    current: Mutex<Option<SocketAddr>>,
}

impl SentinelInner {
    fn set_current(&self, addr: Option<SocketAddr>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// Publishes a new view; bumps the generation only when something changed.
    fn apply(&self, master: SocketAddr, mut replicas: Vec<SocketAddr>) {
        replicas.retain(|r| *r != master);
        replicas.sort();
        replicas.dedup();
        let mut old_master = None;
        let changed = self.state.send_if_modified(|s| {
            if s.master == Some(master) && s.replicas == replicas {
                return false;
            }
            old_master = s.master;
            s.master = Some(master);
            s.replicas = replicas.clone();
            s.generation += 1;
            true
        });
        if changed {
            if old_master != Some(master) {
                info!(master_name = %self.cfg.master_name, ?old_master, new_master = %master, ?replicas, "sentinel: master changed");
            } else {
                debug!(master_name = %self.cfg.master_name, ?replicas, "sentinel: replica set changed");
            }
        }
    }

    fn drop_replica(&self, addr: SocketAddr) {
        self.state.send_if_modified(|s| {
            let before = s.replicas.len();
            s.replicas.retain(|r| *r != addr);
            if s.replicas.len() == before {
                return false;
            }
            s.generation += 1;
            true
        });
    }

    /// One discovery round against the sentinel behind `cmd`.
    async fn discover(
        &self,
        cmd: &mut Client,
    ) -> Result<(SocketAddr, Vec<SocketAddr>), SentinelError> {
        let sentinel = cmd.addr();
        let name = self.cfg.master_name.as_bytes();
        let reply = cmd
            .command(&[b"SENTINEL", b"get-master-addr-by-name", name])
            .await?;
        let master = match &reply {
            Value::Nil => {
                return Err(SentinelError::UnknownMaster {
                    sentinel,
                    master_name: self.cfg.master_name.clone(),
                })
            }
            v => parse_master_addr(v).ok_or_else(|| SentinelError::BadReply {
                sentinel,
                what: format!("SENTINEL get-master-addr-by-name: {v:?}"),
            })?,
        };
        let mut reply = cmd.command(&[b"SENTINEL", b"replicas", name]).await?;
        if matches!(reply, Value::Error(_)) {
            // Sentinels before Redis 5 only know the old spelling.
            reply = cmd.command(&[b"SENTINEL", b"slaves", name]).await?;
        }
        let replicas = parse_replicas(&reply).ok_or_else(|| SentinelError::BadReply {
            sentinel,
            what: format!("SENTINEL replicas: {reply:?}"),
        })?;
        // Only a new master is checked: re-polls of an unchanged view cost no connection to
        // the data node (and a +switch-master is applied unverified: the sentinel publishes it
        // only after the promotion is confirmed).
        if self.state.borrow().master != Some(master) {
            self.verify_master(sentinel, master).await?;
        }
        Ok((master, replicas))
    }

    /// Asks the named master for its `ROLE`. A node that says it is a replica proves the
    /// sentinel stale: the caller rotates to another sentinel. A node we cannot ask (down,
    /// ACL forbids ROLE) is accepted: the sentinels are the authority on failures and will
    /// fail it over.
    async fn verify_master(
        &self,
        sentinel: SocketAddr,
        addr: SocketAddr,
    ) -> Result<(), SentinelError> {
        let role = async {
            let mut c = Client::connect(addr, &self.cfg.backend_conn).await?;
            c.command(&[b"ROLE"]).await
        };
        match role.await {
            Ok(v) => {
                let role = v
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(Value::as_str)
                    .map(str::to_string);
                match role.as_deref() {
                    Some("master") => Ok(()),
                    Some(other) => Err(SentinelError::NotMaster {
                        sentinel,
                        master_name: self.cfg.master_name.clone(),
                        addr,
                        role: other.to_string(),
                    }),
                    None => {
                        warn!(%addr, reply = ?v, "ROLE check on the master failed; trusting the sentinel");
                        Ok(())
                    }
                }
            }
            Err(e) => {
                warn!(%addr, error = %e, "cannot reach the master sentinel named; trusting the sentinel");
                Ok(())
            }
        }
    }

    /// Follows one sentinel until it fails; only returns with the error that ended it.
    async fn watch_sentinel(&self, addr: SocketAddr, backoff: &mut Backoff) -> SentinelError {
        match self.watch_sentinel_inner(addr, backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn watch_sentinel_inner(
        &self,
        addr: SocketAddr,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, SentinelError> {
        // Subscribe before discovering, so no switch can fall between the two.
        let mut sub = Client::connect(addr, &self.cfg.sentinel_conn).await?;
        let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        args.extend(CHANNELS);
        sub.send(&args).await?;
        let mut cmd = Client::connect(addr, &self.cfg.sentinel_conn).await?;
        let (master, replicas) = self.discover(&mut cmd).await?;
        self.apply(master, replicas);
        backoff.reset();
        self.set_current(Some(addr));
        debug!(sentinel = %addr, "following sentinel");
        let mut poll = tokio::time::interval(self.cfg.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            let repoll = tokio::select! {
                msg = sub.read() => match parse_event(&msg?, &self.cfg.master_name) {
                    Some(Event::Switch { new }) => {
                        // Follow at once; the re-poll right after fills in the replicas and
                        // confirms the new master's role.
                        let replicas = self.state.borrow().replicas.clone();
                        self.apply(new, replicas);
                        true
                    }
                    Some(Event::ReplicaDown { addr }) => {
                        self.drop_replica(addr);
                        false
                    }
                    Some(Event::Repoll) => true,
                    None => false,
                },
                _ = poll.tick() => true,
                _ = self.repoll.notified() => true,
            };
            if repoll {
                let (master, replicas) = self.discover(&mut cmd).await?;
                self.apply(master, replicas);
            }
        }
    }

    async fn run(self: Arc<Self>) {
        let n = self.cfg.sentinels.len();
        if n == 0 {
            warn!(master_name = %self.cfg.master_name, "no sentinels configured: no master will ever be known");
            return;
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut idx = 0usize;
        loop {
            let addr = self.cfg.sentinels[idx % n];
            let err = self.watch_sentinel(addr, &mut backoff).await;
            self.set_current(None);
            let wait = backoff.next_delay();
            warn!(sentinel = %addr, error = %err, retry_in = ?wait, "sentinel failed; rotating to the next one");
            idx = idx.wrapping_add(1);
            tokio::time::sleep(wait).await;
        }
    }
}

/// A master/replica group behind Redis Sentinel as a [`Topology`]. A background task keeps
/// the view current; dropping the `Sentinel` stops it.
pub struct Sentinel {
    inner: Arc<SentinelInner>,
    task: JoinHandle<()>,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sentinel {
    /// Starts following the sentinels and returns at once; `pick` answers
    /// [`TopologyError::NoMaster`] until a master is known (see [`Sentinel::ready`]). Must
    /// be called inside a tokio runtime.
    pub fn spawn(cfg: SentinelConfig) -> Self {
        let inner = Arc::new(SentinelInner {
            cfg,
            state: watch::channel(SentinelState::default()).0,
            repoll: Notify::new(),
            rr: AtomicUsize::new(0),
            current: Mutex::new(None),
        });
        let task = tokio::spawn(inner.clone().run());
        Self { inner, task }
    }

    /// Like [`Sentinel::spawn`] but waits up to `timeout` for the first master.
    #[cfg(test)]
    pub async fn connect(cfg: SentinelConfig, timeout: Duration) -> Result<Self, SentinelError> {
        let s = Self::spawn(cfg);
        s.ready(timeout).await?;
        Ok(s)
    }

    /// Waits until a master is known.
    pub async fn ready(&self, timeout: Duration) -> Result<(), SentinelError> {
        let mut rx = self.inner.state.subscribe();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| s.master.is_some())).await,
            Ok(Ok(_))
        );
        if ok {
            Ok(())
        } else {
            Err(SentinelError::NotReady {
                master_name: self.inner.cfg.master_name.clone(),
                timeout,
            })
        }
    }

    /// The current view.
    #[cfg(test)]
    pub fn state(&self) -> SentinelState {
        self.inner.state.borrow().clone()
    }

    /// The sentinel currently followed, if any.
    #[cfg(test)]
    pub fn current_sentinel(&self) -> Option<SocketAddr> {
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change of master or replicas (see the module docs for what the pool should do).
    #[cfg(test)]
    pub fn subscribe(&self) -> watch::Receiver<SentinelState> {
        self.inner.state.subscribe()
    }

    /// Re-poll the sentinel now, e.g. after a connect failure or a `-READONLY` from the
    /// node believed to be master.
    pub fn node_failed(&self, addr: SocketAddr) {
        debug!(node = %addr, "sentinel-managed node failed, re-polling");
        self.inner.repoll.notify_one();
    }
}

impl Topology for Sentinel {
    fn pick(&self, _slot: Option<u16>, readonly: bool) -> Result<SocketAddr, TopologyError> {
        let s = self.inner.state.borrow();
        let master = s.master.ok_or_else(|| TopologyError::NoMaster {
            master_name: self.inner.cfg.master_name.clone(),
        })?;
        if readonly && self.inner.cfg.read_from_replicas && !s.replicas.is_empty() {
            let i = self.inner.rr.fetch_add(1, Ordering::Relaxed) % s.replicas.len();
            return Ok(s.replicas[i]);
        }
        Ok(master)
    }

    fn redirected(&self, _slot: u16, _addr: SocketAddr, _ask: bool) {
        // Sentinel-managed nodes are not cluster nodes: there are no redirects to follow.
    }

    fn is_cluster(&self) -> bool {
        false
    }

    fn generation(&self) -> u64 {
        self.inner.state.borrow().generation
    }

    fn nodes(&self) -> Vec<SocketAddr> {
        let s = self.inner.state.borrow();
        let mut out: Vec<SocketAddr> = s.master.into_iter().collect();
        if self.inner.cfg.read_from_replicas {
            out.extend(s.replicas.iter().copied());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn bulk(s: &str) -> Value {
        Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn msg(channel: &str, payload: &str) -> Value {
        Value::Array(vec![bulk("message"), bulk(channel), bulk(payload)])
    }

    #[test]
    fn events_parse() {
        let e = |c, p| parse_event(&msg(c, p), "mymaster");
        assert_eq!(
            e("+switch-master", "mymaster 127.0.0.1 6379 127.0.0.1 6380"),
            Some(Event::Switch {
                new: addr("127.0.0.1:6380")
            })
        );
        assert_eq!(
            e("+switch-master", "other 127.0.0.1 6379 127.0.0.1 6380"),
            None
        );
        assert_eq!(e("+switch-master", "mymaster 127.0.0.1 6379"), None);
        assert_eq!(
            e(
                "+sdown",
                "slave 127.0.0.1:6380 127.0.0.1 6380 @ mymaster 127.0.0.1 6379"
            ),
            Some(Event::ReplicaDown {
                addr: addr("127.0.0.1:6380")
            })
        );
        assert_eq!(
            e(
                "-sdown",
                "slave 127.0.0.1:6380 127.0.0.1 6380 @ mymaster 127.0.0.1 6379"
            ),
            Some(Event::Repoll)
        );
        assert_eq!(e("+sdown", "master mymaster 127.0.0.1 6379"), None);
        assert_eq!(
            e(
                "+sdown",
                "sentinel abc 127.0.0.1 26379 @ mymaster 127.0.0.1 6379"
            ),
            Some(Event::Repoll)
        );
        assert_eq!(
            e(
                "+slave",
                "slave 127.0.0.1:6381 127.0.0.1 6381 @ othermaster 127.0.0.1 6379"
            ),
            None
        );
        // Subscribe confirmations are not events.
        let confirm = Value::Array(vec![bulk("subscribe"), bulk("+sdown"), Value::Int(2)]);
        assert_eq!(parse_event(&confirm, "mymaster"), None);
    }

    fn replica(ip: &str, port: &str, flags: &str, link: &str) -> Value {
        Value::Array(
            [
                "name",
                &format!("{ip}:{port}"),
                "ip",
                ip,
                "port",
                port,
                "flags",
                flags,
                "master-link-status",
                link,
            ]
            .into_iter()
            .map(bulk)
            .collect(),
        )
    }

    #[test]
    fn replicas_parse_and_filter() {
        let reply = Value::Array(vec![
            replica("127.0.0.1", "6382", "slave", "ok"),
            replica("127.0.0.1", "6381", "slave", "ok"),
            replica("127.0.0.1", "6383", "s_down,slave", "ok"),
            replica("127.0.0.1", "6384", "slave,o_down", "ok"),
            replica("127.0.0.1", "6385", "slave,disconnected", "ok"),
            replica("127.0.0.1", "6386", "slave", "err"),
            replica("?", "6387", "slave", "ok"),
        ]);
        assert_eq!(
            parse_replicas(&reply),
            Some(vec![addr("127.0.0.1:6381"), addr("127.0.0.1:6382")])
        );
        assert_eq!(parse_replicas(&Value::Array(vec![])), Some(vec![]));
        assert_eq!(parse_replicas(&Value::Int(3)), None);
        assert_eq!(
            parse_master_addr(&Value::Array(vec![bulk("10.0.0.1"), bulk("6379")])),
            Some(addr("10.0.0.1:6379"))
        );
        assert_eq!(
            parse_master_addr(&Value::Array(vec![bulk("10.0.0.1")])),
            None
        );
    }

    fn idle(cfg: SentinelConfig) -> Sentinel {
        let inner = Arc::new(SentinelInner {
            cfg,
            state: watch::channel(SentinelState::default()).0,
            repoll: Notify::new(),
            rr: AtomicUsize::new(0),
            current: Mutex::new(None),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let task = rt.spawn(async {});
        Sentinel { inner, task }
    }

    #[test]
    fn pick_and_generation() {
        let m = addr("127.0.0.1:6379");
        let r1 = addr("127.0.0.1:6380");
        let r2 = addr("127.0.0.1:6381");
        let mut cfg = SentinelConfig::new(vec![addr("127.0.0.1:26379")], "mymaster");
        cfg.read_from_replicas = true;
        let s = idle(cfg);
        assert_eq!(
            s.pick(None, false),
            Err(TopologyError::NoMaster {
                master_name: "mymaster".into()
            })
        );
        assert!(!s.is_cluster());
        s.inner.apply(m, vec![r2, r1, m]);
        assert_eq!(s.generation(), 1);
        assert_eq!(s.state().replicas, vec![r1, r2]);
        assert_eq!(s.pick(None, false), Ok(m));
        let reads: Vec<_> = (0..4)
            .map(|_| s.pick(Some(3), true).expect("pick"))
            .collect();
        assert_eq!(reads, vec![r1, r2, r1, r2]);
        assert_eq!(s.nodes(), vec![m, r1, r2]);
        // Same view again: no bump.
        s.inner.apply(m, vec![r1, r2]);
        assert_eq!(s.generation(), 1);
        s.inner.drop_replica(r1);
        assert_eq!((s.generation(), s.pick(None, true)), (2, Ok(r2)));
        s.inner.drop_replica(r1);
        assert_eq!(s.generation(), 2);
        // A switch: new master, generation bumps, subscribers see it.
        let mut rx = s.subscribe();
        s.inner.apply(r2, vec![]);
        assert!(rx.has_changed().expect("watch"));
        assert_eq!(s.generation(), 3);
        assert_eq!(s.pick(None, true), Ok(r2));
        assert_eq!(rx.borrow_and_update().master, Some(r2));
    }
}

/// Live test: a real master, replica and two real sentinels; the topology discovers them,
/// follows two failovers (one through each sentinel) and survives its sentinel dying.
#[cfg(test)]
mod live_tests {
    use std::time::Instant;

    use super::super::cluster::testkit::*;
    use super::*;

    const NAME: &str = "mymaster";

    fn sentinel_conf(lab: &Lab, port: u16, master: u16) -> String {
        let path = lab.path(&format!("sentinel-{port}.conf"));
        let text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\n\
             logfile {log}\nsentinel monitor {NAME} 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds {NAME} 2000\n\
             sentinel failover-timeout {NAME} 10000\nsentinel parallel-syncs {NAME} 1\n",
            dir = lab.dir.display(),
            log = lab.path(&format!("sentinel-{port}.log")),
        );
        std::fs::write(&path, text).expect("write sentinel.conf");
        path
    }

    /// Waits until sentinel `s` names `master` and lists `replica` as healthy.
    async fn sentinel_sees(s: SocketAddr, master: SocketAddr, replica: SocketAddr) {
        eventually(
            &format!("sentinel {s} to see master {master} with healthy replica {replica}"),
            Duration::from_secs(40),
            || async move {
                let m = try_cmd(s, &["SENTINEL", "get-master-addr-by-name", NAME]).await?;
                if parse_master_addr(&m) != Some(master) {
                    return None;
                }
                let r = try_cmd(s, &["SENTINEL", "replicas", NAME]).await?;
                parse_replicas(&r)?.contains(&replica).then_some(())
            },
        )
        .await
    }

    /// `SENTINEL FAILOVER` on `s` (retried while the sentinel has no good replica yet), then
    /// the time until the sentinel itself and the topology each report `to` as master.
    async fn failover(s: SocketAddr, topo: &Sentinel, to: SocketAddr) -> (Duration, Duration) {
        let gen = topo.generation();
        let t0 = eventually(
            "SENTINEL FAILOVER to be accepted",
            Duration::from_secs(20),
            || async move {
                let t = Instant::now();
                match try_cmd(s, &["SENTINEL", "FAILOVER", NAME]).await? {
                    Value::Simple(ok) if ok == "OK" => Some(t),
                    _ => None,
                }
            },
        )
        .await;
        let mut t_sentinel = None;
        let mut t_topo = None;
        let deadline = t0 + Duration::from_secs(15);
        while (t_sentinel.is_none() || t_topo.is_none()) && Instant::now() < deadline {
            if t_topo.is_none() && topo.pick(None, false) == Ok(to) {
                t_topo = Some(t0.elapsed());
            }
            if t_sentinel.is_none() {
                if let Some(v) = try_cmd(s, &["SENTINEL", "get-master-addr-by-name", NAME]).await {
                    if parse_master_addr(&v) == Some(to) {
                        t_sentinel = Some(t0.elapsed());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (Some(ts), Some(tt)) = (t_sentinel, t_topo) else {
            panic!("failover to {to} not seen within 15 s (sentinel: {t_sentinel:?}, topology: {t_topo:?}, state {:?})", topo.state());
        };
        assert!(topo.generation() > gen, "generation must bump on a switch");
        (ts, tt)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_sentinel_discovery_failover_and_rotation() {
        let redis = Lab::bin("redis-server");
        let sentinel_bin = Lab::bin("redis-sentinel");
        let mut lab = Lab::new("sentinel");
        let (pm, pr) = (free_port(), free_port());
        let (m, r) = (local(pm), local(pr));
        lab.spawn("master", &redis, &server_args(&lab, pm));
        let mut args = server_args(&lab, pr);
        args.extend(["--replicaof", "127.0.0.1", &pm.to_string()].map(String::from));
        lab.spawn("replica", &redis, &args);
        wait_ping(m).await;
        wait_ping(r).await;
        eventually(
            "the replica's link to the master",
            Duration::from_secs(20),
            || async move {
                let info = try_cmd(r, &["INFO", "replication"]).await?;
                (info_field(&info, "master_link_status").as_deref() == Some("up")).then_some(())
            },
        )
        .await;
        let (ps1, ps2) = (free_port(), free_port());
        let (s1, s2) = (local(ps1), local(ps2));
        for (label, p) in [("sentinel1", ps1), ("sentinel2", ps2)] {
            let conf = sentinel_conf(&lab, p, pm);
            lab.spawn(label, &sentinel_bin, &[conf]);
        }
        wait_ping(s1).await;
        wait_ping(s2).await;
        sentinel_sees(s1, m, r).await;
        sentinel_sees(s2, m, r).await;

        // Discovery, with a dead sentinel listed first.
        let dead = local(free_port());
        let mut cfg = SentinelConfig::new(vec![dead, s1, s2], NAME);
        cfg.read_from_replicas = true;
        let t = Instant::now();
        let topo = Sentinel::connect(cfg, Duration::from_secs(10))
            .await
            .expect("sentinel topology");
        eprintln!(
            "live sentinel: discovered master {m} in {:?} (first sentinel dead)",
            t.elapsed()
        );
        assert_eq!(topo.current_sentinel(), Some(s1));
        // The master is known at once; the replica is listed once the sentinel reports its
        // replication link up, which can lag the master by a poll.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = topo.state();
        while st.replicas != vec![r] && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            st = topo.state();
        }
        assert_eq!((st.master, st.replicas.clone()), (Some(m), vec![r]));
        assert_eq!(topo.pick(None, false), Ok(m));
        assert_eq!(topo.pick(Some(1), true), Ok(r));
        assert_eq!(topo.nodes(), vec![m, r]);

        // Failover 1 through the followed sentinel: +switch-master is applied at once.
        let mut rx = topo.subscribe();
        rx.borrow_and_update();
        let (ts, tt) = failover(s1, &topo, r).await;
        eprintln!("live sentinel: failover 1 ({m} -> {r}): sentinel answered after {ts:?}, topology switched after {tt:?}");
        assert!(
            tt <= Duration::from_secs(3),
            "topology took {tt:?} to follow the switch"
        );
        assert!(
            rx.has_changed().expect("watch"),
            "subscribers see the switch"
        );
        assert_eq!(rx.borrow_and_update().master, Some(r));
        let role = cmd(r, &["ROLE"]).await;
        assert_eq!(
            role.as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_str),
            Some("master")
        );
        // The old master comes back as a healthy replica (via event or re-poll).
        let t = Instant::now();
        eventually(
            "the old master to be listed as a healthy replica",
            Duration::from_secs(40),
            || async { (topo.state().replicas == vec![m]).then_some(()) },
        )
        .await;
        eprintln!(
            "live sentinel: old master {m} listed as replica {:?} after the switch",
            t.elapsed()
        );

        // Kill the followed sentinel: the topology rotates to the other one and follows a
        // failover there.
        sentinel_sees(s2, r, m).await;
        lab.kill("sentinel1");
        let t = Instant::now();
        eventually(
            "rotation to the second sentinel",
            Duration::from_secs(15),
            || async { (topo.current_sentinel() == Some(s2)).then_some(()) },
        )
        .await;
        eprintln!(
            "live sentinel: rotated to {s2} {:?} after killing {s1}",
            t.elapsed()
        );
        let (ts, tt) = failover(s2, &topo, m).await;
        eprintln!("live sentinel: failover 2 ({r} -> {m}) via {s2}: sentinel answered after {ts:?}, topology switched after {tt:?}");
        assert!(
            tt <= Duration::from_secs(3),
            "topology took {tt:?} to follow the switch"
        );
        assert_eq!(topo.pick(None, false), Ok(m));
    }
}
