//! One batch-get call as a state machine: answers and time go in, actions come out.
//!
//! [`Call`] owns the state of one call — which key went where, which are answered, which
//! sub-requests are due a hedge — and never does I/O or reads a clock: the driver in
//! [`crate::stream`] feeds it what happened ([`Call::on_answers`], [`Call::on_finished`],
//! [`Call::on_time`]) with the time it happened, and carries out the [`Action`]s it returns
//! (send a sub-request, cancel one, pass records on). So a test, or a simulation, can drive a
//! call through any interleaving of answers, failures and timers without a server or a clock.
//!
//! What it decides, in order (the module docs of [`crate::stream`] give the why):
//! 1. **Plan** ([`Call::start`]): one group (logical zone) per call, the least loaded; every
//!    partition read from its replica in that group unless that one is blocked or overloaded;
//!    one sub-request per server, split by key count and request size.
//! 2. **Answers**: the first answer for a key wins and is emitted; a sub-request left owing
//!    nothing because its keys were answered elsewhere is cancelled.
//! 3. **Error retry**: a key a server could not answer goes at once to an untried replica.
//! 4. **Long-tail retry**: a sub-request still owing keys at its threshold is hedged to untried
//!    replicas (preferring another group), within the retry budget, unless the timer was late.
//! 5. **Deadline**: at the call's deadline every unanswered key fails as timed out.
//!
//! The routing state all calls share — servers' load and health, the retry budget, counters —
//! is read and updated through [`Shared`]; it uses tokio's clock, which tests pause.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::wire::{self, BatchGetRequest};
use tokio::time::Instant;

use crate::error::ClientError;
use crate::hedge::RequestKind;
use crate::instances::{count_block, Failure, Instance};
use crate::response::{KeyAnswer, RawValue};
use crate::routing::RoutingTable;
use crate::shared::Shared;
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

/// What the driver must do for a call.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send sub-request `sub`: `body` to `instance`, whose answer is decoded as `keys` keys.
    /// Its answers come back as [`Call::on_answers`] and its end as [`Call::on_finished`].
    Send {
        sub: usize,
        instance: Arc<Instance>,
        body: Bytes,
        keys: u32,
    },
    /// Stop sub-request `sub`: everything it owed was answered elsewhere. Nothing more about it
    /// needs to be reported (the call ignores it if it is).
    Cancel { sub: usize },
    /// Pass these records on to the application.
    Emit(Vec<BatchEvent>),
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
}

/// The state of one batch-get (or read-compute) call.
pub(crate) struct Call {
    shared: Arc<Shared>,
    table: Arc<RoutingTable>,
    keys: Vec<Bytes>,
    partitions: Vec<u32>,
    slots: Vec<Slot>,
    subs: Vec<Sub>,
    unsettled: usize,
    rotation: usize,
    started: Instant,
    deadline: Instant,
    done: Completeness,
    contacted: Vec<Arc<Instance>>,
    /// Decompression and checksums of the version's values (given at [`Call::start`]).
    values: Arc<VersionValues>,
    /// The encoded compute request of a read-compute call (its records are results).
    compute: Option<Bytes>,
    /// Actions decided by the input being handled.
    actions: Vec<Action>,
}

impl Call {
    /// A call for `keys` (serialized key datums) against `table`, started at `now`; with
    /// `compute` (an encoded compute request), a read-compute call.
    pub(crate) fn new(
        shared: Arc<Shared>,
        table: Arc<RoutingTable>,
        keys: &[Vec<u8>],
        compute: Option<Bytes>,
        now: Instant,
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
        Call {
            slots: (0..keys.len()).map(|_| Slot::default()).collect(),
            unsettled: keys.len(),
            done: Completeness {
                keys_total: keys.len(),
                ..Completeness::default()
            },
            keys,
            partitions,
            subs: Vec::new(),
            rotation: shared.next_rotation(),
            started: now,
            deadline: now + shared.request_timeout,
            contacted: Vec::new(),
            shared,
            table,
            values: VersionValues::plain(),
            compute,
            actions: Vec::new(),
        }
    }

    /// Plans and sends the first round, given how the version's values are stored (or why that
    /// is unknown: then every key fails with that reason).
    pub(crate) fn start(
        &mut self,
        values: Result<Arc<VersionValues>, ClientError>,
        now: Instant,
    ) -> Vec<Action> {
        match values {
            Ok(values) => {
                self.values = values;
                self.plan(now);
            }
            Err(e) => {
                let message: Arc<str> = e.to_string().into();
                for slot in &mut self.slots {
                    slot.last_error = Some(message.clone());
                }
                self.fail_unsettled();
            }
        }
        self.step()
    }

    /// Answers streamed by sub-request `sub`: `(position in the sub-request, answer)`.
    pub(crate) fn on_answers(
        &mut self,
        sub: usize,
        answers: Vec<(u32, KeyAnswer)>,
        now: Instant,
    ) -> Vec<Action> {
        if sub < self.subs.len() {
            self.answers(sub, answers, now);
        }
        self.step()
    }

    /// Sub-request `sub` ended: its response was complete (`Ok`), or the request failed.
    pub(crate) fn on_finished(
        &mut self,
        sub: usize,
        result: Result<(), ClientError>,
        now: Instant,
    ) -> Vec<Action> {
        if sub < self.subs.len() {
            self.finished(sub, result, now);
        }
        self.step()
    }

    /// Time passed: hedges the sub-requests due at `now`, or ends the call at its deadline.
    pub(crate) fn on_time(&mut self, now: Instant) -> Vec<Action> {
        if now >= self.deadline {
            self.on_deadline();
        } else {
            self.hedge_due(now);
        }
        self.step()
    }

    /// When the call next needs [`Call::on_time`]: the earliest hedge due, else its deadline.
    pub(crate) fn wake_at(&self) -> Instant {
        self.subs
            .iter()
            .filter(|s| !s.finished && s.owed > 0)
            .filter_map(|s| s.due)
            .min()
            .map_or(self.deadline, |due| due.min(self.deadline))
    }

    /// The request positions of the keys sub-request `sub` carries.
    #[cfg(test)]
    fn sub_keys(&self, sub: usize) -> Vec<usize> {
        self.subs[sub].indices.iter().map(|&i| i as usize).collect()
    }

    /// Whether this is a read-compute call (its records are the servers' results).
    pub(crate) fn is_compute(&self) -> bool {
        self.compute.is_some()
    }

    /// Whether every key is settled (answered or failed): the call is over.
    pub(crate) fn is_over(&self) -> bool {
        self.unsettled == 0
    }

    /// Ends the call at `now` (failing keys still unsettled) and returns how it went.
    pub(crate) fn finish(mut self, now: Instant) -> Completeness {
        self.fail_unsettled();
        self.done.failed.sort_by_key(|f| f.index);
        self.done.servers_contacted = self.contacted.len();
        self.done.elapsed = now.saturating_duration_since(self.started);
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
        self.done
    }

    /// Closes handling of one input: keys nothing in flight can settle any more fail (retries
    /// settle or fail keys as they go, so this is a safety net), and the actions are handed out.
    fn step(&mut self) -> Vec<Action> {
        if self.unsettled > 0 && self.subs.iter().all(|s| s.finished) {
            self.fail_unsettled();
        }
        std::mem::take(&mut self.actions)
    }

    fn plan(&mut self, now: Instant) {
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
            self.send(p, r, indices, false, now);
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
    fn send(&mut self, p: usize, r: usize, indices: Vec<u32>, hedge: bool, now: Instant) {
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
            let due = if hedge {
                None
            } else {
                self.shared.hedger.on_request();
                self.shared.hedger.due(kind, now)
            };
            self.actions.push(Action::Send {
                sub: id,
                instance: instance.clone(),
                body: Bytes::from(body),
                keys: indices.len() as u32,
            });
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
            });
        }
    }

    fn answers(&mut self, sub: usize, answers: Vec<(u32, KeyAnswer)>, now: Instant) {
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
            let failure = match answer {
                KeyAnswer::Found(value) => match match self.compute {
                    Some(_) => Ok(value),
                    None => self.values.decode(value, verify),
                } {
                    Ok(value) => {
                        verified += u64::from(verify);
                        records.push(self.settle(index, sub, Some(value)));
                        continue;
                    }
                    Err(fault) => {
                        // A value that fails its checksum is retried on another replica like
                        // a retryable key error; it is never passed on.
                        mismatches += u64::from(matches!(fault, ValueFault::Checksum { .. }));
                        fault.into_error(
                            &self.shared.store,
                            self.values.version(),
                            self.shared.show_key(&self.keys[index]),
                            &self.subs[sub].instance.address,
                        )
                    }
                },
                KeyAnswer::Missing => {
                    records.push(self.settle(index, sub, None));
                    continue;
                }
                KeyAnswer::Failed(code) => {
                    // Any per-key error keeps the sub-request from counting as a success.
                    self.subs[sub].key_errors += u32::from(!code.retryable());
                    ClientError::Server {
                        address: self.subs[sub].instance.address.clone(),
                        code,
                        message: "the server could not answer this key".into(),
                    }
                }
            };
            let message: Arc<str> = failure.to_string().into();
            if failure.is_retryable() {
                self.subs[sub].key_errors += 1;
                self.slots[index].last_error = Some(message);
                if self.slots[index].owed == 0 {
                    retry.push(index);
                }
            } else {
                self.settle_failed(index, message);
            }
        }
        self.shared.count_checksums(verified, mismatches);
        if !records.is_empty() {
            self.actions.push(Action::Emit(records));
        }
        let s = &mut self.subs[sub];
        if s.owed == 0 && !s.finished && s.key_errors == 0 && s.answered.iter().all(|a| *a) {
            // Every key of the sub-request has its answer: it succeeded, whether or not its
            // trailer is processed before the call ends.
            s.finished = true;
            s.instance.succeeded();
            self.shared
                .hedger
                .record(s.kind, now.saturating_duration_since(s.started));
        }
        if !retry.is_empty() {
            self.retry_errors(retry, now);
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
                self.actions.push(Action::Cancel { sub: other });
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

    fn finished(&mut self, sub: usize, result: Result<(), ClientError>, now: Instant) {
        let s = &mut self.subs[sub];
        if s.finished {
            return;
        }
        s.finished = true;
        let elapsed = now.saturating_duration_since(s.started);
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
                if let Some(failure) = health_failure(e) {
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
            self.retry_errors(retry, now);
        } else {
            for index in retry {
                self.settle_failed(index, error.clone());
            }
        }
    }

    /// Sends keys that failed on every replica tried so far to untried replicas, at once.
    fn retry_errors(&mut self, indices: Vec<usize>, now: Instant) {
        let before = self.subs.len();
        self.resend(indices, None, false, now);
        let sent = (self.subs.len() - before) as u32;
        if sent > 0 {
            self.done.error_retries += sent;
            Counters::add(&self.shared.counters.retries, u64::from(sent));
        }
    }

    /// Sends `indices` to replicas not tried yet (preferring `group`); keys without one fail.
    fn resend(&mut self, mut indices: Vec<usize>, group: Option<u32>, hedge: bool, now: Instant) {
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
            self.send(p, r, indices, hedge, now);
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
            self.resend(owed, group, true, now);
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
}

/// What a failed request says about the server's health.
pub(crate) fn health_failure(e: &ClientError) -> Option<Failure> {
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

    // The state machine driven by hand: no server, no network, time given as inputs (tokio's
    // clock is paused, so the shared health state and the retry budget see the same time).

    use std::collections::BTreeSet;

    use rialto_protocol::meta::{Layout, ValueFormat};
    use rialto_protocol::stored::value_checksum;

    use crate::codecs::Codecs;
    use crate::hedge::LongTailRetry;
    use crate::pool::ConnectionPool;
    use crate::routing::{Replica, ValueLayout};
    use crate::{ClientConfig, ReaderSchema};

    const KEYS: usize = 60;

    /// Six servers in two groups; partition `p` has a replica on server `p % 3` of group 0 and
    /// on server `3 + p % 3` of group 1.
    fn table(format: ValueFormat) -> RoutingTable {
        let server = |i: usize| Replica {
            node_id: format!("n{i}"),
            address: format!("10.0.0.{i}:7000"),
            tls: false,
            zone: format!("z{}", i / 3),
            group: Some((i / 3) as u32),
        };
        RoutingTable {
            store_exists: true,
            version: Some(3),
            partition_count: 6,
            partitions: (0..6)
                .map(|p| vec![server(p % 3), server(3 + p % 3)])
                .collect(),
            pending_version: None,
            groups: vec![(0..3).map(server).collect(), (3..6).map(server).collect()],
            values: ValueLayout {
                format,
                ..ValueLayout::default()
            },
        }
    }

    fn shared(long_tail: LongTailRetry, table: RoutingTable) -> Arc<Shared> {
        let mut config = ClientConfig::new("members");
        config.long_tail = long_tail;
        config.request_timeout = Duration::from_millis(800);
        let record: rialto_protocol::meta::StoreRecord =
            serde_json::from_value(serde_json::json!({
                "name": "members", "owner": "t", "key_schema": "\"string\"",
                "value_schemas": [{"id": 1, "schema": "\"string\""}],
                "partition_count": 6, "replication_factor": 2, "created_ms": 0,
                "largest_version": 3,
            }))
            .unwrap();
        let codecs = Codecs::from_record(&record, &ReaderSchema::Latest).unwrap();
        let counters = Arc::new(Counters::default());
        let pool = ConnectionPool::new(None, config.network.clone(), counters.clone()).unwrap();
        Arc::new(Shared::new(
            &config,
            Layout::new("/rialto"),
            pool,
            counters,
            codecs,
            table,
        ))
    }

    fn keys() -> Vec<Vec<u8>> {
        (0..KEYS)
            .map(|i| {
                let key = format!("member-{i}");
                let mut datum = vec![(key.len() * 2) as u8];
                datum.extend_from_slice(key.as_bytes());
                datum
            })
            .collect()
    }

    /// The value stored for key `index` (its Avro string datum).
    fn value(index: usize) -> Bytes {
        let text = format!("value-{index}");
        let mut datum = vec![(text.len() * 2) as u8];
        datum.extend_from_slice(text.as_bytes());
        Bytes::from(datum)
    }

    /// A call on a paused clock with its first round planned.
    fn started(long_tail: LongTailRetry) -> (Call, Vec<Action>, Instant) {
        let now = Instant::now();
        let table = Arc::new(table(ValueFormat::SchemaIdPrefixed));
        let mut call = Call::new(
            shared(long_tail, (*table).clone()),
            table,
            &keys(),
            None,
            now,
        );
        let actions = call.start(Ok(VersionValues::plain()), now);
        (call, actions, now)
    }

    /// `(sub, address)` of each send.
    fn sends(actions: &[Action]) -> Vec<(usize, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { sub, instance, .. } => Some((*sub, instance.address.clone())),
                _ => None,
            })
            .collect()
    }

    /// Indices of the records emitted, with their values.
    fn emitted(actions: &[Action]) -> Vec<(usize, Option<RawValue>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Emit(records) => Some(records),
                _ => None,
            })
            .flatten()
            .map(|r| match r {
                BatchEvent::Record { index, value, .. } => (*index, value.clone()),
                BatchEvent::Done(_) => panic!("a record batch carries no Done"),
            })
            .collect()
    }

    /// Every key of `sub` answered: found for even indices, missing for odd ones.
    fn answer_all(call: &mut Call, sub: usize, now: Instant) -> Vec<Action> {
        let answers = call
            .sub_keys(sub)
            .into_iter()
            .enumerate()
            .map(|(pos, index)| {
                let answer = if index % 2 == 0 {
                    KeyAnswer::Found(RawValue {
                        schema_id: 1,
                        bytes: value(index),
                    })
                } else {
                    KeyAnswer::Missing
                };
                (pos as u32, answer)
            })
            .collect();
        call.on_answers(sub, answers, now)
    }

    /// The default long-tail threshold of a sub-request of `keys` keys before any measurement.
    fn ceiling(keys: usize) -> Duration {
        let table = LongTailRetry::default().batch_thresholds;
        table.iter().find(|(up_to, _)| keys <= *up_to).unwrap().1
    }

    fn group_of(address: &str) -> usize {
        let i: usize = address[7..8].parse().unwrap();
        i / 3
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_reads_one_group_and_ends_once_every_key_is_answered() {
        let (mut call, actions, now) = started(LongTailRetry::default());
        let first = sends(&actions);
        assert_eq!(first.len(), 3, "one sub-request per server of one group");
        let groups: BTreeSet<usize> = first.iter().map(|(_, a)| group_of(a)).collect();
        assert_eq!(groups.len(), 1, "{first:?}");
        let mut seen = Vec::new();
        for (sub, _) in &first {
            assert!(!call.is_over());
            let out = answer_all(&mut call, *sub, now + Duration::from_millis(2));
            assert!(sends(&out).is_empty());
            seen.extend(emitted(&out));
        }
        assert!(call.is_over());
        seen.sort_by_key(|(i, _)| *i);
        assert_eq!(seen.len(), KEYS);
        for (i, (index, v)) in seen.iter().enumerate() {
            assert_eq!(*index, i);
            // Each key's record is the one its server answered: the input bytes, not a copy
            // the engine made up.
            let expected = (i % 2 == 0).then(|| value(i));
            assert_eq!(v.as_ref().map(|v| v.bytes.clone()), expected);
        }
        // A late duplicate of an answered key changes nothing.
        let out = answer_all(&mut call, first[0].0, now + Duration::from_millis(3));
        assert!(emitted(&out).is_empty());
        let done = call.finish(now + Duration::from_millis(4));
        assert!(done.is_complete(), "{done:?}");
        assert_eq!((done.fanout, done.servers_contacted), (3, 3));
        assert_eq!(done.elapsed, Duration::from_millis(4));
        assert_eq!((done.long_tail_retries, done.error_retries), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_sub_request_moves_its_keys_to_the_other_group_at_once() {
        let (mut call, actions, now) = started(LongTailRetry::disabled());
        let first = sends(&actions);
        let (failed, address) = first[0].clone();
        let owed = call.sub_keys(failed);
        let out = call.on_finished(
            failed,
            Err(ClientError::Unreachable {
                address: address.clone(),
                detail: "connection refused".into(),
            }),
            now + Duration::from_millis(1),
        );
        let retries = sends(&out);
        assert_eq!(retries.len(), 1, "{retries:?}");
        let (retry, to) = retries[0].clone();
        assert_ne!(group_of(&to), group_of(&address));
        assert_eq!(
            call.sub_keys(retry),
            owed,
            "exactly the failed keys, in order"
        );
        for (sub, _) in first.iter().skip(1).chain(&retries) {
            answer_all(&mut call, *sub, now + Duration::from_millis(2));
        }
        assert!(call.is_over());
        let done = call.finish(now + Duration::from_millis(3));
        assert!(done.is_complete(), "{done:?}");
        assert_eq!((done.error_retries, done.servers_contacted), (1, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_sub_request_is_hedged_at_its_threshold_and_the_hedge_wins() {
        let (mut call, actions, now) = started(LongTailRetry::default());
        let first = sends(&actions);
        for (sub, _) in &first[1..] {
            answer_all(&mut call, *sub, now + Duration::from_millis(1));
        }
        let (slow, slow_address) = first[0].clone();
        // Nothing was measured yet: the threshold is the ceiling Venice's table gives a
        // sub-request of this many keys.
        let due = call.wake_at();
        assert_eq!(due, now + ceiling(call.sub_keys(slow).len()));
        // Nothing happens before the threshold.
        assert!(call.on_time(due - Duration::from_millis(1)).is_empty());
        let out = call.on_time(due);
        let hedges = sends(&out);
        assert_eq!(hedges.len(), 1, "{hedges:?}");
        let (hedge, to) = hedges[0].clone();
        assert_ne!(group_of(&to), group_of(&slow_address));
        assert_eq!(call.sub_keys(hedge), call.sub_keys(slow));
        // The next wake-up is the deadline: a hedge is not hedged again.
        assert_eq!(call.wake_at(), now + Duration::from_millis(800));
        let out = answer_all(&mut call, hedge, due + Duration::from_millis(2));
        assert_eq!(emitted(&out).len(), call.sub_keys(slow).len());
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Cancel { sub } if *sub == slow)),
            "the outpaced original is cancelled"
        );
        assert!(call.is_over());
        // Its answers, if they still come, are not passed on twice.
        assert!(emitted(&answer_all(&mut call, slow, due + Duration::from_millis(3))).is_empty());
        let done = call.finish(due + Duration::from_millis(3));
        assert!(done.is_complete(), "{done:?}");
        assert_eq!((done.long_tail_retries, done.long_tail_retries_won), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_timer_sends_no_hedge() {
        let (mut call, actions, now) = started(LongTailRetry::default());
        let first = sends(&actions);
        for (sub, _) in &first[1..] {
            answer_all(&mut call, *sub, now + Duration::from_millis(1));
        }
        // The timer fires 50 ms after the threshold (past the 10 ms late margin): the client
        // itself was stalled, so a hedge would only add load.
        let threshold = ceiling(call.sub_keys(first[0].0).len());
        let out = call.on_time(now + threshold + Duration::from_millis(50));
        assert!(sends(&out).is_empty(), "{:?}", sends(&out));
        assert_eq!(call.wake_at(), now + Duration::from_millis(800));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_fails_every_unanswered_key_as_timed_out() {
        let (mut call, actions, now) = started(LongTailRetry::disabled());
        let first = sends(&actions);
        answer_all(&mut call, first[0].0, now + Duration::from_millis(1));
        let unanswered: Vec<usize> = first[1..]
            .iter()
            .flat_map(|(sub, _)| call.sub_keys(*sub))
            .collect();
        let deadline = call.wake_at();
        assert_eq!(deadline, now + Duration::from_millis(800));
        assert!(call.on_time(deadline).is_empty());
        assert!(call.is_over());
        let done = call.finish(deadline);
        assert!(done.timed_out);
        let mut failed: Vec<usize> = done.failed.iter().map(|f| f.index).collect();
        let mut expected = unanswered.clone();
        expected.sort_unstable();
        failed.sort_unstable();
        assert_eq!(failed, expected);
        assert!(
            done.failed.iter().all(|f| f.error.contains("800ms")),
            "{:?}",
            done.failed[0]
        );
        assert_eq!(done.keys_answered, KEYS - unanswered.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_fails_its_keys_without_retrying_them_elsewhere() {
        let (mut call, actions, now) = started(LongTailRetry::disabled());
        let first = sends(&actions);
        let (refused, address) = first[0].clone();
        let owed = call.sub_keys(refused);
        let out = call.on_finished(
            refused,
            Err(ClientError::Forbidden {
                address: address.clone(),
                message: "principal `bob` may not read store `members`".into(),
            }),
            now,
        );
        assert!(sends(&out).is_empty(), "another replica would refuse too");
        for (sub, _) in &first[1..] {
            answer_all(&mut call, *sub, now);
        }
        assert!(call.is_over());
        let done = call.finish(now);
        assert_eq!(
            done.failed.iter().map(|f| f.index).collect::<Vec<_>>(),
            owed
        );
        assert_eq!(done.forbidden.map(|r| r.address), Some(address));
    }

    #[tokio::test(start_paused = true)]
    async fn a_value_failing_its_checksum_is_never_passed_on_and_is_read_from_another_replica() {
        let now = Instant::now();
        let table = Arc::new(table(ValueFormat::Checksummed));
        let shared = shared(LongTailRetry::disabled(), (*table).clone());
        let mut call = Call::new(shared, table.clone(), &keys(), None, now);
        let values = Arc::new(VersionValues::new(3, table.values, None));
        let first = sends(&call.start(Ok(values), now));
        let (sub, address) = first[0].clone();
        let sealed = |index: usize, corrupt: bool| {
            let datum = value(index);
            let mut bytes = value_checksum(1, &datum).to_be_bytes().to_vec();
            bytes.extend_from_slice(&datum);
            if corrupt {
                *bytes.last_mut().unwrap() ^= 1;
            }
            KeyAnswer::Found(RawValue {
                schema_id: 1,
                bytes: Bytes::from(bytes),
            })
        };
        let keys = call.sub_keys(sub);
        let answers = keys
            .iter()
            .enumerate()
            .map(|(pos, &index)| (pos as u32, sealed(index, pos == 0)))
            .collect();
        let out = call.on_answers(sub, answers, now);
        let passed: Vec<usize> = emitted(&out).into_iter().map(|(i, _)| i).collect();
        assert_eq!(passed, keys[1..].to_vec(), "the corrupt value is held back");
        let retries = sends(&out);
        assert_eq!(retries.len(), 1);
        assert_ne!(group_of(&retries[0].1), group_of(&address));
        assert_eq!(call.sub_keys(retries[0].0), vec![keys[0]]);
        let out = call.on_answers(retries[0].0, vec![(0, sealed(keys[0], false))], now);
        let (index, value_read) = emitted(&out).remove(0);
        assert_eq!(index, keys[0]);
        assert_eq!(value_read.unwrap().bytes, value(keys[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_version_whose_values_cannot_be_read_fails_every_key_with_the_reason() {
        let now = Instant::now();
        let table = Arc::new(table(ValueFormat::SchemaIdPrefixed));
        let shared = shared(LongTailRetry::default(), (*table).clone());
        let mut call = Call::new(shared, table, &keys(), None, now);
        let out = call.start(
            Err(ClientError::Dictionary {
                version: 3,
                detail: "no server answered".into(),
            }),
            now,
        );
        assert!(sends(&out).is_empty());
        assert!(call.is_over());
        let done = call.finish(now);
        assert_eq!(done.failed.len(), KEYS);
        assert!(done.failed[0].error.contains("no server answered"));
    }

    /// A seeded random source for the schedule test (xorshift: no dependency, same on every
    /// machine).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Whether the store has a value for key `index` (the servers' data, as the schedule test's
    /// servers answer it).
    fn stored(index: usize) -> bool {
        index % 5 != 0
    }

    /// One randomly interleaved call: servers answer parts of sub-requests in any order, with
    /// per-key errors, broken connections and late duplicates, while time jumps to the call's
    /// next wake-up, checking the invariants. Returns how the call ended.
    fn run_schedule(seed: u64) -> Completeness {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (mut call, actions, mut now) = started(LongTailRetry::default());
        let mut in_flight: Vec<usize> = Vec::new();
        let mut sent_per_key = vec![0usize; KEYS];
        let mut emitted_keys: Vec<Option<Option<Bytes>>> = vec![None; KEYS];
        let mut sent = 0usize;
        let mut apply = |actions: Vec<Action>,
                         call: &Call,
                         in_flight: &mut Vec<usize>,
                         emitted_keys: &mut Vec<Option<Option<Bytes>>>| {
            for action in actions {
                match action {
                    Action::Send { sub, keys, .. } => {
                        assert_eq!(
                            sub, sent,
                            "sub-requests are numbered in order (seed {seed})"
                        );
                        sent += 1;
                        assert_eq!(keys as usize, call.sub_keys(sub).len());
                        for index in call.sub_keys(sub) {
                            sent_per_key[index] += 1;
                        }
                        in_flight.push(sub);
                    }
                    Action::Cancel { sub } => {
                        assert!(sub < sent, "seed {seed}: cancelled an unsent sub-request");
                        in_flight.retain(|s| *s != sub);
                    }
                    Action::Emit(records) => {
                        for record in records {
                            let BatchEvent::Record { index, key, value } = record else {
                                panic!("seed {seed}: Done inside a record batch");
                            };
                            assert_eq!(key, Bytes::from(keys()[index].clone()), "seed {seed}");
                            let slot = &mut emitted_keys[index];
                            assert!(slot.is_none(), "seed {seed}: key {index} passed on twice");
                            *slot = Some(value.map(|v| v.bytes));
                        }
                    }
                }
            }
        };
        apply(actions, &call, &mut in_flight, &mut emitted_keys);
        let mut steps = 0;
        while !call.is_over() {
            steps += 1;
            assert!(steps < 10_000, "seed {seed}: the call never ends");
            now += Duration::from_micros(rng.below(3_000) as u64);
            let choice = rng.below(12);
            let actions = if in_flight.is_empty() || choice == 0 {
                // Nothing to hear from, or time passes: jump to the next wake-up.
                now = now.max(call.wake_at());
                call.on_time(now)
            } else {
                let sub = in_flight[rng.below(in_flight.len())];
                let keys = call.sub_keys(sub);
                if choice == 1 {
                    in_flight.retain(|s| *s != sub);
                    let result = if rng.below(4) != 0 {
                        Ok(())
                    } else {
                        Err(ClientError::Unreachable {
                            address: "x".into(),
                            detail: "connection reset".into(),
                        })
                    };
                    call.on_finished(sub, result, now)
                } else {
                    // Some of its keys, in any order, possibly again.
                    let answers = (0..1 + rng.below(keys.len()))
                        .map(|_| {
                            let pos = rng.below(keys.len());
                            let index = keys[pos];
                            let answer = match rng.below(40) {
                                0 => KeyAnswer::Failed(rialto_protocol::ErrorCode::Overloaded),
                                _ if stored(index) => KeyAnswer::Found(RawValue {
                                    schema_id: 1,
                                    bytes: value(index),
                                }),
                                _ => KeyAnswer::Missing,
                            };
                            (pos as u32, answer)
                        })
                        .collect();
                    call.on_answers(sub, answers, now)
                }
            };
            apply(actions, &call, &mut in_flight, &mut emitted_keys);
        }
        let done = call.finish(now);
        // Every key is either passed on, with exactly the servers' value, or failed.
        let failed: BTreeSet<usize> = done.failed.iter().map(|f| f.index).collect();
        assert_eq!(
            failed.len(),
            done.failed.len(),
            "seed {seed}: a key failed twice"
        );
        for (index, record) in emitted_keys.iter().enumerate() {
            match record {
                Some(read) => {
                    assert!(
                        !failed.contains(&index),
                        "seed {seed}: key {index} both ways"
                    );
                    let expected = stored(index).then(|| value(index));
                    assert_eq!(*read, expected, "seed {seed}: key {index}");
                }
                None => assert!(failed.contains(&index), "seed {seed}: key {index} lost"),
            }
        }
        let passed = emitted_keys.iter().filter(|r| r.is_some()).count();
        assert_eq!(done.keys_answered, passed, "seed {seed}");
        assert_eq!(done.keys_total, KEYS);
        assert!(
            sent_per_key.iter().all(|&n| n <= ATTEMPTS_PER_KEY),
            "seed {seed}: a key sent more than {ATTEMPTS_PER_KEY} times: {sent_per_key:?}"
        );
        done
    }

    #[tokio::test(start_paused = true)]
    async fn random_interleavings_pass_every_key_on_once_with_its_value_or_fail_it() {
        let ends: Vec<Completeness> = (0..300).map(run_schedule).collect();
        // The schedules reach every path: hedges (won or not), error retries, keys failed,
        // timeouts, and calls that read every key.
        let count = |f: &dyn Fn(&Completeness) -> bool| ends.iter().filter(|d| f(d)).count();
        assert!(count(&|d| d.long_tail_retries > 0) > 10);
        assert!(count(&|d| d.long_tail_retries_won > 0) > 0);
        assert!(count(&|d| d.error_retries > 0) > 10);
        assert!(count(&|d| !d.failed.is_empty()) > 10);
        assert!(count(&|d| d.timed_out) > 0);
        assert!(count(&|d| d.is_complete()) > 10);
    }
}
