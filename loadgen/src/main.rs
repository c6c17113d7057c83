//! `rialto-loadgen`: creates and reads Rialto stores through `fast-client`.
//!
//! * `prepare`: creates a store (if missing) and fills it with N keys of V-byte values through a
//!   real push ([`prepare`]); keys are `key-{i:09}`, so `run` derives them from their index.
//! * `run`: an open-loop workload at a fixed rate for a fixed time — single gets, batch-gets or
//!   streaming batch-gets — with coordinated-omission-corrected latency percentiles, throughput,
//!   fanout and retry counters, printed and optionally written as JSON ([`run`], [`report`]).
//! * `get` (one key, printed as JSON) and `verify` (read back every record of a newline-delimited
//!   JSON dataset with batch-gets and compare).

mod dataset;
mod prepare;
mod report;
mod run;
mod schedule;
mod workload;

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use rialto_backends::etcd::EtcdMetaStore;
use rialto_backends::MetaStore;
use rialto_fast_client::{Client, ClientConfig};
use rialto_protocol::avro::{to_json, AvroCodec};
use rialto_protocol::meta::{Layout, StoreRecord, DEFAULT_ROOT};

use crate::run::parse_duration;
use crate::workload::Mode;

/// Create, fill and read Rialto stores through the fast client.
#[derive(Parser)]
#[command(name = "rialto-loadgen", version)]
struct Args {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "RIALTO_ETCD",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// Cluster root in etcd.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reads one key (given as JSON, e.g. '"key-1"') and prints its value as JSON.
    Get {
        #[arg(long)]
        store: String,
        #[arg(long)]
        key: String,
    },
    /// Reads back every record of a newline-delimited JSON dataset and compares values.
    Verify {
        #[arg(long)]
        store: String,
        #[arg(long)]
        input: PathBuf,
        /// Keys per batch-get.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Creates the store if missing and pushes N records of V-byte values (keys `key-{i:09}`),
    /// unless its current version already holds N records.
    Prepare(prepare::PrepareArgs),
    /// Drives an open-loop workload at a fixed rate and reports throughput and latency.
    Run {
        #[arg(long)]
        store: String,
        /// What each request is.
        #[arg(long, value_enum, default_value_t = Mode::Batch)]
        mode: Mode,
        /// Requests per second (across all tasks), sent on schedule whatever the completions.
        #[arg(long)]
        rate: f64,
        /// How long to send measured requests (30, 30s, 500ms, 2m).
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Unmeasured requests at the same rate before the measured ones.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        warmup: Duration,
        /// Most measured requests (the run ends at whichever of duration and count comes first).
        #[arg(long)]
        max_requests: Option<u64>,
        /// Key space: keys are drawn uniformly from key-0 … key-(N-1) (the `prepare --keys`).
        #[arg(long)]
        keys: u64,
        /// Keys per batch-get (batch and stream modes).
        #[arg(long, default_value_t = 5000)]
        batch_keys: usize,
        /// Client tasks sharing the schedule.
        #[arg(long, default_value_t = 4)]
        tasks: usize,
        /// Separate Client instances (task t uses client t mod C).
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// Most requests in flight; beyond, sends wait (and the wait counts as latency).
        #[arg(long, default_value_t = 10_000)]
        max_in_flight: usize,
        /// Seed of the key choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Deadline of one request (the client's `request_timeout`); in-flight requests at the
        /// end are awaited this long.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        request_timeout: Duration,
        /// Disable smart long-tail retry.
        #[arg(long)]
        no_long_tail_retry: bool,
        /// Disable group-based routing.
        #[arg(long)]
        no_group_routing: bool,
        /// Most keys per batch-get sub-request (the client's `sub_request_keys_max`).
        #[arg(long, default_value_t = rialto_fast_client::SUB_REQUEST_KEYS_MAX)]
        sub_request_keys: usize,
        /// Bytes of receive memory the client keeps for reuse (its `receive_pool_bytes`; 0: none).
        #[arg(long, default_value_t = rialto_fast_client::RECEIVE_POOL_BYTES)]
        receive_pool_bytes: usize,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let default_filter = match args.command {
        Command::Prepare(_) => "warn,rialto_push=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Prepare(prepare) = args.command {
        return prepare::prepare(&prepare).await;
    }
    let meta: Arc<dyn MetaStore> = Arc::new(
        EtcdMetaStore::connect(&args.etcd, Duration::from_secs(10))
            .await
            .with_context(|| format!("connect to etcd at {}", args.etcd.join(",")))?,
    );
    match args.command {
        Command::Prepare { .. } => unreachable!("handled above"),
        Command::Get { store, key } => {
            let client = connect(&args.root, &store, meta.clone()).await?;
            let key_codec = store_codecs(meta.as_ref(), &args.root, &store).await?.0;
            let key = key_codec.from_json(
                &serde_json::from_str(&key).context("--key must be JSON")?,
                "key",
            )?;
            match client.get(&key).await? {
                Some(v) => println!("{}", to_json(&v)),
                None => println!("(no value for this key)"),
            }
        }
        Command::Verify {
            store,
            input,
            batch,
        } => {
            let client = connect(&args.root, &store, meta.clone()).await?;
            let (key_codec, value_codec) = store_codecs(meta.as_ref(), &args.root, &store).await?;
            verify(&client, &key_codec, &value_codec, &input, batch.max(1)).await?;
        }
        Command::Run {
            store,
            mode,
            rate,
            duration,
            warmup,
            max_requests,
            keys,
            batch_keys,
            tasks,
            clients,
            max_in_flight,
            seed,
            request_timeout,
            no_long_tail_retry,
            no_group_routing,
            sub_request_keys,
            receive_pool_bytes,
            json,
        } => {
            let report = run::run(
                run::RunArgs {
                    root: args.root.clone(),
                    store,
                    mode,
                    rate,
                    duration,
                    warmup,
                    max_requests,
                    key_space: keys,
                    batch_keys,
                    tasks,
                    clients,
                    max_in_flight,
                    seed,
                    request_timeout,
                    long_tail_retry: !no_long_tail_retry,
                    group_routing: !no_group_routing,
                    sub_request_keys,
                    receive_pool_bytes,
                    json,
                },
                meta.clone(),
            )
            .await?;
            if report.keys.wrong_values > 0 {
                bail!(
                    "{} values did not belong to their key",
                    report.keys.wrong_values
                );
            }
        }
    }
    Ok(())
}

async fn connect(root: &str, store: &str, meta: Arc<dyn MetaStore>) -> Result<Client> {
    let mut config = ClientConfig::new(store);
    config.meta_root = root.to_string();
    config.routing_wait = Duration::from_secs(10);
    Ok(Client::connect(config, meta).await?)
}

async fn store_codecs(
    meta: &dyn MetaStore,
    root: &str,
    store: &str,
) -> Result<(AvroCodec, AvroCodec)> {
    let kv = meta
        .get(&Layout::new(root).store(store))
        .await?
        .with_context(|| format!("store `{store}` does not exist"))?;
    let record: StoreRecord = serde_json::from_slice(&kv.value)?;
    let value = record
        .latest_value_schema()
        .context("store has no value schema")?;
    Ok((
        AvroCodec::parse(&record.key_schema)?,
        AvroCodec::parse(&value.schema)?,
    ))
}

async fn verify(
    client: &Client,
    key_codec: &AvroCodec,
    value_codec: &AvroCodec,
    input: &PathBuf,
    batch: usize,
) -> Result<()> {
    let file = std::fs::File::open(input).with_context(|| format!("open {}", input.display()))?;
    let mut expected = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let json: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("line {}", i + 1))?;
        let key = key_codec.from_json(&json["key"], "key")?;
        let value = value_codec.from_json(&json["value"], "value")?;
        expected.push((key, to_json(&value)));
    }
    let mut latency_us = Histogram::<u64>::new(3)?;
    let (mut missing, mut wrong) = (0usize, 0usize);
    let started = Instant::now();
    for chunk in expected.chunks(batch) {
        let keys: Vec<_> = chunk.iter().map(|(k, _)| k.clone()).collect();
        let t = Instant::now();
        let values = client.batch_get(&keys).await?;
        latency_us.record(t.elapsed().as_micros() as u64)?;
        for ((_, want), got) in chunk.iter().zip(values) {
            match got {
                None => missing += 1,
                Some(v) if &to_json(&v) != want => wrong += 1,
                Some(_) => {}
            }
        }
    }
    let elapsed = started.elapsed();
    println!(
        "verified {} keys in {:.2?} ({:.0} keys/s) with batch-gets of {batch}: {missing} missing, {wrong} wrong; batch-get latency p50 {} µs, p99 {} µs, max {} µs",
        expected.len(),
        elapsed,
        expected.len() as f64 / elapsed.as_secs_f64(),
        latency_us.value_at_quantile(0.5),
        latency_us.value_at_quantile(0.99),
        latency_us.max()
    );
    if missing + wrong > 0 {
        bail!("{missing} keys missing and {wrong} wrong");
    }
    Ok(())
}
