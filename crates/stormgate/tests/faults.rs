//! Broker faults other than an outage, injected with librdkafka's mock cluster: Produce
//! requests that fail and are retried, slow round trips, and failures that are final. In
//! every case each accepted line is settled exactly once, as delivered or as failed, and
//! what is delivered arrives once and in order per station.

mod support;

use std::time::Duration;

use stormgate::app::App;
use stormgate_kafka::EmbeddedCluster;
use stormgate_station::Station;
use stormgate_testkit::*;
use support::*;

/// The mock cluster's only broker.
const BROKER: i32 = 1;

// Kafka protocol error codes (and one of librdkafka's own) used below; each one's handling is
// `rd_kafka_handle_Produce_error` and `rd_kafka_err_action` in librdkafka's
// `rdkafka_request.c` (2.12).
/// NOT_ENOUGH_REPLICAS: retry, counts as an attempt, not persisted.
const NOT_ENOUGH_REPLICAS: i32 = 19;
/// NOT_ENOUGH_REPLICAS_AFTER_APPEND: retry, counts as an attempt, possibly persisted (the
/// idempotent producer retries with the same sequence numbers, so a retry cannot duplicate).
const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i32 = 20;
/// REQUEST_TIMED_OUT: as NOT_ENOUGH_REPLICAS_AFTER_APPEND.
const REQUEST_TIMED_OUT: i32 = 7;
/// LEADER_NOT_AVAILABLE: refresh metadata and retry, without counting an attempt.
const LEADER_NOT_AVAILABLE: i32 = 5;
/// NOT_LEADER_FOR_PARTITION: as LEADER_NOT_AVAILABLE.
const NOT_LEADER_FOR_PARTITION: i32 = 6;
/// librdkafka's `__TRANSPORT`: the mock broker drops the connection on that request; retry,
/// possibly persisted.
const TRANSPORT: i32 = -195;

/// Connects `n` identified stations.
fn stations(app: &App, n: usize, city: &str) -> Vec<Station> {
    (0..n)
        .map(|i| {
            let mut s = Station::connect(app.local_addr()).unwrap();
            s.identify(&format!("{i:05}"), city).unwrap();
            s
        })
        .collect()
}

/// Sends lines `from..from + n` from every station.
fn send(stations: &mut [Station], from: usize, n: usize) {
    for (i, s) in stations.iter_mut().enumerate() {
        s.send(station_lines(i, from as u64, n as u64).as_bytes())
            .unwrap();
    }
}

/// Reads the topic back and checks that every station's records carry exactly `want`, in
/// that order.
fn assert_topic_holds(brokers: &str, topic: &str, nr_stations: usize, want: &[u64]) {
    let total = nr_stations * want.len();
    let records = consume(brokers, topic, total);
    assert_eq!(records.len(), total, "records in the topic");
    let groups = by_key(&records);
    assert_eq!(groups.len(), nr_stations, "stations in the topic");
    for (key, recs) in &groups {
        let seqs: Vec<u64> = recs
            .iter()
            .map(|r| r.value["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, want, "station {key}: every line once, in order");
    }
}

/// Makes the next `codes.len()` Produce requests, from either shard's producer, fail with
/// `codes` in order. Requests after those succeed again.
fn fail_produce_requests(cluster: &EmbeddedCluster, codes: &[i32]) {
    produce_errors(cluster, Some(codes));
}

/// Drops the Produce errors not yet returned.
fn stop_failing_produce_requests(cluster: &EmbeddedCluster) {
    produce_errors(cluster, None);
}

/// Pushes `codes` onto the mock cluster's error stack for Produce requests, or clears it.
#[expect(
    clippy::missing_transmute_annotations,
    reason = "the target type cannot be named in this crate"
)]
fn produce_errors(cluster: &EmbeddedCluster, codes: Option<&[i32]>) {
    // The mock's API takes rdkafka's `RDKafkaApiKey`, which this crate cannot name: only
    // `stormgate-kafka` depends on rdkafka (docs/ARCHITECTURE.md). It is a `#[repr(i16)]`
    // enum of the Kafka protocol's API keys, and Produce is 0; `transmute` refuses to compile
    // if the type inferred from the calls below is not two bytes wide.
    // SAFETY: 0 is a valid discriminant of `RDKafkaApiKey` (`Produce = 0`).
    let produce = unsafe { std::mem::transmute::<i16, _>(0) };
    match codes {
        Some(codes) => {
            let errors: Vec<_> = codes
                .iter()
                .map(|&c| c.try_into().expect("a librdkafka error code"))
                .collect();
            cluster.mock().request_errors(produce, &errors[..]);
        }
        None => cluster.mock().clear_request_errors(produce),
    }
}

/// Messages the producers transmitted to `topic`, retransmissions included (`txmsgs` of its
/// partitions), summed over the producers, each as its latest statistics say. Read from the
/// full reports the producers log at TRACE; `topic` must be this test's alone.
fn messages_transmitted(topic: &str) -> u64 {
    let mut latest: std::collections::BTreeMap<String, u64> = Default::default();
    for line in log_lines().lock().unwrap().iter() {
        let Some((_, json)) = line.split_once(" statistics=") else {
            continue;
        };
        let Ok(report) = serde_json::from_str::<serde_json::Value>(json) else {
            continue;
        };
        let Some(partitions) = report["topics"][topic]["partitions"].as_object() else {
            continue;
        };
        let transmitted = partitions
            .iter()
            .filter(|(p, _)| *p != "-1")
            .map(|(_, p)| p["txmsgs"].as_u64().unwrap_or(0))
            .sum();
        latest.insert(
            report["name"].as_str().unwrap_or("").to_owned(),
            transmitted,
        );
    }
    latest.values().sum()
}

#[test]
fn retriable_produce_errors_are_retried_without_loss_duplicates_or_reordering() {
    log_lines();
    const TOPIC: &str = "faults.retriable";
    const STATIONS: usize = 10;
    const BEFORE: usize = 20;
    const DURING: usize = 200;
    const ROUNDS: usize = 6;
    let cluster = EmbeddedCluster::start(TOPIC, 6).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        TOPIC,
        // The mock broker checks sequence numbers only for transactional producers
        // (`rd_kafka_mock_validate_records`); a real broker checks them for every idempotent
        // one. With several requests in flight per connection, the mock appends again the
        // retry of a request it had appended but whose answer was lost when TRANSPORT dropped
        // the connection (seen here: a station's 200 lines twice in the topic, each counted
        // once by Stormgate), and it would append a request that follows a failed one, which
        // a broker refuses as out of order. With one request in flight, the failed request is
        // the only one and the mock behaves as a broker does.
        "--kafka-prop",
        "max.in.flight.requests.per.connection=1",
    ]);
    let mut stations = stations(&app, STATIONS, "Retriable");
    let delivered = || app.server().totals().records_delivered;
    send(&mut stations, 0, BEFORE);
    wait_for("records before the errors", Duration::from_secs(30), || {
        delivered() == (STATIONS * BEFORE) as u64
    });

    // Every record of BEFORE is delivered and no line is in flight, so the first
    // 6 × 6 = 36 Produce requests from now on carry lines sent below, and a request succeeds
    // only once the error stack is empty: the first delivery below means all 36 were
    // answered with errors and retried.
    let codes: Vec<i32> = [
        NOT_ENOUGH_REPLICAS,
        REQUEST_TIMED_OUT,
        LEADER_NOT_AVAILABLE,
        NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        NOT_LEADER_FOR_PARTITION,
        TRANSPORT,
    ]
    .repeat(ROUNDS);
    fail_produce_requests(&cluster, &codes);
    send(&mut stations, BEFORE, DURING);
    let total = STATIONS * (BEFORE + DURING);
    wait_for(
        "every record through the errors",
        Duration::from_secs(45),
        || delivered() == total as u64,
    );
    let t = app.server().totals();
    assert_eq!(t.records_failed, 0, "retriable errors fail nothing");
    assert_eq!(
        t.connections_active, STATIONS as i64,
        "connections stay open"
    );
    // The errors were answered and the records sent again: librdkafka's statistics (every
    // second) count more messages transmitted than the records there were.
    wait_for(
        "the retries in the statistics",
        Duration::from_secs(10),
        || messages_transmitted(TOPIC) > total as u64,
    );
    eprintln!(
        "{} messages transmitted for {total} records",
        messages_transmitted(TOPIC)
    );

    let totals = app.stop().unwrap().totals;
    assert_eq!(totals.records_enqueued, total as u64, "every line accepted");
    assert_eq!(totals.records_delivered, total as u64);
    assert_eq!(totals.records_failed, 0);
    drop(stations);
    let want: Vec<u64> = (0..(BEFORE + DURING) as u64).collect();
    assert_topic_holds(&brokers, TOPIC, STATIONS, &want);
}

#[test]
fn slow_round_trips_apply_backpressure_within_the_configured_bound() {
    const TOPIC: &str = "faults.slow";
    const STATIONS: usize = 10;
    const BEFORE: usize = 20;
    const DURING: usize = 200;
    const QUEUE_SIZE: usize = 64;
    const PRODUCER_QUEUE: usize = 100;
    const RTT: Duration = Duration::from_millis(400);
    let cluster = EmbeddedCluster::start(TOPIC, 6).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        TOPIC,
        "--queue-size",
        &QUEUE_SIZE.to_string(),
        "--kafka-queue-max-records",
        &PRODUCER_QUEUE.to_string(),
    ]);
    let mut stations = stations(&app, STATIONS, "Slow");
    let delivered = || app.server().totals().records_delivered;
    send(&mut stations, 0, BEFORE);
    wait_for(
        "records before the slowdown",
        Duration::from_secs(30),
        || delivered() == (STATIONS * BEFORE) as u64,
    );
    let waits_before = app.server().totals().backpressure_waits;

    cluster.mock().broker_round_trip_time(BROKER, RTT).unwrap();
    send(&mut stations, BEFORE, DURING);
    // A record is in flight (`records_in_flight`, the shard's ledger) from the line that made
    // it until its delivery report is settled. On one shard it can only be
    // - in the shard queue: at most QUEUE_SIZE (`--queue-size`);
    // - held by the sink while librdkafka's queue is full: at most 1;
    // - in librdkafka, queued, sent or reported but not yet polled: at most PRODUCER_QUEUE
    //   (`--kafka-queue-max-records`, librdkafka's `queue.buffering.max.messages`; `send`
    //   answers QueueFull beyond it);
    // - held by a connection that found the shard queue full: at most 1 per connection.
    // 10 × 200 lines are far more than that, so this checks that the rest waits in the
    // stations' sockets. The gauges are sampled every 20 ms, so what is seen is at most the
    // true peak, and the bound holds for every sample.
    let shards = app.server().metrics();
    let mut peak_in_flight = 0;
    let total = STATIONS * (BEFORE + DURING);
    wait_for(
        "every record at a 400 ms round trip",
        Duration::from_secs(45),
        || {
            for (id, m) in shards.iter().enumerate() {
                let (in_flight, depth) = (m.records_in_flight.get(), m.queue_depth.get());
                let conns = m.connections_active.get();
                let bound = (QUEUE_SIZE + 1 + PRODUCER_QUEUE) as i64 + conns;
                assert!(
                    in_flight <= bound,
                    "shard {id}: {in_flight} records in flight, bound {bound}"
                );
                assert!(
                    depth <= QUEUE_SIZE as i64,
                    "shard {id}: queue depth {depth} over {QUEUE_SIZE}"
                );
                peak_in_flight = peak_in_flight.max(in_flight);
            }
            delivered() == total as u64
        },
    );
    let t = app.server().totals();
    assert!(
        t.backpressure_waits > waits_before,
        "connections stopped reading while the broker was slow"
    );
    assert!(
        peak_in_flight >= PRODUCER_QUEUE as i64,
        "the buffers filled up to librdkafka's limit (peak {peak_in_flight}): the bound was tested"
    );
    assert_eq!(t.records_failed, 0, "slowness fails nothing");
    assert_eq!(
        t.connections_active, STATIONS as i64,
        "connections stay open"
    );
    eprintln!(
        "peak records in flight on one shard: {peak_in_flight}; backpressure waits: {}",
        t.backpressure_waits - waits_before
    );

    cluster
        .mock()
        .broker_round_trip_time(BROKER, Duration::ZERO)
        .unwrap();
    let totals = app.stop().unwrap().totals;
    assert_eq!(totals.records_enqueued, total as u64, "every line accepted");
    assert_eq!(totals.records_delivered, total as u64);
    assert_eq!(totals.records_failed, 0);
    drop(stations);
    let want: Vec<u64> = (0..(BEFORE + DURING) as u64).collect();
    assert_topic_holds(&brokers, TOPIC, STATIONS, &want);
}

// Lines per station in the three phases of the final-failure tests.
/// Sent first, delivered.
const GOOD_BEFORE: usize = 20;
/// Sent while delivery cannot succeed, failed.
const FAILING: usize = 50;
/// Sent after the fault, delivered.
const GOOD_AFTER: usize = 20;

/// Checks a final-failure test's outcome: exactly the FAILING lines failed, everything else
/// was delivered once and in order, and every accepted line was settled once.
fn assert_failed_phase_only(app: App, brokers: &str, topic: &str, nr_stations: usize) {
    let t = app.stop().unwrap().totals;
    let accepted = (nr_stations * (GOOD_BEFORE + FAILING + GOOD_AFTER)) as u64;
    assert_eq!(t.records_enqueued, accepted, "every line accepted");
    assert_eq!(t.records_failed, (nr_stations * FAILING) as u64);
    assert_eq!(
        t.records_delivered,
        (nr_stations * (GOOD_BEFORE + GOOD_AFTER)) as u64
    );
    assert_eq!(
        t.records_delivered + t.records_failed,
        t.records_enqueued,
        "each accepted line settled exactly once"
    );
    let want: Vec<u64> = (0..GOOD_BEFORE as u64)
        .chain((GOOD_BEFORE + FAILING) as u64..(GOOD_BEFORE + FAILING + GOOD_AFTER) as u64)
        .collect();
    assert_topic_holds(brokers, topic, nr_stations, &want);
}

#[test]
fn records_that_run_out_of_attempts_are_counted_failed_once() {
    const TOPIC: &str = "faults.attempts";
    const STATIONS: usize = 10;
    let cluster = EmbeddedCluster::start(TOPIC, 6).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        TOPIC,
        "--kafka-max-attempts",
        "2",
    ]);
    // More errors than requests: a batch holds at least one record and gets two attempts, so
    // the 500 failing records make at most 1,000 Produce requests.
    good_failing_good(
        app,
        &brokers,
        TOPIC,
        STATIONS,
        "every request fails",
        || fail_produce_requests(&cluster, &[NOT_ENOUGH_REPLICAS; 10_000]),
        || stop_failing_produce_requests(&cluster),
    );
}

#[test]
fn records_that_time_out_while_the_broker_is_down_are_counted_failed_once() {
    const TOPIC: &str = "faults.timeout";
    const STATIONS: usize = 10;
    let cluster = EmbeddedCluster::start(TOPIC, 6).unwrap();
    let brokers = cluster.bootstrap_servers();
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        TOPIC,
        "--kafka-delivery-timeout",
        "2s",
        // librdkafka waits up to `reconnect.backoff.max.ms` (10 s) between attempts to reach
        // a broker that is down: longer than the delivery timeout, so the records sent right
        // after the broker returns would time out too. Retry connecting every 100 ms at most.
        "--kafka-prop",
        "reconnect.backoff.max.ms=100",
    ]);
    good_failing_good(
        app,
        &brokers,
        TOPIC,
        STATIONS,
        "the broker is down",
        || cluster.mock().broker_down(BROKER).unwrap(),
        || cluster.mock().broker_up(BROKER).unwrap(),
    );
}

/// Three phases from `n` stations: `GOOD_BEFORE` lines each, all delivered; `FAILING` lines
/// each while `fail` is in effect, all of which must end failed with nothing delivered and
/// every connection open; then `recover` and `GOOD_AFTER` lines each, all delivered. Finally
/// the topic must hold exactly the first and last phases.
fn good_failing_good(
    app: App,
    brokers: &str,
    topic: &str,
    n: usize,
    while_what: &str,
    fail: impl FnOnce(),
    recover: impl FnOnce(),
) {
    let mut stations = stations(&app, n, "Phases");
    let totals = || app.server().totals();
    send(&mut stations, 0, GOOD_BEFORE);
    wait_for("records before the fault", Duration::from_secs(30), || {
        totals().records_delivered == (n * GOOD_BEFORE) as u64
    });
    fail();
    send(&mut stations, GOOD_BEFORE, FAILING);
    wait_for(
        &format!("the records sent while {while_what} to fail"),
        Duration::from_secs(30),
        || totals().records_failed == (n * FAILING) as u64,
    );
    let t = totals();
    assert_eq!(
        t.records_delivered,
        (n * GOOD_BEFORE) as u64,
        "nothing delivered while {while_what}"
    );
    assert_eq!(t.connections_active, n as i64, "connections stay open");
    recover();
    send(&mut stations, GOOD_BEFORE + FAILING, GOOD_AFTER);
    wait_for("records after the fault", Duration::from_secs(30), || {
        totals().records_delivered == (n * (GOOD_BEFORE + GOOD_AFTER)) as u64
    });
    drop(stations);
    assert_failed_phase_only(app, brokers, topic, n);
}
