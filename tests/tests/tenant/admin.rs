//! CLIENT LIST/INFO/ID/KILL and ACL WHOAMI/USERS/CAT/LOG answered by the proxy, with two pods
//! and an operator: a client sees and kills only connections of its own pod (or of its own
//! configured user), an operator all of them; a killed client is closed without an error line;
//! the ACL log holds failed AUTHs per pod; the shapes are Redis's in RESP2 and RESP3 (compared
//! with the direct redis-server where Redis 7.0.15 has the same answer).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::pod::Pod;
use datamesh_tests::proxy::{py_dir, python, simple, RespConn};
use datamesh_tests::resp::{self, parse_client_list, Reply};
use datamesh_tests::Env;

use crate::common::{login, metric_value, metrics, proxy_addr, users_yaml};

/// A RESP connection held by a process in a pod (`tests/py/resp_pipe.py`), so the proxy
/// attributes it to the pod like any captured client.
struct PodConn {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<std::io::Result<Reply>>,
    what: String,
}

impl PodConn {
    fn connect(pod: &Pod, to: SocketAddr) -> Result<Self> {
        let mut cmd = pod.cmd("python3");
        cmd.arg(py_dir().join("resp_pipe.py"))
            .arg(to.ip().to_string())
            .arg(to.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("starting resp_pipe.py in the pod")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let reply = resp::read_reply(&mut r);
                let end = reply.is_err();
                if tx.send(reply).is_err() || end {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            replies: rx,
            what: format!("pod {} → {to}", pod.name()),
        })
    }

    /// A connection of `pod` logged in as `user`.
    fn login(pod: &Pod, to: SocketAddr, user: &str, pw: &str) -> Result<Self> {
        let mut c = Self::connect(pod, to)?;
        c.expect(&["AUTH", user, pw], simple("OK"))?;
        Ok(c)
    }

    fn cmd(&mut self, args: &[&str]) -> Result<Reply> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.stdin
            .write_all(&resp::encode(&args))
            .with_context(|| format!("writing to {}", self.what))?;
        self.stdin.flush()?;
        match self.replies.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => bail!("{}: {e} (connection closed?)", self.what),
            Err(_) => bail!("{}: no reply within 10 s", self.what),
        }
    }

    fn expect(&mut self, args: &[&str], want: Reply) -> Result<()> {
        let got = self.cmd(args)?;
        ensure!(
            got == want,
            "{args:?} on {}: {got:?}, expected {want:?}",
            self.what
        );
        Ok(())
    }

    fn id(&mut self) -> Result<i64> {
        match self.cmd(&["CLIENT", "ID"])? {
            Reply::Int(n) => Ok(n),
            other => bail!("CLIENT ID answered {other:?}"),
        }
    }

    /// Its own CLIENT INFO fields.
    fn info(&mut self) -> Result<BTreeMap<String, String>> {
        let r = self.cmd(&["CLIENT", "INFO"])?;
        let text =
            String::from_utf8_lossy(r.as_bytes().context("CLIENT INFO is text")?).into_owned();
        parse_client_list(&text)
            .into_iter()
            .next()
            .context("CLIENT INFO has a line")
    }

    /// True when the proxy closed the connection with nothing more written.
    fn closed_cleanly(&mut self, within: Duration) -> Result<bool> {
        match self.replies.recv_timeout(within) {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(true),
            Ok(Err(e)) => bail!("{}: {e}", self.what),
            Ok(Ok(r)) => bail!("{}: got {r:?} instead of a clean close", self.what),
            Err(_) => Ok(false),
        }
    }
}

impl Drop for PodConn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ids in a CLIENT LIST reply.
fn list_ids(r: &Reply) -> Result<Vec<i64>> {
    let text = String::from_utf8_lossy(r.as_bytes().context("CLIENT LIST is text")?).into_owned();
    parse_client_list(&text)
        .iter()
        .map(|c| {
            c.get("id")
                .and_then(|i| i.parse().ok())
                .context("a line without id")
        })
        .collect()
}

fn bulks(r: &Reply) -> Vec<String> {
    match r {
        Reply::Array(Some(v)) => v
            .iter()
            .filter_map(|x| x.as_bytes())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect(),
        _ => Vec::new(),
    }
}

/// An ACL LOG entry in RESP2 (a flat array of name/value pairs) as a map.
fn log_entries(r: &Reply) -> Result<Vec<BTreeMap<String, Reply>>> {
    let Reply::Array(Some(entries)) = r else {
        bail!("ACL LOG answered {r:?}");
    };
    entries
        .iter()
        .map(|e| {
            let Reply::Array(Some(kv)) = e else {
                bail!("an ACL LOG entry is {e:?}");
            };
            ensure!(kv.len() % 2 == 0, "odd entry {kv:?}");
            Ok(kv
                .chunks(2)
                .filter_map(|p| {
                    Some((
                        String::from_utf8_lossy(p[0].as_bytes()?).into_owned(),
                        p[1].clone(),
                    ))
                })
                .collect())
        })
        .collect()
}

fn field(e: &BTreeMap<String, Reply>, k: &str) -> String {
    e.get(k)
        .and_then(|v| v.as_bytes())
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// The field names of RESP2 ACL LOG entries, in order.
fn log_field_names(r: &Reply) -> Vec<String> {
    match r {
        Reply::Array(Some(entries)) => match entries.first() {
            Some(Reply::Array(Some(kv))) => kv
                .chunks(2)
                .filter_map(|p| p[0].as_bytes())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

const USERS: &[(&str, &str, Option<&str>)] = &[
    ("ops", "ops-pw", Some("+@all")),
    ("app", "app-pw", None),
    ("web", "web-pw", None),
];

#[test]
fn client_list_and_kill_are_scoped_to_the_pod_the_user_or_the_operator() {
    run_test(Env::builder().pods(["a", "b"]).agent(false), |env| {
        let t = Instant::now();
        let mut cfg = env.base_agent_config()?;
        cfg.extra_yaml = users_yaml(USERS);
        env.start_agent(cfg)?;
        let proxy = proxy_addr(env)?;
        let svc = env.service_addr();
        let (pa, pb) = (env.pod("a"), env.pod("b"));
        let mut a1 = PodConn::login(pa, svc, "app", "app-pw")?;
        let mut a2 = PodConn::login(pa, svc, "app", "app-pw")?;
        let mut b1 = PodConn::login(pb, svc, "web", "web-pw")?;
        let mut ops = login(proxy, "ops", "ops-pw")?;
        let (a1_id, a2_id, b1_id) = (a1.id()?, a2.id()?, b1.id()?);
        let a2_addr = a2.info()?.get("addr").cloned().context("addr")?;
        let b1_info = b1.info()?;
        let b1_addr = b1_info.get("addr").cloned().context("addr")?;
        ensure!(
            b1_addr.starts_with(&format!("{}:", pb.ip())),
            "CLIENT INFO addr of pod b's client is {b1_addr}, expected pod b's address {}",
            pb.ip()
        );
        ensure!(
            b1_info.get("laddr") == Some(&svc.to_string()),
            "laddr {:?}, expected the address the pod dialled ({svc})",
            b1_info.get("laddr")
        );

        // A tenant sees its pod's connections only; the operator sees all.
        let mine = list_ids(&a1.cmd(&["CLIENT", "LIST"])?)?;
        ensure!(
            mine == [a1_id, a2_id],
            "pod a's CLIENT LIST shows {mine:?}, expected {a1_id} and {a2_id}"
        );
        let theirs = list_ids(&b1.cmd(&["CLIENT", "LIST"])?)?;
        ensure!(theirs == [b1_id], "pod b's CLIENT LIST shows {theirs:?}");
        let all = list_ids(&ops.cmd(&["CLIENT", "LIST"])?)?;
        for id in [a1_id, a2_id, b1_id] {
            ensure!(
                all.contains(&id),
                "the operator's CLIENT LIST {all:?} lacks {id}"
            );
        }
        let by_id = list_ids(&a1.cmd(&[
            "CLIENT",
            "LIST",
            "ID",
            &b1_id.to_string(),
            &a2_id.to_string(),
        ])?)?;
        ensure!(
            by_id == [a2_id],
            "CLIENT LIST ID of another pod's client showed {by_id:?}"
        );

        // Another pod's client cannot be killed (it does not exist for this one).
        a1.expect(
            &["CLIENT", "KILL", &b1_addr],
            Reply::Error("ERR No such client".into()),
        )?;
        a1.expect(&["CLIENT", "KILL", "ID", &b1_id.to_string()], Reply::Int(0))?;
        a1.expect(&["CLIENT", "KILL", "ADDR", &b1_addr], Reply::Int(0))?;
        b1.expect(&["PING"], simple("PONG"))?;

        // Its own pod's: the old form, and the killed client sees a clean close.
        a1.expect(&["CLIENT", "KILL", &a2_addr], simple("OK"))?;
        ensure!(
            a2.closed_cleanly(Duration::from_secs(3))?,
            "the killed client is still open"
        );

        // Same configured user in another pod: visible and killable by USER.
        let mut b2 = PodConn::login(pb, svc, "app", "app-pw")?;
        let b2_id = b2.id()?;
        let mine = list_ids(&a1.cmd(&["CLIENT", "LIST"])?)?;
        ensure!(
            mine == [a1_id, b2_id],
            "pod a's CLIENT LIST after app logged in from pod b: {mine:?}"
        );
        a1.expect(
            &["CLIENT", "KILL", "USER", "web"],
            Reply::Error("ERR No such user 'web'".into()),
        )?;
        a1.expect(&["CLIENT", "KILL", "USER", "app"], Reply::Int(1))?;
        ensure!(
            b2.closed_cleanly(Duration::from_secs(3))?,
            "b2 is still open"
        );

        // The operator kills anyone; a client may kill itself (reply first, then the close).
        ops.expect(&["CLIENT", "KILL", "ID", &b1_id.to_string()], Reply::Int(1))?;
        ensure!(
            b1.closed_cleanly(Duration::from_secs(3))?,
            "b1 is still open"
        );
        a1.expect(&["CLIENT", "KILL", "ID", &a1_id.to_string()], Reply::Int(0))?;
        a1.expect(
            &["CLIENT", "KILL", "ID", &a1_id.to_string(), "SKIPME", "no"],
            Reply::Int(1),
        )?;
        ensure!(
            a1.closed_cleanly(Duration::from_secs(3))?,
            "a1 is still open after killing itself"
        );
        ops.expect(&["PING"], simple("PONG"))?;

        // Syntax errors as Redis words them (the same through the proxy and direct).
        let mut direct = RespConn::connect(env.redis().addr())?;
        for args in [
            &["CLIENT", "KILL", "ID", "x"][..],
            &["CLIENT", "KILL", "TYPE", "nosuch"],
            &["CLIENT", "KILL", "SKIPME", "maybe"],
            &["CLIENT", "KILL", "FOO", "bar"],
            &["CLIENT", "KILL", "ID", "1", "ADDR"],
            &["CLIENT", "LIST", "TYPE", "nosuch"],
            &["CLIENT", "LIST", "ID", "x"],
            &["CLIENT", "LIST", "foo"],
            &["CLIENT", "KILL", "9.9.9.9:9"],
            &["CLIENT", "KILL", "ID", "99999"],
        ] {
            let (p, d) = (ops.cmd(args)?, direct.cmd(args)?);
            ensure!(p == d, "{args:?}: proxy {p:?}, redis-server {d:?}");
        }
        let m = metrics(env)?;
        let killed = metric_value(
            &m,
            "datamesh_proxy_clients_closed_total",
            &["reason=\"killed\""],
        );
        ensure!(
            killed == Some(4.0),
            "datamesh_proxy_clients_closed_total{{reason=\"killed\"}} is {killed:?}, expected 4"
        );
        eprintln!("CLIENT LIST/KILL scoping: {:?}", t.elapsed());
        Ok(())
    });
}

#[test]
fn acl_answers_and_the_failed_auth_log_per_pod_in_resp2_and_resp3() {
    run_test(Env::builder().pods(["a", "b"]).agent(false), |env| {
        let t = Instant::now();
        let mut cfg = env.base_agent_config()?;
        cfg.extra_yaml = users_yaml(USERS);
        env.start_agent(cfg)?;
        let proxy = proxy_addr(env)?;
        let svc = env.service_addr();
        let (pa, pb) = (env.pod("a"), env.pod("b"));
        let mut direct = RespConn::connect(env.redis().addr())?;
        direct.expect(&["ACL", "LOG", "RESET"], simple("OK"))?;

        // One failed AUTH per pod, with different user names (and the same on the server).
        for (pod, user) in [(pa, "mallory-a"), (pb, "mallory-b")] {
            let mut c = PodConn::connect(pod, svc)?;
            match c.cmd(&["AUTH", user, "guess"])? {
                Reply::Error(e) if e.starts_with("WRONGPASS") => {}
                other => bail!("a wrong AUTH from pod {} answered {other:?}", pod.name()),
            }
        }
        match direct.cmd(&["AUTH", "mallory-a", "guess"])? {
            Reply::Error(e) if e.starts_with("WRONGPASS") => {}
            other => bail!("a wrong AUTH on redis-server answered {other:?}"),
        }

        let mut a = PodConn::login(pa, svc, "app", "app-pw")?;
        a.expect(&["ACL", "WHOAMI"], Reply::Bulk(Some(b"app".to_vec())))?;
        ensure!(
            bulks(&a.cmd(&["ACL", "USERS"])?) == ["app"],
            "a tenant's ACL USERS"
        );
        let mut ops = login(proxy, "ops", "ops-pw")?;
        ensure!(
            bulks(&ops.cmd(&["ACL", "USERS"])?) == ["app", "ops", "web"],
            "the operator's ACL USERS"
        );
        // ACL CAT: Redis 7.0.15's answer.
        for args in [&["ACL", "CAT"][..], &["ACL", "CAT", "nosuch"]] {
            let (p, d) = (a.cmd(args)?, direct.cmd(args)?);
            ensure!(p == d, "{args:?}: proxy {p:?}, redis-server {d:?}");
        }
        for cat in ["read", "keyspace", "admin", "pubsub"] {
            let mut p = bulks(&a.cmd(&["ACL", "CAT", cat])?);
            let mut d = bulks(&direct.cmd(&["ACL", "CAT", cat])?);
            p.sort();
            d.sort();
            ensure!(p == d, "ACL CAT {cat}: proxy {p:?}, redis-server {d:?}");
        }

        // ACL LOG: pod a's failed AUTH only; Redis's fields (7.0.15 has the first seven).
        let log = a.cmd(&["ACL", "LOG"])?;
        let entries = log_entries(&log)?;
        ensure!(entries.len() == 1, "pod a's ACL LOG: {log:?}");
        let e = &entries[0];
        ensure!(
            field(e, "reason") == "auth"
                && field(e, "context") == "toplevel"
                && field(e, "object") == "AUTH"
                && field(e, "username") == "mallory-a"
                && e.get("count") == Some(&Reply::Int(1))
                && field(e, "client-info").contains(&format!("addr={}:", pa.ip())),
            "pod a's ACL LOG entry: {e:?}"
        );
        let names = log_field_names(&log);
        let direct_names = log_field_names(&direct.cmd(&["ACL", "LOG"])?);
        ensure!(
            names.len() == 10 && names[..direct_names.len()] == direct_names[..],
            "ACL LOG fields: proxy {names:?}, redis-server {direct_names:?}"
        );
        let all = log_entries(&ops.cmd(&["ACL", "LOG"])?)?;
        let users: Vec<String> = all.iter().map(|e| field(e, "username")).collect();
        ensure!(
            users.contains(&"mallory-a".to_string()) && users.contains(&"mallory-b".to_string()),
            "the operator's ACL LOG: {users:?}"
        );
        // A policy refusal is logged too (reason command, its ACL name).
        match a.cmd(&["FLUSHALL"])? {
            Reply::Error(e) if e.starts_with("NOPERM") => {}
            other => bail!("FLUSHALL from a tenant answered {other:?}"),
        }
        let log = log_entries(&a.cmd(&["ACL", "LOG", "1"])?)?;
        ensure!(
            log.len() == 1
                && field(&log[0], "reason") == "command"
                && field(&log[0], "object") == "flushall"
                && field(&log[0], "username") == "app",
            "ACL LOG 1 after FLUSHALL: {log:?}"
        );
        // The other ACL subcommands stay refused.
        match a.cmd(&["ACL", "LIST"])? {
            Reply::Error(e) if e.contains("ACL is not supported") => {}
            other => bail!("ACL LIST answered {other:?}"),
        }

        // RESP3 (redis-py, protocol=3) in pod b, and the same script against redis-server.
        let args = |host: &str, port: u16, user: &str, pw: &str| -> Vec<String> {
            [
                "--host",
                host,
                "--port",
                &port.to_string(),
                "--user",
                user,
                "--password",
                pw,
                "--bad-user",
                "mallory-3",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let p = python(
            pb.cmd("python3"),
            "admin_resp3.py",
            &args(&svc.ip().to_string(), svc.port(), "web", "web-pw"),
        )?;
        let raddr = env.redis().addr();
        let d = python(
            std::process::Command::new("python3"),
            "admin_resp3.py",
            &args(
                &raddr.ip().to_string(),
                raddr.port(),
                "default",
                "nopass-any",
            ),
        );
        ensure!(
            p["whoami"] == "web" && p["users"] == serde_json::json!(["web"]),
            "RESP3 ACL WHOAMI/USERS: {p}"
        );
        ensure!(
            p["info"]["user"] == "web" && p["info"]["resp"] == "3",
            "RESP3 CLIENT INFO: {}",
            p["info"]
        );
        ensure!(
            p["list_ids"]
                .as_array()
                .is_some_and(|ids| ids.contains(&p["id"])),
            "RESP3 CLIENT LIST lacks the caller: {p}"
        );
        let first = &p["log"][0];
        ensure!(
            p["log_type"] == "list"
                && first["type"] == "dict"
                && first["fields"]["username"] == "mallory-3"
                && first["fields"]["count"] == 1
                && first["fields"]["reason"] == "auth"
                && first["age_type"] == "float",
            "RESP3 ACL LOG: {}",
            p["log"]
        );
        // Against redis-server (default user without a password: redis-py AUTHs, which the
        // default user accepts with any password; the bad user's AUTH fails the same way).
        if let Ok(d) = d {
            ensure!(
                d["cat"] == p["cat"] && d["cat_read"] == p["cat_read"],
                "RESP3 ACL CAT differs from redis-server"
            );
            let dfirst = &d["log"][0];
            ensure!(
                dfirst["type"] == "dict" && dfirst["age_type"] == "float",
                "redis-server RESP3 ACL LOG: {}",
                d["log"]
            );
            let pk: Vec<String> = serde_json::from_value(first["keys"].clone())?;
            let dk: Vec<String> = serde_json::from_value(dfirst["keys"].clone())?;
            ensure!(
                pk[..dk.len()] == dk[..],
                "RESP3 ACL LOG keys: proxy {pk:?}, redis-server {dk:?}"
            );
            let info_keys = |v: &serde_json::Value| -> Vec<String> {
                v.as_object()
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default()
            };
            let (pi, di) = (info_keys(&p["info"]), info_keys(&d["info"]));
            let missing: Vec<&String> = di.iter().filter(|k| !pi.contains(k)).collect();
            ensure!(
                missing.is_empty(),
                "CLIENT INFO lacks redis-server's fields {missing:?}"
            );
        } else if let Err(e) = d {
            bail!("admin_resp3.py against redis-server: {e:#}");
        }

        // RESET: a tenant clears its pod's entries, not the others'.
        a.expect(&["ACL", "LOG", "RESET"], simple("OK"))?;
        ensure!(
            log_entries(&a.cmd(&["ACL", "LOG"])?)?.is_empty(),
            "pod a's log after RESET"
        );
        let left = log_entries(&ops.cmd(&["ACL", "LOG"])?)?;
        ensure!(
            left.iter().any(|e| field(e, "username") == "mallory-b"),
            "pod a's RESET removed pod b's entries: {left:?}"
        );
        ops.expect(&["ACL", "LOG", "RESET"], simple("OK"))?;
        ensure!(
            log_entries(&ops.cmd(&["ACL", "LOG"])?)?.is_empty(),
            "the operator's RESET"
        );
        eprintln!("ACL answers and log: {:?}", t.elapsed());
        Ok(())
    });
}
