//! The controller in-process over the in-memory metadata store and pub-sub: admin API, placement
//! on start push, version swap, retirement, failure, and leader election.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rialto_backends::faults::{Faults, FaultyPubSub};
use rialto_backends::memory::{MemoryMetaStore, MemoryPubSub};
use rialto_backends::{MetaStore, PubSub};
use rialto_controller::{start, AdminClient, ControllerConfig, ControllerError, RunningController};
use rialto_protocol::admin::{CreateStoreRequest, StartPushRequest};
use rialto_protocol::meta::{
    Layout, NodeRecord, ReplicaRecord, ReplicaState, StorageProfile, VersionRecord, VersionStatus,
    DEFAULT_ROOT,
};

/// Longest a test waits for the reconciler.
const WAIT: Duration = Duration::from_secs(10);

async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Fixture {
    meta: MemoryMetaStore,
    pubsub: MemoryPubSub,
    /// Switches of the wrapper the controller reaches `pubsub` through.
    faults: Arc<Faults>,
    controller: RunningController,
    client: AdminClient,
    layout: Layout,
}

async fn controller(
    id: &str,
    meta: &MemoryMetaStore,
    pubsub: Arc<dyn PubSub>,
) -> RunningController {
    let config = ControllerConfig {
        controller_id: id.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        kafka_bootstrap: "kafka:9092".into(),
        ..ControllerConfig::default()
    };
    start(config, Arc::new(meta.clone()), pubsub).await.unwrap()
}

async fn fixture() -> Fixture {
    let meta = MemoryMetaStore::new();
    let pubsub = MemoryPubSub::new();
    let faults = Faults::new();
    let faulty = FaultyPubSub::new(Arc::new(pubsub.clone()), faults.clone());
    let controller = controller("c1", &meta, Arc::new(faulty)).await;
    let client = AdminClient::new(controller.url());
    let c = &controller;
    wait_until("leadership", || async { c.is_leader() }).await;
    Fixture {
        meta,
        pubsub,
        faults,
        controller,
        client,
        layout: Layout::new(DEFAULT_ROOT),
    }
}

fn create_req(name: &str) -> CreateStoreRequest {
    CreateStoreRequest {
        name: name.into(),
        owner: "team".into(),
        key_schema: r#""string""#.into(),
        value_schema: r#"{"type":"record","name":"V","fields":[{"name":"x","type":"long"}]}"#
            .into(),
        partition_count: 2,
        replication_factor: 2,
        storage: StorageProfile::InMemory,
        compression: rialto_protocol::meta::Compression::ZstdDictionary,
        max_value_bytes: None,
        hybrid: None,
        read_quota_keys_per_s: None,
        storage_quota_bytes: None,
        versions_to_keep: None,
    }
}

async fn add_node(f: &Fixture, id: &str, zone: &str) {
    let n = NodeRecord {
        node_id: id.into(),
        address: format!("{id}:7000"),
        zone: zone.into(),
        tls: false,
        started_ms: 0,
    };
    f.meta
        .put(&f.layout.node(id), serde_json::to_vec(&n).unwrap(), None)
        .await
        .unwrap();
}

async fn set_replicas(f: &Fixture, store: &str, version: u32, state: ReplicaState) {
    let v = f.client.describe_version(store, version).await.unwrap();
    for (p, node) in v.record.replicas() {
        let r = ReplicaRecord {
            state,
            offset: 7,
            records: 3,
            consumed_from: 0,
            updated_ms: 0,
            error: None,
            disk_bytes: 0,
            memory_bytes: 0,
            lag: None,
            leader: false,
            following: false,
        };
        f.meta
            .put(
                &f.layout.replica(store, version, p, node),
                serde_json::to_vec(&r).unwrap(),
                None,
            )
            .await
            .unwrap();
    }
}

async fn version_record(f: &Fixture, store: &str, version: u32) -> Option<VersionRecord> {
    let kv = f
        .meta
        .get(&f.layout.version(store, version))
        .await
        .unwrap()?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

fn api_status(e: &ControllerError) -> (u16, &str) {
    match e {
        ControllerError::Api { status, kind, .. } => (*status, kind.as_str()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn push_and_go_live(f: &Fixture, store: &str) -> u32 {
    let resp = f
        .client
        .start_push(
            store,
            &StartPushRequest {
                push_id: "test".into(),
                ..StartPushRequest::default()
            },
        )
        .await
        .unwrap();
    f.client.push_written(store, resp.version).await.unwrap();
    set_replicas(f, store, resp.version, ReplicaState::Online).await;
    let v = resp.version;
    wait_until("swap", || async {
        f.client
            .describe_store(store)
            .await
            .unwrap()
            .store
            .current_version
            == Some(v)
    })
    .await;
    v
}

#[tokio::test]
async fn create_store_validates_and_refuses_duplicates() {
    let f = fixture().await;
    let s = f.client.create_store(&create_req("ads")).await.unwrap();
    assert_eq!(s.name, "ads");
    assert_eq!(s.value_schemas.len(), 1);
    assert_eq!(s.value_schemas[0].id, 1);
    assert_eq!(s.current_version, None);

    let dup = f.client.create_store(&create_req("ads")).await.unwrap_err();
    assert_eq!(api_status(&dup), (409, "conflict"));

    let mut bad = create_req("bad");
    bad.value_schema = r#"{"type":"record"}"#.into();
    let e = f.client.create_store(&bad).await.unwrap_err();
    assert_eq!(api_status(&e), (400, "bad_request"));
    assert!(e.to_string().contains("value schema"), "{e}");

    let mut bad = create_req("bad");
    bad.key_schema = "nope".into();
    let e = f.client.create_store(&bad).await.unwrap_err();
    assert!(e.to_string().contains("key schema"), "{e}");

    for (pc, rf) in [(0, 1), (5000, 1), (1, 0), (1, 17)] {
        let mut bad = create_req("bad");
        bad.partition_count = pc;
        bad.replication_factor = rf;
        let e = f.client.create_store(&bad).await.unwrap_err();
        assert_eq!(api_status(&e), (400, "bad_request"), "{pc} {rf}");
    }
    let e = f.client.create_store(&create_req("a/b")).await.unwrap_err();
    assert_eq!(api_status(&e), (400, "bad_request"));

    let stores = f.client.list_stores().await.unwrap();
    assert_eq!(
        stores.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        vec!["ads"]
    );

    let e = f.client.describe_store("nope").await.unwrap_err();
    assert_eq!(api_status(&e), (404, "not_found"));
    assert!(
        e.to_string()
            .contains("store `nope` does not exist; create it with `rialto-admin stores create`"),
        "{e}"
    );
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn start_push_needs_enough_live_nodes() {
    let f = fixture().await;
    f.client.create_store(&create_req("ads")).await.unwrap();
    add_node(&f, "n1", "a").await;
    let e = f
        .client
        .start_push("ads", &StartPushRequest::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (503, "unavailable"));
    assert!(
        e.to_string()
            .contains("need 2 live storage nodes for replication factor 2, 1 registered"),
        "{e}"
    );
    // Nothing was allocated.
    let d = f.client.describe_store("ads").await.unwrap();
    assert_eq!(d.store.largest_version, 0);
    assert!(d.versions.is_empty());
    let e = f
        .client
        .start_push("nope", &StartPushRequest::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (404, "not_found"));
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn start_push_allocates_a_version_with_placement_and_topic() {
    let f = fixture().await;
    f.client.create_store(&create_req("ads")).await.unwrap();
    add_node(&f, "n1", "a").await;
    add_node(&f, "n2", "b").await;
    add_node(&f, "n3", "c").await;
    let r = f
        .client
        .start_push("ads", &StartPushRequest::default())
        .await
        .unwrap();
    assert_eq!(r.version, 1);
    assert_eq!(r.topic, "ads_v1");
    assert_eq!(r.partition_count, 2);
    assert_eq!(r.kafka_bootstrap, "kafka:9092");
    assert_eq!(r.value_schema_id, 1);
    assert!(f.pubsub.has_topic("ads_v1"));
    let v = f.client.describe_version("ads", 1).await.unwrap();
    assert_eq!(v.record.status, VersionStatus::Pushing);
    assert_eq!(v.record.storage, StorageProfile::InMemory);
    assert_eq!(
        v.record.compression,
        rialto_protocol::meta::Compression::ZstdDictionary
    );
    assert_eq!(v.record.assignment.len(), 2);
    for nodes in &v.record.assignment {
        assert_eq!(nodes.len(), 2);
        assert_ne!(nodes[0], nodes[1]);
    }
    assert_eq!(v.replicas.len(), 4);
    assert!(v.replicas.iter().all(|r| r.state == ReplicaState::Offline));
    assert!(!v.current);

    let v = f.client.push_written("ads", 1).await.unwrap();
    assert_eq!(v.record.status, VersionStatus::PushWritten);
    // Idempotent.
    f.client.push_written("ads", 1).await.unwrap();

    let r2 = f
        .client
        .start_push("ads", &StartPushRequest::default())
        .await
        .unwrap();
    assert_eq!(r2.version, 2);
    assert_eq!(v.record.producer, None, "a push that named no producer");
    let e = f.client.describe_version("ads", 99).await.unwrap_err();
    assert_eq!(api_status(&e), (404, "not_found"));

    // A push names the producer it writes as; the version record keeps it, in lowercase.
    let r3 = f
        .client
        .start_push(
            "ads",
            &StartPushRequest {
                producer: Some("00112233445566778899AABBCCDDEEFF".into()),
                ..StartPushRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        version_record(&f, "ads", r3.version)
            .await
            .unwrap()
            .producer
            .as_deref(),
        Some("00112233445566778899aabbccddeeff")
    );
    // It is registered for the version with a fresh secret, given to the push alone.
    assert!(r2.signing_secret.is_none(), "nothing to sign for");
    let secret = r3.signing_secret.clone().expect("a signing secret");
    assert!(!format!("{r3:?}").contains(&secret.0), "Debug hides it");
    let registration = f
        .meta
        .get(
            &f.layout
                .version_copier("ads", r3.version, "00112233445566778899aabbccddeeff"),
        )
        .await
        .unwrap()
        .expect("the push's registration");
    let registration: rialto_protocol::meta::RealtimeWriterRecord =
        serde_json::from_slice(&registration.value).unwrap();
    assert_eq!(registration.secret, secret.0);
    assert_eq!(registration.secret.len(), 64);
    let e = f
        .client
        .start_push(
            "ads",
            &StartPushRequest {
                producer: Some("not-a-guid".into()),
                ..StartPushRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (400, "bad_request"), "{e}");
    assert!(e.to_string().contains("not a producer GUID"), "{e}");
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn versions_swap_then_retire() {
    let f = fixture().await;
    f.client.create_store(&create_req("ads")).await.unwrap();
    add_node(&f, "n1", "a").await;
    add_node(&f, "n2", "b").await;

    assert_eq!(push_and_go_live(&f, "ads").await, 1);
    let d = f.client.describe_store("ads").await.unwrap();
    assert_eq!(
        (d.store.current_version, d.store.backup_version),
        (Some(1), None)
    );
    wait_until("v1 online", || async {
        version_record(&f, "ads", 1).await.unwrap().status == VersionStatus::Online
    })
    .await;
    let d = f.client.describe_store("ads").await.unwrap();
    assert!(d.versions[0].current);
    assert!(d.versions[0]
        .replicas
        .iter()
        .all(|r| r.state == ReplicaState::Online && r.records == 3));

    assert_eq!(push_and_go_live(&f, "ads").await, 2);
    let d = f.client.describe_store("ads").await.unwrap();
    assert_eq!(
        (d.store.current_version, d.store.backup_version),
        (Some(2), Some(1))
    );

    assert_eq!(push_and_go_live(&f, "ads").await, 3);
    let d = f.client.describe_store("ads").await.unwrap();
    assert_eq!(
        (d.store.current_version, d.store.backup_version),
        (Some(3), Some(2))
    );
    wait_until("v1 retired", || async {
        version_record(&f, "ads", 1).await.is_none()
    })
    .await;
    assert!(!f.pubsub.has_topic("ads_v1"));
    let (replicas, _) = f
        .meta
        .list(&f.layout.version_replicas_prefix("ads", 1))
        .await
        .unwrap();
    assert!(replicas.is_empty());
    // Current and backup keep their topics.
    assert!(f.pubsub.has_topic("ads_v2") && f.pubsub.has_topic("ads_v3"));
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn replica_error_fails_the_version_and_keeps_current() {
    let f = fixture().await;
    f.client.create_store(&create_req("ads")).await.unwrap();
    add_node(&f, "n1", "a").await;
    add_node(&f, "n2", "b").await;
    push_and_go_live(&f, "ads").await;

    let r = f
        .client
        .start_push("ads", &StartPushRequest::default())
        .await
        .unwrap();
    assert_eq!(r.version, 2);
    // One replica in ERROR (written first, so the version can never look all-ONLINE), the rest ONLINE.
    let v = f.client.describe_version("ads", 2).await.unwrap();
    let (p, node) = v
        .record
        .replicas()
        .last()
        .map(|(p, n)| (p, n.to_string()))
        .unwrap();
    let bad = ReplicaRecord {
        state: ReplicaState::Error,
        offset: 1,
        records: 0,
        consumed_from: 0,
        updated_ms: 0,
        error: Some("segment checksum mismatch".into()),
        disk_bytes: 0,
        memory_bytes: 0,
        lag: None,
        leader: false,
        following: false,
    };
    f.meta
        .put(
            &f.layout.replica("ads", 2, p, &node),
            serde_json::to_vec(&bad).unwrap(),
            None,
        )
        .await
        .unwrap();
    for (q, n) in v
        .record
        .replicas()
        .filter(|(q, n)| (*q, *n) != (p, node.as_str()))
    {
        let r = ReplicaRecord {
            state: ReplicaState::Online,
            offset: 7,
            records: 3,
            consumed_from: 0,
            updated_ms: 0,
            error: None,
            disk_bytes: 0,
            memory_bytes: 0,
            lag: None,
            leader: false,
            following: false,
        };
        f.meta
            .put(
                &f.layout.replica("ads", 2, q, n),
                serde_json::to_vec(&r).unwrap(),
                None,
            )
            .await
            .unwrap();
    }
    wait_until("v2 failed", || async {
        matches!(
            version_record(&f, "ads", 2).await.map(|v| v.status),
            Some(VersionStatus::Failed { .. })
        )
    })
    .await;
    let v = version_record(&f, "ads", 2).await.unwrap();
    let VersionStatus::Failed { reason } = v.status else {
        unreachable!()
    };
    assert_eq!(
        reason,
        format!("partition {p} replica on {node}: segment checksum mismatch")
    );
    let d = f.client.describe_store("ads").await.unwrap();
    assert_eq!(d.store.current_version, Some(1));
    wait_until("failed topic deleted", || async {
        !f.pubsub.has_topic("ads_v2")
    })
    .await;
    // The failed record stays for operators; pushing written on it is a conflict.
    assert!(version_record(&f, "ads", 2).await.is_some());
    let e = f.client.push_written("ads", 2).await.unwrap_err();
    assert_eq!(api_status(&e), (409, "conflict"));
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn unlucky_swap_race_is_resolved_by_error_first() {
    // A version whose replicas report ERROR before all are ONLINE never becomes current.
    let f = fixture().await;
    f.client.create_store(&create_req("ads")).await.unwrap();
    add_node(&f, "n1", "a").await;
    add_node(&f, "n2", "b").await;
    let r = f
        .client
        .start_push("ads", &StartPushRequest::default())
        .await
        .unwrap();
    let v = f.client.describe_version("ads", r.version).await.unwrap();
    let (p, node) = v
        .record
        .replicas()
        .next()
        .map(|(p, n)| (p, n.to_string()))
        .unwrap();
    let bad = ReplicaRecord {
        state: ReplicaState::Error,
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
    f.meta
        .put(
            &f.layout.replica("ads", 1, p, &node),
            serde_json::to_vec(&bad).unwrap(),
            None,
        )
        .await
        .unwrap();
    wait_until("v1 failed", || async {
        matches!(
            version_record(&f, "ads", 1).await.map(|v| v.status),
            Some(VersionStatus::Failed { .. })
        )
    })
    .await;
    set_replicas(&f, "ads", 1, ReplicaState::Online).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        f.client
            .describe_store("ads")
            .await
            .unwrap()
            .store
            .current_version,
        None
    );
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn fail_push_and_topic_creation_failure() {
    let f = fixture().await;
    f.client.create_store(&create_req("ads")).await.unwrap();
    add_node(&f, "n1", "a").await;
    add_node(&f, "n2", "b").await;
    push_and_go_live(&f, "ads").await;
    let e = f.client.fail_push("ads", 1, "oops").await.unwrap_err();
    assert_eq!(api_status(&e), (409, "conflict"));

    let r = f
        .client
        .start_push("ads", &StartPushRequest::default())
        .await
        .unwrap();
    let v = f
        .client
        .fail_push("ads", r.version, "input file unreadable")
        .await
        .unwrap();
    assert_eq!(
        v.record.status,
        VersionStatus::Failed {
            reason: "input file unreadable".into()
        }
    );
    // A second fail keeps the first reason.
    let v = f.client.fail_push("ads", r.version, "again").await.unwrap();
    assert_eq!(
        v.record.status,
        VersionStatus::Failed {
            reason: "input file unreadable".into()
        }
    );
    wait_until("failed topic deleted", || async {
        !f.pubsub.has_topic("ads_v2")
    })
    .await;

    f.faults.set_refuse_topic_creation(true);
    let e = f
        .client
        .start_push("ads", &StartPushRequest::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (503, "unavailable"));
    // No Pushing version is left behind: version 3 is recorded as failed.
    let v3 = version_record(&f, "ads", 3).await.unwrap();
    assert!(
        matches!(v3.status, VersionStatus::Failed { ref reason } if reason.contains("topic")),
        "{v3:?}"
    );
    f.faults.set_refuse_topic_creation(false);
    assert_eq!(
        f.client
            .start_push("ads", &StartPushRequest::default())
            .await
            .unwrap()
            .version,
        4
    );
    // Older failed versions are retired once older than the current one.
    f.client.push_written("ads", 4).await.unwrap();
    set_replicas(&f, "ads", 4, ReplicaState::Online).await;
    wait_until("v2, v3 retired", || async {
        version_record(&f, "ads", 2).await.is_none() && version_record(&f, "ads", 3).await.is_none()
    })
    .await;
    let d = f.client.describe_store("ads").await.unwrap();
    assert_eq!(
        (d.store.current_version, d.store.backup_version),
        (Some(4), Some(1))
    );
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn nodes_are_listed_and_bad_paths_answer_api_errors() {
    let f = fixture().await;
    add_node(&f, "n2", "b").await;
    add_node(&f, "n1", "a").await;
    let nodes = f.client.list_nodes().await.unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        vec!["n1", "n2"]
    );
    f.client.health().await.unwrap();
    f.client.create_store(&create_req("ads")).await.unwrap();
    let e = f.client.describe_version("ads%2Fx", 1).await.unwrap_err();
    assert_eq!(api_status(&e).0, 404);
    f.controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_leader_at_a_time_and_standby_takes_over() {
    let meta = MemoryMetaStore::new();
    let pubsub = MemoryPubSub::new();
    let a = controller("a", &meta, Arc::new(pubsub.clone())).await;
    let b = controller("b", &meta, Arc::new(pubsub)).await;
    wait_until("a leader", || async { a.is_leader() || b.is_leader() }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.is_leader() ^ b.is_leader(), "exactly one leader");
    let layout = Layout::new(DEFAULT_ROOT);
    let (leader, standby) = if a.is_leader() { (a, b) } else { (b, a) };
    let leader_id = meta.value(&layout.leader()).unwrap();
    let record = rialto_protocol::meta::LeadershipRecord::decode(&leader_id).unwrap();
    assert!(record.holder == "a" || record.holder == "b", "{record:?}");
    assert!(record.since_ms > 0);
    // Either controller names the leader.
    for (c, leads) in [(&leader, true), (&standby, false)] {
        let view = AdminClient::new(c.url()).controllers().await.unwrap();
        assert_eq!(view.leader.as_deref(), Some(record.holder.as_str()));
        assert_eq!(view.leader_since_ms, Some(record.since_ms));
        assert_eq!(view.answered_by == record.holder, leads, "{view:?}");
    }

    // Lease lost: the leader steps down, someone takes over.
    let lease = meta.lease_of(&layout.leader()).unwrap();
    meta.expire_lease(lease);
    wait_until("new term", || async {
        meta.lease_of(&layout.leader()).is_some_and(|l| l != lease)
            && (leader.is_leader() ^ standby.is_leader())
    })
    .await;

    // Shutdown of whoever leads now hands over to the other.
    let (leader, standby) = if leader.is_leader() {
        (leader, standby)
    } else {
        (standby, leader)
    };
    leader.shutdown().await.unwrap();
    wait_until("standby leads", || async { standby.is_leader() }).await;
    assert!(meta.value(&layout.leader()).is_some());
    let view = AdminClient::new(standby.url()).controllers().await.unwrap();
    assert_eq!(view.leader.as_ref(), Some(&view.answered_by), "{view:?}");
    let _ = leader_id;
    standby.shutdown().await.unwrap();
    assert!(
        meta.value(&layout.leader()).is_none(),
        "shutdown revokes the lease"
    );
}

/// One HTTP/1.1 call by hand (no retries): status line, headers and body of the answer.
async fn raw_call(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: rialto\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn a_caller_over_its_call_rate_is_throttled_before_any_work_and_the_client_waits() {
    let meta = MemoryMetaStore::new();
    let config = ControllerConfig {
        controller_id: "c1".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        kafka_bootstrap: "kafka:9092".into(),
        call_rate: rialto_controller::CallRate {
            per_second: 1.0,
            burst: 3.0,
        },
        ..ControllerConfig::default()
    };
    let controller = start(
        config,
        Arc::new(meta.clone()),
        Arc::new(MemoryPubSub::new()),
    )
    .await
    .unwrap();
    let addr = controller.address();
    for _ in 0..3 {
        let answer = raw_call(addr, "GET", "/v1/stores", "").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let body = serde_json::to_string(&create_req("late")).unwrap();
    let answer = raw_call(addr, "POST", "/v1/stores", &body).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains(r#""kind":"throttled""#) && answer.contains("address 127.0.0.1"),
        "the answer names the caller: {answer}"
    );
    let layout = Layout::new(DEFAULT_ROOT);
    assert!(
        meta.get(&layout.store("late")).await.unwrap().is_none(),
        "a throttled call changes nothing"
    );
    let health = raw_call(addr, "GET", "/health", "").await;
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "/health is never throttled: {health}"
    );

    // The admin client waits as told and goes through.
    let client = AdminClient::new(controller.url());
    let started = std::time::Instant::now();
    client.create_store(&create_req("ads")).await.unwrap();
    assert!(meta.get(&layout.store("ads")).await.unwrap().is_some());
    let metrics = client.metrics().await.unwrap();
    let throttled: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rialto_controller_throttled_total "))
        .and_then(|n| n.parse().ok())
        .expect("the throttled counter");
    assert!(throttled >= 1, "{metrics}");
    eprintln!(
        "{throttled} calls throttled; the client's took {:?}",
        started.elapsed()
    );
    controller.shutdown().await.unwrap();
}

#[tokio::test]
async fn realtime_decisions_and_writers_are_checked_recorded_and_deleted_with_their_store() {
    use rialto_protocol::admin::{RealtimeAction, RealtimeDecisionRequest};
    let f = fixture().await;
    add_node(&f, "n1", "a").await;
    add_node(&f, "n2", "b").await;
    let decide = |partition, offset, action| RealtimeDecisionRequest {
        partition,
        offset,
        action,
    };
    f.client.create_store(&create_req("batch")).await.unwrap();
    let e = f
        .client
        .decide_realtime_record("batch", &decide(0, 0, RealtimeAction::Skip))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (409, "conflict"));
    assert!(e.to_string().contains("not hybrid"), "{e}");
    let e = f
        .client
        .decide_realtime_record("nope", &decide(0, 0, RealtimeAction::Skip))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (404, "not_found"));

    let mut hybrid = create_req("feed");
    hybrid.hybrid = Some(rialto_protocol::meta::HybridConfig {
        rewind_seconds: 60,
        lag_records_max: 10,
    });
    f.client.create_store(&hybrid).await.unwrap();
    for bad in [
        decide(2, 0, RealtimeAction::Skip),
        decide(0, -1, RealtimeAction::Skip),
    ] {
        let e = f
            .client
            .decide_realtime_record("feed", &bad)
            .await
            .unwrap_err();
        assert_eq!(api_status(&e), (400, "bad_request"), "{bad:?}");
    }
    let d = f
        .client
        .decide_realtime_record("feed", &decide(1, 7, RealtimeAction::Skip))
        .await
        .unwrap();
    assert_eq!(
        (d.partition, d.offset, d.action),
        (1, 7, RealtimeAction::Skip)
    );
    assert_eq!(d.decided_by, "anonymous");
    // A later decision about the same record replaces it.
    f.client
        .decide_realtime_record("feed", &decide(1, 7, RealtimeAction::Accept))
        .await
        .unwrap();
    f.client
        .decide_realtime_record("feed", &decide(0, 3, RealtimeAction::Skip))
        .await
        .unwrap();
    let listed: Vec<_> = f
        .client
        .realtime_decisions("feed")
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.partition, d.offset, d.action))
        .collect();
    assert_eq!(
        listed,
        [(0, 3, RealtimeAction::Skip), (1, 7, RealtimeAction::Accept)]
    );
    // The servers read the decision where the layout says.
    let kv = f
        .meta
        .get(&f.layout.realtime_decision("feed", 1, 7))
        .await
        .unwrap()
        .expect("stored");
    let stored: rialto_protocol::meta::RealtimeDecision =
        rialto_protocol::meta::decode_record(&kv.value).unwrap();
    assert_eq!(stored.action, RealtimeAction::Accept);

    // Real-time writers: each registration is a fresh producer with a secret of its own, kept
    // where the servers look for it; a batch store takes none.
    let e = f
        .client
        .register_realtime_writer("batch")
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (409, "conflict"));
    let one = f.client.register_realtime_writer("feed").await.unwrap();
    let two = f.client.register_realtime_writer("feed").await.unwrap();
    assert_ne!(one.producer, two.producer);
    assert_ne!(one.secret, two.secret);
    assert_eq!((one.producer.len(), one.secret.len()), (32, 64));
    let kv = f
        .meta
        .get(&f.layout.realtime_writer("feed", &one.producer))
        .await
        .unwrap()
        .expect("registered");
    let registered: rialto_protocol::meta::RealtimeWriterRecord =
        rialto_protocol::meta::decode_record(&kv.value).unwrap();
    assert_eq!(
        (
            &registered.producer,
            &registered.secret,
            registered.registered_by.as_str()
        ),
        (&one.producer, &one.secret, "anonymous")
    );
    assert!(
        !format!("{registered:?}{one:?}").contains(&one.secret),
        "secrets stay out of debug output (and so out of logs)"
    );

    // Listed without their secrets, oldest first; revoked one by one.
    let listed = f.client.realtime_writers("feed").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|w| w.producer == one.producer));
    assert!(!format!("{listed:?}").contains(&one.secret));
    let revoked = f
        .client
        .revoke_realtime_writer("feed", &one.producer.to_uppercase())
        .await
        .unwrap();
    assert_eq!(revoked.producer, one.producer);
    let e = f
        .client
        .revoke_realtime_writer("feed", &one.producer)
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (404, "not_found"));
    let e = f
        .client
        .revoke_realtime_writer("feed", "not-a-guid")
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), (400, "bad_request"));
    let left = f.client.realtime_writers("feed").await.unwrap();
    assert_eq!(
        left.iter().map(|w| w.producer.as_str()).collect::<Vec<_>>(),
        [two.producer.as_str()]
    );

    f.client.delete_store("feed").await.unwrap();
    let (meta, layout) = (&f.meta, &f.layout);
    wait_until("the store's decisions and writers deleted", || async move {
        let (decisions, _) = meta
            .list(&layout.realtime_decisions_prefix("feed"))
            .await
            .unwrap();
        let (writers, _) = meta
            .list(&layout.realtime_writers_prefix("feed"))
            .await
            .unwrap();
        decisions.is_empty()
            && writers.is_empty()
            && meta.get(&layout.store("feed")).await.unwrap().is_none()
    })
    .await;
    f.controller.shutdown().await.unwrap();
}
