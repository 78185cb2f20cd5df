//! The bystander: one client doing SET/GET of random binary values, pipelined batches and an
//! INCR counter next to the attackers, checking every reply exactly. Any error, wrong reply or
//! stall ends it with the reason.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use datamesh_tests::proxy::{simple, RespConn};
use datamesh_tests::resp::{self, Reply};

use crate::gen::Rng;

pub struct Bystander {
    stop: Arc<AtomicBool>,
    round_trips: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Bystander {
    pub fn start(addr: SocketAddr, seed: u64) -> Result<Self> {
        let mut c = RespConn::connect(addr)?;
        c.expect(&["PING"], simple("PONG"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let round_trips = Arc::new(AtomicU64::new(0));
        let (stop2, rt2) = (Arc::clone(&stop), Arc::clone(&round_trips));
        let handle = std::thread::spawn(move || run(c, seed, &stop2, &rt2));
        Ok(Self {
            stop,
            round_trips,
            handle: Some(handle),
        })
    }

    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Fails when the bystander has stopped on an error.
    pub fn check(&self) -> Result<()> {
        if self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            bail!("the bystander stopped early (its error follows when it is joined)");
        }
        Ok(())
    }

    /// Stops it; its error, if it met one.
    pub fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self
            .handle
            .take()
            .ok_or_else(|| anyhow!("finished twice"))?;
        h.join()
            .map_err(|_| anyhow!("the bystander thread panicked"))??;
        Ok(self.round_trips())
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn expect(what: &str, got: Reply, want: &Reply) -> Result<()> {
    if &got != want {
        bail!("bystander: {what}: expected {want:?}, got {got:?}");
    }
    Ok(())
}

fn run(mut c: RespConn, seed: u64, stop: &AtomicBool, round_trips: &AtomicU64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let key = format!("bystander:fuzz:{seed:x}");
    let counter = format!("{key}:n");
    c.cmd(&["DEL", &counter])?;
    let mut n: i64 = 0;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let len = if rng.chance(10) {
            rng.below(20_000)
        } else {
            rng.below(64)
        };
        let v = rng.bytes(len);
        let got = c.cmd_bytes(&[b"SET", key.as_bytes(), &v])?;
        expect(&format!("round {i} SET"), got, &simple("OK"))?;
        let got = c.cmd_bytes(&[b"GET", key.as_bytes()])?;
        expect(&format!("round {i} GET"), got, &Reply::Bulk(Some(v)))?;
        if i.is_multiple_of(8) {
            // A pipelined batch in one write: SET/GET pairs and the counter.
            let mut batch = Vec::new();
            let mut want = Vec::new();
            for j in 0..8 {
                let k = format!("{key}:{j}");
                let len = rng.below(100);
                let v = rng.bytes(len);
                batch.extend_from_slice(&resp::encode(&[b"SET", k.as_bytes(), &v]));
                batch.extend_from_slice(&resp::encode(&[b"GET", k.as_bytes()]));
                batch.extend_from_slice(&resp::encode(&[b"INCR", counter.as_bytes()]));
                n += 1;
                want.push(simple("OK"));
                want.push(Reply::Bulk(Some(v)));
                want.push(Reply::Int(n));
            }
            c.send_raw(&batch)?;
            for (j, w) in want.iter().enumerate() {
                let got = c
                    .read()
                    .with_context(|| format!("bystander round {i} batch reply {j}"))?;
                expect(&format!("round {i} batch reply {j}"), got, w)?;
            }
        }
        round_trips.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    Ok(())
}
