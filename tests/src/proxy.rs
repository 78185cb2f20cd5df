//! Clients for the RESP proxy tests: a raw blocking RESP connection (for byte-level and bad
//! input checks), and runners for the real clients (redis-cli, redis-benchmark, the redis-py
//! scripts under `tests/py/`), each with a deadline so a hanging proxy fails a test instead of
//! hanging the run.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::proc::{describe, last_chars, run_with_input, run_with_timeout, status_text};
use crate::resp::{self, Reply};

/// Deadline of one client command run (redis-cli, a python scenario).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// What reading from a connection produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reply(Reply),
    /// EOF or reset: the peer closed the connection.
    Closed,
    /// Nothing within the timeout: the connection is open but silent.
    Silent,
}

/// A blocking RESP2 connection from the test process (never captured: the test process is not
/// in an attached cgroup).
#[derive(Debug)]
pub struct RespConn {
    addr: SocketAddr,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RespConn {
    /// Connects with a 3 s connect timeout and a 10 s read timeout.
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        let reader = BufReader::new(s.try_clone()?);
        Ok(Self {
            addr,
            writer: s,
            reader,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one command and reads its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Result<Reply> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.cmd_bytes(&args)
    }

    pub fn cmd_bytes(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.send_raw(&resp::encode(args))?;
        self.read()
    }

    /// Sends a command and fails unless the reply is exactly `expected`.
    pub fn expect(&mut self, args: &[&str], expected: Reply) -> Result<()> {
        let got = self.cmd(args)?;
        if got != expected {
            bail!(
                "{args:?} via {}: expected {expected:?}, got {got:?}",
                self.addr
            );
        }
        Ok(())
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .with_context(|| format!("writing to {}", self.addr))
    }

    /// Reads one reply (fails on EOF or timeout).
    pub fn read(&mut self) -> Result<Reply> {
        resp::read_reply(&mut self.reader)
            .with_context(|| format!("reading a reply from {}", self.addr))
    }

    /// Reads exactly `n` raw bytes (for frames the RESP2 reader does not parse, e.g. RESP3).
    pub fn read_raw(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.reader
            .read_exact(&mut buf)
            .with_context(|| format!("reading {n} bytes from {}", self.addr))?;
        Ok(buf)
    }

    /// Reads one reply, or reports that the connection closed or stayed silent for `timeout`.
    pub fn read_outcome(&mut self, timeout: Duration) -> Result<Outcome> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let r = resp::read_reply(&mut self.reader);
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))?;
        match r {
            Ok(reply) => Ok(Outcome::Reply(reply)),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ) =>
            {
                Ok(Outcome::Closed)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Ok(Outcome::Silent)
            }
            Err(e) => Err(anyhow!(e).context(format!("reading from {}", self.addr))),
        }
    }

    /// True when the peer has closed the connection (EOF or reset within `timeout`); false when
    /// it is still open and silent. Bytes that arrive are discarded.
    pub fn closed_within(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(true)
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(false)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Half-closes: no more bytes from us, the read side stays open.
    pub fn shutdown_write(&self) -> Result<()> {
        self.writer
            .shutdown(Shutdown::Write)
            .context("shutdown(SHUT_WR)")
    }
}

/// A simple-string reply (`+OK`).
pub fn simple(s: &str) -> Reply {
    Reply::Simple(s.to_string())
}

/// A bulk-string reply.
pub fn bulk(s: &str) -> Reply {
    Reply::Bulk(Some(s.as_bytes().to_vec()))
}

/// Fails unless a fresh connection to `addr` answers PING with PONG.
pub fn assert_alive(addr: SocketAddr) -> Result<()> {
    let mut c = RespConn::connect(addr).context("the proxy no longer accepts connections")?;
    c.expect(&["PING"], simple("PONG"))
        .context("a fresh connection to the proxy does not answer PING")
}

/// `redis-cli -h <ip> -p <port> <args...>` in `cmd` (a plain `Command::new("redis-cli")` or a
/// pod command); returns stdout, failing on a non-zero exit.
pub fn redis_cli(mut cmd: Command, addr: SocketAddr, args: &[&str]) -> Result<String> {
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args);
    let out = run_with_timeout(&mut cmd, CLIENT_TIMEOUT)?;
    cli_stdout(&cmd, out)
}

/// redis-cli's stdout, or an error with both streams when it exited non-zero.
fn cli_stdout(cmd: &Command, out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): stdout {} stderr {}",
            describe(cmd),
            status_text(out.status),
            last_chars(&out.stdout, 2000),
            last_chars(&out.stderr, 2000)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `input` to redis-cli's standard input (one command per line, or `--pipe` RESP).
pub fn redis_cli_stdin(
    mut cmd: Command,
    addr: SocketAddr,
    args: &[&str],
    input: &[u8],
) -> Result<String> {
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args);
    let out = run_with_input(&mut cmd, input, CLIENT_TIMEOUT)?;
    cli_stdout(&cmd, out)
}

/// `tests/py/`: the redis-py scenario scripts.
pub fn py_dir() -> PathBuf {
    crate::project_root().join("tests").join("py")
}

/// Runs `python3 tests/py/<script> <args...>` in `cmd`'s context (a plain
/// `Command::new("python3")` on the node, or `pod.cmd("python3")`). The script prints one JSON
/// object on success and exits non-zero with a traceback on any failed check; the JSON is
/// returned.
pub fn python(mut cmd: Command, script: &str, args: &[String]) -> Result<Value> {
    let path = py_dir().join(script);
    if !path.is_file() {
        bail!("python scenario {} is missing", path.display());
    }
    cmd.arg(&path).args(args);
    let out = run_with_timeout(&mut cmd, CLIENT_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}\nstdout: {}",
            describe(&cmd),
            status_text(out.status),
            last_chars(&out.stderr, 6000),
            last_chars(&out.stdout, 2000)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last)
        .with_context(|| format!("`{}` printed no JSON: {text}", describe(&cmd)))
}

/// Parses `redis-benchmark --csv` output: (test, rps, p50 ms, p99 ms) per row.
pub fn parse_benchmark_csv(text: &str) -> Result<Vec<(String, f64, f64, f64)>> {
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line
            .split(',')
            .map(|s| s.trim().trim_matches('"'))
            .collect();
        if f.first() == Some(&"test") {
            continue;
        }
        if f.len() < 7 {
            bail!("unexpected redis-benchmark CSV line {line:?}");
        }
        let num = |i: usize| -> Result<f64> {
            f[i].parse()
                .with_context(|| format!("bad number {:?} in {line:?}", f[i]))
        };
        rows.push((f[0].to_string(), num(1)?, num(4)?, num(6)?));
    }
    if rows.is_empty() {
        bail!("redis-benchmark printed no results: {text:?}");
    }
    Ok(rows)
}

/// redis-cli in `pod` against the env's service address with `args`: stdout and stderr
/// together, whatever the exit status (errors are what many checks look for).
pub fn pod_cli(env: &crate::Env, pod: &crate::pod::Pod, args: &[&str]) -> Result<String> {
    let svc = env.service_addr();
    let mut cmd = pod.cmd("redis-cli");
    cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
        .args(args);
    let out = run_with_timeout(&mut cmd, std::time::Duration::from_secs(20))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
