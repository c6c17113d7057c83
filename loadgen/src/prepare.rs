//! `prepare`: creates a loadgen store if missing and fills it with `keys` records of
//! `value_bytes`-byte values through a real push, unless its current version already holds them.
//!
//! The store's owner field records the value size (`rialto-loadgen value_bytes=V`), so a store
//! of another value size is never silently reused; the key count is checked against the records
//! the current version's replicas report.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rialto_controller::{AdminClient, ClientTlsFiles, ControllerError};
use rialto_protocol::admin::{CreateStoreRequest, StoreDescription};
use rialto_protocol::meta::{Compression, StorageProfile};
use rialto_push::{InputFormat, PushConfig};

use crate::dataset::{
    self, EMBEDDING_SCHEMA, KEY_SCHEMA, OWNER_MARKER, VALUE_BYTES_MIN, VALUE_SCHEMA,
};

/// What `prepare` was asked to do (the `prepare` subcommand's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    /// Controller admin URL.
    #[arg(
        long,
        env = "RIALTO_CONTROLLER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub controller: String,
    #[arg(long)]
    pub store: String,
    /// Records to push (keys `key-000000000` … ).
    #[arg(long)]
    pub keys: u64,
    /// Serialized size of each value (Avro datum), at least 12.
    #[arg(long, default_value_t = 1024)]
    pub value_bytes: usize,
    /// Push embeddings instead: values `{index, embedding: D floats}` (for `run --mode
    /// compute`); `--value-bytes` is then ignored.
    #[arg(long)]
    pub embedding_dims: Option<usize>,
    /// Partitions of a newly created store [default: 12].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Replication factor of a newly created store [default: 3].
    #[arg(long)]
    pub replication: Option<u32>,
    /// Create the store with the in-memory storage profile.
    #[arg(long)]
    pub in_memory: bool,
    /// Value compression of a newly created store.
    #[arg(long, value_parser = parse_compression, default_value = "none")]
    pub compression: Compression,
    /// Seed of the value payloads.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Push even when the current version already holds N records.
    #[arg(long)]
    pub force_push: bool,
    /// Write the dataset (newline-delimited JSON) here and keep it; default: a temporary
    /// file, removed after the push.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Kafka bootstrap servers, overriding what the controller hands out.
    #[arg(long)]
    pub kafka: Option<String>,
    /// A librdkafka property for the push's Kafka clients (repeatable; see `rialto-push
    /// --kafka-option`).
    #[arg(long = "kafka-option", value_parser = rialto_backends::kafka::parse_option)]
    pub kafka_options: Vec<(String, String)>,
    /// How long to wait for the pushed version to go live.
    #[arg(long, value_parser = crate::run::parse_duration, default_value = "30m")]
    pub push_timeout: Duration,
}

/// Partitions of a new store unless given.
pub const DEFAULT_PARTITIONS: u32 = 12;
/// Replication factor of a new store unless given (one copy per zone of a 3-zone cluster).
pub const DEFAULT_REPLICATION: u32 = 3;

/// The owner field of a store made by `prepare` for values of `value_bytes` bytes.
pub fn owner_marker(value_bytes: usize) -> String {
    format!("{OWNER_MARKER} value_bytes={value_bytes}")
}

/// The owner field of a store `prepare` makes for `args`, and its value schema.
fn marker_and_schema(args: &PrepareArgs) -> (String, &'static str) {
    match args.embedding_dims {
        Some(dims) => (
            format!("{OWNER_MARKER} embedding_dims={dims}"),
            EMBEDDING_SCHEMA,
        ),
        None => (owner_marker(args.value_bytes), VALUE_SCHEMA),
    }
}

/// The value size recorded in an owner field by [`owner_marker`].
pub fn marker_value_bytes(owner: &str) -> Option<usize> {
    owner
        .strip_prefix(OWNER_MARKER)?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("value_bytes="))?
        .parse()
        .ok()
}

/// Records in the store's current version: per partition the most any replica has ingested,
/// summed. `None` without a current version.
pub fn current_records(desc: &StoreDescription) -> Option<(u32, u64)> {
    let version = desc.store.current_version?;
    let v = desc.versions.iter().find(|v| v.record.version == version)?;
    let mut per_partition = vec![0u64; v.record.partition_count as usize];
    for r in &v.replicas {
        if let Some(slot) = per_partition.get_mut(r.partition as usize) {
            *slot = (*slot).max(r.records);
        }
    }
    Some((version, per_partition.iter().sum()))
}

fn same_schema(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.trim() == b.trim(),
    }
}

/// Checks that an existing store is a loadgen store of the same value size.
fn check_existing(desc: &StoreDescription, args: &PrepareArgs) -> Result<()> {
    let s = &desc.store;
    let (marker, schema) = marker_and_schema(args);
    let value_schema = s.latest_value_schema().map(|v| v.schema.as_str());
    if !same_schema(&s.key_schema, KEY_SCHEMA)
        || !value_schema.is_some_and(|v| same_schema(v, schema))
    {
        bail!(
            "store `{}` exists with other schemas than this rialto-loadgen dataset's; pick another --store",
            s.name
        );
    }
    if args.embedding_dims.is_some() && s.owner != marker {
        bail!(
            "store `{}` is `{}`, not `{marker}`; pick another --store",
            s.name,
            s.owner
        );
    }
    match marker_value_bytes(&s.owner) {
        _ if args.embedding_dims.is_some() => {}
        Some(v) if v == args.value_bytes => {}
        Some(v) => bail!(
            "store `{}` holds {v}-byte values, not {}; pick another --store (e.g. `{}-{}b`)",
            s.name,
            args.value_bytes,
            s.name,
            args.value_bytes
        ),
        None => bail!(
            "store `{}` was not created by rialto-loadgen (owner `{}`); pick another --store",
            s.name,
            s.owner
        ),
    }
    if args.partitions.is_some_and(|p| p != s.partition_count)
        || args.replication.is_some_and(|r| r != s.replication_factor)
    {
        eprintln!(
            "prepare: store `{}` exists with {} partitions and replication factor {}; using it as it is",
            s.name, s.partition_count, s.replication_factor
        );
    }
    Ok(())
}

/// Runs `prepare`.
pub async fn prepare(args: &PrepareArgs, tls: Option<&ClientTlsFiles>) -> Result<()> {
    if args.value_bytes < VALUE_BYTES_MIN {
        bail!("--value-bytes must be at least {VALUE_BYTES_MIN}");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    let admin = AdminClient::connect(&args.controller, tls)?;
    match admin.describe_store(&args.store).await {
        Ok(desc) => {
            check_existing(&desc, args)?;
            match current_records(&desc) {
                Some((version, records)) if records == args.keys && !args.force_push => {
                    eprintln!(
                        "prepare: store `{}` version {version} already holds {records} records of {} bytes; reusing it (--force-push to push again)",
                        args.store, args.value_bytes
                    );
                    return Ok(());
                }
                Some((version, records)) => eprintln!(
                    "prepare: store `{}` version {version} holds {records} records; pushing {}",
                    args.store, args.keys
                ),
                None => eprintln!(
                    "prepare: store `{}` has no current version; pushing {} records",
                    args.store, args.keys
                ),
            }
        }
        Err(ControllerError::Api { status: 404, .. }) => {
            let partitions = args.partitions.unwrap_or(DEFAULT_PARTITIONS);
            let replication = args.replication.unwrap_or(DEFAULT_REPLICATION);
            admin
                .create_store(&CreateStoreRequest {
                    name: args.store.clone(),
                    owner: marker_and_schema(args).0,
                    key_schema: KEY_SCHEMA.into(),
                    value_schema: marker_and_schema(args).1.into(),
                    partition_count: partitions,
                    replication_factor: replication,
                    storage: if args.in_memory {
                        StorageProfile::InMemory
                    } else {
                        StorageProfile::OnDisk
                    },
                    compression: args.compression,
                    max_value_bytes: None,
                    hybrid: None,
                    read_quota_keys_per_s: None,
                    storage_quota_bytes: None,
                    versions_to_keep: None,
                })
                .await
                .with_context(|| format!("create store `{}`", args.store))?;
            eprintln!(
                "prepare: created store `{}` ({partitions} partitions, replication factor {replication})",
                args.store
            );
        }
        Err(e) => return Err(e).context(format!("describe store `{}`", args.store)),
    }
    push(args, tls).await
}

async fn push(args: &PrepareArgs, tls: Option<&ClientTlsFiles>) -> Result<()> {
    // The dataset goes to a file (the push job reads files), written streaming.
    let (path, _temp) = match &args.dataset {
        Some(p) => (p.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("rialto-loadgen-")
                .suffix(if args.embedding_dims.is_some() {
                    ".avro"
                } else {
                    ".jsonl"
                })
                .tempfile()
                .context("create a temporary dataset file")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let started = Instant::now();
    let (keys, value_bytes, seed, file) = (args.keys, args.value_bytes, args.seed, path.clone());
    let dims = args.embedding_dims;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let f =
            std::fs::File::create(&file).with_context(|| format!("create {}", file.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut last = Instant::now();
        let progress = |done| {
            if last.elapsed() >= Duration::from_secs(1) || done == keys {
                last = Instant::now();
                eprintln!(
                    "prepare: wrote {done}/{keys} records ({:.0}%)",
                    100.0 * done as f64 / keys as f64
                );
            }
        };
        match dims {
            Some(dims) => dataset::write_embedding_avro(&mut out, keys, dims, seed, progress)?,
            None => dataset::write_ndjson(&mut out, keys, value_bytes, seed, progress)?,
        }
        out.flush()?;
        Ok(())
    })
    .await
    .context("dataset writer task")??;
    eprintln!(
        "prepare: dataset {} written in {:.1?}; pushing (progress below)",
        path.display(),
        started.elapsed()
    );
    let mut config = PushConfig::new(&args.controller, &args.store, &path);
    config.controller_tls = tls.cloned();
    config.format = Some(if dims.is_some() {
        InputFormat::Avro
    } else {
        InputFormat::Json
    });
    config.push_id = format!(
        "rialto-loadgen keys={} {} seed={}",
        args.keys,
        marker_and_schema(args)
            .0
            .trim_start_matches(OWNER_MARKER)
            .trim(),
        args.seed
    );
    config.wait_timeout = args.push_timeout;
    config.kafka_bootstrap = args.kafka.clone();
    config.kafka_options = args.kafka_options.clone();
    let report = rialto_push::push(&config)
        .await
        .with_context(|| format!("push to `{}`", args.store))?;
    println!(
        "prepare: store `{}` version {} is live: {} records, {:.1} MB in {} partitions (read {:.1?}, produce {:.1?}, ingest {:.1?})",
        report.store,
        report.version,
        report.records,
        report.bytes as f64 / 1e6,
        report.partitions,
        report.read_elapsed,
        report.produce_elapsed,
        report.live_elapsed
    );
    if report.records != args.keys {
        bail!(
            "the push wrote {} records, expected {}",
            report.records,
            args.keys
        );
    }
    Ok(())
}

fn parse_compression(text: &str) -> Result<Compression, String> {
    [
        Compression::None,
        Compression::Zstd,
        Compression::ZstdDictionary,
    ]
    .into_iter()
    .find(|c| c.name() == text)
    .ok_or_else(|| format!("`{text}`: expected none, zstd or zstd-dictionary"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_marker_round_trips() {
        assert_eq!(marker_value_bytes(&owner_marker(1024)), Some(1024));
        assert_eq!(marker_value_bytes("tests"), None);
        assert_eq!(marker_value_bytes("rialto-loadgen"), None);
    }
}
