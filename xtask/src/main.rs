//! `cargo xtask`: the project's build, set-up, demo, test, benchmark and drill commands.
//!
//! One module per subcommand. Every command that needs the machine prepared (apt packages,
//! bpf-linker, redis-server) calls [`setup::ensure`] first, so the README's two commands work on
//! a fresh machine.

mod bench;
mod bench_cache;
mod bench_proxy;
mod build_ebpf;
mod demo;
mod drill;
mod drill_gray;
mod drill_leak;
mod drill_restart;
mod drill_upgrade;
mod fuzz;
mod gen_acl_table;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "DataMesh build, demo, test, benchmark and drill commands"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the project needs (apt packages, bpf-linker, cargo-fuzz, redis, Python test clients).
    Setup,
    /// Build the eBPF object (with BTF) for bpfel-unknown-none.
    BuildEbpf(build_ebpf::Args),
    /// Build the upgrade drill's second agent (feature `abi-next`: another map layout) and
    /// print its path (`target/<profile>/datamesh-agent-next`).
    BuildNext {
        /// A release build (what `cargo xtask drill upgrade` uses).
        #[arg(long)]
        release: bool,
    },
    /// Start redis-server, one demo pod and the agent; send traffic; print the per-pod table.
    Demo(demo::Args),
    /// Build everything and run every test (unit, integration, privileged eBPF, manifests).
    Test(test::Args),
    /// Benchmarks (not tests): they run the peers in the same run and print ratios.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Drills (not tests): faults under load, direct vs through the proxy, side by side.
    Drill(drill::Args),
    /// Regenerate the proxy's ACL category table from a real redis-server's COMMAND reply.
    GenAclTable,
    /// Run the RESP codec's libFuzzer targets (fuzz/) for a bounded time each.
    Fuzz(fuzz::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::BuildEbpf(args) => build_ebpf::run(&args),
        Cmd::BuildNext { release } => {
            let p = demo::build_next_agent(release)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Test(args) => test::run(&args),
        Cmd::Bench(b) => bench::run(&b),
        Cmd::Drill(args) => drill::run(&args),
        Cmd::GenAclTable => gen_acl_table::run(),
        Cmd::Fuzz(args) => fuzz::run(&args),
    }
}
