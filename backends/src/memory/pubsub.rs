//! [`MemoryPubSub`]: Kafka's semantics for what Rialto uses, in one process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::pubsub::{ConsumedRecord, Delivery, PartitionConsumer, PubSub, PubSubError};

struct Stored {
    key: Vec<u8>,
    value: Vec<u8>,
    timestamp_ms: i64,
    appended: Instant,
}

#[derive(Default)]
struct Log {
    /// Offset of the first record kept (the low watermark).
    start: i64,
    records: VecDeque<Stored>,
}

impl Log {
    fn end(&self) -> i64 {
        self.start + self.records.len() as i64
    }

    /// Drops records older than `retention`, as the broker's log cleaner does.
    fn expire(&mut self, retention: Option<Duration>, now: Instant) {
        let Some(retention) = retention else { return };
        while self
            .records
            .front()
            // A retention too long for the clock keeps everything (checked: it may come from
            // the network, through the gateway).
            .is_some_and(|r| {
                r.appended
                    .checked_add(retention)
                    .is_some_and(|end| end <= now)
            })
        {
            self.records.pop_front();
            self.start += 1;
        }
    }
}

struct Topic {
    retention: Option<Duration>,
    partitions: Vec<Log>,
}

#[derive(Default)]
struct Shared {
    topics: Mutex<HashMap<String, Topic>>,
    appended: Notify,
    open_consumers: AtomicUsize,
}

impl Shared {
    fn topics(&self) -> MutexGuard<'_, HashMap<String, Topic>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on a partition's log, after applying the topic's retention to it.
    fn with_log<T>(
        &self,
        topic: &str,
        partition: u32,
        f: impl FnOnce(&mut Log) -> T,
    ) -> Result<T, PubSubError> {
        let mut topics = self.topics();
        let t = topics
            .get_mut(topic)
            .ok_or_else(|| unknown(topic, partition))?;
        let retention = t.retention;
        let log = t
            .partitions
            .get_mut(partition as usize)
            .ok_or_else(|| unknown(topic, partition))?;
        log.expire(retention, Instant::now());
        Ok(f(log))
    }
}

fn unknown(topic: &str, partition: u32) -> PubSubError {
    PubSubError::UnknownTopic(format!("{topic}/{partition}"))
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An in-memory [`PubSub`] with Kafka's semantics for what Rialto uses: topics with a fixed
/// partition count (creating one again with another count fails), contiguous offsets from 0,
/// sends to a missing topic or partition refused, consumers positioned by offset that wait for
/// new records, watermarks, retention (records older than a retained topic's retention leave
/// the log and raise its low watermark, on tokio's clock), lookup of an offset by timestamp,
/// deletion. Cheap to clone (one shared broker).
#[derive(Clone, Default)]
pub struct MemoryPubSub {
    shared: Arc<Shared>,
}

impl MemoryPubSub {
    /// An empty broker.
    pub fn new() -> MemoryPubSub {
        MemoryPubSub::default()
    }

    /// Appends a record to an existing topic partition without going through a producer;
    /// returns its offset.
    pub fn append(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<i64, PubSubError> {
        let offset = self.shared.with_log(topic, partition, |log| {
            log.records.push_back(Stored {
                key: key.to_vec(),
                value: value.to_vec(),
                timestamp_ms: wall_clock_ms(),
                appended: Instant::now(),
            });
            log.end() - 1
        })?;
        self.shared.appended.notify_waiters();
        Ok(offset)
    }

    /// Appends every value (with an empty key) in order; returns the offset after the last.
    pub fn append_all(
        &self,
        topic: &str,
        partition: u32,
        values: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<i64, PubSubError> {
        let mut end = self.watermarks_now(topic, partition)?.1;
        for v in values {
            end = self.append(topic, partition, b"", &v)? + 1;
        }
        Ok(end)
    }

    /// The `(key, value)` records a partition keeps now, in offset order.
    pub fn records(&self, topic: &str, partition: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.shared
            .topics()
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .map(|log| {
                log.records
                    .iter()
                    .map(|r| (r.key.clone(), r.value.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records kept now, over every topic partition.
    pub fn record_count(&self) -> usize {
        self.shared
            .topics()
            .values()
            .flat_map(|t| &t.partitions)
            .map(|log| log.records.len())
            .sum()
    }

    /// Names of the topics that exist, sorted.
    pub fn topic_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shared.topics().keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether a topic exists.
    pub fn has_topic(&self, topic: &str) -> bool {
        self.shared.topics().contains_key(topic)
    }

    /// Consumers opened and not dropped yet.
    pub fn open_consumers(&self) -> usize {
        self.shared.open_consumers.load(Ordering::SeqCst)
    }

    fn watermarks_now(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        self.shared
            .with_log(topic, partition, |log| (log.start, log.end()))
    }

    fn create(
        &self,
        topic: &str,
        partitions: u32,
        retention: Option<Duration>,
    ) -> Result<(), PubSubError> {
        let context = format!("create topic {topic}");
        if partitions == 0 {
            return Err(PubSubError::Failed {
                context,
                detail: "a topic needs at least one partition".into(),
            });
        }
        let mut topics = self.shared.topics();
        match topics.get(topic) {
            None => {
                topics.insert(
                    topic.to_string(),
                    Topic {
                        retention,
                        partitions: (0..partitions).map(|_| Log::default()).collect(),
                    },
                );
                Ok(())
            }
            Some(t) if t.partitions.len() != partitions as usize => Err(PubSubError::Failed {
                context,
                detail: format!(
                    "topic exists with {} partitions, wanted {partitions}",
                    t.partitions.len()
                ),
            }),
            Some(t) => match (t.retention, retention) {
                (Some(kept), Some(wanted)) if kept < wanted => Err(PubSubError::Failed {
                    context,
                    detail: format!(
                        "the topic keeps records {} s, less than the {} s needed",
                        kept.as_secs(),
                        wanted.as_secs()
                    ),
                }),
                _ => Ok(()),
            },
        }
    }
}

#[async_trait]
impl PubSub for MemoryPubSub {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError> {
        self.create(topic, partitions, None)
    }

    async fn create_retained_topic(
        &self,
        topic: &str,
        partitions: u32,
        retention: Duration,
    ) -> Result<(), PubSubError> {
        self.create(topic, partitions, Some(retention))
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, PubSubError> {
        let topics = self.shared.topics();
        let log = topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .ok_or_else(|| unknown(topic, partition))?;
        let found = log
            .records
            .iter()
            .position(|r| r.timestamp_ms >= timestamp_ms)
            .map_or(log.end(), |i| log.start + i as i64);
        Ok(Some(found))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError> {
        self.shared.topics().remove(topic);
        // Consumers waiting on it learn at once.
        self.shared.appended.notify_waiters();
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError> {
        Ok(self
            .shared
            .topics()
            .get(topic)
            .map(|t| t.partitions.len() as u32))
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        self.watermarks_now(topic, partition)
    }

    async fn send(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<Delivery, PubSubError> {
        let offset = self.append(topic, partition, key, value)?;
        Ok(Box::pin(async move { Ok(offset) }))
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), PubSubError> {
        Ok(()) // every send is durable when it returns
    }

    async fn consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        self.watermarks_now(topic, partition)?;
        self.shared.open_consumers.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(MemoryConsumer {
            shared: self.shared.clone(),
            topic: topic.to_string(),
            partition,
            next: offset.max(0),
        }))
    }
}

struct MemoryConsumer {
    shared: Arc<Shared>,
    topic: String,
    partition: u32,
    next: i64,
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.shared.open_consumers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemoryConsumer {
    /// Up to `max` records from the consumer's position. A position before the low watermark
    /// (records removed by retention) moves to it, as `auto.offset.reset=earliest` does.
    fn take(&mut self, max: usize) -> Result<Vec<ConsumedRecord>, PubSubError> {
        let from = self.next;
        let out = self.shared.with_log(&self.topic, self.partition, |log| {
            let from = from.max(log.start);
            log.records
                .iter()
                .skip((from - log.start) as usize)
                .take(max.max(1))
                .enumerate()
                .map(|(i, r)| ConsumedRecord {
                    offset: from + i as i64,
                    key: Some(r.key.clone()),
                    value: Some(r.value.clone()),
                })
                .collect::<Vec<_>>()
        })?;
        if let Some(last) = out.last() {
            self.next = last.offset + 1;
        }
        Ok(out)
    }
}

#[async_trait]
impl PartitionConsumer for MemoryConsumer {
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>, PubSubError> {
        let deadline = Instant::now() + timeout;
        loop {
            let shared = self.shared.clone();
            let appended = shared.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let out = self.take(max_records)?;
            if !out.is_empty() {
                return Ok(out);
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }
}
