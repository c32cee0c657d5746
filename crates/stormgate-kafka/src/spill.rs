//! The spill file: where records that finally failed delivery go instead of being lost, and
//! `stormgate replay`, which publishes them again.
//!
//! Each shard appends to its own file, `<SPILL_DIR>/shard-<N>.jsonl`, one JSON object per
//! record ([`SpillLine`]): the topic, key, timestamp and value as they were to be produced,
//! the reason delivery failed, when, and on which shard. The file is created on the first
//! failure; a process that never fails a delivery writes nothing.
//!
//! # Writing
//!
//! Failures are rare and come in batches (a drain of delivery reports, a purge at shutdown),
//! so the shard serialises a batch into memory and then writes it in one go: open with
//! `O_APPEND`, take an exclusive `flock`, write, `fdatasync`, close. That is blocking file I/O
//! on the shard's thread, accepted because it happens only when records are being lost
//! otherwise, and bounded by the batch. Reopening by path for every batch is what lets
//! `replay` take a file over safely (below).
//!
//! # Replaying
//!
//! [`replay`] renames the file aside first (`FILE.replaying-<pid>`), so a running server's
//! next failure starts a new file; it then takes and releases the `flock` once, which waits
//! out an append that had the old file open at the moment of the rename. From then on the
//! renamed file is the replay's alone. Every line is produced again; lines that fail again,
//! and lines that cannot be read as a [`SpillLine`], are appended back to `FILE` (under the
//! same lock); the renamed file is removed. Nothing is removed before its records were
//! delivered or written back.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::ClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::KafkaSettings;

/// One spilled record: a line of a spill file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpillLine {
    /// Why delivery failed, e.g. `MessageTimedOut: Local: Message timed out`.
    pub reason: String,
    /// Unix milliseconds when it was spilled.
    pub failed_at_ms: i64,
    /// librdkafka could not tell whether the broker stored it (a request in flight timed out
    /// or was purged at shutdown): it may be in Kafka too, and replaying it may duplicate it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub possibly_delivered: bool,
    /// The shard whose producer failed it (`None` when written back by `replay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
    /// Topic it was produced to.
    pub topic: String,
    /// Record key (the zipcode), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Record timestamp, Unix milliseconds (when the shard read the line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<i64>,
    /// The record value when it is JSON (Stormgate's records always are), embedded as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<RawValue>>,
    /// The record value, base64, when it is not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

impl SpillLine {
    /// A line for a record that failed with `reason`.
    pub fn new(
        reason: String,
        shard: Option<usize>,
        topic: &str,
        key: Option<&[u8]>,
        timestamp_ms: Option<i64>,
        value: Option<&[u8]>,
    ) -> SpillLine {
        let (value, value_base64) = match value {
            None => (None, None),
            Some(v) => match std::str::from_utf8(v)
                .ok()
                .and_then(|s| RawValue::from_string(s.to_owned()).ok())
            {
                Some(raw) => (Some(raw), None),
                None => (None, Some(BASE64.encode(v))),
            },
        };
        SpillLine {
            reason,
            failed_at_ms: unix_ms(),
            possibly_delivered: false,
            shard,
            topic: topic.to_owned(),
            key: key.map(|k| String::from_utf8_lossy(k).into_owned()),
            timestamp_ms,
            value,
            value_base64,
        }
    }

    /// The value's bytes as they were to be produced.
    pub fn value_bytes(&self) -> Result<Option<Vec<u8>>, SpillError> {
        match (&self.value, &self.value_base64) {
            (Some(raw), _) => Ok(Some(raw.get().as_bytes().to_vec())),
            (None, Some(b)) => BASE64
                .decode(b)
                .map(Some)
                .map_err(|_| SpillError::BadBase64),
            (None, None) => Ok(None),
        }
    }
}

/// Why a spill line could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// `value_base64` is not base64.
    #[error("value_base64 is not valid base64")]
    BadBase64,
}

/// The spill file of one shard. Shard-local; see the module doc for how it writes.
#[derive(Debug)]
pub struct SpillFile {
    path: PathBuf,
    pending: Vec<u8>,
    pending_records: u64,
}

impl SpillFile {
    /// Shard `shard`'s spill file in `dir`. Creates nothing yet.
    pub fn new(dir: &Path, shard: usize) -> SpillFile {
        SpillFile {
            path: dir.join(format!("shard-{shard}.jsonl")),
            pending: Vec::new(),
            pending_records: 0,
        }
    }

    /// Where it writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a line to the next [`SpillFile::flush`].
    pub fn push(&mut self, line: &SpillLine) {
        serde_json::to_writer(&mut self.pending, line).expect("a spill line serialises");
        self.pending.push(b'\n');
        self.pending_records += 1;
    }

    /// Records pushed since the last flush.
    pub fn pending(&self) -> u64 {
        self.pending_records
    }

    /// Appends the pushed lines durably; returns how many records that was. On error the
    /// lines are dropped (they are counted as lost by the caller) so a full disk cannot grow
    /// memory.
    pub fn flush(&mut self) -> io::Result<u64> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let n = std::mem::take(&mut self.pending_records);
        let bytes = std::mem::take(&mut self.pending);
        append_locked(&self.path, &bytes)?;
        Ok(n)
    }
}

/// Appends `bytes` to `path` (creating it and its directory) under an exclusive `flock`, and
/// waits for them to reach the disk.
fn append_locked(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    lock(&file)?;
    (&file).write_all(bytes)?;
    file.sync_data()
}

/// Takes `file`'s exclusive lock (`flock` on Linux, which is what a writer of another
/// process takes too), waiting for it; closing the file releases it. A signal's interruption
/// is waited through, as `flock` without `SA_RESTART` would not.
fn lock(file: &File) -> io::Result<()> {
    loop {
        match file.lock() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}

/// What [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Lines read from the file.
    pub lines: u64,
    /// Records delivered (and so removed from the file).
    pub delivered: u64,
    /// Records that failed again, written back to the file with the new reason.
    pub failed: u64,
    /// Lines that are not spill lines, written back unchanged.
    pub unreadable: u64,
}

impl ReplayReport {
    /// Lines left in the file by this replay.
    pub fn kept(&self) -> u64 {
        self.failed + self.unreadable
    }
}

/// Why [`replay`] stopped before it could account for every line.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A file operation failed; `what` says which, on `path`.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done: "taking over", "opening", "reading", ...
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The replay producer could not be created (its settings).
    #[error("creating the replay producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReplayError {
    let path = path.to_path_buf();
    move |source| ReplayError::Io { what, path, source }
}

/// Options of [`replay`].
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Produce everything to this topic instead of each line's own.
    pub topic: Option<String>,
}

/// Publishes every record of the spill file at `path` again with a producer configured by
/// `settings`, removes what was delivered and keeps the rest in `path` (see the module doc).
pub fn replay(
    path: &Path,
    settings: &KafkaSettings,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let taken = taken_name(path);
    fs::rename(path, &taken).map_err(io_error("taking over for the replay", path))?;
    let file = File::open(&taken).map_err(io_error("opening", &taken))?;
    // Waits out a writer that opened the file before the rename; released at once.
    lock(&file).map_err(io_error("locking", &taken))?;
    // Closing the file would release it too: a failed unlock only delays that.
    let _ = file.unlock();

    let mut report = ReplayReport::default();
    let mut lines: Vec<Result<SpillLine, String>> = Vec::new();
    for line in BufReader::new(&file).lines() {
        let line = line.map_err(io_error("reading", &taken))?;
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        lines.push(serde_json::from_str::<SpillLine>(&line).map_err(|_| line));
    }

    let producer: BaseProducer<ReplayContext> = settings
        .client_config(0)
        .set("client.id", "stormgate-replay")
        .create_with_context(ReplayContext::default())?;
    let mut outcome: Vec<Option<Result<(), String>>> = vec![None; lines.len()];
    for (i, line) in lines.iter().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(_) => continue,
        };
        let value = match line.value_bytes() {
            Ok(v) => v,
            Err(e) => {
                outcome[i] = Some(Err(e.to_string()));
                continue;
            }
        };
        let topic = opts.topic.as_deref().unwrap_or(&line.topic);
        loop {
            let mut record = BaseRecord::<str, [u8], usize>::with_opaque_to(topic, i);
            if let Some(k) = &line.key {
                record = record.key(k.as_str());
            }
            if let Some(v) = &value {
                record = record.payload(v.as_slice());
            }
            if let Some(ts) = line.timestamp_ms {
                record = record.timestamp(ts);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    collect(&producer, &mut outcome, Duration::from_millis(10));
                }
                Err((e, _)) => {
                    outcome[i] = Some(Err(e.to_string()));
                    break;
                }
            }
        }
    }
    let deadline = Instant::now() + settings.delivery_timeout + Duration::from_secs(10);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        let _ = producer.flush(Duration::from_millis(100));
        collect(&producer, &mut outcome, Duration::ZERO);
    }
    collect(&producer, &mut outcome, Duration::ZERO);

    let mut keep = Vec::new();
    for (line, result) in lines.into_iter().zip(outcome) {
        match (line, result) {
            (Ok(_), Some(Ok(()))) => report.delivered += 1,
            (Ok(mut l), result) => {
                report.failed += 1;
                l.reason = match result {
                    Some(Err(reason)) => reason,
                    _ => "replay: no delivery report before the delivery timeout".into(),
                };
                l.failed_at_ms = unix_ms();
                serde_json::to_writer(&mut keep, &l).expect("a spill line serialises");
                keep.push(b'\n');
            }
            (Err(raw), _) => {
                report.unreadable += 1;
                keep.extend_from_slice(raw.as_bytes());
                keep.push(b'\n');
            }
        }
    }
    if !keep.is_empty() {
        append_locked(path, &keep).map_err(io_error("writing undelivered lines back to", path))?;
    }
    fs::remove_file(&taken).map_err(io_error("removing", &taken))?;
    Ok(report)
}

fn taken_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".replaying-{}", std::process::id()));
    path.with_file_name(name)
}

/// Moves delivery reports into `outcome`.
fn collect(
    producer: &BaseProducer<ReplayContext>,
    outcome: &mut [Option<Result<(), String>>],
    timeout: Duration,
) {
    producer.poll(timeout);
    let reports = std::mem::take(&mut *producer.context().reports.lock().expect("not poisoned"));
    for (i, r) in reports {
        outcome[i] = Some(r);
    }
}

/// Collects the replay producer's delivery reports (line index, result).
#[derive(Default)]
struct ReplayContext {
    reports: Mutex<Vec<(usize, Result<(), String>)>>,
}

impl ClientContext for ReplayContext {}

impl ProducerContext for ReplayContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, i: usize) {
        let r = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(match e.rdkafka_error_code() {
                Some(code) => format!("{code:?}: {code}"),
                None => e.to_string(),
            }),
        };
        self.reports.lock().expect("not poisoned").push((i, r));
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_lines_keep_json_values_as_json_and_others_as_base64() {
        let json = SpillLine::new(
            "MsgTimedOut".into(),
            Some(1),
            "weather.metrics",
            Some(b"12345"),
            Some(1_700_000_000_000),
            Some(br#"{"zipcode":"12345","metrics":{"t":1.5}}"#),
        );
        let text = serde_json::to_string(&json).unwrap();
        assert!(
            text.contains(r#""value":{"zipcode":"12345","metrics":{"t":1.5}}"#),
            "{text}"
        );
        let back: SpillLine = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.value_bytes().unwrap().unwrap(),
            br#"{"zipcode":"12345","metrics":{"t":1.5}}"#
        );

        let raw = SpillLine::new("x".into(), None, "t", None, None, Some(&[0xff, b'{']));
        let back: SpillLine = serde_json::from_str(&serde_json::to_string(&raw).unwrap()).unwrap();
        assert!(back.value.is_none());
        assert_eq!(back.value_bytes().unwrap().unwrap(), vec![0xff, b'{']);
    }

    #[test]
    fn a_spill_file_appends_one_line_per_record_and_creates_its_directory_lazily() {
        let dir = std::env::temp_dir().join(format!("stormgate-spill-{}", uuid::Uuid::now_v7()));
        let mut spill = SpillFile::new(&dir, 3);
        assert_eq!(spill.flush().unwrap(), 0);
        assert!(!dir.exists(), "nothing is created before a failure");
        for i in 0..3 {
            let value = format!(r#"{{"i":{i}}}"#);
            spill.push(&SpillLine::new(
                "r".into(),
                Some(3),
                "t",
                Some(b"k"),
                None,
                Some(value.as_bytes()),
            ));
        }
        assert_eq!(spill.pending(), 3);
        assert_eq!(spill.flush().unwrap(), 3);
        spill.push(&SpillLine::new("r".into(), Some(3), "t", None, None, None));
        assert_eq!(spill.flush().unwrap(), 1);
        let text = fs::read_to_string(spill.path()).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(spill.path().ends_with("shard-3.jsonl"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
