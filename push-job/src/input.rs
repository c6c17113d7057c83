//! Reading a dataset: Avro container files or newline-delimited JSON, validated record by record
//! against the store's schemas and turned into partitioned, sorted, de-duplicated key/value bytes.
//!
//! Input shapes:
//! * Avro container file (`.avro`): each datum is a record with a key field and a value field
//!   (named `key` and `value` by default).
//! * Newline-delimited JSON (`.json`, `.jsonl`, `.ndjson`): one object per line,
//!   `{"key": <key as JSON>, "value": <value as JSON>}`; blank lines are skipped.
//!
//! Records go through an [`ExternalSorter`]: partitioned, sorted by key and de-duplicated
//! within a memory budget, spilling sorted runs to disk when the dataset is larger.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::partitioner::partition_for_key;

use crate::sort::{ExternalSorter, SortedPartition};
use crate::PushError;

/// How the input file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Avro object container file.
    Avro,
    /// Newline-delimited JSON objects with `key` and `value`.
    Json,
}

impl InputFormat {
    /// Guesses the format from the file extension.
    pub fn from_path(path: &Path) -> Option<InputFormat> {
        match path.extension()?.to_str()? {
            "avro" => Some(InputFormat::Avro),
            "json" | "jsonl" | "ndjson" => Some(InputFormat::Json),
            _ => None,
        }
    }
}

/// Where to find the key and the value in each input record.
#[derive(Debug, Clone)]
pub struct InputShape {
    pub key_field: String,
    pub value_field: String,
}

impl Default for InputShape {
    fn default() -> Self {
        InputShape {
            key_field: "key".into(),
            value_field: "value".into(),
        }
    }
}

/// A validated dataset: for each partition, `(key, value)` datums sorted by key, keys unique.
#[derive(Debug, Default)]
pub struct PartitionedDataset {
    pub partitions: Vec<SortedPartition>,
    pub records: u64,
    pub bytes: u64,
    /// Records dropped because an identical (key, value) record was already read.
    pub identical_duplicates: u64,
    /// How many times the sort spilled to disk.
    pub spills: usize,
    /// A uniform sample of the values (reservoir sampling, bounded by
    /// `codec::TRAINING_SAMPLES_MAX`), to train a compression dictionary on.
    pub samples: Vec<Vec<u8>>,
    /// Keeps the sort's files alive while the partitions are read.
    pub(crate) _sorted: Option<crate::sort::SortedDataset>,
}

/// Memory budget and spill location of the sort.
#[derive(Debug, Clone)]
pub struct SortConfig {
    pub memory_bytes: usize,
    /// Parent of the spill directory; the system's temporary directory if `None`.
    pub spill_dir: Option<PathBuf>,
}

impl Default for SortConfig {
    fn default() -> Self {
        SortConfig {
            memory_bytes: crate::sort::DEFAULT_SORT_MEMORY_BYTES,
            spill_dir: None,
        }
    }
}

struct Builder<'a> {
    key_codec: &'a AvroCodec,
    partition_count: u32,
    sorter: ExternalSorter,
    bytes: u64,
    path: PathBuf,
    samples: Reservoir,
}

/// Reservoir sampling of values (Algorithm R) with a fixed-seed xorshift, so a push of the same
/// input trains the same dictionary.
struct Reservoir {
    samples: Vec<Vec<u8>>,
    bytes: usize,
    seen: u64,
    rng: u64,
}

impl Reservoir {
    fn new() -> Reservoir {
        Reservoir {
            samples: Vec::new(),
            bytes: 0,
            seen: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn offer(&mut self, value: &[u8]) {
        use rialto_protocol::codec::{TRAINING_BYTES_MAX, TRAINING_SAMPLES_MAX};
        self.seen += 1;
        if self.samples.len() < TRAINING_SAMPLES_MAX
            && self.bytes + value.len() <= TRAINING_BYTES_MAX
        {
            self.bytes += value.len();
            self.samples.push(value.to_vec());
            return;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let slot = (self.rng % self.seen) as usize;
        if slot < self.samples.len() {
            let old = std::mem::replace(&mut self.samples[slot], value.to_vec());
            self.bytes = self.bytes + value.len() - old.len();
            if self.bytes > TRAINING_BYTES_MAX {
                // Keep the byte bound: undo (rare, only with values of very different sizes).
                self.bytes = self.bytes - value.len() + old.len();
                self.samples[slot] = old;
            }
        }
    }
}

impl<'a> Builder<'a> {
    fn add(&mut self, record_no: u64, key: Vec<u8>, value: Vec<u8>) -> Result<(), PushError> {
        let p = partition_for_key(&key, self.partition_count);
        self.bytes += (key.len() + value.len()) as u64;
        self.samples.offer(&value);
        self.sorter.add(p, record_no, key, value)
    }

    fn finish(self) -> Result<PartitionedDataset, PushError> {
        let spills = self.sorter.spills();
        let mut sorted = match self.sorter.finish()? {
            Ok(sorted) => sorted,
            Err(conflict) => {
                let shown = self
                    .key_codec
                    .decode(&conflict.key, "key")
                    .map(|v| rialto_protocol::avro::to_json(&v).to_string())
                    .unwrap_or_else(|_| format!("{:?}", conflict.key));
                return Err(PushError::DuplicateKey {
                    path: self.path.clone(),
                    key: shown,
                    first: conflict.first,
                    second: conflict.second,
                });
            }
        };
        let partitions = std::mem::take(&mut sorted.partitions);
        Ok(PartitionedDataset {
            records: partitions.iter().map(|p| p.records).sum(),
            bytes: self.bytes,
            identical_duplicates: sorted.identical_duplicates,
            spills,
            partitions,
            samples: self.samples.samples,
            _sorted: Some(sorted),
        })
    }
}

/// Reads and validates a whole input file.
pub fn read_dataset(
    path: &Path,
    format: InputFormat,
    shape: &InputShape,
    key_codec: &AvroCodec,
    value_codec: &AvroCodec,
    partition_count: u32,
    sort: &SortConfig,
) -> Result<PartitionedDataset, PushError> {
    let mut b = Builder {
        key_codec,
        partition_count,
        sorter: ExternalSorter::new(partition_count, sort.memory_bytes, sort.spill_dir.clone()),
        bytes: 0,
        path: path.to_path_buf(),
        samples: Reservoir::new(),
    };
    let file = std::fs::File::open(path).map_err(|e| PushError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let bad = |record: u64, detail: String| PushError::BadRecord {
        path: path.to_path_buf(),
        record,
        detail,
    };
    match format {
        InputFormat::Json => {
            let reader = std::io::BufReader::new(file);
            for (i, line) in reader.lines().enumerate() {
                let line_no = i as u64 + 1;
                let line = line.map_err(|e| PushError::Io {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                let json: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| bad(line_no, format!("not valid JSON: {e}")))?;
                let field = |name: &str| {
                    json.get(name)
                        .ok_or_else(|| bad(line_no, format!("missing field `{name}`")))
                };
                let key = key_codec
                    .from_json(field(&shape.key_field)?, "key")
                    .and_then(|v| key_codec.encode(&v, "key"))
                    .map_err(|e| bad(line_no, e.to_string()))?;
                let value = value_codec
                    .from_json(field(&shape.value_field)?, "value")
                    .and_then(|v| value_codec.encode(&v, "value"))
                    .map_err(|e| bad(line_no, e.to_string()))?;
                b.add(line_no, key, value)?;
            }
        }
        InputFormat::Avro => {
            let reader = apache_avro::Reader::new(std::io::BufReader::new(file))
                .map_err(|e| bad(0, format!("not an Avro container file: {e}")))?;
            for (i, datum) in reader.enumerate() {
                let record_no = i as u64 + 1;
                let datum =
                    datum.map_err(|e| bad(record_no, format!("unreadable Avro datum: {e}")))?;
                let Value::Record(fields) = datum else {
                    return Err(bad(
                        record_no,
                        "datum is not a record with key and value fields".into(),
                    ));
                };
                let mut key = None;
                let mut value = None;
                for (name, v) in fields {
                    if name == shape.key_field {
                        key = Some(v);
                    } else if name == shape.value_field {
                        value = Some(v);
                    }
                }
                let key = key.ok_or_else(|| {
                    bad(record_no, format!("missing field `{}`", shape.key_field))
                })?;
                let value = value.ok_or_else(|| {
                    bad(record_no, format!("missing field `{}`", shape.value_field))
                })?;
                let key = key_codec
                    .encode_exact(key, "key")
                    .map_err(|e| bad(record_no, e.to_string()))?;
                let value = value_codec
                    .encode_exact(value, "value")
                    .map_err(|e| bad(record_no, e.to_string()))?;
                b.add(record_no, key, value)?;
            }
        }
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const VALUE: &str = r#"{"type":"record","name":"V","fields":[{"name":"n","type":"long"}]}"#;

    fn codecs() -> (AvroCodec, AvroCodec) {
        (
            AvroCodec::parse(r#""string""#).unwrap(),
            AvroCodec::parse(VALUE).unwrap(),
        )
    }

    fn write(lines: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        f.write_all(lines.as_bytes()).unwrap();
        f
    }

    #[test]
    fn json_input_is_partitioned_sorted_and_deduplicated() {
        let (k, v) = codecs();
        let f = write("{\"key\":\"b\",\"value\":{\"n\":2}}\n\n{\"key\":\"a\",\"value\":{\"n\":1}}\n{\"key\":\"a\",\"value\":{\"n\":1}}\n");
        let d = read_dataset(
            f.path(),
            InputFormat::Json,
            &InputShape::default(),
            &k,
            &v,
            1,
            &SortConfig::default(),
        )
        .unwrap();
        assert_eq!(d.records, 2);
        assert_eq!(d.identical_duplicates, 1);
        let keys: Vec<_> = d
            .partitions
            .into_iter()
            .next()
            .unwrap()
            .into_records()
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(keys, vec![vec![2, b'a'], vec![2, b'b']]);
    }

    #[test]
    fn conflicting_duplicates_fail_with_both_record_numbers() {
        let (k, v) = codecs();
        let f = write("{\"key\":\"a\",\"value\":{\"n\":1}}\n{\"key\":\"a\",\"value\":{\"n\":2}}\n");
        let err = read_dataset(
            f.path(),
            InputFormat::Json,
            &InputShape::default(),
            &k,
            &v,
            4,
            &SortConfig::default(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"a\"") && msg.contains("record 1") && msg.contains("record 2"),
            "{msg}"
        );
    }

    #[test]
    fn schema_mismatch_names_the_line() {
        let (k, v) = codecs();
        let f = write(
            "{\"key\":\"a\",\"value\":{\"n\":1}}\n{\"key\":\"b\",\"value\":{\"n\":\"two\"}}\n",
        );
        let err = read_dataset(
            f.path(),
            InputFormat::Json,
            &InputShape::default(),
            &k,
            &v,
            4,
            &SortConfig::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, PushError::BadRecord { record: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn avro_container_files_are_read() {
        let (k, v) = codecs();
        let schema = apache_avro::Schema::parse_str(&format!(
            r#"{{"type":"record","name":"Row","fields":[{{"name":"key","type":"string"}},{{"name":"value","type":{VALUE}}}]}}"#
        ))
        .unwrap();
        let mut w = apache_avro::Writer::new(&schema, Vec::new());
        for i in 0..10i64 {
            let row = Value::Record(vec![
                ("key".into(), Value::String(format!("k{i}"))),
                (
                    "value".into(),
                    Value::Record(vec![("n".into(), Value::Long(i))]),
                ),
            ]);
            w.append(row).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let mut f = tempfile::Builder::new().suffix(".avro").tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        let d = read_dataset(
            f.path(),
            InputFormat::Avro,
            &InputShape::default(),
            &k,
            &v,
            3,
            &SortConfig::default(),
        )
        .unwrap();
        assert_eq!(d.records, 10);
        assert_eq!(d.partitions.iter().map(|p| p.records).sum::<u64>(), 10);
    }
}
