use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::heartbeat::Heartbeat;
use crate::histogram::{HistogramSnapshot, LatencyHistogram};
use crate::hll::{DistinctCounter, DistinctSnapshot};

/// Room for the per-code counts of rejected lines ([`ShardMetrics::line_errors`]), indexed by
/// the code's number. Telemetry knows nothing of the protocol: the shard runtime checks at
/// compile time that the protocol's codes fit.
pub const LINE_ERROR_CODES: usize = 32;

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

/// What kind of series a metric is, as the exposition's `TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only increases (from zero at start); its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets (`le`), `_sum` and `_count`.
    Histogram,
}

impl MetricKind {
    /// The name the exposition formats use: `counter`, `gauge`, `histogram`.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One metric as `/metrics` serves it: its one declaration, from which the exposition takes
/// its name, `HELP` and `TYPE`, and against which docs/OBSERVABILITY.md is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDesc {
    /// The name in the Prometheus text format: `stormgate_...`, and a counter's ends in
    /// `_total` (OpenMetrics names the family without it).
    pub name: &'static str,
    /// The `HELP` text: one sentence.
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its labels, in order (a histogram's `le` is implied).
    pub labels: &'static [&'static str],
}

/// Where a [`ShardMetrics`] counter or gauge is: read in place, at scrape time.
#[derive(Debug, Clone, Copy)]
pub enum ShardRead {
    /// A [`Counter`] field.
    Counter(fn(&ShardMetrics) -> &Counter),
    /// A [`Gauge`] field.
    Gauge(fn(&ShardMetrics) -> &Gauge),
}

/// A counter or gauge field of [`ShardMetrics`], as [`SHARD_SCALARS`] lists it.
#[derive(Debug, Clone, Copy)]
pub struct ShardScalar {
    /// The field's name in [`ShardMetrics`] and [`Totals`], and its key in the shutdown
    /// report.
    pub field: &'static str,
    /// How the exposition names it (label `shard`).
    pub desc: MetricDesc,
    /// How to read it.
    pub read: ShardRead,
}

/// A summed counter or gauge of [`Totals`] (see [`Totals::scalars`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Total {
    /// A counter's sum.
    Counter(u64),
    /// A gauge's sum.
    Gauge(i64),
}

/// Declares every counter and gauge of a shard once: its field, its doc, its exposed name
/// and help. From that one list come the fields of [`ShardMetrics`] and [`Totals`], the
/// summing, [`SHARD_SCALARS`] (what the exposition and the shutdown report iterate) and
/// [`Totals::scalars`]. The metrics that are not one number per shard (the error codes, the
/// latency histogram, the zipcode sketch) are written out beside it.
macro_rules! shard_metrics {
    (@total Counter) => { u64 };
    (@total Gauge) => { i64 };
    (@read Counter $field:ident) => { ShardRead::Counter(|m| &m.$field) };
    (@read Gauge $field:ident) => { ShardRead::Gauge(|m| &m.$field) };
    (@value Counter $v:expr) => { Total::Counter($v) };
    (@value Gauge $v:expr) => { Total::Gauge($v) };
    (
        $(
            $(#[doc = $doc:literal])*
            $field:ident: $kind:ident => $name:literal, $help:literal;
        )*
    ) => {
        /// Everything one shard counts. Created by the process, handed to the shard, written
        /// only by the shard's thread, read by anyone.
        ///
        /// Aligned to two cache lines so that shards never share one (adjacent-line
        /// prefetch included).
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct ShardMetrics {
            $(
                $(#[doc = $doc])*
                pub $field: $kind,
            )*
            /// Lines rejected, by error code (indexed by the protocol's `ErrorCode as usize`).
            pub line_errors: [Counter; LINE_ERROR_CODES],
            /// Line read → delivery report, in microseconds.
            pub delivery_latency: LatencyHistogram,
            /// With the disk buffer: line read → its record durable (its acknowledgement
            /// due), in microseconds.
            pub durable_latency: LatencyHistogram,
            /// Zipcodes of the stations that identified on this shard, as a HyperLogLog
            /// sketch; merged across shards when read (see [`DistinctCounter`]).
            pub zipcodes: DistinctCounter,
            /// When the shard last ran its periodic tick.
            pub heartbeat: Heartbeat,
        }

        /// The sum of several shards' metrics at one moment (not atomic across counters).
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct Totals {
            $(
                #[doc = concat!("See [`ShardMetrics::", stringify!($field), "`].")]
                pub $field: shard_metrics!(@total $kind),
            )*
            /// See [`ShardMetrics::line_errors`].
            pub line_errors: [u64; LINE_ERROR_CODES],
            /// See [`ShardMetrics::delivery_latency`].
            pub delivery_latency: HistogramSnapshot,
            /// See [`ShardMetrics::zipcodes`]: the shards' sketches merged (their union).
            pub zipcodes: DistinctSnapshot,
        }

        /// Every counter and gauge field of [`ShardMetrics`], in exposition order.
        pub const SHARD_SCALARS: &[ShardScalar] = &[
            $(
                ShardScalar {
                    field: stringify!($field),
                    desc: MetricDesc {
                        name: $name,
                        help: $help,
                        kind: MetricKind::$kind,
                        labels: &["shard"],
                    },
                    read: shard_metrics!(@read $kind $field),
                },
            )*
        ];

        impl Totals {
            fn add_scalars(&mut self, m: &ShardMetrics) {
                $( self.$field += m.$field.get(); )*
            }

            /// Each counter and gauge with its sum, in the order of [`SHARD_SCALARS`].
            pub fn scalars(&self) -> impl Iterator<Item = (&'static ShardScalar, Total)> {
                SHARD_SCALARS
                    .iter()
                    .zip([$( shard_metrics!(@value $kind self.$field) ),*])
            }
        }
    };
}

shard_metrics! {
    /// Connections accepted since start.
    connections_accepted: Counter =>
        "stormgate_connections_accepted_total", "Station connections accepted.";
    /// Connections closed since start (by either side).
    connections_closed: Counter =>
        "stormgate_connections_closed_total", "Station connections closed, by either side.";
    /// Connections refused at accept (connection limit).
    connections_rejected: Counter =>
        "stormgate_connections_rejected_total",
        "Connections refused at accept because a connection limit was reached.";
    /// Connection tasks that panicked (bugs); each closed its connection only.
    connection_panics: Counter =>
        "stormgate_connection_panics_total",
        "Connection tasks that panicked (bugs); each closed only its connection.";
    /// Connections closed because the station sent nothing for the idle timeout.
    idle_timeouts: Counter =>
        "stormgate_idle_timeouts_total",
        "Connections closed because the station sent nothing for TCP_IDLE_TIMEOUT.";
    /// Connections closed because a line stayed incomplete past the line timeout.
    line_timeouts: Counter =>
        "stormgate_line_timeouts_total",
        "Connections closed because a line stayed incomplete past TCP_LINE_TIMEOUT.";
    /// Non-blank lines read.
    lines_received: Counter =>
        "stormgate_lines_received_total", "Non-blank lines read from stations.";
    /// Bytes read from station sockets.
    bytes_received: Counter =>
        "stormgate_bytes_received_total", "Bytes read from station sockets.";
    /// Records handed to the shard queue.
    records_enqueued: Counter =>
        "stormgate_records_enqueued_total",
        "Metrics records put in the shard queue (dead letters are counted apart).";
    /// Records the sink handed to its destination (for Kafka: `send` succeeded, so the
    /// producer holds them until their delivery report). Dead letters are not counted here.
    records_produced: Counter =>
        "stormgate_records_produced_total", "Metrics records the sink handed to its producer.";
    /// Records whose delivery the sink confirmed.
    records_delivered: Counter =>
        "stormgate_records_delivered_total", "Metrics records whose delivery was acknowledged.";
    /// Records whose delivery finally failed.
    records_failed: Counter =>
        "stormgate_records_failed_total", "Metrics records whose delivery finally failed.";
    /// Failed records written to the spill file (a subset of `records_failed`).
    records_spilled: Counter =>
        "stormgate_records_spilled_total", "Failed records written to the shard's spill file.";
    /// Settlements of a record that was already settled or never opened: a bug in a sink,
    /// always 0 (tests and benchmarks assert it).
    settle_errors: Counter =>
        "stormgate_settle_errors_total",
        "Settlements of a record already settled or unknown: a bug, always 0.";
    /// Failed records the spill file could not take either (disk full, permissions): lost.
    spill_failures: Counter =>
        "stormgate_spill_failures_total",
        "Failed records the spill file could not take either: lost.";
    /// Dead-letter records (rejected lines, `KAFKA_DLQ_TOPIC`) handed to the shard queue.
    dead_letters_enqueued: Counter =>
        "stormgate_dead_letters_enqueued_total",
        "Dead-letter records (rejected lines, KAFKA_DLQ_TOPIC) put in the shard queue.";
    /// Dead-letter records delivered.
    dead_letters_delivered: Counter =>
        "stormgate_dead_letters_delivered_total", "Dead-letter records delivered.";
    /// Dead-letter records whose delivery finally failed (spilled like any record).
    dead_letters_failed: Counter =>
        "stormgate_dead_letters_failed_total",
        "Dead-letter records whose delivery finally failed.";
    /// Times a connection stopped reading because the queue or its own in-flight cap was full.
    backpressure_waits: Counter =>
        "stormgate_backpressure_waits_total",
        "Times a connection stopped reading because the queue or its in-flight cap was full.";
    /// Times a connection waited because it sent lines faster than `TCP_MAX_LINES_PER_SEC`.
    rate_limited_waits: Counter =>
        "stormgate_rate_limited_waits_total",
        "Times a connection waited because it sent lines faster than TCP_MAX_LINES_PER_SEC.";
    /// TLS handshakes completed (`TLS_CERT`).
    tls_handshakes: Counter =>
        "stormgate_tls_handshakes_total", "TLS handshakes completed on the station listener.";
    /// TLS handshakes that failed or timed out; each closed its connection.
    tls_handshake_failures: Counter =>
        "stormgate_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out; each closed its connection.";
    /// `accept` calls that failed (out of file descriptors or memory: the shard backs off).
    accept_failures: Counter =>
        "stormgate_accept_failures_total",
        "Accepts that failed (EMFILE, ENFILE, ENOBUFS, ENOMEM: the shard backs off 10 ms).";
    /// Connections open now.
    connections_active: Gauge =>
        "stormgate_connections_active", "Station connections open now.";
    /// Records waiting in the shard queue.
    queue_depth: Gauge =>
        "stormgate_queue_depth", "Records waiting in the shard queue (refreshed every 20 ms).";
    /// Records taken but not yet settled (queue plus sink).
    records_in_flight: Gauge =>
        "stormgate_records_in_flight",
        "Records taken from stations and not yet settled: queue plus producer (every 20 ms).";
}

/// `stormgate_producer_in_flight_records`: [`ShardMetrics::producer_in_flight_records`].
pub const PRODUCER_IN_FLIGHT_RECORDS: MetricDesc = MetricDesc {
    name: "stormgate_producer_in_flight_records",
    help: "Records handed to the producer and not yet settled (in flight minus queue depth).",
    kind: MetricKind::Gauge,
    labels: &["shard"],
};

/// `stormgate_shard_heartbeat_age_seconds`: [`ShardMetrics::heartbeat`], while the shard runs.
pub const HEARTBEAT_AGE: MetricDesc = MetricDesc {
    name: "stormgate_shard_heartbeat_age_seconds",
    help: "Seconds since the shard last ran its periodic tick (every 20 ms while its executor makes progress).",
    kind: MetricKind::Gauge,
    labels: &["shard"],
};

/// `stormgate_line_errors_total`: [`ShardMetrics::line_errors`], by code.
pub const LINE_ERRORS: MetricDesc = MetricDesc {
    name: "stormgate_line_errors_total",
    help: "Rejected lines, by error code (docs/PROTOCOL.md).",
    kind: MetricKind::Counter,
    labels: &["shard", "code"],
};

/// `stormgate_delivery_latency_seconds`: [`ShardMetrics::delivery_latency`].
pub const DELIVERY_LATENCY: MetricDesc = MetricDesc {
    name: "stormgate_delivery_latency_seconds",
    help: "Line read to settlement (delivered or failed), per metrics record.",
    kind: MetricKind::Histogram,
    labels: &["shard"],
};

/// `stormgate_durable_latency_seconds`: [`ShardMetrics::durable_latency`].
pub const DURABLE_LATENCY: MetricDesc = MetricDesc {
    name: "stormgate_durable_latency_seconds",
    help: "With the disk buffer: line read to its record durable (its acknowledgement due), per metrics record.",
    kind: MetricKind::Histogram,
    labels: &["shard"],
};

/// `stormgate_unique_zipcodes`: [`Totals::unique_zipcodes`], all shards together.
pub const UNIQUE_ZIPCODES: MetricDesc = MetricDesc {
    name: "stormgate_unique_zipcodes",
    help: "Distinct zipcodes that identified since start, all shards (HyperLogLog estimate, ~1.6% error).",
    kind: MetricKind::Gauge,
    labels: &[],
};

/// Every metric that comes from [`ShardMetrics`], in exposition order.
pub fn shard_catalogue() -> impl Iterator<Item = &'static MetricDesc> {
    SHARD_SCALARS.iter().map(|s| &s.desc).chain([
        &PRODUCER_IN_FLIGHT_RECORDS,
        &LINE_ERRORS,
        &DELIVERY_LATENCY,
        &DURABLE_LATENCY,
        &UNIQUE_ZIPCODES,
        &HEARTBEAT_AGE,
    ])
}

impl ShardMetrics {
    /// Counts one rejected line with the error code numbered `code` (the protocol's
    /// `ErrorCode as usize`, below [`LINE_ERROR_CODES`]).
    #[inline]
    pub fn line_error(&self, code: usize) {
        self.line_errors[code].incr();
    }

    /// Records handed to the producer and not yet settled: in flight minus queue depth (the
    /// two gauges are refreshed apart, so never below zero).
    pub fn producer_in_flight_records(&self) -> i64 {
        (self.records_in_flight.get() - self.queue_depth.get()).max(0)
    }
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
        self.add_scalars(m);
        for (t, c) in self.line_errors.iter_mut().zip(&m.line_errors) {
            *t += c.get();
        }
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

    /// The count for the error code numbered `code` (the protocol's `ErrorCode as usize`).
    pub fn line_error(&self, code: usize) -> u64 {
        self.line_errors[code]
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
        a.line_error(1);
        b.line_error(1);
        b.line_error(4);
        a.delivery_latency.record_micros(100);
        b.delivery_latency.record_micros(200);
        let t = Totals::sum([&a, &b]);
        assert_eq!(t.lines_received, 7);
        assert_eq!(t.connections_active, 1);
        assert_eq!(t.line_error(1), 2);
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
    fn totals_list_every_scalar_with_its_sum() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        for (i, s) in SHARD_SCALARS.iter().enumerate() {
            // A distinct value per field, so that a field read in another's place shows.
            match s.read {
                ShardRead::Counter(read) => {
                    read(&a).add(i as u64 + 1);
                    read(&b).add(100);
                }
                ShardRead::Gauge(read) => {
                    read(&a).add(i as i64 + 1);
                    read(&b).add(-100);
                }
            }
        }
        let t = Totals::sum([&a, &b]);
        let scalars: Vec<_> = t.scalars().collect();
        assert_eq!(scalars.len(), SHARD_SCALARS.len());
        for (i, (s, total)) in scalars.into_iter().enumerate() {
            let want = match s.desc.kind {
                MetricKind::Counter => Total::Counter(i as u64 + 101),
                _ => Total::Gauge(i as i64 - 99),
            };
            assert_eq!(total, want, "{}", s.field);
        }
        assert_eq!(t.lines_received, 107, "a field and its entry agree");
        assert_eq!(
            SHARD_SCALARS[6].field, "lines_received",
            "entries keep the declaration's order"
        );
    }

    #[test]
    fn the_catalogue_follows_the_naming_rules() {
        let mut names = std::collections::BTreeSet::new();
        for d in shard_catalogue() {
            assert!(names.insert(d.name), "{} declared twice", d.name);
            assert!(d.name.starts_with("stormgate_"), "{}", d.name);
            assert_eq!(
                d.kind == MetricKind::Counter,
                d.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                d.name
            );
            assert!(
                d.help.ends_with('.') && !d.help.contains('\n'),
                "{}",
                d.name
            );
        }
        for s in SHARD_SCALARS {
            assert!(s.desc.name.contains(s.field) || s.field == "connection_panics");
            let kind = match s.read {
                ShardRead::Counter(_) => MetricKind::Counter,
                ShardRead::Gauge(_) => MetricKind::Gauge,
            };
            assert_eq!(s.desc.kind, kind, "{}", s.field);
        }
    }

    #[test]
    fn producer_in_flight_is_never_negative() {
        let m = ShardMetrics::default();
        m.records_in_flight.set(10);
        m.queue_depth.set(4);
        assert_eq!(m.producer_in_flight_records(), 6);
        m.queue_depth.set(12);
        assert_eq!(m.producer_in_flight_records(), 0);
    }

    #[test]
    fn shard_metrics_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<ShardMetrics>(), 128);
    }
}
