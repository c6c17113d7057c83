//! Registration of this server in the metadata store, under a lease, and replica reporting.
//!
//! The node record and every replica record are written under the server's lease, so a dead
//! server's replicas vanish from etcd. If the lease is lost (etcd partition, long pause), a new
//! lease is granted and the node record and every replica record are written again.
//!
//! Reports and lease renewal share one lock holding the current lease id: a report always writes
//! the slot's *latest* record under the *current* lease, and a renewal re-writes every slot's
//! latest record, so no interleaving leaves a stale record in etcd.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rialto_backends::{LeaseHandle, MetaError, MetaStore, PubSub};
use rialto_protocol::meta::{encode_record, Layout, NodeRecord, ReplicaRecord, ReplicaState};
use tokio::sync::{watch, Mutex};

use crate::metrics::ServerMetrics;
use crate::replica::{ReplicaRegistry, ReplicaSlot};

/// Pause between attempts to grant a new lease after losing one.
const LEASE_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// Everything the server's tasks share.
pub(crate) struct NodeContext {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub layout: Layout,
    pub meta: Arc<dyn MetaStore>,
    pub pubsub: Arc<dyn PubSub>,
    pub metrics: Arc<ServerMetrics>,
    /// RocksDB resources shared by the replicas (block cache).
    pub engine: crate::store::Engine,
    pub registry: ReplicaRegistry,
    pub node_record: NodeRecord,
    pub lease_ttl_s: i64,
    /// The current lease id; held while writing anything under it.
    pub lease_id: Mutex<i64>,
    /// When a sorted push's chunk is written as an SST file.
    pub sorted_chunk: crate::store::ChunkLimits,
    /// Lock in-memory stores' data in memory when they go ONLINE
    /// ([`ServerConfig::lock_in_memory_stores`](crate::ServerConfig::lock_in_memory_stores)).
    pub lock_in_memory_stores: bool,
    /// Fetch wait of real-time consumers
    /// ([`ServerConfig::realtime_fetch_wait`](crate::ServerConfig::realtime_fetch_wait)).
    pub realtime_fetch_wait: std::time::Duration,
    /// Partition leaders copy only real-time records signed by a writer registered with the
    /// controller (on with authorization, [`ServerConfig::authorize`](crate::ServerConfig::authorize)).
    pub verify_signatures: bool,
    /// A replica report failed (the metadata store was unreachable): every replica record is
    /// written again on the next retry tick, since a replica that stays in its state would
    /// never report again, and a blip shorter than the lease TTL does not re-register.
    pub reports_pending: std::sync::atomic::AtomicBool,
}

impl NodeContext {
    /// Writes the slot's latest record under the current lease. A failure is logged and every
    /// record is written again on the next retry tick (`retry_reports`) or re-registration.
    pub async fn report(&self, slot: &ReplicaSlot) {
        let lease = self.lease_id.lock().await;
        if let Err(e) = self.put_replica(slot, *lease).await {
            self.reports_pending.store(true, Ordering::SeqCst);
            tracing::warn!(replica = %slot.id, error = %e, "cannot report replica state; retrying");
        }
    }

    /// Like [`NodeContext::report`], but only while the replica is ONLINE: a replica dropped
    /// meanwhile (its record deleted under the same lock) is not written back.
    pub async fn report_online(&self, slot: &ReplicaSlot) {
        let lease = self.lease_id.lock().await;
        if slot.state() != ReplicaState::Online {
            return;
        }
        if let Err(e) = self.put_replica(slot, *lease).await {
            self.reports_pending.store(true, Ordering::SeqCst);
            tracing::warn!(replica = %slot.id, error = %e, "cannot report replica bytes; retrying");
        }
    }

    async fn put_replica(&self, slot: &ReplicaSlot, lease: i64) -> Result<(), MetaError> {
        let record: ReplicaRecord = slot.record();
        let key = self.layout.replica(
            &slot.id.store,
            slot.id.version,
            slot.id.partition,
            &self.node_id,
        );
        let value = encode_record(&record).map_err(|e| MetaError::Failed {
            context: format!("encode replica record {key}"),
            detail: e.to_string(),
        })?;
        self.meta.put(&key, value, Some(lease)).await
    }

    /// Deletes the replica's record.
    pub async fn delete_report(&self, slot: &ReplicaSlot) {
        let _lease = self.lease_id.lock().await;
        let key = self.layout.replica(
            &slot.id.store,
            slot.id.version,
            slot.id.partition,
            &self.node_id,
        );
        if let Err(e) = self.meta.delete(&key).await {
            tracing::warn!(replica = %slot.id, error = %e, "cannot delete replica record; it expires with the lease");
        }
    }

    async fn put_node(&self, lease: i64) -> Result<(), MetaError> {
        let key = self.layout.node(&self.node_id);
        let value = encode_record(&self.node_record).map_err(|e| MetaError::Failed {
            context: format!("encode node record {key}"),
            detail: e.to_string(),
        })?;
        self.meta.put(&key, value, Some(lease)).await
    }

    /// Writes every replica record again after a failed report (see `reports_pending`).
    async fn retry_reports(&self) {
        if !self.reports_pending.swap(false, Ordering::SeqCst) {
            return;
        }
        let lease = self.lease_id.lock().await;
        for slot in self.registry.all() {
            if let Err(e) = self.put_replica(&slot, *lease).await {
                self.reports_pending.store(true, Ordering::SeqCst);
                tracing::debug!(replica = %slot.id, error = %e, "replica report still failing");
                return;
            }
        }
        tracing::info!(node = %self.node_id, "replica reports written again after a metadata outage");
    }

    /// Grants the first lease and registers the node under it.
    pub async fn register(&self) -> Result<LeaseHandle, MetaError> {
        let lease = self.meta.grant_lease(self.lease_ttl_s).await?;
        let mut id = self.lease_id.lock().await;
        *id = lease.id;
        self.put_node(lease.id).await?;
        tracing::info!(node = %self.node_id, lease = lease.id, address = %self.node_record.address, "registered");
        Ok(lease)
    }

    /// Grants a new lease and re-writes the node record and every replica record under it.
    async fn reregister(&self) -> Result<LeaseHandle, MetaError> {
        let lease = self.meta.grant_lease(self.lease_ttl_s).await?;
        let mut id = self.lease_id.lock().await;
        *id = lease.id;
        self.put_node(lease.id).await?;
        for slot in self.registry.all() {
            self.put_replica(&slot, lease.id).await?;
        }
        tracing::info!(node = %self.node_id, lease = lease.id, "re-registered under a new lease");
        Ok(lease)
    }
}

/// Watches the lease and re-registers when it is lost; returns the current lease on shutdown.
pub(crate) async fn keep_registered(
    ctx: Arc<NodeContext>,
    mut lease: LeaseHandle,
    mut shutdown: watch::Receiver<crate::Stop>,
) -> LeaseHandle {
    loop {
        let mut lost = lease.lost.clone();
        let lease_lost = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s != crate::Stop::Running) => return lease,
            _ = lost.wait_for(|l| *l) => true,
            _ = tokio::time::sleep(LEASE_RETRY_BACKOFF) => false,
        };
        if !lease_lost {
            ctx.retry_reports().await;
            continue;
        }
        tracing::warn!(node = %ctx.node_id, lease = lease.id, "lease lost; registering again");
        loop {
            match ctx.reregister().await {
                Ok(new) => {
                    lease = new;
                    break;
                }
                Err(e) => {
                    tracing::warn!(node = %ctx.node_id, error = %e, "cannot re-register; retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|s| *s != crate::Stop::Running) => return lease,
                        _ = tokio::time::sleep(LEASE_RETRY_BACKOFF) => {}
                    }
                }
            }
        }
    }
}
