//! Acknowledgements: a station that asks for them learns which of its lines Kafka has, in
//! order, and nothing is acknowledged before it is delivered.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use stormgate_kafka::EmbeddedCluster;
use support::*;

/// A raw station connection that reads answers line by line.
struct Conn {
    stream: TcpStream,
    answers: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr, identify: &str) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let answers = BufReader::new(stream.try_clone().unwrap());
        let mut c = Conn { stream, answers };
        c.send(&format!("{identify}\n"));
        c
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    fn lines(&mut self, seqs: std::ops::Range<u64>) {
        let text: String = seqs
            .map(|n| format!("{{\"type\":\"metrics\",\"seq\":{n},\"data\":\"t={n}.5\"}}\n"))
            .collect();
        self.send(&text);
    }

    fn answer(&mut self) -> serde_json::Value {
        let mut line = String::new();
        assert!(self.answers.read_line(&mut line).unwrap() > 0, "closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Reads answers until every seq below `end` is answered; returns them.
    fn answers_until(&mut self, end: u64) -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        let mut next = 0;
        while next < end {
            let a = self.answer();
            if let Some(n) = a["upto"].as_u64().or(a["seq"].as_u64()) {
                next = next.max(n + 1);
            }
            got.push(a);
        }
        got
    }

    /// Nothing arrives within `wait`.
    fn assert_silent(&mut self, wait: Duration) {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut line = String::new();
        let r = self.answers.read_line(&mut line);
        assert!(r.is_err(), "unexpected answer {line:?}");
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
    }
}

/// Checks that `answers` acknowledge exactly `seqs` in order, each once, and returns how many
/// answer lines there were.
fn check_in_order(answers: &[serde_json::Value], seqs: std::ops::Range<u64>) -> usize {
    let (mut next, end) = (seqs.start, seqs.end);
    for a in answers {
        assert_eq!(a["type"], "ack", "{a}");
        match (a["seq"].as_u64(), a["upto"].as_u64()) {
            (Some(seq), None) => {
                assert_eq!(seq, next, "a single ack answers the next line");
                next += 1;
            }
            (None, Some(upto)) => {
                assert!(upto >= next, "upto never goes back: {a}");
                next = upto + 1;
            }
            _ => panic!("{a}"),
        }
    }
    assert_eq!(next, end);
    answers.len()
}

#[test]
fn acknowledgements_follow_delivery_in_order_against_the_real_broker() {
    acks_real_broker();
}

fn acks_real_broker() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "acks");
    let app = start(&["--kafka-brokers", &brokers, "--kafka-topic", &topic]);
    let addr = app.local_addr();
    let mut on = Conn::open(
        addr,
        r#"{"type":"identify","zipcode":"70001","city":"A","acks":true}"#,
    );
    let mut off = Conn::open(addr, r#"{"type":"identify","zipcode":"70002","city":"B"}"#);
    on.lines(0..1000);
    // A rejected line with a seq is answered at once with its seq; one without seq is not
    // acknowledged.
    on.send("{\"type\":\"metrics\",\"seq\":1000,\"data\":\"t=warm\"}\n");
    on.send("{\"type\":\"metrics\",\"data\":\"t=1\"}\n");
    on.lines(1001..2000);
    off.lines(0..500);
    let answers = on.answers_until(2000);
    let (errors, acks): (Vec<_>, Vec<_>) = answers.into_iter().partition(|a| a["type"] == "error");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["seq"], 1000);
    assert_eq!(errors[0]["code"], "invalid_metric");
    // Acks skip the rejected seq: it is not in the window, so upto jumps over it.
    let lines = check_in_order(&acks, 0..2000);
    eprintln!("2,000 lines acknowledged in {lines} answer lines");
    assert!(lines < 2000, "acks are coalesced");
    // Every acknowledged record is delivered at that moment.
    let t = app.server().totals();
    assert!(t.records_delivered >= 2000, "{}", t.records_delivered);
    off.assert_silent(Duration::from_millis(300));
    wait_for("all delivered", Duration::from_secs(30), || {
        app.server().totals().records_delivered == 2000 + 500
    });
    app.stop().unwrap();
    let records = consume(&brokers, &topic, 2500);
    let groups = by_key(&records);
    assert_eq!(groups["70001"].len(), 2000);
    assert_eq!(groups["70002"].len(), 500);
}

/// With the broker down nothing is acknowledged; after it returns every line is.
#[test]
fn nothing_is_acknowledged_while_the_broker_is_down() {
    let cluster = EmbeddedCluster::start("acks-outage", 3).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start(&["--kafka-brokers", &brokers, "--kafka-topic", "acks-outage"]);
    let mut c = Conn::open(
        app.local_addr(),
        r#"{"type":"identify","zipcode":"70003","acks":true}"#,
    );
    c.lines(0..100);
    check_in_order(&c.answers_until(100), 0..100);
    cluster.mock().broker_down(1).unwrap();
    c.lines(100..300);
    c.assert_silent(Duration::from_secs(3));
    assert_eq!(app.server().totals().records_delivered, 100);
    cluster.mock().broker_up(1).unwrap();
    let t0 = Instant::now();
    let rest = c.answers_until(300);
    eprintln!(
        "acknowledged {} answer lines {:?} after recovery",
        rest.len(),
        t0.elapsed()
    );
    check_in_order(&rest, 100..300);
    assert_eq!(app.server().totals().records_delivered, 300);
    app.stop().unwrap();
    assert_eq!(consume(&brokers, "acks-outage", 300).len(), 300);
}

/// Records that finally fail are answered with nacks, in order; the default setting turns
/// acknowledgements on for stations that do not say, and "acks":false turns them off.
#[test]
fn failed_deliveries_are_nacked_and_the_default_applies() {
    let cluster = EmbeddedCluster::start("acks-nack", 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        "acks-nack",
        "--kafka-delivery-timeout",
        "1s",
        "--acks",
        "true",
    ]);
    let mut by_default = Conn::open(app.local_addr(), r#"{"type":"identify","zipcode":"70004"}"#);
    let mut opted_out = Conn::open(
        app.local_addr(),
        r#"{"type":"identify","zipcode":"70005","acks":false}"#,
    );
    by_default.lines(0..10);
    check_in_order(&by_default.answers_until(10), 0..10);
    cluster.mock().broker_down(1).unwrap();
    by_default.lines(10..20);
    opted_out.lines(0..10);
    for seq in 10..20 {
        let a = by_default.answer();
        assert_eq!(a["type"], "nack", "{a}");
        assert_eq!(a["seq"], seq);
        assert_eq!(a["code"], "delivery_failed");
    }
    opted_out.assert_silent(Duration::from_millis(300));
    assert_eq!(
        app.server().totals().records_spilled,
        20,
        "nacked records are spilled"
    );
    app.stop().unwrap();
}
