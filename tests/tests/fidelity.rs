//! Every value read is exactly the value pushed.
//!
//! The oracle never shares code with the push job: a dataset written by another Avro
//! implementation (Python's fastavro, `tests/data/foreign`, with fastavro's own encoding of every
//! value in `expected.jsonl`) is pushed as deflate and snappy container files and as JSON lines,
//! and every value the client returns is compared with fastavro's bytes. Large values go through
//! chunking; a value over the store's limit is refused before a version exists.

use std::path::PathBuf;

use anyhow::{Context, Result};
use futures::StreamExt;
use rialto_fast_client::{BatchEvent, Client};
use rialto_loadgen::oracle::{self, json_values::JsonOracle};
use rialto_protocol::admin::CreateStoreRequest;
use rialto_protocol::avro::{AvroCodec, Schema, Value};
use rialto_protocol::meta::{Compression, StorageProfile};
use rialto_tests::{key_of, unhex, write_json_dataset, Cluster, STRING_SCHEMA};

fn foreign(file: &str) -> PathBuf {
    rialto_tests::test_data("foreign", file)
}

/// `(key datum, value datum)` as fastavro wrote them, in record order.
fn fastavro_records() -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let text = std::fs::read_to_string(foreign("expected.jsonl"))?;
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let field = |name: &str| v[name].as_str().map(unhex).context("hex field");
            Ok((field("key_hex")?, field("value_hex")?))
        })
        .collect()
}

/// Reads every key three ways (batch-get, streaming batch-get, single gets) and returns the
/// value datums in key order; the three must agree.
async fn read_all(client: &Client, keys: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
    let batch: Vec<Vec<u8>> = client
        .batch_get_raw(keys)
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.map(|v| v.bytes.to_vec())
                .with_context(|| format!("key {i} missing"))
        })
        .collect::<Result<_>>()?;
    let mut streamed: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
    let mut stream = client.batch_get_stream_raw(keys)?;
    while let Some(event) = stream.next().await {
        match event {
            BatchEvent::Record { index, value, .. } => {
                streamed[index] = value.map(|v| v.bytes.to_vec());
            }
            BatchEvent::Done(done) => anyhow::ensure!(done.is_complete(), "{done:?}"),
        }
    }
    for (i, key) in keys.iter().enumerate() {
        anyhow::ensure!(
            streamed[i].as_ref() == Some(&batch[i]),
            "key {i}: streaming batch-get and batch-get disagree"
        );
        if i % 17 == 0 {
            let single = client.get_raw(key).await?.context("single get missing")?;
            anyhow::ensure!(
                single.bytes == batch[i],
                "key {i}: get and batch-get disagree"
            );
        }
    }
    Ok(batch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dataset_written_by_fastavro_reads_back_exactly() -> Result<()> {
    rialto_tests::init_logging();
    let cluster = Cluster::start(2).await?;
    let value_schema = std::fs::read_to_string(foreign("value.avsc"))?;
    let codec = AvroCodec::parse(&value_schema)?;
    let expected = fastavro_records()?;
    assert_eq!(expected.len(), 200);
    let keys: Vec<Vec<u8>> = expected.iter().map(|(k, _)| k.clone()).collect();
    let json_oracle = JsonOracle::new(codec.schema()).map_err(anyhow::Error::msg)?;
    let json_lines: Vec<serde_json::Value> = std::fs::read_to_string(foreign("members.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;

    for (store, file, storage, compression) in [
        (
            "deflate",
            "members.deflate.avro",
            StorageProfile::OnDisk,
            Compression::None,
        ),
        (
            "snappy",
            "members.snappy.avro",
            StorageProfile::InMemory,
            Compression::Zstd,
        ),
        (
            "json",
            "members.jsonl",
            StorageProfile::OnDisk,
            Compression::Zstd,
        ),
    ] {
        cluster
            .create_store_with(
                store,
                STRING_SCHEMA,
                &value_schema,
                4,
                2,
                storage,
                compression,
            )
            .await?;
        let report = cluster.push(store, &foreign(file)).await?;
        assert_eq!(report.records, 200, "{store}");
        let client = cluster.client(store).await?;
        let got = read_all(&client, &keys).await?;
        for (i, ((_, want), got)) in expected.iter().zip(&got).enumerate() {
            if file.ends_with(".avro") {
                // An Avro file's values are stored as the file's own bytes.
                assert_eq!(
                    got, want,
                    "{store}: value {i} differs from fastavro's bytes"
                );
            } else {
                // From JSON, the same values (map entries and a decimal's sign bytes may be
                // encoded differently, as Avro allows): compared decoded, floats bit for bit.
                let (got_v, want_v) = (codec.decode(got, "got")?, codec.decode(want, "want")?);
                assert!(
                    oracle::identical(&got_v, &want_v),
                    "{store}: value {i} differs from fastavro's:\n{}\n{}",
                    codec.to_json_text(&got_v),
                    codec.to_json_text(&want_v)
                );
            }
            // And against the JSON line, read by serde_json, not by the push job's parser.
            let value = codec.decode(got, "got")?;
            json_oracle
                .check(&value, &json_lines[i]["value"])
                .map_err(|e| anyhow::anyhow!("{store}: value {i}: {e}"))?;
        }
        let stats = client.stats();
        assert!(stats.checksums_verified >= 400, "{store}: {stats:?}");
        assert_eq!(stats.checksum_mismatches, 0, "{store}");
    }
    cluster.shutdown().await
}

/// Avro `bytes` datum of `payload`: zigzag varint length, then the bytes.
fn bytes_datum(payload: &[u8]) -> Vec<u8> {
    let mut z = (payload.len() as u64) << 1;
    let mut out = Vec::with_capacity(payload.len() + 5);
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
    out.extend_from_slice(payload);
    out
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_values_are_stored_in_chunks_and_read_back_whole() -> Result<()> {
    rialto_tests::init_logging();
    let cluster = Cluster::start(2).await?;
    let dir = tempfile::tempdir()?;

    // The reported bug: one 4 MB compressible string among 100 records went live and could not
    // be read ("compressed value would expand to 4000022 bytes").
    cluster
        .create_store_with(
            "text",
            STRING_SCHEMA,
            STRING_SCHEMA,
            4,
            2,
            StorageProfile::OnDisk,
            Compression::Zstd,
        )
        .await?;
    let big_text = |i: usize| format!("{i}-").repeat(1_333_334);
    let path = dir.path().join("text.jsonl");
    write_json_dataset(&path, 100, |i| {
        serde_json::Value::String(if i == 42 {
            big_text(i)
        } else {
            format!("small-{i}")
        })
    })?;
    cluster.push("text", &path).await?;
    let client = cluster.client("text").await?;
    let keys: Vec<Value> = (0..100).map(|i| Value::String(key_of(i))).collect();
    let got = client.batch_get(&keys).await?;
    assert_eq!(got[42], Some(Value::String(big_text(42))));
    assert_eq!(got[41], Some(Value::String("small-41".into())));
    assert_eq!(
        client.get(&keys[42]).await?,
        Some(Value::String(big_text(42)))
    );

    // Incompressible values of 1, 4 and 16 MB among small ones, from an Avro file: chunked.
    cluster
        .create_store_with(
            "blobs",
            STRING_SCHEMA,
            r#""bytes""#,
            3,
            2,
            StorageProfile::InMemory,
            Compression::None,
        )
        .await?;
    let sizes = [1_000_000usize, 4_000_000, 16_000_000];
    let payloads: Vec<Vec<u8>> = (0..20)
        .map(|i| match i {
            5 => pseudo_random(sizes[0], 5),
            10 => pseudo_random(sizes[1], 10),
            15 => pseudo_random(sizes[2], 15),
            i => pseudo_random(100 + i, i as u64),
        })
        .collect();
    let row = Schema::parse_str(
        r#"{"type":"record","name":"Row","fields":[{"name":"key","type":"string"},{"name":"value","type":"bytes"}]}"#,
    )?;
    let mut w = apache_avro::Writer::new(&row, Vec::new());
    for (i, p) in payloads.iter().enumerate() {
        w.append(Value::Record(vec![
            ("key".into(), Value::String(key_of(i))),
            ("value".into(), Value::Bytes(p.clone())),
        ]))?;
    }
    let path = dir.path().join("blobs.avro");
    std::fs::write(&path, w.into_inner()?)?;
    let report = cluster.push("blobs", &path).await?;
    assert_eq!(report.chunked_values, 3);
    let client = cluster.client("blobs").await?;
    let key_codec = AvroCodec::parse(STRING_SCHEMA)?;
    let keys: Vec<Vec<u8>> = (0..20)
        .map(|i| key_codec.encode(&Value::String(key_of(i)), "key"))
        .collect::<Result<_, _>>()?;
    let got = read_all(&client, &keys).await?;
    for (i, p) in payloads.iter().enumerate() {
        assert!(
            got[i] == bytes_datum(p),
            "value {i} ({} bytes) differs",
            p.len()
        );
    }
    // A chunk's own key is not a value.
    let mut chunk_key = keys[15].clone();
    chunk_key.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(client.get_raw(&chunk_key).await?, None);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_over_the_store_limit_is_refused_before_a_version_exists() -> Result<()> {
    rialto_tests::init_logging();
    let cluster = Cluster::start(1).await?;
    cluster
        .admin()
        .create_store(&CreateStoreRequest {
            name: "limited".into(),
            owner: "tests".into(),
            key_schema: STRING_SCHEMA.into(),
            value_schema: STRING_SCHEMA.into(),
            partition_count: 2,
            replication_factor: 1,
            storage: StorageProfile::OnDisk,
            compression: Compression::None,
            max_value_bytes: Some(100_000),
            hybrid: None,
            read_quota_keys_per_s: None,
            storage_quota_bytes: None,
            versions_to_keep: None,
        })
        .await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("d.jsonl");
    // A 100,000-character string is 100,003 bytes serialized (its length takes 3).
    write_json_dataset(&path, 10, |i| {
        serde_json::Value::String("x".repeat(if i == 7 { 100_000 } else { 10 }))
    })?;
    let err = cluster.push("limited", &path).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            rialto_push::PushError::ValueTooLarge {
                bytes: 100_003,
                max: 100_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(message.contains(&format!("\"{}\"", key_of(7))), "{message}");
    let store = cluster.admin().describe_store("limited").await?;
    assert_eq!(store.store.largest_version, 0, "no version was allocated");
    assert!(store.versions.is_empty());

    write_json_dataset(&path, 10, |i| {
        serde_json::Value::String("x".repeat(if i == 7 { 99_997 } else { 10 }))
    })?;
    assert_eq!(cluster.push("limited", &path).await?.version, 1);
    cluster.shutdown().await
}
