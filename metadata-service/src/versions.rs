//! Starting a version: what `POST /v1/stores/{store}/versions` does for a push job, and what the
//! reconciler does for a streaming-only hybrid store (an empty version that then only receives
//! real-time writes).

use rialto_backends::clock::now_ms;
use rialto_backends::{MetaStore, PubSub};
use rialto_protocol::admin::{SigningSecret, StartPushResponse};
use rialto_protocol::envelope::ControlMessage;
use rialto_protocol::meta::{
    version_topic, Compression, Layout, NodeRecord, RealtimeWriterRecord, StoreRecord, ValueFormat,
    VersionRecord, VersionStatus,
};
use rialto_protocol::producer::{guid_hex, PartitionWriter};
use rialto_security::signing::{generate_secret, secret_hex};

use crate::error::{encode_record, parse_record, ControllerError};
use crate::placement::place;
use crate::store_ops::{store_not_found, update_store, update_version};

/// The registered storage nodes.
pub(crate) async fn live_nodes(
    layout: &Layout,
    meta: &dyn MetaStore,
) -> Result<Vec<NodeRecord>, ControllerError> {
    let (items, _) = meta.list(&layout.nodes_prefix()).await?;
    let mut nodes = Vec::with_capacity(items.len());
    for kv in items {
        match parse_record::<NodeRecord>(&kv.key, &kv.value) {
            Ok(n) => nodes.push(n),
            Err(e) => tracing::warn!(error = %e, "skipping corrupt node record"),
        }
    }
    Ok(nodes)
}

/// A producer registered with a fresh signing secret (a push's, or a real-time writer's), by
/// `registered_by` (`None`: an anonymous caller).
pub(crate) fn signing_registration(
    producer: String,
    registered_by: Option<&str>,
) -> Result<RealtimeWriterRecord, ControllerError> {
    let secret = generate_secret().map_err(|e| ControllerError::Internal(e.to_string()))?;
    Ok(RealtimeWriterRecord {
        producer,
        secret: secret_hex(&secret),
        registered_by: registered_by
            .unwrap_or(rialto_security::principal::ANONYMOUS)
            .to_string(),
        registered_ms: now_ms(),
    })
}

/// What a push asks of [`start_version`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PushStart<'a> {
    /// Free text identifying the push, for operators.
    pub push_id: &'a str,
    /// No data will be pushed (an empty version of a streaming-only store).
    pub empty: bool,
    /// The principal that started it.
    pub pushed_by: Option<&'a str>,
    /// The registered value schema it writes with; `None`: the latest.
    pub value_schema_id: Option<u32>,
    /// The producer GUID (hex) the push writes as; its replicas take the push from it only,
    /// signed with the secret registered for it ([`StartPushResponse::signing_secret`]).
    pub producer: Option<&'a str>,
}

/// Allocates the next version of `store`, places its replicas on the live nodes, creates its
/// topic, registers the push's producer with a fresh signing secret (when it names one) and
/// writes its record (Pushing). A topic that cannot be created leaves the version
/// recorded as failed. An `empty` version (no data will be pushed) has no sample to train a
/// compression dictionary on: it compresses without one.
pub(crate) async fn start_version(
    layout: &Layout,
    meta: &dyn MetaStore,
    pubsub: &dyn PubSub,
    kafka_bootstrap: &str,
    store: &str,
    push: PushStart<'_>,
) -> Result<StartPushResponse, ControllerError> {
    let PushStart {
        push_id,
        empty,
        pushed_by,
        value_schema_id,
        producer,
    } = push;
    let key = layout.store(store);
    let record: StoreRecord = match meta.get(&key).await? {
        Some(kv) => parse_record(&key, &kv.value)?,
        None => return Err(store_not_found(store)),
    };
    let value_schema = match value_schema_id {
        Some(id) => record.value_schema(id).cloned().ok_or_else(|| {
            ControllerError::BadRequest(format!(
                "value schema {id} is not registered for store `{store}`; see \
                 `rialto-admin schemas list {store}`"
            ))
        })?,
        None => record
            .latest_value_schema()
            .cloned()
            .ok_or_else(|| ControllerError::Corrupt {
                key: key.clone(),
                detail: "store has no value schema".into(),
            })?,
    };
    if record.deleting {
        return Err(crate::api::being_deleted(store));
    }
    let mut nodes = live_nodes(layout, meta).await?;
    let (drains, _) = meta.list(&layout.drains_prefix()).await?;
    let drained: Vec<&str> = drains
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(&layout.drains_prefix()))
        .collect();
    nodes.retain(|n| !drained.contains(&n.node_id.as_str()));
    let rf = record.replication_factor;
    if (nodes.len() as u64) < u64::from(rf) {
        return Err(ControllerError::Unavailable(format!(
            "need {rf} live storage nodes for replication factor {rf}, {} registered and not drained; start more rialto-server nodes",
            nodes.len()
        )));
    }
    let assignment = place(&nodes, record.partition_count, rf)?;

    // Allocate the version number: CAS on the store record, so two pushes never share one.
    let updated = update_store(meta, layout, store, |s| {
        s.largest_version = s.largest_version.checked_add(1).ok_or_else(|| {
            ControllerError::Conflict(format!("store `{store}` has used every version number"))
        })?;
        Ok(true)
    })
    .await?
    .ok_or_else(|| ControllerError::Internal("version allocation declined".into()))?;
    let version = updated.largest_version;
    let topic = version_topic(store, version);
    let mut version_record = VersionRecord {
        store: store.to_string(),
        version,
        topic: topic.clone(),
        partition_count: updated.partition_count,
        assignment,
        status: VersionStatus::Pushing,
        created_ms: now_ms(),
        storage: updated.storage,
        compression: match updated.compression {
            Compression::ZstdDictionary if empty => Compression::Zstd,
            c => c,
        },
        value_format: ValueFormat::Checksummed,
        max_value_bytes: updated.max_value_bytes,
        hybrid: updated.hybrid,
        moves: vec![],
        pushed_by: pushed_by.map(str::to_string),
        sealed: false,
        producer: producer.map(str::to_string),
        failed_targets: Vec::new(),
    };
    let key = layout.version(store, version);
    crate::store_ops::clear_deferred_deletion(meta, pubsub, layout, &topic).await?;
    // The topic exists before the record: servers start consuming as soon as they see it.
    if let Err(e) = pubsub.create_topic(&topic, updated.partition_count).await {
        version_record.status = VersionStatus::Failed {
            reason: format!("could not create topic `{topic}`: {e}"),
        };
        if let Err(put) = meta
            .compare_and_put(&key, None, encode_record(&version_record)?, None)
            .await
        {
            tracing::warn!(%store, version, error = %put, "could not record the failed version");
        }
        tracing::warn!(%store, version, error = %e, "push failed: topic creation");
        // Topic creation fails when the broker is down or slow: the push may be retried as-is.
        return Err(ControllerError::Unavailable(format!(
            "could not create topic `{topic}` for version {version} of store `{store}` ({e}); \
             version {version} is marked failed; check the Kafka broker and start the push again"
        )));
    }
    // Registered before the record: a replica reads the registration when it starts ingesting.
    let signing_secret = match producer {
        Some(producer) => {
            let registration = signing_registration(producer.to_string(), pushed_by)?;
            let at = layout.version_copier(store, version, producer);
            meta.put(&at, encode_record(&registration)?, None).await?;
            Some(SigningSecret(registration.secret))
        }
        None => None,
    };
    if !meta
        .compare_and_put(&key, None, encode_record(&version_record)?, None)
        .await?
    {
        return Err(ControllerError::Internal(format!(
            "version record `{key}` already exists although version {version} was just allocated"
        )));
    }
    tracing::info!(%store, version, %topic, %push_id, "push started");
    Ok(StartPushResponse {
        store: store.to_string(),
        version,
        topic,
        partition_count: updated.partition_count,
        kafka_bootstrap: kafka_bootstrap.to_string(),
        key_schema: updated.key_schema.clone(),
        value_schema_id: value_schema.id,
        value_schema: value_schema.schema,
        value_format: version_record.value_format,
        max_value_bytes: version_record.max_value_bytes,
        signing_secret,
    })
}

/// Starts an empty version of a streaming-only hybrid store: every partition gets a push with
/// no records (the version then receives the real-time writes like any hybrid version), and the
/// push is marked written.
pub(crate) async fn start_empty_version(
    layout: &Layout,
    meta: &dyn MetaStore,
    pubsub: &dyn PubSub,
    store: &str,
) -> Result<u32, ControllerError> {
    let producer = *uuid::Uuid::new_v4().as_bytes();
    let started = start_version(
        layout,
        meta,
        pubsub,
        "",
        store,
        PushStart {
            push_id: "empty version of a streaming-only store",
            empty: true,
            producer: Some(&guid_hex(&producer)),
            ..PushStart::default()
        },
    )
    .await?;
    let version = started.version;
    let key = layout.version(store, version);
    let kv = meta
        .get(&key)
        .await?
        .ok_or_else(|| ControllerError::Internal(format!("version record `{key}` vanished")))?;
    let compression = parse_record::<VersionRecord>(&key, &kv.value)?.compression;
    if let Err(e) = write_empty_push(pubsub, &started, compression, producer).await {
        // The version never goes live: an operator pushes (or retries the store) instead.
        update_version(meta, layout, store, version, |v| {
            if v.status == VersionStatus::Pushing {
                v.status = VersionStatus::Failed {
                    reason: format!("could not write the empty push: {e}"),
                };
                return Ok(true);
            }
            Ok(false)
        })
        .await?;
        return Err(e);
    }
    update_version(meta, layout, store, version, |v| {
        if v.status == VersionStatus::Pushing {
            v.status = VersionStatus::PushWritten;
            return Ok(true);
        }
        Ok(false)
    })
    .await?;
    tracing::info!(%store, version, "empty version of a streaming-only store written");
    Ok(version)
}

/// Writes a push without records to every partition of the version's topic, signed with the
/// secret registered for it.
async fn write_empty_push(
    pubsub: &dyn PubSub,
    started: &StartPushResponse,
    compression: Compression,
    producer: [u8; 16],
) -> Result<(), ControllerError> {
    let signer = started
        .signing_secret
        .as_ref()
        .map(|s| rialto_security::signing::WriterSecret::from_hex(&s.0))
        .transpose()
        .map_err(|e| ControllerError::Internal(e.to_string()))?;
    let mut deliveries = Vec::new();
    for partition in 0..started.partition_count {
        let mut w = PartitionWriter::new(producer);
        let envelopes = [
            w.start_segment(),
            w.control(ControlMessage::StartOfPush {
                sorted: true,
                codec: compression.codec(),
                dictionary: Vec::new(),
            }),
            w.control(ControlMessage::EndOfPush),
            w.end_segment(),
        ];
        for e in envelopes {
            let bytes = e.encode();
            let signature = signer.as_ref().map(|s| s.sign(&bytes));
            deliveries.push(
                pubsub
                    .send(
                        &started.topic,
                        partition,
                        signature.as_ref().map_or(&[][..], |s| &s[..]),
                        &bytes,
                    )
                    .await
                    .map_err(|e| ControllerError::Unavailable(e.to_string()))?,
            );
        }
    }
    for d in deliveries {
        d.await
            .map_err(|e| ControllerError::Unavailable(e.to_string()))?;
    }
    Ok(())
}
