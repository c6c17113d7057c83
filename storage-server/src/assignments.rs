//! Follows the versions prefix and keeps the hosted replicas equal to this node's assignment.
//!
//! Reconciles against the whole mirrored map on every change (never against single events):
//! a replica assigned to this node in a version that is not `Failed` gets an ingestion task; a
//! replica that is no longer assigned (version deleted, `Failed`, or re-assigned elsewhere) is
//! stopped, its database closed and deleted, and its replica record removed.
//!
//! At start-up, replica directories on disk that belong to no current assignment are deleted
//! (except those of versions whose record could not be parsed: they are left for an operator).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rialto_backends::mirror::PrefixMap;
use rialto_backends::PrefixMirror;
use rialto_protocol::meta::{validate_store_name, ReplicaState, VersionRecord, VersionStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::node::NodeContext;
use crate::replica::{ReplicaId, ReplicaPlan, ReplicaSlot};
use crate::store::remove_replica_dir;
use crate::{ingest, ServerError};

/// How long a stopping ingestion task may take before it is aborted.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for in-flight reads to release a replica's database before closing it.
const STORE_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
const STORE_RELEASE_POLL: Duration = Duration::from_millis(5);

/// What this node should host, from one snapshot of the versions prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DesiredReplicas {
    /// Replica → what hosting it takes.
    pub replicas: BTreeMap<ReplicaId, ReplicaPlan>,
    /// (store, version) of records that could not be parsed: their data is left alone.
    pub unparsed: BTreeSet<(String, u32)>,
    /// (store, version) of hybrid versions the controller sealed (neither current nor backup
    /// any more): they no longer follow the real-time writes (they serve what they have).
    pub superseded: BTreeSet<(String, u32)>,
}

/// Computes the replicas assigned to `node_id` in a snapshot of the versions prefix.
pub(crate) fn desired_replicas(
    versions: &PrefixMap,
    versions_prefix: &str,
    node_id: &str,
) -> DesiredReplicas {
    let mut desired = DesiredReplicas::default();
    for (key, value) in versions {
        let record: VersionRecord = match rialto_protocol::meta::decode_record(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%key, error = %e, "ignoring a version record that does not parse");
                if let Some((store, version)) = parse_version_key(key, versions_prefix)
                    .filter(|(store, _)| validate_store_name(store).is_ok())
                {
                    desired.unparsed.insert((store, version));
                }
                continue;
            }
        };
        // The store name becomes a directory: a record written to etcd by hand (or by a
        // compromised writer) must not name `..` or a path.
        if let Err(e) = validate_store_name(&record.store) {
            tracing::warn!(%key, error = %e, "ignoring a version record with an invalid store name");
            continue;
        }
        if matches!(record.status, VersionStatus::Failed { .. }) {
            continue;
        }
        if record.hybrid.is_some() && record.sealed {
            desired
                .superseded
                .insert((record.store.clone(), record.version));
        }
        for partition in record.partitions_of(node_id) {
            let id = ReplicaId {
                store: record.store.clone(),
                version: record.version,
                partition,
            };
            desired.replicas.insert(
                id,
                ReplicaPlan {
                    topic: record.topic.clone(),
                    storage: record.storage,
                    compression: record.compression,
                    hybrid: record.hybrid,
                    producer: record.producer.clone(),
                },
            );
        }
    }
    desired
}

fn parse_version_key(key: &str, prefix: &str) -> Option<(String, u32)> {
    let (store, version) = key.strip_prefix(prefix)?.split_once('/')?;
    Some((store.to_string(), version.parse().ok()?))
}

/// Deletes replica directories under `data_dir` that are not in `desired`.
pub(crate) fn remove_orphan_dirs(
    data_dir: &Path,
    desired: &DesiredReplicas,
) -> Result<(), ServerError> {
    let read = |dir: &Path| {
        std::fs::read_dir(dir).map_err(|e| ServerError::io("list data directory", dir, e))
    };
    for store_entry in read(data_dir)? {
        let store_entry =
            store_entry.map_err(|e| ServerError::io("list data directory", data_dir, e))?;
        let store_dir = store_entry.path();
        if !store_dir.is_dir() {
            continue;
        }
        let store = store_entry.file_name().to_string_lossy().into_owned();
        for version_entry in read(&store_dir)? {
            let version_entry =
                version_entry.map_err(|e| ServerError::io("list data directory", &store_dir, e))?;
            let name = version_entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name.strip_prefix('v').and_then(|v| v.parse::<u32>().ok()) else {
                continue;
            };
            if desired.unparsed.contains(&(store.clone(), version)) {
                continue;
            }
            let version_dir = version_entry.path();
            for partition_entry in read(&version_dir)? {
                let partition_entry = partition_entry
                    .map_err(|e| ServerError::io("list data directory", &version_dir, e))?;
                let name = partition_entry.file_name().to_string_lossy().into_owned();
                let Some(partition) = name.strip_prefix('p').and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                let id = ReplicaId {
                    store: store.clone(),
                    version,
                    partition,
                };
                if !desired.replicas.contains_key(&id) {
                    tracing::info!(replica = %id, "deleting the data of a replica no longer assigned here");
                    remove_replica_dir(&partition_entry.path())?;
                }
            }
            let _ = std::fs::remove_dir(&version_dir); // only succeeds when empty
        }
        let _ = std::fs::remove_dir(&store_dir);
    }
    Ok(())
}

/// A hosted replica and its ingestion task.
struct HostedReplica {
    slot: Arc<ReplicaSlot>,
    stop: watch::Sender<bool>,
    /// Whether a hybrid replica follows real-time writes (false once its version is sealed).
    follow: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HostedReplica {
    async fn stop_task(&mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(TASK_STOP_TIMEOUT, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(replica = %self.slot.id, "ingestion task did not stop in time; aborting it");
            self.task.abort();
        }
    }
}

/// Follows assignments until `shutdown`; then stops every task and closes every database.
pub(crate) async fn reconcile(
    ctx: Arc<NodeContext>,
    mirror: PrefixMirror,
    first: DesiredReplicas,
    mut shutdown: watch::Receiver<crate::Stop>,
) {
    let mut hosted: BTreeMap<ReplicaId, HostedReplica> = BTreeMap::new();
    let mut changes = mirror.subscribe();
    let prefix = ctx.layout.versions_prefix();
    let mut desired = first;
    loop {
        let stale: Vec<ReplicaId> = hosted
            .keys()
            .filter(|id| !desired.replicas.contains_key(id))
            .cloned()
            .collect();
        for id in stale {
            if let Some(replica) = hosted.remove(&id) {
                drop_replica(&ctx, replica).await;
            }
        }
        for (id, plan) in &desired.replicas {
            let follow = !desired.superseded.contains(&(id.store.clone(), id.version));
            if let Some(replica) = hosted.get(id) {
                replica
                    .follow
                    .send_if_modified(|f| std::mem::replace(f, follow) != follow);
                continue;
            }
            let slot = Arc::new(ReplicaSlot::new(id.clone(), &ctx.metrics));
            ctx.registry.insert(slot.clone());
            let (stop, stop_rx) = watch::channel(false);
            let (follow, follow_rx) = watch::channel(follow);
            tracing::info!(replica = %id, topic = %plan.topic, storage = ?plan.storage, compression = ?plan.compression, hybrid = ?plan.hybrid, "replica assigned");
            let task = tokio::spawn(ingest::run(
                ctx.clone(),
                slot.clone(),
                plan.clone(),
                stop_rx,
                follow_rx,
            ));
            hosted.insert(
                id.clone(),
                HostedReplica {
                    slot,
                    stop,
                    follow,
                    task,
                },
            );
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s != crate::Stop::Running) => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
        desired = mirror
            .with(|map| desired_replicas(map, &prefix, &ctx.node_id))
            .await;
    }
    // Shutdown: stop ingestion, close databases, keep data and let the lease revoke the records.
    for (_, mut replica) in std::mem::take(&mut hosted) {
        replica.stop_task().await;
        ctx.registry.remove(&replica.slot.id);
        replica.slot.retire(&ctx.metrics);
        if let Some(store) = replica.slot.take_store() {
            if wait_until_unique(&store).await {
                drop(store);
            } else {
                tracing::warn!(replica = %replica.slot.id, "reads still hold the database at shutdown");
            }
        }
    }
}

/// Stops a replica, deletes its data and its record.
async fn drop_replica(ctx: &NodeContext, mut replica: HostedReplica) {
    let id = replica.slot.id.clone();
    tracing::info!(replica = %id, "replica unassigned; dropping it");
    replica.stop_task().await;
    ctx.registry.remove(&id);
    replica
        .slot
        .update(&ctx.metrics, |r| r.state = ReplicaState::Dropped);
    let path = id.data_path(&ctx.data_dir);
    match replica.slot.take_store() {
        Some(store) => {
            wait_until_unique(&store).await;
            match Arc::try_unwrap(store) {
                Ok(store) => {
                    match rialto_backends::blocking::spawn(move || store.destroy()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(replica = %id, error = %e, "deleting the replica's data failed")
                        }
                        Err(e) => {
                            tracing::warn!(replica = %id, error = %e, "deleting the replica's data panicked")
                        }
                    }
                }
                Err(_) => tracing::warn!(
                    replica = %id,
                    "reads still hold the database; its directory is deleted at the next start"
                ),
            }
        }
        None => {
            if let Err(e) = remove_replica_dir(&path) {
                tracing::warn!(replica = %id, error = %e, "deleting the replica's data failed");
            }
        }
    }
    if let Some(version_dir) = path.parent() {
        let _ = std::fs::remove_dir(version_dir);
        if let Some(store_dir) = version_dir.parent() {
            let _ = std::fs::remove_dir(store_dir);
        }
    }
    ctx.delete_report(&replica.slot).await;
    replica.slot.retire(&ctx.metrics);
}

/// Waits (bounded) until `store` is the only reference to the database.
async fn wait_until_unique<T>(store: &Arc<T>) -> bool {
    let deadline = tokio::time::Instant::now() + STORE_RELEASE_TIMEOUT;
    while Arc::strong_count(store) > 1 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(STORE_RELEASE_POLL).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rialto_protocol::meta::{Compression, Layout, StorageProfile};

    fn version(store: &str, n: u32, assignment: Vec<Vec<&str>>, status: VersionStatus) -> Vec<u8> {
        let r = VersionRecord {
            store: store.into(),
            version: n,
            topic: format!("{store}_v{n}"),
            partition_count: assignment.len() as u32,
            assignment: assignment
                .into_iter()
                .map(|p| p.into_iter().map(String::from).collect())
                .collect(),
            status,
            created_ms: 0,
            storage: StorageProfile::OnDisk,
            compression: Compression::None,
            value_format: rialto_protocol::meta::ValueFormat::SchemaIdPrefixed,
            max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
            hybrid: None,
            moves: vec![],
            pushed_by: None,
            sealed: false,
            producer: None,
            failed_targets: Vec::new(),
        };
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn desired_replicas_follow_assignment_and_status() {
        let l = Layout::new("/r");
        let mut map = PrefixMap::new();
        map.insert(
            l.version("a", 1),
            version(
                "a",
                1,
                vec![vec!["n1", "n2"], vec!["n2"]],
                VersionStatus::Online,
            ),
        );
        map.insert(
            l.version("a", 2),
            version(
                "a",
                2,
                vec![vec!["n1"]],
                VersionStatus::Failed { reason: "x".into() },
            ),
        );
        map.insert(l.version("b", 7), b"{broken".to_vec());
        // A record naming a path as its store (written to etcd by hand) is ignored.
        map.insert(
            l.version("c", 1),
            version("../../etc", 1, vec![vec!["n1"]], VersionStatus::Online),
        );
        let d = desired_replicas(&map, &l.versions_prefix(), "n1");
        assert_eq!(d.replicas.len(), 1);
        assert_eq!(
            d.replicas
                .get(&ReplicaId {
                    store: "a".into(),
                    version: 1,
                    partition: 0
                })
                .map(|plan| (plan.topic.as_str(), plan.storage)),
            Some(("a_v1", StorageProfile::OnDisk))
        );
        assert!(d.unparsed.contains(&("b".to_string(), 7)));
    }

    #[test]
    fn only_versions_the_controller_sealed_stop_following_real_time_writes() {
        let l = Layout::new("/r");
        let hybrid = |n: u32, status: VersionStatus, sealed: bool| {
            let mut r: VersionRecord =
                serde_json::from_slice(&version("h", n, vec![vec!["n1"]], status)).unwrap();
            r.hybrid = Some(rialto_protocol::meta::HybridConfig {
                rewind_seconds: 60,
                lag_records_max: 10,
            });
            r.sealed = sealed;
            serde_json::to_vec(&r).unwrap()
        };
        let mut map = PrefixMap::new();
        // 1: retired from being the backup; 2: backup (older than the current 3, yet following,
        // so a rollback serves every write); 3: current; 4: being pushed.
        map.insert(l.version("h", 1), hybrid(1, VersionStatus::Online, true));
        map.insert(l.version("h", 2), hybrid(2, VersionStatus::Online, false));
        map.insert(l.version("h", 3), hybrid(3, VersionStatus::Online, false));
        map.insert(l.version("h", 4), hybrid(4, VersionStatus::Pushing, false));
        let d = desired_replicas(&map, &l.versions_prefix(), "n1");
        assert_eq!(d.replicas.len(), 4);
        assert_eq!(
            d.superseded,
            BTreeSet::from([("h".to_string(), 1)]),
            "a newer ONLINE version alone does not stop a version following"
        );
    }

    #[test]
    fn orphan_dirs_are_removed_and_assigned_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        for p in ["a/v1/p0", "a/v1/p1", "a/v2/p0", "b/v7/p0", "c/v1/p3"] {
            std::fs::create_dir_all(dir.path().join(p)).unwrap();
        }
        let mut desired = DesiredReplicas::default();
        desired.replicas.insert(
            ReplicaId {
                store: "a".into(),
                version: 1,
                partition: 0,
            },
            ReplicaPlan {
                topic: "a_v1".into(),
                storage: StorageProfile::InMemory,
                compression: Compression::None,
                hybrid: None,
                producer: None,
            },
        );
        desired.unparsed.insert(("b".into(), 7));
        remove_orphan_dirs(dir.path(), &desired).unwrap();
        assert!(dir.path().join("a/v1/p0").exists());
        assert!(!dir.path().join("a/v1/p1").exists());
        assert!(!dir.path().join("a/v2").exists());
        assert!(dir.path().join("b/v7/p0").exists());
        assert!(!dir.path().join("c").exists());
    }
}
