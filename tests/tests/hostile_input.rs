//! Hostile peers against a running storage server: garbage bytes, HTTP/1.1 on the HTTP/2 port,
//! hundreds of idle connections, a slow sender, a stalled reader, oversized and truncated bodies,
//! a stream flood.
//! After each the server still answers a normal batch-get with exactly the values pushed, and the
//! process's memory stays bounded.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rialto_fast_client::Client;
use rialto_protocol::avro::Value;
use rialto_server::ConnectionLimits;
use rialto_tests::{key_of, string_value, Cluster, ClusterOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STORE: &str = "target";
const RECORDS: usize = 2_000;
const VALUE_BYTES: usize = 100;

/// Every key read back through the fast client, compared with what was pushed.
async fn reads_back(client: &Client) -> Result<()> {
    let keys: Vec<Value> = (0..RECORDS).map(|i| Value::String(key_of(i))).collect();
    let values = client.batch_get(&keys).await?;
    for (i, v) in values.into_iter().enumerate() {
        ensure!(
            v == Some(Value::String(string_value(i, VALUE_BYTES))),
            "key {i} read back wrong"
        );
    }
    Ok(())
}

/// Resident memory of this process (the server runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Reads until the server closes the connection; errors if it is still open after `within`.
async fn closed_within(mut tcp: TcpStream, within: Duration) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .context("the server kept a hostile connection open")
}

async fn h2_client(address: std::net::SocketAddr) -> Result<h2::client::SendRequest<Bytes>> {
    Ok(h2_connection(address).await?.0)
}

/// An HTTP/2 client and the task driving its connection, which ends when the connection does.
async fn h2_connection(
    address: std::net::SocketAddr,
) -> Result<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>)> {
    let tcp = TcpStream::connect(address).await?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client.ready().await?, driver))
}

/// The server's `/metrics` text.
async fn metrics_text(address: std::net::SocketAddr) -> Result<Vec<u8>> {
    let mut h2 = h2_client(address).await?;
    let request = Request::builder()
        .uri("http://localhost/metrics")
        .body(())?;
    let (response, _) = h2.send_request(request, true)?;
    let mut body = response.await?.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn batch_path(version: u32) -> String {
    format!("http://localhost/v1/batch-get/{STORE}/{version}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_survives_hostile_peers_and_keeps_serving_exact_values() -> Result<()> {
    let limits = ConnectionLimits {
        connections_max: 256,
        idle_timeout: Duration::from_secs(2),
        body_read_timeout: Duration::from_secs(1),
        send_timeout: Duration::from_secs(2),
    };
    let cluster = Cluster::start_opts(ClusterOptions {
        servers: 1,
        connection_limits: limits,
        ..ClusterOptions::default()
    })
    .await?;
    cluster
        .create_string_store(STORE, 2, 1, RECORDS, VALUE_BYTES)
        .await?;
    let version = cluster
        .admin()
        .describe_store(STORE)
        .await?
        .store
        .current_version
        .context("a current version")?;
    let address = cluster.server_address(0).context("server running")?;
    let client = cluster.client(STORE).await?;
    reads_back(&client).await?;
    let rss_before = rss_bytes();

    // Garbage bytes: the HTTP/2 handshake fails and the connection is closed.
    let mut tcp = TcpStream::connect(address).await?;
    let garbage: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = tcp.write_all(&garbage).await;
    closed_within(tcp, Duration::from_secs(15)).await?;
    reads_back(&client).await?;

    // HTTP/1.1 to the HTTP/2 port.
    let mut tcp = TcpStream::connect(address).await?;
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    closed_within(tcp, Duration::from_secs(15)).await?;
    reads_back(&client).await?;

    // Hundreds of idle connections (more than the server serves at once): they are cut off by
    // the handshake deadline and the idle timeout, and a normal client still gets through.
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(address).await?);
    }
    let mut idle_h2 = Vec::new();
    for _ in 0..50 {
        idle_h2.push(h2_connection(address).await?);
    }
    let started = Instant::now();
    let fresh = cluster.client(STORE).await?;
    reads_back(&fresh).await?;
    eprintln!(
        "a fresh client read through 450 idle connections after {:?}",
        started.elapsed()
    );
    drop(idle);
    // An idle HTTP/2 connection is closed after the idle timeout.
    tokio::time::sleep(limits.idle_timeout + Duration::from_secs(1)).await;
    let (mut probe, driver) = idle_h2.pop().unwrap();
    // The server closed it: the connection's task has ended (within a margin for a busy
    // machine), and a request on it fails.
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .with_context(|| {
            format!(
                "an idle connection must be closed after {:?}",
                limits.idle_timeout
            )
        })??;
    let request = Request::builder().uri("http://localhost/health").body(())?;
    assert!(
        probe.send_request(request, true).is_err(),
        "a request on a closed connection must fail"
    );
    drop(idle_h2);
    reads_back(&client).await?;

    // A slow sender: headers, then a body that never finishes, is answered within the body
    // deadline instead of holding a read slot.
    let mut h2 = h2_client(address).await?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(batch_path(version))
        .body(())?;
    let (response, mut body) = h2.send_request(request, false)?;
    body.send_data(Bytes::from_static(&[1, 0]), false)?;
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), response).await??;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(started.elapsed() < Duration::from_secs(5));
    reads_back(&client).await?;

    // A stalled reader: a batch-get whose response it never reads (it grants no flow-control
    // window) is reset after the send timeout, so it cannot hold the replica's database open.
    let tcp = TcpStream::connect(address).await?;
    let (stalled, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut stalled = stalled.ready().await?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(batch_path(version))
        .body(())?;
    let (response, mut body) = stalled.send_request(request, false)?;
    let keys = rialto_protocol::wire::BatchGetRequest {
        keys: vec![(0, b"never read".to_vec())],
    };
    body.send_data(Bytes::from(keys.encode()), true)?;
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), response).await??;
    assert_eq!(response.status(), StatusCode::OK);
    let mut data = response.into_body();
    let ended = tokio::time::timeout(Duration::from_secs(20), data.data())
        .await
        .context("a stalled response must be reset")?;
    assert!(
        matches!(&ended, Some(Err(e)) if e.reason() == Some(h2::Reason::CANCEL)),
        "a stalled response must be reset, not {ended:?}"
    );
    assert!(started.elapsed() >= limits.send_timeout - Duration::from_millis(100));
    eprintln!(
        "a stalled reader's response reset after {:?}",
        started.elapsed()
    );
    let metrics = String::from_utf8(metrics_text(address).await?)?;
    assert!(
        metrics.contains("rialto_server_responses_stalled_total 1\n"),
        "{metrics}"
    );
    reads_back(&client).await?;

    // Oversized (declared) and truncated bodies.
    let mut h2 = h2_client(address).await?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(batch_path(version))
        .header(http::header::CONTENT_LENGTH, (1u64 << 40).to_string())
        .body(())?;
    let (response, _body) = h2.send_request(request, false)?;
    let response = tokio::time::timeout(Duration::from_secs(10), response).await??;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let mut h2 = h2_client(address).await?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(batch_path(version))
        .header(http::header::CONTENT_LENGTH, "100000")
        .body(())?;
    let (response, mut body) = h2.send_request(request, false)?;
    body.send_data(Bytes::from_static(b"\x01\x00\x00"), true)?;
    let answered = tokio::time::timeout(Duration::from_secs(10), response).await?;
    assert!(
        answered.map(|r| !r.status().is_success()).unwrap_or(true),
        "a truncated body must not succeed"
    );
    reads_back(&client).await?;

    // A stream flood: thousands of requests opened on one connection at once, each a
    // malformed batch-get; streams past the concurrency limit are refused by HTTP/2 itself.
    let h2 = h2_client(address).await?;
    let mut pending = Vec::new();
    for _ in 0..3_000 {
        let sender = h2.clone();
        pending.push(tokio::spawn(async move {
            let sender = sender.ready().await.ok()?;
            let mut sender = sender;
            let request = Request::builder()
                .method(Method::POST)
                .uri(batch_path(1_000_000))
                .body(())
                .ok()?;
            let (response, mut body) = sender.send_request(request, false).ok()?;
            body.send_data(Bytes::from_static(b"garbage"), true).ok()?;
            response.await.ok().map(|r| r.status())
        }));
    }
    let mut answered = 0;
    for task in pending {
        if let Ok(Some(status)) = task.await {
            assert!(!status.is_success());
            answered += 1;
        }
    }
    eprintln!("stream flood: {answered} of 3000 requests answered with an error");
    reads_back(&client).await?;

    let rss_after = rss_bytes();
    eprintln!(
        "resident memory: {} MB before the hostile peers, {} MB after",
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(
        rss_after < rss_before + (512 << 20),
        "memory grew from {rss_before} to {rss_after} bytes"
    );
    cluster.shutdown().await
}
