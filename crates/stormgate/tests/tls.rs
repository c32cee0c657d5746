//! TLS on the station listener end to end: stations over TLS reach the real broker; a
//! plain-text client, a client without a valid certificate (mutual TLS) and a client that
//! stalls its handshake are turned away and publish nothing; a client certificate proves its
//! zipcode (`STATION_AUTH=certificate`, and in place of a token); a new certificate reaches
//! new connections without a restart while open ones keep working.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use stormgate_protocol::ErrorCode;
use stormgate_station::Reply;
use stormgate_testkit::*;
use support::*;

/// Starts Stormgate with TLS from `server`'s files in `dir`, plus `extra` flags.
fn start_tls(dir: &Path, server: &Leaf, extra: &[&str]) -> stormgate::app::App {
    let (cert, key) = server.write(dir, "server");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut args = vec!["--tls-cert", cert, "--tls-key", key];
    args.extend_from_slice(extra);
    start(&args)
}

/// Whether the server refuses this TLS client with a TLS alert: its handshake fails, or
/// (TLS 1.3, where the client finishes before the server has checked its certificate) its
/// first read gets the alert. Silence (a read timeout) is not a refusal.
fn refused(app: &stormgate::app::App, config: std::sync::Arc<rustls::ClientConfig>) -> bool {
    let alert = |e: &std::io::Error| {
        eprintln!("refused: {e} ({:?})", e.kind());
        e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("alert")
    };
    match TlsStation::connect(app.local_addr(), config) {
        Err(e) => alert(&e),
        // With TLS 1.3 the client's side of the handshake ends before the server has judged
        // its certificate: the refusal is the next thing read. Nothing is written first, as
        // a write racing the server's close could fail with EPIPE before the alert is read.
        Ok(mut s) => s.reply().as_ref().err().is_some_and(alert),
    }
}

#[test]
fn stations_over_tls_reach_kafka_and_plain_text_is_turned_away() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "tls");
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let app = start_tls(
        &dir,
        &ca.server(),
        &["--kafka-brokers", &brokers, "--kafka-topic", &topic],
    );
    let config = ca.client_config(None);
    const STATIONS: u64 = 4;
    const LINES: u64 = 250;
    let mut stations: Vec<TlsStation> = (0..STATIONS)
        .map(|_| TlsStation::connect(app.local_addr(), config.clone()).unwrap())
        .collect();
    for (i, s) in stations.iter_mut().enumerate() {
        s.send(&identify(&format!("1000{i}"), None)).unwrap();
        // Sent in one write each, so that lines cross TLS records and reads.
        let batch: Vec<u8> = (1..=LINES)
            .flat_map(|seq| metrics(seq, &format!("temperature={seq}.5")))
            .collect();
        s.send(&batch).unwrap();
    }
    for s in &mut stations {
        s.wait_for_ack(LINES);
    }
    // A client that speaks plain text to the TLS port publishes nothing: its bytes are a
    // failed handshake, and it gets no line back.
    let mut plain = TcpStream::connect(app.local_addr()).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain.write_all(&identify("66666", None)).unwrap();
    plain.write_all(&metrics(1, "plain=1")).unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"{"),
        "no JSON line for a plain-text client: {answer:?}"
    );
    wait_for(
        "the failed handshake to be counted",
        Duration::from_secs(10),
        || app.server().totals().tls_handshake_failures == 1,
    );
    let t = app.server().totals();
    assert_eq!(t.tls_handshakes, STATIONS);
    assert_eq!(t.records_enqueued, STATIONS * LINES);
    assert_eq!(t.line_errors_total(), 0);

    let records = consume(&brokers, &topic, (STATIONS * LINES) as usize);
    let by_station = by_key(&records);
    assert_eq!(by_station.len(), STATIONS as usize);
    for (zipcode, records) in by_station {
        assert!(zipcode.starts_with("1000"), "{zipcode}");
        let temps: Vec<f64> = records
            .iter()
            .map(|r| r.value["metrics"]["temperature"].as_f64().unwrap())
            .collect();
        let expected: Vec<f64> = (1..=LINES).map(|seq| seq as f64 + 0.5).collect();
        assert_eq!(temps, expected, "{zipcode}: every line, in order");
        assert_eq!(records[0].value["city"], "Town");
    }
    app.stop().unwrap();
}

#[test]
fn mutual_tls_turns_away_clients_without_a_valid_certificate() {
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let stations_ca = Ca::new("Station CA");
    let rogue_ca = Ca::new("Rogue CA");
    let client_ca = dir.join("stations-ca.pem");
    std::fs::write(&client_ca, &stations_ca.pem).unwrap();
    let app = start_tls(
        &dir,
        &ca.server(),
        &[
            "--sink",
            "null",
            "--tls-client-ca",
            client_ca.to_str().unwrap(),
        ],
    );
    // Trusts the server, but has no certificate, or one signed by another CA.
    assert!(refused(&app, ca.client_config(None)), "no certificate");
    let rogue = rogue_ca.station("12345");
    assert!(
        refused(&app, ca.client_config(Some(&rogue))),
        "a certificate from another CA"
    );
    wait_for(
        "both refusals to be counted",
        Duration::from_secs(10),
        || app.server().totals().tls_handshake_failures == 2,
    );
    // A station with a certificate from the stations' CA gets in.
    let good = stations_ca.station("12345");
    let mut s = TlsStation::connect(app.local_addr(), ca.client_config(Some(&good))).unwrap();
    s.send(&identify("12345", None)).unwrap();
    s.send(&metrics(1, "good=1")).unwrap();
    s.wait_for_ack(1);
    let t = app.server().totals();
    assert_eq!(t.tls_handshakes, 1);
    assert_eq!(t.records_enqueued, 1, "nothing from the refused clients");
    assert_eq!(t.lines_received, 2);
    app.stop().unwrap();
}

#[test]
fn a_client_certificate_proves_its_zipcode_and_no_other() {
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let client_ca = dir.join("stations-ca.pem");
    std::fs::write(&client_ca, &ca.pem).unwrap();
    let client_ca = client_ca.to_str().unwrap();
    let server = ca.server();
    let station = ca.station("12345");
    let config = ca.client_config(Some(&station));

    // STATION_AUTH=certificate: the certificate is the only proof.
    let app = start_tls(
        &dir,
        &server,
        &[
            "--sink",
            "null",
            "--tls-client-ca",
            client_ca,
            "--station-auth",
            "certificate",
            "--station-auth-max-failures",
            "0",
        ],
    );
    let mut s = TlsStation::connect(app.local_addr(), config.clone()).unwrap();
    s.send(&identify("99999", None)).unwrap();
    assert!(
        matches!(
            s.reply().unwrap(),
            Reply::Error {
                code: ErrorCode::AuthFailed,
                ..
            }
        ),
        "a certificate for 12345 does not speak for 99999"
    );
    s.send(&identify("12345", Some("a token proves nothing here")))
        .unwrap();
    s.send(&metrics(1, "good=1")).unwrap();
    s.wait_for_ack(1);
    assert_eq!(
        app.server()
            .totals()
            .line_error(ErrorCode::AuthFailed as usize),
        1
    );
    app.stop().unwrap();

    // STATION_AUTH=token under mutual TLS: the certificate stands in for a token.
    let registry = dir.join("stations.jsonl");
    let token = stormgate::registry::add(&registry, "77777").unwrap();
    let app = start_tls(
        &dir,
        &server,
        &[
            "--sink",
            "null",
            "--tls-client-ca",
            client_ca,
            "--station-auth",
            "token",
            "--station-registry",
            registry.to_str().unwrap(),
            "--station-auth-max-failures",
            "0",
        ],
    );
    let mut s = TlsStation::connect(app.local_addr(), config).unwrap();
    s.send(&identify("12345", None)).unwrap();
    s.send(&metrics(1, "by_certificate=1")).unwrap();
    s.wait_for_ack(1);
    // The same connection may also identify for a station whose token it holds...
    s.send(&identify("77777", Some(&token))).unwrap();
    s.send(&metrics(2, "by_token=1")).unwrap();
    s.wait_for_ack(2);
    // ...but not for one it has neither for.
    s.send(&identify("88888", None)).unwrap();
    assert!(matches!(
        s.reply().unwrap(),
        Reply::Error {
            code: ErrorCode::AuthFailed,
            ..
        }
    ));
    let t = app.server().totals();
    assert_eq!(t.records_enqueued, 2);
    assert_eq!(t.line_error(ErrorCode::AuthFailed as usize), 1);
    app.stop().unwrap();
}

#[test]
fn a_new_certificate_reaches_new_connections_and_open_ones_keep_working() {
    log_lines();
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let first = ca.server();
    let app = start_tls(&dir, &first, &["--sink", "null"]);
    let config = ca.client_config(None);
    let mut open = TlsStation::connect(app.local_addr(), config.clone()).unwrap();
    assert_eq!(open.server_certificate(), first.der());
    open.send(&identify("12345", None)).unwrap();
    open.send(&metrics(1, "before=1")).unwrap();
    open.wait_for_ack(1);

    // A half-written replacement (a certificate without its key's match) is refused and the
    // old certificate stays in force.
    let second = ca.server();
    replace(&dir.join("server.crt"), &second.cert_pem);
    wait_for_log(
        &["not reloaded", dir.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let s = TlsStation::connect(app.local_addr(), config.clone()).unwrap();
    assert_eq!(
        s.server_certificate(),
        first.der(),
        "a certificate that does not match the key is not loaded"
    );
    // The key follows: now the pair is whole and is loaded.
    second.write(&dir, "server");
    let t0 = Instant::now();
    loop {
        let s = TlsStation::connect(app.local_addr(), config.clone()).unwrap();
        if s.server_certificate() == second.der() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new certificate was not loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("new certificate in use after {:?}", t0.elapsed());
    // The connection opened before the reload goes on under its old session.
    open.send(&metrics(2, "after=1")).unwrap();
    open.wait_for_ack(2);
    let t = app.server().totals();
    assert_eq!(t.records_enqueued, 2);
    assert_eq!(t.tls_handshake_failures, 0);
    app.stop().unwrap();
}

#[test]
fn a_stalled_handshake_is_closed_at_the_timeout_and_an_idle_connection_at_its_own() {
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    // The idle timeout is ten times the handshake's, so that which one closed the stalled
    // connection shows in the time it took even on a busy machine, and in the counters.
    let app = start_tls(
        &dir,
        &ca.server(),
        &[
            "--sink",
            "null",
            "--tls-handshake-timeout",
            "300ms",
            "--idle-timeout",
            "3s",
        ],
    );
    let mut stalled = TcpStream::connect(app.local_addr()).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let n = stalled.read_to_end(&mut rest).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0, "closed without a word");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "closed at the handshake timeout (300 ms), not before it nor at the idle timeout (3 s): \
         {waited:?}"
    );
    wait_for("the timeout to be counted", Duration::from_secs(5), || {
        app.server().totals().tls_handshake_failures == 1
    });
    let t = app.server().totals();
    assert_eq!(t.connections_active, 0);
    assert_eq!(t.idle_timeouts, 0, "not closed as idle");

    // After its handshake a connection has the idle timeout, told over TLS, then an orderly
    // TLS close.
    let mut quiet = TlsStation::connect(app.local_addr(), ca.client_config(None)).unwrap();
    quiet.send(&identify("12345", None)).unwrap();
    match quiet.reply().unwrap() {
        Reply::Error { code, .. } => assert_eq!(code, ErrorCode::IdleTimeout),
        other => panic!("{other:?}"),
    }
    quiet.expect_close_notify();
    // Counted when the connection's task ends, just after its last write.
    wait_for(
        "the idle timeout to be counted",
        Duration::from_secs(5),
        || app.server().totals().idle_timeouts == 1,
    );
    assert_eq!(app.server().totals().tls_handshake_failures, 1);
    app.stop().unwrap();
}

/// `TLS_MIN_VERSION=1.3` turns a TLS 1.2 client away (with an alert, counted), which a server
/// on the default (1.2) serves.
#[test]
fn tls_min_version_1_3_refuses_a_tls_1_2_client() {
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let server = ca.server();
    let tls12 = ca.client_config_for(None, &[&rustls::version::TLS12]);
    let tls13 = ca.client_config_for(None, &[&rustls::version::TLS13]);

    let app = start_tls(&dir, &server, &["--sink", "null"]);
    let mut s = TlsStation::connect(app.local_addr(), tls12.clone()).unwrap();
    assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    s.send(&identify("12345", None)).unwrap();
    s.send(&metrics(1, "tls12=1")).unwrap();
    s.wait_for_ack(1);
    app.stop().unwrap();

    let app = start_tls(
        &dir,
        &server,
        &["--sink", "null", "--tls-min-version", "1.3"],
    );
    assert!(refused(&app, tls12), "a TLS 1.2 client");
    wait_for("the refusal counted", Duration::from_secs(10), || {
        app.server().totals().tls_handshake_failures == 1
    });
    let mut s = TlsStation::connect(app.local_addr(), tls13).unwrap();
    assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    s.send(&identify("12345", None)).unwrap();
    s.send(&metrics(1, "tls13=1")).unwrap();
    s.wait_for_ack(1);
    let t = app.server().totals();
    assert_eq!((t.tls_handshakes, t.records_enqueued), (1, 1));
    app.stop().unwrap();
}

/// A key that is not the certificate's: the server does not start, and `check-config` fails.
#[test]
fn a_certificate_with_another_key_is_refused_at_start_and_by_check_config() {
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let (cert, _) = ca.server().write(&dir, "server");
    let (_, other_key) = ca.server().write(&dir, "other");
    let (cert, key) = (cert.to_str().unwrap(), other_key.to_str().unwrap());
    let cli = <stormgate::cli::Cli as clap::Parser>::try_parse_from([
        "stormgate",
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "off",
        "--sink",
        "null",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ])
    .unwrap();
    let err = match stormgate::app::start(&cli) {
        Ok(app) => {
            app.stop().unwrap();
            panic!("started with a key that is not the certificate's");
        }
        Err(e) => format!("{e:#}"),
    };
    eprintln!("start: {err}");
    assert!(err.contains("key"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stormgate"))
        .env_remove("KAFKA_BROKERS")
        .args([
            "--sink",
            "null",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "check-config",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("check-config: {stderr}");
    assert!(!out.status.success(), "check-config passed: {stderr}");
    assert!(stderr.contains("key"), "{stderr}");
}

/// Over TLS, a connection over `TCP_MAX_CONNECTIONS` is closed before any handshake: the
/// client's handshake ends without a server hello, and the server counts a refusal, not a
/// handshake (neither completed nor failed).
#[test]
fn a_connection_over_the_limit_is_closed_before_its_handshake() {
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let app = start_tls(
        &dir,
        &ca.server(),
        &["--sink", "null", "--max-connections", "1"],
    );
    let config = ca.client_config(None);
    let mut first = TlsStation::connect(app.local_addr(), config.clone()).unwrap();
    first.send(&identify("12345", None)).unwrap();
    first.send(&metrics(1, "first=1")).unwrap();
    first.wait_for_ack(1);
    let err = match TlsStation::connect(app.local_addr(), config) {
        Ok(_) => panic!("a handshake over the connection limit"),
        Err(e) => e,
    };
    eprintln!("over the limit: {err} ({:?})", err.kind());
    assert!(
        !err.to_string().contains("alert"),
        "closed, not refused by a TLS alert: {err}"
    );
    wait_for("the refusal counted", Duration::from_secs(10), || {
        app.server().totals().connections_rejected == 1
    });
    let t = app.server().totals();
    assert_eq!((t.tls_handshakes, t.tls_handshake_failures), (1, 0));
    app.stop().unwrap();
}
