//! Rialto in one process: the controller and N storage servers, on the in-memory backends
//! (`rialto_backends::memory`) instead of etcd and Kafka.
//!
//! Everything else is the production code: the controller serves its admin API over HTTP on
//! loopback (so `rialto-admin --controller` works against it), the servers serve reads over
//! HTTP/2 and keep their replicas in RocksDB under the data directory, pushes go through the
//! push job, reads through the fast client. What the memory backends cannot give is another
//! process's view: the metadata and the topics live in this process, so pushes, real-time
//! writes and clients run here too ([`LocalCluster::push_config`], [`LocalCluster::client`],
//! [`LocalCluster::realtime_writer`]), or in other processes through the gateway.
//!
//! The data directory holds everything: the metadata store's journal (`metadata.journal`),
//! the broker's topics (`topics/`) and each server's replicas (`server-N/`). Started again on
//! the same directory, the cluster comes back with its stores, versions and real-time writes:
//! servers resume their replicas from their checkpoints, as after a restart of every process
//! of a production cluster whose etcd and Kafka stayed up.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let cluster = rialto_local::LocalCluster::start(rialto_local::LocalOptions::new(dir.path())).await?;
//! println!("admin API at {}", cluster.controller_url());
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};
use rialto_backends::{MetaStore, PubSub};
use rialto_controller::{AdminClient, ControllerConfig, ControllerError, RunningController};
use rialto_fast_client::{Client, ClientConfig, ClientError};
use rialto_protocol::meta::ReplicaState;
use rialto_push::realtime::RealtimeWriter;
use rialto_push::{InProcessBroker, PushConfig, PushError};
use rialto_server::{RunningServer, ServerConfig, ServerError};
use thiserror::Error;

/// The metadata store's journal, in the data directory.
pub const METADATA_JOURNAL: &str = "metadata.journal";
/// The broker's topics, in the data directory.
pub const TOPICS_DIR: &str = "topics";

/// How long [`LocalCluster::start`] waits for every server to register.
const REGISTRATION_WAIT: Duration = Duration::from_secs(30);
/// How long [`LocalCluster::start`] waits for the current versions' replicas to be ONLINE
/// again (a restart).
const REOPEN_WAIT: Duration = Duration::from_secs(60);

/// A failure to start or use the local cluster.
#[derive(Debug, Error)]
pub enum LocalError {
    #[error("controller: {0}")]
    Controller(#[from] ControllerError),
    #[error("storage server {node}: {source}")]
    Server { node: String, source: ServerError },
    #[error("cannot open the {what} in {path}: {source}")]
    Storage {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve the gateway on {address}: {source}")]
    Gateway {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("only {registered} of {wanted} storage servers registered within {waited:?}")]
    Registration {
        registered: usize,
        wanted: usize,
        waited: Duration,
    },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Storage servers (each a node with its own data directory under `data_dir`).
    pub servers: usize,
    /// Zones the servers are spread over (server `i` is in zone `i % zones`).
    pub zones: usize,
    /// Where the cluster keeps its metadata, topics and replicas; a later start on the same
    /// directory carries on from them.
    pub data_dir: PathBuf,
    /// The admin API's address; port 0 picks a free one.
    pub controller_listen: SocketAddr,
    /// Serve the metadata store and the broker to other processes on this address (the
    /// gateway, `rialto_backends::remote`): `rialto-push`, `rialto-loadgen` and applications'
    /// clients then reach the cluster at `rialto-local://ADDRESS`. Loopback only: it has no
    /// TLS and no authorization.
    pub gateway_listen: Option<SocketAddr>,
}

impl LocalOptions {
    /// Three servers in three zones, the admin API on a free loopback port.
    pub fn new(data_dir: impl Into<PathBuf>) -> LocalOptions {
        LocalOptions {
            servers: 3,
            zones: 3,
            data_dir: data_dir.into(),
            controller_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway_listen: None,
        }
    }
}

/// A running one-process cluster. [`shutdown`](Self::shutdown) stops it in order; dropping it
/// aborts its tasks.
pub struct LocalCluster {
    meta: MemoryMetaStore,
    broker: MemoryPubSub,
    controller: RunningController,
    servers: Vec<RunningServer>,
    gateway: Option<Gateway>,
}

struct Gateway {
    address: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalCluster {
    /// Starts the controller and the servers on the metadata, topics and replicas kept in the
    /// data directory (empty at first), and waits until every server registered and every
    /// replica of the stores' current versions is ONLINE.
    pub async fn start(options: LocalOptions) -> Result<LocalCluster, LocalError> {
        let storage =
            |what, path: PathBuf| move |source| LocalError::Storage { what, path, source };
        std::fs::create_dir_all(&options.data_dir)
            .map_err(storage("data directory", options.data_dir.clone()))?;
        let meta_path = options.data_dir.join(METADATA_JOURNAL);
        let meta = MemoryMetaStore::open(&meta_path)
            .map_err(storage("metadata journal", meta_path.clone()))?;
        let topics = options.data_dir.join(TOPICS_DIR);
        let broker = MemoryPubSub::open(&topics).map_err(storage("topics", topics.clone()))?;
        let gateway = match options.gateway_listen {
            Some(address) => Some(start_gateway(address, &meta, &broker).await?),
            None => None,
        };
        let config = ControllerConfig {
            controller_id: "local".into(),
            listen: options.controller_listen,
            // What push jobs in other processes are told to produce to; without a gateway only
            // pushes in this process (handed the broker) can write.
            kafka_bootstrap: match &gateway {
                Some(g) => format!("{}{}", rialto_backends::remote::SCHEME, g.address),
                None => "in-process-only".into(),
            },
            // The memory broker serves other topics through a deletion.
            topic_deletion: rialto_controller::TopicDeletion::Immediate,
            ..ControllerConfig::default()
        };
        let controller =
            rialto_controller::start(config, Arc::new(meta.clone()), Arc::new(broker.clone()))
                .await?;
        let mut servers = Vec::with_capacity(options.servers);
        for i in 0..options.servers {
            let node = format!("server-{i}");
            let zone = format!("zone-{}", (b'a' + (i % options.zones.max(1)) as u8) as char);
            let config = ServerConfig::new(&node, zone, server_dir(&options.data_dir, i));
            let server =
                rialto_server::start(config, Arc::new(meta.clone()), Arc::new(broker.clone()))
                    .await
                    .map_err(|source| LocalError::Server { node, source })?;
            servers.push(server);
        }
        let cluster = LocalCluster {
            meta,
            broker,
            controller,
            servers,
            gateway,
        };
        cluster.wait_for_registration(options.servers).await?;
        cluster.wait_for_current_versions().await;
        Ok(cluster)
    }

    /// Waits until every replica of every store's current version is ONLINE: after a restart
    /// the servers reopen their replicas and report them again, and reads need them. Gives up
    /// with a warning after [`REOPEN_WAIT`] (reads then go to the replicas that are back).
    async fn wait_for_current_versions(&self) {
        let admin = self.admin();
        let deadline = tokio::time::Instant::now() + REOPEN_WAIT;
        loop {
            let pending = replicas_not_online(&admin).await;
            if matches!(pending, Ok(0)) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                match pending {
                    Ok(replicas) => tracing::warn!(
                        replicas,
                        "replicas of current versions still not ONLINE; serving without them"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list the current versions' replicas")
                    }
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_registration(&self, wanted: usize) -> Result<(), LocalError> {
        let admin = self.admin();
        let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
        loop {
            let registered = admin.list_nodes().await.map(|n| n.len()).unwrap_or(0);
            if registered >= wanted {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LocalError::Registration {
                    registered,
                    wanted,
                    waited: REGISTRATION_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The gateway's endpoint (`rialto-local://127.0.0.1:PORT`) when it runs: what other
    /// processes name as their etcd endpoint and Kafka bootstrap.
    pub fn gateway_endpoint(&self) -> Option<String> {
        self.gateway
            .as_ref()
            .map(|g| format!("{}{}", rialto_backends::remote::SCHEME, g.address))
    }

    /// The admin API's URL (`http://127.0.0.1:PORT`).
    pub fn controller_url(&self) -> String {
        self.controller.url()
    }

    /// A client of the admin API.
    pub fn admin(&self) -> AdminClient {
        AdminClient::new(self.controller.url())
    }

    /// The cluster's metadata store.
    pub fn meta(&self) -> Arc<dyn MetaStore> {
        Arc::new(self.meta.clone())
    }

    /// The cluster's broker.
    pub fn broker(&self) -> Arc<dyn PubSub> {
        Arc::new(self.broker.clone())
    }

    /// The address each server serves reads on.
    pub fn server_addresses(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(RunningServer::address).collect()
    }

    /// A push of `input` into `store` that writes to this cluster's broker.
    pub fn push_config(&self, store: &str, input: impl Into<PathBuf>) -> PushConfig {
        let mut config = PushConfig::new(&self.controller_url(), store, input);
        config.broker = Some(InProcessBroker(self.broker()));
        config
    }

    /// A fast client of `store`, following this cluster's metadata.
    pub async fn client(&self, store: &str) -> Result<Client, ClientError> {
        Client::connect(ClientConfig::new(store), self.meta()).await
    }

    /// A writer of real-time puts and deletes to the hybrid store `store`.
    pub async fn realtime_writer(&self, store: &str) -> Result<RealtimeWriter, PushError> {
        let record = self.admin().describe_store(store).await?.store;
        RealtimeWriter::new(&record, self.broker()).await
    }

    /// Stops the servers, then the controller.
    pub async fn shutdown(self) {
        for server in self.servers {
            if let Err(e) = server.shutdown().await {
                tracing::warn!(error = %e, "a storage server did not stop cleanly");
            }
        }
        if let Err(e) = self.controller.shutdown().await {
            tracing::warn!(error = %e, "the controller did not stop cleanly");
        }
        if let Some(gateway) = self.gateway {
            let _ = gateway.stop.send(true);
            match gateway.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the gateway failed"),
                Err(e) => tracing::warn!(error = %e, "the gateway task failed"),
            }
        }
    }
}

async fn start_gateway(
    address: SocketAddr,
    meta: &MemoryMetaStore,
    broker: &MemoryPubSub,
) -> Result<Gateway, LocalError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| LocalError::Gateway { address, source })?;
    let address = listener
        .local_addr()
        .map_err(|source| LocalError::Gateway { address, source })?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(rialto_backends::remote::gateway::serve(
        listener,
        meta.clone(),
        broker.clone(),
        stopped,
    ));
    Ok(Gateway {
        address,
        stop,
        task,
    })
}

/// Replicas of the stores' current versions that are not ONLINE.
async fn replicas_not_online(admin: &AdminClient) -> Result<usize, ControllerError> {
    let mut pending = 0;
    for store in admin.list_stores().await? {
        let Some(current) = store.current_version else {
            continue;
        };
        let version = admin.describe_version(&store.name, current).await?;
        pending += version
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Online)
            .count();
    }
    Ok(pending)
}

fn server_dir(data_dir: &Path, i: usize) -> PathBuf {
    data_dir.join(format!("server-{i}"))
}
