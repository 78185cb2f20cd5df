//! Big keys through the real agent and pods (issue 10, item 4): the request-size guard
//! (`proxy.max_value_bytes`) refuses a SET/HSET/RPUSH whose value is over the limit with an
//! error naming it, writes nothing on Redis and counts the refusal per pod; big replies (an
//! HGETALL of a 20000-field hash, a GET of a 2 MiB value) are listed at `/bigkeys` with the
//! pod that read them, and by `datamesh-agent bigkeys`; with `bigkeys.refuse` a command that gave a
//! big reply is refused for pods when repeated (not for node-local clients) until `refuse_s`.
//!
//! Clients are redis-cli inside the pods, dialling the endpoint address (captured: the proxy
//! knows their pod). Each test builds its own `Env` and tears it down, also on failure.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::proc::run_with_timeout;
use datamesh_tests::proxy::pod_cli;
use datamesh_tests::resp::Reply;
use datamesh_tests::tenant::metric_line;
use datamesh_tests::{wait_until, Env};

const LIMIT: usize = 1024;

fn exists(env: &Env, key: &str) -> Result<bool> {
    Ok(env.redis().command(&[b"EXISTS", key.as_bytes()])? == Reply::Int(1))
}

#[test]
fn value_guard_refuses_big_writes_per_pod() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .proxy_setting("max_value_bytes", LIMIT),
        |env| {
            let (a, b) = (env.pod("a"), env.pod("b"));
            let big = "x".repeat(LIMIT + 1);
            let small = "y".repeat(LIMIT);

            let out = pod_cli(env, a, &["SET", "bk:set", &big])?;
            let want = format!(
                "ERR datamesh proxy: value of {} bytes for SET is over max_value_bytes ({LIMIT})",
                LIMIT + 1
            );
            ensure!(out.contains(&want), "SET over the limit: {out:?}");
            let out = pod_cli(env, a, &["HSET", "bk:hash", "f", "1", "g", &big])?;
            ensure!(
                out.contains("for HSET is over max_value_bytes"),
                "HSET: {out:?}"
            );
            let out = pod_cli(env, a, &["RPUSH", "bk:list", "a", &big])?;
            ensure!(
                out.contains("for RPUSH is over max_value_bytes"),
                "RPUSH: {out:?}"
            );
            let out = pod_cli(env, b, &["SETEX", "bk:setex", "100", &big])?;
            ensure!(
                out.contains("for SETEX is over max_value_bytes"),
                "SETEX: {out:?}"
            );
            for k in ["bk:set", "bk:hash", "bk:list", "bk:setex"] {
                ensure!(!exists(env, k)?, "{k} was written on Redis after a refusal");
            }
            // Keys and field names are not values: a long field name with a small value passes;
            // so does a value at the limit.
            let out = pod_cli(env, a, &["SET", "bk:ok", &small])?;
            ensure!(out.trim() == "OK", "SET at the limit: {out:?}");
            let out = pod_cli(env, a, &["HSET", "bk:h2", &big, "1"])?;
            ensure!(out.trim() == "1", "HSET with a long field name: {out:?}");
            ensure!(exists(env, "bk:ok")? && exists(env, "bk:h2")?);
            // An arity error stays Redis's (the proxy checks arity first, as Redis does).
            let out = pod_cli(env, a, &["HSET", "bk:h3", "f"])?;
            ensure!(
                out.contains("wrong number of arguments"),
                "HSET arity: {out:?}"
            );

            let pa = a.netns_name();
            let pb = b.netns_name();
            let line = |pod: &str, cmd: &str| {
                format!("datamesh_proxy_big_value_refused_total{{endpoint=\"cache\",pod=\"{pod}\",command=\"{cmd}\"}}")
            };
            ensure!(
                metric_line(env, &line(pa, "set"))? == 1,
                "pod a's SET refusals"
            );
            ensure!(
                metric_line(env, &line(pa, "hset"))? == 1,
                "pod a's HSET refusals"
            );
            ensure!(
                metric_line(env, &line(pa, "rpush"))? == 1,
                "pod a's RPUSH refusals"
            );
            ensure!(
                metric_line(env, &line(pb, "setex"))? == 1,
                "pod b's SETEX refusals"
            );
            ensure!(
                metric_line(env, &line(pb, "set"))? == 0,
                "pod b has SET refusals"
            );

            // Hot reload: the guard off (max_value_bytes 0) without a restart.
            let mut cfg = env.agent().config().clone();
            cfg.proxy.retain(|(k, _)| k != "max_value_bytes");
            env.agent_mut().write_config(cfg)?;
            env.agent().sighup()?;
            let (a, big) = (env.pod("a"), big.clone());
            wait_until(
                "the guard to be off after a reload",
                Duration::from_secs(5),
                || Ok((pod_cli(env, a, &["SET", "bk:set", &big])?.trim() == "OK").then_some(())),
            )?;
            ensure!(exists(env, "bk:set")?);
            Ok(())
        },
    );
}

#[test]
fn big_replies_listed_per_key_and_pod() {
    run_test(Env::builder().pods(["a"]), |env| {
        const FIELDS: usize = 20_000;
        let mut hset: Vec<Vec<u8>> = vec![b"HSET".to_vec(), b"bk:hash".to_vec()];
        for i in 0..FIELDS {
            hset.push(format!("f{i}").into_bytes());
            hset.push(format!("v{i}").into_bytes());
        }
        let args: Vec<&[u8]> = hset.iter().map(Vec::as_slice).collect();
        ensure!(env.redis().command(&args)? == Reply::Int(FIELDS as i64));
        let value = vec![b'v'; 2 * 1024 * 1024];
        env.redis()
            .command(&[b"SET", b"bk:str", &value])
            .context("SET of the 2 MiB value")?;
        env.redis().command(&[b"SET", b"bk:small", b"1"])?;

        let a = env.pod("a");
        let out = pod_cli(env, a, &["HGETALL", "bk:hash"])?;
        ensure!(out.lines().count() >= 2 * FIELDS, "HGETALL came back short");
        let out = pod_cli(env, a, &["GET", "bk:str"])?;
        ensure!(out.len() > 2 * 1024 * 1024, "GET came back short");
        pod_cli(env, a, &["GET", "bk:small"])?;

        let pa = a.netns_name().to_string();
        let doc = wait_until("/bigkeys to list both keys", Duration::from_secs(5), || {
            let (code, body) = env.agent().http_get("/bigkeys")?;
            ensure!(code == 200, "/bigkeys answered {code}: {body}");
            let doc: serde_json::Value = serde_json::from_str(&body)?;
            let n = doc["endpoints"]["cache"].as_array().map_or(0, Vec::len);
            Ok((n >= 2).then_some(doc))
        })?;
        eprintln!("/bigkeys: {doc}");
        let rows = doc["endpoints"]["cache"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let row = |key: &str| rows.iter().find(|r| r["key"] == key).cloned();
        let h = row("bk:hash").context("bk:hash not listed")?;
        ensure!(h["command"] == "hgetall" && h["count"] == 1, "{h}");
        ensure!(h["max_elements"].as_u64() == Some(2 * FIELDS as u64), "{h}");
        ensure!(h["top_pods"][0]["pod"] == pa.as_str(), "{h}");
        let s = row("bk:str").context("bk:str not listed")?;
        ensure!(s["command"] == "get", "{s}");
        ensure!(s["max_bytes"].as_u64() > Some(2 * 1024 * 1024), "{s}");
        ensure!(s["top_pods"][0]["pod"] == pa.as_str(), "{s}");
        ensure!(row("bk:small").is_none(), "a small GET was listed");
        let total = format!("datamesh_proxy_big_replies_total{{endpoint=\"cache\",pod=\"{pa}\"}}");
        ensure!(metric_line(env, &total)? == 2, "big replies of pod a");

        // The CLI prints the same.
        let admin = env.agent().ready()?.admin.to_string();
        let mut cmd: Command = env.agent().cli();
        cmd.args(["bigkeys", "--admin", &admin]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10))?;
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("datamesh-agent bigkeys:\n{text}");
        ensure!(
            out.status.success(),
            "datamesh-agent bigkeys failed: {out:?}"
        );
        let line = |k: &str| {
            text.lines()
                .find(|l| l.contains(k))
                .unwrap_or("")
                .to_string()
        };
        let lh = line("bk:hash");
        ensure!(
            lh.contains("hgetall") && lh.contains("40000") && lh.contains(&pa),
            "{text}"
        );
        ensure!(line("bk:str").contains("get"), "{text}");
        Ok(())
    });
}

/// `bigkeys.refuse`: once a pod's command gave a big reply, the same command (key and
/// arguments) is refused for pods for `refuse_s`, with an error naming the key, the size and
/// how to read it in parts; other commands on the key, other ranges and node-local clients
/// go through, and after `refuse_s` it is let through again (and refused again if still big).
#[test]
fn refuse_repeats_big_replies_for_pods() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .extra_config("bigkeys:\n  reply_elements: 100\n  refuse: true\n  refuse_s: 2\n"),
        |env| {
            let mut hset: Vec<Vec<u8>> = vec![b"HSET".to_vec(), b"bk:hash".to_vec()];
            for i in 0..200 {
                hset.push(format!("f{i}").into_bytes());
                hset.push(b"v".to_vec());
            }
            let args: Vec<&[u8]> = hset.iter().map(Vec::as_slice).collect();
            ensure!(env.redis().command(&args)? == Reply::Int(200));
            let mut rpush: Vec<Vec<u8>> = vec![b"RPUSH".to_vec(), b"bk:list".to_vec()];
            rpush.extend((0..200).map(|i| format!("e{i}").into_bytes()));
            let args: Vec<&[u8]> = rpush.iter().map(Vec::as_slice).collect();
            ensure!(env.redis().command(&args)? == Reply::Int(200));
            let (a, b) = (env.pod("a"), env.pod("b"));

            // The first HGETALL is answered (and found big), the next is refused, for any pod.
            let out = pod_cli(env, a, &["HGETALL", "bk:hash"])?;
            ensure!(out.lines().count() >= 400, "first HGETALL: {out}");
            let out = pod_cli(env, a, &["HGETALL", "bk:hash"])?;
            ensure!(
                out.contains("HGETALL of key bk:hash gave a big reply")
                    && out.contains("bigkeys.refuse")
                    && out.contains("HSCAN"),
                "second HGETALL: {out}"
            );
            let out = pod_cli(env, b, &["HGETALL", "bk:hash"])?;
            ensure!(out.contains("bigkeys.refuse"), "pod b's HGETALL: {out}");
            // Other commands on the key, and other ranges, go through.
            ensure!(pod_cli(env, a, &["HLEN", "bk:hash"])?.trim() == "200");
            let out = pod_cli(env, a, &["LRANGE", "bk:list", "0", "-1"])?;
            ensure!(out.lines().count() == 200, "first LRANGE: {out}");
            let out = pod_cli(env, a, &["LRANGE", "bk:list", "0", "-1"])?;
            ensure!(out.contains("bigkeys.refuse"), "second LRANGE 0 -1: {out}");
            let out = pod_cli(env, a, &["LRANGE", "bk:list", "0", "9"])?;
            ensure!(out.lines().count() == 10, "LRANGE 0 9: {out}");
            // A node-local client (an operator's tool on the node) is never refused.
            let proxy = env.agent().proxy_addr("cache")?;
            let mut node = datamesh_tests::proxy::RespConn::connect(proxy)?;
            match node.cmd_bytes(&[b"HGETALL", b"bk:hash"])? {
                Reply::Array(Some(v)) => {
                    ensure!(v.len() == 400, "node HGETALL: {} elements", v.len())
                }
                other => anyhow::bail!("node-local HGETALL: {other:?}"),
            }
            let pa = a.netns_name().to_string();
            let refused = format!(
                "datamesh_proxy_big_reply_refused_total{{endpoint=\"cache\",pod=\"{pa}\",command=\"hgetall\"}}"
            );
            ensure!(
                metric_line(env, &refused)? == 1,
                "refusals of pod a's HGETALL"
            );
            // After refuse_s it goes through once more (still big: refused again after).
            std::thread::sleep(Duration::from_millis(2100));
            let out = pod_cli(env, a, &["HGETALL", "bk:hash"])?;
            ensure!(out.lines().count() >= 400, "HGETALL after refuse_s: {out}");
            let out = pod_cli(env, a, &["HGETALL", "bk:hash"])?;
            ensure!(out.contains("bigkeys.refuse"), "HGETALL right after: {out}");
            Ok(())
        },
    );
}
