//! Streaming batch-get: the engine behind [`Client::batch_get_stream_raw`] and `batch_get`.
//!
//! One call runs as one task ([`Call::run`]) that owns the call's state; each request to a server
//! (a *sub-request*) runs as its own task and reports back through the call's inbox as response
//! chunks arrive, so records reach the application while the rest is still on the wire.
//!
//! 1. **Plan.** Keys are partitioned with the shared partitioner. With group routing one group
//!    (logical zone) is chosen per call, the least loaded (fewest pending requests over its
//!    servers, ties rotating); every partition is read from its replica in that group, or from its
//!    least-loaded other replica when that one is blocked or overloaded. Keys are grouped into one
//!    sub-request per server (split further only above the request size limit). Group placement
//!    puts a full copy in every group, so the servers touched are those of one group however many
//!    replicas the store has: the call's **fanout**.
//! 2. **Answers.** The first answer for a key wins; it is streamed out as a [`BatchEvent::Record`].
//!    A sub-request whose keys have all been answered elsewhere is cancelled.
//! 3. **Error retry.** A key a server could not answer (a retryable per-key error, a failed or
//!    broken sub-request) is sent at once to a replica not tried yet, if any.
//! 4. **Long-tail retry.** A sub-request still owing keys after its threshold is hedged: its
//!    unanswered keys go to untried replicas (preferring another single group), within the retry
//!    budget and unless the client's own timer was late (see [`crate::hedge`]).
//! 5. **Deadline.** At `request_timeout` the call stops; the final [`BatchEvent::Done`] carries a
//!    [`Completeness`] listing every key that failed or timed out.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use rialto_protocol::avro::Value;
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::wire::{self, BatchGetRequest};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::client::{error_response, Shared, ERROR_BODY_BYTES_MAX};
use crate::error::ClientError;
use crate::hedge::RequestKind;
use crate::instances::{count_block, Failure, Instance};
use crate::metadata::Codecs;
use crate::response::{BatchResponseDecoder, KeyAnswer, RawValue};
use crate::routing::RoutingTable;
use crate::stats::Counters;
use crate::values::{ValueFault, VersionValues};

/// Largest batch-get request body the client sends (the servers' default limit).
const BATCH_REQUEST_BYTES_MAX: usize = wire::REQUEST_BYTES_MAX;
/// Most requests one key is sent in (first try, hedge, error retries).
const ATTEMPTS_PER_KEY: usize = 4;

/// One item of a streaming batch-get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEvent {
    /// The answer for the key at `index` of the request: its value, or `None` when the store has
    /// no value for it. Each index is answered at most once, in no particular order.
    Record {
        index: usize,
        key: Bytes,
        value: Option<RawValue>,
    },
    /// The call ended; always the last item.
    Done(Completeness),
}

/// A key a batch-get could not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFailure {
    /// Index of the key in the request.
    pub index: usize,
    /// Why (the last error seen for it).
    pub error: String,
}

/// How a batch-get call ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completeness {
    /// Keys in the request.
    pub keys_total: usize,
    /// Keys answered (found or missing).
    pub keys_answered: usize,
    /// Keys not answered, with the reason; sorted by index.
    pub failed: Vec<KeyFailure>,
    /// Whether the call hit `request_timeout` (the failed keys then include the timed-out ones).
    pub timed_out: bool,
    /// Distinct servers of the initial plan (the call's fanout).
    pub fanout: usize,
    /// Addresses of those servers.
    pub servers: Vec<String>,
    /// Distinct servers sent any request, retries included.
    pub servers_contacted: usize,
    /// Long-tail retries (hedges) sent.
    pub long_tail_retries: u32,
    /// Hedges that delivered the first answer for at least one key.
    pub long_tail_retries_won: u32,
    /// Requests re-sent after an error.
    pub error_retries: u32,
    /// Time from the call to its end.
    pub elapsed: Duration,
    /// Set when a server refused keys because the store's read quota was used up (those keys
    /// are in `failed`; they are not retried elsewhere).
    pub quota_exceeded: Option<Refusal>,
    /// Set when a server refused keys because this client's principal may not read the store
    /// (those keys are in `failed`; they are not retried elsewhere).
    pub forbidden: Option<Refusal>,
    /// Set when a server answered that it does not host the version the call was routed to:
    /// the version was retired while this client still routed to it.
    pub version_gone: bool,
}

/// A server's refusal of a read that another replica would refuse too (over quota, forbidden).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub address: String,
    pub message: String,
}

impl Completeness {
    /// Whether every key was answered.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.keys_answered == self.keys_total
    }
}

impl Completeness {
    /// Counts keys that were answered but whose value could not be used (undecodable, or not
    /// the application's type) as failed.
    pub(crate) fn fail_answered(&mut self, failures: Vec<KeyFailure>) {
        self.keys_answered -= failures.len().min(self.keys_answered);
        self.failed.extend(failures);
        self.failed.sort_by_key(|f| f.index);
    }
}

/// The stream returned by [`Client::batch_get_stream_raw`](crate::Client::batch_get_stream_raw).
/// Dropping it cancels the call and its requests.
pub struct RawBatchStream {
    rx: mpsc::UnboundedReceiver<Vec<BatchEvent>>,
    buffered: std::vec::IntoIter<BatchEvent>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for RawBatchStream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Stream for RawBatchStream {
    type Item = BatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BatchEvent>> {
        loop {
            if let Some(event) = self.buffered.next() {
                return Poll::Ready(Some(event));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(events)) => self.buffered = events.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One item of a streaming batch-get of Avro keys ([`Client::batch_get_stream`](crate::Client::batch_get_stream)).
#[derive(Debug, Clone, PartialEq)]
pub enum ValueEvent {
    /// The value of the key at `index` of the request (`None`: the store has no value for it).
    Record {
        index: usize,
        key: Value,
        value: Option<Value>,
    },
    /// The call ended; always the last item. Values that failed to decode are listed as failed.
    Done(Completeness),
}

/// The stream returned by [`Client::batch_get_stream`](crate::Client::batch_get_stream).
pub struct BatchStream {
    raw: RawBatchStream,
    keys: Vec<Value>,
    codecs: Arc<Codecs>,
    store: String,
    undecodable: Vec<KeyFailure>,
}

impl BatchStream {
    pub(crate) fn new(
        raw: RawBatchStream,
        keys: Vec<Value>,
        codecs: Arc<Codecs>,
        store: String,
    ) -> BatchStream {
        BatchStream {
            raw,
            keys,
            codecs,
            store,
            undecodable: Vec::new(),
        }
    }
}

impl Stream for BatchStream {
    type Item = ValueEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ValueEvent>> {
        loop {
            let event = match Pin::new(&mut self.raw).poll_next(cx) {
                Poll::Ready(Some(event)) => event,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            match event {
                BatchEvent::Record { index, value, .. } => {
                    let decoded = value
                        .map(|raw| self.codecs.decode_value(&self.store, &raw))
                        .transpose();
                    match decoded {
                        Ok(value) => {
                            let key = self.keys.get(index).cloned().unwrap_or(Value::Null);
                            return Poll::Ready(Some(ValueEvent::Record { index, key, value }));
                        }
                        Err(e) => self.undecodable.push(KeyFailure {
                            index,
                            error: e.to_string(),
                        }),
                    }
                }
                BatchEvent::Done(mut done) => {
                    done.fail_answered(std::mem::take(&mut self.undecodable));
                    return Poll::Ready(Some(ValueEvent::Done(done)));
                }
            }
        }
    }
}

/// Starts a streaming batch-get of `keys` (serialized key datums) against `table`'s version.
/// With `compute` (an encoded compute request), a read-compute call: the same routing, retries
/// and streaming, each record carrying the key's compute result instead of its value.
pub(crate) fn start(
    shared: Arc<Shared>,
    table: Arc<RoutingTable>,
    version: u32,
    keys: &[Vec<u8>],
    compute: Option<Bytes>,
) -> RawBatchStream {
    let (tx, rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let call = Call::new(shared, table, version, keys, compute, started, tx);
    let task = tokio::spawn(call.run());
    RawBatchStream {
        rx,
        buffered: Vec::new().into_iter(),
        task: Some(task),
    }
}

/// A message from a sub-request task to its call.
enum SubMsg {
    Answers {
        sub: usize,
        answers: Vec<(u32, KeyAnswer)>,
    },
    Finished {
        sub: usize,
        result: Result<(), ClientError>,
    },
}

/// Progress of one key.
#[derive(Default)]
struct Slot {
    /// Answered (found or missing) or given up.
    settled: bool,
    /// Bit `i` set: replica `i` of the partition was tried.
    tried: u64,
    /// Unfinished sub-requests that still owe this key an answer.
    owed: u8,
    /// Sub-requests the key was sent in.
    subs: [u32; ATTEMPTS_PER_KEY],
    attempts: u8,
    last_error: Option<Arc<str>>,
}

/// One request to one server.
struct Sub {
    instance: Arc<Instance>,
    indices: Vec<u32>,
    /// `answered[pos]`: this sub-request answered key `indices[pos]` (any answer).
    answered: Vec<bool>,
    /// Keys this sub-request still owes (not answered by it, not settled elsewhere).
    owed: usize,
    kind: RequestKind,
    started: Instant,
    /// When to hedge it; `None` once hedged or when it must not be.
    due: Option<Instant>,
    /// Group of the replica it went to.
    group: Option<u32>,
    hedge: bool,
    won: bool,
    /// Keys it answered with a per-key error.
    key_errors: u32,
    finished: bool,
    abort: Option<AbortHandle>,
}

struct Call {
    shared: Arc<Shared>,
    table: Arc<RoutingTable>,
    path: Arc<str>,
    keys: Vec<Bytes>,
    partitions: Vec<u32>,
    slots: Vec<Slot>,
    subs: Vec<Sub>,
    unsettled: usize,
    out: mpsc::UnboundedSender<Vec<BatchEvent>>,
    inbox_tx: mpsc::UnboundedSender<SubMsg>,
    inbox: mpsc::UnboundedReceiver<SubMsg>,
    tasks: JoinSet<()>,
    rotation: usize,
    started: Instant,
    deadline: Instant,
    done: Completeness,
    contacted: Vec<Arc<Instance>>,
    /// Decompression of the version's values (resolved when the call runs).
    values: Arc<VersionValues>,
    /// The encoded compute request of a read-compute call (its records are results).
    compute: Option<Bytes>,
}

impl Call {
    fn new(
        shared: Arc<Shared>,
        table: Arc<RoutingTable>,
        version: u32,
        keys: &[Vec<u8>],
        compute: Option<Bytes>,
        started: Instant,
        out: mpsc::UnboundedSender<Vec<BatchEvent>>,
    ) -> Call {
        let mut all = BytesMut::with_capacity(keys.iter().map(Vec::len).sum());
        for k in keys {
            all.extend_from_slice(k);
        }
        let all = all.freeze();
        let mut at = 0;
        let keys: Vec<Bytes> = keys
            .iter()
            .map(|k| {
                at += k.len();
                all.slice(at - k.len()..at)
            })
            .collect();
        let partition_count = table.partitions.len() as u32;
        let partitions = keys
            .iter()
            .map(|k| {
                if partition_count == 0 {
                    0
                } else {
                    partition_for_key(k, partition_count)
                }
            })
            .collect();
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let deadline = started + shared.request_timeout;
        let rotation = shared.next_rotation();
        let path = match compute {
            Some(_) => wire::compute_path(&shared.store, version),
            None => wire::batch_get_path(&shared.store, version),
        };
        Call {
            path: path.into(),
            slots: (0..keys.len()).map(|_| Slot::default()).collect(),
            unsettled: keys.len(),
            done: Completeness {
                keys_total: keys.len(),
                ..Completeness::default()
            },
            keys,
            partitions,
            subs: Vec::new(),
            out,
            inbox_tx,
            inbox,
            tasks: JoinSet::new(),
            rotation,
            started,
            deadline,
            contacted: Vec::new(),
            shared,
            table,
            values: VersionValues::plain(),
            compute,
        }
    }

    async fn run(mut self) {
        let values = match self.compute {
            // Results are made by the servers: nothing to decompress or verify here.
            Some(_) => Ok(VersionValues::plain()),
            None => {
                self.shared
                    .values
                    .for_table(&self.shared, &self.table)
                    .await
            }
        };
        match values {
            Ok(values) => self.values = values,
            Err(e) => {
                let message: Arc<str> = e.to_string().into();
                for slot in &mut self.slots {
                    slot.last_error = Some(message.clone());
                }
                self.fail_unsettled();
                self.finish();
                return;
            }
        }
        self.plan();
        while self.unsettled > 0 {
            if self.subs.iter().all(|s| s.finished) {
                // Nothing in flight can settle the rest (defensive: retries settle or fail keys).
                self.fail_unsettled();
                break;
            }
            let next_due = self
                .subs
                .iter()
                .filter(|s| !s.finished && s.owed > 0)
                .filter_map(|s| s.due)
                .min();
            tokio::select! {
                biased;
                msg = self.inbox.recv() => match msg {
                    Some(SubMsg::Answers { sub, answers }) => self.on_answers(sub, answers),
                    Some(SubMsg::Finished { sub, result }) => self.on_finished(sub, result),
                    None => break,
                },
                _ = tokio::time::sleep_until(next_due.unwrap_or(self.deadline)), if next_due.is_some_and(|d| d < self.deadline) => {
                    self.hedge_due(Instant::now());
                }
                _ = tokio::time::sleep_until(self.deadline) => {
                    self.on_deadline();
                    break;
                }
            }
        }
        self.finish();
    }

    /// Plans and sends the first round.
    fn plan(&mut self) {
        let group = if self.shared.group_routing {
            self.least_loaded_group(None)
        } else {
            None
        };
        let partition_count = self.table.partitions.len();
        let mut choice: Vec<Option<Option<usize>>> = vec![None; partition_count];
        let mut batches = Batches::new();
        for index in 0..self.keys.len() {
            let p = self.partitions[index] as usize;
            let chosen = match choice.get_mut(p) {
                Some(c) => *c.get_or_insert_with(|| self.choose(p, group, 0)),
                None => None,
            };
            let Some(r) = chosen else {
                let version = self.table.version.unwrap_or_default();
                let e = ClientError::NoReplica {
                    partition: p as u32,
                    version,
                };
                self.settle_failed(index, e.to_string().into());
                continue;
            };
            add_to_batch(&self.table, &mut batches, p, r, index);
        }
        self.done.fanout = batches.len();
        self.done.servers = batches
            .iter()
            .map(|(p, r, _)| self.table.partitions[*p][*r].address.clone())
            .collect();
        if !batches.is_empty() {
            self.shared
                .counters
                .batch_fanout(batches.len() as u64, self.compute.is_some());
        }
        for (p, r, indices) in batches {
            self.send(p, r, indices, false);
        }
    }

    /// The least-loaded group (sum of its servers' load scores), ties rotating; `None` without
    /// groups. `avoid` is skipped unless it is the only group.
    fn least_loaded_group(&self, avoid: Option<u32>) -> Option<u32> {
        let groups = &self.table.groups;
        let n = groups.len();
        let max_pending = self.shared.instances.config.max_pending;
        let mut best: Option<(u64, u32)> = None;
        for k in 0..n {
            let g = ((self.rotation + k) % n) as u32;
            if Some(g) == avoid && n > 1 {
                continue;
            }
            let score: u64 = groups[g as usize]
                .iter()
                .map(|r| self.shared.instances.of(r).score(max_pending))
                .sum();
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, g));
            }
        }
        best.map(|(_, g)| g)
    }

    /// The replica of partition `p` to use: its replica in `group` when that one is healthy and
    /// not overloaded, else the least-loaded replica not in `exclude`.
    fn choose(&self, p: usize, group: Option<u32>, exclude: u64) -> Option<usize> {
        let replicas = self.table.partitions.get(p)?;
        if let Some(g) = group {
            if let Some(i) = replicas.iter().position(|r| r.group == Some(g)) {
                let excluded = i < 64 && exclude & (1 << i) != 0;
                let instance = self.shared.instances.of(&replicas[i]);
                if !excluded && instance.score(self.shared.instances.config.max_pending) < 1 << 32 {
                    return Some(i);
                }
            }
        }
        self.shared
            .instances
            .least_loaded(replicas, exclude, self.rotation + p)
    }

    /// Sends `indices` (keys of partitions that replica `r` of partition `p` serves) to that
    /// replica's server, split into sub-requests of at most `sub_request_keys_max` keys and under
    /// the request size limit.
    fn send(&mut self, p: usize, r: usize, indices: Vec<u32>, hedge: bool) {
        let replica = &self.table.partitions[p][r];
        let instance = self.shared.instances.of(replica);
        let group = replica.group;
        if !self.contacted.iter().any(|i| Arc::ptr_eq(i, &instance)) {
            self.contacted.push(instance.clone());
        }
        let keys_max = self.shared.sub_request_keys_max;
        for indices in split_sub_requests(&self.keys, indices, keys_max) {
            let id = self.subs.len();
            let spec = self.compute.as_deref().unwrap_or_default();
            let mut body = Vec::with_capacity(
                4 + spec.len()
                    + 5
                    + indices
                        .iter()
                        .map(|&i| 8 + self.keys[i as usize].len())
                        .sum::<usize>(),
            );
            if self.compute.is_some() {
                wire::compute_body_prefix(spec, &mut body);
            }
            BatchGetRequest::encode_keys(
                indices
                    .iter()
                    .map(|&i| (self.partitions[i as usize], &self.keys[i as usize][..])),
                &mut body,
            );
            for &index in &indices {
                let slot = &mut self.slots[index as usize];
                let replica_index = self.table.partitions[self.partitions[index as usize] as usize]
                    .iter()
                    .position(|x| x.address == instance.address);
                if let Some(ri) = replica_index.filter(|ri| *ri < 64) {
                    slot.tried |= 1 << ri;
                }
                slot.owed = slot.owed.saturating_add(1);
                if (slot.attempts as usize) < ATTEMPTS_PER_KEY {
                    slot.subs[slot.attempts as usize] = id as u32;
                }
                slot.attempts = slot.attempts.saturating_add(1);
            }
            let kind = self.shared.hedger.batch_kind(indices.len());
            let now = Instant::now();
            let due = if hedge {
                None
            } else {
                self.shared.hedger.on_request();
                self.shared.hedger.due(kind, now)
            };
            let abort = self.tasks.spawn(run_sub(
                self.shared.clone(),
                instance.clone(),
                self.path.clone(),
                Bytes::from(body),
                indices.len() as u32,
                id,
                self.inbox_tx.clone(),
            ));
            self.subs.push(Sub {
                instance: instance.clone(),
                answered: vec![false; indices.len()],
                owed: indices.len(),
                indices,
                kind,
                started: now,
                due,
                group,
                hedge,
                won: false,
                key_errors: 0,
                finished: false,
                abort: Some(abort),
            });
        }
    }

    fn on_answers(&mut self, sub: usize, answers: Vec<(u32, KeyAnswer)>) {
        let mut records = Vec::with_capacity(answers.len());
        let mut retry = Vec::new();
        let verify = self.shared.verify_checksums && self.values.checksummed();
        let (mut verified, mut mismatches) = (0u64, 0u64);
        for (pos, answer) in answers {
            let Some(&index) = self.subs[sub].indices.get(pos as usize) else {
                continue;
            };
            let index = index as usize;
            if std::mem::replace(&mut self.subs[sub].answered[pos as usize], true) {
                continue;
            }
            if self.slots[index].settled {
                continue;
            }
            self.subs[sub].owed = self.subs[sub].owed.saturating_sub(1);
            self.slots[index].owed = self.slots[index].owed.saturating_sub(1);
            match answer {
                KeyAnswer::Found(value) => match match self.compute {
                    Some(_) => Ok(value),
                    None => self.values.decode(value, verify),
                } {
                    Ok(value) => {
                        verified += u64::from(verify);
                        records.push(self.settle(index, sub, Some(value)));
                    }
                    Err(fault) => {
                        // A value that fails its checksum is retried on another replica like
                        // a retryable key error; it is never passed on.
                        mismatches += u64::from(matches!(fault, ValueFault::Checksum { .. }));
                        let error = fault.into_error(
                            &self.shared.store,
                            self.values.version(),
                            self.shared.show_key(&self.keys[index]),
                            &self.subs[sub].instance.address,
                        );
                        let message: Arc<str> = error.to_string().into();
                        if error.is_retryable() {
                            self.subs[sub].key_errors += 1;
                            self.slots[index].last_error = Some(message);
                            if self.slots[index].owed == 0 {
                                retry.push(index);
                            }
                        } else {
                            self.settle_failed(index, message);
                        }
                    }
                },
                KeyAnswer::Missing => records.push(self.settle(index, sub, None)),
                KeyAnswer::Failed(code) => {
                    self.subs[sub].key_errors += 1;
                    let message: Arc<str> = ClientError::Server {
                        address: self.subs[sub].instance.address.clone(),
                        code,
                        message: "the server could not answer this key".into(),
                    }
                    .to_string()
                    .into();
                    if code.retryable() {
                        self.slots[index].last_error = Some(message);
                        if self.slots[index].owed == 0 {
                            retry.push(index);
                        }
                    } else {
                        self.settle_failed(index, message);
                    }
                }
            }
        }
        self.shared.count_checksums(verified, mismatches);
        if !records.is_empty() {
            let _ = self.out.send(records);
        }
        let s = &mut self.subs[sub];
        if s.owed == 0 && !s.finished && s.key_errors == 0 && s.answered.iter().all(|a| *a) {
            // Every key of the sub-request has its answer: it succeeded, whether or not its
            // trailer is processed before the call ends.
            s.finished = true;
            s.instance.succeeded();
            self.shared.hedger.record(s.kind, s.started.elapsed());
        }
        if !retry.is_empty() {
            self.retry_errors(retry);
        }
    }

    /// Settles key `index` with an answer from `sub`; cancels sub-requests left with nothing owed.
    fn settle(&mut self, index: usize, sub: usize, value: Option<RawValue>) -> BatchEvent {
        self.slots[index].settled = true;
        self.unsettled -= 1;
        self.done.keys_answered += 1;
        if self.subs[sub].hedge && !self.subs[sub].won {
            self.subs[sub].won = true;
            self.done.long_tail_retries_won += 1;
            Counters::add(&self.shared.counters.long_tail_retries_won, 1);
        }
        let answered_by_hedge = self.subs[sub].hedge;
        let slot = &self.slots[index];
        let n = (slot.attempts as usize).min(ATTEMPTS_PER_KEY);
        let others: Vec<u32> = slot.subs[..n]
            .iter()
            .copied()
            .filter(|&s| s as usize != sub)
            .collect();
        for other in others {
            let other = other as usize;
            let s = &mut self.subs[other];
            if s.finished {
                continue;
            }
            // A sub-request's indices are ascending (keys are planned in request order).
            let Ok(pos) = s.indices.binary_search(&(index as u32)) else {
                continue;
            };
            if s.answered[pos] {
                continue;
            }
            s.answered[pos] = true;
            s.owed = s.owed.saturating_sub(1);
            if s.owed == 0 {
                // Everything it owed came from elsewhere: stop it. If a hedge beat it, its server
                // is slow: avoid it for a while.
                s.finished = true;
                if let Some(abort) = s.abort.take() {
                    abort.abort();
                }
                if answered_by_hedge && !s.hedge {
                    s.instance.outpaced(&self.shared.instances.config);
                }
            }
        }
        BatchEvent::Record {
            index,
            key: self.keys[index].clone(),
            value,
        }
    }

    fn settle_failed(&mut self, index: usize, error: Arc<str>) {
        let slot = &mut self.slots[index];
        if slot.settled {
            return;
        }
        slot.settled = true;
        self.unsettled -= 1;
        self.done.failed.push(KeyFailure {
            index,
            error: error.to_string(),
        });
    }

    fn on_finished(&mut self, sub: usize, result: Result<(), ClientError>) {
        let elapsed = self.subs[sub].started.elapsed();
        let s = &mut self.subs[sub];
        if s.finished {
            return;
        }
        s.finished = true;
        s.abort = None;
        let instance = s.instance.clone();
        let kind = s.kind;
        let error: Arc<str> = match &result {
            Ok(()) => {
                instance.succeeded();
                self.shared.hedger.record(kind, elapsed);
                format!(
                    "{} did not answer every key of its batch-get",
                    instance.address
                )
                .into()
            }
            Err(e) => {
                tracing::debug!(address = instance.address, error = %e, "batch-get request failed");
                self.done.version_gone |= e.is_version_gone();
                let refusal = match e {
                    ClientError::QuotaExceeded { address, message } => {
                        Some((&mut self.done.quota_exceeded, address, message))
                    }
                    ClientError::Forbidden { address, message } => {
                        Some((&mut self.done.forbidden, address, message))
                    }
                    _ => None,
                };
                if let Some((slot, address, message)) = refusal {
                    slot.get_or_insert_with(|| Refusal {
                        address: address.clone(),
                        message: message.clone(),
                    });
                }
                if let Some(failure) = failure_of(e) {
                    let newly = instance.failed(failure, &self.shared.instances.config);
                    count_block(&self.shared.counters, newly);
                }
                e.to_string().into()
            }
        };
        let retryable = result.as_ref().err().is_none_or(ClientError::is_retryable);
        let mut retry = Vec::new();
        let s = &mut self.subs[sub];
        for (pos, &index) in s.indices.iter().enumerate() {
            if s.answered[pos] {
                continue;
            }
            s.answered[pos] = true;
            let index = index as usize;
            let slot = &mut self.slots[index];
            if slot.settled {
                continue;
            }
            slot.owed = slot.owed.saturating_sub(1);
            slot.last_error = Some(error.clone());
            if slot.owed == 0 {
                retry.push(index);
            }
        }
        s.owed = 0;
        if retryable {
            self.retry_errors(retry);
        } else {
            for index in retry {
                self.settle_failed(index, error.clone());
            }
        }
    }

    /// Sends keys that failed on every replica tried so far to untried replicas, at once.
    fn retry_errors(&mut self, indices: Vec<usize>) {
        let before = self.subs.len();
        self.resend(indices, None, false);
        let sent = (self.subs.len() - before) as u32;
        if sent > 0 {
            self.done.error_retries += sent;
            Counters::add(&self.shared.counters.retries, u64::from(sent));
        }
    }

    /// Sends `indices` to replicas not tried yet (preferring `group`); keys without one fail.
    fn resend(&mut self, mut indices: Vec<usize>, group: Option<u32>, hedge: bool) {
        // Sub-requests keep their indices ascending (see `settle`).
        indices.sort_unstable();
        let mut batches = Batches::new();
        for index in indices {
            let slot = &self.slots[index];
            if slot.settled {
                continue;
            }
            let p = self.partitions[index] as usize;
            let choice = if (slot.attempts as usize) < ATTEMPTS_PER_KEY {
                self.choose(p, group, slot.tried)
            } else {
                None
            };
            let Some(r) = choice else {
                if !hedge {
                    let last = slot.last_error.clone();
                    let message = format!(
                        "{} (no other replica of partition {p} to retry on)",
                        last.as_deref().unwrap_or("request failed")
                    );
                    self.settle_failed(index, message.into());
                }
                continue;
            };
            add_to_batch(&self.table, &mut batches, p, r, index);
        }
        for (p, r, indices) in batches {
            self.send(p, r, indices, hedge);
        }
    }

    /// Hedges every sub-request whose threshold has passed, within budget and unless late.
    fn hedge_due(&mut self, now: Instant) {
        let due: Vec<usize> = (0..self.subs.len())
            .filter(|&i| {
                let s = &self.subs[i];
                !s.finished && s.owed > 0 && s.due.is_some_and(|d| d <= now)
            })
            .collect();
        for sub in due {
            let Some(due) = self.subs[sub].due.take() else {
                continue;
            };
            let hedger = &self.shared.hedger;
            if hedger.is_late(due, now) {
                Counters::add(&self.shared.counters.long_tail_retries_late, 1);
                continue;
            }
            let s = &self.subs[sub];
            let owed: Vec<usize> = s
                .indices
                .iter()
                .enumerate()
                .filter(|(pos, &i)| !s.answered[*pos] && !self.slots[i as usize].settled)
                .map(|(_, &i)| i as usize)
                .collect();
            // Only hedge when some owed key has an untried replica.
            let hedgeable = owed.iter().any(|&i| {
                let slot = &self.slots[i];
                let p = self.partitions[i] as usize;
                (slot.attempts as usize) < ATTEMPTS_PER_KEY
                    && self.table.partitions[p].len() > slot.tried.count_ones() as usize
            });
            if !hedgeable {
                continue;
            }
            if !hedger.try_take() {
                Counters::add(&self.shared.counters.long_tail_retries_over_budget, 1);
                continue;
            }
            let group = if self.shared.group_routing {
                self.least_loaded_group(self.subs[sub].group)
            } else {
                None
            };
            let before = self.subs.len();
            self.resend(owed, group, true);
            let sent = (self.subs.len() - before) as u32;
            self.done.long_tail_retries += sent;
            Counters::add(&self.shared.counters.long_tail_retries, u64::from(sent));
        }
    }

    fn on_deadline(&mut self) {
        self.done.timed_out = true;
        let after = self.shared.request_timeout;
        for s in &self.subs {
            if !s.finished && s.owed > 0 {
                let newly = s
                    .instance
                    .failed(Failure::Connection, &self.shared.instances.config);
                count_block(&self.shared.counters, newly);
            }
        }
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.settled {
                continue;
            }
            let n = (slot.attempts as usize).min(ATTEMPTS_PER_KEY);
            let address = n
                .checked_sub(1)
                .map(|last| self.subs[slot.subs[last] as usize].instance.address.clone())
                .unwrap_or_default();
            let error = ClientError::Timeout { address, after }.to_string();
            self.settle_failed(index, error.into());
        }
    }

    fn fail_unsettled(&mut self) {
        for index in 0..self.slots.len() {
            if !self.slots[index].settled {
                let error = self.slots[index]
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no request in flight for this key".into());
                self.settle_failed(index, error);
            }
        }
    }

    fn finish(mut self) {
        self.tasks.abort_all();
        self.done.failed.sort_by_key(|f| f.index);
        self.done.servers_contacted = self.contacted.len();
        self.done.elapsed = self.started.elapsed();
        let counters = &self.shared.counters;
        let latency = if self.compute.is_some() {
            &counters.compute_latency
        } else {
            &counters.batch_get_latency
        };
        latency.observe(self.done.elapsed);
        if self.done.quota_exceeded.is_some() {
            Counters::add(&counters.quota_refusals, 1);
        }
        if !self.done.failed.is_empty() {
            Counters::add(&counters.errors, 1);
        }
        if self.done.timed_out {
            Counters::add(&counters.timeouts, 1);
        }
        let _ = self.out.send(vec![BatchEvent::Done(self.done)]);
    }
}

/// What a failed request says about the server's health.
fn failure_of(e: &ClientError) -> Option<Failure> {
    match e {
        ClientError::Unreachable { .. }
        | ClientError::Timeout { .. }
        | ClientError::Protocol(_) => Some(Failure::Connection),
        ClientError::Server {
            code: rialto_protocol::ErrorCode::Overloaded,
            ..
        } => Some(Failure::Shed),
        ClientError::Server { code, .. } if code.retryable() => Some(Failure::ErrorResponse),
        _ => None,
    }
}

/// What a failed request says about the server's health (for the single-get path).
pub(crate) fn health_failure(e: &ClientError) -> Option<Failure> {
    failure_of(e)
}

/// One sub-request: sends the keys, streams decoded answers to the call, then reports the end.
async fn run_sub(
    shared: Arc<Shared>,
    instance: Arc<Instance>,
    path: Arc<str>,
    body: Bytes,
    keys: u32,
    sub: usize,
    inbox: mpsc::UnboundedSender<SubMsg>,
) {
    let _pending = instance.start();
    let pool = &shared.pool;
    let address = instance.address.as_str();
    let result = async {
        let (parts, mut stream) = pool
            .send(address, instance.tls, http::Method::POST, &path, Some(body))
            .await?;
        if parts.status != http::StatusCode::OK {
            let bytes = pool
                .read_body(address, &mut stream, ERROR_BODY_BYTES_MAX)
                .await?;
            return Err(error_response(address, &parts, &bytes));
        }
        let mut decoder = BatchResponseDecoder::new(keys, Arc::clone(&shared.receive_pool));
        while let Some(chunk) = stream.data().await {
            let chunk = chunk.map_err(|e| pool.h2_failure(address, e))?;
            let mut answers = Vec::new();
            decoder
                .push(&chunk, |i, answer| answers.push((i, answer)))
                .map_err(|detail| {
                    ClientError::Protocol(format!("batch-get response from {address}: {detail}"))
                })?;
            // The bytes are consumed (decoded or buffered): let the server send more.
            let _ = stream.flow_control().release_capacity(chunk.len());
            if !answers.is_empty() {
                let _ = inbox.send(SubMsg::Answers { sub, answers });
            }
        }
        if decoder.trailer().is_none() {
            return Err(ClientError::Unreachable {
                address: address.to_string(),
                detail: "the batch-get response ended before its trailer (server restart or broken connection)".into(),
            });
        }
        Ok(())
    }
    .await;
    let _ = inbox.send(SubMsg::Finished { sub, result });
}

/// Keys grouped by server: `(partition, replica, key indices)`, one entry per server address.
type Batches = Vec<(usize, usize, Vec<u32>)>;

/// Adds key `index`, to be read from replica `r` of partition `p`, to that server's batch.
fn add_to_batch(table: &RoutingTable, batches: &mut Batches, p: usize, r: usize, index: usize) {
    let address = &table.partitions[p][r].address;
    match batches
        .iter_mut()
        .find(|(bp, br, _)| table.partitions[*bp][*br].address == *address)
    {
        Some((_, _, keys)) => keys.push(index as u32),
        None => batches.push((p, r, vec![index as u32])),
    }
}

/// Splits one server's keys into sub-requests: as few as keep each under `keys_max` keys, of
/// equal size, then each further split where its body would pass the request size limit.
fn split_sub_requests(keys: &[Bytes], indices: Vec<u32>, keys_max: usize) -> Vec<Vec<u32>> {
    let parts = indices.len().div_ceil(keys_max.max(1)).max(1);
    if parts == 1 {
        return split_by_request_size(keys, indices);
    }
    let (base, extra) = (indices.len() / parts, indices.len() % parts);
    let mut rest = &indices[..];
    let mut out = Vec::with_capacity(parts);
    for part in 0..parts {
        let (this, tail) = rest.split_at(base + usize::from(part < extra));
        rest = tail;
        out.extend(split_by_request_size(keys, this.to_vec()));
    }
    out
}

/// Splits one server's keys into requests whose bodies stay under the request size limit.
fn split_by_request_size(keys: &[Bytes], indices: Vec<u32>) -> Vec<Vec<u32>> {
    let size_of = |i: u32| 8 + keys[i as usize].len();
    let total: usize = 5 + indices.iter().map(|&i| size_of(i)).sum::<usize>();
    if total <= BATCH_REQUEST_BYTES_MAX {
        return vec![indices];
    }
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 5;
    for index in indices {
        let key_size = size_of(index);
        if !current.is_empty() && size + key_size > BATCH_REQUEST_BYTES_MAX {
            out.push(std::mem::take(&mut current));
            size = 5;
        }
        size += key_size;
        current.push(index);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_batches_split_under_the_request_limit() {
        let keys: Vec<Bytes> = (0..10)
            .map(|_| Bytes::from(vec![7u8; BATCH_REQUEST_BYTES_MAX / 4]))
            .collect();
        let parts = split_by_request_size(&keys, (0..10).collect());
        assert!(parts.len() >= 3, "{}", parts.len());
        assert_eq!(parts.concat(), (0..10).collect::<Vec<u32>>());
        for part in &parts {
            let size: usize = 5 + part
                .iter()
                .map(|&i| 8 + keys[i as usize].len())
                .sum::<usize>();
            assert!(size <= BATCH_REQUEST_BYTES_MAX);
        }
        let small: Vec<Bytes> = (0..3).map(|i| Bytes::from(vec![i as u8; 4])).collect();
        assert_eq!(
            split_by_request_size(&small, vec![0, 1, 2]),
            vec![vec![0, 1, 2]]
        );
    }

    #[test]
    fn a_servers_keys_split_into_equal_sub_requests_under_the_key_limit() {
        let keys: Vec<Bytes> = (0..5000u32)
            .map(|i| Bytes::from(i.to_be_bytes().to_vec()))
            .collect();
        let all: Vec<u32> = (0..5000).collect();
        let sizes = |parts: &[Vec<u32>]| parts.iter().map(Vec::len).collect::<Vec<_>>();
        let parts = split_sub_requests(&keys, all.clone(), 2500);
        assert_eq!(sizes(&parts), vec![2500, 2500]);
        assert_eq!(parts.concat(), all);
        // 5000 keys at most 2000 each: three of 1667/1667/1666, not 2000/2000/1000.
        let parts = split_sub_requests(&keys, all.clone(), 2000);
        assert_eq!(sizes(&parts), vec![1667, 1667, 1666]);
        assert_eq!(parts.concat(), all);
        assert_eq!(split_sub_requests(&keys, all.clone(), usize::MAX).len(), 1);
        assert_eq!(split_sub_requests(&keys, vec![7], 0), vec![vec![7]]);
        assert_eq!(
            split_sub_requests(&keys, Vec::new(), 10),
            vec![Vec::<u32>::new()]
        );
        // The size limit still applies within a sub-request.
        let big: Vec<Bytes> = (0..10)
            .map(|_| Bytes::from(vec![7u8; BATCH_REQUEST_BYTES_MAX / 4]))
            .collect();
        let parts = split_sub_requests(&big, (0..10).collect(), 5);
        assert!(parts.len() >= 4, "{}", parts.len());
        assert_eq!(parts.concat(), (0..10).collect::<Vec<u32>>());
    }
}
