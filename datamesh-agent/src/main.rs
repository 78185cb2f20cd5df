//! `datamesh-agent`: the DataMesh node agent's command line. Parses arguments, sets up tracing
//! (stderr, RUST_LOG) and hands over to the subsystem for each subcommand.

mod admin;
mod app;
mod attacks_cli;
mod bigkeys_cli;
mod carryover;
mod config;
mod conns;
mod dataplane;
mod handover;
mod hotkeys_cli;
mod identity;
mod keyrules_cli;
mod kubelet;
mod pod_counters;
mod pods;
mod preflight;
mod resources;
mod supervisor;
mod watchdog;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "datamesh-agent",
    version,
    about = "DataMesh node agent: eBPF capture of pods' Redis connects into a node-local proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load or adopt the data plane, run the proxy and the admin endpoint until SIGTERM/SIGINT.
    /// A supervisor keeps the listeners and the heartbeat and runs the proxy in a worker child
    /// it restarts.
    Run {
        /// Config file (.yaml, .yml or .toml).
        #[arg(long)]
        config: PathBuf,
        /// Written atomically (JSON) once the agent is ready.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Use this eBPF object instead of the embedded one.
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
    },
    /// The proxy worker `run` starts (internal: inherits its listeners from the supervisor).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
        /// `endpoint=fd,...`: the inherited endpoint listeners.
        #[arg(long, default_value = "")]
        listen_fds: String,
        #[arg(long)]
        admin_fd: i32,
        #[arg(long)]
        health_fd: i32,
        #[arg(long)]
        supervisor_pid: u32,
        #[arg(long, default_value_t = 0)]
        generation: u64,
        /// A graceful successor of a worker that still serves.
        #[arg(long)]
        graceful: bool,
    },
    /// Replace the proxy worker of the running agent gracefully (SIGUSR2 to its supervisor,
    /// whose pid is in the ready file): a new worker starts, then the old one drains and exits.
    RestartWorker {
        /// The agent's ready file (`run --ready-file`).
        #[arg(long)]
        ready_file: PathBuf,
    },
    /// Per-pod counters and state from the pinned maps (works with the agent stopped).
    Pods {
        #[arg(long, default_value = datamesh_common::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The hottest keys per endpoint, from the running agent's admin endpoint (`/hotkeys`).
    Hotkeys {
        /// Only this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// The agent's admin_listen.
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: std::net::SocketAddr,
        /// The admin bearer token (admin_token_file), when the agent requires one.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The JSON reply instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Key rules (throttle, deny) of the running agent: list, add or remove runtime ones
    /// (admin `/keyrules`; changes need the admin token).
    Keyrules {
        #[command(subcommand)]
        cmd: Option<keyrules_cli::KeyRulesCmd>,
        /// The agent's admin_listen.
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN, global = true)]
        admin: std::net::SocketAddr,
        /// The admin bearer token (admin_token_file): required to add or remove rules.
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        /// The JSON reply instead of a table (list).
        #[arg(long, global = true)]
        json: bool,
    },
    /// Turn the sockmap fast path on or off in the pinned settings.
    Fastpath {
        state: OnOff,
        #[arg(long, default_value = datamesh_common::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Unpin the links (detaching the programs) and remove every map pin and the pin dir.
    Uninstall {
        #[arg(long, default_value = datamesh_common::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Validate a config file and print every error.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Pods suspected of cache penetration or key scanning (the running agent's admin
    /// `/attacks`).
    Attacks {
        /// The agent's admin_listen.
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: std::net::SocketAddr,
        /// The admin bearer token (admin_token_file), when the agent requires one.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The JSON reply instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Keys with big replies (the running agent's admin `/bigkeys`).
    Bigkeys {
        /// The agent's admin_listen.
        #[arg(long, default_value = "127.0.0.1:15090")]
        admin: std::net::SocketAddr,
        /// The admin_token_file, when the agent has one.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn main() -> ExitCode {
    resources::pin_malloc_mmap_threshold();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: tests and kubectl logs read plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{}", full_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error with its causes, skipping causes whose text the message already contains (most
/// of our errors embed their source; aya's syscall errors keep the errno in their source).
fn full_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run {
            config,
            ready_file,
            ebpf_object,
        } => supervisor::run(supervisor::Options {
            config,
            ready_file,
            ebpf_object,
        }),
        Command::Worker {
            config,
            ready_file,
            ebpf_object,
            listen_fds,
            admin_fd,
            health_fd,
            supervisor_pid,
            generation,
            graceful,
        } => {
            let supervised = app::Supervised::parse(
                &listen_fds,
                admin_fd,
                health_fd,
                supervisor_pid,
                generation,
            )?
            .graceful(graceful);
            // The runtime is sized before app::run loads (and reports) the config: an invalid
            // config still gets its full error list from there.
            let workers = config::load(&config)
                .map(|c| c.proxy.worker_threads)
                .unwrap_or(config::DEFAULT_WORKER_THREADS);
            // One worker (the default) is a current-thread runtime: a command's hops (session,
            // backend writer, backend reader) then never cross threads or pay for work
            // stealing, which measured fastest at pipeline depth 1 (see
            // config::DEFAULT_WORKER_THREADS). Nothing in the agent blocks its runtime (pod
            // discovery has its own thread).
            let mut builder = if workers <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(workers as usize);
                b
            };
            let rt = builder
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(app::run(app::RunOptions {
                config,
                ready_file,
                ebpf_object,
                supervised: Some(supervised),
            }))?;
            // Connections still open after the drain deadline are cut here.
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            Ok(ExitCode::SUCCESS)
        }
        Command::Pods { pin_dir, json } => {
            let rows = pods::read_rows(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", pods::format_table(&rows, dataplane::monotonic_ns()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Hotkeys {
            endpoint,
            admin,
            token_file,
            json,
        } => {
            let doc = hotkeys_cli::fetch_json(admin, "/hotkeys", token_file.as_deref())?;
            print_doc(&doc, json, |d| {
                hotkeys_cli::format_table(d, endpoint.as_deref())
            })
        }
        Command::Keyrules {
            cmd,
            admin,
            token_file,
            json,
        } => {
            let cmd = cmd.unwrap_or(keyrules_cli::KeyRulesCmd::List);
            print!(
                "{}",
                keyrules_cli::run(cmd, admin, token_file.as_deref(), json)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Fastpath { state, pin_dir } => {
            let on = matches!(state, OnOff::On);
            let s = dataplane::set_fastpath(&pin_dir, on)?;
            println!(
                "fastpath {} (flags {:#x}) in {}",
                if on { "on" } else { "off" },
                s.flags,
                pin_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall { pin_dir } => {
            let removed = dataplane::uninstall(&pin_dir)?;
            if removed.is_empty() {
                println!("nothing to remove at {}", pin_dir.display());
            }
            for p in removed {
                println!("removed {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bigkeys {
            admin,
            token_file,
            json,
        } => {
            let doc = hotkeys_cli::fetch_json(admin, "/bigkeys", token_file.as_deref())?;
            print_doc(&doc, json, bigkeys_cli::format_table)
        }
        Command::Attacks {
            admin,
            token_file,
            json,
        } => {
            let doc = hotkeys_cli::fetch_json(admin, "/attacks", token_file.as_deref())?;
            print_doc(&doc, json, attacks_cli::format_table)
        }
        Command::RestartWorker { ready_file } => {
            let text = std::fs::read_to_string(&ready_file).with_context(|| {
                format!(
                    "reading the ready file {} (is the agent running with --ready-file?)",
                    ready_file.display()
                )
            })?;
            let doc: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a ready file", ready_file.display()))?;
            let pid = doc["pid"]
                .as_u64()
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 1)
                .with_context(|| format!("{} names no agent pid", ready_file.display()))?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGUSR2,
            )
            .with_context(|| format!("signalling the agent (pid {pid}) with SIGUSR2"))?;
            println!("asked the agent (pid {pid}) to replace its worker gracefully; its log and datamesh_agent_worker_replacements_total say when it did");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: OK ({} endpoint(s), {} pod policy(ies))",
                    config.display(),
                    cfg.endpoints.len(),
                    cfg.pods.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// An admin route's JSON as it came (`--json`) or as the command's table.
fn print_doc(
    doc: &serde_json::Value,
    json: bool,
    table: impl Fn(&serde_json::Value) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(doc)?);
    } else {
        print!("{}", table(doc));
    }
    Ok(ExitCode::SUCCESS)
}
