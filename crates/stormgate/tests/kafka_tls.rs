//! Records reach Apache Kafka over TLS (`KAFKA_PROP_SECURITY_PROTOCOL=SSL`): the broker's own
//! SSL listener (PEM key and certificate, `ssl.keystore.type=PEM`), whose certificate
//! librdkafka's OpenSSL verifies, host name included, before it sends anything. Every client
//! connection — bootstrap, the partition leader, the admin client, the verifying consumer —
//! goes through TLS: the broker advertises its SSL listener to clients that came through it.

mod support;

use std::time::Duration;

use stormgate_kafka::verify::{self, ScanEvent, ScanOptions};
use stormgate_testkit::*;
use support::*;

/// The broker of this test's own sits at the suite broker's port + 20 (see [`OwnBroker`]).
const PORT_OFFSET: u16 = 20;

#[test]
fn records_reach_the_broker_over_tls() {
    let dir = pki_dir();
    let ca = Ca::new("Kafka test CA");
    let ca_file = dir.join("kafka-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let server = ca.server();
    let (broker_cert, broker_key) = server.write(&dir, "kafka-broker");
    let kafka = OwnBroker::start_fresh(
        PORT_OFFSET,
        &[
            ("KAFKA_TLS_CERT", broker_cert.to_str().unwrap()),
            ("KAFKA_TLS_KEY", broker_key.to_str().unwrap()),
        ],
    );
    let brokers = kafka.listeners["KAFKA_SSL_BROKERS"].clone();

    // What every client needs to reach it: TLS, trusting the test CA, checking the name.
    let tls_props: Vec<(String, String)> = [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca_file.to_str().unwrap()),
        ("ssl.endpoint.identification.algorithm", "https"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let topic = format!("kafka-tls-{}", uuid::Uuid::now_v7().simple());
    verify::create_topic_with(&brokers, &topic, 3, &tls_props).expect("create topic over TLS");

    let mut args = vec![
        "--kafka-brokers".to_owned(),
        brokers.clone(),
        "--kafka-topic".to_owned(),
        topic.clone(),
        "--tls-cert".to_owned(),
    ];
    // Stations speak TLS too: both sides of Stormgate encrypted.
    let (cert, key) = server.write(&dir, "station-listener");
    args.extend([
        cert.to_str().unwrap().to_owned(),
        "--tls-key".to_owned(),
        key.to_str().unwrap().to_owned(),
    ]);
    for (name, value) in &tls_props {
        args.extend(["--kafka-prop".to_owned(), format!("{name}={value}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = start(&args);
    const STATIONS: u64 = 3;
    const LINES: u64 = 200;
    let mut stations: Vec<TlsStation> = (0..STATIONS)
        .map(|_| TlsStation::connect(app.local_addr(), ca.client_config(None)).unwrap())
        .collect();
    for (i, s) in stations.iter_mut().enumerate() {
        s.send(&identify(&format!("2000{i}"), None)).unwrap();
        for seq in 1..=LINES {
            s.send(&metrics(seq, &format!("pressure={seq}"))).unwrap();
        }
    }
    for s in &mut stations {
        s.wait_for_ack(LINES);
    }
    app.stop().unwrap();

    // Read back over TLS as well.
    let opts = ScanOptions {
        expect: Some(STATIONS * LINES),
        timeout: Duration::from_secs(60),
        properties: tls_props,
        ..ScanOptions::default()
    };
    let mut seen = std::collections::BTreeMap::<String, Vec<f64>>::new();
    verify::scan_topic(&brokers, &topic, &opts, |event| {
        if let ScanEvent::Record(r) = event {
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let value: serde_json::Value = serde_json::from_slice(r.value.unwrap()).unwrap();
            seen.entry(key)
                .or_default()
                .push(value["metrics"]["pressure"].as_f64().unwrap());
        }
    })
    .expect("read the topic over TLS");
    assert_eq!(seen.len(), STATIONS as usize);
    for (zipcode, values) in &seen {
        let expected: Vec<f64> = (1..=LINES).map(|seq| seq as f64).collect();
        assert_eq!(values, &expected, "{zipcode}: every line, in order");
    }

    // A broker whose certificate another CA signed is refused, with librdkafka's default
    // verification (no verification property set): the line is nacked at the delivery
    // timeout and nothing is delivered.
    let other_ca_file = dir.join("other-ca.pem");
    std::fs::write(&other_ca_file, Ca::new("Another CA").pem).unwrap();
    let refused = |props: &[(&str, &str)]| {
        let mut args = vec![
            "--kafka-brokers".to_owned(),
            brokers.clone(),
            "--kafka-topic".to_owned(),
            topic.clone(),
            "--kafka-delivery-timeout".to_owned(),
            "3s".to_owned(),
        ];
        for (name, value) in props {
            args.extend(["--kafka-prop".to_owned(), format!("{name}={value}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let app = start(&args);
        let mut s = stormgate_station::Station::connect(app.local_addr()).unwrap();
        s.send(&identify("20099", None)).unwrap();
        s.send(&metrics(1, "refused=1")).unwrap();
        let reply = s.reply().unwrap();
        assert!(
            reply
                == stormgate_station::Reply::Nack {
                    seq: 1,
                    code: stormgate_station::NackCode::DeliveryFailed
                },
            "{props:?}: {reply:?}"
        );
        let t = app.stop().unwrap().totals;
        assert_eq!((t.records_delivered, t.records_failed), (0, 1), "{props:?}");
    };
    refused(&[
        ("security.protocol", "ssl"),
        ("ssl.ca.location", other_ca_file.to_str().unwrap()),
    ]);
    // The right CA, and nothing else changed, still works: the refusal was the CA's.
    let count = verify::read_topic_with(&brokers, &topic, &opts_again(&ca_file))
        .expect("read the topic over TLS")
        .len();
    assert_eq!(
        count,
        (STATIONS * LINES) as usize,
        "nothing added by the refused runs"
    );
    drop(kafka);
}

/// Reading options for the TLS broker, trusting `ca_file`.
fn opts_again(ca_file: &std::path::Path) -> ScanOptions {
    ScanOptions {
        expect: Some(0),
        timeout: Duration::from_secs(60),
        properties: [
            ("security.protocol", "ssl"),
            ("ssl.ca.location", ca_file.to_str().unwrap()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..ScanOptions::default()
    }
}
