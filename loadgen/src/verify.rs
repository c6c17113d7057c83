//! `rialto-loadgen verify`: reads every key of an input back through the fast client and
//! compares each value with the input through [`crate::oracle`], which shares no code with the
//! push job.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rialto_backends::MetaStore;
use rialto_fast_client::Client;
use rialto_protocol::avro::{AvroCodec, Schema};
use rialto_protocol::meta::{Layout, StoreRecord};

use crate::oracle;

/// The store's schemas: key codec, value codecs by id, and the id of the latest value schema.
pub struct StoreCodecs {
    pub key: AvroCodec,
    pub values: HashMap<u32, AvroCodec>,
    pub latest: u32,
}

impl StoreCodecs {
    pub fn value(&self, id: u32) -> Result<&AvroCodec> {
        self.values
            .get(&id)
            .with_context(|| format!("value schema {id} is not registered"))
    }

    /// A stored datum as JSON text.
    pub fn show(&self, raw: &rialto_fast_client::RawValue) -> Result<String> {
        let codec = self.value(raw.schema_id)?;
        Ok(codec.to_json_text(&codec.decode(&raw.bytes, "value")?))
    }
}

pub async fn store_codecs(meta: &dyn MetaStore, root: &str, store: &str) -> Result<StoreCodecs> {
    let kv = meta
        .get(&Layout::new(root).store(store))
        .await?
        .with_context(|| format!("store `{store}` does not exist"))?;
    let record: StoreRecord = rialto_protocol::meta::decode_record(&kv.value)?;
    let latest = record
        .latest_value_schema()
        .context("store has no value schema")?
        .id;
    let mut values = HashMap::new();
    for schema in &record.value_schemas {
        values.insert(schema.id, AvroCodec::parse(&schema.schema)?);
    }
    Ok(StoreCodecs {
        key: AvroCodec::parse(&record.key_schema)?,
        values,
        latest,
    })
}

/// What one verification found.
#[derive(Default)]
struct Findings {
    keys: usize,
    missing: usize,
    wrong: usize,
    /// The first few differences, for the report.
    examples: Vec<String>,
}

impl Findings {
    fn wrong(&mut self, key: &str, detail: String) {
        self.wrong += 1;
        if self.examples.len() < 5 {
            self.examples.push(format!("key {key}: {detail}"));
        }
    }
}

pub async fn verify(
    client: &Client,
    codecs: &StoreCodecs,
    input: &Path,
    batch: usize,
) -> Result<()> {
    let started = Instant::now();
    let mut latency_us = Histogram::<u64>::new(3)?;
    let avro = input.extension().and_then(|e| e.to_str()) == Some("avro");
    let (findings, method) = if avro {
        (
            verify_avro(client, codecs, input, batch, &mut latency_us).await?,
            "the file's own datum bytes, read by an independent container reader",
        )
    } else {
        (
            verify_json(client, codecs, input, batch, &mut latency_us).await?,
            "the input parsed by serde_json and compared field by field",
        )
    };
    let elapsed = started.elapsed();
    let stats = client.stats();
    println!(
        "verified {} keys in {:.2?} ({:.0} keys/s) with batch-gets of {batch} against {method}: {} missing, {} wrong; {} checksums verified; batch-get latency p50 {} µs, p99 {} µs, max {} µs",
        findings.keys,
        elapsed,
        findings.keys as f64 / elapsed.as_secs_f64(),
        findings.missing,
        findings.wrong,
        stats.checksums_verified,
        latency_us.value_at_quantile(0.5),
        latency_us.value_at_quantile(0.99),
        latency_us.max()
    );
    for example in &findings.examples {
        println!("  {example}");
    }
    if findings.missing + findings.wrong > 0 {
        bail!(
            "{} keys missing and {} wrong",
            findings.missing,
            findings.wrong
        );
    }
    Ok(())
}

/// Reads `keys` in batches, timing each batch-get.
async fn read_back(
    client: &Client,
    keys: &[Vec<u8>],
    batch: usize,
    latency_us: &mut Histogram<u64>,
) -> Result<Vec<Option<rialto_fast_client::RawValue>>> {
    let mut values = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(batch) {
        let t = Instant::now();
        values.extend(client.batch_get_raw(chunk).await?);
        latency_us.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(values)
}

/// An Avro container file: each value read back must be the file's own datum bytes when the
/// file was written with the store's value schema, else the same value after resolution.
async fn verify_avro(
    client: &Client,
    codecs: &StoreCodecs,
    input: &Path,
    batch: usize,
    latency_us: &mut Histogram<u64>,
) -> Result<Findings> {
    let file = oracle::avro_file::read_records_from_path(input, "key", "value")
        .with_context(|| format!("read {}", input.display()))?;
    let writer = Schema::parse_str(&file.writer_schema).context("the file's writer schema")?;
    let Schema::Record(row) = &writer else {
        bail!("the file's records are not records with key and value fields");
    };
    let field = |name: &str| {
        row.lookup
            .get(name)
            .map(|i| row.fields[*i].schema.clone())
            .with_context(|| format!("the file's records have no `{name}` field"))
    };
    let (key_schema, value_schema) = (field("key")?, field("value")?);
    let latest = codecs.value(codecs.latest)?;
    let same_value_schema = value_schema == *latest.schema();
    let keys: Vec<Vec<u8>> = if key_schema == *codecs.key.schema() {
        file.records.iter().map(|r| r.key.clone()).collect()
    } else {
        file.records
            .iter()
            .map(|r| {
                let key = apache_avro::from_avro_datum(&key_schema, &mut r.key.as_slice(), None)?;
                Ok(codecs.key.encode(&key, "key")?)
            })
            .collect::<Result<_>>()?
    };
    let values = read_back(client, &keys, batch, latency_us).await?;
    let mut findings = Findings {
        keys: keys.len(),
        ..Findings::default()
    };
    for ((record, key), got) in file.records.iter().zip(&keys).zip(values) {
        let Some(got) = got else {
            findings.missing += 1;
            continue;
        };
        let shown = || {
            codecs
                .key
                .decode(key, "key")
                .map(|k| codecs.key.to_json_text(&k))
                .unwrap_or_else(|_| format!("{key:02x?}"))
        };
        if same_value_schema {
            if got.bytes != record.value {
                let detail = format!(
                    "{} bytes read differ from the file's {} bytes (first difference at byte {})",
                    got.bytes.len(),
                    record.value.len(),
                    got.bytes
                        .iter()
                        .zip(&record.value)
                        .position(|(a, b)| a != b)
                        .unwrap_or(got.bytes.len().min(record.value.len()))
                );
                findings.wrong(&shown(), detail);
            }
        } else {
            let expected = apache_avro::from_avro_datum(
                &value_schema,
                &mut record.value.as_slice(),
                Some(latest.schema()),
            )?;
            let got_value = codecs.value(got.schema_id)?.decode(&got.bytes, "value")?;
            if !oracle::identical(&expected, &got_value) {
                findings.wrong(
                    &shown(),
                    format!(
                        "read {}, the file has {}",
                        codecs.show(&got)?,
                        latest.to_json_text(&expected)
                    ),
                );
            }
        }
    }
    Ok(findings)
}

/// Newline-delimited JSON: each value read back is compared with its line as `serde_json`
/// parses it, not through the push job's converter.
async fn verify_json(
    client: &Client,
    codecs: &StoreCodecs,
    input: &Path,
    batch: usize,
    latency_us: &mut Histogram<u64>,
) -> Result<Findings> {
    let file = std::fs::File::open(input).with_context(|| format!("open {}", input.display()))?;
    let mut keys = Vec::new();
    let mut expected = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let json: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("line {}", i + 1))?;
        let key = codecs
            .key
            .from_json_text(&json["key"].to_string(), "key")
            .with_context(|| format!("line {}", i + 1))?;
        keys.push(codecs.key.encode(&key, "key")?);
        expected.push((codecs.key.to_json_text(&key), json["value"].clone()));
    }
    let values = read_back(client, &keys, batch, latency_us).await?;
    let mut oracles = HashMap::new();
    let mut findings = Findings {
        keys: keys.len(),
        ..Findings::default()
    };
    for ((key, want), got) in expected.iter().zip(values) {
        let Some(got) = got else {
            findings.missing += 1;
            continue;
        };
        let codec = codecs.value(got.schema_id)?;
        if let std::collections::hash_map::Entry::Vacant(slot) = oracles.entry(got.schema_id) {
            slot.insert(
                oracle::json_values::JsonOracle::new(codec.schema()).map_err(anyhow::Error::msg)?,
            );
        }
        let value = codec.decode(&got.bytes, "value")?;
        if let Err(detail) = oracles[&got.schema_id].check(&value, want) {
            findings.wrong(key, detail);
        }
    }
    Ok(findings)
}
