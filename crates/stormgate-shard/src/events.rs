//! Internal events of the shard runtime, each an [`Event`]: `emit` counts it and logs it at a
//! rate limit where it can repeat per line or per connection, so logs and metrics cannot
//! drift apart.

use std::io;
use std::net::SocketAddr;

use stormgate_protocol::ErrorCode;
use stormgate_telemetry::{Event, LINE_ERROR_CODES, ShardMetrics};
use tracing::{debug, error, warn};

use crate::contract::DeliveryFailure;

// The per-code counters are indexed by the code's number, in arrays telemetry sizes without
// knowing the protocol.
const _: () = assert!(ErrorCode::COUNT <= LINE_ERROR_CODES);

/// A line was rejected and the station was told why.
pub(crate) struct LineRejected<'a> {
    pub code: ErrorCode,
    pub connection_id: &'a str,
    pub peer: SocketAddr,
}

impl Event for LineRejected<'_> {
    fn count(&self, metrics: &ShardMetrics) {
        metrics.line_error(self.code as usize);
    }

    fn log(&self, suppressed: u64) {
        warn!(
            code = self.code.as_str(),
            connection_id = self.connection_id,
            peer = %self.peer,
            suppressed,
            "rejected line: {}",
            self.code.message()
        );
    }
}

/// An identify was refused: its token is missing or does not match its zipcode
/// (`STATION_AUTH=token`). The station was told `auth_failed`.
pub(crate) struct StationAuthFailed<'a> {
    pub connection_id: &'a str,
    pub peer: SocketAddr,
    /// The zipcode the identify claimed (as sent: untrusted).
    pub zipcode: &'a str,
    /// Refused identifies on this connection so far, this one included.
    pub failures: u32,
}

/// Longest claimed zipcode a log line repeats; the rest is cut (a zipcode can be as long as a
/// line).
const LOGGED_ZIPCODE_MAX: usize = 64;

/// Counted as a rejected line (`auth_failed`) and logged at its own rate limit, so a flood of
/// malformed lines cannot hide failed identifies from the log.
impl Event for StationAuthFailed<'_> {
    fn count(&self, metrics: &ShardMetrics) {
        metrics.line_error(ErrorCode::AuthFailed as usize);
    }

    fn log(&self, suppressed: u64) {
        let mut end = self.zipcode.len().min(LOGGED_ZIPCODE_MAX);
        while !self.zipcode.is_char_boundary(end) {
            end -= 1;
        }
        // Debug formatting escapes whatever the station put in it.
        warn!(
            code = ErrorCode::AuthFailed.as_str(),
            connection_id = self.connection_id,
            peer = %self.peer,
            zipcode = ?&self.zipcode[..end],
            failures = self.failures,
            suppressed,
            "station authentication failed: {}",
            ErrorCode::AuthFailed.message()
        );
    }
}

/// A TLS handshake failed or timed out; the connection is closed without a station.
pub(crate) struct TlsHandshakeFailed<'a> {
    pub connection_id: &'a str,
    pub peer: SocketAddr,
    pub error: &'a io::Error,
}

/// Counted, and logged at its own rate limit: a scanner or a station with the wrong CA
/// repeats it once per connection.
impl Event for TlsHandshakeFailed<'_> {
    fn count(&self, metrics: &ShardMetrics) {
        metrics.tls_handshake_failures.incr();
    }

    fn log(&self, suppressed: u64) {
        warn!(
            connection_id = self.connection_id,
            peer = %self.peer,
            error = %self.error,
            suppressed,
            "TLS handshake failed; connection closed"
        );
    }
}

/// A connection was refused because the server is at its connection limit.
pub(crate) struct ConnectionRejected {
    pub peer: Option<SocketAddr>,
    /// Which limit: `"process"` or `"shard"`.
    pub scope: &'static str,
    pub limit: usize,
}

impl Event for ConnectionRejected {
    fn count(&self, metrics: &ShardMetrics) {
        metrics.connections_rejected.incr();
    }

    fn log(&self, suppressed: u64) {
        warn!(peer = ?self.peer, scope = self.scope, limit = self.limit, suppressed, "connection limit reached; refusing connection");
    }
}

/// `accept` failed (typically EMFILE: out of file descriptors).
pub(crate) struct AcceptFailed<'a> {
    pub error: &'a io::Error,
}

impl Event for AcceptFailed<'_> {
    fn count(&self, metrics: &ShardMetrics) {
        metrics.accept_failures.incr();
    }

    fn log(&self, suppressed: u64) {
        error!(error = %self.error, suppressed, "accept failed");
    }
}

/// A connection ended.
pub(crate) struct ConnectionClosed<'a> {
    pub connection_id: &'a str,
    pub peer: SocketAddr,
    pub reason: CloseReason,
}

/// Why a connection ended.
pub(crate) enum CloseReason {
    /// The station closed its side.
    PeerClosed,
    /// The shard is shutting down.
    Shutdown,
    /// Reading or writing the socket failed.
    Io(io::Error),
    /// The shard's sink stopped taking records.
    SinkStopped,
    /// The station sent too many bad lines in a row.
    TooManyErrors,
    /// The station's identifies were refused `STATION_AUTH_MAX_FAILURES` times.
    AuthFailures,
    /// The TLS handshake failed or timed out (already counted and logged).
    TlsHandshake,
    /// The station sent nothing for the idle timeout.
    IdleTimeout,
    /// A line stayed incomplete past the line timeout.
    LineTimeout,
    /// Serving the connection panicked (a bug); the shard goes on.
    Panicked(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("peer closed"),
            CloseReason::Shutdown => f.write_str("shutdown"),
            CloseReason::Io(e) => write!(f, "i/o error: {e}"),
            CloseReason::SinkStopped => f.write_str("sink stopped"),
            CloseReason::TooManyErrors => f.write_str("too many bad lines in a row"),
            CloseReason::AuthFailures => f.write_str("too many refused identifies"),
            CloseReason::TlsHandshake => f.write_str("TLS handshake failed"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::LineTimeout => f.write_str("line timeout"),
            CloseReason::Panicked(msg) => write!(f, "panicked: {msg}"),
        }
    }
}

/// Logged every time: at DEBUG, or, for a panic, as an error (each one is a bug to fix, and
/// each ends a connection).
impl Event for ConnectionClosed<'_> {
    fn count(&self, metrics: &ShardMetrics) {
        metrics.connections_closed.incr();
        metrics.connections_active.add(-1);
        match &self.reason {
            CloseReason::IdleTimeout => metrics.idle_timeouts.incr(),
            CloseReason::LineTimeout => metrics.line_timeouts.incr(),
            CloseReason::Panicked(_) => metrics.connection_panics.incr(),
            _ => {}
        }
    }

    fn log(&self, _: u64) {
        if let CloseReason::Panicked(msg) = &self.reason {
            error!(connection_id = self.connection_id, peer = %self.peer, panic = %msg, "connection task panicked; connection closed, shard unaffected");
        } else {
            debug!(connection_id = self.connection_id, peer = %self.peer, reason = %self.reason, "connection closed");
        }
    }
}

/// A record will not be delivered.
pub(crate) struct DeliveryFailed<'a> {
    pub failure: &'a DeliveryFailure,
}

/// The failed-record counters are the ledger's (records or dead letters): this only logs.
impl Event for DeliveryFailed<'_> {
    fn log(&self, suppressed: u64) {
        error!(error = %self.failure, suppressed, "record not delivered");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use stormgate_telemetry::LogLimiter;

    use super::*;

    #[test]
    fn failed_accepts_are_counted_even_when_their_log_line_is_held_back() {
        let metrics = ShardMetrics::default();
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..3 {
            AcceptFailed { error: &error }.emit(&metrics, &limiter);
        }
        assert_eq!(metrics.accept_failures.get(), 3);
    }
}
