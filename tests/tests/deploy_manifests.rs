//! Checks the Kubernetes deployment in `deploy/` without a cluster: YAML lint (yamllint),
//! schema validation of every manifest (kubernetes-validate --strict, against the oldest
//! Kubernetes we support and the newest the validator knows), the agent's own validation of
//! the config the ConfigMap ships (`datamesh-agent check-config`), and the cross-file facts
//! the manifests' comments promise (grace period vs drain, no declared ports but probes on the
//! config's admin port, mounts vs config paths, surge with the upgrade socket). The manifests live in `deploy/base/`; `deploy/` and the canary overlay
//! `deploy/overlays/canary/` are rendered with `kubectl kustomize` and validated the same
//! way, with the facts of a gray release: the stable DaemonSet avoids canary nodes, the
//! canary one runs only there, their selectors never select each other's pods, and both
//! surge and share the upgrade socket and the pin dir (a node changing channel hands its
//! listening sockets and kernel state over like a rolling update).
//!
//! The tools are not Rust crates: yamllint and kubernetes-validate (with its PyYAML, used
//! here to turn YAML into JSON) come from `cargo xtask setup`, kubectl with the machine
//! (setup checks it). A missing tool or agent binary fails the test with the command that
//! provides it; nothing is skipped.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Stricter than yamllint's `relaxed`: the default rules, as errors, with 100-column lines.
/// The promtool unit tests' expected alerts hold rendered annotations (long lines of data).
const YAMLLINT_CONFIG: &str = "{extends: default, rules: {line-length: {max: 100, \
     ignore: ['deploy/monitoring/tests/']}}}";
/// The same for the config embedded in the ConfigMap, which is a file body, not a stream of
/// documents, so it has no `---`.
const YAMLLINT_EMBEDDED_CONFIG: &str =
    "{extends: default, rules: {line-length: {max: 100}, document-start: disable}}";

/// The oldest Kubernetes the manifests must stay valid for. The newest is whatever the
/// installed kubernetes-validate defaults to.
const MIN_KUBERNETES: &str = "1.30.0";

/// Every object the deployment consists of, by file, as kubernetes-validate names them.
const EXPECTED_OBJECTS: &[(&str, &str)] = &[
    ("namespace.yaml", "namespace/datamesh-system"),
    ("serviceaccount.yaml", "serviceaccount/datamesh-agent"),
    ("rbac.yaml", "clusterrole/datamesh-agent"),
    ("rbac.yaml", "clusterrolebinding/datamesh-agent"),
    ("resourcequota.yaml", "resourcequota/datamesh-critical-pods"),
    ("configmap.yaml", "configmap/datamesh-agent-config"),
    ("daemonset.yaml", "daemonset/datamesh-agent"),
    ("uninstall-job.yaml", "job/datamesh-uninstall-NODE_NAME"),
];

/// Not a Kubernetes object (kustomize's own file), so not schema-validated.
const KUSTOMIZATION: &str = "kustomization.yaml";
/// An operator applies this one per node at removal; it must never be part of the install.
const UNINSTALL_JOB: &str = "uninstall-job.yaml";

/// Where the DaemonSet mounts the ConfigMap, and what the agent is told to read.
const CONFIG_FILE_IN_POD: &str = "/etc/datamesh/config.yaml";

/// Stands in for `status.hostIP` when the agent checks the config: the DaemonSet always sets
/// DATAMESH_PROXY_ADDRESS. An address of the test range; nothing is sent to it.
const SAMPLE_NODE_IP: &str = "198.18.0.1";

fn project_root() -> PathBuf {
    // The tests crate sits directly under the workspace root.
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The manifests (the stable channel): a kustomization of its own, because kustomize refuses
/// an overlay inside its base's directory.
fn deploy_dir() -> PathBuf {
    project_root().join("deploy/base")
}

/// Runs an external tool; a tool that is not installed is an error naming the setup step.
fn run_tool(tool: &str, args: &[OsString]) -> Result<Output> {
    match Command::new(tool)
        .args(args)
        .current_dir(project_root())
        .output()
    {
        Ok(out) => Ok(out),
        Err(e) if e.kind() == ErrorKind::NotFound && tool == "kubectl" => bail!(
            "`kubectl` not found on PATH: run `cargo xtask setup` (it checks for a kubectl \
             with kustomize v4 or newer, which this machine kind ships)"
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "`{tool}` not found on PATH: run `cargo xtask setup` (it installs yamllint and \
             kubernetes-validate with pip)"
        ),
        Err(e) => Err(e).with_context(|| format!("running `{tool}`")),
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `.yaml`/`.yml` files in deploy/, sorted.
fn yaml_files() -> Result<Vec<PathBuf>> {
    let dir = deploy_dir();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no YAML files in {}", dir.display());
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every manifest that is a Kubernetes object: all YAML in deploy/ but the kustomization.
fn manifest_files() -> Result<Vec<PathBuf>> {
    Ok(yaml_files()?
        .into_iter()
        .filter(|p| file_name(p) != KUSTOMIZATION)
        .collect())
}

/// Parses a YAML stream into its documents as JSON, with the PyYAML that kubernetes-validate
/// itself parses manifests with (so both see the same objects).
fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        with open(sys.argv[1]) as f:\n    \
            docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let out = match Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("`python3` not found on PATH: run `cargo xtask setup`")
        }
        Err(e) => return Err(e).context("running python3"),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named 'yaml'") {
            bail!(
                "python3 has no PyYAML: run `cargo xtask setup` (PyYAML comes with \
                 kubernetes-validate)\n{stderr}"
            );
        }
        bail!(
            "parsing {} as YAML failed: {}",
            path.display(),
            describe(&out)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reading the JSON form of {}", path.display()))
}

/// The single document of kind `kind` in a manifest file.
fn object_of_kind(file: &str, kind: &str) -> Result<Value> {
    let docs = yaml_documents(&deploy_dir().join(file))?;
    let mut found = docs
        .into_iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind));
    let obj = found
        .next()
        .with_context(|| format!("deploy/{file} has no {kind}"))?;
    ensure!(
        found.next().is_none(),
        "deploy/{file} has more than one {kind}"
    );
    Ok(obj)
}

/// `value` at a JSON pointer, or an error naming what was looked for.
fn at<'a>(value: &'a Value, pointer: &str, what: &str) -> Result<&'a Value> {
    value
        .pointer(pointer)
        .with_context(|| format!("{what}: nothing at {pointer}"))
}

fn str_at<'a>(value: &'a Value, pointer: &str, what: &str) -> Result<&'a str> {
    at(value, pointer, what)?
        .as_str()
        .with_context(|| format!("{what}: {pointer} is not a string"))
}

fn u64_at(value: &Value, pointer: &str, what: &str) -> Result<u64> {
    at(value, pointer, what)?
        .as_u64()
        .with_context(|| format!("{what}: {pointer} is not a non-negative integer"))
}

/// A file in the temp dir, removed when dropped (also when the test fails).
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, contents: &str) -> Result<Self> {
        // Tests run in parallel and may use the same tag: a sequence number keeps them apart.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "datamesh-deploy-{tag}-{}-{seq}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Best effort: a leftover temp file is harmless and must not mask the test's result.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The agent config embedded in the ConfigMap, as text.
fn embedded_config() -> Result<String> {
    let cm = object_of_kind("configmap.yaml", "ConfigMap")?;
    Ok(str_at(&cm, "/data/config.yaml", "ConfigMap datamesh-agent-config")?.to_owned())
}

fn agent_container(ds: &Value) -> Result<&Value> {
    let containers = at(ds, "/spec/template/spec/containers", "DaemonSet")?
        .as_array()
        .context("DaemonSet: containers is not a list")?;
    containers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some("agent"))
        .context("DaemonSet has no container named `agent`")
}

/// The agent container's volumeMount whose volume is `volume`.
fn mount_of<'a>(container: &'a Value, volume: &str) -> Result<&'a Value> {
    at(container, "/volumeMounts", "agent container")?
        .as_array()
        .context("agent container: volumeMounts is not a list")?
        .iter()
        .find(|m| m.get("name").and_then(Value::as_str) == Some(volume))
        .with_context(|| format!("agent container does not mount volume `{volume}`"))
}

/// The DaemonSet's volume named `volume`.
fn volume_of<'a>(ds: &'a Value, volume: &str) -> Result<&'a Value> {
    at(ds, "/spec/template/spec/volumes", "DaemonSet")?
        .as_array()
        .context("DaemonSet: volumes is not a list")?
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(volume))
        .with_context(|| format!("DaemonSet has no volume `{volume}`"))
}

fn port_of(addr: &str) -> Result<u64> {
    let (_, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("`{addr}` has no port"))?;
    port.parse()
        .with_context(|| format!("`{addr}` has no numeric port"))
}

#[test]
fn yamllint_passes() -> Result<()> {
    let mut args: Vec<OsString> = ["--strict", "-f", "parsable", "-d", YAMLLINT_CONFIG]
        .iter()
        .map(OsString::from)
        .collect();
    // Relative to the project root (where tools run), so the ignore pattern above matches.
    args.push("deploy".into());
    let out = run_tool("yamllint", &args)?;
    ensure!(
        out.status.success(),
        "yamllint found problems in deploy/:\n{}",
        describe(&out)
    );

    // The config inside the ConfigMap is a string to yamllint above; lint it as the YAML the
    // agent reads.
    let config = TempFile::new("lint-config", &embedded_config()?)?;
    let mut args: Vec<OsString> = ["--strict", "-f", "parsable", "-d", YAMLLINT_EMBEDDED_CONFIG]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(config.0.clone().into_os_string());
    let out = run_tool("yamllint", &args)?;
    ensure!(
        out.status.success(),
        "yamllint found problems in the ConfigMap's config.yaml:\n{}",
        describe(&out)
    );
    Ok(())
}

#[test]
fn manifests_validate_against_kubernetes_schemas() -> Result<()> {
    let manifests = manifest_files()?;
    let names: BTreeSet<String> = manifests.iter().map(|p| file_name(p)).collect();
    for (file, _) in EXPECTED_OBJECTS {
        ensure!(names.contains(*file), "deploy/{file} is missing");
    }

    // No `-k`: the validator's newest Kubernetes.
    let versions: [Option<&str>; 2] = [Some(MIN_KUBERNETES), None];
    for version in versions {
        let mut args: Vec<OsString> = vec!["--strict".into()];
        if let Some(v) = version {
            args.push("-k".into());
            args.push(v.into());
        }
        args.extend(manifests.iter().map(|p| p.clone().into_os_string()));
        let out = run_tool("kubernetes-validate", &args)?;
        let label = version.unwrap_or("(newest known to kubernetes-validate)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "kubernetes-validate --strict failed for Kubernetes {label}:\n{}",
            describe(&out)
        );
        // kubernetes-validate exits 0 when it has no schema for an object (a misspelt kind
        // or apiVersion) and only warns: such an object was not validated at all.
        let suspicious: Vec<&str> = stdout
            .lines()
            .filter(|l| !l.starts_with("INFO "))
            .filter(|l| !l.trim().is_empty())
            .collect();
        ensure!(
            suspicious.is_empty(),
            "kubernetes-validate did not validate everything for Kubernetes {label}:\n{}",
            suspicious.join("\n")
        );
        for (file, object) in EXPECTED_OBJECTS {
            let passed = stdout
                .lines()
                .any(|l| l.contains(&format!("{file} passed for resource {object} ")));
            ensure!(
                passed,
                "kubernetes-validate did not report {object} from deploy/{file} as valid for \
                 Kubernetes {label}:\n{}",
                describe(&out)
            );
        }
        for path in &manifests {
            let file = file_name(path);
            ensure!(
                stdout
                    .lines()
                    .any(|l| l.contains(&format!("{file} passed for resource "))),
                "deploy/{file} holds no object kubernetes-validate checked:\n{}",
                describe(&out)
            );
        }
    }
    Ok(())
}

#[test]
fn kustomization_installs_everything_but_the_uninstall_job() -> Result<()> {
    let docs = yaml_documents(&deploy_dir().join(KUSTOMIZATION))?;
    ensure!(
        docs.len() == 1,
        "deploy/{KUSTOMIZATION} must hold one document"
    );
    let listed: BTreeSet<String> = at(&docs[0], "/resources", KUSTOMIZATION)?
        .as_array()
        .context("kustomization: resources is not a list")?
        .iter()
        .map(|r| {
            r.as_str()
                .map(str::to_owned)
                .context("kustomization: non-string resource")
        })
        .collect::<Result<_>>()?;
    let expected: BTreeSet<String> = manifest_files()?
        .iter()
        .map(|p| file_name(p))
        .filter(|n| n != UNINSTALL_JOB)
        .collect();
    ensure!(
        !listed.contains(UNINSTALL_JOB),
        "deploy/{KUSTOMIZATION} lists {UNINSTALL_JOB}: `kubectl apply -k` would uninstall"
    );
    ensure!(
        listed == expected,
        "deploy/{KUSTOMIZATION} resources {listed:?} differ from the manifests {expected:?}"
    );
    Ok(())
}

/// The agent binary: `$DATAMESH_AGENT_BIN` (set by `cargo xtask test`, as for the harness) or
/// `<root>/target/debug/datamesh-agent`.
fn agent_bin() -> PathBuf {
    match std::env::var_os("DATAMESH_AGENT_BIN").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => project_root().join("target/debug/datamesh-agent"),
    }
}

#[test]
fn configmap_config_passes_agent_check_config() -> Result<()> {
    let agent = agent_bin();
    ensure!(
        agent.is_file(),
        "datamesh-agent binary not found at {}: run `cargo xtask test` (it builds the eBPF \
         object and the agent before the tests), or set DATAMESH_AGENT_BIN",
        agent.display()
    );
    // The config reads passwords from the Secret's mount: stand-in files for them.
    let ds = object_of_kind("daemonset.yaml", "DaemonSet")?;
    let mount = str_at(
        mount_of(agent_container(&ds)?, "secrets")?,
        "/mountPath",
        "secrets mount",
    )?
    .to_owned();
    let secrets =
        std::env::temp_dir().join(format!("datamesh-deploy-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&secrets);
    std::fs::create_dir_all(&secrets)?;
    // The stable channel's config, and the canary overlay's own copy (an operator changes
    // it there to try a config on canary nodes; it must stay valid too).
    let canary = canary_config_text()?;
    let configs = [
        ("deploy/base/configmap.yaml", embedded_config()?),
        ("deploy/overlays/canary (rendered)", canary),
    ];
    let result = (|| -> Result<()> {
        for (source, text) in configs {
            let parsed_file = TempFile::new("parse-config", &text)?;
            let parsed = yaml_documents(&parsed_file.0)?
                .into_iter()
                .next()
                .context("the ConfigMap's config.yaml is empty")?;
            for path in secret_file_paths(&parsed) {
                let name = Path::new(&path)
                    .file_name()
                    .context("a *_file path without a file name")?;
                std::fs::write(secrets.join(name), "stand-in\n")?;
            }
            let text = text.replace(&format!("{mount}/"), &format!("{}/", secrets.display()));
            let config = TempFile::new("check-config", &text)?;
            let out = Command::new(&agent)
                .arg("check-config")
                .arg("--config")
                .arg(&config.0)
                // As the DaemonSet does from status.hostIP.
                .env("DATAMESH_PROXY_ADDRESS", SAMPLE_NODE_IP)
                .output()
                .with_context(|| format!("running {}", agent.display()))?;
            ensure!(
                out.status.success(),
                "`datamesh-agent check-config` rejected the config of {source}:\n{}",
                describe(&out)
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&secrets);
    result
}

/// Every `*_file` value in the config (password_file, sentinel_password_file,
/// admin_token_file), at any depth.
fn secret_file_paths(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::String(s) if k.ends_with("_file") => out.push(s.clone()),
                    other => out.extend(secret_file_paths(other)),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| out.extend(secret_file_paths(v))),
        _ => {}
    }
    out
}

#[test]
fn daemonset_agrees_with_its_config() -> Result<()> {
    let ds = object_of_kind("daemonset.yaml", "DaemonSet")?;
    let config_text = TempFile::new("facts-config", &embedded_config()?)?;
    let config = yaml_documents(&config_text.0)?
        .into_iter()
        .next()
        .context("the ConfigMap's config.yaml is empty")?;
    let pod = at(&ds, "/spec/template/spec", "DaemonSet")?;
    let agent = agent_container(&ds)?;

    ensure!(
        pod.get("hostNetwork") == Some(&Value::Bool(true)),
        "DaemonSet must use hostNetwork: the proxy listens on the node IP pods are sent to"
    );
    ensure!(
        str_at(pod, "/dnsPolicy", "DaemonSet")? == "ClusterFirstWithHostNet",
        "DaemonSet with hostNetwork needs dnsPolicy ClusterFirstWithHostNet"
    );
    ensure!(
        at(agent, "/securityContext/privileged", "agent container")? == &Value::Bool(true),
        "agent container must be privileged"
    );

    // Grace period vs drain: the kubelet must not SIGKILL the agent mid-drain.
    let drain_ms = u64_at(&config, "/drain_timeout_ms", "config.yaml")?;
    let grace_s = u64_at(pod, "/terminationGracePeriodSeconds", "DaemonSet")?;
    ensure!(
        grace_s * 1000 > drain_ms,
        "terminationGracePeriodSeconds {grace_s} s does not exceed drain_timeout_ms {drain_ms}"
    );

    // The proxy address comes from the node.
    let env = at(agent, "/env", "agent container")?
        .as_array()
        .context("agent container: env is not a list")?;
    let proxy_env = env
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some("DATAMESH_PROXY_ADDRESS"))
        .context("agent container does not set DATAMESH_PROXY_ADDRESS")?;
    ensure!(
        str_at(
            proxy_env,
            "/valueFrom/fieldRef/fieldPath",
            "DATAMESH_PROXY_ADDRESS"
        )? == "status.hostIP",
        "DATAMESH_PROXY_ADDRESS must come from status.hostIP"
    );

    // The config file the agent is told to read is the mounted ConfigMap.
    let args: Vec<&str> = at(agent, "/args", "agent container")?
        .as_array()
        .context("agent container: args is not a list")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        args.windows(2)
            .any(|w| w == ["--config", CONFIG_FILE_IN_POD]),
        "agent args {args:?} do not read {CONFIG_FILE_IN_POD}"
    );
    let config_dir = str_at(mount_of(agent, "config")?, "/mountPath", "config mount")?;
    ensure!(
        Path::new(CONFIG_FILE_IN_POD).parent() == Some(Path::new(config_dir)),
        "the ConfigMap is mounted at {config_dir}, not where {CONFIG_FILE_IN_POD} is"
    );
    ensure!(
        str_at(
            volume_of(&ds, "config")?,
            "/configMap/name",
            "config volume"
        )? == "datamesh-agent-config",
        "the config volume is not the datamesh-agent-config ConfigMap"
    );

    // Paths in the config are inside the host mounts that provide them.
    let bpffs = mount_of(agent, "bpffs")?;
    let bpffs_path = str_at(bpffs, "/mountPath", "bpffs mount")?;
    ensure!(
        str_at(bpffs, "/mountPropagation", "bpffs mount")? == "Bidirectional",
        "bpffs must be mounted with Bidirectional propagation"
    );
    let pin_dir = str_at(&config, "/pin_dir", "config.yaml")?;
    ensure!(
        Path::new(pin_dir).starts_with(bpffs_path),
        "pin_dir {pin_dir} is not under the bpffs mount {bpffs_path}"
    );
    let cgroup_mount = str_at(mount_of(agent, "cgroup")?, "/mountPath", "cgroup mount")?;
    let cgroup_path = str_at(&config, "/cgroup_path", "config.yaml")?;
    ensure!(
        Path::new(cgroup_path).starts_with(cgroup_mount) && cgroup_path != cgroup_mount,
        "cgroup_path {cgroup_path} must be a cgroup below the host cgroup2 mount {cgroup_mount} \
         (never the root)"
    );
    let cgroup_root = str_at(&config, "/cgroup_root", "config.yaml")?;
    ensure!(
        cgroup_root == cgroup_mount,
        "cgroup_root {cgroup_root} is not the host cgroup mount {cgroup_mount} (pod identity)"
    );
    let logs = mount_of(agent, "pod-logs")?;
    ensure!(
        str_at(logs, "/mountPath", "pod-logs mount")? == str_at(&config, "/pod_log_dir", "config")?
            && logs.get("readOnly") == Some(&Value::Bool(true)),
        "pod_log_dir is not where the host's /var/log/pods is mounted read-only"
    );
    let netns = mount_of(agent, "netns")?;
    ensure!(
        str_at(netns, "/mountPath", "netns mount")? == str_at(&config, "/netns_dir", "config")?,
        "netns_dir is not where the host's /var/run/netns is mounted"
    );
    ensure!(
        str_at(netns, "/mountPropagation", "netns mount")? == "HostToContainer",
        "the netns mount needs HostToContainer propagation to see pods created later"
    );

    // Secrets: the config names files of the read-only Secret mount, never inline passwords.
    let secrets = mount_of(agent, "secrets")?;
    let secrets_path = str_at(secrets, "/mountPath", "secrets mount")?;
    ensure!(
        secrets.get("readOnly") == Some(&Value::Bool(true)),
        "the secrets volume must be mounted readOnly"
    );
    ensure!(
        volume_of(&ds, "secrets")?
            .pointer("/secret/secretName")
            .and_then(Value::as_str)
            == Some("datamesh-agent-secrets"),
        "the secrets volume is not the Secret datamesh-agent-secrets"
    );
    let files = secret_file_paths(&config);
    ensure!(
        !files.is_empty(),
        "config.yaml reads no password from a file: deploy/ must show password_file"
    );
    for f in &files {
        ensure!(
            Path::new(f).starts_with(secrets_path),
            "{f} is not under the Secret's mount {secrets_path}"
        );
    }
    let inline = config.to_string();
    ensure!(
        !inline.contains("\"password\"") && !inline.contains("\"sentinel_password\""),
        "config.yaml holds an inline password: use password_file"
    );

    // No declared ports: with hostNetwork each would become a hostPort and keep the surge pod
    // of a rolling update off the node. Deployed endpoints still need fixed ports.
    ensure!(
        agent
            .get("ports")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty),
        "the agent container declares ports: with hostNetwork they become hostPorts, and the \
         scheduler would not place a rolling update's surge pod beside the old agent"
    );
    let admin = str_at(&config, "/admin_listen", "config.yaml")?;
    for endpoint in at(&config, "/endpoints", "config.yaml")?
        .as_array()
        .context("config.yaml: endpoints is not a list")?
    {
        ensure!(
            u64_at(endpoint, "/proxy_port", "endpoint")? != 0,
            "deployed endpoints need a fixed proxy_port (the port pods are sent to)"
        );
    }
    check_handover(&ds, &config)?;
    let admin_host = admin.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = at(agent, &format!("/{probe}/httpGet"), "agent container")?;
        let port = match at(get, "/port", probe)? {
            Value::Number(n) => n.as_u64().context("probe port")?,
            other => bail!("{probe}: port {other} must be a number (no ports are declared)"),
        };
        ensure!(
            port == port_of(admin)?,
            "{probe} port {port} is not admin_listen {admin}"
        );
        if admin_host == "127.0.0.1" {
            ensure!(
                get.get("host").and_then(Value::as_str) == Some("127.0.0.1"),
                "admin_listen is loopback-only, so {probe} must set host 127.0.0.1 (the \
                 default target is the pod IP)"
            );
        }
    }
    ensure!(
        str_at(agent, "/readinessProbe/httpGet/path", "readinessProbe")? == "/ready",
        "readinessProbe must ask /ready"
    );
    Ok(())
}

/// The node label that puts a node in the canary channel.
const CHANNEL_LABEL: &str = "datamesh.io/channel";
/// The canary overlay, relative to the project root.
const CANARY_OVERLAY: &str = "deploy/overlays/canary";

/// `kubectl kustomize <dir>` (relative to the project root): the rendered YAML and its
/// objects as JSON.
fn kustomize(dir: &str) -> Result<(String, Vec<Value>)> {
    let out = run_tool("kubectl", &["kustomize".into(), dir.into()])?;
    ensure!(
        out.status.success(),
        "`kubectl kustomize {dir}` failed (kubectl needs kustomize v4 or newer):\n{}",
        describe(&out)
    );
    let text = String::from_utf8(out.stdout).context("kustomize output is not UTF-8")?;
    let file = TempFile::new(&format!("render-{}", dir.replace('/', "-")), &text)?;
    Ok((text, yaml_documents(&file.0)?))
}

/// `kind/name` of every object, as kubernetes-validate names them.
fn object_names(docs: &[Value]) -> Result<BTreeSet<String>> {
    docs.iter()
        .map(|d| {
            Ok(format!(
                "{}/{}",
                str_at(d, "/kind", "object")?.to_lowercase(),
                str_at(d, "/metadata/name", "object")?
            ))
        })
        .collect()
}

fn only_of_kind<'a>(docs: &'a [Value], kind: &str, what: &str) -> Result<&'a Value> {
    let mut found = docs
        .iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind));
    let obj = found
        .next()
        .with_context(|| format!("{what} has no {kind}"))?;
    ensure!(found.next().is_none(), "{what} has more than one {kind}");
    Ok(obj)
}

#[test]
fn rendered_channels_validate_against_kubernetes_schemas() -> Result<()> {
    let stable: BTreeSet<String> = EXPECTED_OBJECTS
        .iter()
        .filter(|(file, _)| *file != UNINSTALL_JOB)
        .map(|(_, o)| (*o).to_owned())
        .collect();
    let canary: BTreeSet<String> = [
        "configmap/datamesh-agent-config-canary",
        "daemonset/datamesh-agent-canary",
    ]
    .map(str::to_owned)
    .into();
    for (dir, expected) in [("deploy", stable), (CANARY_OVERLAY, canary)] {
        let (text, docs) = kustomize(dir)?;
        let got = object_names(&docs)?;
        // The overlay must hold only the canary's own objects: `kubectl delete -k` of it
        // must never remove the namespace or anything the stable channel needs.
        ensure!(
            got == expected,
            "`kubectl kustomize {dir}` renders {got:?}, expected exactly {expected:?}"
        );
        let rendered = TempFile::new(&format!("validate-{}", dir.replace('/', "-")), &text)?;
        let versions: [Option<&str>; 2] = [Some(MIN_KUBERNETES), None];
        for version in versions {
            let mut args: Vec<OsString> = vec!["--strict".into()];
            if let Some(v) = version {
                args.push("-k".into());
                args.push(v.into());
            }
            args.push(rendered.0.clone().into_os_string());
            let out = run_tool("kubernetes-validate", &args)?;
            let label = version.unwrap_or("(newest known to kubernetes-validate)");
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "kubernetes-validate --strict failed on `kubectl kustomize {dir}` for \
                 Kubernetes {label}:\n{}",
                describe(&out)
            );
            let suspicious: Vec<&str> = stdout
                .lines()
                .filter(|l| !l.starts_with("INFO "))
                .filter(|l| !l.trim().is_empty())
                .collect();
            ensure!(
                suspicious.is_empty(),
                "kubernetes-validate did not validate all of `kubectl kustomize {dir}` for \
                 Kubernetes {label}:\n{}",
                suspicious.join("\n")
            );
            for object in &expected {
                ensure!(
                    stdout
                        .lines()
                        .any(|l| l.contains(&format!("passed for resource {object} "))),
                    "kubernetes-validate did not report {object} of `kubectl kustomize {dir}` \
                     as valid for Kubernetes {label}:\n{}",
                    describe(&out)
                );
            }
        }
    }
    Ok(())
}

/// Whether a nodeSelectorTerm's expressions all hold for a node with `labels` (the
/// operators the scheduler knows for labels; Gt/Lt are not used here).
fn term_matches(term: &Value, labels: &[(&str, &str)]) -> Result<bool> {
    let exprs = term
        .get("matchExpressions")
        .and_then(Value::as_array)
        .context("a nodeSelectorTerm without matchExpressions")?;
    for e in exprs {
        let key = str_at(e, "/key", "matchExpression")?;
        let op = str_at(e, "/operator", "matchExpression")?;
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let have = labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let ok = match op {
            "In" => have.is_some_and(|v| values.contains(&v)),
            "NotIn" => have.is_none_or(|v| !values.contains(&v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => bail!("unexpected nodeAffinity operator {other}"),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the DaemonSet's pods may be scheduled on a node with `labels`: its nodeSelector
/// and its required node affinity (terms are ORed).
fn schedules_on(ds: &Value, labels: &[(&str, &str)]) -> Result<bool> {
    let pod = at(ds, "/spec/template/spec", "DaemonSet")?;
    if let Some(sel) = pod.get("nodeSelector").and_then(Value::as_object) {
        for (k, v) in sel {
            if !labels
                .iter()
                .any(|(lk, lv)| lk == k && Some(*lv) == v.as_str())
            {
                return Ok(false);
            }
        }
    }
    let terms = at(
        pod,
        "/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms",
        "DaemonSet (the channels are kept apart by required node affinity)",
    )?
    .as_array()
    .context("nodeSelectorTerms is not a list")?;
    for t in terms {
        if term_matches(t, labels)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `selector` (matchLabels) selects a pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> Result<bool> {
    let sel = selector.as_object().context("matchLabels is not a map")?;
    ensure!(!sel.is_empty(), "an empty selector selects every pod");
    Ok(sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The rolling update surges (the new agent starts beside the old one and takes its sockets
/// over `upgrade_socket`), which the hostPath mount of the socket's directory makes possible.
fn check_handover(ds: &Value, config: &Value) -> Result<()> {
    let ru = at(ds, "/spec/updateStrategy/rollingUpdate", "DaemonSet")?;
    let is = |v: Option<&Value>, n: u64| {
        v.is_some_and(|v| v == &Value::from(n) || v == &Value::from(n.to_string()))
    };
    ensure!(
        is(ru.get("maxSurge"), 1) && is(ru.get("maxUnavailable"), 0),
        "{}: the rolling update must surge (maxSurge 1, maxUnavailable 0): the new agent \
         takes the old one's listening sockets over, so both run at once",
        str_at(ds, "/metadata/name", "DaemonSet")?
    );
    let sock = str_at(config, "/upgrade_socket", "config")?;
    let dir = Path::new(sock)
        .parent()
        .context("upgrade_socket has no directory")?;
    let agent = agent_container(ds)?;
    let mounts = at(agent, "/volumeMounts", "agent container")?
        .as_array()
        .context("volumeMounts is not a list")?;
    let mount = mounts
        .iter()
        .find(|m| m.get("mountPath").and_then(Value::as_str).map(Path::new) == Some(dir))
        .with_context(|| format!("no volume is mounted at {} (upgrade_socket)", dir.display()))?;
    let vol = volume_of(ds, str_at(mount, "/name", "volume mount")?)?;
    ensure!(
        vol.pointer("/hostPath/path").and_then(Value::as_str) == Some("/run/datamesh"),
        "the upgrade socket's directory must be the node's /run/datamesh (hostPath), shared by \
         the old and the new agent pod"
    );
    Ok(())
}

/// The config.yaml of the ConfigMap the DaemonSet mounts, among `docs`, parsed.
fn mounted_config(ds: &Value, docs: &[Value], what: &str) -> Result<(String, Value)> {
    let name = str_at(volume_of(ds, "config")?, "/configMap/name", "config volume")?;
    let cm = docs
        .iter()
        .find(|d| {
            d.get("kind").and_then(Value::as_str) == Some("ConfigMap")
                && d.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
        })
        .with_context(|| format!("{what} mounts ConfigMap {name}, which it does not render"))?;
    let text = str_at(cm, "/data/config.yaml", "ConfigMap")?.to_owned();
    let file = TempFile::new(&format!("cfg-{name}"), &text)?;
    let parsed = yaml_documents(&file.0)?
        .into_iter()
        .next()
        .with_context(|| format!("ConfigMap {name}'s config.yaml is empty"))?;
    Ok((text, parsed))
}

/// The canary overlay's rendered config.yaml (for check-config).
fn canary_config_text() -> Result<String> {
    let (_, docs) = kustomize(CANARY_OVERLAY)?;
    let ds = only_of_kind(&docs, "DaemonSet", CANARY_OVERLAY)?;
    Ok(mounted_config(ds, &docs, CANARY_OVERLAY)?.0)
}

/// `name:tag` an overlay's or the base's `images:` entry sets.
fn kustomize_image(file: &Path) -> Result<String> {
    let docs = yaml_documents(file)?;
    let k = docs.first().context("empty kustomization")?;
    let img = at(k, "/images/0", &file.display().to_string())?;
    Ok(format!(
        "{}:{}",
        str_at(img, "/newName", "images[0]")?,
        str_at(img, "/newTag", "images[0]")?
    ))
}

#[test]
fn canary_and_stable_never_run_on_one_node() -> Result<()> {
    let (_, stable_docs) = kustomize("deploy")?;
    let (_, canary_docs) = kustomize(CANARY_OVERLAY)?;
    let stable = only_of_kind(&stable_docs, "DaemonSet", "deploy")?;
    let canary = only_of_kind(&canary_docs, "DaemonSet", CANARY_OVERLAY)?;

    // Exactly one channel schedules on each kind of node.
    let os = ("kubernetes.io/os", "linux");
    for (node, want_stable) in [
        (vec![os], true),
        (vec![os, (CHANNEL_LABEL, "stable")], true),
        (vec![os, (CHANNEL_LABEL, "canary")], false),
    ] {
        let s = schedules_on(stable, &node)?;
        let c = schedules_on(canary, &node)?;
        ensure!(
            s == want_stable && c != want_stable,
            "on a node labelled {node:?} the stable agent would run: {s}, the canary: {c} \
             (exactly one must, the canary only on {CHANNEL_LABEL}=canary)"
        );
    }

    // Names and selectors: two DaemonSets, neither selecting the other's pods.
    let name = |ds: &Value| -> Result<String> {
        Ok(str_at(ds, "/metadata/name", "DaemonSet")?.to_owned())
    };
    ensure!(
        name(stable)? == "datamesh-agent" && name(canary)? == "datamesh-agent-canary",
        "DaemonSets are {} and {}",
        name(stable)?,
        name(canary)?
    );
    for ds in [stable, canary] {
        ensure!(
            str_at(ds, "/metadata/namespace", "DaemonSet")? == "datamesh-system",
            "DaemonSet {} is not in datamesh-system",
            name(ds)?
        );
    }
    let sel = |ds: &Value| -> Result<Value> {
        Ok(at(ds, "/spec/selector/matchLabels", "DaemonSet")?.clone())
    };
    let labels = |ds: &Value| -> Result<Value> {
        Ok(at(ds, "/spec/template/metadata/labels", "DaemonSet")?.clone())
    };
    ensure!(
        selects(&sel(stable)?, &labels(stable)?)? && selects(&sel(canary)?, &labels(canary)?)?,
        "a DaemonSet's selector does not select its own pods"
    );
    ensure!(
        !selects(&sel(stable)?, &labels(canary)?)?,
        "the stable DaemonSet's selector {} selects the canary's pods {}",
        sel(stable)?,
        labels(canary)?
    );
    ensure!(
        !selects(&sel(canary)?, &labels(stable)?)?,
        "the canary DaemonSet's selector {} selects the stable pods {}",
        sel(canary)?,
        labels(stable)?
    );
    ensure!(
        labels(canary)?.get(CHANNEL_LABEL).and_then(Value::as_str) == Some("canary"),
        "canary pods must carry {CHANNEL_LABEL}: canary (dashboards tell channels apart by it)"
    );

    // Both hand over: a node changing channel (or a rolling update of either) starts the new
    // agent beside the old one, which passes it the listening sockets.
    let (_, stable_cfg_h) = mounted_config(stable, &stable_docs, "deploy")?;
    let (_, canary_cfg_h) = mounted_config(canary, &canary_docs, CANARY_OVERLAY)?;
    check_handover(stable, &stable_cfg_h)?;
    check_handover(canary, &canary_cfg_h)?;
    ensure!(
        str_at(&stable_cfg_h, "/upgrade_socket", "stable config")?
            == str_at(&canary_cfg_h, "/upgrade_socket", "canary config")?,
        "stable and canary configs use different upgrade sockets: a node changing channel \
         could not hand its sockets over"
    );

    // Each mounts its own ConfigMap; both configs use the node's one pin dir (the canary
    // re-adopts the node's pinned data plane as an upgrade would) and listen where their
    // DaemonSet declares.
    let (_, stable_cfg) = mounted_config(stable, &stable_docs, "deploy")?;
    let (_, canary_cfg) = mounted_config(canary, &canary_docs, CANARY_OVERLAY)?;
    ensure!(
        str_at(
            volume_of(canary, "config")?,
            "/configMap/name",
            "config volume"
        )? == "datamesh-agent-config-canary",
        "the canary DaemonSet does not mount its own ConfigMap datamesh-agent-config-canary"
    );
    ensure!(
        str_at(&stable_cfg, "/pin_dir", "stable config")?
            == str_at(&canary_cfg, "/pin_dir", "canary config")?,
        "stable and canary configs use different pin dirs: a node changing channel would keep \
         the old channel's programs attached beside the new ones"
    );
    for (ds, cfg) in [(stable, &stable_cfg), (canary, &canary_cfg)] {
        let admin = port_of(str_at(cfg, "/admin_listen", "config")?)?;
        let probe = u64_at(
            agent_container(ds)?,
            "/readinessProbe/httpGet/port",
            "readinessProbe",
        )?;
        ensure!(
            probe == admin,
            "{} probes port {probe} but its config's admin_listen is port {admin}",
            name(ds)?
        );
    }

    // Both run as the base's ServiceAccount, which only the stable channel installs.
    let sa = |ds: &Value| -> Result<String> {
        Ok(str_at(ds, "/spec/template/spec/serviceAccountName", "DaemonSet")?.to_owned())
    };
    ensure!(
        sa(stable)? == sa(canary)?
            && object_names(&stable_docs)?.contains(&format!("serviceaccount/{}", sa(stable)?)),
        "the canary runs as {}, not the stable channel's ServiceAccount {}",
        sa(canary)?,
        sa(stable)?
    );

    // Each runs the image its kustomization names.
    let image = |ds: &Value| -> Result<String> {
        Ok(str_at(agent_container(ds)?, "/image", "agent container")?.to_owned())
    };
    let want_stable = kustomize_image(&deploy_dir().join(KUSTOMIZATION))?;
    let want_canary = kustomize_image(&project_root().join(CANARY_OVERLAY).join(KUSTOMIZATION))?;
    ensure!(
        image(stable)? == want_stable && image(canary)? == want_canary,
        "images: stable {} (want {want_stable}), canary {} (want {want_canary})",
        image(stable)?,
        image(canary)?
    );
    Ok(())
}
