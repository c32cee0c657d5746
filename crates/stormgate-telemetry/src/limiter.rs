use std::cell::Cell;
use std::time::{Duration, Instant};

/// Lets at most one log line through per interval and counts the rest.
///
/// Shard-local (it uses `Cell`): each shard keeps its own limiter per event kind, so a flood of
/// bad input on one shard costs that shard a counter increment per line and one log line per
/// interval.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    next: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl LogLimiter {
    /// One line per `interval`.
    pub const fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            next: Cell::new(None),
            suppressed: Cell::new(0),
        }
    }

    /// Returns `Some(n)` when a line may be logged now, `n` being how many were held back
    /// since the last one; `None` when this one should be held back (and is counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        match self.next.get() {
            Some(next) if now < next => {
                self.suppressed.set(self.suppressed.get() + 1);
                None
            }
            _ => {
                self.next.set(Some(now + self.interval));
                Some(self.suppressed.replace(0))
            }
        }
    }
}

impl Default for LogLimiter {
    /// One line per second.
    fn default() -> Self {
        LogLimiter::new(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count_of_the_rest() {
        let l = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(5)), Some(1));
    }
}
