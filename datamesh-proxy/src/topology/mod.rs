//! Backend topology: where a command goes. The [`Topology`] trait is all the rest of the proxy
//! sees of a backend's shape ("which node serves this slot, for a read or a write?", "this
//! node failed, look again", "tell me when the routing changes"); [`Standalone`] is the
//! single-node case, [`sentinel::Sentinel`] and [`cluster::Cluster`] the others. Nothing
//! outside this module branches on the backend kind except through [`Topology::is_cluster`]
//! (cluster mode changes what clients may send: slots, CROSSSLOT, one database).
//!
//! - [`control`]: the control-plane client (same connect, handshake and codec as the data
//!   path);
//! - [`follow`]: the one shape of the Sentinel and Cluster background tasks.
//!
//! Architecture Invariant: a `Topology` never performs I/O inside `pick`; discovery and
//! refreshes run in their own task and publish a new generation on a watch channel, which the
//! endpoint follows at once (no polling).

pub mod cluster;
pub mod control;
pub mod follow;
pub mod sentinel;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

/// Why no backend node can be picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Sentinel has not (yet) told us a master, or the master is being failed over.
    #[error("no master known for {master_name}: are the sentinels reachable and is the master name right?")]
    NoMaster { master_name: String },
    /// The cluster slot map has no owner for this slot (map not loaded yet, or a hole).
    #[error("slot {slot} is not served by any known cluster node: is the cluster slot map complete (CLUSTER SHARDS)?")]
    SlotUnassigned { slot: u16 },
    /// The topology knows no node at all.
    #[error("no backend node is known for {what}")]
    NoNodes { what: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyKind {
    Standalone,
    Sentinel,
    Cluster,
}

/// Routing view of one endpoint's backend.
pub trait Topology: Send + Sync + 'static {
    fn kind(&self) -> TopologyKind;

    /// True for Redis Cluster: commands are routed by key slot and multi-key commands are
    /// split or refused with CROSSSLOT.
    fn is_cluster(&self) -> bool {
        self.kind() == TopologyKind::Cluster
    }

    /// The node for a command on `slot` (cluster mode; `None` elsewhere or for keyless
    /// commands); `readonly` lets an implementation send reads to replicas when configured.
    fn pick(&self, slot: Option<u16>, readonly: bool) -> Result<SocketAddr, TopologyError>;

    /// A backend answered `-MOVED` (`ask == false`) or `-ASK` (`ask == true`) for `slot`,
    /// naming `addr`. MOVED updates the slot map (and schedules a refresh); ASK does not.
    fn redirected(&self, _slot: u16, _addr: SocketAddr, _ask: bool) {}

    /// A node failed (connect refused, connection lost, a command timed out) or answered as
    /// if it were no longer what we believe (READONLY from a "master", LOADING): look again
    /// soon. Calls are coalesced; a burst costs one discovery round.
    fn node_failed(&self, _addr: SocketAddr) {}

    /// The routing generation: increases whenever the routing changes (new master, new slot
    /// map), so cached decisions can tell they are stale.
    fn generation(&self) -> u64;

    /// A receiver that sees every generation change (the endpoint retires pools of nodes
    /// that left and warms new ones from it; a held command can wait on it).
    fn changes(&self) -> watch::Receiver<u64>;

    /// True once the first view is known (a Sentinel master, a cluster slot map).
    fn is_ready(&self) -> bool;

    /// Every node currently used (masters and, where reads go to them, replicas).
    fn nodes(&self) -> Vec<SocketAddr>;

    /// The masters: every slot owner of a cluster (broadcast commands), else the one master.
    fn masters(&self) -> Vec<SocketAddr>;
}

/// Waits up to `timeout` until `t` has its first view. True when it has.
pub async fn wait_ready(t: &dyn Topology, timeout: Duration) -> bool {
    let mut rx = t.changes();
    let wait = async {
        loop {
            if t.is_ready() {
                return;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the topology, which the caller holds.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}

/// One backend node; every command goes to it.
#[derive(Debug)]
pub struct Standalone {
    addr: SocketAddr,
    /// Never changes; kept so [`Topology::changes`] has something to hand out.
    generation: watch::Sender<u64>,
}

impl Standalone {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            generation: watch::channel(0).0,
        }
    }
}

impl Topology for Standalone {
    fn kind(&self) -> TopologyKind {
        TopologyKind::Standalone
    }

    fn pick(&self, _slot: Option<u16>, _readonly: bool) -> Result<SocketAddr, TopologyError> {
        Ok(self.addr)
    }

    fn generation(&self) -> u64 {
        0
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn nodes(&self) -> Vec<SocketAddr> {
        vec![self.addr]
    }

    fn masters(&self) -> Vec<SocketAddr> {
        vec![self.addr]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn standalone_always_picks_its_node() {
        let a: SocketAddr = "127.0.0.1:6379".parse().expect("addr");
        let t = Standalone::new(a);
        assert_eq!(t.pick(Some(5), true), Ok(a));
        assert_eq!(t.pick(None, false), Ok(a));
        assert!(!t.is_cluster());
        assert_eq!(t.nodes(), vec![a]);
        assert_eq!(t.masters(), vec![a]);
        assert!(wait_ready(&t, Duration::from_millis(1)).await);
    }
}
