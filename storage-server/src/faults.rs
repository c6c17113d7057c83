//! Fault injection on the read path, for tests and benchmarks. Off by default.
//!
//! A server started with a non-default [`FaultConfig`] delays every read request (single get and
//! batch-get; never `/health` or `/metrics`) by `delay` before answering it, and fails a fraction
//! `error_rate` of them with [`ErrorCode::Overloaded`](rialto_protocol::ErrorCode::Overloaded),
//! a retryable 503 — what a slow or shedding replica looks like to a client. Both settings live in
//! atomics behind [`Faults`], so a test can slow a server down or heal it while load runs
//! ([`RunningServer::faults`](crate::RunningServer::faults)). The delay is a timer
//! (`tokio::time::sleep`): it never blocks a runtime thread.
//!
//! A server process started with `--fault-file PATH` follows that file ([`follow_file`]):
//! benchmark scripts slow a running server down and heal it by writing
//! `{"delay_ms": 200, "error_rate": 0.0}` there, without a restart (which would confound the
//! measurement with re-opening replicas). Only whoever can write the server's files can do this;
//! there is no network control.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often [`follow_file`] looks at its file.
pub const FAULT_FILE_POLL: Duration = Duration::from_millis(200);

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

    /// Parses a fault file: a JSON object with optional `delay_ms` and `error_rate` (0.0 to 1.0);
    /// an absent field means none of that fault.
    pub fn parse(text: &str) -> Result<FaultConfig, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            delay_ms: u64,
            #[serde(default)]
            error_rate: f64,
        }
        let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !(0.0..=1.0).contains(&file.error_rate) {
            return Err(format!(
                "error_rate {} is not between 0.0 and 1.0",
                file.error_rate
            ));
        }
        Ok(FaultConfig {
            delay: Duration::from_millis(file.delay_ms),
            error_rate: file.error_rate,
        })
    }
}

/// Applies the fault settings in `path` to `faults` whenever the file changes, every
/// [`FAULT_FILE_POLL`], until the task is dropped. A missing file means no faults; a file that
/// does not parse is reported and leaves the settings as they were.
pub async fn follow_file(path: PathBuf, faults: Arc<Faults>) {
    let mut last: Option<Option<String>> = None;
    loop {
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the fault file");
                last.clone().flatten()
            }
        };
        if last.as_ref() != Some(&text) {
            let parsed = match &text {
                Some(t) => FaultConfig::parse(t),
                None => Ok(FaultConfig::default()),
            };
            match parsed {
                Ok(config) => {
                    if config != faults.config() {
                        tracing::warn!(path = %path.display(), delay = ?config.delay, error_rate = config.error_rate, "fault injection changed by the fault file");
                        faults.set(config);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring a fault file that does not parse")
                }
            }
            last = Some(text);
        }
        tokio::time::sleep(FAULT_FILE_POLL).await;
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

    /// Whether any fault is configured (a delay or a share of failures).
    pub fn active(&self) -> bool {
        !self.delay().is_zero() || self.error_rate() > 0.0
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
    fn fault_files_parse_strictly() {
        assert_eq!(
            FaultConfig::parse(r#"{"delay_ms": 200}"#).unwrap(),
            FaultConfig {
                delay: Duration::from_millis(200),
                error_rate: 0.0
            }
        );
        assert_eq!(FaultConfig::parse("{}").unwrap(), FaultConfig::default());
        assert!(FaultConfig::parse(r#"{"error_rate": 1.5}"#).is_err());
        assert!(
            FaultConfig::parse(r#"{"delay": 200}"#).is_err(),
            "unknown field"
        );
        assert!(FaultConfig::parse("delay_ms=200").is_err());
    }

    #[tokio::test]
    async fn a_followed_file_sets_and_clears_faults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults.json");
        let faults = Arc::new(Faults::default());
        let task = tokio::spawn(follow_file(path.clone(), faults.clone()));
        let wait_for = |want: FaultConfig| {
            let faults = faults.clone();
            async move {
                for _ in 0..100 {
                    if faults.config() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("faults never became {want:?}: {:?}", faults.config());
            }
        };
        std::fs::write(&path, r#"{"delay_ms": 150, "error_rate": 0.5}"#).unwrap();
        let slow = FaultConfig {
            delay: Duration::from_millis(150),
            error_rate: 0.5,
        };
        wait_for(slow).await;
        // A broken file keeps the settings.
        std::fs::write(&path, "{not json").unwrap();
        tokio::time::sleep(FAULT_FILE_POLL * 3).await;
        assert_eq!(faults.config(), slow);
        // Removing the file heals the server.
        std::fs::remove_file(&path).unwrap();
        wait_for(FaultConfig::default()).await;
        task.abort();
    }

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
