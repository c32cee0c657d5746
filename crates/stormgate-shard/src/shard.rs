//! One shard's life: build the sink, accept connections, keep house, drain on shutdown.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::IpAddr;
use std::os::fd::{IntoRawFd, RawFd};
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpListener;
use glommio::timer::sleep;
use slab::Slab;
use stormgate_protocol::LineParser;
use stormgate_telemetry::{LogLimiter, ShardMetrics};
use tracing::{debug, info};

use crate::buffers::{BufPool, ReadBuf};
use crate::config::RuntimeConfig;
use crate::connection;
use crate::disk::{self, ShardLogs};
use crate::events::{AcceptFailed, ConnectionRejected};
use crate::gate::ReadGate;
use crate::server::{ShardInfo, StartServerError};
use crate::signal::Signal;
use crate::sink::{Ledger, Record, RecordReceiver, Sink, SinkContext, SinkFactory, Stage};

/// How often a shard checks the process's stop flag and its connections' read deadlines,
/// and refreshes its gauges.
const TICK: Duration = Duration::from_millis(20);
/// Record value buffers kept for reuse per shard, and the largest one kept.
const PAYLOAD_POOL: (usize, usize, usize) = (256, 4096, 4096);
/// Backlog buffers: 1 KiB to start (a partial line plus parse padding), at most 1024 kept
/// per shard. One that grew past 4 KiB (a blocked connection keeping a read's worth of lines)
/// is freed when emptied, not pooled: a pooled 64 KiB buffer would later hold some busy
/// connection's 100-byte partial line, and 10,000 of those are 640 MiB.
const BACKLOG_POOL: (usize, usize, usize) = (1024, 4 * 1024, 1024);

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
    pub(crate) backlogs: BufPool,
    pub(crate) limits: Arc<ConnectionLimit>,
    pub(crate) logs: Logs,
    /// Fired when shutdown begins: stop accepting, stop reading.
    pub(crate) draining: Signal,
    /// Set once the sink finished: housekeeping ends (it holds the core, and with it the
    /// disk buffer's files and their locks).
    stopped: Cell<bool>,
    /// Parks connections before they read while the record queue is full.
    pub(crate) gate: Rc<ReadGate>,
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
    /// Registers an open connection's socket until [`ShardCore::deregister`].
    pub(crate) fn register(&self, fd: RawFd) -> Registration {
        let key = self.sockets.borrow_mut().insert(Socket {
            fd,
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

    /// Expires every connection whose read deadline has passed: marks it and shuts down its
    /// read side, so that its pending read returns end-of-file and the connection closes
    /// with its timeout's error line (`idle_timeout`, `line_timeout`). Scans the table only
    /// when the earliest deadline may have passed.
    ///
    /// This replaces a timer per pending read: glommio keeps one in its timer tree for
    /// every read with a timeout, inserted and removed at each read that waits, and holding
    /// ~130 bytes per idle connection. Here a deadline is a field, and the timeouts are as
    /// precise as the housekeeping tick (20 ms), which is plenty for limits in seconds.
    fn expire_overdue(&self, now: Instant) {
        if self.next_deadline.get().is_none_or(|t| t > now) {
            return;
        }
        let mut next: Option<Instant> = None;
        for (_, socket) in self.sockets.borrow_mut().iter_mut() {
            match socket.deadline {
                Some(_) if socket.expired => {}
                Some(d) if d <= now => {
                    socket.expired = true;
                    // SAFETY: the fd belongs to a live connection (it deregisters before
                    // closing).
                    unsafe { libc::shutdown(socket.fd, libc::SHUT_RD) };
                }
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        self.next_deadline.set(next);
    }

    /// Completes once no connection is open: every connection task has ended (and
    /// deregistered, whether it returned, panicked or was dropped).
    async fn all_closed(&self) {
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
    /// `deadline`. Ending one marks it drained and shuts its read side: its pending read
    /// returns end-of-file, and it handles what it had read, answers, tells the station
    /// `reconnect` and closes. The moments are taken in housekeeping ticks, so a period
    /// costs a sleep per tick, not a timer per connection. Returns once every connection was
    /// told (or had left).
    async fn drain_connections(&self, deadline: Instant) {
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

    /// Marks connection `key` drained and shuts its read side (nothing if it has left).
    fn drain_one(&self, key: usize) {
        if let Some(socket) = self.sockets.borrow_mut().get_mut(key)
            && !socket.drained
        {
            socket.drained = true;
            // SAFETY: the fd belongs to a live connection (it deregisters before closing).
            unsafe { libc::shutdown(socket.fd, libc::SHUT_RD) };
        }
    }

    /// At the deadline: shuts down both directions of every connection still open (drained
    /// or not), so that one stuck writing to a station that does not read ends too.
    fn shut_down_all_sockets(&self) {
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
    /// The connection must have read again by then, or it is expired.
    deadline: Option<Instant>,
    /// Past its deadline: its read side was shut down.
    expired: bool,
    /// Shutdown reached it (see `ShardCore::drain_connections`): its read side was shut
    /// down, and it is to tell its station `reconnect` and close.
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

    /// Whether the connection was expired (see `ShardCore::expire_overdue`): its read side
    /// is shut, and the end of stream it reads is a timeout, not the station leaving.
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
    fn try_acquire(&self, source: IpAddr) -> Result<(), (&'static str, usize)> {
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

/// Everything a shard thread needs to start.
pub(crate) struct ShardStart<F> {
    pub(crate) info: ShardInfo,
    pub(crate) config: Arc<RuntimeConfig>,
    pub(crate) metrics: Arc<ShardMetrics>,
    pub(crate) limits: Arc<ConnectionLimit>,
    pub(crate) socket: socket2::Socket,
    pub(crate) factory: Arc<F>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) ready: mpsc::Sender<Result<ShardReady, StartServerError>>,
    /// With a disk buffer: the log's settings and the directories this shard adopts.
    pub(crate) buffer: Option<(stormgate_buffer::LogConfig, Vec<std::path::PathBuf>)>,
}

/// What a shard reports once it serves.
pub(crate) struct ShardReady {
    pub(crate) info: ShardInfo,
    /// Its disk buffer's counters.
    pub(crate) buffer: Option<Arc<stormgate_buffer::LogStats>>,
}

/// Runs one shard to completion on the current executor.
pub(crate) async fn run<F: SinkFactory>(start: ShardStart<F>) {
    let ShardStart {
        info,
        config,
        metrics,
        limits,
        socket,
        factory,
        stop,
        ready,
        buffer,
    } = start;
    let sink = match factory.build(&info) {
        Ok(sink) => sink,
        Err(source) => {
            let _ = ready.send(Err(StartServerError::Sink {
                shard: info.id,
                source,
            }));
            return;
        }
    };
    // SAFETY: the fd comes from a listening socket we own and hand over whole.
    let listener =
        unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(socket.into_raw_fd()) };
    let logs = match (&config.disk_buffer, &buffer) {
        (Some(settings), Some((log_config, adopted))) => {
            match ShardLogs::open(settings, log_config, info.id, adopted).await {
                Ok(logs) => Some(logs),
                Err(source) => {
                    let _ = ready.send(Err(StartServerError::Buffer {
                        shard: info.id,
                        source,
                    }));
                    return;
                }
            }
        }
        _ => None,
    };
    let stage = if logs.is_some() {
        Stage::Durable
    } else {
        Stage::Memory
    };
    let ledger = Rc::new(Ledger::new(
        Arc::clone(&metrics),
        BufPool::new(PAYLOAD_POOL.0, PAYLOAD_POOL.1, PAYLOAD_POOL.2),
        config.max_in_flight_bytes,
        stage,
    ));
    let sink_ledger = logs.as_ref().map(|logs| {
        let link = disk::link(logs, Rc::clone(&ledger));
        Rc::new(
            Ledger::new(
                Arc::clone(&metrics),
                BufPool::new(PAYLOAD_POOL.0, PAYLOAD_POOL.1, PAYLOAD_POOL.2),
                0,
                Stage::Log(link),
            )
            .sharing_deadline(&ledger),
        )
    });
    let core = Rc::new(ShardCore {
        read_buf: RefCell::new(ReadBuf::new(config.read_buffer_bytes)),
        parser: RefCell::new(LineParser::new()),
        backlogs: BufPool::new(BACKLOG_POOL.0, BACKLOG_POOL.1, BACKLOG_POOL.2),
        logs: Logs::default(),
        draining: Signal::default(),
        stopped: Cell::new(false),
        gate: Rc::new(ReadGate::new(config.queue_size)),
        sockets: RefCell::new(Slab::new()),
        next_deadline: Cell::new(None),
        all_closed: RefCell::new(None),
        raw_line: RefCell::new(Vec::new()),
        ledger: Rc::clone(&ledger),
        sink_ledger: sink_ledger.clone(),
        config,
        metrics,
        limits,
    });
    let (tx, rx) = local_channel::new_bounded(core.config.queue_size);
    let queue = Rc::new(tx);
    let records = RecordReceiver::new(rx, Rc::clone(&core.gate));
    let (sink_task, disk_tasks) = match (&logs, sink_ledger) {
        (Some(logs), Some(sink_ledger)) => {
            let tasks = DiskTasks::start(logs, &ledger, &sink_ledger, records);
            let (tx, rx) = local_channel::new_bounded(core.config.queue_size);
            let gate = Rc::new(ReadGate::new(core.config.queue_size));
            let sink_task = glommio::spawn_local(sink.run(
                RecordReceiver::new(rx, Rc::clone(&gate)),
                SinkContext::new(Rc::clone(&sink_ledger)),
            ));
            tasks.feed(logs, &sink_ledger, Rc::new(tx), &gate);
            (sink_task, Some(tasks))
        }
        _ => (
            glommio::spawn_local(sink.run(records, SinkContext::new(ledger))),
            None,
        ),
    };
    let housekeeper =
        glommio::spawn_local(housekeeping(Rc::clone(&core), stop, Rc::downgrade(&queue)));
    info!(shard = info.id, core = info.core, "shard ready");
    let _ = ready.send(Ok(ShardReady {
        info,
        buffer: logs.as_ref().map(ShardLogs::stats),
    }));
    drop(ready);

    accept_loop(&core, &listener, &queue).await;
    drop(listener);
    debug!(shard = info.id, "stopped accepting; draining connections");
    let deadline = core
        .ledger
        .deadline
        .get()
        .expect("draining sets the deadline");
    let in_time = future::or(
        async {
            core.drain_connections(deadline).await;
            core.all_closed().await;
            true
        },
        async {
            sleep(deadline.saturating_duration_since(Instant::now())).await;
            false
        },
    )
    .await;
    if !in_time {
        // Past the deadline: end connections still blocked writing to a station that does not
        // read; the sink is already failing what it cannot deliver, which unblocks the rest.
        core.shut_down_all_sockets();
        core.all_closed().await;
    }
    drop(queue);
    if let (Some(tasks), Some(logs)) = (disk_tasks, &logs) {
        // Every record the connections handed over goes into the log (or is refused); the
        // feeders end once they have read it all, which closes the sink's queue.
        tasks.stage.await;
        tasks.ended.set(true);
        sink_task.await;
        for feeder in tasks.feeders.take() {
            feeder.await;
        }
        tasks.adopted_stop.set(true);
        if let Some(adopted) = tasks.adopted {
            adopted.await;
        }
        disk::close(logs, info.id, core.ledger.deadline.get()).await;
    } else {
        sink_task.await;
    }
    core.stopped.set(true);
    housekeeper.await;
    info!(shard = info.id, "shard stopped");
}

/// The disk buffer's tasks of one shard (see [`crate::disk`]).
struct DiskTasks {
    stage: glommio::Task<()>,
    /// Set once the stage appends no more: the feeders stop at the end of the log.
    ended: Rc<Cell<bool>>,
    /// Stops watching adopted logs for removal.
    adopted_stop: Rc<Cell<bool>>,
    /// The task removing adopted logs once delivered.
    adopted: Option<glommio::Task<()>>,
    /// One per log, started by [`DiskTasks::feed`].
    feeders: Cell<Vec<glommio::Task<()>>>,
}

impl DiskTasks {
    /// Starts the stage, between the shard queue and the shard's own log, and the removal
    /// of adopted logs once delivered.
    fn start(
        logs: &ShardLogs,
        ledger: &Rc<Ledger>,
        sink_ledger: &Rc<Ledger>,
        records: RecordReceiver,
    ) -> DiskTasks {
        let stage = glommio::spawn_local(disk::stage(
            records,
            Rc::clone(ledger),
            logs.logs[0].clone(),
            Rc::clone(sink_ledger),
            logs.settings.clone(),
        ));
        let adopted_stop = Rc::new(Cell::new(false));
        let adopted = (logs.logs.len() > 1).then(|| {
            glommio::spawn_local(disk::remove_adopted_when_drained(
                logs.logs[1..].to_vec(),
                Rc::clone(&adopted_stop),
            ))
        });
        DiskTasks {
            stage,
            ended: Rc::new(Cell::new(false)),
            adopted_stop,
            adopted,
            feeders: Cell::new(Vec::new()),
        }
    }

    /// Starts a feeder per log into the sink's queue, which closes once all have ended.
    fn feed(
        &self,
        logs: &ShardLogs,
        sink_ledger: &Rc<Ledger>,
        queue: Rc<LocalSender<Record>>,
        gate: &Rc<ReadGate>,
    ) {
        let feeders = logs
            .logs
            .iter()
            .enumerate()
            .map(|(i, log)| {
                let reader = log.reader().expect("a log's reader is taken once, here");
                glommio::spawn_local(disk::feed(
                    i,
                    reader,
                    Rc::clone(sink_ledger),
                    Rc::clone(&queue),
                    Rc::clone(gate),
                    Rc::clone(&self.ended),
                ))
            })
            .collect();
        self.feeders.set(feeders);
    }
}

async fn accept_loop(
    core: &Rc<ShardCore>,
    listener: &TcpListener,
    queue: &Rc<LocalSender<Record>>,
) {
    let mut draining = pin!(core.draining.wait());
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            draining.as_mut().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        match accepted {
            Ok(stream) => admit(core, stream, queue),
            Err(e) => {
                let e = io::Error::from(e);
                AcceptFailed { error: &e }.emit(&core.logs.accept_failed);
                // Out of descriptors or memory: back off instead of spinning on the error.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

fn admit(core: &Rc<ShardCore>, stream: glommio::net::TcpStream, queue: &Rc<LocalSender<Record>>) {
    let Ok(peer) = stream.peer_addr() else {
        // The peer already left (ENOTCONN); nothing to serve.
        return;
    };
    let per_shard = core.config.max_connections_per_shard;
    let refused = if per_shard > 0 && core.metrics.connections_active.get() >= per_shard as i64 {
        Err(("shard", per_shard))
    } else {
        core.limits.try_acquire(peer.ip())
    };
    if let Err((scope, limit)) = refused {
        ConnectionRejected {
            peer: Some(peer),
            scope,
            limit,
        }
        .emit(&core.metrics, &core.logs.connection_rejected);
        let tls = core.config.tls.is_some();
        glommio::spawn_local(connection::refuse(stream, tls)).detach();
        return;
    }
    let _ = stream.set_nodelay(true);
    core.metrics.connections_accepted.incr();
    core.metrics.connections_active.add(1);
    // Spawned as it is, in one allocation with its task. The drain waits for the socket
    // table (which the task's `Registration` is in) to empty, not for a task gate: glommio's
    // `Gate::spawn` wraps the future in an async block that awaits it, and rustc keeps a
    // future moved into an async block twice (the captured value and the awaited one),
    // which doubled every connection's task (1,505 bytes measured with heaptrack instead of
    // the future's 720 then).
    let task = connection::serve(Rc::clone(core), stream, peer, Rc::clone(queue));
    #[cfg(test)]
    connection::tests::TASK_BYTES.store(
        std::mem::size_of_val(&task),
        std::sync::atomic::Ordering::Relaxed,
    );
    glommio::spawn_local(task).detach();
}

/// Watches the process's stop flag, expires connections past their read deadline, and keeps
/// the shard's gauges fresh.
async fn housekeeping(
    core: Rc<ShardCore>,
    stop: Arc<AtomicBool>,
    queue: Weak<LocalSender<Record>>,
) {
    while !core.stopped.get() {
        sleep(TICK).await;
        if let Some(queue) = queue.upgrade() {
            core.metrics.queue_depth.set(queue.len() as i64);
        }
        let sink_side = core.sink_ledger.as_ref().map_or(0, |l| l.len());
        core.metrics
            .records_in_flight
            .set((core.ledger.len() + sink_side) as i64);
        core.expire_overdue(Instant::now());
        if stop.load(Ordering::Relaxed) && !core.draining.is_fired() {
            // A timeout too long to add to a clock reading (years) waits a century.
            let now = Instant::now();
            let deadline = now
                .checked_add(core.config.shutdown_timeout)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
            core.ledger.deadline.set(Some(deadline));
            core.draining.fire();
            core.gate.close();
        }
    }
}
