//! `consume`: reads the topic back and checks what arrived, and how many records the broker
//! holds (its watermarks) after the read.
//!
//! Records stream through [`stormgate_kafka::verify::scan_topic`]; nothing is kept but, per
//! key (zipcode), a count and a [`SeqSet`] (one bit per sequence number), and two latency
//! histograms:
//!
//! - `consume_latency`: local receive time − the line's `sent_us` (client to consumer;
//!   meaningful when `consume --follow` runs alongside `send --timestamps`);
//! - `ingest_latency`: `received_at_ms` × 1000 − `sent_us` (client to the server's read).
//!   `received_at_ms` is truncated to the millisecond, so this reads up to 1 ms low; a
//!   negative difference is recorded as 0 and counted.

use std::borrow::Cow;
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stormgate_kafka::verify::{ScanEnd, ScanEvent, ScanOptions, ScanStats, scan_topic, watermarks};

use crate::cli::ConsumeArgs;
use crate::latency::Latency;
pub use crate::latency::{LatencySummary, MAX_LATENCY_US};
use crate::lines::unix_micros;
use crate::{LoadgenError, output};

/// Sequence numbers above this are counted as out of range instead of tracked (a bit per
/// number up to here is at most 32 MiB for one key).
pub const MAX_TRACKED_SEQ: u64 = 1 << 28;

/// Runs `consume`; the exit code is failure when `--expect` was not reached.
pub fn run(args: &ConsumeArgs) -> Result<ExitCode, LoadgenError> {
    let opts = ScanOptions {
        expect: args.expect,
        follow: args.follow,
        idle_timeout: args.idle_timeout,
        timeout: args.timeout,
        tick: Some(Duration::from_secs(1)),
        properties: args.kafka_props.clone(),
    };
    let mut check = Checker::new(args.lines_per_conn);
    let mut last = 0u64;
    let stats = scan_topic(&args.brokers, &args.topic, &opts, |event| match event {
        ScanEvent::Record(r) => {
            check.offset(r.partition, r.offset);
            check.record(r.key, r.value, unix_micros());
        }
        ScanEvent::Tick(p) => {
            if !args.quiet_progress {
                eprintln!(
                    "[{:>7.1}s] records {:>12} | {:>9} rec/s | keys {} | partitions at end {}/{}",
                    p.elapsed.as_secs_f64(),
                    output::grouped(p.records),
                    output::grouped(p.records - last),
                    check.keys.len(),
                    p.partitions_at_end,
                    p.partitions,
                );
            }
            last = p.records;
        }
    })
    .map_err(|e| LoadgenError::kafka("read the topic", e))?;
    let marks = watermarks(&args.brokers, &args.topic, &args.kafka_props)
        .map_err(|e| LoadgenError::kafka("read the partitions' watermarks", e))?;
    let mut report = check.report(&stats);
    report.broker_records = marks.values().map(|(low, high)| (high - low) as u64).sum();
    output::emit(&report, args.summary.as_deref())?;
    Ok(match args.expect {
        Some(n) if report.records < n => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// The sequence numbers seen for one key: a growing bitset, since stations number their
/// lines densely from 0.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    words: Vec<u64>,
    distinct: u64,
    duplicates: u64,
    max: Option<u64>,
}

impl SeqSet {
    /// Records `seq`; returns false when it had been seen already (a duplicate).
    /// `seq` must be at most [`MAX_TRACKED_SEQ`].
    pub fn insert(&mut self, seq: u64) -> bool {
        debug_assert!(seq <= MAX_TRACKED_SEQ);
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.words.len() {
            self.words.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << bit;
        if self.words[word] & mask != 0 {
            self.duplicates += 1;
            return false;
        }
        self.words[word] |= mask;
        self.distinct += 1;
        self.max = self.max.max(Some(seq));
        true
    }

    /// Distinct numbers seen.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// Numbers seen more than once (each repeat counts).
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Distinct numbers below `n`.
    pub fn distinct_below(&self, n: u64) -> u64 {
        if self.max.is_none_or(|m| m < n) {
            return self.distinct;
        }
        let (full, rest) = ((n / 64) as usize, n % 64);
        let mut count: u64 = self.words[..full]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if rest > 0 {
            count += u64::from((self.words[full] & ((1u64 << rest) - 1)).count_ones());
        }
        count
    }

    /// Numbers missing from `0..expected`, or from `0..=max seen` when `expected` is `None`.
    pub fn missing(&self, expected: Option<u64>) -> u64 {
        match (expected, self.max) {
            (Some(n), _) => n - self.distinct_below(n),
            (None, Some(max)) => max + 1 - self.distinct,
            (None, None) => 0,
        }
    }

    /// Distinct numbers at or above `expected` (lines the station should not have sent).
    pub fn beyond(&self, expected: u64) -> u64 {
        self.distinct - self.distinct_below(expected)
    }
}

#[derive(Debug, Default)]
struct KeyTrack {
    records: u64,
    seqs: SeqSet,
    /// The seq of the key's last record read (a key's records are in one partition, read in
    /// offset order: their seqs must increase).
    last_seq: Option<u64>,
}

/// The fields of a Stormgate record value the checks need.
#[derive(Deserialize)]
struct RecordValue<'a> {
    #[serde(borrow)]
    zipcode: Cow<'a, str>,
    received_at_ms: i64,
    seq: Option<u64>,
    metrics: Metrics,
}

#[derive(Deserialize)]
struct Metrics {
    sent_us: Option<f64>,
}

/// Accumulates the checks over a stream of records.
#[derive(Debug)]
pub struct Checker {
    lines_per_conn: Option<u64>,
    keys: HashMap<Box<[u8]>, KeyTrack>,
    records: u64,
    without_seq: u64,
    seq_out_of_range: u64,
    bad_records: u64,
    first_bad: Option<String>,
    key_mismatches: u64,
    out_of_order: u64,
    /// Per partition, the offset after the last record read.
    next_offset: HashMap<i32, i64>,
    offset_holes: u64,
    offsets_skipped: u64,
    consume_latency: Latency,
    ingest_latency: Latency,
}

impl Checker {
    /// A checker expecting seqs `0..lines_per_conn` per key when given.
    pub fn new(lines_per_conn: Option<u64>) -> Checker {
        Checker {
            lines_per_conn,
            keys: HashMap::new(),
            records: 0,
            without_seq: 0,
            seq_out_of_range: 0,
            bad_records: 0,
            first_bad: None,
            key_mismatches: 0,
            out_of_order: 0,
            next_offset: HashMap::new(),
            offset_holes: 0,
            offsets_skipped: 0,
            consume_latency: Latency::new(),
            ingest_latency: Latency::new(),
        }
    }

    /// Notes where a record sits in its partition. Without transactions or compaction a
    /// partition's offsets are dense, so a jump means the broker assigned offsets to records
    /// it then did not serve: records lost on the broker's side, not before it.
    pub fn offset(&mut self, partition: i32, offset: i64) {
        let next = self.next_offset.entry(partition).or_insert(offset);
        if offset > *next {
            self.offset_holes += 1;
            self.offsets_skipped += (offset - *next) as u64;
        }
        *next = (*next).max(offset + 1);
    }

    /// Checks one record received at `now_us` (Unix microseconds).
    pub fn record(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, now_us: u64) {
        self.records += 1;
        let parsed = value.map(serde_json::from_slice::<RecordValue<'_>>);
        let (Some(key), Some(Ok(v))) = (key, parsed) else {
            self.bad(key, value);
            return;
        };
        if v.zipcode.as_bytes() != key {
            self.key_mismatches += 1;
        }
        let track = match self.keys.get_mut(key) {
            Some(t) => t,
            None => self.keys.entry(key.into()).or_default(),
        };
        track.records += 1;
        match v.seq {
            Some(seq) if seq <= MAX_TRACKED_SEQ => {
                track.seqs.insert(seq);
                if track.last_seq.is_some_and(|last| seq < last) {
                    self.out_of_order += 1;
                }
                track.last_seq = Some(seq);
            }
            Some(_) => self.seq_out_of_range += 1,
            None => self.without_seq += 1,
        }
        if let Some(sent_us) = v.metrics.sent_us {
            let sent_us = sent_us as i64;
            self.consume_latency.record(now_us as i64 - sent_us);
            self.ingest_latency
                .record(v.received_at_ms.saturating_mul(1000) - sent_us);
        }
    }

    fn bad(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) {
        self.bad_records += 1;
        if self.first_bad.is_none() {
            fn show(b: Option<&[u8]>) -> String {
                let mut s = b.map_or("(none)".into(), |b| String::from_utf8_lossy(b).into_owned());
                if s.len() > 300 {
                    let cut = (0..=300)
                        .rev()
                        .find(|&i| s.is_char_boundary(i))
                        .unwrap_or(0);
                    s.truncate(cut);
                }
                s
            }
            self.first_bad = Some(format!("key {} value {}", show(key), show(value)));
        }
    }

    /// The report after the scan described by `stats`.
    pub fn report(&self, stats: &ScanStats) -> ConsumeReport {
        let (mut duplicates, mut missing, mut beyond) = (0, 0, 0);
        for track in self.keys.values() {
            let seqs = &track.seqs;
            if seqs.distinct() == 0 && seqs.duplicates() == 0 {
                continue;
            }
            duplicates += seqs.duplicates();
            missing += seqs.missing(self.lines_per_conn);
            if let Some(n) = self.lines_per_conn {
                beyond += seqs.beyond(n);
            }
        }
        let secs = stats.elapsed.as_secs_f64();
        ConsumeReport {
            mode: "consume".into(),
            records: self.records,
            keys: self.keys.len() as u64,
            partitions: stats.partitions as u64,
            end: match stats.end {
                ScanEnd::Complete => "complete",
                ScanEnd::Idle => "idle_timeout",
                ScanEnd::Timeout => "timeout",
            }
            .into(),
            duplicates,
            missing,
            unexpected_seq: beyond,
            without_seq: self.without_seq,
            seq_out_of_range: self.seq_out_of_range,
            bad_records: self.bad_records,
            first_bad: self.first_bad.clone(),
            key_mismatches: self.key_mismatches,
            out_of_order: self.out_of_order,
            offset_holes: self.offset_holes,
            offsets_skipped: self.offsets_skipped,
            broker_records: 0,
            duration_s: secs,
            records_per_s: if secs > 0.0 {
                self.records as f64 / secs
            } else {
                0.0
            },
            consume_latency_us: self.consume_latency.summary(),
            ingest_latency_us: self.ingest_latency.summary(),
        }
    }
}

/// The JSON summary of a consume run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsumeReport {
    /// Always `"consume"`.
    pub mode: String,
    /// Records read.
    pub records: u64,
    /// Distinct keys (zipcodes).
    pub keys: u64,
    /// Partitions of the topic.
    pub partitions: u64,
    /// Why reading stopped: `complete`, `idle_timeout` or `timeout`.
    pub end: String,
    /// Records whose (key, seq) had been read before.
    pub duplicates: u64,
    /// Seqs never read: gaps below each key's highest seq, or below `--lines-per-conn`.
    pub missing: u64,
    /// Distinct seqs at or above `--lines-per-conn`.
    pub unexpected_seq: u64,
    /// Records without a seq.
    pub without_seq: u64,
    /// Records whose seq is above [`MAX_TRACKED_SEQ`] (not tracked).
    pub seq_out_of_range: u64,
    /// Records without a key, or whose value is not a Stormgate record.
    pub bad_records: u64,
    /// The first bad record, shortened.
    pub first_bad: Option<String>,
    /// Records whose key is not their value's zipcode.
    pub key_mismatches: u64,
    /// Records whose seq is below the previous one read under the same key: a station's
    /// lines out of order in its partition.
    pub out_of_order: u64,
    /// Jumps in a partition's offsets (see [`Checker::offset`]).
    pub offset_holes: u64,
    /// Offsets skipped by those jumps: records the broker acknowledged but did not serve.
    pub offsets_skipped: u64,
    /// Records the broker holds after the read: per partition, high − low watermark
    /// (ListOffsets), summed. A complete read has `records` equal to it.
    pub broker_records: u64,
    /// Time spent reading.
    pub duration_s: f64,
    /// `records / duration_s`.
    pub records_per_s: f64,
    /// Local receive time − `sent_us`, in µs.
    pub consume_latency_us: LatencySummary,
    /// `received_at_ms` × 1000 − `sent_us`, in µs.
    pub ingest_latency_us: LatencySummary,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(seqs: &[u64]) -> SeqSet {
        let mut s = SeqSet::default();
        for &q in seqs {
            s.insert(q);
        }
        s
    }

    /// (seqs read, --lines-per-conn) → (duplicates, missing, beyond).
    fn check(seqs: &[u64], expected: Option<u64>, want: (u64, u64, u64)) {
        let s = set(seqs);
        let got = (
            s.duplicates(),
            s.missing(expected),
            expected.map_or(0, |n| s.beyond(n)),
        );
        assert_eq!(got, want, "seqs {seqs:?}, expected {expected:?}");
    }

    #[test]
    fn seq_sets_find_duplicates_and_gaps() {
        check(&[], None, (0, 0, 0));
        check(&[], Some(3), (0, 3, 0));
        check(&[0, 1, 2, 3], None, (0, 0, 0));
        check(&[3, 1, 0, 2], Some(4), (0, 0, 0));
        check(&[0, 1, 1, 2, 2, 2], None, (3, 0, 0));
        check(&[0, 2, 5], None, (0, 3, 0));
        check(&[0, 2, 5], Some(10), (0, 7, 0));
        check(&[0, 1, 2, 3, 4], Some(3), (0, 0, 2));
        check(&[1000], None, (0, 1000, 0));
        check(&[63, 64, 65, 127, 128], Some(129), (0, 124, 0));
        check(&[64, 64, 200], Some(64), (1, 64, 2));
    }

    #[test]
    fn distinct_below_counts_across_word_boundaries() {
        let s = set(&(0..300).step_by(3).collect::<Vec<_>>());
        for n in [0, 1, 63, 64, 65, 128, 299, 300, 1000] {
            assert_eq!(s.distinct_below(n), n.min(300).div_ceil(3), "n = {n}");
        }
    }

    fn value(zip: &str, seq: Option<u64>, received_ms: i64, sent_us: Option<u64>) -> Vec<u8> {
        let mut metrics = serde_json::json!({"temperature": 25.5});
        if let Some(s) = sent_us {
            metrics["sent_us"] = serde_json::json!(s as f64);
        }
        let mut v = serde_json::json!({
            "connection_id": "0190c9a0-0000-7000-8000-000000000000",
            "zipcode": zip,
            "city": "Bench City",
            "received_at_ms": received_ms,
            "metrics": metrics,
        });
        if let Some(seq) = seq {
            v["seq"] = seq.into();
        }
        serde_json::to_vec(&v).unwrap()
    }

    fn stats(records: u64) -> ScanStats {
        ScanStats {
            records,
            partitions: 3,
            elapsed: Duration::from_secs(2),
            end: ScanEnd::Complete,
        }
    }

    #[test]
    fn checker_tracks_keys_seqs_and_latency() {
        let mut c = Checker::new(Some(4));
        let sent = 1_795_750_241_813_123_u64;
        let rec = |c: &mut Checker, zip: &str, seq| {
            c.record(
                Some(zip.as_bytes()),
                Some(&value(zip, seq, (sent / 1000 + 2) as i64, Some(sent))),
                sent + 5_000,
            )
        };
        for seq in [0, 1, 1, 3] {
            rec(&mut c, "10000", Some(seq));
        }
        for seq in [0, 2, 1, 3, 4] {
            rec(&mut c, "10001", Some(seq));
        }
        rec(&mut c, "10002", None);
        c.record(Some(b"10003"), Some(b"not json"), 0);
        c.record(None, Some(&value("10004", Some(0), 0, None)), 0);
        c.record(Some(b"99999"), Some(&value("10005", Some(0), 0, None)), 0);
        let r = c.report(&stats(c.records));
        assert_eq!(r.records, 13);
        assert_eq!(r.keys, 4, "10000, 10001, 10002, 99999");
        assert_eq!(r.duplicates, 1);
        // 10000 lacks 2; 99999 lacks 1..4.
        assert_eq!(r.missing, 1 + 3);
        assert_eq!(r.unexpected_seq, 1);
        assert_eq!(r.without_seq, 1);
        assert_eq!(r.bad_records, 2);
        assert!(r.first_bad.unwrap().contains("not json"));
        assert_eq!(r.key_mismatches, 1);
        // 10001's 1 after its 2; 10000's repeated 1 is a duplicate, not out of order.
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.records_per_s, 6.5);
        assert_eq!(r.consume_latency_us.count, 10);
        // Three significant digits: 5000 µs reads as the top of its 4 µs bucket.
        let p50 = r.consume_latency_us.p50.unwrap();
        assert!((5_000..5_004).contains(&p50), "{p50}");
        let ingest = r.ingest_latency_us;
        assert_eq!(ingest.count, 10);
        // received_at_ms = sent_ms + 2 ms, truncated: 2 ms minus sent's sub-ms part.
        assert_eq!(ingest.max, Some(2_000 - sent % 1000));
        assert_eq!(ingest.negative, 0);
    }

    #[test]
    fn offset_jumps_are_counted_per_partition() {
        let mut c = Checker::new(None);
        // Partition 0 starts at 5 (earlier records deleted: not a hole), skips 8..10;
        // partition 1 is dense; a re-read offset is not a hole either.
        for (p, o) in [
            (0, 5),
            (1, 0),
            (0, 6),
            (0, 7),
            (1, 1),
            (0, 10),
            (0, 10),
            (1, 2),
            (0, 11),
        ] {
            c.offset(p, o);
        }
        let r = c.report(&stats(0));
        assert_eq!((r.offset_holes, r.offsets_skipped), (1, 2));
    }
}
