//! Checks the Kubernetes deployment in `deploy/` without a cluster: YAML lint (yamllint),
//! schema validation of every manifest (kubernetes-validate --strict, against the oldest
//! Kubernetes we support and the newest the validator knows), the agent's own validation of
//! the config the ConfigMap ships (`datamesh-agent check-config`), and the cross-file facts
//! the manifests' comments promise (grace period vs drain, declared ports vs config, mounts
//! vs config paths).
//!
//! The tools are not Rust crates: yamllint and kubernetes-validate (with its PyYAML, used
//! here to turn YAML into JSON) come from `cargo xtask setup`. A missing tool or agent binary
//! fails the test with the command that provides it; nothing is skipped.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Stricter than yamllint's `relaxed`: the default rules, as errors, with 100-column lines.
const YAMLLINT_CONFIG: &str = "{extends: default, rules: {line-length: {max: 100}}}";
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

fn deploy_dir() -> PathBuf {
    project_root().join("deploy")
}

/// Runs an external tool; a tool that is not installed is an error naming the setup step.
fn run_tool(tool: &str, args: &[OsString]) -> Result<Output> {
    match Command::new(tool)
        .args(args)
        .current_dir(project_root())
        .output()
    {
        Ok(out) => Ok(out),
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
        let path =
            std::env::temp_dir().join(format!("datamesh-deploy-{tag}-{}.yaml", std::process::id()));
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
    args.push(deploy_dir().into_os_string());
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
    let text = embedded_config()?;
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
    let _ = std::fs::remove_dir_all(&secrets);
    ensure!(
        out.status.success(),
        "`datamesh-agent check-config` rejected the config in deploy/configmap.yaml:\n{}",
        describe(&out)
    );
    Ok(())
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

    // Declared host ports are the ports the config listens on, and the probes hit the admin
    // listener where it listens.
    let declared: BTreeSet<u64> = at(agent, "/ports", "agent container")?
        .as_array()
        .context("agent container: ports is not a list")?
        .iter()
        .map(|p| u64_at(p, "/containerPort", "agent port"))
        .collect::<Result<_>>()?;
    let admin = str_at(&config, "/admin_listen", "config.yaml")?;
    let mut listened = BTreeSet::from([port_of(admin)?]);
    for endpoint in at(&config, "/endpoints", "config.yaml")?
        .as_array()
        .context("config.yaml: endpoints is not a list")?
    {
        let port = u64_at(endpoint, "/proxy_port", "endpoint")?;
        ensure!(
            port != 0,
            "deployed endpoints need a fixed proxy_port (declared host port)"
        );
        listened.insert(port);
    }
    ensure!(
        declared == listened,
        "DaemonSet declares ports {declared:?} but the config listens on {listened:?}"
    );
    let admin_host = admin.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = at(agent, &format!("/{probe}/httpGet"), "agent container")?;
        let port = match at(get, "/port", probe)? {
            Value::Number(n) => n.as_u64().context("probe port")?,
            Value::String(name) => {
                let ports = at(agent, "/ports", "agent container")?
                    .as_array()
                    .context("ports")?;
                let named = ports
                    .iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
                    .with_context(|| format!("{probe} names unknown port {name}"))?;
                u64_at(named, "/containerPort", probe)?
            }
            other => bail!("{probe}: port {other} is neither a number nor a name"),
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
