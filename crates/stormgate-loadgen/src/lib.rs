//! Stormgate's load generator, for benchmarks. One binary, three modes:
//!
//! - **`send`** ([`send`]): opens station connections to the server (nonblocking sockets on
//!   one epoll loop per thread, split over processes when the open-files limit is too low),
//!   identifies each as a station and writes metrics lines as fast as the server takes them
//!   or at a fixed rate, counting the server's TCP backpressure and its error replies.
//! - **`consume`** ([`consume`]): reads the topic from the beginning and checks what arrived:
//!   records per zipcode, duplicated and missing `seq` numbers, end-to-end and ingest latency.
//! - **`produce`** ([`produce`]): publishes ready-made Stormgate records with one plain
//!   producer and the server's Kafka settings: the ceiling the server is measured against.
//! - **`pki`** ([`pki`]): writes a throwaway CA and certificates signed by it, for `send`
//!   over TLS against a server started with them.
//!
//! Supporting modules: [`cli`] (the flags), [`lines`] (station lines from templates),
//! [`plan`] (source addresses, process and thread splits), [`tls`] (the rustls client
//! configuration of `send --tls-ca`), [`fdlimit`], [`output`] (the JSON summary every mode
//! prints on stdout).
//!
//! Kafka is reached only through `stormgate-kafka` (`verify::scan_topic`,
//! `ceiling::produce_prebuilt`): like the server, this crate does not link rdkafka itself.

pub mod cli;
pub mod consume;
pub mod fdlimit;
pub mod latency;
pub mod lines;
pub mod output;
pub mod pki;
pub mod plan;
pub mod produce;
pub mod send;
pub mod tls;

use std::io;
use std::process::ExitCode;

use cli::{Cli, Command};

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// Flags that do not go together.
    #[error("{0}")]
    Usage(String),
    /// An I/O operation failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A Kafka client failed.
    #[error("kafka: cannot {what}: {source}")]
    Kafka {
        /// What was being done.
        what: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A child process of a split `send` misbehaved.
    #[error("{0}")]
    Child(String),
    /// A TLS file or configuration could not be used.
    #[error("tls: {0}")]
    Tls(String),
}

impl LoadgenError {
    /// An I/O error while doing `what`.
    pub fn io(what: &'static str, source: io::Error) -> LoadgenError {
        LoadgenError::Io { what, source }
    }

    /// A Kafka client error while doing `what`.
    pub fn kafka(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> LoadgenError {
        LoadgenError::Kafka {
            what,
            source: Box::new(source),
        }
    }
}

/// Runs the mode the command line asks for.
pub fn run(cli: &Cli) -> Result<ExitCode, LoadgenError> {
    match &cli.command {
        Command::Send(args) => send::run(args),
        Command::Consume(args) => consume::run(args),
        Command::Produce(args) => produce::run(args),
        Command::Pki(args) => pki::run(args),
    }
}
