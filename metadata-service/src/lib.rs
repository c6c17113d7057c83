//! The Rialto controller: the admin HTTP/JSON API (stores, pushes, nodes), replica placement,
//! and the leader's reconcile loop that swaps, fails and retires versions.
//!
//! The controller is stateless: everything lives in etcd behind [`MetaStore`]. Every controller
//! serves the API (each write is a compare-and-put); one leader, elected through etcd, reconciles.
//!
//! * [`api`]: the HTTP routes; [`client`]: [`AdminClient`], the typed client of those routes.
//! * [`placement`]: which nodes host each partition of a new version.
//! * [`rebalance`]: moving replicas off lost and drained nodes and onto new ones.
//! * [`reconcile`]: pure planning ([`reconcile::plan`]) and the loop that applies it.
//! * [`election`]: leader election under an etcd lease.
//! * [`render`]: the tables `rialto-admin` prints.
//!
//! ```no_run
//! # async fn demo(meta: std::sync::Arc<dyn rialto_backends::MetaStore>, pubsub: std::sync::Arc<dyn rialto_backends::PubSub>) -> Result<(), rialto_controller::ControllerError> {
//! let config = rialto_controller::ControllerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
//! let controller = rialto_controller::start(config, meta, pubsub).await?;
//! let client = rialto_controller::AdminClient::new(format!("http://{}", controller.address()));
//! client.list_stores().await?;
//! controller.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod authz;
pub mod client;
pub mod election;
pub mod error;
pub mod placement;
pub mod rebalance;
pub mod reconcile;
pub mod render;
pub mod serve;
pub mod store_ops;
pub mod throttle;
pub mod versions;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rialto_backends::{MetaStore, Network, PubSub};
use rialto_protocol::meta::{Layout, DEFAULT_ROOT};
pub use rialto_security::tls::{ClientTlsFiles, ServerTlsFiles};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use client::{AdminClient, ControllerTlsArgs};
pub use error::ControllerError;
pub use placement::{place, PlacementError};
pub use rebalance::RebalanceConfig;
pub use reconcile::TopicDeletion;
pub use throttle::CallRate;

/// Default TTL of the leader lease, in seconds.
pub const LEASE_TTL_S_DEFAULT: i64 = 10;

/// Default [`ControllerConfig::push_timeout`]: a day, as Venice's bootstrap timeout.
pub const PUSH_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How one controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Unique id of this controller (written into the leader key).
    pub controller_id: String,
    /// Address of the admin API; port 0 picks a free one (see [`RunningController::address`]).
    pub listen: SocketAddr,
    /// Root prefix of the cluster in etcd.
    pub meta_root: String,
    /// Kafka bootstrap servers handed to push jobs in the start-push answer.
    pub kafka_bootstrap: String,
    /// TTL of the leader lease; a dead leader is replaced after about this long.
    pub lease_ttl_s: i64,
    /// When and how many replicas the leader moves (lost, drained and new nodes).
    pub rebalance: RebalanceConfig,
    /// A version not live this long after its push started is failed (the push job died, or
    /// its replicas cannot catch up); zero never.
    pub push_timeout: std::time::Duration,
    /// When topics of retired versions and deleted stores are deleted.
    pub topic_deletion: TopicDeletion,
    /// HTTPS for the admin API; with a client CA every caller must present a certificate it
    /// signed. `None` serves plaintext HTTP, for local use only.
    pub tls: Option<ServerTlsFiles>,
    /// Check every admin call against the ACLs (see [`authz`]); needs mutual TLS.
    pub authorize: bool,
    /// Principals granted cluster `admin` in etcd at start (revocable there like any grant).
    pub admin_principals: Vec<String>,
    /// The network the admin API listens on: the operating system's, or a simulated one.
    pub network: Network,
    /// Admin calls per caller (see [`throttle`]).
    pub call_rate: CallRate,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            controller_id: format!("controller-{}", std::process::id()),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            meta_root: DEFAULT_ROOT.to_string(),
            kafka_bootstrap: "127.0.0.1:9092".to_string(),
            lease_ttl_s: LEASE_TTL_S_DEFAULT,
            rebalance: RebalanceConfig::default(),
            push_timeout: PUSH_TIMEOUT_DEFAULT,
            topic_deletion: TopicDeletion::default(),
            tls: None,
            authorize: false,
            admin_principals: Vec::new(),
            network: Network::Os,
            call_rate: CallRate::default(),
        }
    }
}

/// A controller running in this process: its API server and its election/reconcile task.
pub struct RunningController {
    address: SocketAddr,
    https: bool,
    leader: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    election: JoinHandle<()>,
}

impl RunningController {
    /// The address the admin API listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://{address}` (or `https://`), for an [`AdminClient`].
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }

    /// Whether this controller currently leads (and reconciles).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Stops as a crash would: the admin API and the reconcile loop end at once and the lease
    /// is left to expire, so a standby takes over only after the lease TTL.
    pub fn kill(self) {
        self.server.abort();
        self.election.abort();
    }

    /// Stops serving, stops reconciling and gives up leadership (revoking the lease).
    pub async fn shutdown(self) -> Result<(), ControllerError> {
        let _ = self.shutdown.send(true);
        let election = self.election.await;
        let server = self.server.await;
        election.map_err(|e| ControllerError::Internal(format!("election task: {e}")))?;
        server
            .map_err(|e| ControllerError::Internal(format!("admin API task: {e}")))?
            .map_err(|e| ControllerError::Internal(format!("admin API server: {e}")))?;
        Ok(())
    }
}

/// Starts a controller: binds the admin API, then campaigns for leadership in the background.
pub async fn start(
    config: ControllerConfig,
    meta: Arc<dyn MetaStore>,
    pubsub: Arc<dyn PubSub>,
) -> Result<RunningController, ControllerError> {
    if config.lease_ttl_s < 1 {
        return Err(ControllerError::BadRequest(format!(
            "lease TTL must be at least 1 second, got {}",
            config.lease_ttl_s
        )));
    }
    let layout = Layout::new(&config.meta_root);
    let tls = rialto_security::tls::endpoint_config(
        config.tls.as_ref(),
        &[b"http/1.1"],
        "the controller's admin API",
        config.authorize,
    )
    .map_err(|e| ControllerError::BadRequest(e.to_string()))?
    .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    for principal in &config.admin_principals {
        rialto_protocol::acl::validate_principal(principal)
            .map_err(|e| ControllerError::BadRequest(format!("--admin-principal: {e}")))?;
    }
    store_ops::grant_cluster_admins(meta.as_ref(), &layout, &config.admin_principals).await?;
    if !config.authorize {
        tracing::warn!("admin API authorization is off: anyone who reaches it may change the cluster (use --authorize)");
    }
    let listener = config
        .network
        .bind(config.listen)
        .await
        .map_err(|e| ControllerError::Bind {
            addr: config.listen.to_string(),
            detail: e.to_string(),
        })?;
    let address = listener.local_addr().map_err(|e| ControllerError::Bind {
        addr: config.listen.to_string(),
        detail: e.to_string(),
    })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let leader = Arc::new(AtomicBool::new(false));
    let app = api::router(api::ApiState {
        layout,
        meta: meta.clone(),
        pubsub: pubsub.clone(),
        kafka_bootstrap: config.kafka_bootstrap.clone(),
        leader: leader.clone(),
        authz: Arc::new(authz::AuthzConfig {
            enabled: config.authorize,
            refused: Default::default(),
        }),
        throttle: Arc::new(throttle::Throttle::new(config.call_rate)),
        controller_id: config.controller_id.clone(),
    });
    let https = tls.is_some();
    let server = tokio::spawn(serve::serve(listener, tls, app, shutdown_rx.clone()));

    let controller_id = config.controller_id.clone();
    let election = tokio::spawn(election::run(
        config,
        meta,
        pubsub,
        leader.clone(),
        shutdown_rx,
    ));
    tracing::info!(controller = %controller_id, %address, "controller started");
    Ok(RunningController {
        address,
        https,
        leader,
        shutdown: shutdown_tx,
        server,
        election,
    })
}
