//! One RocksDB instance per replica, behind [`ReplicaStore`].
//!
//! Column families: `default` holds the data (serialized key → stored value, i.e.
//! `wire::StoredValue::encode(schema_id, value)`); `meta` holds the [`Checkpoint`] as JSON, the
//! version's compression dictionary and the `sealed` marker.
//!
//! Storage profiles ([`StorageProfile`], chosen per store, fixed per version):
//! * **in-memory**: PlainTable with a hash index on the whole key (no-op prefix extractor),
//!   index stored in the file, mmap reads. Memory ≈ data size; no block cache.
//! * **on-disk**: block-based tables with a whole-key bloom filter and the server's one bounded
//!   LRU block cache (index and filter blocks in it too), LZ4 unless the store's values are
//!   already compressed by its codec (zstd): compressing them again costs ingestion time and
//!   saves nothing ([`Layout`]).
//!
//! Two write paths:
//! * [`ReplicaStore::apply`]: a write batch through the memtable.
//! * [`ReplicaStore::ingest_sorted`]: the records of a sorted push are written to an SST file
//!   (PlainTable or block-based, per profile) with `SstFileWriter` and ingested; no memtable, no
//!   compaction (the files do not overlap, so they go straight to the bottom level). For
//!   PlainTable this needs a comparator whose *name* matches what PlainTable files record (see
//!   [`data_options`]).
//!
//! The memtable path writes without a WAL: data and checkpoint live in memtables until a flush,
//! and `atomic_flush` persists all column families together, so after a crash the data on disk
//! and the checkpoint always match (the lost tail is consumed again). The sorted path's data is
//! durable once its file is ingested, and the checkpoint that covers it is then written through
//! the WAL, synced. Closing the database flushes.
//!
//! No automatic compactions while a replica is written (and no write stalls for its level-0
//! files): nothing reads it before it is sealed, and sealing compacts it once. An unsorted
//! push's memtable flushes therefore pile up in level 0 and are merged in one pass, instead of
//! being rewritten level by level while the push runs. Two things bound what that pile costs:
//! a writable replica does not pin its level-0 index and filter blocks in the block cache
//! (nothing reads them; pinned, they would grow past the cache with the push), and once level 0
//! holds [`L0_MERGE_FILES`] files [`ReplicaStore::apply`] merges them (each file is an open
//! descriptor and a table reader until the merge).
//!
//! After END_OF_PUSH a batch version is [sealed](ReplicaStore::seal): memtable flushed, (for
//! unsorted pushes) compacted, a `sealed` marker written, and the database reopened read-only.
//! A restart of a sealed replica opens it read-only directly.
//!
//! **Invariants:** [`ReplicaStore::apply`] writes data and checkpoint in ONE `WriteBatch`, so
//! the checkpointed offset never runs ahead of (or behind) the data it covers.
//! [`ReplicaStore::ingest_sorted`] ingests the file *before* writing the checkpoint that covers
//! it: after a crash in between, the records are consumed and ingested again (same keys, same
//! values), never skipped.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rialto_protocol::meta::{Compression, StorageProfile};
use rialto_protocol::stored::{
    assemble, ChunkManifest, CHUNK_SCHEMA_ID, MANIFEST_SCHEMA_ID, RESERVED_SCHEMA_IDS,
};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBPinnableSlice, IngestExternalFileOptions,
    KeyEncodingType, Options, PlainTableFactoryOptions, SliceTransform, SstFileWriter, WriteBatch,
    DB,
};

use crate::error::ServerError;
use crate::validator::Checkpoint;

/// Reads of a chunked value that find it replaced meanwhile, before the read gives up.
const REASSEMBLY_TRIES: usize = 4;

/// Whether `stored` (schema id ‖ body) carries `schema_id`.
fn is_stored_as(stored: &[u8], schema_id: u32) -> bool {
    stored.first_chunk::<4>().map(|id| u32::from_be_bytes(*id)) == Some(schema_id)
}

/// The manifest `stored` is, if it is a readable one.
fn manifest_of(stored: &[u8]) -> Option<ChunkManifest> {
    if !is_stored_as(stored, MANIFEST_SCHEMA_ID) {
        return None;
    }
    ChunkManifest::decode(&stored[4..]).ok()
}

/// What a read answers for a stored value (see [`ReplicaStore::served`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Served<'v> {
    /// The stored value, as stored.
    Value(&'v [u8]),
    /// A chunked value, reassembled (or a value read again after it was replaced meanwhile).
    Assembled(Vec<u8>),
    /// Not a value (a chunk's own key).
    Missing,
    /// The value cannot be served: a chunk is missing or does not fit its manifest.
    Corrupt(String),
}

/// Column family holding the replica's checkpoint.
pub const META_CF: &str = "meta";
/// Key of the checkpoint inside [`META_CF`].
pub const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// Key of the version's compression dictionary inside [`META_CF`] (written when START_OF_PUSH
/// carrying one is consumed).
pub const DICTIONARY_KEY: &[u8] = b"dictionary";
/// Key of the marker written by [`ReplicaStore::seal`] inside [`META_CF`].
pub const SEALED_KEY: &[u8] = b"sealed";
/// Sub-directory of a replica directory where SST files are built before ingestion.
const INGEST_DIR: &str = "ingest";

/// Name of the in-memory profile's (bytewise) comparator; see [`data_options`].
const PLAIN_TABLE_COMPARATOR: &str = "";
/// Bits per key of the bloom filters (block-based filter, PlainTable prefix bloom).
const BLOOM_BITS_PER_KEY: f64 = 10.0;
/// Default size of a server's block cache (on-disk stores), shared by all its replicas.
pub const DEFAULT_BLOCK_CACHE_BYTES: usize = 256 * 1024 * 1024;
/// Read size when warming files into the page cache.
const WARM_READ_BYTES: usize = 1024 * 1024;

/// A sorted push is ingested in SST files of at most about this many bytes of keys and values.
pub const SORTED_CHUNK_BYTES: usize = 32 * 1024 * 1024;
/// A chunk of a sorted push is ingested once it is this old, full or not: a slow push still makes
/// durable progress, and the last chunk (built after END_OF_PUSH) holds a few seconds of records.
pub const SORTED_CHUNK_AGE: Duration = Duration::from_secs(5);

/// When a chunk of a sorted push is written: at `bytes` of keys and values or at `age`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkLimits {
    pub bytes: usize,
    pub age: Duration,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            bytes: SORTED_CHUNK_BYTES,
            age: SORTED_CHUNK_AGE,
        }
    }
}

/// One change to a replica's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Store `value` (a stored value: schema id ‖ bytes) under `key`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Remove `key`.
    Delete { key: Vec<u8> },
}

impl WriteOp {
    /// The key written or removed.
    pub fn key(&self) -> &[u8] {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key } => key,
        }
    }
}

/// Engine resources shared by every replica of a server.
#[derive(Clone)]
pub struct Engine {
    block_cache: Cache,
    block_cache_bytes: usize,
    ingest_wal: bool,
    l0_merge_files: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("block_cache_bytes", &self.block_cache_bytes)
            .finish()
    }
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(DEFAULT_BLOCK_CACHE_BYTES)
    }
}

impl Engine {
    /// Resources with a block cache of `block_cache_bytes` (on-disk stores).
    pub fn new(block_cache_bytes: usize) -> Engine {
        Engine {
            block_cache: Cache::new_lru_cache(block_cache_bytes),
            block_cache_bytes,
            ingest_wal: false,
            l0_merge_files: L0_MERGE_FILES,
        }
    }
    /// Merge a writable replica's level 0 at `files` files instead of [`L0_MERGE_FILES`]
    /// (tests); 0: never before sealing.
    pub fn with_l0_merge_files(mut self, files: usize) -> Engine {
        self.l0_merge_files = files;
        self
    }
    /// Whether ingestion writes go through the WAL (off by default, see the module docs; on
    /// only to measure what skipping it saves).
    pub fn with_ingest_wal(mut self, wal: bool) -> Engine {
        self.ingest_wal = wal;
        self
    }
    /// Capacity of the block cache.
    pub fn block_cache_bytes(&self) -> usize {
        self.block_cache_bytes
    }
    /// Bytes held by the block cache now.
    pub fn block_cache_usage(&self) -> usize {
        self.block_cache.get_usage()
    }
    /// Bytes of the block cache pinned (in use, not evictable) now.
    pub fn block_cache_pinned_usage(&self) -> usize {
        self.block_cache.get_pinned_usage()
    }
}

/// Level-0 files at which a writable replica merges them ([`ReplicaStore::apply`]): 16 GB of
/// 64 MB memtable flushes. Partitions smaller than that are merged once, when sealed.
pub const L0_MERGE_FILES: usize = 256;

/// What a replica database is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Ingestion (nothing reads it).
    Write,
    /// Serving a sealed version.
    Read,
}

/// The RocksDB options of a replica database: (database, data column family, all families).
pub fn engine_options(
    layout: Layout,
    engine: &Engine,
    access: Access,
) -> (Options, Options, Vec<ColumnFamilyDescriptor>) {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    // No WAL (see the module docs): flush data and checkpoint together.
    db_opts.set_atomic_flush(true);
    let data_opts = data_options(layout, engine, access);
    if layout.profile == StorageProfile::InMemory {
        // PlainTable reads through mmap only.
        db_opts.set_allow_mmap_reads(true);
    }
    let cfs = vec![
        ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, data_opts.clone()),
        ColumnFamilyDescriptor::new(META_CF, Options::default()),
    ];
    (db_opts, data_opts, cfs)
}

fn data_options(layout: Layout, engine: &Engine, access: Access) -> Options {
    let mut opts = Options::default();
    // A batch version is not read before it is sealed, and sealing compacts it once: no
    // compactions while it is written, and no write stalls for the level-0 files meanwhile.
    opts.set_disable_auto_compactions(true);
    opts.set_level_zero_slowdown_writes_trigger(-1);
    opts.set_level_zero_stop_writes_trigger(1 << 30);
    opts.set_soft_pending_compaction_bytes_limit(0);
    opts.set_hard_pending_compaction_bytes_limit(0);
    match layout.profile {
        StorageProfile::InMemory => {
            opts.set_plain_table_factory(&PlainTableFactoryOptions {
                user_key_length: 0, // variable-length keys
                bloom_bits_per_key: BLOOM_BITS_PER_KEY as i32,
                // Four hash buckets per key: fewer keys share a bucket, so a lookup decodes
                // fewer keys at random offsets of the file (each a cache miss). Against 0.75:
                // multi-gets 38 % and point gets 26 % faster per key, for 4 more bytes of index
                // per key (+1 % of a 1 KB store, +7.5 % of a 100 B one; benches/README.md).
                hash_table_ratio: 0.25,
                index_sparseness: 16,
                huge_page_tlb_size: 0,
                encoding_type: KeyEncodingType::Plain,
                full_scan_mode: false,
                store_index_in_file: true,
            });
            // The hash index is on the "prefix"; the no-op transform makes it the whole key.
            opts.set_prefix_extractor(SliceTransform::create_noop());
            opts.set_compression_type(rocksdb::DBCompressionType::None);
            // PlainTable files carry no comparator name, and SST ingestion insists that the
            // file's name equal the column family's (util/udt_util.cc, CompareComparator).
            // A bytewise comparator *named* "" makes the two agree.
            opts.set_comparator(
                PLAIN_TABLE_COMPARATOR,
                Box::new(|a: &[u8], b: &[u8]| a.cmp(b)),
            );
        }
        StorageProfile::OnDisk => {
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
            table.set_block_cache(&engine.block_cache);
            table.set_cache_index_and_filter_blocks(true);
            // Pinned level-0 blocks serve reads; while written, nothing reads, and an unsorted
            // push's level 0 grows until the merge.
            table.set_pin_l0_filter_and_index_blocks_in_cache(access == Access::Read);
            opts.set_block_based_table_factory(&table);
            opts.set_compression_type(if layout.compressed_values {
                rocksdb::DBCompressionType::None
            } else {
                rocksdb::DBCompressionType::Lz4
            });
        }
    }
    opts
}

/// How a replica's database is laid out: the store's storage profile, and whether its values
/// arrive compressed by the store's codec (then RocksDB does not compress them again; files
/// compressed either way read back alike, so the choice may change between opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub profile: StorageProfile,
    pub compressed_values: bool,
}

impl Layout {
    /// The layout of a version with `profile` and value `compression`.
    pub fn new(profile: StorageProfile, compression: Compression) -> Layout {
        Layout {
            profile,
            compressed_values: compression != Compression::None,
        }
    }
}

impl From<StorageProfile> for Layout {
    /// Values stored as written (RocksDB compresses on-disk files).
    fn from(profile: StorageProfile) -> Layout {
        Layout::new(profile, Compression::None)
    }
}

/// Bytes a replica takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Live SST files, all column families.
    pub disk_bytes: u64,
    /// Resident: memtables and table readers (indexes, filters), plus, for in-memory stores,
    /// the part of the mmapped data files that is in the page cache now (measured with
    /// `mincore`; warming reads all of it before serving, the kernel may evict it later).
    /// Block-cache bytes of on-disk stores are shared by the server's replicas and reported per
    /// server, not here.
    pub memory_bytes: u64,
    /// Size of the data files (the data column family's live SST files).
    pub data_bytes: u64,
    /// Of `data_bytes`, what is in the page cache now (in-memory stores; 0 for on-disk ones,
    /// which are not measured).
    pub resident_data_bytes: u64,
}

impl StoreUsage {
    /// Whether an in-memory store's data is (almost) all resident: at least 99 % of it, the
    /// rest being pages the kernel read ahead or dropped at the files' edges.
    pub fn data_resident(&self) -> bool {
        self.resident_data_bytes >= self.data_bytes - self.data_bytes / 100
    }
}

/// An SST file [`ReplicaStore::write_sorted`] wrote, waiting to be ingested. Dropping it
/// deletes the file (ingestion links it into the database first).
#[derive(Debug)]
pub struct SortedFile {
    path: PathBuf,
}

impl Drop for SortedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What warming read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Warmed {
    pub bytes: u64,
    pub files: usize,
    pub elapsed: Duration,
}

/// A replica's database: data and checkpoint.
pub struct ReplicaStore {
    db: DB,
    path: PathBuf,
    layout: Layout,
    /// Options of the data column family (SST files for ingestion are built with them).
    data_opts: Options,
    read_only: bool,
    /// Write through the WAL ([`Engine::with_ingest_wal`]).
    wal: bool,
    /// Merge level 0 at this many files ([`L0_MERGE_FILES`]).
    l0_merge_files: usize,
    /// The data files locked in memory ([`ReplicaStore::lock_in_memory`]).
    locked: std::sync::Mutex<Vec<crate::residency::LockedFile>>,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica database at `path` for writing.
    pub fn open(
        path: &Path,
        layout: impl Into<Layout>,
        engine: &Engine,
    ) -> Result<ReplicaStore, ServerError> {
        let layout = layout.into();
        std::fs::create_dir_all(path)
            .map_err(|e| ServerError::io("create replica directory", path, e))?;
        let (opts, data_opts, cfs) = engine_options(layout, engine, Access::Write);
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| storage(path, e))?;
        Ok(ReplicaStore {
            db,
            path: path.to_path_buf(),
            layout,
            data_opts,
            read_only: false,
            wal: engine.ingest_wal,
            l0_merge_files: engine.l0_merge_files,
            locked: Default::default(),
        })
    }

    /// Opens an existing replica database read-only (a sealed batch version).
    pub fn open_read_only(
        path: &Path,
        layout: impl Into<Layout>,
        engine: &Engine,
    ) -> Result<ReplicaStore, ServerError> {
        let layout = layout.into();
        let (opts, data_opts, cfs) = engine_options(layout, engine, Access::Read);
        let db = DB::open_cf_descriptors_read_only(&opts, path, cfs, false)
            .map_err(|e| storage(path, e))?;
        Ok(ReplicaStore {
            db,
            path: path.to_path_buf(),
            layout,
            data_opts,
            read_only: true,
            wal: engine.ingest_wal,
            l0_merge_files: engine.l0_merge_files,
            locked: Default::default(),
        })
    }

    /// Opens the replica at `path` the way its state requires: read-only if it was sealed,
    /// for writing otherwise (creating it if needed).
    pub fn open_existing(
        path: &Path,
        layout: impl Into<Layout>,
        engine: &Engine,
    ) -> Result<ReplicaStore, ServerError> {
        let layout = layout.into();
        if path.join("CURRENT").exists() {
            let store = ReplicaStore::open_read_only(path, layout, engine)?;
            if store.is_sealed()? {
                return Ok(store);
            }
        }
        ReplicaStore::open(path, layout, engine)
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The storage profile the database was opened with.
    pub fn profile(&self) -> StorageProfile {
        self.layout.profile
    }

    /// Whether the database is open read-only (sealed).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether [`ReplicaStore::seal`] completed on this database.
    pub fn is_sealed(&self) -> Result<bool, ServerError> {
        let meta = self.meta_cf()?;
        Ok(self
            .db
            .get_pinned_cf(meta, SEALED_KEY)
            .map_err(|e| storage(&self.path, e))?
            .is_some())
    }

    /// Applies `ops` and writes `checkpoint`, atomically (one write batch).
    pub fn apply(&self, ops: &[WriteOp], checkpoint: &Checkpoint) -> Result<(), ServerError> {
        let meta = self.meta_cf()?;
        let encoded = self.encode_checkpoint(checkpoint)?;
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                WriteOp::Put { key, value } => batch.put(key, value),
                WriteOp::Delete { key } => batch.delete(key),
            }
        }
        batch.put_cf(meta, CHECKPOINT_KEY, encoded);
        self.db
            .write_opt(batch, &self.write_options())
            .map_err(|e| storage(&self.path, e))?;
        self.merge_level_0_if_full()
    }

    /// [`ReplicaStore::apply`] for real-time writes copied into a hybrid version, which may
    /// replace chunked values: a put or a delete of a key whose value is chunked also deletes
    /// that value's chunks, in the same batch, and the manifest of a chunked value whose chunks
    /// are not all stored (its first ones were written before the replay began) is not applied:
    /// the key keeps its value. Returns how many manifests were left out.
    pub fn apply_replacing(
        &self,
        ops: Vec<WriteOp>,
        checkpoint: &Checkpoint,
    ) -> Result<usize, ServerError> {
        // What each key written holds once the ops before are applied (a key may be written
        // twice in one batch), and the chunks put by this batch.
        let mut holds: HashMap<Vec<u8>, Option<ChunkManifest>> = HashMap::new();
        let mut chunks: HashSet<Vec<u8>> = HashSet::new();
        let mut kept: Vec<WriteOp> = Vec::with_capacity(ops.len());
        let mut incomplete = 0;
        for op in ops {
            let new = match &op {
                WriteOp::Put { key, value } if is_stored_as(value, CHUNK_SCHEMA_ID) => {
                    chunks.insert(key.clone());
                    kept.push(op);
                    continue;
                }
                WriteOp::Put { value, .. } => manifest_of(value),
                WriteOp::Delete { .. } => None,
            };
            let key = op.key();
            if let Some(manifest) = new {
                let mut stored = true;
                for i in 0..manifest.chunk_count {
                    let chunk = manifest.chunk_key(key, i);
                    if !chunks.contains(&chunk) && self.get(&chunk)?.is_none() {
                        stored = false;
                        break;
                    }
                }
                if !stored {
                    incomplete += 1;
                    continue;
                }
            }
            let old = match holds.get(key) {
                Some(held) => *held,
                None => self.get(key)?.and_then(|v| manifest_of(&v)),
            };
            if let Some(old) = old.filter(|old| Some(*old) != new) {
                let replaced = (0..old.chunk_count).map(|i| WriteOp::Delete {
                    key: old.chunk_key(key, i),
                });
                kept.extend(replaced);
            }
            holds.insert(key.to_vec(), new);
            kept.push(op);
        }
        self.apply(&kept, checkpoint)?;
        Ok(incomplete)
    }

    /// Merges the data's level-0 files into one sorted run below them once there are
    /// `l0_merge_files` of them (an unsorted push larger than [`L0_MERGE_FILES`] flushes; see
    /// the module docs). Ingestion of this replica waits for the merge.
    fn merge_level_0_if_full(&self) -> Result<(), ServerError> {
        let data = self.data_cf()?;
        let files = self
            .db
            .property_int_value_cf(data, "rocksdb.num-files-at-level0")
            .map_err(|e| storage(&self.path, e))?
            .unwrap_or(0);
        if self.l0_merge_files == 0 || files < self.l0_merge_files as u64 {
            return Ok(());
        }
        let started = Instant::now();
        self.db.compact_range_cf(data, None::<&[u8]>, None::<&[u8]>);
        tracing::info!(path = %self.path.display(), files, elapsed_ms = started.elapsed().as_millis() as u64, "merged level 0 of a replica being written");
        Ok(())
    }

    /// Writes `ops`, whose keys must be strictly ascending, to an SST file, ingests it, and then
    /// writes `checkpoint` through the WAL, synced, so that it is as durable as the file. With no
    /// ops only the checkpoint is written. [`ReplicaStore::write_sorted`] then
    /// [`ReplicaStore::ingest_written`]; a caller that pipelines chunks calls them itself.
    pub fn ingest_sorted(
        &self,
        ops: &[WriteOp],
        checkpoint: &Checkpoint,
    ) -> Result<(), ServerError> {
        let file = self.write_sorted(ops, checkpoint.next_offset)?;
        self.ingest_written(file, checkpoint)
    }

    /// Writes `ops`, whose keys must be strictly ascending, to an SST file of the ingestion
    /// directory named after `chunk` (unique per chunk), for [`ReplicaStore::ingest_written`].
    /// `None` when there is nothing to write.
    ///
    /// Touches no data of the database, so it may run while the chunk before is being ingested:
    /// a sorted push's chunks are ascending, so this chunk's keys sort after everything that
    /// chunk ingests.
    ///
    /// Idempotent for a replay: ops at or below the largest key already in the data are skipped.
    /// A sorted push only ever ingests ascending chunks, so everything up to that key is in; a
    /// crash between an ingestion and its checkpoint makes the replica consume those records
    /// again, and ingesting them into a file overlapping the existing ones would be refused by
    /// PlainTable (RocksDB's overlap check needs a total-order seek, which it does not support).
    pub fn write_sorted(
        &self,
        ops: &[WriteOp],
        chunk: i64,
    ) -> Result<Option<SortedFile>, ServerError> {
        if ops.is_empty() {
            return Ok(None);
        }
        let ops = match self.largest_data_key()? {
            Some(largest) => &ops[ops.partition_point(|op| op.key() <= &largest[..])..],
            None => ops,
        };
        if ops.is_empty() {
            return Ok(None);
        }
        let dir = self.path.join(INGEST_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError::io("create ingestion directory", &dir, e))?;
        let file = SortedFile {
            path: dir.join(format!("chunk-{chunk}.sst")),
        };
        let mut writer = SstFileWriter::create(&self.data_opts);
        writer
            .open(&file.path)
            .map_err(|e| storage(&file.path, e))?;
        for op in ops {
            match op {
                WriteOp::Put { key, value } => writer.put(key, value),
                WriteOp::Delete { key } => writer.delete(key),
            }
            .map_err(|e| storage(&file.path, e))?;
        }
        writer.finish().map_err(|e| storage(&file.path, e))?;
        Ok(Some(file))
    }

    /// Ingests a file [`ReplicaStore::write_sorted`] wrote (if any), then writes `checkpoint`
    /// through the WAL, synced. Files must be ingested in the order of their chunks.
    pub fn ingest_written(
        &self,
        file: Option<SortedFile>,
        checkpoint: &Checkpoint,
    ) -> Result<(), ServerError> {
        if let Some(file) = file {
            let mut ingest = IngestExternalFileOptions::default();
            ingest.set_move_files(true);
            self.db
                .ingest_external_file_opts(&ingest, vec![&file.path])
                .map_err(|e| storage(&self.path, e))?;
        }
        let meta = self.meta_cf()?;
        let encoded = self.encode_checkpoint(checkpoint)?;
        self.db
            .put_cf_opt(meta, CHECKPOINT_KEY, encoded, &synced_wal())
            .map_err(|e| storage(&self.path, e))
    }

    /// The largest key in the data's files (not the memtable), `None` when there are none.
    fn largest_data_key(&self) -> Result<Option<Vec<u8>>, ServerError> {
        Ok(self
            .live_data_files()?
            .into_iter()
            .filter_map(|f| f.end_key)
            .max())
    }

    /// Stores the version's compression dictionary (from START_OF_PUSH), through the WAL, synced:
    /// a checkpoint past START_OF_PUSH may be durable before the next flush (sorted pushes), and
    /// a replica resuming from it must still have the dictionary.
    pub fn set_dictionary(&self, dictionary: &[u8]) -> Result<(), ServerError> {
        let meta = self.meta_cf()?;
        self.db
            .put_cf_opt(meta, DICTIONARY_KEY, dictionary, &synced_wal())
            .map_err(|e| storage(&self.path, e))
    }

    /// Finishes a batch version after END_OF_PUSH: flushes the memtables, compacts the data
    /// if `compact` (unsorted pushes leave overlapping files), marks the database sealed, and
    /// reopens it read-only. Consumes the writable handle (it must be the only one).
    pub fn seal(self, compact: bool, engine: &Engine) -> Result<ReplicaStore, ServerError> {
        if self.read_only {
            return Ok(self);
        }
        let (data, meta) = (self.data_cf()?, self.meta_cf()?);
        let flush = || {
            self.db
                .flush_cfs_opt(&[data, meta], &rocksdb::FlushOptions::default())
                .map_err(|e| storage(&self.path, e))
        };
        flush()?;
        if compact {
            self.db.compact_range_cf(data, None::<&[u8]>, None::<&[u8]>);
        }
        self.db
            .put_cf_opt(meta, SEALED_KEY, b"1", &self.write_options())
            .map_err(|e| storage(&self.path, e))?;
        flush()?;
        let (path, layout) = (self.path.clone(), self.layout);
        drop(self.db);
        let _ = std::fs::remove_dir_all(path.join(INGEST_DIR));
        ReplicaStore::open_read_only(&path, layout, engine)
    }

    /// Readies a writable replica of a hybrid version to serve while it keeps taking writes:
    /// flushes and merges what the push wrote, then turns RocksDB's automatic compactions and
    /// level-0 write limits back on (a writable replica starts without them, see the module docs).
    pub fn serve_while_writing(&self) -> Result<(), ServerError> {
        if self.read_only {
            return Ok(());
        }
        let (data, meta) = (self.data_cf()?, self.meta_cf()?);
        self.db
            .flush_cfs_opt(&[data, meta], &rocksdb::FlushOptions::default())
            .map_err(|e| storage(&self.path, e))?;
        self.db.compact_range_cf(data, None::<&[u8]>, None::<&[u8]>);
        self.db
            .set_options_cf(
                data,
                &[
                    ("disable_auto_compactions", "false"),
                    ("level0_slowdown_writes_trigger", "20"),
                    ("level0_stop_writes_trigger", "36"),
                ],
            )
            .map_err(|e| storage(&self.path, e))
    }

    /// Reads the data files once so that they are in the page cache (and, for in-memory stores,
    /// in the mmapped pages PlainTable reads) before the replica takes traffic. Reads at most
    /// `budget_bytes`.
    pub fn warm(&self, budget_bytes: u64) -> Result<Warmed, ServerError> {
        let started = Instant::now();
        let mut warmed = Warmed::default();
        let mut buf = vec![0u8; WARM_READ_BYTES];
        for file in self.live_data_files()? {
            if warmed.bytes >= budget_bytes {
                break;
            }
            let path = self.data_file_path(&file);
            let mut f = File::open(&path).map_err(|e| ServerError::io("open", &path, e))?;
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(|e| ServerError::io("read", &path, e))?;
                if n == 0 {
                    break;
                }
                warmed.bytes += n as u64;
            }
            warmed.files += 1;
        }
        warmed.elapsed = started.elapsed();
        Ok(warmed)
    }

    /// Locks the data files in memory (`mlock`, reading in what is not resident) until the
    /// store is dropped, so that the kernel cannot evict an in-memory store's data under memory
    /// pressure (`rialto-server --lock-in-memory-stores`). Returns the bytes locked. On failure
    /// (the process may not lock that much: `RLIMIT_MEMLOCK`, or memory is short) nothing stays
    /// locked. Meant for sealed replicas, whose files do not change.
    pub fn lock_in_memory(&self) -> Result<u64, ServerError> {
        let mut locked = Vec::new();
        for path in self.data_file_paths()? {
            let file = crate::residency::LockedFile::lock(&path)
                .map_err(|e| ServerError::io("lock a data file in memory", &path, e))?;
            locked.push(file);
        }
        let bytes = locked.iter().map(|f| f.bytes()).sum();
        *self.locked.lock().unwrap_or_else(|e| e.into_inner()) = locked;
        Ok(bytes)
    }

    /// Asks the kernel to drop the data files from the page cache (what is not mapped or
    /// locked), as memory pressure would. For tests.
    #[cfg(test)]
    pub(crate) fn drop_data_from_page_cache(&self) {
        for file in self.data_file_paths().unwrap() {
            crate::residency::drop_from_page_cache(&file).unwrap();
        }
    }

    /// Bytes of data files locked in memory by [`ReplicaStore::lock_in_memory`].
    pub fn locked_bytes(&self) -> u64 {
        let locked = self.locked.lock().unwrap_or_else(|e| e.into_inner());
        locked.iter().map(|f| f.bytes()).sum()
    }

    /// Bytes on disk and resident (see [`StoreUsage`]).
    pub fn usage(&self) -> Result<StoreUsage, ServerError> {
        let files = self.db.live_files().map_err(|e| storage(&self.path, e))?;
        let disk_bytes: u64 = files.iter().map(|f| f.size as u64).sum();
        let mut data_bytes = 0;
        let mut resident_data_bytes = 0;
        for file in files
            .iter()
            .filter(|f| f.column_family_name == rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
        {
            data_bytes += file.size as u64;
            // On-disk stores serve from the block cache; their files' residency is not theirs.
            if self.layout.profile != StorageProfile::InMemory {
                continue;
            }
            let path = self.data_file_path(file);
            // A measurement that fails (descriptor or mapping limits) must not fail the replica:
            // the file counts as resident, as it was read when the replica was warmed.
            resident_data_bytes += crate::residency::resident_bytes(&path).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "cannot measure what of a data file is in memory; counting it all");
                file.size as u64
            });
        }
        let property = |name: &str| -> Result<u64, ServerError> {
            let mut total = 0;
            for cf in [rocksdb::DEFAULT_COLUMN_FAMILY_NAME, META_CF] {
                let handle = self.db.cf_handle(cf).ok_or_else(|| self.missing_cf(cf))?;
                total += self
                    .db
                    .property_int_value_cf(handle, name)
                    .map_err(|e| storage(&self.path, e))?
                    .unwrap_or(0);
            }
            Ok(total)
        };
        let mut memory_bytes = property("rocksdb.cur-size-all-mem-tables")?
            + property("rocksdb.estimate-table-readers-mem")?;
        if self.layout.profile == StorageProfile::InMemory {
            memory_bytes += resident_data_bytes;
        }
        Ok(StoreUsage {
            disk_bytes,
            memory_bytes,
            data_bytes,
            resident_data_bytes,
        })
    }

    /// The path of one of the database's live files.
    fn data_file_path(&self, file: &rocksdb::LiveFile) -> PathBuf {
        self.path.join(file.name.trim_start_matches('/'))
    }

    /// The paths of the data's live SST files.
    pub fn data_file_paths(&self) -> Result<Vec<PathBuf>, ServerError> {
        Ok(self
            .live_data_files()?
            .iter()
            .map(|f| self.data_file_path(f))
            .collect())
    }

    fn live_data_files(&self) -> Result<Vec<rocksdb::LiveFile>, ServerError> {
        Ok(self
            .db
            .live_files()
            .map_err(|e| storage(&self.path, e))?
            .into_iter()
            .filter(|f| f.column_family_name == rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .collect())
    }

    fn write_options(&self) -> rocksdb::WriteOptions {
        let mut opts = rocksdb::WriteOptions::default();
        opts.disable_wal(!self.wal);
        opts
    }

    fn encode_checkpoint(&self, checkpoint: &Checkpoint) -> Result<Vec<u8>, ServerError> {
        serde_json::to_vec(checkpoint).map_err(|e| ServerError::Checkpoint {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// The stored value of `key`, pinned (no copy out of the block cache). The data column
    /// family is the default one, which this reads without looking its handle up.
    pub fn get(&self, key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>, ServerError> {
        self.db.get_pinned(key).map_err(|e| storage(&self.path, e))
    }

    /// The stored values of `keys`, in the same order.
    pub fn multi_get<'a>(
        &'a self,
        keys: &[&[u8]],
    ) -> Vec<Result<Option<DBPinnableSlice<'a>>, ServerError>> {
        self.batched_multi_get(keys, false)
    }

    /// [`ReplicaStore::multi_get`] for keys in ascending order (faster; the caller sorts).
    pub fn multi_get_sorted<'a>(
        &'a self,
        keys: &[&[u8]],
    ) -> Vec<Result<Option<DBPinnableSlice<'a>>, ServerError>> {
        debug_assert!(keys.windows(2).all(|w| w[0] <= w[1]), "keys not sorted");
        self.batched_multi_get(keys, true)
    }

    fn batched_multi_get<'a>(
        &'a self,
        keys: &[&[u8]],
        sorted: bool,
    ) -> Vec<Result<Option<DBPinnableSlice<'a>>, ServerError>> {
        if let [key] = keys {
            // A point lookup skips a multi-get's setup (a partition's one key of a small
            // batch-get, as coalesced single gets are).
            return vec![self.get(key)];
        }
        let cf = match self.data_cf() {
            Ok(cf) => cf,
            Err(e) => {
                let detail = e.to_string();
                return keys
                    .iter()
                    .map(|_| {
                        Err(ServerError::Storage {
                            path: self.path.clone(),
                            detail: detail.clone(),
                        })
                    })
                    .collect();
            }
        };
        self.db
            .batched_multi_get_cf(cf, keys.iter().copied(), sorted)
            .into_iter()
            .map(|r| r.map_err(|e| storage(&self.path, e)))
            .collect()
    }

    /// What a read of `key` answers, given its stored value: the value itself, or for a
    /// chunked value's manifest the whole value reassembled from its chunks; a chunk's own key
    /// reads as missing (see `rialto_protocol::stored`). Costs one comparison for values that
    /// are not chunked.
    pub fn served<'v>(&self, key: &[u8], stored: &'v [u8]) -> Served<'v> {
        let schema_id = match stored.first_chunk::<4>() {
            Some(id) => u32::from_be_bytes(*id),
            None => return Served::Value(stored),
        };
        if schema_id < RESERVED_SCHEMA_IDS {
            return Served::Value(stored);
        }
        match schema_id {
            MANIFEST_SCHEMA_ID => self.assemble(key, &stored[4..]),
            CHUNK_SCHEMA_ID => Served::Missing,
            other => Served::Corrupt(format!("value stored with reserved schema id {other}")),
        }
    }

    fn assemble<'v>(&self, key: &[u8], manifest: &[u8]) -> Served<'v> {
        let mut manifest = manifest.to_vec();
        for _ in 0..REASSEMBLY_TRIES {
            let reason = match self.assemble_once(key, &manifest) {
                Ok(whole) => return Served::Assembled(whole),
                Err(reason) => reason,
            };
            // A real-time write may have replaced the value, and deleted its chunks, since its
            // manifest was read: what the key holds now is served.
            let now = match self.get(key) {
                Ok(Some(now)) => now,
                Ok(None) => return Served::Missing,
                Err(e) => return Served::Corrupt(e.to_string()),
            };
            match now.split_first_chunk::<4>() {
                Some((id, body)) if u32::from_be_bytes(*id) == MANIFEST_SCHEMA_ID => {
                    if body == manifest.as_slice() {
                        return Served::Corrupt(reason);
                    }
                    manifest = body.to_vec();
                }
                _ => {
                    return match self.served(key, &now) {
                        Served::Value(v) => Served::Assembled(v.to_vec()),
                        Served::Assembled(v) => Served::Assembled(v),
                        Served::Missing => Served::Missing,
                        Served::Corrupt(e) => Served::Corrupt(e),
                    }
                }
            }
        }
        Served::Corrupt(format!(
            "the value was replaced {REASSEMBLY_TRIES} times while it was read"
        ))
    }

    /// The value `manifest` describes, from its chunks.
    fn assemble_once(&self, key: &[u8], manifest: &[u8]) -> Result<Vec<u8>, String> {
        let manifest = ChunkManifest::decode(manifest)
            .map_err(|e| format!("unreadable chunk manifest: {e}"))?;
        let chunk_keys: Vec<Vec<u8>> = (0..manifest.chunk_count)
            .map(|i| manifest.chunk_key(key, i))
            .collect();
        let refs: Vec<&[u8]> = chunk_keys.iter().map(Vec::as_slice).collect();
        let chunks = self.multi_get_sorted(&refs);
        let mut pieces = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            match chunk {
                Ok(c) => pieces.push(c.as_deref()),
                Err(e) => return Err(e.to_string()),
            }
        }
        assemble(&manifest, pieces)
    }

    /// The last checkpoint written, `None` for a fresh replica.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, ServerError> {
        let meta = self.meta_cf()?;
        let Some(bytes) = self
            .db
            .get_pinned_cf(meta, CHECKPOINT_KEY)
            .map_err(|e| storage(&self.path, e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ServerError::Checkpoint {
                path: self.path.clone(),
                detail: e.to_string(),
            })
    }

    /// The compression dictionary of the version, if its START_OF_PUSH carried one.
    pub fn dictionary(&self) -> Result<Option<Vec<u8>>, ServerError> {
        let meta = self.meta_cf()?;
        self.db
            .get_cf(meta, DICTIONARY_KEY)
            .map_err(|e| storage(&self.path, e))
    }

    /// Closes the database and deletes its directory.
    pub fn destroy(self) -> Result<(), ServerError> {
        let path = self.path.clone();
        drop(self.locked);
        drop(self.db);
        remove_replica_dir(&path)
    }

    fn data_cf(&self) -> Result<&rocksdb::ColumnFamily, ServerError> {
        self.db
            .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .ok_or_else(|| self.missing_cf(rocksdb::DEFAULT_COLUMN_FAMILY_NAME))
    }

    fn meta_cf(&self) -> Result<&rocksdb::ColumnFamily, ServerError> {
        self.db
            .cf_handle(META_CF)
            .ok_or_else(|| self.missing_cf(META_CF))
    }

    fn missing_cf(&self, name: &str) -> ServerError {
        ServerError::Storage {
            path: self.path.clone(),
            detail: format!("column family `{name}` is missing"),
        }
    }
}

/// Deletes a (closed) replica directory; succeeds if it does not exist.
pub fn remove_replica_dir(path: &Path) -> Result<(), ServerError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ServerError::io("delete replica directory", path, e)),
    }
}

/// Write options for the few writes that must be durable at once (the rest wait for a flush).
fn synced_wal() -> rocksdb::WriteOptions {
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    opts
}

fn storage(path: &Path, e: rocksdb::Error) -> ServerError {
    ServerError::Storage {
        path: path.to_path_buf(),
        detail: e.into_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILES: [StorageProfile; 2] = [StorageProfile::InMemory, StorageProfile::OnDisk];

    fn open(path: &Path) -> ReplicaStore {
        ReplicaStore::open(path, StorageProfile::OnDisk, &Engine::new(1 << 20)).unwrap()
    }

    fn put(k: &str, v: &str) -> WriteOp {
        WriteOp::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_key_written_twice_in_one_batch_keeps_only_the_last_values_chunks() {
        use rialto_protocol::stored::{
            split_value, split_value_replacing, StoredPiece, CHUNK_BODY_BYTES,
        };
        use rialto_protocol::wire::StoredValue;
        let dir = tempfile::tempdir().unwrap();
        for profile in PROFILES {
            let engine = Engine::new(1 << 20);
            let store =
                ReplicaStore::open(&dir.path().join(format!("{profile:?}")), profile, &engine)
                    .unwrap();
            let ops_of = |body: Vec<u8>, generation: u64| -> Vec<WriteOp> {
                split_value_replacing(b"k".to_vec(), 1, body, generation)
                    .into_iter()
                    .map(|(key, id, b)| WriteOp::Put {
                        key,
                        value: StoredValue::encode(id, &b),
                    })
                    .collect()
            };
            let a = vec![1u8; CHUNK_BODY_BYTES + 1];
            let b = vec![2u8; 2 * CHUNK_BODY_BYTES + 1];
            let mut ops = ops_of(a, 10);
            ops.extend(ops_of(b.clone(), 20));
            let left_out = store.apply_replacing(ops, &Checkpoint::default()).unwrap();
            assert_eq!(left_out, 0);
            let stored = store.get(b"k").unwrap().unwrap().to_vec();
            match store.served(b"k", &stored) {
                Served::Assembled(whole) => assert_eq!(whole, StoredValue::encode(1, &b)),
                _ => panic!("the last value must be served whole"),
            }
            // The first value's chunks went with it; the second's stay.
            let first = ChunkManifest {
                schema_id: 1,
                chunk_count: 2,
                body_bytes: CHUNK_BODY_BYTES as u64 + 1,
                generation: Some(10),
            };
            for i in 0..2 {
                assert!(
                    store.get(&first.chunk_key(b"k", i)).unwrap().is_none(),
                    "{profile:?}"
                );
            }
            let second = manifest_of(&stored).unwrap();
            assert_eq!(second.generation, Some(20));
            for i in 0..3 {
                assert!(store.get(&second.chunk_key(b"k", i)).unwrap().is_some());
            }
            // A manifest whose chunks are not stored, of either format, is left out.
            let without_chunks = |pieces: Vec<StoredPiece>| -> Vec<WriteOp> {
                let (key, id, body) = pieces
                    .into_iter()
                    .find(|p| p.1 == MANIFEST_SCHEMA_ID)
                    .unwrap();
                vec![WriteOp::Put {
                    key,
                    value: StoredValue::encode(id, &body),
                }]
            };
            let big = vec![3u8; CHUNK_BODY_BYTES + 1];
            for orphan in [
                without_chunks(split_value(b"k".to_vec(), 1, big.clone())),
                without_chunks(split_value_replacing(b"k".to_vec(), 1, big.clone(), 30)),
            ] {
                let left_out = store
                    .apply_replacing(orphan, &Checkpoint::default())
                    .unwrap();
                assert_eq!(left_out, 1);
                assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&stored[..]));
            }
            // Deleted: the key and its chunks.
            let delete = vec![WriteOp::Delete { key: b"k".to_vec() }];
            store
                .apply_replacing(delete, &Checkpoint::default())
                .unwrap();
            assert!(store.get(b"k").unwrap().is_none());
            for i in 0..3 {
                assert!(store.get(&second.chunk_key(b"k", i)).unwrap().is_none());
            }
        }
    }

    #[test]
    fn apply_writes_data_and_checkpoint_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("s/v1/p0"));
        assert_eq!(store.checkpoint().unwrap(), None);
        let cp = Checkpoint {
            next_offset: 3,
            records: 2,
            ..Default::default()
        };
        store.apply(&[put("a", "1"), put("b", "2")], &cp).unwrap();
        assert_eq!(store.checkpoint().unwrap(), Some(cp));
        assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        let cp2 = Checkpoint {
            next_offset: 4,
            records: 3,
            ..Default::default()
        };
        store
            .apply(&[WriteOp::Delete { key: b"a".to_vec() }], &cp2)
            .unwrap();
        let got = store.multi_get(&[b"a", b"b", b"zz"]);
        assert!(got[0].as_ref().unwrap().is_none());
        assert_eq!(got[1].as_ref().unwrap().as_deref(), Some(&b"2"[..]));
        assert!(got[2].as_ref().unwrap().is_none());
        // One key is a point lookup: the same answers.
        assert_eq!(
            store.multi_get(&[b"b"])[0].as_ref().unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert!(store.multi_get(&[b"a"])[0].as_ref().unwrap().is_none());
        assert!(store.multi_get(&[b"zz"])[0].as_ref().unwrap().is_none());
    }

    #[test]
    fn checkpoint_tracks_the_last_applied_batch() {
        // Atomicity itself comes from RocksDB (one WriteBatch spans both column families); this
        // checks that every batch moves data and checkpoint together.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("p"));
        for i in 0..100u64 {
            let cp = Checkpoint {
                next_offset: 1 + i as i64,
                records: 1 + i,
                ..Default::default()
            };
            store.apply(&[put(&format!("k{i}"), "x")], &cp).unwrap();
            assert_eq!(store.checkpoint().unwrap(), Some(cp));
            assert!(store.get(format!("k{i}").as_bytes()).unwrap().is_some());
        }
        // A batch with no data still moves the checkpoint (control records only).
        let cp = Checkpoint {
            next_offset: 500,
            records: 100,
            ..Default::default()
        };
        store.apply(&[], &cp).unwrap();
        assert_eq!(store.checkpoint().unwrap(), Some(cp));
    }

    #[test]
    fn reopen_resumes_from_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/v2/p1");
        let mut cp = Checkpoint {
            next_offset: 77,
            records: 5,
            ..Default::default()
        };
        cp.validation.end_of_push = true;
        {
            let store = open(&path);
            store.apply(&[put("x", "y")], &cp).unwrap();
        }
        let store = open(&path);
        assert_eq!(store.checkpoint().unwrap(), Some(cp));
        assert_eq!(store.get(b"x").unwrap().as_deref(), Some(&b"y"[..]));
        store.destroy().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn unreadable_checkpoint_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let meta = store.db.cf_handle(META_CF).unwrap();
        store.db.put_cf(meta, CHECKPOINT_KEY, b"{not json").unwrap();
        assert!(matches!(
            store.checkpoint(),
            Err(ServerError::Checkpoint { .. })
        ));
    }

    /// Incompressible bytes, a function of `seed`.
    fn value(seed: usize, len: usize) -> Vec<u8> {
        let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn sorted_ops(n: usize, value_len: usize) -> Vec<WriteOp> {
        (0..n)
            .map(|i| WriteOp::Put {
                key: format!("key-{i:08}").into_bytes(),
                value: value(i, value_len),
            })
            .collect()
    }

    fn checkpoint(next_offset: i64, records: u64) -> Checkpoint {
        Checkpoint {
            next_offset,
            records,
            ..Default::default()
        }
    }

    #[test]
    fn sorted_ingestion_and_write_batches_read_the_same() {
        let ops = sorted_ops(3000, 100);
        for profile in [StorageProfile::InMemory, StorageProfile::OnDisk] {
            let engine = Engine::new(1 << 20);
            let dir = tempfile::tempdir().unwrap();
            let batched = ReplicaStore::open(&dir.path().join("a"), profile, &engine).unwrap();
            let ingested = ReplicaStore::open(&dir.path().join("b"), profile, &engine).unwrap();
            batched.apply(&ops, &checkpoint(10, 3000)).unwrap();
            // Two chunks: files of consecutive key ranges.
            ingested
                .ingest_sorted(&ops[..1000], &checkpoint(5, 1000))
                .unwrap();
            assert_eq!(ingested.checkpoint().unwrap(), Some(checkpoint(5, 1000)));
            ingested
                .ingest_sorted(&ops[1000..], &checkpoint(10, 3000))
                .unwrap();
            assert_eq!(ingested.checkpoint().unwrap(), Some(checkpoint(10, 3000)));
            let keys: Vec<Vec<u8>> = (0..3100)
                .map(|i| format!("key-{i:08}").into_bytes())
                .collect();
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
            let a: Vec<Option<Vec<u8>>> = batched
                .multi_get(&refs)
                .into_iter()
                .map(|r| r.unwrap().map(|v| v.to_vec()))
                .collect();
            let b: Vec<Option<Vec<u8>>> = ingested
                .multi_get(&refs)
                .into_iter()
                .map(|r| r.unwrap().map(|v| v.to_vec()))
                .collect();
            assert_eq!(a, b, "{profile:?}");
            assert_eq!(a.iter().filter(|v| v.is_some()).count(), 3000);
            assert_eq!(b[2999].as_deref(), Some(&value(2999, 100)[..]));
            assert!(!dir
                .path()
                .join("b")
                .join(INGEST_DIR)
                .join("chunk-5.sst")
                .exists());
            // Sealed and reopened read-only, the ingested files still serve every key.
            let sealed = ingested.seal(false, &engine).unwrap();
            assert!(sealed.is_read_only());
            let c: Vec<Option<Vec<u8>>> = sealed
                .multi_get(&refs)
                .into_iter()
                .map(|r| r.unwrap().map(|v| v.to_vec()))
                .collect();
            assert_eq!(a, c, "{profile:?} sealed");
        }
    }

    /// Copies a database directory as a crash would leave it: the files and WAL written so far,
    /// nothing of the memtables that was written without the WAL.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                crash_image(&entry.path(), &target);
            } else if entry.file_name() != "LOCK" {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[test]
    fn a_crash_after_ingestion_resumes_from_its_checkpoint_and_a_replay_skips_what_is_in() {
        // Ingested files are durable at once, and so is the checkpoint written after each. A
        // crash between the two restarts from the previous checkpoint and replays records that
        // are already in, in chunks whose boundaries need not match the first time's: those
        // must be skipped, not ingested again (PlainTable refuses overlapping ingestion).
        for profile in PROFILES {
            let engine = Engine::new(1 << 20);
            let dir = tempfile::tempdir().unwrap();
            let (path, crashed) = (dir.path().join("live"), dir.path().join("crashed"));
            let ops = sorted_ops(3000, 100);
            let store = ReplicaStore::open(&path, profile, &engine).unwrap();
            store.set_dictionary(b"dict").unwrap();
            store
                .ingest_sorted(&ops[..1000], &checkpoint(5, 1000))
                .unwrap();
            store
                .ingest_sorted(&ops[1000..2000], &checkpoint(8, 2000))
                .unwrap();
            crash_image(&path, &crashed);
            drop(store);

            let store = ReplicaStore::open_existing(&crashed, profile, &engine).unwrap();
            assert_eq!(
                store.checkpoint().unwrap(),
                Some(checkpoint(8, 2000)),
                "{profile:?}: the checkpoint is as durable as the file before it"
            );
            assert_eq!(
                store.dictionary().unwrap().as_deref(),
                Some(&b"dict"[..]),
                "{profile:?}: a checkpoint past START_OF_PUSH comes with its dictionary"
            );
            let files = store.live_data_files().unwrap().len();
            // The replay (as if the checkpoint had been lost): chunks of other boundaries.
            store
                .ingest_sorted(&ops[..1500], &checkpoint(6, 1500))
                .unwrap();
            assert_eq!(store.live_data_files().unwrap().len(), files, "{profile:?}");
            store
                .ingest_sorted(&ops[1500..2500], &checkpoint(9, 2500))
                .unwrap();
            store
                .ingest_sorted(&ops[2500..], &checkpoint(10, 3000))
                .unwrap();
            let keys: Vec<Vec<u8>> = (0..3000)
                .map(|i| format!("key-{i:08}").into_bytes())
                .collect();
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
            let check = |store: &ReplicaStore, when: &str| {
                for (i, got) in store.multi_get(&refs).into_iter().enumerate() {
                    let got = got.unwrap();
                    assert_eq!(
                        got.as_deref(),
                        Some(&value(i, 100)[..]),
                        "{profile:?} {when} {i}"
                    );
                }
                let entries: u64 = store
                    .live_data_files()
                    .unwrap()
                    .iter()
                    .map(|f| f.num_entries)
                    .sum();
                assert_eq!(entries, 3000, "{profile:?} {when}: every key stored once");
            };
            check(&store, "replayed");
            let store = store.seal(false, &engine).unwrap();
            check(&store, "sealed");
            drop(store);
            let store = ReplicaStore::open_existing(&crashed, profile, &engine).unwrap();
            assert!(store.is_read_only());
            assert_eq!(store.checkpoint().unwrap(), Some(checkpoint(10, 3000)));
            check(&store, "reopened");
        }
    }

    #[test]
    fn a_chunk_written_while_the_one_before_is_not_yet_ingested_reads_the_same() {
        for profile in PROFILES {
            let engine = Engine::new(1 << 20);
            let dir = tempfile::tempdir().unwrap();
            let store = ReplicaStore::open(&dir.path().join("r"), profile, &engine).unwrap();
            let ops = sorted_ops(3000, 32);
            let first = store.write_sorted(&ops[..1000], 5).unwrap();
            let second = store.write_sorted(&ops[1000..], 10).unwrap();
            store.ingest_written(first, &checkpoint(5, 1000)).unwrap();
            assert_eq!(store.checkpoint().unwrap(), Some(checkpoint(5, 1000)));
            store.ingest_written(second, &checkpoint(10, 3000)).unwrap();
            // A file written and never ingested (an abandoned chunk) is deleted.
            drop(
                store
                    .write_sorted(&sorted_ops(3001, 32)[3000..], 11)
                    .unwrap(),
            );
            let ingest_dir = dir.path().join("r").join(INGEST_DIR);
            assert_eq!(std::fs::read_dir(&ingest_dir).unwrap().count(), 0);
            let store = store.seal(false, &engine).unwrap();
            assert_eq!(store.checkpoint().unwrap(), Some(checkpoint(10, 3000)));
            for op in &ops {
                let WriteOp::Put { key, value } = op else {
                    unreachable!()
                };
                assert_eq!(
                    store.get(key).unwrap().as_deref(),
                    Some(&value[..]),
                    "{profile:?}"
                );
            }
            assert!(store.get(b"key-00003000").unwrap().is_none());
        }
    }

    #[test]
    fn out_of_order_keys_are_refused_by_sorted_ingestion() {
        for profile in [StorageProfile::InMemory, StorageProfile::OnDisk] {
            let dir = tempfile::tempdir().unwrap();
            let store = ReplicaStore::open(dir.path(), profile, &Engine::new(1 << 20)).unwrap();
            let mut ops = sorted_ops(10, 8);
            ops.swap(3, 4);
            let err = store.ingest_sorted(&ops, &checkpoint(20, 10)).unwrap_err();
            assert!(matches!(err, ServerError::Storage { .. }), "{err}");
            assert_eq!(store.checkpoint().unwrap(), None, "checkpoint not moved");
            assert!(
                store.get(b"key-00000000").unwrap().is_none(),
                "nothing ingested"
            );
        }
    }

    #[test]
    fn sealed_store_reopens_read_only_and_serves() {
        for profile in PROFILES {
            for sorted in [true, false] {
                let engine = Engine::new(1 << 20);
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("r");
                let ops = sorted_ops(2000, 64);
                let store = ReplicaStore::open(&path, profile, &engine).unwrap();
                if sorted {
                    store.ingest_sorted(&ops, &checkpoint(7, 2000)).unwrap();
                } else {
                    store.apply(&ops, &checkpoint(7, 2000)).unwrap();
                }
                store.set_dictionary(b"dict").unwrap();
                assert!(!store.is_sealed().unwrap());
                let store = store.seal(!sorted, &engine).unwrap();
                assert!(store.is_read_only() && store.is_sealed().unwrap());
                assert!(store.apply(&[put("x", "y")], &checkpoint(8, 2001)).is_err());
                let warmed = store.warm(u64::MAX).unwrap();
                let usage = store.usage().unwrap();
                assert!(warmed.bytes > 2000 * 64, "{warmed:?}");
                assert!(usage.disk_bytes >= warmed.bytes, "{usage:?} {warmed:?}");
                if profile == StorageProfile::InMemory {
                    assert!(usage.memory_bytes >= warmed.bytes, "{usage:?}");
                }
                drop(store);
                let store = ReplicaStore::open_existing(&path, profile, &engine).unwrap();
                assert!(store.is_read_only(), "{profile:?} sorted={sorted}");
                assert_eq!(store.checkpoint().unwrap(), Some(checkpoint(7, 2000)));
                assert_eq!(store.dictionary().unwrap().as_deref(), Some(&b"dict"[..]));
                assert_eq!(
                    store.get(b"key-00001999").unwrap().as_deref(),
                    Some(&value(1999, 64)[..])
                );
            }
        }
    }

    /// A sealed in-memory replica at `path` of `records` sorted records of 1,000 bytes.
    fn sealed_in_memory(path: &Path, records: usize) -> ReplicaStore {
        let engine = Engine::new(1 << 20);
        let store = ReplicaStore::open(path, StorageProfile::InMemory, &engine).unwrap();
        store
            .ingest_sorted(&sorted_ops(records, 1000), &checkpoint(7, records as u64))
            .unwrap();
        store.seal(false, &engine).unwrap()
    }

    #[test]
    fn memory_of_an_in_memory_store_is_what_the_page_cache_holds_of_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = sealed_in_memory(&dir.path().join("r"), 4000);
        store.drop_data_from_page_cache();
        let cold = store.usage().unwrap();
        assert!(cold.data_bytes > 4000 * 1000, "{cold:?}");
        assert!(
            cold.resident_data_bytes < cold.data_bytes / 10 && !cold.data_resident(),
            "{cold:?}"
        );
        assert!(cold.memory_bytes < cold.data_bytes / 5, "{cold:?}");

        store.warm(u64::MAX).unwrap();
        let warm = store.usage().unwrap();
        assert!(warm.data_resident(), "{warm:?}");
        assert!(warm.memory_bytes >= warm.data_bytes, "{warm:?}");
        assert_eq!(warm.disk_bytes, cold.disk_bytes);

        store.drop_data_from_page_cache();
        let evicted = store.usage().unwrap();
        assert!(!evicted.data_resident(), "{evicted:?}");
        assert!(evicted.memory_bytes < warm.memory_bytes / 5, "{evicted:?}");
    }

    #[test]
    fn an_in_memory_store_locked_in_memory_keeps_its_data_resident() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let store = sealed_in_memory(&path, 2000);
        store.drop_data_from_page_cache();
        assert!(!store.usage().unwrap().data_resident());

        let locked = store.lock_in_memory().unwrap();
        let usage = store.usage().unwrap();
        assert_eq!(locked, usage.data_bytes);
        assert_eq!(store.locked_bytes(), locked);
        assert!(
            usage.data_resident(),
            "locking reads the data in: {usage:?}"
        );
        let read = store.get(b"key-00001999").unwrap().map(|v| v.to_vec());
        assert_eq!(read, Some(value(1999, 1000)));
        store.destroy().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn data_and_checkpoint_survive_a_close_without_seal() {
        // Without a WAL, closing must flush memtables (RocksDB does unless told not to).
        for (profile, wal) in [
            (StorageProfile::InMemory, false),
            (StorageProfile::OnDisk, false),
            (StorageProfile::OnDisk, true),
        ] {
            let engine = Engine::new(1 << 20).with_ingest_wal(wal);
            let dir = tempfile::tempdir().unwrap();
            let store = ReplicaStore::open(dir.path(), profile, &engine).unwrap();
            store
                .apply(&sorted_ops(100, 10), &checkpoint(3, 100))
                .unwrap();
            drop(store);
            let store = ReplicaStore::open(dir.path(), profile, &engine).unwrap();
            assert_eq!(store.checkpoint().unwrap(), Some(checkpoint(3, 100)));
            assert!(store.get(b"key-00000099").unwrap().is_some());
        }
    }

    /// Writes `ops` as `batches` interleaved write batches (each spans the whole key range),
    /// flushed one by one: overlapping files, as an unsorted push's memtable flushes are.
    /// `after_write` runs between each write and its flush.
    fn write_overlapping_flushes(
        store: &ReplicaStore,
        ops: &[WriteOp],
        batches: usize,
        mut after_write: impl FnMut(&ReplicaStore),
    ) {
        for batch in 0..batches {
            let part: Vec<WriteOp> = ops.iter().skip(batch).step_by(batches).cloned().collect();
            store
                .apply(&part, &checkpoint(batch as i64 + 1, 0))
                .unwrap();
            after_write(store);
            store.db.flush_cf(store.data_cf().unwrap()).unwrap();
        }
    }

    #[test]
    fn an_unsorted_push_piles_up_in_level_0_and_sealing_merges_it_once() {
        for profile in PROFILES {
            let engine = Engine::new(1 << 20);
            let dir = tempfile::tempdir().unwrap();
            let store = ReplicaStore::open(dir.path(), profile, &engine).unwrap();
            let ops = sorted_ops(2_000, 10);
            write_overlapping_flushes(&store, &ops, 8, |_| {});
            let files = store.live_data_files().unwrap();
            assert_eq!(files.len(), 8, "{profile:?}: no compaction while written");
            assert!(files.iter().all(|f| f.level == 0), "{profile:?}");
            let store = store.seal(true, &engine).unwrap();
            let files = store.live_data_files().unwrap();
            assert_eq!(files.len(), 1, "{profile:?}: sealing merges the files");
            assert!(files[0].level > 0, "{profile:?}");
            assert_eq!(files[0].num_entries, 2_000, "{profile:?}");
            for op in &ops {
                assert!(store.get(op.key()).unwrap().is_some(), "{profile:?}");
            }
        }
    }

    /// Level-0 files of the data.
    fn level_0_files(store: &ReplicaStore) -> usize {
        let files = store.live_data_files().unwrap();
        files.iter().filter(|f| f.level == 0).count()
    }

    #[test]
    fn a_writable_replica_merges_level_0_at_its_limit() {
        for profile in PROFILES {
            let engine = Engine::new(1 << 20).with_l0_merge_files(4);
            let dir = tempfile::tempdir().unwrap();
            let store = ReplicaStore::open(dir.path(), profile, &engine).unwrap();
            let ops = sorted_ops(2_000, 10);
            let mut most = 0;
            write_overlapping_flushes(&store, &ops, 10, |store| {
                most = most.max(level_0_files(store));
            });
            // Merged (with the memtable) at the writes that found 4 files: batches 4 and 9.
            assert_eq!(most, 3, "{profile:?}: merged when the 4th file was there");
            let files = store.live_data_files().unwrap();
            let below: Vec<_> = files.iter().filter(|f| f.level > 0).collect();
            assert_eq!(below.len(), 1, "{profile:?}: one merged run: {files:?}");
            assert!(level_0_files(&store) < 4, "{profile:?}: {files:?}");
            let store = store.seal(true, &engine).unwrap();
            let files = store.live_data_files().unwrap();
            assert_eq!(files.len(), 1, "{profile:?}");
            assert_eq!(files[0].num_entries, 2_000, "{profile:?}");
            for op in &ops {
                assert!(store.get(op.key()).unwrap().is_some(), "{profile:?}");
            }
        }
    }

    #[test]
    fn a_writable_replica_pins_no_more_of_the_block_cache_as_level_0_grows() {
        let engine = Engine::new(1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path(), StorageProfile::OnDisk, &engine).unwrap();
        let ops = sorted_ops(20_000, 10);
        // Pinned bytes with 0, 1, ..., 7 level-0 files.
        let mut pinned = Vec::new();
        write_overlapping_flushes(&store, &ops, 8, |_| {
            pinned.push(engine.block_cache_pinned_usage());
        });
        assert_eq!(level_0_files(&store), 8);
        pinned.push(engine.block_cache_pinned_usage());
        assert!(
            pinned[8] <= pinned[1],
            "pinned bytes grow with level 0: {pinned:?}"
        );
    }

    #[test]
    fn unsealed_store_reopens_writable() {
        let engine = Engine::new(1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        ReplicaStore::open(&path, StorageProfile::InMemory, &engine)
            .unwrap()
            .apply(&[put("a", "1")], &checkpoint(1, 1))
            .unwrap();
        let store = ReplicaStore::open_existing(&path, StorageProfile::InMemory, &engine).unwrap();
        assert!(!store.is_read_only());
        store.apply(&[put("b", "2")], &checkpoint(2, 2)).unwrap();
        assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    }
}
