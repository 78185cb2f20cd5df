//! The command policy: the default tenant policy refuses admin, dangerous and cross-tenant
//! commands with `-NOPERM` (and the backend password never leaves the proxy), an operator user
//! runs CONFIG SET and still sees secrets redacted, a pod's policy applies on top of its
//! users', and policies follow config reloads.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use datamesh_tests::agent::{yaml_str, PodPolicy};
use datamesh_tests::env::run_test;
use datamesh_tests::proxy::{bulk, redis_cli, simple, RespConn};
use datamesh_tests::resp::Reply;
use datamesh_tests::{wait_until, Env};

use crate::common::{
    expect_error, login, metric_value, metrics, proxy_addr, users_yaml, Bystander,
};

const BACKEND_PW: &str = "backend-secret-pw-7731";
const MASTER_PW: &str = "replication-secret-pw-4410";

/// The backend requires a password only the proxy knows (and has a masterauth set).
fn protect_backend(env: &mut Env) -> Result<()> {
    for (k, v) in [("masterauth", MASTER_PW), ("requirepass", BACKEND_PW)] {
        let r = env
            .redis()
            .command(&[b"CONFIG", b"SET", k.as_bytes(), v.as_bytes()])?;
        ensure!(r == simple("OK"), "CONFIG SET {k} answered {r:?}");
    }
    env.redis_mut().set_password(Some(BACKEND_PW));
    Ok(())
}

fn start_with_backend_password(env: &mut Env, extra_yaml: &str) -> Result<()> {
    protect_backend(env)?;
    let mut cfg = env.base_agent_config()?;
    cfg.endpoints[0].backend = cfg.endpoints[0]
        .backend
        .clone()
        .with("password", yaml_str(BACKEND_PW));
    cfg.extra_yaml.push_str(extra_yaml);
    env.start_agent(cfg)
}

/// No secret appears anywhere in `text`.
fn no_secret(what: &str, text: &str) -> Result<()> {
    ensure!(
        !text.contains(BACKEND_PW) && !text.contains(MASTER_PW),
        "{what} shows a backend secret: {text}"
    );
    Ok(())
}

#[test]
fn default_tenant_policy_refuses_with_noperm_and_keeps_the_backend_password() {
    run_test(Env::builder().agent(false), |env| {
        // users: [] (the default): every client is `default`, with the default tenant policy.
        start_with_backend_password(env, "")?;
        let proxy = proxy_addr(env)?;
        env.redis().command(&[b"SET", b"tenant:k", b"v"])?;
        let bystander = Bystander::start(RespConn::connect(proxy)?, "policy");

        let mut c = RespConn::connect(proxy)?;
        let refused: &[(&[&str], &str)] = &[
            (&["FLUSHALL"], "flushall"),
            (&["FLUSHDB"], "flushdb"),
            (&["SWAPDB", "0", "1"], "swapdb"),
            (&["KEYS", "*"], "keys"),
            (&["CONFIG", "GET", "requirepass"], "config|get"),
            (&["CONFIG", "GET", "*"], "config|get"),
            (&["CONFIG", "SET", "maxmemory", "1"], "config|set"),
            (&["SCRIPT", "FLUSH"], "script|flush"),
            (
                &[
                    "FUNCTION",
                    "LOAD",
                    "#!lua name=evil\nredis.register_function('f', function() return 1 end)",
                ],
                "function|load",
            ),
            (&["FUNCTION", "FLUSH"], "function|flush"),
            (&["FUNCTION", "DELETE", "lib"], "function|delete"),
            (&["DEBUG", "SLEEP", "0"], "debug"),
            (&["SHUTDOWN", "NOSAVE"], "shutdown"),
            (&["BGSAVE"], "bgsave"),
            (&["REPLICAOF", "NO", "ONE"], "replicaof"),
            (&["ROLE"], "role"),
            (&["LASTSAVE"], "lastsave"),
        ];
        for (args, name) in refused {
            let e = expect_error(
                &mut c,
                args,
                "NOPERM",
                &[
                    "User default (pod node)",
                    &format!("'{name}' command"),
                    "datamesh proxy policy",
                ],
            )?;
            no_secret(&format!("{args:?}"), &e)?;
        }
        eprintln!("e.g. FLUSHALL -> -NOPERM User default (pod node) has no permissions to run the 'flushall' command (datamesh proxy policy)");
        // Refused whoever asks: they cannot work through the proxy.
        expect_error(
            &mut c,
            &["MIGRATE", "10.0.0.1", "6379", "tenant:k", "0", "1000"],
            "ERR",
            &["MIGRATE is not supported"],
        )?;
        expect_error(&mut c, &["ACL", "LIST"], "ERR", &["ACL is not supported"])?;
        expect_error(
            &mut c,
            &["SCRIPT", "DEBUG", "YES"],
            "ERR",
            &["SCRIPT is not supported"],
        )?;
        // A refusal inside MULTI aborts the transaction.
        c.expect(&["MULTI"], simple("OK"))?;
        c.expect(&["SET", "tenant:tx", "x"], simple("QUEUED"))?;
        expect_error(&mut c, &["FLUSHALL"], "NOPERM", &["flushall"])?;
        expect_error(&mut c, &["EXEC"], "EXECABORT", &[])?;
        // Scripts cannot read the configuration either (CONFIG is not allowed from scripts).
        match c.cmd(&[
            "EVAL",
            "return redis.call('CONFIG','GET','requirepass')",
            "0",
        ])? {
            Reply::Error(e) => no_secret("EVAL of CONFIG GET", &e)?,
            other => anyhow::bail!("EVAL of CONFIG GET answered {other:?}"),
        }
        // What tenants may run still works, and nothing was flushed. CLIENT LIST (`@admin` in
        // Redis) is answered by the proxy with its own connections of this pod (this one and
        // the bystander's): not subject to the policy.
        c.expect(&["GET", "tenant:k"], bulk("v"))?;
        ensure!(
            c.cmd(&["CLIENT", "LIST"])?
                .as_bytes()
                .is_some_and(|l| String::from_utf8_lossy(l).lines().count() == 2),
            "CLIENT LIST shows other than this client and the bystander"
        );
        ensure!(
            c.cmd(&["INFO", "server"])?.as_bytes().is_some(),
            "INFO is allowed"
        );
        ensure!(
            matches!(c.cmd(&["DBSIZE"])?, Reply::Int(n) if n >= 1),
            "DBSIZE after the refusals"
        );
        ensure!(
            env.redis().command(&[b"EXISTS", b"tenant:tx"])? == Reply::Int(0),
            "the aborted transaction ran"
        );
        // A real client sees the same.
        let out = redis_cli(
            Command::new("redis-cli"),
            proxy,
            &["CONFIG", "GET", "requirepass"],
        )?;
        ensure!(
            out.contains("NOPERM"),
            "redis-cli CONFIG GET requirepass printed {out:?}"
        );
        no_secret("redis-cli CONFIG GET requirepass", &out)?;
        let out = redis_cli(Command::new("redis-cli"), proxy, &["FLUSHALL"])?;
        ensure!(out.contains("NOPERM"), "redis-cli FLUSHALL printed {out:?}");
        ensure!(
            env.redis().command(&[b"GET", b"tenant:k"])? == bulk("v"),
            "the key is gone"
        );
        let m = metrics(env)?;
        let denied = metric_value(
            &m,
            "datamesh_proxy_policy_denied_total",
            &["command=\"flushall\"", "pod=\"node\"", "endpoint=\"cache\""],
        );
        ensure!(
            denied.is_some_and(|n| n >= 3.0),
            "datamesh_proxy_policy_denied_total for flushall is {denied:?}"
        );
        let n = bystander.finish()?;
        eprintln!("bystander: {n} SET/GET round trips, no error");
        Ok(())
    });
}

#[test]
fn operator_runs_config_set_sees_secrets_redacted_and_policies_reload() {
    run_test(Env::builder().agent(false), |env| {
        let users = |app_acl: Option<&str>| {
            users_yaml(&[("ops", "ops-pw", Some("+@all")), ("app", "app-pw", app_acl)])
        };
        start_with_backend_password(env, &users(None))?;
        let proxy = proxy_addr(env)?;
        let mut ops = login(proxy, "ops", "ops-pw")?;
        let mut app = login(proxy, "app", "app-pw")?;
        let bystander = Bystander::start(login(proxy, "app", "app-pw")?, "operator");

        // The operator changes the backend's configuration through the proxy.
        ops.expect(
            &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
            simple("OK"),
        )?;
        let direct = env
            .redis()
            .command(&[b"CONFIG", b"GET", b"maxmemory-policy"])?;
        ensure!(
            direct == Reply::Array(Some(vec![bulk("maxmemory-policy"), bulk("allkeys-lru")])),
            "CONFIG SET through the proxy did not reach the backend: {direct:?}"
        );
        // ... and never sees a secret, for any glob.
        ops.expect(
            &["CONFIG", "GET", "requirepass"],
            Reply::Array(Some(vec![bulk("requirepass"), bulk("<redacted>")])),
        )?;
        for glob in ["*", "*auth*", "master*", "*pass*"] {
            let r = ops.cmd(&["CONFIG", "GET", glob])?;
            no_secret(&format!("CONFIG GET {glob}"), &format!("{r:?}"))?;
            let Reply::Array(Some(items)) = &r else {
                anyhow::bail!("CONFIG GET {glob} answered {r:?}");
            };
            for pair in items.chunks(2) {
                if let [Reply::Bulk(Some(k)), v] = pair {
                    if k == b"requirepass" || k == b"masterauth" {
                        ensure!(*v == bulk("<redacted>"), "CONFIG GET {glob}: {k:?} = {v:?}");
                    }
                }
            }
        }
        // RESP3 (a map), with a real client.
        let out = redis_cli(
            Command::new("redis-cli"),
            proxy,
            &[
                "-3",
                "--user",
                "ops",
                "--pass",
                "ops-pw",
                "--no-auth-warning",
                "CONFIG",
                "GET",
                "*",
            ],
        )?;
        ensure!(
            out.contains("<redacted>"),
            "redis-cli -3 CONFIG GET * printed {}",
            &out[..out.len().min(300)]
        );
        no_secret("redis-cli -3 CONFIG GET *", &out)?;
        // Not readable inside MULTI (EXEC's array would carry it).
        ops.expect(&["MULTI"], simple("OK"))?;
        expect_error(
            &mut ops,
            &["CONFIG", "GET", "requirepass"],
            "ERR",
            &["inside MULTI"],
        )?;
        expect_error(&mut ops, &["EXEC"], "EXECABORT", &[])?;

        // A tenant may not.
        expect_error(
            &mut app,
            &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
            "NOPERM",
            &["User app (pod node)", "'config|set'"],
        )?;
        expect_error(
            &mut app,
            &["CONFIG", "GET", "maxmemory"],
            "NOPERM",
            &["'config|get'"],
        )?;

        // Reload: app may now read the configuration (still without secrets).
        let mut cfg = env.agent().config().clone();
        cfg.extra_yaml = users(Some("+@all -@admin -@dangerous +config|get"));
        env.agent_mut().write_config(cfg)?;
        env.agent().sighup()?;
        wait_until(
            "app's new policy (+config|get) after the reload",
            Duration::from_secs(10),
            || {
                Ok(
                    matches!(app.cmd(&["CONFIG", "GET", "maxmemory"])?, Reply::Array(_))
                        .then_some(()),
                )
            },
        )?;
        let r = app.cmd(&["CONFIG", "GET", "maxmemory"])?;
        ensure!(
            matches!(&r, Reply::Array(Some(v)) if v.len() == 2),
            "CONFIG GET maxmemory after the reload answered {r:?}"
        );
        app.expect(
            &["CONFIG", "GET", "requirepass"],
            Reply::Array(Some(vec![bulk("requirepass"), bulk("<redacted>")])),
        )?;
        expect_error(
            &mut app,
            &["CONFIG", "SET", "maxmemory", "0"],
            "NOPERM",
            &["'config|set'"],
        )?;
        let n = bystander.finish()?;
        eprintln!("bystander: {n} SET/GET round trips, no error");
        Ok(())
    });
}

#[test]
fn a_pods_policy_applies_on_top_of_its_users_and_reloads() {
    run_test(Env::builder().pods(["a", "b"]).agent(false), |env| {
        let pod_a = format!("dmt{}-a", env.n());
        let with_acl = |env: &Env, acl: Option<&str>| -> Result<_> {
            let mut cfg = env.base_agent_config()?;
            cfg.pods.push(PodPolicy {
                name: pod_a.clone(),
                acl: acl.map(str::to_string),
                ..PodPolicy::default()
            });
            Ok(cfg)
        };
        let cfg = with_acl(env, Some("+@all -@write"))?;
        env.start_agent(cfg)?;
        let svc = env.service_addr();
        let (a, b) = (env.pod("a"), env.pod("b"));
        // Pod a may read but not write; pod b (same default user) may do both.
        let out = redis_cli(a.cmd("redis-cli"), svc, &["SET", "pod:k", "from-a"])?;
        ensure!(
            out.contains("NOPERM")
                && out.contains(&format!("(pod {pod_a})"))
                && out.contains("'set'"),
            "SET from pod a printed {out:?}"
        );
        let out = redis_cli(b.cmd("redis-cli"), svc, &["SET", "pod:k", "from-b"])?;
        ensure!(out.trim() == "OK", "SET from pod b printed {out:?}");
        let out = redis_cli(a.cmd("redis-cli"), svc, &["GET", "pod:k"])?;
        ensure!(out.trim() == "from-b", "GET from pod a printed {out:?}");
        let m = metrics(env)?;
        ensure!(
            metric_value(
                &m,
                "datamesh_proxy_policy_denied_total",
                &[&format!("pod=\"{pod_a}\""), "command=\"set\""]
            )
            .is_some(),
            "no policy_denied sample for pod a's SET"
        );

        // Reload without the pod's policy: pod a writes again (no restart, no reconnect needed).
        let cfg = with_acl(env, None)?;
        env.agent_mut().write_config(cfg)?;
        env.agent().sighup()?;
        let a = env.pod("a");
        wait_until(
            "pod a's policy to be lifted by the reload",
            Duration::from_secs(10),
            || {
                let out = redis_cli(a.cmd("redis-cli"), svc, &["SET", "pod:k", "from-a"])?;
                Ok((out.trim() == "OK").then_some(()))
            },
        )
        .context("SET from pod a after the reload")?;
        Ok(())
    });
}
