//! Hybrid versions: the partition leader that copies real-time writes into the version topic.
//!
//! One replica of each partition of a hybrid version is its *leader*, chosen through etcd: the
//! first replica past END_OF_PUSH to create `partition_leader(store, version, partition)` under
//! its server's lease holds it until it stops, its server dies or loses its lease. The key's mod
//! revision is the leader's *epoch*. A leader:
//!
//! 1. waits until its own replica has applied the version topic up to where it stood when the
//!    term began (so it knows what earlier leaders copied);
//! 2. writes START_OF_SEGMENT of its own producer and, if no START_OF_BUFFER_REPLAY was applied
//!    yet, one saying where the replay starts: the first real-time record of the last
//!    `rewind_seconds` (found by timestamp);
//! 3. copies real-time records in order into the version topic, each carrying its real-time
//!    offset and the leader's epoch, from the offset after the last one its replica applied.
//!
//! Every replica, the leader's included, applies records only from the version topic (see
//! `validator::ReplayState` for the rules), so all replicas apply the same sequence; a stale
//! leader still writing is fenced off by its epoch. The leader validates the real-time topic's
//! producer metadata ([`RealtimeValidation`]) and, on a server with authorization on, each
//! record's signature by a writer registered at the controller ([`Signers`]): a redelivered
//! record is not copied; a gap, a corrupt or unauthenticated record or a segment checksum
//! mismatch *halts* the copy (it never copies a record it
//! cannot vouch for): the leader's replica reports ERROR with the record's partition and offset
//! and the commands that settle it, and the leader waits, keeping the leadership (so the
//! partition's other replicas do not meet the same record and halt in turn; they go on serving
//! what they have, with a growing lag), for an operator's decision in etcd: `rialto-admin
//! realtime skip` drops the record, `accept` copies it anyway. A decision holds for every
//! version of the store, so a later version replaying the record does not halt on it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use rialto_backends::clock::now_ms;
use rialto_backends::{ConsumedRecord, PubSubError};
use rialto_protocol::codec::{self, ValueCompressor};
use rialto_protocol::envelope::{ControlMessage, Envelope, Message, SegmentChecksum, Upstream};
use rialto_protocol::meta::{
    decode_record, encode_record, realtime_topic, Compression, LeadershipRecord, RealtimeAction,
    RealtimeDecision, RealtimeWriterRecord, ReplicaState,
};
use rialto_protocol::producer::PartitionWriter;
use rialto_protocol::stored::{
    generation_chunk_index, CHECKSUM_BYTES, CHUNK_SCHEMA_ID, MANIFEST_SCHEMA_ID,
};
use rialto_security::signing::WriterSecret;
use tokio::sync::watch;

use crate::node::NodeContext;
use crate::replica::ReplicaPlan;
use crate::replica::ReplicaSlot;
use crate::validator::{guid_hex, GuidHex, ReplayState};

/// How often a leader checks that it still holds its partition, and a candidate retries.
pub const LEADERSHIP_CHECK: Duration = Duration::from_secs(1);
/// A leader closes its segment after this many copied records (its checksum gets verified).
pub const COPIED_SEGMENT_RECORDS: u32 = 10_000;
/// How long the broker may hold a fetch of a real-time consumer (the leader's of the
/// real-time topic, a following replica's of its version topic) by default. Kafka answers a
/// fetch as soon as it has a record, so there this only sets how often an idle consumer asks;
/// tansu holds every fetch this long (half of it from 500 ms on), and a write crosses two
/// fetches: librdkafka's default of 500 ms gave 0.8 s freshness at p50.
pub const DEFAULT_REALTIME_FETCH_WAIT: Duration = Duration::from_millis(50);
/// Real-time records read per poll.
const POLL_RECORDS_MAX: usize = 1000;
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// What the replica's ingestion has applied, for its leader.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Next version-topic offset to consume.
    pub next_offset: i64,
    pub replay: Option<ReplayState>,
}

/// Why a leadership term ended.
enum TermEnd {
    /// Stopped, or the leadership went to someone else: try again (or stop).
    Yielded,
    /// This replica cannot copy at all (no compressor for the version's codec): it goes to
    /// ERROR and leaves the leadership to another replica.
    Fatal(String),
}

/// Runs the replica's candidacy and leadership until `stop`. A fatal problem is sent on
/// `failure` (the ingestion task puts the replica in ERROR); while halted on a refused
/// real-time record, `halted` holds why (the replica reports ERROR until an operator decides).
pub(crate) async fn lead(
    ctx: Arc<NodeContext>,
    slot: Arc<ReplicaSlot>,
    plan: ReplicaPlan,
    progress: watch::Receiver<Progress>,
    mut stop: watch::Receiver<bool>,
    failure: watch::Sender<Option<String>>,
    halted: watch::Sender<Option<String>>,
) {
    let key = ctx
        .layout
        .partition_leader(&slot.id.store, slot.id.version, slot.id.partition);
    loop {
        if *stop.borrow() {
            return;
        }
        match acquire(&ctx, &key).await {
            Ok(Some(epoch)) => {
                tracing::info!(replica = %slot.id, epoch, "partition leader");
                set_leader(&ctx, &slot, true).await;
                let term = Term { key: &key, epoch };
                let end = lead_term(
                    &ctx,
                    &slot,
                    &plan,
                    term,
                    progress.clone(),
                    &mut stop,
                    &halted,
                )
                .await;
                if let TermEnd::Fatal(message) = end {
                    release(&ctx, &key, epoch).await;
                    set_leader(&ctx, &slot, false).await;
                    tracing::error!(replica = %slot.id, error = %message, "this replica cannot lead its partition; another one may");
                    let _ = failure.send(Some(message));
                    return;
                }
                release(&ctx, &key, epoch).await;
                set_leader(&ctx, &slot, false).await;
                tracing::info!(replica = %slot.id, epoch, "no longer partition leader");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(replica = %slot.id, error = %e, "leader election failed; retrying")
            }
        }
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(LEADERSHIP_CHECK) => {}
        }
    }
}

async fn set_leader(ctx: &NodeContext, slot: &ReplicaSlot, leader: bool) {
    slot.update(&ctx.metrics, |r| r.leader = leader);
    ctx.report(slot).await;
}

/// Tries to take the leadership; its epoch when won.
async fn acquire(ctx: &NodeContext, key: &str) -> Result<Option<u64>, String> {
    let lease = *ctx.lease_id.lock().await;
    let won = ctx
        .meta
        .compare_and_put(
            key,
            None,
            LeadershipRecord::new(&ctx.node_id, now_ms()).encode(),
            Some(lease),
        )
        .await
        .map_err(|e| e.to_string())?;
    if !won {
        return Ok(None);
    }
    match ctx.meta.get(key).await.map_err(|e| e.to_string())? {
        Some(kv) if LeadershipRecord::is_held_by(&kv.value, &ctx.node_id) => {
            Ok(Some(kv.mod_revision as u64))
        }
        _ => Ok(None),
    }
}

/// Whether the leadership is still this term's.
async fn holds(ctx: &NodeContext, key: &str, epoch: u64) -> bool {
    match ctx.meta.get(key).await {
        Ok(Some(kv)) => {
            LeadershipRecord::is_held_by(&kv.value, &ctx.node_id) && kv.mod_revision as u64 == epoch
        }
        Ok(None) => false,
        // Unknown: keep going; the next check decides (a stale leader is fenced off anyway).
        Err(_) => true,
    }
}

async fn release(ctx: &NodeContext, key: &str, epoch: u64) {
    if holds(ctx, key, epoch).await {
        if let Err(e) = ctx.meta.delete(key).await {
            tracing::warn!(key, error = %e, "cannot release the partition leadership; it expires with the lease");
        }
    }
}

/// One leadership term: catch up, announce, copy until stopped or dethroned.
async fn lead_term(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    plan: &ReplicaPlan,
    term: Term<'_>,
    mut progress: watch::Receiver<Progress>,
    stop: &mut watch::Receiver<bool>,
    halted: &watch::Sender<Option<String>>,
) -> TermEnd {
    let Term { key, epoch } = term;
    let Some(hybrid) = plan.hybrid else {
        return TermEnd::Yielded;
    };
    let partition = slot.id.partition;
    let rt_topic = realtime_topic(&slot.id.store);
    let mut last_check = Instant::now();

    // 1. Everything written to the version topic before this term is applied here.
    let end = loop {
        match ctx.pubsub.watermarks(&plan.topic, partition).await {
            Ok((_, high)) => break high,
            Err(e) => {
                tracing::warn!(replica = %slot.id, error = %e, "cannot read the version topic's end; retrying");
                if wait(stop, LEADERSHIP_CHECK).await {
                    return TermEnd::Yielded;
                }
            }
        }
    };
    loop {
        if progress.borrow().next_offset >= end {
            break;
        }
        tokio::select! {
            biased;
            _ = stopped(stop) => return TermEnd::Yielded,
            changed = progress.changed() => if changed.is_err() { return TermEnd::Yielded },
            _ = tokio::time::sleep(LEADERSHIP_CHECK) => {
                if !holds(ctx, key, epoch).await {
                    return TermEnd::Yielded;
                }
            }
        }
    }

    // 2. Where the copy starts.
    let mut copier = match Copier::new(slot, plan, epoch) {
        Ok(c) => c,
        Err(e) => return TermEnd::Fatal(e),
    };
    if let Err(e) = copier.register(ctx, slot).await {
        tracing::warn!(replica = %slot.id, error = %e, "cannot register the copy producer; yielding the leadership");
        return TermEnd::Yielded;
    }
    let replay = progress.borrow().replay;
    let start = match replay {
        Some(r) => r.next_realtime_offset(),
        None => {
            let since = now_ms() - (hybrid.rewind_seconds as i64).saturating_mul(1000);
            let start = match replay_start(ctx, &rt_topic, partition, since).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(replica = %slot.id, error = %e, "cannot find where the replay starts; retrying");
                    return TermEnd::Yielded;
                }
            };
            tracing::info!(replica = %slot.id, epoch, realtime_offset = start, rewind_s = hybrid.rewind_seconds, "START_OF_BUFFER_REPLAY");
            copier
                .pending
                .push(copier.writer.control(ControlMessage::StartOfBufferReplay {
                    rt_offsets: vec![start],
                }));
            start
        }
    };
    if let Err(e) = copier.flush(ctx).await {
        tracing::warn!(replica = %slot.id, error = %e, "cannot write to the version topic; yielding the leadership");
        return TermEnd::Yielded;
    }

    // 3. Copy.
    let mut consumer = match ctx
        .pubsub
        .realtime_consumer(&rt_topic, partition, start, ctx.realtime_fetch_wait)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(replica = %slot.id, error = %e, "cannot consume the real-time topic; yielding the leadership");
            return TermEnd::Yielded;
        }
    };
    let mut validation = RealtimeValidation::default();
    let mut signers = ctx.verify_signatures.then(Signers::default);
    let end = 'copy: loop {
        if last_check.elapsed() >= LEADERSHIP_CHECK {
            last_check = Instant::now();
            if !holds(ctx, key, epoch).await {
                break TermEnd::Yielded;
            }
        }
        let polled = tokio::select! {
            biased;
            _ = stopped(stop) => break TermEnd::Yielded,
            polled = consumer.poll(POLL_RECORDS_MAX, POLL_TIMEOUT) => polled,
        };
        let records = match polled {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(replica = %slot.id, error = %e, "real-time poll failed; retrying");
                if wait(stop, Duration::from_millis(200)).await {
                    break TermEnd::Yielded;
                }
                continue;
            }
        };
        for record in records {
            let offset = record.offset;
            let at = At {
                offset,
                topic: &rt_topic,
                partition,
            };
            let upstream = Upstream { epoch, offset };
            let mut attempt = match decode(record.value.as_deref(), at) {
                Ok(envelope) => match signers.as_mut() {
                    None => validate(envelope, at, &mut validation),
                    Some(signers) => match signers.check(ctx, slot, stop, &envelope, &record).await
                    {
                        Signed::Valid => validate(envelope, at, &mut validation),
                        Signed::Refused(why) => Err(Refusal {
                            reason: format!("unauthenticated record at {at}: {why}"),
                            envelope: Some(envelope),
                        }),
                        Signed::Stopped => break 'copy TermEnd::Yielded,
                    },
                },
                Err(refusal) => Err(refusal),
            };
            loop {
                let refusal = match attempt {
                    Ok(None) => break,
                    Ok(Some(message)) => match copier.copy(message, upstream) {
                        Ok(()) => break,
                        Err(e) => Refusal {
                            reason: format!("the record at {at} cannot be copied: {e}"),
                            envelope: None,
                        },
                    },
                    Err(refusal) => refusal,
                };
                // What was copied before the refused record reaches every replica first.
                if let Err(e) = copier.flush(ctx).await {
                    tracing::warn!(replica = %slot.id, error = %e, "cannot write to the version topic; yielding the leadership");
                    break 'copy TermEnd::Yielded;
                }
                attempt = match resolve(
                    ctx,
                    slot,
                    term,
                    stop,
                    halted,
                    offset,
                    refusal,
                    &mut validation,
                )
                .await
                {
                    Resolved::Skip => break,
                    Resolved::Copy(message) => Ok(Some(message)),
                    Resolved::Yield => break 'copy TermEnd::Yielded,
                };
            }
        }
        if let Err(e) = copier.flush(ctx).await {
            tracing::warn!(replica = %slot.id, error = %e, "cannot write to the version topic; yielding the leadership");
            break TermEnd::Yielded;
        }
    };
    let end_segment = copier.writer.end_segment();
    copier.pending.push(end_segment);
    let _ = copier.flush(ctx).await;
    close_consumer(consumer).await;
    end
}

/// Returns once `stop` is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits `pause` unless stopped first; true when stopped.
async fn wait(stop: &mut watch::Receiver<bool>, pause: Duration) -> bool {
    tokio::select! {
        biased;
        _ = stopped(stop) => true,
        _ = tokio::time::sleep(pause) => false,
    }
}

async fn close_consumer(consumer: Box<dyn rialto_backends::PartitionConsumer>) {
    let _ = rialto_backends::blocking::spawn(move || drop(consumer)).await;
}

/// A real-time record the leader does not copy on its own.
struct Refusal {
    reason: String,
    /// The record, when it decodes: only such a record can be accepted.
    envelope: Option<Envelope>,
}

/// Where a real-time record is, for messages (formatted only when one is written).
#[derive(Clone, Copy)]
struct At<'a> {
    offset: i64,
    topic: &'a str,
    partition: u32,
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "offset {} of {}/{}",
            self.offset, self.topic, self.partition
        )
    }
}

/// Decodes one real-time record.
fn decode(value: Option<&[u8]>, at: At<'_>) -> Result<Envelope, Refusal> {
    let Some(value) = value else {
        return Err(Refusal {
            reason: format!("the record at {at} has no value"),
            envelope: None,
        });
    };
    Envelope::decode(value).map_err(|e| Refusal {
        reason: format!("corrupt record at {at}: {e}"),
        envelope: None,
    })
}

/// Checks a decoded record's producer metadata: the message to copy, `None` for a record that is
/// not copied (a control record, a redelivery), or why it is refused.
fn validate(
    envelope: Envelope,
    at: At<'_>,
    validation: &mut RealtimeValidation,
) -> Result<Option<Message>, Refusal> {
    match validation.check(&envelope) {
        Ok(RealtimeVerdict::Copy) => Ok(Some(envelope.message)),
        Ok(RealtimeVerdict::Skip) => Ok(None),
        Err(e) => Err(Refusal {
            reason: format!("invalid record at {at}: {e}"),
            envelope: Some(envelope),
        }),
    }
}

/// Whether a real-time record is signed by a registered writer.
enum Signed {
    Valid,
    Refused(String),
    /// Stopped while etcd could not be read.
    Stopped,
}

/// The secrets of the store's registered real-time writers a leader has met, read from etcd
/// on first sight of each producer and again once [`LEADERSHIP_CHECK`] old, so a revoked
/// writer's records are refused within a second (`rialto_security::signing`).
#[derive(Default)]
struct Signers {
    secrets: std::collections::HashMap<[u8; 16], (WriterSecret, Instant)>,
}

impl Signers {
    async fn check(
        &mut self,
        ctx: &NodeContext,
        slot: &ReplicaSlot,
        stop: &mut watch::Receiver<bool>,
        envelope: &Envelope,
        record: &ConsumedRecord,
    ) -> Signed {
        let guid = envelope.producer.producer_guid;
        let producer = guid_hex(&guid);
        let store = &slot.id.store;
        let fresh = |(_, read): &(WriterSecret, Instant)| read.elapsed() < LEADERSHIP_CHECK;
        if !self.secrets.get(&guid).is_some_and(fresh) {
            self.secrets.remove(&guid);
            let key = ctx.layout.realtime_writer(store, &producer);
            match registered_secret(ctx, slot, &key, stop).await {
                None => return Signed::Stopped,
                Some(Ok(Some(secret))) => {
                    self.secrets.insert(guid, (secret, Instant::now()));
                }
                Some(Ok(None)) => {
                    return Signed::Refused(format!(
                        "producer {producer} is not a registered writer of store `{store}` \
                         (writers register through the controller: `RealtimeWriter::connect`, \
                         `rialto-push stream`; an administrator may have revoked it)"
                    ))
                }
                Some(Err(e)) => {
                    return Signed::Refused(format!(
                        "the registration of producer {producer} at `{key}` is unusable: {e}"
                    ))
                }
            }
        }
        let (value, signature) = (
            record.value.as_deref().unwrap_or_default(),
            record.key.as_deref().unwrap_or_default(),
        );
        match self.secrets.get(&guid) {
            Some((secret, _)) if secret.verifies(value, signature) => Signed::Valid,
            _ if signature.is_empty() => Signed::Refused(format!(
                "it is not signed, though it names registered producer {producer}"
            )),
            _ => Signed::Refused(format!(
                "its signature does not verify with the secret of producer {producer}"
            )),
        }
    }
}

/// The secret of the registration at `key` (a [`RealtimeWriterRecord`]): `Ok(None)` when there is
/// none, `Err` when it cannot be used; etcd failures are retried every [`LEADERSHIP_CHECK`],
/// `None` when stopped meanwhile.
pub(crate) async fn registered_secret(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    key: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Result<Option<WriterSecret>, String>> {
    let kv = loop {
        match ctx.meta.get(key).await {
            Ok(kv) => break kv,
            Err(e) => {
                tracing::warn!(replica = %slot.id, %key, error = %e, "cannot read a signing registration; retrying");
                if wait(stop, LEADERSHIP_CHECK).await {
                    return None;
                }
            }
        }
    };
    let Some(kv) = kv else {
        return Some(Ok(None));
    };
    Some(
        decode_record::<RealtimeWriterRecord>(&kv.value)
            .map_err(|e| e.to_string())
            .and_then(|r| WriterSecret::from_hex(&r.secret).map_err(|e| e.to_string()))
            .map(Some),
    )
}

/// Most producer GUIDs a [`CopyCheck`] remembers as unregistered.
const UNREGISTERED_REMEMBERED_MAX: usize = 4096;

/// A following replica's check of its version topic after END_OF_PUSH (servers with
/// authorization on): a record is applied only if it is signed by a producer registered for the
/// version, the push's own (registered by the controller) or a partition leader's copy producer
/// ([`Copier::register`]). Anything else, a forged copy with a high epoch included, is dropped
/// unapplied, counted and logged: it cannot fence the real leader off or change what is served.
#[derive(Default)]
pub(crate) struct CopyCheck {
    secrets: std::collections::HashMap<[u8; 16], WriterSecret>,
    /// Producers found unregistered; a leader registers before it sends, so one never becomes
    /// registered later.
    unregistered: std::collections::HashSet<[u8; 16]>,
}

impl CopyCheck {
    /// `records` without the unauthenticated ones; `None` when stopped while etcd was
    /// unreachable.
    pub(crate) async fn admit(
        &mut self,
        ctx: &NodeContext,
        slot: &ReplicaSlot,
        records: Vec<ConsumedRecord>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Vec<ConsumedRecord>> {
        let mut kept = Vec::with_capacity(records.len());
        for record in records {
            let value = record.value.as_deref().unwrap_or_default();
            // The signature covers every byte; validation decodes the records kept.
            let guid = Envelope::producer_guid_of(value);
            let admitted = match guid {
                Some(guid) => match self.secret(ctx, slot, guid, stop).await? {
                    Some(secret) => {
                        secret.verifies(value, record.key.as_deref().unwrap_or_default())
                    }
                    None => false,
                },
                None => false,
            };
            if admitted {
                kept.push(record);
                continue;
            }
            let dropped = ctx
                .metrics
                .unauthenticated_copies_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if dropped < 100 || dropped.is_power_of_two() {
                tracing::warn!(
                    replica = %slot.id,
                    offset = record.offset,
                    producer = %guid.map(|g| guid_hex(&g)).unwrap_or_else(|| "?".into()),
                    dropped = dropped + 1,
                    "dropped a version-topic record signed neither by the push nor by a partition leader"
                );
            }
        }
        Some(kept)
    }

    /// The registered secret of copy producer `guid`, if any.
    async fn secret(
        &mut self,
        ctx: &NodeContext,
        slot: &ReplicaSlot,
        guid: [u8; 16],
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Option<&WriterSecret>> {
        if self.unregistered.contains(&guid) {
            return Some(None);
        }
        if !self.secrets.contains_key(&guid) {
            let key = ctx
                .layout
                .version_copier(&slot.id.store, slot.id.version, &guid_hex(&guid));
            match registered_secret(ctx, slot, &key, stop).await? {
                Ok(Some(secret)) => {
                    self.secrets.insert(guid, secret);
                }
                Ok(None) | Err(_) => {
                    if self.unregistered.len() >= UNREGISTERED_REMEMBERED_MAX {
                        self.unregistered.clear();
                    }
                    self.unregistered.insert(guid);
                    return Some(None);
                }
            }
        }
        Some(self.secrets.get(&guid))
    }
}

/// The leadership a term holds.
#[derive(Clone, Copy)]
struct Term<'a> {
    key: &'a str,
    epoch: u64,
}

/// What becomes of a refused record.
enum Resolved {
    /// Dropped by an operator's decision.
    Skip,
    /// Accepted by an operator's decision: copy it.
    Copy(Message),
    /// Stopped or dethroned while waiting for a decision.
    Yield,
}

/// Settles a refused real-time record through the operator's decision about it (an etcd record,
/// see [`rialto_protocol::meta::RealtimeDecision`]), halting the copy until there is one: the
/// replica reports ERROR with the reason and the commands that resume it, and serves on what it
/// has. Producer metadata is checked afresh after a decision, as a new leader starting after
/// the record would.
#[allow(clippy::too_many_arguments)]
async fn resolve(
    ctx: &NodeContext,
    slot: &ReplicaSlot,
    term: Term<'_>,
    stop: &mut watch::Receiver<bool>,
    halted: &watch::Sender<Option<String>>,
    offset: i64,
    mut refusal: Refusal,
    validation: &mut RealtimeValidation,
) -> Resolved {
    let (store, partition) = (&slot.id.store, slot.id.partition);
    let decision_key = ctx.layout.realtime_decision(store, partition, offset);
    let mut announced = false;
    let resolved = loop {
        match decision(ctx, &decision_key).await {
            Ok(Some(RealtimeAction::Skip)) => {
                tracing::warn!(replica = %slot.id, offset, reason = %refusal.reason, "real-time record skipped, as an operator decided");
                *validation = RealtimeValidation::default();
                break Resolved::Skip;
            }
            Ok(Some(RealtimeAction::Accept)) => {
                if let Some(envelope) = refusal.envelope.take() {
                    let mut fresh = RealtimeValidation::default();
                    match fresh.check(&envelope) {
                        Ok(verdict) => {
                            tracing::warn!(replica = %slot.id, offset, reason = %refusal.reason, "real-time record accepted, as an operator decided");
                            *validation = fresh;
                            break match verdict {
                                RealtimeVerdict::Copy => Resolved::Copy(envelope.message),
                                RealtimeVerdict::Skip => Resolved::Skip,
                            };
                        }
                        Err(e) => {
                            refusal.reason =
                                format!("{}; it cannot be accepted: {e}", refusal.reason)
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(replica = %slot.id, key = %decision_key, error = %e, "cannot read the operator's decision; retrying")
            }
        }
        let accept = if refusal.envelope.is_some() {
            format!("; `rialto-admin realtime accept {store} --partition {partition} --offset {offset}` copies it")
        } else {
            String::new()
        };
        let message = format!(
            "{}. The partition takes no real-time writes until an operator decides: \
             `rialto-admin realtime skip {store} --partition {partition} --offset {offset}` \
             drops the record{accept}",
            refusal.reason
        );
        if halted.borrow().as_ref() != Some(&message) {
            tracing::error!(replica = %slot.id, error = %message, "leader halted on a real-time record");
            let _ = halted.send(Some(message));
            announced = true;
        }
        if wait(stop, LEADERSHIP_CHECK).await || !holds(ctx, term.key, term.epoch).await {
            break Resolved::Yield;
        }
    };
    if announced {
        let _ = halted.send(None);
    }
    resolved
}

/// The operator's decision about one real-time record, if any.
async fn decision(ctx: &NodeContext, key: &str) -> Result<Option<RealtimeAction>, String> {
    match ctx.meta.get(key).await.map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(kv) => decode_record::<RealtimeDecision>(&kv.value)
            .map(|d| Some(d.action))
            .map_err(|e| e.to_string()),
    }
}

/// The first real-time offset written at or after `since_ms`: where a new version's replay
/// starts (the start of the partition when the broker cannot tell).
pub(crate) async fn replay_start(
    ctx: &NodeContext,
    topic: &str,
    partition: u32,
    since_ms: i64,
) -> Result<i64, PubSubError> {
    match ctx
        .pubsub
        .offset_for_time(topic, partition, since_ms)
        .await?
    {
        Some(offset) => Ok(offset),
        None => Ok(ctx.pubsub.watermarks(topic, partition).await?.0),
    }
}

/// Writes copied records into the version topic with this leader's producer metadata.
struct Copier {
    topic: String,
    partition: u32,
    writer: PartitionWriter,
    /// Envelopes encoded and waiting to be sent.
    pending: Vec<Envelope>,
    /// Compresses copied values the way the version stores them.
    compressor: Option<ValueCompressor>,
    /// Signs every record sent ([`Copier::register`] makes the secret known to the replicas).
    secret: [u8; rialto_security::signing::SECRET_BYTES],
    signer: WriterSecret,
}

impl Copier {
    fn new(slot: &ReplicaSlot, plan: &ReplicaPlan, epoch: u64) -> Result<Copier, String> {
        let compressor = match plan.compression {
            Compression::None => None,
            Compression::Zstd => {
                Some(ValueCompressor::new(codec::DEFAULT_LEVEL, None).map_err(|e| e.to_string())?)
            }
            Compression::ZstdDictionary => {
                let store = slot.store().ok_or("the replica's database is not open")?;
                let dictionary = store
                    .dictionary()
                    .map_err(|e| e.to_string())?
                    .ok_or("the version has no compression dictionary")?;
                Some(
                    ValueCompressor::new(codec::DEFAULT_LEVEL, Some(&dictionary))
                        .map_err(|e| e.to_string())?,
                )
            }
        };
        let mut writer = PartitionWriter::new(*uuid::Uuid::new_v4().as_bytes());
        let sos = writer.start_segment();
        tracing::debug!(replica = %slot.id, epoch, producer = %guid_hex(&sos.producer.producer_guid), "copying as a new producer");
        let secret = rialto_security::signing::generate_secret().map_err(|e| e.to_string())?;
        let signer = WriterSecret::new(&secret).map_err(|e| e.to_string())?;
        Ok(Copier {
            topic: plan.topic.clone(),
            partition: slot.id.partition,
            writer,
            pending: vec![sos],
            compressor,
            secret,
            signer,
        })
    }

    /// Registers this copier's producer and secret for the version (no lease: its copies are
    /// verified for as long as the version exists), before anything is sent.
    async fn register(&self, ctx: &NodeContext, slot: &ReplicaSlot) -> Result<(), String> {
        let producer = guid_hex(&self.writer.producer_guid());
        let record = RealtimeWriterRecord {
            producer: producer.clone(),
            secret: rialto_security::signing::secret_hex(&self.secret),
            registered_by: ctx.node_id.clone(),
            registered_ms: now_ms(),
        };
        let key = ctx
            .layout
            .version_copier(&slot.id.store, slot.id.version, &producer);
        let value = encode_record(&record).map_err(|e| e.to_string())?;
        ctx.meta
            .put(&key, value, None)
            .await
            .map_err(|e| e.to_string())
    }

    /// Queues the copy of one real-time PUT or DELETE.
    fn copy(&mut self, message: Message, upstream: Upstream) -> Result<(), String> {
        let message = match message {
            Message::Put {
                key,
                schema_id,
                value,
            } => {
                let value = match schema_id {
                    // A chunked value's manifest (after its chunks): as written.
                    MANIFEST_SCHEMA_ID => value,
                    CHUNK_SCHEMA_ID => self.stored_chunk(&key, value)?,
                    _ => self.stored_body(value)?,
                };
                Message::Put {
                    key,
                    schema_id,
                    value,
                }
            }
            delete @ Message::Delete { .. } => delete,
            Message::Control(_) => return Ok(()),
        };
        let copied = self.writer.copied(message, upstream);
        self.pending.push(copied);
        if self.writer.segment_records() >= COPIED_SEGMENT_RECORDS {
            let end = self.writer.end_segment();
            self.pending.push(end);
            let start = self.writer.start_segment();
            self.pending.push(start);
        }
        Ok(())
    }

    /// A real-time value (`checksum ‖ datum`) as the version stores it (its payload compressed
    /// with the version's codec).
    fn stored_body(&mut self, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let Some(compressor) = self.compressor.as_mut() else {
            return Ok(body);
        };
        if body.len() < CHECKSUM_BYTES {
            return Err(format!(
                "value of {} bytes is shorter than its checksum",
                body.len()
            ));
        }
        let (checksum, datum) = body.split_at(CHECKSUM_BYTES);
        let compressed = compressor.compress(datum).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(CHECKSUM_BYTES + compressed.len());
        out.extend_from_slice(checksum);
        out.extend_from_slice(&compressed);
        Ok(out)
    }

    /// A chunk of a chunked real-time value as the version stores it: compressed on its own,
    /// the first one's checksum excepted (see `rialto_protocol::stored`).
    fn stored_chunk(&mut self, key: &[u8], chunk: Vec<u8>) -> Result<Vec<u8>, String> {
        let Some(compressor) = self.compressor.as_mut() else {
            return Ok(chunk);
        };
        match generation_chunk_index(key) {
            Some(0) => self.stored_body(chunk),
            Some(_) => compressor.compress(&chunk).map_err(|e| e.to_string()),
            None => Err("a chunk's key without its index".into()),
        }
    }

    /// Sends what is queued and waits until the broker has it.
    async fn flush(&mut self, ctx: &NodeContext) -> Result<(), PubSubError> {
        let mut deliveries = Vec::with_capacity(self.pending.len());
        for e in self.pending.drain(..) {
            let bytes = e.encode();
            let signature = self.signer.sign(&bytes);
            deliveries.push(
                ctx.pubsub
                    .send(&self.topic, self.partition, &signature, &bytes)
                    .await?,
            );
        }
        for d in deliveries {
            d.await?;
        }
        Ok(())
    }
}

/// Whether a real-time record is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealtimeVerdict {
    Copy,
    /// A control record, or a redelivered one.
    Skip,
}

/// One writer's state on one real-time partition, as far as a leader saw it.
#[derive(Debug, Clone, Copy)]
struct RealtimeProducer {
    segment: u32,
    next_sequence: u32,
    checksum: SegmentChecksum,
    /// Whether the current segment was seen from its START_OF_SEGMENT (its checksum can be
    /// verified).
    from_start: bool,
}

/// Producer-metadata checks of a real-time partition, from wherever a leader starts reading:
/// a writer first seen mid-segment is taken as it is; from then on a lower sequence is a
/// redelivery (not copied), a higher one a gap; a segment whose START_OF_SEGMENT was seen must
/// end with a matching checksum.
#[derive(Debug, Default)]
pub struct RealtimeValidation {
    producers: BTreeMap<[u8; 16], RealtimeProducer>,
}

impl RealtimeValidation {
    pub fn check(&mut self, envelope: &Envelope) -> Result<RealtimeVerdict, String> {
        let guid = envelope.producer.producer_guid;
        let (segment, sequence) = (envelope.producer.segment, envelope.producer.sequence);
        let producer = GuidHex::new(&guid);
        let is_sos = matches!(
            envelope.message,
            Message::Control(ControlMessage::StartOfSegment)
        );
        if envelope.upstream.is_some() {
            return Err(format!(
                "writer {producer} wrote a copied record to the real-time topic"
            ));
        }
        let fresh = |from_start| RealtimeProducer {
            segment,
            next_sequence: sequence,
            checksum: SegmentChecksum::default(),
            from_start,
        };
        let mut state = match self.producers.get(&guid).copied() {
            None => fresh(is_sos),
            Some(s) if segment < s.segment => return Ok(RealtimeVerdict::Skip),
            Some(s) if segment == s.segment => {
                if sequence < s.next_sequence {
                    return Ok(RealtimeVerdict::Skip);
                }
                if sequence > s.next_sequence {
                    return Err(format!(
                        "writer {producer}: gap in segment {segment}: expected sequence {}, got {sequence}",
                        s.next_sequence
                    ));
                }
                s
            }
            Some(s) if segment == s.segment.wrapping_add(1) && is_sos && sequence == 0 => {
                fresh(true)
            }
            Some(s) => {
                return Err(format!(
                    "writer {producer}: segment {segment} (sequence {sequence}) does not follow segment {}",
                    s.segment
                ))
            }
        };
        let verdict = match &envelope.message {
            Message::Put { .. } | Message::Delete { .. } => {
                envelope.message.update_checksum(&mut state.checksum);
                RealtimeVerdict::Copy
            }
            Message::Control(ControlMessage::StartOfSegment) => {
                if sequence != 0 {
                    return Err(format!(
                        "writer {producer}: START_OF_SEGMENT with sequence {sequence}"
                    ));
                }
                state.checksum = SegmentChecksum::default();
                state.from_start = true;
                RealtimeVerdict::Skip
            }
            Message::Control(ControlMessage::EndOfSegment {
                checksum,
                record_count,
            }) => {
                if state.from_start
                    && (*checksum != state.checksum.crc
                        || *record_count != state.checksum.record_count)
                {
                    return Err(format!(
                        "writer {producer}: END_OF_SEGMENT of segment {segment} says checksum \
                         {checksum:#010x} over {record_count} records, the records read give \
                         {:#010x} over {}; records were lost or corrupted",
                        state.checksum.crc, state.checksum.record_count
                    ));
                }
                RealtimeVerdict::Skip
            }
            Message::Control(other) => {
                return Err(format!(
                    "writer {producer}: {} does not belong on a real-time topic",
                    other.name()
                ))
            }
        };
        state.next_sequence = sequence.wrapping_add(1);
        self.producers.insert(guid, state);
        Ok(verdict)
    }
}

/// Whether a replica of a hybrid version should say it serves: its lag is known and small.
pub(crate) fn ready(state: ReplicaState, lag: Option<u64>, lag_max: u64) -> bool {
    state != ReplicaState::Error && lag.is_some_and(|l| l <= lag_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rialto_protocol::envelope::ProducerMetadata;

    fn env(guid: u8, segment: u32, sequence: u32, message: Message) -> Envelope {
        Envelope {
            producer: ProducerMetadata {
                producer_guid: [guid; 16],
                segment,
                sequence,
                timestamp_ms: 0,
            },
            message,
            upstream: None,
        }
    }
    fn put(guid: u8, segment: u32, sequence: u32, key: &str) -> Envelope {
        env(
            guid,
            segment,
            sequence,
            Message::Put {
                key: key.as_bytes().to_vec(),
                schema_id: 1,
                value: vec![0; 9],
            },
        )
    }
    fn sos(guid: u8, segment: u32) -> Envelope {
        env(
            guid,
            segment,
            0,
            Message::Control(ControlMessage::StartOfSegment),
        )
    }
    fn eos(guid: u8, segment: u32, sequence: u32, c: SegmentChecksum) -> Envelope {
        env(
            guid,
            segment,
            sequence,
            Message::Control(ControlMessage::EndOfSegment {
                checksum: c.crc,
                record_count: c.record_count,
            }),
        )
    }

    #[test]
    fn a_clean_stream_is_copied_and_redeliveries_are_not() {
        let mut v = RealtimeValidation::default();
        assert_eq!(v.check(&sos(1, 0)).unwrap(), RealtimeVerdict::Skip);
        let (a, b) = (put(1, 0, 1, "a"), put(1, 0, 2, "b"));
        assert_eq!(v.check(&a).unwrap(), RealtimeVerdict::Copy);
        assert_eq!(v.check(&b).unwrap(), RealtimeVerdict::Copy);
        assert_eq!(v.check(&a).unwrap(), RealtimeVerdict::Skip, "redelivered");
        let mut c = SegmentChecksum::default();
        a.message.update_checksum(&mut c);
        b.message.update_checksum(&mut c);
        assert_eq!(v.check(&eos(1, 0, 3, c)).unwrap(), RealtimeVerdict::Skip);
        assert_eq!(v.check(&sos(1, 1)).unwrap(), RealtimeVerdict::Skip);
        assert_eq!(v.check(&put(1, 1, 1, "c")).unwrap(), RealtimeVerdict::Copy);
    }

    #[test]
    fn a_writer_first_seen_mid_segment_is_taken_as_it_is() {
        let mut v = RealtimeValidation::default();
        assert_eq!(v.check(&put(2, 4, 57, "x")).unwrap(), RealtimeVerdict::Copy);
        // Its segment's checksum cannot be verified: the start was not seen.
        let wrong = SegmentChecksum {
            crc: 1,
            record_count: 1000,
        };
        assert_eq!(
            v.check(&eos(2, 4, 58, wrong)).unwrap(),
            RealtimeVerdict::Skip
        );
        assert_eq!(v.check(&sos(2, 5)).unwrap(), RealtimeVerdict::Skip);
    }

    #[test]
    fn gaps_checksum_mismatches_and_foreign_records_are_errors() {
        let mut v = RealtimeValidation::default();
        v.check(&sos(3, 0)).unwrap();
        v.check(&put(3, 0, 1, "a")).unwrap();
        let err = v.check(&put(3, 0, 3, "c")).unwrap_err();
        assert!(
            err.contains("gap in segment 0: expected sequence 2, got 3"),
            "{err}"
        );
        let err = v
            .check(&eos(3, 0, 2, SegmentChecksum::default()))
            .unwrap_err();
        assert!(err.contains("records were lost or corrupted"), "{err}");
        let err = v.check(&put(3, 2, 0, "skip")).unwrap_err();
        assert!(err.contains("does not follow segment 0"), "{err}");
        let err = RealtimeValidation::default()
            .check(&env(4, 0, 0, Message::Control(ControlMessage::EndOfPush)))
            .unwrap_err();
        assert!(err.contains("END_OF_PUSH does not belong"), "{err}");
    }
}
