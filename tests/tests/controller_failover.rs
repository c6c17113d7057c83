//! Controller failover on a real cluster: the leading controller, a `rialto-controller` process,
//! is killed with SIGKILL during a push and again as the push's replicas go ONLINE (the swap); a
//! standby takes over within the lease time and finishes both from etcd alone.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rialto_protocol::avro::Value;
use rialto_protocol::meta::{Layout, StoreRecord, VersionRecord, VersionStatus, DEFAULT_ROOT};
use rialto_tests::{key_of, string_value, wait_until, write_json_dataset, ChildProcess, Cluster};

const LEASE_TTL_S: i64 = 2;

/// Waits until a controller other than `previous` leads; returns its id.
async fn new_leader(cluster: &Cluster, previous: &str) -> Result<String> {
    wait_until(Duration::from_secs(30), "a new leader", || async {
        Ok(cluster
            .controller_leader()
            .await?
            .is_some_and(|id| id != previous))
    })
    .await?;
    cluster
        .controller_leader()
        .await?
        .context("leader gone again")
}

/// Waits until version `version` of `fo` has reached `status` (or later), read from etcd (the
/// admin API of a killed controller is gone).
async fn wait_for_status(cluster: &Cluster, version: u32, status: VersionStatus) -> Result<()> {
    let key = Layout::new(DEFAULT_ROOT).version("fo", version);
    let rank = |s: &VersionStatus| match s {
        VersionStatus::Pushing => 0,
        VersionStatus::PushWritten => 1,
        VersionStatus::Online | VersionStatus::Failed { .. } => 2,
    };
    wait_until(
        Duration::from_secs(60),
        &format!("version {version} {status:?}"),
        || async {
            let Some(kv) = cluster.meta.get(&key).await? else {
                return Ok(false);
            };
            let record: VersionRecord = serde_json::from_slice(&kv.value)?;
            Ok(rank(&record.status) >= rank(&status))
        },
    )
    .await
}

/// The current and backup versions of `fo`, read from etcd.
async fn current_and_backup(cluster: &Cluster) -> Result<(Option<u32>, Option<u32>)> {
    let key = Layout::new(DEFAULT_ROOT).store("fo");
    let kv = cluster.meta.get(&key).await?.context("store record")?;
    let store: StoreRecord = serde_json::from_slice(&kv.value)?;
    Ok((store.current_version, store.backup_version))
}

/// Pushes `records` values of `value_bytes` to `fo` through the controller at `url`, in a task.
fn spawn_push(
    url: String,
    dir: &Path,
    records: usize,
    value_bytes: usize,
) -> Result<tokio::task::JoinHandle<Result<u32>>> {
    let path = dir.join(format!("fo-{value_bytes}.jsonl"));
    write_json_dataset(&path, records, |i| {
        serde_json::Value::String(string_value(i, value_bytes))
    })?;
    Ok(tokio::spawn(async move {
        let mut config = rialto_push::PushConfig::new(&url, "fo", &path);
        config.wait_timeout = Duration::from_secs(120);
        Ok(rialto_push::push(&config).await?.version)
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_finishes_a_push_and_a_swap_after_the_leader_is_killed() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    cluster.create_string_store("fo", 4, 2, 1_000, 40).await?;
    let dir = tempfile::tempdir()?;

    // Two controller processes; the in-process controller steps down so one of them leads.
    let mut controllers: Vec<(String, ChildProcess, String)> = Vec::new();
    for id in ["controller-2", "controller-3"] {
        let (process, url) = cluster.start_controller_process(id, LEASE_TTL_S).await?;
        controllers.push((id.to_string(), process, url));
    }
    cluster.stop_controller().await?;
    let leader = new_leader(&cluster, "controller-1").await?;

    // 1. The leader dies while version 2 is being pushed through the standby's API.
    let standby_url = controllers
        .iter()
        .find(|(id, _, _)| *id != leader)
        .map(|(_, _, url)| url.clone())
        .context("a standby")?;
    let push = spawn_push(standby_url.clone(), dir.path(), 20_000, 120)?;
    wait_for_status(&cluster, 2, VersionStatus::Pushing).await?;
    let index = controllers
        .iter()
        .position(|(id, _, _)| *id == leader)
        .context("leader process")?;
    let (_, mut process, _) = controllers.remove(index);
    process.kill()?;
    let killed = Instant::now();
    let second = new_leader(&cluster, &leader).await?;
    let failover = killed.elapsed();
    let version = push.await??;
    ensure!(version == 2, "pushed version {version}");
    let versions = current_and_backup(&cluster).await?;
    ensure!(versions == (Some(2), Some(1)), "{versions:?}");
    eprintln!(
        "failover during a push: {second} leads {failover:?} after the SIGKILL of {leader} (lease {LEASE_TTL_S} s)"
    );

    // 2. A third controller stands by; the leader dies as version 3's replicas go ONLINE,
    //    before it can swap.
    let (process, url) = cluster
        .start_controller_process("controller-4", LEASE_TTL_S)
        .await?;
    controllers.push(("controller-4".into(), process, url.clone()));
    let push = spawn_push(url, dir.path(), 2_000, 60)?;
    wait_for_status(&cluster, 3, VersionStatus::PushWritten).await?;
    let index = controllers
        .iter()
        .position(|(id, _, _)| *id == second)
        .context("second leader process")?;
    let (_, mut process, _) = controllers.remove(index);
    process.kill()?;
    let killed = Instant::now();
    let at_kill = current_and_backup(&cluster).await?;
    let third = new_leader(&cluster, &second).await?;
    let version = push.await??;
    ensure!(version == 3, "pushed version {version}");
    let versions = current_and_backup(&cluster).await?;
    ensure!(versions == (Some(3), Some(2)), "{versions:?}");
    eprintln!(
        "failover at a swap: {third} leads {:?} after the SIGKILL of {second}; (current, backup) at the kill {at_kill:?}",
        killed.elapsed()
    );
    let client = cluster.client("fo").await?;
    ensure!(
        client.get(&Value::String(key_of(7))).await? == Some(Value::String(string_value(7, 60))),
        "version 3 does not serve its values"
    );
    drop(client);
    drop(controllers);
    cluster.shutdown().await
}
