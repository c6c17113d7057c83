//! The read paths: single get (with least-loaded replica choice and long-tail retry) and the
//! batch-get entry points, which run on the streaming engine in [`crate::stream`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use rialto_backends::MetaStore;
use rialto_protocol::avro::Value;
use rialto_protocol::meta::Layout;
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::wire::{self, StoredValue};
use rialto_protocol::ErrorCode;
use tokio::time::Instant;

use crate::call::health_failure;
use crate::coalesce;
use crate::codecs::Codecs;
use crate::error::{error_response, ClientError, ERROR_BODY_BYTES_MAX};
use crate::hedge::RequestKind;
use crate::instances::count_block;
use crate::metadata::{self, Mirrors};
use crate::pool::ConnectionPool;
use crate::response::RawValue;
use crate::routing::{Replica, RoutingTable};
use crate::shared::Shared;
use crate::stats::{ClientStats, Counters};
use crate::stream::{self, BatchEvent, BatchStream, Completeness, RawBatchStream};
use crate::values::ValueFault;
use crate::{ClientConfig, BATCH_GET_KEYS_MAX};

/// Largest single-get response body the client accepts: a value, its schema id, and slack.
const GET_RESPONSE_BYTES_MAX: usize = rialto_protocol::stored::STORED_VALUE_BYTES_MAX;
/// How long the client waits for connections to new servers before routing to them.
const WARM_WAIT: Duration = Duration::from_secs(1);
/// Longest a read waits for this client's routing to catch up once a server said the version
/// it was routed to is gone (see `Client::rerouted`).
const ROUTING_CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// Aborts the background tasks (metadata follower, health prober) when the last handle drops.
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A connected reader of one store. Cheap to clone; clones share connections, routing, load and
/// health tracking and the retry budget.
#[derive(Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    _background: Arc<Background>,
}

/// Where one key goes.
struct Route<'t> {
    version: u32,
    partition: u32,
    replicas: &'t [Replica],
}

impl Client {
    /// Connects to the metadata of `config.store` and starts following it.
    ///
    /// Fails with [`ClientError::UnknownStore`] when the store does not exist, with
    /// [`ClientError::Schema`] when its key schema does not parse, with
    /// [`ClientError::Metadata`] when etcd cannot be read. A store without a current version is
    /// not an error here (reads report [`ClientError::NoCurrentVersion`]); `config.routing_wait`
    /// bounds how long this call waits for one. Connections to every serving server are opened
    /// before this returns (waiting at most one second for them).
    pub async fn connect(
        config: ClientConfig,
        meta: Arc<dyn MetaStore>,
    ) -> Result<Client, ClientError> {
        let layout = Layout::new(&config.meta_root);
        let counters = Arc::new(Counters::default());
        let pool = ConnectionPool::new(
            config.tls.as_ref(),
            config.network.clone(),
            counters.clone(),
        )?;
        let mirrors = Mirrors::start(meta, &layout, &config.store).await?;
        let record = mirrors
            .store_record()
            .await?
            .ok_or_else(|| ClientError::UnknownStore {
                store: config.store.clone(),
                root: layout.root().to_string(),
            })?;
        let codecs = Codecs::from_record(&record, &config.reader_schema)?;
        let table = mirrors
            .build(&layout, &config.store, Some(&record), None)
            .await;
        let addresses = table.addresses();
        let shared = Arc::new(Shared::new(&config, layout, pool, counters, codecs, table));
        metadata::warm(&shared, addresses, WARM_WAIT).await;
        if let Err(e) = shared
            .values
            .for_table(&shared.pool, &shared.store, &shared.table())
            .await
        {
            tracing::warn!(store = shared.store, error = %e, "reads of the current version fail until its dictionary can be fetched");
        }
        let follower = tokio::spawn(metadata::follow(shared.clone(), mirrors));
        let prober = tokio::spawn(probe_blocked(Arc::downgrade(&shared)));
        let client = Client {
            shared,
            _background: Arc::new(Background(vec![follower, prober])),
        };
        if !config.routing_wait.is_zero() {
            let mut routing = client.shared.routing.subscribe();
            let waited = tokio::time::timeout(
                config.routing_wait,
                routing.wait_for(|t| t.version.is_some()),
            )
            .await;
            if waited.is_err() {
                tracing::warn!(store = config.store, wait = ?config.routing_wait, "store has no current version yet");
            }
        }
        Ok(client)
    }

    /// Reads one key; `None` when the store has no value for it.
    pub async fn get(&self, key: &Value) -> Result<Option<Value>, ClientError> {
        let key_bytes = self.shared.codecs().key.encode(key, "key")?;
        match self.get_raw(&key_bytes).await? {
            Some(raw) => self.decode_value(&raw).map(Some),
            None => Ok(None),
        }
    }

    /// Reads one key given as its serialized Avro datum; returns the stored value undecoded.
    pub async fn get_raw(&self, key_bytes: &[u8]) -> Result<Option<RawValue>, ClientError> {
        Counters::add(&self.shared.counters.keys_requested, 1);
        let started = std::time::Instant::now();
        let table = self.shared.table();
        let in_flight = self
            .shared
            .coalesce_gets
            .then(|| self.shared.coalescer.enter());
        let coalesced = if in_flight.as_ref().is_some_and(|f| f.others) {
            coalesce::get(self, key_bytes)
                .await
                .into_result(self.shared.request_timeout)
        } else {
            None
        };
        let mut result = match coalesced {
            Some(result) => result,
            None => self.get_raw_inner(key_bytes, &table).await,
        };
        let failure = result
            .as_ref()
            .err()
            .map(|e| (e.is_retryable(), e.is_version_gone()));
        if let Some(fresh) = self.rerouted(&table, failure).await {
            result = self.get_raw_inner(key_bytes, &fresh).await;
        }
        self.shared.counters.get_latency.observe(started.elapsed());
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    /// Reads many keys; the result has one entry per key, in the order of `keys` (duplicates
    /// allowed). Keys that fail on one replica are retried on another; keys that still fail make
    /// the call return [`ClientError::Incomplete`]. Built on [`Client::batch_get_stream_raw`].
    pub async fn batch_get(&self, keys: &[Value]) -> Result<Vec<Option<Value>>, ClientError> {
        check_batch_size(keys.len())?;
        let codecs = self.shared.codecs();
        let encoded = keys
            .iter()
            .map(|k| codecs.key.encode(k, "key"))
            .collect::<Result<Vec<_>, _>>()?;
        let raw = self.batch_get_raw(&encoded).await?;
        raw.into_iter()
            .map(|v| v.map(|raw| self.decode_value(&raw)).transpose())
            .collect()
    }

    /// Reads many keys given as serialized Avro datums; values stay undecoded.
    pub async fn batch_get_raw(
        &self,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<RawValue>>, ClientError> {
        Counters::add(&self.shared.counters.keys_requested, keys.len() as u64);
        let table = self.shared.table();
        let (result, version_gone) = self.batch_get_raw_on(keys, table.clone()).await;
        let failure = result.as_ref().err().map(|e| {
            let retryable = matches!(e, ClientError::Incomplete { .. }) || e.is_retryable();
            (retryable, version_gone || e.is_version_gone())
        });
        match self.rerouted(&table, failure).await {
            // Every key again, so the answer still comes from one version.
            Some(fresh) => self.batch_get_raw_on(keys, fresh).await.0,
            None => result,
        }
    }

    /// The fresh routing table to try a failed read on once more: when the read failed in a
    /// way another replica or version may not, and the store's current version changed since
    /// the read was routed (its version may have been retired while the read was in flight,
    /// say on a link that stalled across a swap and the old version's removal). When a server
    /// said the routed version is gone and this client still routes to it, its routing lags
    /// (a metadata watch being re-established): it waits for it, at most
    /// [`ROUTING_CATCH_UP_WAIT`].
    async fn rerouted(
        &self,
        routed: &RoutingTable,
        failure: Option<(bool, bool)>,
    ) -> Option<Arc<RoutingTable>> {
        let (retryable, version_gone) = failure?;
        if !retryable {
            return None;
        }
        let mut routing = self.shared.routing.subscribe();
        if version_gone && routing.borrow().version == routed.version {
            let changed = routing.wait_for(|t| t.version != routed.version);
            let _ = tokio::time::timeout(ROUTING_CATCH_UP_WAIT, changed).await;
        }
        let fresh = self.shared.table();
        if fresh.version.is_none() || fresh.version == routed.version {
            return None;
        }
        Counters::add(&self.shared.counters.reroutes, 1);
        tracing::debug!(store = %self.shared.store, from = ?routed.version, to = ?fresh.version, "read failed on a replaced version; reading the current one");
        Some(fresh)
    }

    /// One batch-get on `table`, and whether a server said the version is gone.
    async fn batch_get_raw_on(
        &self,
        keys: &[Vec<u8>],
        table: Arc<RoutingTable>,
    ) -> (Result<Vec<Option<RawValue>>, ClientError>, bool) {
        let mut stream = match self.stream_on(keys, table) {
            Ok(stream) => stream,
            Err(e) => {
                self.count_error(&e);
                return (Err(e), false);
            }
        };
        let mut values: Vec<Option<RawValue>> = vec![None; keys.len()];
        while let Some(event) = stream.next().await {
            match event {
                BatchEvent::Record { index, value, .. } => {
                    if let Some(slot) = values.get_mut(index) {
                        *slot = value;
                    }
                }
                BatchEvent::Done(done) => {
                    let gone = done.version_gone;
                    return (complete(values, done), gone);
                }
            }
        }
        let ended =
            ClientError::Protocol("batch-get stream ended without its completion status".into());
        (Err(ended), false)
    }

    /// Streaming batch-get of serialized Avro keys: a [`Stream`](futures::Stream) of
    /// [`BatchEvent::Record`]s in the order servers answer, ending with [`BatchEvent::Done`],
    /// whose [`Completeness`] lists the keys that failed or timed out. Records arrive while the
    /// rest of the response is still on the wire; at `request_timeout` the stream ends with what
    /// it has. Fails up front for an unknown store, a store without a current version, or too
    /// many keys.
    pub fn batch_get_stream_raw(&self, keys: &[Vec<u8>]) -> Result<RawBatchStream, ClientError> {
        let result = self.start_stream(keys);
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    /// Streaming batch-get of Avro keys: like [`Client::batch_get_stream_raw`], with keys and
    /// values as Avro values. A value that does not decode is reported as a failed key in the
    /// final [`Completeness`].
    pub fn batch_get_stream(&self, keys: &[Value]) -> Result<BatchStream, ClientError> {
        let codecs = self.shared.codecs();
        let encoded = keys
            .iter()
            .map(|k| codecs.key.encode(k, "key"))
            .collect::<Result<Vec<_>, _>>()?;
        let raw = self.batch_get_stream_raw(&encoded)?;
        Ok(BatchStream::new(
            raw,
            keys.to_vec(),
            codecs,
            self.shared.store.clone(),
        ))
    }

    fn start_stream(&self, keys: &[Vec<u8>]) -> Result<RawBatchStream, ClientError> {
        Counters::add(&self.shared.counters.keys_requested, keys.len() as u64);
        self.stream_on(keys, self.shared.table())
    }

    fn stream_on(
        &self,
        keys: &[Vec<u8>],
        table: Arc<RoutingTable>,
    ) -> Result<RawBatchStream, ClientError> {
        check_batch_size(keys.len())?;
        let version = self.version_of(&table)?;
        Ok(stream::start(
            self.shared.clone(),
            table,
            version,
            keys,
            None,
        ))
    }

    /// The version reads go to now, from the live routing table.
    pub fn current_version(&self) -> Option<u32> {
        self.shared.table().version
    }

    /// The routing table in force now (for diagnostics).
    pub fn routing_table(&self) -> Arc<RoutingTable> {
        self.shared.table()
    }

    /// Counters since the client connected.
    /// The client's counters and call latency histograms in Prometheus text format, labelled
    /// with the store: a service appends it to its own `/metrics` answer.
    pub fn metrics_prometheus(&self) -> String {
        crate::stats::render_prometheus(&self.stats(), &self.shared.counters, &self.shared.store)
    }

    pub fn stats(&self) -> ClientStats {
        let mut stats = self.shared.counters.snapshot();
        stats.instances_blocked_now = self.shared.instances.blocked_count() as u64;
        let pool = self.shared.receive_pool.stats();
        stats.receive_blocks_reused = pool.reused;
        stats.receive_blocks_allocated = pool.allocated;
        stats.receive_pool_free_bytes = pool.free_bytes;
        stats
    }

    /// The current long-tail retry threshold of single gets and of batch-get requests of `keys`
    /// keys (they adapt to measured latency).
    pub fn long_tail_thresholds(&self, keys: usize) -> (Duration, Duration) {
        let hedger = &self.shared.hedger;
        (
            hedger.threshold(RequestKind::Get),
            hedger.threshold(hedger.batch_kind(keys)),
        )
    }

    fn count_error(&self, e: &ClientError) {
        Counters::add(&self.shared.counters.errors, 1);
        match e {
            ClientError::Timeout { .. } => Counters::add(&self.shared.counters.timeouts, 1),
            ClientError::QuotaExceeded { .. } => {
                Counters::add(&self.shared.counters.quota_refusals, 1)
            }
            _ => {}
        }
    }

    fn decode_value(&self, raw: &RawValue) -> Result<Value, ClientError> {
        self.shared.codecs().decode_value(&self.shared.store, raw)
    }

    fn route<'t>(&self, table: &'t RoutingTable, key: &[u8]) -> Result<Route<'t>, ClientError> {
        let version = self.version_of(table)?;
        if table.partitions.is_empty() {
            return Err(ClientError::NoReplica {
                partition: 0,
                version,
            });
        }
        let partition = partition_for_key(key, table.partitions.len() as u32);
        let replicas = table
            .partitions
            .get(partition as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if replicas.is_empty() {
            return Err(ClientError::NoReplica { partition, version });
        }
        Ok(Route {
            version,
            partition,
            replicas,
        })
    }

    pub(crate) fn version_of(&self, table: &RoutingTable) -> Result<u32, ClientError> {
        if !table.store_exists {
            return Err(ClientError::UnknownStore {
                store: self.shared.store.clone(),
                root: self.shared.layout.root().to_string(),
            });
        }
        table.version.ok_or_else(|| ClientError::NoCurrentVersion {
            store: self.shared.store.clone(),
        })
    }

    /// One get: the least-loaded replica first; a retryable error moves to the next untried
    /// replica at once; a request still pending after the long-tail threshold is hedged to
    /// another replica (within the retry budget, unless the timer fired late); first answer wins.
    async fn get_raw_inner(
        &self,
        key: &[u8],
        table: &Arc<RoutingTable>,
    ) -> Result<Option<RawValue>, ClientError> {
        let shared = &self.shared;
        let route = self.route(table, key)?;
        let values = shared
            .values
            .for_table(&shared.pool, &shared.store, table)
            .await?;
        let deadline = Instant::now() + shared.request_timeout;
        // A bodiless GET (one HEADERS frame, answered on the server's connection task) unless
        // the key is too long for a path.
        let (method, path, body) = if key.len() <= wire::PATH_KEY_BYTES_MAX {
            let path = wire::get_key_path(&shared.store, route.version, route.partition, key);
            (http::Method::GET, path, None)
        } else {
            let path = wire::get_path(&shared.store, route.version, route.partition);
            (http::Method::POST, path, Some(Bytes::copy_from_slice(key)))
        };
        let rotation = shared.next_rotation();
        let mut tried: u64 = 0;
        let mut attempts = FuturesUnordered::new();
        let mut last_address = String::new();
        let launch = |index: usize, hedge: bool| {
            let replica = &route.replicas[index];
            let instance = shared.instances.of(replica);
            let (method, path, body) = (method.clone(), path.as_str(), body.clone());
            async move {
                let _pending = instance.start();
                let started = Instant::now();
                let result = self.get_once(replica, method, path, body).await;
                (instance.clone(), hedge, started.elapsed(), result)
            }
        };
        let first = shared
            .instances
            .least_loaded(route.replicas, tried, rotation)
            .unwrap_or(0);
        tried |= 1 << first.min(63);
        last_address.clone_from(&route.replicas[first].address);
        shared.hedger.on_request();
        attempts.push(launch(first, false));
        let mut hedge_due = shared.hedger.due(RequestKind::Get, Instant::now());
        let verify = shared.verify_checksums && values.checksummed();
        loop {
            tokio::select! {
                biased;
                Some((instance, hedge, elapsed, result)) = attempts.next() => match result.and_then(|raw| {
                    // A value that fails its checksum is an error like any other: retried on
                    // another replica, never returned.
                    let Some(raw) = raw else { return Ok(None) };
                    match values.decode(raw, verify) {
                        Ok(value) => {
                            shared.count_checksums(u64::from(verify), 0);
                            Ok(Some(value))
                        }
                        Err(fault) => {
                            let checksum = matches!(fault, ValueFault::Checksum { .. });
                            shared.count_checksums(0, u64::from(checksum));
                            Err(fault.into_error(&shared.store, values.version(), shared.show_key(key), &instance.address))
                        }
                    }
                }) {
                    Ok(value) => {
                        instance.succeeded();
                        shared.hedger.record(RequestKind::Get, elapsed);
                        if hedge {
                            Counters::add(&shared.counters.long_tail_retries_won, 1);
                            // The replica it was hedged from is slow: avoid it for a while.
                            shared.instances.of(&route.replicas[first]).outpaced(&shared.instances.config);
                        }
                        return Ok(value);
                    }
                    Err(e) => {
                        if let Some(failure) = health_failure(&e) {
                            let newly = instance.failed(failure, &shared.instances.config);
                            count_block(&shared.counters, newly);
                        }
                        if !e.is_retryable() {
                            return Err(e);
                        }
                        tracing::debug!(address = instance.address, error = %e, "get failed; trying another replica");
                        if attempts.is_empty() {
                            match shared.instances.least_loaded(route.replicas, tried, rotation) {
                                Some(next) => {
                                    tried |= 1 << next.min(63);
                                    last_address.clone_from(&route.replicas[next].address);
                                    Counters::add(&shared.counters.retries, 1);
                                    attempts.push(launch(next, false));
                                }
                                None => return Err(e),
                            }
                        }
                    }
                },
                _ = tokio::time::sleep_until(hedge_due.unwrap_or(deadline)), if hedge_due.is_some() => {
                    let due = hedge_due.take().unwrap_or(deadline);
                    let now = Instant::now();
                    let Some(next) = shared.instances.least_loaded(route.replicas, tried, rotation) else {
                        continue;
                    };
                    if shared.hedger.is_late(due, now) {
                        Counters::add(&shared.counters.long_tail_retries_late, 1);
                    } else if !shared.hedger.try_take() {
                        Counters::add(&shared.counters.long_tail_retries_over_budget, 1);
                    } else {
                        tried |= 1 << next.min(63);
                        Counters::add(&shared.counters.long_tail_retries, 1);
                        attempts.push(launch(next, true));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    for replica in route.replicas.iter().enumerate().filter(|(i, _)| tried & (1 << (*i).min(63)) != 0).map(|(_, r)| r) {
                        let newly = shared.instances.of(replica).failed(crate::instances::Failure::Connection, &shared.instances.config);
                        count_block(&shared.counters, newly);
                    }
                    return Err(ClientError::Timeout {
                        address: last_address,
                        after: shared.request_timeout,
                    });
                }
            }
        }
    }

    async fn get_once(
        &self,
        replica: &Replica,
        method: http::Method,
        path: &str,
        key: Option<Bytes>,
    ) -> Result<Option<RawValue>, ClientError> {
        let pool = &self.shared.pool;
        let address = replica.address.as_str();
        let (parts, mut body) = pool.send(address, replica.tls, method, path, key).await?;
        if parts.status != http::StatusCode::OK {
            let bytes = pool
                .read_body(address, &mut body, ERROR_BODY_BYTES_MAX)
                .await?;
            return match error_response(address, &parts, &bytes) {
                ClientError::Server {
                    code: ErrorCode::KeyNotFound,
                    ..
                } => Ok(None),
                e => Err(e),
            };
        }
        let bytes = pool
            .read_body(address, &mut body, GET_RESPONSE_BYTES_MAX)
            .await?;
        let (schema_id, _) = StoredValue::decode(&bytes)
            .map_err(|e| ClientError::Protocol(format!("get response from {address}: {e}")))?;
        Ok(Some(RawValue {
            schema_id,
            bytes: bytes.slice(4..),
        }))
    }
}

/// The result of a batch-get from its values and completion status.
pub(crate) fn complete<T>(
    values: Vec<Option<T>>,
    done: Completeness,
) -> Result<Vec<Option<T>>, ClientError> {
    if done.is_complete() {
        return Ok(values);
    }
    if let Some(refusal) = done.forbidden {
        return Err(ClientError::Forbidden {
            address: refusal.address,
            message: refusal.message,
        });
    }
    if let Some(refusal) = done.quota_exceeded {
        return Err(ClientError::QuotaExceeded {
            address: refusal.address,
            message: refusal.message,
        });
    }
    Err(ClientError::Incomplete {
        failed_keys: done.failed.len().max(done.keys_total - done.keys_answered),
        first_error: done
            .failed
            .first()
            .map(|f| f.error.clone())
            .unwrap_or_default(),
    })
}

/// Probes blocked servers whose backoff ended (`GET /health`) until the client is dropped.
async fn probe_blocked(shared: std::sync::Weak<Shared>) {
    loop {
        let interval = match shared.upgrade() {
            Some(shared) => {
                for instance in shared.instances.due_for_probe() {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let timeout = shared.instances.config.probe_timeout;
                        let probe = shared.pool.send(
                            &instance.address,
                            instance.tls,
                            http::Method::GET,
                            wire::HEALTH_PATH,
                            None,
                        );
                        let healthy = matches!(
                            tokio::time::timeout(timeout, probe).await,
                            Ok(Ok((parts, _))) if parts.status == http::StatusCode::OK
                        );
                        tracing::debug!(address = instance.address, healthy, "health probe");
                        shared.instances.probed(&instance, healthy);
                    });
                }
                shared.instances.config.probe_interval
            }
            None => return,
        };
        tokio::time::sleep(interval).await;
    }
}

pub(crate) fn check_batch_size(count: usize) -> Result<(), ClientError> {
    if count > BATCH_GET_KEYS_MAX {
        return Err(ClientError::TooManyKeys {
            count,
            max: BATCH_GET_KEYS_MAX,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_partitioning_agrees_with_the_shared_partitioner() {
        // The client partitions the Avro datum of the key, exactly as the push job does.
        let codec = rialto_protocol::avro::AvroCodec::parse(r#""string""#).unwrap();
        for i in 0..100 {
            let key = format!("member-{i}");
            let datum = codec.encode(&Value::String(key.clone()), "key").unwrap();
            let mut expected = vec![(key.len() as u8) * 2];
            expected.extend_from_slice(key.as_bytes());
            assert_eq!(datum, expected);
            assert_eq!(
                partition_for_key(&datum, 16),
                partition_for_key(&expected, 16)
            );
            assert!(partition_for_key(&datum, 16) < 16);
        }
        // Pinned: the datum of "rialto" lands where the golden hash of its bytes says.
        let datum = codec
            .encode(&Value::String("rialto".into()), "key")
            .unwrap();
        assert_eq!(
            partition_for_key(&datum, 7),
            (xxhash_rust::xxh3::xxh3_64(&datum) % 7) as u32
        );
    }
}
