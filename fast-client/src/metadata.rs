//! Following the store's metadata: four prefix mirrors, a rebuild of the routing table and of the
//! Avro codecs on every change, and the atomic swap of both.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rialto_backends::{MetaError, MetaStore, PrefixMirror};
use rialto_protocol::meta::{Layout, StoreRecord};

use crate::codecs::Codecs;
use crate::routing::{build_routing_table, RoutingTable};
use crate::shared::Shared;
use crate::stats::Counters;

/// Live copies of the metadata a client needs.
pub(crate) struct Mirrors {
    store_key: String,
    store: PrefixMirror,
    versions: PrefixMirror,
    replicas: PrefixMirror,
    nodes: PrefixMirror,
}

impl Mirrors {
    /// Lists and starts following the store record, its versions, its replicas and the nodes.
    pub(crate) async fn start(
        meta: Arc<dyn MetaStore>,
        layout: &Layout,
        store: &str,
    ) -> Result<Mirrors, MetaError> {
        let store_key = layout.store(store);
        Ok(Mirrors {
            store: PrefixMirror::start(meta.clone(), store_key.clone()).await?,
            versions: PrefixMirror::start(meta.clone(), layout.store_versions_prefix(store))
                .await?,
            replicas: PrefixMirror::start(meta.clone(), layout.store_replicas_prefix(store))
                .await?,
            nodes: PrefixMirror::start(meta, layout.nodes_prefix()).await?,
            store_key,
        })
    }

    /// The store record. The store mirror's prefix also matches longer store names (`ads` and
    /// `ads2`), so only the exact key counts.
    pub(crate) async fn store_record(&self) -> Result<Option<StoreRecord>, MetaError> {
        let Some(bytes) = self.store.with(|m| m.get(&self.store_key).cloned()).await else {
            return Ok(None);
        };
        rialto_protocol::meta::decode_record(&bytes)
            .map(Some)
            .map_err(|e| MetaError::Failed {
                context: format!("reading store record `{}`", self.store_key),
                detail: format!("cannot read the store record: {e}"),
            })
    }

    /// Builds the routing table from the current mirrors.
    pub(crate) async fn build(
        &self,
        layout: &Layout,
        store: &str,
        record: Option<&StoreRecord>,
        routed: Option<u32>,
    ) -> RoutingTable {
        let versions = self.versions.snapshot().await;
        let replicas = self.replicas.snapshot().await;
        let nodes = self.nodes.snapshot().await;
        build_routing_table(layout, store, record, &versions, &replicas, &nodes, routed)
    }
}

/// Rebuilds routing and codecs whenever any mirror changes; runs until the client is dropped.
pub(crate) async fn follow(shared: Arc<Shared>, mirrors: Mirrors) {
    let mut subs = [
        mirrors.store.subscribe(),
        mirrors.versions.subscribe(),
        mirrors.replicas.subscribe(),
        mirrors.nodes.subscribe(),
    ];
    loop {
        let changed = {
            let [a, b, c, d] = &mut subs;
            tokio::select! {
                biased;
                r = a.changed() => r,
                r = b.changed() => r,
                r = c.changed() => r,
                r = d.changed() => r,
            }
        };
        if changed.is_err() {
            return;
        }
        for sub in subs.iter_mut() {
            sub.borrow_and_update();
        }
        refresh(&shared, &mirrors).await;
    }
}

async fn refresh(shared: &Shared, mirrors: &Mirrors) {
    let record = match mirrors.store_record().await {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(store = shared.store, error = %e, "keeping the previous routing table");
            return;
        }
    };
    if let Some(record) = &record {
        if !shared.codecs().matches(record) {
            match Codecs::from_record(record, &shared.reader_schema) {
                Ok(codecs) => {
                    tracing::info!(
                        store = shared.store,
                        value_schemas = codecs.values.len(),
                        "store schemas changed"
                    );
                    *shared.codecs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(codecs);
                }
                Err(e) => {
                    tracing::warn!(store = shared.store, error = %e, "keeping the previous schemas")
                }
            }
        }
    }
    let routed = shared.table().version;
    let table = mirrors
        .build(&shared.layout, &shared.store, record.as_ref(), routed)
        .await;
    if *shared.table() == table {
        return;
    }
    // Connect to servers new in this table before routing to them.
    let new_addresses: BTreeSet<(String, bool)> = table
        .addresses()
        .difference(&shared.table().addresses())
        .cloned()
        .collect();
    warm(shared, new_addresses, WARM_WAIT).await;
    // Fetch a new version's compression dictionary before routing to it; if no server gives it,
    // keep routing to the version we have (if any) and try again on the next change.
    if let Err(e) = shared
        .values
        .for_table(&shared.pool, &shared.store, &table)
        .await
    {
        if shared.table().version.is_some() && shared.table().version != table.version {
            tracing::warn!(store = shared.store, error = %e, "not routing to the new version yet");
            return;
        }
        tracing::warn!(store = shared.store, error = %e, "reads of this version fail until its dictionary can be fetched");
    }
    install(shared, table);
}

/// How long a metadata change waits for connections to new servers before it is routed.
const WARM_WAIT: Duration = Duration::from_millis(500);

/// Swaps in `table` if it differs from the current one.
pub(crate) fn install(shared: &Shared, table: RoutingTable) {
    let old = shared.table();
    if *old == table {
        return;
    }
    if let (Some(from), Some(to)) = (old.version, table.version) {
        if from != to {
            Counters::add(&shared.counters.version_swaps, 1);
            tracing::info!(store = shared.store, from, to, "routing to a new version");
        }
    }
    Counters::add(&shared.counters.routing_updates, 1);
    let keep: HashSet<String> = table.addresses().into_iter().map(|(a, _)| a).collect();
    shared.pool.retain(&keep);
    shared.instances.retain(&keep);
    let versions: Vec<u32> = [table.version, table.pending_version]
        .into_iter()
        .flatten()
        .collect();
    shared.values.retain(&versions);
    shared.routing.send_replace(Arc::new(table));
}

/// Opens connections to `addresses` and waits for them up to `wait`; connections still opening
/// then finish in the background. Failures are logged, not returned (the servers get blocked
/// and probed once requests fail).
pub(crate) async fn warm(shared: &Shared, addresses: BTreeSet<(String, bool)>, wait: Duration) {
    if addresses.is_empty() {
        return;
    }
    let handles: Vec<_> = addresses
        .into_iter()
        .map(|(address, tls)| {
            let pool = shared.pool.clone();
            tokio::spawn(async move {
                if let Err(e) = pool.sender(&address, tls).await {
                    tracing::warn!(%address, error = %e, "could not warm connection to storage server");
                }
            })
        })
        .collect();
    let _ = tokio::time::timeout(wait, futures::future::join_all(handles)).await;
}
