//! An idempotent producer must not burn a core while it waits for a slow broker.
//!
//! librdkafka 2.12.1 lets one Produce request per partition be in flight with idempotence on,
//! and, before it checks that, moves its broker thread's wake-up to "now" when a batch is
//! ready: the thread then polls its socket with a zero timeout until the response arrives.
//! vendor/README.md explains the bug and the patch that fixes it; this test fails without the
//! patch.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// The broker answers every request this late: far beyond `linger.ms`, so that a ready
/// batch waits most of the time for the response in flight.
const ROUND_TRIP: Duration = Duration::from_millis(200);
/// How long the producer sends.
const RUN: Duration = Duration::from_secs(3);

/// CPU time (user + system) of this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !comm.starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are fields 14 and 15 of the whole line.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    Duration::from_millis(total * 1000 / ticks)
}

#[test]
fn an_idempotent_producer_waiting_for_a_slow_broker_does_not_spin() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("spin", 1, 1).unwrap();
    cluster.broker_round_trip_time(1, ROUND_TRIP).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // Wait for the producer id and the first round trips, so that the measurement covers the
    // steady state only.
    let warm_up = Instant::now() + Duration::from_secs(10);
    producer
        .send(BaseRecord::<str, str>::to("spin").payload("warm-up"))
        .unwrap();
    while producer.in_flight_count() > 0 {
        assert!(Instant::now() < warm_up, "the mock broker never answered");
        producer.poll(Duration::from_millis(10));
    }

    let cpu_before = threads_cpu("rdk:broker");
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < RUN {
        // A steady trickle: every 10 ms a few records, so that a batch is always ready
        // (older than linger.ms) while the previous request is still in flight.
        for _ in 0..5 {
            producer
                .send(BaseRecord::<str, str>::to("spin").payload("x"))
                .unwrap();
            sent += 1;
        }
        producer.poll(Duration::from_millis(10));
    }
    let wall = start.elapsed();
    let cpu = threads_cpu("rdk:broker") - cpu_before;
    producer.flush(Duration::from_secs(30)).unwrap();
    eprintln!(
        "{sent} records in {wall:?}: the broker threads used {cpu:?} of CPU ({:.0}% of the wall time)",
        cpu.as_secs_f64() * 100.0 / wall.as_secs_f64()
    );
    // Spinning costs one core per busy broker thread for as long as a request is in flight
    // (here nearly all the time: ~100% of the wall time). Serving 15 requests a second and
    // the mock broker's own bookkeeping costs a few percent even on a busy machine.
    assert!(
        cpu < wall / 4,
        "librdkafka's broker thread spun while waiting for the broker: {cpu:?} of CPU in {wall:?}"
    );
}
