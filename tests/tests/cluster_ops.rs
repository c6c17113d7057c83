//! Cluster operations on real clusters (etcd, tansu, several servers): a lost server's replicas
//! rebuilt elsewhere after the rebalance delay, a server back within the delay keeping its
//! replicas, a new server taking its share, a drained server emptied, all without a failed
//! read; rollback and roll-forward seen by a running client; versions and stores deleted with
//! their topics and records.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rialto_controller::RebalanceConfig;
use rialto_fast_client::Client;
use rialto_protocol::avro::Value;
use rialto_protocol::meta::{
    version_topic, Layout, ReplicaRecord, ReplicaState, VersionRecord, DEFAULT_ROOT,
};
use rialto_server::FaultConfig;
use rialto_tests::{key_of, string_value, wait_until, Cluster, ClusterOptions};
use tokio::task::JoinHandle;

const RECORDS: usize = 2_000;
const VALUE_BYTES: usize = 100;
const LEASE_TTL_S: i64 = 2;

/// Four servers in two zones (groups {server-0, server-2} and {server-1, server-3}) with store
/// `ops`: 4 partitions, RF 2, [`RECORDS`] records.
async fn ops_cluster(delay: Duration) -> Result<Cluster> {
    let cluster = Cluster::start_opts(ClusterOptions {
        servers: 4,
        zones: 2,
        lease_ttl_s: LEASE_TTL_S,
        rebalance: RebalanceConfig {
            delay,
            moves_max: 8,
        },
        ..ClusterOptions::default()
    })
    .await?;
    cluster
        .create_string_store("ops", 4, 2, RECORDS, VALUE_BYTES)
        .await?;
    Ok(cluster)
}

/// Reads until stopped: batch-gets of 100 random keys and single gets, every value checked.
struct Reader {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    task: JoinHandle<Vec<String>>,
}

impl Reader {
    fn start(client: Client) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), calls.clone());
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let picked: Vec<usize> = (0..100).map(|_| rng.gen_range(0..RECORDS)).collect();
                let keys: Vec<Value> = picked.iter().map(|&i| Value::String(key_of(i))).collect();
                match client.batch_get(&keys).await {
                    Ok(values) => {
                        for (i, v) in picked.iter().zip(values) {
                            if v != Some(Value::String(string_value(*i, VALUE_BYTES))) {
                                failures.push(format!("batch-get of {}: {v:?}", key_of(*i)));
                            }
                        }
                    }
                    Err(e) => failures.push(format!("batch-get: {e}")),
                }
                match client.get(&keys[0]).await {
                    Ok(Some(Value::String(v))) if v == string_value(picked[0], VALUE_BYTES) => {}
                    other => failures.push(format!("get of {}: {other:?}", key_of(picked[0]))),
                }
                c.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failures
        });
        Reader { stop, calls, task }
    }

    /// Stops reading; fails if any read failed or if reads stalled.
    async fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await?;
        let calls = self.calls.load(Ordering::Relaxed);
        ensure!(
            failures.is_empty(),
            "{} of {calls} reads failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        ensure!(calls > 20, "only {calls} reads ran");
        Ok(calls)
    }
}

async fn version_record(cluster: &Cluster, store: &str, version: u32) -> Result<VersionRecord> {
    Ok(cluster
        .admin()
        .describe_version(store, version)
        .await?
        .record)
}

/// The replica record `node` wrote for a partition, if any.
async fn replica_record(
    cluster: &Cluster,
    partition: u32,
    node: &str,
) -> Result<Option<ReplicaRecord>> {
    let key = Layout::new(DEFAULT_ROOT).replica("ops", 1, partition, node);
    Ok(match cluster.meta.get(&key).await? {
        Some(kv) => Some(serde_json::from_slice(&kv.value)?),
        None => None,
    })
}

/// Whether version 1 of `ops` has no move in flight, every partition RF distinct nodes none of
/// which is in `absent`, and every assigned replica ONLINE (read from etcd).
async fn settled(cluster: &Cluster, absent: &[&str]) -> Result<bool> {
    let d = cluster.admin().describe_version("ops", 1).await?;
    if !d.record.moves.is_empty() {
        return Ok(false);
    }
    for (p, nodes) in d.record.assignment.iter().enumerate() {
        let mut distinct = nodes.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() != 2 || nodes.iter().any(|n| absent.contains(&n.as_str())) {
            return Ok(false);
        }
        for n in nodes {
            let online = replica_record(cluster, p as u32, n)
                .await?
                .is_some_and(|r| r.state == ReplicaState::Online);
            if !online {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

async fn node_registered(cluster: &Cluster, node: &str) -> Result<bool> {
    Ok(cluster
        .admin()
        .list_nodes()
        .await?
        .iter()
        .any(|n| n.node_id == node))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_server_is_replaced_after_the_delay_and_one_back_in_time_keeps_its_replicas(
) -> Result<()> {
    let delay = Duration::from_secs(8);
    let mut cluster = ops_cluster(delay).await?;
    let reader = Reader::start(cluster.client("ops").await?);
    let before = version_record(&cluster, "ops", 1).await?;

    // server-1 crashes and is back before the delay runs out.
    cluster.kill_server(1).await?;
    let killed = Instant::now();
    wait_until(Duration::from_secs(20), "server-1's lease expired", || {
        let c = &cluster;
        async move { Ok(!node_registered(c, "server-1").await?) }
    })
    .await?;
    cluster.restart_server(1).await?;
    ensure!(
        killed.elapsed() < delay,
        "server-1 was away {:?}, past the delay",
        killed.elapsed()
    );
    wait_until(Duration::from_secs(30), "server-1 back ONLINE", || {
        let c = &cluster;
        async move { settled(c, &[]).await }
    })
    .await?;
    // Past the delay: nothing moved, and its sealed replicas reopened without consuming.
    tokio::time::sleep(delay + Duration::from_secs(2)).await;
    let after = version_record(&cluster, "ops", 1).await?;
    ensure!(
        after.assignment == before.assignment && after.moves.is_empty(),
        "a server back within the delay lost replicas: {:?} → {:?} (moves {:?})",
        before.assignment,
        after.assignment,
        after.moves
    );
    for p in after.partitions_of("server-1") {
        let r = replica_record(&cluster, p, "server-1")
            .await?
            .context("server-1 replica record")?;
        ensure!(
            r.consumed_from == r.offset,
            "partition {p} bootstrapped again: consumed from {} to {}",
            r.consumed_from,
            r.offset
        );
    }

    // Store `solo` has one replica per partition: server-0's is its partition's only copy.
    cluster.create_string_store("solo", 4, 1, 400, 60).await?;
    let solo_lost = version_record(&cluster, "solo", 1)
        .await?
        .partitions_of("server-0");
    ensure!(solo_lost.len() == 1, "server-0 hosts {solo_lost:?} of solo");

    // server-0 dies for good: after the delay its replicas are rebuilt on other servers.
    let lost = version_record(&cluster, "ops", 1)
        .await?
        .partitions_of("server-0");
    ensure!(!lost.is_empty(), "server-0 hosted nothing");
    cluster.kill_server(0).await?;
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(90),
        "replication factor restored without server-0",
        || {
            let c = &cluster;
            async move { settled(c, &["server-0"]).await }
        },
    )
    .await?;
    let restored = killed.elapsed();
    let record = version_record(&cluster, "ops", 1).await?;
    // server-0 was in group 0 with server-2: its replicas went to server-2.
    for p in &lost {
        ensure!(
            record.assignment[*p as usize][0] == "server-2",
            "partition {p} replaced outside its group: {:?}",
            record.assignment[*p as usize]
        );
    }
    let calls = reader.finish().await?;
    eprintln!(
        "replication factor restored {restored:?} after the kill ({LEASE_TTL_S} s lease, {delay:?} delay); {calls} reads, none failed"
    );
    // The partition whose only replica was lost is rebuilt from its topic: every key reads back.
    wait_until(
        Duration::from_secs(60),
        "solo's lost partition rebuilt",
        || async {
            let d = cluster.admin().describe_version("solo", 1).await?;
            Ok(d.record.moves.is_empty()
                && d.record.partitions_of("server-0").is_empty()
                && d.replicas.iter().all(|r| r.state == ReplicaState::Online))
        },
    )
    .await?;
    let solo = cluster.client("solo").await?;
    let keys: Vec<Value> = (0..400).map(|i| Value::String(key_of(i))).collect();
    let values = solo.batch_get(&keys).await?;
    for (i, v) in values.into_iter().enumerate() {
        ensure!(
            v == Some(Value::String(string_value(i, 60))),
            "solo {} read back as {v:?}",
            key_of(i)
        );
    }
    drop(solo);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_server_takes_a_share_and_a_drained_one_is_emptied_without_a_failed_read(
) -> Result<()> {
    let mut cluster = ops_cluster(Duration::from_secs(3)).await?;
    let reader = Reader::start(cluster.client("ops").await?);

    // server-4 joins zone-a (group 0: server-0 and server-2 hold two partitions each).
    let joined = cluster
        .add_server("zone-a", LEASE_TTL_S, FaultConfig::default())
        .await?;
    let new_node = cluster.server_node_id(joined).to_string();
    wait_until(Duration::from_secs(60), "server-4 took a share", || {
        let (c, n) = (&cluster, new_node.clone());
        async move {
            let v = version_record(c, "ops", 1).await?;
            Ok(!v.partitions_of(&n).is_empty() && settled(c, &[]).await?)
        }
    })
    .await?;
    let v = version_record(&cluster, "ops", 1).await?;
    let group0: Vec<usize> = ["server-0", "server-2", new_node.as_str()]
        .iter()
        .map(|n| v.assignment.iter().filter(|p| p[0] == *n).count())
        .collect();
    ensure!(
        group0.iter().all(|&c| (1..=2).contains(&c)),
        "group 0 not balanced: {group0:?} ({:?})",
        v.assignment
    );

    // server-2 is drained: its replicas move away, it keeps serving until each move is done.
    let (ok, out, err) = cluster.admin_cli(&["nodes", "drain", "server-2"])?;
    ensure!(ok, "drain failed: {out}{err}");
    wait_until(Duration::from_secs(60), "server-2 emptied", || {
        let c = &cluster;
        async move {
            let d = c.admin().describe_node("server-2").await?;
            Ok(d.draining && d.replicas.is_empty() && settled(c, &["server-2"]).await?)
        }
    })
    .await?;
    // A new version is not placed on a drained node.
    cluster
        .push_string_records("ops", RECORDS, VALUE_BYTES)
        .await?;
    let v2 = version_record(&cluster, "ops", 2).await?;
    ensure!(
        v2.partitions_of("server-2").is_empty(),
        "version 2 placed on the drained node: {:?}",
        v2.assignment
    );
    let (ok, text, err) = cluster.admin_cli(&["nodes", "describe", "server-2"])?;
    ensure!(ok && text.contains("draining  yes"), "{text}{err}");
    let (ok, text, err) = cluster.admin_cli(&["controllers"])?;
    ensure!(
        ok && text.contains("leader: controller-1 (leading for")
            && text.contains("answered by: controller-1"),
        "{text}{err}"
    );
    let metrics = cluster.admin().metrics().await?;
    for line in [
        "rialto_controller_leader 1",
        "rialto_controller_stores 1",
        "rialto_controller_nodes{state=\"registered\"} 5",
        "rialto_controller_nodes{state=\"draining\"} 1",
        "rialto_controller_versions{status=\"online\"} 2",
        "rialto_controller_replica_moves{reason=\"drain\"} 0",
    ] {
        ensure!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    reader.finish().await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_server_under_load_fails_no_read() -> Result<()> {
    let mut cluster = ops_cluster(Duration::from_secs(60)).await?;
    let reader = Reader::start(cluster.client("ops").await?);
    let before = version_record(&cluster, "ops", 1).await?;
    for i in 0..cluster.server_count() {
        // A clean stop: the server leaves routing (lease revoked) and drains its connections.
        cluster.restart_server(i).await?;
        let node = cluster.server_node_id(i).to_string();
        wait_until(
            Duration::from_secs(30),
            &format!("{node} back ONLINE"),
            || async { settled(&cluster, &[]).await },
        )
        .await?;
        for p in before.partitions_of(&node) {
            let r = replica_record(&cluster, p, &node)
                .await?
                .context("replica record")?;
            ensure!(
                r.consumed_from == r.offset,
                "{node} partition {p} consumed again after a restart"
            );
        }
    }
    let after = version_record(&cluster, "ops", 1).await?;
    ensure!(after.assignment == before.assignment, "replicas moved");
    let calls = reader.finish().await?;
    eprintln!("rolling restart of 4 servers: {calls} reads, none failed");
    cluster.shutdown().await
}

/// Waits until `client` reads key 0 of store `rb` as a value of `value_bytes`; returns how long.
async fn wait_for_value_size(client: &Client, value_bytes: usize) -> Result<Duration> {
    let started = Instant::now();
    let expected = Value::String(string_value(0, value_bytes));
    wait_until(
        Duration::from_secs(20),
        &format!("client reads {value_bytes}-byte values"),
        || async { Ok(client.get(&Value::String(key_of(0))).await? == Some(expected.clone())) },
    )
    .await?;
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_roll_forward_and_deletes_through_the_admin_cli() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    cluster.create_string_store("rb", 2, 2, 500, 50).await?;
    cluster.push_string_records("rb", 500, 80).await?;
    let client = cluster.client("rb").await?;
    wait_for_value_size(&client, 80).await?;

    let (ok, out, err) = cluster.admin_cli(&["stores", "rollback", "rb"])?;
    ensure!(
        ok && out.contains("current version 1, backup 2"),
        "{out}{err}"
    );
    let seen = wait_for_value_size(&client, 50).await?;
    eprintln!("rollback visible to a running client {seen:?} after the admin call returned");
    let (ok, _, err) = cluster.admin_cli(&["stores", "rollback", "rb"])?;
    ensure!(
        !ok && err.contains("roll-forward"),
        "second rollback: {err}"
    );

    let (ok, out, err) = cluster.admin_cli(&["stores", "roll-forward", "rb"])?;
    ensure!(
        ok && out.contains("current version 2, backup 1"),
        "{out}{err}"
    );
    wait_for_value_size(&client, 80).await?;

    let (ok, _, err) = cluster.admin_cli(&["versions", "delete", "rb", "2"])?;
    ensure!(
        !ok && err.contains("current version"),
        "deleting current: {err}"
    );
    let (ok, out, err) = cluster.admin_cli(&["versions", "delete", "rb", "1"])?;
    ensure!(ok, "{out}{err}");
    let r = wait_until(Duration::from_secs(60), "version 1 retired", || async {
        let d = cluster.admin().describe_store("rb").await?;
        let topic = cluster
            .pubsub
            .partition_count(&version_topic("rb", 1))
            .await?;
        Ok(d.store.backup_version.is_none()
            && d.versions.iter().all(|v| v.record.version != 1)
            && topic.is_none())
    })
    .await;
    if r.is_err() {
        eprintln!(
            "{}",
            std::fs::read_to_string(cluster.services.dir().join("tansu.log")).unwrap_or_default()
        );
    }
    r?;
    let (ok, _, err) = cluster.admin_cli(&["stores", "rollback", "rb"])?;
    ensure!(
        !ok && err.contains("no backup"),
        "rollback with no backup: {err}"
    );
    ensure!(
        client.get(&Value::String(key_of(0))).await? == Some(Value::String(string_value(0, 80))),
        "the current version stopped serving"
    );
    let (ok, out, _) = cluster.admin_cli(&["versions", "list", "rb"])?;
    ensure!(
        ok && out.contains("current") && !out.contains("backup"),
        "{out}"
    );
    let (ok, out, err) = cluster.admin_cli(&["replicas", "rb"])?;
    ensure!(ok && out.matches("ONLINE").count() == 4, "{out}{err}");
    let (ok, _, err) = cluster.admin_cli(&["replicas", "rb", "--version", "9"])?;
    ensure!(!ok && err.contains("no version 9"), "{err}");

    let (ok, _, err) = cluster.admin_cli(&["stores", "delete", "rb"])?;
    ensure!(!ok && err.contains("--yes"), "delete without --yes: {err}");
    let (ok, out, err) = cluster.admin_cli(&["stores", "delete", "rb", "--yes"])?;
    ensure!(ok, "{out}{err}");
    let layout = Layout::new(DEFAULT_ROOT);
    wait_until(Duration::from_secs(60), "store rb deleted", || async {
        let stores = cluster.admin().list_stores().await?;
        let versions = cluster
            .meta
            .list(&layout.store_versions_prefix("rb"))
            .await?
            .0;
        let replicas = cluster
            .meta
            .list(&layout.store_replicas_prefix("rb"))
            .await?
            .0;
        let topic = cluster
            .pubsub
            .partition_count(&version_topic("rb", 2))
            .await?;
        Ok(stores.iter().all(|s| s.name != "rb")
            && versions.is_empty()
            && replicas.is_empty()
            && topic.is_none())
    })
    .await?;
    // The name is free again.
    cluster.create_string_store("rb", 2, 2, 100, 30).await?;
    // A push larger than the storage quota is refused before a version is allocated.
    let (ok, out, err) =
        cluster.admin_cli(&["stores", "update", "rb", "--storage-quota", "1000"])?;
    ensure!(ok && out.contains("storage quota 1000 bytes"), "{out}{err}");
    let refused = cluster.push_string_records("rb", 100, 30).await;
    let message = format!(
        "{:#}",
        refused.err().context("push over the quota went through")?
    );
    ensure!(message.contains("storage quota of 1000 bytes"), "{message}");
    let d = cluster.admin().describe_store("rb").await?;
    ensure!(
        d.store.largest_version == 1,
        "a version was allocated: {:?}",
        d.store
    );
    // Three versions kept, then two: the oldest is retired.
    let (ok, out, err) = cluster.admin_cli(&[
        "stores",
        "update",
        "rb",
        "--storage-quota",
        "0",
        "--versions-to-keep",
        "3",
    ])?;
    ensure!(ok && out.contains("keeps 3 versions"), "{out}{err}");
    cluster.push_string_records("rb", 100, 31).await?;
    cluster.push_string_records("rb", 100, 32).await?;
    let online = |d: &rialto_protocol::admin::StoreDescription| {
        d.versions
            .iter()
            .filter(|v| v.record.status == rialto_protocol::meta::VersionStatus::Online)
            .map(|v| v.record.version)
            .collect::<Vec<_>>()
    };
    // Give the leader a few passes: nothing may be retired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = cluster.admin().describe_store("rb").await?;
    ensure!(online(&d) == [1, 2, 3], "{:?}", online(&d));
    let (ok, _, err) = cluster.admin_cli(&["stores", "update", "rb", "--versions-to-keep", "1"])?;
    ensure!(!ok && err.contains("versions to keep must be 2"), "{err}");
    let (ok, out, err) =
        cluster.admin_cli(&["stores", "update", "rb", "--versions-to-keep", "2"])?;
    ensure!(ok, "{out}{err}");
    wait_until(Duration::from_secs(60), "version 1 retired", || async {
        Ok(online(&cluster.admin().describe_store("rb").await?) == [2, 3])
    })
    .await?;
    drop(client);
    cluster.shutdown().await
}

/// The p99 of `samples`.
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// Latencies of `count` batch-gets of 20 keys of store `calm`, one after another.
async fn calm_latencies(client: &Client, count: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    for n in 0..count {
        let keys: Vec<Value> = (0..20)
            .map(|i| Value::String(key_of((n * 20 + i) % 1_000)))
            .collect();
        let started = Instant::now();
        let values = client.batch_get(&keys).await?;
        samples.push(started.elapsed());
        ensure!(values.iter().all(Option::is_some), "calm lost keys");
    }
    Ok(samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_over_its_read_quota_is_refused_and_its_neighbour_keeps_serving() -> Result<()> {
    const QUOTA: u64 = 2_000;
    let cluster = Cluster::start(3).await?;
    cluster
        .create_string_store("calm", 4, 2, 1_000, 100)
        .await?;
    cluster
        .create_string_store("noisy", 4, 2, 1_000, 100)
        .await?;
    let (ok, out, err) = cluster.admin_cli(&[
        "stores",
        "update",
        "noisy",
        "--read-quota",
        &QUOTA.to_string(),
    ])?;
    ensure!(ok && out.contains("read quota 2000 keys/s"), "{out}{err}");
    let calm = cluster.client("calm").await?;
    let noisy = cluster.client("noisy").await?;
    // Servers follow the store record: wait until a burst past the quota is refused.
    wait_until(Duration::from_secs(20), "the quota in force", || async {
        let keys: Vec<Value> = (0..1_000).map(|i| Value::String(key_of(i))).collect();
        Ok(matches!(
            noisy.batch_get(&keys).await,
            Err(rialto_fast_client::ClientError::QuotaExceeded { .. })
        ))
    })
    .await?;
    let unloaded = p99(calm_latencies(&calm, 300).await?);

    // Flood `noisy` at about 10x its quota: 4 tasks of 100-key batch-gets, 50 a second each.
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for t in 0..4usize {
        let (noisy, stop) = (noisy.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let (mut accepted, mut refused, mut other) = (0u64, 0u64, Vec::new());
            let mut n = t;
            while !stop.load(Ordering::Relaxed) {
                let keys: Vec<Value> = (0..100)
                    .map(|i| Value::String(key_of((n * 100 + i) % 1_000)))
                    .collect();
                n += 4;
                match noisy.batch_get(&keys).await {
                    Ok(_) => accepted += 100,
                    Err(rialto_fast_client::ClientError::QuotaExceeded { .. }) => refused += 1,
                    Err(e) => other.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (accepted, refused, other)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_started = Instant::now();
    let loaded = p99(calm_latencies(&calm, 300).await?);
    stop.store(true, Ordering::Relaxed);
    let (mut accepted, mut refused) = (0, 0);
    for task in flood {
        let (a, r, other) = task.await?;
        ensure!(other.is_empty(), "noisy reads failed otherwise: {other:?}");
        accepted += a;
        refused += r;
    }
    let secs = flood_started.elapsed().as_secs_f64() + 0.5;
    let rate = accepted as f64 / secs;
    eprintln!(
        "noisy: {rate:.0} keys/s accepted of a {QUOTA} keys/s quota, {refused} batch-gets refused; \
         calm batch-get p99 {unloaded:?} unloaded, {loaded:?} beside the flood ({:.2}x)",
        loaded.as_secs_f64() / unloaded.as_secs_f64()
    );
    ensure!(refused > 0, "nothing was refused");
    let metrics = noisy.metrics_prometheus();
    let refusals = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rialto_client_quota_refusals_total{store=\"noisy\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .context("quota refusals in the client's metrics")?;
    ensure!(
        refusals >= refused,
        "{refusals} refusals counted, {refused} seen\n{metrics}"
    );
    ensure!(
        metrics.contains("rialto_client_batch_get_seconds_bucket{store=\"noisy\",le=\"+Inf\"}"),
        "{metrics}"
    );
    // One second of burst on top of the quota, and one batch of debt per server.
    let bound = QUOTA as f64 * (secs + 1.0) + 300.0;
    ensure!(
        (accepted as f64) <= bound,
        "{accepted} keys accepted in {secs:.1} s, over the quota's {bound:.0}"
    );
    drop((calm, noisy));
    cluster.shutdown().await
}
