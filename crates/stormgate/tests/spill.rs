//! Records that finally fail delivery go to the spill file, and `replay` delivers them later:
//! with the mock cluster's broker down for longer than the delivery timeout.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use stormgate::cli::Cli;
use stormgate_kafka::EmbeddedCluster;
use stormgate_kafka::spill::SpillLine;
use stormgate_station::Station;
use stormgate_testkit::*;
use support::*;

const TOPIC: &str = "spill";
const STATIONS: usize = 10;
const LINES: usize = 30;
/// The topic replay's `--topic` sends the spilled records to.
const REPLAYED: &str = "spill-replayed";

fn spill_dir() -> PathBuf {
    std::env::temp_dir().join(format!("stormgate-spill-test-{}", uuid::Uuid::now_v7()))
}

fn read_spill(dir: &Path) -> Vec<SpillLine> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        lines.extend(
            text.lines()
                .map(|l| serde_json::from_str(l).expect("a spill line")),
        );
    }
    lines
}

/// (zipcode, seq) of a record value.
fn id(value: &serde_json::Value) -> (String, u64) {
    (
        value["zipcode"].as_str().unwrap().to_owned(),
        value["seq"].as_u64().unwrap(),
    )
}

fn replay_cli(brokers: &str) -> Cli {
    Cli::try_parse_from([
        "stormgate",
        "--kafka-brokers",
        brokers,
        "--kafka-delivery-timeout",
        "3s",
    ])
    .unwrap()
}

#[test]
fn failed_records_are_spilled_and_replay_delivers_them() {
    let cluster = EmbeddedCluster::start(TOPIC, 3).unwrap();
    cluster.mock().create_topic(REPLAYED, 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = spill_dir();
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        TOPIC,
        "--kafka-delivery-timeout",
        "1s",
        "--spill-dir",
        dir.to_str().unwrap(),
    ]);
    cluster.mock().broker_down(1).unwrap();
    let _stations: Vec<Station> = (0..STATIONS)
        .map(|i| {
            let mut s = Station::connect(app.local_addr()).unwrap();
            s.identify(&format!("{i:05}"), "Spill").unwrap();
            let lines: String = (0..LINES)
                .map(|n| format!("{{\"type\":\"metrics\",\"seq\":{n},\"data\":\"t={i}.{n}\"}}\n"))
                .collect();
            s.send(lines.as_bytes()).unwrap();
            s
        })
        .collect();
    let total = STATIONS * LINES;
    wait_for("every record failed", Duration::from_secs(30), || {
        app.server().totals().records_failed == total as u64
    });
    let totals = app.stop().unwrap().totals;
    assert_eq!(totals.records_delivered, 0);
    assert_eq!(
        totals.records_spilled, total as u64,
        "every failure spilled"
    );
    assert_eq!(totals.spill_failures, 0);

    let spilled = read_spill(&dir);
    assert_eq!(spilled.len(), total);
    // (zipcode, seq) → the record's timestamp, which replay must keep.
    let mut timestamps = std::collections::BTreeMap::new();
    let ids: Vec<(String, u64)> = spilled
        .iter()
        .map(|l| {
            assert!(l.reason.contains("MessageTimedOut"), "{}", l.reason);
            assert_eq!(l.topic, TOPIC);
            assert!(l.shard.is_some(), "written by a shard");
            let value: serde_json::Value =
                serde_json::from_slice(&l.value_bytes().unwrap().unwrap()).unwrap();
            assert_eq!(l.key.as_deref(), value["zipcode"].as_str());
            // FIXME: a record spilled from a failed delivery report has lost its timestamp:
            // librdkafka reports none for a message with an error
            // (`rd_kafka_message_timestamp` returns -1), and the sink writes what it reports.
            // Replay then stamps it anew. The record's own `received_at_ms` is still in its
            // value. When the sink writes the record's timestamp, this becomes `is_some()`.
            assert_eq!(l.timestamp_ms, None, "see the FIXME: the timestamp is back");
            timestamps.insert(id(&value), l.timestamp_ms);
            id(&value)
        })
        .collect();
    assert_eq!(timestamps.len(), total, "each record once");
    let expected: BTreeSet<(String, u64)> = (0..STATIONS)
        .flat_map(|i| (0..LINES as u64).map(move |n| (format!("{i:05}"), n)))
        .collect();
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every line sent is spilled"
    );

    // Still down: replaying any file keeps every one of its records, written back with the
    // new failure (failed after the replay started).
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2, "one file per shard: {files:?}");
    for file in &files {
        let before = std::fs::read_to_string(file).unwrap().lines().count();
        let replay_started_ms = now_ms();
        let err = stormgate::app::replay(&replay_cli(&brokers), file, None).unwrap_err();
        assert!(err.to_string().contains("stay in"), "{err:#}");
        let kept: Vec<SpillLine> = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(kept.len(), before, "nothing removed from {file:?}");
        for l in &kept {
            assert!(l.reason.contains("MessageTimedOut"), "{}", l.reason);
            assert!(l.failed_at_ms >= replay_started_ms, "a new failure time");
        }
    }
    assert_eq!(read_spill(&dir).len(), total, "nothing removed");

    // After recovery, replay to another topic (`--topic`) delivers every record once, with
    // its original key and timestamp (when the spill line has one; see the FIXME above).
    cluster.mock().broker_up(1).unwrap();
    let replayed_from_ms = now_ms();
    let mut delivered = 0;
    for file in &files {
        let report =
            stormgate::app::replay(&replay_cli(&brokers), file, Some(REPLAYED.into())).unwrap();
        assert_eq!(report.kept(), 0);
        delivered += report.delivered;
        assert!(!file.exists(), "a fully replayed file is removed");
    }
    assert_eq!(delivered, total as u64);
    let records = consume(&brokers, REPLAYED, total);
    let mut consumed: Vec<(String, u64)> = records.iter().map(|r| id(&r.value)).collect();
    let mut ids = ids;
    consumed.sort();
    ids.sort();
    assert_eq!(
        consumed, ids,
        "replay delivered exactly the spilled records, each once"
    );
    for r in &records {
        assert_eq!(r.key, r.value["zipcode"].as_str().unwrap());
        match timestamps[&id(&r.value)] {
            Some(t) => assert_eq!(r.timestamp_ms, Some(t), "the original timestamp"),
            None => assert!(
                r.timestamp_ms >= Some(replayed_from_ms),
                "stamped at replay: {:?}",
                r.timestamp_ms
            ),
        }
    }
    assert_eq!(
        consume_all(&brokers, TOPIC, 0).len(),
        0,
        "nothing went to the lines' own topic"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A spill directory that cannot be created (its parent is a file): every failed record is
/// lost, and counted so.
#[test]
fn a_failed_spill_write_is_counted_in_spill_failures() {
    let cluster = EmbeddedCluster::start("spill-fails", 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let parent = spill_dir();
    std::fs::write(&parent, "a file, not a directory").unwrap();
    let dir = parent.join("spill");
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        "spill-fails",
        "--kafka-delivery-timeout",
        "1s",
        "--spill-dir",
        dir.to_str().unwrap(),
    ]);
    cluster.mock().broker_down(1).unwrap();
    let mut s = Station::connect(app.local_addr()).unwrap();
    s.identify("00001", "Spill").unwrap();
    let lines: String = (0..20)
        .map(|n| format!("{{\"type\":\"metrics\",\"seq\":{n},\"data\":\"t={n}\"}}\n"))
        .collect();
    s.send(lines.as_bytes()).unwrap();
    wait_for("every record failed", Duration::from_secs(30), || {
        app.server().totals().records_failed == 20
    });
    let totals = app.stop().unwrap().totals;
    assert_eq!(totals.records_delivered, 0);
    assert_eq!(totals.records_spilled, 0);
    assert_eq!(totals.spill_failures, 20, "every lost record counted");
    assert!(!dir.exists());
    std::fs::remove_file(&parent).unwrap();
}

#[test]
fn replay_keeps_unreadable_lines_and_refuses_a_missing_file() {
    let cluster = EmbeddedCluster::start(TOPIC, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = spill_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shard-0.jsonl");
    let good = SpillLine::new(
        "test".into(),
        Some(0),
        TOPIC,
        Some(b"12345"),
        Some(1),
        Some(br#"{"zipcode":"12345","seq":0}"#),
    );
    let text = format!(
        "{}\nnot a spill line\n\n",
        serde_json::to_string(&good).unwrap()
    );
    std::fs::write(&file, text).unwrap();
    let err = stormgate::app::replay(&replay_cli(&brokers), &file, None).unwrap_err();
    assert!(err.to_string().contains("1 unreadable"), "{err:#}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "not a spill line\n"
    );
    assert_eq!(consume(&brokers, TOPIC, 1).len(), 1);

    let missing = dir.join("nothing-here.jsonl");
    assert!(stormgate::app::replay(&replay_cli(&brokers), &missing, None).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `stormgate replay` as operators run it: it waits out a server that was appending to the
/// file when replay took it (the record appended meanwhile is replayed too, not lost with the
/// renamed copy), and it exits non-zero when anything stays in the file.
#[test]
fn the_replay_command_waits_out_a_writer_and_fails_when_lines_stay() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let cluster = EmbeddedCluster::start("spill-cli", 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = spill_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shard-0.jsonl");
    let line = |seq: u64| {
        let value = format!(r#"{{"zipcode":"12345","seq":{seq}}}"#);
        let l = SpillLine::new(
            "test".into(),
            Some(0),
            "spill-cli",
            Some(b"12345"),
            Some(1_000 + seq as i64),
            Some(value.as_bytes()),
        );
        format!("{}\n", serde_json::to_string(&l).unwrap())
    };
    std::fs::write(&file, line(0)).unwrap();
    // A server in the middle of an append: the file open and locked.
    let mut writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    // SAFETY: flock on a valid, open descriptor.
    assert_eq!(unsafe { libc::flock(writer.as_raw_fd(), libc::LOCK_EX) }, 0);
    let replay = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_stormgate"))
            .args(["--kafka-brokers", &brokers, "replay"])
            .arg(file)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = replay(&file);
    // Replay has taken the file once the name is free.
    wait_for("replay to take the file", Duration::from_secs(10), || {
        !file.exists()
    });
    writer.write_all(line(1).as_bytes()).unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "replay waits for the lock"
    );
    // SAFETY: as above.
    unsafe { libc::flock(writer.as_raw_fd(), libc::LOCK_UN) };
    drop(writer);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let records = consume(&brokers, "spill-cli", 2);
    let mut seqs: Vec<u64> = records
        .iter()
        .map(|r| r.value["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [0, 1], "the line appended during the takeover too");
    for r in &records {
        let seq = r.value["seq"].as_i64().unwrap();
        assert_eq!(r.timestamp_ms, Some(1_000 + seq), "the original timestamp");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing left");

    // An unreadable line stays, and the command says so with its status.
    std::fs::write(&file, format!("{}not a spill line\n", line(2))).unwrap();
    let status = replay(&file).wait().unwrap();
    assert!(!status.success(), "{status}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "not a spill line\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
