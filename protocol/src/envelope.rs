//! The pub-sub envelope: the value of every record on a version topic.
//!
//! Layout (all integers big-endian), format version 1:
//!
//! ```text
//! magic        u8   = 0xA7
//! format       u8   = 1
//! kind         u8   0 = PUT, 1 = DELETE, 2 = CONTROL, 3 = copied PUT, 4 = copied DELETE
//! producer     [u8; 16]   producer GUID, one per writer
//! segment      u32        segment number of this producer on this partition
//! sequence     u32        sequence number inside the segment, START_OF_SEGMENT is 0
//! timestamp_ms i64        logical timestamp set by the producer
//! (copied)     u64, i64   kinds 3 and 4 only: the copying leader's epoch and the record's
//!                         offset in the real-time topic (see [`Upstream`])
//! payload      ...        PUT:     key_len u32, key, schema_id u32, value_len u32, value
//!                         DELETE:  key_len u32, key
//!                         CONTROL: control_type u8, body (see [`ControlMessage`])
//! crc          u32        CRC32C of every byte before it
//! ```
//!
//! The trailing CRC catches a corrupted record on its own; the END_OF_SEGMENT checksum (CRC32C
//! over the payloads of the segment's data records, see [`SegmentChecksum`]) catches records that
//! went missing or were reordered. A server that finds either refuses the partition.

use thiserror::Error;

/// First byte of every envelope.
pub const ENVELOPE_MAGIC: u8 = 0xA7;
/// The format version written by this code.
pub const ENVELOPE_FORMAT: u8 = 1;
/// Largest key accepted anywhere in Rialto.
pub const KEY_BYTES_MAX: usize = 64 * 1024;
/// Largest value accepted in one topic record; larger values are chunked (see
/// [`stored`](crate::stored)).
pub const VALUE_BYTES_MAX: usize = 900 * 1024;
/// Largest compression dictionary carried in START_OF_PUSH.
pub const DICTIONARY_BYTES_MAX: usize = 1024 * 1024;

const HEADER_BYTES: usize = 1 + 1 + 1 + 16 + 4 + 4 + 8;

/// Errors decoding an envelope. Any of them makes the record untrustworthy.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope truncated: needed {needed} bytes at offset {at}, record has {len}")]
    Truncated {
        needed: usize,
        at: usize,
        len: usize,
    },
    #[error("bad envelope magic byte {0:#04x}: not a Rialto record")]
    BadMagic(u8),
    #[error("unsupported envelope format {0}; this build reads format {ENVELOPE_FORMAT}")]
    UnsupportedFormat(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("unknown control message type {0}")]
    UnknownControl(u8),
    #[error("envelope checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    #[error("unknown compression codec {0}")]
    UnknownCodec(u8),
}

/// Who wrote a record, and where it sits in that writer's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProducerMetadata {
    pub producer_guid: [u8; 16],
    pub segment: u32,
    pub sequence: u32,
    pub timestamp_ms: i64,
}

/// Value compression of a version, announced in START_OF_PUSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionCodec {
    #[default]
    None = 0,
    Zstd = 1,
    ZstdWithDictionary = 2,
}

impl CompressionCodec {
    fn from_u8(v: u8) -> Result<Self, EnvelopeError> {
        match v {
            0 => Ok(Self::None),
            1 => Ok(Self::Zstd),
            2 => Ok(Self::ZstdWithDictionary),
            other => Err(EnvelopeError::UnknownCodec(other)),
        }
    }
}

/// Control messages interleaved with data on a version topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// First message of a push on every partition.
    StartOfPush {
        sorted: bool,
        codec: CompressionCodec,
        dictionary: Vec<u8>,
    },
    /// Last message of a push: the partition holds the complete dataset once this is consumed.
    EndOfPush,
    /// Opens segment `segment` of a producer; its sequence number is 0.
    StartOfSegment,
    /// Closes a segment with the checksum and count of its data records.
    EndOfSegment { checksum: u32, record_count: u32 },
    /// Real-time buffer replay starts at these real-time topic offsets (one per partition).
    StartOfBufferReplay { rt_offsets: Vec<i64> },
}

impl ControlMessage {
    fn type_byte(&self) -> u8 {
        match self {
            ControlMessage::StartOfPush { .. } => 0,
            ControlMessage::EndOfPush => 1,
            ControlMessage::StartOfSegment => 2,
            ControlMessage::EndOfSegment { .. } => 3,
            ControlMessage::StartOfBufferReplay { .. } => 4,
        }
    }

    /// Name as used in logs.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::StartOfPush { .. } => "START_OF_PUSH",
            ControlMessage::EndOfPush => "END_OF_PUSH",
            ControlMessage::StartOfSegment => "START_OF_SEGMENT",
            ControlMessage::EndOfSegment { .. } => "END_OF_SEGMENT",
            ControlMessage::StartOfBufferReplay { .. } => "START_OF_BUFFER_REPLAY",
        }
    }
}

/// The payload of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Put {
        key: Vec<u8>,
        schema_id: u32,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    Control(ControlMessage),
}

/// Where a record copied from the real-time topic into a version topic came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// The copying leader's epoch (the revision of its leadership in etcd): a replica applies
    /// nothing from a leader older than the newest it has seen.
    pub epoch: u64,
    /// The record's offset in the real-time topic partition.
    pub offset: i64,
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub producer: ProducerMetadata,
    pub message: Message,
    /// Set on PUT and DELETE records a partition leader copied from the real-time topic.
    pub upstream: Option<Upstream>,
}

impl Envelope {
    /// Appends the encoded envelope to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(ENVELOPE_MAGIC);
        out.push(ENVELOPE_FORMAT);
        out.push(match (&self.message, self.upstream) {
            (Message::Put { .. }, None) => 0,
            (Message::Delete { .. }, None) => 1,
            (Message::Control(_), _) => 2,
            (Message::Put { .. }, Some(_)) => 3,
            (Message::Delete { .. }, Some(_)) => 4,
        });
        out.extend_from_slice(&self.producer.producer_guid);
        out.extend_from_slice(&self.producer.segment.to_be_bytes());
        out.extend_from_slice(&self.producer.sequence.to_be_bytes());
        out.extend_from_slice(&self.producer.timestamp_ms.to_be_bytes());
        if let (Some(upstream), Message::Put { .. } | Message::Delete { .. }) =
            (self.upstream, &self.message)
        {
            out.extend_from_slice(&upstream.epoch.to_be_bytes());
            out.extend_from_slice(&upstream.offset.to_be_bytes());
        }
        match &self.message {
            Message::Put {
                key,
                schema_id,
                value,
            } => {
                put_bytes(out, key);
                out.extend_from_slice(&schema_id.to_be_bytes());
                put_bytes(out, value);
            }
            Message::Delete { key } => put_bytes(out, key),
            Message::Control(control) => {
                out.push(control.type_byte());
                match control {
                    ControlMessage::StartOfPush {
                        sorted,
                        codec,
                        dictionary,
                    } => {
                        out.push(u8::from(*sorted));
                        out.push(*codec as u8);
                        put_bytes(out, dictionary);
                    }
                    ControlMessage::EndOfPush | ControlMessage::StartOfSegment => {}
                    ControlMessage::EndOfSegment {
                        checksum,
                        record_count,
                    } => {
                        out.extend_from_slice(&checksum.to_be_bytes());
                        out.extend_from_slice(&record_count.to_be_bytes());
                    }
                    ControlMessage::StartOfBufferReplay { rt_offsets } => {
                        out.extend_from_slice(&(rt_offsets.len() as u32).to_be_bytes());
                        for o in rt_offsets {
                            out.extend_from_slice(&o.to_be_bytes());
                        }
                    }
                }
            }
        }
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// Encodes into a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.payload_len_hint());
        self.encode_into(&mut out);
        out
    }

    fn payload_len_hint(&self) -> usize {
        match &self.message {
            Message::Put { key, value, .. } => key.len() + value.len() + 12,
            Message::Delete { key } => key.len() + 4,
            Message::Control(_) => 16,
        }
    }

    /// The producer GUID an encoded envelope names, read from its header without decoding or
    /// verifying the rest (`None` for bytes too short or not an envelope of this format).
    pub fn producer_guid_of(bytes: &[u8]) -> Option<[u8; 16]> {
        if bytes.len() < HEADER_BYTES + 4
            || bytes[0] != ENVELOPE_MAGIC
            || bytes[1] != ENVELOPE_FORMAT
        {
            return None;
        }
        bytes.get(3..19)?.try_into().ok()
    }

    /// Decodes and verifies an envelope. Never panics, whatever the input.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() < HEADER_BYTES + 4 {
            return Err(EnvelopeError::Truncated {
                needed: HEADER_BYTES + 4,
                at: 0,
                len: bytes.len(),
            });
        }
        if bytes[0] != ENVELOPE_MAGIC {
            return Err(EnvelopeError::BadMagic(bytes[0]));
        }
        if bytes[1] != ENVELOPE_FORMAT {
            return Err(EnvelopeError::UnsupportedFormat(bytes[1]));
        }
        let (body, crc_bytes) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_be_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(EnvelopeError::ChecksumMismatch { stored, computed });
        }
        let mut r = Reader::new(body);
        r.skip(2)?;
        let kind = r.u8()?;
        let mut producer_guid = [0u8; 16];
        producer_guid.copy_from_slice(r.take(16)?);
        let producer = ProducerMetadata {
            producer_guid,
            segment: r.u32()?,
            sequence: r.u32()?,
            timestamp_ms: r.u64()? as i64,
        };
        let upstream = match kind {
            3 | 4 => Some(Upstream {
                epoch: r.u64()?,
                offset: r.u64()? as i64,
            }),
            _ => None,
        };
        let message = match kind {
            0 | 3 => {
                let key = r.bytes("key", KEY_BYTES_MAX)?.to_vec();
                let schema_id = r.u32()?;
                let value = r.bytes("value", VALUE_BYTES_MAX)?.to_vec();
                Message::Put {
                    key,
                    schema_id,
                    value,
                }
            }
            1 | 4 => Message::Delete {
                key: r.bytes("key", KEY_BYTES_MAX)?.to_vec(),
            },
            2 => Message::Control(match r.u8()? {
                0 => ControlMessage::StartOfPush {
                    sorted: r.u8()? != 0,
                    codec: CompressionCodec::from_u8(r.u8()?)?,
                    dictionary: r.bytes("dictionary", DICTIONARY_BYTES_MAX)?.to_vec(),
                },
                1 => ControlMessage::EndOfPush,
                2 => ControlMessage::StartOfSegment,
                3 => ControlMessage::EndOfSegment {
                    checksum: r.u32()?,
                    record_count: r.u32()?,
                },
                4 => {
                    let n = r.u32()? as usize;
                    // Each offset is 8 bytes; refuse counts the record cannot hold before allocating.
                    if n > r.remaining() / 8 {
                        return Err(EnvelopeError::Truncated {
                            needed: n * 8,
                            at: r.pos,
                            len: body.len(),
                        });
                    }
                    let mut rt_offsets = Vec::with_capacity(n);
                    for _ in 0..n {
                        rt_offsets.push(r.u64()? as i64);
                    }
                    ControlMessage::StartOfBufferReplay { rt_offsets }
                }
                other => return Err(EnvelopeError::UnknownControl(other)),
            }),
            other => return Err(EnvelopeError::UnknownKind(other)),
        };
        if r.remaining() != 0 {
            return Err(EnvelopeError::TrailingBytes(r.remaining()));
        }
        Ok(Envelope {
            producer,
            message,
            upstream,
        })
    }
}

impl Message {
    /// The bytes that the segment checksum covers for a data record (`None` for control).
    ///
    /// Covers the kind, key, schema id and value, so a swapped PUT/DELETE or a changed value
    /// changes the checksum.
    pub fn update_checksum(&self, checksum: &mut SegmentChecksum) {
        match self {
            Message::Put {
                key,
                schema_id,
                value,
            } => {
                checksum.update(&[0]);
                checksum.update(&(key.len() as u32).to_be_bytes());
                checksum.update(key);
                checksum.update(&schema_id.to_be_bytes());
                checksum.update(value);
                checksum.record_count += 1;
            }
            Message::Delete { key } => {
                checksum.update(&[1]);
                checksum.update(key);
                checksum.record_count += 1;
            }
            Message::Control(_) => {}
        }
    }
}

/// Running checksum of one segment's data records (CRC32C, order-sensitive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentChecksum {
    pub crc: u32,
    pub record_count: u32,
}

impl SegmentChecksum {
    fn update(&mut self, bytes: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Bounds-checked big-endian reader used by every decoder in this crate.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], EnvelopeError> {
        if self.remaining() < n {
            return Err(EnvelopeError::Truncated {
                needed: n,
                at: self.pos,
                len: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), EnvelopeError> {
        self.take(n).map(|_| ())
    }
    pub(crate) fn u8(&mut self) -> Result<u8, EnvelopeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, EnvelopeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, EnvelopeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, EnvelopeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A u32-length-prefixed byte string no longer than `max`.
    pub(crate) fn bytes(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<&'a [u8], EnvelopeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(EnvelopeError::TooLarge { what, len, max });
        }
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer(seq: u32) -> ProducerMetadata {
        ProducerMetadata {
            producer_guid: [7; 16],
            segment: 3,
            sequence: seq,
            timestamp_ms: 1_700_000_000_000,
        }
    }

    fn samples() -> Vec<Envelope> {
        vec![
            Envelope {
                producer: producer(1),
                message: Message::Put {
                    key: b"k".to_vec(),
                    schema_id: 1,
                    value: vec![1, 2, 3],
                },
                upstream: None,
            },
            Envelope {
                producer: producer(2),
                message: Message::Delete {
                    key: b"gone".to_vec(),
                },
                upstream: None,
            },
            Envelope {
                producer: producer(0),
                message: Message::Control(ControlMessage::StartOfPush {
                    sorted: true,
                    codec: CompressionCodec::ZstdWithDictionary,
                    dictionary: vec![9; 100],
                }),
                upstream: None,
            },
            Envelope {
                producer: producer(5),
                message: Message::Control(ControlMessage::EndOfPush),
                upstream: None,
            },
            Envelope {
                producer: producer(0),
                message: Message::Control(ControlMessage::StartOfSegment),
                upstream: None,
            },
            Envelope {
                producer: producer(9),
                message: Message::Control(ControlMessage::EndOfSegment {
                    checksum: 0xdeadbeef,
                    record_count: 8,
                }),
                upstream: None,
            },
            Envelope {
                producer: producer(1),
                message: Message::Control(ControlMessage::StartOfBufferReplay {
                    rt_offsets: vec![1, -1, 220],
                }),
                upstream: None,
            },
            Envelope {
                producer: producer(3),
                message: Message::Put {
                    key: b"copied".to_vec(),
                    schema_id: 2,
                    value: vec![4, 5],
                },
                upstream: Some(Upstream {
                    epoch: 77,
                    offset: 1 << 40,
                }),
            },
            Envelope {
                producer: producer(4),
                message: Message::Delete {
                    key: b"copied".to_vec(),
                },
                upstream: Some(Upstream {
                    epoch: 78,
                    offset: 0,
                }),
            },
        ]
    }

    #[test]
    fn round_trips_every_kind() {
        for e in samples() {
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        }
    }

    #[test]
    fn the_producer_guid_is_read_from_the_header_alone() {
        for e in samples() {
            let bytes = e.encode();
            assert_eq!(
                Envelope::producer_guid_of(&bytes),
                Some(e.producer.producer_guid)
            );
            for len in 0..HEADER_BYTES + 4 {
                assert_eq!(Envelope::producer_guid_of(&bytes[..len]), None);
            }
            let mut other = bytes.clone();
            other[1] ^= 1;
            assert_eq!(Envelope::producer_guid_of(&other), None, "another format");
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        for e in samples() {
            let bytes = e.encode();
            for i in 0..bytes.len() {
                for bit in 0..8 {
                    let mut corrupt = bytes.clone();
                    corrupt[i] ^= 1 << bit;
                    assert!(
                        Envelope::decode(&corrupt).is_err(),
                        "flip at byte {i} bit {bit} undetected"
                    );
                }
            }
        }
    }

    #[test]
    fn truncation_never_panics() {
        for e in samples() {
            let bytes = e.encode();
            for len in 0..bytes.len() {
                assert!(Envelope::decode(&bytes[..len]).is_err());
            }
        }
    }

    #[test]
    fn garbage_with_valid_crc_is_rejected_without_panic() {
        // A forged record: valid magic, format and CRC, absurd lengths inside.
        let mut body = vec![ENVELOPE_MAGIC, ENVELOPE_FORMAT, 2];
        body.extend_from_slice(&[0; 16 + 4 + 4 + 8]);
        body.push(4); // START_OF_BUFFER_REPLAY
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            Envelope::decode(&body),
            Err(EnvelopeError::Truncated { .. })
        ));
    }

    #[test]
    fn segment_checksum_is_order_sensitive() {
        let a = Message::Put {
            key: b"a".to_vec(),
            schema_id: 1,
            value: b"1".to_vec(),
        };
        let b = Message::Put {
            key: b"b".to_vec(),
            schema_id: 1,
            value: b"2".to_vec(),
        };
        let mut ab = SegmentChecksum::default();
        a.update_checksum(&mut ab);
        b.update_checksum(&mut ab);
        let mut ba = SegmentChecksum::default();
        b.update_checksum(&mut ba);
        a.update_checksum(&mut ba);
        assert_ne!(ab.crc, ba.crc);
        assert_eq!(ab.record_count, 2);
    }
}
