//! HTTP/2 connections to storage servers: one per server address, shared by every request.
//!
//! A connection is opened on first use (or when the routing table names a new server, to warm
//! it), and forgotten as soon as its connection task ends (server restart, network failure,
//! GOAWAY), so the next request reconnects. h2's `SendRequest` is a cheap clonable handle; many
//! requests multiplex on one connection.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::uri::{Authority, Scheme};
use rialto_backends::Network;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::ClientError;
use crate::stats::Counters;
use crate::ClientTls;

/// Per-stream receive window the client advertises (large responses stream without stalls).
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Per-connection receive window the client advertises.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// Largest HTTP/2 frame the client accepts.
pub const FRAME_BYTES_MAX: u32 = 1024 * 1024;
/// Longest time spent opening one connection (TCP, TLS and HTTP/2 handshakes).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// TLS settings derived from [`ClientTls`].
struct Tls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<String>,
}

/// One address's connection, opened lazily.
#[derive(Default)]
struct Slot {
    conn: tokio::sync::Mutex<Option<Connection>>,
}

/// A live connection: its id, its request handle, and the address parsed as a URI authority
/// once (not per request).
struct Connection {
    id: u64,
    sender: SendRequest<Bytes>,
    authority: Authority,
}

/// The shared connections of one client, by address (ordered, so that connections dropped together
/// close in one order and a simulation's seed replays it).
pub(crate) struct ConnectionPool {
    tls: Option<Tls>,
    network: Network,
    slots: Mutex<BTreeMap<String, Arc<Slot>>>,
    next_id: AtomicU64,
    counters: Arc<Counters>,
    this: Weak<ConnectionPool>,
}

impl ConnectionPool {
    /// A pool; fails when the TLS settings are unusable.
    pub(crate) fn new(
        tls: Option<&ClientTls>,
        network: Network,
        counters: Arc<Counters>,
    ) -> Result<Arc<ConnectionPool>, ClientError> {
        let tls = tls.map(build_tls).transpose()?;
        Ok(Arc::new_cyclic(|this| ConnectionPool {
            tls,
            network,
            slots: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            counters,
            this: this.clone(),
        }))
    }

    fn slot(&self, address: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(address) {
            return slot.clone();
        }
        slots.entry(address.to_string()).or_default().clone()
    }

    /// A request handle for `address`, and the address as a URI authority, connecting if there
    /// is no live connection.
    pub(crate) async fn sender(
        &self,
        address: &str,
        tls: bool,
    ) -> Result<(SendRequest<Bytes>, Authority), ClientError> {
        let slot = self.slot(address);
        if let Ok(conn) = slot.conn.try_lock() {
            if let Some(c) = conn.as_ref() {
                return Ok((c.sender.clone(), c.authority.clone()));
            }
        }
        // Out of line: the dial's state (TCP, TLS and HTTP/2 handshakes) is several kilobytes,
        // which every request's future would otherwise carry and copy.
        Box::pin(self.connect(&slot, address, tls)).await
    }

    /// The connection of `slot`, opened unless another request opened it meanwhile.
    async fn connect(
        &self,
        slot: &Slot,
        address: &str,
        tls: bool,
    ) -> Result<(SendRequest<Bytes>, Authority), ClientError> {
        let mut conn = slot.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok((c.sender.clone(), c.authority.clone()));
        }
        let authority = Authority::try_from(address).map_err(|e| {
            ClientError::Protocol(format!("`{address}` is not a server address: {e}"))
        })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sender = match tokio::time::timeout(CONNECT_TIMEOUT, self.dial(address, tls, id)).await
        {
            Ok(Ok(sender)) => sender,
            Ok(Err(e)) => {
                self.counters
                    .connection_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            Err(_) => {
                self.counters
                    .connection_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(ClientError::Unreachable {
                    address: address.to_string(),
                    detail: format!("could not connect within {CONNECT_TIMEOUT:?}"),
                });
            }
        };
        self.counters
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        *conn = Some(Connection {
            id,
            sender: sender.clone(),
            authority: authority.clone(),
        });
        Ok((sender, authority))
    }

    /// Forgets the connection to `address` so the next request reconnects.
    pub(crate) fn invalidate(&self, address: &str) {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(address)
            .cloned();
        if let Some(slot) = slot {
            if let Ok(mut conn) = slot.conn.try_lock() {
                *conn = None;
            }
        }
    }

    /// Forgets the connection `id` to `address` if it is still the pooled one.
    async fn connection_ended(&self, address: &str, id: u64) {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(address)
            .cloned();
        if let Some(slot) = slot {
            let mut conn = slot.conn.lock().await;
            if conn.as_ref().is_some_and(|c| c.id == id) {
                *conn = None;
            }
        }
    }

    /// Drops the connections to servers not in `keep`; in-flight requests on them finish.
    pub(crate) fn retain(&self, keep: &HashSet<String>) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|address, _| keep.contains(address));
    }

    /// Sends one request (`body` = `None` for a bodiless GET) and waits for the response head.
    pub(crate) async fn send(
        &self,
        address: &str,
        tls: bool,
        method: http::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(http::response::Parts, h2::RecvStream), ClientError> {
        Counters::add(&self.counters.requests, 1);
        let (sender, authority) = self.sender(address, tls).await?;
        let mut sender = sender
            .ready()
            .await
            .map_err(|e| self.h2_failure(address, e))?;
        let unbuildable = |e: http::Error| {
            ClientError::Protocol(format!("could not build a request to {address}: {e}"))
        };
        let uri = http::Uri::builder()
            .scheme(if tls { Scheme::HTTPS } else { Scheme::HTTP })
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(unbuildable)?;
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .map_err(unbuildable)?;
        let (response, mut stream) = sender
            .send_request(request, body.is_none())
            .map_err(|e| self.h2_failure(address, e))?;
        if let Some(body) = body {
            stream
                .send_data(body, true)
                .map_err(|e| self.h2_failure(address, e))?;
        }
        let response = response.await.map_err(|e| self.h2_failure(address, e))?;
        Ok(response.into_parts())
    }

    /// The error for an HTTP/2 failure on `address`; forgets a broken connection.
    pub(crate) fn h2_failure(&self, address: &str, e: h2::Error) -> ClientError {
        if e.is_io() || e.is_go_away() {
            self.invalidate(address);
        }
        ClientError::Unreachable {
            address: address.to_string(),
            detail: format!("HTTP/2 request failed: {e}"),
        }
    }

    /// Reads a whole response body of at most `bytes_max` bytes.
    pub(crate) async fn read_body(
        &self,
        address: &str,
        body: &mut h2::RecvStream,
        bytes_max: usize,
    ) -> Result<Bytes, ClientError> {
        let mut first: Option<Bytes> = None;
        let mut joined = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| self.h2_failure(address, e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            let len = first.as_ref().map_or(0, Bytes::len) + joined.len() + chunk.len();
            if len > bytes_max {
                return Err(ClientError::Protocol(format!(
                    "response from {address} is larger than {bytes_max} bytes"
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

    async fn dial(
        &self,
        address: &str,
        tls: bool,
        id: u64,
    ) -> Result<SendRequest<Bytes>, ClientError> {
        let unreachable = |detail: String| ClientError::Unreachable {
            address: address.to_string(),
            detail,
        };
        let tcp = self
            .network
            .connect(address)
            .await
            .map_err(|e| unreachable(format!("TCP connect failed: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match (&self.tls, tls) {
            (None, false) => self.handshake(address, tcp, id).await,
            (Some(settings), true) => {
                let name = settings.server_name.clone().unwrap_or_else(|| host_of(address).to_string());
                let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| unreachable(format!("`{name}` is not a valid TLS server name ({e}); set `ClientTls::server_name`")))?;
                let stream = settings
                    .connector
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS handshake failed: {e}; check the CA certificate and server name")))?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    tracing::warn!(address, "server did not negotiate ALPN `h2`; trying HTTP/2 anyway");
                }
                self.handshake(address, stream, id).await
            }
            (None, true) => Err(unreachable(
                "the server speaks TLS but the client has no TLS settings; set `ClientConfig::tls` with the cluster CA".into(),
            )),
            (Some(_), false) => Err(unreachable(
                "the server speaks plaintext but the client requires TLS; refusing to downgrade (set `ClientConfig::tls` to None for a plaintext cluster)".into(),
            )),
        }
    }

    async fn handshake<T>(
        &self,
        address: &str,
        io: T,
        id: u64,
    ) -> Result<SendRequest<Bytes>, ClientError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(FRAME_BYTES_MAX)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| ClientError::Unreachable {
                address: address.to_string(),
                detail: format!("HTTP/2 handshake failed: {e}"),
            })?;
        let pool = self.this.clone();
        let address = address.to_string();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%address, error = %e, "connection to storage server ended");
            }
            if let Some(pool) = pool.upgrade() {
                pool.connection_ended(&address, id).await;
            }
        });
        Ok(sender)
    }
}

/// The host part of `host:port` (or `[v6]:port`).
fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

fn build_tls(tls: &ClientTls) -> Result<Tls, ClientError> {
    let identity = tls
        .identity
        .as_ref()
        .map(|id| (id.cert_pem.as_slice(), id.key_pem.as_slice()));
    let config = rialto_security::tls::client_config_from_pem(&tls.ca_cert_pem, identity, &[b"h2"])
        .map_err(|e| ClientError::Config(format!("`ClientTls`: {e}")))?;
    Ok(Tls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name: tls.server_name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_split_from_port() {
        assert_eq!(host_of("server-1:7000"), "server-1");
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("server-1"), "server-1");
    }

    #[test]
    fn tls_settings_without_a_certificate_are_refused() {
        let tls = ClientTls {
            ca_cert_pem: b"not a pem".to_vec(),
            server_name: None,
            identity: None,
        };
        let err = ConnectionPool::new(Some(&tls), Network::Os, Arc::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
