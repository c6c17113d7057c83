//! The etcd key layout and the metadata records stored under it (JSON, so operators can read
//! them with `etcdctl get --prefix /rialto/`).
//!
//! ```text
//! {root}/stores/{store}                              StoreRecord      written by the controller
//! {root}/versions/{store}/{version:010}              VersionRecord    written by the controller
//! {root}/nodes/{node_id}                             NodeRecord       written by each server, under its lease
//! {root}/replicas/{store}/{version:010}/{partition:05}/{node_id}
//!                                                    ReplicaRecord    written by the hosting server, under its lease
//! {root}/controller/leader                           controller id    under the leader's lease
//! {root}/partition-leaders/{store}/{version:010}/{partition:05}
//!                                                    node id          a hybrid version's partition leader, under its lease
//! {root}/drains/{node_id}                            DrainRecord      written by the admin API: move this node's replicas away
//! {root}/realtime-decisions/{store}/{partition:05}/{offset:020}
//!                                                    RealtimeDecision written by the admin API: what a partition leader does
//!                                                                     with a real-time record it refused
//! {root}/realtime-writers/{store}/{producer}         RealtimeWriterRecord written by the admin API: a registered real-time
//!                                                                     writer's producer GUID and signing secret
//! {root}/copiers/{store}/{version:010}/{producer}    RealtimeWriterRecord written by a partition leader: the producer and
//!                                                                     secret its copies into the version topic are signed with
//! ```
//!
//! Version numbers and partitions are zero-padded so that etcd's lexical order is numeric order.
//! Replica records live under the server's lease: when a server dies its replicas vanish and no
//! client routes to it.
//!
//! Every record is written with [`encode_record`] and read with [`decode_record`]: it carries
//! its format (`"format": 1`, [`RECORD_FORMAT`]), and a process meeting a record of a newer
//! format than it knows refuses it ([`RecordError::NewerFormat`]) rather than misreading it.
//! Fields added with a default keep the format; a change an older reader would misread bumps
//! it, and a cluster is then upgraded readers first: every process learns the new format
//! before any writes it. A record without the field predates it and is format 1.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The format of the metadata records this build writes, and the newest it reads.
pub const RECORD_FORMAT: u32 = 1;

/// A metadata record that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "the record is in format {found}, newer than this process knows ({RECORD_FORMAT}): \
         a newer Rialto wrote it; upgrade this process"
    )]
    NewerFormat { found: u32 },
    #[error("the record is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
}

/// A metadata record as stored: its JSON with the `format` field.
pub fn encode_record<T: Serialize>(record: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(record)?;
    if let serde_json::Value::Object(fields) = &mut value {
        fields.insert("format".into(), RECORD_FORMAT.into());
    }
    serde_json::to_vec(&value)
}

/// Reads a stored metadata record, refusing one of a newer format than [`RECORD_FORMAT`].
pub fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    #[derive(Deserialize)]
    struct Format {
        #[serde(default)]
        format: Option<serde_json::Value>,
    }
    // Only objects carry a format; anything else is left to `T` to accept or refuse.
    if let Ok(Format {
        format: Some(found),
    }) = serde_json::from_slice::<Format>(bytes)
    {
        let found = found
            .as_u64()
            .map_or(u32::MAX, |n| n.min(u32::MAX as u64) as u32);
        if found > RECORD_FORMAT {
            return Err(RecordError::NewerFormat { found });
        }
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// The value of a leadership key (the controller's, a hybrid partition's), written under the
/// holder's lease so it goes when the holder does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadershipRecord {
    /// The controller id or node id that leads.
    pub holder: String,
    /// When it took the leadership, milliseconds since the Unix epoch.
    pub since_ms: i64,
}

impl LeadershipRecord {
    /// `holder` leading from `since_ms` (the caller's clock: `rialto_backends::clock::now_ms`).
    pub fn new(holder: &str, since_ms: i64) -> LeadershipRecord {
        LeadershipRecord {
            holder: holder.to_string(),
            since_ms,
        }
    }

    /// The record as stored.
    pub fn encode(&self) -> Vec<u8> {
        // Two plain fields: serializing cannot fail.
        encode_record(self).unwrap_or_default()
    }

    /// Reads a leadership value. A bare holder id (how leaderships were written before they
    /// had a format) is read as that holder, so a cluster can be upgraded one process at a
    /// time; an older process reading a new record sees someone else's leadership, which it
    /// is.
    pub fn decode(bytes: &[u8]) -> Result<LeadershipRecord, RecordError> {
        if bytes.first() == Some(&b'{') {
            return decode_record(bytes);
        }
        Ok(LeadershipRecord {
            holder: String::from_utf8_lossy(bytes).into_owned(),
            since_ms: 0,
        })
    }

    /// Whether `bytes` say that `holder` leads.
    pub fn is_held_by(bytes: &[u8], holder: &str) -> bool {
        LeadershipRecord::decode(bytes).is_ok_and(|r| r.holder == holder)
    }
}

/// The value of a deferred topic deletion's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDeletionRecord {
    /// When the deletion was deferred, milliseconds since the Unix epoch.
    pub deferred_ms: i64,
}

/// Default root prefix of a Rialto cluster in etcd.
pub const DEFAULT_ROOT: &str = "/rialto";
/// Longest store name; names are `[a-zA-Z0-9_-]`, so they are safe in paths, topics and keys.
pub const STORE_NAME_BYTES_MAX: usize = 128;
/// Most partitions in one version.
pub const PARTITION_COUNT_MAX: u32 = 4096;
/// Most replicas of one partition.
pub const REPLICATION_FACTOR_MAX: u32 = 16;

/// Key builder for one cluster root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: String,
}

impl Layout {
    pub fn new(root: &str) -> Layout {
        Layout {
            root: root.trim_end_matches('/').to_string(),
        }
    }
    pub fn root(&self) -> &str {
        &self.root
    }
    pub fn stores_prefix(&self) -> String {
        format!("{}/stores/", self.root)
    }
    pub fn store(&self, store: &str) -> String {
        format!("{}/stores/{store}", self.root)
    }
    pub fn versions_prefix(&self) -> String {
        format!("{}/versions/", self.root)
    }
    pub fn store_versions_prefix(&self, store: &str) -> String {
        format!("{}/versions/{store}/", self.root)
    }
    pub fn version(&self, store: &str, version: u32) -> String {
        format!("{}/versions/{store}/{version:010}", self.root)
    }
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.root)
    }
    pub fn node(&self, node_id: &str) -> String {
        format!("{}/nodes/{node_id}", self.root)
    }
    pub fn replicas_prefix(&self) -> String {
        format!("{}/replicas/", self.root)
    }
    pub fn store_replicas_prefix(&self, store: &str) -> String {
        format!("{}/replicas/{store}/", self.root)
    }
    pub fn version_replicas_prefix(&self, store: &str, version: u32) -> String {
        format!("{}/replicas/{store}/{version:010}/", self.root)
    }
    pub fn replica(&self, store: &str, version: u32, partition: u32, node_id: &str) -> String {
        format!(
            "{}/replicas/{store}/{version:010}/{partition:05}/{node_id}",
            self.root
        )
    }
    /// The leading controller: a [`LeadershipRecord`] under its lease.
    pub fn leader(&self) -> String {
        format!("{}/controller/leader", self.root)
    }
    /// The partition leaders of a hybrid version: [`LeadershipRecord`]s of servers, under
    /// their leases.
    pub fn version_leaders_prefix(&self, store: &str, version: u32) -> String {
        format!("{}/partition-leaders/{store}/{version:010}/", self.root)
    }
    pub fn partition_leader(&self, store: &str, version: u32, partition: u32) -> String {
        format!(
            "{}/partition-leaders/{store}/{version:010}/{partition:05}",
            self.root
        )
    }

    pub fn topic_deletions_prefix(&self) -> String {
        format!("{}/topic-deletions/", self.root)
    }
    /// A topic the controller is to delete once no replica may be fetching (its value: a
    /// [`TopicDeletionRecord`]).
    pub fn topic_deletion(&self, topic: &str) -> String {
        format!("{}/topic-deletions/{topic}", self.root)
    }
    pub fn drains_prefix(&self) -> String {
        format!("{}/drains/", self.root)
    }
    /// A node an operator asked to empty before maintenance.
    pub fn drain(&self, node_id: &str) -> String {
        format!("{}/drains/{node_id}", self.root)
    }

    /// An operator's decisions about real-time records a partition leader refused.
    pub fn realtime_decisions_prefix(&self, store: &str) -> String {
        format!("{}/realtime-decisions/{store}/", self.root)
    }
    /// The decision about the record at `offset` of partition `partition` of the store's
    /// real-time topic (a [`RealtimeDecision`]).
    pub fn realtime_decision(&self, store: &str, partition: u32, offset: i64) -> String {
        format!(
            "{}/realtime-decisions/{store}/{partition:05}/{offset:020}",
            self.root
        )
    }

    /// The real-time writers registered for a store.
    pub fn realtime_writers_prefix(&self, store: &str) -> String {
        format!("{}/realtime-writers/{store}/", self.root)
    }
    /// A registered real-time writer, by its producer GUID in hexadecimal (a
    /// [`RealtimeWriterRecord`]).
    pub fn realtime_writer(&self, store: &str, producer: &str) -> String {
        format!("{}/realtime-writers/{store}/{producer}", self.root)
    }

    /// The partition leaders' copy producers of every version of a store.
    pub fn store_copiers_prefix(&self, store: &str) -> String {
        format!("{}/copiers/{store}/", self.root)
    }
    /// The partition leaders' copy producers of one version.
    pub fn version_copiers_prefix(&self, store: &str, version: u32) -> String {
        format!("{}/copiers/{store}/{version:010}/", self.root)
    }
    /// A partition leader's copy producer (a [`RealtimeWriterRecord`] registered by the leader,
    /// with no lease: replicas verify its copies for as long as the version exists).
    pub fn version_copier(&self, store: &str, version: u32, producer: &str) -> String {
        format!("{}/copiers/{store}/{version:010}/{producer}", self.root)
    }

    /// Every ACL record: the cluster's and each store's (see [`crate::acl`]).
    pub fn acls_prefix(&self) -> String {
        format!("{}/acls/", self.root)
    }
    /// The cluster-wide ACL record (its `admin` grants make cluster administrators).
    pub fn cluster_acl(&self) -> String {
        format!("{}/acls/cluster", self.root)
    }
    /// The ACL record of one store.
    pub fn store_acl(&self, store: &str) -> String {
        format!("{}/acls/stores/{store}", self.root)
    }
    /// The store an ACL key belongs to (`None` for the cluster record or a foreign key).
    pub fn parse_store_acl_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        let store = key
            .strip_prefix(&self.root)?
            .strip_prefix("/acls/stores/")?;
        (!store.is_empty() && !store.contains('/')).then_some(store)
    }

    /// Parses a replica key back into (store, version, partition, node_id).
    pub fn parse_replica_key<'a>(&self, key: &'a str) -> Option<(&'a str, u32, u32, &'a str)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("/replicas/")?;
        let mut parts = rest.split('/');
        let store = parts.next()?;
        let version = parts.next()?.parse().ok()?;
        let partition = parts.next()?.parse().ok()?;
        let node = parts.next()?;
        parts
            .next()
            .is_none()
            .then_some((store, version, partition, node))
    }
}

/// Checks a store name: 1..=128 characters of `[a-zA-Z0-9_-]`.
pub fn validate_store_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > STORE_NAME_BYTES_MAX {
        return Err(format!(
            "store name must be 1 to {STORE_NAME_BYTES_MAX} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "store name `{name}` contains `{c}`; use letters, digits, `_` and `-`"
        ));
    }
    Ok(())
}

/// The version topic of a store version: `<store>_v<N>`.
pub fn version_topic(store: &str, version: u32) -> String {
    format!("{store}_v{version}")
}

/// The real-time topic of a hybrid store: `<store>_rt`.
pub fn realtime_topic(store: &str) -> String {
    format!("{store}_rt")
}

/// How a store's data is laid out on the servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageProfile {
    /// Data expected to fit in memory.
    InMemory,
    /// Block-based tables with a bounded cache.
    #[default]
    OnDisk,
}

/// How a store's values are compressed (by the push job; the client decompresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Values as written.
    #[default]
    None,
    /// One zstd frame per value.
    Zstd,
    /// One zstd frame per value, with a dictionary trained per version by the push job.
    ZstdDictionary,
}

impl Compression {
    /// The codec announced in START_OF_PUSH.
    pub fn codec(self) -> crate::envelope::CompressionCodec {
        use crate::envelope::CompressionCodec;
        match self {
            Compression::None => CompressionCodec::None,
            Compression::Zstd => CompressionCodec::Zstd,
            Compression::ZstdDictionary => CompressionCodec::ZstdWithDictionary,
        }
    }
    /// The name used by the CLI and the admin tables.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::ZstdDictionary => "zstd-dictionary",
        }
    }
}

/// How a version's values are laid out at rest (see [`stored`](crate::stored)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// `schema_id ‖ payload`: versions written before checksums.
    #[default]
    SchemaIdPrefixed,
    /// `schema_id ‖ checksum ‖ payload`: the client verifies every value it reads.
    Checksummed,
}

/// What makes a store *hybrid*: real-time writes (topic `<store>_rt`) merged into every version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HybridConfig {
    /// How far back in the real-time topic a new version's replay starts: real-time writes
    /// this recent are applied again on top of the batch snapshot.
    pub rewind_seconds: u64,
    /// A replica of a hybrid version reports ONLINE only once it is at most this many real-time
    /// records behind the real-time topic.
    pub lag_records_max: u64,
}

/// Longest rewind a hybrid store may ask for (the real-time topic keeps at least twice this).
pub const REWIND_SECONDS_MAX: u64 = 30 * 24 * 3600;

impl HybridConfig {
    /// Refuses settings out of range, saying which.
    pub fn validate(&self) -> Result<(), String> {
        if self.rewind_seconds > REWIND_SECONDS_MAX {
            return Err(format!(
                "hybrid rewind of {} s is over the limit of {REWIND_SECONDS_MAX} s (30 days)",
                self.rewind_seconds
            ));
        }
        Ok(())
    }

    /// How long the real-time topic keeps records: the rewind window and a day of margin, at
    /// least two rewind windows (a push may take long), at least a week.
    pub fn retention(&self) -> std::time::Duration {
        let rewind = self.rewind_seconds;
        let seconds = (rewind.saturating_mul(2))
            .max(rewind.saturating_add(24 * 3600))
            .max(7 * 24 * 3600);
        std::time::Duration::from_secs(seconds)
    }
}

/// Default largest serialized value (Avro datum before compression) a store accepts.
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 16 * 1024 * 1024;

/// Default ONLINE versions kept per store: the current one and a backup.
pub const DEFAULT_VERSIONS_TO_KEEP: u32 = 2;
/// Most ONLINE versions a store may keep.
pub const VERSIONS_TO_KEEP_MAX: u32 = 16;

fn default_versions_to_keep() -> u32 {
    DEFAULT_VERSIONS_TO_KEEP
}

pub(crate) fn default_max_value_bytes() -> u64 {
    DEFAULT_MAX_VALUE_BYTES
}

/// One registered value schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueSchema {
    pub id: u32,
    pub schema: String,
}

/// A store: schemas, shape, and which versions serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRecord {
    pub name: String,
    pub owner: String,
    pub key_schema: String,
    pub value_schemas: Vec<ValueSchema>,
    pub partition_count: u32,
    pub replication_factor: u32,
    #[serde(default)]
    pub storage: StorageProfile,
    /// Value compression of new versions.
    #[serde(default)]
    pub compression: Compression,
    /// Largest serialized value (Avro datum, before compression) a push may write; larger ones
    /// are refused before a version is allocated. Values over one topic record are chunked.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: u64,
    /// Real-time writes merged into new versions; `None` for a batch-only store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid: Option<HybridConfig>,
    pub created_ms: i64,
    /// The version reads go to; `None` until the first push goes live.
    pub current_version: Option<u32>,
    /// The previous current version, kept for rollback.
    pub backup_version: Option<u32>,
    /// Highest version number ever allocated; numbers are never reused.
    pub largest_version: u32,
    /// Being deleted (`rialto-admin stores delete`): its versions are failed, then its topics
    /// and records removed, this record last. No push or update is accepted meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// Reads per second (keys: a get costs 1, a batch-get its key count) the store may take
    /// across the cluster; each server enforces its share. `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_quota_keys_per_s: Option<u64>,
    /// Largest size of one copy of a version (bytes on disk over the replication factor): a
    /// push announcing more data is refused at its start, and a version found larger once its
    /// replicas are ONLINE fails instead of going live. `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota_bytes: Option<u64>,
    /// ONLINE versions kept (and hosted) at once: the current one, the backup and, beyond two,
    /// the next older ones (which `rialto-admin versions delete` can still remove).
    #[serde(default = "default_versions_to_keep")]
    pub versions_to_keep: u32,
}

impl StoreRecord {
    /// The newest value schema (pushes write with it).
    pub fn latest_value_schema(&self) -> Option<&ValueSchema> {
        self.value_schemas.iter().max_by_key(|s| s.id)
    }
    pub fn value_schema(&self, id: u32) -> Option<&ValueSchema> {
        self.value_schemas.iter().find(|s| s.id == id)
    }
}

/// Where a version is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VersionStatus {
    /// Topic created, replicas assigned, data flowing in.
    Pushing,
    /// The push job wrote END_OF_PUSH to every partition; waiting for replicas.
    PushWritten,
    /// Every replica was ONLINE and the version became (or was) current.
    Online,
    /// The push failed; the version never serves and its resources are being removed.
    Failed { reason: String },
}

/// A store version: its topic, its shape, and where each partition's replicas live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub store: String,
    pub version: u32,
    pub topic: String,
    pub partition_count: u32,
    /// `assignment[p]` lists the node ids hosting partition `p`, in zone order.
    pub assignment: Vec<Vec<String>>,
    pub status: VersionStatus,
    pub created_ms: i64,
    /// The storage profile in force when the version was created.
    #[serde(default)]
    pub storage: StorageProfile,
    /// The value compression of the version (the store's when the version was created).
    #[serde(default)]
    pub compression: Compression,
    /// How values are laid out (checksummed for every version created by this code).
    #[serde(default)]
    pub value_format: ValueFormat,
    /// The store's `max_value_bytes` when the version was created: the client's bound on a
    /// decompressed value.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: u64,
    /// The store's hybrid configuration when the version was created: a hybrid version keeps
    /// ingesting real-time writes after END_OF_PUSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid: Option<HybridConfig>,
    /// Replicas being moved to another node (a lost or draining node replaced, or a share of
    /// replicas given to a new node). The target hosts the partition from the start of the move;
    /// it enters `assignment` only once it reports ONLINE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<ReplicaMove>,
    /// The principal that started the push (with authorization on); only it, or an
    /// administrator of the store, may report the push written or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_by: Option<String>,
    /// Set by the controller once an ONLINE hybrid version is neither the store's current nor
    /// its backup version: its replicas stop following real-time writes and are sealed
    /// read-only. The current and backup versions keep following, so a rollback serves every
    /// real-time write made before it; a sealed version never becomes either again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sealed: bool,
    /// The producer GUID of the version's push (hex, from the push's start): replicas refuse
    /// a record of the push (before END_OF_PUSH) from any other producer, so whoever can write
    /// the version topic cannot slip records into it. `None`: unchecked (an older push job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
    /// Nodes whose replica failed as a move's target, and when: the controller does not
    /// choose them again for that partition for a while (kept here, so a new leader knows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_targets: Vec<FailedTarget>,
}

/// A node whose replica of a partition failed as the target of a move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedTarget {
    pub partition: u32,
    pub node: String,
    /// When the move was cancelled (milliseconds since the Unix epoch, the controller's clock).
    pub failed_ms: i64,
}

impl VersionRecord {
    /// Every (partition, node) pair assigned (move targets not included).
    pub fn replicas(&self) -> impl Iterator<Item = (u32, &str)> {
        self.assignment
            .iter()
            .enumerate()
            .flat_map(|(p, nodes)| nodes.iter().map(move |n| (p as u32, n.as_str())))
    }
    /// Every (partition, node) pair a server hosts: the assignment and the move targets.
    pub fn hosted(&self) -> impl Iterator<Item = (u32, &str)> {
        self.replicas()
            .chain(self.moves.iter().map(|m| (m.partition, m.to.as_str())))
    }
    /// Partitions `node_id` hosts: assigned or a move's target.
    pub fn partitions_of(&self, node_id: &str) -> Vec<u32> {
        let mut partitions: Vec<u32> = self
            .hosted()
            .filter(|(_, n)| *n == node_id)
            .map(|(p, _)| p)
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }
    /// The group (position in the assignment) of `node_id`'s replica of `partition`, counting a
    /// move's target in the group it moves into.
    pub fn group_of(&self, partition: u32, node_id: &str) -> Option<u32> {
        self.assignment
            .get(partition as usize)
            .and_then(|nodes| nodes.iter().position(|n| n == node_id))
            .map(|g| g as u32)
            .or_else(|| {
                self.moves
                    .iter()
                    .find(|m| m.partition == partition && m.to == node_id)
                    .map(|m| m.group)
            })
    }
}

/// Why a replica is being moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    /// Its node has been gone for longer than the rebalance delay.
    NodeLost,
    /// Its node is being drained by an operator.
    Drain,
    /// A node joined (or the group is uneven): the replica goes to a less loaded node.
    Balance,
}

impl MoveReason {
    pub fn name(self) -> &'static str {
        match self {
            MoveReason::NodeLost => "node-lost",
            MoveReason::Drain => "drain",
            MoveReason::Balance => "balance",
        }
    }
}

/// One replica move: `to` bootstraps `partition` and, once ONLINE, takes `from`'s place at
/// `assignment[partition][group]`; `from` then drops its replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMove {
    pub partition: u32,
    pub group: u32,
    pub from: String,
    pub to: String,
    pub reason: MoveReason,
    pub started_ms: i64,
}

/// An operator's request to empty a node (`rialto-admin nodes drain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub node_id: String,
    pub requested_ms: i64,
}

/// What a halted partition leader does with the real-time record it refused (a record that does
/// not decode, or whose producer metadata shows lost, corrupted or foreign records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RealtimeAction {
    /// Drop the record: it is never copied into the version topic.
    Skip,
    /// Copy the record although its producer metadata was refused (a gap before it, a segment
    /// whose checksum did not match): only a record that decodes can be accepted.
    Accept,
}

impl RealtimeAction {
    pub fn name(self) -> &'static str {
        match self {
            RealtimeAction::Skip => "skip",
            RealtimeAction::Accept => "accept",
        }
    }
}

/// An operator's decision about one refused real-time record (`rialto-admin realtime skip` or
/// `accept`). It holds for every version of the store: a later version whose leader replays the
/// same record decides the same way. After it the leader checks producer metadata afresh, as a
/// new leader starting after that record would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeDecision {
    pub partition: u32,
    /// The record's offset in the real-time topic's partition.
    pub offset: i64,
    pub action: RealtimeAction,
    /// Who decided (the caller's principal, or `anonymous` without authentication).
    pub decided_by: String,
    pub decided_ms: i64,
}

/// A real-time writer registered by a caller with `write` on the store: the producer GUID its
/// records carry and the secret it signs them with (`rialto_security::signing`). Servers with
/// authorization on copy only real-time records signed this way.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeWriterRecord {
    /// The producer GUID, 32 hexadecimal digits.
    pub producer: String,
    /// The signing secret, 64 hexadecimal digits.
    pub secret: String,
    pub registered_by: String,
    pub registered_ms: i64,
}

impl RealtimeWriterRecord {
    /// The record without its secret, as the admin API shows it.
    pub fn view(&self) -> crate::admin::RealtimeWriterView {
        crate::admin::RealtimeWriterView {
            producer: self.producer.clone(),
            registered_by: self.registered_by.clone(),
            registered_ms: self.registered_ms,
        }
    }
}

impl std::fmt::Debug for RealtimeWriterRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealtimeWriterRecord")
            .field("producer", &self.producer)
            .field("registered_by", &self.registered_by)
            .field("registered_ms", &self.registered_ms)
            .finish_non_exhaustive()
    }
}

/// A storage server, registered under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    /// `host:port` of the HTTP/2 read endpoint.
    pub address: String,
    pub zone: String,
    /// Whether the read endpoint speaks TLS.
    pub tls: bool,
    pub started_ms: i64,
}

/// Replica life cycle (seed 02).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplicaState {
    Offline,
    Bootstrap,
    Online,
    Error,
    Dropped,
}

impl ReplicaState {
    /// Whether the transition `self -> to` is allowed. A hybrid replica whose partition leader
    /// halts on a refused real-time record goes from ONLINE (or BOOTSTRAP) to ERROR, and back
    /// to BOOTSTRAP once an operator has decided about the record.
    pub fn can_become(self, to: ReplicaState) -> bool {
        use ReplicaState::*;
        matches!(
            (self, to),
            (Offline, Bootstrap)
                | (Bootstrap, Online)
                | (Bootstrap, Offline)
                | (Online, Offline)
                | (Online, Error)
                | (Error, Bootstrap)
                | (Bootstrap, Error)
                | (Offline, Error)
                | (Offline, Dropped)
                | (Error, Dropped)
                | (Online, Dropped)
                | (Bootstrap, Dropped)
        )
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ReplicaState::Offline => "OFFLINE",
            ReplicaState::Bootstrap => "BOOTSTRAP",
            ReplicaState::Online => "ONLINE",
            ReplicaState::Error => "ERROR",
            ReplicaState::Dropped => "DROPPED",
        };
        f.write_str(s)
    }
}

/// A replica's state as reported by its server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub state: ReplicaState,
    /// Next topic offset to consume (everything before it is applied).
    pub offset: i64,
    /// Records applied so far.
    pub records: u64,
    /// Offset this server process started consuming from (its checkpoint at start-up).
    #[serde(default)]
    pub consumed_from: i64,
    pub updated_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of the replica's database on disk (set when it goes ONLINE).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Bytes of the replica resident in memory (set when it goes ONLINE).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Of a hybrid version: real-time records not yet applied (`None` before its buffer replay
    /// starts, and for batch versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Of a hybrid version: whether this replica is its partition's leader (it copies the
    /// real-time topic into the version topic).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leader: bool,
    /// Of a hybrid version: whether the replica still consumes its version topic after going
    /// ONLINE (it follows real-time writes until a newer version supersedes it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub following: bool,
}

/// The system time in milliseconds since the Unix epoch, for stamps nothing compares (a
/// producer's record timestamps, tests). What the controller and servers record and compare
/// comes from `rialto_backends::clock::now_ms`, which follows a simulation's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_leadership_is_a_record_and_a_bare_holder_id_still_reads() {
        use super::{now_ms, LeadershipRecord};
        let stored = LeadershipRecord::new("server-2", now_ms()).encode();
        let text = String::from_utf8(stored.clone()).unwrap();
        assert!(
            text.contains(r#""format":1"#) && text.contains(r#""holder":"server-2""#),
            "{text}"
        );
        assert!(LeadershipRecord::is_held_by(&stored, "server-2"));
        assert!(!LeadershipRecord::is_held_by(&stored, "server-20"));
        // Written before leaderships had a format.
        assert!(LeadershipRecord::is_held_by(b"server-2", "server-2"));
        assert_eq!(LeadershipRecord::decode(b"c1").unwrap().holder, "c1");
        // A newer format is nobody's leadership here.
        let newer = text.replace(r#""format":1"#, r#""format":99"#);
        assert!(LeadershipRecord::decode(newer.as_bytes()).is_err());
        assert!(!LeadershipRecord::is_held_by(newer.as_bytes(), "server-2"));
    }

    #[test]
    fn records_carry_their_format_and_a_newer_one_is_refused() {
        let record = super::DrainRecord {
            node_id: "n1".into(),
            requested_ms: 5,
        };
        let bytes = super::encode_record(&record).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["format"], 1);
        let back: super::DrainRecord = super::decode_record(&bytes).unwrap();
        assert_eq!(back, record);

        let older = serde_json::to_vec(&record).unwrap();
        assert!(
            super::decode_record::<super::DrainRecord>(&older).is_ok(),
            "a record from before formats is format 1"
        );

        let mut newer = json.clone();
        newer["format"] = 2.into();
        let err = super::decode_record::<super::DrainRecord>(&serde_json::to_vec(&newer).unwrap())
            .unwrap_err();
        assert!(
            matches!(err, super::RecordError::NewerFormat { found: 2 }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade this process"), "{err}");
        newer["format"] = "two".into();
        assert!(
            super::decode_record::<super::DrainRecord>(&serde_json::to_vec(&newer).unwrap())
                .is_err(),
            "a format that is not a number is not a format this process knows"
        );
        assert!(super::decode_record::<super::DrainRecord>(b"{not json").is_err());
    }

    use super::*;

    #[test]
    fn keys_sort_numerically_and_parse_back() {
        let l = Layout::new("/rialto/");
        assert!(l.version("s", 9) < l.version("s", 10));
        let k = l.replica("ads", 12, 3, "node-a");
        assert_eq!(k, "/rialto/replicas/ads/0000000012/00003/node-a");
        assert_eq!(l.parse_replica_key(&k), Some(("ads", 12, 3, "node-a")));
        assert_eq!(l.parse_replica_key("/rialto/replicas/ads/x/1/n"), None);
    }

    #[test]
    fn store_names_are_checked() {
        assert!(validate_store_name("ads_v2-x").is_ok());
        assert!(validate_store_name("").is_err());
        assert!(validate_store_name("a/b").is_err());
        assert!(validate_store_name(&"x".repeat(129)).is_err());
    }

    #[test]
    fn replica_transitions_follow_the_state_model() {
        use ReplicaState::*;
        assert!(Offline.can_become(Bootstrap));
        assert!(Bootstrap.can_become(Online));
        assert!(!Offline.can_become(Online));
        assert!(!Error.can_become(Online));
    }

    #[test]
    fn records_are_json_round_trippable() {
        let v = VersionRecord {
            store: "s".into(),
            version: 1,
            topic: version_topic("s", 1),
            partition_count: 2,
            assignment: vec![vec!["a".into(), "b".into()], vec!["b".into(), "c".into()]],
            status: VersionStatus::Failed {
                reason: "replica ERROR".into(),
            },
            created_ms: 1,
            storage: StorageProfile::OnDisk,
            compression: Compression::None,
            value_format: ValueFormat::Checksummed,
            max_value_bytes: 1 << 20,
            hybrid: None,
            moves: vec![ReplicaMove {
                partition: 1,
                group: 0,
                from: "b".into(),
                to: "d".into(),
                reason: MoveReason::NodeLost,
                started_ms: 2,
            }],
            pushed_by: Some("spiffe://example.org/feed-job".into()),
            sealed: true,
            producer: None,
            failed_targets: Vec::new(),
        };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<VersionRecord>(&json).unwrap(), v);
        assert_eq!(v.partitions_of("b"), vec![0, 1]);
        assert_eq!(v.partitions_of("d"), vec![1]);
        assert_eq!(v.group_of(1, "d"), Some(0));
        assert_eq!(v.group_of(1, "c"), Some(1));
        assert_eq!(v.group_of(0, "d"), None);
    }

    #[test]
    fn records_written_before_checksums_read_as_such() {
        let json = r#"{"store":"s","version":1,"topic":"s_v1","partition_count":1,
            "assignment":[["a"]],"status":{"state":"online"},"created_ms":1}"#;
        let v: VersionRecord = serde_json::from_str(json).unwrap();
        assert_eq!(v.value_format, ValueFormat::SchemaIdPrefixed);
        assert_eq!(v.max_value_bytes, DEFAULT_MAX_VALUE_BYTES);
    }
}
