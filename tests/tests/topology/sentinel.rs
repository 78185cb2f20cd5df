//! The `Sentinel` topology against a real master, replica and three redis-sentinels (the
//! harness's `SentinelGroup`): discovery when the first configured sentinel is dead,
//! `+switch-master` followed within a bound (failover through the followed sentinel), the
//! old master coming back as a healthy replica, and rotation to another sentinel when the
//! followed one is killed, followed by a second failover through it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use datamesh_proxy::topology::sentinel::{Sentinel, SentinelConfig};
use datamesh_proxy::topology::{wait_ready, Topology};
use datamesh_tests::redis::RedisServer;
use datamesh_tests::resp::Reply;
use datamesh_tests::sentinel::{SentinelGroup, MASTER_NAME};
use datamesh_tests::wait_until;
use tokio::runtime::Runtime;

use crate::common::{dead_addr, service_ip, topology_test};

/// Ports on the instance's service IP: master and replica, then the three sentinels; the
/// port just below the sentinels' stays unused (the dead sentinel listed first).
const DATA_PORT: u16 = 6400;
const SENTINEL_PORT: u16 = 26400;

/// How long after `SENTINEL FAILOVER` is accepted the topology may take to pick the new
/// master (the sentinel publishes `+switch-master` once the promotion is confirmed, ~1-2 s).
const SWITCH_BOUND: Duration = Duration::from_secs(3);

/// The replicas sentinel `s` reports healthy for our master: not s_down/o_down/disconnected,
/// replication link ok (the criteria the topology's replica list is documented with).
fn healthy_replicas(s: &RedisServer) -> Result<Vec<SocketAddr>> {
    let reply = s.command(&[b"SENTINEL", b"replicas", MASTER_NAME.as_bytes()])?;
    let Reply::Array(Some(entries)) = reply else {
        return Err(anyhow!("SENTINEL replicas answered {reply:?}"));
    };
    let mut out = Vec::new();
    for e in &entries {
        let Reply::Array(Some(kv)) = e else {
            return Err(anyhow!("bad SENTINEL replicas entry {e:?}"));
        };
        let field = |k: &str| {
            kv.chunks(2)
                .find(|c| c.len() == 2 && c[0].as_bytes() == Some(k.as_bytes()))
                .and_then(|c| c[1].as_bytes())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let flags = field("flags");
        let down = flags
            .split(',')
            .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"));
        if !down && field("master-link-status") == "ok" {
            out.push(format!("{}:{}", field("ip"), field("port")).parse()?);
        }
    }
    out.sort();
    Ok(out)
}

/// Waits until sentinel `i` names `master` and lists `replica` as healthy.
fn sentinel_sees(
    group: &SentinelGroup,
    i: usize,
    master: SocketAddr,
    replica: SocketAddr,
) -> Result<()> {
    let s = &group.sentinels[i];
    wait_until(
        &format!(
            "sentinel {} to see master {master} with healthy replica {replica}",
            s.addr()
        ),
        Duration::from_secs(40),
        || {
            Ok(
                (group.master_per_sentinel(i)? == master
                    && healthy_replicas(s)?.contains(&replica))
                .then_some(()),
            )
        },
    )
}

/// `SENTINEL FAILOVER` on sentinel `via` (retried while it has no good replica yet), then the
/// time until that sentinel and the topology each report `to` as the master.
fn failover(
    rt: &Runtime,
    group: &SentinelGroup,
    via: usize,
    topo: &Sentinel,
    to: SocketAddr,
) -> Result<(Duration, Duration)> {
    let mut changes = topo.changes();
    let gen = *changes.borrow_and_update();
    let s = &group.sentinels[via];
    let t0 = wait_until(
        &format!("SENTINEL FAILOVER to be accepted by {}", s.addr()),
        Duration::from_secs(20),
        || {
            let t = Instant::now();
            match s.command(&[b"SENTINEL", b"FAILOVER", MASTER_NAME.as_bytes()])? {
                Reply::Simple(ok) if ok == "OK" => Ok(Some(t)),
                // -NOGOODSLAVE until the sentinel has a replica it may promote.
                _ => Ok(None),
            }
        },
    )?;
    let mut t_sentinel = None;
    let mut t_topo = None;
    let r = wait_until(
        &format!(
            "the failover to {to} to be seen by sentinel {} and by the topology",
            s.addr()
        ),
        Duration::from_secs(15),
        || {
            if t_topo.is_none() && topo.pick(None, false) == Ok(to) {
                t_topo = Some(t0.elapsed());
            }
            if t_sentinel.is_none() && group.master_per_sentinel(via)? == to {
                t_sentinel = Some(t0.elapsed());
            }
            Ok(t_sentinel.zip(t_topo))
        },
    );
    let (ts, tt) = r.with_context(|| {
        format!(
            "sentinel after {t_sentinel:?}, topology after {t_topo:?}; topology state {:?}",
            topo.state()
        )
    })?;
    // The new generation is published right after the view that `pick` reads.
    let bumped = matches!(
        rt.block_on(tokio::time::timeout(
            Duration::from_secs(1),
            changes.wait_for(|g| *g > gen),
        )),
        Ok(Ok(_))
    );
    ensure!(
        bumped,
        "the generation must bump on a switch (was {gen}, is {})",
        topo.generation()
    );
    Ok((ts, tt))
}

/// Discovery with a dead sentinel listed first; a failover through the followed sentinel is
/// applied from its `+switch-master` within [`SWITCH_BOUND`] and seen by subscribers; the old
/// master comes back as a healthy replica; killing the followed sentinel rotates to the next
/// one, and a failover through that one is followed too.
#[test]
fn sentinel_discovery_failover_and_rotation() {
    topology_test(|env, rt| {
        let ip = service_ip(env);
        let mut group = SentinelGroup::start(
            ip,
            DATA_PORT,
            SENTINEL_PORT,
            env.outside_cgroup(),
            env.run_dir(),
        )?;
        let (m, r) = (group.servers[0].addr(), group.servers[1].addr());
        let s = group.sentinel_addrs();
        let dead = dead_addr(ip, SENTINEL_PORT - 1)?;

        // Discovery, with a dead sentinel listed first.
        let mut cfg = SentinelConfig::new(vec![dead, s[0], s[1], s[2]], MASTER_NAME);
        cfg.read_from_replicas = true;
        let t = Instant::now();
        let topo = Sentinel::spawn(cfg);
        ensure!(
            rt.block_on(wait_ready(&topo, Duration::from_secs(10))),
            "no master discovered within 10 s (state {:?})",
            topo.state()
        );
        eprintln!(
            "topology sentinel: discovered master {:?} in {:?} (first sentinel {dead} dead)",
            topo.state().master,
            t.elapsed()
        );
        ensure!(
            topo.state().master == Some(m),
            "discovered {:?}, expected {m}",
            topo.state().master
        );
        // The followed sentinel is recorded right after the first view is published.
        wait_until(
            &format!("the topology to report {} as its sentinel", s[0]),
            Duration::from_secs(2),
            || Ok((topo.current_sentinel() == Some(s[0])).then_some(())),
        )
        .with_context(|| format!("current sentinel {:?}", topo.current_sentinel()))?;
        // The replica is listed once the sentinel reports its link up, which can lag the
        // master by a poll.
        wait_until(
            &format!("the topology to list {r} as its healthy replica"),
            Duration::from_secs(10),
            || Ok((topo.state().replicas == vec![r]).then_some(())),
        )
        .with_context(|| format!("state {:?}", topo.state()))?;
        let st = topo.state();
        ensure!(
            (st.master, st.replicas.clone()) == (Some(m), vec![r]),
            "state {st:?}"
        );
        ensure!(st.generation > 0, "state {st:?}");
        ensure!(
            topo.pick(None, false) == Ok(m),
            "write pick {:?}",
            topo.pick(None, false)
        );
        ensure!(
            topo.pick(Some(1), true) == Ok(r),
            "read pick {:?}",
            topo.pick(Some(1), true)
        );
        ensure!(topo.nodes() == vec![m, r], "nodes {:?}", topo.nodes());
        ensure!(topo.masters() == vec![m], "masters {:?}", topo.masters());

        // Failover 1 through the followed sentinel: +switch-master is applied at once.
        let mut rx = topo.subscribe();
        rx.borrow_and_update();
        let (ts, tt) = failover(rt, &group, 0, &topo, r)?;
        eprintln!(
            "topology sentinel: failover 1 ({m} -> {r}): sentinel answered after {ts:?}, topology switched after {tt:?}"
        );
        ensure!(
            tt <= SWITCH_BOUND,
            "the topology took {tt:?} to follow the switch"
        );
        ensure!(
            rx.has_changed().context("the state watch closed")?,
            "subscribers must see the switch"
        );
        ensure!(
            rx.borrow_and_update().master == Some(r),
            "subscribers see {:?}",
            rx.borrow().master
        );
        ensure!(
            group.role(r)? == "master",
            "{r} is not master after the failover"
        );

        // The old master comes back as a healthy replica (through an event or a re-poll),
        // once the sentinel reports it healthy (its INFO period is 10 s outside failovers).
        let t = Instant::now();
        let (mut t_sentinel, mut t_topo) = (None, None);
        let r2 = wait_until(
            &format!("the old master {m} to be listed as a healthy replica"),
            Duration::from_secs(40),
            || {
                if t_topo.is_none() && topo.state().replicas == vec![m] {
                    t_topo = Some(t.elapsed());
                }
                if t_sentinel.is_none() && healthy_replicas(&group.sentinels[0])? == vec![m] {
                    t_sentinel = Some(t.elapsed());
                }
                Ok(t_sentinel.zip(t_topo))
            },
        );
        let (ts, tt) = r2.with_context(|| {
            format!(
                "sentinel after {t_sentinel:?}, topology after {t_topo:?}; state {:?}",
                topo.state()
            )
        })?;
        eprintln!(
            "topology sentinel: old master {m} reported a healthy replica by the sentinel after {ts:?}, listed by the topology after {tt:?}"
        );
        ensure!(topo.nodes() == vec![r, m], "nodes {:?}", topo.nodes());

        // Kill the followed sentinel: the topology rotates to the next one and follows a
        // failover there.
        sentinel_sees(&group, 1, r, m)?;
        group.sentinels[0].kill9()?;
        let t = Instant::now();
        wait_until(
            &format!("rotation to sentinel {}", s[1]),
            Duration::from_secs(15),
            || Ok((topo.current_sentinel() == Some(s[1])).then_some(())),
        )
        .with_context(|| format!("current sentinel {:?}", topo.current_sentinel()))?;
        eprintln!(
            "topology sentinel: rotated to {} {:?} after killing {}",
            s[1],
            t.elapsed(),
            s[0]
        );
        let (ts, tt) = failover(rt, &group, 1, &topo, m)?;
        eprintln!(
            "topology sentinel: failover 2 ({r} -> {m}) via {}: sentinel answered after {ts:?}, topology switched after {tt:?}",
            s[1]
        );
        ensure!(
            tt <= SWITCH_BOUND,
            "the topology took {tt:?} to follow the switch"
        );
        ensure!(
            topo.pick(None, false) == Ok(m),
            "write pick {:?}",
            topo.pick(None, false)
        );
        ensure!(
            topo.current_sentinel() == Some(s[1]),
            "still following {:?}",
            topo.current_sentinel()
        );
        Ok(())
    });
}
