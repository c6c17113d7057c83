//! An Avro object container file read byte by byte, without `apache_avro`'s decoder: the oracle
//! for what a push of that file must have stored.
//!
//! # Why this exists
//!
//! Rialto's push job frames container files itself but decodes every datum with the
//! `apache_avro` crate (to validate it and to find where its fields end). A bug on that path (a
//! codec, a logical type, a union branch, a named reference decoded wrongly) would be invisible to a
//! verifier that read the input through the same crate: both would agree on the same wrong answer.
//! This module shares no decoding code with the push job. It parses the container framing, the
//! codecs, the writer schema's JSON and the binary encoding of every Avro type itself, and returns
//! for each record the exact bytes of its key datum and of its value datum as they appear in the
//! (decompressed) file.
//!
//! Avro's binary encoding is a function of the value and the schema, except for the order of a
//! map's entries, how an array or a map is cut into blocks, and over-long varints. The common
//! writers (Java's `BinaryEncoder`, fastavro, `apache_avro`) put each non-empty array or map in a
//! single block and write minimal varints, so a re-encoding that keeps map entries in file order
//! reproduces these bytes exactly. (A decoder that collects a map into a hash map does not keep
//! that order; the fastavro test files in `tests/data/foreign` are written to catch it.)
//!
//! # Schemas
//!
//! `avro.schema` is parsed here as well (with `serde_json`) into a small tree that keeps only what
//! decides the binary encoding. Logical types never change an encoding (the specification defines
//! each on an underlying type), so `logicalType` is ignored and the underlying type walked: decimal
//! on bytes or fixed, uuid on string or fixed(16), date and time-millis on int, time-micros and the
//! (local-)timestamp types on long, duration on fixed(12). This is deliberately not
//! `apache_avro::Schema`: apache_avro 0.20 folds some logical types into variants that forget their
//! underlying type (uuid on fixed(16) becomes the same `Schema::Uuid` as uuid on string, and its
//! decoder then expects a length prefix that such files do not have: its `Reader` fails on them, or
//! misreads them). An oracle must not inherit that.
//!
//! # Robustness
//!
//! Nothing here panics on any input. Every length is checked against what remains of the input
//! before anything is allocated or sliced; decompression output is bounded by the largest expansion
//! the codec can produce; datums are walked with an explicit stack (no recursion), so deeply
//! nested recursive data cannot overflow the thread's stack.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

/// The four bytes an Avro object container file starts with.
pub const MAGIC: [u8; 4] = *b"Obj\x01";

/// Length of the sync marker that ends the header and every block.
const SYNC_LEN: usize = 16;

/// Most work items (pending fields, open arrays and maps) walking one datum may accumulate; a
/// datum nested deeper than this is refused instead of exhausting memory.
pub const MAX_PENDING: usize = 1 << 20;

/// DEFLATE cannot expand data more than 1032:1 (a 258-byte match coded in two bits).
const DEFLATE_MAX_RATIO: u64 = 1032;

/// Snappy cannot expand data more than about 21:1 (a 3-byte copy of 64 bytes); 32 leaves room.
const SNAPPY_MAX_RATIO: u64 = 32;

/// Every record of an Avro container file, cut into key and value datums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecords {
    /// The writer schema exactly as the header's `avro.schema` holds it (JSON text).
    pub writer_schema: String,
    /// The header's `avro.codec` (`"null"` when absent).
    pub codec: String,
    /// How many data blocks the file has.
    pub blocks: usize,
    /// The records, in file order.
    pub records: Vec<RecordBytes>,
}

/// The key and value datums of one record, exactly as the (decompressed) file encodes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordBytes {
    /// The key field's datum, encoded with the key field's writer schema.
    pub key: Vec<u8>,
    /// The value field's datum, encoded with the value field's writer schema.
    pub value: Vec<u8>,
}

/// Where in the input an error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A byte offset in the file: the header, block framing, or the data of an uncompressed block.
    File { offset: usize },
    /// An offset in the decompressed data of a compressed block (blocks are numbered from 0).
    Block {
        block: usize,
        /// File offset of the block's compressed data.
        data_offset: usize,
        offset: usize,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { offset } => write!(f, "file offset {offset}"),
            Location::Block {
                block,
                data_offset,
                offset,
            } => write!(
                f,
                "offset {offset} of block {block}'s decompressed data \
                 (its compressed data starts at file offset {data_offset})"
            ),
        }
    }
}

/// Why a file could not be read. Blocks and records are numbered from 0.
#[derive(Debug, thiserror::Error)]
pub enum AvroFileError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not an Avro object container file: it starts with {found:02x?}, not \"Obj\\x01\"")]
    BadMagic { found: Vec<u8> },
    #[error("truncated at {at}: {what} needs {needed} byte(s) but only {available} remain")]
    Truncated {
        at: Location,
        what: &'static str,
        needed: u64,
        available: usize,
    },
    #[error("invalid {what} at {at}: {reason}")]
    Invalid {
        at: Location,
        what: &'static str,
        reason: String,
    },
    #[error("invalid file metadata at {at}: {reason}")]
    Metadata { at: Location, reason: String },
    #[error("unsupported codec {codec:?} (this reader knows null, deflate and snappy)")]
    UnsupportedCodec { codec: String },
    #[error("invalid writer schema: {reason}")]
    Schema { reason: String },
    #[error(
        "the writer schema's record {record:?} has no field {field:?} (its fields: {fields:?})"
    )]
    MissingField {
        field: String,
        record: String,
        fields: Vec<String>,
    },
    #[error(
        "sync marker of block {block} at file offset {offset} is {found:02x?}, \
         but the header's is {expected:02x?}"
    )]
    SyncMismatch {
        block: usize,
        offset: usize,
        expected: [u8; SYNC_LEN],
        found: Vec<u8>,
    },
    #[error("cannot decompress block {block} ({codec}, data at file offset {offset}): {reason}")]
    Decompress {
        block: usize,
        offset: usize,
        codec: &'static str,
        reason: String,
    },
    #[error(
        "snappy CRC32 mismatch in block {block} (data at file offset {offset}): \
         stored {stored:08x}, computed {computed:08x}"
    )]
    SnappyCrc {
        block: usize,
        offset: usize,
        stored: u32,
        computed: u32,
    },
    #[error(
        "union branch index {index} at {at} is out of range: the union has {branches} branches"
    )]
    UnionIndex {
        at: Location,
        index: i64,
        branches: usize,
    },
    #[error("enum symbol index {index} at {at} is out of range: the enum has {symbols} symbols")]
    EnumIndex {
        at: Location,
        index: i32,
        symbols: usize,
    },
    #[error(
        "block {block} (file offset {offset}) announces {objects} objects \
         but holds only {size} bytes of data"
    )]
    TooManyObjects {
        block: usize,
        offset: usize,
        objects: u64,
        size: usize,
    },
    #[error(
        "block {block} (file offset {offset}): its {objects} objects end after {consumed} \
         of its {size} bytes of data"
    )]
    BlockNotConsumed {
        block: usize,
        offset: usize,
        objects: u64,
        consumed: usize,
        size: usize,
    },
    #[error("{what} at {at} announces {announced} bytes but its items take {actual}")]
    CollectionSize {
        at: Location,
        what: &'static str,
        announced: u64,
        actual: usize,
    },
    #[error("datum nested too deeply at {at} (more than {limit} pending items)")]
    TooDeep { at: Location, limit: usize },
    #[error("record {record} (block {block}), field {field:?}: {source}")]
    InRecord {
        block: usize,
        record: usize,
        field: String,
        #[source]
        source: Box<AvroFileError>,
    },
}

type Result<T, E = AvroFileError> = std::result::Result<T, E>;

/// Reads the container file at `path`; see [`read_records`].
pub fn read_records_from_path(
    path: &Path,
    key_field: &str,
    value_field: &str,
) -> Result<ContainerRecords> {
    let bytes = std::fs::read(path).map_err(|source| AvroFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_records(&bytes, key_field, value_field)
}

/// Reads a whole Avro object container file and returns, for each record (a datum of the writer
/// schema, which must be a record), the bytes of its `key_field` and `value_field` datums.
///
/// The header, every block's framing and sync marker, the codec (`null`, `deflate`, `snappy`
/// with its CRC32) and every datum are checked; each block's objects must use up its data exactly.
pub fn read_records(bytes: &[u8], key_field: &str, value_field: &str) -> Result<ContainerRecords> {
    let mut file = Cursor::new(bytes, Origin::File { base: 0 });
    let header = Header::read(&mut file)?;
    let codec = Codec::from_name(&header.codec)?;
    let tree = SchemaTree::parse(&header.schema)?;
    let row = Row::new(&tree, key_field, value_field)?;
    let mut skipper = Skipper::new(&tree);
    let mut records = Vec::new();
    let mut blocks = 0;
    while !file.is_empty() {
        let frame = BlockFrame::read(&mut file, blocks, &header.sync)?;
        let data = codec.decode(&frame)?;
        let cursor = Cursor::new(&data, frame.origin(matches!(data, Cow::Owned(_))));
        read_block_records(&frame, cursor, &row, &mut skipper, &mut records)?;
        blocks += 1;
    }
    Ok(ContainerRecords {
        writer_schema: header.schema,
        codec: header.codec,
        blocks,
        records,
    })
}

// ---------------------------------------------------------------------------------------------
// Reading primitives

/// What offsets of a [`Cursor`] are relative to.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// The cursor's data starts at this offset of the file.
    File { base: usize },
    /// The cursor's data is the decompressed data of a block.
    Block { block: usize, data_offset: usize },
}

/// A position in a byte slice, with bounds-checked reads of Avro's primitive encodings.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    origin: Origin,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], origin: Origin) -> Self {
        Cursor {
            data,
            pos: 0,
            origin,
        }
    }

    fn location(&self, pos: usize) -> Location {
        match self.origin {
            Origin::File { base } => Location::File {
                offset: base.saturating_add(pos),
            },
            Origin::Block { block, data_offset } => Location::Block {
                block,
                data_offset,
                offset: pos,
            },
        }
    }

    fn here(&self) -> Location {
        self.location(self.pos)
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The bytes from `start` to the current position.
    fn since(&self, start: usize) -> &'a [u8] {
        self.data.get(start..self.pos).unwrap_or_default()
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8]> {
        let available = self.remaining();
        let truncated = || AvroFileError::Truncated {
            at: self.here(),
            what,
            needed: n,
            available,
        };
        let n = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let bytes = self.data.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    /// A base-128 varint of at most `max_bytes` bytes whose last byte is at most `last_max`.
    fn read_varint(&mut self, what: &'static str, max_bytes: usize, last_max: u8) -> Result<u64> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..max_bytes {
            let Some(&byte) = self.data.get(self.pos) else {
                return Err(AvroFileError::Truncated {
                    at: self.here(),
                    what,
                    needed: 1,
                    available: 0,
                });
            };
            self.pos += 1;
            if i + 1 == max_bytes && byte > last_max {
                break;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(AvroFileError::Invalid {
            at: self.location(start),
            what,
            reason: format!("varint longer than {max_bytes} bytes or out of range"),
        })
    }

    /// A zigzag-encoded `long` (at most 10 bytes).
    fn read_long(&mut self, what: &'static str) -> Result<i64> {
        let raw = self.read_varint(what, 10, 0x01)?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// A zigzag-encoded `int` (at most 5 bytes, 32 bits).
    fn read_int(&mut self, what: &'static str) -> Result<i32> {
        let raw = self.read_varint(what, 5, 0x0f)?;
        let raw = u32::try_from(raw).map_err(|_| AvroFileError::Invalid {
            at: self.here(),
            what,
            reason: "int out of range".into(),
        })?;
        Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
    }

    /// A `long` that must not be negative (a length or a byte size).
    fn read_len(&mut self, what: &'static str) -> Result<u64> {
        let at = self.here();
        let value = self.read_long(what)?;
        u64::try_from(value).map_err(|_| AvroFileError::Invalid {
            at,
            what,
            reason: format!("{value} is negative"),
        })
    }

    /// Avro `bytes`: a length, then that many bytes.
    fn read_bytes(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let len = self.read_len(what)?;
        self.take(len, what)
    }

    /// Avro `string`: like `bytes`, and valid UTF-8.
    fn read_str(&mut self, what: &'static str) -> Result<&'a str> {
        let at = self.here();
        let bytes = self.read_bytes(what)?;
        std::str::from_utf8(bytes).map_err(|e| AvroFileError::Invalid {
            at,
            what,
            reason: format!("not UTF-8: {e}"),
        })
    }

    /// Avro `boolean`: one byte, 0 or 1.
    fn read_boolean(&mut self) -> Result<()> {
        let at = self.here();
        match self.take(1, "boolean")? {
            [0 | 1] => Ok(()),
            other => Err(AvroFileError::Invalid {
                at,
                what: "boolean",
                reason: format!("byte {other:02x?} is neither 0 nor 1"),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Header and blocks

/// What the header tells: the schema text, the codec name and the sync marker.
struct Header {
    schema: String,
    codec: String,
    sync: [u8; SYNC_LEN],
}

impl Header {
    fn read(file: &mut Cursor<'_>) -> Result<Header> {
        let found = file.data.get(..MAGIC.len()).unwrap_or(file.data);
        if found != MAGIC {
            if MAGIC.starts_with(found) {
                return Err(AvroFileError::Truncated {
                    at: file.here(),
                    what: "magic",
                    needed: MAGIC.len() as u64,
                    available: found.len(),
                });
            }
            return Err(AvroFileError::BadMagic {
                found: found.to_vec(),
            });
        }
        file.pos = MAGIC.len();
        let metadata_at = file.here();
        let metadata = read_metadata(file)?;
        let sync_bytes = file.take(SYNC_LEN as u64, "header sync marker")?;
        let sync =
            <[u8; SYNC_LEN]>::try_from(sync_bytes).map_err(|_| AvroFileError::Truncated {
                at: file.here(),
                what: "header sync marker",
                needed: SYNC_LEN as u64,
                available: sync_bytes.len(),
            })?;
        let text = |key: &str| -> Result<Option<String>> {
            let Some(&(at, value)) = metadata.get(key) else {
                return Ok(None);
            };
            match std::str::from_utf8(value) {
                Ok(text) => Ok(Some(text.to_owned())),
                Err(e) => Err(AvroFileError::Metadata {
                    at,
                    reason: format!("{key} is not UTF-8: {e}"),
                }),
            }
        };
        let schema = text("avro.schema")?.ok_or_else(|| AvroFileError::Metadata {
            at: metadata_at,
            reason: "no avro.schema entry".into(),
        })?;
        let codec = text("avro.codec")?.unwrap_or_else(|| "null".to_owned());
        Ok(Header {
            schema,
            codec,
            sync,
        })
    }
}

/// The header's metadata, a `map<bytes>`: for each key, where its entry starts and its value.
fn read_metadata<'a>(file: &mut Cursor<'a>) -> Result<HashMap<String, (Location, &'a [u8])>> {
    let mut entries = HashMap::new();
    loop {
        let header = file.pos;
        let count = file.read_long("metadata block count")?;
        if count == 0 {
            return Ok(entries);
        }
        let sized = if count < 0 {
            let size = file.read_len("metadata block byte size")?;
            Some(SizedBlock {
                header,
                start: file.pos,
                size,
            })
        } else {
            None
        };
        for _ in 0..count.unsigned_abs() {
            let at = file.here();
            let key = file.read_str("metadata key")?;
            let value = file.read_bytes("metadata value")?;
            if entries.insert(key.to_owned(), (at, value)).is_some() {
                return Err(AvroFileError::Metadata {
                    at,
                    reason: format!("key {key:?} appears twice"),
                });
            }
        }
        if let Some(block) = sized {
            block.check(file, "metadata block")?;
        }
    }
}

/// A block's framing: its object count and its (still compressed) data.
struct BlockFrame<'a> {
    index: usize,
    objects: u64,
    data: &'a [u8],
    /// File offset of `data`.
    data_offset: usize,
}

impl<'a> BlockFrame<'a> {
    /// Reads the block at the cursor, up to and including its sync marker.
    fn read(file: &mut Cursor<'a>, index: usize, sync: &[u8; SYNC_LEN]) -> Result<Self> {
        let at = file.here();
        let objects = file.read_long("block object count")?;
        let objects = u64::try_from(objects).map_err(|_| AvroFileError::Invalid {
            at,
            what: "block object count",
            reason: format!("{objects} is negative"),
        })?;
        let size = file.read_len("block byte size")?;
        let data_offset = file.pos;
        let data = file.take(size, "block data")?;
        let sync_offset = file.pos;
        let found = file.take(SYNC_LEN as u64, "block sync marker")?;
        if found != sync {
            return Err(AvroFileError::SyncMismatch {
                block: index,
                offset: sync_offset,
                expected: *sync,
                found: found.to_vec(),
            });
        }
        Ok(BlockFrame {
            index,
            objects,
            data,
            data_offset,
        })
    }

    /// What offsets in the block's data are relative to: the file itself when the codec left the
    /// data as it was, else the decompressed data.
    fn origin(&self, decompressed: bool) -> Origin {
        if decompressed {
            Origin::Block {
                block: self.index,
                data_offset: self.data_offset,
            }
        } else {
            Origin::File {
                base: self.data_offset,
            }
        }
    }

    fn decompress_error(&self, codec: &'static str, reason: String) -> AvroFileError {
        AvroFileError::Decompress {
            block: self.index,
            offset: self.data_offset,
            codec,
            reason,
        }
    }
}

/// Walks a block's (decompressed) data: `frame.objects` rows that must use it up exactly.
fn read_block_records(
    frame: &BlockFrame<'_>,
    mut cursor: Cursor<'_>,
    row: &Row<'_>,
    skipper: &mut Skipper<'_>,
    records: &mut Vec<RecordBytes>,
) -> Result<()> {
    // Every row takes at least one byte (`Row::new` refuses rows that encode to nothing).
    if frame.objects > cursor.data.len() as u64 {
        return Err(AvroFileError::TooManyObjects {
            block: frame.index,
            offset: frame.data_offset,
            objects: frame.objects,
            size: cursor.data.len(),
        });
    }
    for _ in 0..frame.objects {
        let record = records.len();
        records.push(row.read(&mut cursor, skipper, frame.index, record)?);
    }
    if !cursor.is_empty() {
        return Err(AvroFileError::BlockNotConsumed {
            block: frame.index,
            offset: frame.data_offset,
            objects: frame.objects,
            consumed: cursor.pos,
            size: cursor.data.len(),
        });
    }
    Ok(())
}

/// The block compression codecs this reader understands.
#[derive(Debug, Clone, Copy)]
enum Codec {
    Null,
    Deflate,
    Snappy,
}

impl Codec {
    fn from_name(name: &str) -> Result<Codec> {
        match name {
            "null" => Ok(Codec::Null),
            "deflate" => Ok(Codec::Deflate),
            "snappy" => Ok(Codec::Snappy),
            other => Err(AvroFileError::UnsupportedCodec {
                codec: other.to_owned(),
            }),
        }
    }

    /// The block's data as the codec's writer had it before compression.
    fn decode<'a>(self, frame: &BlockFrame<'a>) -> Result<Cow<'a, [u8]>> {
        match self {
            Codec::Null => Ok(Cow::Borrowed(frame.data)),
            Codec::Deflate => inflate(frame).map(Cow::Owned),
            Codec::Snappy => unsnappy(frame).map(Cow::Owned),
        }
    }
}

/// Raw DEFLATE (RFC 1951, no zlib header). The stream must be complete (reach its final block);
/// bytes after its end are ignored, as Java's and fastavro's readers ignore them: fastavro writes
/// `zlib.compress(data)[2:-1]`, leaving 3 bytes of zlib's Adler-32 after every stream.
fn inflate(frame: &BlockFrame<'_>) -> Result<Vec<u8>> {
    use flate2::{Decompress, FlushDecompress, Status};

    let input = frame.data;
    let limit = (input.len() as u64)
        .saturating_mul(DEFLATE_MAX_RATIO)
        .saturating_add(64);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut inflater = Decompress::new(false);
    let mut out: Vec<u8> = Vec::with_capacity(input.len().saturating_mul(4).clamp(64, limit));
    loop {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(frame.decompress_error(
                    "deflate",
                    format!("inflates to more than {limit} bytes, beyond what DEFLATE can encode"),
                ));
            }
            out.reserve(out.len().clamp(64, limit - out.len()));
        }
        let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
        let rest = usize::try_from(in_before)
            .ok()
            .and_then(|consumed| input.get(consumed..))
            .unwrap_or_default();
        let status = inflater
            .decompress_vec(rest, &mut out, FlushDecompress::None)
            .map_err(|e| frame.decompress_error("deflate", e.to_string()))?;
        match status {
            Status::StreamEnd => break,
            Status::Ok | Status::BufError => {
                let stalled =
                    inflater.total_in() == in_before && inflater.total_out() == out_before;
                if stalled && out.len() < out.capacity() {
                    return Err(frame.decompress_error(
                        "deflate",
                        format!(
                            "the deflate stream is truncated: {} bytes end before its final block",
                            input.len()
                        ),
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Snappy (raw format) followed by the big-endian CRC32 (IEEE) of the uncompressed data.
fn unsnappy(frame: &BlockFrame<'_>) -> Result<Vec<u8>> {
    let Some(split) = frame.data.len().checked_sub(4) else {
        return Err(frame.decompress_error(
            "snappy",
            format!(
                "{} bytes cannot hold the 4-byte CRC32 that ends a snappy block",
                frame.data.len()
            ),
        ));
    };
    let (compressed, crc) = frame.data.split_at(split);
    let announced = snap::raw::decompress_len(compressed)
        .map_err(|e| frame.decompress_error("snappy", e.to_string()))?;
    let bound = (compressed.len() as u64)
        .saturating_mul(SNAPPY_MAX_RATIO)
        .saturating_add(64);
    if announced as u64 > bound {
        return Err(frame.decompress_error(
            "snappy",
            format!(
                "announces {announced} uncompressed bytes from {} compressed bytes, \
                 more than snappy can expand to",
                compressed.len()
            ),
        ));
    }
    let out = snap::raw::Decoder::new()
        .decompress_vec(compressed)
        .map_err(|e| frame.decompress_error("snappy", e.to_string()))?;
    let stored = <[u8; 4]>::try_from(crc)
        .map(u32::from_be_bytes)
        .map_err(|_| frame.decompress_error("snappy", "no CRC32".into()))?;
    let computed = crc32fast::hash(&out);
    if stored != computed {
        return Err(AvroFileError::SnappyCrc {
            block: frame.index,
            offset: frame.data_offset,
            stored,
            computed,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Schemas

/// Index of a [`Node`] in [`SchemaTree::nodes`].
type NodeId = usize;

/// A schema reduced to what decides its binary encoding.
#[derive(Debug)]
enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Fixed { size: u64 },
    Enum { symbols: usize },
    Array { items: NodeId },
    Map { values: NodeId },
    Union { branches: Vec<NodeId> },
    Record { name: String, fields: Vec<Field> },
}

#[derive(Debug)]
struct Field {
    name: String,
    node: NodeId,
}

/// The writer schema as a graph of [`Node`]s; named references point at their definition, so
/// recursive types are cycles.
struct SchemaTree {
    nodes: Vec<Node>,
    /// Whether a node's encoding is always zero bytes (null, fixed(0), records of those).
    empty: Vec<bool>,
    root: NodeId,
}

impl SchemaTree {
    fn parse(text: &str) -> Result<SchemaTree> {
        let schema_error = |reason: String| AvroFileError::Schema { reason };
        let json: Json =
            serde_json::from_str(text).map_err(|e| schema_error(format!("not JSON: {e}")))?;
        let mut parser = SchemaParser::new();
        let root = parser.parse(&json, "").map_err(schema_error)?;
        let nodes = parser.nodes;
        let empty = least_fixpoint(&nodes.iter().map(empty_rule).collect::<Vec<_>>());
        let finite = least_fixpoint(&nodes.iter().map(finite_rule).collect::<Vec<_>>());
        for (node, finite) in nodes.iter().zip(&finite) {
            if let (Node::Record { name, .. }, false) = (node, finite) {
                return Err(schema_error(format!(
                    "record {name:?} has no finite encoding (it contains itself with no union, \
                     array or map in between, or an empty union)"
                )));
            }
        }
        Ok(SchemaTree { nodes, empty, root })
    }
}

/// Parses schema JSON into [`Node`]s, following the specification's naming rules.
struct SchemaParser {
    nodes: Vec<Node>,
    /// Full names of the named types defined so far.
    names: HashMap<String, NodeId>,
}

impl SchemaParser {
    fn new() -> Self {
        use Node::*;
        SchemaParser {
            // Indices match `SchemaParser::primitive`.
            nodes: vec![Null, Boolean, Int, Long, Float, Double, Bytes, String],
            names: HashMap::new(),
        }
    }

    fn primitive(name: &str) -> Option<NodeId> {
        let id = match name {
            "null" => 0,
            "boolean" => 1,
            "int" => 2,
            "long" => 3,
            "float" => 4,
            "double" => 5,
            "bytes" => 6,
            "string" => 7,
            _ => return None,
        };
        Some(id)
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Parses a schema in `namespace` (the enclosing named type's namespace, `""` for none).
    fn parse(&mut self, json: &Json, namespace: &str) -> Result<NodeId, String> {
        match json {
            Json::String(name) => self.resolve(name, namespace),
            Json::Array(branches) => {
                let branches = branches
                    .iter()
                    .map(|branch| self.parse(branch, namespace))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(self.push(Node::Union { branches }))
            }
            Json::Object(object) => self.parse_object(object, namespace),
            other => Err(format!("{other} is not a schema")),
        }
    }

    fn parse_object(
        &mut self,
        object: &Map<String, Json>,
        namespace: &str,
    ) -> Result<NodeId, String> {
        let ty = object.get("type").ok_or_else(|| {
            format!(
                "schema object without \"type\": {}",
                Json::from(object.clone())
            )
        })?;
        // `logicalType` is ignored: it never changes the underlying type's encoding.
        let Json::String(ty) = ty else {
            return self.parse(ty, namespace);
        };
        match ty.as_str() {
            "record" | "error" => self.parse_record(object, namespace),
            "enum" => {
                let symbols = match object.get("symbols") {
                    Some(Json::Array(symbols)) if symbols.iter().all(Json::is_string) => {
                        symbols.len()
                    }
                    _ => return Err("an enum needs a \"symbols\" array of strings".into()),
                };
                self.define(object, namespace, Node::Enum { symbols })
            }
            "fixed" => {
                let size = object
                    .get("size")
                    .and_then(Json::as_u64)
                    .ok_or("a fixed needs a non-negative integer \"size\"")?;
                self.define(object, namespace, Node::Fixed { size })
            }
            "array" => {
                let items = object.get("items").ok_or("an array needs \"items\"")?;
                let items = self.parse(items, namespace)?;
                Ok(self.push(Node::Array { items }))
            }
            "map" => {
                let values = object.get("values").ok_or("a map needs \"values\"")?;
                let values = self.parse(values, namespace)?;
                Ok(self.push(Node::Map { values }))
            }
            // A primitive (with attributes) or a reference to a named type.
            other => self.resolve(other, namespace),
        }
    }

    fn parse_record(
        &mut self,
        object: &Map<String, Json>,
        enclosing: &str,
    ) -> Result<NodeId, String> {
        let (full_name, namespace) = self.full_name(object, enclosing)?;
        // Defined before its fields are parsed, so that they can refer to it.
        let id = self.define(
            object,
            enclosing,
            Node::Record {
                name: full_name.clone(),
                fields: Vec::new(),
            },
        )?;
        let Some(Json::Array(list)) = object.get("fields") else {
            return Err(format!("record {full_name:?} has no \"fields\" array"));
        };
        let mut fields: Vec<Field> = Vec::with_capacity(list.len());
        for (i, field) in list.iter().enumerate() {
            let name = field
                .get("name")
                .and_then(Json::as_str)
                .ok_or_else(|| format!("field {i} of record {full_name:?} has no name"))?;
            if fields.iter().any(|f| f.name == name) {
                return Err(format!(
                    "record {full_name:?} has two fields named {name:?}"
                ));
            }
            let ty = field
                .get("type")
                .ok_or_else(|| format!("field {name:?} of record {full_name:?} has no type"))?;
            let node = self
                .parse(ty, &namespace)
                .map_err(|e| format!("field {name:?} of record {full_name:?}: {e}"))?;
            fields.push(Field {
                name: name.to_owned(),
                node,
            });
        }
        if let Some(Node::Record { fields: slot, .. }) = self.nodes.get_mut(id) {
            *slot = fields;
        }
        Ok(id)
    }

    /// The full name and namespace a named type's definition gives it.
    fn full_name(
        &self,
        object: &Map<String, Json>,
        enclosing: &str,
    ) -> Result<(String, String), String> {
        let name = object
            .get("name")
            .and_then(Json::as_str)
            .filter(|name| !name.is_empty())
            .ok_or("a named type needs a \"name\"")?;
        if let Some(dot) = name.rfind('.') {
            return Ok((name.to_owned(), name[..dot].to_owned()));
        }
        let namespace = match object.get("namespace") {
            None | Some(Json::Null) => enclosing,
            Some(Json::String(namespace)) => namespace,
            Some(other) => return Err(format!("namespace {other} is not a string")),
        };
        let full_name = if namespace.is_empty() {
            name.to_owned()
        } else {
            format!("{namespace}.{name}")
        };
        Ok((full_name, namespace.to_owned()))
    }

    /// Adds a named type's node and registers its full name.
    fn define(
        &mut self,
        object: &Map<String, Json>,
        enclosing: &str,
        node: Node,
    ) -> Result<NodeId, String> {
        let (full_name, _) = self.full_name(object, enclosing)?;
        if Self::primitive(&full_name).is_some() {
            return Err(format!(
                "{full_name:?} is a primitive type and cannot be redefined"
            ));
        }
        if self.names.contains_key(&full_name) {
            return Err(format!("the name {full_name:?} is defined twice"));
        }
        let id = self.push(node);
        self.names.insert(full_name, id);
        Ok(id)
    }

    /// A primitive type name or a reference to a named type defined earlier. An unqualified name
    /// is looked up in the enclosing namespace first, then in the null namespace (as Java does).
    fn resolve(&self, name: &str, namespace: &str) -> Result<NodeId, String> {
        if let Some(id) = Self::primitive(name) {
            return Ok(id);
        }
        let qualified = (!name.contains('.') && !namespace.is_empty())
            .then(|| format!("{namespace}.{name}"))
            .and_then(|qualified| self.names.get(&qualified).copied());
        qualified
            .or_else(|| self.names.get(name).copied())
            .ok_or_else(|| format!("unknown type {name:?}"))
    }
}

/// A monotone property of nodes, given by its value on each node's children.
enum Rule {
    Always(bool),
    AllOf(Vec<NodeId>),
    AnyOf(Vec<NodeId>),
}

fn empty_rule(node: &Node) -> Rule {
    match node {
        Node::Null | Node::Fixed { size: 0 } => Rule::Always(true),
        Node::Record { fields, .. } => Rule::AllOf(fields.iter().map(|f| f.node).collect()),
        _ => Rule::Always(false),
    }
}

/// Whether a node has any finite encoding at all.
fn finite_rule(node: &Node) -> Rule {
    match node {
        Node::Record { fields, .. } => Rule::AllOf(fields.iter().map(|f| f.node).collect()),
        Node::Union { branches } => Rule::AnyOf(branches.clone()),
        _ => Rule::Always(true),
    }
}

/// The least solution of `rules` (true only where it must be), by propagation from the nodes that
/// hold outright: linear in the size of the graph, cycles included.
fn least_fixpoint(rules: &[Rule]) -> Vec<bool> {
    let mut holds = vec![false; rules.len()];
    let mut missing = vec![0usize; rules.len()];
    let mut parents: Vec<Vec<NodeId>> = vec![Vec::new(); rules.len()];
    let mut ready = Vec::new();
    for (id, rule) in rules.iter().enumerate() {
        let children = match rule {
            Rule::Always(holds) => {
                if *holds {
                    ready.push(id);
                }
                continue;
            }
            Rule::AllOf(children) => {
                missing[id] = children.len();
                if children.is_empty() {
                    ready.push(id);
                }
                children
            }
            Rule::AnyOf(children) => children,
        };
        for &child in children {
            if let Some(parents) = parents.get_mut(child) {
                parents.push(id);
            }
        }
    }
    while let Some(id) = ready.pop() {
        if std::mem::replace(&mut holds[id], true) {
            continue;
        }
        for &parent in &parents[id] {
            match rules[parent] {
                Rule::AllOf(_) => {
                    missing[parent] = missing[parent].saturating_sub(1);
                    if missing[parent] == 0 {
                        ready.push(parent);
                    }
                }
                Rule::AnyOf(_) => ready.push(parent),
                Rule::Always(_) => {}
            }
        }
    }
    holds
}

// ---------------------------------------------------------------------------------------------
// Datums

/// The row record: its fields and which of them are the key and the value.
struct Row<'t> {
    fields: &'t [Field],
    key: usize,
    value: usize,
}

impl<'t> Row<'t> {
    fn new(tree: &'t SchemaTree, key_field: &str, value_field: &str) -> Result<Self> {
        let Some(Node::Record { name, fields }) = tree.nodes.get(tree.root) else {
            return Err(AvroFileError::Schema {
                reason: "the writer schema is not a record, so it has no key and value fields"
                    .into(),
            });
        };
        if tree.empty.get(tree.root).copied().unwrap_or(false) {
            return Err(AvroFileError::Schema {
                reason: format!("record {name:?} always encodes to zero bytes"),
            });
        }
        let find = |field: &str| {
            fields
                .iter()
                .position(|f| f.name == field)
                .ok_or_else(|| AvroFileError::MissingField {
                    field: field.to_owned(),
                    record: name.clone(),
                    fields: fields.iter().map(|f| f.name.clone()).collect(),
                })
        };
        Ok(Row {
            fields,
            key: find(key_field)?,
            value: find(value_field)?,
        })
    }

    /// Walks one row datum, keeping the bytes of the key and value fields.
    fn read(
        &self,
        cursor: &mut Cursor<'_>,
        skipper: &mut Skipper<'_>,
        block: usize,
        record: usize,
    ) -> Result<RecordBytes> {
        let mut bytes = RecordBytes {
            key: Vec::new(),
            value: Vec::new(),
        };
        for (i, field) in self.fields.iter().enumerate() {
            let start = cursor.pos;
            skipper
                .skip(cursor, field.node)
                .map_err(|source| AvroFileError::InRecord {
                    block,
                    record,
                    field: field.name.clone(),
                    source: Box::new(source),
                })?;
            if i == self.key {
                bytes.key = cursor.since(start).to_vec();
            }
            if i == self.value {
                bytes.value = cursor.since(start).to_vec();
            }
        }
        Ok(bytes)
    }
}

/// Work left while walking a datum.
#[derive(Debug, Clone, Copy)]
enum Task {
    /// A whole datum of this node.
    Datum(NodeId),
    /// The rest of an array or a map.
    Items(Items),
}

/// An array or map being walked: items left in the current block, then the next block.
#[derive(Debug, Clone, Copy)]
struct Items {
    item: NodeId,
    map: bool,
    left: u64,
    /// The current block, when its count was negative and a byte size followed.
    sized: Option<SizedBlock>,
}

/// A block of an array or map (or of the header's metadata) that announced its byte size.
#[derive(Debug, Clone, Copy)]
struct SizedBlock {
    /// Where the block's count is (a position of the walking cursor).
    header: usize,
    /// Where its items start.
    start: usize,
    size: u64,
}

impl SizedBlock {
    fn check(self, cursor: &Cursor<'_>, what: &'static str) -> Result<()> {
        let actual = cursor.pos.saturating_sub(self.start);
        if actual as u64 != self.size {
            return Err(AvroFileError::CollectionSize {
                at: cursor.location(self.header),
                what,
                announced: self.size,
                actual,
            });
        }
        Ok(())
    }
}

/// Walks datums over their encoding without decoding them, with an explicit stack.
struct Skipper<'t> {
    tree: &'t SchemaTree,
    stack: Vec<Task>,
}

impl<'t> Skipper<'t> {
    fn new(tree: &'t SchemaTree) -> Self {
        Skipper {
            tree,
            stack: Vec::new(),
        }
    }

    /// Moves `cursor` past one datum of `node`.
    fn skip(&mut self, cursor: &mut Cursor<'_>, node: NodeId) -> Result<()> {
        self.stack.clear();
        self.stack.push(Task::Datum(node));
        while let Some(task) = self.stack.pop() {
            match task {
                Task::Datum(node) => self.datum(cursor, node)?,
                Task::Items(items) => self.items(cursor, items)?,
            }
            if self.stack.len() > MAX_PENDING {
                return Err(AvroFileError::TooDeep {
                    at: cursor.here(),
                    limit: MAX_PENDING,
                });
            }
        }
        Ok(())
    }

    /// Consumes a scalar, or pushes the parts of a compound datum.
    fn datum(&mut self, cursor: &mut Cursor<'_>, node: NodeId) -> Result<()> {
        let tree = self.tree;
        let Some(node) = tree.nodes.get(node) else {
            return Err(AvroFileError::Schema {
                reason: format!("internal error: no schema node {node}"),
            });
        };
        match node {
            Node::Null => {}
            Node::Boolean => cursor.read_boolean()?,
            Node::Int => {
                cursor.read_int("int")?;
            }
            Node::Long => {
                cursor.read_long("long")?;
            }
            Node::Float => {
                cursor.take(4, "float")?;
            }
            Node::Double => {
                cursor.take(8, "double")?;
            }
            Node::Bytes => {
                cursor.read_bytes("bytes")?;
            }
            Node::String => {
                cursor.read_str("string")?;
            }
            Node::Fixed { size } => {
                cursor.take(*size, "fixed")?;
            }
            Node::Enum { symbols } => {
                let at = cursor.here();
                let index = cursor.read_int("enum symbol index")?;
                if usize::try_from(index).map_or(true, |i| i >= *symbols) {
                    return Err(AvroFileError::EnumIndex {
                        at,
                        index,
                        symbols: *symbols,
                    });
                }
            }
            Node::Array { items } => self.stack.push(Task::Items(Items::new(*items, false))),
            Node::Map { values } => self.stack.push(Task::Items(Items::new(*values, true))),
            Node::Union { branches } => {
                let at = cursor.here();
                let index = cursor.read_long("union branch index")?;
                let branch = usize::try_from(index).ok().and_then(|i| branches.get(i));
                let Some(&branch) = branch else {
                    return Err(AvroFileError::UnionIndex {
                        at,
                        index,
                        branches: branches.len(),
                    });
                };
                self.stack.push(Task::Datum(branch));
            }
            Node::Record { fields, .. } => {
                let pending = fields.iter().rev().map(|f| Task::Datum(f.node));
                self.stack.extend(pending);
            }
        }
        Ok(())
    }

    /// Next step of an array or map: its next item (and map key), or its next block's header.
    fn items(&mut self, cursor: &mut Cursor<'_>, mut items: Items) -> Result<()> {
        if items.left > 0 {
            items.left -= 1;
            self.stack.push(Task::Items(items));
            if items.map {
                cursor.read_str("map key")?;
            }
            self.stack.push(Task::Datum(items.item));
            return Ok(());
        }
        let (count_what, size_what, block_what) = if items.map {
            ("map block count", "map block byte size", "map block")
        } else {
            ("array block count", "array block byte size", "array block")
        };
        if let Some(block) = items.sized.take() {
            block.check(cursor, block_what)?;
        }
        let header = cursor.pos;
        let count = cursor.read_long(count_what)?;
        if count == 0 {
            return Ok(());
        }
        if count < 0 {
            let size = cursor.read_len(size_what)?;
            items.sized = Some(SizedBlock {
                header,
                start: cursor.pos,
                size,
            });
        }
        // Items that always encode to nothing need no walking, however many there are.
        let item_is_empty = self.tree.empty.get(items.item).copied().unwrap_or(false);
        items.left = if !items.map && item_is_empty {
            0
        } else {
            count.unsigned_abs()
        };
        self.stack.push(Task::Items(items));
        Ok(())
    }
}

impl Items {
    fn new(item: NodeId, map: bool) -> Self {
        Items {
            item,
            map,
            left: 0,
            sized: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use apache_avro::{to_avro_datum, Codec as AvroCodec, Schema, Writer};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    // --- Schemas covering every type -----------------------------------------------------------

    const KEY_SCHEMA: &str = r#"{"type": "record", "name": "MemberKey", "namespace": "rialto.test.key",
        "fields": [{"name": "id", "type": "long"}, {"name": "region", "type": "string"}]}"#;

    const VALUE_SCHEMA: &str = r#"{"type": "record", "name": "Member", "namespace": "rialto.test",
      "fields": [
        {"name": "n", "type": "null"},
        {"name": "flag", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "raw", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "fx", "type": {"type": "fixed", "name": "Hash", "size": 8}},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "ints", "type": {"type": "array", "items": "int"}},
        {"name": "tags", "type": {"type": "map", "values": "string"}},
        {"name": "addr", "type": {"type": "record", "name": "Address", "fields": [
            {"name": "city", "type": "string"}, {"name": "zip", "type": ["null", "int"]}]}},
        {"name": "choice", "type": ["null", "string", "long", "Address", "Hash"]},
        {"name": "dec_bytes", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
        {"name": "dec_fixed", "type": {"type": "fixed", "name": "Dec", "size": 6,
            "logicalType": "decimal", "precision": 14, "scale": 3}},
        {"name": "big", "type": {"type": "bytes", "logicalType": "big-decimal"}},
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "tmillis", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "tmicros", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "tsmillis", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "tsmicros", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "tsnanos", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
        {"name": "ltsmillis", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "ltsmicros", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "ltsnanos", "type": {"type": "long", "logicalType": "local-timestamp-nanos"}},
        {"name": "dur", "type": {"type": "fixed", "name": "Dur", "size": 12, "logicalType": "duration"}},
        {"name": "home", "type": "Address"},
        {"name": "backup", "type": "rialto.test.Hash"},
        {"name": "nested", "type": {"type": "array", "items": {"type": "map", "values": ["null", "Color"]}}},
        {"name": "list", "type": ["null", {"type": "record", "name": "Node", "fields": [
            {"name": "v", "type": "long"}, {"name": "next", "type": ["null", "Node"]}]}]}
      ]}"#;

    fn row_schema_json() -> String {
        format!(
            r#"{{"type": "record", "name": "Row", "namespace": "rialto.row", "fields": [
                {{"name": "before", "type": ["null", "double"]}},
                {{"name": "key", "type": {KEY_SCHEMA}}},
                {{"name": "middle", "type": {{"type": "map", "values": {{"type": "array", "items": "int"}}}}}},
                {{"name": "value", "type": {VALUE_SCHEMA}}},
                {{"name": "after", "type": {{"type": "array", "items": "string"}}}}
            ]}}"#
        )
    }

    // --- Random values of those schemas ---------------------------------------------------------

    fn record(fields: Vec<(&str, Value)>) -> Value {
        Value::Record(fields.into_iter().map(|(n, v)| (n.to_owned(), v)).collect())
    }

    fn union(index: u32, value: Value) -> Value {
        Value::Union(index, Box::new(value))
    }

    fn some_int(rng: &mut StdRng) -> i32 {
        match rng.gen_range(0..6) {
            0 => i32::MIN,
            1 => i32::MAX,
            2 => 0,
            3 => -1,
            4 => rng.gen_range(-200..200),
            _ => rng.gen(),
        }
    }

    fn some_long(rng: &mut StdRng) -> i64 {
        match rng.gen_range(0..6) {
            0 => i64::MIN,
            1 => i64::MAX,
            2 => 0,
            3 => -1,
            4 => rng.gen_range(-200..200),
            _ => rng.gen(),
        }
    }

    fn some_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
        let len = rng.gen_range(0..=max);
        (0..len).map(|_| rng.gen()).collect()
    }

    fn some_string(rng: &mut StdRng) -> String {
        const PIECES: [&str; 6] = ["a", "Zürich", "€", "😀", " ", "rialto"];
        let len = rng.gen_range(0..6);
        (0..len)
            .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
            .collect()
    }

    fn color(rng: &mut StdRng) -> Value {
        const SYMBOLS: [&str; 3] = ["RED", "GREEN", "BLUE"];
        let i = rng.gen_range(0..SYMBOLS.len());
        Value::Enum(i as u32, SYMBOLS[i].to_owned())
    }

    fn address(rng: &mut StdRng) -> Value {
        let zip = if rng.gen() {
            union(0, Value::Null)
        } else {
            union(1, Value::Int(some_int(rng)))
        };
        record(vec![
            ("city", Value::String(some_string(rng))),
            ("zip", zip),
        ])
    }

    fn list(rng: &mut StdRng, depth: usize) -> Value {
        if depth == 0 {
            return union(0, Value::Null);
        }
        let node = record(vec![
            ("v", Value::Long(some_long(rng))),
            ("next", list(rng, depth - 1)),
        ]);
        union(1, node)
    }

    fn fixed(rng: &mut StdRng, size: usize) -> Value {
        Value::Fixed(size, (0..size).map(|_| rng.gen()).collect())
    }

    fn random_key(rng: &mut StdRng, i: usize) -> Value {
        record(vec![
            ("id", Value::Long(i as i64 * 7919 - 1000)),
            ("region", Value::String(some_string(rng))),
        ])
    }

    fn random_value(rng: &mut StdRng) -> Value {
        let ints = (0..rng.gen_range(0..6))
            .map(|_| Value::Int(some_int(rng)))
            .collect();
        let tags = (0..rng.gen_range(0..4))
            .map(|i| {
                (
                    format!("tag{i}{}", some_string(rng)),
                    Value::String(some_string(rng)),
                )
            })
            .collect();
        let choice = match rng.gen_range(0..5) {
            0 => union(0, Value::Null),
            1 => union(1, Value::String(some_string(rng))),
            2 => union(2, Value::Long(some_long(rng))),
            3 => union(3, address(rng)),
            _ => union(4, fixed(rng, 8)),
        };
        let nested = (0..rng.gen_range(0..3))
            .map(|_| {
                let entries = (0..rng.gen_range(0..3))
                    .map(|j| {
                        let v = if rng.gen() {
                            union(0, Value::Null)
                        } else {
                            union(1, color(rng))
                        };
                        (format!("k{j}"), v)
                    })
                    .collect();
                Value::Map(entries)
            })
            .collect();
        let mut decimal_bytes = some_bytes(rng, 5);
        if decimal_bytes.is_empty() {
            decimal_bytes.push(0);
        }
        let big = format!("{}.{}", some_long(rng), rng.gen::<u16>())
            .parse::<apache_avro::BigDecimal>()
            .expect("big decimal");
        let duration = apache_avro::Duration::new(
            apache_avro::Months::new(rng.gen()),
            apache_avro::Days::new(rng.gen()),
            apache_avro::Millis::new(rng.gen()),
        );
        record(vec![
            ("n", Value::Null),
            ("flag", Value::Boolean(rng.gen())),
            ("i", Value::Int(some_int(rng))),
            ("l", Value::Long(some_long(rng))),
            ("f", Value::Float(rng.gen::<f32>() * 1e6 - 5e5)),
            ("d", Value::Double(rng.gen::<f64>() * 1e12 - 5e11)),
            ("raw", Value::Bytes(some_bytes(rng, 20))),
            ("s", Value::String(some_string(rng))),
            ("fx", fixed(rng, 8)),
            ("color", color(rng)),
            ("ints", Value::Array(ints)),
            ("tags", Value::Map(tags)),
            ("addr", address(rng)),
            ("choice", choice),
            (
                "dec_bytes",
                Value::Decimal(apache_avro::Decimal::from(decimal_bytes.clone())),
            ),
            (
                "dec_fixed",
                Value::Decimal(apache_avro::Decimal::from(decimal_bytes)),
            ),
            ("big", Value::BigDecimal(big)),
            ("id", Value::Uuid(apache_avro::Uuid::from_u128(rng.gen()))),
            ("day", Value::Date(some_int(rng))),
            ("tmillis", Value::TimeMillis(rng.gen_range(0..86_400_000))),
            (
                "tmicros",
                Value::TimeMicros(rng.gen_range(0..86_400_000_000)),
            ),
            ("tsmillis", Value::TimestampMillis(some_long(rng))),
            ("tsmicros", Value::TimestampMicros(some_long(rng))),
            ("tsnanos", Value::TimestampNanos(some_long(rng))),
            ("ltsmillis", Value::LocalTimestampMillis(some_long(rng))),
            ("ltsmicros", Value::LocalTimestampMicros(some_long(rng))),
            ("ltsnanos", Value::LocalTimestampNanos(some_long(rng))),
            ("dur", Value::Duration(duration)),
            ("home", address(rng)),
            ("backup", fixed(rng, 8)),
            ("nested", Value::Array(nested)),
            ("list", {
                let depth = rng.gen_range(0..4);
                list(rng, depth)
            }),
        ])
    }

    /// `n` rows, with their keys and values kept apart.
    fn random_rows(seed: u64, n: usize) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut keys, mut values, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let key = random_key(&mut rng, i);
            let value = random_value(&mut rng);
            let before = if rng.gen() {
                union(0, Value::Null)
            } else {
                union(1, Value::Double(rng.gen()))
            };
            let middle = (0..rng.gen_range(0..3))
                .map(|j| {
                    (
                        format!("m{j}"),
                        Value::Array(vec![Value::Int(some_int(&mut rng))]),
                    )
                })
                .collect();
            let after = (0..rng.gen_range(0..3))
                .map(|_| Value::String(some_string(&mut rng)))
                .collect();
            rows.push(record(vec![
                ("before", before),
                ("key", key.clone()),
                ("middle", Value::Map(middle)),
                ("value", value.clone()),
                ("after", Value::Array(after)),
            ]));
            keys.push(key);
            values.push(value);
        }
        (keys, values, rows)
    }

    /// A container file written by `apache_avro`, a block every `per_block` rows.
    fn write_with_apache(codec: AvroCodec, rows: &[Value], per_block: usize) -> Vec<u8> {
        let schema = Schema::parse_str(&row_schema_json()).expect("row schema");
        let mut writer = Writer::with_codec(&schema, Vec::new(), codec);
        for (i, row) in rows.iter().enumerate() {
            writer.append_value_ref(row).expect("append");
            if (i + 1) % per_block == 0 {
                writer.flush().expect("flush");
            }
        }
        writer.into_inner().expect("finish")
    }

    fn deflate() -> AvroCodec {
        AvroCodec::Deflate(apache_avro::DeflateSettings::default())
    }

    fn codecs() -> [(AvroCodec, &'static str); 3] {
        [
            (AvroCodec::Null, "null"),
            (deflate(), "deflate"),
            (AvroCodec::Snappy, "snappy"),
        ]
    }

    fn check_against_apache(codec: AvroCodec, name: &str, seed: u64) {
        let (keys, values, rows) = random_rows(seed, 300);
        let file = write_with_apache(codec, &rows, 37);
        let read = read_records(&file, "key", "value").expect("read");
        assert_eq!(read.codec, name);
        assert!(read.blocks >= 300 / 37, "only {} blocks", read.blocks);
        assert_eq!(read.records.len(), rows.len());
        let row_schema = Schema::parse_str(&row_schema_json()).expect("row schema");
        assert_eq!(
            Schema::parse_str(&read.writer_schema).expect("writer schema"),
            row_schema
        );
        let key_schema = Schema::parse_str(KEY_SCHEMA).expect("key schema");
        let value_schema = Schema::parse_str(VALUE_SCHEMA).expect("value schema");
        for (i, got) in read.records.iter().enumerate() {
            let key = to_avro_datum(&key_schema, keys[i].clone()).expect("encode key");
            let value = to_avro_datum(&value_schema, values[i].clone()).expect("encode value");
            assert_eq!(got.key, key, "{name}: key of record {i}");
            assert_eq!(got.value, value, "{name}: value of record {i}");
        }
    }

    #[test]
    fn null_codec_files_match_apache_encoding() {
        check_against_apache(AvroCodec::Null, "null", 1);
    }

    #[test]
    fn deflate_files_match_apache_encoding() {
        check_against_apache(deflate(), "deflate", 2);
    }

    #[test]
    fn snappy_files_match_apache_encoding() {
        check_against_apache(AvroCodec::Snappy, "snappy", 3);
    }

    #[test]
    fn reads_from_a_path_and_reports_missing_files() {
        let (_, _, rows) = random_rows(4, 5);
        let file = write_with_apache(deflate(), &rows, 2);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rows.avro");
        std::fs::write(&path, &file).expect("write");
        let read = read_records_from_path(&path, "key", "value").expect("read");
        assert_eq!(read, read_records(&file, "key", "value").expect("read"));
        assert_eq!(read.records.len(), 5);
        let missing = read_records_from_path(&dir.path().join("nope.avro"), "key", "value");
        assert!(
            matches!(missing, Err(AvroFileError::Io { .. })),
            "{missing:?}"
        );
    }

    // --- Hand-made container files ---------------------------------------------------------------

    const SYNC: [u8; SYNC_LEN] = *b"0123456789abcdef";

    /// `{key: string, value: [null, long]}`.
    const SIMPLE: &str = r#"{"type": "record", "name": "R", "fields": [
        {"name": "key", "type": "string"}, {"name": "value", "type": ["null", "long"]}]}"#;

    fn long(value: i64, out: &mut Vec<u8>) {
        let mut n = ((value << 1) ^ (value >> 63)) as u64;
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    fn bytes(value: &[u8], out: &mut Vec<u8>) {
        long(value.len() as i64, out);
        out.extend_from_slice(value);
    }

    fn compress(codec: Option<&str>, data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match codec {
            Some("deflate") => {
                let mut encoder =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                encoder.write_all(data).expect("deflate");
                encoder.finish().expect("deflate")
            }
            Some("snappy") => {
                let mut out = snap::raw::Encoder::new()
                    .compress_vec(data)
                    .expect("snappy");
                out.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
                out
            }
            _ => data.to_vec(),
        }
    }

    /// The header: magic, metadata (schema, then codec if given), sync marker.
    fn header(schema: &str, codec: Option<&str>) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        long(1 + i64::from(codec.is_some()), &mut out);
        bytes(b"avro.schema", &mut out);
        bytes(schema.as_bytes(), &mut out);
        if let Some(codec) = codec {
            bytes(b"avro.codec", &mut out);
            bytes(codec.as_bytes(), &mut out);
        }
        long(0, &mut out);
        out.extend_from_slice(&SYNC);
        out
    }

    /// A whole file: `blocks` are (object count, uncompressed data).
    fn container(schema: &str, codec: Option<&str>, blocks: &[(i64, Vec<u8>)]) -> Vec<u8> {
        let mut out = header(schema, codec);
        for (count, data) in blocks {
            let payload = compress(codec, data);
            long(*count, &mut out);
            bytes(&payload, &mut out);
            out.extend_from_slice(&SYNC);
        }
        out
    }

    /// A `SIMPLE` row: key string, value `long` (union branch 1).
    fn simple_row(key: &str, value: i64) -> Vec<u8> {
        let mut out = Vec::new();
        bytes(key.as_bytes(), &mut out);
        long(1, &mut out);
        long(value, &mut out);
        out
    }

    fn simple_file(codec: Option<&str>) -> Vec<u8> {
        let data = [
            simple_row("a", 5),
            simple_row("bb", -70000),
            simple_row("", 0),
        ]
        .concat();
        container(SIMPLE, codec, &[(3, data)])
    }

    /// The error a record's field failed with.
    fn field_error(result: Result<ContainerRecords>) -> AvroFileError {
        match result {
            Err(AvroFileError::InRecord { source, .. }) => *source,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn hand_made_files_give_the_datums_bytes() {
        for codec in [None, Some("null"), Some("deflate"), Some("snappy")] {
            let read = read_records(&simple_file(codec), "key", "value").expect("read");
            assert_eq!(read.codec, codec.unwrap_or("null"));
            assert_eq!(read.blocks, 1);
            assert_eq!(read.writer_schema, SIMPLE);
            let got: Vec<_> = read
                .records
                .iter()
                .map(|r| (r.key.clone(), r.value.clone()))
                .collect();
            assert_eq!(
                got,
                vec![
                    (vec![2, b'a'], vec![2, 10]),
                    (vec![4, b'b', b'b'], vec![2, 0xdf, 0xc5, 0x08]),
                    (vec![0], vec![2, 0]),
                ]
            );
        }
    }

    #[test]
    fn header_only_file_has_no_records() {
        let read = read_records(&header(SIMPLE, Some("snappy")), "key", "value").expect("read");
        assert_eq!((read.blocks, read.records.len()), (0, 0));
    }

    #[test]
    fn key_and_value_may_be_anywhere_in_the_row_and_be_the_same_field() {
        let read = read_records(&simple_file(None), "value", "key").expect("read");
        assert_eq!(read.records[0].key, vec![2, 10]);
        assert_eq!(read.records[0].value, vec![2, b'a']);
        let read = read_records(&simple_file(None), "key", "key").expect("read");
        assert_eq!(read.records[1].key, read.records[1].value);
    }

    /// Logical types on fixed (uuid, duration, decimal) and references to those fixed types.
    #[test]
    fn logical_types_on_fixed_and_references_to_them() {
        let value_schema = r#"{"type": "record", "name": "V", "fields": [
            {"name": "u", "type": {"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"}},
            {"name": "d", "type": {"type": "fixed", "name": "D", "size": 12, "logicalType": "duration"}},
            {"name": "d2", "type": "D"},
            {"name": "c", "type": {"type": "fixed", "name": "C", "size": 4, "logicalType": "decimal", "precision": 9}},
            {"name": "c2", "type": ["null", "C"]},
            {"name": "u2", "type": "U"}]}"#;
        let schema = format!(
            r#"{{"type": "record", "name": "Row", "fields": [
                {{"name": "key", "type": {{"type": "string", "logicalType": "uuid"}}}},
                {{"name": "value", "type": {value_schema}}}]}}"#
        );
        let mut key = Vec::new();
        bytes(b"123e4567-e89b-12d3-a456-426614174000", &mut key);
        let mut value: Vec<u8> = (0u8..16).collect();
        value.extend(100u8..112);
        value.extend(200u8..212);
        value.extend([0xff, 0xff, 0xfe, 0x0c]);
        value.push(2);
        value.extend([0, 0, 1, 0]);
        value.extend(16u8..32);
        let file = container(
            &schema,
            Some("deflate"),
            &[(1, [key.clone(), value.clone()].concat())],
        );
        let read = read_records(&file, "key", "value").expect("read");
        assert_eq!(read.records, vec![RecordBytes { key, value }]);
    }

    /// Arrays and maps in several blocks, with negative counts followed by byte sizes.
    #[test]
    fn blocked_arrays_and_maps() {
        let schema = r#"{"type": "record", "name": "Row", "fields": [
            {"name": "key", "type": {"type": "array", "items": "long"}},
            {"name": "value", "type": {"type": "map", "values": {"type": "array", "items": "null"}}}]}"#;
        let mut key = Vec::new();
        long(-2, &mut key); // two items, then their byte size
        long(2, &mut key);
        long(1, &mut key);
        long(-1, &mut key);
        long(1, &mut key); // one item
        long(3, &mut key);
        long(0, &mut key);
        let mut entry = Vec::new();
        bytes(b"ab", &mut entry);
        long(i64::MAX, &mut entry); // that many nulls take no bytes
        long(0, &mut entry);
        let mut value = Vec::new();
        long(-1, &mut value); // one entry, then its byte size
        long(entry.len() as i64, &mut value);
        value.extend_from_slice(&entry);
        long(0, &mut value);
        let file = container(schema, None, &[(1, [key.clone(), value.clone()].concat())]);
        let read = read_records(&file, "key", "value").expect("read");
        assert_eq!(
            read.records,
            vec![RecordBytes {
                key: key.clone(),
                value
            }]
        );

        let mut wrong_size = key.clone();
        wrong_size[1] = 6; // the first block announces 3 bytes instead of 2
        let file = container(schema, None, &[(1, [wrong_size, vec![0]].concat())]);
        let error = field_error(read_records(&file, "key", "value"));
        assert!(
            matches!(
                error,
                AvroFileError::CollectionSize {
                    announced: 3,
                    actual: 2,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn deeply_nested_recursive_data_is_walked_without_recursion() {
        let schema = r#"{"type": "record", "name": "Row", "fields": [
            {"name": "key", "type": "int"},
            {"name": "value", "type": {"type": "record", "name": "Tree", "fields": [
                {"name": "left", "type": ["null", "Tree"]}, {"name": "v", "type": "long"}]}}]}"#;
        let depth = 200_000;
        let mut value = vec![2u8; depth]; // `left` is a Tree, `depth` times
        value.push(0); // then null
        value.extend(std::iter::repeat_n(0u8, depth + 1)); // and every `v`
        let row = [vec![0u8], value.clone()].concat();
        let read = read_records(
            &container(schema, Some("snappy"), &[(1, row)]),
            "key",
            "value",
        )
        .expect("read");
        assert_eq!(read.records[0].value, value);

        let depth = MAX_PENDING + 10;
        let mut row = vec![0u8];
        row.extend(std::iter::repeat_n(2u8, depth));
        row.push(0);
        row.extend(std::iter::repeat_n(0u8, depth + 1));
        let error = field_error(read_records(
            &container(schema, None, &[(1, row)]),
            "key",
            "value",
        ));
        assert!(matches!(error, AvroFileError::TooDeep { .. }), "{error}");
    }

    // --- Errors ---------------------------------------------------------------------------------

    #[test]
    fn every_truncation_of_a_single_block_file_is_an_error() {
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for codec in [None, Some("deflate"), Some("snappy")] {
            files.push((format!("hand-made {codec:?}"), simple_file(codec)));
        }
        let (_, _, rows) = random_rows(5, 3);
        for (codec, name) in codecs() {
            files.push((
                format!("apache {name}"),
                write_with_apache(codec, &rows, 100),
            ));
        }
        for (name, file) in files {
            let full = read_records(&file, "key", "value").expect("whole file");
            assert_eq!(full.blocks, 1, "{name}");
            // The header alone is a valid file without records; every other prefix is not.
            let header_len = file.len() - full_block_len(&file);
            for len in 0..file.len() {
                match read_records(&file[..len], "key", "value") {
                    Ok(read) => {
                        assert_eq!(len, header_len, "{name}: prefix of {len} bytes accepted");
                        assert!(read.records.is_empty());
                    }
                    Err(error) => assert!(!error.to_string().is_empty()),
                }
            }
        }
    }

    /// Length of a single-block file's only block: from after the header's sync to the end.
    fn full_block_len(file: &[u8]) -> usize {
        let sync = &file[file.len() - SYNC_LEN..];
        let header_end = file
            .windows(SYNC_LEN)
            .position(|w| w == sync)
            .expect("header sync")
            + SYNC_LEN;
        file.len() - header_end
    }

    #[test]
    fn truncations_of_a_multi_block_file_fail_or_give_whole_blocks() {
        let (_, _, rows) = random_rows(6, 12);
        for (codec, name) in codecs() {
            let file = write_with_apache(codec, &rows, 4);
            let full = read_records(&file, "key", "value").expect("whole file");
            assert_eq!(full.blocks, 3, "{name}");
            let mut accepted = 0;
            for len in 0..file.len() {
                if let Ok(read) = read_records(&file[..len], "key", "value") {
                    assert!(
                        file[..len].ends_with(&file[file.len() - SYNC_LEN..]),
                        "{name} {len}"
                    );
                    assert_eq!(read.records[..], full.records[..read.records.len()]);
                    accepted += 1;
                }
            }
            assert_eq!(accepted, 3, "{name}: the header and the first two blocks");
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let (_, _, rows) = random_rows(7, 4);
        let mut files: Vec<Vec<u8>> = codecs()
            .into_iter()
            .map(|(codec, _)| write_with_apache(codec, &rows, 2))
            .collect();
        files.push(simple_file(Some("snappy")));
        for file in files {
            for pos in 0..file.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut corrupted = file.clone();
                    corrupted[pos] ^= flip;
                    let _ = read_records(&corrupted, "key", "value");
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(8);
        for _ in 0..2000 {
            let mut garbage = header(SIMPLE, None);
            garbage.extend(some_bytes(&mut rng, 40));
            let _ = read_records(&garbage, "key", "value");
        }
    }

    #[test]
    fn corrupted_sync_marker_is_reported() {
        let mut file = simple_file(Some("deflate"));
        let last = file.len() - 1;
        file[last] ^= 0x55;
        let error = read_records(&file, "key", "value").expect_err("bad sync");
        assert!(
            matches!(error, AvroFileError::SyncMismatch { block: 0, .. }),
            "{error}"
        );
        assert!(error
            .to_string()
            .contains(&format!("file offset {}", file.len() - SYNC_LEN)));
    }

    #[test]
    fn bad_snappy_crc_is_reported() {
        let mut file = simple_file(Some("snappy"));
        let crc_byte = file.len() - SYNC_LEN - 1;
        file[crc_byte] ^= 0x01;
        let error = read_records(&file, "key", "value").expect_err("bad crc");
        assert!(
            matches!(error, AvroFileError::SnappyCrc { block: 0, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("CRC32 mismatch"));

        let (_, _, rows) = random_rows(9, 3);
        let mut file = write_with_apache(AvroCodec::Snappy, &rows, 100);
        let crc_byte = file.len() - SYNC_LEN - 2;
        file[crc_byte] ^= 0x10;
        let error = read_records(&file, "key", "value").expect_err("bad crc");
        assert!(matches!(error, AvroFileError::SnappyCrc { .. }), "{error}");
    }

    #[test]
    fn unknown_codecs_are_refused() {
        for codec in ["zstandard", "bzip2", "xz", "NULL", ""] {
            let file = container(SIMPLE, Some(codec), &[]);
            let error = read_records(&file, "key", "value").expect_err("codec");
            assert!(
                matches!(&error, AvroFileError::UnsupportedCodec { codec: c } if c == codec),
                "{error}"
            );
            assert!(error.to_string().contains("unsupported codec"));
        }
    }

    #[test]
    fn union_index_out_of_range_is_reported() {
        for (index, message) in [(2, "index 2"), (-1, "index -1"), (i64::MAX, "out of range")] {
            let mut row = Vec::new();
            bytes(b"k", &mut row);
            long(index, &mut row);
            let file = container(SIMPLE, None, &[(1, row)]);
            let result = read_records(&file, "key", "value");
            let text = result
                .as_ref()
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(
                text.contains("field \"value\"") && text.contains(message),
                "{text}"
            );
            let error = field_error(result);
            assert!(
                matches!(error, AvroFileError::UnionIndex { index: i, branches: 2, at: Location::File { offset } }
                    if i == index && offset == file.len() - SYNC_LEN - row_len(index)),
                "{error}"
            );
        }
    }

    fn row_len(index: i64) -> usize {
        let mut out = Vec::new();
        long(index, &mut out);
        out.len()
    }

    #[test]
    fn malformed_datums_are_reported() {
        let schema = |value: &str| {
            format!(
                r#"{{"type": "record", "name": "R", "fields": [{{"name": "key", "type": "int"}},
                    {{"name": "value", "type": {value}}}]}}"#
            )
        };
        let check = |value_schema: &str, value: Vec<u8>, expected: &str| {
            let file = container(
                &schema(value_schema),
                Some("deflate"),
                &[(1, [vec![0], value].concat())],
            );
            let error = field_error(read_records(&file, "key", "value"));
            assert!(error.to_string().contains(expected), "{error}");
            assert!(
                error.to_string().contains("of block 0's decompressed data"),
                "{error}"
            );
        };
        check(
            r#"{"type": "enum", "name": "E", "symbols": ["A"]}"#,
            vec![2],
            "enum symbol index 1",
        );
        check(r#""boolean""#, vec![2], "neither 0 nor 1");
        check(r#""string""#, vec![4, 0xc3, 0x28], "not UTF-8");
        check(r#""long""#, vec![0xff; 11], "varint longer than 10 bytes");
        check(
            r#""int""#,
            vec![0xff, 0xff, 0xff, 0xff, 0x1f],
            "varint longer than 5 bytes",
        );
        check(r#""bytes""#, vec![1], "-1 is negative");
        check(
            r#""bytes""#,
            vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            "needs 9223372036854775807 byte(s)",
        );
        check(
            r#"{"type": "array", "items": "long"}"#,
            vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            "long needs 1 byte(s)",
        );
        check(
            r#"{"type": "map", "values": "long"}"#,
            vec![2, 2, b'k', 4],
            "map block count needs 1 byte(s)",
        );
        check(
            r#"{"type": "fixed", "name": "F", "size": 1000000}"#,
            vec![0; 10],
            "fixed needs 1000000 byte(s)",
        );
    }

    #[test]
    fn block_framing_errors_are_reported() {
        let row = simple_row("a", 1);
        let error = read_records(
            &container(SIMPLE, None, &[(1, [row.clone(), vec![0]].concat())]),
            "key",
            "value",
        )
        .expect_err("extra byte");
        assert!(
            matches!(
                error,
                AvroFileError::BlockNotConsumed {
                    consumed: 4,
                    size: 5,
                    ..
                }
            ),
            "{error}"
        );
        let error = read_records(
            &container(SIMPLE, None, &[(5, row.clone())]),
            "key",
            "value",
        )
        .expect_err("too many objects");
        assert!(
            matches!(error, AvroFileError::TooManyObjects { objects: 5, .. }),
            "{error}"
        );
        let error = read_records(
            &container(SIMPLE, None, &[(2, row.clone())]),
            "key",
            "value",
        )
        .expect_err("object missing");
        assert!(
            matches!(error, AvroFileError::InRecord { record: 1, .. }),
            "{error}"
        );
        let error = read_records(
            &container(SIMPLE, None, &[(-1, row.clone())]),
            "key",
            "value",
        )
        .expect_err("negative count");
        assert!(error.to_string().contains("block object count"), "{error}");

        // A block announcing more data than the file has.
        let mut file = header(SIMPLE, None);
        long(1, &mut file);
        long(i64::MAX, &mut file);
        file.extend_from_slice(&row);
        let error = read_records(&file, "key", "value").expect_err("huge block");
        assert!(
            matches!(
                error,
                AvroFileError::Truncated {
                    what: "block data",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn corrupt_compressed_blocks_are_reported() {
        // Deflate data cut short, or not deflate at all (a reserved block type).
        let data = simple_row("abc", 3);
        let deflated = compress(Some("deflate"), &data);
        for payload in [deflated[..deflated.len() - 1].to_vec(), vec![0x07, 0, 0]] {
            let mut file = header(SIMPLE, Some("deflate"));
            long(1, &mut file);
            bytes(&payload, &mut file);
            file.extend_from_slice(&SYNC);
            let error = read_records(&file, "key", "value").expect_err("bad deflate");
            assert!(
                matches!(
                    error,
                    AvroFileError::Decompress {
                        codec: "deflate",
                        ..
                    }
                ),
                "{error}"
            );
        }
        // Snappy announcing 4 GiB from a few bytes, and a snappy block too short for its CRC.
        for payload in [
            vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0, 0, 0, 0],
            vec![0, 0],
        ] {
            let mut file = header(SIMPLE, Some("snappy"));
            long(1, &mut file);
            bytes(&payload, &mut file);
            file.extend_from_slice(&SYNC);
            let error = read_records(&file, "key", "value").expect_err("bad snappy");
            assert!(
                matches!(
                    error,
                    AvroFileError::Decompress {
                        codec: "snappy",
                        ..
                    }
                ),
                "{error}"
            );
        }
    }

    /// fastavro leaves 3 bytes of zlib's Adler-32 after each deflate stream; readers ignore them.
    #[test]
    fn bytes_after_a_deflate_stream_are_ignored() {
        let data = [simple_row("abc", 3), simple_row("d", -1)].concat();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut zlib, &data).expect("zlib");
        let zlib = zlib.finish().expect("zlib");
        let payload = &zlib[2..zlib.len() - 1]; // what fastavro writes
        let mut file = header(SIMPLE, Some("deflate"));
        long(2, &mut file);
        bytes(payload, &mut file);
        file.extend_from_slice(&SYNC);
        let read = read_records(&file, "key", "value").expect("read");
        assert_eq!(read.records.len(), 2);
        assert_eq!(read.records[1].value, vec![2, 1]);
    }

    #[test]
    fn header_errors_are_reported() {
        let error = read_records(b"Obj\x02rest", "key", "value").expect_err("magic");
        assert!(matches!(error, AvroFileError::BadMagic { .. }), "{error}");
        let error = read_records(b"Ob", "key", "value").expect_err("short");
        assert!(
            matches!(error, AvroFileError::Truncated { what: "magic", .. }),
            "{error}"
        );

        // Metadata announcing i64::MAX entries, or a key of i64::MAX bytes.
        for announced in [
            vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            vec![
                2, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ] {
            let file = [MAGIC.to_vec(), announced].concat();
            let error = read_records(&file, "key", "value").expect_err("huge metadata");
            assert!(matches!(error, AvroFileError::Truncated { .. }), "{error}");
        }

        let mut file = MAGIC.to_vec();
        long(1, &mut file);
        bytes(b"avro.codec", &mut file);
        bytes(b"null", &mut file);
        long(0, &mut file);
        file.extend_from_slice(&SYNC);
        let error = read_records(&file, "key", "value").expect_err("no schema");
        assert!(error.to_string().contains("no avro.schema"), "{error}");

        let mut file = MAGIC.to_vec();
        long(2, &mut file);
        for _ in 0..2 {
            bytes(b"avro.schema", &mut file);
            bytes(SIMPLE.as_bytes(), &mut file);
        }
        long(0, &mut file);
        file.extend_from_slice(&SYNC);
        let error = read_records(&file, "key", "value").expect_err("duplicate key");
        assert!(error.to_string().contains("appears twice"), "{error}");
    }

    #[test]
    fn schema_errors_are_reported() {
        let error = read_records(&simple_file(None), "id", "value").expect_err("missing field");
        assert!(
            matches!(&error, AvroFileError::MissingField { field, .. } if field == "id"),
            "{error}"
        );
        let cases = [
            (r#""long""#, "not a record"),
            ("{", "not JSON"),
            (
                r#"{"type": "record", "name": "R", "fields": [{"name": "key", "type": "Nope"}]}"#,
                "unknown type \"Nope\"",
            ),
            (
                r#"{"type": "record", "name": "R", "fields": [{"name": "key", "type": "R"}]}"#,
                "no finite encoding",
            ),
            (
                r#"{"type": "record", "name": "R", "fields": [{"name": "key", "type": "null"}]}"#,
                "zero bytes",
            ),
            (
                r#"{"type": "record", "name": "R", "fields": [{"name": "key", "type": "int"}, {"name": "key", "type": "int"}]}"#,
                "two fields",
            ),
            (
                r#"{"type": "record", "name": "R", "fields": [{"name": "key", "type": {"type": "fixed", "name": "R", "size": 1}}]}"#,
                "defined twice",
            ),
        ];
        for (schema, expected) in cases {
            let error =
                read_records(&container(schema, None, &[]), "key", "key").expect_err(schema);
            assert!(error.to_string().contains(expected), "{schema}: {error}");
        }
    }

    #[test]
    fn names_resolve_through_namespaces() {
        let schema = r#"{"type": "record", "name": "Row", "namespace": "a.b", "fields": [
            {"name": "key", "type": {"type": "fixed", "name": "K", "size": 2}},
            {"name": "x", "type": {"type": "record", "name": "c.Inner", "fields": [
                {"name": "k", "type": {"type": "fixed", "name": "K", "size": 3}},
                {"name": "top", "type": {"type": "fixed", "name": "T", "namespace": "", "size": 1}}]}},
            {"name": "value", "type": {"type": "array", "items": ["a.b.K", "c.K", "T"]}}]}"#;
        let mut value = Vec::new();
        long(3, &mut value);
        value.extend([0, 1, 1]); // a.b.K
        value.extend([2, 2, 2, 2]); // c.K
        value.extend([4, 3]); // T
        long(0, &mut value);
        let row = [vec![9, 9, 7, 7, 7, 5], value.clone()].concat();
        let read =
            read_records(&container(schema, None, &[(1, row)]), "key", "value").expect("read");
        assert_eq!(
            read.records,
            vec![RecordBytes {
                key: vec![9, 9],
                value
            }]
        );
    }

    // --- Files written by another implementation --------------------------------------------------

    /// Files written with Python's fastavro, committed with their expected datums (hex).
    #[test]
    fn foreign_fastavro_files_match_their_expected_bytes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/foreign");
        let expected_path = dir.join("expected.jsonl");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e} (committed test data)", expected_path.display()));
        let expected: Vec<RecordBytes> = expected
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let json: Json = serde_json::from_str(line).expect("expected.jsonl line");
                let hex = |field: &str| {
                    unhex(
                        json[field]
                            .as_str()
                            .unwrap_or_else(|| panic!("no {field} in {line}")),
                    )
                };
                RecordBytes {
                    key: hex("key_hex"),
                    value: hex("value_hex"),
                }
            })
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no records",
            expected_path.display()
        );
        for (file, codec) in [
            ("members.deflate.avro", "deflate"),
            ("members.snappy.avro", "snappy"),
        ] {
            let read = read_records_from_path(&dir.join(file), "key", "value")
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(read.codec, codec, "{file}");
            assert_eq!(read.records.len(), expected.len(), "{file}: record count");
            for (i, (got, want)) in read.records.iter().zip(&expected).enumerate() {
                assert_eq!(got.key, want.key, "{file}: key of record {i}");
                assert_eq!(got.value, want.value, "{file}: value of record {i}");
            }
        }
    }

    fn unhex(text: &str) -> Vec<u8> {
        text.as_bytes()
            .chunks(2)
            .map(|pair| {
                let pair = std::str::from_utf8(pair).expect("ASCII hex");
                assert_eq!(pair.len(), 2, "odd hex length: {text}");
                u8::from_str_radix(pair, 16).unwrap_or_else(|e| panic!("{text}: {e}"))
            })
            .collect()
    }
}
