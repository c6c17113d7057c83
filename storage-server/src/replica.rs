//! The replicas this server hosts: identity, current state, and the open database of each.
//!
//! [`ReplicaRegistry`] is what the read path consults: store → version → partition → slot. A
//! slot serves only while its state is ONLINE (**Invariant:** a replica never serves before it
//! consumed END_OF_PUSH; the ingestion task sets ONLINE only after that).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rialto_backends::clock::now_ms;
use rialto_protocol::meta::{
    Compression, HybridConfig, ReplicaRecord, ReplicaState, StorageProfile,
};
use rialto_protocol::ErrorCode;

use crate::metrics::ServerMetrics;
use crate::store::ReplicaStore;

/// What a hosted replica is built from, out of its version record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaPlan {
    /// The version topic.
    pub topic: String,
    /// The version's storage profile.
    pub storage: StorageProfile,
    /// The version's value compression (START_OF_PUSH must announce the same codec).
    pub compression: Compression,
    /// Of a hybrid version: it follows real-time writes after END_OF_PUSH.
    pub hybrid: Option<HybridConfig>,
    /// The push's producer GUID (hex) when the version names one: the push's records from
    /// any other producer put the replica in ERROR.
    pub producer: Option<String>,
}

/// One replica: a partition of a store version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId {
    pub store: String,
    pub version: u32,
    pub partition: u32,
}

impl ReplicaId {
    /// `<data_dir>/<store>/v<N>/p<P>`.
    pub fn data_path(&self, data_dir: &Path) -> PathBuf {
        data_dir
            .join(&self.store)
            .join(format!("v{}", self.version))
            .join(format!("p{}", self.partition))
    }
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/v{}/p{}", self.store, self.version, self.partition)
    }
}

/// A hosted replica: its last reported record and, once opened, its database.
#[derive(Debug)]
pub struct ReplicaSlot {
    /// Which replica this is.
    pub id: ReplicaId,
    record: Mutex<ReplicaRecord>,
    store: Mutex<Option<Arc<ReplicaStore>>>,
}

impl ReplicaSlot {
    /// A new slot in state OFFLINE (counted in `metrics`).
    pub(crate) fn new(id: ReplicaId, metrics: &ServerMetrics) -> ReplicaSlot {
        metrics.replica_transition(None, Some(ReplicaState::Offline));
        ReplicaSlot {
            id,
            record: Mutex::new(ReplicaRecord {
                state: ReplicaState::Offline,
                offset: 0,
                records: 0,
                consumed_from: 0,
                updated_ms: now_ms(),
                error: None,
                disk_bytes: 0,
                memory_bytes: 0,
                lag: None,
                leader: false,
                following: false,
            }),
            store: Mutex::new(None),
        }
    }

    /// The replica's current record.
    pub fn record(&self) -> ReplicaRecord {
        lock(&self.record).clone()
    }

    /// The replica's current state.
    pub fn state(&self) -> ReplicaState {
        lock(&self.record).state
    }

    /// Updates the record (keeping the state metrics right) and returns the new record.
    pub(crate) fn update(
        &self,
        metrics: &ServerMetrics,
        f: impl FnOnce(&mut ReplicaRecord),
    ) -> ReplicaRecord {
        let mut r = lock(&self.record);
        let before = r.state;
        f(&mut r);
        r.updated_ms = now_ms();
        if r.state != before {
            metrics.replica_transition(Some(before), Some(r.state));
        }
        r.clone()
    }

    /// Forgets the slot's state in the metrics (the replica is gone).
    pub(crate) fn retire(&self, metrics: &ServerMetrics) {
        metrics.replica_transition(Some(self.state()), None);
    }

    pub(crate) fn set_store(&self, store: Arc<ReplicaStore>) {
        *lock(&self.store) = Some(store);
    }

    pub(crate) fn take_store(&self) -> Option<Arc<ReplicaStore>> {
        lock(&self.store).take()
    }

    /// The database, whatever the replica's state (once opened).
    pub(crate) fn store(&self) -> Option<Arc<ReplicaStore>> {
        lock(&self.store).clone()
    }

    /// The database, if the replica is ONLINE.
    pub fn online_store(&self) -> Option<Arc<ReplicaStore>> {
        if self.state() != ReplicaState::Online {
            return None;
        }
        lock(&self.store).clone()
    }
}

/// Locks a mutex, recovering from poisoning (a panicked holder left consistent plain data).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A version's replicas here, by partition.
pub type VersionMap = BTreeMap<u32, Arc<ReplicaSlot>>;

/// Every replica hosted here, for the read path.
#[derive(Debug, Default)]
pub struct ReplicaRegistry {
    map: RwLock<BTreeMap<String, BTreeMap<u32, VersionMap>>>,
}

impl ReplicaRegistry {
    /// Adds (or replaces) a slot.
    pub(crate) fn insert(&self, slot: Arc<ReplicaSlot>) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.entry(slot.id.store.clone())
            .or_default()
            .entry(slot.id.version)
            .or_default()
            .insert(slot.id.partition, slot);
    }

    /// Removes a slot, pruning empty versions and stores.
    pub(crate) fn remove(&self, id: &ReplicaId) -> Option<Arc<ReplicaSlot>> {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        let versions = m.get_mut(&id.store)?;
        let partitions = versions.get_mut(&id.version)?;
        let slot = partitions.remove(&id.partition);
        if partitions.is_empty() {
            versions.remove(&id.version);
        }
        if versions.is_empty() {
            m.remove(&id.store);
        }
        slot
    }

    /// Every slot.
    pub fn all(&self) -> Vec<Arc<ReplicaSlot>> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.values()
            .flat_map(|v| v.values())
            .flat_map(|p| p.values().cloned())
            .collect()
    }

    /// The partitions of a store version hosted here, or the error code for a read of it.
    pub fn version(&self, store: &str, version: u32) -> Result<VersionMap, ErrorCode> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        let versions = m.get(store).ok_or(ErrorCode::UnknownStore)?;
        versions
            .get(&version)
            .cloned()
            .ok_or(ErrorCode::UnknownVersion)
    }

    /// The database of an ONLINE replica, or the error code for a read of it.
    pub fn online(
        &self,
        store: &str,
        version: u32,
        partition: u32,
    ) -> Result<Arc<ReplicaStore>, ErrorCode> {
        let slot = {
            let m = self.map.read().unwrap_or_else(|p| p.into_inner());
            let versions = m.get(store).ok_or(ErrorCode::UnknownStore)?;
            let partitions = versions.get(&version).ok_or(ErrorCode::UnknownVersion)?;
            partitions
                .get(&partition)
                .cloned()
                .ok_or(ErrorCode::PartitionNotServed)?
        };
        slot.online_store().ok_or(ErrorCode::PartitionNotServed)
    }
}
