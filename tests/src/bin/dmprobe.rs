//! `dmprobe`: the harness's own client, run inside a pod (its netns and cgroup) by the tests.
//!
//! Each subcommand drives one stress case of the correctness battery against a Redis address
//! (the service address, so the connection is captured) and checks every reply byte for byte.
//! It prints one JSON line with what it measured and exits non-zero with a message on any
//! mismatch. std + libc only, so it starts fast and behaves the same everywhere.
//!
//! ```text
//! dmprobe burst        --addr A --n 1000
//! dmprobe bigvalue     --addr A --size 1048576
//! dmprobe slowreader   --addr A --size 16777216
//! dmprobe reset        --addr A [--rounds 5]
//! dmprobe concurrent   --addr A --conns 1000
//! dmprobe connect-loop --addr A --until-ok --timeout-ms 3000
//! dmprobe connect-loop --addr A --count 20
//! dmprobe connect-loop --addr A --duration-ms 3000
//! dmprobe timeline     --addr A --duration-ms 30000 [--stop-file F] [--pause-ms 2]
//! ```

use std::collections::BTreeMap;
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use datamesh_tests::resp::{encode, read_reply, Reply};

type Res<T> = Result<T, String>;

const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dmprobe: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Opts {
    flags: BTreeMap<String, String>,
}

impl Opts {
    fn parse(args: &[String]) -> Res<Self> {
        let mut flags = BTreeMap::new();
        let mut i = 0;
        while i < args.len() {
            let k = args[i]
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {:?}", args[i]))?;
            match args.get(i + 1).filter(|v| !v.starts_with("--")) {
                Some(v) => {
                    flags.insert(k.to_string(), v.clone());
                    i += 2;
                }
                None => {
                    flags.insert(k.to_string(), String::new());
                    i += 1;
                }
            }
        }
        Ok(Self { flags })
    }
    fn addr(&self) -> Res<SocketAddr> {
        self.flags
            .get("addr")
            .ok_or("--addr is required")?
            .parse()
            .map_err(|e| format!("--addr: {e}"))
    }
    fn num(&self, k: &str, default: Option<u64>) -> Res<u64> {
        match self.flags.get(k) {
            Some(v) => v.parse().map_err(|e| format!("--{k}: {e}")),
            None => default.ok_or_else(|| format!("--{k} is required")),
        }
    }
    fn has(&self, k: &str) -> bool {
        self.flags.contains_key(k)
    }
}

fn run(args: &[String]) -> Res<String> {
    let (sub, rest) = args.split_first().ok_or(
        "usage: dmprobe <burst|bigvalue|slowreader|reset|concurrent|connect-loop|timeline> --addr A ...",
    )?;
    let o = Opts::parse(rest)?;
    match sub.as_str() {
        "burst" => burst(o.addr()?, o.num("n", Some(1000))?),
        "bigvalue" => bigvalue(o.addr()?, o.num("size", None)?),
        "slowreader" => slowreader(o.addr()?, o.num("size", None)?),
        "reset" => reset(o.addr()?, o.num("rounds", Some(5))?),
        "concurrent" => concurrent(o.addr()?, o.num("conns", Some(1000))?),
        "connect-loop" => {
            if o.has("until-ok") {
                connect_until_ok(o.addr()?, o.num("timeout-ms", Some(3000))?)
            } else if o.has("duration-ms") {
                connect_for(o.addr()?, o.num("duration-ms", None)?)
            } else {
                connect_count(o.addr()?, o.num("count", None)?)
            }
        }
        "timeline" => timeline(
            o.addr()?,
            o.num("duration-ms", None)?,
            o.flags.get("stop-file").map(std::path::PathBuf::from),
            o.num("pause-ms", Some(2))?,
        ),
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

/// A key prefix unique to this process, so concurrent probes never share keys.
fn uniq() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("dmprobe:{}:{}", std::process::id(), t)
}

fn connect(addr: SocketAddr) -> Res<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Reads exactly `expected.len()` bytes and compares; names the first differing offset.
fn expect_bytes(s: &mut impl Read, expected: &[u8], what: &str) -> Res<()> {
    let mut got = vec![0u8; expected.len()];
    let mut off = 0;
    while off < got.len() {
        match s.read(&mut got[off..]) {
            Ok(0) => {
                return Err(format!(
                    "{what}: connection closed after {off} of {} expected bytes",
                    expected.len()
                ))
            }
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "{what}: read failed after {off} of {} bytes: {e}",
                    expected.len()
                ))
            }
        }
    }
    compare(&got, expected, what)
}

fn compare(got: &[u8], expected: &[u8], what: &str) -> Res<()> {
    if got == expected {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    let lo = at.saturating_sub(16);
    let show = |b: &[u8]| {
        String::from_utf8_lossy(&b[lo.min(b.len())..(at + 32).min(b.len())]).into_owned()
    };
    Err(format!(
        "{what}: reply differs at byte {at} of {} (got {} bytes): expected {:?}, got {:?}",
        expected.len(),
        got.len(),
        show(expected),
        show(got)
    ))
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

/// Deterministic bytes covering all 256 values (CR and LF included: the value must be opaque).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// N pipelined commands (SET, GET of it, alternating) in one write right after connect.
fn burst(addr: SocketAddr, n: u64) -> Res<String> {
    let key = uniq();
    let mut req = Vec::new();
    let mut want = Vec::new();
    for i in 0..n {
        let k = format!("{key}:{}", i / 2);
        let v = format!("value-{i}-{}", "x".repeat((i % 37) as usize));
        if i % 2 == 0 {
            req.extend_from_slice(&encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
            want.extend_from_slice(b"+OK\r\n");
        } else {
            let set_v = format!("value-{}-{}", i - 1, "x".repeat(((i - 1) % 37) as usize));
            req.extend_from_slice(&encode(&[b"GET", k.as_bytes()]));
            want.extend_from_slice(&bulk(set_v.as_bytes()));
        }
    }
    let t0 = Instant::now();
    let mut s = connect(addr)?;
    s.write_all(&req)
        .map_err(|e| format!("writing the burst: {e}"))?;
    expect_bytes(&mut s, &want, "burst replies")?;
    // Nothing extra may follow: the next reply must be exactly the PONG.
    s.write_all(&encode(&[b"PING"]))
        .map_err(|e| e.to_string())?;
    expect_bytes(&mut s, b"+PONG\r\n", "PING after burst")?;
    Ok(format!(
        "{{\"case\":\"burst\",\"commands\":{n},\"request_bytes\":{},\"reply_bytes\":{},\"ms\":{}}}",
        req.len(),
        want.len(),
        t0.elapsed().as_millis()
    ))
}

fn set_value(s: &mut TcpStream, key: &str, value: &[u8]) -> Res<()> {
    s.write_all(&encode(&[b"SET", key.as_bytes(), value]))
        .map_err(|e| format!("writing SET: {e}"))?;
    expect_bytes(s, b"+OK\r\n", "SET reply")
}

/// SET then GET of a value of `size` bytes, compared byte for byte.
fn bigvalue(addr: SocketAddr, size: u64) -> Res<String> {
    let key = uniq();
    let value = pattern(size as usize, size);
    let t0 = Instant::now();
    let mut s = connect(addr)?;
    set_value(&mut s, &key, &value)?;
    s.write_all(&encode(&[b"GET", key.as_bytes()]))
        .map_err(|e| e.to_string())?;
    expect_bytes(&mut s, &bulk(&value), "GET of the big value")?;
    s.write_all(&encode(&[b"DEL", key.as_bytes()]))
        .map_err(|e| e.to_string())?;
    expect_bytes(&mut s, b":1\r\n", "DEL reply")?;
    Ok(format!(
        "{{\"case\":\"bigvalue\",\"size\":{size},\"ms\":{}}}",
        t0.elapsed().as_millis()
    ))
}

/// GET of a big value read 64 KiB at a time with 5 ms pauses (the receiver's queue fills up).
fn slowreader(addr: SocketAddr, size: u64) -> Res<String> {
    let key = uniq();
    let value = pattern(size as usize, size ^ 0x5a5a);
    let mut s = connect(addr)?;
    set_value(&mut s, &key, &value)?;
    let want = bulk(&value);
    let t0 = Instant::now();
    s.write_all(&encode(&[b"GET", key.as_bytes()]))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::with_capacity(want.len());
    let mut chunk = vec![0u8; 64 * 1024];
    let mut reads = 0u64;
    while got.len() < want.len() {
        let room = (want.len() - got.len()).min(chunk.len());
        match s.read(&mut chunk[..room]) {
            Ok(0) => {
                return Err(format!(
                    "slow reader: connection closed after {} of {} bytes",
                    got.len(),
                    want.len()
                ))
            }
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "slow reader: read failed after {} of {} bytes: {e}",
                    got.len(),
                    want.len()
                ))
            }
        }
        reads += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    compare(&got, &want, "slow reader GET")?;
    s.write_all(&encode(&[b"PING"]))
        .map_err(|e| e.to_string())?;
    expect_bytes(&mut s, b"+PONG\r\n", "PING after slow read")?;
    s.write_all(&encode(&[b"DEL", key.as_bytes()]))
        .map_err(|e| e.to_string())?;
    expect_bytes(&mut s, b":1\r\n", "DEL reply")?;
    Ok(format!(
        "{{\"case\":\"slowreader\",\"size\":{size},\"reads\":{reads},\"ms\":{}}}",
        t0.elapsed().as_millis()
    ))
}

/// Sets SO_LINGER {on, 0} so close() sends a RST instead of a FIN.
fn linger_zero(s: &TcpStream) -> Res<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket fd we own, with a pointer to a live, correctly sized value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(format!("SO_LINGER: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A connection reset mid-pipeline (replies still streaming), then a fresh connection must work.
fn reset(addr: SocketAddr, rounds: u64) -> Res<String> {
    let key = uniq();
    let value = pattern(16 * 1024, 7);
    {
        let mut s = connect(addr)?;
        set_value(&mut s, &key, &value)?;
    }
    let mut read_before_reset = 0usize;
    for round in 0..rounds {
        let mut s = connect(addr)?;
        // 2000 GETs of 16 KiB: about 32 MiB of replies are in flight when the reset comes.
        let mut req = Vec::new();
        for i in 0..2000 {
            if i % 10 == 0 {
                req.extend_from_slice(&encode(&[
                    b"SET",
                    format!("{key}:r{round}:{i}").as_bytes(),
                    b"v",
                ]));
            }
            req.extend_from_slice(&encode(&[b"GET", key.as_bytes()]));
        }
        s.write_all(&req)
            .map_err(|e| format!("round {round}: writing the pipeline: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("round {round}: first read: {e}"))?;
        if n == 0 {
            return Err(format!("round {round}: connection closed before any reply"));
        }
        read_before_reset += n;
        linger_zero(&s)?;
        drop(s);
        // A new connection right after the reset must be fully correct.
        let mut s = connect(addr)?;
        s.write_all(&encode(&[b"PING"]))
            .map_err(|e| e.to_string())?;
        expect_bytes(
            &mut s,
            b"+PONG\r\n",
            &format!("round {round}: PING after reset"),
        )?;
        s.write_all(&encode(&[b"GET", key.as_bytes()]))
            .map_err(|e| e.to_string())?;
        expect_bytes(
            &mut s,
            &bulk(&value),
            &format!("round {round}: GET after reset"),
        )?;
    }
    Ok(format!("{{\"case\":\"reset\",\"rounds\":{rounds},\"bytes_read_before_reset\":{read_before_reset}}}"))
}

fn raise_nofile(want: u64) -> Res<()> {
    let lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit with a pointer to a live rlimit value.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(format!(
            "raising RLIMIT_NOFILE to {want}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `conns` connections open at once, each PING + SET + GET of its own key, all byte-exact.
fn concurrent(addr: SocketAddr, conns: u64) -> Res<String> {
    raise_nofile(conns + 256)?;
    let key = uniq();
    let t0 = Instant::now();
    let mut socks = Vec::with_capacity(conns as usize);
    for i in 0..conns {
        socks.push((
            i,
            connect(addr).map_err(|e| format!("connection {i}: {e}"))?,
        ));
    }
    let connect_ms = t0.elapsed().as_millis();
    // Every connection is open now; drive them from a few threads at once.
    let threads = 8usize;
    let mut groups: Vec<Vec<(u64, TcpStream)>> = (0..threads).map(|_| Vec::new()).collect();
    for (j, s) in socks.into_iter().enumerate() {
        groups[j % threads].push(s);
    }
    let handles: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let key = key.clone();
            std::thread::spawn(move || -> Res<()> {
                let mut group = group;
                for (i, s) in group.iter_mut() {
                    let k = format!("{key}:{i}");
                    let v = format!("v{i}-{}", "c".repeat((*i % 50) as usize));
                    let mut req = encode(&[b"PING"]);
                    req.extend_from_slice(&encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
                    req.extend_from_slice(&encode(&[b"GET", k.as_bytes()]));
                    s.write_all(&req)
                        .map_err(|e| format!("connection {i}: write: {e}"))?;
                }
                for (i, s) in group.iter_mut() {
                    let v = format!("v{i}-{}", "c".repeat((*i % 50) as usize));
                    let mut want = b"+PONG\r\n+OK\r\n".to_vec();
                    want.extend_from_slice(&bulk(v.as_bytes()));
                    expect_bytes(s, &want, &format!("connection {i}"))?;
                }
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a worker thread panicked".into()),
        }
    }
    if !errors.is_empty() {
        return Err(format!(
            "{} of {threads} workers failed; first: {}",
            errors.len(),
            errors[0]
        ));
    }
    Ok(format!(
        "{{\"case\":\"concurrent\",\"conns\":{conns},\"connect_ms\":{connect_ms},\"ms\":{}}}",
        t0.elapsed().as_millis()
    ))
}

/// One connect + PING with short timeouts; Err carries the error kind name.
fn ping_once(addr: SocketAddr) -> Result<(), (String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| (kind_name(&e), format!("connect: {e}")))?;
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .map_err(|e| (kind_name(&e), e.to_string()))?;
    s.write_all(&encode(&[b"PING"]))
        .map_err(|e| (kind_name(&e), format!("write: {e}")))?;
    let mut r = BufReader::new(s);
    match read_reply(&mut r) {
        Ok(Reply::Simple(p)) if p == "PONG" => Ok(()),
        Ok(other) => Err(("bad_reply".into(), format!("{other:?}"))),
        Err(e) => Err((kind_name(&e), format!("read: {e}"))),
    }
}

fn kind_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(code) => format!("errno{code}"),
        None => format!("{:?}", e.kind()),
    }
}

fn errors_json(errors: &BTreeMap<String, u64>) -> String {
    let items: Vec<String> = errors.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", items.join(","))
}

/// Connect + PING repeatedly until one succeeds; reports the time to the first success.
fn connect_until_ok(addr: SocketAddr, timeout_ms: u64) -> Res<String> {
    let t0 = Instant::now();
    let mut errors = BTreeMap::new();
    let mut attempts = 0u64;
    let mut last = String::new();
    while t0.elapsed() < Duration::from_millis(timeout_ms) {
        attempts += 1;
        match ping_once(addr) {
            Ok(()) => {
                return Ok(format!(
                    "{{\"case\":\"connect-loop\",\"first_ok_ms\":{},\"attempts\":{attempts},\"errors\":{}}}",
                    t0.elapsed().as_millis(),
                    errors_json(&errors)
                ))
            }
            Err((kind, msg)) => {
                *errors.entry(kind).or_insert(0) += 1;
                last = msg;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!(
        "no successful connect+PING to {addr} within {timeout_ms} ms ({attempts} attempts, errors {}, last: {last})",
        errors_json(&errors)
    ))
}

/// connect + PING back to back for `duration_ms`; reports successes, errors by kind and the
/// slowest attempt (a connect waiting in a listen backlog shows there).
fn connect_for(addr: SocketAddr, duration_ms: u64) -> Res<String> {
    let t0 = Instant::now();
    let mut errors = BTreeMap::new();
    let (mut ok, mut count) = (0u64, 0u64);
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_millis(duration_ms) {
        let t = Instant::now();
        count += 1;
        match ping_once(addr) {
            Ok(()) => ok += 1,
            Err((kind, _)) => *errors.entry(kind).or_insert(0) += 1,
        }
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    let refused = errors.get("ECONNREFUSED").copied().unwrap_or(0);
    Ok(format!(
        "{{\"case\":\"connect-loop\",\"count\":{count},\"ok\":{ok},\"refused\":{refused},\"errors\":{},\"slowest_ms\":{},\"ms\":{}}}",
        errors_json(&errors),
        slowest.as_millis(),
        t0.elapsed().as_millis()
    ))
}

/// `count` connect + PING attempts back to back; reports successes and errors by kind.
fn connect_count(addr: SocketAddr, count: u64) -> Res<String> {
    let t0 = Instant::now();
    let mut errors = BTreeMap::new();
    let mut ok = 0u64;
    for _ in 0..count {
        match ping_once(addr) {
            Ok(()) => ok += 1,
            Err((kind, _)) => *errors.entry(kind).or_insert(0) += 1,
        }
    }
    let refused = errors.get("ECONNREFUSED").copied().unwrap_or(0);
    Ok(format!(
        "{{\"case\":\"connect-loop\",\"count\":{count},\"ok\":{ok},\"refused\":{refused},\"errors\":{},\"ms\":{}}}",
        errors_json(&errors),
        t0.elapsed().as_millis()
    ))
}

/// CLOCK_MONOTONIC in microseconds: the clock the tests read too (`drill::mono_now`), shared
/// across network namespaces, so attempt times compare with the time of a fault.
fn mono_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// One connect + PING + close (a PHP-style short-lived connection), classified:
/// `proxy` / `direct` (PONG; where the socket was connected: the proxy when capture rewrote
/// the connect, the address asked for when it did not), `connect:<errno>` (the connect
/// failed: ECONNREFUSED is a refused connect), `io-proxy:<kind>` / `io-direct:<kind>` (the
/// connection was established, then failed before the PONG: reset, EOF, timeout).
fn ping_classified(addr: SocketAddr) -> String {
    let s = match TcpStream::connect_timeout(&addr, Duration::from_millis(2000)) {
        Ok(s) => s,
        Err(e) => return format!("connect:{}", kind_name(&e)),
    };
    let side = match s.peer_addr() {
        Ok(p) if p == addr => "direct",
        Ok(_) => "proxy",
        Err(_) => "unknown",
    };
    let io = |s: &TcpStream| -> Result<(), String> {
        s.set_read_timeout(Some(Duration::from_millis(2000)))
            .map_err(|e| kind_name(&e))?;
        let mut w = s;
        w.write_all(&encode(&[b"PING"]))
            .map_err(|e| kind_name(&e))?;
        let mut r = BufReader::new(s);
        match read_reply(&mut r) {
            Ok(Reply::Simple(p)) if p == "PONG" => Ok(()),
            Ok(_) => Err("bad_reply".into()),
            Err(e) => Err(kind_name(&e)),
        }
    };
    match io(&s) {
        Ok(()) => side.to_string(),
        Err(kind) => format!("io-{side}:{kind}"),
    }
}

/// Short-lived connections back to back until `duration_ms` passed or `stop_file` exists;
/// prints every attempt as `[start_us, end_us, outcome]` (CLOCK_MONOTONIC, see
/// [`ping_classified`] for the outcomes) and the totals per outcome.
fn timeline(
    addr: SocketAddr,
    duration_ms: u64,
    stop_file: Option<std::path::PathBuf>,
    pause_ms: u64,
) -> Res<String> {
    let t0 = Instant::now();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut attempts = Vec::new();
    while t0.elapsed() < Duration::from_millis(duration_ms) {
        if stop_file.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        let start = mono_us();
        let outcome = ping_classified(addr);
        let end = mono_us();
        *totals.entry(outcome.clone()).or_insert(0) += 1;
        attempts.push(format!("[{start},{end},\"{outcome}\"]"));
        std::thread::sleep(Duration::from_millis(pause_ms));
    }
    Ok(format!(
        "{{\"case\":\"timeline\",\"totals\":{},\"attempts\":[{}]}}",
        errors_json(&totals),
        attempts.join(",")
    ))
}
