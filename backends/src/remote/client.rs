//! [`RemoteMetaStore`] and [`RemotePubSub`]: the traits over a gateway's HTTP API.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::wire::{
    ErrorKind, MetaRequest, PubSubRequest, Reply, WireError, WireEvent, WireKeyValue, WireRecord,
    WireSend,
};
use crate::meta::{KeyValue, LeaseHandle, MetaError, MetaStore, WatchEvent, WatchStream};
use crate::pubsub::{ConsumedRecord, Delivery, PartitionConsumer, PubSub, PubSubError};

/// Longest one call may take, waits included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one watch request waits for a change before asking again.
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// Most records, and about the most bytes, one send request carries.
const SEND_BATCH_RECORDS: usize = 2048;
const SEND_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The HTTP side shared by both clients.
#[derive(Clone)]
struct Gateway {
    url: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Gateway {
    fn new(address: &str) -> Gateway {
        Gateway {
            url: format!("http://{}", address.trim_end_matches('/')),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn call<Q: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        request: &Q,
    ) -> Result<T, WireError> {
        let unavailable = |detail: String| WireError {
            kind: ErrorKind::Unavailable,
            context: format!("gateway {}{path}", self.url),
            detail,
        };
        let body = serde_json::to_vec(request).map_err(|e| unavailable(e.to_string()))?;
        let http_request = http::Request::post(format!("{}{path}", self.url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(http_request)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(unavailable(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                )));
            }
            match serde_json::from_slice::<Reply<T>>(&bytes) {
                Ok(Reply::Ok(v)) => Ok(v),
                Ok(Reply::Err(e)) => Err(e),
                Err(e) => Err(unavailable(format!("undecodable answer: {e}"))),
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| unavailable(format!("no answer within {CALL_TIMEOUT:?}")))?
    }

    async fn meta<T: DeserializeOwned>(&self, request: MetaRequest) -> Result<T, MetaError> {
        self.call("/meta", &request).await.map_err(MetaError::from)
    }

    async fn pubsub<T: DeserializeOwned>(&self, request: PubSubRequest) -> Result<T, PubSubError> {
        self.call("/pubsub", &request)
            .await
            .map_err(PubSubError::from)
    }
}

/// A [`MetaStore`] whose data lives in another process's memory store, reached through its
/// gateway (`rialto-local serve`).
#[derive(Clone)]
pub struct RemoteMetaStore {
    gateway: Gateway,
}

impl RemoteMetaStore {
    /// A client of the gateway at `address` (`host:port`); nothing is dialled until a call.
    pub fn new(address: &str) -> RemoteMetaStore {
        RemoteMetaStore {
            gateway: Gateway::new(address),
        }
    }
}

struct RemoteWatch {
    gateway: Gateway,
    prefix: String,
    /// The first revision not delivered yet.
    next: i64,
    ready: VecDeque<Vec<WatchEvent>>,
}

#[async_trait]
impl WatchStream for RemoteWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, MetaError> {
        while self.ready.is_empty() {
            let revisions: Vec<Vec<WireEvent>> = self
                .gateway
                .meta(MetaRequest::Watch {
                    prefix: self.prefix.clone(),
                    from: self.next,
                    wait_ms: WATCH_WAIT.as_millis() as u64,
                })
                .await?;
            for events in revisions {
                if let Some(last) = events.iter().map(WireEvent::revision).max() {
                    self.next = self.next.max(last + 1);
                }
                self.ready
                    .push_back(events.into_iter().map(WatchEvent::from).collect());
            }
        }
        Ok(self.ready.pop_front())
    }
}

#[async_trait]
impl MetaStore for RemoteMetaStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        let kv: Option<WireKeyValue> = self
            .gateway
            .meta(MetaRequest::Get {
                key: key.to_string(),
            })
            .await?;
        Ok(kv.map(KeyValue::from))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), MetaError> {
        let (items, revision): (Vec<WireKeyValue>, i64) = self
            .gateway
            .meta(MetaRequest::List {
                prefix: prefix.to_string(),
            })
            .await?;
        Ok((items.into_iter().map(KeyValue::from).collect(), revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), MetaError> {
        self.gateway
            .meta(MetaRequest::Put {
                key: key.to_string(),
                value,
                lease,
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), MetaError> {
        self.gateway
            .meta(MetaRequest::Delete {
                key: key.to_string(),
            })
            .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), MetaError> {
        self.gateway
            .meta(MetaRequest::DeletePrefix {
                prefix: prefix.to_string(),
            })
            .await
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, MetaError> {
        self.gateway
            .meta(MetaRequest::CompareAndPut {
                key: key.to_string(),
                expected,
                value,
                lease,
            })
            .await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Box<dyn WatchStream>, MetaError> {
        // "From now" must be a revision, or changes between two requests would be missed.
        let next = if start_revision <= 0 {
            self.list(prefix).await?.1 + 1
        } else {
            start_revision
        };
        Ok(Box::new(RemoteWatch {
            gateway: self.gateway.clone(),
            prefix: prefix.to_string(),
            next,
            ready: VecDeque::new(),
        }))
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<LeaseHandle, MetaError> {
        let id: i64 = self.gateway.meta(MetaRequest::GrantLease { ttl_s }).await?;
        let (lost_tx, lost) = watch::channel(false);
        let gateway = self.gateway.clone();
        let ttl = Duration::from_secs(ttl_s.max(1) as u64);
        let task = tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(ttl / 3).await;
                match gateway.meta::<bool>(MetaRequest::KeepAlive { id }).await {
                    Ok(true) => last_ok = tokio::time::Instant::now(),
                    Ok(false) => break,
                    Err(e) if last_ok.elapsed() >= ttl => {
                        tracing::warn!(lease = id, error = %e, "lease keep-alive failed for a whole TTL");
                        break;
                    }
                    Err(_) => {}
                }
            }
            let _ = lost_tx.send(true);
        });
        Ok(LeaseHandle::new(id, lost, task))
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), MetaError> {
        self.gateway.meta(MetaRequest::RevokeLease { id }).await
    }
}

/// A [`PubSub`] whose topics live in another process's memory broker, reached through its
/// gateway (`rialto-local serve`). Sends are queued and carried in batches by one task, in the
/// order they were made, so each partition's records keep their order; a delivery completes
/// when its batch was appended.
#[derive(Clone)]
pub struct RemotePubSub {
    gateway: Gateway,
    outgoing: Arc<OnceLock<mpsc::UnboundedSender<Outgoing>>>,
}

enum Outgoing {
    Record {
        record: WireSend,
        delivered: oneshot::Sender<Result<i64, PubSubError>>,
    },
    /// Answered once every record queued before it is delivered.
    Flush(oneshot::Sender<()>),
}

impl RemotePubSub {
    /// A client of the gateway at `address` (`host:port`); nothing is dialled until a call.
    pub fn new(address: &str) -> RemotePubSub {
        RemotePubSub {
            gateway: Gateway::new(address),
            outgoing: Arc::new(OnceLock::new()),
        }
    }

    /// The queue of the sending task, started by the first send.
    fn queue(&self) -> &mpsc::UnboundedSender<Outgoing> {
        self.outgoing.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(send_batches(self.gateway.clone(), rx));
            tx
        })
    }
}

/// Carries queued records to the gateway, as many as are waiting per request.
async fn send_batches(gateway: Gateway, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(first) = queue.recv().await {
        let (mut records, mut waiting, mut flushes, mut bytes) = (Vec::new(), Vec::new(), None, 0);
        let mut item = Some(first);
        while let Some(next) = item.take() {
            match next {
                Outgoing::Record { record, delivered } => {
                    bytes += record.value.len();
                    records.push(record);
                    waiting.push(delivered);
                }
                Outgoing::Flush(flushed) => {
                    flushes = Some(flushed);
                    break;
                }
            }
            if records.len() < SEND_BATCH_RECORDS && bytes < SEND_BATCH_BYTES {
                item = queue.try_recv().ok();
            }
        }
        if !records.is_empty() {
            deliver(&gateway, records, waiting).await;
        }
        if let Some(flushed) = flushes {
            let _ = flushed.send(());
        }
    }
}

/// Sends one batch and completes each record's delivery with its offset or error.
async fn deliver(
    gateway: &Gateway,
    records: Vec<WireSend>,
    waiting: Vec<oneshot::Sender<Result<i64, PubSubError>>>,
) {
    let count = records.len();
    let answer: Result<Vec<Result<i64, WireError>>, WireError> = gateway
        .call("/pubsub", &PubSubRequest::Send { records })
        .await;
    let answer = answer.and_then(|offsets| {
        if offsets.len() == count {
            Ok(offsets)
        } else {
            Err(WireError {
                kind: ErrorKind::Failed,
                context: "gateway send".into(),
                detail: format!("{} offsets for {count} records", offsets.len()),
            })
        }
    });
    match answer {
        Ok(offsets) => {
            for (delivered, offset) in waiting.into_iter().zip(offsets) {
                let _ = delivered.send(offset.map_err(PubSubError::from));
            }
        }
        Err(e) => {
            for delivered in waiting {
                let _ = delivered.send(Err(e.clone().into()));
            }
        }
    }
}

struct RemoteConsumer {
    gateway: Gateway,
    topic: String,
    partition: u32,
    next: i64,
}

#[async_trait]
impl PartitionConsumer for RemoteConsumer {
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>, PubSubError> {
        let records: Vec<WireRecord> = self
            .gateway
            .pubsub(PubSubRequest::Fetch {
                topic: self.topic.clone(),
                partition: self.partition,
                offset: self.next,
                max: max_records,
                wait_ms: timeout.as_millis() as u64,
            })
            .await?;
        if let Some(last) = records.last() {
            self.next = last.offset + 1;
        }
        Ok(records.into_iter().map(ConsumedRecord::from).collect())
    }
}

#[async_trait]
impl PubSub for RemotePubSub {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError> {
        self.gateway
            .pubsub(PubSubRequest::Create {
                topic: topic.to_string(),
                partitions,
                retention_ms: None,
            })
            .await
    }

    async fn create_retained_topic(
        &self,
        topic: &str,
        partitions: u32,
        retention: Duration,
    ) -> Result<(), PubSubError> {
        self.gateway
            .pubsub(PubSubRequest::Create {
                topic: topic.to_string(),
                partitions,
                retention_ms: Some(retention.as_millis() as u64),
            })
            .await
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, PubSubError> {
        self.gateway
            .pubsub(PubSubRequest::OffsetForTime {
                topic: topic.to_string(),
                partition,
                timestamp_ms,
            })
            .await
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError> {
        self.gateway
            .pubsub(PubSubRequest::Delete {
                topic: topic.to_string(),
            })
            .await
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError> {
        self.gateway
            .pubsub(PubSubRequest::PartitionCount {
                topic: topic.to_string(),
            })
            .await
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        self.gateway
            .pubsub(PubSubRequest::Watermarks {
                topic: topic.to_string(),
                partition,
            })
            .await
    }

    async fn send(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<Delivery, PubSubError> {
        let (delivered, delivery) = oneshot::channel();
        let record = WireSend {
            topic: topic.to_string(),
            partition,
            key: key.to_vec(),
            value: value.to_vec(),
        };
        let context = format!("send to {topic}/{partition}");
        self.queue()
            .send(Outgoing::Record { record, delivered })
            .map_err(|_| PubSubError::Unavailable {
                context: context.clone(),
                detail: "the sending task stopped".into(),
            })?;
        Ok(Box::pin(async move {
            delivery.await.unwrap_or_else(|_| {
                Err(PubSubError::Unavailable {
                    context,
                    detail: "the sending task stopped".into(),
                })
            })
        }))
    }

    async fn flush(&self, timeout: Duration) -> Result<(), PubSubError> {
        let Some(queue) = self.outgoing.get() else {
            return Ok(()); // nothing was ever sent
        };
        let stopped = || PubSubError::Unavailable {
            context: "flush".into(),
            detail: "the sending task stopped".into(),
        };
        let (flushed, done) = oneshot::channel();
        queue
            .send(Outgoing::Flush(flushed))
            .map_err(|_| stopped())?;
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(PubSubError::Unavailable {
                context: "flush".into(),
                detail: format!("records still unacknowledged after {timeout:?}"),
            }),
        }
    }

    async fn consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        // As the memory broker does: a missing topic or partition is refused at once.
        self.watermarks(topic, partition).await?;
        Ok(Box::new(RemoteConsumer {
            gateway: self.gateway.clone(),
            topic: topic.to_string(),
            partition,
            next: offset.max(0),
        }))
    }
}
