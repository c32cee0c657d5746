//! Black-box tests of the shard runtime: a real server on 127.0.0.1:0 with two shards, real TCP
//! clients, and sinks that stand in for Kafka.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stormgate_protocol::ErrorCode;
use stormgate_shard::{
    Credentials, NullSinkFactory, Outcome, RecordReceiver, RuntimeConfig, Server, ServerHandle,
    ShardInfo, Sink, SinkContext, SinkFactory, StationAuth,
};
use stormgate_telemetry::Pulse;
use stormgate_testkit::{StationConn, identify_without_acks, wait_for};

fn config() -> RuntimeConfig {
    RuntimeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        ..RuntimeConfig::default()
    }
}

/// How long a test waits for a condition (the kit's [`wait_for`]) before it fails.
const WAIT: Duration = Duration::from_secs(10);

fn start_null(config: RuntimeConfig) -> ServerHandle {
    Server::start(config, NullSinkFactory).unwrap()
}

#[test]
fn lines_from_many_connections_all_become_records() {
    let server = start_null(config());
    let mut stations: Vec<StationConn> = (0..20)
        .map(|_| StationConn::connect(server.local_addr()))
        .collect();
    for (i, s) in stations.iter_mut().enumerate() {
        s.identify(&format!("{i:05}"));
        s.metrics(100);
    }
    wait_for("2000 records", WAIT, || {
        server.totals().records_delivered == 2000
    });
    let t = server.totals();
    assert_eq!(t.lines_received, 20 * 101);
    assert_eq!(t.line_errors_total(), 0);
    assert_eq!(t.connections_active, 20);
    assert_eq!(t.delivery_latency.count(), 2000);
}

#[test]
fn both_shards_accept_connections() {
    let server = start_null(config());
    assert_eq!(server.shards().len(), 2);
    assert_ne!(server.shards()[0].core, usize::MAX);
    let _stations: Vec<StationConn> = (0..64)
        .map(|_| StationConn::connect(server.local_addr()))
        .collect();
    wait_for("64 accepted", WAIT, || {
        server.totals().connections_accepted == 64
    });
    for (id, m) in server.metrics().iter().enumerate() {
        let accepted = m.connections_accepted.get();
        assert!(accepted > 0, "shard {id} accepted none of 64 connections");
        // Each shard beats its heartbeat (what /healthz judges) while it runs.
        let pulse = m.heartbeat.pulse(Instant::now());
        assert!(
            matches!(pulse, Pulse::Since(age) if age < Duration::from_secs(10)),
            "shard {id}: {pulse:?}"
        );
    }
}

#[test]
fn bad_lines_are_answered_counted_and_do_not_disturb_good_ones() {
    let server = start_null(config());
    let mut s = StationConn::connect(server.local_addr());
    s.send(b"{\"type\":\"metrics\",\"data\":\"t=1\"}\n");
    assert_eq!(s.error_code(), ErrorCode::MetricsBeforeIdentify);
    s.identify("12345");
    s.metrics(1);
    s.send(b"this is not json\n");
    assert_eq!(s.line(), ErrorCode::MalformedJson.error_line());
    s.send(b"{\"type\":\"metrics\",\"data\":\"t=NaN\"}\n{\"type\":\"metrics\",\"data\":\"t=1\"}\n");
    assert_eq!(s.error_code(), ErrorCode::NonFiniteValue);
    wait_for("2 records", WAIT, || server.totals().records_delivered == 2);
    let t = server.totals();
    assert_eq!(t.line_error(ErrorCode::MetricsBeforeIdentify as usize), 1);
    assert_eq!(t.line_error(ErrorCode::MalformedJson as usize), 1);
    assert_eq!(t.line_error(ErrorCode::NonFiniteValue as usize), 1);
    assert_eq!(t.connections_active, 1, "the connection stays open");
}

#[test]
fn oversized_lines_are_skipped_without_buffering_them() {
    let server = start_null(RuntimeConfig {
        max_line_bytes: 1024,
        ..config()
    });
    let mut s = StationConn::connect(server.local_addr());
    s.identify("1");
    // 128 MiB without a newline, all read by the server before the newline follows: had it
    // kept them, this process (the server's) would hold them now.
    const LONG: usize = 128 << 20;
    let rss_before = rss_bytes();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..LONG >> 20 {
        s.send(&chunk);
    }
    wait_for("the long line read", WAIT, || {
        server.totals().bytes_received >= LONG as u64
    });
    let rss_read = rss_bytes();
    eprintln!(
        "RSS {} -> {} MiB with a 128 MiB line read",
        rss_before >> 20,
        rss_read >> 20
    );
    // Other tests run in this process meanwhile: a generous margin, still far from 128 MiB.
    assert!(
        rss_read < rss_before + (48 << 20),
        "RSS grew from {} to {} MiB over a 128 MiB line",
        rss_before >> 20,
        rss_read >> 20
    );
    s.send(b"\n");
    assert_eq!(s.error_code(), ErrorCode::LineTooLong);
    s.metrics(3);
    wait_for("3 records", WAIT, || server.totals().records_delivered == 3);
    assert_eq!(
        server.totals().line_error(ErrorCode::LineTooLong as usize),
        1
    );
}

/// This process's resident memory.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn a_line_split_into_single_bytes_arrives_whole() {
    let server = start_null(config());
    let mut s = StationConn::connect(server.local_addr());
    s.stream().set_nodelay(true).unwrap();
    let text =
        b"{\"type\":\"identify\",\"zipcode\":\"1\"}\r\n{\"type\":\"metrics\",\"data\":\"t=1\"}\r\n";
    for b in text {
        s.send([*b]);
        std::thread::sleep(Duration::from_micros(200));
    }
    wait_for("1 record", WAIT, || server.totals().records_delivered == 1);
    assert_eq!(server.totals().line_errors_total(), 0);
}

#[test]
fn a_final_line_without_newline_counts_when_the_station_closes() {
    let server = start_null(config());
    let mut s = StationConn::connect(server.local_addr());
    s.identify("1");
    s.send(b"{\"type\":\"metrics\",\"data\":\"t=1\"}");
    s.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(s.read_to_close(), "");
    wait_for("1 record", WAIT, || server.totals().records_delivered == 1);
    wait_for("closed", WAIT, || server.totals().connections_closed == 1);
}

#[test]
fn connections_over_the_limit_are_told_and_closed() {
    let server = start_null(RuntimeConfig {
        max_connections: 2,
        ..config()
    });
    let _a = StationConn::connect(server.local_addr());
    let _b = StationConn::connect(server.local_addr());
    wait_for("2 accepted", WAIT, || {
        server.totals().connections_accepted == 2
    });
    let mut c = StationConn::connect(server.local_addr());
    assert_eq!(
        c.read_to_close(),
        ErrorCode::TooManyConnections.error_line()
    );
    assert_eq!(server.totals().connections_rejected, 1);
}

#[test]
fn connections_over_the_per_shard_limit_are_told_and_closed() {
    let server = start_null(RuntimeConfig {
        shards: 1,
        max_connections: 100,
        max_connections_per_shard: 2,
        ..config()
    });
    let a = StationConn::connect(server.local_addr());
    let _b = StationConn::connect(server.local_addr());
    wait_for("2 accepted", WAIT, || {
        server.totals().connections_accepted == 2
    });
    let mut c = StationConn::connect(server.local_addr());
    assert_eq!(
        c.read_to_close(),
        ErrorCode::TooManyConnections.error_line()
    );
    assert_eq!(server.totals().connections_rejected, 1);
    // A place freed on the shard is a place for the next station.
    drop(a);
    wait_for("1 active", WAIT, || server.totals().connections_active == 1);
    let _d = StationConn::connect(server.local_addr());
    wait_for("3 accepted", WAIT, || {
        server.totals().connections_accepted == 3
    });
    assert_eq!(server.totals().connections_rejected, 1);
}

#[test]
fn connections_over_the_per_source_limit_are_told_and_closed_and_others_are_not() {
    let server = start_null(RuntimeConfig {
        max_connections_per_ip: 2,
        ..config()
    });
    let addr = server.local_addr();
    let a = StationConn::connect_from(addr, [127, 0, 0, 7]);
    let _b = StationConn::connect_from(addr, [127, 0, 0, 7]);
    wait_for("2 accepted", WAIT, || {
        server.totals().connections_accepted == 2
    });
    let mut c = StationConn::connect_from(addr, [127, 0, 0, 7]);
    assert_eq!(
        c.read_to_close(),
        ErrorCode::TooManyConnections.error_line()
    );
    // Another source is not affected; across both shards it gets exactly its two places.
    // The kernel picks each connection's shard: connect until both shards have seen this
    // source, so that the limit is shown to hold across them, not within one.
    let seen_per_shard = |server: &ServerHandle| -> Vec<u64> {
        server
            .metrics()
            .iter()
            .map(|m| m.connections_accepted.get() + m.connections_rejected.get())
            .collect()
    };
    let before = seen_per_shard(&server);
    let mut others: Vec<StationConn> = Vec::new();
    while others.len() < 4
        || seen_per_shard(&server)
            .iter()
            .zip(&before)
            .any(|(now, then)| now == then)
    {
        assert!(
            others.len() < 40,
            "the kernel put 40 connections on one shard"
        );
        others.push(StationConn::connect_from(addr, [127, 0, 0, 8]));
        let n = others.len() as u64;
        wait_for("the connection handled", WAIT, || {
            let t = server.totals();
            t.connections_accepted + t.connections_rejected == 3 + n
        });
    }
    let n = others.len();
    eprintln!("{n} connections from one source over both shards");
    let t = server.totals();
    assert_eq!(
        (t.connections_accepted, t.connections_rejected),
        (4, n as u64 - 1)
    );
    // A refused connection is told and closed; an accepted one was told nothing, and closes
    // when its station does.
    let refused = others
        .iter_mut()
        .map(|s| {
            s.stream().shutdown(std::net::Shutdown::Write).unwrap();
            let rest = s.read_to_close();
            assert!(
                rest.is_empty() || rest.contains("too_many_connections"),
                "{rest:?}"
            );
            !rest.is_empty()
        })
        .filter(|&refused| refused)
        .count();
    assert_eq!(refused, n - 2);
    assert_eq!(server.totals().connections_rejected, n as u64 - 1);
    // The two accepted ones closed with their stations.
    wait_for("the other source's two closed", WAIT, || {
        server.totals().connections_active == 2
    });
    others.clear();
    // A closed connection frees its place.
    drop(a);
    wait_for("a place freed", WAIT, || {
        server.totals().connections_active == 1
    });
    let _d = StationConn::connect_from(addr, [127, 0, 0, 7]);
    wait_for("5 accepted", WAIT, || {
        server.totals().connections_accepted == 5
    });
}

/// A sink that takes nothing until released, then settles everything as delivered.
struct GatedSink {
    open: Arc<AtomicBool>,
    max_in_flight: Arc<AtomicUsize>,
    hold: Duration,
}

impl Sink for GatedSink {
    async fn run(self, records: RecordReceiver, ctx: SinkContext) {
        while !self.open.load(Ordering::Relaxed) {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        while let Some(r) = records.recv().await {
            self.max_in_flight
                .fetch_max(ctx.in_flight(), Ordering::Relaxed);
            if !self.hold.is_zero() {
                glommio::timer::sleep(self.hold).await;
            }
            ctx.recycle(r.value);
            ctx.settle(r.ticket, Outcome::Delivered);
        }
    }
}

#[derive(Clone, Default)]
struct GatedFactory {
    open: Arc<AtomicBool>,
    max_in_flight: Arc<AtomicUsize>,
    hold: Duration,
}

impl SinkFactory for GatedFactory {
    type Sink = GatedSink;
    fn build(&self, _: &ShardInfo) -> Result<GatedSink, Box<dyn std::error::Error + Send + Sync>> {
        Ok(GatedSink {
            open: self.open.clone(),
            max_in_flight: self.max_in_flight.clone(),
            hold: self.hold,
        })
    }
}

#[test]
fn a_full_queue_stops_reading_instead_of_dropping() {
    let factory = GatedFactory::default();
    let server = Server::start(
        RuntimeConfig {
            queue_size: 64,
            shards: 1,
            ..config()
        },
        factory.clone(),
    )
    .unwrap();
    let mut s = StationConn::connect(server.local_addr());
    s.identify("1");
    // Far more than the queue holds; the writer thread blocks once the socket buffers fill.
    let lines = 200_000;
    let writer = {
        let mut stream = s.stream().try_clone().unwrap();
        std::thread::spawn(move || {
            let line = b"{\"type\":\"metrics\",\"data\":\"t=1\"}\n";
            for _ in 0..lines {
                stream.write_all(line).unwrap();
            }
        })
    };
    wait_for("a blocked connection", WAIT, || {
        server.totals().backpressure_waits > 0
    });
    std::thread::sleep(Duration::from_millis(200));
    let t = server.totals();
    assert!(
        t.records_enqueued <= 64 + 1,
        "queue bound exceeded: {}",
        t.records_enqueued
    );
    assert!(t.records_enqueued < lines, "nothing was held back");
    factory.open.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    wait_for("every record", WAIT, || {
        server.totals().records_delivered == lines
    });
    assert_eq!(server.totals().records_failed, 0);
}

/// A connection the shard holds back (full queue) is not idle: the idle timeout counts only
/// while a read waits on the socket. Once it is served and then silent, the timeout applies.
#[test]
fn a_connection_held_back_by_a_full_queue_is_not_idle() {
    let factory = GatedFactory::default();
    let server = Server::start(
        RuntimeConfig {
            queue_size: 64,
            shards: 1,
            idle_timeout: Some(Duration::from_millis(300)),
            ..config()
        },
        factory.clone(),
    )
    .unwrap();
    let mut s = StationConn::connect(server.local_addr());
    s.identify("1");
    let lines = 5_000;
    let batch: Vec<u8> = b"{\"type\":\"metrics\",\"data\":\"t=1\"}\n".repeat(lines as usize);
    s.stream().write_all(&batch).unwrap();
    wait_for("a blocked connection", WAIT, || {
        server.totals().backpressure_waits > 0
    });
    // Three idle timeouts' worth of being held back.
    std::thread::sleep(Duration::from_millis(900));
    let t = server.totals();
    assert_eq!(t.idle_timeouts, 0, "held back is not idle");
    assert_eq!(t.connections_active, 1);
    assert!(t.records_enqueued < lines, "nothing was held back");
    factory.open.store(true, Ordering::Relaxed);
    wait_for("every record", WAIT, || {
        server.totals().records_delivered == lines
    });
    // Still open and read: a line sent now is delivered.
    s.metrics(1);
    wait_for("the line after the block", WAIT, || {
        server.totals().records_delivered == lines + 1
    });
    assert_eq!(server.totals().idle_timeouts, 0);
    // Now silent: closed at the idle timeout.
    assert_eq!(s.error_code(), ErrorCode::IdleTimeout);
    wait_for("the idle close", WAIT, || {
        server.totals().idle_timeouts == 1
    });
}

#[test]
fn in_flight_cap_of_one_makes_each_line_wait_for_its_delivery() {
    for (cap, expect_serial) in [(1, true), (0, false)] {
        let factory = GatedFactory {
            hold: Duration::from_millis(2),
            ..GatedFactory::default()
        };
        factory.open.store(true, Ordering::Relaxed);
        let cfg = RuntimeConfig {
            max_in_flight_per_conn: cap,
            shards: 1,
            ..config()
        };
        let server = Server::start(cfg, factory.clone()).unwrap();
        let mut s = StationConn::connect(server.local_addr());
        s.identify("1");
        s.metrics(50);
        wait_for("50 records", WAIT, || {
            server.totals().records_delivered == 50
        });
        let max = factory.max_in_flight.load(Ordering::Relaxed);
        if expect_serial {
            assert_eq!(max, 1, "cap 1 let {max} records be in flight");
        } else {
            assert!(max > 1, "without a cap records should pile up, saw {max}");
        }
    }
}

#[test]
fn shutdown_delivers_what_was_read_and_refuses_new_connections() {
    let server = start_null(config());
    let addr = server.local_addr();
    let mut stations: Vec<StationConn> = (0..10).map(|_| StationConn::connect(addr)).collect();
    for (i, s) in stations.iter_mut().enumerate() {
        s.identify(&i.to_string());
        s.metrics(500);
    }
    wait_for("all lines read", WAIT, || {
        server.totals().lines_received == 10 * 501
    });
    server.shutdown();
    let totals_before = server.totals();
    let metrics: Vec<_> = server.metrics().to_vec();
    server.join().unwrap();
    let t = stormgate_telemetry::Totals::sum(metrics.iter().map(|m| &**m));
    assert_eq!(
        t.records_delivered, 5000,
        "before shutdown: {totals_before:?}"
    );
    assert_eq!(t.connections_active, 0);
    for m in &metrics {
        // An ended shard owes no heartbeat.
        assert_eq!(m.heartbeat.pulse(Instant::now()), Pulse::Finished);
    }
    assert!(
        TcpStream::connect(addr).is_err(),
        "listener still open after shutdown"
    );
    for s in &mut stations {
        assert_eq!(s.read_to_close(), stormgate_protocol::RECONNECT_LINE);
    }
}

/// With `TCP_DRAIN_PERIOD`, each connection is told `reconnect` at a moment of its own
/// within the period, and until then it is served: a line sent after shutdown began is
/// handled if its connection's moment has not come.
#[test]
fn a_drain_period_spreads_the_reconnects_and_serves_each_connection_until_its_moment() {
    const STATIONS: usize = 40;
    let period = Duration::from_millis(2000);
    let server = start_null(RuntimeConfig {
        drain_period: period,
        shutdown_timeout: Duration::from_secs(10),
        ..config()
    });
    let addr = server.local_addr();
    let mut stations: Vec<StationConn> =
        (0..STATIONS).map(|_| StationConn::connect(addr)).collect();
    for (i, s) in stations.iter_mut().enumerate() {
        s.identify(&i.to_string());
        s.metrics(1);
    }
    wait_for("every first line read", WAIT, || {
        server.totals().lines_received == 2 * STATIONS as u64
    });
    let t0 = Instant::now();
    server.shutdown();
    // Each station: one more line a quarter of the period in, then wait for its reconnect.
    let handles: Vec<_> = stations
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                std::thread::sleep(period / 4);
                let sent_at = t0.elapsed();
                // May fail if the server already closed it (its moment came first).
                let _ = s
                    .stream()
                    .write_all(b"{\"type\":\"metrics\",\"data\":\"after=1\"}\n");
                // Like a station: reads the line, closes its side, and sees the end.
                let mut line = s.line();
                let told = t0.elapsed();
                s.stream().shutdown(std::net::Shutdown::Write).unwrap();
                line.push_str(&s.read_to_close());
                (sent_at, told, line)
            })
        })
        .collect();
    let ends: Vec<(Duration, Duration, String)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let metrics: Vec<_> = server.metrics().to_vec();
    server.join().unwrap();
    let t = stormgate_telemetry::Totals::sum(metrics.iter().map(|m| &**m));
    for (_, _, rest) in &ends {
        assert_eq!(
            rest,
            stormgate_protocol::RECONNECT_LINE,
            "told, then closed"
        );
    }
    let mut told: Vec<Duration> = ends.iter().map(|&(_, end, _)| end).collect();
    told.sort();
    eprintln!("reconnects at {told:?}");
    // Spread: the first within the first third of the period, the last in its last third,
    // none long after it.
    assert!(told[0] < period / 3, "{told:?}");
    assert!(told[STATIONS - 1] > period * 2 / 3, "{told:?}");
    assert!(
        told[STATIONS - 1] < period + Duration::from_millis(500),
        "{told:?}"
    );
    // Served until its moment: every station told well after its extra line had that line
    // handled (the ones told before it may or may not have).
    let served_late = ends
        .iter()
        .filter(|&&(sent, end, _)| end > sent + Duration::from_millis(200))
        .count() as u64;
    assert!(served_late > 0, "{told:?}");
    assert!(
        t.lines_received >= 2 * STATIONS as u64 + served_late,
        "{} lines read, {served_late} stations told 200 ms after their extra line",
        t.lines_received
    );
    assert_eq!(t.records_delivered, t.lines_received - STATIONS as u64);
}

/// A station still sending when its drain moment comes reads the `reconnect` line and then
/// an orderly end of stream once it stops and closes its side: the server waits for that
/// rather than closing with the station's bytes unread, which makes the kernel answer with
/// a reset — and a reset can destroy the line (and acknowledgements) still on their way.
#[test]
fn a_busy_station_is_told_to_reconnect_and_ends_without_a_reset() {
    let server = start_null(RuntimeConfig {
        shards: 1,
        ..config()
    });
    let mut s = StationConn::connect(server.local_addr());
    // Flat out, but with a send buffer a station on a network might have, not the
    // loopback's autotuned megabytes: what it has in flight when it reads the line is then
    // the server's receive window plus this.
    socket2::SockRef::from(s.stream())
        .set_send_buffer_size(64 * 1024)
        .unwrap();
    s.identify("00001");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = s.stream().try_clone().unwrap();
    let flag = Arc::clone(&stop);
    let sender = std::thread::spawn(move || {
        let batch = "{\"type\":\"metrics\",\"data\":\"t=1\"}\n".repeat(64);
        // Like the reference client: sends until it reads `reconnect`, then closes.
        while !flag.load(Ordering::Relaxed) {
            if writer.write_all(batch.as_bytes()).is_err() {
                return false;
            }
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
        true
    });
    wait_for("lines flowing", WAIT, || {
        server.totals().lines_received > 10_000
    });
    server.shutdown();
    let mut line = String::new();
    s.replies().read_line(&mut line).unwrap();
    assert_eq!(line, stormgate_protocol::RECONNECT_LINE);
    stop.store(true, Ordering::Relaxed);
    let mut rest = Vec::new();
    let end = s.replies().read_to_end(&mut rest);
    assert!(
        end.is_ok(),
        "after reconnect: {end:?} instead of an orderly end"
    );
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        sender.join().unwrap(),
        "the station's writes failed before it stopped"
    );
    server.join().unwrap();
}

#[test]
fn a_connection_with_too_many_bad_lines_in_a_row_is_closed() {
    let server = start_null(RuntimeConfig {
        max_errors_per_conn: 3,
        ..config()
    });
    let mut s = StationConn::connect(server.local_addr());
    s.identify("00001");
    // Good lines reset the count: two bad, one good, two bad is still under the limit.
    s.send(b"x\nx\n");
    s.metrics(1);
    s.send(b"x\nx\n");
    for _ in 0..4 {
        assert_eq!(s.error_code(), ErrorCode::MalformedJson);
    }
    s.metrics(1);
    // Now three in a row: the third is answered, then the connection is closed, and the good
    // line behind them is not read.
    s.send(b"x\nx\nx\n");
    s.metrics(1);
    for _ in 0..3 {
        assert_eq!(s.error_code(), ErrorCode::MalformedJson);
    }
    assert_eq!(s.error_code(), ErrorCode::TooManyErrors);
    assert_eq!(s.read_to_close(), "");
    wait_for("connection closed", WAIT, || {
        server.totals().connections_closed == 1
    });
    let t = server.totals();
    assert_eq!(t.records_delivered, 2);
    assert_eq!(t.line_error(ErrorCode::MalformedJson as usize), 7);
    assert_eq!(t.line_error(ErrorCode::TooManyErrors as usize), 1);
}

#[test]
fn a_silent_connection_is_closed_at_the_idle_timeout() {
    let server = start_null(RuntimeConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..config()
    });
    let mut quiet = StationConn::connect(server.local_addr());
    let mut busy = StationConn::connect(server.local_addr());
    quiet.identify("00001");
    busy.identify("00002");
    let started = Instant::now();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(100));
        busy.metrics(1);
    }
    assert_eq!(quiet.error_code(), ErrorCode::IdleTimeout);
    assert_eq!(quiet.read_to_close(), "");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The connection that kept sending is still open and served.
    busy.metrics(1);
    wait_for("7 records", WAIT, || server.totals().records_delivered == 7);
    assert_eq!(server.totals().connections_active, 1);
    assert_eq!(
        server.totals().line_error(ErrorCode::IdleTimeout as usize),
        1
    );
}

/// Timeouts too long to add to a clock reading mean "never", not a panic.
#[test]
fn timeouts_of_centuries_are_no_deadline() {
    let server = start_null(RuntimeConfig {
        idle_timeout: Some(Duration::MAX),
        line_timeout: Some(Duration::MAX),
        ..config()
    });
    let mut s = StationConn::connect(server.local_addr());
    s.identify("00001");
    s.metrics(1);
    wait_for("the record", WAIT, || {
        server.totals().records_delivered == 1
    });
    assert_eq!(server.totals().connection_panics, 0);
}

#[test]
fn a_line_trickled_byte_by_byte_is_cut_off_at_the_line_timeout() {
    let server = start_null(RuntimeConfig {
        line_timeout: Some(Duration::from_millis(400)),
        ..config()
    });
    let mut s = StationConn::connect(server.local_addr());
    s.identify("00001");
    s.metrics(1);
    // A slowloris sender: one byte every 50 ms never reaches the idle timeout, but its line
    // takes longer than the line timeout.
    let line = b"{\"type\":\"metrics\",\"data\":\"temperature=1\"}";
    let mut sent = 0;
    for &b in line.iter() {
        if s.stream().write_all(&[b]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sent < line.len(), "the whole line was accepted");
    assert_eq!(s.error_code(), ErrorCode::LineTimeout);
    assert_eq!(s.read_to_close(), "");
    assert_eq!(server.totals().records_delivered, 1);
    assert_eq!(
        server.totals().line_error(ErrorCode::LineTimeout as usize),
        1
    );
}

#[test]
fn a_long_line_arriving_in_pieces_is_read_onto_the_backlog_and_arrives_whole() {
    let server = start_null(config());
    let mut s = StationConn::connect(server.local_addr());
    s.identify("00001");
    // ~20 KB: longer than what is carried into the shard buffer, so the later pieces are
    // read into the connection's own backlog.
    let data: Vec<String> = (0..1500).map(|i| format!("m{i}={i}.5")).collect();
    let line = format!(
        "{{\"type\":\"metrics\",\"data\":\"{}\"}}\nshort\n",
        data.join(",")
    );
    for piece in line.as_bytes().chunks(1000) {
        s.send(piece);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        s.error_code(),
        ErrorCode::MalformedJson,
        "the line after it"
    );
    wait_for("1 record", WAIT, || server.totals().records_delivered == 1);
    assert_eq!(server.totals().line_errors_total(), 1);
}

/// Holds every record of one key until released; settles the others at once.
struct HoldKeySink {
    key: &'static str,
    release: Arc<AtomicBool>,
    held_now: Arc<AtomicUsize>,
}

impl Sink for HoldKeySink {
    async fn run(self, records: RecordReceiver, ctx: SinkContext) {
        let mut held = Vec::new();
        loop {
            let next = futures_lite::future::or(async { Some(records.recv().await) }, async {
                glommio::timer::sleep(Duration::from_millis(2)).await;
                None
            })
            .await;
            if self.release.load(Ordering::Relaxed) {
                for r in held.drain(..) {
                    ctx.settle(r, Outcome::Delivered);
                }
            }
            match next {
                Some(Some(r)) if &*r.key == self.key && !self.release.load(Ordering::Relaxed) => {
                    held.push(r.ticket);
                    ctx.recycle(r.value);
                }
                Some(Some(r)) => {
                    ctx.recycle(r.value);
                    ctx.settle(r.ticket, Outcome::Delivered);
                }
                Some(None) => return,
                None => {}
            }
            self.held_now.store(held.len(), Ordering::Relaxed);
        }
    }
}

#[derive(Clone)]
struct HoldKeyFactory(Arc<AtomicBool>, Arc<AtomicUsize>);

impl SinkFactory for HoldKeyFactory {
    type Sink = HoldKeySink;
    fn build(
        &self,
        _: &ShardInfo,
    ) -> Result<HoldKeySink, Box<dyn std::error::Error + Send + Sync>> {
        Ok(HoldKeySink {
            key: "99999",
            release: self.0.clone(),
            held_now: self.1.clone(),
        })
    }
}

/// A connection at its in-flight cap is not read until its records are delivered, while the
/// other connections of the same shard go on: the flooder holds exactly its cap of records,
/// the others are all delivered meanwhile.
#[test]
fn a_connection_at_its_in_flight_cap_waits_alone() {
    let release = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicUsize::new(0));
    let server = Server::start(
        RuntimeConfig {
            shards: 1,
            queue_size: 1024,
            max_in_flight_per_conn: 100,
            ..config()
        },
        HoldKeyFactory(release.clone(), held.clone()),
    )
    .unwrap();
    let mut flooder = StationConn::connect(server.local_addr());
    flooder.identify("99999");
    let writer = {
        let mut stream = flooder.stream().try_clone().unwrap();
        std::thread::spawn(move || {
            let line = b"{\"type\":\"metrics\",\"data\":\"t=1\"}\n";
            for _ in 0..5_000 {
                stream.write_all(line).unwrap();
            }
        })
    };
    wait_for("the flooder at its cap", WAIT, || {
        held.load(Ordering::Relaxed) == 100
    });
    let others: Vec<StationConn> = (0..20)
        .map(|i| {
            let mut s = StationConn::connect(server.local_addr());
            s.identify(&format!("{i:05}"));
            s.metrics(50);
            s
        })
        .collect();
    wait_for("the other stations' records", WAIT, || {
        server.totals().records_delivered == 20 * 50
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        held.load(Ordering::Relaxed),
        100,
        "the flooder holds only its cap"
    );
    release.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    wait_for("everything", WAIT, || {
        server.totals().records_delivered == 20 * 50 + 5_000
    });
    drop(others);
}

/// A connection over its line rate is read no faster than the rate (after its one-second
/// burst), loses nothing, and does not slow its neighbours: a station that connects while the
/// fast one is held back has all its lines acknowledged before the fast one's are even read.
#[test]
fn a_connection_over_its_line_rate_is_slowed_not_cut() {
    let server = start_null(RuntimeConfig {
        shards: 1,
        max_lines_per_sec: 1000,
        ..config()
    });
    let mut fast = StationConn::connect(server.local_addr());
    fast.identify("1");
    let start = Instant::now();
    fast.metrics(5000);
    wait_for("the fast station held back", WAIT, || {
        server.totals().rate_limited_waits > 0
    });
    let mut other = StationConn::connect(server.local_addr());
    other.send(b"{\"type\":\"identify\",\"zipcode\":\"2\",\"acks\":true}\n");
    let sent_at = Instant::now();
    let lines: String = (0..200)
        .map(|n| format!("{{\"type\":\"metrics\",\"seq\":{n},\"data\":\"t={n}\"}}\n"))
        .collect();
    other.send(lines.as_bytes());
    let mut acked = 0;
    while acked < 200 {
        let a = other.reply();
        acked = 1 + a
            .acked_upto()
            .unwrap_or_else(|| panic!("not an ack: {a:?}"));
    }
    let other_took = sent_at.elapsed();
    let early = server.totals();
    let elapsed = start.elapsed().as_secs_f64();
    // At most the one-second burst plus 1,000 lines/s since, plus the other's 200 (and a
    // read's worth of slack: a read may hold more lines than the budget left).
    let bound = 1000.0 + 1000.0 * elapsed + 200.0 + 1200.0;
    assert!(
        (early.lines_received as f64) < bound,
        "{} lines read after {elapsed:.2} s",
        early.lines_received
    );
    // The other station did not wait behind the fast one: the fast one's unread lines need
    // longer at its rate than the other's lines took. (Lines read count both identifies.)
    let fast_unread = 5000 - (early.lines_received - 202);
    eprintln!("the other station's 200 lines took {other_took:?}; {fast_unread} fast lines unread");
    assert!(
        other_took.as_secs_f64() < fast_unread as f64 / 1000.0,
        "the neighbour's 200 lines took {other_took:?}, with {fast_unread} fast lines unread"
    );
    wait_for("everything", WAIT, || {
        server.totals().records_delivered == 5200
    });
    assert_eq!(server.totals().line_errors_total(), 0);
}

/// Stands in for the station registry: the (zipcode, token) pairs that may identify.
#[derive(Debug)]
struct Tokens(&'static [(&'static str, &'static str)]);

impl StationAuth for Tokens {
    fn verify(&self, credentials: &Credentials<'_>) -> bool {
        assert!(credentials.certificate.is_none(), "no TLS here");
        self.0
            .iter()
            .any(|&(z, t)| z == credentials.zipcode && Some(t) == credentials.token)
    }
}

const TOKENS: Tokens = Tokens(&[("12345", "good"), ("99999", "other")]);

#[test]
fn with_station_auth_only_the_zipcodes_own_token_identifies() {
    let server = start_null(RuntimeConfig {
        station_auth: Some(Arc::new(TOKENS)),
        station_auth_max_failures: 0,
        ..config()
    });
    let mut s = StationConn::connect(server.local_addr());
    // A wrong token, no token, and another zipcode's valid token: each refused, and the
    // metrics line after it finds no station.
    for (zipcode, token) in [
        ("12345", Some("bad")),
        ("12345", None),
        ("12345", Some("other")),
    ] {
        s.send(identify_without_acks(zipcode, token));
        assert_eq!(s.error_code(), ErrorCode::AuthFailed, "{zipcode} {token:?}");
        s.metrics(1);
        assert_eq!(s.error_code(), ErrorCode::MetricsBeforeIdentify);
    }
    s.send(identify_without_acks("12345", Some("good")));
    s.metrics(3);
    wait_for("3 records", WAIT, || server.totals().records_delivered == 3);
    // A refused identify takes the station away from a connection that had one.
    s.send(identify_without_acks("99999", Some("good")));
    assert_eq!(s.error_code(), ErrorCode::AuthFailed);
    s.metrics(1);
    assert_eq!(s.error_code(), ErrorCode::MetricsBeforeIdentify);
    let t = server.totals();
    assert_eq!(t.records_delivered, 3);
    assert_eq!(t.line_error(ErrorCode::AuthFailed as usize), 4);
    assert_eq!(t.line_error(ErrorCode::MetricsBeforeIdentify as usize), 4);
    assert_eq!(
        t.connections_active, 1,
        "refusals alone do not close (limit 0)"
    );
}

#[test]
fn a_connection_is_closed_after_too_many_refused_identifies() {
    let server = start_null(RuntimeConfig {
        station_auth: Some(Arc::new(TOKENS)),
        station_auth_max_failures: 2,
        ..config()
    });
    let mut s = StationConn::connect(server.local_addr());
    // Counted over the connection's life: a good identify in between does not reset it.
    s.send(identify_without_acks("12345", Some("bad")));
    s.send(identify_without_acks("12345", Some("good")));
    s.metrics(1);
    s.send(identify_without_acks("99999", None));
    s.metrics(1);
    assert_eq!(s.error_code(), ErrorCode::AuthFailed);
    assert_eq!(s.error_code(), ErrorCode::AuthFailed);
    assert_eq!(s.error_code(), ErrorCode::TooManyErrors);
    assert_eq!(s.read_to_close(), "", "closed; the line behind is not read");
    wait_for("connection closed", WAIT, || {
        server.totals().connections_closed == 1
    });
    // The good station's record is settled by the sink on its own schedule.
    wait_for("its record delivered", WAIT, || {
        server.totals().records_delivered == 1
    });
    let t = server.totals();
    assert_eq!(t.line_error(ErrorCode::AuthFailed as usize), 2);
    assert_eq!(t.line_error(ErrorCode::TooManyErrors as usize), 1);
    assert_eq!(t.line_error(ErrorCode::MetricsBeforeIdentify as usize), 0);
}

#[test]
fn without_station_auth_a_token_changes_nothing() {
    let server = start_null(config());
    let mut s = StationConn::connect(server.local_addr());
    s.send(identify_without_acks("12345", Some("anything")));
    s.send(b"{\"type\":\"identify\",\"zipcode\":\"12345\",\"token\":7}\n");
    s.metrics(2);
    wait_for("2 records", WAIT, || server.totals().records_delivered == 2);
    assert_eq!(server.totals().line_errors_total(), 0);
}

/// A sink that takes the first record, settles it once `release` is set, and takes nothing
/// more until `open` is set: the queue stays full, and the shard's read gate closed, while
/// the first record's acknowledgement becomes ready.
struct FirstThenHold {
    release: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
}

impl Sink for FirstThenHold {
    async fn run(self, records: RecordReceiver, ctx: SinkContext) {
        let Some(first) = records.recv().await else {
            return;
        };
        // Shutdown (a failed test's) ends the waits: a sink must settle by the deadline.
        while !self.release.load(Ordering::Relaxed) && ctx.deadline().is_none() {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        ctx.settle(first.ticket, Outcome::Delivered);
        while !self.open.load(Ordering::Relaxed) && ctx.deadline().is_none() {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        while let Some(r) = records.recv().await {
            ctx.settle(r.ticket, Outcome::Delivered);
        }
    }
}

#[derive(Clone, Default)]
struct FirstThenHoldFactory {
    release: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
}

impl SinkFactory for FirstThenHoldFactory {
    type Sink = FirstThenHold;
    fn build(
        &self,
        _: &ShardInfo,
    ) -> Result<FirstThenHold, Box<dyn std::error::Error + Send + Sync>> {
        Ok(FirstThenHold {
            release: self.release.clone(),
            open: self.open.clone(),
        })
    }
}

/// Answers come before the gate, on the long-partial-line read too: a station holding a
/// partial line longer than a carry (so its next read goes onto its own leftover) gets the
/// acknowledgement of an earlier line while the shard's queue is full and its gate closed.
/// (The two read paths once disagreed: the long-line one checked the gate first, and the
/// answer waited for the queue to drain.)
#[test]
fn answers_come_first_behind_a_long_partial_line_while_the_gate_is_closed() {
    let factory = FirstThenHoldFactory::default();
    let server = Server::start(
        RuntimeConfig {
            queue_size: 8,
            shards: 1,
            shutdown_timeout: Duration::from_secs(2),
            ..config()
        },
        factory.clone(),
    )
    .unwrap();
    let addr = server.local_addr();
    let mut a = StationConn::connect(addr);
    a.send(stormgate_testkit::identify("1", None));
    a.send(stormgate_testkit::metrics(1, "t=1"));
    // The start of a line far longer than a carry (4 KiB), not finished: a valid line once
    // its closing brace comes (JSON allows the whitespace).
    a.send(format!(
        "{{\"type\":\"metrics\",\"seq\":2,\"data\":\"t=2\"{}",
        " ".repeat(8 * 1024)
    ));
    wait_for(
        "the first record taken and the long line read",
        WAIT,
        || {
            let t = server.totals();
            t.records_enqueued == 1 && t.bytes_received > 8 * 1024
        },
    );
    // Another station fills the queue: the gate closes (half full) and stays closed.
    let mut b = StationConn::connect(addr);
    b.identify("2");
    b.metrics(64);
    wait_for("a full queue", WAIT, || {
        server.totals().backpressure_waits > 0
    });
    assert!(server.totals().records_enqueued > 8, "the queue is full");
    factory.release.store(true, Ordering::Relaxed);
    // The first line's answer arrives while the queue is still full.
    a.stream().set_read_timeout(Some(WAIT)).unwrap();
    let reply = a.reply();
    assert_eq!(
        reply,
        stormgate_protocol::Reply::Ack { seq: 1 },
        "the answer waited for the gate"
    );
    assert_eq!(
        server.totals().records_delivered,
        1,
        "the queue drained first"
    );
    factory.open.store(true, Ordering::Relaxed);
    a.send(b"}\n");
    let reply = a.reply();
    assert_eq!(reply, stormgate_protocol::Reply::Ack { seq: 2 });
    wait_for("every record", WAIT, || {
        server.totals().records_delivered == 1 + 1 + 64
    });
}
