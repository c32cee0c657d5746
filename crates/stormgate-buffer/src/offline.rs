//! `stormgate buffer inspect DIR` and `stormgate buffer verify DIR` as library functions:
//! std I/O, no executor, no lock, nothing changed on disk.
//!
//! `DIR` is one log directory or a directory of them (`BUFFER_DIR`, one per shard). Both
//! read and check every segment in full (CRC and sequence of every record), with the same
//! scanner and the same rules as recovery, and report what recovery would do.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::format::parse_segment_file_name;
use crate::recovery::{self, CHECKPOINT_FILE, CheckpointState, DirScan, OpenMode, RecoveryEvent};
use crate::scan::Stop;

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    /// The file.
    pub path: PathBuf,
    /// Sequence number of its first record.
    pub first_seq: u64,
    /// Valid records (the prefix before any damage).
    pub records: u64,
    /// File size.
    pub file_bytes: u64,
    /// Bytes of records.
    pub data_bytes: u64,
    /// Why the valid data ends, when it is not a clean end.
    pub problem: Option<String>,
}

/// One log directory (one shard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSummary {
    /// The directory.
    pub dir: PathBuf,
    /// The checkpoint.
    pub checkpoint: CheckpointState,
    /// The delivered watermark recovery would start from.
    pub delivered_seq: u64,
    /// The segments, in order.
    pub segments: Vec<SegmentSummary>,
    /// Records not yet delivered.
    pub undelivered_records: u64,
    /// Sequence number and timestamp (ms) of the oldest undelivered record.
    pub oldest_undelivered: Option<(u64, i64)>,
    /// Files in `quarantine/`, with their sizes.
    pub quarantine: Vec<(PathBuf, u64)>,
    /// What recovery would report.
    pub events: Vec<RecoveryEvent>,
}

impl LogSummary {
    /// Whether recovery would find damage (lost or skipped records, bad headers, a bad
    /// checkpoint). A torn tail alone is a crash's normal trace and does not count.
    pub fn has_damage(&self) -> bool {
        self.events.iter().any(RecoveryEvent::is_damage)
    }

    /// Bytes of segment files.
    pub fn file_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.file_bytes).sum()
    }
}

/// Scans `dir` (a log directory or a directory of them) and summarises each log.
pub fn inspect(dir: &Path, max_record_bytes: usize) -> io::Result<Vec<LogSummary>> {
    let dirs = log_dirs(dir)?;
    if dirs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{}: no disk buffer here (no checkpoint or segment files)",
                dir.display()
            ),
        ));
    }
    dirs.iter()
        .map(|d| summarise(d, max_record_bytes))
        .collect()
}

fn is_log_dir(dir: &Path) -> io::Result<bool> {
    if dir.join(CHECKPOINT_FILE).exists() {
        return Ok(true);
    }
    for e in std::fs::read_dir(dir)? {
        if parse_segment_file_name(&e?.file_name().to_string_lossy()).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn log_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    if is_log_dir(dir)? {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() && is_log_dir(&e.path())? {
            dirs.push(e.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn summarise(dir: &Path, max_record_bytes: usize) -> io::Result<LogSummary> {
    let window = (4 << 20).max(2 * max_record_bytes);
    let scan = recovery::scan_dir(dir, max_record_bytes, window)?;
    let plan = recovery::plan(&scan, OpenMode::Drain);
    let oldest = oldest_undelivered(&scan, plan.watermark);
    let undelivered = plan
        .kept
        .iter()
        .map(|k| {
            k.last_seq
                .saturating_sub(plan.watermark.max(k.first_seq - 1))
        })
        .sum();
    Ok(LogSummary {
        dir: dir.to_path_buf(),
        checkpoint: scan.checkpoint,
        delivered_seq: plan.watermark,
        segments: scan.segments.iter().map(segment_summary).collect(),
        undelivered_records: undelivered,
        oldest_undelivered: oldest,
        quarantine: scan.quarantine.clone(),
        events: plan.events,
    })
}

fn oldest_undelivered(scan: &DirScan, watermark: u64) -> Option<(u64, i64)> {
    scan.segments.iter().find_map(|s| match s.scan.resume {
        Some(p) if p.seq > watermark => Some((p.seq, p.timestamp_ms)),
        _ => None,
    })
}

fn segment_summary(s: &recovery::FoundSegment) -> SegmentSummary {
    let problem = match s.scan.stop {
        Stop::End => None,
        Stop::EndOfFile => (s.scan.file_len < crate::format::SEGMENT_HEADER_BYTES)
            .then(|| "short file".to_string()),
        Stop::Unreadable { offset, errno } => {
            Some(format!("unreadable at {offset} (errno {errno:?})"))
        }
        Stop::Invalid { offset, reason } => {
            let after = s.scan.after_damage.unwrap_or_default();
            Some(format!(
                "invalid record at {offset} ({reason:?}); {} bytes after it, {} valid records found after it",
                s.scan.damaged_bytes(),
                after.records
            ))
        }
    };
    SegmentSummary {
        path: s.path.clone(),
        first_seq: s.scan.first_seq,
        records: s.scan.records,
        file_bytes: s.scan.file_len,
        data_bytes: s
            .scan
            .end
            .saturating_sub(crate::format::SEGMENT_HEADER_BYTES),
        problem,
    }
}

/// A summary rendered for people, with ages relative to `now_ms`.
pub struct Render<'a> {
    /// The summary.
    pub log: &'a LogSummary,
    /// The current time, ms since the epoch.
    pub now_ms: i64,
}

impl fmt::Display for Render<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.log;
        writeln!(f, "{}", l.dir.display())?;
        let checkpoint = match l.checkpoint {
            CheckpointState::Valid(c) => format!(
                "delivered up to seq {} (generation {})",
                c.delivered_seq, c.generation
            ),
            CheckpointState::Missing => "missing".to_string(),
            CheckpointState::Corrupt => "corrupt (no valid slot)".to_string(),
        };
        writeln!(f, "  checkpoint: {checkpoint}")?;
        let records: u64 = l.segments.iter().map(|s| s.records).sum();
        writeln!(
            f,
            "  segments: {}, {} records, {} bytes on disk; undelivered: {} records",
            l.segments.len(),
            records,
            l.file_bytes(),
            l.undelivered_records
        )?;
        if let Some((seq, ts)) = l.oldest_undelivered {
            let age_s = (self.now_ms - ts).max(0) as f64 / 1000.0;
            writeln!(f, "  oldest undelivered: seq {seq}, {age_s:.1} s old")?;
        }
        for s in &l.segments {
            let last = if s.records > 0 {
                (s.first_seq + s.records - 1).to_string()
            } else {
                "-".to_string()
            };
            let name = s.path.file_name().unwrap_or_default().to_string_lossy();
            write!(
                f,
                "    {name}: seq {}..{last}, {} records, {} data bytes",
                s.first_seq, s.records, s.data_bytes
            )?;
            match &s.problem {
                Some(p) => writeln!(f, "  ** {p}")?,
                None => writeln!(f)?,
            }
        }
        for (path, bytes) in &l.quarantine {
            writeln!(f, "  quarantined: {} ({bytes} bytes)", path.display())?;
        }
        for e in &l.events {
            let tag = if e.is_damage() { "DAMAGE" } else { "note" };
            writeln!(f, "  {tag}: {e:?}")?;
        }
        Ok(())
    }
}
