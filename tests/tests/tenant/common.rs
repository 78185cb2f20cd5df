//! Helpers of the tenant tests: users with ACL rules in the agent config, authenticated
//! connections, error checks, metrics.

use std::net::SocketAddr;

use anyhow::{bail, ensure, Context, Result};
use datamesh_tests::agent::yaml_str;
use datamesh_tests::env::ENDPOINT_NAME;
use datamesh_tests::proxy::{simple, RespConn};
use datamesh_tests::resp::Reply;
use datamesh_tests::Env;

/// The proxy listener of the `cache` endpoint (node-local clients dial it).
pub fn proxy_addr(env: &Env) -> Result<SocketAddr> {
    env.agent().proxy_addr(ENDPOINT_NAME)
}

/// A `users:` section: (name, password, acl).
pub fn users_yaml(users: &[(&str, &str, Option<&str>)]) -> String {
    let mut y = String::from("users:\n");
    for (name, pw, acl) in users {
        y.push_str(&format!(
            "  - name: {}\n    password: {}\n",
            yaml_str(name),
            yaml_str(pw)
        ));
        if let Some(a) = acl {
            y.push_str(&format!("    acl: {}\n", yaml_str(a)));
        }
    }
    y
}

/// A connection authenticated as `user`.
pub fn login(addr: SocketAddr, user: &str, password: &str) -> Result<RespConn> {
    let mut c = RespConn::connect(addr)?;
    c.expect(&["AUTH", user, password], simple("OK"))
        .with_context(|| format!("AUTH as {user}"))?;
    Ok(c)
}

/// Sends `args` and checks the reply is an error starting with `prefix` and containing every
/// one of `needles`; returns the error text.
pub fn expect_error(
    c: &mut RespConn,
    args: &[&str],
    prefix: &str,
    needles: &[&str],
) -> Result<String> {
    match c.cmd(args)? {
        Reply::Error(e) => {
            ensure!(
                e.starts_with(prefix),
                "{args:?}: error {e:?} does not start with {prefix:?}"
            );
            for n in needles {
                ensure!(
                    e.contains(n),
                    "{args:?}: error {e:?} does not contain {n:?}"
                );
            }
            Ok(e)
        }
        other => bail!("{args:?} answered {other:?}, expected -{prefix} ..."),
    }
}

/// The agent's `/metrics` text.
pub fn metrics(env: &Env) -> Result<String> {
    let (status, body) = env.agent().http_get("/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(body)
}

/// The value of the first sample of `metric` whose labels contain every one of `labels`.
pub fn metric_value(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A client doing SET/GET round trips on its own connection in a thread until stopped: the
/// "other tenants are unaffected" witness. Any error ends it and is returned by `finish`.
pub struct Bystander {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Bystander {
    /// `conn` is ready to use (authenticated if needed).
    pub fn start(mut conn: RespConn, name: &str) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (stop2, ok2, key) = (stop.clone(), ok.clone(), format!("bystander:{name}"));
        let handle = std::thread::spawn(move || -> Result<()> {
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let val = format!("v{i}");
                conn.expect(&["SET", &key, &val], simple("OK"))
                    .with_context(|| format!("bystander {key} round {i}"))?;
                conn.expect(&["GET", &key], datamesh_tests::proxy::bulk(&val))
                    .with_context(|| format!("bystander {key} round {i}"))?;
                ok2.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Ok(())
        });
        Self {
            stop,
            ok,
            handle: Some(handle),
        }
    }

    /// Waits for a few more round trips (it is not stuck), stops it; its round trips, or the
    /// error it hit.
    pub fn finish(mut self) -> Result<u64> {
        use std::sync::atomic::Ordering;
        let target = self.ok.load(Ordering::Relaxed) + 3;
        datamesh_tests::wait_until(
            "the bystander to make progress",
            std::time::Duration::from_secs(10),
            || {
                if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                    return Ok(Some(()));
                }
                Ok((self.ok.load(Ordering::Relaxed) >= target).then_some(()))
            },
        )?;
        self.stop.store(true, Ordering::Relaxed);
        let h = self
            .handle
            .take()
            .ok_or_else(|| anyhow::anyhow!("already finished"))?;
        h.join()
            .map_err(|_| anyhow::anyhow!("the bystander thread panicked"))??;
        let n = self.ok.load(Ordering::Relaxed);
        ensure!(n > 0, "the bystander made no round trip");
        Ok(n)
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
