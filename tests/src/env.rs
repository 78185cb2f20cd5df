//! `Env`: one complete test instance, built with a small DSL and torn down in reverse order.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let env = datamesh_tests::Env::builder().pods(["a", "b"]).fastpath(true).conn_limit("a", 5, 5).build()?;
//! let out = env.pod("a").cmd("redis-cli").args(["-h", &env.service_ip().to_string(), "PING"]).output()?;
//! # Ok(()) }
//! ```
//!
//! Creation order: instance number (owner file), run dir, cgroups (attached + `agent/` +
//! `pod-*/`, and the `-outside` sibling), bridge, pods (netns + veth), redis-server on
//! 198.19.N.1:6379, agent. Drop runs the reverse — agent (SIGTERM/SIGKILL, uninstall, pin dir),
//! redis servers, cgroups (killing what is left), namespaces and veths, bridge, run dir, owner
//! file — also while a test panics, in which case it first prints the agent's log tail.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use crate::agent::{Agent, AgentConfig, BackendSpec, Endpoint, PodPolicy};
use crate::cgroup::{Cgroup, MemoryCgroup};
use crate::instance::Instance;
use crate::net::{self, Bridge};
use crate::pod::Pod;
use crate::redis::RedisServer;
use crate::{BPFFS, CGROUP2_ROOT, NETNS_DIR, RUN_DIR};

/// The Redis port of the service endpoint.
pub const SERVICE_PORT: u16 = 6379;
/// Name of the one endpoint in the harness's agent config.
pub const ENDPOINT_NAME: &str = "cache";

/// Builder for [`Env`].
#[derive(Clone, Debug)]
pub struct EnvBuilder {
    pods: Vec<String>,
    kubelet: Vec<(String, KubeletPod)>,
    pod_cgroups: Vec<(String, PathBuf)>,
    fastpath: bool,
    limits: Vec<(String, u32, u32)>,
    agent: bool,
    failopen_after_ms: u64,
    drain_timeout_ms: u64,
    agent_bin: Option<PathBuf>,
    cmd_limits: Vec<(String, u32, u32)>,
    users: Vec<(String, String)>,
    backend_options: Vec<(String, String)>,
    proxy_settings: Vec<(String, String)>,
    extra_yaml: String,
    memory_limit: Option<u64>,
}

/// The kubelet's cgroup driver, for [`KubeletPod`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// A pod laid out as the kubelet does it: cgroup path by driver and QoS class, log directory
/// `<namespace>_<name>_<uid>`.
#[derive(Clone, Debug)]
pub struct KubeletPod {
    pub driver: CgroupDriver,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub qos: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl KubeletPod {
    pub fn new(
        driver: CgroupDriver,
        qos: &'static str,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Self {
        Self {
            driver,
            qos,
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    /// `namespace/name`, the name the agent gives the pod.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn log_dir_name(&self) -> String {
        format!("{}_{}_{}", self.namespace, self.name, self.uid)
    }

    /// The container cgroup, relative to the test cgroup (which stands for the cgroup root).
    pub fn cgroup_path(&self) -> PathBuf {
        let container = "0123456789abcdef";
        match (self.driver, self.qos) {
            (CgroupDriver::Systemd, "guaranteed") => PathBuf::from(format!(
                "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{container}.scope",
                self.uid.replace('-', "_")
            )),
            (CgroupDriver::Systemd, qos) => PathBuf::from(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice/cri-containerd-{container}.scope",
                self.uid.replace('-', "_")
            )),
            (CgroupDriver::Cgroupfs, "guaranteed") => {
                PathBuf::from(format!("kubepods/pod{}/{container}", self.uid))
            }
            (CgroupDriver::Cgroupfs, qos) => {
                PathBuf::from(format!("kubepods/{qos}/pod{}/{container}", self.uid))
            }
        }
    }
}

impl Default for EnvBuilder {
    fn default() -> Self {
        Self {
            pods: Vec::new(),
            kubelet: Vec::new(),
            pod_cgroups: Vec::new(),
            fastpath: false,
            limits: Vec::new(),
            agent: true,
            failopen_after_ms: 1000,
            drain_timeout_ms: 2000,
            agent_bin: None,
            cmd_limits: Vec::new(),
            users: Vec::new(),
            backend_options: Vec::new(),
            proxy_settings: Vec::new(),
            extra_yaml: String::new(),
            memory_limit: None,
        }
    }
}

impl EnvBuilder {
    /// Pods by short name (`a` becomes netns `dmt<N>-a`).
    pub fn pods<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.pods = names.into_iter().map(Into::into).collect();
        self
    }

    /// Makes the pod `short` (also listed in `pods`) a kubelet pod: its cgroup is laid out as the
    /// kubelet would under the test's cgroup, and its log directory is made under the run dir.
    pub fn kubelet_pod(mut self, short: &str, spec: KubeletPod) -> Self {
        self.kubelet.push((short.to_string(), spec));
        self
    }

    /// Puts the cgroup of the pod `short` (also listed in `pods`) at `rel` under the instance's
    /// cgroup instead of `pod-<short>`: e.g. `node-b/pod-web`, for tests that attach more than
    /// one agent, each under its own subtree (two simulated nodes).
    pub fn pod_cgroup(mut self, short: &str, rel: impl Into<PathBuf>) -> Self {
        self.pod_cgroups.push((short.to_string(), rel.into()));
        self
    }

    /// The config's `fastpath` setting.
    pub fn fastpath(mut self, on: bool) -> Self {
        self.fastpath = on;
        self
    }

    /// A per-pod connection-rate limit (connects/s and burst) for the pod with this short name.
    pub fn conn_limit(mut self, pod: &str, rate: u32, burst: u32) -> Self {
        self.limits.push((pod.to_string(), rate, burst));
        self
    }

    /// A per-pod command-rate limit (commands/s and burst) for the pod with this short name.
    pub fn cmd_limit(mut self, pod: &str, rate: u32, burst: u32) -> Self {
        self.cmd_limits.push((pod.to_string(), rate, burst));
        self
    }

    /// A `users:` entry: clients must `AUTH` at the proxy (`default` makes `AUTH <password>` work).
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.to_string(), password.to_string()));
        self
    }

    /// A key of the `cache` endpoint's backend map (`pool_size`, `password`, ...); the value is
    /// YAML flow text (see [`crate::agent::yaml_str`] for strings). Any option turns the
    /// `backend: ip:port` shorthand into `{kind: standalone, address: ..., <options>}`.
    pub fn backend_option(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.backend_options
            .push((key.to_string(), value.to_string()));
        self
    }

    /// A key of the top-level `proxy:` section (`max_depth`, `throttle_max_delay_ms`, ...).
    pub fn proxy_setting(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.proxy_settings
            .push((key.to_string(), value.to_string()));
        self
    }

    /// Raw top-level YAML appended to the agent's config file.
    pub fn extra_config(mut self, yaml: &str) -> Self {
        self.extra_yaml.push_str(yaml);
        if !self.extra_yaml.ends_with('\n') {
            self.extra_yaml.push('\n');
        }
        self
    }

    /// Whether to start the agent (default true).
    pub fn agent(mut self, on: bool) -> Self {
        self.agent = on;
        self
    }

    pub fn failopen_after_ms(mut self, ms: u64) -> Self {
        self.failopen_after_ms = ms;
        self
    }

    pub fn drain_timeout_ms(mut self, ms: u64) -> Self {
        self.drain_timeout_ms = ms;
        self
    }

    /// Runs this agent binary instead of `$DATAMESH_AGENT_BIN` / `target/debug/datamesh-agent`.
    pub fn agent_bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.agent_bin = Some(bin.into());
        self
    }

    /// Runs the agent in a memory cgroup limited to `bytes` (the DaemonSet's memory limit).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Creates everything; on error, whatever was created is torn down again.
    pub fn build(self) -> Result<Env> {
        crate::require_privileges();
        if let Err(e) = crate::reap_stale() {
            eprintln!("datamesh-tests: reaping stale leftovers failed: {e:#}");
        }
        let instance = Instance::allocate()?;
        let n = instance.n();
        let id = instance.id();
        let mut env = Env {
            n,
            id: id.clone(),
            builder: self.clone(),
            agent_cgroup: PathBuf::new(),
            run_dir: Path::new(RUN_DIR).join(&id),
            pin_dir: Path::new(BPFFS).join(&id),
            agent: None,
            memory: None,
            redis: Vec::new(),
            pods: Vec::new(),
            outside: None,
            cgroup: None,
            bridge: None,
            instance: Some(instance),
        };
        std::fs::create_dir_all(&env.run_dir)
            .with_context(|| format!("creating {}", env.run_dir.display()))?;
        let cg = Cgroup::create(Path::new(CGROUP2_ROOT).join(&id))?;
        env.agent_cgroup = cg.child("agent")?;
        if let Some(bytes) = self.memory_limit {
            env.memory = Some(MemoryCgroup::create(
                &format!("{id}-mem"),
                cg.path(),
                bytes,
            )?);
        }
        env.cgroup = Some(cg);
        env.outside = Some(Cgroup::create(
            Path::new(CGROUP2_ROOT).join(format!("{id}-outside")),
        )?);
        env.bridge = Some(Bridge::create(n)?);
        for (i, name) in self.pods.iter().enumerate() {
            let i = u8::try_from(i)
                .ok()
                .filter(|i| *i < 200)
                .ok_or_else(|| anyhow!("too many pods"))?;
            let kubelet = self.kubelet.iter().find(|(s, _)| s == name).map(|(_, k)| k);
            let custom = self.pod_cgroups.iter().find(|(s, _)| s == name);
            let pod = match (kubelet, custom) {
                (None, Some((_, rel))) => {
                    Pod::create_at(n, i, name, env.bridge()?, env.cgroup()?, rel)?
                }
                (None, None) => Pod::create(n, i, name, env.bridge()?, env.cgroup()?)?,
                (Some(k), _) => {
                    let log = env.pod_log_dir().join(k.log_dir_name());
                    std::fs::create_dir_all(&log)
                        .with_context(|| format!("creating {}", log.display()))?;
                    Pod::create_at(n, i, name, env.bridge()?, env.cgroup()?, &k.cgroup_path())?
                }
            };
            env.pods.push(pod);
        }
        let redis = RedisServer::start(env.service_addr(), env.outside_cgroup(), &env.run_dir)?;
        env.redis.push(redis);
        if self.agent {
            let config = env.base_agent_config()?;
            env.start_agent(config)?;
        }
        Ok(env)
    }
}

/// One test instance. See the module docs for what it holds and the teardown order.
#[derive(Debug)]
pub struct Env {
    n: u8,
    id: String,
    /// The options this env was built with (the base of [`Env::base_agent_config`]).
    builder: EnvBuilder,
    agent_cgroup: PathBuf,
    run_dir: PathBuf,
    pin_dir: PathBuf,
    agent: Option<Agent>,
    memory: Option<MemoryCgroup>,
    redis: Vec<RedisServer>,
    pods: Vec<Pod>,
    outside: Option<Cgroup>,
    cgroup: Option<Cgroup>,
    bridge: Option<Bridge>,
    instance: Option<Instance>,
}

impl Env {
    pub fn builder() -> EnvBuilder {
        EnvBuilder::default()
    }

    /// The instance number `N`.
    pub fn n(&self) -> u8 {
        self.n
    }

    /// `datamesh-test-<pid>-<N>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Per-instance directory for config, ready file and logs.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The kubelet pod log directory the agent is configured with (`<run dir>/pods`).
    pub fn pod_log_dir(&self) -> PathBuf {
        self.run_dir.join("pods")
    }

    /// The agent's pin dir `/sys/fs/bpf/datamesh-test-<pid>-<N>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// 198.18.N.1: the proxy address on the bridge.
    pub fn proxy_ip(&self) -> Ipv4Addr {
        net::proxy_ip(self.n)
    }

    /// 198.19.N.1: the service address pods dial.
    pub fn service_ip(&self) -> Ipv4Addr {
        net::service_ip(self.n)
    }

    /// 198.19.N.1:6379: the endpoint in the agent's config, where the real redis listens.
    pub fn service_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.service_ip(), SERVICE_PORT))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        match self.pods.iter().find(|p| p.name() == name) {
            Some(p) => p,
            None => panic!(
                "no pod {name:?} in this env (pods: {:?})",
                self.pods.iter().map(Pod::name).collect::<Vec<_>>()
            ),
        }
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The redis-server on the service address.
    pub fn redis(&self) -> &RedisServer {
        &self.redis[0]
    }

    /// The redis-server on the service address, mutably (to set the password its checks use).
    pub fn redis_mut(&mut self) -> &mut RedisServer {
        &mut self.redis[0]
    }

    /// Starts another redis-server on the service IP at `port` (not in the endpoints map).
    pub fn start_redis(&mut self, port: u16) -> Result<&RedisServer> {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.service_ip(), port));
        let r = RedisServer::start(addr, self.outside_cgroup(), &self.run_dir)?;
        self.redis.push(r);
        Ok(&self.redis[self.redis.len() - 1])
    }

    /// The agent config the builder's options make: the `cache` endpoint on the service address
    /// (backend = the redis-server there, with any backend options), pod policies, users,
    /// `proxy:` settings. Tests that need more (a sentinel or cluster endpoint) build the env
    /// with `.agent(false)`, start their servers, extend this config and call
    /// [`Env::start_agent`].
    pub fn base_agent_config(&self) -> Result<AgentConfig> {
        let b = &self.builder;
        let n = self.n;
        let mut pods: Vec<PodPolicy> = Vec::new();
        let mut policy = |p: &str| -> usize {
            let name = format!("dmt{n}-{p}");
            match pods.iter().position(|x| x.name == name) {
                Some(i) => i,
                None => {
                    pods.push(PodPolicy {
                        name,
                        ..PodPolicy::default()
                    });
                    pods.len() - 1
                }
            }
        };
        let mut idx = Vec::new();
        for (p, rate, burst) in &b.limits {
            idx.push((policy(p), Some((*rate, *burst)), None));
        }
        for (p, rate, burst) in &b.cmd_limits {
            idx.push((policy(p), None, Some((*rate, *burst))));
        }
        for (i, conn, cmd) in idx {
            if let Some((r, bu)) = conn {
                pods[i].conn_rate = r;
                pods[i].conn_burst = bu;
            }
            if let Some((r, bu)) = cmd {
                pods[i].cmd_rate = r;
                pods[i].cmd_burst = bu;
            }
        }
        let mut backend = BackendSpec::Address(self.service_addr());
        for (k, v) in &b.backend_options {
            backend = backend.with(k, v);
        }
        Ok(AgentConfig {
            proxy_address: net::proxy_ip(n),
            cgroup_path: self.cgroup()?.path().to_path_buf(),
            pin_dir: self.pin_dir.clone(),
            fastpath: b.fastpath,
            failopen_after_ms: b.failopen_after_ms,
            heartbeat_interval_ms: 100,
            drain_timeout_ms: b.drain_timeout_ms,
            netns_dir: PathBuf::from(NETNS_DIR),
            cgroup_root: self.cgroup()?.path().to_path_buf(),
            pod_log_dir: self.pod_log_dir(),
            upgrade_socket: self.run_dir.join("upgrade.sock"),
            default_conn_rate: 0,
            default_conn_burst: 0,
            pods,
            endpoints: vec![Endpoint::new(ENDPOINT_NAME, self.service_addr(), backend)],
            users: b.users.clone(),
            proxy: b.proxy_settings.clone(),
            extra_yaml: b.extra_yaml.clone(),
        })
    }

    /// Starts the agent (in the instance's `agent/` cgroup) with `config` and waits until it is
    /// ready. Fails if this env already has one.
    pub fn start_agent(&mut self, config: AgentConfig) -> Result<()> {
        if self.agent.is_some() {
            return Err(anyhow!("this env already has an agent"));
        }
        let agent = Agent::start_with(
            config,
            &self.run_dir,
            &self.agent_cgroup,
            self.memory.as_ref().map(|m| m.procs().to_path_buf()),
            self.builder.agent_bin.clone(),
        )?;
        self.agent = Some(agent);
        Ok(())
    }

    pub fn agent(&self) -> &Agent {
        match &self.agent {
            Some(a) => a,
            None => panic!("this env was built without an agent"),
        }
    }

    pub fn agent_mut(&mut self) -> &mut Agent {
        match &mut self.agent {
            Some(a) => a,
            None => panic!("this env was built without an agent"),
        }
    }

    /// The agent's memory cgroup, when built with [`EnvBuilder::memory_limit`].
    pub fn memory_cgroup(&self) -> Option<&MemoryCgroup> {
        self.memory.as_ref()
    }

    /// The attached cgroup (where the agent attaches its programs).
    pub fn cgroup(&self) -> Result<&Cgroup> {
        self.cgroup
            .as_ref()
            .ok_or_else(|| anyhow!("env has no cgroup"))
    }

    /// The sibling cgroup outside the attached one.
    pub fn outside_cgroup(&self) -> &Path {
        match &self.outside {
            Some(c) => c.path(),
            None => Path::new("/nonexistent-outside-cgroup"),
        }
    }

    fn bridge(&self) -> Result<&Bridge> {
        self.bridge
            .as_ref()
            .ok_or_else(|| anyhow!("env has no bridge"))
    }

    /// Every resource name this env created (for leak checks after drop).
    pub fn resource_names(&self) -> Vec<PathBuf> {
        let mut v = vec![
            Path::new(CGROUP2_ROOT).join(&self.id),
            Path::new(CGROUP2_ROOT).join(format!("{}-outside", self.id)),
            self.pin_dir.clone(),
            self.run_dir.clone(),
            Path::new("/sys/class/net").join(format!("dmtbr{}", self.n)),
            Path::new(RUN_DIR).join(format!("inst-{}", self.n)),
        ];
        for p in &self.pods {
            v.push(Path::new(NETNS_DIR).join(p.netns_name()));
            v.push(Path::new("/sys/class/net").join(p.veth()));
        }
        v
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(a) = &self.agent {
                eprintln!(
                    "---- datamesh-agent log tail ({}) ----\n{}\n----",
                    self.id,
                    a.log_tail(60)
                );
            }
        }
        // Reverse order of creation; each guard's Drop reports but never panics.
        drop(self.agent.take());
        drop(self.memory.take());
        // For debugging: keep the agent's full log (the run dir goes away below).
        if let Some(keep) = std::env::var_os("DATAMESH_TEST_KEEP_LOGS") {
            let src = self.run_dir.join("agent.log");
            let dst = Path::new(&keep).join(format!("{}-agent.log", self.id));
            if src.exists() {
                let _ = std::fs::create_dir_all(&keep);
                if let Err(e) = std::fs::copy(&src, &dst) {
                    eprintln!("datamesh-tests: keeping {}: {e}", src.display());
                }
            }
        }
        self.redis.clear();
        drop(self.cgroup.take());
        drop(self.outside.take());
        self.pods.clear();
        drop(self.bridge.take());
        if self.run_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
        drop(self.instance.take());
    }
}

/// Runs a test body against a fresh env; an `Err` becomes a panic while the env is still alive,
/// so the teardown prints the agent's log tail before it cleans up.
pub fn run_test(builder: EnvBuilder, body: impl FnOnce(&mut Env) -> Result<()>) {
    let mut env = match builder.build() {
        Ok(env) => env,
        Err(e) => panic!("building the test env failed: {e:#}"),
    };
    if let Err(e) = body(&mut env) {
        panic!("{e:#}");
    }
}
