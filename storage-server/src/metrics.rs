//! Counters of one storage server, readable by tests and rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use rialto_protocol::meta::ReplicaState;
pub use rialto_protocol::metrics::LatencyHistogram;
use rialto_protocol::ErrorCode;

/// The routes counted in [`ServerMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Get = 0,
    BatchGet = 1,
    Health = 2,
    Metrics = 3,
    /// Any path that is not a known endpoint.
    Unknown = 4,
    Dictionary = 5,
    Compute = 6,
}

impl RouteKind {
    const ALL: [RouteKind; 7] = [
        RouteKind::Get,
        RouteKind::BatchGet,
        RouteKind::Health,
        RouteKind::Metrics,
        RouteKind::Unknown,
        RouteKind::Dictionary,
        RouteKind::Compute,
    ];

    fn name(self) -> &'static str {
        match self {
            RouteKind::Get => "get",
            RouteKind::BatchGet => "batch_get",
            RouteKind::Health => "health",
            RouteKind::Metrics => "metrics",
            RouteKind::Unknown => "unknown",
            RouteKind::Dictionary => "dictionary",
            RouteKind::Compute => "compute",
        }
    }
}

const STATES: [ReplicaState; 5] = [
    ReplicaState::Offline,
    ReplicaState::Bootstrap,
    ReplicaState::Online,
    ReplicaState::Error,
    ReplicaState::Dropped,
];

fn state_index(state: ReplicaState) -> usize {
    STATES.iter().position(|s| *s == state).unwrap_or(0)
}

fn code_index(code: ErrorCode) -> usize {
    ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0)
}

/// Server counters. All methods are lock-free.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    requests: [AtomicU64; RouteKind::ALL.len()],
    /// Keys asked for by get and batch-get.
    pub keys_requested: AtomicU64,
    /// Keys answered with a value.
    pub keys_found: AtomicU64,
    /// Keys not in the store.
    pub keys_missing: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Data records (PUT/DELETE) applied by ingestion.
    pub records_ingested: AtomicU64,
    /// Redelivered records skipped by validation.
    pub duplicates_skipped: AtomicU64,
    /// Version-topic records after END_OF_PUSH signed neither by the push nor by a partition
    /// leader, dropped unapplied (authorization on).
    pub unauthenticated_copies_dropped: AtomicU64,
    /// Responses reset because the client granted no flow-control window for the send timeout.
    pub responses_stalled: AtomicU64,
    /// Chunked real-time values left out because their first chunks precede the replay.
    pub incomplete_chunked_values: AtomicU64,
    /// SST files written and ingested by sorted pushes.
    pub sst_files_ingested: AtomicU64,
    /// Read requests delayed by fault injection (tests and benchmarks only).
    pub faults_delayed: AtomicU64,
    /// Read requests failed by fault injection (tests and benchmarks only).
    pub faults_failed: AtomicU64,
    replicas: [AtomicI64; 5],
    /// Batch-get: from the request's arrival to its keys decoded (body upload and parsing).
    pub batch_get_request: LatencyHistogram,
    /// Batch-get: from the request's arrival to its first response chunk handed to HTTP/2.
    pub batch_get_first_chunk: LatencyHistogram,
    /// Batch-get: from the request's arrival to its last chunk handed to HTTP/2.
    pub batch_get_total: LatencyHistogram,
}

impl ServerMetrics {
    /// Counts one request on `route`.
    pub fn count_request(&self, route: RouteKind) {
        self.requests[route as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Requests seen on `route`.
    pub fn requests(&self, route: RouteKind) -> u64 {
        self.requests[route as usize].load(Ordering::Relaxed)
    }
    /// Counts one error answer (a whole-request error or a per-key error).
    pub fn count_error(&self, code: ErrorCode) {
        self.errors[code_index(code)].fetch_add(1, Ordering::Relaxed);
    }
    /// Errors answered with `code`.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors[code_index(code)].load(Ordering::Relaxed)
    }
    /// Records a replica moving from `from` (None: new replica) to `to` (None: replica removed).
    pub fn replica_transition(&self, from: Option<ReplicaState>, to: Option<ReplicaState>) {
        if let Some(f) = from {
            self.replicas[state_index(f)].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(t) = to {
            self.replicas[state_index(t)].fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Replicas currently in `state` on this server.
    pub fn replicas_in(&self, state: ReplicaState) -> i64 {
        self.replicas[state_index(state)].load(Ordering::Relaxed)
    }
    /// Shorthand for reading one of the public counters.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition of every counter.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# TYPE rialto_server_requests_total counter\n");
        for r in RouteKind::ALL {
            let _ = writeln!(
                out,
                "rialto_server_requests_total{{route=\"{}\"}} {}",
                r.name(),
                self.requests(r)
            );
        }
        for (name, c) in [
            ("rialto_server_keys_requested_total", &self.keys_requested),
            ("rialto_server_keys_found_total", &self.keys_found),
            ("rialto_server_keys_missing_total", &self.keys_missing),
            (
                "rialto_server_records_ingested_total",
                &self.records_ingested,
            ),
            (
                "rialto_server_sst_files_ingested_total",
                &self.sst_files_ingested,
            ),
            (
                "rialto_server_duplicates_skipped_total",
                &self.duplicates_skipped,
            ),
            (
                "rialto_server_unauthenticated_copies_dropped_total",
                &self.unauthenticated_copies_dropped,
            ),
            (
                "rialto_server_responses_stalled_total",
                &self.responses_stalled,
            ),
            (
                "rialto_server_incomplete_chunked_values_total",
                &self.incomplete_chunked_values,
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE rialto_server_faults_injected_total counter\n");
        for (kind, c) in [
            ("delay", &self.faults_delayed),
            ("error", &self.faults_failed),
        ] {
            let _ = writeln!(
                out,
                "rialto_server_faults_injected_total{{kind=\"{kind}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE rialto_server_errors_total counter\n");
        for code in ErrorCode::ALL {
            let _ = writeln!(
                out,
                "rialto_server_errors_total{{code=\"{}\"}} {}",
                code.name(),
                self.errors(code)
            );
        }
        out.push_str("# TYPE rialto_server_replicas gauge\n");
        for s in STATES {
            let _ = writeln!(
                out,
                "rialto_server_replicas{{state=\"{s}\"}} {}",
                self.replicas_in(s)
            );
        }
        let name = "rialto_server_batch_get_seconds";
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (phase, histogram) in [
            ("request", &self.batch_get_request),
            ("first_chunk", &self.batch_get_first_chunk),
            ("total", &self.batch_get_total),
        ] {
            histogram.render(&mut out, name, &format!("phase=\"{phase}\""));
        }
        out
    }
}

/// Bytes of one store version on this server (sum over its ONLINE replicas here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VersionBytes {
    pub disk: u64,
    pub memory: u64,
}

/// Prometheus text of the storage gauges: bytes per store version, and the shared block cache.
pub fn render_storage(
    versions: &BTreeMap<(String, u32), VersionBytes>,
    block_cache_used: usize,
    block_cache_capacity: usize,
) -> String {
    let mut out = String::with_capacity(256 + versions.len() * 160);
    for (name, pick) in [
        (
            "rialto_server_store_disk_bytes",
            (|b: &VersionBytes| b.disk) as fn(&VersionBytes) -> u64,
        ),
        ("rialto_server_store_memory_bytes", |b: &VersionBytes| {
            b.memory
        }),
    ] {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for ((store, version), bytes) in versions {
            let _ = writeln!(
                out,
                "{name}{{store=\"{store}\",version=\"{version}\"}} {}",
                pick(bytes)
            );
        }
    }
    let _ = writeln!(
        out,
        "# TYPE rialto_server_block_cache_bytes gauge\n\
         rialto_server_block_cache_bytes{{kind=\"used\"}} {block_cache_used}\n\
         rialto_server_block_cache_bytes{{kind=\"capacity\"}} {block_cache_capacity}"
    );
    out
}

/// A replica of a hybrid version following real-time writes on this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowingReplica {
    pub store: String,
    pub version: u32,
    pub partition: u32,
    /// Real-time records not yet applied; `None` until measured.
    pub lag: Option<u64>,
    pub leader: bool,
}

/// Prometheus text of the hybrid gauges: real-time lag and leadership per replica.
pub fn render_realtime(replicas: &[FollowingReplica]) -> String {
    let mut out = String::with_capacity(128 + replicas.len() * 200);
    let _ = writeln!(out, "# TYPE rialto_server_realtime_lag_records gauge");
    for r in replicas {
        if let Some(lag) = r.lag {
            let _ = writeln!(
                out,
                "rialto_server_realtime_lag_records{{store=\"{}\",version=\"{}\",partition=\"{}\"}} {lag}",
                r.store, r.version, r.partition
            );
        }
    }
    let _ = writeln!(out, "# TYPE rialto_server_partition_leader gauge");
    for r in replicas {
        let _ = writeln!(
            out,
            "rialto_server_partition_leader{{store=\"{}\",version=\"{}\",partition=\"{}\"}} {}",
            r.store,
            r.version,
            r.partition,
            u8::from(r.leader)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_realtime_gauges() {
        let text = render_realtime(&[
            FollowingReplica {
                store: "feed".into(),
                version: 2,
                partition: 5,
                lag: Some(42),
                leader: true,
            },
            FollowingReplica {
                store: "feed".into(),
                version: 2,
                partition: 6,
                lag: None,
                leader: false,
            },
        ]);
        for line in [
            "rialto_server_realtime_lag_records{store=\"feed\",version=\"2\",partition=\"5\"} 42",
            "rialto_server_partition_leader{store=\"feed\",version=\"2\",partition=\"5\"} 1",
            "rialto_server_partition_leader{store=\"feed\",version=\"2\",partition=\"6\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("partition=\"6\"} 42"), "{text}");
        assert_eq!(
            text.matches("rialto_server_realtime_lag_records{").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn renders_storage_gauges() {
        let mut versions = BTreeMap::new();
        versions.insert(
            ("ads".to_string(), 3),
            VersionBytes {
                disk: 10,
                memory: 7,
            },
        );
        let text = render_storage(&versions, 5, 100);
        for line in [
            "rialto_server_store_disk_bytes{store=\"ads\",version=\"3\"} 10",
            "rialto_server_store_memory_bytes{store=\"ads\",version=\"3\"} 7",
            "rialto_server_block_cache_bytes{kind=\"used\"} 5",
            "rialto_server_block_cache_bytes{kind=\"capacity\"} 100",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn renders_every_family() {
        let m = ServerMetrics::default();
        m.count_request(RouteKind::Get);
        m.count_error(ErrorCode::TooManyKeys);
        m.faults_failed.fetch_add(2, Ordering::Relaxed);
        m.replica_transition(None, Some(ReplicaState::Offline));
        m.replica_transition(Some(ReplicaState::Offline), Some(ReplicaState::Online));
        let text = m.render_prometheus();
        assert!(
            text.contains("rialto_server_requests_total{route=\"get\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_errors_total{code=\"too_many_keys\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_replicas{state=\"ONLINE\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_faults_injected_total{kind=\"error\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_faults_injected_total{kind=\"delay\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_replicas{state=\"OFFLINE\"} 0"),
            "{text}"
        );
    }
}
