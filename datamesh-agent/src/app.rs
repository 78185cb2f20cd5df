//! Wires the subsystems for `datamesh-agent run`: config → preflight → proxy listeners →
//! data plane (adopt / attach / upgrade, settings, endpoints) → pod discovery → heartbeat →
//! admin → ready file; then, on SIGTERM/SIGINT, capture off (heartbeat 0) → stop accepting →
//! drain → exit. Nothing is detached or unpinned on exit: a restarted agent re-adopts.
//!
//! SIGUSR1 retires the worker (a successor takes over: the supervisor's worker replacement, a
//! zero-error upgrade): not ready, stop accepting on the endpoint and admin listeners (the
//! listening sockets are the supervisor's and stay open: only this process's descriptors go,
//! so pod connects wait in the backlog for the successor), drain, exit 0. The heartbeat, the
//! pinned maps and links and the ready file are left to the successor.
//!
//! The drain ([`Shared::drain`]) closes each client connection only at a command boundary (no
//! reply owed, nothing unanswered, not in a transaction, subscription or blocking command),
//! or at `drain_timeout_ms`, and logs how many of each.
//!
//! Config reload (SIGHUP, or the file's mtime/size/content changing, polled every second):
//! the new file is validated in full; if invalid, every error is logged and the running config
//! stays. Otherwise proxy settings, users, pod policies, data-plane settings and endpoints are
//! applied: new endpoints get a listener and an endpoints-map entry, removed ones lose them,
//! changed backends get a new runtime that sessions use from their next command. Open client
//! connections are never dropped. Fields that need a restart are kept and a warning names them.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use datamesh_common::{Settings, ABI_VERSION};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};

use datamesh_proxy::accounting::{PodRate, PodRegistry, PolicySource};
use datamesh_proxy::bigkeys::BigKeySettings;
use datamesh_proxy::config::{AclSettings, EndpointSpec, SessionSettings};
use datamesh_proxy::endpoint::{EndpointHandle, EndpointRuntime};
use datamesh_proxy::hotkeys::{HotKeysCollector, HotKeysView};
use datamesh_proxy::listener::{self, Bound, ListenError, Listener, Shared};
use datamesh_proxy::metrics::{ProxyMetrics, ResultLabels};
use datamesh_proxy::resp::Limits;

use crate::admin::{self, AdminError, AdminState};
use crate::config::{self, Config, ConfigError};
use crate::conns::{CaptureAttribution, ConnLog};
use crate::dataplane::{self, DataplaneError, DataplaneMetrics, DesiredState, Maps};
use crate::identity::{LocalAddrs, UncapturedPolicy};
use crate::pod_counters::MapDirectory;
use crate::pods::{self, Pods, PodsError};
use crate::preflight::{self, PreflightError};
use crate::resources;
use crate::watchdog::Watchdog;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("preflight: {0}")]
    Preflight(#[from] PreflightError),
    #[error("data plane: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("proxy: {0}")]
    Listen(#[from] ListenError),
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

/// How long start-up and reload wait for a sentinel master or a cluster slot map.
const TOPOLOGY_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Listeners by endpoint name (for reload).
type ListenerMap = std::collections::HashMap<String, Listener>;

/// The proxy's session settings from the file's `proxy:` section and `users`, with the sizes
/// left to the memory budget resolved from the container's resources.
fn session_settings(cfg: &Config) -> SessionSettings {
    let p = &cfg.proxy;
    let res = resources::get();
    let m = p.memory(res.memory_limit);
    SessionSettings {
        limits: Limits {
            max_bulk_len: m.max_bulk_len,
            max_array_len: p.max_array_len,
            max_depth: p.max_depth as usize,
            max_inline_len: p.max_inline_len as usize,
        },
        users: cfg.users.clone(),
        throttle_max_delay: Duration::from_millis(p.throttle_max_delay_ms),
        max_pipeline: p.max_pipeline,
        client_output_limit: p.client_output_limit_bytes,
        output_normal: m.client_output_buffer_limit_normal,
        output_pubsub: p.client_output_buffer_limit_pubsub,
        client_query_limit: m.client_query_buffer_limit_bytes,
        memory_budget: m.memory_budget_bytes,
        idle_timeout: Duration::from_secs(p.client_idle_timeout_s),
        partial_timeout: Duration::from_millis(p.client_partial_timeout_ms),
        max_clients: resources::effective_max_clients(p.max_clients, res.nofile),
        tcp_keepalive: Duration::from_secs(p.tcp_keepalive_s),
        // Validated with the config: a failure here cannot happen (the default policy then).
        acl: Arc::new(AclSettings::build(&cfg.users, &p.default_acl).unwrap_or_default()),
        auth_max_failures: p.auth_max_failures,
        bigkeys: BigKeySettings {
            max_value_bytes: p.max_value_bytes,
            reply_bytes: cfg.bigkeys.reply_bytes,
            reply_elements: cfg.bigkeys.reply_elements,
            key_display: cfg.bigkeys.key_display,
            refuse: cfg.bigkeys.refuse,
            refuse_s: cfg.bigkeys.refuse_s,
        },
        hotkeys: cfg.hotkeys.clone(),
        local_cache: cfg.local_cache.clone(),
        attacks: cfg.attacks,
    }
}

/// `/config_dump`: the effective config, plus `resolved`: the sizes the proxy runs with where
/// the file left them to the memory budget, and the container resources they came from.
fn config_dump(cfg: &Config) -> String {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    let res = resources::get();
    let m = cfg.proxy.memory(res.memory_limit);
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "resolved".into(),
            serde_json::json!({
                "container_memory_limit": res.memory_limit,
                "nofile": res.nofile,
                "memory_budget_bytes": m.memory_budget_bytes,
                "max_bulk_len": m.max_bulk_len,
                "client_query_buffer_limit_bytes": m.client_query_buffer_limit_bytes,
                "client_output_buffer_limit_normal": m.client_output_buffer_limit_normal,
                "max_clients": resources::effective_max_clients(cfg.proxy.max_clients, res.nofile),
            }),
        );
    }
    serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
}

/// Logs the budget-derived sizes the proxy runs with (also under `resolved` in
/// `/config_dump`).
fn log_sizes(s: &SessionSettings) {
    info!(
        memory_budget_bytes = s.memory_budget,
        max_bulk_len = s.limits.max_bulk_len,
        client_query_buffer_limit_bytes = s.client_query_limit,
        client_output_buffer_limit_normal = %s.output_normal,
        client_output_buffer_limit_pubsub = %s.output_pubsub,
        max_clients = s.max_clients,
        "client limits"
    );
}

fn endpoint_spec(ep: &config::Endpoint) -> EndpointSpec {
    EndpointSpec {
        name: ep.name.clone(),
        backend: ep.backend.clone(),
    }
}

/// Binds every endpoint's listener (before the data plane points connects at them).
fn bind_all(cfg: &Config) -> Result<Vec<(config::Endpoint, Bound)>, ListenError> {
    cfg.endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| bind_one(cfg, ep, i as u32).map(|b| (ep.clone(), b)))
        .collect()
}

fn bind_one(cfg: &Config, ep: &config::Endpoint, id: u32) -> Result<Bound, ListenError> {
    let b = raise_listener(listener::bind(&ep.name, cfg.proxy_bind(ep), id)?)?;
    info!(endpoint = %ep.name, address = %ep.address, proxy = %b.local, backend = %ep.backend.primary_address(), kind = ep.backend.kind_name(), "endpoint bound");
    Ok(b)
}

/// Moves a listening socket to a descriptor above every other this process opens (lowest
/// free descriptor at or above `min(RLIMIT_NOFILE, 65536) - 1024`; client and backend sockets
/// take the lowest free ones).
///
/// Why: when the process is killed, the kernel releases its files in descending descriptor
/// order (exit queues one deferred `fput` per descriptor, ascending, and runs them last-in
/// first-out). With the listener on top it is closed first: its `dm_listeners` entry is gone
/// before any client connection of this process is reset, so a client that reconnects at once
/// after its reset goes straight to Redis (fail-open) instead of into the backlog of a listener
/// that is about to close (which resets it again).
fn raise_fd(fd: RawFd) -> std::io::Result<RawFd> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let cap = soft.min(65_536) as RawFd;
    let base = if cap > 2048 { cap - 1024 } else { cap / 2 };
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own into a new one we then own.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) };
    if high < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours and replaced by `high`; nothing else refers to it.
    unsafe { libc::close(fd) };
    Ok(high)
}

/// [`raise_fd`] for a bound listener (a worker's own bind).
fn raise_listener(b: Bound) -> Result<Bound, ListenError> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let err = |source| ListenError::Bind {
        endpoint: b.endpoint.clone(),
        addr: b.local,
        source,
    };
    let std = b.listener.into_std().map_err(err)?;
    let fd = raise_fd(std.into_raw_fd()).map_err(err)?;
    // SAFETY: `fd` is the listening socket just moved; owned here once.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let listener = tokio::net::TcpListener::from_std(std).map_err(err)?;
    Ok(Bound { listener, ..b })
}

/// Options of `datamesh-agent run`.
pub struct RunOptions {
    pub config: PathBuf,
    pub ready_file: Option<PathBuf>,
    pub ebpf_object: Option<PathBuf>,
    /// Set in a worker the supervisor started: inherited listeners, health channel; the
    /// supervisor keeps the heartbeat.
    pub supervised: Option<Supervised>,
}

/// What a worker inherits from its supervisor (see `supervisor`).
pub struct Supervised {
    listen_fds: std::collections::HashMap<String, std::os::fd::RawFd>,
    admin_fd: std::os::fd::RawFd,
    health_fd: std::os::fd::RawFd,
    supervisor_pid: u32,
    generation: u64,
    /// A graceful successor: the worker it replaces still serves (and counts) its connections.
    graceful: bool,
}

impl Supervised {
    /// Marks a graceful successor (`--graceful`).
    pub fn graceful(mut self, on: bool) -> Self {
        self.graceful = on;
        self
    }

    /// From the worker's arguments (`--listen-fds name=fd,...`).
    pub fn parse(
        listen_fds: &str,
        admin_fd: i32,
        health_fd: i32,
        supervisor_pid: u32,
        generation: u64,
    ) -> anyhow::Result<Self> {
        let mut map = std::collections::HashMap::new();
        for pair in listen_fds.split(',').filter(|p| !p.is_empty()) {
            let (name, fd) = pair
                .rsplit_once('=')
                .ok_or_else(|| anyhow::anyhow!("--listen-fds: {pair:?} is not name=fd"))?;
            let fd: i32 = fd
                .parse()
                .map_err(|_| anyhow::anyhow!("--listen-fds: {pair:?}: fd is not a number"))?;
            map.insert(name.to_string(), fd);
        }
        Ok(Self {
            listen_fds: map,
            admin_fd,
            health_fd,
            supervisor_pid,
            generation,
            graceful: false,
        })
    }

    /// Takes the inherited listener of `endpoint`, if the supervisor bound one.
    fn take_listener(&mut self, endpoint: &str, id: u32) -> Result<Option<Bound>, ListenError> {
        use std::os::fd::FromRawFd;
        let Some(fd) = self.listen_fds.remove(endpoint) else {
            return Ok(None);
        };
        let err = |source| ListenError::Bind {
            endpoint: endpoint.to_string(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        };
        let fd = raise_fd(fd).map_err(err)?;
        // SAFETY: the supervisor passed this listening socket for this endpoint (moved to
        // `fd` just now); it is owned here once (removed from the map).
        let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        std.set_nonblocking(true).map_err(err)?;
        let local = std.local_addr().map_err(err)?;
        let listener = tokio::net::TcpListener::from_std(std).map_err(err)?;
        info!(endpoint, proxy = %local, "proxy listening (inherited from the supervisor)");
        Ok(Some(Bound {
            endpoint: endpoint.to_string(),
            id,
            listener,
            local,
        }))
    }
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
    /// The agent: the supervisor's pid (a signal to it reaches the worker).
    pid: u32,
    worker_pid: u32,
    worker_generation: u64,
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
        flags: dataplane::settings_flags(
            cfg.fastpath,
            cfg.capture.mode == config::CaptureMode::Selected,
        ),
        // Supervised, the supervisor owns the heartbeat; this first write only starts capture
        // before its first tick (it opens the maps once a worker pinned them). Harmless: the
        // supervisor fails open only after 3 failed workers, and a replacement worker reopens
        // the maps keeping the pinned heartbeat (`dataplane::reopen`).
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
    // Retirement: before start-up too (SIGUSR1's default action would kill the worker).
    let mut sigusr1 = signal(SignalKind::user_defined1()).map_err(|source| AppError::Signal {
        signal: "SIGUSR1",
        source,
    })?;

    let cfg = config::load(&opts.config)?;
    // Reads the container's memory limit and raises the descriptor limit, once.
    resources::get();
    let config_json = config_dump(&cfg);
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
    let mut supervised = opts.supervised;
    let (bound, admin_listener) = match supervised.as_mut() {
        Some(sup) => {
            let mut bound = Vec::new();
            for (i, ep) in cfg.endpoints.iter().enumerate() {
                let b = match sup.take_listener(&ep.name, i as u32)? {
                    Some(b) => b,
                    // An endpoint added by a reload after the supervisor started.
                    None => bind_one(&cfg, ep, i as u32)?,
                };
                bound.push((ep.clone(), b));
            }
            // SAFETY: the supervisor passed its admin listener; owned here once.
            let std = unsafe {
                <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(sup.admin_fd)
            };
            let admin_err = |source| AdminError::Bind {
                addr: cfg.admin_listen,
                source,
            };
            std.set_nonblocking(true).map_err(admin_err)?;
            let l = tokio::net::TcpListener::from_std(std).map_err(admin_err)?;
            (bound, l)
        }
        None => (bind_all(&cfg)?, admin::bind(cfg.admin_listen).await?),
    };
    let admin_addr: SocketAddr = admin_listener.local_addr().map_err(|source| AppError::Io {
        action: "admin listener",
        path: PathBuf::from("admin_listen"),
        source,
    })?;

    let desired = DesiredState {
        settings: desired_settings(&cfg)?,
        // The service address (rewritten) and the listener itself (direct dials, recorded).
        endpoints: bound
            .iter()
            .flat_map(|(ep, b)| dataplane::endpoint_entries(b.id, ep.address, b.local))
            .collect(),
        // Capture rewrites only while these are in dm_listeners (the inherited ones are the
        // supervisor's too, so they outlive this worker; the kernel drops them when the whole
        // agent is gone).
        listeners: bound
            .iter()
            .map(|(_, b)| (b.id, b.listener.as_raw_fd()))
            .collect(),
    };
    // A replacement worker reopens what its predecessor (same binary) set up.
    let reopened = match &supervised {
        Some(sup) if sup.generation > 0 => dataplane::reopen(&cfg.pin_dir, &desired),
        _ => None,
    };
    let dp = match reopened {
        Some(dp) => dp,
        None => dataplane::setup(object_bytes, &cfg.pin_dir, &cfg.cgroup_path, &desired)?,
    };
    let dataplane::Dataplane {
        mode,
        maps,
        links: _links,
    } = dp;
    let maps: Arc<Maps> = Arc::new(maps);

    let pods = Arc::new(Pods::new(maps.clone()));
    // A graceful successor's predecessor still serves its connections (and counts them).
    if !supervised.as_ref().is_some_and(|s| s.graceful) {
        pods.reset_open_conns();
    }
    let policies: pods::SharedPolicies =
        Arc::new(RwLock::new(pods::PodSettings::from_config(&cfg)));
    let (pods_stop_tx, pods_stop_rx) = std::sync::mpsc::channel::<()>();
    let discovery = pods::spawn_discovery(
        pods.clone(),
        cfg.netns_dir.clone(),
        crate::kubelet::Kubelet::new(cfg.cgroup_root.clone(), cfg.pod_log_dir.clone()),
        policies.clone(),
        pods_stop_rx,
    )
    .map_err(|source| AppError::Io {
        action: "spawning pod discovery for",
        path: cfg.netns_dir.clone(),
        source,
    })?;

    let directory = MapDirectory::open(&cfg.pin_dir, pods.clone())?;
    let pod_limits = Arc::new(PodRegistry::new(
        Some(Arc::new(directory)),
        policy_source(&cfg),
    ));
    let mut registry = Registry::with_prefix("datamesh");
    let proxy_metrics = Arc::new(ProxyMetrics::with_pods(pod_limits.metrics.clone()));
    proxy_metrics.register(&mut registry);
    let dp_metrics = Arc::new(DataplaneMetrics::default());
    dp_metrics.register(&mut registry, mode);

    let sup_metrics = Arc::new(crate::supervisor::SupervisorMetrics::with_heartbeats(
        dp_metrics.heartbeats.clone(),
    ));
    if supervised.is_some() {
        sup_metrics.register(&mut registry);
    }
    let watchdog = Arc::new(Watchdog::new(
        cfg.watchdog,
        cfg.debug.fault_injection,
        supervised.is_some(),
    ));
    watchdog.register(&mut registry);
    if cfg.debug.fault_injection {
        warn!("debug.fault_injection is on: POST /debug/leak can leak descriptors, memory and backend connections (drills only)");
    }
    // True once every listener accepts (the pong says so: a graceful successor is then
    // serving, and the worker it replaces may retire).
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (hb_stop_tx, hb_stop_rx) = watch::channel(false);
    // Supervised, the supervisor keeps the heartbeat (it outlives a dead or hung worker).
    let heartbeat = if supervised.is_some() {
        tokio::spawn(async {})
    } else {
        dataplane::spawn_heartbeat(
            maps.clone(),
            Duration::from_millis(cfg.heartbeat_interval_ms),
            dp_metrics.clone(),
            hb_stop_rx,
        )
    };
    let (flush_stop_tx, flush_stop_rx) = watch::channel(false);
    let flusher = pod_limits.clone().spawn_flusher(flush_stop_rx.clone());

    let log = Arc::new(ConnLog::default());
    let attribution = Arc::new(CaptureAttribution {
        maps: maps.clone(),
        pods: pods.clone(),
        log: log.clone(),
        policy: RwLock::new(Arc::new(uncaptured_policy(&cfg))),
        local: LocalAddrs::default(),
    });
    let settings = session_settings(&cfg);
    log_sizes(&settings);
    let shared = Arc::new(Shared::new(
        attribution.clone(),
        proxy_metrics.clone(),
        pod_limits.clone(),
        settings,
    ));
    // `/hotkeys` and `datamesh_proxy_hotkey_ops_per_second` (made at each scrape).
    let hotkeys = HotKeysView::new(shared.clone());
    registry.register_collector(Box::new(HotKeysCollector(hotkeys.clone())));
    // Sheds the biggest clients when the memory budget is reached; stops with the flusher.
    let shedder = shared.budget.clone().spawn_shedder(flush_stop_rx.clone());
    // Key rules: the file's now; runtime ones come through the admin API.
    shared.keyrules.set_config(&cfg.key_rules);
    // Key-attack windows, alerts and automatic throttles: once a second.
    let attacks_ticker =
        datamesh_proxy::attacks::spawn_ticker(shared.clone(), flush_stop_rx.clone());
    // The supervisor's health checks, answered from this runtime from here on: the data
    // plane is set up; what follows (the backends' topology, up to TOPOLOGY_READY_TIMEOUT per
    // endpoint) may take longer than the supervisor's start timeout.
    let _health = match &supervised {
        Some(sup) => Some(
            crate::supervisor::spawn_health(
                sup.health_fd,
                crate::supervisor::HealthReport {
                    shared: shared.clone(),
                    serving: serving.clone(),
                    watchdog: watchdog.clone(),
                },
                sup_metrics.clone(),
            )
            .map_err(|source| AppError::Io {
                action: "opening the supervisor's health channel",
                path: PathBuf::from(format!("fd {}", sup.health_fd)),
                source,
            })?,
        ),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut listeners: ListenerMap = ListenerMap::new();
    for (ep, b) in bound {
        let rt = EndpointRuntime::build(&endpoint_spec(&ep), cfg.bypass_mark, &proxy_metrics);
        rt.wait_ready(TOPOLOGY_READY_TIMEOUT).await;
        let handle = Arc::new(EndpointHandle::new(rt));
        listeners.insert(
            ep.name.clone(),
            listener::spawn(b, handle, shared.clone(), stop_rx.clone()),
        );
    }

    hotkeys.set_endpoints(handles(&listeners));
    // The automatic key throttle (hotkeys.auto_throttle_ops); stops with the flusher.
    let auto_throttle = datamesh_proxy::keyrules::spawn_auto(
        shared.keyrules.clone(),
        hotkeys.clone(),
        shared.clone(),
        flush_stop_rx.clone(),
    );
    let admin_state = Arc::new(AdminState {
        ready: std::sync::atomic::AtomicBool::new(false),
        registry,
        config_json: RwLock::new(config_json),
        log,
        maps: maps.clone(),
        endpoints: RwLock::new(handles(&listeners)),
        hotkeys,
        token: RwLock::new(cfg.admin_token.clone()),
        bigkeys: shared.bigkeys.clone(),
        keyrules: shared.keyrules.clone(),
        attacks: shared.attacks.clone(),
        watchdog: watchdog.clone(),
    });
    // The admin endpoint has its own stop: it keeps answering (/ready = 503) while we drain.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_task = admin::spawn(admin_listener, admin_state.clone(), admin_stop_rx);

    let watchdog_task = watchdog.clone().spawn(
        shared.clone(),
        admin_state.clone(),
        resources::get().nofile,
        flush_stop_rx.clone(),
    );

    // Ready: data plane attached/adopted, every listener bound and accepting.
    admin_state.ready.store(true, Ordering::SeqCst);
    serving.store(true, Ordering::SeqCst);
    let ready = Ready {
        path: opts.ready_file.clone(),
        admin: admin_addr,
        mode: mode.as_str(),
        pid: supervised
            .as_ref()
            .map_or(std::process::id(), |s| s.supervisor_pid),
        generation: supervised.as_ref().map_or(0, |s| s.generation),
    };
    ready.write(&cfg, &listeners)?;
    info!(dataplane = mode.as_str(), admin = %admin_addr, "ready");

    let mut sighup = signal(SignalKind::hangup()).map_err(|source| AppError::Signal {
        signal: "SIGHUP",
        source,
    })?;
    let mut running = Running {
        cfg,
        listeners,
        stamp: None,
    };
    running.stamp = file_stamp(&opts.config, &running.cfg);
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctx = ReloadCtx {
        path: opts.config.clone(),
        shared: shared.clone(),
        attribution: attribution.clone(),
        maps: maps.clone(),
        policies: policies.clone(),
        pods: pods.clone(),
        admin: admin_state.clone(),
        ready: &ready,
        stop_rx: stop_rx.clone(),
        watchdog: watchdog.clone(),
    };
    let sig = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sigusr1.recv() => break "SIGUSR1",
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the config");
                reload(&ctx, &mut running).await;
                running.stamp = file_stamp(&ctx.path, &running.cfg);
            }
            _ = poll.tick() => {
                let stamp = file_stamp(&ctx.path, &running.cfg);
                if stamp != running.stamp {
                    info!(path = %ctx.path.display(), "config file (or a secret file it names) changed: reloading");
                    reload(&ctx, &mut running).await;
                    // Stamped with the files the config now names.
                    running.stamp = file_stamp(&ctx.path, &running.cfg);
                }
            }
        }
    };
    let Running { cfg, listeners, .. } = running;
    let retire = sig == "SIGUSR1";
    let drain_timeout = Duration::from_millis(cfg.drain_timeout_ms);
    admin_state.ready.store(false, Ordering::SeqCst);
    let mut admin_task = Some(admin_task);
    let mut pods_stop = Some(pods_stop_tx);
    if retire {
        info!(
            drain_timeout_ms = cfg.drain_timeout_ms,
            "retiring: SIGUSR1: stop accepting (the listening sockets stay open for the successor), then drain; heartbeat, data plane and ready file are left to the successor"
        );
        // The successor discovers pods and writes their policies now; two writers with
        // different configs (an upgrade) must not take turns.
        pods_stop = None;
        // The admin listener is the supervisor's too: the successor answers there.
        let _ = admin_stop_tx.send(true);
        if let Some(t) = admin_task.take() {
            let _ = t.await;
        }
    } else {
        info!(signal = sig, "shutting down: capture off, then drain");
        // 1. Capture off at once: stop the heartbeat writer, then write heartbeat 0, so new
        //    pod connects go straight to their endpoint while we drain.
        let _ = hb_stop_tx.send(true);
        let _ = heartbeat.await;
        if let Err(e) = maps.update_settings(|s| s.heartbeat_ns = 0) {
            error!(error = %e, "could not zero the heartbeat: capture fails open after failopen_after_ms");
        }
    }
    // 2. Stop accepting. Each accept loop drops its listener: this process's descriptor of a
    //    socket the supervisor holds open too (never shut down here).
    let _ = stop_tx.send(true);
    for (_, l) in listeners {
        l.stop().await;
    }
    // 3. Drain: each connection is closed at its next command boundary, the rest at the
    //    deadline.
    let r = shared.drain(drain_timeout).await;
    let what = if retire {
        "retiring: drained"
    } else {
        "drained"
    };
    if r.deadline > 0 || r.left > 0 {
        warn!(
            closed_at_boundary = r.boundary,
            closed_at_deadline = r.deadline,
            left_open = r.left,
            elapsed_ms = r.elapsed.as_millis() as u64,
            "{what}: {} connections closed at a command boundary, {} at the drain deadline (drain_timeout_ms: in a transaction, subscription or blocking command, or replies owed), {} still open",
            r.boundary,
            r.deadline,
            r.left
        );
    } else {
        info!(
            closed_at_boundary = r.boundary,
            closed_at_deadline = r.deadline,
            elapsed_ms = r.elapsed.as_millis() as u64,
            "{what}: {} connections closed at a command boundary, none at the deadline",
            r.boundary
        );
    }
    if retire {
        // The successor owns the heartbeat, the data plane and the ready file.
        let _ = flush_stop_tx.send(true);
        let _ = flusher.await;
        let _ = shedder.await;
        let _ = auto_throttle.await;
        let _ = attacks_ticker.await;
        let _ = tokio::task::spawn_blocking(move || discovery.join()).await;
        info!("retired: exiting (links, maps and listening sockets stay)");
        return Ok(());
    }
    let _ = admin_stop_tx.send(true);
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    let _ = flush_stop_tx.send(true);
    let _ = flusher.await;
    let _ = shedder.await;
    let _ = auto_throttle.await;
    let _ = attacks_ticker.await;
    let _ = watchdog_task.await;
    drop(pods_stop);
    let _ = tokio::task::spawn_blocking(move || discovery.join()).await;
    if let Some(path) = &opts.ready_file {
        // A ready file must never describe a process that is gone.
        let _ = std::fs::remove_file(path);
    }
    info!("stopped (links and maps stay pinned)");
    Ok(())
}

fn policy_source(cfg: &Config) -> PolicySource {
    PolicySource {
        pods: cfg
            .pods
            .iter()
            .map(|p| PodRate {
                name: p.name.clone(),
                cmd_rate: p.cmd_rate,
                cmd_burst: p.cmd_burst,
                max_connections: p.max_connections,
                max_dedicated: p.max_dedicated,
                acl: p
                    .acl
                    .as_deref()
                    .and_then(|a| datamesh_proxy::commands::acl::Policy::parse(a).ok())
                    .map(Arc::new),
            })
            .collect(),
        default_rate: cfg.default_cmd_rate,
        default_burst: cfg.default_cmd_burst,
        default_max_connections: cfg.default_max_connections,
        default_max_dedicated: cfg.default_max_dedicated,
    }
}

fn handles(listeners: &ListenerMap) -> Vec<Arc<EndpointHandle>> {
    let mut v: Vec<(u32, Arc<EndpointHandle>)> = listeners
        .values()
        .map(|l| (l.id, l.handle.clone()))
        .collect();
    v.sort_by_key(|(id, _)| *id);
    v.into_iter().map(|(_, h)| h).collect()
}

/// The uncaptured-connection policy from the config.
fn uncaptured_policy(cfg: &Config) -> UncapturedPolicy {
    UncapturedPolicy {
        mode: cfg.uncaptured,
        allow: cfg.uncaptured_allow.clone(),
    }
}

/// What identifies a version of the config file (mtime, size and a content hash, so an edit
/// within the same second is seen too), and of the secret files it names (a rotated Secret
/// is re-read without a config edit; Kubernetes swaps the files of a mounted Secret).
fn file_stamp(path: &Path, cfg: &Config) -> Option<(std::time::SystemTime, u64, u64)> {
    let md = std::fs::metadata(path).ok()?;
    let text = std::fs::read(path).ok()?;
    let mut hash = datamesh_common::fnv1a(&text);
    for f in cfg
        .password_files
        .values()
        .chain(cfg.admin_token_file.as_ref())
    {
        let content = std::fs::read(f).unwrap_or_default();
        hash = hash.rotate_left(1) ^ datamesh_common::fnv1a(&content);
    }
    Some((md.modified().ok()?, md.len(), hash))
}

/// The ready file's location and the parts of it that never change.
struct Ready {
    path: Option<PathBuf>,
    admin: SocketAddr,
    mode: &'static str,
    pid: u32,
    generation: u64,
}

impl Ready {
    /// (Re)writes the ready file for the endpoints now served, in config order.
    fn write(&self, cfg: &Config, listeners: &ListenerMap) -> Result<(), AppError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let endpoints = cfg
            .endpoints
            .iter()
            .filter_map(|ep| {
                let l = listeners.get(&ep.name)?;
                Some(ReadyEndpoint {
                    name: ep.name.clone(),
                    address: ep.address.to_string(),
                    proxy: l.local.to_string(),
                    backend: ep.backend.primary_address().to_string(),
                })
            })
            .collect();
        let ready = ReadyFile {
            pid: self.pid,
            worker_pid: std::process::id(),
            worker_generation: self.generation,
            admin: self.admin.to_string(),
            dataplane: self.mode,
            endpoints,
        };
        let json = serde_json::to_vec(&ready).unwrap_or_default();
        write_atomic(path, &json)
    }
}

struct Running {
    cfg: Config,
    listeners: ListenerMap,
    stamp: Option<(std::time::SystemTime, u64, u64)>,
}

struct ReloadCtx<'a> {
    path: PathBuf,
    shared: Arc<Shared>,
    attribution: Arc<CaptureAttribution>,
    maps: Arc<Maps>,
    policies: pods::SharedPolicies,
    pods: Arc<Pods>,
    admin: Arc<AdminState>,
    ready: &'a Ready,
    stop_rx: watch::Receiver<bool>,
    watchdog: Arc<Watchdog>,
}

/// Loads and applies the config file (see the module docs). Never drops a client connection.
async fn reload(ctx: &ReloadCtx<'_>, running: &mut Running) {
    let metrics = &ctx.shared.metrics;
    let result = |r: &str| {
        metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: r.into() })
            .inc()
    };
    let mut new = match config::load(&ctx.path) {
        Ok(c) => c,
        Err(e) => {
            error!("config reload rejected, keeping the running config: {e}");
            result("invalid");
            return;
        }
    };
    let old = &running.cfg;
    // Fields that need a restart: keep the running values.
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($f:ident),*) => {$(
            if new.$f != old.$f {
                kept.push(stringify!($f));
                new.$f = old.$f.clone();
            }
        )*};
    }
    keep!(
        proxy_address,
        proxy_address_v6,
        cgroup_path,
        pin_dir,
        admin_listen,
        admin_allow_remote,
        netns_dir,
        cgroup_root,
        pod_log_dir,
        bypass_mark,
        skip_host_network,
        heartbeat_interval_ms
    );
    if new.proxy.worker_threads != old.proxy.worker_threads {
        kept.push("proxy.worker_threads");
        new.proxy.worker_threads = old.proxy.worker_threads;
    }
    if !kept.is_empty() {
        warn!(fields = ?kept, "config reload: these fields need a restart; keeping the running values");
    }
    if new == *old {
        info!("config reload: nothing changed");
        result("ok");
        return;
    }

    let settings = session_settings(&new);
    log_sizes(&settings);
    ctx.shared.set_settings(settings);
    if new.key_rules != old.key_rules {
        // Runtime and automatic rules stay (they are not the file's).
        ctx.shared.keyrules.set_config(&new.key_rules);
        info!(
            rules = new.key_rules.len(),
            "config reload: key rules replaced"
        );
    }
    ctx.attribution.set_policy(uncaptured_policy(&new));
    ctx.watchdog
        .set_config(new.watchdog, new.debug.fault_injection);
    *ctx.admin.token.write().unwrap_or_else(|p| p.into_inner()) = new.admin_token.clone();
    ctx.shared.pod_limits.set_policy(policy_source(&new));
    // Pod entries (capture flags) and the settings' mode in the order that never leaves out a
    // pod selected both before and after: switching to `selected`, the entries first (the
    // selected pods must be flagged when the mode turns); switching from `selected` to `all`,
    // the mode first (the selected pods' entries go, and `selected` reads a missing entry as
    // not captured; `all` captures a pod flagged on).
    let pod_settings = pods::PodSettings::from_config(&new);
    *ctx.policies.write().unwrap_or_else(|p| p.into_inner()) = pod_settings.clone();
    let flags = dataplane::settings_flags(
        new.fastpath,
        new.capture.mode == config::CaptureMode::Selected,
    );
    let failopen = new.failopen_after_ms.saturating_mul(1_000_000);
    let (rate, burst) = (new.default_conn_rate, new.default_conn_burst);
    let write_settings = || {
        if let Err(e) = ctx.maps.update_settings(|s| {
            s.flags = flags;
            s.failopen_after_ns = failopen;
            s.default_conn_rate = rate;
            s.default_conn_burst = burst;
        }) {
            error!(error = %e, "config reload: cannot write dm_settings");
        }
    };
    if old.capture.mode == config::CaptureMode::Selected
        && new.capture.mode == config::CaptureMode::All
    {
        write_settings();
        ctx.pods.reapply(&pod_settings);
    } else {
        ctx.pods.reapply(&pod_settings);
        write_settings();
    }

    // Endpoints.
    let old_eps: std::collections::HashMap<&str, &config::Endpoint> =
        old.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut used_ids: std::collections::HashSet<u32> =
        running.listeners.values().map(|l| l.id).collect();
    let new_names: std::collections::HashSet<&str> =
        new.endpoints.iter().map(|e| e.name.as_str()).collect();
    // Removed (or moved to another address/port): stop the listener, remove the map entry.
    let mut to_remove = Vec::new();
    for (name, ep) in &old_eps {
        let moved = new
            .endpoints
            .iter()
            .find(|n| n.name == *name)
            .is_some_and(|n| n.address != ep.address || n.proxy_port != ep.proxy_port);
        if !new_names.contains(name) || moved {
            to_remove.push((name.to_string(), ep.address));
        }
    }
    for (name, address) in to_remove {
        let mut keys = vec![dataplane::endpoint_key(address)];
        let mut removed_id = None;
        if let Some(l) = running.listeners.remove(&name) {
            used_ids.remove(&l.id);
            removed_id = Some(l.id);
            keys.push(dataplane::endpoint_key(l.local));
            l.stop().await;
        }
        if let Some(id) = removed_id {
            // The supervisor may still hold an inherited listener: drop its entry explicitly.
            ctx.maps.remove_listener(id);
        }
        for key in keys {
            let removed = ctx
                .maps
                .endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            if let Err(e) = removed {
                warn!(endpoint = %name, error = %e, "config reload: cannot remove the endpoints map entry");
            }
        }
        info!(endpoint = %name, "endpoint removed (open connections stay)");
    }
    for ep in &new.endpoints {
        match running.listeners.get(&ep.name) {
            Some(l) => {
                if old_eps
                    .get(ep.name.as_str())
                    .is_some_and(|o| o.backend != ep.backend)
                {
                    info!(endpoint = %ep.name, "backend changed: new commands use the new backend");
                    let rt = EndpointRuntime::build(&endpoint_spec(ep), new.bypass_mark, metrics);
                    // The old backend keeps serving until the new one knows its topology.
                    rt.wait_ready(TOPOLOGY_READY_TIMEOUT).await;
                    l.handle.replace(rt);
                }
            }
            None => {
                let id = (0..).find(|i| !used_ids.contains(i)).unwrap_or(0);
                match bind_one(&new, ep, id) {
                    Ok(b) => {
                        used_ids.insert(id);
                        // Before the endpoint entries, so its connects are rewritten at once.
                        if let Err(e) = ctx.maps.set_listener(id, b.listener.as_raw_fd()) {
                            error!(endpoint = %ep.name, error = %e, "config reload: cannot write dm_listeners: the endpoint's connects fail open (go to the endpoint directly)");
                        }
                        for (k, v) in dataplane::endpoint_entries(id, ep.address, b.local) {
                            let written = ctx
                                .maps
                                .endpoints
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(k, v, 0);
                            if let Err(e) = written {
                                error!(endpoint = %ep.name, error = %e, "config reload: cannot write the endpoints map");
                            }
                        }
                        let rt =
                            EndpointRuntime::build(&endpoint_spec(ep), new.bypass_mark, metrics);
                        rt.wait_ready(TOPOLOGY_READY_TIMEOUT).await;
                        let handle = Arc::new(EndpointHandle::new(rt));
                        running.listeners.insert(
                            ep.name.clone(),
                            listener::spawn(b, handle, ctx.shared.clone(), ctx.stop_rx.clone()),
                        );
                        info!(endpoint = %ep.name, "endpoint added");
                    }
                    Err(e) => error!("config reload: {e}"),
                }
            }
        }
    }
    // Endpoints that failed to bind are left out of the running config, so a later reload
    // tries them again.
    new.endpoints
        .retain(|e| running.listeners.contains_key(&e.name));
    *ctx.admin
        .endpoints
        .write()
        .unwrap_or_else(|p| p.into_inner()) = handles(&running.listeners);
    ctx.admin.hotkeys.set_endpoints(handles(&running.listeners));
    *ctx.admin
        .config_json
        .write()
        .unwrap_or_else(|p| p.into_inner()) = config_dump(&new);
    if let Err(e) = ctx.ready.write(&new, &running.listeners) {
        warn!(error = %e, "config reload: cannot rewrite the ready file");
    }
    info!(config = %serde_json::to_string(&new).unwrap_or_default(), "config reloaded");
    running.cfg = new;
    result("ok");
}
