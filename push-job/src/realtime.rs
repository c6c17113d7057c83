//! The real-time writer of hybrid stores: puts and deletes produced to the store's real-time
//! topic `<store>_rt`, which each partition's leader copies into the store's versions.
//!
//! # Records on the real-time topic
//!
//! The real-time topic has the store's partition count, and a key goes to the partition the
//! store's partitioner gives it (`xxh3_64(key datum) % partitions`,
//! [`partition_for_key`]), so a key's real-time writes and its batch data share a partition.
//! Every record is an [`Envelope`] (the Kafka record key is empty; the key travels inside):
//!
//! ```text
//! PUT     key = key datum (Avro binary, the store's key schema, encoded by Rialto's encoder)
//!         schema_id = the store's latest value schema id
//!         value = value_checksum(schema_id, datum) u64 BE ‖ datum      (never compressed)
//! DELETE  key = key datum
//! ```
//!
//! Values are always laid out as [`ValueFormat::Checksummed`](rialto_protocol::meta::ValueFormat)
//! and uncompressed, whatever the store's compression: the leader re-encodes them for each
//! version it writes. A value whose body does not fit one record ([`CHUNK_BODY_BYTES`]) is
//! written as chunks under keys of a random generation, then its manifest under the key
//! (`rialto_protocol::stored`, "Chunked real-time values"): every piece is a record of its own,
//! copied by the leader like any other, and the value is readable once its manifest is
//! applied.
//!
//! Producer metadata: one producer GUID per writer (random UUID v4). On each partition, the
//! writer opens a segment (START_OF_SEGMENT, sequence 0) before its first record, numbers its
//! records 1, 2, … and ends the segment (END_OF_SEGMENT with the CRC32C and count of its data
//! records) after [`SEGMENT_RECORDS_MAX`] data records; the next write opens the next segment.
//! [`RealtimeWriter::close`] ends every open segment. There is no START_OF_PUSH or END_OF_PUSH
//! on a real-time topic: it has no beginning or end.
//!
//! # Guarantees
//!
//! * A write is validated (key and value against the store's schemas, sizes against its
//!   limits) before anything is sent; a refused write leaves the writer usable.
//! * Writes are sent asynchronously (bounded in records and bytes in flight); a write is
//!   durable once [`flush`](RealtimeWriter::flush) or [`close`](RealtimeWriter::close)
//!   returns `Ok`.
//! * Writes of one writer to one key are applied in the order they were made (one partition,
//!   an idempotent producer). Writes of different writers to one key are applied in the order
//!   the broker appended them.
//! * After a broker failure (or a write future dropped before it completed) the writer's
//!   sequence may have a gap: it takes no more writes. Open a new one (a new producer) and
//!   write again what was not flushed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rialto_backends::{PubSub, PubSubError};
use rialto_controller::AdminClient;
use rialto_protocol::admin::RealtimeWriterGrant;
use rialto_protocol::avro::{AvroCodec, AvroError, Value};
use rialto_protocol::envelope::{Envelope, KEY_BYTES_MAX};
use rialto_protocol::json::Json;
use rialto_protocol::meta::{realtime_topic, StoreRecord};
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::producer::{parse_guid_hex, PartitionWriter};
use rialto_protocol::stored::{
    split_value_replacing, value_checksum, CHECKSUM_BYTES, GENERATION_CHUNK_KEY_SUFFIX_BYTES,
};
use rialto_security::signing::WriterSecret;

use crate::{InFlight, PushError};

/// Data records in one segment; the segment is ended after this many and a new one opened.
pub const SEGMENT_RECORDS_MAX: u32 = 10_000;

/// Largest key datum: room left for the suffix of a chunk key of a generation.
const KEY_DATUM_BYTES_MAX: usize = KEY_BYTES_MAX - GENERATION_CHUNK_KEY_SUFFIX_BYTES;

/// Why a real-time write (or the writer) failed.
#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    #[error("store `{store}` is not hybrid, so it takes no real-time writes; make it hybrid with `rialto-admin stores update {store} --hybrid-rewind-seconds S --hybrid-lag-records-max N` (S: seconds of real-time writes a new version replays, N: real-time records a replica may lag and still serve)")]
    NotHybrid { store: String },
    #[error("real-time topic `{topic}` is unusable: {detail}")]
    Topic { topic: String, detail: String },
    #[error(
        "the controller names no Kafka bootstrap servers for `{store}`; pass them with --kafka"
    )]
    NoBootstrap { store: String },
    #[error("{write} refused, nothing was sent: {source}")]
    Refused {
        /// `put`, `put of key …`, `delete`.
        write: String,
        #[source]
        source: AvroError,
    },
    #[error("{write} refused, nothing was sent: the key is {bytes} bytes serialized, over the limit of {max} bytes")]
    KeyTooLarge {
        write: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("put of key {key} refused, nothing was sent: the value is {bytes} bytes serialized, over {limit} of {max} bytes")]
    ValueTooLarge {
        key: String,
        bytes: u64,
        max: u64,
        /// Which limit: the store's or the real-time record's.
        limit: &'static str,
    },
    #[error("writing real-time topic `{topic}` failed: {source}")]
    Broker {
        topic: String,
        #[source]
        source: PubSubError,
    },
    #[error("this writer of real-time topic `{topic}` takes no more writes: {detail}; writes not flushed before may be lost: open a new writer and write them again")]
    Unusable { topic: String, detail: String },
}

impl RealtimeError {
    /// Whether only this one write was refused (bad key or value): the writer stays usable.
    pub fn is_refused_write(&self) -> bool {
        matches!(
            self,
            RealtimeError::Refused { .. }
                | RealtimeError::KeyTooLarge { .. }
                | RealtimeError::ValueTooLarge { .. }
        )
    }
}

/// Where to write: the store, its controller, and optionally the broker.
#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    pub controller_url: String,
    pub store: String,
    /// Overrides the Kafka bootstrap servers the controller names.
    pub kafka_bootstrap: Option<String>,
    /// librdkafka properties for the broker's security settings (see `KafkaConfig::options`).
    pub kafka_options: Vec<(String, String)>,
    /// TLS to an https:// controller (its CA, and this writer's certificate).
    pub controller_tls: Option<rialto_controller::ClientTlsFiles>,
    /// The registered value schema values are written with (`None`: the latest).
    pub value_schema_id: Option<u32>,
}

/// What a writer wrote (handed to the broker; all acknowledged once `close` returned it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealtimeReport {
    pub puts: u64,
    pub deletes: u64,
    /// Partitions written to.
    pub partitions: u32,
    /// Since the writer was created.
    pub elapsed: Duration,
}

/// One line of a `rialto-push stream` input: a put or a delete.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamRecord {
    Put { key: Value, value: Value },
    Delete { key: Value },
}

/// Whether the writer can take writes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Ready,
    /// A write is being sent; still set at the next call if that write's future was dropped.
    Sending,
    /// A broker failure or a cancelled write: the producer's sequence may have a gap.
    Failed(String),
}

/// Writes puts and deletes to a hybrid store's real-time topic (see the [module docs](self)).
pub struct RealtimeWriter {
    store: String,
    topic: String,
    pubsub: Arc<dyn PubSub>,
    key_codec: AvroCodec,
    value_codec: AvroCodec,
    value_schema_id: u32,
    partition_count: u32,
    max_value_bytes: u64,
    producer_guid: [u8; 16],
    /// The secret of the writer's registration, signing every record it sends.
    signer: Option<WriterSecret>,
    /// One producer stream per partition, created by the partition's first write.
    partitions: Vec<Option<PartitionWriter>>,
    in_flight: InFlight,
    puts: u64,
    deletes: u64,
    started: Instant,
    state: State,
    closed: bool,
}

impl std::fmt::Debug for RealtimeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealtimeWriter")
            .field("topic", &self.topic)
            .field("puts", &self.puts)
            .field("deletes", &self.deletes)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl RealtimeWriter {
    /// Fetches the store from the controller (which, with authorization on, checks the caller
    /// may `write` it), registers as one of its writers (the records are signed with the
    /// registration's secret, so servers with authorization on copy them) and connects to its
    /// broker (the controller's bootstrap servers, or `config.kafka_bootstrap`). Refuses a store
    /// that is not hybrid.
    pub async fn connect(config: &RealtimeConfig) -> Result<RealtimeWriter, PushError> {
        let admin = AdminClient::connect(&config.controller_url, config.controller_tls.as_ref())?;
        let description = admin.realtime_target(&config.store).await?;
        let store = description.store;
        ensure_hybrid(&store)?;
        let grant = admin.register_realtime_writer(&store.name).await?;
        let bootstrap = config
            .kafka_bootstrap
            .clone()
            .filter(|b| !b.trim().is_empty())
            .or_else(|| Some(description.kafka_bootstrap).filter(|b| !b.trim().is_empty()))
            .ok_or_else(|| RealtimeError::NoBootstrap {
                store: store.name.clone(),
            })?;
        let pubsub =
            crate::connect_broker(bootstrap, config.kafka_options.clone()).map_err(|source| {
                RealtimeError::Broker {
                    topic: realtime_topic(&store.name),
                    source,
                }
            })?;
        let mut writer =
            RealtimeWriter::with_schema(&store, pubsub, config.value_schema_id).await?;
        writer.sign_as(&grant)?;
        Ok(writer)
    }

    /// Produces as the registered writer `grant` names and signs every record with its secret
    /// (done by [`connect`](Self::connect)); only before the first write.
    pub fn sign_as(&mut self, grant: &RealtimeWriterGrant) -> Result<(), PushError> {
        let unusable = |detail: String| RealtimeError::Unusable {
            topic: self.topic.clone(),
            detail,
        };
        if self.partitions.iter().any(Option::is_some) {
            return Err(unusable(
                "it has written already: a writer signs from its first record".into(),
            )
            .into());
        }
        let guid = parse_guid_hex(&grant.producer).ok_or_else(|| {
            unusable(format!(
                "the controller's registration names producer `{}`, not a GUID",
                grant.producer
            ))
        })?;
        let secret = WriterSecret::from_hex(&grant.secret)
            .map_err(|e| unusable(format!("the controller's registration: {e}")))?;
        self.producer_guid = guid;
        self.signer = Some(secret);
        tracing::info!(store = %self.store, producer = %grant.producer, "real-time writer registered; its records are signed");
        Ok(())
    }

    /// A writer of `store` producing through `pubsub`. Refuses a store that is not hybrid and
    /// checks that its real-time topic exists with the store's partition count.
    pub async fn new(
        store: &StoreRecord,
        pubsub: Arc<dyn PubSub>,
    ) -> Result<RealtimeWriter, PushError> {
        RealtimeWriter::with_schema(store, pubsub, None).await
    }

    /// Like [`new`](Self::new), writing values with the registered value schema
    /// `value_schema_id` (`None`: the latest): an application built for an older schema keeps
    /// writing with it after a newer one is registered.
    pub async fn with_schema(
        store: &StoreRecord,
        pubsub: Arc<dyn PubSub>,
        value_schema_id: Option<u32>,
    ) -> Result<RealtimeWriter, PushError> {
        ensure_hybrid(store)?;
        let topic = realtime_topic(&store.name);
        let value_schema = match value_schema_id {
            Some(id) => store
                .value_schema(id)
                .ok_or_else(|| PushError::UnknownValueSchema {
                    store: store.name.clone(),
                    id,
                })?,
            None => store
                .latest_value_schema()
                .ok_or_else(|| PushError::NoValueSchema {
                    store: store.name.clone(),
                })?,
        };
        let key_codec = AvroCodec::parse(&store.key_schema)?;
        let value_codec = AvroCodec::parse(&value_schema.schema)?;
        check_topic(pubsub.as_ref(), &topic, store.partition_count).await?;
        let producer_guid = *uuid::Uuid::new_v4().as_bytes();
        tracing::info!(
            store = %store.name,
            %topic,
            partitions = store.partition_count,
            value_schema_id = value_schema.id,
            producer = %uuid::Uuid::from_bytes(producer_guid),
            "real-time writer ready"
        );
        Ok(RealtimeWriter {
            store: store.name.clone(),
            topic,
            pubsub,
            key_codec,
            value_codec,
            value_schema_id: value_schema.id,
            partition_count: store.partition_count,
            max_value_bytes: store.max_value_bytes,
            producer_guid,
            signer: None,
            partitions: (0..store.partition_count).map(|_| None).collect(),
            in_flight: InFlight::default(),
            puts: 0,
            deletes: 0,
            started: Instant::now(),
            state: State::Ready,
            closed: false,
        })
    }

    /// The store written to.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// The real-time topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The largest value the store takes (serialized), as its record says.
    pub fn max_value_bytes(&self) -> u64 {
        self.max_value_bytes
    }

    /// The store's key schema.
    pub fn key_codec(&self) -> &AvroCodec {
        &self.key_codec
    }

    /// The store's latest value schema, the one values are written with.
    pub fn value_codec(&self) -> &AvroCodec {
        &self.value_codec
    }

    /// What was written so far (sent, not necessarily acknowledged).
    pub fn report(&self) -> RealtimeReport {
        RealtimeReport {
            puts: self.puts,
            deletes: self.deletes,
            partitions: self.partitions.iter().filter(|p| p.is_some()).count() as u32,
            elapsed: self.started.elapsed(),
        }
    }

    /// Writes `value` under `key`. Both are encoded with (and resolved to) the store's key
    /// schema and latest value schema; a mismatch is refused before anything is sent.
    pub async fn put(&mut self, key: &Value, value: &Value) -> Result<(), PushError> {
        self.usable()?;
        let key = self
            .key_codec
            .encode(key, "key")
            .map_err(|source| refused("put".into(), source))?;
        check_key_size(&key, "put")?;
        let datum = self
            .value_codec
            .encode(value, "value")
            .map_err(|source| refused(format!("put of key {}", self.show_key(&key)), source))?;
        self.send_put(key, datum).await
    }

    /// Deletes `key` (encoded with the store's key schema).
    pub async fn delete(&mut self, key: &Value) -> Result<(), PushError> {
        self.usable()?;
        let key = self
            .key_codec
            .encode(key, "key")
            .map_err(|source| refused("delete".into(), source))?;
        check_key_size(&key, "delete")?;
        self.send_delete(key).await
    }

    /// Writes an already serialized value datum (the store's latest value schema) under an
    /// already serialized key datum. Both are decoded to check them; the value is written as
    /// given, the key as Rialto's encoder writes it (so that lookups find it).
    pub async fn put_encoded(&mut self, key: &[u8], value: &[u8]) -> Result<(), PushError> {
        self.usable()?;
        let key = self.canonical_key(key, "put")?;
        check_key_size(&key, "put")?;
        self.value_codec
            .decode(value, "value")
            .map_err(|source| refused(format!("put of key {}", self.show_key(&key)), source))?;
        self.send_put(key, value.to_vec()).await
    }

    /// Deletes an already serialized key datum (decoded to check it, written as Rialto's
    /// encoder writes it).
    pub async fn delete_encoded(&mut self, key: &[u8]) -> Result<(), PushError> {
        self.usable()?;
        let key = self.canonical_key(key, "delete")?;
        check_key_size(&key, "delete")?;
        self.send_delete(key).await
    }

    /// Writes one parsed stream record.
    pub async fn write(&mut self, record: &StreamRecord) -> Result<(), PushError> {
        match record {
            StreamRecord::Put { key, value } => self.put(key, value).await,
            StreamRecord::Delete { key } => self.delete(key).await,
        }
    }

    /// Waits until the broker acknowledged every write made so far: they are durable when
    /// this returns `Ok`.
    pub async fn flush(&mut self) -> Result<(), PushError> {
        self.usable()?;
        // No state change: a flush dropped halfway loses nothing (what it waited for stays in
        // flight and the next flush waits for it).
        self.drain().await?;
        Ok(())
    }

    /// Ends every open segment and waits for every acknowledgement.
    pub async fn close(mut self) -> Result<RealtimeReport, PushError> {
        self.usable()?;
        self.state = State::Sending;
        for partition in 0..self.partition_count {
            let end = match self.partitions[partition as usize].as_mut() {
                Some(w) if w.in_segment() => w.end_segment(),
                _ => continue,
            };
            self.send(partition, &end).await?;
        }
        self.drain().await?;
        self.state = State::Ready;
        self.closed = true;
        let report = self.report();
        tracing::info!(topic = %self.topic, puts = report.puts, deletes = report.deletes, partitions = report.partitions, elapsed = ?report.elapsed, "real-time writer closed, every write acknowledged");
        Ok(report)
    }

    /// Refuses any call once the writer failed, or when the previous write's future was dropped
    /// before it completed (its envelopes may be half sent).
    fn usable(&mut self) -> Result<(), RealtimeError> {
        let detail = match &self.state {
            State::Ready => return Ok(()),
            State::Failed(detail) => detail.clone(),
            State::Sending => {
                let detail =
                    "an earlier write was cancelled before it was handed to the broker".to_string();
                self.state = State::Failed(detail.clone());
                detail
            }
        };
        Err(RealtimeError::Unusable {
            topic: self.topic.clone(),
            detail,
        })
    }

    /// The key datum decoded and encoded again by Rialto's encoder.
    fn canonical_key(&self, key: &[u8], write: &'static str) -> Result<Vec<u8>, RealtimeError> {
        self.key_codec
            .decode(key, "key")
            .and_then(|k| self.key_codec.encode(&k, "key"))
            .map_err(|source| refused(write.into(), source))
    }

    /// A key datum as JSON, for messages.
    fn show_key(&self, key: &[u8]) -> String {
        self.key_codec
            .decode(key, "key")
            .map(|k| self.key_codec.to_json_text(&k))
            .unwrap_or_else(|_| format!("{key:02x?}"))
    }

    /// Checks the value's size, then sends `checksum ‖ datum` under `key`: one record, or its
    /// chunks and then its manifest.
    async fn send_put(&mut self, key: Vec<u8>, datum: Vec<u8>) -> Result<(), PushError> {
        let bytes = datum.len() as u64;
        if bytes > self.max_value_bytes {
            return Err(RealtimeError::ValueTooLarge {
                key: self.show_key(&key),
                bytes,
                max: self.max_value_bytes,
                limit: "the store's limit (max_value_bytes)",
            }
            .into());
        }
        let schema_id = self.value_schema_id;
        let mut body = Vec::with_capacity(CHECKSUM_BYTES + datum.len());
        body.extend_from_slice(&value_checksum(schema_id, &datum).to_be_bytes());
        body.extend_from_slice(&datum);
        let partition = partition_for_key(&key, self.partition_count);
        let generation = uuid::Uuid::new_v4().as_u64_pair().0;
        for (key, schema_id, body) in split_value_replacing(key, schema_id, body, generation) {
            self.send_data(partition, |w| w.put(key, schema_id, body))
                .await?;
        }
        self.puts += 1;
        Ok(())
    }

    async fn send_delete(&mut self, key: Vec<u8>) -> Result<(), PushError> {
        let partition = partition_for_key(&key, self.partition_count);
        self.send_data(partition, |w| w.delete(key)).await?;
        self.deletes += 1;
        Ok(())
    }

    /// Sends one data record on `partition`, opening a segment before it when none is open and
    /// ending the segment after it when it is full.
    async fn send_data(
        &mut self,
        partition: u32,
        data: impl FnOnce(&mut PartitionWriter) -> Envelope,
    ) -> Result<(), PushError> {
        let guid = self.producer_guid;
        let w =
            self.partitions[partition as usize].get_or_insert_with(|| PartitionWriter::new(guid));
        let mut envelopes = Vec::with_capacity(3);
        if !w.in_segment() {
            envelopes.push(w.start_segment());
        }
        envelopes.push(data(w));
        if w.segment_records() >= SEGMENT_RECORDS_MAX {
            envelopes.push(w.end_segment());
            tracing::debug!(topic = %self.topic, partition, "segment full, ended");
        }
        self.state = State::Sending;
        for envelope in &envelopes {
            self.send(partition, envelope).await?;
        }
        self.state = State::Ready;
        Ok(())
    }

    /// Hands one envelope to the broker (waiting while too much is in flight).
    async fn send(&mut self, partition: u32, envelope: &Envelope) -> Result<(), RealtimeError> {
        let sent = self
            .in_flight
            .send(
                self.pubsub.as_ref(),
                &self.topic,
                partition,
                self.signer.as_ref(),
                envelope,
            )
            .await;
        sent.map_err(|source| self.broker_failure(source))
    }

    /// Waits for every acknowledgement.
    async fn drain(&mut self) -> Result<(), RealtimeError> {
        match self.in_flight.drain().await {
            Ok(_) => Ok(()),
            Err(source) => Err(self.broker_failure(source)),
        }
    }

    /// Marks the writer failed and names the topic in the error.
    fn broker_failure(&mut self, source: PubSubError) -> RealtimeError {
        tracing::error!(topic = %self.topic, error = %source, "real-time write failed; the writer takes no more writes");
        self.state = State::Failed(format!("an earlier write failed: {source}"));
        RealtimeError::Broker {
            topic: self.topic.clone(),
            source,
        }
    }
}

impl Drop for RealtimeWriter {
    fn drop(&mut self) {
        if !self.closed && self.state == State::Ready && self.puts + self.deletes > 0 {
            tracing::warn!(
                topic = %self.topic,
                "real-time writer dropped without close(): writes not yet acknowledged may be lost and its segments stay open"
            );
        }
    }
}

fn refused(write: String, source: AvroError) -> RealtimeError {
    RealtimeError::Refused { write, source }
}

fn check_key_size(key: &[u8], write: &'static str) -> Result<(), RealtimeError> {
    if key.len() > KEY_DATUM_BYTES_MAX {
        return Err(RealtimeError::KeyTooLarge {
            write,
            bytes: key.len(),
            max: KEY_DATUM_BYTES_MAX,
        });
    }
    Ok(())
}

/// Refuses a store without a hybrid configuration.
fn ensure_hybrid(store: &StoreRecord) -> Result<(), RealtimeError> {
    if store.hybrid.is_none() {
        return Err(RealtimeError::NotHybrid {
            store: store.name.clone(),
        });
    }
    Ok(())
}

/// Checks that the real-time topic exists with the store's partition count (a topic with
/// another count would put keys in partitions their leaders do not read).
async fn check_topic(
    pubsub: &dyn PubSub,
    topic: &str,
    partition_count: u32,
) -> Result<(), RealtimeError> {
    let unusable = |detail: String| RealtimeError::Topic {
        topic: topic.to_string(),
        detail,
    };
    if partition_count == 0 {
        return Err(unusable("the store record has 0 partitions".into()));
    }
    let found = pubsub
        .partition_count(topic)
        .await
        .map_err(|source| RealtimeError::Broker {
            topic: topic.to_string(),
            source,
        })?;
    match found {
        Some(n) if n == partition_count => Ok(()),
        Some(n) => Err(unusable(format!(
            "it has {n} partitions, the store has {partition_count}"
        ))),
        None => Err(unusable(
            "it does not exist; the controller creates it when the store is made hybrid".into(),
        )),
    }
}

/// Parses one line of `rialto-push stream` input: `{"key": …, "value": …}` is a put,
/// `{"key": …, "delete": true}` a delete, a blank line `None`. Numbers are converted exactly
/// (see `rialto_protocol::avro_json`). The error says what is wrong with the line.
pub fn parse_stream_line(
    key_codec: &AvroCodec,
    value_codec: &AvroCodec,
    line: &str,
) -> Result<Option<StreamRecord>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let json = Json::parse(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Json::Object(members) = &json else {
        return Err(format!(
            "expected an object with `key` and `value` (a put) or `key` and `\"delete\": true` (a delete), got {}",
            json.kind()
        ));
    };
    if let Some((unknown, _)) = members
        .iter()
        .find(|(n, _)| !matches!(n.as_str(), "key" | "value" | "delete"))
    {
        return Err(format!(
            "unknown member `{unknown}`; a line holds `key` and `value` (a put) or `key` and `\"delete\": true` (a delete)"
        ));
    }
    let key = json.get("key").ok_or("missing member `key`")?;
    let value = match (json.get("value"), json.get("delete")) {
        (Some(_), Some(_)) => {
            return Err(
                "a line is either a put (`value`) or a delete (`\"delete\": true`), not both"
                    .into(),
            )
        }
        (Some(value), None) => Some(value),
        (None, Some(Json::Bool(true))) => None,
        (None, Some(other)) => {
            return Err(format!(
                "`delete` must be `true`, got `{}`",
                other.excerpt()
            ))
        }
        (None, None) => {
            return Err("missing member `value` (a put) or `\"delete\": true` (a delete)".into())
        }
    };
    let key = key_codec.from_json(key, "key").map_err(|e| e.to_string())?;
    Ok(Some(match value {
        Some(value) => StreamRecord::Put {
            key,
            value: value_codec
                .from_json(value, "value")
                .map_err(|e| e.to_string())?,
        },
        None => StreamRecord::Delete { key },
    }))
}

#[cfg(test)]
mod tests {

    use rialto_protocol::envelope::{ControlMessage, Message, SegmentChecksum};
    use rialto_protocol::meta::{HybridConfig, ValueSchema, DEFAULT_MAX_VALUE_BYTES};

    use super::*;
    use crate::test_broker::TestBroker;

    const KEY_SCHEMA: &str =
        r#"{"type":"record","name":"K","fields":[{"name":"id","type":"long"}]}"#;
    const VALUE_SCHEMA_1: &str =
        r#"{"type":"record","name":"V","fields":[{"name":"text","type":"string"}]}"#;
    const VALUE_SCHEMA_2: &str = r#"{"type":"record","name":"V","fields":[{"name":"text","type":"string"},{"name":"n","type":"long","default":0}]}"#;

    fn store(partitions: u32) -> StoreRecord {
        StoreRecord {
            name: "clicks".into(),
            owner: "test".into(),
            key_schema: KEY_SCHEMA.into(),
            value_schemas: vec![
                ValueSchema {
                    id: 1,
                    schema: VALUE_SCHEMA_1.into(),
                },
                ValueSchema {
                    id: 2,
                    schema: VALUE_SCHEMA_2.into(),
                },
            ],
            partition_count: partitions,
            replication_factor: 1,
            storage: Default::default(),
            compression: Default::default(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            hybrid: Some(HybridConfig {
                rewind_seconds: 3600,
                lag_records_max: 1000,
            }),
            created_ms: 0,
            current_version: None,
            backup_version: None,
            largest_version: 0,
            deleting: false,
            read_quota_keys_per_s: None,
            storage_quota_bytes: None,
            versions_to_keep: 2,
        }
    }

    async fn writer(store: &StoreRecord) -> (RealtimeWriter, TestBroker) {
        let fake = TestBroker::with_topic("clicks_rt", store.partition_count).await;
        let w = RealtimeWriter::new(store, fake.pubsub.clone())
            .await
            .unwrap();
        (w, fake)
    }

    fn key(id: i64) -> Value {
        Value::Record(vec![("id".into(), Value::Long(id))])
    }

    fn value(text: &str) -> Value {
        Value::Record(vec![
            ("text".into(), Value::String(text.into())),
            ("n".into(), Value::Long(text.len() as i64)),
        ])
    }

    fn key_bytes(id: i64) -> Vec<u8> {
        AvroCodec::parse(KEY_SCHEMA)
            .unwrap()
            .encode(&key(id), "key")
            .unwrap()
    }

    fn data_key(e: &Envelope) -> Option<&[u8]> {
        match &e.message {
            Message::Put { key, .. } | Message::Delete { key } => Some(key),
            Message::Control(_) => None,
        }
    }

    #[tokio::test]
    async fn puts_and_deletes_land_in_their_partitions_with_producer_metadata() {
        let store = store(4);
        let (mut w, fake) = writer(&store).await;
        for id in 0..200 {
            w.put(&key(id), &value(&format!("v{id}"))).await.unwrap();
        }
        for id in 0..20 {
            w.delete(&key(id)).await.unwrap();
        }
        let report = w.close().await.unwrap();
        assert_eq!((report.puts, report.deletes), (200, 20));
        assert_eq!(report.partitions, 4);

        let mut guids = std::collections::HashSet::new();
        let mut data = 0;
        for p in 0..4 {
            let envelopes = fake.envelopes("clicks_rt", p);
            let (first, last) = (&envelopes[0], &envelopes[envelopes.len() - 1]);
            assert_eq!(
                first.message,
                Message::Control(ControlMessage::StartOfSegment)
            );
            let mut expected = SegmentChecksum::default();
            for (i, e) in envelopes.iter().enumerate() {
                guids.insert(e.producer.producer_guid);
                assert_eq!(e.producer.segment, 0);
                assert_eq!(e.producer.sequence, i as u32, "partition {p}");
                assert_eq!(e.upstream, None);
                if let Some(k) = data_key(e) {
                    assert_eq!(partition_for_key(k, 4), p);
                    e.message.update_checksum(&mut expected);
                    data += 1;
                }
                assert!(
                    !matches!(
                        e.message,
                        Message::Control(
                            ControlMessage::StartOfPush { .. } | ControlMessage::EndOfPush
                        )
                    ),
                    "no push markers on a real-time topic"
                );
            }
            assert_eq!(
                last.message,
                Message::Control(ControlMessage::EndOfSegment {
                    checksum: expected.crc,
                    record_count: expected.record_count
                })
            );
        }
        assert_eq!(data, 220);
        assert_eq!(guids.len(), 1, "one producer GUID per writer");
    }

    #[tokio::test]
    async fn writes_to_one_key_keep_their_order() {
        let store = store(8);
        let (mut w, fake) = writer(&store).await;
        w.put(&key(5), &value("a")).await.unwrap();
        w.delete(&key(5)).await.unwrap();
        w.put(&key(5), &value("b")).await.unwrap();
        w.flush().await.unwrap();
        let p = partition_for_key(&key_bytes(5), 8);
        let kinds: Vec<&str> = fake
            .envelopes("clicks_rt", p)
            .iter()
            .map(|e| match &e.message {
                Message::Put { .. } => "put",
                Message::Delete { .. } => "delete",
                Message::Control(c) => c.name(),
            })
            .collect();
        assert_eq!(kinds, ["START_OF_SEGMENT", "put", "delete", "put"]);
        // flush leaves the segment open; close ends it.
        w.close().await.unwrap();
        assert_eq!(fake.envelopes("clicks_rt", p).len(), 5);
    }

    #[tokio::test]
    async fn values_carry_the_latest_schema_id_and_their_checksum() {
        let store = store(1);
        let (mut w, fake) = writer(&store).await;
        // A value of the older schema is resolved to the latest one.
        let old = Value::Record(vec![("text".into(), Value::String("hi".into()))]);
        w.put(&key(1), &old).await.unwrap();
        w.put(&key(2), &value("there")).await.unwrap();
        w.close().await.unwrap();
        let codec = AvroCodec::parse(VALUE_SCHEMA_2).unwrap();
        let puts: Vec<(u32, Vec<u8>)> = fake
            .envelopes("clicks_rt", 0)
            .into_iter()
            .filter_map(|e| match e.message {
                Message::Put {
                    schema_id, value, ..
                } => Some((schema_id, value)),
                _ => None,
            })
            .collect();
        assert_eq!(puts.len(), 2);
        for ((schema_id, stored), expected) in puts.iter().zip([("hi", 0), ("there", 5)]) {
            assert_eq!(*schema_id, 2);
            let (checksum, datum) = stored.split_at(CHECKSUM_BYTES);
            let checksum = u64::from_be_bytes(checksum.try_into().unwrap());
            assert_eq!(checksum, value_checksum(2, datum));
            assert_eq!(
                codec.decode(datum, "value").unwrap(),
                Value::Record(vec![
                    ("text".into(), Value::String(expected.0.into())),
                    ("n".into(), Value::Long(expected.1)),
                ])
            );
        }
    }

    #[tokio::test]
    async fn a_writer_keeps_an_older_registered_schema_when_asked() {
        let store = store(1);
        let fake = TestBroker::with_topic("clicks_rt", store.partition_count).await;
        let e = RealtimeWriter::with_schema(&store, fake.pubsub.clone(), Some(9))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("value schema 9 is not registered"),
            "{e}"
        );
        let mut w = RealtimeWriter::with_schema(&store, fake.pubsub.clone(), Some(1))
            .await
            .unwrap();
        let old = Value::Record(vec![("text".into(), Value::String("hi".into()))]);
        w.put(&key(1), &old).await.unwrap();
        w.close().await.unwrap();
        let ids: Vec<u32> = fake
            .envelopes("clicks_rt", 0)
            .into_iter()
            .filter_map(|e| match e.message {
                Message::Put { schema_id, .. } => Some(schema_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, vec![1]);
    }

    #[tokio::test]
    async fn a_full_segment_is_ended_and_the_next_write_opens_another() {
        let store = store(1);
        let (mut w, fake) = writer(&store).await;
        let total = SEGMENT_RECORDS_MAX as i64 + 1;
        for id in 0..total {
            w.put(&key(id), &value("x")).await.unwrap();
        }
        let envelopes = fake.envelopes("clicks_rt", 0);
        // SOS, 10,000 puts, EOS: the full segment is ended at once.
        assert_eq!(envelopes.len(), SEGMENT_RECORDS_MAX as usize + 2 + 2);
        let mut expected = SegmentChecksum::default();
        for e in &envelopes[1..=SEGMENT_RECORDS_MAX as usize] {
            e.message.update_checksum(&mut expected);
        }
        assert_eq!(expected.record_count, SEGMENT_RECORDS_MAX);
        let eos = &envelopes[SEGMENT_RECORDS_MAX as usize + 1];
        assert_eq!(
            (eos.producer.segment, eos.producer.sequence),
            (0, SEGMENT_RECORDS_MAX + 1)
        );
        assert_eq!(
            eos.message,
            Message::Control(ControlMessage::EndOfSegment {
                checksum: expected.crc,
                record_count: SEGMENT_RECORDS_MAX
            })
        );
        let sos = &envelopes[SEGMENT_RECORDS_MAX as usize + 2];
        assert_eq!(
            (sos.producer.segment, sos.producer.sequence, &sos.message),
            (1, 0, &Message::Control(ControlMessage::StartOfSegment))
        );
        let last_put = &envelopes[SEGMENT_RECORDS_MAX as usize + 3];
        assert_eq!(
            (last_put.producer.segment, last_put.producer.sequence),
            (1, 1)
        );

        w.close().await.unwrap();
        let envelopes = fake.envelopes("clicks_rt", 0);
        let mut expected = SegmentChecksum::default();
        last_put.message.update_checksum(&mut expected);
        let eos = envelopes.last().unwrap();
        assert_eq!((eos.producer.segment, eos.producer.sequence), (1, 2));
        assert_eq!(
            eos.message,
            Message::Control(ControlMessage::EndOfSegment {
                checksum: expected.crc,
                record_count: 1
            })
        );
    }

    #[tokio::test]
    async fn a_value_not_matching_the_schema_is_refused_before_anything_is_sent() {
        let store = store(2);
        let (mut w, fake) = writer(&store).await;
        let bad = Value::Record(vec![("text".into(), Value::Long(1))]);
        let err = w.put(&key(1), &bad).await.unwrap_err();
        assert!(
            matches!(&err, PushError::Realtime(e) if e.is_refused_write()),
            "{err}"
        );
        assert!(err.to_string().contains(r#"put of key {"id":1}"#), "{err}");
        let err = w
            .put(&Value::String("k".into()), &value("v"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("key does not match"), "{err}");
        let err = w.delete(&Value::Int(1)).await.unwrap_err();
        assert!(err.to_string().starts_with("delete refused"), "{err}");
        assert_eq!(fake.records_sent(), 0);
        // The writer is still usable.
        w.put(&key(1), &value("ok")).await.unwrap();
        assert_eq!(w.close().await.unwrap().puts, 1);
    }

    #[tokio::test]
    async fn encoded_datums_are_checked_and_written() {
        let store = store(3);
        let (mut w, fake) = writer(&store).await;
        let codec = AvroCodec::parse(VALUE_SCHEMA_2).unwrap();
        let datum = codec.encode(&value("abc"), "value").unwrap();
        w.put_encoded(&key_bytes(9), &datum).await.unwrap();
        w.delete_encoded(&key_bytes(10)).await.unwrap();
        let before = fake.records_sent();
        let err = w.put_encoded(&key_bytes(9), &[0xff]).await.unwrap_err();
        assert!(matches!(&err, PushError::Realtime(e) if e.is_refused_write()));
        let err = w.delete_encoded(&[0x01, 0x02]).await.unwrap_err();
        assert!(matches!(&err, PushError::Realtime(e) if e.is_refused_write()));
        assert_eq!(fake.records_sent(), before);
        let report = w.close().await.unwrap();
        assert_eq!((report.puts, report.deletes), (1, 1));
        let p = partition_for_key(&key_bytes(9), 3);
        let put = fake
            .envelopes("clicks_rt", p)
            .into_iter()
            .find(|e| matches!(e.message, Message::Put { .. }))
            .unwrap();
        let Message::Put { key, value, .. } = put.message else {
            unreachable!()
        };
        assert_eq!(key, key_bytes(9));
        assert_eq!(&value[CHECKSUM_BYTES..], &datum[..]);
    }

    #[tokio::test]
    async fn an_oversized_value_is_refused_naming_key_size_and_limit() {
        let mut small = store(2);
        small.max_value_bytes = 100;
        let (mut w, fake) = writer(&small).await;
        let big = value(&"x".repeat(200));
        let big_len = AvroCodec::parse(VALUE_SCHEMA_2)
            .unwrap()
            .encode(&big, "value")
            .unwrap()
            .len();
        let err = w.put(&key(42), &big).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(r#"{"id":42}"#), "{text}");
        assert!(text.contains(&format!("is {big_len} bytes")), "{text}");
        assert!(text.contains("100 bytes"), "{text}");
        assert!(text.contains("max_value_bytes"), "{text}");

        assert_eq!(fake.records_sent(), 0);
    }

    #[tokio::test]
    async fn a_value_over_one_record_is_written_as_chunks_then_its_manifest() {
        use rialto_protocol::stored::{
            assemble, ChunkManifest, CHUNK_BODY_BYTES, CHUNK_SCHEMA_ID, MANIFEST_SCHEMA_ID,
        };
        let (mut w, fake) = writer(&store(2)).await;
        let big = value(&"y".repeat(2 * CHUNK_BODY_BYTES));
        let datum = AvroCodec::parse(VALUE_SCHEMA_2)
            .unwrap()
            .encode(&big, "value")
            .unwrap();
        w.put(&key(7), &big).await.unwrap();
        w.put(&key(7), &value("small again")).await.unwrap();
        let report = w.close().await.unwrap();
        assert_eq!(report.puts, 2);
        let puts: Vec<(Vec<u8>, u32, Vec<u8>)> = fake
            .envelopes("clicks_rt", partition_for_key(&key_bytes(7), 2))
            .into_iter()
            .filter_map(|e| match e.message {
                Message::Put {
                    key,
                    schema_id,
                    value,
                } => Some((key, schema_id, value)),
                _ => None,
            })
            .collect();
        // Three chunks, the manifest under the key, then the small value.
        assert_eq!(puts.len(), 5);
        let ids: Vec<u32> = puts.iter().map(|p| p.1).collect();
        assert_eq!(
            ids,
            [
                CHUNK_SCHEMA_ID,
                CHUNK_SCHEMA_ID,
                CHUNK_SCHEMA_ID,
                MANIFEST_SCHEMA_ID,
                2
            ]
        );
        assert_eq!(puts[3].0, key_bytes(7));
        let manifest = ChunkManifest::decode(&puts[3].2).unwrap();
        assert_eq!((manifest.schema_id, manifest.chunk_count), (2, 3));
        for (i, chunk) in puts[..3].iter().enumerate() {
            assert_eq!(chunk.0, manifest.chunk_key(&key_bytes(7), i as u32));
        }
        let stored: Vec<Vec<u8>> = puts[..3]
            .iter()
            .map(|(_, id, b)| rialto_protocol::wire::StoredValue::encode(*id, b))
            .collect();
        let whole = assemble(&manifest, stored.iter().map(|s| Some(s.as_slice()))).unwrap();
        // The oracle: the datum the codec wrote, after its checksum.
        assert_eq!(&whole[4 + CHECKSUM_BYTES..], &datum[..]);
        assert_eq!(
            whole[4..4 + CHECKSUM_BYTES],
            value_checksum(2, &datum).to_be_bytes()
        );
    }

    #[tokio::test]
    async fn a_store_that_is_not_hybrid_is_refused() {
        let mut batch = store(2);
        batch.hybrid = None;
        let fake = TestBroker::with_topic("clicks_rt", 2).await;
        let err = RealtimeWriter::new(&batch, fake.pubsub.clone())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, PushError::Realtime(RealtimeError::NotHybrid { .. })),
            "{text}"
        );
        assert!(
            text.contains("rialto-admin stores update clicks --hybrid-rewind-seconds"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_missing_or_mismatched_topic_is_refused() {
        let fake = TestBroker::with_topic("other_rt", 2).await;
        let err = RealtimeWriter::new(&store(2), fake.pubsub.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let fake = TestBroker::with_topic("clicks_rt", 3).await;
        let err = RealtimeWriter::new(&store(2), fake.pubsub.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("3 partitions"), "{err}");
    }

    #[tokio::test]
    async fn a_broker_failure_names_the_topic_and_stops_the_writer() {
        let (mut w, fake) = writer(&store(2)).await;
        w.put(&key(1), &value("a")).await.unwrap();
        fake.faults.set_fail_deliveries(true);
        w.put(&key(2), &value("b")).await.unwrap();
        let err = w.flush().await.unwrap_err();
        assert!(
            matches!(&err, PushError::Realtime(RealtimeError::Broker { topic, .. }) if topic == "clicks_rt"),
            "{err}"
        );
        assert!(err.to_string().contains("clicks_rt"), "{err}");
        fake.faults.set_fail_deliveries(false);
        let err = w.put(&key(3), &value("c")).await.unwrap_err();
        assert!(
            matches!(&err, PushError::Realtime(RealtimeError::Unusable { .. })),
            "{err}"
        );
        assert!(w.close().await.is_err());
    }

    #[tokio::test]
    async fn a_cancelled_write_stops_the_writer() {
        let (mut w, fake) = writer(&store(2)).await;
        fake.faults.set_stalled(true);
        let cancelled =
            tokio::time::timeout(Duration::from_millis(20), w.put(&key(1), &value("a"))).await;
        assert!(cancelled.is_err());
        fake.faults.set_stalled(false);
        let err = w.put(&key(2), &value("b")).await.unwrap_err();
        assert!(err.to_string().contains("cancelled"), "{err}");
    }

    fn codecs() -> (AvroCodec, AvroCodec) {
        (
            AvroCodec::parse(KEY_SCHEMA).unwrap(),
            AvroCodec::parse(VALUE_SCHEMA_2).unwrap(),
        )
    }

    #[test]
    fn stream_lines_parse_to_puts_and_deletes() {
        let (k, v) = codecs();
        assert_eq!(
            parse_stream_line(
                &k,
                &v,
                r#"{"key": {"id": 9007199254740993}, "value": {"text": "a", "n": -1}}"#
            ),
            Ok(Some(StreamRecord::Put {
                key: key(9_007_199_254_740_993),
                value: Value::Record(vec![
                    ("text".into(), Value::String("a".into())),
                    ("n".into(), Value::Long(-1)),
                ]),
            }))
        );
        assert_eq!(
            parse_stream_line(&k, &v, r#" {"delete": true, "key": {"id": 3}} "#),
            Ok(Some(StreamRecord::Delete { key: key(3) }))
        );
        assert_eq!(parse_stream_line(&k, &v, ""), Ok(None));
        assert_eq!(parse_stream_line(&k, &v, "  \t\r"), Ok(None));
    }

    #[test]
    fn bad_stream_lines_say_what_is_wrong() {
        let (k, v) = codecs();
        let err = |line: &str| parse_stream_line(&k, &v, line).unwrap_err();
        assert!(
            err(r#"{"key": {"id": 1}, "value": {"text": "a"}, "ttl": 5}"#)
                .contains("unknown member `ttl`")
        );
        assert!(err(r#"{"key": {"id": 1}, "delete": false}"#).contains("`delete` must be `true`"));
        assert!(err(r#"{"key": {"id": 1}, "delete": "yes"}"#).contains("must be `true`"));
        assert!(
            err(r#"{"key": {"id": 1}, "value": {"text": "a"}, "delete": true}"#)
                .contains("not both")
        );
        assert!(err(r#"{"value": {"text": "a"}}"#).contains("missing member `key`"));
        assert!(err(r#"{"key": {"id": 1}}"#).contains("missing member `value`"));
        assert!(err(r#"{"key": {"id": 1}, "value": "#).contains("not valid JSON"));
        assert!(err(r#"[1, 2]"#).contains("got an array"));
        assert!(err(r#"{"key": {"id": 1.5}, "delete": true}"#).contains("key"));
        assert!(err(r#"{"key": {"id": 1}, "value": {"text": 3}}"#).contains("value"));
        assert!(
            err(r#"{"key": {"id": 1}, "key": {"id": 2}, "delete": true}"#)
                .contains("not valid JSON")
        );
    }
}
