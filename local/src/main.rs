//! `rialto-local`: Rialto in one process (see the library docs). `rialto-local demo` runs the
//! main job: starts a cluster, creates a store, pushes a generated dataset, reads every record
//! back through the fast client and checks it against the input, then writes to a hybrid
//! store in real time and reads the writes back.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rialto_loadgen::verify::{store_codecs, verify};
use rialto_local::{LocalCluster, LocalOptions};
use rialto_protocol::admin::CreateStoreRequest;
use rialto_protocol::avro::Value;
use rialto_protocol::meta::{HybridConfig, DEFAULT_ROOT};

#[derive(Parser)]
#[command(
    name = "rialto-local",
    about = "Rialto in one process, on the in-memory backends"
)]
struct Args {
    /// Where the cluster keeps its metadata, topics and replicas, reused by the next run on
    /// the same directory (default: a temporary directory, removed at exit).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Storage servers to run.
    #[arg(long, default_value_t = 3, global = true)]
    servers: usize,
    /// Address of the admin API.
    #[arg(long, default_value = "127.0.0.1:0", global = true)]
    controller_listen: SocketAddr,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a cluster, push a generated dataset, read it all back, write to a hybrid store.
    Demo {
        /// Records in the generated dataset.
        #[arg(long, default_value_t = 20_000)]
        records: usize,
    },
    /// Run a cluster until interrupted, reachable from other processes: `rialto-admin
    /// --controller URL`, `rialto-push --controller URL` and `rialto-loadgen --etcd ENDPOINT`
    /// with the URL and endpoint it prints.
    Serve {
        /// Address of the gateway to the metadata store and broker (loopback only).
        #[arg(long, default_value = "127.0.0.1:0")]
        gateway_listen: SocketAddr,
    },
}

const DEMO_VALUE_SCHEMA: &str = r#"{"type":"record","name":"Recommendation","fields":[{"name":"member","type":"long"},{"name":"items","type":{"type":"array","items":"long"}},{"name":"score","type":"double"}]}"#;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rialto_push=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let temporary = tempfile::Builder::new().prefix("rialto-local-").tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    let mut options = LocalOptions::new(&data_dir);
    options.servers = args.servers;
    options.controller_listen = args.controller_listen;
    match args.command {
        Command::Demo { records } => demo(options, &data_dir, records).await,
        Command::Serve { gateway_listen } => {
            options.gateway_listen = Some(gateway_listen);
            serve(options, &data_dir).await
        }
    }
}

async fn serve(options: LocalOptions, data_dir: &Path) -> Result<()> {
    let servers = options.servers;
    let cluster = LocalCluster::start(options)
        .await
        .context("start the local cluster")?;
    println!("local: controller {}", cluster.controller_url());
    println!(
        "local: backends {} (the etcd endpoint and Kafka bootstrap of other processes)",
        cluster.gateway_endpoint().unwrap_or_default()
    );
    println!(
        "local: {servers} storage servers, data in {}; ready (Ctrl-C or SIGTERM stops)",
        data_dir.display()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    cluster.shutdown().await;
    println!("local: stopped");
    Ok(())
}

async fn demo(options: LocalOptions, data_dir: &Path, records: usize) -> Result<()> {
    let started = Instant::now();
    let servers = options.servers;
    let cluster = LocalCluster::start(options)
        .await
        .context("start the local cluster")?;
    let admin = cluster.admin();
    println!(
        "local: controller at {} and {servers} storage servers on the in-memory backends (data in {})",
        cluster.controller_url(),
        data_dir.display()
    );
    println!(
        "{}",
        rialto_controller::render::nodes(&admin.list_nodes().await?)
    );

    let demo = store_request("demo", DEMO_VALUE_SCHEMA, 8, 2.min(servers as u32));
    if create_store(&admin, &demo).await? {
        println!("local: created store demo (8 partitions, replication factor 2)");
    }
    let input = data_dir.join("demo.jsonl");
    write_dataset(&input, records)?;
    println!("local: pushing {records} records");
    let report = rialto_push::push(&cluster.push_config("demo", &input)).await?;
    println!(
        "local: version {} live: read and sorted in {:.2?}, produced in {:.2?}, live {:.2?} later",
        report.version, report.read_elapsed, report.produce_elapsed, report.live_elapsed
    );
    println!(
        "{}",
        rialto_controller::render::store_description(&admin.describe_store("demo").await?)
    );

    println!("local: reading every record back through the fast client");
    let client = cluster.client("demo").await?;
    let codecs = store_codecs(cluster.meta().as_ref(), DEFAULT_ROOT, "demo").await?;
    verify(&client, &codecs, &input, 1000).await?;
    let key = codecs
        .key
        .encode(&Value::String("member-42".into()), "key")?;
    match client.get_raw(&key).await? {
        Some(raw) => println!("local: get member-42 -> {}", codecs.show(&raw)?),
        None => bail!("member-42 is missing"),
    }

    hybrid(&cluster).await?;
    cluster.shutdown().await;
    println!("local: OK in {:.1?}", started.elapsed());
    Ok(())
}

/// A hybrid store with no push: real-time writes go live on its empty first version.
async fn hybrid(cluster: &LocalCluster) -> Result<()> {
    println!("\nlocal: a hybrid store: real-time writes, no push");
    let admin = cluster.admin();
    let mut feed = store_request("feed", r#""string""#, 4, 2);
    feed.hybrid = Some(HybridConfig {
        rewind_seconds: 3600,
        lag_records_max: 1000,
    });
    create_store(&admin, &feed).await?;
    wait_for(
        "the feed store's first version",
        Duration::from_secs(30),
        || async {
            Ok(admin
                .describe_store("feed")
                .await?
                .store
                .current_version
                .is_some())
        },
    )
    .await?;
    let mut writer = cluster.realtime_writer("feed").await?;
    let key = |k: &str| Value::String(k.into());
    writer
        .put(&key("member-42"), &Value::String("changed jobs".into()))
        .await?;
    writer
        .put(&key("member-7"), &Value::String("joined".into()))
        .await?;
    writer.delete(&key("member-7")).await?;
    let written = writer.close().await?;
    println!(
        "local: wrote {} puts and {} delete in real time",
        written.puts, written.deletes
    );
    let client = cluster.client("feed").await?;
    let changed = Some(Value::String("changed jobs".into()));
    wait_for("the real-time write", Duration::from_secs(30), || async {
        Ok(client.get(&key("member-42")).await? == changed)
    })
    .await?;
    println!("local: get member-42 from feed -> \"changed jobs\"");
    let deleted = client.get(&key("member-7")).await?;
    if deleted.is_some() {
        bail!("member-7 was deleted in real time, yet reads {deleted:?}");
    }
    println!("local: get member-7 from feed -> (deleted)");
    Ok(())
}

/// Creates a store unless the data directory already holds it (a demo run again on the same
/// `--data-dir`); returns whether it was created.
async fn create_store(
    admin: &rialto_controller::AdminClient,
    request: &CreateStoreRequest,
) -> Result<bool> {
    if let Ok(existing) = admin.describe_store(&request.name).await {
        println!(
            "local: store {} exists (current version {}), kept from an earlier run",
            request.name,
            existing
                .store
                .current_version
                .map_or("none".to_string(), |v| v.to_string())
        );
        return Ok(false);
    }
    admin.create_store(request).await?;
    Ok(true)
}

/// A store with string keys, stored on disk, uncompressed, without quotas.
fn store_request(
    name: &str,
    value_schema: &str,
    partition_count: u32,
    replication_factor: u32,
) -> CreateStoreRequest {
    CreateStoreRequest {
        name: name.into(),
        owner: "rialto-local".into(),
        key_schema: r#""string""#.into(),
        value_schema: value_schema.into(),
        partition_count,
        replication_factor,
        storage: Default::default(),
        compression: Default::default(),
        max_value_bytes: None,
        hybrid: None,
        read_quota_keys_per_s: None,
        storage_quota_bytes: None,
        versions_to_keep: None,
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match done().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "{what}: not yet"),
        }
        if Instant::now() >= deadline {
            bail!("{what} did not happen within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The demo dataset as JSON lines: member ids, three item ids, a score.
fn write_dataset(path: &Path, records: usize) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for i in 0..records {
        let line = serde_json::json!({
            "key": format!("member-{i}"),
            "value": {
                "member": i,
                "items": [i * 7 % 1000, i * 13 % 1000, i * 31 % 1000],
                "score": i as f64 / records as f64,
            }
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}
