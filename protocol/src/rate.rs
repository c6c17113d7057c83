//! A token bucket: the rate limit behind servers' read quotas and the controller's admin calls.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket refilled at `rate` tokens per second up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// (tokens, when last refilled); tokens may be negative (debt).
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, now)),
        }
    }

    /// Tokens added per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes `cost` tokens at `now` if any are left, possibly going into debt: a cost larger
    /// than what is left is admitted and slows what follows (a large batch is slowed, never
    /// starved). `Err` with the wait until a whole token is back when the bucket is empty.
    pub fn take(&self, cost: f64, now: Instant) -> Result<(), Duration> {
        self.take_if(cost, now, |tokens| tokens > 0.0)
    }

    /// Takes `cost` tokens at `now` only if that many are left; else `Err` with the wait
    /// until they are.
    pub fn take_whole(&self, cost: f64, now: Instant) -> Result<(), Duration> {
        self.take_if(cost, now, |tokens| tokens >= cost)
    }

    fn take_if(
        &self,
        cost: f64,
        now: Instant,
        enough: impl Fn(f64) -> bool,
    ) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if !enough(*tokens) {
            let missing = cost.clamp(f64::MIN_POSITIVE, 1.0) - *tokens;
            let wait_s = if self.rate > 0.0 {
                missing.max(0.0) / self.rate
            } else {
                f64::MAX
            };
            return Err(Duration::try_from_secs_f64(wait_s).unwrap_or(Duration::MAX));
        }
        *tokens -= cost;
        Ok(())
    }

    /// Whether the bucket would be full at `now` (nothing taken for the last `burst` tokens'
    /// worth of time): forgetting it changes nothing.
    pub fn is_full(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = *state;
        tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate >= self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(2.0, 3.0, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(1.0, t0), Ok(()));
        }
        let wait = bucket.take(1.0, t0).expect_err("the burst is spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(!bucket.is_full(t0));
        // Half a second refills one token at 2 per second.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(bucket.take(1.0, t1), Ok(()));
        assert!(bucket.take(1.0, t1).is_err());
        // A cost larger than what is left is admitted once and leaves a debt.
        let t2 = t1 + Duration::from_secs(2);
        assert!(bucket.is_full(t2));
        assert_eq!(bucket.take(10.0, t2), Ok(()));
        let wait = bucket.take(1.0, t2).expect_err("in debt");
        assert!(wait >= Duration::from_secs(3), "{wait:?}");
    }

    #[test]
    fn take_whole_admits_only_what_is_there() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(1.0, 2.0, t0);
        assert_eq!(bucket.take_whole(1.0, t0), Ok(()));
        assert_eq!(bucket.take_whole(1.0, t0), Ok(()));
        // A tenth of a token back: `take` would admit, `take_whole` waits for the rest.
        let t1 = t0 + Duration::from_millis(100);
        let wait = bucket.take_whole(1.0, t1).expect_err("a tenth of a token");
        assert!(
            wait >= Duration::from_millis(899) && wait <= Duration::from_millis(901),
            "{wait:?}"
        );
        assert_eq!(
            bucket.take_whole(1.0, t1 + Duration::from_millis(900)),
            Ok(())
        );
    }
}
