//! Per-server load and health, shared by every request of one client.
//!
//! Every storage server the client routes to has an [`Instance`]: the number of requests pending
//! on it (least-loaded replica selection prefers the smallest), and its health. A connection
//! failure, a timeout or a retryable error response marks the instance failed and **blocks** it
//! for a backoff that doubles with each consecutive failure (`HealthConfig::backoff_initial` up to
//! `backoff_max`). Routing avoids blocked instances while another replica exists. When the backoff
//! ends, the client's prober sends `GET /health`; an answer unblocks the instance, a failure
//! blocks it again for a longer backoff. A successful read resets the failure count.
//!
//! An instance with `HealthConfig::max_pending` or more pending requests counts as overloaded:
//! it is chosen only when every other replica is blocked or overloaded too. So does an instance
//! that was recently **outpaced**: a long-tail retry sent elsewhere answered before it. Pending
//! counts alone do not steer traffic away from a slow server at low concurrency (everyone has
//! zero pending between requests); losing the race does. The penalty lasts
//! `HealthConfig::slow_penalty`, doubling while it keeps losing (up to `slow_penalty_max`), and
//! ends as soon as it expires: a recovered server gets its traffic back and, no longer outpaced,
//! keeps it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::routing::Replica;
use crate::stats::Counters;

/// How the client judges storage servers' health.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Consecutive retryable error *responses* that block an instance (connection failures and
    /// timeouts block at once). Default 3.
    pub errors_to_block: u32,
    /// First blocking period (default 50 ms); doubles with each consecutive failure.
    pub backoff_initial: Duration,
    /// Longest blocking period (default 5 s).
    pub backoff_max: Duration,
    /// How often the prober looks for blocked instances whose backoff ended (default 50 ms).
    pub probe_interval: Duration,
    /// How long a health probe may take (default 1 s).
    pub probe_timeout: Duration,
    /// Pending requests at which an instance counts as overloaded (default 64).
    pub max_pending: u32,
    /// How long an instance outpaced by a long-tail retry is avoided (default 500 ms); doubles
    /// with each consecutive loss.
    pub slow_penalty: Duration,
    /// Longest such penalty (default 5 s).
    pub slow_penalty_max: Duration,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            errors_to_block: 3,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            probe_interval: Duration::from_millis(50),
            probe_timeout: Duration::from_secs(1),
            max_pending: 64,
            slow_penalty: Duration::from_millis(500),
            slow_penalty_max: Duration::from_secs(5),
        }
    }
}

/// What went wrong with a request, for health accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Connection refused/broken, protocol violation or timeout: block now.
    Connection,
    /// A retryable error response: block after `errors_to_block` in a row.
    ErrorResponse,
    /// The server shed the request (`overloaded`): like an error response, and the instance is
    /// avoided for a penalty that doubles while it keeps shedding (client-side throttling).
    Shed,
}

#[derive(Debug)]
struct Health {
    /// Consecutive failures since the last success.
    failures: u32,
    /// Consecutive error responses since the last success.
    error_responses: u32,
    /// When the current block ends (meaningful while blocked).
    blocked_until: Instant,
    /// Whether a health probe is in flight.
    probing: bool,
}

/// One storage server as the client sees it.
#[derive(Debug)]
pub(crate) struct Instance {
    pub(crate) address: String,
    pub(crate) tls: bool,
    pending: AtomicU32,
    blocked: AtomicBool,
    /// Until when (ms since `epoch`) the instance is avoided as slow.
    slow_until_ms: AtomicU64,
    /// The time origin of `slow_until_ms`, on tokio's clock (so that a paused runtime, a
    /// simulation, ages penalties in its own time); one per instance, since runtimes with
    /// different clocks may share the process.
    epoch: tokio::time::Instant,
    /// Consecutive times it was outpaced by a long-tail retry.
    outpaced: AtomicU32,
    health: Mutex<Health>,
}

/// Decrements an instance's pending count when the request ends (or is cancelled).
pub(crate) struct PendingGuard(Arc<Instance>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instance {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn new(address: &str, tls: bool) -> Instance {
        Instance {
            address: address.to_string(),
            tls,
            pending: AtomicU32::new(0),
            blocked: AtomicBool::new(false),
            slow_until_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            outpaced: AtomicU32::new(0),
            health: Mutex::new(Health {
                failures: 0,
                error_responses: 0,
                blocked_until: Instant::now(),
                probing: false,
            }),
        }
    }

    /// Requests in flight on this instance.
    pub(crate) fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Counts one request as pending until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> PendingGuard {
        self.pending.fetch_add(1, Ordering::Relaxed);
        PendingGuard(self.clone())
    }

    /// A load score: smaller is better; blocked instances sort last, overloaded and slow ones
    /// after every healthy one.
    pub(crate) fn score(&self, max_pending: u32) -> u64 {
        let pending = u64::from(self.pending());
        if self.is_blocked() {
            (2 << 32) + pending
        } else if pending >= u64::from(max_pending) || self.is_slow() {
            (1 << 32) + pending
        } else {
            pending
        }
    }

    /// Whether the instance is being avoided because long-tail retries outpaced it.
    pub(crate) fn is_slow(&self) -> bool {
        let until = self.slow_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// A long-tail retry sent elsewhere answered before this instance did (or it shed a
    /// request): it is avoided for a penalty that doubles with each consecutive time.
    pub(crate) fn outpaced(&self, config: &HealthConfig) {
        let streak = self.outpaced.fetch_add(1, Ordering::Relaxed).min(20);
        let penalty = config
            .slow_penalty
            .saturating_mul(1 << streak)
            .min(config.slow_penalty_max);
        self.slow_until_ms.store(
            self.now_ms() + penalty.as_millis() as u64,
            Ordering::Relaxed,
        );
        tracing::debug!(
            address = self.address,
            ?penalty,
            "outpaced by a long-tail retry; avoiding it"
        );
    }

    /// A request succeeded: the failure and outpaced streaks end.
    pub(crate) fn succeeded(&self) {
        self.outpaced.store(0, Ordering::Relaxed);
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.failures = 0;
        h.error_responses = 0;
    }

    /// A request failed; blocks the instance when the failure warrants it. Returns whether this
    /// call blocked it.
    pub(crate) fn failed(&self, failure: Failure, config: &HealthConfig) -> bool {
        if failure == Failure::Shed {
            self.outpaced(config);
        }
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(failure, Failure::ErrorResponse | Failure::Shed) {
            h.error_responses += 1;
            if h.error_responses < config.errors_to_block {
                return false;
            }
        }
        h.failures = h.failures.saturating_add(1);
        h.blocked_until = Instant::now() + backoff(config, h.failures);
        let newly = !self.blocked.swap(true, Ordering::Relaxed);
        if newly {
            tracing::info!(
                address = self.address,
                failures = h.failures,
                ?failure,
                "blocking storage server"
            );
        }
        newly
    }

    /// Claims the next probe if the instance is blocked and its backoff has ended.
    fn claim_probe(&self, now: Instant) -> bool {
        if !self.is_blocked() {
            return false;
        }
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.probing || h.blocked_until > now {
            return false;
        }
        h.probing = true;
        true
    }

    /// Records a probe's outcome: healthy unblocks, unhealthy blocks for a longer backoff.
    fn probed(&self, healthy: bool, config: &HealthConfig) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.probing = false;
        if healthy {
            h.failures = 0;
            h.error_responses = 0;
            self.blocked.store(false, Ordering::Relaxed);
            tracing::info!(
                address = self.address,
                "storage server healthy again; unblocked"
            );
        } else {
            h.failures = h.failures.saturating_add(1);
            h.blocked_until = Instant::now() + backoff(config, h.failures);
        }
    }
}

/// The blocking period after `failures` consecutive failures.
fn backoff(config: &HealthConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    config
        .backoff_initial
        .saturating_mul(1 << doublings)
        .min(config.backoff_max)
}

/// Every instance the client knows, by address (ordered, so that probes go out in one order and
/// a simulation's seed replays them).
pub(crate) struct Instances {
    map: RwLock<BTreeMap<String, Arc<Instance>>>,
    pub(crate) config: HealthConfig,
}

impl Instances {
    pub(crate) fn new(config: HealthConfig) -> Instances {
        Instances {
            map: RwLock::new(BTreeMap::new()),
            config,
        }
    }

    /// The instance of `replica`'s server, created on first use.
    pub(crate) fn of(&self, replica: &Replica) -> Arc<Instance> {
        if let Some(i) = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&replica.address)
        {
            return i.clone();
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(replica.address.clone())
            .or_insert_with(|| Arc::new(Instance::new(&replica.address, replica.tls)))
            .clone()
    }

    /// Forgets instances whose address is not in `keep`.
    pub(crate) fn retain(&self, keep: &HashSet<String>) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|address, _| keep.contains(address));
    }

    /// Blocked instances due for a probe (each claimed, so one probe at a time per instance).
    pub(crate) fn due_for_probe(&self) -> Vec<Arc<Instance>> {
        let now = Instant::now();
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|i| i.claim_probe(now))
            .cloned()
            .collect()
    }

    /// Instances blocked right now.
    pub(crate) fn blocked_count(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|i| i.is_blocked())
            .count()
    }

    /// Records a probe result.
    pub(crate) fn probed(&self, instance: &Instance, healthy: bool) {
        instance.probed(healthy, &self.config);
    }

    /// Index of the least-loaded replica in `replicas`, skipping those whose bit is set in
    /// `exclude`; ties go to the first at or after `rotation` (so equal replicas share load).
    pub(crate) fn least_loaded(
        &self,
        replicas: &[Replica],
        exclude: u64,
        rotation: usize,
    ) -> Option<usize> {
        let n = replicas.len();
        let mut best: Option<(u64, usize)> = None;
        for k in 0..n {
            let i = (rotation + k) % n;
            if i < 64 && exclude & (1 << i) != 0 {
                continue;
            }
            let score = self.of(&replicas[i]).score(self.config.max_pending);
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

/// Counts the instances newly blocked by `failed`.
pub(crate) fn count_block(counters: &Counters, newly_blocked: bool) {
    if newly_blocked {
        Counters::add(&counters.instances_blocked, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(address: &str, group: u32) -> Replica {
        Replica {
            node_id: address.into(),
            address: address.into(),
            tls: false,
            zone: "z".into(),
            group: Some(group),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let config = HealthConfig::default();
        assert_eq!(backoff(&config, 1), Duration::from_millis(50));
        assert_eq!(backoff(&config, 2), Duration::from_millis(100));
        assert_eq!(backoff(&config, 4), Duration::from_millis(400));
        assert_eq!(backoff(&config, 30), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn least_loaded_prefers_fewer_pending_and_avoids_blocked() {
        let instances = Instances::new(HealthConfig::default());
        let replicas = vec![replica("a:1", 0), replica("b:1", 1), replica("c:1", 2)];
        let a = instances.of(&replicas[0]);
        let b = instances.of(&replicas[1]);
        let _g1 = a.start();
        let _g2 = a.start();
        let _g3 = b.start();
        assert_eq!(instances.least_loaded(&replicas, 0, 0), Some(2));
        // Excluding c leaves b (1 pending) ahead of a (2 pending).
        assert_eq!(instances.least_loaded(&replicas, 1 << 2, 0), Some(1));
        // Ties rotate.
        drop(_g1);
        drop(_g2);
        drop(_g3);
        assert_eq!(instances.least_loaded(&replicas, 0, 1), Some(1));
        assert_eq!(instances.least_loaded(&replicas, 0, 2), Some(2));
        // A blocked instance is chosen last, but still chosen when it is the only one.
        let c = instances.of(&replicas[2]);
        assert!(c.failed(Failure::Connection, &instances.config));
        assert!(c.is_blocked());
        assert_ne!(instances.least_loaded(&replicas, 0, 2), Some(2));
        assert_eq!(instances.least_loaded(&replicas, 0b011, 0), Some(2));
        assert_eq!(instances.least_loaded(&replicas, 0b111, 0), None);
    }

    #[test]
    fn a_server_that_sheds_is_avoided_at_once_and_for_longer_while_it_keeps_shedding() {
        let instances = Instances::new(HealthConfig::default());
        let replicas = [replica("a:1", 0), replica("b:1", 0)];
        let a = instances.of(&replicas[0]);
        assert!(
            !a.failed(Failure::Shed, &instances.config),
            "not blocked yet"
        );
        assert!(a.is_slow());
        // Avoided while another replica is usable, even with more pending there.
        let b = instances.of(&replicas[1]);
        let _g = b.start();
        assert_eq!(instances.least_loaded(&replicas, 0, 0), Some(1));
        let first = a.slow_until_ms.load(Ordering::Relaxed);
        a.failed(Failure::Shed, &instances.config);
        assert!(
            a.slow_until_ms.load(Ordering::Relaxed) > first,
            "the penalty grows"
        );
    }

    #[tokio::test]
    async fn error_responses_block_after_a_streak_and_probes_unblock() {
        let config = HealthConfig {
            backoff_initial: Duration::from_millis(1),
            ..HealthConfig::default()
        };
        let instances = Instances::new(config);
        let r = replica("a:1", 0);
        let a = instances.of(&r);
        assert!(!a.failed(Failure::ErrorResponse, &instances.config));
        a.succeeded();
        assert!(!a.failed(Failure::ErrorResponse, &instances.config));
        assert!(!a.failed(Failure::ErrorResponse, &instances.config));
        assert!(a.failed(Failure::ErrorResponse, &instances.config));
        assert_eq!(instances.blocked_count(), 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let due = instances.due_for_probe();
        assert_eq!(due.len(), 1);
        // Claimed: not handed out twice while the probe runs.
        assert!(instances.due_for_probe().is_empty());
        instances.probed(&due[0], false);
        assert!(a.is_blocked());
        tokio::time::sleep(Duration::from_millis(5)).await;
        let due = instances.due_for_probe();
        assert_eq!(due.len(), 1);
        instances.probed(&due[0], true);
        assert!(!a.is_blocked());
        assert_eq!(instances.blocked_count(), 0);
    }

    #[test]
    fn an_outpaced_instance_is_avoided_for_a_doubling_penalty() {
        let config = HealthConfig {
            slow_penalty: Duration::from_millis(30),
            slow_penalty_max: Duration::from_millis(60),
            ..HealthConfig::default()
        };
        let instances = Instances::new(config);
        let replicas = vec![replica("a:1", 0), replica("b:1", 1)];
        let a = instances.of(&replicas[0]);
        let b = instances.of(&replicas[1]);
        let _busy = b.start();
        // b has a request pending, a has none: a wins...
        assert_eq!(instances.least_loaded(&replicas, 0, 0), Some(0));
        // ...until it loses a race to a long-tail retry.
        a.outpaced(&instances.config);
        assert!(a.is_slow());
        assert_eq!(instances.least_loaded(&replicas, 0, 0), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!a.is_slow(), "the penalty expires");
        assert_eq!(instances.least_loaded(&replicas, 0, 0), Some(0));
        // Losing again doubles the penalty (capped); a success resets the streak.
        a.outpaced(&instances.config);
        std::thread::sleep(Duration::from_millis(40));
        assert!(a.is_slow(), "second penalty is 60 ms");
        a.succeeded();
        std::thread::sleep(Duration::from_millis(30));
        a.outpaced(&instances.config);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!a.is_slow(), "streak reset: back to 30 ms");
    }

    #[test]
    fn pending_guard_counts_in_flight_requests() {
        let instance = Arc::new(Instance::new("a:1", false));
        let g = instance.start();
        let g2 = instance.start();
        assert_eq!(instance.pending(), 2);
        drop(g);
        assert_eq!(instance.pending(), 1);
        drop(g2);
        assert_eq!(instance.pending(), 0);
    }
}
