//! Reading an Avro object container file block by block, keeping each datum's own bytes.
//!
//! A push of an Avro file stores each value exactly as the file holds it: decoding a datum into
//! a `Value` and encoding it again is not the identity (map entries come back in another order,
//! a decimal written with a sign byte too many comes back shorter, a UUID in capitals comes back
//! in lower case). So the reader hands out the decompressed bytes of each block, and the caller
//! decodes the datums in place with `apache_avro`'s decoder, which both validates them and tells
//! where each field's bytes end.
//!
//! Codecs: `null`, `deflate` and `snappy` (with its CRC32 of the uncompressed data checked).

use std::io::Read;

use apache_avro::Schema;

/// Most bytes a block may announce (compressed or not).
const BLOCK_BYTES_MAX: u64 = 1 << 30;
/// Most bytes of the header's metadata values.
const METADATA_BYTES_MAX: u64 = 16 << 20;

/// Why a container file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum AvroFileError {
    #[error("not an Avro container file: {0}")]
    Format(String),
    #[error("block {block}: {detail}")]
    Block { block: u64, detail: String },
    #[error("reading the file: {0}")]
    Io(#[from] std::io::Error),
}

/// Compression of the file's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Null,
    Deflate,
    Snappy,
}

/// An open container file: its writer schema, then its blocks.
pub struct ContainerReader<R> {
    reader: R,
    schema: Schema,
    codec: Codec,
    sync: [u8; 16],
    blocks: u64,
}

/// One decompressed block: `count` datums back to back.
pub struct Block {
    pub count: u64,
    pub data: Vec<u8>,
}

impl<R: Read> ContainerReader<R> {
    /// Reads the header: magic, metadata (schema and codec), sync marker.
    pub fn open(mut reader: R) -> Result<ContainerReader<R>, AvroFileError> {
        let mut magic = [0u8; 4];
        reader
            .read_exact(&mut magic)
            .map_err(|_| AvroFileError::Format("shorter than its magic bytes".into()))?;
        if magic != *b"Obj\x01" {
            return Err(AvroFileError::Format(format!(
                "magic bytes are {magic:02x?}, not `Obj` 1"
            )));
        }
        let mut schema_json = None;
        let mut codec = Codec::Null;
        loop {
            let mut count = read_long(&mut reader)?;
            if count == 0 {
                break;
            }
            if count < 0 {
                count = count
                    .checked_neg()
                    .ok_or_else(|| bad_header("map block count"))?;
                read_long(&mut reader)?; // byte size of the block, not needed
            }
            for _ in 0..count {
                let key = read_bytes(&mut reader, METADATA_BYTES_MAX)?;
                let value = read_bytes(&mut reader, METADATA_BYTES_MAX)?;
                match key.as_slice() {
                    b"avro.schema" => {
                        schema_json = Some(
                            String::from_utf8(value)
                                .map_err(|_| bad_header("avro.schema is not UTF-8"))?,
                        )
                    }
                    b"avro.codec" => {
                        codec = match value.as_slice() {
                            b"null" => Codec::Null,
                            b"deflate" => Codec::Deflate,
                            b"snappy" => Codec::Snappy,
                            other => {
                                return Err(AvroFileError::Format(format!(
                                    "codec `{}` is not supported; write the file with null, deflate or snappy",
                                    String::from_utf8_lossy(other)
                                )))
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let schema_json = schema_json.ok_or_else(|| bad_header("no avro.schema in the header"))?;
        let schema = Schema::parse_str(&schema_json)
            .map_err(|e| AvroFileError::Format(format!("unreadable writer schema: {e}")))?;
        let mut sync = [0u8; 16];
        reader
            .read_exact(&mut sync)
            .map_err(|_| bad_header("truncated before the sync marker"))?;
        Ok(ContainerReader {
            reader,
            schema,
            codec,
            sync,
            blocks: 0,
        })
    }

    /// The schema the file was written with.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The next block, decompressed; `None` at the end of the file.
    pub fn next_block(&mut self) -> Result<Option<Block>, AvroFileError> {
        let block = self.blocks + 1;
        let err = |detail: String| AvroFileError::Block { block, detail };
        let count = match read_long_or_eof(&mut self.reader)? {
            None => return Ok(None),
            Some(c) => c,
        };
        let size = read_long(&mut self.reader)?;
        if count < 0 || size < 0 || size as u64 > BLOCK_BYTES_MAX {
            return Err(err(format!(
                "impossible block header: {count} datums, {size} bytes"
            )));
        }
        let mut raw = Vec::new();
        (&mut self.reader).take(size as u64).read_to_end(&mut raw)?;
        if raw.len() as u64 != size as u64 {
            return Err(err(format!("truncated: {} of {size} bytes", raw.len())));
        }
        let mut sync = [0u8; 16];
        self.reader
            .read_exact(&mut sync)
            .map_err(|_| err("truncated before its sync marker".into()))?;
        if sync != self.sync {
            return Err(err(
                "sync marker differs from the header's: the file is corrupt".into(),
            ));
        }
        let data = match self.codec {
            Codec::Null => raw,
            Codec::Deflate => {
                let mut out = Vec::new();
                flate2::read::DeflateDecoder::new(raw.as_slice())
                    .take(BLOCK_BYTES_MAX)
                    .read_to_end(&mut out)
                    .map_err(|e| err(format!("deflate data is corrupt: {e}")))?;
                out
            }
            Codec::Snappy => {
                let Some((compressed, crc)) = raw.split_last_chunk::<4>() else {
                    return Err(err("snappy block shorter than its checksum".into()));
                };
                let len = snap::raw::decompress_len(compressed)
                    .map_err(|e| err(format!("snappy data is corrupt: {e}")))?;
                if len as u64 > BLOCK_BYTES_MAX {
                    return Err(err(format!("snappy block would expand to {len} bytes")));
                }
                let out = snap::raw::Decoder::new()
                    .decompress_vec(compressed)
                    .map_err(|e| err(format!("snappy data is corrupt: {e}")))?;
                if crc32fast::hash(&out) != u32::from_be_bytes(*crc) {
                    return Err(err("snappy block fails its CRC32".into()));
                }
                out
            }
        };
        self.blocks = block;
        Ok(Some(Block {
            count: count as u64,
            data,
        }))
    }
}

fn bad_header(detail: &str) -> AvroFileError {
    AvroFileError::Format(format!("bad header: {detail}"))
}

/// An Avro `long` (zigzag varint); `None` at a clean end of input.
fn read_long_or_eof(r: &mut impl Read) -> Result<Option<i64>, AvroFileError> {
    let mut z: u64 = 0;
    for i in 0..10 {
        let mut b = [0u8; 1];
        if r.read(&mut b)? == 0 {
            if i == 0 {
                return Ok(None);
            }
            return Err(AvroFileError::Format("truncated inside a number".into()));
        }
        z |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(Some((z >> 1) as i64 ^ -((z & 1) as i64)));
        }
    }
    Err(AvroFileError::Format(
        "a number longer than 10 bytes".into(),
    ))
}

fn read_long(r: &mut impl Read) -> Result<i64, AvroFileError> {
    read_long_or_eof(r)?.ok_or_else(|| AvroFileError::Format("truncated".into()))
}

fn read_bytes(r: &mut impl Read, max: u64) -> Result<Vec<u8>, AvroFileError> {
    let len = read_long(r)?;
    if len < 0 || len as u64 > max {
        return Err(bad_header("impossible metadata length"));
    }
    let mut out = Vec::new();
    r.take(len as u64).read_to_end(&mut out)?;
    if out.len() as u64 != len as u64 {
        return Err(bad_header("truncated metadata"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use apache_avro::{Codec as AvroCodec, Writer};

    fn file(codec: AvroCodec, rows: usize) -> (Schema, Vec<u8>) {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"Row","fields":[{"name":"key","type":"string"},{"name":"value","type":{"type":"map","values":"long"}}]}"#,
        )
        .unwrap();
        let mut w = Writer::builder()
            .schema(&schema)
            .writer(Vec::new())
            .codec(codec)
            .block_size(64)
            .build();
        for i in 0..rows {
            let map = (0..3)
                .map(|j| (format!("m{j}"), Value::Long((i * j) as i64)))
                .collect();
            w.append(Value::Record(vec![
                ("key".into(), Value::String(format!("k{i}"))),
                ("value".into(), Value::Map(map)),
            ]))
            .unwrap();
        }
        let bytes = w.into_inner().unwrap();
        (schema, bytes)
    }

    fn datums(bytes: &[u8], schema: &Schema) -> Vec<Value> {
        let mut r = ContainerReader::open(bytes).unwrap();
        let mut out = Vec::new();
        while let Some(block) = r.next_block().unwrap() {
            let mut data = block.data.as_slice();
            for _ in 0..block.count {
                out.push(apache_avro::from_avro_datum(schema, &mut data, None).unwrap());
            }
            assert!(data.is_empty());
        }
        out
    }

    #[test]
    fn every_codec_reads_back_every_block() {
        for codec in [
            AvroCodec::Null,
            AvroCodec::Deflate(Default::default()),
            AvroCodec::Snappy,
        ] {
            let (schema, bytes) = file(codec, 50);
            let expected: Vec<Value> = apache_avro::Reader::new(bytes.as_slice())
                .unwrap()
                .map(|v| v.unwrap())
                .collect();
            assert_eq!(datums(&bytes, &schema), expected, "{codec:?}");
        }
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let (_, bytes) = file(AvroCodec::Snappy, 20);
        for len in 0..bytes.len() {
            // A file cut at a block boundary is a valid shorter file; anywhere else, an error.
            let mut datums = 0;
            let result = ContainerReader::open(&bytes[..len]).and_then(|mut r| {
                while let Some(block) = r.next_block()? {
                    datums += block.count;
                }
                Ok(())
            });
            assert!(result.is_err() || datums < 20, "truncated at {len}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 20; // inside the last block's data or CRC
        flipped[last] ^= 0x55;
        let mut r = ContainerReader::open(flipped.as_slice()).unwrap();
        let mut failed = false;
        loop {
            match r.next_block() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    failed = true;
                    assert!(e.to_string().contains("block"), "{e}");
                    break;
                }
            }
        }
        assert!(failed, "a flipped byte went unnoticed");
        assert!(ContainerReader::open(&b"Obj\x02"[..]).is_err());
    }
}
