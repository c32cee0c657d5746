//! Crashes at many points: dropping the log without closing it (nothing more is written),
//! a power cut that loses what was not durable (simulated by scrambling those bytes), and a
//! real SIGKILL of a process appending flat out. Nothing durable is ever lost, the
//! watermark never goes back, and re-delivery is bounded by what was delivered since the
//! last checkpoint.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use stormgate_buffer::scan::scan_segment;
use stormgate_buffer::{LogConfig, OpenMode};

/// What the first life of a log saw just before it crashed.
#[derive(Debug, Clone, Copy)]
struct AtCrash {
    appended: u64,
    durable: u64,
    delivered: u64,
    checkpointed: u64,
}

/// Appends `appended` records, waits for some of them to be durable, delivers some, and
/// crashes (returns without closing) at a point given by `seed`.
fn live_and_crash(dir: &Path, cfg: &LogConfig, seed: u64) -> AtCrash {
    run(|| async {
        let (log, report) = open(dir, cfg.clone(), OpenMode::ReadWrite).await;
        let mut reader = log.reader().unwrap();
        let appended = 500 + seed * 997 % 6000;
        append_n(&log, appended).await;
        let base = report.next_seq - 1;
        if !seed.is_multiple_of(3) {
            let target = base + appended * (seed % 3) / 2;
            with_timeout(log.wait_durable(target), "some durability").await;
        }
        let durable = log.durable_seq();
        let to_deliver = ((durable - report.delivered_seq) * (seed % 4) / 4) as usize;
        read_n(&log, &mut reader, to_deliver, true).await;
        if seed.is_multiple_of(2) {
            glommio::timer::sleep(Duration::from_millis(30)).await;
        }
        // Crash: no close. Read the state last, as close to the crash as possible.
        AtCrash {
            appended: log.last_seq(),
            durable: log.durable_seq(),
            delivered: log.delivered_seq(),
            checkpointed: log.checkpointed_seq(),
        }
    })
}

/// Opens after the crash and checks the promises.
fn check_after(dir: &Path, cfg: &LogConfig, before: AtCrash) {
    run(|| async {
        let (log, report) = open(dir, cfg.clone(), OpenMode::ReadWrite).await;
        assert!(!report.has_damage(), "{before:?} {:?}", report.events);
        // The checkpoint never goes back, and never claims what was not delivered.
        assert!(
            report.delivered_seq >= before.checkpointed,
            "{before:?} {report:?}"
        );
        assert!(
            report.delivered_seq <= before.delivered,
            "{before:?} {report:?}"
        );
        // Every durable record is there; numbering goes on past everything found.
        let present = report.next_seq - 1;
        assert!(present >= before.durable, "{before:?} {report:?}");
        assert!(present <= before.appended);
        let mut reader = log.reader().unwrap();
        let seqs = read_n(
            &log,
            &mut reader,
            (present - report.delivered_seq) as usize,
            true,
        )
        .await;
        assert_eq!(
            seqs,
            ((report.delivered_seq + 1)..=present).collect::<Vec<_>>()
        );
        // Re-delivered: what was delivered after the last checkpoint.
        let duplicates = before.delivered - report.delivered_seq;
        assert!(
            duplicates <= before.delivered - before.checkpointed,
            "{before:?} {report:?}"
        );
        log.close().await;
    });
}

#[test]
fn dropping_the_log_without_close_at_many_points_loses_nothing_durable() {
    let cfg = LogConfig {
        checkpoint_interval: Duration::from_millis(10),
        ..small_config()
    };
    for seed in 0..12 {
        let tmp = TempDir::new(&format!("crash-{seed}"));
        let dir = tmp.log();
        let before = live_and_crash(&dir, &cfg, seed);
        check_after(&dir, &cfg, before);
        // And a second life after the first recovery.
        let again = live_and_crash(&dir, &cfg, seed + 100);
        check_after(&dir, &cfg, again);
    }
}

/// Overwrites the bytes after the last durable record with garbage, up to `len` bytes, as if
/// the writes after the last completed fdatasync never reached the platter (or half did).
fn scramble_after(dir: &Path, durable: u64, len: usize, pattern: u8) {
    for seg in segment_files(dir).iter().rev() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(seg)
            .unwrap();
        let name = seg.file_name().unwrap().to_string_lossy().into_owned();
        let first = stormgate_buffer::format::parse_segment_file_name(&name).unwrap();
        if first > durable + 1 {
            // A whole segment after the durable point: its directory entry may not be
            // durable either; scramble it all.
            file.write_all_at(&vec![pattern; 8192], 0).unwrap();
            continue;
        }
        let scan = scan_segment(&file, first, 64 << 10, Some(durable), 1 << 20).unwrap();
        let at = scan.resume.map_or(scan.end, |p| p.offset);
        file.write_all_at(&vec![pattern; len], at).unwrap();
        file.sync_all().unwrap();
        return;
    }
}

#[test]
fn a_power_cut_that_loses_the_writes_after_the_last_fdatasync_loses_nothing_durable() {
    let cfg = small_config();
    for (seed, (len, pattern)) in [(100, 0xFF), (5000, 0x00), (70_000, 0x3C), (9, 0x01)]
        .into_iter()
        .enumerate()
    {
        let tmp = TempDir::new(&format!("power-{seed}"));
        let dir = tmp.log();
        let before = live_and_crash(&dir, &cfg, seed as u64 + 1);
        scramble_after(&dir, before.durable, len, pattern);
        run(|| async {
            let (log, report) = open(&dir, cfg.clone(), OpenMode::ReadWrite).await;
            let present = report.next_seq - 1;
            assert!(present >= before.durable, "{before:?} {report:?}");
            let mut reader = log.reader().unwrap();
            // Records past the durable point may or may not have survived; the durable ones
            // all did, in order, with their contents.
            let must = (before.durable - report.delivered_seq) as usize;
            let seqs = read_n(&log, &mut reader, must, true).await;
            assert_eq!(
                seqs,
                ((report.delivered_seq + 1)..=before.durable).collect::<Vec<_>>()
            );
            log.close().await;
        });
    }
}

const CHILD_ENV: &str = "STORMGATE_BUFFER_SIGKILL_CHILD";

/// The child: appends flat out, delivers as it goes (so the log never fills), and prints
/// every durable sequence number it learns of.
fn child(dir: &Path) {
    run(|| async {
        let (log, _) = open(dir, small_config(), OpenMode::ReadWrite).await;
        let writer = log.clone();
        glommio::spawn_local(async move {
            loop {
                append_n(&writer, 200).await;
                futures_lite::future::yield_now().await;
            }
        })
        .detach();
        let consumer = log.clone();
        glommio::spawn_local(async move {
            let mut reader = consumer.reader().unwrap();
            loop {
                let mut seqs = Vec::new();
                reader
                    .read(1000, |r| {
                        seqs.push(r.seq);
                        std::ops::ControlFlow::Continue(())
                    })
                    .await;
                seqs.iter().for_each(|&s| consumer.done(s));
            }
        })
        .detach();
        let mut seen = 0;
        loop {
            seen = log.wait_durable(seen + 1).await;
            println!("durable {seen}");
        }
    });
}

#[test]
fn sigkill_while_appending_flat_out_loses_nothing_reported_durable() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let tmp = TempDir::new("sigkill");
    let dir = tmp.log();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_while_appending_flat_out_loses_nothing_reported_durable",
                "--nocapture",
            ])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut durable = 0u64;
        let target = 20 + round * 150;
        let mut reports = 0;
        while reports < target {
            let line = lines.next().expect("child output").unwrap();
            if let Some(n) = line.strip_prefix("durable ") {
                durable = n.parse().unwrap();
                reports += 1;
            }
        }
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        run(|| async {
            let (log, report) = open(&dir, small_config(), OpenMode::ReadWrite).await;
            assert!(!report.has_damage(), "{:?}", report.events);
            assert!(
                report.next_seq > durable,
                "reported durable {durable}, found {}",
                report.next_seq - 1
            );
            // Deliver everything so the next round starts from the checkpoint.
            let mut reader = log.reader().unwrap();
            let n = (report.next_seq - 1 - report.delivered_seq) as usize;
            let seqs = read_n(&log, &mut reader, n, true).await;
            assert_eq!(
                seqs.last().copied().unwrap_or(report.delivered_seq),
                report.next_seq - 1
            );
            log.close().await;
        });
    }
}

#[test]
fn a_scrambled_tail_never_panics_the_reader_of_the_previous_life() {
    // The offsets in segments written by one life are checked by the next: a tail scrambled
    // at every 8-byte alignment opens cleanly every time.
    let cfg = small_config();
    let tmp = TempDir::new("scramble-sweep");
    let dir = tmp.log();
    let before = live_and_crash(&dir, &cfg, 4);
    let seg = segment_files(&dir).pop().unwrap();
    let pristine = std::fs::read(&seg).unwrap();
    for shift in (0..64).step_by(8) {
        std::fs::write(&seg, &pristine).unwrap();
        scramble_after(&dir, before.durable.saturating_sub(3), 64 + shift, 0xEE);
        run(|| async {
            let (log, report) = stormgate_buffer::Log::open(&dir, cfg.clone(), OpenMode::Drain)
                .await
                .unwrap();
            assert!(report.next_seq > before.durable.saturating_sub(3));
            drop(log);
        });
    }
}
