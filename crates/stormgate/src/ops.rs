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
//!   `GET /metrics` is the Prometheus text format 0.0.4, `GET /healthz` says the process is
//!   alive, `GET /readyz` applies [`OpsState::readiness`]. Any other path is 404, any other
//!   method 405.
//! - The statistics block ([`StatsBlock`]) is one log event per interval, so with
//!   `LOG_FORMAT=json` it is one JSON object.
//!
//! docs/OBSERVABILITY.md lists every metric and the readiness rules.

use std::cell::Cell;
use std::convert::Infallible;
use std::fmt::{Display, Write as _};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stormgate_buffer::LogStats;
use stormgate_kafka::sink::{ProducerStats, ProducerStatsSnapshot};
use stormgate_protocol::ErrorCode;
use stormgate_shard::ShardInfo;
use stormgate_telemetry::{HistogramSnapshot, LogLimiter, ShardMetrics, Totals};
use tracing::{info, warn};

/// Longest request head (request line and headers) the endpoint reads (hyper's smallest
/// buffer limit); a longer one is answered 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a connection may last, request and answer together: a client that does not take
/// its answer is closed then.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; more are closed as soon as they are accepted. Far above
/// what scrapers and probes open, far below the process's descriptors.
pub const MAX_CONNECTIONS: usize = 512;
/// Producer statistics older than this (or [`STALE_INTERVALS`] intervals, if longer) make a
/// shard not ready: its shard polls its producer at least every 100 ms, so silence this long
/// means the shard or its producer is stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(5);
/// See [`STALE_AFTER`].
pub const STALE_INTERVALS: u32 = 3;
/// Upper bounds of the delivery-latency histogram's buckets, in seconds. The shard histogram
/// behind them has 6.25% resolution, so a bucket may miss values in the last 6.25% below
/// its bound (they are counted in the next one).
pub const LATENCY_BUCKETS_SECONDS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

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

    /// What `/readyz` says besides `ready`: damage the disk buffer found at start, and
    /// producers that are down while the disk buffer holds their records.
    pub fn readiness_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for (shard, b) in self.buffers.iter().enumerate() {
            let quarantined = b.quarantined_records.get();
            let segments = b.segments_quarantined.get();
            if quarantined > 0 || segments > 0 {
                notes.push(format!(
                    "disk buffer of shard {shard}: {segments} damaged segment(s) set aside in                      quarantine/, {quarantined} record(s) lost to damage (stormgate buffer inspect)"
                ));
            }
        }
        if !self.buffers.is_empty() {
            for p in &self.producers {
                if let Err(reason) = producer_readiness(&p.snapshot()) {
                    notes.push(format!("{reason} (records wait in the disk buffer)"));
                }
            }
        }
        notes
    }

    /// Marks the server as shutting down: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// `Ok` when the process should get traffic; otherwise every reason it should not, one
    /// per line.
    ///
    /// Ready means: not shutting down; every shard listening (true from startup, since the
    /// server starts only once every shard accepts, until shutdown); and with Kafka, every
    /// shard's producer reporting statistics recently, connected to at least one broker,
    /// and, when idempotent, holding a producer id. A producer whose statistics are off
    /// (`statistics.interval.ms=0`) is taken on trust.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".to_owned());
        }
        let mut reasons = Vec::new();
        if self.kafka && self.producers.len() < self.shards.len() {
            reasons.push(format!(
                "{} of {} shards have a producer",
                self.producers.len(),
                self.shards.len()
            ));
        }
        // With a disk buffer a broker outage is absorbed on disk: the process still takes
        // traffic (the producers' state is a note), unless its storage fails.
        if self.buffers.is_empty() {
            for p in &self.producers {
                if let Err(reason) = producer_readiness(&p.snapshot()) {
                    reasons.push(reason);
                }
            }
        }
        for (shard, b) in self.buffers.iter().enumerate() {
            let errno = b.last_storage_errno.get();
            if errno != 0 {
                reasons.push(format!(
                    "disk buffer of shard {shard}: storage failing ({})",
                    std::io::Error::from_raw_os_error(errno as i32)
                ));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("\n"))
        }
    }

    fn totals(&self) -> Totals {
        Totals::sum(self.metrics.iter().map(|m| &**m))
    }
}

fn producer_readiness(s: &ProducerStatsSnapshot) -> Result<(), String> {
    let shard = s.shard_id;
    if s.interval.is_zero() {
        return Ok(());
    }
    let stale = STALE_AFTER.max(s.interval * STALE_INTERVALS);
    match s.age {
        None => return Err(format!("shard {shard}: no producer statistics yet")),
        Some(age) if age > stale => {
            return Err(format!(
                "shard {shard}: no producer statistics for {:.1} s",
                age.as_secs_f64()
            ));
        }
        Some(_) => {}
    }
    if s.brokers_up == 0 {
        return Err(format!(
            "shard {shard}: producer not connected to any broker ({} known)",
            s.brokers_down
        ));
    }
    if s.idempotent && s.producer_id.is_none() {
        return Err(format!(
            "shard {shard}: idempotent producer has no producer id yet"
        ));
    }
    Ok(())
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
                            runtime.block_on(tasks.run_until(serve(listener, state, stopped)));
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
                .spawn(move || log_stats(&state, stats_interval, &rx))?;
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

/// Accepts connections until `stopped`, each served by a task of its own (on this thread's
/// `LocalSet`).
async fn serve(
    listener: TcpListener,
    state: Arc<OpsState>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let errors = Rc::new(LogLimiter::new(Duration::from_secs(10)));
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(error) => {
            warn!(%error, "operations endpoint: cannot serve its listener");
            return;
        }
    };
    let open = Rc::new(Cell::new(0usize));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stopped => return,
        };
        match accepted {
            Ok((stream, _)) => {
                if open.get() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                open.set(open.get() + 1);
                let (state, open, errors) =
                    (Arc::clone(&state), Rc::clone(&open), Rc::clone(&errors));
                tokio::task::spawn_local(async move {
                    serve_connection(stream, state, &errors).await;
                    open.set(open.get() - 1);
                });
            }
            Err(error) => {
                // Out of descriptors, most likely: back off instead of spinning on it.
                if let Some(suppressed) = errors.allow(Instant::now()) {
                    warn!(%error, suppressed, "operations endpoint: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Serves one connection: one request, one response, close; all within
/// [`CONNECTION_TIMEOUT`].
async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: Arc<OpsState>,
    errors: &LogLimiter,
) {
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        let response = respond(request.method().as_str(), request.uri().path(), &state);
        async move { Ok::<_, Infallible>(response.into_hyper()) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT)
        .keep_alive(false)
        // Header names as the former server wrote them (and as scripts may grep for them).
        .title_case_headers(true)
        .max_buf_size(MAX_REQUEST_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Err(error)) if !quiet(&error) => {
            if let Some(suppressed) = errors.allow(Instant::now()) {
                warn!(%error, suppressed, "operations endpoint: request failed");
            }
        }
        _ => {}
    }
}

/// Connection errors not worth a warning: a TCP-only probe that connects and leaves, a
/// client that stalls until the header timeout.
fn quiet(error: &hyper::Error) -> bool {
    error.is_incomplete_message() || error.is_timeout() || error.is_closed()
}

/// The response to `method path`.
fn respond(method: &str, path: &str, state: &OpsState) -> Response {
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::text(404, "not found: try /metrics, /healthz or /readyz\n");
    }
    if method != "GET" {
        return Response::text(405, "only GET\n").header("Allow", "GET");
    }
    match path {
        "/metrics" => {
            let mut body = String::with_capacity(16 * 1024);
            render_metrics(state, &mut body);
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                extra: None,
                body,
            }
        }
        "/healthz" => Response::text(200, "ok\n"),
        _ => match state.readiness() {
            Ok(()) => {
                let mut body = String::from("ready\n");
                for note in state.readiness_notes() {
                    let _ = writeln!(body, "note: {note}");
                }
                Response::text(200, &body)
            }
            Err(reasons) => Response::text(503, &format!("not ready: {reasons}\n")),
        },
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    extra: Option<(&'static str, &'static str)>,
    body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: None,
            body: body.to_owned(),
        }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Response {
        self.extra = Some((name, value));
        self
    }

    fn into_hyper(self) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
        let mut response = hyper::Response::builder()
            .status(self.status)
            .header("Content-Type", self.content_type)
            .header("Cache-Control", "no-store")
            .header("Connection", "close");
        if let Some((name, value)) = self.extra {
            response = response.header(name, value);
        }
        response
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                self.body,
            )))
            .expect("static header names and values are valid")
    }
}

/// A per-shard counter or gauge read straight from [`ShardMetrics`].
type ShardValue = fn(&ShardMetrics) -> i64;

/// Counters: `(name, help, read)`. Every name ends in `_total`.
const SHARD_COUNTERS: &[(&str, &str, ShardValue)] = &[
    (
        "stormgate_connections_accepted_total",
        "Station connections accepted.",
        |m| m.connections_accepted.get() as i64,
    ),
    (
        "stormgate_connections_closed_total",
        "Station connections closed, by either side.",
        |m| m.connections_closed.get() as i64,
    ),
    (
        "stormgate_connections_rejected_total",
        "Connections refused at accept because a connection limit was reached.",
        |m| m.connections_rejected.get() as i64,
    ),
    (
        "stormgate_connection_panics_total",
        "Connection tasks that panicked (bugs); each closed only its connection.",
        |m| m.connection_panics.get() as i64,
    ),
    (
        "stormgate_idle_timeouts_total",
        "Connections closed because the station sent nothing for TCP_IDLE_TIMEOUT.",
        |m| m.idle_timeouts.get() as i64,
    ),
    (
        "stormgate_line_timeouts_total",
        "Connections closed because a line stayed incomplete past TCP_LINE_TIMEOUT.",
        |m| m.line_timeouts.get() as i64,
    ),
    (
        "stormgate_lines_received_total",
        "Non-blank lines read from stations.",
        |m| m.lines_received.get() as i64,
    ),
    (
        "stormgate_bytes_received_total",
        "Bytes read from station sockets.",
        |m| m.bytes_received.get() as i64,
    ),
    (
        "stormgate_records_enqueued_total",
        "Metrics records put in the shard queue (dead letters are counted apart).",
        |m| m.records_enqueued.get() as i64,
    ),
    (
        "stormgate_records_produced_total",
        "Metrics records the sink handed to its producer.",
        |m| m.records_produced.get() as i64,
    ),
    (
        "stormgate_records_delivered_total",
        "Metrics records whose delivery was acknowledged.",
        |m| m.records_delivered.get() as i64,
    ),
    (
        "stormgate_records_failed_total",
        "Metrics records whose delivery finally failed.",
        |m| m.records_failed.get() as i64,
    ),
    (
        "stormgate_records_spilled_total",
        "Failed records written to the shard's spill file.",
        |m| m.records_spilled.get() as i64,
    ),
    (
        "stormgate_settle_errors_total",
        "Settlements of a record already settled or unknown: a bug, always 0.",
        |m| m.settle_errors.get() as i64,
    ),
    (
        "stormgate_spill_failures_total",
        "Failed records the spill file could not take either: lost.",
        |m| m.spill_failures.get() as i64,
    ),
    (
        "stormgate_dead_letters_enqueued_total",
        "Dead-letter records (rejected lines, KAFKA_DLQ_TOPIC) put in the shard queue.",
        |m| m.dead_letters_enqueued.get() as i64,
    ),
    (
        "stormgate_dead_letters_delivered_total",
        "Dead-letter records delivered.",
        |m| m.dead_letters_delivered.get() as i64,
    ),
    (
        "stormgate_dead_letters_failed_total",
        "Dead-letter records whose delivery finally failed.",
        |m| m.dead_letters_failed.get() as i64,
    ),
    (
        "stormgate_backpressure_waits_total",
        "Times a connection stopped reading because the queue or its in-flight cap was full.",
        |m| m.backpressure_waits.get() as i64,
    ),
    (
        "stormgate_rate_limited_waits_total",
        "Times a connection waited because it sent lines faster than TCP_MAX_LINES_PER_SEC.",
        |m| m.rate_limited_waits.get() as i64,
    ),
    (
        "stormgate_tls_handshakes_total",
        "TLS handshakes completed on the station listener.",
        |m| m.tls_handshakes.get() as i64,
    ),
    (
        "stormgate_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out; each closed its connection.",
        |m| m.tls_handshake_failures.get() as i64,
    ),
];

/// Gauges: `(name, help, read)`.
const SHARD_GAUGES: &[(&str, &str, ShardValue)] = &[
    (
        "stormgate_connections_active",
        "Station connections open now.",
        |m| m.connections_active.get(),
    ),
    (
        "stormgate_queue_depth",
        "Records waiting in the shard queue (refreshed every 20 ms).",
        |m| m.queue_depth.get(),
    ),
    (
        "stormgate_records_in_flight",
        "Records taken from stations and not yet settled: queue plus producer (every 20 ms).",
        |m| m.records_in_flight.get(),
    ),
    (
        "stormgate_producer_in_flight_records",
        "Records handed to the producer and not yet settled (in flight minus queue depth).",
        |m| (m.records_in_flight.get() - m.queue_depth.get()).max(0),
    ),
];

/// Writes every metric in the Prometheus text format 0.0.4.
pub fn render_metrics(state: &OpsState, out: &mut String) {
    let mut p = Prom { out };
    let shard_label: Vec<String> = state.shards.iter().map(|s| s.id.to_string()).collect();
    let shards = || state.metrics.iter().zip(&shard_label);

    for &(name, help, read) in SHARD_COUNTERS {
        p.family(name, "counter", help);
        for (m, shard) in shards() {
            p.sample(name, &[("shard", shard)], read(m));
        }
    }
    for &(name, help, read) in SHARD_GAUGES {
        p.family(name, "gauge", help);
        for (m, shard) in shards() {
            p.sample(name, &[("shard", shard)], read(m));
        }
    }
    let name = "stormgate_line_errors_total";
    p.family(
        name,
        "counter",
        "Rejected lines, by error code (docs/PROTOCOL.md).",
    );
    for (m, shard) in shards() {
        for code in ErrorCode::ALL {
            let n = m.line_errors[code as usize].get();
            p.sample(name, &[("shard", shard), ("code", code.as_str())], n);
        }
    }
    render_latency(&mut p, state, &shard_label);

    let totals = state.totals();
    p.gauge(
        "stormgate_unique_zipcodes",
        "Distinct zipcodes that identified since start, all shards (HyperLogLog estimate, ~1.6% error).",
        totals.unique_zipcodes(),
    );
    p.gauge(
        "stormgate_connections_limit",
        "Most station connections open at once, all shards (TCP_MAX_CONNECTIONS).",
        state.max_connections,
    );
    p.gauge("stormgate_shards", "Shards running.", state.shards.len());
    p.gauge(
        "stormgate_ready",
        "1 when /readyz answers 200, else 0.",
        u8::from(state.readiness().is_ok()),
    );
    if !state.producers.is_empty() {
        render_producers(&mut p, state);
    }
    if !state.buffers.is_empty() {
        render_buffers(&mut p, state);
    }
}

/// The disk buffer's families, per shard (`BUFFER_TYPE=disk` only).
fn render_buffers(p: &mut Prom<'_>, state: &OpsState) {
    type Read = fn(&LogStats) -> u64;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let gauges: [(&str, &str, Read); 4] = [
        (
            "stormgate_buffer_bytes",
            "Bytes the disk buffer's files occupy (segments at their preallocated size).",
            |b| b.disk_bytes.get().max(0) as u64,
        ),
        (
            "stormgate_buffer_records",
            "Records in the disk buffer not yet delivered.",
            |b| b.records.get().max(0) as u64,
        ),
        (
            "stormgate_buffer_segments",
            "Segment files in the disk buffer.",
            |b| b.segments.get().max(0) as u64,
        ),
        (
            "stormgate_buffer_storage_errno",
            "OS error code of the disk buffer's last storage error (28 ENOSPC, 5 EIO), 0 once writes succeed.",
            |b| b.last_storage_errno.get().max(0) as u64,
        ),
    ];
    let counters: [(&str, &str, Read); 12] = [
        (
            "stormgate_buffer_appended_records_total",
            "Records written to the disk buffer.",
            |b| b.appended_records.get(),
        ),
        (
            "stormgate_buffer_written_bytes_total",
            "Bytes written to the disk buffer's segment files.",
            |b| b.bytes_written.get(),
        ),
        (
            "stormgate_buffer_fsyncs_total",
            "fdatasync calls of the disk buffer.",
            |b| b.fsyncs.get(),
        ),
        (
            "stormgate_buffer_flushes_total",
            "Group commits of the disk buffer (writes and the fdatasync covering them).",
            |b| b.flushes.get(),
        ),
        (
            "stormgate_buffer_replayed_records_total",
            "Records the producer was fed from disk (not from memory): after an outage or a restart.",
            |b| b.read_disk_records.get(),
        ),
        (
            "stormgate_buffer_memory_records_total",
            "Records the producer was fed from memory.",
            |b| b.read_memory_records.get(),
        ),
        (
            "stormgate_buffer_quarantined_records_total",
            "Valid records lost to damage found in the disk buffer.",
            |b| b.quarantined_records.get(),
        ),
        (
            "stormgate_buffer_quarantined_segments_total",
            "Damaged segments moved aside to quarantine/.",
            |b| b.segments_quarantined.get(),
        ),
        (
            "stormgate_buffer_torn_tails_total",
            "Torn tails cut at start (the normal trace of a crash).",
            |b| b.torn_tails.get(),
        ),
        (
            "stormgate_buffer_full_events_total",
            "Appends refused because the buffer held BUFFER_MAX_BYTES.",
            |b| b.full_events.get(),
        ),
        (
            "stormgate_buffer_storage_errors_total",
            "Storage errors of the disk buffer (write, fdatasync, file creation, checkpoint).",
            |b| b.storage_errors.get(),
        ),
        (
            "stormgate_buffer_checkpoints_total",
            "Delivered watermarks made durable.",
            |b| b.checkpoints.get(),
        ),
    ];
    let shards: Vec<String> = (0..state.buffers.len()).map(|i| i.to_string()).collect();
    for (name, help, read) in gauges {
        p.family(name, "gauge", help);
        for (b, shard) in state.buffers.iter().zip(&shards) {
            p.sample(name, &[("shard", shard)], read(b));
        }
    }
    let name = "stormgate_buffer_oldest_record_age_seconds";
    p.family(
        name,
        "gauge",
        "Age of the oldest record in the disk buffer not yet delivered, 0 if none.",
    );
    for (b, shard) in state.buffers.iter().zip(&shards) {
        let oldest = b.oldest_timestamp_ms.get();
        let age = if oldest > 0 {
            (now_ms - oldest).max(0) as f64 / 1e3
        } else {
            0.0
        };
        p.sample(name, &[("shard", shard)], age);
    }
    for (name, help, read) in counters {
        p.family(name, "counter", help);
        for (b, shard) in state.buffers.iter().zip(&shards) {
            p.sample(name, &[("shard", shard)], read(b));
        }
    }
    type Hist = fn(&LogStats) -> &stormgate_telemetry::LatencyHistogram;
    let histograms: [(&str, &str, Hist); 2] = [
        (
            "stormgate_buffer_fsync_seconds",
            "Duration of each fdatasync of a disk buffer segment.",
            |b| &b.fsync_latency,
        ),
        (
            "stormgate_buffer_durable_seconds",
            "Append to durable: the group-commit wait plus the flush, per flush's oldest record.",
            |b| &b.durable_latency,
        ),
    ];
    for (name, help, read) in histograms {
        let shards = state.buffers.iter().zip(&shards);
        p.histogram(
            name,
            help,
            shards.map(|(b, shard)| (shard.as_str(), read(b).snapshot())),
        );
    }
}

fn render_latency(p: &mut Prom<'_>, state: &OpsState, shard_label: &[String]) {
    let shards = state.metrics.iter().zip(shard_label);
    p.histogram(
        "stormgate_delivery_latency_seconds",
        "Line read to settlement (delivered or failed), per metrics record.",
        shards.map(|(m, shard)| (shard.as_str(), m.delivery_latency.snapshot())),
    );
}

fn render_producers(p: &mut Prom<'_>, state: &OpsState) {
    let stats: Vec<(String, ProducerStatsSnapshot)> = state
        .producers
        .iter()
        .map(|s| s.snapshot())
        .map(|s| (s.shard_id.to_string(), s))
        .collect();
    type Read = fn(&ProducerStatsSnapshot) -> f64;
    let families: [(&str, &str, &str, Read); 6] = [
        (
            "stormgate_kafka_broker_rtt_seconds",
            "gauge",
            "Mean broker round-trip time over the last statistics interval with requests.",
            |s| s.rtt_avg.as_secs_f64(),
        ),
        (
            "stormgate_kafka_tx_bytes_total",
            "counter",
            "Bytes the producer sent to brokers (librdkafka tx_bytes).",
            |s| s.tx_bytes as f64,
        ),
        (
            "stormgate_kafka_tx_retries_total",
            "counter",
            "Requests the producer sent again (librdkafka txretries, all brokers).",
            |s| s.tx_retries as f64,
        ),
        (
            "stormgate_kafka_producer_queue_records",
            "gauge",
            "Records in librdkafka's queues, not yet acknowledged (msg_cnt).",
            |s| s.queue_records as f64,
        ),
        (
            "stormgate_kafka_producer_queue_bytes",
            "gauge",
            "Bytes of those records (msg_size).",
            |s| s.queue_bytes as f64,
        ),
        (
            "stormgate_kafka_statistics_age_seconds",
            "gauge",
            "Time since the producer's last statistics report (-1 before the first).",
            |s| s.age.map_or(-1.0, |a| a.as_secs_f64()),
        ),
    ];
    for (name, kind, help, read) in families {
        p.family(name, kind, help);
        for (shard, s) in &stats {
            p.sample(name, &[("shard", shard)], read(s));
        }
    }
    let name = "stormgate_kafka_brokers";
    p.family(
        name,
        "gauge",
        "Brokers the producer knows, by connection state: up (usable) or down (any other).",
    );
    for (shard, s) in &stats {
        p.sample(name, &[("shard", shard), ("state", "up")], s.brokers_up);
        p.sample(name, &[("shard", shard), ("state", "down")], s.brokers_down);
    }
}

/// Writes the text format: HELP and TYPE once per family, then its samples.
struct Prom<'a> {
    out: &'a mut String,
}

impl Prom<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A histogram family in seconds from microsecond histograms, one per shard: the
    /// buckets of [`LATENCY_BUCKETS_SECONDS`], `+Inf`, `_sum` and `_count`, each shard's from
    /// one copy so that they never disagree.
    fn histogram<'s>(
        &mut self,
        name: &str,
        help: &str,
        shards: impl Iterator<Item = (&'s str, HistogramSnapshot)>,
    ) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (shard, h) in shards {
            for le in LATENCY_BUCKETS_SECONDS {
                let n = h.count_at_most((le * 1e6) as u64);
                self.sample(&bucket, &[("shard", shard), ("le", &le.to_string())], n);
            }
            let count = h.count_at_most(u64::MAX);
            self.sample(&bucket, &[("shard", shard), ("le", "+Inf")], count);
            let sum = h.sum_micros() as f64 / 1e6;
            self.sample(&format!("{name}_sum"), &[("shard", shard)], sum);
            self.sample(&format!("{name}_count"), &[("shard", shard)], count);
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// What the statistics block compares: the shards' counters at one moment.
#[derive(Debug, Clone)]
pub struct StatsSample {
    /// When it was taken.
    pub at: Instant,
    /// All shards summed.
    pub totals: Totals,
    /// Each shard's queue depth, by shard id.
    pub queue_depth: Vec<i64>,
    /// With a disk buffer: its counters, all shards summed.
    pub buffer: Option<BufferSample>,
}

/// The disk buffer's counters at one moment, all shards summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BufferSample {
    /// Records not yet delivered.
    pub records: i64,
    /// Bytes of its files.
    pub bytes: i64,
    /// Timestamp (ms since the epoch) of the oldest record not yet delivered, 0 if none.
    pub oldest_ms: i64,
    /// Bytes written to segments since start.
    pub written_bytes: u64,
    /// fdatasync calls since start.
    pub fsyncs: u64,
    /// Records fed to the producer from disk since start.
    pub replayed: u64,
}

impl BufferSample {
    fn take(buffers: &[Arc<LogStats>]) -> Option<BufferSample> {
        if buffers.is_empty() {
            return None;
        }
        let mut s = BufferSample::default();
        for b in buffers {
            s.records += b.records.get();
            s.bytes += b.disk_bytes.get();
            let oldest = b.oldest_timestamp_ms.get();
            if oldest > 0 && (s.oldest_ms == 0 || oldest < s.oldest_ms) {
                s.oldest_ms = oldest;
            }
            s.written_bytes += b.bytes_written.get();
            s.fsyncs += b.fsyncs.get();
            s.replayed += b.read_disk_records.get();
        }
        Some(s)
    }
}

impl StatsSample {
    /// Reads the shards now.
    pub fn take(state: &OpsState) -> StatsSample {
        StatsSample {
            at: Instant::now(),
            totals: state.totals(),
            queue_depth: state.metrics.iter().map(|m| m.queue_depth.get()).collect(),
            buffer: BufferSample::take(&state.buffers),
        }
    }
}

/// The disk buffer's part of a statistics block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferRates {
    /// Records in the buffer now.
    pub records: i64,
    /// Bytes of its files now.
    pub bytes: i64,
    /// Age of its oldest undelivered record now, in seconds (0 if none).
    pub oldest_age_s: f64,
    /// Bytes written per second over the interval.
    pub written_bytes_per_sec: f64,
    /// fdatasync calls per second over the interval.
    pub fsyncs_per_sec: f64,
    /// Records fed from disk per second over the interval.
    pub replayed_per_sec: f64,
}

/// One statistics block: the state now and the rates over the interval since the last.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsBlock {
    /// The interval the rates are over.
    pub interval: Duration,
    /// Station connections open now.
    pub connections_active: i64,
    /// The connection limit.
    pub connections_max: usize,
    /// Distinct zipcodes that identified since start (an estimate within ~1.6%).
    pub unique_zipcodes: u64,
    /// Connections with a read deadline armed: every open connection waits in a read that
    /// its shard expires at the idle timeout (or earlier at the line timeout), so with either
    /// timeout set this is the open connections (with only a line timeout, an upper bound:
    /// only those holding a partial line have one), and zero with neither.
    pub scheduled_timers: i64,
    /// Lines received per second over the interval.
    pub lines_per_sec: f64,
    /// Records delivered per second over the interval.
    pub records_delivered_per_sec: f64,
    /// Records whose delivery failed during the interval.
    pub delivery_failures: u64,
    /// Records whose delivery failed since start.
    pub delivery_failures_total: u64,
    /// Each shard's queue depth now, by shard id.
    pub queue_depth: Vec<i64>,
    /// With a disk buffer: its state now and its rates.
    pub buffer: Option<BufferRates>,
}

impl StatsBlock {
    /// The block for the interval from `prev` to `cur`.
    pub fn between(
        prev: &StatsSample,
        cur: &StatsSample,
        connections_max: usize,
        timers_per_connection: bool,
    ) -> StatsBlock {
        let interval = cur.at.saturating_duration_since(prev.at);
        let secs = interval.as_secs_f64();
        let rate = |a: u64, b: u64| {
            if secs > 0.0 {
                (b.saturating_sub(a) as f64 / secs * 10.0).round() / 10.0
            } else {
                0.0
            }
        };
        let (p, c) = (&prev.totals, &cur.totals);
        StatsBlock {
            interval,
            connections_active: c.connections_active,
            connections_max,
            unique_zipcodes: c.unique_zipcodes(),
            scheduled_timers: if timers_per_connection {
                c.connections_active
            } else {
                0
            },
            lines_per_sec: rate(p.lines_received, c.lines_received),
            records_delivered_per_sec: rate(p.records_delivered, c.records_delivered),
            delivery_failures: c.records_failed.saturating_sub(p.records_failed),
            delivery_failures_total: c.records_failed,
            queue_depth: cur.queue_depth.clone(),
            buffer: cur.buffer.map(|b| {
                let before = prev.buffer.unwrap_or_default();
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                BufferRates {
                    records: b.records,
                    bytes: b.bytes,
                    oldest_age_s: if b.oldest_ms > 0 {
                        (now_ms - b.oldest_ms).max(0) as f64 / 1e3
                    } else {
                        0.0
                    },
                    written_bytes_per_sec: rate(before.written_bytes, b.written_bytes),
                    fsyncs_per_sec: rate(before.fsyncs, b.fsyncs),
                    replayed_per_sec: rate(before.replayed, b.replayed),
                }
            }),
        }
    }

    /// Logs the block as one event (one JSON object with `LOG_FORMAT=json`).
    pub fn log(&self) {
        info!(
            target: "stormgate::stats",
            interval_s = (self.interval.as_secs_f64() * 1000.0).round() / 1000.0,
            connections_active = self.connections_active,
            connections_max = self.connections_max,
            unique_zipcodes = self.unique_zipcodes,
            scheduled_timers = self.scheduled_timers,
            lines_per_sec = self.lines_per_sec,
            records_delivered_per_sec = self.records_delivered_per_sec,
            delivery_failures = self.delivery_failures,
            delivery_failures_total = self.delivery_failures_total,
            queue_depth = %QueueDepths(&self.queue_depth),
            "statistics"
        );
        if let Some(b) = &self.buffer {
            info!(
                target: "stormgate::stats",
                buffer_records = b.records,
                buffer_bytes = b.bytes,
                buffer_oldest_age_s = b.oldest_age_s,
                buffer_written_bytes_per_sec = b.written_bytes_per_sec,
                buffer_fsyncs_per_sec = b.fsyncs_per_sec,
                buffer_replayed_per_sec = b.replayed_per_sec,
                "statistics: disk buffer"
            );
        }
    }
}

/// Per-shard queue depths as `0:12 1:0`, shard by shard.
struct QueueDepths<'a>(&'a [i64]);

impl Display for QueueDepths<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (shard, depth) in self.0.iter().enumerate() {
            if shard > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{shard}:{depth}")?;
        }
        Ok(())
    }
}

/// Logs a [`StatsBlock`] every `interval` until `stop` is signalled (or dropped).
fn log_stats(state: &OpsState, interval: Duration, stop: &mpsc::Receiver<()>) {
    let mut prev = StatsSample::take(state);
    let mut next = prev.at + interval;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let cur = StatsSample::take(state);
        StatsBlock::between(
            &prev,
            &cur,
            state.max_connections,
            state.timers_per_connection,
        )
        .log();
        prev = cur;
        // Keep the cadence; after a long stall, start afresh rather than catch up.
        next = (next + interval).max(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn shard(id: usize) -> ShardInfo {
        ShardInfo {
            id,
            core: id,
            nr_shards: 2,
        }
    }

    fn state(producers: Vec<Arc<ProducerStats>>) -> (OpsState, Vec<Arc<ShardMetrics>>) {
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

    /// Parses the text format into `sample -> value`, checking the format's rules on the way:
    /// every sample belongs to a family announced by HELP and TYPE, in that order, once.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut families: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        let mut help = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!families.contains_key(name), "{name} announced twice");
                help = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(help.as_deref(), Some(name), "TYPE without HELP: {line}");
                assert!(name.starts_with("stormgate_"), "{name}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
                families.insert(name.to_owned(), kind.to_owned());
            } else {
                let (sample, value) = line.rsplit_once(' ').unwrap();
                let name = sample.split('{').next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|f| families.get(*f).is_some_and(|k| k == "histogram"))
                    .unwrap_or(name);
                assert!(families.contains_key(family), "sample without TYPE: {line}");
                let v = if value == "+Inf" {
                    f64::INFINITY
                } else {
                    value.parse().unwrap()
                };
                assert!(samples.insert(sample.to_owned(), v).is_none(), "{line}");
            }
        }
        samples
    }

    #[test]
    fn metrics_are_valid_text_format_and_read_the_shards() {
        let (state, m) = state(Vec::new());
        m[0].lines_received.add(7);
        m[1].lines_received.add(5);
        m[1].line_error(ErrorCode::MalformedJson);
        m[0].connections_active.add(3);
        m[0].records_in_flight.set(10);
        m[0].queue_depth.set(4);
        m[0].zipcodes.insert(b"12345");
        m[1].zipcodes.insert(b"12345");
        m[1].zipcodes.insert(b"54321");
        for us in [200, 800, 3_000, 2_000_000] {
            m[1].delivery_latency.record_micros(us);
        }
        let mut text = String::new();
        render_metrics(&state, &mut text);
        let s = parse(&text);
        assert_eq!(s[r#"stormgate_lines_received_total{shard="0"}"#], 7.0);
        assert_eq!(s[r#"stormgate_lines_received_total{shard="1"}"#], 5.0);
        assert_eq!(
            s[r#"stormgate_line_errors_total{shard="1",code="malformed_json"}"#],
            1.0
        );
        assert_eq!(
            s[r#"stormgate_line_errors_total{shard="0",code="malformed_json"}"#],
            0.0
        );
        assert_eq!(s[r#"stormgate_connections_active{shard="0"}"#], 3.0);
        assert_eq!(s[r#"stormgate_producer_in_flight_records{shard="0"}"#], 6.0);
        assert_eq!(s["stormgate_unique_zipcodes"], 2.0);
        assert_eq!(s["stormgate_ready"], 1.0);
        let bucket = |shard: u8, le: &str| {
            s[&format!(r#"stormgate_delivery_latency_seconds_bucket{{shard="{shard}",le="{le}"}}"#)]
        };
        assert_eq!(bucket(1, "0.0005"), 1.0);
        assert_eq!(bucket(1, "0.001"), 2.0);
        assert_eq!(bucket(1, "0.005"), 3.0);
        assert_eq!(bucket(1, "1"), 3.0);
        assert_eq!(bucket(1, "2.5"), 4.0);
        assert_eq!(bucket(1, "+Inf"), 4.0);
        assert_eq!(bucket(0, "+Inf"), 0.0);
        assert_eq!(
            s[r#"stormgate_delivery_latency_seconds_count{shard="1"}"#],
            4.0
        );
        let sum = s[r#"stormgate_delivery_latency_seconds_sum{shard="1"}"#];
        assert!((sum - 2.004).abs() < 1e-9, "{sum}");
        assert!(
            !text.contains("stormgate_kafka_"),
            "no producers, no kafka metrics"
        );
    }

    #[test]
    fn buckets_are_cumulative() {
        let (state, m) = state(Vec::new());
        for us in (0..5_000_000).step_by(997) {
            m[0].delivery_latency.record_micros(us);
        }
        let mut text = String::new();
        render_metrics(&state, &mut text);
        let s = parse(&text);
        let mut last = 0.0;
        for le in LATENCY_BUCKETS_SECONDS {
            let n =
                s[&format!(r#"stormgate_delivery_latency_seconds_bucket{{shard="0",le="{le}"}}"#)];
            assert!(n >= last, "le {le}: {n} < {last}");
            last = n;
        }
    }

    const UP: &str = r#"{"msg_cnt": 3, "tx_bytes": 1000, "brokers": {"b/1": {"source": "learned",
        "state": "UP", "txretries": 1, "rtt": {"avg": 2500, "cnt": 2}}},
        "eos": {"idemp_state": "Assigned", "producer_id": 7}}"#;

    fn producer(shard: usize, report: Option<&str>) -> Arc<ProducerStats> {
        let p = Arc::new(ProducerStats::new(shard, true, Duration::from_secs(1)));
        if let Some(r) = report {
            p.update(r.as_bytes()).unwrap();
        }
        p
    }

    #[test]
    fn readiness_needs_every_producer_connected_with_an_id() {
        let (ready, _) = state(vec![producer(0, Some(UP)), producer(1, Some(UP))]);
        assert_eq!(ready.readiness(), Ok(()));

        let down = UP.replace(r#""state": "UP""#, r#""state": "CONNECT""#);
        let waiting = UP.replace("Assigned", "WaitPID");
        for (report, reason) in [
            (None, "shard 1: no producer statistics yet"),
            (
                Some(down.as_str()),
                "shard 1: producer not connected to any broker (1 known)",
            ),
            (
                Some(waiting.as_str()),
                "shard 1: idempotent producer has no producer id yet",
            ),
        ] {
            let (s, _) = state(vec![producer(0, Some(UP)), producer(1, report)]);
            assert_eq!(s.readiness(), Err(reason.to_owned()));
        }

        let (missing, _) = state(vec![producer(0, Some(UP))]);
        assert_eq!(
            missing.readiness(),
            Err("1 of 2 shards have a producer".to_owned())
        );
        ready.set_draining();
        assert_eq!(ready.readiness(), Err("shutting down".to_owned()));
    }

    #[test]
    fn kafka_metrics_come_from_producer_statistics() {
        let (s, _) = state(vec![producer(0, Some(UP)), producer(1, None)]);
        let mut text = String::new();
        render_metrics(&s, &mut text);
        let m = parse(&text);
        assert_eq!(
            m[r#"stormgate_kafka_broker_rtt_seconds{shard="0"}"#],
            0.0025
        );
        assert_eq!(m[r#"stormgate_kafka_tx_bytes_total{shard="0"}"#], 1000.0);
        assert_eq!(m[r#"stormgate_kafka_tx_retries_total{shard="0"}"#], 1.0);
        assert_eq!(
            m[r#"stormgate_kafka_producer_queue_records{shard="0"}"#],
            3.0
        );
        assert_eq!(m[r#"stormgate_kafka_brokers{shard="0",state="up"}"#], 1.0);
        assert_eq!(m[r#"stormgate_kafka_brokers{shard="1",state="up"}"#], 0.0);
        assert_eq!(
            m[r#"stormgate_kafka_statistics_age_seconds{shard="1"}"#],
            -1.0
        );
        assert_eq!(m["stormgate_ready"], 0.0);
    }

    /// Sends `request` as is to a running endpoint and returns the whole answer ("" when the
    /// server closed without one).
    fn exchange(addr: SocketAddr, request: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn requests_are_routed() {
        let (s, _) = state(Vec::new());
        let listener = Ops::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let ops = Ops::start(s, Some(listener), Duration::ZERO).unwrap();
        let status = |request: &str| {
            let out = exchange(addr, request);
            out.split_whitespace()
                .nth(1)
                .map_or(0, |c| c.parse().unwrap())
        };
        assert_eq!(status("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
        assert_eq!(status("GET /healthz HTTP/1.0\r\n\r\n"), 200);
        assert_eq!(status("GET /readyz?verbose=1 HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(status("GET /nope HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status("POST /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("HEAD /healthz HTTP/1.1\r\n\r\n"), 405);
        assert_ne!(status("GET /metrics SPDY/3\r\n\r\n"), 200);
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(status(&huge), 431);
        let out = exchange(addr, "PUT /readyz HTTP/1.1\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{out}"
        );
        assert!(out.contains("\r\nAllow: GET\r\n"), "{out}");
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        assert!(out.contains("\r\nCache-Control: no-store\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nonly GET\n"), "{out}");
        let out = exchange(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            out.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{out}"
        );
        ops.stop();
    }

    #[test]
    fn the_stats_block_is_rates_over_the_interval() {
        let (state, m) = state(Vec::new());
        let t0 = Instant::now();
        let mut prev = StatsSample::take(&state);
        prev.at = t0;
        m[0].lines_received.add(3_000);
        m[1].lines_received.add(1_000);
        m[0].records_delivered.add(2_000);
        m[1].records_failed.add(5);
        m[0].connections_active.add(2);
        m[1].connections_active.add(1);
        m[1].queue_depth.set(17);
        m[0].zipcodes.insert(b"1");
        m[1].zipcodes.insert(b"2");
        let mut cur = StatsSample::take(&state);
        cur.at = t0 + Duration::from_secs(2);
        let block = StatsBlock::between(&prev, &cur, 1000, true);
        assert_eq!(
            block,
            StatsBlock {
                interval: Duration::from_secs(2),
                connections_active: 3,
                connections_max: 1000,
                unique_zipcodes: 2,
                scheduled_timers: 3,
                lines_per_sec: 2_000.0,
                records_delivered_per_sec: 1_000.0,
                delivery_failures: 5,
                delivery_failures_total: 5,
                queue_depth: vec![0, 17],
                buffer: None,
            }
        );
        assert_eq!(QueueDepths(&block.queue_depth).to_string(), "0:0 1:17");
        assert_eq!(
            StatsBlock::between(&cur, &cur, 1000, false).scheduled_timers,
            0
        );
    }
}
