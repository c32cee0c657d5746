//! The disk buffer (`BUFFER_TYPE=disk`) end to end: what a crash, an outage, a full buffer,
//! damaged files and fewer shards cost, judged from the stations' acknowledgements, the
//! metrics and what arrives in Apache Kafka. A fault the real broker cannot stage (an outage
//! on cue) uses librdkafka's mock cluster.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stormgate_kafka::EmbeddedCluster;
use stormgate_station::{NackCode, Reply, read_reply};
use stormgate_testkit::*;
use support::process::{Process, scrape};
use support::*;

/// A fresh directory for one test's buffer, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("stormgate-{name}-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts Stormgate in this process with a disk buffer in `dir` and the given extra flags.
fn start_disk(dir: &TempDir, extra: &[&str]) -> stormgate::app::App {
    let dir = dir.arg();
    let mut args = vec!["--buffer-type", "disk", "--buffer-dir", &dir];
    args.extend_from_slice(extra);
    start(&args)
}

/// What one acknowledging station got back for its lines.
#[derive(Debug, Default)]
struct Answers {
    acked: BTreeSet<u64>,
    nacks: BTreeMap<u64, NackCode>,
}

/// Connects as station `zipcode` with acknowledgements, sends `seqs`, and reads answers until
/// every line is answered (ack or nack), or `limit` passes.
fn acked_station(
    addr: SocketAddr,
    zipcode: &str,
    seqs: std::ops::Range<u64>,
    limit: Duration,
) -> Answers {
    acked_station_with(addr, zipcode, seqs, limit, None)
}

/// [`acked_station`], with every line's data `data` when given.
fn acked_station_with(
    addr: SocketAddr,
    zipcode: &str,
    seqs: std::ops::Range<u64>,
    limit: Duration,
    data: Option<String>,
) -> Answers {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let identify = format!(
        "{{\"type\":\"identify\",\"zipcode\":\"{zipcode}\",\"city\":\"Disk\",\"acks\":true}}\n"
    );
    s.write_all(identify.as_bytes()).unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        let text = match data {
            None => station_lines(0, seqs.start, seqs.end - seqs.start),
            Some(data) => seqs
                .clone()
                .map(|i| format!("{{\"type\":\"metrics\",\"seq\":{i},\"data\":\"{data}\"}}\n"))
                .collect(),
        };
        std::thread::spawn(move || s.write_all(text.as_bytes()))
    };
    let mut replies = BufReader::new(s);
    let mut answers = Answers::default();
    let want = seqs.end - seqs.start;
    let deadline = Instant::now() + limit;
    let mut unanswered: BTreeSet<u64> = seqs.clone().collect();
    while (answers.acked.len() + answers.nacks.len()) < want as usize && Instant::now() < deadline {
        let Ok(reply) = read_reply(&mut replies) else {
            break;
        };
        match reply {
            Reply::Ack { seq: n } => {
                unanswered.remove(&n);
                answers.acked.insert(n);
            }
            Reply::AckUpto { upto: n } => {
                let done: Vec<u64> = unanswered.range(..=n).copied().collect();
                for seq in done {
                    unanswered.remove(&seq);
                    answers.acked.insert(seq);
                }
            }
            Reply::Nack { seq, code } => {
                unanswered.remove(&seq);
                answers.nacks.insert(seq, code);
            }
            other => panic!("{zipcode}: unexpected answer {other:?}"),
        }
    }
    writer.join().unwrap().unwrap();
    answers
}

/// Every sample of the in-process server's disk buffers, summed over shards.
fn buffer(app: &stormgate::app::App, read: fn(&stormgate_buffer::LogStats) -> i64) -> i64 {
    app.server().buffer_stats().iter().map(|b| read(b)).sum()
}

/// Each station's seqs as they arrived in `topic` (keyed by zipcode), and how many arrived
/// more than once.
fn arrived(records: &[Out]) -> (BTreeMap<String, Vec<u64>>, usize) {
    let mut by_station: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in records {
        by_station
            .entry(r.key.clone())
            .or_default()
            .push(r.value["seq"].as_u64().expect("every record has its seq"));
    }
    let mut duplicates = 0;
    for seqs in by_station.values() {
        let distinct: BTreeSet<&u64> = seqs.iter().collect();
        duplicates += seqs.len() - distinct.len();
    }
    (by_station, duplicates)
}

/// Issue test 1: with the broker unreachable from the start, 20 stations × 2,000 lines are
/// all acknowledged (durable); `kill -9`; a new process on the same directory with the
/// broker back delivers every acknowledged line.
#[test]
fn acknowledged_lines_survive_kill_9_and_arrive_once_the_broker_is_back() {
    const STATIONS: usize = 20;
    const LINES: u64 = 2_000;
    let dir = TempDir::new("buffer-kill");
    let brokers = broker();
    let topic = fresh_topic(&brokers, "disk-kill");
    let common = [
        ("BUFFER_TYPE", "disk"),
        ("BUFFER_DIR", dir.path().to_str().unwrap()),
        ("BUFFER_MAX_BYTES", "512MiB"),
        ("KAFKA_TOPIC", topic.as_str()),
    ];
    let mut first = Process::spawn(&[&common[..], &[("KAFKA_BROKERS", "127.0.0.1:1")]].concat());
    let addr = first.addr();
    let answers: Vec<Answers> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..STATIONS)
            .map(|i| {
                scope.spawn(move || {
                    acked_station(
                        addr,
                        &format!("{:05}", 30_000 + i),
                        0..LINES,
                        Duration::from_secs(60),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, a) in answers.iter().enumerate() {
        assert!(a.nacks.is_empty(), "station {i}: nacks {:?}", a.nacks);
        assert_eq!(
            a.acked.len() as u64,
            LINES,
            "station {i}: every line acknowledged while the broker is unreachable"
        );
    }
    // Each line's way from its read to durable was timed once, none to delivery yet.
    let m = scrape(first.metrics_addr());
    let lines = (STATIONS as u64 * LINES) as f64;
    assert_eq!(m["stormgate_durable_latency_seconds_count"], lines);
    assert_eq!(m["stormgate_delivery_latency_seconds_count"], 0.0);
    // SAFETY: kill(2) on our own child.
    assert_eq!(
        unsafe { libc::kill(first.child.id() as i32, libc::SIGKILL) },
        0
    );
    let _ = first.child.wait();

    let mut second =
        Process::spawn(&[&common[..], &[("KAFKA_BROKERS", brokers.as_str())]].concat());
    let ops = second.metrics_addr();
    let total = STATIONS as u64 * LINES;
    wait_for(
        "every buffered record delivered",
        Duration::from_secs(120),
        || {
            let m = scrape(ops);
            m.get("stormgate_records_delivered_total")
                .copied()
                .unwrap_or(0.0)
                >= total as f64
                && m.get("stormgate_buffer_records").copied() == Some(0.0)
        },
    );
    let m = scrape(ops);
    assert!(
        m["stormgate_buffer_replayed_records_total"] > 0.0,
        "records came back from disk"
    );
    assert_eq!(m["stormgate_settle_errors_total"], 0.0);
    let delivered = m["stormgate_records_delivered_total"] as usize;
    let records = consume(&brokers, &topic, delivered);
    let (by_station, duplicates) = arrived(&records);
    eprintln!("{delivered} delivered after kill -9, {duplicates} duplicates");
    assert_eq!(by_station.len(), STATIONS);
    for (zip, seqs) in &by_station {
        let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(
            distinct,
            (0..LINES).collect(),
            "{zip}: every acknowledged line arrives"
        );
        let mut ordered = seqs.clone();
        ordered.dedup();
        assert!(ordered.windows(2).all(|w| w[0] < w[1]), "{zip}: in order");
    }
    assert_eq!(records.len(), total as usize + duplicates);
}

/// Issue test 2, scaled to CI: an outage far longer than librdkafka's queue
/// (`KAFKA_QUEUE_MAX_RECORDS=500`) at a steady rate: the server keeps reading at the
/// stations' pace, the disk stays under its bound, and afterwards every line arrives once,
/// in order, and the delivered segments are gone.
#[test]
fn an_outage_longer_than_the_producer_queue_is_absorbed_on_disk() {
    const TOPIC: &str = "disk-outage";
    const STATIONS: usize = 10;
    const SECONDS: u64 = 8;
    const PER_SECOND: u64 = 500;
    let dir = TempDir::new("buffer-outage");
    let cluster = EmbeddedCluster::start(TOPIC, 6).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start_disk(
        &dir,
        &[
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            TOPIC,
            "--kafka-queue-max-records",
            "500",
            "--queue-size",
            "256",
            "--buffer-max-bytes",
            "64MiB",
        ],
    );
    let mut stations: Vec<TcpStream> = (0..STATIONS)
        .map(|i| {
            let mut s = TcpStream::connect(app.local_addr()).unwrap();
            let identify = format!(
                "{{\"type\":\"identify\",\"zipcode\":\"{:05}\",\"city\":\"Outage\"}}\n",
                40_000 + i
            );
            s.write_all(identify.as_bytes()).unwrap();
            s
        })
        .collect();
    cluster.mock().broker_down(1).unwrap();
    let t0 = Instant::now();
    let mut sent = 0u64;
    for second in 0..SECONDS {
        for tick in 0..10 {
            let from = second * PER_SECOND + tick * PER_SECOND / 10;
            for (i, s) in stations.iter_mut().enumerate() {
                s.write_all(station_lines(i, from, PER_SECOND / 10).as_bytes())
                    .unwrap();
            }
            sent += STATIONS as u64 * PER_SECOND / 10;
            let next = t0 + Duration::from_millis(second * 1000 + (tick + 1) * 100);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        // The server reads at the stations' pace: within a second's worth of what was sent.
        let received = app.server().totals().lines_received;
        assert!(
            received + STATIONS as u64 * PER_SECOND >= sent,
            "{second}s into the outage the server read {received} of {sent} lines"
        );
    }
    let totals = app.server().totals();
    assert_eq!(totals.records_failed, 0);
    assert!(
        totals.records_delivered < sent / 10,
        "the broker was down: {} delivered",
        totals.records_delivered
    );
    let on_disk = buffer(&app, |b| b.disk_bytes.get());
    assert!(
        on_disk <= 64 << 20,
        "disk use {on_disk} over BUFFER_MAX_BYTES"
    );
    assert!(
        buffer(&app, |b| b.records.get()) > 0,
        "the outage is held on disk"
    );

    cluster.mock().broker_up(1).unwrap();
    wait_for(
        "everything delivered after the outage",
        Duration::from_secs(120),
        || app.server().totals().records_delivered == sent,
    );
    wait_for(
        "delivered segments removed",
        Duration::from_secs(30),
        || {
            buffer(&app, |b| b.records.get()) == 0
                && app
                    .server()
                    .buffer_stats()
                    .iter()
                    .all(|b| b.segments.get() <= 1)
        },
    );
    let replayed: u64 = app
        .server()
        .buffer_stats()
        .iter()
        .map(|b| b.segments_removed.get())
        .sum();
    let report = app.stop().unwrap();
    assert_eq!(report.totals.records_failed, 0);
    assert_eq!(report.totals.settle_errors, 0);
    eprintln!("segments removed after the outage: {replayed}");
    drop(stations);

    let records = consume(&brokers, TOPIC, sent as usize);
    let (by_station, duplicates) = arrived(&records);
    assert_eq!(duplicates, 0);
    let per_station = SECONDS * PER_SECOND;
    for (zip, seqs) in by_station {
        assert_eq!(
            seqs,
            (0..per_station).collect::<Vec<_>>(),
            "{zip}: every line once, in order"
        );
    }
}

/// A metrics line's data of ~1 KB: 100 metrics.
fn wide_data() -> String {
    (0..100)
        .map(|i| format!("m{i:02}=1.5"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Issue test 3, `block`: with the broker unreachable and a small buffer, the shard stops
/// reading once full and the files never exceed `BUFFER_MAX_BYTES`.
#[test]
fn a_full_buffer_blocks_within_its_bound() {
    let dir = TempDir::new("buffer-block");
    let app = start_disk(
        &dir,
        &[
            "--shards",
            "1",
            "--kafka-brokers",
            "127.0.0.1:1",
            "--buffer-max-bytes",
            "4MiB",
        ],
    );
    let mut station = TcpStream::connect(app.local_addr()).unwrap();
    station
        .write_all(b"{\"type\":\"identify\",\"zipcode\":\"50000\",\"city\":\"Full\"}\n")
        .unwrap();
    station.set_nonblocking(true).unwrap();
    let line = format!("{{\"type\":\"metrics\",\"data\":\"{}\"}}\n", wide_data());
    // Write until the socket stops taking bytes for a while: the server stopped reading.
    let mut written = 0usize;
    let mut stalled_since: Option<Instant> = None;
    let start_t = Instant::now();
    loop {
        match station.write(line.as_bytes()) {
            Ok(n) => {
                written += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write: {e}"),
        }
        assert!(
            start_t.elapsed() < Duration::from_secs(60),
            "the server never stopped reading"
        );
    }
    let stats = app.server().buffer_stats();
    let b = &stats[0];
    assert!(b.full_events.get() > 0, "the buffer reported full");
    assert!(
        b.disk_bytes.get() <= 4 << 20,
        "disk use {} over the bound",
        b.disk_bytes.get()
    );
    let files: u64 = std::fs::read_dir(dir.path().join("shard-0"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    assert!(
        files <= 4 << 20,
        "files hold {files} bytes, over BUFFER_MAX_BYTES"
    );
    let t = app.server().totals();
    assert_eq!(t.records_failed, 0, "block refuses nothing");
    assert!(
        t.lines_received < (written / line.len()) as u64,
        "the server stopped reading"
    );
    eprintln!(
        "wrote {written} bytes; buffer {} bytes, {} records",
        b.disk_bytes.get(),
        b.records.get()
    );
}

/// Issue test 3, `drop_newest`: once full, new lines are refused, counted, and an
/// acknowledging station gets `buffer_full` nacks for exactly those.
#[test]
fn a_full_buffer_drops_the_newest_with_a_nack() {
    let dir = TempDir::new("buffer-drop");
    let app = start_disk(
        &dir,
        &[
            "--shards",
            "1",
            "--kafka-brokers",
            "127.0.0.1:1",
            "--buffer-max-bytes",
            "4MiB",
            "--buffer-when-full",
            "drop_newest",
        ],
    );
    // ~2 MiB of segment room in 1 MiB segments: 6,000 lines of ~1 KB cannot all fit.
    let data = wide_data();
    let mut s = TcpStream::connect(app.local_addr()).unwrap();
    s.write_all(b"{\"type\":\"identify\",\"zipcode\":\"50001\",\"city\":\"Drop\",\"acks\":true}\n")
        .unwrap();
    let text: String = (0..6_000u64)
        .map(|i| format!("{{\"type\":\"metrics\",\"seq\":{i},\"data\":\"{data}\"}}\n"))
        .collect();
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(text.as_bytes()))
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut replies = BufReader::new(s);
    let (mut acked, mut nacked) = (BTreeSet::new(), BTreeSet::new());
    let mut next = 0u64;
    while next < 6_000 {
        match read_reply(&mut replies).expect("an answer for every line") {
            Reply::Ack { seq: end } | Reply::AckUpto { upto: end } => {
                acked.extend(next..=end);
                next = end + 1;
            }
            Reply::Nack { seq, code } => {
                assert_eq!(code, NackCode::BufferFull);
                assert_eq!(seq, next, "answers in order");
                nacked.insert(seq);
                next = seq + 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    writer.join().unwrap().unwrap();
    assert!(
        !acked.is_empty() && !nacked.is_empty(),
        "acked {} nacked {}",
        acked.len(),
        nacked.len()
    );
    // The newest were dropped: every ack comes before the first nack.
    assert!(acked.last() < nacked.first());
    let t = app.server().totals();
    assert_eq!(
        t.records_failed,
        nacked.len() as u64,
        "each refused line counted"
    );
    let stats = app.server().buffer_stats();
    assert!(stats[0].full_events.get() >= nacked.len() as u64);
    assert_eq!(
        stats[0].records.get() as usize,
        acked.len(),
        "the acknowledged lines are buffered"
    );
}

/// Writes `count` acknowledged lines per station into a buffer with the broker unreachable,
/// then stops (the lines stay in the log): a buffer directory to damage or adopt.
fn fill_buffer(dir: &TempDir, shards: &str, stations: usize, count: u64) -> Vec<i64> {
    let app = start_disk(
        dir,
        &[
            "--shards",
            shards,
            "--kafka-brokers",
            "127.0.0.1:1",
            "--shutdown-timeout",
            "1s",
            "--buffer-max-bytes",
            "256MiB",
        ],
    );
    let addr = app.local_addr();
    std::thread::scope(|scope| {
        for i in 0..stations {
            scope.spawn(move || {
                let a = acked_station(
                    addr,
                    &format!("{:05}", 60_000 + i),
                    0..count,
                    Duration::from_secs(60),
                );
                assert_eq!(a.acked.len() as u64, count, "station {i}: all acknowledged");
            });
        }
    });
    let per_shard = app
        .server()
        .buffer_stats()
        .iter()
        .map(|b| b.records.get())
        .collect();
    let report = app.stop().unwrap();
    assert_eq!(report.totals.records_delivered, 0);
    assert_eq!(
        report.totals.records_spilled, 0,
        "a disk buffer keeps what Kafka did not take"
    );
    per_shard
}

/// Issue test 4: a torn tail, a flipped byte in the middle of a segment, a missing
/// checkpoint and a stray empty file: the server starts, delivers every valid record before
/// the damage, quarantines and counts the rest, and says so on `/readyz`.
#[test]
fn damaged_buffers_start_deliver_what_is_valid_and_quarantine_the_rest() {
    const LINES: u64 = 3_000;
    let dir = TempDir::new("buffer-damage");
    fill_buffer(&dir, "1", 1, LINES);
    let shard = dir.path().join("shard-0");
    let segment = std::fs::read_dir(&shard)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    // Where the records end: the last non-zero byte.
    let end = bytes.iter().rposition(|&b| b != 0).unwrap();
    // A flipped byte two thirds in, a torn (zeroed) tail in the last few records.
    let flip = 4096 + (end - 4096) * 2 / 3;
    bytes[flip] ^= 0x5a;
    for b in &mut bytes[end - 300..=end] {
        *b = 0;
    }
    std::fs::write(&segment, &bytes).unwrap();
    std::fs::remove_file(shard.join("checkpoint")).unwrap();
    std::fs::write(shard.join("stray.tmp"), b"").unwrap();

    let brokers = broker();
    let topic = fresh_topic(&brokers, "disk-damage");
    let app = start_disk(
        &dir,
        &[
            "--shards",
            "1",
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            &topic,
            "--buffer-max-bytes",
            "256MiB",
        ],
    );
    let stats = app.server().buffer_stats();
    let quarantined = stats[0].quarantined_records.get();
    assert!(
        quarantined > 0,
        "the records after the flipped byte are quarantined"
    );
    let notes = app_readyz(&app);
    assert!(
        notes.starts_with("ready\n") && notes.contains("quarantine"),
        "{notes}"
    );
    wait_for(
        "the valid records delivered",
        Duration::from_secs(60),
        || stats[0].records.get() == 0,
    );
    // Once its valid prefix is delivered, the damaged segment is set aside, not deleted.
    wait_for(
        "the damaged segment in quarantine/",
        Duration::from_secs(30),
        || std::fs::read_dir(shard.join("quarantine")).is_ok_and(|d| d.count() >= 1),
    );
    let delivered = app.server().totals().records_delivered;
    let report = app.stop().unwrap();
    assert_eq!(report.totals.records_failed, 0);
    let records = consume(&brokers, &topic, delivered as usize);
    let (by_station, duplicates) = arrived(&records);
    assert_eq!(duplicates, 0);
    let seqs = by_station.into_values().next().unwrap();
    // A prefix, intact: everything before the damage, in order; nothing after it.
    assert_eq!(seqs, (0..delivered).collect::<Vec<_>>());
    assert!(
        delivered > LINES / 2 && delivered < LINES,
        "delivered {delivered} of {LINES}"
    );
    assert!(delivered + quarantined <= LINES);
}

fn app_readyz(app: &stormgate::app::App) -> String {
    let addr = app.metrics_addr().expect("metrics endpoint");
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    text.split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned()
}

/// Issue test 5: records buffered by two shards arrive after a restart with one; the
/// orphaned directory is drained and removed.
#[test]
fn fewer_shards_drain_the_orphaned_directory() {
    const STATIONS: usize = 16;
    const LINES: u64 = 200;
    let dir = TempDir::new("buffer-adopt");
    let per_shard = fill_buffer(&dir, "2", STATIONS, LINES);
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "both shards buffered records: {per_shard:?}"
    );
    let brokers = broker();
    let topic = fresh_topic(&brokers, "disk-adopt");
    let orphan = dir.path().join("shard-1");
    assert!(orphan.exists());
    let app = start_disk(
        &dir,
        &[
            "--shards",
            "1",
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            &topic,
            "--buffer-max-bytes",
            "256MiB",
        ],
    );
    let total = STATIONS as u64 * LINES;
    wait_for(
        "every record of both shards delivered",
        Duration::from_secs(60),
        || app.server().totals().records_delivered == total,
    );
    wait_for(
        "the orphaned directory removed",
        Duration::from_secs(30),
        || !orphan.exists(),
    );
    app.stop().unwrap();
    let records = consume(&brokers, &topic, total as usize);
    let (by_station, duplicates) = arrived(&records);
    assert_eq!(duplicates, 0);
    assert_eq!(by_station.len(), STATIONS);
    for (zip, seqs) in by_station {
        assert_eq!(seqs, (0..LINES).collect::<Vec<_>>(), "{zip}");
    }
}

/// A loop-mounted ext4 file system of `mib` MiB, unmounted and removed on drop. Needs root
/// and loop devices; without them the test fails and says so.
struct SmallFs {
    base: PathBuf,
    mnt: PathBuf,
}

impl SmallFs {
    fn new(name: &str, mib: u64) -> SmallFs {
        fn sh(cmd: &str, args: &[&str]) {
            let out = Command::new(cmd)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert!(
                out.status.success(),
                "this test needs root and loop devices; `{cmd} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", uuid::Uuid::now_v7()));
        let mnt = base.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let img = base.join("img");
        let img = img.to_str().unwrap();
        sh("truncate", &["-s", &format!("{mib}M"), img]);
        sh("mkfs.ext4", &["-q", "-F", img]);
        sh("mount", &["-o", "loop", img, mnt.to_str().unwrap()]);
        SmallFs { base, mnt }
    }

    /// Takes all but `leave` bytes of the free space into one file, returned.
    fn fill(&self, leave: u64) -> PathBuf {
        let c = std::ffi::CString::new(self.mnt.to_str().unwrap()).unwrap();
        // SAFETY: statvfs fills the struct we pass.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        let free = st.f_bavail * st.f_frsize;
        let path = self.mnt.join("filler");
        let f = std::fs::File::create(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open descriptor.
        let len = free.saturating_sub(leave) as i64;
        assert_eq!(
            unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) },
            0,
            "filler"
        );
        f.sync_all().unwrap();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: a file the kernel still holds open for a moment (an io_uring request
        // being torn down with its ring) must not leave the mount behind.
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Issue test 6: the disk fills up under the buffer (ENOSPC, for real, on a loop-mounted
/// file system): the shard stops reading instead of acknowledging what it cannot make
/// durable, the errors are counted, `/readyz` says why, and once space comes back every
/// line is acknowledged; a restart with the broker delivers them all. (EIO is injected below
/// the log by stormgate-buffer's own fault tests.)
#[test]
fn a_full_disk_stops_reading_and_loses_nothing_acknowledged() {
    const LINES: u64 = 12_000;
    let fs = SmallFs::new("stormgate-enospc", 64);
    let dir = fs.mnt.join("buffer");
    let dir_arg = dir.to_string_lossy().into_owned();
    let args = |brokers: &str, topic: &str| -> Vec<String> {
        [
            "--shards",
            "1",
            "--kafka-brokers",
            brokers,
            "--kafka-topic",
            topic,
            "--shutdown-timeout",
            "1s",
            "--buffer-type",
            "disk",
            "--buffer-dir",
            &dir_arg,
            "--buffer-max-bytes",
            "32MiB",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let brokers = broker();
    let topic = fresh_topic(&brokers, "disk-enospc");
    let first_args = args("127.0.0.1:1", &topic);
    let app = start(&first_args.iter().map(String::as_str).collect::<Vec<_>>());
    // ~3 MiB left: the log's first segments fit, the ones after do not.
    let filler = fs.fill(3 << 20);
    let addr = app.local_addr();
    let station = std::thread::spawn(move || {
        acked_station_with(
            addr,
            "70000",
            0..LINES,
            Duration::from_secs(180),
            Some(wide_data()),
        )
    });
    let stats = app.server().buffer_stats();
    wait_for("storage errors", Duration::from_secs(60), || {
        stats[0].storage_errors.get() > 0
    });
    // While the disk is full some flushes may still succeed (a write that fits, after one
    // that did not), and each success reports the storage as recovered until the next
    // failure: /readyz says "storage failing" while the failures last, not at every instant.
    wait_for(
        "/readyz to report the failing storage",
        Duration::from_secs(30),
        || app_readyz(&app).contains("storage failing"),
    );
    // Reading stopped short of the stations' lines, and only durable lines were answered.
    std::thread::sleep(Duration::from_secs(1));
    let received = app.server().totals().lines_received;
    assert!(received < LINES, "the shard kept reading: {received} lines");
    assert!(stats[0].durable_seq.get() < LINES as i64);

    std::fs::remove_file(filler).unwrap();
    let answers = station.join().unwrap();
    assert!(answers.nacks.is_empty(), "{:?}", answers.nacks);
    assert_eq!(
        answers.acked.len() as u64,
        LINES,
        "every line acknowledged once space came back"
    );
    assert!(app_readyz(&app).starts_with("ready"));
    app.stop().unwrap();

    let second_args = args(&brokers, &topic);
    let app = start(&second_args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for(
        "every acknowledged line delivered",
        Duration::from_secs(120),
        || app.server().totals().records_delivered == LINES,
    );
    app.stop().unwrap();
    let records = consume(&brokers, &topic, LINES as usize);
    let (by_station, duplicates) = arrived(&records);
    assert_eq!(duplicates, 0);
    assert_eq!(by_station["70000"], (0..LINES).collect::<Vec<_>>());
}

/// `TCP_ACK_AFTER=delivered` keeps acknowledgements after Kafka's delivery report, with a
/// disk buffer too: durable lines are not acknowledged while the broker is down, and every
/// one is once it is back.
#[test]
fn ack_after_delivered_waits_for_kafka_even_when_durable() {
    const TOPIC: &str = "disk-ack-after";
    const LINES: u64 = 300;
    let dir = TempDir::new("buffer-ack-after");
    let cluster = EmbeddedCluster::start(TOPIC, 6).unwrap();
    let brokers = cluster.bootstrap_servers();
    cluster.mock().broker_down(1).unwrap();
    let app = start_disk(
        &dir,
        &[
            "--shards",
            "1",
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            TOPIC,
            "--buffer-max-bytes",
            "64MiB",
            "--ack-after",
            "delivered",
        ],
    );
    let mut s = TcpStream::connect(app.local_addr()).unwrap();
    s.write_all(
        b"{\"type\":\"identify\",\"zipcode\":\"80000\",\"city\":\"Later\",\"acks\":true}\n",
    )
    .unwrap();
    s.write_all(station_lines(0, 0, LINES).as_bytes()).unwrap();
    let stats = app.server().buffer_stats();
    wait_for("every line durable", Duration::from_secs(30), || {
        stats[0].durable_seq.get() >= LINES as i64
    });
    // Durable, yet the broker is down: no answer (a second is many group commits).
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut replies = BufReader::new(s);
    let silent = read_reply(&mut replies);
    assert!(
        silent
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "answered before delivery: {silent:?}"
    );
    cluster.mock().broker_up(1).unwrap();
    replies
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answered = 0;
    while answered < LINES {
        match read_reply(&mut replies).expect("an answer") {
            Reply::Ack { seq: n } | Reply::AckUpto { upto: n } => answered = n + 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(app.server().totals().records_delivered, LINES);
    app.stop().unwrap();
}
