//! The monitoring in `deploy/monitoring/`: the alert rules of the PrometheusRule, checked and
//! unit-tested with promtool (`promtool check rules`, `promtool test rules` with the input
//! series and expected alerts of `deploy/monitoring/tests/`); the Grafana dashboard's shape;
//! and a real Prometheus (Debian's `prometheus`, on 127.0.0.1 with its storage in the test's
//! run dir) that scrapes a running agent's admin `/metrics` every second and loads the same
//! rules: the target is up, datamesh_ series arrive, every rule group is healthy, every
//! dashboard query runs, and every metric name the rules and the dashboard use is one the
//! agent exports (so neither can rot silently when a metric is renamed).
//!
//! promtool and prometheus come from `cargo xtask setup` (apt package `prometheus`); PyYAML
//! (with kubernetes-validate) turns the manifest into JSON. A missing tool fails the test with
//! the command that installs it; nothing is skipped.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use datamesh_tests::agent::http_get;
use datamesh_tests::env::run_test;
use datamesh_tests::proxy::pod_cli;
use datamesh_tests::{wait_until, Env};
use serde_json::{json, Value};

/// The file the rules test (`tests/alerts-test.yaml`) names in `rule_files`.
const RULES_FILE: &str = "datamesh-rules.yaml";
/// The scrape job name the rules (`up{job="datamesh-agent"}`) and the dashboard expect.
const JOB: &str = "datamesh-agent";

fn monitoring_dir() -> PathBuf {
    datamesh_tests::project_root().join("deploy/monitoring")
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a tool of the `prometheus` package (or python3); not installed is an error naming
/// the setup step.
fn run(tool: &str, args: &[&Path]) -> Result<Output> {
    match Command::new(tool).args(args).stdin(Stdio::null()).output() {
        Ok(out) => Ok(out),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "`{tool}` not found on PATH: run `cargo xtask setup` (it installs Debian's \
             `prometheus` package, which has prometheus and promtool)"
        ),
        Err(e) => Err(e).with_context(|| format!("running `{tool}`")),
    }
}

/// The one object of a manifest in deploy/monitoring/, as JSON (PyYAML, as in
/// deploy_manifests.rs).
fn monitoring_object(file: &str) -> Result<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        with open(sys.argv[1]) as f:\n    \
            docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let path = monitoring_dir().join(file);
    let out = match Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(&path)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("`python3` not found on PATH: run `cargo xtask setup`")
        }
        Err(e) => return Err(e).context("running python3"),
    };
    ensure!(
        out.status.success(),
        "parsing {} failed (PyYAML comes with `cargo xtask setup`): {}",
        path.display(),
        describe(&out)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).context("PyYAML's JSON")?;
    ensure!(docs.len() == 1, "{file} must hold one object");
    let obj = docs.into_iter().next().context("no document")?;
    ensure!(
        obj["apiVersion"] == "monitoring.coreos.com/v1" || obj["apiVersion"] == "v1",
        "{file} is neither a monitoring.coreos.com/v1 nor a core v1 object"
    );
    ensure!(
        obj["metadata"]["namespace"] == "datamesh-system",
        "{file}: the object belongs in datamesh-system"
    );
    Ok(obj)
}

/// The PrometheusRule manifest as JSON.
fn prometheus_rule() -> Result<Value> {
    let rule = monitoring_object("prometheusrule.yaml")?;
    ensure!(
        rule["kind"] == "PrometheusRule",
        "prometheusrule.yaml is not a PrometheusRule"
    );
    Ok(rule)
}

/// The PrometheusRule's `spec` as a plain Prometheus rule file (JSON is YAML).
fn rules_file_text() -> Result<String> {
    let rule = prometheus_rule()?;
    let groups = rule
        .pointer("/spec/groups")
        .context("PrometheusRule has no spec.groups")?;
    Ok(serde_json::to_string_pretty(&json!({ "groups": groups }))?)
}

/// Every alerting rule: (group, rule).
fn alert_rules(rule: &Value) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for g in rule
        .pointer("/spec/groups")
        .and_then(Value::as_array)
        .context("no spec.groups")?
    {
        let name = g["name"].as_str().context("a group without a name")?;
        for r in g["rules"].as_array().context("a group without rules")? {
            out.push((name.to_owned(), r.clone()));
        }
    }
    Ok(out)
}

/// A directory of the test's own, removed when dropped (also on failure).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("datamesh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() -> Result<()> {
    let rule = prometheus_rule()?;
    // Every alert carries what the README promises: a severity, a summary and description
    // that name where it fires, and the runbook section.
    let alerts = alert_rules(&rule)?;
    ensure!(!alerts.is_empty(), "the PrometheusRule has no rules");
    let mut names = BTreeSet::new();
    for (group, r) in &alerts {
        let name = r["alert"]
            .as_str()
            .with_context(|| format!("group {group} has a rule that is not an alert"))?;
        ensure!(names.insert(name.to_owned()), "alert {name} twice");
        let severity = r["labels"]["severity"].as_str().unwrap_or("");
        ensure!(
            ["critical", "warning", "info"].contains(&severity),
            "alert {name}: severity {severity:?} is not critical, warning or info"
        );
        for key in ["summary", "description"] {
            ensure!(
                r["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "alert {name} has no {key} annotation"
            );
        }
        ensure!(
            r["annotations"]["runbook"]
                .as_str()
                .is_some_and(|s| s.starts_with("README.md#")),
            "alert {name}: the runbook annotation must point at a README section"
        );
    }

    let dir = TempDir::new("promtool")?;
    let rules = dir.0.join(RULES_FILE);
    std::fs::write(&rules, rules_file_text()?)?;
    let out = run(
        "promtool",
        &[Path::new("check"), Path::new("rules"), &rules],
    )?;
    ensure!(
        out.status.success(),
        "promtool check rules rejected the PrometheusRule's groups:\n{}",
        describe(&out)
    );

    // The unit tests name the rules file relatively: run a copy next to it.
    let tests_dir = monitoring_dir().join("tests");
    let mut tested = BTreeSet::new();
    let mut ran = 0;
    for entry in
        std::fs::read_dir(&tests_dir).with_context(|| format!("reading {}", tests_dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for line in text.lines() {
            if let Some(a) = line.trim().strip_prefix("alertname: ") {
                tested.insert(a.trim().to_owned());
            }
        }
        let file_name = path.file_name().context("a test file without a name")?;
        let copy = dir.0.join(file_name);
        std::fs::write(&copy, text)?;
        let started = Instant::now();
        let out = run("promtool", &[Path::new("test"), Path::new("rules"), &copy])?;
        ensure!(
            out.status.success(),
            "promtool test rules failed for deploy/monitoring/tests/{}:\n{}",
            file_name.to_string_lossy(),
            describe(&out)
        );
        eprintln!(
            "promtool test rules {}: ok in {:?}",
            file_name.to_string_lossy(),
            started.elapsed()
        );
        ran += 1;
    }
    ensure!(ran > 0, "no promtool tests in {}", tests_dir.display());
    let untested: Vec<&String> = names.difference(&tested).collect();
    ensure!(
        untested.is_empty(),
        "alerts without a promtool test in deploy/monitoring/tests/: {untested:?}"
    );
    Ok(())
}

/// The ServiceMonitor scrapes both channels (through the headless metrics Service) under the
/// job name the rules select, with the admin token the agent then requires.
#[test]
fn servicemonitor_scrapes_both_channels_as_the_rules_expect() -> Result<()> {
    let svc = monitoring_object("metrics-service.yaml")?;
    ensure!(
        svc["kind"] == "Service",
        "metrics-service.yaml is not a Service"
    );
    ensure!(
        svc.pointer("/spec/selector/app.kubernetes.io~1part-of") == Some(&Value::from("datamesh")),
        "the metrics Service must select app.kubernetes.io/part-of: datamesh (both channels' pods)"
    );
    ensure!(
        svc.pointer("/spec/clusterIP") == Some(&Value::from("None")),
        "the metrics Service must be headless (one target per agent)"
    );
    let port = svc
        .pointer("/spec/ports/0")
        .context("the metrics Service has no port")?;
    ensure!(
        port["name"] == "admin" && port["targetPort"] == 15090,
        "the metrics Service must expose the admin port 15090 as `admin`"
    );
    let sm = monitoring_object("servicemonitor.yaml")?;
    ensure!(
        sm["kind"] == "ServiceMonitor",
        "servicemonitor.yaml is not a ServiceMonitor"
    );
    ensure!(
        sm.pointer("/spec/selector/matchLabels/app.kubernetes.io~1name")
            == svc.pointer("/metadata/labels/app.kubernetes.io~1name"),
        "the ServiceMonitor does not select the metrics Service"
    );
    let ep = sm
        .pointer("/spec/endpoints/0")
        .context("ServiceMonitor has no endpoint")?;
    ensure!(
        ep["port"] == "admin" && ep["path"] == "/metrics",
        "the ServiceMonitor must scrape the Service's admin port at /metrics"
    );
    ensure!(
        ep["bearerTokenSecret"]["name"] == "datamesh-agent-secrets",
        "the ServiceMonitor must send the admin token of datamesh-agent-secrets"
    );
    let sets_job = ep["relabelings"].as_array().is_some_and(|rs| {
        rs.iter()
            .any(|r| r["targetLabel"] == "job" && r["replacement"] == JOB)
    });
    ensure!(
        sets_job,
        "the ServiceMonitor must set job=\"{JOB}\" (DataMeshAgentDown selects it)"
    );
    Ok(())
}

fn dashboard() -> Result<Value> {
    let path = monitoring_dir().join("grafana-dashboard.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Every `expr` in the dashboard, at any depth.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::String(s) if k == "expr" => out.push(s.clone()),
                    other => exprs(other, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `datamesh_*` metric names a PromQL expression uses (label names and values never
/// start with `datamesh_` in ours; a label value like `datamesh.io/...` has no underscore).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("datamesh_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn dashboard_covers_what_operators_watch() -> Result<()> {
    let d = dashboard()?;
    ensure!(
        d["uid"] == "datamesh-agent",
        "dashboard uid is not datamesh-agent"
    );
    let panels = d["panels"].as_array().context("dashboard has no panels")?;
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().context("a panel without an id")?;
        ensure!(ids.insert(id), "panel id {id} twice");
        if p["type"] != "row" {
            ensure!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {:?} has no query",
                p["title"]
            );
            ensure!(
                p["datasource"]["uid"] == "${datasource}",
                "panel {:?} does not use the dashboard's datasource variable",
                p["title"]
            );
        }
    }
    let mut all = Vec::new();
    exprs(&d, &mut all);
    let used: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    // What the brief of the dashboard promises to show.
    for m in [
        "datamesh_proxy_pod_commands_total",
        "datamesh_proxy_commands_total",
        "datamesh_proxy_errors_total",
        "datamesh_proxy_unknown_outcomes_total",
        "datamesh_proxy_hold_depth",
        "datamesh_proxy_hold_bytes",
        "datamesh_proxy_buffered_bytes",
        "datamesh_proxy_memory_budget_bytes",
        "datamesh_proxy_pod_throttled_total",
        "datamesh_proxy_key_throttled_total",
        "datamesh_proxy_hotkey_ops_per_second",
        "datamesh_proxy_pod_suspected",
        "datamesh_proxy_backend_connections",
    ] {
        ensure!(used.contains(m), "the dashboard shows nothing of {m}");
    }
    Ok(())
}

/// Metric names the agent's `/metrics` exposes, from its `# TYPE` lines (so families without
/// a series yet count too), as PromQL sees them: counters with `_total`, histograms with
/// `_bucket`, `_sum` and `_count`, info with `_info`.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (Some(name), Some(kind)) = (f.next(), f.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            "info" => {
                out.insert(format!("{name}_info"));
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A Prometheus server of the test's own: killed and waited for when dropped (also on
/// failure); its storage lives in the env's run dir, which the env removes.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, config: &Path) -> Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log)?;
        let child = match Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "`prometheus` not found on PATH: run `cargo xtask setup` (it installs Debian's \
                 `prometheus` package)"
            ),
            Err(e) => return Err(e).context("starting prometheus"),
        };
        Ok(Self { child, addr, log })
    }

    /// GET an API path; the `data` of a `success` answer.
    fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = http_get(self.addr, path)?;
        ensure!(status == 200, "prometheus {path} answered {status}: {body}");
        let v: Value = serde_json::from_str(&body).context("prometheus API answer")?;
        ensure!(v["status"] == "success", "prometheus {path}: {body}");
        Ok(v["data"].clone())
    }

    fn query(&self, promql: &str) -> Result<Value> {
        self.api(&format!("/api/v1/query?query={}", url_encode(promql)))
    }

    fn log_tail(&self) -> String {
        datamesh_tests::tail(&self.log, 30)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_a_running_agent_and_loads_the_rules() {
    run_test(Env::builder().pods(["a"]), |env| {
        let started = Instant::now();
        // One command from a pod, so per-pod series exist too.
        let out = pod_cli(env, env.pod("a"), &["PING"])?;
        ensure!(out.contains("PONG"), "PING through the proxy: {out}");
        let admin = env.agent().ready()?.admin;

        let dir = env.run_dir().join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let rules = dir.join(RULES_FILE);
        std::fs::write(&rules, rules_file_text()?)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      \
                 - targets: ['{admin}']\n",
                rules.display()
            ),
        )?;
        let prom = Prometheus::start(&dir, &config)?;
        let result = check_prometheus(env, &prom, admin);
        if result.is_err() {
            eprintln!("---- prometheus log tail ----\n{}\n----", prom.log_tail());
        }
        result?;
        eprintln!(
            "prometheus scraped the agent and loaded the rules in {:?}",
            started.elapsed()
        );
        Ok(())
    });
}

fn check_prometheus(env: &Env, prom: &Prometheus, admin: SocketAddr) -> Result<()> {
    // The target is scraped and up.
    wait_until(
        "prometheus to scrape the agent",
        Duration::from_secs(15),
        || {
            let Ok(data) = prom.api("/api/v1/targets") else {
                return Ok(None);
            };
            let up = data["activeTargets"].as_array().is_some_and(|ts| {
                ts.iter().any(|t| {
                    t["labels"]["job"] == JOB
                        && t["health"] == "up"
                        && t["scrapeUrl"] == format!("http://{admin}/metrics")
                })
            });
            Ok(up.then_some(()))
        },
    )?;
    let up = prom.query(&format!("up{{job=\"{JOB}\"}}"))?;
    ensure!(
        up["result"][0]["value"][1] == "1",
        "up{{job=\"{JOB}\"}} is not 1: {up}"
    );

    // datamesh_ series arrive, the pod's among them.
    let pod_series = wait_until(
        "the pod's command series in prometheus",
        Duration::from_secs(10),
        || {
            let r = prom.query("datamesh_proxy_pod_commands_total")?;
            let found = r["result"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|s| s["metric"]["pod"] != "node"));
            Ok(found.then_some(r))
        },
    )?;
    let count = prom.query("count({__name__=~\"datamesh_.+\"})")?;
    let n: f64 = count["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .context("count of datamesh_ series")?;
    ensure!(n >= 20.0, "only {n} datamesh_ series in prometheus");

    // Every rule group loaded and every rule evaluates without error.
    let expected = alert_rules(&prometheus_rule()?)?;
    let groups = wait_until("every rule evaluated once", Duration::from_secs(10), || {
        let data = prom.api("/api/v1/rules")?;
        let groups = data["groups"].as_array().cloned().unwrap_or_default();
        let evaluated = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            })
            .count();
        Ok((evaluated >= expected.len()).then_some(groups))
    })?;
    let mut loaded = BTreeSet::new();
    for g in &groups {
        for r in g["rules"].as_array().context("group without rules")? {
            let name = r["name"].as_str().unwrap_or("");
            ensure!(
                r["health"] == "ok",
                "rule {name} in group {} is not healthy: {r}",
                g["name"]
            );
            loaded.insert(name.to_owned());
        }
    }
    let want: BTreeSet<String> = expected
        .iter()
        .filter_map(|(_, r)| r["alert"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        loaded == want,
        "prometheus loaded rules {loaded:?}, the PrometheusRule has {want:?}"
    );
    // A healthy idle agent pages for nothing.
    let firing = prom.api("/api/v1/alerts")?;
    let firing: Vec<&Value> = firing["alerts"]
        .as_array()
        .map(|a| a.iter().filter(|a| a["state"] == "firing").collect())
        .unwrap_or_default();
    ensure!(
        firing.is_empty(),
        "alerts fire on an idle agent: {firing:?}"
    );

    // Every metric the rules and the dashboard use is one the agent exports.
    let (status, exposition) = env.agent().http_get("/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    let exported = exported_names(&exposition);
    let mut used = BTreeSet::new();
    for (_, r) in &expected {
        used.extend(metric_names(r["expr"].as_str().unwrap_or("")));
    }
    let mut dash_exprs = Vec::new();
    exprs(&dashboard()?, &mut dash_exprs);
    for e in &dash_exprs {
        used.extend(metric_names(e));
    }
    let unknown: Vec<&String> = used.difference(&exported).collect();
    ensure!(
        unknown.is_empty(),
        "the rules or the dashboard use metrics the agent does not export: {unknown:?} \
         (exported: {exported:?})"
    );
    // And every dashboard query runs (with Grafana's variables filled in as Grafana would).
    for e in &dash_exprs {
        let q = e
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        prom.query(&q)
            .with_context(|| format!("dashboard query {e:?} does not run"))?;
    }
    eprintln!(
        "pod series: {}; datamesh_ series: {n}; rules: {}; dashboard queries: {}",
        pod_series["result"],
        loaded.len(),
        dash_exprs.len()
    );
    Ok(())
}
