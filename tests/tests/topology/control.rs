//! The control client (`ControlConn`) against a real redis-server with `requirepass`: AUTH as
//! the default user and as an ACL user, the bypass mark on the socket (seen by the kernel, as
//! the data plane's connect hooks see it), the errors a wrong or missing password gives, and
//! `fetch_slot_map` refusing a node that is not a cluster node.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use datamesh_proxy::backend::Cause;
use datamesh_proxy::resp::Value;
use datamesh_proxy::topology::cluster::fetch_slot_map;
use datamesh_proxy::topology::control::{ControlConn, ControlError, ControlSpec};
use datamesh_tests::proc::run_checked;
use datamesh_tests::redis::RedisServer;
use datamesh_tests::resp::Reply;
use datamesh_tests::wait_until;

use crate::common::{service_ip, topology_test};

/// Port of the password-protected server on the instance's service IP.
const AUTH_PORT: u16 = 6500;
/// The agent's default bypass mark (`bypass_mark` in its config).
const MARK: u32 = 0x444d;

fn spec(username: Option<&str>, password: Option<&str>, mark: u32) -> ControlSpec {
    let mut s = ControlSpec::plain();
    s.conn.username = username.map(str::to_string);
    s.conn.password = password.map(str::to_string);
    s.conn.mark = mark;
    s
}

/// The `fwmark` of the established TCP socket from `local` to `peer`, as the kernel reports it
/// (`ss -e`; absent means no mark).
fn socket_mark(local: SocketAddr, peer: SocketAddr) -> Result<Option<u32>> {
    let out = run_checked(Command::new("ss").args([
        "-tnHe",
        "state",
        "established",
        "src",
        &local.to_string(),
        "dst",
        &peer.to_string(),
    ]))
    .context("ss (iproute2) is needed to read socket marks")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == 1,
        "expected one socket {local} -> {peer}, ss shows:\n{text}"
    );
    match lines[0]
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fwmark:"))
    {
        None => Ok(None),
        Some(m) => {
            let hex = m.trim_start_matches("0x");
            Ok(Some(u32::from_str_radix(hex, 16).with_context(|| {
                format!("bad fwmark {m:?} in {:?}", lines[0])
            })?))
        }
    }
}

/// The local address of the server's client connection named `datamesh` authenticated as
/// `user` (`CLIENT LIST`, from the harness's own connection).
fn control_client(server: &RedisServer, user: &str) -> Result<SocketAddr> {
    let clients = server.client_list()?;
    let mine: Vec<_> = clients
        .iter()
        .filter(|c| {
            c.get("name").map(String::as_str) == Some("datamesh")
                && c.get("user").map(String::as_str) == Some(user)
        })
        .collect();
    ensure!(
        mine.len() == 1,
        "expected one client named datamesh as user {user}: {clients:?}"
    );
    mine[0]
        .get("addr")
        .context("CLIENT LIST entry without addr")?
        .parse()
        .context("CLIENT LIST addr")
}

/// Control connections authenticate (`requirepass` as the default user, an ACL user with
/// username and password), name themselves, and carry the bypass mark from before connect; a
/// wrong password fails the connect naming the cause, so does a missing one (NOAUTH), and a
/// slot-map fetch from a non-cluster node fails clearly.
#[test]
fn control_auth_and_bypass_mark() {
    topology_test(|env, rt| {
        let addr = SocketAddr::new(service_ip(env), AUTH_PORT);
        let mut server = RedisServer::start(addr, env.outside_cgroup(), env.run_dir())?;
        let v = server.command(&[b"CONFIG", b"SET", b"requirepass", b"topsecret"])?;
        ensure!(
            v == Reply::Simple("OK".into()),
            "CONFIG SET requirepass: {v:?}"
        );
        server.set_password(Some("topsecret"));

        // The default user, by password only; then create an ACL user through it.
        let mut admin = rt
            .block_on(ControlConn::connect(
                addr,
                &spec(None, Some("topsecret"), 0),
            ))
            .context("AUTH as the default user")?;
        let v = rt.block_on(admin.command(&[
            b"ACL",
            b"SETUSER",
            b"proxy",
            b"on",
            b">proxypw",
            b"~*",
            b"&*",
            b"+@all",
        ]))?;
        ensure!(
            v == Value::Simple("OK".into()),
            "ACL SETUSER answered {v:?}"
        );
        let admin_local = control_client(&server, "default")?;
        ensure!(
            socket_mark(admin_local, addr)?.is_none(),
            "an unmarked control connection must carry no mark"
        );

        // The ACL user, with the bypass mark.
        let mut user = rt
            .block_on(ControlConn::connect(
                addr,
                &spec(Some("proxy"), Some("proxypw"), MARK),
            ))
            .context("AUTH as ACL user proxy")?;
        let v = rt.block_on(user.command(&[b"PING"]))?;
        ensure!(v == Value::Simple("PONG".into()), "PING as proxy: {v:?}");
        let v = rt.block_on(user.command(&[b"ACL", b"WHOAMI"]))?;
        ensure!(v.as_str() == Some("proxy"), "ACL WHOAMI: {v:?}");
        let local = control_client(&server, "proxy")?;
        let mark = socket_mark(local, addr)?;
        ensure!(
            mark == Some(MARK),
            "the control socket {local} -> {addr} carries mark {mark:#x?}, expected {MARK:#x}"
        );
        eprintln!(
            "topology control: ACL user proxy authenticated on {local} with fwmark {MARK:#x}"
        );

        // A wrong password fails the connect, naming the step and the likely cause.
        let err = match rt.block_on(ControlConn::connect(addr, &spec(None, Some("nope"), 0))) {
            Ok(_) => bail!("AUTH with a wrong password succeeded"),
            Err(e) => e,
        };
        ensure!(
            matches!(
                &err,
                ControlError::Connect {
                    cause: Cause::Handshake { step: "AUTH", .. },
                    ..
                }
            ),
            "wrong password: {err:?}"
        );
        let text = err.to_string();
        ensure!(
            text.contains("WRONGPASS") && text.contains("username/password"),
            "wrong password: {text}"
        );

        // No credentials: the connect fails at the handshake, saying a password is needed
        // (an optional step such as CLIENT SETNAME must not swallow NOAUTH).
        let err = match rt.block_on(ControlConn::connect(addr, &spec(None, None, 0))) {
            Ok(_) => bail!("a connect without credentials to a server with requirepass succeeded"),
            Err(e) => e,
        };
        let text = err.to_string();
        ensure!(
            text.contains("NOAUTH") && text.contains("requires a password"),
            "no password: {text}"
        );

        // Not a cluster node: the fetch fails with a clear error rather than an empty map.
        let err = match rt.block_on(fetch_slot_map(addr, &spec(None, Some("topsecret"), MARK))) {
            Ok(m) => bail!("fetch_slot_map from a non-cluster node gave {m:?}"),
            Err(e) => e,
        };
        ensure!(err.to_string().contains("cluster-enabled"), "{err}");

        // The connections are still usable (nothing above disturbed them), then close.
        for c in [&mut admin, &mut user] {
            let v = rt.block_on(c.command(&[b"PING"]))?;
            ensure!(v == Value::Simple("PONG".into()), "PING: {v:?}");
        }
        drop((admin, user));
        wait_until(
            "the control connections to be closed at the server",
            Duration::from_secs(5),
            || {
                let named = server
                    .client_list()?
                    .iter()
                    .filter(|c| c.get("name").map(String::as_str) == Some("datamesh"))
                    .count();
                Ok((named == 0).then_some(()))
            },
        )?;
        Ok(())
    });
}
