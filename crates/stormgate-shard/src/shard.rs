//! One shard's life: build the sink, accept connections, keep house, drain on shutdown.

use std::cell::RefCell;
use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpListener;
use glommio::sync::Gate;
use glommio::timer::sleep;
use slab::Slab;
use stormgate_protocol::LineParser;
use stormgate_telemetry::{LogLimiter, ShardMetrics};
use tracing::{debug, info};

use crate::buffers::{BufPool, ReadBuf};
use crate::config::RuntimeConfig;
use crate::connection;
use crate::events::{AcceptFailed, ConnectionRejected};
use crate::gate::ReadGate;
use crate::server::{ShardInfo, StartServerError};
use crate::signal::Signal;
use crate::sink::{Ledger, Record, RecordReceiver, Sink, SinkContext, SinkFactory};

/// How often a shard checks the process's stop flag and refreshes its gauges.
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
    pub(crate) parser: RefCell<LineParser>,
    pub(crate) read_buf: RefCell<ReadBuf>,
    pub(crate) backlogs: BufPool,
    pub(crate) limits: Arc<ConnectionLimit>,
    pub(crate) logs: Logs,
    /// Fired when shutdown begins: stop accepting, stop reading.
    pub(crate) draining: Signal,
    /// Parks connections before they read while the record queue is full.
    pub(crate) gate: Rc<ReadGate>,
    /// Sockets of open connections, so shutdown can wake and end them.
    sockets: RefCell<Slab<RawFd>>,
    /// With dead letters on, a copy of the line being parsed (simd-json parses in place).
    pub(crate) raw_line: RefCell<Vec<u8>>,
}

/// Per-shard log rate limits, one per event that can repeat at line rate.
#[derive(Default)]
pub(crate) struct Logs {
    pub(crate) line_rejected: LogLimiter,
    pub(crate) connection_rejected: LogLimiter,
    pub(crate) accept_failed: LogLimiter,
}

impl ShardCore {
    /// Registers an open connection's socket until the returned guard drops.
    pub(crate) fn register(self: &Rc<Self>, fd: RawFd) -> Registration {
        let key = self.sockets.borrow_mut().insert(fd);
        Registration {
            core: Rc::downgrade(self),
            key,
        }
    }

    /// Shuts down one or both directions of every open connection. `SHUT_RD` makes pending
    /// and future reads return end-of-file, which ends idle connections at once and busy ones
    /// after the bytes they already hold; `SHUT_RDWR` also fails writes, for connections that
    /// are still stuck at the deadline.
    fn shut_down_sockets(&self, how: libc::c_int) {
        for (_, &fd) in self.sockets.borrow().iter() {
            // SAFETY: the fd belongs to a live connection (it deregisters before closing).
            unsafe { libc::shutdown(fd, how) };
        }
    }
}

pub(crate) struct Registration {
    core: Weak<ShardCore>,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            core.sockets.borrow_mut().remove(self.key);
        }
    }
}

/// The process-wide connection count, checked at accept. The one value shards share on the
/// connection path; it is touched once per connection, never per line.
#[derive(Debug)]
pub(crate) struct ConnectionLimit {
    pub(crate) max: usize,
    open: AtomicUsize,
}

impl ConnectionLimit {
    pub(crate) fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            max,
            open: AtomicUsize::new(0),
        }
    }

    fn try_acquire(&self) -> bool {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(crate) fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
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
    pub(crate) ready: mpsc::Sender<Result<ShardInfo, StartServerError>>,
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
    let ledger = Rc::new(Ledger::new(
        Arc::clone(&metrics),
        BufPool::new(PAYLOAD_POOL.0, PAYLOAD_POOL.1, PAYLOAD_POOL.2),
    ));
    let core = Rc::new(ShardCore {
        read_buf: RefCell::new(ReadBuf::new(config.read_buffer_bytes)),
        parser: RefCell::new(LineParser::new()),
        backlogs: BufPool::new(BACKLOG_POOL.0, BACKLOG_POOL.1, BACKLOG_POOL.2),
        logs: Logs::default(),
        draining: Signal::default(),
        gate: Rc::new(ReadGate::new(config.queue_size)),
        sockets: RefCell::new(Slab::new()),
        raw_line: RefCell::new(Vec::new()),
        ledger: Rc::clone(&ledger),
        config,
        metrics,
        limits,
    });
    let (tx, rx) = local_channel::new_bounded(core.config.queue_size);
    let queue = Rc::new(tx);
    let sink_task = glommio::spawn_local(sink.run(
        RecordReceiver::new(rx, Rc::clone(&core.gate)),
        SinkContext::new(ledger),
    ));
    glommio::spawn_local(housekeeping(Rc::clone(&core), stop, Rc::downgrade(&queue))).detach();
    info!(shard = info.id, core = info.core, "shard ready");
    let _ = ready.send(Ok(info));
    drop(ready);

    let connections = Gate::new();
    accept_loop(&core, &listener, &connections, &queue).await;
    drop(listener);
    debug!(shard = info.id, "stopped accepting; draining connections");
    core.shut_down_sockets(libc::SHUT_RD);
    let deadline = core
        .ledger
        .deadline
        .get()
        .expect("draining sets the deadline");
    // One close future, kept until every connection task has left: dropping it half way
    // would leave glommio's gate closing towards a dropped channel, and the last task to
    // leave would panic the shard (and a second close() would not wait at all).
    let mut closing = pin!(connections.close());
    let in_time = future::or(
        async {
            let _ = closing.as_mut().await;
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
        core.shut_down_sockets(libc::SHUT_RDWR);
        let _ = closing.await;
    }
    drop(queue);
    sink_task.await;
    info!(shard = info.id, "shard stopped");
}

async fn accept_loop(
    core: &Rc<ShardCore>,
    listener: &TcpListener,
    connections: &Gate,
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
            Ok(stream) => admit(core, stream, connections, queue),
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

fn admit(
    core: &Rc<ShardCore>,
    stream: glommio::net::TcpStream,
    connections: &Gate,
    queue: &Rc<LocalSender<Record>>,
) {
    let peer = stream.peer_addr().ok();
    let per_shard = core.config.max_connections_per_shard;
    let refused = if per_shard > 0 && core.metrics.connections_active.get() >= per_shard as i64 {
        Some(("shard", per_shard))
    } else if !core.limits.try_acquire() {
        Some(("process", core.limits.max))
    } else {
        None
    };
    if let Some((scope, limit)) = refused {
        ConnectionRejected { peer, scope, limit }
            .emit(&core.metrics, &core.logs.connection_rejected);
        glommio::spawn_local(connection::refuse(stream)).detach();
        return;
    }
    let Some(peer) = peer else {
        // The peer already left (ENOTCONN); nothing to serve.
        core.limits.release();
        return;
    };
    let _ = stream.set_nodelay(true);
    core.metrics.connections_accepted.incr();
    core.metrics.connections_active.add(1);
    match connections.spawn(connection::serve(
        Rc::clone(core),
        stream,
        peer,
        Rc::clone(queue),
    )) {
        Ok(task) => {
            task.detach();
        }
        Err(_) => {
            // The gate closes only after accepting stopped.
            core.limits.release();
            core.metrics.connections_active.add(-1);
        }
    }
}

/// Watches the process's stop flag and keeps the shard's gauges fresh.
async fn housekeeping(
    core: Rc<ShardCore>,
    stop: Arc<AtomicBool>,
    queue: Weak<LocalSender<Record>>,
) {
    loop {
        sleep(TICK).await;
        if let Some(queue) = queue.upgrade() {
            core.metrics.queue_depth.set(queue.len() as i64);
        }
        core.metrics.records_in_flight.set(core.ledger.len() as i64);
        if stop.load(Ordering::Relaxed) && !core.draining.is_fired() {
            core.ledger
                .deadline
                .set(Some(Instant::now() + core.config.shutdown_timeout));
            core.draining.fire();
            core.gate.close();
        }
    }
}
