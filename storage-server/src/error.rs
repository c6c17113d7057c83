//! The storage server's error type: one enum, each variant saying what happened and what to do.

use std::path::PathBuf;

use rialto_backends::{MetaError, PubSubError};
use thiserror::Error;

/// Everything that can go wrong in the storage server library.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The read endpoint could not be bound.
    #[error("cannot listen on {addr}: {source}; pick a free address with --listen")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A local file or directory operation failed.
    #[error("{context} ({path}): {source}; check the data directory's permissions and free space")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("TLS setup failed: {0}; check --tls-cert and --tls-key (PEM files)")]
    Tls(String),
    /// RocksDB failed on a replica's database.
    #[error(
        "storage engine error on {path}: {detail}; the replica's data may need to be re-ingested"
    )]
    Storage { path: PathBuf, detail: String },
    /// A replica's checkpoint could not be read back.
    #[error("checkpoint of {path} is unreadable: {detail}; delete the replica directory to re-ingest it")]
    Checkpoint { path: PathBuf, detail: String },
    /// The metadata store (etcd) failed.
    #[error("metadata store: {0}")]
    Meta(#[from] MetaError),
    /// The pub-sub broker (Kafka) failed.
    #[error("pub-sub: {0}")]
    PubSub(#[from] PubSubError),
    /// A background task panicked or was cancelled.
    #[error("background task `{0}` failed: {1}")]
    Task(&'static str, String),
}

impl ServerError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> ServerError {
        ServerError::Io {
            context,
            path: path.into(),
            source,
        }
    }
}
