//! Avro encoding of keys and values, shared by the push job and the client so that both produce
//! the same key bytes (and therefore the same partition).
//!
//! Keys and values travel as Avro *binary datums* (no container header, no schema id inside):
//! the schema is the store's key schema, and the value's schema id travels beside it.

pub use apache_avro::types::Value;
pub use apache_avro::Schema;
use thiserror::Error;

use crate::avro_json::{names_of, AvroJson, Names};
use crate::avro_skip::datum_len;
use crate::json::Json;

/// An Avro problem, phrased for the person who owns the data.
#[derive(Debug, Error)]
pub enum AvroError {
    #[error("invalid Avro schema: {0}")]
    Schema(String),
    #[error("{what} does not match the schema: {detail}")]
    Mismatch { what: &'static str, detail: String },
    #[error("could not decode {what}: {detail}")]
    Decode { what: &'static str, detail: String },
}

/// One parsed schema, able to encode and decode datums and convert values to and from JSON.
#[derive(Debug, Clone)]
pub struct AvroCodec {
    schema: Schema,
    names: Names,
}

impl AvroCodec {
    /// Parses a schema from its JSON text.
    pub fn parse(schema_json: &str) -> Result<AvroCodec, AvroError> {
        let schema =
            Schema::parse_str(schema_json).map_err(|e| AvroError::Schema(e.to_string()))?;
        AvroCodec::from_schema(schema)
    }

    /// A codec for an already parsed schema.
    pub fn from_schema(schema: Schema) -> Result<AvroCodec, AvroError> {
        let names = names_of(&schema).map_err(AvroError::Schema)?;
        Ok(AvroCodec { schema, names })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The named types of the schema (records, enums, fixed), by name.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Encodes `value` as a binary datum. A value that does not match the schema exactly is
    /// first resolved to it (Avro's promotions: an `int` for a `long`, a string for an enum, a
    /// bare value for a union); one that cannot be is refused.
    ///
    /// The encoding is deterministic: map entries are written in key order, so equal values
    /// always give equal bytes (the push job compares values by their bytes).
    pub fn encode(&self, value: &Value, what: &'static str) -> Result<Vec<u8>, AvroError> {
        let mut out = Vec::new();
        if self.write(&self.schema, value, &mut out).is_ok() {
            return Ok(out);
        }
        let resolved = value
            .clone()
            .resolve(&self.schema)
            .map_err(|e| AvroError::Mismatch {
                what,
                detail: e.to_string(),
            })?;
        out.clear();
        self.write(&self.schema, &resolved, &mut out)
            .map_err(|detail| AvroError::Mismatch { what, detail })?;
        Ok(out)
    }

    /// Decodes a binary datum written with this schema; the whole input must be consumed.
    pub fn decode(&self, bytes: &[u8], what: &'static str) -> Result<Value, AvroError> {
        self.decode_with(&self.schema, bytes, None, what)
    }

    /// Decodes a binary datum written with this schema and resolves it to `reader`'s schema
    /// (Avro schema resolution: reader fields the writer lacks take their defaults, writer
    /// fields the reader lacks are dropped, numbers are promoted); the whole input must be
    /// consumed.
    pub fn decode_as(
        &self,
        bytes: &[u8],
        reader: &AvroCodec,
        what: &'static str,
    ) -> Result<Value, AvroError> {
        self.decode_with(&self.schema, bytes, Some(&reader.schema), what)
    }

    /// Encodes `value` of `part`, a schema inside this codec's (a record field's): named types
    /// it refers to resolve against this codec's schema.
    pub fn encode_part(&self, part: &Schema, value: &Value) -> Result<Vec<u8>, AvroError> {
        let mut out = Vec::new();
        self.write(part, value, &mut out)
            .map_err(|detail| AvroError::Mismatch {
                what: "value",
                detail,
            })?;
        Ok(out)
    }

    /// Decodes a datum of `part`, a schema inside this codec's (see
    /// [`encode_part`](Self::encode_part)); the whole input must be consumed.
    pub fn decode_part(&self, part: &Schema, bytes: &[u8]) -> Result<Value, AvroError> {
        self.decode_with(part, bytes, None, "value")
    }

    /// Decodes a datum of `schema` (this codec's, or a part of it) filling all of `bytes`,
    /// resolved to `reader` if given. The datum's extent is checked first
    /// ([`datum_len`]): apache_avro would reserve memory for whatever element count an array
    /// or map block claims.
    fn decode_with(
        &self,
        schema: &Schema,
        mut bytes: &[u8],
        reader: Option<&Schema>,
        what: &'static str,
    ) -> Result<Value, AvroError> {
        let error = |detail: String| AvroError::Decode { what, detail };
        match datum_len(schema, &self.names, bytes) {
            Some(n) if n == bytes.len() => {}
            Some(n) => return Err(error(format!("{} trailing bytes", bytes.len() - n))),
            None => {
                return Err(error(
                    "not a datum of the schema: truncated, or an array or map claims more \
                     elements than its bytes hold"
                        .into(),
                ))
            }
        }
        let decoded = if std::ptr::eq(schema, &self.schema) {
            apache_avro::from_avro_datum(schema, &mut bytes, reader)
        } else {
            apache_avro::from_avro_datum_schemata(schema, vec![&self.schema], &mut bytes, reader)
        };
        decoded.map_err(|e| error(e.to_string()))
    }

    /// Converts JSON (as found in newline-delimited JSON input) to a value of this schema,
    /// exactly (see [`avro_json`](crate::avro_json)).
    pub fn from_json(&self, json: &Json, what: &'static str) -> Result<Value, AvroError> {
        AvroJson::new(&self.names)
            .from_json(&self.schema, json)
            .map_err(|e| AvroError::Mismatch {
                what,
                detail: e.to_string(),
            })
    }

    /// Parses JSON text and converts it like [`from_json`](Self::from_json).
    pub fn from_json_text(&self, text: &str, what: &'static str) -> Result<Value, AvroError> {
        let json = Json::parse(text).map_err(|e| AvroError::Mismatch {
            what,
            detail: e.to_string(),
        })?;
        self.from_json(&json, what)
    }

    /// `value` as JSON that [`from_json`](Self::from_json) reads back to the same value.
    pub fn to_json(&self, value: &Value) -> Result<Json, AvroError> {
        AvroJson::new(&self.names)
            .to_json(&self.schema, value)
            .map_err(|e| AvroError::Mismatch {
                what: "value",
                detail: e.to_string(),
            })
    }

    /// `value` as JSON text, for display; a value that does not match the schema is shown as
    /// Rust debug output in angle brackets.
    pub fn to_json_text(&self, value: &Value) -> String {
        match self.to_json(value) {
            Ok(json) => json.to_text(),
            Err(_) => format!("<{value:?}>"),
        }
    }

    /// `value` as a `serde_json` value (through its exact JSON text), for callers that index
    /// into it. Numbers are as exact as `serde_json` holds them.
    pub fn to_serde_json(&self, value: &Value) -> serde_json::Value {
        serde_json::from_str(&self.to_json_text(value))
            .unwrap_or_else(|_| serde_json::Value::String(format!("<{value:?}>")))
    }

    fn resolve_ref<'s>(&'s self, schema: &'s Schema) -> Result<&'s Schema, String> {
        match schema {
            Schema::Ref { name } => self
                .names
                .get(name)
                .ok_or_else(|| format!("unknown named type `{}`", name.fullname(None))),
            other => Ok(other),
        }
    }

    /// Avro's binary encoding of `value`, which must match `schema` exactly.
    fn write(&self, schema: &Schema, value: &Value, out: &mut Vec<u8>) -> Result<(), String> {
        let schema = self.resolve_ref(schema)?;
        let mismatch = || format!("{value:?} is not a value of {schema:?}");
        match (schema, value) {
            (Schema::Null, Value::Null) => {}
            (Schema::Boolean, Value::Boolean(b)) => out.push(u8::from(*b)),
            (Schema::Int, Value::Int(n))
            | (Schema::Date, Value::Date(n) | Value::Int(n))
            | (Schema::TimeMillis, Value::TimeMillis(n) | Value::Int(n)) => {
                write_long(i64::from(*n), out)
            }
            (Schema::Long, Value::Long(n))
            | (Schema::TimeMicros, Value::TimeMicros(n) | Value::Long(n))
            | (Schema::TimestampMillis, Value::TimestampMillis(n) | Value::Long(n))
            | (Schema::TimestampMicros, Value::TimestampMicros(n) | Value::Long(n))
            | (Schema::TimestampNanos, Value::TimestampNanos(n) | Value::Long(n))
            | (Schema::LocalTimestampMillis, Value::LocalTimestampMillis(n) | Value::Long(n))
            | (Schema::LocalTimestampMicros, Value::LocalTimestampMicros(n) | Value::Long(n))
            | (Schema::LocalTimestampNanos, Value::LocalTimestampNanos(n) | Value::Long(n)) => {
                write_long(*n, out)
            }
            (Schema::Float, Value::Float(f)) => out.extend_from_slice(&f.to_le_bytes()),
            (Schema::Double, Value::Double(d)) => out.extend_from_slice(&d.to_le_bytes()),
            (Schema::Bytes, Value::Bytes(b)) => write_bytes(b, out),
            (Schema::String, Value::String(s)) => write_bytes(s.as_bytes(), out),
            (Schema::Uuid, Value::Uuid(u)) => write_bytes(u.to_string().as_bytes(), out),
            (Schema::Fixed(f), Value::Fixed(size, b)) if *size == f.size && b.len() == f.size => {
                out.extend_from_slice(b)
            }
            (Schema::Enum(e), Value::Enum(i, symbol))
                if e.symbols.get(*i as usize) == Some(symbol) =>
            {
                write_long(i64::from(*i), out)
            }
            (Schema::Array(array), Value::Array(items)) => {
                if !items.is_empty() {
                    write_long(items.len() as i64, out);
                    for item in items {
                        self.write(&array.items, item, out)?;
                    }
                }
                out.push(0);
            }
            (Schema::Map(map), Value::Map(entries)) => {
                if !entries.is_empty() {
                    write_long(entries.len() as i64, out);
                    let mut names: Vec<&String> = entries.keys().collect();
                    names.sort();
                    for name in names {
                        write_bytes(name.as_bytes(), out);
                        self.write(&map.types, &entries[name], out)?;
                    }
                }
                out.push(0);
            }
            (Schema::Record(record), Value::Record(fields)) => {
                if fields.len() != record.fields.len() {
                    return Err(mismatch());
                }
                for (field, (name, v)) in record.fields.iter().zip(fields) {
                    if *name != field.name {
                        return Err(mismatch());
                    }
                    self.write(&field.schema, v, out)?;
                }
            }
            (Schema::Union(union), Value::Union(i, inner)) => {
                let branch = union.variants().get(*i as usize).ok_or_else(mismatch)?;
                write_long(i64::from(*i), out);
                self.write(branch, inner, out)?;
            }
            (Schema::Decimal(decimal), Value::Decimal(d)) => {
                let unscaled = num_bigint::BigInt::from(d.clone());
                let minimal = unscaled.to_signed_bytes_be();
                match self.resolve_ref(&decimal.inner)? {
                    Schema::Bytes => write_bytes(&minimal, out),
                    Schema::Fixed(f) if minimal.len() <= f.size => {
                        let fill = if unscaled.sign() == num_bigint::Sign::Minus {
                            0xFF
                        } else {
                            0
                        };
                        out.extend(std::iter::repeat_n(fill, f.size - minimal.len()));
                        out.extend_from_slice(&minimal);
                    }
                    _ => return Err(mismatch()),
                }
            }
            (Schema::BigDecimal, Value::BigDecimal(_)) | (Schema::Duration, Value::Duration(_)) => {
                // Rare types: apache_avro's own encoding, exact for them.
                let bytes =
                    apache_avro::to_avro_datum(schema, value.clone()).map_err(|e| e.to_string())?;
                out.extend_from_slice(&bytes);
            }
            _ => return Err(mismatch()),
        }
        Ok(())
    }
}

/// Avro `long`: zigzag, then base-128 varint, least significant group first.
fn write_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_bytes(b: &[u8], out: &mut Vec<u8>) {
    write_long(b.len() as i64, out);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE_SCHEMA: &str = r#"{"type":"record","name":"Profile","fields":[
        {"name":"id","type":"long"},{"name":"name","type":"string"},
        {"name":"score","type":["null","double"],"default":null}]}"#;

    #[test]
    fn string_keys_round_trip() {
        let codec = AvroCodec::parse(r#""string""#).unwrap();
        let bytes = codec.encode(&Value::String("k1".into()), "key").unwrap();
        assert_eq!(bytes, vec![4, b'k', b'1']);
        assert_eq!(
            codec.decode(&bytes, "key").unwrap(),
            Value::String("k1".into())
        );
    }

    #[test]
    fn json_records_resolve_and_round_trip() {
        let codec = AvroCodec::parse(VALUE_SCHEMA).unwrap();
        let value = codec
            .from_json_text(r#"{"id": 7, "name": "ada", "score": 0.5}"#, "value")
            .unwrap();
        let bytes = codec.encode(&value, "value").unwrap();
        let back = codec.decode(&bytes, "value").unwrap();
        assert_eq!(back, value);
        assert_eq!(
            codec.to_json_text(&back),
            r#"{"id":7,"name":"ada","score":0.5}"#
        );
        assert_eq!(codec.to_serde_json(&back)["name"], "ada");
    }

    #[test]
    fn values_that_need_resolution_are_resolved_before_encoding() {
        let codec = AvroCodec::parse(VALUE_SCHEMA).unwrap();
        // A plain record whose union field is given bare, and an int for a long.
        let value = Value::Record(vec![
            ("id".into(), Value::Int(7)),
            ("name".into(), Value::String("ada".into())),
            ("score".into(), Value::Double(0.5)),
        ]);
        let bytes = codec.encode(&value, "value").unwrap();
        assert_eq!(
            apache_avro::to_avro_datum(codec.schema(), value.resolve(codec.schema()).unwrap())
                .unwrap(),
            bytes
        );
    }

    #[test]
    fn map_entries_are_encoded_in_key_order() {
        let codec = AvroCodec::parse(r#"{"type":"map","values":"long"}"#).unwrap();
        // HashMaps iterate in a random order per instance: encoding must not depend on it.
        let mut encodings = std::collections::HashSet::new();
        for _ in 0..20 {
            let value = codec
                .from_json_text(r#"{"b": 2, "a": 1, "c": 3, "d": 4}"#, "value")
                .unwrap();
            encodings.insert(codec.encode(&value, "value").unwrap());
        }
        assert_eq!(encodings.len(), 1);
        let bytes = encodings.into_iter().next().unwrap();
        assert_eq!(&bytes[..4], &[8, 2, b'a', 2]);
    }

    #[test]
    fn mismatches_are_clear_errors() {
        let codec = AvroCodec::parse(VALUE_SCHEMA).unwrap();
        let err = codec
            .from_json_text(r#"{"id": "seven", "name": "x"}"#, "value")
            .unwrap_err();
        assert!(
            err.to_string().contains("value does not match the schema")
                && err.to_string().contains("at `id`"),
            "{err}"
        );
        assert!(AvroCodec::parse("{not json").is_err());
        assert!(codec.decode(&[0xff, 0xff], "value").is_err());
        assert!(codec.encode(&Value::String("x".into()), "value").is_err());
    }
}
