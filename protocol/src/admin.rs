//! The controller's admin API: HTTP/1.1 + JSON, used by `rialto-admin`, `rialto-push` and
//! operators' scripts.
//!
//! | method, path | body | answer |
//! |---|---|---|
//! | `POST /v1/stores` | [`CreateStoreRequest`] | 201 [`StoreRecord`] |
//! | `GET /v1/stores` | – | 200 `[StoreRecord]` |
//! | `GET /v1/stores/{store}` | – | 200 [`StoreDescription`] |
//! | `PATCH /v1/stores/{store}` | [`UpdateStoreRequest`] | 200 [`StoreRecord`] |
//! | `POST /v1/stores/{store}/versions` | [`StartPushRequest`] | 201 [`StartPushResponse`] |
//! | `GET /v1/stores/{store}/versions/{version}` | – | 200 [`VersionDescription`] |
//! | `POST /v1/stores/{store}/versions/{version}/written` | – | 200 [`VersionDescription`] |
//! | `POST /v1/stores/{store}/versions/{version}/fail` | [`FailPushRequest`] | 200 [`VersionDescription`] |
//! | `DELETE /v1/stores/{store}` | – | 202 [`StoreRecord`] (deletion under way) |
//! | `GET /v1/stores/{store}/value-schemas` | – | 200 `[ValueSchema]` |
//! | `POST /v1/stores/{store}/value-schemas` | [`AddValueSchemaRequest`] | 201 (200 if registered already) [`AddValueSchemaResponse`] |
//! | `POST /v1/stores/{store}/rollback` | – | 200 [`StoreRecord`] |
//! | `POST /v1/stores/{store}/roll-forward` | – | 200 [`StoreRecord`] |
//! | `DELETE /v1/stores/{store}/versions/{version}` | – | 200 [`VersionDescription`] |
//! | `GET /v1/stores/{store}/realtime/decisions` | – | 200 `[RealtimeDecision]` |
//! | `POST /v1/stores/{store}/realtime/decisions` | [`RealtimeDecisionRequest`] | 200 [`RealtimeDecision`] |
//! | `POST /v1/stores/{store}/realtime/writers` | – | 201 [`RealtimeWriterGrant`] |
//! | `GET /v1/stores/{store}/realtime/writers` | – | 200 `[RealtimeWriterView]` |
//! | `DELETE /v1/stores/{store}/realtime/writers/{producer}` | – | 200 [`RealtimeWriterView`] |
//! | `GET /v1/nodes` | – | 200 `[NodeRecord]` |
//! | `GET /v1/nodes/{node}` | – | 200 [`NodeDescription`] |
//! | `POST /v1/nodes/{node}/drain` | – | 200 [`NodeDescription`] |
//! | `DELETE /v1/nodes/{node}/drain` | – | 200 [`NodeDescription`] |
//! | `GET /v1/acls/cluster`, `GET /v1/acls/stores/{store}` | – | 200 [`AclRecord`] |
//! | `POST /v1/acls/cluster/grant` (`/revoke`) | [`AclChangeRequest`] | 200 [`AclRecord`] |
//! | `POST /v1/acls/stores/{store}/grant` (`/revoke`) | [`AclChangeRequest`] | 200 [`AclRecord`] |
//! | `GET /metrics` | – | 200 Prometheus text |
//! | `GET /health` | – | 200 `ok` |
//!
//! Every error is a non-2xx status with an [`ApiError`] body.

use serde::{Deserialize, Serialize};

pub use crate::acl::AclRecord;
use crate::acl::Permission;
use crate::meta::{
    Compression, HybridConfig, NodeRecord, ReplicaState, StorageProfile, StoreRecord, ValueFormat,
    VersionRecord,
};
pub use crate::meta::{RealtimeAction, RealtimeDecision};

/// Body of `POST /v1/stores`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateStoreRequest {
    pub name: String,
    #[serde(default)]
    pub owner: String,
    /// Avro schema (JSON text) of keys.
    pub key_schema: String,
    /// Avro schema (JSON text) of values; registered as value schema id 1.
    pub value_schema: String,
    pub partition_count: u32,
    pub replication_factor: u32,
    #[serde(default)]
    pub storage: StorageProfile,
    #[serde(default)]
    pub compression: Compression,
    /// Largest serialized value a push may write (default
    /// [`DEFAULT_MAX_VALUE_BYTES`](crate::meta::DEFAULT_MAX_VALUE_BYTES), at most
    /// [`VALUE_BYTES_LIMIT`](crate::stored::VALUE_BYTES_LIMIT)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_value_bytes: Option<u64>,
    /// Makes the store hybrid: real-time writes merged into every version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid: Option<HybridConfig>,
    /// Read quota in keys per second across the cluster (`None`: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_quota_keys_per_s: Option<u64>,
    /// Storage quota: bytes of one copy of a version (`None`: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota_bytes: Option<u64>,
    /// ONLINE versions kept (default 2: current and backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions_to_keep: Option<u32>,
}

/// Body of `PATCH /v1/stores/{store}`: what to change (absent fields stay as they are).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStoreRequest {
    /// Makes the store hybrid, or changes its hybrid settings; new versions take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid: Option<HybridConfig>,
    /// Sets the read quota in keys per second; `0` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_quota_keys_per_s: Option<u64>,
    /// Sets the storage quota in bytes; `0` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota_bytes: Option<u64>,
    /// Sets how many ONLINE versions are kept (2 to 16); older ones are retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions_to_keep: Option<u32>,
}

/// Body of `POST /v1/stores/{store}/value-schemas`: a new value schema, registered only if it
/// is fully compatible with every registered one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddValueSchemaRequest {
    pub schema: String,
}

/// Answer of `POST /v1/stores/{store}/value-schemas`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddValueSchemaResponse {
    /// The schema's id: new, or the id it already had.
    pub id: u32,
    /// Whether this call registered it (`false`: the same schema was registered already).
    pub added: bool,
}

/// Body of `POST /v1/stores/{store}/versions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartPushRequest {
    /// Free text identifying the push (job id, input path) for operators.
    #[serde(default)]
    pub push_id: String,
    /// Serialized bytes of the data to push (keys and values, before compression), checked
    /// against the store's storage quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// The registered value schema the push writes with (`None`: the latest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_schema_id: Option<u32>,
    /// The GUID the push writes the version topic as (32 hexadecimal digits,
    /// [`crate::producer::guid_hex`]): the version's replicas take the push's records from this
    /// producer only. `None` (an older push job): any producer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
}

/// What a push job needs to write a new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartPushResponse {
    pub store: String,
    pub version: u32,
    pub topic: String,
    pub partition_count: u32,
    /// Kafka bootstrap servers the push job produces to.
    pub kafka_bootstrap: String,
    pub key_schema: String,
    pub value_schema_id: u32,
    pub value_schema: String,
    /// How the push job lays out values (an older controller answers without it: no checksums).
    #[serde(default)]
    pub value_format: ValueFormat,
    /// The largest serialized value the version accepts.
    #[serde(default = "crate::meta::default_max_value_bytes")]
    pub max_value_bytes: u64,
    /// The secret the push signs each of its records with (`rialto_security::signing`), given
    /// when the request named its producer: the controller registered it for the version, and
    /// servers with authorization on ingest only records it signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<SigningSecret>,
}

/// A signing secret, 64 hexadecimal digits, never shown by `Debug`: keep it to its producer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SigningSecret(pub String);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

/// Body of `POST .../fail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailPushRequest {
    pub reason: String,
}

/// One replica of a version, as reported by its server (state `Offline` when not reported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub partition: u32,
    pub node_id: String,
    pub state: ReplicaState,
    pub offset: i64,
    pub records: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of the replica on disk (reported when it went ONLINE).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Bytes of the replica resident in memory (reported when it went ONLINE).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Of a hybrid version: real-time records not yet applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Of a hybrid version: whether this replica leads its partition.
    #[serde(default)]
    pub leader: bool,
    /// Of a hybrid version: whether this replica still follows real-time writes.
    #[serde(default)]
    pub following: bool,
    /// Of a move's target: the node whose replica it replaces once ONLINE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// One replica a node hosts (or is receiving through a move).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReplica {
    pub store: String,
    pub version: u32,
    pub partition: u32,
    /// Its group (position in the version's assignment).
    pub group: Option<u32>,
    pub state: ReplicaState,
    /// Of a move's target: the node it replaces once ONLINE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// Of a replica being moved away: the node receiving it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
}

/// `GET /v1/controllers`: which controller leads, as the answering one reads it from etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllersView {
    /// The leading controller's id; `None` while none holds the leadership (an election is
    /// under way, or every controller is down but this one, which is campaigning).
    pub leader: Option<String>,
    /// When the leader took the leadership, milliseconds since the Unix epoch (`None` when
    /// unknown: no leader, or one that wrote no time).
    pub leader_since_ms: Option<i64>,
    /// The controller that answered.
    pub answered_by: String,
}

/// A node: its registration (absent when it is down), whether it is drained, and what it hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDescription {
    pub node_id: String,
    /// `None` when the node is not registered (down, or its lease expired).
    pub record: Option<NodeRecord>,
    pub draining: bool,
    pub replicas: Vec<NodeReplica>,
}

/// A version with its replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDescription {
    pub record: VersionRecord,
    pub replicas: Vec<ReplicaView>,
    /// Whether this version is the store's current version.
    pub current: bool,
}

/// A store with its versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreDescription {
    pub store: StoreRecord,
    pub versions: Vec<VersionDescription>,
    /// Kafka bootstrap servers writers produce to (the real-time topic of a hybrid store).
    #[serde(default)]
    pub kafka_bootstrap: String,
}

/// Answer of `GET /v1/stores/{store}/realtime`: what a real-time writer needs, given only to a
/// caller with `write` on the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeTarget {
    pub store: StoreRecord,
    /// The store's real-time topic.
    pub topic: String,
    /// Kafka bootstrap servers to produce to.
    pub kafka_bootstrap: String,
}

/// Body of `POST /v1/stores/{store}/realtime/decisions`: what the partition leader does with the
/// real-time record it refused at `offset` of `partition` (the replica's error names both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeDecisionRequest {
    pub partition: u32,
    pub offset: i64,
    pub action: RealtimeAction,
}

/// Answer of `POST /v1/stores/{store}/realtime/writers` (needs `write`): a new real-time
/// writer's identity, registered with the store. The writer produces as `producer` and signs
/// each record with `secret` (`rialto_security::signing`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeWriterGrant {
    /// The producer GUID, 32 hexadecimal digits.
    pub producer: String,
    /// The signing secret, 64 hexadecimal digits: keep it to the writer.
    pub secret: String,
}

impl std::fmt::Debug for RealtimeWriterGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealtimeWriterGrant")
            .field("producer", &self.producer)
            .finish_non_exhaustive()
    }
}

/// A registered real-time writer as the admin API shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeWriterView {
    /// The producer GUID, 32 hexadecimal digits.
    pub producer: String,
    pub registered_by: String,
    pub registered_ms: i64,
}

/// Body of the ACL grant and revoke calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclChangeRequest {
    /// The principal, as its certificate names it (or `*` for every authenticated caller).
    pub principal: String,
    pub permissions: Vec<Permission>,
}

/// Error body of every failed admin call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable machine-readable kind: `bad_request`, `forbidden`, `not_found`, `conflict`,
    /// `unavailable`, `internal`.
    pub kind: String,
    /// What happened and what to do, for a person.
    pub message: String,
}

/// Convenience re-export for API users.
pub type NodeList = Vec<NodeRecord>;
