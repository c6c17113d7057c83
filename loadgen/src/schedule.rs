//! The open-loop driver: requests start at fixed intervals from a start time, whether or not
//! earlier ones have finished, and latency is measured from each request's *intended* start
//! (so a stalled client or server shows up in the percentiles instead of hiding as fewer
//! requests: coordinated omission corrected).
//!
//! Request `i` of the [`Schedule`] is due at `start + i / rate` (the driver wakes up to 1 ms
//! early to absorb timer granularity; an early request is measured from its actual start);
//! client task `t` of `T` owns the
//! requests `t, t + T, t + 2T, …`. Each task sleeps until its next due time, spawns the request
//! (the request runs on its own Tokio task, so completions never delay sends) and collects
//! completions into its own histograms; the histograms are merged at the end. The first
//! `warmup` requests are sent but not measured. After its last send a task waits for its
//! in-flight requests until `drain` past the end of the schedule; those still running are
//! aborted and counted as `not_finished`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use crate::report::new_histogram;

/// When each request is due.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: f64,
    warmup: u64,
    measured: u64,
}

impl Schedule {
    /// `rate` requests per second: `rate × warmup` unmeasured requests, then
    /// `min(rate × duration, max_requests)` measured ones.
    pub fn new(
        rate: f64,
        duration: Duration,
        warmup: Duration,
        max_requests: Option<u64>,
    ) -> Result<Schedule, String> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!(
                "rate must be a positive number of requests/s, not {rate}"
            ));
        }
        // Rounded to absorb float error (3 × 0.1 s is 0.30000000000000004 s).
        let count = |d: Duration| (rate * d.as_secs_f64() + 1e-6).floor() as u64;
        let mut measured = count(duration);
        if let Some(max) = max_requests {
            measured = measured.min(max);
        }
        Ok(Schedule {
            rate,
            warmup: count(warmup),
            measured,
        })
    }

    /// All requests, warmup included.
    pub fn total(&self) -> u64 {
        self.warmup + self.measured
    }

    /// Measured requests.
    pub fn measured(&self) -> u64 {
        self.measured
    }

    /// Whether request `i` is part of the warmup.
    pub fn is_warmup(&self, i: u64) -> bool {
        i < self.warmup
    }

    /// When request `i` is due, after the start.
    pub fn offset(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// When the measured phase starts, after the start.
    pub fn measured_start(&self) -> Duration {
        self.offset(self.warmup)
    }

    /// When the schedule ends (one interval after the last request), after the start.
    pub fn end(&self) -> Duration {
        self.offset(self.total())
    }

    /// The requests of client task `task` of `tasks`, in order.
    pub fn indices(&self, task: usize, tasks: usize) -> impl Iterator<Item = u64> {
        (task as u64..self.total()).step_by(tasks.max(1))
    }
}

/// What one request reports back to the driver.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// The failure kind when the request failed (`None`: ok).
    pub error: Option<String>,
    /// When the first record arrived (streaming).
    pub first_record: Option<Instant>,
    pub keys_requested: u64,
    pub keys_found: u64,
    pub keys_missing: u64,
    pub keys_failed: u64,
    pub wrong_values: u64,
    /// Keys whose compute result held an operation's error.
    pub compute_errors: u64,
    pub value_bytes: u64,
    /// Servers of the call's initial plan (streaming).
    pub fanout: Option<usize>,
}

/// A kind of request the driver sends.
pub trait Workload: Send + Sync + 'static {
    /// Starts one request of client task `task`, drawing its keys from `rng`. Called on the
    /// scheduling task: do the least work here and the rest in the returned future.
    fn request(
        &self,
        task: usize,
        rng: &mut StdRng,
    ) -> Pin<Box<dyn Future<Output = Sample> + Send + 'static>>;
}

/// Counters the progress reporter reads while the run goes on (warmup included).
#[derive(Debug, Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Longest latency (from the intended start, µs) of requests finished since the last
    /// progress line: shows when in a run a spike happened.
    pub max_latency_us: AtomicU64,
}

/// What the measured requests of one or all tasks produced.
#[derive(Debug)]
pub struct Tally {
    pub latency: Histogram<u64>,
    pub first_record: Histogram<u64>,
    pub send_lag: Histogram<u64>,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub failed_by_kind: BTreeMap<String, u64>,
    pub keys_requested: u64,
    pub keys_found: u64,
    pub keys_missing: u64,
    pub keys_failed: u64,
    pub wrong_values: u64,
    pub compute_errors: u64,
    pub value_bytes: u64,
    pub fanout_calls: u64,
    pub fanout_total: u64,
    pub fanout_max: u64,
    /// When the last measured request finished.
    pub last_finished: Option<Instant>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            latency: new_histogram(),
            first_record: new_histogram(),
            send_lag: new_histogram(),
            sent: 0,
            ok: 0,
            failed: 0,
            failed_by_kind: BTreeMap::new(),
            keys_requested: 0,
            keys_found: 0,
            keys_missing: 0,
            keys_failed: 0,
            wrong_values: 0,
            compute_errors: 0,
            value_bytes: 0,
            fanout_calls: 0,
            fanout_total: 0,
            fanout_max: 0,
            last_finished: None,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Tally {
    fn fail(&mut self, kind: &str, n: u64) {
        if n > 0 {
            self.failed += n;
            *self.failed_by_kind.entry(kind.to_string()).or_default() += n;
        }
    }

    fn record(&mut self, done: &Done) {
        let s = &done.sample;
        self.latency.saturating_record(micros(
            done.finished.saturating_duration_since(done.intended),
        ));
        if let Some(first) = s.first_record {
            self.first_record
                .saturating_record(micros(first.saturating_duration_since(done.intended)));
        }
        match &s.error {
            None => self.ok += 1,
            Some(kind) => self.fail(kind, 1),
        }
        self.keys_requested += s.keys_requested;
        self.keys_found += s.keys_found;
        self.keys_missing += s.keys_missing;
        self.keys_failed += s.keys_failed;
        self.wrong_values += s.wrong_values;
        self.compute_errors += s.compute_errors;
        self.value_bytes += s.value_bytes;
        if let Some(f) = s.fanout {
            self.fanout_calls += 1;
            self.fanout_total += f as u64;
            self.fanout_max = self.fanout_max.max(f as u64);
        }
        self.last_finished = self.last_finished.max(Some(done.finished));
    }

    /// Adds another task's tally to this one.
    pub fn merge(&mut self, other: Tally) {
        let _ = self.latency.add(&other.latency);
        let _ = self.first_record.add(&other.first_record);
        let _ = self.send_lag.add(&other.send_lag);
        self.sent += other.sent;
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, n) in other.failed_by_kind {
            *self.failed_by_kind.entry(k).or_default() += n;
        }
        self.keys_requested += other.keys_requested;
        self.keys_found += other.keys_found;
        self.keys_missing += other.keys_missing;
        self.keys_failed += other.keys_failed;
        self.wrong_values += other.wrong_values;
        self.compute_errors += other.compute_errors;
        self.value_bytes += other.value_bytes;
        self.fanout_calls += other.fanout_calls;
        self.fanout_total += other.fanout_total;
        self.fanout_max = self.fanout_max.max(other.fanout_max);
        self.last_finished = self.last_finished.max(other.last_finished);
    }
}

/// One finished request.
struct Done {
    measured: bool,
    intended: Instant,
    finished: Instant,
    sample: Sample,
}

/// How to drive a workload.
#[derive(Debug, Clone, Copy)]
pub struct DriveConfig {
    pub tasks: usize,
    /// Most requests in flight over all tasks; a task at its share waits for a completion
    /// (the wait counts in latency, which is measured from the intended start).
    pub max_in_flight: usize,
    /// How long after the end of the schedule in-flight requests are awaited.
    pub drain: Duration,
    pub seed: u64,
}

/// Runs `schedule` from `start` over `config.tasks` client tasks; returns the merged tally of the
/// measured requests.
pub async fn drive(
    schedule: Schedule,
    start: Instant,
    config: DriveConfig,
    workload: Arc<dyn Workload>,
    live: Arc<Live>,
) -> Tally {
    let tasks = config.tasks.max(1);
    let per_task_cap = config.max_in_flight.max(1).div_ceil(tasks);
    let deadline = start + schedule.end() + config.drain;
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let workload = workload.clone();
        let live = live.clone();
        let seed = task_seed(config.seed, task);
        handles.push(tokio::spawn(async move {
            run_task(
                schedule,
                start,
                task,
                tasks,
                per_task_cap,
                deadline,
                workload,
                live,
                StdRng::seed_from_u64(seed),
            )
            .await
        }));
    }
    merge_tasks(handles).await
}

/// Tokio's timer rounds deadlines up to the next millisecond, so a sleep until the due time
/// wakes up to ~1 ms late, which would be counted as latency. The driver wakes this much early
/// instead and measures an early request from its actual start.
const TIMER_SLACK: Duration = Duration::from_millis(1);

fn early(due: Instant) -> Instant {
    due.checked_sub(TIMER_SLACK).unwrap_or(due)
}

#[allow(clippy::too_many_arguments)]
async fn run_task(
    schedule: Schedule,
    start: Instant,
    task: usize,
    tasks: usize,
    cap: usize,
    deadline: Instant,
    workload: Arc<dyn Workload>,
    live: Arc<Live>,
    mut rng: StdRng,
) -> Tally {
    let mut tally = Tally::default();
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    let mut measured_in_flight: u64 = 0;
    let mut indices = schedule.indices(task, tasks);
    let mut next = indices.next();
    loop {
        let due = next.map(|i| start + schedule.offset(i));
        let can_send = next.is_some() && in_flight.len() < cap;
        tokio::select! {
            _ = sleep_until(due.map_or(deadline, early)), if can_send => {
                let i = next.expect("can_send implies a next request");
                let due = due.expect("can_send implies a due time");
                let measured = !schedule.is_warmup(i);
                let started = Instant::now();
                // Late: measured from the due time (coordinated omission corrected); early (by
                // at most the timer slack): from the actual start.
                let intended = due.min(started);
                if measured {
                    tally.sent += 1;
                    measured_in_flight += 1;
                    tally.send_lag.saturating_record(micros(started.saturating_duration_since(due)));
                }
                live.sent.fetch_add(1, Ordering::Relaxed);
                let request = workload.request(task, &mut rng);
                in_flight.spawn(async move {
                    let sample = request.await;
                    Done { measured, intended, finished: Instant::now(), sample }
                });
                next = indices.next();
            }
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                match joined {
                    Ok(done) => {
                        measured_in_flight -= u64::from(done.measured);
                        finished(&live, &mut tally, &done);
                    }
                    Err(e) => {
                        // A request task panicked (a bug): count it as a measured failure.
                        live.failed.fetch_add(1, Ordering::Relaxed);
                        measured_in_flight = measured_in_flight.saturating_sub(1);
                        tally.fail(if e.is_panic() { "panicked" } else { "cancelled" }, 1);
                    }
                }
            }
            _ = sleep_until(deadline), if next.is_none() && !in_flight.is_empty() => break,
            else => break,
        }
    }
    // Still running past the drain deadline: abandoned (JoinSet aborts them on drop).
    tally.fail("not_finished", measured_in_flight);
    in_flight.abort_all();
    tally
}

/// Counts a finished request in `live`, and in `tally` when it is measured.
fn finished(live: &Live, tally: &mut Tally, done: &Done) {
    let counter = if done.sample.error.is_none() {
        &live.ok
    } else {
        &live.failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
    live.max_latency_us.fetch_max(
        micros(done.finished.saturating_duration_since(done.intended)),
        Ordering::Relaxed,
    );
    if done.measured {
        tally.record(done);
    }
}

/// Runs `config.tasks` closed-loop callers from `start`: each sends its next request as soon as
/// its previous one finished (as `redis-benchmark`'s clients do) and starts none after `start +
/// warmup + duration`. Requests started before `start + warmup` are not measured; latency is
/// from each request's start. The throughput is what the system gives this many callers (no
/// schedule: `max_in_flight` and `drain` do not apply, each request ends by its own timeout).
pub async fn drive_closed(
    start: Instant,
    warmup: Duration,
    duration: Duration,
    config: DriveConfig,
    workload: Arc<dyn Workload>,
    live: Arc<Live>,
) -> Tally {
    let measured_start = start + warmup;
    let end = measured_start + duration;
    let mut handles = Vec::with_capacity(config.tasks.max(1));
    for task in 0..config.tasks.max(1) {
        let workload = workload.clone();
        let live = live.clone();
        let mut rng = StdRng::seed_from_u64(task_seed(config.seed, task));
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            sleep_until(start).await;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let measured = started >= measured_start;
                tally.sent += u64::from(measured);
                live.sent.fetch_add(1, Ordering::Relaxed);
                let sample = workload.request(task, &mut rng).await;
                let done = Done {
                    measured,
                    intended: started,
                    finished: Instant::now(),
                    sample,
                };
                finished(&live, &mut tally, &done);
            }
            tally
        }));
    }
    merge_tasks(handles).await
}

/// The seed of client task `task`'s key choice.
fn task_seed(seed: u64, task: usize) -> u64 {
    seed.wrapping_add((task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The merged tally of the client tasks.
async fn merge_tasks(handles: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut tally = Tally::default();
    for h in handles {
        match h.await {
            Ok(t) => tally.merge(t),
            Err(e) => tracing::error!("client task failed: {e}"),
        }
    }
    tally
}

/// Prints progress to stderr once a second until `stop` resolves; `total` is the requests to
/// send (none for closed-loop callers, whose `schedule` gives only the phases' times).
pub async fn report_progress(
    live: Arc<Live>,
    start: Instant,
    schedule: Schedule,
    total: Option<u64>,
    stop: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(stop);
    let (mut last_done, mut last_at) = (0u64, start);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            now = tick.tick() => {
                let sent = live.sent.load(Ordering::Relaxed);
                let ok = live.ok.load(Ordering::Relaxed);
                let failed = live.failed.load(Ordering::Relaxed);
                let done = ok + failed;
                let rate = (done - last_done) as f64 / now.duration_since(last_at).as_secs_f64().max(1e-3);
                (last_done, last_at) = (done, now);
                let at = now.duration_since(start);
                let phase = if at < schedule.measured_start() {
                    "warmup"
                } else if at < schedule.end() {
                    "run"
                } else {
                    "drain"
                };
                let max_ms = live.max_latency_us.swap(0, Ordering::Relaxed) as f64 / 1000.0;
                let total = total.map(|t| format!("/{t}")).unwrap_or_default();
                eprintln!(
                    "[{:>6.1}s {phase}] sent {sent}{total}, done {done} ({rate:.0} req/s), ok {ok}, failed {failed}, in flight {}, max latency {max_ms:.1} ms",
                    at.as_secs_f64(),
                    sent.saturating_sub(done)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use std::sync::Mutex;

    #[test]
    fn schedule_counts_rate_times_duration_and_stops_at_max_requests() {
        let s = Schedule::new(1000.0, Duration::from_secs(2), Duration::ZERO, None).unwrap();
        assert_eq!(s.total(), 2000);
        assert_eq!(s.measured(), 2000);
        let s = Schedule::new(10.0, Duration::from_millis(300), Duration::ZERO, None).unwrap();
        assert_eq!(s.total(), 3);
        let s = Schedule::new(1000.0, Duration::from_secs(2), Duration::ZERO, Some(500)).unwrap();
        assert_eq!(s.measured(), 500);
        let s = Schedule::new(
            100.0,
            Duration::from_secs(1),
            Duration::from_millis(500),
            Some(1000),
        )
        .unwrap();
        assert_eq!((s.total(), s.measured()), (150, 100));
        assert!(s.is_warmup(49) && !s.is_warmup(50));
        assert_eq!(s.measured_start(), Duration::from_millis(500));
        assert_eq!(s.end(), Duration::from_millis(1500));
        assert!(Schedule::new(0.0, Duration::from_secs(1), Duration::ZERO, None).is_err());
        assert!(Schedule::new(f64::NAN, Duration::from_secs(1), Duration::ZERO, None).is_err());
    }

    #[test]
    fn tasks_share_the_schedule_without_overlap_at_fixed_intervals() {
        let s = Schedule::new(250.0, Duration::from_secs(1), Duration::ZERO, None).unwrap();
        let mut all: Vec<u64> = (0..3).flat_map(|t| s.indices(t, 3)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..250).collect::<Vec<_>>());
        assert_eq!(s.offset(1), Duration::from_millis(4));
        assert_eq!(s.offset(125), Duration::from_millis(500));
        assert!(s.offset(249) < Duration::from_secs(1));
    }

    /// Sleeps `delay`, then answers; records when each request started.
    struct Slow {
        delay: Duration,
        started: Mutex<Vec<Instant>>,
        fail_every: u64,
        count: AtomicU64,
    }

    impl Workload for Slow {
        fn request(
            &self,
            _task: usize,
            rng: &mut StdRng,
        ) -> Pin<Box<dyn Future<Output = Sample> + Send + 'static>> {
            self.started.lock().unwrap().push(Instant::now());
            let n = self.count.fetch_add(1, Ordering::Relaxed);
            let fail = n.checked_rem(self.fail_every) == Some(0);
            let delay = self.delay;
            let key: u64 = rng.gen_range(0..1000);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Sample {
                    error: fail.then(|| "timeout".to_string()),
                    keys_requested: 1,
                    keys_found: u64::from(!fail && key < 1000),
                    keys_failed: u64::from(fail),
                    value_bytes: 100,
                    fanout: Some(2),
                    ..Sample::default()
                }
            })
        }
    }

    fn slow(delay: Duration, fail_every: u64) -> Arc<Slow> {
        Arc::new(Slow {
            delay,
            started: Mutex::new(Vec::new()),
            fail_every,
            count: AtomicU64::new(0),
        })
    }

    fn config(tasks: usize, max_in_flight: usize, drain: Duration) -> DriveConfig {
        DriveConfig {
            tasks,
            max_in_flight,
            drain,
            seed: 7,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn driver_is_open_loop_and_sends_exactly_the_schedule() {
        // 100 requests of 100 ms at 200/s from one task: closed-loop would take 10 s; open-loop
        // sends them all within the schedule's 0.5 s and finishes about 0.1 s later.
        let schedule =
            Schedule::new(200.0, Duration::from_millis(500), Duration::ZERO, None).unwrap();
        let workload = slow(Duration::from_millis(100), 10);
        let live = Arc::new(Live::default());
        let start = Instant::now();
        let tally = drive(
            schedule,
            start,
            config(1, 10_000, Duration::from_secs(5)),
            workload.clone(),
            live.clone(),
        )
        .await;
        let elapsed = start.elapsed();
        assert!(
            elapsed < Duration::from_secs(3),
            "took {elapsed:?}: not open-loop"
        );
        assert_eq!(tally.sent, 100);
        assert_eq!((tally.ok, tally.failed), (90, 10));
        assert_eq!(tally.failed_by_kind.get("timeout"), Some(&10));
        assert_eq!(tally.latency.len(), 100);
        assert!(
            tally.latency.min() >= 100_000,
            "latency below the request time"
        );
        assert_eq!(
            (tally.keys_requested, tally.keys_found, tally.keys_failed),
            (100, 90, 10)
        );
        assert_eq!((tally.fanout_calls, tally.fanout_max), (100, 2));
        assert_eq!(live.sent.load(Ordering::Relaxed), 100);
        // Sends follow the fixed interval: the last one is due at 495 ms (the scheduler may wake
        // up to 1 ms early to absorb the timer's rounding).
        let started = workload.started.lock().unwrap();
        let last = started.last().unwrap().duration_since(start);
        assert!(last >= Duration::from_millis(494), "last send at {last:?}");
        assert!(last < Duration::from_millis(1500), "last send at {last:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_callers_keep_one_request_each_in_flight() {
        // 3 callers, 20 ms a request, 100 ms of warmup then 300 ms measured: each caller sends
        // one request after another, about 5 in the warmup and 15 measured.
        let workload = slow(Duration::from_millis(20), 0);
        let live = Arc::new(Live::default());
        let start = Instant::now();
        let tally = drive_closed(
            start,
            Duration::from_millis(100),
            Duration::from_millis(300),
            config(3, 10_000, Duration::from_secs(5)),
            workload.clone(),
            live.clone(),
        )
        .await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(400),
            "ended at {elapsed:?}"
        );
        let started = workload.started.lock().unwrap().clone();
        // Never more than 3 in flight: request k + 3 starts after request k ended.
        for (a, b) in started.iter().zip(started.iter().skip(3)) {
            assert!(*b >= *a + Duration::from_millis(20), "{a:?} {b:?}");
        }
        assert!(
            (30..=48).contains(&tally.sent),
            "{} measured requests from 3 callers in 300 ms of 20 ms requests",
            tally.sent
        );
        assert_eq!(live.sent.load(Ordering::Relaxed), started.len() as u64);
        assert!(
            started.len() as u64 > tally.sent,
            "warmup requests are not measured"
        );
        assert_eq!((tally.ok, tally.latency.len()), (tally.sent, tally.sent));
        // Measured from each request's own start: about the 20 ms it takes.
        assert!(tally.latency.min() >= 20_000 && tally.latency.max() < 200_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn driver_stops_at_max_requests_and_skips_warmup_in_the_tally() {
        let schedule = Schedule::new(
            400.0,
            Duration::from_secs(10),
            Duration::from_millis(100),
            Some(25),
        )
        .unwrap();
        let workload = slow(Duration::from_millis(1), 0);
        let live = Arc::new(Live::default());
        let start = Instant::now();
        let tally = drive(
            schedule,
            start,
            config(3, 10_000, Duration::from_secs(5)),
            workload.clone(),
            live.clone(),
        )
        .await;
        assert!(start.elapsed() < Duration::from_secs(3));
        assert_eq!(live.sent.load(Ordering::Relaxed), 40 + 25);
        assert_eq!(workload.started.lock().unwrap().len(), 65);
        assert_eq!((tally.sent, tally.ok, tally.failed), (25, 25, 0));
        assert_eq!(tally.latency.len(), 25);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_still_running_after_the_drain_are_not_finished() {
        let schedule =
            Schedule::new(100.0, Duration::from_millis(50), Duration::ZERO, None).unwrap();
        let workload = slow(Duration::from_secs(30), 0);
        let start = Instant::now();
        let tally = drive(
            schedule,
            start,
            config(2, 10_000, Duration::from_millis(100)),
            workload,
            Arc::new(Live::default()),
        )
        .await;
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(tally.sent, 5);
        assert_eq!(tally.failed_by_kind.get("not_finished"), Some(&5));
        assert_eq!(tally.ok, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_flight_cap_delays_sends_and_the_delay_counts_as_latency() {
        // One request at a time, 50 ms each, due every 10 ms: the schedule slips and latency
        // (from the intended start) grows well beyond the 50 ms service time.
        let schedule =
            Schedule::new(100.0, Duration::from_millis(100), Duration::ZERO, None).unwrap();
        let workload = slow(Duration::from_millis(50), 0);
        let tally = drive(
            schedule,
            Instant::now(),
            config(1, 1, Duration::from_secs(5)),
            workload,
            Arc::new(Live::default()),
        )
        .await;
        assert_eq!(tally.ok, 10);
        assert!(
            tally.latency.max() >= 400_000,
            "max {}",
            tally.latency.max()
        );
        assert!(
            tally.send_lag.max() >= 350_000,
            "lag {}",
            tally.send_lag.max()
        );
    }
}
