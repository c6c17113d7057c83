//! Whether a value read back is the value a JSON input line gave, decided without the push
//! job's JSON converter.
//!
//! The push job parses JSON with Rialto's own number-preserving parser and converts it with
//! `rialto_protocol::avro_json`. Here the line is parsed by `serde_json` (with its exact
//! `float_roundtrip` parsing) and the value read back is *compared* with it, field by field,
//! following Avro's JSON conventions as documented for Rialto's input: numbers by value (a
//! `float` must be the `f32` nearest to the number), `bytes` and `fixed` as one character per
//! byte, unions bare or tagged, absent record fields as their defaults. A converter bug that
//! alters a value shows up as a mismatch with the path of the first differing field.

use std::collections::HashMap;

use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value;
use apache_avro::Schema;
use num_bigint::BigInt;
use serde_json::Value as JsonValue;

/// Compares values of one schema with JSON.
pub struct JsonOracle {
    schema: Schema,
    names: HashMap<Name, Schema>,
}

impl JsonOracle {
    pub fn new(schema: &Schema) -> Result<JsonOracle, String> {
        let names = ResolvedSchema::try_from(schema)
            .map_err(|e| e.to_string())?
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        Ok(JsonOracle {
            schema: schema.clone(),
            names,
        })
    }

    /// `Ok` when `value` is what `json` says; else where and how they differ.
    pub fn check(&self, value: &Value, json: &JsonValue) -> Result<(), String> {
        self.compare(&self.schema, value, json)
    }

    fn compare(&self, schema: &Schema, value: &Value, json: &JsonValue) -> Result<(), String> {
        let schema = match schema {
            Schema::Ref { name } => self
                .names
                .get(name)
                .ok_or_else(|| format!("unknown type {}", name.fullname(None)))?,
            other => other,
        };
        let differ = || Err(format!("read {value:?}, the input says {json}"));
        let same = |equal: bool| if equal { Ok(()) } else { differ() };
        match (schema, value) {
            (Schema::Null, Value::Null) => same(json.is_null()),
            (Schema::Boolean, Value::Boolean(b)) => same(json.as_bool() == Some(*b)),
            (_, Value::Int(n) | Value::Date(n) | Value::TimeMillis(n)) => {
                same(integer_is(json, i64::from(*n)))
            }
            (
                _,
                Value::Long(n)
                | Value::TimeMicros(n)
                | Value::TimestampMillis(n)
                | Value::TimestampMicros(n)
                | Value::TimestampNanos(n)
                | Value::LocalTimestampMillis(n)
                | Value::LocalTimestampMicros(n)
                | Value::LocalTimestampNanos(n),
            ) => same(integer_is(json, *n)),
            (_, Value::Double(d)) => same(double_is(json, *d)),
            (_, Value::Float(f)) => same(float_is(json, *f)),
            (_, Value::Bytes(b) | Value::Fixed(_, b)) => {
                same(latin1(json).as_deref() == Some(b.as_slice()))
            }
            (_, Value::String(s)) => same(json.as_str() == Some(s.as_str())),
            (_, Value::Uuid(u)) => same(
                json.as_str()
                    .and_then(|s| uuid::Uuid::parse_str(s).ok())
                    .is_some_and(|j| j.as_bytes() == u.as_bytes()),
            ),
            (_, Value::Enum(_, symbol)) => same(json.as_str() == Some(symbol.as_str())),
            (Schema::Decimal(d), Value::Decimal(v)) => {
                same(decimal_is(json, &BigInt::from(v.clone()), d.scale))
            }
            (_, Value::Duration(d)) => {
                let part = |name| json.get(name).and_then(JsonValue::as_u64);
                same(
                    part("months") == Some(u64::from(u32::from(d.months())))
                        && part("days") == Some(u64::from(u32::from(d.days())))
                        && part("millis") == Some(u64::from(u32::from(d.millis()))),
                )
            }
            (Schema::Array(a), Value::Array(items)) => {
                let Some(expected) = json.as_array() else {
                    return differ();
                };
                if expected.len() != items.len() {
                    return Err(format!(
                        "read {} items, the input has {}",
                        items.len(),
                        expected.len()
                    ));
                }
                for (i, (v, j)) in items.iter().zip(expected).enumerate() {
                    self.compare(&a.items, v, j)
                        .map_err(|e| format!("[{i}]: {e}"))?;
                }
                Ok(())
            }
            (Schema::Map(m), Value::Map(entries)) => {
                let Some(expected) = json.as_object() else {
                    return differ();
                };
                if expected.len() != entries.len() {
                    return Err(format!(
                        "read {} entries, the input has {}",
                        entries.len(),
                        expected.len()
                    ));
                }
                for (name, j) in expected {
                    let v = entries
                        .get(name)
                        .ok_or_else(|| format!("entry `{name}` missing"))?;
                    self.compare(&m.types, v, j)
                        .map_err(|e| format!("{name}: {e}"))?;
                }
                Ok(())
            }
            (Schema::Record(r), Value::Record(fields)) => {
                let Some(expected) = json.as_object() else {
                    return differ();
                };
                for (field, (name, v)) in r.fields.iter().zip(fields) {
                    let wanted = match (expected.get(name), &field.default) {
                        (Some(j), _) => j.clone(),
                        (None, Some(default)) => default.clone(),
                        (None, None) => JsonValue::Null, // a nullable field left out
                    };
                    self.compare(&field.schema, v, &wanted)
                        .map_err(|e| format!("{name}: {e}"))?;
                }
                Ok(())
            }
            (Schema::Union(u), Value::Union(i, inner)) => {
                let branch = u
                    .variants()
                    .get(*i as usize)
                    .ok_or_else(|| format!("union branch {i} does not exist"))?;
                let bare = self.compare(branch, inner, json);
                if bare.is_ok() {
                    return bare;
                }
                // The tagged form `{"<branch>": value}`.
                match json.as_object() {
                    Some(tagged) if tagged.len() == 1 => {
                        let inner_json = tagged.values().next().unwrap_or(&JsonValue::Null);
                        self.compare(branch, inner, inner_json)
                    }
                    _ => bare,
                }
            }
            _ => differ(),
        }
    }
}

/// Whether `json` is the integer `n`.
fn integer_is(json: &JsonValue, n: i64) -> bool {
    match json {
        JsonValue::Number(x) => match (x.as_i64(), x.as_u64(), x.as_f64()) {
            (Some(i), _, _) => i == n,
            (None, Some(u), _) => i64::try_from(u) == Ok(n),
            // `1e3` and `1000.0` are integers too, when exact.
            (None, None, Some(f)) => f.fract() == 0.0 && f.abs() < 9.0e15 && f as i64 == n,
            _ => false,
        },
        _ => false,
    }
}

fn special(json: &JsonValue) -> Option<f64> {
    match json.as_str()? {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// Whether `d` is the double nearest to the JSON number.
fn double_is(json: &JsonValue, d: f64) -> bool {
    if let Some(s) = special(json) {
        return (s.is_nan() && d.is_nan()) || s == d;
    }
    let JsonValue::Number(n) = json else {
        return false;
    };
    let Some(x) = n.as_f64() else {
        return false;
    };
    if n.is_f64() {
        x.to_bits() == d.to_bits()
    } else {
        // An integer literal: `-0` is an integer zero, the double may be either zero.
        x == d
    }
}

/// Whether `f` is the float nearest to the JSON number. The number is parsed as a double
/// first; where that lands exactly halfway between two floats, either is accepted (the literal
/// itself may lie on either side of the midpoint).
fn float_is(json: &JsonValue, f: f32) -> bool {
    if let Some(s) = special(json) {
        return (s.is_nan() && f.is_nan()) || s as f32 == f;
    }
    let Some(x) = json.as_f64() else {
        return false;
    };
    if x as f32 == f {
        return true;
    }
    let here = f64::from(f);
    let other = if x > here { f.next_up() } else { f.next_down() };
    (x - here).abs() == (f64::from(other) - x).abs()
}

/// Bytes from Avro's JSON encoding: one character U+0000–U+00FF per byte.
fn latin1(json: &JsonValue) -> Option<Vec<u8>> {
    json.as_str()?
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect()
}

/// Whether the JSON decimal (a string, exact; or a number, as exact as a double) is
/// `unscaled × 10^-scale`.
fn decimal_is(json: &JsonValue, unscaled: &BigInt, scale: usize) -> bool {
    let text = match json {
        JsonValue::String(s) => s.clone(),
        JsonValue::Number(n) => n.to_string(),
        _ => return false,
    };
    let Some((digits, exponent)) = decimal_parts(&text) else {
        return false;
    };
    // digits × 10^exponent == unscaled × 10^-scale  ⇔  digits × 10^(exponent + scale) == unscaled
    let shift = exponent + scale as i64;
    if shift >= 0 {
        digits * BigInt::from(10).pow(shift as u32) == *unscaled
    } else {
        unscaled * BigInt::from(10).pow((-shift) as u32) == digits
    }
}

fn decimal_parts(text: &str) -> Option<(BigInt, i64)> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i64>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: BigInt = format!("{whole}{fraction}").parse().ok()?;
    Some((digits, exponent.checked_sub(fraction.len() as i64)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oracle(schema: &str) -> JsonOracle {
        JsonOracle::new(&Schema::parse_str(schema).unwrap()).unwrap()
    }

    fn json(text: &str) -> JsonValue {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_double_off_by_its_last_digit_is_caught() {
        let o = oracle(r#""double""#);
        assert!(o
            .check(
                &Value::Double(0.9418320440936001),
                &json("0.9418320440936001")
            )
            .is_ok());
        // What a lossy parser stored for that literal.
        assert!(o
            .check(&Value::Double(0.9418320440936), &json("0.9418320440936001"))
            .is_err());
        assert!(o.check(&Value::Double(-0.0), &json("-0.0")).is_ok());
        assert!(o.check(&Value::Double(0.0), &json("-0.0")).is_err());
    }

    #[test]
    fn floats_longs_bytes_and_decimals() {
        assert!(oracle(r#""float""#)
            .check(&Value::Float(0.1), &json("0.10000000149011612"))
            .is_ok());
        assert!(oracle(r#""float""#)
            .check(&Value::Float(0.2), &json("0.1"))
            .is_err());
        assert!(oracle(r#""long""#)
            .check(&Value::Long(9007199254740993), &json("9007199254740993"))
            .is_ok());
        assert!(oracle(r#""long""#)
            .check(&Value::Long(9007199254740992), &json("9007199254740993"))
            .is_err());
        assert!(oracle(r#""bytes""#)
            .check(&Value::Bytes(vec![0, 0xff]), &json(r#""\u0000\u00ff""#))
            .is_ok());
        let dec = oracle(r#"{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}"#);
        let v = Value::Decimal(BigInt::from(-1234).to_signed_bytes_be().into());
        assert!(dec.check(&v, &json(r#""-12.34""#)).is_ok());
        assert!(dec.check(&v, &json(r#""-12.35""#)).is_err());
    }

    #[test]
    fn records_unions_and_maps() {
        let o = oracle(
            r#"{"type":"record","name":"R","fields":[
                {"name":"u","type":["null","double","string"]},
                {"name":"m","type":{"type":"map","values":"long"}},
                {"name":"d","type":"long","default":5}]}"#,
        );
        let v = Value::Record(vec![
            (
                "u".into(),
                Value::Union(2, Box::new(Value::String("x".into()))),
            ),
            (
                "m".into(),
                Value::Map([("a".to_string(), Value::Long(1))].into_iter().collect()),
            ),
            ("d".into(), Value::Long(5)),
        ]);
        assert!(o.check(&v, &json(r#"{"u":"x","m":{"a":1}}"#)).is_ok());
        assert!(o
            .check(&v, &json(r#"{"u":{"string":"x"},"m":{"a":1},"d":5}"#))
            .is_ok());
        let err = o.check(&v, &json(r#"{"u":"x","m":{"a":2}}"#)).unwrap_err();
        assert!(err.starts_with("m: a: "), "{err}");
    }
}
