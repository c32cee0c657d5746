//! Producer settings and their librdkafka properties.
//!
//! | setting | librdkafka property | seed default | Stormgate default | why |
//! |---|---|---|---|---|
//! | `KAFKA_BATCH_SIZE` | `batch.num.messages` | 100 | 10000 | librdkafka's default; 100 caps a batch at ~20 KB and multiplies requests |
//! | `KAFKA_BATCH_TIMEOUT` | `linger.ms` | 100ms | 5ms | librdkafka's default; batches still fill under load, and a quiet station's line waits 5 ms, not 100 |
//! | `KAFKA_COMPRESSION` | `compression.codec` | snappy | lz4 | as fast as snappy with a better ratio on JSON; broker-side decompression is cheap |
//! | `KAFKA_REQUIRED_ACKS` | `acks` | 1 | all (-1) | librdkafka's default; a leader failure with acks=1 loses acknowledged records |
//! | `KAFKA_MAX_ATTEMPTS` | `retries` = attempts − 1 | 3 | 0 = no limit | retries stop at `KAFKA_DELIVERY_TIMEOUT`, so a broker restart does not exhaust them |
//! | `KAFKA_IDEMPOTENCE` | `enable.idempotence` | — | true; false when `KAFKA_REQUIRED_ACKS` is set to 0 or 1 and this is not ([`idempotence_for`]) | retries cannot duplicate or reorder a station's records |
//! | `KAFKA_ASYNC` | per-connection in-flight cap of 1 when false | true | true | false is the seed's old behaviour, kept for comparison |
//! | `KAFKA_QUEUE_MAX_RECORDS` | `queue.buffering.max.messages` | — | 100000 | librdkafka's default; bounds what a broker outage buffers |
//! | `KAFKA_QUEUE_MAX_BYTES` | `queue.buffering.max.kbytes` | — | 64 MiB | librdkafka's 1 GiB per shard is no bound with 64 KiB lines |
//!
//! Always set: `partitioner=murmur2_random` (the Java client's, so a zipcode lands on the same
//! partition whoever produces it), `client.id=stormgate-shard-N`, and
//! `metadata.recovery.rebootstrap.trigger.ms=10000` (see [`DEFAULT_REBOOTSTRAP_TRIGGER`]). The shards' producers
//! also report statistics every second (`statistics.interval.ms=1000`, see
//! [`DEFAULT_STATISTICS_INTERVAL`]). Any other property passes through unchanged
//! (`KAFKA_PROP_<NAME>` or `--kafka-prop name=value`) and wins over the settings above.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rdkafka::ClientConfig;

/// Topic records go to when none is configured.
pub const DEFAULT_TOPIC: &str = "weather.metrics";
/// See the module table.
pub const DEFAULT_BATCH_SIZE: u32 = 10_000;
/// See the module table.
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_millis(5);
/// See the module table.
pub const DEFAULT_COMPRESSION: Compression = Compression::Lz4;
/// See the module table.
pub const DEFAULT_ACKS: Acks = Acks::All;
/// Records one producer may hold (`queue.buffering.max.messages`); librdkafka's default.
pub const DEFAULT_QUEUE_MAX_RECORDS: u32 = 100_000;
/// Bytes one producer may hold (`queue.buffering.max.kbytes`), 64 MiB instead of librdkafka's
/// 1 GiB: with 64 KiB lines the record bound alone would allow gigabytes per shard.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 << 20;
/// How long librdkafka keeps retrying a record (`message.timeout.ms`); librdkafka's default.
/// Long enough to ride out a broker restart; a record older than this is a failed delivery.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a producer may go without metadata from any broker before it starts again from
/// `bootstrap.servers` (`metadata.recovery.rebootstrap.trigger.ms`; librdkafka's default is
/// 300 s, the delivery timeout itself).
///
/// Why: while a single-broker cluster shuts down (a restart), its metadata lists no broker;
/// librdkafka 2.12 then forgets the one it knew, and has nothing to reconnect to once the
/// broker is back until this much time has passed. With the default, records buffered during a
/// restart sat for five minutes and timed out (seen with Apache Kafka 4.4, one shard of two;
/// `tests/broker_restart.rs`). Re-bootstrapping is cheap: it only resolves and connects to the
/// bootstrap servers again.
pub const DEFAULT_REBOOTSTRAP_TRIGGER: Duration = Duration::from_secs(10);

/// How often each shard's producer reports librdkafka statistics (`statistics.interval.ms`;
/// librdkafka's default is 0, none). They feed the operations endpoint: broker state for
/// `/readyz`, round-trip time, bytes sent, retries, queue length. Only the shards' producers
/// set it: `stormgate replay` and the ceiling benchmark do not read statistics. A
/// pass-through `statistics.interval.ms` wins; 0 turns them off.
pub const DEFAULT_STATISTICS_INTERVAL: Duration = Duration::from_secs(1);

/// Record compression (`compression.codec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// No compression.
    None,
    /// gzip (zlib).
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// Every codec, for tests and benchmarks that cover all of them.
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The librdkafka name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                ParseSettingError::new("compression", s, "none, gzip, snappy, lz4 or zstd")
            })
    }
}

/// Broker acknowledgements a record needs before it counts as delivered (`acks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// 0: none; the record counts as delivered once sent.
    None,
    /// 1: the partition leader wrote it.
    Leader,
    /// -1 / all: every in-sync replica wrote it.
    All,
}

impl Acks {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Acks::None => "0",
            Acks::Leader => "1",
            Acks::All => "all",
        }
    }
}

impl fmt::Display for Acks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Acks {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "0" | "none" => Ok(Acks::None),
            "1" | "leader" => Ok(Acks::Leader),
            "-1" | "all" => Ok(Acks::All),
            _ => Err(ParseSettingError::new("acks", s, "0, 1, -1 or all")),
        }
    }
}

/// The idempotent producer needs `acks=all`; librdkafka refuses any other pair at start-up,
/// in words that name neither of our settings. [`idempotence_for`] decides instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotenceChoice {
    /// As configured (or by default): `enabled`.
    AsSet(bool),
    /// `KAFKA_REQUIRED_ACKS` other than `all` was set and `KAFKA_IDEMPOTENCE` was not: off,
    /// which is what the acks value means to a user coming from a producer without it (the
    /// replaced server's default was acks=1). Worth a warning: retries may now duplicate or
    /// reorder records.
    OffForAcks(Acks),
}

impl IdempotenceChoice {
    /// `enable.idempotence`.
    pub fn enabled(self) -> bool {
        matches!(self, IdempotenceChoice::AsSet(true))
    }

    /// The start-up warning of [`IdempotenceChoice::OffForAcks`]; `None` otherwise.
    pub fn warning(self) -> Option<String> {
        let IdempotenceChoice::OffForAcks(acks) = self else {
            return None;
        };
        Some(format!(
            "KAFKA_REQUIRED_ACKS={acks} turns the idempotent producer off (it needs acks=all, \
             and KAFKA_IDEMPOTENCE was not set): retries may now duplicate a station's records \
             or reorder them; set KAFKA_REQUIRED_ACKS=all to keep them exactly once and in \
             order, or KAFKA_IDEMPOTENCE=false to say that this is intended"
        ))
    }
}

/// `KAFKA_IDEMPOTENCE=true` was set together with acks other than all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "KAFKA_REQUIRED_ACKS={acks} cannot go with KAFKA_IDEMPOTENCE=true: the idempotent producer \
     needs acks=all; set KAFKA_REQUIRED_ACKS=all, or KAFKA_IDEMPOTENCE=false to accept that \
     retries may duplicate or reorder records"
)]
pub struct AcksIdempotenceError {
    acks: Acks,
}

/// Whether the producer is idempotent, given `acks` and `idempotence` (`None` when
/// `KAFKA_IDEMPOTENCE` was not set; its default is true).
pub fn idempotence_for(
    acks: Acks,
    idempotence: Option<bool>,
) -> Result<IdempotenceChoice, AcksIdempotenceError> {
    match (acks, idempotence) {
        (Acks::All, set) => Ok(IdempotenceChoice::AsSet(set.unwrap_or(true))),
        (acks, None) => Ok(IdempotenceChoice::OffForAcks(acks)),
        (_, Some(false)) => Ok(IdempotenceChoice::AsSet(false)),
        (acks, Some(true)) => Err(AcksIdempotenceError { acks }),
    }
}

/// A setting's value could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {setting} {value:?}: expected {expected}")]
pub struct ParseSettingError {
    setting: &'static str,
    value: String,
    expected: &'static str,
}

impl ParseSettingError {
    fn new(setting: &'static str, value: &str, expected: &'static str) -> Self {
        ParseSettingError {
            setting,
            value: value.to_owned(),
            expected,
        }
    }
}

/// Everything that shapes the per-shard producers.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic every record goes to.
    pub topic: String,
    /// Topic of dead-letter records (rejected lines); `None` = no dead letters.
    pub dlq_topic: Option<String>,
    /// `batch.num.messages`.
    pub batch_size: u32,
    /// `linger.ms`.
    pub batch_timeout: Duration,
    /// `compression.codec`.
    pub compression: Compression,
    /// `acks`.
    pub acks: Acks,
    /// Total attempts per record (`retries` = attempts − 1); 0 means retry until the delivery
    /// timeout.
    pub max_attempts: u32,
    /// `enable.idempotence`.
    pub idempotence: bool,
    /// `message.timeout.ms`.
    pub delivery_timeout: Duration,
    /// `queue.buffering.max.messages`: records the producer holds before `send` reports
    /// QueueFull (and connections stop reading).
    pub queue_max_records: u32,
    /// `queue.buffering.max.kbytes` (rounded up to whole KiB): the same bound in bytes.
    pub queue_max_bytes: u64,
    /// Extra librdkafka properties, applied last (they override everything above).
    pub properties: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Defaults for everything but the brokers.
    pub fn new(brokers: impl Into<String>) -> KafkaSettings {
        KafkaSettings {
            brokers: brokers.into(),
            topic: DEFAULT_TOPIC.to_owned(),
            dlq_topic: None,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_timeout: DEFAULT_BATCH_TIMEOUT,
            compression: DEFAULT_COMPRESSION,
            acks: DEFAULT_ACKS,
            max_attempts: 0,
            idempotence: true,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            queue_max_records: DEFAULT_QUEUE_MAX_RECORDS,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            properties: Vec::new(),
        }
    }

    /// The librdkafka properties of a producer, in the order they are applied.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut props: Vec<(String, String)> = vec![
            ("bootstrap.servers".into(), self.brokers.clone()),
            ("batch.num.messages".into(), self.batch_size.to_string()),
            ("linger.ms".into(), millis(self.batch_timeout)),
            ("compression.codec".into(), self.compression.as_str().into()),
            ("acks".into(), self.acks.as_str().into()),
            ("enable.idempotence".into(), self.idempotence.to_string()),
            ("message.timeout.ms".into(), millis(self.delivery_timeout)),
            ("partitioner".into(), "murmur2_random".into()),
            (
                "metadata.recovery.rebootstrap.trigger.ms".into(),
                millis(DEFAULT_REBOOTSTRAP_TRIGGER),
            ),
            (
                "queue.buffering.max.messages".into(),
                self.queue_max_records.to_string(),
            ),
            (
                "queue.buffering.max.kbytes".into(),
                self.queue_max_bytes.div_ceil(1024).to_string(),
            ),
        ];
        if self.max_attempts > 0 {
            props.push(("retries".into(), (self.max_attempts - 1).to_string()));
        }
        props.extend(self.properties.iter().cloned());
        props
    }

    /// A producer's client configuration (`client.id=stormgate-shard-N`), without
    /// statistics: for the one-off producers of `replay` and [`crate::check_settings`].
    pub(crate) fn client_config(&self, shard_id: usize) -> ClientConfig {
        self.config_with(shard_id, &[])
    }

    /// The client configuration of shard `shard_id`'s producer: [`Self::client_config`] plus
    /// `statistics.interval.ms` (a pass-through value wins).
    pub(crate) fn shard_client_config(&self, shard_id: usize) -> ClientConfig {
        let stats = millis(DEFAULT_STATISTICS_INTERVAL);
        self.config_with(shard_id, &[("statistics.interval.ms", &stats)])
    }

    /// The effective `statistics.interval.ms` of the shards' producers; zero = none.
    pub fn statistics_interval(&self) -> Duration {
        self.properties
            .iter()
            .rev()
            .find(|(k, _)| k == "statistics.interval.ms")
            .and_then(|(_, v)| v.trim().parse().ok())
            .map_or(DEFAULT_STATISTICS_INTERVAL, Duration::from_millis)
    }

    /// `defaults` first, then every producer property, so that pass-through ones win.
    fn config_with(&self, shard_id: usize, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("client.id", format!("stormgate-shard-{shard_id}"));
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in self.producer_properties() {
            config.set(k, v);
        }
        config
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prop<'a>(props: &'a [(String, String)], key: &str) -> Option<&'a str> {
        props
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn settings_map_to_librdkafka_properties() {
        let mut s = KafkaSettings::new("b:9092");
        s.batch_size = 100;
        s.batch_timeout = Duration::from_millis(100);
        s.compression = Compression::Snappy;
        s.acks = Acks::Leader;
        s.max_attempts = 3;
        let p = s.producer_properties();
        assert_eq!(prop(&p, "bootstrap.servers"), Some("b:9092"));
        assert_eq!(prop(&p, "batch.num.messages"), Some("100"));
        assert_eq!(prop(&p, "linger.ms"), Some("100"));
        assert_eq!(prop(&p, "compression.codec"), Some("snappy"));
        assert_eq!(prop(&p, "acks"), Some("1"));
        assert_eq!(prop(&p, "retries"), Some("2"));
        assert_eq!(prop(&p, "partitioner"), Some("murmur2_random"));
        assert_eq!(
            prop(&p, "metadata.recovery.rebootstrap.trigger.ms"),
            Some("10000")
        );
    }

    #[test]
    fn unlimited_attempts_leave_retries_to_librdkafka() {
        let p = KafkaSettings::new("b").producer_properties();
        assert_eq!(prop(&p, "retries"), None);
        assert_eq!(prop(&p, "message.timeout.ms"), Some("300000"));
    }

    #[test]
    fn pass_through_properties_win() {
        let mut s = KafkaSettings::new("b");
        s.properties.push(("linger.ms".into(), "0".into()));
        s.properties
            .push(("socket.keepalive.enable".into(), "true".into()));
        let p = s.producer_properties();
        assert_eq!(prop(&p, "linger.ms"), Some("0"));
        assert_eq!(prop(&p, "socket.keepalive.enable"), Some("true"));
    }

    #[test]
    fn shard_producers_report_statistics_every_second() {
        let s = KafkaSettings::new("b");
        assert_eq!(
            s.shard_client_config(3).get("statistics.interval.ms"),
            Some("1000")
        );
        assert_eq!(
            s.shard_client_config(3).get("client.id"),
            Some("stormgate-shard-3")
        );
        assert_eq!(s.client_config(0).get("statistics.interval.ms"), None);
        assert_eq!(s.statistics_interval(), Duration::from_secs(1));
        let mut off = KafkaSettings::new("b");
        off.properties
            .push(("statistics.interval.ms".into(), "0".into()));
        assert_eq!(
            off.shard_client_config(0).get("statistics.interval.ms"),
            Some("0")
        );
        assert_eq!(off.statistics_interval(), Duration::ZERO);
    }

    /// (acks, KAFKA_IDEMPOTENCE if set) → enable.idempotence, or None for an error.
    fn check_idempotence(acks: Acks, set: Option<bool>, want: Option<bool>) {
        let got = idempotence_for(acks, set)
            .map(IdempotenceChoice::enabled)
            .ok();
        assert_eq!(got, want, "acks {acks}, KAFKA_IDEMPOTENCE {set:?}");
    }

    #[test]
    fn acks_other_than_all_turn_idempotence_off_unless_it_was_asked_for() {
        check_idempotence(Acks::All, None, Some(true));
        check_idempotence(Acks::All, Some(true), Some(true));
        check_idempotence(Acks::All, Some(false), Some(false));
        check_idempotence(Acks::Leader, None, Some(false));
        check_idempotence(Acks::None, None, Some(false));
        check_idempotence(Acks::Leader, Some(false), Some(false));
        check_idempotence(Acks::Leader, Some(true), None);
        check_idempotence(Acks::None, Some(true), None);

        let off = idempotence_for(Acks::Leader, None).unwrap();
        assert_eq!(off, IdempotenceChoice::OffForAcks(Acks::Leader));
        let warning = off.warning().unwrap();
        assert!(
            warning.contains("KAFKA_REQUIRED_ACKS=1") && warning.contains("KAFKA_IDEMPOTENCE"),
            "{warning}"
        );
        assert_eq!(
            idempotence_for(Acks::Leader, Some(false))
                .unwrap()
                .warning(),
            None
        );
        let err = idempotence_for(Acks::None, Some(true))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("KAFKA_REQUIRED_ACKS=0 cannot go with KAFKA_IDEMPOTENCE=true"),
            "{err}"
        );
    }

    #[test]
    fn parse_codecs_and_acks() {
        for c in Compression::ALL {
            assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
        }
        assert_eq!("LZ4".parse::<Compression>(), Ok(Compression::Lz4));
        assert!("brotli".parse::<Compression>().is_err());
        assert_eq!("-1".parse::<Acks>(), Ok(Acks::All));
        assert_eq!("all".parse::<Acks>(), Ok(Acks::All));
        assert_eq!("0".parse::<Acks>(), Ok(Acks::None));
        assert_eq!("1".parse::<Acks>(), Ok(Acks::Leader));
        let err = "2".parse::<Acks>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid acks \"2\": expected 0, 1, -1 or all"
        );
    }
}
