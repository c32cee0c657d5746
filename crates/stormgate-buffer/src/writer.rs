//! The writer's state: segments, and the chunks of segment data held in memory. Synchronous
//! and free of I/O, so that the append path is a memory copy and a CRC.
//!
//! A **chunk** is a block-aligned DMA buffer holding the bytes of one segment from a block
//! boundary on. Records are encoded straight into the last chunk; a flush seals it (trims it
//! to whole blocks, the tail zero-filled) and writes it whole, so the written bytes are
//! exactly what recovery will read. The next append opens a new chunk that starts with a
//! copy of the sealed chunk's partial last block: that block is written again by the next
//! flush with more records in it, and the bytes of the records already durable in it are
//! unchanged, so a torn rewrite cannot lose them. Chunks overlap by that block, so the
//! flusher writes them in order, one at a time.
//!
//! Sealed chunks stay in memory after they are durable, up to `memory_bytes`, so that a
//! reader close behind the writer never touches the disk; chunks whose records are all
//! delivered go at once.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use glommio::io::DmaBuffer;

use crate::config::LogConfig;
use crate::format::{
    BLOCK, RecordKind, SEGMENT_HEADER_BYTES, SegmentHeader, align_down, align_up, encode_record,
    segment_file_name,
};

/// Smallest chunk: a few blocks, so that a trickle of records does not hold big buffers.
const MIN_CHUNK_BYTES: usize = 16 << 10;

/// One segment file of the log.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Its first sequence number, which names it.
    pub id: u64,
    pub path: PathBuf,
    /// Open once the file exists on disk (created by the maintenance task).
    pub file: Option<Rc<glommio::io::DmaFile>>,
    pub size: u64,
    /// Last record appended to it (`id - 1` when none).
    pub last_seq: u64,
    /// End of its last record.
    pub end: u64,
    /// No more appends go to it.
    pub sealed: bool,
    /// Move to quarantine rather than remove it once delivered.
    pub damaged: bool,
    /// Its file will be the preallocated spare, renamed.
    pub uses_spare: bool,
}

/// A block-aligned piece of one segment's data, in memory.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub id: u64,
    pub segment: u64,
    /// File offset of the buffer's first byte (block-aligned).
    pub file_off: u64,
    pub buf: Rc<DmaBuffer>,
    /// Bytes filled, from `file_off`.
    pub len: usize,
    /// File offset of this chunk's first record of its own (after the copied partial block
    /// or the header).
    pub rec_start: u64,
    /// First record of this chunk (`last_seq + 1` when it has none of its own).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Immutable: written whole by a flush.
    pub sealed: bool,
    pub durable: bool,
    /// The allocation's size (what it costs in memory).
    pub cap: usize,
}

impl Chunk {
    fn has_records(&self) -> bool {
        self.last_seq >= self.first_seq
    }

    /// The file range a flush writes.
    pub(crate) fn write_range(&self) -> (u64, usize) {
        (self.file_off, self.buf.len())
    }
}

/// The spare segment file the maintenance task keeps ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spare {
    None,
    /// Being created; counted in `usage_bytes` already.
    Creating,
    Ready,
}

/// Where the next record goes.
enum Room {
    Enough,
    Grow(usize),
    NewChunk,
}

/// A record to append, with its encoded length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewRecord<'a> {
    pub timestamp_ms: i64,
    pub kind: RecordKind,
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// [`crate::format::record_len`] of key and value.
    pub len: usize,
}

/// Why an append was refused before anything changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Full,
    Staging,
}

/// What a flush writes: the sealed, not yet durable chunks, in order.
#[derive(Debug)]
pub(crate) struct FlushBatch {
    /// (segment, file offset, buffer) per chunk.
    pub writes: Vec<(u64, u64, Rc<DmaBuffer>)>,
    /// Highest chunk id in the batch.
    pub last_chunk: u64,
    /// Highest sequence number the batch makes durable.
    pub target_seq: u64,
    /// Append time of the oldest record in it.
    pub oldest: Option<Instant>,
}

/// Everything the append path and the flusher share.
#[derive(Debug)]
pub(crate) struct Writer {
    pub segments: VecDeque<Segment>,
    pub chunks: VecDeque<Chunk>,
    pub next_seq: u64,
    /// Capacity of chunks not yet durable.
    pub staged_bytes: usize,
    /// Capacity of durable chunks kept for the reader.
    pub kept_bytes: usize,
    /// Bytes appended since the last seal.
    pub pending_bytes: usize,
    /// Append time of the oldest record not yet in a flush.
    pub pending_since: Option<Instant>,
    /// Append time of the oldest record not yet durable.
    pub oldest_unflushed: Option<Instant>,
    /// Disk bytes the log's files take or have reserved (segments, spare, checkpoint).
    pub usage_bytes: u64,
    pub spare: Spare,
    /// Flushes fail: appends past the staging bound are `Failed`, not `Busy`.
    pub failing: bool,
    /// No more appends (closed, or opened to drain).
    pub closed: bool,
    /// Why the last refused append was refused (what `writable` waits for).
    pub last_refusal: Option<Refusal>,
    /// Bytes per flush lately: sizes new chunks.
    recent_flush_bytes: usize,
    next_chunk_id: u64,
    dir: PathBuf,
}

impl Writer {
    pub(crate) fn new(dir: PathBuf, next_seq: u64, usage_bytes: u64) -> Writer {
        Writer {
            segments: VecDeque::new(),
            chunks: VecDeque::new(),
            next_seq,
            staged_bytes: 0,
            kept_bytes: 0,
            pending_bytes: 0,
            pending_since: None,
            oldest_unflushed: None,
            usage_bytes,
            spare: Spare::None,
            failing: false,
            closed: false,
            last_refusal: None,
            recent_flush_bytes: 0,
            next_chunk_id: 0,
            dir,
        }
    }

    /// The segment appends go to, if it is open for them.
    fn active(&self) -> Option<&Segment> {
        self.segments.back().filter(|s| !s.sealed)
    }

    /// Makes room for a record and encodes it. The hot path.
    #[inline]
    pub(crate) fn append(
        &mut self,
        cfg: &LogConfig,
        now_ms: impl FnOnce() -> i64,
        rec: NewRecord<'_>,
    ) -> Result<u64, Refusal> {
        let len = rec.len;
        if self.staged_bytes >= cfg.staging_max_bytes {
            return Err(Refusal::Staging);
        }
        self.last_refusal = None;
        let seq = self.next_seq;
        let fits = self.active().is_some_and(|s| s.end + len as u64 <= s.size);
        if !fits {
            self.roll(cfg, seq, now_ms(), len)?;
        }
        match self.room_in_open_chunk(cfg, len) {
            Room::Enough => {}
            Room::Grow(need) => self.grow_open_chunk(cfg, need),
            Room::NewChunk => self.open_chunk(cfg, len, None),
        }
        let seg = self.segments.back_mut().expect("rolled or open");
        let chunk = self.chunks.back_mut().expect("opened");
        let at = (seg.end - chunk.file_off) as usize;
        let buf = Rc::get_mut(&mut chunk.buf).expect("the open chunk is not shared");
        let dst = &mut buf.as_bytes_mut()[at..];
        encode_record(dst, seq, rec.timestamp_ms, rec.kind, rec.key, rec.value);
        chunk.len = at + len;
        chunk.last_seq = seq;
        seg.end += len as u64;
        seg.last_seq = seq;
        self.next_seq = seq + 1;
        self.pending_bytes += len;
        Ok(seq)
    }

    /// Whether the record fits in the open chunk as it is, after growing it, or needs a new
    /// chunk: a chunk grows (a copy) only up to [`max_chunk_bytes`]; past that the flush
    /// writes one more chunk instead. At a high rate a flush carries several MB while the
    /// previous one syncs, and doubling up to that copied every byte once more and faulted
    /// in each new buffer's pages (6% of a shard's time at 600K records/s in a profile).
    fn room_in_open_chunk(&self, cfg: &LogConfig, len: usize) -> Room {
        let Some(c) = self.chunks.back() else {
            return Room::NewChunk;
        };
        let seg = self.segments.back().expect("a chunk has a segment");
        // Shared only if a reader callback appends: never write under a reader.
        if c.sealed || c.segment != seg.id || Rc::strong_count(&c.buf) > 1 {
            return Room::NewChunk;
        }
        let need = (seg.end - c.file_off) as usize + len;
        if need <= c.cap {
            Room::Enough
        } else if c.cap >= max_chunk_bytes(cfg) {
            Room::NewChunk
        } else {
            Room::Grow(need)
        }
    }

    /// Moves the open chunk into a buffer twice as large (or as large as needed, never past
    /// the segment): one write per flush, whatever was appended since the last one. Each
    /// byte is copied once more on average, far cheaper than a write per chunk.
    fn grow_open_chunk(&mut self, cfg: &LogConfig, need: usize) {
        let seg_size = self.segments.back().expect("an active segment").size;
        let c = self.chunks.back_mut().expect("an open chunk");
        let room = (seg_size - c.file_off) as usize;
        // Within the staging bound, unless this one record needs more.
        let others = self.staged_bytes - c.cap;
        let bound = cfg.staging_max_bytes.saturating_sub(others).max(need);
        let cap = align_up((2 * c.cap).min(bound).max(need), BLOCK).min(room);
        let mut buf = glommio::allocate_dma_buffer_global(cap);
        buf.as_bytes_mut()[..c.len].copy_from_slice(&c.buf.as_bytes()[..c.len]);
        self.staged_bytes += cap - c.cap;
        c.buf = Rc::new(buf);
        c.cap = cap;
    }

    /// Starts a new segment at `seq` (the current one, if any, takes no more appends).
    fn roll(&mut self, cfg: &LogConfig, seq: u64, now_ms: i64, len: usize) -> Result<(), Refusal> {
        // A spare being created is claimed too: its reservation is this segment's.
        let uses_spare = self.spare != Spare::None;
        if !uses_spare && self.usage_bytes + cfg.segment_bytes > cfg.max_bytes {
            return Err(Refusal::Full);
        }
        if uses_spare {
            self.spare = Spare::None;
        } else {
            self.usage_bytes += cfg.segment_bytes;
        }
        if let Some(active) = self.segments.back_mut() {
            active.sealed = true;
        }
        if let Some(c) = self.chunks.back_mut() {
            seal(c, &mut self.staged_bytes, &mut self.kept_bytes);
        }
        self.segments.push_back(Segment {
            id: seq,
            path: self.dir.join(segment_file_name(seq)),
            file: None,
            size: cfg.segment_bytes,
            last_seq: seq - 1,
            end: SEGMENT_HEADER_BYTES,
            sealed: false,
            damaged: false,
            uses_spare,
        });
        let header = SegmentHeader {
            first_seq: seq,
            segment_bytes: cfg.segment_bytes,
            created_at_ms: now_ms,
        };
        self.open_chunk(cfg, len, Some(header));
        Ok(())
    }

    /// Opens a chunk at the active segment's end: from the block holding it, with that
    /// block's bytes so far copied from the previous chunk; or, for a new segment, from
    /// offset 0 with its header block.
    fn open_chunk(&mut self, cfg: &LogConfig, len: usize, header: Option<SegmentHeader>) {
        let seg = self.segments.back().expect("an active segment");
        let block_start = if header.is_some() {
            0
        } else {
            align_down(seg.end as usize, BLOCK) as u64
        };
        let partial = (seg.end - block_start) as usize;
        let room = (seg.size - block_start) as usize;
        let recent = self.recent_flush_bytes.max(self.pending_bytes);
        let cap = chunk_capacity(partial, len, recent, room, cfg);
        let mut buf = glommio::allocate_dma_buffer_global(cap);
        if let Some(h) = header {
            h.encode(buf.as_bytes_mut());
        } else if partial > 0 {
            let prev = self
                .chunks
                .back()
                .expect("a partial block comes from a chunk");
            debug_assert_eq!(prev.segment, seg.id);
            let from = (block_start - prev.file_off) as usize;
            let bytes = &prev.buf.as_bytes()[from..from + partial];
            buf.as_bytes_mut()[..partial].copy_from_slice(bytes);
        }
        if let Some(prev) = self.chunks.back_mut() {
            seal(prev, &mut self.staged_bytes, &mut self.kept_bytes);
        }
        let id = self.next_chunk_id;
        self.next_chunk_id += 1;
        self.staged_bytes += cap;
        self.chunks.push_back(Chunk {
            id,
            segment: seg.id,
            file_off: block_start,
            buf: Rc::new(buf),
            len: partial,
            rec_start: block_start + partial as u64,
            first_seq: self.next_seq,
            last_seq: self.next_seq - 1,
            sealed: false,
            durable: false,
            cap,
        });
    }

    /// Seeds the tail chunk when the log continues in a recovered segment: the bytes of its
    /// partial last block, already durable.
    pub(crate) fn seed_tail(&mut self, tail_block: &[u8]) {
        let seg = self.segments.back().expect("continuing a segment");
        let block_start = align_down(seg.end as usize, BLOCK) as u64;
        debug_assert_eq!(block_start + tail_block.len() as u64, seg.end);
        let cap = BLOCK;
        let mut buf = glommio::allocate_dma_buffer_global(cap);
        buf.as_bytes_mut()[..tail_block.len()].copy_from_slice(tail_block);
        let id = self.next_chunk_id;
        self.next_chunk_id += 1;
        self.kept_bytes += cap;
        self.chunks.push_back(Chunk {
            id,
            segment: seg.id,
            file_off: block_start,
            buf: Rc::new(buf),
            len: tail_block.len(),
            rec_start: seg.end,
            first_seq: self.next_seq,
            last_seq: self.next_seq - 1,
            sealed: true,
            durable: true,
            cap,
        });
    }

    /// Whether the condition that refused the last append has cleared.
    pub(crate) fn has_room(&self, cfg: &LogConfig) -> bool {
        self.closed
            || match self.last_refusal {
                None => true,
                Some(Refusal::Staging) => self.staged_bytes < cfg.staging_max_bytes,
                Some(Refusal::Full) => {
                    self.spare != Spare::None
                        || self.usage_bytes + cfg.segment_bytes <= cfg.max_bytes
                }
            }
    }

    /// Whether a flush has something to do.
    pub(crate) fn has_unflushed(&self) -> bool {
        self.pending_since.is_some() || self.chunks.iter().any(|c| c.sealed && !c.durable)
    }

    /// Seals the open chunk and collects every chunk not yet durable.
    pub(crate) fn take_batch(&mut self) -> Option<FlushBatch> {
        if let Some(c) = self.chunks.back_mut()
            && !c.sealed
            && c.has_records()
        {
            seal(c, &mut self.staged_bytes, &mut self.kept_bytes);
        }
        if self.pending_bytes > 0 {
            // Decays slowly so that one idle moment does not shrink chunks for a burst.
            self.recent_flush_bytes = self
                .pending_bytes
                .max(self.recent_flush_bytes - self.recent_flush_bytes / 4);
        }
        self.pending_bytes = 0;
        if let Some(t) = self.pending_since.take() {
            self.oldest_unflushed.get_or_insert(t);
        }
        let mut batch = FlushBatch {
            writes: Vec::new(),
            last_chunk: 0,
            target_seq: 0,
            oldest: self.oldest_unflushed,
        };
        for c in self.chunks.iter().filter(|c| c.sealed && !c.durable) {
            let (off, _) = c.write_range();
            batch.writes.push((c.segment, off, c.buf.clone()));
            batch.last_chunk = c.id;
            batch.target_seq = batch.target_seq.max(c.last_seq);
        }
        (!batch.writes.is_empty()).then_some(batch)
    }

    /// The batch is on disk: its chunks are durable.
    pub(crate) fn flushed(&mut self, batch: &FlushBatch) {
        for c in self
            .chunks
            .iter_mut()
            .take_while(|c| c.id <= batch.last_chunk)
        {
            if !c.durable && c.sealed {
                mark_durable(c, &mut self.staged_bytes, &mut self.kept_bytes);
            }
        }
        if self.pending_since.is_none() && !self.chunks.iter().any(|c| !c.durable) {
            self.oldest_unflushed = None;
        } else {
            self.oldest_unflushed = self.pending_since;
        }
    }

    /// Drops durable chunks the reader cannot need (all records delivered) or that exceed
    /// the memory budget, oldest first. The last chunk stays: appends copy its partial block.
    pub(crate) fn evict(&mut self, delivered: u64, memory_bytes: usize) {
        while self.chunks.len() > 1 {
            let c = self.chunks.front().expect("len > 1");
            let done = !c.has_records() || c.last_seq <= delivered;
            if !c.durable || !(done || self.kept_bytes > memory_bytes) {
                break;
            }
            self.kept_bytes -= c.cap;
            self.chunks.pop_front();
        }
    }

    /// The chunk holding record `seq`, if it is in memory.
    pub(crate) fn chunk_of(&self, seq: u64) -> Option<&Chunk> {
        let i = self.chunks.partition_point(|c| c.last_seq < seq);
        self.chunks
            .get(i)
            .filter(|c| c.first_seq <= seq && seq <= c.last_seq)
    }

    /// Lowest sequence number held in memory, if any.
    pub(crate) fn first_in_memory(&self) -> Option<u64> {
        self.chunks
            .iter()
            .find(|c| c.has_records())
            .map(|c| c.first_seq)
    }

    /// The segment that holds `seq` or, if none does, the first one after it.
    pub(crate) fn segment_at_or_after(&self, seq: u64) -> Option<&Segment> {
        let i = self
            .segments
            .partition_point(|s| s.last_seq < seq && s.sealed);
        self.segments.get(i)
    }

    pub(crate) fn segment(&self, id: u64) -> Option<&Segment> {
        let i = self.segments.partition_point(|s| s.id < id);
        self.segments.get(i).filter(|s| s.id == id)
    }

    pub(crate) fn segment_mut(&mut self, id: u64) -> Option<&mut Segment> {
        let i = self.segments.partition_point(|s| s.id < id);
        self.segments.get_mut(i).filter(|s| s.id == id)
    }

    /// The last sequence number appended.
    pub(crate) fn last_appended(&self) -> u64 {
        self.next_seq - 1
    }
}

/// Makes a chunk immutable: zeros after its data to the end of the block, trimmed to whole
/// blocks (what the flush writes, and what recovery will read).
fn seal(c: &mut Chunk, staged_bytes: &mut usize, kept_bytes: &mut usize) {
    if c.sealed {
        return;
    }
    c.sealed = true;
    let end = align_up(c.len, BLOCK);
    match Rc::get_mut(&mut c.buf) {
        Some(buf) => {
            buf.as_bytes_mut()[c.len..end].fill(0);
            buf.trim_to_size(end);
        }
        None => {
            // A reader holds the buffer (its callback appended): seal a copy instead.
            let mut copy = glommio::allocate_dma_buffer_global(end);
            copy.as_bytes_mut()[..c.len].copy_from_slice(&c.buf.as_bytes()[..c.len]);
            copy.as_bytes_mut()[c.len..].fill(0);
            c.buf = Rc::new(copy);
        }
    }
    if !c.has_records() && c.file_off > 0 {
        // Nothing of its own to write: only the copied partial block.
        mark_durable(c, staged_bytes, kept_bytes);
    }
}

fn mark_durable(c: &mut Chunk, staged_bytes: &mut usize, kept_bytes: &mut usize) {
    debug_assert!(c.sealed && !c.durable);
    c.durable = true;
    *staged_bytes -= c.cap;
    *kept_bytes += c.cap;
}

/// Largest chunk the writer opens or grows to (twice `flush_bytes`, at least
/// [`MIN_CHUNK_BYTES`]); a larger record gets a chunk of its own size.
fn max_chunk_bytes(cfg: &LogConfig) -> usize {
    (2 * cfg.flush_bytes).max(MIN_CHUNK_BYTES)
}

/// Size of a new chunk: room for the partial block and the record, and for about twice what
/// recent flushes carried, between 16 KiB and twice `flush_bytes`, never past the segment.
fn chunk_capacity(
    partial: usize,
    len: usize,
    recent: usize,
    room: usize,
    cfg: &LogConfig,
) -> usize {
    let need = align_up(partial + len, BLOCK);
    let max = max_chunk_bytes(cfg);
    let want = (partial + len.max(2 * recent))
        .next_power_of_two()
        .clamp(MIN_CHUNK_BYTES, max);
    align_up(want.max(need), BLOCK).min(room).max(need)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LogConfig {
        LogConfig {
            segment_bytes: 1 << 20,
            max_bytes: 4 << 20,
            staging_max_bytes: 1 << 20,
            flush_bytes: 64 << 10,
            max_record_bytes: 8 << 10,
            ..LogConfig::new(4 << 20)
        }
    }

    fn writer() -> Writer {
        Writer::new(PathBuf::from("/nowhere"), 1, 8192)
    }

    fn put(w: &mut Writer, cfg: &LogConfig, value_len: usize) -> Result<u64, Refusal> {
        let value = vec![b'v'; value_len];
        let len = crate::format::record_len(3, value_len);
        let rec = NewRecord {
            timestamp_ms: 5,
            kind: RecordKind::Metrics,
            key: b"key",
            value: &value,
            len,
        };
        w.append(cfg, || 0, rec)
    }

    /// The bytes a flush of every chunk would leave on disk for segment `id`.
    fn disk_image(w: &Writer, id: u64, size: usize) -> Vec<u8> {
        let mut img = vec![0u8; size];
        for c in w.chunks.iter().filter(|c| c.segment == id) {
            let b = c.buf.as_bytes();
            img[c.file_off as usize..c.file_off as usize + b.len()].copy_from_slice(b);
        }
        img
    }

    #[test]
    fn appends_across_flushes_leave_a_readable_segment_image() {
        let cfg = cfg();
        let mut w = writer();
        let mut expected = 1;
        for round in 0..20 {
            for _ in 0..(round % 7 + 1) {
                assert_eq!(put(&mut w, &cfg, 100 + round * 13), Ok(expected));
                expected += 1;
            }
            let batch = w.take_batch().expect("something to flush");
            assert!(
                batch
                    .writes
                    .iter()
                    .all(|(_, off, b)| off % BLOCK as u64 == 0 && b.len() % BLOCK == 0)
            );
            w.flushed(&batch);
        }
        assert_eq!(w.staged_bytes, 0);
        let img = disk_image(&w, 1, 1 << 20);
        let scan = crate::scan::scan_segment(&img[..], 1, 8192, None, 1 << 16).unwrap();
        assert_eq!(scan.records, expected - 1);
        assert_eq!(scan.stop, crate::scan::Stop::End);
    }

    #[test]
    fn a_segment_rolls_when_full_and_the_bound_gives_full() {
        let cfg = cfg();
        let mut w = writer();
        let mut rolls = 0;
        let mut last = 0;
        loop {
            match put(&mut w, &cfg, 4000) {
                Ok(s) => last = s,
                Err(Refusal::Full) => break,
                Err(Refusal::Staging) => {
                    let b = w.take_batch().unwrap();
                    w.flushed(&b);
                }
            }
            rolls = w.segments.len();
        }
        // 8 KiB checkpoint + 3 segments of 1 MiB fit in 4 MiB, a fourth does not.
        assert_eq!(rolls, 3);
        assert!(w.usage_bytes <= cfg.max_bytes);
        let second = w.segments[1].id;
        assert_eq!(w.segments[0].last_seq + 1, second);
        let b = w.take_batch().unwrap();
        w.flushed(&b);
        let img = disk_image(&w, second, 1 << 20);
        let scan = crate::scan::scan_segment(&img[..], second, 8192, None, 1 << 16).unwrap();
        assert_eq!(scan.first_seq + scan.records - 1, w.segments[1].last_seq);
        assert!(last > 0);
    }

    #[test]
    fn staging_is_bounded_until_a_flush_completes() {
        let cfg = cfg();
        let mut w = writer();
        let mut n = 0;
        while put(&mut w, &cfg, 1000).is_ok() {
            n += 1;
        }
        assert_eq!(put(&mut w, &cfg, 1000), Err(Refusal::Staging));
        assert!(w.staged_bytes <= cfg.staging_max_bytes + BLOCK);
        let b = w.take_batch().unwrap();
        w.flushed(&b);
        assert!(put(&mut w, &cfg, 1000).is_ok());
        assert!(n > 500);
    }

    #[test]
    fn chunks_are_found_by_sequence_number_and_evicted_once_delivered() {
        let cfg = cfg();
        let mut w = writer();
        for _ in 0..3 {
            for _ in 0..10 {
                put(&mut w, &cfg, 200).unwrap();
            }
            let b = w.take_batch().unwrap();
            w.flushed(&b);
        }
        for seq in 1..=30 {
            let c = w.chunk_of(seq).expect("in memory");
            assert!(c.first_seq <= seq && seq <= c.last_seq);
        }
        assert!(w.chunk_of(31).is_none());
        assert_eq!(w.first_in_memory(), Some(1));
        w.evict(20, usize::MAX);
        assert_eq!(w.first_in_memory(), Some(21));
        assert!(w.chunk_of(15).is_none());
        w.evict(30, usize::MAX);
        assert_eq!(
            w.chunks.len(),
            1,
            "the tail chunk stays for the next partial block"
        );
        w.evict(0, 0);
        assert_eq!(w.chunks.len(), 1);
    }

    #[test]
    fn the_open_chunk_grows_to_twice_flush_bytes_and_a_flush_writes_more_chunks_past_it() {
        let cfg = cfg();
        let max = max_chunk_bytes(&cfg);
        let mut w = writer();
        // Under the largest chunk: one chunk, grown in place; one write.
        let mut appended = 0;
        while w.chunks.back().is_none_or(|c| c.len + 600 < max) {
            put(&mut w, &cfg, 500).unwrap();
            appended += 1;
        }
        assert_eq!(w.chunks.len(), 1);
        assert_eq!(w.chunks[0].cap, max, "grown to the largest chunk");
        // Past it: a second chunk rather than a copy into a larger buffer.
        for _ in 0..appended {
            put(&mut w, &cfg, 500).unwrap();
        }
        assert_eq!(w.chunks.len(), 2);
        assert!(w.chunks.iter().all(|c| c.cap <= max));
        let batch = w.take_batch().unwrap();
        assert_eq!(batch.writes.len(), 2);
        assert_eq!(batch.target_seq, 2 * appended);
        // Written in order, the second chunk rewrites the block the first one ended in:
        // every record is on disk.
        let img = disk_image(&w, 1, 1 << 20);
        let scan = crate::scan::scan_segment(&img[..], 1, 8192, None, 1 << 16).unwrap();
        assert_eq!(scan.records, 2 * appended);
        w.flushed(&batch);
        assert_eq!(w.staged_bytes, 0);
    }
}
