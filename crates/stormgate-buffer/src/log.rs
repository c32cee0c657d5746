//! The log handle: open, append, durability, delivery, close.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::io::DmaFile;
use stormgate_telemetry::LogLimiter;

use crate::config::LogConfig;
use crate::delivery::Delivery;
use crate::error::{AppendError, OpenLogError};
use crate::format::{CHECKPOINT_FILE_BYTES, RecordKind, record_len};
use crate::io::{FileIo, blocking};
use crate::notify::Waiters;
use crate::recovery::{self, Applied, CheckpointState, OpenMode, Plan, RecoveryEvent};
use crate::state::{Cursor, Inner, now_ms};
use crate::stats::LogStats;
use crate::writer::{NewRecord, Segment, Writer};
use crate::{flush, maintenance};

/// What [`Log::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The directory.
    pub dir: PathBuf,
    /// Segment files kept.
    pub segments: usize,
    /// Records present and not yet delivered (they will be handed out).
    pub undelivered_records: u64,
    /// The checkpoint found.
    pub checkpoint: CheckpointState,
    /// The delivered watermark the log starts from.
    pub delivered_seq: u64,
    /// The sequence number the next append gets.
    pub next_seq: u64,
    /// Everything that was not a clean log, in the order found.
    pub events: Vec<RecoveryEvent>,
    /// Valid records found after damage, lost to delivery.
    pub quarantined_records: u64,
    /// Bytes of damaged ranges.
    pub quarantined_bytes: u64,
    /// Sequence numbers that will be skipped (damage, missing files).
    pub skipped_records: u64,
    /// Segment bytes read to validate.
    pub bytes_scanned: u64,
    /// How long recovery took.
    pub elapsed: Duration,
}

impl RecoveryReport {
    /// Whether anything lost records or looked damaged (a torn tail alone is a normal
    /// consequence of a crash and does not count).
    pub fn has_damage(&self) -> bool {
        self.events.iter().any(RecoveryEvent::is_damage)
    }
}

/// A per-shard write-ahead log of records. See the crate documentation.
///
/// Shard-local: not `Send`; every method runs on the executor that opened it. Cloning gives
/// another handle to the same log. Dropping every handle (and the reader) without
/// [`Log::close`] is a crash as far as the disk can tell: the background tasks end, nothing
/// staged is written, the directory's lock is released.
///
/// Integration sketch (one shard): `Log::open` at start (report the `RecoveryReport` to
/// `/readyz`), spawn `log.run()`; per accepted line `append` (on `Full`/`Busy`/`Failed` stop
/// reading the socket and await `writable`, or drop the line with `drop_newest`); acks wait
/// on `wait_durable(first pending)` and settle every pending seq up to the value returned; the
/// sink task loops on `reader.read(n, |r| send to the producer or Break when its queue is
/// full)`; delivery reports call `done(seq)` (delivered, or finally failed and spilled) or
/// `retry(seq)`; shutdown calls `close`.
#[derive(Clone)]
pub struct Log {
    pub(crate) inner: Rc<Inner>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (creating in `ReadWrite` mode) the log in `dir`, validating every segment (see
    /// the recovery rules in the crate documentation). Must run on a glommio executor; the
    /// validation and the file-system changes run on its blocking thread.
    ///
    /// Spawn [`Log::run`] on the same executor before appending: nothing becomes durable
    /// without it.
    pub async fn open(
        dir: impl Into<PathBuf>,
        cfg: LogConfig,
        mode: OpenMode,
    ) -> Result<(Log, RecoveryReport), OpenLogError> {
        cfg.validate().map_err(OpenLogError::Config)?;
        let dir = dir.into();
        let started = Instant::now();
        let (lock, scan, plan, applied) = {
            let (at, cfg) = (dir.clone(), cfg.clone());
            blocking(move || Ok(recover(&at, &cfg, mode)))
                .await
                .map_err(|e| OpenLogError::io("recovering", &dir, e))??
        };
        let io = FileIo::default();
        let checkpoint_path = dir.join(recovery::CHECKPOINT_FILE);
        let checkpoint_file = io
            .open(&checkpoint_path, true)
            .await
            .map_err(|e| OpenLogError::io("opening", &checkpoint_path, e))?;
        let segments = open_segments(&io, &plan, mode).await?;
        let generation = match scan.checkpoint {
            CheckpointState::Valid(c) if !plan.write_checkpoint => c.generation,
            _ => 1,
        };
        let report = report(&dir, &scan, &plan, started);
        let parts = Parts {
            io,
            lock,
            checkpoint_file,
            segments,
            generation,
        };
        let log = Log::assemble(dir, cfg, mode, parts, &plan, &applied);
        log.log_recovery(&report);
        Ok((log, report))
    }

    fn assemble(
        dir: PathBuf,
        cfg: LogConfig,
        mode: OpenMode,
        parts: Parts,
        plan: &Plan,
        applied: &Applied,
    ) -> Log {
        let Parts {
            io,
            lock,
            checkpoint_file,
            segments,
            generation,
        } = parts;
        let usage = segments.iter().map(|s| s.size).sum::<u64>() + CHECKPOINT_FILE_BYTES;
        let mut w = Writer::new(dir.clone(), plan.next_seq, usage);
        w.segments.extend(segments);
        w.closed = mode == OpenMode::Drain;
        if plan.continue_last {
            w.seed_tail(&applied.tail_block);
        }
        let start = plan
            .kept
            .iter()
            .find(|k| k.last_seq > plan.watermark)
            .and_then(|k| {
                k.resume.map(|p| Cursor {
                    next_seq: p.seq,
                    segment: Some(k.first_seq),
                    offset: p.offset,
                    timestamp_ms: Some(p.timestamp_ms),
                })
            });
        // Everything present delivered: the reader waits at the end of the segment appends
        // continue in, or for the new segment the next append creates.
        let continued = plan.kept.last().filter(|_| plan.continue_last);
        let start = start.unwrap_or(Cursor {
            next_seq: plan.next_seq,
            segment: continued.map(|k| k.first_seq),
            offset: continued.map_or(0, |k| k.end),
            timestamp_ms: None,
        });
        let stats = Arc::new(LogStats::default());
        stats.quarantined_records.add(plan.quarantined_records);
        stats.quarantined_bytes.add(plan.quarantined_bytes);
        stats.recovery_events.add(plan.events.len() as u64);
        let torn = plan
            .events
            .iter()
            .filter(|e| matches!(e, RecoveryEvent::TornTail { .. }));
        stats.torn_tails.add(torn.count() as u64);
        let segments_quarantined = plan.quarantine_now.len() as u64;
        stats.segments_quarantined.add(segments_quarantined);
        let log = Log {
            inner: Rc::new(Inner {
                dir,
                cfg,
                mode,
                stats,
                io: Rc::new(io),
                w: RefCell::new(w),
                d: RefCell::new(Delivery::new(plan.watermark)),
                durable: Cell::new(plan.next_seq - 1),
                checkpointed: Cell::new(plan.watermark),
                checkpoint_generation: Cell::new(generation),
                checkpoint_file: Rc::new(checkpoint_file),
                start: Cell::new(Some(start)),
                next_timestamp_ms: Cell::new(start.timestamp_ms),
                reader_taken: Cell::new(false),
                stopping: Cell::new(false),
                flusher_done: Cell::new(false),
                maintenance_done: Cell::new(false),
                durable_waiters: Waiters::default(),
                writable_waiters: Waiters::default(),
                readable_waiters: Waiters::default(),
                flusher_waiters: Waiters::default(),
                maintenance_waiters: Waiters::default(),
                segment_waiters: Waiters::default(),
                stopped_waiters: Waiters::default(),
                error_log: LogLimiter::default(),
                _lock: lock,
            }),
        };
        log.inner.refresh_gauges();
        log.inner.refresh_oldest();
        log
    }

    fn log_recovery(&self, report: &RecoveryReport) {
        let dir = self.inner.dir.display();
        for event in &report.events {
            if event.is_damage() {
                tracing::warn!(dir = %dir, ?event, "disk buffer recovery");
            } else {
                tracing::info!(dir = %dir, ?event, "disk buffer recovery");
            }
        }
        tracing::info!(
            dir = %dir,
            segments = report.segments,
            undelivered = report.undelivered_records,
            delivered_seq = report.delivered_seq,
            next_seq = report.next_seq,
            scanned_bytes = report.bytes_scanned,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "disk buffer opened"
        );
    }

    /// The background work of the log: the flusher (group commit) and the maintenance task
    /// (segment files, checkpoints, removal). Spawn it on the log's executor; it returns
    /// after [`Log::close`], or once every handle to the log is dropped — which, without
    /// `close`, is a crash as far as the disk can tell: what was not durable is not written.
    pub fn run(&self) -> impl Future<Output = ()> + 'static {
        let (a, b) = (Rc::downgrade(&self.inner), Rc::downgrade(&self.inner));
        async move {
            future::zip(flush::flusher(a), maintenance::maintenance(b)).await;
        }
    }

    /// Appends a record; returns its sequence number. Synchronous and cheap: the record is
    /// encoded into memory and becomes durable with the next flush.
    ///
    /// Refused (nothing changes) when the log is at `max_bytes` (`Full`), when staging is at
    /// its bound (`Busy` while the disk is healthy, `Failed` while storage errors persist),
    /// for a record over `max_record_bytes` (`TooLarge`), or once closed. After `Full`,
    /// `Busy` or `Failed`, [`Log::writable`] tells when to try again.
    #[inline]
    pub fn append(
        &self,
        timestamp_ms: i64,
        kind: RecordKind,
        key: &[u8],
        value: &[u8],
    ) -> Result<u64, AppendError> {
        let inner = &*self.inner;
        let len = record_len(key.len(), value.len());
        if key.len() > u16::MAX as usize || len > inner.cfg.max_record_bytes {
            inner.stats.too_large.incr();
            return Err(AppendError::TooLarge);
        }
        let mut w = inner.w.borrow_mut();
        if w.closed {
            return Err(AppendError::Closed);
        }
        let rolls_before = w.segments.len();
        let rec = NewRecord {
            timestamp_ms,
            kind,
            key,
            value,
            len,
        };
        let seq = match w.append(&inner.cfg, now_ms, rec) {
            Ok(seq) => seq,
            Err(refusal) => {
                w.last_refusal = Some(refusal);
                return Err(inner.refused(refusal, w.failing));
            }
        };
        let first_pending = w.pending_since.is_none();
        if first_pending {
            w.pending_since = Some(Instant::now());
        }
        let flush_now = first_pending || w.pending_bytes >= inner.cfg.flush_bytes;
        let rolled = w.segments.len() != rolls_before;
        drop(w);
        inner.stats.appended_records.incr();
        inner.stats.appended_bytes.add(len as u64);
        if flush_now {
            inner.flusher_waiters.wake_all();
        }
        if rolled {
            inner.maintenance_waiters.wake_all();
        }
        if !inner.readable_waiters.is_empty() {
            inner.readable_waiters.wake_all();
        }
        Ok(seq)
    }

    /// Resolves when an append refused for lack of room may succeed: after `Full`, once a
    /// new segment fits (a delivered one was removed); after `Busy` or `Failed`, once staging
    /// is below its bound (a flush completed). Immediately if nothing was refused.
    pub async fn writable(&self) {
        let inner = &self.inner;
        future::poll_fn(|cx| {
            if inner.w.borrow().has_room(&inner.cfg) {
                Poll::Ready(())
            } else {
                inner.writable_waiters.register(cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    /// Every record with a sequence number up to this one is durable (its fdatasync
    /// completed).
    pub fn durable_seq(&self) -> u64 {
        self.inner.durable.get()
    }

    /// The sequence number of the last record appended (0 if none ever was).
    pub fn last_seq(&self) -> u64 {
        self.inner.w.borrow().last_appended()
    }

    /// Resolves with the durable sequence number once it is at least `seq`. To settle many
    /// records per flush, wait for the first pending one and then take every record up to
    /// the value returned.
    pub async fn wait_durable(&self, seq: u64) -> u64 {
        let inner = &self.inner;
        future::poll_fn(|cx| {
            let durable = inner.durable.get();
            if durable >= seq {
                Poll::Ready(durable)
            } else {
                inner.durable_waiters.register(cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    /// Reports a handed-out record done: delivered, or finally failed and dealt with
    /// elsewhere. In any order; unknown or repeated sequence numbers are ignored.
    pub fn done(&self, seq: u64) {
        let inner = &*self.inner;
        let mut d = inner.d.borrow_mut();
        // Unknown or repeated: nothing to do (a report after a restart, or twice).
        if d.done(seq).is_ok() {
            drop(d);
            inner.advance_delivered();
        }
    }

    /// Asks for a handed-out record to be handed out again (a retriable failure). Cheap: the
    /// log kept its location.
    pub fn retry(&self, seq: u64) {
        let inner = &*self.inner;
        if inner.d.borrow_mut().retry(seq).is_ok() {
            inner.stats.retried_records.incr();
            inner.readable_waiters.wake_all();
        }
    }

    /// Records handed out by the reader and not yet reported done (the caller bounds this:
    /// the log keeps a small entry for each until it is done).
    pub fn outstanding(&self) -> usize {
        self.inner.d.borrow().outstanding()
    }

    /// End of the contiguous prefix of records reported done (never past `durable_seq`).
    pub fn delivered_seq(&self) -> u64 {
        self.inner.d.borrow().watermark()
    }

    /// The delivered watermark last made durable by a checkpoint.
    pub fn checkpointed_seq(&self) -> u64 {
        self.inner.checkpointed.get()
    }

    /// The log's counters, for the shard's metrics.
    pub fn stats(&self) -> Arc<LogStats> {
        self.inner.stats.clone()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether every record is delivered and checkpointed and every segment removed (a
    /// drained directory can go).
    pub fn is_drained(&self) -> bool {
        let w = self.inner.w.borrow();
        self.inner.checkpointed.get() >= w.last_appended() && w.segments.is_empty()
    }

    /// Stops appends, makes everything appended durable, writes a last checkpoint and stops
    /// the background tasks. Records not delivered stay in the log for the next open.
    /// Returns once [`Log::run`] has finished (it must be running).
    pub async fn close(&self) {
        let inner = &self.inner;
        inner.w.borrow_mut().closed = true;
        inner.stopping.set(true);
        inner.flusher_waiters.wake_all();
        inner.maintenance_waiters.wake_all();
        inner.writable_waiters.wake_all();
        inner.readable_waiters.wake_all();
        future::poll_fn(|cx| {
            if inner.flusher_done.get() && inner.maintenance_done.get() {
                Poll::Ready(())
            } else {
                inner.stopped_waiters.register(cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    /// For a log opened to drain: once [`Log::is_drained`], closes it and removes the
    /// directory (kept if `quarantine/` holds files). Returns whether it was removed.
    pub async fn remove_drained(self) -> std::io::Result<bool> {
        if !self.is_drained() {
            return Ok(false);
        }
        self.close().await;
        self.inner.io.remove_dir(&self.inner.dir).await
    }

    #[cfg(test)]
    pub(crate) fn faults(&self) -> Rc<crate::io::Faults> {
        self.inner.io.faults.clone()
    }
}

type Recovered = (std::fs::File, recovery::DirScan, Plan, Applied);

/// What open gathered for the log besides the plan.
struct Parts {
    io: FileIo,
    lock: std::fs::File,
    checkpoint_file: DmaFile,
    segments: Vec<Segment>,
    generation: u64,
}

/// The blocking part of open: directory, lock, scan, plan, repairs.
fn recover(dir: &Path, cfg: &LogConfig, mode: OpenMode) -> Result<Recovered, OpenLogError> {
    if mode == OpenMode::ReadWrite {
        std::fs::create_dir_all(dir).map_err(|e| OpenLogError::io("creating", dir, e))?;
    }
    let lock = lock_dir(dir)?;
    let scan = recovery::scan_dir(dir, cfg.max_record_bytes, cfg.scan_window_bytes())
        .map_err(|e| OpenLogError::io("scanning", dir, e))?;
    let plan = recovery::plan(&scan, mode);
    let applied = recovery::apply(dir, &plan, cfg.quarantine_max_files)
        .map_err(|e| OpenLogError::io("repairing", dir, e))?;
    Ok((lock, scan, plan, applied))
}

/// Takes the directory's lock: one process, one shard per directory.
fn lock_dir(dir: &Path) -> Result<std::fs::File, OpenLogError> {
    let path = dir.join(recovery::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| OpenLogError::io("opening", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenLogError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(OpenLogError::io("locking", &path, e)),
    }
}

async fn open_segments(
    io: &FileIo,
    plan: &Plan,
    mode: OpenMode,
) -> Result<Vec<Segment>, OpenLogError> {
    let mut segments = Vec::with_capacity(plan.kept.len());
    let last = plan.kept.len().saturating_sub(1);
    for (i, k) in plan.kept.iter().enumerate() {
        let write = mode == OpenMode::ReadWrite && i == last && plan.continue_last;
        let file = io
            .open(&k.path, write)
            .await
            .map_err(|e| OpenLogError::io("opening", &k.path, e))?;
        segments.push(Segment {
            id: k.first_seq,
            path: k.path.clone(),
            file: Some(Rc::new(file)),
            size: k.file_len,
            last_seq: k.last_seq,
            end: k.end,
            sealed: !write,
            damaged: k.damaged,
            uses_spare: false,
        });
    }
    Ok(segments)
}

fn report(dir: &Path, scan: &recovery::DirScan, plan: &Plan, started: Instant) -> RecoveryReport {
    let undelivered = plan
        .kept
        .iter()
        .map(|k| {
            k.last_seq
                .saturating_sub(plan.watermark.max(k.first_seq - 1))
        })
        .sum();
    RecoveryReport {
        dir: dir.to_path_buf(),
        segments: plan.kept.len(),
        undelivered_records: undelivered,
        checkpoint: scan.checkpoint,
        delivered_seq: plan.watermark,
        next_seq: plan.next_seq,
        events: plan.events.clone(),
        quarantined_records: plan.quarantined_records,
        quarantined_bytes: plan.quarantined_bytes,
        skipped_records: plan.skipped_records,
        bytes_scanned: scan.bytes_scanned,
        elapsed: started.elapsed(),
    }
}
