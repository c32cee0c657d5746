//! Command line: one subcommand per mode.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use stormgate_kafka::config::{
    DEFAULT_ACKS, DEFAULT_BATCH_SIZE, DEFAULT_BATCH_TIMEOUT, DEFAULT_COMPRESSION,
    DEFAULT_DELIVERY_TIMEOUT, DEFAULT_TOPIC,
};
use stormgate_kafka::{Acks, Compression, KafkaSettings};

/// Stormgate's load generator: drive station connections at the server (`send`), read the
/// topic back and check it (`consume`), or measure a plain producer's ceiling (`produce`).
///
/// Every mode prints one JSON summary on stdout at the end and progress on stderr.
#[derive(Debug, Clone, Parser)]
#[command(name = "stormgate-loadgen", version, about, max_term_width = 100)]
pub struct Cli {
    /// The mode.
    #[command(subcommand)]
    pub command: Command,
}

/// The modes.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Open station connections to the server and send metrics lines.
    Send(SendArgs),
    /// Read the topic from the beginning and check what arrived (counts, seq gaps and
    /// duplicates per zipcode, latency).
    Consume(ConsumeArgs),
    /// Publish ready-made Stormgate records with one producer, as fast as it goes: the
    /// ceiling the server is compared with.
    Produce(ProduceArgs),
    /// Write a throwaway CA and a server and a client certificate signed by it (PEM), for
    /// TLS benchmarks and tests: ca.pem, server.crt, server.key, client.crt, client.key.
    Pki(PkiArgs),
}

/// `send` flags.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: SocketAddr,

    /// Station connections to open.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,

    /// Loopback source addresses to spread connections over (connection i binds
    /// 127.0.0.(1 + i % K)), each with its own ephemeral ports; only for a 127.x target;
    /// 0 = let the kernel choose.
    #[arg(long, default_value_t = 4)]
    pub sources: usize,

    /// Kernel send buffer of each connection in bytes (SO_SNDBUF); 0 = kernel autotuning.
    /// A station's is small: on one host with the server, autotuned client buffers (up to
    /// `tcp_wmem`'s 4 MiB each) take the host's TCP memory (`tcp_mem`) from the server's
    /// receive queues, which no deployment has to share with its stations.
    #[arg(long, default_value_t = 0)]
    pub send_buffer: usize,

    /// Metrics lines per second per connection; 0 = as fast as the server takes them.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// How long to send (or, with --idle, to hold the connections), counted from when every
    /// connection is open; e.g. 10s, 2m.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Metrics lines per connection; the connection then closes. With --duration, whichever
    /// comes first.
    #[arg(long, value_name = "N")]
    pub lines_per_conn: Option<u64>,

    /// Add "seq":N to each metrics line, N counting from 0 per connection.
    #[arg(long)]
    pub seq: bool,

    /// Add a sent_us=UNIX_MICROSECONDS metric to each line, for end-to-end latency.
    #[arg(long)]
    pub timestamps: bool,

    /// Ask for acknowledgements ("acks":true in identify; needs --seq) and count them; the
    /// drain then also waits for every line's answer.
    #[arg(long, requires = "seq")]
    pub acks: bool,

    /// Connection i identifies as zipcode Z + i (at least 5 digits), city "Bench City".
    #[arg(long, value_name = "Z", default_value_t = 10_000)]
    pub zip_base: u64,

    /// Connect and identify, send --lines-per-conn lines (none by default), then hold the
    /// connections open for --duration (to measure the server's memory per connection; with
    /// one line, like a station that reports once a minute).
    #[arg(long)]
    pub idle: bool,

    /// Sending threads per process (each runs one epoll loop over its share).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Processes to split the connections over; 0 = as few as the open-files limit allows.
    #[arg(long, default_value_t = 0)]
    pub processes: usize,

    /// After the last line, how long to wait for the server to close each connection (a
    /// sign it has read everything) before closing it anyway.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Also write the JSON summary to this file.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,

    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet_progress: bool,

    /// Run as a child of a split run: JSON progress and summary on stdout, nothing else.
    #[arg(long, hide = true)]
    pub child: bool,

    /// Most connections per process (default: open-files limit − 64); for tests.
    #[arg(long, hide = true, value_name = "M")]
    pub max_conns_per_process: Option<usize>,

    /// Speak TLS, trusting the CA certificates in this PEM file for the server's certificate
    /// (e.g. ca.pem from `stormgate-loadgen pki`). A connection counts as connected once its
    /// handshake is done; every connection makes a full handshake (no session resumption).
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub tls_ca: Option<PathBuf>,

    /// The name the server's certificate must be valid for (a DNS name or an IP address).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "localhost",
        requires = "tls_ca",
        help_heading = "TLS"
    )]
    pub tls_server_name: String,

    /// PEM certificate chain to present as every connection's client certificate (mutual
    /// TLS); needs --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["tls_ca", "tls_key"],
        help_heading = "TLS"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert", help_heading = "TLS")]
    pub tls_key: Option<PathBuf>,
}

impl SendArgs {
    /// Checks the combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.idle {
            if self.duration.is_none() {
                return Err("--idle needs --duration".into());
            }
            if self.rate > 0.0 {
                return Err("--idle sends its --lines-per-conn at once: drop --rate".into());
            }
        } else if self.duration.is_none() && self.lines_per_conn.is_none() {
            return Err("give --duration and/or --lines-per-conn (or --idle)".into());
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return Err("--rate must be a finite number ≥ 0".into());
        }
        if self.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        Ok(())
    }

    /// The arguments of a child process that runs `connections` of this run's connections,
    /// starting at connection `offset`.
    pub fn child_args(&self, connections: usize, offset: usize) -> Vec<String> {
        let mut args = vec![
            "send".to_owned(),
            "--child".to_owned(),
            format!("--target={}", self.target),
            format!("--connections={connections}"),
            format!("--zip-base={}", self.zip_base + offset as u64),
            format!("--sources={}", self.sources),
            format!("--send-buffer={}", self.send_buffer),
            format!("--rate={}", self.rate),
            format!("--threads={}", self.threads),
            "--processes=1".to_owned(),
            format!(
                "--drain-timeout={}",
                humantime::format_duration(self.drain_timeout)
            ),
        ];
        if let Some(d) = self.duration {
            args.push(format!("--duration={}", humantime::format_duration(d)));
        }
        if let Some(n) = self.lines_per_conn {
            args.push(format!("--lines-per-conn={n}"));
        }
        if let Some(ca) = &self.tls_ca {
            args.push(format!("--tls-ca={}", ca.display()));
            args.push(format!("--tls-server-name={}", self.tls_server_name));
        }
        for (path, flag) in [(&self.tls_cert, "--tls-cert"), (&self.tls_key, "--tls-key")] {
            if let Some(path) = path {
                args.push(format!("{flag}={}", path.display()));
            }
        }
        for (on, flag) in [
            (self.seq, "--seq"),
            (self.timestamps, "--timestamps"),
            (self.acks, "--acks"),
            (self.idle, "--idle"),
        ] {
            if on {
                args.push(flag.to_owned());
            }
        }
        args
    }
}

/// `consume` flags.
#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,

    /// Topic to read.
    #[arg(long, default_value = DEFAULT_TOPIC)]
    pub topic: String,

    /// Records to wait for: stop once this many were read and every partition is at its end.
    #[arg(long, value_name = "N")]
    pub expect: Option<u64>,

    /// Keep reading after the ends until --expect is reached or --idle-timeout passes
    /// without a new record (run it alongside `send`); without it, stop at the ends.
    #[arg(long)]
    pub follow: bool,

    /// With --follow: stop after this long without a new record.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Upper bound on the whole run.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Extra librdkafka consumer property NAME=VALUE (repeatable).
    #[arg(long = "kafka-prop", value_name = "NAME=VALUE", value_parser = parse_prop)]
    pub kafka_props: Vec<(String, String)>,

    /// Lines each station sent (send --lines-per-conn): seqs 0..N are expected per zipcode,
    /// and missing ones count even past the highest seq seen.
    #[arg(long, value_name = "N")]
    pub lines_per_conn: Option<u64>,

    /// Also write the JSON summary to this file.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,

    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet_progress: bool,
}

/// `produce` flags. The Kafka flags mean what the server's `--kafka-*` flags mean, with the
/// same defaults (`--kafka-compression` and so on are accepted as aliases).
#[derive(Debug, Clone, Args)]
pub struct ProduceArgs {
    /// Kafka bootstrap servers.
    #[arg(long, alias = "kafka-brokers")]
    pub brokers: String,

    /// Topic to publish to.
    #[arg(long, alias = "kafka-topic", default_value = DEFAULT_TOPIC)]
    pub topic: String,

    /// Records to publish.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,

    /// Distinct zipcode keys (and prebuilt records), published round-robin.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,

    /// Zipcode of the first key.
    #[arg(long, value_name = "Z", default_value_t = 10_000)]
    pub zip_base: u64,

    /// Create the topic with this many partitions first (an existing topic is kept as is).
    #[arg(long, value_name = "PARTITIONS")]
    pub create_topic: Option<i32>,

    /// Compression codec (compression.codec).
    #[arg(long, alias = "kafka-compression", default_value_t = DEFAULT_COMPRESSION)]
    pub compression: Compression,

    /// Records per batch (batch.num.messages).
    #[arg(long, alias = "kafka-batch-size", default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: u32,

    /// How long a batch may wait to fill (linger.ms).
    #[arg(long, alias = "kafka-batch-timeout", default_value = "5ms", value_parser = parse_duration)]
    pub batch_timeout: Duration,

    /// Acknowledgements per record: 0, 1, or -1/all.
    #[arg(long, alias = "kafka-required-acks", default_value_t = DEFAULT_ACKS, allow_hyphen_values = true)]
    pub required_acks: Acks,

    /// Idempotent producer (enable.idempotence).
    #[arg(long, alias = "kafka-idempotence", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub idempotence: bool,

    /// Delivery attempts per record (retries + 1); 0 = retry until the delivery timeout.
    #[arg(long, alias = "kafka-max-attempts", default_value_t = 0)]
    pub max_attempts: u32,

    /// How long librdkafka keeps trying to deliver a record (message.timeout.ms).
    #[arg(long, alias = "kafka-delivery-timeout", default_value = "300s", value_parser = parse_duration)]
    pub delivery_timeout: Duration,

    /// Extra librdkafka property NAME=VALUE (repeatable); wins over the flags above.
    #[arg(long = "kafka-prop", value_name = "NAME=VALUE", value_parser = parse_prop)]
    pub kafka_props: Vec<(String, String)>,

    /// Also write the JSON summary to this file.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
}

impl ProduceArgs {
    /// The producer settings: the server's, built from the same type.
    pub fn kafka_settings(&self) -> KafkaSettings {
        KafkaSettings {
            topic: self.topic.clone(),
            batch_size: self.batch_size,
            batch_timeout: self.batch_timeout,
            compression: self.compression,
            acks: self.required_acks,
            max_attempts: self.max_attempts,
            idempotence: self.idempotence,
            delivery_timeout: self.delivery_timeout,
            properties: self.kafka_props.clone(),
            ..KafkaSettings::new(self.brokers.clone())
        }
    }
}

/// `pki` flags.
#[derive(Debug, Clone, Args)]
pub struct PkiArgs {
    /// Directory to write the files to (created if missing; files in it are replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// A name the server certificate is valid for: a DNS name or an IP address
    /// (repeatable).
    #[arg(
        long = "server-name",
        value_name = "NAME",
        default_values = ["localhost", "127.0.0.1"]
    )]
    pub server_names: Vec<String>,

    /// Also write the JSON summary to this file.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
}

// The defaults above are the server's constants; this keeps the one written as text honest.
const _: () = assert!(DEFAULT_BATCH_TIMEOUT.as_millis() == 5);
const _: () = assert!(DEFAULT_DELIVERY_TIMEOUT.as_secs() == 300);

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 5ms, 10s, 2m)"))
}

fn parse_prop(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    if k.trim().is_empty() {
        return Err("empty property name".into());
    }
    Ok((k.trim().to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("stormgate-loadgen").chain(args.iter().copied()))
            .unwrap()
    }

    fn send(args: &[&str]) -> SendArgs {
        match parse(&[&["send"], args].concat()).command {
            Command::Send(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn send_defaults_and_validation() {
        let a = send(&["--duration=10s"]);
        assert_eq!(a.target.to_string(), "127.0.0.1:8080");
        assert_eq!(
            (a.connections, a.sources, a.threads, a.processes),
            (100, 4, 1, 0)
        );
        assert_eq!(a.zip_base, 10_000);
        assert_eq!(a.drain_timeout, Duration::from_secs(2));
        assert!(a.validate().is_ok());
        assert!(send(&[]).validate().is_err());
        assert!(send(&["--idle"]).validate().is_err());
        assert!(send(&["--idle", "--duration=1s"]).validate().is_ok());
        assert!(
            send(&["--idle", "--duration=1s", "--lines-per-conn=1"])
                .validate()
                .is_ok()
        );
        assert!(
            send(&["--idle", "--duration=1s", "--rate=5"])
                .validate()
                .is_err()
        );
        assert!(
            send(&["--lines-per-conn=5", "--threads=0"])
                .validate()
                .is_err()
        );
        assert!(
            send(&["--lines-per-conn=5", "--rate=-1"])
                .validate()
                .is_err()
        );
    }

    #[test]
    fn child_args_round_trip_with_a_new_share() {
        let a = send(&[
            "--target=127.0.0.1:9",
            "--connections=20",
            "--duration=1m 30s",
            "--lines-per-conn=7",
            "--seq",
            "--timestamps",
            "--rate=2.5",
            "--threads=2",
            "--zip-base=500",
            "--summary=/tmp/x",
            "--tls-ca=/pki/ca.pem",
            "--tls-server-name=127.0.0.1",
            "--tls-cert=/pki/client.crt",
            "--tls-key=/pki/client.key",
        ]);
        let child = a.child_args(6, 14);
        assert_eq!(child[0], "send");
        let c = send(&child[1..].iter().map(String::as_str).collect::<Vec<_>>());
        assert!(c.child && !a.child);
        assert_eq!(c.connections, 6);
        assert_eq!(c.zip_base, 514);
        assert_eq!(c.processes, 1);
        assert_eq!(c.summary, None);
        assert_eq!(c.duration, Some(Duration::from_secs(90)));
        assert_eq!(
            (c.lines_per_conn, c.seq, c.timestamps, c.idle),
            (Some(7), true, true, false)
        );
        assert_eq!((c.rate, c.threads, c.target), (2.5, 2, a.target));
        assert_eq!(
            (&c.tls_ca, &c.tls_server_name, &c.tls_cert, &c.tls_key),
            (&a.tls_ca, &a.tls_server_name, &a.tls_cert, &a.tls_key)
        );
        assert_eq!(c.tls_key.as_deref(), Some(Path::new("/pki/client.key")));
        let plain = send(&["--lines-per-conn=1"]).child_args(1, 0);
        assert!(!plain.iter().any(|a| a.starts_with("--tls")), "{plain:?}");
    }

    #[test]
    fn produce_settings_match_the_servers_defaults() {
        let Command::Produce(p) = parse(&["produce", "--brokers=b:1"]).command else {
            unreachable!()
        };
        assert_eq!(p.kafka_settings(), {
            let mut s = KafkaSettings::new("b:1");
            s.topic = DEFAULT_TOPIC.into();
            s
        });
        let Command::Produce(p) = parse(&[
            "produce",
            "--brokers=b:1",
            "--kafka-compression=zstd",
            "--required-acks=-1",
            "--idempotence=false",
            "--batch-timeout=100ms",
            "--kafka-prop=linger.ms=0",
        ])
        .command
        else {
            unreachable!()
        };
        let s = p.kafka_settings();
        assert_eq!(s.compression, Compression::Zstd);
        assert_eq!(s.acks, Acks::All);
        assert!(!s.idempotence);
        assert_eq!(s.batch_timeout, Duration::from_millis(100));
        assert_eq!(s.properties, [("linger.ms".to_owned(), "0".to_owned())]);
    }
}
