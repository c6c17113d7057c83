//! Read admission: load shedding and per-store read quotas (seed 01's multi-tenancy).
//!
//! * **Load shedding.** At most `in_flight_max` reads (gets and batch-gets) run at once; one
//!   more is answered `overloaded` (retryable) before any work is done, so an overloaded server
//!   answers fast and the client tries another replica and backs this one off.
//! * **Read quotas.** A store's quota (keys per second; a get costs 1, a batch-get its key count)
//!   is split over the servers in proportion to the replicas of its current version each one
//!   hosts, and enforced here with a token bucket holding one second of this server's share. A
//!   read that finds the bucket empty is answered `quota_exceeded`, which the client does not
//!   retry elsewhere: every replica enforces its own share. A batch-get larger than a second of
//!   quota is admitted when the bucket is not empty and leaves it in debt, so large batches are
//!   slowed, never starved, and the long-run rate stays the quota.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use rialto_backends::mirror::PrefixMap;
use rialto_backends::PrefixMirror;
use rialto_protocol::meta::{Layout, StoreRecord, VersionRecord};
use rialto_protocol::rate::TokenBucket;
use rialto_protocol::ErrorCode;
use std::time::Instant;
use tokio::sync::watch;

use crate::node::NodeContext;
use crate::Stop;

/// Default bound on reads in flight on one server.
pub const IN_FLIGHT_MAX_DEFAULT: usize = 512;

/// A read in flight; ends when dropped.
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The admission state of one server.
#[derive(Debug)]
pub struct ReadLimits {
    in_flight: AtomicUsize,
    in_flight_max: usize,
    /// Store → this server's bucket (stores without a quota are absent).
    quotas: RwLock<HashMap<String, Arc<TokenBucket>>>,
}

impl ReadLimits {
    pub fn new(in_flight_max: usize) -> ReadLimits {
        ReadLimits {
            in_flight: AtomicUsize::new(0),
            in_flight_max: in_flight_max.max(1),
            quotas: RwLock::new(HashMap::new()),
        }
    }

    /// Admits one more read, or refuses it with `overloaded` when `in_flight_max` run already.
    pub(crate) fn enter(&self) -> Result<InFlight<'_>, (ErrorCode, String)> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(&self.in_flight);
        if before >= self.in_flight_max {
            return Err((
                ErrorCode::Overloaded,
                format!(
                    "server is at its bound of {} reads in flight; try another replica",
                    self.in_flight_max
                ),
            ));
        }
        Ok(guard)
    }

    /// Charges `keys` reads of `store` to its quota; `quota_exceeded` when none is left.
    pub(crate) fn charge(&self, store: &str, keys: usize) -> Result<(), (ErrorCode, String)> {
        self.charge_at(store, keys, Instant::now())
    }

    fn charge_at(&self, store: &str, keys: usize, now: Instant) -> Result<(), (ErrorCode, String)> {
        let bucket = self
            .quotas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(store)
            .cloned();
        match bucket {
            Some(b) if b.take(keys as f64, now).is_err() => Err((
                ErrorCode::QuotaExceeded,
                format!(
                    "store `{store}` is over its read quota on this server ({:.0} keys/s share); \
                     slow down or ask its owner to raise the quota (`rialto-admin stores update`)",
                    b.rate()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Installs this server's quota rates (keys/s by store); a store whose rate did not change
    /// keeps its bucket (and its tokens).
    pub fn set_rates(&self, rates: HashMap<String, f64>) {
        let mut quotas = self.quotas.write().unwrap_or_else(|e| e.into_inner());
        quotas.retain(|store, b| rates.get(store).is_some_and(|r| *r == b.rate()));
        for (store, rate) in rates {
            quotas
                .entry(store)
                .or_insert_with(|| Arc::new(TokenBucket::new(rate, rate.max(1.0), Instant::now())));
        }
    }

    /// Reads in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// This server's share of each store's read quota: the quota times the fraction of the current
/// version's replicas that `node_id` hosts. Stores without a quota, without a current version
/// or with no replica here get none.
pub fn quota_rates(
    layout: &Layout,
    stores: &PrefixMap,
    versions: &PrefixMap,
    node_id: &str,
) -> HashMap<String, f64> {
    let mut rates = HashMap::new();
    for value in stores.values() {
        let Ok(store) = rialto_protocol::meta::decode_record::<StoreRecord>(value) else {
            continue;
        };
        let (Some(quota), Some(current)) = (store.read_quota_keys_per_s, store.current_version)
        else {
            continue;
        };
        let Some(Ok(version)) = versions
            .get(&layout.version(&store.name, current))
            .map(|v| rialto_protocol::meta::decode_record::<VersionRecord>(v))
        else {
            continue;
        };
        let total = version.replicas().count();
        let here = version.replicas().filter(|(_, n)| *n == node_id).count();
        if total == 0 || here == 0 {
            continue;
        }
        rates.insert(store.name, quota as f64 * here as f64 / total as f64);
    }
    rates
}

/// Keeps `limits`' quotas equal to the stores' settings and placements, and `catalog` equal to
/// the stores' schemas and the versions' layouts, until shutdown.
pub(crate) async fn follow_stores(
    ctx: Arc<NodeContext>,
    limits: Arc<ReadLimits>,
    catalog: Arc<crate::compute::Catalog>,
    mut shutdown: watch::Receiver<Stop>,
) {
    let start = async {
        let stores = PrefixMirror::start(ctx.meta.clone(), ctx.layout.stores_prefix()).await?;
        let versions = PrefixMirror::start(ctx.meta.clone(), ctx.layout.versions_prefix()).await?;
        Ok::<_, rialto_backends::MetaError>((stores, versions))
    };
    let (stores, versions) = match start.await {
        Ok(mirrors) => mirrors,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow stores and versions; reads are not limited by quota and compute requests fail");
            return;
        }
    };
    let (mut s_rx, mut v_rx) = (stores.subscribe(), versions.subscribe());
    loop {
        let (stores_now, versions_now) = (stores.snapshot().await, versions.snapshot().await);
        limits.set_rates(quota_rates(
            &ctx.layout,
            &stores_now,
            &versions_now,
            &ctx.node_id,
        ));
        catalog.update(&stores_now, &versions_now);
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s != Stop::Running) => return,
            _ = s_rx.changed() => {}
            _ = v_rx.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_admits_its_rate_and_lets_a_large_batch_into_debt() {
        let limits = ReadLimits::new(10);
        limits.set_rates(HashMap::from([("s".to_string(), 100.0)]));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A second's worth at once, then nothing until it refills.
        assert!(limits.charge_at("s", 60, at(0)).is_ok());
        assert!(
            limits.charge_at("s", 60, at(0)).is_ok(),
            "40 left: admitted into debt"
        );
        assert_eq!(
            limits.charge_at("s", 1, at(0)).unwrap_err().0,
            ErrorCode::QuotaExceeded
        );
        assert!(
            limits.charge_at("s", 1, at(100)).is_err(),
            "10 refilled, still in debt"
        );
        assert!(limits.charge_at("s", 1, at(300)).is_ok());
        // Other stores are not limited.
        assert!(limits.charge_at("other", 1_000_000, at(300)).is_ok());
        assert!(limits.charge_at("s", 50, at(300)).is_ok());
        // An unchanged rate keeps the bucket (in debt); a new rate starts full.
        limits.set_rates(HashMap::from([("s".to_string(), 100.0)]));
        assert!(limits.charge_at("s", 1, at(300)).is_err());
        limits.set_rates(HashMap::from([("s".to_string(), 50.0)]));
        assert!(limits.charge_at("s", 1, at(300)).is_ok());
    }

    #[test]
    fn reads_past_the_bound_are_shed() {
        let limits = ReadLimits::new(2);
        let a = limits.enter().unwrap();
        let _b = limits.enter().unwrap();
        assert_eq!(limits.enter().err().unwrap().0, ErrorCode::Overloaded);
        assert_eq!(
            limits.in_flight(),
            2,
            "a refused read does not stay counted"
        );
        drop(a);
        assert!(limits.enter().is_ok());
    }
}
