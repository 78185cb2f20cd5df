//! Helpers shared by the data-plane tests: running clients in pods and reading what the agent
//! and Redis saw.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use datamesh_tests::pod::Pod;
use datamesh_tests::proc::{describe, last_chars, run_with_input, run_with_timeout, status_text};
use datamesh_tests::resp::parse_client_list;
use datamesh_tests::Env;
use serde_json::Value;

pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(180);

/// The probe binary cargo built for this package.
pub fn probe_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dmprobe")
}

/// Runs `dmprobe <args> --addr <addr>` in `cmd`'s pod, failing with its message unless it
/// exits 0; returns its JSON summary.
pub fn probe(mut cmd: Command, addr: SocketAddr, args: &[&str]) -> Result<Value> {
    cmd.args(args).arg("--addr").arg(addr.to_string());
    let out = run_with_timeout(&mut cmd, PROBE_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(&cmd),
            status_text(out.status),
            last_chars(&out.stderr, 3000)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("dmprobe printed no JSON: {text}"))
}

/// Runs `dmprobe` in the pod (its netns and cgroup).
pub fn probe_in_pod(pod: &Pod, addr: SocketAddr, args: &[&str]) -> Result<Value> {
    probe(pod.cmd(probe_bin()), addr, args)
}

/// Feeds `script` (one command per line) to `redis-cli -h <addr>` in `cmd`; returns stdout.
pub fn redis_cli(mut cmd: Command, addr: SocketAddr, script: &str) -> Result<String> {
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
    let out = run_with_input(&mut cmd, script.as_bytes(), CLIENT_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || stdout.contains("Could not connect") || stdout.starts_with("ERR") {
        bail!(
            "`{}` failed ({}): stdout: {} stderr: {}",
            describe(&cmd),
            status_text(out.status),
            last_chars(stdout.as_bytes(), 2000),
            last_chars(&out.stderr, 2000)
        );
    }
    Ok(stdout)
}

/// Runs redis-cli in `cmd` with a named connection: SETNAME, SET/GET a key, CLIENT LIST.
/// Returns the address Redis saw for that connection (`addr=` of the line named `name`).
pub fn redis_cli_client_addr(cmd: Command, addr: SocketAddr, name: &str) -> Result<SocketAddr> {
    let script =
        format!("CLIENT SETNAME {name}\nSET dm:{name} hello-{name}\nGET dm:{name}\nCLIENT LIST\n");
    let out = redis_cli(cmd, addr, &script)?;
    ensure!(
        out.contains(&format!("hello-{name}")),
        "redis-cli did not read back its value; output:\n{out}"
    );
    client_addr_in(&out, name)
}

/// The `addr=` of the CLIENT LIST line whose `name=` is `name`.
pub fn client_addr_in(client_list: &str, name: &str) -> Result<SocketAddr> {
    let clients = parse_client_list(client_list);
    let me = clients
        .iter()
        .find(|c| c.get("name").map(String::as_str) == Some(name))
        .ok_or_else(|| anyhow!("no client named {name} in CLIENT LIST:\n{client_list}"))?;
    me.get("addr")
        .ok_or_else(|| anyhow!("client line without addr: {me:?}"))?
        .parse()
        .context("CLIENT LIST addr is not host:port")
}

/// redis-py in the pod: SETNAME, SET/GET of a binary value, CLIENT LIST; returns the address
/// Redis saw for that connection.
pub fn redis_py_client_addr(pod: &Pod, addr: SocketAddr, name: &str) -> Result<SocketAddr> {
    let script = format!(
        r#"
import json, sys
try:
    import redis
except ImportError as e:
    sys.exit("redis-py is not installed (run `cargo xtask setup`): %s" % e)
r = redis.Redis(host="{ip}", port={port}, socket_timeout=10)
r.client_setname("{name}")
value = b"\x00\x01binary\r\nvalue-{name}"
r.set("dm:py:{name}", value)
ok = r.get("dm:py:{name}") == value
me = [c for c in r.client_list() if c.get("name") == "{name}"]
print(json.dumps({{"get_ok": ok, "addr": me[0]["addr"] if me else None}}))
"#,
        ip = addr.ip(),
        port = addr.port(),
        name = name
    );
    let mut cmd = pod.cmd("python3");
    cmd.arg("-c").arg(&script);
    let out = run_with_timeout(&mut cmd, CLIENT_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "redis-py in pod {} failed ({}): {}",
            pod.name(),
            status_text(out.status),
            last_chars(&out.stderr, 3000)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "redis-py script printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    ensure!(
        v["get_ok"] == Value::Bool(true),
        "redis-py read back a different value: {v}"
    );
    v["addr"]
        .as_str()
        .ok_or_else(|| anyhow!("redis-py found no client named {name}: {v}"))?
        .parse()
        .context("addr")
}

/// The `/connections` entries whose peer is this pod's address.
pub fn pod_connections(env: &Env, pod: &Pod) -> Result<Vec<Value>> {
    let ip = pod.ip().to_string();
    Ok(env
        .agent()
        .connections()?
        .into_iter()
        .filter(|c| {
            c["peer"]
                .as_str()
                .and_then(|p| p.parse::<SocketAddr>().ok())
                .map(|p| p.ip().to_string())
                == Some(ip.clone())
        })
        .collect())
}

/// Checks that a `/connections` entry is a captured connection of `pod` to the service.
pub fn assert_captured_entry(env: &Env, pod: &Pod, c: &Value) -> Result<()> {
    let svc = env.service_addr().to_string();
    ensure!(
        c["captured"] == Value::Bool(true),
        "connection not marked captured: {c}"
    );
    ensure!(
        c["pod"].as_str() == Some(pod.netns_name()),
        "connection names pod {} instead of {}: {c}",
        c["pod"],
        pod.netns_name()
    );
    ensure!(
        c["orig_dst"].as_str() == Some(svc.as_str()),
        "orig_dst is {} instead of {svc}: {c}",
        c["orig_dst"]
    );
    ensure!(
        c["endpoint"].as_str() == Some("cache"),
        "endpoint is {} instead of cache: {c}",
        c["endpoint"]
    );
    let proxy = env.agent().proxy_addr("cache")?.to_string();
    ensure!(
        c["local"].as_str() == Some(proxy.as_str()),
        "local is {} instead of the proxy {proxy}: {c}",
        c["local"]
    );
    Ok(())
}

/// The pod's counters from `datamesh-agent pods --json`, as name → value.
pub fn counters(env: &Env, pod: &Pod) -> Result<BTreeMap<String, u64>> {
    env.agent().pod_counters(pod.netns_name())
}

pub fn counter(m: &BTreeMap<String, u64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0)
}

/// True when `addr`'s IP is this pod's address (Redis saw the pod itself, not the proxy).
/// Whether the client connection whose address was `seen` went through the proxy, checking the
/// `/connections` entry of exactly that socket when there is one. The proxy answers `CLIENT LIST`
/// itself with the client's own address (as Redis would), so the address alone cannot tell a
/// captured connection from a direct one; the proxy's record of that socket can.
pub fn captured_by_proxy(env: &Env, pod: &Pod, seen: SocketAddr) -> Result<bool> {
    let seen = seen.to_string();
    let conns = env.agent().connections()?;
    match conns
        .iter()
        .find(|c| c["peer"].as_str() == Some(seen.as_str()))
    {
        Some(c) => {
            assert_captured_entry(env, pod, c)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

pub fn is_pod_addr(pod: &Pod, addr: SocketAddr) -> bool {
    addr.ip() == IpAddr::V4(pod.ip())
}

/// A redis-cli round trip from `pod` through the service address is captured and shows in
/// the proxy's /connections.
pub fn assert_capture_works(env: &Env, pod: &Pod, name: &str) -> Result<()> {
    let seen = redis_cli_client_addr(pod.cmd("redis-cli"), env.service_addr(), name)?;
    if !captured_by_proxy(env, pod, seen)? {
        let dump = |map: &str| {
            Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(env.pin_dir().join(map))
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        bail!(
            "not captured: the proxy has no record of {seen} (monotonic now {:.0} ns; pod counters {:?}; dm_settings {}; dm_listeners {})",
            datamesh_tests::drill::mono_now() * 1e9,
            counters(env, pod).unwrap_or_default(),
            dump("dm_settings"),
            dump("dm_listeners")
        );
    }
    Ok(())
}
