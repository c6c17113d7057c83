//! Concurrent single gets coalesced into batch-gets ([`ClientConfig::coalesce_gets`](crate::ClientConfig::coalesce_gets)).
//!
//! A get that starts while no other get of the client is in flight is sent on its own, at once.
//! A get that starts while others are in flight joins a queue instead; the first to join leads
//! the *flush* on its own task: it lets the tasks that are ready run first (one `yield_now`) and
//! then sends the whole queue as one batch-get (group routing: one request per server of one
//! group), run on that task too (no task for the call or its sub-requests: the callers wait on
//! this round trip, and every hop between tasks lengthens it). So a response that wakes several
//! callers, each asking for its next key, costs the servers and the client one request, not one
//! each: the per-request work (HTTP/2 stream, headers, wake-ups, syscalls) is what a single get
//! spends most of its CPU on. A leader dropped by its caller before its batch is answered drops
//! the waiters' replies with it, and each of them reads alone.
//!
//! Each queued get receives its key's answer from the batch. A key the batch could not answer
//! (an error, a refusal, a dropped batch) is read again on its own, so it ends with the same
//! typed error or retries a single get would have; a batch that ran out of the request timeout
//! fails its unanswered keys as timed out instead (the deadline is spent).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::call::BatchEvent;
use crate::client::Client;
use crate::error::ClientError;
use crate::response::RawValue;
use crate::stats::Counters;
use crate::stream;

/// Most gets one flush sends as one batch-get; a queue that reaches it goes out at once.
pub(crate) const COALESCED_KEYS_MAX: usize = 1_000;

/// What a queued get learns from its batch.
pub(crate) enum Outcome {
    /// The key's value (`None`: the store has none).
    Answered(Option<RawValue>),
    /// The batch ran out of the request timeout before answering the key.
    TimedOut { address: String },
    /// The batch did not answer the key: read it alone.
    Alone,
}

struct Waiter {
    key: Vec<u8>,
    reply: oneshot::Sender<Outcome>,
}

/// The gets of one client in flight, and those waiting for the next flush.
#[derive(Default)]
pub(crate) struct Coalescer {
    in_flight: AtomicUsize,
    queue: Mutex<Vec<Waiter>>,
}

/// A get counted in flight until it is dropped.
pub(crate) struct InFlight<'a> {
    count: &'a AtomicUsize,
    /// Whether other gets were in flight when this one started.
    pub(crate) others: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What joining the queue asks of the caller.
struct Joined {
    outcome: oneshot::Receiver<Outcome>,
    flush: Flush,
}

/// The caller's part in the next flush.
enum Flush {
    /// Another get leads it: wait for the outcome.
    Follow,
    /// This get is the first queued: it leads, after letting the other callers queue.
    Lead,
    /// This get filled the queue: it leads, at once, with this batch.
    LeadFull(Vec<Waiter>),
}

impl Coalescer {
    /// Counts a get in flight.
    pub(crate) fn enter(&self) -> InFlight<'_> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            count: &self.in_flight,
            others: before > 0,
        }
    }

    fn join(&self, key: &[u8]) -> Joined {
        let (reply, outcome) = oneshot::channel();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.push(Waiter {
            key: key.to_vec(),
            reply,
        });
        let flush = if queue.len() >= COALESCED_KEYS_MAX {
            Flush::LeadFull(std::mem::take(&mut *queue))
        } else if queue.len() == 1 {
            Flush::Lead
        } else {
            Flush::Follow
        };
        Joined { outcome, flush }
    }

    fn take(&self) -> Vec<Waiter> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Queues `key` for the next flush of `client`'s gets, leads that flush if it is the first
/// queued, and waits for the key's outcome.
pub(crate) async fn get(client: &Client, key: &[u8]) -> Outcome {
    let coalescer = &client.shared.coalescer;
    let joined = coalescer.join(key);
    match joined.flush {
        Flush::Follow => {}
        Flush::Lead => {
            // Until it takes the queue, a leader dropped by its caller empties it on its way
            // out (every waiter then reads alone): otherwise no get would lead those keys.
            let lead = Leading(coalescer);
            // Let the callers woken with this one queue their keys too.
            tokio::task::yield_now().await;
            std::mem::forget(lead);
            flush(client, coalescer.take()).await;
        }
        Flush::LeadFull(batch) => flush(client, batch).await,
    }
    // A batch dropped without answering (its leader dropped) leaves the key alone.
    joined.outcome.await.unwrap_or(Outcome::Alone)
}

/// A leader that has not taken the queue yet.
struct Leading<'a>(&'a Coalescer);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// Sends `batch` as one batch-get and hands each waiter its key's outcome.
async fn flush(client: &Client, batch: Vec<Waiter>) {
    if batch.len() < 2 {
        // Nothing to share: the get goes out on its own, as a get.
        for waiter in batch {
            let _ = waiter.reply.send(Outcome::Alone);
        }
        return;
    }
    let (keys, mut replies): (Vec<Vec<u8>>, Vec<Option<oneshot::Sender<Outcome>>>) =
        batch.into_iter().map(|w| (w.key, Some(w.reply))).unzip();
    let shared = &client.shared;
    let table = shared.table();
    let Ok(version) = client.version_of(&table) else {
        return; // every waiter reads alone, and meets the error itself
    };
    Counters::add(&shared.counters.gets_coalesced, keys.len() as u64);
    let answer = |events: Vec<BatchEvent>| {
        for event in events {
            match event {
                BatchEvent::Record { index, value, .. } => {
                    if let Some(reply) = replies.get_mut(index).and_then(Option::take) {
                        let _ = reply.send(Outcome::Answered(value));
                    }
                }
                BatchEvent::Done(done) if done.timed_out => {
                    let address = done.servers.first().cloned().unwrap_or_default();
                    for reply in replies.iter_mut().filter_map(Option::take) {
                        let _ = reply.send(Outcome::TimedOut {
                            address: address.clone(),
                        });
                    }
                }
                // The keys still owed are dropped below: each reads alone.
                BatchEvent::Done(_) => {}
            }
        }
    };
    stream::run_here(shared.clone(), table, version, &keys, answer).await;
}

impl Outcome {
    /// The result of the get this outcome is for, or `None` when it must be read alone.
    pub(crate) fn into_result(
        self,
        timeout: std::time::Duration,
    ) -> Option<Result<Option<RawValue>, ClientError>> {
        match self {
            Outcome::Answered(value) => Some(Ok(value)),
            Outcome::TimedOut { address } => Some(Err(ClientError::Timeout {
                address,
                after: timeout,
            })),
            Outcome::Alone => None,
        }
    }
}
