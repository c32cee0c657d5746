//! The statistics block (`STATS_INTERVAL`): one log event per interval on the `ops-stats`
//! thread, rates computed from two samples of the counters `/metrics` serves.

use std::fmt::Display;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use stormgate_buffer::LogStats;
use stormgate_telemetry::Totals;
use tracing::info;

use super::OpsState;

/// What the statistics block compares: the shards' counters at one moment.
#[derive(Debug, Clone)]
pub struct StatsSample {
    /// When it was taken.
    pub at: Instant,
    /// All shards summed.
    pub totals: Totals,
    /// Each shard's queue depth, by shard id.
    pub queue_depth: Vec<i64>,
    /// With a disk buffer: its counters, all shards summed.
    pub buffer: Option<BufferSample>,
}

/// The disk buffer's counters at one moment, all shards summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BufferSample {
    /// Records not yet delivered.
    pub records: i64,
    /// Bytes of its files.
    pub bytes: i64,
    /// Timestamp (ms since the epoch) of the oldest record not yet delivered, 0 if none.
    pub oldest_ms: i64,
    /// Bytes written to segments since start.
    pub written_bytes: u64,
    /// fdatasync calls since start.
    pub fsyncs: u64,
    /// Records fed to the producer from disk since start.
    pub replayed: u64,
}

impl BufferSample {
    fn take(buffers: &[Arc<LogStats>]) -> Option<BufferSample> {
        if buffers.is_empty() {
            return None;
        }
        let mut s = BufferSample::default();
        for b in buffers {
            s.records += b.records.get();
            s.bytes += b.disk_bytes.get();
            let oldest = b.oldest_timestamp_ms.get();
            if oldest > 0 && (s.oldest_ms == 0 || oldest < s.oldest_ms) {
                s.oldest_ms = oldest;
            }
            s.written_bytes += b.bytes_written.get();
            s.fsyncs += b.fsyncs.get();
            s.replayed += b.read_disk_records.get();
        }
        Some(s)
    }
}

impl StatsSample {
    /// Reads the shards now.
    pub fn take(state: &OpsState) -> StatsSample {
        StatsSample {
            at: Instant::now(),
            totals: state.totals(),
            queue_depth: state.metrics.iter().map(|m| m.queue_depth.get()).collect(),
            buffer: BufferSample::take(&state.buffers),
        }
    }
}

/// The disk buffer's part of a statistics block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferRates {
    /// Records in the buffer now.
    pub records: i64,
    /// Bytes of its files now.
    pub bytes: i64,
    /// Age of its oldest undelivered record now, in seconds (0 if none).
    pub oldest_age_s: f64,
    /// Bytes written per second over the interval.
    pub written_bytes_per_sec: f64,
    /// fdatasync calls per second over the interval.
    pub fsyncs_per_sec: f64,
    /// Records fed from disk per second over the interval.
    pub replayed_per_sec: f64,
}

/// One statistics block: the state now and the rates over the interval since the last.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsBlock {
    /// The interval the rates are over.
    pub interval: Duration,
    /// Station connections open now.
    pub connections_active: i64,
    /// The connection limit.
    pub connections_max: usize,
    /// Distinct zipcodes that identified since start (an estimate within ~1.6%).
    pub unique_zipcodes: u64,
    /// Connections with a read deadline armed: every open connection waits in a read that
    /// its shard expires at the idle timeout (or earlier at the line timeout), so with either
    /// timeout set this is the open connections (with only a line timeout, an upper bound:
    /// only those holding a partial line have one), and zero with neither.
    pub scheduled_timers: i64,
    /// Lines received per second over the interval.
    pub lines_per_sec: f64,
    /// Records delivered per second over the interval.
    pub records_delivered_per_sec: f64,
    /// Records whose delivery failed during the interval.
    pub delivery_failures: u64,
    /// Records whose delivery failed since start.
    pub delivery_failures_total: u64,
    /// Each shard's queue depth now, by shard id.
    pub queue_depth: Vec<i64>,
    /// With a disk buffer: its state now and its rates.
    pub buffer: Option<BufferRates>,
}

impl StatsBlock {
    /// The block for the interval from `prev` to `cur`.
    pub fn between(
        prev: &StatsSample,
        cur: &StatsSample,
        connections_max: usize,
        timers_per_connection: bool,
    ) -> StatsBlock {
        let interval = cur.at.saturating_duration_since(prev.at);
        let secs = interval.as_secs_f64();
        let rate = |a: u64, b: u64| {
            if secs > 0.0 {
                (b.saturating_sub(a) as f64 / secs * 10.0).round() / 10.0
            } else {
                0.0
            }
        };
        let (p, c) = (&prev.totals, &cur.totals);
        StatsBlock {
            interval,
            connections_active: c.connections_active,
            connections_max,
            unique_zipcodes: c.unique_zipcodes(),
            scheduled_timers: if timers_per_connection {
                c.connections_active
            } else {
                0
            },
            lines_per_sec: rate(p.lines_received, c.lines_received),
            records_delivered_per_sec: rate(p.records_delivered, c.records_delivered),
            delivery_failures: c.records_failed.saturating_sub(p.records_failed),
            delivery_failures_total: c.records_failed,
            queue_depth: cur.queue_depth.clone(),
            buffer: cur.buffer.map(|b| {
                let before = prev.buffer.unwrap_or_default();
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                BufferRates {
                    records: b.records,
                    bytes: b.bytes,
                    oldest_age_s: if b.oldest_ms > 0 {
                        (now_ms - b.oldest_ms).max(0) as f64 / 1e3
                    } else {
                        0.0
                    },
                    written_bytes_per_sec: rate(before.written_bytes, b.written_bytes),
                    fsyncs_per_sec: rate(before.fsyncs, b.fsyncs),
                    replayed_per_sec: rate(before.replayed, b.replayed),
                }
            }),
        }
    }

    /// Logs the block as one event (one JSON object with `LOG_FORMAT=json`).
    pub fn log(&self) {
        info!(
            target: "stormgate::stats",
            interval_s = (self.interval.as_secs_f64() * 1000.0).round() / 1000.0,
            connections_active = self.connections_active,
            connections_max = self.connections_max,
            unique_zipcodes = self.unique_zipcodes,
            scheduled_timers = self.scheduled_timers,
            lines_per_sec = self.lines_per_sec,
            records_delivered_per_sec = self.records_delivered_per_sec,
            delivery_failures = self.delivery_failures,
            delivery_failures_total = self.delivery_failures_total,
            queue_depth = %QueueDepths(&self.queue_depth),
            "statistics"
        );
        if let Some(b) = &self.buffer {
            info!(
                target: "stormgate::stats",
                buffer_records = b.records,
                buffer_bytes = b.bytes,
                buffer_oldest_age_s = b.oldest_age_s,
                buffer_written_bytes_per_sec = b.written_bytes_per_sec,
                buffer_fsyncs_per_sec = b.fsyncs_per_sec,
                buffer_replayed_per_sec = b.replayed_per_sec,
                "statistics: disk buffer"
            );
        }
    }
}

/// Per-shard queue depths as `0:12 1:0`, shard by shard.
struct QueueDepths<'a>(&'a [i64]);

impl Display for QueueDepths<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (shard, depth) in self.0.iter().enumerate() {
            if shard > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{shard}:{depth}")?;
        }
        Ok(())
    }
}

/// Logs a [`StatsBlock`] every `interval` until `stop` is signalled (or dropped).
pub(super) fn log_stats(state: &OpsState, interval: Duration, stop: &mpsc::Receiver<()>) {
    let mut prev = StatsSample::take(state);
    let mut next = prev.at + interval;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let cur = StatsSample::take(state);
        StatsBlock::between(
            &prev,
            &cur,
            state.max_connections,
            state.timers_per_connection,
        )
        .log();
        prev = cur;
        // Keep the cadence; after a long stall, start afresh rather than catch up.
        next = (next + interval).max(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::state;
    use super::*;

    #[test]
    fn the_stats_block_is_rates_over_the_interval() {
        let (state, m) = state(Vec::new());
        let t0 = Instant::now();
        let mut prev = StatsSample::take(&state);
        prev.at = t0;
        m[0].lines_received.add(3_000);
        m[1].lines_received.add(1_000);
        m[0].records_delivered.add(2_000);
        m[1].records_failed.add(5);
        m[0].connections_active.add(2);
        m[1].connections_active.add(1);
        m[1].queue_depth.set(17);
        m[0].zipcodes.insert(b"1");
        m[1].zipcodes.insert(b"2");
        let mut cur = StatsSample::take(&state);
        cur.at = t0 + Duration::from_secs(2);
        let block = StatsBlock::between(&prev, &cur, 1000, true);
        assert_eq!(
            block,
            StatsBlock {
                interval: Duration::from_secs(2),
                connections_active: 3,
                connections_max: 1000,
                unique_zipcodes: 2,
                scheduled_timers: 3,
                lines_per_sec: 2_000.0,
                records_delivered_per_sec: 1_000.0,
                delivery_failures: 5,
                delivery_failures_total: 5,
                queue_depth: vec![0, 17],
                buffer: None,
            }
        );
        assert_eq!(QueueDepths(&block.queue_depth).to_string(), "0:0 1:17");
        assert_eq!(
            StatsBlock::between(&cur, &cur, 1000, false).scheduled_timers,
            0
        );
    }
}
