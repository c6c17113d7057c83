//! Everything that crosses a Rialto process boundary, and nothing else.
//!
//! * [`partitioner`]: which partition a key belongs to (push job, server and client agree).
//! * [`envelope`]: the value of every record on a version topic, with producer metadata;
//!   [`producer`] numbers and checksums one writer's envelopes on one partition.
//! * [`wire`]: the binary framing of get and batch-get over HTTP/2.
//! * [`meta`]: the etcd key layout and the JSON metadata records stored under it.
//! * [`error`]: stable error codes that cross the wire, and whether a client may retry.
//! * [`avro`]: Avro key/value encoding shared by the push job and the client.
//! * [`avro_skip`]: where an Avro datum ends, with every claimed count bounded by the input.
//! * [`json`], [`avro_json`]: JSON that keeps numbers exact, and its exact conversion to and from
//!   Avro values (push input, CLI output).
//! * [`stored`]: a value at rest: its checksum, and chunking of large values.
//! * [`compute`]: read compute requests (projection, dot product, cosine, hadamard, count),
//!   their evaluation on a value and their per-key results.
//! * [`codec`]: value compression (zstd, with a trained dictionary) shared by the same two.
//! * [`admin`]: the controller's HTTP/JSON admin API types.
//! * [`schema_compat`]: whether one Avro schema reads what another wrote (schema evolution).
//! * [`acl`]: who may read, write and administer which store, and the check.
//!
//! **Architecture Invariant:** this crate does no I/O. It is pure data and functions over bytes.

pub mod acl;
pub mod admin;
pub mod avro;
pub mod avro_json;
pub mod avro_skip;
pub mod codec;
pub mod compute;
pub mod envelope;
pub mod error;
pub mod json;
pub mod meta;
pub mod metrics;
pub mod partitioner;
pub mod producer;
pub mod rate;
pub mod recycle;
pub mod schema_compat;
pub mod stored;
pub mod wire;

pub use error::ErrorCode;
