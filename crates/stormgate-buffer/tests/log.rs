//! The log end to end on the real file system: append, durability, reading back, delivery,
//! checkpoints, removal, bounds, and opening again after a clean stop or a crash.

mod common;

use std::ops::ControlFlow;
use std::time::Duration;

use common::*;
use stormgate_buffer::{AppendError, CheckpointState, LogConfig, OpenMode, RecordKind};

#[test]
fn appended_records_become_durable_and_read_back_in_order_across_segments() {
    let tmp = TempDir::new("roundtrip");
    let dir = tmp.log();
    let n = 20_000;
    run(|| async {
        let (log, report) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        assert!(report.events.is_empty(), "{:?}", report.events);
        let last = append_n(&log, n).await;
        assert_eq!(last, n);
        with_timeout(log.wait_durable(n), "durability").await;
        assert!(
            segment_files(&dir).len() >= 5,
            "20,000 records of ~270 bytes fill 5+ 1 MiB segments"
        );
        let mut reader = log.reader().unwrap();
        let seqs = read_n(&log, &mut reader, n as usize, true).await;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
        assert_eq!(log.delivered_seq(), n);
        wait_checkpointed(&log, n).await;
        // Every sealed segment is removed once the checkpoint covers it; the active one stays.
        with_timeout(
            async {
                while segment_files(&dir).len() > 1 {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
            },
            "segment removal",
        )
        .await;
        let stats = log.stats();
        assert_eq!(stats.appended_records.get(), n);
        assert!(stats.fsyncs.get() > 0 && stats.flushes.get() > 0);
        assert!(stats.segments_removed.get() >= 4);
        // Each flush times its oldest record's wait, its writes and its whole way to
        // durable once; its fdatasyncs (a segment's each, a checkpoint's) at least as often.
        let flushes = stats.flushes.get();
        for (name, h) in [
            ("durable", &stats.durable_latency),
            ("flush wait", &stats.flush_wait_latency),
            ("write", &stats.write_latency),
        ] {
            assert_eq!(h.snapshot().count(), flushes, "{name}");
        }
        assert!(stats.fsync_latency.snapshot().count() >= flushes);
        log.close().await;
    });
    run(|| async {
        let (log, report) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        assert!(report.events.is_empty(), "{:?}", report.events);
        assert_eq!(
            (
                report.delivered_seq,
                report.next_seq,
                report.undelivered_records
            ),
            (n, n + 1, 0)
        );
        assert_eq!(
            log.append(0, RecordKind::DeadLetter, b"", b"next"),
            Ok(n + 1)
        );
        log.close().await;
    });
}

#[test]
fn a_reader_close_behind_the_writer_reads_from_memory_and_a_late_one_from_disk() {
    let tmp = TempDir::new("memory-disk");
    let dir = tmp.log();
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        let mut reader = log.reader().unwrap();
        append_n(&log, 500).await;
        read_n(&log, &mut reader, 500, true).await;
        let stats = log.stats();
        assert_eq!(
            (
                stats.read_memory_records.get(),
                stats.read_disk_records.get()
            ),
            (500, 0)
        );
        // Far more than memory_bytes (1 MiB) behind: the oldest come from disk.
        append_n(&log, 20_000).await;
        with_timeout(log.wait_durable(20_500), "durability").await;
        read_n(&log, &mut reader, 20_000, true).await;
        assert!(
            stats.read_disk_records.get() > 10_000,
            "{}",
            stats.read_disk_records.get()
        );
        assert!(stats.read_memory_records.get() > 500);
        log.close().await;
    });
}

/// With nothing delivered (the broker down) the watermark never moves: the buffer's gauges
/// must still count every record made durable, at the moment it is durable, not at the next
/// checkpoint (an hour away here).
#[test]
fn the_gauges_count_durable_records_while_nothing_is_delivered() {
    let tmp = TempDir::new("gauges");
    let dir = tmp.log();
    run(|| async {
        let config = LogConfig {
            checkpoint_interval: Duration::from_secs(3600),
            ..small_config()
        };
        let (log, _) = open(&dir, config, OpenMode::ReadWrite).await;
        for n in [1u64, 100, 1_000] {
            let last = append_n(&log, n).await;
            with_timeout(log.wait_durable(last), "durability").await;
            let stats = log.stats();
            assert_eq!(
                stats.records.get() as u64,
                last,
                "after {last} durable records"
            );
            assert!(stats.disk_bytes.get() > 0);
        }
        log.close().await;
    });
}

#[test]
fn records_not_yet_durable_can_be_read_and_the_watermark_waits_for_durability() {
    let tmp = TempDir::new("nondurable");
    let dir = tmp.log();
    run(|| async {
        let cfg = stormgate_buffer::LogConfig {
            sync_interval: Duration::from_secs(3600),
            ..small_config()
        };
        let (log, _) = open(&dir, cfg, OpenMode::ReadWrite).await;
        let mut reader = log.reader().unwrap();
        append_n(&log, 10).await;
        assert_eq!(log.durable_seq(), 0, "the window is an hour");
        read_n(&log, &mut reader, 10, true).await;
        assert_eq!(
            log.delivered_seq(),
            0,
            "delivered but not durable: not in the watermark"
        );
        log.close().await;
        assert_eq!(log.durable_seq(), 10);
        assert_eq!(
            log.checkpointed_seq(),
            10,
            "close flushes, then checkpoints"
        );
    });
}

#[test]
fn done_in_any_order_and_retries_move_the_watermark_only_over_a_contiguous_prefix() {
    let tmp = TempDir::new("retry");
    let dir = tmp.log();
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        let mut reader = log.reader().unwrap();
        append_n(&log, 100).await;
        with_timeout(log.wait_durable(100), "durability").await;
        read_n(&log, &mut reader, 100, false).await;
        for s in (1..=100).rev().filter(|s| s % 10 != 0) {
            log.done(s);
        }
        assert_eq!(log.delivered_seq(), 9);
        log.retry(10);
        log.retry(50);
        // Retried records come back first, then nothing new.
        let again = read_n(&log, &mut reader, 2, false).await;
        assert_eq!(again, vec![10, 50]);
        for s in (10..=100).step_by(10) {
            log.done(s);
        }
        assert_eq!(log.delivered_seq(), 100);
        assert_eq!(log.outstanding(), 0);
        assert_eq!(log.stats().retried_records.get(), 2);
        log.close().await;
    });
}

#[test]
fn a_declined_record_stays_first_in_line() {
    let tmp = TempDir::new("declined");
    let dir = tmp.log();
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        let mut reader = log.reader().unwrap();
        append_n(&log, 5).await;
        let mut seen = Vec::new();
        let n = reader
            .read(10, |r| {
                if r.seq == 3 {
                    return ControlFlow::Break(());
                }
                seen.push(r.seq);
                ControlFlow::Continue(())
            })
            .await;
        assert_eq!((n, seen.as_slice()), (2, &[1, 2][..]));
        assert_eq!(read_n(&log, &mut reader, 3, true).await, vec![3, 4, 5]);
        log.close().await;
    });
}

#[test]
fn max_bytes_is_never_exceeded_and_appends_resume_once_segments_are_delivered() {
    let tmp = TempDir::new("max-bytes");
    let dir = tmp.log();
    let cfg = stormgate_buffer::LogConfig {
        max_bytes: 4 << 20,
        ..small_config()
    };
    run(|| async {
        let (log, _) = open(&dir, cfg.clone(), OpenMode::ReadWrite).await;
        let mut appended = 0u64;
        let mut high_water = 0;
        loop {
            let seq = appended + 1;
            match log.append(seq as i64, RecordKind::Metrics, &key(seq), &value(seq)) {
                Ok(_) => appended += 1,
                Err(AppendError::Full) => break,
                Err(AppendError::Busy) => with_timeout(log.writable(), "staging").await,
                Err(e) => panic!("{e}"),
            }
            if appended.is_multiple_of(1000) {
                glommio::yield_if_needed().await;
                high_water = high_water.max(allocated_bytes(&dir));
            }
        }
        with_timeout(log.wait_durable(appended), "durability").await;
        high_water = high_water.max(allocated_bytes(&dir));
        assert!(
            high_water <= cfg.max_bytes,
            "{high_water} > {}",
            cfg.max_bytes
        );
        assert!(
            appended > 8_000,
            "3 segments of 1 MiB hold ~11,000 records: {appended}"
        );
        let next = appended + 1;
        assert_eq!(
            log.append(0, RecordKind::Metrics, &key(next), &value(next)),
            Err(AppendError::Full)
        );
        assert!(log.stats().full_events.get() >= 2);
        assert!(log.stats().disk_bytes.get() as u64 <= cfg.max_bytes);
        // Deliver everything: segments go, room comes back.
        let mut reader = log.reader().unwrap();
        read_n(&log, &mut reader, appended as usize, true).await;
        with_timeout(log.writable(), "room after delivery").await;
        assert_eq!(
            log.append(
                1,
                RecordKind::Metrics,
                &key(appended + 1),
                &value(appended + 1)
            ),
            Ok(appended + 1)
        );
        assert!(allocated_bytes(&dir) <= cfg.max_bytes);
        log.close().await;
    });
}

#[test]
fn oversized_records_are_refused_and_counted() {
    let tmp = TempDir::new("too-large");
    let dir = tmp.log();
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        let big = vec![0u8; 64 << 10];
        assert_eq!(
            log.append(0, RecordKind::Metrics, b"k", &big),
            Err(AppendError::TooLarge)
        );
        assert_eq!(
            log.append(0, RecordKind::Metrics, &vec![b'k'; 70_000], b""),
            Err(AppendError::TooLarge)
        );
        assert_eq!(log.stats().too_large.get(), 2);
        assert_eq!(
            log.append(0, RecordKind::Metrics, b"k", &big[..60_000]),
            Ok(1)
        );
        log.close().await;
        assert_eq!(
            log.append(0, RecordKind::Metrics, b"k", b"v"),
            Err(AppendError::Closed)
        );
    });
}

#[test]
fn segments_are_removed_only_after_a_durable_checkpoint_past_their_end() {
    let tmp = TempDir::new("remove-after-checkpoint");
    let dir = tmp.log();
    let cfg = stormgate_buffer::LogConfig {
        checkpoint_interval: Duration::from_secs(3600),
        ..small_config()
    };
    let n = 10_000;
    run(|| async {
        let (log, _) = open(&dir, cfg.clone(), OpenMode::ReadWrite).await;
        append_n(&log, n).await;
        with_timeout(log.wait_durable(n), "durability").await;
        let mut reader = log.reader().unwrap();
        read_n(&log, &mut reader, n as usize, true).await;
        assert_eq!(log.delivered_seq(), n);
        glommio::timer::sleep(Duration::from_millis(100)).await;
        // Delivered, but the checkpoint (hourly here) has not covered it: every file stays.
        assert!(log.checkpointed_seq() < n);
        assert!(segment_files(&dir).len() >= 3);
        // Crash now: everything after the last checkpoint is delivered again, nothing is lost.
    });
    run(|| async {
        let (log, report) = open(&dir, cfg.clone(), OpenMode::ReadWrite).await;
        assert!(report.events.is_empty(), "{:?}", report.events);
        assert_eq!(report.undelivered_records, n - report.delivered_seq);
        let mut reader = log.reader().unwrap();
        let again = read_n(&log, &mut reader, report.undelivered_records as usize, true).await;
        assert_eq!(again.first(), Some(&(report.delivered_seq + 1)));
        // close() writes the checkpoint, and only then removes the sealed segments.
        log.close().await;
        assert_eq!(log.checkpointed_seq(), n);
        assert_eq!(segment_files(&dir).len(), 1);
    });
}

#[test]
fn a_leftover_directory_is_drained_read_only_then_removed() {
    let tmp = TempDir::new("drain");
    let dir = tmp.log();
    let n = 6_000;
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        append_n(&log, n).await;
        log.close().await;
    });
    run(|| async {
        let (log, report) = open(&dir, small_config(), OpenMode::Drain).await;
        assert_eq!(report.undelivered_records, n);
        assert_eq!(
            log.append(0, RecordKind::Metrics, b"k", b"v"),
            Err(AppendError::Closed)
        );
        let mut reader = log.reader().unwrap();
        let seqs = read_n(&log, &mut reader, n as usize, true).await;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
        with_timeout(
            async {
                while !log.is_drained() {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
            },
            "drained",
        )
        .await;
        assert!(log.remove_drained().await.unwrap());
    });
    assert!(!dir.exists());
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let tmp = TempDir::new("lock");
    let dir = tmp.log();
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        let second = stormgate_buffer::Log::open(&dir, small_config(), OpenMode::Drain).await;
        assert!(
            matches!(second, Err(stormgate_buffer::OpenLogError::Locked { .. })),
            "{second:?}"
        );
        log.close().await;
    });
}

#[test]
fn the_checkpoint_alternates_slots_and_survives_a_torn_slot() {
    let tmp = TempDir::new("checkpoint-slots");
    let dir = tmp.log();
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        let mut reader = log.reader().unwrap();
        append_n(&log, 100).await;
        read_n(&log, &mut reader, 50, true).await;
        with_timeout(log.wait_durable(100), "durable").await;
        wait_checkpointed(&log, 50).await;
        read_n(&log, &mut reader, 50, true).await;
        log.close().await;
    });
    // The newest slot holds 100; tear it: the previous one (50) is used.
    let path = dir.join("checkpoint");
    let bytes = std::fs::read(&path).unwrap();
    let newest = match stormgate_buffer::format::CheckpointSlot::pick(&bytes) {
        Some(c) => c,
        None => panic!("no checkpoint"),
    };
    assert_eq!(newest.delivered_seq, 100);
    let mut torn = bytes.clone();
    torn[newest.slot() * 4096 + 20] ^= 0xFF;
    std::fs::write(&path, &torn).unwrap();
    run(|| async {
        let (log, report) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        match report.checkpoint {
            CheckpointState::Valid(c) => assert_eq!(c.delivered_seq, 50),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            report.undelivered_records, 50,
            "delivered again, never lost"
        );
        log.close().await;
    });
}

#[test]
fn gauges_follow_the_undelivered_records_and_the_files() {
    let tmp = TempDir::new("gauges");
    let dir = tmp.log();
    run(|| async {
        let (log, _) = open(&dir, small_config(), OpenMode::ReadWrite).await;
        let stats = log.stats();
        let mut reader = log.reader().unwrap();
        append_n(&log, 100).await;
        with_timeout(log.wait_durable(100), "durable").await;
        let seqs = read_n(&log, &mut reader, 10, false).await;
        for &s in &seqs[1..] {
            log.done(s);
        }
        // Record 1 (timestamp 1) is outstanding: the oldest, after the next checkpoint tick.
        with_timeout(
            async {
                while stats.oldest_timestamp_ms.get() != 1 {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
            },
            "the oldest-record gauge",
        )
        .await;
        assert_eq!(stats.records.get(), 100);
        assert_eq!(log.outstanding(), 1);
        // One segment and the spare, 1 MiB each, and the checkpoint.
        assert_eq!(stats.disk_bytes.get(), (2 << 20) + 8192);
        assert_eq!(
            stats.disk_bytes.get() as u64,
            allocated_bytes(&dir),
            "what du says"
        );
        log.done(1);
        read_n(&log, &mut reader, 90, true).await;
        assert_eq!(
            (stats.records.get(), stats.oldest_timestamp_ms.get()),
            (0, 0)
        );
        wait_checkpointed(&log, 100).await;
        assert_eq!(stats.checkpointed_seq.get(), 100);
        log.close().await;
    });
}
