//! The HTTP/2 read endpoint: `h2` directly over tokio TCP, optionally TLS (ALPN `h2`).
//!
//! Routes (see `rialto_protocol::wire`): single get, streamed batch-get, health, metrics. Every
//! failure is a typed error response (`ErrorCode` status, `x-rialto-error` header, `ErrorBody`);
//! a malformed request only ever affects its own stream. Reads (get, batch-get) first go through
//! the server's fault injection ([`crate::faults`]), which does nothing unless configured.
//!
//! Each connection task owns the tasks of its streams, so stopping a connection (a killed
//! server) aborts its in-flight requests with it; a graceful stop drains them instead.
//!
//! Batch-get writes frames into a pooled buffer and sends a DATA chunk whenever the buffer passes
//! [`CHUNK_BYTES`] ([`FIRST_CHUNK_BYTES`] for the first, so a streaming client gets its first
//! records after one sub-batch rather than after a megabyte of them), waiting for flow-control capacity between chunks so a slow reader bounds the
//! memory held for it. RocksDB reads are done inline on the runtime thread, in sub-batches of
//! [`MULTI_GET_KEYS_MAX`] keys. Measured on 2 cores with the data in memory (1,000-key
//! batch-gets of 1 KB values, 1 to 8 concurrent calls), moving each sub-batch to
//! `spawn_blocking` lost 10–33 % of throughput and raised p99 latency, so reads stay inline;
//! revisit for data that does not fit in memory, where a read can wait on the disk.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rialto_backends::net::Listener;
use rialto_protocol::acl::Permission;
use rialto_protocol::compute::ComputeRequest;
use rialto_protocol::envelope::KEY_BYTES_MAX;
use rialto_protocol::meta::ReplicaState;
use rialto_protocol::wire::{
    decode_path_key, parse_route, split_compute_body, BatchGetFrameWriter, BatchGetRequest,
    BatchGetTrailer, ErrorBody, Route, ERROR_CODE_HEADER, PROTOCOL_VERSION, REQUEST_BYTES_MAX,
};
use rialto_protocol::ErrorCode;
use rialto_security::principal::accept_tls;
use rialto_security::Principal;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::authz::Authorizer;
use crate::compute::ComputeJob;
use crate::faults::Faults;
use crate::limits::ReadLimits;
use crate::metrics::{
    render_realtime, render_storage, FollowingReplica, RouteKind, ServerMetrics, VersionBytes,
};
use crate::node::NodeContext;
use crate::replica::{ReplicaRegistry, VersionMap};
use crate::store::{ReplicaStore, Served};
use crate::wakes::SelfWaking;
use crate::Stop;

/// Initial per-stream flow-control window advertised to clients.
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Initial connection flow-control window advertised to clients.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// Largest HTTP/2 frame the server accepts.
pub const FRAME_BYTES_MAX: u32 = 1024 * 1024;
/// Concurrent streams per connection.
pub const CONCURRENT_STREAMS_MAX: u32 = 1024;
/// Data h2 may buffer per stream before a sender waits for the peer.
pub const SEND_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// A batch-get response is sent in DATA chunks of about this size.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// The first DATA chunk of a batch-get response goes out once it holds this much (checked after
/// each sub-batch of [`MULTI_GET_KEYS_MAX`] keys).
pub const FIRST_CHUNK_BYTES: usize = 32 * 1024;
/// Keys read from RocksDB in one `multi_get` call.
pub const MULTI_GET_KEYS_MAX: usize = 256;
/// Response buffers kept for reuse.
const POOLED_BUFFERS_MAX: usize = 64;
/// Buffers that grew beyond this are not kept.
const POOLED_BUFFER_BYTES_MAX: usize = 2 * CHUNK_BYTES;
/// Longest TLS plus HTTP/2 handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may drain at shutdown before they are closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on what one peer can hold on the read endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub connections_max: usize,
    /// A connection with no request in progress for this long is closed (gracefully).
    pub idle_timeout: Duration,
    /// A request body not fully received this long after its headers is refused (a slow
    /// sender cannot hold a read slot).
    pub body_read_timeout: Duration,
    /// A response the peer gives no flow-control window to for this long is reset (a stalled
    /// reader cannot hold a replica's database open, nor a read slot).
    pub send_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            connections_max: 4096,
            idle_timeout: Duration::from_secs(300),
            body_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// Shared state of the read path.
pub(crate) struct ReadService {
    pub node: Arc<NodeContext>,
    pub metrics: Arc<ServerMetrics>,
    pub batch_get_keys_max: usize,
    pub buffers: Arc<BufferPool>,
    pub faults: Arc<Faults>,
    pub limits: Arc<ReadLimits>,
    pub authorizer: Arc<Authorizer>,
    pub connection_limits: ConnectionLimits,
    /// Schemas and value layouts for read compute.
    pub catalog: Arc<crate::compute::Catalog>,
}

/// Accepts connections until `shutdown` leaves [`Stop::Running`]. On [`Stop::Drain`] (or a
/// dropped sender) open connections drain (bounded); on [`Stop::Kill`] they are dropped at once.
pub(crate) async fn serve(
    listener: Listener,
    tls: Option<TlsAcceptor>,
    service: Arc<ReadService>,
    mut shutdown: watch::Receiver<Stop>,
) {
    let mut connections = JoinSet::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(
        service.connection_limits.connections_max.max(1),
    ));
    let stop = loop {
        let permit = tokio::select! {
            biased;
            stop = shutdown.wait_for(|s| *s != Stop::Running) => {
                break stop.map(|s| *s).unwrap_or(Stop::Drain);
            }
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break Stop::Drain,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let accepted = tokio::select! {
            biased;
            stop = shutdown.wait_for(|s| *s != Stop::Running) => {
                break stop.map(|s| *s).unwrap_or(Stop::Drain);
            }
            accepted = listener.accept() => accepted,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        // Requests answered on the connection's task wake it while it runs (`wakes`).
        connections.spawn(SelfWaking::new(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(tcp, peer, None, service, shutdown).await,
                Some(acceptor) => {
                    if let Some((stream, principal)) =
                        accept_tls(&acceptor, tcp, peer, HANDSHAKE_TIMEOUT).await
                    {
                        serve_connection(stream, peer, principal, service, shutdown).await
                    }
                }
            }
        }));
    };
    drop(listener);
    if stop == Stop::Kill {
        // A crash: every connection (and with it every in-flight request) ends now.
        connections.shutdown().await;
        return;
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = connections.len(),
            "closing connections that did not drain in time"
        );
        connections.shutdown().await;
    }
}

fn h2_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
        .max_concurrent_streams(CONCURRENT_STREAMS_MAX)
        .max_send_buffer_size(SEND_BUFFER_BYTES);
    b
}

async fn serve_connection<T>(
    io: T,
    peer: SocketAddr,
    principal: Option<Principal>,
    service: Arc<ReadService>,
    mut shutdown: watch::Receiver<Stop>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, h2_builder().handshake::<_, Bytes>(io)).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "HTTP/2 handshake timed out");
                return;
            }
        };
    // Dropping the set (when the connection task ends or is aborted) aborts its requests.
    let mut streams = JoinSet::new();
    let mut draining = false;
    let idle_timeout = service.connection_limits.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // Gets answered on this task leave `streams` empty: the idle timer checks this instead.
    let mut last_answered: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            // In order (a seed of the simulation replays one order): finished requests are
            // reaped before new ones are taken, so a flood of requests cannot grow the set.
            biased;
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    match take(&service, principal.as_ref(), request, respond) {
                        Taken::Answered => last_answered = Some(tokio::time::Instant::now()),
                        Taken::Sending(stream, value) => {
                            let service = service.clone();
                            streams.spawn(async move {
                                let mut stream = stream;
                                if let Err(e) = send_chunk(&service, &mut stream, value, true).await {
                                    tracing::debug!(error = %e, "client went away during the response");
                                }
                            });
                        }
                        Taken::Spawn(request, respond, prefix) => {
                            streams.spawn(handle(service.clone(), principal.clone(), request, respond, prefix));
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "connection error");
                    break;
                }
                None => break,
            },
            _ = &mut idle, if streams.is_empty() && !draining => {
                if let Some(at) = last_answered.take().filter(|at| at.elapsed() < idle_timeout) {
                    idle.as_mut().reset(at + idle_timeout);
                    continue;
                }
                tracing::debug!(%peer, ?idle_timeout, "closing an idle connection");
                conn.graceful_shutdown();
                draining = true;
            }
            stop = shutdown.wait_for(|s| *s != Stop::Running), if !draining => {
                if matches!(stop.as_deref(), Ok(Stop::Kill)) {
                    return;
                }
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
    // The connection is closed; let requests still finishing (metrics, a last send) end.
    while streams.join_next().await.is_some() {}
}

/// A request-level failure: answered with an error response.
struct Failure {
    code: ErrorCode,
    message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

async fn handle(
    service: Arc<ReadService>,
    principal: Option<Principal>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    prefix: Option<Bytes>,
) {
    let (parts, body) = request.into_parts();
    let route = parse_route(parts.uri.path());
    let kind = match route {
        Some(Route::Get { .. }) => RouteKind::Get,
        Some(Route::BatchGet { .. }) => RouteKind::BatchGet,
        Some(Route::Compute { .. }) => RouteKind::Compute,
        Some(Route::Health) => RouteKind::Health,
        Some(Route::Metrics) => RouteKind::Metrics,
        Some(Route::Dictionary { .. }) => RouteKind::Dictionary,
        Some(Route::NewerProtocol { .. }) | None => RouteKind::Unknown,
    };
    service.metrics.count_request(kind);
    let declared_len = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let result = match authorize(&service.authorizer, principal.as_ref(), route.as_ref()) {
        Err(failure) => Err(failure),
        Ok(()) => match route {
            None => Err(Failure::new(
                ErrorCode::NotFound,
                format!("no endpoint at `{}`", parts.uri.path()),
            )),
            Some(Route::NewerProtocol { version }) => Err(Failure::new(
                ErrorCode::UnsupportedProtocol,
                format!(
                    "request protocol v{version} is newer than this server's v{PROTOCOL_VERSION}; \
                 upgrade the server, or use a client that speaks v{PROTOCOL_VERSION}"
                ),
            )),
            Some(Route::Health) => {
                send_body(
                    &service,
                    &mut respond,
                    "text/plain",
                    Bytes::from_static(b"ok"),
                )
                .await
            }
            Some(Route::Metrics) => {
                let mut text = service.metrics.render_prometheus();
                text.push_str(&storage_metrics(&service.node));
                text.push_str(&format!(
                "# HELP rialto_server_reads_in_flight Reads (gets and batch-gets) being served.\n\
                 # TYPE rialto_server_reads_in_flight gauge\n\
                 rialto_server_reads_in_flight {}\n",
                service.limits.in_flight()
            ));
                send_body(
                    &service,
                    &mut respond,
                    "text/plain; version=0.0.4",
                    Bytes::from(text),
                )
                .await
            }
            Some(Route::Dictionary { store, version }) => {
                dictionary(&service, &mut respond, store, version).await
            }
            Some(Route::Get {
                store,
                version,
                partition,
                key,
            }) => {
                let key = match (key, &parts.method) {
                    (Some(hex), &Method::GET) => Ok(GetKey::Path(hex)),
                    (None, &Method::POST) => Ok(GetKey::Body(body, declared_len)),
                    (Some(_), _) => Err("a v2 get must be a GET with the key in its path"),
                    (None, _) => Err("a v1 get must be a POST with the key as body"),
                };
                match key {
                    Ok(key) => get(&service, &mut respond, key, store, version, partition).await,
                    Err(message) => Err(Failure::new(ErrorCode::BadRequest, message)),
                }
            }
            Some(
                route @ (Route::BatchGet { store, version } | Route::Compute { store, version }),
            ) => {
                let compute = matches!(route, Route::Compute { .. });
                if parts.method != Method::POST {
                    let what = if compute { "compute" } else { "batch-get" };
                    Err(Failure::new(
                        ErrorCode::BadRequest,
                        format!("{what} must be a POST"),
                    ))
                } else {
                    batch_get(
                        &service,
                        &mut respond,
                        body,
                        prefix,
                        declared_len,
                        store,
                        version,
                        compute,
                    )
                    .await
                }
            }
        },
    };
    if let Err(failure) = result {
        answer_failure(&service, parts.uri.path(), failure, &mut respond);
    }
}

/// Counts a failed request and answers it with its error.
fn answer_failure(
    service: &ReadService,
    path: &str,
    failure: Failure,
    respond: &mut SendResponse<Bytes>,
) {
    service.metrics.count_error(failure.code);
    if failure.code != ErrorCode::KeyNotFound {
        tracing::debug!(path, code = %failure.code, message = %failure.message, "request failed");
    }
    send_error(respond, failure.code, &failure.message);
}

/// What the connection's task did with a request it accepted ([`take`]).
enum Taken {
    /// Answered.
    Answered,
    /// Answered but for the body, which waits for the peer's flow-control window.
    Sending(SendStream<Bytes>, Bytes),
    /// Neither a bodiless get nor a small batch-get all in, or faults are configured (their
    /// delay is a timer): a task of its own serves it, given the start of its body if the
    /// connection's task read it.
    Spawn(Request<RecvStream>, SendResponse<Bytes>, Option<Bytes>),
}

/// Answers a bodiless get ([`answer_get`]) or a small batch-get ([`answer_batch_get`]) on the
/// connection's own task; leaves any other request to a task.
fn take(
    service: &ReadService,
    principal: Option<&Principal>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Taken {
    enum Here {
        Get,
        BatchGet,
    }
    let here = match parse_route(request.uri().path()) {
        _ if service.faults.active() => None,
        Some(Route::Get { key: Some(_), .. }) if request.method() == Method::GET => Some(Here::Get),
        Some(Route::BatchGet { .. }) if request.method() == Method::POST => Some(Here::BatchGet),
        _ => None,
    };
    match here {
        Some(Here::Get) => answer_get(service, principal, request, respond),
        Some(Here::BatchGet) => answer_batch_get(service, principal, request, respond),
        None => Taken::Spawn(request, respond, None),
    }
}

/// Answers a bodiless get (`v2`, the key in the path) on the connection's own task: the read is
/// as synchronous as on a task of its own, and a get then costs no task, no wake-up between
/// tasks and no body to wait for. The value is sent at once when the stream has window for it
/// (a get's value almost always fits the initial window); otherwise [`Taken::Sending`] leaves it
/// to a task that waits as [`send_chunk`] does, after the read slot is given back.
fn answer_get(
    service: &ReadService,
    principal: Option<&Principal>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Taken {
    let (store, version, partition, hex) = match parse_route(request.uri().path()) {
        Some(Route::Get {
            store,
            version,
            partition,
            key: Some(hex),
        }) if request.method() == Method::GET && !service.faults.active() => {
            (store, version, partition, hex)
        }
        _ => return Taken::Spawn(request, respond, None),
    };
    service.metrics.count_request(RouteKind::Get);
    let read = || {
        let route = Route::Get {
            store,
            version,
            partition,
            key: Some(hex),
        };
        authorize(&service.authorizer, principal, Some(&route))?;
        let _in_flight = service.limits.enter().map_err(refused)?;
        let key = path_key(hex)?;
        read_value(service, store, version, partition, &key)
    };
    reply_now(service, request.uri().path(), respond, read())
}

/// Checks the caller may use `route`: reads and dictionaries need `read` on their store,
/// metrics an authenticated caller; health and unknown routes need nothing.
fn authorize(
    authorizer: &Authorizer,
    principal: Option<&Principal>,
    route: Option<&Route<'_>>,
) -> Result<(), Failure> {
    let checked = match route {
        Some(Route::Get { store, .. })
        | Some(Route::BatchGet { store, .. })
        | Some(Route::Compute { store, .. })
        | Some(Route::Dictionary { store, .. }) => {
            authorizer.check(principal, store, Permission::Read)
        }
        Some(Route::Metrics) => authorizer.check_authenticated(principal),
        _ => Ok(()),
    };
    checked.map_err(|message| Failure::new(ErrorCode::Forbidden, message))
}

/// A read refused by [`ReadLimits`] (shed or over quota).
fn refused((code, message): (ErrorCode, String)) -> Failure {
    Failure::new(code, message)
}

/// Applies the configured faults to one read request: the delay (a timer, never blocking the
/// thread), then the injected error with probability `error_rate`.
async fn inject_faults(service: &ReadService) -> Result<(), Failure> {
    let delay = service.faults.delay();
    if !delay.is_zero() {
        service
            .metrics
            .faults_delayed
            .fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(delay).await;
    }
    if service.faults.should_fail() {
        service
            .metrics
            .faults_failed
            .fetch_add(1, Ordering::Relaxed);
        return Err(Failure::new(
            ErrorCode::Overloaded,
            "injected fault: this server is configured to fail a share of reads (tests only)",
        ));
    }
    Ok(())
}

/// Reads a request body of at most `limit` bytes within `deadline`, releasing flow-control
/// capacity as it goes.
async fn read_body(
    body: RecvStream,
    prefix: Option<Bytes>,
    declared_len: Option<u64>,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, Failure> {
    let read = read_body_unbounded(body, prefix, declared_len, limit);
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::new(
                ErrorCode::BadRequest,
                format!("request body not received within {deadline:?}"),
            ))
        })
}

async fn read_body_unbounded(
    mut body: RecvStream,
    prefix: Option<Bytes>,
    declared_len: Option<u64>,
    limit: usize,
) -> Result<Bytes, Failure> {
    let too_large = |len: u64| {
        Failure::new(
            ErrorCode::TooLarge,
            format!("request body of {len} bytes exceeds the limit of {limit} bytes"),
        )
    };
    if let Some(len) = declared_len {
        if len > limit as u64 {
            return Err(too_large(len));
        }
    }
    let mut total = prefix.as_ref().map_or(0, Bytes::len);
    if total > limit {
        return Err(too_large(total as u64));
    }
    let mut first: Option<Bytes> = prefix;
    let mut rest = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| {
            Failure::new(
                ErrorCode::BadRequest,
                format!("request body stream failed: {e}"),
            )
        })?;
        let _ = body.flow_control().release_capacity(chunk.len());
        total += chunk.len();
        if total > limit {
            // Stop reading: dropping the stream resets the rest of the upload.
            return Err(too_large(total as u64));
        }
        if first.is_none() && rest.is_empty() {
            first = Some(chunk);
        } else {
            if let Some(f) = first.take() {
                rest.extend_from_slice(&f);
            }
            rest.extend_from_slice(&chunk);
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

/// Where a get's key is: in its path (`v2`, hex) or its body (`v1`, with the declared length).
enum GetKey<'a> {
    Path(&'a str),
    Body(RecvStream, Option<u64>),
}

/// A get on a task of its own: a `v1` get, or any get while faults are configured.
async fn get(
    service: &ReadService,
    respond: &mut SendResponse<Bytes>,
    key: GetKey<'_>,
    store: &str,
    version: u32,
    partition: u32,
) -> Result<(), Failure> {
    let _in_flight = service.limits.enter().map_err(refused)?;
    inject_faults(service).await?;
    let key = match key {
        GetKey::Path(hex) => Bytes::from(path_key(hex)?),
        GetKey::Body(body, declared_len) => {
            let deadline = service.connection_limits.body_read_timeout;
            read_body(body, None, declared_len, KEY_BYTES_MAX, deadline).await?
        }
    };
    let value = read_value(service, store, version, partition, &key)?;
    send_body(service, respond, "application/octet-stream", value).await
}

/// The key of a `v2` get's path.
fn path_key(hex: &str) -> Result<Vec<u8>, Failure> {
    decode_path_key(hex).ok_or_else(|| {
        Failure::new(
            ErrorCode::BadRequest,
            format!("the key in a get's path is not the hex of at most {KEY_BYTES_MAX} bytes"),
        )
    })
}

/// Reads one key's value for a get, after charging the store's quota.
fn read_value(
    service: &ReadService,
    store: &str,
    version: u32,
    partition: u32,
    key: &[u8],
) -> Result<Bytes, Failure> {
    service.limits.charge(store, 1).map_err(refused)?;
    let replica = online(&service.node.registry, store, version, partition)?;
    service
        .metrics
        .keys_requested
        .fetch_add(1, Ordering::Relaxed);
    let value = match replica.get(key) {
        Ok(Some(v)) => match replica.served(key, &v) {
            Served::Value(v) => Bytes::copy_from_slice(v),
            Served::Assembled(v) => Bytes::from(v),
            Served::Missing => return Err(not_found(service)),
            Served::Corrupt(detail) => {
                tracing::warn!(store, version, partition, %detail, "a stored value cannot be served");
                return Err(Failure::new(ErrorCode::CorruptValue, detail));
            }
        },
        Ok(None) => return Err(not_found(service)),
        Err(e) => return Err(Failure::new(ErrorCode::Internal, e.to_string())),
    };
    service.metrics.keys_found.fetch_add(1, Ordering::Relaxed);
    Ok(value)
}

/// The answer to a single get of a missing key (counted).
fn not_found(service: &ReadService) -> Failure {
    service.metrics.keys_missing.fetch_add(1, Ordering::Relaxed);
    Failure::new(ErrorCode::KeyNotFound, "key not found")
}

fn online(
    registry: &ReplicaRegistry,
    store: &str,
    version: u32,
    partition: u32,
) -> Result<Arc<ReplicaStore>, Failure> {
    registry
        .online(store, version, partition)
        .map_err(|code| Failure::new(code, not_served_message(code, store, version, partition)))
}

fn not_served_message(code: ErrorCode, store: &str, version: u32, partition: u32) -> String {
    match code {
        ErrorCode::UnknownStore => format!("store `{store}` is not hosted on this server"),
        ErrorCode::UnknownVersion => {
            format!("version {version} of store `{store}` is not hosted on this server")
        }
        _ => format!("partition {partition} of `{store}` v{version} is not ONLINE on this server"),
    }
}

/// A batch-get, or with `compute` a read-compute request: the same keys, routing and streaming,
/// each found value answered by its compute result instead. `prefix` is the start of the body,
/// when the connection's task read it already ([`answer_batch_get`]).
#[allow(clippy::too_many_arguments)]
async fn batch_get(
    service: &ReadService,
    respond: &mut SendResponse<Bytes>,
    body: RecvStream,
    prefix: Option<Bytes>,
    declared_len: Option<u64>,
    store: &str,
    version: u32,
    compute: bool,
) -> Result<(), Failure> {
    let arrived = Instant::now();
    let _in_flight = service.limits.enter().map_err(refused)?;
    inject_faults(service).await?;
    let body = read_body(
        body,
        prefix,
        declared_len,
        REQUEST_BYTES_MAX,
        service.connection_limits.body_read_timeout,
    )
    .await?;
    let keys_max = service.batch_get_keys_max;
    let mut answer = BatchAnswer::new(service, &body, store, version, compute, keys_max, arrived)?;
    let Some(mut stream) = start_response(respond)? else {
        return Ok(());
    };
    let metrics = &service.metrics;
    let mut buf = service.buffers.take();
    let mut chunk_bytes = FIRST_CHUNK_BYTES;
    while answer.fill(service, &mut buf, chunk_bytes) {
        if chunk_bytes == FIRST_CHUNK_BYTES {
            metrics.batch_get_first_chunk.observe(arrived.elapsed());
        }
        chunk_bytes = CHUNK_BYTES;
        let chunk = service
            .buffers
            .freeze(std::mem::replace(&mut buf, service.buffers.take()));
        if let Err(e) = send_chunk(service, &mut stream, chunk, false).await {
            tracing::debug!(error = %e, "batch-get stream closed by the client");
            return Ok(());
        }
        // Let the connection task write the chunk now. It was woken from this worker, so it
        // waits in the worker's LIFO slot (which other workers do not steal) until this task
        // yields: without this, the first chunk leaves with the last.
        tokio::task::yield_now().await;
    }
    answer.finish(service, &mut buf);
    if chunk_bytes == FIRST_CHUNK_BYTES {
        metrics.batch_get_first_chunk.observe(arrived.elapsed());
    }
    let chunk = service.buffers.freeze(buf);
    if let Err(e) = send_chunk(service, &mut stream, chunk, true).await {
        tracing::debug!(error = %e, "batch-get stream closed by the client");
    }
    metrics.batch_get_total.observe(arrived.elapsed());
    Ok(())
}

/// Sends a read's response headers; `None` when the client went away.
fn start_response(respond: &mut SendResponse<Bytes>) -> Result<Option<SendStream<Bytes>>, Failure> {
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(())
        .map_err(|e| Failure::new(ErrorCode::Internal, e.to_string()))?;
    match respond.send_response(response, false) {
        Ok(stream) => Ok(Some(stream)),
        Err(e) => {
            tracing::debug!(error = %e, "client went away before the response");
            Ok(None)
        }
    }
}

/// Most keys in a batch-get answered on the connection's task ([`answer_batch_get`]): a few
/// point lookups, so the connection's other streams wait no longer than for a few gets.
const INLINE_BATCH_KEYS_MAX: usize = 32;

/// Answers a small batch-get whose body is already in (a few coalesced gets: one DATA frame
/// arrives with its HEADERS) on the connection's own task, as [`answer_get`] answers a get: no
/// task, no wake-up between tasks. Anything else, or a body not all in yet, is left to a task
/// of its own, given what was read of the body.
fn answer_batch_get(
    service: &ReadService,
    principal: Option<&Principal>,
    mut request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Taken {
    let arrived = Instant::now();
    let body = request.body_mut();
    let first = match body.data().now_or_never() {
        Some(Some(Ok(chunk))) => chunk,
        _ => return Taken::Spawn(request, respond, None),
    };
    let _ = body.flow_control().release_capacity(first.len());
    let all_in = body.is_end_stream();
    let path = request.uri().path();
    let (store, version) = match parse_route(path) {
        Some(Route::BatchGet { store, version }) if all_in => (store, version),
        _ => return Taken::Spawn(request, respond, Some(first)),
    };
    let keys = match BatchGetRequest::decode(&first, INLINE_BATCH_KEYS_MAX) {
        Ok(keys) if first.len() <= REQUEST_BYTES_MAX => keys,
        // Larger, or malformed: a task answers it as any batch-get (with the error, if any).
        _ => return Taken::Spawn(request, respond, Some(first)),
    };
    service.metrics.count_request(RouteKind::BatchGet);
    let route = Route::BatchGet { store, version };
    let answered = authorize(&service.authorizer, principal, Some(&route)).and_then(|()| {
        let _in_flight = service.limits.enter().map_err(refused)?;
        let mut answer = BatchAnswer::plan(service, keys, None, store, version, arrived)?;
        let mut buf = service.buffers.take();
        while answer.fill(service, &mut buf, usize::MAX) {}
        answer.finish(service, &mut buf);
        Ok(service.buffers.freeze(buf))
    });
    if answered.is_ok() {
        let metrics = &service.metrics;
        metrics.batch_get_first_chunk.observe(arrived.elapsed());
        metrics.batch_get_total.observe(arrived.elapsed());
    }
    reply_now(service, path, respond, answered)
}

/// Sends a read answered on the connection's task: its failure, or its whole body when the
/// stream has window for it (a few values almost always fit the initial window); otherwise
/// [`Taken::Sending`] leaves the body to a task that waits as [`send_chunk`] does.
fn reply_now(
    service: &ReadService,
    path: &str,
    mut respond: SendResponse<Bytes>,
    answered: Result<Bytes, Failure>,
) -> Taken {
    let started = answered.and_then(|body| Ok((start_response(&mut respond)?, body)));
    match started {
        Err(failure) => answer_failure(service, path, failure, &mut respond),
        Ok((None, _)) => {}
        Ok((Some(mut stream), body)) => {
            stream.reserve_capacity(body.len());
            if stream.capacity() == 0 && !body.is_empty() {
                return Taken::Sending(stream, body);
            }
            if let Err(e) = stream.send_data(body, true) {
                tracing::debug!(error = %e, "client went away during the response");
            }
        }
    }
    Taken::Answered
}

/// A batch-get's (or compute's) keys grouped by partition, answered a sub-batch at a time into
/// response chunks: by [`batch_get`] on a task of its own, or whole by [`answer_batch_get`] on
/// the connection's task.
struct BatchAnswer<'b> {
    keys: Vec<(u32, &'b [u8])>,
    /// Request indexes by partition, each in key order (RocksDB's batched multi-get is faster on
    /// sorted keys; frames carry their index).
    groups: Vec<(u32, Vec<u32>)>,
    /// The next sub-batch: its group, and where in the group it starts.
    next: (usize, usize),
    partitions: VersionMap,
    job: Option<ComputeJob>,
    trailer: BatchGetTrailer,
    key_refs: Vec<&'b [u8]>,
}

impl<'b> BatchAnswer<'b> {
    /// Checks and plans a request whose body is in: decodes it (at most `keys_max` keys), then
    /// [`BatchAnswer::plan`].
    fn new(
        service: &ReadService,
        body: &'b [u8],
        store: &str,
        version: u32,
        compute: bool,
        keys_max: usize,
        arrived: Instant,
    ) -> Result<BatchAnswer<'b>, Failure> {
        let (spec, keys_body) = if compute {
            let (spec, keys) = split_compute_body(body)
                .map_err(|e| Failure::new(e.code(), format!("bad compute request: {e}")))?;
            let spec = ComputeRequest::decode(spec)
                .map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))?;
            (Some(spec), keys)
        } else {
            (None, body)
        };
        let keys = BatchGetRequest::decode(keys_body, keys_max)
            .map_err(|e| Failure::new(e.code(), format!("bad batch-get request: {e}")))?;
        BatchAnswer::plan(service, keys, spec, store, version, arrived)
    }

    /// Plans decoded keys (with `spec`, a compute request's): charges the store's read quota and
    /// finds the version's replicas here.
    fn plan(
        service: &ReadService,
        keys: Vec<(u32, &'b [u8])>,
        spec: Option<ComputeRequest>,
        store: &str,
        version: u32,
        arrived: Instant,
    ) -> Result<BatchAnswer<'b>, Failure> {
        service.limits.charge(store, keys.len()).map_err(refused)?;
        service.metrics.batch_get_request.observe(arrived.elapsed());
        let partitions = version_here(service, store, version)?;
        let job = match spec {
            None => None,
            Some(spec) => {
                let replica = any_online(&partitions, store, version)?;
                let job = service
                    .catalog
                    .job(store, version, spec, &replica)
                    .map_err(|(code, message)| Failure::new(code, message))?;
                Some(job)
            }
        };
        service
            .metrics
            .keys_requested
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (index, (partition, _)) in keys.iter().enumerate() {
            groups.entry(*partition).or_default().push(index as u32);
        }
        let mut groups: Vec<(u32, Vec<u32>)> = groups.into_iter().collect();
        for (_, indexes) in &mut groups {
            indexes.sort_unstable_by_key(|&i| keys[i as usize].1);
        }
        Ok(BatchAnswer {
            trailer: BatchGetTrailer {
                keys_total: keys.len() as u32,
                ..Default::default()
            },
            keys,
            groups,
            next: (0, 0),
            partitions,
            job,
            key_refs: Vec::with_capacity(MULTI_GET_KEYS_MAX),
        })
    }

    /// Reads sub-batches of at most [`MULTI_GET_KEYS_MAX`] keys into `buf` until it holds at
    /// least `bytes`; false once every key is answered.
    fn fill(&mut self, service: &ReadService, buf: &mut Vec<u8>, bytes: usize) -> bool {
        let BatchAnswer {
            keys,
            groups,
            next,
            partitions,
            job,
            trailer,
            key_refs,
        } = self;
        while let Some((partition, indexes)) = groups.get(next.0) {
            let end = (next.1 + MULTI_GET_KEYS_MAX).min(indexes.len());
            let sub = &indexes[next.1..end];
            match partitions
                .get(partition)
                .and_then(|slot| slot.online_store())
            {
                None => {
                    for &i in sub {
                        BatchGetFrameWriter::key_error(buf, i, ErrorCode::PartitionNotServed);
                        service.metrics.count_error(ErrorCode::PartitionNotServed);
                    }
                    trailer.errors += sub.len() as u32;
                }
                Some(replica) => {
                    key_refs.clear();
                    key_refs.extend(sub.iter().map(|&i| keys[i as usize].1));
                    write_frames(
                        &replica,
                        key_refs,
                        sub,
                        buf,
                        trailer,
                        &service.metrics,
                        job.as_ref(),
                    );
                }
            }
            *next = if end == indexes.len() {
                (next.0 + 1, 0)
            } else {
                (next.0, end)
            };
            if buf.len() >= bytes {
                return next.0 < groups.len();
            }
        }
        false
    }

    /// Appends the trailer and counts what was found.
    fn finish(self, service: &ReadService, buf: &mut Vec<u8>) {
        let metrics = &service.metrics;
        let found = self.trailer.found as u64;
        metrics.keys_found.fetch_add(found, Ordering::Relaxed);
        let missing = self.trailer.missing as u64;
        metrics.keys_missing.fetch_add(missing, Ordering::Relaxed);
        BatchGetFrameWriter::trailer(buf, &self.trailer);
    }
}

/// The replicas of a version hosted here, by partition.
fn version_here(service: &ReadService, store: &str, version: u32) -> Result<VersionMap, Failure> {
    let registry = &service.node.registry;
    registry
        .version(store, version)
        .map_err(|code| Failure::new(code, not_served_message(code, store, version, 0)))
}

/// Any ONLINE replica of a version here (for what all its partitions share: the value schemas,
/// the compression dictionary).
fn any_online(
    partitions: &VersionMap,
    store: &str,
    version: u32,
) -> Result<Arc<ReplicaStore>, Failure> {
    partitions
        .values()
        .find_map(|slot| slot.online_store())
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::PartitionNotServed,
                format!("no ONLINE replica of {store} v{version} here"),
            )
        })
}

/// A version's compression dictionary, from any ONLINE replica of it here.
async fn dictionary(
    service: &ReadService,
    respond: &mut SendResponse<Bytes>,
    store: &str,
    version: u32,
) -> Result<(), Failure> {
    let partitions = version_here(service, store, version)?;
    let replica = any_online(&partitions, store, version)?;
    match replica.dictionary() {
        Ok(Some(d)) => {
            send_body(service, respond, "application/octet-stream", Bytes::from(d)).await
        }
        Ok(None) => Err(Failure::new(
            ErrorCode::NotFound,
            format!("{store} v{version} has no compression dictionary"),
        )),
        Err(e) => Err(Failure::new(ErrorCode::Internal, e.to_string())),
    }
}

/// The storage gauges: bytes per store version hosted here (from the replica records, set when
/// each replica went ONLINE) and the block cache.
fn storage_metrics(node: &NodeContext) -> String {
    let mut versions: BTreeMap<(String, u32), VersionBytes> = BTreeMap::new();
    let mut following = Vec::new();
    for slot in node.registry.all() {
        let record = slot.record();
        if record.following {
            following.push(FollowingReplica {
                store: slot.id.store.clone(),
                version: slot.id.version,
                partition: slot.id.partition,
                lag: record.lag,
                leader: record.leader,
            });
        }
        if record.state != ReplicaState::Online {
            continue;
        }
        let bytes = versions
            .entry((slot.id.store.clone(), slot.id.version))
            .or_default();
        bytes.disk += record.disk_bytes;
        bytes.memory += record.memory_bytes;
    }
    let mut out = render_storage(
        &versions,
        node.engine.block_cache_usage(),
        node.engine.block_cache_bytes(),
    );
    out.push_str(&render_realtime(&following));
    out
}

/// Reads one sub-batch and appends its frames (with `job`, each found value's compute result).
/// Synchronous so pinned slices never cross an await.
fn write_frames(
    replica: &ReplicaStore,
    keys: &[&[u8]],
    indexes: &[u32],
    buf: &mut Vec<u8>,
    trailer: &mut BatchGetTrailer,
    metrics: &ServerMetrics,
    job: Option<&ComputeJob>,
) {
    let mut result_buf = Vec::new();
    let mut found = |buf: &mut Vec<u8>, trailer: &mut BatchGetTrailer, index: u32, v: &[u8]| {
        let Some(job) = job else {
            BatchGetFrameWriter::record(buf, index, v);
            trailer.found += 1;
            return;
        };
        match job.answer(v, &mut result_buf) {
            Ok(()) => {
                BatchGetFrameWriter::record(buf, index, &result_buf);
                trailer.found += 1;
            }
            Err((code, detail)) => {
                tracing::warn!(%detail, "a stored value cannot be computed on");
                BatchGetFrameWriter::key_error(buf, index, code);
                metrics.count_error(code);
                trailer.errors += 1;
            }
        }
    };
    for ((result, &index), key) in replica
        .multi_get_sorted(keys)
        .into_iter()
        .zip(indexes)
        .zip(keys)
    {
        match result {
            Ok(Some(value)) => match replica.served(key, &value) {
                Served::Value(v) => found(buf, trailer, index, v),
                Served::Assembled(v) => found(buf, trailer, index, &v),
                Served::Missing => {
                    BatchGetFrameWriter::missing(buf, index);
                    trailer.missing += 1;
                }
                Served::Corrupt(detail) => {
                    tracing::warn!(%detail, "a stored value cannot be served");
                    BatchGetFrameWriter::key_error(buf, index, ErrorCode::CorruptValue);
                    metrics.count_error(ErrorCode::CorruptValue);
                    trailer.errors += 1;
                }
            },
            Ok(None) => {
                BatchGetFrameWriter::missing(buf, index);
                trailer.missing += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "multi-get failed for a key");
                BatchGetFrameWriter::key_error(buf, index, ErrorCode::Internal);
                metrics.count_error(ErrorCode::Internal);
                trailer.errors += 1;
            }
        }
    }
}

/// Sends `data`, first waiting until the stream has some flow-control capacity, so at most about
/// one chunk beyond the peer's window is buffered per stream. A peer that grants none within
/// [`ConnectionLimits::send_timeout`] has the stream reset.
async fn send_chunk(
    service: &ReadService,
    stream: &mut SendStream<Bytes>,
    data: Bytes,
    end_of_stream: bool,
) -> Result<(), h2::Error> {
    if !data.is_empty() {
        stream.reserve_capacity(data.len());
        let wait = service.connection_limits.send_timeout;
        while stream.capacity() == 0 {
            let granted = futures::future::poll_fn(|cx| stream.poll_capacity(cx));
            match tokio::time::timeout(wait, granted).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err(h2::Error::from(h2::Reason::CANCEL)),
                Err(_) => {
                    service
                        .metrics
                        .responses_stalled
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(?wait, "the client read nothing of a response; resetting it");
                    stream.send_reset(h2::Reason::CANCEL);
                    return Err(h2::Error::from(h2::Reason::CANCEL));
                }
            }
        }
    }
    stream.send_data(data, end_of_stream)
}

async fn send_body(
    service: &ReadService,
    respond: &mut SendResponse<Bytes>,
    content_type: &str,
    body: Bytes,
) -> Result<(), Failure> {
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(())
        .map_err(|e| Failure::new(ErrorCode::Internal, e.to_string()))?;
    match respond.send_response(response, false) {
        Ok(mut stream) => {
            if let Err(e) = send_chunk(service, &mut stream, body, true).await {
                tracing::debug!(error = %e, "client went away during the response");
            }
        }
        Err(e) => tracing::debug!(error = %e, "client went away before the response"),
    }
    Ok(())
}

fn send_error(respond: &mut SendResponse<Bytes>, code: ErrorCode, message: &str) {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let Ok(response) = Response::builder()
        .status(status)
        .header(ERROR_CODE_HEADER, code.as_u16().to_string())
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(())
    else {
        return;
    };
    let body = ErrorBody {
        code,
        message: message.to_string(),
    }
    .encode();
    match respond.send_response(response, false) {
        Ok(mut stream) => {
            let _ = stream.send_data(Bytes::from(body), true);
        }
        Err(e) => tracing::debug!(error = %e, "client went away before the error response"),
    }
}

/// Reusable response buffers: a buffer sent as `Bytes` comes back to the pool when h2 is done.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        let pooled = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        pooled.unwrap_or_else(|| Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 8))
    }

    fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        rialto_protocol::recycle::lend(self, buf)
    }
}

impl rialto_protocol::recycle::Recycle for BufferPool {
    fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() > POOLED_BUFFER_BYTES_MAX {
            return;
        }
        buf.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < POOLED_BUFFERS_MAX {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{reported_state, version_record, wait_until, PushRecords};
    use crate::{start, FaultConfig, RunningServer, ServerConfig};
    use http::HeaderMap;
    use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};
    use rialto_backends::{MetaStore, PubSub};
    use rialto_protocol::meta::{Layout, ReplicaState};
    use rialto_protocol::wire::{decode_frame, BatchGetFrame, StoredValue, BATCH_GET_FORMAT};

    const ROOT: &str = "/r";
    const KEYS_MAX: usize = 400;

    struct Fixture {
        server: RunningServer,
        meta: MemoryMetaStore,
        pubsub: MemoryPubSub,
        config: ServerConfig,
        _dir: tempfile::TempDir,
    }

    fn big_value(i: usize) -> Vec<u8> {
        vec![(i % 251) as u8; 10_000]
    }

    /// A server hosting `s` v1 partition 0 (ONLINE, keys k0..k299) but not partition 1.
    const FIXTURE_DICTIONARY: &[u8] = b"the fixture's dictionary";

    #[tokio::test]
    async fn dictionary_is_served_from_an_online_replica() {
        let f = fixture().await;
        let c = &connect(f.server.address(), 1 << 20).await;
        let (status, _, body) = call(
            c,
            Method::GET,
            &rialto_protocol::wire::dictionary_path("s", 1),
            &[],
            vec![],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, FIXTURE_DICTIONARY);
        assert_error(
            &call(c, Method::GET, "/v1/dictionary/s/9", &[], vec![]).await,
            ErrorCode::UnknownVersion,
        );
        assert_error(
            &call(c, Method::GET, "/v1/dictionary/zz/1", &[], vec![]).await,
            ErrorCode::UnknownStore,
        );
        f.server.shutdown().await.unwrap();
    }

    async fn fixture() -> Fixture {
        fixture_with(FaultConfig::default()).await
    }

    /// [`fixture`] with faults injected from the start.
    async fn fixture_with(faults: FaultConfig) -> Fixture {
        fixture_limited(faults, ConnectionLimits::default()).await
    }

    /// [`fixture_with`] and bounds on each peer.
    async fn fixture_limited(faults: FaultConfig, limits: ConnectionLimits) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemoryMetaStore::new();
        let pubsub = MemoryPubSub::new();
        pubsub.create_topic("s_v1", 2).await.unwrap();
        let mut push = PushRecords::start_with(
            [3; 16],
            rialto_protocol::envelope::ControlMessage::StartOfPush {
                sorted: false,
                codec: rialto_protocol::envelope::CompressionCodec::ZstdWithDictionary,
                dictionary: FIXTURE_DICTIONARY.to_vec(),
            },
        );
        for i in 0..300 {
            push.put(format!("k{i}").as_bytes(), 1, &big_value(i));
        }
        pubsub.append_all("s_v1", 0, push.finish()).unwrap();
        let mut record = version_record("s", 1, &[&["n1"], &["n2"]]);
        // As START_OF_PUSH says (the values are not really compressed: the server never looks).
        record.compression = rialto_protocol::meta::Compression::ZstdDictionary;
        meta.put(
            &Layout::new(ROOT).version("s", 1),
            serde_json::to_vec(&record).unwrap(),
            None,
        )
        .await
        .unwrap();
        let mut config = ServerConfig::new("n1", "z1", dir.path());
        config.meta_root = ROOT.into();
        config.batch_get_keys_max = KEYS_MAX;
        config.faults = faults;
        config.connection_limits = limits;
        let server = start(
            config.clone(),
            Arc::new(meta.clone()),
            Arc::new(pubsub.clone()),
        )
        .await
        .unwrap();
        let m = &meta;
        let online = wait_until(Duration::from_secs(20), move || async move {
            reported_state(m, ROOT, "s", 1, 0, "n1")
                .await
                .map(|r| r.state)
                == Some(ReplicaState::Online)
        })
        .await;
        assert!(online, "replica did not become ONLINE");
        Fixture {
            server,
            meta,
            pubsub,
            config,
            _dir: dir,
        }
    }

    async fn connect(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    async fn call(
        client: &h2::client::SendRequest<Bytes>,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut client = client.clone().ready().await.unwrap();
        let (response, mut stream) = client
            .send_request(req.body(()).unwrap(), body.is_empty())
            .unwrap();
        if !body.is_empty() {
            stream.send_data(Bytes::from(body), true).unwrap();
        }
        let (parts, mut body) = response.await.unwrap().into_parts();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        (parts.status, parts.headers, out)
    }

    fn assert_error(result: &(StatusCode, HeaderMap, Vec<u8>), code: ErrorCode) {
        let (status, headers, body) = result;
        assert_eq!(
            status.as_u16(),
            code.http_status(),
            "{code}: {:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            headers.get(ERROR_CODE_HEADER).unwrap().to_str().unwrap(),
            code.as_u16().to_string()
        );
        assert_eq!(ErrorBody::decode(body).unwrap().code, code);
    }

    fn batch(keys: &[(u32, &str)]) -> Vec<u8> {
        BatchGetRequest {
            keys: keys
                .iter()
                .map(|(p, k)| (*p, k.as_bytes().to_vec()))
                .collect(),
        }
        .encode()
    }

    /// The body of a batch-get of `s` v1 answered 200.
    async fn batch_get_ok(
        client: &h2::client::SendRequest<Bytes>,
        keys: &[(u32, &str)],
    ) -> Vec<u8> {
        let path = "/v1/batch-get/s/1";
        let (status, _, body) = call(client, Method::POST, path, &[], batch(keys)).await;
        assert_eq!(status, StatusCode::OK);
        body
    }

    fn frames(body: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = body;
        while let Some((frame, used)) = decode_frame(rest).unwrap() {
            out.push(match frame {
                BatchGetFrame::Record { key_index, stored } => {
                    format!("record {key_index} {}", stored.len())
                }
                BatchGetFrame::Missing { key_index } => format!("missing {key_index}"),
                BatchGetFrame::KeyError { key_index, code } => {
                    format!("error {key_index} {}", code.name())
                }
                BatchGetFrame::Trailer(t) => format!(
                    "trailer {} {} {} {}",
                    t.keys_total, t.found, t.missing, t.errors
                ),
            });
            rest = &rest[used..];
        }
        assert!(rest.is_empty(), "{} trailing bytes", rest.len());
        out
    }

    #[tokio::test]
    async fn get_health_and_metrics() {
        let f = fixture().await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let (status, _, body) = call(&client, Method::GET, "/health", &[], vec![]).await;
        assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ok"[..]));
        let (status, _, body) =
            call(&client, Method::POST, "/v1/get/s/1/0", &[], b"k5".to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, StoredValue::encode(1, &big_value(5)));
        assert_error(
            &call(
                &client,
                Method::POST,
                "/v1/get/s/1/0",
                &[],
                b"nope".to_vec(),
            )
            .await,
            ErrorCode::KeyNotFound,
        );
        let (status, _, body) = call(&client, Method::GET, "/metrics", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("rialto_server_requests_total{route=\"get\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_replicas{state=\"ONLINE\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_records_ingested_total 300"),
            "{text}"
        );
        let disk = text
            .lines()
            .find(|l| l.starts_with("rialto_server_store_disk_bytes{store=\"s\",version=\"1\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        assert!(disk.is_some_and(|d| d > 0), "{text}");
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_bodiless_get_carries_its_key_in_the_path() {
        let f = fixture().await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let c = &client;
        let path = |partition: u32, key: &[u8]| {
            rialto_protocol::wire::get_key_path("s", 1, partition, key)
        };
        let (status, _, body) = call(c, Method::GET, &path(0, b"k5"), &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, StoredValue::encode(1, &big_value(5)));
        // Upper-case hex is the same key ("k6" is 6b 36).
        let (status, _, body) = call(c, Method::GET, "/v2/get/s/1/0/6B36", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, StoredValue::encode(1, &big_value(6)));
        let refused = [
            (Method::GET, path(0, b"nope"), ErrorCode::KeyNotFound),
            (Method::GET, path(1, b"k5"), ErrorCode::PartitionNotServed),
            (
                Method::GET,
                "/v2/get/zz/1/0/6b35".into(),
                ErrorCode::UnknownStore,
            ),
            (
                Method::GET,
                "/v2/get/s/1/0/6b3".into(),
                ErrorCode::BadRequest,
            ),
            (
                Method::GET,
                "/v2/get/s/1/0/6bzz".into(),
                ErrorCode::BadRequest,
            ),
            (Method::POST, path(0, b"k5"), ErrorCode::BadRequest),
            (Method::GET, "/v1/get/s/1/0".into(), ErrorCode::BadRequest),
        ];
        for (method, path, code) in refused {
            assert_error(&call(c, method, &path, &[], vec![]).await, code);
        }
        // The connection still serves, and every get was counted once.
        let (status, _, body) = call(c, Method::GET, &path(0, b"k7"), &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, StoredValue::encode(1, &big_value(7)));
        let m = f.server.metrics();
        assert_eq!(m.requests(RouteKind::Get), 10);
        assert_eq!(m.keys_found.load(Ordering::Relaxed), 3);
        assert_eq!(m.keys_missing.load(Ordering::Relaxed), 1);
        assert_eq!(m.errors(ErrorCode::BadRequest), 4);
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_bodiless_get_waits_for_window_when_the_connection_has_none() {
        let f = fixture().await;
        // HTTP/2's default windows (a connection's cannot be smaller): one unread batch-get
        // response of 100 KB takes the whole connection window.
        let client = connect(f.server.address(), 65_535).await;
        let mut sender = client.clone().ready().await.unwrap();
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let keys: Vec<(u32, &str)> = keys.iter().map(|k| (0, k.as_str())).collect();
        let request = Request::builder()
            .method(Method::POST)
            .uri("http://127.0.0.1/v1/batch-get/s/1")
            .body(())
            .unwrap();
        let (response, mut upload) = sender.send_request(request, false).unwrap();
        upload.send_data(Bytes::from(batch(&keys)), true).unwrap();
        let mut batch_body = response.await.unwrap().into_body();
        let first = batch_body.data().await.unwrap().unwrap();
        // Wait until the server has sent all the window allows.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let path = rialto_protocol::wire::get_key_path("s", 1, 0, b"k19");
        let get = tokio::spawn({
            let client = client.clone();
            async move { call(&client, Method::GET, &path, &[], vec![]).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !get.is_finished(),
            "the get's value came through a full window"
        );
        // Reading the batch-get's response gives the window back, and the get's value follows.
        let mut batch_bytes = first.to_vec();
        let _ = batch_body.flow_control().release_capacity(first.len());
        while let Some(chunk) = batch_body.data().await {
            let chunk = chunk.unwrap();
            let _ = batch_body.flow_control().release_capacity(chunk.len());
            batch_bytes.extend_from_slice(&chunk);
        }
        assert_eq!(frames(&batch_bytes).last().unwrap(), "trailer 10 10 0 0");
        let (status, _, body) = get.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, StoredValue::encode(1, &big_value(19)));
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_serving_only_bodiless_gets_is_not_idle() {
        let idle_timeout = Duration::from_millis(600);
        let limits = ConnectionLimits {
            idle_timeout,
            ..ConnectionLimits::default()
        };
        let f = fixture_limited(FaultConfig::default(), limits).await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let path = rialto_protocol::wire::get_key_path("s", 1, 0, b"k3");
        // Gets answered on the connection's task for three idle timeouts: one connection.
        let started = std::time::Instant::now();
        while started.elapsed() < 3 * idle_timeout {
            let (status, _, _) = call(&client, Method::GET, &path, &[], vec![]).await;
            assert_eq!(status, StatusCode::OK, "after {:?}", started.elapsed());
            tokio::time::sleep(idle_timeout / 6).await;
        }
        // Then idle: closed.
        tokio::time::sleep(idle_timeout * 2).await;
        assert!(
            client.clone().ready().await.is_err(),
            "an idle connection must be closed after {idle_timeout:?}"
        );
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_store_version_partition_and_path() {
        let f = fixture().await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let c = &client;
        assert_error(
            &call(c, Method::POST, "/v1/get/zz/1/0", &[], b"k".to_vec()).await,
            ErrorCode::UnknownStore,
        );
        assert_error(
            &call(c, Method::POST, "/v1/get/s/9/0", &[], b"k".to_vec()).await,
            ErrorCode::UnknownVersion,
        );
        assert_error(
            &call(c, Method::POST, "/v1/get/s/1/1", &[], b"k".to_vec()).await,
            ErrorCode::PartitionNotServed,
        );
        assert_error(
            &call(
                c,
                Method::POST,
                "/v1/batch-get/zz/1",
                &[],
                batch(&[(0, "k1")]),
            )
            .await,
            ErrorCode::UnknownStore,
        );
        assert_error(
            &call(
                c,
                Method::POST,
                "/v1/batch-get/s/2",
                &[],
                batch(&[(0, "k1")]),
            )
            .await,
            ErrorCode::UnknownVersion,
        );
        let newer = call(c, Method::POST, "/v3/get/s/1/0", &[], vec![]).await;
        assert_error(&newer, ErrorCode::UnsupportedProtocol);
        let message = ErrorBody::decode(&newer.2).unwrap().message;
        assert!(
            message.contains("v3 is newer than this server's v2"),
            "{message}"
        );
        assert_error(
            &call(c, Method::GET, "/v1/nothing/s/1/0", &[], vec![]).await,
            ErrorCode::NotFound,
        );
        assert_error(
            &call(c, Method::GET, "/v1/get/s/1/0", &[], vec![]).await,
            ErrorCode::BadRequest,
        );
        let m = f.server.metrics();
        assert_eq!(m.errors(ErrorCode::UnknownStore), 2);
        assert_eq!(m.requests(RouteKind::Unknown), 2);
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn malformed_requests_get_typed_errors_and_the_connection_keeps_serving() {
        let f = fixture().await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let c = &client;
        let path = "/v1/batch-get/s/1";
        // Truncated body.
        let mut truncated = batch(&[(0, "k1"), (0, "k2")]);
        truncated.truncate(truncated.len() - 1);
        assert_error(
            &call(c, Method::POST, path, &[], truncated).await,
            ErrorCode::BadRequest,
        );
        // Count larger than the body can hold.
        let mut lying = vec![BATCH_GET_FORMAT];
        lying.extend_from_slice(&300u32.to_be_bytes());
        assert_error(
            &call(c, Method::POST, path, &[], lying).await,
            ErrorCode::BadRequest,
        );
        assert_error(
            &call(c, Method::POST, path, &[], vec![]).await,
            ErrorCode::BadRequest,
        );
        assert_error(
            &call(c, Method::POST, path, &[], vec![9, 0, 0, 0, 0]).await,
            ErrorCode::UnsupportedProtocol,
        );
        // Too many keys.
        let many: Vec<(u32, String)> = (0..KEYS_MAX + 1).map(|i| (0, format!("k{i}"))).collect();
        let many: Vec<(u32, &str)> = many.iter().map(|(p, k)| (*p, k.as_str())).collect();
        assert_error(
            &call(c, Method::POST, path, &[], batch(&many)).await,
            ErrorCode::TooManyKeys,
        );
        // Declared body over the limit: refused before reading it.
        {
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!("http://127.0.0.1{path}"))
                .header("content-length", (REQUEST_BYTES_MAX + 1).to_string())
                .body(())
                .unwrap();
            let mut sender = c.clone().ready().await.unwrap();
            // Headers only: the upload never starts, the server must answer without waiting for it.
            let (response, _upload) = sender.send_request(req, false).unwrap();
            let (parts, mut body) = response.await.unwrap().into_parts();
            let mut out = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                out.extend_from_slice(&chunk);
            }
            assert_error(&(parts.status, parts.headers, out), ErrorCode::TooLarge);
        }
        // A get key over the key limit, sent for real.
        assert_error(
            &call(
                c,
                Method::POST,
                "/v1/get/s/1/0",
                &[],
                vec![b'k'; KEY_BYTES_MAX + 10],
            )
            .await,
            ErrorCode::TooLarge,
        );
        // The same connection still serves good requests.
        let (status, _, body) = call(
            c,
            Method::POST,
            path,
            &[],
            batch(&[(0, "k1"), (0, "missing"), (1, "k2")]),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let mut got = frames(&body);
        let trailer = got.pop().unwrap();
        got.sort();
        assert_eq!(
            got,
            vec![
                "error 2 partition_not_served",
                "missing 1",
                "record 0 10004"
            ]
        );
        assert_eq!(trailer, "trailer 3 1 1 1");
        let (status, _, _) = call(c, Method::POST, "/v1/get/s/1/0", &[], b"k7".to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(f.server.metrics().errors(ErrorCode::TooManyKeys), 1);
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn small_batch_gets_answered_on_the_connection_task_match_large_ones() {
        let f = fixture().await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        // Found keys (one twice), a missing key, a partition this server does not serve.
        let small: Vec<(u32, String)> = [(0, "k7"), (0, "nope"), (1, "k8"), (0, "k250"), (0, "k7")]
            .into_iter()
            .map(|(p, k)| (p, k.to_string()))
            .collect();
        // The same first keys, then more than a connection's task answers itself.
        let large: Vec<(u32, String)> = small
            .iter()
            .cloned()
            .chain((0..INLINE_BATCH_KEYS_MAX).map(|i| (0, format!("k{}", 100 + i))))
            .collect();
        let expected = |index: usize, (partition, key): &(u32, String)| -> String {
            let value = key.strip_prefix('k').and_then(|i| i.parse::<usize>().ok());
            match (partition, value) {
                (1, _) => format!("error {index} partition_not_served"),
                (_, Some(i)) => {
                    format!("record {index} {:?}", StoredValue::encode(1, &big_value(i)))
                }
                (_, None) => format!("missing {index}"),
            }
        };
        for keys in [&small, &large] {
            let refs: Vec<(u32, &str)> = keys.iter().map(|(p, k)| (*p, k.as_str())).collect();
            let body = batch_get_ok(&client, &refs).await;
            let mut got = Vec::new();
            let mut rest = &body[..];
            while let Some((frame, used)) = decode_frame(rest).unwrap() {
                got.push(match frame {
                    BatchGetFrame::Record { key_index, stored } => {
                        (key_index, format!("record {key_index} {stored:?}"))
                    }
                    BatchGetFrame::Missing { key_index } => {
                        (key_index, format!("missing {key_index}"))
                    }
                    BatchGetFrame::KeyError { key_index, code } => {
                        (key_index, format!("error {key_index} {}", code.name()))
                    }
                    BatchGetFrame::Trailer(t) => (
                        u32::MAX,
                        format!(
                            "trailer {} {} {} {}",
                            t.keys_total, t.found, t.missing, t.errors
                        ),
                    ),
                });
                rest = &rest[used..];
            }
            assert!(rest.is_empty());
            got.sort();
            let mut want: Vec<(u32, String)> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| (i as u32, expected(i, k)))
                .collect();
            let found = keys.len() - 2;
            want.push((u32::MAX, format!("trailer {} {found} 1 1", keys.len())));
            assert_eq!(got.len(), want.len(), "{} keys", keys.len());
            for (got, want) in got.iter().zip(&want) {
                assert!(
                    got == want,
                    "{} keys: got {:.80}, want {:.80}",
                    keys.len(),
                    got.1,
                    want.1
                );
            }
        }
        let m = f.server.metrics();
        assert_eq!(
            m.keys_found.load(Ordering::Relaxed),
            (small.len() + large.len() - 4) as u64
        );
        assert_eq!(m.keys_missing.load(Ordering::Relaxed), 2);
        assert_eq!(m.batch_get_total.count(), 2);
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn large_batch_get_streams_in_chunks_through_small_client_windows() {
        let f = fixture().await;
        // Default 64 KiB client windows: the server must wait for capacity, not buffer blindly.
        let client = connect(f.server.address(), 65_535).await;
        let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
        let keys: Vec<(u32, &str)> = keys.iter().map(|k| (0, k.as_str())).collect();
        let body = batch_get_ok(&client, &keys).await;
        assert!(body.len() > 2 * CHUNK_BYTES, "{}", body.len());
        let got = frames(&body);
        assert_eq!(got.last().unwrap(), "trailer 300 300 0 0");
        assert_eq!(got.len(), 301);
        let m = f.server.metrics();
        assert_eq!(m.keys_found.load(Ordering::Relaxed), 300);
        // One observation per phase, in order: request <= first chunk <= total.
        let phases = [
            &m.batch_get_request,
            &m.batch_get_first_chunk,
            &m.batch_get_total,
        ];
        assert!(phases.iter().all(|h| h.count() == 1));
        assert!(phases[0].mean() <= phases[1].mean() && phases[1].mean() <= phases[2].mean());
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_streams_on_one_connection() {
        let f = fixture().await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let mut tasks = Vec::new();
        for i in 0..50 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("k{i}").into_bytes();
                let (status, _, body) =
                    call(&client, Method::POST, "/v1/get/s/1/0", &[], key).await;
                assert_eq!(status, StatusCode::OK);
                assert_eq!(body, StoredValue::encode(1, &big_value(i)));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn injected_faults_delay_and_fail_reads_but_not_health() {
        let delay = Duration::from_millis(150);
        let f = fixture_with(FaultConfig {
            delay,
            error_rate: 0.0,
        })
        .await;
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let c = &client;
        let m = f.server.metrics();

        // The configured delay applies to get (either form) and batch-get, not to health or
        // metrics.
        let started = std::time::Instant::now();
        let (status, _, _) = call(c, Method::POST, "/v1/get/s/1/0", &[], b"k1".to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
        let started = std::time::Instant::now();
        let path = rialto_protocol::wire::get_key_path("s", 1, 0, b"k2");
        let (status, _, body) = call(c, Method::GET, &path, &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, StoredValue::encode(1, &big_value(2)));
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
        let started = std::time::Instant::now();
        let (status, _, body) = call(
            c,
            Method::POST,
            "/v1/batch-get/s/1",
            &[],
            batch(&[(0, "k1"), (0, "k2")]),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(frames(&body).last().unwrap(), "trailer 2 2 0 0");
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
        let (status, _, _) = call(c, Method::GET, "/health", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(m.faults_delayed.load(Ordering::Relaxed), 3);

        // Delays overlap: they are timers, not blocked threads.
        let started = std::time::Instant::now();
        let mut calls = Vec::new();
        for i in 0..20 {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                let key = format!("k{i}").into_bytes();
                call(&client, Method::POST, "/v1/get/s/1/0", &[], key)
                    .await
                    .0
            }));
        }
        for t in calls {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
        assert!(started.elapsed() < delay * 10, "{:?}", started.elapsed());

        // Changed at runtime: no delay, every read fails with a retryable error.
        let faults = f.server.faults();
        faults.set(FaultConfig {
            delay: Duration::ZERO,
            error_rate: 1.0,
        });
        let started = std::time::Instant::now();
        assert_error(
            &call(c, Method::POST, "/v1/get/s/1/0", &[], b"k1".to_vec()).await,
            ErrorCode::Overloaded,
        );
        assert!(started.elapsed() < delay, "{:?}", started.elapsed());
        assert_error(
            &call(
                c,
                Method::POST,
                "/v1/batch-get/s/1",
                &[],
                batch(&[(0, "k1")]),
            )
            .await,
            ErrorCode::Overloaded,
        );
        assert!(ErrorCode::Overloaded.retryable());
        let (status, _, body) = call(c, Method::GET, "/metrics", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("rialto_server_faults_injected_total{kind=\"error\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("rialto_server_faults_injected_total{kind=\"delay\"} 23"),
            "{text}"
        );
        assert_eq!(m.errors(ErrorCode::Overloaded), 2);

        // Error rate 0: every read succeeds again.
        faults.set_error_rate(0.0);
        for i in 0..20 {
            let key = format!("k{i}").into_bytes();
            let (status, _, _) = call(c, Method::POST, "/v1/get/s/1/0", &[], key).await;
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(m.faults_failed.load(Ordering::Relaxed), 2);
        f.server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn kill_drops_connections_keeps_the_lease_and_the_data_reopens() {
        let f = fixture().await;
        let layout = Layout::new(ROOT);
        let client = connect(f.server.address(), STREAM_WINDOW_BYTES).await;
        let (status, _, _) =
            call(&client, Method::POST, "/v1/get/s/1/0", &[], b"k1".to_vec()).await;
        assert_eq!(status, StatusCode::OK);

        // A request in flight (held by a long injected delay) when the server is killed.
        f.server.faults().set_delay(Duration::from_secs(30));
        let mut sender = client.clone().ready().await.unwrap();
        let request = Request::builder()
            .method(Method::POST)
            .uri("http://127.0.0.1/v1/get/s/1/0")
            .body(())
            .unwrap();
        let (response, mut upload) = sender.send_request(request, false).unwrap();
        upload.send_data(Bytes::from_static(b"k2"), true).unwrap();
        let metrics = f.server.metrics();
        let m = &metrics;
        assert!(
            wait_until(Duration::from_secs(5), move || async move {
                m.faults_delayed.load(Ordering::Relaxed) == 1
            })
            .await
        );

        let address = f.server.address();
        let started = std::time::Instant::now();
        f.server.kill().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // The in-flight request ends with a connection error, not an answer.
        let answer = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("the in-flight request was not cut");
        assert!(answer.is_err(), "{answer:?}");
        // The connection is gone and nothing listens any more.
        assert!(client.clone().ready().await.is_err());
        assert!(tokio::net::TcpStream::connect(address).await.is_err());
        // The lease was not revoked: node and replica records stay until it expires.
        assert!(f.meta.value(&layout.node("n1")).is_some());
        assert!(reported_state(&f.meta, ROOT, "s", 1, 0, "n1")
            .await
            .is_some());
        let lease = f.meta.lease_of(&layout.node("n1")).unwrap();
        assert!(f.meta.leases().contains(&lease));

        // The databases were closed: a new server reopens the same directory, without the topic.
        f.pubsub.delete_topic("s_v1").await.unwrap();
        let server = start(
            f.config.clone(),
            Arc::new(f.meta.clone()),
            Arc::new(f.pubsub.clone()),
        )
        .await
        .unwrap();
        let m = &f.meta;
        let online = wait_until(Duration::from_secs(20), move || async move {
            reported_state(m, ROOT, "s", 1, 0, "n1")
                .await
                .map(|r| r.state)
                == Some(ReplicaState::Online)
                && m.lease_of(&Layout::new(ROOT).replica("s", 1, 0, "n1"))
                    .is_some_and(|l| l != lease)
        })
        .await;
        assert!(online, "the restarted server did not serve the kept data");
        let client = connect(server.address(), STREAM_WINDOW_BYTES).await;
        let (status, _, body) =
            call(&client, Method::POST, "/v1/get/s/1/0", &[], b"k7".to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, StoredValue::encode(1, &big_value(7)));
        server.shutdown().await.unwrap();
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use crate::{start, ServerConfig, TlsFiles};
    use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};

    #[tokio::test]
    async fn serves_health_over_tls_with_alpn_h2() {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_pem = dir.path().join("cert.pem");
        let key_pem = dir.path().join("key.pem");
        std::fs::write(&cert_pem, certified.cert.pem()).unwrap();
        std::fs::write(&key_pem, certified.key_pair.serialize_pem()).unwrap();
        let mut config = ServerConfig::new("n1", "z1", dir.path().join("data"));
        config.tls = Some(TlsFiles {
            cert: cert_pem,
            key: key_pem,
            client_ca: None,
        });
        let server = start(
            config,
            Arc::new(MemoryMetaStore::new()),
            Arc::new(MemoryPubSub::new()),
        )
        .await
        .unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(certified.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let tcp = tokio::net::TcpStream::connect(server.address())
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (client, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        let req = Request::builder()
            .uri("https://localhost/health")
            .body(())
            .unwrap();
        let (response, _) = client.send_request(req, true).unwrap();
        let (parts, mut body) = response.await.unwrap().into_parts();
        assert_eq!(parts.status, StatusCode::OK);
        let chunk = body.data().await.unwrap().unwrap();
        assert_eq!(&chunk[..], b"ok");

        // A bad certificate path is a clear start-up error.
        let mut bad = ServerConfig::new("n2", "z1", dir.path().join("data2"));
        bad.tls = Some(TlsFiles {
            cert: dir.path().join("missing.pem"),
            key: dir.path().join("key.pem"),
            client_ca: None,
        });
        let err = start(
            bad,
            Arc::new(MemoryMetaStore::new()),
            Arc::new(MemoryPubSub::new()),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, crate::ServerError::Tls(_)), "{err}");
        server.shutdown().await.unwrap();
    }
}
