//! `datamesh-agent run`: the supervisor. It binds every endpoint's listener and the admin
//! listener, keeps the heartbeat of the pinned data plane, and runs the proxy in a worker
//! child (`datamesh-agent worker`, the same binary re-executed through /proc/self/exe) that
//! inherits the listening sockets by descriptor. No tokio runtime runs here: the supervisor is
//! a plain loop (50 ms), so it never forks after a runtime started, and a stuck proxy runtime
//! cannot stop the heartbeat.
//!
//! - A worker that dies (panic, abort, SIGKILL) is replaced at once; pod connects meanwhile
//!   wait in the listen backlog of the sockets the supervisor keeps open, and the next worker
//!   accepts them (none is refused).
//! - Health: every second the supervisor writes `ping <restarts> <lost> <failopen> <beats>` on a Unix
//!   socketpair it owns; the worker's runtime answers `pong <open connections>`. No pong for
//!   [`HANG_AFTER`] (once the worker answered its first) → SIGKILL and replace.
//! - Backoff: a worker that dies within [`STABLE_AFTER`] of its start counts as a failure;
//!   consecutive failures wait 0, 100 ms, 200 ms, ... up to [`BACKOFF_CAP`] before the next
//!   start. From [`FAIL_OPEN_AFTER`] consecutive failures, the supervisor stops the heartbeat
//!   and zeroes it, so capture fails open (pods reach their Redis directly) until a worker
//!   answers a health check again.
//! - Connections open in a worker when it died (its last reported count) are counted as lost.
//!
//! The counts reach `/metrics` through the worker (the ping carries them):
//! `datamesh_agent_worker_restarts_total`, `datamesh_agent_worker_lost_connections_total`,
//! `datamesh_agent_capture_fail_open`, and the heartbeats the supervisor wrote as
//! `datamesh_dataplane_heartbeats_total` (the alerts' sign of a beating agent).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{error, info, warn};

use crate::config;
use crate::dataplane::{self, Maps};

/// No pong for this long (after a first one) → the worker is hung: SIGKILL and replace.
pub const HANG_AFTER: Duration = Duration::from_millis(1800);
/// A new worker gets this long to answer its first health check (config, preflight and the
/// data plane setup happen before; the backends' topology wait after).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// A worker that lived this long was stable: the failure count restarts from 0.
pub const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Consecutive failures after which capture fails open.
pub const FAIL_OPEN_AFTER: u32 = 3;
/// The longest wait between two starts of a crashing worker.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
const PING_EVERY: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(50);

/// The delay before the next start after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1u64 << (failures - 2).min(16));
    Duration::from_millis(ms).min(BACKOFF_CAP)
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores into an atomic (async-signal-safe).
        unsafe { sigaction(s, &act) }.with_context(|| format!("installing the {s} handler"))?;
    }
    Ok(())
}

/// Marks `fd` inheritable across exec.
fn clear_cloexec(fd: RawFd) -> anyhow::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).context("clearing FD_CLOEXEC")?;
    Ok(())
}

/// The heartbeat the supervisor keeps. `beat` is false while capture fails open or the agent
/// stops; the lock orders a last beat before the zeroing write.
struct Heartbeat {
    pin_dir: PathBuf,
    state: Mutex<HbState>,
    stop: AtomicBool,
    /// Heartbeats written (sent to the worker with each ping, for its `/metrics`).
    beats: AtomicU64,
}

struct HbState {
    maps: Option<Maps>,
    beat: bool,
}

impl Heartbeat {
    fn with_maps<R>(st: &mut HbState, pin_dir: &Path, f: impl FnOnce(&Maps) -> R) -> Option<R> {
        if st.maps.is_none() {
            // The first worker pins the maps; until then there is nothing to beat.
            st.maps = Maps::open(pin_dir).ok();
        }
        st.maps.as_ref().map(f)
    }

    fn tick(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.beat {
            return;
        }
        let now = dataplane::monotonic_ns();
        let r = Self::with_maps(&mut st, &self.pin_dir, |m| {
            m.update_settings(|s| s.heartbeat_ns = now)
        });
        match r {
            Some(Ok(_)) => {
                self.beats.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(e)) => {
                warn!(error = %e, "heartbeat write failed: capture will fail open");
                // Pins replaced (an upgrade): open them again next tick.
                st.maps = None;
            }
            None => {}
        }
    }

    /// Stops beating; with `zero`, writes heartbeat 0 so capture fails open at once.
    fn set_beat(&self, beat: bool, zero: bool) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.beat = beat;
        if zero {
            let r = Self::with_maps(&mut st, &self.pin_dir, |m| {
                m.update_settings(|s| s.heartbeat_ns = 0)
            });
            if let Some(Err(e)) = r {
                error!(error = %e, "could not zero the heartbeat: capture fails open after failopen_after_ms");
            }
        }
    }
}

struct Worker {
    child: Child,
    health: UnixStream,
    started: Instant,
    last_pong: Option<Instant>,
    last_ping: Instant,
    open: u64,
    buf: Vec<u8>,
}

/// Options of `datamesh-agent run`.
pub struct Options {
    pub config: PathBuf,
    pub ready_file: Option<PathBuf>,
    pub ebpf_object: Option<PathBuf>,
}

/// Binds the listeners on a short-lived current-thread runtime (the proxy's own bind code)
/// and returns them as plain descriptors, inheritable, as `name=fd` pairs, plus the admin fd.
fn bind_listeners(cfg: &config::Config) -> anyhow::Result<(Vec<(String, RawFd)>, RawFd)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the bind runtime")?;
    rt.block_on(async {
        let mut fds = Vec::new();
        for (i, ep) in cfg.endpoints.iter().enumerate() {
            let b = datamesh_proxy::listener::bind(&ep.name, cfg.proxy_bind(ep), i as u32)?;
            let std = b.listener.into_std().context("endpoint listener")?;
            let fd = std.into_raw_fd();
            clear_cloexec(fd)?;
            fds.push((ep.name.clone(), fd));
        }
        let admin = crate::admin::bind(cfg.admin_listen).await?;
        let fd = admin.into_std().context("admin listener")?.into_raw_fd();
        clear_cloexec(fd)?;
        Ok((fds, fd))
    })
}

pub fn run(opts: Options) -> anyhow::Result<ExitCode> {
    install_signals()?;
    let cfg = config::load(&opts.config)?;
    let (fds, admin_fd) = bind_listeners(&cfg)?;
    let listen_arg = fds
        .iter()
        .map(|(n, fd)| format!("{n}={fd}"))
        .collect::<Vec<_>>()
        .join(",");
    let hb = Arc::new(Heartbeat {
        pin_dir: cfg.pin_dir.clone(),
        state: Mutex::new(HbState {
            maps: None,
            beat: true,
        }),
        stop: AtomicBool::new(false),
        beats: AtomicU64::new(0),
    });
    let hb_thread = {
        let hb = hb.clone();
        let every = Duration::from_millis(cfg.heartbeat_interval_ms.max(1));
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !hb.stop.load(Ordering::SeqCst) {
                    hb.tick();
                    std::thread::sleep(every);
                }
            })
            .context("spawning the heartbeat thread")?
    };
    let exe =
        std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let spawn = |generation: u64, stats: &str| -> anyhow::Result<Worker> {
        let (mut ours, theirs) = UnixStream::pair().context("health socketpair")?;
        ours.set_nonblocking(true).context("health socket")?;
        // The first ping waits in the socket: the new worker has the counts from its start.
        let _ = ours.write_all(stats.as_bytes());
        clear_cloexec(theirs.as_raw_fd())?;
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .arg("--config")
            .arg(&opts.config)
            .arg("--listen-fds")
            .arg(&listen_arg)
            .arg("--admin-fd")
            .arg(admin_fd.to_string())
            .arg("--health-fd")
            .arg(theirs.as_raw_fd().to_string())
            .arg("--supervisor-pid")
            .arg(std::process::id().to_string())
            .arg("--generation")
            .arg(generation.to_string());
        if let Some(r) = &opts.ready_file {
            cmd.arg("--ready-file").arg(r);
        }
        if let Some(o) = &opts.ebpf_object {
            cmd.arg("--ebpf-object").arg(o);
        }
        // SAFETY: prctl is async-signal-safe; the worker dies with the supervisor (the
        // spawning thread is the main thread, which lives as long as the supervisor).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the worker")?;
        drop(theirs);
        info!(worker_pid = child.id(), generation, "worker started");
        Ok(Worker {
            child,
            health: ours,
            started: Instant::now(),
            last_pong: None,
            last_ping: Instant::now(),
            open: 0,
            buf: Vec::new(),
        })
    };

    let mut generation = 0u64;
    let mut restarts = 0u64;
    let mut lost = 0u64;
    let mut failures = 0u32;
    let mut fail_open = false;
    let mut ever_healthy = false;
    let ping = |restarts: u64, lost: u64, fail_open: bool| {
        let beats = hb.beats.load(Ordering::Relaxed);
        format!("ping {restarts} {lost} {} {beats}\n", u8::from(fail_open))
    };
    let mut worker: Option<Worker> = Some(spawn(generation, &ping(0, 0, false))?);
    let mut next_start: Option<Instant> = None;
    let code = loop {
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig == libc::SIGHUP {
            if let Some(w) = &worker {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(w.child.id() as libc::pid_t, libc::SIGHUP) };
            }
        } else if sig == libc::SIGTERM || sig == libc::SIGINT {
            info!(
                signal = sig,
                "supervisor: stopping the heartbeat, then the worker"
            );
            // The worker zeroes the heartbeat and drains; no beat may follow its zeroing.
            hb.set_beat(false, worker.is_none());
            match worker.take() {
                Some(mut w) => {
                    // SAFETY: kill(2) on our own unreaped child.
                    unsafe { libc::kill(w.child.id() as libc::pid_t, libc::SIGTERM) };
                    // A hung worker never drains: SIGKILL after the drain deadline + 2 s.
                    let deadline =
                        Instant::now() + Duration::from_millis(cfg.drain_timeout_ms + 2000);
                    let st = loop {
                        if let Some(st) = w.child.try_wait().context("waiting for the worker")? {
                            break st;
                        }
                        if Instant::now() >= deadline {
                            warn!("the worker did not stop by the drain deadline: killing it");
                            let _ = w.child.kill();
                            break w.child.wait().context("reaping the worker")?;
                        }
                        std::thread::sleep(TICK);
                    };
                    // Capture off whatever the worker managed (it zeroes the heartbeat first
                    // thing when it stops; a killed one did not).
                    hb.set_beat(false, true);
                    if let Some(r) = &opts.ready_file {
                        let _ = std::fs::remove_file(r);
                    }
                    info!(status = %st, "worker stopped; supervisor exits");
                    break if st.success() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    };
                }
                None => {
                    if let Some(r) = &opts.ready_file {
                        let _ = std::fs::remove_file(r);
                    }
                    break ExitCode::SUCCESS;
                }
            }
        }
        let now = Instant::now();
        let mut dead = None;
        if let Some(w) = worker.as_mut() {
            match w.child.try_wait() {
                Ok(Some(st)) => dead = Some(st),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "waitpid on the worker"),
            }
            if dead.is_none() {
                // Pongs.
                let mut tmp = [0u8; 256];
                loop {
                    match w.health.read(&mut tmp) {
                        Ok(0) => break,
                        Ok(n) => w.buf.extend_from_slice(tmp.get(..n).unwrap_or_default()),
                        Err(_) => break,
                    }
                }
                while let Some(pos) = w.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = w.buf.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line);
                    if let Some(n) = line.trim().strip_prefix("pong ") {
                        w.open = n.trim().parse().unwrap_or(w.open);
                        if w.last_pong.is_none() {
                            info!(
                                worker_pid = w.child.id(),
                                after_ms = w.started.elapsed().as_millis() as u64,
                                "worker healthy"
                            );
                        }
                        w.last_pong = Some(now);
                        ever_healthy = true;
                        if fail_open {
                            fail_open = false;
                            hb.set_beat(true, false);
                            info!("a worker is healthy again: capture back on");
                        }
                    }
                }
                if now.duration_since(w.last_ping) >= PING_EVERY {
                    w.last_ping = now;
                    let _ = w
                        .health
                        .write_all(ping(restarts, lost, fail_open).as_bytes());
                }
                let hung = match w.last_pong {
                    Some(t) => now.duration_since(t) >= HANG_AFTER,
                    None => now.duration_since(w.started) >= START_TIMEOUT,
                };
                if hung {
                    error!(
                        worker_pid = w.child.id(),
                        open_connections = w.open,
                        "worker does not answer its health check: killing it"
                    );
                    let _ = w.child.kill();
                    match w.child.wait() {
                        Ok(st) => dead = Some(st),
                        Err(e) => warn!(error = %e, "reaping the worker"),
                    }
                }
            }
        }
        if let Some(st) = dead {
            let Some(w) = worker.take() else { continue };
            if !ever_healthy && st.code().is_some() {
                // The first worker exited by itself before its first answer (bad config,
                // failed preflight): nothing to supervise, its log says why. One killed by a
                // signal (SIGKILL, the OOM killer, an abort) is restarted like any other: it
                // may have been serving already, its first answer just not in yet.
                error!(status = %st, "the worker exited before it was ready");
                hb.stop.store(true, Ordering::SeqCst);
                break ExitCode::FAILURE;
            }
            let lived = w.started.elapsed();
            restarts += 1;
            lost += w.open;
            if lived < STABLE_AFTER || w.last_pong.is_none() {
                failures += 1;
            } else {
                failures = 1;
            }
            let delay = backoff(failures);
            error!(worker_pid = w.child.id(), status = %st, signal = st.signal(), lost_connections = w.open, restarts, failures, delay_ms = delay.as_millis() as u64, "worker died: starting a new one");
            if failures >= FAIL_OPEN_AFTER && !fail_open {
                fail_open = true;
                hb.set_beat(false, true);
                error!(failures, "the proxy cannot stay up: capture fails open (pods reach their Redis directly) until a worker is healthy");
            }
            next_start = Some(now + delay);
        }
        if worker.is_none() {
            if let Some(t) = next_start {
                if Instant::now() >= t {
                    generation += 1;
                    match spawn(generation, &ping(restarts, lost, fail_open)) {
                        Ok(w) => {
                            worker = Some(w);
                            next_start = None;
                        }
                        Err(e) => {
                            error!(error = %e, "cannot start a worker; retrying");
                            next_start = Some(Instant::now() + BACKOFF_CAP);
                        }
                    }
                }
            }
        }
        std::thread::sleep(TICK);
    };
    hb.stop.store(true, Ordering::SeqCst);
    let _ = hb_thread.join();
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(10), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn ping_counts_reach_the_metrics_monotonically() {
        let m = SupervisorMetrics::default();
        m.apply("ping 2 5 1");
        assert_eq!(
            (m.restarts.get(), m.lost.get(), m.fail_open.get()),
            (2, 5, 1)
        );
        m.apply("ping 3 5 0");
        assert_eq!(
            (m.restarts.get(), m.lost.get(), m.fail_open.get()),
            (3, 5, 0)
        );
        // Garbage and short lines change nothing.
        m.apply("ping x 1 0");
        m.apply("ping 9");
        assert_eq!((m.restarts.get(), m.lost.get()), (3, 5));
        // The supervisor's heartbeats (4th field) become the data plane's counter.
        m.apply("ping 3 5 0 120");
        m.apply("ping 3 5 0 130");
        assert_eq!(m.heartbeats.get(), 130);
    }

    #[test]
    fn listen_fds_argument() {
        let s = crate::app::Supervised::parse("cache=3,other=4", 5, 6, 1, 0).expect("parse");
        drop(s);
        assert!(crate::app::Supervised::parse("cache", 5, 6, 1, 0).is_err());
        assert!(crate::app::Supervised::parse("cache=x", 5, 6, 1, 0).is_err());
        assert!(crate::app::Supervised::parse("", 5, 6, 1, 0).is_ok());
    }
}

/// The worker's side: the counts the supervisor sends with each ping, exported at /metrics.
#[derive(Default)]
pub struct SupervisorMetrics {
    restarts: prometheus_client::metrics::counter::Counter,
    lost: prometheus_client::metrics::counter::Counter,
    fail_open: prometheus_client::metrics::gauge::Gauge,
    /// The data plane's `datamesh_dataplane_heartbeats_total` (registered with the data plane's
    /// metrics): set to the supervisor's count, since the supervisor writes the heartbeat.
    heartbeats: prometheus_client::metrics::counter::Counter,
}

impl SupervisorMetrics {
    /// Counts taken from the pings; `heartbeats` is the data plane's heartbeat counter.
    pub fn new(heartbeats: prometheus_client::metrics::counter::Counter) -> Self {
        Self {
            heartbeats,
            ..Default::default()
        }
    }

    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "agent_worker_restarts",
            "Proxy workers the supervisor replaced (crashed or hung)",
            self.restarts.clone(),
        );
        registry.register(
            "agent_worker_lost_connections",
            "Client connections that were open in a worker when it died",
            self.lost.clone(),
        );
        registry.register(
            "agent_capture_fail_open",
            "1 while the supervisor keeps capture failed open because the proxy cannot stay up",
            self.fail_open.clone(),
        );
    }

    /// Applies a `ping <restarts> <lost> <failopen> [<beats>]` line.
    fn apply(&self, line: &str) {
        let mut it = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse::<u64>().ok());
        let (Some(Some(r)), Some(Some(l)), Some(Some(f))) = (it.next(), it.next(), it.next())
        else {
            return;
        };
        if let Some(Some(b)) = it.next() {
            let b0 = self.heartbeats.get();
            if b > b0 {
                self.heartbeats.inc_by(b - b0);
            }
        }
        let r0 = self.restarts.get();
        if r > r0 {
            self.restarts.inc_by(r - r0);
        }
        let l0 = self.lost.get();
        if l > l0 {
            self.lost.inc_by(l - l0);
        }
        self.fail_open.set(f as i64);
    }
}

/// The worker's health task: answers each ping with `pong <open connections>` from the
/// proxy's runtime (a stuck runtime answers nothing, and the supervisor replaces it).
pub fn spawn_health(
    health_fd: RawFd,
    shared: Arc<datamesh_proxy::listener::Shared>,
    metrics: Arc<SupervisorMetrics>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::os::fd::FromRawFd;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    // SAFETY: the supervisor passed this descriptor to this process only, for this use; it
    // is owned here once.
    let std = unsafe { UnixStream::from_raw_fd(health_fd) };
    std.set_nonblocking(true)?;
    let sock = tokio::net::UnixStream::from_std(std)?;
    Ok(tokio::spawn(async move {
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("ping") {
                metrics.apply(&line);
                let pong = format!("pong {}\n", shared.open_connections());
                if w.write_all(pong.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    }))
}
