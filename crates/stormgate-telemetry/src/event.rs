//! Internal events: one way to count and log what happens inside the server, so that its logs
//! and its metrics cannot drift apart.

use std::time::Instant;

use crate::limiter::LogLimiter;
use crate::metrics::ShardMetrics;

/// Something that happened inside Stormgate that an operator may need to see: counted every
/// time in its shard's metrics, logged at most once per its [`LogLimiter`]'s interval, with
/// the number of lines held back since the last one. The shape of Vector's `InternalEvent`,
/// split in two so that the count never depends on whether a line was logged.
///
/// Each event is a struct of what it says (borrowed: building one allocates nothing), in the
/// crate that emits it (`stormgate-shard`'s `events`, `stormgate-kafka`'s sink and context).
pub trait Event {
    /// Counts it in its shard's metrics. The default counts nothing: for events counted where
    /// they are decided (a failed delivery, by the shard's ledger) or that have no counter.
    fn count(&self, metrics: &ShardMetrics) {
        let _ = metrics;
    }

    /// Logs it; `suppressed` lines of its kind were held back since the last one.
    fn log(&self, suppressed: u64);

    /// Counts it, and logs it when `limiter` lets a line through now: events that can repeat
    /// per line or per connection.
    fn emit(&self, metrics: &ShardMetrics, limiter: &LogLimiter) {
        self.count(metrics);
        if let Some(suppressed) = limiter.allow(Instant::now()) {
            self.log(suppressed);
        }
    }

    /// Counts it and logs it every time: events logged at DEBUG, or each one a bug to fix.
    fn emit_every(&self, metrics: &ShardMetrics) {
        self.count(metrics);
        self.log(0);
    }

    /// Logs it when `limiter` lets a line through now, counting nothing: for events raised
    /// where no shard's metrics are at hand (librdkafka's callbacks).
    fn log_limited(&self, limiter: &LogLimiter) {
        if let Some(suppressed) = limiter.allow(Instant::now()) {
            self.log(suppressed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;

    struct Probe<'a> {
        logged: &'a Cell<Vec<u64>>,
    }

    impl Event for Probe<'_> {
        fn count(&self, metrics: &ShardMetrics) {
            metrics.connections_rejected.incr();
        }

        fn log(&self, suppressed: u64) {
            let mut v = self.logged.take();
            v.push(suppressed);
            self.logged.set(v);
        }
    }

    #[test]
    fn every_event_is_counted_and_logged_at_the_limiters_rate() {
        let metrics = ShardMetrics::default();
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        let logged = Cell::new(Vec::new());
        for _ in 0..5 {
            Probe { logged: &logged }.emit(&metrics, &limiter);
        }
        assert_eq!(metrics.connections_rejected.get(), 5);
        assert_eq!(logged.take(), [0], "one line in the interval");
        Probe { logged: &logged }.emit_every(&metrics);
        assert_eq!(metrics.connections_rejected.get(), 6);
        assert_eq!(logged.take(), [0]);
    }
}
