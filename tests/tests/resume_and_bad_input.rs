//! Failure paths on a real cluster: a server restarted mid-bootstrap resumes from its checkpoint;
//! a server process killed mid-push resumes without losing a record; malformed requests, bad datasets and a corrupt record on the topic get clear errors and never
//! change what is served.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use rialto_protocol::admin::StartPushRequest;
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::envelope::{CompressionCodec, ControlMessage, Envelope};
use rialto_protocol::meta::{Layout, ReplicaRecord, ReplicaState, VersionStatus, DEFAULT_ROOT};
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::wire::{self, ErrorBody};
use rialto_protocol::ErrorCode;
use rialto_push::writer::PartitionWriter;
use rialto_push::PushError;
use rialto_tests::{key_of, wait_until, write_json_dataset, Cluster};

const KEY_SCHEMA: &str = r#""string""#;
const VALUE_SCHEMA: &str =
    r#"{"type":"record","name":"Item","fields":[{"name":"n","type":"long"}]}"#;

/// Encodes generated records `range` for a store with `partitions` partitions, by partition.
fn encoded(
    range: std::ops::Range<usize>,
    partitions: u32,
    offset: i64,
) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let (k, v) = (
        AvroCodec::parse(KEY_SCHEMA).unwrap(),
        AvroCodec::parse(VALUE_SCHEMA).unwrap(),
    );
    let mut out = vec![Vec::new(); partitions as usize];
    for i in range {
        let key = k.encode(&Value::String(key_of(i)), "key").unwrap();
        let value = v
            .encode(
                &Value::Record(vec![("n".into(), Value::Long(i as i64 + offset))]),
                "value",
            )
            .unwrap();
        out[partition_for_key(&key, partitions) as usize].push((key, value));
    }
    out
}

async fn send_all(
    cluster: &Cluster,
    topic: &str,
    partition: u32,
    envelopes: Vec<Envelope>,
) -> Result<()> {
    let mut deliveries = Vec::new();
    for e in envelopes {
        deliveries.push(
            cluster
                .pubsub
                .send(topic, partition, &[], &e.encode())
                .await?,
        );
    }
    for d in deliveries {
        d.await?;
    }
    Ok(())
}

async fn replica_records(
    cluster: &Cluster,
    store: &str,
    version: u32,
    node: &str,
) -> Result<Vec<ReplicaRecord>> {
    Ok(replicas_by_key(cluster, store, version, node)
        .await?
        .into_values()
        .collect())
}

/// `node`'s replica records of a version, by their key in etcd (one per partition).
async fn replicas_by_key(
    cluster: &Cluster,
    store: &str,
    version: u32,
    node: &str,
) -> Result<BTreeMap<String, ReplicaRecord>> {
    let prefix = Layout::new(DEFAULT_ROOT).version_replicas_prefix(store, version);
    let (kvs, _) = cluster.meta.list(&prefix).await?;
    Ok(kvs
        .iter()
        .filter(|kv| kv.key.ends_with(&format!("/{node}")))
        .filter_map(|kv| Some((kv.key.clone(), serde_json::from_slice(&kv.value).ok()?)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_bootstrap_resumes_from_checkpoint() -> Result<()> {
    const PARTITIONS: u32 = 4;
    let mut cluster = Cluster::start(3).await?;
    // RF 3 on 3 servers: server-1 hosts every partition.
    cluster
        .create_store("resume", KEY_SCHEMA, VALUE_SCHEMA, PARTITIONS, 3)
        .await?;
    let start = cluster
        .admin()
        .start_push("resume", &StartPushRequest::default())
        .await?;
    let guid = *b"resume-test-guid";
    let mut writers: Vec<PartitionWriter> = (0..PARTITIONS)
        .map(|_| PartitionWriter::new(guid))
        .collect();
    let first_half = encoded(0..2_000, PARTITIONS, 0);
    for (p, w) in writers.iter_mut().enumerate() {
        let mut envelopes = vec![
            w.start_segment(),
            w.control(ControlMessage::StartOfPush {
                sorted: true,
                codec: CompressionCodec::None,
                dictionary: vec![],
            }),
        ];
        envelopes.extend(
            first_half[p]
                .iter()
                .map(|(k, v)| w.put(k.clone(), 1, rialto_tests::stored_body(&start, v))),
        );
        send_all(&cluster, &start.topic, p as u32, envelopes).await?;
    }
    // Wait until server-1 has checkpointed everything written so far, then stop it.
    let expected: Vec<i64> = first_half
        .iter()
        .map(|recs| recs.len() as i64 + 2)
        .collect();
    wait_until(
        Duration::from_secs(30),
        "server-1 ingests the first half",
        || {
            let cluster = &cluster;
            let expected = expected.clone();
            async move {
                let records = replica_records(cluster, "resume", start.version, "server-1").await?;
                let total: i64 = records.iter().map(|r| r.offset).sum();
                Ok(records.len() == PARTITIONS as usize && total == expected.iter().sum::<i64>())
            }
        },
    )
    .await?;
    cluster.stop_server(1).await?;

    let second_half = encoded(2_000..4_000, PARTITIONS, 0);
    for (p, w) in writers.iter_mut().enumerate() {
        let mut envelopes: Vec<Envelope> = second_half[p]
            .iter()
            .map(|(k, v)| w.put(k.clone(), 1, rialto_tests::stored_body(&start, v)))
            .collect();
        envelopes.push(w.control(ControlMessage::EndOfPush));
        envelopes.push(w.end_segment());
        send_all(&cluster, &start.topic, p as u32, envelopes).await?;
    }
    cluster
        .admin()
        .push_written("resume", start.version)
        .await?;
    cluster.restart_server(1).await?;
    wait_until(Duration::from_secs(60), "version 1 live", || {
        let admin = cluster.admin();
        async move {
            Ok(admin.describe_version("resume", 1).await?.record.status == VersionStatus::Online)
        }
    })
    .await?;
    let records = replica_records(&cluster, "resume", 1, "server-1").await?;
    assert_eq!(records.len(), PARTITIONS as usize);
    let mut resumed: Vec<i64> = records.iter().map(|r| r.consumed_from).collect();
    resumed.sort_unstable();
    let mut want = expected.clone();
    want.sort_unstable();
    assert_eq!(
        resumed, want,
        "server-1 must resume exactly at its checkpoints, not at offset 0"
    );

    // Only server-1 up for reads of partition data it resumed: stop the others and read all.
    cluster.stop_server(0).await?;
    cluster.stop_server(2).await?;
    let client = cluster.client("resume").await?;
    let keys: Vec<Value> = (0..4_000).map(|i| Value::String(key_of(i))).collect();
    let values = client.batch_get(&keys).await?;
    for (i, v) in values.iter().enumerate() {
        let v = v
            .as_ref()
            .with_context(|| format!("{} missing after resume", key_of(i)))?;
        assert_eq!(rialto_tests::json_of(VALUE_SCHEMA, v)["n"], i as i64);
    }
    cluster.shutdown().await
}

/// Waits until server-2's replica records of a version satisfy `ok`.
async fn wait_for_replicas(
    cluster: &Cluster,
    store: &str,
    version: u32,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&[ReplicaRecord]) -> bool,
) -> Result<()> {
    let ok = &ok;
    wait_until(timeout, what, || async move {
        Ok(ok(
            &replica_records(cluster, store, version, "server-2").await?
        ))
    })
    .await
}

/// One offset of each of server-2's replica records of a version, by record key.
async fn server_2_offsets(
    cluster: &Cluster,
    store: &str,
    version: u32,
    offset: impl Fn(&ReplicaRecord) -> i64,
) -> Result<BTreeMap<String, i64>> {
    Ok(replicas_by_key(cluster, store, version, "server-2")
        .await?
        .into_iter()
        .map(|(key, r)| (key, offset(&r)))
        .collect())
}

/// A storage server *process* killed with SIGKILL in the middle of two pushes (no flush, no clean
/// close: its memtables are lost) restarts on the same data and finishes both without losing a
/// record. The sorted push resumes exactly at the checkpoint the server last reported (each
/// ingested chunk's checkpoint is synced through the WAL); the unsorted push resumes from what
/// its files held, never past what it reported. Then that server alone serves every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_process_killed_mid_push_resumes_and_loses_nothing() -> Result<()> {
    const PARTITIONS: u32 = 2;
    const HALF: usize = 2_000;
    let mut cluster = Cluster::start(2).await?;
    // RF 3 on 3 servers: the process, server-2, hosts every partition of both stores.
    let mut process = cluster.start_server_process(2, "zone-c")?;
    cluster.wait_for_server_count(3).await?;
    let stores = [("crash-sorted", true), ("crash-unsorted", false)];
    let mut pushes = Vec::new();
    for (store, sorted) in stores {
        cluster
            .create_store(store, KEY_SCHEMA, VALUE_SCHEMA, PARTITIONS, 3)
            .await?;
        let start = cluster
            .admin()
            .start_push(store, &StartPushRequest::default())
            .await?;
        let mut writers: Vec<PartitionWriter> = (0..PARTITIONS)
            .map(|_| PartitionWriter::new(*b"crash-test-guid!"))
            .collect();
        for (p, records) in encoded(0..HALF, PARTITIONS, 0).iter().enumerate() {
            let w = &mut writers[p];
            let mut envelopes = vec![
                w.start_segment(),
                w.control(ControlMessage::StartOfPush {
                    sorted,
                    codec: CompressionCodec::None,
                    dictionary: vec![],
                }),
            ];
            envelopes.extend(
                records
                    .iter()
                    .map(|(k, v)| w.put(k.clone(), 1, rialto_tests::stored_body(&start, v))),
            );
            send_all(&cluster, &start.topic, p as u32, envelopes).await?;
        }
        pushes.push((store, start, writers));
    }
    // Wait until the process reports everything written so far as checkpointed (for the sorted
    // push that takes the chunk's age, 5 s), then kill it.
    let written: i64 = encoded(0..HALF, PARTITIONS, 0)
        .iter()
        .map(|records| records.len() as i64 + 2)
        .sum();
    let mut reported = Vec::new();
    for (store, start, _) in &pushes {
        let what = format!("server-2 checkpoints the first half of {store}");
        wait_for_replicas(
            &cluster,
            store,
            start.version,
            Duration::from_secs(30),
            &what,
            |r| {
                r.len() == PARTITIONS as usize && r.iter().map(|r| r.offset).sum::<i64>() == written
            },
        )
        .await
        .with_context(|| format!("server-2's log: {}", process.log().display()))?;
        reported.push(server_2_offsets(&cluster, store, start.version, |r| r.offset).await?);
    }
    process.kill()?;

    for (store, start, writers) in &mut pushes {
        for (p, records) in encoded(HALF..2 * HALF, PARTITIONS, 0).iter().enumerate() {
            let w = &mut writers[p];
            let mut envelopes: Vec<Envelope> = records
                .iter()
                .map(|(k, v)| w.put(k.clone(), 1, rialto_tests::stored_body(start, v)))
                .collect();
            envelopes.push(w.control(ControlMessage::EndOfPush));
            envelopes.push(w.end_segment());
            send_all(&cluster, &start.topic, p as u32, envelopes).await?;
        }
        cluster.admin().push_written(store, start.version).await?;
    }
    let mut restarted = cluster.start_server_process(2, "zone-c")?;
    for ((store, start, _), (_, sorted)) in pushes.iter().zip(stores) {
        let what = format!("server-2 serves {store} again");
        wait_for_replicas(
            &cluster,
            store,
            start.version,
            Duration::from_secs(60),
            &what,
            |r| r.len() == PARTITIONS as usize && r.iter().all(|r| r.state == ReplicaState::Online),
        )
        .await
        .with_context(|| format!("server-2's log: {}", restarted.log().display()))?;
        let resumed = server_2_offsets(&cluster, store, start.version, |r| r.consumed_from).await?;
        let reported = &reported[if sorted { 0 } else { 1 }];
        if sorted {
            assert_eq!(
                &resumed, reported,
                "{store}: a sorted push resumes exactly at its reported checkpoints"
            );
        } else {
            assert_eq!(resumed.len(), reported.len());
            for (replica, at) in reported {
                let from = resumed[replica];
                assert!(
                    (0..=*at).contains(&from),
                    "{replica}: resumed from {from}, reported {at}"
                );
            }
        }
    }

    for (store, start, _) in &pushes {
        wait_until(Duration::from_secs(30), &format!("{store} live"), || {
            let admin = cluster.admin();
            async move {
                Ok(admin.describe_store(store).await?.store.current_version == Some(start.version))
            }
        })
        .await?;
    }
    // Only the restarted server up: every key of both stores, from it alone.
    cluster.stop_server(0).await?;
    cluster.stop_server(1).await?;
    let keys: Vec<Value> = (0..2 * HALF).map(|i| Value::String(key_of(i))).collect();
    for (store, _) in stores {
        let client = cluster.client(store).await?;
        let values = client.batch_get(&keys).await?;
        for (i, v) in values.iter().enumerate() {
            let v = v
                .as_ref()
                .with_context(|| format!("{store}: {} missing after the crash", key_of(i)))?;
            assert_eq!(
                rialto_tests::json_of(VALUE_SCHEMA, v)["n"],
                i as i64,
                "{store}: {}",
                key_of(i)
            );
        }
    }
    restarted.kill()?;
    cluster.shutdown().await
}

/// Sends one raw HTTP/2 request and returns (status, error code header, body).
async fn raw_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Option<u16>, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(())?;
    let (response, mut stream) = send.send_request(request, body.is_empty())?;
    if !body.is_empty() {
        stream.send_data(Bytes::from(body), true)?;
    }
    let response = response.await?;
    let status = response.status().as_u16();
    let code = response
        .headers()
        .get(wire::ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut body = response.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok((status, code, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_errors_and_never_changes_served_data() -> Result<()> {
    const PARTITIONS: u32 = 4;
    let cluster = Cluster::start(3).await?;
    cluster
        .create_store("guarded", KEY_SCHEMA, VALUE_SCHEMA, PARTITIONS, 3)
        .await?;
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.jsonl");
    write_json_dataset(&good, 1_000, |i| serde_json::json!({"n": i}))?;
    assert_eq!(cluster.push("guarded", &good).await?.version, 1);
    let client = cluster.client("guarded").await?;
    let keys: Vec<Value> = (0..1_000).map(|i| Value::String(key_of(i))).collect();
    let check_v1 = || async {
        let values = client.batch_get(&keys).await?;
        for (i, v) in values.iter().enumerate() {
            let v = v
                .as_ref()
                .with_context(|| format!("{} missing", key_of(i)))?;
            anyhow::ensure!(
                rialto_tests::json_of(VALUE_SCHEMA, v)["n"] == i as i64,
                "{} changed",
                key_of(i)
            );
        }
        Ok::<_, anyhow::Error>(())
    };
    check_v1().await?;

    // Malformed and misdirected HTTP/2 requests: typed errors, the server keeps serving.
    let addr = cluster.server_address(0).expect("server-0 running");
    let key = AvroCodec::parse(KEY_SCHEMA)?.encode(&Value::String(key_of(1)), "key")?;
    let partition = partition_for_key(&key, PARTITIONS);
    let mut too_many = vec![wire::BATCH_GET_FORMAT];
    too_many.extend_from_slice(&1_000_000u32.to_be_bytes());
    let cases: Vec<(&str, String, Vec<u8>, ErrorCode)> = vec![
        (
            "POST",
            wire::batch_get_path("guarded", 1),
            b"\xff garbage".to_vec(),
            ErrorCode::UnsupportedProtocol,
        ),
        (
            "POST",
            wire::batch_get_path("guarded", 1),
            vec![wire::BATCH_GET_FORMAT, 0, 0],
            ErrorCode::BadRequest,
        ),
        (
            "POST",
            wire::batch_get_path("guarded", 1),
            too_many,
            ErrorCode::TooManyKeys,
        ),
        (
            "POST",
            wire::get_path("nostore", 1, 0),
            key.clone(),
            ErrorCode::UnknownStore,
        ),
        (
            "POST",
            wire::get_path("guarded", 99, partition),
            key.clone(),
            ErrorCode::UnknownVersion,
        ),
        (
            "POST",
            wire::get_path("guarded", 1, 77),
            key.clone(),
            ErrorCode::PartitionNotServed,
        ),
        (
            "POST",
            wire::get_path("guarded", 1, partition),
            b"absent".to_vec(),
            ErrorCode::KeyNotFound,
        ),
        ("GET", "/v1/nonsense".into(), vec![], ErrorCode::NotFound),
    ];
    for (method, path, body, want) in cases {
        let (status, code, body) = raw_request(addr, method, &path, body).await?;
        assert_eq!(status, want.http_status(), "{method} {path}");
        assert_eq!(code, Some(want.as_u16()), "{method} {path}");
        let err = ErrorBody::decode(&body)?;
        assert_eq!(err.code, want, "{method} {path}: {}", err.message);
        assert!(!err.message.is_empty());
    }
    let (status, _, body) =
        raw_request(addr, "POST", &wire::get_path("guarded", 1, partition), key).await?;
    assert_eq!(
        status, 200,
        "server-0 still serves after malformed requests"
    );
    assert_eq!(wire::StoredValue::decode(&body)?.0, 1);

    // A record that does not match the schema fails the push before a version is allocated.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"key\":\"a\",\"value\":{\"n\":1}}\n{\"key\":\"b\",\"value\":{\"n\":\"two\"}}\n",
    )?;
    let err = cluster.push("guarded", &bad).await.unwrap_err();
    assert!(
        matches!(err, PushError::BadRecord { record: 2, .. }),
        "{err}"
    );
    // Two values for one key fail the push too.
    let dup = dir.path().join("dup.jsonl");
    std::fs::write(
        &dup,
        "{\"key\":\"a\",\"value\":{\"n\":1}}\n{\"key\":\"a\",\"value\":{\"n\":2}}\n",
    )?;
    let err = cluster.push("guarded", &dup).await.unwrap_err();
    assert!(matches!(err, PushError::DuplicateKey { .. }), "{err}");
    let store = cluster.admin().describe_store("guarded").await?.store;
    assert_eq!(
        (store.current_version, store.largest_version),
        (Some(1), 1),
        "bad datasets allocate no version"
    );

    // A corrupt envelope on the topic: the replicas go to ERROR, the version fails, v1 serves on.
    let start = cluster
        .admin()
        .start_push("guarded", &StartPushRequest::default())
        .await?;
    let records = encoded(0..400, PARTITIONS, 1_000_000);
    for p in 0..PARTITIONS {
        let mut w = PartitionWriter::new(*b"corrupt-test-gid");
        let mut envelopes = vec![
            w.start_segment(),
            w.control(ControlMessage::StartOfPush {
                sorted: true,
                codec: CompressionCodec::None,
                dictionary: vec![],
            }),
        ];
        envelopes.extend(
            records[p as usize]
                .iter()
                .map(|(k, v)| w.put(k.clone(), 1, rialto_tests::stored_body(&start, v))),
        );
        envelopes.push(w.control(ControlMessage::EndOfPush));
        envelopes.push(w.end_segment());
        let mut encoded: Vec<Vec<u8>> = envelopes.iter().map(Envelope::encode).collect();
        if p == 0 {
            let victim = &mut encoded[5];
            let at = victim.len() / 2;
            victim[at] ^= 0x40;
        }
        let mut deliveries = Vec::new();
        for bytes in encoded {
            deliveries.push(cluster.pubsub.send(&start.topic, p, &[], &bytes).await?);
        }
        for d in deliveries {
            d.await?;
        }
    }
    // The replicas may have failed the version on the corrupt record already (they consume while
    // the records are still being sent); then the controller refuses to mark it written.
    if let Err(e) = cluster.admin().push_written("guarded", start.version).await {
        let message = format!("{e:#}");
        ensure!(
            message.contains("already failed")
                && (message.contains("corrupt") || message.contains("checksum")),
            "push_written: {message}"
        );
    }
    wait_until(Duration::from_secs(60), "version 2 failed", || {
        let admin = cluster.admin();
        async move {
            Ok(matches!(
                admin.describe_version("guarded", 2).await?.record.status,
                VersionStatus::Failed { .. }
            ))
        }
    })
    .await?;
    let VersionStatus::Failed { reason } = cluster
        .admin()
        .describe_version("guarded", 2)
        .await?
        .record
        .status
    else {
        anyhow::bail!("version 2 left the failed state");
    };
    assert!(
        reason.contains("corrupt") || reason.contains("checksum"),
        "failure reason should name the corruption: {reason}"
    );
    let store = cluster.admin().describe_store("guarded").await?.store;
    assert_eq!(
        store.current_version,
        Some(1),
        "a failed version never goes live"
    );
    check_v1().await?;
    for i in 0..cluster.server_count() {
        let addr = cluster.server_address(i).expect("running");
        let (status, _, body) = raw_request(addr, "GET", "/health", vec![]).await?;
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"ok"[..]),
            "server-{i} healthy after the corrupt topic"
        );
    }
    cluster.shutdown().await
}
