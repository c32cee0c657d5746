//! Helpers shared by the end-to-end tests.

#![allow(dead_code)]

pub mod pki;
pub mod process;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use stormgate::app::App;
use stormgate::cli::Cli;

/// The Apache Kafka broker the tests talk to, from `STORMGATE_TEST_KAFKA` (`deploy/test.sh`
/// starts one with `deploy/kafka/kafka.sh` and sets it).
pub fn broker() -> String {
    std::env::var("STORMGATE_TEST_KAFKA").expect(
        "STORMGATE_TEST_KAFKA is not set: run the suite with deploy/test.sh, which starts a broker, \
         or point it at one (e.g. `deploy/kafka/kafka.sh start 19092` prints the address)",
    )
}

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

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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

/// Reads replies with `next` until line `seq` is acknowledged (singly or by an `upto`); any
/// other reply, or none, fails.
pub fn wait_for_ack(mut next: impl FnMut() -> std::io::Result<stormgate_station::Reply>, seq: u64) {
    use stormgate_station::Reply;
    loop {
        match next().expect("a reply") {
            Reply::Ack { seq: n } | Reply::AckUpto { upto: n } if n >= seq => return,
            Reply::Ack { .. } | Reply::AckUpto { .. } => {}
            other => panic!("waiting for the ack of {seq}: {other:?}"),
        }
    }
}

/// An Apache Kafka broker of a test's own, for tests that stop and start it or need listeners
/// the suite's broker lacks; run through `deploy/kafka/kafka.sh` like the suite's.
///
/// It listens on the suite broker's port (from `STORMGATE_TEST_KAFKA`) plus `offset`, and on
/// the four ports after that one (controller, SASL, TLS): every port of a suite run derives
/// from `STORMGATE_TEST_KAFKA_PORT`, so two runs with different ports coexist. Each test
/// binary that owns a broker takes its own offset (multiples of 10 from 10; `deploy/test.sh`
/// gives the benchmarks +40). Dropping it stops the broker and deletes its data.
pub struct OwnBroker {
    pub port: u16,
    /// What `kafka.sh start` printed: `KAFKA_BROKERS`, `KAFKA_SASL_BROKERS`, and with TLS
    /// `KAFKA_SSL_BROKERS` and `KAFKA_SASL_SSL_BROKERS`, each `127.0.0.1:PORT`.
    pub listeners: BTreeMap<String, String>,
    env: Vec<(String, String)>,
}

impl OwnBroker {
    /// A broker with empty storage on the suite's port + `offset`, started; `env` goes to
    /// every `kafka.sh` call (e.g. `KAFKA_TLS_CERT`).
    pub fn start_fresh(offset: u16, env: &[(&str, &str)]) -> OwnBroker {
        let suite = broker();
        let suite_port: u16 = suite
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in STORMGATE_TEST_KAFKA={suite}"));
        let mut own = OwnBroker {
            port: suite_port + offset,
            listeners: BTreeMap::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        own.script("reset");
        own.listeners = own.start();
        own
    }

    /// `kafka.sh start`: its `KAFKA_*=host:port` lines.
    pub fn start(&self) -> BTreeMap<String, String> {
        self.script("start")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// `kafka.sh stop`: SIGTERM, and SIGKILL if it lingers; the data stays on disk.
    pub fn stop(&self) {
        self.script("stop");
    }

    /// The plaintext listener.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, verb: &str) -> String {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kafka/kafka.sh");
        let t0 = Instant::now();
        let out = std::process::Command::new(script)
            .args([verb, &self.port.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run deploy/kafka/kafka.sh");
        assert!(out.status.success(), "kafka.sh {verb} {}", self.port);
        eprintln!("kafka.sh {verb} {}: {:?}", self.port, t0.elapsed());
        String::from_utf8(out.stdout).expect("utf-8 output")
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kafka/kafka.sh");
        let _ = std::process::Command::new(script)
            .args(["reset", &self.port.to_string()])
            .stdout(std::process::Stdio::null())
            .status();
    }
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

/// A socket connected to `addr` from loopback address `source` (e.g. 127.0.0.7), with its
/// receive buffer set to `recv_buffer` bytes when given.
///
/// The port is picked at connect time (`IP_BIND_ADDRESS_NO_PORT`), per destination: a socket
/// bound to port 0 otherwise takes a port from the whole ephemeral range for every destination,
/// and 100,000 such connections in TIME_WAIT leave the next test's plain `connect` to
/// 127.0.0.1 with no port at all (EADDRNOTAVAIL).
pub fn connect_from(
    addr: std::net::SocketAddr,
    source: std::net::Ipv4Addr,
    recv_buffer: Option<usize>,
) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::AsRawFd;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&std::net::SocketAddr::from((source, 0)).into())?;
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.connect(&addr.into())?;
    Ok(socket.into())
}
