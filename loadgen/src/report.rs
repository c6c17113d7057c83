//! The result of a `run`: what was asked, what happened, printed for people and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use rialto_fast_client::ClientStats;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to one hour, with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    /// Summarizes `h`; all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// The configuration a run used (echoed into the report).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunConfig {
    pub store: String,
    pub mode: String,
    /// The open loop's schedule (0 for closed-loop callers).
    pub rate_per_s: f64,
    /// Callers (`tasks`) each sending the next request when the previous one finished.
    pub closed_loop: bool,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub max_requests: Option<u64>,
    pub key_space: u64,
    pub batch_keys: usize,
    pub tasks: usize,
    pub clients: usize,
    pub max_in_flight: usize,
    pub seed: u64,
    pub request_timeout_ms: u64,
    pub long_tail_retry: bool,
    pub group_routing: bool,
    pub sub_request_keys: usize,
    pub receive_pool_bytes: usize,
    pub verify_checksums: bool,
    pub coalesce_gets: bool,
}

/// Request counts of the measured phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestCounts {
    /// Requests the schedule called for.
    pub scheduled: u64,
    /// Requests actually started.
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failed requests by kind (client error kinds, `incomplete`, `not_finished`, …).
    pub failed_by_kind: BTreeMap<String, u64>,
}

/// Key and value counts of the measured phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KeyCounts {
    pub requested: u64,
    pub found: u64,
    /// Keys the store answered as absent (none expected when the key space is the dataset).
    pub missing: u64,
    /// Keys not answered (failed or timed out).
    pub failed: u64,
    /// Values whose index field did not match their key (should always be 0).
    pub wrong_values: u64,
    /// Keys whose compute result held an operation's error (a vector of another length than
    /// the stored one, a field the value lacks); compute mode only.
    pub compute_errors: u64,
    pub value_bytes: u64,
}

/// Throughput of the measured phase, over `elapsed_s` (first intended send to last completion).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Throughput {
    pub elapsed_s: f64,
    /// Completed requests (ok or failed) per second.
    pub requests_per_s: f64,
    pub ok_requests_per_s: f64,
    /// Keys answered (found or missing) per second.
    pub keys_per_s: f64,
    /// Megabytes (10^6) of values received per second.
    pub value_mb_per_s: f64,
}

/// Fanout per batch-get (distinct servers of the initial plan).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Fanout {
    /// Where the numbers come from: `completeness` (per streamed call) or `client_stats`.
    pub source: String,
    pub calls: u64,
    pub mean: f64,
    pub max: u64,
}

/// Retry and health counters of the client(s), as deltas over the measured phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetryCounts {
    pub long_tail_sent: u64,
    pub long_tail_won: u64,
    /// Dropped because the client's retry timer fired late (client overloaded).
    pub long_tail_dropped_late: u64,
    /// Not sent because the retry budget was spent.
    pub long_tail_over_budget: u64,
    /// Re-sends after errors (not long-tail).
    pub error_retries: u64,
    /// HTTP/2 requests sent by the client(s).
    pub http_requests: u64,
    /// Single gets sent within a batch-get shared with other gets (the client's `coalesce_gets`).
    pub gets_coalesced: u64,
    pub client_timeouts: u64,
    pub instances_blocked: u64,
    pub connections_opened: u64,
    pub connection_failures: u64,
}

/// The client's receive memory over the measured phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReceiveCounts {
    /// Receive blocks taken from the client's receive pool.
    pub blocks_reused: u64,
    /// Receive blocks newly allocated.
    pub blocks_allocated: u64,
    /// Bytes of free blocks the pool(s) kept at the end.
    pub pool_free_bytes: u64,
}

impl ReceiveCounts {
    /// The receive counters of a stats delta.
    pub fn from_stats(d: &ClientStats) -> ReceiveCounts {
        ReceiveCounts {
            blocks_reused: d.receive_blocks_reused,
            blocks_allocated: d.receive_blocks_allocated,
            pool_free_bytes: d.receive_pool_free_bytes,
        }
    }
}

/// Everything a run reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub config: RunConfig,
    pub requests: RequestCounts,
    pub keys: KeyCounts,
    pub throughput: Throughput,
    /// Latency from each request's intended send time to its completion (coordinated omission
    /// corrected).
    pub latency: LatencySummary,
    /// Streaming only: intended send time to the first record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_first_record: Option<LatencySummary>,
    /// How late requests were actually started against the schedule (client saturation).
    pub send_lag: LatencySummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout: Option<Fanout>,
    pub retries: RetryCounts,
    pub receive: ReceiveCounts,
}

/// `after − before`, summed over clients; `fanout_max` is the largest since the clients started.
pub fn stats_delta(before: &[ClientStats], after: &[ClientStats]) -> ClientStats {
    let mut d = ClientStats::default();
    for (b, a) in before.iter().zip(after) {
        let sub = |x: u64, y: u64| x.saturating_sub(y);
        d.requests += sub(a.requests, b.requests);
        d.keys_requested += sub(a.keys_requested, b.keys_requested);
        d.retries += sub(a.retries, b.retries);
        d.reroutes += sub(a.reroutes, b.reroutes);
        d.errors += sub(a.errors, b.errors);
        d.timeouts += sub(a.timeouts, b.timeouts);
        d.version_swaps += sub(a.version_swaps, b.version_swaps);
        d.routing_updates += sub(a.routing_updates, b.routing_updates);
        d.connections_opened += sub(a.connections_opened, b.connections_opened);
        d.connection_failures += sub(a.connection_failures, b.connection_failures);
        d.batch_gets += sub(a.batch_gets, b.batch_gets);
        d.computes += sub(a.computes, b.computes);
        d.fanout_total += sub(a.fanout_total, b.fanout_total);
        d.fanout_max = d.fanout_max.max(a.fanout_max);
        d.long_tail_retries += sub(a.long_tail_retries, b.long_tail_retries);
        d.long_tail_retries_won += sub(a.long_tail_retries_won, b.long_tail_retries_won);
        d.long_tail_retries_late += sub(a.long_tail_retries_late, b.long_tail_retries_late);
        d.long_tail_retries_over_budget += sub(
            a.long_tail_retries_over_budget,
            b.long_tail_retries_over_budget,
        );
        d.instances_blocked += sub(a.instances_blocked, b.instances_blocked);
        d.instances_blocked_now += a.instances_blocked_now;
        d.receive_blocks_reused += sub(a.receive_blocks_reused, b.receive_blocks_reused);
        d.receive_blocks_allocated += sub(a.receive_blocks_allocated, b.receive_blocks_allocated);
        d.receive_pool_free_bytes += a.receive_pool_free_bytes;
        d.gets_coalesced += sub(a.gets_coalesced, b.gets_coalesced);
    }
    d
}

impl RetryCounts {
    /// The retry counters of a stats delta.
    pub fn from_stats(d: &ClientStats) -> RetryCounts {
        RetryCounts {
            long_tail_sent: d.long_tail_retries,
            long_tail_won: d.long_tail_retries_won,
            long_tail_dropped_late: d.long_tail_retries_late,
            long_tail_over_budget: d.long_tail_retries_over_budget,
            error_retries: d.retries,
            http_requests: d.requests,
            gets_coalesced: d.gets_coalesced,
            client_timeouts: d.timeouts,
            instances_blocked: d.instances_blocked,
            connections_opened: d.connections_opened,
            connection_failures: d.connection_failures,
        }
    }
}

impl Throughput {
    /// Rates of `requests` completed requests, `keys` answered keys and `bytes` value bytes over
    /// `elapsed_s` seconds.
    pub fn of(elapsed_s: f64, requests: u64, ok: u64, keys: u64, bytes: u64) -> Throughput {
        let per_s = |n: u64| {
            if elapsed_s > 0.0 {
                n as f64 / elapsed_s
            } else {
                0.0
            }
        };
        Throughput {
            elapsed_s,
            requests_per_s: per_s(requests),
            ok_requests_per_s: per_s(ok),
            keys_per_s: per_s(keys),
            value_mb_per_s: per_s(bytes) / 1e6,
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn line(out: &mut String, label: &str, l: &LatencySummary) {
    let _ = writeln!(
        out,
        "  {label:<22} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.p999_us),
        ms(l.max_us),
        l.count
    );
}

impl Report {
    /// The report for people.
    pub fn human(&self) -> String {
        let c = &self.config;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "rialto-loadgen run: store {} mode {} {} for {}s (warmup {}s), {} keys/request, key space {}, {} tasks, {} clients, long-tail retry {}, group routing {}, sub-requests of at most {} keys, receive pool {} bytes, checksums {}, gets coalesced {}",
            c.store,
            c.mode,
            if c.closed_loop {
                "closed-loop".to_string()
            } else {
                format!("at {} req/s", c.rate_per_s)
            },
            c.duration_s,
            c.warmup_s,
            c.batch_keys,
            c.key_space,
            c.tasks,
            c.clients,
            if c.long_tail_retry { "on" } else { "off" },
            if c.group_routing { "on" } else { "off" },
            c.sub_request_keys,
            c.receive_pool_bytes,
            if c.verify_checksums { "verified" } else { "not verified" },
            if c.coalesce_gets { "on" } else { "off" },
        );
        let r = &self.requests;
        let _ = writeln!(
            out,
            "  requests: {} scheduled, {} sent, {} ok, {} failed{}",
            r.scheduled,
            r.sent,
            r.ok,
            r.failed,
            if r.failed_by_kind.is_empty() {
                String::new()
            } else {
                format!(" {:?}", r.failed_by_kind)
            }
        );
        let t = &self.throughput;
        let _ = writeln!(
            out,
            "  throughput: {:.1} req/s ({:.1} ok), {:.0} keys/s, {:.2} MB/s of values over {:.2}s",
            t.requests_per_s, t.ok_requests_per_s, t.keys_per_s, t.value_mb_per_s, t.elapsed_s
        );
        let k = &self.keys;
        let _ = writeln!(
            out,
            "  keys: {} requested, {} found, {} missing, {} failed, {} wrong values{}",
            k.requested,
            k.found,
            k.missing,
            k.failed,
            k.wrong_values,
            if k.compute_errors > 0 {
                format!(", {} compute errors", k.compute_errors)
            } else {
                String::new()
            }
        );
        line(&mut out, "latency:", &self.latency);
        if let Some(ttfr) = &self.time_to_first_record {
            line(&mut out, "time to first record:", ttfr);
        }
        line(&mut out, "send lag:", &self.send_lag);
        if let Some(f) = &self.fanout {
            let _ = writeln!(
                out,
                "  fanout per batch-get: mean {:.2}, max {} over {} calls ({})",
                f.mean, f.max, f.calls, f.source
            );
        }
        let x = &self.retries;
        let _ = writeln!(
            out,
            "  long-tail retries: {} sent, {} won, {} dropped late, {} over budget; {} error retries, {} client timeouts, {} instances blocked, {} HTTP/2 requests, {} gets coalesced",
            x.long_tail_sent,
            x.long_tail_won,
            x.long_tail_dropped_late,
            x.long_tail_over_budget,
            x.error_retries,
            x.client_timeouts,
            x.instances_blocked,
            x.http_requests,
            x.gets_coalesced
        );
        let r = &self.receive;
        let _ = writeln!(
            out,
            "  receive blocks: {} reused, {} allocated; {} bytes kept free",
            r.blocks_reused, r.blocks_allocated, r.pool_free_bytes
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_reports_percentiles_in_microseconds() {
        let mut h = new_histogram();
        for us in 1..=10_000u64 {
            h.record(us).unwrap();
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 10_000);
        // 3 significant digits: within 0.1 % of the exact percentile.
        let near =
            |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001 + 1.0;
        assert!(near(s.p50_us, 5_000), "p50 {}", s.p50_us);
        assert!(near(s.p90_us, 9_000), "p90 {}", s.p90_us);
        assert!(near(s.p99_us, 9_900), "p99 {}", s.p99_us);
        assert!(near(s.p999_us, 9_990), "p99.9 {}", s.p999_us);
        assert!(near(s.max_us, 10_000), "max {}", s.max_us);
        assert!((s.mean_us - 5_000.5).abs() < 10.0, "mean {}", s.mean_us);
        assert_eq!(
            LatencySummary::of(&new_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn stats_delta_sums_clients_and_keeps_the_fanout_max() {
        let before = [
            ClientStats {
                long_tail_retries: 5,
                batch_gets: 10,
                fanout_total: 30,
                fanout_max: 3,
                ..Default::default()
            },
            ClientStats::default(),
        ];
        let after = [
            ClientStats {
                long_tail_retries: 8,
                batch_gets: 20,
                fanout_total: 60,
                fanout_max: 3,
                ..Default::default()
            },
            ClientStats {
                long_tail_retries: 1,
                batch_gets: 4,
                fanout_total: 16,
                fanout_max: 4,
                receive_blocks_reused: 7,
                receive_pool_free_bytes: 65_536,
                ..Default::default()
            },
        ];
        let d = stats_delta(&before, &after);
        assert_eq!(d.receive_blocks_reused, 7);
        assert_eq!(d.receive_pool_free_bytes, 65_536);
        assert_eq!(d.long_tail_retries, 4);
        assert_eq!(d.batch_gets, 14);
        assert_eq!(d.fanout_total, 46);
        assert_eq!(d.fanout_max, 4);
    }

    #[test]
    fn report_serializes_with_its_sections_and_prints() {
        let mut report = Report::default();
        report.config.mode = "stream".into();
        report.requests.failed_by_kind.insert("timeout".into(), 2);
        report.time_to_first_record = Some(LatencySummary::default());
        report.throughput = Throughput::of(2.0, 100, 98, 500_000, 512_000_000);
        assert_eq!(report.throughput.keys_per_s, 250_000.0);
        assert_eq!(report.throughput.value_mb_per_s, 256.0);
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "config",
            "requests",
            "keys",
            "throughput",
            "latency",
            "time_to_first_record",
            "send_lag",
            "retries",
            "receive",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(json["requests"]["failed_by_kind"]["timeout"], 2);
        assert!(json.get("fanout").is_none());
        let text = report.human();
        assert!(text.contains("time to first record"), "{text}");
        assert!(text.contains("\"timeout\": 2"), "{text}");
        assert!(text.contains("receive blocks: 0 reused"), "{text}");
    }
}
