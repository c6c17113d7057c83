//! Producer metadata for one writer on one partition: segment, sequence numbers and the running
//! segment checksum, so that every envelope a writer (the push job, the real-time writer, a
//! partition leader copying real-time records) produces can be validated by its readers.

use crate::envelope::{
    ControlMessage, Envelope, Message, ProducerMetadata, SegmentChecksum, Upstream,
};
use crate::meta::now_ms;

/// A producer GUID as 32 lowercase hexadecimal digits (how records and logs name producers).
pub fn guid_hex(guid: &[u8; 16]) -> String {
    GuidHex::new(guid).as_str().to_owned()
}

/// [`guid_hex`] without allocating, for the checks made on every record.
#[derive(Clone, Copy)]
pub struct GuidHex([u8; 32]);

impl GuidHex {
    pub fn new(guid: &[u8; 16]) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (i, b) in guid.iter().enumerate() {
            hex[2 * i] = DIGITS[usize::from(b >> 4)];
            hex[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        GuidHex(hex)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for GuidHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads a producer GUID written by [`guid_hex`] (either case); `None` if it is not one.
pub fn parse_guid_hex(text: &str) -> Option<[u8; 16]> {
    // Digits only: `from_str_radix` alone would take a sign ("+0").
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut guid = [0u8; 16];
    for (i, b) in guid.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(guid)
}

/// Builds the envelopes of one producer on one partition, in order.
///
/// A partition's stream is: START_OF_SEGMENT (sequence 0), START_OF_PUSH, data…, END_OF_PUSH,
/// END_OF_SEGMENT (checksum and count of the data records).
#[derive(Debug)]
pub struct PartitionWriter {
    producer_guid: [u8; 16],
    segment: u32,
    next_sequence: u32,
    checksum: SegmentChecksum,
    /// Whether the current segment was ended.
    closed: bool,
}

impl PartitionWriter {
    pub fn new(producer_guid: [u8; 16]) -> PartitionWriter {
        PartitionWriter {
            producer_guid,
            segment: 0,
            next_sequence: 0,
            checksum: SegmentChecksum::default(),
            closed: false,
        }
    }

    /// The GUID every envelope of this writer carries.
    pub fn producer_guid(&self) -> [u8; 16] {
        self.producer_guid
    }

    fn envelope(&mut self, message: Message) -> Envelope {
        self.envelope_from(message, None)
    }

    fn envelope_from(&mut self, message: Message, upstream: Option<Upstream>) -> Envelope {
        message.update_checksum(&mut self.checksum);
        let producer = ProducerMetadata {
            producer_guid: self.producer_guid,
            segment: self.segment,
            sequence: self.next_sequence,
            timestamp_ms: now_ms(),
        };
        self.next_sequence += 1;
        Envelope {
            producer,
            message,
            upstream,
        }
    }

    /// Opens the current segment (sequence 0).
    pub fn start_segment(&mut self) -> Envelope {
        self.next_sequence = 0;
        self.checksum = SegmentChecksum::default();
        self.closed = false;
        self.envelope(Message::Control(ControlMessage::StartOfSegment))
    }

    /// Closes the current segment; the next `start_segment` opens the following one.
    pub fn end_segment(&mut self) -> Envelope {
        let SegmentChecksum { crc, record_count } = self.checksum;
        self.closed = true;
        let e = self.envelope(Message::Control(ControlMessage::EndOfSegment {
            checksum: crc,
            record_count,
        }));
        self.segment += 1;
        e
    }

    pub fn control(&mut self, control: ControlMessage) -> Envelope {
        self.envelope(Message::Control(control))
    }

    pub fn put(&mut self, key: Vec<u8>, schema_id: u32, value: Vec<u8>) -> Envelope {
        self.envelope(Message::Put {
            key,
            schema_id,
            value,
        })
    }

    pub fn delete(&mut self, key: Vec<u8>) -> Envelope {
        self.envelope(Message::Delete { key })
    }

    /// A PUT or DELETE copied from the real-time topic (`upstream` says from where).
    pub fn copied(&mut self, message: Message, upstream: Upstream) -> Envelope {
        self.envelope_from(message, Some(upstream))
    }

    /// Whether the current segment is open (started and not yet ended).
    pub fn in_segment(&self) -> bool {
        self.next_sequence > 0 && !self.closed
    }

    /// Data records in the current segment.
    pub fn segment_records(&self) -> u32 {
        self.checksum.record_count
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn guids_print_and_parse_as_hex() {
        let guid: [u8; 16] = std::array::from_fn(|i| (i * 17) as u8);
        let hex = super::guid_hex(&guid);
        assert_eq!(hex, "00112233445566778899aabbccddeeff");
        assert_eq!(super::parse_guid_hex(&hex), Some(guid));
        assert_eq!(super::parse_guid_hex(&hex.to_uppercase()), Some(guid));
        for bad in [
            "",
            "00",
            &hex[1..],
            "zz112233445566778899aabbccddeeff",
            "+0112233445566778899aabbccddeeff",
            "é0112233445566778899aabbccddee",
        ] {
            assert_eq!(super::parse_guid_hex(bad), None, "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn sequences_and_checksum_follow_the_stream() {
        let mut w = PartitionWriter::new([1; 16]);
        let sos = w.start_segment();
        let put = w.put(b"k".to_vec(), 1, b"v".to_vec());
        let eos = w.end_segment();
        assert_eq!(
            (
                sos.producer.sequence,
                put.producer.sequence,
                eos.producer.sequence
            ),
            (0, 1, 2)
        );
        let mut expected = SegmentChecksum::default();
        put.message.update_checksum(&mut expected);
        assert_eq!(
            eos.message,
            Message::Control(ControlMessage::EndOfSegment {
                checksum: expected.crc,
                record_count: 1
            })
        );
        assert_eq!(w.start_segment().producer.segment, 1);
    }
}
