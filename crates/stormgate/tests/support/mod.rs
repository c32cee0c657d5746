//! Helpers shared by the end-to-end tests that need the server itself (`stormgate::app`), the
//! Kafka reader (`stormgate_kafka::verify`) or its log; the rest is in `stormgate-testkit`.

#![allow(dead_code)]

pub mod process;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use stormgate::app::App;
use stormgate::cli::Cli;
use stormgate_testkit::wait_for;

/// A topic name no other test uses, created with 6 partitions.
pub fn fresh_topic(brokers: &str, prefix: &str) -> String {
    let topic = format!("{prefix}-{}", uuid::Uuid::now_v7().simple());
    stormgate_kafka::verify::create_topic(brokers, &topic, 6).expect("create topic");
    topic
}

/// Starts Stormgate in this process on 127.0.0.1:0 with two shards (unless `extra` says
/// `--shards`) and the given extra flags. Spill files go to a fresh temporary directory
/// unless `extra` names one.
pub fn start(extra: &[&str]) -> App {
    let mut args = vec![
        "stormgate",
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    if !extra.contains(&"--shards") {
        args.extend_from_slice(&["--shards", "2"]);
    }
    args.extend_from_slice(extra);
    let spill_dir;
    if !extra.contains(&"--spill-dir") {
        spill_dir = std::env::temp_dir()
            .join(format!("stormgate-test-spill-{}", uuid::Uuid::now_v7()))
            .to_string_lossy()
            .into_owned();
        args.extend_from_slice(&["--spill-dir", &spill_dir]);
    }
    let cli = Cli::try_parse_from(args).expect("valid flags");
    stormgate::app::start(&cli).expect("server starts")
}

/// A consumed record, parsed.
#[derive(Debug, Clone)]
pub struct Out {
    pub partition: i32,
    pub key: String,
    pub value: serde_json::Value,
    pub timestamp_ms: Option<i64>,
}

/// Reads every record of `topic` from offset 0 to the end of each partition, and checks that
/// the read is exactly what the broker holds (one record per offset between each partition's
/// watermarks, none twice) and exactly `expected` records. Anything else fails the test: a
/// short read, a duplicate, a gap.
pub fn consume(brokers: &str, topic: &str, expected: usize) -> Vec<Out> {
    let records = consume_all(brokers, topic, expected);
    if records.len() != expected {
        let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
        for r in &records {
            *per_partition.entry(r.partition).or_default() += 1;
        }
        panic!(
            "{topic}: read {} records, expected {expected}; records per partition: \
             {per_partition:?}",
            records.len()
        );
    }
    records
}

/// Reads `topic` as [`consume`] does, to the end and once it holds at least `at_least`
/// records, checking that the read is exactly the broker's content; returns however many
/// there are, for the caller to judge.
pub fn consume_all(brokers: &str, topic: &str, at_least: usize) -> Vec<Out> {
    let t0 = Instant::now();
    let records =
        stormgate_kafka::verify::read_topic(brokers, topic, at_least, Duration::from_secs(60))
            .expect("read topic");
    eprintln!(
        "consumed {} records (at least {at_least} wanted) from {topic} in {:?}",
        records.len(),
        t0.elapsed()
    );
    let marks = stormgate_kafka::verify::watermarks(brokers, topic, &[]).expect("watermarks");
    let errors = stormgate_kafka::verify::offset_errors(
        records.iter().map(|r| (r.partition, r.offset)),
        &marks,
    );
    assert!(
        errors.is_empty(),
        "{topic}: the read is not the broker's content: {errors:?}; watermarks {marks:?}"
    );
    records
        .into_iter()
        .map(|r| Out {
            partition: r.partition,
            key: String::from_utf8(r.key.expect("every record has a key")).expect("utf-8 key"),
            value: serde_json::from_slice(&r.value.expect("every record has a value"))
                .expect("JSON value"),
            timestamp_ms: r.timestamp_ms,
        })
        .collect()
}

/// Groups records by key, in consumption order (which is offset order within a partition).
pub fn by_key(records: &[Out]) -> BTreeMap<String, Vec<&Out>> {
    let mut map: BTreeMap<String, Vec<&Out>> = BTreeMap::new();
    for r in records {
        map.entry(r.key.clone()).or_default().push(r);
    }
    map
}

/// Partition count of `topic`, from the broker's metadata.
pub fn partitions_of(brokers: &str, topic: &str) -> usize {
    stormgate_kafka::verify::watermarks(brokers, topic, &[])
        .expect("topic metadata")
        .len()
}

/// Every event the server logs in this test process from now on, as text (`message` then
/// ` field=value` pairs), for a test that waits for something that shows only in the log (a
/// refused reload) instead of sleeping and seeing nothing change. Installs a global subscriber
/// the first time; events are kept whatever their level.
pub fn log_lines() -> &'static std::sync::Mutex<Vec<String>> {
    use tracing_subscriber::layer::SubscriberExt;
    static LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(Capture(&LINES));
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    });
    &LINES
}

/// Waits until a logged event's text contains every one of `parts`.
pub fn wait_for_log(parts: &[&str], timeout: Duration) {
    wait_for(&format!("a log line with {parts:?}"), timeout, || {
        log_lines()
            .lock()
            .unwrap()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    });
}

struct Capture(&'static std::sync::Mutex<Vec<String>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        self.0.lock().unwrap().push(text.0);
    }
}

/// The sum of the samples on the operations endpoint at `addr` (`/metrics`) whose series
/// (name and labels, as printed) starts with `series`: a metric's name sums it over its
/// labels, `name{shard="0"` narrows it.
pub fn metric_sum(addr: std::net::SocketAddr, series: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("a /metrics answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(metric, _)| {
            metric.starts_with(series)
                && (series.contains('{') || metric.split('{').next() == Some(series))
        })
        .map(|(_, value)| value.parse::<f64>().expect("a number"))
        .sum()
}

/// Brokers the shards' producers see in `state` (`up` or `down`), summed over the shards,
/// from their librdkafka statistics (every second).
pub fn brokers_in_state(addr: std::net::SocketAddr, state: &str) -> f64 {
    (0..8)
        .map(|shard| {
            metric_sum(
                addr,
                &format!("stormgate_kafka_brokers{{shard=\"{shard}\",state=\"{state}\"}}"),
            )
        })
        .sum()
}
