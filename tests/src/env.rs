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

use crate::agent::{Agent, AgentConfig, Endpoint, PodPolicy};
use crate::cgroup::Cgroup;
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
    fastpath: bool,
    limits: Vec<(String, u32, u32)>,
    agent: bool,
    failopen_after_ms: u64,
    drain_timeout_ms: u64,
    agent_bin: Option<PathBuf>,
}

impl Default for EnvBuilder {
    fn default() -> Self {
        Self {
            pods: Vec::new(),
            fastpath: false,
            limits: Vec::new(),
            agent: true,
            failopen_after_ms: 1000,
            drain_timeout_ms: 2000,
            agent_bin: None,
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
            run_dir: Path::new(RUN_DIR).join(&id),
            pin_dir: Path::new(BPFFS).join(&id),
            agent: None,
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
        let agent_cg = cg.child("agent")?;
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
            let pod = Pod::create(n, i, name, env.bridge()?, env.cgroup()?)?;
            env.pods.push(pod);
        }
        let redis = RedisServer::start(env.service_addr(), env.outside_cgroup(), &env.run_dir)?;
        env.redis.push(redis);
        if self.agent {
            let pods = self
                .limits
                .iter()
                .map(|(p, rate, burst)| PodPolicy {
                    name: format!("dmt{n}-{p}"),
                    conn_rate: *rate,
                    conn_burst: *burst,
                })
                .collect();
            let config = AgentConfig {
                proxy_address: net::proxy_ip(n),
                cgroup_path: env.cgroup()?.path().to_path_buf(),
                pin_dir: env.pin_dir.clone(),
                fastpath: self.fastpath,
                failopen_after_ms: self.failopen_after_ms,
                heartbeat_interval_ms: 100,
                drain_timeout_ms: self.drain_timeout_ms,
                netns_dir: PathBuf::from(NETNS_DIR),
                default_conn_rate: 0,
                default_conn_burst: 0,
                pods,
                endpoints: vec![Endpoint {
                    name: ENDPOINT_NAME.into(),
                    address: env.service_addr(),
                    backend: env.service_addr(),
                }],
            };
            env.agent = Some(Agent::start(
                config,
                &env.run_dir,
                &agent_cg,
                self.agent_bin.clone(),
            )?);
        }
        Ok(env)
    }
}

/// One test instance. See the module docs for what it holds and the teardown order.
#[derive(Debug)]
pub struct Env {
    n: u8,
    id: String,
    run_dir: PathBuf,
    pin_dir: PathBuf,
    agent: Option<Agent>,
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

    /// Starts another redis-server on the service IP at `port` (not in the endpoints map).
    pub fn start_redis(&mut self, port: u16) -> Result<&RedisServer> {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.service_ip(), port));
        let r = RedisServer::start(addr, self.outside_cgroup(), &self.run_dir)?;
        self.redis.push(r);
        Ok(&self.redis[self.redis.len() - 1])
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
