//! The maintenance task: files for new segments, the spare, checkpoints, and removing what
//! is delivered — in that order of urgency, one operation at a time.
//!
//! Ordering that matters for crashes: a segment is removed only after the checkpoint that
//! covers its last record is durable (Vector PR #25570 removed first), so after any crash the
//! checkpoint never points before a missing file.

use std::io;
use std::rc::{Rc, Weak};
use std::time::Instant;

use futures_lite::future;

use crate::flush::{MAX_BACKOFF, MIN_BACKOFF, wait_until};
use crate::format::{BLOCK, CheckpointSlot};
use crate::log::Inner;
use crate::recovery::OpenMode;
use crate::writer::Spare;

/// Runs until the log is closed and the flusher has finished, then writes a last checkpoint;
/// or until every handle to the log is dropped. Holds the log only while it works.
pub(crate) async fn maintenance(weak: Weak<Inner>) {
    let mut next_checkpoint = Instant::now();
    let mut backoff = MIN_BACKOFF;
    let mut spare_retry_at = Instant::now();
    while let Some(inner) = weak.upgrade() {
        if let Some(id) = pending_segment(&inner) {
            match create_segment(&inner, id).await {
                Ok(()) => backoff = MIN_BACKOFF,
                Err(e) => {
                    inner.w.borrow_mut().failing = true;
                    inner.storage_error("creating a segment", &e);
                    drop(inner);
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        }
        if inner.stopping.get() && inner.flusher_done.get() {
            checkpoint_and_retire(&inner).await;
            inner.maintenance_done.set(true);
            inner.stopped_waiters.wake_all();
            return;
        }
        if Instant::now() >= next_checkpoint {
            checkpoint_and_retire(&inner).await;
            next_checkpoint = Instant::now() + inner.cfg.checkpoint_interval;
        }
        if Instant::now() >= spare_retry_at && spare_wanted(&inner) {
            if let Err(e) = create_spare(&inner).await {
                inner.storage_error("preallocating the spare segment", &e);
                spare_retry_at = Instant::now() + MAX_BACKOFF;
            }
            continue;
        }
        drop(inner);
        let sleep =
            glommio::timer::sleep(next_checkpoint.saturating_duration_since(Instant::now()));
        let woken =
            |i: &Inner| pending_segment(i).is_some() || (i.stopping.get() && i.flusher_done.get());
        future::or(sleep, async {
            wait_until(&weak, |i| &i.maintenance_waiters, woken).await;
        })
        .await;
    }
}

fn pending_segment(inner: &Inner) -> Option<u64> {
    inner
        .w
        .borrow()
        .segments
        .iter()
        .find(|s| s.file.is_none())
        .map(|s| s.id)
}

fn spare_wanted(inner: &Inner) -> bool {
    let w = inner.w.borrow();
    inner.mode == OpenMode::ReadWrite
        && !inner.stopping.get()
        && w.spare == Spare::None
        && w.usage_bytes + inner.cfg.segment_bytes <= inner.cfg.max_bytes
}

/// Gives a new segment its file (the spare renamed, or a new preallocated one), durably, and
/// opens it.
async fn create_segment(inner: &Inner, id: u64) -> io::Result<()> {
    let (path, size, uses_spare) = {
        let w = inner.w.borrow();
        let s = w.segment(id).expect("pending");
        (s.path.clone(), s.size, s.uses_spare)
    };
    if let Err(e) = inner
        .io
        .create_segment(&inner.dir, &path, size, uses_spare)
        .await
    {
        if uses_spare {
            // The spare is gone with the failure; a fresh file takes its budget.
            inner
                .w
                .borrow_mut()
                .segment_mut(id)
                .expect("pending")
                .uses_spare = false;
        }
        return Err(e);
    }
    let file = inner.io.open(&path, true).await?;
    inner.w.borrow_mut().segment_mut(id).expect("pending").file = Some(Rc::new(file));
    inner.segment_waiters.wake_all();
    Ok(())
}

async fn create_spare(inner: &Inner) -> io::Result<()> {
    let size = inner.cfg.segment_bytes;
    {
        let mut w = inner.w.borrow_mut();
        w.spare = Spare::Creating;
        w.usage_bytes += size;
    }
    let created = inner.io.create_spare(&inner.dir, size).await;
    let mut w = inner.w.borrow_mut();
    // A roll may have claimed the spare while it was being created (its reservation went to
    // the new segment, which will rename the file).
    let claimed = w.spare != Spare::Creating;
    match created {
        Ok(()) => {
            if !claimed {
                w.spare = Spare::Ready;
            }
            drop(w);
            inner.writable_waiters.wake_all();
            inner.refresh_gauges();
            Ok(())
        }
        Err(e) => {
            if claimed {
                if let Some(s) = w
                    .segments
                    .iter_mut()
                    .find(|s| s.uses_spare && s.file.is_none())
                {
                    s.uses_spare = false;
                }
            } else {
                w.spare = Spare::None;
                w.usage_bytes -= size;
            }
            Err(e)
        }
    }
}

/// Checkpoints the watermark if it moved, then removes (or quarantines) the segments it
/// covers.
pub(crate) async fn checkpoint_and_retire(inner: &Inner) {
    inner.refresh_gauges();
    let watermark = inner.d.borrow().watermark();
    if watermark > inner.checkpointed.get() {
        assert!(
            watermark <= inner.durable.get(),
            "delivered watermark {watermark} past durable {}",
            inner.durable.get()
        );
        if let Err(e) = write_checkpoint(inner, watermark).await {
            inner.storage_error("writing the checkpoint", &e);
            return;
        }
    }
    if let Err(e) = retire(inner).await {
        inner.storage_error("removing a delivered segment", &e);
    }
}

async fn write_checkpoint(inner: &Inner, watermark: u64) -> io::Result<()> {
    let slot = CheckpointSlot {
        generation: inner.checkpoint_generation.get() + 1,
        delivered_seq: watermark,
    };
    let mut block = glommio::allocate_dma_buffer_global(BLOCK);
    slot.encode(block.as_bytes_mut());
    let at = (slot.slot() * BLOCK) as u64;
    inner
        .io
        .write_at(&inner.checkpoint_file, Rc::new(block), at)
        .await?;
    inner.io.fdatasync(&inner.checkpoint_file).await?;
    inner.stats.fsyncs.incr();
    inner.checkpoint_generation.set(slot.generation);
    inner.checkpointed.set(watermark);
    inner.stats.checkpoints.incr();
    inner.refresh_gauges();
    Ok(())
}

/// Removes, oldest first, the sealed segments whose every record is covered by the durable
/// checkpoint; damaged ones move to `quarantine/` instead.
async fn retire(inner: &Inner) -> io::Result<()> {
    loop {
        let candidate = {
            let w = inner.w.borrow();
            w.segments
                .front()
                .filter(|s| s.sealed && s.last_seq <= inner.checkpointed.get() && s.file.is_some())
                .map(|s| (s.id, s.path.clone(), s.damaged))
        };
        let Some((id, path, damaged)) = candidate else {
            return Ok(());
        };
        let quarantine = damaged.then_some(inner.cfg.quarantine_max_files);
        let trimmed = inner.io.retire(&inner.dir, &path, quarantine).await?;
        let file = {
            let mut w = inner.w.borrow_mut();
            let seg = w.segments.pop_front().expect("the candidate");
            debug_assert_eq!(seg.id, id);
            w.usage_bytes -= seg.size;
            seg.file
        };
        if let Some(file) = file {
            let _ = file.close_rc().await;
        }
        if damaged {
            inner.stats.segments_quarantined.incr();
            tracing::warn!(segment = %path.display(), "disk buffer: damaged segment delivered, moved to quarantine");
            for old in trimmed {
                tracing::warn!(file = %old.display(), "disk buffer: quarantine full, oldest file removed");
            }
        } else {
            inner.stats.segments_removed.incr();
        }
        inner.refresh_gauges();
        inner.writable_waiters.wake_all();
    }
}
