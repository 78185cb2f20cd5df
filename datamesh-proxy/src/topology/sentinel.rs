//! Redis Sentinel backends: the [`Sentinel`] topology for one master name. It owns the
//! discovery of the master (`SENTINEL get-master-addr-by-name`, confirmed with `ROLE` on the
//! master itself) and of its healthy replicas (`SENTINEL replicas`), following
//! `+switch-master` events the moment a sentinel publishes them, re-polling every
//! `poll_interval` as a safety net, and rotating across the configured sentinels (with
//! jittered backoff) when one fails or gives a stale answer.
//!
//! The topology publishes every change of master or replicas as a new generation
//! ([`Topology::changes`]); the endpoint then retires the pools of nodes that are no longer
//! used (the old master, now a replica that answers writes with `-READONLY`, or dead), and the
//! router resends a command answered `-READONLY` to the new master, since that reply proves
//! it did not run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::control::{ControlConn, ControlError, ControlSpec};
use super::follow::{self, Follower};
use super::{Topology, TopologyError, TopologyKind};
use crate::backend::Backoff;
use crate::resp::Value;

/// Sentinel event channels the topology subscribes to. `+switch-master` is applied at
/// once; the others (a replica going down or up, an old master turned replica, a new
/// replica) only trigger a re-poll.
const CHANNELS: [&[u8]; 7] = [
    b"+switch-master",
    b"+sdown",
    b"+odown",
    b"-sdown",
    b"+slave",
    b"+convert-to-slave",
    b"+slave-reconf-done",
];

#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error(transparent)]
    Control(#[from] ControlError),
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
    #[error("no sentinels are configured for {master_name:?}")]
    NoSentinels { master_name: String },
}

/// Configuration of one sentinel-managed backend group.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    pub sentinels: Vec<SocketAddr>,
    pub master_name: String,
    /// Send read-only commands to healthy replicas (round-robin).
    pub read_from_replicas: bool,
    /// How to reach the sentinels (bypass mark, sentinel credentials, timeouts).
    pub sentinel_conn: ControlSpec,
    /// How to reach the data nodes for the `ROLE` check (backend credentials).
    pub backend_conn: ControlSpec,
    /// Safety-net re-poll interval (default 3 s).
    pub poll_interval: Duration,
}

impl SentinelConfig {
    pub fn new(sentinels: Vec<SocketAddr>, master_name: impl Into<String>) -> Self {
        Self {
            sentinels,
            master_name: master_name.into(),
            read_from_replicas: false,
            sentinel_conn: ControlSpec::plain(),
            backend_conn: ControlSpec::plain(),
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
    // "master <name> <ip> <port> ...": our master is down (subjectively or objectively).
    if (channel == "+sdown" || channel == "+odown")
        && words.first() == Some(&"master")
        && words.get(1) == Some(&name)
    {
        return Some(Event::Repoll);
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
    /// `state.generation`, published for [`Topology::changes`].
    generation: watch::Sender<u64>,
    /// When the master in use was first reported failed (for the switch's log line).
    failed_at: Mutex<Option<tokio::time::Instant>>,
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
            self.publish();
            if old_master != Some(master) {
                let down_ms = self
                    .failed_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|t| t.elapsed().as_millis() as u64);
                info!(master_name = %self.cfg.master_name, ?old_master, new_master = %master, ?replicas, ?down_ms, "sentinel: master changed (down_ms: since the old master was first seen failing)");
            } else {
                debug!(master_name = %self.cfg.master_name, ?replicas, "sentinel: replica set changed");
            }
        }
    }

    fn drop_replica(&self, addr: SocketAddr) {
        let changed = self.state.send_if_modified(|s| {
            let before = s.replicas.len();
            s.replicas.retain(|r| *r != addr);
            if s.replicas.len() == before {
                return false;
            }
            s.generation += 1;
            true
        });
        if changed {
            self.publish();
        }
    }

    fn publish(&self) {
        let g = self.state.borrow().generation;
        self.generation.send_replace(g);
    }

    /// One discovery round against the sentinel behind `cmd`.
    async fn discover(
        &self,
        cmd: &mut ControlConn,
    ) -> Result<(SocketAddr, Vec<SocketAddr>), SentinelError> {
        let sentinel = cmd.addr();
        let name = self.cfg.master_name.as_bytes();
        let reply = cmd
            .command(&[b"SENTINEL", b"get-master-addr-by-name", name])
            .await?;
        let master = match &reply {
            Value::Null => {
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
            let mut c = ControlConn::connect(addr, &self.cfg.backend_conn).await?;
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
                // Expected while a dead master is being failed over (asked again every
                // 100 ms meanwhile): not worth a warning each time.
                debug!(%addr, error = %e, "cannot reach the master sentinel named; trusting the sentinel");
                Ok(())
            }
        }
    }

    async fn watch_sentinel_inner(
        &self,
        addr: SocketAddr,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, SentinelError> {
        // Subscribe before discovering, so no switch can fall between the two.
        let mut sub = ControlConn::connect(addr, &self.cfg.sentinel_conn).await?;
        let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        args.extend(CHANNELS);
        sub.send(&args).await?;
        let mut cmd = ControlConn::connect(addr, &self.cfg.sentinel_conn).await?;
        let (master, replicas) = self.discover(&mut cmd).await?;
        // Followed from now on: named before the view it gave is published.
        self.set_current(Some(addr));
        self.apply(master, replicas);
        backoff.reset();
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
}

impl Follower for SentinelInner {
    type Error = SentinelError;

    fn what(&self) -> String {
        format!("sentinels of {}", self.cfg.master_name)
    }

    /// Follows the sentinel of this round (rotating through the configured ones) until it
    /// fails: its events, a re-poll every `poll_interval`, and a re-poll on demand.
    async fn follow(&self, round: u64, backoff: &mut Backoff) -> SentinelError {
        let n = self.cfg.sentinels.len();
        if n == 0 {
            return SentinelError::NoSentinels {
                master_name: self.cfg.master_name.clone(),
            };
        }
        let addr = self.cfg.sentinels[(round % n as u64) as usize];
        let err = match self.watch_sentinel_inner(addr, backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        };
        self.set_current(None);
        err
    }
}

/// A master/replica group behind Redis Sentinel as a [`Topology`]. A background task keeps
/// the view current; dropping the `Sentinel` stops it.
pub struct Sentinel {
    inner: Arc<SentinelInner>,
    follower: Option<AbortOnDropHandle<()>>,
}

impl Sentinel {
    /// Starts following the sentinels and returns at once; `pick` answers
    /// [`TopologyError::NoMaster`] until a master is known (see [`super::wait_ready`]). Must
    /// be called inside a tokio runtime.
    pub fn spawn(cfg: SentinelConfig) -> Self {
        let mut s = Self::fixed(cfg);
        s.follower = Some(follow::spawn(
            s.inner.clone(),
            Duration::from_millis(50),
            Duration::from_secs(5),
        ));
        s
    }

    /// A topology that follows no sentinel: its view is what [`Sentinel::set_view`] says
    /// (tests and tools).
    pub fn fixed(cfg: SentinelConfig) -> Self {
        let inner = Arc::new(SentinelInner {
            cfg,
            state: watch::channel(SentinelState::default()).0,
            repoll: Notify::new(),
            rr: AtomicUsize::new(0),
            current: Mutex::new(None),
            generation: watch::channel(0).0,
            failed_at: Mutex::new(None),
        });
        Self {
            inner,
            follower: None,
        }
    }

    /// Publishes a view as if a sentinel had told it (a new generation when it changed).
    pub fn set_view(&self, master: SocketAddr, replicas: Vec<SocketAddr>) {
        self.inner.apply(master, replicas);
    }

    /// The current view.
    pub fn state(&self) -> SentinelState {
        self.inner.state.borrow().clone()
    }

    /// The sentinel currently followed, if any.
    pub fn current_sentinel(&self) -> Option<SocketAddr> {
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change of master or replicas, with the whole view.
    pub fn subscribe(&self) -> watch::Receiver<SentinelState> {
        self.inner.state.subscribe()
    }
}

impl Topology for Sentinel {
    fn kind(&self) -> TopologyKind {
        TopologyKind::Sentinel
    }

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

    /// Re-polls the sentinel now (a connect failure, or a `-READONLY` from the node believed
    /// to be master).
    fn node_failed(&self, addr: SocketAddr) {
        debug!(node = %addr, "sentinel-managed node failed, re-polling");
        if self.inner.state.borrow().master == Some(addr) {
            self.inner
                .failed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(tokio::time::Instant::now);
        }
        self.inner.repoll.notify_one();
    }

    fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn is_ready(&self) -> bool {
        self.inner.state.borrow().master.is_some()
    }

    fn nodes(&self) -> Vec<SocketAddr> {
        let s = self.inner.state.borrow();
        let mut out: Vec<SocketAddr> = s.master.into_iter().collect();
        if self.inner.cfg.read_from_replicas {
            out.extend(s.replicas.iter().copied());
        }
        out
    }

    fn masters(&self) -> Vec<SocketAddr> {
        self.inner.state.borrow().master.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::addr;
    use bytes::Bytes;

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
        assert_eq!(
            e("+sdown", "master mymaster 127.0.0.1 6379"),
            Some(Event::Repoll)
        );
        assert_eq!(
            e("+odown", "master mymaster 127.0.0.1 6379 #quorum 2/2"),
            Some(Event::Repoll)
        );
        assert_eq!(e("+odown", "master other 127.0.0.1 6379 #quorum 2/2"), None);
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
        Sentinel::fixed(cfg)
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
