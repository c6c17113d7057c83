//! Incremental decoding of a streamed batch-get response.
//!
//! The server streams [`BatchGetFrame`]s in chunks that do not respect frame boundaries; the
//! decoder keeps the unfinished tail of the last chunk and hands out each answer as soon as its
//! frame is complete, so a caller can pass answers on (to a result vector today, to a `Stream`
//! later) while the rest of the response is still on the wire. Values are sliced out of the
//! receive buffer without another copy.

use bytes::{Bytes, BytesMut};
use rialto_protocol::wire::{decode_frame, BatchGetFrame, BatchGetTrailer, StoredValue};
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

/// Decodes one batch-get response from chunks of any size.
pub(crate) struct BatchResponseDecoder {
    buf: BytesMut,
    keys_total: u32,
    trailer: Option<BatchGetTrailer>,
}

impl BatchResponseDecoder {
    /// A decoder for the response to a request of `keys_total` keys.
    pub(crate) fn new(keys_total: u32) -> BatchResponseDecoder {
        BatchResponseDecoder {
            buf: BytesMut::new(),
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
        self.buf.extend_from_slice(chunk);
        loop {
            let (key_index, answer, used) = match decode_frame(&self.buf) {
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("undecodable batch-get frame: {e}")),
                Ok(Some((BatchGetFrame::Trailer(t), used))) => {
                    if t.keys_total != self.keys_total {
                        return Err(format!(
                            "batch-get trailer counts {} keys, the request had {}",
                            t.keys_total, self.keys_total
                        ));
                    }
                    self.trailer = Some(t);
                    let _ = self.buf.split_to(used);
                    if !self.buf.is_empty() {
                        return Err(format!(
                            "{} bytes after the batch-get trailer",
                            self.buf.len()
                        ));
                    }
                    return Ok(());
                }
                Ok(Some((BatchGetFrame::Missing { key_index }, used))) => {
                    (key_index, KeyAnswer::Missing, used)
                }
                Ok(Some((BatchGetFrame::KeyError { key_index, code }, used))) => {
                    (key_index, KeyAnswer::Failed(code), used)
                }
                Ok(Some((BatchGetFrame::Record { key_index, stored }, used))) => {
                    let schema_id = StoredValue::decode(stored)
                        .map_err(|e| format!("stored value of key {key_index}: {e}"))?
                        .0;
                    // Where the value starts inside the frame, so it can be sliced out without a copy.
                    let start = stored.as_ptr() as usize - self.buf.as_ptr() as usize + 4;
                    let frame = self.buf.split_to(used).freeze();
                    let value = RawValue {
                        schema_id,
                        bytes: frame.slice(start..used),
                    };
                    self.check_index(key_index)?;
                    on_answer(key_index, KeyAnswer::Found(value));
                    continue;
                }
            };
            let _ = self.buf.split_to(used);
            self.check_index(key_index)?;
            on_answer(key_index, answer);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rialto_protocol::wire::BatchGetFrameWriter;

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
        sizes: impl Fn(usize) -> usize,
    ) -> (Vec<(u32, KeyAnswer)>, bool) {
        let mut decoder = BatchResponseDecoder::new(5);
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
        // Every single split point, then a few irregular chunkings.
        for split in 1..bytes.len() {
            let (answers, complete) =
                decode_in_chunks(&bytes, |step| if step == 0 { split } else { usize::MAX });
            assert_eq!(answers, expected(), "split at {split}");
            assert!(complete);
        }
        for pattern in [[1usize, 2, 3], [7, 1, 13], [4096, 3, 17], [9, 9, 9]] {
            let (answers, complete) = decode_in_chunks(&bytes, |step| pattern[step % 3]);
            assert_eq!(answers, expected());
            assert!(complete);
        }
    }

    #[test]
    fn a_response_without_trailer_is_incomplete() {
        let bytes = response(5);
        let (answers, complete) = decode_in_chunks(&bytes[..bytes.len() - 1], |_| 5);
        assert_eq!(answers.len(), 5);
        assert!(!complete);
    }

    #[test]
    fn bad_responses_are_errors_not_panics() {
        let mut d = BatchResponseDecoder::new(1);
        let mut out = Vec::new();
        BatchGetFrameWriter::missing(&mut out, 1);
        assert!(d
            .push(&out, |_, _| {})
            .unwrap_err()
            .contains("key 1 of a request of 1"));

        let mut d = BatchResponseDecoder::new(2);
        assert!(d.push(&[0x42], |_, _| {}).is_err());

        let mut d = BatchResponseDecoder::new(2);
        let mut out = Vec::new();
        BatchGetFrameWriter::trailer(
            &mut out,
            &BatchGetTrailer {
                keys_total: 3,
                ..Default::default()
            },
        );
        assert!(d.push(&out, |_, _| {}).is_err());

        let mut d = BatchResponseDecoder::new(3);
        let mut out = Vec::new();
        BatchGetFrameWriter::trailer(
            &mut out,
            &BatchGetTrailer {
                keys_total: 3,
                ..Default::default()
            },
        );
        BatchGetFrameWriter::missing(&mut out, 0);
        assert!(d.push(&out, |_, _| {}).is_err());

        let mut d = BatchResponseDecoder::new(3);
        let mut out = Vec::new();
        BatchGetFrameWriter::record(&mut out, 0, b"ab"); // stored value shorter than its schema id
        assert!(d.push(&out, |_, _| {}).is_err());
    }
}
