//! The admin HTTP/JSON API (see `rialto_protocol::admin` for the routes and types).
//!
//! Every controller serves it, leader or not: each write is a compare-and-put on one etcd key, so
//! concurrent controllers cannot corrupt a record. Every error answers with an [`ApiError`] body.

use rialto_backends::clock::now_ms;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rialto_backends::{MetaStore, PubSub};
use rialto_protocol::acl::{validate_principal, AclRecord, GRANTS_MAX};
use rialto_protocol::admin::{
    AclChangeRequest, ControllersView, NodeDescription, NodeReplica, RealtimeDecisionRequest,
    RealtimeTarget, RealtimeWriterGrant, RealtimeWriterView,
};
use rialto_protocol::admin::{
    AddValueSchemaRequest, AddValueSchemaResponse, CreateStoreRequest, FailPushRequest,
    ReplicaView, StartPushRequest, StartPushResponse, StoreDescription, UpdateStoreRequest,
    VersionDescription,
};
use rialto_protocol::avro::{AvroCodec, Schema};
use rialto_protocol::meta::{
    realtime_topic, validate_store_name, DrainRecord, HybridConfig, Layout, LeadershipRecord,
    NodeRecord, RealtimeDecision, RealtimeWriterRecord, ReplicaRecord, ReplicaState, StoreRecord,
    ValueSchema, VersionRecord, VersionStatus, DEFAULT_MAX_VALUE_BYTES, DEFAULT_VERSIONS_TO_KEEP,
    PARTITION_COUNT_MAX, REPLICATION_FACTOR_MAX, VERSIONS_TO_KEEP_MAX,
};
use rialto_protocol::producer::{guid_hex, parse_guid_hex};
use rialto_protocol::schema_compat::check_full;
use rialto_protocol::stored::VALUE_BYTES_LIMIT;
use serde::de::DeserializeOwned;

use crate::authz::{AuthzConfig, Requirement};
use crate::error::{encode_record, parse_record, ControllerError};
use crate::serve::Caller;
use crate::store_ops::{
    fail_version, store_not_found, update_acl, update_store, update_version, version_not_found,
};
use crate::versions::{live_nodes, start_version, PushStart};
use axum::Extension;
use rialto_protocol::acl::Permission;

/// Largest request body the API accepts.
pub const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest Avro schema text (key or value).
pub const SCHEMA_BYTES_MAX: usize = 512 * 1024;
/// Most value schemas a store registers.
pub const VALUE_SCHEMAS_MAX: usize = 64;
/// Largest total text of a store's value schemas (the store record must fit an etcd request).
pub const VALUE_SCHEMAS_BYTES_MAX: usize = 1024 * 1024;
/// Longest failure reason kept in a version record; longer ones are cut.
pub const FAIL_REASON_BYTES_MAX: usize = 4096;

/// What every handler needs.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub layout: Layout,
    pub meta: Arc<dyn MetaStore>,
    pub pubsub: Arc<dyn PubSub>,
    pub kafka_bootstrap: String,
    /// Whether this controller leads (for `/metrics`).
    pub leader: Arc<std::sync::atomic::AtomicBool>,
    /// Whether and how calls are authorized (see [`crate::authz`]).
    pub authz: Arc<AuthzConfig>,
    /// Calls per caller (see [`crate::throttle`]).
    pub throttle: Arc<crate::throttle::Throttle>,
    /// This controller's id.
    pub controller_id: String,
}

impl IntoResponse for ControllerError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_kind();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self, "admin request failed");
        }
        let mut response = (status, Json(self.to_api_error())).into_response();
        if let ControllerError::Throttled { retry_after, .. } = &self {
            // Whole seconds, rounded up, as the header wants.
            let seconds = retry_after.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = axum::http::HeaderValue::from_str(&seconds.to_string()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
        }
        response
    }
}

type ApiResult<T> = Result<(StatusCode, Json<T>), ControllerError>;

/// The admin API router.
pub(crate) fn router(state: ApiState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/stores", post(create_store).get(list_stores))
        .route(
            "/v1/stores/{store}",
            get(describe_store)
                .patch(update_store_settings)
                .delete(delete_store),
        )
        .route("/v1/stores/{store}/versions", post(start_push))
        .route(
            "/v1/stores/{store}/versions/{version}",
            get(describe_version).delete(delete_version),
        )
        .route(
            "/v1/stores/{store}/versions/{version}/written",
            post(push_written),
        )
        .route(
            "/v1/stores/{store}/versions/{version}/fail",
            post(fail_push),
        )
        .route(
            "/v1/stores/{store}/value-schemas",
            get(list_value_schemas).post(add_value_schema),
        )
        .route("/v1/stores/{store}/realtime", get(realtime_target))
        .route(
            "/v1/stores/{store}/realtime/decisions",
            get(list_realtime_decisions).post(decide_realtime_record),
        )
        .route(
            "/v1/stores/{store}/realtime/writers",
            post(register_realtime_writer).get(list_realtime_writers),
        )
        .route(
            "/v1/stores/{store}/realtime/writers/{producer}",
            axum::routing::delete(revoke_realtime_writer),
        )
        .route("/v1/stores/{store}/rollback", post(rollback))
        .route("/v1/stores/{store}/roll-forward", post(roll_forward))
        .route("/v1/controllers", get(controllers))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(describe_node))
        .route(
            "/v1/nodes/{node}/drain",
            post(drain_node).delete(undrain_node),
        )
        .route("/v1/acls/cluster", get(get_cluster_acl))
        .route("/v1/acls/cluster/{change}", post(change_cluster_acl))
        .route("/v1/acls/stores/{store}", get(get_store_acl))
        .route("/v1/acls/stores/{store}/{change}", post(change_store_acl))
        .fallback(|| async {
            ControllerError::NotFound("no such admin API route; see rialto_protocol::admin".into())
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::authz::check,
        ))
        // Outside authorization: a throttled call costs no ACL lookup.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::throttle::limit,
        ))
        .layer(DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .with_state(state)
}

fn body<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ControllerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ControllerError::BadRequest(format!("invalid {what} body: {e}")))
}

fn parse_version(text: &str) -> Result<u32, ControllerError> {
    text.parse().map_err(|_| {
        ControllerError::BadRequest(format!(
            "version `{text}` is not a number; versions are 1, 2, 3, ..."
        ))
    })
}

fn check_schema(which: &str, schema: &str) -> Result<(), ControllerError> {
    if schema.len() > SCHEMA_BYTES_MAX {
        return Err(ControllerError::BadRequest(format!(
            "{which} schema is {} bytes, more than the limit of {SCHEMA_BYTES_MAX}",
            schema.len()
        )));
    }
    AvroCodec::parse(schema)
        .map_err(|e| ControllerError::BadRequest(format!("{which} schema: {e}")))?;
    Ok(())
}

/// Refuses a number of versions to keep out of `2..=VERSIONS_TO_KEEP_MAX`.
fn check_versions_to_keep(keep: Option<u32>) -> Result<(), ControllerError> {
    match keep {
        Some(n) if !(DEFAULT_VERSIONS_TO_KEEP..=VERSIONS_TO_KEEP_MAX).contains(&n) => {
            Err(ControllerError::BadRequest(format!(
                "versions to keep must be {DEFAULT_VERSIONS_TO_KEEP} (current and backup) to \
                 {VERSIONS_TO_KEEP_MAX}, got {n}"
            )))
        }
        _ => Ok(()),
    }
}

/// Validates a create-store request; the message names the bad field.
pub fn validate_create(req: &CreateStoreRequest) -> Result<(), ControllerError> {
    validate_store_name(&req.name).map_err(ControllerError::BadRequest)?;
    check_versions_to_keep(req.versions_to_keep)?;
    check_schema("key", &req.key_schema)?;
    check_schema("value", &req.value_schema)?;
    if req.partition_count == 0 || req.partition_count > PARTITION_COUNT_MAX {
        return Err(ControllerError::BadRequest(format!(
            "partition count {} is out of range 1..={PARTITION_COUNT_MAX}",
            req.partition_count
        )));
    }
    if req.replication_factor == 0 || req.replication_factor > REPLICATION_FACTOR_MAX {
        return Err(ControllerError::BadRequest(format!(
            "replication factor {} is out of range 1..={REPLICATION_FACTOR_MAX}",
            req.replication_factor
        )));
    }
    if let Some(max) = req.max_value_bytes {
        if max == 0 || max > VALUE_BYTES_LIMIT {
            return Err(ControllerError::BadRequest(format!(
                "max value bytes {max} is out of range 1..={VALUE_BYTES_LIMIT}"
            )));
        }
    }
    Ok(())
}

async fn create_store(State(st): State<Arc<ApiState>>, bytes: Bytes) -> ApiResult<StoreRecord> {
    let req: CreateStoreRequest = body(&bytes, "create-store")?;
    validate_create(&req)?;
    let record = StoreRecord {
        name: req.name.clone(),
        owner: req.owner,
        key_schema: req.key_schema,
        value_schemas: vec![ValueSchema {
            id: 1,
            schema: req.value_schema,
        }],
        partition_count: req.partition_count,
        replication_factor: req.replication_factor,
        storage: req.storage,
        compression: req.compression,
        max_value_bytes: req.max_value_bytes.unwrap_or(DEFAULT_MAX_VALUE_BYTES),
        hybrid: req.hybrid,
        created_ms: now_ms(),
        current_version: None,
        backup_version: None,
        largest_version: 0,
        deleting: false,
        read_quota_keys_per_s: req.read_quota_keys_per_s.filter(|&q| q > 0),
        storage_quota_bytes: req.storage_quota_bytes.filter(|&q| q > 0),
        versions_to_keep: req.versions_to_keep.unwrap_or(DEFAULT_VERSIONS_TO_KEEP),
    };
    let key = st.layout.store(&record.name);
    if st.meta.get(&key).await?.is_some() {
        return Err(ControllerError::Conflict(format!(
            "store `{}` already exists; see `rialto-admin stores describe {}`",
            record.name, record.name
        )));
    }
    if let Some(hybrid) = &record.hybrid {
        create_realtime_topic(&st, &record.name, record.partition_count, hybrid).await?;
    }
    if !st
        .meta
        .compare_and_put(&key, None, encode_record(&record)?, None)
        .await?
    {
        return Err(ControllerError::Conflict(format!(
            "store `{}` already exists; see `rialto-admin stores describe {}`",
            record.name, record.name
        )));
    }
    tracing::info!(store = %record.name, partitions = record.partition_count, rf = record.replication_factor, "store created");
    Ok((StatusCode::CREATED, Json(record)))
}

/// Creates (or checks) the real-time topic of a hybrid store: the store's partition count, and
/// records kept at least the rewind window with a margin.
async fn create_realtime_topic(
    st: &ApiState,
    store: &str,
    partitions: u32,
    hybrid: &HybridConfig,
) -> Result<(), ControllerError> {
    hybrid.validate().map_err(ControllerError::BadRequest)?;
    let topic = realtime_topic(store);
    crate::store_ops::clear_deferred_deletion(&*st.meta, &*st.pubsub, &st.layout, &topic).await?;
    st.pubsub
        .create_retained_topic(&topic, partitions, hybrid.retention())
        .await
        .map_err(|e| {
            let message = format!(
                "cannot set up the real-time topic `{topic}` for a rewind of {} s: {e}",
                hybrid.rewind_seconds
            );
            if e.retryable() {
                ControllerError::Unavailable(message)
            } else {
                ControllerError::BadRequest(message)
            }
        })?;
    tracing::info!(store, %topic, retention_s = hybrid.retention().as_secs(), "real-time topic ready");
    Ok(())
}

/// `PATCH /v1/stores/{store}`: changes what may change; new versions take it.
async fn update_store_settings(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
    bytes: Bytes,
) -> ApiResult<StoreRecord> {
    let req: UpdateStoreRequest = body(&bytes, "update-store")?;
    check_versions_to_keep(req.versions_to_keep)?;
    let record = get_store(&st, &store).await?;
    if record.deleting {
        return Err(being_deleted(&store));
    }
    if let Some(hybrid) = &req.hybrid {
        create_realtime_topic(&st, &store, record.partition_count, hybrid).await?;
    }
    let updated = update_store(&*st.meta, &st.layout, &store, |s| {
        let before = (
            s.hybrid,
            s.read_quota_keys_per_s,
            s.storage_quota_bytes,
            s.versions_to_keep,
        );
        if let Some(keep) = req.versions_to_keep {
            s.versions_to_keep = keep;
        }
        if req.hybrid.is_some() {
            s.hybrid = req.hybrid;
        }
        if let Some(quota) = req.read_quota_keys_per_s {
            s.read_quota_keys_per_s = (quota > 0).then_some(quota);
        }
        if let Some(quota) = req.storage_quota_bytes {
            s.storage_quota_bytes = (quota > 0).then_some(quota);
        }
        let after = (
            s.hybrid,
            s.read_quota_keys_per_s,
            s.storage_quota_bytes,
            s.versions_to_keep,
        );
        Ok(after != before)
    })
    .await?;
    let record = match updated {
        Some(r) => r,
        None => get_store(&st, &store).await?,
    };
    tracing::info!(%store, hybrid = ?record.hybrid, read_quota = ?record.read_quota_keys_per_s, "store updated");
    Ok((StatusCode::OK, Json(record)))
}

async fn list_value_schemas(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<Vec<ValueSchema>> {
    let record = get_store(&st, &store).await?;
    Ok((StatusCode::OK, Json(record.value_schemas)))
}

/// `POST /v1/stores/{store}/value-schemas`: registers a value schema that every registered one
/// reads and that reads every registered one (full compatibility), under the next id. The
/// same schema registered again answers its id.
async fn add_value_schema(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
    bytes: Bytes,
) -> ApiResult<AddValueSchemaResponse> {
    let req: AddValueSchemaRequest = body(&bytes, "add-value-schema")?;
    check_schema("value", &req.schema)?;
    let new = Schema::parse_str(&req.schema)
        .map_err(|e| ControllerError::BadRequest(format!("value schema: {e}")))?;
    let mut answer = None;
    update_store(&*st.meta, &st.layout, &store, |s| {
        if s.deleting {
            return Err(being_deleted(&store));
        }
        let mut total = req.schema.len();
        for registered in &s.value_schemas {
            total += registered.schema.len();
            let old = Schema::parse_str(&registered.schema).map_err(|e| {
                ControllerError::Internal(format!(
                    "registered value schema {} of store `{store}` does not parse: {e}",
                    registered.id
                ))
            })?;
            if old == new {
                answer = Some(AddValueSchemaResponse {
                    id: registered.id,
                    added: false,
                });
                return Ok(false);
            }
            check_full(&new, &old).map_err(|e| {
                ControllerError::BadRequest(format!(
                    "value schema is not compatible with registered schema {}: {e}",
                    registered.id
                ))
            })?;
        }
        if s.value_schemas.len() >= VALUE_SCHEMAS_MAX || total > VALUE_SCHEMAS_BYTES_MAX {
            return Err(ControllerError::BadRequest(format!(
                "store `{store}` would have {} value schemas of {total} bytes; the limits are \
                 {VALUE_SCHEMAS_MAX} schemas and {VALUE_SCHEMAS_BYTES_MAX} bytes",
                s.value_schemas.len() + 1
            )));
        }
        let id = s.value_schemas.iter().map(|v| v.id).max().unwrap_or(0) + 1;
        s.value_schemas.push(ValueSchema {
            id,
            schema: req.schema.clone(),
        });
        answer = Some(AddValueSchemaResponse { id, added: true });
        Ok(true)
    })
    .await?;
    let answer = answer.ok_or_else(|| store_not_found(&store))?;
    let status = if answer.added {
        tracing::info!(%store, id = answer.id, "value schema registered");
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)))
}

async fn list_stores(State(st): State<Arc<ApiState>>) -> ApiResult<Vec<StoreRecord>> {
    let (items, _) = st.meta.list(&st.layout.stores_prefix()).await?;
    let mut stores = Vec::with_capacity(items.len());
    for kv in items {
        match parse_record::<StoreRecord>(&kv.key, &kv.value) {
            Ok(s) => stores.push(s),
            Err(e) => tracing::warn!(error = %e, "skipping corrupt store record"),
        }
    }
    Ok((StatusCode::OK, Json(stores)))
}

async fn get_store(st: &ApiState, store: &str) -> Result<StoreRecord, ControllerError> {
    let key = st.layout.store(store);
    match st.meta.get(&key).await? {
        Some(kv) => parse_record(&key, &kv.value),
        None => Err(store_not_found(store)),
    }
}

/// (version, partition, node) → replica record, for one store.
type ReplicaMap = BTreeMap<(u32, u32, String), ReplicaRecord>;

async fn replica_map(st: &ApiState, prefix: &str) -> Result<ReplicaMap, ControllerError> {
    let (items, _) = st.meta.list(prefix).await?;
    let mut map = ReplicaMap::new();
    for kv in items {
        let Some((_, version, partition, node)) = st.layout.parse_replica_key(&kv.key) else {
            continue;
        };
        match parse_record::<ReplicaRecord>(&kv.key, &kv.value) {
            Ok(r) => {
                map.insert((version, partition, node.to_string()), r);
            }
            Err(e) => tracing::warn!(error = %e, "skipping corrupt replica record"),
        }
    }
    Ok(map)
}

fn describe(
    record: VersionRecord,
    replicas: &ReplicaMap,
    current: Option<u32>,
) -> VersionDescription {
    let replaces = |p: u32, node: &str| {
        record
            .moves
            .iter()
            .find(|m| m.partition == p && m.to == node)
            .map(|m| m.from.clone())
    };
    let views = record
        .hosted()
        .map(|(p, node)| {
            let replaces = replaces(p, node);
            match replicas.get(&(record.version, p, node.to_string())) {
                Some(r) => ReplicaView {
                    partition: p,
                    node_id: node.to_string(),
                    state: r.state,
                    offset: r.offset,
                    records: r.records,
                    error: r.error.clone(),
                    disk_bytes: r.disk_bytes,
                    memory_bytes: r.memory_bytes,
                    lag: r.lag,
                    leader: r.leader,
                    following: r.following,
                    replaces,
                },
                None => ReplicaView {
                    partition: p,
                    node_id: node.to_string(),
                    state: ReplicaState::Offline,
                    offset: 0,
                    records: 0,
                    error: None,
                    disk_bytes: 0,
                    memory_bytes: 0,
                    lag: None,
                    leader: false,
                    following: false,
                    replaces,
                },
            }
        })
        .collect();
    let is_current = current == Some(record.version);
    VersionDescription {
        record,
        replicas: views,
        current: is_current,
    }
}

async fn describe_store(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<StoreDescription> {
    let record = get_store(&st, &store).await?;
    let (items, _) = st
        .meta
        .list(&st.layout.store_versions_prefix(&store))
        .await?;
    let replicas = replica_map(&st, &st.layout.store_replicas_prefix(&store)).await?;
    let mut versions = Vec::with_capacity(items.len());
    for kv in items {
        match parse_record::<VersionRecord>(&kv.key, &kv.value) {
            Ok(v) => versions.push(describe(v, &replicas, record.current_version)),
            Err(e) => tracing::warn!(error = %e, "skipping corrupt version record"),
        }
    }
    Ok((
        StatusCode::OK,
        Json(StoreDescription {
            store: record,
            versions,
            kafka_bootstrap: st.kafka_bootstrap.clone(),
        }),
    ))
}

/// `GET /v1/stores/{store}/realtime`: the store and where its real-time writes go, for a writer
/// (authorized as `write`: the controller's check before the broker's own ACLs).
async fn realtime_target(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<RealtimeTarget> {
    let record = get_store(&st, &store).await?;
    Ok((
        StatusCode::OK,
        Json(RealtimeTarget {
            topic: realtime_topic(&record.name),
            store: record,
            kafka_bootstrap: st.kafka_bootstrap.clone(),
        }),
    ))
}

/// `POST /v1/stores/{store}/realtime/writers` (authorized as `write`): registers a real-time
/// writer, a fresh producer GUID with its own signing secret; servers with authorization on copy
/// only real-time records signed by a registered writer.
async fn register_realtime_writer(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<RealtimeWriterGrant> {
    let record = get_store(&st, &store).await?;
    if record.deleting {
        return Err(being_deleted(&store));
    }
    if record.hybrid.is_none() {
        return Err(ControllerError::Conflict(format!(
            "store `{store}` is not hybrid: it takes no real-time writes"
        )));
    }
    let writer = crate::versions::signing_registration(
        guid_hex(uuid::Uuid::new_v4().as_bytes()),
        caller.0.as_ref().map(|p| p.as_str()),
    )?;
    let key = st.layout.realtime_writer(&store, &writer.producer);
    st.meta.put(&key, encode_record(&writer)?, None).await?;
    tracing::info!(%store, producer = %writer.producer, by = %writer.registered_by, "real-time writer registered");
    Ok((
        StatusCode::CREATED,
        Json(RealtimeWriterGrant {
            producer: writer.producer,
            secret: writer.secret,
        }),
    ))
}

/// `GET /v1/stores/{store}/realtime/writers` (authorized as `admin`): the registered writers,
/// oldest first, without their secrets.
async fn list_realtime_writers(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<Vec<RealtimeWriterView>> {
    get_store(&st, &store).await?;
    let prefix = st.layout.realtime_writers_prefix(&store);
    let mut writers: Vec<RealtimeWriterView> = list_records::<RealtimeWriterRecord>(&st, &prefix)
        .await?
        .iter()
        .map(RealtimeWriterRecord::view)
        .collect();
    writers.sort_by(|a, b| (a.registered_ms, &a.producer).cmp(&(b.registered_ms, &b.producer)));
    Ok((StatusCode::OK, Json(writers)))
}

/// `DELETE /v1/stores/{store}/realtime/writers/{producer}` (authorized as `admin`): revokes a
/// writer's registration; partition leaders refuse its records from within a second on.
async fn revoke_realtime_writer(
    State(st): State<Arc<ApiState>>,
    Path((store, producer)): Path<(String, String)>,
) -> ApiResult<RealtimeWriterView> {
    get_store(&st, &store).await?;
    let producer = parse_guid_hex(&producer)
        .map(|g| guid_hex(&g))
        .ok_or_else(|| {
            ControllerError::BadRequest(format!(
                "producer `{producer}` is not a producer GUID (32 hexadecimal digits)"
            ))
        })?;
    let key = st.layout.realtime_writer(&store, &producer);
    let Some(kv) = st.meta.get(&key).await? else {
        return Err(ControllerError::NotFound(format!(
            "producer {producer} is not a registered writer of store `{store}`; list them with \
             `rialto-admin realtime writers {store}`"
        )));
    };
    let record: RealtimeWriterRecord = parse_record(&key, &kv.value)?;
    st.meta.delete(&key).await?;
    tracing::warn!(%store, %producer, "real-time writer revoked");
    Ok((StatusCode::OK, Json(record.view())))
}

/// `GET /v1/stores/{store}/realtime/decisions`: the operator's decisions about refused
/// real-time records, by partition and offset.
async fn list_realtime_decisions(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<Vec<RealtimeDecision>> {
    get_store(&st, &store).await?;
    let prefix = st.layout.realtime_decisions_prefix(&store);
    Ok((StatusCode::OK, Json(list_records(&st, &prefix).await?)))
}

/// Every record under `prefix`, in key order.
async fn list_records<T: DeserializeOwned>(
    st: &ApiState,
    prefix: &str,
) -> Result<Vec<T>, ControllerError> {
    let (items, _) = st.meta.list(prefix).await?;
    items
        .iter()
        .map(|kv| parse_record(&kv.key, &kv.value))
        .collect()
}

/// `POST /v1/stores/{store}/realtime/decisions`: tells the partition leader halted on a refused
/// real-time record what to do with it (a later decision about the same record replaces it).
async fn decide_realtime_record(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
    Extension(caller): Extension<Caller>,
    raw: Bytes,
) -> ApiResult<RealtimeDecision> {
    let request: RealtimeDecisionRequest = body(&raw, "real-time decision")?;
    let record = get_store(&st, &store).await?;
    if record.deleting {
        return Err(being_deleted(&store));
    }
    if record.hybrid.is_none() {
        return Err(ControllerError::Conflict(format!(
            "store `{store}` is not hybrid: it has no real-time topic"
        )));
    }
    if request.partition >= record.partition_count {
        return Err(ControllerError::BadRequest(format!(
            "store `{store}` has {} partitions; there is no partition {}",
            record.partition_count, request.partition
        )));
    }
    if request.offset < 0 {
        return Err(ControllerError::BadRequest(format!(
            "offset {} is negative",
            request.offset
        )));
    }
    let decision = RealtimeDecision {
        partition: request.partition,
        offset: request.offset,
        action: request.action,
        decided_by: caller
            .0
            .as_ref()
            .map_or(rialto_security::principal::ANONYMOUS, |p| p.as_str())
            .to_string(),
        decided_ms: now_ms(),
    };
    let key = st
        .layout
        .realtime_decision(&store, request.partition, request.offset);
    st.meta.put(&key, encode_record(&decision)?, None).await?;
    tracing::warn!(
        %store,
        partition = decision.partition,
        offset = decision.offset,
        action = decision.action.name(),
        by = %decision.decided_by,
        "real-time record decision recorded"
    );
    Ok((StatusCode::OK, Json(decision)))
}

async fn version_description(
    st: &ApiState,
    store: &str,
    version: u32,
) -> Result<VersionDescription, ControllerError> {
    let current = get_store(st, store).await?.current_version;
    let key = st.layout.version(store, version);
    let Some(kv) = st.meta.get(&key).await? else {
        return Err(version_not_found(store, version));
    };
    let record: VersionRecord = parse_record(&key, &kv.value)?;
    let replicas = replica_map(st, &st.layout.version_replicas_prefix(store, version)).await?;
    Ok(describe(record, &replicas, current))
}

async fn describe_version(
    State(st): State<Arc<ApiState>>,
    Path((store, version)): Path<(String, String)>,
) -> ApiResult<VersionDescription> {
    let version = parse_version(&version)?;
    Ok((
        StatusCode::OK,
        Json(version_description(&st, &store, version).await?),
    ))
}

async fn start_push(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
    Extension(caller): Extension<Caller>,
    bytes: Bytes,
) -> ApiResult<StartPushResponse> {
    // An empty body is the same as `{}`.
    let req: StartPushRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        StartPushRequest::default()
    } else {
        body(&bytes, "start-push")?
    };
    if let Some(bytes) = req.data_bytes {
        let record = get_store(&st, &store).await?;
        if let Some(quota) = record.storage_quota_bytes.filter(|&q| bytes > q) {
            return Err(ControllerError::Conflict(format!(
                "the push holds {bytes} bytes of data, over store `{store}`'s storage quota of \
                 {quota} bytes; raise it with `rialto-admin stores update {store} --storage-quota`"
            )));
        }
    }
    let producer = match &req.producer {
        Some(text) => Some(guid_hex(&parse_guid_hex(text).ok_or_else(|| {
            ControllerError::BadRequest(format!(
                "producer `{text}` is not a producer GUID (32 hexadecimal digits)"
            ))
        })?)),
        // Without a producer there is nothing to sign the push with: servers verifying
        // signatures would refuse every record of it.
        None if st.authz.enabled => {
            return Err(ControllerError::BadRequest(
                "with authorization on, a push names the producer GUID it writes as \
                 (`producer`), and signs its records with the secret the answer carries"
                    .into(),
            ))
        }
        None => None,
    };
    let started = start_version(
        &st.layout,
        &*st.meta,
        &*st.pubsub,
        &st.kafka_bootstrap,
        &store,
        PushStart {
            push_id: &req.push_id,
            empty: false,
            pushed_by: caller.0.as_ref().map(|p| p.as_str()),
            value_schema_id: req.value_schema_id,
            producer: producer.as_deref(),
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(started)))
}

/// With authorization on, a push's outcome (written, failed) may be reported only by the
/// principal that started it or by an administrator of the store.
struct PusherCheck {
    caller: Option<String>,
    admin: bool,
    enabled: bool,
}

impl PusherCheck {
    async fn new(
        st: &ApiState,
        caller: &Caller,
        store: &str,
    ) -> Result<PusherCheck, ControllerError> {
        let caller_name = caller.0.as_ref().map(|p| p.as_str().to_string());
        let admin = if st.authz.enabled {
            let need = Requirement::Store(store.to_string(), Permission::Admin);
            let acls = crate::authz::acls_for(st, &need).await?;
            crate::authz::decide(&acls, caller_name.as_deref(), &need).is_ok()
        } else {
            true
        };
        Ok(PusherCheck {
            caller: caller_name,
            admin,
            enabled: st.authz.enabled,
        })
    }

    fn check(&self, v: &VersionRecord) -> Result<(), ControllerError> {
        match &v.pushed_by {
            Some(pusher) if self.enabled && !self.admin && self.caller.as_ref() != Some(pusher) => {
                Err(ControllerError::Forbidden(format!(
                    "version {} of store `{}` was started by `{pusher}`; only it or an \
                     administrator of the store may report its outcome, not `{}`",
                    v.version,
                    v.store,
                    self.caller
                        .as_deref()
                        .unwrap_or(rialto_security::principal::ANONYMOUS)
                )))
            }
            _ => Ok(()),
        }
    }
}

async fn push_written(
    State(st): State<Arc<ApiState>>,
    Path((store, version)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<VersionDescription> {
    let version = parse_version(&version)?;
    get_store(&st, &store).await?;
    let pusher_or_admin = PusherCheck::new(&st, &caller, &store).await?;
    let changed = update_version(&*st.meta, &st.layout, &store, version, |v| {
        pusher_or_admin.check(v)?;
        match &v.status {
            VersionStatus::Pushing => {
                v.status = VersionStatus::PushWritten;
                Ok(true)
            }
            // Repeated calls (a retrying push job) are fine.
            VersionStatus::PushWritten | VersionStatus::Online => Ok(false),
            VersionStatus::Failed { reason } => Err(ControllerError::Conflict(format!(
                "version {version} of store `{store}` already failed: {reason}"
            ))),
        }
    })
    .await?;
    if changed.is_some() {
        tracing::info!(%store, version, "push written");
    }
    Ok((
        StatusCode::OK,
        Json(version_description(&st, &store, version).await?),
    ))
}

async fn fail_push(
    State(st): State<Arc<ApiState>>,
    Path((store, version)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    bytes: Bytes,
) -> ApiResult<VersionDescription> {
    let version = parse_version(&version)?;
    let req: FailPushRequest = body(&bytes, "fail-push")?;
    let mut reason = if req.reason.trim().is_empty() {
        "push failed (no reason given)".to_string()
    } else {
        req.reason
    };
    if reason.len() > FAIL_REASON_BYTES_MAX {
        let mut cut = FAIL_REASON_BYTES_MAX;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let record = get_store(&st, &store).await?;
    let live = || {
        ControllerError::Conflict(format!(
            "version {version} of store `{store}` is online; a live version cannot be failed"
        ))
    };
    if record.current_version == Some(version) {
        return Err(live());
    }
    let pusher_or_admin = PusherCheck::new(&st, &caller, &store).await?;
    let changed = update_version(&*st.meta, &st.layout, &store, version, |v| {
        pusher_or_admin.check(v)?;
        match &v.status {
            VersionStatus::Pushing | VersionStatus::PushWritten => {
                v.status = VersionStatus::Failed {
                    reason: reason.clone(),
                };
                Ok(true)
            }
            VersionStatus::Online => Err(live()),
            // Already failed: keep the first reason.
            VersionStatus::Failed { .. } => Ok(false),
        }
    })
    .await?;
    if changed.is_some() {
        tracing::warn!(%store, version, %reason, "push reported failed");
    }
    Ok((
        StatusCode::OK,
        Json(version_description(&st, &store, version).await?),
    ))
}

async fn controllers(State(st): State<Arc<ApiState>>) -> ApiResult<ControllersView> {
    let key = st.layout.leader();
    let leader = match st.meta.get(&key).await? {
        Some(kv) => {
            Some(
                LeadershipRecord::decode(&kv.value).map_err(|e| ControllerError::Corrupt {
                    key: key.clone(),
                    detail: e.to_string(),
                })?,
            )
        }
        None => None,
    };
    Ok((
        StatusCode::OK,
        Json(ControllersView {
            leader_since_ms: leader.as_ref().map(|r| r.since_ms).filter(|ms| *ms > 0),
            leader: leader.map(|r| r.holder),
            answered_by: st.controller_id.clone(),
        }),
    ))
}

async fn list_nodes(State(st): State<Arc<ApiState>>) -> ApiResult<Vec<NodeRecord>> {
    Ok((
        StatusCode::OK,
        Json(live_nodes(&st.layout, &*st.meta).await?),
    ))
}

/// The "store is being deleted" refusal.
pub(crate) fn being_deleted(store: &str) -> ControllerError {
    ControllerError::Conflict(format!(
        "store `{store}` is being deleted; wait until `rialto-admin stores list` no longer shows it"
    ))
}

/// `DELETE /v1/stores/{store}`: marks the store for deletion; the leader fails its versions,
/// waits until no server consumes their topics, then deletes topics, records and the store.
async fn delete_store(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<StoreRecord> {
    let updated = update_store(&*st.meta, &st.layout, &store, |s| {
        if s.deleting {
            return Ok(false);
        }
        s.deleting = true;
        Ok(true)
    })
    .await?;
    let record = match updated {
        Some(r) => {
            tracing::warn!(%store, "store marked for deletion");
            r
        }
        None => get_store(&st, &store).await?,
    };
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Which way a rollback goes.
#[derive(Clone, Copy)]
enum Roll {
    /// To the backup, older than the current version.
    Back,
    /// To the backup, newer than the current version (undoing a rollback).
    Forward,
}

async fn rollback(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<StoreRecord> {
    roll(&st, &store, Roll::Back).await
}

async fn roll_forward(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<StoreRecord> {
    roll(&st, &store, Roll::Forward).await
}

/// Swaps the current and backup versions (one compare-and-put: clients see it through their
/// watch), after checking the backup is a whole ONLINE version.
async fn roll(st: &ApiState, store: &str, way: Roll) -> ApiResult<StoreRecord> {
    let record = get_store(st, store).await?;
    if record.deleting {
        return Err(being_deleted(store));
    }
    let (Some(current), Some(backup)) = (record.current_version, record.backup_version) else {
        return Err(ControllerError::Conflict(format!(
            "store `{store}` has no backup version to switch to (current {:?}, backup {:?}); \
             a backup exists once a second push has gone live",
            record.current_version, record.backup_version
        )));
    };
    match way {
        Roll::Back if backup > current => {
            return Err(ControllerError::Conflict(format!(
                "store `{store}` is already rolled back (current {current}, newer backup {backup}); \
                 `rialto-admin stores roll-forward {store}` returns to {backup}"
            )))
        }
        Roll::Forward if backup < current => {
            return Err(ControllerError::Conflict(format!(
                "store `{store}` is not rolled back (current {current} is the newest, backup {backup}); \
                 `rialto-admin stores rollback {store}` switches to {backup}"
            )))
        }
        _ => {}
    }
    let key = st.layout.version(store, backup);
    let target: VersionRecord = match st.meta.get(&key).await? {
        Some(kv) => parse_record(&key, &kv.value)?,
        None => return Err(version_not_found(store, backup)),
    };
    if target.status != VersionStatus::Online {
        return Err(ControllerError::Conflict(format!(
            "backup version {backup} of store `{store}` is not online ({:?}); it cannot serve",
            target.status
        )));
    }
    let updated = update_store(&*st.meta, &st.layout, store, |s| {
        if s.current_version != Some(current) || s.backup_version != Some(backup) {
            return Err(ControllerError::Conflict(format!(
                "store `{store}` changed versions meanwhile (now current {:?}, backup {:?}); retry",
                s.current_version, s.backup_version
            )));
        }
        s.current_version = Some(backup);
        s.backup_version = Some(current);
        Ok(true)
    })
    .await?
    .ok_or_else(|| ControllerError::Internal("rollback did not change the store".into()))?;
    tracing::warn!(%store, from = current, to = backup, "current version switched by an operator");
    Ok((StatusCode::OK, Json(updated)))
}

/// `DELETE /v1/stores/{store}/versions/{version}`: a version that is not current is failed
/// ("deleted by an operator"); servers drop its replicas and the leader deletes its topic and,
/// for a version older than the current one, its record.
async fn delete_version(
    State(st): State<Arc<ApiState>>,
    Path((store, version)): Path<(String, String)>,
) -> ApiResult<VersionDescription> {
    let version = parse_version(&version)?;
    let record = get_store(&st, &store).await?;
    if record.current_version == Some(version) {
        return Err(ControllerError::Conflict(format!(
            "version {version} is the current version of `{store}`; switch away first \
             (`rialto-admin stores rollback {store}` or a newer push)"
        )));
    }
    // Check it exists before touching the store record; the answer is this description with
    // the new status (the leader may retire the version before a second read).
    let mut described = version_description(&st, &store, version).await?;
    update_store(&*st.meta, &st.layout, &store, |s| {
        if s.current_version == Some(version) {
            return Err(ControllerError::Conflict(format!(
                "version {version} of `{store}` became current meanwhile; it was not deleted"
            )));
        }
        if s.backup_version != Some(version) {
            return Ok(false);
        }
        s.backup_version = None;
        Ok(true)
    })
    .await?;
    let changed = fail_version(
        &*st.meta,
        &st.layout,
        &store,
        version,
        "deleted by an operator",
    )
    .await?;
    if let Some(record) = changed {
        tracing::warn!(%store, version, "version deleted by an operator");
        described.record = record;
    }
    described.current = false;
    Ok((StatusCode::OK, Json(described)))
}

/// What `node` hosts, its registration and whether it is drained.
async fn node_description(st: &ApiState, node: &str) -> Result<NodeDescription, ControllerError> {
    let key = st.layout.node(node);
    let record = match st.meta.get(&key).await? {
        Some(kv) => Some(parse_record::<NodeRecord>(&key, &kv.value)?),
        None => None,
    };
    let draining = st.meta.get(&st.layout.drain(node)).await?.is_some();
    let (reports, _) = st.meta.list(&st.layout.replicas_prefix()).await?;
    let mut states = BTreeMap::new();
    for kv in reports {
        let Some((store, version, partition, n)) = st.layout.parse_replica_key(&kv.key) else {
            continue;
        };
        if n != node {
            continue;
        }
        if let Ok(r) = parse_record::<ReplicaRecord>(&kv.key, &kv.value) {
            states.insert((store.to_string(), version, partition), r.state);
        }
    }
    let (versions, _) = st.meta.list(&st.layout.versions_prefix()).await?;
    let mut replicas = Vec::new();
    for kv in versions {
        let Ok(v) = parse_record::<VersionRecord>(&kv.key, &kv.value) else {
            continue;
        };
        for partition in v.partitions_of(node) {
            let m = |f: &dyn Fn(&rialto_protocol::meta::ReplicaMove) -> bool| {
                v.moves
                    .iter()
                    .find(|m| m.partition == partition && f(m))
                    .cloned()
            };
            replicas.push(NodeReplica {
                store: v.store.clone(),
                version: v.version,
                partition,
                group: v.group_of(partition, node),
                state: states
                    .get(&(v.store.clone(), v.version, partition))
                    .copied()
                    .unwrap_or(ReplicaState::Offline),
                replaces: m(&|m| m.to == node).map(|m| m.from),
                moving_to: m(&|m| m.from == node).map(|m| m.to),
            });
        }
    }
    if record.is_none() && !draining && replicas.is_empty() {
        return Err(ControllerError::NotFound(format!(
            "node `{node}` is not registered and hosts no replica; see `rialto-admin nodes list`"
        )));
    }
    Ok(NodeDescription {
        node_id: node.to_string(),
        record,
        draining,
        replicas,
    })
}

async fn describe_node(
    State(st): State<Arc<ApiState>>,
    Path(node): Path<String>,
) -> ApiResult<NodeDescription> {
    Ok((StatusCode::OK, Json(node_description(&st, &node).await?)))
}

/// `POST /v1/nodes/{node}/drain`: the leader moves the node's replicas to other nodes (each new
/// replica ONLINE before the node's is dropped), and new versions are not placed on it.
async fn drain_node(
    State(st): State<Arc<ApiState>>,
    Path(node): Path<String>,
) -> ApiResult<NodeDescription> {
    node_description(&st, &node).await?;
    let record = DrainRecord {
        node_id: node.clone(),
        requested_ms: now_ms(),
    };
    st.meta
        .put(&st.layout.drain(&node), encode_record(&record)?, None)
        .await?;
    tracing::warn!(%node, "node drain requested");
    Ok((StatusCode::OK, Json(node_description(&st, &node).await?)))
}

/// `DELETE /v1/nodes/{node}/drain`: the node takes replicas again (moves already done stay).
async fn undrain_node(
    State(st): State<Arc<ApiState>>,
    Path(node): Path<String>,
) -> ApiResult<NodeDescription> {
    st.meta.delete(&st.layout.drain(&node)).await?;
    tracing::info!(%node, "node drain cancelled");
    Ok((StatusCode::OK, Json(node_description(&st, &node).await?)))
}

async fn read_acl(st: &ApiState, key: &str) -> Result<AclRecord, ControllerError> {
    Ok(match st.meta.get(key).await? {
        Some(kv) => parse_record(key, &kv.value)?,
        None => AclRecord::default(),
    })
}

/// Grants or revokes (`change` is `grant` or `revoke`) with a compare-and-put on the record.
async fn change_acl(
    st: &ApiState,
    key: &str,
    change: &str,
    request: &AclChangeRequest,
) -> Result<AclRecord, ControllerError> {
    let grant = match change {
        "grant" => true,
        "revoke" => false,
        other => {
            return Err(ControllerError::NotFound(format!(
                "no ACL operation `{other}`; use grant or revoke"
            )))
        }
    };
    validate_principal(&request.principal).map_err(ControllerError::BadRequest)?;
    if request.permissions.is_empty() {
        return Err(ControllerError::BadRequest(
            "name at least one permission: read, write or admin".into(),
        ));
    }
    let record = update_acl(st.meta.as_ref(), key, |record| {
        if grant {
            if !record.grants.contains_key(&request.principal) && record.grants.len() >= GRANTS_MAX
            {
                return Err(ControllerError::BadRequest(format!(
                    "the ACL already names {GRANTS_MAX} principals; grant to a shared \
                     principal instead"
                )));
            }
            Ok(record.grant(&request.principal, &request.permissions))
        } else {
            Ok(record.revoke(&request.principal, &request.permissions))
        }
    })
    .await?;
    tracing::info!(%key, principal = %request.principal, permissions = ?request.permissions, grant, "ACL change applied");
    Ok(record)
}

/// `GET /v1/acls/cluster`.
async fn get_cluster_acl(State(st): State<Arc<ApiState>>) -> ApiResult<AclRecord> {
    let record = read_acl(&st, &st.layout.cluster_acl()).await?;
    Ok((StatusCode::OK, Json(record)))
}

/// `POST /v1/acls/cluster/{grant|revoke}`.
async fn change_cluster_acl(
    State(st): State<Arc<ApiState>>,
    Path(change): Path<String>,
    raw: Bytes,
) -> ApiResult<AclRecord> {
    let request: AclChangeRequest = body(&raw, "ACL change")?;
    let record = change_acl(&st, &st.layout.cluster_acl(), &change, &request).await?;
    Ok((StatusCode::OK, Json(record)))
}

/// `GET /v1/acls/stores/{store}`.
async fn get_store_acl(
    State(st): State<Arc<ApiState>>,
    Path(store): Path<String>,
) -> ApiResult<AclRecord> {
    validate_store_name(&store).map_err(ControllerError::BadRequest)?;
    let record = read_acl(&st, &st.layout.store_acl(&store)).await?;
    Ok((StatusCode::OK, Json(record)))
}

/// `POST /v1/acls/stores/{store}/{grant|revoke}`; the store must exist.
async fn change_store_acl(
    State(st): State<Arc<ApiState>>,
    Path((store, change)): Path<(String, String)>,
    raw: Bytes,
) -> ApiResult<AclRecord> {
    let request: AclChangeRequest = body(&raw, "ACL change")?;
    validate_store_name(&store).map_err(ControllerError::BadRequest)?;
    if st.meta.get(&st.layout.store(&store)).await?.is_none() {
        return Err(store_not_found(&store));
    }
    let record = change_acl(&st, &st.layout.store_acl(&store), &change, &request).await?;
    Ok((StatusCode::OK, Json(record)))
}

/// `GET /metrics`: the cluster as this controller reads it from etcd, in Prometheus text.
async fn metrics(State(st): State<Arc<ApiState>>) -> Result<Response, ControllerError> {
    use std::fmt::Write as _;
    let (stores, _) = st.meta.list(&st.layout.stores_prefix()).await?;
    let (versions, _) = st.meta.list(&st.layout.versions_prefix()).await?;
    let (replicas, _) = st.meta.list(&st.layout.replicas_prefix()).await?;
    let (nodes, _) = st.meta.list(&st.layout.nodes_prefix()).await?;
    let (drains, _) = st.meta.list(&st.layout.drains_prefix()).await?;
    let (deferred, _) = st.meta.list(&st.layout.topic_deletions_prefix()).await?;
    let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
    let mut moves: BTreeMap<&str, u64> = BTreeMap::new();
    let mut pushing_ages = Vec::new();
    let now = now_ms();
    for kv in &versions {
        let Ok(v) = parse_record::<VersionRecord>(&kv.key, &kv.value) else {
            continue;
        };
        let status = match v.status {
            VersionStatus::Pushing => "pushing",
            VersionStatus::PushWritten => "push_written",
            VersionStatus::Online => "online",
            VersionStatus::Failed { .. } => "failed",
        };
        if matches!(
            v.status,
            VersionStatus::Pushing | VersionStatus::PushWritten
        ) {
            pushing_ages.push((v.store.clone(), v.version, now.saturating_sub(v.created_ms)));
        }
        *by_status.entry(status).or_default() += 1;
        for m in &v.moves {
            *moves.entry(m.reason.name()).or_default() += 1;
        }
    }
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for kv in &replicas {
        if let Ok(r) = parse_record::<ReplicaRecord>(&kv.key, &kv.value) {
            *by_state.entry(r.state.to_string()).or_default() += 1;
        }
    }
    let mut out = String::with_capacity(2048);
    let leader = st.leader.load(std::sync::atomic::Ordering::SeqCst);
    let _ = writeln!(
        out,
        "# HELP rialto_controller_leader Whether this controller leads (1) or stands by (0)."
    );
    let _ = writeln!(out, "# TYPE rialto_controller_leader gauge");
    let _ = writeln!(out, "rialto_controller_leader {}", u8::from(leader));
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    };
    counter(
        "rialto_controller_forbidden_total",
        "Admin calls refused by authorization.",
        st.authz.refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    counter(
        "rialto_controller_throttled_total",
        "Admin calls refused for their caller's rate.",
        st.throttle
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let _ = writeln!(out, "# TYPE rialto_controller_stores gauge");
    let _ = writeln!(out, "rialto_controller_stores {}", stores.len());
    let _ = writeln!(out, "# TYPE rialto_controller_nodes gauge");
    let _ = writeln!(
        out,
        "rialto_controller_nodes{{state=\"registered\"}} {}",
        nodes.len()
    );
    let _ = writeln!(
        out,
        "rialto_controller_nodes{{state=\"draining\"}} {}",
        drains.len()
    );
    let _ = writeln!(
        out,
        "# HELP rialto_controller_topics_awaiting_deletion Topics of retired versions and \
         deleted stores whose deletion waits until no replica fetches (--topic-deletion when-idle)."
    );
    let _ = writeln!(
        out,
        "# TYPE rialto_controller_topics_awaiting_deletion gauge"
    );
    let _ = writeln!(
        out,
        "rialto_controller_topics_awaiting_deletion {}",
        deferred.len()
    );
    let _ = writeln!(out, "# TYPE rialto_controller_versions gauge");
    for status in ["pushing", "push_written", "online", "failed"] {
        let n = by_status.get(status).copied().unwrap_or(0);
        let _ = writeln!(out, "rialto_controller_versions{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(out, "# TYPE rialto_controller_replicas gauge");
    for state in [
        ReplicaState::Offline,
        ReplicaState::Bootstrap,
        ReplicaState::Online,
        ReplicaState::Error,
        ReplicaState::Dropped,
    ] {
        let n = by_state.get(&state.to_string()).copied().unwrap_or(0);
        let _ = writeln!(out, "rialto_controller_replicas{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP rialto_controller_replica_moves Replica moves in flight, by reason."
    );
    let _ = writeln!(out, "# TYPE rialto_controller_replica_moves gauge");
    for reason in ["node-lost", "drain", "balance"] {
        let n = moves.get(reason).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "rialto_controller_replica_moves{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP rialto_controller_push_age_seconds How long each push in progress has run."
    );
    let _ = writeln!(out, "# TYPE rialto_controller_push_age_seconds gauge");
    for (store, version, age_ms) in pushing_ages {
        let _ = writeln!(
            out,
            "rialto_controller_push_age_seconds{{store=\"{store}\",version=\"{version}\"}} {:.3}",
            age_ms as f64 / 1000.0
        );
    }
    Ok((
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response())
}
