use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use stormgate_protocol::ErrorCode;

use crate::histogram::{HistogramSnapshot, LatencyHistogram};
use crate::hll::{DistinctCounter, DistinctSnapshot};

/// A monotonically increasing count, written by one thread and read by any.
///
/// Invariant: only the owning shard calls [`Counter::add`]. Two writers would lose updates;
/// they would not corrupt memory.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Single writer only (see the type's invariant).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn incr(&self) {
        self.add(1);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down (connections open, queue depth), single writer.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (negative to decrease). Single writer only.
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Sets the value. Single writer only.
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Everything one shard counts. Created by the process, handed to the shard, written only by
/// the shard's thread, read by anyone.
///
/// Aligned to two cache lines so that shards never share one (adjacent-line prefetch
/// included).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// Connections accepted since start.
    pub connections_accepted: Counter,
    /// Connections closed since start (by either side).
    pub connections_closed: Counter,
    /// Connections refused at accept (connection limit).
    pub connections_rejected: Counter,
    /// Connections open now.
    pub connections_active: Gauge,
    /// Connection tasks that panicked (bugs); each closed its connection only.
    pub connection_panics: Counter,
    /// Connections closed because the station sent nothing for the idle timeout.
    pub idle_timeouts: Counter,
    /// Connections closed because a line stayed incomplete past the line timeout.
    pub line_timeouts: Counter,
    /// TLS handshakes completed (`TLS_CERT`).
    pub tls_handshakes: Counter,
    /// TLS handshakes that failed or timed out; each closed its connection.
    pub tls_handshake_failures: Counter,
    /// Non-blank lines read.
    pub lines_received: Counter,
    /// Bytes read from station sockets.
    pub bytes_received: Counter,
    /// Lines rejected, by [`ErrorCode`] (indexed by `code as usize`).
    pub line_errors: [Counter; ErrorCode::COUNT],
    /// Records handed to the shard queue.
    pub records_enqueued: Counter,
    /// Records the sink handed to its destination (for Kafka: `send` succeeded, so the
    /// producer holds them until their delivery report). Dead letters are not counted here.
    pub records_produced: Counter,
    /// Records whose delivery the sink confirmed.
    pub records_delivered: Counter,
    /// Records whose delivery finally failed.
    pub records_failed: Counter,
    /// Failed records written to the spill file (a subset of `records_failed`).
    pub records_spilled: Counter,
    /// Failed records the spill file could not take either (disk full, permissions): lost.
    pub spill_failures: Counter,
    /// Dead-letter records (rejected lines, `KAFKA_DLQ_TOPIC`) handed to the shard queue.
    pub dead_letters_enqueued: Counter,
    /// Dead-letter records delivered.
    pub dead_letters_delivered: Counter,
    /// Dead-letter records whose delivery finally failed (spilled like any record).
    pub dead_letters_failed: Counter,
    /// Settlements of a record that was already settled or never opened: a bug in a sink,
    /// always 0 (tests and benchmarks assert it).
    pub settle_errors: Counter,
    /// Records taken but not yet settled (queue plus sink).
    pub records_in_flight: Gauge,
    /// Records waiting in the shard queue.
    pub queue_depth: Gauge,
    /// Times a connection stopped reading because the queue or its own in-flight cap was full.
    pub backpressure_waits: Counter,
    /// Times a connection waited because it sent lines faster than `TCP_MAX_LINES_PER_SEC`.
    pub rate_limited_waits: Counter,
    /// Line read → delivery report, in microseconds.
    pub delivery_latency: LatencyHistogram,
    /// Zipcodes of the stations that identified on this shard, as a HyperLogLog sketch;
    /// merged across shards when read (see [`DistinctCounter`]).
    pub zipcodes: DistinctCounter,
}

impl ShardMetrics {
    /// Counts one rejected line.
    #[inline]
    pub fn line_error(&self, code: ErrorCode) {
        self.line_errors[code as usize].incr();
    }
}

/// The sum of several shards' metrics at one moment (not atomic across counters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// See [`ShardMetrics::connections_accepted`].
    pub connections_accepted: u64,
    /// See [`ShardMetrics::connections_closed`].
    pub connections_closed: u64,
    /// See [`ShardMetrics::connections_rejected`].
    pub connections_rejected: u64,
    /// See [`ShardMetrics::connections_active`].
    pub connections_active: i64,
    /// See [`ShardMetrics::connection_panics`].
    pub connection_panics: u64,
    /// See [`ShardMetrics::idle_timeouts`].
    pub idle_timeouts: u64,
    /// See [`ShardMetrics::line_timeouts`].
    pub line_timeouts: u64,
    /// See [`ShardMetrics::lines_received`].
    pub lines_received: u64,
    /// See [`ShardMetrics::bytes_received`].
    pub bytes_received: u64,
    /// See [`ShardMetrics::line_errors`].
    pub line_errors: [u64; ErrorCode::COUNT],
    /// See [`ShardMetrics::records_enqueued`].
    pub records_enqueued: u64,
    /// See [`ShardMetrics::records_produced`].
    pub records_produced: u64,
    /// See [`ShardMetrics::records_delivered`].
    pub records_delivered: u64,
    /// See [`ShardMetrics::records_failed`].
    pub records_failed: u64,
    /// See [`ShardMetrics::records_spilled`].
    pub records_spilled: u64,
    /// See [`ShardMetrics::spill_failures`].
    pub spill_failures: u64,
    /// See [`ShardMetrics::dead_letters_enqueued`].
    pub dead_letters_enqueued: u64,
    /// See [`ShardMetrics::dead_letters_delivered`].
    pub dead_letters_delivered: u64,
    /// See [`ShardMetrics::dead_letters_failed`].
    pub dead_letters_failed: u64,
    /// See [`ShardMetrics::settle_errors`].
    pub settle_errors: u64,
    /// See [`ShardMetrics::records_in_flight`].
    pub records_in_flight: i64,
    /// See [`ShardMetrics::queue_depth`].
    pub queue_depth: i64,
    /// See [`ShardMetrics::backpressure_waits`].
    pub backpressure_waits: u64,
    /// See [`ShardMetrics::rate_limited_waits`].
    pub rate_limited_waits: u64,
    /// See [`ShardMetrics::tls_handshakes`].
    pub tls_handshakes: u64,
    /// See [`ShardMetrics::tls_handshake_failures`].
    pub tls_handshake_failures: u64,
    /// See [`ShardMetrics::delivery_latency`].
    pub delivery_latency: HistogramSnapshot,
    /// See [`ShardMetrics::zipcodes`]: the shards' sketches merged (their union).
    pub zipcodes: DistinctSnapshot,
}

impl Totals {
    /// Sums the given shards.
    pub fn sum<'a>(shards: impl IntoIterator<Item = &'a ShardMetrics>) -> Totals {
        let mut t = Totals::default();
        for m in shards {
            t.add(m);
        }
        t
    }

    fn add(&mut self, m: &ShardMetrics) {
        self.connections_accepted += m.connections_accepted.get();
        self.connections_closed += m.connections_closed.get();
        self.connections_rejected += m.connections_rejected.get();
        self.connections_active += m.connections_active.get();
        self.connection_panics += m.connection_panics.get();
        self.idle_timeouts += m.idle_timeouts.get();
        self.line_timeouts += m.line_timeouts.get();
        self.lines_received += m.lines_received.get();
        self.bytes_received += m.bytes_received.get();
        for (t, c) in self.line_errors.iter_mut().zip(&m.line_errors) {
            *t += c.get();
        }
        self.records_enqueued += m.records_enqueued.get();
        self.records_produced += m.records_produced.get();
        self.records_delivered += m.records_delivered.get();
        self.records_failed += m.records_failed.get();
        self.records_spilled += m.records_spilled.get();
        self.spill_failures += m.spill_failures.get();
        self.dead_letters_enqueued += m.dead_letters_enqueued.get();
        self.dead_letters_delivered += m.dead_letters_delivered.get();
        self.dead_letters_failed += m.dead_letters_failed.get();
        self.settle_errors += m.settle_errors.get();
        self.records_in_flight += m.records_in_flight.get();
        self.queue_depth += m.queue_depth.get();
        self.backpressure_waits += m.backpressure_waits.get();
        self.rate_limited_waits += m.rate_limited_waits.get();
        self.tls_handshakes += m.tls_handshakes.get();
        self.tls_handshake_failures += m.tls_handshake_failures.get();
        self.delivery_latency.merge(&m.delivery_latency.snapshot());
        self.zipcodes.merge_counter(&m.zipcodes);
    }

    /// The estimated number of distinct zipcodes that identified, on any shard (within about
    /// 1.6%; see [`DistinctCounter`]).
    pub fn unique_zipcodes(&self) -> u64 {
        self.zipcodes.estimate()
    }

    /// Rejected lines across all codes.
    pub fn line_errors_total(&self) -> u64 {
        self.line_errors.iter().sum()
    }

    /// The count for one error code.
    pub fn line_error(&self, code: ErrorCode) -> u64 {
        self.line_errors[code as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_shards() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.lines_received.add(3);
        b.lines_received.add(4);
        a.connections_active.add(2);
        b.connections_active.add(-1);
        a.line_error(ErrorCode::MalformedJson);
        b.line_error(ErrorCode::MalformedJson);
        b.line_error(ErrorCode::UnknownType);
        a.delivery_latency.record_micros(100);
        b.delivery_latency.record_micros(200);
        let t = Totals::sum([&a, &b]);
        assert_eq!(t.lines_received, 7);
        assert_eq!(t.connections_active, 1);
        assert_eq!(t.line_error(ErrorCode::MalformedJson), 2);
        assert_eq!(t.line_errors_total(), 3);
        assert_eq!(t.delivery_latency.count(), 2);
    }

    #[test]
    fn totals_count_zipcodes_seen_on_several_shards_once() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.zipcodes.insert(b"12345");
        a.zipcodes.insert(b"23456");
        b.zipcodes.insert(b"12345");
        b.zipcodes.insert(b"34567");
        assert_eq!(Totals::sum([&a, &b]).unique_zipcodes(), 3);
        assert_eq!(Totals::sum([&b]).unique_zipcodes(), 2);
        assert_eq!(Totals::default().unique_zipcodes(), 0);
    }

    #[test]
    fn shard_metrics_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<ShardMetrics>(), 128);
    }
}
