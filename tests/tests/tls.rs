//! Reads over TLS: servers present a certificate, the client verifies it, and a client that
//! does not trust it cannot read.

use anyhow::Result;
use rialto_backends::MetaStore;
use rialto_fast_client::{Client, ClientConfig, ClientError, ClientTls};
use rialto_protocol::avro::Value;
use rialto_tests::{key_of, write_json_dataset, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_over_tls_verify_the_server_certificate() -> Result<()> {
    let cluster = Cluster::start_with(2, true).await?;
    cluster
        .create_store("secure", r#""string""#, r#""long""#, 4, 2)
        .await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("d.jsonl");
    write_json_dataset(&path, 500, |i| serde_json::json!(i))?;
    cluster.push("secure", &path).await?;

    let client = cluster.client("secure").await?;
    let keys: Vec<Value> = (0..500).map(|i| Value::String(key_of(i))).collect();
    for (i, v) in client.batch_get(&keys).await?.into_iter().enumerate() {
        assert_eq!(
            v.map(|v| rialto_tests::json_of(r#""long""#, &v)),
            Some(serde_json::json!(i))
        );
    }

    // A client trusting another CA is refused by the TLS handshake, never served in plaintext.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let mut config = ClientConfig::new("secure");
    config.tls = Some(ClientTls {
        ca_cert_pem: other.cert.pem().into_bytes(),
        server_name: None,
        identity: None,
    });
    let meta: std::sync::Arc<dyn MetaStore> = cluster.meta.clone();
    let untrusting = Client::connect(config, meta).await?;
    let err = untrusting.get(&Value::String(key_of(1))).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Unreachable { .. } | ClientError::Incomplete { .. }
        ),
        "untrusted certificate must fail the read: {err}"
    );
    cluster.shutdown().await
}
