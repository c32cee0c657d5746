//! Settings of the shard runtime, with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::StationAuth;
use crate::tls::StationTls;

/// Where stations connect (`TCP_LISTEN`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Listen backlog per shard (`TCP_BACKLOG`). glommio's own `bind` fixes 1024; a reconnect
/// storm of tens of thousands of stations needs more. The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Records a shard may hold between its connections and its sink (`TCP_JOB_QUEUE_SIZE`).
/// 8192 records of ~200 bytes is under 2 MiB per shard: enough to ride out a producer that
/// pauses for a poll interval at several hundred thousand lines per second, small enough that
/// backpressure reaches the sockets quickly when the broker stalls.
pub const DEFAULT_QUEUE_SIZE: usize = 8192;
/// Longest accepted line (`TCP_MAX_LINE_BYTES`), line ending not counted.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;
/// How long a shutdown may take to deliver what was read (`SHUTDOWN_TIMEOUT`).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Over how long a stopping server spreads the ends of its connections (`TCP_DRAIN_PERIOD`).
/// 0, the default, ends them all at once: right for one process, whose stations have
/// nowhere else to go until it is back. Several instances on one address set it (the
/// template unit: 10 s) so that a restarting instance's stations reconnect to the others
/// over that period rather than in the same second.
pub const DEFAULT_DRAIN_PERIOD: Duration = Duration::ZERO;
/// Size of each shard's read buffer. One read can carry ~1000 typical lines; the buffer is
/// shared by all connections of the shard, so its size does not multiply by connections.
pub const DEFAULT_READ_BUFFER_BYTES: usize = 64 * 1024;
/// Consecutive rejected lines after which a connection is closed (`TCP_MAX_ERRORS_PER_CONN`).
/// A station with a firmware bug that makes every line bad gets 100 error lines, enough to
/// debug it, and then stops costing a parse and a reply per line.
pub const DEFAULT_MAX_ERRORS_PER_CONN: u32 = 100;
/// How long a connection may send nothing before it is closed (`TCP_IDLE_TIMEOUT`). Stations
/// report every few seconds to minutes; ten minutes of silence means a dead peer whose FIN
/// never arrived (NAT timeout, power loss), and its descriptor is better used by a live one.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one line may take to arrive, from its first byte to its newline
/// (`TCP_LINE_TIMEOUT`). Real lines arrive in one segment; this bounds how long a sender that
/// trickles bytes can hold a partial line and its buffer.
pub const DEFAULT_LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// Kernel receive buffer of each station socket (`TCP_RECV_BUFFER`; 0 = kernel autotuning).
/// 256 KiB holds ~2500 typical lines, far more than a station sends between two reads, and
/// keeps what a stalled shard can have waiting in the kernel to 256 KiB per busy connection
/// (autotuning would let each grow to `tcp_rmem`'s maximum). An idle connection costs nothing
/// of it: the kernel allocates receive memory only for data it holds. Lowered at start so
/// that every connection's full queue fits under `net.ipv4.tcp_mem` (`recv_buffer_for`).
pub const DEFAULT_RECV_BUFFER: usize = 256 * 1024;
/// File descriptors kept free for everything that is not a station connection (broker
/// sockets, librdkafka's internal pipes, /proc reads, the spill file) when the connection
/// limit is derived from `RLIMIT_NOFILE`.
pub const FD_HEADROOM: usize = 256;

/// Settings of the shard runtime.
///
/// Every field's default is the `DEFAULT_*` constant of the same name in this module.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Address every shard listens on (SO_REUSEPORT). Port 0 picks one port for all shards.
    pub listen: SocketAddr,
    /// Number of shards; 0 means one per core in the process's affinity mask.
    pub shards: usize,
    /// Listen backlog of each shard's socket.
    pub backlog: u32,
    /// Most station connections open at once, all shards together; 0 derives it from the
    /// open-files limit minus [`FD_HEADROOM`].
    pub max_connections: usize,
    /// Capacity of each shard's record queue.
    pub queue_size: usize,
    /// Longest accepted line in bytes.
    pub max_line_bytes: usize,
    /// Records one connection may have in flight (queued or awaiting delivery) before it
    /// stops reading; 0 means no per-connection limit. 1 makes every line wait for its
    /// delivery report before the next is read (`KAFKA_ASYNC=false`).
    pub max_in_flight_per_conn: u32,
    /// Bytes of record values one connection may have in flight (queued or awaiting
    /// delivery) before it stops reading, beside the count cap; 0 means no byte cap.
    pub max_bytes_in_flight_per_conn: usize,
    /// Bytes of record values a shard may hold in flight, all its connections together
    /// (its queue, its producer, awaiting delivery); at the budget no connection of the shard
    /// reads until deliveries free a quarter of it. 0 means no budget.
    pub max_bytes_in_flight: usize,
    /// Time allowed, once shutdown starts, to deliver what was already read.
    pub shutdown_timeout: Duration,
    /// Once shutdown starts, each connection is told `{"type":"reconnect"}` and ended at a
    /// moment of its own, drawn uniformly from this period (so a random order, evenly
    /// spread); until then it is served as before. Zero ends every connection at once.
    /// Should be shorter than `shutdown_timeout`: at the deadline whatever is still open is
    /// ended anyway.
    pub drain_period: Duration,
    /// Size of each shard's read buffer.
    pub read_buffer_bytes: usize,
    /// Kernel receive buffer of each station socket in bytes; 0 leaves autotuning on.
    pub recv_buffer: usize,
    /// Consecutive rejected lines after which the connection is closed; 0 = never.
    pub max_errors_per_conn: u32,
    /// Silence after which a connection is closed; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Longest time from a line's first byte to its newline; `None` = unbounded.
    pub line_timeout: Option<Duration>,
    /// Turn every rejected line into a dead-letter record as well (see
    /// `stormgate_protocol::dead_letter`); the sink routes them to its dead-letter topic.
    /// Costs a copy of every line before it is parsed (simd-json parses in place).
    pub dead_letters: bool,
    /// Most connections one shard serves at once; 0 = no per-shard limit (only
    /// `max_connections`). Like the process-wide limit, a connection over it is told
    /// `too_many_connections` and closed rather than left waiting in the accept queue: with
    /// SO_REUSEPORT the kernel has already chosen the shard, so a paused shard would strand
    /// its queued connections while the others have room; a station that retries is hashed
    /// afresh.
    pub max_connections_per_shard: usize,
    /// Most connections open at once from one source IP address, process-wide; 0 = no limit.
    /// Over it, a connection gets `too_many_connections` and is closed. Addresses are counted
    /// in 65,536 hashed slots, so two addresses may, rarely, share a count.
    pub max_connections_per_ip: u32,
    /// Lines per second one connection may send on average, in bursts of up to one second's
    /// worth; past it the connection is not read until its budget recovers (its station's
    /// writes wait in TCP; nothing is dropped). 0 = no limit.
    pub max_lines_per_sec: u32,
    /// Acknowledge lines for connections whose identify does not say (`"acks"`); see
    /// docs/PROTOCOL.md.
    pub acks: bool,
    /// Serves stations TLS (`TLS_CERT`, `TLS_KEY`): every connection begins with a handshake
    /// configured by this, on its own shard. `None` (the default): plain TCP.
    pub tls: Option<Arc<dyn StationTls>>,
    /// Longest time a TLS handshake may take, from accept to its end
    /// (`TLS_HANDSHAKE_TIMEOUT`).
    pub tls_handshake_timeout: Duration,
    /// Checks every identify's credentials (`STATION_AUTH=token|certificate`): a refused
    /// identify gets `auth_failed` and leaves the connection without a station. `None` (the
    /// default, `STATION_AUTH=none`): any station may identify as any zipcode, and the parser
    /// never looks at a token.
    pub station_auth: Option<Arc<dyn StationAuth>>,
    /// Refused identifies after which a connection gets `too_many_errors` and is closed;
    /// 0 = never (`STATION_AUTH_MAX_FAILURES`). Counted over the connection's life, not in a
    /// row: a good identify in between does not reset it.
    pub station_auth_max_failures: u32,
    /// Where accepted records wait for the sink: `None` in memory only (`BUFFER_TYPE=memory`),
    /// or a write-ahead log per shard on disk (`BUFFER_TYPE=disk`). Default `None`.
    pub disk_buffer: Option<DiskBuffer>,
}

/// The disk buffer's settings (`BUFFER_*`): each shard appends every record it accepts to
/// its own write-ahead log in `dir/shard-<id>`, and the sink is fed from that log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBuffer {
    /// `BUFFER_DIR`: one subdirectory per shard (`shard-0`, `shard-1`, …).
    pub dir: PathBuf,
    /// `BUFFER_MAX_BYTES`: a hard bound on the files of every shard together, split evenly.
    pub max_bytes: u64,
    /// `BUFFER_WHEN_FULL`: what a shard does once its share is full.
    pub when_full: WhenFull,
    /// `BUFFER_SYNC_INTERVAL`: the group-commit window.
    pub sync_interval: Duration,
    /// `TCP_ACK_AFTER`: when an acknowledging station's line is answered.
    pub ack_after: AckAfter,
}

/// What a shard does when its disk buffer holds `BUFFER_MAX_BYTES` (`BUFFER_WHEN_FULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop reading the sockets until delivered records free room (the default; as the
    /// memory buffer does when its queue is full).
    Block,
    /// Refuse new lines: each is counted as failed, and an acknowledging station gets
    /// `{"type":"nack","seq":N,"code":"buffer_full"}`.
    DropNewest,
}

/// When an acknowledging station's line is answered, with a disk buffer (`TCP_ACK_AFTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckAfter {
    /// Once the `fdatasync` covering it completed (the default).
    Durable,
    /// Once Kafka acknowledged it, as without a disk buffer.
    Delivered,
}

/// See [`DiskBuffer::sync_interval`]: the log's measured default (`stormgate_buffer::config`).
pub const DEFAULT_BUFFER_SYNC_INTERVAL: Duration = stormgate_buffer::config::DEFAULT_SYNC_INTERVAL;

/// See [`RuntimeConfig::max_in_flight_per_conn`]: half the default shard queue, so one
/// connection cannot take all of it, and ~10 ms of a connection at 400K lines/s.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONN: u32 = 4096;

/// See [`RuntimeConfig::max_bytes_in_flight_per_conn`]: 2 MiB holds the 4,096 records
/// of the count cap at ~500 bytes each (typical records are ~250), so for ordinary stations
/// the count binds first; a station sending records of 100 KB gets ~20 in flight instead of
/// 4,096 (400 MiB).
pub const DEFAULT_MAX_BYTES_IN_FLIGHT_PER_CONN: usize = 2 << 20;

/// See [`RuntimeConfig::max_bytes_in_flight`]: 64 MiB per shard is ~260,000 typical records,
/// more than the shard queue (8,192) and librdkafka's queue (100,000) hold together, so it
/// binds only when records are large; 4 shards × 64 MiB fit the shipped 2 GiB pod with room
/// for connections (docs/RELIABILITY.md's memory table).
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: usize = 64 << 20;

/// See [`RuntimeConfig::tls_handshake_timeout`]: a real handshake takes a few round trips
/// (well under a second even over a mobile link); ten seconds bounds how long a client that
/// connects and stalls holds a descriptor and rustls's handshake state.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// See [`RuntimeConfig::station_auth_max_failures`]: a station with a wrong token gets three
/// `auth_failed` answers, enough to see why in its log, and then stops costing a hash per
/// identify. Guessing a 256-bit token is hopeless at any rate, so the limit is about noise
/// and wasted work, not brute force; reconnecting costs a new connection each time, which the
/// connection limits bound.
pub const DEFAULT_STATION_AUTH_MAX_FAILURES: u32 = 3;

/// See [`RuntimeConfig::max_lines_per_sec`]: far above any weather station (a few lines a
/// minute) and above one connection's share of a shard at full load (~50K lines/s across 100
/// connections), yet a single flooder is held to a few percent of what a shard parses.
pub const DEFAULT_MAX_LINES_PER_SEC: u32 = 100_000;

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            shards: 0,
            backlog: DEFAULT_BACKLOG,
            max_connections: 0,
            queue_size: DEFAULT_QUEUE_SIZE,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_in_flight_per_conn: DEFAULT_MAX_IN_FLIGHT_PER_CONN,
            max_bytes_in_flight_per_conn: DEFAULT_MAX_BYTES_IN_FLIGHT_PER_CONN,
            max_bytes_in_flight: DEFAULT_MAX_BYTES_IN_FLIGHT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            drain_period: DEFAULT_DRAIN_PERIOD,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
            recv_buffer: DEFAULT_RECV_BUFFER,
            max_errors_per_conn: DEFAULT_MAX_ERRORS_PER_CONN,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            line_timeout: Some(DEFAULT_LINE_TIMEOUT),
            dead_letters: false,
            max_connections_per_shard: 0,
            max_connections_per_ip: 0,
            max_lines_per_sec: DEFAULT_MAX_LINES_PER_SEC,
            acks: false,
            tls: None,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            station_auth: None,
            station_auth_max_failures: DEFAULT_STATION_AUTH_MAX_FAILURES,
            disk_buffer: None,
        }
    }
}
