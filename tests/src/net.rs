//! Network plumbing of a test instance, through `ip` commands: the bridge `dmtbr<N>` in the host
//! netns (proxy address 198.18.N.1/24 and service address 198.19.N.1/32), and per pod a named
//! netns `dmt<N>-<name>` joined to the bridge by a veth pair `dmt<N>h<i>` / `eth0`.
//!
//! Each object is a guard deleted on drop. Only names matching the harness patterns are ever
//! created or deleted: host interfaces are never touched.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result};

use crate::proc::run_checked;

fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args)).map(|_| ())
}

/// The proxy address of instance `n` (on the bridge; pods' default gateway).
pub fn proxy_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, n, 1)
}

/// The service address of instance `n` (where the real redis-server listens).
pub fn service_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, n, 1)
}

/// The address of pod number `i` (0-based) of instance `n`.
pub fn pod_ip(n: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, n, 10 + i)
}

/// The instance bridge, deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    name: String,
}

impl Bridge {
    /// Creates `dmtbr<n>` with the proxy and service addresses and brings it up.
    pub fn create(n: u8) -> Result<Self> {
        let name = format!("dmtbr{n}");
        ip(&["link", "add", &name, "type", "bridge"])
            .with_context(|| format!("creating bridge {name}"))?;
        let guard = Self { name };
        let name = guard.name.as_str();
        ip(&["addr", "add", &format!("{}/24", proxy_ip(n)), "dev", name])?;
        ip(&["addr", "add", &format!("{}/32", service_ip(n)), "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(guard)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        delete_link(&self.name);
    }
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name]).with_context(|| format!("creating netns {name}"))?;
        Ok(Self {
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new(crate::NETNS_DIR).join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

/// A veth pair: host side on the bridge, `eth0` in the pod netns. Deleted on drop (deleting
/// either end deletes the pair).
#[derive(Debug)]
pub struct Veth {
    host: String,
}

impl Veth {
    /// Creates `dmt<n>h<i>` / `eth0` in `ns`, addresses the pod side with `addr`/24, brings up
    /// both ends and `lo`, and routes the pod's default via the proxy address.
    pub fn create(n: u8, i: u8, ns: &Netns, addr: Ipv4Addr, bridge: &Bridge) -> Result<Self> {
        let host = format!("dmt{n}h{i}");
        ip(&[
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])
        .with_context(|| format!("creating veth {host} for netns {}", ns.name()))?;
        let guard = Self { host };
        let h = guard.host.as_str();
        ip(&["link", "set", h, "master", bridge.name()])?;
        ip(&["link", "set", h, "up"])?;
        let nsn = ns.name();
        ip(&[
            "-n",
            nsn,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", nsn, "link", "set", "eth0", "up"])?;
        ip(&["-n", nsn, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            nsn,
            "route",
            "add",
            "default",
            "via",
            &proxy_ip(n).to_string(),
        ])?;
        Ok(guard)
    }

    pub fn host_name(&self) -> &str {
        &self.host
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        delete_link(&self.host);
    }
}

/// Deletes a link if it exists (errors are reported, not raised: this runs in Drop).
pub fn delete_link(name: &str) {
    if !link_exists(name) {
        return;
    }
    if let Err(e) = ip(&["link", "del", name]) {
        eprintln!("datamesh-tests: {e:#}");
    }
}

/// Deletes a named netns if it exists.
pub fn delete_netns(name: &str) {
    if !std::path::Path::new(crate::NETNS_DIR).join(name).exists() {
        return;
    }
    if let Err(e) = ip(&["netns", "del", name]) {
        eprintln!("datamesh-tests: {e:#}");
    }
}

/// True when a link of that name exists in the host netns.
pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Names of all links in the host netns.
pub fn list_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
