//! Pools. Per endpoint one [`BackendGroup`]; in it, per (node, database, protocol), one
//! [`NodePool`]: `pool_size` shared connections (created on first use, or at start with
//! `pool_prewarm`), and exclusive [`Dedicated`] connections for transactions, blocking
//! commands and pub/sub, bounded per node by `max_dedicated`.
//!
//! A pool keeps `warm_dedicated` exclusive connections open and idle ahead of need, refilled
//! in the background when one is taken: a client's first blocking command then goes out at
//! once instead of paying a connect, so a write another client sends right after it cannot
//! overtake it (Redis's own tests do exactly this).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::conn::PoolCtx;
use super::flusher::Flusher;
use super::health::{Health, HealthSettings};
use super::outcome::Returns;
use super::{BackendError, Conn, ConnectSpec, PoolKey};
use crate::metrics::GroupMetrics;

/// Idle dedicated connections kept for reuse per pool beyond the warm ones; more are closed
/// when returned.
const MAX_IDLE_DEDICATED: usize = 16;

/// Shared connections and idle dedicated ones for one (node, db, protocol).
pub struct NodePool {
    pub key: PoolKey,
    slots: Vec<Arc<Conn>>,
    idle: Mutex<Vec<(Arc<Conn>, OwnedSemaphorePermit)>>,
    budget: Arc<Semaphore>,
    max_dedicated: u32,
    warm: usize,
    refilling: AtomicBool,
    /// What its connections share (spec, metrics, timeout, version, node health).
    ctx: PoolCtx,
    /// Dedicated connections handed out (closed with the pool when its node is not usable:
    /// a subscription or a transaction on a dead or hung node that left the topology).
    handed: Mutex<Vec<std::sync::Weak<Conn>>>,
}

impl NodePool {
    /// The shared connection for a client: fixed per client (`affinity`), so one client's
    /// commands stay in order on one connection; another slot only when that one is failing.
    pub fn shared(&self, affinity: u64) -> Arc<Conn> {
        let n = self.slots.len();
        let first = (affinity % n as u64) as usize;
        for i in 0..n {
            let c = &self.slots[(first + i) % n];
            if !c.failing_fast() {
                return c.clone();
            }
        }
        self.slots[first].clone()
    }

    pub fn slots(&self) -> &[Arc<Conn>] {
        &self.slots
    }

    /// Idle dedicated connections ready to be taken.
    pub fn idle_dedicated(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Fault injection (the agent's `debug.fault_injection`, the resource-leak drill): opens
    /// a dedicated connection outside the `max_dedicated` budget and never gives it back, as
    /// a leaked one would be: open at the backend, counted in the gauges, owned by nobody.
    pub async fn leak_dedicated(&self) -> Result<(), BackendError> {
        let conn = self.new_dedicated();
        conn.connect_now().await?;
        std::mem::forget(conn);
        Ok(())
    }

    fn new_dedicated(&self) -> Arc<Conn> {
        Conn::new(&self.ctx, true, None, None)
    }

    /// An idle connection that is still up, if any (dead ones are closed on the way).
    fn take_idle(&self) -> Option<(Arc<Conn>, OwnedSemaphorePermit)> {
        loop {
            let popped = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match popped {
                Some((conn, permit)) if conn.is_up() && conn.queue_len() == 0 => {
                    return Some((conn, permit))
                }
                Some((conn, _permit)) => conn.close(),
                None => return None,
            }
        }
    }

    /// An exclusive connection: an idle (warm) one if any, else a new one (waits for a free
    /// `max_dedicated` permit up to the connect timeout).
    pub async fn dedicated(self: &Arc<Self>) -> Result<Dedicated, BackendError> {
        let taken = self.take_idle();
        self.keep_warm();
        if let Some((conn, permit)) = taken {
            return Ok(self.wrap(conn, permit));
        }
        let permit = match self.budget.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.ctx.metrics.pool_waits.inc();
                match tokio::time::timeout(
                    self.ctx.spec.connect_timeout,
                    self.budget.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(BackendError::DedicatedExhausted {
                            addr: self.key.addr,
                            max: self.max_dedicated,
                        })
                    }
                }
            }
        };
        let conn = self.new_dedicated();
        conn.connect_now().await?;
        Ok(self.wrap(conn, permit))
    }

    fn wrap(self: &Arc<Self>, conn: Arc<Conn>, permit: OwnedSemaphorePermit) -> Dedicated {
        {
            let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            handed.retain(|c| c.strong_count() > 0);
            handed.push(Arc::downgrade(&conn));
        }
        Dedicated {
            conn,
            permit: Some(permit),
            pool: Arc::downgrade(self),
            clean: true,
            slot: None,
        }
    }

    /// Tops the idle dedicated connections up to `warm_dedicated` in the background (one
    /// refill at a time; permits permitting; a failed connect ends the round).
    pub fn keep_warm(self: &Arc<Self>) {
        if self.warm == 0 || self.idle_dedicated() >= self.warm {
            return;
        }
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(p) = pool.upgrade() else { return };
                if p.idle_dedicated() >= p.warm {
                    p.refilling.store(false, Ordering::Release);
                    return;
                }
                let Ok(permit) = p.budget.clone().try_acquire_owned() else {
                    p.refilling.store(false, Ordering::Release);
                    return;
                };
                let conn = p.new_dedicated();
                match conn.connect_now().await {
                    Ok(()) => p
                        .idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((conn, permit)),
                    Err(e) => {
                        debug!(backend = %p.key.addr, error = %e, "warming a dedicated connection failed");
                        p.refilling.store(false, Ordering::Release);
                        return;
                    }
                }
            }
        });
    }

    /// Connects every shared slot now (pool_prewarm).
    pub async fn prewarm(&self) {
        for s in &self.slots {
            if let Err(e) = s.connect_now().await {
                warn!(backend = %self.key.addr, error = %e, "pool prewarm: connect failed");
            }
        }
    }
}

impl Drop for NodePool {
    fn drop(&mut self) {
        // A node that left the topology: what is in flight to it is answered first, unless
        // the node is down or hung, where nothing will come (its commands go back to the hold
        // queue now: reads are resent to the new node, writes answered "may have been
        // executed").
        let usable = self.ctx.node.usable();
        for s in &self.slots {
            if usable {
                s.close_when_idle();
            } else {
                s.close();
            }
        }
        if !usable {
            for c in self
                .handed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                if let Some(c) = c.upgrade() {
                    c.close();
                }
            }
        }
        for (c, _) in self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            c.close();
        }
    }
}

/// An exclusive backend connection, handed back to its pool when dropped clean and idle,
/// closed otherwise (a transaction or subscription left open, a blocking command cut off).
pub struct Dedicated {
    pub conn: Arc<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Weak<NodePool>,
    /// Set false while the connection carries state (MULTI, WATCH, SUBSCRIBE).
    pub clean: bool,
    /// The slot of the client's pod it takes (the per-pod `max_dedicated`), given back when
    /// it is.
    pub slot: Option<crate::accounting::Slot>,
}

impl Dedicated {
    pub fn node(&self) -> SocketAddr {
        self.conn.key.addr
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        let reusable = self.clean && self.conn.is_up() && self.conn.queue_len() == 0;
        if reusable {
            if let (Some(pool), Some(permit)) = (self.pool.upgrade(), self.permit.take()) {
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < MAX_IDLE_DEDICATED.max(pool.warm) {
                    idle.push((self.conn.clone(), permit));
                    return;
                }
            }
        }
        self.conn.close();
    }
}

/// Settings of a [`BackendGroup`].
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub pool_size: u32,
    pub max_dedicated: u32,
    pub warm_dedicated: u32,
    pub command_timeout: Option<Duration>,
    /// Active health checks (None: none; nodes are then never held back for health).
    pub health: Option<HealthSettings>,
}

/// All pools of one endpoint's backend group.
pub struct BackendGroup {
    pub endpoint: String,
    spec: Arc<ConnectSpec>,
    settings: GroupSettings,
    pools: Mutex<HashMap<PoolKey, Arc<NodePool>>>,
    /// One `max_dedicated` budget per node, shared by its databases and protocols.
    node_budgets: Mutex<HashMap<SocketAddr, Arc<Semaphore>>>,
    pub metrics: GroupMetrics,
    pub version: Arc<OnceLock<String>>,
    /// Writes the shared connections' queues (one write per connection per tick).
    flusher: Arc<Flusher>,
    closed: AtomicBool,
    /// Every node's health.
    pub health: Health,
    /// Where shared connections hand back what they could not answer (set by the router).
    returns: OnceLock<Arc<dyn Returns>>,
}

impl BackendGroup {
    pub fn new(
        endpoint: String,
        spec: ConnectSpec,
        settings: GroupSettings,
        metrics: GroupMetrics,
    ) -> Self {
        let settings = GroupSettings {
            pool_size: settings.pool_size.max(1),
            max_dedicated: settings.max_dedicated.max(1),
            warm_dedicated: settings.warm_dedicated.min(settings.max_dedicated.max(1)),
            ..settings
        };
        let spec = Arc::new(spec);
        Self {
            endpoint,
            health: Health::new(settings.health, spec.clone(), metrics.outages.clone()),
            returns: OnceLock::new(),
            spec,
            settings,
            pools: Mutex::new(HashMap::new()),
            node_budgets: Mutex::new(HashMap::new()),
            metrics,
            version: Arc::new(OnceLock::new()),
            flusher: Arc::new(Flusher::spawn()),
            closed: AtomicBool::new(false),
        }
    }

    /// The pool for `key`, created on first use (its warm dedicated connections start
    /// connecting then).
    pub fn pool(&self, key: PoolKey) -> Arc<NodePool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let budget = self
            .node_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.addr)
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_dedicated as usize)))
            .clone();
        let node = self.health.track(key.addr);
        let returns = self.returns.get().cloned();
        let ctx = PoolCtx {
            key,
            spec: self.spec.clone(),
            metrics: self.metrics.clone(),
            command_timeout: self.settings.command_timeout,
            version: self.version.clone(),
            node: node.clone(),
        };
        let slots = (0..self.settings.pool_size)
            .map(|_| Conn::new(&ctx, false, Some(self.flusher.clone()), returns.clone()))
            .collect();
        let pool = Arc::new(NodePool {
            key,
            slots,
            idle: Mutex::new(Vec::new()),
            budget,
            max_dedicated: self.settings.max_dedicated,
            warm: self.settings.warm_dedicated as usize,
            refilling: AtomicBool::new(false),
            ctx,
            handed: Mutex::new(Vec::new()),
        });
        info!(endpoint = %self.endpoint, backend = %key.addr, db = key.db, proto = key.proto, size = self.settings.pool_size, warm_dedicated = self.settings.warm_dedicated, "backend pool created");
        pools.insert(key, pool.clone());
        drop(pools);
        if !self.closed.load(Ordering::Acquire) {
            pool.keep_warm();
        }
        pool
    }

    /// Drops pools of nodes no longer in the topology (their connections close when idle).
    pub fn retain_nodes(&self, nodes: &[SocketAddr]) {
        let mut gone: Vec<Arc<NodePool>> = Vec::new();
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, p| {
                let keep = nodes.contains(&k.addr);
                if !keep {
                    gone.push(p.clone());
                }
                keep
            });
        // Dropped outside the lock: closing hands commands back to the hold queue, which may
        // open pools.
        drop(gone);
        self.health.retain(nodes);
    }

    /// Sets where shared connections hand back what they could not answer (once, before the
    /// first pool).
    pub fn set_returns(&self, r: Arc<dyn Returns>) {
        let _ = self.returns.set(r);
    }

    /// Every pool (for `/backends` and metrics).
    /// Backend connections this group's pools may hold at most: `pool_size` shared ones per
    /// pool and `max_dedicated` exclusive ones per node (the agent's watchdog compares the
    /// open ones with this).
    pub fn connection_limit(&self) -> u64 {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        let nodes = self
            .node_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64;
        pools * u64::from(self.settings.pool_size) + nodes * u64::from(self.settings.max_dedicated)
    }

    /// Open backend connections of this endpoint (shared and dedicated, from the gauges the
    /// connections keep).
    pub fn open_connections(&self) -> u64 {
        let m = &self.metrics;
        (m.shared_conns.get().max(0) + m.dedicated_conns.get().max(0)) as u64
    }

    pub fn pools(&self) -> Vec<Arc<NodePool>> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The server version learned from a backend handshake, or Redis 7.0.15.
    /// How this group's connections are made (the local cache's tracking connection uses
    /// the same mark, credentials and timeout).
    pub fn connect_spec(&self) -> &ConnectSpec {
        &self.spec
    }

    pub fn server_version(&self) -> String {
        self.version
            .get()
            .cloned()
            .unwrap_or_else(|| "7.0.15".into())
    }

    /// Closes every pool once its commands are answered (the group was replaced).
    pub fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for BackendGroup {
    fn drop(&mut self) {
        self.shutdown();
    }
}
