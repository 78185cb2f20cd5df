//! `datamesh-agent attacks`: the running agent's `/attacks` as a table (endpoint, pod, kind,
//! since, lookups and miss ratio or scans/s over the window, automatic throttle), read from the
//! admin endpoint like `datamesh-agent hotkeys` ([`crate::hotkeys_cli::fetch_json`]).

use std::time::{SystemTime, UNIX_EPOCH};

/// "12s ago" / "in 40s" from unix seconds.
fn relative(t: u64, now: u64) -> String {
    if t <= now {
        format!("{}s ago", now - t)
    } else {
        format!("in {}s", t - now)
    }
}

/// One line per suspected pod and kind; a note when detection is off or nobody is suspected.
pub fn format_table(doc: &serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_table_at(doc, now)
}

fn format_table_at(doc: &serde_json::Value, now: u64) -> String {
    if doc.get("enabled").and_then(|v| v.as_bool()) == Some(false) {
        return "key-attack detection is off (attacks.enabled: false)\n".into();
    }
    let window = doc.get("window_s").and_then(|v| v.as_u64()).unwrap_or(0);
    let mut out = format!(
        "{:<12} {:<28} {:<12} {:>9} {:>9} {:>7} {:>8}  AUTO THROTTLE (window {window}s)\n",
        "ENDPOINT", "POD", "KIND", "SINCE", "LOOKUPS", "MISS%", "SCANS/S"
    );
    let mut rows = 0;
    if let Some(eps) = doc.get("endpoints").and_then(|e| e.as_object()) {
        for (ep, list) in eps {
            for r in list.as_array().into_iter().flatten() {
                let s = |f: &str| r.get(f).and_then(|v| v.as_str()).unwrap_or("").to_string();
                let n = |f: &str| r.get(f).and_then(|v| v.as_u64()).unwrap_or(0);
                let x = |f: &str| r.get(f).and_then(|v| v.as_f64()).unwrap_or(0.0);
                let throttle = match r.get("auto_throttled_until").and_then(|v| v.as_u64()) {
                    Some(t) => format!("until {}", relative(t, now)),
                    None => "-".into(),
                };
                out.push_str(&format!(
                    "{:<12} {:<28} {:<12} {:>9} {:>9} {:>7.1} {:>8.1}  {}\n",
                    ep,
                    s("pod"),
                    s("kind"),
                    relative(n("since"), now),
                    n("lookups"),
                    x("miss_ratio") * 100.0,
                    x("scans_per_s"),
                    throttle
                ));
                rows += 1;
            }
        }
    }
    if rows == 0 {
        out.push_str("(no pod suspected)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows() {
        let doc = serde_json::json!({"enabled": true, "window_s": 10, "endpoints": {"cache": [
            {"pod": "web-1", "kind": "penetration", "since": 990, "lookups": 5000,
             "misses": 4990, "miss_ratio": 0.998, "scans_per_s": 0.0,
             "auto_throttled_until": 1050}
        ]}});
        let t = format_table_at(&doc, 1000);
        let line = t.lines().nth(1).unwrap_or("");
        assert!(line.starts_with("cache"), "{t}");
        assert!(
            line.contains("web-1")
                && line.contains("penetration")
                && line.contains("10s ago")
                && line.contains("99.8")
                && line.contains("until in 50s"),
            "{line}"
        );
        let empty = serde_json::json!({"enabled": true, "window_s": 10, "endpoints": {}});
        assert!(format_table_at(&empty, 0).contains("no pod suspected"));
        let off = serde_json::json!({"enabled": false});
        assert!(format_table_at(&off, 0).contains("off"));
    }
}
