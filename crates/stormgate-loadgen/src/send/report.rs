//! The send summary and progress snapshots, and how they add up across threads and processes.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::worker::{Counts, WorkerReport};
use crate::latency::{Latency, LatencySummary};
use crate::output::grouped;

/// The JSON summary of a send run (one line on stdout).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SendSummary {
    /// Always `"send"`.
    pub mode: String,
    /// Connections asked for.
    pub connections: u64,
    /// Processes that held connections.
    pub processes: u64,
    /// Sending threads per process.
    pub threads: u64,
    /// Open-files soft limit in force.
    pub fd_limit: u64,
    /// `--idle`.
    pub idle: bool,
    /// `--rate` (lines/s per connection; 0 = unlimited).
    pub rate: f64,
    /// What the threads counted, added up (their fields appear at this level in the JSON).
    #[serde(flatten)]
    pub counts: Counts,
    /// From when every connection was open to the last line written (the longest process).
    pub duration_s: f64,
    /// `lines_sent / duration_s`.
    pub lines_per_s: f64,
    /// `bytes_sent / duration_s`, in MB (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// `lines_sent / (duration_s + drain_s)`. Kernel socket buffers hold many megabytes per
    /// connection, so `lines_per_s` can run ahead of the server; when `drain_timeouts` is 0
    /// the server had read every line by the end of the drain, and this is a lower bound on
    /// its read rate.
    pub lines_per_s_incl_drain: f64,
    /// Time to open the connections (the longest process).
    pub connect_s: f64,
    /// Time from the last line to the server closing every connection (the longest process).
    pub drain_s: f64,
    /// With --acks: each acknowledged line's time from being built to its `ack` read, in
    /// µs, as the station saw it (waits for room in the socket included).
    pub ack_latency_us: Option<LatencySummary>,
    /// The same as an HdrHistogram (V2 deflate, base64; see [`Latency::encode`]): how child
    /// processes' latencies add up, and the whole distribution for whoever wants it.
    pub ack_latency_histogram: Option<String>,
}

impl SendSummary {
    /// The summary of one process's threads, which started at `start`.
    pub fn from_workers(start: Instant, reports: &[WorkerReport]) -> SendSummary {
        let mut s = SendSummary {
            mode: "send".into(),
            processes: 1,
            threads: reports.len() as u64,
            ..SendSummary::default()
        };
        let mut ack_latency = Latency::new();
        for r in reports {
            ack_latency.add(&r.ack_latency);
            s.counts.add(&r.counts);
        }
        let started = reports.iter().filter_map(|r| r.started).min();
        let finished = reports.iter().filter_map(|r| r.finished).max();
        let ended = reports.iter().filter_map(|r| r.ended).max();
        let secs = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        s.connect_s = secs(Some(start), started);
        s.duration_s = secs(started, finished);
        s.drain_s = secs(finished, ended);
        s.rates();
        s.set_ack_latency(&ack_latency);
        s
    }

    /// Adds up the summaries of child processes (they ran side by side: times are maxima).
    pub fn merge(children: &[SendSummary]) -> SendSummary {
        let mut s = SendSummary {
            mode: "send".into(),
            processes: children.len() as u64,
            ..SendSummary::default()
        };
        let mut ack_latency = Latency::new();
        for c in children {
            match c.ack_latency_histogram.as_deref().map(Latency::decode) {
                Some(Ok(latency)) => ack_latency.add(&latency),
                Some(Err(e)) if s.counts.first_error.is_none() => {
                    s.counts.first_error = Some(format!("a child's ack latency histogram: {e}"));
                }
                _ => {}
            }
            s.connections += c.connections;
            s.threads = s.threads.max(c.threads);
            s.duration_s = s.duration_s.max(c.duration_s);
            s.connect_s = s.connect_s.max(c.connect_s);
            s.drain_s = s.drain_s.max(c.drain_s);
            s.counts.add(&c.counts);
        }
        s.rates();
        s.set_ack_latency(&ack_latency);
        s
    }

    fn set_ack_latency(&mut self, latency: &Latency) {
        if !latency.is_empty() {
            self.ack_latency_us = Some(latency.summary());
            self.ack_latency_histogram = Some(latency.encode());
        }
    }

    fn rates(&mut self) {
        if self.duration_s > 0.0 {
            let (lines, bytes) = (self.counts.lines_sent as f64, self.counts.bytes_sent as f64);
            self.lines_per_s = lines / self.duration_s;
            self.mb_per_s = bytes / self.duration_s / 1e6;
            self.lines_per_s_incl_drain = lines / (self.duration_s + self.drain_s);
        }
    }
}

/// Cumulative counters of a process at one moment; children print one per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Connections established so far.
    pub connected: u64,
    /// Connections open now.
    pub open: u64,
    /// Metrics lines built into writes.
    pub lines: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Writes that found the socket full.
    pub blocked: u64,
    /// Error lines received.
    pub errors: u64,
}

impl std::ops::Add for Progress {
    type Output = Progress;
    fn add(self, o: Progress) -> Progress {
        Progress {
            connected: self.connected + o.connected,
            open: self.open + o.open,
            lines: self.lines + o.lines,
            bytes: self.bytes + o.bytes,
            blocked: self.blocked + o.blocked,
            errors: self.errors + o.errors,
        }
    }
}

/// Prints one human progress line per call, with rates over the time since the last.
#[derive(Debug)]
pub struct ProgressPrinter {
    start: Instant,
    last: (Instant, Progress),
}

impl ProgressPrinter {
    /// A printer whose elapsed time counts from `start`.
    pub fn new(start: Instant) -> ProgressPrinter {
        ProgressPrinter {
            start,
            last: (start, Progress::default()),
        }
    }

    /// The line for `now`'s counters.
    pub fn line(&mut self, now: Instant, p: Progress) -> String {
        let (then, prev) = std::mem::replace(&mut self.last, (now, p));
        let dt = now
            .saturating_duration_since(then)
            .max(Duration::from_millis(1));
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt.as_secs_f64();
        format!(
            "[{:>7.1}s] open {:>6} | lines {:>14} | {:>11} lines/s | {:>7.1} MB/s | blocked {} | errors {}",
            now.saturating_duration_since(self.start).as_secs_f64(),
            p.open,
            grouped(p.lines),
            grouped(per_s(p.lines, prev.lines) as u64),
            per_s(p.bytes, prev.bytes) / 1e6,
            grouped(p.blocked),
            grouped(p.errors),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_add_up() {
        let child = |lines: u64, secs: f64, code: &str| SendSummary {
            mode: "send".into(),
            connections: 10,
            processes: 1,
            threads: 1,
            counts: Counts {
                connected: 9,
                connect_errors: 1,
                lines_sent: lines,
                bytes_sent: lines * 100,
                error_replies: [(code.to_owned(), 2)].into(),
                first_error: (code == "b").then(|| "boom".to_owned()),
                reconnects: 3,
                ..Counts::default()
            },
            duration_s: secs,
            ..SendSummary::default()
        };
        let s = SendSummary::merge(&[child(100, 1.0, "a"), child(300, 2.0, "b")]);
        assert_eq!(
            (s.processes, s.connections, s.counts.connected),
            (2, 20, 18)
        );
        assert_eq!((s.counts.connect_errors, s.counts.lines_sent), (2, 400));
        assert_eq!(s.duration_s, 2.0);
        assert_eq!(s.lines_per_s, 200.0);
        assert_eq!(s.mb_per_s, 0.02);
        assert_eq!(
            s.counts.error_replies,
            [("a".into(), 2), ("b".into(), 2)].into()
        );
        assert_eq!(s.counts.first_error.as_deref(), Some("boom"));
        assert_eq!(s.counts.reconnects, 6);
        assert_eq!(s.ack_latency_us, None, "no acks, no latencies");
    }

    #[test]
    fn ack_latencies_add_up_across_threads_and_child_processes() {
        let t0 = Instant::now();
        let worker = |us: u64, n: u64| {
            let mut r = WorkerReport::default();
            r.ack_latency.record_n(us, n);
            r
        };
        // Two processes, one of two threads: 60 lines at 1 ms, 40 at 1 s.
        let a = SendSummary::from_workers(t0, &[worker(1_000, 50), worker(1_000_000, 30)]);
        let b = SendSummary::from_workers(t0, &[worker(1_000, 10), worker(1_000_000, 10)]);
        assert_eq!(a.ack_latency_us.as_ref().map(|l| l.count), Some(80));
        // Through JSON, as a child's summary reaches its parent.
        let b: SendSummary = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let s = SendSummary::merge(&[a, b]);
        let l = s.ack_latency_us.expect("the merged latencies");
        assert_eq!((l.count, l.p50), (100, Some(1_000)));
        assert!(
            l.p90.is_some_and(|v| (1_000_000..=1_001_000).contains(&v)),
            "{l:?}"
        );
        let whole = Latency::decode(s.ack_latency_histogram.as_deref().unwrap()).unwrap();
        assert_eq!(whole.summary().count, 100);
        assert_eq!(s.counts.first_error, None);

        let broken = SendSummary {
            ack_latency_histogram: Some("garbage".into()),
            ..SendSummary::default()
        };
        let s = SendSummary::merge(&[broken]);
        assert!(
            s.counts
                .first_error
                .is_some_and(|e| e.contains("ack latency histogram"))
        );
    }

    #[test]
    fn workers_add_up_with_times_from_the_earliest_start_to_the_latest_end() {
        let t0 = Instant::now();
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        let w = |lines, started, finished, ended| WorkerReport {
            counts: Counts {
                connected: 5,
                reconnects: 1,
                lines_sent: lines,
                ..Counts::default()
            },
            started,
            finished,
            ended,
            ..WorkerReport::default()
        };
        let s = SendSummary::from_workers(
            t0,
            &[
                w(1000, at(100), at(1100), at(1200)),
                w(3000, at(200), at(2100), at(2500)),
            ],
        );
        assert_eq!(
            (s.threads, s.counts.connected, s.counts.lines_sent),
            (2, 10, 4000)
        );
        assert_eq!(s.counts.reconnects, 2);
        assert_eq!(s.connect_s, 0.1);
        assert_eq!(s.duration_s, 2.0);
        assert_eq!(s.drain_s, 0.4);
        assert_eq!(s.lines_per_s, 2000.0);
    }
}
