//! Apache Kafka stopped for 30 s under steady load, then started again, with its data on disk
//! and the producers as configured by default (idempotent, acks=all).
//!
//! Every line accepted reaches the topic exactly once, in order per station: what Kafka
//! acknowledged before it stopped is still there after it starts again, and what the shards
//! held during the outage is delivered afterwards with the same producer ids (Kafka keeps
//! producer state on disk, so the idempotent producer carries on). Nothing fails, nothing is
//! spilled. The topics keep their partition counts across the restart. Meanwhile connections
//! stay open, the sockets are back-pressured (reading stops once the bounded queues are full)
//! and the process's memory stays within the configured bounds.
//!
//! This file holds one test so that the process's RSS is the server's (plus the stations).

mod support;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stormgate_station::Station;
use stormgate_testkit::*;
use support::*;

/// The broker of this test's own sits at the suite broker's port + 10 (see [`OwnBroker`]).
const PORT_OFFSET: u16 = 10;
const STATIONS: usize = 10;
/// Lines per second per station.
const RATE: u64 = 200;
const OUTAGE: Duration = Duration::from_secs(30);
/// Small queues, so that even a shard serving a single station fills them within 15 s.
const QUEUE: usize = 256;
const PRODUCER_QUEUE: usize = 2_000;
/// Shards `support::start` runs.
const SHARDS: usize = 2;

#[test]
fn a_broker_restart_under_load_delivers_every_line_exactly_once_in_order() {
    let kafka = OwnBroker::start_fresh(PORT_OFFSET, &[]);
    let brokers = kafka.brokers();
    let topic = fresh_topic(&brokers, "restart");
    // A topic with another partition count than the default, to tell a kept topic from one
    // created again.
    let other = format!("restart-other-{}", uuid::Uuid::now_v7().simple());
    stormgate_kafka::verify::create_topic(&brokers, &other, 5).expect("create topic");
    assert_eq!(partitions_of(&brokers, &topic), 6);
    assert_eq!(partitions_of(&brokers, &other), 5);
    let spill_dir =
        std::env::temp_dir().join(format!("stormgate-restart-{}", uuid::Uuid::now_v7()));
    let app = start(&[
        "--spill-dir",
        spill_dir.to_str().unwrap(),
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        &topic,
        "--queue-size",
        &QUEUE.to_string(),
        "--kafka-queue-max-records",
        &PRODUCER_QUEUE.to_string(),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..STATIONS)
        .map(|i| {
            let mut s = Station::connect(app.local_addr()).unwrap();
            s.identify(&format!("{i:05}"), "Restart").unwrap();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut stream = s.stream().try_clone().unwrap();
                let start = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = start.elapsed().as_millis() as u64 * RATE / 1000;
                    while n < due && !stop.load(Ordering::Relaxed) {
                        let line = format!(
                            "{{\"type\":\"metrics\",\"seq\":{n},\"data\":\"t={i}.{n}\"}}\n"
                        );
                        // Blocks while the server does not read: that is the backpressure.
                        if stream.write_all(line.as_bytes()).is_err() {
                            return (s, n);
                        }
                        n += 1;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                (s, n)
            })
        })
        .collect();
    let totals = || app.server().totals();
    // The first records wait for the producers' ids.
    wait_for("records flowing", Duration::from_secs(60), || {
        totals().records_delivered > 1000
    });
    let rss_before = rss_bytes(std::process::id());

    // What the broker holds when it stops: every record of it must be there after the
    // restart, at the same offsets (the final read checks them all from offset 0).
    let before_stop = stormgate_kafka::verify::watermarks(&brokers, &topic, &[]).unwrap();
    let held_before: i64 = before_stop.values().map(|(low, high)| high - low).sum();
    assert!(held_before > 0, "records in the topic before the stop");
    kafka.stop();
    // Acknowledgements that were on the wire have arrived; nothing is delivered from now on.
    std::thread::sleep(Duration::from_secs(1));
    let acked_by_old = totals().records_delivered;
    let outage_start = Instant::now();
    let mut rss_peak = 0;
    let mut received_at_20s = None;
    while outage_start.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_millis(500));
        rss_peak = rss_peak.max(rss_bytes(std::process::id()));
        let t = totals();
        assert_eq!(
            t.connections_active, STATIONS as i64,
            "connections stay open"
        );
        assert_eq!(
            t.records_failed, 0,
            "nothing fails within the delivery timeout"
        );
        assert_eq!(
            t.records_delivered, acked_by_old,
            "nothing delivered while down"
        );
        if received_at_20s.is_none() && outage_start.elapsed() >= Duration::from_secs(20) {
            received_at_20s = Some(t.lines_received);
        }
    }
    let t = totals();
    eprintln!(
        "outage: {} lines accepted, {} acknowledged before it; RSS {} -> peak {} MiB",
        t.records_enqueued,
        acked_by_old,
        rss_before >> 20,
        rss_peak >> 20
    );
    // Per shard 256 + 2,000 records of queues; at 200 lines/s per station even a shard with
    // one station is full after ~11 s, so for the last 10 s nothing was read and the
    // stations' writes were held in TCP.
    assert_eq!(
        Some(t.lines_received),
        received_at_20s,
        "reading stopped once the queues were full"
    );
    // Per shard the two queues, plus at most one record per connection waiting for room.
    let bound = (SHARDS * (QUEUE + PRODUCER_QUEUE) + STATIONS) as u64;
    let buffered = t.records_enqueued - acked_by_old;
    assert!(
        buffered <= bound,
        "{buffered} records buffered, bound {bound}"
    );
    // A few thousand records of ~220 bytes: well under a MiB; the margin is for allocator
    // slack, librdkafka's buffers and the stations' own threads.
    assert!(
        rss_peak < rss_before + (64 << 20),
        "memory stays bounded: {} -> {} MiB",
        rss_before >> 20,
        rss_peak >> 20
    );

    kafka.start();
    // Nothing creates the topics again: they come back from the broker's disk as they were.
    assert_eq!(
        partitions_of(&brokers, &topic),
        6,
        "{topic} keeps 6 partitions"
    );
    assert_eq!(
        partitions_of(&brokers, &other),
        5,
        "{other} keeps 5 partitions"
    );
    let after_start = stormgate_kafka::verify::watermarks(&brokers, &topic, &[]).unwrap();
    for (partition, &(low, high)) in &before_stop {
        let (low_now, high_now) = after_start[partition];
        assert!(
            low_now == low && high_now >= high,
            "partition {partition}: [{low}, {high}) before the stop, [{low_now}, {high_now}) after"
        );
    }
    // The held records flow again before the stations stop sending.
    wait_for(
        "deliveries after the restart",
        Duration::from_secs(60),
        || totals().records_delivered > acked_by_old,
    );
    stop.store(true, Ordering::Relaxed);
    let stations: Vec<(Station, u64)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    wait_for("everything settled", Duration::from_secs(120), || {
        let t = totals();
        t.records_delivered + t.records_failed == t.records_enqueued
    });
    let report = app.stop().unwrap();
    let t = report.totals;
    drop(stations);

    assert_eq!(
        t.records_failed, 0,
        "nothing failed: the outage is within the delivery timeout"
    );
    let spilled: Vec<_> = std::fs::read_dir(&spill_dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(
        spilled
            .iter()
            .all(|f| std::fs::metadata(f).unwrap().len() == 0),
        "nothing spilled: {spilled:?}"
    );
    assert_eq!(t.records_delivered, t.records_enqueued);
    assert!(
        t.records_enqueued as i64 >= held_before,
        "the topic held {held_before} records before the stop, {} accepted in all",
        t.records_enqueued
    );

    // Everything from offset 0: what the broker acknowledged before it stopped, and all since.
    let expected = t.records_enqueued as usize;
    let records = consume(&brokers, &topic, expected);
    let groups = by_key(&records);
    assert_eq!(groups.len(), STATIONS, "every station's records");
    for (zip, recs) in groups {
        let seqs: Vec<u64> = recs
            .iter()
            .map(|r| r.value["seq"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(
            seqs, want,
            "{zip}: every accepted line once, in the order sent"
        );
    }
    let _ = std::fs::remove_dir_all(&spill_dir);
}
