//! The disk buffer on a shard's way (`BUFFER_TYPE=disk`).
//!
//! With a disk buffer a record makes two hops instead of one:
//!
//! ```text
//! connections → queue → [stage] → log (stormgate-buffer) → [feeders] → queue → sink
//!              ledger (Durable)                            ledger (Log)
//! ```
//!
//! - The *stage* takes records from the shard queue in order, appends each to the shard's
//!   log (a memory copy and a CRC) and gives its buffer back at once, so the record's bytes
//!   leave the connection's and the shard's byte budgets. It settles the record in the first
//!   ledger once the `fdatasync` covering it completed: the connection's in-flight count
//!   drops and an acknowledging station gets its `ack` (with `TCP_ACK_AFTER=delivered`
//!   acknowledged records wait instead for the sink's report, through [`LogLink`](crate::ledger::LogLink)).
//! - A *feeder* per log reads records back (from memory while the tail is hot, from disk
//!   after an outage, oldest first) and hands them to the sink through a second queue and a
//!   second ledger, whose settlements report each record to its log ([`LogLink::settled`](crate::ledger::LogLink::settled)):
//!   delivered or finally failed (and spilled) records are done; records the sink gave up at
//!   the shutdown deadline stay in the log for the next start.
//!
//! When the log is full the stage stops taking records (`block`: the queue fills and the
//! connections stop reading, as with a slow broker) or refuses them (`drop_newest`). While
//! storage fails (ENOSPC, EIO) the log keeps appends in memory up to its staging bound, then
//! the stage blocks the same way until the error clears.
//!
//! Directories of shards that no longer exist (`TCP_SHARDS` lowered) are adopted at start by
//! shard `n % shards`, opened to drain, fed like the shard's own log, and removed once
//! everything in them was delivered.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future;
use glommio::channels::local_channel::LocalSender;
use glommio::timer::sleep;
use stormgate_buffer::{AppendError, Log, LogConfig, LogStats, OpenMode, Reader, RecordKind};
use tracing::{info, warn};

use crate::config::{AckAfter, DiskBuffer, WhenFull};
use crate::contract::{DeliveryFailure, Outcome, Record, StartServerError, Ticket};
use crate::gate::ReadGate;
use crate::ledger::{Ledger, LogPlace};
use crate::signal::Notify;
use crate::sink::RecordReceiver;

/// Records a feeder hands to the sink's queue per read of its log.
const FEED_BATCH: usize = 64;
/// How often a task blocked on the log re-checks the shutdown deadline.
const DEADLINE_CHECK: Duration = Duration::from_millis(50);
/// How often an adopted log is checked for being delivered, to remove it.
const ADOPTED_CHECK: Duration = Duration::from_millis(500);
/// How long past the shutdown deadline closing a log may take (its last flush and checkpoint).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Largest segment file. 64 MiB: large enough that creating, preallocating and removing a
/// segment is rare (once per ~250,000 typical records), small enough that a delivered
/// segment frees its space soon.
const MAX_SEGMENT_BYTES: u64 = 64 << 20;
/// Smallest segment file (the log's unit of preallocation and removal).
const MIN_SEGMENT_BYTES: u64 = 1 << 20;

/// The name of shard `id`'s directory in `BUFFER_DIR`.
pub fn shard_dir_name(id: usize) -> String {
    format!("shard-{id}")
}

/// The shard number of a directory named by [`shard_dir_name`].
pub fn parse_shard_dir_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("shard-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One shard's log settings from the process-wide ones: an even share of
/// `BUFFER_MAX_BYTES`, in segments of an eighth of it (1 to 64 MiB), so that a full log is
/// several segments and a delivered one frees a fraction of the share.
pub fn log_config(buffer: &DiskBuffer, nr_shards: usize) -> LogConfig {
    let share = buffer.max_bytes / nr_shards.max(1) as u64;
    let segment = (share / 8 / MIN_SEGMENT_BYTES * MIN_SEGMENT_BYTES)
        .clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
    let mut cfg = LogConfig::new(share);
    cfg.segment_bytes = segment;
    cfg.max_record_bytes = cfg
        .max_record_bytes
        .min((segment - stormgate_buffer::format::SEGMENT_HEADER_BYTES) as usize);
    cfg.sync_interval = buffer.sync_interval;
    cfg
}

/// The directories of `dir` that belong to shards `nr_shards` and above, by adopting shard.
pub fn adopted_dirs(dir: &Path, nr_shards: usize) -> std::io::Result<Vec<Vec<PathBuf>>> {
    let mut adopted = vec![Vec::new(); nr_shards];
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(adopted),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(id) = entry.file_name().to_str().and_then(parse_shard_dir_name) else {
            continue;
        };
        if id >= nr_shards && entry.file_type()?.is_dir() {
            found.push((id, entry.path()));
        }
    }
    found.sort();
    for (id, path) in found {
        adopted[id % nr_shards].push(path);
    }
    Ok(adopted)
}

/// A shard's open logs: its own first, then the adopted ones.
pub(crate) struct ShardLogs {
    pub(crate) logs: Vec<Log>,
    pub(crate) settings: DiskBuffer,
}

impl ShardLogs {
    /// Opens shard `id`'s log and the adopted ones, and starts their background tasks.
    pub(crate) async fn open(
        settings: &DiskBuffer,
        cfg: &LogConfig,
        id: usize,
        adopted: &[PathBuf],
    ) -> Result<ShardLogs, stormgate_buffer::OpenLogError> {
        let own = settings.dir.join(shard_dir_name(id));
        let mut logs = Vec::with_capacity(1 + adopted.len());
        let (log, _) = Log::open(&own, cfg.clone(), OpenMode::ReadWrite).await?;
        spawn_durability(log.run()).detach();
        logs.push(log);
        for dir in adopted {
            let (log, report) = Log::open(dir, cfg.clone(), OpenMode::Drain).await?;
            info!(
                shard = id,
                dir = %dir.display(),
                undelivered = report.undelivered_records,
                "adopted the disk buffer of a shard that no longer exists"
            );
            glommio::spawn_local(log.run()).detach();
            logs.push(log);
        }
        Ok(ShardLogs {
            logs,
            settings: settings.clone(),
        })
    }

    /// The shard's own log's counters.
    pub(crate) fn stats(&self) -> Arc<LogStats> {
        self.logs[0].stats()
    }
}

/// Spawns one of the tasks a durable acknowledgement waits on (the log's group commit, the
/// settler) into the shard's durability task queue: `Latency::Matters`, so that when one of
/// them is woken (a write or an fdatasync completed, the sync interval passed) the executor
/// leaves the connections' queue at its next task switch rather than at the end of its time
/// slice.
fn spawn_durability<T: 'static>(
    future: impl std::future::Future<Output = T> + 'static,
) -> glommio::Task<T> {
    thread_local! {
        static QUEUE: glommio::TaskQueueHandle = glommio::executor().create_task_queue(
            glommio::Shares::default(),
            glommio::Latency::Matters(std::time::Duration::from_millis(1)),
            "durability",
        );
    }
    let queue = QUEUE.with(|q| *q);
    glommio::spawn_local_into(future, queue).expect("the shard's durability queue exists")
}

/// The stage: takes the shard queue's records into the shard's own log and settles each in
/// `ledger` once durable. Returns once the queue closed and every record taken is settled.
pub(crate) async fn stage(
    records: RecordReceiver,
    ledger: Rc<Ledger>,
    log: Log,
    link: Rc<Ledger>,
    settings: DiskBuffer,
) {
    let durable: Rc<RefCell<VecDeque<(u64, Ticket)>>> = Rc::default();
    let more = Rc::new(Notify::default());
    let ended = Rc::new(Cell::new(false));
    let settler = spawn_durability(settle_durable(
        log.clone(),
        Rc::clone(&ledger),
        Rc::clone(&durable),
        Rc::clone(&more),
        Rc::clone(&ended),
    ));
    while let Some(record) = records.recv().await {
        let kind = if record.dead_letter {
            RecordKind::DeadLetter
        } else {
            RecordKind::Metrics
        };
        loop {
            let appended = log.append(
                record.timestamp_ms,
                kind,
                record.key.as_bytes(),
                &record.value,
            );
            let failure = match appended {
                Ok(seq) => {
                    ledger.release_bytes(record.ticket);
                    if settings.ack_after == AckAfter::Delivered && ledger.is_acked(record.ticket) {
                        awaiting(&link).borrow_mut().insert(seq, record.ticket);
                    } else {
                        durable.borrow_mut().push_back((seq, record.ticket));
                        more.notify();
                    }
                    None
                }
                Err(AppendError::Full) if settings.when_full == WhenFull::DropNewest => {
                    Some(DeliveryFailure::BufferFull)
                }
                Err(AppendError::Full | AppendError::Busy | AppendError::Failed) => {
                    if past(&ledger) {
                        Some(DeliveryFailure::ShutdownDeadline)
                    } else {
                        ledger.metrics.backpressure_waits.incr();
                        future::or(log.writable(), sleep(DEADLINE_CHECK)).await;
                        continue;
                    }
                }
                Err(AppendError::TooLarge) => Some(DeliveryFailure::Rejected {
                    reason: "record larger than the disk buffer's largest record".into(),
                }),
                Err(AppendError::Closed) => Some(DeliveryFailure::ShutdownDeadline),
            };
            if let Some(failure) = failure {
                ledger.settle(record.ticket, Outcome::Failed(failure));
            }
            break;
        }
        ledger.payloads.give(record.value);
    }
    ended.set(true);
    more.notify();
    settler.await;
    // Acknowledged records waiting for delivery: the sink reports them until the deadline.
    while !awaiting(&link).borrow().is_empty() && !past(&ledger) {
        sleep(DEADLINE_CHECK).await;
    }
    let left: Vec<Ticket> = awaiting(&link)
        .borrow_mut()
        .drain()
        .map(|(_, t)| t)
        .collect();
    for ticket in left {
        ledger.settle(ticket, Outcome::Failed(DeliveryFailure::ShutdownDeadline));
    }
}

/// The `awaiting` map of the sink's ledger's link.
fn awaiting(sink_ledger: &Ledger) -> &RefCell<HashMap<u64, Ticket>> {
    &sink_ledger.log_link().awaiting
}

fn past(ledger: &Ledger) -> bool {
    ledger.deadline.get().is_some_and(|d| Instant::now() >= d)
}

/// Settles the stage's records as the log makes them durable: one wait per flush, then
/// every record it covered. At the shutdown deadline what is not durable yet (storage
/// failing) is settled as failed: its station is told `shutdown` and resends.
async fn settle_durable(
    log: Log,
    ledger: Rc<Ledger>,
    records: Rc<RefCell<VecDeque<(u64, Ticket)>>>,
    more: Rc<Notify>,
    ended: Rc<Cell<bool>>,
) {
    loop {
        let first = records.borrow().front().map(|&(seq, _)| seq);
        let Some(first) = first else {
            if ended.get() {
                return;
            }
            more.notified().await;
            continue;
        };
        let durable = future::or(async { Some(log.wait_durable(first).await) }, async {
            sleep(DEADLINE_CHECK).await;
            None
        })
        .await;
        let (upto, outcome) = match durable {
            Some(upto) => (upto, Outcome::Delivered),
            None if past(&ledger) => (u64::MAX, Outcome::Failed(DeliveryFailure::ShutdownDeadline)),
            None => continue,
        };
        loop {
            let next = {
                let mut records = records.borrow_mut();
                match records.front() {
                    Some(&(seq, ticket)) if seq <= upto => {
                        records.pop_front();
                        Some(ticket)
                    }
                    _ => None,
                }
            };
            let Some(ticket) = next else { break };
            ledger.settle(ticket, outcome.clone());
        }
    }
}

/// The sink's side: hands one log's records to the sink's queue, each with a ticket of the
/// sink's ledger. Returns once the log is read to its end and no record can be appended any
/// more (`ended`, or a log opened to drain), or at the shutdown deadline.
pub(crate) async fn feed(
    index: usize,
    mut reader: Reader,
    ledger: Rc<Ledger>,
    queue: Rc<LocalSender<Record>>,
    gate: Rc<ReadGate>,
    ended: Rc<Cell<bool>>,
) {
    let log = ledger.log_link().logs[index].clone();
    let appendable = index == 0;
    let mut batch: Vec<Record> = Vec::with_capacity(FEED_BATCH);
    let mut keys = KeyCache::default();
    loop {
        if past(&ledger) {
            return;
        }
        let caught_up = reader.next_seq() > log.last_seq();
        if caught_up && (!appendable || ended.get()) && log.outstanding() == 0 {
            return;
        }
        // Read once per batch, at its first record (after any wait for an append): the
        // records of one read are taken in the same instant.
        let mut clock: Option<Clock> = None;
        let mut take = |view: stormgate_buffer::RecordView<'_>| {
            let clock = *clock.get_or_insert_with(Clock::now);
            batch.push(to_record(&ledger, index, view, clock, &mut keys));
            ControlFlow::Continue(())
        };
        if caught_up {
            // Nothing to read: wait for an append (or a record asked for again) or the next
            // check of the end of appends and of the deadline.
            future::or(
                async {
                    reader.read(FEED_BATCH, &mut take).await;
                },
                sleep(DEADLINE_CHECK),
            )
            .await;
        } else {
            reader.read(FEED_BATCH, &mut take).await;
        }
        for record in batch.drain(..) {
            gate.enqueued();
            if let Err(e) = queue.send(record).await {
                warn!(error = %e, "the sink's queue closed while the disk buffer fed it");
                return;
            }
        }
    }
}

/// The two clocks a record's hand-over needs: the wall clock (its timestamp is one) and the
/// monotonic one (the ledger's). A clock read costs ~20 ns; two per record were 2% of a
/// shard's time at 600K records/s, so a batch reads them once.
#[derive(Clone, Copy)]
struct Clock {
    unix_ms: i64,
    now: Instant,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |now| now.as_millis() as i64),
            now: Instant::now(),
        }
    }
}

/// Record keys (station zipcodes) read back from the log, shared: a record's key is an
/// `Rc<str>` and a station sends many records, so a hit saves an allocation and its free
/// per record (the memory path clones the station's key). Direct-mapped by a hash of the
/// key: a miss (another key in the slot, or a new station) allocates and takes the slot.
/// Written by hand because it is on the per-record path and needs no eviction policy.
struct KeyCache {
    slots: Vec<Option<Rc<str>>>,
}

/// Slots of a [`KeyCache`]: a few KiB per feeder, room for the stations of a busy shard.
const KEY_CACHE_SLOTS: usize = 1024;

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache {
            slots: vec![None; KEY_CACHE_SLOTS],
        }
    }
}

impl KeyCache {
    fn get(&mut self, key: &[u8]) -> Rc<str> {
        // FNV-1a: keys are a few bytes.
        let hash = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let slot = &mut self.slots[hash as usize % KEY_CACHE_SLOTS];
        match slot {
            Some(k) if k.as_bytes() == key => Rc::clone(k),
            _ => {
                let k: Rc<str> = Rc::from(String::from_utf8_lossy(key).as_ref());
                *slot = Some(Rc::clone(&k));
                k
            }
        }
    }
}

/// A record handed out by log `index` as the sink takes it, at `clock`.
fn to_record(
    ledger: &Ledger,
    index: usize,
    view: stormgate_buffer::RecordView<'_>,
    clock: Clock,
    keys: &mut KeyCache,
) -> Record {
    let dead_letter = view.kind == RecordKind::DeadLetter;
    // Latency counts from when the line was read, also across a restart.
    let age = clock.unix_ms.saturating_sub(view.timestamp_ms).max(0) as u64;
    let now = clock.now;
    let read_at = now.checked_sub(Duration::from_millis(age)).unwrap_or(now);
    let at = LogPlace {
        log: index as u32,
        seq: view.seq,
    };
    let ticket = ledger.open_logged(read_at, dead_letter, at);
    let mut value = ledger.payloads.take();
    value.extend_from_slice(view.value);
    Record {
        key: keys.get(view.key),
        value,
        timestamp_ms: view.timestamp_ms,
        ticket,
        dead_letter,
    }
}

/// After the sink finished: closes every log (a last checkpoint; what was not delivered
/// stays for the next start). Bounded: past the shutdown deadline plus [`CLOSE_GRACE`] a log
/// whose storage still fails is left as it is — what was durable stays, and nothing that was
/// not durable was acknowledged — so that a failing disk cannot hold the process past its
/// deadline.
pub(crate) async fn close(logs: &ShardLogs, shard: usize, deadline: Option<Instant>) {
    let give_up = deadline.unwrap_or_else(Instant::now) + CLOSE_GRACE;
    for log in &logs.logs {
        let closed = future::or(
            async {
                log.close().await;
                true
            },
            async {
                sleep(give_up.saturating_duration_since(Instant::now())).await;
                false
            },
        )
        .await;
        if !closed {
            warn!(
                shard,
                dir = %log.dir().display(),
                "disk buffer not closed by the shutdown deadline (storage failing?): its \
                 durable records stay for the next start, the others were not acknowledged"
            );
        }
    }
}

/// Removes adopted logs once everything in them was delivered and checkpointed, while the
/// shard runs.
pub(crate) async fn remove_adopted_when_drained(logs: Vec<Log>, stop: Rc<Cell<bool>>) {
    let mut left = logs;
    while !left.is_empty() && !stop.get() {
        sleep(ADOPTED_CHECK).await;
        let mut keep = Vec::with_capacity(left.len());
        for log in left {
            if log.is_drained() {
                let dir = log.dir().to_path_buf();
                match log.remove_drained().await {
                    Ok(true) => {
                        info!(dir = %dir.display(), "adopted disk buffer delivered and removed")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot remove a delivered disk buffer")
                    }
                }
            } else {
                keep.push(log);
            }
        }
        left = keep;
    }
}

/// Checks the disk buffer's settings against the machine before any shard starts: each
/// shard's share makes a valid log, `BUFFER_DIR` exists (created if missing) and its file
/// system can hold `BUFFER_MAX_BYTES`. Returns the log settings and, per shard, the
/// directories it adopts.
pub(crate) fn prepare(
    settings: &DiskBuffer,
    nr_shards: usize,
) -> Result<(LogConfig, Vec<Vec<PathBuf>>), StartServerError> {
    use StartServerError::BufferSettings;
    let dir = &settings.dir;
    let cfg = log_config(settings, nr_shards);
    cfg.validate().map_err(|e| {
        BufferSettings(format!(
            "BUFFER_MAX_BYTES {} split over {nr_shards} shards is {} bytes each, too small: {e}",
            settings.max_bytes, cfg.max_bytes
        ))
    })?;
    std::fs::create_dir_all(dir)
        .map_err(|e| BufferSettings(format!("cannot create BUFFER_DIR {}: {e}", dir.display())))?;
    let free = free_bytes(dir)
        .map_err(|e| BufferSettings(format!("cannot stat BUFFER_DIR {}: {e}", dir.display())))?;
    let used = used_bytes(dir);
    if settings.max_bytes > free.saturating_add(used) {
        return Err(BufferSettings(format!(
            "BUFFER_MAX_BYTES is {} bytes but the file system of BUFFER_DIR {} can hold {} \
             ({free} free + {used} already in the buffer); lower BUFFER_MAX_BYTES or free space",
            settings.max_bytes,
            dir.display(),
            free.saturating_add(used),
        )));
    }
    let adopted = adopted_dirs(dir, nr_shards)
        .map_err(|e| BufferSettings(format!("cannot list BUFFER_DIR {}: {e}", dir.display())))?;
    Ok((cfg, adopted))
}

/// Bytes an unprivileged process may still write on the file system of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is NUL-terminated and `st` is written by the call before it is read.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Bytes the files under `dir` occupy on disk (what the buffer already holds).
fn used_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => used_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, max_bytes: u64) -> DiskBuffer {
        DiskBuffer {
            dir: dir.to_path_buf(),
            max_bytes,
            when_full: WhenFull::Block,
            sync_interval: Duration::from_millis(2),
            ack_after: AckAfter::Durable,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "stormgate-disk-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn each_shard_gets_an_even_share_in_segments_of_an_eighth() {
        let dir = Path::new("/unused");
        let one = log_config(&settings(dir, 1 << 30), 2);
        assert_eq!(one.max_bytes, 512 << 20);
        assert_eq!(one.segment_bytes, 64 << 20);
        assert_eq!(one.validate(), Ok(()));
        let small = log_config(&settings(dir, 16 << 20), 1);
        assert_eq!(small.segment_bytes, 2 << 20);
        assert!(small.max_record_bytes <= (2 << 20) - 4096);
        assert_eq!(small.validate(), Ok(()));
        // Below 1 MiB segments the share cannot hold two: refused by validation.
        assert!(log_config(&settings(dir, 1 << 20), 4).validate().is_err());
    }

    #[test]
    fn the_key_cache_shares_a_stations_key_and_never_returns_another() {
        let mut keys = KeyCache::default();
        let a = keys.get(b"12345");
        assert!(Rc::ptr_eq(&a, &keys.get(b"12345")), "a hit shares the key");
        // More keys than slots: collisions replace, and every answer is the key asked for.
        for i in 0..4 * KEY_CACHE_SLOTS {
            let key = format!("{i:05}");
            assert_eq!(&*keys.get(key.as_bytes()), key);
        }
        assert_eq!(&*keys.get(b"12345"), "12345");
        // Not UTF-8: replaced, never a hit for another key's bytes.
        assert_eq!(&*keys.get(b"\xff1"), "\u{fffd}1");
        assert_eq!(&*keys.get("\u{fffd}1".as_bytes()), "\u{fffd}1");
    }

    #[test]
    fn shard_directories_are_named_and_parsed_strictly() {
        assert_eq!(shard_dir_name(7), "shard-7");
        assert_eq!(parse_shard_dir_name("shard-7"), Some(7));
        for bad in [
            "shard-",
            "shard-x",
            "shard--1",
            "shard-1.bak",
            "Shard-1",
            "quarantine",
        ] {
            assert_eq!(parse_shard_dir_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn directories_of_missing_shards_go_to_shard_n_modulo_the_count() {
        let dir = temp_dir("adopt");
        for name in ["shard-0", "shard-1", "shard-2", "shard-5", "other"] {
            std::fs::create_dir(dir.join(name)).unwrap();
        }
        std::fs::write(dir.join("shard-9"), b"a file, not a directory").unwrap();
        let adopted = adopted_dirs(&dir, 2).unwrap();
        assert_eq!(adopted[0], vec![dir.join("shard-2")]);
        assert_eq!(adopted[1], vec![dir.join("shard-5")]);
        assert!(adopted_dirs(&dir, 8).unwrap().iter().all(Vec::is_empty));
        assert_eq!(
            adopted_dirs(&dir.join("absent"), 2).unwrap(),
            vec![Vec::<PathBuf>::new(); 2]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bound_the_file_system_cannot_hold_is_refused_with_its_numbers() {
        let dir = temp_dir("capacity");
        let err = prepare(&settings(&dir, 1 << 60), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&(1u64 << 60).to_string()), "{err}");
        assert!(
            err.contains("free") && err.contains(dir.to_str().unwrap()),
            "{err}"
        );
        let err = prepare(&settings(&dir, 3 << 20), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3145728") && err.contains("2 shards"), "{err}");
        let (cfg, adopted) = prepare(&settings(&dir.join("new"), 64 << 20), 2).unwrap();
        assert!(dir.join("new").is_dir(), "BUFFER_DIR is created");
        assert_eq!((cfg.max_bytes, adopted.len()), (32 << 20, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
