//! Validating a whole segment: every record's CRC and sequence number, and what lies after
//! the first invalid one. Synchronous, over anything that reads at an offset (a file, a byte
//! slice), so that recovery, `inspect`/`verify` and the property tests share one scanner.

use std::io;

use crate::format::{
    BLOCK, HeaderState, InvalidRecord, Parsed, RECORD_ALIGN, RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES, SegmentHeader, align_up, parse_record,
};

/// A source of bytes at offsets: a segment file or, in tests, a slice.
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the source.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The source's length in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// Where the valid prefix of a segment ends, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A zero header: the clean end of data.
    End,
    /// The file ends (a segment filled to its last byte, or a short file).
    EndOfFile,
    /// Reading the file failed at this offset (an I/O error, not bad bytes).
    Unreadable {
        /// Offset in the file.
        offset: u64,
        /// The error's raw OS code, if it had one.
        errno: Option<i32>,
    },
    /// An invalid record at this offset.
    Invalid {
        /// Offset in the file.
        offset: u64,
        /// What was wrong with it.
        reason: InvalidRecord,
    },
}

/// What lies after the first invalid record, found by resynchronising on every 8-byte
/// boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AfterDamage {
    /// Valid records (CRC and payload) found after the damage, whatever their sequence.
    pub records: u64,
    /// Lowest and highest sequence numbers among them.
    ///
    /// Counted from the first invalid record on: a valid record with an unexpected sequence
    /// number there counts too.
    pub seq_range: Option<(u64, u64)>,
    /// End offset of the last non-zero 8 bytes at or after the damage: the damaged region is
    /// `[damage, nonzero_end)`.
    pub nonzero_end: u64,
}

/// The first record past a given sequence number (where a reader resumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Its sequence number.
    pub seq: u64,
    /// Its offset in the file.
    pub offset: u64,
    /// Its timestamp.
    pub timestamp_ms: i64,
}

/// Everything one pass over a segment learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// The file's length.
    pub file_len: u64,
    /// The header block.
    pub header: HeaderState,
    /// The first sequence number the records are checked against: the header's, or the file
    /// name's when the header is not valid.
    pub first_seq: u64,
    /// Records in the valid prefix.
    pub records: u64,
    /// End offset of the valid prefix (where the next record goes).
    pub end: u64,
    /// Why the prefix ends.
    pub stop: Stop,
    /// Set when `stop` is `Invalid`.
    pub after_damage: Option<AfterDamage>,
    /// Timestamp of the first record of the prefix.
    pub first_timestamp_ms: Option<i64>,
    /// The first record of the prefix whose sequence number is above the watermark given.
    pub resume: Option<Position>,
}

impl SegmentScan {
    /// Sequence number of the last record of the valid prefix.
    pub fn last_seq(&self) -> Option<u64> {
        (self.records > 0).then(|| self.first_seq + self.records - 1)
    }

    /// Bytes between the valid prefix and the end of the damage.
    pub fn damaged_bytes(&self) -> u64 {
        self.after_damage
            .map_or(0, |d| d.nonzero_end.saturating_sub(self.end))
    }
}

/// A window of a source, re-read as the scan moves.
struct Window<'a, R: ?Sized> {
    src: &'a R,
    buf: Vec<u8>,
    start: u64,
    len: usize,
    file_len: u64,
}

impl<'a, R: ReadAt + ?Sized> Window<'a, R> {
    /// The bytes from `offset` to the end of the window, at least `need` of them unless the
    /// source ends first.
    fn at(&mut self, offset: u64, need: usize) -> io::Result<&[u8]> {
        let end = self.start + self.len as u64;
        if offset < self.start || offset + need as u64 > end {
            if need > self.buf.len() {
                self.buf.resize(need, 0);
            }
            let want = (self.buf.len() as u64).min(self.file_len.saturating_sub(offset)) as usize;
            self.len = self.src.read_at(&mut self.buf[..want], offset)?;
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        Ok(&self.buf[from..self.len])
    }
}

/// Scans one segment.
///
/// `name_first_seq` is the sequence number in the file name, used when the header is not
/// valid. `watermark`: records up to it were delivered; the scan notes the first record past
/// it in [`SegmentScan::resume`] (with `None`, the first record). `window_bytes` is how much
/// is read at a time (at least twice `max_record_bytes`).
pub fn scan_segment<R: ReadAt + ?Sized>(
    src: &R,
    name_first_seq: u64,
    max_record_bytes: usize,
    watermark: Option<u64>,
    window_bytes: usize,
) -> io::Result<SegmentScan> {
    let file_len = src.size()?;
    let mut window = Window {
        src,
        buf: vec![0; window_bytes.max(2 * max_record_bytes).max(2 * BLOCK)],
        start: 0,
        len: 0,
        file_len,
    };
    let header = match window.at(0, BLOCK) {
        Ok(block) => SegmentHeader::decode(block),
        Err(e) => {
            let mut scan = empty_scan(file_len, HeaderState::Damaged, name_first_seq);
            scan.stop = Stop::Unreadable {
                offset: 0,
                errno: e.raw_os_error(),
            };
            return Ok(scan);
        }
    };
    let first_seq = match header {
        HeaderState::Valid(h) => h.first_seq,
        _ => name_first_seq,
    };
    let mut scan = empty_scan(file_len, header, first_seq);
    let mut pos = SEGMENT_HEADER_BYTES;
    loop {
        if pos + RECORD_HEADER_BYTES as u64 > file_len {
            scan.stop = Stop::EndOfFile;
            break;
        }
        let expected = first_seq + scan.records;
        let parsed = match parse_at(&mut window, pos, Some(expected), max_record_bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                scan.stop = Stop::Unreadable {
                    offset: pos,
                    errno: e.raw_os_error(),
                };
                break;
            }
        };
        match parsed {
            Step::Record {
                len, timestamp_ms, ..
            } => {
                scan.first_timestamp_ms.get_or_insert(timestamp_ms);
                if scan.resume.is_none() && watermark.is_none_or(|w| expected > w) {
                    scan.resume = Some(Position {
                        seq: expected,
                        offset: pos,
                        timestamp_ms,
                    });
                }
                scan.records += 1;
                pos += len as u64;
                scan.end = pos;
            }
            Step::End => {
                scan.stop = Stop::End;
                break;
            }
            Step::Invalid(reason) => {
                scan.stop = Stop::Invalid {
                    offset: pos,
                    reason,
                };
                // An I/O error while looking past the damage leaves what was found so far.
                let mut found = AfterDamage {
                    nonzero_end: pos,
                    ..AfterDamage::default()
                };
                let _ = resync(&mut window, pos, max_record_bytes, &mut found);
                found.nonzero_end = align_up(found.nonzero_end as usize, RECORD_ALIGN) as u64;
                scan.after_damage = Some(found);
                break;
            }
        }
    }
    Ok(scan)
}

fn empty_scan(file_len: u64, header: HeaderState, first_seq: u64) -> SegmentScan {
    SegmentScan {
        file_len,
        header,
        first_seq,
        records: 0,
        end: SEGMENT_HEADER_BYTES.min(file_len),
        stop: Stop::EndOfFile,
        after_damage: None,
        first_timestamp_ms: None,
        resume: None,
    }
}

enum Step {
    Record {
        len: usize,
        seq: u64,
        timestamp_ms: i64,
    },
    End,
    Invalid(InvalidRecord),
}

fn parse_at<R: ReadAt + ?Sized>(
    window: &mut Window<'_, R>,
    pos: u64,
    expected: Option<u64>,
    max_record_bytes: usize,
) -> io::Result<Step> {
    let mut need = RECORD_HEADER_BYTES;
    loop {
        let bytes = window.at(pos, need)?;
        return Ok(match parse_record(bytes, expected, max_record_bytes) {
            Parsed::Record(v, len) => Step::Record {
                len,
                seq: v.seq,
                timestamp_ms: v.timestamp_ms,
            },
            Parsed::End => Step::End,
            Parsed::Invalid(reason) => Step::Invalid(reason),
            // Read once more with the whole record in the window.
            Parsed::Incomplete(n) if n > need => {
                need = n;
                continue;
            }
            // Even so the source ends first: the record runs past the end of the file.
            Parsed::Incomplete(_) => Step::Invalid(InvalidRecord::Length),
        });
    }
}

/// Looks for valid records on every 8-byte boundary after the damage at `from`, to the end of
/// the file. Bounded: one pass, each record skipped whole once found.
fn resync<R: ReadAt + ?Sized>(
    window: &mut Window<'_, R>,
    from: u64,
    max_record_bytes: usize,
    found: &mut AfterDamage,
) -> io::Result<()> {
    let file_len = window.file_len;
    let mut pos = from;
    while pos + RECORD_ALIGN as u64 <= file_len {
        let head = window.at(pos, RECORD_ALIGN)?;
        if head.len() < RECORD_ALIGN {
            break;
        }
        if head[..RECORD_ALIGN].iter().all(|&b| b == 0) {
            pos += RECORD_ALIGN as u64;
            continue;
        }
        found.nonzero_end = pos + RECORD_ALIGN as u64;
        if pos + RECORD_HEADER_BYTES as u64 <= file_len
            && let Step::Record { len, seq, .. } = parse_at(window, pos, None, max_record_bytes)?
        {
            found.records += 1;
            found.seq_range = Some(match found.seq_range {
                None => (seq, seq),
                Some((lo, hi)) => (lo.min(seq), hi.max(seq)),
            });
            pos += len as u64;
            found.nonzero_end = pos;
            continue;
        }
        pos += RECORD_ALIGN as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{RecordKind, encode_record, record_len};

    const SEG: usize = 64 * 1024;

    /// A segment of `n` records starting at `first`, then zeros.
    fn segment(first: u64, n: u64) -> Vec<u8> {
        let mut seg = vec![0u8; SEG];
        SegmentHeader {
            first_seq: first,
            segment_bytes: SEG as u64,
            created_at_ms: 1,
        }
        .encode(&mut seg);
        let mut pos = BLOCK;
        for i in 0..n {
            let value = vec![b'x'; (i as usize * 37) % 300];
            pos += encode_record(
                &mut seg[pos..],
                first + i,
                i as i64,
                RecordKind::Metrics,
                b"key",
                &value,
            );
        }
        seg
    }

    fn scan(bytes: &[u8]) -> SegmentScan {
        scan_segment(bytes, 99, 4096, None, 8192).unwrap()
    }

    #[test]
    fn a_clean_segment_ends_at_the_zero_header() {
        let s = scan(&segment(10, 100));
        assert_eq!((s.records, s.first_seq, s.last_seq()), (100, 10, Some(109)));
        assert_eq!(s.stop, Stop::End);
        assert_eq!(s.resume.map(|p| (p.seq, p.offset)), Some((10, 4096)));
    }

    #[test]
    fn the_resume_position_is_the_first_record_past_the_watermark() {
        let seg = segment(10, 100);
        let s = scan_segment(&seg[..], 10, 4096, Some(49), 8192).unwrap();
        let p = s.resume.unwrap();
        assert_eq!((p.seq, p.timestamp_ms), (50, 40));
        assert!(matches!(
            parse_record(&seg[p.offset as usize..], Some(50), 4096),
            Parsed::Record(..)
        ));
        let all = scan_segment(&seg[..], 10, 4096, Some(200), 8192).unwrap();
        assert_eq!(all.resume, None);
    }

    #[test]
    fn a_flipped_byte_stops_the_prefix_and_resync_counts_what_follows() {
        let mut seg = segment(1, 50);
        let clean = scan(&seg);
        // Damage the 21st record's payload.
        let mut pos = BLOCK;
        for i in 0..20 {
            pos += record_len(3, (i * 37) % 300);
        }
        seg[pos + 30] ^= 0x40;
        let s = scan(&seg);
        assert_eq!(s.records, 20);
        assert_eq!(s.end, pos as u64);
        assert!(matches!(
            s.stop,
            Stop::Invalid {
                reason: InvalidRecord::Checksum,
                ..
            }
        ));
        let d = s.after_damage.unwrap();
        assert_eq!(d.records, 29);
        assert_eq!(d.seq_range, Some((22, 50)));
        assert_eq!(d.nonzero_end, clean.end);
    }

    #[test]
    fn a_torn_tail_has_no_valid_record_after_it() {
        let mut seg = segment(1, 30);
        let end = scan(&seg).end as usize;
        seg[end..end + 100].fill(0x5A);
        let s = scan(&seg);
        assert_eq!(s.records, 30);
        let d = s.after_damage.unwrap();
        assert_eq!((d.records, d.nonzero_end), (0, end as u64 + 104));
        assert_eq!(s.damaged_bytes(), 104);
    }

    #[test]
    fn a_damaged_header_falls_back_to_the_file_name() {
        let mut seg = segment(99, 5);
        seg[20] ^= 1;
        let s = scan(&seg);
        assert_eq!(s.header, HeaderState::Damaged);
        assert_eq!((s.first_seq, s.records), (99, 5));
    }

    #[test]
    fn short_and_empty_files_are_clean_stops() {
        let s = scan(&[]);
        assert_eq!(
            (s.records, s.header, s.stop),
            (0, HeaderState::Zero, Stop::EndOfFile)
        );
        let seg = segment(1, 3);
        let s = scan(&seg[..100]);
        assert_eq!((s.records, s.header), (0, HeaderState::Damaged));
        let cut = scan(&seg).end as usize - 8;
        let s = scan(&seg[..cut]);
        assert_eq!(s.records, 2);
        assert!(matches!(
            s.stop,
            Stop::Invalid {
                reason: InvalidRecord::Length,
                ..
            }
        ));
    }
}
