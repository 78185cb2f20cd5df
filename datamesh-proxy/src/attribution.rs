//! Who is on the other end of an accepted connection. The proxy asks once per connection and
//! tells the [`Attribution`] what happens to it; the agent implements it with the eBPF
//! capture's records (`dm_conns`: pod and original destination) and pod discovery, and keeps
//! its `/connections` log and per-pod connection state from these calls. Tests and tools use
//! [`NodeLocal`]: every client is a node-local one.
//!
//! The attribution also decides whether a connection may be served at all: an [`Identity`]
//! with `refuse` set gets one error line and is closed before anything is read (the agent
//! refuses connections that are neither from a pod nor node-local nor from an allowed CIDR).

use std::net::SocketAddr;

/// What the proxy knows of a client connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The connection was steered here by the capture (the pod dialled an endpoint address).
    pub captured: bool,
    /// A pod dialled the proxy listener itself; the data plane recorded it, so `pod` is known
    /// and the pod's limits apply as for a captured connection.
    pub direct: bool,
    /// The pod's id (the agent: its network-namespace cookie); 0 = not a pod ("node").
    pub pod: u64,
    /// The pod's name, when known.
    pub pod_name: Option<String>,
    /// The address the client dialled, when captured (cluster-aware clients are shown it as
    /// the one cluster node, so they keep coming back through the capture).
    pub orig_dst: Option<SocketAddr>,
    /// The attribution's own handle for this connection (the agent: its log record id).
    pub token: u64,
    /// Do not serve this connection: the reason, sent to the client in one error line
    /// (`-ERR datamesh proxy: connection from <ip> refused: <reason>`) before it is closed.
    /// `Closed` is still reported for it.
    pub refuse: Option<String>,
}

/// Events of a connection's life after [`Attribution::identify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEvent {
    /// The client broke the protocol (it is closed after its error reply).
    ProtocolError,
    /// A drain is about to write the connection's last reply and close it: its last bytes
    /// and the FIN must reach the client together (the agent moves a fast-path connection
    /// back to TCP, where the reply and the FIN share one segment; redirected bytes would
    /// arrive ahead of a FIN sent by TCP). `peer` and `local` are the accepted socket's.
    Closing { peer: SocketAddr, local: SocketAddr },
    /// The connection ended.
    Closed,
}

pub trait Attribution: Send + Sync + 'static {
    /// Called once per accepted connection, before anything is read from it.
    fn identify(&self, endpoint: &str, peer: SocketAddr, local: SocketAddr) -> Identity;

    /// Called as the connection's life goes on (`Closed` exactly once, also when the session
    /// task is cancelled).
    fn event(&self, who: &Identity, event: ConnEvent);
}

/// Every client is node-local (no capture, no pods).
#[derive(Debug, Default, Clone, Copy)]
pub struct NodeLocal;

impl Attribution for NodeLocal {
    fn identify(&self, _endpoint: &str, _peer: SocketAddr, _local: SocketAddr) -> Identity {
        Identity::default()
    }

    fn event(&self, _who: &Identity, _event: ConnEvent) {}
}
