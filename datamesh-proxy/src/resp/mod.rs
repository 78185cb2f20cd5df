//! The RESP codec, sans-IO, and the one value type of the crate.
//!
//! - [`decode`]: framing of client commands (RESP arrays of bulk strings, or inline commands)
//!   and of backend replies (every RESP2 and RESP3 type), with configured [`Limits`] checked on
//!   each header as soon as it is seen (a `$999999999999` header fails before a single byte of
//!   its body is buffered). Incomplete input is `Ok(None)` ("read more"), never an error; the
//!   decoders keep their scan position between calls, so a large frame arriving in many reads
//!   is scanned once.
//! - [`value`]: [`Command`] and [`Reply`] (the bytes a peer sent, forwarded as they are, never
//!   re-encoded) and [`Value`], the parsed or built form for the few places that look inside a
//!   frame or make one (local answers, merges, the topology control plane).
//!
//! The data path and the control plane (Sentinel queries, `CLUSTER SHARDS`) use the same
//! decoders: a control reply is framed by [`ReplyDecoder`] with [`Limits::control`] before it
//! is parsed into a [`Value`].

mod decode;
#[cfg(test)]
mod fuzz_regressions;
mod value;

pub use decode::{
    array_elements, decode_command, decode_reply, split_args, CommandDecoder, ReplyDecoder,
};
pub use value::{encode_command, put_bulk, put_header, Command, Reply, ReplyKind, Value};

/// Decoding limits (Redis's defaults where Redis has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Longest bulk string (Redis `proto-max-bulk-len`, 512 MiB).
    pub max_bulk_len: u64,
    /// Most elements in one array.
    pub max_array_len: u64,
    /// Deepest nesting of aggregates (replies; commands are flat).
    pub max_depth: usize,
    /// Longest inline command, and longest header line (Redis: 64 KiB).
    pub max_inline_len: usize,
}

pub const DEFAULT_MAX_BULK_LEN: u64 = 512 * 1024 * 1024;
pub const DEFAULT_MAX_ARRAY_LEN: u64 = 1_048_576;
pub const DEFAULT_MAX_DEPTH: usize = 32;
pub const DEFAULT_MAX_INLINE_LEN: usize = 64 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bulk_len: DEFAULT_MAX_BULK_LEN,
            max_array_len: DEFAULT_MAX_ARRAY_LEN,
            max_depth: DEFAULT_MAX_DEPTH,
            max_inline_len: DEFAULT_MAX_INLINE_LEN,
        }
    }
}

impl Limits {
    /// Limits for replies of our own backends: trusted, and a legitimate reply can be far
    /// larger than any command (LRANGE of millions of elements), so only framing sanity stays.
    pub fn backend() -> Self {
        Self {
            max_bulk_len: i64::MAX as u64,
            max_array_len: i64::MAX as u64,
            max_depth: 128,
            max_inline_len: 64 * 1024 * 1024,
        }
    }

    /// Limits for control-plane replies (Sentinel, `CLUSTER SHARDS`/`SLOTS`): far larger than
    /// any sane answer, small enough that a confused peer cannot make the agent buffer much.
    pub fn control() -> Self {
        Self {
            max_bulk_len: 64 * 1024 * 1024,
            max_array_len: 1 << 20,
            max_depth: 16,
            max_inline_len: 64 * 1024,
        }
    }

    /// What Redis allows a client that has not authenticated yet (it refuses larger headers
    /// so an unauthenticated peer cannot make the server buffer much).
    pub fn unauthenticated(self) -> Self {
        Self {
            max_bulk_len: self.max_bulk_len.min(16 * 1024),
            max_array_len: self.max_array_len.min(10),
            ..self
        }
    }
}

/// Why the input is not RESP. Messages follow Redis's wording where Redis has one (they are
/// sent to the client as `-ERR Protocol error: <message>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("invalid multibulk length {len} (limit {max})")]
    MultibulkTooLong { len: i64, max: u64 },
    #[error("invalid bulk length")]
    InvalidBulkLength,
    #[error("invalid bulk length {len} (limit {max})")]
    BulkTooLong { len: i64, max: u64 },
    #[error("expected '$', got '{got}'")]
    ExpectedBulk { got: char },
    #[error("too big mbulk count string")]
    HeaderTooLong,
    #[error("too big inline request")]
    InlineTooLong,
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("expected CRLF after bulk data")]
    MissingCrlf,
    #[error("nesting deeper than {max}")]
    TooDeep { max: usize },
    #[error("invalid reply type byte 0x{byte:02x}")]
    InvalidType { byte: u8 },
    #[error("invalid integer in a header")]
    InvalidInteger,
    #[error("unauthenticated multibulk length")]
    UnauthenticatedMultibulk,
    #[error("unauthenticated bulk length")]
    UnauthenticatedBulk,
}
