//! Rialto's fat client: the library applications link to read a store.
//!
//! [`Client::connect`] follows the store's metadata in etcd (store record, versions, replicas,
//! nodes) through [`PrefixMirror`](rialto_backends::PrefixMirror)s and keeps a
//! [routing table](routing::RoutingTable) of the ONLINE replicas of the current version. Reads go
//! straight to the storage servers over HTTP/2 (TLS or, for local use, plaintext h2c): a key is
//! encoded with the store's Avro key schema, partitioned with the shared partitioner, and sent to
//! the least-loaded replica of its partition (a batch-get: the servers of one group); a retryable
//! failure is retried on another replica at once, and a request slower than its long-tail
//! threshold is hedged to another replica ([`hedge`]). Unhealthy servers are blocked and probed
//! ([`instances`]). [`Client::batch_get_stream_raw`] streams records as servers send them
//! ([`stream`]).
//!
//! ```no_run
//! # async fn example() -> Result<(), rialto_fast_client::ClientError> {
//! use rialto_fast_client::Client;
//! use rialto_protocol::avro::Value;
//! let client = Client::builder("ads")
//!     .etcd(["http://127.0.0.1:2379"])
//!     .connect()
//!     .await?;
//! // In the application's own types, through serde (see `ClientBuilder` and `get_as`)...
//! let score: Option<f64> = client.get_as(&"member-42").await?;
//! // ...or as Avro values, for dynamic use.
//! let value = client.get(&Value::String("member-42".into())).await?;
//! # let _ = (score, value);
//! # Ok(()) }
//! ```
//!
//! Modules: `typed` ([`Client::builder`], reads through serde), [`routing`] (the pure routing-table builder), `metadata` (following etcd),
//! `pool` (HTTP/2 connections), `response` (incremental batch-get decoding), `client` (single get
//! and the entry points), `coalesce` (concurrent single gets sent as one batch-get),
//! [`stream`] (the batch-get engine), [`hedge`] (long-tail retry),
//! [`instances`] (load and health), [`error`] and `stats`.

mod call;
mod client;
mod coalesce;
mod codecs;
mod compute;
pub mod error;
pub mod hedge;
pub mod instances;
mod metadata;
mod pool;
mod response;
pub mod routing;
mod shared;
mod stats;
pub mod stream;
mod typed;
mod values;

use std::time::Duration;

/// Avro for the application's own types: `#[derive(apache_avro::AvroSchema)]` gives a type the
/// schema [`ClientBuilder::connect_typed`] checks.
pub use apache_avro;
pub use client::Client;
pub use compute::{Compute, ComputeEvent, ComputeRecord};
pub use error::ClientError;
pub use hedge::LongTailRetry;
pub use instances::HealthConfig;
pub use pool::{CONNECTION_WINDOW_BYTES, CONNECT_TIMEOUT, FRAME_BYTES_MAX, STREAM_WINDOW_BYTES};
pub use response::RawValue;
/// The metadata store a client follows: etcd in production.
#[cfg(feature = "etcd")]
pub use rialto_backends::etcd::EtcdMetaStore;
pub use rialto_backends::MetaStore;
pub use routing::{Replica, RoutingTable};
pub use stats::ClientStats;
pub use stream::{
    BatchEvent, BatchStream, Completeness, KeyFailure, RawBatchStream, Refusal, ValueEvent,
};
pub use typed::{ClientBuilder, KeyOf, TypedBatchStream, TypedClient, TypedEvent};

/// Most keys one `batch_get` call accepts (the servers' default limit per request).
pub const BATCH_GET_KEYS_MAX: usize = rialto_protocol::wire::BATCH_GET_KEYS_MAX;
/// Default [`ClientConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Default of [`ClientConfig::sub_request_keys_max`].
pub const SUB_REQUEST_KEYS_MAX: usize = 2_500;

/// Default of [`ClientConfig::receive_pool_bytes`].
pub const RECEIVE_POOL_BYTES: usize = 64 * 1024 * 1024;

/// TLS settings for talking to storage servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM of the CA certificate(s) that signed the servers' certificates.
    pub ca_cert_pem: Vec<u8>,
    /// The name to verify in server certificates; `None` uses the host of each server's address.
    pub server_name: Option<String>,
    /// This client's certificate chain and private key (PEM), presented to servers that require
    /// mutual TLS; the servers name the caller by it (its principal) when they check ACLs.
    pub identity: Option<ClientIdentity>,
}

/// A client certificate and its key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// How to reach a store.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// The store to read.
    pub store: String,
    /// The cluster's root prefix in etcd (default [`DEFAULT_ROOT`](rialto_protocol::meta::DEFAULT_ROOT)).
    pub meta_root: String,
    /// TLS settings; `None` talks plaintext HTTP/2 (h2c), for local use only.
    pub tls: Option<ClientTls>,
    /// Deadline of one `get` or `batch_get` call, retries included (default 5 s).
    pub request_timeout: Duration,
    /// How long `connect` waits for the store to have a current version (default 0: don't wait).
    pub routing_wait: Duration,
    /// Group-based routing (default true): each batch-get is served from the servers of one
    /// group (logical zone), so its fanout does not grow with the replication factor.
    pub group_routing: bool,
    /// Most keys in one batch-get sub-request (default [`SUB_REQUEST_KEYS_MAX`]). A server's share
    /// of a batch-get goes out as this many concurrent sub-requests of equal size, which the
    /// server reads on its worker threads in parallel (it reads one request's keys in order) and
    /// the client hedges one by one. `usize::MAX` sends one request per server.
    pub sub_request_keys_max: usize,
    /// Most bytes of receive memory kept for reuse when no value references it any more (default
    /// [`RECEIVE_POOL_BYTES`]; 0 keeps none). Batch-get values are slices of the blocks a
    /// response arrived in, so that memory is reused only once the values are dropped; reusing
    /// it spares the page faults of fresh memory (a quarter of the client's CPU on 5,000-key
    /// batch-gets with glibc's allocator). A value kept for long keeps its whole block (up to
    /// 1 MiB) alive: copy values you keep.
    pub receive_pool_bytes: usize,
    /// Smart long-tail retry settings.
    pub long_tail: LongTailRetry,
    /// How servers are judged unhealthy, blocked and probed.
    pub health: HealthConfig,
    /// Verify every value's checksum (default true). A value that fails it is retried on
    /// another replica and never returned; turning this off only saves the hashing (about
    /// 0.1 µs per KB, see benches/README.md).
    pub verify_checksums: bool,
    /// Coalesce concurrent single gets (default true): a `get` that starts while other gets of
    /// this client are in flight waits for the tasks ready with it to start theirs, and they go
    /// out together as one batch-get (one request per server of one group) instead of one
    /// request each; a get with none in flight is sent at once, alone. Fewer requests cost the
    /// servers and the client less CPU per get under concurrent load (benches/README.md, "Single
    /// gets coalesced"). A key the shared batch-get could not answer is read again alone.
    pub coalesce_gets: bool,
    /// The value schema values are returned in (default: the latest registered). Each value is
    /// decoded with the schema it was written with and resolved to this one: fields it lacks
    /// take their defaults, fields this schema lacks are dropped.
    pub reader_schema: ReaderSchema,
    /// The network servers are reached on (default the operating system's; a simulation gives
    /// its simulated one).
    pub network: rialto_backends::Network,
}

/// Which schema a client returns values in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReaderSchema {
    /// The store's newest value schema, followed as schemas are added.
    #[default]
    Latest,
    /// A registered value schema, by id.
    Id(u32),
    /// The application's own schema (Avro JSON text), e.g. the one it was built with. It must
    /// read every registered value schema; `connect` fails if it does not.
    Schema(String),
}

impl ClientConfig {
    /// Defaults for reading `store`: default root, plaintext, 5 s timeout, no routing wait.
    pub fn new(store: impl Into<String>) -> ClientConfig {
        ClientConfig {
            store: store.into(),
            meta_root: rialto_protocol::meta::DEFAULT_ROOT.to_string(),
            tls: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            routing_wait: Duration::ZERO,
            group_routing: true,
            sub_request_keys_max: SUB_REQUEST_KEYS_MAX,
            receive_pool_bytes: RECEIVE_POOL_BYTES,
            long_tail: LongTailRetry::default(),
            health: HealthConfig::default(),
            verify_checksums: true,
            coalesce_gets: true,
            reader_schema: ReaderSchema::Latest,
            network: rialto_backends::Network::Os,
        }
    }
}
