//! Listeners: one per endpoint, bound where the agent says (the node proxy address and the
//! endpoint's port), an accept loop per listener, one task per client connection, and the
//! count of open connections that a drain waits on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::attribution::{ConnEvent, Identity};
use crate::endpoint::EndpointHandle;
use crate::metrics::{ConnLabels, EndpointLabels, ReasonLabels};
use crate::ratelog::RateLimited;
use crate::session::Session;
pub use crate::shared::Shared;
use crate::stopped;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("endpoint {endpoint}: cannot listen on {addr}: {source}: is {addr} an address of this node (proxy_address / DATAMESH_PROXY_ADDRESS), or is the port taken?")]
    Bind {
        endpoint: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// One open client connection's bookkeeping, undone on drop (also when its task is
/// cancelled): the open count, the open gauge, and the attribution's `Closed` event.
struct ConnGuard<'a> {
    shared: &'a Shared,
    who: Identity,
    labels: EndpointLabels,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.shared.metrics.open.get_or_create(&self.labels).dec();
        self.shared.attribution.event(&self.who, ConnEvent::Closed);
        self.shared.closed();
    }
}

const EMFILE: i32 = nix::libc::EMFILE;
const ENFILE: i32 = nix::libc::ENFILE;

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// A bound listener for one endpoint.
pub struct Bound {
    pub endpoint: String,
    pub id: u32,
    pub listener: TcpListener,
    pub local: SocketAddr,
}

/// Binds endpoint `endpoint`'s listener on `addr` (port 0 = ephemeral). `id` is the agent's
/// number for it (its index in the data plane's endpoints map).
pub fn bind(endpoint: &str, addr: SocketAddr, id: u32) -> Result<Bound, ListenError> {
    let err = |source| ListenError::Bind {
        endpoint: endpoint.to_string(),
        addr,
        source,
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    // A restarted agent must rebind its fixed port while old connections sit in TIME_WAIT.
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    let listener = sock.listen(4096).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    info!(endpoint, proxy = %local, "proxy listening");
    Ok(Bound {
        endpoint: endpoint.to_string(),
        id,
        listener,
        local,
    })
}

/// A running listener.
pub struct Listener {
    pub handle: Arc<EndpointHandle>,
    pub id: u32,
    pub local: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Stops accepting (open connections stay). The accept loop ends and drops its
    /// `TcpListener`: this process's descriptor only, never a `shutdown`, so a socket the
    /// supervisor passed down stays open and listening there (connects wait in its backlog
    /// for the next worker).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the accept loop of `b`; it stops when `shutdown` or its own stop turns true.
pub fn spawn(
    b: Bound,
    handle: Arc<EndpointHandle>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Listener {
    let (stop_tx, mut own_stop) = watch::channel(false);
    let mut shutdown = shutdown;
    let h = handle.clone();
    let local = b.local;
    // The local cache's tracker lives as long as the accept loop (aborted with it; aborting
    // flushes the cache).
    let tracker = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(crate::localcache::track(
        handle.clone(),
        shared.clone(),
    )));
    let task = tokio::spawn(async move {
        let _tracker = tracker;
        let name = h.name.clone();
        // One descriptor kept in reserve: when the process is out of descriptors, it is
        // given up to accept the waiting connection and tell it why it is closed, instead of
        // leaving it in the backlog while accept fails in a loop.
        let mut spare = open_spare();
        let accept_log = RateLimited::new(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => break,
                _ = stopped(&mut own_stop) => break,
                res = b.listener.accept() => match res {
                    Ok((sock, peer)) => {
                        let conn = serve(shared.clone(), h.clone(), sock, peer);
                        // The per-connection span only when debug logs are on: entering and
                        // leaving it on every poll of the session measured ~2.5% of the
                        // proxy's CPU at pipeline depth 1. The events name the peer anyway.
                        if tracing::enabled!(tracing::Level::DEBUG) {
                            let span = info_span!("conn", endpoint = %name, %peer);
                            tokio::spawn(conn.instrument(span));
                        } else {
                            tokio::spawn(conn);
                        }
                    }
                    Err(e) => {
                        let out_of_fds = matches!(e.raw_os_error(), Some(c) if c == EMFILE || c == ENFILE);
                        if out_of_fds && spare.take().is_some() {
                            if let Some(Ok((sock, _))) = b.listener.accept().now_or_never() {
                                let _ = sock.try_write(b"-ERR datamesh proxy: out of file descriptors, try again later\r\n");
                                count_refused(&shared, &name, "fd_exhausted");
                            }
                            spare = open_spare();
                        }
                        if let Some(skipped) = accept_log.check() {
                            warn!(endpoint = %name, error = %e, skipped, open_connections = shared.open_connections(), "accept failed (logged at most every 10 s; skipped = failures since the last line)");
                        }
                        // Back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        debug!(endpoint = %name, "listener closed");
    });
    Listener {
        handle,
        id: b.id,
        local,
        stop: stop_tx,
        task,
    }
}

/// Refuses an accepted connection: counted by `reason`, logged at a bounded rate, one error
/// line (`msg`), then closed. What the client already sent is read and dropped first, bounded
/// in time: a close with unread bytes would reset the connection and could discard the line.
/// Boxed: its state would otherwise sit in every connection's task, served or not.
fn refuse<'a>(
    shared: &'a Shared,
    endpoint: &'a str,
    client: &'a mut TcpStream,
    peer: SocketAddr,
    reason: &'static str,
    msg: &'a str,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        count_refused(shared, endpoint, reason);
        if let Some(skipped) = REFUSED_LOG.check() {
            warn!(endpoint, %peer, reason, skipped, "client connection refused: {msg} (logged at most every 10 s; skipped = refusals since the last line)");
        }
        let line = format!("-{msg}\r\n");
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            client.write_all(line.as_bytes()).await?;
            client.shutdown().await?;
            let mut sink = vec![0u8; 4096];
            while client.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    })
}

fn count_refused(shared: &Shared, endpoint: &str, reason: &str) {
    shared
        .metrics
        .refused
        .get_or_create(&ReasonLabels {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
        })
        .inc();
}

static REFUSED_LOG: std::sync::LazyLock<RateLimited> =
    std::sync::LazyLock::new(|| RateLimited::new(Duration::from_secs(10)));

/// Serves one accepted client connection until it ends.
pub async fn serve(
    shared: Arc<Shared>,
    endpoint: Arc<EndpointHandle>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(endpoint = %endpoint.name, %peer, error = %e, "accepted socket has no local address");
            return;
        }
    };
    shared.opened();
    let who = shared.attribution.identify(&endpoint.name, peer, local);
    if let Some(reason) = &who.refuse {
        // Refused by the attribution (identity policy).
        let msg = format!(
            "ERR datamesh proxy: connection from {} refused: {reason}",
            peer.ip()
        );
        refuse(
            &shared,
            &endpoint.name,
            &mut client,
            peer,
            "uncaptured",
            &msg,
        )
        .await;
        shared.attribution.event(&who, ConnEvent::Closed);
        shared.closed();
        return;
    }
    let labels = EndpointLabels {
        endpoint: endpoint.name.clone(),
    };
    shared
        .metrics
        .connections
        .get_or_create(&ConnLabels {
            endpoint: endpoint.name.clone(),
            captured: who.captured.to_string(),
        })
        .inc();
    shared.metrics.open.get_or_create(&labels).inc();
    let guard = ConnGuard {
        shared: &shared,
        who,
        labels,
    };
    debug!(captured = guard.who.captured, pod = guard.who.pod, pod_name = ?guard.who.pod_name, orig_dst = ?guard.who.orig_dst, "accepted");
    let settings = shared.settings();
    let pod = shared.pod_limits.get(guard.who.pod);
    // The caps: the proxy's (like Redis's maxclients), then the pod's.
    let refused =
        if settings.max_clients != 0 && shared.open_connections() > settings.max_clients as usize {
            Some((
                "max_clients",
                "ERR max number of clients reached".to_string(),
            ))
        } else {
            None
        };
    let slot = if refused.is_none() {
        pod.take_connection()
    } else {
        None
    };
    let refused = refused.or_else(|| {
        slot.is_none().then(|| {
            let (n, _, max, _) = pod.holding();
            (
                "pod_max_connections",
                format!(
                    "ERR datamesh proxy: pod {} has {n} connections open, its max_connections is {max}",
                    pod.name()
                ),
            )
        })
    });
    if let Some((kind, msg)) = refused {
        refuse(&shared, &endpoint.name, &mut client, peer, kind, &msg).await;
        return;
    }
    let _ = client.set_nodelay(true);
    let _ = crate::backend::connect::set_keepalive(&client, settings.tcp_keepalive);
    drop(settings);
    // Boxed: the connection's task then holds a pointer, not a second copy of the session
    // (10,000 idle clients must stay cheap).
    let mut session = Box::new(Session::new(
        shared.clone(),
        endpoint.clone(),
        &guard.who,
        peer,
        local,
        pod,
        slot,
    ));
    let id = session.id();
    session.run(&mut client).await;
    let drained = session.closed_by_drain();
    drop(session);
    if drained {
        linger(&mut client).await;
    }
    debug!(client_id = id, "closed");
    drop(guard);
}

/// After a drain's FIN, how long the socket stays open to read (and drop) what the client
/// still sends.
const LINGER: Duration = Duration::from_millis(250);

/// A drained connection's FIN is out; until the client's own FIN (or [`LINGER`]), whatever it
/// still sends is read and dropped: closing a socket with unread bytes would reset the
/// connection (an RST instead of the clean close) and could discard the last reply still in
/// the send queue. Boxed, like [`refuse`]: its state would otherwise sit in every
/// connection's task.
fn linger(
    client: &mut TcpStream,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = vec![0u8; 4096];
            while client.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    })
}
