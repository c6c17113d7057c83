//! Property-based fuzzing of every decoder that reads bytes from the network, a topic or an
//! operator: arbitrary inputs, and valid encodings with random bytes changed, must give a value
//! or an error, never a panic. `FUZZ_CASES` sets the cases per target (default 20,000; CI runs
//! the default, 180,000 in all). Any input that ever fails is kept by proptest in
//! `tests/fuzz_decoders.proptest-regressions` and replayed first on every run.

use proptest::prelude::*;
use rialto_protocol::admin::{
    AclChangeRequest, CreateStoreRequest, StartPushRequest, UpdateStoreRequest,
};
use rialto_protocol::avro::AvroCodec;
use rialto_protocol::compute::{ComputeRequest, Operation, Plan};
use rialto_protocol::envelope::Envelope;
use rialto_protocol::stored::ChunkManifest;
use rialto_protocol::wire::{
    decode_frame, parse_route, split_compute_body, BatchGetRequest, ErrorBody,
};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// A valid batch-get request of a few keys.
fn valid_batch_get() -> Vec<u8> {
    BatchGetRequest {
        keys: vec![(0, b"member-1".to_vec()), (3, vec![]), (7, vec![0xff; 40])],
    }
    .encode()
}

const COMPUTE_SCHEMA: &str = r#"{"type":"record","name":"R","fields":[{"name":"id","type":"long"},{"name":"emb","type":{"type":"array","items":"float"}}]}"#;

/// A valid compute request of every operation.
fn valid_compute() -> ComputeRequest {
    ComputeRequest {
        reader_schema_id: 1,
        operations: vec![
            Operation::Project { field: "id".into() },
            Operation::DotProduct {
                field: "emb".into(),
                vector: vec![1.0],
                result: "d".into(),
            },
            Operation::CosineSimilarity {
                field: "emb".into(),
                vector: vec![1.0],
                result: "c".into(),
            },
            Operation::HadamardProduct {
                field: "emb".into(),
                vector: vec![2.0],
                result: "h".into(),
            },
            Operation::Count {
                field: "emb".into(),
                result: "n".into(),
            },
        ],
    }
}

/// `bytes` with `edits` (position, value) applied, positions taken modulo the length.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    if !bytes.is_empty() {
        let len = bytes.len();
        for &(at, value) in edits {
            bytes[at % len] = value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

/// An envelope body with its trailing CRC-32C recomputed, so decoding goes past the checksum
/// into the record itself.
fn with_crc(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&body);
    body.extend_from_slice(&crc.to_be_bytes());
    body
}

const KEY_SCHEMAS: [&str; 3] = [
    r#""string""#,
    r#"{"type":"record","name":"K","fields":[{"name":"id","type":"long"},{"name":"tags","type":{"type":"array","items":"string"}},{"name":"m","type":{"type":"map","values":["null","double"]}}]}"#,
    r#"{"type":"record","name":"E","fields":[{"name":"v","type":{"type":"fixed","name":"F","size":4}},{"name":"e","type":{"type":"enum","name":"S","symbols":["A","B"]}},{"name":"b","type":"bytes"}]}"#,
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn batch_get_requests(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let _ = BatchGetRequest::decode(&bytes, 10_000);
        let _ = BatchGetRequest::decode(&mutate(valid_batch_get(), &edits, cut), 10_000);
    }

    #[test]
    fn compute_requests_and_results(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let _ = split_compute_body(&bytes);
        let _ = ComputeRequest::decode(&bytes);
        let request = valid_compute();
        let _ = ComputeRequest::decode(&mutate(request.encode(), &edits, cut));
        let codec = AvroCodec::parse(COMPUTE_SCHEMA).unwrap();
        let plan = Plan::new(&codec, request).unwrap();
        let _ = plan.decode_result(&codec, &bytes);
        let mut out = Vec::new();
        let _ = plan.evaluate_datum(&codec, &bytes, &mut out);
        let value = rialto_protocol::avro::Value::Record(vec![
            ("id".into(), rialto_protocol::avro::Value::Long(3)),
            ("emb".into(), rialto_protocol::avro::Value::Array(vec![rialto_protocol::avro::Value::Float(0.5)])),
        ]);
        let mut result = Vec::new();
        plan.evaluate(&codec, &value, &mut result);
        let _ = plan.decode_result(&codec, &mutate(result, &edits, cut));
    }

    #[test]
    fn batch_get_frames_and_error_bodies(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut rest = &bytes[..];
        // A response is a sequence of frames: decode until the input runs out or fails.
        while let Ok(Some((_, used))) = decode_frame(rest) {
            prop_assert!(used > 0 && used <= rest.len());
            rest = &rest[used..];
        }
        let _ = ErrorBody::decode(&bytes);
    }

    #[test]
    fn envelopes_and_control_messages(
        body in prop::collection::vec(any::<u8>(), 0..300),
        raw in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = Envelope::decode(&raw);
        let _ = Envelope::producer_guid_of(&raw);
        let _ = Envelope::decode(&with_crc(body.clone()));
        // A header that claims to be a valid envelope of each kind, then anything.
        for kind in 0u8..8 {
            let mut framed = vec![0xA7, 1, kind];
            framed.extend_from_slice(&body);
            let _ = Envelope::decode(&with_crc(framed));
        }
    }

    #[test]
    fn chunk_manifests_and_stored_values(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = ChunkManifest::decode(&bytes);
        let _ = rialto_protocol::wire::StoredValue::decode(&bytes);
    }

    #[test]
    fn avro_keys(bytes in prop::collection::vec(any::<u8>(), 0..128), schema in 0usize..3) {
        let codec = AvroCodec::parse(KEY_SCHEMAS[schema]).expect("schema parses");
        if let Ok(value) = codec.decode(&bytes, "key") {
            // Whatever decodes re-encodes (the key path hashes the encoding).
            let _ = codec.encode(&value, "key");
        }
    }

    #[test]
    fn avro_json_text(text in "\\PC{0,80}", schema in 0usize..3) {
        let codec = AvroCodec::parse(KEY_SCHEMAS[schema]).expect("schema parses");
        let _ = codec.from_json_text(&text, "key");
    }

    #[test]
    fn request_paths(path in "(/[a-z0-9_%.-]{0,12}){0,6}") {
        let _ = parse_route(&path);
    }

    #[test]
    fn admin_json_bodies(bytes in prop::collection::vec(any::<u8>(), 0..200), text in "\\PC{0,120}") {
        for input in [&bytes[..], text.as_bytes()] {
            let _ = serde_json::from_slice::<CreateStoreRequest>(input);
            let _ = serde_json::from_slice::<UpdateStoreRequest>(input);
            let _ = serde_json::from_slice::<StartPushRequest>(input);
            let _ = serde_json::from_slice::<AclChangeRequest>(input);
        }
    }
}
