//! [`MemoryPubSub`]: Kafka's semantics for what Rialto uses, in one process.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::journal::{put_bytes, Fields, Journal};
use crate::pubsub::{ConsumedRecord, Delivery, PartitionConsumer, PubSub, PubSubError};

/// Partition journal record kinds: the offset of the next record (first in every file), and a
/// record.
const START: u8 = 0;
const RECORD: u8 = 1;
/// Records removed by retention that a partition's journal may still hold before it is
/// rewritten without them (at least as many as it keeps, so rewrites stay rare).
const RETENTION_REWRITE_MIN: usize = 10_000;
/// The file in a topic's directory that holds its partition count and retention.
const TOPIC_FILE: &str = "topic";

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
    /// Where a persistent broker writes each record before appending it.
    journal: Option<Journal>,
    /// Records retention removed that the journal still holds.
    expired_on_disk: usize,
}

fn start_record(start: i64) -> Vec<u8> {
    let mut r = vec![START];
    r.extend_from_slice(&start.to_le_bytes());
    r
}

fn stored_record(timestamp_ms: i64, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(13 + key.len() + value.len());
    r.push(RECORD);
    r.extend_from_slice(&timestamp_ms.to_le_bytes());
    put_bytes(&mut r, key);
    r.extend_from_slice(value);
    r
}

impl Log {
    fn end(&self) -> i64 {
        self.start + self.records.len() as i64
    }

    /// A partition kept in the journal at `path`: its records replayed, those older than
    /// `retention` (by their wall-clock timestamps) left out.
    fn open(path: &Path, retention: Option<Duration>) -> std::io::Result<Log> {
        let (journal, payloads) = Journal::open(path)?;
        let mut log = Log {
            journal: Some(journal),
            ..Log::default()
        };
        let now_ms = wall_clock_ms();
        let now = Instant::now();
        for payload in &payloads {
            let mut f = Fields::new(payload);
            match f.u8()? {
                START => {
                    log.start = f.i64()?;
                    log.records.clear();
                }
                RECORD => {
                    let timestamp_ms = f.i64()?;
                    let key = f.bytes()?.to_vec();
                    let age =
                        Duration::from_millis(now_ms.saturating_sub(timestamp_ms).max(0) as u64);
                    log.records.push_back(Stored {
                        key,
                        value: f.rest().to_vec(),
                        timestamp_ms,
                        appended: now.checked_sub(age).unwrap_or(now),
                    });
                }
                other => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "unknown partition journal record kind {other} in {}",
                            path.display()
                        ),
                    ))
                }
            }
        }
        log.drop_expired(retention, now);
        log.rewrite()?;
        Ok(log)
    }

    /// Appends a record, written to the journal first when the broker is persistent.
    fn push(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<i64> {
        let timestamp_ms = wall_clock_ms();
        if let Some(journal) = self.journal.as_mut() {
            journal.append(&stored_record(timestamp_ms, key, value))?;
        }
        self.records.push_back(Stored {
            key: key.to_vec(),
            value: value.to_vec(),
            timestamp_ms,
            appended: Instant::now(),
        });
        Ok(self.end() - 1)
    }

    /// Rewrites the journal with the records kept now.
    fn rewrite(&mut self) -> std::io::Result<()> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        let records: Vec<Vec<u8>> = std::iter::once(start_record(self.start))
            .chain(
                self.records
                    .iter()
                    .map(|r| stored_record(r.timestamp_ms, &r.key, &r.value)),
            )
            .collect();
        journal.rewrite(records.iter().map(Vec::as_slice))?;
        self.expired_on_disk = 0;
        Ok(())
    }

    /// Drops records older than `retention`, as the broker's log cleaner does.
    fn expire(&mut self, retention: Option<Duration>, now: Instant) {
        let before = self.start;
        self.drop_expired(retention, now);
        self.expired_on_disk += (self.start - before) as usize;
        if self.journal.is_some()
            && self.expired_on_disk >= RETENTION_REWRITE_MIN.max(self.records.len())
        {
            if let Err(e) = self.rewrite() {
                // Retention on disk waits for the next try; nothing kept is lost.
                tracing::warn!(error = %e, "cannot rewrite a partition journal after retention");
            }
        }
    }

    fn drop_expired(&mut self, retention: Option<Duration>, now: Instant) {
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
    /// Where a persistent broker keeps its topics, one directory each.
    dir: Option<PathBuf>,
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

fn partition_path(topic_dir: &Path, partition: u32) -> PathBuf {
    topic_dir.join(format!("{partition}.log"))
}

/// Whether Kafka would accept `name` as a topic name (and so it is safe as a directory name).
fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Creates a topic's directory: empty partition journals, then the topic file (written last,
/// atomically: a directory without it is not a topic).
fn create_topic_files(
    dir: &Path,
    topic: &str,
    partitions: u32,
    retention: Option<Duration>,
) -> Result<Vec<Log>, String> {
    if !valid_topic_name(topic) {
        return Err(format!(
            "invalid topic name {topic:?}: use ASCII letters, digits, '.', '_' and '-' (at most 249)"
        ));
    }
    let topic_dir = dir.join(topic);
    let io = |e: std::io::Error| format!("cannot write its files in {}: {e}", topic_dir.display());
    if topic_dir.exists() {
        std::fs::remove_dir_all(&topic_dir).map_err(io)?; // an unfinished creation
    }
    std::fs::create_dir_all(&topic_dir).map_err(io)?;
    let logs = (0..partitions)
        .map(|p| {
            let journal =
                Journal::create(&partition_path(&topic_dir, p), [start_record(0).as_slice()])?;
            Ok(Log {
                journal: Some(journal),
                ..Log::default()
            })
        })
        .collect::<std::io::Result<Vec<Log>>>()
        .map_err(io)?;
    let description = match retention {
        Some(r) => format!("partitions {partitions}\nretention_ms {}\n", r.as_millis()),
        None => format!("partitions {partitions}\n"),
    };
    let temporary = topic_dir.join("topic.new");
    std::fs::write(&temporary, description).map_err(io)?;
    std::fs::rename(&temporary, topic_dir.join(TOPIC_FILE)).map_err(io)?;
    Ok(logs)
}

fn read_topic_file(path: &Path) -> std::io::Result<(u32, Option<Duration>)> {
    let text = std::fs::read_to_string(path)?;
    let invalid = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a topic description", path.display()),
        )
    };
    let mut partitions = None;
    let mut retention = None;
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("partitions", n)) => partitions = Some(n.parse::<u32>().map_err(|_| invalid())?),
            Some(("retention_ms", ms)) => {
                retention = Some(Duration::from_millis(ms.parse().map_err(|_| invalid())?))
            }
            _ => return Err(invalid()),
        }
    }
    match partitions {
        Some(n) if n > 0 => Ok((n, retention)),
        _ => Err(invalid()),
    }
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

    /// A broker that keeps its topics in `dir` (created if missing), one directory per topic
    /// holding its partition count and retention and a journal per partition: every record is
    /// written there before it is appended (and so before any consumer sees it), and opening
    /// replays them, leaving out records older than their topic's retention. Offsets continue
    /// where they were, so a consumer's checkpoint stays valid across a restart. Topic names
    /// must then be what Kafka allows (ASCII letters, digits, `.`, `_`, `-`).
    pub fn open(dir: &Path) -> std::io::Result<MemoryPubSub> {
        std::fs::create_dir_all(dir)?;
        let mut topics = HashMap::new();
        let mut records = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let topic_dir = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !topic_dir.join(TOPIC_FILE).is_file() {
                // A topic whose creation did not finish (or a stray file): not a topic.
                continue;
            }
            let (partitions, retention) = read_topic_file(&topic_dir.join(TOPIC_FILE))?;
            let logs = (0..partitions)
                .map(|p| Log::open(&partition_path(&topic_dir, p), retention))
                .collect::<std::io::Result<Vec<Log>>>()?;
            records += logs.iter().map(|l| l.records.len()).sum::<usize>();
            topics.insert(
                name,
                Topic {
                    retention,
                    partitions: logs,
                },
            );
        }
        tracing::info!(
            dir = %dir.display(),
            topics = topics.len(),
            records,
            "broker opened from its journals"
        );
        Ok(MemoryPubSub {
            shared: Arc::new(Shared {
                topics: Mutex::new(topics),
                dir: Some(dir.to_path_buf()),
                ..Shared::default()
            }),
        })
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
        let offset = self
            .shared
            .with_log(topic, partition, |log| log.push(key, value))?
            .map_err(|e| PubSubError::Failed {
                context: format!("send to {topic}/{partition}"),
                detail: format!("cannot write the partition's journal: {e}"),
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
                let partitions =
                    match &self.shared.dir {
                        Some(dir) => create_topic_files(dir, topic, partitions, retention)
                            .map_err(|detail| PubSubError::Failed {
                                context: context.clone(),
                                detail,
                            })?,
                        None => (0..partitions).map(|_| Log::default()).collect(),
                    };
                topics.insert(
                    topic.to_string(),
                    Topic {
                        retention,
                        partitions,
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
        {
            let mut topics = self.shared.topics();
            if let (Some(dir), true) = (&self.shared.dir, topics.contains_key(topic)) {
                // The files go first: a topic still listed is never missing its journals.
                std::fs::remove_dir_all(dir.join(topic)).map_err(|e| PubSubError::Failed {
                    context: format!("delete topic {topic}"),
                    detail: format!("cannot remove its journals: {e}"),
                })?;
            }
            topics.remove(topic);
        }
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
