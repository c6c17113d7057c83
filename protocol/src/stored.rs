//! What a value looks like at rest, and how a large one is split into chunks.
//!
//! A server stores every value as `schema_id u32 BE ‖ body` ([`StoredValue`](crate::wire::StoredValue))
//! and returns it untouched. The body depends on the version's [`ValueFormat`](crate::meta::ValueFormat):
//!
//! ```text
//! schema-id-prefixed   body = payload
//! checksummed          body = checksum u64 BE ‖ payload
//! ```
//!
//! The payload is the Avro datum, compressed when the version's compression says so. The
//! checksum is [`value_checksum`] of the schema id and the *uncompressed* datum — the bytes the
//! application gets — computed by the writer (push job) and verified by the client on every read,
//! so corruption anywhere between them (broker, disk, memory, network, a decompressor) is an
//! error, never a wrong value.
//!
//! **Chunking.** A body larger than [`CHUNK_BODY_BYTES`] does not fit one topic record. The
//! writer stores it as a *manifest* under the key and the body's pieces as *chunks* under
//! [`chunk_key`]s right after it in key order (the same partition: the partition is the key's):
//!
//! ```text
//! key                 MANIFEST_SCHEMA_ID ‖ format u8 = 1 ‖ schema_id u32 ‖ chunk_count u32 ‖ body_bytes u64
//! key ‖ 0u32 BE       CHUNK_SCHEMA_ID ‖ body[0 .. CHUNK_BODY_BYTES]
//! key ‖ 1u32 BE       CHUNK_SCHEMA_ID ‖ body[CHUNK_BODY_BYTES ..]
//! ```
//!
//! **Chunked real-time values.** A real-time write may replace a chunked value while it is being
//! read, and a partition leader copies it record by record, so its layout differs
//! ([`split_value_replacing`]):
//!
//! ```text
//! key ‖ generation u64 ‖ 0u32   CHUNK_SCHEMA_ID ‖ body[0 .. CHUNK_BODY_BYTES]
//! key ‖ generation u64 ‖ 1u32   CHUNK_SCHEMA_ID ‖ body[CHUNK_BODY_BYTES ..]
//! key                           MANIFEST_SCHEMA_ID ‖ format u8 = 2 ‖ schema_id u32 ‖ chunk_count u32 ‖ body_bytes u64 ‖ generation u64
//! ```
//!
//! The generation (random, per value) keeps a new value's chunks apart from those of the value
//! it replaces, which stays whole until the new manifest, written after its chunks, lands; a
//! server applying a write over a generation's manifest deletes that generation's chunks. A
//! leader copying into a compressed version compresses each chunk on its own (the first one's
//! checksum excepted), so the body is the checksum followed by one compressed frame per chunk,
//! which a decompressor reads as one value; `body_bytes` is then the body's size before
//! compression, an upper bound of the chunks' sizes within [`CHUNK_FRAME_SLACK_BYTES`] each.
//!
//! A server that reads a manifest fetches the chunks and answers with `schema_id ‖ body`, as if
//! the value had been stored whole; clients never see manifests or chunks, and a read of a
//! chunk's key is answered "not found". Chunk keys never collide with real keys: a key is one
//! Avro datum of the key schema, and an Avro datum is never a proper prefix of another datum of
//! the same schema, so `key ‖ suffix` is never a key. They sort after their key and before any
//! other key for the same reason, so a sorted push stays sorted.

use crate::envelope::{EnvelopeError, Reader};

/// Schema id of a manifest (never a registered value schema).
pub const MANIFEST_SCHEMA_ID: u32 = u32::MAX;
/// Schema id of a chunk (never a registered value schema).
pub const CHUNK_SCHEMA_ID: u32 = u32::MAX - 1;
/// Schema ids at or above this are reserved for Rialto's own records.
pub const RESERVED_SCHEMA_IDS: u32 = u32::MAX - 15;
/// Largest body stored whole; larger ones are chunked. Below the envelope's value limit with
/// room for the record's other fields.
pub const CHUNK_BODY_BYTES: usize = 768 * 1024;
/// Ceiling of a store's `max_value_bytes` (serialized Avro datum, before compression).
pub const VALUE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
/// Largest stored value a server returns and a client accepts: a whole value of the largest
/// size with its schema id and checksum, and room for a compressed frame that grew.
pub const STORED_VALUE_BYTES_MAX: usize = VALUE_BYTES_LIMIT as usize + 64 * 1024;
/// Bytes a chunk key adds to its key.
pub const CHUNK_KEY_SUFFIX_BYTES: usize = 4;
/// Bytes a chunk key of a generation (a real-time write's chunked value) adds to its key.
pub const GENERATION_CHUNK_KEY_SUFFIX_BYTES: usize = 12;
/// Bytes a chunk of a generation may grow by when compressed on its own (above zstd's bound for
/// a chunk, `ZSTD_compressBound`).
pub const CHUNK_FRAME_SLACK_BYTES: usize = 8 * 1024;
/// Bytes of a checksummed body before its payload.
pub const CHECKSUM_BYTES: usize = 8;

const MANIFEST_FORMAT: u8 = 1;
/// A manifest whose chunks carry its generation.
const MANIFEST_FORMAT_GENERATION: u8 = 2;
const MANIFEST_BYTES: usize = 1 + 4 + 4 + 8 + 8;

/// The checksum of a value: xxh3-64 of the uncompressed datum, seeded with the schema id (so a
/// value with the wrong schema id fails it too).
pub fn value_checksum(schema_id: u32, datum: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(datum, u64::from(schema_id))
}

/// The key of chunk `index` of `key`'s value.
pub fn chunk_key(key: &[u8], index: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + CHUNK_KEY_SUFFIX_BYTES);
    out.extend_from_slice(key);
    out.extend_from_slice(&index.to_be_bytes());
    out
}

/// A chunked value's manifest: what to fetch and what to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkManifest {
    /// The schema id of the value itself.
    pub schema_id: u32,
    pub chunk_count: u32,
    /// Bytes of the body the chunks hold together (for a generation, before compression).
    pub body_bytes: u64,
    /// The generation its chunks' keys carry (a real-time write's value); `None`: a push's.
    pub generation: Option<u64>,
}

impl ChunkManifest {
    /// The manifest body (stored after [`MANIFEST_SCHEMA_ID`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MANIFEST_BYTES);
        out.push(match self.generation {
            None => MANIFEST_FORMAT,
            Some(_) => MANIFEST_FORMAT_GENERATION,
        });
        out.extend_from_slice(&self.schema_id.to_be_bytes());
        out.extend_from_slice(&self.chunk_count.to_be_bytes());
        out.extend_from_slice(&self.body_bytes.to_be_bytes());
        if let Some(generation) = self.generation {
            out.extend_from_slice(&generation.to_be_bytes());
        }
        out
    }

    /// The key of chunk `index` of the value this manifest stores under `key`.
    pub fn chunk_key(&self, key: &[u8], index: u32) -> Vec<u8> {
        match self.generation {
            None => chunk_key(key, index),
            Some(generation) => {
                let mut out = Vec::with_capacity(key.len() + GENERATION_CHUNK_KEY_SUFFIX_BYTES);
                out.extend_from_slice(key);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out
            }
        }
    }

    /// Decodes a manifest body; refuses one whose sizes cannot be a valid chunked value.
    pub fn decode(body: &[u8]) -> Result<ChunkManifest, EnvelopeError> {
        let mut r = Reader::new(body);
        let format = r.u8()?;
        if format != MANIFEST_FORMAT && format != MANIFEST_FORMAT_GENERATION {
            return Err(EnvelopeError::UnsupportedFormat(format));
        }
        let schema_id = r.u32()?;
        let chunk_count = r.u32()?;
        let body_bytes = r.u64()?;
        let generation = match format {
            MANIFEST_FORMAT_GENERATION => Some(r.u64()?),
            _ => None,
        };
        if r.remaining() != 0 {
            return Err(EnvelopeError::TrailingBytes(r.remaining()));
        }
        let max_chunks = (STORED_VALUE_BYTES_MAX).div_ceil(CHUNK_BODY_BYTES) as u64;
        if body_bytes > STORED_VALUE_BYTES_MAX as u64
            || u64::from(chunk_count) > max_chunks
            || u64::from(chunk_count) != body_bytes.div_ceil(CHUNK_BODY_BYTES as u64)
        {
            return Err(EnvelopeError::TooLarge {
                what: "chunked value",
                len: body_bytes as usize,
                max: STORED_VALUE_BYTES_MAX,
            });
        }
        Ok(ChunkManifest {
            schema_id,
            chunk_count,
            body_bytes,
            generation,
        })
    }

    /// The most bytes its chunks may hold together.
    fn stored_bytes_max(&self) -> u64 {
        match self.generation {
            None => self.body_bytes,
            Some(_) => {
                self.body_bytes + u64::from(self.chunk_count) * CHUNK_FRAME_SLACK_BYTES as u64
            }
        }
    }
}

/// The index of a chunk of a generation, from its key (its last four bytes).
pub fn generation_chunk_index(chunk_key: &[u8]) -> Option<u32> {
    let (_, index) = chunk_key.split_last_chunk::<4>()?;
    Some(u32::from_be_bytes(*index))
}

/// One record to write for a value: `(key, schema_id, body)`.
pub type StoredPiece = (Vec<u8>, u32, Vec<u8>);

/// The records that store `body` under `key`: the value itself when it fits one record, else
/// its manifest followed by its chunks, in key order.
pub fn split_value(key: Vec<u8>, schema_id: u32, body: Vec<u8>) -> Vec<StoredPiece> {
    let mut pieces = split(key, schema_id, body, None);
    pieces.rotate_right(1);
    pieces
}

/// The records that store `body` under `key` over whatever value `key` has (a real-time
/// write): the value itself when it fits one record, else its chunks, under keys of
/// `generation`, followed by its manifest.
pub fn split_value_replacing(
    key: Vec<u8>,
    schema_id: u32,
    body: Vec<u8>,
    generation: u64,
) -> Vec<StoredPiece> {
    split(key, schema_id, body, Some(generation))
}

/// `body` under `key`: itself when it fits one record, else its chunks and then its manifest.
fn split(key: Vec<u8>, schema_id: u32, body: Vec<u8>, generation: Option<u64>) -> Vec<StoredPiece> {
    if body.len() <= CHUNK_BODY_BYTES {
        return vec![(key, schema_id, body)];
    }
    let chunks: Vec<&[u8]> = body.chunks(CHUNK_BODY_BYTES).collect();
    let manifest = ChunkManifest {
        schema_id,
        chunk_count: chunks.len() as u32,
        body_bytes: body.len() as u64,
        generation,
    };
    let mut pieces = Vec::with_capacity(chunks.len() + 1);
    for (i, chunk) in chunks.iter().enumerate() {
        let chunk_key = manifest.chunk_key(&key, i as u32);
        pieces.push((chunk_key, CHUNK_SCHEMA_ID, chunk.to_vec()));
    }
    pieces.push((key, MANIFEST_SCHEMA_ID, manifest.encode()));
    pieces
}

/// Reassembles a chunked value from its manifest and its chunks' stored values (in index
/// order), into the stored form of the whole value (`schema_id ‖ body`). `None` for a missing
/// chunk.
pub fn assemble<'a>(
    manifest: &ChunkManifest,
    chunks: impl IntoIterator<Item = Option<&'a [u8]>>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(4 + manifest.body_bytes as usize);
    out.extend_from_slice(&manifest.schema_id.to_be_bytes());
    let mut count = 0u32;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let stored =
            chunk.ok_or_else(|| format!("chunk {i} of {} is missing", manifest.chunk_count))?;
        let (id, piece) = stored
            .split_first_chunk::<4>()
            .map(|(id, rest)| (u32::from_be_bytes(*id), rest))
            .ok_or_else(|| format!("chunk {i} is truncated"))?;
        if id != CHUNK_SCHEMA_ID {
            return Err(format!(
                "chunk {i} is not stored as a chunk (schema id {id})"
            ));
        }
        out.extend_from_slice(piece);
        if (out.len() - 4) as u64 > manifest.stored_bytes_max() {
            return Err(format!(
                "chunks hold more than the {} bytes the manifest announces",
                manifest.body_bytes
            ));
        }
        count += 1;
    }
    // A generation's chunks may be compressed one by one: only their count is exact.
    let exact = manifest.generation.is_none();
    if count != manifest.chunk_count || (exact && out.len() - 4 != manifest.body_bytes as usize) {
        return Err(format!(
            "{count} chunks of {} bytes, the manifest announces {} chunks of {} bytes",
            out.len() - 4,
            manifest.chunk_count,
            manifest.body_bytes
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::StoredValue;

    #[test]
    fn small_values_are_stored_whole() {
        let pieces = split_value(b"k".to_vec(), 3, vec![7; CHUNK_BODY_BYTES]);
        assert_eq!(pieces, vec![(b"k".to_vec(), 3, vec![7; CHUNK_BODY_BYTES])]);
    }

    #[test]
    fn large_values_split_in_key_order_and_reassemble() {
        let key = vec![2, b'k'];
        let body: Vec<u8> = (0..CHUNK_BODY_BYTES * 2 + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let pieces = split_value(key.clone(), 9, body.clone());
        assert_eq!(pieces.len(), 4);
        assert!(pieces.windows(2).all(|w| w[0].0 < w[1].0), "keys in order");
        // The next key of the same schema sorts after every chunk.
        assert!(pieces.last().unwrap().0 < vec![2, b'l']);
        let (mkey, mid, mbody) = &pieces[0];
        assert_eq!((mkey, *mid), (&key, MANIFEST_SCHEMA_ID));
        let manifest = ChunkManifest::decode(mbody).unwrap();
        assert_eq!(
            manifest,
            ChunkManifest {
                schema_id: 9,
                chunk_count: 3,
                body_bytes: body.len() as u64,
                generation: None,
            }
        );
        let stored: Vec<Vec<u8>> = pieces[1..]
            .iter()
            .map(|(_, id, b)| StoredValue::encode(*id, b))
            .collect();
        let whole = assemble(&manifest, stored.iter().map(|s| Some(s.as_slice()))).unwrap();
        assert_eq!(whole, StoredValue::encode(9, &body));

        // A missing, foreign or extra chunk is an error, never a shorter value.
        let mut missing: Vec<Option<&[u8]>> = stored.iter().map(|s| Some(s.as_slice())).collect();
        missing[1] = None;
        assert!(assemble(&manifest, missing)
            .unwrap_err()
            .contains("chunk 1 of 3 is missing"));
        let foreign = StoredValue::encode(9, &body[..10]);
        assert!(assemble(&manifest, [Some(foreign.as_slice())]).is_err());
        assert!(assemble(&manifest, stored.iter().take(2).map(|s| Some(s.as_slice()))).is_err());
    }

    #[test]
    fn manifests_with_impossible_sizes_are_refused() {
        let ok = ChunkManifest {
            schema_id: 1,
            chunk_count: 2,
            body_bytes: CHUNK_BODY_BYTES as u64 + 1,
            generation: None,
        };
        assert_eq!(ChunkManifest::decode(&ok.encode()).unwrap(), ok);
        let replacing = ChunkManifest {
            generation: Some(u64::MAX - 7),
            ..ok
        };
        assert_eq!(
            ChunkManifest::decode(&replacing.encode()).unwrap(),
            replacing
        );
        let mut trailing = replacing.encode();
        trailing.push(0);
        assert!(ChunkManifest::decode(&trailing).is_err());
        for bad in [
            ChunkManifest {
                chunk_count: 3,
                ..ok
            },
            ChunkManifest {
                chunk_count: u32::MAX,
                body_bytes: u64::MAX,
                ..ok
            },
        ] {
            assert!(ChunkManifest::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        let bytes = replacing.encode();
        for len in 0..bytes.len() {
            assert!(ChunkManifest::decode(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn a_replacing_value_stores_its_chunks_under_its_generation_before_its_manifest() {
        let key = vec![2, b'k'];
        let body: Vec<u8> = (0..CHUNK_BODY_BYTES + 9).map(|i| (i % 13) as u8).collect();
        let small = split_value_replacing(key.clone(), 4, vec![1; 10], 77);
        assert_eq!(small, vec![(key.clone(), 4, vec![1; 10])]);
        let pieces = split_value_replacing(key.clone(), 4, body.clone(), 0x0102_0304_0506_0708);
        assert_eq!(pieces.len(), 3);
        let (mkey, mid, mbody) = &pieces[2];
        assert_eq!((mkey, *mid), (&key, MANIFEST_SCHEMA_ID));
        let manifest = ChunkManifest::decode(mbody).unwrap();
        assert_eq!(manifest.generation, Some(0x0102_0304_0506_0708));
        for (i, (chunk_key, id, _)) in pieces[..2].iter().enumerate() {
            assert_eq!(*id, CHUNK_SCHEMA_ID);
            // The key, the generation and the index, byte for byte.
            let mut expected = key.clone();
            expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, i as u8]);
            assert_eq!(chunk_key, &expected);
            assert_eq!(generation_chunk_index(chunk_key), Some(i as u32));
        }
        let stored: Vec<Vec<u8>> = pieces[..2]
            .iter()
            .map(|(_, id, b)| StoredValue::encode(*id, b))
            .collect();
        let whole = assemble(&manifest, stored.iter().map(|s| Some(s.as_slice()))).unwrap();
        assert_eq!(whole, StoredValue::encode(4, &body));

        // Compressed one by one, chunks may be shorter, or longer by at most the slack each.
        let shorter = [
            StoredValue::encode(CHUNK_SCHEMA_ID, &body[..100]),
            StoredValue::encode(CHUNK_SCHEMA_ID, &body[100..150]),
        ];
        let whole = assemble(&manifest, shorter.iter().map(|s| Some(s.as_slice()))).unwrap();
        assert_eq!(whole, StoredValue::encode(4, &body[..150]));
        let too_long = vec![0u8; CHUNK_BODY_BYTES + CHUNK_FRAME_SLACK_BYTES + 100];
        let too_long = [
            StoredValue::encode(CHUNK_SCHEMA_ID, &too_long),
            StoredValue::encode(CHUNK_SCHEMA_ID, &too_long),
        ];
        assert!(assemble(&manifest, too_long.iter().map(|s| Some(s.as_slice()))).is_err());
        assert!(assemble(
            &manifest,
            shorter.iter().take(1).map(|s| Some(s.as_slice()))
        )
        .is_err());
    }

    #[test]
    fn the_checksum_covers_the_schema_id() {
        assert_ne!(value_checksum(1, b"abc"), value_checksum(2, b"abc"));
        assert_ne!(value_checksum(1, b"abc"), value_checksum(1, b"abd"));
        // Pinned against the reference xxHash library (Python `xxhash`): the function must
        // never change for stored versions.
        assert_eq!(value_checksum(1, b"rialto"), 0xcee0_d336_d82a_33bf);
        assert_eq!(value_checksum(7, &[b'x'; 1000]), 0xa6b0_46c2_5730_9584);
    }
}
