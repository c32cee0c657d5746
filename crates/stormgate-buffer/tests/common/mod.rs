//! Helpers shared by the log's black-box tests.
#![allow(dead_code)]

use std::future::Future;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_lite::future;
use glommio::{LocalExecutorBuilder, Placement};
use stormgate_buffer::{Log, LogConfig, OpenMode, Reader, RecordKind, RecoveryReport};

/// Runs `f` on a fresh glommio executor on this thread and returns its output. Returning
/// without closing the logs it opened is a crash: the executor's tasks are dropped, nothing
/// more is written.
pub fn run<T, Fut: Future<Output = T>>(f: impl FnOnce() -> Fut) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .expect("executor")
        .run(f())
}

/// A directory under the target's temporary directory (ext4 here, like production), removed
/// when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stormgate-buffer");
        let dir = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn log(&self) -> PathBuf {
        self.0.join("shard-0")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Small segments so that tests roll over often.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        max_bytes: 64 << 20,
        max_record_bytes: 64 << 10,
        sync_interval: Duration::from_millis(1),
        flush_bytes: 128 << 10,
        staging_max_bytes: 4 << 20,
        memory_bytes: 1 << 20,
        checkpoint_interval: Duration::from_millis(20),
        read_bytes: 64 << 10,
        ..LogConfig::new(64 << 20)
    }
}

/// The value of record `seq`: its number and some filler, ~250 bytes in all.
pub fn value(seq: u64) -> Vec<u8> {
    let mut v = format!("{{\"seq\":{seq},\"station\":\"{:05}\",\"t\":", seq % 997).into_bytes();
    v.resize(230 + (seq % 40) as usize, b'x');
    v
}

pub fn key(seq: u64) -> Vec<u8> {
    format!("{:05}", seq % 997).into_bytes()
}

/// Opens, spawns the background task, returns the log and what recovery said.
pub async fn open(dir: &Path, cfg: LogConfig, mode: OpenMode) -> (Log, RecoveryReport) {
    let (log, report) = Log::open(dir, cfg, mode).await.expect("open");
    glommio::spawn_local(log.run()).detach();
    (log, report)
}

/// Appends records `value(seq)` until `n` were appended; returns the last sequence number.
/// Waits for room when refused.
pub async fn append_n(log: &Log, n: u64) -> u64 {
    let mut last = 0;
    let mut done = 0;
    while done < n {
        let seq = log.last_seq() + 1;
        match log.append(seq as i64, RecordKind::Metrics, &key(seq), &value(seq)) {
            Ok(s) => {
                assert_eq!(s, seq);
                last = s;
                done += 1;
            }
            Err(_) => with_timeout(log.writable(), "room to append").await,
        }
    }
    last
}

/// Fails the test if `f` takes longer than 20 s: tests wait for events, never for luck.
pub async fn with_timeout<T>(f: impl Future<Output = T>, what: &str) -> T {
    future::or(async { Some(f.await) }, async {
        glommio::timer::sleep(Duration::from_secs(20)).await;
        None
    })
    .await
    .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Reads records until `n` were handed out, checking each one's content; returns their
/// sequence numbers in the order handed out. Reports each done if `done`.
pub async fn read_n(log: &Log, reader: &mut Reader, n: usize, done: bool) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        let want = n - seqs.len();
        with_timeout(
            reader.read(want, |r| {
                assert_eq!(r.kind, RecordKind::Metrics);
                assert_eq!(r.value, value(r.seq), "content of {}", r.seq);
                assert_eq!(r.key, key(r.seq));
                assert_eq!(r.timestamp_ms, r.seq as i64);
                seqs.push(r.seq);
                ControlFlow::Continue(())
            }),
            "records to read",
        )
        .await;
    }
    if done {
        for &s in &seqs {
            log.done(s);
        }
    }
    seqs
}

/// Waits until the checkpoint covers `seq`.
pub async fn wait_checkpointed(log: &Log, seq: u64) {
    with_timeout(
        async {
            while log.checkpointed_seq() < seq {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        },
        "the checkpoint",
    )
    .await
}

/// Segment files in a log directory, sorted.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

/// Bytes allocated on disk by the files in `dir` (not in subdirectories), like `du`.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}
