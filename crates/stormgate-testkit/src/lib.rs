//! What Stormgate's black-box tests share, in one place instead of a copy per test file: the
//! helpers of `crates/stormgate/tests`, `crates/stormgate-shard/tests` and the load generator's
//! certificates. Not shipped (`publish = false`); a library only so that the load generator,
//! a binary, can use it too.
//!
//! - [`wait_for`]: poll a condition with a deadline instead of sleeping.
//! - [`station`]: a raw station connection whose calls panic on failure ([`StationConn`]),
//!   its TLS counterpart ([`TlsStation`], or [`tls_handshake`] alone) and [`wait_for_ack`].
//! - [`lines`]: station lines (identify, metrics, numbered runs of metrics).
//! - [`pki`]: throwaway certificates ([`Ca`], [`Leaf`]) and rustls client configurations.
//! - [`broker`]: the suite's Apache Kafka address and [`OwnBroker`], a broker of a test's own
//!   run through `deploy/kafka/kafka.sh`.
//! - [`net`]: [`connect_from`], a socket bound to a loopback source address with its port
//!   picked at connect time.
//!
//! Reading a topic back needs rdkafka, which only `stormgate-kafka` links: those helpers stay
//! with the tests (`stormgate_kafka::verify`), not here.

pub mod broker;
pub mod lines;
pub mod net;
pub mod pki;
pub mod station;

use std::time::{Duration, Instant};

pub use broker::{OwnBroker, broker};
pub use lines::{identify, identify_without_acks, metrics, seq_lines, station_lines};
pub use net::connect_from;
pub use pki::{Ca, Leaf, pki_dir, replace};
pub use station::{StationConn, TlsStation, tls_handshake, wait_for_ack};

/// How often [`wait_for`] checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `cond` every 10 ms until it holds; panics, naming `what`, once `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The resident set size of process `pid` in bytes, from `/proc/PID/status` (0 when it is
/// gone).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
