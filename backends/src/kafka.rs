//! [`PubSub`] over Kafka (any Kafka-protocol broker) through `rdkafka`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode as Code;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::pubsub::{ConsumedRecord, Delivery, PartitionConsumer, PubSub, PubSubError};

/// How long metadata and admin calls may take before the broker is reported unavailable.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Kafka connection settings.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port]`.
    pub bootstrap_servers: String,
    /// librdkafka properties passed through to every client this config creates, after
    /// Rialto's own (so they win): the broker's security settings, for example
    /// `security.protocol=SASL_SSL`, `ssl.ca.location=/etc/rialto/kafka-ca.crt`,
    /// `sasl.mechanism=SCRAM-SHA-512`, `sasl.username=…`, `sasl.password=…`.
    pub options: Vec<(String, String)>,
}

impl KafkaConfig {
    /// Settings for `bootstrap_servers` with no extra properties.
    pub fn new(bootstrap_servers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            options: Vec::new(),
        }
    }
}

impl std::fmt::Debug for KafkaConfig {
    /// Option values are not printed: they may hold passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("options", &keys)
            .finish()
    }
}

/// Parses one `--kafka-option KEY=VALUE`.
pub fn parse_option(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "`{text}` is not KEY=VALUE (a librdkafka property, e.g. security.protocol=SSL)"
        )),
    }
}

/// Kafka-backed [`PubSub`]. One producer, shared, created by the first send (storage servers
/// never produce, and an idle librdkafka producer's polling thread still costs CPU); one
/// consumer per partition consumer.
pub struct KafkaPubSub {
    config: KafkaConfig,
    admin: AdminClient<DefaultClientContext>,
    producer: Mutex<Option<FutureProducer>>,
    metadata: Arc<BaseConsumer>,
}

/// A client configuration for `bootstrap_servers` with the settings every client shares.
fn client_config(config: &KafkaConfig, extra: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap_servers);
    c.set("socket.timeout.ms", "10000");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    for (k, v) in &config.options {
        c.set(k, v);
    }
    c
}

fn unavailable(context: &str, e: impl std::fmt::Display) -> PubSubError {
    PubSubError::Unavailable {
        context: context.to_string(),
        detail: e.to_string(),
    }
}

fn failed(context: &str, e: impl std::fmt::Display) -> PubSubError {
    PubSubError::Failed {
        context: context.to_string(),
        detail: e.to_string(),
    }
}

fn classify(context: &str, e: KafkaError) -> PubSubError {
    match e.rdkafka_error_code() {
        Some(Code::UnknownTopicOrPartition) | Some(Code::UnknownTopic) => {
            PubSubError::UnknownTopic(context.to_string())
        }
        Some(
            Code::BrokerTransportFailure
            | Code::AllBrokersDown
            | Code::OperationTimedOut
            | Code::RequestTimedOut
            | Code::NetworkException,
        ) => unavailable(context, e),
        _ => failed(context, e),
    }
}

impl KafkaPubSub {
    /// Connects lazily: creating the client does not contact the broker.
    pub fn new(config: KafkaConfig) -> Result<KafkaPubSub, PubSubError> {
        let admin = client_config(&config, &[])
            .create()
            .map_err(|e| failed("create admin client", e))?;
        let metadata = client_config(
            &config,
            &[
                ("group.id", "rialto-metadata"),
                ("enable.auto.commit", "false"),
            ],
        )
        .create()
        .map_err(|e| failed("create metadata consumer", e))?;
        Ok(KafkaPubSub {
            config,
            admin,
            producer: Mutex::new(None),
            metadata: Arc::new(metadata),
        })
    }

    /// The shared producer, created on first use.
    fn producer(&self) -> Result<FutureProducer, PubSubError> {
        let mut producer = self.producer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = producer.as_ref() {
            return Ok(p.clone());
        }
        let created: FutureProducer = client_config(
            &self.config,
            &[
                ("enable.idempotence", "true"),
                ("linger.ms", "5"),
                ("batch.num.messages", "10000"),
                ("queue.buffering.max.messages", "200000"),
                ("compression.type", "lz4"),
                ("message.timeout.ms", "120000"),
            ],
        )
        .create()
        .map_err(|e| failed("create producer", e))?;
        *producer = Some(created.clone());
        Ok(created)
    }

    /// Creates `topic`, keeping records at least `retention` if given, else for as long as the
    /// topic exists (`retention.ms = -1`: a version topic is the source every new replica of
    /// its version bootstraps from, a moved one months later included, and the controller
    /// deletes it when the version retires; the broker's default of a week would lose it). An
    /// existing topic must have `partitions` partitions (and, where the broker says, the
    /// retention asked for).
    async fn create(
        &self,
        topic: &str,
        partitions: u32,
        retention: Option<Duration>,
    ) -> Result<(), PubSubError> {
        let context = format!("create topic {topic}");
        let retention_ms = retention
            .map(|r| r.as_millis().to_string())
            .unwrap_or_else(|| "-1".to_string());
        let new_topic = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1))
            .set("retention.ms", &retention_ms);
        let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics([&new_topic], &opts)
            .await
            .map_err(|e| classify(&context, e))?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    let existing = self.partition_count(topic).await?;
                    if existing != Some(partitions) {
                        return Err(failed(
                            &context,
                            format!(
                                "topic exists with {existing:?} partitions, wanted {partitions}"
                            ),
                        ));
                    }
                    if let Some(retention) = retention {
                        self.check_retention(topic, retention).await?;
                    }
                }
                Err((_, code)) => return Err(failed(&context, code)),
            }
        }
        Ok(())
    }

    /// Fails when `topic` keeps records for less than `retention`; a broker that does not say
    /// is trusted (logged).
    async fn check_retention(&self, topic: &str, retention: Duration) -> Result<(), PubSubError> {
        use rdkafka::admin::ResourceSpecifier;
        let context = format!("retention of topic {topic}");
        let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let described = match self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(topic, error = %e, "the broker does not tell the topic's retention; trusting it");
                return Ok(());
            }
        };
        for resource in described.into_iter().flatten() {
            let Some(entry) = resource.get("retention.ms") else {
                continue;
            };
            let Some(ms) = entry.value.as_deref().and_then(|v| v.parse::<i64>().ok()) else {
                continue;
            };
            // -1: kept forever.
            if ms >= 0 && (ms as u128) < retention.as_millis() {
                return Err(failed(
                    &context,
                    format!(
                        "the topic keeps records {} s, less than the {} s needed; raise its \
                         retention.ms (kafka-configs --alter --add-config retention.ms={})",
                        ms / 1000,
                        retention.as_secs(),
                        retention.as_millis()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BaseConsumer) -> Result<T, PubSubError> + Send + 'static,
    ) -> Result<T, PubSubError> {
        let consumer = self.metadata.clone();
        tokio::task::spawn_blocking(move || f(&consumer))
            .await
            .map_err(|e| failed("metadata task", e))?
    }
}

#[async_trait]
impl PubSub for KafkaPubSub {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), PubSubError> {
        self.create(topic, partitions, None).await
    }

    async fn create_retained_topic(
        &self,
        topic: &str,
        partitions: u32,
        retention: Duration,
    ) -> Result<(), PubSubError> {
        self.create(topic, partitions, Some(retention)).await
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, PubSubError> {
        let topic = topic.to_string();
        self.blocking(move |c| {
            let context = format!("offset of {topic}/{partition} at {timestamp_ms} ms");
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(timestamp_ms))
                .map_err(|e| failed(&context, e))?;
            let found = c
                .offsets_for_times(tpl, ADMIN_TIMEOUT)
                .map_err(|e| classify(&context, e))?;
            let offset = found
                .find_partition(&topic, partition as i32)
                .map(|p| p.offset());
            match offset {
                Some(Offset::Offset(o)) if o >= 0 => Ok(Some(o)),
                // No record that recent: the replay starts at the end.
                Some(Offset::End) => {
                    let (_, high) = c
                        .fetch_watermarks(&topic, partition as i32, ADMIN_TIMEOUT)
                        .map_err(|e| classify(&context, e))?;
                    Ok(Some(high))
                }
                _ => Ok(None),
            }
        })
        .await
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), PubSubError> {
        let context = format!("delete topic {topic}");
        let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .delete_topics(&[topic], &opts)
            .await
            .map_err(|e| classify(&context, e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((_, code)) => return Err(failed(&context, code)),
            }
        }
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<u32>, PubSubError> {
        let topic = topic.to_string();
        self.blocking(move |c| {
            let md = c
                .fetch_metadata(Some(&topic), ADMIN_TIMEOUT)
                .map_err(|e| classify(&format!("metadata of {topic}"), e))?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len() as u32)
                .filter(|n| *n > 0))
        })
        .await
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), PubSubError> {
        let topic = topic.to_string();
        self.blocking(move |c| {
            c.fetch_watermarks(&topic, partition as i32, ADMIN_TIMEOUT)
                .map_err(|e| classify(&format!("watermarks of {topic}/{partition}"), e))
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
        let producer = self.producer()?;
        loop {
            let record = FutureRecord::to(topic)
                .partition(partition as i32)
                .key(key)
                .payload(value);
            match producer.send_result(record) {
                Ok(delivery) => {
                    let topic = topic.to_string();
                    return Ok(async move {
                        match delivery.await {
                            Ok(Ok(delivered)) => Ok(delivered.offset),
                            Ok(Err((e, _))) => {
                                Err(classify(&format!("produce to {topic}/{partition}"), e))
                            }
                            Err(_) => Err(failed(
                                &format!("produce to {topic}/{partition}"),
                                "producer dropped",
                            )),
                        }
                    }
                    .boxed());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Back-pressure: the local queue is full, wait for deliveries to drain it.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(classify(&format!("produce to {topic}/{partition}"), e)),
            }
        }
    }

    async fn flush(&self, timeout: Duration) -> Result<(), PubSubError> {
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(producer) = producer else {
            return Ok(()); // nothing was ever sent
        };
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| failed("flush task", e))?
            .map_err(|e| classify("flush producer", e))
    }

    async fn consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        self.open_consumer(topic, partition, offset, None)
    }

    async fn realtime_consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_wait: Duration,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        self.open_consumer(topic, partition, offset, Some(max_wait))
    }
}

/// Most bytes one fetch returns for a partition. A replica bootstrapping from a topic that is
/// already full (a replica moved to a new server, a version rebuilt) fetches at this size until
/// it catches up; with 10 MB, eight such replicas made tansu take longer than the socket timeout
/// to answer, and every request was abandoned and sent again: no replica ever progressed.
const CONSUMER_PARTITION_FETCH_BYTES: &str = "2097152";
/// How long a consumer waits for the broker's answer before giving the request up.
const CONSUMER_SOCKET_TIMEOUT_MS: &str = "60000";

impl KafkaPubSub {
    /// An assigned consumer of one partition; `fetch_wait` bounds how long the broker may hold
    /// a fetch (librdkafka's default is 500 ms; tansu holds every fetch about that long or half
    /// of it, even when it has records).
    fn open_consumer(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        fetch_wait: Option<Duration>,
    ) -> Result<Box<dyn PartitionConsumer>, PubSubError> {
        let context = format!("consume {topic}/{partition}");
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("group.id", "rialto-server")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.max.bytes", "8388608")
            .set("max.partition.fetch.bytes", CONSUMER_PARTITION_FETCH_BYTES)
            .set("socket.timeout.ms", CONSUMER_SOCKET_TIMEOUT_MS);
        if let Some(wait) = fetch_wait {
            config.set("fetch.wait.max.ms", wait.as_millis().max(1).to_string());
        }
        for (k, v) in &self.config.options {
            config.set(k, v);
        }
        let consumer: StreamConsumer = config.create().map_err(|e| failed(&context, e))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset))
            .map_err(|e| failed(&context, e))?;
        consumer.assign(&tpl).map_err(|e| classify(&context, e))?;
        Ok(Box::new(KafkaPartitionConsumer { consumer, context }))
    }
}

struct KafkaPartitionConsumer {
    consumer: StreamConsumer,
    context: String,
}

impl KafkaPartitionConsumer {
    fn convert(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> ConsumedRecord {
        ConsumedRecord {
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
        }
    }
}

#[async_trait]
impl PartitionConsumer for KafkaPartitionConsumer {
    async fn poll(
        &mut self,
        max_records: usize,
        timeout: std::time::Duration,
    ) -> Result<Vec<ConsumedRecord>, PubSubError> {
        let mut out = Vec::new();
        let first = match tokio::time::timeout(timeout, self.consumer.recv()).await {
            Err(_) => return Ok(out),
            Ok(r) => r.map_err(|e| classify(&self.context, e))?,
        };
        out.push(self.convert(&first));
        drop(first);
        while out.len() < max_records {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => out.push(self.convert(&m)),
                Some(Err(e)) => return Err(classify(&self.context, e)),
                None => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_reach_librdkafka_and_a_bad_one_is_a_clear_error() {
        assert_eq!(
            parse_option("sasl.password=a=b").unwrap(),
            ("sasl.password".to_string(), "a=b".to_string())
        );
        assert!(parse_option("no-equals").is_err());
        assert!(parse_option("=value").is_err());

        let mut config = KafkaConfig::new("127.0.0.1:9");
        config.options = vec![("security.protocol".into(), "plaintext".into())];
        assert!(KafkaPubSub::new(config.clone()).is_ok());
        // librdkafka checks every property when a client is created: a typo fails at once,
        // naming the property, instead of a broker that silently refuses to talk.
        config.options = vec![("security.protocoll".into(), "SSL".into())];
        let err = KafkaPubSub::new(config.clone())
            .err()
            .expect("unknown property refused");
        assert!(err.to_string().contains("security.protocoll"), "{err}");
        let debug = format!(
            "{:?}",
            KafkaConfig {
                options: vec![("sasl.password".into(), "hunter2".into())],
                ..config
            }
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
