//! End to end against a real Kafka-protocol broker: stations → Stormgate → broker → consumer.

mod support;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stormgate_kafka::Compression;
use stormgate_protocol::ErrorCode;
use stormgate_station::Station;
use stormgate_testkit::*;
use support::*;

const STATIONS: usize = 200;
const LINES: usize = 50;
/// Every `BAD_EVERY`th line is malformed; it must be answered, counted, and not published.
const BAD_EVERY: usize = 10;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The compression codec of every record batch the suite's broker stored for `topic`, read
/// from its log segments on disk (`deploy/kafka/kafka.sh` keeps them under
/// `$STORMGATE_CACHE/kafka/PORT/data`, the cache defaulting to the repository's `.cache`):
/// the codec on the wire, which no consumer API reports.
fn codecs_on_disk(topic: &str) -> std::collections::BTreeMap<u8, usize> {
    let brokers = broker();
    let port = brokers.rsplit(':').next().unwrap();
    let cache = std::env::var("STORMGATE_CACHE").map_or_else(
        |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache"),
        std::path::PathBuf::from,
    );
    let data = cache.join("kafka").join(port).join("data");
    let mut codecs = std::collections::BTreeMap::new();
    let dirs = std::fs::read_dir(&data).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; the broker's data must be readable here (run it with deploy/kafka/kafka.sh, \
             STORMGATE_CACHE as it had)",
            data.display()
        )
    });
    for dir in dirs.map(|d| d.unwrap().path()) {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if name.rsplit_once('-').map(|(t, _)| t) != Some(topic) {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap().map(|f| f.unwrap().path()) {
            if file.extension().is_none_or(|e| e != "log") {
                continue;
            }
            // Record batches (magic 2): base offset (8), length (4) of what follows, leader
            // epoch (4), magic (1), CRC (4), attributes (2; the codec in the low 3 bits).
            let bytes = std::fs::read(&file).unwrap();
            let mut at = 0;
            while at + 23 <= bytes.len() {
                let len = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
                assert_eq!(bytes[at + 16], 2, "magic of the batch at {at} in {file:?}");
                let attributes = u16::from_be_bytes(bytes[at + 21..at + 23].try_into().unwrap());
                *codecs.entry((attributes & 7) as u8).or_insert(0) += 1;
                at += 12 + len as usize;
            }
        }
    }
    codecs
}

fn zipcode(i: usize) -> String {
    format!("{:05}", 10_000 + i)
}

fn city(i: usize) -> String {
    if i.is_multiple_of(7) {
        format!("São Paulo {i}")
    } else {
        format!("City {i}")
    }
}

/// 200 stations × 50 lines through two shards into the broker with `codec`; every record
/// arrives exactly once, in order per station, with the right key and fields.
fn stations_to_topic(codec: Compression) {
    let brokers = broker();
    let topic = fresh_topic(&brokers, &format!("e2e-{codec}"));
    let started_ms = now_ms();
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        &topic,
        "--kafka-compression",
        codec.as_str(),
    ]);
    let mut stations = Vec::with_capacity(STATIONS);
    for i in 0..STATIONS {
        let mut s = Station::connect(app.local_addr()).expect("connect");
        s.identify(&zipcode(i), &city(i)).unwrap();
        let mut batch = String::new();
        for line in 0..LINES {
            if line % BAD_EVERY == BAD_EVERY - 1 {
                batch.push_str("{\"type\":\"metrics\",\"data\":\"temperature=warm\"}\n");
            } else {
                batch.push_str(&format!(
                    "{{\"type\":\"metrics\",\"data\":\"temperature={line}.5,humidity={i}\"}}\n"
                ));
            }
        }
        s.send(batch.as_bytes()).unwrap();
        stations.push(s);
    }
    let good_per_station = LINES - LINES / BAD_EVERY;
    let expected = STATIONS * good_per_station;
    for s in &mut stations {
        for _ in 0..LINES / BAD_EVERY {
            match s.reply().unwrap() {
                stormgate_station::Reply::Error { code, .. } => {
                    assert_eq!(code, stormgate_station::ErrorCode::InvalidMetric)
                }
                other => panic!("{other:?}"),
            }
        }
    }
    wait_for("every record delivered", Duration::from_secs(60), || {
        app.server().totals().records_delivered == expected as u64
    });
    let per_shard: Vec<u64> = app
        .server()
        .metrics()
        .iter()
        .map(|m| m.connections_accepted.get())
        .collect();
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "a shard accepted no connection: {per_shard:?}"
    );
    let totals = app.stop().unwrap().totals;
    assert_eq!(totals.records_failed, 0);
    assert_eq!(
        totals.line_error(ErrorCode::InvalidMetric as usize),
        (STATIONS * LINES / BAD_EVERY) as u64
    );
    drop(stations);

    let records = consume(&brokers, &topic, expected);
    assert_eq!(records.len(), expected, "record count");
    // The chosen codec on the wire: librdkafka sends a batch uncompressed only when
    // compressing would not make it smaller (a batch of one short record).
    let codecs = codecs_on_disk(&topic);
    let id = match codec {
        Compression::None => 0,
        Compression::Gzip => 1,
        Compression::Snappy => 2,
        Compression::Lz4 => 3,
        Compression::Zstd => 4,
    };
    eprintln!("record batches by codec id: {codecs:?} (want {id})");
    assert!(
        codecs.get(&id).is_some_and(|&n| n > 0),
        "{codec}: {codecs:?}"
    );
    assert!(
        codecs.keys().all(|&c| c == id || c == 0),
        "{codec}: batches of another codec: {codecs:?}"
    );
    let groups = by_key(&records);
    assert_eq!(groups.len(), STATIONS, "one key per station");
    let mut connection_ids = HashSet::new();
    for i in 0..STATIONS {
        let zip = zipcode(i);
        let recs = &groups[&zip];
        assert_eq!(recs.len(), good_per_station, "records of {zip}");
        let conn = recs[0].value["connection_id"].as_str().unwrap().to_owned();
        let uuid = uuid::Uuid::parse_str(&conn).expect("connection_id is a UUID");
        assert_eq!(uuid.get_version_num(), 7, "connection_id is a v7 UUID");
        assert!(
            connection_ids.insert(conn.clone()),
            "connection_id shared by two stations"
        );
        let partition = recs[0].partition;
        let mut temperatures = Vec::new();
        for r in recs {
            let v = &r.value;
            assert_eq!(r.partition, partition, "{zip} spread over partitions");
            assert_eq!(v["zipcode"], zip.as_str());
            assert_eq!(v["city"], city(i).as_str());
            assert_eq!(v["connection_id"], conn.as_str());
            let at = v["received_at_ms"].as_i64().unwrap();
            assert!(
                at >= started_ms && at <= now_ms(),
                "received_at_ms {at} out of range"
            );
            assert_eq!(
                r.timestamp_ms,
                Some(at),
                "record timestamp is the read time"
            );
            assert_eq!(v["metrics"]["humidity"], i as f64);
            assert_eq!(v["metrics"].as_object().unwrap().len(), 2);
            assert_eq!(v.as_object().unwrap().len(), 5, "unexpected fields in {v}");
            temperatures.push(v["metrics"]["temperature"].as_f64().unwrap());
        }
        let expected_temps: Vec<f64> = (0..LINES)
            .filter(|l| l % BAD_EVERY != BAD_EVERY - 1)
            .map(|l| l as f64 + 0.5)
            .collect();
        assert_eq!(
            temperatures, expected_temps,
            "{zip}: every line once, in order"
        );
    }
}

#[test]
fn stations_to_topic_uncompressed() {
    stations_to_topic(Compression::None);
}

#[test]
fn stations_to_topic_gzip() {
    stations_to_topic(Compression::Gzip);
}

#[test]
fn stations_to_topic_snappy() {
    stations_to_topic(Compression::Snappy);
}

#[test]
fn stations_to_topic_lz4() {
    stations_to_topic(Compression::Lz4);
}

#[test]
fn stations_to_topic_zstd() {
    stations_to_topic(Compression::Zstd);
}

/// KAFKA_ASYNC=false: each line waits for its delivery report; everything still arrives. With
/// a 100 ms linger, a station's 20 lines then take at least 20 lingers (asynchronous, they
/// share one batch and take about one): a lower bound, which a busy machine only helps.
#[test]
fn synchronous_mode_delivers_every_line() {
    synchronous_mode();
}

fn synchronous_mode() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "e2e-sync");
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        &topic,
        "--kafka-async",
        "false",
        "--kafka-batch-timeout",
        "100ms",
    ]);
    let mut stations: Vec<Station> = (0..10)
        .map(|_| Station::connect(app.local_addr()).unwrap())
        .collect();
    let sent_at = std::time::Instant::now();
    for (i, s) in stations.iter_mut().enumerate() {
        s.identify(&zipcode(i), "Sync").unwrap();
        for line in 0..20 {
            s.metrics(&[("temperature", line as f64)]).unwrap();
        }
    }
    // Lock-step: never more than one record in flight per connection.
    let mut in_flight_max = 0;
    wait_for("200 records", Duration::from_secs(60), || {
        let t = app.server().totals();
        in_flight_max = in_flight_max.max(t.records_in_flight);
        t.records_delivered == 200
    });
    let took = sent_at.elapsed();
    eprintln!("synchronous: 200 lines in {took:?}, at most {in_flight_max} in flight");
    assert!(
        took >= Duration::from_millis(20 * 100),
        "20 lines per station in {took:?}: not one linger each"
    );
    assert!(in_flight_max <= 10, "{in_flight_max} records in flight");
    app.stop().unwrap();
    let records = consume(&brokers, &topic, 200);
    assert_eq!(records.len(), 200);
    for (zip, recs) in by_key(&records) {
        let temps: Vec<f64> = recs
            .iter()
            .map(|r| r.value["metrics"]["temperature"].as_f64().unwrap())
            .collect();
        assert_eq!(temps, (0..20).map(f64::from).collect::<Vec<_>>(), "{zip}");
    }
}

/// The retry above covers exactly one failure, once: a short read.
/// KAFKA_DLQ_TOPIC: every rejected line reaches the dead-letter topic once, as it was sent
/// (base64 when not UTF-8), with its code and connection; good lines still reach the main
/// topic and are not dead-lettered.
#[test]
fn rejected_lines_reach_the_dead_letter_topic() {
    dead_letters();
}

fn dead_letters() {
    use base64::Engine as _;
    let brokers = broker();
    let topic = fresh_topic(&brokers, "e2e-dlq-main");
    let dlq = fresh_topic(&brokers, "e2e-dlq");
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        &topic,
        "--kafka-dlq-topic",
        &dlq,
    ]);
    let long = format!(
        "{{\"type\":\"metrics\",\"data\":\"t={}\"}}",
        "1".repeat(70_000)
    );
    // (line as sent, the code it gets); the dead letter carries the line, except an
    // oversized one, which is never buffered.
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (
            b"{\"type\":\"metrics\",\"data\":\"t=1\"}".to_vec(),
            "metrics_before_identify",
        ),
        (
            b"{\"type\":\"identify\",\"zipcode\":\" \"}".to_vec(),
            "empty_zipcode",
        ),
        (b"{not json".to_vec(), "malformed_json"),
        (
            b"{\"type\":\"metrics\",\"data\":\"t=\xff\xfe\"}".to_vec(),
            "invalid_utf8",
        ),
        (b"{\"type\":\"wave\"}".to_vec(), "unknown_type"),
        (
            b"{\"type\":\"metrics\",\"data\":\"t=warm\"}".to_vec(),
            "invalid_metric",
        ),
        (long.into_bytes(), "line_too_long"),
    ];
    let mut s = Station::connect(app.local_addr()).unwrap();
    let mut stream = Vec::new();
    for (i, (line, _)) in bad.iter().enumerate() {
        if i == 2 {
            stream.extend_from_slice(
                b"{\"type\":\"identify\",\"zipcode\":\"55555\",\"city\":\"D\"}\n",
            );
            stream.extend_from_slice(b"{\"type\":\"metrics\",\"data\":\"t=1.5\"}\n");
        }
        stream.extend_from_slice(line);
        stream.extend_from_slice(b"\r\n");
    }
    stream.extend_from_slice(b"{\"type\":\"metrics\",\"data\":\"t=2.5\"}\n");
    s.send(&stream).unwrap();
    for (_, code) in &bad {
        match s.reply().unwrap() {
            stormgate_station::Reply::Error { code: got, .. } => assert_eq!(got.as_str(), *code),
            other => panic!("{other:?}"),
        }
    }
    wait_for("records and dead letters", Duration::from_secs(60), || {
        let t = app.server().totals();
        t.records_delivered == 2 && t.dead_letters_delivered == bad.len() as u64
    });
    let totals = app.stop().unwrap().totals;
    assert_eq!(totals.dead_letters_enqueued, bad.len() as u64);
    assert_eq!((totals.records_failed, totals.dead_letters_failed), (0, 0));

    let main = consume(&brokers, &topic, 2);
    assert_eq!(main.len(), 2);
    let connection_id = main[0].value["connection_id"].as_str().unwrap().to_owned();
    let letters = consume(&brokers, &dlq, bad.len());
    assert_eq!(letters.len(), bad.len());
    // Before identify the key is the connection id; after, the zipcode. Within a key, in order.
    let mut seen = Vec::new();
    for key in [connection_id.as_str(), "55555"] {
        for r in letters.iter().filter(|r| r.key == key) {
            assert_eq!(r.value["connection_id"], connection_id.as_str());
            assert!(r.value["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
            let raw = match (r.value.get("raw"), r.value.get("raw_base64")) {
                (Some(text), None) => Some(text.as_str().unwrap().as_bytes().to_vec()),
                (None, Some(b)) => Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(b.as_str().unwrap())
                        .unwrap(),
                ),
                (None, None) => None,
                _ => panic!("raw and raw_base64 both set: {}", r.value),
            };
            let zipcode = r.value.get("zipcode").and_then(|z| z.as_str());
            seen.push((
                r.value["code"].as_str().unwrap().to_owned(),
                raw,
                zipcode == Some("55555"),
            ));
        }
    }
    let want: Vec<_> = bad
        .iter()
        .enumerate()
        .map(|(i, (line, code))| {
            let raw = (*code != "line_too_long").then(|| line.clone());
            (code.to_string(), raw, i >= 2)
        })
        .collect();
    assert_eq!(seen, want);
}
