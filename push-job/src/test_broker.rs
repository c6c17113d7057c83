//! A broker for the push job's unit tests: it keeps every record sent, per topic and partition.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rialto_backends::pubsub::{Delivery, PartitionConsumer};
use rialto_backends::{PubSub, PubSubError};
use rialto_protocol::envelope::Envelope;

/// Record values sent, per (topic, partition), in order.
pub(crate) type Sent = HashMap<(String, u32), Vec<Vec<u8>>>;

/// A broker that keeps every record sent, per (topic, partition).
#[derive(Default)]
pub(crate) struct FakePubSub {
    pub(crate) topics: Mutex<HashMap<String, u32>>,
    pub(crate) sent: Mutex<Sent>,
    /// Deliveries fail (the broker lost them).
    pub(crate) fail_deliveries: AtomicBool,
    /// `send` never returns (a full producer queue).
    pub(crate) hang_sends: AtomicBool,
}

impl FakePubSub {
    pub(crate) fn with_topic(topic: &str, partitions: u32) -> Arc<FakePubSub> {
        let fake = FakePubSub::default();
        fake.topics
            .lock()
            .unwrap()
            .insert(topic.to_string(), partitions);
        Arc::new(fake)
    }

    /// Every envelope sent to `topic`'s `partition`, decoded.
    pub(crate) fn envelopes(&self, topic: &str, partition: u32) -> Vec<Envelope> {
        self.sent
            .lock()
            .unwrap()
            .get(&(topic.to_string(), partition))
            .map(|records| {
                records
                    .iter()
                    .map(|r| Envelope::decode(r).expect("envelope decodes"))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn records_sent(&self) -> usize {
        self.sent.lock().unwrap().values().map(Vec::len).sum()
    }
}

#[async_trait]
impl PubSub for FakePubSub {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError> {
        self.topics
            .lock()
            .unwrap()
            .insert(topic.to_string(), partitions);
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError> {
        self.topics.lock().unwrap().remove(topic);
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError> {
        Ok(self.topics.lock().unwrap().get(topic).copied())
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        let sent = self.sent.lock().unwrap();
        let n = sent
            .get(&(topic.to_string(), partition))
            .map_or(0, Vec::len);
        Ok((0, n as i64))
    }

    async fn send(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<Delivery, PubSubError> {
        assert!(key.is_empty(), "the Kafka record key stays empty");
        if self.hang_sends.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let count = self.topics.lock().unwrap().get(topic).copied();
        assert!(
            count.is_some_and(|n| partition < n),
            "send to {topic}/{partition}"
        );
        if self.fail_deliveries.load(Ordering::SeqCst) {
            return Ok(Box::pin(async {
                Err(PubSubError::Unavailable {
                    context: "deliver".into(),
                    detail: "test broker lost the record".into(),
                })
            }));
        }
        let mut sent = self.sent.lock().unwrap();
        let records = sent.entry((topic.to_string(), partition)).or_default();
        records.push(value.to_vec());
        let offset = records.len() as i64 - 1;
        Ok(Box::pin(async move { Ok(offset) }))
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), PubSubError> {
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        _partition: u32,
        _offset: i64,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        Err(PubSubError::Failed {
            context: format!("consume {topic}"),
            detail: "the test broker does not consume".into(),
        })
    }
}
