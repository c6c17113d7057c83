//! Expected values of a dataset, read without the push job's converters.
//!
//! * [`avro_file`]: an Avro object container file read byte by byte (header, blocks, codecs), each
//!   record's key and value datums cut out as the file's own bytes.
//! * [`json_values`]: a value read back compared with the JSON input line, parsed by
//!   `serde_json` rather than the push job's parser.

pub mod avro_file;
pub mod json_values;

use apache_avro::types::Value;

/// Whether two values are the same, bit for bit: floats and doubles compare by their bits (so
/// `-0.0` differs from `0.0`, and NaNs of any payload are the same), maps as sets of entries.
pub fn identical(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => {
            (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
        }
        (Value::Double(x), Value::Double(y)) => {
            (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
        }
        (Value::Union(i, x), Value::Union(j, y)) => i == j && identical(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| identical(a, b))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| identical(v, w)))
        }
        (Value::Record(x), Value::Record(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((n, a), (m, b))| n == m && identical(a, b))
        }
        _ => a == b,
    }
}
