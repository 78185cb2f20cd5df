//! How keys leave the proxy (`/hotkeys`, `/bigkeys`, the CLIs, metrics): keys can be personal
//! data, so every feature that shows one goes through [`KeyDisplay`] (`hotkeys.key_display`,
//! `bigkeys.key_display`), in one format.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use serde::Serialize;

/// Bytes of a key shown with `truncated`.
pub const TRUNCATED_BYTES: usize = 64;

/// How keys are shown outside the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDisplay {
    /// As they are (bytes outside printable ASCII escaped, so no key can break a line).
    Raw,
    /// The first [`TRUNCATED_BYTES`] bytes, then `…(N bytes)`.
    #[default]
    Truncated,
    /// `h:` and 16 hex digits of a SipHash keyed per agent process: the same key shows the
    /// same while the agent runs; not reversible by hashing guesses elsewhere, not comparable
    /// across nodes or restarts.
    Hashed,
}

impl KeyDisplay {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Self::Raw),
            "truncated" => Some(Self::Truncated),
            "hashed" => Some(Self::Hashed),
            _ => None,
        }
    }

    /// A whole key as shown.
    pub fn show(self, key: &[u8]) -> String {
        show_key(key, key.len(), key_hash(key), self)
    }
}

/// The per-process SipHash key of hashed display (and of the hot-key sketch's key identity).
fn hasher() -> &'static std::collections::hash_map::RandomState {
    static H: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    H.get_or_init(Default::default)
}

/// The keyed hash of a whole key.
pub fn key_hash(key: &[u8]) -> u64 {
    hasher().hash_one(key)
}

/// `key` as `display` shows it (`len` is the key's full length, `key` may be a stored prefix
/// of it; `hash` is the whole key's [`key_hash`]).
pub fn show_key(key: &[u8], len: usize, hash: u64, display: KeyDisplay) -> String {
    let text = |b: &[u8]| b.escape_ascii().to_string();
    match display {
        KeyDisplay::Hashed => format!("h:{hash:016x}"),
        KeyDisplay::Raw if len <= key.len() => text(key),
        KeyDisplay::Raw => format!("{}…({len} bytes)", text(key)),
        KeyDisplay::Truncated if len <= TRUNCATED_BYTES => text(key),
        KeyDisplay::Truncated => {
            let cut = key.get(..TRUNCATED_BYTES).unwrap_or(key);
            format!("{}…({len} bytes)", text(cut))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let show = |k: &[u8], len, d| show_key(k, len, key_hash(k), d);
        let long = vec![b'a'; 100];
        assert_eq!(show(b"user:1", 6, KeyDisplay::Raw), "user:1");
        assert_eq!(KeyDisplay::Raw.show(b"a\nb"), "a\\nb");
        assert_eq!(show(b"user:1", 6, KeyDisplay::Truncated), "user:1");
        let t = KeyDisplay::Truncated.show(&long);
        assert!(
            t.starts_with(&"a".repeat(64)) && t.ends_with("…(100 bytes)"),
            "{t}"
        );
        assert_eq!(
            show(&long[..10], 100, KeyDisplay::Raw),
            "aaaaaaaaaa…(100 bytes)"
        );
        let h = KeyDisplay::Hashed.show(b"user:1");
        assert!(
            h.starts_with("h:") && h.len() == 18 && !h.contains("user"),
            "{h}"
        );
        assert_eq!(h, KeyDisplay::Hashed.show(b"user:1"));
        assert_ne!(h, KeyDisplay::Hashed.show(b"user:2"));
        assert_eq!(KeyDisplay::parse("hashed"), Some(KeyDisplay::Hashed));
        assert_eq!(KeyDisplay::parse("md5"), None);
    }
}
