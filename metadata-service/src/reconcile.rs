//! The leader's reconcile loop: swap versions whose replicas are all ONLINE, fail versions with a
//! replica in ERROR, retire versions that are no longer needed.
//!
//! Split in two halves so the decisions can be tested without etcd:
//!
//! * [`ClusterView`] + [`plan`]: pure functions from parsed records to a list of [`Action`]s;
//! * [`Reconciler`]: follows the three prefixes with [`PrefixMirror`], plans on every change (and
//!   on a safety tick), and applies each action with compare-and-put, re-reading the record first
//!   so a stale mirror can never make it swap to an older version or revive a failed one.

use rialto_backends::clock::now_ms;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rialto_backends::mirror::PrefixMap;
use rialto_backends::{MetaStore, PrefixMirror, PubSub};
use rialto_protocol::meta::{
    decode_record, DrainRecord, FailedTarget, Layout, NodeRecord, RecordError, ReplicaMove,
    ReplicaRecord, ReplicaState, StoreRecord, TopicDeletionRecord, VersionRecord, VersionStatus,
    RECORD_FORMAT,
};
use tokio::sync::watch;

use crate::error::{encode_record, ControllerError};
use crate::rebalance::{plan_moves, RebalanceConfig};
use crate::store_ops::{fail_version, update_store, update_version};

/// How often the leader reconciles even when nothing changed (covers lost notifications and
/// retries failed actions).
pub const RECONCILE_TICK: Duration = Duration::from_secs(2);

/// How long a version's topic outlives a replica of it that still reports OFFLINE or BOOTSTRAP
/// (a server that may be consuming it) after that replica's last report (as this controller saw
/// it, by its own clock: [`ReportClock`]). Servers stop consuming a
/// failed or retired version within a poll, then delete or update their records; the bound only
/// keeps a server that never does from keeping the topic forever.
pub const TOPIC_RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Parsed metadata: every store, version and replica record the controller knows.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Store name → record.
    pub stores: BTreeMap<String, StoreRecord>,
    /// (store, version) → record.
    pub versions: BTreeMap<(String, u32), VersionRecord>,
    /// (store, version, partition, node) → record.
    pub replicas: BTreeMap<(String, u32, u32, String), ReplicaRecord>,
    /// When the view was taken (milliseconds since the Unix epoch, this controller's clock), to
    /// age replica reports.
    pub now_ms: i64,
    /// (store, version, partition, node) → when this controller first saw the replica's current
    /// record ([`ReportClock`]); a replica missing here counts as reported just now.
    pub reported_ms: BTreeMap<(String, u32, u32, String), i64>,
    /// Registered (live) storage nodes.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Nodes an operator asked to drain.
    pub draining: BTreeSet<String>,
    /// Node hosting a replica but not registered → when this controller first saw it missing
    /// ([`NodeClock`]).
    pub missing_ms: BTreeMap<String, i64>,
    /// (store, version, partition, node) → when a move of that replica to that node failed
    /// (its replica went to ERROR; `VersionRecord::failed_targets`), within
    /// [`crate::rebalance::FAILED_TARGET_COOLDOWN`] by this controller's clock: the node is not
    /// chosen again for it meanwhile.
    pub failed_targets: BTreeMap<(String, u32, u32, String), i64>,
    /// A version in progress longer than this (milliseconds since its creation) fails; 0: never.
    pub push_timeout_ms: i64,
    /// Keys of records in a newer format than this controller reads: a newer Rialto wrote
    /// them, and this controller plans nothing until it is upgraded (acting on a view with
    /// records missing could retire what they describe).
    pub newer_records: Vec<String>,
}

/// Reads one mirrored record; a corrupt one is logged and skipped, one of a newer format is
/// noted in `newer` (see [`ClusterView::newer_records`]).
fn read_record<T: serde::de::DeserializeOwned>(
    newer: &mut Vec<String>,
    key: &str,
    value: &[u8],
    what: &str,
) -> Option<T> {
    match decode_record(value) {
        Ok(record) => Some(record),
        Err(RecordError::NewerFormat { found }) => {
            newer.push(key.to_string());
            tracing::debug!(%key, found, "a {what} record of a newer format");
            None
        }
        Err(e) => {
            tracing::warn!(%key, error = %e, "skipping corrupt {what} record");
            None
        }
    }
}

/// When this controller first saw each node that hosts replicas go missing, by its own clock.
/// A new leader starts every such clock afresh.
#[derive(Debug, Default)]
pub struct NodeClock {
    missing_since: HashMap<String, i64>,
}

/// When this controller first saw each replica record's current content, by its own clock. A
/// report's age is measured from there, so the servers' clocks (`ReplicaRecord::updated_ms`)
/// and the skew between machines never enter it. A new leader has no history: every record
/// counts as just reported, which only delays what waits on an old report.
#[derive(Debug, Default)]
pub struct ReportClock {
    /// Replica key → its value and when that value was first seen.
    seen: HashMap<String, (Vec<u8>, i64)>,
}

impl ReportClock {
    /// When `value` under `key` was first seen, `now_ms` if it is new or changed.
    fn seen_at(&mut self, key: &str, value: &[u8], now_ms: i64) -> i64 {
        match self.seen.get_mut(key) {
            Some((seen, at)) if seen.as_slice() == value => *at,
            Some(entry) => {
                *entry = (value.to_vec(), now_ms);
                now_ms
            }
            None => {
                self.seen.insert(key.to_string(), (value.to_vec(), now_ms));
                now_ms
            }
        }
    }

    /// Forgets records that are gone.
    fn retain(&mut self, replicas: &PrefixMap) {
        self.seen.retain(|key, _| replicas.contains_key(key));
    }
}

impl ClusterView {
    /// Adds the registered nodes and the drain requests to a parsed view, and dates the
    /// absence of every node that hosts a replica but is not registered.
    pub fn add_nodes(&mut self, nodes: &PrefixMap, drains: &PrefixMap, clock: &mut NodeClock) {
        for (key, value) in nodes {
            if let Some(n) = read_record::<NodeRecord>(&mut self.newer_records, key, value, "node")
            {
                self.nodes.insert(n.node_id.clone(), n);
            }
        }
        for (key, value) in drains {
            if let Some(d) =
                read_record::<DrainRecord>(&mut self.newer_records, key, value, "drain")
            {
                self.draining.insert(d.node_id);
            }
        }
        let hosting: BTreeSet<&str> = self
            .versions
            .values()
            .flat_map(|v| v.hosted().map(|(_, n)| n))
            .collect();
        clock
            .missing_since
            .retain(|n, _| hosting.contains(n.as_str()) && !self.nodes.contains_key(n));
        for node in hosting {
            if !self.nodes.contains_key(node) {
                let since = *clock
                    .missing_since
                    .entry(node.to_string())
                    .or_insert(self.now_ms);
                self.missing_ms.insert(node.to_string(), since);
            }
        }
    }

    /// Parses mirrored prefixes; corrupt records are logged and skipped. `clock` dates the
    /// replica records.
    pub fn parse(
        layout: &Layout,
        stores: &PrefixMap,
        versions: &PrefixMap,
        replicas: &PrefixMap,
        clock: &mut ReportClock,
    ) -> ClusterView {
        let mut view = ClusterView {
            now_ms: now_ms(),
            ..ClusterView::default()
        };
        for (key, value) in stores {
            if let Some(s) =
                read_record::<StoreRecord>(&mut view.newer_records, key, value, "store")
            {
                view.stores.insert(s.name.clone(), s);
            }
        }
        for (key, value) in versions {
            if let Some(v) =
                read_record::<VersionRecord>(&mut view.newer_records, key, value, "version")
            {
                let cooldown_ms = crate::rebalance::FAILED_TARGET_COOLDOWN.as_millis() as i64;
                for f in &v.failed_targets {
                    if view.now_ms.saturating_sub(f.failed_ms) < cooldown_ms {
                        let id = (v.store.clone(), v.version, f.partition, f.node.clone());
                        view.failed_targets.insert(id, f.failed_ms);
                    }
                }
                view.versions.insert((v.store.clone(), v.version), v);
            }
        }
        for (key, value) in replicas {
            let Some((store, version, partition, node)) = layout.parse_replica_key(key) else {
                tracing::warn!(%key, "skipping replica record with an unexpected key");
                continue;
            };
            if let Some(r) =
                read_record::<ReplicaRecord>(&mut view.newer_records, key, value, "replica")
            {
                let id = (store.to_string(), version, partition, node.to_string());
                view.reported_ms
                    .insert(id.clone(), clock.seen_at(key, value, view.now_ms));
                view.replicas.insert(id, r);
            }
        }
        clock.retain(replicas);
        view
    }

    /// The reported record of one replica, if its server wrote one.
    pub fn replica(
        &self,
        store: &str,
        version: u32,
        partition: u32,
        node: &str,
    ) -> Option<&ReplicaRecord> {
        self.replicas
            .get(&(store.to_string(), version, partition, node.to_string()))
    }

    /// The state of one assigned replica; `Offline` when its server has not reported.
    pub fn replica_state(
        &self,
        store: &str,
        version: u32,
        partition: u32,
        node: &str,
    ) -> ReplicaState {
        self.replica(store, version, partition, node)
            .map(|r| r.state)
            .unwrap_or(ReplicaState::Offline)
    }

    /// Whether a server may still be consuming the topic of `store`'s `version`: one of its
    /// replicas reports OFFLINE (about to consume) or BOOTSTRAP, and did so within
    /// [`TOPIC_RELEASE_WAIT`] (by this controller's clock, [`ClusterView::reported_ms`]).
    ///
    /// A topic is deleted only once this is false. Fetching a deleted topic is at best wasted
    /// work, and with librdkafka 2.12 against tansu it crashes the server: tansu answers with a
    /// "current leader" for an unknown topic, and librdkafka's leader update then looks up a
    /// topic with no name (`rd_kafka_metadata_update_op`, a NULL `strcmp`).
    pub fn consuming(&self, store: &str, version: u32) -> bool {
        self.replicas
            .range((store.to_string(), version, 0, String::new())..)
            .take_while(|((s, n, _, _), _)| s == store && *n == version)
            .any(|(id, r)| self.may_fetch(id, r))
    }

    /// Whether no replica in the cluster may be fetching from the broker (the test of
    /// [`ClusterView::consuming`] over every replica). tansu 0.6 answers a fetch of a live topic
    /// made while another topic is deleted with "unknown topic" and a current leader, and
    /// librdkafka 2.12 crashes on that answer (`rd_kafka_metadata_update_op`, a topic without a
    /// name): a deletion then takes down every server fetching at that moment. With
    /// [`TopicDeletion::WhenIdle`] topics are deleted only while this holds.
    pub fn quiet(&self) -> bool {
        // A version being pushed has replicas about to fetch, reported or not.
        !self.versions.values().any(|v| in_progress(&v.status))
            && !self.replicas.iter().any(|(id, r)| self.may_fetch(id, r))
    }

    fn may_fetch(&self, id: &(String, u32, u32, String), r: &ReplicaRecord) -> bool {
        let wait_ms = TOPIC_RELEASE_WAIT.as_millis() as i64;
        let reported = self.reported_ms.get(id).copied().unwrap_or(self.now_ms);
        // An ONLINE replica of a hybrid version that still follows real-time writes consumes its
        // topic for as long as its record exists (under its server's lease); it re-reports only
        // when something changes.
        (matches!(r.state, ReplicaState::Offline | ReplicaState::Bootstrap)
            && self.now_ms.saturating_sub(reported) < wait_ms)
            || (r.state == ReplicaState::Online && r.following)
    }
}

/// When the controller deletes the topic of a retired version, a failed version or a deleted
/// store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TopicDeletion {
    /// Only while no replica in the cluster fetches ([`ClusterView::quiet`]); until then the
    /// topic is recorded under `topic-deletions/` and the rest of the retirement goes ahead.
    /// Needed with tansu, where a deletion crashes the processes fetching at that moment; a
    /// cluster whose hybrid stores always follow real-time writes never deletes then.
    #[default]
    WhenIdle,
    /// At once. Apache Kafka serves other topics through a deletion.
    Immediate,
}

/// One thing the reconciler must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Mark an in-progress version failed.
    Fail {
        store: String,
        version: u32,
        reason: String,
    },
    /// Make `version` current (old current becomes backup), then mark it online.
    Swap { store: String, version: u32 },
    /// The version is already current (a swap whose second step was interrupted): mark it online.
    MarkOnline { store: String, version: u32 },
    /// Delete the topic of a failed version once no server consumes it (its record stays for
    /// operators).
    DeleteTopic {
        store: String,
        version: u32,
        topic: String,
    },
    /// Stop an ONLINE hybrid version that is neither current nor backup following real-time
    /// writes: its servers seal its replicas ([`VersionRecord::sealed`]).
    Seal { store: String, version: u32 },
    /// Delete topic, replica records and version record (once no server consumes the topic).
    Retire {
        store: String,
        version: u32,
        topic: String,
    },
    /// Replica records left behind by a retired version (a server rewrote one after retirement).
    DeleteOrphanReplicas { store: String, version: u32 },
    /// A hybrid store that never had a version: start an empty one, which then serves the
    /// real-time writes (a streaming-only store).
    StartEmptyVersion { store: String },
    /// Mark any version of a store being deleted failed, live or not (servers drop it).
    FailDeleted { store: String, version: u32 },
    /// Delete a store whose versions all failed and whose topics nobody consumes: its topics
    /// (versions' and real-time), every record under it, the store record last.
    DeleteStore { store: String, topics: Vec<String> },
    /// Record a replica move: its target starts hosting the partition ([`crate::rebalance`]).
    StartMove {
        store: String,
        version: u32,
        replica_move: ReplicaMove,
    },
    /// A move's target is ONLINE: it takes `from`'s place in the assignment.
    CommitMove {
        store: String,
        version: u32,
        partition: u32,
        group: u32,
        from: String,
        to: String,
    },
    /// A move that cannot complete is dropped (its target stops hosting the partition).
    CancelMove {
        store: String,
        version: u32,
        partition: u32,
        group: u32,
        to: String,
        reason: String,
        /// The target's replica failed: it is not chosen again for a while.
        target_failed: bool,
    },
}

fn in_progress(status: &VersionStatus) -> bool {
    matches!(status, VersionStatus::Pushing | VersionStatus::PushWritten)
}

/// The first assigned replica in ERROR, as a failure reason.
fn first_error(view: &ClusterView, v: &VersionRecord) -> Option<String> {
    v.replicas().find_map(|(p, node)| {
        let r = view.replica(&v.store, v.version, p, node)?;
        (r.state == ReplicaState::Error).then(|| {
            format!(
                "partition {p} replica on {node}: {}",
                r.error.as_deref().unwrap_or("replica reported ERROR")
            )
        })
    })
}

/// Why a fully ONLINE version may not go live: one copy of it (its replicas' bytes on disk over
/// the replication factor) is larger than the store's storage quota.
fn over_storage_quota(
    view: &ClusterView,
    store: &StoreRecord,
    v: &VersionRecord,
) -> Option<String> {
    let quota = store.storage_quota_bytes?;
    let total: u64 = v
        .replicas()
        .filter_map(|(p, node)| view.replica(&v.store, v.version, p, node))
        .map(|r| r.disk_bytes)
        .sum();
    let copies = v.assignment.iter().map(Vec::len).max().unwrap_or(1).max(1) as u64;
    let copy = total / copies;
    (copy > quota).then(|| {
        format!(
            "storage quota exceeded: one copy of the version takes {copy} bytes, the store's \
             quota is {quota} bytes; raise it with `rialto-admin stores update {} --storage-quota`",
            store.name
        )
    })
}

fn all_online(view: &ClusterView, v: &VersionRecord) -> bool {
    let mut any = false;
    for (p, node) in v.replicas() {
        any = true;
        if view.replica_state(&v.store, v.version, p, node) != ReplicaState::Online {
            return false;
        }
    }
    // A version with no partition assigned (corrupt record) never goes live.
    any && v.assignment.len() as u64 == u64::from(v.partition_count)
}

/// The ONLINE versions older than the current one kept besides the backup: the newest
/// `versions_to_keep - 2` of them.
pub fn kept_older_versions(view: &ClusterView, store: &StoreRecord) -> BTreeSet<u32> {
    let Some(current) = store.current_version else {
        return BTreeSet::new();
    };
    let extra = store.versions_to_keep.saturating_sub(2) as usize;
    view.versions
        .range((store.name.clone(), 0)..(store.name.clone(), current))
        .rev()
        .filter(|(_, v)| {
            v.status == VersionStatus::Online && store.backup_version != Some(v.version)
        })
        .take(extra)
        .map(|(_, v)| v.version)
        .collect()
}

/// Decides what to do for one store, given the whole view.
pub fn plan_store(view: &ClusterView, store: &StoreRecord) -> Vec<Action> {
    let name = &store.name;
    let current = store.current_version;
    let backup = store.backup_version;
    let mut actions = Vec::new();
    if store.deleting {
        return plan_deletion(view, store);
    }
    if store.hybrid.is_some() && store.largest_version == 0 {
        actions.push(Action::StartEmptyVersion {
            store: name.clone(),
        });
        return actions;
    }
    let mut swap: Option<u32> = None;
    let kept = kept_older_versions(view, store);
    let versions = view
        .versions
        .range((name.clone(), 0)..=(name.clone(), u32::MAX))
        .map(|(_, v)| v);
    for v in versions {
        let n = v.version;
        match &v.status {
            s if in_progress(s) => {
                if current == Some(n) {
                    actions.push(Action::MarkOnline {
                        store: name.clone(),
                        version: n,
                    });
                } else if let Some(c) = current.filter(|&c| n < c) {
                    actions.push(Action::Fail {
                        store: name.clone(),
                        version: n,
                        reason: format!("superseded: newer version {c} became current first"),
                    });
                } else if let Some(reason) = first_error(view, v) {
                    actions.push(Action::Fail {
                        store: name.clone(),
                        version: n,
                        reason,
                    });
                } else if view.push_timeout_ms > 0
                    && view.now_ms.saturating_sub(v.created_ms) > view.push_timeout_ms
                {
                    actions.push(Action::Fail {
                        store: name.clone(),
                        version: n,
                        reason: format!(
                            "push timed out: not live {} s after it started (the push job died, \
                             or its replicas could not catch up); push again",
                            view.push_timeout_ms / 1000
                        ),
                    });
                } else if v.status == VersionStatus::PushWritten && all_online(view, v) {
                    // Only a push that reported itself written goes live: ONLINE replicas alone
                    // prove only that someone wrote END_OF_PUSH to the topic.
                    match over_storage_quota(view, store, v) {
                        Some(reason) => actions.push(Action::Fail {
                            store: name.clone(),
                            version: n,
                            reason,
                        }),
                        // Versions iterate in ascending order: the newest ready one wins.
                        None => swap = Some(n),
                    }
                }
            }
            // ONLINE but newer than the current version: a swap stopped between its two writes
            // (unless it is the backup: an operator rolled back from it).
            VersionStatus::Online if current.is_none_or(|c| n > c) && backup != Some(n) => {
                swap = Some(n)
            }
            VersionStatus::Online if backup == Some(n) => {}
            VersionStatus::Online if current != Some(n) && backup != Some(n) => {
                if v.hybrid.is_some() && !v.sealed {
                    // It stops following real-time writes; retired (or kept) once it has.
                    actions.push(Action::Seal {
                        store: name.clone(),
                        version: n,
                    });
                    continue;
                }
                if kept.contains(&n) || view.consuming(name, n) {
                    continue; // retired once no server consumes its topic
                }
                actions.push(Action::Retire {
                    store: name.clone(),
                    version: n,
                    topic: v.topic.clone(),
                });
            }
            VersionStatus::Failed { .. } => {
                if current == Some(n) || backup == Some(n) {
                    // A push reported failed after it went live (a narrow race with the swap):
                    // the version serves, so keep its topic and record; operators decide.
                    tracing::warn!(store = %name, version = n, "current or backup version is marked failed");
                } else if view.consuming(name, n) {
                    // Servers drop a failed version's replicas; its topic goes once they have.
                } else if current.is_some_and(|c| n < c) && backup != Some(n) {
                    actions.push(Action::Retire {
                        store: name.clone(),
                        version: n,
                        topic: v.topic.clone(),
                    });
                } else {
                    actions.push(Action::DeleteTopic {
                        store: name.clone(),
                        version: n,
                        topic: v.topic.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    if let Some(n) = swap {
        actions.push(Action::Swap {
            store: name.clone(),
            version: n,
        });
    }
    // Replica records of versions that no longer exist. Only versions older than the current one:
    // newer ones may simply not have reached the versions mirror yet.
    if let Some(c) = current {
        let mut seen = HashSet::new();
        for ((s, n, _, _), _) in view.replicas.range((name.clone(), 0, 0, String::new())..) {
            if s != name {
                break;
            }
            if *n < c && !view.versions.contains_key(&(name.clone(), *n)) && seen.insert(*n) {
                actions.push(Action::DeleteOrphanReplicas {
                    store: name.clone(),
                    version: *n,
                });
            }
        }
    }
    actions
}

/// A store being deleted: fail every version (servers drop their replicas), then, once no server
/// consumes any of its topics, delete everything.
fn plan_deletion(view: &ClusterView, store: &StoreRecord) -> Vec<Action> {
    let name = &store.name;
    let versions: Vec<&VersionRecord> = view
        .versions
        .range((name.clone(), 0)..=(name.clone(), u32::MAX))
        .map(|(_, v)| v)
        .collect();
    let fail: Vec<Action> = versions
        .iter()
        .filter(|v| !matches!(v.status, VersionStatus::Failed { .. }))
        .map(|v| Action::FailDeleted {
            store: name.clone(),
            version: v.version,
        })
        .collect();
    if !fail.is_empty() {
        return fail;
    }
    if versions.iter().any(|v| view.consuming(name, v.version)) {
        return Vec::new();
    }
    vec![Action::DeleteStore {
        store: name.clone(),
        topics: versions.iter().map(|v| v.topic.clone()).collect(),
    }]
}

/// Decides what to do for every store; nothing while the view holds records of a newer format.
pub fn plan(view: &ClusterView) -> Vec<Action> {
    if let Some(key) = view.newer_records.first() {
        tracing::error!(
            records = view.newer_records.len(),
            first = %key,
            "records of a newer format than this controller reads (record format {RECORD_FORMAT}): \
             a newer Rialto wrote them; this controller acts on nothing until it is upgraded"
        );
        return Vec::new();
    }
    view.stores
        .values()
        .flat_map(|s| plan_store(view, s))
        .collect()
}

/// Applies [`Action`]s against etcd and the pub-sub broker. Remembers which topics it deleted so a
/// failed version's topic is deleted once per leadership term, not on every tick.
pub struct Reconciler {
    layout: Layout,
    meta: Arc<dyn MetaStore>,
    pubsub: Arc<dyn PubSub>,
    deleted_topics: HashSet<String>,
    reports: ReportClock,
    absences: NodeClock,
    rebalance: RebalanceConfig,
    push_timeout: std::time::Duration,
    topic_deletion: TopicDeletion,
    /// Whether the last view had no replica fetching ([`ClusterView::quiet`]).
    quiet: bool,
}

impl Reconciler {
    /// A reconciler over one cluster root.
    pub fn new(
        layout: Layout,
        meta: Arc<dyn MetaStore>,
        pubsub: Arc<dyn PubSub>,
        rebalance: RebalanceConfig,
    ) -> Reconciler {
        Reconciler {
            layout,
            meta,
            pubsub,
            deleted_topics: HashSet::new(),
            reports: ReportClock::default(),
            absences: NodeClock::default(),
            rebalance,
            push_timeout: std::time::Duration::ZERO,
            topic_deletion: TopicDeletion::default(),
            quiet: true,
        }
    }

    /// When topics are deleted (see [`TopicDeletion`]).
    pub fn with_topic_deletion(mut self, deletion: TopicDeletion) -> Reconciler {
        self.topic_deletion = deletion;
        self
    }

    /// Fails a version still being pushed (or waiting for its replicas) this long after it was
    /// started; zero never does.
    pub fn with_push_timeout(mut self, timeout: std::time::Duration) -> Reconciler {
        self.push_timeout = timeout;
        self
    }

    /// Follows the metadata and reconciles until `stop` becomes true (leadership lost or
    /// shutdown). Returns an error only if the prefixes cannot be listed at all.
    pub async fn run(&mut self, mut stop: watch::Receiver<bool>) -> Result<(), ControllerError> {
        let stores = PrefixMirror::start(self.meta.clone(), self.layout.stores_prefix()).await?;
        let versions =
            PrefixMirror::start(self.meta.clone(), self.layout.versions_prefix()).await?;
        let replicas =
            PrefixMirror::start(self.meta.clone(), self.layout.replicas_prefix()).await?;
        let nodes = PrefixMirror::start(self.meta.clone(), self.layout.nodes_prefix()).await?;
        let drains = PrefixMirror::start(self.meta.clone(), self.layout.drains_prefix()).await?;
        let deferred =
            PrefixMirror::start(self.meta.clone(), self.layout.topic_deletions_prefix()).await?;
        let (mut s_rx, mut v_rx, mut r_rx, mut n_rx, mut d_rx) = (
            stores.subscribe(),
            versions.subscribe(),
            replicas.subscribe(),
            nodes.subscribe(),
            drains.subscribe(),
        );
        let mut tick = tokio::time::interval(RECONCILE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let mut view = ClusterView::parse(
                &self.layout,
                &stores.snapshot().await,
                &versions.snapshot().await,
                &replicas.snapshot().await,
                &mut self.reports,
            );
            view.push_timeout_ms = i64::try_from(self.push_timeout.as_millis()).unwrap_or(i64::MAX);
            view.add_nodes(
                &nodes.snapshot().await,
                &drains.snapshot().await,
                &mut self.absences,
            );
            self.quiet = view.quiet();
            let actions = plan(&view)
                .into_iter()
                .chain(plan_moves(&view, &self.rebalance));
            for action in actions {
                if *stop.borrow() {
                    return Ok(());
                }
                if let Err(e) = self.apply(&action).await {
                    tracing::warn!(?action, error = %e, "reconcile action failed; retrying on the next pass");
                }
            }
            let waiting = deferred.snapshot().await;
            if self.quiet && !waiting.is_empty() {
                if let Err(e) = self.delete_deferred_topics(waiting.keys()).await {
                    tracing::warn!(error = %e, "deferred topic deletion failed; retrying on the next pass");
                }
            }
            tokio::select! {
                biased;
                r = stop.changed() => if r.is_err() { return Ok(()) },
                _ = s_rx.changed() => {}
                _ = v_rx.changed() => {}
                _ = r_rx.changed() => {}
                _ = n_rx.changed() => {}
                _ = d_rx.changed() => {}
                _ = tick.tick() => {}
            }
        }
    }

    /// Applies one action. Every step re-reads the record it changes and is idempotent.
    pub async fn apply(&mut self, action: &Action) -> Result<(), ControllerError> {
        if matches!(
            action,
            Action::StartMove { .. } | Action::StartEmptyVersion { .. }
        ) {
            // Replicas start fetching: no deletion in the rest of this pass.
            self.quiet = false;
        }
        match action {
            Action::Fail {
                store,
                version,
                reason,
            } => {
                let changed = update_version(&*self.meta, &self.layout, store, *version, |v| {
                    if !in_progress(&v.status) {
                        return Ok(false);
                    }
                    v.status = VersionStatus::Failed {
                        reason: reason.clone(),
                    };
                    Ok(true)
                })
                .await?;
                if changed.is_some() {
                    tracing::warn!(%store, version, %reason, "version failed");
                }
            }
            Action::Swap { store, version } => self.swap(store, *version).await?,
            Action::MarkOnline { store, version } => {
                let changed = update_version(&*self.meta, &self.layout, store, *version, |v| {
                    if !in_progress(&v.status) {
                        return Ok(false);
                    }
                    v.status = VersionStatus::Online;
                    Ok(true)
                })
                .await?;
                if changed.is_some() {
                    tracing::info!(%store, version, "current version marked online");
                }
            }
            Action::Seal { store, version } => {
                let changed = update_version(&*self.meta, &self.layout, store, *version, |v| {
                    Ok(!std::mem::replace(&mut v.sealed, true))
                })
                .await?;
                if changed.is_some() {
                    tracing::info!(%store, version, "neither current nor backup: sealed, no longer following real-time writes");
                }
            }
            Action::DeleteTopic {
                store,
                version,
                topic,
            } => {
                if !self.deleted_topics.contains(topic) {
                    self.delete_topic(topic).await?;
                    self.deleted_topics.insert(topic.clone());
                    tracing::info!(%store, version, %topic, "deleted topic of failed version");
                }
            }
            Action::Retire {
                store,
                version,
                topic,
            } => {
                if !self.deleted_topics.contains(topic) {
                    self.delete_topic(topic).await?;
                }
                self.meta
                    .delete_prefix(&self.layout.version_replicas_prefix(store, *version))
                    .await?;
                self.meta
                    .delete_prefix(&self.layout.version_leaders_prefix(store, *version))
                    .await?;
                self.meta
                    .delete_prefix(&self.layout.version_copiers_prefix(store, *version))
                    .await?;
                // The version record goes last: while it exists, the next pass retries the rest.
                self.meta
                    .delete(&self.layout.version(store, *version))
                    .await?;
                self.deleted_topics.remove(topic);
                tracing::info!(%store, version, %topic, "retired version (topic, replicas and record deleted)");
            }
            Action::DeleteOrphanReplicas { store, version } => {
                self.meta
                    .delete_prefix(&self.layout.version_replicas_prefix(store, *version))
                    .await?;
                tracing::info!(%store, version, "deleted replica records of a retired version");
            }
            Action::FailDeleted { store, version } => {
                fail_version(&*self.meta, &self.layout, store, *version, "store deleted").await?;
            }
            Action::DeleteStore { store, topics } => {
                for topic in topics
                    .iter()
                    .cloned()
                    .chain([rialto_protocol::meta::realtime_topic(store)])
                {
                    if !self.deleted_topics.contains(&topic) {
                        self.delete_topic(&topic).await?;
                        self.deleted_topics.insert(topic);
                    }
                }
                for prefix in [
                    self.layout.store_replicas_prefix(store),
                    format!("{}/partition-leaders/{store}/", self.layout.root()),
                    self.layout.realtime_decisions_prefix(store),
                    self.layout.realtime_writers_prefix(store),
                    self.layout.store_copiers_prefix(store),
                    self.layout.store_versions_prefix(store),
                ] {
                    self.meta.delete_prefix(&prefix).await?;
                }
                // A store created later under the same name starts with no grants.
                self.meta.delete(&self.layout.store_acl(store)).await?;
                self.meta.delete(&self.layout.store(store)).await?;
                tracing::warn!(%store, "store deleted (topics, versions, replicas, real-time decisions and writers, ACL and record)");
            }
            Action::StartMove {
                store,
                version,
                replica_move: m,
            } => {
                let started = update_version(&*self.meta, &self.layout, store, *version, |v| {
                    let assigned = v
                        .assignment
                        .get(m.partition as usize)
                        .and_then(|nodes| nodes.get(m.group as usize));
                    let busy = v
                        .moves
                        .iter()
                        .any(|o| o.partition == m.partition && o.group == m.group);
                    if assigned != Some(&m.from)
                        || busy
                        || v.partitions_of(&m.to).contains(&m.partition)
                    {
                        return Ok(false);
                    }
                    v.moves.push(m.clone());
                    Ok(true)
                })
                .await?;
                if started.is_some() {
                    tracing::info!(%store, version, partition = m.partition, from = %m.from, to = %m.to, reason = m.reason.name(), "moving replica");
                }
            }
            Action::CommitMove {
                store,
                version,
                partition,
                group,
                from,
                to,
            } => {
                let committed = update_version(&*self.meta, &self.layout, store, *version, |v| {
                    let Some(i) = v.moves.iter().position(|m| {
                        m.partition == *partition && m.group == *group && m.to == *to
                    }) else {
                        return Ok(false);
                    };
                    let Some(slot) = v
                        .assignment
                        .get_mut(*partition as usize)
                        .and_then(|nodes| nodes.get_mut(*group as usize))
                    else {
                        return Ok(false);
                    };
                    if slot != from {
                        return Ok(false);
                    }
                    *slot = to.clone();
                    v.moves.remove(i);
                    Ok(true)
                })
                .await?;
                if committed.is_some() {
                    tracing::info!(%store, version, partition, %from, %to, "replica moved: the new replica is ONLINE and replaces the old one");
                }
            }
            Action::CancelMove {
                store,
                version,
                partition,
                group,
                to,
                reason,
                target_failed,
            } => {
                let now = now_ms();
                let cooldown_ms = crate::rebalance::FAILED_TARGET_COOLDOWN.as_millis() as i64;
                let cancelled = update_version(&*self.meta, &self.layout, store, *version, |v| {
                    let before = v.moves.len();
                    v.moves.retain(|m| {
                        !(m.partition == *partition && m.group == *group && m.to == *to)
                    });
                    if v.moves.len() == before {
                        return Ok(false);
                    }
                    // Remembered in the record: a new leader does not try that node again.
                    v.failed_targets.retain(|f| {
                        now.saturating_sub(f.failed_ms) < cooldown_ms
                            && !(f.partition == *partition && f.node == *to)
                    });
                    if *target_failed {
                        v.failed_targets.push(FailedTarget {
                            partition: *partition,
                            node: to.clone(),
                            failed_ms: now,
                        });
                    }
                    Ok(true)
                })
                .await?;
                if cancelled.is_some() {
                    tracing::warn!(%store, version, partition, %to, %reason, "replica move cancelled");
                }
            }
            Action::StartEmptyVersion { store } => {
                crate::versions::start_empty_version(
                    &self.layout,
                    &*self.meta,
                    &*self.pubsub,
                    store,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Deletes `topic` now, or, when replicas may be fetching and deletions wait for a quiet
    /// cluster ([`TopicDeletion::WhenIdle`]), records it under `topic-deletions/` for
    /// [`Reconciler::delete_deferred_topics`].
    async fn delete_topic(&self, topic: &str) -> Result<(), ControllerError> {
        if self.quiet || self.topic_deletion == TopicDeletion::Immediate {
            return Ok(self.pubsub.delete_topic(topic).await?);
        }
        let key = self.layout.topic_deletion(topic);
        if self.meta.get(&key).await?.is_none() {
            let record = TopicDeletionRecord {
                deferred_ms: now_ms(),
            };
            self.meta.put(&key, encode_record(&record)?, None).await?;
            tracing::info!(%topic, "replicas are fetching: the topic is deleted once none is (--topic-deletion when-idle)");
        }
        Ok(())
    }

    /// Deletes the topics whose deletion was deferred (keys of the `topic-deletions/` prefix).
    async fn delete_deferred_topics(
        &self,
        keys: impl Iterator<Item = &String>,
    ) -> Result<(), ControllerError> {
        let prefix = self.layout.topic_deletions_prefix();
        for key in keys {
            let Some(topic) = key.strip_prefix(&prefix) else {
                continue;
            };
            self.pubsub.delete_topic(topic).await?;
            self.meta.delete(key).await?;
            tracing::info!(%topic, "deleted a topic whose deletion waited for no replica to fetch");
        }
        Ok(())
    }

    /// Makes `version` current: first marks the version record ONLINE (a compare-and-put that
    /// a concurrent fail call cannot interleave with: both change the same record, and fail only
    /// moves an in-progress version), then moves the store's current version to it (a
    /// compare-and-put of the store record). A crash between the two leaves an ONLINE version
    /// newer than the current one, which the next plan swaps in again.
    async fn swap(&mut self, store: &str, version: u32) -> Result<(), ControllerError> {
        let mut online = false;
        update_version(&*self.meta, &self.layout, store, version, |v| {
            match &v.status {
                s if in_progress(s) => {
                    v.status = VersionStatus::Online;
                    online = true;
                    Ok(true)
                }
                VersionStatus::Online => {
                    online = true;
                    Ok(false)
                }
                // Failed (the push job or a replica said so first): never goes live.
                _ => Ok(false),
            }
        })
        .await?;
        if !online {
            tracing::info!(%store, version, "not swapping: the version failed first");
            return Ok(());
        }
        let mut previous = None;
        let swapped = update_store(&*self.meta, &self.layout, store, |s| {
            if s.current_version.is_some_and(|c| c >= version) {
                // Never swap to a version older than (or equal to) the current one.
                return Ok(false);
            }
            previous = s.current_version;
            s.backup_version = s.current_version;
            s.current_version = Some(version);
            Ok(true)
        })
        .await?;
        if swapped.is_some() {
            tracing::info!(%store, version, backup = ?previous, "swapped current version");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rialto_protocol::meta::{version_topic, StorageProfile, ValueSchema};

    use super::*;

    fn store(current: Option<u32>, backup: Option<u32>, largest: u32) -> StoreRecord {
        StoreRecord {
            name: "s".into(),
            owner: String::new(),
            key_schema: "\"string\"".into(),
            value_schemas: vec![ValueSchema {
                id: 1,
                schema: "\"string\"".into(),
            }],
            partition_count: 2,
            replication_factor: 2,
            storage: StorageProfile::OnDisk,
            compression: rialto_protocol::meta::Compression::None,
            max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
            hybrid: None,
            created_ms: 0,
            current_version: current,
            backup_version: backup,
            largest_version: largest,
            deleting: false,
            read_quota_keys_per_s: None,
            storage_quota_bytes: None,
            versions_to_keep: 2,
        }
    }

    fn version(n: u32, status: VersionStatus) -> VersionRecord {
        VersionRecord {
            store: "s".into(),
            version: n,
            topic: version_topic("s", n),
            partition_count: 2,
            assignment: vec![vec!["a".into(), "b".into()], vec!["b".into(), "a".into()]],
            status,
            created_ms: 0,
            storage: StorageProfile::OnDisk,
            compression: rialto_protocol::meta::Compression::None,
            value_format: rialto_protocol::meta::ValueFormat::SchemaIdPrefixed,
            max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
            hybrid: None,
            moves: vec![],
            pushed_by: None,
            sealed: false,
            producer: None,
            failed_targets: Vec::new(),
        }
    }

    fn replica(state: ReplicaState, error: Option<&str>) -> ReplicaRecord {
        ReplicaRecord {
            state,
            offset: 10,
            records: 5,
            consumed_from: 0,
            updated_ms: 0,
            error: error.map(str::to_string),
            disk_bytes: 0,
            memory_bytes: 0,
            lag: None,
            leader: false,
            following: false,
        }
    }

    fn view(s: StoreRecord, versions: Vec<VersionRecord>) -> ClusterView {
        let mut v = ClusterView::default();
        v.stores.insert(s.name.clone(), s);
        for r in versions {
            v.versions.insert((r.store.clone(), r.version), r);
        }
        v
    }

    fn set_all(v: &mut ClusterView, version: u32, state: ReplicaState) {
        for p in 0..2 {
            for n in ["a", "b"] {
                v.replicas
                    .insert(("s".into(), version, p, n.into()), replica(state, None));
            }
        }
    }

    #[test]
    fn all_online_swaps() {
        let mut v = view(
            store(None, None, 1),
            vec![version(1, VersionStatus::PushWritten)],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        assert_eq!(
            plan(&v),
            vec![Action::Swap {
                store: "s".into(),
                version: 1
            }]
        );
    }

    #[test]
    fn older_versions_are_kept_up_to_versions_to_keep() {
        let mut s = store(Some(5), Some(4), 5);
        s.versions_to_keep = 4;
        let versions = (1..=5).map(|n| version(n, VersionStatus::Online)).collect();
        let v = view(s, versions);
        // Current 5, backup 4, and 3 and 2 kept: only 1 goes.
        let retired: Vec<u32> = plan(&v)
            .iter()
            .filter_map(|a| match a {
                Action::Retire { version, .. } => Some(*version),
                _ => None,
            })
            .collect();
        assert_eq!(retired, vec![1]);
        assert_eq!(
            kept_older_versions(&v, &v.stores["s"]),
            BTreeSet::from([2, 3])
        );
    }

    #[test]
    fn a_version_larger_than_the_storage_quota_fails_instead_of_swapping() {
        let mut s = store(None, None, 1);
        s.storage_quota_bytes = Some(1_500);
        let mut v = view(s, vec![version(1, VersionStatus::PushWritten)]);
        set_all(&mut v, 1, ReplicaState::Online);
        for r in v.replicas.values_mut() {
            r.disk_bytes = 1_000;
        }
        // Four replicas of 1,000 bytes, two copies: 2,000 bytes a copy.
        let actions = plan(&v);
        assert!(
            matches!(&actions[..], [Action::Fail { version: 1, reason, .. }] if reason.contains("2000 bytes")),
            "{actions:?}"
        );
        v.stores.get_mut("s").unwrap().storage_quota_bytes = Some(2_000);
        assert_eq!(
            plan(&v),
            vec![Action::Swap {
                store: "s".into(),
                version: 1
            }]
        );
    }

    #[test]
    fn missing_replica_report_blocks_the_swap() {
        let mut v = view(
            store(None, None, 1),
            vec![version(1, VersionStatus::Pushing)],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        v.replicas.remove(&("s".into(), 1, 1, "a".into()));
        assert_eq!(plan(&v), vec![]);
        set_all(&mut v, 1, ReplicaState::Bootstrap);
        assert_eq!(plan(&v), vec![]);
    }

    #[test]
    fn error_replica_fails_the_version_with_a_reason() {
        let mut v = view(
            store(Some(1), None, 2),
            vec![
                version(1, VersionStatus::Online),
                version(2, VersionStatus::Pushing),
            ],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        set_all(&mut v, 2, ReplicaState::Online);
        v.replicas.insert(
            ("s".into(), 2, 1, "b".into()),
            replica(ReplicaState::Error, Some("checksum mismatch")),
        );
        assert_eq!(
            plan(&v),
            vec![Action::Fail {
                store: "s".into(),
                version: 2,
                reason: "partition 1 replica on b: checksum mismatch".into()
            }]
        );
    }

    #[test]
    fn only_a_push_reported_written_goes_live_and_a_stalled_push_times_out() {
        let mut v = view(
            store(None, None, 1),
            vec![version(1, VersionStatus::Pushing)],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        // Whoever wrote END_OF_PUSH to the topic made the replicas ONLINE; that is not enough.
        assert_eq!(plan(&v), vec![]);
        v.push_timeout_ms = 60_000;
        let created = v.versions[&("s".to_string(), 1)].created_ms;
        v.now_ms = created + 60_001;
        match plan(&v).as_slice() {
            [Action::Fail {
                version: 1, reason, ..
            }] => {
                assert!(reason.contains("push timed out"), "{reason}")
            }
            other => panic!("expected the push to time out: {other:?}"),
        }
    }

    #[test]
    fn unassigned_replica_errors_are_ignored() {
        let mut v = view(
            store(None, None, 1),
            vec![version(1, VersionStatus::PushWritten)],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        v.replicas.insert(
            ("s".into(), 1, 0, "zz".into()),
            replica(ReplicaState::Error, Some("x")),
        );
        assert_eq!(
            plan(&v),
            vec![Action::Swap {
                store: "s".into(),
                version: 1
            }]
        );
    }

    #[test]
    fn newest_ready_version_wins_and_older_in_progress_ones_are_superseded() {
        let mut v = view(
            store(Some(1), None, 3),
            vec![
                version(1, VersionStatus::Online),
                version(2, VersionStatus::Pushing),
                version(3, VersionStatus::PushWritten),
            ],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        set_all(&mut v, 2, ReplicaState::Online);
        set_all(&mut v, 3, ReplicaState::Online);
        assert_eq!(
            plan(&v),
            vec![Action::Swap {
                store: "s".into(),
                version: 3
            }]
        );
        // After the swap to 3, version 2 (older than current) is failed as superseded.
        let mut s = store(Some(3), Some(1), 3);
        s.name = "s".into();
        v.stores.insert("s".into(), s);
        let actions = plan(&v);
        assert!(actions.iter().any(|a| matches!(a, Action::Fail { version: 2, reason, .. } if reason.contains("superseded"))));
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::MarkOnline { version: 3, .. })));
        assert!(!actions.iter().any(|a| matches!(a, Action::Swap { .. })));
    }

    #[test]
    fn never_swaps_to_an_older_version() {
        let mut v = view(
            store(Some(5), Some(4), 6),
            vec![
                version(4, VersionStatus::Online),
                version(5, VersionStatus::Online),
            ],
        );
        set_all(&mut v, 4, ReplicaState::Online);
        set_all(&mut v, 5, ReplicaState::Online);
        assert_eq!(plan(&v), vec![]);
    }

    #[test]
    fn an_online_version_newer_than_current_is_swapped_in_not_retired() {
        // The swap marked version 3 ONLINE and stopped before it moved the store record.
        let v = view(
            store(Some(2), Some(1), 3),
            vec![
                version(1, VersionStatus::Online),
                version(2, VersionStatus::Online),
                version(3, VersionStatus::Online),
            ],
        );
        assert_eq!(
            plan(&v),
            vec![Action::Swap {
                store: "s".into(),
                version: 3
            }]
        );
    }

    #[test]
    fn versions_beyond_current_and_backup_are_retired() {
        let v = view(
            store(Some(3), Some(2), 3),
            vec![
                version(1, VersionStatus::Online),
                version(2, VersionStatus::Online),
                version(3, VersionStatus::Online),
            ],
        );
        assert_eq!(
            plan(&v),
            vec![Action::Retire {
                store: "s".into(),
                version: 1,
                topic: "s_v1".into()
            }]
        );
    }

    #[test]
    fn failed_versions_lose_their_topic_and_their_record_once_older_than_current() {
        let failed = || VersionStatus::Failed {
            reason: "boom".into(),
        };
        let v = view(
            store(Some(2), None, 3),
            vec![
                version(1, failed()),
                version(2, VersionStatus::Online),
                version(3, failed()),
            ],
        );
        assert_eq!(
            plan(&v),
            vec![
                Action::Retire {
                    store: "s".into(),
                    version: 1,
                    topic: "s_v1".into()
                },
                Action::DeleteTopic {
                    store: "s".into(),
                    version: 3,
                    topic: "s_v3".into()
                },
            ]
        );
        // No current version yet: failed records stay for operators, only the topic goes.
        let v = view(store(None, None, 1), vec![version(1, failed())]);
        assert_eq!(
            plan(&v),
            vec![Action::DeleteTopic {
                store: "s".into(),
                version: 1,
                topic: "s_v1".into()
            }]
        );
    }

    #[test]
    fn a_topic_is_deleted_only_once_no_server_consumes_it() {
        let failed = || VersionStatus::Failed {
            reason: "boom".into(),
        };
        let delete_v3 = Action::DeleteTopic {
            store: "s".into(),
            version: 3,
            topic: "s_v3".into(),
        };
        let retire_v1 = Action::Retire {
            store: "s".into(),
            version: 1,
            topic: "s_v1".into(),
        };
        let mut v = view(
            store(Some(2), None, 3),
            vec![
                version(1, VersionStatus::Online),
                version(2, VersionStatus::Online),
                version(3, failed()),
            ],
        );
        v.now_ms = 100_000;
        // Version 1 (retiring) has a replica re-bootstrapping; version 3 (failed) has replicas
        // still waiting for records that will never come, and one in ERROR. The servers' own
        // clocks (`updated_ms`, all zero here) do not matter, only when the controller saw them.
        for ((version, partition, node), state, at) in [
            ((1, 0, "a"), ReplicaState::Online, 0),
            ((1, 1, "b"), ReplicaState::Bootstrap, 99_000),
            ((3, 0, "a"), ReplicaState::Error, 99_000),
            ((3, 1, "a"), ReplicaState::Offline, 99_500),
            ((3, 1, "b"), ReplicaState::Bootstrap, 99_900),
        ] {
            let id: (String, u32, u32, String) = ("s".into(), version, partition, node.into());
            v.replicas.insert(id.clone(), replica(state, None));
            v.reported_ms.insert(id, at);
        }
        assert!(v.consuming("s", 1) && v.consuming("s", 3) && !v.consuming("s", 2));
        assert_eq!(plan(&v), vec![], "both topics are still consumed");

        // The servers drop version 3's consuming replicas: its topic goes, version 1 still waits.
        v.replicas.remove(&("s".into(), 3, 1, "a".into()));
        v.replicas.remove(&("s".into(), 3, 1, "b".into()));
        assert_eq!(plan(&v), vec![delete_v3.clone()]);

        // A replica that stopped reporting holds the topic for TOPIC_RELEASE_WAIT at most.
        v.now_ms = 99_000 + TOPIC_RELEASE_WAIT.as_millis() as i64 - 1;
        assert_eq!(plan(&v), vec![delete_v3.clone()]);
        v.now_ms += 1;
        assert_eq!(plan(&v), vec![retire_v1, delete_v3]);
    }

    #[test]
    fn a_report_is_aged_from_when_the_controller_saw_it_not_by_the_servers_clock() {
        let layout = Layout::new("/r");
        let empty = PrefixMap::new();
        let key = layout.replica("s", 1, 0, "a");
        let bootstrap = |updated_ms| {
            let mut replicas = PrefixMap::new();
            let record = ReplicaRecord {
                updated_ms,
                ..replica(ReplicaState::Bootstrap, None)
            };
            replicas.insert(key.clone(), serde_json::to_vec(&record).unwrap());
            replicas
        };
        let wait = TOPIC_RELEASE_WAIT.as_millis() as i64;
        let mut clock = ReportClock::default();
        // A server whose clock is an hour behind: its report is still fresh when first seen.
        let skewed = bootstrap(now_ms() - 3_600_000);
        let id = ("s".to_string(), 1, 0, "a".to_string());
        let v = ClusterView::parse(&layout, &empty, &empty, &skewed, &mut clock);
        let first_seen = v.now_ms;
        assert_eq!(v.reported_ms[&id], first_seen);
        assert!(v.consuming("s", 1));
        // The same record seen again keeps its first sighting, and ages from there.
        std::thread::sleep(Duration::from_millis(5));
        let mut v = ClusterView::parse(&layout, &empty, &empty, &skewed, &mut clock);
        assert_eq!(v.reported_ms[&id], first_seen);
        assert!(v.now_ms > first_seen && v.consuming("s", 1));
        v.now_ms = first_seen + wait;
        assert!(!v.consuming("s", 1));
        // A new report (any change of the record) starts the wait again.
        let v = ClusterView::parse(&layout, &empty, &empty, &bootstrap(1), &mut clock);
        assert_eq!(v.reported_ms[&id], v.now_ms);
        assert!(v.now_ms > first_seen && v.consuming("s", 1));
        // A record that is gone is forgotten.
        ClusterView::parse(&layout, &empty, &empty, &empty, &mut clock);
        assert!(clock.seen.is_empty());
    }

    #[test]
    fn current_but_still_pushing_is_marked_online() {
        let v = view(
            store(Some(1), None, 1),
            vec![version(1, VersionStatus::PushWritten)],
        );
        assert_eq!(
            plan(&v),
            vec![Action::MarkOnline {
                store: "s".into(),
                version: 1
            }]
        );
    }

    #[test]
    fn orphan_replicas_of_old_versions_are_deleted_but_not_of_new_ones() {
        let mut v = view(
            store(Some(3), None, 4),
            vec![version(3, VersionStatus::Online)],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        set_all(&mut v, 3, ReplicaState::Online);
        set_all(&mut v, 4, ReplicaState::Bootstrap);
        assert_eq!(
            plan(&v),
            vec![Action::DeleteOrphanReplicas {
                store: "s".into(),
                version: 1
            }]
        );
    }

    #[test]
    fn view_parses_keys_and_skips_corrupt_records() {
        let layout = Layout::new("/r");
        let mut stores = PrefixMap::new();
        stores.insert(
            layout.store("s"),
            serde_json::to_vec(&store(None, None, 0)).unwrap(),
        );
        stores.insert(layout.store("bad"), b"{not json".to_vec());
        let mut versions = PrefixMap::new();
        versions.insert(
            layout.version("s", 1),
            serde_json::to_vec(&version(1, VersionStatus::Pushing)).unwrap(),
        );
        let mut replicas = PrefixMap::new();
        replicas.insert(
            layout.replica("s", 1, 0, "a"),
            serde_json::to_vec(&replica(ReplicaState::Online, None)).unwrap(),
        );
        replicas.insert("/r/replicas/garbage".into(), b"{}".to_vec());
        let v = ClusterView::parse(
            &layout,
            &stores,
            &versions,
            &replicas,
            &mut ReportClock::default(),
        );
        assert_eq!(v.stores.len(), 1);
        assert_eq!(v.versions.len(), 1);
        assert_eq!(v.replica_state("s", 1, 0, "a"), ReplicaState::Online);
        assert_eq!(v.replica_state("s", 1, 1, "a"), ReplicaState::Offline);
        assert!(v.newer_records.is_empty());
    }

    #[tokio::test]
    async fn a_failed_move_target_is_kept_in_the_version_record_for_the_next_leader() {
        use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};
        let layout = Layout::new("/r");
        let meta = Arc::new(MemoryMetaStore::new());
        let mut record = version(1, VersionStatus::Online);
        let started_ms = now_ms();
        let stale = FailedTarget {
            partition: 1,
            node: "old".into(),
            failed_ms: started_ms - 2 * crate::rebalance::FAILED_TARGET_COOLDOWN.as_millis() as i64,
        };
        record.failed_targets = vec![stale];
        record.moves = vec![ReplicaMove {
            partition: 0,
            group: 0,
            from: "a".into(),
            to: "d".into(),
            reason: rialto_protocol::meta::MoveReason::NodeLost,
            started_ms,
        }];
        meta.put(
            &layout.version("s", 1),
            rialto_protocol::meta::encode_record(&record).unwrap(),
            None,
        )
        .await
        .unwrap();
        let mut leader = Reconciler::new(
            layout.clone(),
            meta.clone(),
            Arc::new(MemoryPubSub::new()),
            RebalanceConfig::default(),
        );
        leader
            .apply(&Action::CancelMove {
                store: "s".into(),
                version: 1,
                partition: 0,
                group: 0,
                to: "d".into(),
                reason: "its replica failed".into(),
                target_failed: true,
            })
            .await
            .unwrap();

        // Another controller, reading only etcd, keeps away from `d` for that partition.
        let (versions, _) = meta.list(&layout.versions_prefix()).await.unwrap();
        let versions: PrefixMap = versions.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let empty = PrefixMap::new();
        let v = ClusterView::parse(
            &layout,
            &empty,
            &versions,
            &empty,
            &mut ReportClock::default(),
        );
        let record = &v.versions[&("s".to_string(), 1)];
        assert!(record.moves.is_empty(), "the move is cancelled");
        assert_eq!(
            v.failed_targets.keys().collect::<Vec<_>>(),
            [&("s".to_string(), 1, 0, "d".to_string())],
            "the failure is known; the one past the cooldown is gone"
        );
        assert_eq!(record.failed_targets.len(), 1, "the stale entry was pruned");
    }

    #[test]
    fn a_record_of_a_newer_format_stops_all_planning() {
        let layout = Layout::new("/r");
        let mut stores = PrefixMap::new();
        // A hybrid store without versions: planning would create one.
        let hybrid = StoreRecord {
            hybrid: Some(rialto_protocol::meta::HybridConfig {
                rewind_seconds: 60,
                lag_records_max: 10,
            }),
            ..store(None, None, 0)
        };
        stores.insert(
            layout.store("s"),
            rialto_protocol::meta::encode_record(&hybrid).unwrap(),
        );
        let empty = PrefixMap::new();
        let parse = |stores: &PrefixMap| {
            ClusterView::parse(&layout, stores, &empty, &empty, &mut ReportClock::default())
        };
        assert!(!plan(&parse(&stores)).is_empty());

        let mut newer: serde_json::Value = serde_json::to_value(store(None, None, 0)).unwrap();
        newer["name"] = "t".into();
        newer["format"] = (RECORD_FORMAT + 1).into();
        stores.insert(layout.store("t"), serde_json::to_vec(&newer).unwrap());
        let v = parse(&stores);
        assert_eq!(v.newer_records, [layout.store("t")]);
        assert_eq!(plan(&v), vec![], "an older controller acts on nothing");
    }

    #[test]
    fn a_hybrid_store_without_versions_gets_an_empty_one() {
        let hybrid = Some(rialto_protocol::meta::HybridConfig {
            rewind_seconds: 60,
            lag_records_max: 10,
        });
        let v = view(
            StoreRecord {
                hybrid,
                ..store(None, None, 0)
            },
            vec![],
        );
        assert_eq!(
            plan(&v),
            vec![Action::StartEmptyVersion { store: "s".into() }]
        );
        // Once a version exists (pushed or empty), never again.
        let v = view(
            StoreRecord {
                hybrid,
                ..store(None, None, 1)
            },
            vec![version(1, VersionStatus::Pushing)],
        );
        assert_eq!(plan(&v), vec![]);
        // A batch store waits for its first push.
        assert_eq!(plan(&view(store(None, None, 0), vec![])), vec![]);
    }

    #[test]
    fn a_version_still_following_real_time_writes_is_not_retired() {
        let mut v = view(
            store(Some(3), Some(2), 3),
            vec![
                version(1, VersionStatus::Online),
                version(2, VersionStatus::Online),
                version(3, VersionStatus::Online),
            ],
        );
        for n in 1..=3 {
            set_all(&mut v, n, ReplicaState::Online);
        }
        let following = ReplicaRecord {
            following: true,
            ..replica(ReplicaState::Online, None)
        };
        v.replicas.insert(("s".into(), 1, 0, "a".into()), following);
        assert_eq!(plan(&v), vec![], "its server has not sealed it yet");
        v.replicas.insert(
            ("s".into(), 1, 0, "a".into()),
            replica(ReplicaState::Online, None),
        );
        assert_eq!(
            plan(&v),
            vec![Action::Retire {
                store: "s".into(),
                version: 1,
                topic: "s_v1".into()
            }]
        );
    }

    const HYBRID: rialto_protocol::meta::HybridConfig = rialto_protocol::meta::HybridConfig {
        rewind_seconds: 60,
        lag_records_max: 10,
    };

    #[test]
    fn a_hybrid_version_follows_while_current_or_backup_and_is_sealed_before_retiring() {
        let hybrid = |n: u32| VersionRecord {
            hybrid: Some(HYBRID),
            ..version(n, VersionStatus::Online)
        };
        let mut v = view(
            StoreRecord {
                hybrid: Some(HYBRID),
                ..store(Some(3), Some(2), 3)
            },
            vec![hybrid(1), hybrid(2), hybrid(3)],
        );
        let following = ReplicaRecord {
            following: true,
            ..replica(ReplicaState::Online, None)
        };
        for n in 1..=3 {
            for p in 0..2 {
                for node in ["a", "b"] {
                    v.replicas
                        .insert(("s".into(), n, p, node.into()), following.clone());
                }
            }
        }
        // The backup (2) keeps following, so a rollback serves every write; 1 is sealed first.
        assert_eq!(
            plan(&v),
            vec![Action::Seal {
                store: "s".into(),
                version: 1
            }]
        );
        v.versions.get_mut(&("s".into(), 1)).unwrap().sealed = true;
        assert_eq!(plan(&v), vec![], "its servers have not sealed it yet");
        set_all(&mut v, 1, ReplicaState::Online);
        assert_eq!(
            plan(&v),
            vec![Action::Retire {
                store: "s".into(),
                version: 1,
                topic: "s_v1".into()
            }]
        );
        // Rolled back: the same two versions, both following; nothing to seal.
        let rolled = view(
            StoreRecord {
                hybrid: Some(HYBRID),
                ..store(Some(2), Some(3), 3)
            },
            vec![hybrid(2), hybrid(3)],
        );
        assert_eq!(plan(&rolled), vec![]);
    }

    #[test]
    fn a_cluster_is_quiet_only_when_no_replica_may_fetch() {
        let mut v = view(
            store(Some(1), None, 2),
            vec![version(1, VersionStatus::Online)],
        );
        set_all(&mut v, 1, ReplicaState::Online);
        assert!(v.quiet(), "ONLINE batch replicas do not fetch");
        let following = ReplicaRecord {
            following: true,
            ..replica(ReplicaState::Online, None)
        };
        v.replicas
            .insert(("s".into(), 1, 0, "a".into()), following.clone());
        assert!(!v.quiet(), "a replica following real-time writes fetches");
        set_all(&mut v, 1, ReplicaState::Online);
        v.versions
            .insert(("s".into(), 2), version(2, VersionStatus::Pushing));
        assert!(
            !v.quiet(),
            "a version being pushed has replicas about to fetch"
        );
        v.versions
            .insert(("s".into(), 2), version(2, VersionStatus::Online));
        set_all(&mut v, 2, ReplicaState::Bootstrap);
        assert!(!v.quiet(), "bootstrapping replicas fetch");
        set_all(&mut v, 2, ReplicaState::Online);
        assert!(v.quiet());
    }
}
