//! The broker of the push job's unit tests: the memory broker behind the fault wrapper, and
//! what was sent, read back.

use std::sync::Arc;

use rialto_backends::faults::{Faults, FaultyPubSub};
use rialto_backends::memory::MemoryPubSub;
use rialto_backends::PubSub;
use rialto_protocol::envelope::Envelope;
use rialto_security::signing::WriterSecret;

pub(crate) struct TestBroker {
    pub(crate) memory: MemoryPubSub,
    pub(crate) faults: Arc<Faults>,
    /// What the code under test writes to: `memory` through `faults`.
    pub(crate) pubsub: Arc<dyn PubSub>,
}

impl TestBroker {
    /// A broker holding one topic.
    pub(crate) async fn with_topic(topic: &str, partitions: u32) -> TestBroker {
        let memory = MemoryPubSub::new();
        memory.create_topic(topic, partitions).await.unwrap();
        let faults = Faults::new();
        let pubsub = Arc::new(FaultyPubSub::new(Arc::new(memory.clone()), faults.clone()));
        TestBroker {
            memory,
            faults,
            pubsub,
        }
    }

    /// Every envelope sent to `topic`'s `partition`, decoded; their Kafka keys are empty.
    pub(crate) fn envelopes(&self, topic: &str, partition: u32) -> Vec<Envelope> {
        self.memory
            .records(topic, partition)
            .into_iter()
            .map(|(key, value)| {
                assert!(key.is_empty(), "the Kafka record key stays empty");
                Envelope::decode(&value).expect("envelope decodes")
            })
            .collect()
    }

    /// Every envelope sent to `topic`'s `partition`, decoded, each checked to be signed by
    /// `secret` (its Kafka key).
    pub(crate) fn signed_envelopes(
        &self,
        topic: &str,
        partition: u32,
        secret: &WriterSecret,
    ) -> Vec<Envelope> {
        self.memory
            .records(topic, partition)
            .into_iter()
            .enumerate()
            .map(|(i, (key, value))| {
                assert!(secret.verifies(&value, &key), "record {i} is signed");
                Envelope::decode(&value).expect("envelope decodes")
            })
            .collect()
    }

    /// Records sent to every topic.
    pub(crate) fn records_sent(&self) -> usize {
        self.memory.record_count()
    }
}
