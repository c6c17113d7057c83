//! The backend conformance cases (`rialto_backends::conformance`) on the production systems:
//! etcd and the Kafka-protocol test broker. The same cases run on the memory backends in the
//! backends crate's own tests, so the two implementations are held to one behaviour.

use std::time::Duration;

use anyhow::Result;
use rialto_backends::conformance;
use rialto_backends::etcd::EtcdMetaStore;
use rialto_backends::kafka::{KafkaConfig, KafkaPubSub};
use rialto_tests::{init_logging, Services};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_and_the_test_broker_pass_the_conformance_cases() -> Result<()> {
    init_logging();
    let services = Services::start()?;
    let etcd =
        EtcdMetaStore::connect(&[services.etcd_endpoint.clone()], Duration::from_secs(10)).await?;
    conformance::meta_store(&etcd, "/conformance/").await;
    let kafka = KafkaPubSub::new(KafkaConfig::new(services.kafka_bootstrap.clone()))?;
    // tansu answers a time later than every record with the partition's start, not its end.
    let tansu = conformance::BrokerDivergence {
        offset_for_time_may_be_earlier: true,
    };
    conformance::pub_sub(&kafka, "conformance-", tansu).await;
    Ok(())
}
