//! Telemetry primitives that cost the hot path almost nothing.
//!
//! Every shard owns its [`ShardMetrics`] and is the only thread that writes them; any thread
//! may read them (the stats logger, the metrics endpoint, the shutdown summary) and sums
//! across shards when it does. A single writer makes an increment a plain load and store on a
//! cache line no other shard touches: no lock, no `lock`-prefixed instruction.
//!
//! - [`Counter`] and [`Gauge`]: single-writer atomics.
//! - [`LatencyHistogram`]: log-linear buckets in microseconds with ~6% precision, mergeable
//!   across shards, from which percentiles and Prometheus buckets are derived.
//! - [`LogLimiter`]: lets one log line through per interval and counts the ones it held back.
//! - [`Event`]: an internal event, counted every time and logged at its limiter's rate.
//! - [`Heartbeat`]: when a shard last ran its periodic tick, for the liveness check.
//! - [`DistinctCounter`]: a HyperLogLog sketch of distinct keys (zipcodes) per shard, whose
//!   [`DistinctSnapshot`]s merge across shards into an estimate within about 1.6%.
//! - [`ShardMetrics`]: the full set one shard keeps, and [`Totals`], their sum. Each counter
//!   and gauge is declared once, with its exposed name and help ([`SHARD_SCALARS`]); the
//!   struct fields, the sums, the exposition and the shutdown report all follow from that
//!   list, and [`shard_catalogue`] names every metric that comes from a shard.

mod event;
mod heartbeat;
mod histogram;
mod hll;
mod limiter;
mod metrics;

pub use event::Event;
pub use heartbeat::{Heartbeat, Pulse};
pub use histogram::{HistogramSnapshot, LatencyHistogram};
pub use hll::{DistinctCounter, DistinctSnapshot};
pub use limiter::LogLimiter;
pub use metrics::{
    Counter, DELIVERY_LATENCY, DURABLE_LATENCY, Gauge, HEARTBEAT_AGE, LINE_ERROR_CODES,
    LINE_ERRORS, MetricDesc, MetricKind, PRODUCER_IN_FLIGHT_RECORDS, SHARD_SCALARS, ShardMetrics,
    ShardRead, ShardScalar, Total, Totals, UNIQUE_ZIPCODES, shard_catalogue,
};
