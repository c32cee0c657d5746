//! Dead-letter records: a rejected line as the station sent it, with why it was rejected, for
//! the optional dead-letter topic (`KAFKA_DLQ_TOPIC`).
//!
//! ```json
//! {"connection_id":"0190…","peer":"10.0.0.7:51234","zipcode":"12345","received_at_ms":1795755441123,
//!  "code":"invalid_metric","message":"…","raw":"{\"type\":\"metrics\",\"data\":\"t=warm\"}"}
//! ```
//!
//! `zipcode` is present once the connection has identified. `raw` holds the line (without its
//! line ending) when it is UTF-8; otherwise `raw_base64` holds it, base64 (standard, padded).
//! A line over `TCP_MAX_LINE_BYTES` was never buffered, so its record has neither.

use base64::Engine as _;

use crate::json::{write_int, write_str};
use crate::{ErrorCode, ParseLineError};

/// Whether a rejected line's text must stay out of its dead letter because it may carry a
/// station's token: tokens never go to Kafka.
///
/// Judged by what the parser understood, not by how the line spells it: a line that parsed
/// as JSON hides its text when any top-level key reads `token` once unescaped
/// ([`ParseLineError::token`]), so `"\u0074oken"` and a second `"token"` are caught. A line
/// that is not JSON was understood as nothing, so its text decides, conservatively: it is
/// hidden when it spells `token` in any case or holds a `\u` escape, the only ways a JSON key
/// can spell it. An `auth_failed` identify always carries a token (or should have).
pub fn hides_raw(error: &ParseLineError, raw: &[u8]) -> bool {
    match error.code {
        ErrorCode::AuthFailed => true,
        ErrorCode::MalformedJson | ErrorCode::InvalidUtf8 => {
            raw.windows(5).any(|w| w.eq_ignore_ascii_case(b"token"))
                || raw.windows(2).any(|w| w == b"\\u")
        }
        _ => error.token,
    }
}

/// What a dead-letter record says about its line.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The connection's UUID.
    pub connection_id: &'a str,
    /// The station's address, `ip:port`.
    pub peer: &'a str,
    /// The station's zipcode, once identified.
    pub zipcode: Option<&'a str>,
    /// Unix milliseconds when the shard read the line.
    pub received_at_ms: i64,
    /// Why the line was rejected.
    pub code: ErrorCode,
    /// The line, when it was buffered (not for `line_too_long`).
    pub raw: Option<&'a [u8]>,
}

impl DeadLetter<'_> {
    /// Writes the record's JSON value to `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(b"{\"connection_id\":");
        write_str(out, self.connection_id);
        out.extend_from_slice(b",\"peer\":");
        write_str(out, self.peer);
        if let Some(zip) = self.zipcode {
            out.extend_from_slice(b",\"zipcode\":");
            write_str(out, zip);
        }
        out.extend_from_slice(b",\"received_at_ms\":");
        write_int(out, self.received_at_ms);
        out.extend_from_slice(b",\"code\":");
        write_str(out, self.code.as_str());
        out.extend_from_slice(b",\"message\":");
        write_str(out, self.code.message());
        match self.raw.map(std::str::from_utf8) {
            Some(Ok(text)) => {
                out.extend_from_slice(b",\"raw\":");
                write_str(out, text);
            }
            Some(Err(_)) => {
                out.extend_from_slice(b",\"raw_base64\":\"");
                let raw = self.raw.unwrap_or_default();
                let mut encoded = String::new();
                base64::engine::general_purpose::STANDARD.encode_string(raw, &mut encoded);
                out.extend_from_slice(encoded.as_bytes());
                out.push(b'"');
            }
            None => {}
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(d: DeadLetter<'_>) -> serde_json::Value {
        let mut out = vec![b'x'];
        d.encode(&mut out);
        serde_json::from_slice(&out).expect("valid JSON")
    }

    fn letter<'a>(raw: Option<&'a [u8]>, zipcode: Option<&'a str>) -> DeadLetter<'a> {
        DeadLetter {
            connection_id: "0190c9a0-0000-7000-8000-000000000000",
            peer: "127.0.0.1:5000",
            zipcode,
            received_at_ms: 1_795_755_441_123,
            code: ErrorCode::MalformedJson,
            raw,
        }
    }

    #[test]
    fn utf8_lines_are_kept_as_text_with_every_field() {
        let v = encode(letter(
            Some("{\"a\":\"São \\\"x\\\"\"".as_bytes()),
            Some("12345"),
        ));
        assert_eq!(v["raw"], "{\"a\":\"São \\\"x\\\"\"");
        assert_eq!(v["zipcode"], "12345");
        assert_eq!(v["code"], "malformed_json");
        assert_eq!(v["message"], ErrorCode::MalformedJson.message());
        assert_eq!(v["peer"], "127.0.0.1:5000");
        assert_eq!(v["received_at_ms"], 1_795_755_441_123_i64);
        assert!(v.get("raw_base64").is_none());
    }

    /// Parses `line` after an identify (as a connection does, on a copy: parsing is in
    /// place) and says whether its dead letter would hide its text.
    fn hidden(line: &str) -> bool {
        use crate::{LineParser, PARSE_PADDING, Session};
        let mut parser = LineParser::new();
        let mut session = Session::new("c");
        let mut out = Vec::new();
        let mut parse = |text: &str| {
            let mut buf = text.as_bytes().to_vec();
            buf.resize(text.len() + PARSE_PADDING, b' ');
            parser.parse_line(&mut session, &mut buf, 0..text.len(), 0, &mut out)
        };
        parse(r#"{"type":"identify","zipcode":"1"}"#).unwrap();
        let error = parse(line).expect_err(line);
        hides_raw(&error, line.as_bytes())
    }

    #[test]
    fn raw_is_hidden_by_what_the_parser_understood_not_by_spelling() {
        for line in [
            // The escaped and the duplicated key the parser reads as `token`.
            r#"{"type":"identify","zipcode":"12345","\u0074oken":"SECRET","city":5}"#,
            r#"{"type":"identify","zipcode":"12345","token":1,"token":"SECRET","city":5}"#,
            r#"{"type":"identify","zipcode":"12345","\u0074oken":"SECRET","tok\u0065n":"S"}x"#,
            // Not JSON: the text decides, and any escape might spell it.
            r#"{"type":"identify","zipcode":"1","token":"SECRET""#,
            r#"{"type":"identify","zipcode":"1","\u0074oken":"SECRET""#,
            r#"{"type":"identify","zipcode":"1","TOKEN":"SECRET"]"#,
        ] {
            assert!(hidden(line), "{line}");
        }
        for line in [
            r#"{"type":"metrics","data":"t=warm"}"#,
            r#"{"type":"metrics","data":"token=warm"}"#,
            r#"{"type":"identify","zipcode":"1","city":5}"#,
            "not json",
        ] {
            assert!(!hidden(line), "{line}");
        }
    }

    #[test]
    fn other_bytes_are_base64_and_missing_parts_are_omitted() {
        let v = encode(letter(Some(&[0xff, 0xfe, b'{']), None));
        assert_eq!(v["raw_base64"], "//57");
        assert!(v.get("raw").is_none() && v.get("zipcode").is_none());
        let v = encode(letter(None, None));
        assert!(v.get("raw").is_none() && v.get("raw_base64").is_none());
    }
}
