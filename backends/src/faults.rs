//! Fault injection over any backend: wrap a [`MetaStore`] in [`FaultyMetaStore`] and a
//! [`PubSub`] in [`FaultyPubSub`], then flip the switches of their shared [`Faults`].
//!
//! What can go wrong with etcd and Kafka in production, on demand: a store or broker that is
//! unreachable, topic creation refused, calls that take long, watches that end (a lost
//! connection: watchers must re-list), a lease that expires, a broker that stalls (sends that
//! never complete, fetches that return nothing), deliveries that fail. A test also observes
//! every metadata write as it happens ([`Faults::on_put`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::meta::{KeyValue, LeaseHandle, MetaError, MetaStore, WatchEvent, WatchStream};
use crate::pubsub::{ConsumedRecord, Delivery, PartitionConsumer, PubSub, PubSubError};

/// Called with the key and value of every put through a [`FaultyMetaStore`], before the put
/// reaches the store: a test checks what else was true when a record was written.
pub type PutHook = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// The switches shared by the wrappers built on them. Every switch starts off.
pub struct Faults {
    meta_down: AtomicBool,
    broker_down: AtomicBool,
    refuse_topic_creation: AtomicBool,
    fail_deliveries: AtomicBool,
    delay: Mutex<Duration>,
    stalled: watch::Sender<bool>,
    watch_epoch: watch::Sender<u64>,
    put_hook: Mutex<Option<PutHook>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            meta_down: AtomicBool::new(false),
            broker_down: AtomicBool::new(false),
            refuse_topic_creation: AtomicBool::new(false),
            fail_deliveries: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            stalled: watch::channel(false).0,
            watch_epoch: watch::channel(0).0,
            put_hook: Mutex::new(None),
        }
    }
}

impl Faults {
    /// Switches all off.
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Every metadata call fails with `Unavailable` while `down`.
    pub fn set_meta_down(&self, down: bool) {
        self.meta_down.store(down, Ordering::SeqCst);
    }

    /// Every broker call fails with `Unavailable` while `down`.
    pub fn set_broker_down(&self, down: bool) {
        self.broker_down.store(down, Ordering::SeqCst);
    }

    /// Topic creation fails with `Unavailable` while `refuse`.
    pub fn set_refuse_topic_creation(&self, refuse: bool) {
        self.refuse_topic_creation.store(refuse, Ordering::SeqCst);
    }

    /// Records sent while `fail` are lost: their deliveries complete with `Unavailable`.
    pub fn set_fail_deliveries(&self, fail: bool) {
        self.fail_deliveries.store(fail, Ordering::SeqCst);
    }

    /// Every call of either backend first waits `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// While `stalled`, sends do not return (a full producer queue behind a broker that does
    /// not answer) and polls return nothing; both resume when the stall ends.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Ends every watch opened so far through the wrapper, as a lost connection does.
    pub fn end_watches(&self) {
        self.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Calls `hook` on every later put and compare-and-put (see [`PutHook`]).
    pub fn on_put(&self, hook: PutHook) {
        *self.put_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    async fn delay(&self) {
        let delay = *self.delay.lock().unwrap_or_else(|e| e.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    async fn meta(&self, context: &str) -> Result<(), MetaError> {
        self.delay().await;
        if self.meta_down.load(Ordering::SeqCst) {
            return Err(MetaError::Unavailable {
                context: context.to_string(),
                detail: "injected fault: metadata store down".into(),
            });
        }
        Ok(())
    }

    async fn broker(&self, context: &str) -> Result<(), PubSubError> {
        self.delay().await;
        if self.broker_down.load(Ordering::SeqCst) {
            return Err(PubSubError::Unavailable {
                context: context.to_string(),
                detail: "injected fault: broker down".into(),
            });
        }
        Ok(())
    }

    async fn creation(&self, topic: &str) -> Result<(), PubSubError> {
        let context = format!("create topic {topic}");
        self.broker(&context).await?;
        if self.refuse_topic_creation.load(Ordering::SeqCst) {
            return Err(PubSubError::Unavailable {
                context,
                detail: "injected fault: topic creation refused".into(),
            });
        }
        Ok(())
    }

    fn observe_put(&self, key: &str, value: &[u8]) {
        let hook = self
            .put_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(key, value);
        }
    }

    async fn until_unstalled(&self) {
        let mut stalled = self.stalled.subscribe();
        let _ = stalled.wait_for(|s| !*s).await;
    }
}

/// A [`MetaStore`] that fails, slows or ends watches as its [`Faults`] say.
pub struct FaultyMetaStore {
    inner: Arc<dyn MetaStore>,
    faults: Arc<Faults>,
}

impl FaultyMetaStore {
    pub fn new(inner: Arc<dyn MetaStore>, faults: Arc<Faults>) -> FaultyMetaStore {
        FaultyMetaStore { inner, faults }
    }

    /// Makes a lease expire now, whatever its keep-alive does (the store revokes it: its keys
    /// vanish and its holder learns it is lost).
    pub async fn expire_lease(&self, id: i64) -> Result<(), MetaError> {
        self.inner.revoke_lease(id).await
    }
}

struct FaultyWatch {
    inner: Box<dyn WatchStream>,
    epoch: watch::Receiver<u64>,
    prefix: String,
    ended: bool,
}

#[async_trait]
impl WatchStream for FaultyWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, MetaError> {
        if !self.ended {
            tokio::select! {
                biased;
                changed = self.epoch.changed() => {
                    // A dropped switchboard ends nothing; an ended epoch ends this watch.
                    self.ended = changed.is_ok();
                    if !self.ended {
                        return self.inner.next().await;
                    }
                }
                next = self.inner.next() => return next,
            }
        }
        Err(MetaError::WatchEnded(self.prefix.clone()))
    }
}

#[async_trait]
impl MetaStore for FaultyMetaStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        self.faults.meta("get").await?;
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError> {
        self.faults.meta("list").await?;
        self.inner.list(prefix).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        self.faults.meta("put").await?;
        self.faults.observe_put(key, &value);
        self.inner.put(key, value, lease).await
    }

    async fn delete(&self, key: &str) -> Result<(), MetaError> {
        self.faults.meta("delete").await?;
        self.inner.delete(key).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError> {
        self.faults.meta("delete prefix").await?;
        self.inner.delete_prefix(prefix).await
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError> {
        self.faults.meta("compare-and-put").await?;
        self.faults.observe_put(key, &value);
        self.inner
            .compare_and_put(key, expected, value, lease)
            .await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Box<dyn WatchStream>, MetaError> {
        self.faults.meta("watch").await?;
        let mut epoch = self.faults.watch_epoch.subscribe();
        epoch.mark_unchanged();
        let inner = self.inner.watch(prefix, start_revision).await?;
        Ok(Box::new(FaultyWatch {
            inner,
            epoch,
            prefix: prefix.to_string(),
            ended: false,
        }))
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<LeaseHandle, MetaError> {
        self.faults.meta("grant lease").await?;
        self.inner.grant_lease(ttl_s).await
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError> {
        self.faults.meta("revoke lease").await?;
        self.inner.revoke_lease(id).await
    }
}

/// A [`PubSub`] that fails, slows or stalls as its [`Faults`] say.
pub struct FaultyPubSub {
    inner: Arc<dyn PubSub>,
    faults: Arc<Faults>,
}

impl FaultyPubSub {
    pub fn new(inner: Arc<dyn PubSub>, faults: Arc<Faults>) -> FaultyPubSub {
        FaultyPubSub { inner, faults }
    }
}

struct FaultyConsumer {
    inner: Box<dyn PartitionConsumer>,
    faults: Arc<Faults>,
}

#[async_trait]
impl PartitionConsumer for FaultyConsumer {
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>, PubSubError> {
        self.faults.broker("poll").await?;
        if *self.faults.stalled.borrow() {
            tokio::time::sleep(timeout).await;
            return Ok(Vec::new());
        }
        self.inner.poll(max_records, timeout).await
    }
}

#[async_trait]
impl PubSub for FaultyPubSub {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError> {
        self.faults.creation(topic).await?;
        self.inner.create_topic(topic, partitions).await
    }

    async fn create_retained_topic(
        &self,
        topic: &str,
        partitions: u32,
        retention: Duration,
    ) -> Result<(), PubSubError> {
        self.faults.creation(topic).await?;
        self.inner
            .create_retained_topic(topic, partitions, retention)
            .await
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, PubSubError> {
        self.faults.broker("offset for time").await?;
        self.inner
            .offset_for_time(topic, partition, timestamp_ms)
            .await
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError> {
        self.faults.broker("delete topic").await?;
        self.inner.delete_topic(topic).await
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError> {
        self.faults.broker("partition count").await?;
        self.inner.partition_count(topic).await
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        self.faults.broker("watermarks").await?;
        self.inner.watermarks(topic, partition).await
    }

    async fn send(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<Delivery, PubSubError> {
        self.faults.broker("send").await?;
        self.faults.until_unstalled().await;
        if self.faults.fail_deliveries.load(Ordering::SeqCst) {
            let context = format!("deliver to {topic}/{partition}");
            return Ok(Box::pin(async move {
                Err(PubSubError::Unavailable {
                    context,
                    detail: "injected fault: the broker lost the record".into(),
                })
            }));
        }
        self.inner.send(topic, partition, key, value).await
    }

    async fn flush(&self, timeout: Duration) -> Result<(), PubSubError> {
        self.faults.broker("flush").await?;
        self.inner.flush(timeout).await
    }

    async fn consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        self.faults.broker("open consumer").await?;
        let inner = self.inner.consumer(topic, partition, offset).await?;
        Ok(Box::new(FaultyConsumer {
            inner,
            faults: self.faults.clone(),
        }))
    }

    async fn realtime_consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_wait: Duration,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        self.faults.broker("open consumer").await?;
        let inner = self
            .inner
            .realtime_consumer(topic, partition, offset, max_wait)
            .await?;
        Ok(Box::new(FaultyConsumer {
            inner,
            faults: self.faults.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryMetaStore, MemoryPubSub};

    fn wrapped() -> (FaultyMetaStore, FaultyPubSub, MemoryPubSub, Arc<Faults>) {
        let faults = Faults::new();
        let memory = MemoryPubSub::new();
        (
            FaultyMetaStore::new(Arc::new(MemoryMetaStore::new()), faults.clone()),
            FaultyPubSub::new(Arc::new(memory.clone()), faults.clone()),
            memory,
            faults,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_or_broker_that_is_down_fails_every_call_until_it_is_back() {
        let (meta, broker, _, faults) = wrapped();
        faults.set_meta_down(true);
        assert!(matches!(
            meta.get("/k").await,
            Err(MetaError::Unavailable { .. })
        ));
        faults.set_meta_down(false);
        meta.put("/k", vec![], None).await.unwrap();

        faults.set_broker_down(true);
        let e = broker.partition_count("t").await.unwrap_err();
        assert!(e.retryable(), "{e}");
        faults.set_broker_down(false);
        faults.set_refuse_topic_creation(true);
        assert!(broker.create_topic("t", 1).await.is_err());
        faults.set_refuse_topic_creation(false);
        broker.create_topic("t", 1).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn ended_watches_end_and_new_ones_follow() {
        let (meta, _, _, faults) = wrapped();
        let mut w = meta.watch("/k/", 0).await.unwrap();
        faults.end_watches();
        assert!(matches!(w.next().await, Err(MetaError::WatchEnded(_))));
        let mut fresh = meta.watch("/k/", 0).await.unwrap();
        meta.put("/k/a", vec![], None).await.unwrap();
        assert_eq!(fresh.next().await.unwrap().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_takes_its_keys_and_tells_its_holder() {
        let (meta, _, _, _) = wrapped();
        let lease = meta.grant_lease(30).await.unwrap();
        meta.put("/n", vec![], Some(lease.id)).await.unwrap();
        meta.expire_lease(lease.id).await.unwrap();
        assert!(meta.get("/n").await.unwrap().is_none());
        assert!(*lease.lost.borrow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_broker_holds_sends_and_lost_deliveries_store_nothing() {
        let (_, broker, memory, faults) = wrapped();
        broker.create_topic("t", 1).await.unwrap();
        let mut consumer = broker.consumer("t", 0, 0).await.unwrap();
        faults.set_stalled(true);
        let broker = Arc::new(broker);
        let sender = broker.clone();
        let send = tokio::spawn(async move { sender.send("t", 0, b"", b"v").await?.await });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!send.is_finished(), "a stalled broker takes no record");
        assert_eq!(memory.record_count(), 0);
        faults.set_stalled(false);
        assert_eq!(send.await.unwrap().unwrap(), 0);

        faults.set_stalled(true);
        let polled = consumer.poll(10, Duration::from_secs(1)).await.unwrap();
        assert!(polled.is_empty(), "a stalled broker returns nothing");
        faults.set_stalled(false);
        assert_eq!(
            consumer
                .poll(10, Duration::from_secs(1))
                .await
                .unwrap()
                .len(),
            1
        );

        faults.set_fail_deliveries(true);
        let lost = broker.send("t", 0, b"", b"w").await.unwrap();
        assert!(lost.await.is_err());
        assert_eq!(memory.record_count(), 1, "a lost record is not stored");
    }

    #[tokio::test(start_paused = true)]
    async fn a_put_hook_sees_every_write_before_the_store_does() {
        let (meta, _, _, faults) = wrapped();
        let meta = Arc::new(meta);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, store) = (seen.clone(), meta.clone());
        faults.on_put(Arc::new(move |key, value| {
            let stored = futures::FutureExt::now_or_never(store.inner.get(key))
                .unwrap()
                .unwrap();
            log.lock()
                .unwrap()
                .push((key.to_string(), value.to_vec(), stored.is_some()));
        }));
        meta.put("/a", b"1".to_vec(), None).await.unwrap();
        assert!(meta.compare_and_put("/a", None, vec![], None).await.is_ok());
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                ("/a".to_string(), b"1".to_vec(), false),
                ("/a".to_string(), vec![], true)
            ]
        );
    }
}
