//! Internal events of the Kafka sink, each a [`stormgate_telemetry::Event`] like the shard
//! runtime's: counted where a counter exists, logged at a rate limit.

use std::io;
use std::path::Path;

use rdkafka::error::KafkaError;
use stormgate_telemetry::{Event, ShardMetrics};
use tracing::{error, warn};

/// librdkafka reported a client error (a broker down, a failed connection). It repeats at
/// every reconnect attempt, from librdkafka's threads: logged at a rate limit, not counted
/// (the producer's statistics say which brokers are down).
pub(crate) struct ClientError<'a> {
    pub shard: usize,
    pub error: &'a KafkaError,
    pub reason: &'a str,
}

impl Event for ClientError<'_> {
    fn log(&self, suppressed: u64) {
        warn!(shard = self.shard, error = %self.error, suppressed, "kafka client error: {}", self.reason);
    }
}

/// librdkafka's statistics could not be read (the operations endpoint keeps the last ones).
pub(crate) struct StatsUnreadable<'a> {
    pub shard: usize,
    pub error: &'a serde_json::Error,
}

impl Event for StatsUnreadable<'_> {
    fn log(&self, suppressed: u64) {
        warn!(shard = self.shard, error = %self.error, suppressed, "unreadable librdkafka statistics");
    }
}

/// Writing finally failed records to the spill file failed: those records are lost.
pub(crate) struct SpillFailed<'a> {
    pub shard: usize,
    pub path: &'a Path,
    pub records: u64,
    pub error: &'a io::Error,
}

impl Event for SpillFailed<'_> {
    fn count(&self, metrics: &ShardMetrics) {
        metrics.spill_failures.add(self.records);
    }

    fn log(&self, suppressed: u64) {
        error!(
            shard = self.shard,
            path = %self.path.display(),
            records = self.records,
            suppressed,
            error = %self.error,
            "spill file write failed: these failed records are lost"
        );
    }
}
