//! `run`: drives an open-loop workload against a store and reports what happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rialto_backends::MetaStore;
use rialto_fast_client::{Client, ClientConfig, Compute, LongTailRetry};
use tokio::time::Instant;

use crate::dataset::{key_bytes, key_string};
use crate::report::{
    stats_delta, Fanout, KeyCounts, LatencySummary, ReceiveCounts, Report, RequestCounts,
    RetryCounts, RunConfig, Throughput,
};
use crate::schedule::{drive, drive_closed, report_progress, DriveConfig, Live, Schedule};
use crate::workload::{ClientWorkload, Mode};

/// What `run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub root: String,
    /// TLS to the storage servers (their CA, and this caller's identity).
    pub tls: Option<rialto_fast_client::ClientTls>,
    pub store: String,
    pub mode: Mode,
    /// Requests per second of the open-loop schedule; `None`: closed-loop callers
    /// ([`crate::schedule::drive_closed`]).
    pub rate: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
    pub max_requests: Option<u64>,
    pub key_space: u64,
    pub batch_keys: usize,
    /// Length of the compute mode's query vector.
    pub embedding_dims: usize,
    pub tasks: usize,
    pub clients: usize,
    pub max_in_flight: usize,
    pub seed: u64,
    pub request_timeout: Duration,
    pub long_tail_retry: bool,
    pub group_routing: bool,
    pub sub_request_keys: usize,
    pub receive_pool_bytes: usize,
    pub verify_checksums: bool,
    pub coalesce_gets: bool,
    pub json: Option<PathBuf>,
}

/// Parses `30`, `30s`, `1.5s`, `500ms`, `2m` into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let secs = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("`{s}` is not a duration (examples: 30, 30s, 500ms, 2m)"))?
        * scale;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// Runs the workload and prints (and optionally writes) the report.
pub async fn run(args: RunArgs, meta: Arc<dyn MetaStore>) -> Result<Report> {
    if args.key_space == 0 {
        bail!("--keys must be at least 1");
    }
    if args.mode != Mode::Get
        && !(1..=rialto_fast_client::BATCH_GET_KEYS_MAX).contains(&args.batch_keys)
    {
        bail!(
            "--batch-keys must be between 1 and {}",
            rialto_fast_client::BATCH_GET_KEYS_MAX
        );
    }
    // A closed loop has no schedule: a nominal one gives its phases (warmup, run) their times.
    let closed_loop = args.rate.is_none();
    let schedule = Schedule::new(
        args.rate.unwrap_or(1000.0),
        args.duration,
        args.warmup,
        args.max_requests,
    )
    .map_err(anyhow::Error::msg)?;
    let mut config = ClientConfig::new(&args.store);
    config.meta_root = args.root.clone();
    config.tls = args.tls.clone();
    config.routing_wait = Duration::from_secs(10);
    config.request_timeout = args.request_timeout;
    config.group_routing = args.group_routing;
    config.sub_request_keys_max = args.sub_request_keys;
    config.receive_pool_bytes = args.receive_pool_bytes;
    config.verify_checksums = args.verify_checksums;
    config.coalesce_gets = args.coalesce_gets;
    if !args.long_tail_retry {
        config.long_tail = LongTailRetry::disabled();
    }
    let mut clients = Vec::with_capacity(args.clients.max(1));
    for _ in 0..args.clients.max(1) {
        clients.push(
            Client::connect(config.clone(), meta.clone())
                .await
                .with_context(|| format!("connect to store `{}`", args.store))?,
        );
    }
    // The key space should be the dataset: its last key must exist.
    let last = args.key_space - 1;
    match clients[0].get_raw(&key_bytes(last)).await {
        Ok(Some(_)) => {}
        Ok(None) => eprintln!(
            "run: warning: key {} is not in store `{}`: --keys exceeds the dataset, reads will count missing keys",
            key_string(last),
            args.store
        ),
        Err(e) => bail!("store `{}` cannot be read: {e}", args.store),
    }

    let run_config = RunConfig {
        store: args.store.clone(),
        mode: args.mode.name().into(),
        rate_per_s: args.rate.unwrap_or(0.0),
        closed_loop,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        max_requests: args.max_requests,
        key_space: args.key_space,
        batch_keys: if args.mode == Mode::Get {
            1
        } else {
            args.batch_keys
        },
        tasks: args.tasks.max(1),
        clients: clients.len(),
        max_in_flight: args.max_in_flight,
        seed: args.seed,
        request_timeout_ms: args.request_timeout.as_millis() as u64,
        long_tail_retry: args.long_tail_retry,
        group_routing: args.group_routing,
        sub_request_keys: args.sub_request_keys,
        receive_pool_bytes: args.receive_pool_bytes,
        verify_checksums: args.verify_checksums,
        coalesce_gets: args.coalesce_gets,
    };
    match args.rate {
        Some(rate) => eprintln!(
            "run: {} {} requests ({} warmup) at {rate} req/s over {} task(s)",
            schedule.total(),
            args.mode.name(),
            schedule.total() - schedule.measured(),
            run_config.tasks
        ),
        None => eprintln!(
            "run: {} closed-loop callers of {} requests, {:?} of warmup then {:?}",
            run_config.tasks,
            args.mode.name(),
            args.warmup,
            args.duration
        ),
    }

    let workload = Arc::new(ClientWorkload {
        clients: clients.clone(),
        mode: args.mode,
        key_space: args.key_space,
        batch_keys: args.batch_keys,
        compute: Arc::new(Compute::new().dot_product(
            "embedding",
            crate::dataset::embedding(u64::MAX, args.embedding_dims, args.seed),
            "score",
        )),
    });
    let live = Arc::new(Live::default());
    let start = Instant::now() + Duration::from_millis(50);
    let measured_start = start + schedule.measured_start();
    // Client counters are read just before the first measured request may start (so it is
    // counted); warmup requests still in flight then add to the deltas.
    let stats_clients = clients.clone();
    let snapshot_at = measured_start
        .checked_sub(Duration::from_millis(5))
        .unwrap_or(measured_start);
    let before = tokio::spawn(async move {
        tokio::time::sleep_until(snapshot_at).await;
        stats_clients.iter().map(Client::stats).collect::<Vec<_>>()
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let total = (!closed_loop).then(|| schedule.total());
    let progress = tokio::spawn(report_progress(
        live.clone(),
        start,
        schedule,
        total,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let drive_config = DriveConfig {
        tasks: run_config.tasks,
        max_in_flight: args.max_in_flight,
        // In-flight requests are awaited up to the request timeout (plus a little).
        drain: args.request_timeout + Duration::from_millis(500),
        seed: args.seed,
    };
    let tally = if closed_loop {
        let (warmup, duration) = (args.warmup, args.duration);
        drive_closed(start, warmup, duration, drive_config, workload, live).await
    } else {
        drive(schedule, start, drive_config, workload, live).await
    };
    let _ = stop_tx.send(());
    let _ = progress.await;
    let before = before.await.context("stats snapshot task")?;
    let after: Vec<_> = clients.iter().map(Client::stats).collect();
    let delta = stats_delta(&before, &after);

    let measured_end = start + schedule.end();
    let elapsed = tally
        .last_finished
        .map_or(measured_end, |t| t.max(measured_end))
        .saturating_duration_since(measured_start)
        .as_secs_f64();
    let fanout = match args.mode {
        Mode::Get => None,
        Mode::Stream => Some(Fanout {
            source: "completeness".into(),
            calls: tally.fanout_calls,
            mean: tally.fanout_total as f64 / tally.fanout_calls.max(1) as f64,
            max: tally.fanout_max,
        }),
        Mode::Batch | Mode::Compute => {
            // A run is of one mode: its calls are batch-gets or computes, not both.
            let calls = delta.batch_gets + delta.computes;
            Some(Fanout {
                source: "client_stats".into(),
                calls,
                mean: delta.fanout_total as f64 / calls.max(1) as f64,
                max: delta.fanout_max,
            })
        }
    };
    let report = Report {
        config: run_config,
        requests: RequestCounts {
            scheduled: if closed_loop {
                tally.sent
            } else {
                schedule.measured()
            },
            sent: tally.sent,
            ok: tally.ok,
            failed: tally.failed,
            failed_by_kind: tally.failed_by_kind.clone(),
        },
        keys: KeyCounts {
            requested: tally.keys_requested,
            found: tally.keys_found,
            missing: tally.keys_missing,
            failed: tally.keys_failed,
            wrong_values: tally.wrong_values,
            compute_errors: tally.compute_errors,
            value_bytes: tally.value_bytes,
        },
        throughput: Throughput::of(
            elapsed,
            tally.ok + tally.failed,
            tally.ok,
            tally.keys_found + tally.keys_missing,
            tally.value_bytes,
        ),
        latency: LatencySummary::of(&tally.latency),
        time_to_first_record: (args.mode == Mode::Stream)
            .then(|| LatencySummary::of(&tally.first_record)),
        send_lag: LatencySummary::of(&tally.send_lag),
        fanout,
        retries: RetryCounts::from_stats(&delta),
        receive: ReceiveCounts::from_stats(&delta),
    };
    print!("{}", report.human());
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?;
        eprintln!("run: report written to {}", path.display());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }
}
