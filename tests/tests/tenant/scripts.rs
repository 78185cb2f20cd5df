//! Scripts and functions: their effects are bounded by the proxy's own backend user's Redis
//! ACL (the README's recommended one), and a busy script can be killed by its owner or an
//! operator through the proxy, but not by another tenant.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use std::net::{IpAddr, SocketAddr};

use datamesh_tests::agent::{yaml_str, BackendSpec, Endpoint};
use datamesh_tests::cluster::RedisCluster;
use datamesh_tests::env::{run_test, ENDPOINT_NAME};
use datamesh_tests::proxy::{bulk, simple, RespConn};
use datamesh_tests::resp::{self, Reply};
use datamesh_tests::{wait_until, Env};

use crate::common::{expect_error, login, proxy_addr, users_yaml, Bystander};

/// The README's recommended ACL of the proxy's backend user (`backend.username`): what tenants
/// may run (the default tenant policy) plus what the proxy sends itself (ROLE).
pub const RECOMMENDED_BACKEND_ACL: &[&str] = &[
    "on",
    "~*",
    "&*",
    "+@all",
    "-@admin",
    "-@dangerous",
    "+sort",
    "+sort_ro",
    "+info",
    "+role",
    "-script|flush",
    "-function|load",
    "-function|flush",
    "-function|delete",
    "-function|restore",
];

#[test]
fn scripts_are_bounded_by_the_backend_users_acl() {
    run_test(Env::builder().agent(false), |env| {
        let mut setuser: Vec<&[u8]> = vec![b"ACL", b"SETUSER", b"datamesh", b">proxy-pw"];
        setuser.extend(RECOMMENDED_BACKEND_ACL.iter().map(|r| r.as_bytes()));
        let r = env.redis().command(&setuser)?;
        ensure!(r == simple("OK"), "ACL SETUSER answered {r:?}");
        let target = env.start_redis(6390)?.addr();
        let source = env.redis().addr();
        env.redis().command(&[b"SET", b"mig:k", b"precious"])?;

        let mut cfg = env.base_agent_config()?;
        cfg.endpoints[0].backend = cfg.endpoints[0]
            .backend
            .clone()
            .with("username", yaml_str("datamesh"))
            .with("password", yaml_str("proxy-pw"));
        cfg.extra_yaml = users_yaml(&[("app", "app-pw", None), ("ops", "ops-pw", Some("+@all"))]);
        env.start_agent(cfg)?;
        let proxy = proxy_addr(env)?;
        let bystander = Bystander::start(login(proxy, "app", "app-pw")?, "scripts");
        let mut app = login(proxy, "app", "app-pw")?;

        // MIGRATE from a script: refused by the backend user's ACL, nothing moves.
        let ip = target.ip().to_string();
        let port = target.port().to_string();
        let r = app.cmd(&[
            "EVAL",
            "return redis.call('MIGRATE', ARGV[1], ARGV[2], 'mig:k', 0, 1000)",
            "0",
            &ip,
            &port,
        ])?;
        match &r {
            Reply::Error(e) if e.contains("can't run this command") => {
                eprintln!("EVAL MIGRATE -> -{e}")
            }
            other => bail!("EVAL of MIGRATE answered {other:?}"),
        }
        ensure!(
            env.redis().command(&[b"GET", b"mig:k"])? == bulk("precious"),
            "the key left {source}"
        );
        let t = RespConn::connect(target)?.cmd(&["EXISTS", "mig:k"])?;
        ensure!(t == Reply::Int(0), "the key arrived at {target}: {t:?}");

        // FLUSHALL from a script: refused, nothing flushed.
        match app.cmd(&["EVAL", "redis.call('FLUSHALL')", "0"])? {
            Reply::Error(e) if e.contains("can't run this command") => {
                eprintln!("EVAL FLUSHALL -> -{e}")
            }
            other => bail!("EVAL of FLUSHALL answered {other:?}"),
        }
        ensure!(
            env.redis().command(&[b"GET", b"mig:k"])? == bulk("precious"),
            "FLUSHALL from a script flushed the backend"
        );
        // Ordinary scripts work.
        app.expect(
            &["EVAL", "return redis.call('GET', KEYS[1])", "1", "mig:k"],
            bulk("precious"),
        )?;
        // The trade-off: the backend user bounds operators too.
        let mut ops = login(proxy, "ops", "ops-pw")?;
        let e = expect_error(
            &mut ops,
            &["CONFIG", "SET", "maxmemory", "0"],
            "NOPERM",
            &[],
        )?;
        eprintln!("operator CONFIG SET through a restricted backend user -> -{e}");
        let n = bystander.finish()?;
        eprintln!("bystander: {n} SET/GET round trips, no error");
        Ok(())
    });
}

/// Waits until the backend answers PING with BUSY (a script has run past the threshold).
fn wait_busy(env: &Env) -> Result<()> {
    wait_until(
        "the backend to be BUSY with the script",
        Duration::from_secs(10),
        || {
            Ok(matches!(env.redis().command(&[b"PING"])?, Reply::Error(e) if e.starts_with("BUSY")).then_some(()))
        },
    )
}

/// Reads the killed script's reply on `c`.
fn expect_killed(c: &mut RespConn, what: &str) -> Result<()> {
    match c.read()? {
        Reply::Error(e) if e.contains("killed") => {
            eprintln!("{what} -> -{e}");
            Ok(())
        }
        other => bail!("{what} answered {other:?}, expected the killed-script error"),
    }
}

#[test]
fn script_kill_is_for_the_scripts_owner_or_an_operator() {
    run_test(Env::builder().agent(false), |env| {
        for args in [
            &[&b"CONFIG"[..], b"SET", b"busy-reply-threshold", b"200"][..],
            &[
                b"FUNCTION",
                b"LOAD",
                b"#!lua name=spin\nredis.register_function('spin', function() while true do end end)",
            ],
        ] {
            let r = env.redis().command(args)?;
            ensure!(!matches!(r, Reply::Error(_)), "{r:?}");
        }
        let mut cfg = env.base_agent_config()?;
        cfg.extra_yaml = users_yaml(&[
            ("app", "app-pw", None),
            ("other", "other-pw", None),
            ("ops", "ops-pw", Some("+@all")),
        ]);
        env.start_agent(cfg)?;
        let proxy = proxy_addr(env)?;
        let mut bystander = login(proxy, "other", "other-pw")?;
        bystander.expect(&["SET", "k", "v"], simple("OK"))?;
        let mut other = login(proxy, "other", "other-pw")?;
        let mut ops = login(proxy, "ops", "ops-pw")?;
        let mut app_killer = login(proxy, "app", "app-pw")?;

        // Nothing runs: the owner rule gives nothing to kill, an operator gets Redis's answer.
        expect_error(
            &mut app_killer,
            &["SCRIPT", "KILL"],
            "NOPERM",
            &["no script running"],
        )?;
        expect_error(&mut ops, &["SCRIPT", "KILL"], "NOTBUSY", &[])?;

        // 1. EVAL busy loop; another tenant may not kill it, its owner does.
        let mut app = login(proxy, "app", "app-pw")?;
        app.send_raw(&resp::encode(&[b"EVAL", b"while true do end", b"0"]))?;
        wait_busy(env)?;
        let e = expect_error(
            &mut other,
            &["SCRIPT", "KILL"],
            "NOPERM",
            &["User other (pod node)", "script|kill"],
        )?;
        eprintln!("another tenant's SCRIPT KILL -> -{e}");
        let t = Instant::now();
        app_killer.expect(&["SCRIPT", "KILL"], simple("OK"))?;
        eprintln!("owner's SCRIPT KILL answered OK in {:?}", t.elapsed());
        expect_killed(&mut app, "the busy EVAL")?;
        bystander.expect(&["GET", "k"], bulk("v"))?;

        // 2. FCALL busy function; an operator kills it.
        app.send_raw(&resp::encode(&[b"FCALL", b"spin", b"0"]))?;
        wait_busy(env)?;
        expect_error(
            &mut other,
            &["FUNCTION", "KILL"],
            "NOPERM",
            &["function|kill"],
        )?;
        ops.expect(&["FUNCTION", "KILL"], simple("OK"))?;
        expect_killed(&mut app, "the busy FCALL")?;

        // Everyone works again.
        bystander.expect(&["GET", "k"], bulk("v"))?;
        app.expect(&["GET", "k"], bulk("v"))?;
        let b = Bystander::start(login(proxy, "other", "other-pw")?, "after-kill");
        std::thread::sleep(Duration::from_millis(100));
        b.finish()?;
        Ok(())
    });
}

#[test]
fn script_kill_in_cluster_mode_reaches_the_node_running_the_script() {
    run_test(Env::builder().agent(false), |env| {
        let ip = IpAddr::V4(env.service_ip());
        let cluster = RedisCluster::start(ip, 7000, 3, env.outside_cgroup(), env.run_dir())?;
        for n in &cluster.nodes {
            n.command(&[b"CONFIG", b"SET", b"busy-reply-threshold", b"200"])?;
        }
        let mut cfg = env.base_agent_config()?;
        cfg.endpoints = vec![Endpoint::new(
            ENDPOINT_NAME,
            SocketAddr::new(ip, 6390),
            BackendSpec::cluster(&cluster.addrs()),
        )];
        cfg.extra_yaml = users_yaml(&[
            ("app", "app-pw", None),
            ("other", "other-pw", None),
            ("ops", "ops-pw", Some("+@all")),
        ]);
        env.start_agent(cfg)?;
        let proxy = proxy_addr(env)?;
        let key = "{spin}:k";
        let owner = cluster.owner_of_key(key)?;
        let mut ops = login(proxy, "ops", "ops-pw")?;
        let mut other = login(proxy, "other", "other-pw")?;
        let mut killer = login(proxy, "app", "app-pw")?;
        let mut app = login(proxy, "app", "app-pw")?;
        app.expect(&["SET", key, "v"], simple("OK"))?;
        // Every master answers NOTBUSY: merged into one NOTBUSY for the operator.
        expect_error(&mut ops, &["SCRIPT", "KILL"], "NOTBUSY", &[])?;

        app.send_raw(&resp::encode(&[
            b"EVAL",
            b"while true do end",
            b"1",
            key.as_bytes(),
        ]))?;
        wait_until("the key's node to be BUSY", Duration::from_secs(10), || {
            Ok(matches!(cluster.nodes[owner].command(&[b"PING"])?, Reply::Error(e) if e.starts_with("BUSY")).then_some(()))
        })?;
        expect_error(&mut other, &["SCRIPT", "KILL"], "NOPERM", &["script|kill"])?;
        killer.expect(&["SCRIPT", "KILL"], simple("OK"))?;
        expect_killed(&mut app, "the busy EVAL on a cluster node")?;
        app.expect(&["GET", key], bulk("v"))?;
        other.expect(&["GET", key], bulk("v"))?;
        Ok(())
    });
}
