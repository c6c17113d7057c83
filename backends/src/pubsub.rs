//! The pub-sub trait: what Rialto needs from Kafka, and nothing more.
//!
//! Deliberately small: no consumer groups, no transactions, no record deletion (the test broker
//! cannot do those, and Rialto does not need them). Consumers are positioned explicitly
//! (`assign` + `seek`) because the offset of record is checkpointed by the server with its data.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;

/// A pub-sub failure. `retryable` errors are transient (broker unreachable, timeouts).
#[derive(Debug, Error)]
pub enum PubSubError {
    #[error("pub-sub broker unreachable or timed out ({context}): {detail}")]
    Unavailable { context: String, detail: String },
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
    #[error("pub-sub operation failed ({context}): {detail}")]
    Failed { context: String, detail: String },
}

impl PubSubError {
    pub fn retryable(&self) -> bool {
        matches!(self, PubSubError::Unavailable { .. })
    }
}

/// A record read from a topic partition.
#[derive(Debug, Clone)]
pub struct ConsumedRecord {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Completion of one produced record: its offset in the partition.
pub type Delivery = Pin<Box<dyn Future<Output = Result<i64, PubSubError>> + Send>>;

/// Topic administration, production and consumption.
#[async_trait]
pub trait PubSub: Send + Sync + 'static {
    /// Creates a topic whose records are kept until it is deleted; succeeds if it already
    /// exists with the same partition count.
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError>;
    /// Creates a topic whose records are kept at least `retention`; succeeds if it already
    /// exists with the same partition count and, where the broker says, at least that retention.
    async fn create_retained_topic(
        &self,
        topic: &str,
        partitions: u32,
        retention: Duration,
    ) -> Result<(), PubSubError> {
        let _ = retention;
        self.create_topic(topic, partitions).await
    }
    /// The offset of the first record of a partition written at or after `timestamp_ms`, the
    /// partition's end when no record is that recent; `None` when the broker cannot tell.
    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, PubSubError> {
        let _ = (topic, partition, timestamp_ms);
        Ok(None)
    }
    /// Deletes a topic; succeeds if it does not exist.
    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError>;
    /// Partition count of a topic, `None` if it does not exist.
    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError>;
    /// `(low, high)` watermarks: the first offset and the offset after the last record.
    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError>;
    /// Enqueues a record for one partition; the returned future completes when it is durable.
    /// Records enqueued for one partition are delivered in order.
    async fn send(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<Delivery, PubSubError>;
    /// Waits until every enqueued record is delivered or `timeout` passes.
    async fn flush(&self, timeout: Duration) -> Result<(), PubSubError>;
    /// Opens a consumer of one partition starting at `offset`.
    async fn consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError>;
    /// Like [`consumer`](Self::consumer), for records that must arrive with low latency (the
    /// real-time writes of hybrid stores): the broker is asked to answer a fetch within
    /// `max_wait` even when it has little to return, at the cost of more fetches when idle.
    async fn realtime_consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_wait: Duration,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        let _ = max_wait;
        self.consumer(topic, partition, offset).await
    }
}

/// A consumer of one topic partition.
#[async_trait]
pub trait PartitionConsumer: Send {
    /// Returns up to `max_records` records, waiting at most `timeout` for the first one.
    /// An empty vector means nothing arrived in time.
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>, PubSubError>;
}
