//! Helpers shared by the topology tests: the env and runtime every test runs in, addresses on
//! the instance's service IP, and a raw request/reply exchange framed by the proxy's own
//! reply decoder.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::{Bytes, BytesMut};
use datamesh_proxy::resp::{Limits, ReplyDecoder};
use datamesh_tests::env::run_test;
use datamesh_tests::Env;
use tokio::runtime::Runtime;

/// Runs `body` against a fresh env without an agent (an instance with its own service IP,
/// cgroups and run dir), with a multi-threaded tokio runtime entered: topologies spawn their
/// followers on it, and `rt.block_on` runs the library's async calls. The test thread itself
/// stays synchronous, so the harness's blocking checks never stall a follower. Everything the
/// body created (topologies first, then the runtime, then the servers and the env) is dropped
/// in reverse order, also when it fails.
pub fn topology_test(body: impl FnOnce(&mut Env, &Runtime) -> Result<()>) {
    run_test(Env::builder().agent(false), |env| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("topology-test")
            .enable_all()
            .build()
            .context("building the tokio runtime")?;
        let _enter = rt.enter();
        body(env, &rt)
    });
}

/// The instance's service IP (every server of a test listens there, on its own port).
pub fn service_ip(env: &Env) -> IpAddr {
    IpAddr::V4(env.service_ip())
}

/// `ip:port` where nothing listens (the instance owns `ip`, so nothing else can take the
/// port meanwhile); checked, so a test that relies on a refused connect says so if it is not.
pub fn dead_addr(ip: IpAddr, port: u16) -> Result<SocketAddr> {
    let addr = SocketAddr::new(ip, port);
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(addr),
        Err(e) => bail!("{addr} should refuse connections, but connecting failed with {e}"),
        Ok(_) => bail!("{addr} should refuse connections, but something listens there"),
    }
}

/// Writes `frame` to `addr` on a fresh connection and returns the one complete reply frame,
/// exactly as the server sent it (framed by the proxy's `ReplyDecoder`, as the data path
/// frames backend replies). Fails if more than one frame arrives.
pub fn raw_exchange(addr: SocketAddr, frame: &[u8]) -> Result<Bytes> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(frame)
        .with_context(|| format!("writing to {addr}"))?;
    let mut buf = BytesMut::new();
    let mut dec = ReplyDecoder::default();
    let limits = Limits::backend();
    loop {
        if let Some(reply) = dec
            .decode(&mut buf, &limits)
            .with_context(|| format!("{addr} sent a reply that does not parse"))?
        {
            ensure!(
                buf.is_empty(),
                "{addr} sent {} bytes after the one reply expected",
                buf.len()
            );
            return Ok(reply.raw);
        }
        let mut chunk = [0u8; 4096];
        let n = s
            .read(&mut chunk)
            .with_context(|| format!("reading a reply from {addr}"))?;
        ensure!(n > 0, "{addr} closed the connection before replying");
        buf.extend_from_slice(&chunk[..n]);
    }
}
