//! The gray-release drill of issue 9 as a test (`datamesh_tests::graydrill`, short phases, the
//! debug agent): two simulated nodes (an agent each, on its own cgroup subtree, one Redis),
//! the canary opting in one namespace, the alerts watched, promotion and roll back by reload.
//! `cargo xtask drill gray-release` runs the same with the release agent and longer phases.

use datamesh_tests::env::run_test;
use datamesh_tests::graydrill::{self, GrayOptions};
use datamesh_tests::Env;

#[test]
fn gray_release_drill() {
    run_test(graydrill::env_builder(Env::builder()), |env| {
        let r = graydrill::run(env, &GrayOptions::default())?;
        eprintln!(
            "{}\n{}\n{}",
            graydrill::table(&r),
            graydrill::alerts_table(&r),
            graydrill::pod_table(&r)
        );
        graydrill::check(&r)
    });
}
