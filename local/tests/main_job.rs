//! The main job on the embedded default, as `scripts/demo.sh` runs it: no etcd, no broker.

use std::process::Command;

use rialto_local::{LocalCluster, LocalOptions};
use rialto_protocol::avro::Value;

#[test]
fn the_demo_pushes_reads_back_every_record_and_writes_in_real_time() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rialto-local"))
        .args(["demo", "--records", "3000", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
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
