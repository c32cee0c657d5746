//! Wiring: choose the sink, start the shards and the operations threads, wait for a signal,
//! drain, report; and the `replay` command.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use stormgate_kafka::sink::ProducerStatsByShard;
use stormgate_kafka::spill::{self, ReplayOptions, ReplayReport};
use stormgate_kafka::{EmbeddedCluster, KafkaSink, KafkaSinkFactory};
use stormgate_shard::{
    NullSink, NullSinkFactory, RecordReceiver, Server, ServerHandle, ShardInfo, Sink, SinkContext,
    SinkFactory, StationAuth, StationTls,
};
use stormgate_telemetry::Totals;
use tracing::{info, warn};

use crate::cli::{Cli, SinkKind, StationAuthMode};
use crate::ops::{Ops, OpsState, ServiceManager};
use crate::registry;
use crate::reload::{RELOAD_INTERVAL, Watcher};
use crate::report::{Report, ShardReport};
use crate::tls::{self, CertificateAuth};

/// Partitions of the topic the embedded mock cluster creates.
const EMBEDDED_PARTITIONS: i32 = 6;

/// A running Stormgate: the shards, the operations threads, and the embedded cluster when
/// there is one.
pub struct App {
    /// Declared first so that, on drop, its watchdog stops before the shards it judges.
    service: ServiceManager,
    /// Declared before the server so that, on drop, it stops before the shards it reads.
    ops: Ops,
    server: ServerHandle,
    brokers: Option<String>,
    /// Reload the station registry (`STATION_AUTH=token`) and the TLS files; they stop when
    /// dropped.
    watchers: Vec<Watcher>,
    /// Kept alive for as long as the producers use it; dropped last.
    _embedded: Option<EmbeddedCluster>,
}

impl App {
    /// Where stations connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The Kafka bootstrap servers records go to (`None` with the null sink).
    pub fn brokers(&self) -> Option<&str> {
        self.brokers.as_deref()
    }

    /// The running shards.
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// Where the operations endpoint (`/metrics`, `/healthz`, `/readyz`) listens: the bound
    /// address, so the actual port when `METRICS_ADDR` asked for port 0; `None` when off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.ops.local_addr()
    }

    /// Reloads the station registry and the TLS files now, changed or not (SIGHUP).
    pub fn reload(&self) {
        for watcher in &self.watchers {
            watcher.look_now();
        }
    }

    /// Stops accepting, drains every shard within the shutdown timeout, logs a per-shard
    /// summary, and returns the final report.
    pub fn stop(self) -> anyhow::Result<Report> {
        info!("shutting down: no new connections; delivering what was read");
        // The endpoint keeps serving during the drain (with /readyz 503) and stops last.
        self.ops.state().set_draining();
        self.service.stopping();
        self.server.shutdown();
        let metrics = self.server.metrics().to_vec();
        let shards = self.server.shards().to_vec();
        let joined = self.server.join();
        let report = Report {
            shards: shards
                .iter()
                .zip(&metrics)
                .map(|(info, m)| ShardReport {
                    info: *info,
                    totals: Totals::sum([&**m]),
                })
                .collect(),
            totals: Totals::sum(metrics.iter().map(|m| &**m)),
        };
        report.log();
        if report.totals.records_failed > 0 {
            warn!(
                failed = report.totals.records_failed,
                "some records were not delivered"
            );
        }
        self.ops.stop();
        joined.map_err(anyhow::Error::msg)?;
        info!(delivered = report.totals.records_delivered, "stopped");
        Ok(report)
    }
}

/// Starts Stormgate as `cli` describes and returns once every shard is listening (and the
/// operations endpoint, unless it is off).
pub fn start(cli: &Cli) -> anyhow::Result<App> {
    // First: with a systemd watchdog, the pings must cover the start (the disk buffer's
    // recovery included).
    let service = ServiceManager::start();
    let mut runtime = cli.runtime_config();
    let mut watchers = Vec::new();
    if let Some(files) = cli.tls_files() {
        let (live, watcher) = tls::serve(&files).context("TLS_CERT/TLS_KEY/TLS_CLIENT_CA")?;
        info!(
            cert = %files.cert.display(),
            client_ca = ?files.client_ca,
            min_version = %files.min_version,
            "station listener: TLS"
        );
        runtime.tls = Some(live as Arc<dyn StationTls>);
        watchers.push(watcher);
    }
    runtime.station_auth = station_auth(cli, &mut watchers)?;
    // Bound first: a taken port fails startup before any shard runs.
    let ops_listener = cli
        .metrics_addr
        .0
        .map(|addr| {
            Ops::bind(addr).with_context(|| {
                format!("cannot listen on {addr} (METRICS_ADDR; `off` disables it)")
            })
        })
        .transpose()?;
    let (factory, brokers, embedded) = match cli.sink {
        SinkKind::Null => {
            info!("sink: null (records are counted and dropped)");
            (AnyFactory::Null(NullSinkFactory), None, None)
        }
        SinkKind::Kafka => {
            let (brokers, embedded) = match &cli.kafka_brokers {
                Some(b) if !b.trim().is_empty() => (b.clone(), None),
                _ => {
                    let cluster = EmbeddedCluster::start(&cli.kafka_topic, EMBEDDED_PARTITIONS)
                        .context("starting the embedded Kafka mock cluster")?;
                    let bootstrap = cluster.bootstrap_servers();
                    info!(
                        bootstrap = %bootstrap,
                        topic = %cli.kafka_topic,
                        "KAFKA_BROKERS unset: embedded Kafka mock cluster started (in memory, gone at exit); \
                         read it with: kcat -b {bootstrap} -C -t {}",
                        cli.kafka_topic
                    );
                    (bootstrap, Some(cluster))
                }
            };
            let mut settings = cli.kafka_settings(&brokers)?;
            if runtime.disk_buffer.is_some() {
                // The disk buffer holds what Kafka has not taken: retriable failures are
                // retried for as long as it does, never turned into losses or spill lines.
                settings.delivery_timeout = std::time::Duration::ZERO;
                settings.max_attempts = 0;
            }
            if let Some(warning) = cli.idempotence_choice()?.warning() {
                warn!("{warning}");
            }
            info!(
                brokers = %settings.brokers,
                topic = %settings.topic,
                dlq_topic = settings.dlq_topic.as_deref().unwrap_or("(none)"),
                batch_size = settings.batch_size,
                batch_timeout = ?settings.batch_timeout,
                compression = %settings.compression,
                r#async = cli.kafka_async,
                max_attempts = settings.max_attempts,
                acks = %settings.acks,
                idempotence = settings.idempotence,
                delivery_timeout = ?settings.delivery_timeout,
                spill_dir = %cli.spill_dir.display(),
                extra_properties = ?settings.properties,
                "kafka producer settings (one producer per shard)"
            );
            (
                AnyFactory::Kafka(KafkaSinkFactory::new(settings).spill_dir(&cli.spill_dir)),
                Some(brokers),
                embedded,
            )
        }
    };
    let producer_stats = match &factory {
        AnyFactory::Kafka(f) => Some(f.producer_stats()),
        AnyFactory::Null(_) => None,
    };
    let timers_per_connection = runtime.idle_timeout.is_some() || runtime.line_timeout.is_some();
    if let Some(buffer) = &runtime.disk_buffer {
        info!(
            dir = %buffer.dir.display(),
            max_bytes = buffer.max_bytes,
            when_full = ?buffer.when_full,
            sync_interval = ?buffer.sync_interval,
            ack_after = ?buffer.ack_after,
            "disk buffer: a write-ahead log per shard"
        );
    }
    let server = Server::start(runtime, factory).context("starting the shards")?;
    let cores: Vec<usize> = server.shards().iter().map(|s| s.core).collect();
    info!(
        addr = %server.local_addr(),
        shards = server.shards().len(),
        cores = ?cores,
        max_connections = server.max_connections(),
        "listening"
    );
    let ops_state = OpsState::new(
        server.shards().to_vec(),
        server.metrics().to_vec(),
        producer_stats
            .as_ref()
            .map_or_else(Vec::new, ProducerStatsByShard::shards),
        producer_stats.is_some(),
        server.max_connections(),
        timers_per_connection,
    )
    .with_buffers(server.buffer_stats());
    let ops = Ops::start(ops_state, ops_listener, cli.stats_interval)
        .context("starting the operations threads")?;
    service.ready(ops.shared_state());
    Ok(App {
        service,
        ops,
        server,
        brokers,
        watchers,
        _embedded: embedded,
    })
}

/// What the shards ask at identify, per `STATION_AUTH`: nothing, the station registry (its
/// reload thread joins `watchers`), or the certificate rule. Fails when token mode has no
/// readable registry.
fn station_auth(
    cli: &Cli,
    watchers: &mut Vec<Watcher>,
) -> anyhow::Result<Option<Arc<dyn StationAuth>>> {
    if cli.station_auth != StationAuthMode::Token
        && let Some(path) = &cli.station_registry
    {
        warn!(
            registry = %path.display(),
            "STATION_REGISTRY is set but STATION_AUTH is not token: tokens are not checked"
        );
    }
    match cli.station_auth {
        StationAuthMode::None => Ok(None),
        StationAuthMode::Certificate => {
            // `Cli::validate` made sure mutual TLS is on.
            info!(
                "station authentication: certificate (an identify's zipcode must be its client \
                 certificate's subject CN)"
            );
            Ok(Some(Arc::new(CertificateAuth)))
        }
        StationAuthMode::Token => {
            let path = cli.registry_path().context("STATION_AUTH=token")?;
            let (live, watcher) = registry::serve(path, RELOAD_INTERVAL)
                .context("STATION_AUTH=token needs a readable station registry")?;
            let stations = live.current().len();
            info!(
                registry = %path.display(),
                stations,
                "station authentication: token (every identify must carry its zipcode's token)"
            );
            if stations == 0 {
                warn!(
                    registry = %path.display(),
                    "the station registry is empty: every identify will be refused until a \
                     station is added (`stormgate station add ZIPCODE`)"
                );
            }
            watchers.push(watcher);
            Ok(Some(live))
        }
    }
}

/// `stormgate replay FILE`: see [`stormgate_kafka::spill::replay`]. Fails if records stay in
/// the file.
pub fn replay(cli: &Cli, file: &Path, topic: Option<String>) -> anyhow::Result<ReplayReport> {
    let Some(brokers) = cli
        .kafka_brokers
        .as_deref()
        .filter(|b| !b.trim().is_empty())
    else {
        bail!("replay needs KAFKA_BROKERS (or --kafka-brokers before the command)");
    };
    let settings = cli.kafka_settings(brokers)?;
    let report = spill::replay(file, &settings, &ReplayOptions { topic })?;
    info!(
        file = %file.display(),
        lines = report.lines,
        delivered = report.delivered,
        failed = report.failed,
        unreadable = report.unreadable,
        "replay finished"
    );
    if report.kept() > 0 {
        bail!(
            "{} of {} records stay in {} ({} failed again, {} unreadable)",
            report.kept(),
            report.lines,
            file.display(),
            report.failed,
            report.unreadable
        );
    }
    Ok(report)
}

/// Installs the server's handlers for SIGINT, SIGTERM and SIGHUP: from now on they are
/// queued in the returned [`Signals`] for [`run`] (which reads them once the server runs)
/// rather than ending the process. Call it first thing in `main`.
pub fn install_signal_handlers() -> anyhow::Result<Signals> {
    let signals = Signals::new(SERVER_SIGNALS).context("installing signal handlers")?;
    // Held pending since the process started (`block_server_signals`): delivered now, to
    // the handlers.
    set_server_signals_mask(libc::SIG_UNBLOCK);
    Ok(signals)
}

/// The signals the server handles itself.
const SERVER_SIGNALS: [libc::c_int; 3] = [SIGINT, SIGTERM, SIGHUP];

/// Blocks [`SERVER_SIGNALS`] on the calling thread (and the threads it later starts) until
/// [`install_signal_handlers`]: for the process's first moments, before `main`, where the
/// default actions would end the process.
pub fn block_server_signals() {
    set_server_signals_mask(libc::SIG_BLOCK);
}

fn set_server_signals_mask(how: libc::c_int) {
    // SAFETY: sigset operations on a local set, and pthread_sigmask on the calling thread;
    // no memory is shared.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in SERVER_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// For a command that is not the server: SIGINT, SIGTERM and SIGHUP end the process as
/// their default actions would (signal-hook's handlers, once installed, stay installed).
pub fn default_signal_actions(mut signals: Signals) {
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = signal_hook::low_level::emulate_default_handler(sig);
            std::process::exit(128 + sig);
        }
    });
}

/// Runs until SIGINT or SIGTERM, then drains and exits. A second one exits at once. SIGHUP
/// reloads the station registry and the TLS files. `signals` comes from
/// [`install_signal_handlers`]: a signal that arrived while the server started is handled
/// once it runs.
pub fn run(cli: Cli, mut signals: Signals) -> anyhow::Result<()> {
    let app = start(&cli)?;
    for sig in signals.forever() {
        if sig == SIGHUP {
            info!("SIGHUP: reloading the station registry and TLS files");
            app.reload();
            continue;
        }
        info!(signal = sig, "signal received");
        break;
    }
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig != SIGHUP {
                warn!(signal = sig, "second signal: exiting without draining");
                std::process::exit(130);
            }
        }
    });
    let report = app.stop()?;
    if let Some(path) = &cli.stats_file {
        report.write(path)?;
        info!(path = %path.display(), "statistics written");
    }
    Ok(())
}

/// The configured sink, chosen at startup.
enum AnyFactory {
    Kafka(KafkaSinkFactory),
    Null(NullSinkFactory),
}

enum AnySink {
    Kafka(KafkaSink),
    Null(NullSink),
}

impl SinkFactory for AnyFactory {
    type Sink = AnySink;

    fn build(
        &self,
        shard: &ShardInfo,
    ) -> Result<AnySink, Box<dyn std::error::Error + Send + Sync>> {
        Ok(match self {
            AnyFactory::Kafka(f) => AnySink::Kafka(f.build(shard)?),
            AnyFactory::Null(f) => AnySink::Null(f.build(shard)?),
        })
    }
}

impl Sink for AnySink {
    async fn run(self, records: RecordReceiver, ctx: SinkContext) {
        match self {
            AnySink::Kafka(s) => s.run(records, ctx).await,
            AnySink::Null(s) => s.run(records, ctx).await,
        }
    }
}
