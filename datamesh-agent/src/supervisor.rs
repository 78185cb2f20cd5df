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
//! - Health: every second the supervisor writes a `ping` on a Unix socketpair it owns; the
//!   worker's runtime answers with a `pong` (lines below). No pong for
//!   [`HANG_AFTER`] (once the worker answered its first) → SIGKILL and replace.
//! - Backoff: a worker that dies within [`STABLE_AFTER`] of its start counts as a failure;
//!   consecutive failures wait 0, 100 ms, 200 ms, ... up to [`BACKOFF_CAP`] before the next
//!   start. From [`FAIL_OPEN_AFTER`] consecutive failures, the supervisor stops the heartbeat
//!   and zeroes it, so capture fails open (pods reach their Redis directly) until a worker
//!   answers a health check again.
//! - Connections open in a worker when it died (its last reported count) are counted as lost.
//! - Graceful replacement (SIGUSR2 to the supervisor, or the worker's watchdog reporting a
//!   budget breach in its pong): a successor (generation + 1, `--graceful`) starts while the
//!   worker serves; once the successor's pong says it serves (every listener accepting), the
//!   old worker gets SIGUSR1 (it retires: stops accepting, drains, exits 0) and joins the
//!   retiring list: reaped when it exits, SIGKILLed at `drain_timeout_ms` + 2 s. Its exit is
//!   no crash (no restart, no failure, its connections not lost). Health pings go to the
//!   current worker only. A successor that exits or is not serving within [`START_TIMEOUT`]
//!   is dropped and the old worker stays. Watchdog replacements: at most one per
//!   `watchdog.min_replace_interval_s`, doubled (up to [`WATCHDOG_BACKOFF_CAP`]) whenever a
//!   worker started by one breaches again right away (a budget too small, not a leak).
//!
//! Lines on the health channel: `ping <restarts> <lost> <failopen> <replaced by operator>
//! <replaced by watchdog>` and `pong <open connections> <serving 0|1> <breach resource|->`.
//! The counts reach `/metrics` through the worker (the ping carries them):
//! `datamesh_agent_worker_restarts_total`, `datamesh_agent_worker_lost_connections_total`,
//! `datamesh_agent_capture_fail_open`, `datamesh_agent_worker_replacements_total{reason}`, and
//! the heartbeats the supervisor wrote as `datamesh_dataplane_heartbeats_total` (the alerts'
//! sign of a beating agent).

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
/// A successor is asked this often whether it serves yet (so the old worker retires soon).
const SUCCESSOR_PING_EVERY: Duration = Duration::from_millis(100);
/// The longest wait between two watchdog replacements while new workers keep breaching.
pub const WATCHDOG_BACKOFF_CAP: Duration = Duration::from_secs(3600);
const TICK: Duration = Duration::from_millis(50);

/// Why a worker is replaced gracefully (the `reason` of
/// `datamesh_agent_worker_replacements_total`; the index is its place in the ping line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replacement {
    /// SIGUSR2 to the supervisor (`datamesh-agent restart-worker`).
    Operator = 0,
    /// The worker's watchdog reported a budget breach.
    Watchdog = 1,
}

impl Replacement {
    pub const ALL: [Replacement; 2] = [Replacement::Operator, Replacement::Watchdog];

    pub fn as_str(self) -> &'static str {
        match self {
            Replacement::Operator => "operator",
            Replacement::Watchdog => "watchdog",
        }
    }
}

/// A worker's answer to a ping: `pong <open connections> <serving 0|1> <breach>`, the breach
/// being the resource the watchdog reports or `-`. A bare `pong <open>` (an older worker)
/// reads as serving, no breach.
#[derive(Debug, PartialEq, Eq)]
pub struct Pong<'a> {
    pub open: u64,
    pub serving: bool,
    pub breach: Option<&'a str>,
}

impl<'a> Pong<'a> {
    pub fn line(&self) -> String {
        format!(
            "pong {} {} {}\n",
            self.open,
            u8::from(self.serving),
            self.breach.unwrap_or("-")
        )
    }

    pub fn parse(line: &'a str) -> Option<Self> {
        let mut it = line.trim().strip_prefix("pong ")?.split_whitespace();
        let open = it.next()?.parse().ok()?;
        let serving = it.next() != Some("0");
        let breach = it.next().filter(|b| *b != "-");
        Some(Self {
            open,
            serving,
            breach,
        })
    }
}

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
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ] {
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
    /// Heartbeats written (the worker exports them with each ping).
    beats: AtomicU64,
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
    /// Every listener accepts (from its pongs).
    serving: bool,
    /// The resource its watchdog reports in breach (from its pongs).
    breach: Option<String>,
    /// Its breach was looked at (logged once) / a replacement for it was deferred (logged once).
    breach_seen: bool,
    breach_deferred: bool,
    /// Started by a watchdog replacement.
    by_watchdog: bool,
}

impl Worker {
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    fn ping(&mut self, now: Instant, line: &str) {
        self.last_ping = now;
        let _ = self.health.write_all(line.as_bytes());
    }

    /// Reads the pongs waiting; true if one came.
    fn read_pongs(&mut self, now: Instant) -> bool {
        let mut tmp = [0u8; 256];
        loop {
            match self.health.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(tmp.get(..n).unwrap_or_default()),
                Err(_) => break,
            }
        }
        let mut got = false;
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(p) = Pong::parse(&line) else {
                continue;
            };
            self.open = p.open;
            self.serving = p.serving;
            self.breach = p.breach.map(str::to_string);
            if self.last_pong.is_none() {
                info!(
                    worker_pid = self.child.id(),
                    after_ms = self.started.elapsed().as_millis() as u64,
                    "worker healthy"
                );
            }
            self.last_pong = Some(now);
            got = true;
        }
        got
    }
}

/// Waits for `w` to exit until `deadline`, then SIGKILLs it.
fn stop_by(w: &mut Worker, deadline: Instant) -> anyhow::Result<std::process::ExitStatus> {
    loop {
        if let Some(st) = w.child.try_wait().context("waiting for the worker")? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            warn!(
                worker_pid = w.child.id(),
                "the worker did not stop by the drain deadline: killing it"
            );
            let _ = w.child.kill();
            return w.child.wait().context("reaping the worker");
        }
        std::thread::sleep(TICK);
    }
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
    /// The successor serves; our workers drain (SIGUSR1) until they exit or their deadline.
    Retiring {
        out: handover::Outgoing,
        since: Instant,
        /// SIGTERM came meanwhile: exit as soon as the workers are gone.
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
    // `successor_for`: the worker is a graceful successor (it must not reset what the running
    // worker still counts), started for this reason.
    let spawn = |generation: u64,
                 stats: &str,
                 successor_for: Option<Replacement>|
     -> anyhow::Result<Worker> {
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
        if successor_for.is_some() {
            cmd.arg("--graceful");
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
            serving: false,
            breach: None,
            breach_seen: false,
            breach_deferred: false,
            by_watchdog: successor_for == Some(Replacement::Watchdog),
        })
    };

    let mut generation = 0u64;
    let mut restarts = 0u64;
    let mut lost = 0u64;
    let mut failures = 0u32;
    let mut fail_open = false;
    let mut ever_healthy = false;
    // Graceful replacements by reason (Replacement as index).
    let mut replaced = [0u64; 2];
    let ping = |restarts: u64, lost: u64, fail_open: bool, replaced: [u64; 2]| {
        format!(
            "ping {restarts} {lost} {} {} {} {}\n",
            u8::from(fail_open),
            replaced[0],
            replaced[1],
            hb.beats.load(Ordering::Relaxed)
        )
    };
    let drain = Duration::from_millis(cfg.drain_timeout_ms);
    // The watchdog's replacements: at most one per `wd_every`, doubled (up to
    // WATCHDOG_BACKOFF_CAP) while new workers breach right away.
    let wd_min = Duration::from_secs(cfg.watchdog.min_replace_interval_s.max(1));
    let mut wd_every = wd_min;
    let mut wd_last: Option<Instant> = None;
    let mut worker: Option<Worker> = Some(spawn(generation, &ping(0, 0, false, replaced), None)?);
    // A worker starting to take over from `worker` (not pinged for health, only for readiness).
    let mut successor: Option<Worker> = None;
    // Workers told to retire (SIGUSR1): reaped when they exit, killed at their deadline.
    let mut retiring: Vec<(Worker, Instant)> = Vec::new();
    let mut next_start: Option<Instant> = None;
    // SIGTERM while a successor starts: it is honoured once the handover ends either way.
    let mut term_pending = false;
    // Our worker served once: the predecessor (if any) was told, our upgrade socket bound.
    let mut announced = false;
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
            match step_handed_over(&mut upgrade, &mut retiring, &mut handed_socks, sig) {
                Some(code) => break code,
                None => {
                    std::thread::sleep(TICK);
                    continue;
                }
            }
        }
        let mut request: Option<Replacement> = None;
        if sig == libc::SIGHUP {
            if let Some(w) = &worker {
                w.signal(libc::SIGHUP);
            }
        } else if sig == libc::SIGUSR2 {
            request = Some(Replacement::Operator);
        } else if sig == libc::SIGTERM || sig == libc::SIGINT {
            info!(
                signal = sig,
                "supervisor: stopping the heartbeat, then the worker"
            );
            // The worker zeroes the heartbeat and drains; no beat may follow its zeroing.
            hb.set_beat(false, worker.is_none());
            // A successor stops like the worker; retiring ones finish their drain.
            let mut others: Vec<Worker> = successor.take().into_iter().collect();
            for o in &others {
                o.signal(libc::SIGTERM);
            }
            others.extend(retiring.drain(..).map(|(w, _)| w));
            // A hung worker never drains: SIGKILL after the drain deadline + 2 s.
            let deadline = Instant::now() + drain + Duration::from_secs(2);
            let st = match worker.take() {
                Some(mut w) => {
                    w.signal(libc::SIGTERM);
                    Some(stop_by(&mut w, deadline)?)
                }
                None => None,
            };
            for mut o in others {
                let _ = stop_by(&mut o, deadline);
            }
            // Capture off whatever the worker managed (it zeroes the heartbeat first thing
            // when it stops; a killed one did not).
            hb.set_beat(false, true);
            if let Some(r) = &opts.ready_file {
                let _ = std::fs::remove_file(r);
            }
            match st {
                Some(st) => {
                    info!(status = %st, "worker stopped; supervisor exits");
                    break if st.success() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    };
                }
                None => break ExitCode::SUCCESS,
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
                if w.read_pongs(now) {
                    ever_healthy = true;
                    if fail_open {
                        fail_open = false;
                        hb.set_beat(true, false);
                        info!("a worker is healthy again: capture back on");
                    }
                }
                if now.duration_since(w.last_ping) >= PING_EVERY {
                    w.ping(now, &ping(restarts, lost, fail_open, replaced));
                }
                // The watchdog's breach, reported with the pongs.
                if let (Some(res), None) = (w.breach.clone(), successor.as_ref()) {
                    if !w.breach_seen {
                        w.breach_seen = true;
                        if w.by_watchdog && w.started.elapsed() < wd_every + wd_min {
                            wd_every = (wd_every * 2).min(WATCHDOG_BACKOFF_CAP);
                            error!(resource = %res, worker_pid = w.child.id(), age_s = w.started.elapsed().as_secs(), next_replacement_in_s = wd_every.as_secs(), "watchdog: the new worker breaches its budget right after a replacement: the budget is likely too small for this node's load (not a leak); raise it or the container's limits. Backing off replacements");
                        }
                    }
                    let allowed = wd_last.is_none_or(|t| now.duration_since(t) >= wd_every);
                    if allowed {
                        info!(resource = %res, worker_pid = w.child.id(), "watchdog breach: replacing the worker gracefully");
                        request = Some(Replacement::Watchdog);
                    } else if !w.breach_deferred {
                        w.breach_deferred = true;
                        warn!(resource = %res, worker_pid = w.child.id(), at_most_every_s = wd_every.as_secs(), "watchdog breach: the last replacement was too recent; replacing later");
                    }
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
            if let Some(s) = successor.take() {
                // A successor was starting: it is the next worker (its start timeout applies).
                info!(
                    worker_pid = s.child.id(),
                    "the successor being started takes over"
                );
                worker = Some(s);
                next_start = None;
            } else {
                next_start = Some(now + delay);
            }
        }
        // A graceful replacement asked for (SIGUSR2, the watchdog).
        if let Some(reason) = request {
            match (&worker, &successor) {
                (_, Some(s)) => info!(
                    reason = reason.as_str(),
                    successor_pid = s.child.id(),
                    "a replacement is already under way"
                ),
                (None, None) => warn!(
                    reason = reason.as_str(),
                    "no worker runs to replace (one is being started)"
                ),
                (Some(w), None) => {
                    if reason == Replacement::Watchdog {
                        wd_last = Some(now);
                    }
                    generation += 1;
                    match spawn(
                        generation,
                        &ping(restarts, lost, fail_open, replaced),
                        Some(reason),
                    ) {
                        Ok(s) => {
                            info!(reason = reason.as_str(), worker_pid = w.child.id(), successor_pid = s.child.id(), "replacing the worker gracefully: its successor starts while it serves");
                            successor = Some(s);
                        }
                        Err(e) => {
                            error!(error = %e, reason = reason.as_str(), "cannot start a successor: the current worker stays")
                        }
                    }
                }
            }
        }
        // The successor: ready (every listener accepting) → it becomes the worker and the old
        // one retires; dead or not ready in time → the old one stays.
        if let Some(s) = successor.as_mut() {
            let mut failed = None;
            match s.child.try_wait() {
                Ok(Some(st)) => failed = Some(format!("it exited ({st}) before it was ready")),
                Ok(None) => {
                    s.read_pongs(now);
                    if !s.serving && now.duration_since(s.last_ping) >= SUCCESSOR_PING_EVERY {
                        s.ping(now, &ping(restarts, lost, fail_open, replaced));
                    }
                    if !s.serving && now.duration_since(s.started) >= START_TIMEOUT {
                        let _ = s.child.kill();
                        let _ = s.child.wait();
                        failed = Some(format!(
                            "it was not ready within {} s: killed",
                            START_TIMEOUT.as_secs()
                        ));
                    }
                }
                Err(e) => warn!(error = %e, "waitpid on the successor"),
            }
            if let Some(why) = failed {
                error!(
                    successor_pid = s.child.id(),
                    "graceful replacement failed: {why}; the current worker stays"
                );
                successor = None;
            } else if s.serving {
                if let Some(new) = successor.take() {
                    let reason = new.by_watchdog.then_some(Replacement::Watchdog);
                    let reason = reason.unwrap_or(Replacement::Operator);
                    replaced[reason as usize] += 1;
                    if let Some(old) = worker.take() {
                        old.signal(libc::SIGUSR1);
                        info!(reason = reason.as_str(), old_pid = old.child.id(), new_pid = new.child.id(), open_connections = old.open, after_ms = new.started.elapsed().as_millis() as u64, "the successor serves: the old worker retires (stops accepting, drains, exits)");
                        retiring.push((old, now + drain + Duration::from_secs(2)));
                    }
                    ever_healthy = true;
                    let mut new = new;
                    new.ping(now, &ping(restarts, lost, fail_open, replaced));
                    worker = Some(new);
                }
            }
        }
        // Retiring workers: their exit is no crash (nothing counted).
        reap_retiring(&mut retiring, now);
        if worker.is_none() {
            if let Some(t) = next_start {
                if Instant::now() >= t {
                    generation += 1;
                    match spawn(generation, &ping(restarts, lost, fail_open, replaced), None) {
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
        // Once our worker serves (every listener accepting): tell the agent we took over from,
        // and be ready for a successor of our own.
        let serving = worker
            .as_ref()
            .is_some_and(|w| w.serving && w.last_pong.is_some());
        if serving && !announced {
            announced = true;
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
        let was_offered = matches!(upgrade, Upgrade::Offered(..));
        let retire_by = now + drain + Duration::from_secs(2);
        upgrade = step_upgrade(
            std::mem::replace(&mut upgrade, Upgrade::Off),
            term_pending,
            serving && successor.is_none(),
            &cfg.pin_dir,
            &handed_socks,
        );
        if matches!(upgrade, Upgrade::Retiring { .. }) {
            // The successor agent serves and beats the heartbeat itself: our worker retires
            // (stop accepting, close clients at command boundaries, exit).
            hb.set_beat(false, false);
            if let Some(w) = worker.take() {
                w.signal(libc::SIGUSR1);
                retiring.push((w, retire_by));
            }
            if let Some(s) = successor.take() {
                s.signal(libc::SIGTERM);
                retiring.push((s, retire_by));
            }
        }
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
                info!(
                    successor_pid = out.peer_pid,
                    successor_version = %out.peer_version,
                    successor_abi = out.peer_abi,
                    "the successor serves: retiring our worker (stop accepting, close clients at command boundaries)"
                );
                Upgrade::Retiring {
                    out,
                    since: Instant::now(),
                    exit_after: term_pending,
                }
            }
        },
        other => other,
    }
}

/// Reaps the retiring workers that exited (a retirement is no crash: nothing counted) and
/// SIGKILLs those still alive at their deadline (`drain_timeout_ms` + 2 s).
fn reap_retiring(retiring: &mut Vec<(Worker, Instant)>, now: Instant) {
    retiring.retain_mut(|(w, deadline)| match w.child.try_wait() {
        Ok(Some(st)) => {
            info!(worker_pid = w.child.id(), status = %st, age_ms = w.started.elapsed().as_millis() as u64, "retired worker exited");
            false
        }
        Ok(None) if now >= *deadline => {
            warn!(
                worker_pid = w.child.id(),
                "retired worker still alive at drain_timeout_ms + 2 s: killing it"
            );
            let _ = w.child.kill();
            let _ = w.child.wait();
            false
        }
        Ok(None) => true,
        Err(e) => {
            warn!(error = %e, "waitpid on a retired worker");
            true
        }
    });
}

/// One tick after a handover: waits for the retiring workers (SIGKILL at their deadline), then
/// closes our copies of the sockets and idles until SIGTERM. `Some(code)`: exit now.
fn step_handed_over(
    upgrade: &mut Upgrade,
    retiring: &mut Vec<(Worker, Instant)>,
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
            exit_after,
        } => {
            if term {
                info!("SIGTERM while our worker drains: exiting once it is gone");
                *exit_after = true;
            }
            let now = Instant::now();
            reap_retiring(retiring, now);
            if !retiring.is_empty() {
                return None;
            }
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
        m.apply("ping 2 5 1 0 0 40");
        assert_eq!(
            (m.restarts.get(), m.lost.get(), m.fail_open.get()),
            (2, 5, 1)
        );
        assert_eq!(m.heartbeats.get(), 40);
        m.apply("ping 3 5 0 0 0 50");
        assert_eq!(
            (m.restarts.get(), m.lost.get(), m.fail_open.get()),
            (3, 5, 0)
        );
        assert_eq!(m.heartbeats.get(), 50);
        // Without the heartbeat count (an older supervisor) the rest still applies.
        m.apply("ping 3 5 0");
        assert_eq!((m.restarts.get(), m.heartbeats.get()), (3, 50));
        // Garbage and short lines change nothing.
        m.apply("ping x 1 0");
        m.apply("ping 9");
        assert_eq!((m.restarts.get(), m.lost.get()), (3, 5));
        // The replacements by reason (operator, watchdog), also monotonic.
        let replaced = |m: &SupervisorMetrics, r: Replacement| {
            m.replacements
                .get_or_create(&ReplacementLabels {
                    reason: r.as_str().into(),
                })
                .get()
        };
        m.apply("ping 3 5 0 1 2");
        assert_eq!(replaced(&m, Replacement::Operator), 1);
        assert_eq!(replaced(&m, Replacement::Watchdog), 2);
        m.apply("ping 3 5 0 1 1");
        m.apply("ping 3 5 0 x 4");
        assert_eq!(replaced(&m, Replacement::Operator), 1);
        assert_eq!(replaced(&m, Replacement::Watchdog), 4);
    }

    #[test]
    fn pong_lines_round_trip_and_old_ones_parse() {
        let p = Pong {
            open: 7,
            serving: true,
            breach: Some("fds"),
        };
        assert_eq!(p.line(), "pong 7 1 fds\n");
        assert_eq!(Pong::parse(&p.line()), Some(p));
        let none = Pong {
            open: 0,
            serving: false,
            breach: None,
        };
        assert_eq!(Pong::parse(&none.line()), Some(none));
        // An older worker's `pong <open>`: serving, no breach.
        assert_eq!(
            Pong::parse("pong 3\n"),
            Some(Pong {
                open: 3,
                serving: true,
                breach: None
            })
        );
        assert_eq!(Pong::parse("pong x 1 -"), None);
        assert_eq!(Pong::parse("ping 1 2 3"), None);
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
    /// The data plane's heartbeat counter (`DataplaneMetrics::heartbeats`, registered there),
    /// kept at the supervisor's count: supervised, the supervisor writes the heartbeat.
    heartbeats: prometheus_client::metrics::counter::Counter,
    replacements: prometheus_client::metrics::family::Family<
        ReplacementLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReplacementLabels {
    reason: String,
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
        registry.register(
            "agent_worker_replacements",
            "Graceful worker replacements (reason = operator: SIGUSR2 | watchdog: a budget breach)",
            self.replacements.clone(),
        );
        for r in Replacement::ALL {
            let _ = self.replacements.get_or_create(&ReplacementLabels {
                reason: r.as_str().into(),
            });
        }
    }

    /// The supervisor's heartbeat count goes into `heartbeats` (a clone of the data plane's
    /// registered counter).
    pub fn with_heartbeats(heartbeats: prometheus_client::metrics::counter::Counter) -> Self {
        Self {
            heartbeats,
            ..Self::default()
        }
    }

    /// Applies a `ping <restarts> <lost> <failopen> [<replaced by operator> <replaced by
    /// watchdog> [<heartbeats>]]` line (the optional fields: a supervisor of an older build
    /// sends fewer).
    fn apply(&self, line: &str) {
        let mut it = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse::<u64>().ok());
        let (Some(Some(r)), Some(Some(l)), Some(Some(f))) = (it.next(), it.next(), it.next())
        else {
            return;
        };
        let raise = |c: &prometheus_client::metrics::counter::Counter, to: u64| {
            let now = c.get();
            if to > now {
                c.inc_by(to - now);
            }
        };
        raise(&self.restarts, r);
        raise(&self.lost, l);
        self.fail_open.set(f as i64);
        for reason in Replacement::ALL {
            if let Some(Some(n)) = it.next() {
                raise(
                    &self.replacements.get_or_create(&ReplacementLabels {
                        reason: reason.as_str().into(),
                    }),
                    n,
                );
            }
        }
        if let Some(Some(b)) = it.next() {
            raise(&self.heartbeats, b);
        }
    }
}

/// What the worker reports with each pong (see [`Pong`]).
pub struct HealthReport {
    pub shared: Arc<datamesh_proxy::listener::Shared>,
    /// True once every listener accepts (the worker is ready).
    pub serving: Arc<AtomicBool>,
    pub watchdog: Arc<crate::watchdog::Watchdog>,
}

/// The worker's health task: answers each ping with `pong <open connections> <serving 0|1>
/// <breach: a resource or ->` from the proxy's runtime (a stuck runtime answers nothing, and
/// the supervisor replaces it).
pub fn spawn_health(
    health_fd: RawFd,
    report: HealthReport,
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
                let pong = Pong {
                    open: report.shared.open_connections() as u64,
                    serving: report.serving.load(Ordering::SeqCst),
                    breach: report.watchdog.breach().map(|r| r.as_str()),
                }
                .line();
                if w.write_all(pong.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    }))
}
