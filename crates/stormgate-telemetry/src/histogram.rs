use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Sub-buckets per power of two: 16 gives a worst-case relative error of 1/16 (6.25%).
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Values below this are counted exactly, one bucket each.
const LINEAR: usize = 2 * SUB;
/// Largest power of two tracked: 2^40 µs is about 12.7 days; larger values share the top bucket.
const MAX_EXP: u32 = 40;
const BUCKETS: usize = LINEAR + (MAX_EXP - SUB_BITS) as usize * SUB;

fn index(v: u64) -> usize {
    if v < LINEAR as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = ((v >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    LINEAR + (exp - SUB_BITS - 1) as usize * SUB + sub
}

/// The largest value that falls in bucket `i`.
fn upper_bound(i: usize) -> u64 {
    if i < LINEAR {
        return i as u64;
    }
    let exp = ((i - LINEAR) / SUB) as u32 + SUB_BITS + 1;
    let sub = ((i - LINEAR) % SUB) as u64;
    let width = 1u64 << (exp - SUB_BITS);
    ((SUB as u64 + sub) << (exp - SUB_BITS)) + width - 1
}

/// A latency histogram in microseconds, single writer, readable from any thread.
///
/// Log-linear buckets (like HdrHistogram with 1 significant digit and a bit): exact below
/// 32 µs, then 16 buckets per power of two, so any percentile it reports is at most 6.25% above
/// the true value. 608 buckets, about 5 KiB per shard.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records one value. Single writer only, like [`crate::Counter`].
    #[inline]
    pub fn record_micros(&self, micros: u64) {
        let b = &self.buckets[index(micros)];
        b.store(b.load(Relaxed) + 1, Relaxed);
        self.count.store(self.count.load(Relaxed) + 1, Relaxed);
        self.sum_micros
            .store(self.sum_micros.load(Relaxed).wrapping_add(micros), Relaxed);
    }

    /// Records a duration.
    #[inline]
    pub fn record(&self, d: Duration) {
        self.record_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Copies the current counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum_micros: self.sum_micros.load(Relaxed),
        }
    }
}

/// A point-in-time copy of a [`LatencyHistogram`], mergeable across shards.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    buckets: Vec<u64>,
    count: u64,
    sum_micros: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_micros: 0,
        }
    }
}

impl HistogramSnapshot {
    /// Adds another snapshot's counts to this one.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_micros = self.sum_micros.wrapping_add(other.sum_micros);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of recorded values, in microseconds.
    pub fn sum_micros(&self) -> u64 {
        self.sum_micros
    }

    /// The value at quantile `q` (0.0..=1.0), as the upper bound of its bucket; 0 when empty.
    pub fn quantile_micros(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper_bound(i);
            }
        }
        upper_bound(BUCKETS - 1)
    }

    /// How many values are `<= le_micros`, counting whole buckets whose upper bound is within
    /// it (the form Prometheus histogram buckets take).
    pub fn count_at_most(&self, le_micros: u64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .take_while(|&(i, _)| upper_bound(i) <= le_micros)
            .map(|(_, &n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range_without_gaps() {
        let mut prev = None;
        for i in 0..BUCKETS {
            let lo = prev.map_or(0, |p: u64| p + 1);
            let hi = upper_bound(i);
            assert!(hi >= lo, "bucket {i}");
            assert_eq!(index(lo), i, "lower bound of bucket {i}");
            assert_eq!(index(hi), i, "upper bound of bucket {i}");
            prev = Some(hi);
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn relative_error_is_bounded() {
        for v in [
            33u64,
            100,
            999,
            1_000,
            4_999,
            65_537,
            10_000_000,
            123_456_789,
        ] {
            let hi = upper_bound(index(v));
            assert!(hi >= v);
            assert!((hi - v) as f64 / v as f64 <= 1.0 / 16.0, "{v} -> {hi}");
        }
    }

    #[test]
    fn quantiles() {
        let h = LatencyHistogram::default();
        for v in 1..=1000 {
            h.record_micros(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 1000);
        assert_eq!(s.sum_micros(), 500_500);
        let p50 = s.quantile_micros(0.5);
        assert!((500..=532).contains(&p50), "{p50}");
        let p99 = s.quantile_micros(0.99);
        assert!((990..=1055).contains(&p99), "{p99}");
        assert_eq!(s.quantile_micros(0.0), 1);
        assert_eq!(HistogramSnapshot::default().quantile_micros(0.5), 0);
        assert_eq!(s.count_at_most(31), 31);
        assert_eq!(s.count_at_most(u64::MAX), 1000);
    }
}
