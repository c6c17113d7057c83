//! Validation of what a version topic delivers, before anything of it is written: producer
//! metadata (gaps, duplicates, the push's one producer and, with signatures verified, its
//! signature on every record), envelope integrity, the START_OF_PUSH
//! codec against the version's, strictly ascending keys for a push announced as sorted, and
//! what a hybrid version's topic may hold after END_OF_PUSH. Pure: records and a checkpoint in,
//! the writes and the next checkpoint out.

use rialto_backends::ConsumedRecord;
use rialto_protocol::envelope::{CompressionCodec, ControlMessage, Envelope, Message};
use rialto_protocol::wire::StoredValue;
use rialto_security::signing::WriterSecret;

use crate::replica::ReplicaPlan;
use crate::store::WriteOp;
use crate::validator::{Admission, Checkpoint, GuidHex, ReplayState, Verdict};

/// One poll's records after validation.
pub(crate) struct Validated {
    /// The checkpoint after the last valid record (its offset points at the bad record, if any).
    pub next: Checkpoint,
    /// The writes of the valid data records.
    pub ops: Vec<WriteOp>,
    /// Redelivered records skipped.
    pub duplicates: u64,
    /// Why processing stopped at a bad record.
    pub failure: Option<String>,
    /// The compression dictionary of a START_OF_PUSH in this poll.
    pub dictionary: Option<Vec<u8>>,
}

/// What a version's topic may hold after END_OF_PUSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hybrid {
    /// A batch version: nothing but the push's END_OF_SEGMENT.
    No,
    /// A hybrid version still in its push: validation stops after END_OF_PUSH.
    UntilEndOfPush,
    /// A hybrid version past END_OF_PUSH: START_OF_BUFFER_REPLAY and records its partition
    /// leaders copied from the real-time topic.
    Following,
}

/// What a version's topic must hold, from its record: the checks [`validate_batch`] makes
/// beyond producer metadata and envelope integrity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules<'a> {
    /// The codec START_OF_PUSH must announce (the version's compression).
    pub codec: CompressionCodec,
    pub hybrid: Hybrid,
    /// The only producer the push's records may come from (hex GUID); `None`: any.
    pub producer: Option<&'a str>,
    /// The secret registered for the push's producer, when signatures are verified: every
    /// record of the push (a batch version's every record) must be signed with it.
    pub push_signer: Option<&'a WriterSecret>,
}

impl<'a> Rules<'a> {
    /// The rules of a version's push.
    pub(crate) fn of(plan: &ReplicaPlan) -> Rules<'_> {
        Rules {
            codec: plan.compression.codec(),
            hybrid: Hybrid::from(plan),
            producer: plan.producer.as_deref(),
            push_signer: None,
        }
    }

    /// These rules, with every record of the push checked to be signed by `signer`.
    pub(crate) fn signed_by(self, signer: Option<&'a WriterSecret>) -> Rules<'a> {
        Rules {
            push_signer: signer,
            ..self
        }
    }

    /// A version without a named producer, compressed with `codec`.
    #[cfg(test)]
    pub(crate) fn batch(codec: CompressionCodec) -> Rules<'static> {
        Rules {
            codec,
            hybrid: Hybrid::No,
            producer: None,
            push_signer: None,
        }
    }
}

impl From<&ReplicaPlan> for Hybrid {
    fn from(plan: &ReplicaPlan) -> Hybrid {
        if plan.hybrid.is_some() {
            Hybrid::UntilEndOfPush
        } else {
            Hybrid::No
        }
    }
}

/// Validates one poll's records against `checkpoint`: producer metadata, envelope integrity,
/// the START_OF_PUSH codec against the version's (`codec`), and, for a push announced as
/// sorted, strictly ascending keys.
pub(crate) fn validate_batch(
    checkpoint: &Checkpoint,
    records: Vec<ConsumedRecord>,
    topic: &str,
    partition: u32,
    rules: Rules<'_>,
) -> Validated {
    let mut out = Validated {
        next: checkpoint.clone(),
        ops: Vec::with_capacity(records.len()),
        duplicates: 0,
        failure: None,
        dictionary: None,
    };
    for record in records {
        let offset = record.offset;
        if let Err(message) = validate_record(&mut out, record, topic, partition, rules) {
            out.failure = Some(message);
            return out;
        }
        out.next.next_offset = offset + 1;
        if rules.hybrid == Hybrid::UntilEndOfPush && out.next.validation.end_of_push {
            // What follows is consumed again by `follow_realtime`.
            return out;
        }
    }
    out
}

fn validate_record(
    out: &mut Validated,
    record: ConsumedRecord,
    topic: &str,
    partition: u32,
    rules: Rules<'_>,
) -> Result<(), String> {
    let Rules {
        codec,
        hybrid,
        producer,
        push_signer,
    } = rules;
    let offset = record.offset;
    let Some(value) = record.value else {
        return Err(format!(
            "record without a value at offset {offset} of {topic}/{partition}"
        ));
    };
    // Authenticated before it is parsed: the signature covers every byte.
    if let Some(signer) = push_signer {
        if !signer.verifies(&value, record.key.as_deref().unwrap_or_default()) {
            return Err(format!(
                "record at offset {offset} of {topic}/{partition} is not signed by the version's \
                 push (its producer's registered secret): another writer on the version topic; \
                 nothing from it is applied"
            ));
        }
    }
    let envelope = Envelope::decode(&value)
        .map_err(|e| format!("corrupt record at offset {offset} of {topic}/{partition}: {e}"))?;
    // Before the validator takes it in: a push whose values the client would decode wrongly.
    if let Message::Control(ControlMessage::StartOfPush {
        codec: announced,
        dictionary,
        ..
    }) = &envelope.message
    {
        if *announced != codec {
            return Err(format!(
                "START_OF_PUSH at offset {offset} of {topic}/{partition} announces values \
                 compressed with {announced:?}, but the version's compression is {codec:?}"
            ));
        }
        if codec == CompressionCodec::ZstdWithDictionary && dictionary.is_empty() {
            return Err(format!(
                "START_OF_PUSH at offset {offset} of {topic}/{partition} announces \
                 {codec:?} but carries no dictionary"
            ));
        }
    }
    // The push (everything before END_OF_PUSH) comes from the producer the version names;
    // after it, a hybrid version's partition leaders write as producers of their own.
    if let Some(expected) = producer.filter(|_| !out.next.validation.end_of_push) {
        let found = GuidHex::new(&envelope.producer.producer_guid);
        if !found.as_str().eq_ignore_ascii_case(expected) {
            return Err(format!(
                "record at offset {offset} of {topic}/{partition} comes from producer {found}, \
                 but the version's push is producer {expected}: another writer on the version \
                 topic; nothing from it is applied"
            ));
        }
    }
    let copied = envelope.upstream.is_some()
        || matches!(
            envelope.message,
            Message::Control(ControlMessage::StartOfBufferReplay { .. })
        );
    if copied && hybrid == Hybrid::No {
        return Err(format!(
            "record at offset {offset} of {topic}/{partition} belongs to a hybrid version \
             (real-time replay), but this version is batch-only"
        ));
    }
    let verdict =
        out.next.validation.check(&envelope).map_err(|e| {
            format!("invalid record at offset {offset} of {topic}/{partition}: {e}")
        })?;
    if let Message::Control(ControlMessage::StartOfBufferReplay { rt_offsets }) = &envelope.message
    {
        // The first START_OF_BUFFER_REPLAY counts; a second leader's (a race) is ignored.
        if out.next.replay.is_none() {
            let realtime_start = *rt_offsets.first().ok_or_else(|| {
                format!("START_OF_BUFFER_REPLAY at offset {offset} of {topic}/{partition} names no real-time offset")
            })?;
            out.next.replay = Some(ReplayState {
                start_of_buffer_replay_offset: offset,
                realtime_start,
                ..ReplayState::default()
            });
        }
    }
    if let (Verdict::Apply, Some(upstream)) = (verdict, envelope.upstream) {
        let replay = out.next.replay.as_mut().ok_or_else(|| {
            format!(
                "record at offset {offset} of {topic}/{partition} was copied from the real-time \
                 topic before any START_OF_BUFFER_REPLAY"
            )
        })?;
        if replay.admit(upstream) == Admission::Skip {
            out.duplicates += 1;
            return Ok(());
        }
    }
    match verdict {
        Verdict::Apply => {}
        Verdict::Duplicate => {
            out.duplicates += 1;
            return Ok(());
        }
        Verdict::Control => {
            if let Message::Control(ControlMessage::StartOfPush { dictionary, .. }) =
                envelope.message
            {
                if !dictionary.is_empty() {
                    out.dictionary = Some(dictionary);
                }
            }
            return Ok(());
        }
    }
    let op = match envelope.message {
        Message::Put {
            key,
            schema_id,
            value,
        } => WriteOp::Put {
            key,
            value: StoredValue::encode(schema_id, &value),
        },
        Message::Delete { key } => WriteOp::Delete { key },
        Message::Control(_) => return Ok(()),
    };
    let sorted = !out.next.validation.end_of_push
        && out
            .next
            .validation
            .start_of_push
            .is_some_and(|sop| sop.sorted);
    if sorted {
        if let Some(last) = &out.next.last_key {
            if op.key() <= last.as_slice() {
                return Err(format!(
                    "START_OF_PUSH announced sorted keys, but the key at offset {offset} of \
                     {topic}/{partition} does not sort after the previous key; push unsorted \
                     data without the sorted flag"
                ));
            }
        }
        out.next.last_key = Some(op.key().to_vec());
    }
    out.next.records += 1;
    out.ops.push(op);
    Ok(())
}
