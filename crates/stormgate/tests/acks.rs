//! Acknowledgements: a station that asks for them learns which of its lines Kafka has, in
//! order, and nothing is acknowledged before it is delivered.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stormgate_kafka::EmbeddedCluster;
use stormgate_protocol::{ErrorCode, NackCode, Reply};
use stormgate_testkit::*;
use support::*;

/// A station connection whose replies time out after 30 s, identified with `identify`.
fn open(addr: SocketAddr, identify: &str) -> StationConn {
    let mut c = StationConn::connect_with_timeout(addr, Duration::from_secs(30));
    c.send(format!("{identify}\n"));
    c
}

/// What these tests ask of a connection's answers.
trait Answers {
    fn answers_until(&mut self, end: u64) -> Vec<Reply>;
    fn assert_nothing_answered(&mut self);
}

impl Answers for StationConn {
    /// Reads answers until every seq below `end` is answered; returns them.
    fn answers_until(&mut self, end: u64) -> Vec<Reply> {
        let mut got = Vec::new();
        let mut next = 0;
        while next < end {
            let a = self.reply();
            if let Some(n) = answered_upto(&a) {
                next = next.max(n + 1);
            }
            got.push(a);
        }
        got
    }

    /// Proves that nothing was answered before now, without waiting out a silence: sends a
    /// line the server rejects at once (its error is written in line order, behind any answer
    /// already due) and requires that error to be the next answer.
    fn assert_nothing_answered(&mut self) {
        self.send("{\"type\":\"metrics\",\"data\":\"probe\"}\n");
        let a = self.reply();
        let probe = Reply::Error {
            code: ErrorCode::InvalidMetric,
            seq: None,
        };
        assert_eq!(a, probe, "an answer before the probe's error");
    }
}

/// The highest seq `a` answers: an ack's, an upto's, a nack's, an error line's.
fn answered_upto(a: &Reply) -> Option<u64> {
    match *a {
        Reply::Nack { seq, .. } | Reply::Error { seq: Some(seq), .. } => Some(seq),
        _ => a.acked_upto(),
    }
}

/// Checks that `answers` acknowledge exactly `seqs` in order, each once, and returns how many
/// answer lines there were.
fn check_in_order(answers: &[Reply], seqs: std::ops::Range<u64>) -> usize {
    let (mut next, end) = (seqs.start, seqs.end);
    for a in answers {
        match *a {
            Reply::Ack { seq } => {
                assert_eq!(seq, next, "a single ack answers the next line");
                next += 1;
            }
            Reply::AckUpto { upto } => {
                assert!(upto >= next, "upto never goes back: {a:?}");
                next = upto + 1;
            }
            _ => panic!("not an ack: {a:?}"),
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
    let mut on = open(
        addr,
        r#"{"type":"identify","zipcode":"70001","city":"A","acks":true}"#,
    );
    let mut off = open(addr, r#"{"type":"identify","zipcode":"70002","city":"B"}"#);
    on.lines(0..1000);
    // A rejected line with a seq is answered at once with its seq; one without seq is not
    // acknowledged.
    on.send("{\"type\":\"metrics\",\"seq\":1000,\"data\":\"t=warm\"}\n");
    on.send("{\"type\":\"metrics\",\"data\":\"t=1\"}\n");
    on.lines(1001..2000);
    // Every answer is checked when it arrives: the lines it acknowledges are delivered by
    // then. Only this station's 2,000 lines are in flight, so the shard's delivered count
    // bounds its acknowledged lines from above.
    let mut answers = Vec::new();
    let mut next = 0;
    while next < 2000 {
        let a = on.reply();
        let delivered = app.server().totals().records_delivered;
        if let Some(n) = answered_upto(&a) {
            next = next.max(n + 1);
        }
        if a.acked_upto().is_some() {
            // Seqs 0..next less the rejected 1000 are acknowledged.
            let acked = next - u64::from(next > 1000);
            assert!(
                delivered >= acked,
                "{acked} lines acknowledged, {delivered} delivered: {a:?}"
            );
        }
        answers.push(a);
    }
    let (errors, acks): (Vec<_>, Vec<_>) = answers
        .into_iter()
        .partition(|a| matches!(a, Reply::Error { .. }));
    let rejected = Reply::Error {
        code: ErrorCode::InvalidMetric,
        seq: Some(1000),
    };
    assert_eq!(errors, [rejected]);
    // Acks skip the rejected seq: it is not in the window, so upto jumps over it.
    let lines = check_in_order(&acks, 0..2000);
    eprintln!("2,000 lines acknowledged in {lines} answer lines");
    assert!(lines < 2000, "acks are coalesced");
    assert_eq!(app.server().totals().records_delivered, 2000);
    // The station without acks gets no answer for its delivered lines.
    off.lines(0..500);
    wait_for("all delivered", Duration::from_secs(30), || {
        app.server().totals().records_delivered == 2000 + 500
    });
    off.assert_nothing_answered();
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
    let mut c = open(
        app.local_addr(),
        r#"{"type":"identify","zipcode":"70003","acks":true}"#,
    );
    c.lines(0..100);
    check_in_order(&c.answers_until(100), 0..100);
    cluster.mock().broker_down(1).unwrap();
    c.lines(100..300);
    // Once the 200 lines are read they are all in flight, and an ack sent before delivery
    // would be written before the answer to a line read after them.
    wait_for("the 200 lines read", Duration::from_secs(10), || {
        app.server().totals().records_enqueued == 300
    });
    c.assert_nothing_answered();
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
        // Long enough for the producer's first request on a loaded machine (1 s nacked seq 0
        // once in CI, before the broker went down), short enough to see the nacks soon.
        "3s",
        "--acks",
        "true",
    ]);
    let mut by_default = open(app.local_addr(), r#"{"type":"identify","zipcode":"70004"}"#);
    let mut opted_out = open(
        app.local_addr(),
        r#"{"type":"identify","zipcode":"70005","acks":false}"#,
    );
    by_default.lines(0..10);
    check_in_order(&by_default.answers_until(10), 0..10);
    cluster.mock().broker_down(1).unwrap();
    by_default.lines(10..20);
    opted_out.lines(0..10);
    for seq in 10..20 {
        let code = NackCode::DeliveryFailed;
        assert_eq!(by_default.reply(), Reply::Nack { seq, code });
    }
    wait_for(
        "the opted-out lines settled",
        Duration::from_secs(10),
        || app.server().totals().records_failed == 20,
    );
    opted_out.assert_nothing_answered();
    assert_eq!(
        app.server().totals().records_spilled,
        20,
        "nacked records are spilled"
    );
    app.stop().unwrap();
}

/// Starts Stormgate on a mock cluster of its own whose broker is down, so that accepted lines
/// wait for their delivery as long as a test needs.
fn start_with_broker_down(topic: &str) -> (EmbeddedCluster, stormgate::app::App) {
    let cluster = EmbeddedCluster::start(topic, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start(&["--kafka-brokers", &brokers, "--kafka-topic", topic]);
    cluster.mock().broker_down(1).unwrap();
    (cluster, app)
}

/// PROTOCOL.md ack rule 4: a rejected line is answered at once, before the answers to the
/// accepted lines before it, which come after their delivery.
#[test]
fn an_error_is_answered_at_once_before_earlier_lines_are_acknowledged() {
    let (cluster, app) = start_with_broker_down("acks-rule-4");
    let mut c = open(
        app.local_addr(),
        r#"{"type":"identify","zipcode":"70010","acks":true}"#,
    );
    c.lines(0..5);
    c.send("{\"type\":\"metrics\",\"seq\":5,\"data\":\"t=warm\"}\n");
    let a = c.reply();
    assert!(matches!(a, Reply::Error { seq: Some(5), .. }), "{a:?}");
    assert_eq!(
        app.server().totals().records_delivered,
        0,
        "all still waiting"
    );
    cluster.mock().broker_up(1).unwrap();
    check_in_order(&c.answers_until(5), 0..5);
    app.stop().unwrap();
}

/// PROTOCOL.md ack rule 6: a later identify turns acknowledgements off for the lines that
/// follow (lines already waiting are still answered), and on again.
#[test]
fn a_later_identify_switches_acknowledgements() {
    let (cluster, app) = start_with_broker_down("acks-rule-6");
    let mut c = open(
        app.local_addr(),
        r#"{"type":"identify","zipcode":"70011","acks":true}"#,
    );
    c.lines(0..3);
    c.send("{\"type\":\"identify\",\"zipcode\":\"70011\",\"acks\":false}\n");
    c.lines(3..6);
    wait_for("the six lines read", Duration::from_secs(10), || {
        app.server().totals().records_enqueued == 6
    });
    cluster.mock().broker_up(1).unwrap();
    check_in_order(&c.answers_until(3), 0..3);
    wait_for("the six lines delivered", Duration::from_secs(30), || {
        app.server().totals().records_delivered == 6
    });
    // Lines 3..6 were delivered and not answered.
    c.assert_nothing_answered();
    c.send("{\"type\":\"identify\",\"zipcode\":\"70011\",\"acks\":true}\n");
    c.lines(6..7);
    assert_eq!(c.reply(), Reply::Ack { seq: 6 });
    app.stop().unwrap();
}

/// PROTOCOL.md ack rule 7: after the station closes its sending side, the connection stays
/// open until every line is answered, then the server closes it.
#[test]
fn a_half_closed_connection_stays_until_every_line_is_answered() {
    let (cluster, app) = start_with_broker_down("acks-rule-7");
    let mut c = open(
        app.local_addr(),
        r#"{"type":"identify","zipcode":"70012","acks":true}"#,
    );
    c.lines(0..10);
    c.finish();
    wait_for("the ten lines read", Duration::from_secs(10), || {
        app.server().totals().records_enqueued == 10
    });
    assert_eq!(app.server().totals().connections_active, 1, "still open");
    cluster.mock().broker_up(1).unwrap();
    check_in_order(&c.answers_until(10), 0..10);
    let rest = c.read_to_close();
    assert!(rest.is_empty(), "closed after the last answer: {rest:?}");
    app.stop().unwrap();
}
