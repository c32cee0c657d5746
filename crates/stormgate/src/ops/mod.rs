//! The operations endpoint (`METRICS_ADDR`) and the periodic statistics block
//! (`STATS_INTERVAL`).
//!
//! Both run on their own std threads, never on a shard, and only *read* what the shards
//! write: each shard's [`ShardMetrics`] (single-writer atomics) and each shard producer's
//! [`ProducerStats`] (atomics the shard fills from librdkafka's statistics). Nothing here
//! takes a lock a shard takes, sends a shard a message, or wakes one; a slow scrape, a slow
//! client or a stuck log writer slows only these threads.
//!
//! - The HTTP server is hyper's HTTP/1.1, on one thread of its own running a current-thread
//!   tokio runtime: connections are served concurrently, each in a task of its own, so a
//!   client that connects and never finishes its request delays nobody (the liveness probe's
//!   `/healthz` included). One request per connection (`Connection: close`), a request head
//!   of at most [`MAX_REQUEST_BYTES`] that must arrive within [`IO_TIMEOUT`], a whole
//!   connection bounded by [`CONNECTION_TIMEOUT`], and at most [`MAX_CONNECTIONS`] at once
//!   (more are closed at accept, so stalled clients cannot take the process's descriptors).
//!   `GET /metrics` is the Prometheus text format 0.0.4, or OpenMetrics when `Accept` asks
//!   for it ([`Format::negotiate`]), `GET /healthz` applies [`OpsState::liveness`] (every
//!   shard's executor still goes round), `GET /readyz` applies [`OpsState::readiness`]. Any other path is 404, any other
//!   method 405.
//! - The statistics block ([`StatsBlock`]) is one log event per interval, so with
//!   `LOG_FORMAT=json` it is one JSON object.
//!
//! Submodules by job: `http` (server, routing), `metrics` (the exposition, through
//! prometheus-client, and the catalogue of what is not a shard metric), `ready` (the
//! liveness and readiness rules), `service` (systemd's notifications, and its watchdog on
//! the liveness rule), `stats` (the statistics block). docs/OBSERVABILITY.md lists every
//! metric (a test holds it to [`catalogue`]) and the liveness and readiness rules.

mod http;
mod metrics;
mod ready;
mod service;
mod stats;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use stormgate_buffer::LogStats;
use stormgate_kafka::sink::ProducerStats;
use stormgate_shard::ShardInfo;
use stormgate_telemetry::{ShardMetrics, Totals};
use tracing::info;

pub use http::{CONNECTION_TIMEOUT, IO_TIMEOUT, MAX_CONNECTIONS, MAX_REQUEST_BYTES};
pub use metrics::{Format, LATENCY_BUCKETS_SECONDS, catalogue, render_metrics};
pub use ready::{HEARTBEAT_STALE, STALE_AFTER, STALE_INTERVALS};
pub use service::ServiceManager;
pub use stats::{BufferRates, BufferSample, StatsBlock, StatsSample};

/// What the operations threads read: fixed at startup, then only atomics.
pub struct OpsState {
    shards: Vec<ShardInfo>,
    metrics: Vec<Arc<ShardMetrics>>,
    /// One per shard with the Kafka sink; empty with the null sink.
    producers: Vec<Arc<ProducerStats>>,
    kafka: bool,
    max_connections: usize,
    /// Every open connection has a read timer armed (an idle or line timeout is set).
    timers_per_connection: bool,
    draining: AtomicBool,
    /// With a disk buffer: each shard's log's counters.
    buffers: Vec<Arc<LogStats>>,
}

impl OpsState {
    /// The state of a server whose shards are all listening. `producers` holds each shard's
    /// producer statistics when the sink is Kafka (`kafka`), and nothing otherwise.
    pub fn new(
        shards: Vec<ShardInfo>,
        metrics: Vec<Arc<ShardMetrics>>,
        producers: Vec<Arc<ProducerStats>>,
        kafka: bool,
        max_connections: usize,
        timers_per_connection: bool,
    ) -> OpsState {
        OpsState {
            shards,
            metrics,
            producers,
            kafka,
            max_connections,
            timers_per_connection,
            draining: AtomicBool::new(false),
            buffers: Vec::new(),
        }
    }

    /// With a disk buffer: each shard's log's counters, by shard.
    pub fn with_buffers(mut self, buffers: Vec<Arc<LogStats>>) -> OpsState {
        self.buffers = buffers;
        self
    }

    /// Marks the server as shutting down: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn totals(&self) -> Totals {
        Totals::sum(self.metrics.iter().map(|m| &**m))
    }
}

/// The running operations threads. Dropping it stops them.
pub struct Ops {
    state: Arc<OpsState>,
    http: Option<HttpThread>,
    stats: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

struct HttpThread {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Ops {
    /// Binds the endpoint's listener. Done before the shards start, so that a taken port
    /// fails startup before anything runs.
    pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        TcpListener::bind(addr)
    }

    /// Starts serving `listener` (if any) and logging a statistics block every
    /// `stats_interval` (if not zero).
    pub fn start(
        state: OpsState,
        listener: Option<TcpListener>,
        stats_interval: Duration,
    ) -> io::Result<Ops> {
        let state = Arc::new(state);
        let http = match listener {
            Some(listener) => {
                let addr = listener.local_addr()?;
                listener.set_nonblocking(true)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()?;
                let (stop, stopped) = tokio::sync::oneshot::channel();
                let thread = {
                    let state = Arc::clone(&state);
                    std::thread::Builder::new()
                        .name("ops-http".into())
                        .spawn(move || {
                            let tasks = tokio::task::LocalSet::new();
                            runtime
                                .block_on(tasks.run_until(http::serve(listener, state, stopped)));
                        })?
                };
                info!(%addr, "operations endpoint listening: /metrics /healthz /readyz");
                Some(HttpThread { addr, stop, thread })
            }
            None => None,
        };
        let stats = if stats_interval.is_zero() {
            None
        } else {
            let (tx, rx) = mpsc::channel();
            let state = Arc::clone(&state);
            let thread = std::thread::Builder::new()
                .name("ops-stats".into())
                .spawn(move || stats::log_stats(&state, stats_interval, &rx))?;
            Some((tx, thread))
        };
        Ok(Ops { state, http, stats })
    }

    /// Where the endpoint listens (the actual port when port 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.addr)
    }

    /// What the threads read.
    pub fn state(&self) -> &OpsState {
        &self.state
    }

    /// The same, shared (for the service manager's watchdog).
    pub fn shared_state(&self) -> Arc<OpsState> {
        Arc::clone(&self.state)
    }

    /// Stops both threads and waits for them.
    pub fn stop(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        if let Some((tx, thread)) = self.stats.take() {
            drop(tx);
            let _ = thread.join();
        }
        if let Some(http) = self.http.take() {
            // The accept loop ends; connections still open end with its runtime.
            let _ = http.stop.send(());
            let _ = http.thread.join();
        }
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn shard(id: usize) -> ShardInfo {
        ShardInfo {
            id,
            core: id,
            nr_shards: 2,
        }
    }

    pub(super) fn state(producers: Vec<Arc<ProducerStats>>) -> (OpsState, Vec<Arc<ShardMetrics>>) {
        let metrics: Vec<Arc<ShardMetrics>> =
            (0..2).map(|_| Arc::new(ShardMetrics::default())).collect();
        let kafka = !producers.is_empty();
        let state = OpsState::new(
            vec![shard(0), shard(1)],
            metrics.clone(),
            producers,
            kafka,
            1000,
            true,
        );
        (state, metrics)
    }
}
