//! The Kafka side of Stormgate. This is the only crate that links rdkafka (librdkafka 2.12,
//! built from source).
//!
//! - [`config`]: [`KafkaSettings`], the producer settings (the seed's names, Stormgate's
//!   defaults, librdkafka pass-through) and how they map to librdkafka properties.
//! - [`sink`]: [`KafkaSinkFactory`] builds one [`KafkaSink`] per shard. Each owns a
//!   `BaseProducer` that only its shard touches: records go in with a non-blocking `send`,
//!   a full librdkafka queue means wait and retry, and a shard-local task polls delivery
//!   reports with a zero timeout so the reactor never blocks.
//! - [`embedded`]: librdkafka's in-process mock cluster, the default destination when no
//!   brokers are configured.
//! - [`spill`]: the per-shard spill file of records that finally failed, and `replay`.
//! - [`verify`]: reading a topic back to the end and creating topics, for tests, benchmarks
//!   and the load generator's consumer mode.
//!
//! librdkafka runs threads of its own (one main thread plus one per broker connection per
//! producer): the one exception to "a shard is one thread". They never call into Stormgate
//! code except through the delivery-report queue, which only the owning shard polls.

pub mod ceiling;
pub mod config;
pub mod embedded;
mod events;
pub mod sink;
pub mod spill;
pub mod verify;

mod context;

pub use config::{Acks, Compression, KafkaSettings, ParseSettingError};
pub use embedded::EmbeddedCluster;
pub use sink::{KafkaSink, KafkaSinkFactory};

/// Checks that librdkafka accepts `settings` (property names and values, including the
/// pass-through ones) by creating, and at once dropping, a producer with them. It contacts no
/// broker.
pub fn check_settings(settings: &KafkaSettings) -> rdkafka::error::KafkaResult<()> {
    let producer: rdkafka::producer::BaseProducer = settings.client_config(0).create()?;
    drop(producer);
    Ok(())
}
