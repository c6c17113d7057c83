//! External sort of a push's records, by partition and key, within a memory budget.
//!
//! Records are buffered per partition. When the buffers exceed the budget, each partition's
//! buffer is sorted by (key, record number) and written to a *run* file in a temporary
//! directory. At the end, each partition's runs (and what is still buffered) are merged: equal
//! keys meet there, so duplicates are found in the merge — an identical (key, value) repeat is
//! dropped, a key with two different values fails the push, naming both record numbers — and the
//! merged, de-duplicated records go to one file per partition, read back in key order when the
//! push produces. A dataset that fits the budget never touches the disk.
//!
//! Run and partition files hold records as `u32 key length ‖ key ‖ u64 record number ‖ u32 value
//! length ‖ value` (big-endian), written and read through 1 MiB buffers.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::PushError;

/// Default memory budget of the sort buffers.
pub const DEFAULT_SORT_MEMORY_BYTES: usize = 1024 * 1024 * 1024;
/// Bookkeeping bytes counted per buffered record on top of its key and value.
const ENTRY_OVERHEAD: usize = 64;
const IO_BUFFER: usize = 1024 * 1024;

/// One buffered record.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    key: Vec<u8>,
    record: u64,
    value: Vec<u8>,
}

/// A conflicting duplicate found while merging: the key, and the two record numbers.
#[derive(Debug)]
pub struct Conflict {
    pub key: Vec<u8>,
    pub first: u64,
    pub second: u64,
}

/// Buffers records and spills sorted runs when over budget.
pub struct ExternalSorter {
    buffers: Vec<Vec<Entry>>,
    buffered_bytes: usize,
    budget: usize,
    spill_parent: Option<PathBuf>,
    spill: Option<tempfile::TempDir>,
    runs: Vec<Vec<PathBuf>>,
    spills: usize,
}

impl ExternalSorter {
    /// A sorter for `partitions` partitions keeping at most about `budget` bytes in memory,
    /// spilling into a temporary directory under `spill_parent` (the system's temporary
    /// directory if `None`).
    pub fn new(partitions: u32, budget: usize, spill_parent: Option<PathBuf>) -> ExternalSorter {
        ExternalSorter {
            buffers: (0..partitions).map(|_| Vec::new()).collect(),
            buffered_bytes: 0,
            budget: budget.max(1),
            spill_parent,
            spill: None,
            runs: (0..partitions).map(|_| Vec::new()).collect(),
            spills: 0,
        }
    }

    /// Adds record number `record` to `partition`.
    pub fn add(
        &mut self,
        partition: u32,
        record: u64,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), PushError> {
        self.buffered_bytes += key.len() + value.len() + ENTRY_OVERHEAD;
        self.buffers[partition as usize].push(Entry { key, record, value });
        if self.buffered_bytes > self.budget {
            self.spill_all()?;
        }
        Ok(())
    }

    /// How many times the buffers went to disk.
    pub fn spills(&self) -> usize {
        self.spills
    }

    fn spill_dir(&mut self) -> Result<PathBuf, PushError> {
        if self.spill.is_none() {
            let mut builder = tempfile::Builder::new();
            builder.prefix("rialto-push-sort-");
            let dir = match &self.spill_parent {
                Some(parent) => builder.tempdir_in(parent),
                None => builder.tempdir(),
            }
            .map_err(|e| {
                io_error(
                    self.spill_parent.as_deref().unwrap_or(Path::new("$TMPDIR")),
                    e,
                )
            })?;
            self.spill = Some(dir);
        }
        Ok(self
            .spill
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default())
    }

    fn spill_all(&mut self) -> Result<(), PushError> {
        let dir = self.spill_dir()?;
        for p in 0..self.buffers.len() {
            let mut entries = std::mem::take(&mut self.buffers[p]);
            if entries.is_empty() {
                continue;
            }
            sort(&mut entries);
            let path = dir.join(format!("p{p}-run{}", self.runs[p].len()));
            let mut w = Writer::create(&path)?;
            for e in &entries {
                w.write(&e.key, e.record, &e.value)?;
            }
            w.finish()?;
            self.runs[p].push(path);
        }
        self.buffered_bytes = 0;
        self.spills += 1;
        tracing::info!(spill = self.spills, dir = %dir.display(), "sort buffers spilled to disk");
        Ok(())
    }

    /// Merges everything into per-partition sorted, de-duplicated record sources.
    pub fn finish(mut self) -> Result<Result<SortedDataset, Conflict>, PushError> {
        let mut dataset = SortedDataset {
            partitions: Vec::with_capacity(self.buffers.len()),
            identical_duplicates: 0,
            spills: self.spills,
            _dir: None,
        };
        for p in 0..self.buffers.len() {
            let mut entries = std::mem::take(&mut self.buffers[p]);
            sort(&mut entries);
            let runs = std::mem::take(&mut self.runs[p]);
            if runs.is_empty() {
                let mut records = Vec::with_capacity(entries.len());
                let mut dedup = Dedup::default();
                for e in entries {
                    match dedup.next(e) {
                        Step::Keep(e) => records.push((e.key, e.value)),
                        Step::Drop => dataset.identical_duplicates += 1,
                        Step::Conflict(c) => return Ok(Err(c)),
                    }
                }
                let count = records.len() as u64;
                dataset.partitions.push(SortedPartition {
                    source: Source::Memory(records),
                    records: count,
                });
                continue;
            }
            // Merge the runs and the in-memory rest into one partition file.
            let dir = self.spill_dir()?;
            let mut sources: Vec<Box<dyn Iterator<Item = Result<Entry, PushError>>>> = runs
                .iter()
                .map(|path| Ok(Box::new(Reader::open(path)?) as Box<dyn Iterator<Item = _>>))
                .collect::<Result<_, PushError>>()?;
            sources.push(Box::new(entries.into_iter().map(Ok)));
            let path = dir.join(format!("p{p}"));
            let mut w = Writer::create(&path)?;
            let mut dedup = Dedup::default();
            let mut count = 0u64;
            for e in Merge::new(sources)? {
                match dedup.next(e?) {
                    Step::Keep(e) => {
                        w.write(&e.key, e.record, &e.value)?;
                        count += 1;
                    }
                    Step::Drop => dataset.identical_duplicates += 1,
                    Step::Conflict(c) => return Ok(Err(c)),
                }
            }
            w.finish()?;
            for run in &runs {
                let _ = std::fs::remove_file(run);
            }
            dataset.partitions.push(SortedPartition {
                source: Source::File(path),
                records: count,
            });
        }
        dataset._dir = self.spill.take();
        Ok(Ok(dataset))
    }
}

fn sort(entries: &mut [Entry]) {
    entries.sort_unstable_by(|a, b| a.key.cmp(&b.key).then(a.record.cmp(&b.record)));
}

enum Step {
    Keep(Entry),
    Drop,
    Conflict(Conflict),
}

/// De-duplication over records in (key, record number) order.
#[derive(Default)]
struct Dedup {
    /// Key, first record number and value hash of the last kept record.
    last: Option<(Vec<u8>, u64, u64)>,
}

impl Dedup {
    fn next(&mut self, e: Entry) -> Step {
        let hash = xxhash_rust::xxh3::xxh3_64(&e.value);
        if let Some((key, first, first_hash)) = &self.last {
            if *key == e.key {
                if *first_hash == hash {
                    return Step::Drop;
                }
                return Step::Conflict(Conflict {
                    key: e.key,
                    first: *first,
                    second: e.record,
                });
            }
        }
        self.last = Some((e.key.clone(), e.record, hash));
        Step::Keep(e)
    }
}

/// The sorted, de-duplicated records of a push, by partition.
pub struct SortedDataset {
    pub partitions: Vec<SortedPartition>,
    /// Records dropped because an identical (key, value) record came earlier.
    pub identical_duplicates: u64,
    /// How many times the sort spilled to disk (0: the dataset fit in memory).
    pub spills: usize,
    /// Keeps the spill directory (and the partition files in it) until the dataset drops.
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for SortedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SortedDataset")
            .field("partitions", &self.partitions.len())
            .field("identical_duplicates", &self.identical_duplicates)
            .field("spills", &self.spills)
            .finish()
    }
}

/// Records read back in key order.
pub type RecordIter = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), PushError>> + Send>;

/// One partition's records in key order, in memory or in a file.
#[derive(Debug)]
pub struct SortedPartition {
    source: Source,
    /// Number of records.
    pub records: u64,
}

#[derive(Debug)]
enum Source {
    Memory(Vec<(Vec<u8>, Vec<u8>)>),
    File(PathBuf),
}

impl SortedPartition {
    /// The records, `(key, value)`, in key order.
    pub fn into_records(self) -> Result<RecordIter, PushError> {
        Ok(match self.source {
            Source::Memory(records) => Box::new(records.into_iter().map(Ok)),
            Source::File(path) => {
                Box::new(Reader::open(&path)?.map(|e| e.map(|e| (e.key, e.value))))
            }
        })
    }
}

struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
}

impl Writer {
    fn create(path: &Path) -> Result<Writer, PushError> {
        let file = File::create(path).map_err(|e| io_error(path, e))?;
        Ok(Writer {
            out: BufWriter::with_capacity(IO_BUFFER, file),
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, key: &[u8], record: u64, value: &[u8]) -> Result<(), PushError> {
        let path = &self.path;
        let mut put = |bytes: &[u8]| self.out.write_all(bytes).map_err(|e| io_error(path, e));
        put(&(key.len() as u32).to_be_bytes())?;
        put(key)?;
        put(&record.to_be_bytes())?;
        put(&(value.len() as u32).to_be_bytes())?;
        put(value)
    }

    fn finish(mut self) -> Result<(), PushError> {
        self.out.flush().map_err(|e| io_error(&self.path, e))
    }
}

struct Reader {
    input: BufReader<File>,
    path: PathBuf,
}

impl Reader {
    fn open(path: &Path) -> Result<Reader, PushError> {
        let file = File::open(path).map_err(|e| io_error(path, e))?;
        Ok(Reader {
            input: BufReader::with_capacity(IO_BUFFER, file),
            path: path.to_path_buf(),
        })
    }

    fn read_entry(&mut self) -> std::io::Result<Option<Entry>> {
        let mut len = [0u8; 4];
        match self.input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut key = vec![0u8; u32::from_be_bytes(len) as usize];
        self.input.read_exact(&mut key)?;
        let mut record = [0u8; 8];
        self.input.read_exact(&mut record)?;
        self.input.read_exact(&mut len)?;
        let mut value = vec![0u8; u32::from_be_bytes(len) as usize];
        self.input.read_exact(&mut value)?;
        Ok(Some(Entry {
            key,
            record: u64::from_be_bytes(record),
            value,
        }))
    }
}

impl Iterator for Reader {
    type Item = Result<Entry, PushError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.read_entry()
            .map_err(|e| io_error(&self.path, e))
            .transpose()
    }
}

/// K-way merge of sources sorted by (key, record number).
struct Merge {
    sources: Vec<Box<dyn Iterator<Item = Result<Entry, PushError>>>>,
    heap: BinaryHeap<Head>,
}

/// The next entry of source `source`; ordered so that the heap pops the smallest first.
struct Head {
    entry: Entry,
    source: usize,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        (&other.entry.key, other.entry.record).cmp(&(&self.entry.key, self.entry.record))
    }
}

impl Merge {
    fn new(
        mut sources: Vec<Box<dyn Iterator<Item = Result<Entry, PushError>>>>,
    ) -> Result<Merge, PushError> {
        let mut heap = BinaryHeap::with_capacity(sources.len());
        for (source, it) in sources.iter_mut().enumerate() {
            if let Some(entry) = it.next().transpose()? {
                heap.push(Head { entry, source });
            }
        }
        Ok(Merge { sources, heap })
    }
}

impl Iterator for Merge {
    type Item = Result<Entry, PushError>;
    fn next(&mut self) -> Option<Self::Item> {
        let Head { entry, source } = self.heap.pop()?;
        match self.sources[source].next() {
            Some(Ok(next)) => self.heap.push(Head {
                entry: next,
                source,
            }),
            Some(Err(e)) => return Some(Err(e)),
            None => {}
        }
        Some(Ok(entry))
    }
}

fn io_error(path: &Path, e: std::io::Error) -> PushError {
    PushError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(d: SortedDataset) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        d.partitions
            .into_iter()
            .map(|p| p.into_records().unwrap().map(|r| r.unwrap()).collect())
            .collect()
    }

    /// Records `n` keys over 3 partitions in a scrambled order, each key once, plus identical
    /// repeats of every tenth.
    fn feed(sorter: &mut ExternalSorter, n: u64) {
        let mut record = 0;
        for i in (0..n).map(|i| (i * 7919) % n) {
            record += 1;
            let key = format!("k{i:06}").into_bytes();
            let value = format!("value-{i}-{}", "x".repeat((i % 50) as usize)).into_bytes();
            sorter
                .add((i % 3) as u32, record, key.clone(), value.clone())
                .unwrap();
            if i % 10 == 0 {
                record += 1;
                sorter.add((i % 3) as u32, record, key, value).unwrap();
            }
        }
    }

    #[test]
    fn spilled_and_in_memory_sorts_give_the_same_records() {
        let mut small = ExternalSorter::new(3, 4096, None);
        let mut large = ExternalSorter::new(3, usize::MAX, None);
        feed(&mut small, 5_000);
        feed(&mut large, 5_000);
        assert!(small.spills() > 10, "spilled {} times", small.spills());
        assert_eq!(large.spills(), 0);
        let small = small.finish().unwrap().unwrap();
        let large = large.finish().unwrap().unwrap();
        assert_eq!(small.identical_duplicates, 500);
        assert_eq!(large.identical_duplicates, 500);
        let counts: Vec<u64> = small.partitions.iter().map(|p| p.records).collect();
        let (a, b) = (collect(small), collect(large));
        assert_eq!(a, b);
        assert_eq!(a.iter().map(Vec::len).sum::<usize>(), 5_000);
        assert_eq!(counts, a.iter().map(|p| p.len() as u64).collect::<Vec<_>>());
        for p in &a {
            assert!(p.windows(2).all(|w| w[0].0 < w[1].0), "strictly sorted");
        }
    }

    #[test]
    fn a_conflicting_duplicate_is_found_across_runs() {
        for budget in [usize::MAX, 256] {
            let mut s = ExternalSorter::new(1, budget, None);
            for i in 0..100u64 {
                s.add(0, i + 1, format!("k{i:03}").into_bytes(), b"v".to_vec())
                    .unwrap();
            }
            s.add(0, 101, b"k042".to_vec(), b"other".to_vec()).unwrap();
            let conflict = s.finish().unwrap().unwrap_err();
            assert_eq!(
                (conflict.key.as_slice(), conflict.first, conflict.second),
                (&b"k042"[..], 43, 101),
                "budget {budget}"
            );
        }
    }

    #[test]
    fn the_spill_directory_goes_away_with_the_dataset() {
        let parent = tempfile::tempdir().unwrap();
        let mut s = ExternalSorter::new(3, 100, Some(parent.path().to_path_buf()));
        feed(&mut s, 200);
        let d = s.finish().unwrap().unwrap();
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 1);
        drop(d);
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }
}
