//! Starting and stopping the shards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use glommio::LocalExecutorBuilder;
use stormgate_telemetry::{ShardMetrics, Totals};
use tracing::info;

use crate::config::{FD_HEADROOM, RuntimeConfig};
use crate::contract::{ShardInfo, StartServerError};
use crate::core::ConnectionLimit;
use crate::placement;
use crate::shard::{self, ShardReady, ShardStart};
use crate::sink::SinkFactory;

/// Submission queue depth of each io_uring ring. Every idle connection has one poll request
/// outstanding, but outstanding requests do not occupy the submission queue, so its depth
/// bounds only how many new requests one scheduler pass submits at once: glommio's default
/// of 128 is enough.
const RING_DEPTH: usize = 128;

/// Starts the shards.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds the listeners, starts one pinned executor per shard, builds each shard's sink on
    /// its thread, and returns once every shard accepts connections, or with the first error
    /// (after stopping the shards that did start).
    pub fn start<F: SinkFactory>(
        config: RuntimeConfig,
        factory: F,
    ) -> Result<ServerHandle, StartServerError> {
        let cores = placement::usable_cores();
        let nr_shards = if config.shards == 0 {
            cores.len()
        } else {
            config.shards
        };
        let nofile = placement::raise_nofile_limit();
        let max_connections = match config.max_connections {
            0 => (nofile as usize).saturating_sub(FD_HEADROOM).max(1),
            n => n,
        };
        let (recv_buffer, budget) = placement::recv_buffer_for(
            config.recv_buffer,
            max_connections,
            placement::tcp_mem_pressure_pages(),
        );
        if let Some(budget) = budget {
            info!(
                configured = config.recv_buffer,
                recv_buffer,
                max_connections,
                tcp_mem_pressure_bytes = budget,
                "lowered TCP_RECV_BUFFER so that every connection's full receive queue fits \
                 under net.ipv4.tcp_mem's pressure threshold (docs/TUNING.md)"
            );
        }
        let (sockets, local_addr) =
            crate::listener::bind_group(config.listen, nr_shards, config.backlog, recv_buffer)
                .map_err(|source| StartServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let buffer = match &config.disk_buffer {
            Some(settings) => Some(crate::disk::prepare(settings, nr_shards)?),
            None => None,
        };
        let io_memory = placement::io_memory_per_shard(nr_shards, placement::memlock_limit());
        info!(
            %local_addr, nr_shards, cores = ?cores, io_memory, max_connections, open_files_limit = nofile,
            "starting shards"
        );

        let config = Arc::new(config);
        let factory = Arc::new(factory);
        let stop = Arc::new(AtomicBool::new(false));
        let limits = Arc::new(ConnectionLimit::new(
            max_connections,
            config.max_connections_per_ip,
        ));
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handle = ServerHandle {
            local_addr,
            shards: Vec::with_capacity(nr_shards),
            metrics: Vec::with_capacity(nr_shards),
            buffers: Vec::new(),
            threads: Vec::with_capacity(nr_shards),
            stop: Arc::clone(&stop),
            max_connections,
        };
        for (id, socket) in sockets.into_iter().enumerate() {
            let info = ShardInfo {
                id,
                core: placement::core_for(id, &cores),
                nr_shards,
            };
            let metrics = Arc::new(ShardMetrics::default());
            handle.metrics.push(Arc::clone(&metrics));
            let start = ShardStart {
                info,
                config: Arc::clone(&config),
                metrics,
                limits: Arc::clone(&limits),
                socket,
                factory: Arc::clone(&factory),
                stop: Arc::clone(&stop),
                ready: ready_tx.clone(),
                buffer: buffer
                    .as_ref()
                    .map(|(cfg, adopted)| (cfg.clone(), adopted[id].clone())),
            };
            let thread = std::thread::Builder::new()
                .name(format!("shard-{id}"))
                .spawn(move || run_shard_thread(start, io_memory))
                .map_err(|e| StartServerError::Thread(e.to_string()));
            match thread {
                Ok(t) => handle.threads.push(t),
                Err(e) => return Err(e), // `handle` drops: started shards stop and join.
            }
        }
        drop(ready_tx);
        for _ in 0..nr_shards {
            match ready_rx.recv() {
                Ok(Ok(ShardReady { info, buffer })) => {
                    handle.shards.push(info);
                    if let Some(stats) = buffer {
                        handle.buffers.push((info.id, stats));
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(StartServerError::Thread(
                        "a shard exited before it was ready".into(),
                    ));
                }
            }
        }
        handle.shards.sort_by_key(|s| s.id);
        handle.buffers.sort_by_key(|(id, _)| *id);
        Ok(handle)
    }
}

fn run_shard_thread<F: SinkFactory>(start: ShardStart<F>, io_memory: usize) {
    let info = start.info;
    let _span = tracing::info_span!("shard", id = info.id).entered();
    // `make` on our own thread, not `spawn`: `spawn` loses a creation error and leaves a dead
    // thread that nobody notices.
    let executor = LocalExecutorBuilder::new(placement::placement_for(info.core))
        .name(&format!("shard-{}", info.id))
        .io_memory(io_memory)
        .ring_depth(RING_DEPTH)
        .make();
    match executor {
        Ok(executor) => executor.run(shard::run(start)),
        Err(e) => {
            let _ = start.ready.send(Err(StartServerError::Executor {
                shard: info.id,
                core: info.core,
                message: e.to_string(),
            }));
        }
    }
}

/// A running server. Dropping it stops the shards and waits for them.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shards: Vec<ShardInfo>,
    metrics: Vec<Arc<ShardMetrics>>,
    buffers: Vec<(usize, Arc<stormgate_buffer::LogStats>)>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    max_connections: usize,
}

impl ServerHandle {
    /// The address stations connect to (the actual port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The running shards, by id.
    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    /// Each shard's metrics, by shard id.
    pub fn metrics(&self) -> &[Arc<ShardMetrics>] {
        &self.metrics
    }

    /// With a disk buffer: each shard's log's counters, by shard id (empty without one).
    pub fn buffer_stats(&self) -> Vec<Arc<stormgate_buffer::LogStats>> {
        self.buffers.iter().map(|(_, s)| Arc::clone(s)).collect()
    }

    /// All shards' metrics summed.
    pub fn totals(&self) -> Totals {
        Totals::sum(self.metrics.iter().map(|m| &**m))
    }

    /// The effective connection limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Begins a graceful shutdown: shards stop accepting, finish the lines they read, and
    /// deliver them within the shutdown timeout. Returns at once; see [`ServerHandle::join`].
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits for every shard to stop. Returns an error naming shards that panicked.
    pub fn join(mut self) -> Result<(), String> {
        self.join_threads()
    }

    fn join_threads(&mut self) -> Result<(), String> {
        let mut panicked = Vec::new();
        for (id, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() {
                panicked.push(id);
            }
        }
        if panicked.is_empty() {
            Ok(())
        } else {
            Err(format!("shards {panicked:?} panicked"))
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            let _ = self.join_threads();
        }
    }
}
