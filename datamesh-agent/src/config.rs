//! The agent's configuration: the file format (YAML or TOML, chosen by extension), defaults,
//! the `DATAMESH_PROXY_ADDRESS` override, and validation that reports every bad field at once.
//!
//! The file is parsed into [`RawConfig`] (strings where a value needs checking, so one bad
//! address does not hide the next), then [`RawConfig::validate`] turns it into the typed
//! [`Config`] that the rest of the agent uses, or a list of `field: problem` errors.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::{Cidr, UncapturedMode};
use datamesh_proxy::attacks::AttackSettings;
pub use datamesh_proxy::budget::{parse_output_limit, OutputLimit};
pub use datamesh_proxy::config::{
    Backend, BackendKind, Secret, User, DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_DATABASES,
    DEFAULT_FAILOVER_HOLD_MS, DEFAULT_HEALTH_INTERVAL_MS, DEFAULT_HEALTH_TIMEOUT_MS,
    DEFAULT_HOLD_MAX_BYTES, DEFAULT_HOLD_MAX_CLIENT_BYTES, DEFAULT_MAX_DEDICATED,
    DEFAULT_POOL_SIZE, DEFAULT_STANDBY_AFTER_MS, DEFAULT_WARM_DEDICATED,
};
use datamesh_proxy::hotkeys::{HotKeySettings, KeyDisplay};
use datamesh_proxy::keyrules::{validate_rule, RawKeyRule, RuleSpec};
use datamesh_proxy::localcache::LocalCacheSettings;

/// Environment variable that overrides `proxy_address` (in Kubernetes: `status.hostIP`).
pub const PROXY_ADDRESS_ENV: &str = "DATAMESH_PROXY_ADDRESS";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} must end in .yaml, .yml or .toml")]
    UnknownFormat { path: PathBuf },
    #[error("config file {path} is not valid YAML for this config: {source}")]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("config file {path} is not valid TOML for this config: {source}")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path} has {} error(s):\n{}", .errors.len(), FieldErrors(.errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
    },
}

/// One validation problem, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

struct FieldErrors<'a>(&'a [FieldError]);

impl fmt::Display for FieldErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Keys the file has that the config does not know. Collected (instead of
/// `deny_unknown_fields`, which stops at the first) so every typo is reported with the rest.
type Unknown = BTreeMap<String, serde::de::IgnoredAny>;

/// The config file as written. Unknown keys are errors, so a typo is never silently ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    pub proxy_address: Option<String>,
    pub proxy_address_v6: Option<String>,
    pub cgroup_path: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub fastpath: Option<bool>,
    pub failopen_after_ms: Option<u64>,
    pub heartbeat_interval_ms: Option<u64>,
    pub bypass_mark: Option<u32>,
    pub skip_host_network: Option<bool>,
    pub drain_timeout_ms: Option<u64>,
    pub admin_listen: Option<String>,
    pub admin_allow_remote: Option<bool>,
    pub admin_token_file: Option<PathBuf>,
    pub uncaptured: Option<String>,
    #[serde(default)]
    pub uncaptured_allow: Vec<String>,
    pub netns_dir: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub pod_log_dir: Option<PathBuf>,
    pub upgrade_socket: Option<PathBuf>,
    #[serde(default)]
    pub capture: RawCapture,
    pub default_conn_rate: Option<u32>,
    pub default_conn_burst: Option<u32>,
    pub default_cmd_rate: Option<u32>,
    pub default_cmd_burst: Option<u32>,
    pub default_max_connections: Option<u32>,
    pub default_max_dedicated: Option<u32>,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub bigkeys: RawBigKeys,
    #[serde(default)]
    pub hotkeys: RawHotKeys,
    #[serde(default)]
    pub key_rules: Vec<RawKeyRule>,
    #[serde(default)]
    pub local_cache: RawLocalCache,
    #[serde(default)]
    pub attacks: RawAttacks,
    #[serde(default)]
    pub watchdog: RawWatchdog,
    #[serde(default)]
    pub debug: RawDebug,
    #[serde(default)]
    pub users: Vec<RawUser>,
    #[serde(default)]
    pub pods: Vec<RawPodPolicy>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `capture:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawCapture {
    pub mode: Option<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub pods: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Which pods the data plane rewrites (the gray-release lever).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// Every pod but the excluded ones (today's behaviour).
    #[default]
    All,
    /// Only pods matched by `namespaces` or `pods`, minus `exclude`; a pod the agent does not
    /// know (yet) is not captured.
    Selected,
}

/// `capture:` validated. Globs are Redis-style (`*`, `?`, `[..]`); `pods` and `exclude` match
/// the pod's full name (`namespace/name`, or the netns name of a netns-only pod),
/// `namespaces` its namespace (`keyrules::namespace_of`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct CaptureConfig {
    pub mode: CaptureMode,
    pub namespaces: Vec<String>,
    pub pods: Vec<String>,
    pub exclude: Vec<String>,
}

impl CaptureConfig {
    /// Whether the pod named `name` is captured (a pod with no known name only in `all`).
    pub fn selects(&self, name: Option<&str>) -> bool {
        let Some(name) = name else {
            return self.mode == CaptureMode::All;
        };
        let glob =
            |g: &String, s: &str| datamesh_proxy::keyrules::glob_match(g.as_bytes(), s.as_bytes());
        if self.exclude.iter().any(|g| glob(g, name)) {
            return false;
        }
        match self.mode {
            CaptureMode::All => true,
            CaptureMode::Selected => {
                self.pods.iter().any(|g| glob(g, name))
                    || datamesh_proxy::keyrules::namespace_of(name)
                        .is_some_and(|ns| self.namespaces.iter().any(|g| glob(g, ns)))
            }
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawPodPolicy {
    pub name: String,
    #[serde(default)]
    pub conn_rate: u32,
    #[serde(default)]
    pub conn_burst: u32,
    #[serde(default)]
    pub cmd_rate: u32,
    #[serde(default)]
    pub cmd_burst: u32,
    #[serde(default)]
    pub max_connections: u32,
    #[serde(default)]
    pub max_dedicated: u32,
    pub acl: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawEndpoint {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub proxy_port: u16,
    pub backend: Option<RawBackend>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `backend:` is either an address (standalone shorthand) or a map.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawBackend {
    Address(String),
    Full(Box<RawBackendMap>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawBackendMap {
    pub kind: Option<String>,
    pub address: Option<String>,
    pub sentinels: Option<Vec<String>>,
    pub master_name: Option<String>,
    pub read_from_replicas: Option<bool>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
    pub sentinel_password_file: Option<PathBuf>,
    pub nodes: Option<Vec<String>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub pool_size: Option<u32>,
    pub pool_prewarm: Option<bool>,
    pub max_dedicated: Option<u32>,
    pub warm_dedicated: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    pub command_timeout_ms: Option<u64>,
    pub databases: Option<u32>,
    pub failover_hold_ms: Option<u64>,
    pub hold_max_bytes: Option<u64>,
    pub hold_max_client_bytes: Option<u64>,
    pub health_interval_ms: Option<u64>,
    pub health_timeout_ms: Option<u64>,
    pub standby: Option<Vec<String>>,
    pub standby_after_ms: Option<u64>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `proxy:`: RESP limits and throttling.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawProxy {
    pub max_bulk_len: Option<u64>,
    pub max_array_len: Option<u64>,
    pub max_depth: Option<u32>,
    pub max_inline_len: Option<u64>,
    pub throttle_max_delay_ms: Option<u64>,
    pub max_pipeline: Option<u32>,
    pub client_output_limit_bytes: Option<u64>,
    pub client_output_buffer_limit_normal: Option<String>,
    pub client_output_buffer_limit_pubsub: Option<String>,
    pub client_query_buffer_limit_bytes: Option<u64>,
    pub memory_budget_bytes: Option<u64>,
    pub max_clients: Option<u32>,
    pub client_idle_timeout_s: Option<u64>,
    pub client_partial_timeout_ms: Option<u64>,
    pub tcp_keepalive_s: Option<u64>,
    pub worker_threads: Option<u32>,
    pub default_acl: Option<String>,
    pub auth_max_failures: Option<u32>,
    pub max_value_bytes: Option<u64>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `bigkeys:`: big-reply detection.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawBigKeys {
    pub reply_bytes: Option<u64>,
    pub reply_elements: Option<u64>,
    pub key_display: Option<String>,
    pub refuse: Option<bool>,
    pub refuse_s: Option<u64>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `hotkeys:`: hot-key detection (see `datamesh_proxy::hotkeys`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawHotKeys {
    pub enabled: Option<bool>,
    pub sample_rate: Option<u32>,
    pub top_k: Option<u32>,
    pub capacity: Option<u32>,
    pub window_s: Option<u32>,
    pub key_display: Option<String>,
    pub metrics_top: Option<u32>,
    pub auto_throttle_ops: Option<u32>,
    pub auto_throttle_s: Option<u32>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `local_cache:`: the node-local cache of hot read-mostly keys (see
/// `datamesh_proxy::localcache`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLocalCache {
    pub enabled: Option<bool>,
    pub endpoints: Option<Vec<String>>,
    pub min_ops: Option<u32>,
    pub min_read_ratio: Option<f64>,
    pub ttl_ms: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_keys: Option<u32>,
    pub max_value_bytes: Option<u64>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `attacks:`: cache-penetration and key-scan detection (see `datamesh_proxy::attacks`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAttacks {
    pub enabled: Option<bool>,
    pub window_s: Option<u32>,
    pub penetration_min_reads: Option<u64>,
    pub penetration_miss_ratio: Option<f64>,
    pub scan_max_per_s: Option<u32>,
    pub auto_throttle: Option<bool>,
    pub auto_throttle_rate: Option<u32>,
    pub auto_throttle_s: Option<u32>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// A user clients authenticate as at the proxy (`AUTH [name] password`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawUser {
    pub name: String,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub acl: Option<String>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// The effective, validated configuration (served back at `/config_dump`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Config {
    pub proxy_address: Ipv4Addr,
    pub proxy_address_v6: Option<Ipv6Addr>,
    pub cgroup_path: PathBuf,
    pub pin_dir: PathBuf,
    pub fastpath: bool,
    pub failopen_after_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub bypass_mark: u32,
    pub skip_host_network: bool,
    pub drain_timeout_ms: u64,
    pub admin_listen: SocketAddr,
    /// A non-loopback `admin_listen` is allowed (then `admin_token_file` is required).
    pub admin_allow_remote: bool,
    /// File holding the bearer token every admin request but `/ready` and `/live` must carry.
    pub admin_token_file: Option<PathBuf>,
    /// The token read from `admin_token_file` (re-read on reload).
    pub admin_token: Option<Secret>,
    /// Client connections the data plane did not record: `refuse` unless node-local or in
    /// `uncaptured_allow`, or `allow` all.
    pub uncaptured: UncapturedMode,
    pub uncaptured_allow: Vec<Cidr>,
    pub netns_dir: PathBuf,
    /// Where the kubelet's pod cgroups are looked for (`kubepods.slice` or `kubepods` under it).
    pub cgroup_root: PathBuf,
    /// The kubelet's pod log directories (`<namespace>_<name>_<uid>`).
    pub pod_log_dir: PathBuf,
    /// Unix socket a successor agent asks for the listening sockets on (zero-error upgrade).
    pub upgrade_socket: PathBuf,
    /// Which pods are captured.
    pub capture: CaptureConfig,
    pub default_conn_rate: u32,
    pub default_conn_burst: u32,
    /// Command-rate limit for pods without a policy (and node-local clients), per second.
    pub default_cmd_rate: u32,
    pub default_cmd_burst: u32,
    /// Caps per pod for pods without their own (0 = none; node-local clients have none).
    pub default_max_connections: u32,
    pub default_max_dedicated: u32,
    pub proxy: ProxySettings,
    /// Big-reply detection (`/bigkeys`).
    pub bigkeys: BigKeysConfig,
    /// Hot-key detection (and the automatic key throttle).
    pub hotkeys: HotKeySettings,
    /// Key rules (throttle, deny) from the file; runtime ones are kept by the proxy.
    pub key_rules: Vec<RuleSpec>,
    /// The node-local cache of hot read-mostly keys (off by default).
    pub local_cache: LocalCacheSettings,
    /// Cache-penetration and key-scan detection (`/attacks`).
    pub attacks: AttackSettings,
    /// The worker's resource watchdog (descriptors, RSS, backend connections).
    pub watchdog: WatchdogConfig,
    /// Debug switches (fault injection for the resource-leak drill; never in production).
    pub debug: DebugConfig,
    /// Users clients authenticate as at the proxy; empty = no AUTH needed.
    pub users: Vec<User>,
    pub pods: Vec<PodPolicyConfig>,
    pub endpoints: Vec<Endpoint>,
    /// Secrets read from files: field (`users[0].password`) → file. The values are in the
    /// fields themselves (shown `<redacted>`); the files are re-read on every reload.
    pub password_files: BTreeMap<String, PathBuf>,
}

/// `proxy:` settings (RESP limits, throttling, per-client bounds, the memory budget, command
/// policy, AUTH limits). Sizes left to `None` are derived from the memory budget (see
/// [`ProxySettings::memory`]).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProxySettings {
    /// None: a quarter of the memory budget, at most 512 MiB (Redis's `proto-max-bulk-len`).
    pub max_bulk_len: Option<u64>,
    pub max_array_len: u64,
    pub max_depth: u32,
    pub max_inline_len: u64,
    /// How long an over-limit command may be delayed before it is refused.
    pub throttle_max_delay_ms: u64,
    /// Most commands of one client in flight at once (the client is not read further).
    pub max_pipeline: u32,
    /// Reply bytes not yet written to a client past which it is not read further
    /// (back-pressure; the output buffer limits close it).
    pub client_output_limit_bytes: u64,
    /// Redis's `client-output-buffer-limit` for normal clients and subscribers. None for
    /// normal: hard = half the memory budget, soft = an eighth of it for 30 s.
    pub client_output_buffer_limit_normal: Option<OutputLimit>,
    pub client_output_buffer_limit_pubsub: OutputLimit,
    /// None: twice `max_bulk_len`.
    pub client_query_buffer_limit_bytes: Option<u64>,
    /// None: half the container's memory limit (cgroup `memory.max`), else 1 GiB.
    pub memory_budget_bytes: Option<u64>,
    /// Client connections at once, all endpoints (0 = no cap; lowered to fit the descriptor
    /// limit at start).
    pub max_clients: u32,
    pub client_idle_timeout_s: u64,
    pub client_partial_timeout_ms: u64,
    pub tcp_keepalive_s: u64,
    /// Worker threads of the agent's runtime (proxy, admin, heartbeat). The agent shares its
    /// node with the workloads, so it does not take every core; read at start only.
    pub worker_threads: u32,
    /// Command policy (Redis ACL rules) of users without their own `acl`.
    pub default_acl: String,
    /// Failed AUTH attempts on one connection before it is closed (0 = never).
    pub auth_max_failures: u32,
    /// Largest value argument of a write (SET's value, HSET's field values, RPUSH's
    /// elements ...); 0 = no guard.
    pub max_value_bytes: u64,
}

/// `bigkeys:`: which replies are big (0 = that check off), and how their keys are shown.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct BigKeysConfig {
    pub reply_bytes: u64,
    pub reply_elements: u64,
    pub key_display: KeyDisplay,
    /// Refuse pods' commands whose key and command gave a big reply within `refuse_s`.
    pub refuse: bool,
    pub refuse_s: u64,
}

impl Default for BigKeysConfig {
    fn default() -> Self {
        Self {
            reply_bytes: datamesh_proxy::bigkeys::DEFAULT_REPLY_BYTES,
            reply_elements: datamesh_proxy::bigkeys::DEFAULT_REPLY_ELEMENTS,
            key_display: KeyDisplay::default(),
            refuse: false,
            refuse_s: datamesh_proxy::bigkeys::DEFAULT_REFUSE_S,
        }
    }
}

/// One worker by default (a current-thread runtime): a command's hops (session, backend
/// writer and reader) stay on one core without cross-thread wake-ups or work stealing, which
/// measured fastest, with the lowest p99, at pipeline depth 1 and 16 (`cargo xtask bench
/// proxy` on 2 cores shared with redis-server and the clients, against multi-thread runtimes
/// of 1 and 2 workers) and leaves the node's other cores to the workloads. Raise it when the proxy
/// saturates a core; more than 1 is a multi-thread runtime with that many workers.
pub const DEFAULT_WORKER_THREADS: u32 = 1;
pub const DEFAULT_THROTTLE_MAX_DELAY_MS: u64 = 100;
pub const DEFAULT_MAX_PIPELINE: u32 = 4096;
pub const DEFAULT_CLIENT_OUTPUT_LIMIT: u64 = 4 * 1024 * 1024;
/// The memory budget when the container has no memory limit.
pub const DEFAULT_MEMORY_BUDGET_UNLIMITED: u64 = datamesh_proxy::config::DEFAULT_MEMORY_BUDGET;
pub const DEFAULT_POD_MAX_CONNECTIONS: u32 = 1024;
pub const DEFAULT_POD_MAX_DEDICATED: u32 = 128;

/// The memory-derived sizes, resolved (what the proxy runs with).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct MemorySizes {
    pub memory_budget_bytes: u64,
    pub max_bulk_len: u64,
    pub client_query_buffer_limit_bytes: u64,
    pub client_output_buffer_limit_normal: OutputLimit,
}

impl ProxySettings {
    /// The sizes left to the budget, from the container's memory limit (`memory.max`; None:
    /// no limit). Half the limit is for buffered client bytes; the rest is the agent's own
    /// (runtime, per-connection state, pools, metrics) and the allocator's slack.
    pub fn memory(&self, container_limit: Option<u64>) -> MemorySizes {
        let budget = self.memory_budget_bytes.unwrap_or(match container_limit {
            Some(l) => l / 2,
            None => DEFAULT_MEMORY_BUDGET_UNLIMITED,
        });
        let auto_bulk = (budget / 4).clamp(1024 * 1024, 512 * 1024 * 1024);
        let max_bulk_len = self.max_bulk_len.unwrap_or(auto_bulk);
        MemorySizes {
            memory_budget_bytes: budget,
            max_bulk_len,
            client_query_buffer_limit_bytes: self
                .client_query_buffer_limit_bytes
                .unwrap_or(max_bulk_len * 2),
            client_output_buffer_limit_normal: self.client_output_buffer_limit_normal.unwrap_or(
                OutputLimit {
                    hard: (budget / 2).max(max_bulk_len + 1024 * 1024),
                    soft: budget / 8,
                    soft_seconds: 30,
                },
            ),
        }
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            max_bulk_len: None,
            max_array_len: 1_048_576,
            max_depth: 32,
            max_inline_len: 64 * 1024,
            throttle_max_delay_ms: DEFAULT_THROTTLE_MAX_DELAY_MS,
            max_pipeline: DEFAULT_MAX_PIPELINE,
            client_output_limit_bytes: DEFAULT_CLIENT_OUTPUT_LIMIT,
            client_output_buffer_limit_normal: None,
            client_output_buffer_limit_pubsub: datamesh_proxy::config::DEFAULT_OUTPUT_PUBSUB,
            client_query_buffer_limit_bytes: None,
            memory_budget_bytes: None,
            max_clients: datamesh_proxy::config::DEFAULT_MAX_CLIENTS,
            client_idle_timeout_s: 0,
            client_partial_timeout_ms: datamesh_proxy::config::DEFAULT_PARTIAL_TIMEOUT_MS,
            tcp_keepalive_s: datamesh_proxy::config::DEFAULT_TCP_KEEPALIVE_S,
            worker_threads: DEFAULT_WORKER_THREADS,
            default_acl: datamesh_proxy::commands::acl::DEFAULT_TENANT_ACL.to_string(),
            auth_max_failures: datamesh_proxy::config::DEFAULT_AUTH_MAX_FAILURES,
            max_value_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodPolicyConfig {
    pub name: String,
    pub conn_rate: u32,
    pub conn_burst: u32,
    pub cmd_rate: u32,
    pub cmd_burst: u32,
    /// 0: `default_max_connections` / `default_max_dedicated`.
    pub max_connections: u32,
    pub max_dedicated: u32,
    /// Command policy (Redis ACL rules) for every client of the pod, on top of its user's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    /// The service address pods dial (v4-mapped IPv6 folded to IPv4).
    pub address: SocketAddr,
    /// Proxy listener port; 0 = ephemeral.
    pub proxy_port: u16,
    /// Where the proxy forwards.
    pub backend: Backend,
}

impl Config {
    /// The address the proxy listener of `ep` binds (and the rewrite target pods connect to).
    pub fn proxy_bind(&self, ep: &Endpoint) -> SocketAddr {
        match (ep.address, self.proxy_address_v6) {
            (SocketAddr::V6(_), Some(v6)) => SocketAddr::new(IpAddr::V6(v6), ep.proxy_port),
            _ => SocketAddr::new(IpAddr::V4(self.proxy_address), ep.proxy_port),
        }
    }
}

pub const DEFAULT_FAILOPEN_AFTER_MS: u64 = 1000;
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
pub const DEFAULT_BYPASS_MARK: u32 = 0x444d;
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 5000;
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15090";
pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const DEFAULT_POD_LOG_DIR: &str = "/var/log/pods";
pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/datamesh/upgrade.sock";
/// Largest secret file the agent reads (a password or token, not a document).
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret from a file: the whole file, one trailing newline (`\n` or `\r\n`) cut.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    if !path.is_absolute() {
        return Err(format!("{} must be an absolute path", path.display()));
    }
    let md = std::fs::metadata(path).map_err(|e| {
        format!(
            "cannot read {}: {e} (is the Secret mounted?)",
            path.display()
        )
    })?;
    if !md.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    if md.len() > MAX_SECRET_FILE {
        return Err(format!(
            "{} is {} bytes, more than a secret ({MAX_SECRET_FILE} bytes at most)",
            path.display(),
            md.len()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(text.to_string())
}

/// A secret given inline (`<field>`) or in a file (`<field>_file`), never both. `empty_hint`
/// completes the error for an empty inline value. File reads land in `files`.
fn secret_field(
    inline: Option<&String>,
    file: Option<&PathBuf>,
    field: &str,
    empty_hint: &str,
    err: &mut impl FnMut(&str, String),
    files: &mut BTreeMap<String, PathBuf>,
) -> Option<Secret> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            err(
                &format!("{field}_file"),
                format!("set together with {field}: use one of them"),
            );
            None
        }
        (Some(p), None) if p.is_empty() => {
            err(field, format!("empty: {empty_hint}"));
            None
        }
        (Some(p), None) => Some(Secret(p.clone())),
        (None, Some(path)) => match read_secret_file(path) {
            Ok(v) => {
                files.insert(field.to_string(), path.clone());
                Some(Secret(v))
            }
            Err(e) => {
                err(&format!("{field}_file"), e);
                None
            }
        },
        (None, None) => None,
    }
}

/// Reads, parses and validates a config file; the env override is applied.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let raw = parse_file(path)?;
    let env = std::env::var(PROXY_ADDRESS_ENV)
        .ok()
        .filter(|s| !s.is_empty());
    raw.validate(env.as_deref(), detect_cgroup2_root)
        .map_err(|errors| ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        })
}

/// Parses a config file by its extension.
pub fn parse_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "yaml" | "yml" => parse_yaml(&text).map_err(|source| ConfigError::Yaml {
            path: path.to_path_buf(),
            source,
        }),
        "toml" => parse_toml(&text).map_err(|source| ConfigError::Toml {
            path: path.to_path_buf(),
            source,
        }),
        _ => Err(ConfigError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

pub fn parse_yaml(text: &str) -> Result<RawConfig, serde_yaml::Error> {
    // An empty document is an empty config (every field then reports what it misses).
    if text.trim().is_empty() {
        return Ok(RawConfig::default());
    }
    serde_yaml::from_str(text)
}

pub fn parse_toml(text: &str) -> Result<RawConfig, toml::de::Error> {
    toml::from_str(text)
}

/// Finds the cgroup2 mount point in /proc/self/mountinfo.
pub fn detect_cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_root_from_mountinfo(&text)
}

fn cgroup2_root_from_mountinfo(text: &str) -> Option<PathBuf> {
    for line in text.lines() {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source super
        let mut halves = line.splitn(2, " - ");
        let (left, right) = (halves.next()?, halves.next().unwrap_or(""));
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mp) = left.split_whitespace().nth(4) {
            return Some(PathBuf::from(unescape_mountinfo(mp)));
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `ip:port` / `[ip6]:port`, folding v4-mapped IPv6 to IPv4 as the data plane does.
fn parse_socket_addr(s: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = s.trim().parse().ok()?;
    Some(fold_v4_mapped(addr))
}

pub fn fold_v4_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

impl RawConfig {
    /// Checks every field and returns the typed config, or every problem found.
    ///
    /// `env_proxy_address` overrides `proxy_address`; `detect_cgroup` supplies the default
    /// `cgroup_path` (a parameter so tests do not depend on the machine).
    pub fn validate(
        &self,
        env_proxy_address: Option<&str>,
        detect_cgroup: impl FnOnce() -> Option<PathBuf>,
    ) -> Result<Config, Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.to_string(),
                message,
            })
        };
        for k in self.unknown.keys() {
            err(k, "unknown field".into());
        }
        for (i, p) in self.pods.iter().enumerate() {
            for k in p.unknown.keys() {
                err(&format!("pods[{i}].{k}"), "unknown field".into());
            }
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            for k in e.unknown.keys() {
                err(&format!("endpoints[{i}].{k}"), "unknown field".into());
            }
            if let Some(RawBackend::Full(b)) = &e.backend {
                for k in b.unknown.keys() {
                    err(
                        &format!("endpoints[{i}].backend.{k}"),
                        "unknown field".into(),
                    );
                }
            }
        }
        for k in self.capture.unknown.keys() {
            err(&format!("capture.{k}"), "unknown field".into());
        }
        for k in self.proxy.unknown.keys() {
            err(&format!("proxy.{k}"), "unknown field".into());
        }
        for k in self.bigkeys.unknown.keys() {
            err(&format!("bigkeys.{k}"), "unknown field".into());
        }
        for k in self.hotkeys.unknown.keys() {
            err(&format!("hotkeys.{k}"), "unknown field".into());
        }
        for k in self.local_cache.unknown.keys() {
            err(&format!("local_cache.{k}"), "unknown field".into());
        }
        for k in self.attacks.unknown.keys() {
            err(&format!("attacks.{k}"), "unknown field".into());
        }
        for k in self.watchdog.unknown.keys() {
            err(&format!("watchdog.{k}"), "unknown field".into());
        }
        for k in self.debug.unknown.keys() {
            err(&format!("debug.{k}"), "unknown field".into());
        }
        for (i, u) in self.users.iter().enumerate() {
            for k in u.unknown.keys() {
                err(&format!("users[{i}].{k}"), "unknown field".into());
            }
        }

        // proxy_address (env wins, as in Kubernetes where the node IP comes from the downward API)
        let proxy_src = env_proxy_address
            .map(|s| (s, PROXY_ADDRESS_ENV))
            .or(self.proxy_address.as_deref().map(|s| (s, "proxy_address")));
        let proxy_address = match proxy_src {
            None => {
                err(
                    "proxy_address",
                    format!("missing: set it in the config or with {PROXY_ADDRESS_ENV}"),
                );
                None
            }
            Some((s, field)) => {
                match s.trim().parse::<IpAddr>() {
                    Ok(IpAddr::V4(v4))
                        if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() =>
                    {
                        err(field, format!("{s:?} cannot be a connect target: use the node address pods can reach"));
                        None
                    }
                    Ok(IpAddr::V4(v4)) => Some(v4),
                    Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                        Some(v4) => Some(v4),
                        None => {
                            err(field, format!("{s:?} is IPv6: put it in proxy_address_v6"));
                            None
                        }
                    },
                    Err(_) => {
                        err(field, format!("invalid IPv4 address {s:?}"));
                        None
                    }
                }
            }
        };

        let proxy_address_v6 = match self.proxy_address_v6.as_deref() {
            None => None,
            Some(s) => match s.trim().parse::<IpAddr>() {
                Ok(IpAddr::V6(v6)) if !v6.is_unspecified() && v6.to_ipv4_mapped().is_none() => {
                    Some(v6)
                }
                Ok(_) => {
                    err(
                        "proxy_address_v6",
                        format!("{s:?} is not a usable IPv6 address"),
                    );
                    None
                }
                Err(_) => {
                    err("proxy_address_v6", format!("invalid IPv6 address {s:?}"));
                    None
                }
            },
        };

        let cgroup_path = match &self.cgroup_path {
            Some(p) if p.as_os_str().is_empty() => {
                err("cgroup_path", "must not be empty".into());
                None
            }
            Some(p) if !p.is_absolute() => {
                err(
                    "cgroup_path",
                    format!("{} must be an absolute path", p.display()),
                );
                None
            }
            Some(p) => Some(p.clone()),
            None => match detect_cgroup() {
                Some(p) => Some(p),
                None => {
                    err("cgroup_path", "not set and no cgroup2 mount found in /proc/self/mountinfo: is the cgroup2 filesystem mounted?".into());
                    None
                }
            },
        };

        let pin_dir = self
            .pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(datamesh_common::DEFAULT_PIN_DIR));
        if !pin_dir.is_absolute() || pin_dir.parent().is_none() {
            err(
                "pin_dir",
                format!(
                    "{} must be an absolute path below a bpffs mount",
                    pin_dir.display()
                ),
            );
        }

        let failopen_after_ms = self.failopen_after_ms.unwrap_or(DEFAULT_FAILOPEN_AFTER_MS);
        let heartbeat_interval_ms = self
            .heartbeat_interval_ms
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS);
        if heartbeat_interval_ms == 0 {
            err("heartbeat_interval_ms", "must be greater than 0".into());
        }
        if failopen_after_ms <= heartbeat_interval_ms {
            err(
                "failopen_after_ms",
                format!("{failopen_after_ms} must exceed heartbeat_interval_ms ({heartbeat_interval_ms}), or capture would flap off between heartbeats"),
            );
        }
        if failopen_after_ms > u64::MAX / 1_000_000 {
            err(
                "failopen_after_ms",
                format!("{failopen_after_ms} is too large"),
            );
        }

        let bypass_mark = self.bypass_mark.unwrap_or(DEFAULT_BYPASS_MARK);
        let skip_host_network = self.skip_host_network.unwrap_or(true);
        if bypass_mark == 0 && !skip_host_network {
            err("bypass_mark", "0 together with skip_host_network: false would let the proxy capture its own upstream connects (a loop)".into());
        }

        let admin_listen_s = self
            .admin_listen
            .clone()
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
        let admin_listen = match admin_listen_s.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                err(
                    "admin_listen",
                    format!("invalid socket address {admin_listen_s:?}"),
                );
                None
            }
        };
        let mut password_files = BTreeMap::new();
        let admin_allow_remote = self.admin_allow_remote.unwrap_or(false);
        let admin_token = self.admin_token_file.as_ref().and_then(|p| {
            read_secret_file(p)
                .map_err(|e| err("admin_token_file", e))
                .ok()
                .map(Secret)
        });
        if let Some(a) = admin_listen {
            if !a.ip().is_loopback() && !admin_allow_remote {
                err(
                    "admin_listen",
                    format!("{a} is not a loopback address: pods could then read /config_dump, /connections and /backends; listen on 127.0.0.1, or set admin_allow_remote: true together with admin_token_file"),
                );
            }
            if !a.ip().is_loopback() && admin_allow_remote && self.admin_token_file.is_none() {
                err(
                    "admin_token_file",
                    format!("required when admin_listen ({a}) is not loopback: every admin request must then carry Authorization: Bearer <token>"),
                );
            }
        }
        let uncaptured = match self.uncaptured.as_deref() {
            None => UncapturedMode::default(),
            Some(s) => s.parse().unwrap_or_else(|e| {
                err("uncaptured", e);
                UncapturedMode::default()
            }),
        };
        let mut uncaptured_allow = Vec::new();
        for (i, c) in self.uncaptured_allow.iter().enumerate() {
            match c.parse::<Cidr>() {
                Ok(c) => uncaptured_allow.push(c),
                Err(e) => err(&format!("uncaptured_allow[{i}]"), e),
            }
        }

        let netns_dir = self
            .netns_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_NETNS_DIR));
        let cgroup_root = self
            .cgroup_root
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CGROUP_ROOT));
        let pod_log_dir = self
            .pod_log_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_POD_LOG_DIR));
        let upgrade_socket = self
            .upgrade_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCKET));
        for (f, p) in [
            ("cgroup_root", &cgroup_root),
            ("pod_log_dir", &pod_log_dir),
            ("upgrade_socket", &upgrade_socket),
        ] {
            if !p.is_absolute() {
                err(f, format!("{} is not an absolute path", p.display()));
            }
        }
        // sun_path holds 107 bytes and a NUL.
        if upgrade_socket.as_os_str().len() > 107 {
            err(
                "upgrade_socket",
                format!(
                    "{} is longer than a Unix socket path may be (107 bytes)",
                    upgrade_socket.display()
                ),
            );
        }
        let capture = validate_capture(&self.capture, &mut err);
        let default_conn_rate = self.default_conn_rate.unwrap_or(0);
        let default_conn_burst = self.default_conn_burst.unwrap_or(0);
        if default_conn_rate == 0 && default_conn_burst != 0 {
            err(
                "default_conn_burst",
                "set without default_conn_rate (0 = unlimited ignores the burst)".into(),
            );
        }

        // pods
        let mut pods = Vec::new();
        let mut pod_names = HashSet::new();
        for (i, p) in self.pods.iter().enumerate() {
            let field = |f: &str| format!("pods[{i}].{f}");
            if p.name.trim().is_empty() {
                err(&field("name"), "must not be empty".into());
            } else if !pod_names.insert(p.name.clone()) {
                err(&field("name"), format!("duplicate pod name {:?}", p.name));
            } else if p.name.len() > 255 {
                err(&field("name"), "longer than 255 bytes".into());
            }
            if p.conn_rate == 0 && p.conn_burst != 0 {
                err(
                    &field("conn_burst"),
                    "set without conn_rate (0 = unlimited ignores the burst)".into(),
                );
            }
            if p.cmd_rate == 0 && p.cmd_burst != 0 {
                err(
                    &field("cmd_burst"),
                    "set without cmd_rate (0 = unlimited ignores the burst)".into(),
                );
            }
            if let Some(rules) = &p.acl {
                if let Err(e) = datamesh_proxy::commands::acl::Policy::parse(rules) {
                    err(&field("acl"), e.to_string());
                }
            }
            pods.push(PodPolicyConfig {
                name: p.name.clone(),
                conn_rate: p.conn_rate,
                conn_burst: p.conn_burst,
                cmd_rate: p.cmd_rate,
                cmd_burst: p.cmd_burst,
                max_connections: p.max_connections,
                max_dedicated: p.max_dedicated,
                acl: p.acl.clone(),
            });
        }

        // endpoints
        if self.endpoints.is_empty() {
            err("endpoints", "at least one endpoint is required".into());
        }
        // Each endpoint takes two dm_endpoints entries: its address and its listener.
        if self.endpoints.len() > datamesh_common::ENDPOINTS_MAX as usize / 2 {
            err(
                "endpoints",
                format!("more than {} endpoints", datamesh_common::ENDPOINTS_MAX / 2),
            );
        }
        let mut endpoints = Vec::new();
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut proxy_ports = HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let field = |f: &str| format!("endpoints[{i}].{f}");
            if e.name.trim().is_empty() {
                err(&field("name"), "must not be empty".into());
            } else if !names.insert(e.name.clone()) {
                err(
                    &field("name"),
                    format!("duplicate endpoint name {:?}", e.name),
                );
            }
            let address = match parse_socket_addr(&e.address) {
                None => {
                    err(
                        &field("address"),
                        format!("invalid socket address {:?}", e.address),
                    );
                    None
                }
                Some(a) if a.port() == 0 || a.ip().is_unspecified() => {
                    err(
                        &field("address"),
                        format!(
                            "{:?} needs a concrete address and a non-zero port",
                            e.address
                        ),
                    );
                    None
                }
                Some(a) => {
                    if !addrs.insert(a) {
                        err(&field("address"), format!("duplicate endpoint address {a}"));
                    }
                    if a.is_ipv6() && self.proxy_address_v6.is_none() {
                        err(
                            &field("address"),
                            format!("{a} is IPv6 but proxy_address_v6 is not set"),
                        );
                    }
                    Some(a)
                }
            };
            if e.proxy_port != 0 && !proxy_ports.insert(e.proxy_port) {
                err(
                    &field("proxy_port"),
                    format!("duplicate proxy_port {}", e.proxy_port),
                );
            }
            let backend = match &e.backend {
                None => address.map(Backend::standalone),
                Some(RawBackend::Address(b)) => match parse_socket_addr(b) {
                    Some(a) if a.port() != 0 && !a.ip().is_unspecified() => {
                        Some(Backend::standalone(a))
                    }
                    Some(_) => {
                        err(
                            &field("backend"),
                            format!("{b:?} needs a concrete address and a non-zero port"),
                        );
                        None
                    }
                    None => {
                        err(&field("backend"), format!("invalid socket address {b:?}"));
                        None
                    }
                },
                Some(RawBackend::Full(b)) => {
                    validate_backend(b, address, &field("backend"), &mut err, &mut password_files)
                }
            };
            if let (Some(address), Some(backend)) = (address, backend) {
                endpoints.push(Endpoint {
                    name: e.name.clone(),
                    address,
                    proxy_port: e.proxy_port,
                    backend,
                });
            }
        }

        let default_cmd_rate = self.default_cmd_rate.unwrap_or(0);
        let default_cmd_burst = self.default_cmd_burst.unwrap_or(0);
        if default_cmd_rate == 0 && default_cmd_burst != 0 {
            err(
                "default_cmd_burst",
                "set without default_cmd_rate (0 = unlimited ignores the burst)".into(),
            );
        }
        let proxy = validate_proxy(&self.proxy, &mut err);
        let bigkeys = validate_bigkeys(&self.bigkeys, &mut err);
        let hotkeys = validate_hotkeys(&self.hotkeys, &mut err);
        let key_rules = self.validate_key_rules(&mut err);
        let local_cache = validate_local_cache(&self.local_cache, &hotkeys, &endpoints, &mut err);
        let attacks = validate_attacks(&self.attacks, &mut err);
        let watchdog = validate_watchdog(&self.watchdog, &mut err);
        let debug = DebugConfig {
            fault_injection: self.debug.fault_injection.unwrap_or(false),
        };
        let mut users = Vec::new();
        let mut user_names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let field = |f: &str| format!("users[{i}].{f}");
            if u.name.is_empty() || u.name.bytes().any(|b| b.is_ascii_whitespace()) {
                err(
                    &field("name"),
                    format!("{:?} must be non-empty without blanks", u.name),
                );
            } else if !user_names.insert(u.name.clone()) {
                err(&field("name"), format!("duplicate user {:?}", u.name));
            }
            let password = secret_field(
                u.password.as_ref(),
                u.password_file.as_ref(),
                &field("password"),
                "leave it out for a user without password",
                &mut err,
                &mut password_files,
            );
            users.push(User {
                name: u.name.clone(),
                password,
                acl: u.acl.clone(),
            });
        }
        // Command policies: every bad rule of every user and of the default, with its field.
        if let Err(errs) = datamesh_proxy::config::AclSettings::build(&users, &proxy.default_acl) {
            for (field, e) in errs {
                err(&field, e.to_string());
            }
        }

        match (proxy_address, cgroup_path, admin_listen) {
            (Some(proxy_address), Some(cgroup_path), Some(admin_listen)) if errs.is_empty() => {
                Ok(Config {
                    proxy_address,
                    proxy_address_v6,
                    cgroup_path,
                    pin_dir,
                    fastpath: self.fastpath.unwrap_or(false),
                    failopen_after_ms,
                    heartbeat_interval_ms,
                    bypass_mark,
                    skip_host_network,
                    drain_timeout_ms: self.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS),
                    admin_listen,
                    admin_allow_remote,
                    admin_token_file: self.admin_token_file.clone(),
                    admin_token,
                    uncaptured,
                    uncaptured_allow,
                    netns_dir,
                    cgroup_root,
                    pod_log_dir,
                    upgrade_socket,
                    capture,
                    default_conn_rate,
                    default_conn_burst,
                    default_cmd_rate,
                    default_cmd_burst,
                    default_max_connections: self
                        .default_max_connections
                        .unwrap_or(DEFAULT_POD_MAX_CONNECTIONS),
                    default_max_dedicated: self
                        .default_max_dedicated
                        .unwrap_or(DEFAULT_POD_MAX_DEDICATED),
                    proxy,
                    bigkeys,
                    hotkeys,
                    key_rules,
                    local_cache,
                    attacks,
                    watchdog,
                    debug,
                    users,
                    pods,
                    endpoints,
                    password_files,
                })
            }
            _ => Err(errs),
        }
    }
}

impl RawConfig {
    /// `key_rules:`: every bad field of every rule, ids unique (default `rule-N`, N from 1).
    fn validate_key_rules(&self, err: &mut impl FnMut(&str, String)) -> Vec<RuleSpec> {
        let names: Vec<&str> = self.endpoints.iter().map(|e| e.name.as_str()).collect();
        let mut out: Vec<RuleSpec> = Vec::new();
        let mut ids = HashSet::new();
        for (i, r) in self.key_rules.iter().enumerate() {
            let at = format!("key_rules[{i}]");
            let default_id = format!("rule-{}", i + 1);
            let id = r.id.clone().unwrap_or_else(|| default_id.clone());
            if !ids.insert(id.clone()) {
                err(&format!("{at}.id"), format!("duplicate rule id {id:?}"));
            }
            let spec = validate_rule(r, &at, &names, &default_id, &mut |f: &str, m: String| {
                err(f, m)
            });
            out.extend(spec);
        }
        if out.len() > datamesh_proxy::keyrules::MAX_RULES {
            err(
                "key_rules",
                format!(
                    "{} rules: at most {}",
                    out.len(),
                    datamesh_proxy::keyrules::MAX_RULES
                ),
            );
        }
        out
    }
}

/// `bigkeys:` (0 turns a threshold off; a low one would list ordinary replies as big).
fn validate_capture(c: &RawCapture, err: &mut impl FnMut(&str, String)) -> CaptureConfig {
    let mode = match c.mode.as_deref() {
        None | Some("all") => CaptureMode::All,
        Some("selected") => CaptureMode::Selected,
        Some(other) => {
            err(
                "capture.mode",
                format!("{other:?} is not a mode: all (every pod but `exclude`) or selected (only `namespaces` and `pods`)"),
            );
            CaptureMode::All
        }
    };
    for (list, name) in [
        (&c.namespaces, "namespaces"),
        (&c.pods, "pods"),
        (&c.exclude, "exclude"),
    ] {
        for (i, g) in list.iter().enumerate() {
            if g.trim().is_empty() {
                err(&format!("capture.{name}[{i}]"), "empty glob".into());
            } else if g.len() > 255 {
                err(
                    &format!("capture.{name}[{i}]"),
                    "longer than 255 bytes".into(),
                );
            }
        }
    }
    if mode == CaptureMode::All && !(c.namespaces.is_empty() && c.pods.is_empty()) {
        err(
            "capture.mode",
            "namespaces/pods select pods only with mode: selected (mode all captures every pod but `exclude`)".into(),
        );
    }
    if mode == CaptureMode::Selected && c.namespaces.is_empty() && c.pods.is_empty() {
        err(
            "capture.mode",
            "selected without namespaces or pods captures no pod (use capture.namespaces / capture.pods)".into(),
        );
    }
    CaptureConfig {
        mode,
        namespaces: c.namespaces.clone(),
        pods: c.pods.clone(),
        exclude: c.exclude.clone(),
    }
}

fn validate_bigkeys(b: &RawBigKeys, err: &mut impl FnMut(&str, String)) -> BigKeysConfig {
    let d = BigKeysConfig::default();
    let out = BigKeysConfig {
        reply_bytes: b.reply_bytes.unwrap_or(d.reply_bytes),
        reply_elements: b.reply_elements.unwrap_or(d.reply_elements),
        key_display: match b.key_display.as_deref() {
            None => d.key_display,
            Some(s) => KeyDisplay::parse(s).unwrap_or_else(|| {
                err(
                    "bigkeys.key_display",
                    format!("{s:?} must be raw, truncated or hashed"),
                );
                d.key_display
            }),
        },
        refuse: b.refuse.unwrap_or(d.refuse),
        refuse_s: b.refuse_s.unwrap_or(d.refuse_s),
    };
    if !(1..=86_400).contains(&out.refuse_s) {
        err(
            "bigkeys.refuse_s",
            format!(
                "{}: must be 1 to 86400 (how long a key that gave a big reply stays refused)",
                out.refuse_s
            ),
        );
    }
    if out.refuse && out.reply_bytes == 0 && out.reply_elements == 0 {
        err(
            "bigkeys.refuse",
            "true with reply_bytes and reply_elements both 0: no reply is ever big, so nothing would be refused".into(),
        );
    }
    if out.reply_bytes != 0 && out.reply_bytes < 1024 {
        err(
            "bigkeys.reply_bytes",
            format!(
                "{} is below 1 KiB: ordinary replies would be listed as big (0 = no byte threshold)",
                out.reply_bytes
            ),
        );
    }
    if out.reply_elements != 0 && out.reply_elements < 16 {
        err(
            "bigkeys.reply_elements",
            format!(
                "{} is below 16: ordinary replies would be listed as big (0 = no element threshold)",
                out.reply_elements
            ),
        );
    }
    out
}

/// Longest `local_cache.ttl_ms`: the TTL bounds how stale a value can be if every
/// invalidation path failed, so it stays short.
pub const MAX_LOCAL_CACHE_TTL_MS: u64 = 60_000;

fn validate_local_cache(
    c: &RawLocalCache,
    hotkeys: &HotKeySettings,
    endpoints: &[Endpoint],
    err: &mut impl FnMut(&str, String),
) -> LocalCacheSettings {
    let d = LocalCacheSettings::default();
    let out = LocalCacheSettings {
        enabled: c.enabled.unwrap_or(d.enabled),
        endpoints: c.endpoints.clone().unwrap_or_default(),
        min_ops: c.min_ops.unwrap_or(d.min_ops),
        min_read_ratio: c.min_read_ratio.unwrap_or(d.min_read_ratio),
        ttl_ms: c.ttl_ms.unwrap_or(d.ttl_ms),
        max_bytes: c.max_bytes.unwrap_or(d.max_bytes),
        max_keys: c.max_keys.unwrap_or(d.max_keys),
        max_value_bytes: c.max_value_bytes.unwrap_or(d.max_value_bytes),
    };
    if out.enabled && !hotkeys.enabled {
        err(
            "local_cache.enabled",
            "true while hotkeys.enabled is false: the cache holds only keys the hot-key detector finds; turn hotkeys on".into(),
        );
    }
    for (i, name) in out.endpoints.iter().enumerate() {
        match endpoints.iter().find(|e| &e.name == name) {
            None => err(
                &format!("local_cache.endpoints[{i}]"),
                format!("{name:?} is not an endpoint name"),
            ),
            Some(e) if e.backend.kind_name() == "cluster" => err(
                &format!("local_cache.endpoints[{i}]"),
                format!("{name:?} has a cluster backend: the local cache serves standalone and Sentinel endpoints only"),
            ),
            Some(_) => {}
        }
    }
    if out.min_ops == 0 {
        err(
            "local_cache.min_ops",
            "0: a key must be hot to be cached (ops/s as /hotkeys shows them)".into(),
        );
    }
    if !(0.0..=1.0).contains(&out.min_read_ratio) {
        err(
            "local_cache.min_read_ratio",
            format!(
                "{}: must be between 0 and 1 (the share of reads among a key's reads and writes)",
                out.min_read_ratio
            ),
        );
    }
    if !(1..=MAX_LOCAL_CACHE_TTL_MS).contains(&out.ttl_ms) {
        err(
            "local_cache.ttl_ms",
            format!(
                "{}: must be 1 to {MAX_LOCAL_CACHE_TTL_MS} (the bound on staleness if invalidation fails)",
                out.ttl_ms
            ),
        );
    }
    if out.max_keys == 0 {
        err(
            "local_cache.max_keys",
            "0: use local_cache.enabled: false to turn the cache off".into(),
        );
    }
    if out.max_bytes == 0 {
        err(
            "local_cache.max_bytes",
            "0: use local_cache.enabled: false to turn the cache off".into(),
        );
    }
    if out.max_value_bytes == 0 || out.max_value_bytes > out.max_bytes {
        err(
            "local_cache.max_value_bytes",
            format!(
                "{}: must be 1 to local_cache.max_bytes ({})",
                out.max_value_bytes, out.max_bytes
            ),
        );
    }
    LocalCacheSettings {
        // NaN never reaches the proxy (Eq relies on it).
        min_read_ratio: if out.min_read_ratio.is_nan() {
            d.min_read_ratio
        } else {
            out.min_read_ratio
        },
        ..out
    }
}

/// Largest `hotkeys.capacity` (each counter holds up to 512 key bytes, twice: two epochs).
pub const MAX_HOTKEYS_CAPACITY: u32 = 4096;

fn validate_hotkeys(h: &RawHotKeys, err: &mut impl FnMut(&str, String)) -> HotKeySettings {
    let d = HotKeySettings::default();
    let out = HotKeySettings {
        enabled: h.enabled.unwrap_or(d.enabled),
        sample_rate: h.sample_rate.unwrap_or(d.sample_rate),
        top_k: h.top_k.unwrap_or(d.top_k),
        capacity: h.capacity.unwrap_or(d.capacity.max(h.top_k.unwrap_or(0))),
        window_s: h.window_s.unwrap_or(d.window_s),
        key_display: d.key_display,
        metrics_top: h.metrics_top.unwrap_or(d.metrics_top),
        auto_throttle_ops: h.auto_throttle_ops.unwrap_or(d.auto_throttle_ops),
        auto_throttle_s: h.auto_throttle_s.unwrap_or(d.auto_throttle_s),
    };
    if out.auto_throttle_ops > 0 && !out.enabled {
        err(
            "hotkeys.auto_throttle_ops",
            "set while hotkeys.enabled is false: the automatic throttle acts on what detection sees".into(),
        );
    }
    if !(1..=86_400).contains(&out.auto_throttle_s) {
        err(
            "hotkeys.auto_throttle_s",
            format!(
                "{}: must be 1 to 86400 seconds (how long an automatic throttle rule lasts)",
                out.auto_throttle_s
            ),
        );
    }
    let key_display = match h.key_display.as_deref() {
        None => d.key_display,
        Some(s) => KeyDisplay::parse(s).unwrap_or_else(|| {
            err(
                "hotkeys.key_display",
                format!("{s:?} is not raw, truncated or hashed"),
            );
            d.key_display
        }),
    };
    if out.sample_rate == 0 {
        err(
            "hotkeys.sample_rate",
            "0: sample one command in N (1 = every command); use hotkeys.enabled: false to turn detection off".into(),
        );
    }
    if out.top_k == 0 {
        err("hotkeys.top_k", "0: show at least one key".into());
    }
    if out.capacity < out.top_k || out.capacity > MAX_HOTKEYS_CAPACITY {
        err(
            "hotkeys.capacity",
            format!(
                "{}: must be between hotkeys.top_k ({}) and {MAX_HOTKEYS_CAPACITY} (the sketch's counters; about 4 times top_k keeps the top keys exact)",
                out.capacity, out.top_k
            ),
        );
    }
    if !(2..=3600).contains(&out.window_s) {
        err(
            "hotkeys.window_s",
            format!("{}: must be 2 to 3600 seconds", out.window_s),
        );
    }
    if out.metrics_top > out.top_k {
        err(
            "hotkeys.metrics_top",
            format!(
                "{}: above hotkeys.top_k ({}); each exported key is a time series",
                out.metrics_top, out.top_k
            ),
        );
    }
    HotKeySettings { key_display, ..out }
}

/// Largest `attacks.window_s` (the window keeps one total per second per pod and endpoint).
pub const MAX_ATTACKS_WINDOW_S: u32 = 3600;

fn validate_attacks(a: &RawAttacks, err: &mut impl FnMut(&str, String)) -> AttackSettings {
    let d = AttackSettings::default();
    let out = AttackSettings {
        enabled: a.enabled.unwrap_or(d.enabled),
        window_s: a.window_s.unwrap_or(d.window_s),
        penetration_min_reads: a.penetration_min_reads.unwrap_or(d.penetration_min_reads),
        penetration_miss_ratio: a.penetration_miss_ratio.unwrap_or(d.penetration_miss_ratio),
        scan_max_per_s: a.scan_max_per_s.unwrap_or(d.scan_max_per_s),
        auto_throttle: a.auto_throttle.unwrap_or(d.auto_throttle),
        auto_throttle_rate: a.auto_throttle_rate.unwrap_or(d.auto_throttle_rate),
        auto_throttle_s: a.auto_throttle_s.unwrap_or(d.auto_throttle_s),
    };
    if !(1..=MAX_ATTACKS_WINDOW_S).contains(&out.window_s) {
        err(
            "attacks.window_s",
            format!(
                "{}: must be 1 to {MAX_ATTACKS_WINDOW_S} seconds",
                out.window_s
            ),
        );
    }
    if out.penetration_min_reads == 0 {
        err(
            "attacks.penetration_min_reads",
            "0: a single missed GET would make a pod suspected; use attacks.enabled: false to turn detection off".into(),
        );
    }
    let r = out.penetration_miss_ratio;
    if !(r.is_finite() && r > 0.0 && r <= 1.0) {
        err(
            "attacks.penetration_miss_ratio",
            format!("{r}: must be a fraction above 0 and at most 1 (0.9 = 90 % of lookups miss)"),
        );
    }
    if out.scan_max_per_s == 0 {
        err(
            "attacks.scan_max_per_s",
            "0: every SCAN would make a pod suspected; use attacks.enabled: false to turn detection off".into(),
        );
    }
    if out.auto_throttle_rate == 0 {
        err(
            "attacks.auto_throttle_rate",
            "0: a throttled pod could run no command at all; give its commands/s (use attacks.auto_throttle: false to not throttle)".into(),
        );
    }
    if !(1..=86_400).contains(&out.auto_throttle_s) {
        err(
            "attacks.auto_throttle_s",
            format!("{}: must be 1 to 86400 seconds", out.auto_throttle_s),
        );
    }
    AttackSettings {
        // An invalid ratio is reported above; keep a comparable value meanwhile.
        penetration_miss_ratio: if r.is_finite() {
            r
        } else {
            d.penetration_miss_ratio
        },
        ..out
    }
}

fn validate_proxy(p: &RawProxy, err: &mut impl FnMut(&str, String)) -> ProxySettings {
    let d = ProxySettings::default();
    let limit = |field: &str,
                 v: &Option<String>,
                 default: Option<OutputLimit>,
                 err: &mut dyn FnMut(&str, String)| match v {
        None => default,
        Some(s) => match parse_output_limit(s) {
            Ok(l) => {
                if l.hard != 0 && l.soft > l.hard {
                    err(
                        field,
                        format!("{s:?}: the soft limit is above the hard limit"),
                    );
                }
                Some(l)
            }
            Err(e) => {
                err(field, e);
                default
            }
        },
    };
    let normal = limit(
        "proxy.client_output_buffer_limit_normal",
        &p.client_output_buffer_limit_normal,
        None,
        err,
    );
    let pubsub = limit(
        "proxy.client_output_buffer_limit_pubsub",
        &p.client_output_buffer_limit_pubsub,
        Some(d.client_output_buffer_limit_pubsub),
        err,
    )
    .unwrap_or(d.client_output_buffer_limit_pubsub);
    let out = ProxySettings {
        max_bulk_len: p.max_bulk_len,
        max_array_len: p.max_array_len.unwrap_or(d.max_array_len),
        max_depth: p.max_depth.unwrap_or(d.max_depth),
        max_inline_len: p.max_inline_len.unwrap_or(d.max_inline_len),
        throttle_max_delay_ms: p.throttle_max_delay_ms.unwrap_or(d.throttle_max_delay_ms),
        max_pipeline: p.max_pipeline.unwrap_or(d.max_pipeline),
        client_output_limit_bytes: p
            .client_output_limit_bytes
            .unwrap_or(d.client_output_limit_bytes),
        client_output_buffer_limit_normal: normal,
        client_output_buffer_limit_pubsub: pubsub,
        client_query_buffer_limit_bytes: p.client_query_buffer_limit_bytes,
        memory_budget_bytes: p.memory_budget_bytes,
        max_clients: p.max_clients.unwrap_or(d.max_clients),
        client_idle_timeout_s: p.client_idle_timeout_s.unwrap_or(d.client_idle_timeout_s),
        client_partial_timeout_ms: p
            .client_partial_timeout_ms
            .unwrap_or(d.client_partial_timeout_ms),
        tcp_keepalive_s: p.tcp_keepalive_s.unwrap_or(d.tcp_keepalive_s),
        worker_threads: p.worker_threads.unwrap_or(d.worker_threads),
        default_acl: p.default_acl.clone().unwrap_or(d.default_acl),
        auth_max_failures: p.auth_max_failures.unwrap_or(d.auth_max_failures),
        max_value_bytes: p.max_value_bytes.unwrap_or(d.max_value_bytes),
    };
    if let Some(b) = out.max_bulk_len {
        if out.max_value_bytes > b {
            err(
                "proxy.max_value_bytes",
                format!(
                    "{} is above max_bulk_len ({b}): larger bulks are refused by the decoder already (and close the connection), so this guard would never apply",
                    out.max_value_bytes
                ),
            );
        }
    }
    if out.worker_threads == 0 || out.worker_threads > 256 {
        err(
            "proxy.worker_threads",
            format!("{} must be between 1 and 256", out.worker_threads),
        );
    }
    if let Some(b) = out
        .max_bulk_len
        .filter(|b| *b == 0 || *b > 4 * 1024 * 1024 * 1024)
    {
        err(
            "proxy.max_bulk_len",
            format!("{b} must be between 1 and 4 GiB"),
        );
    }
    if let Some(b) = out
        .memory_budget_bytes
        .filter(|b| *b != 0 && *b < 16 * 1024 * 1024)
    {
        err(
            "proxy.memory_budget_bytes",
            format!("{b} is below 16 MiB: ordinary replies would get clients shed (0 = no budget)"),
        );
    }
    // Checked on the sizes as they would be resolved with no container limit; the start-up
    // resolution with the real limit is logged.
    let m = out.memory(None);
    if m.client_query_buffer_limit_bytes < m.max_bulk_len + 64 * 1024 {
        err(
            "proxy.client_query_buffer_limit_bytes",
            format!(
                "{} is below max_bulk_len ({}) + 64 KiB: the largest command allowed could not be read",
                m.client_query_buffer_limit_bytes, m.max_bulk_len
            ),
        );
    }
    if out.client_partial_timeout_ms != 0 && out.client_partial_timeout_ms < 100 {
        err(
            "proxy.client_partial_timeout_ms",
            format!(
                "{} is below 100 ms (0 = no deadline)",
                out.client_partial_timeout_ms
            ),
        );
    }
    if out.max_array_len == 0 || out.max_array_len > i32::MAX as u64 {
        err(
            "proxy.max_array_len",
            format!("{} must be between 1 and {}", out.max_array_len, i32::MAX),
        );
    }
    if out.max_depth == 0 || out.max_depth > 1024 {
        err(
            "proxy.max_depth",
            format!("{} must be between 1 and 1024", out.max_depth),
        );
    }
    if out.max_inline_len < 64 || out.max_inline_len > 64 * 1024 * 1024 {
        err(
            "proxy.max_inline_len",
            format!("{} must be between 64 and 64 MiB", out.max_inline_len),
        );
    }
    if out.throttle_max_delay_ms > 60_000 {
        err(
            "proxy.throttle_max_delay_ms",
            format!(
                "{} is more than a minute: clients would time out first",
                out.throttle_max_delay_ms
            ),
        );
    }
    if out.max_pipeline == 0 {
        err("proxy.max_pipeline", "must be at least 1".into());
    }
    if out.client_output_limit_bytes < 64 * 1024 {
        err(
            "proxy.client_output_limit_bytes",
            format!(
                "{} is below 64 KiB: pipelined clients would stall on every reply",
                out.client_output_limit_bytes
            ),
        );
    }
    out
}

fn parse_addr_list(
    list: &[String],
    field: &str,
    err: &mut impl FnMut(&str, String),
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (j, s) in list.iter().enumerate() {
        match parse_socket_addr(s) {
            Some(a) if a.port() != 0 && !a.ip().is_unspecified() => {
                if out.contains(&a) {
                    err(&format!("{field}[{j}]"), format!("duplicate address {a}"));
                }
                out.push(a)
            }
            _ => err(
                &format!("{field}[{j}]"),
                format!("invalid socket address {s:?}"),
            ),
        }
    }
    if list.is_empty() {
        err(field, "needs at least one address".into());
    }
    out
}

/// Checks a `backend:` map. `address` is the endpoint address (the standalone default).
fn validate_backend(
    b: &RawBackendMap,
    address: Option<SocketAddr>,
    field: &str,
    err: &mut impl FnMut(&str, String),
    password_files: &mut BTreeMap<String, PathBuf>,
) -> Option<Backend> {
    let f = |k: &str| format!("{field}.{k}");
    let kind_name = b.kind.as_deref().unwrap_or("standalone");
    let wrong_for = |k: &str, set: bool, err: &mut dyn FnMut(&str, String)| {
        if set {
            err(&f(k), format!("not used by kind {kind_name}"));
        }
    };
    let kind = match kind_name {
        "standalone" => {
            wrong_for("sentinels", b.sentinels.is_some(), err);
            wrong_for("master_name", b.master_name.is_some(), err);
            wrong_for("nodes", b.nodes.is_some(), err);
            wrong_for("read_from_replicas", b.read_from_replicas.is_some(), err);
            wrong_for("sentinel_password", b.sentinel_password.is_some(), err);
            wrong_for(
                "sentinel_password_file",
                b.sentinel_password_file.is_some(),
                err,
            );
            wrong_for("sentinel_username", b.sentinel_username.is_some(), err);
            let a = match &b.address {
                None => address,
                Some(s) => match parse_socket_addr(s) {
                    Some(a) if a.port() != 0 && !a.ip().is_unspecified() => Some(a),
                    _ => {
                        err(&f("address"), format!("invalid socket address {s:?}"));
                        None
                    }
                },
            };
            let standby = match &b.standby {
                Some(list) => parse_addr_list(list, &f("standby"), err),
                None => Vec::new(),
            };
            if a.is_some_and(|a| standby.contains(&a)) {
                err(&f("standby"), "lists the primary address itself".into());
            }
            let standby_after_ms = b.standby_after_ms.unwrap_or(DEFAULT_STANDBY_AFTER_MS);
            if standby_after_ms > 600_000 {
                err(
                    &f("standby_after_ms"),
                    format!("{standby_after_ms} must be at most 600000"),
                );
            }
            a.map(|address| BackendKind::Standalone {
                address,
                standby,
                standby_after_ms,
            })
        }
        "sentinel" => {
            wrong_for("address", b.address.is_some(), err);
            wrong_for("nodes", b.nodes.is_some(), err);
            wrong_for("standby", b.standby.is_some(), err);
            wrong_for("standby_after_ms", b.standby_after_ms.is_some(), err);
            let sentinels =
                parse_addr_list(b.sentinels.as_deref().unwrap_or(&[]), &f("sentinels"), err);
            let sentinel_password = secret_field(
                b.sentinel_password.as_ref(),
                b.sentinel_password_file.as_ref(),
                &f("sentinel_password"),
                "leave it out for sentinels without AUTH",
                err,
                password_files,
            );
            let master_name = b.master_name.clone().unwrap_or_default();
            if master_name.is_empty() {
                err(&f("master_name"), "required for kind sentinel".into());
            }
            (!sentinels.is_empty() && !master_name.is_empty()).then(|| BackendKind::Sentinel {
                sentinels,
                master_name,
                read_from_replicas: b.read_from_replicas.unwrap_or(false),
                sentinel_username: b.sentinel_username.clone(),
                sentinel_password,
            })
        }
        "cluster" => {
            wrong_for("address", b.address.is_some(), err);
            wrong_for("standby", b.standby.is_some(), err);
            wrong_for("standby_after_ms", b.standby_after_ms.is_some(), err);
            wrong_for("sentinels", b.sentinels.is_some(), err);
            wrong_for("master_name", b.master_name.is_some(), err);
            wrong_for("sentinel_password", b.sentinel_password.is_some(), err);
            wrong_for(
                "sentinel_password_file",
                b.sentinel_password_file.is_some(),
                err,
            );
            wrong_for("sentinel_username", b.sentinel_username.is_some(), err);
            let nodes = parse_addr_list(b.nodes.as_deref().unwrap_or(&[]), &f("nodes"), err);
            if b.databases.is_some_and(|d| d != 1) {
                err(
                    &f("databases"),
                    "a Redis Cluster has only database 0: leave it out or set 1".into(),
                );
            }
            (!nodes.is_empty()).then(|| BackendKind::Cluster {
                nodes,
                read_from_replicas: b.read_from_replicas.unwrap_or(false),
            })
        }
        other => {
            err(
                &f("kind"),
                format!("{other:?} is not one of standalone, sentinel, cluster"),
            );
            None
        }
    };
    let pool_size = b.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
    if pool_size == 0 || pool_size > 256 {
        err(
            &f("pool_size"),
            format!("{pool_size} must be between 1 and 256"),
        );
    }
    let max_dedicated = b.max_dedicated.unwrap_or(DEFAULT_MAX_DEDICATED);
    if max_dedicated == 0 || max_dedicated > 65_536 {
        err(
            &f("max_dedicated"),
            format!("{max_dedicated} must be between 1 and 65536"),
        );
    }
    let warm_dedicated = b
        .warm_dedicated
        .unwrap_or(DEFAULT_WARM_DEDICATED.min(max_dedicated));
    if warm_dedicated > max_dedicated.min(64) {
        err(
            &f("warm_dedicated"),
            format!(
                "{warm_dedicated} must be at most max_dedicated ({max_dedicated}) and at most 64"
            ),
        );
    }
    let connect_timeout_ms = b.connect_timeout_ms.unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS);
    if connect_timeout_ms == 0 || connect_timeout_ms > 60_000 {
        err(
            &f("connect_timeout_ms"),
            format!("{connect_timeout_ms} must be between 1 and 60000"),
        );
    }
    let is_cluster = kind_name == "cluster";
    let databases = b
        .databases
        .unwrap_or(if is_cluster { 1 } else { DEFAULT_DATABASES });
    if databases == 0 || databases > 1_000_000 {
        err(&f("databases"), format!("{databases} must be at least 1"));
    }
    if b.username.is_some() && b.password.is_none() && b.password_file.is_none() {
        err(&f("username"), "set without password".into());
    }
    let password = secret_field(
        b.password.as_ref(),
        b.password_file.as_ref(),
        &f("password"),
        "leave it out for a backend without AUTH",
        err,
        password_files,
    );
    let failover_hold_ms = b.failover_hold_ms.unwrap_or(DEFAULT_FAILOVER_HOLD_MS);
    if failover_hold_ms > 600_000 {
        err(
            &f("failover_hold_ms"),
            format!("{failover_hold_ms} must be at most 600000 (10 minutes)"),
        );
    }
    let hold_max_bytes = b.hold_max_bytes.unwrap_or(DEFAULT_HOLD_MAX_BYTES);
    let hold_max_client_bytes = b
        .hold_max_client_bytes
        .unwrap_or(DEFAULT_HOLD_MAX_CLIENT_BYTES.min(hold_max_bytes));
    if hold_max_client_bytes > hold_max_bytes {
        err(
            &f("hold_max_client_bytes"),
            format!("{hold_max_client_bytes} must be at most hold_max_bytes ({hold_max_bytes})"),
        );
    }
    let health_interval_ms = b.health_interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS);
    let health_timeout_ms = b.health_timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS);
    if health_interval_ms > 0 && !(10..=60_000).contains(&health_interval_ms) {
        err(
            &f("health_interval_ms"),
            format!("{health_interval_ms} must be 0 (no health checks) or between 10 and 60000"),
        );
    }
    if !(10..=60_000).contains(&health_timeout_ms) {
        err(
            &f("health_timeout_ms"),
            format!("{health_timeout_ms} must be between 10 and 60000"),
        );
    }
    Some(Backend {
        kind: kind?,
        failover_hold_ms,
        hold_max_bytes,
        hold_max_client_bytes,
        health_interval_ms,
        health_timeout_ms,
        username: b.username.clone(),
        password,
        pool_size,
        pool_prewarm: b.pool_prewarm.unwrap_or(false),
        max_dedicated,
        warm_dedicated,
        connect_timeout_ms,
        command_timeout_ms: b.command_timeout_ms.unwrap_or(0),
        databases,
    })
}

/// `watchdog:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawWatchdog {
    pub enabled: Option<bool>,
    pub interval_ms: Option<u64>,
    pub sustain_s: Option<u64>,
    pub fd_percent: Option<u32>,
    pub rss_percent: Option<u32>,
    pub backend_conns_percent: Option<u32>,
    pub max_backend_conns: Option<u64>,
    pub min_replace_interval_s: Option<u64>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `debug:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDebug {
    pub fault_injection: Option<bool>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// The worker's resource watchdog (see `watchdog`): a budget exceeded for `sustain_s` makes
/// the supervisor replace the worker gracefully.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct WatchdogConfig {
    pub enabled: bool,
    /// How often the worker samples its resources.
    pub interval_ms: u64,
    /// How long a budget must stay exceeded before the worker is replaced.
    pub sustain_s: u64,
    /// Open descriptors, in % of the soft `RLIMIT_NOFILE`.
    pub fd_percent: u32,
    /// RSS, in % of the proxy's memory budget (`proxy.memory_budget_bytes`, by default half
    /// the container's memory limit, so 150 % = 75 % of the limit).
    pub rss_percent: u32,
    /// Backend connections of an endpoint, in % of what its pools may hold (per pool
    /// `pool_size` shared, per node `max_dedicated`).
    pub backend_conns_percent: u32,
    /// Backend connections of all endpoints together, whatever the pools' sizes.
    pub max_backend_conns: u64,
    /// Read by the supervisor at start: at most one watchdog replacement per this many
    /// seconds (doubled while new workers breach right away).
    pub min_replace_interval_s: u64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 1000,
            sustain_s: 10,
            fd_percent: 80,
            rss_percent: 150,
            backend_conns_percent: 120,
            max_backend_conns: 10_000,
            min_replace_interval_s: 60,
        }
    }
}

/// `debug:` validated.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct DebugConfig {
    /// `POST /debug/leak` (admin) may leak descriptors, memory and backend connections.
    pub fault_injection: bool,
}

fn validate_watchdog(w: &RawWatchdog, err: &mut impl FnMut(&str, String)) -> WatchdogConfig {
    let d = WatchdogConfig::default();
    let out = WatchdogConfig {
        enabled: w.enabled.unwrap_or(d.enabled),
        interval_ms: w.interval_ms.unwrap_or(d.interval_ms),
        sustain_s: w.sustain_s.unwrap_or(d.sustain_s),
        fd_percent: w.fd_percent.unwrap_or(d.fd_percent),
        rss_percent: w.rss_percent.unwrap_or(d.rss_percent),
        backend_conns_percent: w.backend_conns_percent.unwrap_or(d.backend_conns_percent),
        max_backend_conns: w.max_backend_conns.unwrap_or(d.max_backend_conns),
        min_replace_interval_s: w.min_replace_interval_s.unwrap_or(d.min_replace_interval_s),
    };
    if !(100..=60_000).contains(&out.interval_ms) {
        err(
            "watchdog.interval_ms",
            format!("{}: must be 100 to 60000 ms", out.interval_ms),
        );
    }
    if !(1..=3600).contains(&out.sustain_s) {
        err(
            "watchdog.sustain_s",
            format!("{}: must be 1 to 3600 seconds", out.sustain_s),
        );
    }
    if !(1..=100).contains(&out.fd_percent) {
        err(
            "watchdog.fd_percent",
            format!(
                "{}: must be 1 to 100 (% of the descriptor limit)",
                out.fd_percent
            ),
        );
    }
    if !(100..=1000).contains(&out.rss_percent) {
        err(
            "watchdog.rss_percent",
            format!("{}: must be 100 to 1000 (% of proxy.memory_budget_bytes); below 100 a full budget, which the proxy sheds on its own, would replace the worker", out.rss_percent),
        );
    }
    if !(100..=1000).contains(&out.backend_conns_percent) {
        err(
            "watchdog.backend_conns_percent",
            format!("{}: must be 100 to 1000 (% of what the pools may hold); below 100 busy pools would replace the worker", out.backend_conns_percent),
        );
    }
    if out.max_backend_conns == 0 {
        err(
            "watchdog.max_backend_conns",
            "0: every backend connection would be a breach; use watchdog.enabled: false to turn the watchdog off".into(),
        );
    }
    if !(1..=86_400).contains(&out.min_replace_interval_s) {
        err(
            "watchdog.min_replace_interval_s",
            format!("{}: must be 1 to 86400 seconds", out.min_replace_interval_s),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
proxy_address: 198.18.3.1
proxy_address_v6: null
cgroup_path: /sys/fs/cgroup/unified/dmt-3
pin_dir: /sys/fs/bpf/datamesh
fastpath: false
failopen_after_ms: 1000
heartbeat_interval_ms: 100
bypass_mark: 0x444d
skip_host_network: true
drain_timeout_ms: 5000
admin_listen: 127.0.0.1:15090
netns_dir: /var/run/netns
default_conn_rate: 0
default_conn_burst: 0
pods:
  - name: pod-a
    conn_rate: 5
    conn_burst: 5
    cmd_rate: 0
    cmd_burst: 0
endpoints:
  - name: cache
    address: 198.19.3.1:6379
    proxy_port: 0
    backend: 198.19.3.1:6379
"#;

    fn no_cgroup() -> Option<PathBuf> {
        None
    }

    /// Validates YAML text and returns the error lines (empty when valid).
    /// Every wanted error (by prefix) is there, and nothing else.
    fn assert_errors<W: AsRef<str> + std::fmt::Debug>(errs: &[String], want: &[W]) {
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w.as_ref())),
                "missing {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    fn check(yaml: &str) -> Vec<String> {
        match parse_yaml(yaml).map(|r| r.validate(None, no_cgroup)) {
            Ok(Ok(_)) => vec![],
            Ok(Err(errs)) => errs.iter().map(|e| e.to_string()).collect(),
            Err(e) => vec![format!("parse: {e}")],
        }
    }

    #[test]
    fn brief_example_is_valid() {
        let raw = parse_yaml(GOOD).expect("parses");
        let cfg = raw.validate(None, no_cgroup).expect("valid");
        assert_eq!(cfg.bypass_mark, 0x444d);
        assert_eq!(cfg.endpoints.len(), 1);
        assert_eq!(
            cfg.endpoints[0].backend.primary_address(),
            "198.19.3.1:6379".parse().expect("addr")
        );
        assert_eq!(cfg.pods[0].conn_rate, 5);
        assert_eq!(cfg.proxy_address, Ipv4Addr::new(198, 18, 3, 1));
    }

    #[test]
    fn toml_has_the_same_keys() {
        let text = r#"
proxy_address = "198.18.3.1"
cgroup_path = "/sys/fs/cgroup/unified/dmt-3"
bypass_mark = 0x444d
[[pods]]
name = "pod-a"
conn_rate = 5
conn_burst = 5
[[endpoints]]
name = "cache"
address = "198.19.3.1:6379"
"#;
        let cfg = parse_toml(text)
            .expect("parses")
            .validate(None, no_cgroup)
            .expect("valid");
        assert_eq!(
            cfg.endpoints[0].backend.primary_address(),
            cfg.endpoints[0].address
        );
        assert_eq!(cfg.admin_listen, "127.0.0.1:15090".parse().expect("addr"));
        assert_eq!(cfg.failopen_after_ms, 1000);
    }

    #[test]
    fn every_error_is_reported_with_its_field() {
        let errs = check(
            r#"
proxy_address: nope
cgroup_path: relative/path
failopen_after_ms: 100
heartbeat_interval_ms: 100
admin_listen: "x"
endpoints:
  - name: a
    address: 198.19.3.1:6379
  - name: a
    address: x
  - name: c
    address: 198.19.3.1:6379
    backend: "1.2.3.4"
  - name: d
    address: "[2001:db8::1]:6379"
"#,
        );
        let want = [
            "proxy_address: invalid IPv4 address \"nope\"",
            "cgroup_path: relative/path must be an absolute path",
            "failopen_after_ms: 100 must exceed heartbeat_interval_ms (100)",
            "admin_listen: invalid socket address \"x\"",
            "endpoints[1].name: duplicate endpoint name \"a\"",
            "endpoints[1].address: invalid socket address \"x\"",
            "endpoints[2].address: duplicate endpoint address 198.19.3.1:6379",
            "endpoints[2].backend: invalid socket address \"1.2.3.4\"",
            "endpoints[3].address: [2001:db8::1]:6379 is IPv6 but proxy_address_v6 is not set",
        ];
        assert_errors(&errs, &want);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let errs = check("proxy_address: 198.18.3.1\ncgroup_path: /x\nendpoints: []\nproxy_adress: 1.2.3.4\nfoo: {a: 1}\n");
        assert_eq!(
            errs,
            [
                "foo: unknown field",
                "proxy_adress: unknown field",
                "endpoints: at least one endpoint is required"
            ]
        );
        let errs = check("proxy_address: 198.18.3.1\ncgroup_path: /x\nendpoints:\n  - name: a\n    address: 1.1.1.1:1\n    prot: 3\npods:\n  - name: p\n    rate: 1\n");
        assert_eq!(
            errs,
            [
                "pods[0].rate: unknown field",
                "endpoints[0].prot: unknown field"
            ]
        );
        // TOML too.
        let errs = parse_toml("proxy_address = \"198.18.3.1\"\ncgroup_path = \"/x\"\nbogus = 1\n[[endpoints]]\nname = \"a\"\naddress = \"1.1.1.1:1\"\n")
            .expect("parses")
            .validate(None, no_cgroup)
            .expect_err("invalid");
        assert_eq!(
            errs.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["bogus: unknown field"]
        );
    }

    #[test]
    fn hotkeys_settings_defaults_and_every_bad_field() {
        let cfg = check_ok(GOOD);
        assert_eq!(cfg.hotkeys, HotKeySettings::default());
        assert!(cfg.hotkeys.enabled && cfg.hotkeys.key_display == KeyDisplay::Truncated);
        let cfg = check_ok(&format!(
            "{GOOD}hotkeys: {{enabled: false, sample_rate: 8, window_s: 4, top_k: 5, key_display: hashed, metrics_top: 3}}\n"
        ));
        assert!(!cfg.hotkeys.enabled);
        assert_eq!(cfg.hotkeys.sample_rate, 8);
        assert_eq!(cfg.hotkeys.capacity, 128);
        assert_eq!(cfg.hotkeys.key_display, KeyDisplay::Hashed);
        let dump = serde_json::to_value(&cfg).expect("serializes");
        assert_eq!(dump["hotkeys"]["key_display"], "hashed");
        let errs = check(&format!(
            "{GOOD}hotkeys: {{sample_rate: 0, window_s: 1, top_k: 8, capacity: 4, key_display: plain, metrics_top: 9, bogus: 1}}\n"
        ));
        for f in [
            "hotkeys.sample_rate: 0",
            "hotkeys.window_s: 1",
            "hotkeys.capacity: 4",
            "hotkeys.key_display: \"plain\"",
            "hotkeys.metrics_top: 9",
            "hotkeys.bogus: unknown field",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(f)), "{f} not in {errs:?}");
        }
    }

    #[test]
    fn key_rules_and_auto_throttle_every_bad_field() {
        let cfg = check_ok(GOOD);
        assert!(cfg.key_rules.is_empty());
        assert_eq!(cfg.hotkeys.auto_throttle_ops, 0);
        assert_eq!(cfg.hotkeys.auto_throttle_s, 60);
        let cfg = check_ok(&format!(
            "{GOOD}hotkeys: {{auto_throttle_ops: 500, auto_throttle_s: 30}}\nkey_rules:\n  - {{id: hot, endpoint: cache, key: 'user:*', action: throttle, rate: 100, burst: 10}}\n  - {{commands: [keys, flushall], namespaces: [shop], action: deny}}\n"
        ));
        assert_eq!(cfg.hotkeys.auto_throttle_ops, 500);
        assert_eq!(cfg.key_rules.len(), 2);
        assert_eq!(cfg.key_rules[0].id, "hot");
        assert_eq!(cfg.key_rules[1].id, "rule-2");
        let dump = serde_json::to_value(&cfg).expect("serializes");
        assert_eq!(dump["key_rules"][1]["action"], "deny");
        let errs = check(&format!(
            "{GOOD}hotkeys: {{enabled: false, auto_throttle_ops: 5, auto_throttle_s: 0}}\nkey_rules:\n  - {{id: a, endpoint: nope, key: x, action: throttle}}\n  - {{id: a, key: y, action: deny}}\n  - {{commands: [nosuch], action: deny, rate: 3, typo: 1}}\n"
        ));
        assert_errors(
            &errs,
            &[
                "hotkeys.auto_throttle_ops: set while hotkeys.enabled is false",
                "hotkeys.auto_throttle_s: 0",
                "key_rules[0].endpoint: \"nope\" is not a configured endpoint",
                "key_rules[0].rate: a throttle rule needs rate",
                "key_rules[1].id: duplicate rule id \"a\"",
                "key_rules[2].typo: unknown field",
                "key_rules[2].commands[0]: \"nosuch\"",
                "key_rules[2].rate: only for action: throttle",
            ],
        );
    }

    #[test]
    fn local_cache_defaults_and_every_bad_field() {
        let cfg = check_ok(GOOD);
        assert_eq!(cfg.local_cache, LocalCacheSettings::default());
        assert!(!cfg.local_cache.enabled, "off by default");
        let cfg = check_ok(&format!(
            "{GOOD}local_cache: {{enabled: true, endpoints: [cache], min_ops: 50, min_read_ratio: 0.8, ttl_ms: 500}}\n"
        ));
        assert!(cfg.local_cache.applies_to("cache") && !cfg.local_cache.applies_to("other"));
        assert_eq!((cfg.local_cache.min_ops, cfg.local_cache.ttl_ms), (50, 500));
        assert_eq!(cfg.local_cache.max_bytes, 64 * 1024 * 1024);
        let dump = serde_json::to_value(&cfg).expect("serializes");
        assert_eq!(dump["local_cache"]["min_read_ratio"], 0.8);
        let errs = check(&format!(
            "{GOOD}hotkeys: {{enabled: false}}\nlocal_cache: {{enabled: true, endpoints: [nope], min_ops: 0, min_read_ratio: 1.5, ttl_ms: 0, max_keys: 0, max_bytes: 10, max_value_bytes: 11, bogus: 1}}\n"
        ));
        assert_errors(
            &errs,
            &[
                "local_cache.bogus: unknown field",
                "local_cache.enabled: true while hotkeys.enabled is false",
                "local_cache.endpoints[0]: \"nope\" is not an endpoint name",
                "local_cache.min_ops: 0",
                "local_cache.min_read_ratio: 1.5",
                "local_cache.ttl_ms: 0",
                "local_cache.max_keys: 0",
                "local_cache.max_value_bytes: 11",
            ],
        );
    }

    #[test]
    fn attacks_settings_defaults_and_every_bad_field() {
        let cfg = check_ok(GOOD);
        assert_eq!(cfg.attacks, AttackSettings::default());
        assert!(cfg.attacks.enabled && !cfg.attacks.auto_throttle);
        let cfg = check_ok(&format!(
            "{GOOD}attacks: {{window_s: 2, penetration_min_reads: 50, penetration_miss_ratio: 0.5, scan_max_per_s: 5, auto_throttle: true, auto_throttle_rate: 20, auto_throttle_s: 3}}\n"
        ));
        assert_eq!(cfg.attacks.window_s, 2);
        assert_eq!(cfg.attacks.penetration_miss_ratio, 0.5);
        assert!(cfg.attacks.auto_throttle);
        let dump = serde_json::to_value(&cfg).expect("serializes");
        assert_eq!(dump["attacks"]["auto_throttle_rate"], 20);
        let errs = check(&format!(
            "{GOOD}attacks: {{window_s: 0, penetration_min_reads: 0, penetration_miss_ratio: 1.5, scan_max_per_s: 0, auto_throttle_rate: 0, auto_throttle_s: 0, bogus: 1}}\n"
        ));
        for f in [
            "attacks.window_s: 0",
            "attacks.penetration_min_reads: 0",
            "attacks.penetration_miss_ratio: 1.5",
            "attacks.scan_max_per_s: 0",
            "attacks.auto_throttle_rate: 0",
            "attacks.auto_throttle_s: 0",
            "attacks.bogus: unknown field",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(f)), "{f} not in {errs:?}");
        }
    }

    #[test]
    fn watchdog_and_debug_defaults_and_every_bad_field() {
        let cfg = check_ok(GOOD);
        assert_eq!(cfg.watchdog, WatchdogConfig::default());
        assert!(cfg.watchdog.enabled && !cfg.debug.fault_injection);
        let cfg = check_ok(&format!(
            "{GOOD}watchdog: {{sustain_s: 1, fd_percent: 5, rss_percent: 200, min_replace_interval_s: 1}}\ndebug: {{fault_injection: true}}\n"
        ));
        assert_eq!((cfg.watchdog.sustain_s, cfg.watchdog.fd_percent), (1, 5));
        assert!(cfg.debug.fault_injection);
        let dump = serde_json::to_value(&cfg).expect("serializes");
        assert_eq!(dump["watchdog"]["rss_percent"], 200);
        let errs = check(&format!(
            "{GOOD}watchdog: {{interval_ms: 10, sustain_s: 0, fd_percent: 101, rss_percent: 50, backend_conns_percent: 99, max_backend_conns: 0, min_replace_interval_s: 0, bogus: 1}}\ndebug: {{leak: true}}\n"
        ));
        assert_errors(
            &errs,
            &[
                "watchdog.interval_ms: 10",
                "watchdog.sustain_s: 0",
                "watchdog.fd_percent: 101",
                "watchdog.rss_percent: 50",
                "watchdog.backend_conns_percent: 99",
                "watchdog.max_backend_conns: 0",
                "watchdog.min_replace_interval_s: 0",
                "watchdog.bogus: unknown field",
                "debug.leak: unknown field",
            ],
        );
    }

    #[test]
    fn env_overrides_proxy_address() {
        let raw = parse_yaml(GOOD).expect("parses");
        let cfg = raw.validate(Some("198.18.9.1"), no_cgroup).expect("valid");
        assert_eq!(cfg.proxy_address, Ipv4Addr::new(198, 18, 9, 1));
        let errs = raw.validate(Some("bad"), no_cgroup).expect_err("invalid");
        assert_eq!(errs[0].field, PROXY_ADDRESS_ENV);
    }

    #[test]
    fn missing_proxy_address_and_endpoints() {
        let errs = check("cgroup_path: /sys/fs/cgroup/unified/x\n");
        assert!(
            errs.iter().any(|e| e.starts_with("proxy_address: missing")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("endpoints: at least one")),
            "{errs:?}"
        );
    }

    #[test]
    fn cgroup_path_defaults_to_detected_root() {
        let raw = parse_yaml(
            "proxy_address: 198.18.3.1\nendpoints:\n  - name: a\n    address: 198.19.3.1:6379\n",
        )
        .expect("parses");
        let cfg = raw
            .validate(None, || Some(PathBuf::from("/sys/fs/cgroup/unified")))
            .expect("valid");
        assert_eq!(cfg.cgroup_path, PathBuf::from("/sys/fs/cgroup/unified"));
        let errs = raw.validate(None, no_cgroup).expect_err("no cgroup2");
        assert_eq!(errs[0].field, "cgroup_path");
    }

    #[test]
    fn v6_endpoint_with_proxy_v6_and_v4_mapped_fold() {
        let cfg = check_ok(
            "proxy_address: 198.18.3.1\nproxy_address_v6: \"fd00::1\"\ncgroup_path: /x\nendpoints:\n  - name: a\n    address: \"[fd00::2]:6379\"\n  - name: b\n    address: \"[::ffff:198.19.3.1]:6379\"\n",
        );
        assert!(cfg.endpoints[0].address.is_ipv6());
        assert_eq!(
            cfg.endpoints[1].address,
            "198.19.3.1:6379".parse().expect("addr")
        );
        assert_eq!(
            cfg.proxy_bind(&cfg.endpoints[0]).ip(),
            "fd00::1".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            cfg.proxy_bind(&cfg.endpoints[1]).ip(),
            "198.18.3.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn bigkeys_settings() {
        let base = "proxy_address: 198.18.3.1\ncgroup_path: /x\nendpoints:\n  - name: a\n    address: 198.19.3.1:6379\n";
        let cfg = check_ok(base);
        assert_eq!(cfg.proxy.max_value_bytes, 0);
        assert_eq!(cfg.bigkeys, BigKeysConfig::default());
        assert_eq!(cfg.bigkeys.reply_bytes, 1024 * 1024);
        assert_eq!(cfg.bigkeys.reply_elements, 10_000);
        assert_eq!(cfg.bigkeys.key_display, KeyDisplay::Truncated);
        assert!(!cfg.bigkeys.refuse && cfg.bigkeys.refuse_s == 300);
        let cfg = check_ok(&format!(
            "{base}proxy:\n  max_value_bytes: 65536\nbigkeys:\n  reply_bytes: 0\n  reply_elements: 100\n  key_display: hashed\n"
        ));
        assert_eq!(cfg.proxy.max_value_bytes, 65536);
        assert_eq!(cfg.bigkeys.reply_bytes, 0);
        assert_eq!(cfg.bigkeys.key_display, KeyDisplay::Hashed);
        // Every bad field at once.
        let errs = check(&format!(
            "{base}proxy:\n  max_bulk_len: 1048576\n  max_value_bytes: 2097152\nbigkeys:\n  reply_bytes: 10\n  reply_elements: 3\n  key_display: md5\n  refuse_s: 0\n  top: 5\n"
        ));
        for f in [
            "proxy.max_value_bytes: 2097152 is above max_bulk_len (1048576)",
            "bigkeys.reply_bytes: 10 is below 1 KiB",
            "bigkeys.reply_elements: 3 is below 16",
            "bigkeys.key_display: \"md5\" must be raw, truncated or hashed",
            "bigkeys.refuse_s: 0",
            "bigkeys.top: unknown field",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(f)), "{f}: {errs:?}");
        }
    }

    #[test]
    fn capture_is_validated_and_selects_by_glob() {
        let base = "proxy_address: 198.18.3.1\ncgroup_path: /x\nendpoints:\n  - name: a\n    address: 198.19.3.1:6379\n";
        let errs = check(&format!(
            "{base}cgroup_root: rel\ncapture:\n  mode: some\n  pods: ['']\n  exclude: [ok]\n  typo: 1\n"
        ));
        for want in [
            "cgroup_root: rel is not an absolute path",
            "capture.typo: unknown field",
            "capture.pods[0]: empty glob",
        ] {
            assert!(errs.iter().any(|e| e == want), "{want}: {errs:?}");
        }
        assert!(
            errs.iter()
                .any(|e| e.starts_with("capture.mode: \"some\" is not a mode")),
            "{errs:?}"
        );
        let errs = check(&format!("{base}capture: {{mode: selected}}\n"));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("capture.mode: selected without")),
            "{errs:?}"
        );
        let errs = check(&format!("{base}capture: {{namespaces: [shop]}}\n"));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("capture.mode: namespaces/pods")),
            "{errs:?}"
        );
        let c = CaptureConfig {
            mode: CaptureMode::Selected,
            namespaces: vec!["shop".into()],
            pods: vec!["blog/api-*".into()],
            exclude: vec!["shop/web-2".into()],
        };
        assert!(c.selects(Some("shop/web-1")));
        assert!(!c.selects(Some("shop/web-2")));
        assert!(c.selects(Some("blog/api-0")));
        assert!(!c.selects(Some("blog/db-0")));
        assert!(c.selects(Some("shop.legacy")), "netns fallback namespace");
        assert!(
            !c.selects(None),
            "unknown pods are not captured in selected mode"
        );
        let all = CaptureConfig {
            exclude: vec!["kube-system/*".into()],
            ..CaptureConfig::default()
        };
        assert!(all.selects(None) && all.selects(Some("shop/web-1")));
        assert!(!all.selects(Some("kube-system/coredns-1")));
    }

    #[test]
    fn pod_policy_errors() {
        let errs = check(
            "proxy_address: 198.18.3.1\ncgroup_path: /x\nendpoints:\n  - name: a\n    address: 198.19.3.1:6379\n    proxy_port: 7000\n  - name: b\n    address: 198.19.3.2:6379\n    proxy_port: 7000\npods:\n  - name: p\n  - name: p\n    conn_burst: 3\n",
        );
        assert!(
            errs.contains(&"endpoints[1].proxy_port: duplicate proxy_port 7000".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"pods[1].name: duplicate pod name \"p\"".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("pods[1].conn_burst")),
            "{errs:?}"
        );
    }

    fn check_ok(yaml: &str) -> Config {
        parse_yaml(yaml)
            .expect("parses")
            .validate(None, no_cgroup)
            .expect("valid")
    }

    #[test]
    fn backend_maps_users_and_proxy_limits() {
        let cfg = check_ok(
            r#"
proxy_address: 198.18.3.1
cgroup_path: /x
default_cmd_rate: 100
default_cmd_burst: 10
users:
  - name: default
    password: secret
  - name: app
    acl: "+@all"
pods:
  - name: web-1
    acl: "+@all -flushall"
proxy:
  default_acl: "-@all +@read"
  auth_max_failures: 3
  max_bulk_len: 1048576
  throttle_max_delay_ms: 50
  worker_threads: 2
endpoints:
  - name: plain
    address: 198.19.3.1:6379
  - name: auth
    address: 198.19.3.2:6379
    backend: {address: 10.0.0.1:6379, username: proxy, password: pw, pool_size: 2, command_timeout_ms: 500, warm_dedicated: 0, standby: [10.0.0.9:6379], standby_after_ms: 700, failover_hold_ms: 2500, health_interval_ms: 0}
  - name: sentinel
    address: 198.19.3.3:6379
    backend:
      kind: sentinel
      sentinels: [10.0.0.2:26379, 10.0.0.3:26379]
      master_name: mymaster
      read_from_replicas: true
  - name: cluster
    address: 198.19.3.4:6379
    backend: {kind: cluster, nodes: [10.0.0.4:7000, 10.0.0.5:7000]}
"#,
        );
        assert_eq!(cfg.default_cmd_rate, 100);
        assert_eq!(cfg.users.len(), 2);
        assert_eq!(cfg.users[1].password, None);
        assert_eq!(cfg.users[1].acl.as_deref(), Some("+@all"));
        assert_eq!(cfg.users[0].acl, None);
        assert_eq!(cfg.pods[0].acl.as_deref(), Some("+@all -flushall"));
        assert_eq!(cfg.proxy.default_acl, "-@all +@read");
        assert_eq!(cfg.proxy.auth_max_failures, 3);
        assert_eq!(cfg.proxy.max_bulk_len, Some(1_048_576));
        assert_eq!(cfg.proxy.max_array_len, 1_048_576);
        assert_eq!(cfg.proxy.throttle_max_delay_ms, 50);
        assert_eq!(cfg.proxy.worker_threads, 2);
        let b = &cfg.endpoints[0].backend;
        assert_eq!(b.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(b.warm_dedicated, DEFAULT_WARM_DEDICATED);
        assert_eq!(b.primary_address(), cfg.endpoints[0].address);
        let b = &cfg.endpoints[1].backend;
        assert_eq!((b.pool_size, b.command_timeout_ms), (2, 500));
        assert_eq!(b.warm_dedicated, 0);
        assert_eq!(b.password.as_ref().map(|p| p.expose()), Some("pw"));
        assert!(
            matches!(&b.kind, BackendKind::Standalone { standby, standby_after_ms: 700, .. } if standby.len() == 1)
        );
        assert_eq!((b.failover_hold_ms, b.health_interval_ms), (2500, 0));
        // Defaults: a 5 s hold, health checks every 500 ms failing after 1 s.
        let d = &cfg.endpoints[0].backend;
        assert_eq!(
            (
                d.failover_hold_ms,
                d.health_interval_ms,
                d.health_timeout_ms
            ),
            (5000, 500, 1000)
        );
        assert!(d.hold_max_client_bytes <= d.hold_max_bytes);
        assert!(
            matches!(&cfg.endpoints[2].backend.kind, BackendKind::Sentinel { read_from_replicas: true, sentinels, .. } if sentinels.len() == 2)
        );
        assert_eq!(cfg.endpoints[3].backend.databases, 1);
        assert_eq!(cfg.endpoints[3].backend.kind_name(), "cluster");
        // Passwords never leave the process through /config_dump or logs.
        let json = serde_json::to_string(&cfg).expect("json");
        assert!(
            !json.contains("secret") && !json.contains("\"pw\""),
            "{json}"
        );
        assert!(json.contains("<redacted>"));
        assert!(!format!("{cfg:?}").contains("secret"));
    }

    #[test]
    fn backend_and_proxy_errors_are_all_listed() {
        let errs = check(
            r#"
proxy_address: 198.18.3.1
cgroup_path: /x
default_cmd_burst: 3
users:
  - name: ""
  - name: a
    password: ""
  - name: a
    acl: "+@all -@nosuch"
pods:
  - name: p
    acl: "+@all ~*"
proxy:
  default_acl: "+@all +config|nope"
  max_depth: 0
  max_inline_len: 1
  worker_threads: 0
  bogus: 1
endpoints:
  - name: s
    address: 198.19.3.1:6379
    backend: {kind: sentinel, sentinels: [], address: 1.2.3.4:1, standby: [1.2.3.4:2], failover_hold_ms: 700000}
  - name: c
    address: 198.19.3.2:6379
    backend: {kind: cluster, nodes: [x], databases: 4, pool_size: 0, max_dedicated: 3, warm_dedicated: 4, health_interval_ms: 5, hold_max_bytes: 10, hold_max_client_bytes: 20}
  - name: k
    address: 198.19.3.3:6379
    backend: {kind: memcached, typo: 1}
"#,
        );
        let want = [
            "default_cmd_burst: set without default_cmd_rate",
            "users[0].name:",
            "users[1].password: empty",
            "users[2].name: duplicate user \"a\"",
            "users[2].acl: ACL rule \"-@nosuch\": unknown category \"nosuch\"",
            "pods[0].acl: ACL rule \"~*\": not a command rule",
            "proxy.default_acl: ACL rule \"+config|nope\": config has no subcommand \"nope\"",
            "proxy.max_depth: 0 must be between 1 and 1024",
            "proxy.max_inline_len: 1 must be between 64",
            "proxy.worker_threads: 0 must be between 1 and 256",
            "proxy.bogus: unknown field",
            "endpoints[0].backend.address: not used by kind sentinel",
            "endpoints[0].backend.sentinels: needs at least one address",
            "endpoints[0].backend.master_name: required for kind sentinel",
            "endpoints[0].backend.standby: not used by kind sentinel",
            "endpoints[0].backend.failover_hold_ms: 700000 must be at most 600000",
            "endpoints[1].backend.nodes[0]: invalid socket address \"x\"",
            "endpoints[1].backend.databases: a Redis Cluster has only database 0",
            "endpoints[1].backend.pool_size: 0 must be between 1 and 256",
            "endpoints[1].backend.warm_dedicated: 4 must be at most max_dedicated (3)",
            "endpoints[1].backend.health_interval_ms: 5 must be 0 (no health checks) or between 10 and 60000",
            "endpoints[1].backend.hold_max_client_bytes: 20 must be at most hold_max_bytes (10)",
            "endpoints[2].backend.kind: \"memcached\" is not one of",
            "endpoints[2].backend.typo: unknown field",
        ];
        assert_errors(&errs, &want);
    }

    /// A temporary directory for secret files, removed on drop.
    struct TmpDir(PathBuf);
    impl TmpDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("dm-cfg-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("tmp dir");
            Self(p)
        }
        fn file(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
    }
    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const BASE: &str = "proxy_address: 198.18.3.1\ncgroup_path: /x\n";

    #[test]
    fn passwords_from_files() {
        let d = TmpDir::new("pw");
        let user = d.file("user", "u-secret\n");
        let backend = d.file("backend", "b-secret\r\n");
        let sentinel = d.file("sentinel", "s-secret");
        let cfg = check_ok(&format!(
            "{BASE}users:\n  - name: app\n    password_file: {}\nendpoints:\n  - name: a\n    address: 198.19.3.1:6379\n    backend: {{address: 10.0.0.1:6379, username: proxy, password_file: {}}}\n  - name: s\n    address: 198.19.3.2:6379\n    backend: {{kind: sentinel, sentinels: [10.0.0.2:26379], master_name: m, sentinel_password_file: {}}}\n",
            user.display(),
            backend.display(),
            sentinel.display()
        ));
        assert_eq!(
            cfg.users[0].password.as_ref().map(|p| p.expose()),
            Some("u-secret")
        );
        assert_eq!(
            cfg.endpoints[0]
                .backend
                .password
                .as_ref()
                .map(|p| p.expose()),
            Some("b-secret")
        );
        assert!(matches!(&cfg.endpoints[1].backend.kind,
            BackendKind::Sentinel { sentinel_password: Some(p), .. } if p.expose() == "s-secret"));
        assert_eq!(cfg.password_files.get("users[0].password"), Some(&user));
        assert_eq!(
            cfg.password_files.get("endpoints[0].backend.password"),
            Some(&backend)
        );
        // /config_dump: redacted values, the file paths shown.
        let json = serde_json::to_string(&cfg).expect("json");
        assert!(!json.contains("secret\""), "{json}");
        assert!(json.contains(&user.display().to_string()), "{json}");
    }

    #[test]
    fn password_file_errors_name_field_and_path() {
        let d = TmpDir::new("pwerr");
        let empty = d.file("empty", "\n");
        let ok = d.file("ok", "pw");
        let errs = check(&format!(
            "{BASE}users:\n  - name: a\n    password_file: /nonexistent/dm-pw\n  - name: b\n    password: x\n    password_file: {ok}\n  - name: c\n    password_file: {empty}\n  - name: d\n    password_file: relative/pw\nendpoints:\n  - name: a\n    address: 198.19.3.1:6379\n    backend: {{address: 10.0.0.1:6379, password_file: {dir}}}\n",
            ok = ok.display(),
            empty = empty.display(),
            dir = d.0.display()
        ));
        let want = [
            "users[0].password_file: cannot read /nonexistent/dm-pw",
            "users[1].password_file: set together with users[1].password",
            &format!("users[2].password_file: {} is empty", empty.display()),
            "users[3].password_file: relative/pw must be an absolute path",
            &format!(
                "endpoints[0].backend.password_file: {} is not a file",
                d.0.display()
            ),
        ];
        assert_errors(&errs, &want);
    }

    #[test]
    fn admin_listen_must_be_loopback_unless_allowed_with_a_token() {
        let ep = "endpoints:\n  - name: a\n    address: 198.19.3.1:6379\n";
        let errs = check(&format!("{BASE}admin_listen: 0.0.0.0:15090\n{ep}"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("admin_listen: 0.0.0.0:15090 is not a loopback address"),
            "{errs:?}"
        );
        let errs = check(&format!(
            "{BASE}admin_listen: 198.18.3.1:15090\nadmin_allow_remote: true\n{ep}"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("admin_token_file: required"),
            "{errs:?}"
        );
        let d = TmpDir::new("tok");
        let tok = d.file("token", "t0ken\n");
        let cfg = check_ok(&format!(
            "{BASE}admin_listen: 198.18.3.1:15090\nadmin_allow_remote: true\nadmin_token_file: {}\n{ep}",
            tok.display()
        ));
        assert_eq!(cfg.admin_token.as_ref().map(|t| t.expose()), Some("t0ken"));
        assert!(!serde_json::to_string(&cfg).expect("json").contains("t0ken"));
        // Loopback is fine without anything; [::1] too.
        check_ok(&format!("{BASE}admin_listen: \"[::1]:0\"\n{ep}"));
    }

    #[test]
    fn uncaptured_policy_keys() {
        let ep = "endpoints:\n  - name: a\n    address: 198.19.3.1:6379\n";
        let cfg = check_ok(&format!("{BASE}{ep}"));
        assert_eq!(cfg.uncaptured, UncapturedMode::Refuse);
        assert!(cfg.uncaptured_allow.is_empty());
        let cfg = check_ok(&format!(
            "{BASE}uncaptured: allow\nuncaptured_allow: [10.0.0.0/8, \"fd00::/8\", 198.18.3.7]\n{ep}"
        ));
        assert_eq!(cfg.uncaptured, UncapturedMode::Allow);
        assert_eq!(cfg.uncaptured_allow.len(), 3);
        let json = serde_json::to_value(&cfg).expect("json");
        assert_eq!(json["uncaptured_allow"][2], "198.18.3.7/32");
        assert_eq!(json["uncaptured"], "allow");
        let errs = check(&format!(
            "{BASE}uncaptured: maybe\nuncaptured_allow: [10.0.0.1/8, nope]\n{ep}"
        ));
        let want = [
            "uncaptured: \"maybe\" is not one of refuse, allow",
            "uncaptured_allow[0]: \"10.0.0.1/8\" has host bits set",
            "uncaptured_allow[1]: \"nope\" is not an address",
        ];
        assert_errors(&errs, &want);
    }

    #[test]
    fn mountinfo_detection() {
        let text = "25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                    31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root_from_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_root_from_mountinfo("1 2 0:1 / /a\\040b rw - cgroup2 x rw\n"),
            Some(PathBuf::from("/a b"))
        );
        assert_eq!(
            cgroup2_root_from_mountinfo("1 2 0:1 / /a rw - ext4 x rw\n"),
            None
        );
    }
}
