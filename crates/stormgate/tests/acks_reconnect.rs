//! At-least-once delivery through connections that keep breaking: reliable stations →
//! a proxy that cuts every connection at a random moment → Stormgate → the real broker.
//! Every line arrives, and a line arrives more than once only if its station resent it.
//! And nacks: lines whose delivery failed are sent again until they are delivered.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use stormgate_kafka::EmbeddedCluster;
use stormgate_station::{ReliableStation, ReliableStats};
use stormgate_testkit::*;
use support::*;

const STATIONS: usize = 8;
const LINES: u64 = 2_000;
/// Stations send `BURST` lines, then pause: about a second of sending, so that every station
/// sees several cuts while answers flow, not only at the start.
const BURST: u64 = 10;
const PAUSE: Duration = Duration::from_millis(5);
/// A proxied connection lives this long at most (ms, uniform)...
const CUT_AFTER_MS: (u64, u64) = (50, 400);
/// ...and half of them are also cut after this many bytes from the station (uniform), often
/// in the middle of a line.
const CUT_AFTER_BYTES: (u64, u64) = (1_000, 200_000);

fn zipcode(i: usize) -> String {
    format!("{:05}", 40_000 + i)
}

#[test]
fn reliable_stations_deliver_every_line_through_cut_connections() {
    run();
}

fn run() {
    let t0 = Instant::now();
    let brokers = broker();
    let topic = fresh_topic(&brokers, "acks-reconnect");
    let app = start(&["--kafka-brokers", &brokers, "--kafka-topic", &topic]);
    let proxy = CuttingProxy::start(app.local_addr());
    let addr = proxy.addr.to_string();
    let stations: Vec<JoinHandle<ReliableStats>> = (0..STATIONS)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut s = ReliableStation::builder(&addr, &zipcode(i), "Cutville")
                    .answer_timeout(Duration::from_secs(5))
                    .connect()
                    .expect("connect through the proxy");
                for n in 0..LINES {
                    assert_eq!(s.send(&[("t", n as f64), ("station", i as f64)]), n);
                    if n % BURST == BURST - 1 {
                        thread::sleep(PAUSE);
                    }
                }
                s.flush(Duration::from_secs(60))
                    .expect("every line answered");
                s.stats()
            })
        })
        .collect();
    let stats: Vec<ReliableStats> = stations.into_iter().map(|t| t.join().unwrap()).collect();
    let sent_in = t0.elapsed();
    let (cuts, forwarded) = proxy.stop();
    let totals = app.stop().unwrap().totals;
    eprintln!(
        "stations done after {sent_in:?}, server stopped after {:?}",
        t0.elapsed()
    );
    assert_eq!(totals.records_failed, 0, "records failed");
    let delivered = totals.records_delivered as usize;

    let records = consume(&brokers, &topic, delivered);
    assert_eq!(records.len(), delivered, "records in the topic");
    let groups = by_key(&records);
    assert_eq!(groups.len(), STATIONS, "stations in the topic");
    let mut duplicates_total = 0;
    for (i, st) in stats.iter().enumerate() {
        let zip = zipcode(i);
        assert_eq!(
            (st.sent, st.acked, st.rejected, st.nacked, st.unmatched),
            (LINES, LINES, 0, 0, 0),
            "station {zip}: {st:?}"
        );
        let seqs: Vec<u64> = groups[&zip]
            .iter()
            .map(|r| r.value["seq"].as_u64().expect("every record has a seq"))
            .collect();
        let mut copies: BTreeMap<u64, u64> = BTreeMap::new();
        let mut firsts = Vec::new();
        for &seq in &seqs {
            let n = copies.entry(seq).or_insert(0);
            if *n == 0 {
                firsts.push(seq);
            }
            *n += 1;
        }
        assert_eq!(
            copies.keys().copied().collect::<Vec<_>>(),
            (0..LINES).collect::<Vec<_>>(),
            "station {zip}: every seq, no gap"
        );
        // Without nacks, each line's first copy comes in seq order (see `reliable`'s docs).
        assert_eq!(
            firsts,
            (0..LINES).collect::<Vec<_>>(),
            "station {zip}: order"
        );
        // A line is in the topic at most as often as the station's connections carried it to
        // the server whole: a copy more would be Stormgate's own duplicate.
        for (&seq, &n) in &copies {
            let carried = forwarded.get(&(zip.clone(), seq)).copied().unwrap_or(0);
            assert!(
                n <= carried,
                "station {zip}: seq {seq} is in the topic {n} times but was sent whole {carried} \
                 times"
            );
        }
        let resent_seqs = forwarded
            .iter()
            .filter(|((z, _), n)| *z == zip && **n > 1)
            .count();
        eprintln!("station {zip}: {resent_seqs} seqs reached the server more than once");
        let duplicates = seqs.len() as u64 - LINES;
        assert!(
            duplicates <= st.resent,
            "station {zip}: {duplicates} duplicates but only {} lines resent",
            st.resent
        );
        duplicates_total += duplicates;
    }
    let sum = |f: fn(&ReliableStats) -> u64| stats.iter().map(f).sum::<u64>();
    eprintln!(
        "{STATIONS} stations x {LINES} lines in {:?}: proxy cut {cuts} connections; stations \
         reconnected {} times ({} failed attempts), resent {} lines; the topic holds {} \
         duplicates; the server rejected {} partial lines",
        t0.elapsed(),
        sum(|s| s.reconnects),
        sum(|s| s.connect_failures),
        sum(|s| s.resent),
        duplicates_total,
        totals.line_errors_total(),
    );
    assert!(
        cuts >= STATIONS as u64,
        "the proxy cut only {cuts} connections"
    );
    assert_eq!(
        delivered as u64 - STATIONS as u64 * LINES,
        duplicates_total,
        "delivered records beyond one per line are the duplicates"
    );
}

/// With the broker down past the delivery timeout, the server nacks every line (and spills
/// it); the station sends the nacked lines again, on a new connection each round, until the
/// broker is back. Then each line is in the topic once, and the server spilled every failed
/// copy: what a replay of its spill file would publish a second time.
#[test]
fn nacked_lines_are_sent_again_until_delivered() {
    const NACK_LINES: u64 = 20;
    let cluster = EmbeddedCluster::start("nacks", 3).unwrap();
    let brokers = cluster.bootstrap_servers();
    let spill = std::env::temp_dir().join(format!("stormgate-acks-spill-{}", uuid::Uuid::now_v7()));
    let app = start(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        "nacks",
        "--kafka-delivery-timeout",
        "1s",
        "--spill-dir",
        spill.to_str().unwrap(),
    ]);
    cluster.mock().broker_down(1).unwrap();
    let mut s = ReliableStation::connect(&app.local_addr().to_string(), "77777", "Nackton")
        .expect("connect");
    for n in 0..NACK_LINES {
        s.send(&[("t", n as f64)]);
    }
    // Two rounds of nacks at least (1 s delivery timeout each), while nothing is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.stats().nacked < 2 * NACK_LINES {
        assert!(Instant::now() < deadline, "{:?}", s.stats());
        let err = s.flush(Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.unanswered, NACK_LINES as usize);
    }
    cluster.mock().broker_up(1).unwrap();
    s.flush(Duration::from_secs(30))
        .expect("delivered once the broker is back");
    let st = s.stats();
    drop(s);
    let totals = app.stop().unwrap().totals;
    eprintln!("{st:?}; server failed {} records", totals.records_failed);
    assert!(st.nacked >= 2 * NACK_LINES, "{st:?}");
    assert_eq!(st.resent, st.nacked, "each nack, one resend: {st:?}");
    // A new connection per round of nacks (a round may be split when the broker comes back
    // in the middle of one).
    assert!((2..=st.nacked).contains(&st.reconnects), "{st:?}");
    assert_eq!((st.acked, st.rejected, st.unmatched), (NACK_LINES, 0, 0));
    assert_eq!(totals.records_failed, st.nacked);
    assert_eq!(
        totals.records_spilled, st.nacked,
        "every nacked line was spilled"
    );

    let records = consume(&brokers, "nacks", NACK_LINES as usize);
    let mut seqs: Vec<u64> = records
        .iter()
        .map(|r| r.value["seq"].as_u64().unwrap())
        .collect();
    // In order too, unless the broker came back in the middle of a round: then the lines
    // nacked in that round come after the ones delivered in it.
    seqs.sort_unstable();
    assert_eq!(seqs, (0..NACK_LINES).collect::<Vec<_>>(), "each line once");
    std::fs::remove_dir_all(&spill).unwrap();
}

/// A TCP proxy that cuts every connection it carries: after a random time, and for half of
/// them after a random number of bytes from the station. Cutting shuts both sockets down, so
/// lines and answers in flight are lost.
struct CuttingProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    forwarded: Arc<Forwarded>,
    accept: JoinHandle<()>,
}

impl CuttingProxy {
    fn start(upstream: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(Forwarded::default());
        let (s, c, f) = (Arc::clone(&stop), Arc::clone(&cuts), Arc::clone(&forwarded));
        let accept = thread::spawn(move || {
            let mut rng = Rng(0x5eed_1234_abcd_0001);
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let life = Duration::from_millis(rng.between(CUT_AFTER_MS));
                        let bytes = rng
                            .next()
                            .is_multiple_of(2)
                            .then(|| rng.between(CUT_AFTER_BYTES));
                        conns.push(thread::spawn({
                            let (c, f) = (Arc::clone(&c), Arc::clone(&f));
                            move || carry(client, upstream, life, bytes, &c, &f)
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
            for conn in conns {
                conn.join().unwrap();
            }
        });
        CuttingProxy {
            addr,
            stop,
            cuts,
            forwarded,
            accept,
        }
    }

    /// Stops accepting, waits for the open connections' cuts; returns how many it cut, and
    /// how many times each (zipcode, seq) reached the server as a whole line.
    fn stop(self) -> (u64, BTreeMap<(String, u64), u64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.accept.join().unwrap();
        let forwarded = std::mem::take(&mut *self.forwarded.lines.lock().unwrap());
        (self.cuts.load(Ordering::Relaxed), forwarded)
    }
}

/// Whole lines the proxy carried from stations to the server: (zipcode, seq) → times.
#[derive(Default)]
struct Forwarded {
    lines: std::sync::Mutex<BTreeMap<(String, u64), u64>>,
}

/// Follows one connection's bytes towards the server, line by line, noting each whole metrics
/// line's (zipcode, seq) in `Forwarded`.
struct LineTap<'a> {
    forwarded: &'a Forwarded,
    zipcode: Option<String>,
    partial: Vec<u8>,
}

impl LineTap<'_> {
    fn carried(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.note(&line);
        }
    }

    /// The connection was cut (the server sees its end of stream): a last line cut just
    /// before its newline is still a whole JSON value, which the server takes as the last
    /// line (docs/PROTOCOL.md), so it counts as carried too.
    fn cut(&mut self) {
        let rest = std::mem::take(&mut self.partial);
        self.note(&rest);
    }

    fn note(&mut self, line: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        if v["type"] == "identify" {
            self.zipcode = v["zipcode"].as_str().map(str::to_owned);
        } else if let (Some(zip), Some(seq)) = (&self.zipcode, v["seq"].as_u64()) {
            *self
                .forwarded
                .lines
                .lock()
                .unwrap()
                .entry((zip.clone(), seq))
                .or_insert(0) += 1;
        }
    }
}

/// Carries one connection both ways until `life` is over, or the station has sent `bytes`;
/// counts in `cuts` if it was cut for either reason (not when a side closed first).
fn carry(
    client: TcpStream,
    upstream: SocketAddr,
    life: Duration,
    bytes: Option<u64>,
    cuts: &AtomicU64,
    forwarded: &Arc<Forwarded>,
) {
    client.set_nonblocking(false).unwrap();
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let closed = Arc::new(AtomicBool::new(false));
    let close = {
        let sockets = [client.try_clone().unwrap(), server.try_clone().unwrap()];
        let closed = Arc::clone(&closed);
        // Returns whether this call closed the connection.
        Arc::new(move || {
            let first = !closed.swap(true, Ordering::Relaxed);
            for s in &sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
            first
        })
    };
    let up = {
        let (from, to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let close = Arc::clone(&close);
        let forwarded = Arc::clone(forwarded);
        thread::spawn(move || {
            let mut tap = LineTap {
                forwarded: &forwarded,
                zipcode: None,
                partial: Vec::new(),
            };
            let spent = pump(from, to, bytes.unwrap_or(u64::MAX), |b| tap.carried(b));
            tap.cut();
            close() && spent
        })
    };
    let down = {
        let close = Arc::clone(&close);
        thread::spawn(move || {
            pump(server, client, u64::MAX, |_| {});
            close();
        })
    };
    let deadline = Instant::now() + life;
    while !closed.load(Ordering::Relaxed) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    let by_time = close();
    let by_bytes = up.join().unwrap();
    down.join().unwrap();
    if by_time || by_bytes {
        cuts.fetch_add(1, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either side ends or `budget` bytes were copied, showing
/// `carried` every chunk written; returns whether the budget was spent.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mut budget: u64,
    mut carried: impl FnMut(&[u8]),
) -> bool {
    let mut buf = [0u8; 16 * 1024];
    while budget > 0 {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n.min(budget as usize),
        };
        if to.write_all(&buf[..n]).is_err() {
            return false;
        }
        carried(&buf[..n]);
        budget -= n as u64;
    }
    true
}

/// xorshift64*: a fixed sequence of cut points per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}
