//! `datamesh-agent hotkeys`: the running agent's `/hotkeys` as a table (key, ops/s, reads,
//! writes, top pods), one block per endpoint. It asks the admin endpoint (plain HTTP GET,
//! the bearer token from `--token-file` when the admin endpoint requires one); keys are shown
//! as the agent's `hotkeys.key_display` made them.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin reply read (a `/hotkeys` reply is a few KiB per endpoint).
const MAX_REPLY: u64 = 16 * 1024 * 1024;

/// GETs `path` (a JSON route: `/hotkeys`, `/bigkeys`, `/attacks`) and decodes it.
pub fn fetch_json(
    admin: SocketAddr,
    path: &str,
    token_file: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    let body = admin_get(admin, path, token_file)?;
    serde_json::from_str(&body).with_context(|| format!("the agent's {path} is not JSON"))
}

/// GETs `path` from the admin endpoint at `admin`; the body of a 200 reply.
pub fn admin_get(
    admin: SocketAddr,
    path: &str,
    token_file: Option<&Path>,
) -> anyhow::Result<String> {
    admin_request(admin, "GET", path, None, token_file)
}

/// POSTs the JSON `body` to `path` (`/keyrules`); the body of a 2xx reply.
pub fn admin_post(
    admin: SocketAddr,
    path: &str,
    body: &str,
    token_file: Option<&Path>,
) -> anyhow::Result<String> {
    admin_request(admin, "POST", path, Some(body), token_file)
}

/// DELETEs `path` (`/keyrules/<id>`); the body of a 2xx reply.
pub fn admin_delete(
    admin: SocketAddr,
    path: &str,
    token_file: Option<&Path>,
) -> anyhow::Result<String> {
    admin_request(admin, "DELETE", path, None, token_file)
}

/// One request to the admin endpoint (the one client of the CLIs); the body of a 2xx reply.
fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token_file: Option<&Path>,
) -> anyhow::Result<String> {
    let token = match token_file {
        Some(f) => Some(
            crate::config::read_secret_file(f)
                .map_err(anyhow::Error::msg)
                .context("reading --token-file")?,
        ),
        None => None,
    };
    let mut sock = TcpStream::connect_timeout(&admin, TIMEOUT).with_context(|| {
        format!("cannot reach the agent's admin endpoint at {admin}: is the agent running, and is --admin its admin_listen?")
    })?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.set_write_timeout(Some(TIMEOUT))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let payload = match body {
        Some(b) => format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => "\r\n".to_string(),
    };
    write!(
        sock,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Connection: close\r\n{payload}"
    )?;
    let mut reply = Vec::new();
    sock.take(MAX_REPLY)
        .read_to_end(&mut reply)
        .with_context(|| format!("reading {path} from {admin}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("{admin} did not answer HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'))
    {
        bail!("{admin}{path}: {status}: {}", body.trim());
    }
    Ok(body.to_string())
}

/// The table of a `/hotkeys` reply (only `endpoint` when given).
pub fn format_table(v: &Value, endpoint: Option<&str>) -> String {
    let mut out = String::new();
    if v.get("enabled").and_then(Value::as_bool) == Some(false) {
        out.push_str("hot-key detection is off (hotkeys.enabled: false)\n");
        return out;
    }
    let empty = Vec::new();
    let eps = v
        .get("endpoints")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for ep in eps {
        let name = ep.get("endpoint").and_then(Value::as_str).unwrap_or("?");
        if endpoint.is_some_and(|e| e != name) {
            continue;
        }
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "endpoint {name}: window {}s (counts over the last {:.1}s, 1 in {} sampled), {:.0} keyed ops/s",
            num(ep, "window_s"),
            num(ep, "covered_s"),
            num(ep, "sample_rate"),
            num(ep, "ops") / num(ep, "covered_s").max(0.001),
        );
        if let Some(lc) = ep.get("local_cache").filter(|l| l.is_object()) {
            let _ = writeln!(
                out,
                "  local cache {}: {} keys, {} bytes; hits {}, misses {}, invalidations {}, flushes {} (cached keys marked [cached])",
                if lc.get("live").and_then(Value::as_bool) == Some(true) { "serving" } else { "not serving (no tracking connection)" },
                num(lc, "keys"),
                num(lc, "bytes"),
                num(lc, "hits"),
                num(lc, "misses"),
                num(lc, "invalidations"),
                num(lc, "flushes"),
            );
        }
        let _ = writeln!(
            out,
            "  {:>4}  {:<40}  {:>10}  {:>10}  {:>10}  TOP PODS (ops/s)",
            "RANK", "KEY", "OPS/S", "READS", "WRITES"
        );
        let keys = ep.get("keys").and_then(Value::as_array).unwrap_or(&empty);
        if keys.is_empty() {
            out.push_str("  (no keyed commands in the window)\n");
        }
        for k in keys {
            let pods: Vec<String> = k
                .get("pods")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
                .iter()
                .map(|p| {
                    format!(
                        "{} ({:.0})",
                        p.get("pod").and_then(Value::as_str).unwrap_or("?"),
                        num(p, "ops_per_s")
                    )
                })
                .collect();
            let cached = k.get("cached").and_then(Value::as_bool) == Some(true);
            let _ = writeln!(
                out,
                "  {:>4}  {:<40}  {:>10.1}  {:>10}  {:>10}  {}{}",
                num(k, "rank"),
                k.get("key").and_then(Value::as_str).unwrap_or("?"),
                num(k, "ops_per_s"),
                num(k, "reads"),
                num(k, "writes"),
                pods.join(", "),
                if cached { "  [cached]" } else { "" }
            );
        }
    }
    if out.is_empty() {
        match endpoint {
            Some(e) => out.push_str(&format!("no endpoint named {e:?}\n")),
            None => out.push_str("no endpoints\n"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_key_and_pods() {
        let v = serde_json::json!({"enabled": true, "endpoints": [
            {"endpoint": "cache", "window_s": 10, "covered_s": 5.0, "sample_rate": 1, "ops": 1000,
             "keys": [{"rank": 1, "key": "user:1", "ops_per_s": 150.0, "reads": 700, "writes": 50,
                       "pods": [{"pod": "web-1", "ops_per_s": 140.0}, {"pod": "web-2", "ops_per_s": 10.0}]}]},
            {"endpoint": "other", "window_s": 10, "covered_s": 5.0, "sample_rate": 1, "ops": 0, "keys": []}]});
        let t = format_table(&v, None);
        assert!(t.contains("endpoint cache"), "{t}");
        assert!(
            t.contains("user:1") && t.contains("web-1 (140), web-2 (10)"),
            "{t}"
        );
        assert!(t.contains("(no keyed commands in the window)"), "{t}");
        assert!(!t.contains("local cache") && !t.contains("[cached]"), "{t}");
        let v = serde_json::json!({"enabled": true, "endpoints": [
            {"endpoint": "cache", "window_s": 10, "covered_s": 5.0, "sample_rate": 1, "ops": 1000,
             "local_cache": {"live": true, "keys": 1, "bytes": 120, "hits": 900, "misses": 3, "invalidations": 1, "flushes": 0},
             "keys": [{"rank": 1, "key": "flags", "ops_per_s": 150.0, "reads": 700, "writes": 0, "cached": true,
                       "pods": [{"pod": "web-1", "ops_per_s": 140.0}]}]}]});
        let t = format_table(&v, None);
        assert!(
            t.contains("local cache serving: 1 keys, 120 bytes; hits 900"),
            "{t}"
        );
        assert!(t.contains("web-1 (140)  [cached]"), "{t}");
        let t = format_table(&v, Some("other"));
        assert!(!t.contains("user:1"), "{t}");
        assert!(format_table(&v, Some("nope")).contains("no endpoint named"));
        assert!(format_table(&serde_json::json!({"enabled": false}), None).contains("off"));
    }
}
