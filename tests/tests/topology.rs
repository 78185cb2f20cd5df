//! The proxy library's topologies and control client (`datamesh_proxy::topology`) against real
//! servers: a master, a replica and three redis-sentinels, and Redis Clusters (3 masters; 3
//! masters with 3 replicas), started by the harness on the instance's own service address.
//! No agent and no pods: each test builds an `Env` with `.agent(false)` for its address, cgroup
//! and run dir, drives a `Sentinel`/`Cluster` topology (or a `ControlConn`) on a tokio runtime
//! of its own, and checks what it reports against what the servers themselves say.
//!
//! These replace the "live" unit tests the topology modules used to carry (real servers on
//! 127.0.0.1 with a racy free-port helper): the set-ups come from the harness, every wait is a
//! condition with a deadline, and every process goes away with the test's guards, also when
//! it fails. Nothing here skips: a machine that cannot run the tests fails them, saying why.
//!
//! Modules: `common` (the runtime, polling with timestamps, raw exchanges), `sentinel`
//! (discovery with a dead sentinel first, two failovers, rotation when the followed sentinel
//! dies), `cluster` (slot map, hashing, routing, split/merge, ASK/MOVED, replica reads and a
//! master failover), `control` (AUTH, ACL users, the bypass mark, errors).

#[path = "topology/common.rs"]
mod common;

#[path = "topology/sentinel.rs"]
mod sentinel;

#[path = "topology/cluster.rs"]
mod cluster;

#[path = "topology/control.rs"]
mod control;
