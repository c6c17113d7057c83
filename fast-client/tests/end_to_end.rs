//! End-to-end: a real `Client` against in-process fake storage servers (h2, canned values) and the
//! in-memory `MetaStore`. Covers get, batch-get, failover from a replica that answers
//! PartitionNotServed, and a version swap picked up by a running client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use rialto_backends::memory::MemoryMetaStore;
use rialto_backends::MetaStore;
use rialto_fast_client::{Client, ClientConfig, ClientError, LongTailRetry};
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::meta::{
    Compression, Layout, NodeRecord, ReplicaRecord, ReplicaState, StorageProfile, StoreRecord,
    ValueSchema, VersionRecord, VersionStatus,
};
use rialto_protocol::wire::{
    self, BatchGetFrameWriter, BatchGetRequest, BatchGetTrailer, ErrorBody, Route, StoredValue,
};
use rialto_protocol::ErrorCode;

// ---------------------------------------------------------------------------------------------
// Synchronous writes for fixtures: the memory store applies a write before its future returns.

trait WriteNow {
    fn put_json<T: serde::Serialize>(&self, key: &str, value: &T);
    fn remove(&self, key: &str);
}

impl WriteNow for MemoryMetaStore {
    fn put_json<T: serde::Serialize>(&self, key: &str, value: &T) {
        self.put(key, serde_json::to_vec(value).unwrap(), None)
            .now_or_never()
            .expect("the memory store writes at once")
            .unwrap();
    }

    fn remove(&self, key: &str) {
        self.delete(key)
            .now_or_never()
            .expect("the memory store writes at once")
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Fake storage server: canned stored values for one version, or PartitionNotServed for all.

const STORE: &str = "ads";

struct FakeServer {
    address: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Default)]
struct Behavior {
    version: u32,
    values: Arc<HashMap<Vec<u8>, Vec<u8>>>,
    /// Answer PartitionNotServed for every key.
    bad: bool,
    /// Added delay before reads are answered, in ms (changeable while running).
    delay_ms: Arc<AtomicU64>,
    /// Answer reads and health checks with 500 Internal (changeable while running).
    failing: Arc<AtomicBool>,
    /// The compression dictionary served at `wire::dictionary_path` (changeable while running).
    dictionary: Arc<Mutex<Option<Vec<u8>>>>,
}

async fn start_server(behavior: Behavior) -> FakeServer {
    start_server_with(behavior, None).await
}

/// Starts a fake server; with `tls`, it speaks TLS (ALPN `h2`) with that server config.
async fn start_server_with(
    behavior: Behavior,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> FakeServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            // Like the real server: no Nagle delay on small response frames.
            let _ = socket.set_nodelay(true);
            let behavior = behavior.clone();
            let counter = counter.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(socket).await {
                            serve_connection(stream, behavior, counter).await;
                        }
                    }
                    None => serve_connection(socket, behavior, counter).await,
                }
            });
        }
    });
    FakeServer {
        address,
        requests,
        task,
    }
}

async fn serve_connection<T>(io: T, behavior: Behavior, counter: Arc<AtomicUsize>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((request, respond))) = conn.accept().await {
        counter.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve(behavior.clone(), request, respond));
    }
}

fn error_response(respond: &mut h2::server::SendResponse<Bytes>, code: ErrorCode) {
    let response = http::Response::builder()
        .status(code.http_status())
        .body(())
        .unwrap();
    let mut stream = respond.send_response(response, false).unwrap();
    let body = ErrorBody {
        code,
        message: format!("fake server says {}", code.name()),
    }
    .encode();
    stream.send_data(Bytes::from(body), true).unwrap();
}

async fn serve(
    b: Behavior,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let path = request.uri().path().to_string();
    let mut body = request.into_body();
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let route = wire::parse_route(&path);
    if let Some(Route::Get { key: Some(hex), .. }) = route {
        bytes = wire::decode_path_key(hex).unwrap();
    }
    if matches!(route, Some(Route::Get { .. } | Route::BatchGet { .. })) {
        let delay = b.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    if b.failing.load(Ordering::SeqCst) {
        return error_response(&mut respond, ErrorCode::Internal);
    }
    match route {
        Some(Route::Health) => {
            let mut s = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            s.send_data(Bytes::from_static(b"ok"), true).unwrap();
        }
        Some(Route::Dictionary { store, version }) => {
            let dictionary = b.dictionary.lock().unwrap().clone();
            match dictionary {
                Some(d) if store == STORE && version == b.version => {
                    let mut s = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    s.send_data(Bytes::from(d), true).unwrap();
                }
                _ => error_response(&mut respond, ErrorCode::NotFound),
            }
        }
        Some(Route::Get { store, version, .. }) => {
            if b.bad {
                return error_response(&mut respond, ErrorCode::PartitionNotServed);
            }
            if store != STORE || version != b.version {
                return error_response(&mut respond, ErrorCode::UnknownVersion);
            }
            match b.values.get(&bytes) {
                Some(stored) => {
                    let mut s = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    s.send_data(Bytes::from(stored.clone()), true).unwrap();
                }
                None => error_response(&mut respond, ErrorCode::KeyNotFound),
            }
        }
        Some(Route::BatchGet { store, version }) => {
            if store != STORE || version != b.version {
                return error_response(&mut respond, ErrorCode::UnknownVersion);
            }
            let keys = BatchGetRequest::decode(&bytes, 10_000).unwrap();
            let mut out = Vec::new();
            let mut t = BatchGetTrailer {
                keys_total: keys.len() as u32,
                ..Default::default()
            };
            for (i, (_, key)) in keys.iter().enumerate() {
                if b.bad {
                    BatchGetFrameWriter::key_error(
                        &mut out,
                        i as u32,
                        ErrorCode::PartitionNotServed,
                    );
                    t.errors += 1;
                } else if let Some(stored) = b.values.get(*key) {
                    BatchGetFrameWriter::record(&mut out, i as u32, stored);
                    t.found += 1;
                } else {
                    BatchGetFrameWriter::missing(&mut out, i as u32);
                    t.missing += 1;
                }
            }
            BatchGetFrameWriter::trailer(&mut out, &t);
            // Send in uneven chunks that cut frames in the middle.
            // The client may cancel the stream (a hedge answered first): stop quietly then.
            let Ok(mut s) = respond.send_response(http::Response::new(()), false) else {
                return;
            };
            let out = Bytes::from(out);
            let mut at = 0;
            let mut step = 3;
            while at < out.len() {
                let end = (at + step).min(out.len());
                if s.send_data(out.slice(at..end), end == out.len()).is_err() {
                    return;
                }
                at = end;
                step = step * 3 + 1;
            }
        }
        _ => error_response(&mut respond, ErrorCode::NotFound),
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster metadata helpers.

fn key_codec() -> AvroCodec {
    AvroCodec::parse(r#""string""#).unwrap()
}

fn key_bytes(k: &str) -> Vec<u8> {
    key_codec().encode(&Value::String(k.into()), "key").unwrap()
}

fn values(version: u32, count: usize) -> Arc<HashMap<Vec<u8>, Vec<u8>>> {
    let codec = AvroCodec::parse(r#""string""#).unwrap();
    Arc::new(
        (0..count)
            .map(|i| {
                let datum = codec
                    .encode(&Value::String(format!("v{version}-value-{i}")), "value")
                    .unwrap();
                (
                    key_bytes(&format!("key-{i}")),
                    StoredValue::encode(1, &datum),
                )
            })
            .collect(),
    )
}

fn store_record(name: &str, current: Option<u32>, backup: Option<u32>) -> StoreRecord {
    StoreRecord {
        name: name.into(),
        owner: "test".into(),
        key_schema: r#""string""#.into(),
        value_schemas: vec![ValueSchema {
            id: 1,
            schema: r#""string""#.into(),
        }],
        partition_count: 2,
        replication_factor: 2,
        storage: StorageProfile::OnDisk,
        compression: rialto_protocol::meta::Compression::None,
        max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
        hybrid: None,
        created_ms: 0,
        current_version: current,
        backup_version: backup,
        largest_version: current.unwrap_or(0),
        deleting: false,
        read_quota_keys_per_s: None,
        storage_quota_bytes: None,
        versions_to_keep: 2,
    }
}

fn put_node(meta: &MemoryMetaStore, layout: &Layout, id: &str, address: &str) {
    let r = NodeRecord {
        node_id: id.into(),
        address: address.into(),
        zone: format!("zone-{id}"),
        tls: false,
        started_ms: 0,
    };
    meta.put_json(&layout.node(id), &r);
}

fn put_version(
    meta: &MemoryMetaStore,
    layout: &Layout,
    version: u32,
    assignment: Vec<Vec<String>>,
) {
    put_version_compressed(meta, layout, version, assignment, Compression::None);
}

fn put_version_compressed(
    meta: &MemoryMetaStore,
    layout: &Layout,
    version: u32,
    assignment: Vec<Vec<String>>,
    compression: Compression,
) {
    put_version_laid_out(
        meta,
        layout,
        version,
        assignment,
        compression,
        rialto_protocol::meta::ValueFormat::SchemaIdPrefixed,
    );
}

fn put_version_laid_out(
    meta: &MemoryMetaStore,
    layout: &Layout,
    version: u32,
    assignment: Vec<Vec<String>>,
    compression: Compression,
    value_format: rialto_protocol::meta::ValueFormat,
) {
    let r = VersionRecord {
        store: STORE.into(),
        version,
        topic: format!("{STORE}_v{version}"),
        partition_count: assignment.len() as u32,
        assignment,
        status: VersionStatus::Online,
        created_ms: 0,
        storage: StorageProfile::OnDisk,
        compression,
        value_format,
        max_value_bytes: rialto_protocol::meta::DEFAULT_MAX_VALUE_BYTES,
        hybrid: None,
        moves: vec![],
        pushed_by: None,
        sealed: false,
        producer: None,
        failed_targets: Vec::new(),
    };
    meta.put_json(&layout.version(STORE, version), &r);
}

fn put_replica(
    meta: &MemoryMetaStore,
    layout: &Layout,
    version: u32,
    partition: u32,
    node: &str,
    state: ReplicaState,
) {
    let r = ReplicaRecord {
        state,
        offset: 0,
        records: 0,
        consumed_from: 0,
        updated_ms: 0,
        error: None,
        disk_bytes: 0,
        memory_bytes: 0,
        lag: None,
        leader: false,
        following: false,
    };
    meta.put_json(&layout.replica(STORE, version, partition, node), &r);
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn string(v: &str) -> Value {
    Value::String(v.into())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reads_fail_over_and_follow_a_version_swap() {
    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    let bad = start_server(Behavior {
        version: 1,
        values: values(1, 50),
        bad: true,
        ..Behavior::default()
    })
    .await;
    let good = start_server(Behavior {
        version: 1,
        values: values(1, 50),
        bad: false,
        ..Behavior::default()
    })
    .await;
    let next = start_server(Behavior {
        version: 2,
        values: values(2, 50),
        bad: false,
        ..Behavior::default()
    })
    .await;
    put_node(&meta, &layout, "a", &bad.address);
    put_node(&meta, &layout, "b", &good.address);
    put_node(&meta, &layout, "c", &next.address);
    put_version(
        &meta,
        &layout,
        1,
        vec![vec!["a".into(), "b".into()], vec!["a".into(), "b".into()]],
    );
    for p in 0..2 {
        put_replica(&meta, &layout, 1, p, "a", ReplicaState::Online);
        put_replica(&meta, &layout, 1, p, "b", ReplicaState::Online);
    }
    meta.put_json(&layout.store(STORE), &store_record(STORE, Some(1), None));
    // A store whose name extends ours must not leak into our routing.
    meta.put_json(&layout.store("ads2"), &store_record("ads2", Some(9), None));

    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    assert_eq!(client.current_version(), Some(1));

    // Single gets: every read succeeds even though replica `a` refuses every partition.
    for i in 0..10 {
        let v = client.get(&string(&format!("key-{i}"))).await.unwrap();
        assert_eq!(v, Some(string(&format!("v1-value-{i}"))));
    }
    assert_eq!(client.get(&string("absent")).await.unwrap(), None);
    let stats = client.stats();
    assert!(
        stats.retries >= 1,
        "rotation must have sent some gets to the bad replica first: {stats:?}"
    );
    assert!(bad.requests.load(Ordering::SeqCst) >= 1);
    let raw = client.get_raw(&key_bytes("key-3")).await.unwrap().unwrap();
    assert_eq!(raw.schema_id, 1);

    // Batch-get: order kept, duplicates and missing keys answered, failures retried elsewhere.
    let mut keys: Vec<Value> = (0..40).map(|i| string(&format!("key-{i}"))).collect();
    keys.push(string("absent"));
    keys.push(string("key-7"));
    for _ in 0..3 {
        let got = client.batch_get(&keys).await.unwrap();
        assert_eq!(got.len(), keys.len());
        for (i, v) in got.iter().enumerate().take(40) {
            assert_eq!(v, &Some(string(&format!("v1-value-{i}"))));
        }
        assert_eq!(got[40], None);
        assert_eq!(got[41], Some(string("v1-value-7")));
    }
    assert!(client.batch_get(&[]).await.unwrap().is_empty());
    let too_many = vec![key_bytes("k"); rialto_fast_client::BATCH_GET_KEYS_MAX + 1];
    assert!(matches!(
        client.batch_get_raw(&too_many).await,
        Err(ClientError::TooManyKeys { .. })
    ));

    // Version 2 becomes current while its replicas still bootstrap: keep reading version 1.
    put_version(&meta, &layout, 2, vec![vec!["c".into()], vec!["c".into()]]);
    put_replica(&meta, &layout, 2, 0, "c", ReplicaState::Online);
    put_replica(&meta, &layout, 2, 1, "c", ReplicaState::Bootstrap);
    meta.put_json(&layout.store(STORE), &store_record(STORE, Some(2), Some(1)));
    wait_until("the client to see version 2 pending", || {
        client.routing_table().pending_version == Some(2)
    })
    .await;
    assert_eq!(client.current_version(), Some(1));
    assert_eq!(
        client.get(&string("key-1")).await.unwrap(),
        Some(string("v1-value-1"))
    );

    // Every partition of version 2 ONLINE: the running client switches, no reconnect needed.
    put_replica(&meta, &layout, 2, 1, "c", ReplicaState::Online);
    wait_until("the client to route to version 2", || {
        client.current_version() == Some(2)
    })
    .await;
    assert_eq!(
        client.get(&string("key-1")).await.unwrap(),
        Some(string("v2-value-1"))
    );
    let got = client.batch_get(&keys[..5]).await.unwrap();
    assert_eq!(got[4], Some(string("v2-value-4")));
    assert!(client.stats().version_swaps >= 1);
    assert!(next.requests.load(Ordering::SeqCst) >= 2);

    // The only server of version 2 goes away: reads say no replica rather than hang.
    meta.remove(&layout.node("c"));
    wait_until("the client to drop node c", || {
        client
            .routing_table()
            .partitions
            .iter()
            .all(|p| p.is_empty())
    })
    .await;
    assert!(matches!(
        client.get(&string("key-1")).await,
        Err(ClientError::NoReplica { version: 2, .. })
    ));
}

#[tokio::test]
async fn batch_get_reports_keys_that_no_replica_could_answer() {
    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    let bad = start_server(Behavior {
        version: 1,
        values: values(1, 10),
        bad: true,
        ..Behavior::default()
    })
    .await;
    put_node(&meta, &layout, "a", &bad.address);
    put_version(&meta, &layout, 1, vec![vec!["a".into()], vec!["a".into()]]);
    put_replica(&meta, &layout, 1, 0, "a", ReplicaState::Online);
    put_replica(&meta, &layout, 1, 1, "a", ReplicaState::Online);
    meta.put_json(&layout.store(STORE), &store_record(STORE, Some(1), None));
    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    match client.batch_get(&[string("key-1"), string("key-2")]).await {
        Err(ClientError::Incomplete {
            failed_keys,
            first_error,
        }) => {
            assert_eq!(failed_keys, 2);
            assert!(
                first_error.contains("partition_not_served"),
                "{first_error}"
            );
        }
        other => panic!("expected Incomplete, got {other:?}"),
    }
    match client.get(&string("key-1")).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::PartitionNotServed),
        other => panic!("expected a server error, got {other:?}"),
    }
    assert!(client.stats().errors >= 2);
}

#[tokio::test]
async fn unreachable_replica_is_skipped() {
    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    let good = start_server(Behavior {
        version: 1,
        values: values(1, 10),
        bad: false,
        ..Behavior::default()
    })
    .await;
    // A port nothing listens on: bind, note the address, close.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    put_node(&meta, &layout, "dead", &dead);
    put_node(&meta, &layout, "b", &good.address);
    put_version(&meta, &layout, 1, vec![vec!["dead".into(), "b".into()]]);
    put_replica(&meta, &layout, 1, 0, "dead", ReplicaState::Online);
    put_replica(&meta, &layout, 1, 0, "b", ReplicaState::Online);
    let mut record = store_record(STORE, Some(1), None);
    record.partition_count = 1;
    meta.put_json(&layout.store(STORE), &record);
    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    for i in 0..4 {
        assert_eq!(
            client.get(&string(&format!("key-{i}"))).await.unwrap(),
            Some(string(&format!("v1-value-{i}")))
        );
    }
    let keys: Vec<Value> = (0..10).map(|i| string(&format!("key-{i}"))).collect();
    for _ in 0..2 {
        let got = client.batch_get(&keys).await.unwrap();
        assert_eq!(got[9], Some(string("v1-value-9")));
    }
    assert!(client.stats().connection_failures >= 1);
}

#[tokio::test]
async fn unknown_store_and_store_without_version() {
    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    meta.put_json(&layout.store("adsx"), &store_record("adsx", Some(1), None));
    let err = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::UnknownStore { .. }));
    assert!(
        err.to_string()
            .starts_with("store `ads` does not exist in cluster root /rialto"),
        "{err}"
    );

    meta.put_json(&layout.store(STORE), &store_record(STORE, None, None));
    let mut config = ClientConfig::new(STORE);
    config.routing_wait = Duration::from_millis(50);
    let client = Client::connect(config, meta.clone()).await.unwrap();
    assert_eq!(client.current_version(), None);
    let err = client.get(&string("k")).await.unwrap_err();
    assert!(matches!(err, ClientError::NoCurrentVersion { .. }), "{err}");
    assert!(err
        .to_string()
        .starts_with("store `ads` has no current version: the first push has not finished"));
    // A key that does not match the key schema is a schema error, not a network one.
    assert!(matches!(
        client.get(&Value::Long(5)).await,
        Err(ClientError::Schema(_))
    ));
}

#[tokio::test]
async fn reads_over_tls_verify_the_server_certificate() {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["storage.test".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    server_config.alpn_protocols = vec![b"h2".to_vec()];
    let server = start_server_with(
        Behavior {
            version: 1,
            values: values(1, 10),
            bad: false,
            ..Behavior::default()
        },
        Some(Arc::new(server_config)),
    )
    .await;

    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    let node = NodeRecord {
        node_id: "t".into(),
        address: server.address.clone(),
        zone: "z".into(),
        tls: true,
        started_ms: 0,
    };
    meta.put_json(&layout.node("t"), &node);
    put_version(&meta, &layout, 1, vec![vec!["t".into()]]);
    put_replica(&meta, &layout, 1, 0, "t", ReplicaState::Online);
    let mut record = store_record(STORE, Some(1), None);
    record.partition_count = 1;
    meta.put_json(&layout.store(STORE), &record);

    let tls = rialto_fast_client::ClientTls {
        ca_cert_pem: certified.cert.pem().into_bytes(),
        server_name: Some("storage.test".into()),
        identity: None,
    };
    let mut config = ClientConfig::new(STORE);
    config.tls = Some(tls.clone());
    let client = Client::connect(config, meta.clone()).await.unwrap();
    assert_eq!(
        client.get(&string("key-2")).await.unwrap(),
        Some(string("v1-value-2"))
    );
    let got = client
        .batch_get(&[string("key-1"), string("nope")])
        .await
        .unwrap();
    assert_eq!(got, vec![Some(string("v1-value-1")), None]);

    // A wrong expected name fails verification: the read reports the server unreachable.
    let mut config = ClientConfig::new(STORE);
    config.tls = Some(rialto_fast_client::ClientTls {
        server_name: Some("other.test".into()),
        identity: None,
        ..tls
    });
    let client = Client::connect(config, meta.clone()).await.unwrap();
    match client.get(&string("key-2")).await {
        Err(ClientError::Unreachable { detail, .. }) => {
            assert!(detail.contains("TLS handshake failed"), "{detail}")
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }

    // A plaintext client refuses a TLS server with a clear message.
    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    match client.get(&string("key-2")).await {
        Err(ClientError::Unreachable { detail, .. }) => {
            assert!(detail.contains("ClientConfig::tls"), "{detail}")
        }
        other => panic!("expected a TLS configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts TCP connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    put_node(&meta, &layout, "silent", &address);
    put_version(&meta, &layout, 1, vec![vec!["silent".into()]]);
    put_replica(&meta, &layout, 1, 0, "silent", ReplicaState::Online);
    let mut record = store_record(STORE, Some(1), None);
    record.partition_count = 1;
    meta.put_json(&layout.store(STORE), &record);
    let mut config = ClientConfig::new(STORE);
    config.request_timeout = Duration::from_millis(200);
    let client = Client::connect(config, meta.clone()).await.unwrap();
    let started = std::time::Instant::now();
    match client.get(&string("key-1")).await {
        Err(ClientError::Timeout { address: a, after }) => {
            assert_eq!(a, address);
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    match client.batch_get(&[string("key-1")]).await {
        Err(ClientError::Incomplete {
            failed_keys: 1,
            first_error,
        }) => {
            assert!(
                first_error.contains("did not finish within"),
                "{first_error}"
            )
        }
        other => panic!("expected an incomplete batch, got {other:?}"),
    }
    assert!(client.stats().timeouts >= 1);
    holder.abort();
}

/// Applications spawn reads on multi-threaded runtimes: every read future must be `Send`.
#[allow(dead_code)]
fn read_futures_are_send(client: &Client, key: &Value, keys: &[Value], raw: &[Vec<u8>]) {
    fn is_send<T: Send>(_: T) {}
    is_send(client.get(key));
    is_send(client.get_raw(b"k"));
    is_send(client.batch_get(keys));
    is_send(client.batch_get_raw(raw));
    is_send(Client::connect(
        ClientConfig::new(STORE),
        Arc::new(MemoryMetaStore::new()),
    ));
    fn is_sync<T: Send + Sync + Clone>() {}
    is_sync::<Client>();
}

// ---------------------------------------------------------------------------------------------
// Large-fanout read paths: long-tail retry, budget, late-retry dropping, streaming, group routing,
// least-loaded selection, health blocking and probing.

/// Fake servers `s0..s{n}` serving version 1 with `keys` keys, placed by `assignment` (node
/// indexes per partition, position = group), and a store record pointing at them.
async fn fleet(
    meta: &Arc<MemoryMetaStore>,
    servers: usize,
    assignment: &[Vec<usize>],
    keys: usize,
) -> Vec<(FakeServer, Behavior)> {
    let layout = Layout::new("/rialto");
    let data = values(1, keys);
    let mut fleet = Vec::new();
    for i in 0..servers {
        let behavior = Behavior {
            version: 1,
            values: data.clone(),
            ..Behavior::default()
        };
        let server = start_server(behavior.clone()).await;
        put_node(meta, &layout, &format!("s{i}"), &server.address);
        fleet.push((server, behavior));
    }
    let names: Vec<Vec<String>> = assignment
        .iter()
        .map(|nodes| nodes.iter().map(|n| format!("s{n}")).collect())
        .collect();
    put_version(meta, &layout, 1, names.clone());
    for (p, nodes) in names.iter().enumerate() {
        for node in nodes {
            put_replica(meta, &layout, 1, p as u32, node, ReplicaState::Online);
        }
    }
    let mut record = store_record(STORE, Some(1), None);
    record.partition_count = assignment.len() as u32;
    meta.put_json(&layout.store(STORE), &record);
    fleet
}

/// Long-tail settings with a fixed threshold, so tests do not depend on measured latency.
fn fixed_threshold(threshold: Duration) -> LongTailRetry {
    LongTailRetry {
        get_threshold: threshold,
        batch_thresholds: vec![(usize::MAX, threshold)],
        adaptive: false,
        ..LongTailRetry::default()
    }
}

fn key_set(count: usize) -> Vec<Value> {
    (0..count).map(|i| string(&format!("key-{i}"))).collect()
}

fn requests(server: &FakeServer) -> usize {
    server.requests.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_is_hedged_and_the_first_answer_wins() {
    let meta = Arc::new(MemoryMetaStore::new());
    let fleet = fleet(&meta, 2, &[vec![0, 1], vec![0, 1]], 50).await;
    fleet[0].1.delay_ms.store(400, Ordering::SeqCst);
    let mut config = ClientConfig::new(STORE);
    config.long_tail = fixed_threshold(Duration::from_millis(20));
    let client = Client::connect(config, meta.clone()).await.unwrap();
    let keys = key_set(40);
    for _ in 0..6 {
        let started = std::time::Instant::now();
        let values = client.batch_get(&keys).await.unwrap();
        assert!(values.iter().take(40).all(Option::is_some));
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        let started = std::time::Instant::now();
        assert!(client.get(&keys[0]).await.unwrap().is_some());
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
    let stats = client.stats();
    assert!(stats.long_tail_retries >= 1, "{stats:?}");
    assert!(stats.long_tail_retries_won >= 1, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    // A hedge is not a failure: the slow server was never blocked...
    assert_eq!(stats.instances_blocked, 0, "{stats:?}");
    // ...but once outpaced it is avoided: of 12 reads it saw at most the first two.
    assert!(requests(&fleet[0].0) <= 2, "{}", requests(&fleet[0].0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_hedges() {
    let meta = Arc::new(MemoryMetaStore::new());
    let fleet = fleet(&meta, 2, &[vec![0, 1]], 20).await;
    for (_, b) in &fleet {
        b.delay_ms.store(60, Ordering::SeqCst);
    }
    let mut config = ClientConfig::new(STORE);
    config.long_tail = LongTailRetry {
        budget_burst: 1.0,
        budget_ratio: 0.0,
        budget_floor_per_sec: 0.0,
        // Not about late timers: parallel tests must not make this one drop its retries.
        late_margin: Duration::from_secs(1),
        ..fixed_threshold(Duration::from_millis(10))
    };
    let client = Client::connect(config, meta.clone()).await.unwrap();
    for _ in 0..5 {
        client.batch_get(&key_set(10)).await.unwrap();
    }
    let stats = client.stats();
    assert_eq!(stats.long_tail_retries, 1, "{stats:?}");
    assert!(stats.long_tail_retries_over_budget >= 4, "{stats:?}");
}

/// On a single-threaded runtime, blocking the thread makes the hedge timer fire late: the client
/// is its own bottleneck, so the retry is dropped instead of adding load.
#[tokio::test(flavor = "current_thread")]
async fn a_late_retry_timer_drops_the_retry() {
    let meta = Arc::new(MemoryMetaStore::new());
    let fleet = fleet(&meta, 2, &[vec![0, 1]], 20).await;
    for (_, b) in &fleet {
        b.delay_ms.store(150, Ordering::SeqCst);
    }
    let mut config = ClientConfig::new(STORE);
    config.long_tail = LongTailRetry {
        late_margin: Duration::from_millis(5),
        ..fixed_threshold(Duration::from_millis(20))
    };
    let client = Client::connect(config, meta.clone()).await.unwrap();
    let hog = tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        std::thread::sleep(Duration::from_millis(100));
    });
    client.batch_get(&key_set(10)).await.unwrap();
    hog.await.unwrap();
    let stats = client.stats();
    assert_eq!(stats.long_tail_retries, 0, "{stats:?}");
    assert_eq!(stats.long_tail_retries_late, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_yields_records_before_the_slowest_server_and_reports_timeouts() {
    use futures::StreamExt;
    use rialto_fast_client::BatchEvent;
    let meta = Arc::new(MemoryMetaStore::new());
    // Two partitions, one replica each: nothing to hedge to.
    let fleet = fleet(&meta, 2, &[vec![0], vec![1]], 100).await;
    fleet[1].1.delay_ms.store(400, Ordering::SeqCst);
    let codec = key_codec();
    let keys: Vec<Vec<u8>> = key_set(100)
        .iter()
        .map(|k| codec.encode(k, "key").unwrap())
        .collect();
    let slow_partition = |k: &[u8]| rialto_protocol::partitioner::partition_for_key(k, 2) == 1;
    let slow_keys = keys.iter().filter(|k| slow_partition(k)).count();
    assert!(slow_keys > 10 && slow_keys < 90);

    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut stream = client.batch_get_stream_raw(&keys).unwrap();
    let mut first_record = None;
    let mut seen = vec![false; keys.len()];
    let mut done = None;
    while let Some(event) = stream.next().await {
        match event {
            BatchEvent::Record { index, key, value } => {
                first_record.get_or_insert(started.elapsed());
                assert_eq!(key, keys[index]);
                assert!(value.is_some());
                assert!(!std::mem::replace(&mut seen[index], true), "answered twice");
            }
            BatchEvent::Done(c) => done = Some((c, started.elapsed())),
        }
    }
    let (done, total) = done.expect("stream ends with Done");
    assert!(done.is_complete(), "{done:?}");
    assert!(seen.iter().all(|s| *s));
    let first_record = first_record.unwrap();
    assert!(
        first_record < Duration::from_millis(200),
        "{first_record:?}"
    );
    assert!(total >= Duration::from_millis(400), "{total:?}");
    assert_eq!(done.fanout, 2);

    // With a deadline shorter than the slow server: the fast partition's records, then a Done
    // listing exactly the slow partition's keys as timed out.
    let mut config = ClientConfig::new(STORE);
    config.request_timeout = Duration::from_millis(150);
    let client = Client::connect(config, meta.clone()).await.unwrap();
    let mut stream = client.batch_get_stream_raw(&keys).unwrap();
    let mut records = 0;
    let mut done = None;
    while let Some(event) = stream.next().await {
        match event {
            BatchEvent::Record { index, .. } => {
                assert!(!slow_partition(&keys[index]));
                records += 1;
            }
            BatchEvent::Done(c) => done = Some(c),
        }
    }
    let done = done.unwrap();
    assert!(done.timed_out);
    assert_eq!(records, keys.len() - slow_keys);
    assert_eq!(done.failed.len(), slow_keys);
    assert!(done.failed.iter().all(|f| slow_partition(&keys[f.index])));
    assert!(
        done.failed[0].error.contains("did not finish within"),
        "{}",
        done.failed[0].error
    );
    assert!(!done.is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_routing_serves_each_batch_from_one_group_and_falls_back_per_partition() {
    use futures::StreamExt;
    use rialto_fast_client::BatchEvent;
    let meta = Arc::new(MemoryMetaStore::new());
    // Group 0 = {s0, s1}, group 1 = {s2, s3}; each group holds every partition.
    let assignment = [vec![0, 2], vec![1, 3], vec![0, 2], vec![1, 3]];
    let fleet = fleet(&meta, 4, &assignment, 200).await;
    // No hedging: a hedged sub-request goes to the other group, and on a loaded machine one
    // sometimes did, touching all four servers in one call.
    let mut config = ClientConfig::new(STORE);
    config.long_tail = LongTailRetry::disabled();
    let client = Client::connect(config, meta.clone()).await.unwrap();
    let codec = key_codec();
    let keys: Vec<Vec<u8>> = key_set(200)
        .iter()
        .map(|k| codec.encode(k, "key").unwrap())
        .collect();
    let run = |client: Client, keys: Vec<Vec<u8>>| async move {
        let mut stream = client.batch_get_stream_raw(&keys).unwrap();
        let mut done = None;
        while let Some(event) = stream.next().await {
            if let BatchEvent::Done(c) = event {
                done = Some(c);
            }
        }
        done.unwrap()
    };
    for _ in 0..10 {
        let before: Vec<usize> = fleet.iter().map(|(s, _)| requests(s)).collect();
        let done = run(client.clone(), keys.clone()).await;
        assert!(done.is_complete(), "{done:?}");
        assert_eq!(done.fanout, 2);
        let touched: Vec<usize> = fleet
            .iter()
            .enumerate()
            .filter(|(i, (s, _))| requests(s) > before[*i])
            .map(|(i, _)| i)
            .collect();
        assert!(touched == [0, 1] || touched == [2, 3], "{touched:?}");
    }
    // Both groups took load.
    assert!(requests(&fleet[0].0) > 0 && requests(&fleet[2].0) > 0);
    assert_eq!(client.stats().fanout_max, 2);

    // s0 starts failing: its keys are retried at once elsewhere (no failed call); after a few
    // errors it is blocked and group 0's calls read its partitions from s2 instead.
    fleet[0].1.failing.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        let done = run(client.clone(), keys.clone()).await;
        assert!(done.is_complete(), "{done:?}");
    }
    let stats = client.stats();
    assert_eq!(stats.instances_blocked, 1, "{stats:?}");
    let retries_before = stats.retries;
    let before = requests(&fleet[0].0);
    for _ in 0..6 {
        let done = run(client.clone(), keys.clone()).await;
        assert!(done.is_complete(), "{done:?}");
        assert!(done.fanout <= 3);
    }
    assert_eq!(
        client.stats().retries,
        retries_before,
        "blocked server still tried"
    );
    // Health probes (GET /health) are the only traffic s0 sees while blocked.
    let probes = requests(&fleet[0].0) - before;
    assert!(probes <= 12, "{probes}");

    // s0 recovers: a probe unblocks it and it serves again.
    fleet[0].1.failing.store(false, Ordering::SeqCst);
    wait_until("s0 unblocked", || client.stats().instances_blocked_now == 0).await;
    let before = requests(&fleet[0].0);
    for _ in 0..10 {
        assert!(run(client.clone(), keys.clone()).await.is_complete());
    }
    assert!(requests(&fleet[0].0) > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_group_routing_fanout_grows_with_replicas() {
    let meta = Arc::new(MemoryMetaStore::new());
    // Per-partition least-loaded choice spreads partitions over all replicas.
    let assignment = [vec![0, 2], vec![1, 3], vec![2, 0], vec![3, 1]];
    let _fleet = fleet(&meta, 4, &assignment, 200).await;
    let mut config = ClientConfig::new(STORE);
    config.group_routing = false;
    let client = Client::connect(config, meta.clone()).await.unwrap();
    for _ in 0..10 {
        client.batch_get(&key_set(200)).await.unwrap();
    }
    assert!(client.stats().fanout_max > 2, "{:?}", client.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_share_goes_out_as_sub_requests_of_at_most_the_key_limit() {
    let meta = Arc::new(MemoryMetaStore::new());
    // One server holds both partitions: every key of a batch-get goes to it.
    let fleet = fleet(&meta, 1, &[vec![0], vec![0]], 100).await;
    let keys = key_set(100);
    for (keys_max, expected) in [(30, 4), (usize::MAX, 1), (100, 1), (99, 2)] {
        let mut config = ClientConfig::new(STORE);
        config.sub_request_keys_max = keys_max;
        config.long_tail = LongTailRetry::disabled();
        let client = Client::connect(config, meta.clone()).await.unwrap();
        let before = requests(&fleet[0].0);
        let values = client.batch_get(&keys).await.unwrap();
        assert_eq!(requests(&fleet[0].0) - before, expected, "limit {keys_max}");
        assert!(values.iter().all(Option::is_some), "limit {keys_max}");
        let stats = client.stats();
        assert_eq!((stats.batch_gets, stats.fanout_max), (1, 1), "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_gets_receive_into_recycled_blocks() {
    let meta = Arc::new(MemoryMetaStore::new());
    let _fleet = fleet(&meta, 1, &[vec![0], vec![0]], 100).await;
    let keys = key_set(100);
    for (pool_bytes, reuses) in [(rialto_fast_client::RECEIVE_POOL_BYTES, true), (0, false)] {
        let mut config = ClientConfig::new(STORE);
        config.receive_pool_bytes = pool_bytes;
        let client = Client::connect(config, meta.clone()).await.unwrap();
        for _ in 0..5 {
            let values = client.batch_get(&keys).await.unwrap();
            assert!(values.iter().all(Option::is_some));
        }
        // `batch_get` decodes the values and drops the raw bytes: every block is free again.
        let stats = client.stats();
        let blocks = stats.receive_blocks_reused + stats.receive_blocks_allocated;
        assert!(blocks >= 5, "{stats:?}");
        if reuses {
            assert!(stats.receive_blocks_reused >= 4, "{stats:?}");
            assert!(stats.receive_pool_free_bytes > 0, "{stats:?}");
        } else {
            assert_eq!(
                (stats.receive_blocks_reused, stats.receive_pool_free_bytes),
                (0, 0),
                "{stats:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_selection_starves_a_slow_replica_until_it_recovers() {
    let meta = Arc::new(MemoryMetaStore::new());
    let fleet = fleet(&meta, 2, &[vec![0, 1]], 20).await;
    fleet[0].1.delay_ms.store(200, Ordering::SeqCst);
    let mut config = ClientConfig::new(STORE);
    config.long_tail = LongTailRetry::disabled();
    // Each get its own request: this is about choosing the replica of one.
    config.coalesce_gets = false;
    let client = Client::connect(config, meta.clone()).await.unwrap();
    let key = string("key-1");
    let round = |client: Client, key: Value| async move {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        client.get(&key).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    };
    round(client.clone(), key.clone()).await;
    let (slow, fast) = (requests(&fleet[0].0), requests(&fleet[1].0));
    // An even split would be 100/100. The slow server gets a request each time its pending
    // count drops to the fast one's, which on a loaded machine (fast requests slowed too) was
    // up to 37 of 200: 3x separates starving from sharing without depending on the load.
    assert!(slow * 3 < fast, "slow {slow}, fast {fast}");
    // Recovered: nothing holds it back. One get at a time, both servers have nothing pending at
    // each choice and the tie rotates, so they share evenly. (Eight callers at once on a loaded
    // machine split 40/160 twice: scheduling, not selection.)
    fleet[0].1.delay_ms.store(0, Ordering::SeqCst);
    for _ in 0..20 {
        client.get(&key).await.unwrap();
    }
    let (slow2, fast2) = (requests(&fleet[0].0) - slow, requests(&fleet[1].0) - fast);
    assert_eq!(slow2 + fast2, 20);
    assert!(slow2.abs_diff(fast2) <= 2, "slow {slow2}, fast {fast2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_stream_yields_decoded_keys_and_values_like_batch_get() {
    use futures::StreamExt;
    use rialto_fast_client::ValueEvent;
    let meta = Arc::new(MemoryMetaStore::new());
    let _fleet = fleet(&meta, 2, &[vec![0, 1], vec![1, 0]], 30).await;
    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    // 30 stored keys and 5 absent ones.
    let keys = key_set(35);
    let expected = client.batch_get(&keys).await.unwrap();
    assert_eq!(expected.iter().filter(|v| v.is_some()).count(), 30);
    let mut got = vec![None; keys.len()];
    let mut done = None;
    let mut stream = client.batch_get_stream(&keys).unwrap();
    while let Some(event) = stream.next().await {
        match event {
            ValueEvent::Record { index, key, value } => {
                assert_eq!(key, keys[index]);
                got[index] = Some(value);
            }
            ValueEvent::Done(c) => done = Some(c),
        }
    }
    let done = done.unwrap();
    assert!(done.is_complete(), "{done:?}");
    assert_eq!(done.keys_answered, 35);
    let got: Vec<Option<Value>> = got.into_iter().map(|v| v.unwrap()).collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_warmed_before_a_server_takes_traffic() {
    let meta = Arc::new(MemoryMetaStore::new());
    let layout = Layout::new("/rialto");
    let fleet = fleet(&meta, 2, &[vec![0], vec![1]], 20).await;
    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    // Connected to both servers before the first read.
    assert_eq!(client.stats().connections_opened, 2);
    assert_eq!(client.stats().requests, 0);

    // A third server starts hosting partition 0: by the time the routing table names it, its
    // connection is open.
    let third = start_server(fleet[0].1.clone()).await;
    put_node(&meta, &layout, "s2", &third.address);
    put_replica(&meta, &layout, 1, 0, "s2", ReplicaState::Online);
    wait_until("the new server is routed", || {
        client.routing_table().partitions[0]
            .iter()
            .any(|r| r.address == third.address)
    })
    .await;
    assert_eq!(client.stats().connections_opened, 3);
    assert_eq!(requests(&third), 0, "no request before it was routed");
}

#[tokio::test]
async fn compressed_versions_are_decompressed_and_wait_for_their_dictionary() {
    use rialto_protocol::codec::{train_dictionary, ValueCompressor};
    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    // Version 2's values, compressed with a dictionary trained on them.
    let plain = values(2, 300);
    let samples: Vec<Vec<u8>> = plain.values().map(|v| v[4..].to_vec()).collect();
    let dictionary = train_dictionary(&samples, 4096).unwrap();
    let mut compressor = ValueCompressor::new(3, Some(&dictionary)).unwrap();
    let mut compressed: HashMap<Vec<u8>, Vec<u8>> = plain
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                StoredValue::encode(1, &compressor.compress(&v[4..]).unwrap()),
            )
        })
        .collect();
    // One value the dictionary cannot decode: a per-key error, not a panic.
    compressed.insert(
        key_bytes("garbage"),
        StoredValue::encode(1, b"not a zstd frame"),
    );
    let old = start_server(Behavior {
        version: 1,
        values: values(1, 300),
        ..Behavior::default()
    })
    .await;
    let served_dictionary = Arc::new(Mutex::new(None));
    let new = start_server(Behavior {
        version: 2,
        values: Arc::new(compressed),
        dictionary: served_dictionary.clone(),
        ..Behavior::default()
    })
    .await;
    put_node(&meta, &layout, "a", &old.address);
    put_node(&meta, &layout, "b", &new.address);
    put_version(&meta, &layout, 1, vec![vec!["a".into()], vec!["a".into()]]);
    for p in 0..2 {
        put_replica(&meta, &layout, 1, p, "a", ReplicaState::Online);
    }
    meta.put_json(&layout.store(STORE), &store_record(STORE, Some(1), None));
    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();
    assert_eq!(client.current_version(), Some(1));

    // Version 2 goes live, but its server does not serve the dictionary yet: stay on version 1.
    put_version_compressed(
        &meta,
        &layout,
        2,
        vec![vec!["b".into()], vec!["b".into()]],
        Compression::ZstdDictionary,
    );
    for p in 0..2 {
        put_replica(&meta, &layout, 2, p, "b", ReplicaState::Online);
    }
    meta.put_json(&layout.store(STORE), &store_record(STORE, Some(2), Some(1)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.current_version(),
        Some(1),
        "no dictionary, no switch"
    );
    assert_eq!(
        client.get(&string("key-5")).await.unwrap(),
        Some(string("v1-value-5"))
    );

    // The dictionary becomes available; the next metadata change switches the client.
    *served_dictionary.lock().unwrap() = Some(dictionary.clone());
    put_replica(&meta, &layout, 2, 0, "b", ReplicaState::Online);
    wait_until("the client to route to version 2", || {
        client.current_version() == Some(2)
    })
    .await;
    for i in [0, 7, 299] {
        assert_eq!(
            client.get(&string(&format!("key-{i}"))).await.unwrap(),
            Some(string(&format!("v2-value-{i}")))
        );
    }
    let keys: Vec<Value> = (0..300).map(|i| string(&format!("key-{i}"))).collect();
    let got = client.batch_get(&keys).await.unwrap();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v, &Some(string(&format!("v2-value-{i}"))));
    }
    let bad = client.get(&string("garbage")).await.unwrap_err();
    assert!(
        matches!(bad, ClientError::Decompression { version: 2, .. }),
        "{bad}"
    );
    let err = client
        .batch_get(&[string("key-1"), string("garbage")])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("could not be decompressed"),
        "{err}"
    );
}

/// A checksummed stored value: `schema_id ‖ checksum ‖ datum`.
fn checksummed(datum: &[u8]) -> Vec<u8> {
    let mut body = rialto_protocol::stored::value_checksum(1, datum)
        .to_be_bytes()
        .to_vec();
    body.extend_from_slice(datum);
    StoredValue::encode(1, &body)
}

#[tokio::test]
async fn a_value_that_fails_its_checksum_is_retried_elsewhere_and_never_returned() {
    let layout = Layout::new("/rialto");
    let meta = Arc::new(MemoryMetaStore::new());
    let codec = AvroCodec::parse(r#""string""#).unwrap();
    let good: HashMap<Vec<u8>, Vec<u8>> = (0..100)
        .map(|i| {
            let datum = codec
                .encode(&string(&format!("value-{i}")), "value")
                .unwrap();
            (key_bytes(&format!("key-{i}")), checksummed(&datum))
        })
        .collect();
    // Server a's copy of key-5 was altered after the push (one bit of its datum flipped), and
    // its key-6 is a chunk manifest that leaked out unassembled.
    let mut damaged = good.clone();
    let altered = damaged.get_mut(&key_bytes("key-5")).unwrap();
    let last = altered.len() - 1;
    altered[last] ^= 0x01;
    damaged.insert(
        key_bytes("key-6"),
        StoredValue::encode(rialto_protocol::stored::MANIFEST_SCHEMA_ID, b"manifest"),
    );
    let a = start_server(Behavior {
        version: 1,
        values: Arc::new(damaged),
        ..Behavior::default()
    })
    .await;
    let b = start_server(Behavior {
        version: 1,
        values: Arc::new(good),
        ..Behavior::default()
    })
    .await;
    put_node(&meta, &layout, "a", &a.address);
    put_node(&meta, &layout, "b", &b.address);
    let both = || vec![vec!["a".to_string(), "b".to_string()]; 2];
    put_version_laid_out(
        &meta,
        &layout,
        1,
        both(),
        Compression::None,
        rialto_protocol::meta::ValueFormat::Checksummed,
    );
    for p in 0..2 {
        put_replica(&meta, &layout, 1, p, "a", ReplicaState::Online);
        put_replica(&meta, &layout, 1, p, "b", ReplicaState::Online);
    }
    meta.put_json(&layout.store(STORE), &store_record(STORE, Some(1), None));
    let client = Client::connect(ClientConfig::new(STORE), meta.clone())
        .await
        .unwrap();

    // Whichever replica each read goes to first, the damaged value is never returned.
    let keys: Vec<Value> = (0..100).map(|i| string(&format!("key-{i}"))).collect();
    for _ in 0..10 {
        let got = client.batch_get(&keys).await.unwrap();
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v, &Some(string(&format!("value-{i}"))));
        }
        for k in ["key-5", "key-6"] {
            assert_eq!(
                client.get(&string(k)).await.unwrap(),
                Some(string(&format!("value-{}", &k[4..])))
            );
        }
    }
    let stats = client.stats();
    assert!(stats.checksum_mismatches > 0, "{stats:?}");
    assert!(stats.checksums_verified >= 1000, "{stats:?}");

    // With only the damaged replica left, the read fails naming key, server and version.
    put_replica(&meta, &layout, 1, 0, "b", ReplicaState::Offline);
    put_replica(&meta, &layout, 1, 1, "b", ReplicaState::Offline);
    wait_until("the client to drop server b", || {
        client
            .routing_table()
            .partitions
            .iter()
            .all(|p| p.len() == 1)
    })
    .await;
    let err = client.get(&string("key-5")).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, ClientError::Checksum { version: 1, .. }),
        "{err}"
    );
    assert!(
        message.contains("\"key-5\"")
            && message.contains(&a.address)
            && message.contains("fails its checksum"),
        "{message}"
    );
    let err = client.batch_get(&keys).await.unwrap_err();
    assert!(
        err.to_string().contains("fails its checksum")
            || err.to_string().contains("reserved schema id"),
        "{err}"
    );
    let leaked = client.get(&string("key-6")).await.unwrap_err();
    assert!(
        leaked.to_string().contains("reserved schema id"),
        "{leaked}"
    );

    // Verification can be turned off (the value then comes back as read).
    let mut config = ClientConfig::new(STORE);
    config.verify_checksums = false;
    let unverified = Client::connect(config, meta.clone()).await.unwrap();
    assert!(unverified.get(&string("key-5")).await.is_ok());
    assert_eq!(unverified.stats().checksums_verified, 0);
}

/// `callers` gets at once of `key-0..key-{callers}`, each with its index.
async fn concurrent_gets(
    client: &Client,
    callers: usize,
) -> Vec<(usize, Result<Option<Value>, ClientError>)> {
    let reads = (0..callers).map(|i| {
        let client = client.clone();
        async move { (i, client.get(&string(&format!("key-{i}"))).await) }
    });
    futures::future::join_all(reads).await
}

#[tokio::test(flavor = "current_thread")]
async fn gets_started_while_others_are_in_flight_share_batch_gets() {
    let meta = Arc::new(MemoryMetaStore::new());
    let assignment = [vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 2, 1]];
    let fleet = fleet(&meta, 3, &assignment, 100).await;
    let mut lone = ClientConfig::new(STORE);
    lone.coalesce_gets = false;
    for coalesce in [true, false] {
        let config = if coalesce {
            ClientConfig::new(STORE)
        } else {
            lone.clone()
        };
        let client = Client::connect(config, meta.clone()).await.unwrap();
        let before: usize = fleet.iter().map(|(s, _)| requests(s)).sum();
        // 120 callers at once: 100 stored keys, 20 the store has no value for.
        for (i, result) in concurrent_gets(&client, 120).await {
            let expected = (i < 100).then(|| string(&format!("v1-value-{i}")));
            assert_eq!(result.unwrap(), expected, "key-{i}, coalesce {coalesce}");
        }
        let sent = fleet.iter().map(|(s, _)| requests(s)).sum::<usize>() - before;
        let stats = client.stats();
        assert_eq!(stats.keys_requested, 120, "{stats:?}");
        assert_eq!(stats.errors, 0, "{stats:?}");
        if coalesce {
            // The first get went out alone at once; the 119 started while it was in flight
            // went together: one request to each server of one group.
            assert_eq!(stats.gets_coalesced, 119, "{stats:?}");
            assert_eq!(stats.batch_gets, 1, "{stats:?}");
            assert!(sent <= 4, "{sent} requests for 120 gets");
        } else {
            assert_eq!(stats.gets_coalesced, 0, "{stats:?}");
            assert_eq!(sent, 120, "{sent} requests for 120 gets");
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_coalesced_get_ends_as_a_lone_get_would() {
    let meta = Arc::new(MemoryMetaStore::new());
    let fleet = fleet(&meta, 2, &[vec![0, 1], vec![1, 0]], 20).await;
    let mut config = ClientConfig::new(STORE);
    config.request_timeout = Duration::from_millis(300);
    config.long_tail = LongTailRetry::disabled();
    // Failing servers stay in use, so a lone get and a coalesced one meet the same servers.
    config.health.errors_to_block = u32::MAX;
    let client = Client::connect(config, meta.clone()).await.unwrap();

    // Every server fails: the shared batch-get answers nothing, so each key is read again alone
    // and fails with a lone get's error, not a batch-get's `Incomplete`.
    for (_, b) in &fleet {
        b.failing.store(true, Ordering::SeqCst);
    }
    let lone = client.get(&string("key-0")).await.unwrap_err();
    assert!(
        matches!(
            lone,
            ClientError::Server {
                code: ErrorCode::Internal,
                ..
            }
        ),
        "{lone:?}"
    );
    for (i, result) in concurrent_gets(&client, 10).await {
        let e = result.unwrap_err();
        assert_eq!(
            std::mem::discriminant(&e),
            std::mem::discriminant(&lone),
            "key-{i}: {e:?}"
        );
    }
    assert_eq!(client.stats().gets_coalesced, 9);

    // Every server is slower than the timeout: the batch-get times out, and so does each get,
    // without a second timeout spent reading it alone.
    for (_, b) in &fleet {
        b.failing.store(false, Ordering::SeqCst);
        b.delay_ms.store(5_000, Ordering::SeqCst);
    }
    let started = std::time::Instant::now();
    for (i, result) in concurrent_gets(&client, 10).await {
        let e = result.unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "key-{i}: {e:?}");
    }
    let elapsed = started.elapsed();
    // Read again alone after the batch timed out, they would have taken two timeouts.
    assert!(elapsed < Duration::from_millis(600), "{elapsed:?}");
    assert_eq!(client.stats().gets_coalesced, 18);
}

#[tokio::test(flavor = "current_thread")]
async fn a_get_dropped_while_leading_its_batch_strands_no_other_get() {
    let meta = Arc::new(MemoryMetaStore::new());
    let fleet = fleet(&meta, 2, &[vec![0, 1], vec![1, 0]], 20).await;
    let mut config = ClientConfig::new(STORE);
    config.long_tail = LongTailRetry::disabled();
    let client = Client::connect(config, meta.clone()).await.unwrap();

    // A slow get in flight, so the gets below are coalesced.
    for (_, b) in &fleet {
        b.delay_ms.store(300, Ordering::SeqCst);
    }
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.get(&string("key-0")).await }
    });
    while fleet.iter().map(|(s, _)| requests(s)).sum::<usize>() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for (_, b) in &fleet {
        b.delay_ms.store(0, Ordering::SeqCst);
    }
    // The first get queued leads the next batch; its caller gives up on it while it waits
    // for other callers to queue.
    assert!(client.get(&string("key-1")).now_or_never().is_none());
    // The next gets queue behind no one: they lead their own batch and are answered.
    let (key2, key3) = (string("key-2"), string("key-3"));
    let next = futures::future::join(client.get(&key2), client.get(&key3));
    let (a, b) = tokio::time::timeout(Duration::from_secs(2), next)
        .await
        .expect("gets queued after a dropped leader are answered");
    assert_eq!(a.unwrap(), Some(string("v1-value-2")));
    assert_eq!(b.unwrap(), Some(string("v1-value-3")));
    assert_eq!(client.stats().gets_coalesced, 2, "{:?}", client.stats());
    assert_eq!(slow.await.unwrap().unwrap(), Some(string("v1-value-0")));
}
