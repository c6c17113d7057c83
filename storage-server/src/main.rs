//! `rialto-server`: the storage server binary. Parses flags, connects etcd and Kafka, and runs
//! the library's server until ctrl-c.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rialto_backends::etcd::EtcdMetaStore;
use rialto_backends::kafka::{KafkaConfig, KafkaPubSub};
use rialto_protocol::meta::DEFAULT_ROOT;
use rialto_protocol::wire::BATCH_GET_KEYS_MAX;
use rialto_server::{
    ConnectionLimits, FaultConfig, ServerConfig, TlsFiles, DEFAULT_ADVERTISE_HOST,
    DEFAULT_BLOCK_CACHE_BYTES, DEFAULT_LEASE_TTL_S,
};

/// How long to wait for etcd at start-up.
const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Rialto storage server: ingests assigned version topics into RocksDB, serves reads over HTTP/2.
#[derive(Debug, Parser)]
#[command(name = "rialto-server", version)]
struct Cli {
    /// Stable node id (keep it across restarts so the node keeps its replicas).
    #[arg(long, env = "RIALTO_NODE_ID")]
    node_id: String,
    /// Availability zone of this node.
    #[arg(long, default_value = "zone-a")]
    zone: String,
    /// Address of the HTTP/2 read endpoint (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Host clients use to reach this node (put in the node record).
    #[arg(long, default_value = DEFAULT_ADVERTISE_HOST)]
    advertise_host: String,
    /// Directory of the replica databases.
    #[arg(long)]
    data_dir: PathBuf,
    /// Root prefix of the cluster in etcd.
    #[arg(long, default_value = DEFAULT_ROOT)]
    meta_root: String,
    /// TTL of the registration lease, in seconds.
    #[arg(long, default_value_t = DEFAULT_LEASE_TTL_S)]
    lease_ttl_s: i64,
    /// A librdkafka property for the broker's TLS and SASL settings, KEY=VALUE (repeatable),
    /// e.g. `security.protocol=SASL_SSL`; see the README's security section.
    #[arg(long = "kafka-option", value_parser = rialto_backends::kafka::parse_option)]
    kafka_options: Vec<(String, String)>,
    /// Connections served at once (more wait in the accept queue).
    #[arg(long, default_value_t = ConnectionLimits::default().connections_max as u64, value_parser = clap::value_parser!(u64).range(1..))]
    connections_max: u64,
    /// Seconds a connection with no request in progress stays open.
    #[arg(long, default_value_t = ConnectionLimits::default().idle_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_seconds: u64,
    /// Seconds a request body may take to arrive after its headers.
    #[arg(long, default_value_t = ConnectionLimits::default().body_read_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    body_read_timeout_seconds: u64,
    /// Seconds a response may wait for the client to read (grant flow-control window) before
    /// it is reset.
    #[arg(long, default_value_t = ConnectionLimits::default().send_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    send_timeout_seconds: u64,
    #[command(flatten)]
    etcd_tls: rialto_security::tls::EtcdTlsArgs,
    /// TLS certificate chain (PEM); with --tls-key enables TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that must have signed every client's certificate: requires mutual
    /// TLS, and callers are named by their certificates.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Check every read against the ACLs in etcd (`read` on its store; default deny). Needs
    /// --tls-client-ca.
    #[arg(long, requires = "tls_client_ca")]
    authorize: bool,
    /// Most keys accepted in one batch-get.
    #[arg(long, default_value_t = BATCH_GET_KEYS_MAX)]
    batch_get_keys_max: usize,
    /// Size of the block cache shared by the on-disk stores' replicas, in MiB.
    #[arg(long, default_value_t = DEFAULT_BLOCK_CACHE_BYTES / (1024 * 1024))]
    block_cache_mib: usize,
    /// Seconds between two measurements of the ONLINE replicas' bytes on disk and in memory
    /// (`mincore` on in-memory stores' files: what the kernel still holds after warming).
    #[arg(long, default_value_t = rialto_server::usage::DEFAULT_USAGE_REFRESH.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    usage_refresh_secs: u64,
    /// Lock in-memory stores' data in memory (mlock) when they go ONLINE, so the kernel cannot
    /// evict it. Needs a large enough RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity) or
    /// CAP_IPC_LOCK, and memory for every version served and pushed at once.
    #[arg(long)]
    lock_in_memory_stores: bool,
    /// Longest time (ms) the broker may hold a fetch of a hybrid replica's real-time consumers:
    /// lower is fresher, higher fetches less often when idle.
    #[arg(long, default_value_t = rialto_server::hybrid::DEFAULT_REALTIME_FETCH_WAIT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    realtime_fetch_wait_ms: u64,
    /// Most reads (gets and batch-gets) in flight at once; one more is answered `overloaded`
    /// before any work is done, and the client tries another replica.
    #[arg(long, default_value_t = rialto_server::limits::IN_FLIGHT_MAX_DEFAULT as u64, value_parser = clap::value_parser!(u64).range(1..))]
    read_in_flight_max: u64,
    /// Threads that serve reads and drive ingestion (default: one per core). For several
    /// servers sharing a machine's cores: three servers on 2 cores with one thread each
    /// answered single gets 7–17 % faster (p50) and large batch-gets slower, since a server's
    /// share of a batch-get runs as parallel sub-requests (benches/README).
    #[arg(long, env = "RIALTO_WORKER_THREADS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    worker_threads: Option<u64>,
    /// etcd endpoints, comma separated.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka: String,
    /// For tests and benchmarks only: delay every read request (get, batch-get) by this many
    /// milliseconds before answering it.
    #[arg(long, default_value_t = 0)]
    fault_delay_ms: u64,
    /// For tests and benchmarks only: fail this fraction (0.0 to 1.0) of read requests with a
    /// retryable `overloaded` error.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    fault_error_rate: f64,
    /// For tests and benchmarks only: follow this file's fault settings while running
    /// (`{"delay_ms": 200, "error_rate": 0.0}`; a missing file means no faults).
    #[arg(long)]
    fault_file: Option<PathBuf>,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        Ok(rate) => Err(format!("{rate} is not between 0.0 and 1.0")),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    rialto_backends::runtime::multi_thread(cli.worker_threads)
        .context("starting the async runtime")?
        .block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let tls = match (cli.tls_cert, cli.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: cli.tls_client_ca,
        }),
        _ => None,
    };
    let config = ServerConfig {
        node_id: cli.node_id,
        zone: cli.zone,
        listen: cli.listen,
        advertise_host: cli.advertise_host,
        data_dir: cli.data_dir,
        meta_root: cli.meta_root,
        lease_ttl_s: cli.lease_ttl_s,
        tls,
        authorize: cli.authorize,
        batch_get_keys_max: cli.batch_get_keys_max,
        block_cache_bytes: cli.block_cache_mib * 1024 * 1024,
        faults: FaultConfig {
            delay: Duration::from_millis(cli.fault_delay_ms),
            error_rate: cli.fault_error_rate,
        },
        usage_refresh: Duration::from_secs(cli.usage_refresh_secs),
        lock_in_memory_stores: cli.lock_in_memory_stores,
        realtime_fetch_wait: Duration::from_millis(cli.realtime_fetch_wait_ms),
        read_in_flight_max: usize::try_from(cli.read_in_flight_max).unwrap_or(usize::MAX),
        connection_limits: ConnectionLimits {
            connections_max: usize::try_from(cli.connections_max).unwrap_or(usize::MAX),
            idle_timeout: Duration::from_secs(cli.idle_timeout_seconds),
            body_read_timeout: Duration::from_secs(cli.body_read_timeout_seconds),
            send_timeout: Duration::from_secs(cli.send_timeout_seconds),
        },
        network: rialto_backends::Network::Os,
    };
    let meta = EtcdMetaStore::connect_tls(
        &cli.etcd,
        ETCD_CONNECT_TIMEOUT,
        cli.etcd_tls.files()?.as_ref(),
    )
    .await
    .with_context(|| format!("connecting to etcd at {}", cli.etcd.join(",")))?;
    let pubsub = KafkaPubSub::new(KafkaConfig {
        bootstrap_servers: cli.kafka.clone(),
        options: cli.kafka_options.clone(),
    })
    .with_context(|| format!("creating the Kafka client for {}", cli.kafka))?;
    let server = rialto_server::start(config, Arc::new(meta), Arc::new(pubsub))
        .await
        .context("starting the storage server")?;
    if let Some(path) = cli.fault_file {
        tracing::warn!(path = %path.display(), "fault injection follows a file: reads may be delayed or failed on purpose");
        tokio::spawn(rialto_server::faults::follow_file(path, server.faults()));
    }
    tracing::info!(address = %server.address(), "serving; press ctrl-c to stop");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    tracing::info!("shutting down");
    server.shutdown().await.context("shutting down")?;
    Ok(())
}
