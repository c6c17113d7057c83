//! Streaming batch-get: the engine behind
//! [`Client::batch_get_stream_raw`](crate::Client::batch_get_stream_raw) and `batch_get`.
//!
//! One call runs as one task (`drive`) around the call's state machine (`call::Call`):
//! the task carries out what the machine decides and feeds it what happens. Each request to a
//! server (a *sub-request*) runs as its own task and reports back through the call's inbox as
//! response chunks arrive, so records reach the application while the rest is still on the wire.
//! Coalesced gets' batches ([`run_here`]) run the same machine on their caller's task instead,
//! sub-requests included.
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

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::{Abortable, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use rialto_protocol::avro::Value;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::call::{Action, Call};
pub use crate::call::{BatchEvent, Completeness, KeyFailure, Refusal};
use crate::codecs::Codecs;
use crate::error::{error_response, ClientError, ERROR_BODY_BYTES_MAX};
use crate::instances::Instance;
use crate::response::{BatchResponseDecoder, KeyAnswer};
use crate::routing::RoutingTable;
use crate::shared::Shared;

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
    let path: Arc<str> = match compute {
        Some(_) => rialto_protocol::wire::compute_path(&shared.store, version),
        None => rialto_protocol::wire::batch_get_path(&shared.store, version),
    }
    .into();
    let call = Call::new(shared.clone(), table.clone(), keys, compute, Instant::now());
    let task = tokio::spawn(drive(
        call,
        shared,
        table,
        path,
        Runner::Tasks,
        move |events| {
            let _ = tx.send(events);
        },
    ));
    RawBatchStream {
        rx,
        buffered: Vec::new().into_iter(),
        task: Some(task),
    }
}

/// A batch-get run on the caller's own task, its sub-requests polled there too: no task for the
/// call or its sub-requests, so no wake-up between tasks on the way out or back. For coalesced
/// gets' batches, a few keys waited on by callers for whom those hops are a good part of the
/// round trip. The same state machine decides as for [`start`]; `emit` receives the records and,
/// last, [`BatchEvent::Done`]. Dropping the future drops the sub-requests with it.
pub(crate) async fn run_here(
    shared: Arc<Shared>,
    table: Arc<RoutingTable>,
    version: u32,
    keys: &[Vec<u8>],
    emit: impl FnMut(Vec<BatchEvent>),
) {
    let path: Arc<str> = rialto_protocol::wire::batch_get_path(&shared.store, version).into();
    let call = Call::new(shared.clone(), table.clone(), keys, None, Instant::now());
    drive(call, shared, table, path, Runner::Here, emit).await;
}

/// Where a call's sub-requests run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runner {
    /// One task each: a large call's responses are decoded on several threads at once.
    Tasks,
    /// On the call's own task.
    Here,
}

/// A message from a sub-request to its call.
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

/// Runs one call: resolves how its version's values are stored, then feeds the state machine
/// sub-request messages and timer expiries until it is over, carrying out its actions. Dropping
/// it (the stream dropped) aborts the sub-requests with it.
async fn drive(
    mut call: Call,
    shared: Arc<Shared>,
    table: Arc<RoutingTable>,
    path: Arc<str>,
    runner: Runner,
    emit: impl FnMut(Vec<BatchEvent>),
) {
    let values = if call.is_compute() {
        // Results are made by the servers: nothing to decompress or verify here.
        Ok(crate::values::VersionValues::plain())
    } else {
        shared
            .values
            .for_table(&shared.pool, &shared.store, &table)
            .await
    };
    let (inbox_tx, mut inbox) = mpsc::unbounded_channel();
    let mut subs = Subs {
        shared: &shared,
        path: &path,
        inbox: &inbox_tx,
        emit,
        runner,
        tasks: JoinSet::new(),
        here: FuturesUnordered::new(),
        aborts: HashMap::new(),
    };
    subs.apply(call.start(values, Instant::now()));
    while !call.is_over() {
        let actions = tokio::select! {
            biased;
            // Sub-requests polled here first: what they report is then handled in this same
            // poll, not after a wake-up that sends this task to the back of the run queue.
            // One ended (its end came through the inbox) or was cancelled.
            Some(_) = subs.here.next(), if !subs.here.is_empty() => continue,
            msg = inbox.recv() => match msg {
                Some(SubMsg::Answers { sub, answers }) => call.on_answers(sub, answers, Instant::now()),
                Some(SubMsg::Finished { sub, result }) => {
                    subs.aborts.remove(&sub);
                    call.on_finished(sub, result, Instant::now())
                }
                None => break,
            },
            _ = tokio::time::sleep_until(call.wake_at()) => call.on_time(Instant::now()),
        };
        subs.apply(actions);
    }
    subs.tasks.abort_all();
    subs.here.clear();
    (subs.emit)(vec![BatchEvent::Done(call.finish(Instant::now()))]);
}

/// The sub-requests of one call, and where its records go.
struct Subs<'a, E> {
    shared: &'a Arc<Shared>,
    path: &'a Arc<str>,
    inbox: &'a mpsc::UnboundedSender<SubMsg>,
    emit: E,
    runner: Runner,
    tasks: JoinSet<()>,
    here: FuturesUnordered<Abortable<BoxFuture<'static, ()>>>,
    aborts: HashMap<usize, Running>,
}

/// How to stop a sub-request.
enum Running {
    Task(AbortHandle),
    Here(futures::future::AbortHandle),
}

impl<E: FnMut(Vec<BatchEvent>)> Subs<'_, E> {
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send {
                    sub,
                    instance,
                    body,
                    keys,
                } => {
                    let run = run_sub(
                        self.shared.clone(),
                        instance,
                        self.path.clone(),
                        body,
                        keys,
                        sub,
                        self.inbox.clone(),
                    );
                    let running = match self.runner {
                        Runner::Tasks => Running::Task(self.tasks.spawn(run)),
                        Runner::Here => {
                            let (run, abort) = futures::future::abortable(run.boxed());
                            self.here.push(run);
                            Running::Here(abort)
                        }
                    };
                    self.aborts.insert(sub, running);
                }
                Action::Cancel { sub } => match self.aborts.remove(&sub) {
                    Some(Running::Task(abort)) => abort.abort(),
                    Some(Running::Here(abort)) => abort.abort(),
                    None => {}
                },
                Action::Emit(records) => (self.emit)(records),
            }
        }
    }
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
