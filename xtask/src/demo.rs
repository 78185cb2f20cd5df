//! `cargo xtask demo`: DataMesh end to end on this machine, in about a minute.
//!
//! Builds the eBPF object and the agent, then with the test harness creates one instance: a
//! cgroup the agent attaches to, a bridge, one pod (netns + veth + its own cgroup), a real
//! redis-server at the service address and the agent. It sends traffic from the pod to the
//! service address with redis-cli and redis-benchmark (captured into the proxy), prints the
//! per-pod table and the bpftool commands to inspect the maps, and keeps everything up until
//! Ctrl-C (or exits at once with `--once`). Everything it made is removed on the way out.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use datamesh_tests::proc::{last_chars, run_ok};
use datamesh_tests::Env;

use crate::util::project_root;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Print everything and exit (clean up) instead of waiting for Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// Start with the sockmap fast path on.
    #[arg(long)]
    pub fastpath: bool,
}

/// Prepares the machine, builds the eBPF object and the agent (release when asked), checks
/// privileges; returns the agent binary.
/// `cargo build -p datamesh-agent --bin datamesh-agent [--release]`.
fn agent_build(release: bool) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root()).args([
        "build",
        "-p",
        "datamesh-agent",
        "--bin",
        "datamesh-agent",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd
}

pub fn build_agent(release: bool) -> Result<PathBuf> {
    crate::setup::ensure()?;
    crate::build_ebpf::run(&crate::build_ebpf::Args::default())?;
    let st = agent_build(release)
        .status()
        .context("cannot start cargo build")?;
    if !st.success() {
        bail!("building datamesh-agent failed ({st})");
    }
    datamesh_tests::check_privileges().context("this needs root with CAP_BPF and cgroup2")?;
    Ok(datamesh_tests::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("datamesh-agent"))
}

/// Builds the upgrade drill's second agent (cargo feature `abi-next`: another ABI version and
/// map layout, its own eBPF object) and returns `target/<profile>/datamesh-agent-next`. The
/// normal agent is built again afterwards, so `target/<profile>/datamesh-agent` stays the
/// first build (both are cached by cargo under their feature sets).
pub fn build_next_agent(release: bool) -> Result<PathBuf> {
    crate::setup::ensure()?;
    let object = project_root().join("target/ebpf/datamesh-next.bpf.o");
    crate::build_ebpf::build(&crate::build_ebpf::Args {
        out: Some(object.clone()),
        features: vec!["abi-next".into()],
        ..crate::build_ebpf::Args::default()
    })?;
    let profile = if release { "release" } else { "debug" };
    let dir = datamesh_tests::target_dir().join(profile);
    let st = agent_build(release)
        .args(["--features", "abi-next"])
        .env("DATAMESH_EBPF_OBJ", &object)
        .status()
        .context("cannot start cargo build")?;
    if !st.success() {
        bail!("building the abi-next datamesh-agent failed ({st})");
    }
    let next = dir.join("datamesh-agent-next");
    let tmp = dir.join("datamesh-agent-next.tmp");
    std::fs::copy(dir.join("datamesh-agent"), &tmp).context("copying the abi-next agent")?;
    std::fs::rename(&tmp, &next).context("renaming the abi-next agent")?;
    // The first build back in place (fresh in cargo's cache: only copied; its eBPF object at
    // the default path was not touched).
    let st = agent_build(release)
        .status()
        .context("cannot start cargo build")?;
    if !st.success() {
        bail!("building datamesh-agent failed ({st})");
    }
    if std::fs::read(dir.join("datamesh-agent"))? == std::fs::read(&next)? {
        bail!("the abi-next agent is the same file as the normal one: cargo did not rebuild it");
    }
    Ok(next)
}

pub fn run(args: &Args) -> Result<()> {
    let bin = build_agent(false)?;
    // Ctrl-C / SIGTERM only set a flag: the harness then tears down in order.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))
        .context("installing the SIGINT handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))
        .context("installing the SIGTERM handler")?;

    let env = Env::builder()
        .pods(["demo"])
        .fastpath(args.fastpath)
        .agent_bin(bin)
        .build()?;
    let result = show(&env);
    if result.is_ok() && !args.once {
        let pod = env.pod("demo");
        println!("\nRunning. Try it yourself (joins the pod's cgroup and netns, so the connect is captured):");
        println!(
            "  sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} redis-cli -h {} INFO server'",
            pod.cgroup().display(),
            pod.netns_name(),
            env.service_ip()
        );
        println!("Press Ctrl-C to stop and clean up.");
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("\nStopping.");
    }
    drop(env);
    println!(
        "demo: cleaned up (agent stopped and uninstalled, pod, bridge, cgroups and redis removed)"
    );
    result
}

fn show(env: &Env) -> Result<()> {
    let pod = env.pod("demo");
    let agent = env.agent();
    let ready = agent.ready()?;
    let svc = env.service_addr();
    let proxy = agent.proxy_addr(datamesh_tests::env::ENDPOINT_NAME)?;
    println!("\nDataMesh demo (instance {})", env.n());
    println!(
        "  pod          {} at {} (cgroup {})",
        pod.netns_name(),
        pod.ip(),
        pod.cgroup().display()
    );
    println!("  service      {svc} (a real redis-server)");
    println!(
        "  agent        pid {}, data plane {}, proxy {proxy}, admin http://{}",
        ready.pid, ready.dataplane, ready.admin
    );
    println!("  attached to  {}", env.cgroup()?.path().display());
    println!("  pins         {}", env.pin_dir().display());

    let ip = svc.ip().to_string();
    let port = svc.port().to_string();
    println!("\n$ redis-cli -h {ip} SET / GET   (inside the pod)");
    for cmd in [
        vec!["SET", "demo:greeting", "hello from the pod"],
        vec!["GET", "demo:greeting"],
    ] {
        let out = run_ok(
            pod.cmd("redis-cli")
                .args(["-h", &ip, "-p", &port])
                .args(&cmd),
            Duration::from_secs(20),
        )?;
        println!(
            "{} -> {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }

    println!("\n$ redis-benchmark -h {ip} -n 2000 -q -t ping,set,get   (inside the pod)");
    let out = run_ok(
        pod.cmd("redis-benchmark").args([
            "-h",
            &ip,
            "-p",
            &port,
            "-n",
            "2000",
            "-q",
            "-t",
            "ping,set,get",
        ]),
        Duration::from_secs(120),
    )?;
    // redis-benchmark -q redraws a progress line with \r; keep the final lines only.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.rsplit('\r').next().unwrap_or(line).trim();
        if !line.is_empty() {
            println!("  {line}");
        }
    }

    let conns = agent.connections()?;
    println!("\nThe proxy saw {} connections; the last one:", conns.len());
    if let Some(c) = conns.last() {
        println!("  {c}");
    }

    // The proxy flushes its per-pod command counts to the map every 200 ms: wait for the
    // last flush, or the table would show the connects but not the commands.
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "\n$ datamesh-agent pods --pin-dir {}",
        env.pin_dir().display()
    );
    let out = run_ok(
        agent.cli().args(["pods", "--pin-dir"]).arg(env.pin_dir()),
        Duration::from_secs(20),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.stderr.is_empty() {
        eprintln!("{}", last_chars(&out.stderr, 2000));
    }

    println!("\nInspect the pinned maps (field names come from BTF):");
    for map in [
        "dm_pod_counters",
        "dm_pod_state",
        "dm_settings",
        "dm_endpoints",
        "dm_conns",
    ] {
        println!(
            "  bpftool map dump pinned {}/{map}",
            env.pin_dir().display()
        );
    }
    println!(
        "  bpftool link show pinned {}/links/dm_connect4",
        env.pin_dir().display()
    );
    println!(
        "  curl -s http://{}/connections ; curl -s http://{}/metrics",
        ready.admin, ready.admin
    );
    Ok(())
}
