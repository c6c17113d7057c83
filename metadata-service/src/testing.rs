//! In-memory [`MetaStore`] and [`PubSub`] for tests: no etcd, no Kafka, deterministic.
//!
//! [`MemoryMetaStore`] keeps etcd's semantics that Rialto relies on: a global revision, per-key
//! mod revisions, compare-and-put on create/mod revision, prefix watches from a past revision
//! (full history kept), and leases whose keys vanish when the lease is revoked, expired with
//! [`MemoryMetaStore::expire_lease`], or its [`LeaseHandle`] dropped (as if its TTL ran out at once).
//! [`MemoryPubSub`] keeps topics as vectors of records and can be told to fail topic creation.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rialto_backends::meta::{WatchEvent, WatchStream};
use rialto_backends::pubsub::Delivery;
use rialto_backends::{
    ConsumedRecord, KeyValue, LeaseHandle, MetaError, MetaStore, PartitionConsumer, PubSub,
    PubSubError,
};
use tokio::sync::{broadcast, watch};

/// Events buffered per watcher before it is told to re-list.
const WATCH_BUFFER_EVENTS: usize = 4096;

struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    lease: Option<i64>,
}

#[derive(Default)]
struct MetaInner {
    revision: i64,
    data: BTreeMap<String, Entry>,
    leases: HashMap<i64, watch::Sender<bool>>,
    next_lease: i64,
    history: Vec<(i64, WatchEvent)>,
}

/// An in-memory etcd stand-in.
pub struct MemoryMetaStore {
    inner: Mutex<MetaInner>,
    events: broadcast::Sender<(i64, WatchEvent)>,
    unavailable: AtomicBool,
    me: Weak<MemoryMetaStore>,
}

impl MemoryMetaStore {
    /// An empty store.
    pub fn new() -> Arc<MemoryMetaStore> {
        Arc::new_cyclic(|me| MemoryMetaStore {
            inner: Mutex::new(MetaInner {
                next_lease: 1,
                ..Default::default()
            }),
            events: broadcast::channel(WATCH_BUFFER_EVENTS).0,
            unavailable: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, MetaInner> {
        // A panic while holding the lock is a test failure already; keep going with the data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every call fail with `Unavailable` (or succeed again).
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
    }

    fn check(&self, context: &str) -> Result<(), MetaError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(MetaError::Unavailable {
                context: context.to_string(),
                detail: "test store is down".into(),
            });
        }
        Ok(())
    }

    fn emit(&self, inner: &mut MetaInner, event: WatchEvent) {
        let rev = inner.revision;
        inner.history.push((rev, event.clone()));
        let _ = self.events.send((rev, event));
    }

    fn put_locked(&self, inner: &mut MetaInner, key: &str, value: Vec<u8>, lease: Option<i64>) {
        inner.revision += 1;
        let rev = inner.revision;
        inner.data.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                mod_revision: rev,
                lease,
            },
        );
        self.emit(
            inner,
            WatchEvent::Put(KeyValue {
                key: key.to_string(),
                value,
                mod_revision: rev,
            }),
        );
    }

    fn delete_locked(&self, inner: &mut MetaInner, keys: Vec<String>) {
        for key in keys {
            if inner.data.remove(&key).is_some() {
                inner.revision += 1;
                let rev = inner.revision;
                self.emit(
                    inner,
                    WatchEvent::Delete {
                        key,
                        mod_revision: rev,
                    },
                );
            }
        }
    }

    /// Expires a lease now: its keys vanish and its handle reports it lost.
    pub fn expire_lease(&self, id: i64) {
        let mut inner = self.lock();
        if let Some(lost) = inner.leases.remove(&id) {
            let _ = lost.send(true);
        }
        let keys: Vec<String> = inner
            .data
            .iter()
            .filter(|(_, e)| e.lease == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        self.delete_locked(&mut inner, keys);
    }

    /// The value of a key, as a string (test convenience).
    pub fn get_string(&self, key: &str) -> Option<String> {
        self.lock()
            .data
            .get(key)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
    }

    /// The lease a key is attached to.
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        self.lock().data.get(key).and_then(|e| e.lease)
    }
}

/// Expires the lease when the keep-alive task is dropped (its handle dropped or aborted).
struct ExpireOnDrop {
    store: Weak<MemoryMetaStore>,
    id: i64,
}

impl Drop for ExpireOnDrop {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            store.expire_lease(self.id);
        }
    }
}

struct MemoryWatch {
    backlog: std::collections::VecDeque<(i64, WatchEvent)>,
    rx: broadcast::Receiver<(i64, WatchEvent)>,
    prefix: String,
    last: i64,
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

#[async_trait]
impl WatchStream for MemoryWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, MetaError> {
        loop {
            let (rev, event) = match self.backlog.pop_front() {
                Some(e) => e,
                None => match self.rx.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Err(MetaError::WatchEnded(self.prefix.clone()))
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(None),
                },
            };
            if rev <= self.last || !event_key(&event).starts_with(&self.prefix) {
                continue;
            }
            self.last = rev;
            return Ok(Some(vec![event]));
        }
    }
}

#[async_trait]
impl MetaStore for MemoryMetaStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        self.check("get")?;
        Ok(self.lock().data.get(key).map(|e| KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError> {
        self.check("list")?;
        let inner = self.lock();
        let items = inner
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| KeyValue {
                key: k.clone(),
                value: e.value.clone(),
                mod_revision: e.mod_revision,
            })
            .collect();
        Ok((items, inner.revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        self.check("put")?;
        let mut inner = self.lock();
        if let Some(l) = lease {
            if !inner.leases.contains_key(&l) {
                return Err(MetaError::Failed {
                    context: format!("put {key}"),
                    detail: format!("lease {l} not found"),
                });
            }
        }
        self.put_locked(&mut inner, key, value, lease);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), MetaError> {
        self.check("delete")?;
        let mut inner = self.lock();
        self.delete_locked(&mut inner, vec![key.to_string()]);
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError> {
        self.check("delete prefix")?;
        let mut inner = self.lock();
        let keys: Vec<String> = inner
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        self.delete_locked(&mut inner, keys);
        Ok(())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError> {
        self.check("compare-and-put")?;
        let mut inner = self.lock();
        let actual = inner.data.get(key).map(|e| e.mod_revision);
        if actual != expected {
            return Ok(false);
        }
        if let Some(l) = lease {
            if !inner.leases.contains_key(&l) {
                return Err(MetaError::Failed {
                    context: format!("put {key}"),
                    detail: format!("lease {l} not found"),
                });
            }
        }
        self.put_locked(&mut inner, key, value, lease);
        Ok(true)
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Box<dyn WatchStream>, MetaError> {
        self.check("watch")?;
        let inner = self.lock();
        // Subscribe under the lock so no event falls between history and live events.
        let rx = self.events.subscribe();
        let backlog = inner
            .history
            .iter()
            .filter(|(rev, _)| *rev >= start_revision)
            .cloned()
            .collect();
        Ok(Box::new(MemoryWatch {
            backlog,
            rx,
            prefix: prefix.to_string(),
            last: start_revision - 1,
        }))
    }

    async fn grant_lease(&self, _ttl_s: i64) -> Result<LeaseHandle, MetaError> {
        self.check("grant lease")?;
        let (tx, lost) = watch::channel(false);
        let id = {
            let mut inner = self.lock();
            let id = inner.next_lease;
            inner.next_lease += 1;
            inner.leases.insert(id, tx);
            id
        };
        let guard = ExpireOnDrop {
            store: self.me.clone(),
            id,
        };
        let task = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        Ok(LeaseHandle::new(id, lost, task))
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError> {
        self.check("revoke lease")?;
        self.expire_lease(id);
        Ok(())
    }
}

/// Topic → partitions → (key, value) records.
type Topics = BTreeMap<String, Vec<Vec<(Vec<u8>, Vec<u8>)>>>;

/// An in-memory pub-sub broker.
#[derive(Default)]
pub struct MemoryPubSub {
    topics: Arc<Mutex<Topics>>,
    deleted: Mutex<Vec<String>>,
    fail_create: AtomicBool,
}

impl MemoryPubSub {
    /// An empty broker.
    pub fn new() -> Arc<MemoryPubSub> {
        Arc::new(MemoryPubSub::default())
    }

    fn topics(&self) -> MutexGuard<'_, Topics> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `create_topic` fail with `Unavailable` (or succeed again).
    pub fn set_fail_create(&self, fail: bool) {
        self.fail_create.store(fail, Ordering::SeqCst);
    }

    /// Names of existing topics.
    pub fn topic_names(&self) -> Vec<String> {
        self.topics().keys().cloned().collect()
    }

    /// Whether a topic exists.
    pub fn has_topic(&self, topic: &str) -> bool {
        self.topics().contains_key(topic)
    }

    /// Every topic deleted so far, in order (repeats included).
    pub fn deleted_topics(&self) -> Vec<String> {
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl PubSub for MemoryPubSub {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError> {
        if self.fail_create.load(Ordering::SeqCst) {
            return Err(PubSubError::Unavailable {
                context: format!("create topic {topic}"),
                detail: "test broker is down".into(),
            });
        }
        let mut topics = self.topics();
        match topics.get(topic) {
            Some(p) if p.len() as u32 == partitions => Ok(()),
            Some(p) => Err(PubSubError::Failed {
                context: format!("create topic {topic}"),
                detail: format!("exists with {} partitions", p.len()),
            }),
            None => {
                topics.insert(topic.to_string(), vec![Vec::new(); partitions as usize]);
                Ok(())
            }
        }
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError> {
        self.topics().remove(topic);
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(topic.to_string());
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError> {
        Ok(self.topics().get(topic).map(|p| p.len() as u32))
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        let topics = self.topics();
        let p = topics
            .get(topic)
            .and_then(|t| t.get(partition as usize))
            .ok_or_else(|| PubSubError::UnknownTopic(topic.to_string()))?;
        Ok((0, p.len() as i64))
    }

    async fn send(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<Delivery, PubSubError> {
        let mut topics = self.topics();
        let p = topics
            .get_mut(topic)
            .and_then(|t| t.get_mut(partition as usize))
            .ok_or_else(|| PubSubError::UnknownTopic(topic.to_string()))?;
        p.push((key.to_vec(), value.to_vec()));
        let offset = p.len() as i64 - 1;
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
        let exists = self
            .topics()
            .get(topic)
            .is_some_and(|t| (partition as usize) < t.len());
        if !exists {
            return Err(PubSubError::UnknownTopic(topic.to_string()));
        }
        Ok(Box::new(MemoryConsumer {
            topics: self.topics.clone(),
            topic: topic.to_string(),
            partition: partition as usize,
            next: offset.max(0) as usize,
        }))
    }
}

/// How often an idle [`MemoryConsumer`] looks for new records.
const CONSUMER_POLL_INTERVAL: Duration = Duration::from_millis(5);

struct MemoryConsumer {
    topics: Arc<Mutex<Topics>>,
    topic: String,
    partition: usize,
    next: usize,
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
            {
                let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
                let p = topics
                    .get(&self.topic)
                    .and_then(|t| t.get(self.partition))
                    .ok_or_else(|| PubSubError::UnknownTopic(self.topic.clone()))?;
                if self.next < p.len() {
                    let end = p.len().min(self.next + max_records.max(1));
                    let out = p[self.next..end]
                        .iter()
                        .enumerate()
                        .map(|(i, (k, v))| ConsumedRecord {
                            offset: (self.next + i) as i64,
                            key: Some(k.clone()),
                            value: Some(v.clone()),
                        })
                        .collect();
                    self.next = end;
                    return Ok(out);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep(CONSUMER_POLL_INTERVAL).await;
        }
    }
}
