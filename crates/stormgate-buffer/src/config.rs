//! How one log is sized and paced.

use std::time::Duration;

use crate::format::{BLOCK, CHECKPOINT_FILE_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};

/// Default segment size: 64 MiB, the size of Cassandra's and ScyllaDB's commitlog segments.
/// Space is reclaimed a segment at a time, so `max_bytes` should hold at least 8 of them.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Default bound on one record: 1 MiB, Kafka's default `message.max.bytes` (1,048,588).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;
/// Default group-commit window: 2 ms.
///
/// Measured with `examples/throughput.rs` (one log, 250-byte records, a reader reporting
/// every record done) on the dev machine: ext4 on a virtio disk, 2 cores shared with other
/// builds (load 4-6 during the runs, so the tails are noisy). One O_DIRECT 4 KiB write plus
/// fdatasync costs 165 µs at p50 into preallocated (unwritten) extents, 100 µs into
/// pre-zeroed ones; a 1 MiB flush ~0.3-0.6 ms; a 10 MiB one 2-3 ms.
///
/// ```text
/// paced 375,000 rec/s      fsyncs/s   durable p50    durable p99   CPU/record
///   sync_interval 1 ms     380-450    1.5-2.0 ms     12-21 ms      490-570 ns
///   sync_interval 2 ms     260-330    2.0-4.9 ms     11-20 ms      410-470 ns
///   sync_interval 5 ms     150-170    4.9-5.6 ms     16-120 ms     375-420 ns
/// paced 100,000 rec/s
///   0 ms / 1 / 2 / 5 / 10  460 / 430 / 310 / 170 / 100 fsyncs/s; durable p50 4.9 (sic:
///                          more fsyncs, more queueing) / 1.5 / 2.4 / 4.1 / 7.2 ms
/// flat out                 1.3-1.8 M rec/s, 340-470 MB/s, ~55 fsyncs/s of ~10 MB,
///                          140-220 ns CPU per record, durable p50 ~40 ms (disk-bound)
/// ```
/// CPU per record counts the whole pipeline (append, flush, read, done) and the kernel;
/// at low rates it is mostly per-flush kernel work (virtio notifications, the io_uring
/// worker running fdatasync), so fewer flushes is cheaper. 0 ms buys nothing over 1 ms; 2 ms
/// costs ~0.5-1 ms of median latency over 1 ms for 25% fewer fsyncs and ~13% less CPU per
/// record; 5 ms and more lengthen every acknowledgement for little more. `flush_bytes`
/// caps a window's size, so above ~500,000 rec/s flushes start on size, not time.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(2);
/// Default staged bytes that start a flush before the window ends: 1 MiB, the size at which
/// one O_DIRECT write reaches most of the disk's bandwidth here.
pub const DEFAULT_FLUSH_BYTES: usize = 1 << 20;
/// Default bound on bytes appended but not yet durable: 32 MiB, ~0.1 s of the disk's write
/// bandwidth; beyond it appends are refused until flushes catch up.
pub const DEFAULT_STAGING_MAX_BYTES: usize = 32 << 20;
/// Default memory kept of durable segment data for a reader close behind the writer: 32 MiB.
pub const DEFAULT_MEMORY_BYTES: usize = 32 << 20;
/// Default interval between checkpoints of the delivered watermark: 100 ms. A crash
/// re-delivers at most what was delivered within one interval (plus what was in flight), and
/// a checkpoint costs one 4 KiB write and one fdatasync.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// Default size of one read from disk by the reader: 1 MiB (glommio PR #635: huge single
/// reads can hang; 1 MiB is well below the device's 4 MiB `max_sectors_kb` here).
pub const DEFAULT_READ_BYTES: usize = 1 << 20;
/// Default number of damaged segments kept in `quarantine/`; the oldest beyond it is removed.
pub const DEFAULT_QUARANTINE_MAX_FILES: usize = 16;

/// The sizes and intervals of one log. Every field's default is its `DEFAULT_*` constant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Size of each segment file, a multiple of 1 MiB. Default [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// Hard bound on the directory's data: segments count at their full preallocated size,
    /// plus the preallocated spare and the checkpoint. At least two segments must fit.
    pub max_bytes: u64,
    /// Largest record, header and padding included. Default [`DEFAULT_MAX_RECORD_BYTES`].
    pub max_record_bytes: usize,
    /// Group-commit window: how long the oldest staged record may wait for a flush to start.
    /// Default [`DEFAULT_SYNC_INTERVAL`].
    pub sync_interval: Duration,
    /// Staged bytes that start a flush at once. Default [`DEFAULT_FLUSH_BYTES`].
    pub flush_bytes: usize,
    /// Bound on appended, not yet durable bytes. Default [`DEFAULT_STAGING_MAX_BYTES`].
    pub staging_max_bytes: usize,
    /// Durable data kept in memory for the reader. Default [`DEFAULT_MEMORY_BYTES`].
    pub memory_bytes: usize,
    /// Interval between checkpoints. Default [`DEFAULT_CHECKPOINT_INTERVAL`].
    pub checkpoint_interval: Duration,
    /// Bytes per read from disk. Default [`DEFAULT_READ_BYTES`].
    pub read_bytes: usize,
    /// Damaged segments kept in `quarantine/`. Default [`DEFAULT_QUARANTINE_MAX_FILES`].
    pub quarantine_max_files: usize,
}

impl LogConfig {
    /// The defaults, with the given bound on disk use.
    pub fn new(max_bytes: u64) -> LogConfig {
        LogConfig {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_bytes,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            flush_bytes: DEFAULT_FLUSH_BYTES,
            staging_max_bytes: DEFAULT_STAGING_MAX_BYTES,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            read_bytes: DEFAULT_READ_BYTES,
            quarantine_max_files: DEFAULT_QUARANTINE_MAX_FILES,
        }
    }

    /// Checks the relationships between the values; the message names the numbers.
    pub fn validate(&self) -> Result<(), String> {
        const MIB: u64 = 1 << 20;
        if self.segment_bytes == 0 || !self.segment_bytes.is_multiple_of(MIB) {
            return Err(format!(
                "segment_bytes {} is not a positive multiple of 1 MiB",
                self.segment_bytes
            ));
        }
        if self.segment_bytes > u32::MAX as u64 {
            return Err(format!(
                "segment_bytes {} is over 4 GiB",
                self.segment_bytes
            ));
        }
        let two = 2 * self.segment_bytes + CHECKPOINT_FILE_BYTES;
        if self.max_bytes < two {
            return Err(format!(
                "max_bytes {} holds fewer than two segments of {} bytes (needs {two})",
                self.max_bytes, self.segment_bytes
            ));
        }
        let room = self.segment_bytes - SEGMENT_HEADER_BYTES;
        if self.max_record_bytes < RECORD_HEADER_BYTES + 16 || self.max_record_bytes as u64 > room {
            return Err(format!(
                "max_record_bytes {} is not between 40 and the {room} bytes a segment holds",
                self.max_record_bytes
            ));
        }
        if self.staging_max_bytes < 2 * (self.max_record_bytes + BLOCK) {
            return Err(format!(
                "staging_max_bytes {} holds fewer than two records of max_record_bytes {}",
                self.staging_max_bytes, self.max_record_bytes
            ));
        }
        if self.read_bytes < BLOCK || self.checkpoint_interval.is_zero() {
            return Err("read_bytes must be at least 4096 and checkpoint_interval non-zero".into());
        }
        Ok(())
    }

    /// How many bytes a window of the recovery scanner reads at a time.
    pub(crate) fn scan_window_bytes(&self) -> usize {
        (4 << 20).max(2 * self.max_record_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_combinations_name_their_numbers() {
        assert_eq!(LogConfig::new(1 << 30).validate(), Ok(()));
        let small = LogConfig::new(100 << 20);
        assert!(small.validate().unwrap_err().contains("104857600"));
        let odd = LogConfig {
            segment_bytes: 3 << 19,
            ..LogConfig::new(1 << 30)
        };
        assert!(odd.validate().unwrap_err().contains("1572864"));
        let big_record = LogConfig {
            max_record_bytes: 64 << 20,
            ..LogConfig::new(1 << 30)
        };
        assert!(big_record.validate().is_err());
    }
}
