//! The ingestion task of one replica: version topic partition → validated writes.
//!
//! Life cycle reported to etcd: OFFLINE → BOOTSTRAP (engine open, consumer created) → ONLINE
//! (END_OF_PUSH consumed and applied), or ERROR with a message on any failure.
//!
//! Each poll's valid records are written with the checkpoint that follows them (next offset and
//! validation state). On a bad record the records before it are written with a checkpoint
//! pointing *at* it, nothing from it onward is, and the replica goes to ERROR.
//!
//! What a poll's records may be is decided by `validate_batch` (`ingest/validate.rs`, pure);
//! where the valid ones go by the push's write path, write batches or SST chunks
//! (`ingest/writes.rs`). Either way the progress reported is a checkpoint in the database. A
//! sorted push whose keys are not strictly ascending sends the replica to ERROR.
//!
//! After END_OF_PUSH the task waits a little for the producers' END_OF_SEGMENT (which the push
//! job writes right after END_OF_PUSH) so that the last segment's checksum is verified before
//! the replica serves, then seals the database (flush, compaction for unsorted pushes, reopen
//! read-only), warms its files into memory, and reports ONLINE with its disk and memory bytes.
//! It stops consuming there (batch-only versions). The database stays in the replica's slot
//! for reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use rialto_backends::PartitionConsumer;
use rialto_protocol::meta::{realtime_topic, ReplicaState, StorageProfile};
use rialto_security::signing::WriterSecret;
use tokio::sync::watch;

use crate::node::NodeContext;
use crate::replica::ReplicaPlan;
use crate::replica::ReplicaSlot;
use crate::store::{Layout, ReplicaStore};
use crate::validator::Checkpoint;

mod validate;
mod writes;

pub(crate) use validate::{validate_batch, Hybrid, Rules};
use writes::{ingests_sst_files, Writes};

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
    plan: ReplicaPlan,
    stop: watch::Receiver<bool>,
    follow: watch::Receiver<bool>,
) {
    ctx.report(&slot).await; // OFFLINE
    match ingest(&ctx, &slot, &plan, stop, follow).await {
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
    ctx: &Arc<NodeContext>,
    slot: &Arc<ReplicaSlot>,
    plan: &ReplicaPlan,
    mut stop: watch::Receiver<bool>,
    follow: watch::Receiver<bool>,
) -> Result<(), Ended> {
    let id = &slot.id;
    let topic = plan.topic.as_str();
    let path = id.data_path(&ctx.data_dir);
    let engine = ctx.engine.clone();
    let layout = Layout::new(plan.storage, plan.compression);
    let store = blocking(move || ReplicaStore::open_existing(&path, layout, &engine))
        .await
        .map_err(|e| Ended::Failed(format!("cannot open the replica database: {e}")))?;
    let store = Arc::new(store);
    slot.set_store(store.clone());
    let mut checkpoint = store
        .checkpoint()
        .map_err(|e| Ended::Failed(e.to_string()))?
        .unwrap_or_default();
    let consumed_from = checkpoint.next_offset;

    if checkpoint.validation.end_of_push {
        tracing::info!(replica = %id, offset = checkpoint.next_offset, read_only = store.is_read_only(), "END_OF_PUSH already ingested");
        if plan.hybrid.is_some() && !store.is_read_only() {
            let hybrid = Following {
                store,
                checkpoint,
                consumed_from,
            };
            return follow_realtime(ctx, slot, plan, hybrid, stop, follow).await;
        }
        return go_online(ctx, slot, store, &checkpoint, consumed_from).await;
    }

    let push_signer = match ctx.verify_signatures {
        true => Some(push_signer(ctx, slot, plan, &mut stop).await?),
        false => None,
    };
    let mut consumer = open_consumer(ctx, slot, topic, consumed_from, None, &mut stop).await?;
    slot.update(&ctx.metrics, |r| {
        r.state = ReplicaState::Bootstrap;
        r.offset = checkpoint.next_offset;
        r.records = checkpoint.records;
        r.consumed_from = consumed_from;
    });
    ctx.report(slot).await;
    tracing::info!(replica = %id, %topic, offset = consumed_from, ?layout, "bootstrapping");

    let mut last_progress = Instant::now();
    let mut end_of_push_at: Option<Instant> = None;
    let mut poll_failures = 0u32;
    let mut reported_offset = consumed_from;
    // Where the validated records go: write batches or SST chunks.
    let mut writes = Writes::new(&checkpoint);
    // The checkpoint in the database (`checkpoint` runs ahead of it by a pending chunk).
    // Progress is reported from it: a reported offset is always one a restart would resume from.
    let mut durable = checkpoint.clone();
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
            biased;
            _ = stop.wait_for(|s| *s) => None,
            polled = consumer.poll(POLL_RECORDS_MAX, POLL_TIMEOUT) => Some(polled),
        };
        let Some(polled) = polled else {
            // A graceful stop keeps what was consumed.
            writes.flush(ctx, &store).await?;
            return Err(Ended::Stopped);
        };
        if let Some(cp) = writes.written(ctx).await? {
            durable = cp;
        }
        let records = match polled {
            Ok(records) => {
                poll_failures = 0;
                records
            }
            Err(e) => {
                if !e.retryable() {
                    poll_failures += 1;
                    if poll_failures >= CONSUMER_FAILURES_MAX {
                        writes.abandon().await;
                        return Err(Ended::Failed(format!(
                            "cannot consume {topic}/{}: {e}",
                            id.partition
                        )));
                    }
                }
                tracing::warn!(replica = %id, error = %e, "poll failed; retrying");
                let stopped = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => true,
                    _ = tokio::time::sleep(CONSUMER_RETRY_BACKOFF) => false,
                };
                if stopped {
                    // A graceful stop keeps what was consumed.
                    writes.flush(ctx, &store).await?;
                    return Err(Ended::Stopped);
                }
                continue;
            }
        };
        if records.is_empty() {
            if let Some(cp) = writes.idle(ctx, &store).await? {
                durable = cp;
            }
            // Idle: still publish progress the last busy poll did not get to report.
            if reported_offset != durable.next_offset
                && last_progress.elapsed() >= PROGRESS_INTERVAL
            {
                last_progress = Instant::now();
                reported_offset = durable.next_offset;
                report_progress(ctx, slot, &durable).await;
            }
            continue;
        }

        // A hybrid version's push ends at END_OF_PUSH; what follows is applied by
        // `follow_realtime`, through write batches.
        let rules = Rules::of(plan).signed_by(push_signer.as_ref());
        let batch = validate_batch(&checkpoint, records, topic, id.partition, rules);
        if let Some(dictionary) = batch.dictionary {
            let s = store.clone();
            blocking(move || s.set_dictionary(&dictionary))
                .await
                .map_err(|e| {
                    Ended::Failed(format!("cannot store the compression dictionary: {e}"))
                })?;
        }
        if batch.next != checkpoint {
            let flush = batch.next.validation.end_of_push || batch.failure.is_some();
            let next = batch.next.clone();
            if let Some(cp) = writes.write(ctx, &store, batch.ops, next, flush).await? {
                durable = cp;
            }
            checkpoint = batch.next;
        }
        ctx.metrics
            .duplicates_skipped
            .fetch_add(batch.duplicates, Ordering::Relaxed);
        if let Some(message) = batch.failure {
            if let Some(cp) = writes.flush(ctx, &store).await? {
                durable = cp;
            }
            slot.update(&ctx.metrics, |r| {
                r.offset = durable.next_offset;
                r.records = durable.records;
            });
            return Err(Ended::Failed(message));
        }
        if checkpoint.validation.end_of_push && end_of_push_at.is_none() {
            tracing::info!(replica = %id, offset = checkpoint.next_offset, "END_OF_PUSH consumed");
            end_of_push_at = Some(Instant::now());
            if plan.hybrid.is_some() {
                writes.flush(ctx, &store).await?;
                persist_checkpoint(&store, &checkpoint).await?;
                // What this poll returned after END_OF_PUSH is read again by the consumer
                // `follow_realtime` opens.
                close_consumer(consumer).await;
                let hybrid = Following {
                    store,
                    checkpoint,
                    consumed_from,
                };
                return follow_realtime(ctx, slot, plan, hybrid, stop, follow).await;
            }
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            reported_offset = durable.next_offset;
            report_progress(ctx, slot, &durable).await;
        }
    }
    // Done with the topic: close the consumer before ONLINE is reported (the controller deletes
    // a topic once no replica of it reports OFFLINE or BOOTSTRAP).
    close_consumer(consumer).await;
    // Records consumed after END_OF_PUSH (END_OF_SEGMENT) only move the checkpoint.
    writes.flush(ctx, &store).await?;
    persist_checkpoint(&store, &checkpoint).await?;
    go_online(ctx, slot, store, &checkpoint, consumed_from).await
}

/// The secret the controller registered for the version's push (servers verifying signatures
/// ingest only records it signed).
async fn push_signer(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    plan: &ReplicaPlan,
    stop: &mut watch::Receiver<bool>,
) -> Result<WriterSecret, Ended> {
    let id = &slot.id;
    let Some(producer) = plan.producer.as_deref() else {
        return Err(Ended::Failed(format!(
            "version {} of store `{}` names no push producer, so its push cannot be verified: \
             with authorization on, servers ingest only signed pushes (push with `rialto-push`)",
            id.version, id.store
        )));
    };
    let key = ctx.layout.version_copier(&id.store, id.version, producer);
    match crate::hybrid::registered_secret(ctx, slot, &key, stop).await {
        None => Err(Ended::Stopped),
        Some(Ok(Some(secret))) => Ok(secret),
        Some(Ok(None)) => Err(Ended::Failed(format!(
            "the push's producer {producer} has no signing registration at `{key}`: its \
             records cannot be verified"
        ))),
        Some(Err(e)) => Err(Ended::Failed(format!(
            "the push's signing registration at `{key}` is unusable: {e}"
        ))),
    }
}

/// Writes `checkpoint` if the database does not hold it yet.
async fn persist_checkpoint(
    store: &Arc<ReplicaStore>,
    checkpoint: &Checkpoint,
) -> Result<(), Ended> {
    if store
        .checkpoint()
        .map_err(|e| Ended::Failed(e.to_string()))?
        .as_ref()
        == Some(checkpoint)
    {
        return Ok(());
    }
    let (s, cp) = (store.clone(), checkpoint.clone());
    blocking(move || s.apply(&[], &cp))
        .await
        .map_err(|e| Ended::Failed(format!("cannot write to the replica database: {e}")))
}

/// How often a following replica measures its lag (and reports it when it changed).
pub const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// A hybrid replica past END_OF_PUSH, handed to [`follow_realtime`].
struct Following {
    store: Arc<ReplicaStore>,
    checkpoint: Checkpoint,
    consumed_from: i64,
}

/// A hybrid replica after END_OF_PUSH: keeps consuming the version topic (the real-time
/// records its partition leader copies) through write batches, measures its lag against the
/// real-time topic, reports ONLINE once the lag is within the store's bound, and runs its
/// candidacy for the partition's leadership (`hybrid::lead`). It goes on as the store's backup;
/// once the controller seals its version (neither current nor backup: `follow` turns false) it
/// stops consuming and is sealed like a batch version.
async fn follow_realtime(
    ctx: &Arc<NodeContext>,
    slot: &Arc<ReplicaSlot>,
    plan: &ReplicaPlan,
    following: Following,
    mut stop: watch::Receiver<bool>,
    mut follow: watch::Receiver<bool>,
) -> Result<(), Ended> {
    let Following {
        store,
        mut checkpoint,
        consumed_from,
    } = following;
    let id = &slot.id;
    let lag_max = plan.hybrid.map_or(0, |h| h.lag_records_max);
    let rt_topic = realtime_topic(&id.store);
    if !*follow.borrow() {
        return go_online(ctx, slot, store, &checkpoint, consumed_from).await;
    }
    let s = store.clone();
    blocking(move || s.serve_while_writing())
        .await
        .map_err(|e| Ended::Failed(format!("cannot open the replica for real-time writes: {e}")))?;
    let mut consumer = open_consumer(
        ctx,
        slot,
        &plan.topic,
        checkpoint.next_offset,
        Some(ctx.realtime_fetch_wait),
        &mut stop,
    )
    .await?;
    slot.update(&ctx.metrics, |r| r.following = true);
    let (progress_tx, progress_rx) = watch::channel(progress_of(&checkpoint));
    let (leader_stop, leader_stop_rx) = watch::channel(false);
    let (failure_tx, mut failure) = watch::channel(None);
    let (halted_tx, mut halted) = watch::channel(None);
    let leader = tokio::spawn(crate::hybrid::lead(
        ctx.clone(),
        slot.clone(),
        plan.clone(),
        progress_rx,
        leader_stop_rx,
        failure_tx,
        halted_tx,
    ));
    let stop_leader = |leader: tokio::task::JoinHandle<()>| async {
        let _ = leader_stop.send(true);
        let _ = leader.await;
    };
    tracing::info!(replica = %id, offset = checkpoint.next_offset, "following real-time writes");
    let mut last_lag = Instant::now() - LAG_INTERVAL;
    let mut reported: Option<(Option<u64>, i64)> = None;
    // Before START_OF_BUFFER_REPLAY: where the replay would start (the rewind point).
    let mut replay_from: Option<i64> = None;
    let mut last_progress = Instant::now();
    let mut copy_check = ctx
        .verify_signatures
        .then(crate::hybrid::CopyCheck::default);
    let result = loop {
        let records = {
            tokio::select! {
                biased;
                _ = crate::hybrid::stopped(&mut stop) => break Err(Ended::Stopped),
                changed = follow.changed() => {
                    // The sender goes with the hosted replica: being dropped, not superseded.
                    if changed.is_err() {
                        break Err(Ended::Stopped);
                    }
                    if !*follow.borrow() {
                        break Ok(());
                    }
                    continue;
                }
                _ = failure.changed() => {
                    let message = failure.borrow().clone();
                    if let Some(message) = message {
                        break Err(Ended::Failed(message));
                    }
                    continue;
                }
                Ok(()) = halted.changed() => {
                    // The leader waits for an operator's decision about a real-time record: the
                    // replica reports ERROR meanwhile (it still applies what reaches its version
                    // topic, so it resumes as soon as the leader does).
                    let message = halted.borrow().clone();
                    slot.update(&ctx.metrics, |r| match message {
                        Some(message) => {
                            r.state = ReplicaState::Error;
                            r.error = Some(message);
                        }
                        None => {
                            r.state = ReplicaState::Bootstrap;
                            r.error = None;
                        }
                    });
                    ctx.report(slot).await;
                    reported = None;
                    last_lag = Instant::now() - LAG_INTERVAL;
                    continue;
                }
                polled = consumer.poll(POLL_RECORDS_MAX, POLL_TIMEOUT) => match polled {
                    Ok(records) => records,
                    Err(e) => {
                        tracing::warn!(replica = %id, error = %e, "poll failed; retrying");
                        tokio::time::sleep(CONSUMER_RETRY_BACKOFF).await;
                        continue;
                    }
                },
            }
        };
        let records = match copy_check.as_mut() {
            Some(check) => match check.admit(ctx, slot, records, &mut stop).await {
                Some(records) => records,
                None => break Err(Ended::Stopped),
            },
            None => records,
        };
        if !records.is_empty() {
            let rules = Rules {
                hybrid: Hybrid::Following,
                ..Rules::of(plan)
            };
            let batch = validate_batch(&checkpoint, records, &plan.topic, id.partition, rules);
            if batch.next != checkpoint {
                let applied = batch.next.records - checkpoint.records;
                let (s, ops, cp) = (store.clone(), batch.ops, batch.next.clone());
                match blocking(move || s.apply_replacing(ops, &cp)).await {
                    Ok(0) => {}
                    Ok(incomplete) => {
                        ctx.metrics
                            .incomplete_chunked_values
                            .fetch_add(incomplete as u64, Ordering::Relaxed);
                        tracing::warn!(replica = %id, incomplete, "chunked real-time values whose first chunks precede the replay were left out");
                    }
                    Err(e) => {
                        break Err(Ended::Failed(format!(
                            "cannot write to the replica database: {e}"
                        )))
                    }
                }
                ctx.metrics
                    .records_ingested
                    .fetch_add(applied, Ordering::Relaxed);
                checkpoint = batch.next;
                let _ = progress_tx.send(progress_of(&checkpoint));
            }
            ctx.metrics
                .duplicates_skipped
                .fetch_add(batch.duplicates, Ordering::Relaxed);
            if let Some(message) = batch.failure {
                break Err(Ended::Failed(message));
            }
        }
        if last_lag.elapsed() < LAG_INTERVAL {
            continue;
        }
        last_lag = Instant::now();
        let lag = match measure_lag(
            ctx,
            plan,
            id.partition,
            &rt_topic,
            &checkpoint,
            &mut replay_from,
        )
        .await
        {
            Ok(lag) => lag,
            Err(e) => {
                tracing::warn!(replica = %id, error = %e, "cannot read the real-time topic's end; lag unknown");
                continue;
            }
        };
        if slot.state() != ReplicaState::Online && crate::hybrid::ready(slot.state(), lag, lag_max)
        {
            let lag = lag.unwrap_or(0);
            if let Err(e) =
                go_online_following(ctx, slot, &store, &checkpoint, consumed_from, lag).await
            {
                break Err(e);
            }
            reported = Some((Some(lag), checkpoint.next_offset));
            continue;
        }
        if reported != Some((lag, checkpoint.next_offset)) {
            reported = Some((lag, checkpoint.next_offset));
            if !matches!(slot.state(), ReplicaState::Online | ReplicaState::Error) {
                slot.update(&ctx.metrics, |r| r.state = ReplicaState::Bootstrap);
                if last_progress.elapsed() >= PROGRESS_INTERVAL {
                    last_progress = Instant::now();
                    tracing::info!(replica = %id, lag = ?lag, lag_max, offset = checkpoint.next_offset, "catching up with real-time writes");
                }
            }
            slot.update(&ctx.metrics, |r| {
                r.lag = lag;
                r.offset = checkpoint.next_offset;
                r.records = checkpoint.records;
            });
            ctx.report(slot).await;
        }
    };
    stop_leader(leader).await;
    close_consumer(consumer).await;
    match result {
        Ok(()) => {
            tracing::info!(replica = %id, "version sealed (neither current nor backup): no longer following real-time writes");
            slot.update(&ctx.metrics, |r| {
                r.following = false;
                r.lag = None;
            });
            go_online(ctx, slot, store, &checkpoint, consumed_from).await
        }
        Err(e) => {
            slot.update(&ctx.metrics, |r| r.following = false);
            Err(e)
        }
    }
}

/// A following replica's lag: the real-time records it has not applied. Before its version's
/// START_OF_BUFFER_REPLAY it counts from the rewind point (found once, in `replay_from`), as
/// the replay will.
async fn measure_lag(
    ctx: &NodeContext,
    plan: &ReplicaPlan,
    partition: u32,
    rt_topic: &str,
    checkpoint: &Checkpoint,
    replay_from: &mut Option<i64>,
) -> Result<Option<u64>, rialto_backends::PubSubError> {
    let (_, end) = ctx.pubsub.watermarks(rt_topic, partition).await?;
    if let Some(replay) = checkpoint.replay {
        return Ok(Some(replay.lag(end)));
    }
    let Some(hybrid) = plan.hybrid else {
        return Ok(None);
    };
    let start = match *replay_from {
        Some(start) => start,
        None => {
            let since = rialto_backends::clock::now_ms()
                - (hybrid.rewind_seconds as i64).saturating_mul(1000);
            let start = crate::hybrid::replay_start(ctx, rt_topic, partition, since).await?;
            *replay_from = Some(start);
            start
        }
    };
    Ok(Some((end - start).max(0) as u64))
}

fn progress_of(checkpoint: &Checkpoint) -> crate::hybrid::Progress {
    crate::hybrid::Progress {
        next_offset: checkpoint.next_offset,
        replay: checkpoint.replay,
    }
}

/// Reports a following replica ONLINE (its database stays writable).
async fn go_online_following(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    store: &Arc<ReplicaStore>,
    checkpoint: &Checkpoint,
    consumed_from: i64,
    lag: u64,
) -> Result<(), Ended> {
    mark_online(ctx, slot, store, checkpoint, consumed_from, Some(lag)).await?;
    tracing::info!(replica = %slot.id, records = checkpoint.records, lag, "ONLINE, following real-time writes");
    ctx.report(slot).await;
    Ok(())
}

/// Runs a blocking database call off the runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::ServerError> + Send + 'static,
) -> Result<T, String> {
    match rialto_backends::blocking::spawn(f).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("panicked: {e}")),
    }
}

/// Flushes, compacts (unsorted pushes) and reopens the database read-only.
async fn seal(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    store: Arc<ReplicaStore>,
    checkpoint: &Checkpoint,
) -> Result<Arc<ReplicaStore>, Ended> {
    // Ingested SST files do not overlap; memtable flushes may.
    let compact = !ingests_sst_files(checkpoint);
    drop(slot.take_store());
    let store = Arc::try_unwrap(store).map_err(|_| {
        Ended::Failed("cannot seal: the replica database is still in use".to_string())
    })?;
    let engine = ctx.engine.clone();
    let started = Instant::now();
    let sealed = blocking(move || store.seal(compact, &engine))
        .await
        .map_err(|e| Ended::Failed(format!("cannot seal the replica database: {e}")))?;
    tracing::info!(replica = %slot.id, compact, elapsed_ms = started.elapsed().as_millis() as u64, "sealed read-only");
    let sealed = Arc::new(sealed);
    slot.set_store(sealed.clone());
    Ok(sealed)
}

/// Publishes the replica's consumed offset and record count while it bootstraps.
async fn report_progress(ctx: &NodeContext, slot: &ReplicaSlot, checkpoint: &Checkpoint) {
    slot.update(&ctx.metrics, |r| {
        r.offset = checkpoint.next_offset;
        r.records = checkpoint.records;
    });
    ctx.report(slot).await;
}

/// Seals the database if it is not yet (flush, compaction for unsorted pushes, read-only
/// reopen), warms it, and reports the replica ONLINE with its disk and memory bytes.
async fn go_online(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    store: Arc<ReplicaStore>,
    checkpoint: &Checkpoint,
    consumed_from: i64,
) -> Result<(), Ended> {
    let store = if store.is_read_only() {
        store
    } else {
        seal(ctx, slot, store, checkpoint).await?
    };
    let budget = match store.profile() {
        StorageProfile::InMemory => u64::MAX,
        StorageProfile::OnDisk => ctx.engine.block_cache_bytes() as u64,
    };
    let s = store.clone();
    let warmed = blocking(move || s.warm(budget))
        .await
        .map_err(|e| Ended::Failed(format!("cannot warm the replica database: {e}")))?;
    if ctx.lock_in_memory_stores && store.profile() == StorageProfile::InMemory {
        let s = store.clone();
        match blocking(move || s.lock_in_memory()).await {
            Ok(bytes) => {
                tracing::info!(replica = %slot.id, locked_bytes = bytes, "data locked in memory")
            }
            Err(e) => tracing::warn!(
                replica = %slot.id,
                error = %e,
                "cannot lock the replica's data in memory; it serves unlocked (raise RLIMIT_MEMLOCK, e.g. systemd's LimitMEMLOCK=infinity, or grant CAP_IPC_LOCK)"
            ),
        }
    }
    let usage = mark_online(ctx, slot, &store, checkpoint, consumed_from, None).await?;
    if store.profile() == StorageProfile::InMemory && !usage.data_resident() {
        tracing::warn!(
            replica = %slot.id,
            data_bytes = usage.data_bytes,
            resident_data_bytes = usage.resident_data_bytes,
            "an in-memory replica goes ONLINE with part of its data out of memory (the kernel did not keep what warming read): reads of it go to disk; give the server more memory or fewer replicas"
        );
    }
    tracing::info!(
        replica = %slot.id,
        records = checkpoint.records,
        disk_bytes = usage.disk_bytes,
        memory_bytes = usage.memory_bytes,
        warmed_bytes = warmed.bytes,
        warm_ms = warmed.elapsed.as_millis() as u64,
        "ONLINE"
    );
    ctx.report(slot).await;
    Ok(())
}

/// Measures the replica and marks it ONLINE at `checkpoint` (not yet reported).
async fn mark_online(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    store: &Arc<ReplicaStore>,
    checkpoint: &Checkpoint,
    consumed_from: i64,
    lag: Option<u64>,
) -> Result<crate::store::StoreUsage, Ended> {
    let s = store.clone();
    let usage = blocking(move || s.usage())
        .await
        .map_err(|e| Ended::Failed(format!("cannot measure the replica database: {e}")))?;
    slot.update(&ctx.metrics, |r| {
        r.state = ReplicaState::Online;
        r.offset = checkpoint.next_offset;
        r.records = checkpoint.records;
        r.consumed_from = consumed_from;
        r.error = None;
        r.disk_bytes = usage.disk_bytes;
        r.memory_bytes = usage.memory_bytes;
        r.lag = lag;
    });
    Ok(usage)
}

/// Closes `consumer` off the async threads: librdkafka's close joins its threads.
async fn close_consumer(consumer: Box<dyn PartitionConsumer>) {
    if let Err(e) = rialto_backends::blocking::spawn(move || drop(consumer)).await {
        tracing::warn!(error = %e, "closing a consumer panicked");
    }
}

/// Opens a consumer of the replica's partition of `topic`, retrying while the broker is away;
/// `realtime` is the fetch wait of a low-latency consumer.
async fn open_consumer(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    topic: &str,
    offset: i64,
    realtime: Option<Duration>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Box<dyn PartitionConsumer>, Ended> {
    let mut failures = 0u32;
    let partition = slot.id.partition;
    loop {
        let opened = match realtime {
            Some(wait) => {
                ctx.pubsub
                    .realtime_consumer(topic, partition, offset, wait)
                    .await
            }
            None => ctx.pubsub.consumer(topic, partition, offset).await,
        };
        match opened {
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
                    biased;
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
    use crate::store::ChunkLimits;
    use crate::testing::PushRecords;
    use crate::validator::guid_hex;
    use rialto_backends::faults::{Faults, FaultyMetaStore};
    use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};
    use rialto_backends::ConsumedRecord;
    use rialto_backends::{MetaStore, PubSub};
    use rialto_protocol::envelope::CompressionCodec;
    use rialto_protocol::envelope::ControlMessage;
    use rialto_protocol::meta::{Layout, LeadershipRecord, NodeRecord, ReplicaRecord};
    use rialto_protocol::wire::StoredValue;

    const TOPIC: &str = "s_v1";

    struct Harness {
        ctx: Arc<NodeContext>,
        meta: MemoryMetaStore,
        pubsub: MemoryPubSub,
        /// Switches of the wrapper the node reaches `meta` through.
        faults: Arc<Faults>,
        _lease: rialto_backends::LeaseHandle,
        _dir: tempfile::TempDir,
    }

    async fn harness() -> Harness {
        harness_with(ChunkLimits::default()).await
    }

    async fn harness_with(sorted_chunk: ChunkLimits) -> Harness {
        harness_of(sorted_chunk, false, false).await
    }

    async fn harness_of(
        sorted_chunk: ChunkLimits,
        lock_in_memory_stores: bool,
        verify_signatures: bool,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemoryMetaStore::new();
        let pubsub = MemoryPubSub::new();
        pubsub.create_topic(TOPIC, 1).await.unwrap();
        let faults = Faults::new();
        let ctx = Arc::new(NodeContext {
            node_id: "n1".into(),
            data_dir: dir.path().to_path_buf(),
            layout: Layout::new("/r"),
            meta: Arc::new(FaultyMetaStore::new(Arc::new(meta.clone()), faults.clone())),
            pubsub: Arc::new(pubsub.clone()),
            metrics: Arc::new(ServerMetrics::default()),
            engine: crate::store::Engine::new(1 << 20),
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
            sorted_chunk,
            lock_in_memory_stores,
            realtime_fetch_wait: crate::hybrid::DEFAULT_REALTIME_FETCH_WAIT,
            verify_signatures,
            reports_pending: Default::default(),
        });
        let lease = ctx.register().await.unwrap();
        Harness {
            ctx,
            meta,
            pubsub,
            faults,
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

    fn plan() -> ReplicaPlan {
        ReplicaPlan {
            topic: TOPIC.into(),
            storage: StorageProfile::OnDisk,
            compression: rialto_protocol::meta::Compression::None,
            hybrid: None,
            producer: None,
        }
    }

    async fn run_to_end(h: &Harness, slot: &Arc<ReplicaSlot>) {
        run_plan_to_end(h, slot, plan()).await
    }

    async fn run_plan_to_end(h: &Harness, slot: &Arc<ReplicaSlot>, plan: ReplicaPlan) {
        let (_stop, stop_rx) = watch::channel(false);
        tokio::time::timeout(
            Duration::from_secs(20),
            run(
                h.ctx.clone(),
                slot.clone(),
                plan,
                stop_rx,
                watch::channel(true).1,
            ),
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
        let end = h.pubsub.append_all(TOPIC, 0, records).unwrap();
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
        h.pubsub.append_all(TOPIC, 0, records).unwrap();
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
        h.pubsub.append_all(TOPIC, 0, records).unwrap();
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
        h.pubsub.append_all(TOPIC, 0, records).unwrap();
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
        h.pubsub.append_all(TOPIC, 0, first.to_vec()).unwrap();
        let slot1 = slot(&h);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            h.ctx.clone(),
            slot1.clone(),
            plan(),
            stop_rx,
            watch::channel(true).1,
        ));
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

        h.pubsub.append_all(TOPIC, 0, rest.to_vec()).unwrap();
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
        let records = consumed(clean_push(3), 100);
        let mut bad = records.clone();
        bad[4].value = Some(b"garbage".to_vec());
        let v = validate_batch(
            &Checkpoint::default(),
            bad,
            "t",
            0,
            Rules::batch(CompressionCodec::None),
        );
        assert_eq!(v.next.next_offset, 104);
        assert_eq!(v.ops.len(), 2);
        assert_eq!(v.next.records, 2);
        assert_eq!(v.duplicates, 0);
        assert!(v.failure.unwrap().contains("offset 104"));
        let v = validate_batch(
            &Checkpoint::default(),
            records,
            "t",
            0,
            Rules::batch(CompressionCodec::None),
        );
        assert!(v.failure.is_none());
        assert!(v.next.validation.end_of_push && v.next.validation.all_segments_closed());
        assert_eq!(v.ops.len(), 4);
    }

    #[test]
    fn the_push_is_taken_only_from_the_producer_the_version_names() {
        let named = guid_hex(&[1; 16]);
        fn rules(producer: &str) -> Rules<'_> {
            Rules {
                producer: Some(producer),
                ..Rules::batch(CompressionCodec::None)
            }
        }
        for producer in [named.clone(), named.to_uppercase()] {
            let v = validate_batch(
                &Checkpoint::default(),
                consumed(clean_push(3), 0),
                "t",
                0,
                rules(&producer),
            );
            assert!(v.failure.is_none() && v.ops.len() == 4, "{:?}", v.failure);
        }

        let other = guid_hex(&[2; 16]);
        let v = validate_batch(
            &Checkpoint::default(),
            consumed(clean_push(3), 0),
            "t",
            0,
            rules(&other),
        );
        let failure = v.failure.expect("another producer's push");
        assert!(
            failure.contains(&format!("comes from producer {named}"))
                && failure.contains(&format!("push is producer {other}"))
                && failure.contains("another writer"),
            "{failure}"
        );
        assert!(
            v.ops.is_empty() && v.next.next_offset == 0,
            "nothing taken in"
        );

        // A record slipped into the push by another writer stops the replica there.
        let mut mixed = clean_push(3);
        let intruder = PushRecords::start([9; 16]).finish();
        mixed.insert(3, intruder[0].clone());
        let v = validate_batch(
            &Checkpoint::default(),
            consumed(mixed, 0),
            "t",
            0,
            rules(&named),
        );
        assert!(v.failure.expect("intruder").contains("offset 3"));
        assert_eq!(v.ops.len(), 1, "the named producer's records before it");
    }

    /// `push` as a consumer returns it, from offset `first`.
    fn consumed(push: Vec<Vec<u8>>, first: i64) -> Vec<ConsumedRecord> {
        push.into_iter()
            .enumerate()
            .map(|(i, v)| ConsumedRecord {
                offset: first + i as i64,
                key: None,
                value: Some(v),
            })
            .collect()
    }

    #[test]
    fn a_start_of_push_codec_other_than_the_versions_fails_before_any_record() {
        let keys = sorted_keys(3);
        // Announced uncompressed, the version says zstd: the client would try to decompress.
        let v = validate_batch(
            &Checkpoint::default(),
            consumed(sorted_push(&keys, b""), 0),
            "t",
            0,
            Rules::batch(CompressionCodec::Zstd),
        );
        let failure = v.failure.expect("codec mismatch");
        assert!(
            failure.contains("version's compression is Zstd"),
            "{failure}"
        );
        assert!(v.ops.is_empty(), "nothing taken in");
        assert_eq!(v.next.validation.start_of_push, None);
        // A dictionary codec without a dictionary.
        let mut p = PushRecords::start_with(
            [3; 16],
            ControlMessage::StartOfPush {
                sorted: true,
                codec: CompressionCodec::ZstdWithDictionary,
                dictionary: Vec::new(),
            },
        );
        p.put(b"k", 1, b"v");
        let v = validate_batch(
            &Checkpoint::default(),
            consumed(p.finish(), 0),
            "t",
            0,
            Rules::batch(CompressionCodec::ZstdWithDictionary),
        );
        assert!(v.failure.expect("no dictionary").contains("no dictionary"));
        // The same codec passes.
        let v = validate_batch(
            &Checkpoint::default(),
            consumed(sorted_push(&keys, b""), 0),
            "t",
            0,
            Rules::batch(CompressionCodec::None),
        );
        assert!(v.failure.is_none() && v.ops.len() == 3);
    }

    fn sorted_push(keys: &[String], dictionary: &[u8]) -> Vec<Vec<u8>> {
        let mut p = PushRecords::start_with(
            [2; 16],
            ControlMessage::StartOfPush {
                sorted: true,
                codec: rialto_protocol::envelope::CompressionCodec::None,
                dictionary: dictionary.to_vec(),
            },
        );
        for k in keys {
            p.put(k.as_bytes(), 1, format!("value of {k}").as_bytes());
        }
        p.finish()
    }

    fn sorted_keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("key-{i:06}")).collect()
    }

    #[tokio::test]
    async fn sorted_push_is_ingested_as_sst_files_and_sealed_read_only() {
        let h = harness().await;
        let keys = sorted_keys(2500);
        let end = h
            .pubsub
            .append_all(TOPIC, 0, sorted_push(&keys, b"a dictionary"))
            .unwrap();
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        let r = reported(&h).await;
        assert_eq!(r.state, ReplicaState::Online, "{r:?}");
        assert_eq!((r.offset, r.records), (end, 2500));
        assert!(r.disk_bytes > 2500 && r.memory_bytes > 0, "{r:?}");
        assert!(h.ctx.metrics.sst_files_ingested.load(Ordering::Relaxed) >= 1);
        let store = h.ctx.registry.online("s", 1, 0).unwrap();
        assert!(store.is_read_only());
        assert_eq!(
            store.dictionary().unwrap().as_deref(),
            Some(&b"a dictionary"[..])
        );
        for k in ["key-000000", "key-001234", "key-002499"] {
            assert_eq!(
                store.get(k.as_bytes()).unwrap().as_deref(),
                Some(&StoredValue::encode(1, format!("value of {k}").as_bytes())[..])
            );
        }
        assert!(store.get(b"key-002500").unwrap().is_none());
    }

    /// Pushes 5,000 sorted records to an in-memory replica and runs it until ONLINE; returns its
    /// slot, its database and its record then.
    async fn in_memory_replica_online(
        h: &Harness,
    ) -> (Arc<ReplicaSlot>, Arc<ReplicaStore>, ReplicaRecord) {
        let keys = sorted_keys(5000);
        h.pubsub
            .append_all(TOPIC, 0, sorted_push(&keys, b""))
            .unwrap();
        let slot = slot(h);
        let (_stop, stop_rx) = watch::channel(false);
        let in_memory = ReplicaPlan {
            storage: StorageProfile::InMemory,
            ..plan()
        };
        tokio::time::timeout(
            Duration::from_secs(20),
            run(
                h.ctx.clone(),
                slot.clone(),
                in_memory,
                stop_rx,
                watch::channel(true).1,
            ),
        )
        .await
        .expect("ingestion should finish");
        let online = reported(h).await;
        assert_eq!(online.state, ReplicaState::Online, "{online:?}");
        let store = h.ctx.registry.online("s", 1, 0).unwrap();
        (slot, store, online)
    }

    #[tokio::test]
    async fn an_evicted_in_memory_replica_reports_less_memory_at_the_next_refresh() {
        let h = harness().await;
        let (slot, store, online) = in_memory_replica_online(&h).await;
        assert_eq!(store.locked_bytes(), 0, "locking is off by default");
        let data_bytes = store.usage().unwrap().data_bytes;
        assert!(online.memory_bytes >= data_bytes, "{online:?}");
        let mut resident = std::collections::HashMap::new();

        // Nothing moved: nothing is re-reported.
        crate::usage::refresh(&h.ctx, &mut resident).await;
        assert_eq!(reported(&h).await.updated_ms, online.updated_ms);

        store.drop_data_from_page_cache();
        crate::usage::refresh(&h.ctx, &mut resident).await;
        let evicted = reported(&h).await;
        // The files' index and bloom pages, mapped by the table readers, stay.
        assert!(
            evicted.memory_bytes < online.memory_bytes - data_bytes / 2,
            "{evicted:?} of {data_bytes}"
        );
        assert_eq!(evicted.state, ReplicaState::Online);
        assert_eq!(resident.get(&slot.id), Some(&false));

        store.warm(u64::MAX).unwrap();
        crate::usage::refresh(&h.ctx, &mut resident).await;
        assert!(reported(&h).await.memory_bytes >= data_bytes);
        assert_eq!(resident.get(&slot.id), Some(&true));
    }

    #[tokio::test]
    async fn a_server_that_locks_in_memory_stores_keeps_their_data_resident() {
        let h = harness_of(ChunkLimits::default(), true, false).await;
        let (slot, store, online) = in_memory_replica_online(&h).await;
        let data_bytes = store.usage().unwrap().data_bytes;
        assert_eq!(store.locked_bytes(), data_bytes);
        store.drop_data_from_page_cache();
        let mut resident = std::collections::HashMap::new();
        crate::usage::refresh(&h.ctx, &mut resident).await;
        assert_eq!(resident.get(&slot.id), Some(&true));
        assert_eq!(reported(&h).await.memory_bytes, online.memory_bytes);
    }

    #[tokio::test]
    async fn a_replica_closes_its_consumer_before_it_reports_online() {
        let h = harness().await;
        h.pubsub
            .append_all(TOPIC, 0, sorted_push(&sorted_keys(100), b""))
            .unwrap();
        // (state, consumers open) at every replica record written.
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (pubsub, log) = (h.pubsub.clone(), seen.clone());
        h.faults.on_put(Arc::new(move |_, value| {
            if let Ok(r) = rialto_protocol::meta::decode_record::<ReplicaRecord>(value) {
                log.lock().unwrap().push((r.state, pubsub.open_consumers()));
            }
        }));
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        let seen = seen.lock().unwrap().clone();
        assert!(seen.contains(&(ReplicaState::Bootstrap, 1)), "{seen:?}");
        let online: Vec<usize> = seen
            .iter()
            .filter(|(state, _)| *state == ReplicaState::Online)
            .map(|&(_, open)| open)
            .collect();
        assert!(
            !online.is_empty() && online.iter().all(|&open| open == 0),
            "ONLINE is reported only after the consumer is closed: {seen:?}"
        );
    }

    #[tokio::test]
    async fn a_sorted_push_larger_than_a_chunk_is_ingested_chunk_after_chunk() {
        // Chunks of 4 KB: every poll (up to POLL_RECORDS_MAX records of about 30 bytes) fills
        // one, so 2,500 records make three SST files, each written while the next is consumed.
        let h = harness_with(ChunkLimits {
            bytes: 4096,
            age: Duration::from_secs(60),
        })
        .await;
        let keys = sorted_keys(2500);
        let end = h
            .pubsub
            .append_all(TOPIC, 0, sorted_push(&keys, b""))
            .unwrap();
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        let r = reported(&h).await;
        assert_eq!(r.state, ReplicaState::Online, "{r:?}");
        assert_eq!((r.offset, r.records), (end, 2500));
        let files = h.ctx.metrics.sst_files_ingested.load(Ordering::Relaxed);
        assert!((3..=6).contains(&files), "{files} SST files");
        assert_eq!(h.ctx.metrics.records_ingested.load(Ordering::Relaxed), 2500);
        let store = h.ctx.registry.online("s", 1, 0).unwrap();
        for k in &keys {
            assert_eq!(
                store.get(k.as_bytes()).unwrap().as_deref(),
                Some(&StoredValue::encode(1, format!("value of {k}").as_bytes())[..]),
                "{k}"
            );
        }
    }

    #[tokio::test]
    async fn an_old_chunk_is_ingested_while_the_push_is_still_running() {
        // Half a push, then silence: the chunk is written once it is older than its age limit,
        // and the reported offset (what a restart resumes from) moves past it.
        let h = harness_with(ChunkLimits {
            bytes: usize::MAX,
            age: Duration::from_millis(300),
        })
        .await;
        let keys = sorted_keys(200);
        let records = sorted_push(&keys, b"");
        // SOS, SOP and 100 PUTs.
        h.pubsub
            .append_all(TOPIC, 0, records[..102].to_vec())
            .unwrap();
        let slot = slot(&h);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            h.ctx.clone(),
            slot.clone(),
            plan(),
            stop_rx,
            watch::channel(true).1,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        let key = h.ctx.layout.replica("s", 1, 0, "n1");
        loop {
            let r: Option<ReplicaRecord> = h
                .meta
                .get(&key)
                .await
                .unwrap()
                .map(|kv| serde_json::from_slice(&kv.value).unwrap());
            if let Some(r) = r.as_ref().filter(|r| r.records == 100) {
                assert_eq!((r.state, r.offset), (ReplicaState::Bootstrap, 102));
                break;
            }
            assert!(Instant::now() < deadline, "chunk never ingested: {r:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(h.ctx.metrics.sst_files_ingested.load(Ordering::Relaxed), 1);
        h.pubsub
            .append_all(TOPIC, 0, records[102..].to_vec())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("ingestion should finish")
            .unwrap();
        drop(stop);
        let r = reported(&h).await;
        assert_eq!((r.state, r.records), (ReplicaState::Online, 200), "{r:?}");
        assert!(h
            .ctx
            .registry
            .online("s", 1, 0)
            .unwrap()
            .get(b"key-000199")
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn unsorted_keys_in_a_push_marked_sorted_put_the_replica_in_error() {
        let h = harness().await;
        let mut keys = sorted_keys(50);
        keys.swap(20, 30);
        h.pubsub
            .append_all(TOPIC, 0, sorted_push(&keys, b""))
            .unwrap();
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        let r = reported(&h).await;
        assert_eq!(r.state, ReplicaState::Error);
        let msg = r.error.unwrap();
        // Records: SOS(0) SOP(1) PUT key-0(2) ...: key index 21 (key-000021 after key-000030)
        // is at offset 23.
        assert!(
            msg.contains("does not sort after the previous key") && msg.contains("offset 23"),
            "{msg}"
        );
        assert!(h.ctx.registry.online("s", 1, 0).is_err());
    }

    #[tokio::test]
    async fn unsorted_push_goes_through_write_batches_and_is_sealed_too() {
        let h = harness().await;
        h.pubsub.append_all(TOPIC, 0, clean_push(500)).unwrap();
        let slot = slot(&h);
        run_to_end(&h, &slot).await;
        assert_eq!(reported(&h).await.state, ReplicaState::Online);
        assert_eq!(h.ctx.metrics.sst_files_ingested.load(Ordering::Relaxed), 0);
        let store = h.ctx.registry.online("s", 1, 0).unwrap();
        assert!(store.is_read_only());
        assert!(store.get(b"k499").unwrap().is_some());
    }

    // --- Hybrid versions -------------------------------------------------------------------

    fn hybrid_plan(lag_records_max: u64) -> ReplicaPlan {
        ReplicaPlan {
            hybrid: Some(rialto_protocol::meta::HybridConfig {
                rewind_seconds: 3600,
                lag_records_max,
            }),
            // The pushes below are producer [1; 16]; the leaders copy as producers of their own.
            producer: Some(guid_hex(&[1; 16])),
            ..plan()
        }
    }

    /// Real-time writes of one writer: `ops` are (key, Some(value)) puts and (key, None)
    /// deletes, after a START_OF_SEGMENT.
    fn realtime(
        writer: &mut rialto_protocol::producer::PartitionWriter,
        start: bool,
        ops: &[(&str, Option<&str>)],
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if start {
            out.push(writer.start_segment().encode());
        }
        for (k, v) in ops {
            let e = match v {
                Some(v) => writer.put(k.as_bytes().to_vec(), 1, v.as_bytes().to_vec()),
                None => writer.delete(k.as_bytes().to_vec()),
            };
            out.push(e.encode());
        }
        out
    }

    async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..400 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn value_of(h: &Harness, key: &str) -> Option<Vec<u8>> {
        let store = h.ctx.registry.online("s", 1, 0).ok()?;
        let v = store.get(key.as_bytes()).unwrap();
        v.map(|v| v[4..].to_vec())
    }

    #[tokio::test]
    async fn a_hybrid_replica_leads_replays_and_follows_real_time_writes() {
        let h = harness().await;
        h.pubsub.create_topic("s_rt", 1).await.unwrap();
        // Real-time writes before the push ends are replayed on top of the batch data.
        let mut writer = rialto_protocol::producer::PartitionWriter::new([9; 16]);
        h.pubsub
            .append_all(
                "s_rt",
                0,
                realtime(&mut writer, true, &[("k2", Some("rt-2")), ("k3", None)]),
            )
            .unwrap();
        let mut p = PushRecords::start([1; 16]);
        for i in 0..5 {
            p.put(
                format!("k{i}").as_bytes(),
                1,
                format!("batch-{i}").as_bytes(),
            );
        }
        h.pubsub.append_all(TOPIC, 0, p.finish()).unwrap();
        let following = Following::start(&h);
        let slot = following.slot.clone();

        wait_for("the replica to be ONLINE", || {
            slot.state() == ReplicaState::Online
        })
        .await;
        let r = slot.record();
        assert!(r.leader && r.following, "{r:?}");
        assert_eq!(r.lag, Some(0));
        assert_eq!(value_of(&h, "k1").as_deref(), Some(&b"batch-1"[..]));
        assert_eq!(
            value_of(&h, "k2").as_deref(),
            Some(&b"rt-2"[..]),
            "real-time wins"
        );
        assert_eq!(value_of(&h, "k3"), None, "deleted in real time");
        let leader_key = h.ctx.layout.partition_leader("s", 1, 0);
        let holder = h.meta.get(&leader_key).await.unwrap().unwrap().value;
        assert!(LeadershipRecord::is_held_by(&holder, "n1"));

        // Writes after the swap keep arriving, in order: the last write of a key wins.
        h.pubsub
            .append_all(
                "s_rt",
                0,
                realtime(
                    &mut writer,
                    false,
                    &[
                        ("k4", Some("rt-4a")),
                        ("k5", Some("new")),
                        ("k4", Some("rt-4b")),
                    ],
                ),
            )
            .unwrap();
        wait_for("the new writes", || {
            value_of(&h, "k4").as_deref() == Some(b"rt-4b")
        })
        .await;
        assert_eq!(value_of(&h, "k5").as_deref(), Some(&b"new"[..]));
        let cp = h
            .ctx
            .registry
            .online("s", 1, 0)
            .unwrap()
            .checkpoint()
            .unwrap()
            .unwrap();
        let replay = cp.replay.expect("replay state");
        assert_eq!((replay.realtime_start, replay.last_upstream), (0, Some(5)));

        // Superseded: stops following and is sealed, serving what it has.
        following.supersede().await;
        let r = slot.record();
        assert_eq!(r.state, ReplicaState::Online);
        assert!(!r.following && !r.leader, "{r:?}");
        assert!(h.ctx.registry.online("s", 1, 0).unwrap().is_read_only());
        assert_eq!(value_of(&h, "k4").as_deref(), Some(&b"rt-4b"[..]));
        assert!(
            h.meta.get(&leader_key).await.unwrap().is_none(),
            "leadership released"
        );
    }

    #[tokio::test]
    async fn chunked_real_time_values_are_copied_compressed_and_replace_each_other_whole() {
        use crate::store::Served;
        use rialto_protocol::codec::ValueDecompressor;
        use rialto_protocol::stored::{
            split_value_replacing, value_checksum, ChunkManifest, CHECKSUM_BYTES, CHUNK_BODY_BYTES,
        };
        let h = harness().await;
        h.pubsub.create_topic("s_rt", 1).await.unwrap();
        let start_of_push = ControlMessage::StartOfPush {
            sorted: true,
            codec: CompressionCodec::Zstd,
            dictionary: Vec::new(),
        };
        let mut push = PushRecords::start_with([1; 16], start_of_push);
        push.put(b"batch", 1, b"batch data");
        h.pubsub.append_all(TOPIC, 0, push.finish()).unwrap();
        let plan = ReplicaPlan {
            compression: rialto_protocol::meta::Compression::Zstd,
            ..hybrid_plan(0)
        };
        let following = Following::start_with(&h, plan);
        let slot = following.slot.clone();
        wait_for("the replica to be ONLINE", || {
            slot.state() == ReplicaState::Online
        })
        .await;

        let mut writer = rialto_protocol::producer::PartitionWriter::new([9; 16]);
        let mut started = false;
        let body_of = |datum: &[u8]| {
            let mut body = value_checksum(1, datum).to_be_bytes().to_vec();
            body.extend_from_slice(datum);
            body
        };
        // Real-time records of a value of `datum` under `key`, written as the writer does.
        let mut write = |key: &[u8], datum: &[u8], generation: u64| {
            let body = body_of(datum);
            let mut records = Vec::new();
            if !started {
                started = true;
                records.push(writer.start_segment().encode());
            }
            for (k, id, b) in split_value_replacing(key.to_vec(), 1, body, generation) {
                records.push(writer.put(k, id, b).encode());
            }
            records
        };
        // What the key serves: the datum after the checksum, decompressed (a chunked value's
        // chunks were compressed one by one).
        let read = |key: &[u8]| -> Option<Vec<u8>> {
            let store = slot.store()?;
            let stored = store.get(key).unwrap()?.to_vec();
            let whole = match store.served(key, &stored) {
                Served::Value(v) => v.to_vec(),
                Served::Assembled(v) => v,
                Served::Missing => return None,
                Served::Corrupt(e) => panic!("corrupt: {e}"),
            };
            let payload = &whole[4 + CHECKSUM_BYTES..];
            Some(
                ValueDecompressor::new(None)
                    .unwrap()
                    .decompress(payload, 1 << 24)
                    .unwrap(),
            )
        };
        let datum_a: Vec<u8> = (0..2 * CHUNK_BODY_BYTES + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        let datum_b: Vec<u8> = (0..CHUNK_BODY_BYTES + 7).map(|i| (i % 13) as u8).collect();

        h.pubsub
            .append_all("s_rt", 0, write(b"big", &datum_a, 1))
            .unwrap();
        wait_for("the chunked value", || read(b"big").is_some()).await;
        // The oracle: the bytes written.
        assert_eq!(read(b"big").unwrap(), datum_a);
        let store = slot.store().unwrap();
        let manifest_a = store.get(b"big").unwrap().unwrap().to_vec();
        let chunks_a = ChunkManifest::decode(&manifest_a[4..]).unwrap();
        assert_eq!(chunks_a.generation, Some(1));
        assert!(
            store
                .get(&chunks_a.chunk_key(b"big", 1))
                .unwrap()
                .unwrap()
                .len()
                < CHUNK_BODY_BYTES,
            "each chunk compressed"
        );

        // Replaced by another chunked value: a reader holding the old manifest is served the
        // new value, and the old chunks are gone.
        h.pubsub
            .append_all("s_rt", 0, write(b"big", &datum_b, 2))
            .unwrap();
        wait_for("the new value", || {
            read(b"big").as_deref() == Some(&datum_b[..])
        })
        .await;
        for i in 0..chunks_a.chunk_count {
            assert!(store.get(&chunks_a.chunk_key(b"big", i)).unwrap().is_none());
        }
        match store.served(b"big", &manifest_a) {
            Served::Assembled(whole) => assert_eq!(
                ValueDecompressor::new(None)
                    .unwrap()
                    .decompress(&whole[4 + CHECKSUM_BYTES..], 1 << 24)
                    .unwrap(),
                datum_b
            ),
            _ => panic!("a stale manifest must be served the value that replaced it"),
        }

        // A manifest whose first chunk was never copied (as when it preceded the replay: here a
        // writer whose records start after it) is left out: the key keeps its value.
        let body = body_of(&datum_a);
        let mut late = rialto_protocol::producer::PartitionWriter::new([8; 16]);
        let mut records = vec![late.start_segment().encode()];
        for (k, id, b) in split_value_replacing(b"big".to_vec(), 1, body, 3)
            .into_iter()
            .skip(1)
        {
            records.push(late.put(k, id, b).encode());
        }
        h.pubsub.append_all("s_rt", 0, records).unwrap();
        h.pubsub
            .append_all("s_rt", 0, write(b"small", b"after", 4))
            .unwrap();
        wait_for("the write after it", || {
            read(b"small").as_deref() == Some(&b"after"[..])
        })
        .await;
        assert_eq!(read(b"big").unwrap(), datum_b);
        assert_eq!(
            h.ctx
                .metrics
                .incomplete_chunked_values
                .load(Ordering::Relaxed),
            1
        );

        // Replaced by a small value: the chunks of generation 2 go with it.
        let manifest_b = store.get(b"big").unwrap().unwrap().to_vec();
        let chunks_b = ChunkManifest::decode(&manifest_b[4..]).unwrap();
        h.pubsub
            .append_all("s_rt", 0, write(b"big", b"small now", 5))
            .unwrap();
        wait_for("the small value", || {
            read(b"big").as_deref() == Some(&b"small now"[..])
        })
        .await;
        assert!(store.get(&chunks_b.chunk_key(b"big", 0)).unwrap().is_none());
        following.stop().await;
    }

    /// A hybrid replica of `s` v1 p0 (lag bound 0) ingesting and following in the background.
    struct Following {
        slot: Arc<ReplicaSlot>,
        stop: watch::Sender<bool>,
        follow: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Following {
        fn start(h: &Harness) -> Following {
            Following::start_with(h, hybrid_plan(0))
        }

        fn start_with(h: &Harness, plan: ReplicaPlan) -> Following {
            let slot = slot(h);
            let (stop, stop_rx) = watch::channel(false);
            let (follow, follow_rx) = watch::channel(true);
            let task = tokio::spawn(run(h.ctx.clone(), slot.clone(), plan, stop_rx, follow_rx));
            Following {
                slot,
                stop,
                follow,
                task,
            }
        }

        /// Superseded by a newer version: stops following and is sealed (`stop` never sent).
        async fn supersede(self) {
            self.follow.send(false).unwrap();
            tokio::time::timeout(Duration::from_secs(20), self.task)
                .await
                .unwrap()
                .unwrap();
        }

        async fn stop(self) {
            self.stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(20), self.task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// The replica's reported record, once `check` holds for it.
    async fn reported_when(
        h: &Harness,
        what: &str,
        check: impl Fn(&ReplicaRecord) -> bool,
    ) -> ReplicaRecord {
        for _ in 0..400 {
            let key = h.ctx.layout.replica("s", 1, 0, "n1");
            if let Some(kv) = h.meta.get(&key).await.unwrap() {
                let r: ReplicaRecord = serde_json::from_slice(&kv.value).unwrap();
                if check(&r) {
                    return r;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}: {:?}", reported(h).await);
    }

    async fn decide(h: &Harness, offset: i64, action: rialto_protocol::meta::RealtimeAction) {
        let decision = rialto_protocol::meta::RealtimeDecision {
            partition: 0,
            offset,
            action,
            decided_by: "operator".into(),
            decided_ms: 0,
        };
        let key = h.ctx.layout.realtime_decision("s", 0, offset);
        let value = rialto_protocol::meta::encode_record(&decision).unwrap();
        h.meta.put(&key, value, None).await.unwrap();
    }

    /// The value the replica holds for `key` (`None` before its database is open, too).
    fn stored(slot: &ReplicaSlot, key: &str) -> Option<Vec<u8>> {
        let store = slot.store()?;
        let v = store.get(key.as_bytes()).unwrap();
        v.map(|v| v[4..].to_vec())
    }

    #[tokio::test]
    async fn a_corrupt_real_time_record_halts_the_copy_until_an_operator_skips_it() {
        let h = harness().await;
        h.pubsub.create_topic("s_rt", 1).await.unwrap();
        h.pubsub
            .append_all(TOPIC, 0, PushRecords::start([1; 16]).finish())
            .unwrap();
        let mut writer = rialto_protocol::producer::PartitionWriter::new([9; 16]);
        let mut records = realtime(&mut writer, true, &[("a", Some("1")), ("b", Some("2"))]);
        // The third record's CRC is broken.
        let mut bad = realtime(&mut writer, false, &[("c", Some("3"))]).remove(0);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        records.push(bad);
        records.extend(realtime(&mut writer, false, &[("d", Some("4"))]));
        h.pubsub.append_all("s_rt", 0, records).unwrap();
        let following = Following::start(&h);
        let slot = following.slot.clone();
        let r = reported_when(&h, "ERROR", |r| r.state == ReplicaState::Error).await;
        let error = r.error.unwrap();
        assert!(
            error.contains("corrupt record at offset 3 of s_rt/0")
                && error.contains("`rialto-admin realtime skip s --partition 0 --offset 3`")
                && !error.contains("accept"),
            "a record that does not decode can only be skipped: {error}"
        );
        // Halted: nothing from the corrupt record on is copied, what was copied stays.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(stored(&slot, "b").as_deref(), Some(&b"2"[..]));
        assert_eq!((stored(&slot, "c"), stored(&slot, "d")), (None, None));
        // The halted leader keeps the leadership, so the other replicas do not halt in turn.
        let leader_key = h.ctx.layout.partition_leader("s", 1, 0);
        let holder = h.meta.get(&leader_key).await.unwrap().unwrap().value;
        assert!(LeadershipRecord::is_held_by(&holder, "n1"));

        // The operator skips it: the copy resumes after it, and the replica goes ONLINE.
        decide(&h, 3, rialto_protocol::meta::RealtimeAction::Skip).await;
        let r = reported_when(&h, "ONLINE", |r| r.state == ReplicaState::Online).await;
        assert_eq!((r.error, r.lag), (None, Some(0)));
        assert_eq!(stored(&slot, "d").as_deref(), Some(&b"4"[..]));
        assert_eq!(
            stored(&slot, "c"),
            None,
            "the skipped record is never applied"
        );
        // And its writer's later records are copied (its sequence is checked afresh).
        h.pubsub
            .append_all("s_rt", 0, realtime(&mut writer, false, &[("e", Some("5"))]))
            .unwrap();
        wait_for("the write after the skip", || {
            stored(&slot, "e").as_deref() == Some(b"5")
        })
        .await;
        following.stop().await;
    }

    /// Registers real-time writer `guid` of store `s`: its registration's key and its secret.
    /// Registers producer `guid` with a fresh secret at `key`.
    async fn register_at(h: &Harness, key: &str, guid: [u8; 16]) -> WriterSecret {
        use rialto_security::signing::{generate_secret, secret_hex};
        let secret = generate_secret().unwrap();
        let registration = rialto_protocol::meta::RealtimeWriterRecord {
            producer: guid_hex(&guid),
            secret: secret_hex(&secret),
            registered_by: "pusher".into(),
            registered_ms: 0,
        };
        let value = rialto_protocol::meta::encode_record(&registration).unwrap();
        h.meta.put(key, value, None).await.unwrap();
        WriterSecret::new(&secret).unwrap()
    }

    /// Registers a real-time writer of store `s`: its registration's key and its secret.
    async fn register_writer(h: &Harness, guid: [u8; 16]) -> (String, WriterSecret) {
        let key = h.ctx.layout.realtime_writer("s", &guid_hex(&guid));
        let secret = register_at(h, &key, guid).await;
        (key, secret)
    }

    /// Registers the push of version 1 of store `s`, as the controller does when it starts.
    async fn register_push(h: &Harness, guid: [u8; 16]) -> WriterSecret {
        let key = h.ctx.layout.version_copier("s", 1, &guid_hex(&guid));
        register_at(h, &key, guid).await
    }

    /// Sends `records` to partition 0 of `topic`, each signed by `signer` if given.
    async fn send_signed(
        h: &Harness,
        topic: &str,
        records: Vec<Vec<u8>>,
        signer: Option<WriterSecret>,
    ) {
        for bytes in records {
            let key = signer
                .as_ref()
                .map(|s| s.sign(&bytes).to_vec())
                .unwrap_or_default();
            h.pubsub
                .send(topic, 0, &key, &bytes)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn with_authorization_only_a_push_signed_with_its_registered_secret_is_ingested() {
        async fn push_to(h: &Harness) -> (ReplicaRecord, Arc<ReplicaSlot>) {
            let signed_plan = ReplicaPlan {
                producer: Some(guid_hex(&[1; 16])),
                ..plan()
            };
            let slot = slot(h);
            run_plan_to_end(h, &slot, signed_plan).await;
            (reported(h).await, slot)
        }

        // A version whose push has no registration: nothing can be verified, nothing is read.
        let h = harness_of(ChunkLimits::default(), false, true).await;
        h.pubsub.append_all(TOPIC, 0, clean_push(5)).unwrap();
        let (r, _) = push_to(&h).await;
        assert_eq!(r.state, ReplicaState::Error);
        let error = r.error.unwrap();
        assert!(
            error.contains("has no signing registration") && error.contains("/copiers/s/"),
            "{error}"
        );
        assert_eq!(r.offset, 0);

        // Someone with the producer's GUID but not its secret slips in a record: the replica
        // stops at it, having applied only what the push signed.
        let h = harness_of(ChunkLimits::default(), false, true).await;
        let push = register_push(&h, [1; 16]).await;
        let mut records = clean_push(5);
        let forged = records.split_off(3);
        send_signed(&h, TOPIC, records, Some(push.clone())).await;
        let intruder =
            WriterSecret::new(&rialto_security::signing::generate_secret().unwrap()).unwrap();
        send_signed(&h, TOPIC, forged[..1].to_vec(), Some(intruder)).await;
        send_signed(&h, TOPIC, forged[1..].to_vec(), Some(push.clone())).await;
        let (r, slot) = push_to(&h).await;
        assert_eq!(r.state, ReplicaState::Error);
        let error = r.error.unwrap();
        assert!(
            error.contains("record at offset 3 of s_v1/0 is not signed by the version's push"),
            "{error}"
        );
        let store = slot.take_store().unwrap();
        assert_eq!(store.checkpoint().unwrap().unwrap().next_offset, 3);
        assert!(store.get(b"k0").unwrap().is_some());
        assert!(store.get(b"k1").unwrap().is_none());

        // The same push, every record signed: ONLINE with all of it.
        let h = harness_of(ChunkLimits::default(), false, true).await;
        let push = register_push(&h, [1; 16]).await;
        send_signed(&h, TOPIC, clean_push(5), Some(push)).await;
        let (r, _) = push_to(&h).await;
        assert_eq!(r.state, ReplicaState::Online, "{r:?}");
        let store = h.ctx.registry.online("s", 1, 0).unwrap();
        assert_eq!(
            store.get(b"k4").unwrap().as_deref(),
            Some(&StoredValue::encode(1, b"v4")[..])
        );
    }

    /// A replica's harness verifying signatures, with the real-time topic, a signed push of `s`
    /// v1 and the registered real-time writer `[9; 16]`: its registration's key and its secret.
    async fn signed_hybrid() -> (Harness, String, WriterSecret) {
        let h = harness_of(ChunkLimits::default(), false, true).await;
        h.pubsub.create_topic("s_rt", 1).await.unwrap();
        let push = register_push(&h, [1; 16]).await;
        let records = PushRecords::start([1; 16]).finish();
        send_signed(&h, TOPIC, records, Some(push)).await;
        let (key, signer) = register_writer(&h, [9; 16]).await;
        (h, key, signer)
    }

    #[tokio::test]
    async fn with_authorization_a_forged_copy_in_the_version_topic_is_dropped_unapplied() {
        let (h, _, signer) = signed_hybrid().await;
        let mut writer = rialto_protocol::producer::PartitionWriter::new([9; 16]);
        let records = realtime(&mut writer, true, &[("a", Some("1"))]);
        send_signed(&h, "s_rt", records, Some(signer.clone())).await;
        let following = Following::start(&h);
        let slot = following.slot.clone();
        wait_for("the leader's copy", || {
            stored(&slot, "a").as_deref() == Some(b"1")
        })
        .await;

        // Someone with write access to the version topic adds a copy of their own, with an epoch
        // that would fence the real leader off, unsigned (or signed by no registered copier).
        let mut forger = rialto_protocol::producer::PartitionWriter::new([66; 16]);
        let put = rialto_protocol::envelope::Message::Put {
            key: b"a".to_vec(),
            schema_id: 1,
            value: b"forged".to_vec(),
        };
        let upstream = rialto_protocol::envelope::Upstream {
            epoch: u64::MAX / 2,
            offset: 1_000,
        };
        let forged = vec![
            forger.start_segment().encode(),
            forger.copied(put, upstream).encode(),
        ];
        let intruder =
            WriterSecret::new(&rialto_security::signing::generate_secret().unwrap()).unwrap();
        send_signed(&h, TOPIC, forged, Some(intruder)).await;
        // The real leader's copies go on being applied, the forged one never is.
        let records = realtime(&mut writer, false, &[("b", Some("2")), ("a", Some("3"))]);
        send_signed(&h, "s_rt", records, Some(signer)).await;
        wait_for("the leader's later copies", || {
            stored(&slot, "a").as_deref() == Some(b"3")
        })
        .await;
        assert_eq!(stored(&slot, "b").as_deref(), Some(&b"2"[..]));
        assert_eq!(
            h.ctx
                .metrics
                .unauthenticated_copies_dropped
                .load(Ordering::Relaxed),
            2,
            "the forger's START_OF_SEGMENT and put"
        );
        following.stop().await;
    }

    #[tokio::test]
    async fn with_authorization_only_records_signed_by_registered_writers_are_copied() {
        use rialto_security::signing::generate_secret;
        let (h, key, signer) = signed_hybrid().await;
        let send = |records, signer| send_signed(&h, "s_rt", records, signer);
        let mut writer = rialto_protocol::producer::PartitionWriter::new([9; 16]);
        let signed = realtime(&mut writer, true, &[("a", Some("1")), ("b", Some("2"))]);
        send(signed, Some(signer.clone())).await;
        // Its next record, written by someone without the secret.
        let forged = realtime(&mut writer, false, &[("c", Some("forged"))]);
        send(forged, None).await;
        send(
            realtime(&mut writer, false, &[("d", Some("4"))]),
            Some(signer.clone()),
        )
        .await;

        let following = Following::start(&h);
        let slot = following.slot.clone();
        let r = reported_when(&h, "ERROR", |r| r.state == ReplicaState::Error).await;
        let error = r.error.unwrap();
        assert!(
            error.contains("unauthenticated record at offset 3 of s_rt/0")
                && error.contains("not signed"),
            "{error}"
        );
        assert_eq!(stored(&slot, "b").as_deref(), Some(&b"2"[..]));
        assert_eq!(stored(&slot, "c"), None);
        decide(&h, 3, rialto_protocol::meta::RealtimeAction::Skip).await;
        wait_for("the signed record after the skipped one", || {
            stored(&slot, "d").as_deref() == Some(b"4")
        })
        .await;

        // A producer nobody registered, signing with a secret of its own.
        let intruder = WriterSecret::new(&generate_secret().unwrap()).unwrap();
        let mut other = rialto_protocol::producer::PartitionWriter::new([7; 16]);
        send(
            realtime(&mut other, true, &[("e", Some("intruder"))]),
            Some(intruder),
        )
        .await;
        let r = reported_when(&h, "ERROR again", |r| r.state == ReplicaState::Error).await;
        let error = r.error.unwrap();
        assert!(
            error.contains("unauthenticated record at offset 5 of s_rt/0")
                && error.contains(&format!(
                    "producer {} is not a registered writer",
                    guid_hex(&[7; 16])
                )),
            "{error}"
        );
        // The operator may still take its records (their call), one decision per record: its
        // START_OF_SEGMENT, then its put, which is copied.
        decide(&h, 5, rialto_protocol::meta::RealtimeAction::Accept).await;
        let r = reported_when(&h, "a halt on the next record", |r| {
            r.error
                .as_ref()
                .is_some_and(|e| e.contains("offset 6 of s_rt/0"))
        })
        .await;
        assert_eq!(r.state, ReplicaState::Error);
        decide(&h, 6, rialto_protocol::meta::RealtimeAction::Accept).await;
        wait_for("the accepted record", || {
            stored(&slot, "e").as_deref() == Some(b"intruder")
        })
        .await;
        assert_eq!(stored(&slot, "c"), None);

        // Revoked, the registered writer's next record is refused too.
        h.meta.delete(&key).await.unwrap();
        tokio::time::sleep(crate::hybrid::LEADERSHIP_CHECK).await;
        send(
            realtime(&mut writer, false, &[("f", Some("revoked"))]),
            Some(signer),
        )
        .await;
        let r = reported_when(&h, "a halt on the revoked writer", |r| {
            r.error
                .as_ref()
                .is_some_and(|e| e.contains("offset 7 of s_rt/0"))
        })
        .await;
        assert!(r.error.unwrap().contains("is not a registered writer"));
        assert_eq!(stored(&slot, "f"), None);
        following.stop().await;
    }

    #[tokio::test]
    async fn a_real_time_record_after_a_gap_is_copied_once_an_operator_accepts_it() {
        let h = harness().await;
        h.pubsub.create_topic("s_rt", 1).await.unwrap();
        h.pubsub
            .append_all(TOPIC, 0, PushRecords::start([1; 16]).finish())
            .unwrap();
        let mut writer = rialto_protocol::producer::PartitionWriter::new([9; 16]);
        let mut records = realtime(&mut writer, true, &[("a", Some("1"))]);
        // Sequence 2 is lost: the record after it is refused.
        let _lost = realtime(&mut writer, false, &[("b", Some("2"))]);
        records.extend(realtime(
            &mut writer,
            false,
            &[("c", Some("3")), ("a", Some("4"))],
        ));
        h.pubsub.append_all("s_rt", 0, records).unwrap();
        let following = Following::start(&h);
        let slot = following.slot.clone();
        let r = reported_when(&h, "ERROR", |r| r.state == ReplicaState::Error).await;
        let error = r.error.unwrap();
        assert!(
            error.contains("invalid record at offset 2 of s_rt/0")
                && error.contains("gap in segment")
                && error.contains("`rialto-admin realtime accept s --partition 0 --offset 2`"),
            "{error}"
        );
        assert_eq!(stored(&slot, "a").as_deref(), Some(&b"1"[..]));
        assert_eq!(stored(&slot, "c"), None);
        // A decision about another record changes nothing.
        decide(&h, 1, rialto_protocol::meta::RealtimeAction::Skip).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(reported(&h).await.state, ReplicaState::Error);
        assert_eq!(stored(&slot, "c"), None);

        decide(&h, 2, rialto_protocol::meta::RealtimeAction::Accept).await;
        let r = reported_when(&h, "ONLINE", |r| r.state == ReplicaState::Online).await;
        assert_eq!(r.error, None);
        assert_eq!(stored(&slot, "c").as_deref(), Some(&b"3"[..]), "accepted");
        assert_eq!(
            stored(&slot, "a").as_deref(),
            Some(&b"4"[..]),
            "and what follows it"
        );
        following.stop().await;
    }
}
