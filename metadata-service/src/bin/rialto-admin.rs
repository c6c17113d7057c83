//! `rialto-admin`: the operator CLI over the controller's admin API.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rialto_controller::{render, AdminClient, ControllerTlsArgs};
use rialto_protocol::acl::Permission;
use rialto_protocol::admin::{AclChangeRequest, RealtimeAction, RealtimeDecisionRequest};
use rialto_protocol::admin::{CreateStoreRequest, UpdateStoreRequest};
use rialto_protocol::meta::{Compression, HybridConfig, StorageProfile};
use serde::Serialize;

/// Operator CLI of a Rialto cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Admin API of any controller.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:7070",
        env = "RIALTO_CONTROLLER"
    )]
    controller: String,
    /// Print the raw JSON answer instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    tls: ControllerTlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stores: list, describe, create, update, delete, rollback, roll-forward.
    #[command(subcommand)]
    Stores(StoresCommand),
    /// A store's versions: list, delete.
    #[command(subcommand)]
    Versions(VersionsCommand),
    /// A store's value schemas: list, add (fully compatible with every registered one).
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Storage nodes: list, describe, drain.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Which controller leads (and which one answered).
    Controllers,
    /// The replicas of a store's version (default: the current one): state, offset, records,
    /// bytes, lag, leader and moves, per partition.
    Replicas {
        store: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// A hybrid store's real-time records its partition leaders refused (skip one, accept one,
    /// list the decisions) and its registered writers (list, revoke).
    #[command(subcommand)]
    Realtime(RealtimeCommand),
    /// Who may read, write and administer a store (or, with --cluster, every store).
    #[command(subcommand)]
    Acl(AclCommand),
    /// Local certificates for development and tests.
    #[command(subcommand)]
    Certs(CertsCommand),
}

/// Which ACL an `acl` command changes: a store's, or with `--cluster` the cluster's.
#[derive(Debug, clap::Args)]
struct AclTarget {
    /// The store (omit with --cluster).
    #[arg(required_unless_present = "cluster", conflicts_with = "cluster")]
    store: Option<String>,
    /// The cluster-wide ACL: `admin` there makes a cluster administrator; `read`/`write`
    /// there apply to every store.
    #[arg(long)]
    cluster: bool,
}

#[derive(Debug, Subcommand)]
enum AclCommand {
    /// Grants permissions: `acl grant STORE --permissions read,write --principal P` (principal
    /// `*`: every authenticated caller).
    Grant(AclChange),
    /// Revokes permissions.
    Revoke(AclChange),
    /// Lists the grants.
    List {
        #[command(flatten)]
        target: AclTarget,
    },
}

#[derive(Debug, clap::Args)]
struct AclChange {
    #[command(flatten)]
    target: AclTarget,
    /// read, write, admin (comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    permissions: Vec<String>,
    /// The principal as its certificate names it (SAN URI, else subject CN).
    #[arg(long)]
    principal: String,
}

#[derive(Debug, Subcommand)]
enum RealtimeCommand {
    /// Drops the real-time record a partition leader refused (the replica's error names its
    /// partition and offset): it is never copied, and copying resumes after it.
    Skip(RealtimeRecord),
    /// Copies the refused record although its producer metadata failed the check (records
    /// lost before it, a segment checksum that does not match); a record that does not decode
    /// can only be skipped.
    Accept(RealtimeRecord),
    /// The decisions taken about a store's real-time records.
    Decisions { store: String },
    /// The store's registered real-time writers (producer, who registered it, when).
    Writers { store: String },
    /// Revokes a real-time writer: with authorization on, partition leaders refuse its records
    /// within a second (a record already refused halts its partition until skipped).
    Revoke {
        store: String,
        /// The writer's producer GUID, as `realtime writers` lists it.
        #[arg(long)]
        producer: String,
    },
}

#[derive(Debug, clap::Args)]
struct RealtimeRecord {
    store: String,
    /// The partition of the real-time topic.
    #[arg(long)]
    partition: u32,
    /// The record's offset in that partition.
    #[arg(long)]
    offset: i64,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Creates a CA and certificates for servers, controllers and named clients under DIR
    /// (kept if they exist: run again to add clients).
    Init {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// A client to issue a certificate for (principal = the name); repeatable.
        #[arg(long = "client")]
        clients: Vec<String>,
        /// A host name or IP the server and controller certificates must be valid for, beyond
        /// localhost and 127.0.0.1; repeatable.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// The store's key schema and every value schema with its id.
    List { store: String },
    /// Registers a new value schema: each registered schema must read what it writes and it
    /// must read what each wrote (add fields with defaults; remove fields; widen numbers).
    Add {
        store: String,
        /// Avro value schema: JSON text, or @path to read it from a file.
        #[arg(long)]
        value_schema: String,
    },
}

#[derive(Debug, Subcommand)]
enum VersionsCommand {
    /// Every version of a store, with its status and role.
    List { store: String },
    /// Removes a version that is not current (a backup, or a push in progress): its replicas
    /// are dropped, its topic deleted.
    Delete { store: String, version: u32 },
}

#[derive(Debug, Subcommand)]
enum StoresCommand {
    /// Every store with its current and backup version.
    List,
    /// One store: versions, status and a per-partition replica table.
    Describe { store: String },
    /// Creates a store.
    Create {
        name: String,
        /// Avro key schema: JSON text, or @path to read it from a file.
        #[arg(long)]
        key_schema: String,
        /// Avro value schema: JSON text, or @path to read it from a file.
        #[arg(long)]
        value_schema: String,
        #[arg(long)]
        partitions: u32,
        #[arg(long)]
        replication_factor: u32,
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, value_enum, default_value_t = Storage::OnDisk)]
        storage: Storage,
        /// Value compression: values are compressed by the push job and decompressed by the
        /// client; `zstd-dictionary` trains a dictionary per version.
        #[arg(long, value_enum, default_value_t = CompressionArg::None)]
        compression: CompressionArg,
        /// Largest serialized value (Avro datum, before compression) a push may write, in bytes
        /// (default 16 MiB, at most 64 MiB). Values over 768 KiB are stored in chunks.
        #[arg(long)]
        max_value_bytes: Option<u64>,
        #[command(flatten)]
        hybrid: HybridArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Changes a store's settings; a store made hybrid is hybrid from its next version.
    Update {
        name: String,
        #[command(flatten)]
        hybrid: HybridArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Deletes a store: every version, replica, topic and record.
    Delete {
        name: String,
        /// Required: deletion cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Makes the backup version current at once (clients follow within their watch).
    Rollback { name: String },
    /// Undoes a rollback: the newer version becomes current again.
    RollForward { name: String },
}

/// A store's quotas and retention (unset: unlimited, and current + backup kept).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Read quota in keys per second across the cluster (a get costs 1, a batch-get its key
    /// count); with `update`, 0 removes it.
    #[arg(long)]
    read_quota: Option<u64>,
    /// Storage quota: bytes of one copy of a version, checked when a push starts (its data
    /// size) and before a version goes live (its size on disk); with `update`, 0 removes it.
    #[arg(long)]
    storage_quota: Option<u64>,
    /// ONLINE versions kept: the current one, the backup and older ones (2 to 16, default 2).
    #[arg(long)]
    versions_to_keep: Option<u32>,
}

/// A hybrid store's settings: giving either makes the store hybrid.
#[derive(Debug, clap::Args)]
struct HybridArgs {
    /// Real-time writes this recent (seconds) are replayed on top of each new version's batch
    /// data (default 86400).
    #[arg(long)]
    hybrid_rewind_seconds: Option<u64>,
    /// A replica of a hybrid version serves only once it is at most this many real-time
    /// records behind (default 1000).
    #[arg(long)]
    hybrid_lag_records_max: Option<u64>,
}

impl HybridArgs {
    /// The settings asked for, the rest from `current` or the defaults; `None` if neither flag
    /// was given.
    fn config(&self, current: Option<HybridConfig>) -> Option<HybridConfig> {
        if self.hybrid_rewind_seconds.is_none() && self.hybrid_lag_records_max.is_none() {
            return None;
        }
        let base = current.unwrap_or(HybridConfig {
            rewind_seconds: 86_400,
            lag_records_max: 1_000,
        });
        Some(HybridConfig {
            rewind_seconds: self.hybrid_rewind_seconds.unwrap_or(base.rewind_seconds),
            lag_records_max: self.hybrid_lag_records_max.unwrap_or(base.lag_records_max),
        })
    }
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// Registered (live) storage nodes.
    List,
    /// One node: registration, drain state and every replica it hosts.
    Describe { node: String },
    /// Moves every replica off the node (each new replica ONLINE before the node's is dropped)
    /// and keeps new versions off it, before maintenance.
    Drain {
        node: String,
        /// Cancels a drain: the node takes replicas again.
        #[arg(long)]
        cancel: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Storage {
    InMemory,
    OnDisk,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressionArg {
    None,
    Zstd,
    ZstdDictionary,
}

/// A schema argument: inline JSON, or `@file`.
fn schema_arg(arg: &str) -> anyhow::Result<String> {
    match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading schema file {path}"))
        }
        None => Ok(arg.to_string()),
    }
}

fn print<T: Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Command::Certs(CertsCommand::Init {
        dir,
        clients,
        hosts,
    }) = &args.command
    {
        let report = rialto_security::certs::init(
            dir,
            &rialto_security::certs::InitOptions {
                clients: clients.clone(),
                hosts: hosts.clone(),
            },
        )?;
        for path in &report.written {
            println!("wrote {}", path.display());
        }
        for path in &report.kept {
            println!("kept  {}", path.display());
        }
        return Ok(());
    }
    let client = AdminClient::connect(args.controller.clone(), args.tls.files()?.as_ref())?;
    match args.command {
        Command::Certs(_) => unreachable!("handled above"),
        Command::Realtime(RealtimeCommand::Skip(record)) => {
            decide(&client, args.json, record, RealtimeAction::Skip).await
        }
        Command::Realtime(RealtimeCommand::Accept(record)) => {
            decide(&client, args.json, record, RealtimeAction::Accept).await
        }
        Command::Realtime(RealtimeCommand::Decisions { store }) => {
            let decisions = client.realtime_decisions(&store).await?;
            print(args.json, &decisions, |d| render::realtime_decisions(d))
        }
        Command::Realtime(RealtimeCommand::Writers { store }) => {
            let writers = client.realtime_writers(&store).await?;
            print(args.json, &writers, |w| render::realtime_writers(w))
        }
        Command::Realtime(RealtimeCommand::Revoke { store, producer }) => {
            let w = client.revoke_realtime_writer(&store, &producer).await?;
            print(args.json, &w, |w| {
                format!(
                    "{store}: real-time writer {} (registered by {}) revoked\n",
                    w.producer, w.registered_by
                )
            })
        }
        Command::Acl(AclCommand::List { target }) => {
            let record = client.acl(target.store.as_deref()).await?;
            print(args.json, &record, render::acl)
        }
        Command::Acl(AclCommand::Grant(change)) => {
            acl_change(&client, args.json, change, true).await
        }
        Command::Acl(AclCommand::Revoke(change)) => {
            acl_change(&client, args.json, change, false).await
        }
        Command::Stores(StoresCommand::List) => {
            let stores = client.list_stores().await?;
            print(args.json, &stores, |s| render::stores(s))
        }
        Command::Stores(StoresCommand::Describe { store }) => {
            let d = client.describe_store(&store).await?;
            print(args.json, &d, render::store_description)
        }
        Command::Stores(StoresCommand::Create {
            name,
            key_schema,
            value_schema,
            partitions,
            replication_factor,
            owner,
            storage,
            compression,
            max_value_bytes,
            hybrid,
            limits,
        }) => {
            let req = CreateStoreRequest {
                name,
                owner,
                key_schema: schema_arg(&key_schema)?,
                value_schema: schema_arg(&value_schema)?,
                partition_count: partitions,
                replication_factor,
                storage: match storage {
                    Storage::InMemory => StorageProfile::InMemory,
                    Storage::OnDisk => StorageProfile::OnDisk,
                },
                compression: match compression {
                    CompressionArg::None => Compression::None,
                    CompressionArg::Zstd => Compression::Zstd,
                    CompressionArg::ZstdDictionary => Compression::ZstdDictionary,
                },
                max_value_bytes,
                hybrid: hybrid.config(None),
                read_quota_keys_per_s: limits.read_quota,
                storage_quota_bytes: limits.storage_quota,
                versions_to_keep: limits.versions_to_keep,
            };
            let s = client.create_store(&req).await?;
            print(args.json, &s, |s| {
                format!(
                    "created store `{}`\n{}",
                    s.name,
                    render::stores(std::slice::from_ref(s))
                )
            })
        }
        Command::Stores(StoresCommand::Update {
            name,
            hybrid,
            limits:
                LimitArgs {
                    read_quota,
                    storage_quota,
                    versions_to_keep,
                },
        }) => {
            let current = client.describe_store(&name).await?.store.hybrid;
            let hybrid = hybrid.config(current);
            if hybrid.is_none()
                && read_quota.is_none()
                && storage_quota.is_none()
                && versions_to_keep.is_none()
            {
                anyhow::bail!(
                    "nothing to change: give --hybrid-rewind-seconds, --hybrid-lag-records-max, \
                     --read-quota, --storage-quota or --versions-to-keep"
                );
            }
            let req = UpdateStoreRequest {
                hybrid,
                read_quota_keys_per_s: read_quota,
                storage_quota_bytes: storage_quota,
                versions_to_keep,
            };
            let s = client.update_store(&name, &req).await?;
            print(args.json, &s, |s| {
                let mut out = format!("updated store `{}`:", s.name);
                if let Some(h) = hybrid {
                    out.push_str(&format!(
                        " hybrid, rewind {} s, lag bound {} records (from its next version);",
                        h.rewind_seconds, h.lag_records_max
                    ));
                }
                if read_quota.is_some() {
                    out.push_str(&match s.read_quota_keys_per_s {
                        Some(q) => format!(" read quota {q} keys/s;"),
                        None => " no read quota;".to_string(),
                    });
                }
                if storage_quota.is_some() {
                    out.push_str(&match s.storage_quota_bytes {
                        Some(q) => format!(" storage quota {q} bytes;"),
                        None => " no storage quota;".to_string(),
                    });
                }
                if versions_to_keep.is_some() {
                    out.push_str(&format!(" keeps {} versions;", s.versions_to_keep));
                }
                out.pop();
                out.push('\n');
                out
            })
        }
        Command::Stores(StoresCommand::Delete { name, yes }) => {
            if !yes {
                anyhow::bail!(
                    "deleting store `{name}` removes all its data and cannot be undone; \
                     run again with --yes"
                );
            }
            let s = client.delete_store(&name).await?;
            print(args.json, &s, |s| {
                format!(
                    "store `{}` is being deleted: its versions stop serving now; topics and \
                     records go once no server consumes them\n",
                    s.name
                )
            })
        }
        Command::Stores(StoresCommand::Rollback { name }) => {
            let s = client.rollback(&name).await?;
            print(args.json, &s, |s| switched(s, "rolled back"))
        }
        Command::Stores(StoresCommand::RollForward { name }) => {
            let s = client.roll_forward(&name).await?;
            print(args.json, &s, |s| switched(s, "rolled forward"))
        }
        Command::Schemas(SchemasCommand::List { store }) => {
            let schemas = client.value_schemas(&store).await?;
            print(args.json, &schemas, |s| render::value_schemas(s))
        }
        Command::Schemas(SchemasCommand::Add {
            store,
            value_schema,
        }) => {
            let added = client
                .add_value_schema(&store, &schema_arg(&value_schema)?)
                .await?;
            print(args.json, &added, |a| {
                if a.added {
                    format!("value schema {} registered for `{store}`\n", a.id)
                } else {
                    format!(
                        "value schema already registered for `{store}` as {}\n",
                        a.id
                    )
                }
            })
        }
        Command::Versions(VersionsCommand::List { store }) => {
            let d = client.describe_store(&store).await?;
            print(args.json, &d.versions, |_| render::versions(&d))
        }
        Command::Versions(VersionsCommand::Delete { store, version }) => {
            let v = client.delete_version(&store, version).await?;
            print(args.json, &v, |v| {
                format!(
                    "version {} of `{store}` deleted: its replicas are dropped and its topic removed\n",
                    v.record.version
                )
            })
        }
        Command::Replicas { store, version } => {
            let d = client.describe_store(&store).await?;
            let wanted = version.or(d.store.current_version).with_context(|| {
                format!("store `{store}` has no current version yet; name one with --version")
            })?;
            let v = d
                .versions
                .iter()
                .find(|v| v.record.version == wanted)
                .with_context(|| {
                    format!(
                        "store `{store}` has no version {wanted}; see `rialto-admin versions list {store}`"
                    )
                })?;
            print(args.json, &v.replicas, |_| render::replicas(v))
        }
        Command::Controllers => {
            let view = client.controllers().await?;
            print(args.json, &view, render::controllers)
        }
        Command::Nodes(NodesCommand::List) => {
            let nodes = client.list_nodes().await?;
            print(args.json, &nodes, |n| render::nodes(n))
        }
        Command::Nodes(NodesCommand::Describe { node }) => {
            let d = client.describe_node(&node).await?;
            print(args.json, &d, render::node_description)
        }
        Command::Nodes(NodesCommand::Drain { node, cancel }) => {
            let d = client.drain_node(&node, !cancel).await?;
            print(args.json, &d, render::node_description)
        }
    }
}

async fn acl_change(
    client: &AdminClient,
    json: bool,
    change: AclChange,
    grant: bool,
) -> anyhow::Result<()> {
    let req = AclChangeRequest {
        principal: change.principal,
        permissions: change
            .permissions
            .iter()
            .map(|n| Permission::parse(n.trim()).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?,
    };
    let record = client
        .change_acl(change.target.store.as_deref(), grant, &req)
        .await?;
    print(json, &record, render::acl)
}

/// The one-line answer of a rollback or roll-forward.
fn switched(s: &rialto_protocol::meta::StoreRecord, what: &str) -> String {
    let v = |n: Option<u32>| n.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    format!(
        "store `{}` {what}: current version {}, backup {}\n",
        s.name,
        v(s.current_version),
        v(s.backup_version)
    )
}

async fn decide(
    client: &AdminClient,
    json: bool,
    record: RealtimeRecord,
    action: RealtimeAction,
) -> anyhow::Result<()> {
    let request = RealtimeDecisionRequest {
        partition: record.partition,
        offset: record.offset,
        action,
    };
    let decision = client
        .decide_realtime_record(&record.store, &request)
        .await?;
    print(json, &decision, |d| {
        format!(
            "{}: the leader of partition {} will {} the real-time record at offset {} (it \
             resumes within a second if it is halted there)\n",
            record.store,
            d.partition,
            d.action.name(),
            d.offset
        )
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<rialto_controller::ControllerError>() {
                Some(rialto_controller::ControllerError::Api { message, .. }) => {
                    eprintln!("error: {message}")
                }
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
