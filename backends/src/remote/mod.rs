//! The memory backends of one process, reached from others over HTTP on loopback.
//!
//! [`gateway::serve`] exposes a [`MemoryMetaStore`](crate::memory::MemoryMetaStore) and a
//! [`MemoryPubSub`](crate::memory::MemoryPubSub) (`rialto-local serve` runs it);
//! [`RemoteMetaStore`] and [`RemotePubSub`] implement the traits against it, so the tools and an
//! application's client work against the embedded cluster as against etcd and Kafka. They are
//! named by endpoints of the form `rialto-local://host:port` wherever an etcd endpoint or a
//! Kafka bootstrap list is taken ([`gateway_address`]). Every operation is one JSON request
//! (sends are queued and carried in batches); a watch or a fetch waits on the gateway for
//! something to return. No TLS and no authorization: the gateway is for one machine, bound to
//! loopback.
//!
//! The remote backends pass the conformance cases over a gateway (this module's tests).

mod client;
pub mod gateway;
pub mod wire;

pub use client::{RemoteMetaStore, RemotePubSub};

/// The scheme of a gateway endpoint.
pub const SCHEME: &str = "rialto-local://";

/// The gateway's `host:port` if `endpoint` names one (`rialto-local://host:port`).
pub fn gateway_address(endpoint: &str) -> Option<&str> {
    endpoint.strip_prefix(SCHEME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryMetaStore, MemoryPubSub};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_remote_backends_pass_the_conformance_cases_over_a_gateway() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let gateway = tokio::spawn(gateway::serve(
            listener,
            MemoryMetaStore::new(),
            MemoryPubSub::new(),
            stopped,
        ));
        let endpoint = format!("{SCHEME}{address}");
        let address = gateway_address(&endpoint).unwrap();
        crate::conformance::meta_store(&RemoteMetaStore::new(address), "/conformance/").await;
        crate::conformance::pub_sub(
            &RemotePubSub::new(address),
            "conformance-",
            crate::conformance::BrokerDivergence::NONE,
        )
        .await;
        stop.send(true).unwrap();
        gateway.await.unwrap().unwrap();
    }
}
