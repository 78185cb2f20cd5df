//! The proxy's own settings. The agent validates its config file and converts it into these
//! (endpoint backends are taken as they are; the session settings are built from the file's
//! `proxy:` section and `users`). Every type here serializes for `/config_dump`, with
//! passwords shown as `<redacted>`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::budget::OutputLimit;
use crate::commands::acl::{self, AclError, Policy};
use crate::resp::Limits;

pub const DEFAULT_POOL_SIZE: u32 = 4;
pub const DEFAULT_MAX_DEDICATED: u32 = 512;
/// Idle dedicated connections kept open per pool: enough for a blocking command or a
/// transaction to start without a connect, few enough to cost nothing.
pub const DEFAULT_WARM_DEDICATED: u32 = 2;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_DATABASES: u32 = 16;
/// How long a command waits for a usable node: a Sentinel failover with `down-after-milliseconds`
/// up to about 3.5 s (failover ~1.5 s after that) or a restart of a few seconds is ridden out,
/// while a client with a typical 5 s socket timeout still gets the proxy's own error first.
pub const DEFAULT_FAILOVER_HOLD_MS: u64 = 5000;
pub const DEFAULT_HOLD_MAX_BYTES: u64 = 32 * 1024 * 1024;
pub const DEFAULT_HOLD_MAX_CLIENT_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 500;
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_STANDBY_AFTER_MS: u64 = 1000;

/// A password that never shows up in `/config_dump`, logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A user clients authenticate as at the proxy (`AUTH [name] password`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// `None`: the user needs no password (nopass).
    pub password: Option<Secret>,
    /// Command policy in Redis ACL rules (`+@all -@dangerous`); `None`: the default policy
    /// (`proxy.default_acl`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl: Option<String>,
}

/// Failed AUTH attempts on one connection before it is closed (like a login lockout).
pub const DEFAULT_AUTH_MAX_FAILURES: u32 = 10;

/// The parsed command policies: one per user with its own `acl`, and the default for the
/// others (and for clients when no users are configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclSettings {
    pub default: Arc<Policy>,
    pub users: HashMap<String, Arc<Policy>>,
}

impl Default for AclSettings {
    fn default() -> Self {
        Self {
            default: Arc::new(acl::default_tenant_policy()),
            users: HashMap::new(),
        }
    }
}

impl AclSettings {
    /// Parses `default_acl` and every user's `acl`; errors name the field
    /// (`users[2].acl`, `proxy.default_acl`) with the bad rule.
    pub fn build(users: &[User], default_acl: &str) -> Result<Self, Vec<(String, AclError)>> {
        let mut errs = Vec::new();
        let default = match Policy::parse(default_acl) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                errs.push(("proxy.default_acl".to_string(), e));
                Arc::new(acl::default_tenant_policy())
            }
        };
        let mut by_user = HashMap::new();
        for (i, u) in users.iter().enumerate() {
            if let Some(rules) = &u.acl {
                match Policy::parse(rules) {
                    Ok(p) => {
                        by_user.insert(u.name.clone(), Arc::new(p));
                    }
                    Err(e) => errs.push((format!("users[{i}].acl"), e)),
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Self {
            default,
            users: by_user,
        })
    }

    /// The policy of `user` (its own, else the default).
    pub fn for_user(&self, user: &str) -> &Arc<Policy> {
        self.users.get(user).unwrap_or(&self.default)
    }
}

/// Settings every session reads (swapped whole on reload).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub limits: Limits,
    /// Users clients authenticate as; empty = no AUTH needed.
    pub users: Vec<User>,
    /// How long an over-limit command may wait before it is refused.
    pub throttle_max_delay: Duration,
    /// Commands of one client in flight at once; further reads wait.
    pub max_pipeline: u32,
    /// Reply bytes not yet written to a client past which it is not read further
    /// (back-pressure; the output limits below close it).
    pub client_output_limit: u64,
    /// Output-buffer limits of normal clients and of subscribers (Redis's
    /// `client-output-buffer-limit normal` and `pubsub`).
    pub output_normal: OutputLimit,
    pub output_pubsub: OutputLimit,
    /// Bytes of a client's commands being read or on their way to a backend past which it is
    /// not read further until they are answered.
    pub client_query_limit: u64,
    /// All clients' buffered bytes at most (0: no budget); see [`crate::budget`].
    pub memory_budget: u64,
    /// A client without a command for this long is closed (zero: never, like Redis's
    /// `timeout 0`).
    pub idle_timeout: Duration,
    /// A command must be complete this long after its first byte arrived (zero: no deadline).
    pub partial_timeout: Duration,
    /// Client connections at once, all endpoints together (0: no cap).
    pub max_clients: u32,
    /// TCP keepalive idle time on client and backend sockets (zero: off).
    pub tcp_keepalive: Duration,
    /// Command policies (users' `acl`, `proxy.default_acl`).
    pub acl: Arc<AclSettings>,
    /// Failed AUTH attempts on one connection before it is closed (0 = never closed).
    pub auth_max_failures: u32,
    /// The request-size guard and the big-reply thresholds ([`crate::bigkeys`]).
    pub bigkeys: crate::bigkeys::BigKeySettings,
    /// Hot-key detection (`hotkeys:`).
    pub hotkeys: crate::hotkeys::HotKeySettings,
    /// The node-local cache of hot read-mostly keys (`local_cache:`).
    pub local_cache: crate::localcache::LocalCacheSettings,
    /// Cache-penetration and key-scan detection (`attacks:`).
    pub attacks: crate::attacks::AttackSettings,
}

pub const DEFAULT_MEMORY_BUDGET: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_OUTPUT_PUBSUB: OutputLimit = OutputLimit {
    hard: 32 * 1024 * 1024,
    soft: 8 * 1024 * 1024,
    soft_seconds: 60,
};
pub const DEFAULT_PARTIAL_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_MAX_CLIENTS: u32 = 10_000;
pub const DEFAULT_TCP_KEEPALIVE_S: u64 = 300;

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            users: Vec::new(),
            throttle_max_delay: Duration::from_millis(100),
            max_pipeline: 4096,
            client_output_limit: 1024 * 1024,
            output_normal: OutputLimit {
                hard: 256 * 1024 * 1024,
                soft: 0,
                soft_seconds: 0,
            },
            output_pubsub: DEFAULT_OUTPUT_PUBSUB,
            client_query_limit: 1024 * 1024 * 1024,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            idle_timeout: Duration::ZERO,
            partial_timeout: Duration::from_millis(DEFAULT_PARTIAL_TIMEOUT_MS),
            max_clients: DEFAULT_MAX_CLIENTS,
            tcp_keepalive: Duration::from_secs(DEFAULT_TCP_KEEPALIVE_S),
            acl: Arc::new(AclSettings::default()),
            auth_max_failures: DEFAULT_AUTH_MAX_FAILURES,
            bigkeys: crate::bigkeys::BigKeySettings::default(),
            hotkeys: Default::default(),
            local_cache: Default::default(),
            attacks: Default::default(),
        }
    }
}

/// Where an endpoint's commands go, and how.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Backend {
    #[serde(flatten)]
    pub kind: BackendKind,
    /// ACL user the proxy authenticates to backends as (`AUTH user pass`).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Shared, multiplexed connections per backend node, database and protocol.
    pub pool_size: u32,
    /// Connect the shared pool at start instead of on first use.
    pub pool_prewarm: bool,
    /// Exclusive connections (transactions, blocking commands, pub/sub) per node at most.
    pub max_dedicated: u32,
    /// Idle exclusive connections kept open per pool, ready for a client's first blocking
    /// command or transaction.
    pub warm_dedicated: u32,
    pub connect_timeout_ms: u64,
    /// 0 = no timeout; else a command without reply after this long fails (and its
    /// connection is reset, since its later replies can no longer be matched).
    pub command_timeout_ms: u64,
    /// Databases clients may SELECT (0..databases); cluster backends only have 0.
    pub databases: u32,
    /// How long a command waits for a usable node (0: never held, fails at once).
    pub failover_hold_ms: u64,
    /// Bytes of held commands per endpoint and per client at most.
    pub hold_max_bytes: u64,
    pub hold_max_client_bytes: u64,
    /// PING every node in use this often (0: no active health checks).
    pub health_interval_ms: u64,
    /// A node without an answer to PING this long is down.
    pub health_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendKind {
    Standalone {
        address: SocketAddr,
        /// Nodes to switch to when `address` is down past `standby_after_ms` and one of them
        /// answers `ROLE` master.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        standby: Vec<SocketAddr>,
        standby_after_ms: u64,
    },
    Sentinel {
        sentinels: Vec<SocketAddr>,
        master_name: String,
        read_from_replicas: bool,
        sentinel_username: Option<String>,
        sentinel_password: Option<Secret>,
    },
    Cluster {
        nodes: Vec<SocketAddr>,
        read_from_replicas: bool,
    },
}

impl Backend {
    /// A standalone backend with every default (the `backend: ip:port` shorthand).
    pub fn standalone(address: SocketAddr) -> Self {
        Self {
            kind: BackendKind::Standalone {
                address,
                standby: Vec::new(),
                standby_after_ms: DEFAULT_STANDBY_AFTER_MS,
            },
            username: None,
            password: None,
            pool_size: DEFAULT_POOL_SIZE,
            pool_prewarm: false,
            max_dedicated: DEFAULT_MAX_DEDICATED,
            warm_dedicated: DEFAULT_WARM_DEDICATED,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            command_timeout_ms: 0,
            databases: DEFAULT_DATABASES,
            failover_hold_ms: DEFAULT_FAILOVER_HOLD_MS,
            hold_max_bytes: DEFAULT_HOLD_MAX_BYTES,
            hold_max_client_bytes: DEFAULT_HOLD_MAX_CLIENT_BYTES,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            health_timeout_ms: DEFAULT_HEALTH_TIMEOUT_MS,
        }
    }

    /// One address that stands for the backend (ready file, logs): the standalone address,
    /// the first sentinel or the first cluster seed.
    pub fn primary_address(&self) -> SocketAddr {
        match &self.kind {
            BackendKind::Standalone { address, .. } => *address,
            BackendKind::Sentinel { sentinels, .. } => sentinels[0],
            BackendKind::Cluster { nodes, .. } => nodes[0],
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            BackendKind::Standalone { .. } => "standalone",
            BackendKind::Sentinel { .. } => "sentinel",
            BackendKind::Cluster { .. } => "cluster",
        }
    }
}

/// One endpoint as the proxy sees it: a name and a backend. (Where its listener binds and
/// which service address pods dial are the agent's business.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub name: String,
    pub backend: Backend,
}
