//! Leader election through etcd: the leader holds `{root}/controller/leader` under its lease.
//!
//! A candidate grants a lease and tries `compare_and_put(leader, None, id, lease)`; standbys retry
//! every [`ELECTION_RETRY`]. Leadership ends when the lease is lost, when the key stops naming this
//! controller, or on shutdown (the lease is then revoked so a standby takes over at once). Only the
//! leader runs the [`Reconciler`]; it is stopped before leadership is given up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rialto_backends::{LeaseHandle, MetaStore, PubSub};
use rialto_protocol::meta::{Layout, LeadershipRecord};
use tokio::sync::watch;

use crate::rebalance::RebalanceConfig;
use crate::reconcile::Reconciler;

/// Pause between attempts to become leader (and after a failed lease grant).
pub const ELECTION_RETRY: Duration = Duration::from_millis(500);
/// How often the leader checks that the leader key still names it.
pub const LEADER_CHECK: Duration = Duration::from_secs(2);

/// Runs the election (and, while leader, the reconciler) until `shutdown` becomes true.
pub(crate) async fn run(
    config: crate::ControllerConfig,
    meta: Arc<dyn MetaStore>,
    pubsub: Arc<dyn PubSub>,
    leader: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let id = config.controller_id.clone();
    let layout = Layout::new(&config.meta_root);
    let lease_ttl_s = config.lease_ttl_s;
    let key = layout.leader();
    while !stopping(&shutdown) {
        let lease = match meta.grant_lease(lease_ttl_s).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot grant a controller lease; retrying");
                wait(&mut shutdown, ELECTION_RETRY).await;
                continue;
            }
        };
        // Campaign with this lease until won, lost or shut down.
        loop {
            if stopping(&shutdown) || lease_lost(&lease) {
                break;
            }
            match meta
                .compare_and_put(
                    &key,
                    None,
                    LeadershipRecord::new(&id, rialto_backends::clock::now_ms()).encode(),
                    Some(lease.id),
                )
                .await
            {
                Ok(true) => {
                    lead(
                        &id,
                        &layout,
                        &key,
                        &meta,
                        &pubsub,
                        &leader,
                        &lease,
                        &mut shutdown,
                        config.rebalance,
                        config.push_timeout,
                        config.topic_deletion,
                    )
                    .await;
                    break;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            wait(&mut shutdown, ELECTION_RETRY).await;
        }
        // Whatever ended the term, give the lease back so a standby need not wait for its TTL.
        if let Err(e) = meta.revoke_lease(lease.id).await {
            tracing::debug!(error = %e, "could not revoke the controller lease; it expires on its own");
        }
    }
}

/// Shutdown requested, or the [`crate::RunningController`] was dropped without a shutdown.
fn stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

fn lease_lost(lease: &LeaseHandle) -> bool {
    *lease.lost.borrow() || lease.lost.has_changed().is_err()
}

async fn wait(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    if stopping(shutdown) {
        return;
    }
    tokio::select! {
        biased;
        _ = shutdown.changed() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// One leadership term: reconcile until the lease is lost, the key is taken or shutdown.
#[allow(clippy::too_many_arguments)]
async fn lead(
    id: &str,
    layout: &Layout,
    key: &str,
    meta: &Arc<dyn MetaStore>,
    pubsub: &Arc<dyn PubSub>,
    leader: &AtomicBool,
    lease: &LeaseHandle,
    shutdown: &mut watch::Receiver<bool>,
    rebalance: RebalanceConfig,
    push_timeout: std::time::Duration,
    topic_deletion: crate::TopicDeletion,
) {
    tracing::info!(controller = id, "became leader");
    leader.store(true, Ordering::SeqCst);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut reconciler = Reconciler::new(layout.clone(), meta.clone(), pubsub.clone(), rebalance)
        .with_push_timeout(push_timeout)
        .with_topic_deletion(topic_deletion);
    let reconcile = async move {
        // The mirrors need etcd; retry their start while leading.
        loop {
            match reconciler.run(stop_rx.clone()).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "reconciler could not start; retrying"),
            }
            if *stop_rx.borrow() {
                return;
            }
            tokio::time::sleep(ELECTION_RETRY).await;
        }
    };
    let mut lost = lease.lost.clone();
    let watchdog = async {
        loop {
            tokio::select! {
                biased;
                r = lost.changed() => {
                    if r.is_err() || *lost.borrow() {
                        tracing::warn!(controller = id, "controller lease lost; stepping down");
                        return;
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() { return; }
                }
                _ = tokio::time::sleep(LEADER_CHECK) => {
                    match meta.get(key).await {
                        Ok(Some(kv)) if LeadershipRecord::is_held_by(&kv.value, id) => {}
                        Ok(_) => {
                            tracing::warn!(controller = id, "leader key no longer names this controller; stepping down");
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot check leadership"),
                    }
                }
            }
        }
    };
    tokio::pin!(reconcile);
    tokio::select! {
        biased;
        _ = &mut reconcile => {}
        _ = watchdog => {
            let _ = stop_tx.send(true);
            // Let the reconciler finish its current action.
            reconcile.await;
        }
    }
    leader.store(false, Ordering::SeqCst);
    tracing::info!(controller = id, "no longer leader");
}
