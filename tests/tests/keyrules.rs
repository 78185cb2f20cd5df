//! Key rules with the real agent, a real redis-server and real clients in pods (issue 10,
//! items 2 and 5's deny rules): a throttle rule from the config delays and then refuses one
//! hot key for one pod while another pod and another key go through; deny rules by command and
//! by key pattern for one namespace (the netns-name fallback: `shop.a` is in namespace
//! `dmt<N>-shop`); a runtime rule added and removed through the admin API with the token (and
//! refused without it); the automatic mode throttling a key hammered above the threshold.
//!
//! Pipelined load comes from a few lines of Python with a raw socket in the pod (every reply
//! printed, so the test reads the error texts); one-off commands from redis-cli in the pod.
//! Each test builds its own `Env` and tears it down, also on failure.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use datamesh_tests::agent::http_request;
use datamesh_tests::agent::{http_get_auth, yaml_str};
use datamesh_tests::env::run_test;
use datamesh_tests::pod::Pod;
use datamesh_tests::proc::{run_with_input, run_with_timeout};
use datamesh_tests::proxy::pod_cli;
use datamesh_tests::tenant::metric_line;
use datamesh_tests::{wait_until, Env};
use serde_json::Value;

/// Sends `n` copies of the command `args` in one write (a pipeline) and prints one line per
/// reply (`+OK`, `$-1`, `-ERR ...`; bulk payloads skipped).
const PIPELINE_PY: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = [a.encode() for a in sys.argv[4:]]
one = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
s = socket.create_connection((host, port))
s.sendall(one * n)
f = s.makefile("rb")
for _ in range(n):
    line = f.readline()
    if line[:1] == b"$" and line[1:2] != b"-":
        f.read(int(line[1:]) + 2)
    print(line.decode(errors="replace").strip(), flush=True)
"#;

/// The replies of `n` pipelined `args` from `pod`, and how long they took.
fn pipeline(env: &Env, pod: &Pod, n: usize, args: &[&str]) -> Result<(Vec<String>, Duration)> {
    let svc = env.service_addr();
    let mut cmd = pod.cmd("python3");
    cmd.args(["-c", PIPELINE_PY])
        .args([svc.ip().to_string(), svc.port().to_string(), n.to_string()])
        .args(args);
    let t = Instant::now();
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20))?;
    let took = t.elapsed();
    ensure!(
        out.status.success(),
        "pipeline client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ensure!(
        lines.len() == n,
        "{} replies of {n}: {lines:?}",
        lines.len()
    );
    Ok((lines, took))
}

fn keyrules(env: &Env) -> Result<Value> {
    let (status, body) = env.agent().http_get("/keyrules")?;
    ensure!(status == 200, "/keyrules answered {status}: {body}");
    serde_json::from_str(&body).context("/keyrules is not JSON")
}

/// The rule `id` of a `/keyrules` reply.
fn rule<'a>(v: &'a Value, id: &str) -> Option<&'a Value> {
    v["rules"]
        .as_array()?
        .iter()
        .find(|r| r["id"].as_str() == Some(id))
}

/// A rule's count `what` (delayed, refused, denied) for `pod`.
fn count(r: &Value, pod: &str, what: &str) -> u64 {
    r["counts"]
        .as_array()
        .and_then(|c| c.iter().find(|p| p["pod"].as_str() == Some(pod)))
        .and_then(|p| p[what].as_u64())
        .unwrap_or(0)
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", path.display()))
}

#[test]
fn a_throttle_rule_delays_then_refuses_one_key_for_one_pod() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .proxy_setting("throttle_max_delay_ms", 200)
            .extra_config(
                "key_rules:\n  - {id: hot, key: 'hot:*', pods: ['*-a'], action: throttle, rate: 20, burst: 2}\n",
            ),
        |env| {
            let pod_a = format!("dmt{}-a", env.n());
            let (a, b) = (env.pod("a"), env.pod("b"));
            // 30 pipelined GETs of the hot key from pod a: 2 at once (the burst), a few
            // delayed 50 ms apart up to 200 ms, the rest refused.
            let (replies, took) = pipeline(env, a, 30, &["GET", "hot:1"])?;
            let refused: Vec<&String> = replies.iter().filter(|r| r.starts_with('-')).collect();
            let ok = replies.len() - refused.len();
            eprintln!("pod a: {ok} answered, {} refused in {took:?}", refused.len());
            ensure!(
                (3..=8).contains(&ok),
                "burst plus the delayed ones answered: {replies:?}"
            );
            ensure!(
                refused
                    .iter()
                    .all(|r| *r == "-ERR throttled: key hot:1 is over its rate limit (rule hot)"),
                "refusals: {refused:?}"
            );
            ensure!(
                took >= Duration::from_millis(100),
                "the delayed commands waited: {took:?}"
            );
            // Another key from pod a, and the hot key from pod b: untouched.
            let (replies, _) = pipeline(env, a, 30, &["GET", "cold:1"])?;
            ensure!(
                replies.iter().all(|r| r == "$-1"),
                "another key: {replies:?}"
            );
            let (replies, _) = pipeline(env, b, 30, &["GET", "hot:1"])?;
            ensure!(
                replies.iter().all(|r| r == "$-1"),
                "another pod: {replies:?}"
            );
            // Counted per rule and pod, in /keyrules and the metric.
            let v = keyrules(env)?;
            let r = rule(&v, "hot").context("rule hot listed")?;
            ensure!(r["origin"] == "config", "{r}");
            ensure!(
                count(r, &pod_a, "delayed") >= 1 && count(r, &pod_a, "refused") as usize == refused.len(),
                "counts: {r}"
            );
            let m = metric_line(
                env,
                &format!("datamesh_proxy_key_throttled_total{{endpoint=\"cache\",rule=\"hot\",pod=\"{pod_a}\"}}"),
            )?;
            ensure!(m >= refused.len() as u64, "metric {m}");
            // The CLI lists it.
            let admin = env.agent().ready()?.admin.to_string();
            let out = datamesh_tests::proc::run_ok(
                env.agent().cli().args(["keyrules", "list", "--admin", &admin]),
                Duration::from_secs(10),
            )?;
            let table = String::from_utf8_lossy(&out.stdout);
            ensure!(
                table.lines().any(|l| l.starts_with("hot ") && l.contains("hot:*") && l.contains(&pod_a)),
                "datamesh-agent keyrules:\n{table}"
            );
            // A reload without the rule: pod a's pipeline goes through whole.
            let mut cfg = env.agent().config().clone();
            cfg.extra_yaml = String::new();
            env.agent_mut().write_config(cfg)?;
            env.agent().sighup()?;
            wait_until("the reload to drop rule hot", Duration::from_secs(10), || {
                Ok(rule(&keyrules(env)?, "hot").is_none().then_some(()))
            })?;
            let (replies, _) = pipeline(env, env.pod("a"), 30, &["GET", "hot:1"])?;
            ensure!(
                replies.iter().all(|r| r == "$-1"),
                "after the reload: {replies:?}"
            );
            Ok(())
        },
    );
}

#[test]
fn deny_rules_by_command_and_by_key_for_one_namespace() {
    run_test(
        Env::builder().pods(["shop.a", "blog.b"]).extra_config(
            "key_rules:\n  - {id: no-scan, commands: [keys, scan], namespaces: ['*-shop'], action: deny}\n  - {id: secrets, key: 'secret:*', namespaces: ['*-shop'], action: deny}\n",
        ),
        |env| {
            let n = env.n();
            let (shop, blog) = (env.pod("shop.a"), env.pod("blog.b"));
            let shop_pod = format!("dmt{n}-shop.a");
            let denied = |rule: &str| {
                format!("NOPERM this command or key is denied for pod {shop_pod} by key rule {rule}")
            };
            env.redis().command(&[b"SET", b"secret:1", b"s"])?;
            env.redis().command(&[b"SET", b"public", b"p"])?;
            let out = pod_cli(env, shop, &["KEYS", "*"])?;
            ensure!(out.contains(&denied("no-scan")), "KEYS from shop: {out:?}");
            let out = pod_cli(env, shop, &["SCAN", "0"])?;
            ensure!(out.contains(&denied("no-scan")), "SCAN from shop: {out:?}");
            let out = pod_cli(env, shop, &["GET", "secret:1"])?;
            ensure!(out.contains(&denied("secrets")), "GET secret from shop: {out:?}");
            let out = pod_cli(env, shop, &["MGET", "public", "secret:1"])?;
            ensure!(out.contains(&denied("secrets")), "MGET with a secret key: {out:?}");
            let out = pod_cli(env, shop, &["GET", "public"])?;
            ensure!(out.trim() == "p", "GET public from shop: {out:?}");
            // Inside MULTI the denial aborts the transaction (like a policy refusal).
            let svc = env.service_addr();
            let mut cmd = shop.cmd("redis-cli");
            cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()]);
            let out = run_with_input(
                &mut cmd,
                b"MULTI\nSET public q\nGET secret:1\nEXEC\nGET public\n",
                Duration::from_secs(20),
            )?;
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            ensure!(
                out.contains(&denied("secrets")) && out.contains("EXECABORT") && out.trim_end().ends_with('p'),
                "MULTI with a denied key: {out:?}"
            );
            // Another namespace: nothing denied.
            let out = pod_cli(env, blog, &["SCAN", "0", "MATCH", "secret:*", "COUNT", "100"])?;
            ensure!(out.contains("secret:1"), "SCAN from blog: {out:?}");
            let out = pod_cli(env, blog, &["GET", "secret:1"])?;
            ensure!(out.trim() == "s", "GET secret from blog: {out:?}");
            // Logged in the ACL LOG (the pod sees its own entries), counted per rule and pod.
            let log = pod_cli(env, shop, &["ACL", "LOG"])?;
            ensure!(log.contains("secret:1") && log.contains("key"), "ACL LOG: {log}");
            let v = keyrules(env)?;
            let r = rule(&v, "secrets").context("rule secrets")?;
            ensure!(count(r, &shop_pod, "denied") == 3, "{r}");
            let m = metric_line(
                env,
                &format!("datamesh_proxy_key_denied_total{{endpoint=\"cache\",rule=\"no-scan\",pod=\"{shop_pod}\"}}"),
            )?;
            ensure!(m == 2, "no-scan metric {m}");
            Ok(())
        },
    );
}

#[test]
fn runtime_rules_through_the_admin_api_need_the_token() {
    run_test(Env::builder().pods(["a", "b"]), |env| {
        let admin = env.agent().ready()?.admin;
        let body = r#"{"id": "block-x", "key": "x:*", "pods": ["*-a"], "action": "deny"}"#;
        // No admin_token_file: changes are refused, reading is not.
        let (st, msg) = http_request(admin, "POST", "/keyrules", body, None)?;
        ensure!(st == 403 && msg.contains("admin_token_file"), "{st} {msg}");
        let (st, _) = http_request(admin, "DELETE", "/keyrules/block-x", "", None)?;
        ensure!(st == 403, "DELETE without a token file: {st}");

        // Set a token by reload.
        let token_file = env.run_dir().join("admin-token");
        write_secret(&token_file, "tok-1\n")?;
        let mut cfg = env.agent().config().clone();
        cfg.extra_yaml.push_str(&format!(
            "admin_token_file: {}\n",
            yaml_str(&token_file.display().to_string())
        ));
        env.agent_mut().write_config(cfg)?;
        env.agent().sighup()?;
        wait_until(
            "the reload to require the token",
            Duration::from_secs(10),
            || Ok((http_get_auth(admin, "/keyrules", None)?.0 == 401).then_some(())),
        )?;
        let (st, _) = http_request(admin, "POST", "/keyrules", body, None)?;
        ensure!(st == 401, "POST without the token: {st}");
        let (st, msg) = http_request(admin, "POST", "/keyrules", body, Some("tok-2"))?;
        ensure!(st == 401, "POST with a wrong token: {st} {msg}");
        // A bad rule: every bad field, nothing added.
        let (st, msg) = http_request(
            admin,
            "POST",
            "/keyrules",
            r#"{"key": "y", "action": "throttle", "endpoint": "nope", "colour": 1}"#,
            Some("tok-1"),
        )?;
        ensure!(
            st == 400 && msg.contains("endpoint") && msg.contains("rate") && msg.contains("colour"),
            "{st} {msg}"
        );
        let (st, msg) = http_request(admin, "POST", "/keyrules", body, Some("tok-1"))?;
        ensure!(st == 201 && msg.contains("block-x"), "{st} {msg}");
        let (st, _) = http_request(admin, "POST", "/keyrules", body, Some("tok-1"))?;
        ensure!(st == 409, "the same id again: {st}");

        let pod_a = format!("dmt{}-a", env.n());
        let (a, b) = (env.pod("a"), env.pod("b"));
        let out = pod_cli(env, a, &["GET", "x:1"])?;
        ensure!(
            out.contains(&format!(
                "NOPERM this command or key is denied for pod {pod_a} by key rule block-x"
            )),
            "pod a: {out:?}"
        );
        let out = pod_cli(env, b, &["SET", "x:1", "v"])?;
        ensure!(out.trim() == "OK", "pod b: {out:?}");
        let (_, list) = http_get_auth(admin, "/keyrules", Some("tok-1"))?;
        let v: Value = serde_json::from_str(&list)?;
        let r = rule(&v, "block-x").context("listed")?;
        ensure!(
            r["origin"] == "runtime" && count(r, &pod_a, "denied") == 1,
            "{r}"
        );
        // A config reload (a rule of the file added) keeps the runtime rule.
        let mut cfg = env.agent().config().clone();
        cfg.extra_yaml
            .push_str("key_rules:\n  - {id: from-file, commands: [flushall], action: deny}\n");
        env.agent_mut().write_config(cfg)?;
        env.agent().sighup()?;
        let v = wait_until(
            "the reload to add rule from-file",
            Duration::from_secs(10),
            || {
                let (_, list) = http_get_auth(admin, "/keyrules", Some("tok-1"))?;
                let v: Value = serde_json::from_str(&list)?;
                Ok(rule(&v, "from-file").is_some().then_some(v))
            },
        )?;
        ensure!(rule(&v, "block-x").is_some(), "runtime rule kept: {v}");
        let (st, msg) = http_request(admin, "DELETE", "/keyrules/from-file", "", Some("tok-1"))?;
        ensure!(
            st == 409 && msg.contains("config"),
            "config rules stay: {st} {msg}"
        );

        // Through the CLI: add (id chosen by the agent), list, remove.
        let adm = admin.to_string();
        let tf = token_file.display().to_string();
        let cli_run = |args: &[&str]| -> Result<String> {
            let out = datamesh_tests::proc::run_ok(
                env.agent().cli().arg("keyrules").args(args).args([
                    "--admin",
                    &adm,
                    "--token-file",
                    &tf,
                ]),
                Duration::from_secs(10),
            )?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let out = cli_run(&["add", "--action", "throttle", "--key", "y", "--rate", "5"])?;
        ensure!(out.contains("added key rule rt-1"), "{out}");
        ensure!(cli_run(&["list"])?.contains("rt-1"), "rt-1 listed");
        ensure!(
            cli_run(&["rm", "rt-1"])?.contains("removed key rule rt-1"),
            "rm"
        );

        // Removed through the API: pod a reads x:1 again.
        let (st, msg) = http_request(admin, "DELETE", "/keyrules/block-x", "", Some("tok-1"))?;
        ensure!(st == 200, "{st} {msg}");
        let (st, _) = http_request(admin, "DELETE", "/keyrules/block-x", "", Some("tok-1"))?;
        ensure!(st == 404, "removed twice: {st}");
        let out = pod_cli(env, env.pod("a"), &["GET", "x:1"])?;
        ensure!(out.trim() == "v", "pod a after the removal: {out:?}");
        Ok(())
    });
}

/// A load process of the test's own, killed when dropped (also on failure).
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn auto_mode_throttles_a_key_hammered_above_the_threshold() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .proxy_setting("throttle_max_delay_ms", 100)
            .extra_config(
            "hotkeys:\n  window_s: 2\n  sample_rate: 1\n  key_display: raw\n  auto_throttle_ops: 300\n  auto_throttle_s: 30\n",
        ),
        |env| {
            let svc = env.service_addr();
            let mut cmd: Command = env.pod("a").cmd("redis-benchmark");
            cmd.args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
                .args(["-n", "100000000", "-c", "4", "-q", "GET", "hot:auto"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let started = Instant::now();
            let _hammer = Load(cmd.spawn().context("starting redis-benchmark")?);
            let (id, r) = wait_until(
                "an auto rule for the hammered key",
                Duration::from_secs(10),
                || {
                    let v = keyrules(env)?;
                    Ok(v["rules"].as_array().and_then(|rs| {
                        rs.iter()
                            .find(|r| r["origin"] == "auto" && r["key"] == "hot:auto")
                            .map(|r| (r["id"].as_str().unwrap_or("").to_string(), r.clone()))
                    }))
                },
            )?;
            eprintln!("auto rule {id} after {:?}: {r}", started.elapsed());
            ensure!(r["rate"] == 300 && r["endpoint"] == "cache", "{r}");
            ensure!(
                r["expires_in_s"].as_f64().is_some_and(|s| s > 20.0 && s <= 30.0),
                "{r}"
            );
            // It acts: a pipeline on the key from the other pod is paced and then refused
            // (the hammer keeps the bucket empty), counted under rule="auto".
            let (replies, _) = pipeline(env, env.pod("b"), 200, &["GET", "hot:auto"])?;
            let refused = replies
                .iter()
                .filter(|l| {
                    l.starts_with(&format!(
                        "-ERR throttled: key hot:auto is over its rate limit (rule {id})"
                    ))
                })
                .count();
            ensure!(refused > 0, "no refusal: {:?}", &replies[..10]);
            let pod_a = format!("dmt{}-a", env.n());
            let m = metric_line(
                env,
                &format!("datamesh_proxy_key_throttled_total{{endpoint=\"cache\",rule=\"auto\",pod=\"{pod_a}\"}}"),
            )?;
            ensure!(m > 0, "auto metric for the hammering pod: {m}");
            // Other keys are not throttled.
            let (replies, _) = pipeline(env, env.pod("b"), 100, &["GET", "cold"])?;
            ensure!(replies.iter().all(|l| l == "$-1"), "another key: {replies:?}");
            Ok(())
        },
    );
}
