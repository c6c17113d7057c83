//! Producer metadata for one partition of one push: segment, sequence numbers and the running
//! segment checksum, so that every envelope the push job writes can be validated by the servers.

use rialto_protocol::envelope::{
    ControlMessage, Envelope, Message, ProducerMetadata, SegmentChecksum,
};
use rialto_protocol::meta::now_ms;

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
}

impl PartitionWriter {
    pub fn new(producer_guid: [u8; 16]) -> PartitionWriter {
        PartitionWriter {
            producer_guid,
            segment: 0,
            next_sequence: 0,
            checksum: SegmentChecksum::default(),
        }
    }

    fn envelope(&mut self, message: Message) -> Envelope {
        message.update_checksum(&mut self.checksum);
        let producer = ProducerMetadata {
            producer_guid: self.producer_guid,
            segment: self.segment,
            sequence: self.next_sequence,
            timestamp_ms: now_ms(),
        };
        self.next_sequence += 1;
        Envelope { producer, message }
    }

    /// Opens the current segment (sequence 0).
    pub fn start_segment(&mut self) -> Envelope {
        self.next_sequence = 0;
        self.checksum = SegmentChecksum::default();
        self.envelope(Message::Control(ControlMessage::StartOfSegment))
    }

    /// Closes the current segment; the next `start_segment` opens the following one.
    pub fn end_segment(&mut self) -> Envelope {
        let SegmentChecksum { crc, record_count } = self.checksum;
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
}

#[cfg(test)]
mod tests {
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
