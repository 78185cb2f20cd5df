//! The control-plane client: one short-lived connection to a Sentinel or a cluster node for
//! discovery (`SENTINEL get-master-addr-by-name`, `CLUSTER SHARDS`, `ROLE`) and the Sentinel
//! event subscription. It is separate from the data path's pooled connections, so control
//! traffic never queues behind client commands, but it uses the same parts: the marked
//! connect ([`crate::backend::connect`]), the handshake ([`crate::backend::handshake`]), and
//! the reply framer with [`Limits::control`] before a reply is parsed into a [`Value`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::{connect, handshake, Cause, ConnectSpec};
use crate::resp::{encode_command, Limits, ReplyDecoder, Value};

/// How control connections are made: the connect spec (mark, credentials, connect timeout,
/// client name) and a bound on each request/reply exchange.
#[derive(Debug, Clone)]
pub struct ControlSpec {
    pub conn: ConnectSpec,
    pub io_timeout: Duration,
}

impl ControlSpec {
    /// No mark, no credentials, 1 s connect and 2 s exchanges (tests and tools).
    pub fn plain() -> Self {
        Self {
            conn: ConnectSpec::plain(Duration::from_secs(1)),
            io_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{addr}: {cause}: is the node up and reachable, and are the credentials right?")]
    Connect { addr: SocketAddr, cause: Cause },
    #[error("{addr}: {what} timed out after {after:?}")]
    Timeout {
        addr: SocketAddr,
        what: &'static str,
        after: Duration,
    },
    #[error("{addr}: {cause}")]
    Io { addr: SocketAddr, cause: Cause },
    #[error("{addr} sent a frame that does not parse")]
    Unparsable { addr: SocketAddr },
}

/// One control connection.
pub struct ControlConn {
    stream: TcpStream,
    buf: BytesMut,
    dec: ReplyDecoder,
    addr: SocketAddr,
    io_timeout: Duration,
}

impl ControlConn {
    /// Connects (bypass mark set before connect) and runs the control handshake (AUTH when
    /// configured, CLIENT SETNAME).
    pub async fn connect(addr: SocketAddr, spec: &ControlSpec) -> Result<Self, ControlError> {
        let mut stream = connect::connect_marked(addr, spec.conn.mark, spec.conn.connect_timeout)
            .await
            .map_err(|cause| ControlError::Connect { addr, cause })?;
        let steps = handshake::control_steps(&spec.conn);
        let learned = handshake::run(&mut stream, &steps, spec.conn.connect_timeout)
            .await
            .map_err(|cause| ControlError::Connect { addr, cause })?;
        Ok(Self {
            stream,
            buf: learned.leftover,
            dec: ReplyDecoder::default(),
            addr,
            io_timeout: spec.io_timeout,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one command and reads its reply (an error reply is `Ok(Value::Error)`), bounded
    /// by the I/O timeout.
    pub async fn command(&mut self, args: &[&[u8]]) -> Result<Value, ControlError> {
        let after = self.io_timeout;
        let addr = self.addr;
        let exchange = async {
            self.send(args).await?;
            self.read().await
        };
        match tokio::time::timeout(after, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Timeout {
                addr,
                what: "command",
                after,
            }),
        }
    }

    /// Writes one command without reading.
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), ControlError> {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        let addr = self.addr;
        self.stream
            .write_all(&encode_command(&args))
            .await
            .map_err(|e| ControlError::Io {
                addr,
                cause: Cause::Write(e.to_string()),
            })
    }

    /// Reads the next reply, without a timeout (a subscription waits for events).
    /// Cancel-safe: bytes read so far stay buffered, and the framer resumes where it was.
    pub async fn read(&mut self) -> Result<Value, ControlError> {
        let addr = self.addr;
        let limits = Limits::control();
        loop {
            match self.dec.decode(&mut self.buf, &limits) {
                Ok(Some(reply)) => {
                    return Value::parse(&reply.raw).ok_or(ControlError::Unparsable { addr })
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(ControlError::Io {
                        addr,
                        cause: Cause::Protocol(e),
                    })
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(ControlError::Io {
                        addr,
                        cause: Cause::Eof,
                    })
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(ControlError::Io {
                        addr,
                        cause: Cause::Read(e.to_string()),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Peer, Script};

    #[tokio::test]
    async fn commands_auth_and_limits() {
        // AUTH, CLIENT SETNAME, then one command; the reply arrives in two pieces.
        let peer = Peer::start(
            Script::new()
                .expect("AUTH", b"+OK\r\n")
                .expect("CLIENT", b"+OK\r\n")
                .expect_split("PING", b"$4\r\nPONG\r\n", 3),
        )
        .await;
        let mut spec = ControlSpec::plain();
        spec.conn.password = Some("pw".into());
        let mut c = ControlConn::connect(peer.addr(), &spec)
            .await
            .expect("connect");
        assert_eq!(
            c.command(&[b"PING"]).await.expect("reply"),
            Value::Bulk(Bytes::from_static(b"PONG"))
        );
        assert_eq!(
            peer.received(),
            ["AUTH pw", "CLIENT SETNAME datamesh", "PING"]
        );
    }

    #[tokio::test]
    async fn refused_auth_names_the_cause() {
        let peer = Peer::start(Script::new().expect("AUTH", b"-WRONGPASS nope\r\n")).await;
        let mut spec = ControlSpec::plain();
        spec.conn.password = Some("bad".into());
        let err = ControlConn::connect(peer.addr(), &spec)
            .await
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains("WRONGPASS nope"), "{text}");
        assert!(text.contains("username/password"), "{text}");
    }

    #[tokio::test]
    async fn oversized_control_reply_is_an_error() {
        let peer = Peer::start(
            Script::new()
                .expect("CLIENT", b"+OK\r\n")
                .expect("X", b"$999999999999\r\n"),
        )
        .await;
        let mut c = ControlConn::connect(peer.addr(), &ControlSpec::plain())
            .await
            .expect("connect");
        assert!(matches!(
            c.command(&[b"X"]).await,
            Err(ControlError::Io {
                cause: Cause::Protocol(_),
                ..
            })
        ));
    }
}
