//! Smart long-tail retry: when to hedge a slow request, and how much extra load hedging may add.
//!
//! A request (a single get, or one server's share of a batch-get) still pending after its
//! **threshold** is sent again to another replica; the first answer wins and the loser is
//! cancelled. Three rules keep hedging from making things worse:
//!
//! - **Adaptive threshold.** Each kind of request (single get; batch-get sub-requests by key count)
//!   keeps its recent latencies. Once it has enough samples the threshold is
//!   `adaptive_factor × median` (2 by default), clamped between `threshold_floor` and the static ceiling of that
//!   kind (`get_threshold` or the `batch_thresholds` table, Venice's defaults). A fast cluster thus
//!   hedges after a few milliseconds instead of Venice's fixed 500 ms for large batches, and a
//!   slow cluster does not hedge everything. The median ignores a minority of slow replicas.
//! - **Late-retry dropping.** The retry timer fires on the client's runtime; if it fires more than
//!   `late_margin` after it was due, the client itself is overloaded (its threads are busy) and a
//!   retry would only add load: it is dropped and counted.
//! - **Budget.** A token bucket: every original request adds `budget_ratio` tokens, and
//!   `budget_floor_per_sec` tokens arrive per second regardless of traffic (so a quiet client can
//!   still hedge: Venice's budget is useless at 1–2 QPS); at most `budget_burst` tokens are kept.
//!   A hedge costs one token per request sent.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Smart long-tail retry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LongTailRetry {
    /// Whether slow requests are hedged at all (default true).
    pub enabled: bool,
    /// Ceiling of the single-get threshold, and its value before enough samples (default 10 ms).
    pub get_threshold: Duration,
    /// Ceilings of batch-get sub-request thresholds by key count: `(up to keys, threshold)`,
    /// ascending; the last entry covers larger requests. Default: Venice's table
    /// (12 → 8 ms, 20 → 30 ms, 150 → 50 ms, 500 → 100 ms, more → 500 ms).
    pub batch_thresholds: Vec<(usize, Duration)>,
    /// Whether thresholds adapt to measured latency (default true).
    pub adaptive: bool,
    /// Threshold = this × the median latency of the request kind (default 2).
    pub adaptive_factor: f64,
    /// Smallest threshold the adaptation may choose (default 1 ms).
    pub threshold_floor: Duration,
    /// A retry timer firing later than this after its due time is dropped (default 10 ms).
    pub late_margin: Duration,
    /// Tokens added per original request (default 0.1: hedges add at most ~10 % requests).
    pub budget_ratio: f64,
    /// Tokens added per second regardless of traffic (default 2).
    pub budget_floor_per_sec: f64,
    /// Most tokens kept (default 20).
    pub budget_burst: f64,
}

impl Default for LongTailRetry {
    fn default() -> LongTailRetry {
        let ms = Duration::from_millis;
        LongTailRetry {
            enabled: true,
            get_threshold: ms(10),
            batch_thresholds: vec![
                (12, ms(8)),
                (20, ms(30)),
                (150, ms(50)),
                (500, ms(100)),
                (usize::MAX, ms(500)),
            ],
            adaptive: true,
            adaptive_factor: 2.0,
            threshold_floor: ms(1),
            late_margin: ms(10),
            budget_ratio: 0.1,
            budget_floor_per_sec: 2.0,
            budget_burst: 20.0,
        }
    }
}

impl LongTailRetry {
    /// No hedging at all.
    pub fn disabled() -> LongTailRetry {
        LongTailRetry {
            enabled: false,
            ..LongTailRetry::default()
        }
    }
}

/// Latency samples kept per request kind.
const WINDOW: usize = 64;
/// Samples needed before the threshold adapts.
const MIN_SAMPLES: u64 = 10;

/// Recent latencies of one request kind and the median derived from them.
struct Kind {
    ceiling: Duration,
    ring: Mutex<[u32; WINDOW]>,
    samples: AtomicU64,
    median_us: AtomicU32,
}

impl Kind {
    fn new(ceiling: Duration) -> Kind {
        Kind {
            ceiling,
            ring: Mutex::new([0; WINDOW]),
            samples: AtomicU64::new(0),
            median_us: AtomicU32::new(0),
        }
    }

    fn record(&self, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u32::MAX)) as u32;
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.samples.fetch_add(1, Ordering::Relaxed) + 1;
        ring[(n as usize - 1) % WINDOW] = us;
        // Re-derive the median once there are enough samples: at every sample while the window
        // fills (a new client adapts within its first requests), then every 8.
        if n >= MIN_SAMPLES && (n <= WINDOW as u64 || n.is_multiple_of(8)) {
            let len = (n as usize).min(WINDOW);
            let mut sorted = ring[..len].to_vec();
            let mid = len / 2;
            let (_, median, _) = sorted.select_nth_unstable(mid);
            self.median_us.store(*median, Ordering::Relaxed);
        }
    }

    fn median(&self) -> Option<Duration> {
        match self.median_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(u64::from(us))),
        }
    }

    /// The threshold given the median to adapt to (this kind's or a neighbour's).
    fn threshold(&self, config: &LongTailRetry, median: Option<Duration>) -> Duration {
        match median {
            Some(median) if config.adaptive => median
                .mul_f64(config.adaptive_factor.max(0.0))
                .clamp(config.threshold_floor.min(self.ceiling), self.ceiling),
            _ => self.ceiling,
        }
    }
}

/// The long-tail retry state of one client: thresholds per request kind and the budget.
pub(crate) struct Hedger {
    pub(crate) config: LongTailRetry,
    get: Kind,
    batch: Vec<(usize, Kind)>,
    budget: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The kind of a request, for thresholds and latency samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Get,
    /// A batch-get sub-request: index into the batch table.
    Batch(usize),
}

impl Hedger {
    pub(crate) fn new(config: LongTailRetry) -> Hedger {
        let mut table = config.batch_thresholds.clone();
        table.sort_by_key(|(keys, _)| *keys);
        if table.last().is_none_or(|(keys, _)| *keys != usize::MAX) {
            let last = table.last().map_or(Duration::from_millis(500), |(_, t)| *t);
            table.push((usize::MAX, last));
        }
        Hedger {
            get: Kind::new(config.get_threshold),
            batch: table.into_iter().map(|(k, t)| (k, Kind::new(t))).collect(),
            budget: Mutex::new(Bucket {
                tokens: config.budget_burst.max(0.0),
                refilled: Instant::now(),
            }),
            config,
        }
    }

    /// The kind of a batch-get sub-request of `keys` keys.
    pub(crate) fn batch_kind(&self, keys: usize) -> RequestKind {
        let i = self
            .batch
            .iter()
            .position(|(up_to, _)| keys <= *up_to)
            .unwrap_or(self.batch.len() - 1);
        RequestKind::Batch(i)
    }

    fn kind(&self, kind: RequestKind) -> &Kind {
        match kind {
            RequestKind::Get => &self.get,
            RequestKind::Batch(i) => &self.batch[i.min(self.batch.len() - 1)].1,
        }
    }

    /// When a request of `kind` started at `started` should be hedged; `None` when disabled.
    pub(crate) fn due(&self, kind: RequestKind, started: Instant) -> Option<Instant> {
        self.config.enabled.then(|| started + self.threshold(kind))
    }

    /// The current threshold of `kind`. A batch kind without enough samples of its own adapts to
    /// the nearest batch kind that has them (sub-request sizes straddle the table's boundaries:
    /// 500 and 501 keys cost the same), still under its own ceiling.
    pub(crate) fn threshold(&self, kind: RequestKind) -> Duration {
        let own = self.kind(kind);
        let median = match kind {
            RequestKind::Get => own.median(),
            RequestKind::Batch(i) => own.median().or_else(|| {
                (1..self.batch.len()).find_map(|d| {
                    let below = i.checked_sub(d).and_then(|j| self.batch.get(j));
                    let above = self.batch.get(i + d);
                    below
                        .and_then(|(_, k)| k.median())
                        .or_else(|| above.and_then(|(_, k)| k.median()))
                })
            }),
        };
        own.threshold(&self.config, median)
    }

    /// Records the latency of a successful request.
    pub(crate) fn record(&self, kind: RequestKind, latency: Duration) {
        self.kind(kind).record(latency);
    }

    /// Whether a retry timer that fired at `now` for `due` is too late to be worth sending.
    pub(crate) fn is_late(&self, due: Instant, now: Instant) -> bool {
        now.saturating_duration_since(due) > self.config.late_margin
    }

    /// An original request was sent: the budget grows.
    pub(crate) fn on_request(&self) {
        if !self.config.enabled {
            return;
        }
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        b.tokens = (b.tokens + self.config.budget_ratio).min(self.config.budget_burst);
    }

    /// Takes one retry token if there is one.
    pub(crate) fn try_take(&self) -> bool {
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.refilled = now;
        b.tokens =
            (b.tokens + elapsed * self.config.budget_floor_per_sec).min(self.config.budget_burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_kinds_follow_the_table() {
        let h = Hedger::new(LongTailRetry::default());
        assert_eq!(h.batch_kind(1), RequestKind::Batch(0));
        assert_eq!(h.batch_kind(12), RequestKind::Batch(0));
        assert_eq!(h.batch_kind(13), RequestKind::Batch(1));
        assert_eq!(h.batch_kind(5000), RequestKind::Batch(4));
        assert_eq!(h.threshold(h.batch_kind(5000)), Duration::from_millis(500));
        assert_eq!(h.threshold(RequestKind::Get), Duration::from_millis(10));
    }

    #[test]
    fn thresholds_adapt_to_the_median_within_floor_and_ceiling() {
        let h = Hedger::new(LongTailRetry::default());
        let kind = h.batch_kind(2500);
        // Mostly 10 ms with a slow minority: the median stays 10 ms, threshold 20 ms.
        for i in 0..64 {
            let ms = if i % 4 == 0 { 200 } else { 10 };
            h.record(kind, Duration::from_millis(ms));
        }
        assert_eq!(h.threshold(kind), Duration::from_millis(20));
        // Very fast requests: the floor.
        for _ in 0..64 {
            h.record(RequestKind::Get, Duration::from_micros(50));
        }
        assert_eq!(h.threshold(RequestKind::Get), Duration::from_millis(1));
        // Slow requests: never above the ceiling.
        let small = h.batch_kind(5);
        for _ in 0..64 {
            h.record(small, Duration::from_millis(100));
        }
        assert_eq!(h.threshold(small), Duration::from_millis(8));
        // Without adaptation, the ceiling.
        let fixed = Hedger::new(LongTailRetry {
            adaptive: false,
            ..LongTailRetry::default()
        });
        for _ in 0..64 {
            fixed.record(RequestKind::Get, Duration::from_micros(50));
        }
        assert_eq!(fixed.threshold(RequestKind::Get), Duration::from_millis(10));
    }

    #[test]
    fn a_batch_kind_without_samples_adapts_to_its_nearest_neighbour() {
        let h = Hedger::new(LongTailRetry::default());
        let k500 = h.batch_kind(500);
        let k501 = h.batch_kind(501);
        assert_ne!(k500, k501);
        for _ in 0..64 {
            h.record(k500, Duration::from_millis(8));
        }
        assert_eq!(h.threshold(k500), Duration::from_millis(16));
        assert_eq!(h.threshold(k501), Duration::from_millis(16));
        // Its own samples win once it has them.
        for _ in 0..64 {
            h.record(k501, Duration::from_millis(20));
        }
        assert_eq!(h.threshold(k501), Duration::from_millis(40));
        // A neighbour's median never lifts a kind above its own ceiling (8 ms for <= 12 keys).
        assert_eq!(h.threshold(h.batch_kind(3)), Duration::from_millis(8));
        // Single gets do not borrow from batches.
        assert_eq!(h.threshold(RequestKind::Get), Duration::from_millis(10));
    }

    #[test]
    fn too_few_samples_keep_the_ceiling() {
        let h = Hedger::new(LongTailRetry::default());
        for _ in 0..(MIN_SAMPLES - 1) {
            h.record(RequestKind::Get, Duration::from_micros(50));
        }
        assert_eq!(h.threshold(RequestKind::Get), Duration::from_millis(10));
    }

    #[tokio::test]
    async fn budget_caps_retries_at_the_ratio_plus_burst() {
        let h = Hedger::new(LongTailRetry {
            budget_ratio: 0.1,
            budget_burst: 5.0,
            budget_floor_per_sec: 0.0,
            ..LongTailRetry::default()
        });
        let mut granted = 0;
        for _ in 0..1000 {
            h.on_request();
            if h.try_take() {
                granted += 1;
            }
        }
        // The burst (5) plus 10 % of 1000 requests, give or take float rounding.
        assert!((104..=105).contains(&granted), "{granted}");
    }

    #[tokio::test]
    async fn budget_floor_refills_over_time_without_traffic() {
        let h = Hedger::new(LongTailRetry {
            budget_burst: 3.0,
            budget_floor_per_sec: 10.0,
            ..LongTailRetry::default()
        });
        assert!(h.try_take() && h.try_take() && h.try_take());
        assert!(!h.try_take());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(h.try_take());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // Capped at the burst.
        assert!(h.try_take() && h.try_take() && h.try_take());
        assert!(!h.try_take());
    }

    #[test]
    fn late_timers_are_detected() {
        let h = Hedger::new(LongTailRetry::default());
        let due = Instant::now();
        assert!(!h.is_late(due, due + Duration::from_millis(5)));
        assert!(h.is_late(due, due + Duration::from_millis(11)));
    }
}
