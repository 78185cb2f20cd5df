//! A client's unwritten output. Small replies are copied into one contiguous tail, so many of
//! them leave in one write; large ones are kept as the backend reader produced them (no copy,
//! no doubling of a growing buffer) and written with the tail in one `writev`. What is held
//! here is exactly what the client's output count says ([`crate::budget`]).

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
    /// Large replies and sealed tails, in order; all of them before `tail`.
    chunks: VecDeque<Bytes>,
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
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.chunks.push_back(b.clone());
        self.len += b.len();
    }

    /// One non-blocking write of what the socket takes; returns the bytes written.
    pub(crate) fn write_to(&mut self, s: &TcpStream) -> io::Result<usize> {
        let n = if self.chunks.is_empty() {
            s.try_write(&self.tail)?
        } else {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_SLICES + 1);
            slices.extend(self.chunks.iter().take(MAX_SLICES).map(|c| IoSlice::new(c)));
            if self.chunks.len() <= MAX_SLICES && !self.tail.is_empty() {
                slices.push(IoSlice::new(&self.tail));
            }
            s.try_write_vectored(&slices)?
        };
        self.consume(n);
        Ok(n)
    }

    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            match self.chunks.front_mut() {
                Some(c) if c.len() <= n => {
                    n -= c.len();
                    self.chunks.pop_front();
                }
                Some(c) => {
                    c.advance(n);
                    return;
                }
                None => {
                    self.tail.advance(n);
                    return;
                }
            }
        }
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
        // Consume across the boundaries.
        o.consume(2);
        o.consume(2 + big.len() - 1);
        assert_eq!(o.len(), 5);
        o.consume(1);
        assert_eq!(&o.tail[..], b"+b\r\n");
        o.consume(4);
        assert!(o.is_empty() && o.chunks.is_empty());
    }
}
