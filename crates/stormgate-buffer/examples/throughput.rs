//! Append + durable throughput of one log on one executor, for choosing `sync_interval`.
//!
//! ```text
//! cargo run --release -p stormgate-buffer --example throughput -- \
//!     [--dir DIR] [--records N] [--size BYTES] [--rate RECORDS_PER_S] [--intervals 0,1,2,5,10]
//! ```
//! For each sync interval (ms) it opens a fresh log, appends N records of SIZE bytes (flat
//! out, or paced at RATE in 1 ms ticks), while a reader hands them out and reports them done
//! (so the log never fills), and prints records/s, MB/s, fsyncs/s, CPU per record, fsync
//! latency, and durable latency per record (append to durable, sampled every 64th record).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use stormgate_buffer::{AppendError, Log, LogConfig, OpenMode, RecordKind};
use stormgate_telemetry::LatencyHistogram;

struct Args {
    dir: PathBuf,
    records: u64,
    size: usize,
    rate: Option<u64>,
    intervals: Vec<u64>,
}

fn args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("target/buffer-throughput"),
        records: 2_000_000,
        size: 250,
        rate: None,
        intervals: vec![0, 1, 2, 5, 10],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().expect("a value after each flag");
        match flag.as_str() {
            "--dir" => a.dir = v.into(),
            "--records" => a.records = v.parse().unwrap(),
            "--size" => a.size = v.parse().unwrap(),
            "--rate" => a.rate = Some(v.parse().unwrap()),
            "--intervals" => a.intervals = v.split(',').map(|s| s.parse().unwrap()).collect(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

const SAMPLE_EVERY: u64 = 64;

async fn one_run(args: &Args, interval_ms: u64) {
    let dir = args.dir.join(format!("sync-{interval_ms}"));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = LogConfig {
        sync_interval: Duration::from_millis(interval_ms),
        ..LogConfig::new(4 << 30)
    };
    let (log, _) = Log::open(&dir, cfg, OpenMode::ReadWrite).await.unwrap();
    glommio::spawn_local(log.run()).detach();
    let samples: Rc<RefCell<VecDeque<(u64, Instant)>>> = Rc::default();
    let latency = Rc::new(LatencyHistogram::default());
    let n = args.records;
    let consumer = glommio::spawn_local(consume(log.clone(), n));
    let watcher = glommio::spawn_local(watch(log.clone(), samples.clone(), latency.clone(), n));
    let key = b"10115";
    let value = vec![b'x'; args.size.saturating_sub(24 + 11 + key.len())];
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut append_time = Duration::ZERO;
    let per_tick = args.rate.map(|r| (r / 1000).max(1));
    let mut next_tick = Instant::now();
    let mut seq = 0;
    while seq < n {
        let batch = per_tick.unwrap_or(256).min(n - seq);
        let mut started = Instant::now();
        let mut i = 0;
        while i < batch {
            match log.append(seq as i64, RecordKind::Metrics, key, &value) {
                Ok(s) => {
                    seq = s;
                    i += 1;
                    if s % SAMPLE_EVERY == 0 {
                        samples.borrow_mut().push_back((s, Instant::now()));
                    }
                }
                Err(AppendError::Busy | AppendError::Full) => {
                    append_time += started.elapsed();
                    log.writable().await;
                    started = Instant::now();
                }
                Err(e) => panic!("{e}"),
            }
        }
        append_time += started.elapsed();
        match per_tick {
            Some(_) => {
                next_tick += Duration::from_millis(1);
                glommio::timer::sleep(next_tick.saturating_duration_since(Instant::now())).await;
            }
            None => futures_lite::future::yield_now().await,
        }
    }
    log.wait_durable(n).await;
    let elapsed = t0.elapsed().as_secs_f64();
    consumer.await;
    watcher.await;
    let cpu = cpu_seconds() - cpu0;
    let stats = log.stats();
    let fs = stats.fsync_latency.snapshot();
    let dl = latency.snapshot();
    println!(
        "sync {interval_ms:>2} ms | {:>9.0} rec/s {:>6.1} MB/s | {:>6.0} fsyncs/s, fsync p50 {:>5} us p99 {:>5} us | durable p50 {:>6} us p99 {:>6} us | cpu {:>4.0} ns/rec (append {:>3.0} ns/rec) | {:.1} rec/flush",
        n as f64 / elapsed,
        stats.bytes_written.get() as f64 / elapsed / 1e6,
        stats.fsyncs.get() as f64 / elapsed,
        fs.quantile_micros(0.5),
        fs.quantile_micros(0.99),
        dl.quantile_micros(0.5),
        dl.quantile_micros(0.99),
        cpu * 1e9 / n as f64,
        append_time.as_secs_f64() * 1e9 / n as f64,
        n as f64 / stats.flushes.get().max(1) as f64,
    );
    log.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hands every record out and reports it done, as the producer would.
async fn consume(log: Log, n: u64) {
    let mut reader = log.reader().unwrap();
    let mut done = 0;
    let mut seqs = Vec::with_capacity(4096);
    while done < n {
        seqs.clear();
        reader
            .read(4096, |r| {
                seqs.push(r.seq);
                ControlFlow::Continue(())
            })
            .await;
        for &s in &seqs {
            log.done(s);
        }
        done += seqs.len() as u64;
    }
}

/// Records append-to-durable latency of the sampled records.
async fn watch(
    log: Log,
    samples: Rc<RefCell<VecDeque<(u64, Instant)>>>,
    hist: Rc<LatencyHistogram>,
    n: u64,
) {
    let mut durable = 0;
    while durable < n {
        durable = log.wait_durable(durable + 1).await;
        let now = Instant::now();
        let mut s = samples.borrow_mut();
        while let Some(&(seq, at)) = s.front() {
            if seq > durable {
                break;
            }
            hist.record(now - at);
            s.pop_front();
        }
    }
}

fn main() {
    let args = args();
    println!(
        "{} records of {} bytes, {}, dir {}",
        args.records,
        args.size,
        args.rate
            .map_or("flat out".to_string(), |r| format!("paced at {r}/s")),
        args.dir.display()
    );
    LocalExecutorBuilder::new(Placement::Unbound)
        .make()
        .unwrap()
        .run(async {
            for &ms in &args.intervals {
                one_run(&args, ms).await;
            }
        });
}
