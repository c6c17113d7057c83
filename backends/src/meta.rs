//! The metadata-store trait: what Rialto needs from etcd.

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::watch;

/// A metadata-store failure.
#[derive(Debug, Error)]
pub enum MetaError {
    #[error("metadata store unreachable ({context}): {detail}")]
    Unavailable { context: String, detail: String },
    #[error("metadata store operation failed ({context}): {detail}")]
    Failed { context: String, detail: String },
    #[error("watch on `{0}` ended; re-list and watch again")]
    WatchEnded(String),
}

/// One key with its value and the revision that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A change seen by a prefix watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

/// A stream of watch events; `next` returns `None` when the watch ended.
#[async_trait]
pub trait WatchStream: Send {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, MetaError>;
}

/// A lease kept alive in the background. Dropping the handle stops the keep-alive; the lease then
/// expires after its TTL and every key attached to it disappears.
pub struct LeaseHandle {
    pub id: i64,
    /// Becomes `true` once the lease is known lost (keep-alive refused or expired).
    pub lost: watch::Receiver<bool>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl LeaseHandle {
    /// Builds a handle around a keep-alive task, for [`MetaStore`] implementations outside this
    /// crate (test fakes, embedded stores). Dropping the handle aborts `task`.
    pub fn new(
        id: i64,
        lost: watch::Receiver<bool>,
        task: tokio::task::JoinHandle<()>,
    ) -> LeaseHandle {
        LeaseHandle { id, lost, task }
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Key-value metadata with revisions, prefix watches and leases.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError>;
    /// Every key under `prefix`, and the store revision the listing reflects.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError>;
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError>;
    async fn delete(&self, key: &str) -> Result<(), MetaError>;
    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError>;
    /// Writes `value` only if the key's mod revision equals `expected` (`None`: key absent).
    /// Returns whether the write happened.
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError>;
    /// Watches every change under `prefix` from `start_revision` on.
    async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Box<dyn WatchStream>, MetaError>;
    /// Grants a lease of `ttl_s` seconds and keeps it alive until the handle is dropped.
    async fn grant_lease(&self, ttl_s: i64) -> Result<LeaseHandle, MetaError>;
    /// Revokes a lease now, deleting its keys.
    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError>;
}
