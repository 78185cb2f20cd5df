//! Pod identity on a real node and opt-in capture (issue 9 items 3 and 4): pods whose cgroups
//! are laid out as the kubelet does it (systemd and cgroupfs drivers, several QoS classes)
//! under the test's own cgroup, with their log directories under the run dir, are named
//! `namespace/name` in `pods`, the metrics, pod policies and key rules; with
//! `capture.mode: selected` a pod not selected connects straight to Redis (the proxy never sees
//! it) and a reload flips the selection on the next connect.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use datamesh_tests::agent::PodPolicy;
use datamesh_tests::env::run_test;
use datamesh_tests::pod::Pod;
use datamesh_tests::proxy::pod_cli;
use datamesh_tests::tenant::metric_line;
use datamesh_tests::{wait_until, CgroupDriver, Env, KubeletPod};

use crate::common::{client_addr_in, is_pod_addr, redis_cli};

/// One named connection from the pod through the service address: whether the proxy served it
/// (`/connections` has that socket) or Redis saw the pod itself.
fn went_through_proxy(env: &Env, pod: &Pod, tag: &str) -> Result<bool> {
    // No data command: a pod policy may refuse writes; CLIENT SETNAME/LIST are always served.
    let out = redis_cli(
        pod.cmd("redis-cli"),
        env.service_addr(),
        &format!("CLIENT SETNAME {tag}\nCLIENT LIST\n"),
    )?;
    let seen = client_addr_in(&out, tag)?;
    // The proxy's record of exactly that socket (the proxy answers CLIENT LIST with the
    // client's own address, so the address alone cannot tell).
    let peer = seen.to_string();
    if let Some(c) = env
        .agent()
        .connections()?
        .into_iter()
        .find(|c| c["peer"].as_str() == Some(peer.as_str()))
    {
        ensure!(c["captured"] == true, "proxy connection not captured: {c}");
        return Ok(true);
    }
    ensure!(
        is_pod_addr(pod, seen),
        "Redis saw {seen} for pod {}, neither the proxy nor the pod",
        pod.netns_name()
    );
    Ok(false)
}

fn config_with(env: &Env, yaml: &str) -> datamesh_tests::agent::AgentConfig {
    let mut cfg = env.agent().config().clone();
    cfg.extra_yaml = yaml.to_string();
    cfg
}

fn reload(env: &mut Env, yaml: &str) -> Result<()> {
    let cfg = config_with(env, yaml);
    env.agent_mut().write_config(cfg)?;
    env.agent().sighup()
}

#[test]
fn opt_in_capture_rewrites_only_selected_pods_and_reload_flips_it() {
    run_test(
        Env::builder()
            .pods(["a", "b"])
            .extra_config("capture: {mode: selected, pods: ['*-a']}\n"),
        |env| {
            let (a, b) = (env.pod("a"), env.pod("b"));
            ensure!(
                went_through_proxy(env, a, "sel-a1")?,
                "selected pod a not captured"
            );
            ensure!(
                !went_through_proxy(env, b, "sel-b1")?,
                "pod b is not selected but was captured"
            );
            ensure!(
                env.agent()
                    .pod_counter(b.netns_name(), "connects_captured")?
                    == 0,
                "pod b counted as captured"
            );
            // Flip: b selected, a excluded; the next connects follow without a restart.
            let t0 = std::time::Instant::now();
            reload(
                env,
                "capture: {mode: selected, pods: ['*-a', '*-b'], exclude: ['*-a']}\n",
            )?;
            let (a, b) = (env.pod("a"), env.pod("b"));
            wait_until(
                "the reload flips pod b to captured",
                Duration::from_secs(5),
                || Ok(went_through_proxy(env, b, "sel-b2")?.then_some(())),
            )?;
            let flip = t0.elapsed();
            ensure!(
                !went_through_proxy(env, a, "sel-a2")?,
                "pod a is excluded but still captured"
            );
            // Back to the default: every pod captured.
            reload(env, "")?;
            let a = env.pod("a");
            wait_until(
                "mode all captures pod a again",
                Duration::from_secs(5),
                || Ok(went_through_proxy(env, a, "sel-a3")?.then_some(())),
            )?;
            eprintln!("opt-in capture: reload to the next captured connect {flip:?}");
            Ok(())
        },
    );
}

const UID_WEB1: &str = "0a1b2c3d-1111-4a4a-8b8b-000000000001";
const UID_WEB2: &str = "0a1b2c3d-2222-4a4a-8b8b-000000000002";
const UID_API0: &str = "0a1b2c3d-3333-4a4a-8b8b-000000000003";
const UID_JOB0: &str = "0a1b2c3d-4444-4a4a-8b8b-000000000004";

#[test]
fn kubelet_pods_are_named_namespace_slash_name_and_selected_by_namespace() {
    run_test(
        Env::builder()
            .pods(["w1", "w2", "api", "job"])
            .kubelet_pod(
                "w1",
                KubeletPod::new(
                    CgroupDriver::Systemd,
                    "burstable",
                    "shop",
                    "web-1",
                    UID_WEB1,
                ),
            )
            .kubelet_pod(
                "w2",
                KubeletPod::new(
                    CgroupDriver::Cgroupfs,
                    "besteffort",
                    "shop",
                    "web-2",
                    UID_WEB2,
                ),
            )
            .kubelet_pod(
                "api",
                KubeletPod::new(
                    CgroupDriver::Systemd,
                    "guaranteed",
                    "blog",
                    "api-0",
                    UID_API0,
                ),
            )
            .kubelet_pod(
                "job",
                KubeletPod::new(
                    CgroupDriver::Cgroupfs,
                    "guaranteed",
                    "batch",
                    "job-0",
                    UID_JOB0,
                ),
            )
            .agent(false),
        |env| {
            let mut cfg = env.base_agent_config()?;
            cfg.pods.push(PodPolicy {
                name: "shop/*".into(),
                acl: Some("+@all -set".into()),
                ..PodPolicy::default()
            });
            cfg.extra_yaml = concat!(
                "capture: {mode: selected, namespaces: [shop, bl*], exclude: ['shop/web-2']}\n",
                "key_rules:\n  - {id: secrets, key: 'secret:*', namespaces: [blog], action: deny}\n",
            )
            .into();
            env.start_agent(cfg)?;
            let t0 = std::time::Instant::now();
            let (w1, w2, api, job) = (env.pod("w1"), env.pod("w2"), env.pod("api"), env.pod("job"));
            // Before the agent has seen a pod connect it cannot name it: in selected mode its
            // first connect is not captured (fail safe). That connect records its cgroup.
            for p in [w1, w2, api, job] {
                ensure!(
                    !went_through_proxy(env, p, "first")?,
                    "unknown pod {} captured in selected mode",
                    p.netns_name()
                );
            }
            wait_until("pods named namespace/name", Duration::from_secs(5), || {
                let rows = env.agent().pods_json()?;
                let names: Vec<&str> = rows.iter().filter_map(|r| r["pod"].as_str()).collect();
                let want = ["shop/web-1", "shop/web-2", "blog/api-0", "batch/job-0"];
                Ok(want.iter().all(|w| names.contains(w)).then_some(()))
            })?;
            let named = t0.elapsed();
            let table = String::from_utf8_lossy(
                &env.agent()
                    .cli()
                    .args(["pods", "--pin-dir"])
                    .arg(env.agent().pin_dir())
                    .output()
                    .context("datamesh-agent pods")?
                    .stdout,
            )
            .into_owned();
            ensure!(
                table.contains("shop/web-1") && table.contains("batch/job-0"),
                "{table}"
            );

            // Capture by namespace glob, minus the exclusion.
            ensure!(
                went_through_proxy(env, w1, "w1")?,
                "shop/web-1 not captured"
            );
            ensure!(
                went_through_proxy(env, api, "api")?,
                "blog/api-0 not captured"
            );
            ensure!(
                !went_through_proxy(env, w2, "w2")?,
                "excluded shop/web-2 captured"
            );
            ensure!(
                !went_through_proxy(env, job, "job")?,
                "batch/job-0 captured"
            );

            // The pod policy by name glob `shop/*` applies to shop/web-1.
            let out = pod_cli(env, w1, &["SET", "k", "v"])?;
            ensure!(out.contains("NOPERM"), "SET from shop/web-1: {out:?}");
            let out = pod_cli(env, api, &["SET", "public", "p"])?;
            ensure!(out.trim() == "OK", "SET from blog/api-0: {out:?}");
            env.redis().command(&[b"SET", b"secret:1", b"s"])?;
            // The key rule by namespace `blog` denies blog/api-0, not shop/web-1.
            let out = pod_cli(env, api, &["GET", "secret:1"])?;
            ensure!(
                out.contains("denied for pod blog/api-0 by key rule secrets"),
                "GET secret from blog/api-0: {out:?}"
            );
            let out = pod_cli(env, w1, &["GET", "secret:1"])?;
            ensure!(out.trim() == "s", "GET secret from shop/web-1: {out:?}");
            // Per-pod metrics carry namespace/name.
            // (Counts reach /metrics a moment after the replies: polled, bounded.)
            let m = wait_until(
                "a per-pod metric for blog/api-0",
                Duration::from_secs(5),
                || {
                    let m =
                        metric_line(env, "datamesh_proxy_pod_commands_total{pod=\"blog/api-0\"")?;
                    Ok((m >= 1).then_some(m))
                },
            );
            ensure!(m.is_ok(), "no per-pod metric for blog/api-0");
            eprintln!("kubelet identity: pods named {named:?} after the first connects");
            Ok(())
        },
    );
}
