//! A client's unwritten output. Small replies are copied into one contiguous tail, so many of
//! them leave in one write; large ones are kept as the backend reader produced them (no copy,
//! no doubling of a growing buffer) and written with the tail in one `writev`. What is held
//! here is exactly what the client's counts say ([`crate::budget`]): unwritten bytes are its
//! output; a large reply's written part stays held (its allocation is freed only once the
//! whole reply is written) until then.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;

/// Replies up to this size are copied into the tail.
const COPY_MAX: usize = 16 * 1024;
/// Slices handed to one `writev`.
const MAX_SLICES: usize = 32;

#[derive(Default)]
pub(crate) struct OutBuf {
    /// Large replies and sealed tails, in order; all of them before `tail`; each with its
    /// length when it was pushed (what its allocation holds until it is written in full).
    chunks: VecDeque<(Bytes, usize)>,
    tail: BytesMut,
    len: usize,
}

impl OutBuf {
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends a copy of `b`.
    pub(crate) fn extend_from_slice(&mut self, b: &[u8]) {
        self.tail.extend_from_slice(b);
        self.len += b.len();
    }

    /// Appends `b`, without a copy when it is large.
    pub(crate) fn push(&mut self, b: &Bytes) {
        if b.len() <= COPY_MAX {
            return self.extend_from_slice(b);
        }
        if !self.tail.is_empty() {
            let t = self.tail.split().freeze();
            let n = t.len();
            self.chunks.push_back((t, n));
        }
        self.chunks.push_back((b.clone(), b.len()));
        self.len += b.len();
    }

    /// One non-blocking write of what the socket takes. Returns the bytes written and the
    /// bytes let go (a large reply's when its last byte is written).
    pub(crate) fn write_to(&mut self, s: &TcpStream) -> io::Result<(usize, usize)> {
        let n = if self.chunks.is_empty() {
            s.try_write(&self.tail)?
        } else {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_SLICES + 1);
            slices.extend(
                self.chunks
                    .iter()
                    .take(MAX_SLICES)
                    .map(|(c, _)| IoSlice::new(c)),
            );
            if self.chunks.len() <= MAX_SLICES && !self.tail.is_empty() {
                slices.push(IoSlice::new(&self.tail));
            }
            s.try_write_vectored(&slices)?
        };
        let freed = self.consume(n);
        Ok((n, freed))
    }

    /// Drops `n` written bytes; returns the bytes let go.
    fn consume(&mut self, mut n: usize) -> usize {
        self.len -= n;
        let mut freed = 0;
        while n > 0 {
            match self.chunks.front_mut() {
                Some((c, size)) if c.len() <= n => {
                    n -= c.len();
                    freed += *size;
                    self.chunks.pop_front();
                }
                Some((c, _)) => {
                    c.advance(n);
                    return freed;
                }
                None => {
                    self.tail.advance(n);
                    return freed + n;
                }
            }
        }
        freed
    }

    /// Gives back a large tail's memory once everything is written.
    pub(crate) fn shrink_if_idle(&mut self) {
        if self.len == 0 && self.tail.capacity() > 64 * 1024 {
            self.tail = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_kept_across_copies_and_chunks() {
        let mut o = OutBuf::default();
        o.extend_from_slice(b"+a\r\n");
        let big = Bytes::from(vec![b'x'; COPY_MAX + 1]);
        o.push(&big);
        o.push(&Bytes::from_static(b"+b\r\n"));
        assert_eq!(o.len(), 8 + big.len());
        // Consume across the boundaries: the big reply is let go only once written in full.
        assert_eq!(o.consume(2), 0);
        assert_eq!(o.consume(2 + big.len() - 1), 4);
        assert_eq!(o.len(), 5);
        assert_eq!(o.consume(1), big.len());
        assert_eq!(&o.tail[..], b"+b\r\n");
        assert_eq!(o.consume(4), 4);
        assert!(o.is_empty() && o.chunks.is_empty());
    }
}
