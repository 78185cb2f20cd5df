//! The unit tier of the request path: [`Router`] (redirects, retryable errors, failures and
//! their replay class), [`SharedLane`] batching and [`Call`]s on dedicated connections,
//! against scripted peers ([`crate::testing`]), with paused time where the router waits.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Call, HoldSettings, ReplayClass, Request, Router, SharedLane, Target};
use crate::backend::pool::GroupSettings;
use crate::backend::{BackendGroup, ConnectSpec, HealthSettings, NodeStatus, PoolKey};
use crate::metrics::GroupMetrics;
use crate::resp::Reply;
use crate::testing::{request, Fallback, Peer, Script};
use crate::topology::cluster::{key_slot, Cluster, ClusterConfig, SlotMap};
use crate::topology::sentinel::{Sentinel, SentinelConfig};
use crate::topology::{Standalone, Topology};

const LOADING: &[u8] = b"-LOADING Redis is loading the dataset in memory\r\n";
const READONLY_ERR: &[u8] = b"-READONLY You can't write against a read only replica.\r\n";

/// A group with one shared connection per pool and no warm dedicated ones, so the peers see
/// only the connections the router opens.
fn group() -> Arc<BackendGroup> {
    group_with(None)
}

/// [`group`] with active health checks.
fn group_with(health: Option<HealthSettings>) -> Arc<BackendGroup> {
    Arc::new(BackendGroup::new(
        "t".into(),
        ConnectSpec::plain(Duration::from_secs(1)),
        GroupSettings {
            pool_size: 1,
            max_dedicated: 8,
            warm_dedicated: 0,
            command_timeout: None,
            health,
        },
        GroupMetrics::default(),
    ))
}

/// Holding on: 5 s, 1 MiB.
const HOLD: HoldSettings = HoldSettings {
    hold: Duration::from_secs(5),
    max_bytes: 1 << 20,
    max_client_bytes: 1 << 20,
};

fn standalone(addr: SocketAddr) -> Arc<Router> {
    Router::new(Arc::new(Standalone::new(addr)), group(), HOLD)
}

/// A cluster whose whole slot range is served by `node` (no refresher: MOVED still updates
/// it) and its router.
fn cluster_on(node: SocketAddr) -> (Arc<Cluster>, Arc<Router>) {
    let cluster = Arc::new(Cluster::with_map(
        ClusterConfig::new(vec![]),
        SlotMap::single(node),
    ));
    let router = Router::new(cluster.clone(), group(), HOLD);
    (cluster, router)
}

fn target(slot: Option<u16>, readonly: bool) -> Target {
    Target {
        slot,
        readonly,
        db: 0,
        proto: 2,
    }
}

fn get(key: &str, seq: u64) -> Request {
    request(&["GET", key], ReplayClass::ReadOnly, seq)
}

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.raw).into_owned()
}

// MOVED: the command is resent to the node named, the slot map now says so, and the resend
// is counted.
#[tokio::test]
async fn moved_resends_to_the_new_owner_and_updates_the_slot_map() {
    let b = Peer::start(Script::new().expect("GET", b"$1\r\nb\r\n")).await;
    let slot = key_slot(b"k");
    let moved = format!("-MOVED {slot} {}\r\n", b.addr());
    let a = Peer::start(Script::new().expect("GET", moved.as_bytes())).await;
    let (cluster, router) = cluster_on(a.addr());

    let reply = router
        .call(None, target(Some(slot), true), get("k", 1), 1)
        .await;
    assert_eq!(text(&reply), "$1\r\nb\r\n");
    assert_eq!(a.commands(), ["GET k"]);
    assert_eq!(b.commands(), ["GET k"]);
    assert_eq!(cluster.pick(Some(slot), false), Ok(b.addr()));
    assert_eq!(router.group.metrics.resent.get(), 1);
}

// ASK: the target node gets ASKING and the command back to back (one read), and the slot map
// does not change (ASK is a one-shot detour).
#[tokio::test]
async fn ask_sends_asking_and_the_command_back_to_back_and_keeps_the_map() {
    let b = Peer::start(
        Script::new()
            .expect("ASKING", b"+OK\r\n")
            .expect("GET", b"$1\r\nb\r\n"),
    )
    .await;
    let slot = key_slot(b"k");
    let ask = format!("-ASK {slot} {}\r\n", b.addr());
    let a = Peer::start(Script::new().expect("GET", ask.as_bytes())).await;
    let (cluster, router) = cluster_on(a.addr());

    let reply = router
        .call(None, target(Some(slot), true), get("k", 1), 1)
        .await;
    assert_eq!(text(&reply), "$1\r\nb\r\n");
    assert_eq!(b.commands(), ["ASKING", "GET k"]);
    // The handshake, then ASKING and GET together.
    assert_eq!(b.reads(0).len(), 2, "{:?}", b.reads(0));
    assert_eq!(cluster.pick(Some(slot), false), Ok(a.addr()));
    assert_eq!(cluster.generation(), 0);
    assert_eq!(router.group.metrics.resent.get(), 1);
}

// LOADING twice, then a value: the client gets the value, after the router's backoff waits
// (20 ms, then 40 ms).
#[tokio::test(start_paused = true)]
async fn loading_is_resent_after_the_backoff_until_a_value_comes() {
    let peer = Peer::start(
        Script::new()
            .expect("GET", LOADING)
            .expect("GET", LOADING)
            .expect("GET", b"$1\r\nv\r\n"),
    )
    .await;
    let router = standalone(peer.addr());
    let t0 = Instant::now();
    let reply = router.call(None, target(None, true), get("k", 1), 1).await;
    let waited = t0.elapsed();
    assert_eq!(text(&reply), "$1\r\nv\r\n");
    assert!(
        waited >= Duration::from_millis(60) && waited < Duration::from_millis(70),
        "{waited:?}"
    );
    assert_eq!(peer.commands(), ["GET k", "GET k", "GET k"]);
    assert_eq!(router.group.metrics.resent.get(), 2);
}

// LOADING forever: the command is resent (backoff doubling to 320 ms) until the hold bound,
// then its client gets an error naming the endpoint, the bound and the cause.
#[tokio::test(start_paused = true)]
async fn loading_forever_ends_with_the_hold_bound() {
    let mut script = Script::new();
    for _ in 0..20 {
        script = script.expect("GET", LOADING);
    }
    let peer = Peer::start(script).await;
    let hold = HoldSettings {
        hold: Duration::from_secs(1),
        ..HOLD
    };
    let router = Router::new(Arc::new(Standalone::new(peer.addr())), group(), hold);
    let t0 = Instant::now();
    let reply = router.call(None, target(None, true), get("k", 1), 1).await;
    let waited = t0.elapsed();
    let t = text(&reply);
    assert!(
        t.starts_with("-ERR datamesh proxy: endpoint t: no usable backend node after holding "),
        "{t}"
    );
    assert!(t.contains("(failover_hold_ms): backend "), "{t}");
    assert!(t.contains("answered LOADING"), "{t}");
    // 20+40+80+160+320+320 ms of backoff, then the bound.
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1400),
        "{waited:?}"
    );
    assert_eq!(peer.commands().len(), 7, "{:?}", peer.commands());
}

// READONLY from a standalone backend: nobody can name another master, so it passes through
// at once.
#[tokio::test(start_paused = true)]
async fn readonly_on_a_standalone_backend_passes_through_at_once() {
    let peer = Peer::start(Script::new().expect("SET", READONLY_ERR)).await;
    let router = standalone(peer.addr());
    let t0 = Instant::now();
    let reply = router
        .call(
            None,
            target(None, false),
            request(&["SET", "k", "v"], ReplayClass::Write, 1),
            1,
        )
        .await;
    assert_eq!(&reply.raw[..], READONLY_ERR);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(peer.commands(), ["SET k v"]);
    assert_eq!(router.group.metrics.resent.get(), 0);
}

// READONLY from a Sentinel master that was demoted: the command waits for the new master
// (switched by a test task shortly after) and is resent there.
#[tokio::test(start_paused = true)]
async fn readonly_under_sentinel_is_resent_to_the_new_master() {
    let old = Peer::start(Script::new().expect("SET", READONLY_ERR)).await;
    let new = Peer::start(Script::new().expect("SET", b"+OK\r\n")).await;
    let sentinel = Arc::new(Sentinel::fixed(SentinelConfig::new(vec![], "mymaster")));
    sentinel.set_view(old.addr(), vec![]);
    let router = Router::new(sentinel.clone(), group(), HOLD);

    let s = sentinel.clone();
    let new_addr = new.addr();
    let failover = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.set_view(new_addr, vec![]);
    });
    let t0 = Instant::now();
    let reply = router
        .call(
            None,
            target(None, false),
            request(&["SET", "k", "v"], ReplayClass::Write, 1),
            1,
        )
        .await;
    assert_eq!(text(&reply), "+OK\r\n");
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(50),
        "resent once the view changed"
    );
    assert_eq!(old.commands(), ["SET k v"]);
    assert_eq!(new.commands(), ["SET k v"]);
    assert_eq!(router.group.metrics.resent.get(), 1);
    failover.await.expect("failover task");
}

// A lost connection: a written GET (read-only) is resent on a new connection, a written
// INCR is answered "may have been executed".
#[tokio::test]
async fn a_lost_read_is_resent_and_a_lost_write_is_an_unknown_outcome() {
    let peer = Peer::start(
        Script::new()
            .close_mid("GET", b"$5\r\nhel")
            .expect("GET", b"$2\r\nhi\r\n")
            .close_on("INCR"),
    )
    .await;
    let router = standalone(peer.addr());
    let a = peer.addr();

    let reply = router.call(None, target(None, true), get("k", 1), 1).await;
    assert_eq!(text(&reply), "$2\r\nhi\r\n");
    assert_eq!(router.group.metrics.replay_read_only.get(), 1);
    let reply = router
        .call(
            None,
            target(None, false),
            request(&["INCR", "n"], ReplayClass::Write, 2),
            1,
        )
        .await;
    assert_eq!(
        text(&reply),
        format!(
            "-ERR datamesh proxy: connection to backend {a} was lost (closed by the backend); the command may have been executed\r\n"
        )
    );
    assert_eq!(peer.commands(), ["GET k", "GET k", "INCR n"]);
}

// Holding off: a command that never reached a socket (refused connect) is safe to retry,
// even a write.
#[tokio::test]
async fn a_refused_write_was_never_sent_and_is_safe_to_retry() {
    let addr = Peer::refused_addr().await;
    let router = Router::new(
        Arc::new(Standalone::new(addr)),
        group(),
        HoldSettings::off(),
    );
    let reply = router
        .call(
            None,
            target(None, false),
            request(&["INCR", "n"], ReplayClass::Write, 1),
            1,
        )
        .await;
    let t = text(&reply);
    assert!(
        t.starts_with(&format!(
            "-ERR datamesh proxy: backend {addr} is unavailable: connect failed: "
        )),
        "{t}"
    );
    assert!(t.ends_with(" (safe to retry)\r\n"), "{t}");
}

// A shared lane queues a round of sends and submits them in one batch at flush: the peer
// reads them in one read, after one write.
#[tokio::test]
async fn a_shared_lane_round_is_one_submission() {
    let peer = Peer::start(Script::new().otherwise(Fallback::Counter)).await;
    let router = standalone(peer.addr());
    let mut lane = SharedLane::default();
    let calls: Vec<Call> = (1..=10)
        .map(|i| lane.send(&router, target(None, true), get(&format!("k{i}"), i), 7))
        .collect();
    let conn = router
        .group
        .pool(PoolKey {
            addr: peer.addr(),
            db: 0,
            proto: 2,
        })
        .shared(7);
    assert_eq!(conn.queue_len(), 0, "nothing is submitted before the flush");
    lane.flush();
    assert_eq!(conn.queue_len(), 10);
    let replies: Vec<String> = futures::future::join_all(calls)
        .await
        .iter()
        .map(text)
        .collect();
    let want: Vec<String> = (1..=10).map(|n| format!("+R{n}\r\n")).collect();
    assert_eq!(replies, want);
    assert_eq!(conn.writes.load(Ordering::Relaxed), 1);
    // The handshake, then the whole round.
    assert_eq!(peer.reads(0).len(), 2, "{:?}", peer.reads(0));
}

// On a dedicated connection a MOVED is not resent (a transaction or a blocking command cannot
// move), but the topology still learns the slot's new owner.
#[tokio::test]
async fn moved_on_a_dedicated_connection_is_not_resent_but_updates_the_map() {
    let b = Peer::start(Script::new()).await;
    let slot = key_slot(b"k");
    let moved = format!("-MOVED {slot} {}\r\n", b.addr());
    let a = Peer::start(Script::new().expect("GET", moved.as_bytes())).await;
    let (cluster, router) = cluster_on(a.addr());

    let d = router
        .dedicated(target(Some(slot), true))
        .await
        .expect("a dedicated connection");
    let reply = router.call_on(&d, get("k", 1), true).await;
    assert_eq!(text(&reply), moved, "the client sees the MOVED as it is");
    assert_eq!(b.connections(), 0, "nothing is resent");
    assert_eq!(router.group.metrics.resent.get(), 0);
    assert_eq!(
        cluster.pick(Some(slot), false),
        Ok(b.addr()),
        "the MOVED on a dedicated connection was not reported to the topology"
    );
}

// No master known (Sentinel has not named one yet): the command waits in the hold queue and
// goes out the moment the topology names one.
#[tokio::test(start_paused = true)]
async fn a_command_without_a_master_is_held_until_one_is_named() {
    let peer = Peer::start(Script::new().expect("GET", b"$1\r\nv\r\n")).await;
    let sentinel = Arc::new(Sentinel::fixed(SentinelConfig::new(vec![], "mymaster")));
    let router = Router::new(sentinel.clone(), group(), HOLD);
    let s = sentinel.clone();
    let a = peer.addr();
    let named = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.set_view(a, vec![]);
    });
    let t0 = Instant::now();
    let mut lane = SharedLane::default();
    let call = lane.send(&router, target(None, true), get("k", 1), 1);
    lane.flush();
    assert_eq!(router.holder.snapshot().depth, 1);
    assert_eq!(text(&call.await), "$1\r\nv\r\n");
    assert_eq!(t0.elapsed(), Duration::from_millis(300));
    assert_eq!(router.group.metrics.held.get(), 1);
    assert_eq!(router.group.metrics.hold_sent.get(), 1);
    named.await.expect("naming task");
}

// Per-client order across a hold: while a client has a held command, its later commands
// queue behind it, even when they could go at once.
#[tokio::test(start_paused = true)]
async fn a_clients_later_commands_wait_behind_its_held_ones() {
    let peer = Peer::start(Script::new().otherwise(Fallback::Counter)).await;
    let sentinel = Arc::new(Sentinel::fixed(SentinelConfig::new(vec![], "mymaster")));
    let router = Router::new(sentinel.clone(), group(), HOLD);
    let gate = crate::request::ClientGate::new(Default::default());
    let with_gate = |mut r: Request| {
        r.gate = Some(gate.clone());
        r
    };
    let mut lane = SharedLane::default();
    let first = lane.send(&router, target(None, true), with_gate(get("a", 1)), 1);
    lane.flush();
    sentinel.set_view(peer.addr(), vec![]);
    // The master is known now, but the client's first command is still in the queue (the
    // drain task has not run): the second goes behind it.
    let second = lane.send(&router, target(None, true), with_gate(get("b", 2)), 1);
    lane.flush();
    let (r1, r2) = tokio::join!(first, second);
    assert_eq!((text(&r1), text(&r2)), ("+R1\r\n".into(), "+R2\r\n".into()));
    assert_eq!(peer.commands(), ["GET a", "GET b"]);
    assert_eq!(gate.held(), 0);
}

// A hung node (SIGSTOP): the health check finds it down within its timeout, commands for it
// are held meanwhile, and they go out once it answers PING again.
#[tokio::test]
async fn a_hung_node_is_found_by_the_health_check_and_its_commands_wait_for_it() {
    let peer = Peer::start(Script::new().otherwise(Fallback::Counter)).await;
    let g = group_with(Some(HealthSettings {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(150),
    }));
    let router = Router::new(Arc::new(Standalone::new(peer.addr())), g, HOLD);
    let r = router.call(None, target(None, true), get("a", 1), 1).await;
    assert_eq!(text(&r), "+R1\r\n");
    let node = router.group.health.get(peer.addr()).expect("tracked");
    assert_eq!(node.status(), NodeStatus::Up);

    peer.pause(true);
    let t0 = Instant::now();
    while node.status() != NodeStatus::Down {
        assert!(t0.elapsed() < Duration::from_secs(2), "never found down");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    let r2 = router.clone();
    let call = tokio::spawn(async move { r2.call(None, target(None, true), get("b", 2), 1).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        router.holder.snapshot().depth,
        1,
        "held while the node is down"
    );
    peer.pause(false);
    let r = call.await.expect("call task");
    assert_eq!(text(&r), "+R2\r\n");
    assert!(node.status().usable());
    assert_eq!(peer.commands(), ["GET a", "GET b"]);
}

// A read for a replica that is down goes to the master instead (read_from_replicas): the
// replica's refused connect marks it down, and the held read is sent to the master.
#[tokio::test]
async fn a_read_for_a_dead_replica_goes_to_the_master() {
    let master = Peer::start(Script::new().expect("GET", b"$1\r\nm\r\n")).await;
    let replica = Peer::refused_addr().await;
    let mut cfg = SentinelConfig::new(vec![], "mymaster");
    cfg.read_from_replicas = true;
    let sentinel = Arc::new(Sentinel::fixed(cfg));
    sentinel.set_view(master.addr(), vec![replica]);
    let router = Router::new(sentinel, group_with(Some(HealthSettings::default())), HOLD);
    let reply = router.call(None, target(None, true), get("k", 1), 1).await;
    assert_eq!(text(&reply), "$1\r\nm\r\n");
    assert_eq!(master.commands(), ["GET k"]);
    let health = router.group.health.get(replica).expect("tracked");
    assert_eq!(health.status(), NodeStatus::Down);
    assert_eq!(router.group.metrics.replay_never_written.get(), 1);
}
