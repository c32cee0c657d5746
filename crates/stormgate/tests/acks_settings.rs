//! The replaced server's producer settings start as they are: `KAFKA_REQUIRED_ACKS=1` alone
//! (its default) turns the idempotent producer off with a warning that names both settings,
//! instead of librdkafka's start-up error ("`acks` must be set to `all` when
//! `enable.idempotence` is true"); asking for both is refused in our words.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use stormgate_station::Station;
use stormgate_testkit::*;
use support::*;

fn stormgate(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stormgate"));
    cmd.env_remove("KAFKA_IDEMPOTENCE")
        .env_remove("KAFKA_REQUIRED_ACKS")
        .env("TCP_LISTEN", "127.0.0.1:0")
        .env("TCP_SHARDS", "2")
        .env("METRICS_ADDR", "off")
        .env("RUST_LOG", "info")
        .env(
            "SPILL_DIR",
            std::env::temp_dir().join(format!("stormgate-test-spill-{}", uuid::Uuid::now_v7())),
        )
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn required_acks_1_alone_starts_without_idempotence_and_delivers() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "acks-1");
    let mut child = stormgate(&[
        ("KAFKA_BROKERS", &brokers),
        ("KAFKA_TOPIC", &topic),
        ("KAFKA_REQUIRED_ACKS", "1"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn stormgate");
    let (tx, lines) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("stormgate: {line}");
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let mut wait_for_line = |needle: &str| -> String {
        if let Some(l) = seen.iter().find(|l: &&String| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
            seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    };
    let warning = wait_for_line("turns the idempotent producer off");
    assert!(
        warning.contains("WARN") && warning.contains("KAFKA_REQUIRED_ACKS=1"),
        "{warning}"
    );
    let settings = wait_for_line("kafka producer settings");
    assert!(
        settings.contains("acks=1") && settings.contains("idempotence=false"),
        "{settings}"
    );
    let listening = wait_for_line("listening");
    let addr: std::net::SocketAddr = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr=")?.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {listening}"));

    const LINES: u64 = 100;
    let mut station = Station::connect(addr).unwrap();
    station
        .send(b"{\"type\":\"identify\",\"zipcode\":\"30001\",\"city\":\"A\",\"acks\":true}\n")
        .unwrap();
    for seq in 0..LINES {
        let line = format!("{{\"type\":\"metrics\",\"seq\":{seq},\"data\":\"t={seq}\"}}\n");
        station.send(line.as_bytes()).unwrap();
    }
    // Acknowledged means delivered with acks=1: the leader has every line.
    wait_for_ack(|| station.reply(), LINES - 1);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success(), "drains and exits 0");

    let records = consume(&brokers, &topic, LINES as usize);
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| r.value["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (0..LINES).collect::<Vec<_>>(),
        "each line once, in order"
    );
}

#[test]
fn required_acks_1_with_kafka_idempotence_true_is_refused_naming_both() {
    let out = stormgate(&[("KAFKA_REQUIRED_ACKS", "1"), ("KAFKA_IDEMPOTENCE", "true")])
        .arg("check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("KAFKA_REQUIRED_ACKS=1 cannot go with KAFKA_IDEMPOTENCE=true"),
        "{stderr}"
    );

    let out = stormgate(&[("KAFKA_REQUIRED_ACKS", "1")])
        .arg("check-config")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
}
