//! In-memory implementations of both traits, for the embedded default and for tests.
//!
//! They keep the semantics of the production systems for everything Rialto relies on, and the
//! conformance suite ([`crate::conformance`]) holds them to it on the same cases as etcd and
//! Kafka. Time is tokio's clock, so a test on a paused runtime sees leases expire and retention
//! pass without waiting. Faults are injected by wrapping them ([`crate::faults`]).
//!
//! Both can be kept on disk ([`MemoryMetaStore::open`], [`MemoryPubSub::open`]): every change
//! is written to a journal before it is applied, so the embedded default survives a restart.

mod journal;
mod meta;
mod pubsub;

pub use meta::{MemoryMetaStore, DEFAULT_HISTORY_REVISIONS, WATCH_QUEUE_REVISIONS};
pub use pubsub::MemoryPubSub;

#[cfg(test)]
mod tests;
