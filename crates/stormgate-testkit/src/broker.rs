//! The Apache Kafka brokers of the tests: the suite's, whose address `deploy/test.sh` puts in
//! `STORMGATE_TEST_KAFKA`, and [`OwnBroker`], one a test starts, stops and deletes itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The Apache Kafka broker the tests talk to, from `STORMGATE_TEST_KAFKA` (`deploy/test.sh`
/// starts one with `deploy/kafka/kafka.sh` and sets it).
pub fn broker() -> String {
    std::env::var("STORMGATE_TEST_KAFKA").expect(
        "STORMGATE_TEST_KAFKA is not set: run the suite with deploy/test.sh, which starts a broker, \
         or point it at one (e.g. `deploy/kafka/kafka.sh start 19092` prints the address)",
    )
}

/// An Apache Kafka broker of a test's own, for tests that stop and start it or need listeners
/// the suite's broker lacks; run through `deploy/kafka/kafka.sh` like the suite's.
///
/// It listens on the suite broker's port (from `STORMGATE_TEST_KAFKA`) plus `offset`, and on
/// the four ports after that one (controller, SASL, TLS): every port of a suite run derives
/// from `STORMGATE_TEST_KAFKA_PORT`, so two runs with different ports coexist. Each test
/// binary that owns a broker takes its own offset (multiples of 10 from 10; `deploy/test.sh`
/// gives the benchmarks +40). Dropping it stops the broker and deletes its data.
pub struct OwnBroker {
    /// The plaintext listener's port.
    pub port: u16,
    /// What `kafka.sh start` printed: `KAFKA_BROKERS`, `KAFKA_SASL_BROKERS`, and with TLS
    /// `KAFKA_SSL_BROKERS` and `KAFKA_SASL_SSL_BROKERS`, each `127.0.0.1:PORT`.
    pub listeners: BTreeMap<String, String>,
    env: Vec<(String, String)>,
}

impl OwnBroker {
    /// A broker with empty storage on the suite's port + `offset`, started; `env` goes to
    /// every `kafka.sh` call (e.g. `KAFKA_TLS_CERT`).
    pub fn start_fresh(offset: u16, env: &[(&str, &str)]) -> OwnBroker {
        let suite = broker();
        let suite_port: u16 = suite
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in STORMGATE_TEST_KAFKA={suite}"));
        let mut own = OwnBroker {
            port: suite_port + offset,
            listeners: BTreeMap::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        own.script("reset");
        own.listeners = own.start();
        own
    }

    /// `kafka.sh start`: its `KAFKA_*=host:port` lines.
    pub fn start(&self) -> BTreeMap<String, String> {
        self.script("start")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// `kafka.sh stop`: SIGTERM, and SIGKILL if it lingers; the data stays on disk.
    pub fn stop(&self) {
        self.script("stop");
    }

    /// The plaintext listener.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, verb: &str) -> String {
        let t0 = Instant::now();
        let out = Command::new(kafka_sh())
            .args([verb, &self.port.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::inherit())
            .output()
            .expect("run deploy/kafka/kafka.sh");
        assert!(out.status.success(), "kafka.sh {verb} {}", self.port);
        eprintln!("kafka.sh {verb} {}: {:?}", self.port, t0.elapsed());
        String::from_utf8(out.stdout).expect("utf-8 output")
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new(kafka_sh())
            .args(["reset", &self.port.to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

/// `deploy/kafka/kafka.sh` of this checkout.
fn kafka_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kafka/kafka.sh")
}
