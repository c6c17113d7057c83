//! Read compute: a declarative request the client builds and the servers execute on stored
//! values, answering per key only the results and the projected fields.
//!
//! A request names the value schema its fields refer to (`reader_schema_id`); the server decodes
//! each value with the schema it was written with and resolves it to that one first, so a field
//! an older value lacks reads as its default. Operations, in the order given:
//!
//! | operation | field | result |
//! |---|---|---|
//! | `project` | any | the field's value (its datum in the reader schema) |
//! | `dot_product` | array of numbers | `Σ aᵢ·bᵢ` as a double |
//! | `cosine_similarity` | array of numbers | `Σ aᵢ·bᵢ / (‖a‖·‖b‖)` as a double |
//! | `hadamard_product` | array of numbers | `[aᵢ·bᵢ]` as an array of floats |
//! | `count` | array or map | its number of elements as a long |
//!
//! Arithmetic is in `f64` (each element and each vector component widened to `f64` first). A
//! sum (a dot product, a norm) adds element `i` to partial sum `i mod 4` and then adds the
//! partial sums as `(s₀ + s₁) + (s₂ + s₃)`: four independent chains the processor overlaps, and
//! one fixed order, so a result is the same bits on every server and in the client's own
//! computation. A hadamard product's elements are rounded to `f32` once.
//! A field that is a union (`["null", {"type":"array",…}]`) is used through its branch.
//!
//! A per-key problem (the field is null, not an array of numbers, of another length than the
//! vector, a zero vector for a cosine, a result over [`RESULT_BYTES_MAX`]) is an error *of that
//! operation for that key*, carried in the key's result, never a failed request. A request
//! naming a field the reader schema does not have is refused as a whole ([`Plan::new`]).
//!
//! Wire (inside the body of `POST /v1/compute/{store}/{version}`, see [`crate::wire`]):
//! request = `format u8 ‖ reader_schema_id u32 ‖ count u16 ‖ operation*`, operation =
//! `kind u8 ‖ field ‖ result name (not for project) ‖ vector (vector operations)`, strings and
//! vectors u32-length-prefixed, floats big-endian. A key's result = one entry per operation:
//! `0 ‖ value` or `1 ‖ message`, where value is a projection's datum (length-prefixed), an `f64`,
//! a hadamard product's `u32` count and `f32`s, or a count's `u64`.

use std::collections::HashSet;

use apache_avro::schema::Schema;
use apache_avro::types::Value;

use crate::avro::{AvroCodec, AvroError};
use crate::avro_skip::{
    named, skip, skip_map_entries, skip_n, take, varint, walk_blocks, zero_size,
};
use crate::envelope::{EnvelopeError, Reader};

/// Format byte of an encoded compute request.
pub const COMPUTE_FORMAT: u8 = 1;
/// Most operations in one request.
pub const OPERATIONS_MAX: usize = 32;
/// Most components of one operation's vector.
pub const VECTOR_LEN_MAX: usize = 16_384;
/// Longest field or result name.
pub const NAME_BYTES_MAX: usize = 256;
/// Largest result of one key (all its operations); a result that would be larger carries a
/// per-key error for the operation that overflowed it.
pub const RESULT_BYTES_MAX: usize = 1024 * 1024;

/// One operation of a compute request.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Project {
        field: String,
    },
    DotProduct {
        field: String,
        vector: Vec<f32>,
        result: String,
    },
    CosineSimilarity {
        field: String,
        vector: Vec<f32>,
        result: String,
    },
    HadamardProduct {
        field: String,
        vector: Vec<f32>,
        result: String,
    },
    Count {
        field: String,
        result: String,
    },
}

impl Operation {
    fn kind(&self) -> u8 {
        match self {
            Operation::Project { .. } => 1,
            Operation::DotProduct { .. } => 2,
            Operation::CosineSimilarity { .. } => 3,
            Operation::HadamardProduct { .. } => 4,
            Operation::Count { .. } => 5,
        }
    }

    /// The field the operation reads.
    pub fn field(&self) -> &str {
        match self {
            Operation::Project { field }
            | Operation::DotProduct { field, .. }
            | Operation::CosineSimilarity { field, .. }
            | Operation::HadamardProduct { field, .. }
            | Operation::Count { field, .. } => field,
        }
    }

    /// The name its result goes by: the field for a projection.
    pub fn result_name(&self) -> &str {
        match self {
            Operation::Project { field } => field,
            Operation::DotProduct { result, .. }
            | Operation::CosineSimilarity { result, .. }
            | Operation::HadamardProduct { result, .. }
            | Operation::Count { result, .. } => result,
        }
    }

    fn vector(&self) -> Option<&[f32]> {
        match self {
            Operation::DotProduct { vector, .. }
            | Operation::CosineSimilarity { vector, .. }
            | Operation::HadamardProduct { vector, .. } => Some(vector),
            _ => None,
        }
    }
}

/// A compute request: the schema its fields refer to and the operations.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ComputeRequest {
    pub reader_schema_id: u32,
    pub operations: Vec<Operation>,
}

/// Why a compute request is refused as a whole.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ComputeError {
    #[error("malformed compute request: {0}")]
    Malformed(#[from] EnvelopeError),
    #[error("unsupported compute request format {0}")]
    UnsupportedFormat(u8),
    #[error("invalid compute request: {0}")]
    Invalid(String),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn name<'a>(r: &mut Reader<'a>, what: &'static str) -> Result<String, ComputeError> {
    let bytes = r.bytes(what, NAME_BYTES_MAX)?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ComputeError::Invalid(format!("{what} is not UTF-8")))
}

impl ComputeRequest {
    /// Checks the limits and that result names are unique.
    pub fn validate(&self) -> Result<(), ComputeError> {
        let invalid = |m: String| Err(ComputeError::Invalid(m));
        if self.operations.is_empty() {
            return invalid("no operations".into());
        }
        if self.operations.len() > OPERATIONS_MAX {
            return invalid(format!(
                "{} operations, more than the limit of {OPERATIONS_MAX}",
                self.operations.len()
            ));
        }
        let mut names = HashSet::new();
        for op in &self.operations {
            for (what, s) in [("field", op.field()), ("result name", op.result_name())] {
                if s.is_empty() || s.len() > NAME_BYTES_MAX {
                    return invalid(format!("{what} `{s}` must be 1 to {NAME_BYTES_MAX} bytes"));
                }
            }
            if let Some(v) = op.vector() {
                if v.is_empty() || v.len() > VECTOR_LEN_MAX {
                    return invalid(format!(
                        "the vector of `{}` has {} components; 1 to {VECTOR_LEN_MAX} are allowed",
                        op.result_name(),
                        v.len()
                    ));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return invalid(format!(
                        "the vector of `{}` holds a NaN or an infinity",
                        op.result_name()
                    ));
                }
            }
            if !names.insert(op.result_name()) {
                return invalid(format!(
                    "two operations give results named `{}`",
                    op.result_name()
                ));
            }
        }
        Ok(())
    }

    /// The wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![COMPUTE_FORMAT];
        out.extend_from_slice(&self.reader_schema_id.to_be_bytes());
        out.extend_from_slice(&(self.operations.len() as u16).to_be_bytes());
        for op in &self.operations {
            out.push(op.kind());
            put_str(&mut out, op.field());
            if !matches!(op, Operation::Project { .. }) {
                put_str(&mut out, op.result_name());
            }
            if let Some(v) = op.vector() {
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                for x in v {
                    out.extend_from_slice(&x.to_be_bytes());
                }
            }
        }
        out
    }

    /// Decodes and validates a request; `bytes` must hold it exactly.
    pub fn decode(bytes: &[u8]) -> Result<ComputeRequest, ComputeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8()?;
        if format != COMPUTE_FORMAT {
            return Err(ComputeError::UnsupportedFormat(format));
        }
        let reader_schema_id = r.u32()?;
        let count = r.u16()? as usize;
        if count > OPERATIONS_MAX {
            return Err(ComputeError::Invalid(format!(
                "{count} operations, more than the limit of {OPERATIONS_MAX}"
            )));
        }
        let mut operations = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = r.u8()?;
            let field = name(&mut r, "field")?;
            if kind == 1 {
                operations.push(Operation::Project { field });
                continue;
            }
            let result = name(&mut r, "result name")?;
            let mut vector = || -> Result<Vec<f32>, ComputeError> {
                let n = r.u32()? as usize;
                if n > VECTOR_LEN_MAX {
                    return Err(ComputeError::Invalid(format!(
                        "a vector of {n} components, more than the limit of {VECTOR_LEN_MAX}"
                    )));
                }
                let raw = r.take(n * 4)?;
                Ok(raw
                    .chunks_exact(4)
                    .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            operations.push(match kind {
                2 => Operation::DotProduct {
                    field,
                    vector: vector()?,
                    result,
                },
                3 => Operation::CosineSimilarity {
                    field,
                    vector: vector()?,
                    result,
                },
                4 => Operation::HadamardProduct {
                    field,
                    vector: vector()?,
                    result,
                },
                5 => Operation::Count { field, result },
                other => {
                    return Err(ComputeError::Invalid(format!(
                        "unknown operation kind {other}"
                    )))
                }
            });
        }
        if r.remaining() != 0 {
            return Err(EnvelopeError::TrailingBytes(r.remaining()).into());
        }
        let request = ComputeRequest {
            reader_schema_id,
            operations,
        };
        request.validate()?;
        Ok(request)
    }
}

/// One key's compute results, decoded: `(result name, value or error)` per operation.
pub type DecodedResults = Vec<(String, Result<Value, String>)>;

/// A request checked against its reader schema: each operation's field position and schema.
#[derive(Debug, Clone)]
pub struct Plan {
    request: ComputeRequest,
    /// `(position in the record, field schema)` per operation.
    fields: Vec<(usize, Schema)>,
    /// The norm of each operation's vector (zero for operations without one).
    vector_norms: Vec<f64>,
    /// The fields' positions in the reader schema's own values.
    own: WriterLayout,
}

impl Plan {
    /// Refuses a request whose reader schema is not a record, or that names a field the
    /// schema lacks.
    pub fn new(reader: &AvroCodec, request: ComputeRequest) -> Result<Plan, ComputeError> {
        request.validate()?;
        let Schema::Record(record) = reader.schema() else {
            return Err(ComputeError::Invalid(format!(
                "value schema {} is not a record: compute needs named fields",
                request.reader_schema_id
            )));
        };
        let mut fields = Vec::with_capacity(request.operations.len());
        for op in &request.operations {
            let position = record.lookup.get(op.field()).copied().ok_or_else(|| {
                let known: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
                ComputeError::Invalid(format!(
                    "value schema {} has no field `{}` (fields: {})",
                    request.reader_schema_id,
                    op.field(),
                    known.join(", ")
                ))
            })?;
            fields.push((position, record.fields[position].schema.clone()));
        }
        let vector_norms = request
            .operations
            .iter()
            .map(|op| op.vector().map_or(0.0, norm_f32))
            .collect();
        let own = WriterLayout {
            positions: fields.iter().map(|(p, _)| *p).collect(),
        };
        Ok(Plan {
            request,
            fields,
            vector_norms,
            own,
        })
    }

    pub fn request(&self) -> &ComputeRequest {
        &self.request
    }

    /// Appends the result of every operation on `value` (a record of the reader schema) to
    /// `out`. Never fails: what goes wrong is the operation's error, in the result.
    pub fn evaluate(&self, reader: &AvroCodec, value: &Value, out: &mut Vec<u8>) {
        let start = out.len();
        let record = match value {
            Value::Record(fields) => Some(fields),
            _ => None,
        };
        let planned = self.fields.iter().zip(&self.vector_norms);
        for (op, ((position, schema), norm_b)) in self.request.operations.iter().zip(planned) {
            let field = record.and_then(|r| r.get(*position)).map(|(_, v)| v);
            let Some(field) = field else {
                put_error(out, &format!("the value has no field `{}`", op.field()));
                continue;
            };
            let budget = RESULT_BYTES_MAX.saturating_sub(out.len() - start);
            match evaluate_one(reader, op, schema, field, *norm_b, budget) {
                Ok(bytes) => {
                    out.push(0);
                    out.extend_from_slice(&bytes);
                }
                Err(message) => put_error(out, &message),
            }
        }
    }

    /// Like [`evaluate`](Self::evaluate), on a datum written with the reader schema itself,
    /// without decoding it: fields the operations do not read are skipped, a projected field's
    /// bytes are copied and arrays of numbers read in place. `false` when the datum needs the
    /// general path (an operation fails on it, or it does not parse): `out` is then as it was.
    pub fn evaluate_datum(&self, reader: &AvroCodec, datum: &[u8], out: &mut Vec<u8>) -> bool {
        self.evaluate_in_place(reader, &self.own.positions, datum, out)
    }

    /// Where each operation's field is in values written with `writer` (another registered
    /// schema), when every one is there with exactly the schema the reader gives it, naming
    /// no other type: such values are evaluated in place too ([`Plan::evaluate_written`]),
    /// since resolving them to the reader schema would not change those fields' bytes.
    /// `None`: values of that schema take the general path (decode, resolve, evaluate).
    pub fn layout_of(&self, writer: &AvroCodec) -> Option<WriterLayout> {
        let Schema::Record(record) = writer.schema() else {
            return None;
        };
        let positions = self
            .request
            .operations
            .iter()
            .zip(&self.fields)
            .map(|(op, (_, reader_schema))| {
                let position = *record.lookup.get(op.field())?;
                let written = &record.fields[position].schema;
                (self_contained(reader_schema) && written == reader_schema).then_some(position)
            })
            .collect::<Option<Vec<usize>>>()?;
        Some(WriterLayout { positions })
    }

    /// Like [`evaluate_datum`](Self::evaluate_datum), on a datum written with `writer`, whose
    /// [`layout_of`](Self::layout_of) is `layout`.
    pub fn evaluate_written(
        &self,
        writer: &AvroCodec,
        layout: &WriterLayout,
        datum: &[u8],
        out: &mut Vec<u8>,
    ) -> bool {
        self.evaluate_in_place(writer, &layout.positions, datum, out)
    }

    /// Evaluates in place a datum of `codec`'s record whose fields the operations read are at
    /// `positions` (one per operation).
    fn evaluate_in_place(
        &self,
        codec: &AvroCodec,
        positions: &[usize],
        datum: &[u8],
        out: &mut Vec<u8>,
    ) -> bool {
        let start = out.len();
        let ok = self
            .try_evaluate_datum(codec, positions, datum, out)
            .is_some();
        if !ok || out.len() - start > RESULT_BYTES_MAX {
            out.truncate(start);
            return false;
        }
        true
    }

    fn try_evaluate_datum(
        &self,
        codec: &AvroCodec,
        positions: &[usize],
        datum: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let Schema::Record(record) = codec.schema() else {
            return None;
        };
        let names = codec.names();
        // The byte range of each field an operation reads (on the stack for the first 16).
        let last = positions.iter().copied().max()?;
        let mut inline = [(0usize, 0usize); 16];
        let mut spilled = Vec::new();
        let ranges: &mut [(usize, usize)] = if last < inline.len() {
            &mut inline[..=last]
        } else {
            spilled.resize(last + 1, (0, 0));
            &mut spilled
        };
        let mut pos = 0;
        for (i, field) in record.fields.iter().enumerate().take(last + 1) {
            let begin = pos;
            skip(&field.schema, names, datum, &mut pos)?;
            ranges[i] = (begin, pos);
        }
        let planned = self.fields.iter().zip(&self.vector_norms).zip(positions);
        for (op, (((_, schema), norm_b), position)) in self.request.operations.iter().zip(planned) {
            let (begin, end) = ranges[*position];
            let bytes = &datum[begin..end];
            out.push(0);
            match op {
                Operation::Project { .. } => {
                    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                    out.extend_from_slice(bytes);
                }
                Operation::DotProduct { vector, .. } => {
                    let a = Numbers::read(schema, names, bytes)?;
                    (a.len() == vector.len()).then_some(())?;
                    out.extend_from_slice(&a.dot(vector).to_bits().to_be_bytes());
                }
                Operation::CosineSimilarity { vector, .. } => {
                    let a = Numbers::read(schema, names, bytes)?;
                    (a.len() == vector.len()).then_some(())?;
                    let norm_a = a.norm();
                    (norm_a != 0.0 && *norm_b != 0.0).then_some(())?;
                    let cos = a.dot(vector) / (norm_a * norm_b);
                    out.extend_from_slice(&cos.to_bits().to_be_bytes());
                }
                Operation::HadamardProduct { vector, .. } => {
                    let a = Numbers::read(schema, names, bytes)?;
                    (a.len() == vector.len()).then_some(())?;
                    out.extend_from_slice(&(a.len() as u32).to_be_bytes());
                    out.reserve(4 * a.len());
                    for (i, y) in vector.iter().enumerate() {
                        let x = a.get(i);
                        out.extend_from_slice(&((x * f64::from(*y)) as f32).to_be_bytes());
                    }
                }
                Operation::Count { .. } => {
                    let n = count_elements(schema, names, bytes)?;
                    out.extend_from_slice(&n.to_be_bytes());
                }
            }
        }
        Some(())
    }

    /// Decodes one key's result (as [`evaluate`](Self::evaluate) wrote it) into
    /// `(result name, value or error)` per operation.
    pub fn decode_result(
        &self,
        reader: &AvroCodec,
        bytes: &[u8],
    ) -> Result<DecodedResults, ComputeError> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::with_capacity(self.request.operations.len());
        for (op, (_, schema)) in self.request.operations.iter().zip(&self.fields) {
            let result = match r.u8()? {
                0 => Ok(match op {
                    Operation::Project { .. } => {
                        let datum = r.bytes("projected field", RESULT_BYTES_MAX)?;
                        reader.decode_part(schema, datum).map_err(|e| {
                            ComputeError::Invalid(format!("projected `{}`: {e}", op.field()))
                        })?
                    }
                    Operation::DotProduct { .. } | Operation::CosineSimilarity { .. } => {
                        Value::Double(f64::from_bits(r.u64()?))
                    }
                    Operation::HadamardProduct { .. } => {
                        let n = r.u32()? as usize;
                        if n > VECTOR_LEN_MAX {
                            return Err(ComputeError::Invalid(format!(
                                "a product of {n} components"
                            )));
                        }
                        let raw = r.take(n * 4)?;
                        Value::Array(
                            raw.chunks_exact(4)
                                .map(|c| Value::Float(f32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                                .collect(),
                        )
                    }
                    Operation::Count { .. } => Value::Long(r.u64()? as i64),
                }),
                1 => {
                    let message = r.bytes("error message", RESULT_BYTES_MAX)?;
                    Err(String::from_utf8_lossy(message).into_owned())
                }
                other => return Err(ComputeError::Invalid(format!("unknown result tag {other}"))),
            };
            out.push((op.result_name().to_string(), result));
        }
        if r.remaining() != 0 {
            return Err(EnvelopeError::TrailingBytes(r.remaining()).into());
        }
        Ok(out)
    }
}

fn put_error(out: &mut Vec<u8>, message: &str) {
    out.push(1);
    put_str(out, message);
}

/// The branch a union value holds, else the value.
fn unwrap_union(value: &Value) -> &Value {
    match value {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

/// The elements of an array of numbers, widened to `f64`.
fn numbers(field: &str, value: &Value) -> Result<Vec<f64>, String> {
    let items = match unwrap_union(value) {
        Value::Array(items) => items,
        Value::Null => return Err(format!("field `{field}` is null")),
        _ => return Err(format!("field `{field}` is not an array of numbers")),
    };
    items
        .iter()
        .map(|item| match unwrap_union(item) {
            Value::Float(x) => Ok(f64::from(*x)),
            Value::Double(x) => Ok(*x),
            Value::Int(x) => Ok(f64::from(*x)),
            Value::Long(x) => Ok(*x as f64),
            _ => Err(format!(
                "field `{field}` holds an element that is not a number"
            )),
        })
        .collect()
}

fn same_length(field: &str, a: &[f64], b: &[f32]) -> Result<(), String> {
    if a.len() == b.len() {
        Ok(())
    } else {
        Err(format!(
            "field `{field}` has {} elements and the vector {}",
            a.len(),
            b.len()
        ))
    }
}

/// Where a plan's fields are in values of one writer schema ([`Plan::layout_of`]).
#[derive(Debug, Clone)]
pub struct WriterLayout {
    positions: Vec<usize>,
}

/// Whether a schema names no type defined elsewhere (a reference could mean different
/// definitions in the writer's schema and the reader's).
fn self_contained(schema: &Schema) -> bool {
    match schema {
        Schema::Ref { .. } => false,
        Schema::Array(a) => self_contained(&a.items),
        Schema::Map(m) => self_contained(&m.types),
        Schema::Union(u) => u.variants().iter().all(self_contained),
        Schema::Record(r) => r.fields.iter().all(|f| self_contained(&f.schema)),
        _ => true,
    }
}

/// `Σ term(i)` for `i < n` in the documented order: element `i` into partial sum `i mod 4`,
/// then `(s₀ + s₁) + (s₂ + s₃)`.
#[inline(always)]
fn sum4(n: usize, mut term: impl FnMut(usize) -> f64) -> f64 {
    let mut s = [0.0f64; 4];
    let full = n - n % 4;
    let mut i = 0;
    while i < full {
        s[0] += term(i);
        s[1] += term(i + 1);
        s[2] += term(i + 2);
        s[3] += term(i + 3);
        i += 4;
    }
    for j in full..n {
        s[j % 4] += term(j);
    }
    (s[0] + s[1]) + (s[2] + s[3])
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    sum4(a.len().min(b.len()), |i| a[i] * f64::from(b[i]))
}

fn norm(a: &[f64]) -> f64 {
    sum4(a.len(), |i| a[i] * a[i]).sqrt()
}

fn norm_f32(b: &[f32]) -> f64 {
    sum4(b.len(), |i| f64::from(b[i]) * f64::from(b[i])).sqrt()
}

/// An array of numbers as a datum holds it: a float array written as one block (how writers
/// write one) read in place, anything else widened into a vector first.
enum Numbers<'a> {
    /// Little-endian `f32`s.
    Floats(&'a [u8]),
    Widened(Vec<f64>),
}

impl<'a> Numbers<'a> {
    fn read(schema: &Schema, names: &crate::avro_json::Names, bytes: &'a [u8]) -> Option<Self> {
        match float_block(schema, names, bytes) {
            Some(floats) => Some(Numbers::Floats(floats)),
            None => read_numbers(schema, names, bytes).map(Numbers::Widened),
        }
    }

    fn len(&self) -> usize {
        match self {
            Numbers::Floats(f) => f.len() / 4,
            Numbers::Widened(a) => a.len(),
        }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> f64 {
        match self {
            Numbers::Floats(f) => float_at(f, i),
            Numbers::Widened(a) => a[i],
        }
    }

    fn dot(&self, b: &[f32]) -> f64 {
        match self {
            Numbers::Floats(f) => sum4(b.len().min(f.len() / 4), |i| {
                float_at(f, i) * f64::from(b[i])
            }),
            Numbers::Widened(a) => dot(a, b),
        }
    }

    fn norm(&self) -> f64 {
        match self {
            Numbers::Floats(f) => sum4(f.len() / 4, |i| float_at(f, i) * float_at(f, i)).sqrt(),
            Numbers::Widened(a) => norm(a),
        }
    }
}

#[inline(always)]
fn float_at(floats: &[u8], i: usize) -> f64 {
    let c = &floats[4 * i..4 * i + 4];
    f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// The item schema of an array datum (through a union's branch, whose index is read from
/// `bytes` at `pos`); `None` if the datum is not an array.
fn array_items<'s>(
    schema: &'s Schema,
    names: &'s crate::avro_json::Names,
    bytes: &[u8],
    pos: &mut usize,
) -> Option<&'s Schema> {
    let mut schema = named(schema, names)?;
    if let Schema::Union(u) = schema {
        let branch = usize::try_from(varint(bytes, pos)?).ok()?;
        schema = named(u.variants().get(branch)?, names)?;
    }
    match schema {
        Schema::Array(a) => named(&a.items, names),
        _ => None,
    }
}

/// The element bytes of an array-of-floats datum written as one block (through a union's
/// branch); `None` for anything else.
fn float_block<'a>(
    schema: &Schema,
    names: &crate::avro_json::Names,
    bytes: &'a [u8],
) -> Option<&'a [u8]> {
    let mut pos = 0;
    if !matches!(array_items(schema, names, bytes, &mut pos)?, Schema::Float) {
        return None;
    }
    let mut count = varint(bytes, &mut pos)?;
    if count == 0 {
        return (pos == bytes.len()).then_some(&bytes[pos..pos]);
    }
    if count < 0 {
        // A negative count is followed by the block's size in bytes.
        count = count.checked_neg()?;
        varint(bytes, &mut pos)?;
    }
    let begin = pos;
    take(
        bytes,
        &mut pos,
        usize::try_from(count).ok()?.checked_mul(4)?,
    )?;
    let end = pos;
    (varint(bytes, &mut pos)? == 0 && pos == bytes.len()).then_some(&bytes[begin..end])
}

/// The numbers of an array-of-numbers datum (through a union's non-null branch), widened to
/// `f64`; `None` for anything else (the general path then says why).
fn read_numbers(
    schema: &Schema,
    names: &crate::avro_json::Names,
    bytes: &[u8],
) -> Option<Vec<f64>> {
    let mut pos = 0;
    let items = array_items(schema, names, bytes, &mut pos)?;
    // Room for the elements the bytes can hold (each float takes 4).
    let mut out = Vec::with_capacity(bytes.len() / 4);
    walk_blocks(bytes, &mut pos, false, |pos, n| {
        let at = *pos;
        match items {
            Schema::Float => {
                take(bytes, pos, n.checked_mul(4)?)?;
                out.extend(
                    bytes[at..*pos]
                        .chunks_exact(4)
                        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                );
            }
            Schema::Double => {
                take(bytes, pos, n.checked_mul(8)?)?;
                out.extend(
                    bytes[at..*pos].chunks_exact(8).map(|c| {
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                    }),
                );
            }
            Schema::Int | Schema::Long => {
                for _ in 0..n {
                    out.push(varint(bytes, pos)? as f64);
                }
            }
            _ => return None,
        }
        Some(())
    })?;
    (pos == bytes.len()).then_some(out)
}

/// The element count of an array or map datum (through a union's branch).
fn count_elements(schema: &Schema, names: &crate::avro_json::Names, bytes: &[u8]) -> Option<u64> {
    let mut pos = 0;
    let mut schema = named(schema, names)?;
    if let Schema::Union(u) = schema {
        let branch = usize::try_from(varint(bytes, &mut pos)?).ok()?;
        schema = named(u.variants().get(branch)?, names)?;
    }
    let n = match schema {
        Schema::Array(a) => walk_blocks(bytes, &mut pos, zero_size(&a.items, names), |pos, n| {
            skip_n(&a.items, names, bytes, pos, n)
        })?,
        Schema::Map(m) => walk_blocks(bytes, &mut pos, false, |pos, n| {
            skip_map_entries(&m.types, names, bytes, pos, n)
        })?,
        _ => return None,
    };
    (pos == bytes.len()).then_some(n)
}

fn evaluate_one(
    reader: &AvroCodec,
    op: &Operation,
    schema: &Schema,
    field: &Value,
    norm_b: f64,
    budget: usize,
) -> Result<Vec<u8>, String> {
    let name = op.field();
    let bytes = match op {
        Operation::Project { .. } => {
            let datum = reader
                .encode_part(schema, field)
                .map_err(|e| format!("field `{name}` cannot be projected: {e}"))?;
            let mut out = Vec::with_capacity(4 + datum.len());
            out.extend_from_slice(&(datum.len() as u32).to_be_bytes());
            out.extend_from_slice(&datum);
            out
        }
        Operation::DotProduct { vector, .. } => {
            let a = numbers(name, field)?;
            same_length(name, &a, vector)?;
            dot(&a, vector).to_bits().to_be_bytes().to_vec()
        }
        Operation::CosineSimilarity { vector, .. } => {
            let a = numbers(name, field)?;
            same_length(name, &a, vector)?;
            let norm_a = norm(&a);
            if norm_a == 0.0 || norm_b == 0.0 {
                return Err(format!(
                    "cosine similarity with a zero vector (field `{name}` or the request's) is undefined"
                ));
            }
            (dot(&a, vector) / (norm_a * norm_b))
                .to_bits()
                .to_be_bytes()
                .to_vec()
        }
        Operation::HadamardProduct { vector, .. } => {
            let a = numbers(name, field)?;
            same_length(name, &a, vector)?;
            let mut out = Vec::with_capacity(4 + 4 * a.len());
            out.extend_from_slice(&(a.len() as u32).to_be_bytes());
            for (x, y) in a.iter().zip(vector) {
                out.extend_from_slice(&((x * f64::from(*y)) as f32).to_be_bytes());
            }
            out
        }
        Operation::Count { .. } => {
            let n = match unwrap_union(field) {
                Value::Array(items) => items.len(),
                Value::Map(entries) => entries.len(),
                Value::Null => return Err(format!("field `{name}` is null")),
                _ => return Err(format!("field `{name}` is neither an array nor a map")),
            };
            (n as u64).to_be_bytes().to_vec()
        }
    };
    if bytes.len() + 1 > budget {
        return Err(format!(
            "the result of `{}` is {} bytes, over the limit of {RESULT_BYTES_MAX} bytes per key",
            op.result_name(),
            bytes.len()
        ));
    }
    Ok(bytes)
}

impl From<AvroError> for ComputeError {
    fn from(e: AvroError) -> Self {
        ComputeError::Invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type":"record","name":"R","fields":[
        {"name":"id","type":"long"},
        {"name":"emb","type":{"type":"array","items":"float"}},
        {"name":"maybe","type":["null",{"type":"array","items":"double"}],"default":null},
        {"name":"tags","type":{"type":"map","values":"int"}}]}"#;

    fn request(ops: Vec<Operation>) -> ComputeRequest {
        ComputeRequest {
            reader_schema_id: 1,
            operations: ops,
        }
    }

    #[test]
    fn requests_round_trip_and_limits_hold() {
        let req = request(vec![
            Operation::Project { field: "id".into() },
            Operation::DotProduct {
                field: "emb".into(),
                vector: vec![1.0, -2.5],
                result: "d".into(),
            },
            Operation::Count {
                field: "tags".into(),
                result: "n".into(),
            },
        ]);
        assert_eq!(ComputeRequest::decode(&req.encode()).unwrap(), req);
        let dup = request(vec![
            Operation::Project { field: "id".into() },
            Operation::Count {
                field: "tags".into(),
                result: "id".into(),
            },
        ]);
        assert!(dup.validate().unwrap_err().to_string().contains("`id`"));
        let long = request(vec![Operation::DotProduct {
            field: "emb".into(),
            vector: vec![0.5; VECTOR_LEN_MAX + 1],
            result: "d".into(),
        }]);
        assert!(ComputeRequest::decode(&long.encode()).is_err());
        let nan = request(vec![Operation::DotProduct {
            field: "emb".into(),
            vector: vec![f32::NAN],
            result: "d".into(),
        }]);
        assert!(nan.validate().is_err());
        let mut bytes = req.encode();
        bytes.push(0);
        assert!(ComputeRequest::decode(&bytes).is_err());
    }

    /// The in-place path gives the same results as decoding, on pseudo-random records of a
    /// schema with nested records, unions, maps and arrays of every number type.
    #[test]
    fn sums_add_four_partial_sums_in_the_documented_order() {
        // In array order the 1 would survive (1e16 + 1 rounds to 1e16, then - 1e16 + 1 = 1);
        // in four lanes it is lost: (1e16 + 1) + (-1e16 + 1) = 1e16 - 1e16 = 0.
        let a = [1e16, 1.0, -1e16, 1.0];
        assert_eq!(super::dot(&a, &[1.0; 4]), 0.0);
        let floats: Vec<u8> = [1e16f32, 1.0, -1e16, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let wide: Vec<f64> = [1e16f32, 1.0, -1e16, 1.0]
            .iter()
            .map(|x| f64::from(*x))
            .collect();
        assert_eq!(
            super::Numbers::Floats(&floats).dot(&[1.0; 4]),
            super::dot(&wide, &[1.0; 4])
        );
        assert_eq!(super::norm_f32(&[3.0, 4.0]), 5.0);
    }

    #[test]
    fn evaluating_in_place_equals_evaluating_decoded_values() {
        const NESTED: &str = r#"{"type":"record","name":"M","fields":[
            {"name":"name","type":"string"},
            {"name":"inner","type":{"type":"record","name":"I","fields":[{"name":"x","type":["null","int"]}]}},
            {"name":"f","type":{"type":"array","items":"float"}},
            {"name":"d","type":["null",{"type":"array","items":"double"}]},
            {"name":"l","type":{"type":"array","items":"long"}},
            {"name":"m","type":{"type":"map","values":"I"}},
            {"name":"tail","type":"string"}]}"#;
        let codec = AvroCodec::parse(NESTED).unwrap();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let q = vec![0.25f32, -1.5, 3.0, 0.5, -2.0, 1.25, 7.0];
        let ops = |field: &str| {
            vec![
                Operation::DotProduct {
                    field: field.into(),
                    vector: q.clone(),
                    result: format!("{field}_dot"),
                },
                Operation::CosineSimilarity {
                    field: field.into(),
                    vector: q.clone(),
                    result: format!("{field}_cos"),
                },
                Operation::HadamardProduct {
                    field: field.into(),
                    vector: q.clone(),
                    result: format!("{field}_had"),
                },
                Operation::Count {
                    field: field.into(),
                    result: format!("{field}_n"),
                },
            ]
        };
        let mut operations = vec![
            Operation::Project {
                field: "inner".into(),
            },
            Operation::Project { field: "m".into() },
            Operation::Project {
                field: "tail".into(),
            },
            Operation::Count {
                field: "m".into(),
                result: "m_n".into(),
            },
        ];
        for field in ["f", "d", "l"] {
            operations.extend(ops(field));
        }
        let plan = Plan::new(&codec, request(operations)).unwrap();
        let (mut in_place, mut declined) = (0, 0);
        for _ in 0..2000 {
            // 7 matches the vector (a sum's four lanes and a tail); others fail per key.
            let len = (next() % 9) as usize;
            let inner = |n: u64| {
                Value::Record(vec![(
                    "x".into(),
                    if n.is_multiple_of(3) {
                        Value::Union(0, Box::new(Value::Null))
                    } else {
                        Value::Union(1, Box::new(Value::Int(n as i32 % 1000)))
                    },
                )])
            };
            let value = Value::Record(vec![
                (
                    "name".into(),
                    Value::String("n".repeat((next() % 40) as usize)),
                ),
                ("inner".into(), inner(next())),
                (
                    "f".into(),
                    Value::Array(
                        (0..len)
                            .map(|_| Value::Float((next() % 1000) as f32 / 7.0))
                            .collect(),
                    ),
                ),
                (
                    "d".into(),
                    if next() % 4 == 0 {
                        Value::Union(0, Box::new(Value::Null))
                    } else {
                        Value::Union(
                            1,
                            Box::new(Value::Array(
                                (0..len)
                                    .map(|_| Value::Double((next() % 999) as f64 / 3.0 - 100.0))
                                    .collect(),
                            )),
                        )
                    },
                ),
                (
                    "l".into(),
                    Value::Array((0..len).map(|_| Value::Long(next() as i64 >> 20)).collect()),
                ),
                (
                    "m".into(),
                    Value::Map(
                        (0..next() % 4)
                            .map(|i| (format!("k{i}"), inner(next())))
                            .collect(),
                    ),
                ),
                ("tail".into(), Value::String("end".into())),
            ]);
            let datum = codec.encode(&value, "value").unwrap();
            let decoded = codec.decode(&datum, "value").unwrap();
            let mut general = Vec::new();
            plan.evaluate(&codec, &decoded, &mut general);
            let mut fast = Vec::new();
            if plan.evaluate_datum(&codec, &datum, &mut fast) {
                in_place += 1;
                assert_eq!(
                    plan.decode_result(&codec, &fast).unwrap(),
                    plan.decode_result(&codec, &general).unwrap()
                );
            } else {
                declined += 1;
                assert!(fast.is_empty());
            }
        }
        assert!(
            in_place > 100 && declined > 100,
            "{in_place} in place, {declined} declined"
        );
    }

    #[test]
    fn values_of_an_older_schema_holding_the_fields_unchanged_are_evaluated_in_place() {
        // Version 2 added `tag` between the fields and `extra`, a reference to a named type.
        let v1 = AvroCodec::parse(
            r#"{"type":"record","name":"E","fields":[
                {"name":"id","type":"long"},
                {"name":"gone","type":"string"},
                {"name":"embedding","type":{"type":"array","items":"float"}},
                {"name":"n","type":"int"}]}"#,
        )
        .unwrap();
        let v2 = AvroCodec::parse(
            r#"{"type":"record","name":"E","fields":[
                {"name":"id","type":"long"},
                {"name":"tag","type":"string","default":"none"},
                {"name":"embedding","type":{"type":"array","items":"float"}},
                {"name":"n","type":"long"},
                {"name":"extra","type":["null",{"type":"record","name":"X","fields":[{"name":"x","type":"int"}]}],"default":null},
                {"name":"again","type":["null","X"],"default":null}]}"#,
        )
        .unwrap();
        let q: Vec<f32> = (0..9).map(|i| i as f32 * 0.75 - 2.0).collect();
        let dot = |field: &str| Operation::DotProduct {
            field: field.into(),
            vector: q.clone(),
            result: "dot".into(),
        };
        let project = |field: &str| Operation::Project {
            field: field.into(),
        };
        let plan = Plan::new(&v2, request(vec![dot("embedding"), project("id")])).unwrap();
        let layout = plan
            .layout_of(&v1)
            .expect("both fields unchanged in version 1");
        for k in 0..50i64 {
            let len = if k % 5 == 0 { 4 } else { q.len() };
            let value = Value::Record(vec![
                ("id".into(), Value::Long(k * 1_000_003)),
                ("gone".into(), Value::String("x".repeat(k as usize))),
                (
                    "embedding".into(),
                    Value::Array(
                        (0..len)
                            .map(|i| Value::Float((k as f32 + i as f32).sin()))
                            .collect(),
                    ),
                ),
                ("n".into(), Value::Int(k as i32)),
            ]);
            let datum = v1.encode(&value, "value").unwrap();
            let resolved = v1.decode_as(&datum, &v2, "value").unwrap();
            let mut general = Vec::new();
            plan.evaluate(&v2, &resolved, &mut general);
            let mut fast = Vec::new();
            if plan.evaluate_written(&v1, &layout, &datum, &mut fast) {
                assert_eq!(len, q.len(), "a length mismatch goes the general way");
                assert_eq!(
                    plan.decode_result(&v2, &fast).unwrap(),
                    plan.decode_result(&v2, &general).unwrap(),
                    "key {k}"
                );
            } else {
                assert_ne!(len, q.len());
                assert!(fast.is_empty());
            }
        }
        // A field the writer lacks (its default), one whose type was promoted, one naming a
        // type: those values need resolving.
        for op in [project("tag"), project("n"), project("again")] {
            let plan = Plan::new(&v2, request(vec![op.clone()])).unwrap();
            assert!(plan.layout_of(&v1).is_none(), "{op:?}");
        }
    }

    #[test]
    fn unknown_fields_refuse_the_request_and_bad_values_fail_per_key() {
        let codec = AvroCodec::parse(SCHEMA).unwrap();
        let e = Plan::new(
            &codec,
            request(vec![Operation::Project {
                field: "nope".into(),
            }]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no field `nope`"), "{e}");

        let plan = Plan::new(
            &codec,
            request(vec![
                Operation::DotProduct {
                    field: "emb".into(),
                    vector: vec![1.0, 2.0, 3.0],
                    result: "d".into(),
                },
                Operation::CosineSimilarity {
                    field: "maybe".into(),
                    vector: vec![1.0],
                    result: "c".into(),
                },
                Operation::Count {
                    field: "id".into(),
                    result: "n".into(),
                },
                Operation::HadamardProduct {
                    field: "emb".into(),
                    vector: vec![2.0, 0.5],
                    result: "h".into(),
                },
            ]),
        )
        .unwrap();
        let value = Value::Record(vec![
            ("id".into(), Value::Long(7)),
            (
                "emb".into(),
                Value::Array(vec![Value::Float(1.5), Value::Float(-4.0)]),
            ),
            ("maybe".into(), Value::Union(0, Box::new(Value::Null))),
            ("tags".into(), Value::Map(Default::default())),
        ]);
        let mut out = Vec::new();
        plan.evaluate(&codec, &value, &mut out);
        let results = plan.decode_result(&codec, &out).unwrap();
        assert!(results[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("2 elements and the vector 3"));
        assert!(results[1]
            .1
            .as_ref()
            .unwrap_err()
            .contains("`maybe` is null"));
        assert!(results[2]
            .1
            .as_ref()
            .unwrap_err()
            .contains("neither an array nor a map"));
        assert_eq!(
            results[3].1,
            Ok(Value::Array(vec![Value::Float(3.0), Value::Float(-2.0)]))
        );
    }
}
