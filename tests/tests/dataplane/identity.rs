//! Identity is enforced (issue 8): a pod that dials the proxy listener directly is attributed
//! and limited like one dialling the endpoint; a client the data plane did not record is served
//! only when node-local or from `uncaptured_allow`, else refused with one clear error line and
//! counted; passwords come from files (re-read when they change); the admin endpoint refuses a
//! non-loopback address unless allowed, and then wants a bearer token. Each test keeps a
//! bystander pod working, with correct replies, in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use datamesh_tests::agent::{http_get_auth, yaml_str};
use datamesh_tests::env::run_test;
use datamesh_tests::proc::{run_with_input, run_with_timeout};
use datamesh_tests::{wait_until, Env};
use serde_json::Value;

use crate::common::{counter, counters, pod_connections, probe_in_pod, CLIENT_TIMEOUT};

const REFUSAL: &str =
    "refused: not a captured pod connection, not node-local and not in uncaptured_allow";

/// `redis-cli -h <addr>` in `cmd` fed `script`; stdout whatever the outcome (errors included).
fn cli_raw(mut cmd: Command, addr: SocketAddr, script: &str) -> Result<String> {
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
    let out = run_with_input(&mut cmd, script.as_bytes(), CLIENT_TIMEOUT)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A bystander's SET/GET round trip with a value only it writes.
fn bystander_ok(env: &Env, pod: &str, tag: &str) -> Result<()> {
    let p = env.pod(pod);
    let key = format!("id:{tag}:{}", p.netns_name());
    let val = format!("v-{tag}-{}", p.ip());
    let out = cli_raw(
        p.cmd("redis-cli"),
        env.service_addr(),
        &format!("SET {key} {val}\nGET {key}\n"),
    )?;
    ensure!(
        out.lines().map(str::trim).collect::<Vec<_>>() == ["OK", val.as_str()],
        "bystander pod {pod} got wrong replies: {out:?}"
    );
    Ok(())
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// redis-py's `hammer` scenario (a pipeline of `count` GETs, then count/10 sequential ones)
/// from the pod against `addr`.
fn hammer(env: &Env, pod: &str, addr: SocketAddr, count: u64) -> Result<Value> {
    let args: Vec<String> = [
        "hammer",
        "--host",
        &addr.ip().to_string(),
        "--port",
        &addr.port().to_string(),
        "--prefix",
        &format!("ham:{pod}:"),
        "--count",
        &count.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    datamesh_tests::proxy::python(env.pod(pod).cmd("python3"), "proxy_compat.py", &args)
}

#[test]
fn direct_dial_of_the_proxy_is_attributed_and_limited() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .conn_limit("a", 2, 2)
            .cmd_limit("a", 50, 50),
        |env| {
            let proxy = env.agent().proxy_addr("cache")?;
            let (a, b) = (env.pod("a"), env.pod("b"));

            // Connection rate: 20 quick connects straight to the listener.
            let ra = probe_in_pod(a, proxy, &["connect-loop", "--count", "20"])?;
            let rb = probe_in_pod(b, proxy, &["connect-loop", "--count", "20"])?;
            eprintln!("direct connects: pod a {ra}; pod b {rb}");
            let (ok_a, refused_a) = (num(&ra, "ok"), num(&ra, "refused"));
            ensure!(
                refused_a >= 15 && ok_a >= 2 && ok_a + refused_a == 20,
                "pod a (2/s, burst 2) dialling the proxy directly: expected most of 20 quick \
                 connects refused, as through the endpoint: {ra}"
            );
            ensure!(num(&rb, "ok") == 20, "bystander pod b was refused: {rb}");
            let ca = counters(env, a)?;
            ensure!(
                counter(&ca, "connects_refused") == refused_a,
                "pod a: connects_refused {ca:?} != the {refused_a} refusals it saw"
            );

            // Command rate: let the connection bucket refill, then one pipelined client per pod.
            std::thread::sleep(Duration::from_millis(1200));
            let n = 1000;
            let (ha, hb) = std::thread::scope(|s| {
                let ha = s.spawn(|| hammer(env, "a", proxy, n));
                let hb = s.spawn(|| hammer(env, "b", proxy, n));
                (
                    ha.join().map_err(|_| anyhow!("pod a thread panicked")),
                    hb.join().map_err(|_| anyhow!("pod b thread panicked")),
                )
            });
            let (ha, hb) = (ha??, hb??);
            eprintln!("direct commands: pod a {ha}; pod b {hb}");
            ensure!(
                num(&ha, "throttled") >= n / 2 && num(&ha, "ok") + num(&ha, "throttled") == n,
                "pod a (50/s) dialling the proxy directly was not throttled: {ha}"
            );
            let msg = ha["first_throttle_error"].as_str().unwrap_or("");
            ensure!(
                msg.contains(a.netns_name()),
                "the throttle error does not name pod {}: {msg:?}",
                a.netns_name()
            );
            ensure!(
                num(&hb, "ok") == n && num(&hb, "n_other") == 0 && num(&hb, "throttled") == 0,
                "bystander pod b was affected: {hb}"
            );
            bystander_ok(env, "b", "direct")?;

            // Its connections carry its pod and netns cookie, marked direct.
            let conns = pod_connections(env, a)?;
            ensure!(!conns.is_empty(), "no /connections entry for pod a");
            for c in &conns {
                ensure!(
                    c["direct"] == Value::Bool(true)
                        && c["captured"] == Value::Bool(false)
                        && c["admitted"] == "direct"
                        && c["pod"].as_str() == Some(a.netns_name())
                        && c["netns_cookie"].as_u64().is_some_and(|x| x != 0)
                        && c["refused"].is_null()
                        && c["orig_dst"].as_str() == Some(proxy.to_string().as_str()),
                    "pod a's direct connection is not attributed: {c}"
                );
            }
            // And its commands count under its pod, not the shared pseudo-pod `node`.
            wait_until(
                "pod a's throttled commands in its counters",
                Duration::from_secs(5),
                || {
                    let c = counters(env, a)?;
                    Ok(
                        (counter(&c, "commands_throttled") >= n / 2 && counter(&c, "commands") > 0)
                            .then_some(()),
                    )
                },
            )?;
            let (_, metrics) = env.agent().http_get("/metrics")?;
            ensure!(
                !metrics
                    .lines()
                    .any(|l| l.starts_with("datamesh_proxy_pod_throttled_total{")
                        && l.contains("pod=\"node\"")
                        && !l.ends_with(" 0")),
                "commands were throttled as the pseudo-pod node:\n{metrics}"
            );
            Ok(())
        },
    );
}

#[test]
fn uncaptured_clients_are_refused_unless_node_local_or_allowed() {
    run_test(Env::builder().pods(["a", "b"]), |env| {
        let proxy = env.agent().proxy_addr("cache")?;
        let a = env.pod("a");

        // A process in a network namespace that is not a pod's cgroup (pod a's netns, outside
        // the attached cgroup): the data plane has no record of it.
        let outside = |env: &Env| {
            env.pod("a")
                .cmd_in_cgroup(env.outside_cgroup(), "redis-cli")
        };
        let out = cli_raw(outside(env), proxy, "PING\n")?;
        let want = format!("datamesh proxy: connection from {} {REFUSAL}", a.ip());
        ensure!(
            out.contains(&want) && !out.contains("PONG"),
            "an uncaptured client from {} was not refused with {want:?}: {out:?}",
            a.ip()
        );
        // Counted, and shown in /connections.
        let (_, metrics) = env.agent().http_get("/metrics")?;
        ensure!(
            metrics.lines().any(
                |l| l.starts_with("datamesh_proxy_refused_connections_total{")
                    && l.contains("endpoint=\"cache\"")
                    && l.contains("reason=\"uncaptured\"")
                    && !l.ends_with(" 0")
            ),
            "the refusal is not counted:\n{metrics}"
        );
        let refused: Vec<Value> = pod_connections(env, a)?
            .into_iter()
            .filter(|c| !c["refused"].is_null())
            .collect();
        ensure!(
            // (redis-cli may dial once more after the server closed on it.)
            !refused.is_empty()
                && refused.iter().all(|c| c["admitted"] == "refused"
                    && c["pod"].is_null()
                    && c["captured"] == Value::Bool(false)
                    && c["direct"] == Value::Bool(false)),
            "/connections does not show the refusal: {refused:?}"
        );

        // A node-local client (the node's own address on the bridge) is served.
        let node = cli_raw(
            Command::new("redis-cli"),
            proxy,
            "SET id:node n1\nGET id:node\n",
        )?;
        ensure!(
            node.lines().map(str::trim).collect::<Vec<_>>() == ["OK", "n1"],
            "a node-local client was not served: {node:?}"
        );
        // Pods keep working, captured (through the service) and direct.
        bystander_ok(env, "b", "uncaptured")?;
        let direct = cli_raw(env.pod("b").cmd("redis-cli"), proxy, "GET id:node\n")?;
        ensure!(
            direct.trim() == "n1",
            "pod b dialling the proxy: {direct:?}"
        );

        // With the pods' CIDR in uncaptured_allow (hot reload), the same client is served.
        let mut cfg = env.agent().config().clone();
        cfg.extra_yaml.push_str(&format!(
            "uncaptured_allow: [\"198.18.{}.0/24\"]\n",
            env.n()
        ));
        env.agent_mut().write_config(cfg)?;
        env.agent().sighup()?;
        wait_until(
            "the uncaptured client to be allowed",
            Duration::from_secs(10),
            || {
                let out = cli_raw(outside(env), proxy, "GET id:node\n")?;
                Ok((out.trim() == "n1").then_some(()))
            },
        )?;
        let allowed = pod_connections(env, env.pod("a"))?;
        ensure!(
            allowed
                .iter()
                .any(|c| c["admitted"] == "uncaptured_allow" && c["refused"].is_null()),
            "no admitted uncaptured_allow connection in /connections: {allowed:?}"
        );
        bystander_ok(env, "b", "allowed")?;
        Ok(())
    });
}

/// Writes `text` into `path` (atomically, as a Secret volume update does: tmp + rename).
fn write_secret(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", path.display()))
}

#[test]
fn passwords_come_from_files_and_are_reread() {
    run_test(Env::builder().pods(["a", "b"]).agent(false), |env| {
        // The backend requires a password only the proxy knows.
        let r = env
            .redis()
            .command(&[b"CONFIG", b"SET", b"requirepass", b"backend-pw-1"])?;
        ensure!(
            format!("{r:?}").contains("OK"),
            "CONFIG SET requirepass: {r:?}"
        );
        env.redis_mut().set_password(Some("backend-pw-1"));
        let dir = env.run_dir().join("secrets");
        std::fs::create_dir_all(&dir)?;
        let (backend_file, user_file): (PathBuf, PathBuf) = (dir.join("backend"), dir.join("app"));
        write_secret(&backend_file, "backend-pw-1\n")?;
        write_secret(&user_file, "app-pw-1\n")?;
        let mut cfg = env.base_agent_config()?;
        cfg.endpoints[0].backend = cfg.endpoints[0].backend.clone().with(
            "password_file",
            yaml_str(&backend_file.display().to_string()),
        );
        cfg.extra_yaml.push_str(&format!(
            "users:\n  - name: default\n    password_file: {}\n",
            yaml_str(&user_file.display().to_string())
        ));
        env.start_agent(cfg)?;
        let svc = env.service_addr();

        let session = |env: &Env, pw: &str, tag: &str| -> Result<String> {
            cli_raw(
                env.pod("a").cmd("redis-cli"),
                svc,
                &format!("AUTH {pw}\nSET id:pw:{tag} {tag}\nGET id:pw:{tag}\n"),
            )
        };
        let out = session(env, "app-pw-1", "one")?;
        ensure!(
            out.lines().map(str::trim).collect::<Vec<_>>() == ["OK", "OK", "one"],
            "AUTH with the password from users[0].password_file and a command through the \
             backend (password from backend.password_file): {out:?}"
        );
        let wrong = session(env, "nope", "wrong")?;
        ensure!(
            wrong.contains("WRONGPASS"),
            "a wrong password was accepted: {wrong:?}"
        );

        // /config_dump: redacted, with the files named.
        let (_, dump) = env.agent().http_get("/config_dump")?;
        ensure!(
            !dump.contains("backend-pw") && !dump.contains("app-pw"),
            "/config_dump shows a password:\n{dump}"
        );
        ensure!(
            dump.contains("<redacted>")
                && dump.contains(&backend_file.display().to_string())
                && dump.contains(&user_file.display().to_string()),
            "/config_dump does not name the password files:\n{dump}"
        );

        // Rotation: new passwords in the files (no config edit); the agent re-reads them.
        let r = env
            .redis()
            .command(&[b"CONFIG", b"SET", b"requirepass", b"backend-pw-2"])?;
        ensure!(
            format!("{r:?}").contains("OK"),
            "CONFIG SET requirepass: {r:?}"
        );
        env.redis_mut().set_password(Some("backend-pw-2"));
        // New backend connections need the new password: drop the proxy's old ones.
        let _ = env
            .redis()
            .command(&[b"CLIENT", b"KILL", b"TYPE", b"normal", b"SKIPME", b"yes"])?;
        write_secret(&backend_file, "backend-pw-2\n")?;
        write_secret(&user_file, "app-pw-2\n")?;
        wait_until(
            "the rotated passwords to work",
            Duration::from_secs(10),
            || {
                let out = session(env, "app-pw-2", "two")?;
                Ok(
                    (out.lines().map(str::trim).collect::<Vec<_>>() == ["OK", "OK", "two"])
                        .then_some(()),
                )
            },
        )?;
        let old = session(env, "app-pw-1", "old")?;
        ensure!(
            old.contains("WRONGPASS"),
            "the old user password still works: {old:?}"
        );
        // A bystander pod (authenticating too) keeps getting correct replies.
        let p = env.pod("b");
        let by = cli_raw(
            p.cmd("redis-cli"),
            svc,
            "AUTH app-pw-2\nSET id:pw:b bval\nGET id:pw:b\n",
        )?;
        ensure!(
            by.lines().map(str::trim).collect::<Vec<_>>() == ["OK", "OK", "bval"],
            "bystander pod b: {by:?}"
        );
        // Never logged.
        let log = std::fs::read_to_string(env.agent().log_path())?;
        ensure!(
            !log.contains("backend-pw") && !log.contains("app-pw"),
            "the agent log shows a password"
        );
        Ok(())
    });
}

#[test]
fn admin_endpoint_off_loopback_needs_the_switch_and_a_token() {
    run_test(Env::builder().pods(["a"]).agent(false), |env| {
        let node_admin = format!("{}:0", env.proxy_ip());
        // Without the switch: a clear error, the agent does not start.
        let mut cfg = env.base_agent_config()?;
        cfg.extra_yaml
            .push_str(&format!("admin_listen: \"{node_admin}\"\n"));
        let bin = datamesh_tests::agent::agent_bin()?;
        let msg = datamesh_tests::agent::check_config(&bin, &cfg, env.run_dir())?
            .ok_or_else(|| anyhow!("check-config accepted a non-loopback admin_listen"))?;
        ensure!(
            msg.contains(&format!(
                "admin_listen: {node_admin} is not a loopback address"
            )),
            "check-config: {msg}"
        );
        match env.start_agent(cfg.clone()) {
            Ok(()) => bail!("the agent started with a non-loopback admin_listen"),
            Err(e) => {
                let e = format!("{e:#}");
                ensure!(
                    e.contains("exited before it was ready")
                        && e.contains("is not a loopback address"),
                    "unexpected start failure: {e}"
                );
            }
        }

        // With the switch and a token file: 401 without the token, 200 with it.
        let token_file = env.run_dir().join("admin-token");
        write_secret(&token_file, "tok-1\n")?;
        cfg.extra_yaml.push_str(&format!(
            "admin_allow_remote: true\nadmin_token_file: {}\n",
            yaml_str(&token_file.display().to_string())
        ));
        env.start_agent(cfg)?;
        let admin = env.agent().ready()?.admin;
        ensure!(
            admin.ip() == std::net::IpAddr::V4(env.proxy_ip()),
            "admin listens on {admin}"
        );
        for path in ["/config_dump", "/connections", "/backends", "/metrics"] {
            let (st, _) = http_get_auth(admin, path, None)?;
            ensure!(st == 401, "{path} without a token answered {st}");
            let (st, _) = http_get_auth(admin, path, Some("tok-2"))?;
            ensure!(st == 401, "{path} with a wrong token answered {st}");
            let (st, _) = http_get_auth(admin, path, Some("tok-1"))?;
            ensure!(st == 200, "{path} with the token answered {st}");
        }
        // The probes stay open (the kubelet sends no header).
        for path in ["/ready", "/live"] {
            let (st, _) = http_get_auth(admin, path, None)?;
            ensure!(st == 200, "{path} without a token answered {st}");
        }
        // From a pod too: 401 without the token.
        let mut curl = env.pod("a").cmd("curl");
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("http://{admin}/config_dump"));
        let out = run_with_timeout(&mut curl, CLIENT_TIMEOUT)?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(code == "401", "a pod read /config_dump: HTTP {code:?}");

        // The token file is re-read: the rotated token works, the old one no longer does.
        write_secret(&token_file, "tok-2\n")?;
        wait_until("the rotated admin token", Duration::from_secs(10), || {
            Ok((http_get_auth(admin, "/connections", Some("tok-2"))?.0 == 200).then_some(()))
        })?;
        let (st, _) = http_get_auth(admin, "/connections", Some("tok-1"))?;
        ensure!(st == 401, "the old token still works: {st}");
        Ok(())
    });
}

#[test]
fn direct_dial_takes_the_fast_path_too() {
    run_test(Env::builder().pods(["a"]).fastpath(true), |env| {
        let proxy = env.agent().proxy_addr("cache")?;
        let a = env.pod("a");
        // Pipelined writes right after connect, and a value larger than one scatter list.
        let big = "x".repeat(200_000);
        let out = cli_raw(
            a.cmd("redis-cli"),
            proxy,
            &format!("SET id:fp {big}\nSTRLEN id:fp\nGET id:fp\n"),
        )?;
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        ensure!(
            lines.len() == 3 && lines[0] == "OK" && lines[1] == "200000" && lines[2] == big,
            "direct dial with the fast path on: wrong replies ({} bytes): {:?}",
            out.len(),
            &out[..out.len().min(200)]
        );
        let conns = pod_connections(env, a)?;
        ensure!(
            conns
                .iter()
                .any(|c| c["direct"] == Value::Bool(true) && c["fastpath"] == "redirect"),
            "the direct connection did not use the fast path: {conns:?}"
        );
        Ok(())
    });
}
