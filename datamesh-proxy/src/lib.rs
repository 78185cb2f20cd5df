//! The DataMesh RESP proxy, as a library with no eBPF in it: it builds and its tests run with
//! `cargo test -p datamesh-proxy` on any machine. The agent plugs in through small interfaces
//! the proxy owns: [`attribution::Attribution`] (who is on the other end of a connection),
//! [`accounting::PodDirectory`] (pod names, and where per-pod counts go), and the proxy's own
//! config types ([`config`]), which the agent converts its file config into.
//!
//! Codemap:
//! - [`listener`]: accept loops; [`shared`]: what listeners and sessions share (settings,
//!   the open-connection count and drain);
//! - [`endpoint`]: an endpoint's backend side (topology + pools behind the router), swapped on
//!   reload, and `/backends`;
//! - [`session`]: one client connection (I/O loop, client state, dispatch);
//! - [`upstream`]: the one request path ([`upstream::Router`]) and the replay decision;
//!   [`request`]: a command on its way to a backend, with its replay class;
//! - [`backend`]: connections with in-flight queues, pools, the connect helper, the handshake,
//!   the backoff;
//! - [`topology`]: standalone, Sentinel and Cluster, and their control-plane client;
//! - [`resp`]: the one codec and value type; [`commands`]: the command table;
//! - [`accounting`]: per-pod counts and the GCRA command-rate limit; [`metrics`];
//! - [`clients`]: the proxy's client connections as CLIENT LIST/KILL see them (the budget's
//!   registry); [`acl_log`]: `ACL LOG`;
//! - [`hotkeys`]: per-endpoint top keys by operations over a sliding window (space-saving);
//!   [`keyrules`]: throttle and deny rules by key, command and pod (config, runtime, auto).
//! - [`attacks`]: cache-penetration and key-scan detection per pod and endpoint, alerts and the
//!   optional automatic throttle of a suspected pod.

pub mod accounting;
pub mod acl_log;
pub mod attacks;
pub mod attribution;
pub mod backend;
pub mod bigkeys;
pub mod budget;
pub mod clients;
pub mod commands;
pub mod config;
pub mod endpoint;
pub mod hotkeys;
pub mod keydisplay;
pub mod keyrules;
pub mod listener;
pub mod localcache;
pub mod metrics;
pub mod ratelog;
pub mod request;
pub mod resp;
pub mod session;
pub mod shared;
pub mod topology;
pub mod upstream;

#[cfg(test)]
mod testing;

use tokio::sync::watch;

/// Resolves once `rx` holds `true` (or its sender is gone). Does not hold the watch's read
/// guard across an await, so tasks using it stay `Send`.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}
