//! Several instances on one address (SO_REUSEPORT across processes), one of them restarted
//! under load: no station is refused, the stopping instance's stations are told to reconnect
//! spread over its drain period, and every acknowledged line reaches the real broker.
//!
//! The test runs in a network namespace of its own (`unshare -n`, as root), where it turns
//! `net.ipv4.tcp_migrate_req` on as deploy/sysctl/99-stormgate.conf does — a per-namespace
//! setting, so the host's is untouched — and starts its own Apache Kafka there (the suite's
//! broker is on the host's loopback, which the namespace cannot reach).
//! `STORMGATE_FLEET_MIGRATE=0` runs it with the kernel's default instead, to see what the
//! setting buys (docs/TUNING.md has both runs' figures); the assertions then do not apply.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use stormgate_station::{ReliableStation, ReliableStats, Reply, read_reply};
use stormgate_testkit::*;
use support::process::{Process, scrape};
use support::*;

/// The broker of this test's own sits at the suite broker's port + 50 (see [`OwnBroker`]),
/// inside the test's network namespace.
const PORT_OFFSET: u16 = 50;
const INSTANCES: usize = 3;
/// Stations that identify, send one line and wait (a third of them on each instance).
const IDLE: usize = 240;
/// Acknowledging stations sending throughout: enough that some are on the restarted
/// instance (the kernel's hash places each; none of 24 on it: (2/3)^24, 6 in 100,000).
const RELIABLE: usize = 24;
/// Threads opening a connection after another: identify, one line, its ack, close.
const CHURNERS: usize = 4;
const DRAIN_PERIOD: Duration = Duration::from_secs(3);
const INSIDE: &str = "STORMGATE_FLEET_NETNS";

#[test]
fn restarting_one_of_three_instances_refuses_no_station_and_loses_no_acked_line() {
    if std::env::var_os(INSIDE).is_none() {
        rerun_in_own_network_namespace(
            "restarting_one_of_three_instances_refuses_no_station_and_loses_no_acked_line",
        );
        return;
    }
    let migrate = std::env::var("STORMGATE_FLEET_MIGRATE").map_or(true, |v| v != "0");
    let t0 = Instant::now();
    let kafka = OwnBroker::start_fresh(PORT_OFFSET, &[]);
    let brokers = kafka.brokers();
    let topic = fresh_topic(&brokers, "fleet");
    let addr = free_addr();
    let listen = addr.to_string();
    let period = format!("{}s", DRAIN_PERIOD.as_secs());
    let env = [
        ("TCP_LISTEN", listen.as_str()),
        ("TCP_SHARDS", "1"),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_TOPIC", topic.as_str()),
        ("TCP_DRAIN_PERIOD", period.as_str()),
        ("SHUTDOWN_TIMEOUT", "15s"),
    ];
    let mut instances: Vec<Process> = (0..INSTANCES).map(|_| Process::spawn(&env)).collect();
    for p in &mut instances {
        assert_eq!(p.addr(), addr);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let told = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let idle: Vec<JoinHandle<Station>> = (0..IDLE)
        .map(|i| {
            let (stop, told) = (Arc::clone(&stop), Arc::clone(&told));
            thread::spawn(move || idle_station(addr, i, &stop, &told))
        })
        .collect();
    let reliable: Vec<JoinHandle<ReliableStats>> = (0..RELIABLE)
        .map(|i| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || reliable_station(addr, i, &stop))
        })
        .collect();
    let churn_stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<JoinHandle<Churn>> = (0..CHURNERS)
        .map(|i| {
            let stop = Arc::clone(&churn_stop);
            thread::spawn(move || churn(addr, i, &stop))
        })
        .collect();
    wait_for(
        "every idle station on an instance",
        Duration::from_secs(30),
        || {
            instances
                .iter_mut()
                .map(|p| scrape(p.metrics_addr())["stormgate_connections_active"])
                .sum::<f64>()
                >= IDLE as f64
        },
    );
    thread::sleep(Duration::from_secs(1));

    // Restart the second instance while the stations keep going.
    let held: Vec<f64> = instances
        .iter_mut()
        .map(|p| scrape(p.metrics_addr())["stormgate_connections_active"])
        .collect();
    let sigterm = Instant::now();
    instances[1].signal(libc::SIGTERM);
    let status = instances[1]
        .wait_exit(Duration::from_secs(30))
        .expect("the instance stops within its shutdown timeout");
    let stopped_after = sigterm.elapsed();
    assert!(status.success(), "{status:?}");
    instances[1] = Process::spawn(&env);
    assert_eq!(instances[1].addr(), addr);
    thread::sleep(Duration::from_secs(2));

    churn_stop.store(true, Ordering::Relaxed);
    let churned: Vec<Churn> = churners.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let idle: Vec<Station> = idle.into_iter().map(|h| h.join().unwrap()).collect();
    let reliable: Vec<ReliableStats> = reliable.into_iter().map(|h| h.join().unwrap()).collect();
    for p in &mut instances {
        p.signal(libc::SIGTERM);
        assert!(p.wait_exit(Duration::from_secs(30)).unwrap().success());
    }

    // What the stations saw.
    let refused: u64 = churned.iter().map(|c| c.refused).sum::<u64>()
        + idle.iter().map(|s| s.refused).sum::<u64>();
    let cut: u64 =
        churned.iter().map(|c| c.cut).sum::<u64>() + idle.iter().map(|s| s.cut).sum::<u64>();
    let connections: u64 = churned.iter().map(|c| c.acked.len() as u64).sum();
    let told = told.lock().unwrap().clone();
    let offsets: Vec<Duration> = told.iter().map(|t| t.duration_since(sigterm)).collect();
    let histogram = histogram(&offsets, DRAIN_PERIOD / 10, 12);
    eprintln!(
        "tcp_migrate_req={}: held {held:?} before the restart; instance stopped after \
         {stopped_after:?}; {connections} churned connections, {refused} refused, {cut} cut \
         without an answer; {} stations told to reconnect, per {:?} since SIGTERM: \
         {histogram:?}; reliable stations: {reliable:?}",
        u8::from(migrate),
        told.len(),
        DRAIN_PERIOD / 10
    );

    // What reached Kafka: every acknowledged line, of every kind of station.
    let records = consume_all(&brokers, &topic, 0);
    let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for r in &records {
        if let Some(seq) = r.value["seq"].as_u64() {
            seen.entry(r.key.clone()).or_default().insert(seq);
        }
    }
    let mut missing = Vec::new();
    for (i, st) in reliable.iter().enumerate() {
        let have = seen.get(&reliable_zip(i)).map_or(0, |s| s.len() as u64);
        if have != st.sent || seen[&reliable_zip(i)].last() != Some(&(st.sent - 1)) {
            missing.push(format!("{}: {have} of {} lines", reliable_zip(i), st.sent));
        }
    }
    for (zip, seq) in churned
        .iter()
        .flat_map(|c| &c.acked)
        .chain(idle.iter().flat_map(|s| &s.acked))
    {
        if !seen.get(zip).is_some_and(|s| s.contains(seq)) {
            missing.push(format!("{zip} seq {seq}"));
        }
    }
    eprintln!(
        "{} records in the topic; test took {:?}",
        records.len(),
        t0.elapsed()
    );
    if !migrate {
        return;
    }
    assert!(
        missing.is_empty(),
        "acknowledged lines missing: {missing:?}"
    );
    assert_eq!(
        (refused, cut),
        (0, 0),
        "stations refused or cut without a word"
    );
    for st in &reliable {
        assert_eq!(
            (
                st.connect_failures,
                st.unmatched,
                st.rejected,
                st.unanswered
            ),
            (0, 0, 0, 0),
            "{st:?}"
        );
        assert_eq!(st.acked, st.sent, "{st:?}");
    }
    assert!(
        reliable.iter().any(|st| st.told_to_reconnect > 0),
        "some reliable station was on the restarted instance: {reliable:?}"
    );
    // The stopped instance's connections were its idle stations (each told once), its
    // reliable stations (told, counted in their stats) and at most one churning connection
    // per churner; the idle ones' reconnects spread over the drain period: over at least half
    // of it, and no tenth of it with more than a third of them.
    let on_it = held[1] as usize;
    let reliable_told: usize = reliable
        .iter()
        .map(|st| st.told_to_reconnect as usize)
        .sum();
    assert!(
        told.len() <= on_it && told.len() + reliable_told + CHURNERS >= on_it,
        "{} idle and {reliable_told} reliable stations told to reconnect, {on_it} held",
        told.len()
    );
    let span = offsets
        .iter()
        .max()
        .unwrap()
        .saturating_sub(*offsets.iter().min().unwrap());
    assert!(
        span >= DRAIN_PERIOD / 2,
        "reconnects within {span:?}: {histogram:?}"
    );
    assert!(
        histogram.iter().all(|&n| n <= told.len() / 3),
        "reconnects bunched: {histogram:?}"
    );
}

/// Runs this test again in a new network namespace with loopback up and
/// `net.ipv4.tcp_migrate_req` set (unless `STORMGATE_FLEET_MIGRATE=0`).
fn rerun_in_own_network_namespace(name: &str) {
    let migrate = std::env::var("STORMGATE_FLEET_MIGRATE").map_or("1".into(), |v| v);
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            &format!(
                "ip link set lo up && echo {migrate} > /proc/sys/net/ipv4/tcp_migrate_req && \
                 exec \"$0\" --exact {name} --nocapture --test-threads=1"
            ),
        ])
        .arg(exe)
        .env(INSIDE, "1")
        .status()
        .expect("run unshare (util-linux)");
    assert!(
        status.success(),
        "the test in its own network namespace: {status:?}"
    );
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn reliable_zip(i: usize) -> String {
    format!("{:05}", 61_000 + i)
}

/// What an idle or churning station saw.
#[derive(Default)]
struct Station {
    /// (zipcode, seq) of every line acknowledged.
    acked: Vec<(String, u64)>,
    /// Connections refused (connect failed).
    refused: u64,
    /// Connections that ended without the line's answer and without `reconnect`.
    cut: u64,
}

type Churn = Station;

/// One line on a new connection: identify with acks, metrics `seq`, then wait for the ack.
/// Returns the reader, the ack read, or what went wrong.
fn one_line(addr: SocketAddr, zip: &str, seq: u64) -> Result<BufReader<TcpStream>, Outcome> {
    let mut s = TcpStream::connect(addr).map_err(|_| Outcome::Refused)?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let lines = format!(
        "{{\"type\":\"identify\",\"zipcode\":\"{zip}\",\"city\":\"Fleet\",\"acks\":true}}\n\
         {{\"type\":\"metrics\",\"seq\":{seq},\"data\":\"n={seq}\"}}\n"
    );
    s.write_all(lines.as_bytes()).map_err(|_| Outcome::Cut)?;
    let mut replies = BufReader::new(s);
    match read_reply(&mut replies) {
        Ok(Reply::Ack { .. } | Reply::AckUpto { .. }) => Ok(replies),
        // Stopping already: told before the line was read; it is sent again elsewhere.
        Ok(Reply::Reconnect) => Err(Outcome::Told),
        Ok(other) => panic!("{zip}: {other:?}"),
        Err(_) => Err(Outcome::Cut),
    }
}

enum Outcome {
    Refused,
    Cut,
    Told,
}

fn idle_station(
    addr: SocketAddr,
    i: usize,
    stop: &AtomicBool,
    told: &Mutex<Vec<Instant>>,
) -> Station {
    let zip = format!("{:05}", 62_000 + i);
    let mut st = Station::default();
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut replies = match one_line(addr, &zip, seq) {
            Ok(r) => r,
            Err(o) => {
                count(&mut st, o);
                continue;
            }
        };
        st.acked.push((zip.clone(), seq));
        seq += 1;
        // Wait: nothing more to send, until told to reconnect (or the test ends).
        replies
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        loop {
            if stop.load(Ordering::Relaxed) {
                return st;
            }
            let mut line = String::new();
            match replies.read_line(&mut line) {
                Ok(0) => {
                    st.cut += 1;
                    break;
                }
                Ok(_) if Reply::parse(line.as_bytes()) == Ok(Reply::Reconnect) => {
                    told.lock().unwrap().push(Instant::now());
                    break;
                }
                Ok(_) => panic!("{zip}: unexpected {line:?}"),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {
                    st.cut += 1;
                    break;
                }
            }
        }
    }
    st
}

fn churn(addr: SocketAddr, i: usize, stop: &AtomicBool) -> Churn {
    let mut st = Station::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // A new station each time: seq 0 of its zipcode.
        let zip = format!("{:05}", 70_000 + i as u64 * 5_000 + n);
        n += 1;
        match one_line(addr, &zip, 0) {
            Ok(_) => st.acked.push((zip, 0)),
            Err(o) => count(&mut st, o),
        }
        thread::sleep(Duration::from_millis(2));
    }
    st
}

fn count(st: &mut Station, o: Outcome) {
    match o {
        Outcome::Refused => st.refused += 1,
        Outcome::Cut => st.cut += 1,
        Outcome::Told => {}
    }
}

fn reliable_station(addr: SocketAddr, i: usize, stop: &AtomicBool) -> ReliableStats {
    let mut s = ReliableStation::builder(&addr.to_string(), &reliable_zip(i), "Fleet")
        .answer_timeout(Duration::from_secs(20))
        .connect()
        .expect("connect");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        s.send(&[("n", n as f64)]);
        n += 1;
        thread::sleep(Duration::from_millis(10));
    }
    s.flush(Duration::from_secs(30))
        .expect("every line answered");
    s.stats()
}

/// Counts of `offsets` per `bucket`, `buckets` of them (the last takes the rest).
fn histogram(offsets: &[Duration], bucket: Duration, buckets: usize) -> Vec<usize> {
    let mut h = vec![0; buckets];
    for o in offsets {
        let b = (o.as_nanos() / bucket.as_nanos()) as usize;
        h[b.min(buckets - 1)] += 1;
    }
    h
}
