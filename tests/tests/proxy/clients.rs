//! Real clients against the proxy with a standalone backend: redis-cli (commands, inline over a
//! raw socket, `--pipe` mass insert), redis-benchmark, redis-py sync (basics, pipelines,
//! transactions, pub/sub, SELECT, RESP3) and asyncio, AUTH at the proxy with configured users
//! (the proxy using its own backend credentials), and the refusals of MONITOR and CLIENT
//! TRACKING. Where it can, a test compares with the same client talking to the same
//! redis-server directly.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use datamesh_tests::agent::yaml_str;
use datamesh_tests::env::run_test;
use datamesh_tests::proc::{describe, last_chars, run_ok, run_with_timeout, status_text};
use datamesh_tests::proxy::{
    bulk, parse_benchmark_csv, redis_cli, redis_cli_stdin, simple, Outcome, RespConn,
};
use datamesh_tests::resp::{self, Reply};
use datamesh_tests::Env;

use crate::common::{pod_connection_count, proxy_addr, py_node, py_pod};

/// A redis-cli session of commands covering replies of every RESP2 type and server errors.
const CLI_SCRIPT: &str = "PING
ECHO \"hello world\"
SET cli:s value
GET cli:s
APPEND cli:s -more
STRLEN cli:s
GETRANGE cli:s 0 4
INCR cli:n
INCRBY cli:n 10
GET cli:missing
RPUSH cli:l a b c
LRANGE cli:l 0 -1
HSET cli:h f1 v1 f2 v2
HGET cli:h f1
HGETALL cli:h
SADD cli:set x
ZADD cli:z 1 one 2 two
ZRANGE cli:z 0 -1 WITHSCORES
MSET cli:m1 1 cli:m2 2
MGET cli:m1 cli:m2 cli:missing
EXISTS cli:m1 cli:m2 cli:missing
LPUSH cli:s x
NOSUCHCMD a b
TYPE cli:h
TTL cli:s
DEL cli:m1 cli:m2
SETNX cli:s other
GET cli:s
";

#[test]
fn redis_cli_in_pod_matches_direct() {
    run_test(Env::builder().pods(["a"]), |env| {
        let svc = env.service_addr();
        let pod = env.pod("a");
        let before = pod_connection_count(env, pod)?;
        // Same redis-server, different databases (so the two runs do not see each other).
        let direct = redis_cli_stdin(
            Command::new("redis-cli"),
            svc,
            &["-n", "2"],
            CLI_SCRIPT.as_bytes(),
        )?;
        let proxied = redis_cli_stdin(
            pod.cmd("redis-cli"),
            svc,
            &["-n", "3"],
            CLI_SCRIPT.as_bytes(),
        )?;
        ensure!(
            proxied == direct,
            "redis-cli through the proxy printed something else than direct.\n--- direct ---\n{direct}\n--- proxy ---\n{proxied}"
        );
        ensure!(
            direct.contains("WRONGTYPE") && direct.contains("unknown command"),
            "the script lost its error cases:\n{direct}"
        );
        ensure!(
            pod_connection_count(env, pod)? > before,
            "the pod's redis-cli did not go through the proxy"
        );
        // Plain one-shot commands (arguments, not stdin), from the node to the listener.
        let proxy = proxy_addr(env)?;
        let out = redis_cli(
            Command::new("redis-cli"),
            proxy,
            &["SET", "cli:oneshot", "42"],
        )?;
        ensure!(out.trim() == "OK", "redis-cli SET printed {out:?}");
        let out = redis_cli(Command::new("redis-cli"), proxy, &["GET", "cli:oneshot"])?;
        ensure!(out.trim() == "42", "redis-cli GET printed {out:?}");
        // The data is in database 3 of the real server.
        let mut d = RespConn::connect(svc)?;
        d.expect(&["SELECT", "3"], simple("OK"))?;
        d.expect(&["GET", "cli:s"], bulk("value-more"))?;
        Ok(())
    });
}

/// Inline commands as telnet sends them (CRLF or bare LF, quotes, extra spaces, an empty line).
const INLINE: &[u8] = b"PING\r\nSET inline:k \"hello world\"\r\nGET inline:k\r\n  ECHO   'single quoted'  \r\nEXISTS inline:k\n\r\nINCR inline:n\r\nDEL inline:k inline:n\r\n";
const INLINE_REPLIES: usize = 7;

fn inline_session(addr: std::net::SocketAddr) -> Result<Vec<Reply>> {
    let mut c = RespConn::connect(addr)?;
    c.send_raw(INLINE)?;
    let mut replies = Vec::new();
    for _ in 0..INLINE_REPLIES {
        replies.push(c.read()?);
    }
    // Nothing extra (the empty line has no reply): the next reply is our PING's.
    c.send_raw(b"PING\r\n")?;
    let next = c.read()?;
    ensure!(
        next == simple("PONG"),
        "after the inline session {addr} answered {next:?}, expected the PONG of a new PING"
    );
    Ok(replies)
}

#[test]
fn inline_commands_over_a_raw_socket_match_direct() {
    run_test(Env::builder(), |env| {
        let direct = inline_session(env.service_addr())?;
        let proxied = inline_session(proxy_addr(env)?)?;
        ensure!(
            proxied == direct,
            "inline replies differ:\n direct {direct:?}\n proxy  {proxied:?}"
        );
        ensure!(
            proxied[0] == simple("PONG")
                && proxied[2] == bulk("hello world")
                && proxied[3] == bulk("single quoted"),
            "unexpected inline replies {proxied:?}"
        );
        Ok(())
    });
}

/// `n` SET commands in RESP for `redis-cli --pipe`.
fn mass_insert(prefix: &str, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = format!("{prefix}{i}");
        let v = format!("value-{i}");
        out.extend_from_slice(&resp::encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
    }
    out
}

/// The summary line of `redis-cli --pipe` ("errors: 0, replies: N").
fn pipe_summary(out: &str) -> Result<String> {
    out.lines()
        .find(|l| l.starts_with("errors:"))
        .map(str::to_string)
        .with_context(|| format!("redis-cli --pipe printed no summary:\n{out}"))
}

#[test]
fn redis_cli_pipe_mass_insert_matches_direct() {
    run_test(Env::builder().pods(["a"]), |env| {
        const N: usize = 20_000;
        let svc = env.service_addr();
        let direct = redis_cli_stdin(
            Command::new("redis-cli"),
            svc,
            &["--pipe"],
            &mass_insert("pipe:d:", N),
        )?;
        // Through capture, from the pod, to the service address.
        let proxied = redis_cli_stdin(
            env.pod("a").cmd("redis-cli"),
            svc,
            &["--pipe"],
            &mass_insert("pipe:p:", N),
        )?;
        let (ds, ps) = (pipe_summary(&direct)?, pipe_summary(&proxied)?);
        ensure!(
            ds == format!("errors: 0, replies: {N}"),
            "direct --pipe: {ds}"
        );
        ensure!(
            ps == ds,
            "--pipe through the proxy: {ps:?}, direct: {ds:?}\n{proxied}"
        );
        // Every key is in the real server with its value.
        let mut d = RespConn::connect(svc)?;
        for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|i| format!("pipe:p:{i}")).collect();
            let mut args: Vec<&str> = vec!["EXISTS"];
            args.extend(keys.iter().map(String::as_str));
            let got = d.cmd(&args)?;
            ensure!(
                got == Reply::Int(chunk.len() as i64),
                "EXISTS over {} piped keys answered {got:?}",
                chunk.len()
            );
        }
        d.expect(&["GET", "pipe:p:12345"], bulk("value-12345"))?;
        Ok(())
    });
}

#[test]
fn redis_benchmark_in_pod_pipelined_has_no_errors() {
    run_test(
        Env::builder().pods(["a"]).backend_option("pool_size", 4),
        |env| {
            let svc = env.service_addr();
            let conns0 = env
                .redis()
                .info_u64("stats", "total_connections_received")?;
            let mut cmd = env.pod("a").cmd("redis-benchmark");
            cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
                .args([
                    "-t", "set,get", "-c", "50", "-P", "16", "-n", "20000", "--csv",
                ]);
            let out = run_ok(&mut cmd, Duration::from_secs(300))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            eprintln!("redis-benchmark through the proxy:\n{stdout}{stderr}");
            for text in [&stdout, &stderr] {
                ensure!(
                    !text.contains("ERR") && !text.to_lowercase().contains("error"),
                    "redis-benchmark reported errors:\n{stdout}\n{stderr}"
                );
            }
            let rows = parse_benchmark_csv(&stdout)?;
            for t in ["SET", "GET"] {
                let r = rows
                    .iter()
                    .find(|r| r.0 == t)
                    .with_context(|| format!("no {t} row in {rows:?}"))?;
                ensure!(r.1 > 0.0, "{t} did {} ops/s", r.1);
            }
            // The 50 benchmark clients were multiplexed: the backend saw at most the pool (plus
            // the one connection each INFO reading makes, and the node's health-check
            // connection, which opens 500 ms after the pool, possibly during the run).
            let conns = env
                .redis()
                .info_u64("stats", "total_connections_received")?
                - conns0;
            ensure!(
                conns <= 4 + 1 + 1,
                "redis-benchmark's 50 clients made {conns} backend connections (pool_size 4)"
            );
            let v = env.redis().command(&[b"GET", b"key:__rand_int__"])?;
            ensure!(
                matches!(v, Reply::Bulk(Some(_))),
                "the benchmark's SETs did not reach Redis: {v:?}"
            );
            Ok(())
        },
    );
}

#[test]
fn redis_py_basics_pipeline_and_asyncio() {
    run_test(Env::builder().pods(["a"]), |env| {
        let proxy = proxy_addr(env)?;
        py_node("basic", proxy, &[])?;
        py_node("pipeline", proxy, &["--count", "1000"])?;
        let a = py_node("asyncio_gather", proxy, &["--count", "200"])?;
        ensure!(
            a["connections"].as_u64() >= Some(100),
            "asyncio used only {} connections for 200 concurrent commands: {a}",
            a["connections"]
        );
        // The same through capture, from the pod.
        let pod = env.pod("a");
        let before = pod_connection_count(env, pod)?;
        py_pod(pod, "basic", env.service_addr(), &["--prefix", "podbasic:"])?;
        py_pod(
            pod,
            "pipeline",
            env.service_addr(),
            &["--count", "1000", "--prefix", "podpipe:"],
        )?;
        ensure!(
            pod_connection_count(env, pod)? > before,
            "the pod's redis-py did not go through the proxy"
        );
        Ok(())
    });
}

#[test]
fn redis_py_transactions_with_watch_conflict() {
    run_test(Env::builder(), |env| {
        py_node("transaction", proxy_addr(env)?, &[])?;
        Ok(())
    });
}

#[test]
fn redis_py_pubsub_resp2_and_resp3() {
    run_test(Env::builder(), |env| {
        let proxy = proxy_addr(env)?;
        py_node("pubsub", proxy, &["--protocol", "2"])?;
        py_node("pubsub", proxy, &["--protocol", "3", "--prefix", "ps3:"])?;
        Ok(())
    });
}

#[test]
fn redis_py_select_isolates_databases() {
    run_test(Env::builder(), |env| {
        let direct = env.service_addr().to_string();
        py_node("select", proxy_addr(env)?, &["--direct", &direct])?;
        Ok(())
    });
}

#[test]
fn resp3_hello_and_protocol_3_client() {
    run_test(Env::builder(), |env| {
        let proxy = proxy_addr(env)?;
        py_node("resp3", proxy, &[])?;
        // HELLO on a raw socket: RESP3 answers a map, RESP2 an array, an unknown version NOPROTO.
        let mut c = RespConn::connect(proxy)?;
        c.send_raw(&resp::encode(&[b"HELLO", b"3"]))?;
        let first = c.read_raw(1)?;
        ensure!(
            first == b"%",
            "HELLO 3 answered a {:?} frame, expected a RESP3 map",
            String::from_utf8_lossy(&first)
        );
        let mut c = RespConn::connect(proxy)?;
        match c.cmd(&["HELLO", "2"])? {
            Reply::Array(Some(items)) => {
                let proto = items
                    .windows(2)
                    .find(|w| w[0] == bulk("proto"))
                    .map(|w| w[1].clone());
                ensure!(
                    proto == Some(Reply::Int(2)),
                    "HELLO 2 reply lacks proto 2: {items:?}"
                );
            }
            other => anyhow::bail!("HELLO 2 answered {other:?}"),
        }
        match c.cmd(&["HELLO", "4"])? {
            Reply::Error(e) if e.starts_with("NOPROTO") => {}
            other => anyhow::bail!("HELLO 4 answered {other:?}, expected -NOPROTO"),
        }
        c.expect(&["PING"], simple("PONG"))?;
        Ok(())
    });
}

#[test]
fn monitor_and_client_tracking_are_refused_with_a_reason() {
    run_test(Env::builder(), |env| {
        let proxy = proxy_addr(env)?;
        let mut c = RespConn::connect(proxy)?;
        for (args, needle) in [
            (vec!["MONITOR"], "MONITOR"),
            (vec!["CLIENT", "TRACKING", "on"], "TRACKING"),
            (vec!["CLIENT", "TRACKING", "on", "BCAST"], "TRACKING"),
        ] {
            c.send_raw(&resp::encode(
                &args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>(),
            ))?;
            match c.read_outcome(Duration::from_secs(5))? {
                Outcome::Reply(Reply::Error(e)) => {
                    ensure!(e.starts_with("ERR"), "{args:?}: error {e:?} is not an -ERR");
                    ensure!(
                        e.to_uppercase().contains(needle),
                        "{args:?}: error {e:?} does not name {needle}"
                    );
                    ensure!(
                        e.contains("not supported") || e.contains("datamesh"),
                        "{args:?}: error {e:?} gives no reason"
                    );
                    eprintln!("{args:?} -> -{e}");
                }
                other => {
                    anyhow::bail!("{args:?} answered {other:?}, expected -ERR naming the reason")
                }
            }
            // The connection stays usable.
            c.expect(&["PING"], simple("PONG"))?;
        }
        // redis-cli MONITOR ends with the error instead of hanging.
        let mut cmd = Command::new("redis-cli");
        cmd.args([
            "-h",
            &proxy.ip().to_string(),
            "-p",
            &proxy.port().to_string(),
            "MONITOR",
        ]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10))
            .with_context(|| format!("`{}` hung", describe(&cmd)))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            text.contains("MONITOR") && text.contains("ERR"),
            "redis-cli MONITOR ({}) printed {}",
            status_text(out.status),
            last_chars(text.as_bytes(), 500)
        );
        Ok(())
    });
}

#[test]
fn auth_at_the_proxy_with_configured_users_and_own_backend_credentials() {
    let b = Env::builder()
        .agent(false)
        .user("default", "pw-default")
        .user("alice", "pw-alice");
    run_test(b, |env| {
        // The backend requires its own credentials, which only the proxy knows.
        let r = env.redis().command(&[
            b"ACL",
            b"SETUSER",
            b"dmproxy",
            b"on",
            b">proxy-pw",
            b"~*",
            b"&*",
            b"+@all",
        ])?;
        ensure!(r == simple("OK"), "ACL SETUSER answered {r:?}");
        let r = env
            .redis()
            .command(&[b"CONFIG", b"SET", b"requirepass", b"backend-pw"])?;
        ensure!(r == simple("OK"), "CONFIG SET requirepass answered {r:?}");
        env.redis_mut().set_password(Some("backend-pw"));
        let mut cfg = env.base_agent_config()?;
        cfg.endpoints[0].backend = cfg.endpoints[0]
            .backend
            .clone()
            .with("username", yaml_str("dmproxy"))
            .with("password", yaml_str("proxy-pw"));
        env.start_agent(cfg)?;
        let proxy = proxy_addr(env)?;

        py_node(
            "auth",
            proxy,
            &[
                "--password",
                "pw-default",
                "--user",
                "alice",
                "--user-password",
                "pw-alice",
            ],
        )?;

        // Byte level, on one connection: NOAUTH, WRONGPASS, then AUTH and commands.
        let mut c = RespConn::connect(proxy)?;
        match c.cmd(&["GET", "auth:k"])? {
            Reply::Error(e) if e.starts_with("NOAUTH") => {}
            other => anyhow::bail!("GET before AUTH answered {other:?}, expected -NOAUTH"),
        }
        for bad in [
            vec!["AUTH", "nope"],
            vec!["AUTH", "alice", "pw-default"],
            vec!["AUTH", "backend-pw"],
            vec!["AUTH", "dmproxy", "proxy-pw"],
        ] {
            match c.cmd(&bad)? {
                Reply::Error(e) if e.starts_with("WRONGPASS") => {}
                other => anyhow::bail!("{bad:?} answered {other:?}, expected -WRONGPASS"),
            }
        }
        c.expect(&["AUTH", "pw-default"], simple("OK"))?;
        c.expect(&["SET", "auth:k", "v"], simple("OK"))?;
        c.expect(&["AUTH", "alice", "pw-alice"], simple("OK"))?;
        c.expect(&["GET", "auth:k"], bulk("v"))?;

        // The proxy's backend connections authenticated as its own ACL user.
        let list = env.redis().client_list()?;
        let proxy_conns: Vec<_> = list
            .iter()
            .filter(|c| c.get("user").map(String::as_str) == Some("dmproxy"))
            .collect();
        ensure!(
            !proxy_conns.is_empty(),
            "no backend connection authenticated as dmproxy: {list:?}"
        );
        ensure!(
            list.iter().all(|c| matches!(
                c.get("user").map(String::as_str),
                Some("dmproxy") | Some("default")
            )),
            "unexpected backend users: {list:?}"
        );
        Ok(())
    });
}
