//! The synthetic dataset of `prepare` and `run`: keys derived from their index, values of a fixed
//! serialized size that carry their index (so a read can be checked without the dataset).
//!
//! * Key `i`: the Avro string `key-{i:09}` (schema `"string"`).
//! * Value `i`: the record [`VALUE_SCHEMA`] `{index: i, payload: <ASCII>}` whose Avro datum is
//!   exactly `value_bytes` long (when `value_bytes` is at least [`VALUE_BYTES_MIN`]); the payload
//!   is a slice of a pseudo-random pool derived from the seed.

use std::io::Write;

/// Key schema of loadgen stores.
pub const KEY_SCHEMA: &str = r#""string""#;
/// Value schema of loadgen stores.
pub const VALUE_SCHEMA: &str = r#"{"type":"record","name":"LoadgenValue","namespace":"rialto.loadgen","fields":[{"name":"index","type":"long"},{"name":"payload","type":"string"}]}"#;
/// Value schema of loadgen embedding stores (`prepare --embedding-dims D`).
pub const EMBEDDING_SCHEMA: &str = r#"{"type":"record","name":"LoadgenEmbedding","namespace":"rialto.loadgen","fields":[{"name":"index","type":"long"},{"name":"embedding","type":{"type":"array","items":"float"}}]}"#;
/// Smallest value size that can be matched exactly (index and payload length headers).
pub const VALUE_BYTES_MIN: usize = 12;
/// Prefix of the store owner field that marks a store created by `prepare`.
pub const OWNER_MARKER: &str = "rialto-loadgen";

/// Bytes of the zigzag varint encoding of `n` (Avro `long` and length prefixes).
pub fn varint_len(n: i64) -> usize {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut len = 1;
    while z >= 0x80 {
        z >>= 7;
        len += 1;
    }
    len
}

fn put_varint(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Decodes a zigzag varint at the start of `bytes`; `None` when truncated or too long.
pub fn read_varint(bytes: &[u8]) -> Option<i64> {
    let mut z: u64 = 0;
    for (i, b) in bytes.iter().take(10).enumerate() {
        z |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((z >> 1) as i64 ^ -((z & 1) as i64));
        }
    }
    None
}

/// The key string of index `i`.
pub fn key_string(i: u64) -> String {
    format!("key-{i:09}")
}

/// Appends the serialized Avro key datum of index `i` to `out` (the same bytes as encoding
/// `Value::String(key_string(i))` with [`KEY_SCHEMA`]).
pub fn encode_key(i: u64, out: &mut Vec<u8>) {
    if i < 1_000_000_000 {
        // The common case without formatting: 13 characters, length prefix zigzag(13) = 26.
        let mut buf = *b"\x1akey-000000000";
        let mut n = i;
        for d in buf[5..].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.extend_from_slice(&buf);
        return;
    }
    let s = key_string(i);
    put_varint(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

/// The serialized key datum of index `i`.
pub fn key_bytes(i: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    encode_key(i, &mut out);
    out
}

/// Payload length that makes the value datum of `index` exactly `value_bytes` long (or as close
/// as possible for tiny sizes).
pub fn payload_len(index: u64, value_bytes: usize) -> usize {
    let head = varint_len(index as i64);
    for len_bytes in 1..=4 {
        let Some(p) = value_bytes.checked_sub(head + len_bytes) else {
            return 0;
        };
        if varint_len(p as i64) == len_bytes {
            return p;
        }
    }
    value_bytes.saturating_sub(head + 4)
}

/// The index a stored value says it belongs to (first field of [`VALUE_SCHEMA`]).
pub fn value_index(value: &[u8]) -> Option<u64> {
    read_varint(value).and_then(|i| u64::try_from(i).ok())
}

/// Deterministic generator of payloads from a seed.
pub struct Payloads {
    pool: Vec<u8>,
}

/// Size of the pseudo-random character pool payloads are sliced from.
const POOL_BYTES: usize = 1 << 16;

impl Payloads {
    /// A pool of ASCII alphanumerics derived from `seed` (xorshift; no escaping needed in JSON).
    pub fn new(seed: u64) -> Payloads {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
        let pool = (0..POOL_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ALPHABET[(x % ALPHABET.len() as u64) as usize]
            })
            .collect();
        Payloads { pool }
    }

    /// Appends the payload of `index` (`len` characters) to `out`.
    pub fn append(&self, index: u64, len: usize, out: &mut Vec<u8>) {
        let mut start = (index.wrapping_mul(7919) % POOL_BYTES as u64) as usize;
        let mut left = len;
        while left > 0 {
            let n = left.min(POOL_BYTES - start);
            out.extend_from_slice(&self.pool[start..start + n]);
            left -= n;
            start = 0;
        }
    }

    /// The serialized Avro value datum of `index` (for tests; the push encodes from JSON).
    #[cfg(test)]
    pub fn value_bytes(&self, index: u64, value_bytes: usize) -> Vec<u8> {
        let len = payload_len(index, value_bytes);
        let mut out = Vec::with_capacity(value_bytes);
        put_varint(&mut out, index as i64);
        put_varint(&mut out, len as i64);
        self.append(index, len, &mut out);
        out
    }
}

/// Writes records `0..keys` as newline-delimited JSON (`{"key":…,"value":{…}}`) to `out`,
/// streaming; `progress` is called with the records written so far every 64k records.
pub fn write_ndjson(
    out: &mut impl Write,
    keys: u64,
    value_bytes: usize,
    seed: u64,
    mut progress: impl FnMut(u64),
) -> std::io::Result<()> {
    let payloads = Payloads::new(seed);
    let mut line = Vec::with_capacity(value_bytes + 96);
    for i in 0..keys {
        line.clear();
        write!(
            line,
            r#"{{"key":"{}","value":{{"index":{i},"payload":""#,
            key_string(i)
        )?;
        payloads.append(i, payload_len(i, value_bytes), &mut line);
        line.extend_from_slice(b"\"}}\n");
        out.write_all(&line)?;
        if (i + 1) % 65_536 == 0 {
            progress(i + 1);
        }
    }
    progress(keys);
    Ok(())
}

/// The embedding of record `index`: `dims` floats in [-1, 1) derived from `seed` and `index`.
pub fn embedding(index: u64, dims: usize, seed: u64) -> Vec<f32> {
    let mut x =
        (seed ^ 0xD1B5_4A32_D192_ED03).wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    (0..dims)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // 24 random bits: exact in an f32.
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// Records per block of the embedding container file.
const EMBEDDING_BLOCK_RECORDS: u64 = 4096;

/// Writes records `0..keys` of [`EMBEDDING_SCHEMA`] as an Avro object container file (codec
/// `null`) of rows `{key, value}`, encoded here directly (the push job keeps the file's value
/// bytes); `progress` is called with the records written so far after each block.
pub fn write_embedding_avro(
    out: &mut impl Write,
    keys: u64,
    dims: usize,
    seed: u64,
    mut progress: impl FnMut(u64),
) -> std::io::Result<()> {
    let row = format!(
        r#"{{"type":"record","name":"Row","namespace":"rialto.loadgen","fields":[{{"name":"key","type":"string"}},{{"name":"value","type":{EMBEDDING_SCHEMA}}}]}}"#
    );
    let sync: [u8; 16] = *b"rialto-loadgen-e";
    let mut header = b"Obj\x01".to_vec();
    put_varint(&mut header, 2);
    for (k, v) in [
        ("avro.schema", row.as_bytes()),
        ("avro.codec", b"null".as_slice()),
    ] {
        put_varint(&mut header, k.len() as i64);
        header.extend_from_slice(k.as_bytes());
        put_varint(&mut header, v.len() as i64);
        header.extend_from_slice(v);
    }
    put_varint(&mut header, 0);
    header.extend_from_slice(&sync);
    out.write_all(&header)?;
    let mut block = Vec::new();
    let mut framing = Vec::new();
    let mut start = 0;
    while start < keys {
        let end = (start + EMBEDDING_BLOCK_RECORDS).min(keys);
        block.clear();
        for i in start..end {
            let key = key_string(i);
            put_varint(&mut block, key.len() as i64);
            block.extend_from_slice(key.as_bytes());
            put_varint(&mut block, i as i64);
            if dims > 0 {
                put_varint(&mut block, dims as i64);
                for x in embedding(i, dims, seed) {
                    block.extend_from_slice(&x.to_le_bytes());
                }
            }
            put_varint(&mut block, 0);
        }
        framing.clear();
        put_varint(&mut framing, (end - start) as i64);
        put_varint(&mut framing, block.len() as i64);
        out.write_all(&framing)?;
        out.write_all(&block)?;
        out.write_all(&sync)?;
        start = end;
        progress(end);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rialto_protocol::avro::{AvroCodec, Value};

    /// The hand-written container file reads back through apache_avro, value by value.
    #[test]
    fn embedding_files_read_back_with_apache_avro() {
        let mut file = Vec::new();
        write_embedding_avro(&mut file, 5000, 7, 3, |_| {}).unwrap();
        let reader = apache_avro::Reader::new(&file[..]).unwrap();
        let mut n = 0;
        for (i, row) in reader.enumerate() {
            let Value::Record(fields) = row.unwrap() else {
                panic!("row")
            };
            assert_eq!(fields[0].1, Value::String(key_string(i as u64)));
            let want = Value::Record(vec![
                ("index".into(), Value::Long(i as i64)),
                (
                    "embedding".into(),
                    Value::Array(
                        embedding(i as u64, 7, 3)
                            .into_iter()
                            .map(Value::Float)
                            .collect(),
                    ),
                ),
            ]);
            assert_eq!(fields[1].1, want);
            n += 1;
        }
        assert_eq!(n, 5000);
    }

    #[test]
    fn key_bytes_match_the_avro_encoding() {
        let codec = AvroCodec::parse(KEY_SCHEMA).unwrap();
        for i in [
            0,
            7,
            999_999,
            123_456_789,
            999_999_999,
            1_000_000_000,
            98_765_432_101,
        ] {
            let want = codec.encode(&Value::String(key_string(i)), "key").unwrap();
            assert_eq!(key_bytes(i), want, "key {i}");
        }
    }

    #[test]
    fn ndjson_values_encode_to_exactly_the_requested_size() {
        let key_codec = AvroCodec::parse(KEY_SCHEMA).unwrap();
        let value_codec = AvroCodec::parse(VALUE_SCHEMA).unwrap();
        for value_bytes in [VALUE_BYTES_MIN, 100, 129, 1024, 20_000, 70_000] {
            let mut out = Vec::new();
            write_ndjson(&mut out, 3, value_bytes, 42, |_| {}).unwrap();
            let payloads = Payloads::new(42);
            for (i, line) in out
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                let json =
                    rialto_protocol::json::Json::parse(std::str::from_utf8(line).unwrap()).unwrap();
                let key = key_codec
                    .from_json(json.get("key").unwrap(), "key")
                    .unwrap();
                assert_eq!(key_codec.encode(&key, "key").unwrap(), key_bytes(i as u64));
                let value = value_codec
                    .from_json(json.get("value").unwrap(), "value")
                    .unwrap();
                let bytes = value_codec.encode(&value, "value").unwrap();
                assert_eq!(bytes.len(), value_bytes, "value {i} of {value_bytes} bytes");
                assert_eq!(bytes, payloads.value_bytes(i as u64, value_bytes));
                assert_eq!(value_index(&bytes), Some(i as u64));
            }
        }
    }

    #[test]
    fn varints_round_trip() {
        for n in [0i64, 1, -1, 63, 64, 8191, 8192, 1 << 40, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            assert_eq!(out.len(), varint_len(n));
            assert_eq!(read_varint(&out), Some(n));
        }
        assert_eq!(read_varint(&[0x80]), None);
    }
}
