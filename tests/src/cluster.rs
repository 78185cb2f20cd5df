//! A real Redis Cluster for proxy tests: `masters` redis-server processes with
//! `cluster-enabled yes` on one test-owned IP (ports `base..base+masters`, bus ports +10000),
//! joined by `redis-cli --cluster create ... --cluster-yes` (no replicas). Ready means every node
//! reports `cluster_state:ok`, knows every node and agrees on the owner of every slot.
//! [`RedisCluster::start_with_replicas`] adds replicas (ports after the masters'); ready then
//! also means every replica's link to its master is up and every node reports every replica
//! `online` in `CLUSTER SHARDS`.
//!
//! Also the operations the tests need: the owner of a key's slot, and moving a slot from one
//! master to another by hand (`CLUSTER SETSLOT IMPORTING/MIGRATING`, `MIGRATE`, `SETSLOT
//! NODE`), in steps, so a test can observe the proxy during the migration (ASK) and after it
//! (MOVED). The servers are [`RedisServer`] guards (killed on drop) in the instance's
//! `-outside` cgroup; their files live under the instance run dir.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::proc::run_ok;
use crate::redis::RedisServer;
use crate::resp::Reply;
use crate::wait_until;

/// Number of hash slots.
pub const SLOTS: u16 = 16384;

/// A running cluster of masters.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    ids: Vec<String>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts `masters` nodes on `ip:base_port..`, creates the cluster and waits until it is
    /// consistent (see the module docs).
    pub fn start(
        ip: IpAddr,
        base_port: u16,
        masters: u16,
        cgroup: &Path,
        dir: &Path,
    ) -> Result<Self> {
        Self::start_with_replicas(ip, base_port, masters, 0, 5000, cgroup, dir)
    }

    /// Like [`RedisCluster::start`] with `replicas` replicas per master and this
    /// `cluster-node-timeout` (how long before a dead master is failed over). Nodes
    /// `0..masters` are the masters (`redis-cli --cluster create` takes the first ones), the
    /// rest their replicas; which replica serves which master is redis-cli's choice, so tests
    /// read it from the cluster. Ready also means every replica is in sync and reported online
    /// by every node (see the module docs).
    pub fn start_with_replicas(
        ip: IpAddr,
        base_port: u16,
        masters: u16,
        replicas: u16,
        node_timeout_ms: u32,
        cgroup: &Path,
        dir: &Path,
    ) -> Result<Self> {
        ensure!(
            masters >= 3,
            "redis-cli --cluster create needs at least 3 masters"
        );
        let dir = dir.join(format!("cluster-{base_port}"));
        let total = masters * (1 + replicas);
        let timeout = node_timeout_ms.to_string();
        let ip_text = ip.to_string();
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
            "--cluster-announce-ip",
            &ip_text,
        ];
        if replicas > 0 {
            // Replicas sync at once (not after the default 5 s wait for more replicas), and
            // count as online in CLUSTER SHARDS once their replication offset is non-zero,
            // which without writes takes the master's first replication ping (10 s default).
            args.extend([
                "--repl-diskless-sync-delay",
                "0",
                "--repl-ping-replica-period",
                "1",
            ]);
        }
        let mut nodes = Vec::new();
        for i in 0..total {
            let addr = SocketAddr::new(ip, base_port + i);
            let ndir = dir.join(format!("node-{}", addr.port()));
            std::fs::create_dir_all(&ndir)
                .with_context(|| format!("creating {}", ndir.display()))?;
            nodes.push(RedisServer::start_with(addr, cgroup, &ndir, &args)?);
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(n.addr().to_string());
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        run_ok(&mut create, Duration::from_secs(60)).context("redis-cli --cluster create")?;
        let mut cluster = Self {
            nodes,
            ids: Vec::new(),
            dir,
        };
        for i in 0..cluster.nodes.len() {
            let id = match cluster.nodes[i].command(&[b"CLUSTER", b"MYID"])? {
                Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                other => bail!("CLUSTER MYID answered {other:?}"),
            };
            cluster.ids.push(id);
        }
        cluster.wait_consistent(Duration::from_secs(60))?;
        if replicas > 0 {
            cluster
                .wait_replicas_online(usize::from(masters * replicas), Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    /// Waits until every replica's link to its master is up and every node's `CLUSTER SHARDS`
    /// lists `want` replicas, all `online`.
    fn wait_replicas_online(&self, want: usize, timeout: Duration) -> Result<()> {
        wait_until(
            &format!("{want} cluster replicas to be in sync and reported online by every node"),
            timeout,
            || {
                for n in &self.nodes {
                    let info = n.info("replication")?;
                    if info.get("role").map(String::as_str) == Some("slave")
                        && info.get("master_link_status").map(String::as_str) != Some("up")
                    {
                        return Ok(None);
                    }
                    let health = replica_health(n.command(&[b"CLUSTER", b"SHARDS"])?)?;
                    if health.len() != want || health.iter().any(|h| h != "online") {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
    }

    /// Index of the replica of master `master` (its `INFO replication` names the master's
    /// port); with several, the first.
    pub fn replica_of(&self, master: usize) -> Result<usize> {
        let port = self.nodes[master].addr().port().to_string();
        for (i, n) in self.nodes.iter().enumerate() {
            if i == master {
                continue;
            }
            let info = n.info("replication")?;
            if info.get("role").map(String::as_str) == Some("slave")
                && info.get("master_port") == Some(&port)
            {
                return Ok(i);
            }
        }
        bail!(
            "no replica of node {master} ({})",
            self.nodes[master].addr()
        )
    }

    /// `ROLE` of node `i`: "master" or "slave".
    pub fn role(&self, i: usize) -> Result<String> {
        match self.nodes[i].command(&[b"ROLE"])? {
            Reply::Array(Some(items)) => items
                .first()
                .and_then(Reply::as_bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .ok_or_else(|| anyhow!("bad ROLE reply {items:?}")),
            other => bail!("ROLE of node {i} answered {other:?}"),
        }
    }

    /// The nodes' addresses (the proxy's `nodes:` seeds).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(RedisServer::addr).collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// Waits until every node says `cluster_state:ok`, knows all nodes, and all nodes map every
    /// slot to the same owner.
    pub fn wait_consistent(&self, timeout: Duration) -> Result<()> {
        wait_until("the cluster to become consistent", timeout, || {
            let mut first: Option<Vec<usize>> = None;
            for n in &self.nodes {
                let info = match n.command(&[b"CLUSTER", b"INFO"])? {
                    Reply::Bulk(Some(b)) => crate::resp::parse_info(&String::from_utf8_lossy(&b)),
                    other => bail!("CLUSTER INFO answered {other:?}"),
                };
                let known: usize = info
                    .get("cluster_known_nodes")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if info.get("cluster_state").map(String::as_str) != Some("ok")
                    || known != self.nodes.len()
                {
                    return Ok(None);
                }
                let owners = self.owners_per(n)?;
                match &first {
                    None => first = Some(owners),
                    Some(f) if *f != owners => return Ok(None),
                    Some(_) => {}
                }
            }
            Ok(Some(()))
        })
    }

    /// Slot → node index as node `via` sees it (`CLUSTER SLOTS`); usize::MAX = unassigned.
    fn owners_per(&self, via: &RedisServer) -> Result<Vec<usize>> {
        let mut owners = vec![usize::MAX; usize::from(SLOTS)];
        let Reply::Array(Some(ranges)) = via.command(&[b"CLUSTER", b"SLOTS"])? else {
            bail!("CLUSTER SLOTS did not answer an array");
        };
        for r in ranges {
            let Reply::Array(Some(items)) = r else {
                bail!("bad CLUSTER SLOTS entry");
            };
            let (Some(Reply::Int(lo)), Some(Reply::Int(hi)), Some(Reply::Array(Some(master)))) =
                (items.first(), items.get(1), items.get(2))
            else {
                bail!("bad CLUSTER SLOTS range {items:?}");
            };
            let port = match master.get(1) {
                Some(Reply::Int(p)) => u16::try_from(*p)?,
                other => bail!("bad CLUSTER SLOTS node {other:?}"),
            };
            let idx = self
                .nodes
                .iter()
                .position(|n| n.addr().port() == port)
                .ok_or_else(|| anyhow!("CLUSTER SLOTS names an unknown node port {port}"))?;
            for s in *lo..=*hi {
                owners[usize::try_from(s)?] = idx;
            }
        }
        Ok(owners)
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, so hash tags follow Redis's own rules).
    pub fn key_slot(&self, key: &str) -> Result<u16> {
        match self.nodes[0].command(&[b"CLUSTER", b"KEYSLOT", key.as_bytes()])? {
            Reply::Int(s) => Ok(u16::try_from(s)?),
            other => bail!("CLUSTER KEYSLOT answered {other:?}"),
        }
    }

    /// The slots node `i` owns (as node 0 sees it), ascending.
    pub fn slots_of(&self, i: usize) -> Result<Vec<u16>> {
        let owners = self.owners_per(&self.nodes[0])?;
        Ok((0..SLOTS)
            .filter(|s| owners[usize::from(*s)] == i)
            .collect())
    }

    /// Index of the node that owns `slot` (as node 0 sees it).
    pub fn owner_of_slot(&self, slot: u16) -> Result<usize> {
        let owners = self.owners_per(&self.nodes[0])?;
        let o = owners[usize::from(slot)];
        ensure!(o != usize::MAX, "slot {slot} is unassigned");
        Ok(o)
    }

    /// Index of the node that owns `key`'s slot.
    pub fn owner_of_key(&self, key: &str) -> Result<usize> {
        self.owner_of_slot(self.key_slot(key)?)
    }

    /// `n` distinct keys `<prefix><i>` that together land on every node at least once (a
    /// cluster without replicas: replicas own no slots).
    pub fn keys_on_all_nodes(&self, prefix: &str, n: usize) -> Result<Vec<String>> {
        let keys: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
        let mut seen = vec![false; self.nodes.len()];
        for k in &keys {
            seen[self.owner_of_key(k)?] = true;
        }
        ensure!(
            seen.iter().all(|s| *s),
            "{n} keys with prefix {prefix:?} do not cover every node; use more"
        );
        Ok(keys)
    }

    /// Step 1 of moving `slot` from node `from` to node `to`: IMPORTING on the target,
    /// MIGRATING on the source. Keys still on the source are served there; others get -ASK.
    pub fn begin_migration(&self, slot: u16, from: usize, to: usize) -> Result<()> {
        let s = slot.to_string();
        expect_ok(
            self.nodes[to].command(&[
                b"CLUSTER",
                b"SETSLOT",
                s.as_bytes(),
                b"IMPORTING",
                self.ids[from].as_bytes(),
            ])?,
            "SETSLOT IMPORTING",
        )?;
        expect_ok(
            self.nodes[from].command(&[
                b"CLUSTER",
                b"SETSLOT",
                s.as_bytes(),
                b"MIGRATING",
                self.ids[to].as_bytes(),
            ])?,
            "SETSLOT MIGRATING",
        )
    }

    /// Step 2: `MIGRATE` these keys (all in the migrating slot) from `from` to `to`.
    pub fn migrate_keys(&self, from: usize, to: usize, keys: &[&str]) -> Result<()> {
        let to_addr = self.nodes[to].addr();
        let host = to_addr.ip().to_string();
        let port = to_addr.port().to_string();
        let mut args: Vec<&[u8]> = vec![
            b"MIGRATE",
            host.as_bytes(),
            port.as_bytes(),
            b"",
            b"0",
            b"5000",
            b"KEYS",
        ];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        match self.nodes[from].command(&args)? {
            Reply::Simple(s) if s == "OK" || s == "NOKEY" => Ok(()),
            other => bail!("MIGRATE {keys:?} answered {other:?}"),
        }
    }

    /// Step 3: migrates every key left in `slot`, assigns the slot to `to` on every node and
    /// waits until the cluster agrees.
    pub fn finish_migration(&self, slot: u16, from: usize, to: usize) -> Result<()> {
        let s = slot.to_string();
        loop {
            let keys = match self.nodes[from].command(&[
                b"CLUSTER",
                b"GETKEYSINSLOT",
                s.as_bytes(),
                b"100",
            ])? {
                Reply::Array(Some(k)) => k,
                other => bail!("GETKEYSINSLOT answered {other:?}"),
            };
            if keys.is_empty() {
                break;
            }
            let names: Vec<String> = keys
                .iter()
                .filter_map(Reply::as_bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            self.migrate_keys(from, to, &refs)?;
        }
        // The target first (it then owns the slot), then the source, then the rest.
        let mut order = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|i| *i != to && *i != from));
        for i in order {
            expect_ok(
                self.nodes[i].command(&[
                    b"CLUSTER",
                    b"SETSLOT",
                    s.as_bytes(),
                    b"NODE",
                    self.ids[to].as_bytes(),
                ])?,
                "SETSLOT NODE",
            )?;
        }
        wait_until(
            &format!("every node to agree that slot {slot} is on node {to}"),
            Duration::from_secs(30),
            || {
                for n in &self.nodes {
                    if self.owners_per(n)?[usize::from(slot)] != to {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
    }

    /// Moves `slot` from `from` to `to` in one go.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) -> Result<()> {
        self.begin_migration(slot, from, to)?;
        self.finish_migration(slot, from, to)
    }

    /// GET straight from the node that owns the key (no proxy, no redirects).
    pub fn direct_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let i = self.owner_of_key(key)?;
        match self.nodes[i].command(&[b"GET", key.as_bytes()])? {
            Reply::Bulk(v) => Ok(v),
            other => bail!("direct GET {key} on node {i} answered {other:?}"),
        }
    }
}

/// The hash slot of `key` computed here (CRC16-XMODEM of the `{hash tag}` or the whole key,
/// mod 16384), so a test can search for keys of a given slot without a round trip per try.
/// Checked against `CLUSTER KEYSLOT` of a real node in the tests.
pub fn key_slot_local(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|b| *b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for b in hashed {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// A key `<prefix><n>` whose slot is `slot`.
pub fn key_in_slot(prefix: &str, slot: u16) -> String {
    (0u64..)
        .map(|n| format!("{prefix}{n}"))
        .find(|k| key_slot_local(k.as_bytes()) == slot)
        .unwrap_or_default()
}

/// The `health` of every replica in a `CLUSTER SHARDS` reply (RESP2: flat key/value arrays).
fn replica_health(reply: Reply) -> Result<Vec<String>> {
    fn field<'a>(kv: &'a [Reply], name: &str) -> Option<&'a Reply> {
        kv.chunks(2)
            .find(|c| c.len() == 2 && c[0].as_bytes() == Some(name.as_bytes()))
            .map(|c| &c[1])
    }
    let Reply::Array(Some(shards)) = reply else {
        bail!("CLUSTER SHARDS answered {reply:?}");
    };
    let mut out = Vec::new();
    for shard in &shards {
        let Reply::Array(Some(kv)) = shard else {
            bail!("bad CLUSTER SHARDS entry {shard:?}");
        };
        let Some(Reply::Array(Some(nodes))) = field(kv, "nodes") else {
            bail!("CLUSTER SHARDS entry without nodes: {kv:?}");
        };
        for node in nodes {
            let Reply::Array(Some(nkv)) = node else {
                bail!("bad CLUSTER SHARDS node {node:?}");
            };
            let text = |k: &str| {
                field(nkv, k)
                    .and_then(Reply::as_bytes)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default()
            };
            if text("role") == "replica" {
                out.push(text("health"));
            }
        }
    }
    Ok(out)
}

fn expect_ok(r: Reply, what: &str) -> Result<()> {
    match r {
        Reply::Simple(s) if s == "OK" => Ok(()),
        other => bail!("{what} answered {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` of Redis 7.
        assert_eq!(key_slot_local(b"foo"), 12182);
        assert_eq!(key_slot_local(b"bar"), 5061);
        assert_eq!(
            key_slot_local(b"{user1000}.following"),
            key_slot_local(b"user1000")
        );
        assert_eq!(key_slot_local(b"foo{}{bar}"), key_slot_local(b"foo{}{bar}"));
        assert_eq!(key_slot_local(b"{}x"), key_slot_local(b"{}x"));
        let k = key_in_slot("k", 42);
        assert_eq!(key_slot_local(k.as_bytes()), 42);
    }
}
