//! `rialto-push`: a dataset file becomes a new version of a store.
//!
//! 1. Fetch the store's schemas from the controller; read and validate the whole input
//!    ([`input`]) — nothing is produced if a single record is bad or two records share a key
//!    with different values.
//! 2. Ask the controller for a new version (it creates the topic and places replicas).
//! 3. Produce every partition with producer metadata ([`writer`]), showing progress.
//! 4. Tell the controller the push is written and wait until the version is live or failed.
//!
//! Any failure after the version was allocated is reported to the controller, so a failed push
//! never goes live and the current version keeps serving.

pub mod avro_file;
pub mod input;
pub mod realtime;
pub mod sort;
#[cfg(test)]
mod test_broker;
/// The producer metadata of the push job's envelopes (shared with the other writers).
pub mod writer {
    pub use rialto_protocol::producer::PartitionWriter;
}

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rialto_backends::kafka::{KafkaConfig, KafkaPubSub};
use rialto_backends::{PubSub, PubSubError};
use rialto_controller::{AdminClient, ControllerError};
use rialto_protocol::admin::StartPushRequest;
use rialto_protocol::avro::{AvroCodec, AvroError};
use rialto_protocol::codec::{self, ValueCompressor};
use rialto_protocol::envelope::{ControlMessage, Envelope};
use rialto_protocol::meta::{Compression, ReplicaState, ValueFormat, VersionStatus};
use rialto_protocol::stored::{split_value, value_checksum, StoredPiece, CHECKSUM_BYTES};
use rialto_security::signing::WriterSecret;

pub use input::{InputFormat, InputShape, RecordLimits, SortConfig, ValueSchemas};
pub use realtime::{
    parse_stream_line, RealtimeConfig, RealtimeError, RealtimeReport, RealtimeWriter, StreamRecord,
    SEGMENT_RECORDS_MAX,
};
use sort::SortedPartition;
use writer::PartitionWriter;

/// Records in flight to the broker at most (bounds memory while producing).
const IN_FLIGHT_RECORDS_MAX: usize = 50_000;
/// Bytes of records in flight at most (large values' chunks are 768 KiB each).
const IN_FLIGHT_BYTES_MAX: usize = 256 * 1024 * 1024;
/// How often progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Everything that can stop a push, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("controller: {0}")]
    Controller(#[from] ControllerError),
    #[error("cannot read {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("{path}: record {record}: {detail}")]
    BadRecord {
        path: PathBuf,
        record: u64,
        detail: String,
    },
    #[error("{path}: key {key} appears in record {first} and record {second} with different values; a push must have one value per key")]
    DuplicateKey {
        path: PathBuf,
        key: String,
        first: u64,
        second: u64,
    },
    #[error("{path}: record {record}: the value of key {key} is {bytes} bytes serialized, over the store's limit of {max} bytes (max_value_bytes); nothing was pushed")]
    ValueTooLarge {
        path: PathBuf,
        record: u64,
        key: String,
        bytes: u64,
        max: u64,
    },
    #[error("cannot tell the input format of {0}; pass --format avro|json")]
    UnknownFormat(PathBuf),
    #[error("store schema is unusable: {0}")]
    Schema(#[from] AvroError),
    #[error("value compression: {0}")]
    Codec(#[from] rialto_protocol::codec::CodecError),
    #[error("store `{store}` has no value schema; recreate it with one")]
    NoValueSchema { store: String },
    #[error(
        "value schema {id} is not registered for store `{store}`; see `rialto-admin schemas list {store}`"
    )]
    UnknownValueSchema { store: String, id: u32 },
    #[error("producing version {version} failed: {source}")]
    Produce { version: u32, source: PubSubError },
    #[error("version {version} of `{store}` failed and will not serve: {reason}")]
    VersionFailed {
        store: String,
        version: u32,
        reason: String,
    },
    #[error(
        "version {version} of `{store}` did not go live within {waited:?}; it was marked failed"
    )]
    Timeout {
        store: String,
        version: u32,
        waited: Duration,
    },
    /// A real-time write was refused, or the real-time topic could not be written.
    #[error(transparent)]
    Realtime(#[from] RealtimeError),
}

/// What to push, and where.
#[derive(Debug, Clone)]
pub struct PushConfig {
    pub controller_url: String,
    pub store: String,
    pub input: PathBuf,
    /// Input format; guessed from the extension when `None`.
    pub format: Option<InputFormat>,
    pub shape: InputShape,
    /// Free text recorded with the version (job id, input path).
    pub push_id: String,
    /// How long to wait for the version to go live after producing.
    pub wait_timeout: Duration,
    /// Overrides the Kafka bootstrap servers the controller hands out.
    pub kafka_bootstrap: Option<String>,
    /// librdkafka properties for the broker's security settings (see `KafkaConfig::options`).
    pub kafka_options: Vec<(String, String)>,
    /// Memory budget and spill directory of the external sort.
    pub sort: SortConfig,
    /// The registered value schema the values are written with (see
    /// [`input::ValueSchemas::requested`]); `None`: the latest, or the Avro file's own.
    pub value_schema_id: Option<u32>,
    /// TLS to an https:// controller (its CA, and this job's certificate, whose principal
    /// needs `write` on the store when the controller authorizes calls).
    pub controller_tls: Option<rialto_controller::ClientTlsFiles>,
    /// Writes to this broker instead of the Kafka cluster the controller names (a cluster
    /// embedded in the same process, on the memory backends).
    pub broker: Option<InProcessBroker>,
    /// The network the controller is reached on (default the operating system's; a simulation
    /// gives its simulated one, with no TLS).
    pub network: rialto_backends::Network,
}

/// The broker a bootstrap list names: Kafka, or the gateway of an embedded cluster
/// (`rialto-local://host:port`, see `rialto_backends::remote`).
pub fn connect_broker(
    bootstrap: String,
    options: Vec<(String, String)>,
) -> Result<Arc<dyn PubSub>, PubSubError> {
    if let Some(address) = rialto_backends::remote::gateway_address(&bootstrap) {
        return Ok(Arc::new(rialto_backends::remote::RemotePubSub::new(
            address,
        )));
    }
    Ok(Arc::new(KafkaPubSub::new(KafkaConfig {
        bootstrap_servers: bootstrap,
        options,
    })?))
}

/// A broker handed to the push job directly (see [`PushConfig::broker`]).
#[derive(Clone)]
pub struct InProcessBroker(pub Arc<dyn PubSub>);

impl std::fmt::Debug for InProcessBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcessBroker")
    }
}

impl PushConfig {
    pub fn new(controller_url: &str, store: &str, input: impl Into<PathBuf>) -> PushConfig {
        let input = input.into();
        PushConfig {
            controller_url: controller_url.to_string(),
            store: store.to_string(),
            push_id: input.display().to_string(),
            input,
            format: None,
            shape: InputShape::default(),
            wait_timeout: Duration::from_secs(600),
            kafka_bootstrap: None,
            kafka_options: Vec::new(),
            sort: SortConfig::default(),
            value_schema_id: None,
            controller_tls: None,
            broker: None,
            network: rialto_backends::Network::Os,
        }
    }
}

/// What a successful push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub store: String,
    pub version: u32,
    /// The registered value schema the values were written with.
    pub value_schema_id: u32,
    pub records: u64,
    pub bytes: u64,
    pub partitions: u32,
    pub identical_duplicates: u64,
    /// How many times the input's sort spilled to disk (0: it fit in memory).
    pub sort_spills: usize,
    pub read_elapsed: Duration,
    pub produce_elapsed: Duration,
    /// The version's value compression.
    pub compression: Compression,
    /// Bytes of the values as produced (compressed), against `bytes` of keys and raw values.
    pub compressed_value_bytes: u64,
    /// Bytes of the values before compression.
    pub raw_value_bytes: u64,
    /// Values stored in chunks (larger than one topic record).
    pub chunked_values: u64,
    /// Size of the trained dictionary (0 without one) and how long training took.
    pub dictionary_bytes: usize,
    pub training_elapsed: Duration,
    pub live_elapsed: Duration,
}

/// Runs a whole push. Progress goes to the `tracing` log (target `rialto_push`).
pub async fn push(config: &PushConfig) -> Result<PushReport, PushError> {
    let admin = match &config.network {
        rialto_backends::Network::Os => {
            AdminClient::connect(&config.controller_url, config.controller_tls.as_ref())?
        }
        simulated => AdminClient::over(simulated.clone(), &config.controller_url),
    };
    let started = Instant::now();
    let store = admin.describe_store(&config.store).await?.store;
    if store.value_schemas.is_empty() {
        return Err(PushError::NoValueSchema {
            store: store.name.clone(),
        });
    }
    let key_codec = AvroCodec::parse(&store.key_schema)?;
    let value_schemas = ValueSchemas {
        registered: store
            .value_schemas
            .iter()
            .map(|s| Ok((s.id, AvroCodec::parse(&s.schema)?)))
            .collect::<Result<_, AvroError>>()?,
        requested: config.value_schema_id,
    };
    let format = match config.format {
        Some(f) => f,
        None => InputFormat::from_path(&config.input)
            .ok_or_else(|| PushError::UnknownFormat(config.input.clone()))?,
    };
    tracing::info!(store = %store.name, input = %config.input.display(), "reading and validating input");
    let (input, shape, sort) = (
        config.input.clone(),
        config.shape.clone(),
        config.sort.clone(),
    );
    let partition_count = store.partition_count;
    let limits = RecordLimits {
        max_value_bytes: store.max_value_bytes,
    };
    let dataset = rialto_backends::blocking::spawn(move || {
        input::read_dataset(
            &input,
            format,
            &shape,
            &key_codec,
            &value_schemas,
            partition_count,
            &sort,
            limits,
        )
    })
    .await
    .map_err(|e| PushError::Io {
        path: config.input.clone(),
        detail: format!("reader task failed: {e}"),
    })??;
    let read_elapsed = started.elapsed();
    let mut dataset = dataset;
    tracing::info!(
        records = dataset.records,
        bytes = dataset.bytes,
        spills = dataset.spills,
        ?read_elapsed,
        "input valid and sorted"
    );

    // Train the dictionary before a version exists: a failure here allocates nothing.
    let compression = store.compression;
    let training_started = Instant::now();
    let dictionary = match compression {
        Compression::ZstdDictionary => {
            let samples = std::mem::take(&mut dataset.samples);
            let dictionary = rialto_backends::blocking::spawn(move || {
                codec::train_dictionary(&samples, codec::DEFAULT_DICTIONARY_BYTES)
            })
            .await
            .map_err(|e| PushError::Io {
                path: config.input.clone(),
                detail: format!("dictionary training task failed: {e}"),
            })??;
            tracing::info!(bytes = dictionary.len(), elapsed = ?training_started.elapsed(), "compression dictionary trained");
            dictionary
        }
        Compression::None | Compression::Zstd => Vec::new(),
    };
    let training_elapsed = training_started.elapsed();
    let mut compressor = match compression {
        Compression::None => None,
        Compression::Zstd => Some(ValueCompressor::new(codec::DEFAULT_LEVEL, None)?),
        Compression::ZstdDictionary => Some(ValueCompressor::new(
            codec::DEFAULT_LEVEL,
            Some(&dictionary),
        )?),
    };

    // The version's replicas take records from this producer only (named at the start).
    let producer_guid = *uuid::Uuid::new_v4().as_bytes();
    let start = admin
        .start_push(
            &store.name,
            &StartPushRequest {
                push_id: config.push_id.clone(),
                data_bytes: Some(dataset.bytes),
                value_schema_id: Some(dataset.value_schema_id),
                producer: Some(rialto_protocol::producer::guid_hex(&producer_guid)),
            },
        )
        .await?;
    let version = start.version;
    tracing::info!(store = %store.name, version, topic = %start.topic, "version allocated");

    let mut value_sizes = ValueSizes::default();
    let result = async {
        if start.partition_count != partition_count {
            return Err(PushError::VersionFailed {
                store: store.name.clone(),
                version,
                reason: format!(
                    "controller allocated {} partitions, the input was partitioned for {partition_count}",
                    start.partition_count
                ),
            });
        }
        let pubsub: Arc<dyn PubSub> = match &config.broker {
            Some(InProcessBroker(broker)) => broker.clone(),
            None => {
                let bootstrap = config.kafka_bootstrap.clone().unwrap_or_else(|| start.kafka_bootstrap.clone());
                connect_broker(bootstrap, config.kafka_options.clone())
                    .map_err(|source| PushError::Produce { version, source })?
            }
        };
        let signer = start
            .signing_secret
            .as_ref()
            .map(|secret| WriterSecret::from_hex(&secret.0))
            .transpose()
            .map_err(|e| PushError::VersionFailed {
                store: store.name.clone(),
                version,
                reason: format!("the controller's signing secret is unusable: {e}"),
            })?;
        let produce_started = Instant::now();
        let partitions = std::mem::take(&mut dataset.partitions);
        let values = ValueStream {
            schema_id: start.value_schema_id,
            format: start.value_format,
            compression,
            dictionary: &dictionary,
            compressor: compressor.as_mut(),
        };
        let producer = Producer { topic: &start.topic, guid: producer_guid, signer: signer.as_ref() };
        produce(pubsub.as_ref(), producer, values, partitions, dataset.records)
            .await
            .map_err(|e| match e {
                ProduceError::PubSub(source) => PushError::Produce { version, source },
                ProduceError::Read(e) => e,
            })
            .map(|sizes| value_sizes = sizes)?;
        let produce_elapsed = produce_started.elapsed();
        admin.push_written(&store.name, version).await?;
        let live_started = Instant::now();
        wait_until_live(&admin, &store.name, version, config.wait_timeout).await?;
        Ok((produce_elapsed, live_started.elapsed()))
    }
    .await;

    match result {
        Ok((produce_elapsed, live_elapsed)) => Ok(PushReport {
            store: store.name.clone(),
            version,
            value_schema_id: start.value_schema_id,
            records: dataset.records,
            bytes: dataset.bytes,
            partitions: partition_count,
            identical_duplicates: dataset.identical_duplicates,
            sort_spills: dataset.spills,
            read_elapsed,
            produce_elapsed,
            live_elapsed,
            compression,
            compressed_value_bytes: value_sizes.written,
            raw_value_bytes: value_sizes.raw,
            chunked_values: value_sizes.chunked,
            dictionary_bytes: dictionary.len(),
            training_elapsed,
        }),
        Err(e) => {
            // Whatever went wrong, the version must never go live: say so to the controller.
            if !matches!(e, PushError::VersionFailed { .. }) {
                if let Err(report) = admin.fail_push(&store.name, version, &e.to_string()).await {
                    tracing::error!(error = %report, "could not mark version {version} failed");
                }
            }
            Err(e)
        }
    }
}

/// Why producing stopped.
#[derive(Debug)]
enum ProduceError {
    PubSub(PubSubError),
    /// Reading the sorted records back (from the sort's files) failed.
    Read(PushError),
}

impl From<PubSubError> for ProduceError {
    fn from(e: PubSubError) -> Self {
        ProduceError::PubSub(e)
    }
}

/// How values are written: schema, layout, compression.
struct ValueStream<'a> {
    schema_id: u32,
    format: ValueFormat,
    compression: Compression,
    dictionary: &'a [u8],
    compressor: Option<&'a mut ValueCompressor>,
}

/// Value bytes before and after compression, and how many values were chunked.
#[derive(Debug, Default, Clone, Copy)]
struct ValueSizes {
    raw: u64,
    written: u64,
    chunked: u64,
}

impl ValueStream<'_> {
    /// The records that store `datum` under `key`: its stored body (checksum, compressed
    /// payload), whole or in chunks (see `rialto_protocol::stored`).
    fn pieces(
        &mut self,
        key: Vec<u8>,
        datum: Vec<u8>,
        sizes: &mut ValueSizes,
    ) -> Result<Vec<StoredPiece>, PushError> {
        sizes.raw += datum.len() as u64;
        let checksum = value_checksum(self.schema_id, &datum);
        let payload = match self.compressor.as_deref_mut() {
            Some(c) => c.compress(&datum)?,
            None => datum,
        };
        sizes.written += payload.len() as u64;
        let body = match self.format {
            ValueFormat::SchemaIdPrefixed => payload,
            ValueFormat::Checksummed => {
                let mut body = Vec::with_capacity(CHECKSUM_BYTES + payload.len());
                body.extend_from_slice(&checksum.to_be_bytes());
                body.extend_from_slice(&payload);
                body
            }
        };
        let pieces = split_value(key, self.schema_id, body);
        if pieces.len() > 1 {
            sizes.chunked += 1;
        }
        Ok(pieces)
    }
}

/// Records one partition sends before the next partition's turn (see [`produce`]).
const PRODUCE_TURN_RECORDS: usize = 256;

/// Who a push produces as: its version topic, its producer GUID and the secret the controller
/// registered for it (signing every record).
#[derive(Clone, Copy)]
struct Producer<'a> {
    topic: &'a str,
    guid: [u8; 16],
    signer: Option<&'a WriterSecret>,
}

/// One partition's stream being produced: its producer state and its remaining records.
struct PartitionStream {
    partition: u32,
    writer: PartitionWriter,
    records: sort::RecordIter,
}

/// Produces every partition's stream and waits until the broker has acknowledged all of it.
///
/// Partitions take turns of [`PRODUCE_TURN_RECORDS`] records rather than going one after the
/// other: each partition's records stay in key order, and the producer always has batches for
/// many partitions to send. Produced one partition at a time, librdkafka's broker thread
/// busy-polled while that partition's batches waited for the broker (a core of CPU taken from
/// the broker on a shared machine; see benches/README.md, "Pushes against the broker").
async fn produce(
    pubsub: &dyn PubSub,
    producer: Producer<'_>,
    mut values: ValueStream<'_>,
    partitions: Vec<SortedPartition>,
    records_total: u64,
) -> Result<ValueSizes, ProduceError> {
    let Producer {
        topic,
        guid: producer_guid,
        signer,
    } = producer;
    let mut sizes = ValueSizes::default();
    let mut in_flight = InFlight::default();
    let mut sent: u64 = 0;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut streams = Vec::with_capacity(partitions.len());
    for (partition, records) in partitions.into_iter().enumerate() {
        let partition = partition as u32;
        let mut writer = PartitionWriter::new(producer_guid);
        let start = [
            writer.start_segment(),
            writer.control(ControlMessage::StartOfPush {
                sorted: true,
                codec: values.compression.codec(),
                dictionary: values.dictionary.to_vec(),
            }),
        ];
        for e in start {
            in_flight.send(pubsub, topic, partition, signer, &e).await?;
        }
        streams.push(PartitionStream {
            partition,
            writer,
            records: records.into_records().map_err(ProduceError::Read)?,
        });
    }
    while !streams.is_empty() {
        let mut finished = Vec::new();
        for (i, stream) in streams.iter_mut().enumerate() {
            let partition = stream.partition;
            for _ in 0..PRODUCE_TURN_RECORDS {
                let Some(record) = stream.records.next() else {
                    finished.push(i);
                    break;
                };
                let (key, datum) = record.map_err(ProduceError::Read)?;
                // The key travels inside the envelope; the Kafka record key stays empty
                // (partitions are chosen explicitly, and compaction is never used on version
                // topics).
                for (key, schema_id, body) in values
                    .pieces(key, datum, &mut sizes)
                    .map_err(ProduceError::Read)?
                {
                    let e = stream.writer.put(key, schema_id, body);
                    in_flight.send(pubsub, topic, partition, signer, &e).await?;
                }
                sent += 1;
            }
            if last_progress.elapsed() >= PROGRESS_INTERVAL {
                last_progress = Instant::now();
                let rate = sent as f64 / started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    "produced {sent}/{records_total} records ({:.0}%), {rate:.0} records/s",
                    100.0 * sent as f64 / records_total.max(1) as f64
                );
            }
        }
        for i in finished.into_iter().rev() {
            let mut stream = streams.swap_remove(i);
            for e in [
                stream.writer.control(ControlMessage::EndOfPush),
                stream.writer.end_segment(),
            ] {
                in_flight
                    .send(pubsub, topic, stream.partition, signer, &e)
                    .await?;
            }
        }
    }
    let acked = in_flight.drain().await?;
    tracing::info!(records = sent, envelopes = acked, elapsed = ?started.elapsed(), "all records acknowledged by the broker");
    if sizes.chunked > 0 {
        tracing::info!(values = sizes.chunked, "large values stored in chunks");
    }
    if values.compression != Compression::None {
        tracing::info!(
            raw_value_bytes = sizes.raw,
            written_value_bytes = sizes.written,
            ratio = format!("{:.2}", sizes.raw as f64 / sizes.written.max(1) as f64),
            "values compressed"
        );
    }
    Ok(sizes)
}

/// The acknowledgement of one envelope, resolving to its size.
type Acknowledgement = Pin<Box<dyn Future<Output = Result<usize, PubSubError>> + Send>>;

/// Envelopes sent and not yet acknowledged, bounded in count and in bytes.
#[derive(Default)]
pub(crate) struct InFlight {
    deliveries: FuturesUnordered<Acknowledgement>,
    bytes: usize,
    acked: u64,
}

impl InFlight {
    /// Sends one envelope, signed by `signer` (the signature is the record's key, empty
    /// without one), first waiting for acknowledgements while over either bound.
    pub(crate) async fn send(
        &mut self,
        pubsub: &dyn PubSub,
        topic: &str,
        partition: u32,
        signer: Option<&WriterSecret>,
        envelope: &Envelope,
    ) -> Result<(), PubSubError> {
        while self.deliveries.len() >= IN_FLIGHT_RECORDS_MAX
            || (self.bytes >= IN_FLIGHT_BYTES_MAX && !self.deliveries.is_empty())
        {
            self.settle_one().await?;
        }
        let envelope = envelope.encode();
        let signature = signer.map(|s| s.sign(&envelope));
        let key = signature.as_ref().map_or(&[][..], |s| &s[..]);
        let delivery = pubsub.send(topic, partition, key, &envelope).await?;
        let len = envelope.len();
        self.bytes += len;
        self.deliveries
            .push(Box::pin(async move { delivery.await.map(|_| len) }));
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), PubSubError> {
        if let Some(result) = self.deliveries.next().await {
            self.bytes -= result?;
            self.acked += 1;
        }
        Ok(())
    }

    /// Waits for every acknowledgement; returns how many envelopes were acknowledged in all.
    pub(crate) async fn drain(&mut self) -> Result<u64, PubSubError> {
        while !self.deliveries.is_empty() {
            self.settle_one().await?;
        }
        Ok(self.acked)
    }
}

/// Polls the controller until the version is live, failed, or the timeout passes.
async fn wait_until_live(
    admin: &AdminClient,
    store: &str,
    version: u32,
    timeout: Duration,
) -> Result<(), PushError> {
    // tokio's clock: the real one, or a simulation's.
    let started = tokio::time::Instant::now();
    let mut last_progress = tokio::time::Instant::now();
    loop {
        let v = admin.describe_version(store, version).await?;
        match &v.record.status {
            VersionStatus::Online => {
                tracing::info!(store, version, elapsed = ?started.elapsed(), "version is live");
                return Ok(());
            }
            VersionStatus::Failed { reason } => {
                return Err(PushError::VersionFailed {
                    store: store.to_string(),
                    version,
                    reason: reason.clone(),
                })
            }
            VersionStatus::Pushing | VersionStatus::PushWritten => {}
        }
        if started.elapsed() > timeout {
            return Err(PushError::Timeout {
                store: store.to_string(),
                version,
                waited: timeout,
            });
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = tokio::time::Instant::now();
            let online = v
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Online)
                .count();
            let records: u64 = v.replicas.iter().map(|r| r.records).sum();
            tracing::info!("waiting for version {version}: {online}/{} replicas ONLINE, {records} records ingested", v.replicas.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use rialto_protocol::envelope::{Envelope, Message};

    use super::*;
    use crate::sort::ExternalSorter;
    use crate::test_broker::TestBroker;

    /// Partitions take turns, yet each partition's stream is what a server expects: START_OF_SEGMENT,
    /// START_OF_PUSH (sorted), every put in key order with contiguous sequence numbers,
    /// END_OF_PUSH, END_OF_SEGMENT.
    #[tokio::test]
    async fn interleaved_partitions_each_keep_their_own_ordered_stream() {
        const PARTITIONS: u32 = 3;
        // Partition sizes around a turn's length: empty, one turn and a bit, several turns.
        let sizes = [
            0usize,
            PRODUCE_TURN_RECORDS + 7,
            3 * PRODUCE_TURN_RECORDS + 1,
        ];
        let mut sorter = ExternalSorter::new(PARTITIONS, 1 << 30, None);
        let mut expected: Vec<Vec<Vec<u8>>> = vec![Vec::new(); PARTITIONS as usize];
        let mut record = 0;
        for (p, &n) in sizes.iter().enumerate() {
            // Added in descending key order: the sort, not the input, orders them.
            for i in (0..n).rev() {
                let key = format!("p{p}-{i:06}").into_bytes();
                sorter
                    .add(p as u32, record, key.clone(), vec![p as u8; 10])
                    .unwrap();
                expected[p].push(key);
                record += 1;
            }
            expected[p].sort();
        }
        let dataset = sorter.finish().unwrap().unwrap();
        let broker = TestBroker::with_topic("t_v1", PARTITIONS).await;
        let values = ValueStream {
            schema_id: 1,
            format: ValueFormat::Checksummed,
            compression: Compression::None,
            dictionary: &[],
            compressor: None,
        };
        let secret = WriterSecret::new(&[5; 32]).unwrap();
        let producer = Producer {
            topic: "t_v1",
            guid: [7; 16],
            signer: Some(&secret),
        };
        produce(
            broker.pubsub.as_ref(),
            producer,
            values,
            dataset.partitions,
            record,
        )
        .await
        .unwrap();
        for p in 0..PARTITIONS {
            let envelopes: Vec<Envelope> = broker.signed_envelopes("t_v1", p, &secret);
            let n = expected[p as usize].len();
            assert_eq!(envelopes.len(), n + 4, "partition {p}");
            assert!(matches!(
                envelopes[0].message,
                Message::Control(ControlMessage::StartOfSegment)
            ));
            assert!(matches!(
                envelopes[1].message,
                Message::Control(ControlMessage::StartOfPush { sorted: true, .. })
            ));
            let keys: Vec<Vec<u8>> = envelopes[2..2 + n]
                .iter()
                .map(|e| match &e.message {
                    Message::Put { key, .. } => key.clone(),
                    other => panic!("partition {p}: expected a put, got {other:?}"),
                })
                .collect();
            assert_eq!(keys, expected[p as usize], "partition {p}");
            assert!(matches!(
                envelopes[n + 2].message,
                Message::Control(ControlMessage::EndOfPush)
            ));
            assert!(matches!(
                envelopes[n + 3].message,
                Message::Control(ControlMessage::EndOfSegment { record_count, .. })
                    if record_count as usize == n
            ));
            for (i, e) in envelopes.iter().enumerate() {
                assert_eq!(e.producer.sequence as usize, i, "partition {p}");
                assert_eq!(e.producer.segment, envelopes[0].producer.segment);
            }
        }
        assert_eq!(
            broker.records_sent(),
            record as usize + 4 * PARTITIONS as usize
        );
    }
}
