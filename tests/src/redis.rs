//! A real `redis-server` bound to a test address, killed on drop.
//!
//! Started with persistence off (`--save '' --appendonly no`) and protected mode off (pods reach
//! it from other network namespaces), in a cgroup the harness owns (so a killed test run's
//! server is reaped with that cgroup). Ready means PING answers PONG, not "the process started".

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::resp::{self, Reply};
use crate::{tail, wait_until};

/// A running redis-server.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl RedisServer {
    /// Starts redis-server on `addr` in `cgroup`, logging to `<dir>/redis-<port>.log`, and waits
    /// until it answers PING.
    pub fn start(addr: SocketAddr, cgroup: &Path, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("redis-{}.log", addr.port()));
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
            ])
            .args(["--maxclients", "10000"])
            .arg("--logfile")
            .arg(&log)
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        crate::pod::enter_cgroup_with_nofile(&mut cmd, cgroup, 65536);
        let child = cmd.spawn().context(
            "starting redis-server (is redis-server installed? run `cargo xtask setup`)",
        )?;
        let mut server = Self { child, addr, log };
        let started = wait_until(
            &format!("redis-server on {addr} to answer PING"),
            Duration::from_secs(15),
            || {
                if let Some(st) = server.child.try_wait()? {
                    bail!(
                        "redis-server exited ({st}); its log:\n{}",
                        tail(&server.log, 20)
                    );
                }
                match server.command(&[b"PING"]) {
                    Ok(Reply::Simple(s)) if s == "PONG" => Ok(Some(())),
                    _ => Ok(None),
                }
            },
        );
        started?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command over a fresh direct connection from the test process (which is not in
    /// any attached cgroup, so it is never captured) and returns the reply.
    pub fn command(&self, args: &[&[u8]]) -> Result<Reply> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to redis at {}", self.addr))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&resp::encode(args))?;
        let mut r = BufReader::new(s);
        Ok(resp::read_reply(&mut r)?)
    }

    /// `CLIENT LIST` parsed into one map per client.
    pub fn client_list(&self) -> Result<Vec<std::collections::BTreeMap<String, String>>> {
        match self.command(&[b"CLIENT", b"LIST"])? {
            Reply::Bulk(Some(b)) => Ok(resp::parse_client_list(&String::from_utf8_lossy(&b))),
            other => bail!("unexpected CLIENT LIST reply {other:?}"),
        }
    }

    /// The server's log path.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
