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

use rialto_protocol::avro::{AvroCodec, Schema};
use rialto_protocol::avro_json::names_of;
use rialto_protocol::avro_skip::datum_len;
use rialto_protocol::envelope::KEY_BYTES_MAX;
use rialto_protocol::json::Json;
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::stored::CHUNK_KEY_SUFFIX_BYTES;

use crate::avro_file::ContainerReader;
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
    /// The registered value schema every value was written with.
    pub value_schema_id: u32,
    /// Keeps the sort's files alive while the partitions are read.
    pub(crate) _sorted: Option<crate::sort::SortedDataset>,
}

/// The store's registered value schemas, and the one the push was told to write with.
#[derive(Debug, Clone)]
pub struct ValueSchemas {
    /// `(id, codec)` of every registered value schema.
    pub registered: Vec<(u32, AvroCodec)>,
    /// `--value-schema-id`: values are written with this schema. `None`: JSON lines are read
    /// with the latest schema, an Avro file's values with the registered schema the file's
    /// writer schema matches (the latest when none does: values are resolved to it).
    pub requested: Option<u32>,
}

impl ValueSchemas {
    fn get(&self, id: u32) -> Result<(u32, &AvroCodec), String> {
        self.registered
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(i, c)| (*i, c))
            .ok_or_else(|| {
                let ids: Vec<String> = self.registered.iter().map(|(i, _)| i.to_string()).collect();
                format!(
                    "value schema {id} is not registered for the store (registered: {})",
                    ids.join(", ")
                )
            })
    }

    fn latest(&self) -> Result<(u32, &AvroCodec), String> {
        let id = self.registered.iter().map(|(i, _)| *i).max();
        self.get(id.ok_or("the store has no value schema")?)
    }

    /// The schema JSON lines are read with.
    fn for_json(&self) -> Result<(u32, &AvroCodec), String> {
        match self.requested {
            Some(id) => self.get(id),
            None => self.latest(),
        }
    }

    /// The schema an Avro file's values are written with, and whether the file's own bytes
    /// are that schema's (same parsing canonical form: the same binary encoding).
    fn for_avro(&self, file_value: &Schema) -> Result<(u32, &AvroCodec, bool), String> {
        let canonical = file_value.canonical_form();
        let same = |codec: &AvroCodec| codec.schema().canonical_form() == canonical;
        if let Some(id) = self.requested {
            let (id, codec) = self.get(id)?;
            return Ok((id, codec, same(codec)));
        }
        let matching = self
            .registered
            .iter()
            .filter(|(_, c)| same(c))
            .max_by_key(|(i, _)| *i);
        match matching {
            Some((id, codec)) => Ok((*id, codec, true)),
            None => self.latest().map(|(id, codec)| (id, codec, false)),
        }
    }
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
    limits: RecordLimits,
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
    fn bad(&self, record: u64, detail: String) -> PushError {
        PushError::BadRecord {
            path: self.path.clone(),
            record,
            detail,
        }
    }

    fn show_key(&self, key: &[u8]) -> String {
        show_key(self.key_codec, key)
    }

    fn add(&mut self, record_no: u64, key: Vec<u8>, value: Vec<u8>) -> Result<(), PushError> {
        let key_max = KEY_BYTES_MAX - CHUNK_KEY_SUFFIX_BYTES;
        if key.len() > key_max {
            return Err(self.bad(
                record_no,
                format!("key of {} bytes is over the limit of {key_max}", key.len()),
            ));
        }
        if value.len() as u64 > self.limits.max_value_bytes {
            return Err(PushError::ValueTooLarge {
                path: self.path.clone(),
                record: record_no,
                key: self.show_key(&key),
                bytes: value.len() as u64,
                max: self.limits.max_value_bytes,
            });
        }
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
                return Err(PushError::DuplicateKey {
                    path: self.path.clone(),
                    key: show_key(self.key_codec, &conflict.key),
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
            value_schema_id: 0,
            _sorted: Some(sorted),
        })
    }
}

/// A key as JSON, for messages.
fn show_key(codec: &AvroCodec, key: &[u8]) -> String {
    codec
        .decode(key, "key")
        .map(|v| codec.to_json_text(&v))
        .unwrap_or_else(|_| format!("{key:02x?}"))
}

/// Limits every record must meet.
#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    /// Largest serialized value (the store's `max_value_bytes`).
    pub max_value_bytes: u64,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

/// Reads and validates a whole input file.
///
/// JSON numbers are converted exactly (see `rialto_protocol::avro_json`). Values of an Avro file
/// written with a registered value schema are kept as the file's own bytes, under that schema's
/// id; with another schema they are resolved to the latest (or the requested) one and encoded
/// again.
#[allow(clippy::too_many_arguments)]
pub fn read_dataset(
    path: &Path,
    format: InputFormat,
    shape: &InputShape,
    key_codec: &AvroCodec,
    value_schemas: &ValueSchemas,
    partition_count: u32,
    sort: &SortConfig,
    limits: RecordLimits,
) -> Result<PartitionedDataset, PushError> {
    let mut b = Builder {
        key_codec,
        partition_count,
        sorter: ExternalSorter::new(partition_count, sort.memory_bytes, sort.spill_dir.clone()),
        bytes: 0,
        path: path.to_path_buf(),
        samples: Reservoir::new(),
        limits,
    };
    let file = std::fs::File::open(path).map_err(|e| PushError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let value_schema_id = match format {
        InputFormat::Json => {
            let (id, codec) = value_schemas.for_json().map_err(|e| b.bad(0, e))?;
            read_json(&mut b, file, shape, codec)?;
            id
        }
        InputFormat::Avro => read_avro(&mut b, file, shape, value_schemas)?,
    };
    let mut dataset = b.finish()?;
    dataset.value_schema_id = value_schema_id;
    Ok(dataset)
}

/// The longest line of JSON read, for values of at most `max_value_bytes`: the value written as
/// JSON (a byte as a `\u00XX` escape takes six characters) and a megabyte for its key and the
/// punctuation. A longer line (a binary file given as JSON, a missing newline) is refused
/// before it is held in memory.
pub fn json_line_bytes_max(max_value_bytes: u64) -> usize {
    usize::try_from(max_value_bytes.saturating_mul(6).saturating_add(1 << 20)).unwrap_or(usize::MAX)
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
    #[error("longer than {max} bytes, the most a record of this store can take as JSON")]
    TooLong { max: usize },
    #[error("not UTF-8 text")]
    NotUtf8,
}

/// Reads the next line (without its `\n` or `\r\n`) of at most `max` bytes; `None` at the end
/// of the input. A longer line is an error once `max` bytes of it were read, whatever its length.
pub fn read_bounded_line(
    reader: &mut impl BufRead,
    max: usize,
) -> Option<Result<String, LineError>> {
    let mut line = Vec::new();
    // One byte more than a line may hold: a line that long, newline excepted, is too long.
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut bounded = std::io::Read::take(&mut *reader, limit);
    match bounded.read_until(b'\n', &mut line) {
        Ok(0) => return None,
        Ok(_) => {}
        Err(e) => return Some(Err(e.into())),
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Some(Err(LineError::TooLong { max }));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Some(String::from_utf8(line).map_err(|_| LineError::NotUtf8))
}

fn read_json(
    b: &mut Builder<'_>,
    file: std::fs::File,
    shape: &InputShape,
    value_codec: &AvroCodec,
) -> Result<(), PushError> {
    let mut reader = std::io::BufReader::new(file);
    let max = json_line_bytes_max(b.limits.max_value_bytes);
    let mut line_no = 0u64;
    while let Some(line) = read_bounded_line(&mut reader, max) {
        line_no += 1;
        let line = match line {
            Ok(line) => line,
            Err(LineError::Io(e)) => {
                return Err(PushError::Io {
                    path: b.path.clone(),
                    detail: e.to_string(),
                })
            }
            Err(e) => return Err(b.bad(line_no, e.to_string())),
        };
        if line.trim().is_empty() {
            continue;
        }
        let json =
            Json::parse(&line).map_err(|e| b.bad(line_no, format!("not valid JSON: {e}")))?;
        let Json::Object(members) = &json else {
            return Err(b.bad(
                line_no,
                format!(
                    "expected an object with `{}` and `{}`, got {}",
                    shape.key_field,
                    shape.value_field,
                    json.kind()
                ),
            ));
        };
        if let Some((unknown, _)) = members
            .iter()
            .find(|(n, _)| *n != shape.key_field && *n != shape.value_field)
        {
            return Err(b.bad(
                line_no,
                format!(
                    "unknown member `{unknown}`; a line holds `{}` and `{}` only",
                    shape.key_field, shape.value_field
                ),
            ));
        }
        let field = |name: &str| {
            json.get(name)
                .ok_or_else(|| b.bad(line_no, format!("missing field `{name}`")))
        };
        let key = b
            .key_codec
            .from_json(field(&shape.key_field)?, "key")
            .and_then(|v| b.key_codec.encode(&v, "key"))
            .map_err(|e| b.bad(line_no, e.to_string()))?;
        let value = value_codec
            .from_json(field(&shape.value_field)?, "value")
            .and_then(|v| value_codec.encode(&v, "value"))
            .map_err(|e| b.bad(line_no, e.to_string()))?;
        b.add(line_no, key, value)?;
    }
    Ok(())
}

/// Reads an Avro container file; answers the id of the value schema its values are written with.
fn read_avro(
    b: &mut Builder<'_>,
    file: std::fs::File,
    shape: &InputShape,
    value_schemas: &ValueSchemas,
) -> Result<u32, PushError> {
    let mut reader = ContainerReader::open(std::io::BufReader::new(file))
        .map_err(|e| b.bad(0, e.to_string()))?;
    let row = reader.schema().clone();
    let Schema::Record(record) = &row else {
        return Err(b.bad(
            0,
            format!(
                "the file's datums are not records with `{}` and `{}` fields",
                shape.key_field, shape.value_field
            ),
        ));
    };
    let position = |name: &str| {
        record.lookup.get(name).copied().ok_or_else(|| {
            b.bad(
                0,
                format!(
                    "the file's records have no field `{name}` (its schema: {})",
                    row.canonical_form()
                ),
            )
        })
    };
    let (key_at, value_at) = (position(&shape.key_field)?, position(&shape.value_field)?);
    // The file's value bytes are kept when they were written with a registered value schema.
    let (schema_id, value_codec, keep_bytes) = value_schemas
        .for_avro(&record.fields[value_at].schema)
        .map_err(|e| b.bad(0, e))?;
    if keep_bytes {
        tracing::info!(
            schema_id,
            "the file's values are written with a registered value schema"
        );
    } else {
        tracing::info!(schema_id, "the file's value schema is not registered: values are resolved to schema {schema_id} and encoded again");
    }
    let row_names = names_of(&row).map_err(|e| b.bad(0, e))?;
    let mut record_no = 0u64;
    while let Some(block) = reader
        .next_block()
        .map_err(|e| b.bad(record_no, e.to_string()))?
    {
        let mut data = block.data.as_slice();
        for _ in 0..block.count {
            record_no += 1;
            let (mut key, mut value) = (None, None);
            for (i, field) in record.fields.iter().enumerate() {
                let before = data;
                // apache_avro reserves what an array or map block claims: bound it first.
                datum_len(&field.schema, &row_names, data).ok_or_else(|| {
                    b.bad(
                        record_no,
                        format!(
                            "unreadable field `{}`: truncated, or an array or map claims more \
                             elements than its bytes hold",
                            field.name
                        ),
                    )
                })?;
                let decoded = apache_avro::from_avro_datum_schemata(
                    &field.schema,
                    vec![&row],
                    &mut data,
                    None,
                )
                .map_err(|e| b.bad(record_no, format!("unreadable field `{}`: {e}", field.name)))?;
                let bytes = &before[..before.len() - data.len()];
                if i == key_at {
                    key = Some(decoded);
                } else if i == value_at {
                    value = Some(if keep_bytes {
                        bytes.to_vec()
                    } else {
                        value_codec
                            .encode(&decoded, "value")
                            .map_err(|e| b.bad(record_no, e.to_string()))?
                    });
                }
            }
            let (Some(key), Some(value)) = (key, value) else {
                return Err(b.bad(record_no, "key or value missing".into()));
            };
            let key = b
                .key_codec
                .encode(&key, "key")
                .map_err(|e| b.bad(record_no, e.to_string()))?;
            b.add(record_no, key, value)?;
        }
        if !data.is_empty() {
            return Err(b.bad(
                record_no,
                format!("{} bytes after the last datum of its block", data.len()),
            ));
        }
    }
    Ok(schema_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rialto_protocol::avro::Value;
    use std::io::Write;

    /// `read_dataset` with the default shape and sort.
    fn read(
        path: &Path,
        format: InputFormat,
        k: &AvroCodec,
        v: &AvroCodec,
        partitions: u32,
        limits: RecordLimits,
    ) -> Result<PartitionedDataset, PushError> {
        let (shape, sort) = (InputShape::default(), SortConfig::default());
        let values = ValueSchemas {
            registered: vec![(1, v.clone())],
            requested: None,
        };
        read_dataset(path, format, &shape, k, &values, partitions, &sort, limits)
    }

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
        let d = read(
            f.path(),
            InputFormat::Json,
            &k,
            &v,
            1,
            RecordLimits::default(),
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
        let err = read(
            f.path(),
            InputFormat::Json,
            &k,
            &v,
            4,
            RecordLimits::default(),
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
        let err = read(
            f.path(),
            InputFormat::Json,
            &k,
            &v,
            4,
            RecordLimits::default(),
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
        let d = read(
            f.path(),
            InputFormat::Avro,
            &k,
            &v,
            3,
            RecordLimits::default(),
        )
        .unwrap();
        assert_eq!(d.records, 10);
        assert_eq!(d.partitions.iter().map(|p| p.records).sum::<u64>(), 10);
    }

    type KeyValue = (Vec<u8>, Vec<u8>);

    fn read_json_lines(
        value_schema: &str,
        lines: &str,
        limits: RecordLimits,
    ) -> Result<Vec<KeyValue>, PushError> {
        let k = AvroCodec::parse(r#""string""#).unwrap();
        let v = AvroCodec::parse(value_schema).unwrap();
        let f = write(lines);
        let d = read(f.path(), InputFormat::Json, &k, &v, 1, limits)?;
        Ok(d.partitions
            .into_iter()
            .next()
            .unwrap()
            .into_records()
            .unwrap()
            .map(|r| r.unwrap())
            .collect())
    }

    #[test]
    fn json_doubles_are_stored_exactly() {
        // A JSON-lines push stored these with a different last digit.
        let records = read_json_lines(
            r#"{"type":"record","name":"V","fields":[{"name":"a","type":"double"},{"name":"b","type":"double"}]}"#,
            "{\"key\":\"k\",\"value\":{\"a\":0.9418320440936001,\"b\":0.9407199315086009}}\n",
            RecordLimits::default(),
        )
        .unwrap();
        let mut expected = 0.9418320440936001f64.to_le_bytes().to_vec();
        expected.extend_from_slice(&0.9407199315086009f64.to_le_bytes());
        assert_eq!(records[0].1, expected);
    }

    #[test]
    fn a_value_over_the_limit_is_refused_naming_key_size_and_limit() {
        let big = "x".repeat(1000);
        let err = read_json_lines(
            r#""string""#,
            &format!(
                "{{\"key\":\"small\",\"value\":\"x\"}}\n{{\"key\":\"big\",\"value\":\"{big}\"}}\n"
            ),
            RecordLimits {
                max_value_bytes: 999,
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("record 2")
                && msg.contains("\"big\"")
                && msg.contains("1002 bytes")
                && msg.contains("999"),
            "{msg}"
        );
    }

    #[test]
    fn lines_are_read_up_to_their_bound_and_no_further() {
        let read_all = |input: &[u8], max: usize| {
            // A small buffer: a line spans many fills.
            let mut reader = std::io::BufReader::with_capacity(4, input);
            let mut out = Vec::new();
            while let Some(line) = read_bounded_line(&mut reader, max) {
                let stop = line.is_err();
                out.push(line.map_err(|e| e.to_string()));
                if stop {
                    break;
                }
            }
            out
        };
        assert_eq!(
            read_all(b"one\r\n\ntwo and more\nlast", 12),
            vec![
                Ok("one".to_string()),
                Ok(String::new()),
                Ok("two and more".to_string()),
                Ok("last".to_string())
            ]
        );
        let long = format!("ok\n{}\nafter\n", "x".repeat(10_000));
        let read = read_all(long.as_bytes(), 12);
        assert_eq!(read[0], Ok("ok".to_string()));
        assert_eq!(
            read[1],
            Err("longer than 12 bytes, the most a record of this store can take as JSON".into())
        );
        assert_eq!(read.len(), 2, "reading stops at the long line");
        assert_eq!(
            read_all(b"\xff\xfe\n", 12),
            vec![Err("not UTF-8 text".into())]
        );
        assert!(read_all(b"", 12).is_empty());
    }

    #[test]
    fn a_line_longer_than_any_record_of_the_store_is_refused_by_number() {
        let limits = RecordLimits {
            max_value_bytes: 10,
        };
        let max = json_line_bytes_max(limits.max_value_bytes);
        let input = format!("{{\"key\":\"a\",\"value\":\"x\"}}\n{}", "y".repeat(max + 1));
        let err = read_json_lines(r#""string""#, &input, limits).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("record 2") && msg.contains(&format!("longer than {max} bytes")),
            "{msg}"
        );
    }

    #[test]
    fn unknown_members_of_a_line_are_refused() {
        let err = read_json_lines(
            r#""string""#,
            "{\"key\":\"a\",\"valeu\":\"x\"}\n",
            RecordLimits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown member `valeu`"), "{err}");
    }

    /// A container file of one block holding `datums` (already encoded rows), written by hand.
    fn container(schema: &str, datums: &[Vec<u8>]) -> Vec<u8> {
        fn long(n: i64, out: &mut Vec<u8>) {
            let mut z = ((n << 1) ^ (n >> 63)) as u64;
            while z >= 0x80 {
                out.push((z as u8 & 0x7f) | 0x80);
                z >>= 7;
            }
            out.push(z as u8);
        }
        let mut out = b"Obj\x01".to_vec();
        long(1, &mut out);
        let key = "avro.schema";
        long(key.len() as i64, &mut out);
        out.extend_from_slice(key.as_bytes());
        long(schema.len() as i64, &mut out);
        out.extend_from_slice(schema.as_bytes());
        long(0, &mut out);
        let sync = [7u8; 16];
        out.extend_from_slice(&sync);
        let data: Vec<u8> = datums.concat();
        long(datums.len() as i64, &mut out);
        long(data.len() as i64, &mut out);
        out.extend_from_slice(&data);
        out.extend_from_slice(&sync);
        out
    }

    #[test]
    fn avro_values_keep_the_files_own_bytes() {
        // A map written with its entries out of key order: decoding and encoding again would
        // sort them. The stored value must be the file's bytes.
        let value_schema = r#"{"type":"map","values":"long"}"#;
        let row_schema = format!(
            r#"{{"type":"record","name":"Row","fields":[{{"name":"key","type":"string"}},{{"name":"value","type":{value_schema}}}]}}"#
        );
        let value_bytes = vec![4, 2, b'b', 4, 2, b'a', 2, 0]; // {"b": 2, "a": 1}
        let mut row = vec![2, b'k'];
        row.extend_from_slice(&value_bytes);
        let mut f = tempfile::Builder::new().suffix(".avro").tempfile().unwrap();
        f.write_all(&container(&row_schema, &[row])).unwrap();
        let k = AvroCodec::parse(r#""string""#).unwrap();
        let v = AvroCodec::parse(value_schema).unwrap();
        let d = read(
            f.path(),
            InputFormat::Avro,
            &k,
            &v,
            1,
            RecordLimits::default(),
        )
        .unwrap();
        let records: Vec<_> = d
            .partitions
            .into_iter()
            .next()
            .unwrap()
            .into_records()
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(records, vec![(vec![2, b'k'], value_bytes.clone())]);
        // Re-encoding would have changed them (entries in key order).
        assert_ne!(
            v.encode(&v.decode(&value_bytes, "v").unwrap(), "v")
                .unwrap(),
            value_bytes
        );
    }
}
