//! Group commit: one flush in flight, fdatasync only after the writes it covers completed.

use std::io;
use std::rc::{Rc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::io::{DmaBuffer, DmaFile};

use crate::config::LogConfig;
use crate::io::FileIo;
use crate::notify::Waiters;
use crate::state::Inner;
use crate::stats::LogStats;
use crate::writer::FlushBatch;

/// First wait after a failed flush; doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Longest wait between two attempts while storage fails.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the flusher does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Flush now.
    Now,
    /// Wait until then (or until enough bytes are staged).
    At(Instant),
    /// Nothing staged: wait for an append.
    Idle,
    /// Closing and nothing left: stop.
    Stop,
}

/// When to flush, as a function of the staged state and the clock: at once when bytes wait
/// that a failed flush left or `flush_bytes` are staged, else when the oldest staged record
/// has waited `sync_interval`.
pub(crate) fn decide(
    now: Instant,
    pending_since: Option<Instant>,
    pending_bytes: usize,
    left_by_failure: bool,
    stopping: bool,
    cfg: &LogConfig,
) -> Decision {
    if left_by_failure {
        return Decision::Now;
    }
    match pending_since {
        None if stopping => Decision::Stop,
        None => Decision::Idle,
        Some(since) => {
            let due = since + cfg.sync_interval;
            if stopping || pending_bytes >= cfg.flush_bytes || now >= due {
                Decision::Now
            } else {
                Decision::At(due)
            }
        }
    }
}

/// The flusher task: runs until the log is closed and everything appended is durable, or
/// until every handle to the log is dropped (a crash, as far as the disk can tell: nothing
/// more is written).
///
/// It holds the log only while it works, never while it waits: a task waiting on the log's
/// wakers while holding the log would keep it alive forever.
pub(crate) async fn flusher(weak: Weak<Inner>) {
    let mut backoff = MIN_BACKOFF;
    while let Some(inner) = weak.upgrade() {
        let decision = {
            let w = inner.w.borrow();
            let left = w.chunks.iter().any(|c| c.sealed && !c.durable);
            decide(
                Instant::now(),
                w.pending_since,
                w.pending_bytes,
                left,
                inner.stopping.get(),
                &inner.cfg,
            )
        };
        match decision {
            Decision::Stop => {
                inner.flusher_done.set(true);
                inner.maintenance_waiters.wake_all();
                inner.stopped_waiters.wake_all();
                return;
            }
            Decision::Idle => {
                drop(inner);
                wait_until(
                    &weak,
                    |i| &i.flusher_waiters,
                    |i| i.w.borrow().has_unflushed() || i.stopping.get(),
                )
                .await;
                continue;
            }
            Decision::At(due) => {
                drop(inner);
                let enough =
                    |i: &Inner| i.w.borrow().pending_bytes >= i.cfg.flush_bytes || i.stopping.get();
                let sleep = async {
                    glommio::timer::sleep(due.saturating_duration_since(Instant::now())).await
                };
                future::or(sleep, async {
                    wait_until(&weak, |i| &i.flusher_waiters, enough).await;
                })
                .await;
                continue;
            }
            Decision::Now => {}
        }
        let Some(batch) = inner.w.borrow_mut().take_batch() else {
            continue;
        };
        drop(inner);
        let Some(writes) = resolve_files(&weak, &batch).await else {
            return;
        };
        let (io, stats) = match weak.upgrade() {
            Some(inner) => (inner.io.clone(), inner.stats.clone()),
            None => return,
        };
        if let Some(oldest) = batch.oldest {
            stats.flush_wait_latency.record(oldest.elapsed());
        }
        let result = write_and_sync(&io, &stats, &writes).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        match result {
            Ok(()) => {
                flushed(&inner, &batch);
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                inner.w.borrow_mut().failing = true;
                inner.storage_error("flush", &e);
                inner.writable_waiters.wake_all();
                drop(inner);
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Waits until `ready` holds, registered with the `which` wakers, without keeping the log
/// alive. `None` if the log was dropped.
pub(crate) async fn wait_until(
    weak: &Weak<Inner>,
    which: fn(&Inner) -> &Waiters,
    ready: impl Fn(&Inner) -> bool,
) -> Option<()> {
    future::poll_fn(|cx| match weak.upgrade() {
        None => Poll::Ready(None),
        Some(inner) if ready(&inner) => Poll::Ready(Some(())),
        Some(inner) => {
            which(&inner).register(cx.waker());
            Poll::Pending
        }
    })
    .await
}

type Writes = Vec<(u64, Rc<DmaFile>, u64, Rc<DmaBuffer>)>;

/// The file of every chunk's segment, waiting for the maintenance task to create new ones
/// (durably, directory entry included).
async fn resolve_files(weak: &Weak<Inner>, batch: &FlushBatch) -> Option<Writes> {
    let mut writes = Vec::with_capacity(batch.writes.len());
    for (segment, offset, buf) in &batch.writes {
        let ready = |i: &Inner| {
            let has =
                i.w.borrow()
                    .segment(*segment)
                    .is_some_and(|s| s.file.is_some());
            if !has {
                i.maintenance_waiters.wake_all();
            }
            has
        };
        wait_until(weak, |i| &i.segment_waiters, ready).await?;
        let inner = weak.upgrade()?;
        let file = inner
            .w
            .borrow()
            .segment(*segment)
            .and_then(|s| s.file.clone())?;
        writes.push((*segment, file, *offset, buf.clone()));
    }
    Some(writes)
}

/// Writes the batch's chunks in order, one at a time (consecutive chunks share a block, and
/// the later one must land last), then fdatasyncs every file written.
async fn write_and_sync(io: &FileIo, stats: &LogStats, writes: &Writes) -> io::Result<()> {
    let mut files: Vec<(u64, &Rc<DmaFile>)> = Vec::new();
    let started = Instant::now();
    for (segment, file, offset, buf) in writes {
        io.write_at(file, buf.clone(), *offset).await?;
        stats.bytes_written.add(buf.len() as u64);
        if files.last().map(|f| f.0) != Some(*segment) {
            files.push((*segment, file));
        }
    }
    stats.write_latency.record(started.elapsed());
    for (_, file) in files {
        let started = Instant::now();
        io.fdatasync(file).await?;
        stats.fsyncs.incr();
        stats.fsync_latency.record(started.elapsed());
    }
    Ok(())
}

fn flushed(inner: &Inner, batch: &FlushBatch) {
    let was_failing = {
        let mut w = inner.w.borrow_mut();
        w.flushed(batch);
        std::mem::replace(&mut w.failing, false)
    };
    if was_failing {
        inner.stats.last_storage_errno.set(0);
        tracing::info!(dir = %inner.dir.display(), "disk buffer: storage recovered, flushes succeed again");
    }
    inner.stats.flushes.incr();
    if let Some(oldest) = batch.oldest {
        inner.stats.durable_latency.record(oldest.elapsed());
    }
    inner.durable_moved(batch.target_seq.max(inner.durable.get()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_start_when_the_window_ends_or_enough_bytes_wait() {
        let cfg = LogConfig {
            sync_interval: Duration::from_millis(2),
            flush_bytes: 1000,
            ..LogConfig::new(1 << 30)
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(decide(t0, None, 0, false, false, &cfg), Decision::Idle);
        assert_eq!(decide(t0, None, 0, false, true, &cfg), Decision::Stop);
        assert_eq!(decide(t0, None, 0, true, true, &cfg), Decision::Now);
        assert_eq!(
            decide(t0 + ms(1), Some(t0), 10, false, false, &cfg),
            Decision::At(t0 + ms(2))
        );
        assert_eq!(
            decide(t0 + ms(2), Some(t0), 10, false, false, &cfg),
            Decision::Now
        );
        assert_eq!(
            decide(t0, Some(t0), 1000, false, false, &cfg),
            Decision::Now
        );
        assert_eq!(decide(t0, Some(t0), 10, false, true, &cfg), Decision::Now);
        let eager = LogConfig {
            sync_interval: Duration::ZERO,
            ..cfg
        };
        assert_eq!(
            decide(t0, Some(t0), 10, false, false, &eager),
            Decision::Now
        );
    }
}
