//! The admin HTTP endpoint (plain HTTP/1.1, `Connection: close`): `/ready`, `/live`,
//! `/metrics` (Prometheus text), `/config_dump` (the effective config, passwords redacted),
//! `/connections` (the last 1024 accepted proxy connections), `/backends` (per endpoint:
//! topology nodes, pools, each backend connection's phase and in-flight commands), `/bigkeys`
//! (per endpoint, the keys with big replies) and `/hotkeys` (per endpoint, the hottest keys over
//! `hotkeys.window_s`: ops/s, reads, writes, top pods; keys shown as `hotkeys.key_display`)
//! and `/attacks` (per endpoint, the pods suspected of cache penetration or key scanning).
//! `/keyrules` lists the key rules (throttle, deny) with their origin (config, runtime, auto)
//! and counts per pod; `POST /keyrules` (a JSON rule, body at most 64 KiB) adds a runtime rule
//! and answers its id, `DELETE /keyrules/<id>` removes a runtime or automatic one.
//! `POST /debug/leak?resource=fds|memory|conns&amount=N` is the resource-leak drill's fault
//! injection, refused (403) unless `debug.fault_injection` is on.
//! The request line is parsed by hand: a few fixed routes do not need an HTTP stack.
//!
//! Access: loopback by default (config validation refuses another `admin_listen` unless
//! `admin_allow_remote`). When `admin_token_file` is set, every request but the probes
//! (`/ready`, `/live`: they tell only "ready" or "alive", and the kubelet sends no header)
//! must carry `Authorization: Bearer <token>`, compared in constant time; else 401. Changes
//! (POST, DELETE) need the token: without `admin_token_file` they are refused (403), since
//! anything that reaches the admin port could otherwise deny or throttle any tenant.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use datamesh_proxy::bigkeys::BigKeys;
use datamesh_proxy::config::Secret;
use datamesh_proxy::endpoint::{backends_snapshot, EndpointHandle};
use datamesh_proxy::hotkeys::HotKeysView;
use datamesh_proxy::keyrules::{validate_rule, KeyRules, RawKeyRule, RuleError};
use datamesh_proxy::stopped;

use crate::conns::ConnLog;
use crate::dataplane::Maps;

const MAX_REQUEST: usize = 8192;
/// Largest request body (`POST /keyrules`).
const MAX_BODY: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin_listen {addr}: {source}: is the port taken (use port 0 for an ephemeral one)?")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin handlers read.
pub struct AdminState {
    /// True once the data plane is attached/adopted and every listener is bound.
    pub ready: AtomicBool,
    pub registry: Registry,
    /// The effective config (replaced on reload).
    pub config_json: RwLock<String>,
    pub log: Arc<ConnLog>,
    pub maps: Arc<Maps>,
    /// The endpoints served, for `/backends`.
    pub endpoints: RwLock<Vec<Arc<EndpointHandle>>>,
    /// `/hotkeys`: every endpoint's hottest keys.
    pub hotkeys: Arc<HotKeysView>,
    /// Bearer token required on every route but the probes (from `admin_token_file`, replaced
    /// on reload); `None` = no token.
    pub token: RwLock<Option<Secret>>,
    /// Keys with big replies, for `/bigkeys` (the proxy's table).
    pub bigkeys: Arc<BigKeys>,
    /// Key rules: `GET /keyrules`, `POST /keyrules`, `DELETE /keyrules/<id>`.
    pub keyrules: Arc<KeyRules>,
    /// Pods suspected of key attacks, for `/attacks`.
    pub attacks: Arc<datamesh_proxy::attacks::Attacks>,
    /// The resource watchdog (`POST /debug/leak` when `debug.fault_injection` is on).
    pub watchdog: Arc<crate::watchdog::Watchdog>,
}

/// Routes that answer without a token: the kubelet's probes, which reveal nothing else.
const OPEN_ROUTES: [&str; 2] = ["/ready", "/live"];

/// Equality that takes the same time wherever the first difference is (it depends on the
/// lengths only), so the token cannot be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

/// The `Authorization: Bearer <token>` value of a request head, if any.
fn bearer(head: &str) -> Option<&str> {
    head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    })
}

/// Whether the request may see `path`.
fn authorized(head: &str, path: &str, token: Option<&Secret>) -> bool {
    match token {
        None => true,
        Some(_) if OPEN_ROUTES.contains(&path) => true,
        Some(t) => {
            bearer(head).is_some_and(|b| constant_time_eq(b.as_bytes(), t.expose().as_bytes()))
        }
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

pub fn spawn(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => break,
                res = listener.accept() => match res {
                    Ok((sock, peer)) => {
                        let state = state.clone();
                        tokio::spawn(async move {
                            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, serve(sock, &state)).await.unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))) {
                                debug!(%peer, error = %e, "admin request failed");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    })
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    /// After `?` (empty if none).
    query: &'a str,
}

fn parse_request_line(head: &str) -> Option<Request<'_>> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request {
        method,
        path,
        query,
    })
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

fn text(status: &'static str, body: &str) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.to_string(),
    }
}

fn json(status: &'static str, v: &serde_json::Value) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: format!("{v}\n"),
    }
}

/// `POST /keyrules` and `DELETE /keyrules/<id>` (the request is authorized already;
/// `token_set`: the admin endpoint has a token at all).
fn mutate(req: &Request<'_>, state: &AdminState, body: &[u8], token_set: bool) -> Response {
    let keyrules = req.path == "/keyrules" || req.path.starts_with("/keyrules/");
    if !keyrules {
        return text("405 Method Not Allowed", "only GET here\n");
    }
    if !token_set {
        return text(
            "403 Forbidden",
            "changing key rules needs authentication: set admin_token_file in the agent's config (reload with SIGHUP) and send Authorization: Bearer <token>\n",
        );
    }
    match (req.method, req.path) {
        ("POST", "/keyrules") => {
            let raw: RawKeyRule = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => {
                    return text(
                        "400 Bad Request",
                        &format!("the body is not a JSON key rule: {e}\n"),
                    )
                }
            };
            let names: Vec<String> = state
                .endpoints
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|h| h.name.clone())
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut errs = Vec::new();
            let spec = validate_rule(&raw, "", &names, "rt-0", &mut |f: &str, m: String| {
                errs.push(format!("{f}: {m}"))
            });
            let Some(mut spec) = spec else {
                return json("400 Bad Request", &serde_json::json!({ "errors": errs }));
            };
            if raw.id.is_none() {
                // The proxy names it (rt-N).
                spec.id.clear();
            }
            match state.keyrules.add_runtime(spec) {
                Ok(id) => json("201 Created", &serde_json::json!({ "id": id })),
                Err(e @ RuleError::Exists(_)) => text("409 Conflict", &format!("{e}\n")),
                Err(e) => text("400 Bad Request", &format!("{e}\n")),
            }
        }
        ("DELETE", p) if p.starts_with("/keyrules/") => {
            let id = p.strip_prefix("/keyrules/").unwrap_or_default();
            match state.keyrules.remove(id) {
                Ok(origin) => json(
                    "200 OK",
                    &serde_json::json!({ "removed": id, "origin": origin }),
                ),
                Err(e @ RuleError::NotFound(_)) => text("404 Not Found", &format!("{e}\n")),
                Err(e) => text("409 Conflict", &format!("{e}\n")),
            }
        }
        _ => text(
            "405 Method Not Allowed",
            "POST /keyrules (a JSON rule) or DELETE /keyrules/<id>\n",
        ),
    }
}

/// The most one `POST /debug/leak` may leak (descriptors, MiB, connections).
const MAX_LEAK: u64 = 1_000_000;

/// `POST /debug/leak?resource=fds|memory|conns&amount=N[&endpoint=NAME]`: fault injection
/// for the resource-leak drill, refused (403) unless `debug.fault_injection` is on. Leaks N
/// descriptors (/dev/null), N MiB (written, resident) or N dedicated backend connections
/// (outside the pools' budget), all kept until the worker exits.
async fn debug_leak(req: &Request<'_>, state: &AdminState) -> Response {
    if req.method != "POST" {
        return text(
            "405 Method Not Allowed",
            "POST /debug/leak?resource=fds|memory|conns&amount=N\n",
        );
    }
    if !state.watchdog.fault_injection.load(Ordering::Relaxed) {
        return text(
            "403 Forbidden",
            "fault injection is off: set debug.fault_injection: true in the agent's config (drills only; never in production)\n",
        );
    }
    let param = |name: &str| {
        req.query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let amount = match param("amount").map(str::parse::<u64>) {
        Some(Ok(n)) if (1..=MAX_LEAK).contains(&n) => n,
        _ => {
            return text(
                "400 Bad Request",
                &format!("amount=N is required, 1 to {MAX_LEAK}\n"),
            )
        }
    };
    let result = match param("resource") {
        Some("fds") => crate::watchdog::leak_fds(amount)
            .map(|n| format!("leaked {n} file descriptors\n"))
            .map_err(|e| format!("opening /dev/null: {e}\n")),
        Some("memory") => Ok(format!(
            "leaked {} MiB\n",
            crate::watchdog::leak_memory(amount)
        )),
        Some("conns" | "backend_conns") => {
            let handles = state
                .endpoints
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            crate::watchdog::leak_conns(&handles, param("endpoint"), amount)
                .await
                .map(|n| format!("leaked {n} dedicated backend connections\n"))
                .map_err(|e| format!("{e}\n"))
        }
        _ => return text("400 Bad Request", "resource=fds|memory|conns is required\n"),
    };
    match result {
        Ok(msg) => {
            warn!(query = req.query, "fault injection: {}", msg.trim_end());
            text("200 OK", &msg)
        }
        Err(msg) => text("500 Internal Server Error", &msg),
    }
}

fn route(req: &Request<'_>, state: &AdminState, body: &[u8], token_set: bool) -> Response {
    if req.method == "POST" || req.method == "DELETE" {
        return mutate(req, state, body, token_set);
    }
    if req.method != "GET" && req.method != "HEAD" {
        return text(
            "405 Method Not Allowed",
            "only GET (and POST, DELETE on /keyrules)\n",
        );
    }
    match req.path {
        "/live" => text("200 OK", "alive"),
        "/ready" => {
            if state.ready.load(Ordering::SeqCst) {
                text("200 OK", "ready")
            } else {
                text("503 Service Unavailable", "not ready")
            }
        }
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => Response {
                    status: "200 OK",
                    content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                },
                Err(_) => text("500 Internal Server Error", "metrics encoding failed\n"),
            }
        }
        "/config_dump" => Response {
            status: "200 OK",
            content_type: "application/json",
            body: state
                .config_json
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        },
        "/backends" => {
            let eps = state
                .endpoints
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Response {
                status: "200 OK",
                content_type: "application/json",
                body: backends_snapshot(&eps).to_string(),
            }
        }
        "/bigkeys" => Response {
            status: "200 OK",
            content_type: "application/json",
            body: bigkeys_json(&state.bigkeys).to_string(),
        },
        "/attacks" => Response {
            status: "200 OK",
            content_type: "application/json",
            body: state.attacks.json().to_string(),
        },
        "/hotkeys" => Response {
            status: "200 OK",
            content_type: "application/json",
            body: state.hotkeys.json(None).to_string(),
        },
        "/keyrules" => json("200 OK", &state.keyrules.json()),
        "/connections" => {
            let snap = state.log.snapshot(&state.maps);
            match serde_json::to_string(&snap) {
                Ok(body) => Response {
                    status: "200 OK",
                    content_type: "application/json",
                    body,
                },
                Err(_) => text("500 Internal Server Error", "encoding failed\n"),
            }
        }
        _ => text("404 Not Found", "not found\n"),
    }
}

/// `/bigkeys`: `{"endpoints": {"<name>": [{key, command, count, max_bytes, max_elements,
/// last_seen, top_pods: [{pod, count}]}]}}`, each endpoint's keys by count.
fn bigkeys_json(t: &BigKeys) -> serde_json::Value {
    let mut eps = serde_json::Map::new();
    for k in t.snapshot() {
        let rows = eps
            .entry(k.endpoint.clone())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let (serde_json::Value::Array(a), Ok(v)) = (rows, serde_json::to_value(&k)) {
            a.push(v);
        }
    }
    serde_json::json!({ "endpoints": eps })
}

/// The `Content-Length` of a request head (0 when none or unreadable).
fn content_length(head: &str) -> usize {
    head.lines()
        .skip(1)
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

async fn serve(mut sock: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read the head only; GET requests carry no body we care about.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            break;
        }
    }
    let (head_end, sep) = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (i, 4),
        None => (
            buf.windows(2)
                .position(|w| w == b"\n\n")
                .unwrap_or(buf.len()),
            2,
        ),
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf.get(head_end + sep..).unwrap_or_default().to_vec();
    let resp = match parse_request_line(&head) {
        Some(req) if req.method == "POST" && content_length(&head) > MAX_BODY => Response {
            status: "413 Payload Too Large",
            content_type: "text/plain; charset=utf-8",
            body: format!("the body is over {MAX_BODY} bytes\n"),
        },
        Some(req) => {
            if req.method == "POST" {
                let want = content_length(&head);
                while body.len() < want {
                    let n = sock.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(want);
            }
            let token = state
                .token
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut r = if authorized(&head, req.path, token.as_ref()) {
                if req.path == "/debug/leak" {
                    debug_leak(&req, state).await
                } else {
                    route(&req, state, &body, token.is_some())
                }
            } else {
                Response {
                    status: "401 Unauthorized",
                    content_type: "text/plain; charset=utf-8",
                    body: "missing or wrong Authorization: Bearer token (admin_token_file)\n"
                        .into(),
                }
            };
            if req.method == "HEAD" {
                r.body.clear();
            }
            r
        }
        None => Response {
            status: "400 Bad Request",
            content_type: "text/plain; charset=utf-8",
            body: "bad request\n".into(),
        },
    };
    let out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        resp.status,
        if resp.status.starts_with("401") {
            "text/plain; charset=utf-8\r\nWWW-Authenticate: Bearer"
        } else {
            resp.content_type
        },
        resp.body.len(),
        resp.body
    );
    sock.write_all(out.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Request {
                method: "GET",
                path: "/ready",
                query: ""
            })
        );
        assert_eq!(
            parse_request_line("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Request {
                method: "GET",
                path: "/metrics",
                query: "x=1"
            })
        );
        assert_eq!(parse_request_line("garbage"), None);
        assert_eq!(parse_request_line(""), None);
    }

    #[test]
    fn content_lengths() {
        assert_eq!(
            content_length("POST /keyrules HTTP/1.1\r\ncontent-length: 42\r\n"),
            42
        );
        assert_eq!(content_length("POST /keyrules HTTP/1.1\r\nHost: x\r\n"), 0);
        assert_eq!(
            content_length("POST /keyrules HTTP/1.1\r\nContent-Length: x\r\n"),
            0
        );
    }

    #[test]
    fn bearer_token_checks() {
        let t = Secret("s3cret".into());
        let head = |auth: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
        assert!(authorized(&head(""), "/metrics", None));
        assert!(!authorized(&head(""), "/metrics", Some(&t)));
        assert!(authorized(&head(""), "/ready", Some(&t)));
        assert!(authorized(&head(""), "/live", Some(&t)));
        assert!(authorized(
            &head("authorization: Bearer s3cret"),
            "/metrics",
            Some(&t)
        ));
        assert!(authorized(
            &head("Authorization: bearer  s3cret "),
            "/config_dump",
            Some(&t)
        ));
        for bad in [
            "Authorization: Bearer s3cre",
            "Authorization: Bearer s3cretx",
            "Authorization: Basic s3cret",
            "Authorization: s3cret",
            "X-Token: Bearer s3cret",
        ] {
            assert!(!authorized(&head(bad), "/connections", Some(&t)), "{bad}");
        }
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b""));
    }
}
