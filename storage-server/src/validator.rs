//! Producer-metadata validation of a version topic partition, and the checkpoint that carries it.
//!
//! Every record on a version topic names its producer (GUID), segment and sequence number.
//! [`PushValidation`] replays those rules record by record:
//!
//! * a producer's first record must be START_OF_SEGMENT with sequence 0;
//! * in the current segment, the next expected sequence advances, a lower one is a duplicate
//!   (skipped, Kafka may redeliver after a producer retry), a higher one is a gap (ERROR);
//! * an older segment is a duplicate; the next segment must open with START_OF_SEGMENT
//!   sequence 0; a segment further ahead is a gap (ERROR);
//! * START_OF_SEGMENT resets the running [`SegmentChecksum`], PUT/DELETE update it, and
//!   END_OF_SEGMENT must match it (checksum and record count);
//! * data before START_OF_PUSH is an ERROR, and so is data after END_OF_PUSH unless it is a
//!   record a partition leader copied from the real-time topic (hybrid versions, see
//!   [`ReplayState`] and `crate::hybrid`).
//!
//! The validation state is part of [`Checkpoint`], which is written in the same RocksDB write
//! batch as the data it covers, so a restart resumes validation exactly where it stopped.

use std::collections::BTreeMap;

use rialto_protocol::envelope::{ControlMessage, Envelope, Message, SegmentChecksum, Upstream};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Validation state of one producer on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// Segment currently open (or last closed).
    pub segment: u32,
    /// Sequence number expected next in `segment`.
    pub next_sequence: u32,
    /// Running CRC32C of the segment's data records.
    pub checksum: u32,
    /// Data records seen in the segment.
    pub record_count: u32,
    /// Whether END_OF_SEGMENT of `segment` was seen.
    #[serde(default)]
    pub closed: bool,
}

/// What START_OF_PUSH announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartOfPushInfo {
    /// Whether the push wrote keys in sorted order.
    pub sorted: bool,
    /// Compression codec byte of the values (see `CompressionCodec`).
    pub codec: u8,
}

/// The validation part of a replica checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushValidation {
    /// Set once START_OF_PUSH was consumed.
    #[serde(default)]
    pub start_of_push: Option<StartOfPushInfo>,
    /// Set once END_OF_PUSH was consumed: the partition holds the complete dataset.
    #[serde(default)]
    pub end_of_push: bool,
    /// Per-producer state, keyed by the producer GUID in lowercase hex.
    #[serde(default)]
    pub producers: BTreeMap<String, ProducerState>,
}

/// Where a hybrid version's replay of the real-time topic stands, as this replica applied it.
///
/// A partition leader writes START_OF_BUFFER_REPLAY (the real-time offset its replay starts
/// from) after END_OF_PUSH, then copies real-time records, each carrying its real-time offset and
/// the leader's epoch ([`Upstream`]). Every replica applies the version topic in order with these
/// rules, so all replicas apply the same records: a record from an older epoch than the newest
/// seen is a stale leader's and is skipped; in one epoch, offsets must grow (a lower or equal one
/// is a copy already applied); a newer epoch is a new leader, which resumed from what it had
/// applied itself, so its records are applied from its first one on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayState {
    /// Version topic offset of the START_OF_BUFFER_REPLAY applied.
    pub start_of_buffer_replay_offset: i64,
    /// Real-time offset the replay started from.
    pub realtime_start: i64,
    /// Newest leader epoch applied.
    pub epoch: u64,
    /// Real-time offset of the last copied record applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upstream: Option<i64>,
}

/// Whether a copied record is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Apply,
    /// From a stale leader, or a copy already applied.
    Skip,
}

impl ReplayState {
    /// Decides about a copied record and, if it is applied, advances the state.
    pub fn admit(&mut self, upstream: Upstream) -> Admission {
        if upstream.epoch < self.epoch {
            return Admission::Skip;
        }
        if upstream.epoch == self.epoch && self.last_upstream.is_some_and(|l| upstream.offset <= l)
        {
            return Admission::Skip;
        }
        self.epoch = upstream.epoch;
        self.last_upstream = Some(upstream.offset);
        Admission::Apply
    }

    /// The real-time offset after the last record applied: where a replay resumes.
    pub fn next_realtime_offset(&self) -> i64 {
        self.last_upstream.map_or(self.realtime_start, |l| l + 1)
    }

    /// Real-time records not yet applied when the real-time topic ends at `realtime_end`
    /// (its high watermark).
    pub fn lag(&self, realtime_end: i64) -> u64 {
        (realtime_end - self.next_realtime_offset()).max(0) as u64
    }
}

/// Seed 03's lag: the real-time records the replay has to cover (`realtime_end -
/// sobr_realtime_offset`) minus the version-topic records consumed since the
/// START_OF_BUFFER_REPLAY (`consumed_offset - sobr_offset`). It equals [`ReplayState::lag`] while
/// every copied record is one version-topic record after the SOBR; `ReplayState::lag` stays exact
/// when the leader's control records or a second leader's duplicates sit in between.
pub fn seed_lag(
    sobr_offset: i64,
    sobr_realtime_offset: i64,
    consumed_offset: i64,
    realtime_end: i64,
) -> u64 {
    ((realtime_end - sobr_realtime_offset) - (consumed_offset - sobr_offset)).max(0) as u64
}

/// A replica's checkpoint, stored in the `meta` column family with the data it covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Next topic offset to consume; everything before it is applied.
    pub next_offset: i64,
    /// Data records (PUT/DELETE) applied so far.
    pub records: u64,
    /// Last key of a push announced as sorted: the next must sort after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key: Option<Vec<u8>>,
    /// Producer validation state and push markers.
    #[serde(flatten)]
    pub validation: PushValidation,
    /// Of a hybrid version, once START_OF_BUFFER_REPLAY was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayState>,
}

/// What to do with a record that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A PUT or DELETE to apply.
    Apply,
    /// A redelivered record: skip it.
    Duplicate,
    /// A control message: nothing to write to the data column family.
    Control,
}

/// A record that breaks the producer-metadata rules; the replica must go to ERROR.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    #[error("producer {producer}: {kind} (segment {segment}, sequence {sequence}) before START_OF_SEGMENT")]
    BeforeStartOfSegment {
        producer: String,
        kind: &'static str,
        segment: u32,
        sequence: u32,
    },
    #[error("producer {producer}: START_OF_SEGMENT of segment {segment} has sequence {sequence}, expected 0")]
    BadStartOfSegment {
        producer: String,
        segment: u32,
        sequence: u32,
    },
    #[error(
        "producer {producer}: gap in segment {segment}: expected sequence {expected}, got {got}"
    )]
    SequenceGap {
        producer: String,
        segment: u32,
        expected: u32,
        got: u32,
    },
    #[error("producer {producer}: segment {got} does not follow segment {current}")]
    SegmentGap {
        producer: String,
        current: u32,
        got: u32,
    },
    #[error("producer {producer}: record after END_OF_SEGMENT in segment {segment} (sequence {sequence})")]
    AfterEndOfSegment {
        producer: String,
        segment: u32,
        sequence: u32,
    },
    #[error(
        "producer {producer}: END_OF_SEGMENT of segment {segment} says checksum {expected_crc:#010x} over \
         {expected_count} records, but the consumed records give {actual_crc:#010x} over {actual_count}; \
         records were lost or corrupted"
    )]
    ChecksumMismatch {
        producer: String,
        segment: u32,
        expected_crc: u32,
        expected_count: u32,
        actual_crc: u32,
        actual_count: u32,
    },
    #[error("data record before START_OF_PUSH")]
    DataBeforeStartOfPush,
    #[error(
        "data record after END_OF_PUSH that no partition leader copied from the real-time topic"
    )]
    DataAfterEndOfPush,
    #[error("record copied from the real-time topic before END_OF_PUSH")]
    CopiedBeforeEndOfPush,
}

pub use rialto_protocol::producer::{guid_hex, GuidHex};

fn kind_name(message: &Message) -> &'static str {
    match message {
        Message::Put { .. } => "PUT",
        Message::Delete { .. } => "DELETE",
        Message::Control(c) => c.name(),
    }
}

impl PushValidation {
    /// Checks one record and, if it is valid, advances the state. On error the state is unchanged.
    pub fn check(&mut self, envelope: &Envelope) -> Result<Verdict, ValidationError> {
        let hex = GuidHex::new(&envelope.producer.producer_guid);
        let producer = hex.as_str();
        let segment = envelope.producer.segment;
        let sequence = envelope.producer.sequence;
        let is_sos = matches!(
            envelope.message,
            Message::Control(ControlMessage::StartOfSegment)
        );

        let mut state = match self.producers.get(producer).copied() {
            None => {
                if !is_sos {
                    return Err(ValidationError::BeforeStartOfSegment {
                        producer: producer.to_owned(),
                        kind: kind_name(&envelope.message),
                        segment,
                        sequence,
                    });
                }
                if sequence != 0 {
                    return Err(ValidationError::BadStartOfSegment {
                        producer: producer.to_owned(),
                        segment,
                        sequence,
                    });
                }
                ProducerState {
                    segment,
                    next_sequence: 0,
                    checksum: 0,
                    record_count: 0,
                    closed: false,
                }
            }
            Some(s) if segment < s.segment => return Ok(Verdict::Duplicate),
            Some(s) if segment == s.segment => {
                if sequence < s.next_sequence {
                    return Ok(Verdict::Duplicate);
                }
                if sequence > s.next_sequence {
                    return Err(ValidationError::SequenceGap {
                        producer: producer.to_owned(),
                        segment,
                        expected: s.next_sequence,
                        got: sequence,
                    });
                }
                if s.closed {
                    return Err(ValidationError::AfterEndOfSegment {
                        producer: producer.to_owned(),
                        segment,
                        sequence,
                    });
                }
                s
            }
            Some(s) if segment == s.segment.wrapping_add(1) => {
                if !is_sos {
                    return Err(ValidationError::BeforeStartOfSegment {
                        producer: producer.to_owned(),
                        kind: kind_name(&envelope.message),
                        segment,
                        sequence,
                    });
                }
                if sequence != 0 {
                    return Err(ValidationError::BadStartOfSegment {
                        producer: producer.to_owned(),
                        segment,
                        sequence,
                    });
                }
                if !s.closed {
                    tracing::warn!(%producer, previous = s.segment, "segment started before the previous one was closed");
                }
                ProducerState {
                    segment,
                    next_sequence: 0,
                    checksum: 0,
                    record_count: 0,
                    closed: false,
                }
            }
            Some(s) => {
                return Err(ValidationError::SegmentGap {
                    producer: producer.to_owned(),
                    current: s.segment,
                    got: segment,
                })
            }
        };

        // `state` is the producer's state with `sequence` being the expected next record.
        let verdict = match &envelope.message {
            Message::Put { .. } | Message::Delete { .. } => {
                if self.start_of_push.is_none() {
                    return Err(ValidationError::DataBeforeStartOfPush);
                }
                match (self.end_of_push, envelope.upstream.is_some()) {
                    (true, false) => return Err(ValidationError::DataAfterEndOfPush),
                    (false, true) => return Err(ValidationError::CopiedBeforeEndOfPush),
                    _ => {}
                }
                let mut running = SegmentChecksum {
                    crc: state.checksum,
                    record_count: state.record_count,
                };
                envelope.message.update_checksum(&mut running);
                state.checksum = running.crc;
                state.record_count = running.record_count;
                Verdict::Apply
            }
            Message::Control(control) => {
                match control {
                    ControlMessage::StartOfSegment => {
                        if sequence != 0 {
                            // An SOS in the middle of an open segment at the expected sequence.
                            return Err(ValidationError::BadStartOfSegment {
                                producer: producer.to_owned(),
                                segment,
                                sequence,
                            });
                        }
                    }
                    ControlMessage::EndOfSegment {
                        checksum,
                        record_count,
                    } => {
                        if *checksum != state.checksum || *record_count != state.record_count {
                            return Err(ValidationError::ChecksumMismatch {
                                producer: producer.to_owned(),
                                segment,
                                expected_crc: *checksum,
                                expected_count: *record_count,
                                actual_crc: state.checksum,
                                actual_count: state.record_count,
                            });
                        }
                        state.closed = true;
                    }
                    ControlMessage::StartOfPush { sorted, codec, .. } => {
                        if self.start_of_push.is_some() {
                            tracing::warn!(%producer, "second START_OF_PUSH ignored");
                        } else {
                            self.start_of_push = Some(StartOfPushInfo {
                                sorted: *sorted,
                                codec: *codec as u8,
                            });
                        }
                    }
                    ControlMessage::EndOfPush => self.end_of_push = true,
                    ControlMessage::StartOfBufferReplay { .. } => {
                        if !self.end_of_push {
                            return Err(ValidationError::CopiedBeforeEndOfPush);
                        }
                    }
                }
                Verdict::Control
            }
        };
        state.next_sequence = sequence.wrapping_add(1);
        match self.producers.get_mut(producer) {
            Some(known) => *known = state,
            None => {
                self.producers.insert(producer.to_owned(), state);
            }
        }
        Ok(verdict)
    }

    /// Whether every producer seen has closed its current segment.
    pub fn all_segments_closed(&self) -> bool {
        self.producers.values().all(|p| p.closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rialto_protocol::envelope::{CompressionCodec, ProducerMetadata};

    const GUID: [u8; 16] = [0xab; 16];

    fn env(segment: u32, sequence: u32, message: Message) -> Envelope {
        Envelope {
            producer: ProducerMetadata {
                producer_guid: GUID,
                segment,
                sequence,
                timestamp_ms: 0,
            },
            message,
            upstream: None,
        }
    }
    fn sos(segment: u32) -> Envelope {
        env(segment, 0, Message::Control(ControlMessage::StartOfSegment))
    }
    fn sop(seq: u32) -> Envelope {
        env(
            0,
            seq,
            Message::Control(ControlMessage::StartOfPush {
                sorted: true,
                codec: CompressionCodec::None,
                dictionary: vec![],
            }),
        )
    }
    fn put(seq: u32, k: &str) -> Envelope {
        env(
            0,
            seq,
            Message::Put {
                key: k.as_bytes().to_vec(),
                schema_id: 1,
                value: b"v".to_vec(),
            },
        )
    }
    fn eos(seq: u32, checksum: u32, record_count: u32) -> Envelope {
        env(
            0,
            seq,
            Message::Control(ControlMessage::EndOfSegment {
                checksum,
                record_count,
            }),
        )
    }
    fn checksum_of(records: &[&Envelope]) -> SegmentChecksum {
        let mut c = SegmentChecksum::default();
        for r in records {
            r.message.update_checksum(&mut c);
        }
        c
    }

    #[test]
    fn clean_segment_validates() {
        let mut v = PushValidation::default();
        let (a, b) = (put(2, "a"), put(3, "b"));
        let c = checksum_of(&[&a, &b]);
        assert_eq!(v.check(&sos(0)), Ok(Verdict::Control));
        assert_eq!(v.check(&sop(1)), Ok(Verdict::Control));
        assert_eq!(v.check(&a), Ok(Verdict::Apply));
        assert_eq!(v.check(&b), Ok(Verdict::Apply));
        assert_eq!(
            v.check(&env(0, 4, Message::Control(ControlMessage::EndOfPush))),
            Ok(Verdict::Control)
        );
        assert_eq!(
            v.check(&eos(5, c.crc, c.record_count)),
            Ok(Verdict::Control)
        );
        assert!(v.end_of_push);
        assert!(v.all_segments_closed());
        assert_eq!(
            v.start_of_push,
            Some(StartOfPushInfo {
                sorted: true,
                codec: 0
            })
        );
    }

    #[test]
    fn gap_is_an_error_and_leaves_state_unchanged() {
        let mut v = PushValidation::default();
        v.check(&sos(0)).unwrap();
        v.check(&sop(1)).unwrap();
        let before = v.clone();
        let err = v.check(&put(3, "a")).unwrap_err();
        assert_eq!(
            err,
            ValidationError::SequenceGap {
                producer: guid_hex(&GUID),
                segment: 0,
                expected: 2,
                got: 3
            }
        );
        assert_eq!(v, before);
    }

    #[test]
    fn duplicates_are_skipped_without_touching_the_checksum() {
        let mut v = PushValidation::default();
        v.check(&sos(0)).unwrap();
        v.check(&sop(1)).unwrap();
        let a = put(2, "a");
        v.check(&a).unwrap();
        let before = v.clone();
        assert_eq!(v.check(&a), Ok(Verdict::Duplicate));
        assert_eq!(v.check(&sop(1)), Ok(Verdict::Duplicate));
        assert_eq!(v, before);
        let c = checksum_of(&[&a]);
        assert_eq!(v.check(&eos(3, c.crc, 1)), Ok(Verdict::Control));
    }

    #[test]
    fn bad_checksum_is_an_error() {
        let mut v = PushValidation::default();
        v.check(&sos(0)).unwrap();
        v.check(&sop(1)).unwrap();
        let a = put(2, "a");
        v.check(&a).unwrap();
        let c = checksum_of(&[&a]);
        assert!(matches!(
            v.check(&eos(3, c.crc ^ 1, 1)),
            Err(ValidationError::ChecksumMismatch { .. })
        ));
        assert!(matches!(
            v.check(&eos(3, c.crc, 2)),
            Err(ValidationError::ChecksumMismatch { .. })
        ));
        assert!(!v.all_segments_closed());
    }

    #[test]
    fn data_before_start_of_push_is_an_error() {
        let mut v = PushValidation::default();
        v.check(&sos(0)).unwrap();
        assert_eq!(
            v.check(&put(1, "a")),
            Err(ValidationError::DataBeforeStartOfPush)
        );
    }

    #[test]
    fn data_before_start_of_segment_is_an_error() {
        let mut v = PushValidation::default();
        assert!(matches!(
            v.check(&put(0, "a")),
            Err(ValidationError::BeforeStartOfSegment { .. })
        ));
        assert!(matches!(
            v.check(&sop(0)),
            Err(ValidationError::BeforeStartOfSegment { .. })
        ));
    }

    #[test]
    fn segments_must_follow() {
        let mut v = PushValidation::default();
        v.check(&sos(0)).unwrap();
        v.check(&eos(1, 0, 0)).unwrap();
        assert!(matches!(
            v.check(&sos(2)),
            Err(ValidationError::SegmentGap {
                current: 0,
                got: 2,
                ..
            })
        ));
        // Next segment must start with START_OF_SEGMENT.
        assert!(matches!(
            v.check(&env(1, 0, Message::Control(ControlMessage::EndOfPush))),
            Err(ValidationError::BeforeStartOfSegment { .. })
        ));
        assert_eq!(v.check(&sos(1)), Ok(Verdict::Control));
        // An older segment is a duplicate.
        assert_eq!(v.check(&eos(1, 0, 0)), Ok(Verdict::Duplicate));
    }

    #[test]
    fn data_after_end_of_push_is_an_error() {
        let mut v = PushValidation::default();
        v.check(&sos(0)).unwrap();
        v.check(&sop(1)).unwrap();
        v.check(&env(0, 2, Message::Control(ControlMessage::EndOfPush)))
            .unwrap();
        assert_eq!(
            v.check(&put(3, "a")),
            Err(ValidationError::DataAfterEndOfPush)
        );
    }

    #[test]
    fn checkpoint_json_round_trips() {
        let mut cp = Checkpoint {
            next_offset: 42,
            records: 7,
            ..Default::default()
        };
        cp.validation.check(&sos(0)).unwrap();
        cp.validation.check(&sop(1)).unwrap();
        let json = serde_json::to_vec(&cp).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"end_of_push\":false"), "{text}");
        assert_eq!(serde_json::from_slice::<Checkpoint>(&json).unwrap(), cp);
    }

    #[test]
    fn the_seeds_worked_example_lags_by_eight() {
        // END_OF_PUSH at 27; START_OF_BUFFER_REPLAY at 28 says the replay starts at real-time
        // offset 220; the real-time topic then ends at 232 (12 records to replay) and the
        // replica has consumed up to offset 32 (records 29..=32: 4 copies, of 220..=223).
        assert_eq!(seed_lag(28, 220, 32, 232), 8);
        let mut replay = ReplayState {
            start_of_buffer_replay_offset: 28,
            realtime_start: 220,
            ..ReplayState::default()
        };
        assert_eq!(replay.lag(232), 12);
        for offset in 220..=223 {
            let applied = replay.admit(Upstream { epoch: 5, offset });
            assert_eq!(applied, Admission::Apply);
        }
        assert_eq!(replay.lag(232), 8);
    }

    #[test]
    fn copies_from_stale_leaders_and_repeats_are_skipped() {
        let mut r = ReplayState {
            realtime_start: 100,
            ..ReplayState::default()
        };
        let up = |epoch, offset| Upstream { epoch, offset };
        assert_eq!(r.admit(up(10, 100)), Admission::Apply);
        assert_eq!(r.admit(up(10, 101)), Admission::Apply);
        assert_eq!(r.admit(up(10, 101)), Admission::Skip, "a repeated copy");
        // A new leader resumes from what it applied itself (maybe behind): applied from there.
        assert_eq!(r.admit(up(12, 100)), Admission::Apply);
        assert_eq!(r.next_realtime_offset(), 101);
        // The old leader, still writing, is fenced off.
        assert_eq!(r.admit(up(10, 102)), Admission::Skip);
        assert_eq!(r.admit(up(12, 101)), Admission::Apply);
        assert_eq!(r.admit(up(12, 102)), Admission::Apply);
        assert_eq!(r.lag(110), 7);
    }

    #[test]
    fn copied_records_are_accepted_only_after_end_of_push() {
        let mut v = PushValidation::default();
        let copied = |seq: u32| Envelope {
            upstream: Some(Upstream {
                epoch: 1,
                offset: i64::from(seq),
            }),
            ..put(seq, "c")
        };
        v.check(&sos(0)).unwrap();
        v.check(&sop(1)).unwrap();
        assert_eq!(
            v.check(&copied(2)).unwrap_err(),
            ValidationError::CopiedBeforeEndOfPush
        );
        v.check(&env(0, 2, Message::Control(ControlMessage::EndOfPush)))
            .unwrap();
        assert_eq!(v.check(&copied(3)).unwrap(), Verdict::Apply);
        assert_eq!(
            v.check(&put(4, "plain")).unwrap_err(),
            ValidationError::DataAfterEndOfPush
        );
    }
}
