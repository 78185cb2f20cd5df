//! The real `datamesh-agent` under test: config file, process in the instance's `agent/`
//! cgroup, ready file, admin HTTP, CLI (`pods`, `fastpath`, `uninstall`), stop and restart.
//!
//! The binary is `$DATAMESH_AGENT_BIN` or `<target>/debug/datamesh-agent`; a missing binary is a
//! loud failure naming `cargo xtask test`, which builds the eBPF object and the agent first.
//! Cleanup on drop: SIGTERM (SIGKILL after the drain deadline), then `datamesh-agent uninstall
//! --pin-dir`, then the pin dir itself.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::proc::{run_ok, status_text};
use crate::{tail, wait_until};

/// Path of the agent binary; fails loudly when it is missing.
pub fn agent_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("DATAMESH_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::target_dir().join("debug").join("datamesh-agent"),
    };
    if !path.is_file() {
        bail!(
            "datamesh-agent binary not found at {}: run `cargo xtask test` (it builds the eBPF object \
             and the agent before the tests), or set DATAMESH_AGENT_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// A per-pod policy override in the agent config.
#[derive(Clone, Debug, Default)]
pub struct PodPolicy {
    pub name: String,
    pub conn_rate: u32,
    pub conn_burst: u32,
    /// Commands/s (0 = unlimited) and burst of the proxy's per-pod command-rate limit.
    pub cmd_rate: u32,
    pub cmd_burst: u32,
    /// `acl`: the pod's command policy (Redis ACL rules), if any.
    pub acl: Option<String>,
}

/// One `endpoints[]` entry.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub name: String,
    pub address: SocketAddr,
    /// Proxy listener port; 0 = ephemeral (the ready file says which).
    pub proxy_port: u16,
    pub backend: BackendSpec,
}

impl Endpoint {
    /// An endpoint with an ephemeral proxy port.
    pub fn new(name: impl Into<String>, address: SocketAddr, backend: BackendSpec) -> Self {
        Self {
            name: name.into(),
            address,
            proxy_port: 0,
            backend,
        }
    }
}

/// An endpoint's `backend:`: the `ip:port` shorthand (standalone with defaults) or a map.
#[derive(Clone, Debug)]
pub enum BackendSpec {
    Address(SocketAddr),
    /// Keys of the map in order, each with its value as YAML flow text (see [`yaml_str`]).
    Map(Vec<(String, String)>),
}

impl BackendSpec {
    /// `{kind: standalone, address: ...}`.
    pub fn standalone(address: SocketAddr) -> Self {
        Self::Map(vec![
            ("kind".into(), "standalone".into()),
            ("address".into(), address.to_string()),
        ])
    }

    /// `{kind: sentinel, sentinels: [...], master_name: ...}`.
    pub fn sentinel(sentinels: &[SocketAddr], master_name: &str) -> Self {
        Self::Map(vec![
            ("kind".into(), "sentinel".into()),
            ("sentinels".into(), yaml_list(sentinels)),
            ("master_name".into(), yaml_str(master_name)),
        ])
    }

    /// `{kind: cluster, nodes: [...]}`.
    pub fn cluster(nodes: &[SocketAddr]) -> Self {
        Self::Map(vec![
            ("kind".into(), "cluster".into()),
            ("nodes".into(), yaml_list(nodes)),
        ])
    }

    /// Sets (or replaces) a key of the map; `value` is YAML flow text (`4`, `true`,
    /// `yaml_str("pw")`). The address shorthand becomes a standalone map first.
    pub fn with(self, key: &str, value: impl std::fmt::Display) -> Self {
        let mut map = match self {
            Self::Address(a) => match Self::standalone(a) {
                Self::Map(m) => m,
                Self::Address(_) => Vec::new(),
            },
            Self::Map(m) => m,
        };
        let value = value.to_string();
        match map.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value,
            None => map.push((key.to_string(), value)),
        }
        Self::Map(map)
    }

    fn to_yaml(&self, indent: &str) -> String {
        match self {
            Self::Address(a) => format!(" {a}\n"),
            Self::Map(m) => {
                let mut y = String::from("\n");
                for (k, v) in m {
                    y.push_str(&format!("{indent}{k}: {v}\n"));
                }
                y
            }
        }
    }
}

/// A string as a YAML scalar (JSON strings are valid YAML flow scalars).
pub fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Addresses as a YAML flow list of strings.
pub fn yaml_list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| yaml_str(&a.to_string())).collect();
    format!("[{}]", items.join(", "))
}

/// The agent config the harness writes (YAML), with the keys of the config reference.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub proxy_address: Ipv4Addr,
    pub cgroup_path: PathBuf,
    pub pin_dir: PathBuf,
    pub fastpath: bool,
    pub failopen_after_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub drain_timeout_ms: u64,
    pub netns_dir: PathBuf,
    /// Where the agent looks for the kubelet's pod cgroups (the test's own cgroup, never the
    /// host's) and its pod log directories (under the run dir, never /var/log/pods).
    pub cgroup_root: PathBuf,
    pub pod_log_dir: PathBuf,
    /// The agent's `upgrade_socket` (under the test's run dir: never the node's default).
    pub upgrade_socket: PathBuf,
    pub default_conn_rate: u32,
    pub default_conn_burst: u32,
    pub pods: Vec<PodPolicy>,
    pub endpoints: Vec<Endpoint>,
    /// `users:` clients authenticate as at the proxy (name, password); empty = no AUTH.
    pub users: Vec<(String, String)>,
    /// `proxy:` settings as (key, YAML value); empty = the agent's defaults.
    pub proxy: Vec<(String, String)>,
    /// Raw top-level YAML appended to the file (keys the harness has no field for).
    pub extra_yaml: String,
}

impl AgentConfig {
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        y.push_str(&format!("proxy_address: {}\n", self.proxy_address));
        y.push_str(&format!("cgroup_path: {}\n", self.cgroup_path.display()));
        y.push_str(&format!("pin_dir: {}\n", self.pin_dir.display()));
        y.push_str(&format!("fastpath: {}\n", self.fastpath));
        y.push_str(&format!("failopen_after_ms: {}\n", self.failopen_after_ms));
        y.push_str(&format!(
            "heartbeat_interval_ms: {}\n",
            self.heartbeat_interval_ms
        ));
        y.push_str("skip_host_network: true\n");
        y.push_str(&format!("drain_timeout_ms: {}\n", self.drain_timeout_ms));
        // Loopback with an ephemeral port, unless the test sets its own (admin access tests).
        if !self
            .extra_yaml
            .lines()
            .any(|l| l.starts_with("admin_listen:"))
        {
            y.push_str("admin_listen: 127.0.0.1:0\n");
        }
        y.push_str(&format!("netns_dir: {}\n", self.netns_dir.display()));
        y.push_str(&format!("cgroup_root: {}\n", self.cgroup_root.display()));
        y.push_str(&format!("pod_log_dir: {}\n", self.pod_log_dir.display()));
        if !self.upgrade_socket.as_os_str().is_empty() {
            y.push_str(&format!(
                "upgrade_socket: {}\n",
                self.upgrade_socket.display()
            ));
        }
        y.push_str(&format!("default_conn_rate: {}\n", self.default_conn_rate));
        y.push_str(&format!(
            "default_conn_burst: {}\n",
            self.default_conn_burst
        ));
        if self.pods.is_empty() {
            y.push_str("pods: []\n");
        } else {
            y.push_str("pods:\n");
            for p in &self.pods {
                y.push_str(&format!(
                    "  - name: {}\n    conn_rate: {}\n    conn_burst: {}\n    cmd_rate: {}\n    cmd_burst: {}\n",
                    p.name, p.conn_rate, p.conn_burst, p.cmd_rate, p.cmd_burst
                ));
                if let Some(acl) = &p.acl {
                    y.push_str(&format!("    acl: {}\n", yaml_str(acl)));
                }
            }
        }
        y.push_str("endpoints:\n");
        for e in &self.endpoints {
            y.push_str(&format!(
                "  - name: {}\n    address: {}\n    proxy_port: {}\n    backend:{}",
                e.name,
                e.address,
                e.proxy_port,
                e.backend.to_yaml("      ")
            ));
        }
        if !self.users.is_empty() {
            y.push_str("users:\n");
            for (name, password) in &self.users {
                y.push_str(&format!(
                    "  - name: {}\n    password: {}\n",
                    yaml_str(name),
                    yaml_str(password)
                ));
            }
        }
        if !self.proxy.is_empty() {
            y.push_str("proxy:\n");
            for (k, v) in &self.proxy {
                y.push_str(&format!("  {k}: {v}\n"));
            }
        }
        y.push_str(&self.extra_yaml);
        y
    }
}

/// Runs `<bin> check-config` on `config` (written to `<dir>/check-config.yaml`): `Ok(None)` when
/// the agent accepts it, `Ok(Some(messages))` with what it reports when it rejects it (e.g. keys
/// an older agent does not know).
pub fn check_config(bin: &Path, config: &AgentConfig, dir: &Path) -> Result<Option<String>> {
    let path = dir.join("check-config.yaml");
    std::fs::write(&path, config.to_yaml())
        .with_context(|| format!("writing {}", path.display()))?;
    let out = crate::proc::run_with_timeout(
        Command::new(bin)
            .arg("check-config")
            .arg("--config")
            .arg(&path),
        Duration::from_secs(20),
    )?;
    if out.status.success() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )))
}

/// The agent's ready file.
#[derive(Clone, Debug)]
pub struct Ready {
    pub pid: u32,
    pub admin: SocketAddr,
    pub dataplane: String,
    pub endpoints: Vec<ReadyEndpoint>,
    pub raw: Value,
}

#[derive(Clone, Debug)]
pub struct ReadyEndpoint {
    pub name: String,
    pub address: SocketAddr,
    pub proxy: SocketAddr,
    pub backend: SocketAddr,
}

impl Ready {
    fn parse(text: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).context("ready file is not JSON")?;
        let s = |v: &Value, k: &str| -> Result<String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("ready file: missing string {k:?} in {v}"))
        };
        let addr = |v: &Value, k: &str| -> Result<SocketAddr> {
            s(v, k)?
                .parse()
                .with_context(|| format!("ready file: {k:?} is not host:port"))
        };
        let pid = raw
            .get("pid")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("ready file: missing pid"))?;
        let mut endpoints = Vec::new();
        for e in raw
            .get("endpoints")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("ready file: missing endpoints"))?
        {
            endpoints.push(ReadyEndpoint {
                name: s(e, "name")?,
                address: addr(e, "address")?,
                proxy: addr(e, "proxy")?,
                backend: addr(e, "backend")?,
            });
        }
        Ok(Self {
            pid: u32::try_from(pid)?,
            admin: addr(&raw, "admin")?,
            dataplane: s(&raw, "dataplane")?,
            endpoints,
            raw,
        })
    }
}

/// The agent process and its files. Stops it and uninstalls its pins on drop.
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    config: AgentConfig,
    config_path: PathBuf,
    ready_path: PathBuf,
    log_path: PathBuf,
    cgroup: PathBuf,
    extra_procs: Option<PathBuf>,
    child: Option<Child>,
    ready: Option<Ready>,
    starts: u32,
    /// The admin bearer token [`Agent::http_get`] sends (set when the config names an
    /// `admin_token_file`: [`Agent::set_admin_token`]).
    admin_token: Option<String>,
}

/// What [`Agent::upgrade_to`] took.
#[derive(Debug)]
pub struct Takeover {
    /// From the successor's start to its ready file (its worker serves).
    pub ready_after: Duration,
    /// From the successor's start to the old agent's exit (its worker drained).
    pub old_exit_after: Duration,
    pub old_status: ExitStatus,
}

/// How long the harness waits for the ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    /// Writes the config into `dir`, starts the agent in `cgroup` and waits until it is ready.
    /// `bin` overrides [`agent_bin`] (the benchmark runs a release build).
    pub fn start(
        config: AgentConfig,
        dir: &Path,
        cgroup: &Path,
        bin: Option<PathBuf>,
    ) -> Result<Self> {
        Self::start_with(config, dir, cgroup, None, bin)
    }

    /// [`Agent::start`], also joining the cgroup whose procs file is `extra_procs` (a
    /// memory-limited cgroup, see [`crate::cgroup::MemoryCgroup`]).
    pub fn start_with(
        config: AgentConfig,
        dir: &Path,
        cgroup: &Path,
        extra_procs: Option<PathBuf>,
        bin: Option<PathBuf>,
    ) -> Result<Self> {
        let explicit = bin.is_some();
        let bin = match bin {
            Some(b) if b.is_file() => b,
            Some(b) => bail!("datamesh-agent binary not found at {}", b.display()),
            None => agent_bin()?,
        };
        // The upgrade socket belongs with the agent's own files: two agents of one test
        // (the gray-release drill's nodes) never take each other's sockets.
        let mut config = config;
        config.upgrade_socket = dir.join("upgrade.sock");
        // A given binary may be an older build (a benchmark's A/B) that has no upgrade_socket:
        // it gets the config without the key (and its own default socket).
        if explicit {
            if let Ok(Some(msg)) = check_config(&bin, &config, dir) {
                if msg.contains("upgrade_socket") {
                    config.upgrade_socket = PathBuf::new();
                }
            }
        }
        let config_path = dir.join("agent.yaml");
        std::fs::write(&config_path, config.to_yaml())
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut agent = Self {
            bin,
            config,
            config_path,
            ready_path: dir.join("ready.json"),
            log_path: dir.join("agent.log"),
            cgroup: cgroup.to_path_buf(),
            extra_procs,
            child: None,
            ready: None,
            starts: 0,
            admin_token: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent process (again) with the same config and pin dir, and waits for ready.
    pub fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("agent is already running");
        }
        // A stale ready file from the previous run must not count as "ready".
        match std::fs::remove_file(&self.ready_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing old ready file"),
        }
        let child = self.start_process()?;
        self.child = Some(child);
        let ready = self.wait_ready()?;
        self.ready = Some(ready);
        Ok(())
    }

    /// Starts `datamesh-agent run` (the log appended, in the agent's cgroups); no wait.
    fn start_process(&mut self) -> Result<Child> {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        {
            let mut l = &log;
            let _ = writeln!(
                l,
                "===== datamesh-tests: agent start #{} =====",
                self.starts
            );
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--ready-file")
            .arg(&self.ready_path)
            .env(
                "RUST_LOG",
                std::env::var("DATAMESH_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::pod::enter_cgroup_with_nofile(&mut cmd, &self.cgroup, 65536);
        if let Some(p) = &self.extra_procs {
            crate::pod::also_enter_cgroup(&mut cmd, p);
        }
        cmd.spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
    }

    /// A zero-error upgrade (or rollback, or restart) to `bin`: starts it beside the running
    /// agent with the same config; it takes the listening sockets over (`upgrade_socket`) and
    /// writes the ready file once its worker serves. Then, as Kubernetes deletes the old pod
    /// once the new one is ready, the old agent gets SIGTERM; it exits when its worker has
    /// drained. On failure the old agent is left running and the new one is killed.
    pub fn upgrade_to(&mut self, bin: &Path) -> Result<Takeover> {
        if !bin.is_file() {
            bail!("datamesh-agent binary not found at {}", bin.display());
        }
        let mut old = self
            .child
            .take()
            .ok_or_else(|| anyhow!("agent is not running"))?;
        let old_bin = std::mem::replace(&mut self.bin, bin.to_path_buf());
        let t0 = Instant::now();
        let child = match self.start_process() {
            Ok(c) => c,
            Err(e) => {
                self.bin = old_bin;
                self.child = Some(old);
                return Err(e);
            }
        };
        let new_pid = child.id();
        self.child = Some(child);
        let ready_path = self.ready_path.clone();
        let waited = wait_until("the successor's ready file", READY_TIMEOUT, || {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    return Ok(Some(Err(anyhow!(
                        "the successor exited before it was ready ({})",
                        status_text(st)
                    ))));
                }
            }
            match std::fs::read_to_string(&ready_path) {
                Ok(text) => match Ready::parse(&text) {
                    Ok(r) if r.pid == new_pid => Ok(Some(Ok(r))),
                    _ => Ok(None),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .and_then(|r| r);
        let ready = match waited {
            Ok(r) => r,
            Err(e) => {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                self.bin = old_bin;
                self.child = Some(old);
                return Err(e.context(format!("agent log tail:\n{}", tail(&self.log_path, 60))));
            }
        };
        let ready_after = t0.elapsed();
        self.ready = Some(ready);
        let pid = libc::pid_t::try_from(old.id())?;
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now()
            + Duration::from_millis(self.config.drain_timeout_ms)
            + Duration::from_secs(5);
        let old_status = loop {
            if let Some(st) = old.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = old.kill();
                let st = old.wait()?;
                bail!(
                    "the old agent did not exit within drain_timeout_ms + 5 s of SIGTERM after the handover (killed: {})",
                    status_text(st)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Takeover {
            ready_after,
            old_exit_after: t0.elapsed(),
            old_status,
        })
    }

    fn wait_ready(&mut self) -> Result<Ready> {
        let ready_path = self.ready_path.clone();
        let log_path = self.log_path.clone();
        let res = wait_until("the agent's ready file", READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    self.child = None;
                    // Ends the wait at once: an agent that exited never becomes ready (a
                    // rejected config, a failed preflight check).
                    return Ok(Some(Err(anyhow!(
                        "datamesh-agent exited before it was ready ({}); log tail:\n{}",
                        status_text(st),
                        tail(&log_path, 40)
                    ))));
                }
            }
            match std::fs::read_to_string(&ready_path) {
                Ok(text) => Ready::parse(&text).map(|r| Some(Ok(r))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .and_then(|r| r);
        match res {
            Ok(r) => Ok(r),
            Err(e) => Err(e.context(format!("agent log tail:\n{}", tail(&self.log_path, 40)))),
        }
    }

    /// The ready file of the current (last) start.
    pub fn ready(&self) -> Result<&Ready> {
        self.ready
            .as_ref()
            .ok_or_else(|| anyhow!("agent has not become ready"))
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn pin_dir(&self) -> &Path {
        &self.config.pin_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The config file the agent was started with (and reloads).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites the config file with `config` (atomically: tmp + rename, so a reload never reads
    /// half a file). The running agent sees it on its next reload ([`Agent::sighup`]).
    pub fn write_config(&mut self, config: AgentConfig) -> Result<()> {
        // Restart-only: the running agent's socket stays.
        let mut config = config;
        config.upgrade_socket = self.config.upgrade_socket.clone();
        let tmp = self.config_path.with_extension("yaml.tmp");
        std::fs::write(&tmp, config.to_yaml())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.config_path)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        self.config = config;
        Ok(())
    }

    /// Sends SIGHUP (reload the config file) to the running agent.
    pub fn sighup(&self) -> Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("agent is not running"))?;
        let pid = libc::pid_t::try_from(pid)?;
        // SAFETY: kill(2) on the pid of our own unreaped child.
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGHUP to the agent");
        }
        Ok(())
    }

    /// The agent's resident set size in KiB (`VmRSS` of /proc/<pid>/status).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self
            .worker_pid()?
            .ok_or_else(|| anyhow!("agent has no worker"))?;
        crate::proc::rss_kib(pid)
    }

    /// The agent's peak resident set size so far, in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        let pid = self
            .worker_pid()?
            .ok_or_else(|| anyhow!("agent has no worker"))?;
        crate::proc::peak_rss_kib(pid)
    }

    /// The proxy listener address of the endpoint `name`.
    pub fn proxy_addr(&self, endpoint: &str) -> Result<SocketAddr> {
        self.ready()?
            .endpoints
            .iter()
            .find(|e| e.name == endpoint)
            .map(|e| e.proxy)
            .ok_or_else(|| anyhow!("ready file has no endpoint {endpoint:?}"))
    }

    /// The running agent's pid (the supervisor of `datamesh-agent run`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The pid of the agent's proxy worker (the supervisor's child), if one runs now.
    pub fn worker_pid(&self) -> Result<Option<u32>> {
        let pid = self.pid().ok_or_else(|| anyhow!("agent is not running"))?;
        let path = format!("/proc/{pid}/task/{pid}/children");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(text.split_whitespace().find_map(|w| w.parse().ok()))
    }

    /// Waits up to `timeout` for a worker whose pid is not `old`; returns it.
    pub fn wait_new_worker(&self, old: Option<u32>, timeout: Duration) -> Result<u32> {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(p) = self.worker_pid()? {
                if Some(p) != old {
                    return Ok(p);
                }
            }
            if t0.elapsed() > timeout {
                bail!("no new worker within {timeout:?} (old {old:?})");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Plain HTTP/1.1 GET on the admin listener; returns (status, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        http_get_auth(self.ready()?.admin, path, self.admin_token.as_deref())
    }

    /// [`http_request`] on the admin listener with the harness's admin token.
    pub fn http_request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        http_request(
            self.ready()?.admin,
            method,
            path,
            body,
            self.admin_token.as_deref(),
        )
    }

    /// The token to send with every admin request of the harness (the content of the
    /// config's `admin_token_file`).
    pub fn set_admin_token(&mut self, token: Option<&str>) {
        self.admin_token = token.map(str::to_string);
    }

    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// `/connections` as JSON values.
    pub fn connections(&self) -> Result<Vec<Value>> {
        let (status, body) = self.http_get("/connections")?;
        if status != 200 {
            bail!("GET /connections answered {status}: {body}");
        }
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("/connections is not JSON: {body}"))?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("/connections is not a JSON array: {body}"))
    }

    /// SIGKILL, then reap. The data plane (pinned links and maps) stays.
    pub fn kill9(&mut self) -> Result<()> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("agent is not running"))?;
        child.kill().context("SIGKILL to the agent")?;
        child.wait().context("reaping the agent")?;
        Ok(())
    }

    /// SIGTERM and wait for the exit (the drain deadline plus a margin); SIGKILL if it does not.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("agent is not running"))?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) on the pid of our own unreaped child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGTERM to the agent");
        }
        let deadline = Instant::now()
            + Duration::from_millis(self.config.drain_timeout_ms)
            + Duration::from_secs(5);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let st = child.wait()?;
                bail!(
                    "agent did not exit within drain_timeout_ms + 5 s of SIGTERM (killed: {})",
                    status_text(st)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the agent with SIGTERM and starts it again with the same config and pin dir.
    pub fn restart(&mut self) -> Result<ExitStatus> {
        let st = self.terminate()?;
        self.spawn()?;
        Ok(st)
    }

    /// A command running the agent binary (for `pods`, `fastpath`, `uninstall`).
    pub fn cli(&self) -> Command {
        Command::new(&self.bin)
    }

    /// `datamesh-agent pods --json --pin-dir <pin>` (works with the agent dead).
    pub fn pods_json(&self) -> Result<Vec<Value>> {
        let out = run_ok(
            self.cli()
                .args(["pods", "--json", "--pin-dir"])
                .arg(self.pin_dir()),
            Duration::from_secs(20),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("`pods --json` output is not JSON: {text}"))?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("`pods --json` output is not an array: {text}"))
    }

    /// The `pods --json` row of the pod with this (discovered) name.
    pub fn pod_row(&self, pod: &str) -> Result<Option<Value>> {
        Ok(self
            .pods_json()?
            .into_iter()
            .find(|r| r.get("pod").and_then(Value::as_str) == Some(pod)))
    }

    /// The integer fields of the pod's `pods --json` row, by name (empty when it has no row).
    pub fn pod_counters(&self, pod: &str) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut m = std::collections::BTreeMap::new();
        if let Some(Value::Object(o)) = self.pod_row(pod)? {
            for (k, v) in o {
                if let Some(n) = v.as_u64() {
                    m.insert(k, n);
                }
            }
        }
        Ok(m)
    }

    /// A counter of a pod from `pods --json` (0 when the pod has no row yet).
    pub fn pod_counter(&self, pod: &str, key: &str) -> Result<u64> {
        match self.pod_row(pod)? {
            None => Ok(0),
            Some(r) => r
                .get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| anyhow!("`pods --json` row has no integer {key:?}: {r}")),
        }
    }

    /// `datamesh-agent fastpath on|off --pin-dir <pin>`.
    pub fn set_fastpath(&self, on: bool) -> Result<()> {
        run_ok(
            self.cli()
                .args(["fastpath", if on { "on" } else { "off" }, "--pin-dir"])
                .arg(self.pin_dir()),
            Duration::from_secs(20),
        )?;
        Ok(())
    }

    /// Ids of the pinned cgroup links, by file name (`bpftool -j link show pinned ...`).
    pub fn link_ids(&self) -> Result<Vec<(String, u64)>> {
        let mut ids = Vec::new();
        for prog in datamesh_common::CGROUP_PROGS {
            let pin = self
                .pin_dir()
                .join(datamesh_common::LINKS_SUBDIR)
                .join(prog);
            let out = run_ok(
                Command::new("bpftool")
                    .args(["-j", "link", "show", "pinned"])
                    .arg(&pin),
                Duration::from_secs(20),
            )?;
            let v: Value = serde_json::from_slice(&out.stdout)
                .context("bpftool -j link show output is not JSON")?;
            let id = v
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| anyhow!("no link id in bpftool output {v}"))?;
            ids.push((prog.to_string(), id));
        }
        Ok(ids)
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            match self.terminate() {
                Ok(st) if !st.success() => {
                    eprintln!(
                        "datamesh-tests: agent exited with {} on SIGTERM (signal {:?})",
                        status_text(st),
                        st.signal()
                    )
                }
                Ok(_) => {}
                Err(e) => eprintln!("datamesh-tests: stopping the agent: {e:#}"),
            }
        }
        if self.config.pin_dir.exists() {
            let out = Command::new(&self.bin)
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(&self.config.pin_dir)
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "datamesh-tests: `datamesh-agent uninstall --pin-dir {}` failed ({}): {}",
                    self.config.pin_dir.display(),
                    status_text(o.status),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("datamesh-tests: cannot run datamesh-agent uninstall: {e}"),
            }
        }
        crate::instance::uninstall_pins(&self.config.pin_dir);
    }
}

/// Plain HTTP/1.1 GET over a std TcpStream (Connection: close); returns (status, body).
/// Handles both Content-Length/close-delimited and chunked bodies.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_get_auth(addr, path, None)
}

/// [`http_get`] with `Authorization: Bearer <token>` when `token` is given (the admin
/// endpoint with `admin_token_file`).
pub fn http_get_auth(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    http_request(addr, "GET", path, "", token)
}

/// One HTTP/1.1 request on the admin listener (`Connection: close`), with a JSON `body` when it
/// is not empty and `Authorization: Bearer <token>` when `token` is given: (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to admin {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = if body.is_empty() && method == "GET" {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content}Connection: close\r\n\r\n{body}"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading {method} {path} response"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response: {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line: {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("bad chunked body"))?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.push_str(chunk);
        body = rest
            .get(size + 2..)
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
    }
}
