//! Fault injection on the read path, for tests and benchmarks. Off by default.
//!
//! A server started with a non-default [`FaultConfig`] delays every read request (single get and
//! batch-get; never `/health` or `/metrics`) by `delay` before answering it, and fails a fraction
//! `error_rate` of them with [`ErrorCode::Overloaded`](rialto_protocol::ErrorCode::Overloaded),
//! a retryable 503 — what a slow or shedding replica looks like to a client. Both settings live in
//! atomics behind [`Faults`], so a test can slow a server down or heal it while load runs
//! ([`RunningServer::faults`](crate::RunningServer::faults)). The delay is a timer
//! (`tokio::time::sleep`): it never blocks a runtime thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Faults injected into read requests. `Default` injects none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultConfig {
    /// Added before each read request is answered.
    pub delay: Duration,
    /// Fraction of read requests (0.0 ..= 1.0) answered with a retryable `overloaded` error.
    pub error_rate: f64,
}

impl FaultConfig {
    /// Whether this configuration injects anything.
    pub fn is_active(&self) -> bool {
        !self.delay.is_zero() || self.error_rate > 0.0
    }
}

/// The live fault settings of one server, changeable at runtime; all methods are lock-free.
#[derive(Debug)]
pub struct Faults {
    delay_us: AtomicU64,
    /// `f64::to_bits` of the error rate, always within 0.0 ..= 1.0.
    error_rate_bits: AtomicU64,
    /// State of the split-mix generator that decides which requests fail.
    rng: AtomicU64,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults::new(FaultConfig::default())
    }
}

impl Faults {
    /// Settings starting at `config`.
    pub fn new(config: FaultConfig) -> Faults {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        let faults = Faults {
            delay_us: AtomicU64::new(0),
            error_rate_bits: AtomicU64::new(0f64.to_bits()),
            rng: AtomicU64::new(seed),
        };
        faults.set(config);
        faults
    }

    /// Replaces both settings.
    pub fn set(&self, config: FaultConfig) {
        self.set_delay(config.delay);
        self.set_error_rate(config.error_rate);
    }

    /// Turns every fault off.
    pub fn clear(&self) {
        self.set(FaultConfig::default());
    }

    /// The current settings.
    pub fn config(&self) -> FaultConfig {
        FaultConfig {
            delay: self.delay(),
            error_rate: self.error_rate(),
        }
    }

    /// Sets the delay added to each read request (microsecond resolution).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.delay_us.store(us, Ordering::Relaxed);
    }

    /// The delay added to each read request.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }

    /// Sets the fraction of read requests that fail; clamped to 0.0 ..= 1.0 (NaN means 0).
    pub fn set_error_rate(&self, rate: f64) {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self.error_rate_bits
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    /// The fraction of read requests that fail.
    pub fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate_bits.load(Ordering::Relaxed))
    }

    /// Draws whether one request fails, with probability [`error_rate`](Self::error_rate).
    pub(crate) fn should_fail(&self) -> bool {
        let rate = self.error_rate();
        rate > 0.0 && (rate >= 1.0 || self.next_unit() < rate)
    }

    /// A uniform number in 0.0 .. 1.0 (split-mix 64; quality is ample for picking requests).
    fn next_unit(&self) -> f64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_clamp() {
        let f = Faults::default();
        assert_eq!(f.config(), FaultConfig::default());
        assert!(!f.config().is_active());
        f.set_delay(Duration::from_millis(7));
        f.set_error_rate(0.25);
        assert_eq!(
            f.config(),
            FaultConfig {
                delay: Duration::from_millis(7),
                error_rate: 0.25
            }
        );
        assert!(f.config().is_active());
        f.set_error_rate(3.0);
        assert_eq!(f.error_rate(), 1.0);
        f.set_error_rate(-1.0);
        assert_eq!(f.error_rate(), 0.0);
        f.set_error_rate(f64::NAN);
        assert_eq!(f.error_rate(), 0.0);
        f.clear();
        assert_eq!(f.config(), FaultConfig::default());
    }

    #[test]
    fn error_rate_selects_about_that_fraction() {
        let f = Faults::new(FaultConfig {
            delay: Duration::ZERO,
            error_rate: 0.3,
        });
        let failed = (0..10_000).filter(|_| f.should_fail()).count();
        assert!((2_500..3_500).contains(&failed), "{failed} of 10000");
        f.set_error_rate(0.0);
        assert!((0..1_000).all(|_| !f.should_fail()));
        f.set_error_rate(1.0);
        assert!((0..1_000).all(|_| f.should_fail()));
    }
}
