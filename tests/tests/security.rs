//! Security end to end on a real cluster (etcd, tansu, controller, servers): mutual TLS on the
//! controller's API and the servers' reads, callers named by their certificates, and per-store
//! ACLs checked by the controller (write, admin) and by every server (read).

use std::time::{Duration, Instant};

use anyhow::Result;
use rialto_controller::{AdminClient, ControllerError};
use rialto_fast_client::{Client, ClientError, ClientIdentity, Compute};
use rialto_protocol::acl::Permission;
use rialto_protocol::admin::{AclChangeRequest, UpdateStoreRequest};
use rialto_protocol::avro::Value;
use rialto_protocol::ErrorCode;
use rialto_tests::{json_of, key_of, write_json_dataset, Cluster, ClusterOptions};

const VALUE_SCHEMA: &str = r#"{"type":"record","name":"V","fields":[{"name":"n","type":"long"}]}"#;

const STORE: &str = "guarded";
const RECORDS: usize = 300;

fn forbidden(result: Result<impl std::fmt::Debug, ControllerError>, who: &str, what: &str) {
    match result {
        Err(ControllerError::Api {
            status: 403,
            kind,
            message,
        }) => {
            assert_eq!(kind, "forbidden");
            assert!(
                message.contains(&format!("`{who}`")) && message.contains(what),
                "refusal should name {who} and {what}: {message}"
            );
        }
        other => panic!("expected 403 forbidden for {who}, got {other:?}"),
    }
}

fn pusher_admin(cluster: &Cluster) -> AdminClient {
    cluster.admin_as("pusher")
}

fn change(principal: &str, permissions: &[Permission]) -> AclChangeRequest {
    AclChangeRequest {
        principal: principal.into(),
        permissions: permissions.to_vec(),
    }
}

async fn client_as(cluster: &Cluster, identity: Option<ClientIdentity>) -> Result<Client> {
    cluster
        .client_with(STORE, |c| {
            c.tls.as_mut().expect("secure cluster").identity = identity;
            c.request_timeout = Duration::from_secs(5);
        })
        .await
}

fn keys() -> Vec<Value> {
    (0..RECORDS).map(|i| Value::String(key_of(i))).collect()
}

/// Reads every key and checks each value against the input.
async fn read_all(client: &Client) -> Result<(), ClientError> {
    for (i, v) in client.batch_get(&keys()).await?.into_iter().enumerate() {
        assert_eq!(
            v.map(|v| json_of(VALUE_SCHEMA, &v)),
            Some(serde_json::json!({"n": i * 7})),
            "key {i}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_and_acls_guard_pushes_admin_calls_and_reads() -> Result<()> {
    let cluster = Cluster::start_opts(ClusterOptions {
        servers: 2,
        secure: true,
        ..ClusterOptions::default()
    })
    .await?;
    let admin = cluster.admin();
    cluster
        .create_store(STORE, r#""string""#, VALUE_SCHEMA, 4, 2)
        .await?;
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("d.jsonl");
    write_json_dataset(&input, RECORDS, |i| serde_json::json!({"n": i * 7}))?;

    // etcd itself speaks TLS and requires a client certificate from the cluster CA.
    assert!(cluster.services.etcd_endpoint.starts_with("https://"));
    let certs = cluster.certs_dir().unwrap();
    let no_cert = rialto_controller::ClientTlsFiles {
        ca: certs.join("ca.crt"),
        identity: None,
    };
    let refused = rialto_backends::etcd::EtcdMetaStore::connect_tls(
        std::slice::from_ref(&cluster.services.etcd_endpoint),
        Duration::from_secs(3),
        Some(&no_cert),
    )
    .await;
    assert!(
        refused.is_err(),
        "etcd must refuse a client without a certificate"
    );

    // A caller without a certificate cannot even reach the admin API.
    let ca_only = rialto_controller::ClientTlsFiles {
        ca: cluster.certs_dir().unwrap().join("ca.crt"),
        identity: None,
    };
    let anonymous = AdminClient::with_tls(cluster.controller_url(), &ca_only)?;
    assert!(
        matches!(
            anonymous.list_stores().await,
            Err(ControllerError::Unreachable { .. })
        ),
        "the controller must require a client certificate"
    );

    let push_as_pusher = || {
        cluster.push_with(STORE, &input, |c| {
            c.controller_tls = cluster.client_tls_files("pusher")
        })
    };
    // A push by a principal without any permission is refused at its first call; one holding
    // only `read` is refused when it asks for a version: before any version exists.
    let refused = push_as_pusher().await.unwrap_err().to_string();
    assert!(
        refused.contains("`pusher` holds no permission on store `guarded`"),
        "{refused}"
    );
    admin
        .change_acl(Some(STORE), true, &change("pusher", &[Permission::Read]))
        .await?;
    let refused = push_as_pusher().await.unwrap_err().to_string();
    assert!(
        refused.contains("`pusher`") && refused.contains("`write`"),
        "{refused}"
    );
    let store = admin.describe_store(STORE).await?.store;
    assert_eq!(store.largest_version, 0, "no version may be allocated");

    // Granted `write`, the same principal pushes.
    admin
        .change_acl(Some(STORE), true, &change("pusher", &[Permission::Write]))
        .await?;
    push_as_pusher().await?;

    // Only the principal that started a push (or a store administrator) reports its outcome,
    // so another writer cannot make someone else's version go live.
    // With authorization on, a push names its producer and is given the secret it signs with.
    let unnamed = pusher_admin(&cluster)
        .start_push(STORE, &Default::default())
        .await
        .unwrap_err();
    assert!(
        unnamed
            .to_string()
            .contains("a push names the producer GUID"),
        "{unnamed}"
    );
    let named = rialto_protocol::admin::StartPushRequest {
        producer: Some(rialto_protocol::producer::guid_hex(&[3; 16])),
        ..Default::default()
    };
    let started = pusher_admin(&cluster).start_push(STORE, &named).await?;
    assert!(started.signing_secret.is_some());
    admin
        .change_acl(Some(STORE), true, &change("bob", &[Permission::Write]))
        .await?;
    let bob = cluster.admin_as("bob");
    forbidden(
        bob.push_written(STORE, started.version).await,
        "pusher",
        "started by",
    );
    let failed = pusher_admin(&cluster)
        .fail_push(STORE, started.version, "abandoned by the test")
        .await?;
    assert_eq!(
        failed.record.pushed_by.as_deref(),
        Some("pusher"),
        "the version records who pushed it"
    );

    // Admin calls need `admin` on the store (or the cluster); `write` is not enough.
    let pusher = cluster.admin_as("pusher");
    forbidden(
        pusher
            .update_store(STORE, &UpdateStoreRequest::default())
            .await,
        "pusher",
        "`admin`",
    );
    forbidden(pusher.rollback(STORE).await, "pusher", "`admin`");
    forbidden(
        pusher
            .change_acl(Some(STORE), true, &change("pusher", &[Permission::Read]))
            .await,
        "pusher",
        "`admin`",
    );
    let alice = cluster.admin_as("alice");
    forbidden(alice.describe_store(STORE).await, "alice", STORE);
    forbidden(alice.list_nodes().await, "alice", "cluster");
    let metrics = admin.metrics().await?;
    let refusals: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rialto_controller_forbidden_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the controller counts refusals");
    assert!(
        refusals >= 6,
        "every refusal is counted: {refusals}\n{metrics}"
    );

    // Reads: alice's client is refused by the servers until she holds `read`.
    let alice_reads = client_as(&cluster, cluster.client_identity("alice")).await?;
    match read_all(&alice_reads).await {
        Err(ClientError::Forbidden { message, .. }) => {
            assert!(
                message.contains("`alice`") && message.contains(STORE),
                "{message}"
            )
        }
        other => panic!("alice must be refused before a grant: {other:?}"),
    }
    match alice_reads.get(&Value::String(key_of(1))).await {
        Err(ClientError::Forbidden { .. }) => {}
        other => panic!("a single get must be refused too: {other:?}"),
    }
    let compute = Compute::new().project(["n"]);
    match alice_reads.compute(&compute, &keys()).await {
        Err(ClientError::Forbidden { .. }) => {}
        other => panic!("read compute must be refused too: {other:?}"),
    }
    let server_refusals: u64 = (0..2)
        .filter_map(|i| cluster.server(i))
        .map(|s| s.metrics().errors(ErrorCode::Forbidden))
        .sum();
    assert!(server_refusals >= 1, "servers count refusals");

    admin
        .change_acl(Some(STORE), true, &change("alice", &[Permission::Read]))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match read_all(&alice_reads).await {
            Ok(()) => break,
            Err(ClientError::Forbidden { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("alice's reads after the grant: {e}"),
        }
    }
    alice.describe_store(STORE).await?;

    // A real-time writer needs `write`: the controller checks it before naming the topic (the
    // broker's own ACLs guard the topic itself).
    let writer_as = |name: &str| rialto_push::realtime::RealtimeConfig {
        controller_url: cluster.controller_url(),
        store: STORE.into(),
        kafka_bootstrap: None,
        kafka_options: vec![],
        controller_tls: cluster.client_tls_files(name),
        value_schema_id: None,
    };
    let refused = rialto_push::realtime::RealtimeWriter::connect(&writer_as("alice"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("principal `alice` lacks `write`"),
        "{refused}"
    );
    // `pusher` may write: it gets as far as the store's kind (a batch store takes no
    // real-time writes).
    let allowed = rialto_push::realtime::RealtimeWriter::connect(&writer_as("pusher"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        allowed.contains("hybrid") && !allowed.contains("lacks"),
        "{allowed}"
    );
    let computed = alice_reads.compute(&compute, &keys()).await?;
    for (i, record) in computed.iter().enumerate() {
        let n = record.as_ref().and_then(|r| r.get("n")).cloned();
        assert_eq!(n, Some(Ok(Value::Long(i as i64 * 7))), "key {i}");
    }

    // Revoking `read` takes effect on the connected client's next requests.
    admin
        .change_acl(Some(STORE), false, &change("alice", &[Permission::Read]))
        .await?;
    let revoked = Instant::now();
    loop {
        match alice_reads.get(&Value::String(key_of(2))).await {
            Err(ClientError::Forbidden { .. }) => break,
            Ok(_) if revoked.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!(
                "revocation not applied after {:?}: {other:?}",
                revoked.elapsed()
            ),
        }
    }
    eprintln!("revocation took effect after {:?}", revoked.elapsed());

    // A client presenting no certificate, or one from another CA, is refused by the handshake.
    let no_cert = client_as(&cluster, None).await?;
    assert!(no_cert.batch_get(&keys()).await.is_err());
    let other_ca = tempfile::tempdir()?;
    rialto_security::certs::init(
        other_ca.path(),
        &rialto_security::certs::InitOptions {
            clients: vec!["alice".into()],
            hosts: vec![],
        },
    )?;
    let foreign = ClientIdentity {
        cert_pem: std::fs::read(other_ca.path().join("client-alice.crt"))?,
        key_pem: std::fs::read(other_ca.path().join("client-alice.key"))?,
    };
    // Even with `read` granted to the name it claims.
    admin
        .change_acl(Some(STORE), true, &change("alice", &[Permission::Read]))
        .await?;
    let impostor = client_as(&cluster, Some(foreign)).await?;
    let err = impostor.batch_get(&keys()).await.unwrap_err();
    assert!(
        !matches!(err, ClientError::Forbidden { .. }),
        "a foreign certificate must fail the handshake, not reach the ACL check: {err}"
    );

    // The cluster administrator reads everything.
    read_all(&cluster.client(STORE).await?).await?;

    // An administrator named on the controller's command line is a grant in etcd like any
    // other: revoked there, the controller refuses it too (until a controller start grants it
    // again).
    admin
        .change_acl(None, true, &change("alice", &[Permission::Admin]))
        .await?;
    let alice = cluster.admin_as("alice");
    alice
        .change_acl(None, false, &change("admin", &[Permission::Admin]))
        .await?;
    forbidden(admin.acl(None).await, "admin", "admin");
    cluster.shutdown().await
}

/// The offset of the real-time record a halted leader's replica names, if one is halted on an
/// unauthenticated record.
fn halted_on_unauthenticated(d: &rialto_protocol::admin::StoreDescription) -> Option<i64> {
    d.versions
        .iter()
        .flat_map(|v| &v.replicas)
        .filter_map(|r| r.error.as_deref())
        .find_map(|e| {
            let rest = e.strip_prefix("unauthenticated record at offset ")?;
            assert!(e.contains("is not a registered writer"), "{e}");
            rest.split(' ').next()?.parse().ok()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_records_signed_by_registered_writers_reach_a_hybrid_store() -> Result<()> {
    let cluster = Cluster::start_opts(ClusterOptions {
        servers: 2,
        secure: true,
        ..ClusterOptions::default()
    })
    .await?;
    let hybrid = rialto_protocol::meta::HybridConfig {
        rewind_seconds: 3600,
        lag_records_max: 1000,
    };
    cluster
        .create_hybrid_string_store("signed", 1, 2, hybrid)
        .await?;
    let admin = cluster.admin();
    // Registering a writer needs `write`.
    forbidden(
        cluster
            .admin_as("alice")
            .register_realtime_writer("signed")
            .await,
        "alice",
        "write",
    );
    admin
        .change_acl(
            Some("signed"),
            true,
            &change("pusher", &[Permission::Write]),
        )
        .await?;
    let mut writer = cluster.realtime_writer_as("signed", "pusher").await?;
    let put = |i: usize, value: &str| (Value::String(key_of(i)), Value::String(value.into()));
    for i in 0..50 {
        let (k, v) = put(i, &format!("v{i}"));
        writer.put(&k, &v).await?;
    }
    writer.flush().await?;
    let client = cluster.client("signed").await?;
    let read = |i: usize| {
        let client = &client;
        async move {
            Ok::<_, anyhow::Error>(match client.get(&Value::String(key_of(i))).await? {
                Some(Value::String(s)) => Some(s),
                other => anyhow::bail!("key {i}: {other:?}"),
            })
        }
    };
    rialto_tests::wait_until(Duration::from_secs(60), "the signed writes", || async {
        Ok(read(49).await? == Some("v49".into()))
    })
    .await?;

    // A copy forged straight into the version topic, with an epoch that would fence the real
    // leader off: every replica drops it, and the leader's copies go on arriving.
    let mut forger = rialto_protocol::producer::PartitionWriter::new([66; 16]);
    let forged_put = rialto_protocol::envelope::Message::Put {
        key: rialto_protocol::avro::AvroCodec::parse(rialto_tests::STRING_SCHEMA)?
            .encode(&Value::String(key_of(3)), "key")?,
        schema_id: 1,
        value: b"forged".to_vec(),
    };
    let upstream = rialto_protocol::envelope::Upstream {
        epoch: u64::MAX / 2,
        offset: 1 << 40,
    };
    for envelope in [forger.start_segment(), forger.copied(forged_put, upstream)] {
        cluster
            .pubsub
            .send("signed_v1", 0, &[], &envelope.encode())
            .await?
            .await?;
    }
    let (k, v) = put(3, "after the forgery");
    writer.put(&k, &v).await?;
    writer.flush().await?;
    rialto_tests::wait_until(
        Duration::from_secs(60),
        "copies after the forgery",
        || async { Ok(read(3).await? == Some("after the forgery".into())) },
    )
    .await?;

    // A writer that never registered (it reached the broker directly): its records carry no
    // signature, so the leader halts on the first one rather than copy it.
    let record = admin.describe_store("signed").await?.store;
    let mut rogue =
        rialto_push::realtime::RealtimeWriter::new(&record, cluster.pubsub.clone()).await?;
    let (k, v) = put(0, "rogue");
    rogue.put(&k, &v).await?;
    rogue.flush().await?;
    let (k, v) = put(1, "after");
    writer.put(&k, &v).await?;
    writer.flush().await?;
    rialto_tests::wait_until(Duration::from_secs(60), "a halted leader", || async {
        Ok(halted_on_unauthenticated(&admin.describe_store("signed").await?).is_some())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        read(0).await?,
        Some("v0".into()),
        "the rogue write is not copied"
    );
    assert_eq!(
        read(1).await?,
        Some("v1".into()),
        "halted: nothing after it either"
    );

    // An administrator drops the rogue writer's records, one decision each; the registered
    // writer's record after them arrives.
    let started = Instant::now();
    while read(1).await? != Some("after".into()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the writes after the rogue records never arrived"
        );
        if let Some(offset) = halted_on_unauthenticated(&admin.describe_store("signed").await?) {
            let request = rialto_protocol::admin::RealtimeDecisionRequest {
                partition: 0,
                offset,
                action: rialto_protocol::meta::RealtimeAction::Skip,
            };
            forbidden(
                pusher_admin(&cluster)
                    .decide_realtime_record("signed", &request)
                    .await,
                "pusher",
                "admin",
            );
            admin.decide_realtime_record("signed", &request).await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(read(0).await?, Some("v0".into()));

    // The registered writer revoked (`rialto-admin realtime revoke`): its next record is refused.
    let writers = admin.realtime_writers("signed").await?;
    assert_eq!(writers.len(), 1, "{writers:?}");
    assert_eq!(writers[0].registered_by, "pusher");
    admin
        .revoke_realtime_writer("signed", &writers[0].producer)
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (k, v) = put(2, "revoked");
    writer.put(&k, &v).await?;
    writer.flush().await?;
    rialto_tests::wait_until(
        Duration::from_secs(60),
        "a halt on the revoked writer",
        || async {
            Ok(halted_on_unauthenticated(&admin.describe_store("signed").await?).is_some())
        },
    )
    .await?;
    assert_eq!(read(2).await?, Some("v2".into()));
    cluster.shutdown().await
}
