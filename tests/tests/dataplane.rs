//! Privileged data-plane tests: real eBPF programs attached to a cgroup each test creates,
//! network namespaces as pods, a real redis-server as the endpoint, the real agent, and real
//! clients (redis-cli, redis-py, the harness's `dmprobe`) running inside the pods.
//!
//! One test binary; every test builds its own `Env` (own instance number, cgroups, bridge, pin
//! dir), so tests run in parallel, and tears it down on drop, also when it fails. None of these
//! tests skips: on a machine that cannot run them they fail, saying why.
//!
//! Modules: `common` (helpers), `harness` (the harness itself: preflight, teardown, reaping,
//! the battery against plain Redis), `capture` (capture and what must stay untouched),
//! `lifecycle` (SIGKILL fail-open, restart re-adoption), `battery` (correctness with the fast
//! path on and off), `ratelimit` (per-pod connection-rate limit), `identity` (direct dials attributed and limited,
//! uncaptured clients refused unless allowed, password files, admin access), `podident` (pods
//! named from the kubelet's cgroup and log layout built under the test cgroup; opt-in capture),
//! `supervisor` (the worker SIGKILLed, SIGSTOPped, crash-looping; the supervisor SIGKILLed:
//! immediate fail-open through `dm_listeners`, no connect refused).

#[path = "dataplane/common.rs"]
mod common;

#[path = "dataplane/harness.rs"]
mod harness;

#[path = "dataplane/capture.rs"]
mod capture;

#[path = "dataplane/lifecycle.rs"]
mod lifecycle;

#[path = "dataplane/battery.rs"]
mod battery;

#[path = "dataplane/ratelimit.rs"]
mod ratelimit;

#[path = "dataplane/identity.rs"]
mod identity;

#[path = "dataplane/podident.rs"]
mod podident;

#[path = "dataplane/supervisor.rs"]
mod supervisor;
