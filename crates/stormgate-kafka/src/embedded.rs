//! The embedded default: librdkafka's in-process mock cluster.
//!
//! With no brokers configured, Stormgate starts a mock cluster inside its own process. It
//! speaks the real Kafka protocol on real loopback ports, so `kcat -b ADDR -C -t TOPIC` can
//! read what Stormgate produced, but it keeps everything in memory and is gone when the
//! process exits: a way to try Stormgate, not a place to keep data.

use rdkafka::error::KafkaResult;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A running mock cluster. Not `Send`: keep it on the thread that started it, alive for as
/// long as producers use it.
pub struct EmbeddedCluster {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedCluster {
    /// Starts a one-broker cluster with `topic` created with `partitions` partitions.
    pub fn start(topic: &str, partitions: i32) -> KafkaResult<EmbeddedCluster> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic(topic, partitions, 1)?;
        Ok(EmbeddedCluster { cluster })
    }

    /// The `bootstrap.servers` of the cluster (loopback, an ephemeral port).
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The cluster itself, for fault injection in tests.
    pub fn mock(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
