//! Keeps the ONLINE replicas' byte counts true while they serve.
//!
//! A replica measures its bytes on disk and in memory when it goes ONLINE, right after warming.
//! Afterwards the kernel may evict an in-memory store's pages (another version's push, a
//! neighbour's memory), and then its reads of evicted keys go to disk. Every
//! [`ServerConfig::usage_refresh`](crate::ServerConfig::usage_refresh) this task measures each
//! ONLINE replica again ([`ReplicaStore::usage`](crate::store::ReplicaStore::usage): `mincore`
//! on its data files), re-reports the ones whose bytes moved by more than
//! [`REPORT_CHANGE`] (so the metrics, `rialto-admin` and the controller see them), and warns
//! once when an in-memory replica stops being resident.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rialto_protocol::meta::{ReplicaState, StorageProfile};
use tokio::sync::watch;

use crate::node::NodeContext;
use crate::replica::ReplicaId;

/// Default time between two measurements of the ONLINE replicas.
pub const DEFAULT_USAGE_REFRESH: Duration = Duration::from_secs(30);
/// A replica is re-reported when its memory or disk bytes moved by more than this fraction
/// (1/64, about 1.6 %) since its last report.
pub const REPORT_CHANGE: u64 = 64;

/// Measures the ONLINE replicas every `every` until the server stops.
pub(crate) async fn keep_fresh(
    ctx: Arc<NodeContext>,
    every: Duration,
    mut shutdown: watch::Receiver<crate::Stop>,
) {
    let mut resident = HashMap::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s != crate::Stop::Running) => return,
            _ = tokio::time::sleep(every) => {}
        }
        refresh(&ctx, &mut resident).await;
    }
}

/// One pass over the ONLINE replicas. `resident` remembers, per in-memory replica, whether its
/// data was resident at the last pass (to warn once per eviction, not at every pass).
pub(crate) async fn refresh(ctx: &NodeContext, resident: &mut HashMap<ReplicaId, bool>) {
    let slots = ctx.registry.all();
    resident.retain(|id, _| slots.iter().any(|s| &s.id == id));
    for slot in slots {
        let Some(store) = slot.online_store() else {
            continue;
        };
        let in_memory = store.profile() == StorageProfile::InMemory;
        let usage = match rialto_backends::blocking::spawn(move || store.usage()).await {
            Ok(Ok(usage)) => usage,
            Ok(Err(e)) => {
                tracing::warn!(replica = %slot.id, error = %e, "cannot measure the replica's bytes");
                continue;
            }
            Err(e) => {
                tracing::warn!(replica = %slot.id, error = %e, "measuring the replica's bytes panicked");
                continue;
            }
        };
        if in_memory {
            let now = usage.data_resident();
            let before = resident.insert(slot.id.clone(), now).unwrap_or(true);
            if before && !now {
                tracing::warn!(
                    replica = %slot.id,
                    data_bytes = usage.data_bytes,
                    resident_data_bytes = usage.resident_data_bytes,
                    "an in-memory replica is no longer all in memory: the kernel evicted part of its data, and reads of it go to disk; give the server more memory or fewer replicas"
                );
            } else if !before && now {
                tracing::info!(replica = %slot.id, data_bytes = usage.data_bytes, "an in-memory replica is all in memory again");
            }
        }
        let last = slot.record();
        if !moved(last.memory_bytes, usage.memory_bytes)
            && !moved(last.disk_bytes, usage.disk_bytes)
        {
            continue;
        }
        slot.update(&ctx.metrics, |r| {
            if r.state == ReplicaState::Online {
                r.memory_bytes = usage.memory_bytes;
                r.disk_bytes = usage.disk_bytes;
            }
        });
        ctx.report_online(&slot).await;
    }
}

/// Whether `now` differs from `before` by more than 1/[`REPORT_CHANGE`] of `before`.
fn moved(before: u64, now: u64) -> bool {
    before.abs_diff(now) > before / REPORT_CHANGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_changes_are_not_reported() {
        assert!(!moved(6400, 6400));
        assert!(!moved(6400, 6500));
        assert!(!moved(6400, 6300));
        assert!(moved(6400, 6501));
        assert!(moved(6400, 0));
        assert!(moved(0, 1));
    }
}
