//! Admission of new upstream connections: a token bucket per backend.
//!
//! Owns the rate arithmetic only (pure, clock passed in). `upstream` keeps
//! one bucket per backend and the bounded, first-come-first-served queue
//! of connections waiting for a token.

use std::time::{Duration, Instant};

/// `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// True when a token is there to take.
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Time until the next token.
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        // A very low rate could overflow a Duration: waits are re-checked
        // anyway, so a second is as long as one needs to be.
        Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate)
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert!(b.try_take(t0));
        }
        assert!(!b.try_take(t0), "burst used up");
        assert_eq!(b.wait(t0), Duration::from_millis(100));
        assert!(!b.try_take(t0 + Duration::from_millis(99)));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        // A long pause saves up no more than the burst.
        let later = t0 + Duration::from_secs(60);
        let taken = (0..100).filter(|_| b.try_take(later)).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn never_more_than_burst_plus_rate_times_t() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 20.0, t0);
        let mut taken = 0;
        for ms in 0..=2000u64 {
            let now = t0 + Duration::from_millis(ms);
            while b.try_take(now) {
                taken += 1;
            }
            assert!(
                taken as f64 <= 20.0 + 100.0 * ms as f64 / 1000.0 + 1e-9,
                "at {ms} ms: {taken}"
            );
        }
        assert!((219..=220).contains(&taken), "{taken}");
    }
}
