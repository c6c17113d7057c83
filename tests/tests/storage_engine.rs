//! The storage engine on a real cluster (etcd, tansu, three servers): storage profiles, sorted
//! SST ingestion versus the memtable path, detection of unsorted data announced as sorted, and
//! sealed read-only versions that a restart serves without consuming again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::envelope::CompressionCodec;
use rialto_protocol::meta::{
    Compression, Layout, ReplicaRecord, ReplicaState, StorageProfile, VersionStatus, DEFAULT_ROOT,
};
use rialto_protocol::partitioner::partition_for_key;
use rialto_tests::{key_of, string_value, wait_until, Cluster, STRING_SCHEMA};

const PARTITIONS: u32 = 4;
const RECORDS: usize = 3_000;
const VALUE_BYTES: usize = 200;

/// Serialized (key, value) of records `0..RECORDS` (the same as `push_string_records` writes),
/// by partition, in key order.
fn dataset() -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let codec = AvroCodec::parse(STRING_SCHEMA).unwrap();
    let mut out = vec![Vec::new(); PARTITIONS as usize];
    for i in 0..RECORDS {
        let key = codec.encode(&Value::String(key_of(i)), "key").unwrap();
        let value = codec
            .encode(&Value::String(string_value(i, VALUE_BYTES)), "value")
            .unwrap();
        out[partition_for_key(&key, PARTITIONS) as usize].push((key, value));
    }
    for p in &mut out {
        p.sort();
    }
    out
}

/// Every key's raw value as the fast client reads it from the store's current version.
async fn read_all(cluster: &Cluster, store: &str) -> Result<BTreeMap<usize, Option<Vec<u8>>>> {
    let client = cluster.client(store).await?;
    let keys: Vec<Value> = (0..RECORDS + 10)
        .map(|i| Value::String(key_of(i)))
        .collect();
    let mut out = BTreeMap::new();
    for (i, value) in client.batch_get(&keys).await?.into_iter().enumerate() {
        out.insert(i, value.map(|v| format!("{v:?}").into_bytes()));
    }
    Ok(out)
}

/// The replica records of `store` version `version`, with the node of each.
async fn replica_records(
    cluster: &Cluster,
    store: &str,
    version: u32,
) -> Result<Vec<(String, ReplicaRecord)>> {
    let prefix = Layout::new(DEFAULT_ROOT).version_replicas_prefix(store, version);
    let (kvs, _) = cluster.meta.list(&prefix).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let node = kv.key.rsplit('/').next()?.to_string();
            Some((node, serde_json::from_slice(&kv.value).ok()?))
        })
        .collect())
}

/// SST files ingested by all servers of the cluster so far.
fn sst_files_ingested(cluster: &Cluster) -> u64 {
    (0..cluster.server_count())
        .filter_map(|i| cluster.server(i))
        .map(|s| s.metrics().sst_files_ingested.load(Ordering::Relaxed))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sorted_and_unsorted_pushes_serve_the_same_data_in_both_profiles() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    for (store, profile) in [
        ("mem", StorageProfile::InMemory),
        ("disk", StorageProfile::OnDisk),
    ] {
        cluster
            .create_store_with(
                store,
                STRING_SCHEMA,
                STRING_SCHEMA,
                PARTITIONS,
                2,
                profile,
                Compression::None,
            )
            .await?;
        let ingested_before = sst_files_ingested(&cluster);
        // Version 1: the push job (sorted).
        cluster
            .push_string_records(store, RECORDS, VALUE_BYTES)
            .await?;
        let ingested = sst_files_ingested(&cluster) - ingested_before;
        // One chunk per replica (4 partitions × RF 2), PlainTable and block-based alike.
        assert_eq!(ingested, 8, "{store}: SST files ingested");
        let sorted_reads = read_all(&cluster, store).await?;
        assert_eq!(
            sorted_reads.values().filter(|v| v.is_some()).count(),
            RECORDS
        );

        // Version 2: the same records, unsorted (reversed in every partition), announced unsorted.
        let mut reversed = dataset();
        for p in &mut reversed {
            p.reverse();
        }
        let v2 = cluster.push_envelopes(store, &reversed, false).await?;
        let status = cluster
            .wait_for_version_status(store, v2, |s| {
                s != &VersionStatus::Pushing && s != &VersionStatus::PushWritten
            })
            .await?;
        assert_eq!(status, VersionStatus::Online, "{store}");
        wait_until(Duration::from_secs(20), "client on version 2", || {
            let admin = cluster.admin();
            async move { Ok(admin.describe_store(store).await?.store.current_version == Some(v2)) }
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let unsorted_reads = read_all(&cluster, store).await?;
        assert_eq!(sorted_reads, unsorted_reads, "{store}: identical reads");

        // Every replica reports its size; the admin view shows the profile.
        let described = cluster.admin().describe_store(store).await?;
        assert_eq!(described.store.storage, profile);
        for version in [1, v2] {
            let records = replica_records(&cluster, store, version).await?;
            assert_eq!(records.len(), PARTITIONS as usize * 2);
            for (node, r) in records {
                assert_eq!(r.state, ReplicaState::Online);
                assert!(r.disk_bytes > 0, "{store} v{version} on {node}: {r:?}");
                if profile == StorageProfile::InMemory {
                    assert!(r.memory_bytes >= r.disk_bytes / 2, "{store}: {r:?}");
                }
            }
        }
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsorted_data_announced_as_sorted_fails_the_push_and_keeps_serving() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    cluster
        .create_store("liar", STRING_SCHEMA, STRING_SCHEMA, PARTITIONS, 2)
        .await?;
    cluster
        .push_string_records("liar", RECORDS, VALUE_BYTES)
        .await?;
    let before = read_all(&cluster, "liar").await?;

    let mut shuffled = dataset();
    shuffled[1].swap(10, 20);
    let reason = cluster
        .push_rejected_envelopes("liar", &shuffled, true, CompressionCodec::None)
        .await?;
    assert!(
        reason.contains("does not sort after the previous key"),
        "{reason}"
    );
    let described = cluster.admin().describe_store("liar").await?;
    assert_eq!(described.store.current_version, Some(1));
    assert_eq!(
        read_all(&cluster, "liar").await?,
        before,
        "version 1 still serves, unchanged"
    );
    // Every replica of version 1 is still ONLINE.
    let v1 = replica_records(&cluster, "liar", 1).await?;
    assert_eq!(v1.len(), PARTITIONS as usize * 2);
    assert!(
        v1.iter().all(|(_, r)| r.state == ReplicaState::Online),
        "{v1:?}"
    );
    // The servers drop the failed version's replicas (closing their consumers), which lets the
    // controller delete its topic (no server may fetch a deleted topic).
    wait_until(
        Duration::from_secs(30),
        "failed version's replicas dropped",
        || async { Ok(replica_records(&cluster, "liar", 2).await?.is_empty()) },
    )
    .await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_server_serves_sealed_versions_without_consuming() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    cluster
        .create_store_with(
            "sealed",
            STRING_SCHEMA,
            STRING_SCHEMA,
            PARTITIONS,
            3,
            StorageProfile::InMemory,
            Compression::None,
        )
        .await?;
    cluster
        .push_string_records("sealed", RECORDS, VALUE_BYTES)
        .await?;
    let before = read_all(&cluster, "sealed").await?;

    cluster.stop_server(1).await?;
    cluster.restart_server(1).await?;
    let node = cluster.server_node_id(1).to_string();
    wait_until(
        Duration::from_secs(30),
        "server-1 replicas ONLINE again",
        || {
            let admin = cluster.admin();
            let node = node.clone();
            async move {
                let v = admin.describe_version("sealed", 1).await?;
                let mine = v
                    .replicas
                    .iter()
                    .filter(|r| r.node_id == node && r.state == ReplicaState::Online)
                    .count();
                Ok(mine == PARTITIONS as usize)
            }
        },
    )
    .await?;
    for (_, record) in replica_records(&cluster, "sealed", 1)
        .await?
        .into_iter()
        .filter(|(n, _)| *n == node)
    {
        assert_eq!(
            record.consumed_from, record.offset,
            "a sealed replica resumes at its end: nothing consumed ({record:?})"
        );
        assert!(record.memory_bytes > 0, "{record:?}");
    }
    let metrics = cluster.server(1).unwrap().metrics();
    assert_eq!(metrics.records_ingested.load(Ordering::Relaxed), 0);

    // Only server-1 left: it serves every key from its reopened read-only replicas.
    cluster.stop_server(0).await?;
    cluster.stop_server(2).await?;
    assert_eq!(read_all(&cluster, "sealed").await?, before);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_larger_than_its_sort_memory_spills_and_serves_the_same() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster
        .create_store("spill", STRING_SCHEMA, STRING_SCHEMA, PARTITIONS, 1)
        .await?;
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("spill.jsonl");
    // Every record twice (identical repeats are dropped), in a scrambled order.
    let mut lines = String::new();
    for j in 0..RECORDS * 2 {
        let i = (j * 7919) % RECORDS;
        let line = serde_json::json!({"key": key_of(i), "value": string_value(i, VALUE_BYTES)});
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(&input, lines)?;
    let spill = dir.path().join("sort");
    std::fs::create_dir(&spill)?;
    let report = cluster
        .push_with("spill", &input, |c| {
            c.sort.memory_bytes = 64 * 1024;
            c.sort.spill_dir = Some(spill.clone());
        })
        .await?;
    assert_eq!(report.records, RECORDS as u64);
    assert_eq!(report.identical_duplicates, RECORDS as u64);
    assert!(
        report.sort_spills > 5,
        "spilled {} times",
        report.sort_spills
    );
    assert_eq!(
        std::fs::read_dir(&spill)?.count(),
        0,
        "the sort's files are gone after the push"
    );
    let reads = read_all(&cluster, "spill").await?;
    assert_eq!(reads.values().filter(|v| v.is_some()).count(), RECORDS);
    for (i, v) in &reads {
        if *i < RECORDS {
            let want = format!("{:?}", Value::String(string_value(*i, VALUE_BYTES)));
            assert_eq!(v.as_deref(), Some(want.as_bytes()), "key {i}");
        }
    }
    cluster.shutdown().await
}
