//! The client as a Rust library: [`Client::builder`] to connect, and reads in the application's
//! own types through serde ([`Client::get_as`], [`Client::batch_get_as`]) next to the Avro
//! [`Value`] API kept for dynamic use.
//!
//! With types that carry their Avro schema (`#[derive(AvroSchema)]`, re-exported here as
//! [`apache_avro`](crate::apache_avro)), [`ClientBuilder::connect_typed`] checks them against the
//! store once, when it connects: the value type's schema becomes the client's reader schema
//! (so it must read every registered value schema) and the key type's schema must read as the
//! store's key schema. The [`TypedClient`] it returns reads in those types only.
//!
//! ```no_run
//! # async fn example() -> Result<(), rialto_fast_client::ClientError> {
//! use rialto_fast_client::apache_avro::{self, AvroSchema};
//! use rialto_fast_client::Client;
//!
//! #[derive(serde::Deserialize, AvroSchema)]
//! struct Recommendation {
//!     member: i64,
//!     items: Vec<i64>,
//!     score: f64,
//! }
//!
//! let recs = Client::builder("demo")
//!     .etcd(["http://127.0.0.1:2379"])
//!     .connect_typed::<String, Recommendation>()
//!     .await?;
//! let one: Option<Recommendation> = recs.get("member-42").await?;
//! let many = recs.batch_get(&["member-1", "member-2"]).await?;
//! # let _ = (one, many);
//! # Ok(()) }
//! ```
//!
//! Without schemas on the types, any serde type can be read per call ([`Client::get_as`]):
//! a key is converted to an Avro value with `apache_avro::to_value` and encoded with the store's
//! key schema (resolved to it when the shapes differ, e.g. a struct for a record); a value is
//! decoded with its writer schema, resolved to the client's reader schema, and converted with
//! `apache_avro::from_value`. A type that does not fit the schema fails that call with
//! [`ClientError::Typed`] naming the type; nothing is read or cached wrongly.
//!
//! ```no_run
//! # async fn example() -> Result<(), rialto_fast_client::ClientError> {
//! use rialto_fast_client::Client;
//!
//! #[derive(serde::Deserialize)]
//! struct Recommendation {
//!     member: i64,
//!     items: Vec<i64>,
//!     score: f64,
//! }
//!
//! let client = Client::builder("demo")
//!     .etcd(["http://127.0.0.1:2379"])
//!     .connect()
//!     .await?;
//! let one: Option<Recommendation> = client.get_as(&"member-42").await?;
//! let many: Vec<Option<Recommendation>> =
//!     client.batch_get_as(&["member-1", "member-2"]).await?;
//! # let _ = (one, many);
//! # Ok(()) }
//! ```

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;

use apache_avro::AvroSchema;
use rialto_backends::MetaStore;
use rialto_protocol::avro::Value;
use rialto_protocol::schema_compat::can_read;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::stream::{BatchStream, Completeness, KeyFailure, ValueEvent};
use crate::{Client, ClientConfig, ClientError, ClientTls, ReaderSchema};

/// How long [`ClientBuilder::connect`] waits for etcd to answer.
#[cfg(feature = "etcd")]
const ETCD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn to_avro<K: Serialize + ?Sized>(key: &K) -> Result<Value, ClientError> {
    apache_avro::to_value(key).map_err(|e| ClientError::Typed {
        what: "key",
        type_name: std::any::type_name::<K>(),
        detail: e.to_string(),
    })
}

fn from_avro<V: DeserializeOwned>(value: &Value) -> Result<V, ClientError> {
    apache_avro::from_value(value).map_err(|e| ClientError::Typed {
        what: "value",
        type_name: std::any::type_name::<V>(),
        detail: e.to_string(),
    })
}

impl Client {
    /// A builder: name the store, where its metadata is, optionally TLS and the reader schema.
    pub fn builder(store: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            config: ClientConfig::new(store),
            meta: None,
            #[cfg(feature = "etcd")]
            etcd: None,
        }
    }

    /// Reads one key as the application's types; `None` when the key has no value.
    pub async fn get_as<K: Serialize + ?Sized, V: DeserializeOwned>(
        &self,
        key: &K,
    ) -> Result<Option<V>, ClientError> {
        match self.get(&to_avro(key)?).await? {
            Some(value) => Ok(Some(from_avro(&value)?)),
            None => Ok(None),
        }
    }

    /// Streaming batch-get in the application's types: records as the servers send them, then
    /// [`TypedEvent::Done`] with the call's completeness. A value that does not fit `V` is
    /// reported there as a failed key (with the conversion error), never as a record.
    pub fn batch_get_stream_as<K: Serialize, V: DeserializeOwned>(
        &self,
        keys: &[K],
    ) -> Result<TypedBatchStream<V>, ClientError> {
        let keys = keys.iter().map(to_avro).collect::<Result<Vec<_>, _>>()?;
        Ok(TypedBatchStream {
            inner: self.batch_get_stream(&keys)?,
            unusable: Vec::new(),
            _value: PhantomData,
        })
    }

    /// Reads many keys as the application's types, in the order asked.
    pub async fn batch_get_as<K: Serialize, V: DeserializeOwned>(
        &self,
        keys: &[K],
    ) -> Result<Vec<Option<V>>, ClientError> {
        let keys = keys.iter().map(to_avro).collect::<Result<Vec<_>, _>>()?;
        self.batch_get(&keys)
            .await?
            .iter()
            .map(|v| v.as_ref().map(from_avro).transpose())
            .collect()
    }
}

/// One item of [`Client::batch_get_stream_as`].
#[derive(Debug, Clone, PartialEq)]
pub enum TypedEvent<V> {
    /// The value of the key at `index` of the request (`None`: the store has no value for it).
    Record { index: usize, value: Option<V> },
    /// The call ended; always the last item.
    Done(Completeness),
}

/// The stream returned by [`Client::batch_get_stream_as`]; dropping it cancels the call.
pub struct TypedBatchStream<V> {
    inner: BatchStream,
    unusable: Vec<KeyFailure>,
    _value: PhantomData<fn() -> V>,
}

impl<V: DeserializeOwned> Stream for TypedBatchStream<V> {
    type Item = TypedEvent<V>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TypedEvent<V>>> {
        loop {
            let event = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(event)) => event,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            match event {
                ValueEvent::Record { index, value, .. } => {
                    match value.as_ref().map(from_avro::<V>).transpose() {
                        Ok(value) => return Poll::Ready(Some(TypedEvent::Record { index, value })),
                        Err(e) => self.unusable.push(KeyFailure {
                            index,
                            error: e.to_string(),
                        }),
                    }
                }
                ValueEvent::Done(mut done) => {
                    done.fail_answered(std::mem::take(&mut self.unusable));
                    return Poll::Ready(Some(TypedEvent::Done(done)));
                }
            }
        }
    }
}

/// Builds a [`Client`]; see [`Client::builder`].
pub struct ClientBuilder {
    config: ClientConfig,
    meta: Option<Arc<dyn MetaStore>>,
    #[cfg(feature = "etcd")]
    etcd: Option<(Vec<String>, Option<rialto_security::tls::ClientTlsFiles>)>,
}

impl ClientBuilder {
    /// Follows the metadata in etcd at these endpoints (`http://` or, with
    /// [`etcd_tls`](Self::etcd_tls), `https://`).
    #[cfg(feature = "etcd")]
    pub fn etcd<S: Into<String>>(mut self, endpoints: impl IntoIterator<Item = S>) -> Self {
        let tls = self.etcd.take().and_then(|(_, tls)| tls);
        self.etcd = Some((endpoints.into_iter().map(Into::into).collect(), tls));
        self
    }

    /// TLS to etcd: its CA, and this client's certificate when etcd requires one.
    #[cfg(feature = "etcd")]
    pub fn etcd_tls(mut self, files: rialto_security::tls::ClientTlsFiles) -> Self {
        let endpoints = self.etcd.take().map(|(e, _)| e).unwrap_or_default();
        self.etcd = Some((endpoints, Some(files)));
        self
    }

    /// Follows the metadata in this store (a cluster embedded in the process, a test's).
    pub fn meta(mut self, meta: Arc<dyn MetaStore>) -> Self {
        self.meta = Some(meta);
        self
    }

    /// TLS to the storage servers.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// The value schema reads are resolved to (default: the latest registered).
    pub fn reader_schema(mut self, schema: ReaderSchema) -> Self {
        self.config.reader_schema = schema;
        self
    }

    /// Any other setting of [`ClientConfig`].
    pub fn configure(mut self, change: impl FnOnce(&mut ClientConfig)) -> Self {
        change(&mut self.config);
        self
    }

    /// Connects (see [`Client::connect`]).
    pub async fn connect(self) -> Result<Client, ClientError> {
        let meta = match self.meta {
            Some(meta) => meta,
            None => self.connect_etcd().await?,
        };
        Client::connect(self.config, meta).await
    }

    /// Connects a client that reads the store as `K` → `V`, both checked here, once: `V`'s Avro
    /// schema becomes the reader schema, so it must read every registered value schema (values
    /// are resolved to it, defaults filled, fields it lacks dropped), and `K`'s schema must read
    /// as the store's key schema. A type that does not fit fails here with
    /// [`ClientError::Typed`] naming it and the reason, before any read.
    pub async fn connect_typed<K, V>(self) -> Result<TypedClient<K, V>, ClientError>
    where
        K: AvroSchema + Serialize,
        V: AvroSchema + DeserializeOwned,
    {
        let value_schema = serde_json::to_string(&V::get_schema()).map_err(|e| {
            typed_error::<V>("value", format!("its Avro schema does not serialize: {e}"))
        })?;
        let client = self
            .reader_schema(ReaderSchema::Schema(value_schema))
            .connect()
            .await
            .map_err(|e| match e {
                ClientError::Schema(e) => typed_error::<V>("value", e.to_string()),
                e => e,
            })?;
        let key_schema = client.shared.codecs().key.schema().clone();
        can_read(&K::get_schema(), &key_schema).map_err(|e| {
            typed_error::<K>(
                "key",
                format!("its Avro schema does not read as the store's key schema: {e}"),
            )
        })?;
        Ok(TypedClient {
            client,
            _types: PhantomData,
        })
    }

    #[cfg(feature = "etcd")]
    async fn connect_etcd(&self) -> Result<Arc<dyn MetaStore>, ClientError> {
        let Some((endpoints, tls)) = &self.etcd else {
            return Err(no_metadata());
        };
        let store = rialto_backends::etcd::EtcdMetaStore::connect_tls(
            endpoints,
            ETCD_CONNECT_TIMEOUT,
            tls.as_ref(),
        )
        .await?;
        Ok(Arc::new(store))
    }

    #[cfg(not(feature = "etcd"))]
    async fn connect_etcd(&self) -> Result<Arc<dyn MetaStore>, ClientError> {
        Err(no_metadata())
    }
}

fn typed_error<T>(what: &'static str, detail: String) -> ClientError {
    ClientError::Typed {
        what,
        type_name: std::any::type_name::<T>(),
        detail,
    }
}

/// What may stand for a key of type `K` in a [`TypedClient`]'s reads: `K`, a reference to it,
/// and a string slice for a `String` key.
pub trait KeyOf<K>: Serialize {}

impl<K: Serialize> KeyOf<K> for K {}
impl<K: Serialize> KeyOf<K> for &K {}
impl KeyOf<String> for str {}
impl KeyOf<String> for &str {}

/// A client reading one store as the application's key and value types, checked against the
/// store's schemas when it connected ([`ClientBuilder::connect_typed`]). Cheap to clone.
pub struct TypedClient<K, V> {
    client: Client,
    _types: PhantomData<fn(&K) -> V>,
}

impl<K, V> Clone for TypedClient<K, V> {
    fn clone(&self) -> Self {
        TypedClient {
            client: self.client.clone(),
            _types: PhantomData,
        }
    }
}

impl<K: Serialize, V: DeserializeOwned> TypedClient<K, V> {
    /// Reads one key; `None` when the store has no value for it.
    pub async fn get<Q: KeyOf<K> + ?Sized>(&self, key: &Q) -> Result<Option<V>, ClientError> {
        self.client.get_as(key).await
    }

    /// Reads many keys, in the order asked.
    pub async fn batch_get<Q: KeyOf<K>>(&self, keys: &[Q]) -> Result<Vec<Option<V>>, ClientError> {
        self.client.batch_get_as(keys).await
    }

    /// Streaming batch-get: records as the servers send them, then [`TypedEvent::Done`].
    pub fn batch_get_stream<Q: KeyOf<K>>(
        &self,
        keys: &[Q],
    ) -> Result<TypedBatchStream<V>, ClientError> {
        self.client.batch_get_stream_as(keys)
    }

    /// The untyped client underneath (statistics, the `Value` API, read compute).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn no_metadata() -> ClientError {
    ClientError::Config(
        "no metadata store: call .etcd(endpoints) (feature `etcd`) or .meta(store)".into(),
    )
}
