//! The two write paths of a push, chosen by its START_OF_PUSH, behind one [`Writes`]:
//!
//! * **Write batches** (an unsorted push): each poll's validated records are written in one
//!   RocksDB write batch together with the checkpoint that follows them, so data and checkpoint
//!   are durable together.
//! * **SST chunks** (a sorted push): records collect in a [`SortedChunk`] of up to
//!   [`ChunkLimits::bytes`] or [`ChunkLimits::age`]; a due chunk is written as an SST file on a
//!   blocking thread while the task consumes on, then ingested with its checkpoint (a replay
//!   after a crash in between skips the keys already ingested: `ReplicaStore::write_sorted`).
//!   At most two chunks are in memory: one filling, one being written.
//!
//! Either way, what the replica reports as its offset is the checkpoint a restart would resume
//! from: [`Writes::write`] returns a checkpoint only once it is in the database.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::{blocking, Ended};
use crate::node::NodeContext;
use crate::store::{ChunkLimits, ReplicaStore, WriteOp};
use crate::validator::Checkpoint;

/// Where a bootstrapping replica's validated records go until END_OF_PUSH.
pub(super) struct Writes {
    /// Records of a sorted push not yet ingested (empty for an unsorted push).
    chunk: SortedChunk,
    /// The record count of the last checkpoint given to [`Writes::write`].
    records: u64,
}

impl Writes {
    /// Writes continuing from `checkpoint` (where the replica resumes).
    pub(super) fn new(checkpoint: &Checkpoint) -> Writes {
        Writes {
            chunk: SortedChunk::default(),
            records: checkpoint.records,
        }
    }

    /// Writes `ops`, the records up to `next`, by the push's path; with `flush`, everything
    /// pending is made durable before this returns. Returns the newest checkpoint made durable.
    pub(super) async fn write(
        &mut self,
        ctx: &NodeContext,
        store: &Arc<ReplicaStore>,
        ops: Vec<WriteOp>,
        next: Checkpoint,
        flush: bool,
    ) -> Result<Option<Checkpoint>, Ended> {
        let records = next.records.saturating_sub(self.records);
        self.records = next.records;
        if !ingests_sst_files(&next) {
            let (s, cp) = (store.clone(), next.clone());
            blocking(move || s.apply(&ops, &cp))
                .await
                .map_err(|e| Ended::Failed(format!("cannot write to the replica database: {e}")))?;
            ctx.metrics
                .records_ingested
                .fetch_add(records, Ordering::Relaxed);
            return Ok(Some(next));
        }
        self.chunk.add(ops, next);
        if flush {
            self.chunk.ingest(ctx, store).await
        } else if self.chunk.is_due(&ctx.sorted_chunk) {
            self.chunk.start(ctx, store).await
        } else {
            Ok(None)
        }
    }

    /// Between records: starts writing a chunk that came due by age. Returns the newest
    /// checkpoint made durable, if any.
    pub(super) async fn idle(
        &mut self,
        ctx: &NodeContext,
        store: &Arc<ReplicaStore>,
    ) -> Result<Option<Checkpoint>, Ended> {
        if self.chunk.is_due(&ctx.sorted_chunk) {
            self.chunk.start(ctx, store).await
        } else {
            Ok(None)
        }
    }

    /// The checkpoint of a chunk whose writing finished, without waiting.
    pub(super) async fn written(&mut self, ctx: &NodeContext) -> Result<Option<Checkpoint>, Ended> {
        self.chunk.written(ctx).await
    }

    /// Makes everything pending durable. Returns the newest checkpoint made durable, if any.
    pub(super) async fn flush(
        &mut self,
        ctx: &NodeContext,
        store: &Arc<ReplicaStore>,
    ) -> Result<Option<Checkpoint>, Ended> {
        self.chunk.ingest(ctx, store).await
    }

    /// Waits for a chunk being written, whatever its outcome, and drops what is pending.
    pub(super) async fn abandon(&mut self) {
        self.chunk.abandon().await
    }
}

/// Whether this replica's push goes through SST ingestion (START_OF_PUSH says sorted).
pub(super) fn ingests_sst_files(checkpoint: &Checkpoint) -> bool {
    checkpoint
        .validation
        .start_of_push
        .is_some_and(|sop| sop.sorted)
}

/// Validated records of a sorted push waiting to be written as one SST file, and the chunk before
/// them being written (at most one: writes stay in order).
struct SortedChunk {
    ops: Vec<WriteOp>,
    bytes: usize,
    /// The checkpoint after the last record in `ops`.
    checkpoint: Option<Checkpoint>,
    started: Instant,
    writing: Option<ChunkWrite>,
}

/// A chunk being written and ingested on a blocking thread.
struct ChunkWrite {
    task: tokio::task::JoinHandle<Result<(), crate::ServerError>>,
    /// The checkpoint written with it.
    checkpoint: Checkpoint,
    records: u64,
}

impl Default for SortedChunk {
    fn default() -> Self {
        SortedChunk {
            ops: Vec::new(),
            bytes: 0,
            checkpoint: None,
            started: Instant::now(),
            writing: None,
        }
    }
}

impl SortedChunk {
    fn is_empty(&self) -> bool {
        self.checkpoint.is_none()
    }

    /// Whether the chunk is full or old enough to be written.
    fn is_due(&self, limits: &ChunkLimits) -> bool {
        !self.is_empty() && (self.bytes >= limits.bytes || self.started.elapsed() >= limits.age)
    }

    fn add(&mut self, ops: Vec<WriteOp>, checkpoint: Checkpoint) {
        if self.is_empty() {
            self.started = Instant::now();
        }
        self.bytes += ops
            .iter()
            .map(|op| match op {
                WriteOp::Put { key, value } => key.len() + value.len(),
                WriteOp::Delete { key } => key.len(),
            })
            .sum::<usize>();
        self.ops.extend(ops);
        self.checkpoint = Some(checkpoint);
    }

    /// Waits for the chunk being written, if any; returns the checkpoint it made durable.
    async fn wait(&mut self, ctx: &NodeContext) -> Result<Option<Checkpoint>, Ended> {
        let Some(write) = self.writing.take() else {
            return Ok(None);
        };
        match write.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Ended::Failed(format!("cannot ingest a sorted chunk: {e}")));
            }
            Err(e) => {
                return Err(Ended::Failed(format!(
                    "ingesting a sorted chunk panicked: {e}"
                )));
            }
        }
        ctx.metrics
            .records_ingested
            .fetch_add(write.records, Ordering::Relaxed);
        if write.records > 0 {
            ctx.metrics
                .sst_files_ingested
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(write.checkpoint))
    }

    /// The checkpoint of the chunk being written if it is done, without waiting.
    async fn written(&mut self, ctx: &NodeContext) -> Result<Option<Checkpoint>, Ended> {
        match &self.writing {
            Some(write) if write.task.is_finished() => self.wait(ctx).await,
            _ => Ok(None),
        }
    }

    /// Starts writing the chunk in the background, waits for the chunk before it (whose
    /// ingestion overlaps this chunk's file being written), then leaves this chunk's ingestion
    /// running, and empties it. Returns the checkpoint the previous chunk made durable, if any.
    async fn start(
        &mut self,
        ctx: &NodeContext,
        store: &Arc<ReplicaStore>,
    ) -> Result<Option<Checkpoint>, Ended> {
        let Some(checkpoint) = self.checkpoint.take() else {
            return self.wait(ctx).await;
        };
        let ops = std::mem::take(&mut self.ops);
        self.bytes = 0;
        let records = ops.len() as u64;
        let (s, chunk) = (store.clone(), checkpoint.next_offset);
        let written = rialto_backends::blocking::spawn(move || s.write_sorted(&ops, chunk));
        let previous = match self.wait(ctx).await {
            Ok(previous) => previous,
            Err(e) => {
                // Nothing writes to the replica after its task ends.
                let _ = written.await;
                return Err(e);
            }
        };
        let (s, cp) = (store.clone(), checkpoint.clone());
        let task = tokio::spawn(async move {
            let file = written
                .await
                .map_err(|e| crate::ServerError::Task("write a sorted chunk", e.to_string()))??;
            rialto_backends::blocking::spawn(move || s.ingest_written(file, &cp))
                .await
                .map_err(|e| crate::ServerError::Task("ingest a sorted chunk", e.to_string()))?
        });
        self.writing = Some(ChunkWrite {
            task,
            checkpoint,
            records,
        });
        Ok(previous)
    }

    /// Writes and ingests the chunk (after the one being written), then its checkpoint; empties
    /// it. Returns the last checkpoint written, `None` if nothing was.
    async fn ingest(
        &mut self,
        ctx: &NodeContext,
        store: &Arc<ReplicaStore>,
    ) -> Result<Option<Checkpoint>, Ended> {
        let previous = self.start(ctx, store).await?;
        Ok(self.wait(ctx).await?.or(previous))
    }

    /// Waits for the chunk being written, whatever its outcome: nothing writes to the replica
    /// after its task ends.
    async fn abandon(&mut self) {
        if let Some(write) = self.writing.take() {
            let _ = write.task.await;
        }
    }
}
