//! Parsing one line and applying it to its connection's [`Session`].
//!
//! [`LineParser`] is shard-local and shared by every connection on the shard: it owns
//! simd-json's scratch buffers and tape so that, once warm, parsing a line allocates nothing.
//! The line is parsed in place in the connection's buffer (strings are unescaped there), and
//! a metrics line is encoded straight into the caller's output buffer.

use std::ops::Range;

use simd_json::prelude::*;
use simd_json::{Buffers, ErrorType, Tape};

use crate::record::{self, Station};
use crate::{ErrorCode, PARSE_PADDING, ParseLineError};

/// One connection's protocol state: its id and the station it identified as.
///
/// Shard-local, owned by the connection task.
#[derive(Debug)]
pub struct Session {
    connection_id: ConnectionId,
    station: Option<Station>,
    acks: Option<bool>,
}

/// A connection id, inline when it fits: the server's are UUIDs (36 characters), and an
/// idle connection then costs no allocation for its id.
#[derive(Debug)]
enum ConnectionId {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Boxed(Box<str>),
}

/// Longest connection id kept inline: a hyphenated UUID.
const INLINE_ID: usize = 36;

impl ConnectionId {
    fn new(id: &str) -> ConnectionId {
        if id.len() <= INLINE_ID {
            let mut bytes = [0; INLINE_ID];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            ConnectionId::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            ConnectionId::Boxed(id.into())
        }
    }

    fn as_str(&self) -> &str {
        match self {
            ConnectionId::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).expect("copied from a str")
            }
            ConnectionId::Boxed(id) => id,
        }
    }
}

impl Session {
    /// A session for a freshly accepted connection; `connection_id` goes into every record.
    pub fn new(connection_id: &str) -> Session {
        Session {
            connection_id: ConnectionId::new(connection_id),
            station: None,
            acks: None,
        }
    }

    /// What the last identify said about acknowledgements: `"acks": true` or `false`, or
    /// `None` when it did not say (the server's default applies).
    pub fn acks(&self) -> Option<bool> {
        self.acks
    }

    /// The connection's id, as it appears in records.
    pub fn connection_id(&self) -> &str {
        self.connection_id.as_str()
    }

    /// The station this connection identified as, if it has.
    pub fn station(&self) -> Option<&Station> {
        self.station.as_ref()
    }
}

/// A caller's check of an identify: may a station identify as `zipcode` with `token` (the
/// identify's `"token"` string, `None` when it has none)? See
/// [`LineParser::parse_line_authorized`].
pub type Authorize<'a> = dyn FnMut(&str, Option<&str>) -> bool + 'a;

/// What a successfully applied line did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// An identify: the session now speaks for a (new) station.
    Identified,
    /// A metrics line: the output buffer holds the record value; its key is the session's
    /// station key.
    Record {
        /// The station's sequence number for this line, if it sent one.
        seq: Option<u64>,
    },
}

/// Parses lines with simd-json and applies them to sessions.
///
/// Shard-local and reused for every line on the shard: it keeps simd-json's buffers and tape
/// warm, so steady-state parsing does not allocate.
pub struct LineParser {
    buffers: Buffers,
    /// Always empty between calls; kept for its allocation.
    tape: Option<Tape<'static>>,
    /// Used only when a caller's buffer lacks [`PARSE_PADDING`] after the line.
    padded: Vec<u8>,
    /// Where each metric name of the current record sits in the output, for the duplicate check.
    names: Vec<(usize, usize)>,
}

impl Default for LineParser {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LineParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineParser").finish_non_exhaustive()
    }
}

impl LineParser {
    /// A parser with buffers sized for typical station lines; they grow on demand.
    pub fn new() -> LineParser {
        LineParser {
            buffers: Buffers::new(512),
            tape: Some(Tape(Vec::with_capacity(32))),
            padded: Vec::new(),
            names: Vec::with_capacity(8),
        }
    }

    /// Parses `buf[line]` and applies it to `session`. Every identify is accepted; a `token`
    /// field is ignored (`STATION_AUTH=none`).
    ///
    /// For a metrics line, `out` receives the record value (it is cleared first); on error its
    /// contents are unspecified. The line is parsed in place and may be modified. It is
    /// parsed without a copy when `buf` holds at least [`PARSE_PADDING`] bytes after it.
    pub fn parse_line(
        &mut self,
        session: &mut Session,
        buf: &mut [u8],
        line: Range<usize>,
        received_at_ms: i64,
        out: &mut Vec<u8>,
    ) -> Result<Parsed, ParseLineError> {
        self.parse(session, buf, line, received_at_ms, out, None)
    }

    /// Like [`LineParser::parse_line`], but a well-formed identify is applied only when
    /// `authorize(zipcode, token)` says yes, `token` being the identify's `"token"` field
    /// when it is a string (absent, null or another type: `None`). When it says no, the line
    /// fails with [`ErrorCode::AuthFailed`] and the session has no station afterwards (not
    /// even the one a previous identify named), so no metrics line is accepted until an
    /// identify succeeds.
    ///
    /// `authorize` is called once per identify and never for a metrics line: the caller
    /// decides (a registry lookup, a hash), the protocol stays free of I/O and policy.
    pub fn parse_line_authorized(
        &mut self,
        session: &mut Session,
        buf: &mut [u8],
        line: Range<usize>,
        received_at_ms: i64,
        out: &mut Vec<u8>,
        authorize: &mut Authorize<'_>,
    ) -> Result<Parsed, ParseLineError> {
        self.parse(session, buf, line, received_at_ms, out, Some(authorize))
    }

    fn parse(
        &mut self,
        session: &mut Session,
        buf: &mut [u8],
        line: Range<usize>,
        received_at_ms: i64,
        out: &mut Vec<u8>,
        authorize: Option<&mut Authorize<'_>>,
    ) -> Result<Parsed, ParseLineError> {
        let len = line.len();
        let input: &mut [u8] = if buf.len() - line.end >= PARSE_PADDING {
            &mut buf[line.start..]
        } else {
            self.padded.clear();
            self.padded.extend_from_slice(&buf[line]);
            self.padded.resize(len + PARSE_PADDING, b' ');
            &mut self.padded
        };
        let mut tape = self.tape.take().unwrap_or_else(|| Tape(Vec::new())).reset();
        let result = match simd_json::fill_tape_padded(input, len, &mut self.buffers, &mut tape) {
            Ok(()) => apply(
                &tape,
                session,
                received_at_ms,
                out,
                &mut self.names,
                authorize,
            )
            .map_err(|code| ParseLineError {
                code,
                seq: metrics_seq(&tape),
                token: has_token_key(&tape),
            }),
            Err(e) => Err(ParseLineError::from(match e.error() {
                ErrorType::InvalidUtf8 => ErrorCode::InvalidUtf8,
                _ => ErrorCode::MalformedJson,
            })),
        };
        self.tape = Some(tape.reset());
        result
    }
}

/// Whether a line that parsed as JSON has a top-level key that reads `token`, in any case:
/// every key is looked at, so neither an escape (`"\u0074oken"`) nor a duplicate hides one.
fn has_token_key(tape: &Tape<'_>) -> bool {
    let root = tape.as_value();
    root.as_object()
        .is_some_and(|obj| obj.iter().any(|(key, _)| key.eq_ignore_ascii_case("token")))
}

/// The `seq` of a metrics line that parsed as JSON, if it has a readable one.
fn metrics_seq(tape: &Tape<'_>) -> Option<u64> {
    let root = tape.as_value();
    let obj = root.as_object()?;
    if obj.get("type")?.into_string()? != "metrics" {
        return None;
    }
    obj.get("seq")?.as_u64()
}

fn apply(
    tape: &Tape<'_>,
    session: &mut Session,
    received_at_ms: i64,
    out: &mut Vec<u8>,
    names: &mut Vec<(usize, usize)>,
    authorize: Option<&mut Authorize<'_>>,
) -> Result<Parsed, ErrorCode> {
    let root = tape.as_value();
    let obj = root.as_object().ok_or(ErrorCode::ExpectedObject)?;
    let kind = obj.get("type").ok_or(ErrorCode::MissingType)?;
    match kind.into_string().ok_or(ErrorCode::WrongFieldType)? {
        "identify" => {
            let zipcode = obj.get("zipcode").ok_or(ErrorCode::MissingField)?;
            let zipcode = zipcode.into_string().ok_or(ErrorCode::WrongFieldType)?;
            check_zipcode(zipcode)?;
            let city = match obj.get("city") {
                None => "",
                Some(v) if v.is_null() => "",
                Some(v) => v.into_string().ok_or(ErrorCode::WrongFieldType)?,
            };
            if city.len() > MAX_CITY_BYTES {
                return Err(ErrorCode::FieldTooLong);
            }
            let acks = match obj.get("acks") {
                None => None,
                Some(v) if v.is_null() => None,
                Some(v) => Some(v.as_bool().ok_or(ErrorCode::WrongFieldType)?),
            };
            if let Some(authorize) = authorize {
                // Checked after the line is known to be well formed, so that a malformed
                // identify is reported as such. Only a string is a token.
                let token = obj.get("token").and_then(|v| v.into_string());
                if !authorize(zipcode, token) {
                    // A refused identify takes the connection's station away: it must not
                    // go on publishing under an identity it failed to prove again.
                    session.station = None;
                    session.acks = None;
                    return Err(ErrorCode::AuthFailed);
                }
            }
            session.station = Some(Station::new(session.connection_id.as_str(), zipcode, city));
            session.acks = acks;
            Ok(Parsed::Identified)
        }
        "metrics" => {
            let station = session
                .station
                .as_ref()
                .ok_or(ErrorCode::MetricsBeforeIdentify)?;
            let seq = match obj.get("seq") {
                None => None,
                Some(v) if v.is_null() => None,
                Some(v) => Some(v.as_u64().ok_or(ErrorCode::WrongFieldType)?),
            };
            let data = obj.get("data").ok_or(ErrorCode::MissingField)?;
            station.begin_record(out, received_at_ms, seq);
            names.clear();
            if let Some(text) = data.into_string() {
                encode_pairs(text, out, names)?;
            } else if let Some(map) = data.as_object() {
                for (name, value) in map.iter() {
                    let value = match value.value_type() {
                        ValueType::I64 | ValueType::U64 | ValueType::F64 => value.cast_f64(),
                        _ => None,
                    };
                    let value = value.ok_or(ErrorCode::InvalidMetric)?;
                    push(out, names, name, value)?;
                }
            } else {
                return Err(ErrorCode::WrongFieldType);
            }
            if names.is_empty() {
                return Err(ErrorCode::EmptyMetrics);
            }
            check_unique(out, names)?;
            record::end_record(out);
            Ok(Parsed::Record { seq })
        }
        _ => Err(ErrorCode::UnknownType),
    }
}

/// Longest zipcode, in bytes of UTF-8 once its escapes are undone. Every record carries it
/// (and it is the Kafka key), so a station may not make every record large with it; postal
/// codes and station ids are far shorter.
pub const MAX_ZIPCODE_BYTES: usize = 64;
/// Longest city, in bytes of UTF-8 once its escapes are undone: longer than any place name,
/// and every record carries it.
pub const MAX_CITY_BYTES: usize = 256;

/// A zipcode must hold something other than whitespace, fit [`MAX_ZIPCODE_BYTES`], and have
/// no control character (it is the Kafka key, printed and compared as text by tools).
fn check_zipcode(zipcode: &str) -> Result<(), ErrorCode> {
    if zipcode.trim().is_empty() {
        return Err(ErrorCode::EmptyZipcode);
    }
    if zipcode.len() > MAX_ZIPCODE_BYTES {
        return Err(ErrorCode::FieldTooLong);
    }
    if zipcode.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(ErrorCode::InvalidZipcode);
    }
    Ok(())
}

/// Encodes the text form, `name=value,name=value`. Whitespace around names and values is
/// ignored; an empty or whitespace-only string holds no metrics.
fn encode_pairs(
    text: &str,
    out: &mut Vec<u8>,
    names: &mut Vec<(usize, usize)>,
) -> Result<(), ErrorCode> {
    if text.trim().is_empty() {
        return Ok(());
    }
    for pair in text.split(',') {
        let (name, value) = pair.split_once('=').ok_or(ErrorCode::InvalidMetric)?;
        let (name, value) = (name.trim(), value.trim());
        if is_plain_decimal(value) {
            // The common case, copied as sent: no float parse, no float formatting (together
            // a quarter of a shard's time in profiles when done per value).
            if name.is_empty() {
                return Err(ErrorCode::InvalidMetric);
            }
            // A zero has no sign in a record, whichever form it came in (see `push`).
            let value = match value.strip_prefix('-') {
                Some(abs) if abs.bytes().all(|b| b == b'0' || b == b'.') => abs,
                _ => value,
            };
            names.push(record::push_metric_text(out, names.is_empty(), name, value));
        } else {
            let value: f64 = value.parse().map_err(|_| ErrorCode::InvalidMetric)?;
            push(out, names, name, value)?;
        }
    }
    Ok(())
}

/// Longest plain decimal copied as sent. Shorter than 309 integer digits, so it is always a
/// finite `f64`.
const PLAIN_DECIMAL_MAX: usize = 40;

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, at most [`PLAIN_DECIMAL_MAX`] bytes: a valid JSON number
/// that is finite as an `f64`, so it can go into the record unchanged.
fn is_plain_decimal(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > PLAIN_DECIMAL_MAX {
        return false;
    }
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    let (int, frac) = match memchr::memchr(b'.', digits) {
        Some(dot) => (&digits[..dot], Some(&digits[dot + 1..])),
        None => (digits, None),
    };
    let all_digits = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit);
    all_digits(int) && (int.len() == 1 || int[0] != b'0') && frac.is_none_or(all_digits)
}

fn push(
    out: &mut Vec<u8>,
    names: &mut Vec<(usize, usize)>,
    name: &str,
    value: f64,
) -> Result<(), ErrorCode> {
    if name.is_empty() {
        return Err(ErrorCode::InvalidMetric);
    }
    if !value.is_finite() {
        return Err(ErrorCode::NonFiniteValue);
    }
    // -0.0 is written 0.0: the object form reads `-0` as the integer 0, so only dropping the
    // sign everywhere makes both forms agree.
    let value = if value == 0.0 { 0.0 } else { value };
    names.push(record::push_metric(out, names.is_empty(), name, value));
    Ok(())
}

/// Rejects a record whose metrics repeat a name. Sorting the name spans keeps this
/// O(n log n), so a long line of tiny metrics cannot make it quadratic.
fn check_unique(out: &[u8], names: &mut [(usize, usize)]) -> Result<(), ErrorCode> {
    if names.len() < 2 {
        return Ok(());
    }
    names.sort_unstable_by(|a, b| out[a.0..a.1].cmp(&out[b.0..b.1]));
    if names
        .windows(2)
        .any(|w| out[w[0].0..w[0].1] == out[w[1].0..w[1].1])
    {
        return Err(ErrorCode::DuplicateMetric);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: &str = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn connection_ids_of_any_length_are_kept_whole() {
        let long = "x".repeat(100);
        for id in ["", "c-1", CONN, long.as_str(), "é-ü-ø"] {
            assert_eq!(Session::new(id).connection_id(), id);
        }
        assert!(matches!(
            Session::new(CONN).connection_id,
            ConnectionId::Inline { .. }
        ));
    }
    const AT: i64 = 1_700_000_000_123;

    /// Applies `lines` in order to one session and renders each outcome: `identified`, the
    /// record value, or the error code.
    fn run(lines: &[&[u8]]) -> Vec<String> {
        let mut parser = LineParser::new();
        let mut session = Session::new(CONN);
        let mut out = Vec::new();
        lines
            .iter()
            .map(|line| {
                let mut buf = line.to_vec();
                buf.resize(line.len() + PARSE_PADDING, b'x');
                match parser.parse_line(&mut session, &mut buf, 0..line.len(), AT, &mut out) {
                    Ok(Parsed::Identified) => "identified".to_owned(),
                    Ok(Parsed::Record { .. }) => String::from_utf8(out.clone()).unwrap(),
                    Err(e) => e.code.as_str().to_owned(),
                }
            })
            .collect()
    }

    const ID: &[u8] = br#"{"type":"identify","zipcode":"12345","city":"TestCity"}"#;

    fn record(metrics: &str) -> String {
        format!(
            r#"{{"connection_id":"{CONN}","zipcode":"12345","city":"TestCity","received_at_ms":{AT},"metrics":{{{metrics}}}}}"#
        )
    }

    /// Checks one line sent after a standard identify.
    fn check(line: &str, expect: &str) {
        let got = run(&[ID, line.as_bytes()]);
        assert_eq!(got[0], "identified");
        assert_eq!(got[1], expect, "line {line}");
    }

    #[test]
    fn metrics_text_form() {
        let want = record(r#""temperature":25.5,"humidity":60.0"#);
        check(
            r#"{"type":"metrics","data":"temperature=25.5,humidity=60.0"}"#,
            &want,
        );
        check(
            r#"{"type":"metrics","data":" temperature = 25.5 , humidity=60 "}"#,
            &want,
        );
        check(
            r#"{"type":"metrics","data":"t=-1e3"}"#,
            &record(r#""t":-1000.0"#),
        );
    }

    #[test]
    fn plain_decimals_are_copied_and_others_normalised() {
        check(
            r#"{"type":"metrics","data":"a=25.50,b=-0.125,c=7,d=0"}"#,
            &record(r#""a":25.50,"b":-0.125,"c":7.0,"d":0.0"#),
        );
        // Not plain decimals: parsed and written in shortest round-trip form, or rejected.
        check(
            r#"{"type":"metrics","data":"a=+1,b=.5,c=1.,d=007,e=1E2"}"#,
            &record(r#""a":1.0,"b":0.5,"c":1.0,"d":7.0,"e":100.0"#),
        );
        let long = format!("1{}", "0".repeat(60));
        check(
            &format!(r#"{{"type":"metrics","data":"a={long}"}}"#),
            &record(r#""a":1e60"#),
        );
        for bad in ["a=-", "a=1.2.3", "a=1-2", "=1.5"] {
            check(
                &format!(r#"{{"type":"metrics","data":"{bad}"}}"#),
                "invalid_metric",
            );
        }
    }

    #[test]
    fn metrics_object_form() {
        let want = record(r#""temperature":25.5,"humidity":60.0"#);
        check(
            r#"{"type":"metrics","data":{"temperature":25.5,"humidity":60}}"#,
            &want,
        );
        check(
            r#"{"data":{"t":-3},"type":"metrics","extra":[1,{"x":null}]}"#,
            &record(r#""t":-3.0"#),
        );
    }

    #[test]
    fn seq_is_carried_into_the_record() {
        let want = record(r#""t":1.0"#).replace(r#","metrics""#, r#","seq":42,"metrics""#);
        check(r#"{"type":"metrics","seq":42,"data":"t=1"}"#, &want);
        check(
            r#"{"type":"metrics","seq":null,"data":"t=1"}"#,
            &record(r#""t":1.0"#),
        );
    }

    #[test]
    fn every_error_code_a_parser_can_return() {
        let cases: &[(&[u8], ErrorCode)] = &[
            (
                b"{\"type\":\"identify\",\"zipcode\":\"1\xff\"}",
                ErrorCode::InvalidUtf8,
            ),
            (b"{\"type\":\"metrics\"", ErrorCode::MalformedJson),
            (b"not json", ErrorCode::MalformedJson),
            (b"[1,2]", ErrorCode::ExpectedObject),
            (b"42", ErrorCode::ExpectedObject),
            (b"{\"data\":\"t=1\"}", ErrorCode::MissingType),
            (b"{\"type\":\"hello\"}", ErrorCode::UnknownType),
            (b"{\"type\":7}", ErrorCode::WrongFieldType),
            (
                b"{\"type\":\"identify\",\"city\":\"x\"}",
                ErrorCode::MissingField,
            ),
            (
                b"{\"type\":\"identify\",\"zipcode\":12345}",
                ErrorCode::WrongFieldType,
            ),
            (
                b"{\"type\":\"identify\",\"zipcode\":\"1\",\"city\":5}",
                ErrorCode::WrongFieldType,
            ),
            (
                b"{\"type\":\"identify\",\"zipcode\":\" \"}",
                ErrorCode::EmptyZipcode,
            ),
            (b"{\"type\":\"metrics\"}", ErrorCode::MissingField),
            (
                b"{\"type\":\"metrics\",\"data\":5}",
                ErrorCode::WrongFieldType,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=1\",\"seq\":-1}",
                ErrorCode::WrongFieldType,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=1\",\"seq\":1.5}",
                ErrorCode::WrongFieldType,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"temperature\"}",
                ErrorCode::InvalidMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=warm\"}",
                ErrorCode::InvalidMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"=1\"}",
                ErrorCode::InvalidMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=1,\"}",
                ErrorCode::InvalidMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":{\"t\":\"1\"}}",
                ErrorCode::InvalidMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":{\"\":1}}",
                ErrorCode::InvalidMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=NaN\"}",
                ErrorCode::NonFiniteValue,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=inf\"}",
                ErrorCode::NonFiniteValue,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=-infinity\"}",
                ErrorCode::NonFiniteValue,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=1e999\"}",
                ErrorCode::NonFiniteValue,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"t=1,u=2,t=3\"}",
                ErrorCode::DuplicateMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":{\"t\":1,\"t\":2}}",
                ErrorCode::DuplicateMetric,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":\"\"}",
                ErrorCode::EmptyMetrics,
            ),
            (
                b"{\"type\":\"metrics\",\"data\":{}}",
                ErrorCode::EmptyMetrics,
            ),
        ];
        for (line, code) in cases {
            let got = run(&[ID, line]);
            assert_eq!(
                got[1],
                code.as_str(),
                "line {}",
                String::from_utf8_lossy(line)
            );
        }
        let got = run(&[br#"{"type":"metrics","data":"t=1"}"#]);
        assert_eq!(got, ["metrics_before_identify"]);
    }

    #[test]
    fn identity_fields_are_bounded_and_the_zipcode_is_printable() {
        let zip64 = "z".repeat(MAX_ZIPCODE_BYTES);
        let city256 = "é".repeat(MAX_CITY_BYTES / 2);
        let identify = |zip: &str, city: &str| {
            format!(r#"{{"type":"identify","zipcode":"{zip}","city":"{city}"}}"#)
        };
        let outcome = |line: String| run(&[line.as_bytes()]).remove(0);
        assert_eq!(outcome(identify(&zip64, &city256)), "identified");
        assert_eq!(
            outcome(identify(&format!("{zip64}z"), "")),
            "field_too_long"
        );
        assert_eq!(
            outcome(identify("1", &format!("{city256}x"))),
            "field_too_long"
        );
        // Escapes are undone before the length is measured: 6 bytes of text, 1 of zipcode.
        let escaped = r"\u007a".repeat(MAX_ZIPCODE_BYTES);
        assert_eq!(outcome(identify(&escaped, "")), "identified");
        for zip in [r"\u0000", r"12\u001f3", r"1\t", r"1\u007f"] {
            assert_eq!(outcome(identify(zip, "")), "invalid_zipcode", "{zip}");
        }
        // Control characters in a city are only text: escaped again in the record.
        assert_eq!(outcome(identify("1", r"a\u0000b")), "identified");
        assert_eq!(outcome(identify(" ", "")), "empty_zipcode");
    }

    #[test]
    fn a_zero_has_no_sign_in_either_form() {
        for data in [
            r#""t=-0""#,
            r#""t=0""#,
            r#""t=-0.0""#,
            r#""t=-0e3""#,
            r#"{"t":-0}"#,
            r#"{"t":-0.0}"#,
            r#"{"t":0}"#,
        ] {
            let got = run(&[
                ID,
                format!(r#"{{"type":"metrics","data":{data}}}"#).as_bytes(),
            ]);
            let v: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
            let t = v["metrics"]["t"].as_f64().unwrap();
            assert!(t == 0.0 && t.is_sign_positive(), "{data}: {}", got[1]);
        }
        check(
            r#"{"type":"metrics","data":"t=-0.00"}"#,
            &record(r#""t":0.00"#),
        );
        check(
            r#"{"type":"metrics","data":"t=-0.5"}"#,
            &record(r#""t":-0.5"#),
        );
    }

    /// A number JSON can write but a 64-bit integer or double cannot hold is refused by the
    /// JSON parser itself (`malformed_json`), wherever it is; in the text form the server
    /// parses the value, and an overflow is `non_finite_value`.
    #[test]
    fn numbers_out_of_range_are_malformed_json_and_text_overflows_are_non_finite() {
        let huge = "9".repeat(5_000);
        for line in [
            r#"{"type":"metrics","data":{"t":1e400}}"#.to_owned(),
            format!(r#"{{"type":"metrics","data":{{"t":{huge}}}}}"#),
            r#"{"type":"metrics","seq":18446744073709551616,"data":"t=1"}"#.to_owned(),
        ] {
            assert_eq!(
                run(&[ID, line.as_bytes()])[1],
                "malformed_json",
                "{line:.60}"
            );
        }
        for data in ["t=1e400".to_owned(), format!("t={huge}")] {
            let line = format!(r#"{{"type":"metrics","data":"{data}"}}"#);
            assert_eq!(
                run(&[ID, line.as_bytes()])[1],
                "non_finite_value",
                "{data:.60}"
            );
        }
        let max = r#"{"type":"metrics","seq":18446744073709551615,"data":"t=1"}"#;
        assert!(run(&[ID, max.as_bytes()])[1].contains(r#""seq":18446744073709551615"#));
    }

    #[test]
    fn a_token_key_is_reported_however_it_is_spelled() {
        let token_of = |line: &str| {
            let mut parser = LineParser::new();
            let mut session = Session::new(CONN);
            parse_one(&mut parser, &mut session, line.as_bytes())
                .unwrap_err()
                .token
        };
        for line in [
            r#"{"type":"identify","zipcode":"1","token":"s","city":5}"#,
            r#"{"type":"identify","zipcode":"1","token":"s","city":5}"#,
            r#"{"type":"identify","zipcode":"1","TOKEN":"s","city":5}"#,
            r#"{"type":"identify","zipcode":"1","token":null,"token":"s","city":5}"#,
            r#"{"type":"identify","token":"s"}"#,
            r#"{"type":"nonsense","ToKeN":"s"}"#,
        ] {
            assert!(token_of(line), "{line}");
        }
        for line in [
            r#"{"type":"identify","zipcode":"1","city":5}"#,
            r#"{"type":"metrics","data":"token=1,x"}"#,
            r#"{"type":"metrics","data":{"tokens":1,"t":"x"}}"#,
        ] {
            assert!(!token_of(line), "{line}");
        }
    }

    fn parse_one(
        parser: &mut LineParser,
        session: &mut Session,
        line: &[u8],
    ) -> Result<Parsed, ParseLineError> {
        let mut buf = line.to_vec();
        buf.resize(line.len() + PARSE_PADDING, b' ');
        parser.parse_line(session, &mut buf, 0..line.len(), AT, &mut Vec::new())
    }

    #[test]
    fn identify_may_ask_for_acknowledgements() {
        let mut parser = LineParser::new();
        let mut session = Session::new(CONN);
        assert_eq!(session.acks(), None);
        let cases: [(&[u8], Option<bool>); 4] = [
            (
                br#"{"type":"identify","zipcode":"1","acks":true}"#,
                Some(true),
            ),
            (
                br#"{"type":"identify","zipcode":"1","acks":false}"#,
                Some(false),
            ),
            (br#"{"type":"identify","zipcode":"1","acks":null}"#, None),
            (br#"{"type":"identify","zipcode":"1"}"#, None),
        ];
        for (line, acks) in cases {
            parse_one(&mut parser, &mut session, line).unwrap();
            assert_eq!(session.acks(), acks, "{}", String::from_utf8_lossy(line));
        }
        let err = parse_one(
            &mut parser,
            &mut session,
            br#"{"type":"identify","zipcode":"1","acks":"yes"}"#,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::WrongFieldType);
    }

    #[test]
    fn a_rejected_metrics_line_reports_its_seq() {
        let mut parser = LineParser::new();
        let mut session = Session::new(CONN);
        let err = parse_one(
            &mut parser,
            &mut session,
            br#"{"type":"metrics","seq":4,"data":"t=1"}"#,
        )
        .unwrap_err();
        assert_eq!(
            (err.code, err.seq),
            (ErrorCode::MetricsBeforeIdentify, Some(4))
        );
        parse_one(&mut parser, &mut session, ID).unwrap();
        for (line, seq) in [
            (
                &br#"{"type":"metrics","seq":7,"data":"t=warm"}"#[..],
                Some(7),
            ),
            (br#"{"type":"metrics","seq":-1,"data":"t=warm"}"#, None),
            (br#"{"type":"metrics","data":"t=warm"}"#, None),
            (br#"{"type":"metrics","seq":9,"data":"#, None),
            (br#"{"type":"identify","seq":9}"#, None),
        ] {
            let err = parse_one(&mut parser, &mut session, line).unwrap_err();
            assert_eq!(err.seq, seq, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn errors_leave_the_session_usable() {
        let got = run(&[
            br#"{"type":"metrics","data":"t=1"}"#,
            ID,
            b"garbage",
            br#"{"type":"metrics","data":"t=1"}"#,
            br#"{"type":"identify","zipcode":""}"#,
            br#"{"type":"metrics","data":"t=2"}"#,
        ]);
        assert_eq!(
            got,
            [
                "metrics_before_identify".to_owned(),
                "identified".to_owned(),
                "malformed_json".to_owned(),
                record(r#""t":1.0"#),
                "empty_zipcode".to_owned(),
                record(r#""t":2.0"#),
            ]
        );
    }

    /// Like `run`, with every identify checked: only zipcode 12345 with token `s3cret` may
    /// identify. Also returns how often the check ran.
    fn run_authorized(lines: &[&[u8]]) -> (Vec<String>, usize) {
        let mut parser = LineParser::new();
        let mut session = Session::new(CONN);
        let mut out = Vec::new();
        let mut checks = 0;
        let got = lines
            .iter()
            .map(|line| {
                let mut buf = line.to_vec();
                buf.resize(line.len() + PARSE_PADDING, b'x');
                let mut authorize = |zipcode: &str, token: Option<&str>| {
                    checks += 1;
                    zipcode == "12345" && token == Some("s3cret")
                };
                match parser.parse_line_authorized(
                    &mut session,
                    &mut buf,
                    0..line.len(),
                    AT,
                    &mut out,
                    &mut authorize,
                ) {
                    Ok(Parsed::Identified) => "identified".to_owned(),
                    Ok(Parsed::Record { .. }) => String::from_utf8(out.clone()).unwrap(),
                    Err(e) => e.code.as_str().to_owned(),
                }
            })
            .collect();
        (got, checks)
    }

    #[test]
    fn an_identify_is_applied_only_when_authorized() {
        const GOOD: &[u8] =
            br#"{"type":"identify","zipcode":"12345","city":"TestCity","token":"s3cret"}"#;
        const METRICS: &[u8] = br#"{"type":"metrics","data":"t=1"}"#;
        let after_failure = "metrics_before_identify";
        let cases: [(&[u8], &str, &str); 8] = [
            (GOOD, "identified", "record"),
            (
                br#"{"type":"identify","zipcode":"12345","token":"wrong"}"#,
                "auth_failed",
                after_failure,
            ),
            (
                br#"{"type":"identify","zipcode":"12345"}"#,
                "auth_failed",
                after_failure,
            ),
            (
                br#"{"type":"identify","zipcode":"12345","token":null}"#,
                "auth_failed",
                after_failure,
            ),
            (
                br#"{"type":"identify","zipcode":"12345","token":["s3cret"]}"#,
                "auth_failed",
                after_failure,
            ),
            // A valid token, for another zipcode.
            (
                br#"{"type":"identify","zipcode":"99999","token":"s3cret"}"#,
                "auth_failed",
                after_failure,
            ),
            // Escapes are undone before the check, as for every string.
            (
                br#"{"type":"identify","zipcode":"12345","city":"TestCity","token":"s3cret"}"#,
                "identified",
                "record",
            ),
            // A malformed identify is reported as such and, as without authentication,
            // leaves the previous station in place.
            (
                br#"{"type":"identify","zipcode":"12345","token":"s3cret","city":5}"#,
                "wrong_field_type",
                "record",
            ),
        ];
        for (identify, outcome, then) in cases {
            let (got, checks) = run_authorized(&[GOOD, METRICS, identify, METRICS]);
            let what = String::from_utf8_lossy(identify);
            assert_eq!(got[..2], ["identified".to_owned(), record(r#""t":1.0"#)]);
            assert_eq!(got[2], outcome, "{what}");
            let then = if then == "record" {
                record(r#""t":1.0"#)
            } else {
                then.to_owned()
            };
            assert_eq!(got[3], then, "after {what}");
            // Once per well-formed identify, never for a metrics line.
            let want_checks = if outcome == "wrong_field_type" { 1 } else { 2 };
            assert_eq!(checks, want_checks, "{what}");
        }
    }

    #[test]
    fn without_authorization_a_token_is_ignored_whatever_its_type() {
        let got = run(&[
            br#"{"type":"identify","zipcode":"12345","city":"TestCity","token":7}"#,
            br#"{"type":"metrics","data":"t=1"}"#,
        ]);
        assert_eq!(got, ["identified".to_owned(), record(r#""t":1.0"#)]);
    }

    #[test]
    fn a_refused_identify_clears_the_acks_request_too() {
        let mut parser = LineParser::new();
        let mut session = Session::new(CONN);
        let mut buf = br#"{"type":"identify","zipcode":"1","acks":true}"#.to_vec();
        let len = buf.len();
        parser
            .parse_line(&mut session, &mut buf, 0..len, AT, &mut Vec::new())
            .unwrap();
        assert_eq!(session.acks(), Some(true));
        let mut buf = br#"{"type":"identify","zipcode":"1","acks":true,"token":"x"}"#.to_vec();
        let len = buf.len();
        let err = parser
            .parse_line_authorized(
                &mut session,
                &mut buf,
                0..len,
                AT,
                &mut Vec::new(),
                &mut |_, _| false,
            )
            .unwrap_err();
        assert_eq!((err.code, err.token), (ErrorCode::AuthFailed, true));
        assert!(session.station().is_none());
        assert_eq!(session.acks(), None);
    }

    #[test]
    fn a_later_identify_replaces_the_station() {
        let got = run(&[
            ID,
            br#"{"type":"identify","zipcode":"99999","city":"Other"}"#,
            br#"{"type":"metrics","data":"t=1"}"#,
        ]);
        assert_eq!(
            got[2],
            record(r#""t":1.0"#)
                .replace("12345", "99999")
                .replace("TestCity", "Other")
        );
    }

    #[test]
    fn utf8_and_escapes_survive_into_the_record() {
        let got = run(&[
            r#"{"type":"identify","zipcode":"01310","city":"São Paulo \"Centro\" 東京"}"#
                .as_bytes(),
            r#"{"type":"metrics","data":{"temp\u00e9rature":1}}"#.as_bytes(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
        assert_eq!(v["city"], "São Paulo \"Centro\" 東京");
        assert_eq!(v["zipcode"], "01310");
        assert_eq!(v["metrics"]["température"], 1.0);
    }

    #[test]
    fn identify_without_city_has_an_empty_one() {
        let got = run(&[
            br#"{"type":"identify","zipcode":"1"}"#,
            br#"{"type":"metrics","data":"t=1"}"#,
        ]);
        let v: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
        assert_eq!(v["city"], "");
    }

    #[test]
    fn a_line_without_padding_is_copied_not_rejected() {
        let mut parser = LineParser::new();
        let mut session = Session::new(CONN);
        let mut out = Vec::new();
        let mut buf = ID.to_vec();
        let len = buf.len();
        let parsed = parser.parse_line(&mut session, &mut buf, 0..len, AT, &mut out);
        assert_eq!(parsed, Ok(Parsed::Identified));
        assert_eq!(session.station().unwrap().zipcode(), "12345");
    }

    #[test]
    fn parsing_in_place_leaves_the_following_bytes_alone() {
        // Two lines back to back in one buffer: parsing the first must not disturb the second.
        let first = br#"{"type":"identify","zipcode":"1\"2","city":"a\nb"}"#;
        let second = br#"{"type":"metrics","data":"t=1"}"#;
        let mut buf = [&first[..], b"\n", &second[..], b"\n"].concat();
        let second_at = first.len() + 1;
        buf.resize(buf.len() + PARSE_PADDING, 0);
        let mut parser = LineParser::new();
        let mut session = Session::new(CONN);
        let mut out = Vec::new();
        parser
            .parse_line(&mut session, &mut buf, 0..first.len(), AT, &mut out)
            .unwrap();
        assert_eq!(&buf[second_at..second_at + second.len()], second);
        let parsed = parser.parse_line(
            &mut session,
            &mut buf,
            second_at..second_at + second.len(),
            AT,
            &mut out,
        );
        assert_eq!(parsed, Ok(Parsed::Record { seq: None }));
        assert_eq!(session.station().unwrap().zipcode(), "1\"2");
    }
}
