//! What the memory backends do beyond the conformance cases: behaviours the real systems show
//! only after minutes or under load (compaction, slow watchers, retention), checked on a paused
//! clock, and a proof that the conformance cases fail a store that breaks them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{MemoryMetaStore, MemoryPubSub, WATCH_QUEUE_REVISIONS};
use crate::meta::{KeyValue, LeaseHandle, MetaError, MetaStore, WatchStream};
use crate::pubsub::{PubSub, PubSubError};

#[tokio::test(start_paused = true)]
async fn a_watch_from_compacted_history_ends_and_a_current_one_follows() {
    let m = MemoryMetaStore::with_history(3);
    for i in 0..6 {
        m.put(&format!("/k/{i}"), vec![], None).await.unwrap();
    }
    let mut old = m.watch("/k/", 2).await.unwrap();
    assert!(matches!(old.next().await, Err(MetaError::WatchEnded(_))));
    let (_, revision) = m.list("/k/").await.unwrap();
    let mut recent = m.watch("/k/", revision - 2).await.unwrap();
    assert_eq!(
        recent.next().await.unwrap().unwrap().len(),
        1,
        "kept history replays"
    );

    m.compact(revision);
    let mut compacted = m.watch("/k/", revision).await.unwrap();
    assert!(matches!(
        compacted.next().await,
        Err(MetaError::WatchEnded(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_falls_behind_is_ended_and_others_go_on() {
    let m = MemoryMetaStore::new();
    let mut slow = m.watch("/k/", 0).await.unwrap();
    let mut other = m.watch("/other/", 0).await.unwrap();
    for i in 0..=WATCH_QUEUE_REVISIONS {
        m.put(&format!("/k/{i}"), vec![], None).await.unwrap();
    }
    m.put("/other/x", vec![], None).await.unwrap();
    assert!(matches!(slow.next().await, Err(MetaError::WatchEnded(_))));
    assert!(
        matches!(slow.next().await, Err(MetaError::WatchEnded(_))),
        "stays ended"
    );
    assert_eq!(other.next().await.unwrap().unwrap().len(), 1);

    m.end_watches();
    assert!(matches!(other.next().await, Err(MetaError::WatchEnded(_))));
}

#[tokio::test(start_paused = true)]
async fn a_lease_expires_one_ttl_after_its_last_keep_alive() {
    let m = MemoryMetaStore::new();
    let lease = m.grant_lease(10).await.unwrap();
    m.put("/n", vec![], Some(lease.id)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(m.value("/n").is_some(), "kept alive for six TTLs");
    let lost = lease.lost.clone();
    drop(lease);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        m.value("/n").is_some(),
        "within the TTL of the last keep-alive"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(m.value("/n").is_none(), "expired");
    assert!(*lost.borrow());
    assert!(m.leases().is_empty());
    assert!(
        m.revoke_lease(1).await.is_err(),
        "an expired lease is unknown"
    );
}

#[tokio::test(start_paused = true)]
async fn a_huge_ttl_or_retention_from_a_caller_does_not_overflow_the_clock() {
    let m = MemoryMetaStore::new();
    let lease = m.grant_lease(i64::MAX).await.unwrap();
    m.put("/k", vec![], Some(lease.id)).await.unwrap();
    let p = MemoryPubSub::new();
    p.create_retained_topic("t", 1, Duration::MAX)
        .await
        .unwrap();
    p.append("t", 0, b"", b"v").unwrap();
    assert_eq!(p.watermarks("t", 0).await.unwrap(), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn deleting_a_prefix_and_expiring_a_lease_are_one_revision_each() {
    let m = MemoryMetaStore::new();
    let lease = m.grant_lease(5).await.unwrap();
    for k in ["/a/1", "/a/2"] {
        m.put(k, vec![], Some(lease.id)).await.unwrap();
    }
    let mut w = m.watch("/a/", 0).await.unwrap();
    let before = m.revision();
    assert!(m.expire_lease(lease.id));
    let events = w.next().await.unwrap().unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(m.revision(), before + 1);
}

#[tokio::test(start_paused = true)]
async fn retention_removes_old_records_and_raises_the_low_watermark() {
    let p = MemoryPubSub::new();
    p.create_retained_topic("rt", 1, Duration::from_secs(10))
        .await
        .unwrap();
    p.append("rt", 0, b"", b"a").unwrap();
    p.append("rt", 0, b"", b"b").unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    p.append("rt", 0, b"", b"c").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(p.watermarks("rt", 0).await.unwrap(), (2, 3));
    let mut c = p.consumer("rt", 0, 0).await.unwrap();
    let got = c.poll(10, Duration::from_millis(1)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].offset, got[0].value.as_deref()),
        (2, Some(&b"c"[..]))
    );
    assert!(
        p.create_retained_topic("rt", 1, Duration::from_secs(60))
            .await
            .is_err(),
        "an existing topic that keeps records for less than asked is refused"
    );
}

#[tokio::test(start_paused = true)]
async fn a_missing_topic_or_partition_is_refused_and_a_deleted_topic_ends_its_consumers() {
    let p = MemoryPubSub::new();
    assert!(matches!(
        p.send("nope", 0, b"", b"v").await,
        Err(PubSubError::UnknownTopic(_))
    ));
    p.create_topic("t", 2).await.unwrap();
    assert!(matches!(
        p.send("t", 2, b"", b"v").await,
        Err(PubSubError::UnknownTopic(_))
    ));
    assert!(p.consumer("nope", 0, 0).await.is_err());
    let mut c = p.consumer("t", 1, 0).await.unwrap();
    assert_eq!(p.open_consumers(), 1);
    let waiting = tokio::spawn(async move { c.poll(10, Duration::from_secs(3600)).await });
    tokio::task::yield_now().await;
    p.delete_topic("t").await.unwrap();
    assert!(matches!(
        waiting.await.unwrap(),
        Err(PubSubError::UnknownTopic(_))
    ));
    assert_eq!(p.open_consumers(), 0);
}

/// A store whose dropped leases never expire (what one of the old test stand-ins did).
struct ImmortalLeases {
    inner: MemoryMetaStore,
    kept: Mutex<Vec<LeaseHandle>>,
}

#[async_trait]
impl MetaStore for ImmortalLeases {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError> {
        self.inner.list(prefix).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<(), MetaError> {
        self.inner.delete(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError> {
        self.inner.delete_prefix(prefix).await
    }
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError> {
        self.inner
            .compare_and_put(key, expected, value, lease)
            .await
    }
    async fn watch(&self, prefix: &str, start: i64) -> Result<Box<dyn WatchStream>, MetaError> {
        self.inner.watch(prefix, start).await
    }
    async fn grant_lease(&self, ttl_s: i64) -> Result<LeaseHandle, MetaError> {
        let real = self.inner.grant_lease(ttl_s).await?;
        let handle = LeaseHandle::new(
            real.id,
            real.lost.clone(),
            tokio::spawn(std::future::pending()),
        );
        self.kept.lock().unwrap().push(real);
        Ok(handle)
    }
    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError> {
        self.inner.revoke_lease(id).await
    }
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "never happened: a dropped lease's key expires")]
async fn the_conformance_cases_fail_a_store_whose_leases_never_expire() {
    let broken = ImmortalLeases {
        inner: MemoryMetaStore::new(),
        kept: Mutex::new(Vec::new()),
    };
    crate::conformance::meta_store(&broken, "/c/").await;
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_store_and_one_broker() {
    let m = MemoryMetaStore::new();
    let shared: Arc<dyn MetaStore> = Arc::new(m.clone());
    shared.put("/x", b"1".to_vec(), None).await.unwrap();
    assert_eq!(m.value("/x").as_deref(), Some(&b"1"[..]));
    let p = MemoryPubSub::new();
    let broker: Arc<dyn PubSub> = Arc::new(p.clone());
    broker.create_topic("t", 1).await.unwrap();
    assert!(p.has_topic("t"));
}

#[tokio::test(start_paused = true)]
async fn a_persistent_meta_store_keeps_its_keys_and_revisions_but_not_leases_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.journal");
    let before = {
        let m = MemoryMetaStore::open(&path).unwrap();
        m.put("/s/a", b"1".to_vec(), None).await.unwrap();
        m.put("/s/b", b"2".to_vec(), None).await.unwrap();
        m.put("/s/a", b"3".to_vec(), None).await.unwrap();
        m.delete("/s/b").await.unwrap();
        m.put("/s/c", vec![0, 255, 7], None).await.unwrap();
        m.delete_prefix("/gone/").await.unwrap();
        let lease = m.grant_lease(60).await.unwrap();
        m.put("/live/node", b"x".to_vec(), Some(lease.id))
            .await
            .unwrap();
        // A key that was persistent and is now bound to a lease goes with the lease.
        m.put("/s/c2", b"p".to_vec(), None).await.unwrap();
        m.put("/s/c2", b"q".to_vec(), Some(lease.id)).await.unwrap();
        let (items, revision) = m.list("/").await.unwrap();
        assert_eq!(items.len(), 4);
        (m.get("/s/a").await.unwrap().unwrap(), revision)
    };

    let m = MemoryMetaStore::open(&path).unwrap();
    let (items, revision) = m.list("/").await.unwrap();
    let keys: Vec<&str> = items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/s/a", "/s/c"],
        "leased keys and deleted keys are gone"
    );
    assert_eq!(items[0], before.0, "value and mod revision kept");
    assert_eq!(items[1].value, vec![0, 255, 7]);
    assert_eq!(revision, before.1, "the revision counter continues");
    m.put("/s/d", vec![], None).await.unwrap();
    assert_eq!(
        m.get("/s/d").await.unwrap().unwrap().mod_revision,
        revision + 1
    );
    let mut old = m.watch("/s/", revision - 1).await.unwrap();
    assert!(
        matches!(old.next().await, Err(MetaError::WatchEnded(_))),
        "history before the reopen is compacted"
    );
    // A compare-and-put against the revision read before the reopen still holds.
    assert!(m
        .compare_and_put("/s/a", Some(before.0.mod_revision), b"4".to_vec(), None)
        .await
        .unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_persistent_meta_store_compacts_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.journal");
    let m = MemoryMetaStore::open(&path).unwrap();
    let value = vec![7u8; 64 << 10];
    for i in 0..400 {
        let mut v = value.clone();
        v[0] = i as u8;
        m.put(&format!("/k/{}", i % 4), v, None).await.unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(
        size < 20 << 20,
        "400 × 64 KiB over 4 keys compacted: {size} bytes"
    );
    let revision = m.revision();
    drop(m);
    let m = MemoryMetaStore::open(&path).unwrap();
    assert_eq!(m.revision(), revision);
    assert_eq!(m.value("/k/3").unwrap()[0], (399 % 256) as u8);
    assert!(std::fs::metadata(&path).unwrap().len() < (4 * (64 << 10) + 4096) as u64);
}

#[tokio::test(start_paused = true)]
async fn a_persistent_broker_keeps_topics_offsets_and_records_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = MemoryPubSub::open(dir.path()).unwrap();
        b.create_topic("v1", 2).await.unwrap();
        b.create_retained_topic("rt", 1, Duration::from_secs(3600))
            .await
            .unwrap();
        b.create_topic("doomed", 1).await.unwrap();
        for i in 0..5u8 {
            b.send("v1", (i % 2) as u32, &[i], &[i; 3])
                .await
                .unwrap()
                .await
                .unwrap();
        }
        b.send("rt", 0, b"k", b"").await.unwrap().await.unwrap();
        b.send("doomed", 0, b"k", b"v")
            .await
            .unwrap()
            .await
            .unwrap();
        b.delete_topic("doomed").await.unwrap();
        let refused = b.create_topic("../escape", 1).await;
        assert!(
            matches!(&refused, Err(PubSubError::Failed { detail, .. }) if detail.contains("invalid topic name")),
            "{refused:?}"
        );
    }

    let b = MemoryPubSub::open(dir.path()).unwrap();
    assert_eq!(b.topic_names(), ["rt", "v1"]);
    assert_eq!(b.partition_count("v1").await.unwrap(), Some(2));
    assert_eq!(b.watermarks("v1", 0).await.unwrap(), (0, 3));
    assert_eq!(
        b.records("v1", 1),
        vec![(vec![1], vec![1; 3]), (vec![3], vec![3; 3])]
    );
    assert_eq!(b.records("rt", 0), vec![(b"k".to_vec(), vec![])]);
    let offset = b.send("v1", 1, b"n", b"new").await.unwrap().await.unwrap();
    assert_eq!(offset, 2, "offsets continue");
    let mut c = b.consumer("v1", 1, 1).await.unwrap();
    let got = c.poll(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [1, 2],
        "a checkpoint from before the reopen resumes in place"
    );
    assert!(
        b.create_retained_topic("rt", 1, Duration::from_secs(7200))
            .await
            .is_err(),
        "the retention was kept"
    );
}

#[tokio::test(start_paused = true)]
async fn a_persistent_broker_drops_expired_records_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let b = MemoryPubSub::open(dir.path()).unwrap();
    b.create_retained_topic("rt", 1, Duration::from_secs(60))
        .await
        .unwrap();
    for i in 0..20_000u32 {
        b.append("rt", 0, b"", &i.to_le_bytes()).unwrap();
    }
    let full = std::fs::metadata(dir.path().join("rt/0.log"))
        .unwrap()
        .len();
    tokio::time::advance(Duration::from_secs(61)).await;
    b.append("rt", 0, b"", b"last").unwrap();
    assert_eq!(b.watermarks("rt", 0).await.unwrap(), (20_000, 20_001));
    let after = std::fs::metadata(dir.path().join("rt/0.log"))
        .unwrap()
        .len();
    assert!(after < full / 100, "{after} of {full} bytes kept");
    drop(b);
    let b = MemoryPubSub::open(dir.path()).unwrap();
    assert_eq!(b.watermarks("rt", 0).await.unwrap(), (20_000, 20_001));
    assert_eq!(b.records("rt", 0), vec![(vec![], b"last".to_vec())]);
}
