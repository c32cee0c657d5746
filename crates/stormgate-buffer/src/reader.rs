//! The reader: hands records out in sequence order, from memory while the tail is hot and
//! from disk (large aligned reads) once it has fallen behind.

use std::ops::ControlFlow;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::future;
use glommio::io::{DmaFile, ReadResult};

use crate::delivery::Location;
use crate::format::{
    BLOCK, Parsed, RecordView, SEGMENT_HEADER_BYTES, align_down, align_up, decode_trusted,
    parse_record,
};
use crate::log::Log;
use crate::state::{Cursor, Inner};

/// Attempts at reading a record from disk before it is given up as damaged.
const READ_ATTEMPTS: u32 = 3;

/// A window of one segment read from disk.
struct DiskWindow {
    segment: u64,
    file_off: u64,
    data: ReadResult,
}

/// The log's reader. Shard-local; there is one per log ([`Log::reader`]).
///
/// It hands out records after the delivered watermark, including records appended but not
/// yet durable, never past the last record appended. Report each handed-out record with
/// [`Log::done`] or [`Log::retry`].
pub struct Reader {
    inner: Rc<Inner>,
    cursor: Cursor,
    window: Option<DiskWindow>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("next_seq", &self.cursor.next_seq)
            .finish_non_exhaustive()
    }
}

enum Outcome {
    /// Handed out.
    Handed,
    /// The callback declined it: stop here.
    Declined,
    /// Unreadable: counted, reported done, skipped.
    Lost,
}

impl Log {
    /// The log's reader; `None` if it was already taken.
    pub fn reader(&self) -> Option<Reader> {
        if self.inner.reader_taken.replace(true) {
            return None;
        }
        let cursor = self.inner.start.take().expect("set at open");
        Some(Reader {
            inner: self.inner.clone(),
            cursor,
            window: None,
        })
    }
}

impl Reader {
    /// The sequence number of the next new record this reader will hand out.
    pub fn next_seq(&self) -> u64 {
        self.cursor.next_seq
    }

    /// Waits until a record can be handed out, then calls `f` with up to `max` of them, in
    /// sequence order, records asked for again ([`Log::retry`]) first. Returns how many
    /// were handed out.
    ///
    /// `f` returning `Break` declines that record: it stays first in line and `read`
    /// returns at once (possibly 0), so that the caller can make room (poll its producer)
    /// before reading again. `f` must not append to this log. After [`Log::close`], `read`
    /// hands out what is left and then never returns: stop calling it.
    pub async fn read<F>(&mut self, max: usize, mut f: F) -> usize
    where
        F: FnMut(RecordView<'_>) -> ControlFlow<()>,
    {
        loop {
            let (n, declined) = self.read_available(max, &mut f).await;
            if n > 0 || declined || max == 0 {
                return n;
            }
            self.readable().await;
        }
    }

    async fn read_available<F>(&mut self, max: usize, f: &mut F) -> (usize, bool)
    where
        F: FnMut(RecordView<'_>) -> ControlFlow<()>,
    {
        let mut n = 0;
        while n < max {
            let Some(at) = self.inner.d.borrow_mut().peek_retry() else {
                break;
            };
            match self.hand_out_again(at, f).await {
                Outcome::Handed => n += 1,
                Outcome::Declined => return (n, true),
                Outcome::Lost => {}
            }
        }
        while n < max && self.settle() {
            let (k, declined) = match self.take_from_memory(max - n, f) {
                Some(result) => result,
                None => self.take_from_disk(max - n, f).await,
            };
            n += k;
            if declined {
                return (n, true);
            }
        }
        (n, false)
    }

    async fn readable(&self) {
        let inner = &self.inner;
        let next = self.cursor.next_seq;
        future::poll_fn(|cx| {
            let ready = next <= inner.w.borrow().last_appended()
                || inner.d.borrow_mut().peek_retry().is_some();
            if ready || inner.stopping.get() {
                Poll::Ready(())
            } else {
                inner.readable_waiters.register(cx.waker());
                Poll::Pending
            }
        })
        .await;
        if inner.stopping.get() {
            // Closing: do not spin; the caller's own shutdown ends the loop.
            future::pending::<()>().await;
        }
    }

    /// Moves the cursor to where the next record is; false when there is none yet. Skips
    /// (and counts as done) sequence numbers that no segment holds.
    fn settle(&mut self) -> bool {
        let (ready, skipped) = self.locate();
        if skipped {
            self.inner.advance_delivered();
        }
        ready
    }

    /// [`Reader::settle`] under the writer's borrow: (a record is ready, something was
    /// skipped).
    fn locate(&mut self) -> (bool, bool) {
        let w = self.inner.w.borrow();
        let mut skipped = false;
        loop {
            let next = self.cursor.next_seq;
            if next > w.last_appended() {
                return (false, skipped);
            }
            if let Some(seg) = self.cursor.segment.and_then(|id| w.segment(id)) {
                if next <= seg.last_seq {
                    return (true, skipped);
                }
                if !seg.sealed {
                    return (false, skipped);
                }
            }
            let Some(seg) = w.segment_at_or_after(next) else {
                // No segment holds anything from `next` to the last sequence number: a
                // range lost to damage at the end of the log. Skip it, or `read` would find
                // records "available" and nothing to hand out, forever.
                let last = w.last_appended();
                self.inner.d.borrow_mut().skipped_to(last);
                self.cursor.next_seq = last + 1;
                return (false, true);
            };
            if seg.id < next {
                // Unreachable by construction: the cursor never enters a segment mid-way
                // except from recovery's resume position. Skip rather than guess an offset.
                tracing::error!(
                    segment = seg.id,
                    next,
                    "disk buffer reader lost its place; skipping the segment"
                );
                self.inner.d.borrow_mut().skipped_to(seg.last_seq);
                self.cursor.next_seq = seg.last_seq + 1;
                self.cursor.segment = Some(seg.id);
                skipped = true;
                continue;
            }
            if seg.id > next {
                self.inner.d.borrow_mut().skipped_to(seg.id - 1);
                skipped = true;
            }
            self.cursor = Cursor {
                next_seq: seg.id,
                segment: Some(seg.id),
                offset: SEGMENT_HEADER_BYTES,
                timestamp_ms: None,
            };
        }
    }

    /// Hands out records of the chunk holding the cursor's record, if it is in memory.
    fn take_from_memory<F>(&mut self, max: usize, f: &mut F) -> Option<(usize, bool)>
    where
        F: FnMut(RecordView<'_>) -> ControlFlow<()>,
    {
        let (buf, file_off, last) = {
            let w = self.inner.w.borrow();
            let c = w.chunk_of(self.cursor.next_seq)?;
            (c.buf.clone(), c.file_off, c.last_seq)
        };
        let mut n = 0;
        while n < max && self.cursor.next_seq <= last {
            let at = (self.cursor.offset - file_off) as usize;
            let (view, len) = decode_trusted(&buf.as_bytes()[at..]);
            debug_assert_eq!(view.seq, self.cursor.next_seq);
            if f(view).is_break() {
                return Some((n, true));
            }
            self.handed(view.timestamp_ms, len);
            n += 1;
        }
        self.inner.stats.read_memory_records.add(n as u64);
        Some((n, false))
    }

    fn handed(&mut self, timestamp_ms: i64, len: usize) {
        let c = &mut self.cursor;
        self.inner.d.borrow_mut().handed_out(Location {
            seq: c.next_seq,
            segment: c.segment.expect("settled"),
            offset: c.offset as u32,
            len: len as u32,
            timestamp_ms,
        });
        self.inner.next_timestamp_ms.set(Some(timestamp_ms));
        c.next_seq += 1;
        c.offset += len as u64;
    }

    /// Hands out records from disk, up to the first record held in memory. A record that
    /// does not read back valid is read again a few times, then skipped as damaged: never a
    /// spin, never a stop.
    async fn take_from_disk<F>(&mut self, max: usize, f: &mut F) -> (usize, bool)
    where
        F: FnMut(RecordView<'_>) -> ControlFlow<()>,
    {
        let Some((segment, file, size, upto)) = self.disk_extent() else {
            return (0, false);
        };
        let max_record = self.inner.cfg.max_record_bytes;
        // `loaded`: the bytes needed when the window was last read (0: read before).
        let (mut n, mut failures, mut declined, mut loaded) = (0, 0, false, 0);
        while n < max && self.cursor.next_seq <= upto {
            let offset = self.cursor.offset;
            let window = self.window_at(segment, offset);
            let expected = Some(self.cursor.next_seq);
            let parsed = window
                .as_ref()
                .map(|data| (parse_record(data, expected, max_record), data.len()));
            let need = match parsed {
                Some((Parsed::Record(view, len), _)) => {
                    if f(view).is_break() {
                        declined = true;
                        break;
                    }
                    self.handed(view.timestamp_ms, len);
                    (n, failures, loaded) = (n + 1, 0, 0);
                    continue;
                }
                Some((Parsed::Incomplete(k), have))
                    if have < k && offset + k as u64 <= size && k > loaded =>
                {
                    k
                }
                // Not a valid record (or a window that cannot hold one even just read):
                // read it again after a pause, a few times, then give up on the range.
                Some(_) | None if loaded > 0 => {
                    failures += 1;
                    if failures >= READ_ATTEMPTS {
                        self.skip_damaged(segment, upto);
                        break;
                    }
                    self.window = None;
                    glommio::timer::sleep(Duration::from_millis(10 * u64::from(failures))).await;
                    crate::format::RECORD_HEADER_BYTES
                }
                _ => crate::format::RECORD_HEADER_BYTES,
            };
            match self.load(segment, &file, offset, need, size).await {
                Ok(()) => loaded = need,
                Err(e) => {
                    self.inner.storage_error("reading a segment", &e);
                    failures += 1;
                    if failures >= READ_ATTEMPTS {
                        self.skip_damaged(segment, upto);
                        break;
                    }
                    glommio::timer::sleep(Duration::from_millis(10 * u64::from(failures))).await;
                }
            }
        }
        self.inner.stats.read_disk_records.add(n as u64);
        (n, declined)
    }

    /// The cursor's segment, its file and size, and the last record to take from disk.
    fn disk_extent(&self) -> Option<(u64, Rc<DmaFile>, u64, u64)> {
        let w = self.inner.w.borrow();
        let seg = w.segment(self.cursor.segment?)?;
        let in_memory = w
            .first_in_memory()
            .filter(|&m| m > self.cursor.next_seq && m <= seg.last_seq);
        let upto = in_memory.map_or(seg.last_seq, |m| m - 1);
        Some((seg.id, seg.file.clone()?, seg.size, upto))
    }

    /// The bytes of the window from `offset`, if the window holds at least a record header
    /// there.
    fn window_at(&self, segment: u64, offset: u64) -> Option<ReadResult> {
        let w = self.window.as_ref().filter(|w| w.segment == segment)?;
        let rel = offset.checked_sub(w.file_off)? as usize;
        if rel + crate::format::RECORD_HEADER_BYTES > w.data.len() {
            return None;
        }
        ReadResult::slice(&w.data, rel, w.data.len() - rel)
    }

    async fn load(
        &mut self,
        segment: u64,
        file: &DmaFile,
        offset: u64,
        need: usize,
        size: u64,
    ) -> std::io::Result<()> {
        let start = align_down(offset as usize, BLOCK) as u64;
        let want = align_up((offset - start) as usize + need, BLOCK).max(self.inner.cfg.read_bytes);
        // Whole blocks (direct I/O), even when a damaged file ends mid-block.
        let len = align_up((want as u64).min(size - start) as usize, BLOCK);
        let data = self.inner.io.read_at(file, start, len).await?;
        self.inner.stats.read_disk_bytes.add(data.len() as u64);
        self.window = Some(DiskWindow {
            segment,
            file_off: start,
            data,
        });
        Ok(())
    }

    /// Records `cursor..=upto` could not be read back: counted, logged, skipped, and the
    /// segment quarantined once delivered.
    fn skip_damaged(&mut self, segment: u64, upto: u64) {
        let from = self.cursor.next_seq;
        self.inner.stats.read_errors.add(upto - from + 1);
        tracing::error!(
            segment,
            from,
            upto,
            "disk buffer: records unreadable on disk, skipped"
        );
        self.inner.d.borrow_mut().skipped_to(upto);
        let w = self.inner.w.borrow();
        let resume = w.chunk_of(upto + 1).map(|c| c.rec_start);
        let end = w.segment(segment).map(|s| s.end);
        drop(w);
        if let Some(s) = self.inner.w.borrow_mut().segment_mut(segment) {
            s.damaged = true;
        }
        self.cursor.next_seq = upto + 1;
        self.cursor.offset = resume.or(end).unwrap_or(SEGMENT_HEADER_BYTES);
        self.window = None;
        self.inner.advance_delivered();
    }

    /// Hands out a record again: from memory if it is still there, else one small read.
    async fn hand_out_again<F>(&mut self, at: Location, f: &mut F) -> Outcome
    where
        F: FnMut(RecordView<'_>) -> ControlFlow<()>,
    {
        let in_memory = self
            .inner
            .w
            .borrow()
            .chunk_of(at.seq)
            .map(|c| (c.buf.clone(), c.file_off));
        if let Some((buf, file_off)) = in_memory {
            let (view, _) =
                decode_trusted(&buf.as_bytes()[(u64::from(at.offset) - file_off) as usize..]);
            if f(view).is_break() {
                return Outcome::Declined;
            }
            self.inner.d.borrow_mut().retried(at.seq);
            return Outcome::Handed;
        }
        for attempt in 0..READ_ATTEMPTS {
            let data = self.read_one(at).await;
            let max = self.inner.cfg.max_record_bytes;
            if let Some(data) = data
                && let Parsed::Record(view, _) = parse_record(&data, Some(at.seq), max)
            {
                if f(view).is_break() {
                    return Outcome::Declined;
                }
                self.inner.stats.read_disk_records.incr();
                self.inner.d.borrow_mut().retried(at.seq);
                return Outcome::Handed;
            }
            glommio::timer::sleep(Duration::from_millis(10 * u64::from(attempt + 1))).await;
        }
        self.inner.stats.read_errors.incr();
        tracing::error!(
            seq = at.seq,
            segment = at.segment,
            "disk buffer: record unreadable on disk, given up"
        );
        {
            let mut d = self.inner.d.borrow_mut();
            d.retried(at.seq);
            let _ = d.done(at.seq);
        }
        self.inner.advance_delivered();
        Outcome::Lost
    }

    async fn read_one(&self, at: Location) -> Option<ReadResult> {
        let file = self.inner.w.borrow().segment(at.segment)?.file.clone()?;
        let start = align_down(at.offset as usize, BLOCK) as u64;
        let len = align_up(at.offset as usize + at.len as usize, BLOCK) - start as usize;
        let data = match self.inner.io.read_at(&file, start, len).await {
            Ok(d) => d,
            Err(e) => {
                self.inner.storage_error("reading a record again", &e);
                return None;
            }
        };
        let rel = at.offset as usize - start as usize;
        ReadResult::slice(&data, rel, data.len().checked_sub(rel)?)
    }
}
