//! Running helper commands (`ip`, `bpftool`, clients in pods) with captured output and deadlines.
//!
//! A client that hangs must fail its test instead of hanging the whole run, so every command a
//! test starts runs under [`run_with_timeout`]: output goes to temporary files (no pipe can fill
//! up and block the child) and the child is killed at the deadline.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Renders a command line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.len() > 120 {
            s.push_str(&a[..120]);
            s.push_str("...");
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion; fails (naming the command, its status and stderr) unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            status_text(out.status),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Human text for an exit status, naming the signal when there is one.
pub fn status_text(st: std::process::ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Runs `cmd` (stdin from /dev/null) with stdout/stderr captured to files, killing it after
/// `timeout`.
///
/// Returns the output whatever the exit status (the caller decides); fails only when the command
/// cannot start or runs past the deadline.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_inner(cmd, Stdio::null(), timeout)
}

fn run_inner(cmd: &mut Command, stdin: Stdio, timeout: Duration) -> Result<Output> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("dmt-out-{}-{seq}", std::process::id()));
    let out_path = PathBuf::from(format!("{}.out", base.display()));
    let err_path = PathBuf::from(format!("{}.err", base.display()));
    let result = (|| -> Result<Output> {
        let out_f = File::create(&out_path).context("creating stdout capture file")?;
        let err_f = File::create(&err_path).context("creating stderr capture file")?;
        let mut child = cmd
            .stdin(stdin)
            .stdout(out_f)
            .stderr(err_f)
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().context("waiting for child")? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let so = std::fs::read(&out_path).unwrap_or_default();
                let se = std::fs::read(&err_path).unwrap_or_default();
                bail!(
                    "`{}` did not finish within {timeout:?} (killed)\nstdout: {}\nstderr: {}",
                    describe(cmd),
                    last_chars(&so, 2000),
                    last_chars(&se, 2000)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(Output {
            status,
            stdout: std::fs::read(&out_path).context("reading stdout capture")?,
            stderr: std::fs::read(&err_path).context("reading stderr capture")?,
        })
    })();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    result
}

/// Like [`run_with_timeout`] with `input` as the command's standard input.
pub fn run_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Result<Output> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let in_path = std::env::temp_dir().join(format!("dmt-in-{}-{seq}", std::process::id()));
    std::fs::write(&in_path, input).context("writing stdin file")?;
    let f = File::open(&in_path).context("opening stdin file");
    let _ = std::fs::remove_file(&in_path);
    run_inner(cmd, Stdio::from(f?), timeout)
}

/// Like [`run_with_timeout`] but fails unless the command exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = run_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({})\nstdout: {}\nstderr: {}",
            describe(cmd),
            status_text(out.status),
            last_chars(&out.stdout, 4000),
            last_chars(&out.stderr, 4000)
        );
    }
    Ok(out)
}

/// The last `n` characters of some output, lossily decoded.
pub fn last_chars(bytes: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    match s.char_indices().rev().nth(n) {
        Some((i, _)) => format!("...{}", &s[i..]),
        None => s.to_string(),
    }
}

/// Resident set size of a process in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The peak resident set size of a process so far (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (has the process exited?)"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("no {field} line in /proc/{pid}/status"))?;
    let kib = line.trim().trim_end_matches("kB").trim();
    kib.parse()
        .with_context(|| format!("bad {field} value {line:?} in /proc/{pid}/status"))
}

/// CPU time a process has used so far, in seconds: utime + stime of /proc/<pid>/stat, which
/// count every thread of the process, converted with `sysconf(_SC_CLK_TCK)` (their unit is
/// clock ticks, so the resolution is one tick, usually 10 ms).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (has the process exited?)"))?;
    // Field 2 (comm) is in parentheses and may hold spaces; the fields after the last ')' start
    // at field 3 (state), so utime (field 14) and stime (15) are the 12th and 13th of them.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("no ')' after comm in {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize, name: &str| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no {name} field"))?
            .parse::<u64>()
            .with_context(|| format!("bad {name} field in {path}"))
    };
    let total = ticks(11, "utime")? + ticks(12, "stime")?;
    Ok(total as f64 / clock_ticks_per_second()? as f64)
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the CPU times in /proc/<pid>/stat.
pub fn clock_ticks_per_second() -> Result<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) returned {hz}");
    }
    Ok(hz as u64)
}

/// Raises this process's RLIMIT_NOFILE (soft and hard) to at least `n`; returns the new soft
/// limit. Raising the hard limit needs CAP_SYS_RESOURCE (root has it).
pub fn raise_nofile(n: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur >= n {
        return Ok(lim.rlim_cur);
    }
    let new = libc::rlimit {
        rlim_cur: n,
        rlim_max: lim.rlim_max.max(n),
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!("setrlimit(RLIMIT_NOFILE, {n}) (is CAP_SYS_RESOURCE missing?)")
        });
    }
    Ok(n)
}
