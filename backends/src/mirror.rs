//! A live, local copy of every key under one metadata prefix.
//!
//! Controller, servers and clients all follow the same pattern: list a prefix, then watch it from
//! the listing's revision, and on any watch failure list again. [`PrefixMirror`] does that once,
//! correctly, and exposes the current map plus a change notification. Consumers reconcile against
//! the whole map, so a missed or duplicated event can never leave them wrong.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, RwLock};

use crate::meta::{MetaError, MetaStore, WatchEvent};

/// Pause before re-listing after a failed watch.
const RELIST_BACKOFF: Duration = Duration::from_millis(500);

/// A mirrored prefix: key → value.
pub type PrefixMap = BTreeMap<String, Vec<u8>>;

/// A live copy of one prefix, updated from a background watch.
pub struct PrefixMirror {
    map: Arc<RwLock<PrefixMap>>,
    generation: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PrefixMirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PrefixMirror {
    /// Lists `prefix` (failing if the store is unreachable) and starts following it.
    pub async fn start(
        meta: Arc<dyn MetaStore>,
        prefix: String,
    ) -> Result<PrefixMirror, MetaError> {
        let (items, revision) = meta.list(&prefix).await?;
        let map: PrefixMap = items.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let map = Arc::new(RwLock::new(map));
        let (gen_tx, generation) = watch::channel(1u64);
        let task = tokio::spawn(follow(meta, prefix, map.clone(), gen_tx, revision));
        Ok(PrefixMirror {
            map,
            generation,
            task,
        })
    }

    /// A copy of the current map.
    pub async fn snapshot(&self) -> PrefixMap {
        self.map.read().await.clone()
    }

    /// Runs `f` over the current map without copying it.
    pub async fn with<T>(&self, f: impl FnOnce(&PrefixMap) -> T) -> T {
        f(&*self.map.read().await)
    }

    /// A receiver that changes whenever the map changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.clone()
    }
}

async fn follow(
    meta: Arc<dyn MetaStore>,
    prefix: String,
    map: Arc<RwLock<PrefixMap>>,
    generation: watch::Sender<u64>,
    mut revision: i64,
) {
    let bump = |generation: &watch::Sender<u64>| generation.send_modify(|g| *g += 1);
    loop {
        match meta.watch(&prefix, revision + 1).await {
            Ok(mut stream) => loop {
                let events = match stream.next().await {
                    Ok(Some(events)) => events,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(%prefix, error = %e, "watch ended; re-listing");
                        break;
                    }
                };
                let mut m = map.write().await;
                for e in events {
                    match e {
                        WatchEvent::Put(kv) => {
                            revision = revision.max(kv.mod_revision);
                            m.insert(kv.key, kv.value);
                        }
                        WatchEvent::Delete { key, mod_revision } => {
                            revision = revision.max(mod_revision);
                            m.remove(&key);
                        }
                    }
                }
                drop(m);
                bump(&generation);
            },
            Err(e) => tracing::warn!(%prefix, error = %e, "watch failed; re-listing"),
        }
        // Re-list: the watch ended (compaction, disconnect). The listing replaces the map whole.
        loop {
            tokio::time::sleep(RELIST_BACKOFF).await;
            match meta.list(&prefix).await {
                Ok((items, rev)) => {
                    *map.write().await = items.into_iter().map(|kv| (kv.key, kv.value)).collect();
                    revision = rev;
                    bump(&generation);
                    break;
                }
                Err(e) => tracing::warn!(%prefix, error = %e, "re-list failed"),
            }
        }
    }
}
