//! Backend topology: where a command goes. The [`Topology`] trait is what the session's
//! dispatch asks ("which node serves this slot, for a read or a write?"); [`Standalone`] is
//! the single-node case. Sentinel (`sentinel.rs`) and Cluster (`cluster.rs`) implement the same
//! trait, so dispatch never branches on the backend kind except through `is_cluster()`.
//!
//! Architecture Invariant: a `Topology` never performs I/O inside `pick`; discovery and
//! refreshes run in their own tasks and publish a new generation.

use std::net::SocketAddr;

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

/// Routing view of one endpoint's backend group.
pub trait Topology: Send + Sync + 'static {
    /// The node for a command on `slot` (cluster mode; `None` elsewhere or for keyless
    /// commands); `readonly` lets an implementation send reads to replicas when configured.
    fn pick(&self, slot: Option<u16>, readonly: bool) -> Result<SocketAddr, TopologyError>;
    /// A backend answered `-MOVED` (`ask == false`) or `-ASK` (`ask == true`) for `slot`,
    /// naming `addr`. MOVED updates the slot map (and may schedule a refresh); ASK does not.
    fn redirected(&self, slot: u16, addr: SocketAddr, ask: bool);
    /// True for Redis Cluster: commands are routed by key slot and multi-key commands are
    /// split or refused with CROSSSLOT.
    fn is_cluster(&self) -> bool;
    /// Increases whenever the routing changes (new master, new slot map), so callers can tell
    /// that cached decisions are stale.
    fn generation(&self) -> u64;
    /// Every node currently known (masters and, where used, replicas).
    fn nodes(&self) -> Vec<SocketAddr>;
}

/// One backend node; every command goes to it.
#[derive(Debug, Clone)]
pub struct Standalone {
    addr: SocketAddr,
}

impl Standalone {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }
}

impl Topology for Standalone {
    fn pick(&self, _slot: Option<u16>, _readonly: bool) -> Result<SocketAddr, TopologyError> {
        Ok(self.addr)
    }

    fn redirected(&self, _slot: u16, _addr: SocketAddr, _ask: bool) {
        // A standalone server never redirects; a stray MOVED is answered to the client as-is.
    }

    fn is_cluster(&self) -> bool {
        false
    }

    fn generation(&self) -> u64 {
        0
    }

    fn nodes(&self) -> Vec<SocketAddr> {
        vec![self.addr]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_always_picks_its_node() {
        let a: SocketAddr = "127.0.0.1:6379".parse().expect("addr");
        let t = Standalone::new(a);
        assert_eq!(t.pick(Some(5), true), Ok(a));
        assert_eq!(t.pick(None, false), Ok(a));
        assert!(!t.is_cluster());
        assert_eq!(t.nodes(), vec![a]);
    }
}
