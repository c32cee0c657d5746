//! `inspect` and `verify` on directories written by the log: a clean one, a damaged one, a
//! parent of several shards; nothing on disk changes.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use stormgate_buffer::offline::{Render, inspect};
use stormgate_buffer::{CheckpointState, OpenMode, RecoveryEvent};

fn write_shard(dir: &std::path::Path, n: u64, delivered: u64) {
    run(|| async {
        let (log, _) = open(dir, small_config(), OpenMode::ReadWrite).await;
        append_n(&log, n).await;
        let mut reader = log.reader().unwrap();
        read_n(&log, &mut reader, delivered as usize, true).await;
        with_timeout(log.wait_durable(n), "durable").await;
        log.close().await;
    });
}

fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn inspect_summarises_every_shard_of_a_buffer_dir() {
    let tmp = TempDir::new("inspect");
    write_shard(&tmp.0.join("shard-0"), 5000, 1200);
    write_shard(&tmp.0.join("shard-1"), 300, 0);
    let before = snapshot(&tmp.0.join("shard-0"));
    let logs = inspect(&tmp.0, 64 << 10).unwrap();
    assert_eq!(logs.len(), 2);
    let (a, b) = (&logs[0], &logs[1]);
    assert!(a.dir.ends_with("shard-0") && b.dir.ends_with("shard-1"));
    assert!(matches!(a.checkpoint, CheckpointState::Valid(c) if c.delivered_seq == 1200));
    assert_eq!((a.delivered_seq, a.undelivered_records), (1200, 3800));
    assert_eq!(a.oldest_undelivered, Some((1201, 1201)));
    assert_eq!(b.undelivered_records, 300);
    assert!(!a.has_damage() && !b.has_damage());
    let text = Render {
        log: a,
        now_ms: 11_201,
    }
    .to_string();
    assert!(text.contains("delivered up to seq 1200"), "{text}");
    assert!(text.contains("undelivered: 3800 records"), "{text}");
    assert!(
        text.contains("oldest undelivered: seq 1201, 10.0 s old"),
        "{text}"
    );
    assert_eq!(
        snapshot(&tmp.0.join("shard-0")),
        before,
        "inspect changes nothing"
    );
    // One shard's directory works as well.
    assert_eq!(inspect(&tmp.0.join("shard-1"), 64 << 10).unwrap().len(), 1);
}

#[test]
fn verify_finds_a_flipped_byte_and_says_where() {
    let tmp = TempDir::new("verify");
    let dir = tmp.log();
    write_shard(&dir, 8000, 0);
    assert!(!inspect(&dir, 64 << 10).unwrap()[0].has_damage());
    let seg = segment_files(&dir)[0].clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, 100_000).unwrap();
    f.write_all_at(&[b[0] ^ 0x04], 100_000).unwrap();
    drop(f);
    let before = snapshot(&dir);
    let logs = inspect(&dir, 64 << 10).unwrap();
    let log = &logs[0];
    assert!(log.has_damage());
    assert!(
        log.events
            .iter()
            .any(|e| matches!(e, RecoveryEvent::Damaged { .. })),
        "{:?}",
        log.events
    );
    let problem = log.segments[0].problem.clone().unwrap();
    assert!(problem.contains("invalid record at"), "{problem}");
    let text = Render { log, now_ms: 0 }.to_string();
    assert!(text.contains("DAMAGE"), "{text}");
    assert_eq!(snapshot(&dir), before, "verify repairs nothing");
}

#[test]
fn a_directory_without_a_buffer_is_an_error() {
    let tmp = TempDir::new("no-buffer");
    let err = inspect(&tmp.0, 64 << 10).unwrap_err();
    assert!(err.to_string().contains("no disk buffer here"), "{err}");
}
