use std::cmp::Ordering;

use num_bigint::BigInt;
use proptest::prelude::*;

use super::*;
use crate::avro::AvroCodec;

fn codec(schema: &str) -> AvroCodec {
    AvroCodec::parse(schema).unwrap()
}

fn convert(schema: &str, json: &str) -> std::result::Result<Value, String> {
    codec(schema)
        .from_json_text(json, "value")
        .map_err(|e| e.to_string())
}

/// Bitwise equality: doubles and floats compare by bits (so -0.0 differs from 0.0), NaNs of any
/// payload are equal (JSON has one NaN).
fn identical(a: &Value, b: &Value) -> bool {
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

#[test]
fn doubles_from_the_reported_push_are_exact() {
    // Both were stored with a different last digit by a JSON-lines push.
    for literal in ["0.9418320440936001", "0.9407199315086009"] {
        let v = convert(r#""double""#, literal).unwrap();
        let Value::Double(d) = v else { panic!("{v:?}") };
        let expected: f64 = literal.parse().unwrap();
        assert_eq!(d.to_bits(), expected.to_bits(), "{literal}");
        assert_eq!(format_f64(d), literal);
    }
}

#[test]
fn a_float_is_rounded_once_from_the_literal() {
    // Just above the midpoint between 1.0f32 and the next float. Through f64 the literal becomes
    // the midpoint exactly, which then rounds to even (1.0): rounded twice, wrongly.
    let literal = "1.000000059604644775390625000000001";
    let via_f64 = literal.parse::<f64>().unwrap() as f32;
    assert_eq!(via_f64, 1.0);
    let v = convert(r#""float""#, literal).unwrap();
    assert_eq!(v, Value::Float(f32::from_bits(1.0f32.to_bits() + 1)));
}

#[test]
fn longs_are_exact_or_refused() {
    assert_eq!(
        convert(r#""long""#, "9007199254740993").unwrap(),
        Value::Long(9_007_199_254_740_993)
    );
    assert_eq!(
        convert(r#""long""#, "-9223372036854775808").unwrap(),
        Value::Long(i64::MIN)
    );
    assert_eq!(convert(r#""long""#, "1e3").unwrap(), Value::Long(1000));
    assert_eq!(convert(r#""long""#, "12.000").unwrap(), Value::Long(12));
    for (bad, reason) in [
        ("9223372036854775808", "out of the range of a long"),
        ("1e19", "out of the range of a long"),
        ("1.5", "not an integer"),
        ("1e-1", "not an integer"),
        ("1e999999999999999999999", "exponent out of range"),
        ("\"12\"", "expected a long"),
    ] {
        let err = convert(r#""long""#, bad).unwrap_err();
        assert!(err.contains(reason), "{bad}: {err}");
    }
    assert!(convert(r#""int""#, "2147483648")
        .unwrap_err()
        .contains("out of the range of an int"));
}

#[test]
fn out_of_range_floats_are_refused_and_specials_are_strings() {
    assert!(convert(r#""double""#, "1e309")
        .unwrap_err()
        .contains("out of the range"));
    assert!(convert(r#""float""#, "3.5e38")
        .unwrap_err()
        .contains("out of the range"));
    let nan = convert(r#""double""#, "\"NaN\"").unwrap();
    assert!(matches!(nan, Value::Double(d) if d.is_nan()));
    assert_eq!(
        convert(r#""float""#, "\"-Infinity\"").unwrap(),
        Value::Float(f32::NEG_INFINITY)
    );
    let c = codec(r#""double""#);
    assert_eq!(
        c.to_json_text(&Value::Double(f64::INFINITY)),
        "\"Infinity\""
    );
}

#[test]
fn bytes_are_latin1_strings() {
    let v = convert(r#""bytes""#, r#""\u0000a\u00ff\u0080""#).unwrap();
    assert_eq!(v, Value::Bytes(vec![0, b'a', 0xff, 0x80]));
    assert_eq!(
        codec(r#""bytes""#).to_json_text(&v),
        "\"\\u0000a\u{ff}\u{80}\""
    );
    let err = convert(r#""bytes""#, r#""€""#).unwrap_err();
    assert!(err.contains("U+20AC"), "{err}");
    let fixed = r#"{"type":"fixed","name":"F","size":2}"#;
    assert_eq!(
        convert(fixed, r#""ab""#).unwrap(),
        Value::Fixed(2, b"ab".to_vec())
    );
    assert!(convert(fixed, r#""abc""#)
        .unwrap_err()
        .contains("holds 2 bytes"));
}

#[test]
fn unions_take_the_first_accepting_branch_or_the_tagged_form() {
    let union = r#"["null","double","string"]"#;
    assert_eq!(
        convert(union, "null").unwrap(),
        Value::Union(0, Box::new(Value::Null))
    );
    assert_eq!(
        convert(union, "2").unwrap(),
        Value::Union(1, Box::new(Value::Double(2.0)))
    );
    // A bare "NaN" is the string, never the double.
    assert_eq!(
        convert(union, "\"NaN\"").unwrap(),
        Value::Union(2, Box::new(Value::String("NaN".into())))
    );
    let tagged = convert(union, r#"{"double": "NaN"}"#).unwrap();
    assert!(matches!(&tagged, Value::Union(1, v) if matches!(**v, Value::Double(d) if d.is_nan())));
    assert_eq!(codec(union).to_json_text(&tagged), r#"{"double":"NaN"}"#);

    // A long after an int prints tagged, and reads back as the long.
    let ints = codec(r#"["int","long"]"#);
    let long = Value::Union(1, Box::new(Value::Long(5)));
    let text = ints.to_json_text(&long);
    assert_eq!(text, r#"{"long":5}"#);
    assert_eq!(ints.from_json_text(&text, "v").unwrap(), long);
    assert!(convert(r#"["null","int"]"#, "\"x\"")
        .unwrap_err()
        .contains("matches no branch of the union [null, int]"));
}

#[test]
fn records_refuse_unknown_fields_and_fill_defaults() {
    let schema = r#"{"type":"record","name":"R","namespace":"ns","fields":[
        {"name":"a","type":"long"},
        {"name":"b","type":"string","default":"dflt"},
        {"name":"c","type":["null","long"]},
        {"name":"d","type":["long","null"],"default":7},
        {"name":"e","type":"float","default":0.1}]}"#;
    let v = convert(schema, r#"{"a": 1}"#).unwrap();
    assert_eq!(
        v,
        Value::Record(vec![
            ("a".into(), Value::Long(1)),
            ("b".into(), Value::String("dflt".into())),
            ("c".into(), Value::Union(0, Box::new(Value::Null))),
            ("d".into(), Value::Union(0, Box::new(Value::Long(7)))),
            ("e".into(), Value::Float(0.1)),
        ])
    );
    let err = convert(schema, r#"{"a": 1, "z": 2}"#).unwrap_err();
    assert!(err.contains("unknown field `z`"), "{err}");
    let err = convert(schema, r#"{"b": "x"}"#).unwrap_err();
    assert!(err.contains("at `a`: missing"), "{err}");
    let err = convert(schema, r#"{"a": 1, "c": {"long": 1.5}}"#).unwrap_err();
    assert!(err.contains("at `c.long`"), "{err}");
}

#[test]
fn decimals_are_exact() {
    let schema = r#"{"type":"bytes","logicalType":"decimal","precision":20,"scale":4}"#;
    let c = codec(schema);
    for (input, printed) in [
        ("12.34", "12.3400"),
        ("\"-0.0005\"", "-0.0005"),
        ("1234567890123456.789", "1234567890123456.7890"),
        ("0", "0.0000"),
        ("-128e-4", "-0.0128"),
    ] {
        let v = c.from_json_text(input, "v").unwrap();
        assert_eq!(c.to_json_text(&v), printed, "{input}");
        let back = c.decode(&c.encode(&v, "v").unwrap(), "v").unwrap();
        assert_eq!(back, v);
    }
    let err = c.from_json_text("1.23456", "v").unwrap_err().to_string();
    assert!(
        err.contains("more than 4 digits after the decimal point"),
        "{err}"
    );
    let err = c
        .from_json_text("12345678901234567", "v")
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than 20 digits"), "{err}");
}

#[test]
fn printed_floats_are_short_and_read_back() {
    for (v, text) in [
        (3.0, "3.0"),
        (-0.0, "-0.0"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e308"),
        (0.1, "0.1"),
        (1e22, "1e22"),
        (123456.789, "123456.789"),
    ] {
        assert_eq!(format_f64(v), text);
        assert_eq!(text.parse::<f64>().unwrap().to_bits(), f64::to_bits(v));
    }
    assert_eq!(format_f32(0.1), "0.1");
    assert_eq!(format_f32(16777216.0), "16777216.0");
    assert_eq!(format_f32(1e-45), "1e-45");
}

// ---------------------------------------------------------------------------------------------
// Property tests: random schemas of every type and random values of them.

/// The shape of a random schema; rendered to JSON with unique names.
#[derive(Debug, Clone)]
enum Shape {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(usize),
    Uuid,
    Date,
    TimestampMillis,
    TimestampMicros,
    TimeMillis,
    Decimal { precision: usize, scale: usize },
    DecimalFixed { precision: usize, scale: usize },
    Duration,
    Array(Box<Shape>),
    Map(Box<Shape>),
    Record(Vec<Shape>),
    Union(Vec<Shape>),
}

impl Shape {
    /// Avro allows one branch per unnamed type in a union; named types are distinct by name.
    fn union_key(&self, i: usize) -> String {
        match self {
            Shape::Fixed(_) | Shape::Enum(_) | Shape::Record(_) => format!("named{i}"),
            Shape::Decimal { .. } | Shape::DecimalFixed { .. } => "decimal".into(),
            other => format!("{other:?}")
                .split(['(', ' '])
                .next()
                .unwrap_or("")
                .to_string(),
        }
    }

    fn render(&self, next_name: &mut usize) -> String {
        let mut name = || {
            *next_name += 1;
            format!("N{next_name}")
        };
        match self {
            Shape::Null => r#""null""#.into(),
            Shape::Boolean => r#""boolean""#.into(),
            Shape::Int => r#""int""#.into(),
            Shape::Long => r#""long""#.into(),
            Shape::Float => r#""float""#.into(),
            Shape::Double => r#""double""#.into(),
            Shape::Bytes => r#""bytes""#.into(),
            Shape::String => r#""string""#.into(),
            Shape::Fixed(size) => {
                format!(r#"{{"type":"fixed","name":"{}","size":{size}}}"#, name())
            }
            Shape::Enum(n) => {
                let symbols: Vec<String> = (0..*n).map(|i| format!("\"S{i}\"")).collect();
                format!(
                    r#"{{"type":"enum","name":"{}","symbols":[{}]}}"#,
                    name(),
                    symbols.join(",")
                )
            }
            Shape::Uuid => r#"{"type":"string","logicalType":"uuid"}"#.into(),
            Shape::Date => r#"{"type":"int","logicalType":"date"}"#.into(),
            Shape::TimeMillis => r#"{"type":"int","logicalType":"time-millis"}"#.into(),
            Shape::TimestampMillis => r#"{"type":"long","logicalType":"timestamp-millis"}"#.into(),
            Shape::TimestampMicros => r#"{"type":"long","logicalType":"timestamp-micros"}"#.into(),
            Shape::Decimal { precision, scale } => format!(
                r#"{{"type":"bytes","logicalType":"decimal","precision":{precision},"scale":{scale}}}"#
            ),
            Shape::DecimalFixed { precision, scale } => format!(
                r#"{{"type":"fixed","name":"{}","size":16,"logicalType":"decimal","precision":{precision},"scale":{scale}}}"#,
                name()
            ),
            Shape::Duration => format!(
                r#"{{"type":"fixed","name":"{}","size":12,"logicalType":"duration"}}"#,
                name()
            ),
            Shape::Array(items) => {
                format!(r#"{{"type":"array","items":{}}}"#, items.render(next_name))
            }
            Shape::Map(values) => {
                format!(r#"{{"type":"map","values":{}}}"#, values.render(next_name))
            }
            Shape::Record(fields) => {
                let record = name();
                let fields: Vec<String> = fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| format!(r#"{{"name":"f{i}","type":{}}}"#, f.render(next_name)))
                    .collect();
                format!(
                    r#"{{"type":"record","name":"{record}","namespace":"prop","fields":[{}]}}"#,
                    fields.join(",")
                )
            }
            Shape::Union(branches) => {
                let rendered: Vec<String> = branches.iter().map(|b| b.render(next_name)).collect();
                format!("[{}]", rendered.join(","))
            }
        }
    }
}

fn leaf() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Null),
        Just(Shape::Boolean),
        Just(Shape::Int),
        Just(Shape::Long),
        Just(Shape::Float),
        Just(Shape::Double),
        Just(Shape::Bytes),
        Just(Shape::String),
        (0usize..5).prop_map(Shape::Fixed),
        (1usize..4).prop_map(Shape::Enum),
        Just(Shape::Uuid),
        Just(Shape::Date),
        Just(Shape::TimeMillis),
        Just(Shape::TimestampMillis),
        Just(Shape::TimestampMicros),
        (1usize..=18, 0usize..6).prop_map(|(precision, scale)| Shape::Decimal {
            precision,
            scale: scale.min(precision)
        }),
        (1usize..=18, 0usize..6).prop_map(|(precision, scale)| Shape::DecimalFixed {
            precision,
            scale: scale.min(precision)
        }),
        Just(Shape::Duration),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|s| Shape::Array(Box::new(s))),
            inner.clone().prop_map(|s| Shape::Map(Box::new(s))),
            prop::collection::vec(inner.clone(), 1..4).prop_map(Shape::Record),
            prop::collection::vec(inner, 1..5).prop_map(|branches| {
                // No union directly in a union; one branch per unnamed type.
                let mut seen = std::collections::HashSet::new();
                let branches: Vec<Shape> = branches
                    .into_iter()
                    .enumerate()
                    .filter(|(_, b)| !matches!(b, Shape::Union(_)))
                    .filter(|(i, b)| seen.insert(b.union_key(*i)))
                    .map(|(_, b)| b)
                    .collect();
                if branches.is_empty() {
                    Shape::Union(vec![Shape::Null])
                } else {
                    Shape::Union(branches)
                }
            }),
        ]
    })
}

fn decimal_value(precision: usize) -> impl Strategy<Value = Value> {
    let bound = 10i64.pow(precision as u32);
    (-(bound - 1)..bound).prop_map(|n| Value::Decimal(BigInt::from(n).to_signed_bytes_be().into()))
}

/// Random values of `schema`.
fn value_of(schema: &Schema) -> BoxedStrategy<Value> {
    match schema {
        Schema::Null => Just(Value::Null).boxed(),
        Schema::Boolean => any::<bool>().prop_map(Value::Boolean).boxed(),
        Schema::Int => any::<i32>().prop_map(Value::Int).boxed(),
        Schema::Long => any::<i64>().prop_map(Value::Long).boxed(),
        Schema::Float => any::<u32>()
            .prop_map(|b| Value::Float(f32::from_bits(b)))
            .boxed(),
        Schema::Double => any::<u64>()
            .prop_map(|b| Value::Double(f64::from_bits(b)))
            .boxed(),
        Schema::Bytes => prop::collection::vec(any::<u8>(), 0..12)
            .prop_map(Value::Bytes)
            .boxed(),
        Schema::String => any::<String>().prop_map(Value::String).boxed(),
        Schema::Fixed(f) => {
            let size = f.size;
            prop::collection::vec(any::<u8>(), size)
                .prop_map(move |b| Value::Fixed(size, b))
                .boxed()
        }
        Schema::Enum(e) => {
            let symbols = e.symbols.clone();
            (0..symbols.len())
                .prop_map(move |i| Value::Enum(i as u32, symbols[i].clone()))
                .boxed()
        }
        Schema::Uuid => any::<u128>()
            .prop_map(|n| Value::Uuid(Uuid::from_u128(n)))
            .boxed(),
        Schema::Date => any::<i32>().prop_map(Value::Date).boxed(),
        Schema::TimeMillis => any::<i32>().prop_map(Value::TimeMillis).boxed(),
        Schema::TimestampMillis => any::<i64>().prop_map(Value::TimestampMillis).boxed(),
        Schema::TimestampMicros => any::<i64>().prop_map(Value::TimestampMicros).boxed(),
        Schema::Decimal(d) => decimal_value(d.precision).boxed(),
        Schema::Duration => (any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(m, d, n)| {
                Value::Duration(Duration::new(Months::new(m), Days::new(d), Millis::new(n)))
            })
            .boxed(),
        Schema::Array(a) => prop::collection::vec(value_of(&a.items), 0..4)
            .prop_map(Value::Array)
            .boxed(),
        Schema::Map(m) => prop::collection::hash_map(any::<String>(), value_of(&m.types), 0..4)
            .prop_map(Value::Map)
            .boxed(),
        Schema::Record(r) => {
            let names: Vec<String> = r.fields.iter().map(|f| f.name.clone()).collect();
            let fields: Vec<BoxedStrategy<Value>> =
                r.fields.iter().map(|f| value_of(&f.schema)).collect();
            fields
                .prop_map(move |values| Value::Record(names.iter().cloned().zip(values).collect()))
                .boxed()
        }
        Schema::Union(u) => {
            let branches: Vec<BoxedStrategy<Value>> = u.variants().iter().map(value_of).collect();
            let n = branches.len();
            (0..n)
                .prop_flat_map(move |i| {
                    branches[i]
                        .clone()
                        .prop_map(move |v| Value::Union(i as u32, Box::new(v)))
                })
                .boxed()
        }
        other => panic!("no generator for {other:?}"),
    }
}

fn schema_and_value() -> impl Strategy<Value = (String, Value)> {
    shape().prop_flat_map(|shape| {
        let text = shape.render(&mut 0);
        let schema = Schema::parse_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        value_of(&schema).prop_map(move |v| (text.clone(), v))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Printed JSON reads back to the same value, bit for bit, and prints the same again; other
    /// JSON parsers accept it.
    #[test]
    fn json_round_trips_exactly((schema, value) in schema_and_value()) {
        let c = codec(&schema);
        let json = c.to_json(&value).map_err(|e| TestCaseError::fail(format!("{schema}: {e}")))?;
        let text = json.to_text();
        prop_assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{}", text);
        let back = c.from_json_text(&text, "value")
            .map_err(|e| TestCaseError::fail(format!("{schema}\n{text}\n{e}")))?;
        prop_assert!(identical(&value, &back), "{}\n{}\n{:?}\n{:?}", schema, text, value, back);
        prop_assert_eq!(c.to_json_text(&back), text);
    }

    /// The binary encoding reads back (with apache_avro's decoder) to the same value, and
    /// encoding is deterministic.
    #[test]
    fn binary_round_trips_exactly((schema, value) in schema_and_value()) {
        let c = codec(&schema);
        let bytes = c.encode(&value, "value").map_err(|e| TestCaseError::fail(format!("{schema}: {e}")))?;
        let back = c.decode(&bytes, "value").map_err(|e| TestCaseError::fail(format!("{schema}: {e}")))?;
        prop_assert!(identical(&value, &back), "{}\n{:?}\n{:?}", schema, value, back);
        prop_assert_eq!(c.encode(&back, "value").unwrap(), bytes);
    }

    /// A random decimal literal becomes the double nearest to it: checked with exact integer
    /// arithmetic, not with a float parser.
    #[test]
    fn doubles_are_correctly_rounded(literal in decimal_literal(1..=25, -330..310)) {
        let c = codec(r#""double""#);
        match c.from_json_text(&literal, "v") {
            Ok(Value::Double(d)) => prop_assert!(nearest(&literal, d, next_double), "{} -> {:e}", literal, d),
            Ok(other) => prop_assert!(false, "{other:?}"),
            Err(e) => prop_assert!(e.to_string().contains("out of the range"), "{}: {}", literal, e),
        }
    }

    /// Likewise for floats, including literals right at the midpoint between two floats, where
    /// rounding through a double goes wrong.
    #[test]
    fn floats_are_rounded_once(literal in prop_oneof![decimal_literal(1..=15, -50..40), float_midpoint_literal()]) {
        let c = codec(r#""float""#);
        match c.from_json_text(&literal, "v") {
            Ok(Value::Float(f)) => prop_assert!(
                nearest(&literal, f64::from(f), |x, up| f64::from(next_float(x as f32, up))),
                "{} -> {:e}", literal, f
            ),
            Ok(other) => prop_assert!(false, "{other:?}"),
            Err(e) => prop_assert!(e.to_string().contains("out of the range"), "{}: {}", literal, e),
        }
    }
}

/// Decimal literals with `digits` significant digits and a decimal exponent in `exponent`.
fn decimal_literal(
    digits: std::ops::RangeInclusive<usize>,
    exponent: std::ops::Range<i32>,
) -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        prop::collection::vec(0u8..10, digits),
        exponent,
    )
        .prop_map(|(negative, digits, exponent)| {
            let digits: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
            let sign = if negative { "-" } else { "" };
            format!("{sign}0.{digits}e{exponent}")
        })
}

/// The exact decimal expansion of the midpoint between a random float and the next one, nudged
/// a hair up or down (or left exact).
fn float_midpoint_literal() -> impl Strategy<Value = String> {
    (1u32..0x7f00_0000, -1i32..=1).prop_map(|(bits, nudge)| {
        let low = f32::from_bits(bits);
        let high = f32::from_bits(bits + 1);
        let mid = (f64::from(low) + f64::from(high)) / 2.0; // exact: 25 significant bits
        let (mantissa, exp2) = binary_of(mid);
        let exact = exact_decimal(&mantissa, exp2);
        match nudge {
            0 => exact,
            1 => format!("{exact}000000000000000000001"),
            _ => {
                // Subtract one unit in the (extended) last place.
                let extended = format!("{exact}000000000000000000000");
                let (whole, fraction) = extended.split_once('.').unwrap_or((&extended, ""));
                let digits = format!("{whole}{fraction}");
                let n = BigInt::parse_bytes(digits.as_bytes(), 10).unwrap() - 1;
                format!("{n}e-{}", fraction.len())
            }
        }
    })
}

/// `v` as `mantissa × 2^exp2` exactly.
fn binary_of(v: f64) -> (BigInt, i64) {
    let bits = v.to_bits();
    let negative = bits >> 63 == 1;
    let exponent = ((bits >> 52) & 0x7ff) as i64;
    let fraction = bits & ((1 << 52) - 1);
    let (m, e) = if exponent == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), exponent - 1075)
    };
    let m = BigInt::from(m);
    (if negative { -m } else { m }, e)
}

/// The exact decimal text of `mantissa × 2^exp2`.
fn exact_decimal(mantissa: &BigInt, exp2: i64) -> String {
    if exp2 >= 0 {
        return (mantissa << exp2 as usize).to_string();
    }
    let k = (-exp2) as u32;
    let scaled = mantissa * BigInt::from(5).pow(k); // mantissa × 5^k / 10^k
    let negative = scaled.sign() == num_bigint::Sign::Minus;
    let digits = scaled.magnitude().to_string();
    let k = k as usize;
    let padded = if digits.len() <= k {
        format!("{}{digits}", "0".repeat(k + 1 - digits.len()))
    } else {
        digits
    };
    let point = padded.len() - k;
    format!(
        "{}{}.{}",
        if negative { "-" } else { "" },
        &padded[..point],
        &padded[point..]
    )
}

/// `literal` as `digits × 10^exp10`.
fn decimal_of(literal: &str) -> (BigInt, i64) {
    let (mantissa, exponent) = match literal.find(['e', 'E']) {
        Some(at) => (&literal[..at], literal[at + 1..].parse::<i64>().unwrap()),
        None => (literal, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = BigInt::parse_bytes(format!("{whole}{fraction}").as_bytes(), 10).unwrap();
    (digits, exponent - fraction.len() as i64)
}

/// Compares `d × 10^e10` with `m × 2^e2` exactly.
fn compare(decimal: &(BigInt, i64), binary: &(BigInt, i64)) -> Ordering {
    let (d, e10) = decimal;
    let (m, e2) = binary;
    let mut left = d.clone();
    let mut right = m.clone();
    if *e10 >= 0 {
        left *= BigInt::from(10).pow(*e10 as u32);
    } else {
        right *= BigInt::from(10).pow((-e10) as u32);
    }
    if *e2 >= 0 {
        right <<= *e2 as usize;
    } else {
        left <<= (-e2) as usize;
    }
    left.cmp(&right)
}

/// `(a + b) / 2` of two binary numbers, exactly.
fn midpoint(a: &(BigInt, i64), b: &(BigInt, i64)) -> (BigInt, i64) {
    let e = a.1.min(b.1);
    let sum = (&a.0 << (a.1 - e) as usize) + (&b.0 << (b.1 - e) as usize);
    (sum, e - 1)
}

fn next_double(x: f64, up: bool) -> f64 {
    if up {
        x.next_up()
    } else {
        x.next_down()
    }
}

fn next_float(x: f32, up: bool) -> f32 {
    if up {
        x.next_up()
    } else {
        x.next_down()
    }
}

/// Whether `chosen` is a nearest representable value to `literal` (on a tie, either neighbour
/// is accepted here; the parsers break ties to even).
fn nearest(literal: &str, chosen: f64, step: impl Fn(f64, bool) -> f64) -> bool {
    let decimal = decimal_of(literal);
    let here = binary_of(chosen);
    let below = step(chosen, false);
    let above = step(chosen, true);
    let low_ok = !below.is_finite()
        || compare(&decimal, &midpoint(&binary_of(below), &here)) != Ordering::Less;
    let high_ok = !above.is_finite()
        || compare(&decimal, &midpoint(&here, &binary_of(above))) != Ordering::Greater;
    // Zero's sign follows the literal's; its neighbours are the smallest subnormals.
    low_ok && high_ok
}
