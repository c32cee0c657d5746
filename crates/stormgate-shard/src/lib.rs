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
//! Layout, bottom up: each module uses only modules of the layers below it (see
//! docs/ARCHITECTURE.md; `crates/stormgate/tests/tidy.rs` checks it).
//!
//! - [`contract`]: [`Record`], [`Ticket`], [`Outcome`], [`ShardInfo`],
//!   [`StartServerError`]: the words every other module speaks. Beside it `policy` (a
//!   connection's decisions as pure state: deadlines, rate budget, strikes) and the primitives:
//!   [`auth`] ([`StationAuth`], the per-identify question asked when stations must prove who
//!   they are), `readiness` (the station sockets and the shard's one epoll instance that
//!   wakes them), `signal`, `gate` (parks connections before they read while the record
//!   queue is full), `buffers` (the shard-local read buffer and the pools that keep idle
//!   connections small), `placement` and `listener` (cores and sockets).
//! - [`tls`]: [`StationTls`] and the stream that is a plain socket or TLS over it.
//! - [`config`] ([`RuntimeConfig`] and its defaults), `acks` (a connection's window of lines
//!   awaiting their answer), `events` (logged and counted at a rate limit).
//! - `ledger`: the records in flight, their byte budgets, each connection's share.
//! - [`sink`]: the [`Sink`] contract over the ledger, and [`NullSink`].
//! - `core` (what a shard's tasks share: its socket table, deadlines, drain) and `disk` (the
//!   disk buffer on a shard's way).
//! - `lines`: what a connection does with the bytes it read (frame, parse, decide), no socket.
//! - `connection`: one connection's task: reads, waits and writes around its line handler.
//! - `shard`: one shard's life: accept loop, housekeeping tick, drain on shutdown.
//! - [`server`]: [`Server::start`] binds the listeners, starts the shards and reports their
//!   readiness; [`ServerHandle`] stops and joins them.

pub mod auth;
pub mod config;
pub mod contract;
pub mod server;
pub mod sink;
pub mod tls;

mod acks;
mod buffers;
mod connection;
mod core;
mod disk;
mod events;
mod gate;
mod ledger;
mod lines;
mod listener;
mod placement;
mod policy;
mod readiness;
mod shard;
mod signal;

pub use crate::core::TICK;
pub use auth::{Credentials, StationAuth};
pub use config::{AckAfter, DiskBuffer, RuntimeConfig, WhenFull};
pub use contract::{DeliveryFailure, Outcome, Record, ShardInfo, StartServerError, Ticket};
pub use server::{Server, ServerHandle};
pub use signal::Notify;
pub use sink::{NullSink, NullSinkFactory, RecordReceiver, Sink, SinkContext, SinkFactory};
pub use tls::StationTls;
