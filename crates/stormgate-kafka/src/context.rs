//! The producer context: where librdkafka's callbacks land.
//!
//! rdkafka serves librdkafka's events (delivery reports, logs, errors, statistics) inside
//! `BaseProducer::poll`, so every callback here runs on the thread that polls: the owning
//! shard's. Logs and errors may also come straight from librdkafka's own threads, which is
//! why the context is `Sync`.

use std::borrow::Cow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::bindings::{rd_kafka_message_status, rd_kafka_msg_status_t};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use stormgate_telemetry::{Event, LogLimiter};
use tracing::{debug, error, info, warn};

use crate::events::{ClientError, StatsUnreadable};
use crate::spill::SpillLine;

/// One delivery report, copied out of librdkafka.
#[derive(Debug)]
pub(crate) struct Report {
    /// The record's ticket, passed through librdkafka as the delivery opaque.
    pub(crate) ticket: usize,
    pub(crate) result: Result<(), RDKafkaErrorCode>,
    /// For a failure: the record as it was to be produced, for the spill file.
    pub(crate) spill: Option<Box<SpillLine>>,
}

/// The context of one shard's producer.
///
/// rdkafka requires contexts to be `Send + Sync` because librdkafka may call `log` and
/// `error` from its own threads. Delivery reports are different: `BaseProducer::poll` invokes
/// `delivery` on the polling thread, and only the owning shard polls. Reports are buffered
/// here and taken by that shard right after each poll; the mutex is therefore never contended
/// and costs an uncontended lock per record.
pub(crate) struct ShardContext {
    shard_id: usize,
    reports: Mutex<Vec<Report>>,
    /// Rate limit of broker errors (they repeat at every reconnect attempt).
    error_log: Mutex<LogLimiter>,
    /// Callbacks run so far. `poll(0)` serves one event and every event ends in a callback,
    /// so an unchanged count after a poll means the queue is empty.
    callbacks: AtomicU64,
    /// What the last statistics said, for the operations endpoint.
    stats: std::sync::Arc<ProducerStats>,
    /// Rate limit of the "statistics unreadable" warning.
    stats_log: Mutex<LogLimiter>,
}

const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl ShardContext {
    pub(crate) fn new(shard_id: usize, stats: std::sync::Arc<ProducerStats>) -> ShardContext {
        ShardContext {
            shard_id,
            reports: Mutex::new(Vec::with_capacity(1024)),
            error_log: Mutex::new(LogLimiter::new(ERROR_LOG_INTERVAL)),
            callbacks: AtomicU64::new(0),
            stats,
            stats_log: Mutex::new(LogLimiter::new(Duration::from_secs(60))),
        }
    }

    /// How many callbacks ran so far (see the field).
    pub(crate) fn callbacks(&self) -> u64 {
        self.callbacks.load(Ordering::Relaxed)
    }

    fn count_callback(&self) {
        self.callbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves the buffered reports into `out` (which is cleared first).
    pub(crate) fn take_reports(&self, out: &mut Vec<Report>) {
        out.clear();
        std::mem::swap(
            &mut *self.reports.lock().expect("report buffer poisoned"),
            out,
        );
    }
}

impl ClientContext for ShardContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.count_callback();
        let shard = self.shard_id;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", shard, fac, "{message}")
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", shard, fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", shard, fac, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", shard, fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.count_callback();
        let limiter = self.error_log.lock().expect("error log state poisoned");
        ClientError {
            shard: self.shard_id,
            error: &error,
            reason,
        }
        .log_limited(&limiter);
    }

    /// Runs on the shard (inside its `poll(0)`), once per `statistics.interval.ms`. Parsing
    /// reads only the fields [`ProducerStats`] keeps and skips the rest without allocating:
    /// about 7 µs (release build) for the 7.7 KB report of a producer with one broker and
    /// six partitions, once a second.
    ///
    /// The whole report is also logged at TRACE under the target `stormgate::librdkafka_stats`
    /// (`RUST_LOG=info,stormgate::librdkafka_stats=trace`): librdkafka's own latency windows
    /// per broker (`int_latency`, `outbuf_latency`, `rtt`), for profiling (docs/PROFILING.md).
    fn stats_raw(&self, statistics: &[u8]) {
        tracing::trace!(
            target: "stormgate::librdkafka_stats",
            shard = self.shard_id,
            statistics = %String::from_utf8_lossy(statistics),
        );
        self.count_callback();
        if let Err(e) = self.stats.update(statistics) {
            let limiter = self.stats_log.lock().expect("stats log state poisoned");
            StatsUnreadable {
                shard: self.shard_id,
                error: &e,
            }
            .log_limited(&limiter);
        }
    }
}

impl ProducerContext for ShardContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        self.count_callback();
        let (result, spill) = match result {
            Ok(_) => (Ok(()), None),
            Err((e, message)) => {
                let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                let mut line = SpillLine::new(
                    format!("{code:?}: {code}"),
                    Some(self.shard_id),
                    message.topic(),
                    message.key(),
                    message.timestamp().to_millis(),
                    message.payload(),
                );
                // SAFETY: the message is valid for the duration of the callback.
                let status = unsafe { rd_kafka_message_status(message.ptr()) };
                line.possibly_delivered =
                    status != rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED;
                (Err(code), Some(Box::new(line)))
            }
        };
        self.reports
            .lock()
            .expect("report buffer poisoned")
            .push(Report {
                ticket,
                result,
                spill,
            });
    }
}

/// One shard's producer as its latest librdkafka statistics describe it (`statistics.interval.ms`).
///
/// Written by the owning shard when its producer delivers a statistics event (single writer),
/// read by anyone (the operations endpoint): every field is an atomic, so a reader may see
/// fields from two consecutive reports, never a torn value.
#[derive(Debug)]
pub struct ProducerStats {
    shard_id: usize,
    /// As configured, then as each report says (it has an `eos` section only when the
    /// producer is idempotent, whichever setting or pass-through property made it so).
    idempotent: AtomicBool,
    /// `statistics.interval.ms`; 0 = librdkafka sends none.
    interval: Duration,
    /// The moment `updated_micros` counts from.
    created: Instant,
    /// When the last report was read, in microseconds since `created`; 0 = never.
    updated_micros: AtomicU64,
    reports: AtomicU64,
    brokers_up: AtomicU64,
    brokers_down: AtomicU64,
    rtt_avg_micros: AtomicU64,
    tx_bytes: AtomicU64,
    tx_retries: AtomicU64,
    queue_records: AtomicU64,
    queue_bytes: AtomicU64,
    /// -1 while none is assigned (and always without idempotence).
    producer_id: AtomicI64,
}

/// A copy of [`ProducerStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerStatsSnapshot {
    /// The shard whose producer this is.
    pub shard_id: usize,
    /// The producer is idempotent (its last report had an `eos` section; before the first,
    /// `enable.idempotence` as configured): it needs a producer id to send.
    pub idempotent: bool,
    /// How often librdkafka reports (`statistics.interval.ms`); zero = never, and then none of
    /// the other fields move.
    pub interval: Duration,
    /// Time since the last report was read; `None` before the first.
    pub age: Option<Duration>,
    /// Reports read so far.
    pub reports: u64,
    /// Brokers (bootstrap and learned) the producer has an open, usable connection to
    /// (librdkafka state `UP`).
    pub brokers_up: u64,
    /// Brokers it knows but is not connected to (any other state: `DOWN`, `CONNECT`, ...).
    pub brokers_down: u64,
    /// Mean round-trip time of the requests that completed during the last interval that had
    /// any, over every broker (weighted by requests); zero before the first.
    pub rtt_avg: Duration,
    /// Bytes sent to brokers since the producer started (`tx_bytes`).
    pub tx_bytes: u64,
    /// Requests sent again (`txretries`, summed over brokers).
    pub tx_retries: u64,
    /// Records in the producer's queues, waiting to be sent or acknowledged (`msg_cnt`).
    pub queue_records: u64,
    /// Their size in bytes (`msg_size`).
    pub queue_bytes: u64,
    /// The idempotent producer's id, once the broker assigned one.
    pub producer_id: Option<i64>,
}

impl ProducerStats {
    /// Empty statistics for shard `shard_id`'s producer, which reports every `interval`
    /// (the sink builds these; public for tests of what reads them).
    pub fn new(shard_id: usize, idempotent: bool, interval: Duration) -> ProducerStats {
        ProducerStats {
            shard_id,
            idempotent: AtomicBool::new(idempotent),
            interval,
            created: Instant::now(),
            updated_micros: AtomicU64::new(0),
            reports: AtomicU64::new(0),
            brokers_up: AtomicU64::new(0),
            brokers_down: AtomicU64::new(0),
            rtt_avg_micros: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            tx_retries: AtomicU64::new(0),
            queue_records: AtomicU64::new(0),
            queue_bytes: AtomicU64::new(0),
            producer_id: AtomicI64::new(-1),
        }
    }

    /// The shard whose producer this is.
    pub fn shard_id(&self) -> usize {
        self.shard_id
    }

    /// Reads one statistics report (librdkafka's JSON). Single writer: the owning shard's
    /// producer context (public for tests of what reads them).
    pub fn update(&self, json: &[u8]) -> Result<(), serde_json::Error> {
        let raw: RawStats<'_> = serde_json::from_slice(json)?;
        let b = raw.brokers;
        let store = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        store(&self.brokers_up, b.up);
        store(&self.brokers_down, b.down);
        // An interval without a completed request keeps the previous mean.
        if let Some(rtt) = b.rtt_weighted_sum.checked_div(b.rtt_count) {
            store(&self.rtt_avg_micros, rtt);
        }
        store(&self.tx_bytes, raw.tx_bytes);
        store(&self.tx_retries, b.tx_retries);
        store(&self.queue_records, raw.msg_cnt);
        store(&self.queue_bytes, raw.msg_size);
        self.idempotent.store(raw.eos.is_some(), Ordering::Relaxed);
        let pid = raw
            .eos
            .filter(|e| e.idemp_state == "Assigned" && e.producer_id >= 0)
            .map_or(-1, |e| e.producer_id);
        self.producer_id.store(pid, Ordering::Relaxed);
        store(&self.reports, self.reports.load(Ordering::Relaxed) + 1);
        let now = u64::try_from(self.created.elapsed().as_micros()).unwrap_or(u64::MAX);
        store(&self.updated_micros, now.max(1));
        Ok(())
    }

    /// The current values.
    pub fn snapshot(&self) -> ProducerStatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let updated = load(&self.updated_micros);
        let age = (updated > 0).then(|| {
            self.created
                .elapsed()
                .saturating_sub(Duration::from_micros(updated))
        });
        let pid = self.producer_id.load(Ordering::Relaxed);
        ProducerStatsSnapshot {
            shard_id: self.shard_id,
            idempotent: self.idempotent.load(Ordering::Relaxed),
            interval: self.interval,
            age,
            reports: load(&self.reports),
            brokers_up: load(&self.brokers_up),
            brokers_down: load(&self.brokers_down),
            rtt_avg: Duration::from_micros(load(&self.rtt_avg_micros)),
            tx_bytes: load(&self.tx_bytes),
            tx_retries: load(&self.tx_retries),
            queue_records: load(&self.queue_records),
            queue_bytes: load(&self.queue_bytes),
            producer_id: (pid >= 0).then_some(pid),
        }
    }
}

/// The fields of librdkafka's statistics JSON that [`ProducerStats`] keeps
/// (librdkafka's STATISTICS.md); everything else is skipped.
#[derive(Deserialize)]
struct RawStats<'a> {
    #[serde(default)]
    msg_cnt: u64,
    #[serde(default)]
    msg_size: u64,
    #[serde(default)]
    tx_bytes: u64,
    #[serde(default)]
    brokers: BrokerTotals,
    #[serde(borrow, default)]
    eos: Option<RawEos<'a>>,
}

#[derive(Deserialize)]
struct RawEos<'a> {
    #[serde(borrow)]
    idemp_state: Cow<'a, str>,
    producer_id: i64,
}

#[derive(Deserialize)]
struct RawBroker<'a> {
    #[serde(borrow)]
    source: Cow<'a, str>,
    #[serde(borrow)]
    state: Cow<'a, str>,
    #[serde(default)]
    txretries: u64,
    #[serde(default)]
    rtt: Option<RawWindow>,
}

#[derive(Deserialize)]
struct RawWindow {
    avg: i64,
    cnt: i64,
}

/// The `brokers` object folded as it is read, so that no map of brokers is built.
#[derive(Default)]
struct BrokerTotals {
    up: u64,
    down: u64,
    tx_retries: u64,
    /// Sum of each broker's mean RTT times its sample count (microseconds).
    rtt_weighted_sum: u64,
    rtt_count: u64,
}

impl BrokerTotals {
    fn add(&mut self, b: &RawBroker<'_>) {
        // The internal broker (unassigned partitions) and logical ones (coordinators) are not
        // connections to a broker.
        if b.source == "internal" || b.source == "logical" {
            return;
        }
        if b.state == "UP" {
            self.up += 1;
        } else {
            self.down += 1;
        }
        self.tx_retries += b.txretries;
        if let Some(rtt) = &b.rtt
            && rtt.cnt > 0
            && rtt.avg >= 0
        {
            self.rtt_weighted_sum += rtt.avg as u64 * rtt.cnt as u64;
            self.rtt_count += rtt.cnt as u64;
        }
    }
}

impl<'de> Deserialize<'de> for BrokerTotals {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fold;
        impl<'de> Visitor<'de> for Fold {
            type Value = BrokerTotals;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of brokers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BrokerTotals, A::Error> {
                let mut totals = BrokerTotals::default();
                while map.next_key::<IgnoredAny>()?.is_some() {
                    totals.add(&map.next_value::<RawBroker<'de>>()?);
                }
                Ok(totals)
            }
        }
        d.deserialize_map(Fold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    /// A report shaped like librdkafka's (fields this module does not read trimmed away).
    const REPORT: &str = r#"{
        "name": "stormgate-shard-0#producer-1", "type": "producer", "msg_cnt": 12,
        "msg_size": 3400, "tx_bytes": 98765, "replyq": 0,
        "brokers": {
            ":0/internal": {"name": ":0/internal", "nodeid": -1, "source": "internal",
                "state": "INIT", "txretries": 99, "rtt": {"avg": 9999, "cnt": 9}},
            "b1:9092/1": {"name": "b1:9092/1", "nodeid": 1, "source": "learned",
                "state": "UP", "txretries": 2,
                "rtt": {"min": 100, "max": 900, "avg": 300, "cnt": 3, "p99": 900}},
            "b2:9092/2": {"name": "b2:9092/2", "nodeid": 2, "source": "learned",
                "state": "CONNECT", "txretries": 5, "rtt": {"avg": 500, "cnt": 1}},
            "b3:9092/bootstrap": {"nodeid": -1, "source": "configured", "state": "DOWN",
                "txretries": 0, "rtt": {"avg": 0, "cnt": 0}}
        },
        "topics": {"t": {"partitions": {"0": {"msgq_cnt": 1}}}},
        "eos": {"idemp_state": "Assigned", "txn_state": "Init", "producer_id": 4001,
            "producer_epoch": 0}
    }"#;

    #[test]
    fn a_report_is_folded_into_the_fields_kept() {
        let stats = ProducerStats::new(0, true, Duration::from_secs(1));
        assert_eq!(stats.snapshot().age, None);
        stats.update(REPORT.as_bytes()).unwrap();
        let s = stats.snapshot();
        assert_eq!(s.reports, 1);
        assert!(s.age.is_some_and(|a| a < Duration::from_secs(1)));
        assert_eq!(
            (s.brokers_up, s.brokers_down),
            (1, 2),
            "internal broker skipped"
        );
        assert_eq!(s.tx_retries, 7);
        assert_eq!(s.rtt_avg, Duration::from_micros((300 * 3 + 500) / 4));
        assert_eq!(s.tx_bytes, 98765);
        assert_eq!((s.queue_records, s.queue_bytes), (12, 3400));
        assert_eq!(s.producer_id, Some(4001));
    }

    #[test]
    fn a_producer_id_counts_only_once_assigned_and_rtt_survives_quiet_intervals() {
        let stats = ProducerStats::new(0, true, Duration::from_secs(1));
        stats.update(REPORT.as_bytes()).unwrap();
        let waiting = REPORT
            .replace(
                r#""idemp_state": "Assigned""#,
                r#""idemp_state": "WaitPID""#,
            )
            .replace(r#""cnt": 3"#, r#""cnt": 0"#)
            .replace(r#""cnt": 1}"#, r#""cnt": 0}"#);
        stats.update(waiting.as_bytes()).unwrap();
        let s = stats.snapshot();
        assert_eq!(s.producer_id, None);
        assert_eq!(s.rtt_avg, Duration::from_micros(350), "previous mean kept");
        assert_eq!(s.reports, 2);
    }

    #[test]
    fn a_minimal_or_broken_report() {
        let stats = ProducerStats::new(0, true, Duration::from_secs(1));
        stats.update(br#"{"brokers": {}}"#).unwrap();
        let s = stats.snapshot();
        assert_eq!((s.brokers_up, s.brokers_down, s.producer_id), (0, 0, None));
        assert!(!s.idempotent, "no eos section: not idempotent after all");
        assert!(stats.update(b"{\"brokers\": [").is_err());
        assert_eq!(stats.snapshot().reports, 1);
    }

    /// A real producer against the mock cluster: its reports arrive through `poll` on the
    /// polling thread, say UP with a producer id, and turn DOWN when the broker goes away.
    #[test]
    fn a_producers_reports_follow_its_broker() {
        let cluster = crate::EmbeddedCluster::start("stats", 1).unwrap();
        let settings = crate::KafkaSettings::new(cluster.bootstrap_servers());
        let stats = Arc::new(ProducerStats::new(0, true, settings.statistics_interval()));
        let producer: BaseProducer<ShardContext> = settings
            .shard_client_config(0)
            .create_with_context(ShardContext::new(0, Arc::clone(&stats)))
            .unwrap();
        producer
            .send(BaseRecord::<str, str, usize>::with_opaque_to("stats", 0).payload("v"))
            .unwrap();
        let poll_until = |what: &str, cond: &dyn Fn(&ProducerStatsSnapshot) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !cond(&stats.snapshot()) {
                assert!(Instant::now() < deadline, "{what}: {:?}", stats.snapshot());
                producer.poll(Duration::from_millis(50));
                let mut reports = Vec::new();
                producer.context().take_reports(&mut reports);
            }
        };
        poll_until("connected with a producer id", &|s| {
            s.brokers_up == 1 && s.producer_id.is_some() && s.tx_bytes > 0
        });
        cluster.mock().broker_down(1).unwrap();
        poll_until("broker down", &|s| s.brokers_up == 0 && s.brokers_down >= 1);
        cluster.mock().broker_up(1).unwrap();
        poll_until("connected again", &|s| s.brokers_up == 1);
    }
}
