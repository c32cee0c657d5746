//! The counters one log keeps. Written only by the shard that owns the log, readable from any
//! thread (the metrics endpoint mirrors them).

use stormgate_telemetry::{Counter, Gauge, LatencyHistogram};

/// One log's instruments. Counters only increase; gauges are the current value.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Bytes the log's files occupy: segments and the spare at their preallocated size, plus
    /// the checkpoint file.
    pub disk_bytes: Gauge,
    /// Segment files in the log (quarantined ones excluded).
    pub segments: Gauge,
    /// Records appended (or recovered) and not yet covered by the delivered watermark.
    pub records: Gauge,
    /// Timestamp (ms since the epoch) of the oldest record not yet delivered, 0 if none is
    /// known: the oldest record handed out and outstanding, else the next one to hand out.
    pub oldest_timestamp_ms: Gauge,
    /// The delivered watermark last made durable by a checkpoint.
    pub checkpointed_seq: Gauge,
    /// The highest sequence number whose record is durable.
    pub durable_seq: Gauge,

    /// Records appended.
    pub appended_records: Counter,
    /// Record bytes appended (header and padding included).
    pub appended_bytes: Counter,
    /// Bytes written to segment files (a block rewritten by the next flush counts again).
    pub bytes_written: Counter,
    /// Flushes completed (writes and the fdatasync covering them).
    pub flushes: Counter,
    /// fdatasync calls on segment and checkpoint files.
    pub fsyncs: Counter,
    /// Latency of each segment fdatasync.
    pub fsync_latency: LatencyHistogram,
    /// Time from a flush's oldest record's append to its durability (the group-commit wait
    /// plus the flush).
    pub durable_latency: LatencyHistogram,
    /// Time from a flush's oldest record's append to the flush's first write: the
    /// group-commit window, a wait for the next segment file, and the executor's delays.
    pub flush_wait_latency: LatencyHistogram,
    /// Time of each flush's writes, from the first submitted to the last completed.
    pub write_latency: LatencyHistogram,

    /// Records handed to the reader from memory.
    pub read_memory_records: Counter,
    /// Records handed to the reader from disk.
    pub read_disk_records: Counter,
    /// Bytes read from disk by the reader.
    pub read_disk_bytes: Counter,
    /// Records handed out again after a retriable failure.
    pub retried_records: Counter,

    /// Checkpoints written.
    pub checkpoints: Counter,
    /// Segments removed once delivered.
    pub segments_removed: Counter,
    /// Segments moved to `quarantine/`.
    pub segments_quarantined: Counter,
    /// Valid records lost to damage: found after the damage in a quarantined range, or
    /// skipped as missing.
    pub quarantined_records: Counter,
    /// Bytes of damaged ranges.
    pub quarantined_bytes: Counter,
    /// Torn tails cut at recovery.
    pub torn_tails: Counter,
    /// Everything recovery found worth reporting (each `RecoveryEvent`).
    pub recovery_events: Counter,

    /// Appends refused because the log reached `max_bytes`.
    pub full_events: Counter,
    /// Appends refused because staging is at its bound while the disk is healthy.
    pub busy_events: Counter,
    /// Appends refused because staging is at its bound while storage is failing.
    pub failed_appends: Counter,
    /// Appends refused as larger than `max_record_bytes`.
    pub too_large: Counter,
    /// Storage errors (write, fdatasync, file creation, checkpoint, removal).
    pub storage_errors: Counter,
    /// The OS error code of the last storage error (ENOSPC 28, EIO 5; -1 without one), 0
    /// once flushes succeed again: what `/readyz` can name.
    pub last_storage_errno: Gauge,
    /// Records the reader could not read back from disk (damage found while running).
    pub read_errors: Counter,
}
