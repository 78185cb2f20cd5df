//! `cargo xtask drill tenant`: the hostile-tenant attacks of `datamesh_tests::tenant` against
//! the release agent under a 256 MiB memory limit, one table of what each did.
//!
//! `cargo xtask drill hot-key` and `cargo xtask drill key-attack`: the key drills of
//! `datamesh_tests::keydrill` (phases of `--seconds` each) with the release agent.
//!
//! `cargo xtask drill failover`: the failover drills of `datamesh_tests::drill` with the release
//! agent and longer loads, every scenario (or those named with `--scenario`) in its own test
//! instance, one after the other, printing the side-by-side table (direct redis-py vs the
//! same load through the proxy) and each drill's details.
//!
//! It is a drill, not a test: it asserts nothing about the proxy (tests/tests/failover.rs does)
//! and fails only when a drill itself cannot run. Before the first drill it asks the agent
//! (`check-config`) whether it knows the failover keys (`failover_hold_ms`, `standby`, ...);
//! an agent that does not is drilled without them, and the table says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use datamesh_tests::agent::{check_config, yaml_list, BackendSpec};
use datamesh_tests::drill::{self, DrillOptions, DrillReport, LoadOptions, Scenario};
use datamesh_tests::Env;
use datamesh_tests::{keydrill, tenant};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Drill {
    /// Failover scenarios: killed/stopped Sentinel master, restarted server, promoted standby,
    /// killed Cluster master.
    Failover,
    /// Hostile-tenant attacks (clients that never read, uploads, a slow subscriber, slowloris,
    /// a connection flood, blocked clients that break the protocol) from one pod while another
    /// works, the agent under a 256 MiB memory limit: peak RSS against the budget.
    Tenant,
    /// One pod hammers one key among two pods' ordinary traffic: time to detect, the key and
    /// pod named, backend load and p99 with the local cache off and on, the automatic key
    /// throttle applied, the bystanders' p99 in every phase.
    HotKey,
    /// One pod floods random missing keys (cache penetration): time to detect, the automatic
    /// throttle of the pod, a runtime deny rule, the bystanders' p99 in every phase.
    KeyAttack,
    /// Two simulated nodes (an agent each, one Redis): the canary opts in one namespace, the
    /// alerts are watched, the canary is widened and the stable node promoted by reload, the
    /// canary rolled back; captured and direct connects, client errors, time to take effect.
    GrayRelease,
    /// The worker leaks descriptors, memory, then dedicated backend connections under load:
    /// time to the watchdog's detection and to the graceful replacement, refused connects,
    /// client errors, the values before and after (`drill_leak`).
    ResourceLeak,
    /// The agent's own failures under load from captured pods: SIGKILL of the worker, SIGSTOP
    /// of the worker, SIGKILL of the whole agent (then started again): refused connects, client
    /// errors, time to recover, connects that went direct.
    Restart,
    /// Zero-error restart, upgrade to a build with another map layout (`abi-next`) and
    /// rollback, under pooled and short-connection clients: errors, refused connects, capture
    /// gap, counters carried over.
    Upgrade,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Which drill.
    #[arg(value_enum)]
    pub drill: Drill,
    /// Load after the fault, seconds (the load also runs at least 1 s past the topology's own
    /// switch).
    #[arg(long, default_value_t = 12)]
    pub seconds: u64,
    /// Run only this scenario (repeatable); default: all of them.
    #[arg(long = "scenario", value_name = "NAME",
          value_parser = clap::builder::PossibleValuesParser::new(Scenario::names()))]
    pub scenarios: Vec<String>,
    /// Drill this prebuilt datamesh-agent instead of building the release agent.
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// Pause after each command of every load client, ms.
    #[arg(long, default_value_t = 2.0)]
    pub pace_ms: f64,
}

pub fn run(a: &Args) -> Result<()> {
    ensure!(a.seconds > 0, "--seconds must be positive");
    match a.drill {
        Drill::Tenant => return run_tenant(a),
        Drill::Upgrade => return crate::drill_upgrade::run(a.seconds, a.agent_bin.as_deref()),
        Drill::HotKey | Drill::KeyAttack => return run_key_drill(a),
        Drill::GrayRelease => return crate::drill_gray::run(a),
        Drill::ResourceLeak => return crate::drill_leak::run(a),
        Drill::Restart => return crate::drill_restart::run(a),
        Drill::Failover => {}
    }
    let scenarios: Vec<Scenario> = if a.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        a.scenarios
            .iter()
            .map(|n| Scenario::from_name(n))
            .collect::<Result<_>>()?
    };
    let bin = match &a.agent_bin {
        // A release agent: a debug build's proxy would add its own latency to every figure.
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    let mut opts = DrillOptions {
        after: Duration::from_secs(a.seconds),
        load: LoadOptions {
            pace_ms: a.pace_ms,
            ..LoadOptions::default()
        },
        ..DrillOptions::default()
    };

    let mut reports: Vec<DrillReport> = Vec::new();
    let mut failed = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        eprintln!(
            "drill {s}: starting ({} s of load after the fault)",
            a.seconds
        );
        let result = (|| -> Result<DrillReport> {
            let mut env = Env::builder().agent(false).agent_bin(bin.clone()).build()?;
            if i == 0 {
                opts.failover_keys = knows_failover_keys(&bin, &env)?;
            }
            drill::run(&mut env, *s, &opts)
        })();
        match result {
            Ok(mut r) => {
                if !opts.failover_keys {
                    r.notes
                        .push("drilled without the failover keys (the agent rejects them)".into());
                }
                println!("{}", drill::table(std::slice::from_ref(&r)));
                println!("{}", drill::details(&r));
                reports.push(r);
            }
            Err(e) => {
                eprintln!("drill {s} failed: {e:#}");
                failed.push(s.name());
            }
        }
    }
    if reports.len() > 1 {
        println!(
            "All drills ({} s of load after each fault, pace {} ms):\n{}",
            a.seconds,
            a.pace_ms,
            drill::table(&reports)
        );
    }
    if !failed.is_empty() {
        bail!("drills that could not run: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask drill tenant`: the release agent under the DaemonSet's memory limit.
fn run_tenant(a: &Args) -> Result<()> {
    let bin = match &a.agent_bin {
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    const LIMIT: u64 = 256 * 1024 * 1024;
    let env = tenant::env_builder(LIMIT).agent_bin(bin).build()?;
    let opts = tenant::TenantOptions {
        clients: 50,
        seconds: a.seconds as f64,
    };
    let report = tenant::run(&env, LIMIT, &opts)?;
    println!("{}", tenant::table(&report));
    Ok(())
}

/// `cargo xtask drill hot-key|key-attack`: the release agent, `--seconds` per phase.
fn run_key_drill(a: &Args) -> Result<()> {
    let bin = match &a.agent_bin {
        None => crate::demo::build_agent(true)?,
        Some(bin) => crate::util::prebuilt_agent(bin)?,
    };
    let opts = keydrill::KeyDrillOptions {
        seconds: a.seconds as f64,
        ..Default::default()
    };
    let builder = Env::builder().agent_bin(bin);
    if let Drill::HotKey = a.drill {
        let mut env = keydrill::hot_key_env(builder).build()?;
        let r = keydrill::hot_key(&mut env, &opts)?;
        println!(
            "hot-key drill ({} s per phase, pod {}):\n{}",
            a.seconds,
            r.hammer_pod,
            keydrill::hot_key_table(&r)
        );
    } else {
        let mut env = keydrill::key_attack_env(builder).build()?;
        let r = keydrill::key_attack(&mut env, &opts)?;
        println!(
            "key-attack drill ({} s per phase, pod {}):\n{}",
            a.seconds,
            r.attacker_pod,
            keydrill::key_attack_table(&r)
        );
    }
    Ok(())
}

/// Whether the agent accepts the failover keys in an endpoint's backend map (`check-config`);
/// prints what it says when it does not.
fn knows_failover_keys(bin: &Path, env: &Env) -> Result<bool> {
    let standby = SocketAddr::new(env.service_ip().into(), 6501);
    let mut cfg = env.base_agent_config()?;
    cfg.endpoints[0].backend = BackendSpec::standalone(env.service_addr())
        .with("failover_hold_ms", 5000)
        .with("health_interval_ms", 500)
        .with("health_timeout_ms", 1000)
        .with("standby", yaml_list(&[standby]))
        .with("standby_after_ms", 1000);
    match check_config(bin, &cfg, env.run_dir())? {
        None => Ok(true),
        Some(msg) => {
            eprintln!(
                "drill: the agent does not accept the failover keys; drilling without them:\n{msg}"
            );
            Ok(false)
        }
    }
}
