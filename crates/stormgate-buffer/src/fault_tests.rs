//! Storage errors injected below the log (the `FileIo` seam): EIO on writes, on fdatasync
//! and on file creation. Each shows appends refused once staging is full, counted, nothing
//! durable lost, and everything resuming when the error clears.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use futures_lite::future;
use glommio::{LocalExecutorBuilder, Placement};

use crate::{AppendError, Log, LogConfig, OpenMode, RecordKind};

fn run<Fut: std::future::Future<Output = ()>>(f: impl FnOnce() -> Fut) {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .unwrap()
        .run(f());
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("stormgate-buffer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        max_record_bytes: 16 << 10,
        flush_bytes: 64 << 10,
        staging_max_bytes: 256 << 10,
        checkpoint_interval: Duration::from_millis(20),
        ..LogConfig::new(32 << 20)
    }
}

fn value(seq: u64) -> Vec<u8> {
    format!("record {seq:>240}").into_bytes()
}

async fn timeout<T>(f: impl std::future::Future<Output = T>) -> T {
    let limit = async {
        glommio::timer::sleep(Duration::from_secs(20)).await;
        panic!("timed out")
    };
    future::or(f, limit).await
}

/// Appends until refused with `Failed`; returns the last sequence number appended. `Busy`
/// comes first while the first failure is not yet known: wait and go on.
async fn append_until_failed(log: &Log) -> u64 {
    loop {
        let seq = log.last_seq() + 1;
        match log.append(seq as i64, RecordKind::Metrics, b"k", &value(seq)) {
            Ok(_) => {}
            Err(AppendError::Failed) => return log.last_seq(),
            Err(AppendError::Busy) => glommio::timer::sleep(Duration::from_millis(2)).await,
            Err(e) => panic!("{e}"),
        }
    }
}

async fn read_all(log: &Log, n: u64) {
    let mut reader = log.reader().unwrap();
    let mut next = 1;
    while next <= n {
        timeout(reader.read(10_000, |r| {
            assert_eq!((r.seq, r.value), (next, &value(next)[..]));
            next += 1;
            ControlFlow::Continue(())
        }))
        .await;
    }
}

/// The scenario shared by every kind of fault: healthy, fail, refuse, clear, recover, and
/// after a crash every record still there.
fn storage_error_scenario(name: &str, arm: fn(&crate::io::Faults, Option<i32>)) {
    let dir = Dir::new(name);
    let path = dir.0.clone();
    let mut last = 0;
    run(|| async {
        let (log, _) = Log::open(&path, cfg(), OpenMode::ReadWrite).await.unwrap();
        glommio::spawn_local(log.run()).detach();
        for seq in 1..=100 {
            log.append(seq, RecordKind::Metrics, b"k", &value(seq as u64))
                .unwrap();
        }
        timeout(log.wait_durable(100)).await;
        let faults = log.faults();
        arm(&faults, Some(libc::EIO));
        last = append_until_failed(&log).await;
        assert!(last > 500, "staging holds ~256 KiB: {last}");
        let stats = log.stats();
        assert!(stats.storage_errors.get() >= 1);
        assert_eq!(stats.last_storage_errno.get(), i64::from(libc::EIO));
        assert_eq!(stats.failed_appends.get(), 1);
        assert!(faults.injected.get() >= 1);
        assert_eq!(
            log.durable_seq(),
            100,
            "nothing reported durable while failing"
        );
        // Still failing: appends stay refused, retries go on with backoff (no spin).
        glommio::timer::sleep(Duration::from_millis(100)).await;
        let injected = faults.injected.get();
        assert!(
            (2..=10).contains(&injected),
            "backoff bounds the retries: {injected}"
        );
        assert_eq!(
            log.append(0, RecordKind::Metrics, b"k", b"v"),
            Err(AppendError::Failed)
        );
        arm(&faults, None);
        timeout(log.writable()).await;
        assert_eq!(timeout(log.wait_durable(last)).await, last);
        assert_eq!(stats.last_storage_errno.get(), 0);
        read_all(&log, last).await;
        // Crash here: no close.
    });
    run(|| async {
        let (log, report) = Log::open(&path, cfg(), OpenMode::ReadWrite).await.unwrap();
        assert!(!report.has_damage(), "{:?}", report.events);
        assert_eq!(report.next_seq, last + 1);
        glommio::spawn_local(log.run()).detach();
        read_all(&log, last).await;
        log.close().await;
    });
}

#[test]
fn eio_on_segment_writes() {
    storage_error_scenario("eio-write", |f, e| f.write.set(e));
}

#[test]
fn eio_on_fdatasync() {
    storage_error_scenario("eio-sync", |f, e| f.sync.set(e));
}

#[test]
fn eio_creating_segment_files() {
    // Staging (256 KiB) is smaller than a segment: fill most of the first one so that the
    // records appended while failing need a new file.
    let dir = Dir::new("eio-create");
    let path = dir.0.clone();
    run(|| async {
        let (log, _) = Log::open(&path, cfg(), OpenMode::ReadWrite).await.unwrap();
        glommio::spawn_local(log.run()).detach();
        let mut seq = 0;
        while seq < 3_500 {
            match log.append(seq as i64 + 1, RecordKind::Metrics, b"k", &value(seq + 1)) {
                Ok(s) => seq = s,
                Err(AppendError::Busy) => timeout(log.writable()).await,
                Err(e) => panic!("{e}"),
            }
        }
        timeout(log.wait_durable(seq)).await;
        // Let the spare be made first, then fail everything that creates a file: the roll
        // takes the spare, so the failure shows at the second roll.
        glommio::timer::sleep(Duration::from_millis(50)).await;
        let faults = log.faults();
        faults.create.set(Some(libc::EIO));
        let last = append_until_failed(&log).await;
        assert!(log.durable_seq() < last);
        assert!(log.stats().storage_errors.get() >= 1);
        faults.create.set(None);
        assert_eq!(timeout(log.wait_durable(last)).await, last);
        read_all(&log, last).await;
        log.close().await;
    });
}
