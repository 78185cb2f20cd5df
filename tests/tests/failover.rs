//! Failover under load: the drills of `datamesh_tests::drill` (the same as `cargo xtask drill
//! failover`) with short loads and the debug agent, one test per scenario, asserting what the
//! proxy's failover hold/replay promises on the datamesh side. The direct side (redis-py
//! straight to Redis with its own Sentinel/Cluster support) runs at the same time against the
//! same fault and is only reported: each test prints the side-by-side table and the details.
//!
//! What the proxy promises (its `failover_hold_ms`, default 5000 ms): while no node can serve
//! a command, the command waits instead of failing; a command that was never written, or
//! that provably did not run, is sent to the node that takes over; a write that was written
//! and got no reply fails with an unknown-outcome error ("the command may have been
//! executed"), never resent; the client's connection and its subscriptions survive. So per
//! client connection at most one unknown-outcome error (a pipeline counts once), no other
//! error, no dropped connection, no command executed twice; writes acknowledged before the
//! fault survive it, except what asynchronous replication loses in its last 200 ms.
//!
//! Every test builds its own instance (`Env`) and tears it down, also on failure. Nothing here
//! skips: a machine that cannot run the tests fails them, saying why. The whole binary takes
//! about 30 s with `--test-threads=2` on the 2-core machine (the cluster set-up is the longest).

use std::time::Duration;

use anyhow::{bail, Result};
use datamesh_tests::drill::{
    self, DrillOptions, DrillReport, LoadOptions, LoadResult, Scenario, COMMAND_TIMEOUT,
    HOLD_EXPIRED, UNKNOWN_OUTCOME,
};
use datamesh_tests::env::run_test;
use datamesh_tests::Env;

/// How much later than the topology's own switch (the first sentinel's `+switch-master`, the
/// cluster replica's promotion) the first command may succeed through the proxy.
const FOLLOW_MARGIN_MS: f64 = 300.0;
/// sentinel-stop: how long the master is frozen.
const STOP_FOR: Duration = Duration::from_secs(3);
/// sentinel-stop with timeouts: the longest a client may wait for its error
/// (`command_timeout_ms` 1000, checked on a 250 ms tick, + `failover_hold_ms` 1000, and
/// scheduling).
const TIMEOUT_STALL_BOUND_MS: f64 = 2600.0;

/// Short loads, paced for a debug agent on two cores.
fn options(after: Duration) -> DrillOptions {
    DrillOptions {
        after,
        stop_for: STOP_FOR,
        load: LoadOptions {
            pace_ms: 4.0,
            ..LoadOptions::default()
        },
        ..DrillOptions::default()
    }
}

/// Runs the drill, prints its table, and applies `checks` to it.
fn drill_test(
    scenario: Scenario,
    opts: DrillOptions,
    checks: impl FnOnce(&DrillReport, &mut Checks),
) {
    run_test(Env::builder().agent(false), |env| {
        let report = drill::run(env, scenario, &opts)?;
        eprintln!(
            "{}\n{}",
            drill::table(std::slice::from_ref(&report)),
            drill::details(&report)
        );
        let mut c = Checks::new(scenario);
        checks(&report, &mut c);
        c.done()
    });
}

/// Failed expectations, collected so a test reports all of them at once.
struct Checks {
    scenario: Scenario,
    failed: Vec<String>,
}

impl Checks {
    fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            failed: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failed.push(what());
        }
    }

    fn done(self) -> Result<()> {
        if self.failed.is_empty() {
            return Ok(());
        }
        bail!(
            "{} through datamesh:\n  - {}",
            self.scenario,
            self.failed.join("\n  - ")
        )
    }

    /// Only the errors of `allowed` kinds.
    fn only_errors(&mut self, m: &LoadResult, allowed: &[&str]) {
        let other = m.errors_except(allowed);
        self.check(other.is_empty(), || {
            format!(
                "clients got errors other than {allowed:?}: {other:?}{}",
                m.error_summary()
            )
        });
    }

    /// What every kill scenario promises: no error but unknown-outcome (at most one per
    /// connection), no dropped connection (the subscriber's included, and it still receives),
    /// nothing executed twice, every command sent once by the client, nothing stuck.
    fn survives_kill(&mut self, m: &LoadResult) {
        self.only_errors(m, &[UNKNOWN_OUTCOME]);
        self.check(m.max_unknown_per_conn <= 1, || {
            format!(
                "{} unknown-outcome errors on one connection (at most 1 allowed)",
                m.max_unknown_per_conn
            )
        });
        self.no_drops_no_twice(m);
        self.check(m.sub_got_last, || {
            format!(
                "the subscriber did not receive the last message published ({} received, {} lost, \
                 {} re-subscriptions)",
                m.sub_received, m.sub_lost, m.sub_resubscribes
            )
        });
    }

    fn no_drops_no_twice(&mut self, m: &LoadResult) {
        self.check(m.dropped == 0, || {
            format!(
                "{} client connections were closed by the proxy (per client: {})",
                m.dropped,
                clients_with(m, "drops")
            )
        });
        self.check(m.exec_twice == 0, || {
            format!(
                "{} INCR counters exceed the INCRs sent: {:?}",
                m.exec_twice, m.counters
            )
        });
        self.harness_sane(m);
    }

    /// The load itself worked: redis-py sent every INCR once, no client hung past the stop,
    /// every acknowledged write could be read back.
    fn harness_sane(&mut self, m: &LoadResult) {
        self.check(m.incr_resends == 0, || {
            format!(
                "redis-py resent {} INCRs (client retries are on?)",
                m.incr_resends
            )
        });
        self.check(m.incr_writes >= m.incr_acked, || {
            format!(
                "the load counted {} INCR writes for {} acknowledged INCRs: its resend counter \
                 does not see them",
                m.incr_writes, m.incr_acked
            )
        });
        self.check(m.stuck.is_empty(), || {
            format!("clients still in a command after the stop: {:?}", m.stuck)
        });
        self.check(m.unread == 0, || {
            format!("{} acknowledged writes could not be read back", m.unread)
        });
    }

    /// Acknowledged writes: none lost (`old_only`: none acknowledged >200 ms before the fault).
    fn writes_kept(&mut self, m: &LoadResult, old_only: bool) {
        let lost = if old_only { m.missing_old } else { m.missing };
        self.check(lost == 0, || {
            format!(
                "{lost} of {} acknowledged writes are missing{} (e.g. {:?})",
                m.acked_writes,
                if old_only {
                    " although acknowledged more than 200 ms before the fault"
                } else {
                    ""
                },
                m.missing_samples
            )
        });
    }

    /// The first success through the proxy within `margin` of the topology's own switch.
    fn follows_switch(&mut self, r: &DrillReport, margin: f64) {
        let m = &r.datamesh;
        let bound = r.switch_ms.map(|s| s + margin);
        self.check(
            matches!((m.first_ok_ms, bound), (Some(ok), Some(b)) if ok <= b),
            || {
                format!(
                    "first success {:?} ms after the fault, not within {margin} ms of the {} \
                     ({:?} ms)",
                    m.first_ok_ms, r.switch_what, r.switch_ms
                )
            },
        );
    }
}

/// `name=value` of one per-client field, for clients where it is not 0.
fn clients_with(m: &LoadResult, field: &str) -> String {
    let v: Vec<String> = m
        .clients
        .iter()
        .filter_map(|c| {
            let n = c.get(field)?.as_u64()?;
            let name = c.get("name")?.as_str()?;
            (n > 0).then(|| format!("{name}={n}"))
        })
        .collect();
    v.join(" ")
}

#[test]
fn sentinel_kill() {
    drill_test(
        Scenario::SentinelKill,
        options(Duration::from_secs(5)),
        |r, c| {
            let m = &r.datamesh;
            eprintln!(
                "sentinel-kill: sentinels switched {:?} ms after the kill; datamesh's first success {:?} ms",
                r.switch_ms, m.first_ok_ms
            );
            c.survives_kill(m);
            c.writes_kept(m, true);
            c.follows_switch(r, FOLLOW_MARGIN_MS);
        },
    );
}

#[test]
fn sentinel_stop_is_held() {
    drill_test(
        Scenario::SentinelStop,
        options(STOP_FOR + Duration::from_millis(1500)).backend("failover_hold_ms", 5000),
        |r, c| {
            let m = &r.datamesh;
            c.only_errors(m, &[]);
            c.no_drops_no_twice(m);
            let stop = r.switch_ms.unwrap_or(STOP_FOR.as_secs_f64() * 1000.0);
            // A command sent within a pace of the SIGSTOP waits out the whole stop.
            c.check(m.max_stall_ms >= stop - 100.0, || {
                format!(
                    "the longest command took {:.0} ms, less than the {stop:.0} ms stop: \
                     commands were not held through it",
                    m.max_stall_ms
                )
            });
            c.writes_kept(m, false);
        },
    );
}

#[test]
fn sentinel_stop_with_timeouts_fails_fast_and_resends_nothing() {
    let opts = DrillOptions {
        recheck: Some(Duration::from_secs(1)),
        ..options(STOP_FOR + Duration::from_millis(1500))
    }
    .backend("command_timeout_ms", 1000)
    .backend("failover_hold_ms", 1000);
    drill_test(Scenario::SentinelStop, opts, |r, c| {
        let m = &r.datamesh;
        c.check(m.total_errors() > 0, || {
            "no client got an error during a 3 s stop with command_timeout_ms 1000".into()
        });
        // Clear errors only, each in the proxy's voice: the command timed out (a read: safe to
        // retry), may have been executed (a written write), or waited out its hold.
        c.only_errors(m, &[UNKNOWN_OUTCOME, COMMAND_TIMEOUT, HOLD_EXPIRED]);
        c.check(m.max_stall_ms <= TIMEOUT_STALL_BOUND_MS, || {
            format!(
                "a command hung {:.0} ms (bound {TIMEOUT_STALL_BOUND_MS} ms with \
                 command_timeout_ms 1000 and failover_hold_ms 1000)",
                m.max_stall_ms
            )
        });
        c.no_drops_no_twice(m);
        c.writes_kept(m, false);
        for k in &m.counters {
            // Only acknowledged INCRs and those reported as "may have been executed" may
            // have run; a held one that expired must never reach the server after SIGCONT.
            let may_have_run = (k.acked + k.unknown) as i64;
            c.check(k.final_value.is_some_and(|f| f <= may_have_run), || {
                format!(
                    "counter {} is {:?} after SIGCONT, but only {} INCRs were acknowledged and {} \
                     reported as unknown outcome: a command was sent after the client got its error",
                    k.key, k.final_value, k.acked, k.unknown
                )
            });
            c.check(k.final_later == k.final_value, || {
                format!(
                    "counter {} changed from {:?} to {:?} within 1 s after the load stopped",
                    k.key, k.final_value, k.final_later
                )
            });
        }
    });
}

#[test]
fn standalone_restart() {
    drill_test(
        Scenario::StandaloneRestart,
        options(Duration::from_millis(3500)),
        |r, c| {
            let m = &r.datamesh;
            c.check(m.error_count("LOADING") == 0, || {
                format!(
                    "{} LOADING errors reached clients",
                    m.error_count("LOADING")
                )
            });
            c.survives_kill(m);
            // appendfsync always: every acknowledged write is on disk.
            c.writes_kept(m, false);
        },
    );
}

#[test]
fn standby_promotion() {
    drill_test(
        Scenario::Standby,
        options(Duration::from_millis(3500)),
        |r, c| {
            let m = &r.datamesh;
            c.survives_kill(m);
            c.writes_kept(m, true);
        },
    );
}

#[test]
fn cluster_kill() {
    drill_test(
        Scenario::ClusterKill,
        options(Duration::from_secs(5)),
        |r, c| {
            let m = &r.datamesh;
            eprintln!(
                "cluster-kill: replica promoted {:?} ms after the kill; datamesh's first success {:?} ms",
                r.switch_ms, m.first_ok_ms
            );
            c.survives_kill(m);
            c.writes_kept(m, true);
            c.follows_switch(r, FOLLOW_MARGIN_MS);
        },
    );
}
