//! Latency histograms (µs) and their summaries, for the consumer's delivery latencies and the
//! sender's acknowledgement latencies.
//!
//! A sending process that runs child processes adds their histograms up, so a summary can
//! travel with the histogram itself: [`Latency::encode`] writes HdrHistogram's own
//! interchange form (V2, deflated, base64: what its interval logs hold), which any
//! HdrHistogram implementation reads back.

use std::io::Cursor;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

/// Highest latency the histograms hold (larger values are recorded as this).
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Percentiles of a latency histogram, in µs; all `None` when it is empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: Option<u64>,
    /// 90th percentile.
    pub p90: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// 99.9th percentile.
    pub p999: Option<u64>,
    /// Largest (capped at [`MAX_LATENCY_US`]).
    pub max: Option<u64>,
    /// Values recorded.
    pub count: u64,
    /// Values that were negative and recorded as 0.
    pub negative: u64,
}

/// A histogram of latencies in µs, 1 µs to [`MAX_LATENCY_US`], three significant figures.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
    negative: u64,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Latency {
        Latency {
            histogram: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("valid histogram bounds"),
            negative: 0,
        }
    }

    /// Records one value; a negative one (clocks apart) counts in `negative` and as 0.
    pub fn record(&mut self, us: i64) {
        if us < 0 {
            self.negative += 1;
        }
        self.histogram.saturating_record(us.max(0) as u64);
    }

    /// Records `us` `n` times.
    pub fn record_n(&mut self, us: u64, n: u64) {
        self.histogram.saturating_record_n(us, n);
    }

    /// Adds another histogram's values to this one.
    pub fn add(&mut self, other: &Latency) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms of the same bounds add up");
        self.negative += other.negative;
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// Its percentiles.
    pub fn summary(&self) -> LatencySummary {
        let h = &self.histogram;
        let at = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        LatencySummary {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: (!h.is_empty()).then(|| h.max()),
            count: h.len(),
            negative: self.negative,
        }
    }

    /// The histogram as HdrHistogram's V2 deflate encoding in base64 (`negative` is not in
    /// it: only the consumer's clocks can go backwards, and it does not travel).
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&self.histogram, &mut bytes)
            .expect("a histogram serializes into memory");
        STANDARD.encode(bytes)
    }

    /// A histogram [`encode`](Self::encode)d by this or any HdrHistogram implementation.
    pub fn decode(text: &str) -> Result<Latency, String> {
        let bytes = STANDARD.decode(text).map_err(|e| format!("base64: {e}"))?;
        let read: Histogram<u64> = Deserializer::new()
            .deserialize(&mut Cursor::new(bytes))
            .map_err(|e| format!("histogram: {e:?}"))?;
        let mut latency = Latency::new();
        latency
            .histogram
            .add(&read)
            .map_err(|e| format!("histogram: {e:?}"))?;
        Ok(latency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_latency_is_counted_and_recorded_as_zero() {
        let mut l = Latency::new();
        l.record(-300);
        l.record(70_000_000);
        let s = l.summary();
        assert_eq!((s.count, s.negative), (2, 1));
        assert_eq!(s.p50, Some(0));
        assert!(s.max.unwrap() >= MAX_LATENCY_US && s.max.unwrap() < MAX_LATENCY_US * 101 / 100);
        assert_eq!(Latency::new().summary().p99, None);
    }

    #[test]
    fn an_encoded_histogram_decodes_to_the_same_percentiles_and_adds_up() {
        let mut a = Latency::new();
        a.record_n(2_000, 98);
        a.record_n(250_000, 2);
        let decoded = Latency::decode(&a.encode()).unwrap();
        assert_eq!(decoded.summary(), a.summary());

        let mut sum = Latency::new();
        sum.record_n(1_000, 100);
        sum.add(&decoded);
        let s = sum.summary();
        assert_eq!(s.count, 200);
        assert_eq!(s.p50, Some(1_000));
        assert_eq!(s.p90, Some(2_000));
        // 2 of 200 at 250 ms: the 99th percentile is still 2 ms, the 99.9th is the tail.
        assert_eq!(s.p99, Some(2_000));
        assert!(s.p999.unwrap() >= 250_000 && s.p999.unwrap() < 250_000 * 1001 / 1000);
        assert!(Latency::decode("not base64!").is_err());
        assert!(Latency::decode("AAAA").is_err());
    }
}
