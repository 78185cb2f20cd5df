//! The key drills of issue 10 as tests (`datamesh_tests::keydrill`, short phases, the debug
//! agent): `cargo xtask drill hot-key|key-attack` runs the same with the release agent.

use anyhow::{ensure, Result};
use datamesh_tests::env::run_test;
use datamesh_tests::keydrill::{self, KeyDrillOptions, Phase, HOT_KEY};
use datamesh_tests::Env;

const SECONDS: f64 = 3.0;

fn opts() -> KeyDrillOptions {
    KeyDrillOptions {
        seconds: SECONDS,
        ..Default::default()
    }
}

/// No bystander ever sees an error.
fn bystanders_clean(phases: &[Phase]) -> Result<()> {
    for p in phases {
        ensure!(
            p.web_errors() == 0,
            "phase {}: the bystanders saw errors: {:?}",
            p.name,
            p.web
        );
    }
    Ok(())
}

#[test]
fn hot_key_drill() {
    run_test(keydrill::hot_key_env(Env::builder()), |env| {
        let o = opts();
        let r = keydrill::hot_key(env, &o)?;
        let table = keydrill::hot_key_table(&r);
        eprintln!("{table}");
        bystanders_clean(&r.phases)?;
        let (key, pod, _) = r.named.clone().unwrap_or_default();
        ensure!(
            r.detect_ms.is_some() && key == HOT_KEY && pod == r.hammer_pod,
            "the hot key and its pod were not named within the phase:\n{table}"
        );
        let hot = &r.phases[1];
        let cached = &r.phases[2];
        ensure!(
            r.cache_hits > 0.0 && cached.backend_gets_per_s < hot.backend_gets_per_s / 4.0,
            "the local cache did not relieve the backend:\n{table}"
        );
        let throttled = &r.phases[3];
        let steady = throttled.offender_last_second_ops().unwrap_or(f64::MAX);
        ensure!(
            r.throttle_ms.is_some() && steady <= o.auto_throttle_ops as f64 * 1.5,
            "the automatic key throttle did not hold the hammer to {} ops/s (last second {steady}):\n{table}",
            o.auto_throttle_ops
        );
        Ok(())
    });
}

#[test]
fn key_attack_drill() {
    run_test(keydrill::key_attack_env(Env::builder()), |env| {
        let o = opts();
        let r = keydrill::key_attack(env, &o)?;
        let table = keydrill::key_attack_table(&r);
        eprintln!("{table}");
        bystanders_clean(&r.phases)?;
        ensure!(
            r.detect_ms.is_some() && r.throttle_ms.is_some(),
            "the flood was not detected and throttled within the phase:\n{table}"
        );
        let flood = &r.phases[1];
        let steady = flood.offender_last_second_ops().unwrap_or(f64::MAX);
        ensure!(
            steady <= o.attack_throttle_rate as f64 * 2.0,
            "the throttled attacker still got {steady} commands/s through:\n{table}"
        );
        ensure!(
            r.block_ms.is_some_and(|ms| ms < 1000.0),
            "the runtime deny rule did not block the attacker within 1 s:\n{table}"
        );
        Ok(())
    });
}
