//! [`MemoryMetaStore`]: etcd's semantics, in one process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::journal::{put_bytes, Fields, Journal};
use crate::meta::{KeyValue, LeaseHandle, MetaError, MetaStore, WatchEvent, WatchStream};

/// Revisions of history kept for watches that start in the past; older ones are compacted
/// away, as etcd's auto-compaction does, and a watch from before them ends at once.
pub const DEFAULT_HISTORY_REVISIONS: usize = 100_000;
/// Longest lease TTL granted (a day); longer requests get this.
pub const LEASE_TTL_S_MAX: i64 = 24 * 3600;
/// Revisions a watcher may have undelivered before its watch ends (it must re-list).
pub const WATCH_QUEUE_REVISIONS: usize = 10_000;
/// A persistent store's journal is compacted once it holds this many bytes and four times
/// what its live keys take.
const JOURNAL_COMPACTION_MIN_BYTES: u64 = 16 << 20;

struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    lease: Option<i64>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    lost: watch::Sender<bool>,
}

#[derive(Default)]
struct Queue {
    revisions: VecDeque<Vec<WatchEvent>>,
    ended: bool,
}

struct Watcher {
    prefix: String,
    queue: Mutex<Queue>,
    wake: Notify,
}

impl Watcher {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one revision's events under this watcher's prefix; ends a watcher that fell behind.
    fn offer(&self, events: &[WatchEvent]) {
        let mine: Vec<WatchEvent> = events
            .iter()
            .filter(|e| event_key(e).starts_with(&self.prefix))
            .cloned()
            .collect();
        if mine.is_empty() {
            return;
        }
        let mut q = self.queue();
        if q.ended {
            return;
        }
        if q.revisions.len() >= WATCH_QUEUE_REVISIONS {
            q.revisions.clear();
            q.ended = true;
        } else {
            q.revisions.push_back(mine);
        }
        drop(q);
        self.wake.notify_one();
    }

    fn end(&self) {
        self.queue().ended = true;
        self.wake.notify_one();
    }
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

struct State {
    revision: i64,
    data: BTreeMap<String, Entry>,
    /// Events of revisions after `compacted`, one element per revision.
    history: VecDeque<(i64, Vec<WatchEvent>)>,
    compacted: i64,
    history_limit: usize,
    watchers: Vec<Weak<Watcher>>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    /// Where a persistent store writes every change before applying it.
    journal: Option<Journal>,
    /// The journal's size at which compaction is next considered.
    compaction_at: u64,
}

/// Journal record kinds of the metadata store.
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// The store's revision (written by compaction: deleted keys' revisions are not kept).
const REVISION: u8 = 3;

fn journal_error(context: String, e: std::io::Error) -> MetaError {
    MetaError::Failed {
        context,
        detail: format!("cannot write the metadata journal: {e}"),
    }
}

fn put_record(revision: i64, key: &str, value: &[u8], leased: bool) -> Vec<u8> {
    let mut r = Vec::with_capacity(22 + key.len() + value.len());
    r.push(PUT);
    r.extend_from_slice(&revision.to_le_bytes());
    r.push(leased as u8);
    put_bytes(&mut r, key.as_bytes());
    r.extend_from_slice(value);
    r
}

/// One revision's deletes, in one record: a failed write leaves none of them on disk.
fn delete_record<'a>(revision: i64, keys: impl IntoIterator<Item = &'a String>) -> Vec<u8> {
    let mut r = vec![DELETE];
    r.extend_from_slice(&revision.to_le_bytes());
    for key in keys {
        put_bytes(&mut r, key.as_bytes());
    }
    r
}

fn revision_record(revision: i64) -> Vec<u8> {
    let mut r = vec![REVISION];
    r.extend_from_slice(&revision.to_le_bytes());
    r
}

/// What a journal's records leave: the keys not bound to a lease (leases do not outlive the
/// process that held them) with their mod revisions, and the last revision.
fn replay(records: &[Vec<u8>]) -> std::io::Result<(BTreeMap<String, Entry>, i64)> {
    let mut data = BTreeMap::new();
    let mut revision = 1;
    for record in records {
        let mut f = Fields::new(record);
        let kind = f.u8()?;
        let rev = f.i64()?;
        revision = revision.max(rev);
        match kind {
            PUT => {
                let leased = f.u8()? != 0;
                let key = String::from_utf8_lossy(f.bytes()?).into_owned();
                if leased {
                    data.remove(&key);
                } else {
                    let value = f.rest().to_vec();
                    let entry = Entry {
                        value,
                        mod_revision: rev,
                        lease: None,
                    };
                    data.insert(key, entry);
                }
            }
            DELETE => {
                while !f.is_empty() {
                    data.remove(String::from_utf8_lossy(f.bytes()?).as_ref());
                }
            }
            REVISION => {}
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown metadata journal record kind {other}"),
                ))
            }
        }
    }
    Ok((data, revision))
}

impl State {
    /// Writes one change to the journal (a persistent store), compacting it when it has grown.
    fn journal(&mut self, record: impl FnOnce() -> Vec<u8>) -> std::io::Result<()> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        journal.append(&record())?;
        // Like etcd, a change is on the disk before it is applied and answered.
        journal.sync()?;
        if journal.bytes() >= self.compaction_at {
            self.compact_journal()?;
        }
        Ok(())
    }

    /// Rewrites the journal as one put per live key not bound to a lease.
    fn compact_journal(&mut self) -> std::io::Result<()> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        let mut records: Vec<Vec<u8>> = self
            .data
            .iter()
            .filter(|(_, e)| e.lease.is_none())
            .map(|(k, e)| put_record(e.mod_revision, k, &e.value, false))
            .collect();
        records.push(revision_record(self.revision));
        journal.rewrite(records.iter().map(Vec::as_slice))?;
        self.compaction_at = JOURNAL_COMPACTION_MIN_BYTES.max(4 * journal.bytes());
        Ok(())
    }

    /// Records one revision made of `events` and hands them to the watchers.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        self.watchers.retain(|w| match w.upgrade() {
            Some(w) => {
                w.offer(&events);
                true
            }
            None => false,
        });
        self.history.push_back((self.revision, events));
        while self.history.len() > self.history_limit {
            if let Some((rev, _)) = self.history.pop_front() {
                self.compacted = rev;
            }
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        if let Some(id) = lease {
            if !self.leases.contains_key(&id) {
                return Err(MetaError::Failed {
                    context: format!("put {key}"),
                    detail: format!("lease {id} not found (expired or revoked)"),
                });
            }
        }
        let mod_revision = self.revision + 1;
        self.journal(|| put_record(mod_revision, key, &value, lease.is_some()))
            .map_err(|e| journal_error(format!("put {key}"), e))?;
        self.revision = mod_revision;
        self.data.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                mod_revision,
                lease,
            },
        );
        self.commit(vec![WatchEvent::Put(KeyValue {
            key: key.to_string(),
            value,
            mod_revision,
        })]);
        Ok(())
    }

    /// Deletes `keys` in one revision (as etcd's range delete and lease revocation do).
    fn delete(&mut self, keys: Vec<String>) -> Result<(), MetaError> {
        let keys: Vec<String> = keys
            .into_iter()
            .filter(|k| self.data.contains_key(k))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mod_revision = self.revision + 1;
        // Keys of a lease are not replayed anyway.
        let persistent: Vec<&String> = keys
            .iter()
            .filter(|k| self.data.get(*k).is_some_and(|e| e.lease.is_none()))
            .collect();
        if !persistent.is_empty() {
            let record = delete_record(mod_revision, persistent.iter().copied());
            self.journal(|| record)
                .map_err(|e| journal_error(format!("delete {}", persistent[0]), e))?;
        }
        self.revision = mod_revision;
        let events = keys
            .into_iter()
            .map(|key| {
                self.data.remove(&key);
                WatchEvent::Delete { key, mod_revision }
            })
            .collect();
        self.commit(events);
        Ok(())
    }

    fn keys_under(&self, prefix: &str) -> Vec<String> {
        self.data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn drop_lease(&mut self, id: i64) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let _ = lease.lost.send(true);
        let keys = self
            .data
            .iter()
            .filter(|(_, e)| e.lease == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        // Only a lease's keys: nothing is journaled, nothing can fail.
        let _ = self.delete(keys);
        true
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves consistent data (every change is one call); go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An in-memory [`MetaStore`] with etcd's semantics: one revision counter, per-key mod
/// revisions, compare-and-put, prefix watches from a past revision (within the kept history),
/// watches that end when they fall behind or start before the compacted history, and leases
/// with a TTL on tokio's clock: kept alive while their [`LeaseHandle`] lives, expired a TTL
/// after it is dropped, their keys deleted in one revision. Cheap to clone (one shared state).
#[derive(Clone)]
pub struct MemoryMetaStore {
    shared: Arc<Shared>,
}

impl Default for MemoryMetaStore {
    fn default() -> Self {
        MemoryMetaStore::new()
    }
}

impl MemoryMetaStore {
    /// An empty store keeping [`DEFAULT_HISTORY_REVISIONS`] of history.
    pub fn new() -> MemoryMetaStore {
        MemoryMetaStore::with_history(DEFAULT_HISTORY_REVISIONS)
    }

    /// An empty store keeping the last `revisions` revisions of history for watches.
    pub fn with_history(revisions: usize) -> MemoryMetaStore {
        MemoryMetaStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    revision: 1, // etcd's first revision; the first write makes it 2
                    data: BTreeMap::new(),
                    history: VecDeque::new(),
                    compacted: 1,
                    history_limit: revisions.max(1),
                    watchers: Vec::new(),
                    leases: HashMap::new(),
                    next_lease: 1,
                    journal: None,
                    compaction_at: u64::MAX,
                }),
            }),
        }
    }

    /// A store kept in the journal file at `path` (created if missing): every change is
    /// written there before it is applied, and opening replays it. What survives is what
    /// etcd keeps across a restart of every process: the keys not bound to a lease, with their
    /// mod revisions, and the revision counter. Leases, and their keys, do not survive (their
    /// holders are gone); nor does watch history (a watch from before the restart ends at once
    /// and its watcher re-lists, as after etcd's compaction). The journal is compacted on
    /// opening and whenever it grows to four times its live content.
    pub fn open(path: &Path) -> std::io::Result<MemoryMetaStore> {
        let (journal, records) = Journal::open(path)?;
        let (data, revision) = replay(&records)?;
        let keys = data.len();
        let store = MemoryMetaStore::new();
        {
            let mut s = store.shared.lock();
            s.data = data;
            s.revision = revision;
            s.compacted = revision;
            s.journal = Some(journal);
            s.compact_journal()?;
        }
        tracing::info!(
            journal = %path.display(),
            keys,
            revision,
            "metadata store opened from its journal"
        );
        Ok(store)
    }

    /// Expires a lease now, as if its TTL ran out: its keys vanish and its handle reports it
    /// lost. Returns whether the lease existed.
    pub fn expire_lease(&self, id: i64) -> bool {
        self.shared.lock().drop_lease(id)
    }

    /// Ids of the leases alive now.
    pub fn leases(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.shared.lock().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Refreshes a lease as its keep-alive does (for a holder in another process); returns
    /// whether the lease is still alive.
    pub fn keep_alive(&self, id: i64) -> bool {
        match self.shared.lock().leases.get_mut(&id) {
            Some(lease) => {
                lease.deadline = Instant::now() + lease.ttl;
                true
            }
            None => false,
        }
    }

    /// The lease a key is attached to.
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        self.shared.lock().data.get(key).and_then(|e| e.lease)
    }

    /// The value of a key now, without the async trait.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.lock().data.get(key).map(|e| e.value.clone())
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.shared.lock().revision
    }

    /// Forgets history up to `revision` (as `etcdctl compact` does); watches that still needed
    /// it end, and later ones starting there end at once.
    pub fn compact(&self, revision: i64) {
        let mut s = self.shared.lock();
        while s.history.front().is_some_and(|(rev, _)| *rev <= revision) {
            s.history.pop_front();
        }
        s.compacted = s.compacted.max(revision.min(s.revision));
    }

    /// Ends every open watch, as a lost connection to etcd does: watchers must re-list.
    pub fn end_watches(&self) {
        let watchers = std::mem::take(&mut self.shared.lock().watchers);
        for w in watchers.iter().filter_map(Weak::upgrade) {
            w.end();
        }
    }

    fn lease_task(&self, id: i64) -> tokio::task::JoinHandle<()> {
        let shared = Arc::downgrade(&self.shared);
        // The keep-alive: refreshes the deadline every third of the TTL while the handle lives.
        let keeper = shared.clone();
        let keep_alive = tokio::spawn(async move {
            loop {
                let ttl = match keeper.upgrade() {
                    Some(s) => match s.lock().leases.get_mut(&id) {
                        Some(lease) => {
                            lease.deadline = Instant::now() + lease.ttl;
                            lease.ttl
                        }
                        None => return,
                    },
                    None => return,
                };
                tokio::time::sleep(ttl / 3).await;
            }
        });
        // The expiry: outlives the handle, and deletes the lease once its deadline passes.
        tokio::spawn(async move {
            loop {
                let deadline = match shared.upgrade() {
                    Some(s) => match s.lock().leases.get(&id) {
                        Some(lease) => lease.deadline,
                        None => return,
                    },
                    None => return,
                };
                tokio::time::sleep_until(deadline).await;
                let Some(s) = shared.upgrade() else { return };
                let mut state = s.lock();
                if state
                    .leases
                    .get(&id)
                    .is_some_and(|l| l.deadline <= Instant::now())
                {
                    state.drop_lease(id);
                    return;
                }
            }
        });
        keep_alive
    }
}

struct MemoryWatch {
    watcher: Arc<Watcher>,
}

#[async_trait]
impl WatchStream for MemoryWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, MetaError> {
        loop {
            {
                let mut q = self.watcher.queue();
                if let Some(events) = q.revisions.pop_front() {
                    return Ok(Some(events));
                }
                if q.ended {
                    return Err(MetaError::WatchEnded(self.watcher.prefix.clone()));
                }
            }
            self.watcher.wake.notified().await;
        }
    }
}

#[async_trait]
impl MetaStore for MemoryMetaStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        Ok(self.shared.lock().data.get(key).map(|e| KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError> {
        let s = self.shared.lock();
        let items = s
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| KeyValue {
                key: k.clone(),
                value: e.value.clone(),
                mod_revision: e.mod_revision,
            })
            .collect();
        Ok((items, s.revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        self.shared.lock().put(key, value, lease)
    }

    async fn delete(&self, key: &str) -> Result<(), MetaError> {
        self.shared.lock().delete(vec![key.to_string()])
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError> {
        let mut s = self.shared.lock();
        let keys = s.keys_under(prefix);
        s.delete(keys)
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError> {
        let mut s = self.shared.lock();
        if s.data.get(key).map(|e| e.mod_revision) != expected {
            return Ok(false);
        }
        s.put(key, value, lease)?;
        Ok(true)
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Box<dyn WatchStream>, MetaError> {
        let mut s = self.shared.lock();
        let start = if start_revision <= 0 {
            s.revision + 1
        } else {
            start_revision
        };
        let watcher = Arc::new(Watcher {
            prefix: prefix.to_string(),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        if start <= s.compacted {
            watcher.end();
        } else {
            let first = s.history.partition_point(|(rev, _)| *rev < start);
            for (_, events) in s.history.range(first..) {
                watcher.offer(events);
            }
            s.watchers.push(Arc::downgrade(&watcher));
        }
        Ok(Box::new(MemoryWatch { watcher }))
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<LeaseHandle, MetaError> {
        // Clamped: a TTL from the network (the gateway) must not overflow the clock.
        let ttl = Duration::from_secs(ttl_s.clamp(1, LEASE_TTL_S_MAX) as u64);
        let (tx, lost) = watch::channel(false);
        let id = {
            let mut s = self.shared.lock();
            let id = s.next_lease;
            s.next_lease += 1;
            s.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    lost: tx,
                },
            );
            id
        };
        Ok(LeaseHandle::new(id, lost, self.lease_task(id)))
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError> {
        if self.shared.lock().drop_lease(id) {
            Ok(())
        } else {
            Err(MetaError::Failed {
                context: format!("revoke lease {id}"),
                detail: "lease not found".into(),
            })
        }
    }
}
