//! The one connection handshake, for pooled data connections and for control connections
//! alike: AUTH (or HELLO 3 with AUTH), CLIENT SETNAME, SELECT, READONLY, written in one batch
//! and answered in order, within the connect timeout. A refused step names the likely operator
//! cause.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Cause, ConnectSpec};
use crate::resp::{Command, Limits, Reply, ReplyDecoder, Value};

/// One request of the handshake.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: &'static str,
    pub cmd: Command,
    /// An error reply to it does not fail the connection (CLIENT SETNAME on a server whose ACL
    /// forbids it, HELLO on an old server).
    pub optional: bool,
}

/// What a successful handshake learned.
#[derive(Debug, Default)]
pub struct Learned {
    /// The server version, when asked for.
    pub version: Option<String>,
    /// Bytes read past the last handshake reply (none in practice: nothing else was sent).
    pub leftover: BytesMut,
}

fn auth_args(spec: &ConnectSpec, with_default_user: bool) -> Vec<Bytes> {
    let Some(p) = &spec.password else {
        return Vec::new();
    };
    let mut args = Vec::with_capacity(3);
    match &spec.username {
        Some(u) => args.push(Bytes::from(u.clone())),
        None if with_default_user => args.push(Bytes::from_static(b"default")),
        None => {}
    }
    args.push(Bytes::from(p.clone()));
    args
}

/// The steps of a data connection to a node: protocol and credentials, name, database,
/// READONLY for replica reads, and HELLO to learn the server version when `learn_version`.
pub fn data_steps(spec: &ConnectSpec, db: u32, proto: u8, learn_version: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    if proto >= 3 {
        let mut args = vec![Bytes::from_static(b"HELLO"), Bytes::from_static(b"3")];
        let auth = auth_args(spec, true);
        if !auth.is_empty() {
            args.push(Bytes::from_static(b"AUTH"));
            args.extend(auth);
        }
        args.push(Bytes::from_static(b"SETNAME"));
        args.push(Bytes::from(spec.client_name.clone()));
        steps.push(Step {
            name: "HELLO 3",
            cmd: Command::from_args(args),
            optional: false,
        });
    } else {
        steps.extend(auth_step(spec));
        steps.push(setname_step(&spec.client_name));
    }
    if db != 0 {
        steps.push(Step {
            name: "SELECT",
            cmd: Command::from_args([Bytes::from_static(b"SELECT"), Bytes::from(db.to_string())]),
            optional: false,
        });
    }
    if spec.readonly {
        steps.push(Step {
            name: "READONLY",
            cmd: Command::from_args([Bytes::from_static(b"READONLY")]),
            optional: false,
        });
    }
    if learn_version && proto < 3 {
        // HELLO without a version answers the server info in the current protocol.
        steps.push(Step {
            name: "HELLO",
            cmd: Command::from_args([Bytes::from_static(b"HELLO")]),
            optional: true,
        });
    }
    steps
}

/// The steps of a control connection (Sentinel, slot-map fetches): credentials and a name.
pub fn control_steps(spec: &ConnectSpec) -> Vec<Step> {
    let mut steps: Vec<Step> = auth_step(spec).into_iter().collect();
    steps.push(setname_step(&spec.client_name));
    steps
}

fn auth_step(spec: &ConnectSpec) -> Option<Step> {
    let auth = auth_args(spec, false);
    if auth.is_empty() {
        return None;
    }
    let mut args = vec![Bytes::from_static(b"AUTH")];
    args.extend(auth);
    Some(Step {
        name: "AUTH",
        cmd: Command::from_args(args),
        optional: false,
    })
}

fn setname_step(name: &str) -> Step {
    Step {
        name: "CLIENT SETNAME",
        cmd: Command::from_args([
            Bytes::from_static(b"CLIENT"),
            Bytes::from_static(b"SETNAME"),
            Bytes::from(name.to_string()),
        ]),
        optional: true,
    }
}

/// Runs `steps` on `stream`: one write, then one reply per step, within `deadline`.
pub async fn run(
    stream: &mut TcpStream,
    steps: &[Step],
    deadline: Duration,
) -> Result<Learned, Cause> {
    if steps.is_empty() {
        return Ok(Learned::default());
    }
    let exchange = async {
        let mut out = BytesMut::new();
        for s in steps {
            out.extend_from_slice(&s.cmd.raw);
        }
        stream
            .write_all(&out)
            .await
            .map_err(|e| Cause::Write(e.to_string()))?;
        let mut rbuf = BytesMut::with_capacity(1024);
        let mut dec = ReplyDecoder::default();
        let limits = Limits::control();
        let mut learned = Learned::default();
        for step in steps {
            let reply = loop {
                match dec.decode(&mut rbuf, &limits) {
                    Ok(Some(r)) => break r,
                    Ok(None) => {}
                    Err(e) => return Err(Cause::Protocol(e)),
                }
                match stream.read_buf(&mut rbuf).await {
                    Ok(0) => return Err(Cause::Eof),
                    Ok(_) => {}
                    Err(e) => return Err(Cause::Read(e.to_string())),
                }
            };
            if step.name.starts_with("HELLO") {
                if let Some(v) = hello_version(&reply) {
                    learned.version = Some(v);
                }
            }
            // An optional step may be refused (an ACL without CLIENT, an old server without
            // HELLO), but NOAUTH means credentials are missing: that is never optional.
            let missing_auth = reply.error_text().starts_with(b"NOAUTH");
            if reply.is_error() && (!step.optional || missing_auth) {
                let error = String::from_utf8_lossy(reply.error_text()).into_owned();
                return Err(Cause::Handshake {
                    step: step.name,
                    hint: hint(step.name, &error),
                    error,
                });
            }
        }
        learned.leftover = rbuf;
        Ok(learned)
    };
    match tokio::time::timeout(deadline, exchange).await {
        Ok(r) => r,
        Err(_) => Err(Cause::HandshakeTimeout(deadline.as_millis() as u64)),
    }
}

/// The likely operator cause of a refused handshake step.
fn hint(step: &str, error: &str) -> &'static str {
    if error.starts_with("NOAUTH") {
        ": the server requires a password: set the endpoint's backend username/password (sentinel_username/sentinel_password for sentinels)"
    } else if error.starts_with("WRONGPASS") || error.contains("AUTH") {
        ": are the endpoint's backend username/password right?"
    } else if error.starts_with("NOPROTO") || error.contains("unknown command") {
        ": the backend does not speak RESP3 (Redis >= 6 needed for HELLO 3)"
    } else if step == "SELECT" {
        ": is the database index below the backend's `databases`?"
    } else {
        ""
    }
}

/// The version in a HELLO reply (`server`/`version` map, RESP2 flat array or RESP3 map).
fn hello_version(reply: &Reply) -> Option<String> {
    Value::parse(&reply.raw)?
        .field("version")?
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(steps: &[Step]) -> Vec<&'static str> {
        steps.iter().map(|s| s.name).collect()
    }

    #[test]
    fn steps_per_protocol_and_credentials() {
        let mut spec = ConnectSpec::plain(Duration::from_secs(1));
        assert_eq!(
            names(&data_steps(&spec, 0, 2, true)),
            ["CLIENT SETNAME", "HELLO"]
        );
        spec.password = Some("pw".into());
        spec.readonly = true;
        let steps = data_steps(&spec, 3, 2, false);
        assert_eq!(
            names(&steps),
            ["AUTH", "CLIENT SETNAME", "SELECT", "READONLY"]
        );
        assert_eq!(&steps[0].cmd.args[1][..], b"pw");
        spec.username = Some("app".into());
        let steps = data_steps(&spec, 0, 3, true);
        assert_eq!(names(&steps), ["HELLO 3", "READONLY"]);
        let args: Vec<&[u8]> = steps[0].cmd.args.iter().map(|a| &a[..]).collect();
        assert_eq!(
            args,
            [
                &b"HELLO"[..],
                b"3",
                b"AUTH",
                b"app",
                b"pw",
                b"SETNAME",
                b"datamesh"
            ]
        );
        assert_eq!(names(&control_steps(&spec)), ["AUTH", "CLIENT SETNAME"]);
    }

    #[test]
    fn a_missing_password_is_named() {
        assert!(hint("CLIENT SETNAME", "NOAUTH Authentication required.")
            .contains("requires a password"));
        assert!(hint("AUTH", "WRONGPASS invalid").contains("username/password right"));
        assert_eq!(
            hint("SELECT", "ERR DB index is out of range"),
            ": is the database index below the backend's `databases`?"
        );
    }

    #[test]
    fn version_from_hello_in_both_protocols() {
        let r2 = Reply {
            raw: Bytes::from_static(
                b"*4\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n",
            ),
            kind: crate::resp::ReplyKind::Array,
        };
        assert_eq!(hello_version(&r2).as_deref(), Some("7.0.15"));
        let r3 = Reply {
            raw: Bytes::from_static(b"%1\r\n$7\r\nversion\r\n$5\r\n7.2.4\r\n"),
            kind: crate::resp::ReplyKind::Map,
        };
        assert_eq!(hello_version(&r3).as_deref(), Some("7.2.4"));
    }
}
