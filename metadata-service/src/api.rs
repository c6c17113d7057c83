//! The admin HTTP/JSON API (see `rialto_protocol::admin` for the routes and types).
//!
//! Every controller serves it, leader or not: each write is a compare-and-put on one etcd key, so
//! concurrent controllers cannot corrupt a record. Every error answers with an [`ApiError`] body.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rialto_backends::{MetaStore, PubSub};
use rialto_protocol::admin::{
    CreateStoreRequest, FailPushRequest, ReplicaView, StartPushRequest, StartPushResponse,
    StoreDescription, UpdateStoreRequest, VersionDescription,
};
use rialto_protocol::avro::AvroCodec;
use rialto_protocol::meta::{
    now_ms, realtime_topic, validate_store_name, HybridConfig, Layout, NodeRecord, ReplicaRecord,
    ReplicaState, StoreRecord, ValueSchema, VersionRecord, VersionStatus, DEFAULT_MAX_VALUE_BYTES,
    PARTITION_COUNT_MAX, REPLICATION_FACTOR_MAX,
};
use rialto_protocol::stored::VALUE_BYTES_LIMIT;
use serde::de::DeserializeOwned;

use crate::error::{encode_record, parse_record, ControllerError};
use crate::store_ops::{store_not_found, update_store, update_version, version_not_found};
use crate::versions::{live_nodes, start_version};

/// Largest request body the API accepts.
pub const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest Avro schema text (key or value).
pub const SCHEMA_BYTES_MAX: usize = 512 * 1024;
/// Longest failure reason kept in a version record; longer ones are cut.
pub const FAIL_REASON_BYTES_MAX: usize = 4096;

/// What every handler needs.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub layout: Layout,
    pub meta: Arc<dyn MetaStore>,
    pub pubsub: Arc<dyn PubSub>,
    pub kafka_bootstrap: String,
}

impl IntoResponse for ControllerError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_kind();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self, "admin request failed");
        }
        (status, Json(self.to_api_error())).into_response()
    }
}

type ApiResult<T> = Result<(StatusCode, Json<T>), ControllerError>;

/// The admin API router.
pub(crate) fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/stores", post(create_store).get(list_stores))
        .route(
            "/v1/stores/{store}",
            get(describe_store).patch(update_store_settings),
        )
        .route("/v1/stores/{store}/versions", post(start_push))
        .route(
            "/v1/stores/{store}/versions/{version}",
            get(describe_version),
        )
        .route(
            "/v1/stores/{store}/versions/{version}/written",
            post(push_written),
        )
        .route(
            "/v1/stores/{store}/versions/{version}/fail",
            post(fail_push),
        )
        .route("/v1/nodes", get(list_nodes))
        .fallback(|| async {
            ControllerError::NotFound("no such admin API route; see rialto_protocol::admin".into())
        })
        .layer(DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .with_state(Arc::new(state))
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

/// Validates a create-store request; the message names the bad field.
pub fn validate_create(req: &CreateStoreRequest) -> Result<(), ControllerError> {
    validate_store_name(&req.name).map_err(ControllerError::BadRequest)?;
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
    let record = get_store(&st, &store).await?;
    if let Some(hybrid) = &req.hybrid {
        create_realtime_topic(&st, &store, record.partition_count, hybrid).await?;
    }
    let updated = update_store(&*st.meta, &st.layout, &store, |s| {
        let before = s.hybrid;
        if req.hybrid.is_some() {
            s.hybrid = req.hybrid;
        }
        Ok(s.hybrid != before)
    })
    .await?;
    let record = match updated {
        Some(r) => r,
        None => get_store(&st, &store).await?,
    };
    tracing::info!(%store, hybrid = ?record.hybrid, "store updated");
    Ok((StatusCode::OK, Json(record)))
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
    let views = record
        .replicas()
        .map(
            |(p, node)| match replicas.get(&(record.version, p, node.to_string())) {
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
                },
            },
        )
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
    bytes: Bytes,
) -> ApiResult<StartPushResponse> {
    // An empty body is the same as `{}`.
    let req: StartPushRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        StartPushRequest::default()
    } else {
        body(&bytes, "start-push")?
    };
    let started = start_version(
        &st.layout,
        &*st.meta,
        &*st.pubsub,
        &st.kafka_bootstrap,
        &store,
        &req.push_id,
        false,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(started)))
}

async fn push_written(
    State(st): State<Arc<ApiState>>,
    Path((store, version)): Path<(String, String)>,
) -> ApiResult<VersionDescription> {
    let version = parse_version(&version)?;
    get_store(&st, &store).await?;
    let changed = update_version(&*st.meta, &st.layout, &store, version, |v| {
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
    let changed = update_version(&*st.meta, &st.layout, &store, version, |v| {
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

async fn list_nodes(State(st): State<Arc<ApiState>>) -> ApiResult<Vec<NodeRecord>> {
    Ok((
        StatusCode::OK,
        Json(live_nodes(&st.layout, &*st.meta).await?),
    ))
}
