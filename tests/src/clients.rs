//! Real client programs and the compatibility table they are held to.
//!
//! A client program is a directory `tests/clients/<client>/` with an executable `run` (and, when
//! something must be compiled, an executable `build`); `tests/clients/README.md` has the
//! contract. This module finds them ([`ClientProgram::discover`]), builds each once per test
//! process (serialised across processes with `flock` on `$DM_BUILD_DIR/.lock`), runs one with
//! the contract's environment in a pod or on the node under a hard deadline (the whole process
//! group is killed), and parses its `RESULT <feature> <status> <detail>` lines.
//!
//! [`Table`] parses `docs/compatibility.md`: one `## <client> ...` section per client, each with
//! a `| feature | standalone | sentinel | cluster | why |` table. [`compare`] checks every
//! observed status against its cell and returns every mismatch at once (client, feature,
//! topology, the cell, the observed line), so one run shows the whole picture.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::proc::{describe, last_chars, status_text};

/// The topologies of the table's columns, in order.
pub const TOPOLOGIES: [&str; 3] = ["standalone", "sentinel", "cluster"];
/// The statuses a table cell may hold (`FAILED` is never expected).
pub const STATUSES: [&str; 4] = ["works", "differs", "refused", "na"];
/// Hard deadline of one `run` (the contract allows the program 60 s).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// Hard deadline of one `build`.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// `tests/clients/`.
pub fn clients_dir() -> PathBuf {
    crate::project_root().join("tests").join("clients")
}

/// `docs/compatibility.md`.
pub fn table_path() -> PathBuf {
    crate::project_root().join("docs").join("compatibility.md")
}

/// One client program directory.
#[derive(Debug, Clone)]
pub struct ClientProgram {
    pub name: String,
    pub dir: PathBuf,
}

/// Per-process build outcomes by client name (the contract: `build` runs once per process).
static BUILT: Mutex<Option<HashMap<String, Result<(), String>>>> = Mutex::new(None);

impl ClientProgram {
    /// Every directory under `tests/clients/` that has an executable `run`, sorted by name.
    pub fn discover() -> Result<Vec<ClientProgram>> {
        Self::discover_in(&clients_dir())
    }

    pub fn discover_in(dir: &Path) -> Result<Vec<ClientProgram>> {
        let mut v = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() && crate::is_executable(&path.join("run")) {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| anyhow!("client directory {} is not UTF-8", path.display()))?
                    .to_string();
                v.push(ClientProgram { name, dir: path });
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    pub fn run_path(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `target/clients/<client>/`: `DM_BUILD_DIR`.
    pub fn build_dir(&self) -> PathBuf {
        crate::target_dir().join("clients").join(&self.name)
    }

    /// Runs `build` (if the client has one) unless this process already did; a failed build is
    /// remembered and reported again to every caller.
    pub fn ensure_built(&self) -> Result<()> {
        let build = self.dir.join("build");
        if !build.exists() {
            return Ok(());
        }
        let mut guard = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let built = guard.get_or_insert_with(HashMap::new);
        if let Some(r) = built.get(&self.name) {
            return r.clone().map_err(|e| anyhow!(e));
        }
        let r = self.build(&build).map_err(|e| format!("{e:#}"));
        built.insert(self.name.clone(), r.clone());
        r.map_err(|e| anyhow!(e))
    }

    fn build(&self, build: &Path) -> Result<()> {
        let dir = self.build_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .with_context(|| format!("opening {}/.lock", dir.display()))?;
        let _held = Flock::exclusive(&lock)?;
        let t0 = Instant::now();
        let mut cmd = Command::new(build);
        cmd.env("DM_BUILD_DIR", &dir).current_dir(&self.dir);
        let out = run_group(&mut cmd, BUILD_TIMEOUT)?;
        if out.timed_out || !out.status.success() {
            bail!(
                "{} build `{}` failed ({}):\nstdout: {}\nstderr: {}",
                self.name,
                build.display(),
                if out.timed_out {
                    format!("killed after {BUILD_TIMEOUT:?}")
                } else {
                    status_text(out.status)
                },
                last_chars(&out.stdout, 3000),
                last_chars(&out.stderr, 3000)
            );
        }
        eprintln!("client {}: built in {:?}", self.name, t0.elapsed());
        Ok(())
    }

    /// Runs the program: `cmd` must run [`ClientProgram::run_path`] (made with `Pod::cmd` to
    /// run in a pod, or `Command::new` on the node). Builds first when needed. Fails only when
    /// the program could not be started; a crash, a timeout or bad output is in the [`Run`].
    pub fn run(&self, mut cmd: Command, spec: &RunSpec) -> Result<Run> {
        if let Err(e) = self.ensure_built() {
            return Ok(Run {
                client: self.name.clone(),
                outcome: format!("not built: {e:#}"),
                crashed: true,
                stdout: String::new(),
                stderr: String::new(),
                results: BTreeMap::new(),
                problems: Vec::new(),
                elapsed: Duration::ZERO,
            });
        }
        cmd.current_dir(&self.dir)
            .env("DM_BUILD_DIR", self.build_dir())
            .env("DM_HOST", spec.addr.ip().to_string())
            .env("DM_PORT", spec.addr.port().to_string())
            .env("DM_USER", &spec.user)
            .env("DM_PASSWORD", &spec.password)
            .env("DM_TOPOLOGY", &spec.topology)
            .env("DM_MODE", &spec.mode)
            .env("DM_PREFIX", &spec.prefix);
        match &spec.features {
            Some(f) => cmd.env("DM_FEATURES", f),
            None => cmd.env_remove("DM_FEATURES"),
        };
        let t0 = Instant::now();
        let out = run_group(&mut cmd, RUN_TIMEOUT)?;
        let elapsed = t0.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let (results, problems) = parse_results(&stdout);
        let (outcome, crashed) = if out.timed_out {
            (format!("killed after {RUN_TIMEOUT:?}"), true)
        } else {
            (status_text(out.status), !out.status.success())
        };
        Ok(Run {
            client: self.name.clone(),
            outcome,
            crashed,
            stdout,
            stderr,
            results,
            problems,
            elapsed,
        })
    }
}

/// What a client program's run is given (the contract's environment).
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// `DM_HOST`, `DM_PORT`.
    pub addr: SocketAddr,
    pub user: String,
    pub password: String,
    /// `standalone`, `sentinel` or `cluster`.
    pub topology: String,
    /// `proxy` or `direct`.
    pub mode: String,
    pub prefix: String,
    /// `DM_FEATURES` (None: every feature).
    pub features: Option<String>,
}

/// One observed `RESULT` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub status: String,
    pub detail: String,
}

/// A finished run of one client program.
#[derive(Debug, Clone)]
pub struct Run {
    pub client: String,
    /// Exit status in words, or "killed after ..." / "not built: ...".
    pub outcome: String,
    /// Non-zero exit, killed at the deadline, or not built.
    pub crashed: bool,
    pub stdout: String,
    pub stderr: String,
    pub results: BTreeMap<String, Observed>,
    /// Malformed or duplicate `RESULT` lines.
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

impl Run {
    /// The last lines of stdout and stderr, for failure messages.
    pub fn tails(&self) -> String {
        format!(
            "---- {} ({}, {:.1} s) stdout tail ----\n{}\n---- {} stderr tail ----\n{}",
            self.client,
            self.outcome,
            self.elapsed.as_secs_f64(),
            last_lines(&self.stdout, 40),
            self.client,
            last_lines(&self.stderr, 40)
        )
    }

    /// The `RESULT` line of a feature as printed, for messages.
    pub fn line(&self, feature: &str) -> String {
        match self.results.get(feature) {
            Some(o) => format!("RESULT {feature} {} {}", o.status, o.detail),
            None => format!("no RESULT line for {feature}"),
        }
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `RESULT <feature> <status> <detail...>` lines of a program's stdout; anything else is
/// log. Returns the results and the problems (a malformed line, an unknown status, a feature
/// reported twice).
pub fn parse_results(stdout: &str) -> (BTreeMap<String, Observed>, Vec<String>) {
    let mut results = BTreeMap::new();
    let mut problems = Vec::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("RESULT ") else {
            continue;
        };
        let mut parts = rest.splitn(3, ' ');
        let (feature, status) = match (parts.next(), parts.next()) {
            (Some(f), Some(s)) if !f.is_empty() && !s.is_empty() => (f, s),
            _ => {
                problems.push(format!("malformed line {line:?}"));
                continue;
            }
        };
        if !STATUSES.contains(&status) && status != "FAILED" {
            problems.push(format!("unknown status in {line:?}"));
        }
        let detail = parts.next().unwrap_or("").trim().to_string();
        let o = Observed {
            status: status.to_string(),
            detail,
        };
        if results.insert(feature.to_string(), o).is_some() {
            problems.push(format!("{feature} reported twice (last: {line:?})"));
        }
    }
    (results, problems)
}

/// One feature row of a client's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub feature: String,
    /// Cells in [`TOPOLOGIES`] order.
    pub cells: [String; 3],
    pub why: String,
}

/// `docs/compatibility.md`: a table per client.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub clients: BTreeMap<String, Vec<Row>>,
}

impl Table {
    pub fn load() -> Result<Table> {
        let path = table_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the compatibility table {}", path.display()))?;
        Table::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses every `## <client> ...` section whose first table has the header
    /// `| feature | standalone | sentinel | cluster | why |`; other sections are prose.
    /// Every malformed row and cell is reported at once.
    pub fn parse(text: &str) -> Result<Table> {
        let mut table = Table::default();
        let mut errors = Vec::new();
        let mut section: Option<String> = None;
        let mut in_table = false;
        for (no, line) in text.lines().enumerate() {
            let no = no + 1;
            if let Some(h) = line.strip_prefix("## ") {
                section = h
                    .split_whitespace()
                    .next()
                    .map(|s| s.trim_matches('`').to_string());
                in_table = false;
                continue;
            }
            let Some(client) = &section else { continue };
            let line = line.trim();
            if !line.starts_with('|') {
                in_table = false;
                continue;
            }
            let cells: Vec<String> = line
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect();
            if cells.first().map(String::as_str) == Some("feature") {
                let want = ["feature", "standalone", "sentinel", "cluster", "why"];
                if cells != want {
                    errors.push(format!(
                        "line {no}: the {client} table header is {cells:?}, want {want:?}"
                    ));
                } else if table.clients.contains_key(client) {
                    errors.push(format!("line {no}: a second table for {client}"));
                } else {
                    table.clients.insert(client.clone(), Vec::new());
                    in_table = true;
                }
                continue;
            }
            if !in_table
                || cells
                    .iter()
                    .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
            {
                continue;
            }
            if cells.len() != 5 {
                errors.push(format!(
                    "line {no}: {client} row has {} cells, want 5: {line}",
                    cells.len()
                ));
                continue;
            }
            let row = Row {
                feature: cells[0].clone(),
                cells: [cells[1].clone(), cells[2].clone(), cells[3].clone()],
                why: cells[4].clone(),
            };
            for (topo, cell) in TOPOLOGIES.iter().zip(&row.cells) {
                if !STATUSES.contains(&cell.as_str()) {
                    errors.push(format!(
                        "line {no}: {client} {} {topo}: {cell:?} is not one of {STATUSES:?}",
                        row.feature
                    ));
                }
            }
            if row.cells.iter().any(|c| c != "works") && row.why.is_empty() {
                errors.push(format!(
                    "line {no}: {client} {}: a cell that is not `works` needs a why",
                    row.feature
                ));
            }
            let rows = table.clients.entry(client.clone()).or_default();
            if rows.iter().any(|r| r.feature == row.feature) {
                errors.push(format!("line {no}: {client} {} twice", row.feature));
            }
            rows.push(row);
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        Ok(table)
    }

    /// The expected status of a cell.
    pub fn cell(&self, client: &str, feature: &str, topology: &str) -> Option<&str> {
        let col = TOPOLOGIES.iter().position(|t| *t == topology)?;
        self.clients
            .get(client)?
            .iter()
            .find(|r| r.feature == feature)
            .map(|r| r.cells[col].as_str())
    }

    /// Client directories without a table section and sections without a directory.
    pub fn section_problems(&self, clients: &[ClientProgram]) -> Vec<String> {
        let mut v = Vec::new();
        for c in clients {
            if !self.clients.contains_key(&c.name) {
                v.push(format!(
                    "client directory tests/clients/{} has no section `## {}` in docs/compatibility.md",
                    c.name, c.name
                ));
            }
        }
        for name in self.clients.keys() {
            if !clients.iter().any(|c| &c.name == name) {
                v.push(format!(
                    "docs/compatibility.md has a section for {name}, but there is no tests/clients/{name}/run"
                ));
            }
        }
        v
    }
}

/// Every difference between the runs of one topology and the table: a crashed program, a
/// malformed line, a feature without a row or a row without a result, a status other than
/// its cell. Empty when all agree.
pub fn compare(table: &Table, topology: &str, runs: &[Run]) -> Vec<String> {
    let mut v = Vec::new();
    for run in runs {
        let c = &run.client;
        if run.crashed {
            v.push(format!("{c} ({topology}): the program {}", run.outcome));
        }
        for p in &run.problems {
            v.push(format!("{c} ({topology}): {p}"));
        }
        let Some(rows) = table.clients.get(c) else {
            continue; // reported by section_problems
        };
        for row in rows {
            let Some(cell) = table.cell(c, &row.feature, topology) else {
                continue;
            };
            match run.results.get(&row.feature) {
                None => v.push(format!(
                    "{c} {} {topology}: the table says {cell}, the program printed no RESULT line",
                    row.feature
                )),
                Some(o) if o.status != cell => v.push(format!(
                    "{c} {} {topology}: the table says {cell}, observed `{}`",
                    row.feature,
                    run.line(&row.feature)
                )),
                Some(_) => {}
            }
        }
        for f in run.results.keys() {
            if !rows.iter().any(|r| &r.feature == f) {
                v.push(format!(
                    "{c} {f} {topology}: no row in docs/compatibility.md for `{}`",
                    run.line(f)
                ));
            }
        }
    }
    v
}

/// Output of [`run_group`].
pub struct GroupOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
}

/// Runs `cmd` in its own process group (stdin /dev/null, output to files so no pipe fills
/// up); at the deadline the whole group gets SIGTERM and, 200 ms later, SIGKILL, so helpers a
/// client program started die with it.
pub fn run_group(cmd: &mut Command, timeout: Duration) -> Result<GroupOutput> {
    let dir = tempdir()?;
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let result = (|| -> Result<GroupOutput> {
        let out_f = File::create(&out_path).context("creating stdout capture file")?;
        let err_f = File::create(&err_path).context("creating stderr capture file")?;
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out_f)
            .stderr(err_f)
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
        let pgid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = child.try_wait().context("waiting for a client program")? {
                break st;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                // SAFETY: kill(2) on a process group this function created.
                unsafe { libc::kill(-pgid, libc::SIGTERM) };
                std::thread::sleep(Duration::from_millis(200));
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                break child
                    .wait()
                    .context("waiting for a killed client program")?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // Helpers that outlived the program (a background subscriber) go too.
        // SAFETY: as above; ESRCH when the group is empty is fine.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        Ok(GroupOutput {
            status,
            stdout: std::fs::read(&out_path).context("reading stdout capture")?,
            stderr: std::fs::read(&err_path).context("reading stderr capture")?,
            timed_out,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempdir() -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "dmt-client-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// An exclusive `flock` held until drop.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(f: &'a File) -> Result<Self> {
        // SAFETY: flock(2) on a descriptor `f` owns for the lifetime of the guard.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("flock on the build lock");
        }
        Ok(Self(f))
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Title\n\n## How\n\n| a | b |\n|---|---|\n| x | y |\n\n\
        ## php (phpredis 5.3.7)\n\n\
        | feature | standalone | sentinel | cluster | why |\n|---|---|---|---|---|\n\
        | auth | works | works | works | |\n\
        | select | works | works | refused | the proxy refuses SELECT in cluster mode |\n";

    #[test]
    fn parses_sections_and_cells() {
        let t = Table::parse(DOC).expect("the sample table parses");
        assert_eq!(t.clients.len(), 1);
        assert_eq!(t.cell("php", "select", "cluster"), Some("refused"));
        assert_eq!(t.cell("php", "auth", "sentinel"), Some("works"));
        assert_eq!(t.cell("php", "nope", "sentinel"), None);
    }

    #[test]
    fn reports_every_bad_cell() {
        let bad = DOC.replace(
            "| auth | works | works | works | |",
            "| auth | ok | works | FAILED | |",
        );
        let e = format!(
            "{:#}",
            Table::parse(&bad).expect_err("bad cells are errors")
        );
        assert!(e.contains("\"ok\"") && e.contains("\"FAILED\""), "{e}");
        assert!(e.contains("needs a why"), "{e}");
    }

    #[test]
    fn parses_results_and_compares() {
        let out =
            "log\nRESULT auth works fine\nRESULT select works x\nRESULT extra na -\nRESULT bad\n";
        let (r, p) = parse_results(out);
        assert_eq!(r["auth"].status, "works");
        assert_eq!(p.len(), 1, "{p:?}");
        let run = Run {
            client: "php".into(),
            outcome: "exit code 0".into(),
            crashed: false,
            stdout: out.into(),
            stderr: String::new(),
            results: r,
            problems: p,
            elapsed: Duration::ZERO,
        };
        let t = Table::parse(DOC).expect("the sample table parses");
        let m = compare(&t, "cluster", &[run]);
        assert_eq!(m.len(), 3, "{m:#?}");
        assert!(m
            .iter()
            .any(|x| x.contains("select cluster: the table says refused")));
        assert!(m
            .iter()
            .any(|x| x.contains("no row") && x.contains("extra")));
    }
}
