//! The Rialto storage server as a library: [`start`] a server in-process, read its
//! [`ServerMetrics`], slow it down with [`RunningServer::faults`], [`RunningServer::shutdown`]
//! it or [`RunningServer::kill`] it as a crash would. `main.rs` is a thin CLI over this.
//!
//! * `node`: registration under an etcd lease, replica reports, re-registration.
//! * `assignments`: follows the versions prefix, starts and drops replicas.
//! * [`replica`]: a hosted replica's identity, plan, slot and record; the registry reads use.
//! * [`ingest`]: one task per replica, version topic → validated writes (write batches for an
//!   unsorted push, SST chunks for a sorted one: `ingest/writes.rs`; what records may be:
//!   `ingest/validate.rs`).
//! * [`hybrid`]: a hybrid replica's partition leadership, replay and real-time copy, and lag.
//! * [`validator`]: producer-metadata rules and the checkpoint that carries their state.
//! * [`store`]: one RocksDB instance per replica ([`ReplicaStore`]).
//! * [`authz`], [`limits`]: who may read a store; load shedding and read quotas.
//! * `compute`: read compute on stored values.
//! * [`residency`]: how much of a file is in the page cache (`mincore`).
//! * [`usage`]: re-measures the ONLINE replicas' bytes while they serve.
//! * `http`: the HTTP/2 read endpoint (get, streamed batch-get, health, metrics).
//! * [`faults`]: delays and errors injected into reads, for tests and benchmarks (off by default).
//! * [`testing`]: a push-record builder and waits on replica states, for tests that drive a
//!   server over the memory backends (`rialto_backends::memory`).
//!
//! **Invariant:** a replica never serves before it consumed END_OF_PUSH.
//! **Invariant:** a replica's checkpoint never covers data that is not written: the memtable
//! path writes both in one write batch, the sorted path ingests its SST file before writing the
//! checkpoint that covers it.
//! **Invariant:** the server never panics on input from the network or from a topic.

mod assignments;
pub mod authz;
mod compute;
mod error;
pub mod faults;
mod http;
pub mod hybrid;
pub mod ingest;
pub mod limits;
pub mod metrics;
mod node;
pub mod replica;
pub mod residency;
pub mod store;
pub mod testing;
pub mod usage;
pub mod validator;
mod wakes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rialto_backends::clock::now_ms;
use rialto_backends::{MetaStore, Network, PrefixMirror, PubSub};
use rialto_protocol::meta::{Layout, NodeRecord, DEFAULT_ROOT};
use rialto_protocol::wire::BATCH_GET_KEYS_MAX;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use error::ServerError;
pub use faults::{FaultConfig, Faults};
pub use http::ConnectionLimits;
pub use metrics::{RouteKind, ServerMetrics};
pub use store::{Engine, ReplicaStore, DEFAULT_BLOCK_CACHE_BYTES};

/// Default lease TTL of a server's registration.
pub const DEFAULT_LEASE_TTL_S: i64 = 10;
/// Default host advertised in the node record.
pub const DEFAULT_ADVERTISE_HOST: &str = "127.0.0.1";

/// PEM files of the read endpoint's TLS identity and, for mutual TLS, the client CA.
pub use rialto_security::tls::ServerTlsFiles as TlsFiles;

/// Configuration of one storage server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Stable identity of the node across restarts.
    pub node_id: String,
    /// Availability zone; replicas of a partition are spread across zones.
    pub zone: String,
    /// Address to bind; port 0 picks a free port, which is then advertised.
    pub listen: SocketAddr,
    /// Host put in the node record's address.
    pub advertise_host: String,
    /// Root of the replica databases.
    pub data_dir: PathBuf,
    /// Root prefix of the cluster in etcd.
    pub meta_root: String,
    /// TTL of the registration lease.
    pub lease_ttl_s: i64,
    /// TLS identity; `None` serves plaintext HTTP/2 (h2c), for local use only. With a client
    /// CA every client must present a certificate it signed (mutual TLS).
    pub tls: Option<TlsFiles>,
    /// Check every read against the ACLs in etcd (`read` on the store); needs mutual TLS, so
    /// that callers have principals. Off: anyone who can connect may read. On, partition
    /// leaders also copy only real-time records signed by a writer registered with the
    /// controller (`rialto_security::signing`).
    pub authorize: bool,
    /// Most keys accepted in one batch-get.
    pub batch_get_keys_max: usize,
    /// Size of the block cache shared by the on-disk stores' replicas.
    pub block_cache_bytes: usize,
    /// Faults injected into reads at start (tests and benchmarks; default none). They can be
    /// changed while the server runs through [`RunningServer::faults`].
    pub faults: FaultConfig,
    /// How often the ONLINE replicas' bytes on disk and in memory are measured again (an
    /// in-memory store's pages may be evicted after warming); see [`usage`].
    pub usage_refresh: std::time::Duration,
    /// Lock in-memory stores' data files in memory (`mlock`) when their replicas go ONLINE, so
    /// the kernel cannot evict them under memory pressure. Off by default: the process must be
    /// allowed to lock that much (`RLIMIT_MEMLOCK`, e.g. systemd's `LimitMEMLOCK=infinity`, or
    /// `CAP_IPC_LOCK`), and the machine must hold every version it serves and pushes at once.
    /// A replica whose data cannot be locked is logged and serves unlocked.
    pub lock_in_memory_stores: bool,
    /// How long the broker may hold a fetch of a hybrid replica's real-time consumers (see
    /// [`hybrid::DEFAULT_REALTIME_FETCH_WAIT`]).
    pub realtime_fetch_wait: std::time::Duration,
    /// Most reads in flight at once before the server sheds load (see [`limits`]).
    pub read_in_flight_max: usize,
    /// Connections at once, idle connections, slow request bodies.
    pub connection_limits: ConnectionLimits,
    /// The network the read endpoint listens on: the operating system's, or a simulated one.
    pub network: Network,
}

impl ServerConfig {
    /// A configuration with defaults for everything but identity, zone and data directory:
    /// `127.0.0.1:0`, plaintext, default root, lease TTL and key limit.
    pub fn new(
        node_id: impl Into<String>,
        zone: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> ServerConfig {
        ServerConfig {
            node_id: node_id.into(),
            zone: zone.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: DEFAULT_ADVERTISE_HOST.to_string(),
            data_dir: data_dir.into(),
            meta_root: DEFAULT_ROOT.to_string(),
            lease_ttl_s: DEFAULT_LEASE_TTL_S,
            tls: None,
            authorize: false,
            batch_get_keys_max: BATCH_GET_KEYS_MAX,
            block_cache_bytes: DEFAULT_BLOCK_CACHE_BYTES,
            faults: FaultConfig::default(),
            usage_refresh: usage::DEFAULT_USAGE_REFRESH,
            lock_in_memory_stores: false,
            realtime_fetch_wait: hybrid::DEFAULT_REALTIME_FETCH_WAIT,
            read_in_flight_max: limits::IN_FLIGHT_MAX_DEFAULT,
            connection_limits: ConnectionLimits::default(),
            network: Network::Os,
        }
    }
}

/// What the server's tasks are asked to do, through one watch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Keep going.
    Running,
    /// Stop gracefully: drain connections, stop ingestion, close databases.
    Drain,
    /// Stop as a crash would: drop connections at once; ingestion stops and databases close
    /// (so the data directory can be reopened), nothing more is written to the metadata store.
    Kill,
}

/// A server started by [`start`]. Dropping it stops every task gracefully in the background
/// (without revoking the lease); prefer [`RunningServer::shutdown`] or [`RunningServer::kill`].
pub struct RunningServer {
    address: SocketAddr,
    metrics: Arc<ServerMetrics>,
    faults: Arc<Faults>,
    ctx: Arc<node::NodeContext>,
    shutdown: watch::Sender<Stop>,
    serve_task: JoinHandle<()>,
    reconcile_task: JoinHandle<()>,
    lease_task: JoinHandle<rialto_backends::LeaseHandle>,
    usage_task: JoinHandle<()>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("address", &self.address)
            .field("node", &self.ctx.node_id)
            .finish()
    }
}

impl RunningServer {
    /// The bound read endpoint.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The server's counters.
    pub fn metrics(&self) -> Arc<ServerMetrics> {
        self.metrics.clone()
    }

    /// The node id.
    pub fn node_id(&self) -> &str {
        &self.ctx.node_id
    }

    /// The live fault-injection settings of the read path (tests and benchmarks): changes take
    /// effect on the next read request.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    /// Stops serving (draining connections), stops ingestion, closes every database and revokes
    /// the lease (which removes the node and replica records).
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let (ctx, lease, first_error) = self.stop(Stop::Drain).await;
        let lease_id = *ctx.lease_id.lock().await;
        let revoked = ctx.meta.revoke_lease(lease_id).await;
        drop(lease);
        tracing::info!(node = %ctx.node_id, "server stopped");
        if let Some(e) = first_error {
            return Err(e);
        }
        revoked.map_err(ServerError::from)
    }

    /// Stops the server as a crash (SIGKILL) would, for tests: the listener closes, every open
    /// HTTP/2 connection is dropped with its in-flight requests, ingestion stops, and the lease is
    /// *not* revoked, only no longer kept alive, so the node and replica records stay until its
    /// TTL expires. Unlike a real crash, every database is closed cleanly before this returns, so
    /// the same data directory can be reopened by a new [`start`] in this process.
    pub async fn kill(self) -> Result<(), ServerError> {
        let (ctx, lease, first_error) = self.stop(Stop::Kill).await;
        // Dropping the handle stops the keep-alive; the lease expires on its own.
        drop(lease);
        tracing::info!(node = %ctx.node_id, "server killed (lease left to expire)");
        first_error.map_or(Ok(()), Err)
    }

    /// Signals `how` to every task and waits for them; returns the context, the current lease
    /// (if the lease task ended normally) and the first task failure.
    async fn stop(
        self,
        how: Stop,
    ) -> (
        Arc<node::NodeContext>,
        Option<rialto_backends::LeaseHandle>,
        Option<ServerError>,
    ) {
        let RunningServer {
            ctx,
            shutdown,
            serve_task,
            reconcile_task,
            lease_task,
            usage_task,
            ..
        } = self;
        let _ = shutdown.send(how);
        let mut first_error = None;
        let mut note = |name: &'static str, r: Result<(), tokio::task::JoinError>| {
            if let Err(e) = r {
                first_error.get_or_insert(ServerError::Task(name, e.to_string()));
            }
        };
        note("serve", serve_task.await);
        note("assignments", reconcile_task.await);
        note("usage", usage_task.await);
        let lease = match lease_task.await {
            Ok(lease) => Some(lease),
            Err(e) => {
                first_error.get_or_insert(ServerError::Task("lease", e.to_string()));
                None
            }
        };
        (ctx, lease, first_error)
    }
}

/// Starts a storage server: binds, registers under a lease, follows assignments, serves reads.
pub async fn start(
    config: ServerConfig,
    meta: Arc<dyn MetaStore>,
    pubsub: Arc<dyn PubSub>,
) -> Result<RunningServer, ServerError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| ServerError::io("create data directory", &config.data_dir, e))?;
    let tls = rialto_security::tls::endpoint_config(
        config.tls.as_ref(),
        &[b"h2"],
        "the storage server's read endpoint",
        config.authorize,
    )
    .map_err(|e| ServerError::Tls(e.to_string()))?
    .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let listener =
        config
            .network
            .bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
    let address = listener.local_addr().map_err(|e| {
        ServerError::io(
            "read the bound address",
            PathBuf::from(config.listen.to_string()),
            e,
        )
    })?;

    let layout = Layout::new(&config.meta_root);
    let metrics = Arc::new(ServerMetrics::default());
    let ctx = Arc::new(node::NodeContext {
        node_id: config.node_id.clone(),
        data_dir: config.data_dir.clone(),
        layout: layout.clone(),
        meta: meta.clone(),
        pubsub,
        metrics: metrics.clone(),
        engine: store::Engine::new(config.block_cache_bytes),
        registry: replica::ReplicaRegistry::default(),
        node_record: NodeRecord {
            node_id: config.node_id.clone(),
            address: format!("{}:{}", config.advertise_host, address.port()),
            zone: config.zone.clone(),
            tls: config.tls.is_some(),
            started_ms: now_ms(),
        },
        lease_ttl_s: config.lease_ttl_s,
        lease_id: tokio::sync::Mutex::new(0),
        sorted_chunk: store::ChunkLimits::default(),
        lock_in_memory_stores: config.lock_in_memory_stores,
        realtime_fetch_wait: config.realtime_fetch_wait,
        verify_signatures: config.authorize,
        reports_pending: Default::default(),
    });

    let mirror = PrefixMirror::start(meta.clone(), layout.versions_prefix()).await?;
    let prefix = layout.versions_prefix();
    let first = mirror
        .with(|map| assignments::desired_replicas(map, &prefix, &config.node_id))
        .await;
    {
        let data_dir = config.data_dir.clone();
        let first = first.clone();
        rialto_backends::blocking::spawn(move || {
            assignments::remove_orphan_dirs(&data_dir, &first)
        })
        .await
        .map_err(|e| ServerError::Task("startup cleanup", e.to_string()))??;
    }
    let authorizer = if config.authorize {
        let (acls, mirror) = authz::load(meta.clone(), &layout).await?;
        Some((Arc::new(authz::Authorizer::enabled(acls)), mirror))
    } else {
        None
    };
    let lease = ctx.register().await?;

    let (shutdown, shutdown_rx) = watch::channel(Stop::Running);
    let authorizer = match authorizer {
        Some((authorizer, mirror)) => {
            tokio::spawn(authz::follow(
                layout.clone(),
                mirror,
                authorizer.clone(),
                shutdown_rx.clone(),
            ));
            authorizer
        }
        None => Arc::new(authz::Authorizer::disabled()),
    };
    let faults = Arc::new(Faults::new(config.faults));
    if config.faults.is_active() {
        tracing::warn!(node = %config.node_id, delay = ?config.faults.delay, error_rate = config.faults.error_rate, "fault injection is on: reads are delayed or failed on purpose");
    }
    let limits = Arc::new(limits::ReadLimits::new(config.read_in_flight_max));
    let catalog = Arc::new(compute::Catalog::default());
    let service = Arc::new(http::ReadService {
        node: ctx.clone(),
        metrics: metrics.clone(),
        batch_get_keys_max: config.batch_get_keys_max,
        buffers: Arc::new(http::BufferPool::default()),
        faults: faults.clone(),
        limits: limits.clone(),
        authorizer,
        connection_limits: config.connection_limits,
        catalog: catalog.clone(),
    });
    // Ends at shutdown; a crash (kill) aborts it with the runtime's other detached tasks.
    tokio::spawn(limits::follow_stores(
        ctx.clone(),
        limits,
        catalog,
        shutdown_rx.clone(),
    ));
    let serve_task = tokio::spawn(http::serve(listener, tls, service, shutdown_rx.clone()));
    let reconcile_task = tokio::spawn(assignments::reconcile(
        ctx.clone(),
        mirror,
        first,
        shutdown_rx.clone(),
    ));
    let usage_task = tokio::spawn(usage::keep_fresh(
        ctx.clone(),
        config.usage_refresh,
        shutdown_rx.clone(),
    ));
    let lease_task = tokio::spawn(node::keep_registered(ctx.clone(), lease, shutdown_rx));
    tracing::info!(node = %config.node_id, %address, tls = config.tls.is_some(), mutual_tls, authorize = config.authorize, "storage server started");
    Ok(RunningServer {
        address,
        metrics,
        faults,
        ctx,
        shutdown,
        serve_task,
        reconcile_task,
        lease_task,
        usage_task,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{reported_state, version_record, wait_until, PushRecords};
    use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};
    use rialto_protocol::meta::{ReplicaState, VersionStatus};

    const ROOT: &str = "/r";
    const WAIT: Duration = Duration::from_secs(20);

    async fn online(meta: &MemoryMetaStore, store: &str, version: u32, partition: u32) -> bool {
        wait_until(WAIT, move || async move {
            reported_state(meta, ROOT, store, version, partition, "n1")
                .await
                .map(|r| r.state)
                == Some(ReplicaState::Online)
        })
        .await
    }

    async fn push(pubsub: &MemoryPubSub, meta: &MemoryMetaStore, store: &str, version: u32) {
        let record = version_record(store, version, &[&["n1"]]);
        pubsub.create_topic(&record.topic, 1).await.unwrap();
        let mut p = PushRecords::start([9; 16]);
        p.put(b"key", 1, b"value");
        pubsub.append_all(&record.topic, 0, p.finish()).unwrap();
        let key = Layout::new(ROOT).version(store, version);
        meta.put(&key, serde_json::to_vec(&record).unwrap(), None)
            .await
            .unwrap();
    }

    fn config(dir: &std::path::Path) -> ServerConfig {
        let mut c = ServerConfig::new("n1", "z1", dir);
        c.meta_root = ROOT.into();
        c
    }

    #[tokio::test]
    async fn registers_serves_drops_and_revokes() {
        let dir = tempfile::tempdir().unwrap();
        // An orphan replica directory from an earlier life is deleted at start-up.
        std::fs::create_dir_all(dir.path().join("old/v3/p0")).unwrap();
        let meta = MemoryMetaStore::new();
        let pubsub = MemoryPubSub::new();
        push(&pubsub, &meta, "a", 1).await;
        push(&pubsub, &meta, "b", 1).await;
        let server = start(
            config(dir.path()),
            Arc::new(meta.clone()),
            Arc::new(pubsub.clone()),
        )
        .await
        .unwrap();
        assert!(!dir.path().join("old").exists());
        let layout = Layout::new(ROOT);
        let node: NodeRecord =
            serde_json::from_slice(&meta.value(&layout.node("n1")).unwrap()).unwrap();
        assert_eq!(
            node.address,
            format!("127.0.0.1:{}", server.address().port())
        );
        assert!(online(&meta, "a", 1, 0).await);
        assert!(online(&meta, "b", 1, 0).await);
        assert!(dir.path().join("a/v1/p0").exists());

        // Version deleted: replica dropped, data and record gone.
        meta.delete(&layout.version("a", 1)).await.unwrap();
        let m = &meta;
        let d = dir.path();
        let gone = wait_until(WAIT, move || async move {
            reported_state(m, ROOT, "a", 1, 0, "n1").await.is_none()
        })
        .await;
        assert!(gone);
        assert!(wait_until(WAIT, move || async move { !d.join("a/v1/p0").exists() }).await);

        // Version failed: same.
        let mut failed = version_record("b", 1, &[&["n1"]]);
        failed.status = VersionStatus::Failed {
            reason: "test".into(),
        };
        meta.put(
            &layout.version("b", 1),
            serde_json::to_vec(&failed).unwrap(),
            None,
        )
        .await
        .unwrap();
        assert!(wait_until(WAIT, move || async move { !d.join("b/v1/p0").exists() }).await);
        assert!(reported_state(&meta, ROOT, "b", 1, 0, "n1").await.is_none());
        assert_eq!(server.metrics().replicas_in(ReplicaState::Online), 0);

        // Shutdown revokes the lease: the node record disappears.
        server.shutdown().await.unwrap();
        assert!(meta.value(&layout.node("n1")).is_none());
        assert!(meta.leases().is_empty());
    }

    #[tokio::test]
    async fn lost_lease_re_registers_node_and_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemoryMetaStore::new();
        let pubsub = MemoryPubSub::new();
        push(&pubsub, &meta, "a", 1).await;
        let server = start(config(dir.path()), Arc::new(meta.clone()), Arc::new(pubsub))
            .await
            .unwrap();
        assert!(online(&meta, "a", 1, 0).await);
        let layout = Layout::new(ROOT);
        let old = meta.lease_of(&layout.node("n1")).unwrap();
        meta.expire_lease(old);
        let (m, node_key) = (&meta, layout.node("n1"));
        let node_key = &node_key;
        let back = wait_until(WAIT, move || async move {
            m.lease_of(node_key).is_some_and(|l| l != old)
                && reported_state(m, ROOT, "a", 1, 0, "n1")
                    .await
                    .map(|r| r.state)
                    == Some(ReplicaState::Online)
        })
        .await;
        assert!(
            back,
            "node and replica records were not re-written under a new lease"
        );
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn restart_keeps_ingested_data_and_goes_online_without_consuming() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemoryMetaStore::new();
        let pubsub = MemoryPubSub::new();
        push(&pubsub, &meta, "a", 1).await;
        let server = start(
            config(dir.path()),
            Arc::new(meta.clone()),
            Arc::new(pubsub.clone()),
        )
        .await
        .unwrap();
        assert!(online(&meta, "a", 1, 0).await);
        server.shutdown().await.unwrap();
        pubsub.delete_topic("a_v1").await.unwrap();
        let server = start(config(dir.path()), Arc::new(meta.clone()), Arc::new(pubsub))
            .await
            .unwrap();
        assert!(online(&meta, "a", 1, 0).await);
        let record = reported_state(&meta, ROOT, "a", 1, 0, "n1").await.unwrap();
        assert_eq!(record.records, 1);
        server.shutdown().await.unwrap();
    }
}
