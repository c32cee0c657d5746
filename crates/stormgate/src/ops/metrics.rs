//! `/metrics`: every metric, read from the shards' atomics at scrape time.

use std::fmt::{Display, Write as _};

use stormgate_buffer::LogStats;
use stormgate_kafka::sink::ProducerStatsSnapshot;
use stormgate_protocol::ErrorCode;
use stormgate_telemetry::{HistogramSnapshot, ShardMetrics};

use super::OpsState;

/// Upper bounds of the delivery-latency histogram's buckets, in seconds. The shard histogram
/// behind them has 6.25% resolution, so a bucket may miss values in the last 6.25% below
/// its bound (they are counted in the next one).
pub const LATENCY_BUCKETS_SECONDS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// A per-shard counter or gauge read straight from [`ShardMetrics`].
type ShardValue = fn(&ShardMetrics) -> i64;

/// Counters: `(name, help, read)`. Every name ends in `_total`.
const SHARD_COUNTERS: &[(&str, &str, ShardValue)] = &[
    (
        "stormgate_connections_accepted_total",
        "Station connections accepted.",
        |m| m.connections_accepted.get() as i64,
    ),
    (
        "stormgate_connections_closed_total",
        "Station connections closed, by either side.",
        |m| m.connections_closed.get() as i64,
    ),
    (
        "stormgate_connections_rejected_total",
        "Connections refused at accept because a connection limit was reached.",
        |m| m.connections_rejected.get() as i64,
    ),
    (
        "stormgate_connection_panics_total",
        "Connection tasks that panicked (bugs); each closed only its connection.",
        |m| m.connection_panics.get() as i64,
    ),
    (
        "stormgate_idle_timeouts_total",
        "Connections closed because the station sent nothing for TCP_IDLE_TIMEOUT.",
        |m| m.idle_timeouts.get() as i64,
    ),
    (
        "stormgate_line_timeouts_total",
        "Connections closed because a line stayed incomplete past TCP_LINE_TIMEOUT.",
        |m| m.line_timeouts.get() as i64,
    ),
    (
        "stormgate_lines_received_total",
        "Non-blank lines read from stations.",
        |m| m.lines_received.get() as i64,
    ),
    (
        "stormgate_bytes_received_total",
        "Bytes read from station sockets.",
        |m| m.bytes_received.get() as i64,
    ),
    (
        "stormgate_records_enqueued_total",
        "Metrics records put in the shard queue (dead letters are counted apart).",
        |m| m.records_enqueued.get() as i64,
    ),
    (
        "stormgate_records_produced_total",
        "Metrics records the sink handed to its producer.",
        |m| m.records_produced.get() as i64,
    ),
    (
        "stormgate_records_delivered_total",
        "Metrics records whose delivery was acknowledged.",
        |m| m.records_delivered.get() as i64,
    ),
    (
        "stormgate_records_failed_total",
        "Metrics records whose delivery finally failed.",
        |m| m.records_failed.get() as i64,
    ),
    (
        "stormgate_records_spilled_total",
        "Failed records written to the shard's spill file.",
        |m| m.records_spilled.get() as i64,
    ),
    (
        "stormgate_settle_errors_total",
        "Settlements of a record already settled or unknown: a bug, always 0.",
        |m| m.settle_errors.get() as i64,
    ),
    (
        "stormgate_spill_failures_total",
        "Failed records the spill file could not take either: lost.",
        |m| m.spill_failures.get() as i64,
    ),
    (
        "stormgate_dead_letters_enqueued_total",
        "Dead-letter records (rejected lines, KAFKA_DLQ_TOPIC) put in the shard queue.",
        |m| m.dead_letters_enqueued.get() as i64,
    ),
    (
        "stormgate_dead_letters_delivered_total",
        "Dead-letter records delivered.",
        |m| m.dead_letters_delivered.get() as i64,
    ),
    (
        "stormgate_dead_letters_failed_total",
        "Dead-letter records whose delivery finally failed.",
        |m| m.dead_letters_failed.get() as i64,
    ),
    (
        "stormgate_backpressure_waits_total",
        "Times a connection stopped reading because the queue or its in-flight cap was full.",
        |m| m.backpressure_waits.get() as i64,
    ),
    (
        "stormgate_rate_limited_waits_total",
        "Times a connection waited because it sent lines faster than TCP_MAX_LINES_PER_SEC.",
        |m| m.rate_limited_waits.get() as i64,
    ),
    (
        "stormgate_tls_handshakes_total",
        "TLS handshakes completed on the station listener.",
        |m| m.tls_handshakes.get() as i64,
    ),
    (
        "stormgate_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out; each closed its connection.",
        |m| m.tls_handshake_failures.get() as i64,
    ),
];

/// Gauges: `(name, help, read)`.
const SHARD_GAUGES: &[(&str, &str, ShardValue)] = &[
    (
        "stormgate_connections_active",
        "Station connections open now.",
        |m| m.connections_active.get(),
    ),
    (
        "stormgate_queue_depth",
        "Records waiting in the shard queue (refreshed every 20 ms).",
        |m| m.queue_depth.get(),
    ),
    (
        "stormgate_records_in_flight",
        "Records taken from stations and not yet settled: queue plus producer (every 20 ms).",
        |m| m.records_in_flight.get(),
    ),
    (
        "stormgate_producer_in_flight_records",
        "Records handed to the producer and not yet settled (in flight minus queue depth).",
        |m| (m.records_in_flight.get() - m.queue_depth.get()).max(0),
    ),
];

/// Writes every metric in the Prometheus text format 0.0.4.
pub fn render_metrics(state: &OpsState, out: &mut String) {
    let mut p = Prom { out };
    let shard_label: Vec<String> = state.shards.iter().map(|s| s.id.to_string()).collect();
    let shards = || state.metrics.iter().zip(&shard_label);

    for &(name, help, read) in SHARD_COUNTERS {
        p.family(name, "counter", help);
        for (m, shard) in shards() {
            p.sample(name, &[("shard", shard)], read(m));
        }
    }
    for &(name, help, read) in SHARD_GAUGES {
        p.family(name, "gauge", help);
        for (m, shard) in shards() {
            p.sample(name, &[("shard", shard)], read(m));
        }
    }
    let name = "stormgate_line_errors_total";
    p.family(
        name,
        "counter",
        "Rejected lines, by error code (docs/PROTOCOL.md).",
    );
    for (m, shard) in shards() {
        for code in ErrorCode::ALL {
            let n = m.line_errors[code as usize].get();
            p.sample(name, &[("shard", shard), ("code", code.as_str())], n);
        }
    }
    render_latency(&mut p, state, &shard_label);

    let totals = state.totals();
    p.gauge(
        "stormgate_unique_zipcodes",
        "Distinct zipcodes that identified since start, all shards (HyperLogLog estimate, ~1.6% error).",
        totals.unique_zipcodes(),
    );
    p.gauge(
        "stormgate_connections_limit",
        "Most station connections open at once, all shards (TCP_MAX_CONNECTIONS).",
        state.max_connections,
    );
    p.gauge("stormgate_shards", "Shards running.", state.shards.len());
    p.gauge(
        "stormgate_ready",
        "1 when /readyz answers 200, else 0.",
        u8::from(state.readiness().is_ok()),
    );
    if !state.producers.is_empty() {
        render_producers(&mut p, state);
    }
    if !state.buffers.is_empty() {
        render_buffers(&mut p, state);
    }
}

/// The disk buffer's families, per shard (`BUFFER_TYPE=disk` only).
fn render_buffers(p: &mut Prom<'_>, state: &OpsState) {
    type Read = fn(&LogStats) -> u64;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let gauges: [(&str, &str, Read); 4] = [
        (
            "stormgate_buffer_bytes",
            "Bytes the disk buffer's files occupy (segments at their preallocated size).",
            |b| b.disk_bytes.get().max(0) as u64,
        ),
        (
            "stormgate_buffer_records",
            "Records in the disk buffer not yet delivered.",
            |b| b.records.get().max(0) as u64,
        ),
        (
            "stormgate_buffer_segments",
            "Segment files in the disk buffer.",
            |b| b.segments.get().max(0) as u64,
        ),
        (
            "stormgate_buffer_storage_errno",
            "OS error code of the disk buffer's last storage error (28 ENOSPC, 5 EIO), 0 once writes succeed.",
            |b| b.last_storage_errno.get().max(0) as u64,
        ),
    ];
    let counters: [(&str, &str, Read); 12] = [
        (
            "stormgate_buffer_appended_records_total",
            "Records written to the disk buffer.",
            |b| b.appended_records.get(),
        ),
        (
            "stormgate_buffer_written_bytes_total",
            "Bytes written to the disk buffer's segment files.",
            |b| b.bytes_written.get(),
        ),
        (
            "stormgate_buffer_fsyncs_total",
            "fdatasync calls of the disk buffer.",
            |b| b.fsyncs.get(),
        ),
        (
            "stormgate_buffer_flushes_total",
            "Group commits of the disk buffer (writes and the fdatasync covering them).",
            |b| b.flushes.get(),
        ),
        (
            "stormgate_buffer_replayed_records_total",
            "Records the producer was fed from disk (not from memory): after an outage or a restart.",
            |b| b.read_disk_records.get(),
        ),
        (
            "stormgate_buffer_memory_records_total",
            "Records the producer was fed from memory.",
            |b| b.read_memory_records.get(),
        ),
        (
            "stormgate_buffer_quarantined_records_total",
            "Valid records lost to damage found in the disk buffer.",
            |b| b.quarantined_records.get(),
        ),
        (
            "stormgate_buffer_quarantined_segments_total",
            "Damaged segments moved aside to quarantine/.",
            |b| b.segments_quarantined.get(),
        ),
        (
            "stormgate_buffer_torn_tails_total",
            "Torn tails cut at start (the normal trace of a crash).",
            |b| b.torn_tails.get(),
        ),
        (
            "stormgate_buffer_full_events_total",
            "Appends refused because the buffer held BUFFER_MAX_BYTES.",
            |b| b.full_events.get(),
        ),
        (
            "stormgate_buffer_storage_errors_total",
            "Storage errors of the disk buffer (write, fdatasync, file creation, checkpoint).",
            |b| b.storage_errors.get(),
        ),
        (
            "stormgate_buffer_checkpoints_total",
            "Delivered watermarks made durable.",
            |b| b.checkpoints.get(),
        ),
    ];
    let shards: Vec<String> = (0..state.buffers.len()).map(|i| i.to_string()).collect();
    for (name, help, read) in gauges {
        p.family(name, "gauge", help);
        for (b, shard) in state.buffers.iter().zip(&shards) {
            p.sample(name, &[("shard", shard)], read(b));
        }
    }
    let name = "stormgate_buffer_oldest_record_age_seconds";
    p.family(
        name,
        "gauge",
        "Age of the oldest record in the disk buffer not yet delivered, 0 if none.",
    );
    for (b, shard) in state.buffers.iter().zip(&shards) {
        let oldest = b.oldest_timestamp_ms.get();
        let age = if oldest > 0 {
            (now_ms - oldest).max(0) as f64 / 1e3
        } else {
            0.0
        };
        p.sample(name, &[("shard", shard)], age);
    }
    for (name, help, read) in counters {
        p.family(name, "counter", help);
        for (b, shard) in state.buffers.iter().zip(&shards) {
            p.sample(name, &[("shard", shard)], read(b));
        }
    }
    type Hist = fn(&LogStats) -> &stormgate_telemetry::LatencyHistogram;
    let histograms: [(&str, &str, Hist); 2] = [
        (
            "stormgate_buffer_fsync_seconds",
            "Duration of each fdatasync of a disk buffer segment.",
            |b| &b.fsync_latency,
        ),
        (
            "stormgate_buffer_durable_seconds",
            "Append to durable: the group-commit wait plus the flush, per flush's oldest record.",
            |b| &b.durable_latency,
        ),
    ];
    for (name, help, read) in histograms {
        let shards = state.buffers.iter().zip(&shards);
        p.histogram(
            name,
            help,
            shards.map(|(b, shard)| (shard.as_str(), read(b).snapshot())),
        );
    }
}

fn render_latency(p: &mut Prom<'_>, state: &OpsState, shard_label: &[String]) {
    let shards = state.metrics.iter().zip(shard_label);
    p.histogram(
        "stormgate_delivery_latency_seconds",
        "Line read to settlement (delivered or failed), per metrics record.",
        shards.map(|(m, shard)| (shard.as_str(), m.delivery_latency.snapshot())),
    );
}

fn render_producers(p: &mut Prom<'_>, state: &OpsState) {
    let stats: Vec<(String, ProducerStatsSnapshot)> = state
        .producers
        .iter()
        .map(|s| s.snapshot())
        .map(|s| (s.shard_id.to_string(), s))
        .collect();
    type Read = fn(&ProducerStatsSnapshot) -> f64;
    let families: [(&str, &str, &str, Read); 6] = [
        (
            "stormgate_kafka_broker_rtt_seconds",
            "gauge",
            "Mean broker round-trip time over the last statistics interval with requests.",
            |s| s.rtt_avg.as_secs_f64(),
        ),
        (
            "stormgate_kafka_tx_bytes_total",
            "counter",
            "Bytes the producer sent to brokers (librdkafka tx_bytes).",
            |s| s.tx_bytes as f64,
        ),
        (
            "stormgate_kafka_tx_retries_total",
            "counter",
            "Requests the producer sent again (librdkafka txretries, all brokers).",
            |s| s.tx_retries as f64,
        ),
        (
            "stormgate_kafka_producer_queue_records",
            "gauge",
            "Records in librdkafka's queues, not yet acknowledged (msg_cnt).",
            |s| s.queue_records as f64,
        ),
        (
            "stormgate_kafka_producer_queue_bytes",
            "gauge",
            "Bytes of those records (msg_size).",
            |s| s.queue_bytes as f64,
        ),
        (
            "stormgate_kafka_statistics_age_seconds",
            "gauge",
            "Time since the producer's last statistics report (-1 before the first).",
            |s| s.age.map_or(-1.0, |a| a.as_secs_f64()),
        ),
    ];
    for (name, kind, help, read) in families {
        p.family(name, kind, help);
        for (shard, s) in &stats {
            p.sample(name, &[("shard", shard)], read(s));
        }
    }
    let name = "stormgate_kafka_brokers";
    p.family(
        name,
        "gauge",
        "Brokers the producer knows, by connection state: up (usable) or down (any other).",
    );
    for (shard, s) in &stats {
        p.sample(name, &[("shard", shard), ("state", "up")], s.brokers_up);
        p.sample(name, &[("shard", shard), ("state", "down")], s.brokers_down);
    }
}

/// Writes the text format: HELP and TYPE once per family, then its samples.
struct Prom<'a> {
    out: &'a mut String,
}

impl Prom<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A histogram family in seconds from microsecond histograms, one per shard: the
    /// buckets of [`LATENCY_BUCKETS_SECONDS`], `+Inf`, `_sum` and `_count`, each shard's from
    /// one copy so that they never disagree.
    fn histogram<'s>(
        &mut self,
        name: &str,
        help: &str,
        shards: impl Iterator<Item = (&'s str, HistogramSnapshot)>,
    ) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (shard, h) in shards {
            for le in LATENCY_BUCKETS_SECONDS {
                let n = h.count_at_most((le * 1e6) as u64);
                self.sample(&bucket, &[("shard", shard), ("le", &le.to_string())], n);
            }
            let count = h.count_at_most(u64::MAX);
            self.sample(&bucket, &[("shard", shard), ("le", "+Inf")], count);
            let sum = h.sum_micros() as f64 / 1e6;
            self.sample(&format!("{name}_sum"), &[("shard", shard)], sum);
            self.sample(&format!("{name}_count"), &[("shard", shard)], count);
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::ready::tests::{UP, producer};
    use super::super::tests::state;
    use super::*;

    /// Parses the text format into `sample -> value`, checking the format's rules on the way:
    /// every sample belongs to a family announced by HELP and TYPE, in that order, once.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut families: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        let mut help = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!families.contains_key(name), "{name} announced twice");
                help = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(help.as_deref(), Some(name), "TYPE without HELP: {line}");
                assert!(name.starts_with("stormgate_"), "{name}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
                families.insert(name.to_owned(), kind.to_owned());
            } else {
                let (sample, value) = line.rsplit_once(' ').unwrap();
                let name = sample.split('{').next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|f| families.get(*f).is_some_and(|k| k == "histogram"))
                    .unwrap_or(name);
                assert!(families.contains_key(family), "sample without TYPE: {line}");
                let v = if value == "+Inf" {
                    f64::INFINITY
                } else {
                    value.parse().unwrap()
                };
                assert!(samples.insert(sample.to_owned(), v).is_none(), "{line}");
            }
        }
        samples
    }

    #[test]
    fn metrics_are_valid_text_format_and_read_the_shards() {
        let (state, m) = state(Vec::new());
        m[0].lines_received.add(7);
        m[1].lines_received.add(5);
        m[1].line_error(ErrorCode::MalformedJson);
        m[0].connections_active.add(3);
        m[0].records_in_flight.set(10);
        m[0].queue_depth.set(4);
        m[0].zipcodes.insert(b"12345");
        m[1].zipcodes.insert(b"12345");
        m[1].zipcodes.insert(b"54321");
        for us in [200, 800, 3_000, 2_000_000] {
            m[1].delivery_latency.record_micros(us);
        }
        let mut text = String::new();
        render_metrics(&state, &mut text);
        let s = parse(&text);
        assert_eq!(s[r#"stormgate_lines_received_total{shard="0"}"#], 7.0);
        assert_eq!(s[r#"stormgate_lines_received_total{shard="1"}"#], 5.0);
        assert_eq!(
            s[r#"stormgate_line_errors_total{shard="1",code="malformed_json"}"#],
            1.0
        );
        assert_eq!(
            s[r#"stormgate_line_errors_total{shard="0",code="malformed_json"}"#],
            0.0
        );
        assert_eq!(s[r#"stormgate_connections_active{shard="0"}"#], 3.0);
        assert_eq!(s[r#"stormgate_producer_in_flight_records{shard="0"}"#], 6.0);
        assert_eq!(s["stormgate_unique_zipcodes"], 2.0);
        assert_eq!(s["stormgate_ready"], 1.0);
        let bucket = |shard: u8, le: &str| {
            s[&format!(r#"stormgate_delivery_latency_seconds_bucket{{shard="{shard}",le="{le}"}}"#)]
        };
        assert_eq!(bucket(1, "0.0005"), 1.0);
        assert_eq!(bucket(1, "0.001"), 2.0);
        assert_eq!(bucket(1, "0.005"), 3.0);
        assert_eq!(bucket(1, "1"), 3.0);
        assert_eq!(bucket(1, "2.5"), 4.0);
        assert_eq!(bucket(1, "+Inf"), 4.0);
        assert_eq!(bucket(0, "+Inf"), 0.0);
        assert_eq!(
            s[r#"stormgate_delivery_latency_seconds_count{shard="1"}"#],
            4.0
        );
        let sum = s[r#"stormgate_delivery_latency_seconds_sum{shard="1"}"#];
        assert!((sum - 2.004).abs() < 1e-9, "{sum}");
        assert!(
            !text.contains("stormgate_kafka_"),
            "no producers, no kafka metrics"
        );
    }

    #[test]
    fn buckets_are_cumulative() {
        let (state, m) = state(Vec::new());
        for us in (0..5_000_000).step_by(997) {
            m[0].delivery_latency.record_micros(us);
        }
        let mut text = String::new();
        render_metrics(&state, &mut text);
        let s = parse(&text);
        let mut last = 0.0;
        for le in LATENCY_BUCKETS_SECONDS {
            let n =
                s[&format!(r#"stormgate_delivery_latency_seconds_bucket{{shard="0",le="{le}"}}"#)];
            assert!(n >= last, "le {le}: {n} < {last}");
            last = n;
        }
    }

    #[test]
    fn kafka_metrics_come_from_producer_statistics() {
        let (s, _) = state(vec![producer(0, Some(UP)), producer(1, None)]);
        let mut text = String::new();
        render_metrics(&s, &mut text);
        let m = parse(&text);
        assert_eq!(
            m[r#"stormgate_kafka_broker_rtt_seconds{shard="0"}"#],
            0.0025
        );
        assert_eq!(m[r#"stormgate_kafka_tx_bytes_total{shard="0"}"#], 1000.0);
        assert_eq!(m[r#"stormgate_kafka_tx_retries_total{shard="0"}"#], 1.0);
        assert_eq!(
            m[r#"stormgate_kafka_producer_queue_records{shard="0"}"#],
            3.0
        );
        assert_eq!(m[r#"stormgate_kafka_brokers{shard="0",state="up"}"#], 1.0);
        assert_eq!(m[r#"stormgate_kafka_brokers{shard="1",state="up"}"#], 0.0);
        assert_eq!(
            m[r#"stormgate_kafka_statistics_age_seconds{shard="1"}"#],
            -1.0
        );
        assert_eq!(m["stormgate_ready"], 0.0);
    }
}
