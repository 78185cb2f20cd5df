//! The session target: the proxy in process (an endpoint on a real redis-server that the
//! target starts on 127.0.0.1, its listener and accept loop, every part real), one client
//! connection per input. The input is sent in chunks up to where the proxy's own decoder sees
//! a protocol error (or whole), then the client half-closes and reads to the end.
//!
//! Checked: nothing panics (a panic in a session task aborts the process, see the target);
//! the proxy answers RESP; a protocol error is the last reply (with the decoder's message) and
//! then the connection closes; when every command has exactly one reply the count matches and
//! the connection closes; the session is gone afterwards (the proxy's open-connection count is
//! back to its baseline); a bystander connection's SET/GET round trips stay exact.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use datamesh_proxy::accounting::{PodRegistry, PolicySource};
use datamesh_proxy::attribution::NodeLocal;
use datamesh_proxy::config::{Backend, EndpointSpec, SessionSettings};
use datamesh_proxy::endpoint::{EndpointHandle, EndpointRuntime};
use datamesh_proxy::listener::{self, Listener, Shared};
use datamesh_proxy::metrics::ProxyMetrics;
use datamesh_proxy::resp::{CommandDecoder, Limits, Reply, ReplyDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::lists::{DENIED, IRREGULAR};

struct World {
    rt: Runtime,
    proxy: SocketAddr,
    shared: Arc<Shared>,
    limits: Limits,
    bystander: Mutex<(std::net::TcpStream, u64)>,
    _redis: Child,
    _listener: Listener,
    _stop: watch::Sender<bool>,
    _endpoint: Arc<EndpointRuntime>,
}

fn start_redis() -> (Child, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe; the server dies with the fuzzer
    // (libFuzzer exits without running destructors).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .expect("redis-server (apt-get install redis-server) must be on PATH");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let (redis, backend) = start_redis();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let _guard = rt.enter();
        let metrics = ProxyMetrics::default();
        let spec = EndpointSpec {
            name: "fuzz".into(),
            backend: Backend::standalone(backend),
        };
        let endpoint = EndpointRuntime::build(&spec, 0, &metrics);
        let settings = SessionSettings::default();
        let limits = settings.limits;
        let shared = Arc::new(Shared::new(
            Arc::new(NodeLocal),
            Arc::new(metrics),
            Arc::new(PodRegistry::new(None, PolicySource::default())),
            settings,
        ));
        let bound = listener::bind("fuzz", ([127, 0, 0, 1], 0).into(), 0).expect("bind");
        let (stop, stop_rx) = watch::channel(false);
        let l = listener::spawn(
            bound,
            Arc::new(EndpointHandle::new(endpoint.clone())),
            shared.clone(),
            stop_rx,
        );
        let proxy = l.local;
        let by = std::net::TcpStream::connect(proxy).expect("bystander connects");
        by.set_nodelay(true).expect("nodelay");
        by.set_nonblocking(true).expect("nonblocking");
        World {
            rt,
            proxy,
            shared,
            limits,
            bystander: Mutex::new((by, 0)),
            _redis: redis,
            _listener: l,
            _stop: stop,
            _endpoint: endpoint,
        }
    })
}

fn name(args: &[Bytes]) -> String {
    String::from_utf8_lossy(args.first().map(|a| &a[..]).unwrap_or(b"")).to_ascii_uppercase()
}

/// Decodes `bytes` as the session does: (commands, protocol error message).
fn decode_all(bytes: &[u8], limits: &Limits) -> (Vec<Vec<Bytes>>, Option<String>) {
    let mut buf = BytesMut::from(bytes);
    let mut dec = CommandDecoder::default();
    let mut cmds = Vec::new();
    loop {
        match dec.decode(&mut buf, limits) {
            Ok(Some(c)) => cmds.push(c.args),
            Ok(None) => return (cmds, None),
            Err(e) => return (cmds, Some(format!("ERR Protocol error: {e}"))),
        }
    }
}

/// The shortest prefix of `bytes` in which the decoder sees the error (all of it if none).
fn error_prefix(bytes: &[u8], limits: &Limits) -> usize {
    if decode_all(bytes, limits).1.is_none() {
        return bytes.len();
    }
    let (mut lo, mut hi) = (0, bytes.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if decode_all(&bytes[..mid], limits).1.is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// Reads what the proxy sends until it closes (true) or stays silent for `quiet` (false).
async fn read_all(s: &mut TcpStream, quiet: Duration) -> (Vec<u8>, bool) {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) => return (raw, true),
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            // A reset: the proxy closed with input it did not read.
            Ok(Err(_)) => return (raw, true),
            Err(_) => return (raw, false),
        }
    }
}

fn frames(raw: &[u8]) -> (Vec<Reply>, usize) {
    let mut buf = BytesMut::from(raw);
    let mut dec = ReplyDecoder::default();
    let mut out = Vec::new();
    loop {
        match dec.decode(&mut buf, &Limits::backend()) {
            Ok(Some(r)) => out.push(r),
            Ok(None) => return (out, buf.len()),
            Err(e) => panic!(
                "the proxy sent bytes that are not RESP ({e}) after {:?}",
                out.iter()
                    .map(|r| String::from_utf8_lossy(&r.raw).into_owned())
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// A SET/GET round trip on the bystander connection, checked byte for byte.
fn bystander_round_trip(w: &World, data: &[u8]) {
    let mut by = w.bystander.lock().unwrap_or_else(|p| p.into_inner());
    by.1 += 1;
    let value = format!("v{}-{}", by.1, data.len());
    let cmd = format!(
        "*3\r\n$3\r\nSET\r\n$9\r\nbystander\r\n${}\r\n{value}\r\n*2\r\n$3\r\nGET\r\n$9\r\nbystander\r\n",
        value.len()
    );
    let want = format!("+OK\r\n${}\r\n{value}\r\n", value.len());
    let sock = by.0.try_clone().expect("clone the bystander socket");
    w.rt.block_on(async {
        let mut s = TcpStream::from_std(sock).expect("bystander socket");
        s.write_all(cmd.as_bytes()).await.expect("bystander write");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < want.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the bystander got no reply within 5 s")
                .expect("bystander read");
            assert!(n > 0, "the proxy closed the bystander's connection");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            want,
            "the bystander got a wrong reply"
        );
        // Back to a std socket for the next round (the tokio one would close it on drop).
        s.into_std()
            .expect("back to std")
            .set_nonblocking(true)
            .expect("nonblocking");
    });
}

pub fn check_session(data: &[u8]) {
    let w = world();
    let (cmds, _) = decode_all(data, &w.limits);
    if cmds.iter().any(|c| {
        let n = name(c);
        DENIED.contains(&n.as_str()) || n == "CLIENT"
    }) {
        return;
    }
    let sent = error_prefix(data, &w.limits);
    let data = &data[..sent];
    let (cmds, error) = decode_all(data, &w.limits);
    let error = error.map(|e| e.replace(['\r', '\n'], " "));
    let regular = cmds.iter().all(|c| !IRREGULAR.contains(&name(c).as_str()));
    let baseline = 1; // the bystander
    w.rt.block_on(async {
        let mut s = TcpStream::connect(w.proxy)
            .await
            .expect("connect to the proxy");
        s.set_nodelay(true).expect("nodelay");
        // In chunks (cut points from the input itself), so frames span reads.
        let mut seed = data
            .iter()
            .fold(0x9e37_79b9u64, |h, b| h.rotate_left(5) ^ u64::from(*b))
            | 1;
        let mut at = 0;
        while at < data.len() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = ((seed % 97) as usize + 1).min(data.len() - at);
            if s.write_all(&data[at..at + n]).await.is_err() {
                break;
            }
            at += n;
            tokio::task::yield_now().await;
        }
        let _ = s.shutdown().await;
        let quiet = Duration::from_secs(if regular { 3 } else { 1 });
        let (raw, closed) = read_all(&mut s, quiet).await;
        let (got, partial) = frames(&raw);
        let text = |f: &[Reply]| -> Vec<String> {
            f.iter()
                .map(|r| String::from_utf8_lossy(&r.raw).into_owned())
                .collect()
        };
        if closed {
            assert_eq!(
                partial,
                0,
                "the proxy closed in the middle of a reply: {:?}",
                text(&got)
            );
        }
        for (i, f) in got.iter().enumerate() {
            if f.error_text().starts_with(b"ERR Protocol error") {
                assert!(
                    error.is_some(),
                    "a protocol error for input the decoder accepts"
                );
                assert_eq!(
                    i + 1,
                    got.len(),
                    "replies after a protocol error: {:?}",
                    text(&got)
                );
            }
        }
        if regular {
            assert!(
                closed,
                "no close within 3 s after the client half-closed: {:?}",
                text(&got)
            );
            let want = cmds.len() + usize::from(error.is_some());
            assert_eq!(got.len(), want, "reply count: {:?}", text(&got));
            if let Some(msg) = &error {
                let last = got.last().map(|f| f.raw.clone()).unwrap_or_default();
                assert_eq!(
                    String::from_utf8_lossy(&last),
                    format!("-{msg}\r\n"),
                    "the last reply is not the protocol error"
                );
            }
        }
        drop(s);
        // The session is gone (its backend connections released with it).
        let deadline = Instant::now() + Duration::from_secs(3);
        while w.shared.open_connections() > baseline {
            assert!(
                Instant::now() < deadline,
                "the session is still open 3 s after its client closed (a leaked session): {} open",
                w.shared.open_connections()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    if data.len().is_multiple_of(4) {
        bystander_round_trip(w, data);
    }
}
