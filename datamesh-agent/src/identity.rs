//! Who may use the proxy without having been captured: the policy for client connections the
//! data plane has no record of (`uncaptured`, `uncaptured_allow`), and the agent netns's own
//! addresses that make a peer node-local.
//!
//! A connection is recorded in `dm_conns` when a pod's connect was captured (it dialled an
//! endpoint) or when a pod dialled a proxy listener directly: both carry the pod's netns cookie.
//! Every other connection comes from outside the attached cgroup: the node itself (loopback or
//! one of the node's addresses, hostNetwork pods included), another node, or a process in some
//! network namespace that is not a pod. Those are served only when node-local, from a listed
//! CIDR, or when the operator switched the check off (`uncaptured: allow`); everything else
//! gets a one-line error and is closed.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

/// `uncaptured`: what happens to a connection the data plane did not record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UncapturedMode {
    /// Served only when node-local or from `uncaptured_allow` (the default).
    #[default]
    Refuse,
    /// Every uncaptured connection is served, as before identity was enforced (migration).
    Allow,
}

impl FromStr for UncapturedMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "allow" => Ok(Self::Allow),
            other => Err(format!("{other:?} is not one of refuse, allow")),
        }
    }
}

/// An IP network `addr/prefix` (host bits must be zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, fold(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask32(self.prefix);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask128(self.prefix);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

/// v4-mapped IPv6 folded to IPv4, as the data plane and the config do.
fn fold(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = fold(
            addr.parse::<IpAddr>()
                .map_err(|_| format!("{s:?} is not an address or CIDR (ip/prefix)"))?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        let host_bits = match addr {
            IpAddr::V4(a) => u32::from(a) & !mask32(prefix) != 0,
            IpAddr::V6(a) => u128::from(a) & !mask128(prefix) != 0,
        };
        if host_bits {
            return Err(format!(
                "{s:?} has host bits set: write the network address (e.g. 10.0.0.0/8)"
            ));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The reason an uncaptured connection is refused (what the client reads after
/// `-ERR datamesh proxy: connection from <ip> refused: `).
pub const REFUSED_UNCAPTURED: &str =
    "not a captured pod connection, not node-local and not in uncaptured_allow";

/// Why an uncaptured connection was let in (for `/connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    NodeLocal,
    AllowedCidr,
    AllowAll,
    Refused,
}

impl Admission {
    pub fn as_str(self) -> &'static str {
        match self {
            Admission::NodeLocal => "node-local",
            Admission::AllowedCidr => "uncaptured_allow",
            Admission::AllowAll => "uncaptured: allow",
            Admission::Refused => "refused",
        }
    }
}

/// The reloadable part of the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UncapturedPolicy {
    pub mode: UncapturedMode,
    pub allow: Vec<Cidr>,
}

/// How often the list of the agent netns's addresses may be re-read because a peer was not in
/// it (a refused client must not make every accept a netlink dump).
const LOCAL_REFRESH: Duration = Duration::from_secs(1);

/// The addresses of the agent's network namespace (the node's, for a hostNetwork agent),
/// cached; re-read on a miss at most once per [`LOCAL_REFRESH`].
pub struct LocalAddrs {
    inner: Mutex<(Option<Instant>, HashSet<IpAddr>)>,
}

impl Default for LocalAddrs {
    fn default() -> Self {
        Self {
            inner: Mutex::new((None, HashSet::new())),
        }
    }
}

impl LocalAddrs {
    /// Whether `ip` is loopback or one of this netns's interface addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        let ip = fold(ip);
        if ip.is_loopback() {
            return true;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.1.contains(&ip) {
            return true;
        }
        let stale = g.0.is_none_or(|t| t.elapsed() >= LOCAL_REFRESH);
        if stale {
            g.1 = read_local_addrs();
            g.0 = Some(Instant::now());
            return g.1.contains(&ip);
        }
        false
    }
}

fn read_local_addrs() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                let Some(sa) = a.address else { continue };
                if let Some(v4) = sa.as_sockaddr_in() {
                    out.insert(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    out.insert(fold(IpAddr::V6(v6.ip())));
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "getifaddrs failed: only loopback peers count as node-local")
        }
    }
    out
}

/// Decides for a connection the data plane did not record.
pub fn admit(policy: &UncapturedPolicy, local: &LocalAddrs, peer: IpAddr) -> Admission {
    if local.is_local(peer) {
        Admission::NodeLocal
    } else if policy.allow.iter().any(|c| c.contains(peer)) {
        Admission::AllowedCidr
    } else if policy.mode == UncapturedMode::Allow {
        Admission::AllowAll
    } else {
        Admission::Refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let one: Cidr = "198.18.3.7".parse().expect("host");
        assert!(one.contains(ip("198.18.3.7")) && !one.contains(ip("198.18.3.8")));
        let all: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains(ip("1.2.3.4")) && !all.contains(ip("fd00::1")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "x/8", "10.0.0.0/", "fd00::1/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn admission_order() {
        let local = LocalAddrs::default();
        let mut p = UncapturedPolicy::default();
        assert_eq!(admit(&p, &local, ip("127.0.0.1")), Admission::NodeLocal);
        assert_eq!(admit(&p, &local, ip("::1")), Admission::NodeLocal);
        // 198.18.250.7 is never an address of the test machine.
        assert_eq!(admit(&p, &local, ip("198.18.250.7")), Admission::Refused);
        p.allow = vec!["198.18.250.0/24".parse().expect("cidr")];
        assert_eq!(
            admit(&p, &local, ip("198.18.250.7")),
            Admission::AllowedCidr
        );
        p.allow.clear();
        p.mode = UncapturedMode::Allow;
        assert_eq!(admit(&p, &local, ip("198.18.250.7")), Admission::AllowAll);
    }

    #[test]
    fn own_addresses_are_node_local() {
        let local = LocalAddrs::default();
        let own = read_local_addrs();
        for a in own.iter().filter(|a| !a.is_loopback()) {
            assert!(local.is_local(*a), "{a} is an address of this netns");
        }
    }
}
