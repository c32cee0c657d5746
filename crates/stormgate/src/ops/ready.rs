//! Liveness and readiness: what `/healthz` says, from the shards' heartbeats, and what
//! `/readyz` and `stormgate_ready` say, from the shards' producers and disk buffers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use stormgate_kafka::sink::ProducerStatsSnapshot;
use stormgate_telemetry::Pulse;

use super::OpsState;

/// Producer statistics older than this (or [`STALE_INTERVALS`] intervals, if longer) make a
/// shard not ready: its shard polls its producer at least every 100 ms, so silence this long
/// means the shard or its producer is stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(5);
/// See [`STALE_AFTER`].
pub const STALE_INTERVALS: u32 = 3;

/// A shard whose heartbeat is older than this makes `/healthz` fail. Its tick is due every
/// 20 ms, and however busy its connections keep it, its executor looks at its timers at
/// least every 100 ms (glommio's preempt timer; shorter while the disk buffer's durable
/// path has work): 10 s without one is a shard that stopped, not a busy one. Measured on
/// the 2-core development VM, flat out (100 stations, two shards, the broker's JVM on the
/// same cores, scraped every ~10 ms for 15 s): the oldest heartbeat seen 0.37 s (p99 0.28)
/// with the broker's JIT still compiling, 0.29 s after it, 0.14 s with the disk buffer.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

impl OpsState {
    /// `Ok` while every shard makes progress; otherwise each shard that does not, one per
    /// line: its heartbeat is older than [`HEARTBEAT_STALE`] at `now`.
    ///
    /// Not judged once shutting down: the drain has its own bound (`SHUTDOWN_TIMEOUT`), and
    /// the supervisor's stop timeout ends a process that overruns it; a liveness failure
    /// then would only kill, with the same signal, a process that is already stopping.
    /// Shards that have not beaten yet (starting) or that ended are alive.
    pub fn liveness(&self, now: Instant) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Ok(());
        }
        let stalled: Vec<String> = self
            .shards
            .iter()
            .zip(&self.metrics)
            .filter_map(|(shard, m)| match m.heartbeat.pulse(now) {
                Pulse::Since(age) if age > HEARTBEAT_STALE => Some(format!(
                    "shard {}: no progress for {:.1} s (its tick is due every {} ms)",
                    shard.id,
                    age.as_secs_f64(),
                    stormgate_shard::TICK.as_millis()
                )),
                _ => None,
            })
            .collect();
        if stalled.is_empty() {
            Ok(())
        } else {
            Err(stalled.join("\n"))
        }
    }

    /// What `/readyz` says besides `ready`: damage the disk buffer found at start, and
    /// producers that are down while the disk buffer holds their records.
    pub fn readiness_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for (shard, b) in self.buffers.iter().enumerate() {
            let quarantined = b.quarantined_records.get();
            let segments = b.segments_quarantined.get();
            if quarantined > 0 || segments > 0 {
                notes.push(format!(
                    "disk buffer of shard {shard}: {segments} damaged segment(s) set aside in \
                     quarantine/, {quarantined} record(s) lost to damage (stormgate buffer \
                     inspect)"
                ));
            }
        }
        if !self.buffers.is_empty() {
            for p in &self.producers {
                if let Err(reason) = producer_readiness(&p.snapshot()) {
                    notes.push(format!("{reason} (records wait in the disk buffer)"));
                }
            }
        }
        notes
    }

    /// `Ok` when the process should get traffic; otherwise every reason it should not, one
    /// per line.
    ///
    /// Ready means: not shutting down; every shard listening (true from startup, since the
    /// server starts only once every shard accepts, until shutdown); and with Kafka, every
    /// shard's producer reporting statistics recently, connected to at least one broker,
    /// and, when idempotent, holding a producer id. A producer whose statistics are off
    /// (`statistics.interval.ms=0`) is taken on trust.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".to_owned());
        }
        let mut reasons = Vec::new();
        if self.kafka && self.producers.len() < self.shards.len() {
            reasons.push(format!(
                "{} of {} shards have a producer",
                self.producers.len(),
                self.shards.len()
            ));
        }
        // With a disk buffer a broker outage is absorbed on disk: the process still takes
        // traffic (the producers' state is a note), unless its storage fails.
        if self.buffers.is_empty() {
            for p in &self.producers {
                if let Err(reason) = producer_readiness(&p.snapshot()) {
                    reasons.push(reason);
                }
            }
        }
        for (shard, b) in self.buffers.iter().enumerate() {
            let cause = match b.last_storage_errno.get() {
                0 => continue,
                errno @ 1.. => i32::try_from(errno).map_or_else(
                    |_| format!("errno {errno}"),
                    |e| std::io::Error::from_raw_os_error(e).to_string(),
                ),
                // An error that carries no OS code (a short write, say): the log has it.
                _ => "an error without an OS code: see the log".to_owned(),
            };
            reasons.push(format!(
                "disk buffer of shard {shard}: storage failing ({cause})"
            ));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("\n"))
        }
    }
}

fn producer_readiness(s: &ProducerStatsSnapshot) -> Result<(), String> {
    let shard = s.shard_id;
    if s.interval.is_zero() {
        return Ok(());
    }
    let stale = STALE_AFTER.max(s.interval * STALE_INTERVALS);
    match s.age {
        None => return Err(format!("shard {shard}: no producer statistics yet")),
        Some(age) if age > stale => {
            return Err(format!(
                "shard {shard}: no producer statistics for {:.1} s",
                age.as_secs_f64()
            ));
        }
        Some(_) => {}
    }
    if s.brokers_up == 0 {
        return Err(format!(
            "shard {shard}: producer not connected to any broker ({} known)",
            s.brokers_down
        ));
    }
    if s.idempotent && s.producer_id.is_none() {
        return Err(format!(
            "shard {shard}: idempotent producer has no producer id yet"
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use stormgate_buffer::LogStats;
    use stormgate_kafka::sink::ProducerStats;

    use super::super::tests::state;

    pub(in crate::ops) const UP: &str = r#"{"msg_cnt": 3, "tx_bytes": 1000, "brokers": {"b/1": {"source": "learned",
        "state": "UP", "txretries": 1, "rtt": {"avg": 2500, "cnt": 2}}},
        "eos": {"idemp_state": "Assigned", "producer_id": 7}}"#;

    pub(in crate::ops) fn producer(shard: usize, report: Option<&str>) -> Arc<ProducerStats> {
        let p = Arc::new(ProducerStats::new(shard, true, Duration::from_secs(1)));
        if let Some(r) = report {
            p.update(r.as_bytes()).unwrap();
        }
        p
    }

    #[test]
    fn readiness_needs_every_producer_connected_with_an_id() {
        let (ready, _) = state(vec![producer(0, Some(UP)), producer(1, Some(UP))]);
        assert_eq!(ready.readiness(), Ok(()));

        let down = UP.replace(r#""state": "UP""#, r#""state": "CONNECT""#);
        let waiting = UP.replace("Assigned", "WaitPID");
        for (report, reason) in [
            (None, "shard 1: no producer statistics yet"),
            (
                Some(down.as_str()),
                "shard 1: producer not connected to any broker (1 known)",
            ),
            (
                Some(waiting.as_str()),
                "shard 1: idempotent producer has no producer id yet",
            ),
        ] {
            let (s, _) = state(vec![producer(0, Some(UP)), producer(1, report)]);
            assert_eq!(s.readiness(), Err(reason.to_owned()));
        }

        let (missing, _) = state(vec![producer(0, Some(UP))]);
        assert_eq!(
            missing.readiness(),
            Err("1 of 2 shards have a producer".to_owned())
        );
        ready.set_draining();
        assert_eq!(ready.readiness(), Err("shutting down".to_owned()));
    }

    #[test]
    fn a_shard_without_a_heartbeat_for_10_s_is_not_alive() {
        let (s, metrics) = state(Vec::new());
        let now = Instant::now();
        // Starting: no beat yet.
        assert_eq!(s.liveness(now), Ok(()));
        metrics[0].heartbeat.beat_at(now);
        metrics[1].heartbeat.beat_at(now);
        assert_eq!(s.liveness(now + Duration::from_secs(9)), Ok(()));
        metrics[0].heartbeat.beat_at(now + Duration::from_secs(9));
        assert_eq!(
            s.liveness(now + Duration::from_secs(12)),
            Err("shard 1: no progress for 12.0 s (its tick is due every 20 ms)".to_owned())
        );
        // A shard that ended beats no more, and is no reason.
        metrics[1].heartbeat.finish();
        assert_eq!(s.liveness(now + Duration::from_secs(12)), Ok(()));
        metrics[1].heartbeat.beat_at(now);
        s.set_draining();
        assert_eq!(
            s.liveness(now + Duration::from_secs(60)),
            Ok(()),
            "a draining process is not judged"
        );
    }

    /// With a disk buffer a broker outage is a note, damage found at start is a note, and
    /// failing storage is the one reason not to be ready.
    #[test]
    fn a_disk_buffer_turns_producer_trouble_and_damage_into_notes() {
        let down = UP.replace(r#""state": "UP""#, r#""state": "CONNECT""#);
        let buffers: Vec<Arc<LogStats>> = (0..2).map(|_| Arc::default()).collect();
        let (s, _) = state(vec![producer(0, Some(UP)), producer(1, Some(&down))]);
        let s = s.with_buffers(buffers.clone());
        buffers[0].segments_quarantined.add(1);
        buffers[0].quarantined_records.add(42);
        assert_eq!(s.readiness(), Ok(()));
        assert_eq!(
            s.readiness_notes(),
            [
                "disk buffer of shard 0: 1 damaged segment(s) set aside in quarantine/, 42 \
                 record(s) lost to damage (stormgate buffer inspect)",
                "shard 1: producer not connected to any broker (1 known) (records wait in the \
                 disk buffer)",
            ]
        );
        buffers[1].last_storage_errno.set(28);
        let reason = s.readiness().unwrap_err();
        assert!(
            reason.starts_with("disk buffer of shard 1: storage failing (No space left"),
            "{reason}"
        );
        buffers[1].last_storage_errno.set(-1);
        assert_eq!(
            s.readiness(),
            Err(
                "disk buffer of shard 1: storage failing (an error without an OS code: see \
                 the log)"
                    .to_owned()
            )
        );
        buffers[1].last_storage_errno.set(0);
        assert_eq!(s.readiness(), Ok(()), "once flushes succeed again");
    }
}
