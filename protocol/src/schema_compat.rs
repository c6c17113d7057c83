//! Whether one Avro schema can read what another wrote: Avro's schema-resolution rules, with a
//! reason that names the place where they fail.
//!
//! A store's value schemas evolve under *full* compatibility: every registered schema must read
//! what every other one wrote ([`check_full`]). So a value written with any of them can be
//! resolved to any of them: an application built for schema 1 reads values written with
//! schema 2, and one built for schema 2 reads the old values with defaults filled.
//!
//! The rules ([`can_read`]): the same primitive, or a promotion (`int` → `long`, `float`,
//! `double`; `long` → `float`, `double`; `float` → `double`; `string` ↔ `bytes`); records, enums
//! and fixed of the same unqualified name; a reader field missing from the writer needs a
//! default (writer fields the reader lacks are skipped); an enum reader needs every writer
//! symbol or a default symbol; a fixed the same size; arrays and maps by their items; a writer
//! union needs every branch readable, a reader union one branch that reads the writer. Logical
//! types must agree (a decimal's precision and scale too): resolving a `decimal(20,4)` as
//! `decimal(20,2)` would change every value's meaning without an error.

use std::collections::HashSet;
use std::fmt;

use apache_avro::schema::{Name, RecordSchema, Schema};

use crate::avro_json::{names_of, Names};

/// Why a reader cannot read a writer's data, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    /// Where, from the top of the schema: `Member.address.city`, `embedding[]`, `weights{}`.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "at `{}`: {}", self.path, self.reason)
        }
    }
}

/// Why two schemas are not fully compatible: which direction fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullIncompatibility {
    /// `true` when the new schema cannot read the old one's data; `false` for the reverse.
    pub new_reads_old: bool,
    pub cause: Incompatibility,
}

impl fmt::Display for FullIncompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direction = if self.new_reads_old {
            "the new schema cannot read values written with the registered one"
        } else {
            "values written with the new schema cannot be read with the registered one"
        };
        write!(f, "{direction}: {}", self.cause)
    }
}

/// Whether `reader` can read every datum written with `writer`.
pub fn can_read(writer: &Schema, reader: &Schema) -> Result<(), Incompatibility> {
    let names = |schema| {
        names_of(schema).map_err(|e| Incompatibility {
            path: String::new(),
            reason: format!("schema does not resolve its named types: {e}"),
        })
    };
    let writer_names = names(writer)?;
    let reader_names = names(reader)?;
    Checker {
        writer_names: &writer_names,
        reader_names: &reader_names,
        seen: HashSet::new(),
    }
    .check(writer, reader, &mut Vec::new())
}

/// Whether `new` and `old` each read what the other wrote.
pub fn check_full(new: &Schema, old: &Schema) -> Result<(), FullIncompatibility> {
    can_read(old, new).map_err(|cause| FullIncompatibility {
        new_reads_old: true,
        cause,
    })?;
    can_read(new, old).map_err(|cause| FullIncompatibility {
        new_reads_old: false,
        cause,
    })
}

struct Checker<'n> {
    writer_names: &'n Names,
    reader_names: &'n Names,
    /// Named pairs under check: a recursive type is compatible with itself if the rest is.
    seen: HashSet<(Name, Name)>,
}

/// The schema's underlying shape for resolution: a logical type with what it annotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logical {
    None,
    Decimal(usize, usize),
    Uuid,
    Date,
    TimeMillis,
    TimeMicros,
    TimestampMillis,
    TimestampMicros,
    TimestampNanos,
    LocalTimestampMillis,
    LocalTimestampMicros,
    LocalTimestampNanos,
    Duration,
    BigDecimal,
}

fn logical(schema: &Schema) -> Logical {
    match schema {
        Schema::Decimal(d) => Logical::Decimal(d.precision, d.scale),
        Schema::Uuid => Logical::Uuid,
        Schema::Date => Logical::Date,
        Schema::TimeMillis => Logical::TimeMillis,
        Schema::TimeMicros => Logical::TimeMicros,
        Schema::TimestampMillis => Logical::TimestampMillis,
        Schema::TimestampMicros => Logical::TimestampMicros,
        Schema::TimestampNanos => Logical::TimestampNanos,
        Schema::LocalTimestampMillis => Logical::LocalTimestampMillis,
        Schema::LocalTimestampMicros => Logical::LocalTimestampMicros,
        Schema::LocalTimestampNanos => Logical::LocalTimestampNanos,
        Schema::Duration => Logical::Duration,
        Schema::BigDecimal => Logical::BigDecimal,
        _ => Logical::None,
    }
}

/// A short name of the schema's type for messages.
fn kind(schema: &Schema) -> String {
    match schema {
        Schema::Null => "null".into(),
        Schema::Boolean => "boolean".into(),
        Schema::Int => "int".into(),
        Schema::Long => "long".into(),
        Schema::Float => "float".into(),
        Schema::Double => "double".into(),
        Schema::Bytes => "bytes".into(),
        Schema::String => "string".into(),
        Schema::Array(_) => "array".into(),
        Schema::Map(_) => "map".into(),
        Schema::Union(_) => "union".into(),
        Schema::Record(r) => format!("record `{}`", r.name.name),
        Schema::Enum(e) => format!("enum `{}`", e.name.name),
        Schema::Fixed(f) => format!("fixed `{}` of {} bytes", f.name.name, f.size),
        Schema::Decimal(d) => format!("decimal({},{})", d.precision, d.scale),
        Schema::Ref { name } => format!("`{}`", name.name),
        other => format!("{:?}", logical(other)).to_lowercase(),
    }
}

fn promotes(writer: &Schema, reader: &Schema) -> bool {
    use Schema::*;
    matches!(
        (writer, reader),
        (Int, Long | Float | Double)
            | (Long, Float | Double)
            | (Float, Double)
            | (String, Bytes)
            | (Bytes, String)
    )
}

impl Checker<'_> {
    fn deref<'a>(&self, schema: &'a Schema, names: &'a Names) -> &'a Schema {
        match schema {
            Schema::Ref { name } => names.get(name).unwrap_or(schema),
            other => other,
        }
    }

    fn fail(path: &[String], reason: String) -> Result<(), Incompatibility> {
        let mut joined = String::new();
        for (i, step) in path.iter().enumerate() {
            if i > 0 && !step.starts_with('[') && !step.starts_with('{') {
                joined.push('.');
            }
            joined.push_str(step);
        }
        Err(Incompatibility {
            path: joined,
            reason,
        })
    }

    fn check(
        &mut self,
        writer: &Schema,
        reader: &Schema,
        path: &mut Vec<String>,
    ) -> Result<(), Incompatibility> {
        let writer = self.deref(writer, self.writer_names);
        let reader = self.deref(reader, self.reader_names);
        match (writer, reader) {
            (Schema::Union(w), _) => {
                for (i, branch) in w.variants().iter().enumerate() {
                    if let Err(e) = self.check(branch, reader, path) {
                        let reason = format!(
                            "writer union branch {i} ({}) cannot be read: {}",
                            kind(self.deref(branch, self.writer_names)),
                            e.reason
                        );
                        return Err(Incompatibility { reason, ..e });
                    }
                }
                Ok(())
            }
            (_, Schema::Union(r)) => {
                // Avro picks the first branch of the same type, else the first it can promote to;
                // any readable branch means the datum resolves.
                for branch in r.variants() {
                    let mut trial = Checker {
                        writer_names: self.writer_names,
                        reader_names: self.reader_names,
                        seen: self.seen.clone(),
                    };
                    if trial.check(writer, branch, path).is_ok() {
                        return Ok(());
                    }
                }
                Self::fail(
                    path,
                    format!(
                        "no branch of the reader's union reads the writer's {}",
                        kind(writer)
                    ),
                )
            }
            (Schema::Record(w), Schema::Record(r)) => self.records(w, r, path),
            (Schema::Enum(w), Schema::Enum(r)) => {
                if w.name.name != r.name.name {
                    return Self::fail(
                        path,
                        format!("enum `{}` is read as enum `{}`", w.name.name, r.name.name),
                    );
                }
                if r.default.is_some() {
                    return Ok(());
                }
                match w.symbols.iter().find(|s| !r.symbols.contains(s)) {
                    Some(symbol) => Self::fail(
                        path,
                        format!(
                            "enum symbol `{symbol}` is missing from the reader, which has no default symbol"
                        ),
                    ),
                    None => Ok(()),
                }
            }
            (Schema::Fixed(w), Schema::Fixed(r)) => {
                if w.name.name != r.name.name || w.size != r.size {
                    return Self::fail(
                        path,
                        format!("{} is read as {}", kind(writer), kind(reader)),
                    );
                }
                Ok(())
            }
            (Schema::Array(w), Schema::Array(r)) => {
                path.push("[]".into());
                let result = self.check(&w.items, &r.items, path);
                path.pop();
                result
            }
            (Schema::Map(w), Schema::Map(r)) => {
                path.push("{}".into());
                let result = self.check(&w.types, &r.types, path);
                path.pop();
                result
            }
            (Schema::Decimal(w), Schema::Decimal(r)) => {
                if (w.precision, w.scale) != (r.precision, r.scale) {
                    return Self::fail(
                        path,
                        format!(
                            "{} is read as {}: every value would change its meaning",
                            kind(writer),
                            kind(reader)
                        ),
                    );
                }
                let (w_inner, r_inner) = (w.inner.as_ref(), r.inner.as_ref());
                match (w_inner, r_inner) {
                    (Schema::Fixed(a), Schema::Fixed(b)) if a.size != b.size => Self::fail(
                        path,
                        format!(
                            "decimal on fixed of {} bytes is read on fixed of {} bytes",
                            a.size, b.size
                        ),
                    ),
                    _ if std::mem::discriminant(w_inner) != std::mem::discriminant(r_inner) => {
                        Self::fail(
                            path,
                            format!(
                                "decimal on {} is read as decimal on {}",
                                kind(w_inner),
                                kind(r_inner)
                            ),
                        )
                    }
                    _ => Ok(()),
                }
            }
            _ if logical(writer) != Logical::None || logical(reader) != Logical::None => {
                if logical(writer) == logical(reader) {
                    Ok(())
                } else {
                    Self::fail(
                        path,
                        format!("{} is read as {}", kind(writer), kind(reader)),
                    )
                }
            }
            _ if std::mem::discriminant(writer) == std::mem::discriminant(reader)
                && !matches!(writer, Schema::Ref { .. }) =>
            {
                Ok(())
            }
            _ if promotes(writer, reader) => Ok(()),
            _ => Self::fail(
                path,
                format!("{} is read as {}", kind(writer), kind(reader)),
            ),
        }
    }

    fn records(
        &mut self,
        w: &RecordSchema,
        r: &RecordSchema,
        path: &mut Vec<String>,
    ) -> Result<(), Incompatibility> {
        let reader_aliases = r.aliases.iter().flatten().map(|a| a.name());
        if w.name.name != r.name.name && !reader_aliases.clone().any(|a| a == w.name.name) {
            return Self::fail(
                path,
                format!(
                    "record `{}` is read as record `{}`",
                    w.name.name, r.name.name
                ),
            );
        }
        if !self.seen.insert((w.name.clone(), r.name.clone())) {
            return Ok(());
        }
        if path.is_empty() {
            path.push(r.name.name.clone());
        }
        for field in &r.fields {
            let written = w.fields.iter().find(|f| {
                f.name == field.name || field.aliases.iter().flatten().any(|a| *a == f.name)
            });
            path.push(field.name.clone());
            let result = match written {
                Some(written) => self.check(&written.schema, &field.schema, path),
                None if field.default.is_some() => Ok(()),
                None => Self::fail(
                    &path[..path.len() - 1],
                    format!(
                        "field `{}` has no default, and values written without it cannot be read",
                        field.name
                    ),
                ),
            };
            path.pop();
            result?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Schema {
        Schema::parse_str(text).unwrap()
    }

    fn record(fields: &str) -> Schema {
        schema(&format!(
            r#"{{"type":"record","name":"Member","namespace":"a","fields":[{fields}]}}"#
        ))
    }

    /// `(writer, reader, compatible)` cases, each a rule of the specification.
    fn cases() -> Vec<(Schema, Schema, bool)> {
        let id = r#"{"name":"id","type":"long"}"#;
        let name_default = r#"{"name":"name","type":"string","default":""}"#;
        let name = r#"{"name":"name","type":"string"}"#;
        let p = |t: &str| schema(&format!(r#""{t}""#));
        vec![
            // Fields added and removed.
            (record(id), record(&format!("{id},{name_default}")), true),
            (record(id), record(&format!("{id},{name}")), false),
            (record(&format!("{id},{name}")), record(id), true),
            // Promotions, and their reverses.
            (p("int"), p("long"), true),
            (p("int"), p("double"), true),
            (p("long"), p("float"), true),
            (p("float"), p("double"), true),
            (p("string"), p("bytes"), true),
            (p("bytes"), p("string"), true),
            (p("long"), p("int"), false),
            (p("double"), p("float"), false),
            (p("boolean"), p("int"), false),
            // Unions.
            (p("null"), schema(r#"["null","string"]"#), true),
            (p("string"), schema(r#"["null","string"]"#), true),
            (schema(r#"["null","string"]"#), p("string"), false),
            (
                schema(r#"["null","int"]"#),
                schema(r#"["null","long"]"#),
                true,
            ),
            (
                schema(r#"["null","int","string"]"#),
                schema(r#"["null","int"]"#),
                false,
            ),
            (
                schema(r#"["null","int"]"#),
                schema(r#"["null","int","string"]"#),
                true,
            ),
            // Enums.
            (
                schema(r#"{"type":"enum","name":"E","symbols":["A","B"]}"#),
                schema(r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#),
                true,
            ),
            (
                schema(r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#),
                schema(r#"{"type":"enum","name":"E","symbols":["A","B"]}"#),
                false,
            ),
            (
                schema(r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#),
                schema(r#"{"type":"enum","name":"E","symbols":["A","B"],"default":"A"}"#),
                true,
            ),
            // Containers.
            (
                schema(r#"{"type":"array","items":"float"}"#),
                schema(r#"{"type":"array","items":"double"}"#),
                true,
            ),
            (
                schema(r#"{"type":"map","values":"double"}"#),
                schema(r#"{"type":"map","values":"float"}"#),
                false,
            ),
            (
                schema(r#"{"type":"fixed","name":"F","size":16}"#),
                schema(r#"{"type":"fixed","name":"F","size":8}"#),
                false,
            ),
            // Names.
            (
                record(id),
                schema(
                    r#"{"type":"record","name":"Other","fields":[{"name":"id","type":"long"}]}"#,
                ),
                false,
            ),
            // Logical types.
            (
                schema(r#"{"type":"bytes","logicalType":"decimal","precision":20,"scale":4}"#),
                schema(r#"{"type":"bytes","logicalType":"decimal","precision":20,"scale":2}"#),
                false,
            ),
            (
                schema(r#"{"type":"bytes","logicalType":"decimal","precision":20,"scale":4}"#),
                schema(r#"{"type":"bytes","logicalType":"decimal","precision":20,"scale":4}"#),
                true,
            ),
            (
                schema(r#"{"type":"long","logicalType":"timestamp-millis"}"#),
                schema(r#"{"type":"long","logicalType":"timestamp-micros"}"#),
                false,
            ),
            // A nested record gaining a field with a default.
            (
                record(
                    r#"{"name":"address","type":{"type":"record","name":"Address","fields":[{"name":"city","type":"string"}]}}"#,
                ),
                record(
                    r#"{"name":"address","type":{"type":"record","name":"Address","fields":[{"name":"city","type":"string"},{"name":"zip","type":["null","string"],"default":null}]}}"#,
                ),
                true,
            ),
            // A recursive record.
            (
                schema(
                    r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#,
                ),
                schema(
                    r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]},{"name":"v","type":"int","default":0}]}"#,
                ),
                true,
            ),
        ]
    }

    #[test]
    fn each_resolution_rule() {
        for (writer, reader, compatible) in cases() {
            let verdict = can_read(&writer, &reader);
            assert_eq!(
                verdict.is_ok(),
                compatible,
                "{writer:?} read as {reader:?}: {verdict:?}"
            );
        }
    }

    /// apache_avro's own checker is a second implementation of the same rules; it agrees on
    /// every case it models (it does not check logical types' parameters, and predates enum
    /// default symbols).
    #[test]
    fn agrees_with_apache_avro() {
        use apache_avro::schema_compatibility::SchemaCompatibility;
        for (writer, reader, compatible) in cases() {
            let enum_default = matches!(&reader, Schema::Enum(e) if e.default.is_some());
            if logical(&writer) != Logical::None || enum_default {
                continue;
            }
            let theirs = SchemaCompatibility::can_read(&writer, &reader);
            assert_eq!(
                theirs.is_ok(),
                compatible,
                "apache_avro on {writer:?} read as {reader:?}: {theirs:?}"
            );
        }
    }

    #[test]
    fn reasons_name_the_place() {
        let writer = record(
            r#"{"name":"address","type":{"type":"record","name":"Address","fields":[{"name":"city","type":"string"}]}}"#,
        );
        let reader = record(
            r#"{"name":"address","type":{"type":"record","name":"Address","fields":[{"name":"city","type":"string"},{"name":"zip","type":"string"}]}}"#,
        );
        let e = can_read(&writer, &reader).unwrap_err();
        assert_eq!(e.path, "Member.address");
        assert!(e.reason.contains("field `zip` has no default"), "{e}");
        let e = check_full(&writer, &reader).unwrap_err();
        assert!(!e.new_reads_old, "{e}");
        let full = check_full(&reader, &writer).unwrap_err();
        assert!(full.new_reads_old);
        assert!(
            full.to_string().contains("field `zip` has no default"),
            "{full}"
        );

        let e = can_read(
            &record(r#"{"name":"embedding","type":{"type":"array","items":"double"}}"#),
            &record(r#"{"name":"embedding","type":{"type":"array","items":"float"}}"#),
        )
        .unwrap_err();
        assert_eq!(e.path, "Member.embedding[]");
        assert_eq!(e.reason, "double is read as float");
    }
}
