//! The behaviours Rialto relies on from its backends, as executable cases.
//!
//! [`meta_store`] and [`pub_sub`] run every case against any implementation; they panic with
//! the failed expectation, like a test. The backends crate runs them on the memory backends (on
//! a paused clock), and the integration tests run them on etcd and the test broker, so the
//! memory backends are held to what the production systems do. A behaviour the code starts to
//! rely on becomes a case here first.
//!
//! Each run works under its own key prefix and topic names, so it can share a cluster with
//! other tests; it removes what it wrote.

use std::future::Future;
use std::time::Duration;

use crate::meta::{MetaStore, WatchEvent, WatchStream};
use crate::pubsub::PubSub;

/// How long a case waits for something a real system does asynchronously (a lease expiring,
/// a topic deletion settling, a record arriving).
const SETTLE: Duration = Duration::from_secs(20);
/// Lease TTL used by the cases: etcd's minimum is about 2 s with its default timing.
const LEASE_TTL_S: i64 = 2;

/// Polls `condition` every 100 ms until it holds; panics with `what` after [`SETTLE`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every metadata-store case, under `prefix` (which must end with `/` and be unused).
pub async fn meta_store(store: &dyn MetaStore, prefix: &str) {
    assert!(prefix.ends_with('/'), "prefix {prefix:?} must end with '/'");
    put_get_list(store, &format!("{prefix}kv/")).await;
    compare_and_put(store, &format!("{prefix}cas/")).await;
    deletes(store, &format!("{prefix}del/")).await;
    watches(store, &format!("{prefix}watch/")).await;
    leases(store, &format!("{prefix}lease/")).await;
    store.delete_prefix(prefix).await.expect("clean up");
}

async fn put_get_list(store: &dyn MetaStore, p: &str) {
    assert!(store.get(&format!("{p}a")).await.unwrap().is_none());
    store
        .put(&format!("{p}b"), b"2".to_vec(), None)
        .await
        .unwrap();
    store
        .put(&format!("{p}a"), b"1".to_vec(), None)
        .await
        .unwrap();
    // A sibling whose name extends the prefix without its slash is not under it.
    let sibling = format!("{}x/a", p.trim_end_matches('/'));
    store.put(&sibling, b"no".to_vec(), None).await.unwrap();

    let a = store
        .get(&format!("{p}a"))
        .await
        .unwrap()
        .expect("a was put");
    let b = store
        .get(&format!("{p}b"))
        .await
        .unwrap()
        .expect("b was put");
    assert_eq!(a.value, b"1");
    assert!(
        a.mod_revision > b.mod_revision,
        "each write gets a higher revision ({} then {})",
        b.mod_revision,
        a.mod_revision
    );
    let (items, revision) = store.list(p).await.unwrap();
    let keys: Vec<&str> = items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [format!("{p}a"), format!("{p}b")],
        "sorted, prefix only"
    );
    assert!(revision >= a.mod_revision, "a listing's revision covers it");
    assert_eq!(items[0], a);

    store
        .put(&format!("{p}a"), b"3".to_vec(), None)
        .await
        .unwrap();
    let a2 = store.get(&format!("{p}a")).await.unwrap().unwrap();
    assert_eq!(a2.value, b"3");
    assert!(a2.mod_revision > revision);
    store.delete(&sibling).await.unwrap();
}

async fn compare_and_put(store: &dyn MetaStore, p: &str) {
    let key = format!("{p}k");
    assert!(store
        .compare_and_put(&key, None, b"first".to_vec(), None)
        .await
        .unwrap());
    assert!(
        !store
            .compare_and_put(&key, None, b"again".to_vec(), None)
            .await
            .unwrap(),
        "create-if-absent fails once the key exists"
    );
    let kv = store.get(&key).await.unwrap().unwrap();
    assert_eq!(kv.value, b"first");
    assert!(store
        .compare_and_put(&key, Some(kv.mod_revision), b"second".to_vec(), None)
        .await
        .unwrap());
    assert!(
        !store
            .compare_and_put(&key, Some(kv.mod_revision), b"stale".to_vec(), None)
            .await
            .unwrap(),
        "a stale revision loses"
    );
    assert_eq!(store.get(&key).await.unwrap().unwrap().value, b"second");
    store.delete(&key).await.unwrap();
    assert!(
        store
            .compare_and_put(&key, None, b"recreated".to_vec(), None)
            .await
            .unwrap(),
        "a deleted key is absent again"
    );
}

async fn deletes(store: &dyn MetaStore, p: &str) {
    for k in ["a/1", "a/2", "b"] {
        store.put(&format!("{p}{k}"), vec![], None).await.unwrap();
    }
    store.delete(&format!("{p}missing")).await.unwrap();
    store.delete_prefix(&format!("{p}a/")).await.unwrap();
    let (items, _) = store.list(p).await.unwrap();
    let keys: Vec<&str> = items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, [format!("{p}b")]);
    store.delete(&format!("{p}b")).await.unwrap();
    assert!(store.list(p).await.unwrap().0.is_empty());
}

/// The next events of a watch, flattened, until `n` arrived.
async fn next_events(watch: &mut Box<dyn WatchStream>, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(SETTLE, watch.next()).await {
            Ok(Ok(Some(events))) => out.extend(events),
            Ok(Ok(None)) => panic!("watch ended after {out:?}"),
            Ok(Err(e)) => panic!("watch failed after {out:?}: {e}"),
            Err(_) => panic!("watch gave only {out:?}, wanted {n} events"),
        }
    }
    out
}

async fn watches(store: &dyn MetaStore, p: &str) {
    store
        .put(&format!("{p}before"), b"0".to_vec(), None)
        .await
        .unwrap();
    let (_, listed) = store.list(p).await.unwrap();
    let mut w = store.watch(p, listed + 1).await.unwrap();
    let outside = format!("{}x/k", p.trim_end_matches('/'));
    store.put(&outside, b"no".to_vec(), None).await.unwrap();
    store
        .put(&format!("{p}a"), b"1".to_vec(), None)
        .await
        .unwrap();
    store
        .put(&format!("{p}b"), b"2".to_vec(), None)
        .await
        .unwrap();
    store.delete(&format!("{p}a")).await.unwrap();
    let events = next_events(&mut w, 3).await;
    let Some(WatchEvent::Put(a)) = events.first() else {
        panic!("first event is the put of a, not {events:?}")
    };
    assert_eq!(
        (a.key.as_str(), a.value.as_slice()),
        (&*format!("{p}a"), &b"1"[..])
    );
    assert!(
        a.mod_revision > listed,
        "the watch starts after the listing"
    );
    assert!(
        matches!(&events[1], WatchEvent::Put(b) if b.key == format!("{p}b") && b.mod_revision > a.mod_revision)
    );
    let deleted_at = match &events[2] {
        WatchEvent::Delete { key, mod_revision } if *key == format!("{p}a") => *mod_revision,
        other => panic!("third event is the delete of a, not {other:?}"),
    };
    assert!(events.len() == 3, "nothing outside the prefix: {events:?}");

    // A watch from a past revision replays what happened since.
    let mut replay = store.watch(p, a.mod_revision).await.unwrap();
    let events = next_events(&mut replay, 3).await;
    assert!(matches!(&events[0], WatchEvent::Put(kv) if kv.mod_revision == a.mod_revision));
    assert!(
        matches!(&events[2], WatchEvent::Delete { mod_revision, .. } if *mod_revision == deleted_at)
    );
    store.delete(&outside).await.unwrap();
}

async fn leases(store: &dyn MetaStore, p: &str) {
    // Kept alive while the handle lives, well past its TTL.
    let lease = store.grant_lease(LEASE_TTL_S).await.unwrap();
    let held = format!("{p}held");
    store
        .put(&held, b"x".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let (_, listed) = store.list(p).await.unwrap();
    let mut w = store.watch(p, listed + 1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3 * LEASE_TTL_S as u64)).await;
    assert!(store.get(&held).await.unwrap().is_some(), "kept alive");
    assert!(!*lease.lost.borrow(), "not lost while kept alive");

    // Dropped: the key stays until the TTL runs out, then goes, seen by watchers.
    drop(lease);
    assert!(
        store.get(&held).await.unwrap().is_some(),
        "a dropped lease lives until its TTL"
    );
    eventually("a dropped lease's key expires", || async {
        store.get(&held).await.unwrap().is_none()
    })
    .await;
    let events = next_events(&mut w, 1).await;
    assert!(matches!(&events[0], WatchEvent::Delete { key, .. } if *key == held));

    // Revoked: the key goes at once and the holder learns the lease is lost.
    let lease = store.grant_lease(LEASE_TTL_S).await.unwrap();
    let revoked = format!("{p}revoked");
    store.put(&revoked, vec![], Some(lease.id)).await.unwrap();
    assert!(store
        .compare_and_put(&format!("{p}cas"), None, vec![], Some(lease.id))
        .await
        .unwrap());
    store.revoke_lease(lease.id).await.unwrap();
    assert!(store.get(&revoked).await.unwrap().is_none());
    assert!(store.get(&format!("{p}cas")).await.unwrap().is_none());
    let mut lost = lease.lost.clone();
    tokio::time::timeout(SETTLE, lost.wait_for(|l| *l))
        .await
        .expect("the holder of a revoked lease learns it is lost")
        .ok();
    assert!(
        store
            .put(&format!("{p}late"), vec![], Some(lease.id))
            .await
            .is_err(),
        "a put under a revoked lease fails"
    );
    assert!(store.get(&format!("{p}late")).await.unwrap().is_none());
}

/// Where a broker is known to differ from Kafka in a way Rialto tolerates: the cases then check
/// the weaker promise Rialto's code relies on.
#[derive(Debug, Clone, Copy)]
pub struct BrokerDivergence {
    /// `offset_for_time` may answer an earlier offset than Kafka would (tansu 0.6 answers a
    /// time later than every record with the partition's start, not its end). Rialto then
    /// replays more of a real-time topic than its rewind asks for, which is correct but slower;
    /// the case only checks the answer is a valid offset no later than Kafka's.
    pub offset_for_time_may_be_earlier: bool,
}

impl BrokerDivergence {
    /// Kafka's behaviour, all of it.
    pub const NONE: BrokerDivergence = BrokerDivergence {
        offset_for_time_may_be_earlier: false,
    };
}

/// Every pub-sub case, on topics named `<prefix>…` (unused names).
pub async fn pub_sub(broker: &dyn PubSub, prefix: &str, divergence: BrokerDivergence) {
    topics(broker, &format!("{prefix}topics")).await;
    produce_consume(broker, &format!("{prefix}records"), divergence).await;
}

async fn topics(broker: &dyn PubSub, topic: &str) {
    assert_eq!(broker.partition_count(topic).await.unwrap(), None);
    broker.create_topic(topic, 3).await.unwrap();
    assert_eq!(broker.partition_count(topic).await.unwrap(), Some(3));
    broker
        .create_topic(topic, 3)
        .await
        .expect("creating a topic again with the same partitions succeeds");
    assert!(
        broker.create_topic(topic, 4).await.is_err(),
        "a topic's partition count is fixed"
    );
    assert_eq!(broker.watermarks(topic, 2).await.unwrap(), (0, 0));
    broker.delete_topic(topic).await.unwrap();
    eventually("a deleted topic is gone", || async {
        broker.partition_count(topic).await.unwrap().is_none()
    })
    .await;
    broker
        .delete_topic(topic)
        .await
        .expect("deleting a missing topic succeeds");
}

async fn produce_consume(broker: &dyn PubSub, topic: &str, divergence: BrokerDivergence) {
    broker.create_topic(topic, 2).await.unwrap();
    // The clock the memory broker stamps records with; the system time on a running clock.
    let before_ms = crate::clock::now_ms() - 1;
    // Interleaved sends to two partitions: each partition's offsets follow its send order.
    let mut deliveries = Vec::new();
    for i in 0..15u32 {
        let partition = u32::from(i % 3 == 2);
        let value = format!("value-{i}").into_bytes();
        let d = broker
            .send(topic, partition, &i.to_be_bytes(), &value)
            .await
            .unwrap();
        deliveries.push((partition, i, d));
    }
    let mut next = [0i64; 2];
    for (partition, i, d) in deliveries {
        let offset = d
            .await
            .unwrap_or_else(|e| panic!("record {i} delivered: {e}"));
        assert_eq!(offset, next[partition as usize], "record {i} offset");
        next[partition as usize] += 1;
    }
    assert_eq!(next, [10, 5]);
    broker.flush(SETTLE).await.unwrap();
    assert_eq!(broker.watermarks(topic, 0).await.unwrap(), (0, 10));
    assert_eq!(broker.watermarks(topic, 1).await.unwrap(), (0, 5));

    // From the start: everything, in order, keys and values as sent.
    let mut c = broker.consumer(topic, 0, 0).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while got.len() < 10 && tokio::time::Instant::now() < deadline {
        got.extend(c.poll(4, Duration::from_millis(500)).await.unwrap());
    }
    let expected: Vec<u32> = (0..15).filter(|i| i % 3 != 2).collect();
    assert_eq!(got.len(), 10, "all of partition 0: {got:?}");
    for (n, (r, i)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(r.offset, n as i64);
        assert_eq!(r.key.as_deref(), Some(&i.to_be_bytes()[..]));
        assert_eq!(r.value.as_deref(), Some(format!("value-{i}").as_bytes()));
    }

    // From an offset: only what follows it; then nothing; then what is sent later.
    let mut c = broker.consumer(topic, 1, 3).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while got.len() < 2 && tokio::time::Instant::now() < deadline {
        got.extend(c.poll(100, Duration::from_millis(500)).await.unwrap());
    }
    let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [3, 4]);
    assert!(c
        .poll(100, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    let later = broker.send(topic, 1, b"k", b"later").await.unwrap();
    assert_eq!(later.await.unwrap(), 5);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while got.is_empty() && tokio::time::Instant::now() < deadline {
        got = c.poll(100, Duration::from_millis(500)).await.unwrap();
    }
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].offset, got[0].value.as_deref()),
        (5, Some(&b"later"[..]))
    );

    // By time: the first record at or after a time; the end when none is that recent.
    let by_time = |at_ms: i64, kafka: i64| async move {
        let Some(found) = broker.offset_for_time(topic, 0, at_ms).await.unwrap() else {
            return; // the broker cannot tell; the caller falls back
        };
        if divergence.offset_for_time_may_be_earlier {
            assert!(
                (0..=kafka).contains(&found),
                "offset {found} for time {at_ms}"
            );
        } else {
            assert_eq!(found, kafka, "offset for time {at_ms}");
        }
    };
    by_time(before_ms, 0).await;
    by_time(before_ms + 3_600_000, 10).await;

    broker.delete_topic(topic).await.unwrap();
}

#[cfg(test)]
mod tests {
    use crate::memory::{MemoryMetaStore, MemoryPubSub};

    #[tokio::test(start_paused = true)]
    async fn memory_meta_store_conforms() {
        super::meta_store(&MemoryMetaStore::new(), "/conformance/").await;
    }

    #[tokio::test(start_paused = true)]
    async fn memory_pub_sub_conforms() {
        super::pub_sub(
            &MemoryPubSub::new(),
            "conformance-",
            super::BrokerDivergence::NONE,
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn persistent_memory_backends_conform() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemoryMetaStore::open(&dir.path().join("meta")).unwrap();
        super::meta_store(&meta, "/conformance/").await;
        let broker = MemoryPubSub::open(&dir.path().join("topics")).unwrap();
        super::pub_sub(&broker, "conformance-", super::BrokerDivergence::NONE).await;
    }
}
