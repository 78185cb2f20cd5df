//! A real `redis-server` bound to a test address, killed on drop.
//!
//! Started with persistence off (`--save '' --appendonly no`) and protected mode off (pods reach
//! it from other network namespaces), in a cgroup the harness owns (so a killed test run's
//! server is reaped with that cgroup). Ready means PING answers PONG, not "the process started"
//! (a server loading its data answers `-LOADING`, so a restart is ready once loaded).
//!
//! For failover drills a server can be SIGKILLed ([`RedisServer::kill9`]) and started again
//! with the same command line, port and directory ([`RedisServer::restart`]), or frozen with
//! SIGSTOP and thawed with SIGCONT ([`RedisServer::sigstop`], [`RedisServer::sigcont`]).

use std::ffi::OsString;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::resp::{self, Reply};
use crate::{tail, wait_until};

/// A running redis-server.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// `requirepass` of the server, sent as AUTH by [`RedisServer::command`].
    password: Option<String>,
    /// What [`RedisServer::restart`] runs again.
    launch: Launch,
}

/// A server's command line and cgroup, kept to start it again.
#[derive(Debug, Clone)]
struct Launch {
    program: OsString,
    args: Vec<OsString>,
    dir: Option<PathBuf>,
    cgroup: PathBuf,
}

impl Launch {
    fn of(cmd: &Command, cgroup: &Path) -> Self {
        Self {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            dir: cmd.get_current_dir().map(Path::to_path_buf),
            cgroup: cgroup.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        if let Some(d) = &self.dir {
            cmd.current_dir(d);
        }
        cmd
    }
}

impl RedisServer {
    /// Starts redis-server on `addr` in `cgroup`, logging to `<dir>/redis-<port>.log`, and waits
    /// until it answers PING.
    pub fn start(addr: SocketAddr, cgroup: &Path, dir: &Path) -> Result<Self> {
        Self::start_with(addr, cgroup, dir, &[])
    }

    /// Like [`RedisServer::start`] with extra command-line options (`["--requirepass", "pw"]`,
    /// `["--cluster-enabled", "yes", ...]`); they come last, so they override the defaults.
    pub fn start_with(addr: SocketAddr, cgroup: &Path, dir: &Path, extra: &[&str]) -> Result<Self> {
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
            .args(extra);
        Self::spawn(cmd, addr, cgroup, log, None)
    }

    /// Starts `cmd` (a redis-server or redis-sentinel command line that listens on `addr` and
    /// logs to `log`) in `cgroup` and waits until PING on `addr` answers PONG (with `password`
    /// if the server requires one).
    pub fn spawn(
        cmd: Command,
        addr: SocketAddr,
        cgroup: &Path,
        log: PathBuf,
        password: Option<&str>,
    ) -> Result<Self> {
        let launch = Launch::of(&cmd, cgroup);
        let child = Self::launch(cmd, cgroup)?;
        let mut server = Self {
            child,
            addr,
            log,
            password: password.map(str::to_string),
            launch,
        };
        server.wait_pong()?;
        Ok(server)
    }

    fn launch(mut cmd: Command, cgroup: &Path) -> Result<Child> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        crate::pod::enter_cgroup_with_nofile(&mut cmd, cgroup, 65536);
        cmd.spawn().with_context(|| {
            format!(
                "starting {} (is it installed? run `cargo xtask setup`)",
                crate::proc::describe(&cmd)
            )
        })
    }

    /// Waits until the server answers PING with PONG (not `-LOADING`), failing early if it exits.
    fn wait_pong(&mut self) -> Result<()> {
        let what = crate::proc::describe(&self.launch.command());
        let addr = self.addr;
        wait_until(
            &format!("{what} on {addr} to answer PING"),
            Duration::from_secs(15),
            || {
                if let Some(st) = self.child.try_wait()? {
                    // Ends the wait at once: a server that exited never answers.
                    return Ok(Some(Err(anyhow!(
                        "{what} exited ({st}); its log:\n{}",
                        tail(&self.log, 20)
                    ))));
                }
                match self.command(&[b"PING"]) {
                    Ok(Reply::Simple(s)) if s == "PONG" => Ok(Some(Ok(()))),
                    _ => Ok(None),
                }
            },
        )?
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
        let mut req = Vec::new();
        if let Some(pw) = &self.password {
            req.extend_from_slice(&resp::encode(&[b"AUTH", pw.as_bytes()]));
        }
        req.extend_from_slice(&resp::encode(args));
        s.write_all(&req)?;
        let mut r = BufReader::new(s);
        if self.password.is_some() {
            match resp::read_reply(&mut r)? {
                Reply::Simple(_) => {}
                other => bail!("AUTH to redis at {} failed: {other:?}", self.addr),
            }
        }
        Ok(resp::read_reply(&mut r)?)
    }

    /// Sets the password [`RedisServer::command`] authenticates with (after `CONFIG SET
    /// requirepass` or for a server started with `--requirepass`).
    pub fn set_password(&mut self, password: Option<&str>) {
        self.password = password.map(str::to_string);
    }

    /// `INFO <section>` as key → value.
    pub fn info(&self, section: &str) -> Result<std::collections::BTreeMap<String, String>> {
        match self.command(&[b"INFO", section.as_bytes()])? {
            Reply::Bulk(Some(b)) => Ok(resp::parse_info(&String::from_utf8_lossy(&b))),
            other => bail!("unexpected INFO reply from {}: {other:?}", self.addr),
        }
    }

    /// One integer field of `INFO <section>` (`total_connections_received` of `stats`).
    /// How many times `command` (lower case, e.g. `get`) ran (`INFO commandstats`; 0 when it
    /// never did).
    pub fn command_calls(&self, command: &str) -> Result<u64> {
        let stats = self.info("commandstats")?;
        Ok(stats
            .get(&format!("cmdstat_{command}"))
            .and_then(|v| v.split(',').find_map(|f| f.strip_prefix("calls=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    pub fn info_u64(&self, section: &str, field: &str) -> Result<u64> {
        let info = self.info(section)?;
        info.get(field)
            .with_context(|| format!("INFO {section} of {} has no {field}", self.addr))?
            .parse()
            .with_context(|| format!("INFO {section} field {field} is not an integer"))
    }

    /// SIGKILLs the server (a crash, for failover tests) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill().context("SIGKILL to redis-server")?;
        self.child.wait().context("reaping redis-server")?;
        Ok(())
    }

    /// Starts the server again with the same command line (so the same port, directory and
    /// persistence files) after it exited ([`RedisServer::kill9`]), and waits until it answers
    /// PING with PONG, i.e. until it has loaded its data.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            bail!(
                "redis-server on {} is still running; kill it first",
                self.addr
            );
        }
        self.child = Self::launch(self.launch.command(), &self.launch.cgroup)?;
        self.wait_pong()
    }

    /// SIGSTOP: the server freezes (its sockets stay open, nothing answers).
    pub fn sigstop(&mut self) -> Result<()> {
        self.signal(libc::SIGSTOP, "SIGSTOP")
    }

    /// SIGCONT after [`RedisServer::sigstop`].
    pub fn sigcont(&mut self) -> Result<()> {
        self.signal(libc::SIGCONT, "SIGCONT")
    }

    fn signal(&mut self, sig: libc::c_int, name: &str) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{name}: redis-server {} has exited ({st})", self.addr);
        }
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped (checked above).
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{name} to redis-server {}", self.addr));
        }
        Ok(())
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
