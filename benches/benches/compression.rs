//! Value compression on a realistic dataset: bytes per value and µs per value for no
//! compression, zstd, and zstd with a dictionary trained the way the push job trains it.
//!
//! The dataset imitates a member-features store: Avro records with a member id, a headline and an
//! industry drawn from small vocabularies with Zipf-like reuse, a list of skills, a list of
//! recommendations (item id, score) and a timestamp. Avro carries no field names, so what repeats
//! across values is vocabulary and structure, not JSON keys.
//!
//! Run: `cargo bench --workspace --profile dev --bench compression -- --warm-up-time 1 --measurement-time 3`
//! The byte counts are printed before the timings.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::codec::{
    train_dictionary, DecompressionDictionary, ValueCompressor, ValueDecompressor,
    DEFAULT_DICTIONARY_BYTES, DEFAULT_LEVEL, TRAINING_SAMPLES_MAX,
};

const SCHEMA: &str = r#"{"type":"record","name":"MemberFeatures","fields":[
  {"name":"member_id","type":"long"},
  {"name":"headline","type":"string"},
  {"name":"industry","type":"string"},
  {"name":"skills","type":{"type":"array","items":"string"}},
  {"name":"recommendations","type":{"type":"array","items":{"type":"record","name":"Rec",
     "fields":[{"name":"item_id","type":"long"},{"name":"score","type":"float"}]}}},
  {"name":"updated_ms","type":"long"}]}"#;

const VALUES: usize = 50_000;

const ROLES: [&str; 12] = [
    "Software Engineer",
    "Data Scientist",
    "Product Manager",
    "Engineering Manager",
    "Account Executive",
    "Recruiter",
    "Designer",
    "Site Reliability Engineer",
    "Marketing Manager",
    "Research Scientist",
    "Sales Director",
    "Staff Engineer",
];
const COMPANIES: [&str; 10] = [
    "at a fintech startup",
    "at LinkedIn",
    "at a cloud provider",
    "in healthcare",
    "at a retail company",
    "in logistics",
    "at a bank",
    "in education",
    "in gaming",
    "at a consultancy",
];
const INDUSTRIES: [&str; 8] = [
    "Computer Software",
    "Financial Services",
    "Internet",
    "Hospital & Health Care",
    "Retail",
    "Staffing and Recruiting",
    "Marketing and Advertising",
    "Higher Education",
];
const SKILLS: [&str; 24] = [
    "Java",
    "Python",
    "Rust",
    "Kafka",
    "Distributed Systems",
    "Machine Learning",
    "SQL",
    "Kubernetes",
    "Leadership",
    "Recruiting",
    "Negotiation",
    "Figma",
    "Spark",
    "Go",
    "Product Strategy",
    "A/B Testing",
    "Statistics",
    "Deep Learning",
    "Sales",
    "C++",
    "Public Speaking",
    "Agile",
    "AWS",
    "Hadoop",
];

/// xorshift; `zipf` picks small indexes much more often than large ones.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn zipf(&mut self, n: usize) -> usize {
        let u = (self.next() % 10_000) as f64 / 10_000.0;
        ((n as f64).powf(u) - 1.0) as usize % n
    }
}

fn dataset() -> Vec<Vec<u8>> {
    let codec = AvroCodec::parse(SCHEMA).expect("schema");
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    (0..VALUES)
        .map(|i| {
            let skills = (0..3 + rng.next() % 6)
                .map(|_| Value::String(SKILLS[rng.zipf(SKILLS.len())].to_string()))
                .collect();
            let recs = (0..5 + rng.next() % 15)
                .map(|_| {
                    Value::Record(vec![
                        (
                            "item_id".into(),
                            Value::Long(1_000_000 + (rng.next() % 5_000_000) as i64),
                        ),
                        (
                            "score".into(),
                            Value::Float((rng.next() % 1000) as f32 / 1000.0),
                        ),
                    ])
                })
                .collect();
            let record = Value::Record(vec![
                ("member_id".into(), Value::Long(10_000_000 + i as i64 * 37)),
                (
                    "headline".into(),
                    Value::String(format!(
                        "{} {}",
                        ROLES[rng.zipf(ROLES.len())],
                        COMPANIES[rng.zipf(COMPANIES.len())]
                    )),
                ),
                (
                    "industry".into(),
                    Value::String(INDUSTRIES[rng.zipf(INDUSTRIES.len())].into()),
                ),
                ("skills".into(), Value::Array(skills)),
                ("recommendations".into(), Value::Array(recs)),
                (
                    "updated_ms".into(),
                    Value::Long(1_795_000_000_000 + (rng.next() % 86_400_000) as i64),
                ),
            ]);
            codec.encode(&record, "value").expect("encode")
        })
        .collect()
}

fn compression(c: &mut Criterion) {
    let values = dataset();
    // The push job samples up to TRAINING_SAMPLES_MAX values; take every k-th here.
    let step = (values.len() / TRAINING_SAMPLES_MAX).max(1);
    let samples: Vec<Vec<u8>> = values.iter().step_by(step).cloned().collect();
    let started = std::time::Instant::now();
    let dictionary = train_dictionary(&samples, DEFAULT_DICTIONARY_BYTES).expect("train");
    let trained_in = started.elapsed();
    let digested = Arc::new(DecompressionDictionary::new(&dictionary).expect("dictionary"));

    let raw: usize = values.iter().map(Vec::len).sum();
    let mut plain = ValueCompressor::new(DEFAULT_LEVEL, None).expect("compressor");
    let mut with_dict = ValueCompressor::new(DEFAULT_LEVEL, Some(&dictionary)).expect("compressor");
    let zstd: Vec<Vec<u8>> = values
        .iter()
        .map(|v| plain.compress(v).expect("zstd"))
        .collect();
    let dict: Vec<Vec<u8>> = values
        .iter()
        .map(|v| with_dict.compress(v).expect("dict"))
        .collect();
    let bytes = |vs: &[Vec<u8>]| vs.iter().map(Vec::len).sum::<usize>();
    let n = values.len() as f64;
    eprintln!(
        "{} values: raw {:.1} B/value; zstd {:.1} B/value ({:.2}x); zstd+dictionary {:.1} B/value \
         ({:.2}x); dictionary {} bytes from {} samples, trained in {:.0?}",
        values.len(),
        raw as f64 / n,
        bytes(&zstd) as f64 / n,
        raw as f64 / bytes(&zstd) as f64,
        bytes(&dict) as f64 / n,
        raw as f64 / bytes(&dict) as f64,
        dictionary.len(),
        samples.len(),
        trained_in
    );

    let mut g = c.benchmark_group("compression");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function(BenchmarkId::new("compress", "zstd"), |b| {
        b.iter(|| {
            i = (i + 1) % values.len();
            black_box(plain.compress(&values[i]).expect("zstd").len())
        })
    });
    g.bench_function(BenchmarkId::new("compress", "zstd_dictionary"), |b| {
        b.iter(|| {
            i = (i + 1) % values.len();
            black_box(with_dict.compress(&values[i]).expect("dict").len())
        })
    });
    let mut d_plain = ValueDecompressor::new(None).expect("decompressor");
    let mut d_dict = ValueDecompressor::new(Some(digested)).expect("decompressor");
    g.bench_function(BenchmarkId::new("decompress", "zstd"), |b| {
        b.iter(|| {
            i = (i + 1) % values.len();
            black_box(
                d_plain
                    .decompress(&zstd[i], usize::MAX)
                    .expect("zstd")
                    .len(),
            )
        })
    });
    g.bench_function(BenchmarkId::new("decompress", "zstd_dictionary"), |b| {
        b.iter(|| {
            i = (i + 1) % values.len();
            black_box(d_dict.decompress(&dict[i], usize::MAX).expect("dict").len())
        })
    });
    g.finish();
}

criterion_group!(benches, compression);
criterion_main!(benches);
