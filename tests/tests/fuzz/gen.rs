//! The attackers' inputs: seeds of the checked-in corpus (`fuzz/corpus/commands/`), mutated
//! seeds, generated pipelines of ordinary commands (RESP or inline, some ending in a malformed
//! frame or cut mid-frame), and random bytes. Deterministic from a seed, so a failure printed
//! with its seed reproduces (`DATAMESH_FUZZ_SEED`).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

/// xorshift64*: small, deterministic, good enough to pick inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Where the seed corpus of the client command decoder lives.
pub fn corpus_dir() -> PathBuf {
    datamesh_tests::project_root()
        .join("fuzz")
        .join("corpus")
        .join("commands")
}

/// The seed corpus, by file name.
pub fn load_corpus() -> Result<Vec<(String, Vec<u8>)>> {
    let dir = corpus_dir();
    let mut seeds = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            seeds.push((name, std::fs::read(e.path())?));
        }
    }
    seeds.sort();
    ensure!(!seeds.is_empty(), "the corpus {} is empty", dir.display());
    Ok(seeds)
}

/// How an input was made (for the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Seed,
    Mutated,
    Pipeline,
    Random,
}

pub struct Input {
    pub origin: Origin,
    /// The seed it came from, if any.
    pub from: Option<String>,
    pub bytes: Vec<u8>,
}

/// Numbers a mutation puts in place of a header's number.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "-0",
    "01",
    "+1",
    "2",
    "17",
    "1024",
    "65536",
    "2147483647",
    "2147483648",
    "4294967296",
    "536870912",
    "999999999999",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "",
];

/// Fragments a mutation or a pipeline's tail inserts.
const FRAGMENTS: &[&[u8]] = &[
    b"\r\n",
    b"\r",
    b"\n",
    b"*",
    b"$",
    b"*1\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b":5\r\n",
    b"+OK\r\n",
    b"*1\r\n$x\r\n",
    b"*2\r\n$3\r\nGET\r\n",
    b"$999999999999\r\n",
    b"\"",
    b"'",
    b"\\x4",
    b"\x00",
    b"\xff",
    b" ",
];

use crate::lists::DENIED;

/// True when a command may be sent (its name and, for CLIENT, its subcommand).
pub fn allowed(args: &[bytes::Bytes]) -> bool {
    let name =
        String::from_utf8_lossy(args.first().map(|a| &a[..]).unwrap_or(b"")).to_ascii_uppercase();
    if DENIED.contains(&name.as_str()) {
        return false;
    }
    if name == "CLIENT" {
        let sub = String::from_utf8_lossy(args.get(1).map(|a| &a[..]).unwrap_or(b""))
            .to_ascii_uppercase();
        return matches!(
            sub.as_str(),
            "REPLY" | "SETNAME" | "GETNAME" | "ID" | "INFO"
        );
    }
    true
}

fn mutate(rng: &mut Rng, corpus: &[(String, Vec<u8>)], v: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let b = rng.bytes(n);
                v.splice(i..i, b);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let part = v[i..i + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, part);
            }
            5 => {
                // Splice in part of another seed.
                let (_, other) = rng.pick(corpus);
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let n = 1 + rng.below(other.len() - i);
                    let at = rng.below(len + 1);
                    v.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            6 => {
                // Replace a header's number.
                let starts: Vec<usize> = (0..len)
                    .filter(|i| matches!(v[*i], b'*' | b'$'))
                    .map(|i| i + 1)
                    .collect();
                if !starts.is_empty() {
                    let s = *rng.pick(&starts);
                    let mut e = s;
                    while e < len && (v[e].is_ascii_digit() || v[e] == b'-') {
                        e += 1;
                    }
                    v.splice(s..e, rng.pick(NUMBERS).bytes());
                }
            }
            7 => {
                let at = rng.below(len + 1);
                let f = *rng.pick(FRAGMENTS);
                v.splice(at..at, f.iter().copied());
            }
            _ if len > 0 => v.truncate(rng.below(len)),
            _ => {}
        }
    }
}

fn key(rng: &mut Rng, kind: &str) -> String {
    format!("fz:{kind}:{}", rng.below(16))
}

fn value(rng: &mut Rng, printable: bool) -> Vec<u8> {
    let n = if rng.chance(5) {
        rng.below(3000)
    } else {
        rng.below(40)
    };
    if printable {
        (0..n)
            .map(|_| b"abcdefghijklmnopqrstuvwxyz0123456789:-_."[rng.below(40)])
            .collect()
    } else {
        rng.bytes(n)
    }
}

/// One ordinary command with random arguments.
fn command(rng: &mut Rng, printable: bool) -> Vec<Vec<u8>> {
    let s = |x: &str| x.as_bytes().to_vec();
    let c = rng.below(24);
    match c {
        0 => vec![s("SET"), s(&key(rng, "s")), value(rng, printable)],
        1 => vec![s("GET"), s(&key(rng, "s"))],
        2 => vec![s("DEL"), s(&key(rng, "s")), s(&key(rng, "l"))],
        3 => vec![s("INCR"), s(&key(rng, "n"))],
        4 => vec![s("APPEND"), s(&key(rng, "s")), value(rng, printable)],
        5 => vec![
            s("MGET"),
            s(&key(rng, "s")),
            s(&key(rng, "s")),
            s(&key(rng, "n")),
        ],
        6 => vec![s("LPUSH"), s(&key(rng, "l")), value(rng, printable)],
        7 => vec![s("LRANGE"), s(&key(rng, "l")), s("0"), s("-1")],
        8 => vec![s("HSET"), s(&key(rng, "h")), s("f"), value(rng, printable)],
        9 => vec![s("HGETALL"), s(&key(rng, "h"))],
        10 => vec![s("SADD"), s(&key(rng, "t")), value(rng, printable)],
        11 => vec![s("SMEMBERS"), s(&key(rng, "t"))],
        12 => vec![
            s("ZADD"),
            s(&key(rng, "z")),
            s("1.5"),
            value(rng, printable),
        ],
        13 => vec![
            s("ZRANGE"),
            s(&key(rng, "z")),
            s("0"),
            s("-1"),
            s("WITHSCORES"),
        ],
        14 => vec![s("EXPIRE"), s(&key(rng, "s")), s("60")],
        15 => vec![s("TTL"), s(&key(rng, "s"))],
        16 => vec![s("TYPE"), s(&key(rng, "h"))],
        17 => vec![s("ECHO"), value(rng, printable)],
        18 => vec![s("PING")],
        19 => vec![s("SELECT"), s(&rng.below(3).to_string())],
        20 => vec![s("EXISTS"), s(&key(rng, "s"))],
        21 => vec![s("PUBLISH"), s("fz:ch"), value(rng, printable)],
        // An unknown command and a wrong arity: error replies, the connection goes on.
        22 => vec![s("FZNOSUCHCOMMAND"), s("x")],
        _ => vec![s("GET")],
    }
}

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
    datamesh_tests::resp::encode(&refs)
}

/// A pipeline of ordinary commands, RESP or inline, sometimes with a malformed tail or cut.
fn pipeline(rng: &mut Rng) -> Vec<u8> {
    let inline = rng.chance(25);
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(12) {
        let c = command(rng, inline);
        if inline {
            let line: Vec<String> = c
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .map(|a| if a.is_empty() { "\"\"".into() } else { a })
                .collect();
            out.extend_from_slice(line.join(" ").as_bytes());
            out.extend_from_slice(if rng.chance(50) { b"\r\n" } else { b"\n" });
        } else {
            out.extend_from_slice(&encode(&c));
        }
    }
    if rng.chance(30) {
        let f = *rng.pick(FRAGMENTS);
        out.extend_from_slice(f);
        if rng.chance(50) {
            out.extend_from_slice(&encode(&command(rng, false)));
        }
    } else if rng.chance(15) && !out.is_empty() {
        let cut = rng.below(out.len());
        out.truncate(cut);
    }
    out
}

/// Random bytes, half of them from the RESP alphabet.
fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    let n = 1 + rng.below(512);
    (0..n)
        .map(|_| {
            if rng.chance(50) {
                *rng.pick(b"*$:+-\r\n0123456789 \"'\\x")
            } else {
                rng.next_u64() as u8
            }
        })
        .collect()
}

pub fn generate(rng: &mut Rng, corpus: &[(String, Vec<u8>)]) -> Input {
    match rng.below(10) {
        0 => {
            let (name, v) = rng.pick(corpus);
            Input {
                origin: Origin::Seed,
                from: Some(name.clone()),
                bytes: v.clone(),
            }
        }
        1..=4 => {
            let (name, v) = rng.pick(corpus);
            let mut v = v.clone();
            mutate(rng, corpus, &mut v);
            Input {
                origin: Origin::Mutated,
                from: Some(name.clone()),
                bytes: v,
            }
        }
        5..=8 => Input {
            origin: Origin::Pipeline,
            from: None,
            bytes: pipeline(rng),
        },
        _ => Input {
            origin: Origin::Random,
            from: None,
            bytes: random_bytes(rng),
        },
    }
}

/// The input as a Rust byte-string literal (to paste into a test or write to the corpus).
pub fn literal(bytes: &[u8]) -> String {
    let mut s = String::from("b\"");
    for b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(*b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s.push('"');
    s
}
