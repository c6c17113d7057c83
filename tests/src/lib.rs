//! Whole-cluster test harness: real etcd, real Kafka-protocol broker (tansu), an in-process
//! controller and N in-process storage servers that can be stopped and restarted.
//!
//! ```text
//! let cluster = Cluster::start(3).await?;          // etcd + tansu + controller + 3 servers
//! cluster.create_store("s", KEY, VALUE, 8, 2).await?;
//! let report = cluster.push_json("s", &path).await?;
//! let client = cluster.client("s").await?;
//! cluster.stop_server(1).await?; cluster.restart_server(1).await?;
//! ```
//!
//! External services are started with `scripts/services.sh` on free 127.0.0.1 ports inside a
//! temporary folder, and stopped by PID when the harness is dropped.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rialto_backends::etcd::EtcdMetaStore;
use rialto_backends::kafka::{KafkaConfig, KafkaPubSub};
use rialto_backends::{MetaStore, PubSub};
use rialto_controller::{AdminClient, ControllerConfig, RunningController};
use rialto_fast_client::{Client, ClientConfig};
use rialto_protocol::admin::CreateStoreRequest;
use rialto_protocol::meta::{StorageProfile, DEFAULT_ROOT};
use rialto_push::{PushConfig, PushReport};
use rialto_server::{RunningServer, ServerConfig};

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

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// etcd and tansu, started by `scripts/services.sh` in a temporary folder.
pub struct Services {
    dir: tempfile::TempDir,
    pub etcd_endpoint: String,
    pub kafka_bootstrap: String,
}

impl Services {
    pub fn start() -> Result<Services> {
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
            etcd_endpoint: format!("http://127.0.0.1:{etcd}"),
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
}

/// A whole cluster for a test.
pub struct Cluster {
    pub services: Services,
    pub meta: Arc<dyn MetaStore>,
    pub pubsub: Arc<dyn PubSub>,
    pub controller: Option<RunningController>,
    servers: Vec<ServerSlot>,
    tls_ca_pem: Option<Vec<u8>>,
    data: tempfile::TempDir,
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
            cert_pem: cert_path,
            key_pem: key_path,
        },
        cert_pem.into_bytes(),
    ))
}

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
        init_logging();
        let services = Services::start()?;
        let meta: Arc<dyn MetaStore> = Arc::new(
            EtcdMetaStore::connect(
                std::slice::from_ref(&services.etcd_endpoint),
                Duration::from_secs(10),
            )
            .await?,
        );
        let pubsub: Arc<dyn PubSub> = Arc::new(KafkaPubSub::new(KafkaConfig {
            bootstrap_servers: services.kafka_bootstrap.clone(),
        })?);
        let data = tempfile::Builder::new().prefix("rialto-data-").tempdir()?;
        let controller = rialto_controller::start(
            ControllerConfig {
                controller_id: "controller-1".into(),
                listen: "127.0.0.1:0".parse()?,
                meta_root: DEFAULT_ROOT.into(),
                kafka_bootstrap: services.kafka_bootstrap.clone(),
                lease_ttl_s: 10,
            },
            meta.clone(),
            pubsub.clone(),
        )
        .await?;
        let tls_files = if tls {
            Some(write_self_signed_cert(data.path())?)
        } else {
            None
        };
        let mut cluster = Cluster {
            services,
            meta,
            pubsub,
            controller: Some(controller),
            servers: Vec::new(),
            tls_ca_pem: tls_files.as_ref().map(|(_, ca)| ca.clone()),
            data,
        };
        for i in 0..server_count {
            let config = ServerConfig {
                node_id: format!("server-{i}"),
                zone: ZONES[i % ZONES.len()].to_string(),
                listen: "127.0.0.1:0".parse()?,
                advertise_host: "127.0.0.1".into(),
                data_dir: cluster.data.path().join(format!("server-{i}")),
                meta_root: DEFAULT_ROOT.into(),
                lease_ttl_s: 10,
                tls: tls_files.as_ref().map(|(files, _)| files.clone()),
                batch_get_keys_max: rialto_protocol::wire::BATCH_GET_KEYS_MAX,
            };
            cluster.servers.push(ServerSlot {
                config,
                running: None,
            });
            cluster.restart_server(i).await?;
        }
        cluster.wait_for_nodes(server_count).await?;
        Ok(cluster)
    }

    /// The controller's admin URL.
    pub fn controller_url(&self) -> String {
        let addr = self
            .controller
            .as_ref()
            .map(|c| c.address())
            .expect("controller stopped");
        format!("http://{addr}")
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(self.controller_url())
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

    /// Stops server `i` cleanly (its lease is revoked, its replicas vanish from etcd).
    pub async fn stop_server(&mut self, i: usize) -> Result<()> {
        if let Some(s) = self.servers[i].running.take() {
            s.shutdown().await?;
        }
        Ok(())
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

    /// Creates a store through the admin API.
    pub async fn create_store(
        &self,
        name: &str,
        key_schema: &str,
        value_schema: &str,
        partition_count: u32,
        replication_factor: u32,
    ) -> Result<()> {
        self.admin()
            .create_store(&CreateStoreRequest {
                name: name.into(),
                owner: "tests".into(),
                key_schema: key_schema.into(),
                value_schema: value_schema.into(),
                partition_count,
                replication_factor,
                storage: StorageProfile::OnDisk,
            })
            .await?;
        Ok(())
    }

    /// Pushes a file through the real push job (in-process).
    pub async fn push(
        &self,
        store: &str,
        input: &Path,
    ) -> Result<PushReport, rialto_push::PushError> {
        let mut config = PushConfig::new(&self.controller_url(), store, input);
        config.wait_timeout = Duration::from_secs(180);
        rialto_push::push(&config).await
    }

    /// The CA certificate (PEM) that clients trust when servers run TLS.
    pub fn tls_ca_pem(&self) -> Option<&[u8]> {
        self.tls_ca_pem.as_deref()
    }

    /// A fast client of `store` (trusting the cluster's certificate when servers run TLS).
    pub async fn client(&self, store: &str) -> Result<Client> {
        let mut config = ClientConfig::new(store);
        config.routing_wait = Duration::from_secs(10);
        config.tls = self
            .tls_ca_pem
            .as_ref()
            .map(|pem| rialto_fast_client::ClientTls {
                ca_cert_pem: pem.clone(),
                server_name: None,
            });
        Ok(Client::connect(config, self.meta.clone()).await?)
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
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a newline-delimited JSON dataset of `count` records `{"key": "key-<i>", "value": …}`,
/// where `value(i)` gives each value as JSON.
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

/// The key of record `i` in generated datasets.
pub fn key_of(i: usize) -> String {
    format!("key-{i:07}")
}
