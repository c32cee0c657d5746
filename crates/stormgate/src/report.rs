//! The shutdown report: what each shard did, logged and optionally written as JSON for the
//! benchmark harness (`--stats-file`).

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};
use stormgate_protocol::ErrorCode;
use stormgate_shard::ShardInfo;
use stormgate_telemetry::{HistogramSnapshot, Total, Totals};
use tracing::info;

use crate::atomic_file;

/// One shard's final numbers.
#[derive(Debug, Clone)]
pub struct ShardReport {
    /// Where the shard ran.
    pub info: ShardInfo,
    /// Its counters.
    pub totals: Totals,
}

/// Every shard's final numbers and their sum.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per shard, in shard order.
    pub shards: Vec<ShardReport>,
    /// All shards together.
    pub totals: Totals,
}

impl Report {
    /// Logs one summary line per shard.
    pub fn log(&self) {
        for s in &self.shards {
            let t = &s.totals;
            info!(
                shard = s.info.id,
                core = s.info.core,
                connections = t.connections_accepted,
                lines = t.lines_received,
                rejected = t.line_errors_total(),
                delivered = t.records_delivered,
                failed = t.records_failed,
                spilled = t.records_spilled,
                spill_failures = t.spill_failures,
                backpressure_waits = t.backpressure_waits,
                latency_p50_us = t.delivery_latency.quantile_micros(0.50),
                latency_p99_us = t.delivery_latency.quantile_micros(0.99),
                latency_p999_us = t.delivery_latency.quantile_micros(0.999),
                "shard summary"
            );
        }
    }

    /// The report as JSON: `{"shards":[...],"totals":{...}}`.
    pub fn to_json(&self) -> Value {
        let shards: Vec<Value> = self
            .shards
            .iter()
            .map(|s| {
                let mut v = totals_json(&s.totals);
                v["shard"] = json!(s.info.id);
                v["core"] = json!(s.info.core);
                v
            })
            .collect();
        json!({ "shards": shards, "totals": totals_json(&self.totals) })
    }

    /// Writes [`Report::to_json`] to `path`, replacing it atomically.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let body = serde_json::to_vec_pretty(&self.to_json())?;
        atomic_file::replace(path, &body).with_context(|| format!("writing {}", path.display()))
    }
}

/// The counters of [`stormgate_telemetry::SHARD_SCALARS`] under their field names (gauges are left out: at
/// shutdown they say nothing), and the metrics that are not one number.
fn totals_json(t: &Totals) -> Value {
    let errors: serde_json::Map<String, Value> = ErrorCode::ALL
        .iter()
        .filter(|&&c| t.line_error(c as usize) > 0)
        .map(|&c| (c.as_str().to_owned(), json!(t.line_error(c as usize))))
        .collect();
    let mut v = serde_json::Map::new();
    for (scalar, total) in t.scalars() {
        if let Total::Counter(n) = total {
            v.insert(scalar.field.to_owned(), json!(n));
        }
    }
    v.insert("unique_zipcodes".to_owned(), json!(t.unique_zipcodes()));
    v.insert("line_errors".to_owned(), Value::Object(errors));
    v.insert(
        "delivery_latency_us".to_owned(),
        latency_json(&t.delivery_latency),
    );
    Value::Object(v)
}

/// Quantiles written out in full, enough to draw a latency CDF.
const CDF_QUANTILES: [f64; 16] = [
    0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999,
];

fn latency_json(h: &HistogramSnapshot) -> Value {
    let cdf: Vec<Value> = CDF_QUANTILES
        .iter()
        .map(|&q| json!([q, h.quantile_micros(q)]))
        .collect();
    json!({
        "cdf": cdf,
        "count": h.count(),
        "mean": h.sum_micros().checked_div(h.count()).unwrap_or(0),
        "p50": h.quantile_micros(0.50),
        "p90": h.quantile_micros(0.90),
        "p99": h.quantile_micros(0.99),
        "p999": h.quantile_micros(0.999),
        "max": h.quantile_micros(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stormgate_telemetry::{MetricKind, SHARD_SCALARS, ShardMetrics};

    #[test]
    fn json_carries_per_shard_numbers_and_their_sum() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.lines_received.add(10);
        b.lines_received.add(5);
        b.line_error(ErrorCode::MalformedJson as usize);
        for us in [100, 200, 300] {
            a.delivery_latency.record_micros(us);
        }
        let shard = |id, m: &ShardMetrics| ShardReport {
            info: ShardInfo {
                id,
                core: id,
                nr_shards: 2,
            },
            totals: Totals::sum([m]),
        };
        let report = Report {
            shards: vec![shard(0, &a), shard(1, &b)],
            totals: Totals::sum([&a, &b]),
        };
        let v = report.to_json();
        assert_eq!(v["totals"]["lines_received"], 15);
        for s in SHARD_SCALARS {
            let present = v["totals"].get(s.field).is_some();
            assert_eq!(present, s.desc.kind == MetricKind::Counter, "{}", s.field);
        }
        assert_eq!(v["totals"]["unique_zipcodes"], 0);
        assert_eq!(v["shards"][1]["line_errors"]["malformed_json"], 1);
        assert_eq!(v["shards"][0]["delivery_latency_us"]["count"], 3);
        let p50 = v["shards"][0]["delivery_latency_us"]["p50"]
            .as_u64()
            .unwrap();
        assert!((190..=210).contains(&p50), "p50 {p50}");
    }
}
