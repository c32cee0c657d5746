//! Opening a log directory after anything: a clean stop, a crash, a power cut, damage.
//!
//! Three steps. [`scan_dir`] reads every file (std I/O; run on glommio's blocking thread by
//! `Log::open`, directly by the offline tools) and validates every segment. `plan` decides,
//! as a pure function of what was found, what each segment is: kept and delivered, cut at a
//! torn tail, quarantined, removed as empty. `apply` carries the decisions out (std I/O
//! again). The offline tools run the first two and report; they change nothing.
//!
//! The rules, each with a logged, counted [`RecoveryEvent`]:
//! - A torn tail (an invalid record with no valid record after it) in the newest segment is
//!   cut: the partial block is rewritten with zeros after the last valid record, the rest of
//!   the segment is deallocated and reserved again, so no stale record can reappear once new
//!   records are written over the cut. The writer continues at the cut.
//! - An invalid record with valid records after it, or any damage in a sealed segment that
//!   loses records (its valid prefix does not reach the next segment's first record): the
//!   valid prefix is delivered, the rest is skipped; the file moves to `quarantine/` once its
//!   prefix is delivered (a rename: no copy, no extra space), and appends go to a new segment
//!   numbered past every sequence number found, so none is reused.
//! - A segment file with no valid record: removed if it holds nothing but zeros (a crash
//!   between creating a file and writing it), quarantined at once otherwise.
//! - A damaged header: the file name gives the first sequence number; the records (which
//!   carry their own sequence numbers and CRCs) are delivered; the file is quarantined after.
//! - A missing or unreadable checkpoint: everything present is delivered again (duplicates,
//!   counted), nothing is removed because of it, and a fresh checkpoint is written.
//! - Unknown files are reported and left alone.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::format::{
    BLOCK, CHECKPOINT_FILE_BYTES, CheckpointSlot, HeaderState, SEGMENT_HEADER_BYTES, align_down,
    align_up, parse_segment_file_name,
};
use crate::scan::{Position, SegmentScan, Stop, scan_segment};

/// Name of the checkpoint file in a log directory.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// Name of the lock file in a log directory.
pub const LOCK_FILE: &str = "lock";
/// Name of the preallocated spare segment.
pub const SPARE_FILE: &str = "spare.tmp";
/// Subdirectory for damaged segments.
pub const QUARANTINE_DIR: &str = "quarantine";

/// What the checkpoint file held at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointState {
    /// A valid slot.
    Valid(CheckpointSlot),
    /// No checkpoint file.
    Missing,
    /// A file with no valid slot (both damaged, or the wrong size).
    Corrupt,
}

/// Something recovery found that is not a clean log, and what it did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryEvent {
    /// The newest segment ended in an invalid record with nothing valid after it: the bytes
    /// from `offset` (`stale_bytes` of them, never reported durable) were cut.
    TornTail {
        /// The segment file.
        segment: PathBuf,
        /// End of the last valid record.
        offset: u64,
        /// Non-zero bytes past it.
        stale_bytes: u64,
    },
    /// Damage that loses records: the valid prefix is delivered, the rest skipped, and the
    /// file quarantined after.
    Damaged {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the first invalid record.
        offset: u64,
        /// Bytes from there to the end of the non-zero data.
        damaged_bytes: u64,
        /// Valid records found after the damage (skipped: their sequence numbers are not
        /// contiguous with the prefix).
        records_after_damage: u64,
    },
    /// Reading a segment failed; its readable prefix is delivered, the file quarantined after.
    Unreadable {
        /// The segment file.
        segment: PathBuf,
        /// Where reading failed.
        offset: u64,
        /// The error's OS code.
        errno: Option<i32>,
    },
    /// The header block is damaged or was never written; the file name's sequence number was
    /// used.
    DamagedHeader {
        /// The segment file.
        segment: PathBuf,
    },
    /// The file's size is not the size its header gives.
    SizeMismatch {
        /// The segment file.
        segment: PathBuf,
        /// Size in the header.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A segment file without one valid record and nothing but zeros: removed.
    EmptySegment {
        /// The segment file.
        segment: PathBuf,
    },
    /// A segment file without one valid record but with other bytes: quarantined at once.
    NoValidRecords {
        /// The segment file.
        segment: PathBuf,
    },
    /// A segment whose records overlap the previous segment's: quarantined, not delivered.
    Overlap {
        /// The segment file.
        segment: PathBuf,
    },
    /// Sequence numbers the reader will skip: lost to damage or to a missing file.
    SkippedRange {
        /// First skipped.
        from: u64,
        /// Last skipped.
        to: u64,
    },
    /// Segments present but no checkpoint file: everything present is delivered again.
    CheckpointMissing,
    /// The checkpoint file has no valid slot: everything present is delivered again.
    CheckpointCorrupt,
    /// A file the log does not own: left alone.
    UnknownFile {
        /// The file.
        path: PathBuf,
    },
}

impl RecoveryEvent {
    /// Whether the event means records were lost or the directory was damaged (as opposed to
    /// an expected consequence of a crash, like a torn tail or an empty new segment).
    pub fn is_damage(&self) -> bool {
        !matches!(
            self,
            RecoveryEvent::TornTail { .. }
                | RecoveryEvent::EmptySegment { .. }
                | RecoveryEvent::UnknownFile { .. }
        )
    }
}

/// One segment file as found.
#[derive(Debug, Clone)]
pub struct FoundSegment {
    /// Its path.
    pub path: PathBuf,
    /// The sequence number in its name.
    pub name_seq: u64,
    /// What scanning it found.
    pub scan: SegmentScan,
}

/// Everything in a log directory.
#[derive(Debug, Clone)]
pub struct DirScan {
    /// The directory.
    pub dir: PathBuf,
    /// The checkpoint.
    pub checkpoint: CheckpointState,
    /// Segment files, in sequence order.
    pub segments: Vec<FoundSegment>,
    /// Files the log does not own.
    pub unknown: Vec<PathBuf>,
    /// Leftover spare segments.
    pub spares: Vec<PathBuf>,
    /// Files in `quarantine/` and their sizes.
    pub quarantine: Vec<(PathBuf, u64)>,
    /// Bytes of segment data read.
    pub bytes_scanned: u64,
}

/// Reads the checkpoint file, if any.
pub fn read_checkpoint(dir: &Path) -> io::Result<CheckpointState> {
    let path = dir.join(CHECKPOINT_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(match CheckpointSlot::pick(&bytes) {
            Some(slot) => CheckpointState::Valid(slot),
            None => CheckpointState::Corrupt,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(CheckpointState::Missing),
        // An unreadable checkpoint is a corrupt one: deliver everything, never start over.
        Err(_) => Ok(CheckpointState::Corrupt),
    }
}

/// Scans a log directory: the checkpoint, then every segment in full.
pub fn scan_dir(dir: &Path, max_record_bytes: usize, window_bytes: usize) -> io::Result<DirScan> {
    let checkpoint = read_checkpoint(dir)?;
    let watermark = match checkpoint {
        CheckpointState::Valid(c) => Some(c.delivered_seq),
        _ => None,
    };
    let mut found = DirScan {
        dir: dir.to_path_buf(),
        checkpoint,
        segments: Vec::new(),
        unknown: Vec::new(),
        spares: Vec::new(),
        quarantine: list_quarantine(dir)?,
        bytes_scanned: 0,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match name.as_ref() {
            CHECKPOINT_FILE | LOCK_FILE | QUARANTINE_DIR => {}
            SPARE_FILE => found.spares.push(entry.path()),
            other => match parse_segment_file_name(other) {
                Some(seq) if entry.file_type()?.is_file() => names.push((seq, entry.path())),
                _ => found.unknown.push(entry.path()),
            },
        }
    }
    names.sort();
    for (name_seq, path) in names {
        let file = File::open(&path)?;
        let scan = scan_segment(&file, name_seq, max_record_bytes, watermark, window_bytes)?;
        found.bytes_scanned += scan.end.max(scan.after_damage.map_or(0, |d| d.nonzero_end));
        drop_cache(&file);
        found.segments.push(FoundSegment {
            path,
            name_seq,
            scan,
        });
    }
    found.unknown.sort();
    Ok(found)
}

/// The scan read the file through the page cache; the log reads and writes it with direct
/// I/O, so those pages are only in the way.
fn drop_cache(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; advice only, failure is harmless.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn list_quarantine(dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    match fs::read_dir(dir.join(QUARANTINE_DIR)) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                files.push((e.path(), e.metadata()?.len()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    files.sort();
    Ok(files)
}

/// How the directory will be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Append and read: the shard's own log.
    ReadWrite,
    /// Read only, to deliver what is left (a directory of a shard that no longer exists);
    /// the directory is removed once everything is delivered.
    Drain,
}

/// A segment that stays in the log after recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeptSegment {
    pub path: PathBuf,
    pub first_seq: u64,
    /// Last record of the valid prefix (`first_seq - 1` when empty).
    pub last_seq: u64,
    /// End of the valid prefix.
    pub end: u64,
    pub file_len: u64,
    /// Quarantine rather than remove once delivered.
    pub damaged: bool,
    /// The first record past the watermark, if this segment has it.
    pub resume: Option<Position>,
}

/// A torn tail to cut before appending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Repair {
    pub path: PathBuf,
    pub end: u64,
    pub file_len: u64,
}

/// What recovery will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub kept: Vec<KeptSegment>,
    pub remove: Vec<PathBuf>,
    pub quarantine_now: Vec<PathBuf>,
    pub repair: Option<Repair>,
    /// The delivered watermark to start from.
    pub watermark: u64,
    /// The sequence number of the next record appended.
    pub next_seq: u64,
    /// Append into the last kept segment, at its end.
    pub continue_last: bool,
    /// Write a fresh checkpoint (the old one is missing or corrupt).
    pub write_checkpoint: bool,
    pub events: Vec<RecoveryEvent>,
    /// Valid records found after damage (lost to the reader).
    pub quarantined_records: u64,
    /// Bytes of damaged ranges.
    pub quarantined_bytes: u64,
    /// Sequence numbers the reader will skip.
    pub skipped_records: u64,
}

/// Decides what every file is. Pure: a function of the scan and the mode.
pub(crate) fn plan(scan: &DirScan, mode: OpenMode) -> Plan {
    let mut p = Plan {
        kept: Vec::new(),
        remove: scan.spares.clone(),
        quarantine_now: Vec::new(),
        repair: None,
        watermark: 0,
        next_seq: 1,
        continue_last: false,
        write_checkpoint: false,
        events: scan
            .unknown
            .iter()
            .map(|path| RecoveryEvent::UnknownFile { path: path.clone() })
            .collect(),
        quarantined_records: 0,
        quarantined_bytes: 0,
        skipped_records: 0,
    };
    // Every sequence number found anywhere, quarantined or not: none is ever reused.
    let max_seen = scan
        .segments
        .iter()
        .map(|s| highest_seq(&s.scan))
        .max()
        .unwrap_or(0);
    let with_data: Vec<&FoundSegment> = scan
        .segments
        .iter()
        .filter(|s| {
            let keep = has_records(&s.scan) || is_clean_empty(&s.scan);
            if !keep {
                if is_all_zero(&s.scan) {
                    p.events.push(RecoveryEvent::EmptySegment {
                        segment: s.path.clone(),
                    });
                    p.remove.push(s.path.clone());
                } else {
                    p.events.push(RecoveryEvent::NoValidRecords {
                        segment: s.path.clone(),
                    });
                    p.quarantine_now.push(s.path.clone());
                    p.quarantined_bytes += s.scan.damaged_bytes();
                }
            }
            keep
        })
        .collect();
    let mut prev_last: Option<u64> = None;
    let mut last_continuable = false;
    for (i, s) in with_data.iter().enumerate() {
        let newest = i + 1 == with_data.len();
        let next_first = with_data.get(i + 1).map(|n| n.scan.first_seq);
        if let Some(prev) = prev_last
            && s.scan.first_seq <= prev
        {
            p.events.push(RecoveryEvent::Overlap {
                segment: s.path.clone(),
            });
            p.quarantine_now.push(s.path.clone());
            last_continuable = false;
            continue;
        }
        let (damaged, continuable) = classify(s, newest, next_first, mode, &mut p);
        if s.scan.records == 0 && damaged {
            p.quarantine_now.push(s.path.clone());
            last_continuable = false;
            continue;
        }
        let last_seq = (s.scan.first_seq + s.scan.records).saturating_sub(1);
        if let Some(prev) = prev_last
            && s.scan.first_seq > prev + 1
        {
            skip(&mut p, prev + 1, s.scan.first_seq - 1);
        }
        prev_last = Some(last_seq);
        last_continuable = continuable;
        p.kept.push(KeptSegment {
            path: s.path.clone(),
            first_seq: s.scan.first_seq,
            last_seq,
            end: s.scan.end,
            file_len: s.scan.file_len,
            damaged,
            resume: s.scan.resume,
        });
    }
    settle_watermark(scan, &mut p, max_seen);
    p.continue_last = mode == OpenMode::ReadWrite
        && last_continuable
        && p.kept.last().is_some_and(|k| k.last_seq + 1 == p.next_seq);
    if !p.continue_last {
        p.repair = None;
    }
    p
}

fn highest_seq(s: &SegmentScan) -> u64 {
    let prefix = (s.first_seq + s.records).saturating_sub(1) * u64::from(s.records > 0);
    let after = s
        .after_damage
        .and_then(|d| d.seq_range)
        .map_or(0, |(_, hi)| hi);
    prefix.max(after)
}

fn has_records(s: &SegmentScan) -> bool {
    s.records > 0 || s.after_damage.is_some_and(|d| d.records > 0)
}

/// A valid header, the right size, and a zero header where the first record goes: a segment
/// created just before a stop.
fn is_clean_empty(s: &SegmentScan) -> bool {
    matches!(s.header, HeaderState::Valid(h) if h.segment_bytes == s.file_len)
        && s.records == 0
        && s.stop == Stop::End
}

fn is_all_zero(s: &SegmentScan) -> bool {
    let zero_header = matches!(s.header, HeaderState::Zero);
    let zero_body = match s.stop {
        Stop::End | Stop::EndOfFile => true,
        Stop::Invalid { .. } => s.after_damage.is_some_and(|d| d.nonzero_end <= s.end),
        Stop::Unreadable { .. } => false,
    };
    zero_header && zero_body && s.records == 0
}

/// Classifies one segment with records; returns (damaged: quarantine once delivered,
/// continuable: the writer may append at its end).
fn classify(
    s: &FoundSegment,
    newest: bool,
    next_first: Option<u64>,
    mode: OpenMode,
    p: &mut Plan,
) -> (bool, bool) {
    let mut damaged = false;
    let mut continuable = newest;
    match s.scan.header {
        HeaderState::Valid(h) if h.segment_bytes != s.scan.file_len => {
            p.events.push(RecoveryEvent::SizeMismatch {
                segment: s.path.clone(),
                expected: h.segment_bytes,
                actual: s.scan.file_len,
            });
            damaged = true;
            continuable = false;
        }
        HeaderState::Valid(_) => {}
        HeaderState::Zero | HeaderState::Damaged => {
            p.events.push(RecoveryEvent::DamagedHeader {
                segment: s.path.clone(),
            });
            damaged = true;
            continuable = false;
        }
    }
    let prefix_next = s.scan.first_seq + s.scan.records;
    match s.scan.stop {
        Stop::End | Stop::EndOfFile => {}
        Stop::Unreadable { offset, errno } => {
            p.events.push(RecoveryEvent::Unreadable {
                segment: s.path.clone(),
                offset,
                errno,
            });
            damaged = true;
            continuable = false;
        }
        Stop::Invalid { offset, .. } => {
            let after = s.scan.after_damage.unwrap_or_default();
            // A sealed segment whose prefix reaches the next segment lost nothing: its tail
            // is a torn write that the next segment superseded.
            let connects = next_first.is_some_and(|n| n == prefix_next);
            if after.records == 0 && (newest || connects) {
                p.events.push(RecoveryEvent::TornTail {
                    segment: s.path.clone(),
                    offset,
                    stale_bytes: s.scan.damaged_bytes(),
                });
                if continuable && mode == OpenMode::ReadWrite {
                    p.repair = Some(Repair {
                        path: s.path.clone(),
                        end: s.scan.end,
                        file_len: s.scan.file_len,
                    });
                }
            } else {
                p.events.push(RecoveryEvent::Damaged {
                    segment: s.path.clone(),
                    offset,
                    damaged_bytes: s.scan.damaged_bytes(),
                    records_after_damage: after.records,
                });
                p.quarantined_records += after.records;
                p.quarantined_bytes += s.scan.damaged_bytes();
                damaged = true;
                continuable = false;
            }
        }
    }
    (damaged, continuable)
}

fn skip(p: &mut Plan, from: u64, to: u64) {
    p.events.push(RecoveryEvent::SkippedRange { from, to });
    p.skipped_records += to - from + 1;
}

/// The watermark to start from and the next sequence number: past every sequence number
/// found anywhere and past the checkpoint, so none is ever reused.
fn settle_watermark(scan: &DirScan, p: &mut Plan, max_seen: u64) {
    let first_present = p
        .kept
        .iter()
        .find(|k| k.last_seq >= k.first_seq)
        .map(|k| k.first_seq);
    p.watermark = match scan.checkpoint {
        CheckpointState::Valid(c) => {
            if let Some(first) = first_present
                && first > c.delivered_seq + 1
                && p.kept.iter().any(|k| k.last_seq > c.delivered_seq)
            {
                skip(p, c.delivered_seq + 1, first - 1);
            }
            c.delivered_seq
        }
        state => {
            if !scan.segments.is_empty() || state == CheckpointState::Corrupt {
                p.events.push(if state == CheckpointState::Missing {
                    RecoveryEvent::CheckpointMissing
                } else {
                    RecoveryEvent::CheckpointCorrupt
                });
            }
            p.write_checkpoint = true;
            first_present.map_or(max_seen, |f| f - 1)
        }
    };
    p.next_seq = max_seen.max(p.watermark) + 1;
}

/// What [`apply`] leaves for the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The bytes of the last kept segment's partial block, from the block's start to the end
    /// of its last record, when the writer continues in it.
    pub tail_block: Vec<u8>,
}

/// Carries a plan out, with std I/O (blocking: run it off the reactor).
pub(crate) fn apply(dir: &Path, plan: &Plan, quarantine_max_files: usize) -> io::Result<Applied> {
    let mut dir_changed = false;
    for path in &plan.remove {
        remove_file_if_exists(path)?;
        dir_changed = true;
    }
    for path in &plan.quarantine_now {
        quarantine(dir, path)?;
        dir_changed = true;
    }
    if let Some(r) = &plan.repair {
        cut_torn_tail(r)?;
    }
    if plan.write_checkpoint {
        let slot = CheckpointSlot {
            generation: 1,
            delivered_seq: plan.watermark,
        };
        write_fresh_checkpoint(&dir.join(CHECKPOINT_FILE), slot)?;
        dir_changed = true;
    }
    if dir_changed {
        sync_dir(dir)?;
    }
    trim_quarantine(dir, quarantine_max_files)?;
    let mut tail_block = Vec::new();
    if plan.continue_last {
        let last = plan
            .kept
            .last()
            .expect("continue_last implies a kept segment");
        let block_start = align_down(last.end as usize, BLOCK) as u64;
        tail_block = vec![0; (last.end - block_start) as usize];
        File::open(&last.path)?.read_exact_at(&mut tail_block, block_start)?;
    }
    Ok(Applied { tail_block })
}

fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves a file into `quarantine/` (created if needed) and makes both directories durable.
pub(crate) fn quarantine(dir: &Path, path: &Path) -> io::Result<PathBuf> {
    let qdir = dir.join(QUARANTINE_DIR);
    match fs::create_dir(&qdir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    // Never replace evidence already there (a sequence number quarantined twice).
    let mut target = qdir.join(&name);
    let mut n = 1;
    while target.exists() {
        target = qdir.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(path, &target)?;
    sync_dir(&qdir)?;
    sync_dir(dir)?;
    Ok(target)
}

/// Keeps at most `max_files` in `quarantine/`, removing the oldest (by name: segment names
/// sort by sequence number).
pub(crate) fn trim_quarantine(dir: &Path, max_files: usize) -> io::Result<Vec<PathBuf>> {
    let files = list_quarantine(dir)?;
    let excess = files.len().saturating_sub(max_files);
    let mut removed = Vec::new();
    for (path, _) in files.into_iter().take(excess) {
        remove_file_if_exists(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

/// fsync on a directory: makes the entries created, renamed or removed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Cuts a torn tail: rewrites the block holding the end of the last valid record with zeros
/// after it, deallocates everything after that block and reserves it again, then fsyncs.
fn cut_torn_tail(r: &Repair) -> io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(&r.path)?;
    let block_start = align_down(r.end as usize, BLOCK) as u64;
    let keep = (r.end - block_start) as usize;
    if keep > 0 || r.end == SEGMENT_HEADER_BYTES {
        let mut block = vec![0u8; BLOCK];
        file.read_exact_at(&mut block[..keep], block_start)?;
        file.write_all_at(&block, block_start)?;
    }
    let rest_start = align_up(r.end as usize, BLOCK) as u64;
    if r.file_len > rest_start {
        deallocate(&file, rest_start, r.file_len - rest_start)?;
    }
    file.sync_all()
}

/// Punches a hole and reserves the range again (reads return zeros, the space stays
/// allocated). Falls back to writing zeros where punching is not supported.
fn deallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscalls on an open descriptor.
    let punched = unsafe { libc::fallocate(fd, flags, offset as i64, len as i64) } == 0;
    if !punched {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(err);
        }
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::fallocate(fd, 0, offset as i64, len as i64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a checkpoint file holding one slot (the other zeroed), durably.
pub(crate) fn write_fresh_checkpoint(path: &Path, slot: CheckpointSlot) -> io::Result<()> {
    let mut bytes = vec![0u8; CHECKPOINT_FILE_BYTES as usize];
    slot.encode(&mut bytes[slot.slot() * BLOCK..]);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(path)?;
    file.write_all_at(&bytes, 0)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::SegmentHeader;
    use crate::scan::AfterDamage;

    const SEG: u64 = 1 << 20;

    fn seg(name_seq: u64, records: u64, stop: Stop, after: Option<AfterDamage>) -> FoundSegment {
        FoundSegment {
            path: PathBuf::from(crate::format::segment_file_name(name_seq)),
            name_seq,
            scan: SegmentScan {
                file_len: SEG,
                header: HeaderState::Valid(SegmentHeader {
                    first_seq: name_seq,
                    segment_bytes: SEG,
                    created_at_ms: 0,
                }),
                first_seq: name_seq,
                records,
                end: 4096 + 64 * records,
                stop,
                after_damage: after,
                first_timestamp_ms: None,
                resume: (records > 0).then_some(Position {
                    seq: name_seq,
                    offset: 4096,
                    timestamp_ms: 0,
                }),
            },
        }
    }

    fn dir(checkpoint: CheckpointState, segments: Vec<FoundSegment>) -> DirScan {
        DirScan {
            dir: PathBuf::from("."),
            checkpoint,
            segments,
            unknown: vec![],
            spares: vec![],
            quarantine: vec![],
            bytes_scanned: 0,
        }
    }

    fn ckpt(delivered_seq: u64) -> CheckpointState {
        CheckpointState::Valid(CheckpointSlot {
            generation: 3,
            delivered_seq,
        })
    }

    fn invalid(records: u64) -> Stop {
        Stop::Invalid {
            offset: 4096 + 64 * records,
            reason: crate::format::InvalidRecord::Checksum,
        }
    }

    #[test]
    fn a_clean_log_continues_in_its_last_segment() {
        let p = plan(
            &dir(
                ckpt(5),
                vec![seg(1, 10, Stop::End, None), seg(11, 10, Stop::End, None)],
            ),
            OpenMode::ReadWrite,
        );
        assert_eq!((p.watermark, p.next_seq, p.continue_last), (5, 21, true));
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert_eq!(p.kept.len(), 2);
    }

    #[test]
    fn a_torn_newest_tail_is_cut_and_continued() {
        let after = AfterDamage {
            records: 0,
            seq_range: None,
            nonzero_end: 4096 + 64 * 10 + 200,
        };
        let p = plan(
            &dir(ckpt(0), vec![seg(1, 10, invalid(10), Some(after))]),
            OpenMode::ReadWrite,
        );
        assert!(matches!(
            p.events[..],
            [RecoveryEvent::TornTail {
                stale_bytes: 200,
                ..
            }]
        ));
        assert_eq!(p.repair.as_ref().map(|r| r.end), Some(4096 + 640));
        assert!(p.continue_last);
        assert_eq!(p.next_seq, 11);
        let drain = plan(
            &dir(ckpt(0), vec![seg(1, 10, invalid(10), Some(after))]),
            OpenMode::Drain,
        );
        assert_eq!((drain.repair, drain.continue_last), (None, false));
    }

    #[test]
    fn damage_with_records_after_it_is_quarantined_and_numbers_move_past_them() {
        let after = AfterDamage {
            records: 7,
            seq_range: Some((14, 20)),
            nonzero_end: 8192,
        };
        let p = plan(
            &dir(ckpt(0), vec![seg(1, 10, invalid(10), Some(after))]),
            OpenMode::ReadWrite,
        );
        assert!(matches!(
            p.events[..],
            [RecoveryEvent::Damaged {
                records_after_damage: 7,
                ..
            }]
        ));
        assert!(p.kept[0].damaged);
        assert!(!p.continue_last);
        assert_eq!(
            p.next_seq, 21,
            "never reuse a sequence number found after the damage"
        );
        assert_eq!(p.quarantined_records, 7);
    }

    #[test]
    fn a_sealed_segment_that_loses_records_is_damaged_and_the_gap_skipped() {
        let torn = AfterDamage {
            records: 0,
            seq_range: None,
            nonzero_end: 5000,
        };
        let segs = vec![
            seg(1, 10, invalid(10), Some(torn)),
            seg(21, 5, Stop::End, None),
        ];
        let p = plan(&dir(ckpt(0), segs), OpenMode::ReadWrite);
        assert!(p.kept[0].damaged);
        assert!(
            p.events
                .contains(&RecoveryEvent::SkippedRange { from: 11, to: 20 })
        );
        assert!(p.continue_last);
        // The same torn bytes before a segment that continues the sequence lose nothing.
        let segs = vec![
            seg(1, 10, invalid(10), Some(torn)),
            seg(11, 5, Stop::End, None),
        ];
        let p = plan(&dir(ckpt(0), segs), OpenMode::ReadWrite);
        assert!(!p.kept[0].damaged);
        assert!(matches!(p.events[..], [RecoveryEvent::TornTail { .. }]));
        assert_eq!(p.repair, None, "only the newest segment is cut");
    }

    #[test]
    fn a_missing_or_corrupt_checkpoint_delivers_everything_present() {
        for state in [CheckpointState::Missing, CheckpointState::Corrupt] {
            let p = plan(
                &dir(state, vec![seg(41, 10, Stop::End, None)]),
                OpenMode::ReadWrite,
            );
            assert_eq!(
                (p.watermark, p.next_seq, p.write_checkpoint),
                (40, 51, true)
            );
            assert!(p.remove.is_empty() && p.quarantine_now.is_empty());
            assert_eq!(p.events.len(), 1);
        }
        let fresh = plan(&dir(CheckpointState::Missing, vec![]), OpenMode::ReadWrite);
        assert!(fresh.events.is_empty());
        assert_eq!((fresh.watermark, fresh.next_seq), (0, 1));
    }

    #[test]
    fn everything_delivered_keeps_numbering_past_the_checkpoint() {
        let p = plan(
            &dir(ckpt(500), vec![seg(301, 100, Stop::End, None)]),
            OpenMode::ReadWrite,
        );
        assert_eq!((p.next_seq, p.continue_last), (501, false));
    }

    #[test]
    fn empty_and_garbage_segments_are_removed_or_quarantined() {
        let mut zero = seg(11, 0, Stop::EndOfFile, None);
        zero.scan.header = HeaderState::Zero;
        let mut garbage = seg(
            12,
            0,
            invalid(0),
            Some(AfterDamage {
                records: 0,
                seq_range: None,
                nonzero_end: 4200,
            }),
        );
        garbage.scan.header = HeaderState::Zero;
        let p = plan(
            &dir(ckpt(0), vec![seg(1, 10, Stop::End, None), zero, garbage]),
            OpenMode::ReadWrite,
        );
        assert_eq!(p.remove.len(), 1);
        assert_eq!(p.quarantine_now.len(), 1);
        assert!(p.continue_last, "the last segment with data continues");
        assert_eq!(
            p.next_seq, 11,
            "a file name without records reserves no number"
        );
    }

    #[test]
    fn overlapping_segments_keep_the_first() {
        let p = plan(
            &dir(
                ckpt(0),
                vec![seg(1, 10, Stop::End, None), seg(5, 10, Stop::End, None)],
            ),
            OpenMode::ReadWrite,
        );
        assert_eq!(p.kept.len(), 1);
        assert_eq!(p.quarantine_now.len(), 1);
        assert_eq!(p.next_seq, 15);
    }
}
