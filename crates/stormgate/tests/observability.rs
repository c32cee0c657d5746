//! The operations endpoint and the statistics block, from outside: plain HTTP/1.1 GETs over
//! a std `TcpStream` against the server running in this process (mock cluster, real broker,
//! null sink) and the `stormgate` binary's JSON log.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stormgate_kafka::EmbeddedCluster;
use stormgate_station::Station;
use stormgate_testkit::*;
use support::*;

/// One HTTP exchange; returns the status and the body, checking the framing on the way.
fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the operations endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: stormgate\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a complete head");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    assert!(head.contains("\r\nConnection: close"), "{head}");
    assert!(
        head.contains(&format!("\r\nContent-Length: {}", body.len())),
        "{head}"
    );
    (status, body.to_owned())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path)
}

/// `/metrics` parsed into `sample -> value` (`name{labels}` exactly as written).
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn take(addr: SocketAddr) -> Scrape {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        Scrape(
            body.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(|l| {
                    let (sample, value) = l.rsplit_once(' ').unwrap();
                    let v = if value == "+Inf" {
                        f64::INFINITY
                    } else {
                        value.parse().unwrap()
                    };
                    (sample.to_owned(), v)
                })
                .collect(),
        )
    }

    /// The sum over every sample of `name` whose labels contain each of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(s, _)| s.split('{').next() == Some(name))
            .filter(|(s, _)| labels.iter().all(|l| s.contains(l)))
            .map(|(_, v)| v)
            .sum()
    }
}

fn wait_ready(addr: SocketAddr, want: u16, within: Duration) -> String {
    let start = Instant::now();
    loop {
        let (status, body) = get(addr, "/readyz");
        if status == want {
            return body;
        }
        assert!(
            start.elapsed() < within,
            "/readyz still {status} after {within:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TOPIC: &str = "observability";
const STATIONS: usize = 30;
/// Stations 25..30 reuse the zipcodes of stations 0..5.
const ZIPCODES: usize = 25;
const GOOD: usize = 20;

#[test]
fn metrics_move_with_traffic_and_readiness_follows_the_broker() {
    let cluster = EmbeddedCluster::start(TOPIC, 6).unwrap();
    let app = start(&[
        "--kafka-brokers",
        &cluster.bootstrap_servers(),
        "--kafka-topic",
        TOPIC,
    ]);
    let addr = app.metrics_addr().expect("the endpoint is on");
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(addr, "/nowhere").0, 404);
    assert_eq!(request(addr, "POST", "/metrics").0, 405);
    wait_ready(addr, 200, Duration::from_secs(15));

    let stations: Vec<Station> = (0..STATIONS)
        .map(|i| {
            let mut s = Station::connect(app.local_addr()).unwrap();
            s.identify(&format!("{:05}", i % ZIPCODES), "Observed")
                .unwrap();
            let mut lines = String::new();
            for n in 0..GOOD {
                lines.push_str(&format!(
                    "{{\"type\":\"metrics\",\"data\":\"t={i}.{n}\"}}\n"
                ));
            }
            lines.push_str("not json\n{\"type\":\"weather\"}\n");
            s.send(lines.as_bytes()).unwrap();
            s
        })
        .collect();
    let records = (STATIONS * GOOD) as f64;
    let start = Instant::now();
    let m = loop {
        let m = Scrape::take(addr);
        if m.sum("stormgate_records_delivered_total", &[]) == records
            && m.sum("stormgate_kafka_tx_bytes_total", &[]) > 0.0
        {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", m.0);
        std::thread::sleep(Duration::from_millis(100));
    };
    // Identify, the good lines, and two bad ones per station.
    let lines = (STATIONS * (1 + GOOD + 2)) as f64;
    assert_eq!(m.sum("stormgate_lines_received_total", &[]), lines);
    assert_eq!(
        m.sum("stormgate_line_errors_total", &["code=\"malformed_json\""]),
        STATIONS as f64
    );
    assert_eq!(
        m.sum("stormgate_line_errors_total", &["code=\"unknown_type\""]),
        STATIONS as f64
    );
    assert_eq!(
        m.sum("stormgate_line_errors_total", &[]),
        2.0 * STATIONS as f64
    );
    assert_eq!(m.sum("stormgate_records_enqueued_total", &[]), records);
    assert_eq!(m.sum("stormgate_records_produced_total", &[]), records);
    assert_eq!(m.sum("stormgate_records_failed_total", &[]), 0.0);
    assert_eq!(m.sum("stormgate_connections_active", &[]), STATIONS as f64);
    assert_eq!(
        m.sum("stormgate_connections_accepted_total", &[]),
        STATIONS as f64
    );
    assert!(m.sum("stormgate_bytes_received_total", &[]) > lines * 20.0);
    assert_eq!(
        m.sum("stormgate_delivery_latency_seconds_count", &[]),
        records
    );
    assert_eq!(
        m.sum(
            "stormgate_delivery_latency_seconds_bucket",
            &["le=\"+Inf\""]
        ),
        records
    );
    assert!(m.sum("stormgate_delivery_latency_seconds_bucket", &["le=\"60\""]) > 0.0);
    let zipcodes = m.sum("stormgate_unique_zipcodes", &[]);
    assert!(
        (ZIPCODES as f64 - zipcodes).abs() <= 1.0,
        "{zipcodes} unique zipcodes for {ZIPCODES}"
    );
    assert_eq!(m.sum("stormgate_shards", &[]), 2.0);
    assert_eq!(m.sum("stormgate_ready", &[]), 1.0);
    for shard in ["shard=\"0\"", "shard=\"1\""] {
        // A series per running shard, as fresh as /healthz wants it (10 s).
        let series = m.0.keys().filter(|k| {
            k.starts_with("stormgate_shard_heartbeat_age_seconds{") && k.contains(shard)
        });
        assert_eq!(series.count(), 1, "{shard}: {:?}", m.0);
        let age = m.sum("stormgate_shard_heartbeat_age_seconds", &[shard]);
        assert!((0.0..10.0).contains(&age), "{shard}: {age} s");
    }
    for shard in ["shard=\"0\"", "shard=\"1\""] {
        assert!(
            m.sum("stormgate_kafka_brokers", &[shard, "state=\"up\""]) >= 1.0,
            "{shard}: {:?}",
            m.0
        );
    }

    cluster.mock().broker_down(1).unwrap();
    let body = wait_ready(addr, 503, Duration::from_secs(10));
    assert!(body.contains("not connected to any broker"), "{body}");
    assert_eq!(Scrape::take(addr).sum("stormgate_ready", &[]), 0.0);
    assert_eq!(get(addr, "/healthz").0, 200, "alive while not ready");
    cluster.mock().broker_up(1).unwrap();
    wait_ready(addr, 200, Duration::from_secs(30));

    drop(stations);
    let totals = app.stop().unwrap().totals;
    assert_eq!(totals.records_delivered, records as u64);
    assert!(
        TcpStream::connect(addr).is_err(),
        "the endpoint stops with the app"
    );
}

#[test]
fn timeouts_are_counted_and_a_taken_port_fails_startup() {
    let app = start(&[
        "--sink",
        "null",
        "--idle-timeout",
        "1500ms",
        "--line-timeout",
        "500ms",
    ]);
    let addr = app.metrics_addr().unwrap();
    assert_eq!(get(addr, "/readyz"), (200, "ready\n".to_owned()));
    let mut idle = Station::connect(app.local_addr()).unwrap();
    idle.identify("11111", "Quiet").unwrap();
    let mut slow = Station::connect(app.local_addr()).unwrap();
    slow.send(b"{\"type\":\"identify\",\"zip").unwrap();
    assert!(slow.read_to_close().unwrap().contains("line_timeout"));
    assert!(idle.read_to_close().unwrap().contains("idle_timeout"));
    wait_for("both closes counted", Duration::from_secs(5), || {
        let m = Scrape::take(addr);
        m.sum("stormgate_idle_timeouts_total", &[]) == 1.0
            && m.sum("stormgate_line_timeouts_total", &[]) == 1.0
            && m.sum("stormgate_connections_active", &[]) == 0.0
    });
    let m = Scrape::take(addr);
    assert_eq!(m.sum("stormgate_unique_zipcodes", &[]), 1.0);
    assert_eq!(
        m.sum("stormgate_kafka_tx_bytes_total", &[]),
        0.0,
        "no producers"
    );

    let cli = <stormgate::cli::Cli as clap::Parser>::try_parse_from([
        "stormgate",
        "--listen",
        "127.0.0.1:0",
        "--sink",
        "null",
        "--metrics-addr",
        &addr.to_string(),
    ])
    .unwrap();
    let err = match stormgate::app::start(&cli) {
        Ok(_) => panic!("started on a taken metrics port"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("METRICS_ADDR"), "{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
    app.stop().unwrap();
}

#[test]
fn readiness_and_producer_metrics_against_the_real_broker() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "observability");
    let app = start(&["--kafka-brokers", &brokers, "--kafka-topic", &topic]);
    let addr = app.metrics_addr().unwrap();
    wait_ready(addr, 200, Duration::from_secs(30));
    let mut s = Station::connect(app.local_addr()).unwrap();
    s.identify("54321", "Real").unwrap();
    for i in 0..50 {
        s.send(format!("{{\"type\":\"metrics\",\"data\":\"t={i}\"}}\n").as_bytes())
            .unwrap();
    }
    wait_for(
        "delivery and a statistics report",
        Duration::from_secs(30),
        || {
            let m = Scrape::take(addr);
            m.sum("stormgate_records_delivered_total", &[]) == 50.0
                && m.sum("stormgate_kafka_tx_bytes_total", &[]) > 0.0
                && m.sum("stormgate_kafka_broker_rtt_seconds", &[]) > 0.0
        },
    );
    let m = Scrape::take(addr);
    assert_eq!(m.sum("stormgate_unique_zipcodes", &[]), 1.0);
    assert_eq!(m.sum("stormgate_kafka_producer_queue_records", &[]), 0.0);
    assert_eq!(m.sum("stormgate_ready", &[]), 1.0);
    drop(s);
    app.stop().unwrap();
}

/// The binary with `STATS_INTERVAL=1s` logs one JSON statistics block a second, and its
/// endpoint answers on the port it logs.
#[test]
fn the_binary_logs_a_statistics_block_every_interval() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stormgate"))
        .env_remove("KAFKA_BROKERS")
        .env("TCP_LISTEN", "127.0.0.1:0")
        .env("TCP_SHARDS", "2")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("STATS_INTERVAL", "1s")
        .env(
            "SPILL_DIR",
            std::env::temp_dir().join(format!("stormgate-test-spill-{}", uuid::Uuid::now_v7())),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stormgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, logs) = mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let v =
                serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({"raw": line}));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let next_log = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| loop {
        let v = logs
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no log line: {what}"));
        if pred(&v) {
            return v;
        }
    };
    let message =
        |v: &serde_json::Value, m: &str| v["message"].as_str().is_some_and(|s| s.contains(m));
    let station_addr: SocketAddr = next_log("listening", &|v| message(v, "listening"))["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ops_addr: SocketAddr = next_log("endpoint", &|v| message(v, "operations endpoint"))["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(get(ops_addr, "/healthz").0, 200);
    wait_ready(ops_addr, 200, Duration::from_secs(15));

    let is_block = |v: &serde_json::Value| v["message"] == "statistics";
    let check = |block: &serde_json::Value| {
        assert_eq!(block["target"], "stormgate::stats", "{block}");
        assert_eq!(block["level"], "INFO", "{block}");
        let interval = block["interval_s"].as_f64().unwrap();
        assert!((0.9..2.0).contains(&interval), "{block}");
        for field in [
            "connections_active",
            "connections_max",
            "unique_zipcodes",
            "scheduled_timers",
            "delivery_failures",
            "delivery_failures_total",
        ] {
            assert!(block[field].is_u64(), "{field}: {block}");
        }
        for field in ["lines_per_sec", "records_delivered_per_sec"] {
            assert!(block[field].is_number(), "{field}: {block}");
        }
        let depths = block["queue_depth"].as_str().unwrap();
        assert!(
            depths.starts_with("0:") && depths.contains(" 1:"),
            "{block}"
        );
    };
    check(&next_log("a statistics block", &is_block));

    let mut station = Station::connect(station_addr).unwrap();
    station.identify("24680", "Logged").unwrap();
    station
        .send(b"{\"type\":\"metrics\",\"data\":\"t=1\"}\n")
        .unwrap();
    // Blocks keep coming, and the next ones see the station.
    let seen = next_log("a block that sees the station", &|v| {
        is_block(v) && v["connections_active"] == 1 && v["unique_zipcodes"] == 1
    });
    check(&seen);
    assert_eq!(seen["scheduled_timers"], 1, "one idle timer: {seen}");
    assert_eq!(seen["connections_max"].as_u64().map(|m| m > 1), Some(true));

    drop(station);
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// docs/OBSERVABILITY.md and the catalogue the exposition is built from agree: every
/// catalogued metric has a row (name, type, labels) in one of its tables, and every
/// `stormgate_*` name the page mentions is catalogued.
#[test]
fn the_metrics_page_documents_the_catalogue() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/OBSERVABILITY.md");
    let page = std::fs::read_to_string(path).unwrap();
    // `| `name` | type | labels | meaning |`, by name.
    let rows: BTreeMap<&str, (&str, &str)> = page
        .lines()
        .filter_map(|l| l.strip_prefix("| `stormgate_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = &l[..l.find('`').unwrap()];
            (name, (cells[1], cells[2]))
        })
        .collect();
    let catalogue: BTreeMap<&str, _> = stormgate::ops::catalogue()
        .map(|d| (d.name.strip_prefix("stormgate_").unwrap(), d))
        .collect();
    let mut wrong = Vec::new();
    for (name, d) in &catalogue {
        let mut labels: Vec<&str> = d.labels.to_vec();
        if d.kind == stormgate_telemetry::MetricKind::Histogram {
            labels.push("le");
        }
        let want = (d.kind.as_str(), labels.join(", "));
        match rows.get(name) {
            None => wrong.push(format!("stormgate_{name}: no row")),
            Some(&(kind, labels)) if (kind, labels.to_owned()) != want => wrong.push(format!(
                "stormgate_{name}: documented as {kind} [{labels}], served as {} [{}]",
                want.0, want.1
            )),
            Some(_) => {}
        }
    }
    // Every name the page mentions, in a table or in the prose.
    for (i, _) in page.match_indices("`stormgate_") {
        let rest = &page[i + "`stormgate_".len()..];
        let name = &rest[..rest.find('`').unwrap()];
        // "All names start with `stormgate_`" names no metric.
        if !name.is_empty() && !catalogue.contains_key(name) {
            wrong.push(format!("stormgate_{name}: documented, not served"));
        }
    }
    assert!(wrong.is_empty(), "docs/OBSERVABILITY.md: {wrong:#?}");
    assert!(catalogue.len() > 50, "{} metrics", catalogue.len());
}
