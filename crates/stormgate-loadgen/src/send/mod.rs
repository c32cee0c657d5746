//! `send`: station connections driven at the server.
//!
//! - [`worker`]: one thread's epoll loop over its share of the connections.
//! - [`stream`]: a connection's bytes, over the socket itself or through TLS.
//! - [`report`]: the JSON summary and progress, and how they add up.
//! - [`children`]: when the open-files limit cannot hold every connection in one process, the
//!   run is split over child processes (this binary, re-executed with `--child`), whose
//!   progress and summaries the parent adds up.

pub mod children;
pub mod report;
pub mod stream;
pub mod worker;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cli::SendArgs;
use crate::lines::MetricsLines;
use crate::tls::TlsClient;
use crate::{LoadgenError, fdlimit, output, plan};
use report::{Progress, ProgressPrinter, SendSummary};
use worker::{Live, WorkerConfig, WorkerReport};

/// How often progress is printed.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Runs `send`; the exit code is failure when no connection could be made.
pub fn run(args: &SendArgs) -> Result<ExitCode, LoadgenError> {
    args.validate().map_err(LoadgenError::Usage)?;
    // Loaded here even when children will each load their own: bad files fail the run at
    // once, with their own message.
    let tls = TlsClient::from_args(args)?;
    let fd_limit =
        fdlimit::raise_nofile().map_err(|e| LoadgenError::io("raise the open-files limit", e))?;
    let per_process = plan::per_process_max(fd_limit, args.max_conns_per_process);
    let shares = if args.child {
        plan::split(args.connections, 1)
    } else {
        plan::processes(args.connections, args.processes, per_process, fd_limit)
            .map_err(|e| LoadgenError::Usage(e.to_string()))?
    };
    if !args.child {
        eprintln!(
            "stormgate-loadgen send: {} connections to {}{} in {} process(es) × {} thread(s); open-files limit {} ({} connections per process at most)",
            args.connections,
            args.target,
            if args.tls_ca.is_some() {
                " over TLS"
            } else {
                ""
            },
            shares.len(),
            args.threads,
            fd_limit,
            per_process,
        );
    }
    let mut summary = if shares.len() == 1 {
        run_here(args, tls)?
    } else {
        children::run(args, &shares)?
    };
    summary.connections = args.connections as u64;
    summary.fd_limit = fd_limit;
    summary.idle = args.idle;
    summary.rate = args.rate;
    output::emit(&summary, args.summary.as_deref())?;
    Ok(if summary.counts.connected == 0 && args.connections > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs every connection in this process, `--threads` threads, printing progress.
fn run_here(args: &SendArgs, tls: Option<TlsClient>) -> Result<SendSummary, LoadgenError> {
    let cfg = WorkerConfig {
        target: args.target,
        sources: args.sources,
        send_buffer: args.send_buffer,
        rate: args.rate,
        duration: args.duration,
        lines_per_conn: args.lines_per_conn,
        idle: args.idle,
        drain_timeout: args.drain_timeout,
        zip_base: args.zip_base,
        lines: MetricsLines::new(args.seq, args.timestamps),
        acks: args.acks,
        tls,
    };
    let shares = plan::split(args.connections, args.threads);
    let lives: Vec<Live> = shares.iter().map(|_| Live::default()).collect();
    let start = Instant::now();
    let reports = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .iter()
            .zip(&lives)
            .enumerate()
            .map(|(t, (share, live))| {
                let cfg = &cfg;
                let share = share.clone();
                std::thread::Builder::new()
                    .name(format!("loadgen-send-{t}"))
                    .spawn_scoped(scope, move || worker::run(cfg, share, live))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| LoadgenError::io("spawn a sending thread", e))?;
        report_progress(args, start, &handles, &lives);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("sending thread panicked")
                    .map_err(|e| LoadgenError::io("poll", e))
            })
            .collect::<Result<Vec<WorkerReport>, _>>()
    })?;
    Ok(SendSummary::from_workers(start, &reports))
}

/// Prints progress every second until every thread has finished.
fn report_progress<T>(
    args: &SendArgs,
    start: Instant,
    handles: &[std::thread::ScopedJoinHandle<'_, T>],
    lives: &[Live],
) {
    let mut printer = ProgressPrinter::new(start);
    let mut next = start + PROGRESS_INTERVAL;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if now < next {
            continue;
        }
        next += PROGRESS_INTERVAL;
        let p = lives
            .iter()
            .map(snapshot)
            .fold(Progress::default(), |a, b| a + b);
        if args.child {
            output::progress_line(&p);
        } else if !args.quiet_progress {
            eprintln!("{}", printer.line(now, p));
        }
    }
}

fn snapshot(live: &Live) -> Progress {
    Progress {
        connected: live.connected.load(Ordering::Relaxed),
        open: live.open.load(Ordering::Relaxed),
        lines: live.lines.load(Ordering::Relaxed),
        bytes: live.bytes.load(Ordering::Relaxed),
        blocked: live.blocked.load(Ordering::Relaxed),
        errors: live.errors.load(Ordering::Relaxed),
    }
}
