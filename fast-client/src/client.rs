//! The read paths: single get and batch-get, with replica rotation, failover and deadlines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rialto_backends::MetaStore;
use rialto_protocol::avro::{AvroError, Value};
use rialto_protocol::meta::Layout;
use rialto_protocol::partitioner::partition_for_key;
use rialto_protocol::wire::{self, BatchGetRequest, ErrorBody, StoredValue};
use rialto_protocol::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ClientError;
use crate::metadata::{self, Codecs, Mirrors};
use crate::pool::ConnectionPool;
use crate::response::{BatchResponseDecoder, KeyAnswer, RawValue};
use crate::routing::{Replica, RoutingTable};
use crate::stats::{ClientStats, Counters};
use crate::{ClientConfig, BATCH_GET_KEYS_MAX};

/// Largest single-get response body the client accepts: a value, its schema id, and slack.
const GET_RESPONSE_BYTES_MAX: usize = rialto_protocol::envelope::VALUE_BYTES_MAX + 64 * 1024;
/// Largest error-response body the client reads.
const ERROR_BODY_BYTES_MAX: usize = 64 * 1024;
/// Largest batch-get request body the client sends (the servers' default limit).
const BATCH_REQUEST_BYTES_MAX: usize = wire::REQUEST_BYTES_MAX;
/// Attempts per key of a batch-get: the first replica, then one other.
const BATCH_ATTEMPTS: usize = 2;

/// State shared by the client handles and the metadata follower.
pub(crate) struct Shared {
    pub(crate) store: String,
    pub(crate) layout: Layout,
    pub(crate) request_timeout: Duration,
    pub(crate) routing: watch::Sender<Arc<RoutingTable>>,
    pub(crate) codecs: RwLock<Arc<Codecs>>,
    pub(crate) pool: Arc<ConnectionPool>,
    pub(crate) counters: Arc<Counters>,
    rotation: AtomicUsize,
}

impl Shared {
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
}

/// Aborts the metadata follower when the last client handle is dropped.
struct FollowerTask(tokio::task::JoinHandle<()>);

impl Drop for FollowerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connected reader of one store. Cheap to clone; clones share connections and routing.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _follower: Arc<FollowerTask>,
}

/// Where one key goes.
struct Route<'t> {
    version: u32,
    partition: u32,
    replicas: &'t [Replica],
}

/// Progress of one key of a batch-get.
enum KeyState {
    Pending,
    Done(Option<RawValue>),
    /// Failed on one replica in a way another replica may not: retry there.
    Retry(Arc<String>),
    Failed,
}

impl Client {
    /// Connects to the metadata of `config.store` and starts following it.
    ///
    /// Fails with [`ClientError::UnknownStore`] when the store does not exist, with
    /// [`ClientError::Schema`] when its key schema does not parse, with
    /// [`ClientError::Metadata`] when etcd cannot be read. A store without a current version is
    /// not an error here (reads report [`ClientError::NoCurrentVersion`]); `config.routing_wait`
    /// bounds how long this call waits for one.
    pub async fn connect(
        config: ClientConfig,
        meta: Arc<dyn MetaStore>,
    ) -> Result<Client, ClientError> {
        let layout = Layout::new(&config.meta_root);
        let counters = Arc::new(Counters::default());
        let pool = ConnectionPool::new(config.tls.as_ref(), counters.clone())?;
        let mirrors = Mirrors::start(meta, &layout, &config.store).await?;
        let record = mirrors
            .store_record()
            .await?
            .ok_or_else(|| ClientError::UnknownStore {
                store: config.store.clone(),
                root: layout.root().to_string(),
            })?;
        let codecs = Codecs::from_record(&record)?;
        let table = mirrors
            .build(&layout, &config.store, Some(&record), None)
            .await;
        let addresses = table.addresses();
        let (routing, _) = watch::channel(Arc::new(table));
        let shared = Arc::new(Shared {
            store: config.store.clone(),
            layout,
            request_timeout: config.request_timeout,
            routing,
            codecs: RwLock::new(Arc::new(codecs)),
            pool,
            counters,
            rotation: AtomicUsize::new(0),
        });
        metadata::warm(&shared, addresses);
        let follower = tokio::spawn(metadata::follow(shared.clone(), mirrors));
        let client = Client {
            shared,
            _follower: Arc::new(FollowerTask(follower)),
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
        let result = self.get_raw_inner(key_bytes).await;
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    /// Reads many keys; the result has one entry per key, in the order of `keys` (duplicates
    /// allowed). Keys that fail on one replica are retried once on another; keys that still fail
    /// make the call return [`ClientError::Incomplete`].
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
        check_batch_size(keys.len())?;
        Counters::add(&self.shared.counters.keys_requested, keys.len() as u64);
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let result = self.batch_get_inner(&keys).await;
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
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
    pub fn stats(&self) -> ClientStats {
        self.shared.counters.snapshot()
    }

    fn count_error(&self, e: &ClientError) {
        Counters::add(&self.shared.counters.errors, 1);
        if matches!(e, ClientError::Timeout { .. }) {
            Counters::add(&self.shared.counters.timeouts, 1);
        }
    }

    fn decode_value(&self, raw: &RawValue) -> Result<Value, ClientError> {
        let codecs = self.shared.codecs();
        let codec = codecs.values.get(&raw.schema_id).ok_or_else(|| AvroError::Decode {
            what: "value",
            detail: format!(
                "value schema id {} is not registered for store `{}` in this client; if the schema was just \
                 added, retry in a moment, otherwise check the store's schemas with `rialto-admin`",
                raw.schema_id, self.shared.store
            ),
        })?;
        Ok(codec.decode(&raw.bytes, "value")?)
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

    fn version_of(&self, table: &RoutingTable) -> Result<u32, ClientError> {
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

    async fn get_raw_inner(&self, key: &[u8]) -> Result<Option<RawValue>, ClientError> {
        let table = self.shared.table();
        let route = self.route(&table, key)?;
        let deadline = Instant::now() + self.shared.request_timeout;
        let path = wire::get_path(&self.shared.store, route.version, route.partition);
        let body = Bytes::copy_from_slice(key);
        let start = self.shared.rotation.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for attempt in 0..route.replicas.len() {
            let replica = &route.replicas[(start + attempt) % route.replicas.len()];
            if attempt > 0 {
                Counters::add(&self.shared.counters.retries, 1);
            }
            match tokio::time::timeout_at(deadline, self.get_once(replica, &path, body.clone()))
                .await
            {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        address: replica.address.clone(),
                        after: self.shared.request_timeout,
                    })
                }
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if e.is_retryable() => {
                    tracing::debug!(address = replica.address, error = %e, "get failed; trying another replica");
                    last_error = Some(e);
                }
                Ok(Err(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or(ClientError::NoReplica {
            partition: route.partition,
            version: route.version,
        }))
    }

    async fn get_once(
        &self,
        replica: &Replica,
        path: &str,
        key: Bytes,
    ) -> Result<Option<RawValue>, ClientError> {
        let (parts, mut body) = self.send(replica, path, key).await?;
        if parts.status != http::StatusCode::OK {
            let bytes = self
                .read_body(replica, &mut body, ERROR_BODY_BYTES_MAX)
                .await?;
            return match error_response(&replica.address, &parts, &bytes) {
                ClientError::Server {
                    code: ErrorCode::KeyNotFound,
                    ..
                } => Ok(None),
                e => Err(e),
            };
        }
        let bytes = self
            .read_body(replica, &mut body, GET_RESPONSE_BYTES_MAX)
            .await?;
        let (schema_id, _) = StoredValue::decode(&bytes).map_err(|e| {
            ClientError::Protocol(format!("get response from {}: {e}", replica.address))
        })?;
        Ok(Some(RawValue {
            schema_id,
            bytes: bytes.slice(4..),
        }))
    }

    /// Sends one POST with `body` and waits for the response head.
    async fn send(
        &self,
        replica: &Replica,
        path: &str,
        body: Bytes,
    ) -> Result<(http::response::Parts, h2::RecvStream), ClientError> {
        Counters::add(&self.shared.counters.requests, 1);
        let sender = self
            .shared
            .pool
            .sender(&replica.address, replica.tls)
            .await?;
        let mut sender = sender
            .ready()
            .await
            .map_err(|e| self.h2_failure(replica, e))?;
        let scheme = if replica.tls { "https" } else { "http" };
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("{scheme}://{}{path}", replica.address))
            .body(())
            .map_err(|e| {
                ClientError::Protocol(format!(
                    "could not build a request to {}: {e}",
                    replica.address
                ))
            })?;
        let (response, mut stream) = sender
            .send_request(request, false)
            .map_err(|e| self.h2_failure(replica, e))?;
        stream
            .send_data(body, true)
            .map_err(|e| self.h2_failure(replica, e))?;
        let response = response.await.map_err(|e| self.h2_failure(replica, e))?;
        Ok(response.into_parts())
    }

    fn h2_failure(&self, replica: &Replica, e: h2::Error) -> ClientError {
        if e.is_io() || e.is_go_away() {
            self.shared.pool.invalidate(&replica.address);
        }
        ClientError::Unreachable {
            address: replica.address.clone(),
            detail: format!("HTTP/2 request failed: {e}"),
        }
    }

    /// Reads a whole response body of at most `bytes_max` bytes.
    async fn read_body(
        &self,
        replica: &Replica,
        body: &mut h2::RecvStream,
        bytes_max: usize,
    ) -> Result<Bytes, ClientError> {
        let mut first: Option<Bytes> = None;
        let mut joined = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| self.h2_failure(replica, e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            let len = first.as_ref().map_or(0, Bytes::len) + joined.len() + chunk.len();
            if len > bytes_max {
                return Err(ClientError::Protocol(format!(
                    "response from {} is larger than {bytes_max} bytes",
                    replica.address
                )));
            }
            match first.take() {
                None if joined.is_empty() => first = Some(chunk),
                None => joined.extend_from_slice(&chunk),
                Some(f) => {
                    joined.extend_from_slice(&f);
                    joined.extend_from_slice(&chunk);
                }
            }
        }
        Ok(first.unwrap_or_else(|| joined.freeze()))
    }

    async fn batch_get_inner(&self, keys: &[&[u8]]) -> Result<Vec<Option<RawValue>>, ClientError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let table = self.shared.table();
        let version = self.version_of(&table)?;
        let deadline = Instant::now() + self.shared.request_timeout;
        let path = wire::batch_get_path(&self.shared.store, version);
        let partition_count = table.partitions.len() as u32;
        let partitions_of_keys: Vec<u32> = keys
            .iter()
            .map(|k| {
                if partition_count == 0 {
                    0
                } else {
                    partition_for_key(k, partition_count)
                }
            })
            .collect();
        let partitions = partitions_of_keys.as_slice();
        let rotation = self.shared.rotation.fetch_add(1, Ordering::Relaxed);
        let mut states: Vec<KeyState> = (0..keys.len()).map(|_| KeyState::Pending).collect();
        let mut failed_keys = 0usize;
        let mut first_error: Option<String> = None;
        let mut fail = |state: &mut KeyState, error: &dyn Fn() -> String| {
            *state = KeyState::Failed;
            failed_keys += 1;
            if first_error.is_none() {
                first_error = Some(error());
            }
        };

        for attempt in 0..BATCH_ATTEMPTS {
            // Plan: one replica per partition (rotating per call), one request per server.
            let mut by_server: HashMap<&str, (&Replica, Vec<usize>)> = HashMap::new();
            for (index, state) in states.iter_mut().enumerate() {
                let previous_error = match state {
                    KeyState::Pending => None,
                    KeyState::Retry(e) => Some(e.clone()),
                    _ => continue,
                };
                let partition = partitions[index];
                let replicas = table
                    .partitions
                    .get(partition as usize)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                if replicas.is_empty() {
                    fail(state, &|| {
                        ClientError::NoReplica { partition, version }.to_string()
                    });
                    continue;
                }
                if attempt > 0 && replicas.len() < 2 {
                    let e = previous_error.clone();
                    fail(state, &|| {
                        format!(
                            "{} (no other replica of partition {partition} to retry on)",
                            e.as_deref().map_or("", |s| s.as_str())
                        )
                    });
                    continue;
                }
                *state = KeyState::Pending;
                let replica = &replicas[(rotation + partition as usize + attempt) % replicas.len()];
                by_server
                    .entry(replica.address.as_str())
                    .or_insert_with(|| (replica, Vec::new()))
                    .1
                    .push(index);
            }
            if by_server.is_empty() {
                break;
            }
            let requests: Vec<(&Replica, Vec<usize>)> = by_server
                .into_values()
                .flat_map(|(replica, indices)| {
                    split_by_request_size(keys, indices)
                        .into_iter()
                        .map(move |i| (replica, i))
                })
                .collect();
            if attempt > 0 {
                Counters::add(&self.shared.counters.retries, requests.len() as u64);
            }
            let outcomes = futures::future::join_all(requests.iter().map(|(replica, indices)| {
                let path = path.as_str();
                async move {
                    let mut answers = Vec::with_capacity(indices.len());
                    let sent = tokio::time::timeout_at(
                        deadline,
                        self.batch_once(replica, path, keys, partitions, indices, &mut |i, a| {
                            answers.push((i, a))
                        }),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(ClientError::Timeout {
                            address: replica.address.clone(),
                            after: self.shared.request_timeout,
                        })
                    });
                    (answers, sent)
                }
            }))
            .await;

            for ((replica, indices), (answers, sent)) in requests.iter().zip(outcomes) {
                let mut server_error: Option<Arc<String>> = None;
                for (index, answer) in answers {
                    match answer {
                        KeyAnswer::Found(value) => states[index] = KeyState::Done(Some(value)),
                        KeyAnswer::Missing => states[index] = KeyState::Done(None),
                        KeyAnswer::Failed(code) => {
                            let message = server_error
                                .get_or_insert_with(|| {
                                    Arc::new(
                                        ClientError::Server {
                                            address: replica.address.clone(),
                                            code,
                                            message: "the server could not answer this key".into(),
                                        }
                                        .to_string(),
                                    )
                                })
                                .clone();
                            if code.retryable() && attempt + 1 < BATCH_ATTEMPTS {
                                states[index] = KeyState::Retry(message);
                            } else {
                                fail(&mut states[index], &|| message.to_string());
                            }
                        }
                    }
                }
                let (retryable, message) = match &sent {
                    Ok(()) => (
                        true,
                        Arc::new(format!(
                            "{} did not answer every key of its batch-get",
                            replica.address
                        )),
                    ),
                    Err(e) => (e.is_retryable(), Arc::new(e.to_string())),
                };
                if let Err(e) = &sent {
                    tracing::debug!(address = replica.address, error = %e, "batch-get request failed");
                }
                for &index in indices {
                    if matches!(states[index], KeyState::Pending) {
                        if retryable && attempt + 1 < BATCH_ATTEMPTS {
                            states[index] = KeyState::Retry(message.clone());
                        } else {
                            fail(&mut states[index], &|| message.to_string());
                        }
                    }
                }
            }
        }
        // Keys still marked for retry after the last attempt failed too.
        for state in states.iter_mut() {
            if let KeyState::Retry(e) = state {
                let e = e.clone();
                fail(state, &|| e.to_string());
            }
        }
        if failed_keys > 0 {
            return Err(ClientError::Incomplete {
                failed_keys,
                first_error: first_error.unwrap_or_default(),
            });
        }
        Ok(states
            .into_iter()
            .map(|s| match s {
                KeyState::Done(v) => v,
                _ => None,
            })
            .collect())
    }

    /// Sends one batch-get request for `indices` to `replica`, passing each answer to `sink` as
    /// soon as its frame arrives. Answers received before a failure stay valid.
    async fn batch_once(
        &self,
        replica: &Replica,
        path: &str,
        keys: &[&[u8]],
        partitions: &[u32],
        indices: &[usize],
        sink: &mut (dyn FnMut(usize, KeyAnswer) + Send),
    ) -> Result<(), ClientError> {
        let mut body =
            Vec::with_capacity(5 + indices.iter().map(|&i| 8 + keys[i].len()).sum::<usize>());
        BatchGetRequest::encode_keys(indices.iter().map(|&i| (partitions[i], keys[i])), &mut body);
        let (parts, mut stream) = self.send(replica, path, Bytes::from(body)).await?;
        if parts.status != http::StatusCode::OK {
            let bytes = self
                .read_body(replica, &mut stream, ERROR_BODY_BYTES_MAX)
                .await?;
            return Err(error_response(&replica.address, &parts, &bytes));
        }
        let mut decoder = BatchResponseDecoder::new(indices.len() as u32);
        while let Some(chunk) = stream.data().await {
            let chunk = chunk.map_err(|e| self.h2_failure(replica, e))?;
            decoder
                .push(&chunk, |i, answer| sink(indices[i as usize], answer))
                .map_err(|detail| {
                    ClientError::Protocol(format!(
                        "batch-get response from {}: {detail}",
                        replica.address
                    ))
                })?;
            // The bytes are consumed (decoded or buffered): let the server send more.
            let _ = stream.flow_control().release_capacity(chunk.len());
        }
        if decoder.trailer().is_none() {
            return Err(ClientError::Unreachable {
                address: replica.address.clone(),
                detail: "the batch-get response ended before its trailer (server restart or broken connection)".into(),
            });
        }
        Ok(())
    }
}

fn check_batch_size(count: usize) -> Result<(), ClientError> {
    if count > BATCH_GET_KEYS_MAX {
        return Err(ClientError::TooManyKeys {
            count,
            max: BATCH_GET_KEYS_MAX,
        });
    }
    Ok(())
}

/// Splits one server's keys into requests whose bodies stay under the request size limit.
fn split_by_request_size(keys: &[&[u8]], indices: Vec<usize>) -> Vec<Vec<usize>> {
    let total: usize = 5 + indices.iter().map(|&i| 8 + keys[i].len()).sum::<usize>();
    if total <= BATCH_REQUEST_BYTES_MAX {
        return vec![indices];
    }
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 5;
    for index in indices {
        let key_size = 8 + keys[index].len();
        if !current.is_empty() && size + key_size > BATCH_REQUEST_BYTES_MAX {
            out.push(std::mem::take(&mut current));
            size = 5;
        }
        size += key_size;
        current.push(index);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The error a non-200 response stands for.
fn error_response(address: &str, parts: &http::response::Parts, body: &[u8]) -> ClientError {
    if let Ok(error) = ErrorBody::decode(body) {
        return ClientError::Server {
            address: address.to_string(),
            code: error.code,
            message: error.message,
        };
    }
    let header_code = parts
        .headers
        .get(wire::ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(ErrorCode::from_u16);
    match header_code {
        Some(code) => ClientError::Server {
            address: address.to_string(),
            code,
            message: format!("HTTP {}", parts.status),
        },
        None => ClientError::Protocol(format!(
            "{address} answered HTTP {} without a Rialto error body",
            parts.status
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_batches_split_under_the_request_limit() {
        let big = vec![0u8; 10 * 1024 * 1024];
        let keys: Vec<&[u8]> = vec![&big, &big, &big, &big, b"k"];
        let parts = split_by_request_size(&keys, vec![0, 1, 2, 3, 4]);
        assert_eq!(parts, vec![vec![0, 1, 2], vec![3, 4]]);
        let small: Vec<&[u8]> = vec![b"a", b"b"];
        assert_eq!(split_by_request_size(&small, vec![1, 0]), vec![vec![1, 0]]);
    }

    #[test]
    fn error_responses_map_to_codes() {
        let (parts, _) = http::Response::builder()
            .status(503)
            .body(())
            .unwrap()
            .into_parts();
        let body = ErrorBody {
            code: ErrorCode::PartitionNotServed,
            message: "p3 bootstrapping".into(),
        }
        .encode();
        match error_response("s:1", &parts, &body) {
            ClientError::Server { code, message, .. } => {
                assert_eq!(code, ErrorCode::PartitionNotServed);
                assert_eq!(message, "p3 bootstrapping");
            }
            e => panic!("unexpected {e}"),
        }
        let (parts, _) = http::Response::builder()
            .status(503)
            .header(wire::ERROR_CODE_HEADER, "9")
            .body(())
            .unwrap()
            .into_parts();
        assert!(matches!(
            error_response("s:1", &parts, b""),
            ClientError::Server {
                code: ErrorCode::Overloaded,
                ..
            }
        ));
        let (parts, _) = http::Response::builder()
            .status(502)
            .body(())
            .unwrap()
            .into_parts();
        assert!(matches!(
            error_response("s:1", &parts, b""),
            ClientError::Protocol(_)
        ));
    }

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
