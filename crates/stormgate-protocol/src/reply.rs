//! What the server says to a station: the reply lines, written and read in one place.
//!
//! A station reads one JSON object per line from the server:
//!
//! - `{"type":"ack","seq":N}` — the line with seq N is in Kafka (or durable on the disk
//!   buffer); [`push_ack`];
//! - `{"type":"ack","upto":N}` — every unanswered line with a seq up to N is; [`push_ack_upto`];
//! - `{"type":"nack","seq":N,"code":"…"}` — the line with seq N finally failed, for a
//!   [`NackCode`]; [`push_nack`];
//! - `{"type":"error","code":"…","message":"…"}`, with `"seq":N` added on a connection with
//!   acknowledgements — a line was rejected, for an [`ErrorCode`];
//!   [`ErrorCode::error_line`], [`ErrorCode::push_error_line_with_seq`];
//! - `{"type":"reconnect"}` — the server is stopping; [`RECONNECT_LINE`].
//!
//! The encoders append to a caller's buffer and never allocate: they are on the ack path of
//! every acknowledged line, and `#[inline]` so that the shard's ack writer compiles them in
//! place as it did when it held its own copy. [`Reply::parse`] reads any of them back into a typed [`Reply`];
//! clients, the load generator and tests share it, so the vocabulary is written once.
//! docs/PROTOCOL.md documents these lines; `tests/protocol_doc.rs` keeps it equal to them.

use std::borrow::Cow;
use std::fmt;

use crate::ErrorCode;

/// The line a stopping server sends a station just before it closes the connection
/// (`TCP_DRAIN_PERIOD`, docs/PROTOCOL.md): every line it read has been handled (and, for an
/// acknowledging station, answered); the station should connect again, to another instance
/// on the same address or to this one once it is back.
pub const RECONNECT_LINE: &str = "{\"type\":\"reconnect\"}\n";

/// Why an accepted line finally failed: the `code` of its nack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NackCode {
    /// Delivery finally failed (retries exhausted, `KAFKA_DELIVERY_TIMEOUT` passed, the
    /// broker rejected the record); the record is in the server's spill file.
    DeliveryFailed,
    /// The server's shutdown deadline passed before delivery; the record is in the server's
    /// spill file.
    Shutdown,
    /// The disk buffer was full (`BUFFER_WHEN_FULL=drop_newest`); the record is nowhere:
    /// the station should resend it later.
    BufferFull,
}

impl NackCode {
    /// Every code, in discriminant order: `ALL[code as usize] == code`.
    pub const ALL: [NackCode; 3] = [
        NackCode::DeliveryFailed,
        NackCode::Shutdown,
        NackCode::BufferFull,
    ];

    /// The stable snake_case name sent to stations.
    pub const fn as_str(self) -> &'static str {
        match self {
            NackCode::DeliveryFailed => "delivery_failed",
            NackCode::Shutdown => "shutdown",
            NackCode::BufferFull => "buffer_full",
        }
    }

    /// The code named `name` (its [`NackCode::as_str`]), if there is one.
    pub fn from_name(name: &str) -> Option<NackCode> {
        NackCode::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for NackCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends `{"type":"ack","seq":N}` and a newline.
#[inline]
pub fn push_ack(out: &mut Vec<u8>, seq: u64) {
    push_seq_line(out, b"{\"type\":\"ack\",\"seq\":", seq);
    out.extend_from_slice(b"}\n");
}

/// Appends `{"type":"ack","upto":N}` and a newline.
#[inline]
pub fn push_ack_upto(out: &mut Vec<u8>, upto: u64) {
    push_seq_line(out, b"{\"type\":\"ack\",\"upto\":", upto);
    out.extend_from_slice(b"}\n");
}

/// Appends `{"type":"nack","seq":N,"code":"…"}` and a newline.
#[inline]
pub fn push_nack(out: &mut Vec<u8>, seq: u64, code: NackCode) {
    push_seq_line(out, b"{\"type\":\"nack\",\"seq\":", seq);
    out.extend_from_slice(b",\"code\":\"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(b"\"}\n");
}

/// `head` then `n` in decimal, formatted on the stack.
#[inline]
fn push_seq_line(out: &mut Vec<u8>, head: &[u8], n: u64) {
    out.extend_from_slice(head);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// One line from the server, read by [`Reply::parse`] and written by [`Reply::encode`].
///
/// A nack or error whose code this version does not know (a newer server's) is still a
/// nack or a rejection: [`Reply::OtherNack`] and [`Reply::OtherError`] keep its code as
/// sent, so that a client settles the line as it would for a known code rather than
/// taking the connection for broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `{"type":"ack","seq":N}`: the line with this seq is in Kafka — or, from a server with
    /// a disk buffer and `TCP_ACK_AFTER=durable`, durable on its disk.
    Ack {
        /// The line's seq.
        seq: u64,
    },
    /// `{"type":"ack","upto":N}`: as [`Reply::Ack`], for every line of the connection not
    /// answered yet whose seq is up to and including `upto`.
    AckUpto {
        /// The highest seq answered.
        upto: u64,
    },
    /// `{"type":"nack","seq":N,"code":"…"}`: the line with `seq` finally failed.
    Nack {
        /// The line's seq.
        seq: u64,
        /// Why.
        code: NackCode,
    },
    /// `{"type":"error","code":"…","message":"…"}`: a line (or the connection) was
    /// rejected. The message is for people and is not kept.
    Error {
        /// Why.
        code: ErrorCode,
        /// The rejected line's seq, on a connection that asked for acknowledgements.
        seq: Option<u64>,
    },
    /// A nack with a code this version does not know: the line with `seq` finally failed.
    OtherNack {
        /// The line's seq.
        seq: u64,
        /// The code as sent.
        code: Box<str>,
    },
    /// An error line with a code this version does not know: a rejection, like
    /// [`Reply::Error`].
    OtherError {
        /// The code as sent.
        code: Box<str>,
        /// The rejected line's seq, on a connection that asked for acknowledgements.
        seq: Option<u64>,
    },
    /// `{"type":"reconnect"}`: the server is stopping and closes this connection next: every
    /// line it read has been answered; connect again (another instance on the address takes
    /// the connection, or this one once it is back) and send there what is still unanswered.
    Reconnect,
}

/// A line that is not a reply this version of the protocol knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseReplyError {
    /// Not a JSON object, or a field of the wrong JSON type.
    #[error("reply is not a JSON object of the expected shape: {0}")]
    Malformed(String),
    /// A `type` other than `ack`, `nack`, `error` and `reconnect`.
    #[error("unknown reply type {0:?}")]
    UnknownType(String),
    /// A field the reply's type requires is absent (an ack has exactly one of `seq` and
    /// `upto`).
    #[error("{kind} reply without {field}")]
    MissingField {
        /// The reply's type.
        kind: &'static str,
        /// The absent field.
        field: &'static str,
    },
}

/// A reply's fields as JSON has them; unknown fields are ignored.
#[derive(serde::Deserialize)]
struct RawReply<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    upto: Option<u64>,
}

impl Reply {
    /// Reads one reply line (its newline, or `\r\n`, may be there or not).
    pub fn parse(line: &[u8]) -> Result<Reply, ParseReplyError> {
        let raw: RawReply<'_> =
            serde_json::from_slice(line).map_err(|e| ParseReplyError::Malformed(e.to_string()))?;
        let missing = |kind, field| ParseReplyError::MissingField { kind, field };
        match &*raw.kind {
            "ack" => match (raw.seq, raw.upto) {
                (Some(seq), None) => Ok(Reply::Ack { seq }),
                (None, Some(upto)) => Ok(Reply::AckUpto { upto }),
                (None, None) => Err(missing("ack", "seq or upto")),
                (Some(_), Some(_)) => Err(ParseReplyError::Malformed(
                    "an ack with both seq and upto".to_owned(),
                )),
            },
            "nack" => {
                let seq = raw.seq.ok_or_else(|| missing("nack", "seq"))?;
                let name = raw.code.ok_or_else(|| missing("nack", "code"))?;
                Ok(match NackCode::from_name(&name) {
                    Some(code) => Reply::Nack { seq, code },
                    None => Reply::OtherNack {
                        seq,
                        code: name.into(),
                    },
                })
            }
            "error" => {
                let name = raw.code.ok_or_else(|| missing("error", "code"))?;
                Ok(match ErrorCode::from_name(&name) {
                    Some(code) => Reply::Error { code, seq: raw.seq },
                    None => Reply::OtherError {
                        code: name.into(),
                        seq: raw.seq,
                    },
                })
            }
            "reconnect" => Ok(Reply::Reconnect),
            other => Err(ParseReplyError::UnknownType(other.to_owned())),
        }
    }

    /// Appends the reply's line, newline included, exactly as the server writes it.
    ///
    /// An [`Reply::OtherNack`] or [`Reply::OtherError`] is written with its code as it came
    /// (an error line without its message, which was not kept).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Ack { seq } => push_ack(out, *seq),
            Reply::AckUpto { upto } => push_ack_upto(out, *upto),
            Reply::Nack { seq, code } => push_nack(out, *seq, *code),
            Reply::Error { code, seq: None } => out.extend_from_slice(code.error_line().as_bytes()),
            Reply::Error {
                code,
                seq: Some(seq),
            } => code.push_error_line_with_seq(*seq, out),
            Reply::OtherNack { seq, code } => {
                push_seq_line(out, b"{\"type\":\"nack\",\"seq\":", *seq);
                out.extend_from_slice(b",\"code\":");
                crate::json::write_str(out, code);
                out.extend_from_slice(b"}\n");
            }
            Reply::OtherError { code, seq } => {
                out.extend_from_slice(b"{\"type\":\"error\",\"code\":");
                crate::json::write_str(out, code);
                if let Some(seq) = seq {
                    out.extend_from_slice(b",\"seq\":");
                    out.extend_from_slice(itoa::Buffer::new().format(*seq).as_bytes());
                }
                out.extend_from_slice(b"}\n");
            }
            Reply::Reconnect => out.extend_from_slice(RECONNECT_LINE.as_bytes()),
        }
    }

    /// The highest seq this reply settles as acknowledged, if it is an ack.
    pub fn acked_upto(&self) -> Option<u64> {
        match self {
            Reply::Ack { seq } => Some(*seq),
            Reply::AckUpto { upto } => Some(*upto),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(reply: &Reply) -> String {
        let mut out = Vec::new();
        reply.encode(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// The bytes the server wrote before these encoders existed, spelled out by hand: the
    /// wire format must not move by a byte.
    #[test]
    fn replies_are_the_bytes_stations_already_read() {
        let max = u64::MAX;
        let cases = [
            (Reply::Ack { seq: 0 }, "{\"type\":\"ack\",\"seq\":0}\n".to_owned()),
            (
                Reply::Ack { seq: max },
                format!("{{\"type\":\"ack\",\"seq\":{max}}}\n"),
            ),
            (
                Reply::AckUpto { upto: 21 },
                "{\"type\":\"ack\",\"upto\":21}\n".to_owned(),
            ),
            (
                Reply::Nack {
                    seq: 12,
                    code: NackCode::DeliveryFailed,
                },
                "{\"type\":\"nack\",\"seq\":12,\"code\":\"delivery_failed\"}\n".to_owned(),
            ),
            (
                Reply::Nack {
                    seq: 22,
                    code: NackCode::Shutdown,
                },
                "{\"type\":\"nack\",\"seq\":22,\"code\":\"shutdown\"}\n".to_owned(),
            ),
            (
                Reply::Nack {
                    seq: max,
                    code: NackCode::BufferFull,
                },
                format!("{{\"type\":\"nack\",\"seq\":{max},\"code\":\"buffer_full\"}}\n"),
            ),
            (
                Reply::Error {
                    code: ErrorCode::MalformedJson,
                    seq: None,
                },
                "{\"type\":\"error\",\"code\":\"malformed_json\",\"message\":\"line is not valid JSON\"}\n"
                    .to_owned(),
            ),
            (
                Reply::Error {
                    code: ErrorCode::InvalidMetric,
                    seq: Some(1000),
                },
                "{\"type\":\"error\",\"code\":\"invalid_metric\",\"message\":\"each metric must be \
                 name=number (e.g. temperature=25.5) or \\\"name\\\": number\",\"seq\":1000}\n"
                    .to_owned(),
            ),
            (Reply::Reconnect, "{\"type\":\"reconnect\"}\n".to_owned()),
        ];
        for (reply, bytes) in cases {
            assert_eq!(encoded(&reply), bytes, "{reply:?}");
        }
    }

    #[test]
    fn the_encoders_append() {
        let mut out = b"x".to_vec();
        push_ack(&mut out, 1);
        push_ack_upto(&mut out, 2);
        push_nack(&mut out, 3, NackCode::Shutdown);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x{\"type\":\"ack\",\"seq\":1}\n{\"type\":\"ack\",\"upto\":2}\n\
             {\"type\":\"nack\",\"seq\":3,\"code\":\"shutdown\"}\n"
        );
    }

    #[test]
    fn every_reply_parses_back_to_itself() {
        let mut replies = vec![Reply::Reconnect];
        for n in [0, 1, 7, 1 << 53, u64::MAX] {
            replies.extend([Reply::Ack { seq: n }, Reply::AckUpto { upto: n }]);
            replies.extend(NackCode::ALL.map(|code| Reply::Nack { seq: n, code }));
            replies.extend(ErrorCode::ALL.map(|code| Reply::Error { code, seq: Some(n) }));
        }
        replies.extend(ErrorCode::ALL.map(|code| Reply::Error { code, seq: None }));
        for reply in replies {
            let line = encoded(&reply);
            assert_eq!(Reply::parse(line.as_bytes()), Ok(reply.clone()), "{line}");
            let bare = line.trim_end().as_bytes();
            assert_eq!(Reply::parse(bare), Ok(reply.clone()), "{line}");
            let crlf = format!("{}\r\n", line.trim_end());
            assert_eq!(Reply::parse(crlf.as_bytes()), Ok(reply), "{line}");
        }
    }

    #[test]
    fn parsing_ignores_messages_and_unknown_fields() {
        let cases: [(&str, Reply); 4] = [
            (
                r#"{"type":"error","code":"malformed_json","message":"x"}"#,
                Reply::Error {
                    code: ErrorCode::MalformedJson,
                    seq: None,
                },
            ),
            (
                r#"{"seq":null,"type":"error","code":"line_too_long"}"#,
                Reply::Error {
                    code: ErrorCode::LineTooLong,
                    seq: None,
                },
            ),
            (
                r#"{"type":"ack","upto":7,"extra":[1]}"#,
                Reply::AckUpto { upto: 7 },
            ),
            (r#"{"type":"reconnect","after_ms":5}"#, Reply::Reconnect),
        ];
        for (line, reply) in cases {
            assert_eq!(Reply::parse(line.as_bytes()), Ok(reply.clone()), "{line}");
        }
    }

    /// A newer server's codes are still nacks and rejections, kept as sent.
    #[test]
    fn unknown_codes_are_still_nacks_and_rejections() {
        let cases = [
            (
                "{\"type\":\"nack\",\"seq\":1,\"code\":\"lost\"}\n",
                Reply::OtherNack {
                    seq: 1,
                    code: "lost".into(),
                },
            ),
            (
                "{\"type\":\"error\",\"code\":\"teapot\"}\n",
                Reply::OtherError {
                    code: "teapot".into(),
                    seq: None,
                },
            ),
            (
                "{\"type\":\"error\",\"code\":\"te\\\"a\",\"seq\":7}\n",
                Reply::OtherError {
                    code: "te\"a".into(),
                    seq: Some(7),
                },
            ),
        ];
        for (line, reply) in cases {
            assert_eq!(Reply::parse(line.as_bytes()).unwrap(), reply, "{line}");
            assert_eq!(encoded(&reply), line);
        }
        // The message of an unknown error is not kept.
        assert_eq!(
            Reply::parse(br#"{"type":"error","code":"teapot","message":"short and stout"}"#)
                .unwrap(),
            Reply::OtherError {
                code: "teapot".into(),
                seq: None
            }
        );
    }

    #[test]
    fn what_is_not_a_known_reply_is_an_error() {
        let missing = |kind, field| ParseReplyError::MissingField { kind, field };
        let cases: [(&str, ParseReplyError); 5] = [
            (
                r#"{"type":"welcome"}"#,
                ParseReplyError::UnknownType("welcome".into()),
            ),
            (r#"{"type":"ack"}"#, missing("ack", "seq or upto")),
            (
                r#"{"type":"nack","code":"shutdown"}"#,
                missing("nack", "seq"),
            ),
            (r#"{"type":"nack","seq":1}"#, missing("nack", "code")),
            (
                r#"{"type":"error","message":"x"}"#,
                missing("error", "code"),
            ),
        ];
        for (line, error) in cases {
            assert_eq!(Reply::parse(line.as_bytes()), Err(error), "{line}");
        }
        for line in [
            "garbage",
            "",
            "[1]",
            r#"{"code":"shutdown"}"#,
            r#"{"type":"ack","seq":-1}"#,
            r#"{"type":"ack","seq":1,"upto":2}"#,
            "{\"type\":\"ack\",\"seq\":1}\n{\"type\":\"ack\",\"seq\":2}\n",
        ] {
            assert!(
                matches!(
                    Reply::parse(line.as_bytes()),
                    Err(ParseReplyError::Malformed(_))
                ),
                "{line}"
            );
        }
    }

    #[test]
    fn nack_codes_are_in_discriminant_order_and_named_back() {
        for (i, code) in NackCode::ALL.into_iter().enumerate() {
            assert_eq!(code as usize, i, "{code}");
            assert_eq!(NackCode::from_name(code.as_str()), Some(code));
        }
        assert_eq!(NackCode::from_name("Shutdown"), None);
    }
}
