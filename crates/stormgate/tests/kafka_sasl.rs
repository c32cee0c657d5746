//! Records reach Apache Kafka through its SASL listeners with SCRAM-SHA-512
//! (`KAFKA_PROP_SECURITY_PROTOCOL=SASL_SSL` or `SASL_PLAINTEXT`,
//! `KAFKA_PROP_SASL_MECHANISM=SCRAM-SHA-512`, `KAFKA_PROP_SASL_USERNAME`/`_PASSWORD`), with
//! the user `deploy/kafka/kafka.sh` creates when it formats the broker; a wrong password is
//! refused by the broker.

mod support;

use std::time::Duration;

use stormgate_kafka::verify::{self, ScanOptions};
use stormgate_station::Station;
use stormgate_testkit::*;
use support::*;

/// The broker of this test's own sits at the suite broker's port + 30 (see [`OwnBroker`]).
const PORT_OFFSET: u16 = 30;
/// The SCRAM user `deploy/kafka/kafka.sh` creates.
const USER: &str = "stormgate";
const PASSWORD: &str = "stormgate-test-password";
const LINES: u64 = 300;

fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Stormgate with `kafka_props` publishes `LINES` lines of two stations to a new topic at
/// `brokers`; they are read back with the same properties, each once and in order.
fn lines_reach_kafka(brokers: &str, kafka_props: &[(String, String)], label: &str) {
    let topic = format!("kafka-sasl-{label}-{}", uuid::Uuid::now_v7().simple());
    verify::create_topic_with(brokers, &topic, 3, kafka_props).expect("create the topic");
    let mut args = vec![
        "--kafka-brokers".to_owned(),
        brokers.to_owned(),
        "--kafka-topic".to_owned(),
        topic.clone(),
    ];
    for (name, value) in kafka_props {
        args.extend(["--kafka-prop".to_owned(), format!("{name}={value}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = start(&args);
    for zip in ["40001", "40002"] {
        let mut s = Station::connect(app.local_addr()).unwrap();
        let identify = format!(r#"{{"type":"identify","zipcode":"{zip}","city":"S","acks":true}}"#);
        s.send(format!("{identify}\n").as_bytes()).unwrap();
        for seq in 0..LINES {
            let line = format!("{{\"type\":\"metrics\",\"seq\":{seq},\"data\":\"t={seq}\"}}\n");
            s.send(line.as_bytes()).unwrap();
        }
        wait_for_ack(|| s.reply(), LINES - 1);
    }
    let report = app.stop().unwrap();
    assert_eq!(report.totals.records_delivered, 2 * LINES);

    let opts = ScanOptions {
        expect: Some(2 * LINES),
        timeout: Duration::from_secs(60),
        properties: kafka_props.to_vec(),
        ..ScanOptions::default()
    };
    let records = verify::read_topic_with(brokers, &topic, &opts).expect("read the topic");
    let marks = verify::watermarks(brokers, &topic, kafka_props).expect("watermarks");

    let errors = verify::offset_errors(records.iter().map(|r| (r.partition, r.offset)), &marks);
    assert!(errors.is_empty(), "{errors:?}");
    for zip in ["40001", "40002"] {
        let seqs: Vec<u64> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(zip.as_bytes()))
            .map(|r| {
                let v: serde_json::Value =
                    serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
                v["seq"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(
            seqs,
            (0..LINES).collect::<Vec<_>>(),
            "{label} {zip}: once each, in order"
        );
    }
}

#[test]
fn records_reach_kafka_through_scram_sha_512_over_tls_and_plain_tcp() {
    let dir = pki_dir();
    let ca = Ca::new("Kafka SASL test CA");
    let ca_file = dir.join("kafka-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (cert, key) = ca.server().write(&dir, "kafka-broker");
    let kafka = OwnBroker::start_fresh(
        PORT_OFFSET,
        &[
            ("KAFKA_TLS_CERT", cert.to_str().unwrap()),
            ("KAFKA_TLS_KEY", key.to_str().unwrap()),
        ],
    );
    let scram = [
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", USER),
        ("sasl.password", PASSWORD),
    ];

    let mut sasl_ssl = props(&scram);
    sasl_ssl.extend(props(&[
        ("security.protocol", "sasl_ssl"),
        ("ssl.ca.location", ca_file.to_str().unwrap()),
        ("ssl.endpoint.identification.algorithm", "https"),
    ]));
    lines_reach_kafka(&kafka.listeners["KAFKA_SASL_SSL_BROKERS"], &sasl_ssl, "ssl");

    let mut sasl_plaintext = props(&scram);
    sasl_plaintext.push(("security.protocol".into(), "sasl_plaintext".into()));
    let plain_brokers = &kafka.listeners["KAFKA_SASL_BROKERS"];
    lines_reach_kafka(plain_brokers, &sasl_plaintext, "plaintext");

    // The broker checks the password.
    let mut wrong = sasl_plaintext.clone();
    wrong.retain(|(k, _)| k != "sasl.password");
    wrong.push(("sasl.password".into(), "not-the-password".into()));
    let refused = verify::first_client_error(plain_brokers, &wrong, Duration::from_secs(30))
        .expect("a client")
        .expect("an error for a wrong password");
    assert!(
        refused.contains("SASL authentication error") && refused.contains("invalid credentials"),
        "{refused}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
