//! Hybrid stores end to end on real etcd and a real Kafka-protocol broker: real-time writes
//! before, during and after a push survive the swap; a streaming-only store serves writes; a
//! lag above the store's bound holds a version back; a partition leader killed (serving, or in
//! the middle of a new version's replay) is replaced without losing a write; a rollback serves
//! every write made since the swap; concurrent writers end as the broker ordered them; the
//! stream CLI refuses a bad line and writes nothing after it.
//!
//! The oracle is a model of the writes: the batch data, then every real-time put and delete in
//! the order one writer made them (rewind windows here cover the whole test, so the replay
//! applies every real-time write on top of the batch snapshot).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rialto_fast_client::Client;
use rialto_protocol::admin::{ReplicaView, UpdateStoreRequest};
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::envelope::{Envelope, Message};
use rialto_protocol::meta::{
    Compression, HybridConfig, Layout, LeadershipRecord, ReplicaState, StorageProfile, DEFAULT_ROOT,
};
use rialto_protocol::stored::CHECKSUM_BYTES;
use rialto_push::realtime::RealtimeWriter;
use rialto_tests::{
    key_of, sibling_binary, string_value, wait_until, ChildProcess, Cluster, ClusterOptions,
    STRING_SCHEMA,
};

/// Expected contents: key → value (`None`: deleted).
type Model = BTreeMap<String, Option<String>>;

const HOUR: HybridConfig = HybridConfig {
    rewind_seconds: 3600,
    lag_records_max: 1000,
};

async fn put(w: &mut RealtimeWriter, model: &mut Model, key: &str, value: &str) -> Result<()> {
    w.put(&Value::String(key.into()), &Value::String(value.into()))
        .await?;
    model.insert(key.into(), Some(value.into()));
    Ok(())
}

async fn delete(w: &mut RealtimeWriter, model: &mut Model, key: &str) -> Result<()> {
    w.delete(&Value::String(key.into())).await?;
    model.insert(key.into(), None);
    Ok(())
}

/// Puts `k-{i % keys}` = `{tag}-{i}` for `i` in `0..writes`, flushing every thousand and at the
/// end.
async fn put_all(
    w: &mut RealtimeWriter,
    model: &mut Model,
    writes: usize,
    keys: usize,
    tag: &str,
) -> Result<()> {
    for i in 0..writes {
        put(w, model, &format!("k-{}", i % keys), &format!("{tag}-{i}")).await?;
        if i % 1000 == 999 {
            w.flush().await?;
        }
    }
    Ok(w.flush().await?)
}

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// A cluster whose three storage servers run as processes (so a kill is a crash), with a hybrid
/// store `store` of two partitions on all three.
async fn process_cluster(store: &str) -> Result<(Cluster, Vec<ChildProcess>)> {
    let cluster = Cluster::start_opts(ClusterOptions {
        servers: 0,
        ..ClusterOptions::default()
    })
    .await?;
    let mut processes = Vec::new();
    for (i, zone) in ZONES.iter().enumerate() {
        processes.push(cluster.start_server_process(i, zone)?);
    }
    cluster.wait_for_server_count(3).await?;
    cluster
        .create_hybrid_string_store(store, 2, 3, HOUR)
        .await?;
    Ok((cluster, processes))
}

/// Keys of `model` whose value read through `client` differs from the model, with both.
async fn differences(client: &Client, model: &Model) -> Result<Vec<String>> {
    let mut wrong = Vec::new();
    let entries: Vec<(&String, &Option<String>)> = model.iter().collect();
    for chunk in entries.chunks(1000) {
        let keys: Vec<Value> = chunk
            .iter()
            .map(|(k, _)| Value::String((*k).clone()))
            .collect();
        let values = client.batch_get(&keys).await?;
        for ((key, want), got) in chunk.iter().zip(values) {
            let got = match got {
                Some(Value::String(s)) => Some(s),
                None => None,
                Some(other) => Some(format!("{other:?}")),
            };
            if &got != *want {
                wrong.push(format!("{key}: read {got:?}, expected {want:?}"));
            }
        }
    }
    Ok(wrong)
}

/// Waits up to 60 s until every key of `model` reads as the model says.
async fn wait_for_model(client: &Client, model: &Model, what: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // A read may fail while a killed server is still routed to: try again.
        let wrong = match differences(client, model).await {
            Ok(wrong) => wrong,
            Err(e) => vec![format!("read failed: {e:#}")],
        };
        if wrong.is_empty() {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{what}: after 60 s, {} keys differ, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /metrics` of a storage server (plaintext HTTP/2).
async fn scrape_metrics(address: std::net::SocketAddr) -> Result<String> {
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(format!("http://{address}/metrics")).body(())?;
    let (response, _) = client.ready().await?.send_request(request, true)?;
    let mut body = response.await?.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8(text)?)
}

fn replicas_of(d: &rialto_protocol::admin::StoreDescription, version: u32) -> Vec<ReplicaView> {
    d.versions
        .iter()
        .find(|v| v.record.version == version)
        .map(|v| v.replicas.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_time_writes_before_during_and_after_a_push_survive_the_swap() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let admin = cluster.admin();
    cluster
        .create_hybrid_string_store("feed", 4, 2, HOUR)
        .await?;
    let description = admin.describe_store("feed").await?;
    assert_eq!(description.store.hybrid, Some(HOUR));
    assert_eq!(
        description.store.current_version,
        Some(1),
        "an empty first version"
    );
    let client = cluster.client("feed").await?;
    let mut writer = cluster.realtime_writer("feed").await?;
    let mut model = Model::new();

    // A streaming-only store serves real-time writes.
    for i in 0..300 {
        put(
            &mut writer,
            &mut model,
            &format!("rt-{i}"),
            &format!("first-{i}"),
        )
        .await?;
    }
    for i in 0..200 {
        put(&mut writer, &mut model, &key_of(i), &format!("before-{i}")).await?;
    }
    for i in 200..300 {
        // Deleted before the batch data that has them is pushed: the replay deletes them again.
        delete(&mut writer, &mut model, &key_of(i)).await?;
    }
    writer.flush().await?;
    wait_for_model(
        &client,
        &model,
        "real-time writes on the streaming-only version",
    )
    .await?;

    // A push of 4,000 records while writes go on.
    let records = 4000;
    let pushing = AtomicBool::new(true);
    let push = async {
        let report = cluster.push_string_records("feed", records, 24).await;
        pushing.store(false, Ordering::SeqCst);
        report
    };
    let during = async {
        let mut during = Model::new();
        let mut i = 0usize;
        while pushing.load(Ordering::SeqCst) || i < 200 {
            let key = key_of(300 + (i * 7) % 3000);
            if i % 5 == 4 {
                delete(&mut writer, &mut during, &key).await?;
            } else {
                put(&mut writer, &mut during, &key, &format!("during-{i}")).await?;
            }
            i += 1;
            // About 500 writes/s: the version goes live once its lag (about the write rate
            // times the copy's latency) is under its bound.
            if i % 10 == 0 {
                writer.flush().await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        writer.flush().await?;
        anyhow::Ok((during, i))
    };
    let (report, during) = futures::join!(push, during);
    let report = report?;
    let (during, written_during) = during?;
    assert_eq!(report.version, 2);
    eprintln!("{written_during} real-time writes during the push");
    // The model: batch data first, then every real-time write in order.
    let mut expected: Model = (0..records)
        .map(|i| (key_of(i), Some(string_value(i, 24))))
        .collect();
    expected.extend(model);
    expected.extend(during);
    let mut model = expected;
    assert_eq!(client_version(&cluster).await?, 2);
    wait_for_model(
        &client,
        &model,
        "batch data with the real-time writes replayed on it",
    )
    .await?;

    // After the swap, writes reach the new version, and the old one, now the backup, too.
    for i in 0..100 {
        put(&mut writer, &mut model, &key_of(i), &format!("after-{i}")).await?;
        delete(&mut writer, &mut model, &format!("rt-{i}")).await?;
    }
    writer.flush().await?;
    wait_for_model(&client, &model, "real-time writes after the swap").await?;

    let d = admin.describe_store("feed").await?;
    let v2 = replicas_of(&d, 2);
    assert_eq!(v2.len(), 4 * 2);
    for p in 0..4 {
        let leaders = v2.iter().filter(|r| r.partition == p && r.leader).count();
        assert_eq!(leaders, 1, "one leader of partition {p}: {v2:?}");
    }
    assert!(
        v2.iter()
            .all(|r| r.following && r.state == ReplicaState::Online && r.lag.is_some()),
        "{v2:?}"
    );
    let v1 = replicas_of(&d, 1);
    assert!(
        !v1.is_empty() && v1.iter().all(|r| r.following),
        "the backup keeps following: {v1:?}"
    );

    // Every server exports the lag of its v2 replicas and which of them lead; 4 leaders in all.
    let mut leaders = 0;
    for i in 0..3 {
        let text = scrape_metrics(cluster.server_address(i).context("server address")?).await?;
        let lags = text
            .lines()
            .filter(|l| {
                l.starts_with("rialto_server_realtime_lag_records{store=\"feed\",version=\"2\"")
            })
            .count();
        let hosted = v2
            .iter()
            .filter(|r| r.node_id == cluster.server_node_id(i))
            .count();
        assert_eq!(lags, hosted, "server {i}:\n{text}");
        leaders += text
            .lines()
            .filter(|l| {
                l.starts_with("rialto_server_partition_leader{store=\"feed\",version=\"2\"")
                    && l.ends_with(" 1")
            })
            .count();
    }
    assert_eq!(leaders, 4);

    // Lag, leadership and the hybrid settings in the CLI's output.
    let describe = Command::new(sibling_binary("rialto-admin")?)
        .args([
            "--controller",
            &cluster.controller_url(),
            "stores",
            "describe",
            "feed",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&describe.stdout);
    ensure!(describe.status.success(), "describe failed: {text}");
    assert!(
        text.contains("rewind 3600 s, lag bound 1000 records, real-time topic feed_rt"),
        "{text}"
    );
    assert!(text.contains("LAG") && text.contains("LEADER"), "{text}");
    let json = Command::new(sibling_binary("rialto-admin")?)
        .args([
            "--controller",
            &cluster.controller_url(),
            "--json",
            "stores",
            "describe",
            "feed",
        ])
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    let lags: Vec<u64> = json["versions"]
        .as_array()
        .context("versions")?
        .iter()
        .filter(|v| v["record"]["version"] == 2)
        .flat_map(|v| v["replicas"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["lag"].as_u64())
        .collect();
    assert_eq!(lags.len(), 8, "{json}");
    writer.close().await?;
    cluster.shutdown().await
}

/// Whether every replica of `version` follows real-time writes and each of its partitions has
/// one leader.
fn follows_with_leaders(d: &rialto_protocol::admin::StoreDescription, version: u32) -> bool {
    let replicas = replicas_of(d, version);
    let partitions = d.store.partition_count;
    !replicas.is_empty()
        && replicas.iter().all(|r| r.following)
        && (0..partitions).all(|p| {
            replicas
                .iter()
                .filter(|r| r.partition == p && r.leader)
                .count()
                == 1
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_hybrid_store_serves_every_write_made_since_the_swap() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster
        .create_hybrid_string_store("roll", 2, 2, HOUR)
        .await?;
    let admin = cluster.admin();
    let client = cluster.client("roll").await?;
    let mut writer = cluster.realtime_writer("roll").await?;
    // Every real-time write, which every live version must apply, and the batch data of the
    // versions pushed (the same records each time).
    let mut streamed = Model::new();
    let records = 300;
    let batch: Model = (0..records)
        .map(|i| (key_of(i), Some(string_value(i, 16))))
        .collect();
    let on_pushed = |streamed: &Model| {
        let mut m = batch.clone();
        m.extend(streamed.clone());
        m
    };
    // Version 1 is the empty first version of a streaming store: the batch keys are absent.
    let on_empty = |streamed: &Model| {
        let mut m: Model = batch.keys().map(|k| (k.clone(), None)).collect();
        m.extend(streamed.clone());
        m
    };

    for i in 0..50 {
        put(
            &mut writer,
            &mut streamed,
            &key_of(i),
            &format!("first-{i}"),
        )
        .await?;
    }
    writer.flush().await?;
    wait_for_model(&client, &on_empty(&streamed), "the streaming-only version").await?;
    assert_eq!(
        cluster
            .push_string_records("roll", records, 16)
            .await?
            .version,
        2
    );
    for i in 25..75 {
        put(
            &mut writer,
            &mut streamed,
            &key_of(i),
            &format!("after-swap-{i}"),
        )
        .await?;
    }
    delete(&mut writer, &mut streamed, &key_of(0)).await?;
    delete(&mut writer, &mut streamed, &key_of(200)).await?;
    writer.flush().await?;
    wait_for_model(&client, &on_pushed(&streamed), "version 2 after the swap").await?;
    wait_until(
        Duration::from_secs(30),
        "both versions following, each partition led",
        || async {
            let d = admin.describe_store("roll").await?;
            Ok(follows_with_leaders(&d, 1) && follows_with_leaders(&d, 2))
        },
    )
    .await?;

    // Rolled back, the backup has every write made since it was replaced, and takes new ones.
    let rolled = admin.rollback("roll").await?;
    assert_eq!(
        (rolled.current_version, rolled.backup_version),
        (Some(1), Some(2))
    );
    wait_for_model(&client, &on_empty(&streamed), "rolled back to version 1").await?;
    for i in 60..90 {
        put(
            &mut writer,
            &mut streamed,
            &key_of(i),
            &format!("rolled-back-{i}"),
        )
        .await?;
    }
    delete(&mut writer, &mut streamed, &key_of(30)).await?;
    writer.flush().await?;
    wait_for_model(&client, &on_empty(&streamed), "writes while rolled back").await?;
    admin.roll_forward("roll").await?;
    wait_for_model(
        &client,
        &on_pushed(&streamed),
        "rolled forward to version 2",
    )
    .await?;

    // A third version makes 2 the backup: 1, neither current nor backup, is sealed (it stops
    // following) and then retired.
    assert_eq!(
        cluster
            .push_string_records("roll", records, 16)
            .await?
            .version,
        3
    );
    wait_for_model(&client, &on_pushed(&streamed), "version 3").await?;
    wait_until(Duration::from_secs(30), "version 1 retired", || async {
        let d = admin.describe_store("roll").await?;
        Ok(d.versions.iter().all(|v| v.record.version != 1))
    })
    .await?;
    // Its topic waits: the replicas of 2 and 3 fetch real-time writes, and a topic deleted on
    // tansu meanwhile crashes them (`TopicDeletion::WhenIdle`).
    assert!(
        cluster.pubsub.partition_count("roll_v1").await?.is_some(),
        "the topic of version 1 is kept while replicas fetch"
    );
    let metrics = admin.metrics().await?;
    assert!(
        metrics.contains("rialto_controller_topics_awaiting_deletion 1"),
        "{metrics}"
    );
    let d = admin.describe_store("roll").await?;
    assert_eq!(
        (d.store.current_version, d.store.backup_version),
        (Some(3), Some(2))
    );
    assert!(follows_with_leaders(&d, 2), "the new backup follows: {d:?}");
    put(&mut writer, &mut streamed, &key_of(1), "last").await?;
    writer.close().await?;
    wait_for_model(
        &client,
        &on_pushed(&streamed),
        "a write after the third push",
    )
    .await?;
    admin.rollback("roll").await?;
    wait_for_model(&client, &on_pushed(&streamed), "rolled back to version 2").await?;

    // Once the store is deleted nothing fetches: every topic goes, the deferred one too.
    admin.delete_store("roll").await?;
    wait_until(
        Duration::from_secs(60),
        "the store's topics deleted",
        || async {
            let mut left = Vec::new();
            for topic in ["roll_v1", "roll_v2", "roll_v3", "roll_rt"] {
                if cluster.pubsub.partition_count(topic).await?.is_some() {
                    left.push(topic);
                }
            }
            let metrics = admin.metrics().await?;
            Ok(left.is_empty() && metrics.contains("rialto_controller_topics_awaiting_deletion 0"))
        },
    )
    .await?;
    cluster.shutdown().await
}

async fn client_version(cluster: &Cluster) -> Result<u32> {
    cluster
        .admin()
        .describe_store("feed")
        .await?
        .store
        .current_version
        .context("no current version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_store_made_hybrid_takes_writes_from_its_next_version() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    // In memory and compressed: real-time values over one record are chunked, and each chunk
    // compressed on its own.
    cluster
        .create_store_with(
            "made",
            STRING_SCHEMA,
            STRING_SCHEMA,
            2,
            2,
            StorageProfile::InMemory,
            Compression::Zstd,
        )
        .await?;
    cluster.push_string_records("made", 500, 16).await?;
    assert!(
        cluster.realtime_writer("made").await.is_err(),
        "not hybrid yet"
    );

    let updated = Command::new(sibling_binary("rialto-admin")?)
        .args([
            "--controller",
            &cluster.controller_url(),
            "stores",
            "update",
            "made",
        ])
        .args(["--hybrid-rewind-seconds", "600"])
        .output()?;
    let out = String::from_utf8_lossy(&updated.stdout);
    ensure!(
        updated.status.success(),
        "update failed: {out} {}",
        String::from_utf8_lossy(&updated.stderr)
    );
    assert!(
        out.contains("rewind 600 s, lag bound 1000 records"),
        "{out}"
    );
    let record = cluster.admin().describe_store("made").await?.store;
    assert_eq!(
        record.hybrid,
        Some(HybridConfig {
            rewind_seconds: 600,
            lag_records_max: 1000
        })
    );
    // Out of range settings are refused with the reason; so is a rewind longer than the
    // real-time topic (made to keep a week) keeps, as the broker reports its retention.ms.
    let refused = |days: u64| {
        let admin = cluster.admin();
        async move {
            let update = UpdateStoreRequest {
                hybrid: Some(HybridConfig {
                    rewind_seconds: days * 24 * 3600,
                    lag_records_max: 1,
                }),
                ..UpdateStoreRequest::default()
            };
            match admin.update_store("made", &update).await {
                Ok(r) => format!("accepted: {r:?}"),
                Err(e) => e.to_string(),
            }
        }
    };
    let over_limit = refused(100).await;
    assert!(over_limit.contains("over the limit"), "{over_limit}");
    let too_short = refused(20).await;
    assert!(too_short.contains("raise its retention.ms"), "{too_short}");
    assert_eq!(
        cluster
            .admin()
            .describe_store("made")
            .await?
            .store
            .hybrid
            .map(|h| h.rewind_seconds),
        Some(600),
        "unchanged"
    );

    // Writes made now are replayed onto the next version.
    let mut writer = cluster.realtime_writer("made").await?;
    let mut model = Model::new();
    put(&mut writer, &mut model, &key_of(1), "streamed").await?;
    delete(&mut writer, &mut model, &key_of(2)).await?;
    // A value over one record: written as chunks, then its manifest.
    let big = |tag: &str| format!("{tag}-{}", "x".repeat(2_000_000));
    put(&mut writer, &mut model, "big", &big("replayed")).await?;
    writer.flush().await?;
    let client = cluster.client("made").await?;
    // Version 1 is batch-only: it does not take them.
    assert_eq!(
        client.get(&Value::String(key_of(1))).await?,
        Some(Value::String(string_value(1, 16)))
    );
    let report = cluster.push_string_records("made", 500, 16).await?;
    assert_eq!(report.version, 2);
    let mut expected: Model = (0..500)
        .map(|i| (key_of(i), Some(string_value(i, 16))))
        .collect();
    expected.extend(model);
    wait_for_model(
        &client,
        &expected,
        "writes replayed onto the first hybrid version",
    )
    .await?;
    put(&mut writer, &mut expected, "fresh", "after").await?;
    put(&mut writer, &mut expected, "big", &big("replaced")).await?;
    writer.close().await?;
    wait_for_model(&client, &expected, "writes after the swap").await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_lagging_past_its_bound_is_held_back_until_it_catches_up() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    let bound = HybridConfig {
        rewind_seconds: 3600,
        lag_records_max: 10,
    };
    cluster
        .create_hybrid_string_store("lagged", 1, 2, bound)
        .await?;
    let mut writer = cluster.realtime_writer("lagged").await?;
    let mut model = Model::new();
    for i in 0..100 {
        put(&mut writer, &mut model, &format!("rt-{i}"), "x").await?;
    }
    writer.flush().await?;

    // Another holder of version 2's leadership that never copies: the replay cannot progress.
    let layout = Layout::new(DEFAULT_ROOT);
    let leadership = layout.partition_leader("lagged", 2, 0);
    assert!(
        cluster
            .meta
            .compare_and_put(&leadership, None, b"stuck-leader".to_vec(), None)
            .await?
    );
    let push = {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("batch.jsonl");
        rialto_tests::write_json_dataset(&path, 50, |i| {
            serde_json::Value::String(string_value(i, 8))
        })?;
        let mut config = rialto_push::PushConfig::new(&cluster.controller_url(), "lagged", &path);
        config.wait_timeout = Duration::from_secs(120);
        tokio::spawn(async move {
            let _keep = dir;
            rialto_push::push(&config).await
        })
    };
    let admin = cluster.admin();
    let reported = wait_until(
        Duration::from_secs(60),
        "version 2 to report its lag",
        || {
            let admin = admin.clone();
            async move {
                let d = admin.describe_store("lagged").await?;
                Ok(replicas_of(&d, 2)
                    .iter()
                    .filter(|r| r.lag.is_some())
                    .count()
                    == 2)
            }
        },
    )
    .await;
    if let Err(e) = reported {
        if push.is_finished() {
            let ended = push.await?.map(|r| r.version);
            anyhow::bail!("{e:#}; the push ended first: {ended:?}");
        }
        return Err(e);
    }
    let d = admin.describe_store("lagged").await?;
    let v2 = replicas_of(&d, 2);
    assert!(
        v2.iter().all(|r| r.lag.is_some_and(|l| l >= 100)
            && r.state == ReplicaState::Bootstrap
            && !r.leader),
        "{v2:?}"
    );
    assert_eq!(d.store.current_version, Some(1), "held back");
    assert!(!push.is_finished());

    // The stuck holder goes away: a replica takes over, replays, and the version goes live.
    cluster.meta.delete(&leadership).await?;
    let report = push.await??;
    assert_eq!(report.version, 2);
    let mut expected: Model = (0..50)
        .map(|i| (key_of(i), Some(string_value(i, 8))))
        .collect();
    expected.extend(model);
    let client = cluster.client("lagged").await?;
    wait_for_model(&client, &expected, "the caught-up version").await?;
    let holder = cluster.meta.get(&leadership).await?.context("a leader")?;
    let holder = LeadershipRecord::decode(&holder.value)?.holder;
    assert!(holder.starts_with("server-"), "{holder:?}");
    writer.close().await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_partition_leader_is_replaced_and_no_write_is_lost() -> Result<()> {
    let (cluster, mut processes) = process_cluster("kill").await?;
    let client = cluster.client("kill").await?;
    let mut writer = cluster.realtime_writer("kill").await?;
    let mut model = Model::new();
    put_all(&mut writer, &mut model, 500, 200, "a").await?;
    wait_for_model(&client, &model, "writes before the kill").await?;

    let layout = Layout::new(DEFAULT_ROOT);
    let leadership = layout.partition_leader("kill", 1, 0);
    let leader = cluster
        .meta
        .get(&leadership)
        .await?
        .context("partition 0 has a leader")?;
    let leader = LeadershipRecord::decode(&leader.value)?.holder;
    let index: usize = leader.trim_start_matches("server-").parse()?;
    processes[index].kill()?;
    eprintln!("killed {leader}, the leader of partition 0");

    // Writes go on while the leadership is vacant (the lease of the dead server expires in 5 s).
    for i in 0..1500 {
        if i % 10 == 9 {
            delete(&mut writer, &mut model, &format!("k-{}", i % 200)).await?;
        } else {
            put(
                &mut writer,
                &mut model,
                &format!("k-{}", i % 200),
                &format!("b-{i}"),
            )
            .await?;
        }
        if i % 100 == 99 {
            writer.flush().await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    writer.flush().await?;
    wait_for_model(&client, &model, "every write after the leader died").await?;
    let new_leader = cluster
        .meta
        .get(&leadership)
        .await?
        .context("a new leader")?;
    let new_leader = LeadershipRecord::decode(&new_leader.value)?.holder;
    assert_ne!(new_leader, leader);

    // The killed server comes back on its data (its replicas' unflushed writes were lost with
    // it), resumes from its checkpoints and catches up; then it is the only one left.
    processes[index] = cluster.start_server_process(index, ZONES[index])?;
    for i in 0..50 {
        put(
            &mut writer,
            &mut model,
            &format!("k-{i}"),
            &format!("c-{i}"),
        )
        .await?;
    }
    writer.close().await?;
    let admin = cluster.admin();
    wait_until(
        Duration::from_secs(60),
        &format!("{leader}'s replicas ONLINE again"),
        || {
            let admin = admin.clone();
            let leader = leader.clone();
            async move {
                let d = admin.describe_store("kill").await?;
                let back = replicas_of(&d, 1)
                    .iter()
                    .filter(|r| {
                        r.node_id == leader && r.state == ReplicaState::Online && r.following
                    })
                    .count();
                Ok(back == 2)
            }
        },
    )
    .await?;
    for (i, process) in processes.iter_mut().enumerate() {
        if i != index {
            process.kill()?;
        }
    }
    wait_for_model(
        &client,
        &model,
        "every write, read from the restarted server alone",
    )
    .await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_cli_stops_at_a_bad_line_having_written_nothing_after_it() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    cluster
        .create_hybrid_string_store("cli", 2, 1, HOUR)
        .await?;
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("stream.jsonl");
    std::fs::write(
        &input,
        "{\"key\": \"a\", \"value\": \"1\"}\n\
         {\"key\": \"b\", \"value\": \"2\"}\n\
         {\"key\": \"a\", \"delete\": true}\n\
         {\"key\": \"c\", \"value\": 3}\n\
         {\"key\": \"d\", \"value\": \"4\"}\n",
    )?;
    let out = Command::new(sibling_binary("rialto-push")?)
        .args([
            "stream",
            "--store",
            "cli",
            "--controller",
            &cluster.controller_url(),
        ])
        .arg("--input")
        .arg(&input)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout} {stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
    assert!(stdout.contains("2 puts and 1 delete"), "{stdout}");

    let client = cluster.client("cli").await?;
    let model: Model = [
        ("a".to_string(), None),
        ("b".to_string(), Some("2".to_string())),
        ("c".to_string(), None),
        ("d".to_string(), None),
    ]
    .into_iter()
    .collect();
    wait_for_model(&client, &model, "the lines before the bad one").await?;
    // Nothing from line 4 on reached the real-time topic: only `a` and `b` were written.
    let codec = AvroCodec::parse(STRING_SCHEMA)?;
    let written: Vec<Vec<u8>> = ["a", "b"]
        .iter()
        .map(|k| codec.encode(&Value::String(k.to_string()), "key"))
        .collect::<Result<_, _>>()?;
    let mut keys: Vec<Vec<u8>> = realtime_log(&cluster, "cli", 2)
        .await?
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys, written, "keys on the real-time topic");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_while_a_new_version_replays_is_replaced_and_no_write_is_lost() -> Result<()>
{
    let (cluster, mut processes) = process_cluster("replay").await?;
    let client = cluster.client("replay").await?;
    let mut writer = cluster.realtime_writer("replay").await?;
    // Enough real-time writes that the next version's replay takes a while.
    let mut model = Model::new();
    put_all(&mut writer, &mut model, 20_000, 3000, "a").await?;
    wait_for_model(&client, &model, "writes on the streaming-only version").await?;

    let records = 2000;
    let push = cluster.push_string_records("replay", records, 16);
    let layout = Layout::new(DEFAULT_ROOT);
    let leadership = layout.partition_leader("replay", 2, 0);
    let kill = async {
        // The first leader of version 2's partition 0 starts the replay after END_OF_PUSH.
        let leader = loop {
            if let Some(kv) = cluster.meta.get(&leadership).await? {
                break LeadershipRecord::decode(&kv.value)?.holder;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Killed once it has copied some of the replay into the version topic.
        let (_, started) = cluster.pubsub.watermarks("replay_v2", 0).await?;
        let mut copied = 0;
        for _ in 0..6000 {
            copied = cluster.pubsub.watermarks("replay_v2", 0).await?.1 - started;
            if copied >= 500 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let index: usize = leader.trim_start_matches("server-").parse()?;
        processes[index].kill()?;
        let (_, at_kill) = cluster.pubsub.watermarks("replay_v2", 0).await?;
        eprintln!(
            "killed {leader}, leader of version 2's partition 0, {copied} records into its replay \
             (version topic end {at_kill})"
        );
        for i in 0..2000 {
            let key = format!("k-{}", i % 3000);
            if i % 10 == 9 {
                delete(&mut writer, &mut model, &key).await?;
            } else {
                put(&mut writer, &mut model, &key, &format!("b-{i}")).await?;
            }
            if i % 200 == 199 {
                writer.flush().await?;
            }
        }
        writer.flush().await?;
        wait_until(
            Duration::from_secs(60),
            "a new leader of partition 0",
            || async {
                Ok(cluster
                    .meta
                    .get(&leadership)
                    .await?
                    .is_some_and(|kv| kv.value != leader.as_bytes()))
            },
        )
        .await?;
        // The version goes live only with every replica ONLINE: the killed server comes back
        // on its data and catches up.
        processes[index] = cluster.start_server_process(index, ZONES[index])?;
        anyhow::Ok(())
    };
    let (report, killed) = futures::join!(push, kill);
    killed?;
    assert_eq!(report?.version, 2);
    let mut expected: Model = (0..records)
        .map(|i| (key_of(i), Some(string_value(i, 16))))
        .collect();
    expected.extend(model);
    wait_for_model(
        &client,
        &expected,
        "the batch data with every real-time write replayed on it",
    )
    .await?;
    writer.close().await?;
    for process in processes.iter_mut() {
        process.kill()?;
    }
    cluster.shutdown().await
}

/// The puts and deletes on a store's real-time topic, each partition in the broker's order:
/// (key, value body (`checksum ‖ datum`), or `None` for a delete).
async fn realtime_log(
    cluster: &Cluster,
    store: &str,
    partitions: u32,
) -> Result<Vec<(Vec<u8>, Option<Vec<u8>>)>> {
    let topic = rialto_protocol::meta::realtime_topic(store);
    let mut log = Vec::new();
    for partition in 0..partitions {
        let (low, high) = cluster.pubsub.watermarks(&topic, partition).await?;
        let mut consumer = cluster.pubsub.consumer(&topic, partition, low).await?;
        let mut next = low;
        while next < high {
            for record in consumer.poll(1000, Duration::from_millis(500)).await? {
                next = record.offset + 1;
                let envelope = Envelope::decode(&record.value.context("a value")?)?;
                match envelope.message {
                    Message::Put { key, value, .. } => log.push((key, Some(value))),
                    Message::Delete { key } => log.push((key, None)),
                    Message::Control(_) => {}
                }
            }
        }
    }
    Ok(log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_shared_keys_end_as_the_broker_ordered_them() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster
        .create_hybrid_string_store("many", 2, 2, HOUR)
        .await?;
    let client = cluster.client("many").await?;
    // Three writers, each with its own producer identity, interleave puts and deletes on 40
    // shared keys.
    let writes = |w: usize| {
        let cluster = &cluster;
        async move {
            let mut writer = cluster.realtime_writer("many").await?;
            for i in 0..400 {
                let key = Value::String(key_of((i * 7 + w * 3) % 40));
                if i % 13 == w {
                    writer.delete(&key).await?;
                } else {
                    writer
                        .put(&key, &Value::String(format!("writer-{w}-{i}")))
                        .await?;
                }
                if i % 25 == 0 {
                    writer.flush().await?;
                    tokio::task::yield_now().await;
                }
            }
            writer.close().await?;
            anyhow::Ok(())
        }
    };
    futures::try_join!(writes(0), writes(1), writes(2))?;

    // The oracle is the real-time topic itself, read back: per key, its last record there.
    let codec = AvroCodec::parse(STRING_SCHEMA)?;
    let mut model = Model::new();
    // The writer of each put, in log order: the writes must have interleaved for the test to
    // show anything (which writer ends last on a key depends on the machine's scheduling).
    let mut put_writers = Vec::new();
    for (key, value) in realtime_log(&cluster, "many", 2).await? {
        let Value::String(key) = codec.decode(&key, "key")? else {
            anyhow::bail!("a key that is not a string");
        };
        let value = match value {
            Some(body) => match codec.decode(&body[CHECKSUM_BYTES..], "value")? {
                Value::String(s) => Some(s),
                other => anyhow::bail!("a value that is not a string: {other:?}"),
            },
            None => None,
        };
        if let Some(writer) = value.as_deref().and_then(|v| v.split('-').nth(1)) {
            put_writers.push(writer.to_string());
        }
        model.insert(key, value);
    }
    assert_eq!(model.len(), 40);
    // Writers one after the other would switch twice per partition, plus once between the
    // two partitions' logs.
    let switches = put_writers.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches > 5,
        "the writers did not interleave: {switches} switches between writers in the log"
    );
    wait_for_model(&client, &model, "three writers' interleaved writes").await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_real_time_record_halts_its_partition_until_an_operator_skips_it() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster
        .create_hybrid_string_store("halting", 1, 2, HOUR)
        .await?;
    let client = cluster.client("halting").await?;
    let mut writer = cluster.realtime_writer("halting").await?;
    let mut model = Model::new();
    put_all(&mut writer, &mut model, 200, 100, "before").await?;
    wait_for_model(&client, &model, "the writes before the corrupt record").await?;

    // Bytes that are no record, among the writer's records.
    let offset = cluster
        .pubsub
        .send("halting_rt", 0, &[], b"not an envelope")
        .await?
        .await?;
    let mut later = model.clone();
    put_all(&mut writer, &mut later, 100, 100, "after").await?;

    // The leader halts: its replica reports ERROR naming the record and the way out; the other
    // replica serves on what it had, and nothing written after the record is applied.
    let admin = cluster.admin();
    let skip = format!("rialto-admin realtime skip halting --partition 0 --offset {offset}");
    let in_error = |d: &rialto_protocol::admin::StoreDescription| {
        replicas_of(d, 1)
            .into_iter()
            .find(|r| r.state == ReplicaState::Error)
    };
    wait_until(Duration::from_secs(60), "a replica in ERROR", || {
        let admin = admin.clone();
        async move { Ok(in_error(&admin.describe_store("halting").await?).is_some()) }
    })
    .await?;
    let halted = in_error(&admin.describe_store("halting").await?).context("in ERROR")?;
    let error = halted.error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "corrupt record at offset {offset} of halting_rt/0"
        )) && error.contains(&skip),
        "{error}"
    );
    assert!(
        halted.leader,
        "the halted replica keeps the leadership: {halted:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = admin.describe_store("halting").await?;
    let v1 = replicas_of(&d, 1);
    assert!(
        v1.iter()
            .any(|r| r.state == ReplicaState::Online && !r.leader),
        "{v1:?}"
    );
    assert!(
        differences(&client, &model).await?.is_empty(),
        "served as before"
    );
    assert_eq!(
        differences(&client, &later).await?.len(),
        100,
        "nothing after the corrupt record is applied"
    );

    // The operator skips it (the command the error names): every later write arrives.
    let args: Vec<&str> = skip.split(' ').skip(1).collect();
    let (ok, stdout, stderr) = cluster.admin_cli(&args)?;
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("will skip the real-time record"),
        "{stdout}"
    );
    wait_for_model(&client, &later, "the writes after the skipped record").await?;
    wait_until(Duration::from_secs(30), "both replicas ONLINE", || {
        let admin = admin.clone();
        async move {
            let d = admin.describe_store("halting").await?;
            let v1 = replicas_of(&d, 1);
            Ok(v1
                .iter()
                .all(|r| r.state == ReplicaState::Online && r.error.is_none()))
        }
    })
    .await?;
    let (ok, stdout, _) = cluster.admin_cli(&["realtime", "decisions", "halting", "--json"])?;
    assert!(ok);
    let decisions: Vec<rialto_protocol::meta::RealtimeDecision> = serde_json::from_str(&stdout)?;
    assert_eq!(
        decisions
            .iter()
            .map(|d| (d.partition, d.offset, d.action))
            .collect::<Vec<_>>(),
        [(0, offset, rialto_protocol::meta::RealtimeAction::Skip)]
    );
    // The writer that wrote all this is registered; revoked through the CLI, it is gone.
    let (ok, stdout, stderr) = cluster.admin_cli(&["realtime", "writers", "halting", "--json"])?;
    assert!(ok, "{stderr}");
    let writers: Vec<rialto_protocol::admin::RealtimeWriterView> = serde_json::from_str(&stdout)?;
    assert_eq!(writers.len(), 1, "{writers:?}");
    let producer = writers[0].producer.clone();
    let (ok, stdout, stderr) =
        cluster.admin_cli(&["realtime", "revoke", "halting", "--producer", &producer])?;
    assert!(
        ok && stdout.contains(&format!("writer {producer}")),
        "{stdout}{stderr}"
    );
    let (ok, stdout, _) = cluster.admin_cli(&["realtime", "writers", "halting"])?;
    assert!(ok && !stdout.contains(&producer), "{stdout}");
    // A decision about a store without real-time writes, or a partition it lacks, is refused.
    let (ok, _, stderr) = cluster.admin_cli(&[
        "realtime",
        "skip",
        "halting",
        "--partition",
        "1",
        "--offset",
        "0",
    ])?;
    assert!(
        !ok && stderr.contains("there is no partition 1"),
        "{stderr}"
    );
    writer.close().await?;
    cluster.shutdown().await
}
