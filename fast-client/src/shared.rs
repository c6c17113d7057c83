//! The state one client's handles share with its background tasks: configuration, routing,
//! schemas, connections, load and health, the retry budget, counters.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rialto_protocol::meta::Layout;
use tokio::sync::watch;

use crate::coalesce::Coalescer;
use crate::codecs::Codecs;
use crate::hedge::Hedger;
use crate::instances::Instances;
use crate::pool::ConnectionPool;
use crate::response::ReceivePool;
use crate::routing::RoutingTable;
use crate::stats::Counters;
use crate::values::ValueCodecs;
use crate::ClientConfig;

/// State shared by the client handles, the metadata follower and the health prober.
pub(crate) struct Shared {
    pub(crate) store: String,
    pub(crate) layout: Layout,
    pub(crate) request_timeout: Duration,
    pub(crate) group_routing: bool,
    pub(crate) sub_request_keys_max: usize,
    /// Memory batch-get responses are received into.
    pub(crate) receive_pool: Arc<ReceivePool>,
    pub(crate) routing: watch::Sender<Arc<RoutingTable>>,
    pub(crate) codecs: RwLock<Arc<Codecs>>,
    /// The schema values are returned in (`ClientConfig::reader_schema`).
    pub(crate) reader_schema: crate::ReaderSchema,
    pub(crate) pool: Arc<ConnectionPool>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) instances: Instances,
    pub(crate) hedger: Hedger,
    /// Checksums and decompression of the values of the versions routed to.
    pub(crate) values: ValueCodecs,
    pub(crate) verify_checksums: bool,
    /// Whether gets started while others are in flight share batch-gets.
    pub(crate) coalesce_gets: bool,
    /// The gets in flight and those waiting for the next shared batch-get.
    pub(crate) coalescer: Coalescer,
    rotation: AtomicUsize,
}

impl Shared {
    /// The shared state of a client of `config.store` routing by `table` from the start.
    pub(crate) fn new(
        config: &ClientConfig,
        layout: Layout,
        pool: Arc<ConnectionPool>,
        counters: Arc<Counters>,
        codecs: Codecs,
        table: RoutingTable,
    ) -> Shared {
        let (routing, _) = watch::channel(Arc::new(table));
        Shared {
            store: config.store.clone(),
            layout,
            request_timeout: config.request_timeout,
            group_routing: config.group_routing,
            sub_request_keys_max: config.sub_request_keys_max.max(1),
            receive_pool: ReceivePool::new(config.receive_pool_bytes),
            routing,
            codecs: RwLock::new(Arc::new(codecs)),
            reader_schema: config.reader_schema.clone(),
            pool,
            counters,
            instances: Instances::new(config.health.clone()),
            hedger: Hedger::new(config.long_tail.clone()),
            values: ValueCodecs::default(),
            verify_checksums: config.verify_checksums,
            coalesce_gets: config.coalesce_gets,
            coalescer: Coalescer::default(),
            rotation: AtomicUsize::new(0),
        }
    }

    /// The routing table in force now.
    pub(crate) fn table(&self) -> Arc<RoutingTable> {
        self.routing.borrow().clone()
    }

    /// The schemas in force now.
    pub(crate) fn codecs(&self) -> Arc<Codecs> {
        self.codecs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A key datum as JSON for messages (hex when it does not decode).
    pub(crate) fn show_key(&self, key: &[u8]) -> String {
        let codecs = self.codecs();
        codecs
            .key
            .decode(key, "key")
            .map(|v| codecs.key.to_json_text(&v))
            .unwrap_or_else(|_| {
                format!(
                    "0x{}",
                    key.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )
            })
    }

    /// Counts values decoded with (`verified`) and against (`mismatches`) their checksums.
    pub(crate) fn count_checksums(&self, verified: u64, mismatches: u64) {
        if verified > 0 {
            Counters::add(&self.counters.checksums_verified, verified);
        }
        if mismatches > 0 {
            Counters::add(&self.counters.checksum_mismatches, mismatches);
        }
    }

    /// A rotating number that spreads ties between equally loaded replicas and groups.
    pub(crate) fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }
}
