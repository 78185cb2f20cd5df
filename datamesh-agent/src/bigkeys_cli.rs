//! `datamesh-agent bigkeys`: the running agent's `/bigkeys` as a table (or its JSON), read from
//! the admin endpoint like `datamesh-agent hotkeys` ([`crate::hotkeys_cli::fetch_json`]).

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
