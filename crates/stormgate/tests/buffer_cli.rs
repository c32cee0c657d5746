//! `stormgate buffer inspect|verify DIR` on a directory the disk buffer wrote.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use stormgate_buffer::{Log, LogConfig, OpenMode, RecordKind};

fn write_buffer(dir: &Path, records: u64) {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .unwrap()
        .run(async {
            let cfg = LogConfig {
                segment_bytes: 2 << 20,
                ..LogConfig::new(64 << 20)
            };
            let (log, _) = Log::open(dir, cfg, OpenMode::ReadWrite).await.unwrap();
            glommio::spawn_local(log.run()).detach();
            for seq in 1..=records {
                let value = format!("{{\"seq\":{seq},\"pad\":\"{:0>200}\"}}", 0);
                log.append(seq as i64, RecordKind::Metrics, b"10115", value.as_bytes())
                    .unwrap();
            }
            log.close().await;
        });
}

fn stormgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stormgate"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn inspect_and_verify_report_each_shard_and_verify_fails_on_damage() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("buffer-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    write_buffer(&base.join("shard-0"), 6000);
    write_buffer(&base.join("shard-1"), 10);
    let dir = base.to_str().unwrap();

    let out = stormgate(&["buffer", "inspect", dir]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("shard-0") && text.contains("shard-1"),
        "{text}"
    );
    assert!(text.contains("undelivered: 6000 records"), "{text}");
    assert!(text.contains("oldest undelivered: seq 1,"), "{text}");
    let out = stormgate(&["buffer", "verify", dir]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("verified: 2 buffer directories, no damage")
    );

    // One flipped byte in the middle of shard-0's first segment.
    let seg = std::fs::read_dir(base.join("shard-0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .min()
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, 200_000).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], 200_000).unwrap();
    let out = stormgate(&["buffer", "verify", dir]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("invalid record at"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 2 buffer directories damaged"));
    // Inspect reports the damage too, without failing.
    assert!(stormgate(&["buffer", "inspect", dir]).status.success());
    let missing = stormgate(&["buffer", "verify", base.join("nowhere").to_str().unwrap()]);
    assert!(!missing.status.success());
    let _ = std::fs::remove_dir_all(&base);
}
