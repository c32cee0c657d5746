//! A shard's ledger of in-flight records, and each connection's share of it.
//!
//! Every record is in a ledger from the line that made it until its settlement: when it was
//! read (for the latency histogram), which connection waits on it (for that connection's
//! caps and acknowledgements), and how many bytes of memory its value holds (for the shard's
//! byte budget). A shard has one ledger, or two with the disk buffer (see [`Stage`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use slab::Slab;
use stormgate_buffer::Log;
use stormgate_telemetry::{LogLimiter, ShardMetrics};

use crate::acks::ConnectionAcks;
use crate::buffers::BufPool;
use crate::contract::{DeliveryFailure, Outcome, Ticket};
use crate::events::DeliveryFailed;
use stormgate_telemetry::Event;

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
    Log(LogLink),
}

/// What a connection's record opens its ledger entry with ([`Ledger::open`]).
pub(crate) struct Entry<'a> {
    /// When its line was read.
    pub(crate) read_at: Instant,
    /// Its connection's in-flight caps, when it has any.
    pub(crate) flow: Option<&'a Rc<ConnectionFlow>>,
    /// A rejected line for the dead-letter topic, not a metrics record.
    pub(crate) dead_letter: bool,
    /// The bytes its value holds.
    pub(crate) bytes: usize,
    /// Its connection's acknowledgement window and its slot there, when it is acknowledged.
    pub(crate) ack: Option<(Rc<ConnectionAcks>, u64)>,
}

struct Pending {
    read_at: Instant,
    flow: Option<Rc<ConnectionFlow>>,
    dead_letter: bool,
    /// The record value's bytes, as counted in the ledger's and the flow's byte totals.
    bytes: usize,
    /// The connection's acknowledgement window and this record's slot in it.
    ack: Option<(Rc<ConnectionAcks>, u64)>,
    /// For a [`Stage::Log`] ledger: which of the shard's logs holds the record, and where.
    at: Option<LogPlace>,
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
    pub(crate) fn log_link(&self) -> &LogLink {
        match &self.stage {
            Stage::Log(link) => link,
            _ => panic!("not the disk buffer's ledger"),
        }
    }

    /// Opens the entry of a record whose value holds `bytes`; the returned ticket travels
    /// with the record.
    pub(crate) fn open(&self, entry: Entry<'_>) -> Ticket {
        let Entry {
            read_at,
            flow,
            dead_letter,
            bytes,
            ack,
        } = entry;
        if let Some(flow) = flow {
            flow.in_flight.set(flow.in_flight.get() + 1);
            flow.bytes.set(flow.bytes.get() + bytes);
        }
        self.bytes.set(self.bytes.get() + bytes);
        Ticket::from_raw(self.pending.borrow_mut().insert(Pending {
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
    pub(crate) fn open_logged(&self, read_at: Instant, dead_letter: bool, at: LogPlace) -> Ticket {
        Ticket::from_raw(self.pending.borrow_mut().insert(Pending {
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
            .get(ticket.into_raw())
            .is_some_and(|p| p.ack.is_some())
    }

    /// The record of `ticket` left memory (it was copied into the disk buffer): its bytes no
    /// longer count against the shard's and its connection's byte budgets. It stays open
    /// (and counted in records) until settled.
    pub(crate) fn release_bytes(&self, ticket: Ticket) {
        let freed = match self.pending.borrow_mut().get_mut(ticket.into_raw()) {
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
            .get(ticket.into_raw())
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
        let Some(p) = self.pending.borrow_mut().try_remove(ticket.into_raw()) else {
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
            (Outcome::Delivered, dead_letter) if matches!(self.stage, Stage::Durable) => {
                if !dead_letter {
                    m.durable_latency.record(p.read_at.elapsed());
                }
            }
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
                DeliveryFailed { failure: &failure }.log_limited(&self.failure_log);
            }
        }
        if let Some(flow) = p.flow {
            flow.release(p.bytes);
        }
    }

    /// Records open in this ledger (queued or handed to the sink), not yet settled.
    pub(crate) fn len(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Value bytes of the records open in this ledger, as counted against its budget.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.get()
    }

    /// Whether this ledger's records come from a disk buffer (a [`Stage::Log`] ledger).
    pub(crate) fn feeds_from_log(&self) -> bool {
        matches!(self.stage, Stage::Log(_))
    }
}

/// One connection's records in flight, in count and in bytes, shared between the connection
/// task and the ledger entries of its records. Shard-local.
pub(crate) struct ConnectionFlow {
    /// Most records in flight; 0 = no limit.
    cap: u32,
    /// Most value bytes in flight; 0 = no limit.
    max_bytes: usize,
    in_flight: Cell<u32>,
    bytes: Cell<usize>,
    waiter: Cell<Option<Waker>>,
}

impl ConnectionFlow {
    pub(crate) fn new(cap: u32, max_bytes: usize) -> ConnectionFlow {
        ConnectionFlow {
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

/// Where a record handed out by one of a shard's logs lives: the log (0 is the shard's own,
/// then the adopted ones) and its sequence number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogPlace {
    pub(crate) log: u32,
    pub(crate) seq: u64,
}

/// What the sink's ledger needs to report records to their logs.
pub(crate) struct LogLink {
    pub(crate) logs: Vec<Log>,
    /// The stage's ledger: acknowledged records waiting for delivery are settled there.
    stage: Rc<Ledger>,
    /// With `TCP_ACK_AFTER=delivered`: the stage's tickets of acknowledged records, by their
    /// sequence number in the shard's own log.
    pub(crate) awaiting: RefCell<HashMap<u64, Ticket>>,
}

impl LogLink {
    /// The link of a shard's `logs` (its own first, then the adopted ones) to its `stage`
    /// ledger.
    pub(crate) fn new(logs: Vec<Log>, stage: Rc<Ledger>) -> LogLink {
        LogLink {
            logs,
            stage,
            awaiting: RefCell::new(HashMap::new()),
        }
    }

    /// Reports a record's fate to its log; false if it stays there for a later attempt.
    pub(crate) fn settled(&self, at: LogPlace, outcome: &Outcome) -> bool {
        let kept = matches!(outcome, Outcome::Failed(DeliveryFailure::ShutdownDeadline));
        if !kept {
            self.logs[at.log as usize].done(at.seq);
        }
        if at.log == 0 {
            let waiting = self.awaiting.borrow_mut().remove(&at.seq);
            if let Some(ticket) = waiting {
                self.stage.settle(ticket, outcome.clone());
            }
        }
        !kept
    }
}
