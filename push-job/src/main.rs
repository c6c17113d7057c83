//! `rialto-push`: pushes a dataset file as a new version of a store.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rialto_push::{push, InputFormat, InputShape, PushConfig, SortConfig};

/// Push a dataset (Avro container file or newline-delimited JSON) as a new store version.
#[derive(Parser)]
#[command(name = "rialto-push", version)]
struct Args {
    /// Controller admin URL.
    #[arg(
        long,
        env = "RIALTO_CONTROLLER",
        default_value = "http://127.0.0.1:7070"
    )]
    controller: String,
    /// Store to push to.
    #[arg(long)]
    store: String,
    /// Input file: `.avro` container file, or `.json`/`.jsonl` with one {"key":…,"value":…} per line.
    #[arg(long)]
    input: PathBuf,
    /// Input format, when the extension does not tell.
    #[arg(long, value_enum)]
    format: Option<InputFormat>,
    /// Name of the key field in each input record.
    #[arg(long, default_value = "key")]
    key_field: String,
    /// Name of the value field in each input record.
    #[arg(long, default_value = "value")]
    value_field: String,
    /// Seconds to wait for the version to go live after producing.
    #[arg(long, default_value_t = 600)]
    wait_timeout_s: u64,
    /// Kafka bootstrap servers, overriding what the controller says.
    #[arg(long)]
    kafka: Option<String>,
    /// Memory for sorting the input, in MiB; larger inputs spill sorted runs to disk.
    #[arg(long, default_value_t = rialto_push::sort::DEFAULT_SORT_MEMORY_BYTES / (1024 * 1024))]
    sort_memory_mib: usize,
    /// Where the sort spills (default: the system's temporary directory).
    #[arg(long)]
    spill_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = PushConfig::new(&args.controller, &args.store, &args.input);
    config.format = args.format;
    config.shape = InputShape {
        key_field: args.key_field,
        value_field: args.value_field,
    };
    config.wait_timeout = Duration::from_secs(args.wait_timeout_s);
    config.kafka_bootstrap = args.kafka;
    config.sort = SortConfig {
        memory_bytes: args.sort_memory_mib * 1024 * 1024,
        spill_dir: args.spill_dir,
    };
    match push(&config).await {
        Ok(r) => {
            println!(
                "pushed {} records ({} bytes, {} partitions) to {} version {}: read and sorted {:.1?} ({} spills), produced {:.1?}, live after {:.1?}",
                r.records, r.bytes, r.partitions, r.store, r.version, r.read_elapsed, r.sort_spills, r.produce_elapsed, r.live_elapsed
            );
            if r.chunked_values > 0 {
                println!(
                    "{} values larger than one topic record were stored in chunks",
                    r.chunked_values
                );
            }
            if r.compression != rialto_protocol::meta::Compression::None {
                println!(
                    "values compressed with {}: {} bytes → {} bytes ({:.2}×), dictionary {} bytes trained in {:.1?}",
                    r.compression.name(),
                    r.raw_value_bytes,
                    r.compressed_value_bytes,
                    r.raw_value_bytes as f64 / r.compressed_value_bytes.max(1) as f64,
                    r.dictionary_bytes,
                    r.training_elapsed
                );
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("push failed: {e}");
            std::process::exit(1);
        }
    }
}
