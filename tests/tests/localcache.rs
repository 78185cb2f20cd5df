//! The node-local cache of hot read-mostly keys (`local_cache`), with the real agent and a
//! real redis-server 7: a key read hard through the proxy becomes hot and is then answered
//! from the cache (redis-server's `cmdstat_get` stops growing, the hits metric grows); a
//! write through the proxy is seen by the very next GET, a write straight to redis-server
//! (not through the proxy) within a few milliseconds (Redis's invalidation push); killing the
//! tracking connection on the server or restarting redis-server flushes the cache and nothing
//! stale is served; entries expire after `ttl_ms`; a user whose ACL has no read permission
//! gets NOPERM, not the cached value; a RESP3 client gets the bytes redis-server sends; a
//! reload turning the cache off flushes it; behind Sentinel, a failover moves the tracking
//! connection to the new master and a write there is seen. Clients are node-local (the proxy's listener
//! address) and, for the direct writes, the test process straight at redis-server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use datamesh_tests::agent::BackendSpec;
use datamesh_tests::env::{run_test, ENDPOINT_NAME};
use datamesh_tests::hotcache::metric;
use datamesh_tests::proxy::{bulk, simple, RespConn};
use datamesh_tests::resp::Reply;
use datamesh_tests::sentinel::{SentinelGroup, MASTER_NAME};
use datamesh_tests::{wait_until, Env};
use serde_json::Value;

const KEY: &str = "hot:config:flags";
const TTL_MS: u64 = 400;

fn config() -> String {
    format!(
        "hotkeys:\n  sample_rate: 1\n  window_s: 2\n  key_display: raw\n\
         local_cache:\n  enabled: true\n  min_ops: 20\n  min_read_ratio: 0.9\n  ttl_ms: {TTL_MS}\n\
         users:\n  - name: app\n    password: app-pw\n  - name: noread\n    password: nr-pw\n    acl: \"+@all -@read -@dangerous\"\n"
    )
}

fn proxy(env: &Env) -> Result<SocketAddr> {
    env.agent().proxy_addr(ENDPOINT_NAME)
}

fn login(addr: SocketAddr, user: &str, pw: &str) -> Result<RespConn> {
    let mut c = RespConn::connect(addr)?;
    c.expect(&["AUTH", user, pw], simple("OK"))?;
    Ok(c)
}

fn direct(env: &Env) -> Result<RespConn> {
    RespConn::connect(env.redis().addr())
}

fn gets(env: &Env) -> Result<u64> {
    env.redis().command_calls("get")
}

/// `/hotkeys`' local cache summary and whether `KEY` shows as cached.
fn cache_state(env: &Env) -> Result<(Value, bool)> {
    let (status, body) = env.agent().http_get("/hotkeys")?;
    ensure!(status == 200, "/hotkeys answered {status}: {body}");
    let v: Value = serde_json::from_str(&body)?;
    let ep = &v["endpoints"][0];
    let cached = ep["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|k| k["key"] == KEY && k["cached"] == true);
    Ok((ep["local_cache"].clone(), cached))
}

/// GETs `KEY` on `c` until the cache holds it (a hot key, read-only): returns how long.
fn warm(env: &Env, c: &mut RespConn, want: &str) -> Result<Duration> {
    let t0 = Instant::now();
    wait_until("the hot key to be cached", Duration::from_secs(8), || {
        for _ in 0..50 {
            c.expect(&["GET", KEY], bulk(want))?;
        }
        let (summary, cached) = cache_state(env)?;
        if !cached {
            eprintln!("not cached yet: {summary}");
        }
        Ok(cached.then_some(()))
    })?;
    Ok(t0.elapsed())
}

/// Raw bytes of one reply of `want` length at most, read within 2 s.
fn raw_exchange(s: &mut TcpStream, cmd: &[u8], want: usize) -> Result<Vec<u8>> {
    s.write_all(cmd)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 4096];
    while out.len() < want {
        if Instant::now() > deadline {
            bail!("only {:?} within 2 s", String::from_utf8_lossy(&out));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

/// Every HELLO 3 + GET exchange byte for byte, through the proxy and straight at Redis.
fn resp3_get(
    addr: SocketAddr,
    auth: Option<(&str, &str)>,
    key: &str,
    want: usize,
) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let hello = match auth {
        Some((u, p)) => {
            datamesh_tests::resp::encode(&[b"HELLO", b"3", b"AUTH", u.as_bytes(), p.as_bytes()])
        }
        None => datamesh_tests::resp::encode(&[b"HELLO", b"3"]),
    };
    s.write_all(&hello)?;
    // The HELLO map: read until it is in (it ends with the modules entry `*0\r\n`).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"*0\r\n") {
        let n = s.read(&mut buf)?;
        ensure!(
            n > 0,
            "closed during HELLO: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    raw_exchange(
        &mut s,
        &datamesh_tests::resp::encode(&[b"GET", key.as_bytes()]),
        want,
    )
}

#[test]
fn hot_keys_are_served_from_the_cache_and_never_stale() {
    run_test(Env::builder().pods(["a"]).extra_config(&config()), |env| {
        let addr = proxy(env)?;
        let mut d = direct(env)?;
        d.expect(&["SET", KEY, "v1"], simple("OK"))?;
        let mut c = login(addr, "app", "app-pw")?;
        let took = warm(env, &mut c, "v1")?;
        eprintln!("cached after {took:?}");

        // Served from the cache: redis-server sees (almost) no GETs, the hits metric grows.
        let (g0, h0) = (
            gets(env)?,
            metric(env, "datamesh_proxy_local_cache_hits_total")?,
        );
        let t0 = Instant::now();
        for _ in 0..2000 {
            c.expect(&["GET", KEY], bulk("v1"))?;
        }
        let dt = t0.elapsed();
        let (g1, h1) = (
            gets(env)?,
            metric(env, "datamesh_proxy_local_cache_hits_total")?,
        );
        // At most one refill per ttl_ms (plus a couple at the edges).
        let refills = dt.as_millis() as u64 / TTL_MS + 3;
        eprintln!(
            "2000 GETs in {dt:?}: backend GETs {} (refills allowed {refills}), hits +{}",
            g1 - g0,
            h1 - h0
        );
        ensure!(
            g1 - g0 <= refills,
            "backend saw {} GETs for 2000 cached ones",
            g1 - g0
        );
        ensure!(h1 - h0 >= 1900.0, "hits grew by {} only", h1 - h0);

        // A write through the proxy, pipelined with a GET behind it: the GET sees the write
        // (the cached v1 was fenced at dispatch); and the very next GET of another connection.
        ensure!(cache_state(env)?.1, "the key left the cache");
        let mut w = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        w.set_read_timeout(Some(Duration::from_secs(2)))?;
        let enc = datamesh_tests::resp::encode;
        let mut pipeline = enc(&[b"AUTH", b"app", b"app-pw"]);
        pipeline.extend(enc(&[b"SET", KEY.as_bytes(), b"v2"]));
        pipeline.extend(enc(&[b"GET", KEY.as_bytes()]));
        let want = b"+OK\r\n+OK\r\n$2\r\nv2\r\n";
        let got = raw_exchange(&mut w, &pipeline, want.len())?;
        ensure!(
            got == want,
            "pipelined SET + GET: {:?}",
            String::from_utf8_lossy(&got)
        );
        c.expect(&["GET", KEY], bulk("v2"))?;
        warm(env, &mut c, "v2")?;

        // A write straight to redis-server: seen within a few ms (the invalidation push).
        d.expect(&["SET", KEY, "v3"], simple("OK"))?;
        let t0 = Instant::now();
        loop {
            match c.cmd(&["GET", KEY])? {
                r if r == bulk("v3") => break,
                r if r == bulk("v2") => {
                    ensure!(
                        t0.elapsed() < Duration::from_millis(20),
                        "still v2 after {:?}",
                        t0.elapsed()
                    );
                }
                other => bail!("GET answered {other:?}"),
            }
        }
        let lag = t0.elapsed();
        eprintln!("direct write seen through the proxy after {lag:?}");
        ensure!(
            metric(env, "datamesh_proxy_local_cache_invalidations_total")? >= 2.0,
            "invalidations not counted"
        );

        // A user without read permission: NOPERM while the value is cached.
        warm(env, &mut c, "v3")?;
        let mut nr = login(addr, "noread", "nr-pw")?;
        match nr.cmd(&["GET", KEY])? {
            Reply::Error(e) if e.starts_with("NOPERM") => {}
            other => bail!("a user without @read got {other:?}"),
        }

        // RESP3: byte-exact with redis-server, for the cached value and for a missing key.
        ensure!(cache_state(env)?.1, "the key left the cache");
        let via = resp3_get(addr, Some(("app", "app-pw")), KEY, 8)?;
        let want = resp3_get(env.redis().addr(), None, KEY, 8)?;
        ensure!(
            via == want && via == b"$2\r\nv3\r\n",
            "RESP3 GET: {via:?} vs redis {want:?}"
        );
        let via = resp3_get(addr, Some(("app", "app-pw")), "missing:key", 3)?;
        let want = resp3_get(env.redis().addr(), None, "missing:key", 3)?;
        ensure!(
            via == want && via == b"_\r\n",
            "RESP3 nil: {via:?} vs {want:?}"
        );

        // A hot missing key: every GET is forwarded (nil is not cached), but it is read for
        // the cache once, not once per miss (Redis pushes its creation).
        let g0 = gets(env)?;
        for _ in 0..1000 {
            c.expect(&["GET", "hot:missing"], Reply::Bulk(None))?;
        }
        let n = gets(env)? - g0;
        ensure!(
            n <= 1002,
            "1000 GETs of a missing hot key cost Redis {n} GETs"
        );
        d.expect(&["SET", "hot:missing", "now"], simple("OK"))?;
        wait_until("the created key to be read", Duration::from_secs(3), || {
            Ok((c.cmd(&["GET", "hot:missing"])? == bulk("now")).then_some(()))
        })?;

        // TTL: no reads, and the entry is gone after ttl_ms (plus the tracker's tick).
        std::thread::sleep(Duration::from_millis(TTL_MS + 300));
        let (summary, _) = cache_state(env)?;
        ensure!(summary["keys"] == 0, "entries outlived ttl_ms: {summary}");
        Ok(())
    });
}

#[test]
fn losing_the_tracking_connection_flushes_and_a_reload_turns_it_off() {
    run_test(Env::builder().pods(["a"]).extra_config(&config()), |env| {
        let addr = proxy(env)?;
        let mut d = direct(env)?;
        d.expect(&["SET", KEY, "v1"], simple("OK"))?;
        let mut c = login(addr, "app", "app-pw")?;
        warm(env, &mut c, "v1")?;
        let f0 = metric(env, "datamesh_proxy_local_cache_flushes_total")?;

        // Kill the tracking connection on the server (flag `t`), then write straight to Redis:
        // no invalidation can come any more, and the next GET must not be stale.
        let tracking: Vec<String> = env
            .redis()
            .client_list()?
            .into_iter()
            .filter(|c| c.get("flags").is_some_and(|f| f.contains('t')))
            .filter_map(|c| c.get("id").cloned())
            .collect();
        ensure!(
            tracking.len() == 1,
            "one tracking connection expected: {tracking:?}"
        );
        d.expect(&["CLIENT", "KILL", "ID", &tracking[0]], Reply::Int(1))?;
        d.expect(&["SET", KEY, "v2"], simple("OK"))?;
        c.expect(&["GET", KEY], bulk("v2"))?;
        ensure!(
            metric(env, "datamesh_proxy_local_cache_flushes_total")? > f0,
            "the lost connection did not flush"
        );
        // It tracks again and caches again.
        warm(env, &mut c, "v2")?;

        // Restart redis-server: the data is gone with it (no persistence); never the old value.
        env.redis_mut().kill9()?;
        env.redis_mut().restart()?;
        let t0 = Instant::now();
        loop {
            match c.cmd(&["GET", KEY]) {
                Ok(Reply::Bulk(None)) => break,
                Ok(r) if r == bulk("v2") => bail!("stale v2 served after the restart"),
                Ok(r) => bail!("GET after the restart answered {r:?}"),
                // The connection's command may fail while Redis restarts: retry.
                Err(_) if t0.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(20));
                    c = login(addr, "app", "app-pw")?;
                }
                Err(e) => return Err(e),
            }
        }
        let mut d = direct(env)?;
        d.expect(&["SET", KEY, "v3"], simple("OK"))?;
        warm(env, &mut c, "v3")?;

        // A reload turning the cache off flushes it.
        let mut cfg = env.agent().config().clone();
        cfg.extra_yaml = cfg
            .extra_yaml
            .replace("  enabled: true\n  min_ops", "  enabled: false\n  min_ops");
        env.agent_mut().write_config(cfg)?;
        env.agent().sighup()?;
        wait_until(
            "the reload to turn the cache off",
            Duration::from_secs(5),
            || {
                Ok((metric(env, "datamesh_proxy_local_cache_keys")? == 0.0
                    && cache_state(env)?.0.is_null())
                .then_some(()))
            },
        )?;
        let g0 = gets(env)?;
        for _ in 0..100 {
            c.expect(&["GET", KEY], bulk("v3"))?;
        }
        ensure!(
            gets(env)? - g0 >= 100,
            "GETs still served locally with the cache off"
        );
        ensure!(
            env.redis()
                .client_list()?
                .iter()
                .all(|c| !c.get("flags").is_some_and(|f| f.contains('t'))),
            "the tracking connection stayed open with the cache off"
        );
        Ok(())
    });
}

/// The tracking connection's owner on `server`: the client flagged `t`.
fn tracking_clients(server: &datamesh_tests::redis::RedisServer) -> Result<usize> {
    Ok(server
        .client_list()?
        .iter()
        .filter(|c| c.get("flags").is_some_and(|f| f.contains('t')))
        .count())
}

#[test]
fn a_sentinel_failover_moves_tracking_to_the_new_master() {
    run_test(Env::builder().agent(false), |env| {
        let ip = std::net::IpAddr::V4(env.service_ip());
        let group = SentinelGroup::start(ip, 6400, 26400, env.outside_cgroup(), env.run_dir())?;
        let mut cfg = env.base_agent_config()?;
        cfg.endpoints[0].backend = BackendSpec::sentinel(&group.sentinel_addrs(), MASTER_NAME);
        cfg.extra_yaml = config();
        env.start_agent(cfg)?;
        let addr = proxy(env)?;
        let old = group.master_per_sentinel(0)?;
        let mut m = RespConn::connect(old)?;
        m.expect(&["SET", KEY, "v1"], simple("OK"))?;
        let mut c = login(addr, "app", "app-pw")?;
        warm(env, &mut c, "v1")?;
        ensure!(
            tracking_clients(group.server(old)?)? == 1,
            "no tracking connection on the master {old}"
        );

        let f0 = metric(env, "datamesh_proxy_local_cache_flushes_total")?;
        let new = group.failover(Duration::from_secs(30))?;
        let mut n = RespConn::connect(new)?;
        n.expect(&["SET", KEY, "v2"], simple("OK"))?;
        let t0 = Instant::now();
        loop {
            match c.cmd(&["GET", KEY])? {
                r if r == bulk("v2") => break,
                r if r == bulk("v1") && t0.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => bail!(
                    "GET after the failover answered {other:?} ({:?} after the write)",
                    t0.elapsed()
                ),
            }
        }
        eprintln!(
            "failover {old} -> {new}: the new master's write seen after {:?}",
            t0.elapsed()
        );
        warm(env, &mut c, "v2")?;
        ensure!(
            tracking_clients(group.server(new)?)? == 1,
            "no tracking connection on the new master {new}"
        );
        ensure!(
            metric(env, "datamesh_proxy_local_cache_flushes_total")? > f0,
            "the switch did not flush the cache"
        );
        Ok(())
    });
}
