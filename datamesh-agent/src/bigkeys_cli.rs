//! `datamesh-agent bigkeys`: the running agent's `/bigkeys` as a table (or its JSON). It asks
//! the admin endpoint (loopback by default) with a plain HTTP/1.0 GET, sending the bearer
//! token when given one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};

const TIMEOUT: Duration = Duration::from_secs(5);

/// The `/bigkeys` document of the agent whose admin endpoint is `admin`.
pub fn fetch(admin: SocketAddr, token_file: Option<&Path>) -> anyhow::Result<serde_json::Value> {
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the admin token file {}", p.display()))?
                .trim_end_matches('\n')
                .to_string(),
        ),
        None => None,
    };
    let mut sock = TcpStream::connect_timeout(&admin, TIMEOUT).with_context(|| {
        format!("connecting to the agent's admin endpoint {admin}: is the agent running, and is this its admin_listen (--admin)?")
    })?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        sock,
        "GET /bigkeys HTTP/1.0\r\nHost: {admin}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    sock.read_to_end(&mut resp)
        .context("reading /bigkeys from the admin endpoint")?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        bail!(
            "GET /bigkeys at {admin}: {status} (401: pass --token-file with the admin_token_file)"
        );
    }
    serde_json::from_str(body).context("decoding /bigkeys")
}

/// One line per key: endpoint, key, command, count, largest reply, most elements, top pods.
pub fn format_table(doc: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<12} {:<40} {:<10} {:>7} {:>12} {:>10}  TOP PODS\n",
        "ENDPOINT", "KEY", "COMMAND", "COUNT", "MAX BYTES", "MAX ELEMS"
    );
    let Some(eps) = doc.get("endpoints").and_then(|e| e.as_object()) else {
        return out;
    };
    for (ep, rows) in eps {
        for r in rows.as_array().into_iter().flatten() {
            let s = |f: &str| r.get(f).and_then(|v| v.as_str()).unwrap_or("").to_string();
            let n = |f: &str| r.get(f).and_then(|v| v.as_u64()).unwrap_or(0);
            let pods: Vec<String> = r
                .get("top_pods")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}({})",
                        p.get("pod").and_then(|v| v.as_str()).unwrap_or("?"),
                        p.get("count").and_then(|v| v.as_u64()).unwrap_or(0)
                    )
                })
                .collect();
            out.push_str(&format!(
                "{:<12} {:<40} {:<10} {:>7} {:>12} {:>10}  {}\n",
                ep,
                s("key"),
                s("command"),
                n("count"),
                n("max_bytes"),
                n("max_elements"),
                pods.join(" ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows() {
        let doc = serde_json::json!({"endpoints": {"cache": [
            {"key": "h", "command": "hgetall", "count": 2, "max_bytes": 300000,
             "max_elements": 40000, "top_pods": [{"pod": "pod-a", "count": 2}]}
        ]}});
        let t = format_table(&doc);
        let line = t.lines().nth(1).unwrap_or("");
        assert!(line.starts_with("cache"), "{t}");
        assert!(line.contains("hgetall") && line.contains("40000") && line.contains("pod-a(2)"));
    }
}
