//! The producer context: where librdkafka's callbacks land.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::bindings::{rd_kafka_message_status, rd_kafka_msg_status_t};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, error, info, warn};

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
    /// Last time a broker error was logged (errors repeat every reconnect attempt).
    last_error_log: Mutex<Option<Instant>>,
    /// Callbacks run so far. `poll(0)` serves one event and every event ends in a callback,
    /// so an unchanged count after a poll means the queue is empty.
    callbacks: AtomicU64,
}

const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl ShardContext {
    pub(crate) fn new(shard_id: usize) -> ShardContext {
        ShardContext {
            shard_id,
            reports: Mutex::new(Vec::with_capacity(1024)),
            last_error_log: Mutex::new(None),
            callbacks: AtomicU64::new(0),
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
        let now = Instant::now();
        let mut last = self
            .last_error_log
            .lock()
            .expect("error log state poisoned");
        if last.is_none_or(|t| now.duration_since(t) >= ERROR_LOG_INTERVAL) {
            *last = Some(now);
            warn!(shard = self.shard_id, %error, "kafka client error: {reason}");
        }
    }

    fn stats_raw(&self, _statistics: &[u8]) {
        self.count_callback();
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
