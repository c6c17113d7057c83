//! The main job on the embedded default, as `scripts/demo.sh` runs it: no etcd, no broker.

use std::process::Command;

use rialto_fast_client::apache_avro::{self, AvroSchema};
use rialto_local::{LocalCluster, LocalOptions};
use rialto_protocol::avro::Value;

/// Runs `rialto-local demo` of 3,000 records on `dir`; its standard output, once it succeeded.
fn demo(dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rialto-local"))
        .args(["demo", "--records", "3000", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

#[test]
fn the_demo_pushes_reads_back_every_record_and_writes_in_real_time() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = demo(dir.path());
    assert!(
        stdout.contains("verified 3000 keys") && stdout.contains("0 missing, 0 wrong"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"get member-42 -> {"member":42,"items":[294,546,302],"score":0.014}"#),
        "{stdout}"
    );
    assert!(stdout.contains("local: OK"), "{stdout}");
    // Every server kept its replicas under the data directory.
    for i in 0..3 {
        assert!(dir.path().join(format!("server-{i}/demo/v1")).is_dir());
    }

    // Run again on the same directory: the stores are there, a second version goes live.
    let stdout = demo(dir.path());
    assert!(
        stdout.contains("store demo exists (current version 1), kept from an earlier run")
            && stdout.contains("local: version 2 live")
            && stdout.contains("0 missing, 0 wrong"),
        "{stdout}"
    );
}

fn string_store(name: &str) -> rialto_protocol::admin::CreateStoreRequest {
    serde_json::from_value(serde_json::json!({
        "name": name, "key_schema": "\"string\"", "value_schema": "\"string\"",
        "partition_count": 4, "replication_factor": 2
    }))
    .unwrap()
}

fn write_input(path: &std::path::Path, word: &str, keys: usize) {
    let lines: String = (0..keys)
        .map(|i| format!("{{\"key\": \"k{i}\", \"value\": \"{word}-{i}\"}}\n"))
        .collect();
    std::fs::write(path, lines).unwrap();
}

/// Reads `keys` until each has its expected value (None: absent), for up to 30 s; panics
/// naming the first key that never did.
async fn await_values(client: &rialto_fast_client::Client, expected: &[(String, Option<String>)]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for (key, want) in expected {
        loop {
            let got = client.get(&Value::String(key.clone())).await.ok().flatten();
            let want = want.clone().map(Value::String);
            if got == want {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{key}: read {got:?}, expected {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_data_directory_keeps_every_store_version_and_real_time_write() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("v1.jsonl");
    write_input(&input, "batch", 300);
    let mut expected_batch: Vec<(String, Option<String>)> = (0..300)
        .map(|i| (format!("k{i}"), Some(format!("batch-{i}"))))
        .collect();
    let mut expected_rt: Vec<(String, Option<String>)> = Vec::new();

    let cluster = LocalCluster::start(LocalOptions::new(dir.path()))
        .await
        .unwrap();
    let admin = cluster.admin();
    admin.create_store(&string_store("s")).await.unwrap();
    rialto_push::push(&cluster.push_config("s", &input))
        .await
        .unwrap();
    let mut hybrid = string_store("h");
    hybrid.hybrid = Some(rialto_protocol::meta::HybridConfig {
        rewind_seconds: 3600,
        lag_records_max: 1000,
    });
    admin.create_store(&hybrid).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while admin
        .describe_store("h")
        .await
        .unwrap()
        .store
        .current_version
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "h never got a version"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut writer = cluster.realtime_writer("h").await.unwrap();
    for i in 0..50 {
        let (key, value) = (format!("r{i}"), format!("before-{i}"));
        writer
            .put(&Value::String(key.clone()), &Value::String(value.clone()))
            .await
            .unwrap();
        expected_rt.push((key, Some(value)));
    }
    writer.delete(&Value::String("r7".into())).await.unwrap();
    expected_rt[7].1 = None;
    writer.close().await.unwrap();
    await_values(&cluster.client("h").await.unwrap(), &expected_rt).await;
    cluster.shutdown().await;

    let cluster = LocalCluster::start(LocalOptions::new(dir.path()))
        .await
        .unwrap();
    let admin = cluster.admin();
    let s = admin.describe_store("s").await.unwrap().store;
    assert_eq!(s.current_version, Some(1));
    // Started means readable: the replicas are back before `start` returns.
    let replicas = admin.describe_version("s", 1).await.unwrap().replicas;
    assert!(
        replicas.len() == 8
            && replicas
                .iter()
                .all(|r| r.state == rialto_protocol::meta::ReplicaState::Online),
        "{replicas:?}"
    );
    let first = cluster
        .client("s")
        .await
        .unwrap()
        .get(&Value::String("k299".into()))
        .await
        .unwrap();
    assert_eq!(first, Some(Value::String("batch-299".into())));
    await_values(&cluster.client("s").await.unwrap(), &expected_batch).await;
    let h_client = cluster.client("h").await.unwrap();
    await_values(&h_client, &expected_rt).await;

    // The cluster goes on: a new version of the batch store, more real-time writes.
    let input = dir.path().join("v2.jsonl");
    write_input(&input, "second", 300);
    let report = rialto_push::push(&cluster.push_config("s", &input))
        .await
        .unwrap();
    assert_eq!(report.version, 2);
    for (i, (_, value)) in expected_batch.iter_mut().enumerate() {
        *value = Some(format!("second-{i}"));
    }
    await_values(&cluster.client("s").await.unwrap(), &expected_batch).await;
    let mut writer = cluster.realtime_writer("h").await.unwrap();
    for i in 40..60 {
        let (key, value) = (format!("r{i}"), format!("after-{i}"));
        writer
            .put(&Value::String(key.clone()), &Value::String(value.clone()))
            .await
            .unwrap();
        match expected_rt.get_mut(i) {
            Some(slot) => slot.1 = Some(value),
            None => expected_rt.push((key, Some(value))),
        }
    }
    writer.close().await.unwrap();
    await_values(&h_client, &expected_rt).await;
    let s = admin.describe_store("s").await.unwrap().store;
    assert_eq!((s.current_version, s.backup_version), (Some(2), Some(1)));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_push_swaps_and_the_admin_api_answers_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(LocalOptions::new(dir.path()))
        .await
        .unwrap();
    let admin = cluster.admin();
    assert_eq!(admin.list_nodes().await.unwrap().len(), 3);
    let request: rialto_protocol::admin::CreateStoreRequest =
        serde_json::from_value(serde_json::json!({
            "name": "s", "key_schema": "\"string\"", "value_schema": "\"string\"",
            "partition_count": 4, "replication_factor": 2
        }))
        .unwrap();
    admin.create_store(&request).await.unwrap();
    for (version, word) in [(1, "first"), (2, "second")] {
        let input = dir.path().join(format!("{word}.jsonl"));
        let lines: String = (0..500)
            .map(|i| format!("{{\"key\": \"k{i}\", \"value\": \"{word}-{i}\"}}\n"))
            .collect();
        std::fs::write(&input, lines).unwrap();
        let report = rialto_push::push(&cluster.push_config("s", &input))
            .await
            .unwrap();
        assert_eq!((report.version, report.records), (version, 500));
        let client = cluster.client("s").await.unwrap();
        let got = client.get(&Value::String("k7".into())).await.unwrap();
        assert_eq!(got, Some(Value::String(format!("{word}-7"))));
    }
    let store = admin.describe_store("s").await.unwrap().store;
    assert_eq!(
        (store.current_version, store.backup_version),
        (Some(2), Some(1))
    );
    cluster.shutdown().await;
}

#[derive(Debug, PartialEq, serde::Deserialize, AvroSchema)]
struct Recommendation {
    member: i64,
    items: Vec<i64>,
    score: f64,
}

/// Reads one field of the stored records.
#[derive(Debug, PartialEq, serde::Deserialize, AvroSchema)]
#[avro(name = "Recommendation")]
struct Score {
    score: f64,
}

/// Its `member` cannot be read from the stored long.
#[derive(Debug, PartialEq, serde::Deserialize, AvroSchema)]
#[avro(name = "Recommendation")]
struct Recommendation2 {
    member: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_reads_return_the_applications_structs_and_name_a_type_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(LocalOptions::new(dir.path()))
        .await
        .unwrap();
    let value_schema = serde_json::json!({"type": "record", "name": "Recommendation", "fields": [
        {"name": "member", "type": "long"},
        {"name": "items", "type": {"type": "array", "items": "long"}},
        {"name": "score", "type": "double"}]});
    let request: rialto_protocol::admin::CreateStoreRequest =
        serde_json::from_value(serde_json::json!({
            "name": "recs", "key_schema": "\"string\"", "value_schema": value_schema.to_string(),
            "partition_count": 2, "replication_factor": 1
        }))
        .unwrap();
    cluster.admin().create_store(&request).await.unwrap();
    let input = dir.path().join("recs.jsonl");
    let lines: String = (0..100)
        .map(|i| {
            format!(
                "{{\"key\": \"m{i}\", \"value\": {{\"member\": {i}, \"items\": [{i}, 7], \"score\": 0.5}}}}\n"
            )
        })
        .collect();
    std::fs::write(&input, lines).unwrap();
    rialto_push::push(&cluster.push_config("recs", &input))
        .await
        .unwrap();

    let client = rialto_fast_client::Client::builder("recs")
        .meta(cluster.meta())
        .connect()
        .await
        .unwrap();
    let one: Option<Recommendation> = client.get_as(&"m42").await.unwrap();
    assert_eq!(
        one,
        Some(Recommendation {
            member: 42,
            items: vec![42, 7],
            score: 0.5
        })
    );
    let many: Vec<Option<Recommendation>> =
        client.batch_get_as(&["m1", "nope", "m99"]).await.unwrap();
    let members: Vec<Option<i64>> = many.iter().map(|r| r.as_ref().map(|r| r.member)).collect();
    assert_eq!(members, [Some(1), None, Some(99)]);

    let wrong = client.get_as::<_, String>(&"m1").await.unwrap_err();
    assert!(
        matches!(
            wrong,
            rialto_fast_client::ClientError::Typed { what: "value", .. }
        ),
        "{wrong}"
    );
    assert!(wrong.to_string().contains("String"), "{wrong}");
    let bad_key = client.get_as::<_, Recommendation>(&17i64).await;
    assert!(bad_key.is_err(), "a long is not a string key");

    // Streaming, typed: records as they come, then completeness; a value that does not fit the
    // type is a failed key there, never a record.
    use futures::StreamExt;
    use rialto_fast_client::TypedEvent;
    let mut stream = client
        .batch_get_stream_as::<_, Recommendation>(&["m3", "m4", "none"])
        .unwrap();
    let (mut found, mut done) = (std::collections::BTreeMap::new(), None);
    while let Some(event) = stream.next().await {
        match event {
            TypedEvent::Record { index, value } => {
                found.insert(index, value.map(|r| r.member));
            }
            TypedEvent::Done(completeness) => done = Some(completeness),
        }
    }
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        [(0, Some(3)), (1, Some(4)), (2, None)]
    );
    assert!(done.unwrap().failed.is_empty());
    let mut stream = client.batch_get_stream_as::<_, String>(&["m3"]).unwrap();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event);
    }
    match events.as_slice() {
        [TypedEvent::Done(done)] => {
            assert_eq!((done.keys_answered, done.failed.len()), (0, 1), "{done:?}");
            assert!(done.failed[0].error.contains("String"), "{done:?}");
        }
        other => panic!("a value of the wrong type came as a record: {other:?}"),
    }

    // Types that carry their schema are checked once, at connect.
    let typed = rialto_fast_client::Client::builder("recs")
        .meta(cluster.meta())
        .connect_typed::<String, Recommendation>()
        .await
        .unwrap();
    assert_eq!(
        typed.get("m42").await.unwrap(),
        Some(Recommendation {
            member: 42,
            items: vec![42, 7],
            score: 0.5
        })
    );
    let many = typed.batch_get(&["m1", "nope", "m99"]).await.unwrap();
    let members: Vec<Option<i64>> = many.iter().map(|r| r.as_ref().map(|r| r.member)).collect();
    assert_eq!(members, [Some(1), None, Some(99)]);
    // A type that reads only some of the fields is a projection of the stored values.
    let scores = rialto_fast_client::Client::builder("recs")
        .meta(cluster.meta())
        .connect_typed::<String, Score>()
        .await
        .unwrap();
    assert_eq!(
        scores.get(&"m3".to_string()).await.unwrap(),
        Some(Score { score: 0.5 })
    );
    // A value type the store's values cannot be read as fails at connect, naming it.
    let wrong = rialto_fast_client::Client::builder("recs")
        .meta(cluster.meta())
        .connect_typed::<String, Recommendation2>()
        .await
        .err()
        .expect("a member that is a string cannot read a long");
    assert!(
        matches!(
            wrong,
            rialto_fast_client::ClientError::Typed { what: "value", .. }
        ),
        "{wrong}"
    );
    assert!(wrong.to_string().contains("Recommendation2"), "{wrong}");
    // So does a key type the store's keys are not.
    let wrong_key = rialto_fast_client::Client::builder("recs")
        .meta(cluster.meta())
        .connect_typed::<i64, Recommendation>()
        .await
        .err()
        .expect("a long is not a string key");
    assert!(
        matches!(
            wrong_key,
            rialto_fast_client::ClientError::Typed { what: "key", .. }
        ),
        "{wrong_key}"
    );

    let no_store = rialto_fast_client::Client::builder("recs").connect().await;
    assert!(matches!(
        no_store,
        Err(rialto_fast_client::ClientError::Config(_))
    ));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_written_by_another_producer_than_the_one_named_never_goes_live() {
    use rialto_protocol::meta::VersionStatus;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(LocalOptions::new(dir.path()))
        .await
        .unwrap();
    let admin = cluster.admin();
    admin.create_store(&string_store("s")).await.unwrap();
    let input = dir.path().join("v1.jsonl");
    write_input(&input, "good", 50);
    rialto_push::push(&cluster.push_config("s", &input))
        .await
        .unwrap();
    let named = admin
        .describe_version("s", 1)
        .await
        .unwrap()
        .record
        .producer;
    assert!(
        named.as_deref().is_some_and(|p| p.len() == 32),
        "the push job names its producer: {named:?}"
    );

    // A push that named producer 01…01, whose topic someone else (02…02) writes.
    let start = admin
        .start_push(
            "s",
            &rialto_protocol::admin::StartPushRequest {
                producer: Some(rialto_protocol::producer::guid_hex(&[1; 16])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let broker = cluster.broker();
    for partition in 0..start.partition_count {
        let mut forged = rialto_server::testing::PushRecords::start([2; 16]);
        forged.put(b"\x04k1", 1, b"forged");
        for record in forged.finish() {
            broker
                .send(&start.topic, partition, &[], &record)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    // The replicas may refuse the forged records (and fail the version) before the push
    // reports itself written.
    if let Err(e) = admin.push_written("s", start.version).await {
        assert!(e.to_string().contains("already failed"), "{e}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let reason = loop {
        let record = admin
            .describe_version("s", start.version)
            .await
            .unwrap()
            .record;
        if let VersionStatus::Failed { reason } = record.status {
            break reason;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "version {} is {:?}",
            start.version,
            record.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(reason.contains("another writer"), "{reason}");
    let store = admin.describe_store("s").await.unwrap().store;
    assert_eq!(store.current_version, Some(1));
    let client = cluster.client("s").await.unwrap();
    assert_eq!(
        client.get(&Value::String("k1".into())).await.unwrap(),
        Some(Value::String("good-1".into()))
    );
    cluster.shutdown().await;
}
