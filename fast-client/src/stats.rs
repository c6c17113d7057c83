//! Client counters, readable at any time through [`ClientStats`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated with relaxed atomics on the request path.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) keys_requested: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) version_swaps: AtomicU64,
    pub(crate) routing_updates: AtomicU64,
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connection_failures: AtomicU64,
}

/// A snapshot of the client's counters since it connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP/2 requests sent (single gets and per-server batch-get requests, retries included).
    pub requests: u64,
    /// Keys asked for by the application (`get` counts one, `batch_get` counts its keys).
    pub keys_requested: u64,
    /// Requests re-sent to another replica after a retryable failure.
    pub retries: u64,
    /// Calls that returned an error to the application.
    pub errors: u64,
    /// Calls that ran out of `request_timeout`.
    pub timeouts: u64,
    /// Times the routing table moved to another version.
    pub version_swaps: u64,
    /// Times the routing table was rebuilt and changed.
    pub routing_updates: u64,
    /// HTTP/2 connections opened.
    pub connections_opened: u64,
    /// Failed connection attempts.
    pub connection_failures: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ClientStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            requests: load(&self.requests),
            keys_requested: load(&self.keys_requested),
            retries: load(&self.retries),
            errors: load(&self.errors),
            timeouts: load(&self.timeouts),
            version_swaps: load(&self.version_swaps),
            routing_updates: load(&self.routing_updates),
            connections_opened: load(&self.connections_opened),
            connection_failures: load(&self.connection_failures),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
