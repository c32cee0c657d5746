//! Command line and environment.
//!
//! Every setting is a flag and an environment variable with the same meaning; a flag wins
//! over the variable, the variable over the default. `stormgate --help` lists each with its
//! default. Extra librdkafka properties come from `KAFKA_PROP_<NAME>` variables (`_` becomes
//! `.`, lowercased: `KAFKA_PROP_SOCKET_KEEPALIVE_ENABLE=true`) and repeatable
//! `--kafka-prop name=value` flags, flags last.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use stormgate_kafka::config::IdempotenceChoice;
use stormgate_kafka::{Acks, Compression, KafkaSettings};
use stormgate_shard::RuntimeConfig;
use stormgate_shard::config as rt;

use crate::logging::LogFormat;
use crate::tls::{TlsFiles, TlsVersion};

/// Prefix of environment variables passed through to librdkafka.
pub const KAFKA_PROP_ENV_PREFIX: &str = "KAFKA_PROP_";

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SinkKind {
    /// Kafka: KAFKA_BROKERS, or the embedded mock cluster when unset.
    Kafka,
    /// Nowhere: records are settled as delivered when taken (measures parsing and networking).
    Null,
}

/// Where accepted records wait for the sink (`BUFFER_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BufferType {
    /// In memory only: a crash loses what was accepted and not delivered.
    Memory,
    /// A write-ahead log per shard in BUFFER_DIR: outages absorbed on disk, a crash loses
    /// nothing durable.
    Disk,
}

/// What a shard does when its share of `BUFFER_MAX_BYTES` is full (`BUFFER_WHEN_FULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WhenFull {
    /// Stop reading the stations until deliveries free room.
    Block,
    /// Refuse new lines (counted as failed; acknowledging stations get a buffer_full nack).
    #[value(name = "drop_newest")]
    DropNewest,
}

/// When an acknowledging station's line is answered with a disk buffer (`TCP_ACK_AFTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckAfter {
    /// Once durable in the disk buffer (its fdatasync completed).
    Durable,
    /// Once Kafka acknowledged it.
    Delivered,
}

/// How stations prove which zipcode they may publish for (`STATION_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StationAuthMode {
    /// No proof: any client that reaches the port may identify as any zipcode.
    None,
    /// Each identify must carry its zipcode's token from the station registry, or (under
    /// mutual TLS) come over a connection whose client certificate names the zipcode.
    Token,
    /// Only a client certificate naming the zipcode proves it (needs TLS_CLIENT_CA).
    Certificate,
}

/// Stormgate: accepts station connections on every core and publishes each metrics line to
/// Kafka.
#[derive(Debug, Clone, Parser)]
#[command(name = "stormgate", version, about, max_term_width = 100)]
pub struct Cli {
    /// Address stations connect to; every shard listens on it (SO_REUSEPORT).
    #[arg(long, env = "TCP_LISTEN", default_value = rt::DEFAULT_LISTEN, help_heading = "Stations")]
    pub listen: SocketAddr,

    /// Shards (pinned executors); 0 = one per core in the process's affinity mask.
    #[arg(
        long,
        env = "TCP_SHARDS",
        default_value_t = 0,
        help_heading = "Stations"
    )]
    pub shards: usize,

    /// Listen backlog of each shard's socket (capped by net.core.somaxconn).
    #[arg(long, env = "TCP_BACKLOG", default_value_t = rt::DEFAULT_BACKLOG, help_heading = "Stations")]
    pub backlog: u32,

    /// Most connections open at once, all shards together; 0 = open-files limit minus 256.
    #[arg(
        long,
        env = "TCP_MAX_CONNECTIONS",
        default_value_t = 0,
        help_heading = "Stations"
    )]
    pub max_connections: usize,

    /// Most connections open at once on each shard; 0 = no per-shard limit. Excess
    /// connections get too_many_connections and are closed.
    #[arg(
        long,
        env = "TCP_MAX_CONNECTIONS_PER_SHARD",
        default_value_t = 0,
        help_heading = "Stations"
    )]
    pub max_connections_per_shard: usize,

    /// Most connections open at once from one source IP address; 0 = no limit. Excess
    /// connections get too_many_connections and are closed.
    #[arg(
        long,
        env = "TCP_MAX_CONNECTIONS_PER_IP",
        default_value_t = 0,
        help_heading = "Stations"
    )]
    pub max_connections_per_ip: u32,

    /// Lines per second one connection may send on average (bursts of one second's worth);
    /// a faster connection is not read until it is back within its budget (nothing is
    /// dropped). 0 = no limit.
    #[arg(long, env = "TCP_MAX_LINES_PER_SEC", default_value_t = rt::DEFAULT_MAX_LINES_PER_SEC, help_heading = "Stations")]
    pub max_lines_per_sec: u32,

    /// Records one connection may have in flight (read, not yet delivered); a connection at
    /// the cap is not read until some are delivered, while others go on. 0 = no cap.
    #[arg(long, env = "TCP_MAX_IN_FLIGHT_PER_CONN", default_value_t = rt::DEFAULT_MAX_IN_FLIGHT_PER_CONN, help_heading = "Stations")]
    pub max_in_flight_per_conn: u32,

    /// Bytes of records one connection may have in flight, beside the count cap: a station
    /// sending large records reaches it first and is not read until some are delivered.
    /// 0 = no byte cap.
    #[arg(long, env = "TCP_MAX_BYTES_IN_FLIGHT_PER_CONN", default_value = "2MiB", value_parser = parse_bytes, help_heading = "Stations")]
    pub max_bytes_in_flight_per_conn: u64,

    /// Bytes of records each shard may hold in flight (queued, in the producer, awaiting
    /// delivery), all its connections together; at the budget the shard reads no connection
    /// until deliveries free a quarter of it. Bounds record memory whatever stations send.
    /// 0 = no budget.
    #[arg(long, env = "TCP_MAX_BYTES_IN_FLIGHT", default_value = "64MiB", value_parser = parse_bytes, help_heading = "Stations")]
    pub max_bytes_in_flight: u64,

    /// With BUFFER_TYPE=disk, when an acknowledging station's line is answered: `durable`
    /// (once the fdatasync covering it completed) or `delivered` (once Kafka acknowledged
    /// it). Without a disk buffer lines are always answered once delivered.
    #[arg(long, env = "TCP_ACK_AFTER", value_enum, default_value_t = AckAfter::Durable, help_heading = "Stations")]
    pub ack_after: AckAfter,

    /// Acknowledge lines that carry a seq, for connections whose identify does not say
    /// ("acks": true/false); see docs/PROTOCOL.md.
    #[arg(long, env = "TCP_ACKS", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set, help_heading = "Stations")]
    pub acks: bool,

    /// Records each shard may queue between its connections and its producer; when full,
    /// connections stop reading (TCP backpressure).
    #[arg(long, env = "TCP_JOB_QUEUE_SIZE", default_value_t = rt::DEFAULT_QUEUE_SIZE, help_heading = "Stations")]
    pub queue_size: usize,

    /// Longest accepted line in bytes; longer lines are answered with line_too_long and skipped.
    #[arg(long, env = "TCP_MAX_LINE_BYTES", default_value_t = rt::DEFAULT_MAX_LINE_BYTES, help_heading = "Stations")]
    pub max_line_bytes: usize,

    /// Kernel receive buffer of each station socket in bytes (0 = kernel autotuning); bounds
    /// what can wait in the kernel behind a busy shard. Lowered at start, and logged, so that
    /// the connection limit's full queues fit under net.ipv4.tcp_mem's pressure threshold.
    #[arg(long, env = "TCP_RECV_BUFFER", default_value_t = rt::DEFAULT_RECV_BUFFER, help_heading = "Stations")]
    pub recv_buffer: usize,

    /// Bad lines in a row after which a connection gets too_many_errors and is closed (0 = never).
    #[arg(long, env = "TCP_MAX_ERRORS_PER_CONN", default_value_t = rt::DEFAULT_MAX_ERRORS_PER_CONN, help_heading = "Stations")]
    pub max_errors_per_conn: u32,

    /// Time without a complete line after which a connection gets idle_timeout and is closed;
    /// blank lines and bytes of a partial line do not count (0s = never).
    #[arg(long, env = "TCP_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration, help_heading = "Stations")]
    pub idle_timeout: Duration,

    /// Longest time from a line's first byte to its newline before line_timeout closes the
    /// connection (0s = unbounded).
    #[arg(long, env = "TCP_LINE_TIMEOUT", default_value = "30s", value_parser = parse_duration, help_heading = "Stations")]
    pub line_timeout: Duration,

    /// Time allowed on SIGTERM/SIGINT to deliver what was already read.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration, help_heading = "Stations")]
    pub shutdown_timeout: Duration,

    /// On SIGTERM/SIGINT, tell each station {"type":"reconnect"} and end its connection at a
    /// random moment within this period, so that stations reconnect to the other instances on
    /// the address spread over it (0s = all at once). Shorter than SHUTDOWN_TIMEOUT.
    #[arg(long, env = "TCP_DRAIN_PERIOD", default_value = "0s", value_parser = parse_duration, help_heading = "Stations")]
    pub drain_period: Duration,

    /// How stations prove which zipcode they may publish for: `none` (any station may identify
    /// as any zipcode), `token` (identify must carry the zipcode's token from
    /// STATION_REGISTRY, or come with a client certificate whose subject is CN=<zipcode>) or
    /// `certificate` (only such a certificate; needs TLS_CLIENT_CA). See docs/SECURITY.md. The
    /// default is `none` because stations that predate authentication send no token and a
    /// registry must be provisioned first; use `token` or `certificate` for stations on the
    /// public internet.
    #[arg(long, env = "STATION_AUTH", value_enum, default_value_t = StationAuthMode::None, help_heading = "Security")]
    pub station_auth: StationAuthMode,

    /// The station registry: one line per zipcode with a salted SHA-256 hash of its token,
    /// never the token. Read at start (token mode fails to start without it) and reloaded
    /// within ~2 s of a change; `stormgate station add|remove|list` edit it.
    #[arg(
        long,
        env = "STATION_REGISTRY",
        value_name = "FILE",
        help_heading = "Security"
    )]
    pub station_registry: Option<std::path::PathBuf>,

    /// Refused identifies (auth_failed) after which a connection gets too_many_errors and is
    /// closed; 0 = never.
    #[arg(long, env = "STATION_AUTH_MAX_FAILURES", default_value_t = rt::DEFAULT_STATION_AUTH_MAX_FAILURES, help_heading = "Security")]
    pub station_auth_max_failures: u32,

    /// PEM certificate chain of the station listener; with TLS_KEY, stations must speak TLS
    /// (1.2 or 1.3). Reloaded with the key within ~2 s of a change, or on SIGHUP: new
    /// connections get the new certificate, open ones are kept.
    #[arg(
        long,
        env = "TLS_CERT",
        value_name = "FILE",
        requires = "tls_key",
        help_heading = "Security"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of TLS_CERT (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert",
        help_heading = "Security"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM bundle of the CAs station certificates must chain to: mutual TLS, a station without
    /// such a certificate fails its handshake. Needs TLS_CERT.
    #[arg(
        long,
        env = "TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert",
        help_heading = "Security"
    )]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Oldest TLS version stations may use.
    #[arg(long, env = "TLS_MIN_VERSION", value_enum, default_value_t = TlsVersion::V1_2, help_heading = "Security")]
    pub tls_min_version: TlsVersion,

    /// Longest a TLS handshake may take, from accept to its end, before the connection is
    /// closed.
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration, help_heading = "Security")]
    pub tls_handshake_timeout: Duration,

    /// Where records go.
    #[arg(long, env = "SINK", value_enum, default_value_t = SinkKind::Kafka, help_heading = "Kafka")]
    pub sink: SinkKind,

    /// Kafka bootstrap servers; unset = start an embedded in-process mock cluster.
    #[arg(long, env = "KAFKA_BROKERS", help_heading = "Kafka")]
    pub kafka_brokers: Option<String>,

    /// Topic every record goes to.
    #[arg(long, env = "KAFKA_TOPIC", default_value = stormgate_kafka::config::DEFAULT_TOPIC, help_heading = "Kafka")]
    pub kafka_topic: String,

    /// Dead-letter topic: every rejected line is also published here, with its error code and
    /// connection id (unset = off).
    #[arg(
        long,
        env = "KAFKA_DLQ_TOPIC",
        value_name = "TOPIC",
        help_heading = "Kafka"
    )]
    pub kafka_dlq_topic: Option<String>,

    /// Records per batch (batch.num.messages).
    #[arg(long, env = "KAFKA_BATCH_SIZE", default_value_t = stormgate_kafka::config::DEFAULT_BATCH_SIZE, help_heading = "Kafka")]
    pub kafka_batch_size: u32,

    /// How long a batch may wait to fill (linger.ms), e.g. 5ms, 100ms.
    #[arg(long, env = "KAFKA_BATCH_TIMEOUT", default_value = "5ms", value_parser = parse_duration, help_heading = "Kafka")]
    pub kafka_batch_timeout: Duration,

    /// Compression codec.
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "lz4", value_parser = parse_compression, help_heading = "Kafka")]
    pub kafka_compression: Compression,

    /// false = every line waits for its delivery report before its connection reads on (the
    /// old server's behaviour, for comparison).
    #[arg(long, env = "KAFKA_ASYNC", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set, help_heading = "Kafka")]
    pub kafka_async: bool,

    /// Delivery attempts per record (retries + 1); 0 = retry until the delivery timeout.
    #[arg(
        long,
        env = "KAFKA_MAX_ATTEMPTS",
        default_value_t = 0,
        help_heading = "Kafka"
    )]
    pub kafka_max_attempts: u32,

    /// Acknowledgements per record: 0, 1, or -1/all.
    #[arg(long, env = "KAFKA_REQUIRED_ACKS", default_value = "all", value_parser = parse_acks, allow_hyphen_values = true, help_heading = "Kafka")]
    pub kafka_required_acks: Acks,

    /// Idempotent producer (enable.idempotence): retries cannot duplicate or reorder. Needs
    /// KAFKA_REQUIRED_ACKS=all: when acks is set to 0 or 1 and this is not set, it is off (with
    /// a warning); set to true with acks 0 or 1, the server refuses to start.
    #[arg(long, env = "KAFKA_IDEMPOTENCE", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set, help_heading = "Kafka")]
    pub kafka_idempotence: bool,

    /// How long librdkafka keeps trying to deliver a record (message.timeout.ms).
    #[arg(long, env = "KAFKA_DELIVERY_TIMEOUT", default_value = "300s", value_parser = parse_duration, help_heading = "Kafka")]
    pub kafka_delivery_timeout: Duration,

    /// Records each shard's producer may hold (queue.buffering.max.messages); when full,
    /// connections stop reading.
    #[arg(long, env = "KAFKA_QUEUE_MAX_RECORDS", default_value_t = stormgate_kafka::config::DEFAULT_QUEUE_MAX_RECORDS, help_heading = "Kafka")]
    pub kafka_queue_max_records: u32,

    /// Bytes each shard's producer may hold (queue.buffering.max.kbytes), e.g. 64MiB.
    #[arg(long, env = "KAFKA_QUEUE_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes, help_heading = "Kafka")]
    pub kafka_queue_max_bytes: u64,

    /// Extra librdkafka property NAME=VALUE (repeatable); also `KAFKA_PROP_<NAME>` variables.
    #[arg(long = "kafka-prop", value_name = "NAME=VALUE", value_parser = parse_prop, help_heading = "Kafka")]
    pub kafka_props: Vec<(String, String)>,

    /// Directory of the spill files, where records that finally fail delivery are written
    /// (one file per shard, created on the first failure); `stormgate replay` sends them again.
    #[arg(long, env = "SPILL_DIR", value_name = "DIR", default_value = stormgate_kafka::sink::DEFAULT_SPILL_DIR, help_heading = "Kafka")]
    pub spill_dir: std::path::PathBuf,

    /// Where accepted records wait for Kafka: `memory` (a crash loses what was not delivered)
    /// or `disk` (a write-ahead log per shard in BUFFER_DIR; Kafka outages are absorbed on
    /// disk and a crash loses nothing durable). See docs/RELIABILITY.md.
    #[arg(long, env = "BUFFER_TYPE", value_enum, default_value_t = BufferType::Memory, help_heading = "Disk buffer")]
    pub buffer_type: BufferType,

    /// Directory of the disk buffer: one subdirectory per shard (shard-0, shard-1, ...).
    /// Directories of shards that no longer exist are drained by the remaining ones.
    #[arg(
        long,
        env = "BUFFER_DIR",
        value_name = "DIR",
        default_value = "buffer",
        help_heading = "Disk buffer"
    )]
    pub buffer_dir: std::path::PathBuf,

    /// Hard bound on the disk buffer's files, all shards together (split evenly; segments
    /// count at their preallocated size). The server refuses to start when the file system
    /// cannot hold it.
    #[arg(long, env = "BUFFER_MAX_BYTES", default_value = "1GiB", value_parser = parse_bytes, help_heading = "Disk buffer")]
    pub buffer_max_bytes: u64,

    /// What a shard does when its share of BUFFER_MAX_BYTES is full: `block` (stop reading
    /// stations until deliveries free room) or `drop_newest` (refuse new lines, counted;
    /// acknowledging stations get a buffer_full nack).
    #[arg(long, env = "BUFFER_WHEN_FULL", value_enum, default_value_t = WhenFull::Block, help_heading = "Disk buffer")]
    pub buffer_when_full: WhenFull,

    /// Group-commit window of the disk buffer: how long an accepted line may wait for the
    /// fdatasync that makes it durable (and, with TCP_ACK_AFTER=durable, for its ack).
    #[arg(long, env = "BUFFER_SYNC_INTERVAL", default_value = "2ms", value_parser = parse_duration, help_heading = "Disk buffer")]
    pub buffer_sync_interval: Duration,

    /// Write the final per-shard statistics (counters, delivery latency) to this file as JSON
    /// at exit; used by the benchmark harness.
    #[arg(long, env = "STATS_FILE", value_name = "PATH")]
    pub stats_file: Option<std::path::PathBuf>,

    /// Address of the HTTP endpoint for /metrics (Prometheus), /healthz and /readyz; `off`
    /// disables it.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9090", value_parser = parse_metrics_addr, help_heading = "Operations")]
    pub metrics_addr: MetricsAddr,

    /// How often a statistics block is logged (connections, unique zipcodes, rates, queue
    /// depth per shard); 0s = never.
    #[arg(long, env = "STATS_INTERVAL", default_value = "30s", value_parser = parse_duration, help_heading = "Operations")]
    pub stats_interval: Duration,

    /// Log format on stderr; filter with RUST_LOG (default info).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// TOML config file; its values rank below flags and environment variables (see
    /// docs/CONFIGURATION.md).
    #[arg(
        long,
        env = "STORMGATE_CONFIG",
        value_name = "FILE",
        help_heading = "Operations"
    )]
    pub config: Option<std::path::PathBuf>,

    /// librdkafka properties from the config file's `[kafka.properties]` (set by
    /// [`crate::settings::load`]).
    #[arg(skip)]
    pub file_props: Vec<(String, String)>,

    /// Whether `KAFKA_IDEMPOTENCE` was set (flag, variable or file) rather than defaulted:
    /// without it, `KAFKA_REQUIRED_ACKS` 0 or 1 turns idempotence off (set by
    /// [`crate::settings::load`]; false when a `Cli` is parsed directly).
    #[arg(skip)]
    pub kafka_idempotence_set: bool,

    /// Without a command: run the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `stormgate` does besides serving stations.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Publish the records of a spill file again (with the Kafka settings above: flags before
    /// the command, or the environment), then remove what was delivered from the file. Exits
    /// non-zero if some records stay in the file.
    Replay {
        /// The spill file, e.g. spill/shard-0.jsonl.
        file: std::path::PathBuf,
        /// Publish to this topic instead of each record's own.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Print every setting's effective value and where it came from (flag, env, file,
    /// default); exit non-zero if the configuration is invalid.
    CheckConfig,
    /// Print docs/CONFIGURATION.md, generated from the settings.
    #[command(hide = true)]
    ConfigDoc,
    /// Manage the station registry named by --station-registry (or STATION_REGISTRY), before
    /// the command. A running server picks changes up within ~2 s.
    Station {
        /// What to do.
        #[command(subcommand)]
        command: StationCommand,
    },
    /// Look into a disk buffer offline: BUFFER_DIR (every shard's directory in it) or one
    /// shard's directory. Reads every record; changes nothing.
    Buffer {
        /// What to do.
        #[command(subcommand)]
        command: BufferCommand,
    },
}

/// `stormgate buffer …`: offline tools for the disk buffer.
#[derive(Debug, Clone, Subcommand)]
pub enum BufferCommand {
    /// Per shard: segments, records, bytes on disk, the checkpointed delivered watermark and
    /// the oldest undelivered record's age.
    Inspect {
        /// BUFFER_DIR, or one shard's directory in it.
        dir: std::path::PathBuf,
    },
    /// Check the CRC and sequence number of every record; exit non-zero if anything is
    /// damaged (what the server would skip or quarantine at its next start).
    Verify {
        /// BUFFER_DIR, or one shard's directory in it.
        dir: std::path::PathBuf,
    },
}

/// `stormgate station …`: edit or show the station registry.
#[derive(Debug, Clone, Subcommand)]
pub enum StationCommand {
    /// Register ZIPCODE with a new random 256-bit token. The token is printed once, on
    /// stdout; only a salted hash of it is stored.
    Add {
        /// The zipcode, exactly as the station sends it in identify.
        zipcode: String,
    },
    /// Remove ZIPCODE: its token is refused at the next identify (open connections keep
    /// their station until they identify again).
    Remove {
        /// The zipcode to remove.
        zipcode: String,
    },
    /// Print every registered zipcode and when it was added; never tokens or hashes.
    List,
}

impl Cli {
    /// The shard runtime's settings.
    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            listen: self.listen,
            shards: self.shards,
            backlog: self.backlog,
            max_connections: self.max_connections,
            max_connections_per_shard: self.max_connections_per_shard,
            max_connections_per_ip: self.max_connections_per_ip,
            max_lines_per_sec: self.max_lines_per_sec,
            queue_size: self.queue_size,
            max_line_bytes: self.max_line_bytes,
            max_in_flight_per_conn: if self.kafka_async {
                self.max_in_flight_per_conn
            } else {
                1
            },
            max_bytes_in_flight_per_conn: usize::try_from(self.max_bytes_in_flight_per_conn)
                .unwrap_or(usize::MAX),
            max_bytes_in_flight: usize::try_from(self.max_bytes_in_flight).unwrap_or(usize::MAX),
            acks: self.acks,
            shutdown_timeout: self.shutdown_timeout,
            drain_period: self.drain_period,
            recv_buffer: self.recv_buffer,
            max_errors_per_conn: self.max_errors_per_conn,
            idle_timeout: Some(self.idle_timeout).filter(|d| !d.is_zero()),
            line_timeout: Some(self.line_timeout).filter(|d| !d.is_zero()),
            dead_letters: self.sink == SinkKind::Kafka && self.dlq_topic().is_some(),
            station_auth_max_failures: self.station_auth_max_failures,
            tls_handshake_timeout: self.tls_handshake_timeout,
            disk_buffer: self.disk_buffer(),
            // The registry and the TLS files are loaded by `app::start`, which sets
            // `station_auth` and `tls`.
            ..RuntimeConfig::default()
        }
    }

    /// The disk buffer's settings, with BUFFER_TYPE=disk.
    pub fn disk_buffer(&self) -> Option<rt::DiskBuffer> {
        (self.buffer_type == BufferType::Disk).then(|| rt::DiskBuffer {
            dir: self.buffer_dir.clone(),
            max_bytes: self.buffer_max_bytes,
            when_full: match self.buffer_when_full {
                WhenFull::Block => rt::WhenFull::Block,
                WhenFull::DropNewest => rt::WhenFull::DropNewest,
            },
            sync_interval: self.buffer_sync_interval,
            ack_after: match self.ack_after {
                AckAfter::Durable => rt::AckAfter::Durable,
                AckAfter::Delivered => rt::AckAfter::Delivered,
            },
        })
    }

    /// The station registry's path, or why there is none.
    pub fn registry_path(&self) -> anyhow::Result<&std::path::Path> {
        self.station_registry
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .context(
                "no station registry: set STATION_REGISTRY (or --station-registry FILE); \
                 `stormgate --station-registry FILE station add ZIPCODE` creates one",
            )
    }

    /// The station listener's TLS files, when TLS is on (`TLS_CERT` and `TLS_KEY` both set).
    pub fn tls_files(&self) -> Option<TlsFiles> {
        let set = |p: &Option<std::path::PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        Some(TlsFiles {
            cert: set(&self.tls_cert)?,
            key: set(&self.tls_key)?,
            client_ca: set(&self.tls_client_ca),
            min_version: self.tls_min_version,
        })
    }

    /// The dead-letter topic, if one is set (an empty value means none).
    pub fn dlq_topic(&self) -> Option<&str> {
        self.kafka_dlq_topic
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// Checks what clap cannot: values that parse but make no sense, and librdkafka's view of
    /// the producer properties.
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("TCP_JOB_QUEUE_SIZE", self.queue_size as u64),
            ("TCP_MAX_LINE_BYTES", self.max_line_bytes as u64),
            ("KAFKA_BATCH_SIZE", u64::from(self.kafka_batch_size)),
            (
                "KAFKA_QUEUE_MAX_RECORDS",
                u64::from(self.kafka_queue_max_records),
            ),
            ("KAFKA_QUEUE_MAX_BYTES", self.kafka_queue_max_bytes),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if !self.drain_period.is_zero() && self.drain_period >= self.shutdown_timeout {
            bail!(
                "TCP_DRAIN_PERIOD ({}) must be shorter than SHUTDOWN_TIMEOUT ({}): the \
                 connections are ended over the drain period, and what they read is delivered \
                 before the deadline",
                humantime::format_duration(self.drain_period),
                humantime::format_duration(self.shutdown_timeout)
            );
        }
        if self.station_auth == StationAuthMode::Token {
            let path = self.registry_path().context("STATION_AUTH=token")?;
            crate::registry::Registry::load(path)
                .with_context(|| "STATION_AUTH=token needs a readable station registry")?;
        }
        let tls = self.tls_files();
        if self.station_auth == StationAuthMode::Certificate
            && tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        {
            bail!(
                "STATION_AUTH=certificate needs mutual TLS: set TLS_CERT, TLS_KEY and \
                 TLS_CLIENT_CA"
            );
        }
        if let Some(tls) = &tls {
            tls.load().context("TLS_CERT/TLS_KEY/TLS_CLIENT_CA")?;
        }
        if self.sink == SinkKind::Kafka {
            let brokers = self.kafka_brokers.as_deref().unwrap_or("localhost:9092");
            let settings = self.kafka_settings(brokers)?;
            stormgate_kafka::check_settings(&settings)
                .map_err(|e| anyhow::anyhow!("Kafka producer settings: {e}"))?;
        }
        Ok(())
    }

    /// librdkafka pass-through properties in the order they apply (later wins): the config
    /// file's, then `KAFKA_PROP_*` variables, then `--kafka-prop` flags.
    pub fn all_kafka_props(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut props = self.file_props.clone();
        props.extend(env_props(std::env::vars())?);
        props.extend(self.kafka_props.iter().cloned());
        Ok(props)
    }

    /// Whether the producers are idempotent: `KAFKA_IDEMPOTENCE` as set, or off when only
    /// `KAFKA_REQUIRED_ACKS` says 0 or 1 (see [`stormgate_kafka::config::idempotence_for`]).
    pub fn idempotence_choice(&self) -> anyhow::Result<IdempotenceChoice> {
        let set = self.kafka_idempotence_set.then_some(self.kafka_idempotence);
        Ok(stormgate_kafka::config::idempotence_for(
            self.kafka_required_acks,
            set,
        )?)
    }

    /// The Kafka producers' settings, given the brokers to use.
    pub fn kafka_settings(&self, brokers: &str) -> anyhow::Result<KafkaSettings> {
        let props = self.all_kafka_props()?;
        Ok(KafkaSettings {
            topic: self.kafka_topic.clone(),
            dlq_topic: self.dlq_topic().map(str::to_owned),
            batch_size: self.kafka_batch_size,
            batch_timeout: self.kafka_batch_timeout,
            compression: self.kafka_compression,
            acks: self.kafka_required_acks,
            max_attempts: self.kafka_max_attempts,
            idempotence: self.idempotence_choice()?.enabled(),
            delivery_timeout: self.kafka_delivery_timeout,
            queue_max_records: self.kafka_queue_max_records,
            queue_max_bytes: self.kafka_queue_max_bytes,
            properties: props,
            ..KafkaSettings::new(brokers)
        })
    }
}

/// librdkafka properties from `KAFKA_PROP_<NAME>` variables, sorted by name.
pub fn env_props(
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut props: Vec<(String, String)> = vars
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(KAFKA_PROP_ENV_PREFIX)?;
            Some((name.to_ascii_lowercase().replace('_', "."), v))
        })
        .collect();
    if let Some((k, _)) = props.iter().find(|(k, _)| k.is_empty()) {
        bail!("empty property name in {KAFKA_PROP_ENV_PREFIX}{k}");
    }
    props.sort();
    Ok(props)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 5ms, 100ms, 30s)"))
}

/// Where the metrics endpoint listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    match s.trim() {
        "off" | "" => Ok(MetricsAddr(None)),
        a => a
            .parse()
            .map(|a| MetricsAddr(Some(a)))
            .map_err(|e| format!("{e} (expected IP:PORT, e.g. 127.0.0.1:9090, or off)")),
    }
}

/// A byte size: a number with an optional KiB/MiB/GiB (or K/M/G, or B) suffix.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 65536, 512KiB, 64MiB, 1GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse()
        .map_err(|e: stormgate_kafka::ParseSettingError| e.to_string())
}

fn parse_acks(s: &str) -> Result<Acks, String> {
    s.parse()
        .map_err(|e: stormgate_kafka::ParseSettingError| e.to_string())
}

fn parse_prop(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s.split_once('=').context("expected NAME=VALUE")?;
    if k.trim().is_empty() {
        bail!("empty property name");
    }
    Ok((k.trim().to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("stormgate").chain(args.iter().copied())).unwrap()
    }

    /// The runtime's own defaults are the server's: a shard test built on
    /// `RuntimeConfig::default()` runs with the caps production runs with. Compared whole
    /// (through `Debug`), so a field whose default drifts on either side fails here.
    #[test]
    fn the_runtime_defaults_are_the_command_line_defaults() {
        let from_cli = parse(&[]).runtime_config();
        assert_eq!(
            format!("{from_cli:?}"),
            format!("{:?}", RuntimeConfig::default())
        );
    }

    #[test]
    fn defaults() {
        let cli = parse(&[]);
        let rt = cli.runtime_config();
        assert_eq!(rt.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(rt.shards, 0);
        assert_eq!(rt.backlog, 4096);
        assert_eq!(rt.max_in_flight_per_conn, 4096);
        assert_eq!(
            rt.max_bytes_in_flight_per_conn,
            rt::DEFAULT_MAX_BYTES_IN_FLIGHT_PER_CONN
        );
        assert_eq!(rt.max_bytes_in_flight, rt::DEFAULT_MAX_BYTES_IN_FLIGHT);
        assert!(!rt.acks);
        assert_eq!(cli.kafka_topic, "weather.metrics");
        assert_eq!(cli.kafka_compression, Compression::Lz4);
        assert_eq!(cli.kafka_required_acks, Acks::All);
        assert!(cli.kafka_brokers.is_none());
    }

    #[test]
    fn station_auth_is_off_by_default_and_token_mode_needs_a_registry() {
        let cli = parse(&["--sink", "null"]);
        assert_eq!(cli.station_auth, StationAuthMode::None);
        assert_eq!(cli.runtime_config().station_auth_max_failures, 3);
        assert!(cli.runtime_config().station_auth.is_none());
        cli.validate().unwrap();
        let cli = parse(&[
            "--sink",
            "null",
            "--station-auth",
            "token",
            "--station-auth-max-failures",
            "5",
        ]);
        assert_eq!(cli.runtime_config().station_auth_max_failures, 5);
        let err = format!("{:#}", cli.validate().unwrap_err());
        assert!(err.contains("STATION_REGISTRY"), "{err}");
        let missing = "/nonexistent/stations.jsonl";
        let cli = parse(&[
            "--sink",
            "null",
            "--station-auth=token",
            "--station-registry",
            missing,
        ]);
        let err = format!("{:#}", cli.validate().unwrap_err());
        assert!(
            err.contains(missing) && err.contains("STATION_AUTH=token"),
            "{err}"
        );
        assert!(Cli::try_parse_from(["stormgate", "--station-auth=password"]).is_err());
    }

    #[test]
    fn flags_map_to_settings() {
        let cli = parse(&[
            "--kafka-batch-size=100",
            "--kafka-batch-timeout=100ms",
            "--kafka-compression=snappy",
            "--kafka-async=false",
            "--kafka-max-attempts=3",
            "--kafka-required-acks=-1",
            "--kafka-prop",
            "socket.keepalive.enable=true",
        ]);
        assert_eq!(cli.runtime_config().max_in_flight_per_conn, 1);
        let k = cli.kafka_settings("b:1").unwrap();
        assert_eq!(k.batch_size, 100);
        assert_eq!(k.batch_timeout, Duration::from_millis(100));
        assert_eq!(k.compression, Compression::Snappy);
        assert_eq!(k.acks, Acks::All);
        assert_eq!(k.max_attempts, 3);
        assert!(
            k.properties
                .contains(&("socket.keepalive.enable".into(), "true".into()))
        );
    }

    #[test]
    fn bad_values_are_rejected_with_the_reason() {
        let err = Cli::try_parse_from(["stormgate", "--kafka-compression=brotli"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("none, gzip, snappy, lz4 or zstd"), "{err}");
        let err = Cli::try_parse_from(["stormgate", "--kafka-batch-timeout=soon"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("5ms"), "{err}");
        assert!(Cli::try_parse_from(["stormgate", "--kafka-prop=novalue"]).is_err());
        for bad in ["lots", "12 parsecs", "99999999999GiB"] {
            let err = Cli::try_parse_from(["stormgate", "--kafka-queue-max-bytes", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains(bad.split(' ').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn sizes_take_binary_units() {
        for (s, v) in [
            ("65536", 65536),
            ("512KiB", 512 << 10),
            ("64MiB", 64 << 20),
            ("64 mib", 64 << 20),
            ("2G", 2 << 30),
            ("7B", 7),
        ] {
            assert_eq!(parse_bytes(s), Ok(v), "{s}");
        }
        let s = parse(&[
            "--kafka-queue-max-bytes",
            "8MiB",
            "--kafka-queue-max-records",
            "5000",
        ])
        .kafka_settings("b:9092")
        .unwrap();
        let props = s.producer_properties();
        let get = |k: &str| props.iter().rev().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("queue.buffering.max.kbytes"), "8192");
        assert_eq!(get("queue.buffering.max.messages"), "5000");
    }

    #[test]
    fn kafka_prop_variables_become_properties() {
        let vars = [
            (
                "KAFKA_PROP_SOCKET_KEEPALIVE_ENABLE".to_owned(),
                "true".to_owned(),
            ),
            (
                "KAFKA_PROP_STATISTICS_INTERVAL_MS".to_owned(),
                "1000".to_owned(),
            ),
            ("KAFKA_TOPIC".to_owned(), "x".to_owned()),
        ];
        let props = env_props(vars.into_iter()).unwrap();
        assert_eq!(
            props,
            [
                ("socket.keepalive.enable".to_owned(), "true".to_owned()),
                ("statistics.interval.ms".to_owned(), "1000".to_owned())
            ]
        );
    }

    #[test]
    fn help_shows_every_default_and_variable() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "[env: TCP_LISTEN=]",
            "[default: 0.0.0.0:8080]",
            "[env: TCP_SHARDS=]",
            "[env: TCP_JOB_QUEUE_SIZE=]",
            "[env: KAFKA_BROKERS=]",
            "[default: weather.metrics]",
            "[default: 5ms]",
            "[default: lz4]",
            "[env: KAFKA_ASYNC=]",
            "[env: KAFKA_REQUIRED_ACKS=]",
        ] {
            assert!(help.contains(needle), "--help lacks {needle}");
        }
    }

    /// README's configuration table is what operators read: every variable and flag the
    /// binary accepts is in it, with the default `--help` shows.
    #[test]
    fn the_disk_buffer_is_off_by_default_and_its_settings_map_through() {
        assert_eq!(parse(&[]).runtime_config().disk_buffer, None);
        let cli = parse(&[
            "--buffer-type",
            "disk",
            "--buffer-dir",
            "/data/buffer",
            "--buffer-max-bytes",
            "10GiB",
            "--buffer-when-full",
            "drop_newest",
            "--buffer-sync-interval",
            "5ms",
            "--ack-after",
            "delivered",
        ]);
        assert_eq!(
            cli.runtime_config().disk_buffer,
            Some(rt::DiskBuffer {
                dir: "/data/buffer".into(),
                max_bytes: 10 << 30,
                when_full: rt::WhenFull::DropNewest,
                sync_interval: Duration::from_millis(5),
                ack_after: rt::AckAfter::Delivered,
            })
        );
        let defaults = parse(&["--buffer-type", "disk"]).disk_buffer().unwrap();
        assert_eq!(defaults.dir, std::path::PathBuf::from("buffer"));
        assert_eq!(defaults.max_bytes, 1 << 30);
        assert_eq!(defaults.when_full, rt::WhenFull::Block);
        assert_eq!(defaults.sync_interval, rt::DEFAULT_BUFFER_SYNC_INTERVAL);
        assert_eq!(defaults.ack_after, rt::AckAfter::Durable);
        for bad in [
            ["--buffer-type", "ssd"],
            ["--buffer-when-full", "drop_oldest"],
        ] {
            assert!(Cli::try_parse_from(std::iter::once("stormgate").chain(bad)).is_err());
        }
    }

    #[test]
    fn readme_documents_every_setting() {
        use clap::CommandFactory;
        let readme = include_str!("../../../README.md");
        let cmd = Cli::command();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let row = readme
                .lines()
                .find(|l| l.contains(&format!("`--{long}")))
                .unwrap_or_else(|| panic!("README lacks a row for --{long}"));
            if let Some(env) = env {
                assert!(
                    row.contains(&format!("`{env}`")),
                    "README row for --{long} lacks {env}"
                );
            }
            for default in arg.get_default_values() {
                let default = default.to_string_lossy();
                assert!(
                    row.contains(&format!("`{default}`")),
                    "README row for --{long} does not show its default {default}"
                );
            }
        }
    }
}
