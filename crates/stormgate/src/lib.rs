//! The `stormgate` binary: command line, configuration and wiring.
//!
//! - [`cli`]: the flags and environment variables, each with its default, and how they turn
//!   into the runtime's and the Kafka sink's settings.
//! - [`app`]: starts the embedded Kafka mock when no brokers are configured, starts the shards
//!   with one sink per shard, waits for SIGINT/SIGTERM, drains and reports.
//! - [`logging`]: `RUST_LOG` filtering, text or JSON output on stderr.
//! - [`ops`]: the operations endpoint (`/metrics`, `/healthz`, `/readyz`) and the periodic
//!   statistics block, on their own threads, reading the shards' metrics.
//! - [`report`]: the per-shard summary at shutdown, logged and written as JSON.
//! - [`registry`]: the station registry (`STATION_AUTH=token`): its file format, token
//!   hashing and checking, atomic changes for `stormgate station`.
//! - [`tls`]: the station listener's TLS (`TLS_CERT`, `TLS_KEY`, `TLS_CLIENT_CA`) and what a
//!   client certificate proves (`STATION_AUTH=certificate`).
//! - `atomic_file`: replacing a file whole (write beside, fsync, rename, fsync the
//!   directory), for the registry and the report.
//! - [`reload`]: the threads that reload the registry and the TLS files on change or SIGHUP.
//!
//! This is the only crate that uses `anyhow`; libraries below it return typed errors.

pub mod app;
mod atomic_file;
pub mod cli;
pub mod logging;
pub mod ops;
pub mod registry;
pub mod reload;
pub mod report;
pub mod settings;
pub mod tls;
