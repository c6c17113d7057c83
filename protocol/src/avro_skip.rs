//! A bounded walk over Avro binary datums: where a datum of a schema ends, without decoding it.
//!
//! apache_avro's decoder reserves memory for an array or map block from the count the input
//! claims, before reading the elements: a damaged or hostile datum claiming a billion elements
//! aborts the process on allocation. [`datum_len`] checks every count against the bytes that
//! could hold it first; [`AvroCodec`](crate::avro::AvroCodec) runs it before every decode, and
//! read compute uses the same walk to find and read fields in place.

use apache_avro::schema::Schema;

use crate::avro_json::Names;

/// Most elements of empty datums (nulls) one array block may claim.
const ZERO_SIZE_ITEMS_MAX: u64 = 1 << 20;

/// The length of the datum of `schema` at the start of `bytes` (named types from `names`);
/// `None` when the bytes do not hold one, or claim more elements than they could hold.
pub fn datum_len(schema: &Schema, names: &Names, bytes: &[u8]) -> Option<usize> {
    let mut pos = 0;
    skip(schema, names, bytes, &mut pos)?;
    Some(pos)
}

/// Whether every datum of `schema` is empty (elements of such arrays take no bytes).
pub(crate) fn zero_size(schema: &Schema, names: &Names) -> bool {
    empty(schema, names, 0)
}

/// Whether every datum of `schema` takes no bytes: null, fixed of size 0, and records of such
/// fields (a record nested deeper than 32 levels counts as taking bytes).
fn empty(schema: &Schema, names: &Names, depth: usize) -> bool {
    match named(schema, names) {
        Some(Schema::Null) => true,
        Some(Schema::Fixed(f)) => f.size == 0,
        Some(Schema::Decimal(d)) => empty(&d.inner, names, depth),
        Some(Schema::Record(r)) if depth < 32 => {
            r.fields.iter().all(|f| empty(&f.schema, names, depth + 1))
        }
        _ => false,
    }
}

/// Reads a zigzag varint (Avro `int`, `long`, lengths and counts) at `pos`.
pub(crate) fn varint(bytes: &[u8], pos: &mut usize) -> Option<i64> {
    let mut z = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        z |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some((z >> 1) as i64 ^ -((z & 1) as i64));
        }
    }
    None
}

pub(crate) fn take(bytes: &[u8], pos: &mut usize, n: usize) -> Option<()> {
    let end = pos.checked_add(n)?;
    (end <= bytes.len()).then(|| *pos = end)
}

pub(crate) fn named<'s>(schema: &'s Schema, names: &'s Names) -> Option<&'s Schema> {
    match schema {
        Schema::Ref { name } => names.get(name),
        other => Some(other),
    }
}

/// Moves `pos` past one datum of `schema`; `None` if the bytes do not hold one.
pub(crate) fn skip(schema: &Schema, names: &Names, bytes: &[u8], pos: &mut usize) -> Option<()> {
    match named(schema, names)? {
        Schema::Null => Some(()),
        Schema::Boolean => take(bytes, pos, 1),
        Schema::Int
        | Schema::Long
        | Schema::Enum(_)
        | Schema::Date
        | Schema::TimeMillis
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => varint(bytes, pos).map(|_| ()),
        Schema::Float => take(bytes, pos, 4),
        Schema::Double => take(bytes, pos, 8),
        Schema::Bytes | Schema::String | Schema::Uuid | Schema::BigDecimal => {
            let n = usize::try_from(varint(bytes, pos)?).ok()?;
            take(bytes, pos, n)
        }
        Schema::Fixed(f) => take(bytes, pos, f.size),
        Schema::Duration => take(bytes, pos, 12),
        Schema::Decimal(d) => skip(&d.inner, names, bytes, pos),
        Schema::Array(a) => {
            let empty = zero_size(&a.items, names);
            walk_blocks(bytes, pos, empty, |pos, n| {
                skip_n(&a.items, names, bytes, pos, n)
            })
            .map(|_| ())
        }
        Schema::Map(m) => walk_blocks(bytes, pos, false, |pos, n| {
            skip_map_entries(&m.types, names, bytes, pos, n)
        })
        .map(|_| ()),
        Schema::Union(u) => {
            let branch = usize::try_from(varint(bytes, pos)?).ok()?;
            skip(u.variants().get(branch)?, names, bytes, pos)
        }
        Schema::Record(r) => {
            for field in &r.fields {
                skip(&field.schema, names, bytes, pos)?;
            }
            Some(())
        }
        Schema::Ref { .. } => None,
    }
}

/// Walks an array's or map's blocks, calling `items` with each block's element count (the
/// closure moves `pos` past them); answers the total count.
pub(crate) fn walk_blocks(
    bytes: &[u8],
    pos: &mut usize,
    zero_size_items: bool,
    mut items: impl FnMut(&mut usize, usize) -> Option<()>,
) -> Option<u64> {
    let mut total = 0u64;
    loop {
        let count = varint(bytes, pos)?;
        if count == 0 {
            return Some(total);
        }
        if count < 0 {
            // A negative count is followed by the block's size in bytes.
            varint(bytes, pos)?;
        }
        let n = count.unsigned_abs();
        // An element takes at least a byte, unless it is empty (a null): a count the rest of
        // the input cannot hold is refused before anything is allocated for it.
        let room = if zero_size_items {
            ZERO_SIZE_ITEMS_MAX
        } else {
            (bytes.len() - *pos) as u64
        };
        if n > room {
            return None;
        }
        items(pos, n as usize)?;
        total += n;
    }
}

/// Bytes of every datum of `schema`, when that is fixed.
fn fixed_size(schema: &Schema) -> Option<usize> {
    match schema {
        Schema::Null => Some(0),
        Schema::Boolean => Some(1),
        Schema::Float => Some(4),
        Schema::Double => Some(8),
        Schema::Fixed(f) => Some(f.size),
        Schema::Duration => Some(12),
        _ => None,
    }
}

/// Moves `pos` past `n` datums of `items`.
pub(crate) fn skip_n(
    items: &Schema,
    names: &Names,
    bytes: &[u8],
    pos: &mut usize,
    n: usize,
) -> Option<()> {
    let items = named(items, names)?;
    match fixed_size(items) {
        Some(size) => take(bytes, pos, size.checked_mul(n)?),
        None => (0..n).try_for_each(|_| skip(items, names, bytes, pos)),
    }
}

pub(crate) fn skip_map_entries(
    values: &Schema,
    names: &Names,
    bytes: &[u8],
    pos: &mut usize,
    n: usize,
) -> Option<()> {
    for _ in 0..n {
        let len = usize::try_from(varint(bytes, pos)?).ok()?;
        take(bytes, pos, len)?;
        skip(values, names, bytes, pos)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::AvroCodec;

    fn zigzag(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        while z >= 0x80 {
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
        out
    }

    /// A block claiming three billion elements in a few bytes made apache_avro reserve 25 GB
    /// and abort the process (found by the fuzz target `avro_keys`); it is now a decode error.
    #[test]
    fn counts_the_bytes_cannot_hold_are_refused_before_decoding() {
        for schema in [
            r#"{"type":"array","items":"string"}"#,
            r#"{"type":"map","values":"long"}"#,
            r#"{"type":"array","items":"null"}"#,
        ] {
            let codec = AvroCodec::parse(schema).unwrap();
            let mut datum = zigzag(3_000_000_000);
            datum.extend_from_slice(&[2, b'a', 0]);
            let e = codec.decode(&datum, "value").unwrap_err();
            assert!(
                e.to_string().contains("claims more elements"),
                "{schema}: {e}"
            );
        }
        // Arrays of empty datums take no bytes: a modest count of them still decodes (the
        // proptest round trip found records of a fixed(0) refused).
        let codec = AvroCodec::parse(
            r#"{"type":"array","items":{"type":"record","name":"R","fields":[{"name":"f","type":{"type":"fixed","name":"F","size":0}},{"name":"n","type":"null"}]}}"#,
        )
        .unwrap();
        let mut datum = zigzag(3);
        datum.push(0);
        assert!(codec.decode(&datum, "value").is_ok());
        let codec = AvroCodec::parse(r#"{"type":"array","items":"null"}"#).unwrap();
        let mut datum = zigzag(1000);
        datum.push(0);
        assert_eq!(
            datum_len(codec.schema(), codec.names(), &datum),
            Some(datum.len())
        );
        assert!(codec.decode(&datum, "value").is_ok());
    }
}
