//! Zero-error restart and upgrade: the running agent hands its listening sockets to its
//! successor over a Unix socket (`upgrade_socket`) with `SCM_RIGHTS`, the way Envoy's hot restart
//! and Pingora's graceful upgrade do, so the listeners are never closed and no pod connect is
//! refused while one agent replaces another.
//!
//! Protocol (one JSON line each way, newline-terminated):
//! 1. The new agent connects and sends `{"op":"takeover","pid":..,"version":..,"abi":..,
//!    "pin_dir":..}`.
//! 2. The old agent checks the peer (same uid, same pin dir: it is the same node's data plane),
//!    then sends one message whose data is `{"op":"fds","pid":..,"names":[...]}` and whose
//!    `SCM_RIGHTS` carry one listening socket per name, in order (`admin` is the admin
//!    listener, the others are endpoint names). A refusal is `{"op":"refused","why":..}`.
//! 3. The new agent starts its worker on those sockets; once the worker answers its health
//!    check it sends `{"op":"ready"}`. Only then does the old agent stop its heartbeat and
//!    retire its worker (SIGUSR1: stop accepting, close clients at command boundaries, exit).
//!    If the new agent dies or closes the socket before `ready`, the old one carries on as if
//!    nothing happened.
//! 4. The old agent sends `{"op":"done","drained_ms":..}` when its worker has exited, and then
//!    idles until SIGTERM (under Kubernetes its pod is deleted next; exiting by itself would
//!    make the kubelet start it again, which would take the sockets back).

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use serde::{Deserialize, Serialize};
use tracing::info;

/// The name of the admin listener among the handed sockets.
pub const ADMIN: &str = "admin";
/// At most this many sockets are handed over (endpoints + admin).
const MAX_FDS: usize = 1100;
/// How long the successor waits for the running agent's answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the running agent waits for the successor's request, which it sends right after
/// connecting. Short: the supervisor's loop (and its health checks) waits meanwhile, and a
/// successor that connected and died must not get the running worker taken for hung.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Msg {
    Takeover {
        pid: u32,
        version: String,
        abi: u32,
        pin_dir: PathBuf,
    },
    Fds {
        pid: u32,
        version: String,
        abi: u32,
        names: Vec<String>,
    },
    Refused {
        why: String,
    },
    Ready,
    Done {
        drained_ms: u64,
    },
}

fn send_line(s: &mut UnixStream, m: &Msg) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

fn read_line(s: &UnixStream) -> anyhow::Result<Msg> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    // One byte at a time would be exact; a BufReader on a borrowed stream may read past the
    // line, so each side sends nothing after a line until the other has answered.
    r.read_line(&mut line)
        .context("reading from the upgrade socket")?;
    if line.is_empty() {
        bail!("the other agent closed the upgrade socket");
    }
    serde_json::from_str(line.trim()).with_context(|| format!("bad upgrade message {line:?}"))
}

/// The old agent's side: the listening Unix socket successors connect to.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds `path` (mode 0600 in a directory created 0700). A socket file nobody answers on is
    /// a leftover of a killed agent and is replaced.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the upgrade socket {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("upgrade socket nonblocking")?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// A successor that connected, if any (non-blocking).
    pub fn poll(&self) -> Option<UnixStream> {
        match self.listener.accept() {
            Ok((s, _)) => Some(s),
            Err(_) => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A handover in progress on the old side: the successor got the sockets and is starting.
pub struct Outgoing {
    pub stream: UnixStream,
    pub peer_pid: u32,
    pub peer_version: String,
    pub peer_abi: u32,
}

/// Answers a successor: checks it, then sends `socks` (name, fd) with `SCM_RIGHTS`.
pub fn offer(
    mut stream: UnixStream,
    pin_dir: &Path,
    socks: &[(String, RawFd)],
) -> anyhow::Result<Outgoing> {
    stream.set_nonblocking(false).context("upgrade stream")?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let cred = getsockopt(&stream, sockopt::PeerCredentials).context("SO_PEERCRED")?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid() != me {
        let why = format!("peer uid {} is not this agent's uid {me}", cred.uid());
        let _ = send_line(&mut stream, &Msg::Refused { why: why.clone() });
        bail!(why);
    }
    let (pid, version, abi, their_pin) = match read_line(&stream)? {
        Msg::Takeover {
            pid,
            version,
            abi,
            pin_dir,
        } => (pid, version, abi, pin_dir),
        other => bail!("expected a takeover request, got {other:?}"),
    };
    if their_pin != pin_dir {
        let why = format!(
            "this agent runs the data plane pinned at {}, the successor's config names {}: not the same agent (set upgrade_socket per data plane)",
            pin_dir.display(),
            their_pin.display()
        );
        let _ = send_line(&mut stream, &Msg::Refused { why: why.clone() });
        bail!(why);
    }
    if socks.len() > MAX_FDS {
        bail!("{} sockets to hand over, at most {MAX_FDS}", socks.len());
    }
    let header = Msg::Fds {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        abi: datamesh_common::ABI_VERSION,
        names: socks.iter().map(|(n, _)| n.clone()).collect(),
    };
    let mut data = serde_json::to_vec(&header)?;
    data.push(b'\n');
    let fds: Vec<RawFd> = socks.iter().map(|(_, fd)| *fd).collect();
    let iov = [IoSlice::new(&data)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .context("sending the listeners (SCM_RIGHTS)")?;
    if sent != data.len() {
        bail!(
            "short write of the handover header ({sent} of {})",
            data.len()
        );
    }
    info!(successor_pid = pid, successor_version = %version, successor_abi = abi, sockets = socks.len(), "handed the listening sockets to a successor; waiting for it to be ready");
    stream.set_nonblocking(true).context("upgrade stream")?;
    Ok(Outgoing {
        stream,
        peer_pid: pid,
        peer_version: version,
        peer_abi: abi,
    })
}

/// What the successor's `ready` poll saw.
pub enum Poll {
    Waiting,
    Ready,
    /// The successor closed the socket or sent something else: the handover is off.
    Gone(String),
}

impl Outgoing {
    /// Non-blocking check for the successor's `ready`.
    pub fn poll_ready(&mut self) -> Poll {
        let mut buf = [0u8; 256];
        match self.stream.read(&mut buf) {
            Ok(0) => Poll::Gone("the successor closed the upgrade socket".into()),
            Ok(n) => {
                let text = String::from_utf8_lossy(buf.get(..n).unwrap_or_default());
                match serde_json::from_str::<Msg>(text.trim()) {
                    Ok(Msg::Ready) => Poll::Ready,
                    Ok(other) => Poll::Gone(format!("unexpected message {other:?}")),
                    Err(e) => Poll::Gone(format!("bad message {text:?}: {e}")),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Poll::Waiting,
            Err(e) => Poll::Gone(format!("upgrade socket: {e}")),
        }
    }

    /// Tells the successor the old worker has drained (best effort).
    pub fn done(&mut self, drained: Duration) {
        let _ = self.stream.set_nonblocking(false);
        let _ = send_line(
            &mut self.stream,
            &Msg::Done {
                drained_ms: drained.as_millis() as u64,
            },
        );
    }
}

/// The new agent's side: the sockets it received and the stream to confirm on.
pub struct Incoming {
    pub stream: UnixStream,
    pub old_pid: u32,
    pub old_version: String,
    pub old_abi: u32,
    pub socks: Vec<(String, OwnedFd)>,
}

impl Incoming {
    /// Tells the old agent our worker serves: it may retire its own.
    pub fn ready(&mut self) -> std::io::Result<()> {
        send_line(&mut self.stream, &Msg::Ready)
    }
}

/// Asks a running agent at `path` for its sockets. `Ok(None)`: no agent answers there (a fresh
/// start). An agent that answers but refuses is an error: starting beside it would fight it
/// for the same ports and pins.
pub fn request(path: &Path, pin_dir: &Path) -> anyhow::Result<Option<Incoming>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("connecting to the upgrade socket {}", path.display()))
        }
    };
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    send_line(
        &mut stream,
        &Msg::Takeover {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            abi: datamesh_common::ABI_VERSION,
            pin_dir: pin_dir.to_path_buf(),
        },
    )
    .context("sending the takeover request")?;
    let mut data = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut data)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving the listeners (SCM_RIGHTS)")?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().context("control messages")? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel installed these descriptors in this process for us
                // (MSG_CMSG_CLOEXEC); each is owned once here.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    let text = String::from_utf8_lossy(data.get(..n).unwrap_or_default()).into_owned();
    let msg: Msg = serde_json::from_str(text.trim())
        .with_context(|| format!("bad handover header {text:?}"))?;
    match msg {
        Msg::Fds {
            pid,
            version,
            abi,
            names,
        } => {
            if names.len() != fds.len() {
                bail!(
                    "the running agent named {} sockets but passed {}",
                    names.len(),
                    fds.len()
                );
            }
            info!(old_pid = pid, old_version = %version, old_abi = abi, sockets = fds.len(), "took over the listening sockets of the running agent");
            Ok(Some(Incoming {
                stream,
                old_pid: pid,
                old_version: version,
                old_abi: abi,
                socks: names.into_iter().zip(fds).collect(),
            }))
        }
        Msg::Refused { why } => Err(anyhow!(
            "the agent at upgrade socket {} refused the takeover: {why}",
            path.display()
        )),
        other => Err(anyhow!("unexpected handover message {other:?}")),
    }
}

/// The local address of a listening TCP socket (to match a handed socket with the config).
pub fn local_addr(fd: RawFd) -> Option<std::net::SocketAddr> {
    use nix::sys::socket::{getsockname, SockaddrStorage};
    let a: SockaddrStorage = getsockname(fd).ok()?;
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(std::net::SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6()
        .map(|v6| std::net::SocketAddr::V6((*v6).into()))
}

/// `true` when a handed listener bound at `have` serves a config that wants `want` (port 0 in
/// the config: any port).
pub fn addr_matches(have: std::net::SocketAddr, want: std::net::SocketAddr) -> bool {
    have.ip() == want.ip() && (want.port() == 0 || have.port() == want.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_cross_the_upgrade_socket() {
        let dir = std::env::temp_dir().join(format!("dm-handover-{}", std::process::id()));
        let path = dir.join("up.sock");
        let pin = PathBuf::from("/sys/fs/bpf/datamesh-unit");
        let server = Server::bind(&path).expect("bind");
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let want = l.local_addr().expect("addr");
        let socks = vec![("cache".to_string(), l.as_raw_fd())];
        let pin2 = pin.clone();
        let path2 = path.clone();
        let t = std::thread::spawn(move || request(&path2, &pin2));
        let s = loop {
            if let Some(s) = server.poll() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut out = offer(s, &pin, &socks).expect("offer");
        let mut inc = t.join().expect("join").expect("request").expect("some");
        assert_eq!(inc.socks.len(), 1);
        let (name, fd) = &inc.socks[0];
        assert_eq!(name, "cache");
        assert_eq!(local_addr(fd.as_raw_fd()), Some(want));
        inc.ready().expect("ready");
        let mut got = Poll::Waiting;
        for _ in 0..100 {
            got = out.poll_ready();
            if !matches!(got, Poll::Waiting) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(got, Poll::Ready));
        // Another data plane is refused.
        let t = std::thread::spawn(move || request(&path, Path::new("/sys/fs/bpf/other")));
        let s = loop {
            if let Some(s) = server.poll() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(offer(s, &pin, &socks).is_err());
        assert!(t.join().expect("join").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn port_zero_matches_any_port() {
        let a: std::net::SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        assert!(addr_matches(a, "127.0.0.1:0".parse().expect("addr")));
        assert!(addr_matches(a, "127.0.0.1:4000".parse().expect("addr")));
        assert!(!addr_matches(a, "127.0.0.1:4001".parse().expect("addr")));
        assert!(!addr_matches(a, "127.0.0.2:4000".parse().expect("addr")));
    }
}
