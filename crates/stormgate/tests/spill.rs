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
use support::*;

const TOPIC: &str = "spill";
const STATIONS: usize = 10;
const LINES: usize = 30;

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
    let ids: BTreeSet<(String, u64)> = spilled
        .iter()
        .map(|l| {
            assert!(l.reason.contains("MessageTimedOut"), "{}", l.reason);
            assert_eq!(l.topic, TOPIC);
            let value: serde_json::Value =
                serde_json::from_slice(&l.value_bytes().unwrap().unwrap()).unwrap();
            assert_eq!(l.key.as_deref(), value["zipcode"].as_str());
            id(&value)
        })
        .collect();
    assert_eq!(ids.len(), total, "each record once");

    // Still down: replay keeps every record, with the new reason.
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let err = stormgate::app::replay(&replay_cli(&brokers), &files[0], None).unwrap_err();
    assert!(err.to_string().contains("stay in"), "{err:#}");
    assert_eq!(read_spill(&dir).len(), total, "nothing removed");

    cluster.mock().broker_up(1).unwrap();
    let mut delivered = 0;
    for file in &files {
        let report = stormgate::app::replay(&replay_cli(&brokers), file, None).unwrap();
        assert_eq!(report.kept(), 0);
        delivered += report.delivered;
        assert!(!file.exists(), "a fully replayed file is removed");
    }
    assert_eq!(delivered, total as u64);
    let records = consume(&brokers, TOPIC, total);
    let consumed: BTreeSet<(String, u64)> = records.iter().map(|r| id(&r.value)).collect();
    assert_eq!(
        consumed, ids,
        "replay delivered exactly the spilled records"
    );
    for r in &records {
        assert_eq!(r.key, r.value["zipcode"].as_str().unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
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
