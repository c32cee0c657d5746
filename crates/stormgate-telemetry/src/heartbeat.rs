//! When a shard last showed it makes progress: what `/healthz` judges.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Stored before the first beat.
const NEVER: i64 = i64::MIN;
/// Stored once the shard ended: no beat is due any more.
const FINISHED: i64 = i64::MAX;

/// The moment every heartbeat of the process counts from (the first to ask for it).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The last moment a shard ran its periodic tick, written by the shard and read by anyone.
///
/// A tick is a timer the shard's executor fires and a task it runs: it comes only while the
/// executor goes round its loop. A shard whose executor stopped (a task that never yields,
/// a scheduler that parked with work left) stops beating while its connections stay open —
/// which nothing else shows from outside.
#[derive(Debug)]
pub struct Heartbeat(AtomicI64);

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat(AtomicI64::new(NEVER))
    }
}

/// What a [`Heartbeat`] says at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pulse {
    /// The shard has not beaten yet (it is starting).
    NotStarted,
    /// The last beat was this long ago.
    Since(Duration),
    /// The shard ended; no beat is due.
    Finished,
}

impl Heartbeat {
    /// Records a beat now. Single writer only (the shard).
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    /// Records a beat at `at`, in whole milliseconds from the process's epoch (either side
    /// of it: tests set the clock back).
    pub fn beat_at(&self, at: Instant) {
        let epoch = epoch();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        // Clamped clear of the two marks; i64 milliseconds outlast any process.
        let offset = if at >= epoch {
            ms(at - epoch)
        } else {
            -ms(epoch - at)
        };
        self.0.store(offset.clamp(NEVER + 1, FINISHED - 1), Relaxed);
    }

    /// Records that the shard ended. Single writer only.
    pub fn finish(&self) {
        self.0.store(FINISHED, Relaxed);
    }

    /// What the heartbeat says at `now`.
    pub fn pulse(&self, now: Instant) -> Pulse {
        match self.0.load(Relaxed) {
            NEVER => Pulse::NotStarted,
            FINISHED => Pulse::Finished,
            offset => {
                let magnitude = Duration::from_millis(offset.unsigned_abs());
                let at = if offset >= 0 {
                    epoch().checked_add(magnitude)
                } else {
                    epoch().checked_sub(magnitude)
                };
                // Unrepresentable only for a moment no clock reading gave; and a clock read
                // before the beat (another thread's) is no age at all.
                let age = at.map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                Pulse::Since(age)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_says_how_long_ago_it_last_beat() {
        let heart = Heartbeat::default();
        let now = Instant::now();
        assert_eq!(heart.pulse(now), Pulse::NotStarted);
        heart.beat_at(now + Duration::from_secs(1));
        let later = now + Duration::from_secs(13);
        let Pulse::Since(age) = heart.pulse(later) else {
            panic!("beaten");
        };
        // Stored in whole milliseconds: within 1 ms of what it was.
        assert!(
            age > Duration::from_millis(11_999) && age < Duration::from_millis(12_001),
            "{age:?}"
        );
        // A clock read before the beat (another thread's) is no age at all.
        assert_eq!(heart.pulse(now), Pulse::Since(Duration::ZERO));
        // Before the process's epoch (whenever the first beat set it) as well; a clock this
        // young (a machine booted 30 s ago) cannot go back that far.
        if let Some(past) = now.checked_sub(Duration::from_secs(30)) {
            heart.beat_at(past);
            let Pulse::Since(age) = heart.pulse(now) else {
                panic!("beaten");
            };
            assert!(
                age > Duration::from_millis(29_999) && age < Duration::from_millis(30_001),
                "{age:?}"
            );
        }
        heart.finish();
        assert_eq!(heart.pulse(later), Pulse::Finished);
    }
}
