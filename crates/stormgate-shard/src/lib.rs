//! The shard runtime: everything between a station's socket and a sink.
//!
//! A Stormgate process runs `nr_shards` shards. Each shard is one OS thread running one glommio
//! (io_uring) executor pinned to one core, and it owns, exclusively:
//!
//! - its own listening socket on the shared address (SO_REUSEPORT: the kernel spreads
//!   connections across shards, so there is no shared accept loop);
//! - every connection it accepted, each a task that reads, frames and parses lines;
//! - a bounded queue of records between those tasks and the shard's sink;
//! - the sink itself (one Kafka producer per shard in production), built on the shard's
//!   thread by a [`SinkFactory`];
//! - its metrics ([`stormgate_telemetry::ShardMetrics`]), written only by it.
//!
//! Nothing on the per-line path is shared between shards. The exceptions are per connection,
//! not per line: the process-wide connection count checked at accept, the TLS configuration
//! loaded at each handshake (with `TLS_CERT`), the station registry asked at identify (with
//! `STATION_AUTH=token`), and the stop flag the shards poll.
//!
//! Layout:
//!
//! - [`config`]: [`RuntimeConfig`] and its defaults.
//! - [`auth`]: [`StationAuth`], the per-identify question asked when stations must prove who
//!   they are (`STATION_AUTH=token|certificate`).
//! - [`tls`]: [`StationTls`], where connections get their TLS configuration, and the stream
//!   that is plain TCP or TLS (`TLS_CERT`).
//! - [`server`]: [`Server::start`] binds the listeners, starts the shards and reports their
//!   readiness; [`ServerHandle`] stops and joins them.
//! - `shard`: one shard's life: accept loop, housekeeping tick, drain on shutdown.
//! - `connection`: one connection's task: read, frame, parse, enqueue, reply.
//! - [`sink`]: the [`Sink`] contract, [`Record`]s and their settlement, and [`NullSink`].
//! - `buffers`: the shard-local read buffer and the pools that keep idle connections small.
//! - `gate`: parks connections before they read while the record queue is full.
//! - `placement`, `listener`: cores and sockets.

pub mod auth;
pub mod config;
pub mod server;
pub mod sink;
pub mod tls;

mod acks;
mod buffers;
mod connection;
mod disk;
mod events;
mod gate;
mod listener;
mod placement;
mod shard;
mod signal;

pub use auth::{Credentials, StationAuth};
pub use config::{AckAfter, DiskBuffer, RuntimeConfig, WhenFull};
pub use server::{Server, ServerHandle, ShardInfo, StartServerError};
pub use signal::Notify;
pub use sink::{
    DeliveryFailure, NullSink, NullSinkFactory, Outcome, Record, RecordReceiver, Sink, SinkContext,
    SinkFactory, Ticket,
};
pub use tls::StationTls;
