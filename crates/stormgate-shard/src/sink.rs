//! The contract between a shard and where its records go.
//!
//! Connection tasks turn metrics lines into [`Record`]s and push them into the shard's bounded
//! queue. The shard's [`Sink`] takes them from the [`RecordReceiver`], delivers them, and
//! reports each one's fate with [`SinkContext::settle`], exactly once per record. Until then
//! the record is *in flight*: the shard's ledger remembers when its line was read (for the
//! latency histogram) and which connection is waiting on it (for per-connection limits).
//!
//! Backpressure is the queue's bound: when the sink stops taking records, the queue fills,
//! connection tasks wait to push, and they stop reading their sockets. Nothing is dropped.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use glommio::channels::local_channel::LocalReceiver;
use stormgate_telemetry::ShardMetrics;

use crate::contract::{Outcome, Record, ShardInfo, Ticket};
use crate::gate::ReadGate;
use crate::ledger::Ledger;

/// Builds one sink per shard.
///
/// `build` runs on the shard's own thread, after its executor exists and before it accepts
/// connections, so the sink never leaves that thread.
pub trait SinkFactory: Send + Sync + 'static {
    /// The per-shard sink.
    type Sink: Sink;

    /// Builds shard `shard`'s sink. An error stops the server from starting.
    fn build(
        &self,
        shard: &ShardInfo,
    ) -> Result<Self::Sink, Box<dyn std::error::Error + Send + Sync>>;
}

/// Delivers one shard's records. Lives and runs on that shard only.
pub trait Sink: 'static {
    /// Takes records until the queue closes (every connection has finished), settles every
    /// record it took, then returns. After [`SinkContext::deadline`] it must stop waiting on
    /// its destination and settle what is left as failed.
    fn run(self, records: RecordReceiver, ctx: SinkContext) -> impl Future<Output = ()> + 'static;
}

/// The receiving end of a shard's record queue.
pub struct RecordReceiver {
    rx: LocalReceiver<Record>,
    gate: Rc<ReadGate>,
}

impl RecordReceiver {
    pub(crate) fn new(rx: LocalReceiver<Record>, gate: Rc<ReadGate>) -> RecordReceiver {
        RecordReceiver { rx, gate }
    }

    /// The next record, or `None` once the queue is closed and empty.
    pub async fn recv(&self) -> Option<Record> {
        let record = self.rx.recv().await;
        if record.is_some() {
            self.gate.dequeued();
        }
        record
    }
}

impl Drop for RecordReceiver {
    /// No sink will take records any more: parked connections must not wait for it.
    fn drop(&mut self) {
        self.gate.close();
    }
}

/// A sink's handle on its shard: settle records, recycle buffers, read the deadline.
#[derive(Clone)]
pub struct SinkContext {
    ledger: Rc<Ledger>,
}

impl SinkContext {
    pub(crate) fn new(ledger: Rc<Ledger>) -> SinkContext {
        SinkContext { ledger }
    }

    /// Reports a record's fate. Call exactly once per ticket.
    pub fn settle(&self, ticket: Ticket, outcome: Outcome) {
        self.ledger.settle(ticket, outcome);
    }

    /// Gives a record's value buffer back to the shard once its bytes were copied out.
    pub fn recycle(&self, buf: Vec<u8>) {
        self.ledger.payloads.give(buf);
    }

    /// Whether a record that fails with [`DeliveryFailure::ShutdownDeadline`](crate::DeliveryFailure::ShutdownDeadline) stays where it
    /// came from for the next start (a disk buffer feeds this sink): the sink must then not
    /// spill it, or it would be delivered twice.
    pub fn keeps_undelivered(&self) -> bool {
        self.ledger.feeds_from_log()
    }

    /// When delivery must stop being attempted: set once shutdown begins.
    pub fn deadline(&self) -> Option<Instant> {
        self.ledger.deadline.get()
    }

    /// This shard's metrics.
    pub fn metrics(&self) -> &Arc<ShardMetrics> {
        &self.ledger.metrics
    }

    /// Records taken from the queue or still in it, not yet settled.
    pub fn in_flight(&self) -> usize {
        self.ledger.len()
    }

    /// Bytes of the values of the records in flight (their buffers' capacity, as counted
    /// against `TCP_MAX_BYTES_IN_FLIGHT`).
    pub fn in_flight_bytes(&self) -> usize {
        self.ledger.bytes()
    }
}

/// A sink that settles every record as delivered the moment it takes it: parsing and
/// networking measured without a broker (`--sink null`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl Sink for NullSink {
    async fn run(self, records: RecordReceiver, ctx: SinkContext) {
        while let Some(record) = records.recv().await {
            ctx.recycle(record.value);
            ctx.settle(record.ticket, Outcome::Delivered);
        }
    }
}

/// Builds a [`NullSink`] per shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSinkFactory;

impl SinkFactory for NullSinkFactory {
    type Sink = NullSink;

    fn build(&self, _: &ShardInfo) -> Result<NullSink, Box<dyn std::error::Error + Send + Sync>> {
        Ok(NullSink)
    }
}
