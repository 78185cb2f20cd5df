//! The `Cluster` topology and the cluster helpers of the proxy library against real Redis
//! Clusters (the harness's `RedisCluster`): the slot map from `CLUSTER SHARDS` and `SLOTS`,
//! `key_slot` against the real `CLUSTER KEYSLOT`, routing without redirects, `parse_redirect`
//! on real MOVED/ASK replies, split/merge of multi-key commands across the real nodes, the map
//! following a slot migration (ASK changes nothing, MOVED applies at once and its refresh
//! picks up the rest), and with replicas: replica reads and a killed master's promoted replica.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use datamesh_proxy::commands::{self, Kind};
use datamesh_proxy::resp::Value;
use datamesh_proxy::topology::cluster::slots::hash_tag;
use datamesh_proxy::topology::cluster::split::{merge, split_multikey};
use datamesh_proxy::topology::cluster::{
    fetch_slot_map, key_slot, parse_redirect, Cluster, ClusterConfig, Redirect, SlotMap, SLOTS,
};
use datamesh_proxy::topology::control::{ControlConn, ControlSpec};
use datamesh_proxy::topology::{wait_ready, Topology};
use datamesh_tests::cluster::RedisCluster;
use datamesh_tests::proxy::{simple, RespConn};
use datamesh_tests::resp::{encode, Reply};
use datamesh_tests::{wait_until, Env};
use tokio::runtime::Runtime;

use crate::common::{dead_addr, raw_exchange, service_ip, topology_test};

/// Base ports on the instance's service IP; the port below each base stays unused (the dead
/// seed listed first).
const CLUSTER_PORT: u16 = 7000;
const REPLICATED_CLUSTER_PORT: u16 = 7100;

/// A deterministic xorshift RNG for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A key of 1..=24 bytes from an alphabet rich in braces, so hash tags (empty, nested,
    /// unterminated) are exercised.
    fn key(&mut self) -> String {
        const ALPHA: &[u8] = b"abcxyz0129{}{}:._-";
        let len = 1 + (self.next() % 24) as usize;
        (0..len)
            .map(|_| char::from(ALPHA[(self.next() % ALPHA.len() as u64) as usize]))
            .collect()
    }
}

/// A 3-master cluster on the instance's service IP, then `body`.
fn cluster_test(body: impl FnOnce(&mut Env, &Runtime, &mut RedisCluster) -> Result<()>) {
    topology_test(|env, rt| {
        let t = Instant::now();
        let mut cluster = RedisCluster::start(
            service_ip(env),
            CLUSTER_PORT,
            3,
            env.outside_cgroup(),
            env.run_dir(),
        )?;
        eprintln!(
            "topology cluster: 3 masters created and converged in {:?}",
            t.elapsed()
        );
        body(env, rt, &mut cluster)
    });
}

/// Starts a `Cluster` topology on `seeds` (refreshing only on demand) and waits for its map.
fn spawn_topology(rt: &Runtime, seeds: Vec<SocketAddr>, replicas: bool) -> Result<Cluster> {
    let mut cfg = ClusterConfig::new(seeds.clone());
    cfg.read_from_replicas = replicas;
    // Only MOVED and node failures refresh it, so the tests see exactly what those do.
    cfg.refresh_interval = Duration::from_secs(60);
    let t = Instant::now();
    let topo = Cluster::spawn(cfg);
    ensure!(
        rt.block_on(wait_ready(&topo, Duration::from_secs(10))),
        "no slot map from seeds {seeds:?} within 10 s"
    );
    eprintln!(
        "topology cluster: topology ready in {:?} (seeds {seeds:?})",
        t.elapsed()
    );
    Ok(topo)
}

/// Sends `args` to the node `topo` picks for `slot`, following one MOVED as the router does
/// (telling the topology). Returns the reply and whether a MOVED was seen.
fn routed(topo: &Cluster, slot: u16, args: &[&str]) -> Result<(Reply, bool)> {
    let addr = topo
        .pick(Some(slot), false)
        .map_err(|e| anyhow!("pick for slot {slot}: {e}"))?;
    let v = RespConn::connect(addr)?.cmd(args)?;
    if let Reply::Error(e) = &v {
        if let Some(Redirect::Moved { slot, addr: to }) = parse_redirect(e.as_bytes(), addr) {
            topo.redirected(slot, to, false);
            return Ok((RespConn::connect(to)?.cmd(args)?, true));
        }
    }
    Ok((v, false))
}

/// Runs the multi-key command `name` split per slot: each part is sent to the node the
/// topology picks for it, the raw replies merged. Returns the merged reply and the nodes the
/// parts went to.
fn run_split(topo: &Cluster, name: &str, args: &[Bytes]) -> Result<(Bytes, BTreeSet<SocketAddr>)> {
    let spec = commands::lookup(name.as_bytes())
        .with_context(|| format!("{name} not in the command table"))?;
    let Kind::Split(kind) = spec.kind else {
        bail!("{name} is not a split command: {:?}", spec.kind);
    };
    let parts = split_multikey(spec.name, kind, args)?;
    let mut raws = Vec::new();
    let mut nodes = BTreeSet::new();
    for p in &parts {
        let addr = topo
            .pick(Some(p.slot), false)
            .map_err(|e| anyhow!("pick for slot {}: {e}", p.slot))?;
        raws.push(raw_exchange(addr, &p.encode())?);
        nodes.insert(addr);
    }
    eprintln!(
        "topology cluster: {name} of {} args split into {} parts on {} nodes",
        args.len(),
        parts.len(),
        nodes.len()
    );
    Ok((merge(kind, &parts, &raws)?, nodes))
}

/// `CLUSTER SHARDS` and `CLUSTER SLOTS` give the same map, which is what the nodes say; the
/// library's `key_slot` agrees with the real `CLUSTER KEYSLOT` on 1000 random keys; a
/// topology whose first seed is dead loads that map; routing by `key_slot` never meets a
/// MOVED, and a wrong node's MOVED parses to the map's owner.
#[test]
fn cluster_slot_map_hashing_and_routing() {
    cluster_test(|env, rt, cluster| {
        let seed = cluster.nodes[0].addr();
        let addrs = cluster.addrs();

        // 1. SHARDS and SLOTS describe the same map, and it is the cluster's.
        let spec = ControlSpec::plain();
        let shards_map = rt
            .block_on(fetch_slot_map(seed, &spec))
            .context("fetch_slot_map")?;
        let slots_reply = rt.block_on(async {
            let mut c = ControlConn::connect(seed, &spec).await?;
            c.command(&[b"CLUSTER", b"SLOTS"]).await
        })?;
        let slots_map =
            SlotMap::from_slots_reply(&slots_reply, seed).map_err(|e| anyhow!("{e}"))?;
        ensure!(
            shards_map == slots_map,
            "CLUSTER SHARDS and CLUSTER SLOTS disagree:\n{shards_map:?}\n{slots_map:?}"
        );
        ensure!(shards_map.assigned() == SLOTS, "map {shards_map:?}");
        let mut masters = shards_map.masters().to_vec();
        masters.sort();
        ensure!(masters == addrs, "masters {masters:?}, nodes {addrs:?}");
        for (lo, hi, addr) in shards_map.ranges() {
            for s in [lo, hi] {
                let owner = addrs[cluster.owner_of_slot(s)?];
                ensure!(
                    owner == addr,
                    "slot {s}: map says {addr}, the cluster {owner}"
                );
            }
        }
        eprintln!("topology cluster: slot map {:?}", shards_map.ranges());

        // 2. key_slot agrees with CLUSTER KEYSLOT for 1000 random keys (one pipeline).
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut keys: Vec<String> = [
            "foo",
            "{user1000}.following",
            "foo{}{bar}",
            "{}x",
            "a{b}}c",
            "{{b}}",
            "x{",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        while keys.len() < 1000 {
            keys.push(rng.key());
        }
        let mut conn = RespConn::connect(seed)?;
        let mut batch = Vec::new();
        for k in &keys {
            batch.extend(encode(&[b"CLUSTER", b"KEYSLOT", k.as_bytes()]));
        }
        conn.send_raw(&batch)?;
        let mut tagged = 0;
        for k in &keys {
            let want = conn.read()?;
            let got = key_slot(k.as_bytes());
            ensure!(
                want == Reply::Int(i64::from(got)),
                "key {k:?}: key_slot {got}, CLUSTER KEYSLOT {want:?}"
            );
            if hash_tag(k.as_bytes()).len() != k.len() {
                tagged += 1;
            }
        }
        ensure!(tagged > 100, "only {tagged} keys had a hash tag");
        eprintln!(
            "topology cluster: key_slot == CLUSTER KEYSLOT for {} keys ({tagged} with a hash tag)",
            keys.len()
        );

        // 3. The topology: first seed dead, second alive.
        let dead = dead_addr(service_ip(env), CLUSTER_PORT - 1)?;
        let topo = spawn_topology(rt, vec![dead, cluster.nodes[2].addr()], false)?;
        ensure!(
            topo.slot_map() == shards_map,
            "topology map {:?}",
            topo.slot_map()
        );
        ensure!(topo.nodes() == addrs, "nodes {:?}", topo.nodes());
        ensure!(topo.is_cluster(), "a cluster topology must say so");

        // 4. Routing by key_slot never meets a MOVED.
        let mut moved = 0;
        for i in 0..300 {
            let k = format!("key:{i}");
            let (v, m) = routed(&topo, key_slot(k.as_bytes()), &["SET", &k, "v"])?;
            ensure!(v == simple("OK"), "SET {k}: {v:?}");
            moved += usize::from(m);
        }
        ensure!(moved == 0, "routing by key_slot got {moved} MOVED");

        // 5. A wrong node answers MOVED naming the map's owner.
        let slot = key_slot(b"key:7");
        let owner = shards_map
            .master_of(slot)
            .context("slot of key:7 has no owner")?;
        let wrong = *shards_map
            .masters()
            .iter()
            .find(|a| **a != owner)
            .context("no other master")?;
        let v = RespConn::connect(wrong)?.cmd(&["GET", "key:7"])?;
        let Reply::Error(e) = &v else {
            bail!("expected MOVED from {wrong}, got {v:?}");
        };
        ensure!(
            parse_redirect(e.as_bytes(), wrong) == Some(Redirect::Moved { slot, addr: owner }),
            "{e:?} parses to {:?}",
            parse_redirect(e.as_bytes(), wrong)
        );
        Ok(())
    });
}

/// MSET/MGET/EXISTS/TOUCH/DEL/UNLINK over 43 keys (three of them sharing a hash tag, far
/// apart in the argument list) are split per slot, the parts sent to the real owners (all
/// three masters), and the merged replies are what one Redis would answer, MGET values in the
/// client's key order.
#[test]
fn cluster_split_merge_across_nodes() {
    cluster_test(|_env, rt, cluster| {
        let topo = spawn_topology(rt, vec![cluster.nodes[0].addr()], false)?;
        let all: BTreeSet<SocketAddr> = cluster.addrs().into_iter().collect();
        let mut keys: Vec<Bytes> = (0..40).map(|i| Bytes::from(format!("mk:{i}"))).collect();
        for (at, k) in [(0, "{mk}a"), (20, "{mk}b"), (42, "{mk}c")] {
            keys.insert(at, Bytes::from_static(k.as_bytes()));
        }
        let val = |k: &Bytes| format!("val-{}", String::from_utf8_lossy(k));
        let mut mset = Vec::new();
        for k in &keys {
            mset.push(k.clone());
            mset.push(Bytes::from(val(k)));
        }
        let (r, nodes) = run_split(&topo, "MSET", &mset)?;
        ensure!(r.as_ref() == b"+OK\r\n", "MSET merged to {r:?}");
        let parts = split_multikey("mset", commands::MultiKey::Mset, &mset)?;
        ensure!(
            parts.len() == 41 && parts.iter().any(|p| p.positions == [0, 20, 42]),
            "the tagged keys must form one part: {parts:?}"
        );
        ensure!(
            nodes == all,
            "MSET parts went to {nodes:?}, not to every master"
        );
        // The values landed where the cluster says the keys live.
        for k in &keys {
            let k = String::from_utf8_lossy(k);
            let got = cluster.direct_get(&k)?;
            ensure!(
                got.as_deref() == Some(val(&Bytes::from(k.to_string())).as_bytes()),
                "{k} on its owner: {got:?}"
            );
        }

        let mut with_missing = keys.clone();
        with_missing.insert(5, Bytes::from_static(b"mk:missing"));
        let (merged, _) = run_split(&topo, "MGET", &with_missing)?;
        let parsed = Value::parse(&merged).context("the merged MGET reply does not parse")?;
        let vals = parsed
            .as_array()
            .with_context(|| format!("MGET merged to {parsed:?}"))?;
        ensure!(vals.len() == 44, "MGET gave {} values", vals.len());
        for (k, v) in with_missing.iter().zip(vals) {
            if k.as_ref() == b"mk:missing" {
                ensure!(*v == Value::Null, "mk:missing: {v:?}");
            } else {
                ensure!(v.as_str() == Some(val(k).as_str()), "{k:?}: {v:?}");
            }
        }

        let sum = |name: &str, args: &[Bytes], want: &[u8]| -> Result<()> {
            let (r, _) = run_split(&topo, name, args)?;
            ensure!(
                r.as_ref() == want,
                "{name} merged to {:?}, expected {:?}",
                String::from_utf8_lossy(&r),
                String::from_utf8_lossy(want)
            );
            Ok(())
        };
        sum("EXISTS", &with_missing, b":43\r\n")?;
        sum("TOUCH", &keys, b":43\r\n")?;
        sum("DEL", &keys[..20], b":20\r\n")?;
        sum("UNLINK", &with_missing, b":23\r\n")?;
        sum("EXISTS", &keys, b":0\r\n")?;
        Ok(())
    });
}

/// During a slot migration a missing key gets ASK (which must not change the map) and
/// `ASKING` + the command is served by the importing node; after it a MOVED updates the slot
/// at once, and the refresh it triggers picks up a second slot that moved with it.
#[test]
fn cluster_ask_and_moved_during_migration() {
    cluster_test(|_env, rt, cluster| {
        let topo = spawn_topology(rt, vec![cluster.nodes[0].addr()], false)?;
        let gen0 = topo.generation();
        let addrs = cluster.addrs();
        let s1 = key_slot(b"mig:a");
        let from = cluster.owner_of_slot(s1)?;
        let a = addrs[from];
        ensure!(
            topo.pick(Some(s1), false) == Ok(a),
            "pick {:?}",
            topo.pick(Some(s1), false)
        );
        let s2 = *cluster
            .slots_of(from)?
            .iter()
            .find(|s| **s != s1)
            .context("no second slot on the same master")?;
        let to = (from + 1) % addrs.len();
        let b_ = addrs[to];
        cluster.begin_migration(s1, from, to)?;
        cluster.begin_migration(s2, from, to)?;

        let v = RespConn::connect(a)?.cmd(&["GET", "mig:a"])?;
        let Reply::Error(e) = &v else {
            bail!("expected ASK from {a}, got {v:?}");
        };
        let ask = parse_redirect(e.as_bytes(), a);
        ensure!(
            ask == Some(Redirect::Ask { slot: s1, addr: b_ }),
            "{e:?} parses to {ask:?}"
        );
        topo.redirected(s1, b_, true);
        ensure!(
            topo.pick(Some(s1), false) == Ok(a) && topo.generation() == gen0,
            "ASK must not change the map (pick {:?}, generation {})",
            topo.pick(Some(s1), false),
            topo.generation()
        );
        // ASKING + the command back to back on one connection: the importing node serves it.
        let mut cb = RespConn::connect(b_)?;
        let mut batch = encode(&[b"ASKING"]);
        batch.extend(encode(&[b"GET", b"mig:a"]));
        cb.send_raw(&batch)?;
        let (r1, r2) = (cb.read()?, cb.read()?);
        ensure!(
            r1 == simple("OK") && r2 == Reply::Bulk(None),
            "ASKING + GET on {b_}: {r1:?}, {r2:?}"
        );

        cluster.finish_migration(s1, from, to)?;
        cluster.finish_migration(s2, from, to)?;
        let v = RespConn::connect(a)?.cmd(&["GET", "mig:a"])?;
        let Reply::Error(e) = &v else {
            bail!("expected MOVED from {a}, got {v:?}");
        };
        let mv = parse_redirect(e.as_bytes(), a);
        ensure!(
            mv == Some(Redirect::Moved { slot: s1, addr: b_ }),
            "{e:?} parses to {mv:?}"
        );
        ensure!(
            topo.pick(Some(s2), false) == Ok(a),
            "the topology must still be stale before the MOVED (refresh_interval 60 s)"
        );
        let mut changes = topo.changes();
        changes.borrow_and_update();
        let t = Instant::now();
        let (v, was_moved) = routed(&topo, s1, &["SET", "mig:a", "1"])?;
        ensure!(
            was_moved && v == simple("OK"),
            "SET mig:a: {v:?}, moved {was_moved}"
        );
        ensure!(
            topo.pick(Some(s1), false) == Ok(b_),
            "MOVED must apply at once: pick {:?}",
            topo.pick(Some(s1), false)
        );
        ensure!(
            topo.generation() > gen0 && changes.has_changed().context("the change watch closed")?,
            "MOVED must bump the generation and wake watchers"
        );
        wait_until(
            "the MOVED-triggered refresh to move the second slot",
            Duration::from_secs(5),
            || Ok((topo.pick(Some(s2), false) == Ok(b_)).then_some(())),
        )?;
        eprintln!(
            "topology cluster: after a MOVED, the refresh moved the other migrated slot in {:?}",
            t.elapsed()
        );
        let (v, was_moved) = routed(&topo, s1, &["GET", "mig:a"])?;
        ensure!(
            (v.clone(), was_moved) == (Reply::Bulk(Some(b"1".to_vec())), false),
            "GET mig:a: {v:?}, moved {was_moved}"
        );
        Ok(())
    });
}

/// With replicas: the topology lists them (`read_from_replicas`), a read picks the slot's
/// replica, which serves it only after READONLY; a killed master is reported with
/// `node_failed` until the cluster promotes its replica, and routing then goes there.
#[test]
fn cluster_replica_reads_and_master_failover() {
    topology_test(|env, rt| {
        let ip = service_ip(env);
        let t = Instant::now();
        let mut cluster = RedisCluster::start_with_replicas(
            ip,
            REPLICATED_CLUSTER_PORT,
            3,
            1,
            3000,
            env.outside_cgroup(),
            env.run_dir(),
        )?;
        eprintln!(
            "topology cluster: 3 masters + 3 replicas created and converged in {:?}",
            t.elapsed()
        );
        let topo = spawn_topology(rt, vec![cluster.nodes[0].addr()], true)?;
        ensure!(topo.nodes() == cluster.addrs(), "nodes {:?}", topo.nodes());
        ensure!(topo.masters().len() == 3, "masters {:?}", topo.masters());

        let slot = key_slot(b"key:1");
        let master = topo.pick(Some(slot), false).map_err(|e| anyhow!("{e}"))?;
        let replica = topo.pick(Some(slot), true).map_err(|e| anyhow!("{e}"))?;
        ensure!(
            topo.is_replica(replica) && !topo.is_replica(master) && replica != master,
            "read pick {replica}, write pick {master}"
        );
        let shard = topo
            .slot_map()
            .shard_of(slot)
            .cloned()
            .context("slot of key:1 has no shard")?;
        ensure!(shard.replicas == vec![replica], "shard {shard:?}");
        let (v, moved) = routed(&topo, slot, &["SET", "key:1", "v"])?;
        ensure!(v == simple("OK") && !moved, "SET key:1: {v:?}");
        let v = RespConn::connect(master)?.cmd(&["WAIT", "1", "2000"])?;
        ensure!(v == Reply::Int(1), "WAIT 1 on {master}: {v:?}");
        let mut rc = RespConn::connect(replica)?;
        let v = rc.cmd(&["GET", "key:1"])?;
        ensure!(
            matches!(&v, Reply::Error(e) if e.starts_with("MOVED")),
            "replica without READONLY: {v:?}"
        );
        rc.expect(&["READONLY"], simple("OK"))?;
        let v = rc.cmd(&["GET", "key:1"])?;
        ensure!(
            v == Reply::Bulk(Some(b"v".to_vec())),
            "replica GET after READONLY: {v:?}"
        );

        // Kill the master: report each failed connect, as the data path does, until the
        // refresh routes the slot to the promoted replica.
        let i = cluster
            .nodes
            .iter()
            .position(|n| n.addr() == master)
            .context("the master is not a node of the cluster")?;
        cluster.nodes[i].kill9()?;
        let t = Instant::now();
        let now = wait_until(
            "routing to move off the killed master",
            Duration::from_secs(30),
            || match topo.pick(Some(slot), false) {
                Ok(a) if a == master => {
                    if std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_err() {
                        topo.node_failed(a);
                    }
                    Ok(None)
                }
                Ok(a) => Ok(Some(a)),
                Err(e) => bail!("pick failed during the failover: {e}"),
            },
        )?;
        eprintln!(
            "topology cluster: master {master} killed; routing moved to {now} after {:?} (cluster-node-timeout 3 s)",
            t.elapsed()
        );
        ensure!(
            now == replica,
            "routing moved to {now}, not to the promoted replica {replica}"
        );
        ensure!(
            topo.pick(Some(slot), true) == Ok(replica),
            "the promoted shard has no replica left; reads go to its master: {:?}",
            topo.pick(Some(slot), true)
        );
        let (v, moved) = routed(&topo, slot, &["GET", "key:1"])?;
        ensure!(
            (v.clone(), moved) == (Reply::Bulk(Some(b"v".to_vec())), false),
            "GET key:1 after the failover: {v:?}, moved {moved}"
        );
        Ok(())
    });
}
