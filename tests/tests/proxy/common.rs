//! Helpers shared by the proxy tests: where the proxy listens, running the redis-py scenarios
//! on the node or in a pod, reading backend and per-pod counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use datamesh_tests::env::ENDPOINT_NAME;
use datamesh_tests::pod::Pod;
use datamesh_tests::proxy::{bulk, simple, RespConn};
use datamesh_tests::{wait_until, Env};
use serde_json::Value;

/// The proxy listener of the `cache` endpoint (node-local clients dial it; not captured).
pub fn proxy_addr(env: &Env) -> Result<SocketAddr> {
    env.agent().proxy_addr(ENDPOINT_NAME)
}

/// Arguments for `tests/py/proxy_compat.py <scenario> --host --port --prefix ...`.
pub fn py_args(scenario: &str, addr: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        scenario.to_string(),
        "--host".into(),
        addr.ip().to_string(),
        "--port".into(),
        addr.port().to_string(),
        "--prefix".into(),
        format!("{scenario}:"),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A redis-py scenario on the node (not captured), against `addr`.
pub fn py_node(scenario: &str, addr: SocketAddr, extra: &[&str]) -> Result<Value> {
    let v = datamesh_tests::proxy::python(
        Command::new("python3"),
        "proxy_compat.py",
        &py_args(scenario, addr, extra),
    )?;
    eprintln!("redis-py {scenario} (node) -> {v}");
    Ok(v)
}

/// A redis-py scenario inside a pod (captured when `addr` is an endpoint address).
pub fn py_pod(pod: &Pod, scenario: &str, addr: SocketAddr, extra: &[&str]) -> Result<Value> {
    let v = datamesh_tests::proxy::python(
        pod.cmd("python3"),
        "proxy_compat.py",
        &py_args(scenario, addr, extra),
    )?;
    eprintln!("redis-py {scenario} (pod {}) -> {v}", pod.netns_name());
    Ok(v)
}

/// The pod's row of `datamesh-agent pods --json` as name → integer.
pub fn pod_counters(env: &Env, pod: &str) -> Result<BTreeMap<String, u64>> {
    env.agent().pod_counters(pod)
}

pub fn counter(m: &BTreeMap<String, u64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0)
}

/// The /connections entries whose peer is this pod (proof a client went through the proxy).
pub fn pod_connection_count(env: &Env, pod: &Pod) -> Result<usize> {
    let ip = pod.ip().to_string();
    Ok(env
        .agent()
        .connections()?
        .iter()
        .filter(|c| {
            c["peer"]
                .as_str()
                .and_then(|p| p.parse::<SocketAddr>().ok())
                .is_some_and(|p| p.ip().to_string() == ip)
        })
        .count())
}

/// The agent's effective config (`/config_dump`).
pub fn config_dump(env: &Env) -> Result<Value> {
    let (status, body) = env.agent().http_get("/config_dump")?;
    anyhow::ensure!(status == 200, "/config_dump answered {status}: {body}");
    serde_json::from_str(&body).context("/config_dump is not JSON")
}

/// A client that keeps doing SET/GET round trips on one connection in a thread until stopped,
/// counting successes and recording any error: the "other clients are unaffected" witness.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Bystander {
    pub fn start(addr: SocketAddr, name: &str) -> Result<Self> {
        let mut conn = RespConn::connect(addr)?;
        conn.expect(&["PING"], simple("PONG"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (stop2, ok2, name) = (Arc::clone(&stop), Arc::clone(&ok), name.to_string());
        let handle = std::thread::spawn(move || -> Result<()> {
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let key = format!("bystander:{name}");
                let val = format!("v{i}");
                conn.expect(&["SET", &key, &val], simple("OK"))
                    .with_context(|| format!("bystander {name} round {i}"))?;
                conn.expect(&["GET", &key], bulk(&val))
                    .with_context(|| format!("bystander {name} round {i}"))?;
                ok2.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        });
        Ok(Self {
            stop,
            ok,
            handle: Some(handle),
        })
    }

    /// Round trips completed so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until the bystander has made `more` further round trips (it is not stuck).
    pub fn wait_progress(&self, more: u64) -> Result<()> {
        let target = self.ok() + more;
        wait_until(
            "the bystander client to make progress",
            Duration::from_secs(10),
            || {
                if self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
                    return Err(anyhow!("the bystander client stopped (see its error)"));
                }
                Ok((self.ok() >= target).then_some(()))
            },
        )
    }

    /// Stops it and returns its error, if it hit one.
    pub fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self
            .handle
            .take()
            .ok_or_else(|| anyhow!("already finished"))?;
        h.join()
            .map_err(|_| anyhow!("the bystander thread panicked"))??;
        Ok(self.ok())
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
