//! The proxy: one listener per endpoint on the node proxy address, the identity of every
//! accepted connection (pod and original destination, from `dm_conns`), and forwarding to the
//! endpoint's backend over an upstream socket carrying the bypass mark (so the data plane never
//! captures it). Draining on shutdown waits for open connections up to a deadline.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datamesh_common::{FlowKey, FASTPATH_REDIRECT, FASTPATH_TCP, FASTPATH_UNDECIDED};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::app::stopped;
use crate::config::{fold_v4_mapped, Config, Endpoint};
use crate::dataplane::{flow_key, words_addr, Maps};
use crate::pods::Pods;

/// How many accepted connections `/connections` remembers.
pub const CONN_LOG_LEN: usize = 1024;
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("endpoint {endpoint}: cannot listen on {addr}: {source}: is {addr} an address of this node (proxy_address / DATAMESH_PROXY_ADDRESS), or is the port taken?")]
    Bind {
        endpoint: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub endpoint: String,
    pub captured: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// The proxy's metrics (registered under the `datamesh_` prefix by the admin registry).
#[derive(Default)]
pub struct ProxyMetrics {
    pub connections: Family<ConnLabels, Counter>,
    pub open: Family<EndpointLabels, Gauge>,
    pub backend_errors: Family<EndpointLabels, Counter>,
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "proxy_connections",
            "Accepted proxy connections",
            self.connections.clone(),
        );
        registry.register(
            "proxy_open_connections",
            "Open proxy connections",
            self.open.clone(),
        );
        registry.register(
            "proxy_backend_errors",
            "Backend connect or forwarding failures",
            self.backend_errors.clone(),
        );
    }
}

/// One accepted connection as `/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub id: u64,
    pub peer: String,
    pub local: String,
    pub endpoint: String,
    pub captured: bool,
    pub orig_dst: Option<String>,
    pub netns_cookie: Option<u64>,
    pub pod: Option<String>,
    pub fastpath: &'static str,
    pub closed: bool,
    #[serde(skip)]
    key: FlowKey,
}

fn fastpath_name(state: u32) -> &'static str {
    match state {
        FASTPATH_UNDECIDED => "undecided",
        FASTPATH_REDIRECT => "redirect",
        FASTPATH_TCP => "tcp",
        _ => "undecided",
    }
}

/// The last [`CONN_LOG_LEN`] accepted connections.
#[derive(Default)]
pub struct ConnLog {
    records: Mutex<VecDeque<ConnRecord>>,
    next_id: AtomicU64,
}

impl ConnLog {
    fn push(&self, mut rec: ConnRecord) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        rec.id = id;
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= CONN_LOG_LEN {
            r.pop_front();
        }
        r.push_back(rec);
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ConnRecord)) {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        // Ids are increasing, so the record is found by its distance from the newest.
        if let Some(rec) = r.iter_mut().rev().find(|rec| rec.id == id) {
            f(rec);
        }
    }

    /// A copy of the log, with the fast-path state of open captured connections refreshed.
    pub fn snapshot(&self, maps: &Maps) -> Vec<ConnRecord> {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        for rec in r.iter_mut().filter(|rec| rec.captured && !rec.closed) {
            if let Some(info) = maps.conn_info(&rec.key) {
                rec.fastpath = fastpath_name(info.fastpath);
            }
        }
        r.iter().cloned().collect()
    }
}

/// State shared by the listeners and the connection tasks.
pub struct Shared {
    pub maps: Arc<Maps>,
    pub pods: Arc<Pods>,
    pub log: Arc<ConnLog>,
    pub metrics: Arc<ProxyMetrics>,
    pub bypass_mark: u32,
    open: AtomicUsize,
    idle: Notify,
}

impl Shared {
    pub fn new(
        maps: Arc<Maps>,
        pods: Arc<Pods>,
        log: Arc<ConnLog>,
        metrics: Arc<ProxyMetrics>,
        bypass_mark: u32,
    ) -> Self {
        Self {
            maps,
            pods,
            log,
            metrics,
            bypass_mark,
            open: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, or `timeout` passes. Returns the number still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            let n = self.open_connections();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open_connections();
            }
        }
    }
}

/// Counts a connection as open for as long as it lives (also if its task is cancelled).
struct OpenGuard<'a>(&'a Shared);

impl<'a> OpenGuard<'a> {
    fn new(s: &'a Shared) -> Self {
        s.open.fetch_add(1, Ordering::SeqCst);
        Self(s)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A bound listener for one endpoint.
pub struct Bound {
    pub endpoint: Endpoint,
    pub id: u32,
    pub listener: TcpListener,
    pub local: SocketAddr,
}

/// Binds every endpoint's listener (before the data plane points connects at them).
pub fn bind_all(cfg: &Config) -> Result<Vec<Bound>, ProxyError> {
    let mut out = Vec::new();
    for (i, ep) in cfg.endpoints.iter().enumerate() {
        let addr = cfg.proxy_bind(ep);
        let err = |source| ProxyError::Bind {
            endpoint: ep.name.clone(),
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
        let listener = sock.listen(1024).map_err(err)?;
        let local = listener.local_addr().map_err(err)?;
        info!(endpoint = %ep.name, address = %ep.address, proxy = %local, backend = %ep.backend, "proxy listening");
        out.push(Bound {
            endpoint: ep.clone(),
            id: i as u32,
            listener,
            local,
        });
    }
    Ok(out)
}

/// Starts the accept loop of every listener; they stop accepting when `shutdown` turns true.
pub fn spawn_accept_loops(
    bound: Vec<Bound>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    bound
        .into_iter()
        .map(|b| {
            let shared = shared.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let endpoint = Arc::new(b.endpoint);
                loop {
                    tokio::select! {
                        _ = stopped(&mut shutdown) => break,
                        res = b.listener.accept() => match res {
                            Ok((sock, peer)) => {
                                let shared = shared.clone();
                                let endpoint = endpoint.clone();
                                let span = info_span!("conn", endpoint = %endpoint.name, %peer);
                                tokio::spawn(handle(shared, endpoint, sock, peer).instrument(span));
                            }
                            Err(e) => {
                                // EMFILE and friends: back off instead of spinning.
                                warn!(endpoint = %endpoint.name, error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
                debug!(endpoint = %endpoint.name, "listener closed");
            })
        })
        .collect()
}

async fn connect_backend(backend: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let sock = if backend.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if mark != 0 {
        // Set before connect: connect4/6 skip sockets with this mark, so the proxy never loops.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(std::io::Error::from)?;
    }
    match tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, sock.connect(backend)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "backend connect timed out",
        )),
    }
}

async fn handle(
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let _open = OpenGuard::new(&shared);
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "accepted socket has no local address");
            return;
        }
    };
    let (peer_f, local_f) = (fold_v4_mapped(peer), fold_v4_mapped(local));
    let key = flow_key(peer_f, local_f);
    let info = shared.maps.conn_info(&key);
    let captured = info.is_some();
    let cookie = info.map(|i| i.netns_cookie);
    let pod = cookie.and_then(|c| shared.pods.name_of(c));
    let orig_dst = info.and_then(|i| {
        words_addr(i.orig.family as u32, i.orig.addr)
            .map(|ip| SocketAddr::new(ip, i.orig.port).to_string())
    });
    let id = shared.log.push(ConnRecord {
        id: 0,
        peer: peer_f.to_string(),
        local: local_f.to_string(),
        endpoint: endpoint.name.clone(),
        captured,
        orig_dst: orig_dst.clone(),
        netns_cookie: cookie,
        pod: pod.clone(),
        fastpath: info.map(|i| fastpath_name(i.fastpath)).unwrap_or("none"),
        closed: false,
        key,
    });
    let labels = EndpointLabels {
        endpoint: endpoint.name.clone(),
    };
    shared
        .metrics
        .connections
        .get_or_create(&ConnLabels {
            endpoint: endpoint.name.clone(),
            captured: captured.to_string(),
        })
        .inc();
    shared.metrics.open.get_or_create(&labels).inc();
    if let Some(c) = cookie {
        shared.pods.conn_opened(c);
    }
    debug!(id, captured, ?cookie, ?pod, ?orig_dst, "accepted");
    let _ = client.set_nodelay(true);

    match connect_backend(endpoint.backend, shared.bypass_mark).await {
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((up, down)) => debug!(id, bytes_up = up, bytes_down = down, "closed"),
                // Resets and broken pipes are how clients end connections; not backend errors.
                Err(e) => debug!(id, error = %e, "closed with error"),
            }
        }
        Err(e) => {
            warn!(id, backend = %endpoint.backend, error = %e, "backend connect failed: closing the client");
            shared.metrics.backend_errors.get_or_create(&labels).inc();
            if let Some(c) = cookie {
                shared.pods.error(c);
            }
        }
    }

    let last = if captured {
        shared
            .maps
            .conn_info(&key)
            .map(|i| fastpath_name(i.fastpath))
    } else {
        None
    };
    shared.log.update(id, |r| {
        r.closed = true;
        if let Some(fp) = last {
            r.fastpath = fp;
        }
    });
    shared.metrics.open.get_or_create(&labels).dec();
    if let Some(c) = cookie {
        shared.pods.conn_closed(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> ConnRecord {
        ConnRecord {
            id: 0,
            peer: format!("198.18.3.10:{n}"),
            local: "198.18.3.1:1".into(),
            endpoint: "cache".into(),
            captured: false,
            orig_dst: None,
            netns_cookie: None,
            pod: None,
            fastpath: "none",
            closed: false,
            key: FlowKey::default(),
        }
    }

    #[test]
    fn conn_log_keeps_the_last_1024() {
        let log = ConnLog::default();
        for n in 0..(CONN_LOG_LEN as u64 + 10) {
            log.push(rec(n));
        }
        let r = log.records.lock().expect("lock");
        assert_eq!(r.len(), CONN_LOG_LEN);
        assert_eq!(r.front().map(|x| x.id), Some(11));
        assert_eq!(r.back().map(|x| x.id), Some(CONN_LOG_LEN as u64 + 10));
    }

    #[test]
    fn conn_record_json_shape() {
        let mut r = rec(40000);
        r.id = 1;
        let v = serde_json::to_value(&r).expect("json");
        for k in [
            "id",
            "peer",
            "local",
            "endpoint",
            "captured",
            "orig_dst",
            "netns_cookie",
            "pod",
            "fastpath",
            "closed",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert!(v.get("key").is_none());
        assert_eq!(v["pod"], serde_json::Value::Null);
    }
}
