//! The drain at the session level: an idle client is closed at once, a busy one right after
//! the reply it waits for, one inside MULTI or a blocking command only at the deadline; every
//! close is a clean FIN after the last reply (see `session/drain.rs` and `Shared::drain`).

use std::time::{Duration, Instant};

use super::{start_proxy, Client};
use crate::config::Backend;
use crate::shared::DrainReport;
use crate::testing::{Peer, Script};

/// Starts the drain in the background; its report comes through the handle.
fn drain(p: &super::Proxy, timeout: Duration) -> tokio::task::JoinHandle<DrainReport> {
    let shared = p.shared.clone();
    tokio::spawn(async move { shared.drain(timeout).await })
}

/// Waits for the proxy's clean close and returns how long it took.
async fn closed_after(c: &mut Client, t0: Instant) -> Duration {
    tokio::time::timeout(Duration::from_secs(5), c.closed())
        .await
        .expect("the proxy closes the connection");
    t0.elapsed()
}

#[tokio::test]
async fn an_idle_client_is_closed_at_once() {
    let peer = Peer::start(Script::new()).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["PING"]]).await;
    assert_eq!(c.reply().await, "+PONG\r\n");
    // Quiet for longer than DRAIN_QUIET: idle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let d = drain(&proxy, Duration::from_secs(5));
    let took = closed_after(&mut c, t0).await;
    assert!(took < Duration::from_millis(200), "closed after {took:?}");
    drop(c);
    let r = d.await.expect("drain");
    assert_eq!((r.boundary, r.deadline, r.left), (1, 0, 0), "{r:?}");
}

#[tokio::test]
async fn a_busy_client_is_closed_right_after_its_reply() {
    let peer =
        Peer::start(Script::new().slow("GET", Duration::from_millis(300), b"$1\r\nv\r\n")).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["GET", "k"]]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let d = drain(&proxy, Duration::from_secs(5));
    // The reply it waits for comes first, then the FIN.
    assert_eq!(c.reply().await, "$1\r\nv\r\n");
    let took = closed_after(&mut c, t0).await;
    assert!(took < Duration::from_millis(600), "closed after {took:?}");
    drop(c);
    let r = d.await.expect("drain");
    assert_eq!((r.boundary, r.deadline, r.left), (1, 0, 0), "{r:?}");
}

#[tokio::test]
async fn a_client_just_answered_gets_its_next_command_then_the_close() {
    let peer = Peer::start(Script::new().expect("GET", b"$1\r\nw\r\n")).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["PING"]]).await;
    assert_eq!(c.reply().await, "+PONG\r\n");
    let d = drain(&proxy, Duration::from_secs(5));
    // Its next command, pipelined with another, comes within DRAIN_QUIET: both are answered,
    // then the connection closes.
    tokio::time::sleep(Duration::from_millis(30)).await;
    c.send(&[&["GET", "k"], &["PING", "x"]]).await;
    assert_eq!(c.reply().await, "$1\r\nw\r\n");
    assert_eq!(c.reply().await, "$1\r\nx\r\n");
    closed_after(&mut c, Instant::now()).await;
    drop(c);
    let r = d.await.expect("drain");
    assert_eq!((r.boundary, r.deadline, r.left), (1, 0, 0), "{r:?}");
}

#[tokio::test]
async fn multi_and_blocking_clients_wait_for_the_deadline() {
    let peer = Peer::start(Script::new().hang_on("BLPOP")).await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut idle = Client::connect(&proxy).await;
    let mut multi = Client::connect(&proxy).await;
    multi.send(&[&["MULTI"]]).await;
    assert_eq!(multi.reply().await, "+OK\r\n");
    let mut blocked = Client::connect(&proxy).await;
    blocked.send(&[&["BLPOP", "q", "0"]]).await;
    peer.wait_received(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let d = drain(&proxy, Duration::from_millis(700));
    let took = closed_after(&mut idle, t0).await;
    assert!(
        took < Duration::from_millis(200),
        "idle closed after {took:?}"
    );
    for (name, c) in [("MULTI", &mut multi), ("BLPOP", &mut blocked)] {
        let took = closed_after(c, t0).await;
        assert!(
            took >= Duration::from_millis(650),
            "the {name} client was closed after {took:?}, before the deadline"
        );
    }
    drop((idle, multi, blocked));
    let r = d.await.expect("drain");
    assert_eq!((r.boundary, r.deadline, r.left), (1, 2, 0), "{r:?}");
}

#[tokio::test]
async fn exec_ends_the_transaction_then_the_client_is_closed() {
    let peer = Peer::start(
        Script::new()
            .expect("MULTI", b"+OK\r\n")
            .expect("SET", b"+QUEUED\r\n")
            .expect("EXEC", b"*1\r\n+OK\r\n"),
    )
    .await;
    let proxy = start_proxy(Backend::standalone(peer.addr()));
    let mut c = Client::connect(&proxy).await;
    c.send(&[&["MULTI"]]).await;
    assert_eq!(c.reply().await, "+OK\r\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = drain(&proxy, Duration::from_secs(5));
    // Inside MULTI: not closed, however quiet.
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.send(&[&["SET", "k", "v"], &["EXEC"]]).await;
    assert_eq!(c.reply().await, "+QUEUED\r\n");
    assert_eq!(c.reply().await, "*1\r\n+OK\r\n");
    closed_after(&mut c, Instant::now()).await;
    drop(c);
    let r = d.await.expect("drain");
    assert_eq!((r.boundary, r.deadline, r.left), (1, 0, 0), "{r:?}");
}
