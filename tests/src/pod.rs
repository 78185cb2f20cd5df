//! A pod: a named network namespace with a veth on the instance bridge and its own cgroup under
//! the attached cgroup. Commands run "in the pod" as real processes, because both the netns and
//! the cgroup are per process.
//!
//! [`Pod::cmd`] pre-opens the pod cgroup's `cgroup.procs` and the netns file, and in the child
//! (between fork and exec) writes "0" to `cgroup.procs` (moving the child) and calls
//! `setns(CLONE_NEWNET)`. [`Pod::cmd_in_cgroup`] does the same with another cgroup, which is how
//! a test runs a process in the pod's network but outside the attached cgroup.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::net::{Bridge, Netns, Veth};

/// A pod of a test instance. Owns its veth and netns; its cgroup is removed with the instance's.
#[derive(Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    cgroup: PathBuf,
    // Drop order: the veth first, then the namespace.
    veth: Veth,
    netns: Netns,
}

impl Pod {
    /// Creates the netns `dmt<n>-<name>`, the veth `dmt<n>h<i>` and the cgroup `pod-<name>`
    /// under `parent_cgroup`.
    pub fn create(
        n: u8,
        i: u8,
        name: &str,
        bridge: &Bridge,
        parent_cgroup: &crate::cgroup::Cgroup,
    ) -> Result<Self> {
        Self::create_at(
            n,
            i,
            name,
            bridge,
            parent_cgroup,
            Path::new(&format!("pod-{name}")),
        )
    }

    /// Like [`Pod::create`], with the pod's cgroup at `cgroup_rel` (nested directories, e.g. the
    /// kubelet's layout) under `parent_cgroup`.
    pub fn create_at(
        n: u8,
        i: u8,
        name: &str,
        bridge: &Bridge,
        parent_cgroup: &crate::cgroup::Cgroup,
        cgroup_rel: &Path,
    ) -> Result<Self> {
        let netns = Netns::create(&format!("dmt{n}-{name}"))?;
        let ip = crate::net::pod_ip(n, i);
        let veth = Veth::create(n, i, &netns, ip, bridge)?;
        let cgroup = parent_cgroup.path().join(cgroup_rel);
        std::fs::create_dir_all(&cgroup)
            .map_err(|e| anyhow::anyhow!("creating cgroup {}: {e}", cgroup.display()))?;
        Ok(Self {
            name: name.to_string(),
            ip,
            cgroup,
            veth,
            netns,
        })
    }

    /// The short name given to the builder (`a`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The netns name, which is the name the agent discovers for this pod (`dmt<N>-a`).
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }

    /// The pod's address on the instance network.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's cgroup (under the attached cgroup).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The host-side veth name.
    pub fn veth(&self) -> &str {
        self.veth.host_name()
    }

    /// A command that runs `program` in this pod (its netns and its cgroup).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        self.cmd_in_cgroup(&self.cgroup, program)
    }

    /// A command that runs `program` in this pod's netns but in `cgroup`.
    pub fn cmd_in_cgroup(&self, cgroup: &Path, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, cgroup, &self.netns.path());
        cmd
    }
}

/// Makes `cmd`'s child join `cgroup` and the netns at `netns_path` before it execs.
///
/// The files are opened here, in the parent; if that fails, spawning the command fails with the
/// same error (so `cmd()` itself can stay infallible).
pub fn enter(cmd: &mut Command, cgroup: &Path, netns_path: &Path) {
    let procs: io::Result<File> = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"));
    let ns: io::Result<File> = File::open(netns_path);
    let (procs, ns) = match (procs, ns) {
        (Ok(p), Ok(n)) => (p, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!(
                "datamesh-tests: cannot enter pod (cgroup {}, netns {}): {e}",
                cgroup.display(),
                netns_path.display()
            );
            fail_spawn(cmd, &e);
            return;
        }
    };
    // SAFETY: runs in the forked child before exec; it only calls write(2) and setns(2) on fds
    // the closure owns (both async-signal-safe) and reads errno, allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
            if r != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Moves the child into `cgroup` only (it stays in the caller's netns): used for the agent and
/// redis-server, and raises RLIMIT_NOFILE so 1000 concurrent connections fit.
///
/// The child also gets its own process group, so a Ctrl-C meant for the demo reaches only the
/// demo, which then stops the agent and redis in order.
pub fn enter_cgroup_with_nofile(cmd: &mut Command, cgroup: &Path, nofile: u64) {
    cmd.process_group(0);
    let procs: io::Result<File> = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"));
    match procs {
        Ok(procs) => {
            // SAFETY: runs in the forked child before exec; write(2) and setrlimit(2) on values
            // the closure owns; no allocation.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    // A lower hard limit than ours is only a smaller test; keep going on failure.
                    let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                    let r = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                    if r != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Err(e) => {
            eprintln!(
                "datamesh-tests: cannot open {}/cgroup.procs: {e}",
                cgroup.display()
            );
            fail_spawn(cmd, &e);
        }
    }
}

/// Makes `cmd` also join the cgroup whose procs file is `procs` (a second hierarchy, such as
/// a cgroup v1 memory cgroup) before exec.
pub fn also_enter_cgroup(cmd: &mut Command, procs: &Path) {
    match OpenOptions::new().write(true).open(procs) {
        Ok(f) => {
            // SAFETY: runs in the forked child before exec; one write(2) on a descriptor the
            // closure owns; no allocation.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Err(e) => {
            eprintln!("datamesh-tests: cannot open {}: {e}", procs.display());
            fail_spawn(cmd, &e);
        }
    }
}

/// Makes spawning `cmd` fail with `e`'s errno (the message was printed by the caller).
fn fail_spawn(cmd: &mut Command, e: &io::Error) {
    let code = e.raw_os_error().unwrap_or(libc::EINVAL);
    // SAFETY: the closure builds an io::Error from an integer (no allocation, no syscall).
    unsafe {
        cmd.pre_exec(move || Err(io::Error::from_raw_os_error(code)));
    }
}
