//! The two external systems Rialto depends on, each behind a small trait:
//!
//! * [`pubsub`]: topics, partitioned producer, consumer with assign + seek, watermarks.
//!   Production implementation: Kafka through `rdkafka` ([`kafka`]).
//! * [`meta`]: get/put/compare-and-put, prefix watch, leases. Production implementation: etcd
//!   through `etcd-client` ([`etcd`]).
//!
//! Everything above these traits (controller, server, client, push job) is written against the
//! traits, so the in-memory implementations ([`memory`]) replace both in one process. The
//! [`conformance`] cases hold every implementation to the same behaviour, and [`faults`] wraps
//! any of them to inject failures. [`net`] is the third: the network every process listens and
//! connects on, the operating system's or a simulated one; [`blocking`] runs blocking work on
//! tokio's pool, or inline in a simulation.
//!
//! **API Boundary:** nothing outside this crate names `rdkafka` or `etcd_client` types.

pub mod blocking;
pub mod clock;
pub mod conformance;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod faults;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod meta;
pub mod mirror;
pub mod net;
pub mod pubsub;
#[cfg(feature = "remote")]
pub mod remote;
pub mod runtime;

pub use meta::{KeyValue, LeaseHandle, MetaError, MetaStore};
pub use mirror::PrefixMirror;
pub use net::Network;
pub use pubsub::{ConsumedRecord, PartitionConsumer, PubSub, PubSubError};
