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

use crate::ErrorCode;
use crate::json::{write_int, write_str};

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

    #[test]
    fn other_bytes_are_base64_and_missing_parts_are_omitted() {
        let v = encode(letter(Some(&[0xff, 0xfe, b'{']), None));
        assert_eq!(v["raw_base64"], "//57");
        assert!(v.get("raw").is_none() && v.get("zipcode").is_none());
        let v = encode(letter(None, None));
        assert!(v.get("raw").is_none() && v.get("raw_base64").is_none());
    }
}
