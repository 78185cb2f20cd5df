//! Tenant isolation, the resource side (issue 8): one hostile pod cannot exhaust the node
//! proxy's memory, connections, dedicated backend connections or time, and a bystander pod in
//! the same run keeps getting correct replies. Attacks run from pods (network namespaces under
//! the capture cgroup) with raw sockets (`tests/py/tenant_attack.py`); the bystander is
//! redis-py, checking every reply. Memory cases run the agent in a memory-limited cgroup, as
//! the DaemonSet does, and check the kernel never OOM-killed it.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::proxy::{python, RespConn};
use datamesh_tests::resp::Reply;
use datamesh_tests::tenant::{self, attack, metric, with_bystander, MIB};
use datamesh_tests::{wait_until, Env};
use serde_json::Value;

fn bystander_clean(b: &Value) -> Result<()> {
    ensure!(
        b["ok"].as_u64().unwrap_or(0) > 0 && b["wrong"] == 0 && b["errors"] == 0,
        "the bystander pod was affected: {b}"
    );
    Ok(())
}

fn agent_alive(env: &Env) -> Result<()> {
    let addr = env.agent().proxy_addr("cache")?;
    let mut c = RespConn::connect(addr)?;
    let r = c.cmd(&["PING"])?;
    ensure!(format!("{r:?}").contains("PONG"), "PING answered {r:?}");
    Ok(())
}

/// Checks the agent was never OOM-killed and its peak RSS stayed under its limit; returns
/// the peak RSS.
fn memory_held(env: &Env, limit: u64) -> Result<u64> {
    let cg = env
        .memory_cgroup()
        .ok_or_else(|| anyhow!("env has no memory cgroup"))?;
    ensure!(cg.oom_kills() == 0, "the agent was OOM-killed");
    let peak = env.agent().peak_rss_kib()? * 1024;
    ensure!(
        peak < limit * 9 / 10,
        "the agent's RSS peaked at {} MiB, near its limit of {} MiB",
        peak / MIB,
        limit / MIB
    );
    Ok(peak)
}

/// One 221 MiB upload is refused at its header (the agent never buffers it); six clients
/// streaming 30 MiB bodies at once pass the 128 MiB budget of a 256 MiB agent, and the biggest
/// are shed; the agent stays under its limit and the bystander is untouched.
#[test]
fn uploads_cannot_push_the_agent_past_its_memory() {
    const LIMIT: u64 = 256 * MIB;
    run_test(
        Env::builder()
            .pods(["attacker", "bystander"])
            .memory_limit(LIMIT),
        |env| {
            // Sized from the cgroup: half of 256 MiB, and a quarter of that per bulk.
            ensure!(
                metric(env, "datamesh_proxy_memory_budget_bytes", "")? == (128 * MIB) as f64,
                "the budget was not sized from memory.max"
            );
            let one = tenant::huge_upload(env)?;
            let line = one["line"].as_str().unwrap_or("");
            ensure!(
                line.contains("invalid bulk length")
                    || line.contains("too long")
                    || line.contains("Protocol error"),
                "a 221 MiB body was not refused at its header: {one}"
            );
            let (many, b) = with_bystander(env, 6.0, || tenant::uploads(env, 6, "20"))?;
            bystander_clean(&b)?;
            ensure!(
                many["closed"].as_u64().unwrap_or(0) >= 1,
                "6 x 30 MiB in flight never reached the 128 MiB budget: {many}"
            );
            ensure!(
                metric(env, "datamesh_proxy_clients_closed_total", "memory_budget")? >= 1.0,
                "no client was shed for the budget"
            );
            let peak = memory_held(env, LIMIT)?;
            eprintln!(
                "6 uploads: peak agent RSS {} MiB of {} MiB (budget 128 MiB)",
                peak / MIB,
                LIMIT / MIB
            );
            agent_alive(env)
        },
    );
}

/// 50 clients pipelining GETs of a 1 MiB value without reading: each is closed at its output
/// hard limit or shed for the budget; the agent and Redis stay up, the bystander untouched.
/// A subscriber that never reads is closed at the pub/sub limit.
#[test]
fn clients_that_never_read_are_closed_and_memory_stays_bounded() {
    const LIMIT: u64 = 256 * MIB;
    run_test(
        Env::builder()
            .pods(["attacker", "bystander"])
            .memory_limit(LIMIT)
            .proxy_setting("client_output_buffer_limit_normal", "\"64mb 2mb 2\"")
            .proxy_setting("client_output_buffer_limit_pubsub", "\"8mb 2mb 1\""),
        |env| {
            tenant::seed_big(env)?;
            let open = |env: &Env| metric(env, "datamesh_proxy_open_connections", "");
            let (r, b) = with_bystander(env, 8.0, || {
                thread::scope(|s| {
                    let a = s.spawn(|| tenant::no_read(env, 50, "7"));
                    // While the attacker still holds its sockets, the proxy has closed them:
                    // only the bystander's connection is left.
                    thread::sleep(Duration::from_secs(2));
                    let left =
                        wait_until("non-reading clients closed", Duration::from_secs(4), || {
                            let n = open(env)?;
                            Ok((n <= 1.0).then_some(n))
                        });
                    let r = a.join().map_err(|_| anyhow!("attacker thread panicked"))?;
                    left?;
                    r
                })
            })?;
            eprintln!("{r}");
            bystander_clean(&b)?;
            let closed = metric(env, "datamesh_proxy_clients_closed_total", "")?;
            ensure!(closed >= 50.0, "clients closed by limits: {closed}");
            let peak = memory_held(env, LIMIT)?;
            eprintln!(
                "50 non-reading clients: peak agent RSS {} MiB of {} MiB (budget 128 MiB)",
                peak / MIB,
                LIMIT / MIB
            );
            // Redis itself is fine.
            let mut direct = RespConn::connect(env.service_addr())?;
            ensure!(format!("{:?}", direct.cmd(&["PING"])?).contains("PONG"));

            // Pub/sub: a subscriber that never reads, 1 MiB messages: closed at the pub/sub
            // limit (8 MiB hard here), the publisher unaffected.
            let before = metric(env, "datamesh_proxy_clients_closed_total", "")?;
            let r = tenant::slow_subscriber(env, "news", 40, "4", || {
                wait_until("the slow subscriber closed", Duration::from_secs(3), || {
                    let n = metric(env, "datamesh_proxy_clients_closed_total", "")?;
                    Ok((n > before).then_some(()))
                })
            })?;
            ensure!(
                r["subscriber"]["first"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with('*'),
                "SUBSCRIBE: {r}"
            );
            ensure!(
                r["publisher"]["errors"] == 0,
                "the publisher got errors: {r}"
            );
            memory_held(env, LIMIT)?;
            agent_alive(env)
        },
    );
}

/// 600 connections that block in BLPOP, break the protocol and close: every dedicated
/// connection is released (the backend connection closes, which cancels the BLPOP), and the
/// other pods' transactions and blocking commands still work. One pod cannot take more than
/// its max_dedicated.
#[test]
fn dedicated_connections_are_released_and_capped_per_pod() {
    run_test(
        Env::builder()
            .pods(["attacker", "bystander"])
            .extra_config("default_max_dedicated: 20\n"),
        |env| {
            let svc = env.service_addr();
            // From the node (no per-pod cap), past the pools' 512 dedicated connections.
            let proxy = env.agent().proxy_addr("cache")?;
            python(
                std::process::Command::new("python3"),
                "tenant_attack.py",
                &[
                    "blpop-close".into(),
                    "--host".into(),
                    proxy.ip().to_string(),
                    "--port".into(),
                    proxy.port().to_string(),
                    "--clients".into(),
                    "600".into(),
                ],
            )?;
            wait_until(
                "dedicated connections released",
                Duration::from_secs(10),
                || {
                    let n = metric(env, "datamesh_proxy_backend_connections", "dedicated")?;
                    Ok((n <= 4.0).then_some(()))
                },
            )?;
            // The bystander pod: a transaction and a blocking pop.
            let mut c = RespConn::connect(env.agent().proxy_addr("cache")?)?;
            c.cmd(&["LPUSH", "q", "x"])?;
            let r = c.cmd(&["BLPOP", "q", "1"])?;
            ensure!(
                matches!(&r, Reply::Array(Some(v)) if v.len() == 2 && v[1].as_bytes() == Some(&b"x"[..])),
                "BLPOP after the attack: {r:?}"
            );
            let out = datamesh_tests::proxy::redis_cli_stdin(
                env.pod("bystander").cmd("redis-cli"),
                svc,
                &[],
                b"MULTI\nINCR tx\nEXEC\n",
            )?;
            ensure!(
                out.contains("QUEUED") || out.contains('1'),
                "MULTI/EXEC: {out}"
            );

            // The cap: the attacker pod holds 20 blocked clients, the 21st is refused at once.
            let held = attack(
                env,
                "attacker",
                "hold-blocked",
                svc,
                &["--clients", "25", "--seconds", "1"],
            )?;
            ensure!(
                held["blocked"] == 20 && held["refused"] == 5,
                "max_dedicated 20 did not hold: {held}"
            );
            let msg = held["first_refusal"].as_str().unwrap_or("");
            ensure!(
                msg.contains("max_dedicated"),
                "refusal does not name the cap: {msg:?}"
            );
            Ok(())
        },
    );
}

/// A pod's client that sends a command and closes at once (fire and forget) is still its pod's
/// when the proxy accepts it after the close: the command runs, nothing is refused.
#[test]
fn fire_and_forget_clients_keep_their_identity() {
    run_test(Env::builder().pods(["attacker", "bystander"]), |env| {
        let svc = env.service_addr();
        attack(env, "bystander", "fire-forget", svc, &["--clients", "300"])?;
        let mut direct = RespConn::connect(env.service_addr())?;
        wait_until(
            "every fire-and-forget SET ran",
            Duration::from_secs(5),
            || {
                let keys: Vec<String> = (0..300).map(|i| format!("ff:{i}")).collect();
                let mut args = vec!["EXISTS"];
                args.extend(keys.iter().map(String::as_str));
                let r = direct.cmd(&args)?;
                Ok((r == Reply::Int(300)).then_some(()))
            },
        )?;
        let refused = metric(env, "datamesh_proxy_refused_connections_total", "")?;
        ensure!(
            refused == 0.0,
            "{refused} fire-and-forget connections were refused"
        );
        Ok(())
    });
}

/// Commands sent before a half-close are all answered, also when they arrived while the
/// session could not take them yet: it reads ahead (to notice a client that goes away) while
/// the transaction waits for a dedicated connection, here because another client holds the
/// only one. Found by the `session` fuzz target
/// (`fuzz/corpus/commands/multi-then-inline-garbage-then-eof`).
#[test]
fn commands_before_a_half_close_all_run() {
    run_test(
        Env::builder()
            .backend_option("max_dedicated", 1)
            .backend_option("warm_dedicated", 0),
        |env| {
            let proxy = env.agent().proxy_addr("cache")?;
            thread::scope(|s| {
                let holder = s.spawn(|| -> Result<()> {
                    let mut c = RespConn::connect(proxy)?;
                    c.cmd(&["BLPOP", "hc:never", "0.6"])?;
                    Ok(())
                });
                thread::sleep(Duration::from_millis(150));
                let mut c = RespConn::connect(proxy)?;
                c.send_raw(b"MULTI\r\n")?;
                thread::sleep(Duration::from_millis(100));
                let mut rest = Vec::new();
                for i in 0..10 {
                    rest.extend_from_slice(format!("SET hc:{i} v\r\n").as_bytes());
                }
                rest.extend_from_slice(b"EXEC\r\nGET hc:0\r\n");
                c.send_raw(&rest)?;
                c.shutdown_write()?;
                let mut got = Vec::new();
                loop {
                    match c.read_outcome(Duration::from_secs(5))? {
                        datamesh_tests::proxy::Outcome::Reply(r) => got.push(r),
                        datamesh_tests::proxy::Outcome::Closed => break,
                        datamesh_tests::proxy::Outcome::Silent => {
                            anyhow::bail!("no close after the half-close: {got:?}")
                        }
                    }
                }
                holder.join().map_err(|_| anyhow!("holder panicked"))??;
                ensure!(got.len() == 13, "{} replies of 13: {got:?}", got.len());
                // The transaction itself may fail (the one dedicated connection is taken:
                // "(safe to retry)", then EXECABORT); what matters is that every command got
                // its reply, the GET last.
                ensure!(
                    matches!(got[12], Reply::Bulk(_)),
                    "the GET's reply: {got:?}"
                );
                Ok(())
            })
        },
    );
}

/// A pod opening more connections than its max_connections gets a clear error for the
/// excess; the proxy-wide max_clients holds too; /ready keeps answering and the bystander pod
/// connects.
#[test]
fn connection_caps_per_pod_and_per_proxy() {
    run_test(
        Env::builder()
            .pods(["attacker", "bystander"])
            .extra_config("default_max_connections: 100\n")
            .proxy_setting("max_clients", 180),
        |env| {
            let svc = env.service_addr();
            let r = attack(
                env,
                "attacker",
                "hold",
                svc,
                &["--clients", "150", "--seconds", "0.5"],
            )?;
            ensure!(
                r["refused"] == 50 && r["served"] == 100,
                "pod max_connections 100: {r}"
            );
            let msg = r["first_refusal"].as_str().unwrap_or("");
            ensure!(msg.contains("max_connections"), "refusal: {msg:?}");
            ensure!(
                metric(
                    env,
                    "datamesh_proxy_refused_connections_total",
                    "pod_max_connections"
                )? >= 50.0
            );
            let (code, _) = env.agent().http_get("/ready")?;
            ensure!(code == 200, "/ready answered {code} under the attack");
            // max_clients: 100 held by the attacker + 100 from the bystander pod > 180.
            let (a, b) = thread::scope(|s| {
                let a = s.spawn(|| {
                    attack(
                        env,
                        "attacker",
                        "hold",
                        svc,
                        &["--clients", "100", "--seconds", "3"],
                    )
                });
                thread::sleep(Duration::from_millis(1500));
                let b = attack(
                    env,
                    "bystander",
                    "hold",
                    svc,
                    &["--clients", "100", "--seconds", "0.2"],
                );
                (a.join().map_err(|_| anyhow!("thread panicked")), b)
            });
            let (_a, b) = (a??, b?);
            ensure!(
                b["served"] == 80 && b["refused"] == 20,
                "max_clients 180 with 100 held elsewhere: {b}"
            );
            ensure!(
                b["first_refusal"]
                    .as_str()
                    .unwrap_or("")
                    .contains("max number of clients reached"),
                "{b}"
            );
            Ok(())
        },
    );
}

/// A command trickled one byte at a time is cut at the partial-command deadline; an idle
/// client at the idle timeout; client sockets carry TCP keepalive.
#[test]
fn slow_and_idle_clients_time_out() {
    run_test(
        Env::builder()
            .pods(["attacker", "bystander"])
            .proxy_setting("client_partial_timeout_ms", 1000)
            .proxy_setting("client_idle_timeout_s", 2)
            .proxy_setting("tcp_keepalive_s", 30),
        |env| {
            let svc = env.service_addr();
            let (r, b) = with_bystander(env, 3.0, || {
                attack(
                    env,
                    "attacker",
                    "slowloris",
                    svc,
                    &["--clients", "200", "--interval", "0.2", "--seconds", "4"],
                )
            })?;
            bystander_clean(&b)?;
            ensure!(r["closed"] == 200, "slow clients were not all cut: {r}");
            ensure!(
                r["max_closed_after_s"].as_f64().unwrap_or(99.0) < 2.5,
                "cut too late: {r}"
            );
            ensure!(
                r["line"]
                    .as_str()
                    .unwrap_or("")
                    .contains("client_partial_timeout_ms"),
                "{r}"
            );
            let start = Instant::now();
            let idle = attack(env, "attacker", "idle", svc, &["--seconds", "5"])?;
            ensure!(idle["first"] == "+PONG");
            let after = idle["closed_after_s"].as_f64().unwrap_or(99.0);
            ensure!(
                (1.5..3.5).contains(&after),
                "idle client closed after {after} s: {idle}"
            );
            ensure!(start.elapsed() < Duration::from_secs(10));
            // Keepalive on the proxy's accepted sockets.
            let proxy = env.agent().proxy_addr("cache")?;
            let mut c = RespConn::connect(proxy)?;
            c.cmd(&["PING"])?;
            let ss = std::process::Command::new("ss")
                .args([
                    "-tnoH",
                    "state",
                    "established",
                    &format!("( sport = :{} )", proxy.port()),
                ])
                .output()?;
            let ss = String::from_utf8_lossy(&ss.stdout);
            ensure!(
                ss.contains("keepalive"),
                "no keepalive timer on the proxy's sockets: {ss}"
            );
            Ok(())
        },
    );
}

/// `cargo xtask drill tenant` with a short load: every attack from one pod while another
/// works, the agent under 256 MiB; it stays up, under its limit, and the bystander sees no
/// error and no wrong reply.
#[test]
fn tenant_drill_short() {
    const LIMIT: u64 = 256 * MIB;
    run_test(tenant::env_builder(LIMIT), |env| {
        let r = tenant::run(
            env,
            LIMIT,
            &tenant::TenantOptions {
                clients: 20,
                seconds: 3.0,
            },
        )?;
        eprintln!("{}", tenant::table(&r));
        ensure!(r.oom_kills == 0, "the agent was OOM-killed");
        for p in &r.phases {
            ensure!(p.alive, "the agent was not ready after {}", p.name);
            ensure!(
                p.peak_rss < LIMIT * 9 / 10,
                "{}: RSS peaked at {} MiB",
                p.name,
                p.peak_rss / MIB
            );
            bystander_clean(&p.bystander).with_context(|| p.name)?;
        }
        let by = |n: &str| {
            r.phases
                .iter()
                .find(|p| p.name == n)
                .map(|p| (p.closed, p.refused))
        };
        ensure!(
            by("no-read").is_some_and(|(c, _)| c >= 20),
            "no-read: {:?}",
            by("no-read")
        );
        ensure!(
            by("slowloris").is_some_and(|(c, _)| c >= 200),
            "slowloris: {:?}",
            by("slowloris")
        );
        ensure!(
            by("conn-flood").is_some_and(|(_, r)| r >= 476),
            "conn-flood: {:?}",
            by("conn-flood")
        );
        Ok(())
    });
}
