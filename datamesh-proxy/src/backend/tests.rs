//! The unit tier of the backend queue: [`Conn`], [`NodePool`](super::NodePool) and
//! [`BackendGroup`] against the scripted peer of [`crate::testing`], with tokio's paused time
//! where a timeout or a backoff is involved.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::conn::Submission;
use super::pool::GroupSettings;
use super::{
    BackendError, BackendGroup, Cause, Conn, ConnectSpec, FlightState, Origin, Phase, PoolKey,
};
use crate::metrics::GroupMetrics;
use crate::resp::Reply;
use crate::testing::{request, until, Fallback, Peer, Script};
use crate::upstream::{Outcome, ReplayClass, Unanswered};

fn key(addr: SocketAddr) -> PoolKey {
    PoolKey {
        addr,
        db: 0,
        proto: 2,
    }
}

/// One shared connection per pool; `warm` idle dedicated ones (0: the peer sees only the
/// connections a test makes).
fn settings(command_timeout: Option<Duration>, warm: u32) -> GroupSettings {
    GroupSettings {
        pool_size: 1,
        max_dedicated: 8,
        warm_dedicated: warm,
        command_timeout,
        health: None,
    }
}

fn group(settings: GroupSettings) -> BackendGroup {
    BackendGroup::new(
        "t".into(),
        ConnectSpec::plain(Duration::from_secs(1)),
        settings,
        GroupMetrics::default(),
    )
}

/// The shared connection of `addr`'s pool in `g`.
fn shared_conn(g: &BackendGroup, addr: SocketAddr) -> Arc<Conn> {
    g.pool(key(addr)).shared(0)
}

async fn replied(rx: oneshot::Receiver<Outcome>) -> Reply {
    match rx.await.expect("every submitted request gets an outcome") {
        Outcome::Replied { reply, .. } => reply,
        Outcome::Unanswered(u) => panic!("expected a reply, got {u:?}"),
    }
}

async fn unanswered(rx: oneshot::Receiver<Outcome>) -> Unanswered {
    match rx.await.expect("every submitted request gets an outcome") {
        Outcome::Unanswered(u) => *u,
        Outcome::Replied { reply, .. } => panic!("expected no reply, got {reply:?}"),
    }
}

// Replies are matched to the commands in order; the queue and the inflight gauge empty.
#[tokio::test]
async fn replies_are_matched_in_order_and_the_queue_empties() {
    let peer = Peer::start(
        Script::new()
            .expect("GET", b"$1\r\na\r\n")
            .expect("GET", b"$1\r\nb\r\n")
            .expect("GET", b"$1\r\nc\r\n"),
    )
    .await;
    let g = group(settings(None, 0));
    let conn = shared_conn(&g, peer.addr());
    let rxs: Vec<_> = (1..=3)
        .zip(["a", "b", "c"])
        .map(|(seq, k)| conn.submit(request(&["GET", k], ReplayClass::ReadOnly, seq), true))
        .collect();
    let queued: Vec<_> = conn.snapshot().iter().map(|e| (e.seq, e.state)).collect();
    assert_eq!(
        queued,
        [
            (1, FlightState::Queued),
            (2, FlightState::Queued),
            (3, FlightState::Queued)
        ]
    );
    assert_eq!(g.metrics.inflight.get(), 3);
    let mut got = Vec::new();
    for rx in rxs {
        got.push(replied(rx).await.raw);
    }
    assert_eq!(
        got,
        [
            &b"$1\r\na\r\n"[..],
            &b"$1\r\nb\r\n"[..],
            &b"$1\r\nc\r\n"[..]
        ]
    );
    assert!(conn.snapshot().is_empty(), "{:?}", conn.snapshot());
    assert_eq!(g.metrics.inflight.get(), 0);
    assert_eq!(peer.commands(), ["GET a", "GET b", "GET c"]);
}

// Commands submitted by many tasks in one runtime tick go out in one write (the writer yields
// once before it drains the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn commands_of_one_tick_share_one_write() {
    let peer = Peer::start(Script::new().otherwise(Fallback::Counter)).await;
    let g = group(settings(None, 0));
    let conn = shared_conn(&g, peer.addr());
    // Connected first, so the batch below is not just "what queued up while connecting".
    let warm =
        replied(conn.submit(request(&["GET", "warm"], ReplayClass::ReadOnly, 0), true)).await;
    assert_eq!(&warm.raw[..], b"+R1\r\n");
    let writes_before = conn.writes.load(Ordering::Relaxed);
    // On the worker (not the test's own thread), so the eight tasks are all queued before any
    // of them runs: they are the sessions "ready in the same tick".
    let c = conn.clone();
    let mut replies = tokio::spawn(async move {
        let tasks: Vec<_> = (1..=8)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    let r = request(&["GET", &format!("k{i}")], ReplayClass::ReadOnly, i);
                    replied(c.submit(r, true)).await
                })
            })
            .collect();
        let mut replies = Vec::new();
        for t in tasks {
            replies.push(String::from_utf8_lossy(&t.await.expect("task").raw).into_owned());
        }
        replies
    })
    .await
    .expect("driver task");
    assert_eq!(conn.writes.load(Ordering::Relaxed) - writes_before, 1);
    // The peer read the handshake, the warm-up GET, then the eight in one read.
    assert_eq!(peer.reads(0).len(), 3, "{:?}", peer.reads(0));
    replies.sort();
    let want: Vec<String> = (2..=9).map(|n| format!("+R{n}\r\n")).collect();
    assert_eq!(replies, want);
}

// A connection lost mid-reply hands every request back whole (bytes, class, order) with
// whether it was written; the next command connects again at once.
#[tokio::test]
async fn a_connection_lost_mid_reply_hands_back_every_request() {
    let peer = Peer::start(
        Script::new()
            .close_mid("GET", b"$5\r\nhel")
            .expect("GET", b"$1\r\nb\r\n"),
    )
    .await;
    let g = group(settings(None, 0));
    let conn = shared_conn(&g, peer.addr());
    let big = "x".repeat(16 << 20);
    let sent = vec![
        request(&["GET", "a"], ReplayClass::ReadOnly, 1),
        request(&["INCR", "n"], ReplayClass::Write, 2),
        // Over the writer's batch size (256 KiB): the batch is cut after it, and 16 MiB
        // cannot be in the socket buffers before the peer closes...
        request(&["SET", "big", &big], ReplayClass::Write, 3),
        // ...so this one is still queued (never written) when the connection dies.
        request(&["GET", "c"], ReplayClass::ReadOnly, 4),
    ];
    let mut batch = Vec::new();
    let mut rxs = Vec::new();
    for r in &sent {
        let (tx, rx) = oneshot::channel();
        batch.push(Submission {
            request: r.clone(),
            reply: tx,
            timed: true,
        });
        rxs.push(rx);
    }
    conn.submit_batch(&mut batch);
    let mut back = Vec::new();
    for rx in rxs {
        back.push(unanswered(rx).await);
    }
    for (u, r) in back.iter().zip(&sent) {
        assert_eq!(u.request, *r, "the request comes back as it was sent");
        assert_eq!(u.addr, peer.addr());
        assert!(
            matches!(u.error, BackendError::Lost { .. }),
            "seq {}: {:?}",
            r.order.seq,
            u.error
        );
    }
    let written: Vec<bool> = back.iter().map(|u| u.written).collect();
    assert_eq!(written, [true, true, true, false]);
    let classes: Vec<ReplayClass> = back.iter().map(|u| u.class()).collect();
    assert_eq!(
        classes,
        [
            ReplayClass::ReadOnly,
            ReplayClass::Write,
            ReplayClass::Write,
            ReplayClass::NeverWritten
        ]
    );
    assert!(conn.snapshot().is_empty());
    assert_eq!(g.metrics.inflight.get(), 0);
    // A live connection that died reconnects at the next command, without a backoff.
    let r = replied(conn.submit(request(&["GET", "b"], ReplayClass::ReadOnly, 5), true)).await;
    assert_eq!(&r.raw[..], b"$1\r\nb\r\n");
    assert_eq!(peer.connections(), 2);
    assert_eq!(peer.commands(), ["GET a", "GET b"]);
}

// A refused connect is "unavailable" (its cause said once); while the connection backs off,
// commands fail at once without a connect; after the backoff it connects again.
#[tokio::test(start_paused = true)]
async fn a_refused_connect_fails_fast_during_the_backoff_then_connects_again() {
    let addr = Peer::refused_addr().await;
    let g = group(settings(None, 0));
    let conn = shared_conn(&g, addr);
    let u = unanswered(conn.submit(request(&["GET", "k"], ReplayClass::ReadOnly, 1), true)).await;
    assert!(!u.written);
    let BackendError::Unavailable {
        cause: Cause::Connect(os),
        ..
    } = &u.error
    else {
        panic!("expected a refused connect, got {:?}", u.error);
    };
    assert!(os.contains("refused"), "{os}");
    let text = u.error.to_string();
    assert_eq!(
        text,
        format!("backend {addr} is unavailable: connect failed: {os}")
    );
    assert_eq!(text.matches("unavailable").count(), 1, "{text}");
    assert_eq!(text.matches("connect failed").count(), 1, "{text}");
    assert_eq!(g.metrics.connects_failed.get(), 1);

    // In backoff: answered before the submit returns, no connect attempted.
    assert!(conn.failing_fast());
    let mut rx = conn.submit(request(&["GET", "k"], ReplayClass::ReadOnly, 2), true);
    match rx.try_recv() {
        Ok(Outcome::Unanswered(u2)) => {
            assert_eq!(u2.error, u.error);
            assert!(!u2.written);
        }
        other => panic!("expected an immediate failure, got {other:?}"),
    }
    assert_eq!(g.metrics.connects_failed.get(), 1);
    let Phase::Down { retry_in_ms, .. } = conn.phase() else {
        panic!("expected Down, got {:?}", conn.phase());
    };
    assert!((50..150).contains(&retry_in_ms), "{retry_in_ms}");

    // The node comes back where it was; once the backoff is over, the next command connects.
    let peer = Peer::start_on(addr, Script::new().expect("GET", b"$1\r\nv\r\n")).await;
    tokio::time::advance(Duration::from_millis(retry_in_ms + 1)).await;
    assert!(!conn.failing_fast());
    let r = replied(conn.submit(request(&["GET", "k"], ReplayClass::ReadOnly, 3), true)).await;
    assert_eq!(&r.raw[..], b"$1\r\nv\r\n");
    assert_eq!(peer.connections(), 1);
    assert_eq!(conn.phase(), Phase::Up);
}

// A reply slower than command_timeout fails the command with Timeout within the timeout plus
// one watchdog tick (a quarter of it).
#[tokio::test(start_paused = true)]
async fn a_reply_slower_than_the_command_timeout_fails_with_timeout() {
    let peer = Peer::start(Script::new().slow("GET", Duration::from_secs(5), b"$1\r\nv\r\n")).await;
    let g = group(settings(Some(Duration::from_millis(100)), 0));
    let conn = shared_conn(&g, peer.addr());
    let t0 = Instant::now();
    let u = unanswered(conn.submit(request(&["GET", "k"], ReplayClass::ReadOnly, 1), true)).await;
    let waited = t0.elapsed();
    assert_eq!(
        u.error,
        BackendError::Lost {
            addr: peer.addr(),
            cause: Cause::Timeout(100)
        }
    );
    assert!(u.written);
    assert!(
        waited >= Duration::from_millis(100) && waited <= Duration::from_millis(125),
        "{waited:?}"
    );
}

// A hung node: once the oldest command is overdue, the connection is failed with every
// command queued behind it (their replies could no longer be matched); the next command
// connects again.
#[tokio::test(start_paused = true)]
async fn a_hung_node_times_out_the_overdue_command_and_everything_behind_it() {
    let peer = Peer::start(Script::new().hang_on("GET").otherwise(Fallback::Ok)).await;
    let g = group(settings(Some(Duration::from_millis(100)), 0));
    let conn = shared_conn(&g, peer.addr());
    let first = conn.submit(request(&["GET", "a"], ReplayClass::ReadOnly, 1), true);
    tokio::time::sleep(Duration::from_millis(60)).await;
    // Its own deadline is 40 ms after the first one's.
    let second = conn.submit(request(&["GET", "b"], ReplayClass::ReadOnly, 2), true);
    let t0 = Instant::now();
    let (u1, u2) = (unanswered(first).await, unanswered(second).await);
    assert!(
        t0.elapsed() <= Duration::from_millis(65),
        "{:?}",
        t0.elapsed()
    );
    let timeout = BackendError::Lost {
        addr: peer.addr(),
        cause: Cause::Timeout(100),
    };
    assert_eq!((u1.error, u1.written), (timeout.clone(), true));
    assert_eq!((u2.error, u2.written), (timeout, true));
    let r = replied(conn.submit(request(&["PING"], ReplayClass::ReadOnly, 3), true)).await;
    assert_eq!(&r.raw[..], b"+OK\r\n");
    assert_eq!(peer.connections(), 2);
}

// A blocking command submitted untimed waits for its reply however long the command timeout.
#[tokio::test(start_paused = true)]
async fn a_blocking_command_submitted_untimed_is_not_timed_out() {
    let peer = Peer::start(Script::new().slow(
        "BLPOP",
        Duration::from_secs(2),
        b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n",
    ))
    .await;
    let g = group(settings(Some(Duration::from_millis(100)), 0));
    let pool = g.pool(key(peer.addr()));
    let d = pool.dedicated().await.expect("a dedicated connection");
    let t0 = Instant::now();
    let r = replied(d.conn.submit(
        request(&["BLPOP", "q", "0"], ReplayClass::Stateful, 1),
        false,
    ))
    .await;
    assert_eq!(&r.raw[..], b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n");
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(d.conn.is_up());
}

// Bytes from the backend while no command waits (a desync) kill the connection; the next
// command gets a new one.
#[tokio::test(start_paused = true)]
async fn unsolicited_bytes_on_an_idle_connection_kill_it() {
    let peer = Peer::start(
        Script::new()
            .reply_then(
                "GET",
                b"$1\r\nv\r\n",
                Duration::from_millis(50),
                b"+surprise\r\n",
            )
            .expect("GET", b"$1\r\nw\r\n"),
    )
    .await;
    let g = group(settings(None, 0));
    let conn = shared_conn(&g, peer.addr());
    let r = replied(conn.submit(request(&["GET", "k"], ReplayClass::ReadOnly, 1), true)).await;
    assert_eq!(&r.raw[..], b"$1\r\nv\r\n");
    assert_eq!(conn.phase(), Phase::Up);
    // Paused time moves past the peer's delay: the unsolicited frame arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    match conn.phase() {
        Phase::Down { error, .. } => assert_eq!(
            error,
            format!(
                "connection to backend {} was lost (a reply arrived that no command was waiting for)",
                peer.addr()
            )
        ),
        other => panic!("expected the connection down, got {other:?}"),
    }
    let r = replied(conn.submit(request(&["GET", "k"], ReplayClass::ReadOnly, 2), true)).await;
    assert_eq!(&r.raw[..], b"$1\r\nw\r\n");
    assert_eq!(peer.connections(), 2);
}

// A dedicated connection to a refused address reports the backend unavailable (never "closed
// by the proxy"), also while the pool tries to keep warm ones.
#[tokio::test]
async fn a_dedicated_connection_to_a_refused_address_is_unavailable() {
    let addr = Peer::refused_addr().await;
    let g = group(settings(None, 2));
    let pool = g.pool(key(addr));
    let err = match pool.dedicated().await {
        Ok(_) => panic!("a dedicated connection to a refused address"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            BackendError::Unavailable {
                cause: Cause::Connect(_),
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("backend {addr} is unavailable: connect failed: ")),
        "{text}"
    );
    assert!(!text.contains("closed by the proxy"), "{text}");
    assert!(err.never_sent());
}

// The pool keeps warm_dedicated idle connections: taking one needs no connect, and the pool
// refills behind it.
#[tokio::test(start_paused = true)]
async fn warm_dedicated_connections_are_taken_without_a_connect_and_refilled() {
    let peer = Peer::start(Script::new().otherwise(Fallback::Counter)).await;
    let g = group(settings(None, 2));
    let pool = g.pool(key(peer.addr()));
    until("two warm dedicated connections", || {
        pool.idle_dedicated() == 2
    })
    .await;
    assert_eq!(peer.connections(), 2);

    let d = pool.dedicated().await.expect("a warm dedicated connection");
    assert!(d.conn.is_dedicated() && d.conn.is_up());
    assert_eq!(
        peer.connections(),
        2,
        "taking a warm connection connects nothing"
    );
    let r = replied(
        d.conn
            .submit(request(&["GET", "k"], ReplayClass::ReadOnly, 1), true),
    )
    .await;
    assert_eq!(&r.raw[..], b"+R1\r\n");

    until("the pool refilled", || pool.idle_dedicated() == 2).await;
    assert_eq!(peer.connections(), 3);
    drop(d);
}

// Error messages name their cause once, and say who is at fault.
#[test]
fn messages_name_the_cause_once() {
    let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let e = BackendError::Unavailable {
        addr,
        cause: Cause::Connect("Connection refused (os error 111)".into()),
    };
    assert_eq!(
        e.to_string(),
        "backend 127.0.0.1:1 is unavailable: connect failed: Connection refused (os error 111)"
    );
    assert!(e.never_sent());
    let lost = BackendError::Lost {
        addr,
        cause: Cause::ClosedByProxy,
    };
    assert_eq!(lost.origin(), Origin::Proxy);
    assert!(!lost.node_failure());
}
