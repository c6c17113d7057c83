//! `produce`: the broker's own produce rate, measured without the push job around it.
//!
//! Sends `records` records of `value_bytes` bytes to a new topic of `partitions` partitions
//! through the same Kafka client, with the same producer settings, that pushes use
//! (`rialto_backends::KafkaPubSub`), keeps the same bound on unacknowledged records, waits for
//! every acknowledgement and reports the rate. What a push reaches against this rate says
//! whether the push job or the broker bounds a push.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rialto_backends::kafka::{KafkaConfig, KafkaPubSub};
use rialto_backends::PubSub;
use serde::Serialize;

/// What `produce` was asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub kafka: String,
    /// Records to send.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Bytes of each record's value (the key is empty, as on version topics).
    #[arg(long, default_value_t = 1024)]
    pub value_bytes: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: u32,
    /// In which order records go to partitions: all of partition 0, then 1, … (as a push of
    /// sorted partitions produces), or round-robin across partitions.
    #[arg(long, value_enum, default_value_t = Order::Partitions)]
    pub order: Order,
    /// Most records sent and not yet acknowledged.
    #[arg(long, default_value_t = 50_000)]
    pub in_flight: usize,
    /// Consumers reading every partition of the topic while it is written, as the replicas of
    /// a version do during its push (0: the broker serves the producer alone).
    #[arg(long, default_value_t = 0)]
    pub readers: u32,
    /// A librdkafka property for the producer, after Rialto's own (repeatable): to try other
    /// settings against the same broker.
    #[arg(long = "kafka-option", value_parser = rialto_backends::kafka::parse_option)]
    pub kafka_options: Vec<(String, String)>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    Partitions,
    RoundRobin,
}

#[derive(Debug, Serialize)]
pub struct ProduceReport {
    pub records: u64,
    pub value_bytes: usize,
    pub partitions: u32,
    pub order: Order,
    pub readers: u32,
    pub seconds: f64,
    pub records_per_second: f64,
    pub megabytes_per_second: f64,
}

pub async fn produce(args: &ProduceArgs) -> Result<()> {
    let mut config = KafkaConfig::new(args.kafka.clone());
    config.options = args.kafka_options.clone();
    let pubsub = KafkaPubSub::new(config)?;
    let topic = format!("rialto_produce_bench_{}", uuid::Uuid::new_v4().simple());
    pubsub
        .create_topic(&topic, args.partitions.max(1))
        .await
        .with_context(|| format!("create topic {topic}"))?;
    let partitions = u64::from(args.partitions.max(1));
    let per_partition = args.records.div_ceil(partitions);
    let pubsub = std::sync::Arc::new(pubsub);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..args.readers {
        for partition in 0..args.partitions.max(1) {
            let (pubsub, topic, stop) = (pubsub.clone(), topic.clone(), stop.clone());
            readers.push(tokio::spawn(async move {
                let mut consumer = pubsub.consumer(&topic, partition, 0).await?;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    consumer.poll(1000, Duration::from_millis(100)).await?;
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
    }
    let value: Vec<u8> = (0..args.value_bytes)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let mut deliveries: FuturesUnordered<rialto_backends::pubsub::Delivery> =
        FuturesUnordered::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    for i in 0..args.records {
        let partition = match args.order {
            Order::Partitions => i / per_partition,
            Order::RoundRobin => i % partitions,
        } as u32;
        while deliveries.len() >= args.in_flight.max(1) {
            if let Some(result) = deliveries.next().await {
                result.context("delivery")?;
            }
        }
        deliveries.push(pubsub.send(&topic, partition, &[], &value).await?);
        if last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            tracing::info!("sent {i}/{} records", args.records);
        }
    }
    while let Some(result) = deliveries.next().await {
        result.context("delivery")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        reader.await.context("reader task")?.context("reader")?;
    }
    let report = ProduceReport {
        records: args.records,
        value_bytes: args.value_bytes,
        partitions: args.partitions,
        order: args.order,
        readers: args.readers,
        seconds,
        records_per_second: args.records as f64 / seconds,
        megabytes_per_second: (args.records as f64 * args.value_bytes as f64) / seconds / 1e6,
    };
    println!(
        "produced {} records of {} bytes to {} partitions ({:?} order, {} readers) in {:.2} s: {:.0} records/s, {:.1} MB/s",
        report.records,
        report.value_bytes,
        report.partitions,
        report.order,
        report.readers,
        report.seconds,
        report.records_per_second,
        report.megabytes_per_second
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let Err(e) = pubsub.delete_topic(&topic).await {
        tracing::warn!("could not delete {topic}: {e}");
    }
    Ok(())
}
