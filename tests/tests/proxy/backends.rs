//! Sentinel and Cluster backends with real servers.
//!
//! Sentinel: a master, a replica and three sentinels; the proxy finds the master through the
//! sentinels and follows a failover (`SENTINEL FAILOVER`, and a SIGKILLed master): writes
//! succeed again within a bound, on the new master.
//!
//! Cluster: three masters; the proxy splits MGET/MSET/DEL/EXISTS/TOUCH/UNLINK across slots and
//! merges the answers, refuses other cross-slot commands with CROSSSLOT, handles ASK during a
//! slot migration and MOVED after it without the client seeing either, and presents itself to
//! cluster-aware clients (redis-py `RedisCluster`) as a single node owning every slot.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use datamesh_tests::agent::{BackendSpec, Endpoint};
use datamesh_tests::cluster::{key_in_slot, RedisCluster};
use datamesh_tests::env::{run_test, ENDPOINT_NAME};
use datamesh_tests::proxy::{bulk, simple, RespConn};
use datamesh_tests::resp::{self, Reply};
use datamesh_tests::sentinel::{SentinelGroup, MASTER_NAME};
use datamesh_tests::{wait_until, Env};

use crate::common::{proxy_addr, py_node, py_pod};

/// Ports on the instance's service IP (test-owned, so fixed ports cannot collide).
const SENTINEL_DATA_PORT: u16 = 6400;
const SENTINEL_PORT: u16 = 26400;
const CLUSTER_PORT: u16 = 7000;
/// The service address pods dial for the cluster endpoint (nothing listens there: only
/// capture makes it work).
const CLUSTER_SERVICE_PORT: u16 = 6390;

/// How long after the sentinels agree on a new master the proxy may take to send writes there.
const FOLLOW_BOUND: Duration = Duration::from_secs(5);

/// Starts a master, a replica and the sentinels, then the agent with a sentinel backend
/// (reads going to replicas when `read_from_replicas`).
fn start_sentinel_env(env: &mut Env, read_from_replicas: bool) -> Result<SentinelGroup> {
    let ip = IpAddr::V4(env.service_ip());
    let group = SentinelGroup::start(
        ip,
        SENTINEL_DATA_PORT,
        SENTINEL_PORT,
        env.outside_cgroup(),
        env.run_dir(),
    )?;
    let mut cfg = env.base_agent_config()?;
    cfg.endpoints[0].backend = BackendSpec::sentinel(&group.sentinel_addrs(), MASTER_NAME)
        .with("read_from_replicas", read_from_replicas);
    env.start_agent(cfg)?;
    Ok(group)
}

/// Polls SET through the proxy (fresh connection each time, and the long-lived `conn`) until
/// both succeed; returns how long that took and the errors seen meanwhile.
fn wait_writes_succeed(
    proxy: SocketAddr,
    conn: &mut RespConn,
    key: &str,
    bound: Duration,
) -> Result<(Duration, Vec<String>)> {
    let t0 = Instant::now();
    let mut errors = Vec::new();
    let mut i = 0u64;
    loop {
        i += 1;
        let val = format!("after-{i}");
        let fresh = RespConn::connect(proxy).and_then(|mut c| c.cmd(&["SET", key, &val]));
        let long = conn.cmd(&["SET", key, &val]);
        match (&fresh, &long) {
            (Ok(a), Ok(b)) if *a == simple("OK") && *b == simple("OK") => {
                return Ok((t0.elapsed(), errors));
            }
            _ => errors.push(format!("fresh {fresh:?} / long-lived {long:?}")),
        }
        if t0.elapsed() > bound {
            bail!(
                "writes through the proxy did not succeed within {bound:?} of the switch; last errors: {:?}",
                &errors[errors.len().saturating_sub(5)..]
            );
        }
        // A reconnect of our long-lived connection is the client's business, not the proxy's;
        // but the proxy should not have closed it, so keep using it.
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sentinel_backend_follows_a_failover() {
    run_test(Env::builder().agent(false), |env| {
        let group = start_sentinel_env(env, false)?;
        let proxy = proxy_addr(env)?;
        let old = group.master_per_sentinel(0)?;
        let mut conn = RespConn::connect(proxy)?;
        conn.expect(&["SET", "sentinel:k", "before"], simple("OK"))?;
        ensure!(
            group.server(old)?.command(&[b"GET", b"sentinel:k"])? == bulk("before"),
            "the write did not land on the master {old}"
        );

        let new = group.failover(Duration::from_secs(30))?;
        eprintln!("sentinel failover: {old} -> {new}");
        let (took, errors) = wait_writes_succeed(proxy, &mut conn, "sentinel:k2", FOLLOW_BOUND)?;
        eprintln!("writes succeed {took:?} after the switch; errors meanwhile: {errors:?}");
        let v = group.server(new)?.command(&[b"GET", b"sentinel:k2"])?;
        ensure!(
            matches!(v, Reply::Bulk(Some(_))),
            "the write after the failover is not on the new master {new}: {v:?}"
        );
        // Reads see the data replicated before the switch.
        conn.expect(&["GET", "sentinel:k"], bulk("before"))?;
        // And redis-py works against it.
        py_node("basic", proxy, &["--prefix", "sentinel-py:"])?;
        Ok(())
    });
}

#[test]
fn sentinel_backend_survives_a_killed_master() {
    run_test(Env::builder().agent(false), |env| {
        let mut group = start_sentinel_env(env, false)?;
        let proxy = proxy_addr(env)?;
        let old = group.master_per_sentinel(0)?;
        let mut conn = RespConn::connect(proxy)?;
        conn.expect(&["SET", "kill:k", "before"], simple("OK"))?;
        // Let the replica have it before the crash.
        wait_until(
            "the replica to have the key",
            Duration::from_secs(10),
            || {
                let replica = group
                    .servers
                    .iter()
                    .find(|s| s.addr() != old)
                    .ok_or_else(|| anyhow!("no replica"))?;
                Ok((replica.command(&[b"GET", b"kill:k"])? == bulk("before")).then_some(()))
            },
        )?;

        let t_kill = Instant::now();
        group.server_mut(old)?.kill9()?;
        let new = group.wait_switched(old, Duration::from_secs(30))?;
        let switched = t_kill.elapsed();
        let (took, errors) = wait_writes_succeed(proxy, &mut conn, "kill:k2", FOLLOW_BOUND)?;
        eprintln!(
            "master {old} SIGKILLed: sentinels switched to {new} after {switched:?}; proxy writes ok {took:?} later ({} errors meanwhile, last {:?})",
            errors.len(),
            errors.last()
        );
        let v = group.server(new)?.command(&[b"GET", b"kill:k2"])?;
        ensure!(
            matches!(v, Reply::Bulk(Some(_))),
            "the write is not on the new master {new}: {v:?}"
        );
        conn.expect(&["GET", "kill:k"], bulk("before"))?;
        Ok(())
    });
}

#[test]
fn sentinel_read_from_replicas_sends_reads_to_the_replica() {
    run_test(Env::builder().agent(false), |env| {
        let group = start_sentinel_env(env, true)?;
        let proxy = proxy_addr(env)?;
        let master = group.master_per_sentinel(0)?;
        let replica = group
            .servers
            .iter()
            .find(|s| s.addr() != master)
            .ok_or_else(|| anyhow!("no replica"))?;
        let gets = |s: &datamesh_tests::redis::RedisServer| -> Result<u64> {
            let info = s.info("commandstats")?;
            Ok(info
                .get("cmdstat_get")
                .and_then(|v| v.split(',').find_map(|f| f.strip_prefix("calls=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0))
        };
        let mut c = RespConn::connect(proxy)?;
        c.expect(&["SET", "ro:k", "v"], simple("OK"))?;
        wait_until("the replica to have ro:k", Duration::from_secs(10), || {
            Ok((replica.command(&[b"GET", b"ro:k"])? == bulk("v")).then_some(()))
        })?;
        let (m0, r0) = (gets(group.server(master)?)?, gets(replica)?);
        for _ in 0..200 {
            c.expect(&["GET", "ro:k"], bulk("v"))?;
        }
        let (m1, r1) = (gets(group.server(master)?)?, gets(replica)?);
        eprintln!(
            "read_from_replicas: GETs master +{} replica +{}",
            m1 - m0,
            r1 - r0
        );
        ensure!(
            r1 - r0 >= 150,
            "only {} of 200 GETs reached the replica (master got {})",
            r1 - r0,
            m1 - m0
        );
        // Writes still go to the master.
        c.expect(&["SET", "ro:k2", "w"], simple("OK"))?;
        ensure!(
            group.server(master)?.command(&[b"GET", b"ro:k2"])? == bulk("w"),
            "the write did not reach the master"
        );
        Ok(())
    });
}

/// Right after the ready file appears, commands from several clients at once must be served
/// (the topology discovery is part of being ready, or commands wait for it), not refused.
fn commands_right_after_ready(proxy: SocketAddr, what: &str) -> Result<()> {
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || -> Result<()> {
                    let mut c = RespConn::connect(proxy)?;
                    c.expect(&["SET", &format!("early:{i}"), "x"], simple("OK"))?;
                    c.expect(&["GET", &format!("early:{i}")], bulk("x"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("client thread panicked")))
            })
            .collect()
    });
    for r in results {
        r.with_context(|| {
            format!("a command sent right after the agent was ready ({what} backend)")
        })?;
    }
    Ok(())
}

#[test]
fn sentinel_backend_serves_commands_right_after_ready() {
    run_test(Env::builder().agent(false), |env| {
        let _group = start_sentinel_env(env, false)?;
        commands_right_after_ready(proxy_addr(env)?, "sentinel")
    });
}

#[test]
fn cluster_backend_serves_commands_right_after_ready() {
    cluster_env(&[], |env, _cluster| {
        commands_right_after_ready(proxy_addr(env)?, "cluster")
    });
}

/// An env whose `cache` endpoint (service port [`CLUSTER_SERVICE_PORT`]) fronts a 3-master
/// cluster; pods `pods`.
fn cluster_env(pods: &[&str], body: impl FnOnce(&mut Env, &RedisCluster) -> Result<()>) {
    run_test(
        Env::builder().pods(pods.iter().copied()).agent(false),
        |env| {
            let ip = IpAddr::V4(env.service_ip());
            let cluster =
                RedisCluster::start(ip, CLUSTER_PORT, 3, env.outside_cgroup(), env.run_dir())?;
            let mut cfg = env.base_agent_config()?;
            cfg.endpoints = vec![Endpoint::new(
                ENDPOINT_NAME,
                SocketAddr::new(ip, CLUSTER_SERVICE_PORT),
                BackendSpec::cluster(&cluster.addrs()),
            )];
            env.start_agent(cfg)?;
            body(env, &cluster)
        },
    );
}

fn args_of<'a>(head: &[&'a str], keys: &'a [String]) -> Vec<&'a str> {
    let mut v: Vec<&str> = head.to_vec();
    v.extend(keys.iter().map(String::as_str));
    v
}

#[test]
fn cluster_backend_splits_and_merges_multikey_commands() {
    cluster_env(&[], |env, cluster| {
        let proxy = proxy_addr(env)?;
        let mut c = RespConn::connect(proxy)?;
        let keys = cluster.keys_on_all_nodes("mk:", 12)?;
        // MSET across all three masters, then each key is where the cluster says.
        let mut mset = vec!["MSET".to_string()];
        for (i, k) in keys.iter().enumerate() {
            mset.push(k.clone());
            mset.push(format!("v{i}"));
        }
        let r = c.cmd(&mset.iter().map(String::as_str).collect::<Vec<_>>())?;
        ensure!(r == simple("OK"), "MSET across slots answered {r:?}");
        for (i, k) in keys.iter().enumerate() {
            let v = cluster.direct_get(k)?;
            ensure!(
                v.as_deref() == Some(format!("v{i}").as_bytes()),
                "{k} on its owner node: {v:?}"
            );
        }
        // MGET merges in the client's order, with a missing key in the middle.
        let mut mget_keys = keys.clone();
        mget_keys.insert(5, "mk:missing".into());
        let r = c.cmd(&args_of(&["MGET"], &mget_keys))?;
        let mut want: Vec<Reply> = (0..keys.len()).map(|i| bulk(&format!("v{i}"))).collect();
        want.insert(5, Reply::Bulk(None));
        ensure!(
            r == Reply::Array(Some(want.clone())),
            "MGET across slots answered {r:?}, expected {want:?}"
        );
        // Counting commands sum over the nodes.
        let some: Vec<String> = keys[..6]
            .iter()
            .cloned()
            .chain(["mk:missing".to_string()])
            .collect();
        for cmd in ["EXISTS", "TOUCH"] {
            let r = c.cmd(&args_of(&[cmd], &some))?;
            ensure!(
                r == Reply::Int(6),
                "{cmd} over 6 present + 1 missing keys across slots answered {r:?}"
            );
        }
        let r = c.cmd(&args_of(&["DEL"], &keys[..4]))?;
        ensure!(
            r == Reply::Int(4),
            "DEL of 4 keys across slots answered {r:?}"
        );
        let r = c.cmd(&args_of(&["UNLINK"], &keys[4..8]))?;
        ensure!(
            r == Reply::Int(4),
            "UNLINK of 4 keys across slots answered {r:?}"
        );
        let r = c.cmd(&args_of(&["EXISTS"], &keys))?;
        ensure!(
            r == Reply::Int(keys.len() as i64 - 8),
            "EXISTS after DEL/UNLINK answered {r:?}"
        );

        // Other multi-key commands across slots: CROSSSLOT, like Redis Cluster itself.
        let (a, b) = (
            keys[8].clone(),
            keys[9..]
                .iter()
                .find(|k| cluster.key_slot(k).ok() != cluster.key_slot(&keys[8]).ok())
                .cloned()
                .context("no second slot")?,
        );
        for args in [
            vec!["SUNION", a.as_str(), b.as_str()],
            vec!["RENAME", a.as_str(), b.as_str()],
        ] {
            match c.cmd(&args)? {
                Reply::Error(e) if e.starts_with("CROSSSLOT") => {}
                other => bail!("{args:?} across slots answered {other:?}, expected -CROSSSLOT"),
            }
        }
        // With one hash tag the same commands work.
        c.expect(&["SADD", "{tag}s1", "a", "b"], Reply::Int(2))?;
        c.expect(&["SADD", "{tag}s2", "b", "c"], Reply::Int(2))?;
        match c.cmd(&["SUNION", "{tag}s1", "{tag}s2"])? {
            Reply::Array(Some(mut v)) => {
                v.sort_by_key(|r| format!("{r:?}"));
                ensure!(
                    v == vec![bulk("a"), bulk("b"), bulk("c")],
                    "SUNION with a hash tag answered {v:?}"
                );
            }
            other => bail!("SUNION with a hash tag answered {other:?}"),
        }
        // Cluster-only commands: the proxy is one healthy node owning every slot.
        match c.cmd(&["CLUSTER", "INFO"])? {
            Reply::Bulk(Some(b)) => {
                let t = String::from_utf8_lossy(&b);
                ensure!(t.contains("cluster_state:ok"), "CLUSTER INFO: {t}");
            }
            other => bail!("CLUSTER INFO answered {other:?}"),
        }
        Ok(())
    });
}

/// A client that unsubscribes from everything is no subscriber any more (Redis's count 0): its
/// next commands reach every node, also when they were pipelined right behind the UNSUBSCRIBE,
/// and its subscription connection is let go. (Found by the compatibility programs: the
/// connection used to stay pinned to the node of its subscriptions, `-MOVED` for every other
/// slot.)
#[test]
fn cluster_commands_after_leaving_subscriber_mode_reach_every_node() {
    cluster_env(&[], |env, cluster| {
        let proxy = proxy_addr(env)?;
        let keys = cluster.keys_on_all_nodes("unsub:", 6)?;
        let dedicated = |env: &Env| {
            datamesh_tests::tenant::metric(
                env,
                "datamesh_proxy_backend_connections",
                "kind=\"dedicated\"",
            )
        };
        let mut c = RespConn::connect(proxy)?;
        c.expect(&["PING"], simple("PONG"))?;
        let warm = dedicated(env)?;
        for round in 0..3 {
            c.send_raw(&resp::encode(&[b"SUBSCRIBE", b"ch1", b"ch2"]))?;
            for n in 1..=2 {
                let r = c
                    .read()
                    .with_context(|| format!("round {round}: SUBSCRIBE confirmation {n}"))?;
                ensure!(
                    matches!(&r, Reply::Array(Some(v)) if v.len() == 3 && v[2] == Reply::Int(n)),
                    "round {round}: SUBSCRIBE confirmation {n}: {r:?}"
                );
            }
            // UNSUBSCRIBE, then at once (pipelined) a SET and a GET of every key.
            let mut batch = resp::encode(&[b"UNSUBSCRIBE"]);
            for k in &keys {
                batch.extend(resp::encode(&[b"SET", k.as_bytes(), b"v"]));
                batch.extend(resp::encode(&[b"GET", k.as_bytes()]));
            }
            c.send_raw(&batch)?;
            for n in 0..2 {
                let r = c
                    .read()
                    .with_context(|| format!("round {round}: UNSUBSCRIBE confirmation {n}"))?;
                ensure!(
                    matches!(&r, Reply::Array(Some(v)) if v.len() == 3),
                    "round {round}: UNSUBSCRIBE confirmation: {r:?}"
                );
            }
            for k in &keys {
                let set = c
                    .read()
                    .with_context(|| format!("round {round}: SET {k} after UNSUBSCRIBE"))?;
                let get = c
                    .read()
                    .with_context(|| format!("round {round}: GET {k}"))?;
                ensure!(
                    set == simple("OK") && get == bulk("v"),
                    "round {round}: after UNSUBSCRIBE, SET/GET {k} answered {set:?} / {get:?}"
                );
            }
            c.expect(&["PING"], simple("PONG"))?;
        }
        // The subscription connections went with the subscriptions.
        // The subscription connections went with the subscriptions: back to the warm spares.
        wait_until(
            "subscription connections released",
            Duration::from_secs(5),
            || {
                let n = dedicated(env)?;
                Ok((n <= warm).then_some(n))
            },
        )?;
        Ok(())
    });
}

#[test]
fn redis_cluster_client_against_the_proxy() {
    cluster_env(&["a"], |env, cluster| {
        let nodes: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
        let nodes = nodes.join(",");
        // Node-local, through the listener.
        let v = py_node(
            "cluster_client",
            proxy_addr(env)?,
            &["--count", "60", "--nodes", &nodes],
        )?;
        ensure!(
            v["client_nodes"].as_array().map(Vec::len) == Some(1),
            "RedisCluster should see the proxy as its only node: {v}"
        );
        // From a pod, through capture: CLUSTER SLOTS must advertise the address the pod dialled.
        let svc = SocketAddr::new(IpAddr::V4(env.service_ip()), CLUSTER_SERVICE_PORT);
        let v = py_pod(
            env.pod("a"),
            "cluster_client",
            svc,
            &["--count", "60", "--nodes", &nodes, "--prefix", "podcl:"],
        )?;
        let want = svc.to_string();
        ensure!(
            v["client_nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 1 && n[0].as_str() == Some(want.as_str())),
            "RedisCluster in the pod should see exactly the endpoint address {want}: {v}"
        );
        Ok(())
    });
}

#[test]
fn cluster_resharding_is_invisible_to_clients() {
    cluster_env(&[], |env, cluster| {
        let proxy = proxy_addr(env)?;
        // Keys of one slot (one hash tag), and where they move.
        let keys: Vec<String> = (0..20).map(|i| format!("{{mv}}:{i}")).collect();
        let slot = cluster.key_slot(&keys[0])?;
        let from = cluster.owner_of_slot(slot)?;
        let to = (from + 1) % cluster.nodes.len();
        let mut c = RespConn::connect(proxy)?;
        for (i, k) in keys.iter().enumerate() {
            c.expect(&["SET", k, &format!("v{i}")], simple("OK"))?;
        }

        // A client reading and writing the moving keys all along must never see an error.
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let worker = {
            let (stop, rounds, failure, keys) = (
                Arc::clone(&stop),
                Arc::clone(&rounds),
                Arc::clone(&failure),
                keys.clone(),
            );
            std::thread::spawn(move || {
                let res = (|| -> Result<()> {
                    let mut w = RespConn::connect(proxy)?;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let i = (n as usize) % keys.len();
                        w.expect(&["GET", &keys[i]], bulk(&format!("v{i}")))?;
                        w.expect(&["SET", &format!("{{mv}}:w{n}"), "x"], simple("OK"))?;
                        n += 1;
                        rounds.store(n, Ordering::Relaxed);
                    }
                    Ok(())
                })();
                if let Err(e) = res {
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                }
            })
        };
        let progress = |more: u64| -> Result<()> {
            let target = rounds.load(Ordering::Relaxed) + more;
            wait_until(
                "the background client to make progress",
                Duration::from_secs(15),
                || {
                    if let Some(f) = failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                        bail!("the background client saw an error: {f}");
                    }
                    Ok((rounds.load(Ordering::Relaxed) >= target).then_some(()))
                },
            )
        };
        progress(20)?;

        // During the migration: half the keys are on the target (ASK), half still on the source.
        cluster.begin_migration(slot, from, to)?;
        let half: Vec<&str> = keys[..10].iter().map(String::as_str).collect();
        cluster.migrate_keys(from, to, &half)?;
        for (i, k) in keys.iter().enumerate() {
            c.expect(&["GET", k], bulk(&format!("v{i}")))
                .with_context(|| {
                    format!(
                        "GET {k} during the migration of slot {slot} ({} on the target)",
                        if i < 10 { "migrated" } else { "not migrated" }
                    )
                })?;
        }
        progress(20)?;

        // After it: the slot belongs to the target; the proxy's map is stale until MOVED.
        cluster.finish_migration(slot, from, to)?;
        for (i, k) in keys.iter().enumerate() {
            c.expect(&["GET", k], bulk(&format!("v{i}")))
                .with_context(|| {
                    format!("GET {k} after slot {slot} moved from node {from} to {to}")
                })?;
        }
        c.expect(&["SET", &keys[0], "v0"], simple("OK"))?;
        progress(20)?;

        // Then redis-cli's own resharding tool moves one slot from `to` back to `from`: the
        // lowest slot `to` owns (redis-cli takes a source's slots in ascending order).
        let moving = *cluster
            .slots_of(to)?
            .first()
            .context("node `to` owns no slot")?;
        let rkeys: Vec<String> = (0..5)
            .map(|i| key_in_slot(&format!("rs{i}:"), moving))
            .collect();
        for k in &rkeys {
            c.expect(&["SET", k, "resharded"], simple("OK"))?;
        }
        let mut cmd = std::process::Command::new("redis-cli");
        cmd.args(["--cluster", "reshard", &cluster.addrs()[0].to_string()])
            .args([
                "--cluster-from",
                cluster.id(to),
                "--cluster-to",
                cluster.id(from),
            ])
            .args(["--cluster-slots", "1", "--cluster-yes"]);
        datamesh_tests::proc::run_ok(&mut cmd, Duration::from_secs(60))?;
        cluster.wait_consistent(Duration::from_secs(30))?;
        ensure!(
            cluster.owner_of_slot(moving)? == from,
            "redis-cli reshard did not move slot {moving} to node {from} (test premise)"
        );
        for k in &rkeys {
            c.expect(&["GET", k], bulk("resharded"))
                .with_context(|| format!("GET {k} after redis-cli moved slot {moving}"))?;
        }
        for (i, k) in keys.iter().enumerate() {
            c.expect(&["GET", k], bulk(&format!("v{i}")))?;
        }
        progress(20)?;
        stop.store(true, Ordering::Relaxed);
        worker
            .join()
            .map_err(|_| anyhow!("the background client panicked"))?;
        if let Some(f) = failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            bail!("the background client saw an error during resharding: {f}");
        }
        eprintln!(
            "resharding: background client made {} error-free rounds",
            rounds.load(Ordering::Relaxed)
        );
        Ok(())
    });
}
