//! One non-blocking Kafka producer per shard.
//!
//! The shard's records arrive through its queue; the sink hands each to librdkafka with
//! `BaseProducer::send`, which never blocks: it copies the record into librdkafka's queue or
//! fails at once. `QueueFull` means librdkafka already buffers as much as it may, so the sink
//! polls, waits a millisecond and tries again, and meanwhile takes nothing from the shard
//! queue: that is how backpressure travels from the broker to the sockets.
//!
//! A shard-local poller task calls `poll(0)` every millisecond while records are in flight
//! (and sleeps until woken when none are), turning delivery reports into settlements on the
//! shard's own thread.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::timer::sleep;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;
use stormgate_shard::{
    DeliveryFailure, Notify, Outcome, Record, RecordReceiver, ShardInfo, Sink, SinkContext,
    SinkFactory, Ticket,
};
use stormgate_telemetry::{Event, LogLimiter};
use tracing::info;

use crate::config::KafkaSettings;
pub use crate::context::{ProducerStats, ProducerStatsSnapshot};
use crate::context::{Report, ShardContext};
use crate::events::SpillFailed;
use crate::spill::{SpillFile, SpillLine};

/// How often delivery reports are polled while records are in flight. It bounds the delay
/// between the broker's acknowledgement and the shard learning of it.
const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How often an idle producer is polled anyway (librdkafka error events).
const IDLE_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Upper bound on `poll(0)` calls per drain: each serves one event (a log line, an error, or
/// a batch of delivery reports), and the drain stops early once the queue is empty.
const MAX_POLLS_PER_DRAIN: usize = 64;
/// Flush budget if the queue closed without a shutdown deadline (not expected: queues close
/// only during shutdown).
const FLUSH_WITHOUT_DEADLINE: Duration = Duration::from_secs(30);
/// Longest wait, after a purge, for librdkafka to report the purged records: the purge does
/// not wait for the broker threads (`non_blocking`), which report them within milliseconds.
/// Bounds how far past `SHUTDOWN_TIMEOUT` the sink may run.
const PURGE_REPORTS_WAIT: Duration = Duration::from_millis(500);

/// Where spill files go unless configured (relative to the working directory).
pub const DEFAULT_SPILL_DIR: &str = "spill";

/// Builds one [`KafkaSink`] per shard from shared settings.
#[derive(Debug, Clone)]
pub struct KafkaSinkFactory {
    settings: KafkaSettings,
    spill_dir: PathBuf,
    stats: ProducerStatsByShard,
}

/// Every shard's [`ProducerStats`], added as the factory builds each shard's producer.
///
/// Cloning shares the set. The lock is taken once per shard at startup and by readers; a
/// shard never takes it afterwards (it writes its own `ProducerStats`, through atomics).
#[derive(Debug, Clone, Default)]
pub struct ProducerStatsByShard(Arc<Mutex<Vec<Arc<ProducerStats>>>>);

impl ProducerStatsByShard {
    /// The producers built so far, by shard id.
    pub fn shards(&self) -> Vec<Arc<ProducerStats>> {
        let mut v = match self.0.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        v.sort_by_key(|s| s.shard_id());
        v
    }

    fn add(&self, stats: Arc<ProducerStats>) {
        match self.0.lock() {
            Ok(mut v) => v.push(stats),
            Err(poisoned) => poisoned.into_inner().push(stats),
        }
    }
}

impl KafkaSinkFactory {
    /// A factory for producers with these settings, spilling to [`DEFAULT_SPILL_DIR`].
    pub fn new(settings: KafkaSettings) -> KafkaSinkFactory {
        KafkaSinkFactory {
            settings,
            spill_dir: PathBuf::from(DEFAULT_SPILL_DIR),
            stats: ProducerStatsByShard::default(),
        }
    }

    /// Spill files go to `dir` (see [`crate::spill`]).
    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> KafkaSinkFactory {
        self.spill_dir = dir.into();
        self
    }

    /// The settings every producer gets.
    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// The statistics of the producers this factory (or a clone of it) builds: keep this
    /// before handing the factory to the server, and read it once the shards run.
    pub fn producer_stats(&self) -> ProducerStatsByShard {
        self.stats.clone()
    }
}

impl SinkFactory for KafkaSinkFactory {
    type Sink = KafkaSink;

    fn build(
        &self,
        shard: &ShardInfo,
    ) -> Result<KafkaSink, Box<dyn std::error::Error + Send + Sync>> {
        let stats = Arc::new(ProducerStats::new(
            shard.id,
            self.settings.idempotence,
            self.settings.statistics_interval(),
        ));
        let producer: BaseProducer<ShardContext> = self
            .settings
            .shard_client_config(shard.id)
            .create_with_context(ShardContext::new(shard.id, Arc::clone(&stats)))?;
        self.stats.add(stats);
        Ok(KafkaSink {
            producer,
            topic: self.settings.topic.clone(),
            dlq_topic: self.settings.dlq_topic.clone(),
            shard_id: shard.id,
            spill: SpillFile::new(&self.spill_dir, shard.id),
        })
    }
}

/// A shard's Kafka producer. Lives on its shard only.
pub struct KafkaSink {
    producer: BaseProducer<ShardContext>,
    topic: String,
    dlq_topic: Option<String>,
    shard_id: usize,
    spill: SpillFile,
}

impl Sink for KafkaSink {
    async fn run(self, records: RecordReceiver, ctx: SinkContext) {
        let shard_id = self.shard_id;
        let sink = Rc::new(Running {
            producer: Arc::new(self.producer),
            topic: self.topic,
            dlq_topic: self.dlq_topic,
            shard_id,
            ctx,
            spill: RefCell::new(self.spill),
            spill_log: LogLimiter::default(),
            unsettled: RefCell::new(Vec::new()),
            reports: RefCell::new(Vec::with_capacity(1024)),
            wake: Notify::default(),
            done: Cell::new(false),
            purged: Cell::new(false),
        });
        let poller = glommio::spawn_local(poll_loop(Rc::clone(&sink)));
        while let Some(record) = records.recv().await {
            sink.produce(record).await;
        }
        sink.flush().await;
        sink.done.set(true);
        sink.wake.notify();
        poller.await;
        info!(shard = shard_id, "producer flushed");
    }
}

struct Running {
    /// Shared only with the helper thread of [`Running::flush`].
    producer: Arc<BaseProducer<ShardContext>>,
    topic: String,
    /// Where dead-letter records go.
    dlq_topic: Option<String>,
    shard_id: usize,
    ctx: SinkContext,
    /// Where finally failed records go.
    spill: RefCell<SpillFile>,
    spill_log: LogLimiter,
    /// Failed records whose spill lines are pushed but not yet written: settled by the next
    /// [`Running::flush_spill`], so that a batch of failures costs one `fdatasync`.
    unsettled: RefCell<Vec<(Ticket, Outcome)>>,
    /// Reused buffer for reports taken from the context.
    reports: RefCell<Vec<Report>>,
    /// Wakes the poller when records go in flight after it went idle.
    wake: Notify,
    done: Cell<bool>,
    /// librdkafka's queues were purged at the shutdown deadline.
    purged: Cell<bool>,
}

impl Running {
    async fn produce(&self, record: Record) {
        if self.past_deadline() {
            // Shutdown's deadline passed: what connections still hand over goes straight to
            // the spill file, so that they (and the shard's drain) are not kept waiting on a
            // broker that may never answer.
            let topic = self.topic_of(&record).unwrap_or(&self.topic);
            self.fail_unsent(topic, &record, DeliveryFailure::ShutdownDeadline);
            self.ctx.recycle(record.value);
            return;
        }
        let Some(topic) = self.topic_of(&record) else {
            let reason = "dead-letter record without a dead-letter topic".to_owned();
            self.fail_unsent(&self.topic, &record, DeliveryFailure::Rejected { reason });
            self.ctx.recycle(record.value);
            return;
        };
        loop {
            let r = BaseRecord::<str, [u8], usize>::with_opaque_to(topic, record.ticket.into_raw())
                .key(&record.key)
                .payload(&record.value)
                .timestamp(record.timestamp_ms);
            match self.producer.send(r) {
                Ok(()) => {
                    if !record.dead_letter {
                        self.ctx.metrics().records_produced.incr();
                    }
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if self.past_deadline() {
                        self.fail_unsent(topic, &record, DeliveryFailure::ShutdownDeadline);
                        break;
                    }
                    self.drain_reports();
                    sleep(POLL_INTERVAL).await;
                }
                Err((e, _)) => {
                    let failure = DeliveryFailure::Rejected {
                        reason: e.to_string(),
                    };
                    self.fail_unsent(topic, &record, failure);
                    break;
                }
            }
        }
        self.ctx.recycle(record.value);
        self.wake.notify();
    }

    /// Polls librdkafka until it has no more events ready and settles every delivery report.
    fn drain_reports(&self) {
        let context = self.producer.context();
        for _ in 0..MAX_POLLS_PER_DRAIN {
            let before = context.callbacks();
            self.producer.poll(Duration::ZERO);
            if context.callbacks() == before {
                break;
            }
        }
        let mut reports = self.reports.borrow_mut();
        context.take_reports(&mut reports);
        let keeps = self.ctx.keeps_undelivered();
        for report in reports.drain(..) {
            let ticket = Ticket::from_raw(report.ticket);
            let outcome = outcome(report.result);
            let kept = keeps && outcome == Outcome::Failed(DeliveryFailure::ShutdownDeadline);
            match &report.spill {
                // Purged at the deadline but kept upstream (the disk buffer): not spilled.
                Some(_) if kept => self.ctx.settle(ticket, outcome),
                Some(line) => {
                    self.spill.borrow_mut().push(line);
                    self.unsettled.borrow_mut().push((ticket, outcome));
                }
                None => self.ctx.settle(ticket, outcome),
            }
        }
        self.flush_spill();
    }

    /// Fails a record librdkafka never took: its spill line is written, and the record
    /// settled, by the poller's next drain (within a poll interval), together with any
    /// others failed meanwhile.
    fn fail_unsent(&self, topic: &str, record: &Record, failure: DeliveryFailure) {
        if failure == DeliveryFailure::ShutdownDeadline && self.ctx.keeps_undelivered() {
            // Kept upstream (the disk buffer) for the next start: not spilled.
            self.unsettled
                .borrow_mut()
                .push((record.ticket, Outcome::Failed(failure)));
            self.wake.notify();
            return;
        }
        let line = SpillLine::new(
            failure.to_string(),
            Some(self.shard_id),
            topic,
            Some(record.key.as_bytes()),
            Some(record.timestamp_ms),
            Some(&record.value),
        );
        self.spill.borrow_mut().push(&line);
        self.unsettled
            .borrow_mut()
            .push((record.ticket, Outcome::Failed(failure)));
        self.wake.notify();
    }

    /// Writes what was pushed to the spill file and counts it (a write error loses those
    /// records, which is counted and logged), then settles the records it holds.
    fn flush_spill(&self) {
        self.write_spill();
        for (ticket, outcome) in self.unsettled.borrow_mut().drain(..) {
            self.ctx.settle(ticket, outcome);
        }
    }

    fn write_spill(&self) {
        let mut spill = self.spill.borrow_mut();
        let pending = spill.pending();
        if pending == 0 {
            return;
        }
        let metrics = self.ctx.metrics();
        match spill.flush() {
            Ok(n) => metrics.records_spilled.add(n),
            Err(error) => SpillFailed {
                shard: self.shard_id,
                path: spill.path(),
                records: pending,
                error: &error,
            }
            .emit(metrics, &self.spill_log),
        }
    }

    /// Delivers what librdkafka still holds, within the shutdown deadline; then purges the
    /// rest, which librdkafka reports as failed deliveries.
    ///
    /// librdkafka sends without waiting out `linger.ms` only while some thread is inside
    /// `rd_kafka_flush` (`rk_flushing` > 0). rdkafka's `Producer::flush` calls it with a zero
    /// timeout between polls, which leaves that window too short for the broker threads to
    /// notice (a record lingering for a minute stays there). So a short-lived helper thread
    /// sits in `rd_kafka_flush` for the remaining time, while the shard keeps polling and
    /// settling delivery reports, which is what lets that flush return.
    async fn flush(&self) {
        self.drain_reports();
        if self.producer.in_flight_count() == 0 {
            return;
        }
        let remaining = self.ctx.deadline().map_or(FLUSH_WITHOUT_DEADLINE, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let producer = Arc::clone(&self.producer);
        let timeout_ms = i32::try_from(remaining.as_millis()).unwrap_or(i32::MAX);
        let helper = std::thread::Builder::new()
            .name("stormgate-flush".into())
            .spawn(move || {
                // SAFETY: the handle stays valid while this thread holds `producer`.
                unsafe {
                    rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), timeout_ms)
                };
            });
        while self.producer.in_flight_count() > 0 && !self.past_deadline() {
            sleep(POLL_INTERVAL).await;
            self.drain_reports();
        }
        if self.producer.in_flight_count() > 0 {
            self.purged.set(false);
            self.purge_at_deadline();
            let give_up = Instant::now() + PURGE_REPORTS_WAIT;
            while self.producer.in_flight_count() > 0 && Instant::now() < give_up {
                sleep(POLL_INTERVAL).await;
                self.drain_reports();
            }
        }
        // Returns at once: nothing is left to wait for (or its timeout, the deadline, passed).
        if let Ok(helper) = helper {
            let _ = helper.join();
        }
    }

    fn past_deadline(&self) -> bool {
        self.ctx.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// The topic a record goes to, `None` for a dead letter without a dead-letter topic.
    fn topic_of(&self, record: &Record) -> Option<&str> {
        match (record.dead_letter, &self.dlq_topic) {
            (false, _) => Some(&self.topic),
            (true, dlq) => dlq.as_deref(),
        }
    }

    /// At the shutdown deadline, whatever the broker does: purges librdkafka's queues once,
    /// so that every record it holds is reported failed (and spilled) by the next drains.
    ///
    /// Without this the purge waited for the queue to close, which waits for every
    /// connection to end, while connections waited for room or answers that only a purge
    /// gives during an outage: the process overran `SHUTDOWN_TIMEOUT` until its supervisor
    /// killed it, losing what it held.
    fn purge_at_deadline(&self) {
        if self.purged.get() || !self.past_deadline() || self.producer.in_flight_count() == 0 {
            return;
        }
        self.purged.set(true);
        // Non-blocking: a blocking purge waits for every broker thread to empty its queues,
        // on the shard's thread, stalling every connection of the shard meanwhile.
        self.producer
            .purge(PurgeConfig::default().queue().inflight().non_blocking());
    }
}

fn outcome(result: Result<(), RDKafkaErrorCode>) -> Outcome {
    match result {
        Ok(()) => Outcome::Delivered,
        Err(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => {
            Outcome::Failed(DeliveryFailure::ShutdownDeadline)
        }
        Err(code) => Outcome::Failed(DeliveryFailure::Rejected {
            reason: format!("{code:?}: {code}"),
        }),
    }
}

async fn poll_loop(sink: Rc<Running>) {
    loop {
        sink.purge_at_deadline();
        sink.drain_reports();
        if sink.done.get() && sink.producer.in_flight_count() == 0 {
            return;
        }
        if sink.producer.in_flight_count() > 0 {
            sleep(POLL_INTERVAL).await;
        } else {
            future::or(sink.wake.notified(), sleep(IDLE_POLL_INTERVAL)).await;
        }
    }
}
