//! A small blocking RESP2 encoder and reader, for checks the tests make against Redis directly
//! (CLIENT LIST, seeding keys) and for the `dmprobe` binary. Not a general client: it reads one
//! reply at a time from any `Read` and keeps no state between replies.

use std::io::{self, BufRead};

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The payload of a bulk or simple string, if that is what this is.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Bulk(Some(b)) => Some(b),
            Reply::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line<R: BufRead>(r: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad(format!(
            "reply line without CRLF: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| bad("reply line is not UTF-8"))
}

/// Reads exactly one reply.
pub fn read_reply<R: BufRead>(r: &mut R) -> io::Result<Reply> {
    let line = read_line(r)?;
    let (tag, rest) = line.split_at(line.len().min(1));
    let int = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| bad(format!("bad integer {s:?}")))
    };
    Ok(match tag {
        "+" => Reply::Simple(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(int(rest)?),
        "$" => {
            let n = int(rest)?;
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let n = usize::try_from(n).map_err(|_| bad("bulk length"))?;
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf)?;
                if &buf[n..] != b"\r\n" {
                    return Err(bad("bulk string not followed by CRLF"));
                }
                buf.truncate(n);
                Reply::Bulk(Some(buf))
            }
        }
        "*" => {
            let n = int(rest)?;
            if n < 0 {
                Reply::Array(None)
            } else {
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(read_reply(r)?);
                }
                Reply::Array(Some(items))
            }
        }
        _ => return Err(bad(format!("unknown reply type in {line:?}"))),
    })
}

/// Parses `CLIENT LIST` / `CLIENT INFO` text into one map per client line.
pub fn parse_client_list(text: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    text.lines()
        .filter(|l| l.contains("addr="))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Parses `INFO` text (`key:value` lines, `#` section headers) into key → value.
pub fn parse_info(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_replies() {
        let mut input: &[u8] = b"+OK\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:5\r\n-ERR x\r\n";
        assert_eq!(
            read_reply(&mut input).expect("reply"),
            Reply::Simple("OK".into())
        );
        assert_eq!(
            read_reply(&mut input).expect("reply"),
            Reply::Bulk(Some(b"abc".to_vec()))
        );
        assert_eq!(read_reply(&mut input).expect("reply"), Reply::Bulk(None));
        assert_eq!(
            read_reply(&mut input).expect("reply"),
            Reply::Array(Some(vec![Reply::Int(5), Reply::Error("ERR x".into())]))
        );
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }

    #[test]
    fn client_list_lines() {
        let l = parse_client_list(
            "id=3 addr=198.18.3.10:4000 laddr=198.19.3.1:6379 name=x cmd=client|list\n",
        );
        assert_eq!(l[0]["addr"], "198.18.3.10:4000");
        assert_eq!(l[0]["name"], "x");
    }
}
