//! `rialto-controller`: runs one controller (admin API + leader election + reconcile loop) against
//! etcd and Kafka until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rialto_backends::etcd::EtcdMetaStore;
use rialto_backends::kafka::{KafkaConfig, KafkaPubSub};
use rialto_controller::rebalance::{MOVES_MAX_DEFAULT, REBALANCE_DELAY_DEFAULT};
use rialto_controller::{
    start, ControllerConfig, RebalanceConfig, ServerTlsFiles, TopicDeletion, LEASE_TTL_S_DEFAULT,
    PUSH_TIMEOUT_DEFAULT,
};
use rialto_protocol::meta::DEFAULT_ROOT;

/// How long to wait for etcd at start-up.
const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The Rialto controller.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Unique id of this controller (defaults to controller-<pid>).
    #[arg(long, env = "RIALTO_CONTROLLER_ID")]
    id: Option<String>,
    /// Address of the admin API.
    #[arg(
        long,
        default_value = "127.0.0.1:7070",
        env = "RIALTO_CONTROLLER_LISTEN"
    )]
    listen: SocketAddr,
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        default_value = "http://127.0.0.1:2379",
        env = "RIALTO_ETCD",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// Kafka bootstrap servers (host:port[,host:port]).
    #[arg(long, default_value = "127.0.0.1:9092", env = "RIALTO_KAFKA")]
    kafka: String,
    /// A librdkafka property for the broker's TLS and SASL settings, KEY=VALUE (repeatable),
    /// e.g. `security.protocol=SASL_SSL`; see the README's security section.
    #[arg(long = "kafka-option", value_parser = rialto_backends::kafka::parse_option)]
    kafka_options: Vec<(String, String)>,
    /// Root prefix of the cluster in etcd.
    #[arg(long, default_value = DEFAULT_ROOT, env = "RIALTO_META_ROOT")]
    meta_root: String,
    /// TTL of the leader lease in seconds.
    #[arg(long, default_value_t = LEASE_TTL_S_DEFAULT)]
    lease_ttl_s: i64,
    /// How long a storage node may be gone before its replicas are rebuilt on other nodes.
    #[arg(long, default_value_t = REBALANCE_DELAY_DEFAULT.as_secs())]
    rebalance_delay_seconds: u64,
    /// Most replica moves in flight at once, across the cluster.
    #[arg(long, default_value_t = MOVES_MAX_DEFAULT as u64, value_parser = clap::value_parser!(u64).range(1..))]
    rebalance_moves_max: u64,
    /// A version not live this many seconds after its push started is failed (0: never).
    #[arg(long, default_value_t = PUSH_TIMEOUT_DEFAULT.as_secs())]
    push_timeout_seconds: u64,
    /// When the topics of retired versions and deleted stores are deleted: `when-idle` waits
    /// until no replica fetches (tansu crashes the clients fetching during a deletion);
    /// `immediate` suits Apache Kafka.
    #[arg(long, value_enum, default_value_t = TopicDeletion::WhenIdle)]
    topic_deletion: TopicDeletion,
    /// Admin calls per second per caller (its certificate's principal, else its address);
    /// over it a call is answered 429 with Retry-After. 0: unlimited.
    #[arg(long, default_value_t = rialto_controller::throttle::CALLS_PER_SECOND_DEFAULT)]
    admin_calls_per_second: f64,
    /// Admin calls a caller may make at once above its rate.
    #[arg(long, default_value_t = rialto_controller::throttle::CALLS_BURST_DEFAULT)]
    admin_calls_burst: f64,
    #[command(flatten)]
    etcd_tls: rialto_security::tls::EtcdTlsArgs,
    /// TLS certificate chain (PEM) of the admin API; with --tls-key serves HTTPS.
    #[arg(long, requires = "tls_key", env = "RIALTO_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert", env = "RIALTO_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// CA certificate (PEM) that must have signed every caller's certificate (mutual TLS);
    /// callers are named by their certificates.
    #[arg(long, requires = "tls_cert", env = "RIALTO_TLS_CLIENT_CA")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Check every admin call against the ACLs in etcd (default deny). Needs --tls-client-ca.
    #[arg(long, requires = "tls_client_ca")]
    authorize: bool,
    /// A principal granted cluster `admin` in etcd when this controller starts (as `rialto-admin
    /// acl grant --cluster` would; a later revoke holds until the next start); repeatable.
    #[arg(long = "admin-principal")]
    admin_principals: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let meta = EtcdMetaStore::connect_tls(
        &args.etcd,
        ETCD_CONNECT_TIMEOUT,
        args.etcd_tls.files()?.as_ref(),
    )
    .await
    .with_context(|| format!("connecting to etcd at {}", args.etcd.join(",")))?;
    let pubsub = KafkaPubSub::new(KafkaConfig {
        bootstrap_servers: args.kafka.clone(),
        options: args.kafka_options.clone(),
    })
    .with_context(|| format!("creating the Kafka client for {}", args.kafka))?;
    let mut config = ControllerConfig {
        listen: args.listen,
        meta_root: args.meta_root,
        kafka_bootstrap: args.kafka,
        lease_ttl_s: args.lease_ttl_s,
        rebalance: RebalanceConfig {
            delay: Duration::from_secs(args.rebalance_delay_seconds),
            moves_max: usize::try_from(args.rebalance_moves_max).unwrap_or(usize::MAX),
        },
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| ServerTlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca,
            }),
        push_timeout: Duration::from_secs(args.push_timeout_seconds),
        topic_deletion: args.topic_deletion,
        call_rate: rialto_controller::CallRate {
            per_second: args.admin_calls_per_second,
            burst: args.admin_calls_burst,
        },
        authorize: args.authorize,
        admin_principals: args.admin_principals,
        network: rialto_backends::Network::Os,
        ..ControllerConfig::default()
    };
    if let Some(id) = args.id {
        config.controller_id = id;
    }
    let controller = start(config, Arc::new(meta), Arc::new(pubsub)).await?;
    println!("rialto-controller listening on {}", controller.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
        _ = term.recv() => {}
    }
    tracing::info!("signal received: shutting down (giving up leadership)");
    controller.shutdown().await?;
    Ok(())
}
