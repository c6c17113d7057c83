//! The admin API's listener: HTTP/1.1 over TCP, optionally TLS with client certificates.
//!
//! Each connection's caller (the principal of its client certificate, if any) is attached to
//! every request as a [`Caller`] extension, which [`crate::authz`] checks. A connection must
//! send its request headers within [`HEADER_READ_TIMEOUT`] and finish its TLS handshake within
//! [`HANDSHAKE_TIMEOUT`]; at most [`CONNECTIONS_MAX`] are open at once (more wait in the
//! kernel's accept queue). At shutdown connections finish their current request and close.

use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rialto_backends::net::Listener;
use rialto_security::principal::accept_tls;
use rialto_security::Principal;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Longest TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a request's headers (a slow sender is cut off).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// How long open connections may finish at shutdown before they are closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The address a connection comes from.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::IpAddr);

/// Who is calling: the principal of the connection's client certificate, if any.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<Principal>);

/// Serves `app` on `listener` until `shutdown` becomes true.
pub(crate) async fn serve(
    listener: Listener,
    tls: Option<TlsAcceptor>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break,
            permit = permits.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (app, tls, shutdown) = (app.clone(), tls.clone(), shutdown.clone());
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(tcp, Caller(None), peer, app, shutdown).await,
                Some(acceptor) => {
                    if let Some((stream, principal)) =
                        accept_tls(&acceptor, tcp, peer, HANDSHAKE_TIMEOUT).await
                    {
                        connection(stream, Caller(principal), peer, app, shutdown).await
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.shutdown().await;
    }
    Ok(())
}

async fn connection<I>(
    io: I,
    caller: Caller,
    peer: std::net::SocketAddr,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(
        app.layer(Extension(caller))
            .layer(Extension(Peer(peer.ip()))),
    );
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let stopping = tokio::select! {
        biased;
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin API connection ended");
            }
            false
        }
        stop = shutdown.wait_for(|s| *s) => stop.is_ok(),
    };
    if stopping {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}
