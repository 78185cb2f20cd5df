//! Bounded-rate logging: an event that a client can cause at will (refused connections,
//! failed accepts, limits hit) is logged at most once per period, with the count of the
//! occurrences that were not logged, so a flood cannot flood the log too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Lets one occurrence per `every` through.
#[derive(Debug)]
pub struct RateLimited {
    every_ms: u64,
    /// When the last occurrence was let through (ms since `epoch`, 0 = never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
    epoch: Instant,
}

impl RateLimited {
    pub fn new(every: Duration) -> Self {
        Self {
            every_ms: every.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Some(number of occurrences not logged since the last one) when this one is to be
    /// logged, None when it is to be counted only.
    pub fn check(&self) -> Option<u64> {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now - last < self.every_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One thread wins the slot; the others count.
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_per_period_with_the_count_of_the_rest() {
        let r = RateLimited::new(Duration::from_secs(10));
        assert_eq!(r.check(), Some(0));
        for _ in 0..5 {
            assert_eq!(r.check(), None);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(r.check(), Some(5));
        assert_eq!(r.check(), None);
    }
}
