//! One write per connection per runtime tick, in the order the connections got commands.
//!
//! When a session queues commands on a shared connection that is up, the connection is put on
//! its group's flusher list (once per tick). The flusher task then yields with
//! `tokio::task::yield_now`, which on tokio runs it only after every other task that is ready
//! has run, so every session ready in the same tick has queued its commands; then it writes
//! each listed connection's queue with one `write` each, in list order. That is the batching
//! that makes pipeline depth 1 fast (one send per tick per connection, not per command), and
//! the list order is the order the commands were read in: a PUBLISH read after another
//! client's command on another connection is written after it. (A writer task per connection
//! that yields would be woken last in, first out, writing the latest connection first.)
//!
//! A write the socket does not take whole is finished by the connection's own writer task,
//! which also writes what is queued while a connection is connecting or over one batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

/// What the flusher writes: a shared connection ([`super::Conn`]).
pub trait Flush: Send + Sync {
    /// Writes the queue in one batch; `buf` is the flusher's scratch buffer.
    fn flush_now(&self, buf: &mut BytesMut);
}

/// A group's flusher (see the module docs). Dropping it stops its task.
pub struct Flusher {
    list: Arc<List>,
    _task: AbortOnDropHandle<()>,
}

struct List {
    conns: Mutex<VecDeque<Arc<dyn Flush>>>,
    wake: Notify,
}

impl Flusher {
    /// Starts the flusher task (must run inside tokio).
    pub fn spawn() -> Self {
        let list = Arc::new(List {
            conns: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
        });
        let l = list.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut batch: Vec<Arc<dyn Flush>> = Vec::new();
            let mut buf = BytesMut::new();
            loop {
                {
                    // Registered before the list is checked, so a mark in between wakes it;
                    // marks while it flushes store no permit, so no empty round follows.
                    let notified = l.wake.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if l.conns.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                        notified.await;
                        // Woken from idle: run after every other ready task (see the module
                        // docs). Connections listed while it flushed go out at once instead.
                        tokio::task::yield_now().await;
                    }
                }
                batch.extend(l.conns.lock().unwrap_or_else(|p| p.into_inner()).drain(..));
                for conn in batch.drain(..) {
                    conn.flush_now(&mut buf);
                }
                if buf.capacity() > 1024 * 1024 {
                    buf = BytesMut::new();
                }
            }
        }));
        Self { list, _task: task }
    }

    /// Lists `conn` for the next flush (the caller lists each connection once per flush).
    pub fn mark(&self, conn: Arc<dyn Flush>) {
        self.list
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(conn);
        self.list.wake.notify_waiters();
    }
}
