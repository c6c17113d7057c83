//! The storage engine of a replica, as the server uses it (`rialto_server::ReplicaStore`):
//!
//! * `read/<profile>/<value bytes>`: point get and 500-key multi-get (keys sorted first, as the
//!   server's batch-get does) on a sealed, warmed replica of `RIALTO_BENCH_KEYS` keys (default
//!   1,000,000), for the in-memory profile (PlainTable, hash index, mmap) and the on-disk profile
//!   (block-based, bloom filter, block cache of `RIALTO_BENCH_CACHE_MIB`, default 256). With
//!   `RIALTO_BENCH_LOCK` set, the in-memory replica is locked in memory as the server's
//!   `--lock-in-memory-stores` does (off by default, like the flag).
//! * `ingest/<path>/<value bytes>`: a whole sorted partition of `RIALTO_BENCH_INGEST_KEYS` keys
//!   (default 100,000) written and sealed: SST ingestion (both profiles; on-disk also for a
//!   store whose codec already compressed the values, so RocksDB does not), or write batches
//!   through the memtable (without a WAL as the server does for unsorted pushes, and with one as
//!   the walking skeleton did), including the flush and compaction sealing needs. The
//!   `*_memtable_unsorted` cases write the same records in a shuffled order: what an unsorted
//!   push of the same data costs the server (overlapping flushes, a compaction that rewrites).
//!   SST chunks are pipelined as the server does (a chunk's file is written while the chunk
//!   before is ingested); `in_memory_sst_one_at_a_time` writes and ingests them in turn.
//!
//! Run (dev profile, like everything else here; `--workspace` keeps RocksDB's build cached):
//! `cargo bench --workspace --profile dev --bench storage -- --warm-up-time 1 --measurement-time 5`

use std::cell::OnceCell;
use std::path::Path;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rialto_protocol::meta::{Compression, StorageProfile};
use rialto_protocol::wire::StoredValue;
use rialto_server::store::SORTED_CHUNK_BYTES;
use rialto_server::store::{Engine, Layout, ReplicaStore, Served, SortedFile, WriteOp};
use rialto_server::validator::Checkpoint;

const VALUE_SIZES: [usize; 2] = [100, 1_000];
const MULTI_GET_KEYS: usize = 500;
const WRITE_BATCH: usize = 1_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The serialized key of record `i`: an Avro string ("member:" and 10 digits), sortable.
fn key(i: usize) -> Vec<u8> {
    let text = format!("member:{i:010}");
    let mut out = Vec::with_capacity(text.len() + 1);
    out.push((text.len() as u8) << 1); // Avro zig-zag length (fits one byte)
    out.extend_from_slice(text.as_bytes());
    out
}

/// A stored value of `len` bytes for record `i`: schema id and pseudo-random bytes (worst case
/// for the block-based format's LZ4; PlainTable does not compress).
fn stored_value(i: usize, len: usize) -> Vec<u8> {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    StoredValue::encode(1, &bytes)
}

fn checkpoint(records: u64) -> Checkpoint {
    Checkpoint {
        next_offset: records as i64,
        records,
        ..Default::default()
    }
}

/// The puts of keys `0..count`, in key order.
fn sorted_ops(count: usize, value_len: usize) -> Vec<WriteOp> {
    (0..count)
        .map(|i| WriteOp::Put {
            key: key(i),
            value: stored_value(i, value_len),
        })
        .collect()
}

/// How `build` writes a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritePath {
    /// Write batches through the memtable (unsorted pushes).
    Memtable,
    /// SST files, pipelined as the server does: a chunk's file is written while the chunk
    /// before is ingested.
    Sst,
    /// SST files, each written and ingested before the next is started (the server before
    /// the 87334bb run).
    SstOneAtATime,
}

/// Writes `ops` (in key order) through `write` and seals the replica.
fn build(
    path: &Path,
    layout: impl Into<Layout>,
    engine: &Engine,
    ops: &[WriteOp],
    write: WritePath,
) -> ReplicaStore {
    let sst = write != WritePath::Memtable;
    let store = ReplicaStore::open(path, layout, engine).expect("open");
    let mut start = 0;
    let mut bytes = 0;
    let mut written: Option<(Option<SortedFile>, Checkpoint)> = None;
    for (i, op) in ops.iter().enumerate() {
        if let WriteOp::Put { key, value } = op {
            bytes += key.len() + value.len();
        }
        let full = if sst {
            bytes >= SORTED_CHUNK_BYTES
        } else {
            i + 1 - start >= WRITE_BATCH
        };
        if full || i + 1 == ops.len() {
            let chunk = &ops[start..=i];
            let cp = checkpoint(i as u64 + 1);
            if write == WritePath::SstOneAtATime {
                store.ingest_sorted(chunk, &cp).expect("ingest");
            } else if sst {
                let file = std::thread::scope(|s| {
                    let writing = s.spawn(|| store.write_sorted(chunk, cp.next_offset));
                    if let Some((file, cp)) = written.take() {
                        store.ingest_written(file, &cp).expect("ingest");
                    }
                    writing.join().expect("write thread").expect("write")
                });
                written = Some((file, cp));
            } else {
                store.apply(chunk, &cp).expect("apply");
            }
            start = i + 1;
            bytes = 0;
        }
    }
    if let Some((file, cp)) = written {
        store.ingest_written(file, &cp).expect("ingest");
    }
    store.seal(!sst, engine).expect("seal")
}

/// `ops` in a pseudo-random order (Fisher-Yates over xorshift; the same order every run).
fn shuffled(ops: &[WriteOp]) -> Vec<WriteOp> {
    let mut out = ops.to_vec();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..out.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.swap(i, (x % (i as u64 + 1)) as usize);
    }
    out
}

/// Random record numbers below `count` (xorshift; the same sequence every run).
fn random_indexes(count: usize, n: usize) -> Vec<usize> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % count as u64) as usize
        })
        .collect()
}

/// A sealed, warmed replica of `count` keys with `value_len`-byte values (and its directory),
/// its block cache warmed with `keys`, the population the measurement reads.
fn read_replica(
    profile: StorageProfile,
    engine: &Engine,
    count: usize,
    value_len: usize,
    keys: &[Vec<u8>],
) -> (tempfile::TempDir, ReplicaStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let store = build(
        dir.path(),
        profile,
        engine,
        &sorted_ops(count, value_len),
        WritePath::Sst,
    );
    let warmed = store.warm(u64::MAX).expect("warm");
    // What the server's usage refresh costs per replica (mincore over the data files).
    let measuring = Instant::now();
    let usage = store.usage().expect("usage");
    let measured = measuring.elapsed();
    eprintln!(
        "{profile:?} {count} x {value_len} B: built in {:.1} s; disk {} MB, memory {} MB \
         (data {} MB, resident {} MB, measured in {:.2} ms), warmed {} MB in {} ms",
        started.elapsed().as_secs_f64(),
        usage.disk_bytes / 1_000_000,
        usage.memory_bytes / 1_000_000,
        usage.data_bytes / 1_000_000,
        usage.resident_data_bytes / 1_000_000,
        measured.as_secs_f64() * 1000.0,
        warmed.bytes / 1_000_000,
        warmed.elapsed.as_millis()
    );
    if profile == StorageProfile::InMemory && std::env::var_os("RIALTO_BENCH_LOCK").is_some() {
        // What `--lock-in-memory-stores` adds when a replica goes ONLINE (after warming).
        let locking = Instant::now();
        match store.lock_in_memory() {
            Ok(bytes) => eprintln!(
                "  locked {} MB in memory in {:.1} ms",
                bytes / 1_000_000,
                locking.elapsed().as_secs_f64() * 1000.0
            ),
            Err(e) => eprintln!("  cannot lock the data in memory: {e}"),
        }
    }
    for k in keys {
        black_box(store.get(k).expect("get").map(|v| v.len()));
    }
    (dir, store)
}

fn reads(c: &mut Criterion) {
    let count = env_usize("RIALTO_BENCH_KEYS", 1_000_000);
    let engine = Engine::new(env_usize("RIALTO_BENCH_CACHE_MIB", 256) * 1024 * 1024);
    for value_len in VALUE_SIZES {
        for profile in [StorageProfile::InMemory, StorageProfile::OnDisk] {
            let name = match profile {
                StorageProfile::InMemory => "in_memory_plain_table",
                StorageProfile::OnDisk => "on_disk_block_based",
            };
            let keys: Vec<Vec<u8>> = random_indexes(count, 100_000)
                .into_iter()
                .map(key)
                .collect();
            // Built when a benchmark that reads it first runs: a filter that skips this group skips
            // building a million keys.
            let replica = OnceCell::new();
            let store = || {
                &replica
                    .get_or_init(|| read_replica(profile, &engine, count, value_len, &keys))
                    .1
            };
            let mut g = c.benchmark_group(format!("read/{name}/{value_len}B"));
            g.throughput(Throughput::Elements(1));
            let mut next = 0usize;
            g.bench_function(BenchmarkId::new("get", count), |b| {
                let store = store();
                b.iter(|| {
                    next = (next + 1) % keys.len();
                    let v = store.get(&keys[next]).expect("get");
                    assert!(v.is_some(), "every key is present");
                    black_box(v.map(|v| v.len()))
                })
            });
            g.throughput(Throughput::Elements(MULTI_GET_KEYS as u64));
            let mut start = 0usize;
            let mut batch: Vec<&[u8]> = Vec::with_capacity(MULTI_GET_KEYS);
            // `_served` also makes the check every read makes for chunked values (a value that
            // is a manifest is reassembled): what chunking costs stores without large values.
            for (bench, served) in [
                ("multi_get_500_sorted", false),
                ("multi_get_500_sorted_served", true),
            ] {
                g.bench_function(BenchmarkId::new(bench, count), |b| {
                    let store = store();
                    b.iter(|| {
                        start = (start + MULTI_GET_KEYS) % (keys.len() - MULTI_GET_KEYS);
                        batch.clear();
                        batch.extend(
                            keys[start..start + MULTI_GET_KEYS]
                                .iter()
                                .map(|k| k.as_slice()),
                        );
                        batch.sort_unstable();
                        let found = store
                            .multi_get_sorted(&batch)
                            .into_iter()
                            .zip(&batch)
                            .filter(|(r, key)| match r {
                                Ok(Some(v)) if served => {
                                    matches!(store.served(key, v), Served::Value(_))
                                }
                                Ok(Some(_)) => true,
                                _ => false,
                            })
                            .count();
                        assert_eq!(found, MULTI_GET_KEYS);
                        black_box(found)
                    })
                });
            }
            g.finish();
        }
    }
}

fn ingestion(c: &mut Criterion) {
    let count = env_usize("RIALTO_BENCH_INGEST_KEYS", 100_000);
    let engine = Engine::new(64 * 1024 * 1024);
    let engine_wal = Engine::new(64 * 1024 * 1024).with_ingest_wal(true);
    for value_len in VALUE_SIZES {
        let ops = sorted_ops(count, value_len);
        let unsorted = shuffled(&ops);
        let mut g = c.benchmark_group(format!("ingest/{value_len}B"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(count as u64));
        let zstd_on_disk = Layout::new(StorageProfile::OnDisk, Compression::Zstd);
        for (name, layout, write, engine, ops) in [
            (
                "on_disk_sst_ingestion",
                StorageProfile::OnDisk.into(),
                WritePath::Sst,
                &engine,
                &ops,
            ),
            // Values compressed by the store's codec: RocksDB does not compress them again.
            (
                "on_disk_sst_ingestion_zstd_store",
                zstd_on_disk,
                WritePath::Sst,
                &engine,
                &ops,
            ),
            (
                "on_disk_memtable",
                StorageProfile::OnDisk.into(),
                WritePath::Memtable,
                &engine,
                &ops,
            ),
            (
                "on_disk_memtable_wal",
                StorageProfile::OnDisk.into(),
                WritePath::Memtable,
                &engine_wal,
                &ops,
            ),
            (
                "on_disk_memtable_unsorted",
                StorageProfile::OnDisk.into(),
                WritePath::Memtable,
                &engine,
                &unsorted,
            ),
            (
                "in_memory_sst_ingestion",
                StorageProfile::InMemory.into(),
                WritePath::Sst,
                &engine,
                &ops,
            ),
            (
                "in_memory_sst_one_at_a_time",
                StorageProfile::InMemory.into(),
                WritePath::SstOneAtATime,
                &engine,
                &ops,
            ),
            (
                "in_memory_memtable",
                StorageProfile::InMemory.into(),
                WritePath::Memtable,
                &engine,
                &ops,
            ),
            (
                "in_memory_memtable_unsorted",
                StorageProfile::InMemory.into(),
                WritePath::Memtable,
                &engine,
                &unsorted,
            ),
        ] {
            g.bench_function(BenchmarkId::new(name, count), |b| {
                b.iter_with_large_drop(|| {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let store = build(dir.path(), layout, engine, ops, write);
                    (store, dir)
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, ingestion, reads);
criterion_main!(benches);
