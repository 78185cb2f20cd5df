//! A real Redis Sentinel setup for proxy tests: a master, one replica and three
//! `redis-sentinel` processes monitoring `mymaster` (quorum 2, down-after 1000 ms unless
//! [`SentinelGroup::start_with`] says otherwise, failover timeout 5000 ms), all on one
//! test-owned address (the instance's service IP) with their own ports. The master serves the
//! replica's full sync at once (`repl-diskless-sync-delay 0`, not after Redis's 5 s wait for
//! more replicas).
//!
//! Everything shares one IP on purpose: the source address of the replica's and the sentinels'
//! own connections is then that IP too, so what they announce to each other (and what the
//! proxy gets from `SENTINEL get-master-addr-by-name`) is reachable. Each sentinel gets a
//! writable config file in its own directory under the instance run dir (sentinels rewrite
//! it). Ready means: every sentinel knows the master, the replica (link up) and both other
//! sentinels. The processes are [`RedisServer`] guards, killed on drop; they run in the
//! instance's `-outside` cgroup, so a killed test run's leftovers are reaped with it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::redis::RedisServer;
use crate::resp::Reply;
use crate::wait_until;

/// The master name every sentinel monitors.
pub const MASTER_NAME: &str = "mymaster";

/// Master + replica + 3 sentinels.
#[derive(Debug)]
pub struct SentinelGroup {
    /// The servers: index 0 starts as master, 1 as its replica.
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
    dir: PathBuf,
}

impl SentinelGroup {
    /// Starts the servers on `ip:data_port` and `ip:data_port+1` and the sentinels on
    /// `ip:sentinel_port..+3`, in `cgroup`, with files under `dir/sentinel-group/`, and waits
    /// until the setup is complete (see the module docs).
    pub fn start(
        ip: IpAddr,
        data_port: u16,
        sentinel_port: u16,
        cgroup: &Path,
        dir: &Path,
    ) -> Result<Self> {
        Self::start_with(ip, data_port, sentinel_port, 1000, cgroup, dir)
    }

    /// Like [`SentinelGroup::start`] with this `down-after-milliseconds` (how long the master
    /// may be unreachable before the sentinels fail it over).
    pub fn start_with(
        ip: IpAddr,
        data_port: u16,
        sentinel_port: u16,
        down_after_ms: u32,
        cgroup: &Path,
        dir: &Path,
    ) -> Result<Self> {
        let dir = dir.join("sentinel-group");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let master_addr = SocketAddr::new(ip, data_port);
        let replica_addr = SocketAddr::new(ip, data_port + 1);
        // Own data dirs: a replica's full sync writes dump.rdb into its dir.
        let sub = |a: SocketAddr| -> Result<PathBuf> {
            let d = dir.join(format!("redis-{}", a.port()));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            Ok(d)
        };
        let fast_sync = ["--repl-diskless-sync-delay", "0"];
        let master = RedisServer::start_with(master_addr, cgroup, &sub(master_addr)?, &fast_sync)?;
        let replica = RedisServer::start_with(
            replica_addr,
            cgroup,
            &sub(replica_addr)?,
            &[
                &fast_sync[..],
                &["--replicaof", &ip.to_string(), &data_port.to_string()],
            ]
            .concat(),
        )?;
        let mut group = Self {
            servers: vec![master, replica],
            sentinels: Vec::new(),
            dir: dir.clone(),
        };
        wait_until(
            &format!("replica {replica_addr} to sync with {master_addr}"),
            Duration::from_secs(30),
            || {
                let info = group.servers[1].info("replication")?;
                Ok(
                    (info.get("master_link_status").map(String::as_str) == Some("up"))
                        .then_some(()),
                )
            },
        )?;
        for i in 0..3u16 {
            let addr = SocketAddr::new(ip, sentinel_port + i);
            let sdir = dir.join(format!("sentinel-{}", addr.port()));
            std::fs::create_dir_all(&sdir)?;
            let conf = sdir.join("sentinel.conf");
            let log = sdir.join("sentinel.log");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\n\
                     bind {ip}\n\
                     daemonize no\n\
                     protected-mode no\n\
                     dir {dir}\n\
                     logfile {log}\n\
                     sentinel announce-ip {ip}\n\
                     sentinel announce-port {port}\n\
                     sentinel monitor {MASTER_NAME} {ip} {mport} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    port = addr.port(),
                    dir = sdir.display(),
                    log = log.display(),
                    mport = data_port,
                ),
            )
            .with_context(|| format!("writing {}", conf.display()))?;
            let mut cmd = Command::new("redis-sentinel");
            cmd.arg(&conf);
            let s = RedisServer::spawn(cmd, addr, cgroup, log, None)
                .context("starting redis-sentinel (is redis-sentinel installed?)")?;
            group.sentinels.push(s);
        }
        group.wait_complete(master_addr, Duration::from_secs(40))?;
        Ok(group)
    }

    /// The sentinels' addresses (the proxy's `sentinels:` list).
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(RedisServer::addr).collect()
    }

    /// The directory holding the group's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The master as sentinel `i` reports it.
    pub fn master_per_sentinel(&self, i: usize) -> Result<SocketAddr> {
        let s = self
            .sentinels
            .get(i)
            .ok_or_else(|| anyhow!("no sentinel {i}"))?;
        match s.command(&[
            b"SENTINEL",
            b"get-master-addr-by-name",
            MASTER_NAME.as_bytes(),
        ])? {
            Reply::Array(Some(items)) if items.len() == 2 => {
                let ip = items[0]
                    .as_bytes()
                    .ok_or_else(|| anyhow!("bad master ip {items:?}"))?;
                let port = items[1]
                    .as_bytes()
                    .ok_or_else(|| anyhow!("bad master port {items:?}"))?;
                Ok(format!(
                    "{}:{}",
                    String::from_utf8_lossy(ip),
                    String::from_utf8_lossy(port)
                )
                .parse()?)
            }
            other => bail!("SENTINEL get-master-addr-by-name answered {other:?}"),
        }
    }

    /// The server guard listening on `addr`.
    pub fn server(&self, addr: SocketAddr) -> Result<&RedisServer> {
        self.servers
            .iter()
            .find(|s| s.addr() == addr)
            .ok_or_else(|| anyhow!("no server of the group listens on {addr}"))
    }

    pub fn server_mut(&mut self, addr: SocketAddr) -> Result<&mut RedisServer> {
        self.servers
            .iter_mut()
            .find(|s| s.addr() == addr)
            .ok_or_else(|| anyhow!("no server of the group listens on {addr}"))
    }

    /// `ROLE` of a server: "master" or "slave".
    pub fn role(&self, addr: SocketAddr) -> Result<String> {
        match self.server(addr)?.command(&[b"ROLE"])? {
            Reply::Array(Some(items)) => items
                .first()
                .and_then(Reply::as_bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .ok_or_else(|| anyhow!("bad ROLE reply {items:?}")),
            other => bail!("ROLE answered {other:?}"),
        }
    }

    /// Waits until every sentinel reports `master`, sees a healthy replica and both other
    /// sentinels (so a failover can be agreed and carried out).
    pub fn wait_complete(&self, master: SocketAddr, timeout: Duration) -> Result<()> {
        for (i, s) in self.sentinels.iter().enumerate() {
            wait_until(
                &format!(
                    "sentinel {} to know master {master}, its replica and 2 other sentinels",
                    s.addr()
                ),
                timeout,
                || {
                    if self.master_per_sentinel(i)? != master {
                        return Ok(None);
                    }
                    let info = parse_master_info(s.command(&[
                        b"SENTINEL",
                        b"master",
                        MASTER_NAME.as_bytes(),
                    ])?)?;
                    let num = |k: &str| {
                        info.iter()
                            .find(|(key, _)| key == k)
                            .and_then(|(_, v)| v.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    let flags = info
                        .iter()
                        .find(|(k, _)| k == "flags")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    Ok((num("num-slaves") >= 1
                        && num("num-other-sentinels") >= 2
                        && flags == "master")
                        .then_some(()))
                },
            )?;
        }
        Ok(())
    }

    /// `SENTINEL FAILOVER mymaster` on sentinel 0, then waits until every sentinel reports a
    /// new master and that server answers ROLE master. Returns the new master.
    pub fn failover(&self, timeout: Duration) -> Result<SocketAddr> {
        let old = self.master_per_sentinel(0)?;
        match self.sentinels[0].command(&[b"SENTINEL", b"FAILOVER", MASTER_NAME.as_bytes()])? {
            Reply::Simple(s) if s == "OK" => {}
            other => bail!("SENTINEL FAILOVER answered {other:?}"),
        }
        self.wait_switched(old, timeout)
    }

    /// Waits until every sentinel reports a master other than `old` and it answers ROLE master.
    pub fn wait_switched(&self, old: SocketAddr, timeout: Duration) -> Result<SocketAddr> {
        wait_until(
            &format!("the sentinels to switch the master away from {old}"),
            timeout,
            || {
                let mut new = None;
                for i in 0..self.sentinels.len() {
                    let m = self.master_per_sentinel(i)?;
                    if m == old || new.is_some_and(|n| n != m) {
                        return Ok(None);
                    }
                    new = Some(m);
                }
                let new = new.ok_or_else(|| anyhow!("no sentinels"))?;
                Ok((self.role(new)? == "master").then_some(new))
            },
        )
    }
}

/// `SENTINEL master <name>` (a flat key/value array in RESP2) as pairs.
fn parse_master_info(reply: Reply) -> Result<Vec<(String, String)>> {
    let Reply::Array(Some(items)) = reply else {
        bail!("SENTINEL master answered {reply:?}");
    };
    let s = |r: &Reply| String::from_utf8_lossy(r.as_bytes().unwrap_or_default()).into_owned();
    Ok(items
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (s(&c[0]), s(&c[1])))
        .collect())
}
