//! Opening a damaged directory: each kind of damage has a defined, logged, counted outcome,
//! everything valid is delivered, and the log goes on.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use stormgate_buffer::scan::scan_segment;
use stormgate_buffer::{CheckpointState, LogConfig, OpenMode, RecoveryEvent};

/// Writes `n` records (delivering the first `delivered` and waiting for their checkpoint),
/// then closes cleanly.
fn write_log(dir: &Path, n: u64, delivered: u64) {
    run(|| async {
        let (log, _) = open(dir, small_config(), OpenMode::ReadWrite).await;
        append_n(&log, n).await;
        with_timeout(log.wait_durable(n), "durability").await;
        if delivered > 0 {
            let mut reader = log.reader().unwrap();
            read_n(&log, &mut reader, delivered as usize, true).await;
            wait_checkpointed(&log, delivered).await;
        }
        log.close().await;
    });
}

/// Offset of record `seq` in segment `path`.
fn offset_of(path: &Path, seq: u64) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    let first = first_seq(path);
    let scan = scan_segment(&file, first, 64 << 10, Some(seq - 1), 1 << 20).unwrap();
    let p = scan.resume.expect("record present");
    assert_eq!(p.seq, seq);
    p.offset
}

fn first_seq(path: &Path) -> u64 {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    stormgate_buffer::format::parse_segment_file_name(&name).unwrap()
}

fn scan_end(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    scan_segment(&file, first_seq(path), 64 << 10, None, 1 << 20)
        .unwrap()
        .end
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn flip(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], offset).unwrap();
    f.sync_all().unwrap();
}

/// Opens, reads every undelivered record (checking contents), appends `more`, reads those
/// too, closes. Returns the report and the sequence numbers read.
fn reopen_and_deliver(dir: &Path, more: u64) -> (stormgate_buffer::RecoveryReport, Vec<u64>) {
    run(|| async {
        let (log, report) = open(dir, small_config(), OpenMode::ReadWrite).await;
        let mut reader = log.reader().unwrap();
        let mut seqs = read_n(&log, &mut reader, report.undelivered_records as usize, true).await;
        let first_new = log.last_seq() + 1;
        append_n(&log, more).await;
        assert_eq!(log.last_seq(), first_new + more - 1);
        seqs.extend(read_n(&log, &mut reader, more as usize, true).await);
        with_timeout(log.wait_durable(log.last_seq()), "durability").await;
        log.close().await;
        (report, seqs)
    })
}

fn quarantined(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir.join("quarantine")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => vec![],
    }
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail_cut_for_good() {
    let tmp = TempDir::new("torn-garbage");
    let dir = tmp.log();
    write_log(&dir, 1000, 0);
    let seg = segment_files(&dir).pop().unwrap();
    let end = scan_end(&seg);
    write_at(&seg, end, &[0xA5; 3000]);
    let (report, seqs) = reopen_and_deliver(&dir, 5);
    assert!(
        matches!(report.events[..], [RecoveryEvent::TornTail { offset, stale_bytes: 3000, .. }] if offset == end),
        "{:?}",
        report.events
    );
    assert!(!report.has_damage());
    assert_eq!(seqs, (1..=1005).collect::<Vec<_>>());
    // The new records are shorter than the garbage was: without the cut, the garbage after
    // them would be found again.
    let (report, _) = reopen_and_deliver(&dir, 0);
    assert!(report.events.is_empty(), "{:?}", report.events);
}

#[test]
fn a_truncated_newest_segment_delivers_its_prefix_and_appends_go_to_a_new_one() {
    let tmp = TempDir::new("torn-truncate");
    let dir = tmp.log();
    write_log(&dir, 1000, 0);
    let seg = segment_files(&dir).pop().unwrap();
    let cut = offset_of(&seg, 1000) + 30;
    std::fs::File::options()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let (report, seqs) = reopen_and_deliver(&dir, 10);
    assert!(
        report
            .events
            .iter()
            .any(|e| matches!(e, RecoveryEvent::SizeMismatch { .. })),
        "{:?}",
        report.events
    );
    assert_eq!(
        seqs,
        (1..=999).chain(1000..=1009).collect::<Vec<_>>(),
        "the lost record's number is reused only because nothing of it was valid"
    );
    assert!(segment_files(&dir).len() >= 2 || !quarantined(&dir).is_empty());
}

#[test]
fn a_flipped_byte_in_the_newest_segment_quarantines_the_rest_and_numbering_moves_past_it() {
    let tmp = TempDir::new("flip-newest");
    let dir = tmp.log();
    write_log(&dir, 1000, 0);
    let seg = segment_files(&dir).pop().unwrap();
    let victim = first_seq(&seg) + 100;
    flip(&seg, offset_of(&seg, victim) + 40);
    let after = 1000 - victim;
    run(|| async {
        let (log, report) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        assert!(
            report.events.iter().any(|e| matches!(e, RecoveryEvent::Damaged { records_after_damage, .. } if *records_after_damage == after)),
            "{:?}",
            report.events
        );
        assert!(report.has_damage());
        assert_eq!(report.quarantined_records, after);
        assert_eq!(
            report.next_seq, 1001,
            "never reuse a number found after the damage"
        );
        assert_eq!(log.stats().quarantined_records.get(), after);
        let mut reader = log.reader().unwrap();
        let seqs = read_n(&log, &mut reader, report.undelivered_records as usize, true).await;
        assert_eq!(seqs, (1..victim).collect::<Vec<_>>());
        // Nothing more to read: the reader waits (no spin over the quarantined numbers) and
        // the watermark crosses them.
        let read_more = reader.read(10, |_| std::ops::ControlFlow::Continue(()));
        let waited = futures_lite::future::or(async { Some(read_more.await) }, async {
            glommio::timer::sleep(std::time::Duration::from_millis(100)).await;
            None
        });
        assert_eq!(waited.await, None, "nothing to read: read waits");
        assert_eq!(reader.next_seq(), 1001);
        assert_eq!(log.delivered_seq(), 1000);
        // Its valid prefix delivered and checkpointed, the file goes to quarantine.
        wait_checkpointed(&log, 1000).await;
        with_timeout(
            async {
                while quarantined(&dir).is_empty() {
                    glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
                }
            },
            "quarantine",
        )
        .await;
        assert_eq!(log.stats().segments_quarantined.get(), 1);
        log.close().await;
    });
    assert!(!seg.exists());
    let (report, seqs) = reopen_and_deliver(&dir, 10);
    assert!(report.events.is_empty(), "{:?}", report.events);
    assert_eq!(seqs, (1001..=1010).collect::<Vec<_>>());
}

#[test]
fn a_flipped_byte_in_a_sealed_segment_skips_its_rest_and_delivers_the_later_ones() {
    let tmp = TempDir::new("flip-sealed");
    let dir = tmp.log();
    write_log(&dir, 12_000, 0);
    let segs = segment_files(&dir);
    assert!(segs.len() >= 3);
    let second_first = first_seq(&segs[1]);
    flip(&segs[0], offset_of(&segs[0], 500) + 30);
    let (report, seqs) = reopen_and_deliver(&dir, 10);
    assert!(
        report.events.contains(&RecoveryEvent::SkippedRange {
            from: 500,
            to: second_first - 1
        }),
        "{:?}",
        report.events
    );
    let expected: Vec<u64> = (1..500).chain(second_first..=12_010).collect();
    assert_eq!(seqs, expected);
    assert_eq!(quarantined(&dir).len(), 1);
}

#[test]
fn a_damaged_header_uses_the_file_name_and_delivers_the_records() {
    let tmp = TempDir::new("bad-header");
    let dir = tmp.log();
    write_log(&dir, 8000, 0);
    let segs = segment_files(&dir);
    flip(&segs[0], 20);
    let (report, seqs) = reopen_and_deliver(&dir, 1);
    assert!(
        report.events.contains(&RecoveryEvent::DamagedHeader {
            segment: segs[0].clone()
        }),
        "{:?}",
        report.events
    );
    assert_eq!(seqs, (1..=8001).collect::<Vec<_>>());
    assert_eq!(
        quarantined(&dir).len(),
        1,
        "kept as evidence once delivered"
    );
}

#[test]
fn a_missing_checkpoint_delivers_everything_again_and_removes_nothing() {
    let tmp = TempDir::new("no-checkpoint");
    let dir = tmp.log();
    write_log(&dir, 3000, 1000);
    let files = segment_files(&dir);
    std::fs::remove_file(dir.join("checkpoint")).unwrap();
    let (report, seqs) = reopen_and_deliver(&dir, 0);
    assert!(
        report.events.contains(&RecoveryEvent::CheckpointMissing),
        "{:?}",
        report.events
    );
    assert_eq!(report.checkpoint, CheckpointState::Missing);
    // Whatever segments were still there are delivered again, from their first record.
    let first = first_seq(&files[0]);
    assert_eq!(seqs, (first..=3000).collect::<Vec<_>>());
    assert_eq!(report.delivered_seq, first - 1);
}

#[test]
fn both_checkpoint_slots_corrupt_is_like_a_missing_checkpoint() {
    let tmp = TempDir::new("corrupt-checkpoint");
    let dir = tmp.log();
    write_log(&dir, 2000, 500);
    let ckpt = dir.join("checkpoint");
    flip(&ckpt, 20);
    flip(&ckpt, 4096 + 20);
    let (report, seqs) = reopen_and_deliver(&dir, 0);
    assert!(
        report.events.contains(&RecoveryEvent::CheckpointCorrupt),
        "{:?}",
        report.events
    );
    assert_eq!(seqs.len() as u64, 2000 - report.delivered_seq);
    assert!(
        seqs.len() >= 1500,
        "at least what the checkpoint did not cover"
    );
    // A fresh checkpoint was written: the next open is clean.
    let (report, _) = reopen_and_deliver(&dir, 0);
    assert!(report.events.is_empty(), "{:?}", report.events);
}

#[test]
fn an_empty_segment_file_is_removed_and_unknown_files_are_left_alone() {
    let tmp = TempDir::new("empty-file");
    let dir = tmp.log();
    write_log(&dir, 100, 0);
    let empty = dir.join(stormgate_buffer::format::segment_file_name(5000));
    std::fs::write(&empty, b"").unwrap();
    let zeros = dir.join(stormgate_buffer::format::segment_file_name(6000));
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, b"operator was here").unwrap();
    let (report, seqs) = reopen_and_deliver(&dir, 1);
    let empties = report
        .events
        .iter()
        .filter(|e| matches!(e, RecoveryEvent::EmptySegment { .. }))
        .count();
    assert_eq!(empties, 2, "{:?}", report.events);
    assert!(report.events.contains(&RecoveryEvent::UnknownFile {
        path: notes.clone()
    }));
    assert!(!empty.exists() && !zeros.exists());
    assert!(notes.exists());
    assert_eq!(seqs, (1..=101).collect::<Vec<_>>());
}

#[test]
fn a_segment_of_garbage_is_quarantined_at_once() {
    let tmp = TempDir::new("garbage-file");
    let dir = tmp.log();
    write_log(&dir, 100, 0);
    let junk = dir.join(stormgate_buffer::format::segment_file_name(7000));
    std::fs::write(&junk, vec![0x5Au8; 100_000]).unwrap();
    let (report, seqs) = reopen_and_deliver(&dir, 1);
    assert!(
        report.events.contains(&RecoveryEvent::NoValidRecords {
            segment: junk.clone()
        }),
        "{:?}",
        report.events
    );
    assert_eq!(seqs, (1..=101).collect::<Vec<_>>());
    assert_eq!(quarantined(&dir).len(), 1);
}

#[test]
fn recovery_never_loops_on_the_same_damage() {
    // The same damaged directory opened twice in a row gives the same outcome both times,
    // without delivering anything in between: no state of its own, no crash loop.
    let tmp = TempDir::new("stable");
    let dir = tmp.log();
    write_log(&dir, 1000, 0);
    let seg = segment_files(&dir).pop().unwrap();
    flip(&seg, offset_of(&seg, 300) + 40);
    let open_once = || {
        run(|| async {
            let (log, report) =
                stormgate_buffer::Log::open(&dir, small_config(), OpenMode::ReadWrite)
                    .await
                    .unwrap();
            drop(log);
            report
        })
    };
    let a = open_once();
    let b = open_once();
    assert_eq!(a.events, b.events);
    assert_eq!(a.undelivered_records, 299);
}

#[test]
fn configuration_is_checked_before_anything_is_touched() {
    let tmp = TempDir::new("bad-config");
    let dir = tmp.log();
    let bad = LogConfig {
        max_bytes: 1 << 20,
        ..small_config()
    };
    run(|| async {
        let err = stormgate_buffer::Log::open(&dir, bad, OpenMode::ReadWrite)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("1048576"), "{err}");
    });
    assert!(!dir.exists());
}
