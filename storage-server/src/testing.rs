//! In-memory fakes of the backend traits, and a builder of version-topic records, for tests.
//!
//! Always compiled (small, no extra dependencies) so that other crates' tests can start a
//! storage server without etcd or Kafka:
//!
//! * [`MemoryMetaStore`]: revisions, prefix watches (with history replay from a revision),
//!   leases (with [`MemoryMetaStore::expire_lease`] to simulate a lost lease).
//! * [`MemoryPubSub`]: topics as in-memory logs; consumers wait for new records.
//! * [`PushRecords`]: builds the records of a well-formed push (SOS, SOP, data, EOP, EOS).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rialto_backends::meta::{WatchEvent, WatchStream};
use rialto_backends::pubsub::Delivery;
use rialto_backends::{
    ConsumedRecord, KeyValue, LeaseHandle, MetaError, MetaStore, PartitionConsumer, PubSub,
    PubSubError,
};
use rialto_protocol::envelope::{
    CompressionCodec, ControlMessage, Envelope, Message, ProducerMetadata, SegmentChecksum,
};
use tokio::sync::{mpsc, watch, Notify};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Called with the key and value of every put, synchronously, before watchers see it: a test
/// checks what else was true when a record was written.
pub type PutHook = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

#[derive(Default)]
struct MetaState {
    put_hook: Option<PutHook>,
    revision: i64,
    /// key → (value, mod revision, lease)
    data: BTreeMap<String, (Vec<u8>, i64, Option<i64>)>,
    history: Vec<(i64, WatchEvent)>,
    watchers: Vec<(String, mpsc::UnboundedSender<Vec<WatchEvent>>)>,
    leases: HashMap<i64, watch::Sender<bool>>,
    next_lease: i64,
}

impl MetaState {
    fn emit(&mut self, event: WatchEvent) {
        let key = match &event {
            WatchEvent::Put(kv) => kv.key.clone(),
            WatchEvent::Delete { key, .. } => key.clone(),
        };
        self.history.push((self.revision, event.clone()));
        self.watchers.retain(|(prefix, tx)| {
            !key.starts_with(prefix.as_str()) || tx.send(vec![event.clone()]).is_ok()
        });
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<i64>) {
        if let Some(hook) = &self.put_hook {
            hook(key, &value);
        }
        self.revision += 1;
        let rev = self.revision;
        self.data
            .insert(key.to_string(), (value.clone(), rev, lease));
        self.emit(WatchEvent::Put(KeyValue {
            key: key.to_string(),
            value,
            mod_revision: rev,
        }));
    }

    fn delete(&mut self, key: &str) {
        if self.data.remove(key).is_some() {
            self.revision += 1;
            let rev = self.revision;
            self.emit(WatchEvent::Delete {
                key: key.to_string(),
                mod_revision: rev,
            });
        }
    }

    fn drop_lease(&mut self, id: i64) {
        if let Some(tx) = self.leases.remove(&id) {
            let _ = tx.send(true);
        }
        let keys: Vec<String> = self
            .data
            .iter()
            .filter(|(_, (_, _, l))| *l == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.delete(&k);
        }
    }
}

/// An in-memory [`MetaStore`] with etcd's semantics for what Rialto uses.
#[derive(Clone, Default)]
pub struct MemoryMetaStore {
    state: Arc<Mutex<MetaState>>,
}

impl MemoryMetaStore {
    /// An empty store.
    pub fn new() -> MemoryMetaStore {
        MemoryMetaStore::default()
    }

    /// Simulates a lost lease: its keys are deleted and its handle reports `lost`.
    pub fn expire_lease(&self, id: i64) {
        lock(&self.state).drop_lease(id);
    }

    /// Ids of the live leases.
    pub fn leases(&self) -> Vec<i64> {
        lock(&self.state).leases.keys().copied().collect()
    }

    /// The lease a key is attached to.
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        lock(&self.state).data.get(key).and_then(|(_, _, l)| *l)
    }

    /// The value of a key, without going through the async trait.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.state).data.get(key).map(|(v, _, _)| v.clone())
    }

    /// Calls `hook` on every later put (see [`PutHook`]).
    pub fn on_put(&self, hook: PutHook) {
        lock(&self.state).put_hook = Some(hook);
    }
}

struct MemoryWatch {
    rx: mpsc::UnboundedReceiver<Vec<WatchEvent>>,
}

#[async_trait]
impl WatchStream for MemoryWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, MetaError> {
        Ok(self.rx.recv().await)
    }
}

#[async_trait]
impl MetaStore for MemoryMetaStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        Ok(lock(&self.state).data.get(key).map(|(v, rev, _)| KeyValue {
            key: key.to_string(),
            value: v.clone(),
            mod_revision: *rev,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError> {
        let s = lock(&self.state);
        let items = s
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, rev, _))| KeyValue {
                key: k.clone(),
                value: v.clone(),
                mod_revision: *rev,
            })
            .collect();
        Ok((items, s.revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        let mut s = lock(&self.state);
        if let Some(id) = lease {
            if !s.leases.contains_key(&id) {
                return Err(MetaError::Failed {
                    context: format!("put {key}"),
                    detail: format!("lease {id} not found"),
                });
            }
        }
        s.put(key, value, lease);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), MetaError> {
        lock(&self.state).delete(key);
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError> {
        let mut s = lock(&self.state);
        let keys: Vec<String> = s
            .data
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for k in keys {
            s.delete(&k);
        }
        Ok(())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError> {
        let mut s = lock(&self.state);
        let current = s.data.get(key).map(|(_, rev, _)| *rev);
        if current != expected {
            return Ok(false);
        }
        if let Some(id) = lease {
            if !s.leases.contains_key(&id) {
                return Err(MetaError::Failed {
                    context: format!("put {key}"),
                    detail: format!("lease {id} not found"),
                });
            }
        }
        s.put(key, value, lease);
        Ok(true)
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Box<dyn WatchStream>, MetaError> {
        let mut s = lock(&self.state);
        let (tx, rx) = mpsc::unbounded_channel();
        let replay: Vec<WatchEvent> = s
            .history
            .iter()
            .filter(|(rev, e)| {
                *rev >= start_revision
                    && match e {
                        WatchEvent::Put(kv) => kv.key.starts_with(prefix),
                        WatchEvent::Delete { key, .. } => key.starts_with(prefix),
                    }
            })
            .map(|(_, e)| e.clone())
            .collect();
        if !replay.is_empty() {
            let _ = tx.send(replay);
        }
        s.watchers.push((prefix.to_string(), tx));
        Ok(Box::new(MemoryWatch { rx }))
    }

    async fn grant_lease(&self, _ttl_s: i64) -> Result<LeaseHandle, MetaError> {
        let mut s = lock(&self.state);
        s.next_lease += 1;
        let id = s.next_lease;
        let (tx, rx) = watch::channel(false);
        s.leases.insert(id, tx);
        // The fake needs no keep-alive; the task only gives the handle something to abort.
        let task = tokio::spawn(std::future::pending::<()>());
        Ok(LeaseHandle::new(id, rx, task))
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError> {
        lock(&self.state).drop_lease(id);
        Ok(())
    }
}

#[derive(Default)]
struct Topic {
    partitions: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
}

#[derive(Default)]
struct PubSubState {
    topics: HashMap<String, Topic>,
}

/// An in-memory [`PubSub`]: each partition is a vector of (key, value) records.
#[derive(Clone, Default)]
pub struct MemoryPubSub {
    state: Arc<Mutex<PubSubState>>,
    appended: Arc<Notify>,
    open_consumers: Arc<AtomicUsize>,
}

impl MemoryPubSub {
    /// An empty broker.
    pub fn new() -> MemoryPubSub {
        MemoryPubSub::default()
    }

    /// Consumers created and not dropped yet.
    pub fn open_consumers(&self) -> usize {
        self.open_consumers.load(Ordering::SeqCst)
    }

    /// Appends a record (creating the topic with enough partitions if needed); returns its offset.
    pub fn append(&self, topic: &str, partition: u32, key: &[u8], value: Vec<u8>) -> i64 {
        let offset = {
            let mut s = lock(&self.state);
            let t = s.topics.entry(topic.to_string()).or_default();
            while t.partitions.len() <= partition as usize {
                t.partitions.push(Vec::new());
            }
            let p = &mut t.partitions[partition as usize];
            p.push((key.to_vec(), value));
            p.len() as i64 - 1
        };
        self.appended.notify_waiters();
        offset
    }

    /// Appends every value in order; returns the offset after the last.
    pub fn append_all(
        &self,
        topic: &str,
        partition: u32,
        values: impl IntoIterator<Item = Vec<u8>>,
    ) -> i64 {
        let mut next = 0;
        for v in values {
            next = self.append(topic, partition, b"", v) + 1;
        }
        next
    }

    /// Records in a partition.
    pub fn len(&self, topic: &str, partition: u32) -> usize {
        lock(&self.state)
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .map_or(0, Vec::len)
    }

    /// Whether the partition holds no record.
    pub fn is_empty(&self, topic: &str, partition: u32) -> bool {
        self.len(topic, partition) == 0
    }
}

#[async_trait]
impl PubSub for MemoryPubSub {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError> {
        let mut s = lock(&self.state);
        let t = s.topics.entry(topic.to_string()).or_default();
        while t.partitions.len() < partitions as usize {
            t.partitions.push(Vec::new());
        }
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError> {
        lock(&self.state).topics.remove(topic);
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError> {
        Ok(lock(&self.state)
            .topics
            .get(topic)
            .map(|t| t.partitions.len() as u32))
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        let s = lock(&self.state);
        let t = s
            .topics
            .get(topic)
            .ok_or_else(|| PubSubError::UnknownTopic(topic.to_string()))?;
        Ok((
            0,
            t.partitions
                .get(partition as usize)
                .map_or(0, |p| p.len() as i64),
        ))
    }

    async fn send(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<Delivery, PubSubError> {
        let offset = self.append(topic, partition, key, value.to_vec());
        Ok(Box::pin(async move { Ok(offset) }))
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), PubSubError> {
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        if !lock(&self.state).topics.contains_key(topic) {
            return Err(PubSubError::UnknownTopic(topic.to_string()));
        }
        self.open_consumers.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(MemoryConsumer {
            pubsub: self.clone(),
            topic: topic.to_string(),
            partition,
            next: offset.max(0),
        }))
    }
}

struct MemoryConsumer {
    pubsub: MemoryPubSub,
    topic: String,
    partition: u32,
    next: i64,
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.pubsub.open_consumers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemoryConsumer {
    fn take(&mut self, max_records: usize) -> Vec<ConsumedRecord> {
        let s = lock(&self.pubsub.state);
        let Some(p) = s
            .topics
            .get(&self.topic)
            .and_then(|t| t.partitions.get(self.partition as usize))
        else {
            return Vec::new();
        };
        let start = self.next as usize;
        let out: Vec<ConsumedRecord> = p
            .iter()
            .enumerate()
            .skip(start)
            .take(max_records)
            .map(|(i, (k, v))| ConsumedRecord {
                offset: i as i64,
                key: Some(k.clone()),
                value: Some(v.clone()),
            })
            .collect();
        self.next += out.len() as i64;
        out
    }
}

#[async_trait]
impl PartitionConsumer for MemoryConsumer {
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>, PubSubError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let appended = self.pubsub.appended.clone();
            let notified = appended.notified();
            let out = self.take(max_records);
            if !out.is_empty() {
                return Ok(out);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }
}

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
    serde_json::from_slice(&kv.value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn meta_watch_replays_and_follows_and_leases_expire() {
        let m = MemoryMetaStore::new();
        m.put("/a/1", b"x".to_vec(), None).await.unwrap();
        let (_, rev) = m.list("/a/").await.unwrap();
        let mut w = m.watch("/a/", rev).await.unwrap();
        let lease = m.grant_lease(10).await.unwrap();
        m.put("/a/2", b"y".to_vec(), Some(lease.id)).await.unwrap();
        let events = w.next().await.unwrap().unwrap();
        assert!(
            matches!(&events[0], WatchEvent::Put(kv) if kv.key == "/a/1"),
            "replayed from rev {rev}"
        );
        let events = w.next().await.unwrap().unwrap();
        assert!(matches!(&events[0], WatchEvent::Put(kv) if kv.key == "/a/2"));
        m.expire_lease(lease.id);
        assert!(*lease.lost.borrow());
        assert!(m.get("/a/2").await.unwrap().is_none());
        assert!(m.put("/a/3", vec![], Some(lease.id)).await.is_err());
    }

    #[tokio::test]
    async fn consumer_reads_from_offset_and_waits_for_new_records() {
        let p = MemoryPubSub::new();
        p.append_all("t", 0, vec![b"a".to_vec(), b"b".to_vec()]);
        let mut c = p.consumer("t", 0, 1).await.unwrap();
        let got = c.poll(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].offset, 1);
        assert!(c
            .poll(10, Duration::from_millis(10))
            .await
            .unwrap()
            .is_empty());
        let p2 = p.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            p2.append("t", 0, b"", b"c".to_vec());
        });
        let got = c.poll(10, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got[0].value.as_deref(), Some(&b"c"[..]));
    }
}
