//! The proxy's ACL category table (`datamesh-proxy/src/commands/acl_categories.txt`), made from
//! a real redis-server's `COMMAND` reply: one line per command and per subcommand with its ACL
//! categories (`config|get @admin @slow @dangerous`). `cargo xtask gen-acl-table` writes it;
//! the `tenant` test binary compares the checked-in file with a live server and fails with the
//! command to run when they differ.
//!
//! The server is started on a unix socket in a scratch directory (no TCP port, nothing to
//! collide with) and killed on drop.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::resp::{self, Reply};
use crate::wait_until;

/// Where the table lives, relative to the workspace root.
pub const TABLE_PATH: &str = "datamesh-proxy/src/commands/acl_categories.txt";

/// A redis-server on a unix socket in a scratch directory, killed (and the directory removed)
/// on drop.
pub struct ScratchRedis {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl ScratchRedis {
    pub fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("datamesh-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed? run `cargo xtask setup`)")?;
        let server = Self { child, dir, socket };
        wait_until(
            "the scratch redis-server to answer PING",
            Duration::from_secs(10),
            || Ok(server.command(&[b"PING"]).ok()),
        )?;
        Ok(server)
    }

    /// One command on a fresh connection.
    pub fn command(&self, args: &[&[u8]]) -> Result<Reply> {
        let mut s = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&resp::encode(args))?;
        Ok(resp::read_reply(&mut BufReader::new(s))?)
    }

    /// The server's `redis_version`.
    pub fn version(&self) -> Result<String> {
        match self.command(&[b"INFO", b"server"])? {
            Reply::Bulk(Some(b)) => resp::parse_info(&String::from_utf8_lossy(&b))
                .remove("redis_version")
                .ok_or_else(|| anyhow!("INFO server has no redis_version")),
            other => bail!("unexpected INFO reply {other:?}"),
        }
    }

    /// The table this server's `COMMAND` reply makes.
    pub fn table(&self) -> Result<String> {
        let version = self.version()?;
        let reply = self.command(&[b"COMMAND"])?;
        render(&reply, &version)
    }
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(r: &Reply) -> Option<String> {
    r.as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// One `COMMAND` entry as (name, categories, subcommands).
fn entry(r: &Reply) -> Result<(String, Vec<String>, Vec<Reply>)> {
    let Reply::Array(Some(items)) = r else {
        bail!("a COMMAND entry is not an array: {r:?}");
    };
    let name = items
        .first()
        .and_then(text)
        .ok_or_else(|| anyhow!("a COMMAND entry without a name"))?
        .to_ascii_lowercase();
    let cats = match items.get(6) {
        Some(Reply::Array(Some(c))) => c.iter().filter_map(text).collect(),
        _ => bail!(
            "COMMAND entry {name} has no ACL categories (element 7); is the server older than 6.0?"
        ),
    };
    let subs = match items.get(9) {
        Some(Reply::Array(Some(s))) => s.clone(),
        _ => Vec::new(),
    };
    Ok((name, cats, subs))
}

/// The table text for a `COMMAND` reply of server `version`: a header, then the commands
/// sorted by name, each followed by its subcommands sorted by name.
pub fn render(reply: &Reply, version: &str) -> Result<String> {
    let Reply::Array(Some(all)) = reply else {
        bail!("COMMAND did not answer an array: {reply:?}");
    };
    let mut commands = Vec::new();
    for r in all {
        let (name, cats, subs) = entry(r)?;
        let mut sub_lines = Vec::new();
        for s in &subs {
            let (sname, scats, _) = entry(s)?;
            sub_lines.push(line(&sname, &scats));
        }
        sub_lines.sort();
        commands.push((name.clone(), line(&name, &cats), sub_lines));
    }
    commands.sort();
    let mut out = format!(
        "# ACL categories of every command and subcommand, from redis-server {version}'s COMMAND reply.\n\
         # Generated by `cargo xtask gen-acl-table`; do not edit (the tenant tests compare it with a live server).\n\
         # <command>[|<subcommand>] <category>...\n"
    );
    for (_, l, subs) in commands {
        out.push_str(&l);
        for s in subs {
            out.push_str(&s);
        }
    }
    Ok(out)
}

fn line(name: &str, cats: &[String]) -> String {
    let mut l = name.to_string();
    for c in cats {
        l.push(' ');
        l.push_str(c);
    }
    l.push('\n');
    l
}

/// Writes the table of a scratch redis-server to `<root>/TABLE_PATH`; returns the path and the
/// server version.
pub fn generate(root: &Path) -> Result<(PathBuf, String)> {
    let server = ScratchRedis::start()?;
    let version = server.version()?;
    let table = server.table()?;
    let path = root.join(TABLE_PATH);
    std::fs::write(&path, table).with_context(|| format!("writing {}", path.display()))?;
    Ok((path, version))
}
