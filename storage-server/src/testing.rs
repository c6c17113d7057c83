//! What tests of a storage server need besides the memory backends
//! (`rialto_backends::memory`): the records of a well-formed push ([`PushRecords`]: SOS, SOP,
//! data, EOP, EOS), a version record, waiting for a condition, a replica's reported state.
//! Always compiled (small, no extra dependencies) so that other crates' tests can use it.

use std::time::Duration;

use rialto_backends::MetaStore;
use rialto_protocol::envelope::{
    CompressionCodec, ControlMessage, Envelope, Message, ProducerMetadata, SegmentChecksum,
};

/// Builds the envelopes of one producer's push to one partition.
#[derive(Debug, Clone)]
pub struct PushRecords {
    guid: [u8; 16],
    segment: u32,
    sequence: u32,
    checksum: SegmentChecksum,
    /// Encoded envelopes so far.
    pub records: Vec<Vec<u8>>,
}

impl PushRecords {
    /// Starts an unsorted, uncompressed push: START_OF_SEGMENT (segment 0) then START_OF_PUSH.
    pub fn start(guid: [u8; 16]) -> PushRecords {
        PushRecords::start_with(
            guid,
            ControlMessage::StartOfPush {
                sorted: false,
                codec: CompressionCodec::None,
                dictionary: Vec::new(),
            },
        )
    }

    /// Starts a push with the given START_OF_PUSH.
    pub fn start_with(guid: [u8; 16], start_of_push: ControlMessage) -> PushRecords {
        let mut p = PushRecords {
            guid,
            segment: 0,
            sequence: 0,
            checksum: SegmentChecksum::default(),
            records: Vec::new(),
        };
        p.push(Message::Control(ControlMessage::StartOfSegment));
        p.push(Message::Control(start_of_push));
        p
    }

    /// Appends any message with the next sequence number (updating the segment checksum).
    pub fn push(&mut self, message: Message) -> &mut Self {
        message.update_checksum(&mut self.checksum);
        let env = Envelope {
            producer: ProducerMetadata {
                producer_guid: self.guid,
                segment: self.segment,
                sequence: self.sequence,
                timestamp_ms: 0,
            },
            message,
            upstream: None,
        };
        self.sequence += 1;
        self.records.push(env.encode());
        self
    }

    /// Appends a PUT.
    pub fn put(&mut self, key: &[u8], schema_id: u32, value: &[u8]) -> &mut Self {
        self.push(Message::Put {
            key: key.to_vec(),
            schema_id,
            value: value.to_vec(),
        })
    }

    /// Appends a DELETE.
    pub fn delete(&mut self, key: &[u8]) -> &mut Self {
        self.push(Message::Delete { key: key.to_vec() })
    }

    /// Appends END_OF_PUSH then END_OF_SEGMENT (with the right checksum) and returns the records.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.push(Message::Control(ControlMessage::EndOfPush));
        let SegmentChecksum { crc, record_count } = self.checksum;
        self.push(Message::Control(ControlMessage::EndOfSegment {
            checksum: crc,
            record_count,
        }));
        self.records
    }
}

/// A `Pushing` version record of `store` v`version` with the given assignment (one node list per
/// partition) and topic `<store>_v<version>`.
pub fn version_record(
    store: &str,
    version: u32,
    assignment: &[&[&str]],
) -> rialto_protocol::meta::VersionRecord {
    rialto_protocol::meta::VersionRecord {
        store: store.to_string(),
        version,
        topic: rialto_protocol::meta::version_topic(store, version),
        partition_count: assignment.len() as u32,
        assignment: assignment
            .iter()
            .map(|p| p.iter().map(|n| n.to_string()).collect())
            .collect(),
        status: rialto_protocol::meta::VersionStatus::Pushing,
        created_ms: rialto_protocol::meta::now_ms(),
        storage: rialto_protocol::meta::StorageProfile::OnDisk,
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

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state of a replica as reported in `meta`, if any.
pub async fn reported_state(
    meta: &dyn MetaStore,
    root: &str,
    store: &str,
    version: u32,
    partition: u32,
    node_id: &str,
) -> Option<rialto_protocol::meta::ReplicaRecord> {
    let key = rialto_protocol::meta::Layout::new(root).replica(store, version, partition, node_id);
    let kv = meta.get(&key).await.ok()??;
    rialto_protocol::meta::decode_record(&kv.value).ok()
}
