//! The routing table: which servers serve which partition of the version reads go to.
//!
//! [`build_routing_table`] is a pure function of the mirrored metadata (store record, version
//! records, replica records, node records) and the version the client routes to now. It is rebuilt
//! on every metadata change and swapped in whole; a request keeps the table it started with.
//!
//! A replica is routable when its record says ONLINE for the chosen version and its node record
//! exists (replica and node records live under the server's lease, so a dead server drops out).
//! Records that do not parse are skipped with a warning: one bad record must not stop reads.
//!
//! **Invariant:** the table moves to a new current version only once every partition of that
//! version has at least one routable replica. Until then it keeps routing to the version it routed
//! to before (whose replicas stay up as the backup), so a version swap never leaves a partition
//! without replicas (Venice's "no available replicas during version switch").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rialto_protocol::meta::{
    Compression, Layout, NodeRecord, ReplicaRecord, ReplicaState, StoreRecord, ValueFormat,
    VersionRecord, DEFAULT_MAX_VALUE_BYTES, PARTITION_COUNT_MAX,
};

/// A mirrored prefix: key → value (the same shape as `rialto_backends::mirror::PrefixMap`).
pub type RecordMap = BTreeMap<String, Vec<u8>>;

/// One routable replica of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The server's node id.
    pub node_id: String,
    /// `host:port` of the server's HTTP/2 read endpoint.
    pub address: String,
    /// Whether the endpoint speaks TLS.
    pub tls: bool,
    /// The server's zone.
    pub zone: String,
    /// The replica's logical zone (group): its position in the version's assignment of this
    /// partition. Group-based placement puts one full copy of the version in each group, so a
    /// batch-get can be served by the servers of one group. `None` when the node is not in the
    /// version record's assignment (an old or unreadable record).
    pub group: Option<u32>,
}

/// Where reads go: one version, its partition count, and the routable replicas of each partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutingTable {
    /// Whether the store record exists.
    pub store_exists: bool,
    /// The version reads go to; `None` while the store has no current version.
    pub version: Option<u32>,
    /// Partition count of `version` (0 when there is no version).
    pub partition_count: u32,
    /// `partitions[p]` lists the routable replicas of partition `p`.
    pub partitions: Vec<Vec<Replica>>,
    /// The store's current version when the table still routes to an older version because the
    /// current one does not have a routable replica for every partition yet.
    pub pending_version: Option<u32>,
    /// `groups[g]` lists the distinct servers of group (logical zone) `g` in this table, one
    /// [`Replica`] per server. Empty when the version record does not give groups.
    pub groups: Vec<Vec<Replica>>,
    /// How `version`'s values are laid out and compressed.
    pub values: ValueLayout,
}

/// How one version's values are stored: what the client undoes to return them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueLayout {
    pub compression: Compression,
    pub format: ValueFormat,
    /// Largest decompressed value the version holds.
    pub max_value_bytes: u64,
}

impl Default for ValueLayout {
    fn default() -> Self {
        ValueLayout {
            compression: Compression::None,
            format: ValueFormat::SchemaIdPrefixed,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl ValueLayout {
    fn of(v: &VersionRecord) -> ValueLayout {
        ValueLayout {
            compression: v.compression,
            format: v.value_format,
            max_value_bytes: v.max_value_bytes,
        }
    }
}

impl RoutingTable {
    /// Whether every partition has at least one routable replica.
    pub fn is_complete(&self) -> bool {
        self.version.is_some()
            && !self.partitions.is_empty()
            && self.partitions.iter().all(|r| !r.is_empty())
    }

    /// Every distinct server address in the table, in order (connections open in it).
    pub fn addresses(&self) -> BTreeSet<(String, bool)> {
        self.partitions
            .iter()
            .flatten()
            .map(|r| (r.address.clone(), r.tls))
            .collect()
    }
}

/// The replicas of one version, before the choice of version.
struct VersionRoutes {
    partition_count: u32,
    partitions: Vec<Vec<Replica>>,
    values: ValueLayout,
}

impl VersionRoutes {
    fn is_complete(&self) -> bool {
        !self.partitions.is_empty() && self.partitions.iter().all(|r| !r.is_empty())
    }
}

/// Builds the routing table from mirrored metadata.
///
/// `routed_version` is the version the client routes to now (from its previous table); it is kept
/// while the store's current version lacks coverage. `versions`, `replicas` and `nodes` are the
/// mirrors of the store's versions prefix, the store's replicas prefix and the nodes prefix.
pub fn build_routing_table(
    layout: &Layout,
    store: &str,
    store_record: Option<&StoreRecord>,
    versions: &RecordMap,
    replicas: &RecordMap,
    nodes: &RecordMap,
    routed_version: Option<u32>,
) -> RoutingTable {
    let Some(record) = store_record else {
        return RoutingTable::default();
    };
    let Some(current) = record.current_version else {
        return RoutingTable {
            store_exists: true,
            ..RoutingTable::default()
        };
    };
    let nodes = parse_nodes(layout, nodes);
    let routes_of = |version| version_routes(layout, store, version, versions, replicas, &nodes);
    let table = |version, routes: VersionRoutes, pending_version| RoutingTable {
        store_exists: true,
        version: Some(version),
        partition_count: routes.partition_count,
        groups: groups_of(&routes.partitions),
        partitions: routes.partitions,
        pending_version,
        values: routes.values,
    };

    let current_routes = routes_of(current);
    if current_routes
        .as_ref()
        .is_some_and(VersionRoutes::is_complete)
        || routed_version == Some(current)
    {
        if let Some(routes) = current_routes {
            return table(current, routes, None);
        }
    }
    // The current version lacks coverage: keep the version we route to now, or on a fresh start
    // the backup version, if that one is fully covered.
    let fallback = match routed_version {
        Some(v) if v != current => Some(v),
        Some(_) => None,
        None => record.backup_version.filter(|v| *v != current),
    };
    if let Some(v) = fallback {
        if let Some(routes) = routes_of(v).filter(VersionRoutes::is_complete) {
            tracing::info!(
                store,
                current,
                routed = v,
                "current version does not have an ONLINE replica for every partition yet; still routing to version {v}"
            );
            return table(v, routes, Some(current));
        }
    }
    match current_routes {
        Some(routes) => table(current, routes, None),
        // The version shape is unknown (no usable record): route nowhere, reads report no replica.
        None => RoutingTable {
            store_exists: true,
            version: Some(current),
            ..RoutingTable::default()
        },
    }
}

/// The distinct servers of each group, by group number (sorted by address).
fn groups_of(partitions: &[Vec<Replica>]) -> Vec<Vec<Replica>> {
    let mut groups: Vec<BTreeMap<&str, &Replica>> = Vec::new();
    for replica in partitions.iter().flatten() {
        let Some(g) = replica.group else { continue };
        let g = g as usize;
        if g >= groups.len() {
            groups.resize_with(g + 1, BTreeMap::new);
        }
        groups[g].entry(replica.address.as_str()).or_insert(replica);
    }
    groups
        .into_iter()
        .map(|g| g.into_values().cloned().collect())
        .collect()
}

fn parse_nodes<'a>(layout: &Layout, nodes: &'a RecordMap) -> HashMap<&'a str, NodeRecord> {
    let prefix = layout.nodes_prefix();
    let mut out = HashMap::with_capacity(nodes.len());
    for (key, value) in nodes {
        let Some(node_id) = key.strip_prefix(&prefix) else {
            continue;
        };
        match rialto_protocol::meta::decode_record::<NodeRecord>(value) {
            Ok(record) => {
                out.insert(node_id, record);
            }
            Err(e) => tracing::warn!(key, error = %e, "ignoring unparsable node record"),
        }
    }
    out
}

/// The routable replicas of `version`, or `None` when its partition count is unknown or invalid.
fn version_routes(
    layout: &Layout,
    store: &str,
    version: u32,
    versions: &RecordMap,
    replicas: &RecordMap,
    nodes: &HashMap<&str, NodeRecord>,
) -> Option<VersionRoutes> {
    let version_key = layout.version(store, version);
    // Without its record, a version's value layout is unknown: its values cannot be read.
    let (partition_count, record, values) = match versions
        .get(&version_key)
        .map(|v| rialto_protocol::meta::decode_record::<VersionRecord>(v))
    {
        Some(Ok(v)) => {
            let values = ValueLayout::of(&v);
            (v.partition_count, v, values)
        }
        Some(Err(e)) => {
            tracing::warn!(key = version_key, error = %e, "unparsable version record; not routing to the version");
            return None;
        }
        None => {
            tracing::debug!(
                key = version_key,
                "no version record (yet); not routing to the version"
            );
            return None;
        }
    };
    if partition_count == 0 || partition_count > PARTITION_COUNT_MAX {
        tracing::warn!(
            store,
            version,
            partition_count,
            "version has an invalid partition count; not routing to it"
        );
        return None;
    }
    let mut partitions = vec![Vec::new(); partition_count as usize];
    let prefix = layout.version_replicas_prefix(store, version);
    for (key, value) in replicas
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
    {
        let Some((s, v, partition, node_id)) = layout.parse_replica_key(key) else {
            tracing::warn!(key, "ignoring replica record with an unparsable key");
            continue;
        };
        if s != store || v != version {
            continue;
        }
        let Some(slot) = partitions.get_mut(partition as usize) else {
            tracing::warn!(
                key,
                partition_count,
                "ignoring replica record of a partition beyond the partition count"
            );
            continue;
        };
        let state = match rialto_protocol::meta::decode_record::<ReplicaRecord>(value) {
            Ok(r) => r.state,
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring unparsable replica record");
                continue;
            }
        };
        if state != ReplicaState::Online {
            continue;
        }
        let Some(node) = nodes.get(node_id) else {
            continue;
        };
        // A move's target serves in the group it moves into, beside the replica it replaces.
        let group = record.group_of(partition, node_id);
        slot.push(Replica {
            node_id: node_id.to_string(),
            address: node.address.clone(),
            tls: node.tls,
            zone: node.zone.clone(),
            group,
        });
    }
    for slot in &mut partitions {
        slot.sort_by_key(|r| r.group.unwrap_or(u32::MAX));
    }
    Some(VersionRoutes {
        partition_count,
        partitions,
        values,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rialto_protocol::meta::{StorageProfile, VersionStatus};

    pub(crate) fn store_record(
        current: Option<u32>,
        backup: Option<u32>,
        partition_count: u32,
    ) -> StoreRecord {
        StoreRecord {
            name: "ads".into(),
            owner: "team".into(),
            key_schema: r#""string""#.into(),
            value_schemas: vec![],
            partition_count,
            replication_factor: 2,
            storage: StorageProfile::OnDisk,
            compression: rialto_protocol::meta::Compression::None,
            max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
            hybrid: None,
            created_ms: 0,
            current_version: current,
            backup_version: backup,
            largest_version: current.unwrap_or(0),
            deleting: false,
            read_quota_keys_per_s: None,
            storage_quota_bytes: None,
            versions_to_keep: 2,
        }
    }

    struct Meta {
        layout: Layout,
        versions: RecordMap,
        replicas: RecordMap,
        nodes: RecordMap,
    }

    impl Meta {
        fn new() -> Meta {
            Meta {
                layout: Layout::new("/rialto"),
                versions: RecordMap::new(),
                replicas: RecordMap::new(),
                nodes: RecordMap::new(),
            }
        }
        fn node(&mut self, id: &str) {
            let r = NodeRecord {
                node_id: id.into(),
                address: format!("{id}:1"),
                zone: "z".into(),
                tls: false,
                started_ms: 0,
            };
            self.nodes
                .insert(self.layout.node(id), serde_json::to_vec(&r).unwrap());
        }
        fn version(&mut self, v: u32, partition_count: u32) {
            let r = VersionRecord {
                store: "ads".into(),
                version: v,
                topic: format!("ads_v{v}"),
                partition_count,
                assignment: vec![],
                status: VersionStatus::Online,
                created_ms: 0,
                storage: StorageProfile::OnDisk,
                compression: rialto_protocol::meta::Compression::None,
                value_format: rialto_protocol::meta::ValueFormat::SchemaIdPrefixed,
                max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
                hybrid: None,
                moves: vec![],
                pushed_by: None,
                sealed: false,
                producer: None,
                failed_targets: Vec::new(),
            };
            self.versions.insert(
                self.layout.version("ads", v),
                serde_json::to_vec(&r).unwrap(),
            );
        }
        fn replica(&mut self, v: u32, p: u32, node: &str, state: ReplicaState) {
            let r = ReplicaRecord {
                state,
                offset: 0,
                records: 0,
                consumed_from: 0,
                updated_ms: 0,
                error: None,
                disk_bytes: 0,
                memory_bytes: 0,
                lag: None,
                leader: false,
                following: false,
            };
            self.replicas.insert(
                self.layout.replica("ads", v, p, node),
                serde_json::to_vec(&r).unwrap(),
            );
        }
        fn build(&self, record: &StoreRecord, routed: Option<u32>) -> RoutingTable {
            build_routing_table(
                &self.layout,
                "ads",
                Some(record),
                &self.versions,
                &self.replicas,
                &self.nodes,
                routed,
            )
        }
    }

    fn nodes_of(t: &RoutingTable, p: usize) -> Vec<&str> {
        t.partitions[p].iter().map(|r| r.node_id.as_str()).collect()
    }

    #[test]
    fn only_online_replicas_of_the_current_version_on_registered_nodes() {
        let mut m = Meta::new();
        m.node("a");
        m.node("b");
        m.version(1, 2);
        m.replica(1, 0, "a", ReplicaState::Online);
        m.replica(1, 0, "b", ReplicaState::Bootstrap);
        m.replica(1, 1, "b", ReplicaState::Online);
        m.replica(1, 1, "gone", ReplicaState::Online); // no node record: server died
        m.replica(2, 0, "b", ReplicaState::Online); // another version
        let t = m.build(&store_record(Some(1), None, 2), None);
        assert_eq!(t.version, Some(1));
        assert_eq!(t.partition_count, 2);
        assert_eq!(nodes_of(&t, 0), vec!["a"]);
        assert_eq!(nodes_of(&t, 1), vec!["b"]);
        assert_eq!(t.partitions[0][0].address, "a:1");
        assert!(t.is_complete());
        assert_eq!(t.pending_version, None);
    }

    #[test]
    fn no_store_and_no_current_version() {
        let m = Meta::new();
        let t = build_routing_table(
            &m.layout,
            "ads",
            None,
            &m.versions,
            &m.replicas,
            &m.nodes,
            None,
        );
        assert!(!t.store_exists);
        let t = m.build(&store_record(None, None, 2), None);
        assert!(t.store_exists);
        assert_eq!(t.version, None);
    }

    #[test]
    fn waits_for_full_coverage_before_switching() {
        let mut m = Meta::new();
        m.node("a");
        m.node("b");
        m.version(1, 2);
        m.version(2, 2);
        m.replica(1, 0, "a", ReplicaState::Online);
        m.replica(1, 1, "a", ReplicaState::Online);
        m.replica(2, 0, "b", ReplicaState::Online);
        m.replica(2, 1, "b", ReplicaState::Bootstrap);
        let t = m.build(&store_record(Some(2), Some(1), 2), Some(1));
        assert_eq!(
            t.version,
            Some(1),
            "partition 1 of v2 has no ONLINE replica yet"
        );
        assert_eq!(t.pending_version, Some(2));
        // A fresh client falls back to the backup version the same way.
        assert_eq!(
            m.build(&store_record(Some(2), Some(1), 2), None).version,
            Some(1)
        );

        m.replica(2, 1, "b", ReplicaState::Online);
        let t = m.build(&store_record(Some(2), Some(1), 2), Some(1));
        assert_eq!(t.version, Some(2));
        assert_eq!(t.pending_version, None);
        assert!(t.is_complete());
    }

    #[test]
    fn stays_on_a_current_version_that_loses_a_partition() {
        let mut m = Meta::new();
        m.node("a");
        m.version(1, 2);
        m.version(2, 2);
        m.replica(1, 0, "a", ReplicaState::Online);
        m.replica(1, 1, "a", ReplicaState::Online);
        m.replica(2, 0, "a", ReplicaState::Online);
        // Already routing to v2: an uncovered partition does not send reads back to old data.
        let t = m.build(&store_record(Some(2), Some(1), 2), Some(2));
        assert_eq!(t.version, Some(2));
        assert!(t.partitions[1].is_empty());
        // Neither version covered: route to the current one.
        let mut m2 = Meta::new();
        m2.node("a");
        m2.version(2, 2);
        m2.replica(2, 0, "a", ReplicaState::Online);
        assert_eq!(
            m2.build(&store_record(Some(2), Some(1), 2), Some(1))
                .version,
            Some(2)
        );
    }

    #[test]
    fn ignores_unparsable_records() {
        let mut m = Meta::new();
        m.node("a");
        m.node("b");
        m.nodes.insert(m.layout.node("b"), b"{garbage".to_vec());
        m.version(1, 2);
        m.replica(1, 0, "a", ReplicaState::Online);
        m.replica(1, 1, "a", ReplicaState::Online);
        m.replica(1, 0, "b", ReplicaState::Online);
        m.replicas
            .insert(m.layout.replica("ads", 1, 1, "c"), b"not json".to_vec());
        m.replicas.insert(
            "/rialto/replicas/ads/0000000001/xx/a".into(),
            b"{}".to_vec(),
        );
        m.replicas.insert(
            m.layout.replica("ads", 1, 7, "a"),
            m.replicas[&m.layout.replica("ads", 1, 0, "a")].clone(),
        );
        let t = m.build(&store_record(Some(1), None, 2), None);
        assert_eq!(nodes_of(&t, 0), vec!["a"]);
        assert_eq!(nodes_of(&t, 1), vec!["a"]);
    }

    #[test]
    fn version_record_partition_count_wins_and_invalid_counts_do_not_route() {
        let mut m = Meta::new();
        m.node("a");
        m.version(1, 3);
        for p in 0..3 {
            m.replica(1, p, "a", ReplicaState::Online);
        }
        let t = m.build(&store_record(Some(1), None, 2), None);
        assert_eq!(t.partition_count, 3);
        assert!(t.is_complete());
        let t = m.build(&store_record(Some(5), None, 0), None);
        assert_eq!(t.version, Some(5));
        assert!(t.partitions.is_empty());
        assert!(!t.is_complete());
    }
}
