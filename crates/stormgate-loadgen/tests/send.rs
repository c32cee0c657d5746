//! `stormgate-loadgen send` as a benchmark runs it, against a small line-counting server in
//! the test: what arrives on each connection, and what the summary says.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// What one connection sent, as the test server saw it.
#[derive(Debug, Default)]
struct Seen {
    zipcode: Option<String>,
    identifies: u64,
    metrics: u64,
    /// Every seq in arrival order.
    seqs: Vec<u64>,
    /// Lines that were not valid JSON.
    garbled: u64,
    sent_us: u64,
    open_for: Duration,
}

/// How the test server behaves.
#[derive(Debug, Clone, Copy, Default)]
struct Behaviour {
    /// Answer every metrics line whose seq is a multiple of this with an error line.
    reject_every: Option<u64>,
    /// Sleep 1 ms after every this many lines (a slow reader: the client's writes block).
    pause_every: Option<u64>,
}

/// A server that reads newline-delimited JSON on every connection until EOF, then closes it.
struct LineServer {
    addr: SocketAddr,
    done: mpsc::Receiver<Seen>,
}

impl LineServer {
    fn start(behaviour: Behaviour) -> LineServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(serve(stream, behaviour));
                });
            }
        });
        LineServer { addr, done }
    }

    /// Waits for `n` connections to end.
    fn collect(&self, n: usize) -> Vec<Seen> {
        (0..n)
            .map(|_| {
                self.done
                    .recv_timeout(Duration::from_secs(30))
                    .expect("a connection ended")
            })
            .collect()
    }
}

fn serve(stream: TcpStream, behaviour: Behaviour) -> Seen {
    let opened = Instant::now();
    let mut replies = stream.try_clone().unwrap();
    let mut seen = Seen::default();
    for (n, line) in BufReader::with_capacity(4096, stream).lines().enumerate() {
        let Ok(line) = line else { break };
        if behaviour
            .pause_every
            .is_some_and(|p| (n as u64).is_multiple_of(p))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            seen.garbled += 1;
            continue;
        };
        match v["type"].as_str() {
            Some("identify") => {
                seen.identifies += 1;
                seen.zipcode = v["zipcode"].as_str().map(str::to_owned);
                assert_eq!(v["city"], "Bench City");
            }
            Some("metrics") => {
                seen.metrics += 1;
                let data = v["data"].as_str().unwrap();
                if data.contains("sent_us=") {
                    seen.sent_us += 1;
                }
                if let Some(seq) = v["seq"].as_u64() {
                    seen.seqs.push(seq);
                    if behaviour
                        .reject_every
                        .is_some_and(|n| seq.is_multiple_of(n))
                    {
                        let reply = br#"{"type":"error","code":"malformed_json","message":"line is not valid JSON"}"#;
                        let _ = replies.write_all(&[&reply[..], b"\n"].concat());
                    }
                }
            }
            _ => seen.garbled += 1,
        }
    }
    seen.open_for = opened.elapsed();
    seen
}

fn loadgen(args: &[&str]) -> (Output, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_stormgate-loadgen"))
        .args(args)
        .output()
        .expect("run stormgate-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON summary; stdout {stdout:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out, summary)
}

fn zipcodes(seen: &[Seen]) -> Vec<String> {
    let mut z: Vec<String> = seen.iter().filter_map(|s| s.zipcode.clone()).collect();
    z.sort();
    z
}

#[test]
fn every_line_arrives_in_order_and_error_replies_are_counted() {
    let server = LineServer::start(Behaviour {
        reject_every: Some(10),
        ..Behaviour::default()
    });
    let target = server.addr.to_string();
    let (out, summary) = loadgen(&[
        "send",
        "--target",
        &target,
        "--connections=50",
        "--lines-per-conn=100",
        "--seq",
        "--timestamps",
        "--quiet-progress",
    ]);
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(50);
    assert_eq!(seen.iter().map(|s| s.identifies).sum::<u64>(), 50);
    assert_eq!(seen.iter().map(|s| s.metrics).sum::<u64>(), 5000);
    assert_eq!(seen.iter().map(|s| s.sent_us).sum::<u64>(), 5000);
    assert_eq!(seen.iter().map(|s| s.garbled).sum::<u64>(), 0);
    for s in &seen {
        assert_eq!(s.seqs, (0..100).collect::<Vec<_>>(), "{:?}", s.zipcode);
    }
    let expected: Vec<String> = (10_000..10_050).map(|z| z.to_string()).collect();
    assert_eq!(zipcodes(&seen), expected);

    assert_eq!(summary["mode"], "send");
    assert_eq!(summary["connections"], 50);
    assert_eq!(summary["connected"], 50);
    assert_eq!(summary["connect_errors"], 0);
    assert_eq!(summary["processes"], 1);
    assert_eq!(summary["lines_sent"], 5000);
    assert_eq!(summary["drain_timeouts"], 0);
    assert!(summary["fd_limit"].as_u64().unwrap() > 64);
    // Seqs 0, 10, …, 90 on each connection were answered with an error line.
    assert_eq!(
        summary["error_replies"],
        serde_json::json!({"malformed_json": 500})
    );
    assert!(
        summary["first_error"]
            .as_str()
            .unwrap()
            .contains("malformed_json")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("open-files limit"), "{stderr}");
}

#[test]
fn a_split_run_adds_up_its_processes() {
    let server = LineServer::start(Behaviour::default());
    let target = server.addr.to_string();
    let summary_file =
        std::env::temp_dir().join(format!("loadgen-split-{}.json", std::process::id()));
    let (out, summary) = loadgen(&[
        "send",
        "--target",
        &target,
        "--connections=20",
        "--max-conns-per-process=8",
        "--lines-per-conn=10",
        "--zip-base=500",
        "--seq",
        "--summary",
        summary_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(20);
    assert_eq!(seen.iter().map(|s| s.metrics).sum::<u64>(), 200);
    for s in &seen {
        assert_eq!(s.seqs, (0..10).collect::<Vec<_>>());
    }
    // Each child got its own zipcodes: 00500..00519, none twice.
    let expected: Vec<String> = (500..520).map(|z| format!("{z:05}")).collect();
    assert_eq!(zipcodes(&seen), expected);

    assert_eq!(summary["processes"], 3);
    assert_eq!(summary["connections"], 20);
    assert_eq!(summary["connected"], 20);
    assert_eq!(summary["lines_sent"], 200);
    let from_file: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_file).unwrap()).unwrap();
    assert_eq!(from_file, summary);
    let _ = std::fs::remove_file(summary_file);
}

/// The server reads slowly, so writes block and batches go out in pieces; when the duration
/// ends mid-batch, the rest still goes out: every line arrives whole, in order, and the
/// summary counts exactly the lines that arrived.
#[test]
fn backpressure_loses_and_splits_no_line() {
    let server = LineServer::start(Behaviour {
        pause_every: Some(100),
        ..Behaviour::default()
    });
    let target = server.addr.to_string();
    let (out, summary) = loadgen(&[
        "send",
        "--target",
        &target,
        "--connections=4",
        "--duration=1s",
        "--drain-timeout=10s",
        "--seq",
        "--timestamps",
        "--quiet-progress",
    ]);
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(4);
    assert_eq!(seen.iter().map(|s| s.garbled).sum::<u64>(), 0);
    for s in &seen {
        assert_eq!(s.seqs, (0..s.metrics).collect::<Vec<_>>());
    }
    assert_eq!(
        summary["lines_sent"].as_u64().unwrap(),
        seen.iter().map(|s| s.metrics).sum::<u64>()
    );
    assert!(summary["blocked_writes"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["drain_timeouts"], 0);
}

#[test]
fn rate_limits_each_connection() {
    let server = LineServer::start(Behaviour::default());
    let target = server.addr.to_string();
    let (out, summary) = loadgen(&[
        "send",
        "--target",
        &target,
        "--connections=10",
        "--rate=50",
        "--duration=1s",
        "--seq",
        "--quiet-progress",
    ]);
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(10);
    let lines = summary["lines_sent"].as_u64().unwrap();
    assert_eq!(seen.iter().map(|s| s.metrics).sum::<u64>(), lines);
    // 10 connections × 50 lines/s × 1 s, give or take a tick and a partial token.
    assert!((400..=560).contains(&lines), "{lines} lines");
    for s in &seen {
        assert!(
            (40..=56).contains(&s.metrics),
            "{} lines on one connection",
            s.metrics
        );
    }
}

#[test]
fn idle_connections_identify_and_hold() {
    let server = LineServer::start(Behaviour::default());
    let target = server.addr.to_string();
    let (out, summary) = loadgen(&[
        "send",
        "--target",
        &target,
        "--connections=10",
        "--idle",
        "--duration=700ms",
        "--quiet-progress",
    ]);
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(10);
    assert_eq!(seen.iter().map(|s| s.identifies).sum::<u64>(), 10);
    assert_eq!(seen.iter().map(|s| s.metrics).sum::<u64>(), 0);
    assert!(
        seen.iter()
            .all(|s| s.open_for >= Duration::from_millis(600))
    );
    assert_eq!(summary["lines_sent"], 0);
    assert_eq!(summary["connected"], 10);
    assert_eq!(summary["idle"], true);
}

#[test]
fn no_server_means_connect_errors_and_failure() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("127.0.0.1:{port}");
    let (out, summary) = loadgen(&[
        "send",
        "--target",
        &target,
        "--connections=5",
        "--lines-per-conn=1",
        "--quiet-progress",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(summary["connected"], 0);
    assert_eq!(summary["connect_errors"], 5);
    assert!(summary["first_error"].as_str().unwrap().contains("refused"));
}

#[test]
fn bad_flag_combinations_are_refused() {
    for args in [
        &["send"][..],
        &["send", "--idle"],
        &["send", "--lines-per-conn=1", "--threads=0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_stormgate-loadgen"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
    }
}
