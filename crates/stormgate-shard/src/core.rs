//! What every task of one shard shares: its settings and metrics, its ledgers, its read
//! buffer and parser, the table of its open connections' sockets (read deadlines, drain), and
//! the process-wide connection counts checked at accept.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::timer::sleep;
use slab::Slab;
use stormgate_protocol::LineParser;
use stormgate_telemetry::{LogLimiter, ShardMetrics};

use crate::buffers::{BufPool, PoolSize, ReadBuf};
use crate::config::RuntimeConfig;
use crate::gate::ReadGate;
use crate::ledger::Ledger;
use crate::readiness::{self, Readiness};
use crate::signal::Signal;

/// How often a shard checks the process's stop flag and its connections' read deadlines,
/// refreshes its gauges and beats its heartbeat (what `/healthz` judges).
pub const TICK: Duration = Duration::from_millis(20);
/// Leftover buffers: 1 KiB to start (a partial line plus parse padding), at most 1024 kept
/// per shard. One that grew past 4 KiB (a blocked connection keeping a read's worth of lines)
/// is freed when emptied, not pooled: a pooled 64 KiB buffer would later hold some busy
/// connection's 100-byte partial line, and 10,000 of those are 640 MiB.
const LEFTOVER_POOL: PoolSize = PoolSize {
    initial: 1024,
    max_capacity: 4 * 1024,
    max_kept: 1024,
};

/// State shared by every task of one shard. Shard-local: lives in an `Rc`, never crosses
/// threads; `RefCell`s are only borrowed between awaits.
pub(crate) struct ShardCore {
    pub(crate) config: Arc<RuntimeConfig>,
    pub(crate) metrics: Arc<ShardMetrics>,
    pub(crate) ledger: Rc<Ledger>,
    /// With a disk buffer: the ledger of the records between the log and the sink.
    pub(crate) sink_ledger: Option<Rc<Ledger>>,
    pub(crate) parser: RefCell<LineParser>,
    pub(crate) read_buf: RefCell<ReadBuf>,
    pub(crate) leftovers: BufPool,
    pub(crate) limits: Arc<ConnectionLimit>,
    pub(crate) logs: Logs,
    /// Fired when shutdown begins: stop accepting, stop reading.
    pub(crate) draining: Signal,
    /// Set once the sink finished: housekeeping ends (it holds the core, and with it the
    /// disk buffer's files and their locks).
    pub(crate) stopped: Cell<bool>,
    /// Parks connections before they read while the record queue is full.
    pub(crate) gate: Rc<ReadGate>,
    /// The shard's epoll instance, which every station socket is registered with, and the
    /// wakers of the connections waiting on their sockets.
    pub(crate) readiness: Rc<Readiness>,
    /// Open connections' sockets and read deadlines: shutdown wakes and ends them through
    /// it, and the housekeeping tick expires the ones past their deadline (`expire_overdue`).
    sockets: RefCell<Slab<Socket>>,
    /// No socket's deadline is earlier than this (it may be later than all of them: the
    /// ones it came from may have moved on). `None`: no deadline at all.
    next_deadline: Cell<Option<Instant>>,
    /// The drain waiting for the last connection to leave (`sockets` to empty).
    all_closed: RefCell<Option<Waker>>,
    /// With dead letters on, a copy of the line being parsed (simd-json parses in place).
    pub(crate) raw_line: RefCell<Vec<u8>>,
}

/// Per-shard log rate limits, one per event that can repeat at line rate.
#[derive(Default)]
pub(crate) struct Logs {
    pub(crate) line_rejected: LogLimiter,
    pub(crate) auth_failed: LogLimiter,
    pub(crate) tls_failed: LogLimiter,
    pub(crate) connection_rejected: LogLimiter,
    pub(crate) accept_failed: LogLimiter,
}

impl ShardCore {
    /// A shard's core, before any connection: `ledger` takes the connections' records,
    /// `sink_ledger` (with a disk buffer) the records between the log and the sink.
    pub(crate) fn new(
        config: Arc<RuntimeConfig>,
        metrics: Arc<ShardMetrics>,
        limits: Arc<ConnectionLimit>,
        ledger: Rc<Ledger>,
        sink_ledger: Option<Rc<Ledger>>,
    ) -> io::Result<ShardCore> {
        // A write blocked for the idle timeout is a station that stopped reading its replies.
        let write_timeout = config.idle_timeout.filter(|d| !d.is_zero());
        Ok(ShardCore {
            readiness: Rc::new(Readiness::new(write_timeout)?),
            read_buf: RefCell::new(ReadBuf::new(config.read_buffer_bytes)),
            parser: RefCell::new(LineParser::new()),
            leftovers: BufPool::new(LEFTOVER_POOL),
            logs: Logs::default(),
            draining: Signal::default(),
            stopped: Cell::new(false),
            gate: Rc::new(ReadGate::new(config.queue_size)),
            sockets: RefCell::new(Slab::new()),
            next_deadline: Cell::new(None),
            all_closed: RefCell::new(None),
            raw_line: RefCell::new(Vec::new()),
            ledger,
            sink_ledger,
            config,
            metrics,
            limits,
        })
    }

    /// Registers an open connection's socket until [`ShardCore::deregister`].
    pub(crate) fn register(&self, socket: &readiness::Socket) -> Registration {
        let key = self.sockets.borrow_mut().insert(Socket {
            fd: socket.as_raw_fd(),
            readiness: socket.key(),
            deadline: None,
            expired: false,
            // A connection whose task starts after the drain began (accepted just before
            // the listener closed) is ended at once.
            drained: self.draining.is_fired(),
        });
        Registration { key }
    }

    /// Removes a connection's socket from the table (the connection is ending); wakes the
    /// drain when it was the last.
    pub(crate) fn deregister(&self, registration: &Registration) {
        let mut sockets = self.sockets.borrow_mut();
        sockets.remove(registration.key);
        if sockets.is_empty()
            && let Some(drain) = self.all_closed.borrow_mut().take()
        {
            drain.wake();
        }
    }

    /// Expires every connection whose read deadline has passed: marks it and ends its reads
    /// (`Readiness::end_reads`), so that its read returns end-of-file and the connection
    /// closes with its timeout's error line (`idle_timeout`, `line_timeout`). Scans the
    /// table only when the earliest deadline may have passed.
    ///
    /// This replaces a timer per pending read: glommio keeps one in its timer tree for
    /// every read with a timeout, inserted and removed at each read that waits, and holding
    /// ~130 bytes per idle connection. Here a deadline is a field, and the timeouts are as
    /// precise as the housekeeping tick (20 ms), which is plenty for limits in seconds.
    pub(crate) fn expire_overdue(&self, now: Instant) {
        if self.next_deadline.get().is_none_or(|t| t > now) {
            return;
        }
        let mut next: Option<Instant> = None;
        for (_, socket) in self.sockets.borrow_mut().iter_mut() {
            match socket.deadline {
                Some(_) if socket.expired => {}
                Some(d) if d <= now => {
                    socket.expired = true;
                    self.readiness.end_reads(socket.readiness);
                }
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        self.next_deadline.set(next);
    }

    /// Completes once no connection is open: every connection task has ended (and
    /// deregistered, whether it returned, panicked or was dropped).
    pub(crate) async fn all_closed(&self) {
        poll_fn(|cx| {
            if self.sockets.borrow().is_empty() {
                Poll::Ready(())
            } else {
                *self.all_closed.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }

    /// Ends every connection as shutdown begins, over `TCP_DRAIN_PERIOD`: each at a moment
    /// drawn uniformly from the period (all at once when it is zero), never past
    /// `deadline`. Ending one marks it drained and ends its reads (`Readiness::end_reads`):
    /// its read returns end-of-file, and it handles what it had read, answers, tells the
    /// station `reconnect` and closes; its socket's read side stays open (see
    /// `Readiness::end_reads`). The moments are taken in housekeeping ticks, so a period
    /// costs a sleep per tick, not a timer per connection. Returns once every connection was
    /// told (or had left).
    pub(crate) async fn drain_connections(&self, deadline: Instant) {
        let period = self.config.drain_period;
        let start = Instant::now();
        // Latest first: the due ones are popped off the end.
        let mut due: Vec<(Duration, usize)> = self
            .sockets
            .borrow()
            .iter()
            .map(|(key, _)| (period.mul_f64(fastrand::f64()), key))
            .collect();
        due.sort_unstable_by_key(|&(at, _)| std::cmp::Reverse(at));
        while let Some(&(at, _)) = due.last() {
            let now = Instant::now();
            if start + at > now && now < deadline {
                let wake = (start + at).min(deadline);
                sleep(wake.saturating_duration_since(now).max(TICK)).await;
            }
            let now = Instant::now();
            while let Some(&(at, key)) = due.last() {
                if start + at > now && now < deadline {
                    break;
                }
                due.pop();
                self.drain_one(key);
            }
        }
    }

    /// Marks connection `key` drained and ends its reads (nothing if it has left).
    fn drain_one(&self, key: usize) {
        if let Some(socket) = self.sockets.borrow_mut().get_mut(key)
            && !socket.drained
        {
            socket.drained = true;
            self.readiness.end_reads(socket.readiness);
        }
    }

    /// At the deadline: shuts down both directions of every connection still open (drained
    /// or not), so that one stuck writing to a station that does not read ends too.
    pub(crate) fn shut_down_all_sockets(&self) {
        for (_, socket) in self.sockets.borrow_mut().iter_mut() {
            socket.drained = true;
            // SAFETY: the fd belongs to a live connection (it deregisters before closing).
            unsafe { libc::shutdown(socket.fd, libc::SHUT_RDWR) };
        }
    }
}

/// An open connection as the shard's table knows it.
struct Socket {
    fd: RawFd,
    /// Its key in the shard's readiness table, to end its reads.
    readiness: u32,
    /// The connection must have read again by then, or it is expired.
    deadline: Option<Instant>,
    /// Past its deadline: its reads end.
    expired: bool,
    /// Shutdown reached it (see `ShardCore::drain_connections`): its reads end, and it is to
    /// tell its station `reconnect` and close.
    drained: bool,
}

/// A connection's entry in its shard's socket table. The connection removes it when it
/// ends, whether it returned, panicked or was dropped (see `Connection`'s `Drop`).
pub(crate) struct Registration {
    key: usize,
}

impl Registration {
    /// The connection must read again by `deadline` (`None`: no limit), or be expired.
    pub(crate) fn set_deadline(&self, core: &ShardCore, deadline: Option<Instant>) {
        if let Some(socket) = core.sockets.borrow_mut().get_mut(self.key) {
            socket.deadline = deadline;
        }
        if let Some(d) = deadline
            && core.next_deadline.get().is_none_or(|next| d < next)
        {
            core.next_deadline.set(Some(d));
        }
    }

    /// Whether shutdown reached the connection (see `ShardCore::drain_connections`): the end
    /// of stream it reads is the server stopping, not the station leaving.
    pub(crate) fn drained(&self, core: &ShardCore) -> bool {
        core.sockets
            .borrow()
            .get(self.key)
            .is_some_and(|socket| socket.drained)
    }

    /// Whether the connection was expired (see `ShardCore::expire_overdue`): the end of
    /// stream it reads is a timeout, not the station leaving.
    pub(crate) fn expired(&self, core: &ShardCore) -> bool {
        core.sockets
            .borrow()
            .get(self.key)
            .is_some_and(|socket| socket.expired)
    }
}

/// Source-address slots of the per-source count: addresses that hash to the same slot share
/// one count (and so, rarely, one limit). 64 Ki slots × 4 bytes = 256 KiB per process.
const SOURCE_SLOTS: usize = 1 << 16;

/// The process-wide connection counts, checked at accept: all connections, and connections
/// per source address. The only values shards share on the connection path, all atomics,
/// touched once when a connection opens and once when it closes, never per line.
#[derive(Debug)]
pub(crate) struct ConnectionLimit {
    pub(crate) max: usize,
    open: AtomicUsize,
    /// Most connections from one source address; 0 = no limit (then no table).
    pub(crate) max_per_source: u32,
    per_source: Box<[AtomicU32]>,
}

impl ConnectionLimit {
    pub(crate) fn new(max: usize, max_per_source: u32) -> ConnectionLimit {
        let slots = if max_per_source > 0 { SOURCE_SLOTS } else { 0 };
        ConnectionLimit {
            max,
            open: AtomicUsize::new(0),
            max_per_source,
            per_source: (0..slots).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Counts a connection from `source` in; `Err` names the limit it would exceed.
    pub(crate) fn try_acquire(&self, source: IpAddr) -> Result<(), (&'static str, usize)> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(("process", self.max));
        }
        if let Some(slot) = self.slot(source)
            && slot.fetch_add(1, Ordering::Relaxed) >= self.max_per_source
        {
            slot.fetch_sub(1, Ordering::Relaxed);
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(("source", self.max_per_source as usize));
        }
        Ok(())
    }

    /// Counts a connection from `source` out.
    pub(crate) fn release(&self, source: IpAddr) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(slot) = self.slot(source) {
            slot.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn slot(&self, source: IpAddr) -> Option<&AtomicU32> {
        if self.per_source.is_empty() {
            return None;
        }
        // IPv4-mapped IPv6 addresses count as their IPv4 address.
        let bits: u128 = match source {
            IpAddr::V4(v4) => u32::from(v4).into(),
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(u128::from(v6), |v4| u32::from(v4).into()),
        };
        // Fibonacci hashing of both halves: cheap, and neighbouring addresses spread out.
        let h = ((bits as u64) ^ ((bits >> 64) as u64).rotate_left(32))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Some(&self.per_source[(h >> 48) as usize % self.per_source.len()])
    }
}
