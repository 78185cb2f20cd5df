//! Compatibility tests of the RESP proxy with real clients against real servers: redis-cli,
//! redis-benchmark and redis-py (sync, asyncio, cluster client) talking to the agent's proxy,
//! which talks to a real redis-server, a master/replica set behind three redis-sentinels, or a
//! 3-master Redis Cluster (Debian packages, started by the harness on test-owned addresses).
//!
//! Node-local clients dial the proxy listener from the ready file (not captured: pod "node");
//! others run inside a pod and dial the endpoint address, so the eBPF capture brings them to
//! the proxy with their pod identity. One test binary; every test builds its own `Env` and
//! tears it down (also on failure). Nothing here skips: a machine that cannot run the tests
//! fails them, saying why.
//!
//! Modules: `common` (helpers), `clients` (redis-cli, inline, --pipe, redis-benchmark,
//! redis-py, AUTH, RESP3, refusals), `pooling` (connection storm, blocking commands),
//! `backends` (sentinel failover, cluster split/merge, resharding, cluster client), `limits`
//! (per-pod command rate), `badinput` (malformed input, half-closed clients), `reload`
//! (SIGHUP without dropping clients), `behaviours` (UNSUBSCRIBE, CLIENT REPLY, warm dedicated
//! connections, dead-backend errors).

#[path = "proxy/common.rs"]
mod common;

#[path = "proxy/clients.rs"]
mod clients;

#[path = "proxy/pooling.rs"]
mod pooling;

#[path = "proxy/backends.rs"]
mod backends;

#[path = "proxy/limits.rs"]
mod limits;

#[path = "proxy/badinput.rs"]
mod badinput;

#[path = "proxy/reload.rs"]
mod reload;

#[path = "proxy/behaviours.rs"]
mod behaviours;
