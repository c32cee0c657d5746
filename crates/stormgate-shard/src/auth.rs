//! Station authentication as the shard sees it: one question per identify.
//!
//! The shard does not know where tokens come from. With `STATION_AUTH=token` the binary hands
//! it a [`StationAuth`] (the station registry, reloaded in the background), and each
//! connection asks it once per identify, through
//! [`stormgate_protocol::LineParser::parse_line_authorized`]. Metrics lines never ask.

use std::fmt::Debug;

/// Decides whether an identify may speak for its zipcode.
///
/// Shared by every shard (`Arc`), and called on the shard's own thread once per identify —
/// never per metrics line. So it must answer quickly and never block: no I/O, and no lock that
/// another thread can hold for longer than a pointer swap. Its answer about one zipcode may
/// change over time (a registry reload); connections that already identified keep their
/// station until they identify again.
pub trait StationAuth: Send + Sync + Debug {
    /// Whether `token` (the identify's `"token"` string, `None` when it sent none) proves the
    /// right to publish for `zipcode`.
    fn verify(&self, zipcode: &str, token: Option<&str>) -> bool;
}
