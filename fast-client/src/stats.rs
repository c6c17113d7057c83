//! Client counters, readable at any time through [`ClientStats`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use rialto_protocol::metrics::LatencyHistogram;

/// Live counters, updated with relaxed atomics on the request path.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) keys_requested: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) reroutes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) version_swaps: AtomicU64,
    pub(crate) routing_updates: AtomicU64,
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connection_failures: AtomicU64,
    pub(crate) batch_gets: AtomicU64,
    pub(crate) computes: AtomicU64,
    pub(crate) fanout_total: AtomicU64,
    pub(crate) fanout_max: AtomicU64,
    pub(crate) long_tail_retries: AtomicU64,
    pub(crate) long_tail_retries_won: AtomicU64,
    pub(crate) long_tail_retries_late: AtomicU64,
    pub(crate) long_tail_retries_over_budget: AtomicU64,
    pub(crate) instances_blocked: AtomicU64,
    pub(crate) checksums_verified: AtomicU64,
    pub(crate) checksum_mismatches: AtomicU64,
    pub(crate) quota_refusals: AtomicU64,
    pub(crate) gets_coalesced: AtomicU64,
    /// Duration of single-get calls, retries included.
    pub(crate) get_latency: LatencyHistogram,
    /// Duration of batch-get calls, from the call to its last key.
    pub(crate) batch_get_latency: LatencyHistogram,
    /// Duration of read-compute calls, from the call to its last key.
    pub(crate) compute_latency: LatencyHistogram,
}

/// A snapshot of the client's counters since it connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP/2 requests sent (single gets and per-server batch-get requests, retries included).
    pub requests: u64,
    /// Keys asked for by the application (`get` counts one, `batch_get` counts its keys).
    pub keys_requested: u64,
    /// Requests re-sent to another replica after a retryable failure (not long-tail retries).
    pub retries: u64,
    /// Reads sent again, whole, to a newer current version after failing on the version they
    /// were routed to (which was replaced, and may be gone, while they were in flight).
    pub reroutes: u64,
    /// Calls that returned an error to the application.
    pub errors: u64,
    /// Calls that ran out of `request_timeout`.
    pub timeouts: u64,
    /// Times the routing table moved to another version.
    pub version_swaps: u64,
    /// Times the routing table was rebuilt and changed.
    pub routing_updates: u64,
    /// HTTP/2 connections opened.
    pub connections_opened: u64,
    /// Failed connection attempts.
    pub connection_failures: u64,
    /// Batch-get calls (plain and streaming) that sent at least one request.
    pub batch_gets: u64,
    /// Read-compute calls (plain and streaming) that sent at least one request.
    pub computes: u64,
    /// Sum over batch-get and compute calls of their fanout (distinct servers of the initial
    /// plan).
    pub fanout_total: u64,
    /// Largest fanout of one batch-get or compute call.
    pub fanout_max: u64,
    /// Long-tail retries sent (requests hedged to another replica after their threshold).
    pub long_tail_retries: u64,
    /// Long-tail retries that delivered the first answer for at least one key.
    pub long_tail_retries_won: u64,
    /// Long-tail retries dropped because the client's own timer fired late (client overloaded).
    pub long_tail_retries_late: u64,
    /// Long-tail retries not sent because the retry budget was spent.
    pub long_tail_retries_over_budget: u64,
    /// Times a storage server was blocked as unhealthy.
    pub instances_blocked: u64,
    /// Storage servers blocked at the time of the snapshot.
    pub instances_blocked_now: u64,
    /// Receive blocks (memory batch-get responses are copied into) taken from the receive pool.
    pub receive_blocks_reused: u64,
    /// Receive blocks newly allocated (none free in the pool of their size, or the pool is off).
    pub receive_blocks_allocated: u64,
    /// Bytes of free receive blocks the pool keeps now (at most `receive_pool_bytes`).
    pub receive_pool_free_bytes: u64,
    /// Values whose checksum was verified.
    pub checksums_verified: u64,
    /// Values that failed their checksum (each retried on another replica, never returned).
    pub checksum_mismatches: u64,
    /// Calls refused because the store's read quota was used up.
    pub quota_refusals: u64,
    /// Single gets sent within a batch-get shared with other gets started while they were in
    /// flight ([`ClientConfig::coalesce_gets`](crate::ClientConfig::coalesce_gets)); each such
    /// batch counts in `batch_gets`, and its requests in `requests`.
    pub gets_coalesced: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ClientStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            requests: load(&self.requests),
            keys_requested: load(&self.keys_requested),
            retries: load(&self.retries),
            reroutes: load(&self.reroutes),
            errors: load(&self.errors),
            timeouts: load(&self.timeouts),
            version_swaps: load(&self.version_swaps),
            routing_updates: load(&self.routing_updates),
            connections_opened: load(&self.connections_opened),
            connection_failures: load(&self.connection_failures),
            batch_gets: load(&self.batch_gets),
            computes: load(&self.computes),
            fanout_total: load(&self.fanout_total),
            fanout_max: load(&self.fanout_max),
            long_tail_retries: load(&self.long_tail_retries),
            long_tail_retries_won: load(&self.long_tail_retries_won),
            long_tail_retries_late: load(&self.long_tail_retries_late),
            long_tail_retries_over_budget: load(&self.long_tail_retries_over_budget),
            instances_blocked: load(&self.instances_blocked),
            checksums_verified: load(&self.checksums_verified),
            checksum_mismatches: load(&self.checksum_mismatches),
            quota_refusals: load(&self.quota_refusals),
            gets_coalesced: load(&self.gets_coalesced),
            // Filled in by `Client::stats` from the instances and the receive pool.
            instances_blocked_now: 0,
            receive_blocks_reused: 0,
            receive_blocks_allocated: 0,
            receive_pool_free_bytes: 0,
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one batch-get (or, with `compute`, read-compute) call that fanned out to `fanout`
    /// servers.
    pub(crate) fn batch_fanout(&self, fanout: u64, compute: bool) {
        let calls = if compute {
            &self.computes
        } else {
            &self.batch_gets
        };
        Counters::add(calls, 1);
        Counters::add(&self.fanout_total, fanout);
        self.fanout_max.fetch_max(fanout, Ordering::Relaxed);
    }
}

impl ClientStats {
    /// Every counter as `(name, help, value, is_gauge)`, for [`render_prometheus`].
    fn series(&self) -> [(&'static str, &'static str, u64, bool); 27] {
        [
            (
                "requests_total",
                "HTTP/2 requests sent, retries included",
                self.requests,
                false,
            ),
            (
                "keys_requested_total",
                "Keys asked for by the application",
                self.keys_requested,
                false,
            ),
            (
                "retries_total",
                "Requests re-sent to another replica after a retryable failure",
                self.retries,
                false,
            ),
            (
                "reroutes_total",
                "Reads sent again to a newer current version after failing on a replaced one",
                self.reroutes,
                false,
            ),
            (
                "errors_total",
                "Calls that returned an error to the application",
                self.errors,
                false,
            ),
            (
                "timeouts_total",
                "Calls that ran out of request_timeout",
                self.timeouts,
                false,
            ),
            (
                "version_swaps_total",
                "Times the routing table moved to another version",
                self.version_swaps,
                false,
            ),
            (
                "routing_updates_total",
                "Times the routing table changed",
                self.routing_updates,
                false,
            ),
            (
                "connections_opened_total",
                "HTTP/2 connections opened",
                self.connections_opened,
                false,
            ),
            (
                "connection_failures_total",
                "Failed connection attempts",
                self.connection_failures,
                false,
            ),
            (
                "batch_gets_total",
                "Batch-get calls",
                self.batch_gets,
                false,
            ),
            ("computes_total", "Read-compute calls", self.computes, false),
            (
                "fanout_servers_total",
                "Sum of batch-get and compute fanouts",
                self.fanout_total,
                false,
            ),
            (
                "fanout_max",
                "Largest fanout of one batch-get or compute call",
                self.fanout_max,
                true,
            ),
            (
                "long_tail_retries_total",
                "Long-tail retries sent",
                self.long_tail_retries,
                false,
            ),
            (
                "long_tail_retries_won_total",
                "Long-tail retries that answered first",
                self.long_tail_retries_won,
                false,
            ),
            (
                "long_tail_retries_late_total",
                "Long-tail retries dropped: the client's timer fired late",
                self.long_tail_retries_late,
                false,
            ),
            (
                "long_tail_retries_over_budget_total",
                "Long-tail retries not sent: budget spent",
                self.long_tail_retries_over_budget,
                false,
            ),
            (
                "instances_blocked_total",
                "Times a storage server was blocked as unhealthy",
                self.instances_blocked,
                false,
            ),
            (
                "instances_blocked",
                "Storage servers blocked now",
                self.instances_blocked_now,
                true,
            ),
            (
                "receive_blocks_reused_total",
                "Receive blocks reused from the pool",
                self.receive_blocks_reused,
                false,
            ),
            (
                "receive_blocks_allocated_total",
                "Receive blocks newly allocated",
                self.receive_blocks_allocated,
                false,
            ),
            (
                "receive_pool_free_bytes",
                "Bytes of free receive blocks kept",
                self.receive_pool_free_bytes,
                true,
            ),
            (
                "checksums_verified_total",
                "Values whose checksum was verified",
                self.checksums_verified,
                false,
            ),
            (
                "checksum_mismatches_total",
                "Values that failed their checksum",
                self.checksum_mismatches,
                false,
            ),
            (
                "quota_refusals_total",
                "Calls refused over the store's read quota",
                self.quota_refusals,
                false,
            ),
            (
                "gets_coalesced_total",
                "Single gets sent within a batch-get shared with other gets",
                self.gets_coalesced,
                false,
            ),
        ]
    }
}

/// The client's counters and call latency histograms as Prometheus text, labelled with the store.
pub(crate) fn render_prometheus(stats: &ClientStats, counters: &Counters, store: &str) -> String {
    let mut out = String::with_capacity(8192);
    let labels = format!("store=\"{store}\"");
    for (name, help, value, gauge) in stats.series() {
        let kind = if gauge { "gauge" } else { "counter" };
        let _ = writeln!(out, "# HELP rialto_client_{name} {help}.");
        let _ = writeln!(out, "# TYPE rialto_client_{name} {kind}");
        let _ = writeln!(out, "rialto_client_{name}{{{labels}}} {value}");
    }
    for (name, help, histogram) in [
        (
            "get_seconds",
            "Single-get call duration",
            &counters.get_latency,
        ),
        (
            "batch_get_seconds",
            "Batch-get call duration",
            &counters.batch_get_latency,
        ),
        (
            "compute_seconds",
            "Read-compute call duration",
            &counters.compute_latency,
        ),
    ] {
        let _ = writeln!(out, "# HELP rialto_client_{name} {help}.");
        let _ = writeln!(out, "# TYPE rialto_client_{name} histogram");
        histogram.render(&mut out, &format!("rialto_client_{name}"), &labels);
    }
    out
}
