//! `datamesh-agent keyrules [list|add ...|rm ID]`: the running agent's key rules (admin
//! `/keyrules`) as a table, and runtime rules added or removed without a restart. Changes need
//! the admin token (`--token-file`, the agent's `admin_token_file`); the requests go through
//! the one admin client of the CLIs ([`crate::hotkeys_cli`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::Value;

use crate::hotkeys_cli::{admin_delete, admin_get, admin_post};

#[derive(Debug, Subcommand)]
pub enum KeyRulesCmd {
    /// Every rule (config, runtime, auto) with its counts per pod.
    List,
    /// Adds a runtime rule (kept across config reloads, not across agent restarts).
    Add {
        /// throttle or deny.
        #[arg(long)]
        action: String,
        /// A key, or a glob such as 'user:*'.
        #[arg(long)]
        key: Option<String>,
        /// Only this endpoint (default: every endpoint).
        #[arg(long)]
        endpoint: Option<String>,
        /// Only these commands (repeat the flag).
        #[arg(long = "command")]
        commands: Vec<String>,
        /// Only pods whose name matches one of these globs (repeat the flag).
        #[arg(long = "pod")]
        pods: Vec<String>,
        /// Only pods whose namespace matches one of these globs (repeat the flag).
        #[arg(long = "namespace")]
        namespaces: Vec<String>,
        /// Commands per second (throttle).
        #[arg(long)]
        rate: Option<u32>,
        /// Commands at once (throttle; default: rate).
        #[arg(long)]
        burst: Option<u32>,
        /// The rule's id (default: rt-N, chosen by the agent).
        #[arg(long)]
        id: Option<String>,
    },
    /// Removes a runtime or automatic rule.
    Rm { id: String },
}

/// Runs `cmd` against the agent at `admin`; what to print.
pub fn run(
    cmd: KeyRulesCmd,
    admin: SocketAddr,
    token_file: Option<&Path>,
    json: bool,
) -> anyhow::Result<String> {
    match cmd {
        KeyRulesCmd::List => {
            let body = admin_get(admin, "/keyrules", token_file)?;
            let v: Value =
                serde_json::from_str(&body).context("the agent's /keyrules is not JSON")?;
            Ok(if json {
                format!("{}\n", serde_json::to_string_pretty(&v)?)
            } else {
                format_table(&v)
            })
        }
        KeyRulesCmd::Add {
            action,
            key,
            endpoint,
            commands,
            pods,
            namespaces,
            rate,
            burst,
            id,
        } => {
            let mut rule = serde_json::json!({ "action": action });
            let opt = |v: &mut Value, k: &str, x: Value| {
                if let Value::Object(m) = v {
                    m.insert(k.into(), x);
                }
            };
            for (k, x) in [
                ("key", key.map(Value::from)),
                ("endpoint", endpoint.map(Value::from)),
                ("rate", rate.map(Value::from)),
                ("burst", burst.map(Value::from)),
                ("id", id.map(Value::from)),
            ] {
                if let Some(x) = x {
                    opt(&mut rule, k, x);
                }
            }
            for (k, l) in [
                ("commands", commands),
                ("pods", pods),
                ("namespaces", namespaces),
            ] {
                if !l.is_empty() {
                    opt(&mut rule, k, Value::from(l));
                }
            }
            let body = admin_post(admin, "/keyrules", &rule.to_string(), token_file)?;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            Ok(match v.get("id").and_then(Value::as_str) {
                Some(id) => format!("added key rule {id}\n"),
                None => body,
            })
        }
        KeyRulesCmd::Rm { id } => {
            admin_delete(admin, &format!("/keyrules/{id}"), token_file)?;
            Ok(format!("removed key rule {id}\n"))
        }
    }
}

/// The table of a `/keyrules` reply.
pub fn format_table(v: &Value) -> String {
    let empty = Vec::new();
    let rules = v.get("rules").and_then(Value::as_array).unwrap_or(&empty);
    if rules.is_empty() {
        return "no key rules\n".into();
    }
    let s = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let list = |r: &Value, k: &str| {
        r.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14}  {:<7}  {:<8}  {:<10}  {:<24}  {:<14}  {:<16}  {:>9}  COUNTS (pod: delayed/refused/denied)",
        "ID", "ORIGIN", "ACTION", "ENDPOINT", "KEY", "COMMANDS", "PODS/NAMESPACES", "RATE"
    );
    for r in rules {
        let rate = match s(r, "action").as_str() {
            "throttle" => format!(
                "{}/s+{}",
                r.get("rate").and_then(Value::as_u64).unwrap_or(0),
                r.get("burst").and_then(Value::as_u64).unwrap_or(0)
            ),
            _ => "-".into(),
        };
        let mut origin = s(r, "origin");
        if let Some(left) = r.get("expires_in_s").and_then(Value::as_f64) {
            origin = format!("{origin} {left:.0}s");
        }
        let sel = match (list(r, "pods"), list(r, "namespaces")) {
            (p, n) if p.is_empty() && n.is_empty() => "*".to_string(),
            (p, n) if n.is_empty() => p,
            (p, n) if p.is_empty() => format!("ns:{n}"),
            (p, n) => format!("{p} ns:{n}"),
        };
        let counts: Vec<String> = r
            .get("counts")
            .and_then(Value::as_array)
            .unwrap_or(&empty)
            .iter()
            .map(|c| {
                let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
                format!(
                    "{}: {}/{}/{}",
                    s(c, "pod"),
                    n("delayed"),
                    n("refused"),
                    n("denied")
                )
            })
            .collect();
        let or_all = |x: String| if x.is_empty() { "*".into() } else { x };
        let _ = writeln!(
            out,
            "{:<14}  {:<7}  {:<8}  {:<10}  {:<24}  {:<14}  {:<16}  {:>9}  {}",
            s(r, "id"),
            origin,
            s(r, "action"),
            or_all(s(r, "endpoint")),
            or_all(s(r, "key")),
            or_all(list(r, "commands")),
            sel,
            rate,
            counts.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_origin_selectors_and_counts() {
        let v = serde_json::json!({"rules": [
            {"id": "hot", "origin": "config", "action": "throttle", "endpoint": "cache",
             "key": "user:*", "rate": 100, "burst": 10,
             "counts": [{"pod": "shop.web-1", "delayed": 3, "refused": 2, "denied": 0}]},
            {"id": "auto-1", "origin": "auto", "expires_in_s": 42.2, "action": "throttle",
             "endpoint": "cache", "key": "h:0123", "rate": 50, "burst": 5, "counts": []},
            {"id": "nokeys", "origin": "runtime", "action": "deny", "commands": ["keys"],
             "namespaces": ["shop"], "counts": []}]});
        let t = format_table(&v);
        assert!(t.contains("user:*") && t.contains("100/s+10"), "{t}");
        assert!(t.contains("shop.web-1: 3/2/0"), "{t}");
        assert!(t.contains("auto 42s"), "{t}");
        assert!(t.contains("ns:shop") && t.contains("keys"), "{t}");
        assert_eq!(
            format_table(&serde_json::json!({"rules": []})),
            "no key rules\n"
        );
    }
}
