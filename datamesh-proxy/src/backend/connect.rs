//! The one place the proxy opens a socket to a backend or a control peer (Sentinel, cluster
//! node). Every such socket carries the bypass mark before `connect()`, which is what keeps
//! the data plane's connect hooks from ever capturing the proxy's own connections.
//!
//! Architecture Invariant: no other code creates outbound sockets (`TcpStream::connect` is not
//! used anywhere in the proxy).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use super::Cause;

/// TCP keepalive idle time of backend and control-plane sockets.
pub const BACKEND_KEEPALIVE: Duration = Duration::from_secs(60);

/// Turns TCP keepalive on with `idle` before the first probe, then probes every `idle / 3`
/// (at least 1 s), 3 probes, as Redis's `tcp-keepalive` does. A zero `idle` leaves it off.
pub fn set_keepalive(sock: &impl std::os::fd::AsFd, idle: Duration) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    if idle.is_zero() {
        return Ok(());
    }
    let secs = idle.as_secs().clamp(1, i32::MAX as u64) as u32;
    setsockopt(sock, sockopt::KeepAlive, &true)?;
    setsockopt(sock, sockopt::TcpKeepIdle, &secs)?;
    setsockopt(sock, sockopt::TcpKeepInterval, &(secs / 3).max(1))?;
    setsockopt(sock, sockopt::TcpKeepCount, &3)?;
    Ok(())
}

/// Opens a TCP connection to `addr` with `SO_MARK = mark` (0 = none) set before connect,
/// `TCP_NODELAY` on, within `timeout`.
pub async fn connect_marked(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, Cause> {
    let connect = async {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if mark != 0 {
            // Set before connect: connect4/6 skip sockets with this mark, so the proxy never
            // loops into itself.
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &mark)
                .map_err(std::io::Error::from)?;
        }
        sock.connect(addr).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => {
            // Commands are small and latency-bound; they are batched by the writer instead.
            let _ = stream.set_nodelay(true);
            // A backend that vanished without a FIN (a node gone, a NAT entry dropped) is
            // found by the health checks; keepalive also frees an idle connection's socket.
            let _ = set_keepalive(&stream, BACKEND_KEEPALIVE);
            Ok(stream)
        }
        Ok(Err(e)) => Err(Cause::Connect(e.to_string())),
        Err(_) => Err(Cause::ConnectTimeout(timeout.as_millis() as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_and_ok() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let s = connect_marked(addr, 0, Duration::from_secs(1))
            .await
            .expect("connects");
        assert!(s.nodelay().expect("nodelay"));
        let idle = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::TcpKeepIdle)
            .expect("keepidle");
        assert_eq!(idle, BACKEND_KEEPALIVE.as_secs() as u32);
        drop(l);
        match connect_marked(addr, 0, Duration::from_secs(1)).await {
            Err(Cause::Connect(e)) => assert!(e.contains("refused"), "{e}"),
            other => panic!("expected a refused connect, got {other:?}"),
        }
    }
}
