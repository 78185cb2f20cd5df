//! Wires the subsystems for `datamesh-agent run`: config → preflight → proxy listeners →
//! data plane (adopt / attach / upgrade, settings, endpoints) → pod discovery → heartbeat →
//! admin → ready file; then, on SIGTERM/SIGINT, capture off (heartbeat 0) → stop accepting →
//! drain → exit. Nothing is detached or unpinned on exit: a restarted agent re-adopts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use datamesh_common::{Settings, ABI_VERSION};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminError, AdminState};
use crate::config::{self, Config, ConfigError};
use crate::dataplane::{self, DataplaneError, DataplaneMetrics, DesiredState, Maps};
use crate::pods::{self, Pods, PodsError};
use crate::preflight::{self, PreflightError};
use crate::proxy::{self, ConnLog, ProxyError, ProxyMetrics, Shared};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("preflight: {0}")]
    Preflight(#[from] PreflightError),
    #[error("data plane: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("proxy: {0}")]
    Proxy(#[from] ProxyError),
    #[error("admin: {0}")]
    Admin(#[from] AdminError),
    #[error("pods: {0}")]
    Pods(#[from] PodsError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves once `rx` holds `true` (or its sender is gone). Does not hold the watch's read
/// guard across an await, so tasks using it stay `Send`.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}

/// Options of `datamesh-agent run`.
pub struct RunOptions {
    pub config: PathBuf,
    pub ready_file: Option<PathBuf>,
    pub ebpf_object: Option<PathBuf>,
}

#[derive(Serialize)]
struct ReadyEndpoint {
    name: String,
    address: String,
    proxy: String,
    backend: String,
}

#[derive(Serialize)]
struct ReadyFile {
    pid: u32,
    admin: String,
    dataplane: &'static str,
    endpoints: Vec<ReadyEndpoint>,
}

/// Writes `path` atomically (temporary file in the same directory, then rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AppError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|source| AppError::Io {
        action: "writing",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| AppError::Io {
        action: "renaming to",
        path: path.to_path_buf(),
        source,
    })
}

fn desired_settings(cfg: &Config) -> Result<Settings, AppError> {
    let agent_netns_cookie = if cfg.skip_host_network {
        pods::current_netns_cookie()?
    } else {
        0
    };
    Ok(Settings {
        abi_version: ABI_VERSION,
        flags: dataplane::settings_flags(cfg.fastpath),
        heartbeat_ns: dataplane::monotonic_ns(),
        failopen_after_ns: cfg.failopen_after_ms.saturating_mul(1_000_000),
        agent_netns_cookie,
        bypass_mark: cfg.bypass_mark,
        default_conn_rate: cfg.default_conn_rate,
        default_conn_burst: cfg.default_conn_burst,
        _pad0: 0,
    })
}

pub async fn run(opts: RunOptions) -> Result<(), AppError> {
    // Signals first, so a SIGTERM during start-up is handled as a shutdown, not a kill.
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| AppError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| AppError::Signal {
        signal: "SIGINT",
        source,
    })?;

    let cfg = config::load(&opts.config)?;
    let config_json = serde_json::to_string_pretty(&cfg).unwrap_or_else(|_| "{}".into());
    info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "effective config");

    preflight::check_all(&cfg)?;

    let object: Vec<u8>;
    let object_bytes: &[u8] = match &opts.ebpf_object {
        Some(p) => {
            object = std::fs::read(p).map_err(|source| AppError::Io {
                action: "reading eBPF object",
                path: p.clone(),
                source,
            })?;
            info!(path = %p.display(), "using eBPF object from --ebpf-object");
            &object
        }
        None => dataplane::EMBEDDED_OBJECT,
    };

    // Listeners before the data plane, so the endpoints map points at bound ports.
    let bound = proxy::bind_all(&cfg)?;
    let admin_listener = admin::bind(cfg.admin_listen).await?;
    let admin_addr: SocketAddr = admin_listener.local_addr().map_err(|source| AppError::Io {
        action: "admin listener",
        path: PathBuf::from("admin_listen"),
        source,
    })?;

    let desired = DesiredState {
        settings: desired_settings(&cfg)?,
        endpoints: bound
            .iter()
            .map(|b| {
                (
                    dataplane::endpoint_key(b.endpoint.address),
                    dataplane::endpoint_value(b.id, b.local),
                )
            })
            .collect(),
    };
    let dp = dataplane::setup(object_bytes, &cfg.pin_dir, &cfg.cgroup_path, &desired)?;
    let dataplane::Dataplane {
        mode,
        maps,
        links: _links,
    } = dp;
    let maps: Arc<Maps> = Arc::new(maps);

    let pods = Arc::new(Pods::new(maps.clone()));
    pods.reset_open_conns();
    let (pods_stop_tx, pods_stop_rx) = std::sync::mpsc::channel::<()>();
    let discovery = pods::spawn_discovery(
        pods.clone(),
        cfg.netns_dir.clone(),
        cfg.pods.clone(),
        pods_stop_rx,
    )
    .map_err(|source| AppError::Io {
        action: "spawning pod discovery for",
        path: cfg.netns_dir.clone(),
        source,
    })?;

    let mut registry = Registry::with_prefix("datamesh");
    let proxy_metrics = Arc::new(ProxyMetrics::default());
    proxy_metrics.register(&mut registry);
    let dp_metrics = Arc::new(DataplaneMetrics::default());
    dp_metrics.register(&mut registry, mode);

    let (hb_stop_tx, hb_stop_rx) = watch::channel(false);
    let heartbeat = dataplane::spawn_heartbeat(
        maps.clone(),
        Duration::from_millis(cfg.heartbeat_interval_ms),
        dp_metrics.clone(),
        hb_stop_rx,
    );

    let log = Arc::new(ConnLog::default());
    let shared = Arc::new(Shared::new(
        maps.clone(),
        pods.clone(),
        log.clone(),
        proxy_metrics.clone(),
        cfg.bypass_mark,
    ));
    let ready_endpoints: Vec<ReadyEndpoint> = bound
        .iter()
        .map(|b| ReadyEndpoint {
            name: b.endpoint.name.clone(),
            address: b.endpoint.address.to_string(),
            proxy: b.local.to_string(),
            backend: b.endpoint.backend.to_string(),
        })
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let accept_loops = proxy::spawn_accept_loops(bound, shared.clone(), stop_rx);

    let admin_state = Arc::new(AdminState {
        ready: std::sync::atomic::AtomicBool::new(false),
        registry,
        config_json,
        log,
        maps: maps.clone(),
    });
    // The admin endpoint has its own stop: it keeps answering (/ready = 503) while we drain.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_task = admin::spawn(admin_listener, admin_state.clone(), admin_stop_rx);

    // Ready: data plane attached/adopted, every listener bound and accepting.
    admin_state.ready.store(true, Ordering::SeqCst);
    if let Some(path) = &opts.ready_file {
        let ready = ReadyFile {
            pid: std::process::id(),
            admin: admin_addr.to_string(),
            dataplane: mode.as_str(),
            endpoints: ready_endpoints,
        };
        let json = serde_json::to_vec(&ready).unwrap_or_default();
        write_atomic(path, &json)?;
    }
    info!(dataplane = mode.as_str(), admin = %admin_addr, "ready");

    let sig = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    info!(signal = sig, "shutting down: capture off, then drain");

    // 1. Capture off at once: stop the heartbeat writer, then write heartbeat 0, so new pod
    //    connects go straight to their endpoint while we drain.
    admin_state.ready.store(false, Ordering::SeqCst);
    let _ = hb_stop_tx.send(true);
    let _ = heartbeat.await;
    if let Err(e) = maps.update_settings(|s| s.heartbeat_ns = 0) {
        error!(error = %e, "could not zero the heartbeat: capture fails open after failopen_after_ms");
    }
    // 2. Stop accepting.
    let _ = stop_tx.send(true);
    for h in accept_loops {
        let _ = h.await;
    }
    // 3. Drain.
    let left = shared
        .drain(Duration::from_millis(cfg.drain_timeout_ms))
        .await;
    if left > 0 {
        warn!(
            open = left,
            "drain deadline reached: closing the remaining connections"
        );
    } else {
        info!("drained");
    }
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    drop(pods_stop_tx);
    let _ = tokio::task::spawn_blocking(move || discovery.join()).await;
    if let Some(path) = &opts.ready_file {
        // A ready file must never describe a process that is gone.
        let _ = std::fs::remove_file(path);
    }
    info!("stopped (links and maps stay pinned)");
    Ok(())
}
