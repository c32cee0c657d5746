//! Records reach a real broker over TLS (`KAFKA_PROP_SECURITY_PROTOCOL=SSL`): librdkafka's
//! OpenSSL verifies the broker's certificate and encrypts everything it sends.
//!
//! The test broker (Tansu 0.6.0) has no TLS listener, so this test puts a TLS-terminating
//! proxy in front of a broker of its own, and has that broker advertise the proxy's address:
//! every client connection — bootstrap, the partition leaders, the admin client, the
//! verifying consumer — then goes through TLS, as with a broker that speaks TLS itself.

mod support;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use stormgate_kafka::verify::{self, ScanEvent, ScanOptions};
use support::pki::{Ca, TlsStation, identify, metrics, pki_dir};
use support::*;

/// Away from the suite's broker (19092), the restart test's (19099) and the benchmarks'.
const BROKER_PORT: u16 = 19_096;

fn tansu(args: &[&str], advertised: Option<SocketAddr>) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kafka/tansu.sh");
    let mut cmd = Command::new(script);
    cmd.args(args)
        .arg(BROKER_PORT.to_string())
        .stdout(std::process::Stdio::null());
    if let Some(addr) = advertised {
        cmd.env("TANSU_ADVERTISED", addr.to_string());
    }
    assert!(
        cmd.status().expect("run tansu.sh").success(),
        "tansu.sh {args:?}"
    );
}

/// Stops this test's broker however the test ends.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        tansu(&["stop"], None);
    }
}

/// Accepts TLS on `listener` and forwards the plaintext to `backend`, both ways, one pair of
/// threads per connection. Counts completed handshakes in `handshakes`.
fn tls_proxy(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    backend: SocketAddr,
    handshakes: Arc<AtomicUsize>,
) {
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let (config, handshakes) = (Arc::clone(&config), Arc::clone(&handshakes));
            std::thread::spawn(move || {
                if let Err(e) = proxy_one(client, config, backend, &handshakes) {
                    eprintln!("proxy: {e}");
                }
            });
        }
    });
}

fn proxy_one(
    mut client: TcpStream,
    config: Arc<rustls::ServerConfig>,
    backend: SocketAddr,
    handshakes: &AtomicUsize,
) -> io::Result<()> {
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut client)?;
    }
    handshakes.fetch_add(1, Ordering::Relaxed);
    let broker = TcpStream::connect(backend)?;
    let tls = Arc::new(Mutex::new(tls));
    // Broker → station side: plaintext in, TLS records out.
    let (to_client, mut from_broker) = (client.try_clone()?, broker.try_clone()?);
    let tls_out = Arc::clone(&tls);
    std::thread::spawn(move || -> io::Result<()> {
        let mut to_client = to_client;
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = from_broker.read(&mut buf)?;
            if n == 0 {
                let _ = to_client.shutdown(Shutdown::Both);
                return Ok(());
            }
            // Encrypted under the lock, sent after it: a blocked socket never holds it.
            let mut records = Vec::new();
            {
                let mut tls = tls_out.lock().unwrap();
                tls.writer().write_all(&buf[..n])?;
                while tls.wants_write() {
                    tls.write_tls(&mut records)?;
                }
            }
            to_client.write_all(&records)?;
        }
    });
    // Client → broker: TLS records in, plaintext out. The first pass reads nothing: the
    // client's first request may have arrived with its last handshake message.
    let mut to_broker = broker;
    let mut buf = vec![0; 64 * 1024];
    let mut plain = vec![0; 64 * 1024];
    let mut n = 0;
    loop {
        // Decrypted under the lock, sent after it.
        let (mut plaintext, mut replies) = (Vec::new(), Vec::new());
        {
            let mut tls = tls.lock().unwrap();
            let mut records = &buf[..n];
            while !records.is_empty() {
                tls.read_tls(&mut records)?;
                tls.process_new_packets().map_err(io::Error::other)?;
            }
            loop {
                match tls.reader().read(&mut plain) {
                    Ok(0) => break,
                    Ok(m) => plaintext.extend_from_slice(&plain[..m]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            while tls.wants_write() {
                tls.write_tls(&mut replies)?;
            }
        }
        to_broker.write_all(&plaintext)?;
        client.write_all(&replies)?;
        n = client.read(&mut buf)?;
        if n == 0 {
            let _ = to_broker.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

#[test]
fn records_reach_the_broker_over_tls() {
    let dir = pki_dir();
    let ca = Ca::new("Kafka test CA");
    let ca_file = dir.join("kafka-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let server = ca.server();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap();
    tansu(&["start"], Some(proxy));
    let _guard = BrokerGuard;
    let handshakes = Arc::new(AtomicUsize::new(0));
    tls_proxy(
        listener,
        Arc::new(config),
        SocketAddr::from(([127, 0, 0, 1], BROKER_PORT)),
        Arc::clone(&handshakes),
    );

    // What every client needs to reach it: TLS, trusting the test CA, checking the name.
    let tls_props: Vec<(String, String)> = [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca_file.to_str().unwrap()),
        ("ssl.endpoint.identification.algorithm", "https"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let brokers = proxy.to_string();
    let topic = format!("kafka-tls-{}", uuid::Uuid::now_v7().simple());
    verify::create_topic_with(&brokers, &topic, 3, &tls_props).expect("create topic over TLS");

    let mut args = vec![
        "--kafka-brokers".to_owned(),
        brokers.clone(),
        "--kafka-topic".to_owned(),
        topic.clone(),
        "--tls-cert".to_owned(),
    ];
    // Stations speak TLS too: both sides of Stormgate encrypted.
    let (cert, key) = server.write(&dir, "station-listener");
    args.extend([
        cert.to_str().unwrap().to_owned(),
        "--tls-key".to_owned(),
        key.to_str().unwrap().to_owned(),
    ]);
    for (name, value) in &tls_props {
        args.extend(["--kafka-prop".to_owned(), format!("{name}={value}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = start(&args);
    const STATIONS: u64 = 3;
    const LINES: u64 = 200;
    let mut stations: Vec<TlsStation> = (0..STATIONS)
        .map(|_| TlsStation::connect(app.local_addr(), ca.client_config(None)).unwrap())
        .collect();
    for (i, s) in stations.iter_mut().enumerate() {
        s.send(&identify(&format!("2000{i}"), None)).unwrap();
        for seq in 1..=LINES {
            s.send(&metrics(seq, &format!("pressure={seq}"))).unwrap();
        }
    }
    for s in &mut stations {
        s.wait_for_ack(LINES);
    }
    app.stop().unwrap();

    // Read back over TLS as well.
    let opts = ScanOptions {
        expect: Some(STATIONS * LINES),
        timeout: Duration::from_secs(60),
        properties: tls_props,
        ..ScanOptions::default()
    };
    let mut seen = std::collections::BTreeMap::<String, Vec<f64>>::new();
    verify::scan_topic(&brokers, &topic, &opts, |event| {
        if let ScanEvent::Record(r) = event {
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let value: serde_json::Value = serde_json::from_slice(r.value.unwrap()).unwrap();
            seen.entry(key)
                .or_default()
                .push(value["metrics"]["pressure"].as_f64().unwrap());
        }
    })
    .expect("read the topic over TLS");
    assert_eq!(seen.len(), STATIONS as usize);
    for (zipcode, values) in &seen {
        let expected: Vec<f64> = (1..=LINES).map(|seq| seq as f64).collect();
        assert_eq!(values, &expected, "{zipcode}: every line, in order");
    }
    let handshakes = handshakes.load(Ordering::Relaxed);
    eprintln!("{handshakes} TLS handshakes at the broker's proxy");
    assert!(
        handshakes >= 3,
        "the admin client, the producers and the consumer all came through TLS"
    );
}
