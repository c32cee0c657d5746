//! `produce` and `consume` against a broker: the one in `STORMGATE_TEST_KAFKA` (a fresh topic
//! per run), or else librdkafka's mock cluster started in the test, so this always runs.

use std::process::{Command, Output};

use serde_json::Value;
use stormgate_kafka::EmbeddedCluster;
use stormgate_kafka::verify::create_topic;

const PARTITIONS: i32 = 6;

/// A topic to use and the brokers that hold it; the mock cluster (if any) must outlive the
/// runs.
struct Broker {
    brokers: String,
    topic: String,
    _cluster: Option<EmbeddedCluster>,
}

fn broker() -> Broker {
    let topic = format!("loadgen.test.{}", uuid::Uuid::now_v7());
    match std::env::var("STORMGATE_TEST_KAFKA") {
        Ok(brokers) if !brokers.is_empty() => {
            create_topic(&brokers, &topic, PARTITIONS).expect("create the topic");
            Broker {
                brokers,
                topic,
                _cluster: None,
            }
        }
        _ => {
            let cluster = EmbeddedCluster::start(&topic, PARTITIONS).expect("mock cluster");
            Broker {
                brokers: cluster.bootstrap_servers(),
                topic,
                _cluster: Some(cluster),
            }
        }
    }
}

fn loadgen(args: &[&str]) -> (Output, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_stormgate-loadgen"))
        .args(args)
        .output()
        .expect("run stormgate-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "no JSON summary; stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, summary)
}

#[test]
fn produced_records_are_all_consumed_and_checked() {
    let b = broker();
    let (out, produced) = loadgen(&[
        "produce",
        "--brokers",
        &b.brokers,
        "--topic",
        &b.topic,
        "--records=20000",
        "--keys=100",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(produced["mode"], "produce");
    assert_eq!(produced["records"], 20_000);
    assert_eq!(produced["delivered"], 20_000);
    assert_eq!(produced["failed"], 0);
    assert_eq!(produced["warmup_records"], 1);
    assert_eq!(produced["compression"], "lz4");
    assert_eq!(produced["acks"], "all");
    assert!(produced["records_per_s"].as_f64().unwrap() > 0.0);

    let (out, consumed) = loadgen(&[
        "consume",
        "--brokers",
        &b.brokers,
        "--topic",
        &b.topic,
        "--expect=20001",
        "--timeout=60s",
        "--quiet-progress",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(consumed["mode"], "consume");
    assert_eq!(
        consumed["records"], 20_001,
        "20,000 plus the warm-up record"
    );
    assert_eq!(consumed["keys"], 100);
    assert_eq!(consumed["partitions"], PARTITIONS);
    assert_eq!(consumed["end"], "complete");
    assert_eq!(consumed["broker_records"], 20_001, "all the broker holds");
    assert_eq!(consumed["offset_holes"], 0);
    assert_eq!(consumed["bad_records"], 0);
    assert_eq!(consumed["key_mismatches"], 0);
    assert_eq!(consumed["out_of_order"], 0);
    // The ceiling's records carry no seq, but every one has sent_us.
    assert_eq!(consumed["without_seq"], 20_001);
    assert_eq!(
        (&consumed["duplicates"], &consumed["missing"]),
        (&0.into(), &0.into())
    );
    assert_eq!(consumed["consume_latency_us"]["count"], 20_001);
    assert_eq!(consumed["ingest_latency_us"]["count"], 20_001);

    // Asking for more than there is ends at the timeout, and fails.
    let (out, short) = loadgen(&[
        "consume",
        "--brokers",
        &b.brokers,
        "--topic",
        &b.topic,
        "--expect=20002",
        "--timeout=3s",
        "--quiet-progress",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(short["records"], 20_001);
    assert_eq!(short["end"], "timeout");
}

/// The checks on sequence numbers find what they are for: records with seqs, one of them
/// twice, one missing, one under another station's key, one not a record at all.
#[test]
fn consume_reports_duplicates_gaps_key_mismatches_and_bad_records() {
    let b = broker();
    let value = |zip: &str, seq: u64| {
        format!(
            r#"{{"zipcode":"{zip}","city":"C","received_at_ms":1,"seq":{seq},"metrics":{{"t":1.0}}}}"#
        )
        .into_bytes()
    };
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    // Station 00001: seqs 0..100 but 50. The warm-up record of `produce_prebuilt` is the first
    // one, sent once more: seq 0 of 00001 twice.
    for seq in (0..100).filter(|&s| s != 50) {
        records.push((b"00001".to_vec(), value("00001", seq)));
    }
    // Station 00002: seqs 0..100, one of them under 00003's key.
    for seq in 0..100 {
        let key: &[u8] = if seq == 7 { b"00003" } else { b"00002" };
        records.push((key.to_vec(), value("00002", seq)));
    }
    records.push((b"00002".to_vec(), b"not a record".to_vec()));
    let settings = stormgate_kafka::KafkaSettings {
        topic: b.topic.clone(),
        ..stormgate_kafka::KafkaSettings::new(b.brokers.clone())
    };
    let total = records.len() as u64;
    let report =
        stormgate_kafka::ceiling::produce_prebuilt(&settings, &records, total).expect("produce");
    assert_eq!((report.delivered, report.failed), (total, 0));
    let expect = format!("--expect={}", total + 1);
    let (out, consumed) = loadgen(&[
        "consume",
        "--brokers",
        &b.brokers,
        "--topic",
        &b.topic,
        &expect,
        "--lines-per-conn=100",
        "--timeout=60s",
        "--quiet-progress",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(consumed["records"], total + 1);
    assert_eq!(consumed["duplicates"], 1, "{consumed}");
    // 00001's seq 50; 00002's seq 7, read under 00003's key; and 00003's seqs but 7.
    assert_eq!(consumed["missing"], 1 + 1 + 99, "{consumed}");
    assert_eq!(consumed["key_mismatches"], 1, "{consumed}");
    assert_eq!(consumed["bad_records"], 1, "{consumed}");
    assert_eq!(consumed["without_seq"], 0, "{consumed}");
}
