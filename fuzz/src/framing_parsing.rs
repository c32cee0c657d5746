//! The fuzz target's driver (`fuzz_targets/framing_parsing.rs`), also replayed over the seeds
//! by a stable test (`crates/stormgate-protocol/tests/fuzz_seeds.rs`) so it cannot rot.
//!
//! Fuzzes the station protocol end to end: a byte stream is cut into reads at points the input
//! chooses, then framed, parsed and built into records the way a shard's connection does
//! (`stormgate-shard`'s `connection.rs`; the driver mirrors the proptest
//! `crates/stormgate-protocol/tests/split_independence.rs`).
//!
//! Besides never panicking, every input checks these invariants:
//!
//! - the outcomes (identifies, records, error codes) are those of the whole stream arriving in
//!   one read with zeroed padding, whatever the read boundaries, and whether the read buffer
//!   has [`PARSE_PADDING`] spare bytes (of any content) after the read or none (then the
//!   parser copies the line);
//! - a partial line carried between reads is at most `max_line + 1` bytes (the `+ 1` is a `\r`
//!   that may begin a `\r\n`), and every framed line is within the limit and holds no `\n`;
//! - parsing a line in place leaves the bytes after it alone;
//! - every record is the JSON object `record.rs` documents, for the session's station, with at
//!   least one finite metric.
//!
//! Input layout: `[limit, flags, steps.., stream..]`.
//!
//! - `limit`: the maximum line length is `2 * limit` (0..=510): small enough that oversized
//!   lines are common, large enough for real ones.
//! - `flags`: bits 0–4 are the number of `steps`, except that [`BYTE_READS`] makes every byte
//!   its own read; bit 5 gives the read buffer padding; bits 6–7 pick the padding's content.
//! - `steps`: the lengths of the reads before the last; the last read is the rest.

use std::ops::Range;

use serde_json::Value;
use stormgate_protocol::{
    ErrorCode, Frame, LineFramer, LineParser, PARSE_PADDING, Parsed, Session,
};

const CONNECTION_ID: &str = "0190a0b0-0000-7000-8000-000000000000";
const RECEIVED_AT_MS: i64 = 1_700_000_000_123;

/// The `flags` step count that means one read per byte.
const BYTE_READS: u8 = 0x1f;
/// `flags` bit: the read buffer has [`PARSE_PADDING`] bytes after each read.
const PADDED: u8 = 0x20;
/// Padding contents, picked by the top two bits of `flags`. A shard's read buffer holds stale
/// bytes of earlier reads there, so the parser must not care what they are.
const FILLERS: [u8; 4] = [0, b' ', b'"', b'\\'];

/// Checks one input (see the layout above): panics on any broken invariant.
pub fn check(data: &[u8]) {
    let Some(input) = Input::new(data) else {
        return;
    };
    let whole = run(input.max_line, &[input.stream], Some(0));
    let split = run(input.max_line, &input.reads(), input.padding);
    assert_eq!(whole, split, "outcomes depend on how the stream was read");
}

/// What a complete line did.
#[derive(Debug, PartialEq)]
enum Outcome {
    Identified {
        zipcode: String,
        city: String,
    },
    Record {
        key: String,
        seq: Option<u64>,
        value: Vec<u8>,
    },
    Rejected(ErrorCode),
}

/// A fuzz input, decoded (see the layout above).
struct Input<'a> {
    max_line: usize,
    /// Lengths of the reads before the last, or `None` for one read per byte.
    steps: Option<&'a [u8]>,
    /// The padding's content, or `None` for a read buffer that ends with the read.
    padding: Option<u8>,
    stream: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Option<Input<'a>> {
        let (&[limit, flags], rest) = data.split_first_chunk()?;
        let nr_steps = flags & BYTE_READS;
        let (steps, stream) = if nr_steps == BYTE_READS {
            (None, rest)
        } else {
            let (steps, stream) = rest.split_at(usize::from(nr_steps).min(rest.len()));
            (Some(steps), stream)
        };
        Some(Input {
            max_line: 2 * usize::from(limit),
            steps,
            padding: (flags & PADDED != 0).then_some(FILLERS[usize::from(flags >> 6)]),
            stream,
        })
    }

    /// The stream, cut into reads. A zero step is an empty read: the framer is asked again
    /// with nothing new, as after a connection waited out backpressure.
    fn reads(&self) -> Vec<&'a [u8]> {
        let Some(steps) = self.steps else {
            return self.stream.chunks(1).collect();
        };
        let mut rest = self.stream;
        let mut reads = Vec::with_capacity(steps.len() + 1);
        for &step in steps {
            let (read, tail) = rest.split_at(usize::from(step).min(rest.len()));
            reads.push(read);
            rest = tail;
        }
        reads.push(rest);
        reads
    }
}

/// Every outcome of a connection that receives `reads` and then closes.
fn run(max_line: usize, reads: &[&[u8]], padding: Option<u8>) -> Vec<Outcome> {
    let mut conn = Connection::new(max_line, padding);
    for read in reads {
        conn.read(read);
    }
    conn.close()
}

/// One connection's protocol side. Like a shard's connection, it parses complete lines in
/// place in the read buffer, carries a partial line in front of the next read, and counts a
/// final unterminated line when the stream ends.
struct Connection {
    framer: LineFramer,
    parser: LineParser,
    session: Session,
    padding: Option<u8>,
    carry: Vec<u8>,
    record: Vec<u8>,
    outcomes: Vec<Outcome>,
}

impl Connection {
    fn new(max_line: usize, padding: Option<u8>) -> Connection {
        Connection {
            framer: LineFramer::new(max_line),
            parser: LineParser::new(),
            session: Session::new(CONNECTION_ID),
            padding,
            carry: Vec::new(),
            record: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    fn read(&mut self, bytes: &[u8]) {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        let end = buf.len();
        if let Some(fill) = self.padding {
            buf.resize(end + PARSE_PADDING, fill);
        }
        let mut pos = 0;
        while let Some(frame) = self.framer.next_frame(&buf[..end], &mut pos) {
            let outcome = match frame {
                Frame::Line(line) => self.parse(&mut buf, line),
                Frame::TooLong => Outcome::Rejected(ErrorCode::LineTooLong),
            };
            self.outcomes.push(outcome);
        }
        let carried = end - pos;
        assert!(
            carried <= self.framer.max_line() + 1,
            "carried a partial line of {carried} bytes, limit {}",
            self.framer.max_line()
        );
        buf.truncate(end);
        buf.drain(..pos);
        self.carry = buf;
    }

    fn parse(&mut self, buf: &mut [u8], line: Range<usize>) -> Outcome {
        assert!(line.len() <= self.framer.max_line(), "line over the limit");
        assert!(!buf[line.clone()].contains(&b'\n'), "line holds a newline");
        let after = line.end..buf.len().min(line.end + PARSE_PADDING);
        let bytes_after = buf[after.clone()].to_vec();
        let parsed = self.parser.parse_line(
            &mut self.session,
            buf,
            line,
            RECEIVED_AT_MS,
            &mut self.record,
        );
        assert_eq!(
            buf[after], bytes_after,
            "parsing changed the bytes after the line"
        );
        match parsed {
            Ok(Parsed::Identified) => {
                let station = self.session.station().expect("an identify sets a station");
                Outcome::Identified {
                    zipcode: station.zipcode().to_owned(),
                    city: station.city(),
                }
            }
            Ok(Parsed::Record { seq }) => {
                check_record(&self.record, &self.session, seq);
                Outcome::Record {
                    key: self.session.station().expect("checked").key().to_string(),
                    seq,
                    value: self.record.clone(),
                }
            }
            Err(e) => Outcome::Rejected(e.code),
        }
    }

    fn close(mut self) -> Vec<Outcome> {
        // The station closed without a final newline: its last line is complete.
        if !self.carry.is_empty() {
            self.read(b"\n");
        }
        self.outcomes
    }
}

/// Checks that `value` is the record `record.rs` documents, for `session`'s station.
fn check_record(value: &[u8], session: &Session, seq: Option<u64>) {
    let station = session.station().expect("a record needs a station");
    let v: Value = serde_json::from_slice(value).unwrap_or_else(|e| {
        panic!(
            "record is not JSON ({e}): {}",
            String::from_utf8_lossy(value)
        )
    });
    assert_eq!(v["connection_id"], session.connection_id());
    assert_eq!(v["zipcode"], station.zipcode());
    assert_eq!(v["city"], station.city());
    assert_eq!(v["received_at_ms"], RECEIVED_AT_MS);
    assert_eq!(v.get("seq").map(Value::as_u64), seq.map(Some));
    let members = v.as_object().expect("a record is an object").len();
    assert_eq!(
        members,
        5 + usize::from(seq.is_some()),
        "unexpected members"
    );
    let metrics = v["metrics"].as_object().expect("metrics is an object");
    assert!(!metrics.is_empty(), "a record without metrics");
    for (name, m) in metrics {
        assert!(
            m.as_f64().is_some_and(f64::is_finite),
            "metric {name:?} is {m}, not a finite number"
        );
    }
}
