//! Client compatibility: every client program of `tests/clients/` (phpredis, redis-py,
//! redis-cli, ioredis, node-redis, redigo, hiredis: the contract is `tests/clients/README.md`)
//! against a standalone, a Sentinel and a Cluster endpoint through the proxy, each from its own
//! pod through the captured endpoint address with a configured proxy user, and once straight at
//! a plain redis-server. Every observed status is compared with `docs/compatibility.md`; a test
//! fails listing every mismatch at once, with the program's output tail.
//!
//! The direct run proves the programs check Redis's behaviour: there every feature must
//! `work` (or be `na`), except `cluster_client`, which a plain server refuses.
//!
//! The clients of one topology run concurrently (each in its own pod, so per-pod answers such
//! as CLIENT LIST and the failed-AUTH throttle do not mix). Measured on the 2-core VM: the seven
//! programs of one topology take 5-7 s together (redis-cli and redis-py the longest), the
//! whole binary about 20 s with 2 test threads.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use datamesh_tests::agent::{BackendSpec, Endpoint};
use datamesh_tests::clients::{compare, ClientProgram, Run, RunSpec, Table};
use datamesh_tests::cluster::RedisCluster;
use datamesh_tests::env::{run_test, ENDPOINT_NAME};
use datamesh_tests::proxy::simple;
use datamesh_tests::sentinel::{SentinelGroup, MASTER_NAME};
use datamesh_tests::Env;

/// The proxy user every client authenticates as (a tenant: `proxy.default_acl`).
const USER: &str = "compat";
const PASSWORD: &str = "compat-secret";

/// Ports on the instance's service IP (test-owned).
const SENTINEL_DATA_PORT: u16 = 6400;
const SENTINEL_PORT: u16 = 26400;
const CLUSTER_PORT: u16 = 7000;
/// The cluster endpoint's address (nothing listens there: only capture makes it work).
const CLUSTER_SERVICE_PORT: u16 = 6390;

fn programs() -> Vec<ClientProgram> {
    match ClientProgram::discover() {
        Ok(v) if !v.is_empty() => v,
        Ok(_) => panic!("no client programs under tests/clients/"),
        Err(e) => panic!("finding the client programs: {e:#}"),
    }
}

/// One pod per client, named after it.
fn builder(programs: &[ClientProgram]) -> datamesh_tests::EnvBuilder {
    Env::builder()
        .pods(programs.iter().map(|p| p.name.clone()))
        .user(USER, PASSWORD)
}

fn spec(addr: SocketAddr, topology: &str, mode: &str, client: &str) -> RunSpec {
    RunSpec {
        addr,
        user: USER.into(),
        password: PASSWORD.into(),
        topology: topology.into(),
        mode: mode.into(),
        prefix: format!("dm-{client}-{topology}-{mode}-{}:", std::process::id()),
        features: None,
    }
}

/// Builds every program (once per process), then runs them all at once, each from its pod
/// (`in_pods`) or on the node.
fn run_all(
    env: &Env,
    programs: &[ClientProgram],
    addr: SocketAddr,
    topology: &str,
    in_pods: bool,
) -> Result<Vec<Run>> {
    for p in programs {
        // A build failure is reported by the run itself, with the others' results.
        let _ = p.ensure_built();
    }
    let mode = if in_pods { "proxy" } else { "direct" };
    let t0 = Instant::now();
    let runs: Vec<Result<Run>> = std::thread::scope(|s| {
        let handles: Vec<_> = programs
            .iter()
            .map(|p| {
                let cmd = if in_pods {
                    env.pod(&p.name).cmd(p.run_path())
                } else {
                    Command::new(p.run_path())
                };
                let spec = spec(addr, topology, mode, &p.name);
                s.spawn(move || p.run(cmd, &spec))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a client runner thread panicked"))
            })
            .collect()
    });
    let runs = runs.into_iter().collect::<Result<Vec<Run>>>()?;
    let times: Vec<String> = runs
        .iter()
        .map(|r| format!("{} {:.1}s", r.client, r.elapsed.as_secs_f64()))
        .collect();
    eprintln!(
        "compat {topology} ({mode}): {} clients in {:.1} s ({})",
        runs.len(),
        t0.elapsed().as_secs_f64(),
        times.join(", ")
    );
    Ok(runs)
}

/// Fails with every mismatch between the runs and the table, and the output tails of the
/// clients concerned.
fn report(topology: &str, programs: &[ClientProgram], runs: &[Run], table: &Table) -> Result<()> {
    let mut problems = table.section_problems(programs);
    problems.extend(compare(table, topology, runs));
    for r in runs {
        for (f, o) in &r.results {
            eprintln!("  {} {f} {topology}: {} {}", r.client, o.status, o.detail);
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "{} mismatch(es) between docs/compatibility.md and what the clients saw ({topology}):\n  {}\n",
        problems.len(),
        problems.join("\n  ")
    );
    for r in runs {
        if problems
            .iter()
            .any(|p| p.starts_with(&format!("{} ", r.client)))
        {
            msg.push_str(&r.tails());
            msg.push('\n');
        }
    }
    bail!("{msg}")
}

fn check_topology(
    env: &Env,
    programs: &[ClientProgram],
    addr: SocketAddr,
    topology: &str,
) -> Result<()> {
    let table = Table::load()?;
    let runs = run_all(env, programs, addr, topology, true)?;
    report(topology, programs, &runs, &table)
}

#[test]
fn table_matches_the_client_directories() {
    let table = match Table::load() {
        Ok(t) => t,
        Err(e) => panic!("{e:#}"),
    };
    let problems = table.section_problems(&programs());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn standalone() {
    let programs = programs();
    run_test(builder(&programs), |env| {
        check_topology(env, &programs, env.service_addr(), "standalone")
    });
}

#[test]
fn sentinel() {
    let programs = programs();
    run_test(builder(&programs).agent(false), |env| {
        let group = SentinelGroup::start(
            IpAddr::V4(env.service_ip()),
            SENTINEL_DATA_PORT,
            SENTINEL_PORT,
            env.outside_cgroup(),
            env.run_dir(),
        )?;
        let mut cfg = env.base_agent_config()?;
        cfg.endpoints[0].backend = BackendSpec::sentinel(&group.sentinel_addrs(), MASTER_NAME);
        env.start_agent(cfg)?;
        check_topology(env, &programs, env.service_addr(), "sentinel")
    });
}

#[test]
fn cluster() {
    let programs = programs();
    run_test(builder(&programs).agent(false), |env| {
        let ip = IpAddr::V4(env.service_ip());
        let cluster =
            RedisCluster::start(ip, CLUSTER_PORT, 3, env.outside_cgroup(), env.run_dir())?;
        let addr = SocketAddr::new(ip, CLUSTER_SERVICE_PORT);
        let mut cfg = env.base_agent_config()?;
        cfg.endpoints = vec![Endpoint::new(
            ENDPOINT_NAME,
            addr,
            BackendSpec::cluster(&cluster.addrs()),
        )];
        env.start_agent(cfg)?;
        check_topology(env, &programs, addr, "cluster")
    });
}

/// Straight at a plain redis-server 7.0.15 with the ACL user: the programs' expectations are
/// Redis's own behaviour.
#[test]
fn direct() {
    let programs = programs();
    run_test(Env::builder().agent(false), |env| {
        let r = env.redis().command(&[
            b"ACL",
            b"SETUSER",
            USER.as_bytes(),
            b"on",
            format!(">{PASSWORD}").as_bytes(),
            b"~*",
            b"&*",
            b"+@all",
        ])?;
        ensure!(r == simple("OK"), "ACL SETUSER answered {r:?}");
        let table = Table::load()?;
        let runs = run_all(env, &programs, env.service_addr(), "standalone", false)
            .context("running the clients straight at redis-server")?;
        let mut problems = Vec::new();
        for run in &runs {
            if run.crashed {
                problems.push(format!("{}: the program {}", run.client, run.outcome));
            }
            for p in &run.problems {
                problems.push(format!("{}: {p}", run.client));
            }
            let rows = table.clients.get(&run.client).cloned().unwrap_or_default();
            for row in &rows {
                let ok: &[&str] = if row.feature == "cluster_client" {
                    &["refused", "na"]
                } else {
                    &["works", "na"]
                };
                match run.results.get(&row.feature) {
                    Some(o) if ok.contains(&o.status.as_str()) => {}
                    _ => problems.push(format!(
                        "{} {} direct: want {}, observed `{}`",
                        run.client,
                        row.feature,
                        ok.join(" or "),
                        run.line(&row.feature)
                    )),
                }
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "against a plain redis-server, these are not Redis's behaviour:\n  {}\n",
            problems.join("\n  ")
        );
        for r in &runs {
            if problems.iter().any(|p| p.starts_with(&r.client)) {
                msg.push_str(&r.tails());
                msg.push('\n');
            }
        }
        bail!("{msg}")
    });
}
