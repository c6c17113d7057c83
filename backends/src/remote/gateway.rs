//! The gateway: the memory backends of one process, served over HTTP to the others.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::wire::{MetaRequest, PubSubRequest, Reply, WireError, WireEvent, WireKeyValue};
use crate::memory::{MemoryMetaStore, MemoryPubSub};
use crate::meta::MetaStore;
use crate::pubsub::PubSub;

/// Largest request body: a record of the largest value a store takes, as JSON numbers.
const BODY_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Longest a watch or fetch may wait for something to return.
const WAIT_MAX: Duration = Duration::from_secs(30);
/// Most revisions one watch answer carries.
const WATCH_REVISIONS_MAX: usize = 1000;

#[derive(Clone)]
struct Backends {
    meta: MemoryMetaStore,
    broker: MemoryPubSub,
}

fn reply<T: Serialize, E: Into<WireError>>(result: Result<T, E>) -> Json<Reply<T>> {
    Json(match result {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Err(e.into()),
    })
}

/// Serves `meta` and `broker` on `listener` until `shutdown` turns true. Anyone who can reach
/// the listener may read and write everything: bind it to loopback.
pub async fn serve(
    listener: TcpListener,
    meta: MemoryMetaStore,
    broker: MemoryPubSub,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/meta", post(meta_op))
        .route("/pubsub", post(pubsub_op))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(Backends { meta, broker });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

async fn meta_op(
    State(b): State<Backends>,
    Json(request): Json<MetaRequest>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let m = &b.meta;
    match request {
        MetaRequest::Get { key } => {
            reply(m.get(&key).await.map(|kv| kv.map(WireKeyValue::from))).into_response()
        }
        MetaRequest::List { prefix } => reply(m.list(&prefix).await.map(|(items, rev)| {
            (
                items
                    .into_iter()
                    .map(WireKeyValue::from)
                    .collect::<Vec<_>>(),
                rev,
            )
        }))
        .into_response(),
        MetaRequest::Put { key, value, lease } => {
            reply(m.put(&key, value, lease).await).into_response()
        }
        MetaRequest::Delete { key } => reply(m.delete(&key).await).into_response(),
        MetaRequest::DeletePrefix { prefix } => {
            reply(m.delete_prefix(&prefix).await).into_response()
        }
        MetaRequest::CompareAndPut {
            key,
            expected,
            value,
            lease,
        } => reply(m.compare_and_put(&key, expected, value, lease).await).into_response(),
        MetaRequest::Watch {
            prefix,
            from,
            wait_ms,
        } => reply(watch_from(m, &prefix, from, wait_ms).await).into_response(),
        MetaRequest::GrantLease { ttl_s } => {
            // The handle's keep-alive stops here; the remote holder keeps the lease alive.
            reply(m.grant_lease(ttl_s).await.map(|handle| handle.id)).into_response()
        }
        MetaRequest::KeepAlive { id } => {
            reply(Ok::<_, WireError>(m.keep_alive(id))).into_response()
        }
        MetaRequest::RevokeLease { id } => reply(m.revoke_lease(id).await).into_response(),
    }
}

async fn watch_from(
    m: &MemoryMetaStore,
    prefix: &str,
    from: i64,
    wait_ms: u64,
) -> Result<Vec<Vec<WireEvent>>, crate::meta::MetaError> {
    let mut stream = m.watch(prefix, from.max(1)).await?;
    let wait = Duration::from_millis(wait_ms).min(WAIT_MAX);
    let mut out: Vec<Vec<crate::meta::WatchEvent>> = Vec::new();
    match tokio::time::timeout(wait, stream.next()).await {
        Err(_) => return Ok(Vec::new()),
        Ok(first) => out.extend(first?),
    }
    // Then whatever else is already there.
    while out.len() < WATCH_REVISIONS_MAX {
        match ready_now(stream.next()).await {
            Some(next) => out.extend(next?),
            None => break,
        }
    }
    Ok(out
        .into_iter()
        .map(|events| events.into_iter().map(WireEvent::from).collect())
        .collect())
}

/// Polls `future` once (tokio polls before it checks the deadline): its output if ready.
async fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    tokio::time::timeout(Duration::ZERO, future).await.ok()
}

async fn pubsub_op(
    State(b): State<Backends>,
    Json(request): Json<PubSubRequest>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let p = &b.broker;
    match request {
        PubSubRequest::Create {
            topic,
            partitions,
            retention_ms,
        } => reply(match retention_ms {
            Some(ms) => {
                p.create_retained_topic(&topic, partitions, Duration::from_millis(ms))
                    .await
            }
            None => p.create_topic(&topic, partitions).await,
        })
        .into_response(),
        PubSubRequest::Delete { topic } => reply(p.delete_topic(&topic).await).into_response(),
        PubSubRequest::PartitionCount { topic } => {
            reply(p.partition_count(&topic).await).into_response()
        }
        PubSubRequest::Watermarks { topic, partition } => {
            reply(p.watermarks(&topic, partition).await).into_response()
        }
        PubSubRequest::OffsetForTime {
            topic,
            partition,
            timestamp_ms,
        } => reply(p.offset_for_time(&topic, partition, timestamp_ms).await).into_response(),
        PubSubRequest::Send { records } => {
            let mut offsets: Vec<Result<i64, WireError>> = records
                .iter()
                .map(|r| {
                    p.append(&r.topic, r.partition, &r.key, &r.value)
                        .map_err(WireError::from)
                })
                .collect();
            // Acknowledged once on the disk, as a send's delivery is.
            let mut written: Vec<(&str, u32)> = records
                .iter()
                .zip(&offsets)
                .filter(|(_, o)| o.is_ok())
                .map(|(r, _)| (r.topic.as_str(), r.partition))
                .collect();
            written.sort_unstable();
            written.dedup();
            for (topic, partition) in written {
                if let Err(e) = p.sync(topic, partition).await {
                    let e = WireError::from(e);
                    for (r, offset) in records.iter().zip(offsets.iter_mut()) {
                        if offset.is_ok() && r.topic == topic && r.partition == partition {
                            *offset = Err(e.clone());
                        }
                    }
                }
            }
            reply(Ok::<_, WireError>(offsets)).into_response()
        }
        PubSubRequest::Fetch {
            topic,
            partition,
            offset,
            max,
            wait_ms,
        } => {
            let fetched = async {
                let mut consumer = p.consumer(&topic, partition, offset).await?;
                let wait = Duration::from_millis(wait_ms).min(WAIT_MAX);
                let records = consumer.poll(max.max(1), wait).await?;
                Ok::<_, crate::pubsub::PubSubError>(
                    records
                        .into_iter()
                        .map(super::wire::WireRecord::from)
                        .collect::<Vec<_>>(),
                )
            }
            .await;
            reply(fetched).into_response()
        }
    }
}
