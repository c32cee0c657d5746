//! Why a line or a connection was rejected.
//!
//! Every rejection has a stable, snake_case [`ErrorCode`]: it is what the station reads in its
//! error line, what the per-code counter is named after, and what logs carry. New codes may be
//! added; existing ones never change meaning.

use std::fmt;

/// The closed set of reasons Stormgate rejects a line or a connection.
///
/// The discriminant doubles as an index into per-code counters (see [`ErrorCode::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// The line is not well-formed JSON.
    MalformedJson,
    /// The line is JSON but not an object.
    ExpectedObject,
    /// The object has no `type` field.
    MissingType,
    /// `type` is not a known message type.
    UnknownType,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type (e.g. a number where a string belongs).
    WrongFieldType,
    /// An identify carried an empty zipcode.
    EmptyZipcode,
    /// A metrics line arrived before the connection identified itself.
    MetricsBeforeIdentify,
    /// A metric is not `name=number` (text form) or `"name": number` (object form).
    InvalidMetric,
    /// A metric value is NaN or infinite, or overflows to infinity.
    NonFiniteValue,
    /// The same metric name appears twice in one line.
    DuplicateMetric,
    /// A metrics line carries no metrics.
    EmptyMetrics,
    /// The line is longer than the configured maximum; it was skipped up to the next newline.
    LineTooLong,
    /// The server is at its connection limit; the connection is closed after this line.
    TooManyConnections,
    /// The connection sent too many bad lines in a row; it is closed after this line.
    TooManyErrors,
    /// Nothing arrived within the idle timeout; the connection is closed after this line.
    IdleTimeout,
    /// A line stayed incomplete for longer than the line timeout (a sender trickling bytes);
    /// the connection is closed after this line.
    LineTimeout,
    /// An identify's token is missing or does not match its zipcode's entry in the station
    /// registry (`STATION_AUTH=token`); the connection has no station afterwards.
    AuthFailed,
    /// An identify's zipcode or city is longer than its limit ([`crate::MAX_ZIPCODE_BYTES`],
    /// [`crate::MAX_CITY_BYTES`]): every record repeats them, so their length is bounded.
    FieldTooLong,
    /// An identify's zipcode holds a control character (U+0000–U+001F, U+007F): it becomes
    /// the Kafka key, which tools print and compare as text.
    InvalidZipcode,
}

impl ErrorCode {
    /// Every code, in discriminant order: `ALL[code as usize] == code`.
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::InvalidUtf8,
        ErrorCode::MalformedJson,
        ErrorCode::ExpectedObject,
        ErrorCode::MissingType,
        ErrorCode::UnknownType,
        ErrorCode::MissingField,
        ErrorCode::WrongFieldType,
        ErrorCode::EmptyZipcode,
        ErrorCode::MetricsBeforeIdentify,
        ErrorCode::InvalidMetric,
        ErrorCode::NonFiniteValue,
        ErrorCode::DuplicateMetric,
        ErrorCode::EmptyMetrics,
        ErrorCode::LineTooLong,
        ErrorCode::TooManyConnections,
        ErrorCode::TooManyErrors,
        ErrorCode::IdleTimeout,
        ErrorCode::LineTimeout,
        ErrorCode::AuthFailed,
        ErrorCode::FieldTooLong,
        ErrorCode::InvalidZipcode,
    ];

    /// Number of codes; the size of a per-code counter array.
    pub const COUNT: usize = Self::ALL.len();

    /// The stable snake_case name sent to stations and used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::ExpectedObject => "expected_object",
            ErrorCode::MissingType => "missing_type",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::WrongFieldType => "wrong_field_type",
            ErrorCode::EmptyZipcode => "empty_zipcode",
            ErrorCode::MetricsBeforeIdentify => "metrics_before_identify",
            ErrorCode::InvalidMetric => "invalid_metric",
            ErrorCode::NonFiniteValue => "non_finite_value",
            ErrorCode::DuplicateMetric => "duplicate_metric",
            ErrorCode::EmptyMetrics => "empty_metrics",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TooManyErrors => "too_many_errors",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::LineTimeout => "line_timeout",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::FieldTooLong => "field_too_long",
            ErrorCode::InvalidZipcode => "invalid_zipcode",
        }
    }

    /// The code named `name` (its [`ErrorCode::as_str`]), if there is one.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// A human explanation, written for the person debugging a station.
    pub const fn message(self) -> &'static str {
        match self {
            ErrorCode::InvalidUtf8 => "line is not valid UTF-8",
            ErrorCode::MalformedJson => "line is not valid JSON",
            ErrorCode::ExpectedObject => "line must be a JSON object",
            ErrorCode::MissingType => "object has no \"type\" field",
            ErrorCode::UnknownType => "\"type\" must be \"identify\" or \"metrics\"",
            ErrorCode::MissingField => "identify needs \"zipcode\"; metrics needs \"data\"",
            ErrorCode::WrongFieldType => {
                "a field has the wrong type: type, zipcode and city are strings, seq is an unsigned integer, data is a string or an object"
            }
            ErrorCode::EmptyZipcode => "zipcode must not be empty",
            ErrorCode::MetricsBeforeIdentify => "send identify before metrics",
            ErrorCode::InvalidMetric => {
                "each metric must be name=number (e.g. temperature=25.5) or \"name\": number"
            }
            ErrorCode::NonFiniteValue => "metric values must be finite numbers",
            ErrorCode::DuplicateMetric => "a metric name appears twice in one line",
            ErrorCode::EmptyMetrics => "data holds no metrics",
            ErrorCode::LineTooLong => "line exceeds the maximum length and was skipped",
            ErrorCode::TooManyConnections => "server is at its connection limit; try again later",
            ErrorCode::TooManyErrors => "too many bad lines in a row; closing the connection",
            ErrorCode::IdleTimeout => {
                "nothing received within the idle timeout; closing the connection"
            }
            ErrorCode::LineTimeout => {
                "a line stayed incomplete past the line timeout; closing the connection"
            }
            ErrorCode::AuthFailed => {
                "identify refused: the token is missing or not valid for this zipcode"
            }
            ErrorCode::FieldTooLong => "zipcode may be at most 64 bytes and city at most 256",
            ErrorCode::InvalidZipcode => "zipcode must not contain control characters",
        }
    }

    /// Appends the error line with `"seq":N` added, for a station that asked for
    /// acknowledgements: `{"type":"error","code":"…","message":"…","seq":N}` and a newline.
    pub fn push_error_line_with_seq(self, seq: u64, out: &mut Vec<u8>) {
        let line = self.error_line();
        out.extend_from_slice(&line.as_bytes()[..line.len() - 2]);
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        out.extend_from_slice(b"}\n");
    }

    /// The complete error line sent to the station, newline included.
    ///
    /// Built at compile time per code, so answering bad input never allocates.
    pub const fn error_line(self) -> &'static str {
        macro_rules! line {
            ($code:literal, $msg:literal) => {
                concat!(
                    "{\"type\":\"error\",\"code\":\"",
                    $code,
                    "\",\"message\":\"",
                    $msg,
                    "\"}\n"
                )
            };
        }
        match self {
            ErrorCode::InvalidUtf8 => line!("invalid_utf8", "line is not valid UTF-8"),
            ErrorCode::MalformedJson => line!("malformed_json", "line is not valid JSON"),
            ErrorCode::ExpectedObject => line!("expected_object", "line must be a JSON object"),
            ErrorCode::MissingType => line!("missing_type", "object has no \\\"type\\\" field"),
            ErrorCode::UnknownType => line!(
                "unknown_type",
                "\\\"type\\\" must be \\\"identify\\\" or \\\"metrics\\\""
            ),
            ErrorCode::MissingField => line!(
                "missing_field",
                "identify needs \\\"zipcode\\\"; metrics needs \\\"data\\\""
            ),
            ErrorCode::WrongFieldType => line!(
                "wrong_field_type",
                "a field has the wrong type: type, zipcode and city are strings, seq is an unsigned integer, data is a string or an object"
            ),
            ErrorCode::EmptyZipcode => line!("empty_zipcode", "zipcode must not be empty"),
            ErrorCode::MetricsBeforeIdentify => {
                line!("metrics_before_identify", "send identify before metrics")
            }
            ErrorCode::InvalidMetric => line!(
                "invalid_metric",
                "each metric must be name=number (e.g. temperature=25.5) or \\\"name\\\": number"
            ),
            ErrorCode::NonFiniteValue => {
                line!("non_finite_value", "metric values must be finite numbers")
            }
            ErrorCode::DuplicateMetric => {
                line!(
                    "duplicate_metric",
                    "a metric name appears twice in one line"
                )
            }
            ErrorCode::EmptyMetrics => line!("empty_metrics", "data holds no metrics"),
            ErrorCode::LineTooLong => line!(
                "line_too_long",
                "line exceeds the maximum length and was skipped"
            ),
            ErrorCode::TooManyConnections => line!(
                "too_many_connections",
                "server is at its connection limit; try again later"
            ),
            ErrorCode::TooManyErrors => line!(
                "too_many_errors",
                "too many bad lines in a row; closing the connection"
            ),
            ErrorCode::IdleTimeout => line!(
                "idle_timeout",
                "nothing received within the idle timeout; closing the connection"
            ),
            ErrorCode::LineTimeout => line!(
                "line_timeout",
                "a line stayed incomplete past the line timeout; closing the connection"
            ),
            ErrorCode::AuthFailed => line!(
                "auth_failed",
                "identify refused: the token is missing or not valid for this zipcode"
            ),
            ErrorCode::FieldTooLong => line!(
                "field_too_long",
                "zipcode may be at most 64 bytes and city at most 256"
            ),
            ErrorCode::InvalidZipcode => line!(
                "invalid_zipcode",
                "zipcode must not contain control characters"
            ),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line that could not be applied. Carries only its code: the hot path never formats or
/// allocates an error (see [`ErrorCode::error_line`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {}", code.message())]
pub struct ParseLineError {
    /// Why the line was rejected.
    pub code: ErrorCode,
    /// The `seq` of a rejected metrics line, when the line was JSON with a readable one (a
    /// station that asked for acknowledgements gets it back in the error line).
    pub seq: Option<u64>,
    /// The line parsed as JSON and one of its top-level keys reads `token` (in any case,
    /// once its escapes are undone): its text must not be dead-lettered. Always false for a
    /// line that is not JSON; [`crate::dead_letter::hides_raw`] judges those by their text.
    pub token: bool,
}

impl From<ErrorCode> for ParseLineError {
    fn from(code: ErrorCode) -> Self {
        ParseLineError {
            code,
            seq: None,
            token: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_discriminant_order() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code}");
        }
    }

    #[test]
    fn error_lines_with_a_seq_are_the_same_json_plus_seq() {
        for code in ErrorCode::ALL {
            let mut out = Vec::new();
            code.push_error_line_with_seq(18_446_744_073_709_551_615, &mut out);
            assert_eq!(out.last(), Some(&b'\n'));
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let plain: serde_json::Value = serde_json::from_str(code.error_line()).unwrap();
            assert_eq!(v["seq"], u64::MAX);
            assert_eq!(
                (&v["code"], &v["message"]),
                (&plain["code"], &plain["message"])
            );
        }
    }

    #[test]
    fn error_lines_are_json_matching_code_and_message() {
        for code in ErrorCode::ALL {
            let line = code.error_line();
            assert!(line.ends_with('\n'));
            let v: serde_json::Value = serde_json::from_str(line).expect(line);
            assert_eq!(v["type"], "error");
            assert_eq!(v["code"], code.as_str());
            assert_eq!(v["message"], code.message());
            assert_eq!(v.as_object().unwrap().len(), 3);
        }
    }

    #[test]
    fn codes_are_snake_case_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{s}"
            );
            assert!(seen.insert(s), "duplicate {s}");
            assert_eq!(ErrorCode::from_name(s), Some(code));
        }
    }
}
