//! The output record: one Kafka record per metrics line.
//!
//! ```text
//! key:   12345
//! value: {"connection_id":"<uuid>","zipcode":"12345","city":"TestCity",
//!         "received_at_ms":1700000000000,"seq":7,"metrics":{"temperature":25.5}}
//! ```
//!
//! `seq` appears only when the station sent one. Everything before `received_at_ms`'s value
//! depends only on the connection and its identify, so a [`Station`] keeps it pre-encoded and a
//! record starts with one copy of it.

use std::rc::Rc;

use simd_json::prelude::*;

use crate::json;

/// Who a connection speaks for, as its latest identify said.
///
/// Shard-local: owned by one connection's session; the key is shared with queued records.
#[derive(Debug, Clone)]
pub struct Station {
    zipcode: Rc<str>,
    /// `{"connection_id":"…","zipcode":"…","city":"…","received_at_ms":`
    prefix: Box<[u8]>,
}

impl Station {
    pub(crate) fn new(connection_id: &str, zipcode: &str, city: &str) -> Station {
        let mut prefix = Vec::with_capacity(96 + zipcode.len() + city.len());
        prefix.extend_from_slice(b"{\"connection_id\":");
        json::write_str(&mut prefix, connection_id);
        prefix.extend_from_slice(b",\"zipcode\":");
        json::write_str(&mut prefix, zipcode);
        prefix.extend_from_slice(b",\"city\":");
        json::write_str(&mut prefix, city);
        prefix.extend_from_slice(b",\"received_at_ms\":");
        Station {
            zipcode: zipcode.into(),
            prefix: prefix.into(),
        }
    }

    /// The station's zipcode: the Kafka record key.
    pub fn zipcode(&self) -> &str {
        &self.zipcode
    }

    /// The zipcode as a shared key, cloned into each queued record without allocating.
    pub fn key(&self) -> &Rc<str> {
        &self.zipcode
    }

    /// The station's city (empty when identify carried none), decoded from the record
    /// prefix. Not kept apart: every idle station would pay for it, and only checks ask.
    pub fn city(&self) -> String {
        let mut doc = Vec::with_capacity(self.prefix.len() + 2);
        doc.extend_from_slice(&self.prefix);
        doc.extend_from_slice(b"0}");
        let value = simd_json::to_owned_value(&mut doc).expect("the prefix is a JSON object");
        value
            .get("city")
            .and_then(|c| c.as_str())
            .expect("the prefix has a city")
            .to_owned()
    }

    /// Starts a record: writes everything up to and including `"metrics":{`.
    pub(crate) fn begin_record(&self, out: &mut Vec<u8>, received_at_ms: i64, seq: Option<u64>) {
        out.clear();
        out.extend_from_slice(&self.prefix);
        json::write_int(out, received_at_ms);
        if let Some(seq) = seq {
            out.extend_from_slice(b",\"seq\":");
            json::write_int(out, seq);
        }
        out.extend_from_slice(b",\"metrics\":{");
    }
}

/// Appends one `"name":value` member to a record begun with [`Station::begin_record`] and
/// returns where the encoded name sits in `out`, for the duplicate check.
pub(crate) fn push_metric(
    out: &mut Vec<u8>,
    first: bool,
    name: &str,
    value: f64,
) -> (usize, usize) {
    let span = push_name(out, first, name);
    json::write_f64(out, value);
    span
}

/// Like [`push_metric`], for a value already known to be a plain decimal JSON number
/// (see `parse::is_plain_decimal`): copied as is, with `.0` added to an integer so that
/// every value reads as a float, as [`push_metric`] writes them.
pub(crate) fn push_metric_text(
    out: &mut Vec<u8>,
    first: bool,
    name: &str,
    value: &str,
) -> (usize, usize) {
    let span = push_name(out, first, name);
    out.extend_from_slice(value.as_bytes());
    if !value.contains('.') {
        out.extend_from_slice(b".0");
    }
    span
}

/// Appends a member's separator, `"name"` and `:`; returns where the encoded name sits.
fn push_name(out: &mut Vec<u8>, first: bool, name: &str) -> (usize, usize) {
    if !first {
        out.push(b',');
    }
    let start = out.len();
    json::write_str(out, name);
    let end = out.len();
    out.push(b':');
    (start, end)
}

/// Closes a record begun with [`Station::begin_record`].
pub(crate) fn end_record(out: &mut Vec<u8>) {
    out.extend_from_slice(b"}}");
}
