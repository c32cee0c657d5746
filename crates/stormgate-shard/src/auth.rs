//! Station authentication as the shard sees it: one question per identify.
//!
//! The shard does not know where tokens come from or what a certificate must say. With
//! `STATION_AUTH=token` or `certificate` the binary hands it a [`StationAuth`] (the station
//! registry reloaded in the background, or the certificate rule), and each connection asks it
//! once per identify, through [`stormgate_protocol::LineParser::parse_line_authorized`],
//! with the identify's token and, under mutual TLS, the station's verified client
//! certificate. Metrics lines never ask.

use std::fmt::Debug;

/// Decides whether an identify may speak for its zipcode.
///
/// Shared by every shard (`Arc`), and called on the shard's own thread once per identify —
/// never per metrics line. So it must answer quickly and never block: no I/O, and no lock that
/// another thread can hold for longer than a pointer swap. Its answer about one zipcode may
/// change over time (a registry reload); connections that already identified keep their
/// station until they identify again.
pub trait StationAuth: Send + Sync + Debug {
    /// Whether `credentials` prove the right to publish for their zipcode.
    fn verify(&self, credentials: &Credentials<'_>) -> bool;
}

/// What an identify offers as proof of its zipcode.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The zipcode the identify claims (as sent: untrusted).
    pub zipcode: &'a str,
    /// The identify's `"token"` string; `None` when it sent none.
    pub token: Option<&'a str>,
    /// The end-entity certificate (DER) of the connection's mutual-TLS handshake, already
    /// verified against the client CAs; `None` without mutual TLS.
    pub certificate: Option<&'a [u8]>,
}
