//! A deterministic simulation of a whole cluster: two controllers, three storage servers, two
//! reading applications, a push job and a real-time writer, all the production code, in one
//! single-threaded tokio runtime on a paused clock, on the memory backends and a simulated
//! network (`rialto_backends::net::SimNetwork`).
//!
//! The store is hybrid. A seed decides everything the scenario does: when each of three pushes
//! starts, which real-time puts and deletes are written when, which keys each read asks for,
//! and a schedule of faults — a server crashed and restarted (during a push, a replay or reads,
//! as the timing falls; some come back with an empty disk, some stay away past the rebalance
//! delay), a partition between a client and a server, a slow link, the metadata watches of a
//! server or a client ended, a server cut off from the metadata store or stalled by the broker,
//! the leading controller killed and started again, a rollback and roll-forward.
//! Every read is checked as it completes:
//!
//! * a pushed key's value is the value one push attempt wrote for that key (never another
//!   key's, never one nobody pushed), and that attempt's version had become current before the
//!   read ended; a real-time key's value is one a real-time put wrote for that key;
//! * a batch-get answers from one version: every pushed key of that version present;
//! * a client never goes back to an older version once it read a newer one (a swap is atomic
//!   for each client);
//! * reads succeed: at most one replica of each partition is unreachable at any time;
//!
//! and at the end, with every fault healed, a fresh client finds every record of the last push
//! and every real-time key holding its last write (nothing lost across a crash or a leader
//! change). A run returns its violations and a trace of what happened, with simulated times;
//! `RIALTO_SIM_SEED=N` replays one seed.
//!
//! What is simulated and what is not: time (tokio's paused clock: every timeout, lease and
//! retry delay in the code), the network (bytes in memory pipes, with cuts and delays), etcd
//! and Kafka (the memory backends). RocksDB is real, on a temporary directory; its calls and
//! other blocking work run inline on the simulation's thread (`rialto_backends::blocking`), so they
//! take no simulated time and wake nothing out of turn.
//!
//! A seed replays the same run: every `select!` in the production code polls its branches in
//! order (`biased`), and what is iterated to act on several servers at once (connections to
//! open, instances to probe, connections to close) is ordered, not hashed. Two runs of one seed
//! give the same trace, line for line, ending at the same metadata revision (every metadata
//! write in between counted) and the same number of records. What stays random per run are
//! values nobody orders by: producer GUIDs, signing secrets and chunk generations.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use apache_avro::types::Value;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rialto_backends::faults::{Faults, FaultyMetaStore, FaultyPubSub};
use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};
use rialto_backends::net::SimNetwork;
use rialto_backends::{MetaStore, PubSub};
use rialto_controller::{AdminClient, ControllerConfig, RunningController};
use rialto_fast_client::{Client, ClientConfig};
use rialto_protocol::admin::CreateStoreRequest;
use rialto_protocol::meta::{
    Compression, HybridConfig, Layout, StorageProfile, StoreRecord, DEFAULT_ROOT,
};
use rialto_push::realtime::RealtimeWriter;
use rialto_push::{InProcessBroker, PushConfig};
use rialto_server::{RunningServer, ServerConfig};
use tokio::time::Instant;

const STORE: &str = "sim";
const SERVERS: usize = 3;
const CONTROLLERS: usize = 2;
const CLIENTS: usize = 2;
/// Keys every push writes.
const BASE_KEYS: usize = 120;
/// Keys only one generation of pushes writes (`g{G}-x{i}`).
const EXTRA_KEYS: usize = 12;
const GENERATIONS: u32 = 3;
/// Attempts per generation before the run gives up on it.
const ATTEMPTS_MAX: u32 = 6;
const LEASE_TTL_S: i64 = 3;
/// How long a crashed server may stay away before its replicas move (crashes last 0.5–8 s).
const REBALANCE_DELAY: Duration = Duration::from_secs(4);
/// Keys only real-time writes touch (`r{i}`).
const REALTIME_KEYS: usize = 40;
/// Real-time writes (puts and deletes) per run.
const REALTIME_WRITES: u32 = 400;
const CONTROLLER_PORT: u16 = 7070;
const SERVER_PORT: u16 = 7000;

/// What one seed did.
#[derive(Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    /// Broken invariants, each with its simulated time.
    pub violations: Vec<String>,
    /// Every step, with its simulated time.
    pub trace: Vec<String>,
    pub reads_ok: u64,
    pub reads_failed: u64,
    /// Pushes that went live (of [`GENERATIONS`]).
    pub generations_live: u32,
    /// Simulated time the scenario took.
    pub simulated: Duration,
}

impl SimReport {
    /// A digest of the trace: two runs of one seed that took the same steps agree on it.
    pub fn trace_digest(&self) -> u64 {
        self.trace.iter().fold(0xcbf2_9ce4_8422_2325, |h, line| {
            line.bytes()
                .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
        })
    }
}

/// Runs the scenario of `seed` on a fresh single-threaded runtime with a paused clock.
pub fn run(seed: u64) -> SimReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    // RocksDB calls and file syncs run on this thread too, where a run of the seed puts them.
    let _inline = rialto_backends::blocking::run_inline_on_this_thread();
    let report = runtime.block_on(scenario(seed, dir.path()));
    // Servers' RocksDB handles close with the runtime's tasks.
    drop(runtime);
    report
}

fn ip(group: u8, i: usize) -> IpAddr {
    IpAddr::from([10, 0, group, i as u8 + 1])
}

fn controller_ip(i: usize) -> IpAddr {
    ip(0, i)
}
fn server_ip(i: usize) -> IpAddr {
    ip(1, i)
}
fn client_ip(i: usize) -> IpAddr {
    ip(2, i)
}
fn push_ip() -> IpAddr {
    ip(3, 0)
}

fn controller_url(i: usize) -> String {
    format!(
        "http://{}",
        SocketAddr::new(controller_ip(i), CONTROLLER_PORT)
    )
}

fn base_key(i: usize) -> String {
    format!("k{i}")
}

fn extra_key(generation: u32, i: usize) -> String {
    format!("g{generation}-x{i}")
}

/// The keys attempt `generation` writes.
fn keys_of(generation: u32) -> BTreeSet<String> {
    (0..BASE_KEYS)
        .map(base_key)
        .chain((0..EXTRA_KEYS).map(|i| extra_key(generation, i)))
        .collect()
}

/// The value attempt `attempt` writes for `key`.
fn value_of(attempt: u32, key: &str) -> String {
    format!("a{attempt}:{key}:{}", "v".repeat(64))
}

/// The attempt and key a value names, if it has the shape [`value_of`] gives.
fn parse_value(value: &str) -> Option<(u32, &str)> {
    let rest = value.strip_prefix('a')?;
    let (attempt, rest) = rest.split_once(':')?;
    let (key, _) = rest.split_once(':')?;
    Some((attempt.parse().ok()?, key))
}

fn realtime_key(i: usize) -> String {
    format!("r{i}")
}

/// The value real-time write `n` puts for `key`.
fn realtime_value(n: u32, key: &str) -> String {
    format!("w{n}:{key}:{}", "r".repeat(32))
}

/// The write and key a real-time value names.
fn parse_realtime_value(value: &str) -> Option<(u32, &str)> {
    let rest = value.strip_prefix('w')?;
    let (n, rest) = rest.split_once(':')?;
    let (key, _) = rest.split_once(':')?;
    Some((n.parse().ok()?, key))
}

/// Shared state of a run: the trace, the violations, what was pushed and what went live.
struct Book {
    started: Instant,
    trace: Vec<String>,
    violations: Vec<String>,
    /// Attempt → (generation, the version it was allocated).
    attempts: BTreeMap<u32, (u32, u32)>,
    /// Versions seen current, ever.
    ever_live: BTreeSet<u32>,
    /// The store's current version after each change, in order (a rollback names an older
    /// version again).
    current_history: Vec<u32>,
    /// Real-time write number → its key (puts only).
    realtime_puts: BTreeMap<u32, String>,
    /// Each real-time key's last write: the put's number, or `None` for a delete.
    realtime_last: BTreeMap<String, Option<u32>>,
    reads_ok: u64,
    reads_failed: u64,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<Book>>);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a line to the trace, stamped with the simulated time.
    fn log(&self, line: impl AsRef<str>) {
        self.stamp(line);
    }

    fn violation(&self, line: impl AsRef<str>) {
        let line = self.stamp(format!("VIOLATION {}", line.as_ref()));
        self.lock().violations.push(line);
    }

    /// Adds a line to the trace, stamped with the simulated time; returns it as traced.
    fn stamp(&self, line: impl AsRef<str>) -> String {
        let mut book = self.lock();
        let ms = book.started.elapsed().as_millis();
        let line = format!("{ms:>7} ms  {}", line.as_ref());
        book.trace.push(line.clone());
        line
    }
}

/// The simulated cluster.
struct World {
    net: SimNetwork,
    meta: MemoryMetaStore,
    broker: MemoryPubSub,
    dir: PathBuf,
    controllers: Vec<Option<RunningController>>,
    servers: Vec<Option<RunningServer>>,
    server_faults: Vec<Arc<Faults>>,
    client_faults: Vec<Arc<Faults>>,
}

impl World {
    fn faulty_meta(&self, faults: &Arc<Faults>) -> Arc<dyn MetaStore> {
        Arc::new(FaultyMetaStore::new(
            Arc::new(self.meta.clone()),
            faults.clone(),
        ))
    }

    async fn start_controller(&mut self, i: usize) -> anyhow::Result<()> {
        let config = ControllerConfig {
            controller_id: format!("controller-{i}"),
            listen: SocketAddr::new(controller_ip(i), CONTROLLER_PORT),
            lease_ttl_s: LEASE_TTL_S,
            kafka_bootstrap: "in-process-only".into(),
            topic_deletion: rialto_controller::TopicDeletion::Immediate,
            // A server down longer than this has its replicas moved to the others.
            rebalance: rialto_controller::RebalanceConfig {
                delay: REBALANCE_DELAY,
                ..Default::default()
            },
            network: self.net.host(controller_ip(i)),
            ..ControllerConfig::default()
        };
        let controller = rialto_controller::start(
            config,
            Arc::new(self.meta.clone()),
            Arc::new(self.broker.clone()),
        )
        .await?;
        self.controllers[i] = Some(controller);
        Ok(())
    }

    async fn start_server(&mut self, i: usize) -> anyhow::Result<()> {
        let mut config = ServerConfig::new(
            format!("server-{i}"),
            format!("zone-{i}"),
            self.dir.join(format!("server-{i}")),
        );
        config.listen = SocketAddr::new(server_ip(i), SERVER_PORT);
        config.advertise_host = server_ip(i).to_string();
        config.lease_ttl_s = LEASE_TTL_S;
        config.block_cache_bytes = 8 * 1024 * 1024;
        // A replica's memory is measured in RocksDB and the OS's page cache, outside the
        // simulation: measured again during a run, it could take one report more in one run of
        // a seed than in another. It is measured when a replica goes ONLINE.
        config.usage_refresh = Duration::from_secs(24 * 3600);
        config.network = self.net.host(server_ip(i));
        let faults = &self.server_faults[i];
        let meta = self.faulty_meta(faults);
        let broker = FaultyPubSub::new(Arc::new(self.broker.clone()), faults.clone());
        let server = rialto_server::start(config, meta, Arc::new(broker)).await?;
        self.servers[i] = Some(server);
        Ok(())
    }

    /// What client `i` connects with (outside the world's lock: connecting waits for routing).
    fn client_parts(&self, i: usize) -> (ClientConfig, Arc<dyn MetaStore>) {
        let mut config = ClientConfig::new(STORE);
        config.network = self.net.host(client_ip(i));
        config.routing_wait = Duration::from_secs(30);
        (config, self.faulty_meta(&self.client_faults[i]))
    }

    fn admin(&self, controller: usize) -> AdminClient {
        AdminClient::over(self.net.host(push_ip()), controller_url(controller))
    }

    async fn store_record(&self) -> Option<StoreRecord> {
        let key = Layout::new(DEFAULT_ROOT).store(STORE);
        let kv = self.meta.get(&key).await.ok()??;
        serde_json::from_slice(&kv.value).ok()
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone)]
enum Fault {
    /// A crash; with `disk_lost`, the server comes back with an empty data directory and
    /// bootstraps its replicas from their topics.
    CrashServer {
        server: usize,
        down: Duration,
        disk_lost: bool,
    },
    Partition {
        client: usize,
        server: usize,
        cut: Duration,
    },
    SlowLink {
        client: usize,
        server: usize,
        delay: Duration,
        lasting: Duration,
    },
    EndServerWatches {
        server: usize,
    },
    EndClientWatches {
        client: usize,
    },
    KillLeader {
        down: Duration,
    },
    /// A server cannot reach the metadata store (its lease expires; it serves on).
    MetaUnreachable {
        server: usize,
        lasting: Duration,
    },
    /// The broker stops answering one server (fetches return nothing, sends hang).
    BrokerStall {
        server: usize,
        lasting: Duration,
    },
    /// `stores rollback`, then `stores roll-forward` after `back_for`.
    Rollback {
        back_for: Duration,
    },
}

fn schedule(rng: &mut StdRng) -> Vec<(Duration, Fault)> {
    let count = rng.gen_range(3..=6);
    (0..count)
        .map(|_| {
            let gap = Duration::from_millis(rng.gen_range(200..4_000));
            let fault = match rng.gen_range(0..9) {
                0 => Fault::CrashServer {
                    server: rng.gen_range(0..SERVERS),
                    down: Duration::from_millis(rng.gen_range(500..8_000)),
                    disk_lost: rng.gen_bool(0.3),
                },
                1 => Fault::Partition {
                    client: rng.gen_range(0..CLIENTS),
                    server: rng.gen_range(0..SERVERS),
                    cut: Duration::from_millis(rng.gen_range(500..6_000)),
                },
                2 => Fault::SlowLink {
                    client: rng.gen_range(0..CLIENTS),
                    server: rng.gen_range(0..SERVERS),
                    delay: Duration::from_millis(rng.gen_range(5..300)),
                    lasting: Duration::from_millis(rng.gen_range(500..6_000)),
                },
                3 => Fault::EndServerWatches {
                    server: rng.gen_range(0..SERVERS),
                },
                4 => Fault::EndClientWatches {
                    client: rng.gen_range(0..CLIENTS),
                },
                6 => Fault::MetaUnreachable {
                    server: rng.gen_range(0..SERVERS),
                    lasting: Duration::from_millis(rng.gen_range(500..8_000)),
                },
                7 => Fault::BrokerStall {
                    server: rng.gen_range(0..SERVERS),
                    lasting: Duration::from_millis(rng.gen_range(500..8_000)),
                },
                5 => Fault::Rollback {
                    back_for: Duration::from_millis(rng.gen_range(500..5_000)),
                },
                _ => Fault::KillLeader {
                    down: Duration::from_millis(rng.gen_range(500..6_000)),
                },
            };
            (gap, fault)
        })
        .collect()
}

/// Where the simulated wall clock starts (2026-01-01): every run of a seed reads the same times.
const SIM_EPOCH_MS: i64 = 1_767_225_600_000;

async fn scenario(seed: u64, dir: &Path) -> SimReport {
    let _clock = rialto_backends::clock::simulate_on_this_thread(SIM_EPOCH_MS);
    let mut rng = StdRng::seed_from_u64(seed);
    let book = Shared(Arc::new(Mutex::new(Book {
        started: Instant::now(),
        trace: Vec::new(),
        violations: Vec::new(),
        attempts: BTreeMap::new(),
        ever_live: BTreeSet::new(),
        current_history: Vec::new(),
        realtime_puts: BTreeMap::new(),
        realtime_last: BTreeMap::new(),
        reads_ok: 0,
        reads_failed: 0,
    })));
    let world = World {
        net: SimNetwork::new(),
        meta: MemoryMetaStore::new(),
        broker: MemoryPubSub::new(),
        dir: dir.to_path_buf(),
        controllers: (0..CONTROLLERS).map(|_| None).collect(),
        servers: (0..SERVERS).map(|_| None).collect(),
        server_faults: (0..SERVERS).map(|_| Faults::new()).collect(),
        client_faults: (0..CLIENTS).map(|_| Faults::new()).collect(),
    };
    let world = Arc::new(tokio::sync::Mutex::new(world));
    if let Err(e) = run_scenario(&mut rng, &world, &book).await {
        book.violation(format!("the scenario could not run: {e:#}"));
    }
    let mut world = world.lock().await;
    // Every metadata write (reports, leases, swaps) takes a revision: two runs that end at the
    // same revision with the same records took the same steps in between, not just the same
    // traced ones.
    book.log(format!(
        "end: metadata at revision {}, {} records in {} topics",
        world.meta.revision(),
        world.broker.record_count(),
        world.broker.topic_names().len()
    ));
    for server in world.servers.iter_mut().filter_map(Option::take) {
        let _ = server.kill().await;
    }
    for controller in world.controllers.iter_mut().filter_map(Option::take) {
        controller.kill();
    }
    let book = book.lock();
    SimReport {
        seed,
        violations: book.violations.clone(),
        trace: book.trace.clone(),
        reads_ok: book.reads_ok,
        reads_failed: book.reads_failed,
        generations_live: book
            .attempts
            .values()
            .filter(|(_, v)| book.ever_live.contains(v))
            .map(|(g, _)| *g)
            .collect::<BTreeSet<_>>()
            .len() as u32,
        simulated: book.started.elapsed(),
    }
}

async fn run_scenario(
    rng: &mut StdRng,
    world: &Arc<tokio::sync::Mutex<World>>,
    book: &Shared,
) -> anyhow::Result<()> {
    {
        let mut w = world.lock().await;
        for i in 0..CONTROLLERS {
            w.start_controller(i).await?;
        }
        for i in 0..SERVERS {
            w.start_server(i).await?;
        }
        let admin = w.admin(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin.list_nodes().await.map(|n| n.len()).unwrap_or(0) < SERVERS {
            anyhow::ensure!(Instant::now() < deadline, "servers did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin
            .create_store(&CreateStoreRequest {
                name: STORE.into(),
                owner: "sim".into(),
                key_schema: "\"string\"".into(),
                value_schema: "\"string\"".into(),
                partition_count: 4,
                replication_factor: 2,
                storage: StorageProfile::default(),
                compression: Compression::None,
                max_value_bytes: None,
                // Every real-time write is replayed into every new version.
                hybrid: Some(HybridConfig {
                    rewind_seconds: 24 * 3600,
                    lag_records_max: 10,
                }),
                read_quota_keys_per_s: None,
                storage_quota_bytes: None,
                versions_to_keep: None,
            })
            .await?;
    }
    book.log("cluster up, store created");

    let faults = schedule(rng);
    let push_gaps: Vec<Duration> = (0..GENERATIONS)
        .map(|_| Duration::from_millis(rng.gen_range(0..8_000)))
        .collect();
    let reader_seeds: Vec<u64> = (0..CLIENTS).map(|_| rng.gen()).collect();
    let writer_seed: u64 = rng.gen();

    let stop = Arc::new(AtomicBool::new(false));
    let live_watch = tokio::spawn(follow_live_versions(
        world.clone(),
        book.clone(),
        stop.clone(),
    ));
    let pusher = tokio::spawn(push_generations(world.clone(), book.clone(), push_gaps));
    let writer = tokio::spawn(write_realtime(world.clone(), book.clone(), writer_seed));
    let mut readers = Vec::new();
    for (i, seed) in reader_seeds.into_iter().enumerate() {
        readers.push(tokio::spawn(read_loop(
            i,
            seed,
            world.clone(),
            book.clone(),
            stop.clone(),
        )));
    }
    inject(world, book, faults).await?;
    let pushed = pusher.await?;
    book.log(format!("pushes done: {pushed:?}"));
    writer.await??;
    heal(world, book).await?;
    // Reads go on a moment on the healed cluster, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await?;
    }
    live_watch.await?;
    final_check(world, book).await
}

/// Marks versions live as the store record names them current.
async fn follow_live_versions(
    world: Arc<tokio::sync::Mutex<World>>,
    book: Shared,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        note_current(&world, &book).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn note_current(world: &tokio::sync::Mutex<World>, book: &Shared) {
    let current = world
        .lock()
        .await
        .store_record()
        .await
        .and_then(|s| s.current_version);
    if let Some(v) = current {
        let changed = {
            let mut b = book.lock();
            b.ever_live.insert(v);
            let changed = b.current_history.last() != Some(&v);
            if changed {
                b.current_history.push(v);
            }
            changed
        };
        if changed {
            book.log(format!("v{v} is current"));
        }
    }
}

/// Pushes [`GENERATIONS`] datasets one after another, retrying a failed push as a new attempt
/// (a new version) through the other controller. Returns the generations that went live.
async fn push_generations(
    world: Arc<tokio::sync::Mutex<World>>,
    book: Shared,
    gaps: Vec<Duration>,
) -> Vec<u32> {
    let mut live = Vec::new();
    let mut attempt = 0u32;
    // A hybrid store starts with an empty version the controller creates; pushes come after.
    while world
        .lock()
        .await
        .store_record()
        .await
        .and_then(|s| s.current_version)
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (g, gap) in (1..=GENERATIONS).zip(gaps) {
        tokio::time::sleep(gap).await;
        for _ in 0..ATTEMPTS_MAX {
            attempt += 1;
            let (config, version) = {
                let w = world.lock().await;
                let version = w.store_record().await.map_or(1, |s| s.largest_version + 1);
                let input = w.dir.join(format!("push-{attempt}.jsonl"));
                let lines: String = keys_of(g)
                    .iter()
                    .map(|k| {
                        format!(
                            "{{\"key\": \"{k}\", \"value\": \"{}\"}}\n",
                            value_of(attempt, k)
                        )
                    })
                    .collect();
                if let Err(e) = std::fs::write(&input, lines) {
                    book.violation(format!("cannot write push input: {e}"));
                    return live;
                }
                let mut config = PushConfig::new(
                    &controller_url(attempt as usize % CONTROLLERS),
                    STORE,
                    input,
                );
                config.broker = Some(InProcessBroker(Arc::new(w.broker.clone())));
                config.network = w.net.host(push_ip());
                config.wait_timeout = Duration::from_secs(120);
                (config, version)
            };
            book.lock().attempts.insert(attempt, (g, version));
            book.log(format!("push g{g} attempt a{attempt} (v{version}) starts"));
            match rialto_push::push(&config).await {
                Ok(report) => {
                    if report.version != version {
                        book.violation(format!(
                            "attempt a{attempt} expected v{version}, was given v{}",
                            report.version
                        ));
                    }
                    book.log(format!("push a{attempt} live as v{}", report.version));
                    live.push(g);
                    break;
                }
                Err(e) => {
                    book.log(format!("push a{attempt} failed: {e}"));
                    let allocated = world.lock().await.store_record().await;
                    if allocated.is_none_or(|s| s.largest_version < version) {
                        // Refused before a version was allocated: the next attempt gets it.
                        book.lock().attempts.remove(&attempt);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    live
}

/// Writes [`REALTIME_WRITES`] puts and deletes of the `r*` keys to the real-time topic.
async fn write_realtime(
    world: Arc<tokio::sync::Mutex<World>>,
    book: Shared,
    seed: u64,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (record, broker) = {
        let w = world.lock().await;
        let record = w.store_record().await.context("no store record")?;
        (record, Arc::new(w.broker.clone()) as Arc<dyn PubSub>)
    };
    let mut writer = RealtimeWriter::new(&record, broker).await?;
    for n in 1..=REALTIME_WRITES {
        let key = realtime_key(rng.gen_range(0..REALTIME_KEYS));
        let delete = rng.gen_bool(0.1);
        {
            let mut b = book.lock();
            if delete {
                b.realtime_last.insert(key.clone(), None);
            } else {
                b.realtime_puts.insert(n, key.clone());
                b.realtime_last.insert(key.clone(), Some(n));
            }
        }
        let k = Value::String(key.clone());
        if delete {
            writer.delete(&k).await?;
        } else {
            writer
                .put(&k, &Value::String(realtime_value(n, &key)))
                .await?;
        }
        if n % 10 == 0 {
            writer.flush().await?;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(50..1_000))).await;
        }
    }
    let report = writer.close().await?;
    book.log(format!(
        "real-time writes done: {} puts, {} deletes",
        report.puts, report.deletes
    ));
    Ok(())
}

/// Reads until `stop`, checking every answer.
async fn read_loop(
    i: usize,
    seed: u64,
    world: Arc<tokio::sync::Mutex<World>>,
    book: Shared,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    // Applications start once the first version is live.
    while book.lock().ever_live.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = loop {
        let (config, meta) = world.lock().await.client_parts(i);
        match Client::connect(config, meta).await {
            Ok(c) => break c,
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                book.log(format!("client {i}: connect failed: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    book.log(format!("client {i} connected"));
    // Where in the history of current versions this client's last read was.
    let mut newest_seen = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let realtime = rng.gen_bool(0.25);
        let keys: Vec<String> = (0..rng.gen_range(1..40))
            .map(|_| {
                if realtime {
                    realtime_key(rng.gen_range(0..REALTIME_KEYS))
                } else if rng.gen_bool(0.8) {
                    base_key(rng.gen_range(0..BASE_KEYS))
                } else {
                    extra_key(rng.gen_range(1..=GENERATIONS), rng.gen_range(0..EXTRA_KEYS))
                }
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let single = keys.len() == 1 || rng.gen_bool(0.3);
        let keys = if single { keys[..1].to_vec() } else { keys };
        let answer = if single {
            client
                .get(&Value::String(keys[0].clone()))
                .await
                .map(|v| vec![v])
        } else {
            let values: Vec<Value> = keys.iter().cloned().map(Value::String).collect();
            client.batch_get(&values).await
        };
        match answer {
            Ok(values) if realtime => check_realtime_read(i, &keys, &values, &book),
            Ok(values) => {
                note_current(&world, &book).await;
                check_read(i, &keys, &values, &book, &mut newest_seen);
            }
            Err(e) => {
                book.lock().reads_failed += 1;
                book.violation(format!(
                    "client {i}: {} of {} keys failed: {e}",
                    if single { "get" } else { "batch-get" },
                    keys.len()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..60))).await;
    }
}

/// Checks an answer for real-time keys: each value is one a real-time write put for its key.
fn check_realtime_read(client: usize, keys: &[String], values: &[Option<Value>], book: &Shared) {
    let problems: Vec<String> = {
        let mut b = book.lock();
        b.reads_ok += 1;
        keys.iter()
            .zip(values)
            .filter_map(|(key, value)| {
                let value = value.as_ref()?;
                let Value::String(text) = value else {
                    return Some(format!("`{key}` read as {value:?}, not a string"));
                };
                match parse_realtime_value(text) {
                    Some((n, named))
                        if named == key
                            && *text == realtime_value(n, key)
                            && b.realtime_puts.get(&n) == Some(key) =>
                    {
                        None
                    }
                    _ => Some(format!(
                        "`{key}` read as {text:?}, which no write put there"
                    )),
                }
            })
            .collect()
    };
    for problem in &problems {
        book.violation(format!("client {client}: real-time read: {problem}"));
    }
    if problems.is_empty() {
        book.log(format!(
            "client {client}: real-time read of {} keys",
            keys.len()
        ));
    }
}

/// Checks one answer against what was pushed and what went live.
fn check_read(
    client: usize,
    keys: &[String],
    values: &[Option<Value>],
    book: &Shared,
    newest_seen: &mut usize,
) {
    let mut book_guard = book.lock();
    book_guard.reads_ok += 1;
    let mut problems = Vec::new();
    let mut versions = BTreeSet::new();
    let mut attempt_of_read = None;
    for (key, value) in keys.iter().zip(values) {
        let Some(value) = value else { continue };
        let Value::String(text) = value else {
            problems.push(format!("`{key}` read as {value:?}, not a string"));
            continue;
        };
        let Some((attempt, named)) = parse_value(text) else {
            problems.push(format!("`{key}` read as {text:?}, which nobody pushed"));
            continue;
        };
        if named != key || *text != value_of(attempt, key) {
            problems.push(format!("`{key}` read as another key's value {text:?}"));
            continue;
        }
        let Some(&(_, version)) = book_guard.attempts.get(&attempt) else {
            problems.push(format!("`{key}` read from unknown attempt a{attempt}"));
            continue;
        };
        if !book_guard.ever_live.contains(&version) {
            problems.push(format!(
                "`{key}` read from v{version} (a{attempt}), which was never current"
            ));
        }
        versions.insert(version);
        attempt_of_read = Some(attempt);
    }
    if versions.len() > 1 {
        problems.push(format!("one read answered from versions {versions:?}"));
    }
    if let Some(attempt) = attempt_of_read {
        let (generation, version) = book_guard.attempts[&attempt];
        let expected = keys_of(generation);
        for (key, value) in keys.iter().zip(values) {
            // A key present but not expected was caught above (another attempt's value).
            if expected.contains(key) && value.is_none() {
                problems.push(format!("`{key}` missing from v{version}"));
            }
        }
        // The latest time this version became current; reading it after a version that became
        // current later is going back (a rollback makes an older version current again, later).
        let history = &book_guard.current_history;
        match history.iter().rposition(|v| *v == version) {
            Some(at) if at < *newest_seen => problems.push(format!(
                "went back from v{} to v{version} (current versions in order: {history:?})",
                history[*newest_seen]
            )),
            Some(at) => *newest_seen = at,
            None => {}
        }
    }
    drop(book_guard);
    let ops = if keys.len() == 1 { "get" } else { "batch-get" };
    for problem in &problems {
        book.violation(format!("client {client}: {ops}: {problem}"));
    }
    if problems.is_empty() {
        book.log(format!(
            "client {client}: {ops} of {} keys from {versions:?}",
            keys.len()
        ));
    }
}

/// Runs the fault schedule, one fault after another.
async fn inject(
    world: &Arc<tokio::sync::Mutex<World>>,
    book: &Shared,
    faults: Vec<(Duration, Fault)>,
) -> anyhow::Result<()> {
    for (gap, fault) in faults {
        tokio::time::sleep(gap).await;
        book.log(format!("fault: {fault:?}"));
        match fault {
            Fault::CrashServer {
                server,
                down,
                disk_lost,
            } => {
                let running = world.lock().await.servers[server].take();
                if let Some(s) = running {
                    s.kill().await?;
                }
                if disk_lost {
                    let dir = world.lock().await.dir.join(format!("server-{server}"));
                    std::fs::remove_dir_all(&dir)?;
                }
                tokio::time::sleep(down).await;
                world.lock().await.start_server(server).await?;
                book.log(format!("server {server} restarted"));
            }
            Fault::Partition {
                client,
                server,
                cut,
            } => {
                let net = world.lock().await.net.clone();
                net.partition(client_ip(client), server_ip(server));
                tokio::time::sleep(cut).await;
                net.heal(client_ip(client), server_ip(server));
                book.log(format!("client {client} and server {server} joined again"));
            }
            Fault::SlowLink {
                client,
                server,
                delay,
                lasting,
            } => {
                let net = world.lock().await.net.clone();
                net.slow(client_ip(client), server_ip(server), delay);
                tokio::time::sleep(lasting).await;
                net.slow(client_ip(client), server_ip(server), Duration::ZERO);
                book.log(format!("link client {client} - server {server} fast again"));
            }
            Fault::EndServerWatches { server } => {
                world.lock().await.server_faults[server].end_watches();
            }
            Fault::EndClientWatches { client } => {
                world.lock().await.client_faults[client].end_watches();
            }
            Fault::MetaUnreachable { server, lasting } => {
                let faults = world.lock().await.server_faults[server].clone();
                faults.set_meta_down(true);
                tokio::time::sleep(lasting).await;
                faults.set_meta_down(false);
                book.log(format!("server {server} reaches the metadata store again"));
            }
            Fault::BrokerStall { server, lasting } => {
                let faults = world.lock().await.server_faults[server].clone();
                faults.set_stalled(true);
                tokio::time::sleep(lasting).await;
                faults.set_stalled(false);
                book.log(format!("the broker answers server {server} again"));
            }
            Fault::Rollback { back_for } => {
                let admins: Vec<AdminClient> = {
                    let w = world.lock().await;
                    (0..CONTROLLERS)
                        .filter(|i| w.controllers[*i].is_some())
                        .map(|i| w.admin(i))
                        .collect()
                };
                let Some(admin) = admins.first() else {
                    continue;
                };
                match admin.rollback(STORE).await {
                    Ok(s) => book.log(format!("rolled back to {:?}", s.current_version)),
                    Err(e) => book.log(format!("rollback refused: {e}")),
                }
                tokio::time::sleep(back_for).await;
                match admin.roll_forward(STORE).await {
                    Ok(s) => book.log(format!("rolled forward to {:?}", s.current_version)),
                    Err(e) => book.log(format!("roll-forward refused: {e}")),
                }
            }
            Fault::KillLeader { down } => {
                let killed = {
                    let mut w = world.lock().await;
                    let leader = w
                        .controllers
                        .iter()
                        .position(|c| c.as_ref().is_some_and(RunningController::is_leader));
                    if let Some(i) = leader {
                        if let Some(c) = w.controllers[i].take() {
                            c.kill();
                        }
                    }
                    leader
                };
                book.log(format!("leader killed: {killed:?}"));
                tokio::time::sleep(down).await;
                if let Some(i) = killed {
                    world.lock().await.start_controller(i).await?;
                    book.log(format!("controller {i} started again"));
                }
            }
        }
    }
    Ok(())
}

/// Every link whole and every process running.
async fn heal(world: &Arc<tokio::sync::Mutex<World>>, book: &Shared) -> anyhow::Result<()> {
    let mut w = world.lock().await;
    w.net.heal_all();
    for i in 0..SERVERS {
        if w.servers[i].is_none() {
            w.start_server(i).await?;
        }
    }
    for i in 0..CONTROLLERS {
        if w.controllers[i].is_none() {
            w.start_controller(i).await?;
        }
    }
    drop(w);
    book.log("healed");
    Ok(())
}

/// A fresh client reads every key: the last live generation's records, all of them.
async fn final_check(world: &Arc<tokio::sync::Mutex<World>>, book: &Shared) -> anyhow::Result<()> {
    let (config, meta) = world.lock().await.client_parts(0);
    let client = Client::connect(config, meta).await?;
    let Some(current) = world
        .lock()
        .await
        .store_record()
        .await
        .and_then(|s| s.current_version)
    else {
        book.violation("no version went live");
        return Ok(());
    };
    let (attempt, generation) = {
        let b = book.lock();
        match b.attempts.iter().rev().find(|(_, (_, v))| *v == current) {
            Some((a, (g, _))) => (*a, *g),
            None => {
                drop(b);
                book.violation(format!("current v{current} is no attempt's"));
                return Ok(());
            }
        }
    };
    let keys: Vec<String> = keys_of(generation).into_iter().collect();
    let values: Vec<Value> = keys.iter().cloned().map(Value::String).collect();
    let got = client.batch_get(&values).await?;
    let wrong = keys
        .iter()
        .zip(&got)
        .filter(|(k, v)| **v != Some(Value::String(value_of(attempt, k))))
        .count();
    if wrong > 0 {
        book.violation(format!(
            "final read of v{current}: {wrong} of {} records missing or wrong",
            keys.len()
        ));
    } else {
        book.log(format!(
            "final read: all {} records of v{current}",
            keys.len()
        ));
    }
    // Every real-time write reached the current version: each key holds its last write.
    let expected: BTreeMap<String, Option<Value>> = book
        .lock()
        .realtime_last
        .iter()
        .map(|(k, last)| (k.clone(), last.map(|n| Value::String(realtime_value(n, k)))))
        .collect();
    let keys: Vec<Value> = expected.keys().cloned().map(Value::String).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = client.batch_get(&keys).await;
        let stale = match &got {
            Ok(values) => expected
                .iter()
                .zip(values)
                .filter(|((_, want), got)| *want != *got)
                .map(|((k, _), _)| k.clone())
                .collect::<Vec<_>>(),
            Err(e) => vec![format!("error: {e}")],
        };
        if stale.is_empty() {
            book.log(format!(
                "final read: all {} real-time keys hold their last write",
                keys.len()
            ));
            return Ok(());
        }
        if Instant::now() >= deadline {
            book.violation(format!(
                "final read of v{current}: {} real-time keys without their last write: {stale:?}",
                stale.len()
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
