//! `/metrics`: every metric, read from the shards' atomics at scrape time and encoded by
//! prometheus-client, as the Prometheus text format 0.0.4 or, when the scraper asks for it,
//! OpenMetrics 1.0.0 ([`Format::negotiate`]).
//!
//! Nothing here keeps a copy of a value: [`OpsCollector`] is a prometheus-client
//! [`Collector`] that reads each shard's [`ShardMetrics`], disk buffer [`LogStats`] and
//! producer statistics while the registry encodes it. prometheus-client's own metric types
//! (`Counter`, `Family`, `Histogram`) would each hold a second copy, updated by the shards on
//! their hot path or copied at every scrape; the collector writes our single-writer atomics
//! and fixed-bucket histograms straight into its encoders instead.
//!
//! Names, help and types come from the catalogue: the shard metrics' declarations in
//! `stormgate-telemetry` ([`SHARD_SCALARS`] and the descriptors beside it) and, for what the
//! process, the disk buffer and the producers report, the tables below. [`catalogue`] lists
//! them all; docs/OBSERVABILITY.md is checked against it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, MetricEncoder, NoLabelSet, text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Registry;
use stormgate_buffer::LogStats;
use stormgate_kafka::sink::ProducerStatsSnapshot;
use stormgate_protocol::ErrorCode;
use stormgate_telemetry::{
    DELIVERY_LATENCY, DURABLE_LATENCY, HEARTBEAT_AGE, HistogramSnapshot, LINE_ERRORS,
    LatencyHistogram, MetricDesc, MetricKind, PRODUCER_IN_FLIGHT_RECORDS, Pulse, SHARD_SCALARS,
    ShardRead, UNIQUE_ZIPCODES, shard_catalogue,
};

use super::OpsState;

/// Upper bounds of the delivery-latency histogram's buckets, in seconds. The shard histogram
/// behind them has 6.25% resolution, so a bucket may miss values in the last 6.25% below
/// its bound (they are counted in the next one).
pub const LATENCY_BUCKETS_SECONDS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

const SHARD: &[&str] = &["shard"];

const fn desc(
    kind: MetricKind,
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDesc {
    MetricDesc {
        name,
        help,
        kind,
        labels,
    }
}

/// `stormgate_connections_limit`.
pub const CONNECTIONS_LIMIT: MetricDesc = desc(
    MetricKind::Gauge,
    "stormgate_connections_limit",
    &[],
    "Most station connections open at once, all shards (TCP_MAX_CONNECTIONS).",
);
/// `stormgate_shards`.
pub const SHARDS: MetricDesc = desc(
    MetricKind::Gauge,
    "stormgate_shards",
    &[],
    "Shards running.",
);
/// `stormgate_ready`.
pub const READY: MetricDesc = desc(
    MetricKind::Gauge,
    "stormgate_ready",
    &[],
    "1 when /readyz answers 200, else 0.",
);

/// The Kafka producer's families (Kafka sink only), from librdkafka's statistics.
const KAFKA: [(MetricDesc, KafkaRead); 6] = [
    (
        desc(
            MetricKind::Gauge,
            "stormgate_kafka_broker_rtt_seconds",
            SHARD,
            "Mean broker round-trip time over the last statistics interval with requests.",
        ),
        KafkaRead::Seconds(|s| s.rtt_avg.as_secs_f64()),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_kafka_tx_bytes_total",
            SHARD,
            "Bytes the producer sent to brokers (librdkafka tx_bytes).",
        ),
        KafkaRead::Count(|s| s.tx_bytes),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_kafka_tx_retries_total",
            SHARD,
            "Requests the producer sent again (librdkafka txretries, all brokers).",
        ),
        KafkaRead::Count(|s| s.tx_retries),
    ),
    (
        desc(
            MetricKind::Gauge,
            "stormgate_kafka_producer_queue_records",
            SHARD,
            "Records in librdkafka's queues, not yet acknowledged (msg_cnt).",
        ),
        KafkaRead::Count(|s| s.queue_records),
    ),
    (
        desc(
            MetricKind::Gauge,
            "stormgate_kafka_producer_queue_bytes",
            SHARD,
            "Bytes of those records (msg_size).",
        ),
        KafkaRead::Count(|s| s.queue_bytes),
    ),
    (
        desc(
            MetricKind::Gauge,
            "stormgate_kafka_statistics_age_seconds",
            SHARD,
            "Time since the producer's last statistics report (-1 before the first).",
        ),
        KafkaRead::Seconds(|s| s.age.map_or(-1.0, |a| a.as_secs_f64())),
    ),
];

/// `stormgate_kafka_brokers`, by `state`.
const KAFKA_BROKERS: MetricDesc = desc(
    MetricKind::Gauge,
    "stormgate_kafka_brokers",
    &["shard", "state"],
    "Brokers the producer knows, by connection state: up (usable) or down (any other).",
);

/// How a Kafka family reads a producer's statistics.
#[derive(Clone, Copy)]
enum KafkaRead {
    Count(fn(&ProducerStatsSnapshot) -> u64),
    Seconds(fn(&ProducerStatsSnapshot) -> f64),
}

type BufferGauge = fn(&LogStats) -> i64;
type BufferCounter = fn(&LogStats) -> u64;
type BufferHistogram = fn(&LogStats) -> &LatencyHistogram;

/// The disk buffer's gauges (`BUFFER_TYPE=disk` only).
const BUFFER_GAUGES: [(MetricDesc, BufferGauge); 4] = [
    (
        desc(
            MetricKind::Gauge,
            "stormgate_buffer_bytes",
            SHARD,
            "Bytes the disk buffer's files occupy (segments at their preallocated size).",
        ),
        |b| b.disk_bytes.get().max(0),
    ),
    (
        desc(
            MetricKind::Gauge,
            "stormgate_buffer_records",
            SHARD,
            "Records in the disk buffer not yet delivered.",
        ),
        |b| b.records.get().max(0),
    ),
    (
        desc(
            MetricKind::Gauge,
            "stormgate_buffer_segments",
            SHARD,
            "Segment files in the disk buffer.",
        ),
        |b| b.segments.get().max(0),
    ),
    (
        desc(
            MetricKind::Gauge,
            "stormgate_buffer_storage_errno",
            SHARD,
            "OS error code of the disk buffer's last storage error (28 ENOSPC, 5 EIO), 0 once writes succeed.",
        ),
        |b| b.last_storage_errno.get().max(0),
    ),
];

/// `stormgate_buffer_oldest_record_age_seconds`.
const BUFFER_OLDEST_AGE: MetricDesc = desc(
    MetricKind::Gauge,
    "stormgate_buffer_oldest_record_age_seconds",
    SHARD,
    "Age of the oldest record in the disk buffer not yet delivered, 0 if none.",
);

/// The disk buffer's counters.
const BUFFER_COUNTERS: [(MetricDesc, BufferCounter); 12] = [
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_appended_records_total",
            SHARD,
            "Records written to the disk buffer.",
        ),
        |b| b.appended_records.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_written_bytes_total",
            SHARD,
            "Bytes written to the disk buffer's segment files.",
        ),
        |b| b.bytes_written.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_fsyncs_total",
            SHARD,
            "fdatasync calls of the disk buffer.",
        ),
        |b| b.fsyncs.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_flushes_total",
            SHARD,
            "Group commits of the disk buffer (writes and the fdatasync covering them).",
        ),
        |b| b.flushes.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_replayed_records_total",
            SHARD,
            "Records the producer was fed from disk (not from memory): after an outage or a restart.",
        ),
        |b| b.read_disk_records.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_memory_records_total",
            SHARD,
            "Records the producer was fed from memory.",
        ),
        |b| b.read_memory_records.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_quarantined_records_total",
            SHARD,
            "Valid records lost to damage found in the disk buffer.",
        ),
        |b| b.quarantined_records.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_quarantined_segments_total",
            SHARD,
            "Damaged segments moved aside to quarantine/.",
        ),
        |b| b.segments_quarantined.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_torn_tails_total",
            SHARD,
            "Torn tails cut at start (the normal trace of a crash).",
        ),
        |b| b.torn_tails.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_full_events_total",
            SHARD,
            "Appends refused because the buffer held BUFFER_MAX_BYTES.",
        ),
        |b| b.full_events.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_storage_errors_total",
            SHARD,
            "Storage errors of the disk buffer (write, fdatasync, file creation, checkpoint).",
        ),
        |b| b.storage_errors.get(),
    ),
    (
        desc(
            MetricKind::Counter,
            "stormgate_buffer_checkpoints_total",
            SHARD,
            "Delivered watermarks made durable.",
        ),
        |b| b.checkpoints.get(),
    ),
];

/// The disk buffer's histograms.
const BUFFER_HISTOGRAMS: [(MetricDesc, BufferHistogram); 4] = [
    (
        desc(
            MetricKind::Histogram,
            "stormgate_buffer_fsync_seconds",
            SHARD,
            "Duration of each fdatasync of a disk buffer segment.",
        ),
        |b| &b.fsync_latency,
    ),
    (
        desc(
            MetricKind::Histogram,
            "stormgate_buffer_durable_seconds",
            SHARD,
            "Append to durable: the group-commit wait plus the flush, per flush's oldest record.",
        ),
        |b| &b.durable_latency,
    ),
    (
        desc(
            MetricKind::Histogram,
            "stormgate_buffer_flush_wait_seconds",
            SHARD,
            "Append to the flush's first write, per flush's oldest record: the group-commit window, a wait for a segment file, executor delays.",
        ),
        |b| &b.flush_wait_latency,
    ),
    (
        desc(
            MetricKind::Histogram,
            "stormgate_buffer_write_seconds",
            SHARD,
            "Duration of each flush's writes, from the first submitted to the last completed.",
        ),
        |b| &b.write_latency,
    ),
];

/// Every metric `/metrics` can serve, in the order it serves them (the Kafka and disk-buffer
/// families only with those configured).
pub fn catalogue() -> impl Iterator<Item = &'static MetricDesc> {
    shard_catalogue()
        .chain([&CONNECTIONS_LIMIT, &SHARDS, &READY])
        .chain(KAFKA.iter().map(|(d, _)| d))
        .chain([&KAFKA_BROKERS])
        .chain(BUFFER_GAUGES.iter().map(|(d, _)| d))
        .chain([&BUFFER_OLDEST_AGE])
        .chain(BUFFER_COUNTERS.iter().map(|(d, _)| d))
        .chain(BUFFER_HISTOGRAMS.iter().map(|(d, _)| d))
}

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4: the default, and what the endpoint always served.
    Prometheus,
    /// OpenMetrics 1.0.0 text: counter families named without `_total`, ends in `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it accepts
    /// `application/openmetrics-text` at least as much (by `q`) as `text/plain` or a
    /// wildcard, otherwise the text format 0.0.4 (also without the header).
    ///
    /// Written here rather than taken from a crate: two media types and their `q` values,
    /// as Prometheus sends them (`application/openmetrics-text;version=1.0.0,...;q=0.5`).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut text) = (0.0_f64, 0.0_f64);
        for range in accept.unwrap_or("").split(',') {
            let mut params = range.split(';');
            let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = params
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A registry holding one [`OpsCollector`] over `state`: built once, encoded per scrape.
pub fn registry(state: Arc<OpsState>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(OpsCollector(state)));
    registry
}

/// Every metric of `registry` in `format`.
pub fn render(registry: &Registry, format: Format) -> Result<String, fmt::Error> {
    let mut body = String::with_capacity(16 * 1024);
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut body, registry)?;
        }
        Format::OpenMetrics => text::encode(&mut body, registry)?,
    }
    Ok(body)
}

/// Every metric of `state` in `format` (a registry built for the one call).
pub fn render_metrics(state: &Arc<OpsState>, format: Format) -> Result<String, fmt::Error> {
    render(&registry(Arc::clone(state)), format)
}

/// Reads the process's instruments while the registry encodes (see the module's doc).
struct OpsCollector(Arc<OpsState>);

impl fmt::Debug for OpsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpsCollector").finish_non_exhaustive()
    }
}

impl Collector for OpsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let state = &*self.0;
        let enc = &mut encoder;
        let labels: Vec<String> = state.shards.iter().map(|s| s.id.to_string()).collect();
        let shards = || state.metrics.iter().zip(&labels);
        for s in SHARD_SCALARS {
            match s.read {
                ShardRead::Counter(read) => {
                    per_shard(
                        enc,
                        &s.desc,
                        shards().map(|(m, l)| (l, read(m).get())),
                        counter,
                    )?;
                }
                ShardRead::Gauge(read) => {
                    per_shard(
                        enc,
                        &s.desc,
                        shards().map(|(m, l)| (l, read(m).get())),
                        gauge,
                    )?;
                }
            }
        }
        let in_flight = shards().map(|(m, l)| (l, m.producer_in_flight_records()));
        per_shard(enc, &PRODUCER_IN_FLIGHT_RECORDS, in_flight, gauge)?;
        let mut errors = family(enc, &LINE_ERRORS)?;
        for (m, shard) in shards() {
            for code in ErrorCode::ALL {
                let series = [("shard", shard.as_str()), ("code", code.as_str())];
                counter(
                    &mut errors.encode_family(&series)?,
                    m.line_errors[code as usize].get(),
                )?;
            }
        }
        let latency = shards().map(|(m, l)| (l, m.delivery_latency.snapshot()));
        per_shard(enc, &DELIVERY_LATENCY, latency, histogram)?;
        let durable = shards().map(|(m, l)| (l, m.durable_latency.snapshot()));
        per_shard(enc, &DURABLE_LATENCY, durable, histogram)?;

        let unique_zipcodes = state.totals().unique_zipcodes();
        gauge(&mut family(enc, &UNIQUE_ZIPCODES)?, unique_zipcodes)?;
        let now = Instant::now();
        // A series per shard that runs: none before its first tick or once it ended.
        let heartbeats = shards().filter_map(|(m, l)| match m.heartbeat.pulse(now) {
            Pulse::Since(age) => Some((l, age.as_secs_f64())),
            Pulse::NotStarted | Pulse::Finished => None,
        });
        per_shard(enc, &HEARTBEAT_AGE, heartbeats, gauge)?;
        gauge(&mut family(enc, &CONNECTIONS_LIMIT)?, state.max_connections)?;
        gauge(&mut family(enc, &SHARDS)?, state.shards.len())?;
        let ready = u32::from(state.readiness().is_ok());
        gauge(&mut family(enc, &READY)?, ready)?;
        if !state.producers.is_empty() {
            encode_producers(enc, state)?;
        }
        if !state.buffers.is_empty() {
            encode_buffers(enc, state)?;
        }
        Ok(())
    }
}

/// The Kafka producers' families, per shard.
fn encode_producers(enc: &mut DescriptorEncoder<'_>, state: &OpsState) -> fmt::Result {
    let stats: Vec<(String, ProducerStatsSnapshot)> = state
        .producers
        .iter()
        .map(|p| p.snapshot())
        .map(|s| (s.shard_id.to_string(), s))
        .collect();
    for (d, read) in &KAFKA {
        match (d.kind, read) {
            (MetricKind::Counter, KafkaRead::Count(read)) => {
                per_shard(enc, d, stats.iter().map(|(l, s)| (l, read(s))), counter)?;
            }
            (_, KafkaRead::Count(read)) => {
                per_shard(enc, d, stats.iter().map(|(l, s)| (l, read(s))), gauge)?;
            }
            (_, KafkaRead::Seconds(read)) => {
                per_shard(enc, d, stats.iter().map(|(l, s)| (l, read(s))), gauge)?;
            }
        }
    }
    let mut brokers = family(enc, &KAFKA_BROKERS)?;
    for (shard, s) in &stats {
        for (state, n) in [("up", s.brokers_up), ("down", s.brokers_down)] {
            let series = [("shard", shard.as_str()), ("state", state)];
            gauge(&mut brokers.encode_family(&series)?, n)?;
        }
    }
    Ok(())
}

/// The disk buffer's families, per shard (`BUFFER_TYPE=disk` only).
fn encode_buffers(enc: &mut DescriptorEncoder<'_>, state: &OpsState) -> fmt::Result {
    let labels: Vec<String> = (0..state.buffers.len()).map(|i| i.to_string()).collect();
    let buffers = || state.buffers.iter().zip(&labels);
    for (d, read) in &BUFFER_GAUGES {
        per_shard(enc, d, buffers().map(|(b, l)| (l, read(b))), gauge)?;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let ages = buffers().map(|(b, l)| {
        let oldest = b.oldest_timestamp_ms.get();
        let age = if oldest > 0 {
            (now_ms - oldest).max(0) as f64 / 1e3
        } else {
            0.0
        };
        (l, age)
    });
    per_shard(enc, &BUFFER_OLDEST_AGE, ages, gauge)?;
    for (d, read) in &BUFFER_COUNTERS {
        per_shard(enc, d, buffers().map(|(b, l)| (l, read(b))), counter)?;
    }
    for (d, read) in &BUFFER_HISTOGRAMS {
        let snapshots = buffers().map(|(b, l)| (l, read(b).snapshot()));
        per_shard(enc, d, snapshots, histogram)?;
    }
    Ok(())
}

/// Starts the family `d`: its `HELP` and `TYPE`. prometheus-client appends a counter's
/// `_total` itself (and OpenMetrics names the family without it), so it is taken off here.
fn family<'s>(
    enc: &'s mut DescriptorEncoder<'_>,
    d: &'static MetricDesc,
) -> Result<MetricEncoder<'s>, fmt::Error> {
    let (name, kind) = match d.kind {
        MetricKind::Counter => (
            d.name.strip_suffix("_total").unwrap_or(d.name),
            MetricType::Counter,
        ),
        MetricKind::Gauge => (d.name, MetricType::Gauge),
        MetricKind::Histogram => (d.name, MetricType::Histogram),
    };
    enc.encode_descriptor(name, d.help, None, kind)
}

/// The family `d`, one series per shard labelled `shard`, each value written by `write`.
fn per_shard<'a, V>(
    enc: &mut DescriptorEncoder<'_>,
    d: &'static MetricDesc,
    series: impl Iterator<Item = (&'a String, V)>,
    write: fn(&mut MetricEncoder<'_>, V) -> fmt::Result,
) -> fmt::Result {
    debug_assert_eq!(d.labels, SHARD, "{}", d.name);
    let mut family = family(enc, d)?;
    for (shard, value) in series {
        write(
            &mut family.encode_family(&[("shard", shard.as_str())])?,
            value,
        )?;
    }
    Ok(())
}

fn counter(m: &mut MetricEncoder<'_>, value: u64) -> fmt::Result {
    m.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge<V: EncodeGaugeValue>(m: &mut MetricEncoder<'_>, value: V) -> fmt::Result {
    m.encode_gauge(&value)
}

/// A microsecond histogram in seconds, in the buckets of [`LATENCY_BUCKETS_SECONDS`] (and
/// `+Inf`), from one snapshot so that buckets, `_sum` and `_count` never disagree.
/// prometheus-client takes each bucket's own count and adds them up itself.
fn histogram(m: &mut MetricEncoder<'_>, h: HistogramSnapshot) -> fmt::Result {
    let mut buckets = [(0.0, 0); LATENCY_BUCKETS_SECONDS.len()];
    let mut below = 0;
    for (bucket, le) in buckets.iter_mut().zip(LATENCY_BUCKETS_SECONDS) {
        let at_most = h.count_at_most((le * 1e6) as u64);
        *bucket = (le, at_most.saturating_sub(below));
        below = below.max(at_most);
    }
    let count = h.count_at_most(u64::MAX);
    let sum = h.sum_micros() as f64 / 1e6;
    m.encode_histogram::<NoLabelSet>(
        sum,
        count,
        &buckets,
        None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
    )
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
        m[1].line_error(ErrorCode::MalformedJson as usize);
        m[0].connections_active.add(3);
        m[0].records_in_flight.set(10);
        m[0].queue_depth.set(4);
        m[0].zipcodes.insert(b"12345");
        m[1].zipcodes.insert(b"12345");
        m[1].zipcodes.insert(b"54321");
        for us in [200, 800, 3_000, 2_000_000] {
            m[1].delivery_latency.record_micros(us);
        }
        let text = render_metrics(&Arc::new(state), Format::Prometheus).unwrap();
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
        let text = render_metrics(&Arc::new(state), Format::Prometheus).unwrap();
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
        let text = render_metrics(&Arc::new(s), Format::Prometheus).unwrap();
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

    /// `(family, type)` from each `# TYPE` line, in order.
    fn families(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|t| t.split_once(' ').unwrap())
            .map(|(n, k)| (n.to_owned(), k.to_owned()))
            .collect()
    }

    #[test]
    fn every_catalogued_metric_is_served_as_catalogued() {
        let (s, _) = state(vec![producer(0, Some(UP)), producer(1, None)]);
        let s = Arc::new(s.with_buffers(vec![Arc::default(), Arc::default()]));
        let served = families(&render_metrics(&s, Format::Prometheus).unwrap());
        let catalogued: Vec<(String, String)> = catalogue()
            .map(|d| (d.name.to_owned(), d.kind.as_str().to_owned()))
            .collect();
        assert_eq!(served, catalogued);
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_in_eof() {
        let (s, m) = state(Vec::new());
        m[0].lines_received.add(7);
        m[1].delivery_latency.record_micros(3_000);
        let s = Arc::new(s);
        let text = render_metrics(&s, Format::OpenMetrics).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE stormgate_lines_received counter\n"),
            "{text}"
        );
        assert!(
            text.contains("\nstormgate_lines_received_total{shard=\"0\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE stormgate_connections_active gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("stormgate_delivery_latency_seconds_count{shard=\"1\"} 1\n"),
            "{text}"
        );
        let prometheus = families(&render_metrics(&s, Format::Prometheus).unwrap());
        let openmetrics = families(&text);
        assert_eq!(prometheus.len(), openmetrics.len());
        for ((p, pk), (o, ok)) in prometheus.iter().zip(&openmetrics) {
            assert_eq!(pk, ok);
            let want = if pk == "counter" {
                p.strip_suffix("_total").unwrap()
            } else {
                p
            };
            assert_eq!(o, want);
        }
    }

    #[test]
    fn the_format_follows_accept() {
        use Format::{OpenMetrics, Prometheus};
        for (accept, want) in [
            (None, Prometheus),
            (Some(""), Prometheus),
            (Some("*/*"), Prometheus),
            (Some("text/plain; version=0.0.4"), Prometheus),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("text/plain;version=0.0.4,application/openmetrics-text;q=0.5"),
                Prometheus,
            ),
            (Some("application/openmetrics-text;q=0"), Prometheus),
            (
                Some("Application/OpenMetrics-Text; q=0.9, */*;q=0.1"),
                OpenMetrics,
            ),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }
}
