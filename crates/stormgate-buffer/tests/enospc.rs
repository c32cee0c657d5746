//! A full disk for real: a 64 MiB ext4 image, loop-mounted, filled until the log cannot
//! create its next segment. Appends are refused (`Failed`) once staging is full, the errors
//! are counted, nothing durable is lost, and everything resumes when space comes back.
//!
//! Needs root and loop devices (`mount -o loop`); without them the test fails and says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use stormgate_buffer::{AppendError, LogConfig, OpenMode, RecordKind};

/// A loop-mounted ext4 file system, unmounted and removed on drop.
struct SmallFs {
    base: PathBuf,
    mnt: PathBuf,
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "this test needs root and loop devices; `{cmd} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SmallFs {
    fn new(name: &str, mib: u64) -> SmallFs {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mnt = base.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let img = base.join("img");
        let img_s = img.to_str().unwrap();
        sh("truncate", &["-s", &format!("{mib}M"), img_s]);
        sh("mkfs.ext4", &["-q", "-F", img_s]);
        sh("mount", &["-o", "loop", img_s, mnt.to_str().unwrap()]);
        SmallFs { base, mnt }
    }

    fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.mnt.to_str().unwrap()).unwrap();
        // SAFETY: statvfs fills the struct we pass.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail * s.f_frsize
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: a file the log still holds open would make a plain umount fail with EBUSY
        // and leave the mount behind (seen after test runs: one per run).
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Fills the file system until less than `leave` bytes are free.
fn fill(path: &Path, free: u64, leave: u64) {
    let len = free.saturating_sub(leave);
    let f = std::fs::File::create(path).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    assert_eq!(
        unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as i64) },
        0,
        "filler"
    );
    f.sync_all().unwrap();
}

#[test]
fn a_full_disk_refuses_appends_loses_nothing_and_recovers_when_space_returns() {
    let fs = SmallFs::new("enospc", 64);
    let dir = fs.mnt.join("shard-0");
    let filler = fs.mnt.join("filler");
    let cfg = LogConfig {
        segment_bytes: 8 << 20,
        max_bytes: 40 << 20,
        staging_max_bytes: 2 << 20,
        max_record_bytes: 64 << 10,
        flush_bytes: 256 << 10,
        memory_bytes: 1 << 20,
        checkpoint_interval: Duration::from_millis(20),
        ..LogConfig::new(40 << 20)
    };
    let mut last = 0;
    run(|| async {
        let (log, _) = open(&dir, cfg.clone(), OpenMode::ReadWrite).await;
        append_n(&log, 10).await;
        with_timeout(log.wait_durable(10), "first segment").await;
        // The first segment and its spare exist (16 MiB); leave less than one more segment.
        with_timeout(
            async {
                while segment_files(&dir).len() + usize::from(dir.join("spare.tmp").exists()) < 2 {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
            },
            "the spare",
        )
        .await;
        fill(&filler, fs.free_bytes(), 4 << 20);
        // Append until refused: the second segment comes from the spare, the third cannot be
        // created.
        loop {
            let seq = log.last_seq() + 1;
            match log.append(seq as i64, RecordKind::Metrics, &key(seq), &value(seq)) {
                Ok(_) => {}
                Err(AppendError::Failed) => break,
                Err(AppendError::Busy) => glommio::timer::sleep(Duration::from_millis(2)).await,
                Err(e) => panic!("{e}"),
            }
        }
        last = log.last_seq();
        let stats = log.stats();
        assert!(
            last > 50_000,
            "two segments of 8 MiB hold ~60,000 records: {last}"
        );
        assert!(stats.storage_errors.get() >= 1);
        assert_eq!(stats.last_storage_errno.get(), i64::from(libc::ENOSPC));
        assert_eq!(stats.failed_appends.get(), 1);
        let durable = log.durable_seq();
        assert!(
            durable < last,
            "the records of the uncreatable segment are not durable"
        );
        // Nothing durable is lost meanwhile, and it stays refused while the disk is full.
        glommio::timer::sleep(Duration::from_millis(300)).await;
        assert_eq!(log.durable_seq(), durable);
        let errors = stats.storage_errors.get();
        assert!(errors < 40, "retries back off: {errors} in 300 ms");
        assert_eq!(
            log.append(0, RecordKind::Metrics, b"k", b"v"),
            Err(AppendError::Failed)
        );
        // Space comes back.
        std::fs::remove_file(&filler).unwrap();
        assert_eq!(
            with_timeout(log.wait_durable(last), "durability after space returned").await,
            last
        );
        with_timeout(log.writable(), "room").await;
        assert_eq!(stats.last_storage_errno.get(), 0);
        let mut reader = log.reader().unwrap();
        let seqs = read_n(&log, &mut reader, last as usize, false).await;
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
        // Crash without closing.
    });
    run(|| async {
        let (log, report) = open(&dir, cfg.clone(), OpenMode::ReadWrite).await;
        assert!(!report.has_damage(), "{:?}", report.events);
        assert_eq!(report.next_seq, last + 1);
        let mut reader = log.reader().unwrap();
        read_n(&log, &mut reader, last as usize, true).await;
        log.close().await;
    });
}
