//! The one backoff of the crate: exponential with ±50 % jitter, so many agents reconnecting
//! after an outage do not arrive in lockstep. Used by backend reconnects, Sentinel rotation and
//! cluster slot-map refreshes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Exponential backoff: `base`, doubling up to `max`, each delay scaled by a random factor in
/// [0.5, 1.5) and capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    cur: Duration,
    /// Delays handed out since the last reset.
    failures: u32,
    rng: u64,
}

/// Distinct seeds for backoffs created in the same nanosecond.
static SEQ: AtomicU64 = AtomicU64::new(0);

impl Backoff {
    /// `base` is raised to 1 ms and `max` to `base`: a zero or inverted range would spin.
    pub fn new(base: Duration, max: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x2545_f491_4f6c_dd1d)
            ^ (std::process::id() as u64).rotate_left(32)
            ^ SEQ
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Self {
            base,
            max: max.max(base),
            cur: base,
            failures: 0,
            rng: seed | 1,
        }
    }

    pub fn reset(&mut self) {
        self.cur = self.base;
        self.failures = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The next delay: the current step scaled by a random factor in [0.5, 1.5), capped at
    /// `max`; then the step doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64*: enough randomness for jitter, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 bits
        let f = 0.5 + (r as f64) / ((1u64 << 53) as f64);
        let d = self.cur.mul_f64(f).min(self.max);
        self.cur = (self.cur * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_jittered_and_bounded() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let d1 = b.next_delay();
        assert!(
            d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(150),
            "{d1:?}"
        );
        let mut last = d1;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(5), "{last:?}");
        }
        assert!(last >= Duration::from_millis(2500), "{last:?}");
        assert_eq!(b.failures(), 21);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay() < Duration::from_millis(150));
    }

    #[test]
    fn degenerate_ranges_are_fixed() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next_delay() >= Duration::from_micros(500));
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert!(b.next_delay() <= Duration::from_secs(2));
    }

    #[test]
    fn two_backoffs_do_not_move_in_lockstep() {
        let mut a = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let sa: Vec<Duration> = (0..8).map(|_| a.next_delay()).collect();
        let sb: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert_ne!(sa, sb);
    }
}
