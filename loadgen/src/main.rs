//! `rialto-loadgen`: reads a Rialto store through `fast-client`.
//!
//! Today: `get` (one key, printed as JSON) and `verify` (read back every record of a
//! newline-delimited JSON dataset with batch-gets and compare, reporting keys/s and latency
//! percentiles). The open-loop load generator of the large-fanout issue builds on this.

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

/// Read a Rialto store through the fast client.
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
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let meta: Arc<dyn MetaStore> = Arc::new(
        EtcdMetaStore::connect(&args.etcd, Duration::from_secs(10))
            .await
            .with_context(|| format!("connect to etcd at {}", args.etcd.join(",")))?,
    );
    match args.command {
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
