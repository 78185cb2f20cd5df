//! Config reload without a restart: SIGHUP after raising the pool size and adding an endpoint.
//! Open client connections (plain, inside MULTI, subscribed) stay open and keep working; the
//! new endpoint gets a listener and is captured for pods; the agent process is the same.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use datamesh_tests::agent::{BackendSpec, Endpoint};
use datamesh_tests::env::run_test;
use datamesh_tests::proxy::{bulk, redis_cli, simple, RespConn};
use datamesh_tests::resp::Reply;
use datamesh_tests::{wait_until, Env};

use crate::common::{config_dump, proxy_addr};

/// Fixed listener port of the endpoint added by the reload (on the instance's own proxy IP,
/// so no other test can hold it).
const NEW_PROXY_PORT: u16 = 16390;

#[test]
fn sighup_reload_keeps_client_connections_open() {
    run_test(
        Env::builder().pods(["a"]).backend_option("pool_size", 2),
        |env| {
            let proxy = proxy_addr(env)?;
            let pid = env.agent().pid();
            // Connections in three states.
            let mut plain = RespConn::connect(proxy)?;
            plain.expect(&["SET", "reload:k", "before"], simple("OK"))?;
            let id = plain.cmd(&["CLIENT", "ID"])?;
            let mut tx = RespConn::connect(proxy)?;
            tx.expect(&["MULTI"], simple("OK"))?;
            tx.expect(&["SET", "reload:tx", "in-multi"], simple("QUEUED"))?;
            let mut sub = RespConn::connect(proxy)?;
            match sub.cmd(&["SUBSCRIBE", "reload:ch"])? {
                Reply::Array(Some(v)) if v.first() == Some(&bulk("subscribe")) => {}
                other => anyhow::bail!("SUBSCRIBE answered {other:?}"),
            }

            // A second backend and the new config: pool 2 -> 3, endpoint `cache2` added.
            let other = env.start_redis(6380)?.addr();
            let new_svc = SocketAddr::new(IpAddr::V4(env.service_ip()), 6381);
            let mut cfg = env.agent().config().clone();
            cfg.endpoints[0].backend = cfg.endpoints[0].backend.clone().with("pool_size", 3);
            let mut ep = Endpoint::new("cache2", new_svc, BackendSpec::Address(other));
            ep.proxy_port = NEW_PROXY_PORT;
            cfg.endpoints.push(ep);
            env.agent_mut().write_config(cfg)?;
            env.agent().sighup()?;

            let new_proxy = SocketAddr::new(IpAddr::V4(env.proxy_ip()), NEW_PROXY_PORT);
            wait_until(
                "the reloaded config (pool_size 3, endpoint cache2)",
                Duration::from_secs(10),
                || {
                    let d = config_dump(env)?;
                    let eps = d["endpoints"].as_array().cloned().unwrap_or_default();
                    let pool = eps.first().and_then(|e| e["backend"]["pool_size"].as_u64());
                    let has_new = eps.iter().any(|e| e["name"] == "cache2");
                    Ok((pool == Some(3) && has_new).then_some(()))
                },
            )
            .context("the agent did not apply the new config after SIGHUP")?;
            wait_until(
                "the new endpoint's listener",
                Duration::from_secs(10),
                || {
                    Ok(RespConn::connect(new_proxy)
                        .and_then(|mut c| c.cmd(&["PING"]))
                        .ok()
                        .filter(|r| *r == simple("PONG")))
                },
            )?;
            ensure!(
                env.agent().pid() == pid,
                "the agent restarted instead of reloading"
            );

            // The old connections are the same connections and still work.
            plain.expect(&["GET", "reload:k"], bulk("before"))?;
            ensure!(
                plain.cmd(&["CLIENT", "ID"])? == id,
                "the plain connection's client id changed"
            );
            tx.expect(&["INCR", "reload:n"], simple("QUEUED"))?;
            match tx.cmd(&["EXEC"])? {
                Reply::Array(Some(v)) if v == vec![simple("OK"), Reply::Int(1)] => {}
                other => anyhow::bail!(
                    "EXEC of the transaction opened before the reload answered {other:?}"
                ),
            }
            let mut publisher = RespConn::connect(proxy)?;
            publisher.expect(&["PUBLISH", "reload:ch", "after"], Reply::Int(1))?;
            match sub.read()? {
                Reply::Array(Some(v))
                    if v == vec![bulk("message"), bulk("reload:ch"), bulk("after")] => {}
                other => anyhow::bail!("the subscriber from before the reload got {other:?}"),
            }

            // The new endpoint: node-local through its listener, and captured from a pod.
            let mut c = RespConn::connect(new_proxy)?;
            c.expect(&["SET", "reload:new", "via-listener"], simple("OK"))?;
            let out = redis_cli(
                env.pod("a").cmd("redis-cli"),
                new_svc,
                &["SET", "reload:pod", "via-capture"],
            )?;
            ensure!(
                out.trim() == "OK",
                "redis-cli in the pod to {new_svc} printed {out:?}"
            );
            let mut d = RespConn::connect(other)?;
            d.expect(&["GET", "reload:new"], bulk("via-listener"))?;
            d.expect(&["GET", "reload:pod"], bulk("via-capture"))?;
            // The old endpoint still serves new clients too.
            let out = redis_cli(Command::new("redis-cli"), proxy, &["GET", "reload:k"])?;
            ensure!(
                out.trim() == "before",
                "GET through the old endpoint after the reload printed {out:?}"
            );
            Ok(())
        },
    );
}
