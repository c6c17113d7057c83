//! Large-fanout reads on real clusters (etcd, tansu, 6 or 12 servers): group routing keeps a
//! batch-get's fanout at one group's servers whatever the replication factor; long-tail retry
//! hides a slow server within its budget; a server killed under load fails no request.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rialto_fast_client::{BatchEvent, Client, Completeness, HealthConfig, LongTailRetry};
use rialto_protocol::avro::Value;
use rialto_tests::{key_of, write_json_dataset, Cluster, ClusterOptions};

const KEYS: usize = 10_000;

fn value_of(i: usize) -> serde_json::Value {
    serde_json::json!(format!("value-{i:0>90}"))
}

/// A cluster of `servers` servers with store `fan` (12 partitions, RF `rf`) holding `KEYS` keys.
async fn cluster_with_store(servers: usize, rf: u32) -> Result<Cluster> {
    let cluster = Cluster::start_opts(ClusterOptions {
        servers,
        ..ClusterOptions::default()
    })
    .await?;
    cluster
        .create_store("fan", r#""string""#, r#""string""#, 12, rf)
        .await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fan.jsonl");
    write_json_dataset(&path, KEYS, value_of)?;
    cluster.push("fan", &path).await?;
    Ok(cluster)
}

fn random_keys(rng: &mut impl Rng, count: usize) -> Vec<Value> {
    (0..count)
        .map(|_| Value::String(key_of(rng.gen_range(0..KEYS))))
        .collect()
}

/// Runs one streaming batch-get to its end and checks every value.
async fn stream_all(client: &Client, keys: &[Value]) -> Result<Completeness> {
    let codec = rialto_protocol::avro::AvroCodec::parse(r#""string""#)?;
    let encoded: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| codec.encode(k, "key"))
        .collect::<Result<_, _>>()?;
    let mut stream = client.batch_get_stream_raw(&encoded)?;
    let mut answered = 0;
    while let Some(event) = stream.next().await {
        match event {
            BatchEvent::Record { index, value, .. } => {
                let value = value.expect("every key exists");
                let Value::String(key) = &keys[index] else {
                    unreachable!()
                };
                let i: usize = key.trim_start_matches("key-").parse()?;
                let decoded = codec_value(&value.bytes)?;
                ensure!(decoded == value_of(i), "wrong value for {key}");
                answered += 1;
            }
            BatchEvent::Done(done) => {
                ensure!(answered == done.keys_answered);
                return Ok(done);
            }
        }
    }
    anyhow::bail!("stream ended without Done")
}

fn codec_value(bytes: &[u8]) -> Result<serde_json::Value> {
    let codec = rialto_protocol::avro::AvroCodec::parse(r#""string""#)?;
    Ok(codec.to_serde_json(&codec.decode(bytes, "value")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_gets_touch_one_group_and_fanout_stays_constant_as_replication_doubles() -> Result<()>
{
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut fanouts = Vec::new();
    for (servers, rf) in [(6usize, 3u32), (12, 6)] {
        let cluster = cluster_with_store(servers, rf).await?;
        let client = cluster.client("fan").await?;
        let table = client.routing_table();
        ensure!(
            table.groups.len() == rf as usize,
            "{} groups",
            table.groups.len()
        );
        let group_of = |address: &str| {
            table
                .groups
                .iter()
                .position(|g| g.iter().any(|r| r.address == address))
        };
        let mut groups_used = HashSet::new();
        for _ in 0..12 {
            let keys = random_keys(&mut rng, 5_000);
            let done = stream_all(&client, &keys).await?;
            ensure!(done.is_complete(), "{done:?}");
            let groups: HashSet<_> = done.servers.iter().map(|a| group_of(a)).collect();
            ensure!(
                groups.len() == 1 && !groups.contains(&None),
                "a batch-get touched servers of several groups: {:?}",
                done.servers
            );
            ensure!(
                done.fanout == servers / rf as usize,
                "fanout {}",
                done.fanout
            );
            groups_used.extend(groups);
        }
        // Load spreads over the groups.
        ensure!(groups_used.len() > 1, "{groups_used:?}");
        let stats = client.stats();
        ensure!(stats.errors == 0, "{stats:?}");
        fanouts.push(stats.fanout_max);
        drop(client);
        cluster.shutdown().await?;
    }
    // 6 servers at RF 3 and 12 servers at RF 6: a batch-get reaches two servers either way.
    assert_eq!(fanouts, vec![2, 2]);
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn batch_latencies(client: &Client, calls: usize, keys: usize) -> Result<Vec<Duration>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(calls as u64);
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let keys = random_keys(&mut rng, keys);
        let started = Instant::now();
        let values = client.batch_get(&keys).await?;
        latencies.push(started.elapsed());
        ensure!(values.iter().all(Option::is_some));
    }
    latencies.sort();
    Ok(latencies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_tail_retry_hides_a_slow_server_within_its_budget() -> Result<()> {
    let cluster = cluster_with_store(6, 3).await?;
    // The client shares its runtime with six in-process servers and the machine with whatever
    // else runs: its timers can fire late for reasons that are not its own load, so the
    // late-retry margin is wider than the default here.
    let client = cluster
        .client_with("fan", |c| {
            c.long_tail.late_margin = Duration::from_millis(100);
        })
        .await?;
    const BATCH: usize = 1_000;
    let normal = batch_latencies(&client, 60, BATCH).await?;
    let normal_p99 = percentile(&normal, 0.99);
    let (_, threshold) = client.long_tail_thresholds(BATCH / 2);
    // A hedge that happened to outpace server 0 in the normal phase has the client avoid it for
    // a while; once that is over, the slow phase meets the delay it is about.
    tokio::time::sleep(HealthConfig::default().slow_penalty_max).await;

    let delay = Duration::from_millis(200);
    cluster.faults(0).set_delay(delay);
    let before = client.stats();
    let slow = batch_latencies(&client, 90, BATCH).await?;
    let after = client.stats();
    let slow_p99 = percentile(&slow, 0.99);
    let (_, threshold_after) = client.long_tail_thresholds(BATCH / 2);
    let hedges = after.long_tail_retries - before.long_tail_retries;
    let won = after.long_tail_retries_won - before.long_tail_retries_won;
    let requests = after.requests - before.requests;
    eprintln!(
        "normal p50 {:?} p99 {normal_p99:?}; threshold {threshold:?} -> {threshold_after:?}; with a \
         200 ms server: p50 {:?} p99 {slow_p99:?}, slowest {:?}; {hedges} hedges ({won} won, {} \
         late, {} over budget) over {requests} requests",
        percentile(&normal, 0.5),
        percentile(&slow, 0.5),
        &slow[slow.len().saturating_sub(4)..],
        after.long_tail_retries_late - before.long_tail_retries_late,
        after.long_tail_retries_over_budget - before.long_tail_retries_over_budget,
    );
    // The slow server's group is hedged away from when it is chosen, and once a hedge outpaces
    // it the server is avoided for a while (doubling while it stays slow): few hedges are needed.
    ensure!(hedges >= 1 && won >= 1, "hedges {hedges}, won {won}");
    let slow_node_requests = cluster
        .server(0)
        .map(|s| s.metrics().faults_delayed.load(Ordering::Relaxed))
        .unwrap_or_default();
    eprintln!("the slow server was sent {slow_node_requests} of {requests} requests");
    ensure!(slow_node_requests >= 1, "the slow server was never chosen");
    ensure!(
        (slow_node_requests as f64) < requests as f64 / 6.0,
        "the slow server still got {slow_node_requests} of {requests} requests"
    );
    ensure!(
        slow_p99 < threshold.max(threshold_after) + normal_p99 + Duration::from_millis(60),
        "p99 {slow_p99:?} with threshold {threshold:?}/{threshold_after:?} and normal p99 {normal_p99:?}"
    );
    ensure!(
        slow_p99 < delay,
        "p99 {slow_p99:?} not below the injected delay"
    );
    // Budget: 10 % of the original requests plus the burst and the per-second floor.
    let config = LongTailRetry::default();
    let elapsed_s = slow.iter().map(Duration::as_secs_f64).sum::<f64>() + 1.0;
    let allowed = config.budget_ratio * requests as f64
        + config.budget_burst
        + config.budget_floor_per_sec * elapsed_s;
    ensure!(
        (hedges as f64) <= allowed,
        "{hedges} hedges exceed the budget {allowed:.1}"
    );
    ensure!(after.errors == 0, "{after:?}");

    // Without long-tail retry the slow server shows in the tail.
    let unhedged = cluster
        .client_with("fan", |c| c.long_tail = LongTailRetry::disabled())
        .await?;
    let plain = batch_latencies(&unhedged, 30, BATCH).await?;
    ensure!(
        plain.last().copied().unwrap_or_default() >= delay,
        "without hedging no call waited for the slow server: max {:?}",
        plain.last()
    );
    cluster.faults(0).set_delay(Duration::ZERO);
    drop((client, unhedged));
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_killed_under_load_fails_no_request() -> Result<()> {
    let mut cluster = cluster_with_store(6, 3).await?;
    let client = cluster.client("fan").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let client = client.clone();
        let stop = stop.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t);
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let keys = random_keys(&mut rng, 500);
                match client.batch_get(&keys).await {
                    Ok(values) => {
                        if values.iter().any(Option::is_none) {
                            failures.push("a key came back missing".to_string());
                        }
                    }
                    Err(e) => failures.push(e.to_string()),
                }
                if let Err(e) = client.get(&keys[0]).await {
                    failures.push(e.to_string());
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kill = calls.load(Ordering::Relaxed);
    cluster.kill_server(2).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await?);
    }
    let total = calls.load(Ordering::Relaxed);
    let stats = client.stats();
    eprintln!("{total} calls ({before_kill} before the kill); {stats:?}");
    ensure!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    ensure!(total > before_kill + 10, "load stalled after the kill");
    ensure!(
        stats.instances_blocked >= 1,
        "the killed server was never blocked"
    );
    drop(client);
    cluster.shutdown().await
}
