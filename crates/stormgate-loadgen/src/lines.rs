//! The station lines the sender writes, built from templates so that a line costs a few
//! buffer copies and two integer renderings, never a float format.
//!
//! ```text
//! {"type":"identify","zipcode":"10042","city":"Bench City"}
//! {"type":"metrics","seq":7,"data":"temperature=25.5,humidity=60.0,pressure=1013.2,sent_us=1795750241813123"}
//! ```
//!
//! `seq` (per connection, from 0) and `sent_us` (Unix microseconds when the line was built;
//! the sender stamps each write batch once) are optional; the metric values cycle through
//! [`VARIANTS`] pre-rendered sets so that the stream is not one line repeated.

use std::time::{SystemTime, UNIX_EPOCH};

/// City every benchmark station reports.
pub const CITY: &str = "Bench City";
/// Pre-rendered sets of metric values.
pub const VARIANTS: usize = 64;

/// The zipcode of connection `index` when the first is `zip_base`: at least five digits.
pub fn zipcode(zip_base: u64, index: usize) -> String {
    format!("{:05}", zip_base + index as u64)
}

/// The identify line (with its newline) for a station, asking for acknowledgements when
/// `acks`; JSON-escaped by serde_json.
pub fn identify_line(zipcode: &str, city: &str, acks: bool) -> Vec<u8> {
    let mut identify = serde_json::json!({
        "type": "identify",
        "zipcode": zipcode,
        "city": city,
    });
    if acks {
        identify["acks"] = true.into();
    }
    let mut line = serde_json::to_vec(&identify).expect("a JSON object always serializes");
    line.push(b'\n');
    line
}

/// Unix time in microseconds.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Builds metrics lines. Built once per process and shared by its threads.
#[derive(Debug, Clone)]
pub struct MetricsLines {
    seq: bool,
    timestamps: bool,
    /// `temperature=…,humidity=…,pressure=…`, one per variant.
    variants: Vec<Box<[u8]>>,
}

const PREFIX: &[u8] = br#"{"type":"metrics","#;
const SEQ: &[u8] = br#""seq":"#;
const DATA: &[u8] = br#""data":""#;
const SENT_US: &[u8] = b",sent_us=";
const END: &[u8] = b"\"}\n";

impl MetricsLines {
    /// Lines with a `seq` field when `seq`, and a `sent_us` metric when `timestamps`.
    pub fn new(seq: bool, timestamps: bool) -> MetricsLines {
        // A fixed xorshift sequence: the same values in every run, cheap to vary.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |range: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % range
        };
        let variants = (0..VARIANTS)
            .map(|_| {
                let temperature = 180 + next(120); // 18.0 ..= 29.9
                let humidity = 400 + next(400); // 40.0 ..= 79.9
                let pressure = 10_000 + next(250); // 1000.0 ..= 1024.9
                format!(
                    "temperature={}.{},humidity={}.{},pressure={}.{}",
                    temperature / 10,
                    temperature % 10,
                    humidity / 10,
                    humidity % 10,
                    pressure / 10,
                    pressure % 10
                )
                .into_bytes()
                .into_boxed_slice()
            })
            .collect();
        MetricsLines {
            seq,
            timestamps,
            variants,
        }
    }

    /// Whether lines carry `seq`.
    pub fn has_seq(&self) -> bool {
        self.seq
    }

    /// Whether lines carry `sent_us`.
    pub fn has_timestamps(&self) -> bool {
        self.timestamps
    }

    /// Appends line number `n` of a connection (its `seq`, when lines carry one), with its
    /// newline; `sent_us` is used when lines carry timestamps.
    #[inline]
    pub fn push(&self, out: &mut Vec<u8>, n: u64, sent_us: u64) {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(PREFIX);
        if self.seq {
            out.extend_from_slice(SEQ);
            out.extend_from_slice(digits.format(n).as_bytes());
            out.push(b',');
        }
        out.extend_from_slice(DATA);
        out.extend_from_slice(&self.variants[(n % VARIANTS as u64) as usize]);
        if self.timestamps {
            out.extend_from_slice(SENT_US);
            out.extend_from_slice(digits.format(sent_us).as_bytes());
        }
        out.extend_from_slice(END);
    }

    /// An upper bound on one line's length.
    pub fn max_line_len(&self) -> usize {
        let longest = self.variants.iter().map(|v| v.len()).max().unwrap_or(0);
        PREFIX.len() + SEQ.len() + 21 + DATA.len() + longest + SENT_US.len() + 20 + END.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stormgate_protocol::{LineParser, Parsed, Session};

    /// Runs `lines` through the server's own parser; returns each metrics line's record.
    fn through_server_parser(lines: &[Vec<u8>]) -> Vec<(Option<u64>, serde_json::Value)> {
        let mut parser = LineParser::new();
        let mut session = Session::new("0190c9a0-0000-7000-8000-000000000000");
        let mut records = Vec::new();
        for line in lines {
            assert_eq!(line.last(), Some(&b'\n'), "every line ends with a newline");
            let mut buf = line.clone();
            let mut out = Vec::new();
            let parsed = parser
                .parse_line(&mut session, &mut buf, 0..line.len() - 1, 1_000, &mut out)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(line)));
            if let Parsed::Record { seq } = parsed {
                records.push((seq, serde_json::from_slice(&out).unwrap()));
            }
        }
        records
    }

    fn metrics(seq: bool, timestamps: bool, n: u64, sent_us: u64) -> Vec<u8> {
        let mut out = Vec::new();
        MetricsLines::new(seq, timestamps).push(&mut out, n, sent_us);
        out
    }

    #[test]
    fn identify_is_valid_and_escaped() {
        let line = identify_line("10042", "Bench \"City\"", false);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "identify");
        assert_eq!(v["zipcode"], "10042");
        assert_eq!(v["city"], "Bench \"City\"");
        assert_eq!(zipcode(10_000, 42), "10042");
        assert_eq!(zipcode(7, 0), "00007");
        assert_eq!(zipcode(99_999, 1), "100000");
    }

    #[test]
    fn metrics_lines_carry_seq_and_sent_us_only_when_asked() {
        let cases = [
            (false, false, None, None),
            (true, false, Some(7), None),
            (false, true, None, Some(1_795_750_241_813_123.0)),
            (true, true, Some(7), Some(1_795_750_241_813_123.0)),
        ];
        for (seq, ts, want_seq, want_sent) in cases {
            let line = metrics(seq, ts, 7, 1_795_750_241_813_123);
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["type"], "metrics");
            assert_eq!(v["seq"].as_u64(), want_seq, "{v}");
            let data = v["data"].as_str().unwrap();
            assert!(data.starts_with("temperature="), "{data}");
            assert_eq!(data.contains("sent_us="), ts, "{data}");
            assert!((70..=125).contains(&line.len()), "{} bytes", line.len());
            assert!(line.len() <= MetricsLines::new(seq, ts).max_line_len());

            let records = through_server_parser(&[identify_line("10042", CITY, false), line]);
            let (parsed_seq, record) = &records[0];
            assert_eq!(*parsed_seq, want_seq);
            assert_eq!(record["zipcode"], "10042");
            assert_eq!(record["city"], CITY);
            assert_eq!(record["metrics"]["sent_us"].as_f64(), want_sent);
            assert!(record["metrics"]["pressure"].as_f64().unwrap() >= 1000.0);
        }
    }

    #[test]
    fn lines_vary_and_appending_keeps_earlier_lines() {
        let template = MetricsLines::new(true, false);
        let mut out = Vec::new();
        for n in 0..VARIANTS as u64 * 2 {
            template.push(&mut out, n, 0);
        }
        let lines: Vec<&[u8]> = out.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), VARIANTS * 2);
        let distinct: std::collections::HashSet<String> = lines
            .iter()
            .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap()["data"].to_string())
            .collect();
        assert!(distinct.len() > VARIANTS / 2, "{} distinct", distinct.len());
        let mut all = vec![identify_line("1", CITY, false)];
        all.extend(lines.iter().map(|l| l.to_vec()));
        let seqs: Vec<u64> = through_server_parser(&all)
            .into_iter()
            .map(|(s, _)| s.unwrap())
            .collect();
        assert_eq!(seqs, (0..VARIANTS as u64 * 2).collect::<Vec<_>>());
    }
}
