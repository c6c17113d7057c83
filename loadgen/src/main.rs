//! `rialto-loadgen`: creates and reads Rialto stores through `fast-client`.
//!
//! * `prepare`: creates a store (if missing) and fills it with N keys of V-byte values through a
//!   real push ([`prepare`]); keys are `key-{i:09}`, so `run` derives them from their index.
//! * `run`: an open-loop workload at a fixed rate for a fixed time — single gets, batch-gets or
//!   streaming batch-gets — with coordinated-omission-corrected latency percentiles, throughput,
//!   fanout and retry counters, printed and optionally written as JSON ([`run`], [`report`]).
//! * `freshness`: real-time writes to a hybrid store at a fixed rate, and the time each takes to
//!   become readable ([`freshness`]).
//! * `get` (one key, printed as JSON) and `verify` (read back every record of a dataset with
//!   batch-gets and compare it with the input through [`oracle`], not through the push job's
//!   code).

mod dataset;
mod freshness;
mod prepare;
mod produce;
mod report;
mod run;
mod schedule;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rialto_backends::etcd::EtcdMetaStore;
use rialto_backends::remote::{gateway_address, RemoteMetaStore};
use rialto_backends::MetaStore;
use rialto_controller::{ClientTlsFiles, ControllerTlsArgs};
use rialto_fast_client::{Client, ClientConfig};
use rialto_loadgen::verify::{store_codecs, verify};
use rialto_protocol::meta::DEFAULT_ROOT;

use crate::run::parse_duration;
use crate::workload::Mode;

/// Create, fill and read Rialto stores through the fast client.
#[derive(Parser)]
#[command(name = "rialto-loadgen", version)]
struct Args {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "RIALTO_ETCD",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// Cluster root in etcd.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: String,
    /// TLS: `--tls-ca-cert` is the cluster's CA (controller and storage servers), `--tls-cert`/`--tls-key`
    /// this caller's identity for servers that require client certificates.
    #[command(flatten)]
    tls: ControllerTlsArgs,
    #[command(flatten)]
    etcd_tls: rialto_security::tls::EtcdTlsArgs,
    /// Threads of the client's runtime (default: one per core). With the servers on the same
    /// cores, one thread answered closed-loop single gets faster and with less CPU a get: no
    /// wake-ups between threads (benches/README).
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..=1024))]
    worker_threads: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reads one key (given as JSON, e.g. '"key-1"') and prints its value as JSON.
    Get {
        #[arg(long)]
        store: String,
        #[arg(long)]
        key: String,
    },
    /// Reads back every record of a dataset (an Avro container file, or newline-delimited JSON)
    /// and compares each value with the input through a path independent of the push job: an
    /// Avro file's own datum bytes, or the JSON line as `serde_json` reads it.
    Verify {
        #[arg(long)]
        store: String,
        #[arg(long)]
        input: PathBuf,
        /// Keys per batch-get.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Creates the store if missing and pushes N records of V-byte values (keys `key-{i:09}`),
    /// unless its current version already holds N records.
    Prepare(prepare::PrepareArgs),
    /// Measures the broker's own produce rate with the push job's Kafka client and settings
    /// (no push job, no etcd): what a push's produce phase is compared against.
    Produce(produce::ProduceArgs),
    /// Drives an open-loop workload at a fixed rate (or closed-loop callers) and reports
    /// throughput and latency.
    Run {
        #[arg(long)]
        store: String,
        /// What each request is.
        #[arg(long, value_enum, default_value_t = Mode::Batch)]
        mode: Mode,
        /// Requests per second (across all tasks), sent on schedule whatever the completions.
        #[arg(long, required_unless_present = "closed_loop")]
        rate: Option<f64>,
        /// Instead of a rate: each task is a caller that sends its next request when its previous
        /// one finished (as `redis-benchmark`'s clients do); latency is from each request's
        /// start, throughput what the callers get. `--max-in-flight` does not apply.
        #[arg(long, conflicts_with_all = ["rate", "max_requests"])]
        closed_loop: bool,
        /// How long to send measured requests (30, 30s, 500ms, 2m).
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Unmeasured requests at the same rate before the measured ones.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        warmup: Duration,
        /// Most measured requests (the run ends at whichever of duration and count comes first).
        #[arg(long)]
        max_requests: Option<u64>,
        /// Key space: keys are drawn uniformly from key-0 … key-(N-1) (the `prepare --keys`).
        #[arg(long)]
        keys: u64,
        /// Keys per batch-get (batch, stream and compute modes).
        #[arg(long, default_value_t = 5000)]
        batch_keys: usize,
        /// Compute mode: length of the query vector of the dot product over the values'
        /// `embedding` field (`prepare --embedding-dims`).
        #[arg(long, default_value_t = 256)]
        embedding_dims: usize,
        /// Client tasks sharing the schedule.
        #[arg(long, default_value_t = 4)]
        tasks: usize,
        /// Separate Client instances (task t uses client t mod C).
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// Most requests in flight; beyond, sends wait (and the wait counts as latency).
        #[arg(long, default_value_t = 10_000)]
        max_in_flight: usize,
        /// Seed of the key choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Deadline of one request (the client's `request_timeout`); in-flight requests at the
        /// end are awaited this long.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        request_timeout: Duration,
        /// Disable smart long-tail retry.
        #[arg(long)]
        no_long_tail_retry: bool,
        /// Disable group-based routing.
        #[arg(long)]
        no_group_routing: bool,
        /// Most keys per batch-get sub-request (the client's `sub_request_keys_max`).
        #[arg(long, default_value_t = rialto_fast_client::SUB_REQUEST_KEYS_MAX)]
        sub_request_keys: usize,
        /// Bytes of receive memory the client keeps for reuse (its `receive_pool_bytes`; 0: none).
        #[arg(long, default_value_t = rialto_fast_client::RECEIVE_POOL_BYTES)]
        receive_pool_bytes: usize,
        /// Do not verify values' checksums (to measure what verifying costs).
        #[arg(long)]
        no_verify_checksums: bool,
        /// Send every single get as its own request (the client's `coalesce_gets` off).
        #[arg(long)]
        no_coalesce_gets: bool,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Writes new keys to a hybrid store (string keys and values) at a fixed rate and measures
    /// how long each takes to become readable.
    Freshness {
        #[arg(long)]
        store: String,
        /// Admin API of a controller (the writer learns the broker from it).
        #[arg(
            long,
            default_value = "http://127.0.0.1:7070",
            env = "RIALTO_CONTROLLER"
        )]
        controller: String,
        /// Writes per second.
        #[arg(long)]
        rate: f64,
        #[arg(long, value_parser = parse_duration, default_value = "20s")]
        duration: Duration,
        #[arg(long, default_value_t = 100)]
        value_bytes: usize,
        /// Pause between the reader's passes over the keys not yet seen.
        #[arg(long, value_parser = parse_duration, default_value = "5ms")]
        poll_interval: Duration,
        /// How long after the last write a key may still appear before it counts as lost.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        settle: Duration,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    rialto_backends::runtime::multi_thread(args.worker_threads)
        .context("starting the async runtime")?
        .block_on(run_command(args))
}

async fn run_command(args: Args) -> Result<()> {
    let default_filter = match args.command {
        Command::Prepare(_) => "warn,rialto_push=info",
        Command::Produce(_) => "warn,rialto_loadgen=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let tls = args.tls.files()?;
    if let Command::Prepare(prepare) = args.command {
        return prepare::prepare(&prepare, tls.as_ref()).await;
    }
    if let Command::Produce(produce) = args.command {
        return produce::produce(&produce).await;
    }
    let meta: Arc<dyn MetaStore> = match args.etcd.as_slice() {
        // An embedded cluster's gateway (`rialto-local serve`).
        [one] if gateway_address(one).is_some() => Arc::new(RemoteMetaStore::new(
            gateway_address(one).unwrap_or_default(),
        )),
        endpoints => Arc::new(
            EtcdMetaStore::connect_tls(
                endpoints,
                Duration::from_secs(10),
                args.etcd_tls.files()?.as_ref(),
            )
            .await
            .with_context(|| format!("connect to etcd at {}", endpoints.join(",")))?,
        ),
    };
    match args.command {
        Command::Prepare(_) | Command::Produce(_) => unreachable!("handled above"),
        Command::Get { store, key } => {
            let client = connect(&args.root, &store, meta.clone(), tls.as_ref()).await?;
            let codecs = store_codecs(meta.as_ref(), &args.root, &store).await?;
            let key = codecs
                .key
                .from_json_text(&key, "key")
                .context("--key must be the key as JSON, e.g. '\"member-1\"'")?;
            match client.get_raw(&codecs.key.encode(&key, "key")?).await? {
                Some(raw) => println!("{}", codecs.show(&raw)?),
                None => println!("(no value for this key)"),
            }
        }
        Command::Verify {
            store,
            input,
            batch,
        } => {
            let client = connect(&args.root, &store, meta.clone(), tls.as_ref()).await?;
            let codecs = store_codecs(meta.as_ref(), &args.root, &store).await?;
            verify(&client, &codecs, &input, batch.max(1)).await?;
        }
        Command::Freshness {
            store,
            controller,
            rate,
            duration,
            value_bytes,
            poll_interval,
            settle,
            json,
        } => {
            let client = connect(&args.root, &store, meta.clone(), tls.as_ref()).await?;
            let report = freshness::run(
                &freshness::FreshnessConfig {
                    controller_url: controller,
                    store,
                    rate,
                    duration,
                    value_bytes,
                    poll_interval,
                    settle,
                    batch_keys: 5000,
                    controller_tls: tls.clone(),
                },
                &client,
            )
            .await?;
            println!("{report}");
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("write {}", path.display()))?;
            }
            if report.lost > 0 {
                bail!("{} writes never became readable", report.lost);
            }
        }
        Command::Run {
            store,
            mode,
            rate,
            closed_loop: _,
            duration,
            warmup,
            max_requests,
            keys,
            batch_keys,
            embedding_dims,
            tasks,
            clients,
            max_in_flight,
            seed,
            request_timeout,
            no_long_tail_retry,
            no_group_routing,
            sub_request_keys,
            receive_pool_bytes,
            no_verify_checksums,
            no_coalesce_gets,
            json,
        } => {
            let report = run::run(
                run::RunArgs {
                    root: args.root.clone(),
                    tls: client_tls(tls.as_ref())?,
                    store,
                    mode,
                    rate,
                    duration,
                    warmup,
                    max_requests,
                    key_space: keys,
                    batch_keys,
                    embedding_dims,
                    tasks,
                    clients,
                    max_in_flight,
                    seed,
                    request_timeout,
                    long_tail_retry: !no_long_tail_retry,
                    group_routing: !no_group_routing,
                    sub_request_keys,
                    receive_pool_bytes,
                    verify_checksums: !no_verify_checksums,
                    coalesce_gets: !no_coalesce_gets,
                    json,
                },
                meta.clone(),
            )
            .await?;
            if report.keys.wrong_values > 0 {
                bail!(
                    "{} values did not belong to their key",
                    report.keys.wrong_values
                );
            }
            if report.keys.compute_errors > 0 {
                bail!(
                    "{} keys' computations failed (is --embedding-dims the length `prepare --embedding-dims` gave the stored vectors?)",
                    report.keys.compute_errors
                );
            }
        }
    }
    Ok(())
}

async fn connect(
    root: &str,
    store: &str,
    meta: Arc<dyn MetaStore>,
    tls: Option<&ClientTlsFiles>,
) -> Result<Client> {
    let mut config = ClientConfig::new(store);
    config.meta_root = root.to_string();
    config.tls = client_tls(tls)?;
    Ok(Client::connect(config, meta).await?)
}

/// The fast client's TLS settings from the `--tls-*` files.
fn client_tls(tls: Option<&ClientTlsFiles>) -> Result<Option<rialto_fast_client::ClientTls>> {
    let Some(files) = tls else { return Ok(None) };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    Ok(Some(rialto_fast_client::ClientTls {
        ca_cert_pem: read(&files.ca)?,
        server_name: None,
        identity: match &files.identity {
            Some((cert, key)) => Some(rialto_fast_client::ClientIdentity {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            }),
            None => None,
        },
    }))
}
