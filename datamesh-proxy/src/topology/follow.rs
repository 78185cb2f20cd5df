//! The one shape of the topologies' background tasks. A [`Follower`] follows its source (a
//! Sentinel and its event channel; the cluster's nodes and their slot map) until something
//! fails, and returns the error; [`spawn`] logs it, waits the jittered backoff, and follows
//! again, for as long as the topology lives. A follower resets the backoff once it has a good
//! view, so a source that fails after hours of good service is retried quickly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;
use tracing::warn;

use crate::backend::Backoff;

/// A background discovery loop (see the module docs).
pub trait Follower: Send + Sync + 'static {
    type Error: std::fmt::Display + Send;

    /// What is followed, for logs ("sentinels of mymaster", "cluster").
    fn what(&self) -> String;

    /// Follows the source until it fails. `round` counts the attempts (a Sentinel follower
    /// rotates through its sentinels with it); `backoff` is reset on a good view.
    fn follow<'a>(
        &'a self,
        round: u64,
        backoff: &'a mut Backoff,
    ) -> impl Future<Output = Self::Error> + Send + 'a;
}

/// Runs `f` until the returned handle is dropped (with the topology that holds it).
pub fn spawn<F: Follower>(f: Arc<F>, base: Duration, max: Duration) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut backoff = Backoff::new(base, max);
        let mut round = 0u64;
        loop {
            let err = f.follow(round, &mut backoff).await;
            let wait = backoff.next_delay();
            warn!(what = %f.what(), error = %err, retry_in = ?wait, "topology source failed; trying again");
            round = round.wrapping_add(1);
            tokio::time::sleep(wait).await;
        }
    }))
}
