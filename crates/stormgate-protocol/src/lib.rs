//! The station protocol, with no I/O and no async: everything here is a pure function of bytes.
//!
//! Stations hold a TCP connection and send newline-delimited JSON:
//!
//! ```text
//! {"type":"identify","zipcode":"12345","city":"TestCity"}
//! {"type":"metrics","data":"temperature=25.5,humidity=60.0"}
//! ```
//!
//! The crate is laid out along the path of one line:
//!
//! - [`framing`]: [`LineFramer`] cuts a byte stream into lines (`\n` or `\r\n`), skips blank
//!   lines, and bounds line length without ever buffering more than the limit.
//! - [`parse`]: [`LineParser`] parses one line with simd-json, in place, and applies it to a
//!   [`Session`] (an identify, checked by the caller's token check when it gives one) or
//!   encodes it as an output record (a metrics line).
//! - [`record`]: the output record's JSON, built from a per-session prefix so that a metrics
//!   line costs one buffer write and no allocation.
//! - [`error`]: [`ErrorCode`], the closed set of reasons a line is rejected, and the error
//!   line sent back to the station.
//! - [`dead_letter`]: [`DeadLetter`], a rejected line as a record for the dead-letter topic.
//! - [`reply`]: every line the server sends back — acks, nacks ([`NackCode`]), error lines,
//!   `reconnect` — written without allocating, and [`Reply::parse`] to read them.
//!
//! Everything that touches sockets, timers or Kafka lives in other crates.

pub mod dead_letter;
pub mod error;
pub mod framing;
mod json;
pub mod parse;
pub mod record;
pub mod reply;

pub use dead_letter::DeadLetter;
pub use error::{ErrorCode, ParseLineError};
pub use framing::{Frame, LineFramer};
pub use parse::{LineParser, MAX_CITY_BYTES, MAX_ZIPCODE_BYTES, Parsed, Session};
pub use record::Station;
pub use reply::{NackCode, ParseReplyError, RECONNECT_LINE, Reply};

/// Bytes that must follow a line inside its buffer so that simd-json can parse it in place
/// with wide loads (see [`simd_json::fill_tape_padded`]). Buffers that hold lines keep this
/// much spare capacity past the last byte they read.
pub const PARSE_PADDING: usize = simd_json::INPUT_PADDING;
