//! The "plain producer" ceiling: how fast one librdkafka producer on one thread publishes
//! ready-made Stormgate records with the server's own settings.
//!
//! Benchmarks compare the server's records per second with this number: the gap is what
//! accepting connections, parsing lines and building records costs, and the ceiling itself is
//! what the broker and librdkafka allow. The loop is the one a shard runs, minus the shard:
//! a non-blocking `send`, `QueueFull` answered with a 1 ms poll, delivery reports polled with
//! a zero timeout as it goes, and a flush at the end.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use crate::config::KafkaSettings;

/// Records sent between two zero-timeout polls for delivery reports.
const POLL_EVERY: u64 = 1024;
/// How long to wait on a full librdkafka queue before trying again (as the shard's sink does).
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(1);
/// Added to the delivery timeout for the final flush: by then every record has either been
/// delivered or failed with a timeout, so the flush cannot need much longer.
const FLUSH_MARGIN: Duration = Duration::from_secs(10);

/// The outcome of [`produce_prebuilt`].
#[derive(Debug, Clone, PartialEq)]
pub struct CeilingReport {
    /// Records handed to the producer.
    pub records: u64,
    /// Records the broker acknowledged (the warm-up record not counted).
    pub delivered: u64,
    /// Records sent and delivered before the clock started (0 or 1); they are in the topic too.
    pub warmup: u64,
    /// Records whose delivery failed (or that were still undelivered when the flush gave up).
    pub failed: u64,
    /// From the first send to the end of the flush, after a one-record warm-up.
    pub duration: Duration,
    /// The first delivery error, if any.
    pub first_error: Option<String>,
}

impl CeilingReport {
    /// Delivered records per second.
    pub fn records_per_s(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.delivered as f64 / secs
        } else {
            0.0
        }
    }
}

/// Publishes `total` records to `settings.topic`, cycling through `records` (key, value)
/// round-robin, as fast as one producer on the calling thread can, and waits for every
/// delivery report.
///
/// The producer gets exactly [`KafkaSettings::producer_properties`], the server's settings,
/// with `client.id=stormgate-ceiling`. Records carry no explicit timestamp (librdkafka stamps
/// them when sent). Returns an error if the producer cannot be created or a record is
/// rejected outright (anything but a full queue); failed deliveries are counted instead.
pub fn produce_prebuilt(
    settings: &KafkaSettings,
    records: &[(Vec<u8>, Vec<u8>)],
    total: u64,
) -> Result<CeilingReport, KafkaError> {
    let mut config = ClientConfig::new();
    config.set("client.id", "stormgate-ceiling");
    for (k, v) in settings.producer_properties() {
        config.set(k, v);
    }
    let producer: BaseProducer<CeilingContext> =
        config.create_with_context(CeilingContext::default())?;
    if records.is_empty() && total > 0 {
        return Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::InvalidArgument,
        ));
    }

    // Warm up, as the benchmark does for the server: a fresh idempotent producer holds its
    // first records until it has a producer id (about a second against the test broker),
    // which would otherwise be counted as sending time. The warm-up record is not counted.
    if let Some((key, value)) = records.first() {
        let warmup = BaseRecord::<[u8], [u8]>::to(&settings.topic)
            .key(key.as_slice())
            .payload(value.as_slice());
        producer.send(warmup).map_err(|(e, _)| e)?;
        producer.flush(settings.delivery_timeout + FLUSH_MARGIN)?;
        producer.context().delivered.store(0, Ordering::Relaxed);
    }

    let start = Instant::now();
    let mut sent = 0u64;
    let mut next = 0usize;
    while sent < total {
        let (key, value) = &records[next];
        let record = BaseRecord::<[u8], [u8]>::to(&settings.topic)
            .key(key.as_slice())
            .payload(value.as_slice());
        match producer.send(record) {
            Ok(()) => {
                sent += 1;
                next = if next + 1 == records.len() {
                    0
                } else {
                    next + 1
                };
                if sent.is_multiple_of(POLL_EVERY) {
                    producer.poll(Duration::ZERO);
                }
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(QUEUE_FULL_WAIT);
            }
            Err((e, _)) => return Err(e),
        }
    }
    // A flush that gives up leaves records neither delivered nor failed: they count as failed.
    let flushed = producer.flush(settings.delivery_timeout + FLUSH_MARGIN);
    let context = producer.context();
    let delivered = context.delivered.load(Ordering::Relaxed);
    let mut failed = context.failed.load(Ordering::Relaxed);
    let mut first_error = context.first_error.lock().expect("poisoned").clone();
    if let Err(e) = flushed {
        failed = sent - delivered;
        first_error.get_or_insert_with(|| e.to_string());
    }
    Ok(CeilingReport {
        records: sent,
        delivered,
        warmup: u64::from(!records.is_empty()),
        failed,
        duration: start.elapsed(),
        first_error,
    })
}

/// Counts delivery reports. They arrive on the thread that polls (the caller's); atomics only
/// because rdkafka requires contexts to be `Sync`.
#[derive(Default)]
struct CeilingContext {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for CeilingContext {}

impl ProducerContext for CeilingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .expect("poisoned")
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedCluster;
    use crate::verify::{ScanEvent, ScanOptions, scan_topic};

    #[test]
    fn every_record_is_delivered_round_robin() {
        let topic = "ceiling.test";
        let cluster = EmbeddedCluster::start(topic, 4).unwrap();
        let mut settings = KafkaSettings::new(cluster.bootstrap_servers());
        settings.topic = topic.to_owned();
        let records: Vec<(Vec<u8>, Vec<u8>)> = (0..3)
            .map(|i| (format!("k{i}").into_bytes(), format!("v{i}").into_bytes()))
            .collect();
        let report = produce_prebuilt(&settings, &records, 3000).unwrap();
        assert_eq!(report.records, 3000);
        assert_eq!(report.delivered, 3000);
        assert_eq!(report.failed, 0);
        assert!(report.records_per_s() > 0.0);

        let mut per_value = [0u32; 3];
        // Plus the uncounted warm-up record, which is the first prebuilt one.
        let opts = ScanOptions {
            expect: Some(3001),
            ..ScanOptions::default()
        };
        scan_topic(&settings.brokers, topic, &opts, |e| {
            if let ScanEvent::Record(r) = e {
                let v = r.value.unwrap();
                assert_eq!(r.key.unwrap()[1], v[1], "key and value stay paired");
                per_value[usize::from(v[1] - b'0')] += 1;
            }
        })
        .unwrap();
        assert_eq!(per_value, [1001, 1000, 1000]);
    }

    #[test]
    fn an_empty_record_set_is_rejected() {
        let settings = KafkaSettings::new("127.0.0.1:1");
        assert!(produce_prebuilt(&settings, &[], 1).is_err());
    }
}
