//! Micro-benchmarks of the protocol hot paths: the partitioner, batch-get framing on both sides
//! (client request encoding, server response writing, client response decoding), value
//! checksums, and read compute's evaluation of one value.
//!
//! Run: `cargo bench -p rialto-benches --bench protocol`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::compute::{ComputeRequest, Operation, Plan};
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::stored::value_checksum;
use rialto_protocol::wire::{
    decode_frame, BatchGetFrame, BatchGetFrameWriter, BatchGetRequest, BatchGetTrailer, StoredValue,
};

fn keys(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| format!("member-{i:012}").into_bytes())
        .collect()
}

fn partitioner(c: &mut Criterion) {
    let mut g = c.benchmark_group("partitioner");
    for key_bytes in [16usize, 64, 256] {
        let key = vec![0xabu8; key_bytes];
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("partition_for_key", key_bytes),
            &key,
            |b, key| b.iter(|| partition_for_key(black_box(key), black_box(64))),
        );
    }
    g.finish();
}

fn batch_get_framing(c: &mut Criterion) {
    const KEYS: usize = 5_000;
    const VALUE_BYTES: usize = 1_024;
    let keys = keys(KEYS);
    let stored = StoredValue::encode(1, &vec![7u8; VALUE_BYTES]);
    let mut g = c.benchmark_group("batch_get_5000x1KiB");
    g.throughput(Throughput::Elements(KEYS as u64));

    g.bench_function("client_encode_request", |b| {
        let mut out = Vec::with_capacity(KEYS * 32);
        b.iter(|| {
            out.clear();
            BatchGetRequest::encode_keys(
                keys.iter()
                    .map(|k| (partition_for_key(k, 64), k.as_slice())),
                &mut out,
            );
            black_box(out.len())
        })
    });

    let mut request = Vec::new();
    BatchGetRequest::encode_keys(
        keys.iter()
            .map(|k| (partition_for_key(k, 64), k.as_slice())),
        &mut request,
    );
    g.bench_function("server_decode_request", |b| {
        b.iter(|| black_box(BatchGetRequest::decode(black_box(&request), 10_000).map(|k| k.len())))
    });

    g.bench_function("server_write_response", |b| {
        let mut out = Vec::with_capacity(KEYS * (VALUE_BYTES + 16));
        b.iter(|| {
            out.clear();
            for i in 0..KEYS as u32 {
                BatchGetFrameWriter::record(&mut out, i, &stored);
            }
            BatchGetFrameWriter::trailer(
                &mut out,
                &BatchGetTrailer {
                    keys_total: KEYS as u32,
                    found: KEYS as u32,
                    ..Default::default()
                },
            );
            black_box(out.len())
        })
    });

    let mut response = Vec::new();
    for i in 0..KEYS as u32 {
        BatchGetFrameWriter::record(&mut response, i, &stored);
    }
    BatchGetFrameWriter::trailer(
        &mut response,
        &BatchGetTrailer {
            keys_total: KEYS as u32,
            found: KEYS as u32,
            ..Default::default()
        },
    );
    g.bench_function("client_decode_response", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut found = 0u32;
            while let Ok(Some((frame, used))) = decode_frame(&response[at..]) {
                if let BatchGetFrame::Record { stored, .. } = frame {
                    found += stored.len() as u32 & 1;
                }
                at += used;
            }
            black_box(found)
        })
    });
    g.finish();
}

/// The client's checksum verification: xxh3-64 of each value's datum.
fn checksums(c: &mut Criterion) {
    let mut g = c.benchmark_group("value_checksum");
    for bytes in [100usize, 1_024, 16_384] {
        let datum = vec![0x5au8; bytes];
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::from_parameter(bytes), &datum, |b, datum| {
            b.iter(|| value_checksum(black_box(1), black_box(datum)))
        });
    }
    g.finish();
}

/// One value's dot product with a 256-float vector, as a server evaluates it: on a value of the
/// request's schema (in place), on one of an older schema that holds the field unchanged (in
/// place, through its layout), and through the general path (decode, resolve, evaluate).
fn compute(c: &mut Criterion) {
    const DIMS: usize = 256;
    let v1 = AvroCodec::parse(
        r#"{"type":"record","name":"E","fields":[{"name":"index","type":"long"},
            {"name":"embedding","type":{"type":"array","items":"float"}}]}"#,
    )
    .unwrap();
    let v2 = AvroCodec::parse(
        r#"{"type":"record","name":"E","fields":[{"name":"index","type":"long"},
            {"name":"label","type":"string","default":""},
            {"name":"embedding","type":{"type":"array","items":"float"}}]}"#,
    )
    .unwrap();
    let embedding = Value::Array((0..DIMS).map(|i| Value::Float((i as f32).sin())).collect());
    let own = v2
        .encode(
            &Value::Record(vec![
                ("index".into(), Value::Long(7)),
                ("label".into(), Value::String("member".into())),
                ("embedding".into(), embedding.clone()),
            ]),
            "value",
        )
        .unwrap();
    let older = v1
        .encode(
            &Value::Record(vec![
                ("index".into(), Value::Long(7)),
                ("embedding".into(), embedding),
            ]),
            "value",
        )
        .unwrap();
    let plan = Plan::new(
        &v2,
        ComputeRequest {
            reader_schema_id: 2,
            operations: vec![Operation::DotProduct {
                field: "embedding".into(),
                vector: (0..DIMS).map(|i| (i as f32).cos()).collect(),
                result: "dot".into(),
            }],
        },
    )
    .unwrap();
    let layout = plan.layout_of(&v1).expect("the embedding is unchanged");
    let mut g = c.benchmark_group("compute_dot_256");
    let mut out = Vec::with_capacity(64);
    g.bench_function("own_schema_in_place", |b| {
        b.iter(|| {
            out.clear();
            assert!(plan.evaluate_datum(&v2, black_box(&own), &mut out));
        })
    });
    g.bench_function("older_schema_in_place", |b| {
        b.iter(|| {
            out.clear();
            assert!(plan.evaluate_written(&v1, &layout, black_box(&older), &mut out));
        })
    });
    g.bench_function("older_schema_decoded_and_resolved", |b| {
        b.iter(|| {
            out.clear();
            let value = v1.decode_as(black_box(&older), &v2, "value").unwrap();
            plan.evaluate(&v2, &value, &mut out);
        })
    });
    g.finish();
}

criterion_group!(benches, partitioner, batch_get_framing, checksums, compute);
criterion_main!(benches);
