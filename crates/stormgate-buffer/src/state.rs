//! The state one log's handle, reader and background tasks share.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use glommio::io::DmaFile;
use stormgate_telemetry::LogLimiter;

use crate::config::LogConfig;
use crate::delivery::Delivery;
use crate::error::AppendError;
use crate::io::FileIo;
use crate::notify::Waiters;
use crate::recovery::OpenMode;
use crate::stats::LogStats;
use crate::writer::{Refusal, Writer};

/// The reader's starting point.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cursor {
    pub next_seq: u64,
    pub segment: Option<u64>,
    pub offset: u64,
    /// Timestamp of the record at the cursor, when known (for the oldest-record gauge).
    pub timestamp_ms: Option<i64>,
}

/// State shared by the handle, the reader and the background tasks of one log. Shard-local.
pub(crate) struct Inner {
    pub dir: PathBuf,
    pub cfg: LogConfig,
    pub mode: OpenMode,
    pub stats: Arc<LogStats>,
    pub io: Rc<FileIo>,
    pub w: RefCell<Writer>,
    pub d: RefCell<Delivery>,
    pub durable: Cell<u64>,
    pub checkpointed: Cell<u64>,
    pub checkpoint_generation: Cell<u64>,
    pub checkpoint_file: Rc<DmaFile>,
    pub start: Cell<Option<Cursor>>,
    /// Timestamp of the next record the reader will hand out, when known.
    pub next_timestamp_ms: Cell<Option<i64>>,
    pub reader_taken: Cell<bool>,
    pub stopping: Cell<bool>,
    pub flusher_done: Cell<bool>,
    pub maintenance_done: Cell<bool>,
    pub durable_waiters: Waiters,
    pub writable_waiters: Waiters,
    pub readable_waiters: Waiters,
    pub flusher_waiters: Waiters,
    pub maintenance_waiters: Waiters,
    pub segment_waiters: Waiters,
    pub stopped_waiters: Waiters,
    pub error_log: LogLimiter,
    pub _lock: std::fs::File,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Inner {
    pub(crate) fn refused(&self, refusal: Refusal, failing: bool) -> AppendError {
        match refusal {
            Refusal::Full => {
                self.stats.full_events.incr();
                AppendError::Full
            }
            Refusal::Staging if failing => {
                self.stats.failed_appends.incr();
                AppendError::Failed
            }
            Refusal::Staging => {
                self.stats.busy_events.incr();
                AppendError::Busy
            }
        }
    }

    /// Moves the watermark over whatever is done (and durable) at its front.
    pub(crate) fn advance_delivered(&self) {
        let mut d = self.d.borrow_mut();
        if d.advance(self.durable.get()) {
            let watermark = d.watermark();
            drop(d);
            self.delivered_moved(watermark);
        }
    }

    /// The watermark moved: evict delivered chunks, update the gauges.
    pub(crate) fn delivered_moved(&self, watermark: u64) {
        self.w.borrow_mut().evict(watermark, self.cfg.memory_bytes);
        self.refresh_gauges();
    }

    /// A flush completed: everything up to `seq` is durable.
    pub(crate) fn durable_moved(&self, seq: u64) {
        debug_assert!(seq >= self.durable.get());
        self.durable.set(seq);
        self.d.borrow_mut().advance(seq);
        let watermark = self.d.borrow().watermark();
        self.w.borrow_mut().evict(watermark, self.cfg.memory_bytes);
        // Every flush, not only when the watermark moved: with the broker down it never
        // moves, and the gauges would show what the last checkpoint saw while the records
        // made durable (and acknowledged) since were missing from them.
        self.refresh_gauges();
        self.stats.durable_seq.set(seq as i64);
        self.durable_waiters.wake_all();
        self.writable_waiters.wake_all();
    }

    /// Recomputes the gauges that follow the watermark and the files. Cheap: called whenever
    /// either moves.
    pub(crate) fn refresh_gauges(&self) {
        let w = self.w.borrow();
        let watermark = self.d.borrow().watermark();
        self.stats.disk_bytes.set(w.usage_bytes as i64);
        self.stats.segments.set(w.segments.len() as i64);
        let undelivered = w.last_appended().saturating_sub(watermark);
        self.stats.records.set(undelivered as i64);
        if undelivered == 0 {
            self.stats.oldest_timestamp_ms.set(0);
        }
        self.stats
            .checkpointed_seq
            .set(self.checkpointed.get() as i64);
    }

    /// The oldest undelivered record's timestamp: a walk over the outstanding window, so it
    /// runs with the checkpoints, not with every delivery.
    pub(crate) fn refresh_oldest(&self) {
        let d = self.d.borrow();
        let undelivered = self.w.borrow().last_appended() > d.watermark();
        let oldest = d.oldest_timestamp_ms().or(self.next_timestamp_ms.get());
        self.stats
            .oldest_timestamp_ms
            .set(if undelivered { oldest.unwrap_or(0) } else { 0 });
    }

    /// Logs a storage error at a rate limit and counts it.
    pub(crate) fn storage_error(&self, what: &str, err: &std::io::Error) {
        self.stats.storage_errors.incr();
        self.stats
            .last_storage_errno
            .set(err.raw_os_error().unwrap_or(-1).into());
        if let Some(suppressed) = self.error_log.allow(Instant::now()) {
            tracing::error!(dir = %self.dir.display(), error = %err, suppressed, "disk buffer: {what} failed");
        }
    }
}
