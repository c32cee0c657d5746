//! The shard runtime's vocabulary: what a record is, how its fate is told, where a shard runs
//! and why a server did not start. The bottom layer: it imports nothing from the crate, and
//! every other module may use it.

use std::net::SocketAddr;
use std::rc::Rc;

/// One output record, owned by its shard from the line that made it to its settlement.
#[derive(Debug)]
pub struct Record {
    /// The station's zipcode: the Kafka key. Shared with the connection's session.
    pub key: Rc<str>,
    /// The record value (JSON). Give it back with [`SinkContext::recycle`](crate::SinkContext::recycle) once copied out.
    pub value: Vec<u8>,
    /// Unix milliseconds when the shard read the line.
    pub timestamp_ms: i64,
    /// Settle with this ticket, exactly once.
    pub ticket: Ticket,
    /// A rejected line for the dead-letter topic (keyed by zipcode, or by connection id before
    /// identify), not a metrics record.
    pub dead_letter: bool,
}

/// Identifies an in-flight record within its shard. Meaningless on any other shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(usize);

impl Ticket {
    /// The ticket as a plain integer, e.g. to pass through a C library as an opaque value.
    pub fn into_raw(self) -> usize {
        self.0
    }

    /// Rebuilds a ticket from [`Ticket::into_raw`].
    pub fn from_raw(raw: usize) -> Ticket {
        Ticket(raw)
    }
}

/// What finally happened to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination acknowledged it as configured (e.g. Kafka acks).
    Delivered,
    /// It will not be delivered.
    Failed(DeliveryFailure),
}

/// Why a record was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryFailure {
    /// The destination refused it or retries ran out; `reason` names the sink's error.
    #[error("delivery failed: {reason}")]
    Rejected {
        /// The sink's error, e.g. librdkafka's error name.
        reason: String,
    },
    /// Shutdown's deadline passed before it was delivered.
    #[error("shutdown deadline passed before delivery")]
    ShutdownDeadline,
    /// The disk buffer was full and `BUFFER_WHEN_FULL=drop_newest` refused it.
    #[error("disk buffer full (BUFFER_WHEN_FULL=drop_newest)")]
    BufferFull,
}

/// Where a shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardInfo {
    /// 0-based shard id.
    pub id: usize,
    /// The core its executor is pinned to.
    pub core: usize,
    /// How many shards the process runs.
    pub nr_shards: usize,
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartServerError {
    /// Binding the listening sockets failed (address in use, permission, bad address).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A shard's executor could not be created (io_uring unavailable, memlock limit too low).
    #[error("cannot start shard {shard} on core {core}: {message}")]
    Executor {
        /// The shard.
        shard: usize,
        /// The core it was to run on.
        core: usize,
        /// glommio's error.
        message: String,
    },
    /// A shard's sink could not be built.
    #[error("cannot build the sink of shard {shard}: {source}")]
    Sink {
        /// The shard.
        shard: usize,
        /// The factory's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A shard's disk buffer could not be opened (its directory, a lock held by another
    /// process, an I/O error): never a silent start-over.
    #[error("cannot open the disk buffer of shard {shard}: {source}")]
    Buffer {
        /// The shard.
        shard: usize,
        /// The log's error, naming the path.
        source: stormgate_buffer::OpenLogError,
    },
    /// The disk buffer's settings do not fit the machine (the message names the numbers).
    #[error("disk buffer: {0}")]
    BufferSettings(String),
    /// A shard thread could not be spawned or died before reporting.
    #[error("shard thread failed: {0}")]
    Thread(String),
}
