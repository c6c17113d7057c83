//! `rialto-loadgen freshness`: how long a real-time write takes to become readable.
//!
//! A writer puts new keys (`fresh-<run>-<i>`, string values) into a hybrid store at a fixed rate,
//! open loop; a reader batch-gets every key written and not yet seen, again and again, and
//! records for each key the time from its write's *intended* start (so a writer that falls
//! behind its schedule counts against freshness) to the end of the first read that returned it.
//! The figure is an upper bound by the reader's cycle (one batch-get plus `poll_interval`).
//! A key not readable `settle` after the last write is reported lost.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use hdrhistogram::Histogram;
use rialto_fast_client::Client;
use rialto_protocol::avro::Value;
use rialto_push::realtime::{RealtimeConfig, RealtimeWriter};
use serde::Serialize;
use tokio::sync::mpsc;

/// What to run.
#[derive(Debug, Clone)]
pub struct FreshnessConfig {
    pub controller_url: String,
    pub store: String,
    /// Writes per second.
    pub rate: f64,
    pub duration: Duration,
    pub value_bytes: usize,
    /// Pause between the reader's passes.
    pub poll_interval: Duration,
    /// How long after the last write a key may still become readable.
    pub settle: Duration,
    /// Most keys per batch-get of the reader.
    pub batch_keys: usize,
    /// TLS to an https:// controller.
    pub controller_tls: Option<rialto_controller::ClientTlsFiles>,
}

/// Freshness percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct FreshnessReport {
    pub store: String,
    pub rate: f64,
    pub writes: u64,
    /// Writes per second achieved by the writer.
    pub achieved_rate: f64,
    pub seen: u64,
    pub lost: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Mean time of one reader pass (one or more batch-gets), the resolution of the figures.
    pub reader_pass_ms: f64,
}

impl std::fmt::Display for FreshnessReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "freshness of {} writes at {:.0}/s (achieved {:.0}/s) to {}: p50 {:.1} ms, p90 {:.1} ms, \
             p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; {} lost; reader pass {:.1} ms",
            self.writes,
            self.rate,
            self.achieved_rate,
            self.store,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.lost,
            self.reader_pass_ms
        )
    }
}

/// Runs the writer and the reader; `client` reads `config.store`.
pub async fn run(config: &FreshnessConfig, client: &Client) -> Result<FreshnessReport> {
    ensure!(config.rate > 0.0, "--rate must be positive");
    let mut writer = RealtimeWriter::connect(&RealtimeConfig {
        controller_url: config.controller_url.clone(),
        store: config.store.clone(),
        kafka_bootstrap: None,
        kafka_options: Vec::new(),
        controller_tls: config.controller_tls.clone(),
        value_schema_id: None,
    })
    .await
    .with_context(|| format!("open a real-time writer of {}", config.store))?;
    let total = (config.rate * config.duration.as_secs_f64()).ceil() as u64;
    let run_id: u32 = rand::random();
    let key = move |i: u64| format!("fresh-{run_id:08x}-{i}");
    let value = "f".repeat(config.value_bytes);
    let (written_tx, written_rx) = mpsc::unbounded_channel::<(Value, Instant)>();

    let reader = tokio::spawn(read_until_seen(
        client.clone(),
        written_rx,
        config.poll_interval,
        config.settle,
        config.batch_keys.max(1),
    ));
    let start = Instant::now();
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / config.rate);
        tokio::time::sleep_until(intended.into()).await;
        let k = Value::String(key(i));
        writer
            .put(&k, &Value::String(value.clone()))
            .await
            .with_context(|| format!("write {i}"))?;
        // The reader starts looking for it now; the time counts from `intended`.
        let _ = written_tx.send((k, intended));
    }
    let elapsed = start.elapsed();
    writer.close().await.context("close the real-time writer")?;
    drop(written_tx);
    let (histogram, seen, lost, pass) = reader.await.context("the reader failed")??;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(FreshnessReport {
        store: config.store.clone(),
        rate: config.rate,
        writes: total,
        achieved_rate: total as f64 / elapsed.as_secs_f64(),
        seen,
        lost,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
        reader_pass_ms: pass.as_secs_f64() * 1000.0,
    })
}

/// Reads the keys announced on `written` until each was seen, or `settle` passed after the
/// announcements ended. Returns the freshness histogram (µs), seen, lost and the mean pass.
async fn read_until_seen(
    client: Client,
    mut written: mpsc::UnboundedReceiver<(Value, Instant)>,
    poll_interval: Duration,
    settle: Duration,
    batch_keys: usize,
) -> Result<(Histogram<u64>, u64, u64, Duration)> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut pending: VecDeque<(Value, Instant)> = VecDeque::new();
    let mut writes_ended: Option<Instant> = None;
    let (mut passes, mut pass_time) = (0u32, Duration::ZERO);
    let mut seen = 0u64;
    loop {
        loop {
            match written.try_recv() {
                Ok(w) => pending.push_back(w),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    writes_ended.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if let Some(ended) = writes_ended {
            if pending.is_empty() || ended.elapsed() > settle {
                break;
            }
        }
        if pending.is_empty() {
            tokio::time::sleep(poll_interval).await;
            continue;
        }
        let pass_start = Instant::now();
        let mut still = VecDeque::with_capacity(pending.len());
        let all: Vec<(Value, Instant)> = pending.drain(..).collect();
        for chunk in all.chunks(batch_keys) {
            let keys: Vec<Value> = chunk.iter().map(|(k, _)| k.clone()).collect();
            let values = client.batch_get(&keys).await?;
            let now = Instant::now();
            for ((k, intended), v) in chunk.iter().zip(values) {
                if v.is_some() {
                    histogram.saturating_record(now.duration_since(*intended).as_micros() as u64);
                    seen += 1;
                } else {
                    still.push_back((k.clone(), *intended));
                }
            }
        }
        pending = still;
        passes += 1;
        pass_time += pass_start.elapsed();
        tokio::time::sleep(poll_interval).await;
    }
    let lost = pending.len() as u64;
    Ok((histogram, seen, lost, pass_time / passes.max(1)))
}
