//! The ingestion task of one replica: version topic partition → validated write batches.
//!
//! Life cycle reported to etcd: OFFLINE → BOOTSTRAP (engine open, consumer created) → ONLINE
//! (END_OF_PUSH consumed and applied), or ERROR with a message on any failure.
//!
//! Each poll's validated records go into one write batch together with the new checkpoint
//! (next offset and validation state). On a bad record the records before it are applied with
//! a checkpoint pointing *at* it, nothing from it onward is, and the replica goes to ERROR.
//!
//! After END_OF_PUSH the task waits a little for the producers' END_OF_SEGMENT (which the push
//! job writes right after END_OF_PUSH) so that the last segment's checksum is verified before
//! the replica serves, then reports ONLINE and stops consuming (batch-only versions). The
//! database stays open in the replica's slot for reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rialto_backends::{ConsumedRecord, PartitionConsumer};
use rialto_protocol::envelope::{Envelope, Message};
use rialto_protocol::meta::ReplicaState;
use rialto_protocol::wire::StoredValue;
use tokio::sync::watch;

use crate::node::NodeContext;
use crate::replica::ReplicaSlot;
use crate::store::{ReplicaStore, WriteOp};
use crate::validator::{Checkpoint, Verdict};

/// Most records taken from the consumer per poll (and so per write batch).
pub const POLL_RECORDS_MAX: usize = 1000;
/// Longest wait of one poll.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(200);
/// How often progress is reported while bootstrapping.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How long to wait after END_OF_PUSH for every producer's END_OF_SEGMENT before going ONLINE.
pub const END_OF_SEGMENT_WAIT: Duration = Duration::from_secs(2);
/// Consecutive non-retryable consumer failures tolerated before the replica goes to ERROR.
pub const CONSUMER_FAILURES_MAX: u32 = 20;
/// Pause after a failed poll or consumer creation.
const CONSUMER_RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Why ingestion ended without reaching ONLINE.
enum Ended {
    /// Asked to stop (shutdown, replica dropped).
    Stopped,
    /// The replica is unusable; the message goes into the replica record.
    Failed(String),
}

/// Runs the replica's ingestion until ONLINE, ERROR, or `stop` becomes true (or its sender drops).
pub(crate) async fn run(
    ctx: Arc<NodeContext>,
    slot: Arc<ReplicaSlot>,
    topic: String,
    stop: watch::Receiver<bool>,
) {
    ctx.report(&slot).await; // OFFLINE
    match ingest(&ctx, &slot, &topic, stop).await {
        Ok(()) => {}
        Err(Ended::Stopped) => tracing::info!(replica = %slot.id, "ingestion stopped"),
        Err(Ended::Failed(message)) => {
            tracing::error!(replica = %slot.id, error = %message, "replica in ERROR");
            slot.update(&ctx.metrics, |r| {
                r.state = ReplicaState::Error;
                r.error = Some(message);
            });
            ctx.report(&slot).await;
        }
    }
}

async fn ingest(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    topic: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Ended> {
    let id = &slot.id;
    let path = id.data_path(&ctx.data_dir);
    let store = tokio::task::spawn_blocking(move || ReplicaStore::open(&path))
        .await
        .map_err(|e| Ended::Failed(format!("opening the replica database panicked: {e}")))?
        .map_err(|e| Ended::Failed(format!("cannot open the replica database: {e}")))?;
    let store = Arc::new(store);
    slot.set_store(store.clone());
    let mut checkpoint = store
        .checkpoint()
        .map_err(|e| Ended::Failed(e.to_string()))?
        .unwrap_or_default();
    let consumed_from = checkpoint.next_offset;

    if checkpoint.validation.end_of_push {
        tracing::info!(replica = %id, offset = checkpoint.next_offset, "END_OF_PUSH already ingested; ONLINE");
        go_online(ctx, slot, &checkpoint, consumed_from).await;
        return Ok(());
    }

    let mut consumer = open_consumer(ctx, slot, topic, consumed_from, &mut stop).await?;
    slot.update(&ctx.metrics, |r| {
        r.state = ReplicaState::Bootstrap;
        r.offset = checkpoint.next_offset;
        r.records = checkpoint.records;
        r.consumed_from = consumed_from;
    });
    ctx.report(slot).await;
    tracing::info!(replica = %id, %topic, offset = consumed_from, "bootstrapping");

    let mut last_progress = Instant::now();
    let mut end_of_push_at: Option<Instant> = None;
    let mut poll_failures = 0u32;
    let mut reported_offset = consumed_from;
    loop {
        if let Some(at) = end_of_push_at {
            if checkpoint.validation.all_segments_closed() {
                break;
            }
            if at.elapsed() >= END_OF_SEGMENT_WAIT {
                tracing::warn!(replica = %id, "END_OF_SEGMENT not seen after END_OF_PUSH; going ONLINE without the last segment checksum");
                break;
            }
        }
        let polled = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Err(Ended::Stopped),
            polled = consumer.poll(POLL_RECORDS_MAX, POLL_TIMEOUT) => polled,
        };
        let records = match polled {
            Ok(records) => {
                poll_failures = 0;
                records
            }
            Err(e) => {
                if !e.retryable() {
                    poll_failures += 1;
                    if poll_failures >= CONSUMER_FAILURES_MAX {
                        return Err(Ended::Failed(format!(
                            "cannot consume {topic}/{}: {e}",
                            id.partition
                        )));
                    }
                }
                tracing::warn!(replica = %id, error = %e, "poll failed; retrying");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Err(Ended::Stopped),
                    _ = tokio::time::sleep(CONSUMER_RETRY_BACKOFF) => {}
                }
                continue;
            }
        };
        if records.is_empty() {
            // Idle: still publish progress the last busy poll did not get to report.
            if reported_offset != checkpoint.next_offset
                && last_progress.elapsed() >= PROGRESS_INTERVAL
            {
                last_progress = Instant::now();
                reported_offset = checkpoint.next_offset;
                report_progress(ctx, slot, &checkpoint).await;
            }
            continue;
        }

        let (next, ops, duplicates, failure) =
            validate_batch(&checkpoint, records, topic, id.partition);
        if next != checkpoint {
            let applied = next.records - checkpoint.records;
            let s = store.clone();
            let cp = next.clone();
            tokio::task::spawn_blocking(move || s.apply(&ops, &cp))
                .await
                .map_err(|e| Ended::Failed(format!("writing a batch panicked: {e}")))?
                .map_err(|e| Ended::Failed(format!("cannot write to the replica database: {e}")))?;
            ctx.metrics
                .records_ingested
                .fetch_add(applied, Ordering::Relaxed);
            checkpoint = next;
        }
        ctx.metrics
            .duplicates_skipped
            .fetch_add(duplicates, Ordering::Relaxed);
        if let Some(message) = failure {
            slot.update(&ctx.metrics, |r| {
                r.offset = checkpoint.next_offset;
                r.records = checkpoint.records;
            });
            return Err(Ended::Failed(message));
        }
        if checkpoint.validation.end_of_push && end_of_push_at.is_none() {
            tracing::info!(replica = %id, offset = checkpoint.next_offset, "END_OF_PUSH consumed");
            end_of_push_at = Some(Instant::now());
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            reported_offset = checkpoint.next_offset;
            report_progress(ctx, slot, &checkpoint).await;
        }
    }
    go_online(ctx, slot, &checkpoint, consumed_from).await;
    Ok(())
}

/// Validates one poll's records against `checkpoint`.
///
/// Returns the checkpoint after the last valid record, the writes of the valid data records, the
/// number of duplicates skipped, and the failure message if a record was bad (processing stops
/// there, and the returned checkpoint's offset points at the bad record).
pub(crate) fn validate_batch(
    checkpoint: &Checkpoint,
    records: Vec<ConsumedRecord>,
    topic: &str,
    partition: u32,
) -> (Checkpoint, Vec<WriteOp>, u64, Option<String>) {
    let mut next = checkpoint.clone();
    let mut ops = Vec::with_capacity(records.len());
    let mut duplicates = 0u64;
    for record in records {
        let offset = record.offset;
        let Some(value) = record.value else {
            return (
                next,
                ops,
                duplicates,
                Some(format!(
                    "record without a value at offset {offset} of {topic}/{partition}"
                )),
            );
        };
        let envelope = match Envelope::decode(&value) {
            Ok(e) => e,
            Err(e) => {
                return (
                    next,
                    ops,
                    duplicates,
                    Some(format!(
                        "corrupt record at offset {offset} of {topic}/{partition}: {e}"
                    )),
                )
            }
        };
        match next.validation.check(&envelope) {
            Ok(Verdict::Apply) => {
                next.records += 1;
                match envelope.message {
                    Message::Put {
                        key,
                        schema_id,
                        value,
                    } => ops.push(WriteOp::Put {
                        key,
                        value: StoredValue::encode(schema_id, &value),
                    }),
                    Message::Delete { key } => ops.push(WriteOp::Delete { key }),
                    Message::Control(_) => {}
                }
            }
            Ok(Verdict::Duplicate) => duplicates += 1,
            Ok(Verdict::Control) => {}
            Err(e) => {
                return (
                    next,
                    ops,
                    duplicates,
                    Some(format!(
                        "invalid record at offset {offset} of {topic}/{partition}: {e}"
                    )),
                )
            }
        }
        next.next_offset = offset + 1;
    }
    (next, ops, duplicates, None)
}

/// Publishes the replica's consumed offset and record count while it bootstraps.
async fn report_progress(ctx: &NodeContext, slot: &ReplicaSlot, checkpoint: &Checkpoint) {
    slot.update(&ctx.metrics, |r| {
        r.offset = checkpoint.next_offset;
        r.records = checkpoint.records;
    });
    ctx.report(slot).await;
}

async fn go_online(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    checkpoint: &Checkpoint,
    consumed_from: i64,
) {
    slot.update(&ctx.metrics, |r| {
        r.state = ReplicaState::Online;
        r.offset = checkpoint.next_offset;
        r.records = checkpoint.records;
        r.consumed_from = consumed_from;
        r.error = None;
    });
    tracing::info!(replica = %slot.id, records = checkpoint.records, "ONLINE");
    ctx.report(slot).await;
}

async fn open_consumer(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    topic: &str,
    offset: i64,
    stop: &mut watch::Receiver<bool>,
) -> Result<Box<dyn PartitionConsumer>, Ended> {
    let mut failures = 0u32;
    loop {
        match ctx.pubsub.consumer(topic, slot.id.partition, offset).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if !e.retryable() {
                    failures += 1;
                    if failures >= CONSUMER_FAILURES_MAX {
                        return Err(Ended::Failed(format!(
                            "cannot consume {topic}/{} from offset {offset}: {e}",
                            slot.id.partition
                        )));
                    }
                }
                tracing::warn!(replica = %slot.id, error = %e, "cannot create consumer; retrying");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Err(Ended::Stopped),
                    _ = tokio::time::sleep(CONSUMER_RETRY_BACKOFF) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ServerMetrics;
    use crate::replica::{ReplicaId, ReplicaRegistry};
    use crate::testing::{MemoryMetaStore, MemoryPubSub, PushRecords};
    use rialto_backends::{MetaStore, PubSub};
    use rialto_protocol::meta::{Layout, NodeRecord, ReplicaRecord};

    const TOPIC: &str = "s_v1";

    struct Harness {
        ctx: Arc<NodeContext>,
        meta: MemoryMetaStore,
        pubsub: MemoryPubSub,
        _lease: rialto_backends::LeaseHandle,
        _dir: tempfile::TempDir,
    }

    async fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemoryMetaStore::new();
        let pubsub = MemoryPubSub::new();
        pubsub.create_topic(TOPIC, 1).await.unwrap();
        let ctx = Arc::new(NodeContext {
            node_id: "n1".into(),
            data_dir: dir.path().to_path_buf(),
            layout: Layout::new("/r"),
            meta: Arc::new(meta.clone()),
            pubsub: Arc::new(pubsub.clone()),
            metrics: Arc::new(ServerMetrics::default()),
            registry: ReplicaRegistry::default(),
            node_record: NodeRecord {
                node_id: "n1".into(),
                address: "127.0.0.1:1".into(),
                zone: "z".into(),
                tls: false,
                started_ms: 0,
            },
            lease_ttl_s: 10,
            lease_id: tokio::sync::Mutex::new(0),
        });
        let lease = ctx.register().await.unwrap();
        Harness {
            ctx,
            meta,
            pubsub,
            _lease: lease,
            _dir: dir,
        }
    }

    fn slot(h: &Harness) -> Arc<ReplicaSlot> {
        let id = ReplicaId {
            store: "s".into(),
            version: 1,
            partition: 0,
        };
        let slot = Arc::new(ReplicaSlot::new(id, &h.ctx.metrics));
        h.ctx.registry.insert(slot.clone());
        slot
    }

    async fn run_to_end(h: &Harness, slot: &Arc<ReplicaSlot>) {
        let (_stop, stop_rx) = watch::channel(false);
        tokio::time::timeout(
            Duration::from_secs(20),
            run(h.ctx.clone(), slot.clone(), TOPIC.into(), stop_rx),
        )
        .await
        .expect("ingestion should finish");
    }

    async fn reported(h: &Harness) -> ReplicaRecord {
        let key = h.ctx.layout.replica("s", 1, 0, "n1");
        let kv = h
            .meta
            .get(&key)
            .await
            .unwrap()
            .expect("replica record written");
        serde_json::from_slice(&kv.value).unwrap()
    }

    fn clean_push(n: usize) -> Vec<Vec<u8>> {
        let mut p = PushRecords::start([1; 16]);
        for i in 0..n {
            p.put(format!("k{i}").as_bytes(), 1, format!("v{i}").as_bytes());
        }
        p.delete(b"k0");
        p.finish()
    }

    #[tokio::test]
    async fn clean_push_goes_online_with_data_readable() {
        let h = harness().await;
        let records = clean_push(2500);
        let end = h.pubsub.append_all(TOPIC, 0, records);
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        let r = reported(&h).await;
        assert_eq!(r.state, ReplicaState::Online, "{r:?}");
        assert_eq!(r.offset, end);
        assert_eq!(r.records, 2501);
        assert_eq!(r.consumed_from, 0);
        let store = h.ctx.registry.online("s", 1, 0).unwrap();
        assert_eq!(
            store.get(b"k7").unwrap().as_deref(),
            Some(&StoredValue::encode(1, b"v7")[..])
        );
        assert!(store.get(b"k0").unwrap().is_none(), "deleted key");
        let cp = store.checkpoint().unwrap().unwrap();
        assert!(cp.validation.end_of_push);
        assert_eq!(cp.next_offset, end);
        assert_eq!(h.ctx.metrics.records_ingested.load(Ordering::Relaxed), 2501);
        assert_eq!(h.ctx.metrics.replicas_in(ReplicaState::Online), 1);
    }

    #[tokio::test]
    async fn corrupt_envelope_puts_the_replica_in_error_and_applies_nothing_from_it() {
        let h = harness().await;
        let mut records = clean_push(5);
        // Records: SOS(0) SOP(1) PUT k0(2) PUT k1(3) ...: corrupt offset 3.
        let last = records[3].len() - 1;
        records[3][last] ^= 0xff;
        h.pubsub.append_all(TOPIC, 0, records);
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        let r = reported(&h).await;
        assert_eq!(r.state, ReplicaState::Error);
        let msg = r.error.unwrap();
        assert!(
            msg.contains("corrupt record at offset 3 of s_v1/0"),
            "{msg}"
        );
        assert_eq!(r.offset, 3);
        assert!(
            h.ctx.registry.online("s", 1, 0).is_err(),
            "an ERROR replica never serves"
        );
        // The records before the bad one are applied, with a checkpoint pointing at it.
        let store = slot.take_store().unwrap();
        assert_eq!(store.checkpoint().unwrap().unwrap().next_offset, 3);
        assert!(store.get(b"k0").unwrap().is_some());
        assert!(store.get(b"k1").unwrap().is_none());
    }

    #[tokio::test]
    async fn gap_puts_the_replica_in_error() {
        let h = harness().await;
        let mut records = clean_push(5);
        records.remove(3);
        h.pubsub.append_all(TOPIC, 0, records);
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        let r = reported(&h).await;
        assert_eq!(r.state, ReplicaState::Error);
        assert!(r.error.unwrap().contains("expected sequence 3, got 4"));
    }

    #[tokio::test]
    async fn redelivered_records_are_skipped() {
        let h = harness().await;
        let mut records = clean_push(5);
        let dup = records[3].clone();
        records.insert(4, dup);
        h.pubsub.append_all(TOPIC, 0, records);
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        assert_eq!(reported(&h).await.state, ReplicaState::Online);
        assert_eq!(h.ctx.metrics.duplicates_skipped.load(Ordering::Relaxed), 1);
        assert_eq!(h.ctx.metrics.records_ingested.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn restart_resumes_from_the_checkpoint_and_finished_replicas_do_not_consume() {
        let h = harness().await;
        let records = clean_push(10);
        let (first, rest) = records.split_at(6);
        h.pubsub.append_all(TOPIC, 0, first.to_vec());
        let slot1 = slot(&h);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(h.ctx.clone(), slot1.clone(), TOPIC.into(), stop_rx));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let cp = slot1.take_store().map(|s| {
                let cp = s.checkpoint().unwrap();
                slot1.set_store(s);
                cp
            });
            if matches!(cp, Some(Some(ref c)) if c.next_offset == 6) {
                break;
            }
            assert!(Instant::now() < deadline, "first half not ingested");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(slot1.state(), ReplicaState::Bootstrap);
        drop(slot1.take_store());
        h.ctx.registry.remove(&slot1.id);

        h.pubsub.append_all(TOPIC, 0, rest.to_vec());
        let slot2 = slot(&h);
        run_to_end(&h, &slot2).await;
        let r = reported(&h).await;
        assert_eq!(
            (r.state, r.consumed_from, r.records),
            (ReplicaState::Online, 6, 11)
        );
        drop(slot2.take_store());
        h.ctx.registry.remove(&slot2.id);

        // END_OF_PUSH is checkpointed: a restart goes ONLINE without a consumer (topic deleted).
        h.pubsub.delete_topic(TOPIC).await.unwrap();
        let slot3 = slot(&h);
        run_to_end(&h, &slot3).await;
        assert_eq!(reported(&h).await.state, ReplicaState::Online);
    }

    #[test]
    fn validate_batch_stops_at_the_first_bad_record() {
        let records: Vec<ConsumedRecord> = clean_push(3)
            .into_iter()
            .enumerate()
            .map(|(i, v)| ConsumedRecord {
                offset: 100 + i as i64,
                key: None,
                value: Some(v),
            })
            .collect();
        let mut bad = records.clone();
        bad[4].value = Some(b"garbage".to_vec());
        let (cp, ops, dups, failure) = validate_batch(&Checkpoint::default(), bad, "t", 0);
        assert_eq!(cp.next_offset, 104);
        assert_eq!(ops.len(), 2);
        assert_eq!(cp.records, 2);
        assert_eq!(dups, 0);
        assert!(failure.unwrap().contains("offset 104"));
        let (cp, ops, _, failure) = validate_batch(&Checkpoint::default(), records, "t", 0);
        assert!(failure.is_none());
        assert!(cp.validation.end_of_push && cp.validation.all_segments_closed());
        assert_eq!(ops.len(), 4);
    }
}
