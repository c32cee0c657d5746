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
