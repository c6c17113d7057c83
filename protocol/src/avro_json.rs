//! Avro values to and from JSON, exactly, guided by the schema.
//!
//! The push job reads newline-delimited JSON and the CLIs print values as JSON; both go through
//! this module so that a value printed by Rialto and read back is the same value, bit for bit,
//! and a number in the input is converted once, to the type its schema asks for:
//!
//! | Avro type | JSON | exactness |
//! |---|---|---|
//! | `int`, `long`, `date`, `time-*`, `timestamp-*` | integer | refused when out of range or not an integer, never rounded; `1e3` is the integer 1000 |
//! | `double` | number | correctly rounded from the literal (`0.9418320440936001` stays itself) |
//! | `float` | number | rounded once, from the literal to the nearest `f32` |
//! | `float`, `double` special values | `"NaN"`, `"Infinity"`, `"-Infinity"` | strings, as Avro's Java JSON encoder writes them |
//! | `decimal` | number (or, outside a union, a numeric string) | exact; more digits than the scale are refused |
//! | `bytes`, `fixed` | string, one character U+0000–U+00FF per byte (Avro's JSON encoding) | exact |
//! | `string`, `uuid`, `enum` | string | exact |
//! | `record`, `map` | object | unknown record fields refused; missing ones take the schema default |
//! | `duration` | `{"months": m, "days": d, "millis": n}` | exact |
//! | union | the bare value (the first branch that accepts it), or `{"<branch>": value}` | printed tagged whenever an earlier branch would accept the bare value |
//!
//! Printed numbers are the shortest text that reads back to the same `f32`/`f64`; integers are
//! printed in full. A union branch is named by its type (`"long"`, `"array"`, `"map"`) or, for
//! named types, by its full name (`"com.example.Address"`; the short name is accepted on input).

use std::collections::HashMap;
use std::fmt::Write as _;

use apache_avro::schema::{DecimalSchema, Name, RecordSchema, UnionSchema};
use apache_avro::types::Value;
use apache_avro::{Days, Decimal, Duration, Millis, Months, Schema, Uuid};
use num_bigint::{BigInt, Sign};
use thiserror::Error;

use crate::json::Json;

/// A value that does not match its schema, and where.
#[derive(Debug, Error, PartialEq, Eq)]
pub struct ConversionError {
    /// Field names and indexes from the outside in.
    pub path: Vec<String>,
    pub detail: String,
}

impl std::fmt::Display for ConversionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.detail)
        } else {
            write!(f, "at `{}`: {}", self.path.join("."), self.detail)
        }
    }
}

impl ConversionError {
    fn new(detail: impl Into<String>) -> ConversionError {
        ConversionError {
            path: Vec::new(),
            detail: detail.into(),
        }
    }

    fn within(mut self, segment: impl Into<String>) -> ConversionError {
        self.path.insert(0, segment.into());
        self
    }
}

type Result<T> = std::result::Result<T, ConversionError>;

/// The named types of a schema, by full name.
pub type Names = HashMap<Name, Schema>;

/// Collects the named types (records, enums, fixed) of `schema`, so references resolve.
pub fn names_of(schema: &Schema) -> std::result::Result<Names, String> {
    let resolved =
        apache_avro::schema::ResolvedSchema::try_from(schema).map_err(|e| e.to_string())?;
    Ok(resolved
        .get_names()
        .iter()
        .map(|(name, schema)| (name.clone(), (*schema).clone()))
        .collect())
}

/// Converts between JSON and Avro values of one schema.
pub struct AvroJson<'a> {
    names: &'a Names,
}

/// Where a value sits: directly in a union, bare strings never mean a special float or a decimal
/// (a string branch would be shadowed).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Plain,
    UnionBranch,
}

impl<'a> AvroJson<'a> {
    pub fn new(names: &'a Names) -> AvroJson<'a> {
        AvroJson { names }
    }

    fn resolve<'s>(&'s self, schema: &'s Schema) -> Result<&'s Schema> {
        match schema {
            Schema::Ref { name } => self.names.get(name).ok_or_else(|| {
                ConversionError::new(format!("unknown named type `{}`", name.fullname(None)))
            }),
            other => Ok(other),
        }
    }

    /// Converts `json` to a value of `schema`.
    pub fn from_json(&self, schema: &Schema, json: &Json) -> Result<Value> {
        self.convert(schema, json, Place::Plain)
    }

    fn convert(&self, schema: &Schema, json: &Json, place: Place) -> Result<Value> {
        let schema = self.resolve(schema)?;
        let expected =
            |what: &str| ConversionError::new(format!("expected {what}, got {}", json.excerpt()));
        match schema {
            Schema::Null => match json {
                Json::Null => Ok(Value::Null),
                _ => Err(expected("null")),
            },
            Schema::Boolean => match json {
                Json::Bool(b) => Ok(Value::Boolean(*b)),
                _ => Err(expected("a boolean")),
            },
            Schema::Int => int(json, "an int").map(Value::Int),
            Schema::Long => long(json, "a long").map(Value::Long),
            Schema::Float => float(json, place).map(Value::Float),
            Schema::Double => double(json, place).map(Value::Double),
            Schema::Bytes => latin1(json, "bytes").map(Value::Bytes),
            Schema::String => match json {
                Json::String(s) => Ok(Value::String(s.clone())),
                _ => Err(expected("a string")),
            },
            Schema::Fixed(fixed) => {
                let bytes = latin1(json, "fixed")?;
                if bytes.len() != fixed.size {
                    return Err(ConversionError::new(format!(
                        "fixed `{}` holds {} bytes, got {}",
                        fixed.name.fullname(None),
                        fixed.size,
                        bytes.len()
                    )));
                }
                Ok(Value::Fixed(fixed.size, bytes))
            }
            Schema::Enum(e) => match json {
                Json::String(s) => match e.symbols.iter().position(|x| x == s) {
                    Some(i) => Ok(Value::Enum(i as u32, s.clone())),
                    None => Err(ConversionError::new(format!(
                        "`{s}` is not a symbol of enum `{}` ({})",
                        e.name.fullname(None),
                        e.symbols.join(", ")
                    ))),
                },
                _ => Err(expected("an enum symbol (a string)")),
            },
            Schema::Array(array) => match json {
                Json::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        self.convert(&array.items, item, Place::Plain)
                            .map_err(|e| e.within(format!("[{i}]")))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Value::Array),
                _ => Err(expected("an array")),
            },
            Schema::Map(map) => match json {
                Json::Object(members) => members
                    .iter()
                    .map(|(name, v)| {
                        self.convert(&map.types, v, Place::Plain)
                            .map(|v| (name.clone(), v))
                            .map_err(|e| e.within(name.clone()))
                    })
                    .collect::<Result<HashMap<_, _>>>()
                    .map(Value::Map),
                _ => Err(expected("an object (a map)")),
            },
            Schema::Record(record) => self.record(record, json),
            Schema::Union(union) => self.union(union, json),
            Schema::Decimal(decimal) => self.decimal(decimal, json, place),
            Schema::BigDecimal => Err(ConversionError::new(
                "big-decimal values cannot be given as JSON; use decimal with a fixed scale",
            )),
            Schema::Uuid => match json {
                Json::String(s) => Uuid::parse_str(s)
                    .map(Value::Uuid)
                    .map_err(|e| ConversionError::new(format!("`{s}` is not a UUID: {e}"))),
                _ => Err(expected("a UUID string")),
            },
            Schema::Date => int(json, "a date (days since 1970-01-01)").map(Value::Date),
            Schema::TimeMillis => int(json, "a time-millis").map(Value::TimeMillis),
            Schema::TimeMicros => long(json, "a time-micros").map(Value::TimeMicros),
            Schema::TimestampMillis => long(json, "a timestamp-millis").map(Value::TimestampMillis),
            Schema::TimestampMicros => long(json, "a timestamp-micros").map(Value::TimestampMicros),
            Schema::TimestampNanos => long(json, "a timestamp-nanos").map(Value::TimestampNanos),
            Schema::LocalTimestampMillis => {
                long(json, "a local-timestamp-millis").map(Value::LocalTimestampMillis)
            }
            Schema::LocalTimestampMicros => {
                long(json, "a local-timestamp-micros").map(Value::LocalTimestampMicros)
            }
            Schema::LocalTimestampNanos => {
                long(json, "a local-timestamp-nanos").map(Value::LocalTimestampNanos)
            }
            Schema::Duration => self.duration(json),
            Schema::Ref { .. } => Err(ConversionError::new("unresolved schema reference")),
        }
    }

    fn record(&self, record: &RecordSchema, json: &Json) -> Result<Value> {
        let Json::Object(members) = json else {
            return Err(ConversionError::new(format!(
                "expected an object (record `{}`), got {}",
                record.name.fullname(None),
                json.excerpt()
            )));
        };
        if let Some((unknown, _)) = members
            .iter()
            .find(|(name, _)| !record.lookup.contains_key(name))
        {
            let known: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
            return Err(ConversionError::new(format!(
                "unknown field `{unknown}` (record `{}` has {})",
                record.name.fullname(None),
                known.join(", ")
            )));
        }
        let mut fields = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let value = match members.iter().find(|(n, _)| *n == field.name) {
                Some((_, v)) => self.convert(&field.schema, v, Place::Plain),
                None => self.missing_field(&field.schema, field.default.as_ref()),
            }
            .map_err(|e| e.within(field.name.clone()))?;
            fields.push((field.name.clone(), value));
        }
        Ok(Value::Record(fields))
    }

    /// The value of a record field absent from the input: its default (for a union, a value of
    /// the first branch, as Avro specifies), else null for a union with a null branch.
    fn missing_field(&self, schema: &Schema, default: Option<&serde_json::Value>) -> Result<Value> {
        let schema = self.resolve(schema)?;
        match (default, schema) {
            (Some(default), _) => {
                let json = Json::parse(&default.to_string())
                    .map_err(|e| ConversionError::new(format!("unreadable default: {e}")))?;
                match schema {
                    Schema::Union(union) => {
                        let first = union
                            .variants()
                            .first()
                            .ok_or_else(|| ConversionError::new("empty union has no default"))?;
                        let value = self.convert(first, &json, Place::Plain)?;
                        Ok(Value::Union(0, Box::new(value)))
                    }
                    _ => self.convert(schema, &json, Place::Plain),
                }
            }
            (None, Schema::Union(union)) => {
                match union
                    .variants()
                    .iter()
                    .position(|s| matches!(s, Schema::Null))
                {
                    Some(i) => Ok(Value::Union(i as u32, Box::new(Value::Null))),
                    None => Err(ConversionError::new("missing (the field has no default)")),
                }
            }
            (None, _) => Err(ConversionError::new("missing (the field has no default)")),
        }
    }

    fn union(&self, union: &UnionSchema, json: &Json) -> Result<Value> {
        let variants = union.variants();
        // The tagged form `{"<branch>": value}`.
        if let Json::Object(members) = json {
            if let [(tag, inner)] = members.as_slice() {
                if let Some(i) = self.branch_named(variants, tag) {
                    let value = self
                        .convert(&variants[i], inner, Place::Plain)
                        .map_err(|e| e.within(tag.clone()))?;
                    return Ok(Value::Union(i as u32, Box::new(value)));
                }
            }
        }
        for (i, branch) in variants.iter().enumerate() {
            if let Ok(value) = self.convert(branch, json, Place::UnionBranch) {
                return Ok(Value::Union(i as u32, Box::new(value)));
            }
        }
        let names: Vec<String> = variants.iter().map(|b| self.branch_name(b)).collect();
        Err(ConversionError::new(format!(
            "{} matches no branch of the union [{}]",
            json.excerpt(),
            names.join(", ")
        )))
    }

    /// The name of a union branch in the tagged form: its type's name (a logical type's own
    /// name, such as `timestamp-millis`), or a named type's full name.
    fn branch_name(&self, branch: &Schema) -> String {
        match branch {
            Schema::Record(r) => r.name.fullname(None),
            Schema::Enum(e) => e.name.fullname(None),
            Schema::Fixed(f) => f.name.fullname(None),
            Schema::Ref { name } => name.fullname(None),
            Schema::Decimal(d) => match &*d.inner {
                Schema::Fixed(f) => f.name.fullname(None),
                _ => "decimal".into(),
            },
            other => type_name(other).to_string(),
        }
    }

    fn branch_named(&self, variants: &[Schema], tag: &str) -> Option<usize> {
        if let Some(i) = variants.iter().position(|b| self.branch_name(b) == tag) {
            return Some(i);
        }
        // Named types may be tagged by their short name, logical types by their underlying
        // type's name, when that names one branch only.
        let loose: Vec<usize> = variants
            .iter()
            .enumerate()
            .filter(|(_, b)| match b {
                Schema::Record(r) => r.name.name == tag,
                Schema::Enum(e) => e.name.name == tag,
                Schema::Fixed(f) => f.name.name == tag,
                Schema::Ref { name } => name.name == tag,
                other => underlying_type_name(other) == Some(tag),
            })
            .map(|(i, _)| i)
            .collect();
        match loose.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    fn decimal(&self, decimal: &DecimalSchema, json: &Json, place: Place) -> Result<Value> {
        let literal = match json {
            Json::Number(n) => n.as_str(),
            Json::String(s) if place == Place::Plain && crate::json::is_number_literal(s) => {
                s.as_str()
            }
            _ => {
                return Err(ConversionError::new(format!(
                    "expected a decimal number, got {}",
                    json.excerpt()
                )))
            }
        };
        let unscaled = scaled_integer(literal, decimal.scale as i64, decimal.precision)
            .map_err(|e| ConversionError::new(format!("decimal {literal}: {e}")))?;
        let mut bytes = unscaled.to_signed_bytes_be();
        if let Schema::Fixed(fixed) = self.resolve(&decimal.inner)? {
            if bytes.len() > fixed.size {
                return Err(ConversionError::new(format!(
                    "decimal {literal} does not fit the {} bytes of `{}`",
                    fixed.size,
                    fixed.name.fullname(None)
                )));
            }
            let fill = if unscaled.sign() == Sign::Minus {
                0xFF
            } else {
                0
            };
            let mut extended = vec![fill; fixed.size - bytes.len()];
            extended.extend_from_slice(&bytes);
            bytes = extended;
        }
        Ok(Value::Decimal(Decimal::from(bytes)))
    }

    fn duration(&self, json: &Json) -> Result<Value> {
        let Json::Object(members) = json else {
            return Err(ConversionError::new(format!(
                "expected a duration {{\"months\": m, \"days\": d, \"millis\": n}}, got {}",
                json.excerpt()
            )));
        };
        let part = |name: &str| -> Result<u32> {
            let v = members
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| ConversionError::new(format!("duration without `{name}`")))?;
            let n = integer(v, "an unsigned 32-bit integer")?;
            u32::try_from(n).map_err(|_| {
                ConversionError::new(format!(
                    "duration `{name}` {n} is out of range (0 to 4294967295)"
                ))
            })
        };
        if let Some((unknown, _)) = members
            .iter()
            .find(|(n, _)| !matches!(n.as_str(), "months" | "days" | "millis"))
        {
            return Err(ConversionError::new(format!(
                "unknown duration member `{unknown}`"
            )));
        }
        Ok(Value::Duration(Duration::new(
            Months::new(part("months")?),
            Days::new(part("days")?),
            Millis::new(part("millis")?),
        )))
    }

    /// Converts `value` (of `schema`) to JSON that [`from_json`](Self::from_json) reads back to
    /// the same value.
    pub fn to_json(&self, schema: &Schema, value: &Value) -> Result<Json> {
        let schema = self.resolve(schema)?;
        let mismatch = || {
            ConversionError::new(format!(
                "value {value:?} does not match the schema ({})",
                self.branch_name(schema)
            ))
        };
        Ok(match (schema, value) {
            (Schema::Null, Value::Null) => Json::Null,
            (Schema::Boolean, Value::Boolean(b)) => Json::Bool(*b),
            (Schema::Int, Value::Int(n))
            | (Schema::Date, Value::Date(n) | Value::Int(n))
            | (Schema::TimeMillis, Value::TimeMillis(n) | Value::Int(n)) => {
                Json::Number(n.to_string())
            }
            (Schema::Long, Value::Long(n))
            | (Schema::TimeMicros, Value::TimeMicros(n) | Value::Long(n))
            | (Schema::TimestampMillis, Value::TimestampMillis(n) | Value::Long(n))
            | (Schema::TimestampMicros, Value::TimestampMicros(n) | Value::Long(n))
            | (Schema::TimestampNanos, Value::TimestampNanos(n) | Value::Long(n))
            | (Schema::LocalTimestampMillis, Value::LocalTimestampMillis(n) | Value::Long(n))
            | (Schema::LocalTimestampMicros, Value::LocalTimestampMicros(n) | Value::Long(n))
            | (Schema::LocalTimestampNanos, Value::LocalTimestampNanos(n) | Value::Long(n)) => {
                Json::Number(n.to_string())
            }
            (Schema::Float, Value::Float(f)) => float_json(*f as f64, format_f32(*f)),
            (Schema::Double, Value::Double(d)) => float_json(*d, format_f64(*d)),
            (Schema::Bytes, Value::Bytes(b)) | (Schema::Fixed(_), Value::Fixed(_, b)) => {
                Json::String(b.iter().map(|&b| char::from(b)).collect())
            }
            (Schema::String, Value::String(s)) => Json::String(s.clone()),
            (Schema::Uuid, Value::Uuid(u)) => Json::String(u.to_string()),
            (Schema::Uuid, Value::String(s)) => Json::String(s.clone()),
            (Schema::Enum(_), Value::Enum(_, s)) => Json::String(s.clone()),
            (Schema::Array(array), Value::Array(items)) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        self.to_json(&array.items, v)
                            .map_err(|e| e.within(format!("[{i}]")))
                    })
                    .collect::<Result<_>>()?,
            ),
            (Schema::Map(map), Value::Map(entries)) => {
                let mut names: Vec<&String> = entries.keys().collect();
                names.sort();
                Json::Object(
                    names
                        .into_iter()
                        .map(|name| {
                            self.to_json(&map.types, &entries[name])
                                .map(|v| (name.clone(), v))
                                .map_err(|e| e.within(name.clone()))
                        })
                        .collect::<Result<_>>()?,
                )
            }
            (Schema::Record(record), Value::Record(fields)) => {
                if fields.len() != record.fields.len() {
                    return Err(mismatch());
                }
                Json::Object(
                    record
                        .fields
                        .iter()
                        .zip(fields)
                        .map(|(field, (name, v))| {
                            if *name != field.name {
                                return Err(mismatch());
                            }
                            self.to_json(&field.schema, v)
                                .map(|v| (name.clone(), v))
                                .map_err(|e| e.within(name.clone()))
                        })
                        .collect::<Result<_>>()?,
                )
            }
            (Schema::Union(union), Value::Union(index, inner)) => {
                let variants = union.variants();
                let index = *index as usize;
                let branch = variants.get(index).ok_or_else(mismatch)?;
                let bare = self.to_json(branch, inner)?;
                if self.bare_reads_back(variants, index, &bare) {
                    bare
                } else {
                    Json::Object(vec![(self.branch_name(branch), bare)])
                }
            }
            (Schema::Decimal(decimal), Value::Decimal(d)) => {
                Json::Number(decimal_text(&BigInt::from(d.clone()), decimal.scale))
            }
            (Schema::BigDecimal, Value::BigDecimal(d)) => Json::String(d.to_string()),
            (Schema::Duration, Value::Duration(d)) => Json::Object(vec![
                (
                    "months".into(),
                    Json::Number(u32::from(d.months()).to_string()),
                ),
                ("days".into(), Json::Number(u32::from(d.days()).to_string())),
                (
                    "millis".into(),
                    Json::Number(u32::from(d.millis()).to_string()),
                ),
            ]),
            _ => return Err(mismatch()),
        })
    }

    /// Whether the bare JSON of branch `index` reads back as that branch: no earlier branch
    /// accepts it, and it does not look like the tagged form of some branch.
    fn bare_reads_back(&self, variants: &[Schema], index: usize, bare: &Json) -> bool {
        if let Json::Object(members) = bare {
            if let [(tag, _)] = members.as_slice() {
                if self.branch_named(variants, tag).is_some() {
                    return false;
                }
            }
        }
        self.convert(&variants[index], bare, Place::UnionBranch)
            .is_ok()
            && !variants[..index]
                .iter()
                .any(|earlier| self.convert(earlier, bare, Place::UnionBranch).is_ok())
    }
}

/// The name of an unnamed type (logical types by their logical name).
fn type_name(schema: &Schema) -> &'static str {
    match schema {
        Schema::Null => "null",
        Schema::Boolean => "boolean",
        Schema::Int => "int",
        Schema::Long => "long",
        Schema::Float => "float",
        Schema::Double => "double",
        Schema::Bytes => "bytes",
        Schema::String => "string",
        Schema::Array(_) => "array",
        Schema::Map(_) => "map",
        Schema::Union(_) => "union",
        Schema::Decimal(_) => "decimal",
        Schema::BigDecimal => "big-decimal",
        Schema::Uuid => "uuid",
        Schema::Date => "date",
        Schema::TimeMillis => "time-millis",
        Schema::TimeMicros => "time-micros",
        Schema::TimestampMillis => "timestamp-millis",
        Schema::TimestampMicros => "timestamp-micros",
        Schema::TimestampNanos => "timestamp-nanos",
        Schema::LocalTimestampMillis => "local-timestamp-millis",
        Schema::LocalTimestampMicros => "local-timestamp-micros",
        Schema::LocalTimestampNanos => "local-timestamp-nanos",
        Schema::Duration => "duration",
        Schema::Record(_) => "record",
        Schema::Enum(_) => "enum",
        Schema::Fixed(_) => "fixed",
        Schema::Ref { .. } => "reference",
    }
}

/// The primitive a logical type is written as (`None` for other types).
fn underlying_type_name(schema: &Schema) -> Option<&'static str> {
    match schema {
        Schema::Date | Schema::TimeMillis => Some("int"),
        Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Some("long"),
        Schema::Uuid => Some("string"),
        Schema::BigDecimal => Some("bytes"),
        Schema::Decimal(d) if matches!(*d.inner, Schema::Bytes) => Some("bytes"),
        Schema::Duration => Some("fixed"),
        _ => None,
    }
}

/// A float or double as JSON: a number, or the strings Avro's JSON encoder uses for the special
/// values.
fn float_json(v: f64, text: String) -> Json {
    if v.is_nan() {
        Json::String("NaN".into())
    } else if v.is_infinite() {
        Json::String(if v > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        Json::Number(text)
    }
}

/// The shortest text that reads back to `v` (as an `f64`): plain notation for ordinary
/// magnitudes (with `.0` on integral values), exponent notation for very large or small ones.
pub fn format_f64(v: f64) -> String {
    format_float(v.abs(), || format!("{v}"), || format!("{v:e}"))
}

/// The shortest text that reads back to `v` as an `f32`.
pub fn format_f32(v: f32) -> String {
    format_float(f64::from(v.abs()), || format!("{v}"), || format!("{v:e}"))
}

fn format_float(
    magnitude: f64,
    plain: impl Fn() -> String,
    exponent: impl Fn() -> String,
) -> String {
    let text = if magnitude == 0.0 || (1e-5..1e16).contains(&magnitude) {
        plain()
    } else {
        exponent()
    };
    if text.contains(['.', 'e', 'E']) || !text.bytes().any(|b| b.is_ascii_digit()) {
        text
    } else {
        text + ".0"
    }
}

fn float(json: &Json, place: Place) -> Result<f32> {
    match json {
        Json::Number(literal) => {
            let v: f32 = literal
                .parse()
                .map_err(|e| ConversionError::new(format!("`{literal}` is not a float: {e}")))?;
            if v.is_infinite() {
                return Err(ConversionError::new(format!(
                    "{literal} is out of the range of a float"
                )));
            }
            Ok(v)
        }
        Json::String(s) if place == Place::Plain => special(s).map(|v| v as f32).ok_or_else(|| {
            ConversionError::new(format!(
                "expected a float, got the string {}",
                json.excerpt()
            ))
        }),
        _ => Err(ConversionError::new(format!(
            "expected a float, got {}",
            json.excerpt()
        ))),
    }
}

fn double(json: &Json, place: Place) -> Result<f64> {
    match json {
        Json::Number(literal) => {
            let v: f64 = literal
                .parse()
                .map_err(|e| ConversionError::new(format!("`{literal}` is not a double: {e}")))?;
            if v.is_infinite() {
                return Err(ConversionError::new(format!(
                    "{literal} is out of the range of a double"
                )));
            }
            Ok(v)
        }
        Json::String(s) if place == Place::Plain => special(s).ok_or_else(|| {
            ConversionError::new(format!(
                "expected a double, got the string {}",
                json.excerpt()
            ))
        }),
        _ => Err(ConversionError::new(format!(
            "expected a double, got {}",
            json.excerpt()
        ))),
    }
}

fn special(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

fn int(json: &Json, what: &str) -> Result<i32> {
    let n = integer(json, what)?;
    i32::try_from(n).map_err(|_| {
        ConversionError::new(format!(
            "{n} is out of the range of an int ({} to {})",
            i32::MIN,
            i32::MAX
        ))
    })
}

fn long(json: &Json, what: &str) -> Result<i64> {
    let n = integer(json, what)?;
    i64::try_from(n).map_err(|_| {
        ConversionError::new(format!(
            "{n} is out of the range of a long ({} to {})",
            i64::MIN,
            i64::MAX
        ))
    })
}

/// An integer literal's exact value (`1e3` and `1000.0` are integers; `1.5` is not).
fn integer(json: &Json, what: &str) -> Result<i128> {
    let Json::Number(literal) = json else {
        return Err(ConversionError::new(format!(
            "expected {what}, got {}",
            json.excerpt()
        )));
    };
    if let Ok(n) = literal.parse::<i64>() {
        return Ok(i128::from(n));
    }
    let scaled = scaled_integer(literal, 0, 40)
        .map_err(|e| ConversionError::new(format!("expected {what}, got {literal}: {e}")))?;
    i128::try_from(scaled)
        .map_err(|_| ConversionError::new(format!("{literal} is out of range for {what}")))
}

/// `literal × 10^scale` as an exact integer of at most `precision` digits.
fn scaled_integer(
    literal: &str,
    scale: i64,
    precision: usize,
) -> std::result::Result<BigInt, String> {
    if !crate::json::is_number_literal(literal) {
        return Err("not a number".into());
    }
    let (negative, unsigned) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (
            &unsigned[..at],
            unsigned[at + 1..]
                .parse::<i64>()
                .map_err(|_| "exponent out of range".to_string())?,
        ),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = format!("{whole}{fraction}");
    let mut exp10 = exponent
        .checked_sub(fraction.len() as i64)
        .and_then(|e| e.checked_add(scale))
        .ok_or("exponent out of range")?;
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Ok(BigInt::from(0));
    }
    digits = significant.to_string();
    if exp10 < 0 {
        let drop = exp10.unsigned_abs() as usize;
        if drop > digits.len() || !digits[digits.len() - drop..].bytes().all(|b| b == b'0') {
            return Err(if scale == 0 {
                "not an integer".into()
            } else {
                format!("more than {scale} digits after the decimal point")
            });
        }
        digits.truncate(digits.len() - drop);
        exp10 = 0;
    }
    let digits_total = digits.len() as i64 + exp10;
    if digits_total > precision as i64 {
        return Err(format!("more than {precision} digits"));
    }
    digits.extend(std::iter::repeat_n('0', exp10 as usize));
    let mut value =
        BigInt::parse_bytes(digits.as_bytes(), 10).ok_or_else(|| "not a number".to_string())?;
    if negative {
        value = -value;
    }
    Ok(value)
}

/// `unscaled × 10^-scale` in plain notation with exactly `scale` digits after the point.
fn decimal_text(unscaled: &BigInt, scale: usize) -> String {
    let digits = unscaled.magnitude().to_string();
    let mut out = String::new();
    if unscaled.sign() == Sign::Minus {
        out.push('-');
    }
    if scale == 0 {
        out.push_str(&digits);
        return out;
    }
    let padded = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
    } else {
        digits
    };
    let point = padded.len() - scale;
    let _ = write!(out, "{}.{}", &padded[..point], &padded[point..]);
    out
}

/// Bytes from Avro's JSON encoding of `bytes` and `fixed`: one character U+0000–U+00FF per byte.
fn latin1(json: &Json, what: &str) -> Result<Vec<u8>> {
    let Json::String(s) = json else {
        return Err(ConversionError::new(format!(
            "expected {what} as a string of characters U+0000 to U+00FF, got {}",
            json.excerpt()
        )));
    };
    s.chars()
        .map(|c| {
            u8::try_from(u32::from(c)).map_err(|_| {
                ConversionError::new(format!(
                    "{what} in JSON is one character U+0000 to U+00FF per byte; `{c}` (U+{:04X}) is not a byte",
                    u32::from(c)
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
