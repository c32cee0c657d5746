//! `stormgate-loadgen send` as a benchmark runs it, against a small line-counting server in
//! the test, over plain TCP and over TLS (rustls, with certificates from `stormgate-loadgen
//! pki`): what arrives on each connection, and what the summary says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use serde_json::Value;
use stormgate_protocol::ErrorCode;

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
    /// The stream ended at an end of stream (with TLS: the client's close_notify), not an
    /// error.
    clean_end: bool,
    /// TLS: the client presented a certificate.
    client_certificate: bool,
}

/// How the test server behaves.
#[derive(Debug, Clone, Copy, Default)]
struct Behaviour {
    /// Answer every metrics line whose seq is a multiple of this with an error line.
    reject_every: Option<u64>,
    /// Sleep 1 ms after every this many lines (a slow reader: the client's writes block).
    pause_every: Option<u64>,
    /// Sleep this long before each acknowledgement.
    ack_delay: Option<Duration>,
}

/// A server that reads newline-delimited JSON on every connection until EOF, then closes it.
/// It acknowledges every line of a station whose identify asked for acknowledgements.
struct LineServer {
    addr: SocketAddr,
    done: mpsc::Receiver<Seen>,
}

impl LineServer {
    fn start(behaviour: Behaviour) -> LineServer {
        LineServer::start_with(behaviour, None)
    }

    /// The same server, speaking TLS with `config`.
    fn start_tls(behaviour: Behaviour, config: Arc<ServerConfig>) -> LineServer {
        LineServer::start_with(behaviour, Some(config))
    }

    fn start_with(behaviour: Behaviour, tls: Option<Arc<ServerConfig>>) -> LineServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let tx = tx.clone();
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let seen = match tls {
                        None => serve(stream, behaviour),
                        Some(config) => {
                            let conn = ServerConnection::new(config).unwrap();
                            serve(StreamOwned::new(conn, stream), behaviour)
                        }
                    };
                    let _ = tx.send(seen);
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

/// A stream the test server reads lines from and writes replies to.
trait LineStream: Read + Write {
    /// TLS: whether the client presented a certificate.
    fn client_certificate(&self) -> bool {
        false
    }
}

impl LineStream for TcpStream {}

impl LineStream for StreamOwned<ServerConnection, TcpStream> {
    fn client_certificate(&self) -> bool {
        self.conn.peer_certificates().is_some()
    }
}

fn serve(stream: impl LineStream, behaviour: Behaviour) -> Seen {
    let opened = Instant::now();
    let mut seen = Seen::default();
    let mut acks = false;
    let mut reader = BufReader::with_capacity(4096, stream);
    let mut line = String::new();
    for n in 0u64.. {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                seen.clean_end = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if behaviour.pause_every.is_some_and(|p| n.is_multiple_of(p)) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            seen.garbled += 1;
            continue;
        };
        match v["type"].as_str() {
            Some("identify") => {
                seen.identifies += 1;
                seen.zipcode = v["zipcode"].as_str().map(str::to_owned);
                assert_eq!(v["city"], "Bench City");
                acks = v["acks"] == true;
                seen.client_certificate = reader.get_ref().client_certificate();
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
                        let reply = ErrorCode::MalformedJson.error_line();
                        let _ = reader.get_mut().write_all(reply.as_bytes());
                    } else if acks {
                        if let Some(delay) = behaviour.ack_delay {
                            std::thread::sleep(delay);
                        }
                        let mut reply = Vec::new();
                        stormgate_protocol::reply::push_ack(&mut reply, seq);
                        let _ = reader.get_mut().write_all(&reply);
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

/// `stormgate-loadgen send --target SERVER FLAGS...`: its output and its JSON summary.
fn send(server: &LineServer, flags: &[&str]) -> (Output, Value) {
    let target = server.addr.to_string();
    let args: Vec<&str> = ["send", "--target", &target]
        .into_iter()
        .chain(flags.iter().copied())
        .collect();
    loadgen(&args)
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
    let (out, summary) = send(
        &server,
        &[
            "--connections=50",
            "--lines-per-conn=100",
            "--seq",
            "--timestamps",
            "--quiet-progress",
        ],
    );
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
    let summary_file =
        std::env::temp_dir().join(format!("loadgen-split-{}.json", std::process::id()));
    let (out, summary) = send(
        &server,
        &[
            "--connections=20",
            "--max-conns-per-process=8",
            "--lines-per-conn=10",
            "--zip-base=500",
            "--seq",
            "--summary",
            summary_file.to_str().unwrap(),
        ],
    );
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

/// Whether `sent` lines keep to a rate that made `due` of them due: at most 12% over (a tick
/// and a partial token), and at least half (the sender did run at about that rate).
fn ratio_ok(sent: f64, due: f64) -> bool {
    sent <= due * 1.12 + 1.0 && sent >= due * 0.5
}

/// The server reads slowly, so writes block and batches go out in pieces; when the duration
/// ends mid-batch, the rest still goes out: every line arrives whole, in order, and the
/// summary counts exactly the lines that arrived.

#[test]
fn rate_limits_each_connection() {
    let server = LineServer::start(Behaviour::default());
    let (out, summary) = send(
        &server,
        &[
            "--connections=10",
            "--rate=50",
            "--duration=1s",
            "--seq",
            "--quiet-progress",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(10);
    let lines = summary["lines_sent"].as_u64().unwrap();
    assert_eq!(seen.iter().map(|s| s.metrics).sum::<u64>(), lines);
    // 50 lines/s per connection over the time it actually sent (a busy machine stretches it),
    // give or take a tick and a partial token: never faster; slower only within reason.
    let per_conn = 50.0 * summary["duration_s"].as_f64().unwrap();
    assert!(
        ratio_ok(lines as f64, 10.0 * per_conn),
        "{lines} lines, {per_conn:.0} per connection due"
    );
    for s in &seen {
        assert!(
            ratio_ok(s.metrics as f64, per_conn),
            "{} lines on one connection, {per_conn:.0} due",
            s.metrics
        );
    }
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

// ---- TLS --------------------------------------------------------------------------------

/// Certificates from `stormgate-loadgen pki`, in a directory of their own.
struct Pki {
    dir: PathBuf,
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    fn new() -> Pki {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("loadgen-pki-{}-{n}", std::process::id()));
        let (out, summary) = loadgen(&["pki", "--out", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(summary["mode"], "pki");
        assert_eq!(
            summary["server_names"],
            serde_json::json!(["localhost", "127.0.0.1"])
        );
        let path = |key: &str| summary[key].as_str().unwrap().to_owned();
        Pki {
            ca: path("ca"),
            server_cert: path("server_cert"),
            server_key: path("server_key"),
            client_cert: path("client_cert"),
            client_key: path("client_key"),
            dir,
        }
    }

    /// The test server's TLS configuration; with `client_ca`, clients must present a
    /// certificate this CA signed.
    fn server_config(&self, client_ca: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_file_iter(&self.server_cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&self.server_key).unwrap();
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_ca {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(&self.ca).unwrap())
                .unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(builder.with_single_cert(chain, key).unwrap())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every connection sent seqs 0..n in order, whole, and ended cleanly: end of stream, and
/// over TLS a close_notify before it.
fn assert_intact(seen: &[Seen]) {
    for s in seen {
        assert_eq!(s.garbled, 0, "{:?}", s.zipcode);
        assert_eq!(
            s.seqs,
            (0..s.metrics).collect::<Vec<_>>(),
            "{:?}",
            s.zipcode
        );
        assert!(
            s.clean_end,
            "{:?} did not end cleanly (EOF; over TLS, close_notify)",
            s.zipcode
        );
    }
}

/// What a scenario runs over: plain TCP, or TLS with the run's own throwaway CA.
enum Transport {
    Plain,
    Tls(Pki),
}

impl Transport {
    fn tls() -> Transport {
        Transport::Tls(Pki::new())
    }

    /// The test server for this transport.
    fn start(&self, behaviour: Behaviour) -> LineServer {
        match self {
            Transport::Plain => LineServer::start(behaviour),
            Transport::Tls(pki) => LineServer::start_tls(behaviour, pki.server_config(false)),
        }
    }

    /// The load generator's flags for this transport.
    fn args(&self) -> Vec<&str> {
        match self {
            Transport::Plain => Vec::new(),
            Transport::Tls(pki) => vec!["--tls-ca", &pki.ca],
        }
    }
}

/// A slow reader: the load generator's writes block (over TLS, with records queued in
/// rustls and the close_notify behind them), and no line is lost or split.
fn backpressure_loses_and_splits_no_line(transport: Transport) {
    let server = transport.start(Behaviour {
        pause_every: Some(100),
        ..Behaviour::default()
    });
    let mut flags = vec![
        "--connections=4",
        "--duration=1s",
        "--drain-timeout=10s",
        "--seq",
        "--timestamps",
        "--quiet-progress",
    ];
    flags.extend(transport.args());
    let (out, summary) = send(&server, &flags);
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(4);
    assert_intact(&seen);
    assert_eq!(
        summary["lines_sent"].as_u64().unwrap(),
        seen.iter().map(|s| s.metrics).sum::<u64>()
    );
    assert!(summary["blocked_writes"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["drain_timeouts"], 0);
}

#[test]
fn backpressure_loses_and_splits_no_line_over_tcp() {
    backpressure_loses_and_splits_no_line(Transport::Plain);
}

#[test]
fn backpressure_loses_and_splits_no_line_over_tls() {
    backpressure_loses_and_splits_no_line(Transport::tls());
}

/// Idle connections connect (over TLS: handshake), identify and hold until the end.
fn idle_connections_identify_and_hold(transport: Transport) {
    let server = transport.start(Behaviour::default());
    let mut flags = vec![
        "--connections=10",
        "--idle",
        "--duration=700ms",
        "--quiet-progress",
    ];
    flags.extend(transport.args());
    let (out, summary) = send(&server, &flags);
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(10);
    assert_intact(&seen);
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
fn idle_connections_identify_and_hold_over_tcp() {
    idle_connections_identify_and_hold(Transport::Plain);
}

#[test]
fn idle_connections_identify_and_hold_over_tls() {
    idle_connections_identify_and_hold(Transport::tls());
}

#[test]
fn over_tls_every_line_arrives_in_order_and_replies_are_read() {
    let pki = Pki::new();
    let server = LineServer::start_tls(
        Behaviour {
            reject_every: Some(10),
            ..Behaviour::default()
        },
        pki.server_config(false),
    );
    let (out, summary) = send(
        &server,
        &[
            "--connections=20",
            "--threads=2",
            "--lines-per-conn=300",
            "--seq",
            "--timestamps",
            "--quiet-progress",
            "--tls-ca",
            &pki.ca,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(20);
    assert_intact(&seen);
    assert_eq!(seen.iter().map(|s| s.identifies).sum::<u64>(), 20);
    assert_eq!(seen.iter().map(|s| s.metrics).sum::<u64>(), 6000);
    assert_eq!(seen.iter().map(|s| s.sent_us).sum::<u64>(), 6000);
    assert!(seen.iter().all(|s| !s.client_certificate));
    let expected: Vec<String> = (10_000..10_020).map(|z| z.to_string()).collect();
    assert_eq!(zipcodes(&seen), expected);

    assert_eq!(summary["connected"], 20);
    assert_eq!(summary["connect_errors"], 0);
    assert_eq!(summary["lines_sent"], 6000);
    assert_eq!(summary["io_errors"], 0);
    assert_eq!(summary["drain_timeouts"], 0);
    // Seqs 0, 10, …, 290 on each connection were answered with an error line, over TLS.
    assert_eq!(
        summary["error_replies"],
        serde_json::json!({"malformed_json": 600})
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over TLS"), "{stderr}");
}

#[test]
fn over_tls_acknowledgements_are_read_and_counted() {
    let pki = Pki::new();
    let server = LineServer::start_tls(Behaviour::default(), pki.server_config(false));
    let (out, summary) = send(
        &server,
        &[
            "--connections=5",
            "--lines-per-conn=400",
            "--seq",
            "--acks",
            "--quiet-progress",
            "--tls-ca",
            &pki.ca,
            // The certificate names the address too.
            "--tls-server-name=127.0.0.1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(5);
    assert_intact(&seen);
    assert_eq!(summary["lines_sent"], 2000);
    assert_eq!(summary["acked_lines"], 2000);
    assert_eq!(summary["ack_replies"], 2000);
    assert_eq!(summary["nacks"], 0);
}

/// Every acknowledged line is timed, in every child process, from its building to its ack.
#[test]
fn acknowledgements_are_timed_across_child_processes() {
    let delay = Duration::from_millis(5);
    let server = LineServer::start(Behaviour {
        ack_delay: Some(delay),
        ..Behaviour::default()
    });
    let (out, summary) = send(
        &server,
        &[
            "--connections=4",
            "--max-conns-per-process=2",
            "--rate=20",
            "--lines-per-conn=20",
            "--seq",
            "--acks",
            "--quiet-progress",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    server.collect(4);
    assert_eq!(summary["processes"], 2);
    assert_eq!(summary["acked_lines"], 80);
    let latency = &summary["ack_latency_us"];
    assert_eq!(latency["count"], 80, "{summary}");
    // Every ack came at least `delay` after its line; none near a second (20 lines a
    // second per connection, each answered 5 ms after it was read).
    let p50 = latency["p50"].as_u64().unwrap();
    let max = latency["max"].as_u64().unwrap();
    assert!(
        p50 >= delay.as_micros() as u64 && max < 500_000,
        "{latency}"
    );
    let histogram = summary["ack_latency_histogram"].as_str().unwrap();
    let whole = stormgate_loadgen::latency::Latency::decode(histogram).unwrap();
    assert_eq!(whole.summary().count, 80);
}

/// Mutual TLS, paced, split over processes: the children get the TLS flags too.
#[test]
fn over_tls_a_paced_split_run_presents_its_client_certificate() {
    let pki = Pki::new();
    let server = LineServer::start_tls(Behaviour::default(), pki.server_config(true));
    let (out, summary) = send(
        &server,
        &[
            "--connections=10",
            "--max-conns-per-process=4",
            "--rate=100",
            "--duration=1s",
            "--seq",
            "--quiet-progress",
            "--tls-ca",
            &pki.ca,
            "--tls-cert",
            &pki.client_cert,
            "--tls-key",
            &pki.client_key,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let seen = server.collect(10);
    assert_intact(&seen);
    assert!(seen.iter().all(|s| s.client_certificate));
    assert_eq!(summary["processes"], 3);
    assert_eq!(summary["connected"], 10);
    let lines = summary["lines_sent"].as_u64().unwrap();
    assert_eq!(seen.iter().map(|s| s.metrics).sum::<u64>(), lines);
    // 10 connections × 100 lines/s over the time it sent, give or take a tick.
    let due = 10.0 * 100.0 * summary["duration_s"].as_f64().unwrap();
    assert!(ratio_ok(lines as f64, due), "{lines} lines, {due:.0} due");
}

#[test]
fn over_tls_a_server_certificate_from_another_ca_fails_every_handshake() {
    let (ours, theirs) = (Pki::new(), Pki::new());
    let server = LineServer::start_tls(Behaviour::default(), theirs.server_config(false));
    let (out, summary) = send(
        &server,
        &[
            "--connections=3",
            "--lines-per-conn=1",
            "--quiet-progress",
            "--tls-ca",
            &ours.ca,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(summary["connected"], 0);
    assert_eq!(summary["connect_errors"], 3);
    let error = summary["first_error"].as_str().unwrap();
    assert!(
        error.contains("TLS handshake") && error.contains("certificate"),
        "{error}"
    );
    // The server saw no line on any of them.
    for s in server.collect(3) {
        assert_eq!((s.identifies, s.metrics), (0, 0));
    }
}

#[test]
fn tls_flags_need_a_ca() {
    for args in [
        &["send", "--lines-per-conn=1", "--tls-server-name=x"][..],
        &[
            "send",
            "--lines-per-conn=1",
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
        ],
        &[
            "send",
            "--lines-per-conn=1",
            "--tls-ca=ca.pem",
            "--tls-cert=c.pem",
        ],
        &["send", "--lines-per-conn=1", "--tls-ca=/nonexistent/ca.pem"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_stormgate-loadgen"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
    }
}
