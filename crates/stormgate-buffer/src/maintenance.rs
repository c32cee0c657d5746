//! The maintenance task: files for new segments, the spare, checkpoints, and removing what
//! is delivered — in that order of urgency, one operation at a time.
//!
//! Ordering that matters for crashes: a segment is removed only after the checkpoint that
//! covers its last record is durable (Vector PR #25570 removed first), so after any crash the
//! checkpoint never points before a missing file.
//!
//! Like the flusher, the task holds the log only between awaits: every operation takes what
//! its I/O needs (the `FileIo`, paths, files) and looks the log up again when it completes.
//! If every handle was dropped meanwhile, the task ends there.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::Instant;

use futures_lite::future;

use crate::flush::{MAX_BACKOFF, MIN_BACKOFF, wait_until};
use crate::format::{BLOCK, CheckpointSlot};
use crate::recovery::OpenMode;
use crate::state::Inner;
use crate::writer::Spare;

/// Runs until the log is closed and the flusher has finished, then writes a last checkpoint;
/// or until every handle to the log is dropped.
pub(crate) async fn maintenance(weak: Weak<Inner>) {
    let mut next_checkpoint = Instant::now();
    let mut backoff = MIN_BACKOFF;
    let mut spare_retry_at = Instant::now();
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if let Some(id) = pending_segment(&inner) {
            drop(inner);
            match create_segment(&weak, id).await {
                None => return,
                Some(Ok(())) => backoff = MIN_BACKOFF,
                Some(Err(e)) => {
                    if let Some(inner) = weak.upgrade() {
                        inner.w.borrow_mut().failing = true;
                        inner.storage_error("creating a segment", &e);
                    }
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        }
        let closing = inner.stopping.get() && inner.flusher_done.get();
        let checkpoint_due = closing || Instant::now() >= next_checkpoint;
        drop(inner);
        if checkpoint_due {
            checkpoint_and_retire(&weak).await;
            next_checkpoint = Instant::now()
                + weak
                    .upgrade()
                    .map(|i| i.cfg.checkpoint_interval)
                    .unwrap_or_default();
        }
        if closing {
            if let Some(inner) = weak.upgrade() {
                inner.maintenance_done.set(true);
                inner.stopped_waiters.wake_all();
            }
            return;
        }
        if Instant::now() >= spare_retry_at && weak.upgrade().is_some_and(|i| spare_wanted(&i)) {
            if let Some(Err(e)) = create_spare(&weak).await {
                if let Some(inner) = weak.upgrade() {
                    inner.storage_error("preallocating the spare segment", &e);
                }
                spare_retry_at = Instant::now() + MAX_BACKOFF;
            }
            continue;
        }
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
/// opens it. `None` if the log was dropped.
async fn create_segment(weak: &Weak<Inner>, id: u64) -> Option<io::Result<()>> {
    let (io, dir, path, size, uses_spare) = {
        let inner = weak.upgrade()?;
        let w = inner.w.borrow();
        let s = w.segment(id).expect("pending");
        (
            inner.io.clone(),
            inner.dir.clone(),
            s.path.clone(),
            s.size,
            s.uses_spare,
        )
    };
    let created = async {
        io.create_segment(&dir, &path, size, uses_spare).await?;
        io.open(&path, true).await
    }
    .await;
    let inner = weak.upgrade()?;
    let mut w = inner.w.borrow_mut();
    let seg = w.segment_mut(id).expect("pending");
    Some(match created {
        Ok(file) => {
            seg.file = Some(Rc::new(file));
            drop(w);
            inner.segment_waiters.wake_all();
            Ok(())
        }
        Err(e) => {
            // The spare is gone with the failure (or was never made); a fresh file takes
            // its budget.
            seg.uses_spare = false;
            Err(e)
        }
    })
}

async fn create_spare(weak: &Weak<Inner>) -> Option<io::Result<()>> {
    let (io, dir, size) = {
        let inner = weak.upgrade()?;
        let mut w = inner.w.borrow_mut();
        w.spare = Spare::Creating;
        w.usage_bytes += inner.cfg.segment_bytes;
        (inner.io.clone(), inner.dir.clone(), inner.cfg.segment_bytes)
    };
    let created = io.create_spare(&dir, size).await;
    let inner = weak.upgrade()?;
    let mut w = inner.w.borrow_mut();
    // A roll may have claimed the spare while it was being created (its reservation went to
    // the new segment, which will rename the file).
    let claimed = w.spare != Spare::Creating;
    Some(match created {
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
    })
}

/// Checkpoints the watermark if it moved, then removes (or quarantines) the segments it
/// covers.
async fn checkpoint_and_retire(weak: &Weak<Inner>) {
    let Some(watermark) = weak.upgrade().map(|inner| {
        inner.refresh_gauges();
        inner.refresh_oldest();
        inner.d.borrow().watermark()
    }) else {
        return;
    };
    if weak
        .upgrade()
        .is_some_and(|i| watermark > i.checkpointed.get())
    {
        match write_checkpoint(weak, watermark).await {
            None => return,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                if let Some(inner) = weak.upgrade() {
                    inner.storage_error("writing the checkpoint", &e);
                }
                return;
            }
        }
    }
    if let Some(Err(e)) = retire(weak).await
        && let Some(inner) = weak.upgrade()
    {
        inner.storage_error("removing a delivered segment", &e);
    }
}

async fn write_checkpoint(weak: &Weak<Inner>, watermark: u64) -> Option<io::Result<()>> {
    let (io, file, slot) = {
        let inner = weak.upgrade()?;
        assert!(
            watermark <= inner.durable.get(),
            "delivered watermark {watermark} past durable {}",
            inner.durable.get()
        );
        let generation = inner.checkpoint_generation.get() + 1;
        let slot = CheckpointSlot {
            generation,
            delivered_seq: watermark,
        };
        (inner.io.clone(), inner.checkpoint_file.clone(), slot)
    };
    let mut block = glommio::allocate_dma_buffer_global(BLOCK);
    slot.encode(block.as_bytes_mut());
    let at = (slot.slot() * BLOCK) as u64;
    let written = async {
        io.write_at(&file, Rc::new(block), at).await?;
        io.fdatasync(&file).await
    }
    .await;
    let inner = weak.upgrade()?;
    inner.stats.fsyncs.incr();
    if written.is_ok() {
        inner.checkpoint_generation.set(slot.generation);
        inner.checkpointed.set(watermark);
        inner.stats.checkpoints.incr();
        inner.refresh_gauges();
    }
    Some(written)
}

/// Removes, oldest first, the sealed segments whose every record is covered by the durable
/// checkpoint; damaged ones move to `quarantine/` instead.
async fn retire(weak: &Weak<Inner>) -> Option<io::Result<()>> {
    loop {
        let (io, dir, id, path, quarantine) = {
            let inner = weak.upgrade()?;
            let w = inner.w.borrow();
            let checkpointed = inner.checkpointed.get();
            let Some(s) = w
                .segments
                .front()
                .filter(|s| s.sealed && s.last_seq <= checkpointed && s.file.is_some())
            else {
                return Some(Ok(()));
            };
            let quarantine = s.damaged.then_some(inner.cfg.quarantine_max_files);
            (
                inner.io.clone(),
                inner.dir.clone(),
                s.id,
                s.path.clone(),
                quarantine,
            )
        };
        let trimmed = match io.retire(&dir, &path, quarantine).await {
            Ok(trimmed) => trimmed,
            Err(e) => return Some(Err(e)),
        };
        let file = {
            let inner = weak.upgrade()?;
            let mut w = inner.w.borrow_mut();
            let seg = w.segments.pop_front().expect("the candidate");
            debug_assert_eq!(seg.id, id);
            w.usage_bytes -= seg.size;
            drop(w);
            retired(&inner, &path, quarantine.is_some(), &trimmed);
            seg.file
        };
        if let Some(file) = file {
            let _ = file.close_rc().await;
        }
    }
}

fn retired(inner: &Inner, path: &Path, quarantined: bool, trimmed: &[PathBuf]) {
    if quarantined {
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
