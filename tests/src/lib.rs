//! Whole-cluster test harness: real etcd, real Kafka-protocol broker (tansu), an in-process
//! controller and N in-process storage servers that can be stopped and restarted.
//!
//! ```text
//! let cluster = Cluster::start(3).await?;          // etcd + tansu + controller + 3 servers
//! cluster.create_store("s", KEY, VALUE, 8, 2).await?;
//! let report = cluster.push("s", &path).await?;
//! let client = cluster.client("s").await?;
//! cluster.stop_server(1).await?; cluster.restart_server(1).await?;
//!
//! let cluster = Cluster::start_opts(ClusterOptions { servers: 6, ..Default::default() }).await?;
//! cluster.create_string_store("s", 12, 3, 10_000, 100).await?; // store + 10,000 records
//! cluster.faults(0).set_delay(Duration::from_millis(200));   // slow server 0 down
//! cluster.kill_server(2).await?;                             // crash server 2
//! let client = cluster.client_with("s", |c| c.group_routing = false).await?;
//! ```
//!
//! External services are started with `scripts/services.sh` on free 127.0.0.1 ports inside a
//! temporary folder, and stopped by PID when the harness is dropped. Dropping a cluster (a test
//! that failed early) first stops its servers and controller, so no RocksDB or Kafka client
//! thread outlives the services or the runtime.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rialto_backends::etcd::EtcdMetaStore;
use rialto_backends::kafka::{KafkaConfig, KafkaPubSub};
use rialto_backends::{MetaStore, PubSub};
use rialto_controller::{AdminClient, ControllerConfig, RebalanceConfig, RunningController};
use rialto_fast_client::{Client, ClientConfig};
use rialto_protocol::admin::CreateStoreRequest;
use rialto_protocol::meta::{
    Compression, LeadershipRecord, StorageProfile, VersionStatus, DEFAULT_ROOT,
};
use rialto_push::{PushConfig, PushReport};
use rialto_server::{FaultConfig, Faults, RunningServer, ServerConfig};

pub mod sim;

/// Installs a test log subscriber once (`RUST_LOG` controls it; default warnings only).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// The root of the checkout under test. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test
/// too; that value wins over the compile-time one, because a shared target dir may hold test
/// binaries built from another clone of the repository.
pub fn checkout_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// The checkout's `scripts/`.
fn scripts_dir() -> PathBuf {
    checkout_dir().join("scripts")
}

/// etcd and tansu, started by `scripts/services.sh` in a temporary folder.
pub struct Services {
    dir: tempfile::TempDir,
    pub etcd_endpoint: String,
    pub kafka_bootstrap: String,
}

impl Services {
    pub fn start() -> Result<Services> {
        Self::start_tls(None)
    }

    /// Like [`start`](Self::start); with `etcd_certs` (a `certs init` directory) etcd serves
    /// https and requires client certificates.
    pub fn start_tls(etcd_certs: Option<&Path>) -> Result<Services> {
        let dir = tempfile::Builder::new()
            .prefix("rialto-services-")
            .tempdir()?;
        let (etcd, peer, kafka) = (free_port(), free_port(), free_port());
        let out = Command::new("bash")
            .arg(scripts_dir().join("services.sh"))
            .args(["start", "--dir"])
            .arg(dir.path())
            .args([
                "--etcd-port",
                &etcd.to_string(),
                "--etcd-peer-port",
                &peer.to_string(),
            ])
            .args(["--kafka-port", &kafka.to_string()])
            .args(["--owner", &std::process::id().to_string()])
            .args(
                etcd_certs
                    .map(|d| vec!["--etcd-tls-dir".into(), d.as_os_str().to_owned()])
                    .unwrap_or_default(),
            )
            .output()
            .context("run scripts/services.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/services.sh start failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Services {
            dir,
            etcd_endpoint: format!(
                "{}://127.0.0.1:{etcd}",
                if etcd_certs.is_some() {
                    "https"
                } else {
                    "http"
                }
            ),
            kafka_bootstrap: format!("127.0.0.1:{kafka}"),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(scripts_dir().join("services.sh"))
            .args(["stop", "--dir"])
            .arg(self.dir.path())
            .output();
    }
}

/// One storage server slot: its config survives restarts, so a restart reuses node id and data.
struct ServerSlot {
    config: ServerConfig,
    running: Option<RunningServer>,
    /// Fault handle of the latest instance (kept after it stops, so reaching it never fails).
    faults: Arc<Faults>,
}

/// A whole cluster for a test. Fields drop in order: servers and controller are stopped by
/// `Drop` first, the services (etcd, tansu) go last.
pub struct Cluster {
    pub controller: Option<RunningController>,
    servers: Vec<ServerSlot>,
    pub meta: Arc<dyn MetaStore>,
    pub pubsub: Arc<dyn PubSub>,
    tls_ca_pem: Option<Vec<u8>>,
    /// With [`ClusterOptions::secure`]: the directory `rialto-admin certs init` wrote.
    certs: Option<PathBuf>,
    connection_limits: rialto_server::ConnectionLimits,
    data: tempfile::TempDir,
    pub services: Services,
}

/// The shape of a cluster started by [`Cluster::start_opts`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Storage servers (default 3).
    pub servers: usize,
    /// Distinct zone labels; server `i` is in zone `i % zones` (default 3: [`ZONES`]).
    pub zones: usize,
    /// Serve reads over TLS with a self-signed certificate (default false).
    pub tls: bool,
    /// Mutual TLS and authorization everywhere (default false): a local CA with client
    /// certificates for [`SECURE_CLIENTS`] (see [`Cluster::certs_dir`]); the controller's API
    /// over HTTPS; every caller must present a certificate; `admin` is a cluster administrator
    /// and nobody else holds anything until granted.
    pub secure: bool,
    /// The servers' connection bounds (default: the servers' defaults).
    pub connection_limits: rialto_server::ConnectionLimits,
    /// Faults of server `i` at start: `faults[i]`, or `default_faults` past the end of the list.
    pub faults: Vec<FaultConfig>,
    /// Faults of servers without an entry in `faults` (default none).
    pub default_faults: FaultConfig,
    /// Registration lease TTL of the servers, in seconds (default 10): how long a killed
    /// server's records stay in etcd.
    pub lease_ttl_s: i64,
    /// The controller's rebalance settings (default: a 3 s delay, 8 moves in flight).
    pub rebalance: RebalanceConfig,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            servers: 3,
            zones: ZONES.len(),
            tls: false,
            secure: false,
            connection_limits: rialto_server::ConnectionLimits::default(),
            faults: Vec::new(),
            default_faults: FaultConfig::default(),
            lease_ttl_s: 10,
            rebalance: RebalanceConfig {
                delay: Duration::from_secs(3),
                moves_max: 8,
            },
        }
    }
}

/// The zone label of server `i` among `zones` zones: `zone-a`, `zone-b`, … (then `zone-<n>`).
pub fn zone_name(i: usize, zones: usize) -> String {
    let z = i % zones.max(1);
    match ZONES.get(z) {
        Some(name) => name.to_string(),
        None if z < 26 => format!("zone-{}", char::from(b'a' + z as u8)),
        None => format!("zone-{z}"),
    }
}

/// Key schema of [`Cluster::create_string_store`] stores.
pub const STRING_SCHEMA: &str = r#""string""#;

/// The value of record `i` in [`Cluster::create_string_store`] stores: `value_bytes` ASCII
/// characters, the record number zero-padded to 7 digits and `-`, then `v`s (so values of at
/// least 8 bytes differ for every `i` below 10 million).
pub fn string_value(i: usize, value_bytes: usize) -> String {
    let mut value = format!("{i:07}-");
    value.truncate(value_bytes);
    while value.len() < value_bytes {
        value.push('v');
    }
    value
}

/// Writes a self-signed certificate for `localhost` and `127.0.0.1` under `dir`; returns the
/// server's TLS files and the PEM a client trusts.
fn write_self_signed_cert(dir: &Path) -> Result<(rialto_server::TlsFiles, Vec<u8>)> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let cert_pem = certified.cert.pem();
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_path, &cert_pem)?;
    std::fs::write(&key_path, certified.key_pair.serialize_pem())?;
    Ok((
        rialto_server::TlsFiles {
            cert: cert_path,
            key: key_path,
            client_ca: None,
        },
        cert_pem.into_bytes(),
    ))
}

/// Clients with certificates in a [`ClusterOptions::secure`] cluster; `admin` is a cluster
/// administrator.
pub const SECURE_CLIENTS: [&str; 4] = ["admin", "alice", "bob", "pusher"];

/// Zones used by [`Cluster::start`]: server `i` is in zone `ZONES[i % 3]`.
pub const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

impl Cluster {
    /// Starts etcd, tansu, a controller and `server_count` plaintext servers in three zones.
    pub async fn start(server_count: usize) -> Result<Cluster> {
        Self::start_with(server_count, false).await
    }

    /// Like [`start`](Self::start), with every server's read endpoint behind TLS (a
    /// self-signed certificate for `localhost`/`127.0.0.1`; see [`Cluster::tls_ca_pem`]).
    pub async fn start_with(server_count: usize, tls: bool) -> Result<Cluster> {
        Self::start_opts(ClusterOptions {
            servers: server_count,
            tls,
            ..ClusterOptions::default()
        })
        .await
    }

    /// Starts etcd, tansu, a controller and the servers `opts` describes, and waits until every
    /// server is registered.
    pub async fn start_opts(opts: ClusterOptions) -> Result<Cluster> {
        init_logging();
        if opts.zones == 0 {
            bail!("a cluster needs at least one zone");
        }
        let tls = opts.tls;
        let server_count = opts.servers;
        let data = tempfile::Builder::new().prefix("rialto-data-").tempdir()?;
        let certs = if opts.secure {
            let dir = data.path().join("certs");
            rialto_security::certs::init(
                &dir,
                &rialto_security::certs::InitOptions {
                    clients: SECURE_CLIENTS.iter().map(|c| c.to_string()).collect(),
                    hosts: Vec::new(),
                },
            )?;
            Some(dir)
        } else {
            None
        };
        // A secure cluster's etcd speaks TLS too and requires client certificates.
        let services = Services::start_tls(certs.as_deref())?;
        let etcd_tls = certs.as_ref().map(|dir| rialto_controller::ClientTlsFiles {
            ca: dir.join("ca.crt"),
            identity: Some((dir.join("server.crt"), dir.join("server.key"))),
        });
        let meta: Arc<dyn MetaStore> = Arc::new(
            EtcdMetaStore::connect_tls(
                std::slice::from_ref(&services.etcd_endpoint),
                Duration::from_secs(10),
                etcd_tls.as_ref(),
            )
            .await?,
        );
        let pubsub: Arc<dyn PubSub> = Arc::new(KafkaPubSub::new(KafkaConfig::new(
            services.kafka_bootstrap.clone(),
        ))?);
        let controller = rialto_controller::start(
            ControllerConfig {
                controller_id: "controller-1".into(),
                listen: "127.0.0.1:0".parse()?,
                meta_root: DEFAULT_ROOT.into(),
                kafka_bootstrap: services.kafka_bootstrap.clone(),
                lease_ttl_s: 10,
                rebalance: opts.rebalance,
                push_timeout: rialto_controller::PUSH_TIMEOUT_DEFAULT,
                // tansu: a deletion must not meet a fetch.
                topic_deletion: rialto_controller::TopicDeletion::WhenIdle,
                tls: certs.as_ref().map(|dir| rialto_controller::ServerTlsFiles {
                    cert: dir.join("controller.crt"),
                    key: dir.join("controller.key"),
                    client_ca: Some(dir.join("ca.crt")),
                }),
                authorize: opts.secure,
                admin_principals: if opts.secure {
                    vec!["admin".into()]
                } else {
                    Vec::new()
                },
                network: Default::default(),
                call_rate: Default::default(),
            },
            meta.clone(),
            pubsub.clone(),
        )
        .await?;
        let tls_files = match &certs {
            Some(dir) => Some((
                rialto_server::TlsFiles {
                    cert: dir.join("server.crt"),
                    key: dir.join("server.key"),
                    client_ca: Some(dir.join("ca.crt")),
                },
                std::fs::read(dir.join("ca.crt"))?,
            )),
            None if tls => Some(write_self_signed_cert(data.path())?),
            None => None,
        };
        let mut cluster = Cluster {
            services,
            meta,
            pubsub,
            controller: Some(controller),
            servers: Vec::new(),
            tls_ca_pem: tls_files.as_ref().map(|(_, ca)| ca.clone()),
            certs,
            connection_limits: opts.connection_limits,
            data,
        };
        for i in 0..server_count {
            let faults = opts.faults.get(i).copied().unwrap_or(opts.default_faults);
            cluster
                .add_server(&zone_name(i, opts.zones), opts.lease_ttl_s, faults)
                .await?;
        }
        cluster.wait_for_nodes(server_count).await?;
        Ok(cluster)
    }

    /// Starts one more server, `server-<n>` in `zone` (with the cluster's TLS setting), and
    /// returns its index.
    pub async fn add_server(
        &mut self,
        zone: &str,
        lease_ttl_s: i64,
        faults: FaultConfig,
    ) -> Result<usize> {
        let i = self.servers.len();
        let tls = match (&self.certs, &self.tls_ca_pem) {
            (Some(dir), _) => Some(rialto_server::TlsFiles {
                cert: dir.join("server.crt"),
                key: dir.join("server.key"),
                client_ca: Some(dir.join("ca.crt")),
            }),
            (None, Some(_)) => Some(rialto_server::TlsFiles {
                cert: self.data.path().join("server.crt"),
                key: self.data.path().join("server.key"),
                client_ca: None,
            }),
            (None, None) => None,
        };
        let config = ServerConfig {
            node_id: format!("server-{i}"),
            zone: zone.to_string(),
            listen: "127.0.0.1:0".parse()?,
            advertise_host: "127.0.0.1".into(),
            data_dir: self.data.path().join(format!("server-{i}")),
            meta_root: DEFAULT_ROOT.into(),
            lease_ttl_s,
            tls,
            authorize: self.certs.is_some(),
            batch_get_keys_max: rialto_protocol::wire::BATCH_GET_KEYS_MAX,
            block_cache_bytes: 32 * 1024 * 1024,
            faults,
            usage_refresh: rialto_server::usage::DEFAULT_USAGE_REFRESH,
            lock_in_memory_stores: false,
            realtime_fetch_wait: rialto_server::hybrid::DEFAULT_REALTIME_FETCH_WAIT,
            read_in_flight_max: rialto_server::limits::IN_FLIGHT_MAX_DEFAULT,
            connection_limits: self.connection_limits,
            network: Default::default(),
        };
        self.servers.push(ServerSlot {
            config,
            running: None,
            faults: Arc::new(Faults::new(faults)),
        });
        self.restart_server(i).await?;
        Ok(i)
    }

    /// The controller's admin URL.
    pub fn controller_url(&self) -> String {
        let addr = self
            .controller
            .as_ref()
            .map(|c| c.address())
            .expect("controller stopped");
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}")
    }

    /// An admin client; in a secure cluster it calls as `admin`, a cluster administrator.
    pub fn admin(&self) -> AdminClient {
        self.admin_as("admin")
    }

    /// In a secure cluster: the directory of the CA and every identity's certificate.
    pub fn certs_dir(&self) -> Option<&Path> {
        self.certs.as_deref()
    }

    /// The TLS files of client `name` in a secure cluster (`None` otherwise).
    pub fn client_tls_files(&self, name: &str) -> Option<rialto_controller::ClientTlsFiles> {
        let dir = self.certs.as_ref()?;
        Some(rialto_controller::ClientTlsFiles {
            ca: dir.join("ca.crt"),
            identity: Some((
                dir.join(format!("client-{name}.crt")),
                dir.join(format!("client-{name}.key")),
            )),
        })
    }

    /// An admin client calling as `name` (one of [`SECURE_CLIENTS`]) in a secure cluster; a
    /// plaintext client otherwise.
    pub fn admin_as(&self, name: &str) -> AdminClient {
        AdminClient::connect(self.controller_url(), self.client_tls_files(name).as_ref())
            .expect("the cluster's certificates load")
    }

    /// Address of server `i` while it runs.
    pub fn server_address(&self, i: usize) -> Option<SocketAddr> {
        self.servers[i].running.as_ref().map(|s| s.address())
    }

    pub fn server(&self, i: usize) -> Option<&RunningServer> {
        self.servers[i].running.as_ref()
    }

    pub fn server_data_dir(&self, i: usize) -> &Path {
        &self.servers[i].config.data_dir
    }

    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// The node id of server `i`.
    pub fn server_node_id(&self, i: usize) -> &str {
        &self.servers[i].config.node_id
    }

    /// The zone of server `i`.
    pub fn server_zone(&self, i: usize) -> &str {
        &self.servers[i].config.zone
    }

    /// The live fault settings of server `i` (its latest instance): slow it down or make it fail
    /// reads while a test runs. A restart starts again from the faults it was configured with.
    pub fn faults(&self, i: usize) -> Arc<Faults> {
        self.servers[i].faults.clone()
    }

    /// Stops server `i` cleanly (its lease is revoked, its replicas vanish from etcd).
    pub async fn stop_server(&mut self, i: usize) -> Result<()> {
        if let Some(s) = self.servers[i].running.take() {
            s.shutdown().await?;
        }
        Ok(())
    }

    /// Stops server `i` as a crash would ([`RunningServer::kill`]): connections drop at once, its
    /// lease is left to expire, so its node and replica records stay in etcd for the lease TTL
    /// ([`ClusterOptions::lease_ttl_s`]). [`restart_server`](Self::restart_server) brings it
    /// back on the same data.
    pub async fn kill_server(&mut self, i: usize) -> Result<()> {
        if let Some(s) = self.servers[i].running.take() {
            s.kill().await?;
        }
        Ok(())
    }

    /// Whether server `i` is running.
    pub fn server_running(&self, i: usize) -> bool {
        self.servers[i].running.is_some()
    }

    /// Starts (or restarts) server `i` with its node id and data directory.
    pub async fn restart_server(&mut self, i: usize) -> Result<()> {
        self.stop_server(i).await?;
        let server = rialto_server::start(
            self.servers[i].config.clone(),
            self.meta.clone(),
            self.pubsub.clone(),
        )
        .await?;
        self.servers[i].faults = server.faults();
        self.servers[i].running = Some(server);
        Ok(())
    }

    async fn wait_for_nodes(&self, count: usize) -> Result<()> {
        let prefix = rialto_protocol::meta::Layout::new(DEFAULT_ROOT).nodes_prefix();
        let meta = self.meta.clone();
        wait_until(
            Duration::from_secs(20),
            &format!("{count} nodes registered"),
            || {
                let meta = meta.clone();
                let prefix = prefix.clone();
                async move { Ok(meta.list(&prefix).await?.0.len() >= count) }
            },
        )
        .await
    }

    /// Creates an on-disk store through the admin API.
    pub async fn create_store(
        &self,
        name: &str,
        key_schema: &str,
        value_schema: &str,
        partition_count: u32,
        replication_factor: u32,
    ) -> Result<()> {
        self.create_store_with(
            name,
            key_schema,
            value_schema,
            partition_count,
            replication_factor,
            StorageProfile::OnDisk,
            Compression::None,
        )
        .await
    }

    /// Creates a store with the given storage profile and compression through the admin API.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_store_with(
        &self,
        name: &str,
        key_schema: &str,
        value_schema: &str,
        partition_count: u32,
        replication_factor: u32,
        storage: StorageProfile,
        compression: Compression,
    ) -> Result<()> {
        self.admin()
            .create_store(&CreateStoreRequest {
                name: name.into(),
                owner: "tests".into(),
                key_schema: key_schema.into(),
                value_schema: value_schema.into(),
                partition_count,
                replication_factor,
                storage,
                compression,
                max_value_bytes: None,
                hybrid: None,
                read_quota_keys_per_s: None,
                storage_quota_bytes: None,
                versions_to_keep: None,
            })
            .await?;
        Ok(())
    }

    /// Creates a hybrid store of strings ([`STRING_SCHEMA`] keys and values) through the admin
    /// API and waits until its first version (empty, made by the controller) is current, so it
    /// serves real-time writes before any push.
    pub async fn create_hybrid_string_store(
        &self,
        name: &str,
        partition_count: u32,
        replication_factor: u32,
        hybrid: rialto_protocol::meta::HybridConfig,
    ) -> Result<()> {
        self.admin()
            .create_store(&CreateStoreRequest {
                name: name.into(),
                owner: "tests".into(),
                key_schema: STRING_SCHEMA.into(),
                value_schema: STRING_SCHEMA.into(),
                partition_count,
                replication_factor,
                storage: StorageProfile::OnDisk,
                compression: Compression::None,
                max_value_bytes: None,
                hybrid: Some(hybrid),
                read_quota_keys_per_s: None,
                storage_quota_bytes: None,
                versions_to_keep: None,
            })
            .await?;
        let admin = self.admin();
        wait_until(
            Duration::from_secs(60),
            &format!("the first (empty) version of hybrid store {name} to be current"),
            || {
                let admin = admin.clone();
                async move {
                    Ok(admin
                        .describe_store(name)
                        .await?
                        .store
                        .current_version
                        .is_some())
                }
            },
        )
        .await
    }

    /// A real-time writer of hybrid store `store`, registered (as `admin`) and signing, producing
    /// to this cluster's broker.
    pub async fn realtime_writer(
        &self,
        store: &str,
    ) -> Result<rialto_push::realtime::RealtimeWriter> {
        self.realtime_writer_as(store, "admin").await
    }

    /// A real-time writer registered with the controller by `name` (one of [`SECURE_CLIENTS`]
    /// in a secure cluster), signing its records, producing through the cluster's broker.
    pub async fn realtime_writer_as(
        &self,
        store: &str,
        name: &str,
    ) -> Result<rialto_push::realtime::RealtimeWriter> {
        let admin = self.admin_as(name);
        let record = admin.realtime_target(store).await?.store;
        let grant = admin.register_realtime_writer(store).await?;
        let mut writer =
            rialto_push::realtime::RealtimeWriter::new(&record, self.pubsub.clone()).await?;
        writer.sign_as(&grant)?;
        Ok(writer)
    }

    /// Pushes a version by writing envelopes straight to the topic, bypassing the push job's
    /// checks and sorting: `records[p]` go to partition `p` in the order given, under a
    /// START_OF_PUSH saying `sorted`. Returns the version number once the push is reported
    /// written (it may still go live or fail).
    pub async fn push_envelopes(
        &self,
        store: &str,
        records: &[Vec<(Vec<u8>, Vec<u8>)>],
        sorted: bool,
    ) -> Result<u32> {
        let codec = rialto_protocol::envelope::CompressionCodec::None;
        self.push_envelopes_as(store, records, sorted, codec).await
    }

    /// Like [`push_envelopes`](Self::push_envelopes), with START_OF_PUSH announcing `codec`
    /// (values are written as given, whatever it says).
    pub async fn push_envelopes_as(
        &self,
        store: &str,
        records: &[Vec<(Vec<u8>, Vec<u8>)>],
        sorted: bool,
        codec: rialto_protocol::envelope::CompressionCodec,
    ) -> Result<u32> {
        use rialto_protocol::envelope::ControlMessage;
        let start = self
            .admin()
            .start_push(store, &rialto_protocol::admin::StartPushRequest::default())
            .await?;
        for (p, partition) in records.iter().enumerate() {
            let mut w = rialto_push::writer::PartitionWriter::new(rand::random::<[u8; 16]>());
            let mut envelopes = vec![
                w.start_segment(),
                w.control(ControlMessage::StartOfPush {
                    sorted,
                    codec,
                    dictionary: vec![],
                }),
            ];
            envelopes.extend(
                partition
                    .iter()
                    .map(|(k, v)| w.put(k.clone(), 1, stored_body(&start, v))),
            );
            envelopes.push(w.control(ControlMessage::EndOfPush));
            envelopes.push(w.end_segment());
            let mut deliveries = Vec::with_capacity(envelopes.len());
            for e in envelopes {
                deliveries.push(
                    self.pubsub
                        .send(&start.topic, p as u32, &[], &e.encode())
                        .await?,
                );
            }
            for d in deliveries {
                d.await?;
            }
        }
        self.admin().push_written(store, start.version).await?;
        Ok(start.version)
    }

    /// Waits up to 60 s for `version` of `store` to reach a status `done` accepts; returns it.
    pub async fn wait_for_version_status(
        &self,
        store: &str,
        version: u32,
        done: impl Fn(&VersionStatus) -> bool,
    ) -> Result<VersionStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = self
                .admin()
                .describe_version(store, version)
                .await?
                .record
                .status;
            if done(&status) {
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{store} v{version} still {status:?} after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for `version` of `store` to fail (an error if it goes ONLINE); returns the reason.
    pub async fn wait_for_version_failure(&self, store: &str, version: u32) -> Result<String> {
        let status = self
            .wait_for_version_status(store, version, |s| {
                matches!(s, VersionStatus::Failed { .. } | VersionStatus::Online)
            })
            .await?;
        match status {
            VersionStatus::Failed { reason } => Ok(reason),
            other => bail!("{store} v{version} must fail, got {other:?}"),
        }
    }

    /// Pushes envelopes (see [`push_envelopes_as`](Self::push_envelopes_as)) that the servers
    /// must reject, and returns the reason the version failed. The servers may fail it while the
    /// push is still producing (the controller then deletes its topic) or before the push is
    /// reported written (refused: already failed), so the push itself may fail too; the new
    /// version is then the store's largest.
    pub async fn push_rejected_envelopes(
        &self,
        store: &str,
        records: &[Vec<(Vec<u8>, Vec<u8>)>],
        sorted: bool,
        codec: rialto_protocol::envelope::CompressionCodec,
    ) -> Result<String> {
        let before = self
            .admin()
            .describe_store(store)
            .await?
            .store
            .largest_version;
        let version = match self.push_envelopes_as(store, records, sorted, codec).await {
            Ok(version) => version,
            Err(e) => {
                eprintln!("the push of a rejected version failed too, as it may: {e:#}");
                let largest = self
                    .admin()
                    .describe_store(store)
                    .await?
                    .store
                    .largest_version;
                ensure!(
                    largest == before + 1,
                    "no new version of {store} after {e:#}"
                );
                largest
            }
        };
        self.wait_for_version_failure(store, version).await
    }

    /// Runs `rialto-admin` against the cluster's controller; returns (success, stdout, stderr).
    pub fn admin_cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = std::process::Command::new(sibling_binary("rialto-admin")?)
            .args(["--controller", &self.controller_url()])
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Pushes a file through the real push job (in-process).
    pub async fn push(
        &self,
        store: &str,
        input: &Path,
    ) -> Result<PushReport, rialto_push::PushError> {
        self.push_with(store, input, |_| {}).await
    }

    /// Like [`push`](Self::push), letting `adjust` change the push configuration first.
    pub async fn push_with(
        &self,
        store: &str,
        input: &Path,
        adjust: impl FnOnce(&mut PushConfig),
    ) -> Result<PushReport, rialto_push::PushError> {
        let mut config = PushConfig::new(&self.controller_url(), store, input);
        config.wait_timeout = Duration::from_secs(180);
        config.controller_tls = self.client_tls_files("admin");
        adjust(&mut config);
        rialto_push::push(&config).await
    }

    /// The CA certificate (PEM) that clients trust when servers run TLS.
    pub fn tls_ca_pem(&self) -> Option<&[u8]> {
        self.tls_ca_pem.as_deref()
    }

    /// A fast client of `store` (trusting the cluster's certificate when servers run TLS).
    pub async fn client(&self, store: &str) -> Result<Client> {
        self.client_with(store, |_| {}).await
    }

    /// Like [`client`](Self::client), letting `adjust` change the configuration (long-tail
    /// retry, group routing, timeouts…) before the client connects.
    pub async fn client_with(
        &self,
        store: &str,
        adjust: impl FnOnce(&mut ClientConfig),
    ) -> Result<Client> {
        let mut config = ClientConfig::new(store);
        config.routing_wait = Duration::from_secs(10);
        config.tls = self
            .tls_ca_pem
            .as_ref()
            .map(|pem| rialto_fast_client::ClientTls {
                ca_cert_pem: pem.clone(),
                server_name: None,
                identity: self.client_identity("admin"),
            });
        adjust(&mut config);
        Ok(Client::connect(config, self.meta.clone()).await?)
    }

    /// The certificate and key of client `name` in a secure cluster, for a fast client.
    pub fn client_identity(&self, name: &str) -> Option<rialto_fast_client::ClientIdentity> {
        let (cert, key) = self.client_tls_files(name)?.identity?;
        Some(rialto_fast_client::ClientIdentity {
            cert_pem: std::fs::read(cert).ok()?,
            key_pem: std::fs::read(key).ok()?,
        })
    }

    /// Creates store `name` (string keys [`key_of`]`(i)`, string values
    /// [`string_value`]`(i, value_bytes)`, both [`STRING_SCHEMA`]) with `partitions` partitions
    /// and replication factor `rf`, and pushes `records` records through the real push job.
    /// Returns when the version is live.
    pub async fn create_string_store(
        &self,
        name: &str,
        partitions: u32,
        rf: u32,
        records: usize,
        value_bytes: usize,
    ) -> Result<PushReport> {
        self.create_store(name, STRING_SCHEMA, STRING_SCHEMA, partitions, rf)
            .await?;
        self.push_string_records(name, records, value_bytes).await
    }

    /// Pushes a new version of a [`create_string_store`](Self::create_string_store) store.
    pub async fn push_string_records(
        &self,
        name: &str,
        records: usize,
        value_bytes: usize,
    ) -> Result<PushReport> {
        let path = self.data.path().join(format!(
            "{name}-{records}x{value_bytes}-{}.jsonl",
            std::process::id()
        ));
        write_json_dataset(&path, records, |i| {
            serde_json::Value::String(string_value(i, value_bytes))
        })?;
        let report = self.push(name, &path).await;
        let _ = std::fs::remove_file(&path);
        Ok(report?)
    }

    /// Stops everything; services are stopped when `self` drops.
    pub async fn shutdown(mut self) -> Result<()> {
        for i in 0..self.servers.len() {
            self.stop_server(i).await?;
        }
        if let Some(c) = self.controller.take() {
            c.shutdown().await?;
        }
        Ok(())
    }

    /// Kills every running server and stops the controller, waiting at most `limit` in all.
    async fn stop_all_quickly(&mut self, limit: Duration) {
        let servers: Vec<RunningServer> = self
            .servers
            .iter_mut()
            .filter_map(|s| s.running.take())
            .collect();
        let controller = self.controller.take();
        let stop = async move {
            for r in futures::future::join_all(servers.into_iter().map(RunningServer::kill)).await {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "a server failed while being killed");
                }
            }
            if let Some(c) = controller {
                if let Err(e) = c.shutdown().await {
                    tracing::warn!(error = %e, "the controller failed while stopping");
                }
            }
        };
        if tokio::time::timeout(limit, stop).await.is_err() {
            tracing::warn!("servers and controller did not stop within {limit:?}");
        }
    }
}

/// How long dropping a cluster waits for its servers and controller to stop.
const DROP_STOP_TIMEOUT: Duration = Duration::from_secs(20);

impl Cluster {
    /// Starts a storage server as a separate `rialto-server` process, node `server-{i}` in zone
    /// `zone`, on this cluster's etcd and broker, with the data directory an in-process server
    /// `i` would have (so it restarts on the same data). Its output goes to `server-{i}.log` in
    /// the cluster's data directory. Unlike [`kill_server`](Self::kill_server), which stops an
    /// in-process server whose databases still close, [`ChildProcess::kill`] is a real crash.
    pub fn start_server_process(&self, i: usize, zone: &str) -> Result<ChildProcess> {
        let data_dir = self.data.path().join(format!("server-{i}"));
        let data_dir = data_dir.to_string_lossy();
        self.spawn_logged(
            "rialto-server",
            &format!("server-{i}"),
            &[
                "--node-id",
                &format!("server-{i}"),
                "--zone",
                zone,
                "--listen",
                "127.0.0.1:0",
                "--lease-ttl-s",
                "5",
                "--data-dir",
                &data_dir,
                "--block-cache-mib",
                "32",
            ],
        )
    }

    /// Runs the workspace binary `name` with `args` and the cluster's etcd and Kafka, its output
    /// appended to `{log}.log` in the cluster's data directory, killed with this test process.
    fn spawn_logged(&self, name: &str, log: &str, args: &[&str]) -> Result<ChildProcess> {
        let binary = sibling_binary(name)?;
        let log_path = self.data.path().join(format!("{log}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let child = Command::new(&binary)
            .args(args)
            .args(["--etcd", &self.services.etcd_endpoint])
            .args(["--kafka", &self.services.kafka_bootstrap])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        kill_when_this_process_dies(child.id())?;
        Ok(ChildProcess {
            child: Some(child),
            log: log_path,
        })
    }

    /// Runs `rialto-controller` as a child process with id `id`, its admin API on a free port
    /// and a leader lease of `lease_ttl_s`; returns it and its admin URL once it answers. Its
    /// output goes to `{id}.log` in the cluster's data directory.
    pub async fn start_controller_process(
        &self,
        id: &str,
        lease_ttl_s: i64,
    ) -> Result<(ChildProcess, String)> {
        let listen = format!("127.0.0.1:{}", free_port());
        let ttl = lease_ttl_s.to_string();
        let process = self.spawn_logged(
            "rialto-controller",
            id,
            &["--id", id, "--listen", &listen, "--lease-ttl-s", &ttl],
        )?;
        let url = format!("http://{listen}");
        let admin = AdminClient::new(url.clone());
        wait_until(
            Duration::from_secs(20),
            &format!("controller {id} answers"),
            || async { Ok(admin.health().await.is_ok()) },
        )
        .await?;
        Ok((process, url))
    }

    /// Stops the in-process controller (it gives up leadership at once).
    pub async fn stop_controller(&mut self) -> Result<()> {
        if let Some(c) = self.controller.take() {
            c.shutdown().await?;
        }
        Ok(())
    }

    /// The id of the leading controller, from etcd.
    pub async fn controller_leader(&self) -> Result<Option<String>> {
        let key = rialto_protocol::meta::Layout::new(DEFAULT_ROOT).leader();
        Ok(self
            .meta
            .get(&key)
            .await?
            .map(|kv| LeadershipRecord::decode(&kv.value))
            .transpose()?
            .map(|r| r.holder))
    }

    /// Waits until `count` storage servers are registered.
    pub async fn wait_for_server_count(&self, count: usize) -> Result<()> {
        self.wait_for_nodes(count).await
    }
}

/// Starts a detached watcher that kills `pid` (SIGKILL) once this test process is gone, so a
/// test binary that crashes or is killed leaves no server behind (`Drop` does not run then). The
/// watcher ends by itself when `pid` ends first.
fn kill_when_this_process_dies(pid: u32) -> Result<()> {
    Command::new("setsid")
        .args(["bash", "-c"])
        .arg(
            "while kill -0 \"$1\" 2>/dev/null; do kill -0 \"$2\" 2>/dev/null || exit 0; sleep 1; done; \
             kill -9 \"$2\" 2>/dev/null",
        )
        .args(["watch-test-process", &std::process::id().to_string(), &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the watcher of a server process")?;
    Ok(())
}

/// A server or controller running as a child process; killed (SIGKILL) when dropped.
pub struct ChildProcess {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl ChildProcess {
    /// Kills the process with SIGKILL, as a crash would: no flush, no clean close; its
    /// registration lease expires on its own.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("kill the child process")?;
            child.wait().context("wait for the killed child process")?;
        }
        Ok(())
    }

    /// Where its output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A binary of this workspace, next to the test binary's directory (`target/debug/`). The
/// README's test command builds every target first.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/<test binary> → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in a target directory")?;
    let binary = dir.join(name);
    ensure!(
        binary.exists(),
        "{} is not built: run `cargo build --workspace --all-targets` first (scripts/test.sh does)",
        binary.display()
    );
    Ok(binary)
}

impl Drop for Cluster {
    /// A test that fails early drops its cluster with servers still running. Stop them before
    /// the services go (fields drop after this), so RocksDB and Kafka client threads do not
    /// outlive etcd, tansu or the runtime (which crashed the process at exit). Waiting needs a
    /// multi-threaded runtime (`#[tokio::test(flavor = "multi_thread")]`); on any other runtime
    /// the servers are only dropped, which stops them in the background.
    fn drop(&mut self) {
        let running = self.servers.iter().any(|s| s.running.is_some()) || self.controller.is_some();
        if !running {
            return;
        }
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(self.stop_all_quickly(DROP_STOP_TIMEOUT));
            });
        } else {
            for slot in &mut self.servers {
                drop(slot.running.take());
            }
            drop(self.controller.take());
        }
    }
}

/// Polls `check` until it returns `Ok(true)` or `timeout` passes (never a bare sleep in tests).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                eprintln!("waiting for {what}: {e:#}");
                last_err = Some(e);
            }
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a newline-delimited JSON dataset of `count` records `{"key": "key-<i>", "value": …}`,
/// where `value(i)` gives each value as JSON.
/// A file of the test data set `set` (`tests/data/<set>/<file>`).
pub fn test_data(set: &str, file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(set)
        .join(file)
}

/// Bytes from lowercase hex (the test data sets' `*_hex` fields).
pub fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

pub fn write_json_dataset(
    path: &Path,
    count: usize,
    value: impl Fn(usize) -> serde_json::Value,
) -> Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..count {
        let line = serde_json::json!({"key": key_of(i), "value": value(i)});
        writeln!(w, "{line}")?;
    }
    w.flush()?;
    Ok(())
}

/// The body of a PUT of `datum` (schema id 1, uncompressed) in the version `start` allocated,
/// laid out as the push job lays it out: with its checksum in a checksummed version.
pub fn stored_body(start: &rialto_protocol::admin::StartPushResponse, datum: &[u8]) -> Vec<u8> {
    match start.value_format {
        rialto_protocol::meta::ValueFormat::SchemaIdPrefixed => datum.to_vec(),
        rialto_protocol::meta::ValueFormat::Checksummed => {
            let mut body = rialto_protocol::stored::value_checksum(1, datum)
                .to_be_bytes()
                .to_vec();
            body.extend_from_slice(datum);
            body
        }
    }
}

/// A value as JSON, through Rialto's exact printer, for assertions.
pub fn json_of(value_schema: &str, value: &rialto_protocol::avro::Value) -> serde_json::Value {
    rialto_protocol::avro::AvroCodec::parse(value_schema)
        .expect("a valid schema")
        .to_serde_json(value)
}

/// The key of record `i` in generated datasets.
pub fn key_of(i: usize) -> String {
    format!("key-{i:07}")
}

#[cfg(test)]
mod tests {
    use rialto_protocol::avro::Value;
    use rialto_protocol::meta::Layout;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_server_keeps_its_records_until_its_lease_expires() -> Result<()> {
        let mut cluster = Cluster::start_opts(ClusterOptions {
            servers: 2,
            zones: 2,
            lease_ttl_s: 2,
            ..ClusterOptions::default()
        })
        .await?;
        assert_eq!(
            (cluster.server_zone(0), cluster.server_zone(1)),
            ("zone-a", "zone-b")
        );
        let report = cluster.create_string_store("s", 2, 2, 300, 40).await?;
        assert_eq!(report.records, 300);
        let client = cluster
            .client_with("s", |c| c.request_timeout = Duration::from_secs(3))
            .await?;
        let read_all = || async {
            let keys: Vec<Value> = (0..300).map(|i| Value::String(key_of(i))).collect();
            let values = client.batch_get(&keys).await?;
            for (i, v) in values.iter().enumerate() {
                anyhow::ensure!(
                    v.as_ref() == Some(&Value::String(string_value(i, 40))),
                    "value of {}: {v:?}",
                    key_of(i)
                );
            }
            anyhow::Ok(())
        };
        read_all().await?;

        // Killed: the node record outlives the server until the lease TTL passes.
        let node_key = Layout::new(DEFAULT_ROOT).node(cluster.server_node_id(1));
        cluster.kill_server(1).await?;
        assert!(!cluster.server_running(1));
        assert!(cluster.meta.get(&node_key).await?.is_some());
        read_all().await?;
        let meta = cluster.meta.clone();
        let key = node_key.clone();
        wait_until(Duration::from_secs(15), "the lease to expire", || {
            let (meta, key) = (meta.clone(), key.clone());
            async move { Ok(meta.get(&key).await?.is_none()) }
        })
        .await?;

        // Restarted on the same data: registered again, its replicas ONLINE again.
        cluster.restart_server(1).await?;
        assert!(cluster.meta.get(&node_key).await?.is_some());
        let layout = Layout::new(DEFAULT_ROOT);
        let replica_keys: Vec<String> = (0..2)
            .map(|p| layout.replica("s", report.version, p, "server-1"))
            .collect();
        wait_until(Duration::from_secs(20), "server-1 ONLINE again", || {
            let (meta, keys) = (meta.clone(), replica_keys.clone());
            async move {
                for key in keys {
                    let Some(kv) = meta.get(&key).await? else {
                        return Ok(false);
                    };
                    let record: rialto_protocol::meta::ReplicaRecord =
                        serde_json::from_slice(&kv.value)?;
                    if record.state != rialto_protocol::meta::ReplicaState::Online {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await?;
        // Server 0 now fails every read: the restarted server answers them all.
        cluster.faults(0).set_error_rate(1.0);
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match read_all().await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Some(e) = last {
            return Err(e.context("reads with server 0 failing and server 1 restarted"));
        }
        let failed = cluster.server(0).map(|s| {
            s.metrics()
                .faults_failed
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        cluster.faults(0).clear();
        eprintln!("server 0 failed {failed:?} reads on purpose");
        cluster.shutdown().await
    }

    /// A test that fails with servers running must not crash the process at exit: dropping the
    /// cluster stops the servers before the services.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[should_panic(expected = "deliberate early failure")]
    async fn a_test_failing_with_servers_running_exits_cleanly() {
        let cluster = Cluster::start(2).await.expect("cluster");
        cluster
            .create_string_store("s", 2, 1, 100, 10)
            .await
            .expect("store");
        let _client = cluster.client("s").await.expect("client");
        panic!("deliberate early failure");
    }
}
