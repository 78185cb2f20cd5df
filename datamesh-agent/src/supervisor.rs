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
//! - Health: every second the supervisor writes `ping <restarts> <lost> <failopen>` on a Unix
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
//! `datamesh_agent_capture_fail_open`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{error, info, warn};

use crate::config;
use crate::dataplane::{self, Maps};
use crate::handover;

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
}

struct HbState {
    maps: Option<Maps>,
    /// Kernel id of the settings map `maps` has open.
    settings_id: Option<u32>,
    beat: bool,
}

impl Heartbeat {
    fn with_maps<R>(st: &mut HbState, pin_dir: &Path, f: impl FnOnce(&Maps) -> R) -> Option<R> {
        // A worker of another build replaces the pinned maps (an upgrade across a layout
        // change): the beat must go to the settings map the programs now read.
        let pinned = aya::maps::MapInfo::from_pin(pin_dir.join(datamesh_common::MAP_SETTINGS))
            .ok()
            .map(|i| i.id());
        if st.maps.is_none() || pinned != st.settings_id {
            // The first worker pins the maps; until then there is nothing to beat.
            st.maps = Maps::open(pin_dir).ok();
            st.settings_id = if st.maps.is_some() { pinned } else { None };
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
        if let Some(Err(e)) = r {
            warn!(error = %e, "heartbeat write failed: capture will fail open");
            // Pins replaced (an upgrade): open them again next tick.
            st.maps = None;
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
/// A socket a predecessor handed over (`handed`, by name) is used instead of a new bind when
/// it is bound where the config wants it; handed sockets the config no longer uses are closed.
fn bind_listeners(
    cfg: &config::Config,
    mut handed: std::collections::HashMap<String, std::os::fd::OwnedFd>,
) -> anyhow::Result<(Vec<(String, RawFd)>, RawFd)> {
    let mut take = |name: &str, want: std::net::SocketAddr| -> Option<RawFd> {
        let fd = handed.remove(name)?;
        match handover::local_addr(fd.as_raw_fd()) {
            Some(have) if handover::addr_matches(have, want) => Some(fd.into_raw_fd()),
            have => {
                info!(socket = name, ?have, %want, "handed-over socket is not where the config wants it: binding anew");
                None
            }
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the bind runtime")?;
    rt.block_on(async {
        let mut fds = Vec::new();
        for (i, ep) in cfg.endpoints.iter().enumerate() {
            let fd = match take(&ep.name, cfg.proxy_bind(ep)) {
                Some(fd) => fd,
                None => {
                    let b = datamesh_proxy::listener::bind(&ep.name, cfg.proxy_bind(ep), i as u32)?;
                    b.listener
                        .into_std()
                        .context("endpoint listener")?
                        .into_raw_fd()
                }
            };
            clear_cloexec(fd)?;
            fds.push((ep.name.clone(), fd));
        }
        let fd = match take(handover::ADMIN, cfg.admin_listen) {
            Some(fd) => fd,
            None => {
                let admin = crate::admin::bind(cfg.admin_listen).await?;
                admin.into_std().context("admin listener")?.into_raw_fd()
            }
        };
        clear_cloexec(fd)?;
        Ok((fds, fd))
    })
}

/// The running agent's side of a zero-error upgrade (see `handover`).
enum Upgrade {
    /// No upgrade socket (yet: it is bound once the first worker is healthy).
    Off,
    /// Waiting for a successor.
    Listening(handover::Server),
    /// A successor has the sockets and starts its worker; ours still serves.
    Offered(handover::Outgoing, handover::Server),
    /// The successor serves; our worker drains (SIGUSR1) until it exits or `deadline`.
    Retiring {
        out: handover::Outgoing,
        since: Instant,
        deadline: Instant,
        /// SIGTERM came meanwhile: exit as soon as the worker is gone.
        exit_after: bool,
    },
    /// Handed over: nothing held; idle until SIGTERM.
    HandedOver,
}

pub fn run(opts: Options) -> anyhow::Result<ExitCode> {
    install_signals()?;
    let cfg = config::load(&opts.config)?;
    // A running agent of this data plane hands its listening sockets over (zero-error upgrade);
    // none answering is a fresh start.
    let mut incoming = handover::request(&cfg.upgrade_socket, &cfg.pin_dir)?;
    let handed = incoming
        .as_mut()
        .map(|i| std::mem::take(&mut i.socks).into_iter().collect())
        .unwrap_or_default();
    let (fds, admin_fd) = bind_listeners(&cfg, handed)?;
    let mut handed_socks: Vec<(String, RawFd)> = fds.clone();
    handed_socks.push((handover::ADMIN.to_string(), admin_fd));
    let mut upgrade = Upgrade::Off;
    let listen_arg = fds
        .iter()
        .map(|(n, fd)| format!("{n}={fd}"))
        .collect::<Vec<_>>()
        .join(",");
    let hb = Arc::new(Heartbeat {
        pin_dir: cfg.pin_dir.clone(),
        state: Mutex::new(HbState {
            maps: None,
            settings_id: None,
            beat: true,
        }),
        stop: AtomicBool::new(false),
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
        format!("ping {restarts} {lost} {}\n", u8::from(fail_open))
    };
    let mut worker: Option<Worker> = Some(spawn(generation, &ping(0, 0, false))?);
    let mut next_start: Option<Instant> = None;
    // SIGTERM while a successor starts: it is honoured once the handover ends either way.
    let mut term_pending = false;
    let code = loop {
        let mut sig = SIGNAL.swap(0, Ordering::SeqCst);
        if (sig == libc::SIGTERM || sig == libc::SIGINT) && matches!(upgrade, Upgrade::Offered(..))
        {
            info!("SIGTERM while a successor starts: stopping once the handover ends");
            term_pending = true;
            sig = 0;
        }
        // After a handover only the retiring worker is left to wait for.
        if matches!(upgrade, Upgrade::Retiring { .. } | Upgrade::HandedOver) {
            match step_handed_over(&mut upgrade, &mut worker, &mut handed_socks, sig) {
                Some(code) => break code,
                None => {
                    std::thread::sleep(TICK);
                    continue;
                }
            }
        }
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
        let mut became_healthy = false;
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
                            became_healthy = true;
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
        if became_healthy {
            if let Some(mut inc) = incoming.take() {
                match inc.ready() {
                    Ok(()) => info!(
                        old_pid = inc.old_pid,
                        old_version = %inc.old_version,
                        old_abi = inc.old_abi,
                        "our worker serves: the previous agent retires its own"
                    ),
                    Err(e) => warn!(error = %e, "could not tell the previous agent we serve"),
                }
            }
            if matches!(upgrade, Upgrade::Off) {
                match handover::Server::bind(&cfg.upgrade_socket) {
                    Ok(srv) => {
                        info!(path = %srv.path().display(), "upgrade socket ready");
                        upgrade = Upgrade::Listening(srv);
                    }
                    Err(e) => {
                        warn!(error = %e, "no upgrade socket: a successor will bind anew (its pods' connects may be refused meanwhile)")
                    }
                }
            }
        }
        let healthy = worker.as_ref().is_some_and(|w| w.last_pong.is_some());
        let retire_deadline = Duration::from_millis(cfg.drain_timeout_ms) + Duration::from_secs(2);
        let was_offered = matches!(upgrade, Upgrade::Offered(..));
        upgrade = step_upgrade(
            std::mem::replace(&mut upgrade, Upgrade::Off),
            term_pending,
            healthy,
            &cfg.pin_dir,
            &handed_socks,
            || {
                // The successor serves and beats the heartbeat itself.
                hb.set_beat(false, false);
                if let Some(w) = &worker {
                    // SAFETY: kill(2) on our own unreaped child.
                    unsafe { libc::kill(w.child.id() as libc::pid_t, libc::SIGUSR1) };
                }
            },
            retire_deadline,
        );
        if term_pending && was_offered && matches!(upgrade, Upgrade::Listening(_)) {
            // The handover failed: the deferred SIGTERM stops this agent as usual.
            term_pending = false;
            SIGNAL.store(libc::SIGTERM, Ordering::SeqCst);
        }
        std::thread::sleep(TICK);
    };
    hb.stop.store(true, Ordering::SeqCst);
    let _ = hb_thread.join();
    Ok(code)
}

/// One tick of the running agent's side of an upgrade (before the successor is ready):
/// accepts a successor, hands it the sockets, and on its `ready` calls `retire` (stop the
/// heartbeat, SIGUSR1 to the worker).
fn step_upgrade(
    state: Upgrade,
    term_pending: bool,
    healthy: bool,
    pin_dir: &Path,
    socks: &[(String, RawFd)],
    retire: impl FnOnce(),
    retire_deadline: Duration,
) -> Upgrade {
    match state {
        Upgrade::Listening(srv) => match srv.poll() {
            Some(stream) if healthy => match handover::offer(stream, pin_dir, socks) {
                Ok(out) => Upgrade::Offered(out, srv),
                Err(e) => {
                    warn!(error = %e, "handover refused");
                    Upgrade::Listening(srv)
                }
            },
            Some(_) => {
                warn!("a successor asked for the sockets while no worker of ours is healthy: refused (retry when this agent is ready)");
                Upgrade::Listening(srv)
            }
            None => Upgrade::Listening(srv),
        },
        Upgrade::Offered(mut out, srv) => match out.poll_ready() {
            handover::Poll::Waiting => Upgrade::Offered(out, srv),
            handover::Poll::Gone(why) => {
                warn!(%why, successor_pid = out.peer_pid, "the handover is off: this agent carries on");
                Upgrade::Listening(srv)
            }
            handover::Poll::Ready => {
                // The successor binds the path anew; ours stops listening.
                drop(srv);
                retire();
                info!(
                    successor_pid = out.peer_pid,
                    successor_version = %out.peer_version,
                    successor_abi = out.peer_abi,
                    "the successor serves: retiring our worker (stop accepting, close clients at command boundaries)"
                );
                let now = Instant::now();
                Upgrade::Retiring {
                    out,
                    since: now,
                    deadline: now + retire_deadline,
                    exit_after: term_pending,
                }
            }
        },
        other => other,
    }
}

/// One tick after a handover: waits for the retiring worker (SIGKILL at the deadline), then
/// closes our copies of the sockets and idles until SIGTERM. `Some(code)`: exit now.
fn step_handed_over(
    upgrade: &mut Upgrade,
    worker: &mut Option<Worker>,
    socks: &mut Vec<(String, RawFd)>,
    sig: i32,
) -> Option<ExitCode> {
    let term = sig == libc::SIGTERM || sig == libc::SIGINT;
    match upgrade {
        Upgrade::HandedOver => {
            if term {
                info!("handed over earlier: exiting");
                return Some(ExitCode::SUCCESS);
            }
            None
        }
        Upgrade::Retiring {
            out,
            since,
            deadline,
            exit_after,
        } => {
            if term {
                info!("SIGTERM while our worker drains: exiting once it is gone");
                *exit_after = true;
            }
            let gone = match worker.as_mut() {
                None => true,
                Some(w) => match w.child.try_wait() {
                    Ok(Some(st)) => {
                        info!(status = %st, drained_ms = since.elapsed().as_millis() as u64, "the retired worker exited");
                        true
                    }
                    Ok(None) if Instant::now() >= *deadline => {
                        warn!("the retiring worker still runs at the drain deadline: killing it");
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                        true
                    }
                    Ok(None) => false,
                    Err(e) => {
                        warn!(error = %e, "waitpid on the retiring worker");
                        false
                    }
                },
            };
            if !gone {
                return None;
            }
            *worker = None;
            out.done(since.elapsed());
            // Our copies of the listening sockets: the successor holds its own.
            for (_, fd) in socks.drain(..) {
                let _ = nix::unistd::close(fd);
            }
            info!(
                successor_pid = out.peer_pid,
                "handed over: this agent holds no socket now; idle until SIGTERM"
            );
            let exit = *exit_after;
            *upgrade = Upgrade::HandedOver;
            exit.then_some(ExitCode::SUCCESS)
        }
        _ => None,
    }
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
}

impl SupervisorMetrics {
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

    /// Applies a `ping <restarts> <lost> <failopen>` line.
    fn apply(&self, line: &str) {
        let mut it = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse::<u64>().ok());
        let (Some(Some(r)), Some(Some(l)), Some(Some(f))) = (it.next(), it.next(), it.next())
        else {
            return;
        };
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
