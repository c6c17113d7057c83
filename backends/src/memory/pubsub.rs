//! [`MemoryPubSub`]: Kafka's semantics for what Rialto uses, in one process.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::journal::{frame_bytes, put_bytes, sync_dir, Fields, Journal};
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
    body: Body,
    timestamp_ms: i64,
    appended: Instant,
}

/// Where a record's key and value are: in memory, or (a persistent broker) only in its
/// partition's journal, so the broker's memory holds an index, not the data.
enum Body {
    Memory {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The journal frame at byte `at` with a `size`-byte payload ([`stored_record`]).
    Journal {
        at: u64,
        size: u32,
    },
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
    /// A persistent log's records below this offset are on the disk (the journal synced).
    durable_end: i64,
    /// Which log this is (a topic deleted and created again has a new one), so that a sync
    /// finishing late marks only the log it synced.
    id: u64,
}

fn next_log_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
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

    /// The end of what consumers may read: a persistent log's records once they are on the disk
    /// (so no consumer's checkpoint can be ahead of what a restart after a machine crash finds).
    fn visible_end(&self) -> i64 {
        match self.journal {
            Some(_) => self.durable_end.clamp(self.start, self.end()),
            None => self.end(),
        }
    }

    /// What syncing the journal would make durable, if anything below `upto` is not yet: a
    /// handle on the file, the end it would cover and the log's id.
    fn unsynced(&self, upto: i64) -> std::io::Result<Option<(std::fs::File, i64, u64)>> {
        match &self.journal {
            Some(journal) if self.durable_end < upto.min(self.end()) => {
                Ok(Some((journal.sync_handle()?, self.end(), self.id)))
            }
            _ => Ok(None),
        }
    }

    /// A partition kept in the journal at `path`: its records indexed (their keys and values
    /// stay on disk), those older than `retention` (by their wall-clock timestamps) left out.
    fn open(path: &Path, retention: Option<Duration>) -> std::io::Result<Log> {
        let now_ms = crate::clock::now_ms();
        let now = Instant::now();
        let mut start = 0;
        let mut records = VecDeque::new();
        let mut frames = 0usize;
        let journal = Journal::scan(path, |at, payload| {
            frames += 1;
            let mut f = Fields::new(payload);
            match f.u8()? {
                START => {
                    start = f.i64()?;
                    records.clear();
                }
                RECORD => {
                    let timestamp_ms = f.i64()?;
                    f.bytes()?; // the key: the record must parse
                    let age =
                        Duration::from_millis(now_ms.saturating_sub(timestamp_ms).max(0) as u64);
                    records.push_back(Stored {
                        body: Body::Journal {
                            at,
                            size: payload.len() as u32,
                        },
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
            Ok(())
        })?;
        let mut log = Log {
            start,
            records,
            journal: Some(journal),
            id: next_log_id(),
            ..Log::default()
        };
        log.drop_expired(retention, now);
        log.durable_end = log.end();
        // Every frame but one START and the records kept is on disk for nothing.
        log.expired_on_disk = frames.saturating_sub(1 + log.records.len());
        if log.expired_on_disk >= RETENTION_REWRITE_MIN.max(log.records.len()) {
            log.rewrite()?;
        }
        Ok(log)
    }

    /// Appends a record, written to the journal first when the broker is persistent.
    fn push(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<i64> {
        let timestamp_ms = crate::clock::now_ms();
        let body = match self.journal.as_mut() {
            Some(journal) => {
                let payload = stored_record(timestamp_ms, key, value);
                let at = journal.append(&payload)?;
                Body::Journal {
                    at,
                    size: payload.len() as u32,
                }
            }
            None => Body::Memory {
                key: key.to_vec(),
                value: value.to_vec(),
            },
        };
        self.records.push_back(Stored {
            body,
            timestamp_ms,
            appended: Instant::now(),
        });
        Ok(self.end() - 1)
    }

    /// A record's key and value, read from the journal when they are kept there.
    fn read(&self, record: &Stored) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        match (&record.body, &self.journal) {
            (Body::Memory { key, value }, _) => Ok((key.clone(), value.clone())),
            (Body::Journal { at, size }, Some(journal)) => {
                let mut payload = journal.read(*at, *size as usize)?;
                let mut f = Fields::new(&payload);
                f.u8()?;
                f.i64()?;
                let key = f.bytes()?.to_vec();
                // The value is the payload's tail: it keeps the buffer.
                let value_at = payload.len() - f.rest().len();
                payload.drain(..value_at);
                Ok((key, payload))
            }
            (Body::Journal { .. }, None) => Err(std::io::Error::other(
                "a record kept in a journal of a log without one",
            )),
        }
    }

    /// Rewrites the journal with the records kept now, a record at a time.
    fn rewrite(&mut self) -> std::io::Result<()> {
        let Some(old) = self.journal.as_ref() else {
            return Ok(());
        };
        let path = old.path().to_path_buf();
        let mut placed = Vec::with_capacity(self.records.len());
        let mut at = 0u64;
        let payloads = std::iter::once(Ok(start_record(self.start)))
            .chain(self.records.iter().map(|r| -> std::io::Result<Vec<u8>> {
                let (key, value) = self.read(r)?;
                Ok(stored_record(r.timestamp_ms, &key, &value))
            }))
            .map(|payload: std::io::Result<Vec<u8>>| {
                let payload = payload?;
                placed.push((at, payload.len() as u32));
                at += frame_bytes(payload.len());
                Ok(payload)
            });
        let journal = Journal::create(&path, payloads)?;
        for (record, (at, size)) in self.records.iter_mut().zip(placed.into_iter().skip(1)) {
            record.body = Body::Journal { at, size };
        }
        self.journal = Some(journal);
        self.expired_on_disk = 0;
        self.durable_end = self.end(); // a rewrite is synced
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

impl Shared {
    /// Makes a partition's records below `upto` durable (every record appended so far when
    /// `upto` is past its end). One sync covers everything appended before it, so concurrent
    /// senders and consumers share syncs; the disk is waited for off the async threads.
    async fn make_durable(
        self: &Arc<Self>,
        topic: &str,
        partition: u32,
        upto: i64,
    ) -> Result<(), PubSubError> {
        let pending = self
            .with_log(topic, partition, |log| log.unsynced(upto))?
            .map_err(|e| journal_failed(topic, partition, e))?;
        let Some((file, end, id)) = pending else {
            return Ok(());
        };
        crate::blocking::spawn(move || file.sync_data())
            .await
            .map_err(|e| journal_failed(topic, partition, std::io::Error::other(e)))?
            .map_err(|e| journal_failed(topic, partition, e))?;
        // A topic deleted meanwhile (and perhaps created again) has nothing to mark.
        let _ = self.with_log(topic, partition, |log| {
            if log.id == id {
                log.durable_end = log.durable_end.max(end);
            }
        });
        self.appended.notify_waiters();
        Ok(())
    }
}

fn journal_failed(topic: &str, partition: u32, e: std::io::Error) -> PubSubError {
    PubSubError::Failed {
        context: format!("send to {topic}/{partition}"),
        detail: format!("cannot write the partition's journal: {e}"),
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
            let journal = Journal::create(&partition_path(&topic_dir, p), [Ok(start_record(0))])?;
            Ok(Log {
                journal: Some(journal),
                id: next_log_id(),
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
    sync_dir(&topic_dir)
        .and_then(|()| sync_dir(dir))
        .map_err(io)?;
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
    /// returns its offset. A persistent broker has written it to the journal, not yet synced it
    /// to the disk: consumers see it once it is, and [`PubSub::flush`] waits for that.
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
            .map_err(|e| journal_failed(topic, partition, e))?;
        self.shared.appended.notify_waiters();
        Ok(offset)
    }

    /// Waits until every record appended to a partition so far is on the disk (at once without
    /// a data directory).
    pub async fn sync(&self, topic: &str, partition: u32) -> Result<(), PubSubError> {
        self.shared.make_durable(topic, partition, i64::MAX).await
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

    /// The `(key, value)` records a partition keeps now, in offset order (for tests and
    /// tools: a record whose journal frame cannot be read back is left out with a warning).
    pub fn records(&self, topic: &str, partition: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.shared
            .topics()
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .map(|log| {
                log.records
                    .iter()
                    .filter_map(|r| {
                        log.read(r)
                            .inspect_err(|e| tracing::warn!(%topic, partition, error = %e, "unreadable record"))
                            .ok()
                    })
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
        // Acknowledged once on the disk (at once without a data directory).
        let shared = self.shared.clone();
        let topic = topic.to_string();
        Ok(Box::pin(async move {
            shared.make_durable(&topic, partition, offset + 1).await?;
            Ok(offset)
        }))
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), PubSubError> {
        let partitions: Vec<(String, u32)> = self
            .shared
            .topics()
            .iter()
            .flat_map(|(name, t)| (0..t.partitions.len() as u32).map(|p| (name.clone(), p)))
            .collect();
        for (topic, partition) in partitions {
            match self.shared.make_durable(&topic, partition, i64::MAX).await {
                Ok(()) | Err(PubSubError::UnknownTopic(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
        let (topic, partition) = (&self.topic, self.partition);
        let out = self.shared.with_log(topic, partition, |log| {
            let from = from.max(log.start);
            let visible = (log.visible_end() - from).max(0) as usize;
            log.records
                .iter()
                .skip((from - log.start) as usize)
                .take(max.max(1).min(visible))
                .enumerate()
                .map(|(i, r)| {
                    let offset = from + i as i64;
                    let (key, value) = log.read(r).map_err(|e| PubSubError::Failed {
                        context: format!("fetch {topic}/{partition} at offset {offset}"),
                        detail: format!("cannot read the partition's journal: {e}"),
                    })?;
                    Ok(ConsumedRecord {
                        offset,
                        key: Some(key),
                        value: Some(value),
                    })
                })
                .collect::<Result<Vec<_>, PubSubError>>()
        })??;
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
            self.shared
                .make_durable(&self.topic, self.partition, i64::MAX)
                .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(broker: &MemoryPubSub) -> (i64, i64) {
        broker
            .shared
            .with_log("t", 0, |log| (log.visible_end(), log.end()))
            .unwrap()
    }

    #[tokio::test]
    async fn a_persistent_broker_shows_and_acknowledges_a_record_once_it_is_on_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let b = MemoryPubSub::open(dir.path()).unwrap();
        b.create_topic("t", 1).await.unwrap();
        b.append("t", 0, b"k", b"v").unwrap();
        assert_eq!(ends(&b), (0, 1), "written, not synced: not visible yet");
        let mut c = b.consumer("t", 0, 0).await.unwrap();
        let got = c.poll(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(ends(&b), (1, 1), "the poll synced the journal first");

        let delivery = b.send("t", 0, b"k2", b"v2").await.unwrap();
        assert_eq!(ends(&b), (1, 2));
        assert_eq!(delivery.await.unwrap(), 1);
        assert_eq!(ends(&b), (2, 2), "acknowledged once synced");

        b.append("t", 0, b"k3", b"v3").unwrap();
        b.flush(Duration::from_secs(1)).await.unwrap();
        assert_eq!(ends(&b), (3, 3), "a flush syncs what was appended");

        let m = MemoryPubSub::new();
        m.create_topic("t", 1).await.unwrap();
        m.append("t", 0, b"k", b"v").unwrap();
        assert_eq!(
            ends(&m),
            (1, 1),
            "without a data directory: visible at once"
        );
    }

    #[tokio::test]
    async fn a_persistent_broker_keeps_values_on_disk_and_refuses_one_changed_there() {
        let dir = tempfile::tempdir().unwrap();
        let b = MemoryPubSub::open(dir.path()).unwrap();
        b.create_topic("t", 1).await.unwrap();
        for i in 0..3u8 {
            b.send("t", 0, &[i], &[i; 100])
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let on_disk = b
            .shared
            .with_log("t", 0, |log| {
                log.records
                    .iter()
                    .all(|r| matches!(r.body, Body::Journal { .. }))
            })
            .unwrap();
        assert!(on_disk, "only an index of the records is in memory");

        // A byte of the last value changes on disk.
        let path = dir.path().join("t").join("0.log");
        let mut content = std::fs::read(&path).unwrap();
        let last = content.len() - 1;
        content[last] ^= 1;
        std::fs::write(&path, &content).unwrap();
        let mut c = b.consumer("t", 0, 0).await.unwrap();
        let got = c.poll(2, Duration::from_secs(1)).await.unwrap();
        let values: Vec<_> = got.into_iter().map(|r| r.value.unwrap()).collect();
        assert_eq!(values, [vec![0u8; 100], vec![1u8; 100]]);
        let e = c.poll(10, Duration::from_secs(1)).await.unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        drop(c);
        drop(b);

        // Reopened, the journal ends before the changed record.
        let b = MemoryPubSub::open(dir.path()).unwrap();
        assert_eq!(b.watermarks("t", 0).await.unwrap(), (0, 2));
        assert_eq!(
            b.records("t", 0),
            vec![(vec![0], vec![0u8; 100]), (vec![1], vec![1u8; 100])]
        );
    }
}
