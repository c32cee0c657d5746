//! One shard's life: build the sink, accept connections, keep house, drain on shutdown.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::{AcceptedTcpStream, TcpListener};
use glommio::timer::sleep;
use stormgate_telemetry::{Event, ShardMetrics};
use tracing::{debug, info};

use crate::buffers::{BufPool, PoolSize};
use crate::config::RuntimeConfig;
use crate::connection;
use crate::contract::{Record, ShardInfo, StartServerError};
use crate::core::{ConnectionLimit, ShardCore, TICK};
use crate::disk::{self, ShardLogs};
use crate::events::{AcceptFailed, ConnectionRejected};
use crate::gate::ReadGate;
use crate::ledger::{Ledger, LogLink, Stage};
use crate::readiness::Socket;
use crate::sink::{RecordReceiver, Sink, SinkContext, SinkFactory};

/// Record value buffers kept for reuse per shard, and the largest one kept.
const PAYLOAD_POOL: PoolSize = PoolSize {
    initial: 256,
    max_capacity: 4096,
    max_kept: 4096,
};

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
    let listener_fd = socket.as_raw_fd();
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
        BufPool::new(PAYLOAD_POOL),
        config.max_bytes_in_flight,
        stage,
    ));
    let sink_ledger = logs.as_ref().map(|logs| {
        let link = LogLink::new(logs.logs.clone(), Rc::clone(&ledger));
        Rc::new(
            Ledger::new(
                Arc::clone(&metrics),
                BufPool::new(PAYLOAD_POOL),
                0,
                Stage::Log(link),
            )
            .sharing_deadline(&ledger),
        )
    });
    let core = match ShardCore::new(
        config,
        metrics,
        limits,
        Rc::clone(&ledger),
        sink_ledger.clone(),
    ) {
        Ok(core) => Rc::new(core),
        Err(e) => {
            let _ = ready.send(Err(StartServerError::Executor {
                shard: info.id,
                core: info.core,
                message: format!("cannot create its epoll instance: {e}"),
            }));
            return;
        }
    };
    // Wakes the connections whose sockets have bytes or room; ends (dropped) once every
    // connection has.
    let readiness = glommio::spawn_local(Rc::clone(&core.readiness).run());
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

    accept_loop(&core, &listener, listener_fd, &queue).await;
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
    drop(readiness);
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
    core.metrics.heartbeat.finish();
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

/// Accepts connections until shutdown begins. Then it shuts the listener, which ends the
/// accept in flight, and serves what that accept still got: a connection the kernel handed
/// over at that moment would otherwise stay open and unread until the process exits, and
/// be reset then. Connections still queued on the listener go to another listener of the
/// group (`net.ipv4.tcp_migrate_req`) or are reset by the kernel, docs/TUNING.md.
async fn accept_loop(
    core: &Rc<ShardCore>,
    listener: &TcpListener,
    listener_fd: RawFd,
    queue: &Rc<LocalSender<Record>>,
) {
    let mut draining = pin!(core.draining.wait());
    loop {
        let mut accept = pin!(listener.shared_accept());
        let accepted = future::or(async { Some(accept.as_mut().await) }, async {
            draining.as_mut().await;
            None
        })
        .await;
        let accepted = match accepted {
            Some(accepted) => accepted,
            None => {
                // SAFETY: the listener's own descriptor. A shut listening socket fails its
                // pending and future accepts (EINVAL).
                unsafe { libc::shutdown(listener_fd, libc::SHUT_RD) };
                if let Ok(last) = accept.await {
                    // Served like every connection accepted during the drain: told to
                    // reconnect at once.
                    admit(core, last, queue);
                }
                return;
            }
        };
        match accepted {
            Ok(stream) => admit(core, stream, queue),
            Err(e) => {
                let e = io::Error::from(e);
                AcceptFailed { error: &e }.emit(&core.metrics, &core.logs.accept_failed);
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

fn admit(core: &Rc<ShardCore>, accepted: AcceptedTcpStream, queue: &Rc<LocalSender<Record>>) {
    let peer = accepted.peer_addr();
    // Taken as a descriptor: glommio's `TcpStream` would arm a poll on it at once and keep
    // one per waiting read (see `readiness`).
    // SAFETY: the accepted descriptor, owned by nothing else from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(accepted.into_raw_fd()) };
    let Ok(peer) = peer else {
        // The peer already left (ENOTCONN); nothing to serve.
        return;
    };
    let _ = socket2::SockRef::from(&fd).set_tcp_nodelay(true);
    let stream = match Socket::new(fd, &core.readiness) {
        Ok(stream) => stream,
        Err(e) => {
            // Out of epoll watches (fs.epoll.max_user_watches) or memory.
            AcceptFailed { error: &e }.emit(&core.metrics, &core.logs.accept_failed);
            return;
        }
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

/// Watches the process's stop flag, expires connections past their read deadline, keeps
/// the shard's gauges fresh, and beats the shard's heartbeat (the liveness check's evidence
/// that its executor goes round) until the shard ends.
async fn housekeeping(
    core: Rc<ShardCore>,
    stop: Arc<AtomicBool>,
    queue: Weak<LocalSender<Record>>,
) {
    while !core.stopped.get() {
        core.metrics.heartbeat.beat();
        sleep(TICK).await;
        if let Some(queue) = queue.upgrade() {
            core.metrics.queue_depth.set(queue.len() as i64);
        }
        let sink_side = core.sink_ledger.as_ref().map_or(0, |l| l.len());
        core.metrics
            .records_in_flight
            .set((core.ledger.len() + sink_side) as i64);
        let now = Instant::now();
        core.expire_overdue(now);
        core.readiness.expire_writes(now);
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
