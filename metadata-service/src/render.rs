//! Plain-text rendering for `rialto-admin`: a tiny aligned-table formatter and the layouts of
//! store, version and node listings. `--json` bypasses all of this.

use rialto_protocol::admin::{NodeDescription, StoreDescription, VersionDescription};
use rialto_protocol::meta::{
    realtime_topic, NodeRecord, StorageProfile, StoreRecord, ValueFormat, VersionStatus,
};

/// A table of left-aligned columns separated by two spaces.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells are blank, extra cells are kept.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Renders the table, one line per row, each ending with a newline.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

fn opt(v: Option<u32>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn storage(s: StorageProfile) -> &'static str {
    match s {
        StorageProfile::InMemory => "in-memory",
        StorageProfile::OnDisk => "on-disk",
    }
}

/// Bytes for people: 1.5 GB, 320 MB, 12 kB, 7 B.
pub fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "kB"),
    ];
    for (unit, name) in UNITS {
        if n >= unit {
            return format!("{:.1} {name}", n as f64 / unit as f64);
        }
    }
    format!("{n} B")
}

/// A version status in one word, plus the failure reason if any.
pub fn status(s: &VersionStatus) -> (String, Option<&str>) {
    match s {
        VersionStatus::Pushing => ("pushing".into(), None),
        VersionStatus::PushWritten => ("push-written".into(), None),
        VersionStatus::Online => ("online".into(), None),
        VersionStatus::Failed { reason } => ("failed".into(), Some(reason)),
    }
}

/// `stores list`.
pub fn stores(stores: &[StoreRecord]) -> String {
    let mut t = Table::new([
        "STORE",
        "OWNER",
        "PARTITIONS",
        "RF",
        "STORAGE",
        "COMPRESSION",
        "CURRENT",
        "BACKUP",
        "LARGEST",
    ]);
    for s in stores {
        t.row([
            s.name.clone(),
            s.owner.clone(),
            s.partition_count.to_string(),
            s.replication_factor.to_string(),
            storage(s.storage).to_string(),
            s.compression.name().to_string(),
            opt(s.current_version),
            opt(s.backup_version),
            s.largest_version.to_string(),
        ]);
    }
    t.render()
}

/// The replica table of one version.
pub fn replicas(v: &VersionDescription) -> String {
    let mut t = Table::new([
        "PARTITION",
        "NODE",
        "STATE",
        "OFFSET",
        "RECORDS",
        "DISK",
        "MEMORY",
        "LAG",
        "LEADER",
        "MOVE",
        "ERROR",
    ]);
    for r in &v.replicas {
        t.row([
            r.partition.to_string(),
            r.node_id.clone(),
            r.state.to_string(),
            r.offset.to_string(),
            r.records.to_string(),
            bytes(r.disk_bytes),
            bytes(r.memory_bytes),
            r.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            if r.leader { "yes" } else { "" }.to_string(),
            r.replaces
                .as_ref()
                .map(|from| format!("replaces {from}"))
                .unwrap_or_default(),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

/// `stores describe`.
pub fn store_description(d: &StoreDescription) -> String {
    let s = &d.store;
    let mut out = String::new();
    let mut t = Table::new(["store", s.name.as_str()]);
    t.row(["owner".to_string(), s.owner.clone()]);
    t.row(["partitions".to_string(), s.partition_count.to_string()]);
    t.row([
        "replication factor".to_string(),
        s.replication_factor.to_string(),
    ]);
    t.row(["storage".to_string(), storage(s.storage).to_string()]);
    t.row(["compression".to_string(), s.compression.name().to_string()]);
    t.row(["max value size".to_string(), bytes(s.max_value_bytes)]);
    t.row([
        "read quota".to_string(),
        s.read_quota_keys_per_s
            .map(|q| format!("{q} keys/s"))
            .unwrap_or_else(|| "unlimited".into()),
    ]);
    t.row([
        "storage quota".to_string(),
        s.storage_quota_bytes
            .map(bytes)
            .unwrap_or_else(|| "unlimited".into()),
    ]);
    t.row([
        "hybrid".to_string(),
        match &s.hybrid {
            Some(h) => format!(
                "rewind {} s, lag bound {} records, real-time topic {}",
                h.rewind_seconds,
                h.lag_records_max,
                realtime_topic(&s.name)
            ),
            None => "no (batch only)".to_string(),
        },
    ]);
    if s.deleting {
        t.row(["state", "being deleted"]);
    }
    t.row([
        "versions kept".to_string(),
        match s.versions_to_keep {
            0..=2 => format!("{} (current and backup)", s.versions_to_keep),
            n => format!("{n} (current, backup and {} older)", n - 2),
        },
    ]);
    t.row(["current version".to_string(), opt(s.current_version)]);
    t.row(["backup version".to_string(), opt(s.backup_version)]);
    t.row(["largest version".to_string(), s.largest_version.to_string()]);
    t.row([
        "value schemas".to_string(),
        s.value_schemas
            .iter()
            .map(|v| v.id.to_string())
            .collect::<Vec<_>>()
            .join(","),
    ]);
    out.push_str(&t.render());
    if d.versions.is_empty() {
        out.push_str("\nno versions yet: start one with `rialto-push`\n");
        return out;
    }
    out.push('\n');
    out.push_str(&versions(d));
    for v in &d.versions {
        let (st, _) = status(&v.record.status);
        out.push_str(&format!(
            "\nversion {} ({st}) replicas:\n",
            v.record.version
        ));
        out.push_str(&replicas(v));
    }
    out
}

/// `versions list`: one row per version of a store.
pub fn versions(d: &StoreDescription) -> String {
    let s = &d.store;
    let mut versions = Table::new([
        "VERSION",
        "STATUS",
        "ROLE",
        "TOPIC",
        "PARTITIONS",
        "STORAGE",
        "COMPRESSION",
        "VALUES",
        "DISK",
        "MEMORY",
        "REASON",
    ]);
    for v in &d.versions {
        let (st, reason) = status(&v.record.status);
        let role = if v.current {
            "current"
        } else if s.backup_version == Some(v.record.version) {
            "backup"
        } else {
            ""
        };
        versions.row([
            v.record.version.to_string(),
            st,
            role.to_string(),
            v.record.topic.clone(),
            v.record.partition_count.to_string(),
            storage(v.record.storage).to_string(),
            v.record.compression.name().to_string(),
            match v.record.value_format {
                ValueFormat::SchemaIdPrefixed => "plain",
                ValueFormat::Checksummed => "checksummed",
            }
            .to_string(),
            bytes(v.replicas.iter().map(|r| r.disk_bytes).sum()),
            bytes(v.replicas.iter().map(|r| r.memory_bytes).sum()),
            reason.unwrap_or("").to_string(),
        ]);
    }
    versions.render()
}

/// `nodes list`.
pub fn nodes(nodes: &[NodeRecord]) -> String {
    let mut t = Table::new(["NODE", "ADDRESS", "ZONE", "TLS"]);
    for n in nodes {
        t.row([
            n.node_id.clone(),
            n.address.clone(),
            n.zone.clone(),
            if n.tls { "yes" } else { "no" }.to_string(),
        ]);
    }
    t.render()
}

/// `realtime decisions`.
pub fn realtime_decisions(decisions: &[rialto_protocol::meta::RealtimeDecision]) -> String {
    let mut t = Table::new(["PARTITION", "OFFSET", "ACTION", "BY", "AGE"]);
    let now = rialto_protocol::meta::now_ms();
    for d in decisions {
        t.row([
            d.partition.to_string(),
            d.offset.to_string(),
            d.action.name().to_string(),
            d.decided_by.clone(),
            format!("{} s", (now - d.decided_ms).max(0) / 1000),
        ]);
    }
    t.render()
}

/// `realtime writers`.
pub fn realtime_writers(writers: &[rialto_protocol::admin::RealtimeWriterView]) -> String {
    let mut t = Table::new(["PRODUCER", "REGISTERED BY", "AGE"]);
    let now = rialto_protocol::meta::now_ms();
    for w in writers {
        t.row([
            w.producer.clone(),
            w.registered_by.clone(),
            format!("{} s", (now - w.registered_ms).max(0) / 1000),
        ]);
    }
    t.render()
}

/// `controllers`.
pub fn controllers(v: &rialto_protocol::admin::ControllersView) -> String {
    let leader = match (&v.leader, v.leader_since_ms) {
        (Some(id), Some(since)) => {
            let held_s = (rialto_protocol::meta::now_ms() - since).max(0) / 1000;
            format!("{id} (leading for {held_s} s)")
        }
        (Some(id), None) => id.clone(),
        (None, _) => "none (an election is under way)".to_string(),
    };
    format!("leader: {leader}\nanswered by: {}\n", v.answered_by)
}

/// `nodes describe`.
pub fn node_description(d: &NodeDescription) -> String {
    let mut t = Table::new(["node", d.node_id.as_str()]);
    match &d.record {
        Some(r) => {
            t.row(["address", r.address.as_str()]);
            t.row(["zone", r.zone.as_str()]);
            t.row(["tls", if r.tls { "yes" } else { "no" }]);
        }
        None => t.row(["registration", "none: the node is down (its lease expired)"]),
    }
    t.row([
        "draining",
        if d.draining {
            "yes: its replicas move to other nodes; new versions skip it"
        } else {
            "no"
        },
    ]);
    t.row(["replicas".to_string(), d.replicas.len().to_string()]);
    let mut out = t.render();
    if d.replicas.is_empty() {
        return out;
    }
    let mut r = Table::new(["STORE", "VERSION", "PARTITION", "GROUP", "STATE", "MOVE"]);
    for x in &d.replicas {
        r.row([
            x.store.clone(),
            x.version.to_string(),
            x.partition.to_string(),
            opt(x.group),
            x.state.to_string(),
            match (&x.replaces, &x.moving_to) {
                (Some(from), _) => format!("replaces {from}"),
                (None, Some(to)) => format!("moving to {to}"),
                (None, None) => String::new(),
            },
        ]);
    }
    out.push('\n');
    out.push_str(&r.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(["A", "LONG HEADER"]);
        t.row(["wide cell", "x"]);
        t.row(["b"]);
        assert_eq!(t.render(), "A          LONG HEADER\nwide cell  x\nb\n");
    }

    #[test]
    fn node_table_lists_every_node() {
        let n = NodeRecord {
            node_id: "n1".into(),
            address: "h:1".into(),
            zone: "z".into(),
            tls: true,
            started_ms: 0,
        };
        let out = nodes(&[n]);
        assert!(
            out.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("n1") && l.ends_with("yes")),
            "{out}"
        );
    }
}

/// An ACL: one line per principal with its permissions.
pub fn acl(record: &rialto_protocol::acl::AclRecord) -> String {
    if record.grants.is_empty() {
        return "(no grants)\n".to_string();
    }
    let width = record
        .grants
        .keys()
        .map(|p| p.len())
        .max()
        .unwrap_or(0)
        .max(9);
    let mut out = format!("{:<width$}  PERMISSIONS\n", "PRINCIPAL");
    for (principal, permissions) in &record.grants {
        let names: Vec<&str> = permissions.iter().map(|p| p.name()).collect();
        out.push_str(&format!("{principal:<width$}  {}\n", names.join(",")));
    }
    out
}

/// Value schemas by id, newest last, each as compact JSON on its own line.
pub fn value_schemas(schemas: &[rialto_protocol::meta::ValueSchema]) -> String {
    let mut sorted: Vec<_> = schemas.iter().collect();
    sorted.sort_by_key(|s| s.id);
    let mut out = String::from("ID  SCHEMA\n");
    for schema in sorted {
        let compact = serde_json::from_str::<serde_json::Value>(&schema.schema)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| schema.schema.clone());
        out.push_str(&format!("{:<2}  {compact}\n", schema.id));
    }
    out
}
