//! One RocksDB instance per replica, behind [`ReplicaStore`].
//!
//! Column families: `default` holds the data (serialized key → stored value, i.e.
//! `wire::StoredValue::encode(schema_id, value)`); `meta` holds the [`Checkpoint`] as JSON.
//!
//! **Invariant:** [`ReplicaStore::apply`] writes data and checkpoint in ONE `WriteBatch`, so the
//! checkpointed offset never runs ahead of (or behind) the data it covers.
//!
//! All engine options live in [`engine_options`]; the storage profiles (in-memory PlainTable,
//! on-disk block-based) will plug in there.

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBPinnableSlice, Options, WriteBatch, DB,
};

use crate::error::ServerError;
use crate::validator::Checkpoint;

/// Column family holding the replica's checkpoint.
pub const META_CF: &str = "meta";
/// Key of the checkpoint inside [`META_CF`].
pub const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// Bits per key of the data column family's bloom filter.
const BLOOM_BITS_PER_KEY: f64 = 10.0;
/// Block cache shared by nothing yet: one per replica (bounded, see storage profiles later).
const BLOCK_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// One change to a replica's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Store `value` (a stored value: schema id ‖ bytes) under `key`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Remove `key`.
    Delete { key: Vec<u8> },
}

/// The RocksDB options of a replica database, kept in one place.
pub fn engine_options() -> (Options, Vec<ColumnFamilyDescriptor>) {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);

    let mut data_opts = Options::default();
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    table.set_cache_index_and_filter_blocks(true);
    data_opts.set_block_based_table_factory(&table);
    data_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);

    let cfs = vec![
        ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, data_opts),
        ColumnFamilyDescriptor::new(META_CF, Options::default()),
    ];
    (db_opts, cfs)
}

/// A replica's database: data and checkpoint.
pub struct ReplicaStore {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore")
            .field("path", &self.path)
            .finish()
    }
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica database at `path`.
    pub fn open(path: &Path) -> Result<ReplicaStore, ServerError> {
        std::fs::create_dir_all(path)
            .map_err(|e| ServerError::io("create replica directory", path, e))?;
        let (opts, cfs) = engine_options();
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| storage(path, e))?;
        Ok(ReplicaStore {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `ops` and writes `checkpoint`, atomically (one write batch).
    pub fn apply(&self, ops: &[WriteOp], checkpoint: &Checkpoint) -> Result<(), ServerError> {
        let meta = self.meta_cf()?;
        let encoded = serde_json::to_vec(checkpoint).map_err(|e| ServerError::Checkpoint {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                WriteOp::Put { key, value } => batch.put(key, value),
                WriteOp::Delete { key } => batch.delete(key),
            }
        }
        batch.put_cf(meta, CHECKPOINT_KEY, encoded);
        self.db.write(batch).map_err(|e| storage(&self.path, e))
    }

    /// The stored value of `key`, pinned (no copy out of the block cache).
    pub fn get(&self, key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>, ServerError> {
        self.db.get_pinned(key).map_err(|e| storage(&self.path, e))
    }

    /// The stored values of `keys`, in the same order.
    pub fn multi_get<'a>(
        &'a self,
        keys: &[&[u8]],
    ) -> Vec<Result<Option<DBPinnableSlice<'a>>, ServerError>> {
        let Some(cf) = self.db.cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME) else {
            return keys
                .iter()
                .map(|_| Err(self.missing_cf(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)))
                .collect();
        };
        self.db
            .batched_multi_get_cf(cf, keys.iter().copied(), false)
            .into_iter()
            .map(|r| r.map_err(|e| storage(&self.path, e)))
            .collect()
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

    /// Closes the database and deletes its directory.
    pub fn destroy(self) -> Result<(), ServerError> {
        let path = self.path.clone();
        drop(self.db);
        remove_replica_dir(&path)
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

fn storage(path: &Path, e: rocksdb::Error) -> ServerError {
    ServerError::Storage {
        path: path.to_path_buf(),
        detail: e.into_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> WriteOp {
        WriteOp::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        }
    }

    #[test]
    fn apply_writes_data_and_checkpoint_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(&dir.path().join("s/v1/p0")).unwrap();
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
    }

    #[test]
    fn checkpoint_tracks_the_last_applied_batch() {
        // Atomicity itself comes from RocksDB (one WriteBatch spans both column families); this
        // checks that every batch moves data and checkpoint together.
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(&dir.path().join("p")).unwrap();
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
            let store = ReplicaStore::open(&path).unwrap();
            store.apply(&[put("x", "y")], &cp).unwrap();
        }
        let store = ReplicaStore::open(&path).unwrap();
        assert_eq!(store.checkpoint().unwrap(), Some(cp));
        assert_eq!(store.get(b"x").unwrap().as_deref(), Some(&b"y"[..]));
        store.destroy().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn unreadable_checkpoint_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        let meta = store.db.cf_handle(META_CF).unwrap();
        store.db.put_cf(meta, CHECKPOINT_KEY, b"{not json").unwrap();
        assert!(matches!(
            store.checkpoint(),
            Err(ServerError::Checkpoint { .. })
        ));
    }
}
