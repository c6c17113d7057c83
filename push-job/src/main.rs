//! `rialto-push`: pushes a dataset file as a new version of a store, or streams real-time
//! writes to a hybrid store (`rialto-push stream`).

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use rialto_push::{
    parse_stream_line, push, InputFormat, InputShape, PushConfig, RealtimeConfig, RealtimeReport,
    RealtimeWriter, SortConfig,
};
use tokio::sync::mpsc;

/// How often a stream's progress is logged.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Lines read ahead of the writer.
const LINES_AHEAD: usize = 1024;

/// Push a dataset (Avro container file or newline-delimited JSON) as a new store version
/// (`rialto-push --store S --input FILE`), or stream real-time writes to a hybrid store
/// (`rialto-push stream --store S`).
#[derive(Parser)]
#[command(name = "rialto-push", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    push: PushArgs,
    #[command(flatten)]
    tls: rialto_controller::ControllerTlsArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Write puts and deletes to a hybrid store's real-time topic, from newline-delimited JSON:
    /// `{"key": …, "value": …}` is a put, `{"key": …, "delete": true}` a delete.
    Stream(StreamArgs),
}

/// A batch push (no subcommand).
#[derive(clap::Args)]
struct PushArgs {
    /// Controller admin URL.
    #[arg(
        long,
        env = "RIALTO_CONTROLLER",
        default_value = "http://127.0.0.1:7070"
    )]
    controller: String,
    /// Store to push to (required).
    #[arg(long)]
    store: Option<String>,
    /// Input file (required): `.avro` container file, or `.json`/`.jsonl` with one {"key":…,"value":…} per line.
    #[arg(long)]
    input: Option<PathBuf>,
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
    /// A librdkafka property for the broker's TLS and SASL settings, KEY=VALUE (repeatable),
    /// e.g. `security.protocol=SASL_SSL`; see the README's security section.
    #[arg(long = "kafka-option", value_parser = rialto_backends::kafka::parse_option)]
    kafka_options: Vec<(String, String)>,
    /// Memory for sorting the input, in MiB; larger inputs spill sorted runs to disk.
    #[arg(long, default_value_t = rialto_push::sort::DEFAULT_SORT_MEMORY_BYTES / (1024 * 1024))]
    sort_memory_mib: usize,
    /// Where the sort spills (default: the system's temporary directory).
    #[arg(long)]
    spill_dir: Option<PathBuf>,
    /// The registered value schema the values are written with (`rialto-admin schemas list`).
    /// Default: the latest for JSON lines; for an Avro file, the registered schema its writer
    /// schema is (values are resolved to the latest when it is none of them).
    #[arg(long)]
    value_schema_id: Option<u32>,
}

#[derive(clap::Args)]
struct StreamArgs {
    /// Hybrid store to write to.
    #[arg(long)]
    store: String,
    /// Newline-delimited JSON to read (default: standard input).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Controller admin URL.
    #[arg(
        long,
        env = "RIALTO_CONTROLLER",
        default_value = "http://127.0.0.1:7070"
    )]
    controller: String,
    /// Kafka bootstrap servers, overriding what the controller says.
    #[arg(long)]
    kafka: Option<String>,
    /// A librdkafka property for the broker's TLS and SASL settings, KEY=VALUE (repeatable),
    /// e.g. `security.protocol=SASL_SSL`; see the README's security section.
    #[arg(long = "kafka-option", value_parser = rialto_backends::kafka::parse_option)]
    kafka_options: Vec<(String, String)>,
    /// The registered value schema the values are written with (default: the latest).
    #[arg(long)]
    value_schema_id: Option<u32>,
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
    let tls = args.tls.files()?;
    match args.command {
        Some(Command::Stream(stream_args)) => stream(stream_args, tls).await,
        None => batch_push(args.push, tls).await,
    }
}

/// Exits with a usage error when a batch push misses a required argument.
fn require<T>(value: Option<T>, flag: &str) -> T {
    value.unwrap_or_else(|| {
        Args::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                format!("{flag} is required for a push (or use `rialto-push stream`)"),
            )
            .exit()
    })
}

async fn batch_push(
    args: PushArgs,
    tls: Option<rialto_controller::ClientTlsFiles>,
) -> anyhow::Result<()> {
    let store = require(args.store, "--store <STORE>");
    let input = require(args.input, "--input <INPUT>");
    let mut config = PushConfig::new(&args.controller, &store, &input);
    config.format = args.format;
    config.shape = InputShape {
        key_field: args.key_field,
        value_field: args.value_field,
    };
    config.wait_timeout = Duration::from_secs(args.wait_timeout_s);
    config.kafka_bootstrap = args.kafka;
    config.kafka_options = args.kafka_options;
    config.controller_tls = tls;
    config.value_schema_id = args.value_schema_id;
    config.sort = SortConfig {
        memory_bytes: args.sort_memory_mib * 1024 * 1024,
        spill_dir: args.spill_dir,
    };
    match push(&config).await {
        Ok(r) => {
            println!(
                "pushed {} records ({} bytes, {} partitions, value schema {}) to {} version {}: read and sorted {:.1?} ({} spills), produced {:.1?}, live after {:.1?}",
                r.records, r.bytes, r.partitions, r.value_schema_id, r.store, r.version, r.read_elapsed, r.sort_spills, r.produce_elapsed, r.live_elapsed
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

/// One input line: its number (from 1) and its text, or why it could not be read.
type Line = (u64, Result<String, String>);

/// Why a stream stopped before its end.
struct Stopped {
    line: u64,
    problem: String,
}

/// `rialto-push stream`: writes every line, then closes the writer. On the first bad line,
/// what was written before it is flushed and nothing after it is written.
async fn stream(
    args: StreamArgs,
    tls: Option<rialto_controller::ClientTlsFiles>,
) -> anyhow::Result<()> {
    let source = args
        .input
        .as_ref()
        .map_or_else(|| "standard input".to_string(), |p| p.display().to_string());
    let input = match open_input(args.input.as_deref()) {
        Ok(input) => input,
        Err(e) => {
            eprintln!("stream failed: {e:#}");
            std::process::exit(1);
        }
    };
    let config = RealtimeConfig {
        controller_url: args.controller,
        store: args.store,
        kafka_bootstrap: args.kafka,
        kafka_options: args.kafka_options,
        controller_tls: tls,
        value_schema_id: args.value_schema_id,
    };
    let mut writer = match RealtimeWriter::connect(&config).await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("stream failed: {e}");
            std::process::exit(1);
        }
    };
    let topic = writer.topic().to_string();
    let max = rialto_push::input::json_line_bytes_max(writer.max_value_bytes());
    let lines = match spawn_line_reader(input, max) {
        Ok(lines) => lines,
        Err(e) => {
            eprintln!("stream failed: {e:#}");
            std::process::exit(1);
        }
    };
    let stopped = write_lines(&mut writer, lines).await;
    let closed = writer.close().await;
    match (stopped, closed) {
        (None, Ok(report)) => {
            println!("{}", summary(&report, &topic));
            Ok(())
        }
        (None, Err(e)) => {
            eprintln!("stream failed: {e}");
            std::process::exit(1);
        }
        (Some(stopped), closed) => {
            match closed {
                Ok(report) => println!("before it: {}", summary(&report, &topic)),
                Err(e) => eprintln!("the writes before it may not all be written: {e}"),
            }
            eprintln!(
                "{source}: line {}: {}; nothing from this line on was written",
                stopped.line, stopped.problem
            );
            std::process::exit(1);
        }
    }
}

/// What a stream wrote, for people.
fn summary(r: &RealtimeReport, topic: &str) -> String {
    format!(
        "wrote {} and {} to {} of {topic} in {:.1?}",
        count(r.puts, "put"),
        count(r.deletes, "delete"),
        count(r.partitions.into(), "partition"),
        r.elapsed
    )
}

/// `n thing` or `n things`.
fn count(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// The stream's input: the file, or standard input.
fn open_input(input: Option<&std::path::Path>) -> anyhow::Result<Box<dyn BufRead + Send>> {
    Ok(match input {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    })
}

/// Reads the input on its own thread (standard input blocks), a bounded number of lines ahead,
/// each of at most `max` bytes. A plain thread, not `spawn_blocking`: a runtime waits for its
/// blocking tasks when it shuts down, and a read of an idle standard input never ends.
fn spawn_line_reader(
    mut reader: Box<dyn BufRead + Send>,
    max: usize,
) -> anyhow::Result<mpsc::Receiver<Line>> {
    let (tx, rx) = mpsc::channel(LINES_AHEAD);
    std::thread::Builder::new()
        .name("stream-reader".into())
        .spawn(move || {
            let mut line_no = 0u64;
            while let Some(line) = rialto_push::input::read_bounded_line(&mut reader, max) {
                line_no += 1;
                let line = line.map_err(|e| e.to_string());
                let last = line.is_err();
                if tx.blocking_send((line_no, line)).is_err() || last {
                    break;
                }
            }
        })
        .context("cannot start the input reader thread")?;
    Ok(rx)
}

/// Writes lines until the input ends (`None`) or a line cannot be written (which one and why).
async fn write_lines(
    writer: &mut RealtimeWriter,
    mut lines: mpsc::Receiver<Line>,
) -> Option<Stopped> {
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + PROGRESS_INTERVAL,
        PROGRESS_INTERVAL,
    );
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged = (0, 0);
    loop {
        let next = tokio::select! {
            line = lines.recv() => line,
            _ = progress.tick() => {
                log_progress(writer, &mut logged);
                continue;
            }
        };
        let (line, text) = next?;
        let stop = |problem: String| Some(Stopped { line, problem });
        let text = match text {
            Ok(text) => text,
            Err(problem) => return stop(problem),
        };
        let record = match parse_stream_line(writer.key_codec(), writer.value_codec(), &text) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(problem) => return stop(problem),
        };
        if let Err(e) = writer.write(&record).await {
            return stop(e.to_string());
        }
    }
}

/// Logs what was written so far, when it changed since the last time.
fn log_progress(writer: &RealtimeWriter, logged: &mut (u64, u64)) {
    let r = writer.report();
    if (r.puts, r.deletes) == *logged {
        return;
    }
    *logged = (r.puts, r.deletes);
    let rate = (r.puts + r.deletes) as f64 / r.elapsed.as_secs_f64().max(0.001);
    tracing::info!(
        "streamed {} puts and {} deletes to {} partitions of {}, {rate:.0} writes/s",
        r.puts,
        r.deletes,
        r.partitions,
        writer.topic()
    );
}
