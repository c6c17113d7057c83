//! Incremental decoding of a streamed batch-get response.
//!
//! The server streams [`BatchGetFrame`]s in chunks that do not respect frame boundaries; the
//! decoder hands out each answer as soon as its frame is complete, so a caller can pass answers
//! on while the rest of the response is still on the wire.
//!
//! Each byte received is copied once: the frames a chunk completes go into one block, and values
//! are slices of that block; the unfinished frame at the chunk's end is carried to the next. The
//! blocks come from a [`ReceivePool`] and go back to it when the caller drops the last value in
//! them. Without the pool every response lands in freshly allocated memory, which glibc's
//! allocator hands back to the kernel once the values are dropped: page faults and `madvise`
//! were a quarter of the client's CPU in a 5,000-key batch-get benchmark.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rialto_protocol::recycle::{self, Recycle};
use rialto_protocol::wire::{decode_frame, frame_len, BatchGetFrame, BatchGetTrailer, StoredValue};
use rialto_protocol::ErrorCode;

/// A value as the server stored it: its value schema id and the Avro datum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawValue {
    /// The id of the value schema the datum was written with.
    pub schema_id: u32,
    /// The Avro binary datum.
    pub bytes: Bytes,
}

/// The answer for one key of a batch-get request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyAnswer {
    /// The key has this value.
    Found(RawValue),
    /// The key is not in the store.
    Missing,
    /// The server could not answer this key.
    Failed(ErrorCode),
}

/// Blocks are allocated in multiples of this, so that a block fits the next chunks of a size.
const BLOCK_ROUNDING: usize = 64 * 1024;
/// Blocks larger than this (chunks are at most the HTTP/2 frame size, 1 MiB) are not kept.
const BLOCK_POOLED_MAX: usize = 2 * 1024 * 1024;
const SIZE_CLASSES: usize = BLOCK_POOLED_MAX / BLOCK_ROUNDING;

/// Memory for received responses, recycled: blocks the caller no longer references are kept, up
/// to `bytes_max` bytes in all, for the next responses (see the module docs).
pub(crate) struct ReceivePool {
    bytes_max: usize,
    free: Mutex<FreeBlocks>,
    reused: AtomicU64,
    allocated: AtomicU64,
}

/// A [`ReceivePool`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReceivePoolStats {
    /// Blocks taken from the pool.
    pub(crate) reused: u64,
    /// Blocks allocated.
    pub(crate) allocated: u64,
    /// Bytes of free blocks kept.
    pub(crate) free_bytes: u64,
}

struct FreeBlocks {
    /// `by_class[c]`: free blocks of capacity `(c + 1) * BLOCK_ROUNDING`.
    by_class: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

impl ReceivePool {
    /// A pool keeping up to `bytes_max` bytes of free blocks; 0 keeps none.
    pub(crate) fn new(bytes_max: usize) -> Arc<ReceivePool> {
        Arc::new(ReceivePool {
            bytes_max,
            free: Mutex::new(FreeBlocks {
                by_class: vec![Vec::new(); SIZE_CLASSES],
                bytes: 0,
            }),
            reused: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
        })
    }

    pub(crate) fn stats(&self) -> ReceivePoolStats {
        ReceivePoolStats {
            reused: self.reused.load(Ordering::Relaxed),
            allocated: self.allocated.load(Ordering::Relaxed),
            free_bytes: self.lock().bytes as u64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeBlocks> {
        // A panic while holding the lock leaves the free lists valid: go on with them.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `data` copied into a block of this pool, as `Bytes` that return the block when dropped.
    fn copy(self: &Arc<Self>, data: &[u8]) -> Bytes {
        let capacity = data
            .len()
            .next_multiple_of(BLOCK_ROUNDING)
            .max(BLOCK_ROUNDING);
        if self.bytes_max == 0 || capacity > BLOCK_POOLED_MAX {
            self.allocated.fetch_add(1, Ordering::Relaxed);
            return Bytes::copy_from_slice(data);
        }
        let class = capacity / BLOCK_ROUNDING - 1;
        let reused = {
            let mut free = self.lock();
            let block = free.by_class[class].pop();
            if let Some(block) = &block {
                free.bytes -= block.capacity();
            }
            block
        };
        let counter = if reused.is_some() {
            &self.reused
        } else {
            &self.allocated
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut block = reused.unwrap_or_else(|| Vec::with_capacity(capacity));
        block.extend_from_slice(data);
        recycle::lend(self, block)
    }
}

impl Recycle for ReceivePool {
    fn recycle(&self, mut block: Vec<u8>) {
        // Only blocks of a size class this pool allocates (a Vec<u8> keeps its exact capacity).
        let capacity = block.capacity();
        let class = capacity / BLOCK_ROUNDING;
        if class == 0 || class > SIZE_CLASSES || class * BLOCK_ROUNDING != capacity {
            return;
        }
        block.clear();
        let mut free = self.lock();
        if free.bytes + capacity <= self.bytes_max {
            free.bytes += capacity;
            free.by_class[class - 1].push(block);
        }
    }
}

/// Decodes one batch-get response from chunks of any size.
pub(crate) struct BatchResponseDecoder {
    pool: Arc<ReceivePool>,
    /// The start of a frame that the last chunk did not complete.
    carry: Vec<u8>,
    keys_total: u32,
    trailer: Option<BatchGetTrailer>,
}

impl BatchResponseDecoder {
    /// A decoder for the response to a request of `keys_total` keys, its blocks from `pool`.
    pub(crate) fn new(keys_total: u32, pool: Arc<ReceivePool>) -> BatchResponseDecoder {
        BatchResponseDecoder {
            pool,
            carry: Vec::new(),
            keys_total,
            trailer: None,
        }
    }

    /// Feeds the next chunk and calls `on_answer(key_index, answer)` for every frame it completes.
    ///
    /// Fails (with a description for a protocol error) on an undecodable frame, a key index out of
    /// range, a wrong trailer, or data after the trailer.
    pub(crate) fn push(
        &mut self,
        chunk: &[u8],
        mut on_answer: impl FnMut(u32, KeyAnswer),
    ) -> Result<(), String> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.trailer.is_some() {
            return Err(format!("{} bytes after the batch-get trailer", chunk.len()));
        }
        let mut rest = chunk;
        // First complete the frame the last chunk started, taking only the bytes it lacks (one
        // by one while a record's header is incomplete).
        if !self.carry.is_empty() {
            loop {
                let lacking = match frame_len(&self.carry).map_err(undecodable)? {
                    Some(len) => {
                        // A large value arrives over many chunks: grow the carry once.
                        let lacking = len.saturating_sub(self.carry.len());
                        self.carry.reserve_exact(lacking);
                        lacking
                    }
                    None => 1,
                };
                if lacking == 0 {
                    break;
                }
                if rest.is_empty() {
                    return Ok(()); // still unfinished
                }
                let n = lacking.min(rest.len());
                self.carry.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            let frame = Bytes::from(std::mem::take(&mut self.carry));
            self.decode_frames(&frame, &mut on_answer)?;
        }
        // The frames that are whole in the rest of the chunk: into one block.
        let mut whole = 0;
        while let Some(len) = frame_len(&rest[whole..]).map_err(undecodable)? {
            if whole + len > rest.len() {
                break;
            }
            whole += len;
        }
        if whole > 0 {
            let block = self.pool.copy(&rest[..whole]);
            self.decode_frames(&block, &mut on_answer)?;
        }
        if whole < rest.len() {
            if self.trailer.is_some() {
                return Err(format!(
                    "{} bytes after the batch-get trailer",
                    rest.len() - whole
                ));
            }
            self.carry.extend_from_slice(&rest[whole..]);
        }
        Ok(())
    }

    /// Decodes `block`, which holds whole frames only; values are slices of it.
    fn decode_frames(
        &mut self,
        block: &Bytes,
        on_answer: &mut impl FnMut(u32, KeyAnswer),
    ) -> Result<(), String> {
        let mut at = 0;
        while at < block.len() {
            if self.trailer.is_some() {
                return Err(format!(
                    "{} bytes after the batch-get trailer",
                    block.len() - at
                ));
            }
            let Some((frame, used)) = decode_frame(&block[at..]).map_err(undecodable)? else {
                return Err("a batch-get frame cut short".to_string());
            };
            let (key_index, answer) = match frame {
                BatchGetFrame::Trailer(t) => {
                    if t.keys_total != self.keys_total {
                        return Err(format!(
                            "batch-get trailer counts {} keys, the request had {}",
                            t.keys_total, self.keys_total
                        ));
                    }
                    self.trailer = Some(t);
                    at += used;
                    continue;
                }
                BatchGetFrame::Missing { key_index } => (key_index, KeyAnswer::Missing),
                BatchGetFrame::KeyError { key_index, code } => (key_index, KeyAnswer::Failed(code)),
                BatchGetFrame::Record { key_index, stored } => {
                    let schema_id = StoredValue::decode(stored)
                        .map_err(|e| format!("stored value of key {key_index}: {e}"))?
                        .0;
                    // The value is the frame's end after the schema id: sliced, not copied.
                    let value_start = at + used - stored.len() + 4;
                    let value = RawValue {
                        schema_id,
                        bytes: block.slice(value_start..at + used),
                    };
                    (key_index, KeyAnswer::Found(value))
                }
            };
            self.check_index(key_index)?;
            on_answer(key_index, answer);
            at += used;
        }
        Ok(())
    }

    fn check_index(&self, key_index: u32) -> Result<(), String> {
        if key_index >= self.keys_total {
            return Err(format!(
                "batch-get answer for key {key_index} of a request of {} keys",
                self.keys_total
            ));
        }
        Ok(())
    }

    /// The trailer, once received; a response that ended without one is incomplete.
    pub(crate) fn trailer(&self) -> Option<BatchGetTrailer> {
        self.trailer
    }
}

fn undecodable(e: impl std::fmt::Display) -> String {
    format!("undecodable batch-get frame: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rialto_protocol::wire::BatchGetFrameWriter;

    /// Pools of every kind: none kept, one block kept, plenty.
    const POOLS: [usize; 3] = [0, BLOCK_ROUNDING, RECEIVE_POOL_BYTES];
    const RECEIVE_POOL_BYTES: usize = crate::RECEIVE_POOL_BYTES;

    fn response(keys_total: u32) -> Vec<u8> {
        let mut out = Vec::new();
        BatchGetFrameWriter::record(&mut out, 2, &StoredValue::encode(7, b"value-two"));
        BatchGetFrameWriter::missing(&mut out, 0);
        BatchGetFrameWriter::key_error(&mut out, 1, ErrorCode::PartitionNotServed);
        BatchGetFrameWriter::record(&mut out, 3, &StoredValue::encode(8, &vec![0xAB; 70_000]));
        BatchGetFrameWriter::record(&mut out, 4, &StoredValue::encode(9, b""));
        let t = BatchGetTrailer {
            keys_total,
            found: 3,
            missing: 1,
            errors: 1,
        };
        BatchGetFrameWriter::trailer(&mut out, &t);
        out
    }

    fn decode_in_chunks(
        bytes: &[u8],
        pool: &Arc<ReceivePool>,
        sizes: impl Fn(usize) -> usize,
    ) -> (Vec<(u32, KeyAnswer)>, bool) {
        let mut decoder = BatchResponseDecoder::new(5, Arc::clone(pool));
        let mut answers = Vec::new();
        let mut at = 0;
        let mut step = 0;
        while at < bytes.len() {
            let n = sizes(step).clamp(1, bytes.len() - at);
            decoder
                .push(&bytes[at..at + n], |i, a| answers.push((i, a)))
                .unwrap();
            at += n;
            step += 1;
        }
        (answers, decoder.trailer().is_some())
    }

    fn expected() -> Vec<(u32, KeyAnswer)> {
        vec![
            (
                2,
                KeyAnswer::Found(RawValue {
                    schema_id: 7,
                    bytes: Bytes::from_static(b"value-two"),
                }),
            ),
            (0, KeyAnswer::Missing),
            (1, KeyAnswer::Failed(ErrorCode::PartitionNotServed)),
            (
                3,
                KeyAnswer::Found(RawValue {
                    schema_id: 8,
                    bytes: Bytes::from(vec![0xAB; 70_000]),
                }),
            ),
            (
                4,
                KeyAnswer::Found(RawValue {
                    schema_id: 9,
                    bytes: Bytes::new(),
                }),
            ),
        ]
    }

    #[test]
    fn frames_split_across_any_chunk_boundary_decode_the_same() {
        let bytes = response(5);
        for bytes_max in POOLS {
            let pool = ReceivePool::new(bytes_max);
            // Every single split point, then a few irregular chunkings.
            for split in 1..bytes.len() {
                let (answers, complete) =
                    decode_in_chunks(
                        &bytes,
                        &pool,
                        |step| {
                            if step == 0 {
                                split
                            } else {
                                usize::MAX
                            }
                        },
                    );
                assert_eq!(answers, expected(), "split at {split}, pool {bytes_max}");
                assert!(complete);
            }
            for pattern in [[1usize, 2, 3], [7, 1, 13], [4096, 3, 17], [9, 9, 9]] {
                let (answers, complete) = decode_in_chunks(&bytes, &pool, |step| pattern[step % 3]);
                assert_eq!(answers, expected(), "{pattern:?}, pool {bytes_max}");
                assert!(complete);
            }
        }
    }

    #[test]
    fn a_response_without_trailer_is_incomplete() {
        let bytes = response(5);
        let pool = ReceivePool::new(RECEIVE_POOL_BYTES);
        let (answers, complete) = decode_in_chunks(&bytes[..bytes.len() - 1], &pool, |_| 5);
        assert_eq!(answers.len(), 5);
        assert!(!complete);
    }

    #[test]
    fn blocks_go_back_to_the_pool_when_the_last_value_is_dropped() {
        let mut one = Vec::new();
        BatchGetFrameWriter::record(&mut one, 0, &StoredValue::encode(1, &[7; 1000]));
        BatchGetFrameWriter::trailer(
            &mut one,
            &BatchGetTrailer {
                keys_total: 1,
                found: 1,
                ..Default::default()
            },
        );
        let decode = |pool: &Arc<ReceivePool>| {
            let mut values = Vec::new();
            let mut d = BatchResponseDecoder::new(1, Arc::clone(pool));
            d.push(&one, |_, a| values.push(a)).unwrap();
            assert!(d.trailer().is_some());
            values
        };
        // One block kept at most: the first response's block is reused by the third.
        let pool = ReceivePool::new(BLOCK_ROUNDING);
        let first = decode(&pool);
        let second = decode(&pool);
        assert_eq!(
            pool.stats().free_bytes as usize,
            0,
            "values still reference both blocks"
        );
        let KeyAnswer::Found(value) = &first[0] else {
            panic!("{first:?}")
        };
        let first_value_at = value.bytes.as_ptr();
        drop(first);
        assert_eq!(pool.stats().free_bytes as usize, BLOCK_ROUNDING);
        drop(second);
        assert_eq!(
            pool.stats().free_bytes as usize,
            BLOCK_ROUNDING,
            "the pool keeps at most its limit"
        );
        let third = decode(&pool);
        assert_eq!(pool.stats().free_bytes as usize, 0);
        let KeyAnswer::Found(value) = &third[0] else {
            panic!("{third:?}")
        };
        assert_eq!(value.bytes.as_ptr(), first_value_at, "the block is reused");
        let stats = pool.stats();
        assert_eq!((stats.allocated, stats.reused), (2, 1));
        assert_eq!(&value.bytes[..], &[7; 1000][..]);
        // A value outliving its decoder and its response keeps the block.
        let value = value.bytes.clone();
        drop(third);
        assert_eq!(pool.stats().free_bytes as usize, 0);
        drop(value);
        assert_eq!(pool.stats().free_bytes as usize, BLOCK_ROUNDING);
        // A pool of 0 bytes keeps nothing.
        let none = ReceivePool::new(0);
        drop(decode(&none));
        drop(decode(&none));
        assert_eq!(none.stats().free_bytes as usize, 0);
        assert_eq!((none.stats().allocated, none.stats().reused), (2, 0));
    }

    #[test]
    fn bad_responses_are_errors_not_panics() {
        let pool = ReceivePool::new(RECEIVE_POOL_BYTES);
        let trailer = |keys_total| {
            let mut out = Vec::new();
            BatchGetFrameWriter::trailer(
                &mut out,
                &BatchGetTrailer {
                    keys_total,
                    ..Default::default()
                },
            );
            out
        };
        let mut d = BatchResponseDecoder::new(1, Arc::clone(&pool));
        let mut out = Vec::new();
        BatchGetFrameWriter::missing(&mut out, 1);
        assert!(d
            .push(&out, |_, _| {})
            .unwrap_err()
            .contains("key 1 of a request of 1"));

        let mut d = BatchResponseDecoder::new(2, Arc::clone(&pool));
        assert!(d.push(&[0x42], |_, _| {}).is_err());

        // An unknown frame after an unfinished one.
        let mut d = BatchResponseDecoder::new(2, Arc::clone(&pool));
        d.push(&[0x02, 0, 0], |_, _| {}).unwrap();
        assert!(d.push(&[0, 1, 0x42], |_, _| {}).is_err());

        let mut d = BatchResponseDecoder::new(3, Arc::clone(&pool));
        assert!(d.push(&trailer(3 + 1), |_, _| {}).is_err());

        // Data after the trailer: in the same chunk (whole or partial frames), or later.
        for extra in [&[0x02u8, 0, 0, 0, 0][..], &[0x02, 0]] {
            let mut d = BatchResponseDecoder::new(3, Arc::clone(&pool));
            let mut out = trailer(3);
            out.extend_from_slice(extra);
            assert!(d
                .push(&out, |_, _| {})
                .unwrap_err()
                .contains("after the batch-get trailer"));
        }
        let mut d = BatchResponseDecoder::new(3, Arc::clone(&pool));
        d.push(&trailer(3), |_, _| {}).unwrap();
        assert!(d.push(&[0x02], |_, _| {}).is_err());
        // A trailer completed from a carried start, then more.
        let mut d = BatchResponseDecoder::new(3, Arc::clone(&pool));
        let t = trailer(3);
        d.push(&t[..3], |_, _| {}).unwrap();
        let mut rest = t[3..].to_vec();
        rest.push(0x02);
        assert!(d.push(&rest, |_, _| {}).is_err());

        let mut d = BatchResponseDecoder::new(3, Arc::clone(&pool));
        let mut out = Vec::new();
        BatchGetFrameWriter::record(&mut out, 0, b"ab"); // stored value shorter than its schema id
        assert!(d.push(&out, |_, _| {}).is_err());

        // A record claiming a value over the limit fails at its header, without waiting for it.
        let mut d = BatchResponseDecoder::new(3, Arc::clone(&pool));
        let mut huge = vec![0x01, 0, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(d.push(&huge, |_, _| {}).is_err());
    }
}
