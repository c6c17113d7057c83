//! Avro encoding of keys and values, shared by the push job and the client so that both produce
//! the same key bytes (and therefore the same partition).
//!
//! Keys and values travel as Avro *binary datums* (no container header, no schema id inside):
//! the schema is the store's key schema, and the value's schema id travels beside it.

pub use apache_avro::types::Value;
pub use apache_avro::Schema;
use thiserror::Error;

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

/// One parsed schema, able to encode and decode datums.
#[derive(Debug, Clone)]
pub struct AvroCodec {
    schema: Schema,
}

impl AvroCodec {
    /// Parses a schema from its JSON text.
    pub fn parse(schema_json: &str) -> Result<AvroCodec, AvroError> {
        let schema =
            Schema::parse_str(schema_json).map_err(|e| AvroError::Schema(e.to_string()))?;
        Ok(AvroCodec { schema })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Checks `value` against the schema (coercing compatible numbers, named unions, etc.) and
    /// encodes it as a binary datum.
    pub fn encode(&self, value: &Value, what: &'static str) -> Result<Vec<u8>, AvroError> {
        let resolved = value
            .clone()
            .resolve(&self.schema)
            .map_err(|e| AvroError::Mismatch {
                what,
                detail: e.to_string(),
            })?;
        apache_avro::to_avro_datum(&self.schema, resolved).map_err(|e| AvroError::Mismatch {
            what,
            detail: e.to_string(),
        })
    }

    /// Encodes a value known to already match the schema exactly (e.g. read from an Avro file
    /// written with this schema); falls back to [`encode`](Self::encode) when it does not.
    pub fn encode_exact(&self, value: Value, what: &'static str) -> Result<Vec<u8>, AvroError> {
        if value.validate(&self.schema) {
            apache_avro::to_avro_datum(&self.schema, value).map_err(|e| AvroError::Mismatch {
                what,
                detail: e.to_string(),
            })
        } else {
            self.encode(&value, what)
        }
    }

    /// Decodes a binary datum written with this schema; the whole input must be consumed.
    pub fn decode(&self, mut bytes: &[u8], what: &'static str) -> Result<Value, AvroError> {
        let value = apache_avro::from_avro_datum(&self.schema, &mut bytes, None).map_err(|e| {
            AvroError::Decode {
                what,
                detail: e.to_string(),
            }
        })?;
        if !bytes.is_empty() {
            return Err(AvroError::Decode {
                what,
                detail: format!("{} trailing bytes", bytes.len()),
            });
        }
        Ok(value)
    }

    /// Converts a JSON value (as found in newline-delimited JSON input) to an Avro value of this
    /// schema.
    pub fn from_json(
        &self,
        json: &serde_json::Value,
        what: &'static str,
    ) -> Result<Value, AvroError> {
        Value::from(json.clone())
            .resolve(&self.schema)
            .map_err(|e| AvroError::Mismatch {
                what,
                detail: e.to_string(),
            })
    }
}

/// Converts an Avro value to JSON for display (CLI output, logs).
pub fn to_json(value: &Value) -> serde_json::Value {
    serde_json::Value::try_from(value.clone())
        .unwrap_or_else(|e| serde_json::Value::String(format!("<{e}>")))
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
        let json = serde_json::json!({"id": 7, "name": "ada", "score": 0.5});
        let value = codec.from_json(&json, "value").unwrap();
        let bytes = codec.encode(&value, "value").unwrap();
        let back = codec.decode(&bytes, "value").unwrap();
        assert_eq!(to_json(&back)["name"], "ada");
    }

    #[test]
    fn mismatches_are_clear_errors() {
        let codec = AvroCodec::parse(VALUE_SCHEMA).unwrap();
        let err = codec
            .from_json(&serde_json::json!({"id": "seven"}), "value")
            .unwrap_err();
        assert!(
            err.to_string().contains("value does not match the schema"),
            "{err}"
        );
        assert!(AvroCodec::parse("{not json").is_err());
        assert!(codec.decode(&[0xff, 0xff], "value").is_err());
    }
}
