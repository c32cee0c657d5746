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

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use glommio::channels::local_channel::LocalReceiver;

use crate::acks::ConnAcks;
use crate::gate::ReadGate;
use slab::Slab;
use stormgate_telemetry::{LogLimiter, ShardMetrics};

use crate::buffers::BufPool;
use crate::server::ShardInfo;

/// One output record, owned by its shard from the line that made it to its settlement.
#[derive(Debug)]
pub struct Record {
    /// The station's zipcode: the Kafka key. Shared with the connection's session.
    pub key: Rc<str>,
    /// The record value (JSON). Give it back with [`SinkContext::recycle`] once copied out.
    pub value: Vec<u8>,
    /// Unix milliseconds when the shard read the line.
    pub timestamp_ms: i64,
    /// Settle with this ticket, exactly once.
    pub ticket: Ticket,
    /// A rejected line for the dead-letter topic (keyed by zipcode, or by connection id before
    /// identify), not a metrics record.
    pub dead_letter: bool,
}

/// Identifies an in-flight record within its shard. Meaningless on any other shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(usize);

impl Ticket {
    /// The ticket as a plain integer, e.g. to pass through a C library as an opaque value.
    pub fn into_raw(self) -> usize {
        self.0
    }

    /// Rebuilds a ticket from [`Ticket::into_raw`].
    pub fn from_raw(raw: usize) -> Ticket {
        Ticket(raw)
    }
}

/// What finally happened to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination acknowledged it as configured (e.g. Kafka acks).
    Delivered,
    /// It will not be delivered.
    Failed(DeliveryFailure),
}

/// Why a record was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryFailure {
    /// The destination refused it or retries ran out; `reason` names the sink's error.
    #[error("delivery failed: {reason}")]
    Rejected {
        /// The sink's error, e.g. librdkafka's error name.
        reason: String,
    },
    /// Shutdown's deadline passed before it was delivered.
    #[error("shutdown deadline passed before delivery")]
    ShutdownDeadline,
    /// The disk buffer was full and `BUFFER_WHEN_FULL=drop_newest` refused it.
    #[error("disk buffer full (BUFFER_WHEN_FULL=drop_newest)")]
    BufferFull,
}

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

    /// Whether a record that fails with [`DeliveryFailure::ShutdownDeadline`] stays where it
    /// came from for the next start (a disk buffer feeds this sink): the sink must then not
    /// spill it, or it would be delivered twice.
    pub fn keeps_undelivered(&self) -> bool {
        matches!(self.ledger.stage, Stage::Log(_))
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
        self.ledger.pending.borrow().len()
    }

    /// Bytes of the values of the records in flight (their buffers' capacity, as counted
    /// against `TCP_MAX_BYTES_IN_FLIGHT`).
    pub fn in_flight_bytes(&self) -> usize {
        self.ledger.bytes.get()
    }
}

/// A shard's book of in-flight records: every record from the line that made it until the
/// sink settles it, queued or handed to the producer. Shard-local.
///
/// It also bounds them in bytes (`TCP_MAX_BYTES_IN_FLIGHT`): the queue and the per-connection
/// cap bound records by count, but a station chooses how large its records are.
pub(crate) struct Ledger {
    pending: RefCell<Slab<Pending>>,
    pub(crate) payloads: BufPool,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Shared by the ledgers of one shard (see [`Ledger::sharing_deadline`]).
    pub(crate) deadline: Rc<Cell<Option<Instant>>>,
    failure_log: LogLimiter,
    /// Value bytes of the records in `pending` (buffer capacities: what they hold in memory).
    bytes: Cell<usize>,
    /// At or above this many bytes no connection reads or opens another record; 0 = no limit.
    max_bytes: usize,
    /// Tasks waiting for `bytes` to fall back below the limit.
    byte_waiters: RefCell<Vec<Waker>>,
    /// Where this ledger sits on a record's way (see [`Stage`]).
    stage: Stage,
}

/// Where a ledger sits on a record's way to its destination.
pub(crate) enum Stage {
    /// Between the connections and the sink, with nothing in between (`BUFFER_TYPE=memory`):
    /// settling is delivery, and counted as such.
    Memory,
    /// Between the connections and the disk buffer: a record is settled once durable (or
    /// refused). Delivery is counted by the [`Stage::Log`] ledger after it.
    Durable,
    /// Between the disk buffer and the sink: settling a record reports it to its log.
    Log(crate::disk::LogLink),
}

struct Pending {
    read_at: Instant,
    flow: Option<Rc<ConnFlow>>,
    dead_letter: bool,
    /// The record value's bytes, as counted in the ledger's and the flow's byte totals.
    bytes: usize,
    /// The connection's acknowledgement window and this record's slot in it.
    ack: Option<(Rc<ConnAcks>, u64)>,
    /// For a [`Stage::Log`] ledger: which of the shard's logs holds the record, and where.
    at: Option<crate::disk::LogPlace>,
}

impl Ledger {
    pub(crate) fn new(
        metrics: Arc<ShardMetrics>,
        payloads: BufPool,
        max_bytes: usize,
        stage: Stage,
    ) -> Ledger {
        Ledger {
            pending: RefCell::new(Slab::with_capacity(1024)),
            payloads,
            metrics,
            deadline: Rc::new(Cell::new(None)),
            failure_log: LogLimiter::default(),
            bytes: Cell::new(0),
            max_bytes,
            byte_waiters: RefCell::new(Vec::new()),
            stage,
        }
    }

    /// This ledger sees the deadline `other` gets (a shard's two ledgers with a disk buffer).
    pub(crate) fn sharing_deadline(mut self, other: &Ledger) -> Ledger {
        self.deadline = Rc::clone(&other.deadline);
        self
    }

    /// The link to the shard's logs of a [`Stage::Log`] ledger.
    ///
    /// # Panics
    /// On a ledger of another stage: only the disk buffer's tasks ask, and only for the
    /// ledger they built with a link.
    pub(crate) fn log_link(&self) -> &crate::disk::LogLink {
        match &self.stage {
            Stage::Log(link) => link,
            _ => panic!("not the disk buffer's ledger"),
        }
    }

    /// Opens the entry of a record whose value holds `bytes`; the returned ticket travels
    /// with the record.
    pub(crate) fn open(
        &self,
        read_at: Instant,
        flow: Option<&Rc<ConnFlow>>,
        dead_letter: bool,
        bytes: usize,
        ack: Option<(Rc<ConnAcks>, u64)>,
    ) -> Ticket {
        if let Some(flow) = flow {
            flow.in_flight.set(flow.in_flight.get() + 1);
            flow.bytes.set(flow.bytes.get() + bytes);
        }
        self.bytes.set(self.bytes.get() + bytes);
        Ticket(self.pending.borrow_mut().insert(Pending {
            read_at,
            flow: flow.cloned(),
            dead_letter,
            bytes,
            ack,
            at: None,
        }))
    }

    /// Opens the entry of a record handed out by one of the shard's logs (a
    /// [`Stage::Log`] ledger): the ticket travels with the record to the sink.
    pub(crate) fn open_logged(
        &self,
        read_at: Instant,
        dead_letter: bool,
        at: crate::disk::LogPlace,
    ) -> Ticket {
        Ticket(self.pending.borrow_mut().insert(Pending {
            read_at,
            flow: None,
            dead_letter,
            bytes: 0,
            ack: None,
            at: Some(at),
        }))
    }

    /// Whether the record of `ticket` is waiting for an acknowledgement to its station.
    pub(crate) fn is_acked(&self, ticket: Ticket) -> bool {
        self.pending
            .borrow()
            .get(ticket.0)
            .is_some_and(|p| p.ack.is_some())
    }

    /// The record of `ticket` left memory (it was copied into the disk buffer): its bytes no
    /// longer count against the shard's and its connection's byte budgets. It stays open
    /// (and counted in records) until settled.
    pub(crate) fn release_bytes(&self, ticket: Ticket) {
        let freed = match self.pending.borrow_mut().get_mut(ticket.0) {
            Some(p) => std::mem::take(&mut p.bytes),
            None => return,
        };
        if freed == 0 {
            return;
        }
        self.bytes.set(self.bytes.get() - freed);
        self.wake_byte_waiters();
        let flow = self
            .pending
            .borrow()
            .get(ticket.0)
            .and_then(|p| p.flow.clone());
        if let Some(flow) = flow {
            flow.release_bytes(freed);
        }
    }

    fn wake_byte_waiters(&self) {
        // Waiters go once a quarter of the budget is free again, not at every settle that
        // dips under it: each wake costs every waiting connection a poll.
        if self.bytes.get() <= self.max_bytes / 4 * 3 && !self.byte_waiters.borrow().is_empty() {
            let waiters = std::mem::take(&mut *self.byte_waiters.borrow_mut());
            for w in waiters {
                w.wake();
            }
        }
    }

    /// Whether the shard holds its byte budget of records: connections must not read or
    /// open another record until [`Ledger::byte_room`].
    pub(crate) fn bytes_full(&self) -> bool {
        self.max_bytes > 0 && self.bytes.get() >= self.max_bytes
    }

    /// Wakes `waker` once the shard is back under its byte budget (at once if it is).
    pub(crate) fn wait_bytes(&self, waker: &Waker) {
        self.byte_waiters.borrow_mut().push(waker.clone());
    }

    /// Completes once the shard is under its byte budget.
    pub(crate) async fn byte_room(&self) {
        std::future::poll_fn(|cx| {
            if self.bytes_full() {
                self.wait_bytes(cx.waker());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }

    pub(crate) fn settle(&self, ticket: Ticket, outcome: Outcome) {
        let Some(p) = self.pending.borrow_mut().try_remove(ticket.0) else {
            // A sink bug: counted in release builds, where tests and benchmarks assert the
            // counter is 0, and fatal where debug assertions are on.
            self.metrics.settle_errors.incr();
            debug_assert!(false, "settled twice or unknown ticket {ticket:?}");
            return;
        };
        self.bytes.set(self.bytes.get() - p.bytes);
        self.wake_byte_waiters();
        if let Some((acks, id)) = &p.ack {
            acks.settle(*id, &outcome);
        }
        if let Stage::Log(link) = &self.stage
            && let Some(at) = p.at
            && !link.settled(at, &outcome)
        {
            // Kept in its log for a later attempt (shutdown): neither delivered nor lost.
            return;
        }
        let m = &self.metrics;
        match (outcome, p.dead_letter) {
            // Durable in the disk buffer: delivery is counted after it.
            (Outcome::Delivered, _) if matches!(self.stage, Stage::Durable) => {}
            (Outcome::Delivered, false) => {
                m.delivery_latency.record(p.read_at.elapsed());
                m.records_delivered.incr();
            }
            (Outcome::Delivered, true) => m.dead_letters_delivered.incr(),
            (Outcome::Failed(failure), dead_letter) => {
                if dead_letter {
                    m.dead_letters_failed.incr();
                } else {
                    m.delivery_latency.record(p.read_at.elapsed());
                    m.records_failed.incr();
                }
                crate::events::DeliveryFailed { failure: &failure }.emit(&self.failure_log);
            }
        }
        if let Some(flow) = p.flow {
            flow.release(p.bytes);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.borrow().len()
    }
}

/// One connection's records in flight, in count and in bytes, shared between the connection
/// task and the ledger entries of its records. Shard-local.
pub(crate) struct ConnFlow {
    /// Most records in flight; 0 = no limit.
    cap: u32,
    /// Most value bytes in flight; 0 = no limit.
    max_bytes: usize,
    in_flight: Cell<u32>,
    bytes: Cell<usize>,
    waiter: Cell<Option<Waker>>,
}

impl ConnFlow {
    pub(crate) fn new(cap: u32, max_bytes: usize) -> ConnFlow {
        ConnFlow {
            cap,
            max_bytes,
            in_flight: Cell::new(0),
            bytes: Cell::new(0),
            waiter: Cell::new(None),
        }
    }

    /// At its cap in records or in bytes: the connection must not open another record.
    pub(crate) fn is_full(&self) -> bool {
        (self.cap > 0 && self.in_flight.get() >= self.cap)
            || (self.max_bytes > 0 && self.bytes.get() >= self.max_bytes)
    }

    fn release(&self, bytes: usize) {
        self.in_flight.set(self.in_flight.get() - 1);
        self.release_bytes(bytes);
    }

    fn release_bytes(&self, bytes: usize) {
        self.bytes.set(self.bytes.get() - bytes);
        if !self.is_full()
            && let Some(w) = self.waiter.take()
        {
            w.wake();
        }
    }

    /// Completes when the connection may put another record in flight.
    pub(crate) async fn room(&self) {
        std::future::poll_fn(|cx| {
            if self.is_full() {
                self.waiter.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
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
