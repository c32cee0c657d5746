//! What a connection does with the bytes it read, apart from reading them: frames them into
//! lines, parses each, and decides — a record for the shard queue, an answer for the
//! station, a block (the queue, the connection's caps, the shard's byte budget, unread
//! answers), a close. [`LineHandler`] owns no socket: `connection` reads, waits and writes
//! around it, and the tests below drive it with bytes and made-up read times.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::channels::local_channel::LocalSender;
use glommio::{GlommioError, ResourceType};
use stormgate_protocol::{DeadLetter, ErrorCode, Frame, LineFramer, Parsed, Session};
use stormgate_telemetry::Event;

use crate::acks::ConnectionAcks;
use crate::auth::{Credentials, StationAuth};
use crate::buffers::Leftover;
use crate::config::RuntimeConfig;
use crate::contract::{DeliveryFailure, Outcome, Record};
use crate::core::ShardCore;
use crate::events::{LineRejected, StationAuthFailed};
use crate::ledger::{ConnectionFlow, Entry};
use crate::policy::{Closing, Policy, Timeouts};

/// Most bytes of answers a connection queues for its station before it stops handling lines
/// and waits for them to be written: a station that does not read its answers is not read
/// either (an error line is ~100 bytes, so ~160 answers; acks coalesce).
pub(crate) const REPLY_MAX: usize = 16 * 1024;
/// A line that panics when handled: the fault the tests inject.
#[cfg(test)]
pub(crate) const PANIC_LINE: &[u8] = b"{\"type\":\"__injected_panic__\"}";

/// What line handling needs of the connection's shard and socket.
pub(crate) struct Env<'a> {
    pub(crate) core: &'a ShardCore,
    pub(crate) queue: &'a LocalSender<Record>,
    /// The station's TLS client certificate, when it showed one.
    pub(crate) certificate: Option<&'a [u8]>,
}

/// One connection's state between the bytes read and the shard: framing, session, policy,
/// answers owed, the record being encoded, what blocked it.
pub(crate) struct LineHandler {
    pub(crate) peer: SocketAddr,
    /// The connection's in-flight count, when it has a cap.
    pub(crate) flow: Option<Rc<ConnectionFlow>>,
    pub(crate) session: Session,
    pub(crate) framer: LineFramer,
    /// Received bytes not yet handled: a partial line, or lines behind a block.
    pub(crate) leftover: Leftover,
    /// Error lines waiting to be written to the station.
    pub(crate) replies: Vec<u8>,
    /// The value buffer the next record is encoded into: from the shard's pool while lines
    /// are being handled, empty (no allocation) between reads.
    payload: Vec<u8>,
    /// When the bytes being handled were read.
    pub(crate) stamp: ReadStamp,
    /// The read deadline (the shard expires the connection then:
    /// `ShardCore::expire_overdue`), the line rate's budget, bad lines and refused
    /// identifies, and whether the server decided to close the connection.
    pub(crate) policy: Policy,
    pub(crate) blocked: Option<Blocked>,
    /// Answers owed to the station, once it asked for acknowledgements.
    pub(crate) acks: Option<Rc<ConnectionAcks>>,
}

/// Why the connection stopped handling lines before the end of its bytes.
pub(crate) enum Blocked {
    /// The shard queue was full; this record goes in first once there is room. Boxed: a
    /// block is rare, and every connection carries room for one.
    Queue(Box<Record>),
    /// The connection reached its in-flight cap (records or bytes).
    Flow,
    /// The shard holds its byte budget of records in flight (`TCP_MAX_BYTES_IN_FLIGHT`).
    Bytes,
    /// The answers waiting for the station reached [`REPLY_MAX`]: they must be written
    /// before more lines are handled.
    Replies,
}

#[derive(Clone, Copy)]
pub(crate) struct ReadStamp {
    pub(crate) unix_ms: i64,
    pub(crate) at: Instant,
}

impl ReadStamp {
    pub(crate) fn now() -> ReadStamp {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        ReadStamp {
            unix_ms,
            at: Instant::now(),
        }
    }
}

impl LineHandler {
    /// The handler of a connection from `peer` that opened at `now`, named `id`.
    pub(crate) fn new(core: &ShardCore, id: &str, peer: SocketAddr, now: ReadStamp) -> LineHandler {
        let config = &core.config;
        let (cap, max_bytes) = (
            config.max_in_flight_per_conn,
            config.max_bytes_in_flight_per_conn,
        );
        LineHandler {
            peer,
            flow: (cap > 0 || max_bytes > 0).then(|| Rc::new(ConnectionFlow::new(cap, max_bytes))),
            session: Session::new(id),
            framer: LineFramer::new(config.max_line_bytes),
            leftover: Leftover::default(),
            replies: Vec::new(),
            payload: Vec::new(),
            stamp: now,
            policy: Policy::new(now.at, timeouts(config), config.max_lines_per_sec),
            blocked: None,
            acks: None,
        }
    }

    /// After the leftover was handled and nothing blocks, whatever it still holds is a partial
    /// line, and so is the rest of an oversized line being skipped: moves the deadline for
    /// what this read showed (see [`Policy::after_read`]).
    pub(crate) fn track_partial_line(&mut self, core: &ShardCore) {
        let partial = !self.leftover.is_empty() || self.framer.is_discarding();
        self.policy
            .after_read(self.stamp.at, partial, timeouts(&core.config));
    }

    /// Marks the bytes just read with the time, and with a line rate limit tops the budget
    /// up for the time since the previous read, to at most one second's worth (a token
    /// bucket: refilled, then spent by the lines of this read).
    pub(crate) fn stamp_read(&mut self, core: &ShardCore, stamp: ReadStamp) {
        let since = stamp.at.saturating_duration_since(self.stamp.at);
        self.policy.refill(since, core.config.max_lines_per_sec);
        self.stamp = stamp;
    }

    /// With a line rate limit: how long to wait if the lines read overdrew the budget.
    pub(crate) fn overdraft(&self, core: &ShardCore) -> Option<Duration> {
        self.policy.overdraft(core.config.max_lines_per_sec)
    }

    /// Moves the answers that are ready into the replies.
    pub(crate) fn take_acks(&mut self) {
        if let Some(acks) = &self.acks {
            acks.take_ready(&mut self.replies, REPLY_MAX);
        }
    }

    /// Handles the complete lines in the leftover, keeping what it did not finish.
    pub(crate) fn handle_leftover(&mut self, env: &Env<'_>) {
        let mut leftover = std::mem::take(&mut self.leftover);
        let (buf, range) = leftover.parts();
        let done = self.handle(env, buf, range.start, range.end);
        leftover.consume_to(done, &env.core.leftovers);
        self.leftover = leftover;
    }

    /// Handles the complete lines in `buf[pos..end]` and returns where it stopped: at `end`'s
    /// partial line, or earlier if it became blocked (then `self.blocked` says why).
    ///
    /// `buf` must extend at least `PARSE_PADDING` bytes past `end`.
    pub(crate) fn handle(
        &mut self,
        env: &Env<'_>,
        buf: &mut [u8],
        mut pos: usize,
        end: usize,
    ) -> usize {
        let core = env.core;
        let mut parser = core.parser.borrow_mut();
        if self.payload.capacity() == 0 {
            self.payload = core.ledger.payloads.take();
        }
        let dead_letters = core.config.dead_letters;
        let auth = core.config.station_auth.as_deref();
        // The zipcode of the last refused identify, for its log line.
        let mut refused = String::new();
        let (mut lines, mut records) = (0u64, 0u64);
        let discarding = self.framer.is_discarding();
        while self.policy.closing().is_none() {
            if self.flow.as_ref().is_some_and(|f| f.is_full()) {
                self.blocked = Some(Blocked::Flow);
                break;
            }
            if core.ledger.bytes_full() {
                self.blocked = Some(Blocked::Bytes);
                break;
            }
            if self.replies.len() >= REPLY_MAX {
                self.blocked = Some(Blocked::Replies);
                break;
            }
            let Some(frame) = self.framer.next_frame(&buf[..end], &mut pos) else {
                break;
            };
            self.policy.line_completed();
            let line = match frame {
                #[cfg(test)]
                Frame::Line(line) if buf[line.clone()] == *PANIC_LINE => {
                    panic!("injected fault")
                }
                Frame::Line(line) => line,
                Frame::TooLong => {
                    self.reject(env, ErrorCode::LineTooLong, None, None);
                    if self.blocked.is_some() {
                        break;
                    }
                    continue;
                }
            };
            lines += 1;
            if dead_letters {
                let mut raw = core.raw_line.borrow_mut();
                raw.clear();
                raw.extend_from_slice(&buf[line.clone()]);
            }
            let parsed = match auth {
                None => parser.parse_line(
                    &mut self.session,
                    buf,
                    line,
                    self.stamp.unix_ms,
                    &mut self.payload,
                ),
                // Asked once per identify, never for a metrics line (see `StationAuth`).
                Some(auth) => {
                    let certificate = env.certificate;
                    parser.parse_line_authorized(
                        &mut self.session,
                        buf,
                        line,
                        self.stamp.unix_ms,
                        &mut self.payload,
                        &mut |zipcode, token| {
                            let credentials = Credentials {
                                zipcode,
                                token,
                                certificate,
                            };
                            verify(auth, &credentials, &mut refused)
                        },
                    )
                }
            };
            match parsed {
                Ok(Parsed::Identified) => {
                    self.policy.accepted();
                    // Per identify, not per line: a hash and a register load (see
                    // `DistinctCounter`), on this shard's own sketch.
                    if let Some(station) = self.session.station() {
                        core.metrics.zipcodes.insert(station.zipcode().as_bytes());
                    }
                    self.policy
                        .identified(self.session.acks(), core.config.acks);
                    if self.policy.acks_on() && self.acks.is_none() {
                        self.acks = Some(Rc::default());
                    }
                }
                Ok(Parsed::Record { seq }) => {
                    self.policy.accepted();
                    records += 1;
                    let record = self.take_record(core, seq);
                    match env.queue.try_send(record) {
                        Ok(()) => core.gate.enqueued(),
                        Err(GlommioError::WouldBlock(ResourceType::Channel(record))) => {
                            self.blocked = Some(Blocked::Queue(Box::new(record)));
                            break;
                        }
                        Err(e) => {
                            self.lost_sink(core, e);
                            break;
                        }
                    }
                }
                Err(e) if e.code == ErrorCode::AuthFailed => {
                    self.refuse_identify(env, &refused);
                    if self.blocked.is_some() {
                        break;
                    }
                }
                Err(e) => {
                    let seq = e.seq.filter(|_| self.policy.acks_on());
                    let raw = dead_letters.then(|| core.raw_line.borrow());
                    // A rejected line that may carry a station's token (an identify rejected
                    // for another reason) is dead-lettered without its text: tokens never go
                    // to Kafka. Judged by what the parser understood (`hides_raw`).
                    let raw = raw
                        .as_deref()
                        .filter(|raw| !stormgate_protocol::dead_letter::hides_raw(&e, raw));
                    self.reject(env, e.code, raw.map(Vec::as_slice), seq);
                    if self.blocked.is_some() {
                        break;
                    }
                }
            }
        }
        if discarding && !self.framer.is_discarding() {
            // The oversized line being skipped ended here: a line completed.
            self.policy.line_completed();
        }
        core.metrics.lines_received.add(lines);
        core.metrics.records_enqueued.add(records);
        self.policy.spend(lines);
        if self.payload.is_empty() {
            // Back to the shard's pool between reads: an idle station holds no buffer.
            core.ledger.payloads.give(std::mem::take(&mut self.payload));
        }
        pos
    }

    /// Moves the encoded payload into a record and opens its ledger entry.
    fn take_record(&mut self, core: &ShardCore, seq: Option<u64>) -> Record {
        let value = std::mem::replace(&mut self.payload, core.ledger.payloads.take());
        let key = Rc::clone(
            self.session
                .station()
                .expect("records need a station")
                .key(),
        );
        let ack = match (&self.acks, seq) {
            (Some(acks), Some(seq)) if self.policy.acks_on() => {
                Some((Rc::clone(acks), acks.open(seq)))
            }
            _ => None,
        };
        let ticket = core.ledger.open(Entry {
            read_at: self.stamp.at,
            flow: self.flow.as_ref(),
            dead_letter: false,
            bytes: value.capacity(),
            ack,
        });
        Record {
            key,
            value,
            timestamp_ms: self.stamp.unix_ms,
            ticket,
            dead_letter: false,
        }
    }

    /// The queue's receiver is gone (the sink ended early): settle the record we hold as
    /// failed and make the connection stop.
    pub(crate) fn lost_sink(&mut self, core: &ShardCore, e: GlommioError<Record>) {
        if let GlommioError::Closed(ResourceType::Channel(record)) = e {
            let failure = DeliveryFailure::Rejected {
                reason: "shard sink stopped".to_owned(),
            };
            core.ledger.settle(record.ticket, Outcome::Failed(failure));
        }
        self.policy.sink_stopped();
    }

    /// Answers a bad line, dead-letters it when configured (`raw` is the line, when it was
    /// buffered); closes the connection after too many in a row.
    fn reject(&mut self, env: &Env<'_>, code: ErrorCode, raw: Option<&[u8]>, seq: Option<u64>) {
        match seq {
            // A station that asked for acknowledgements learns which line this answers.
            Some(seq) => {
                code.push_error_line_with_seq(seq, &mut self.replies);
                self.count_rejected(env.core, code);
            }
            None => self.send_error(env.core, code),
        }
        self.rejected(env, code, raw);
    }

    /// Answers a refused identify (`zipcode` is what it claimed), counts and logs it, and
    /// closes the connection after `STATION_AUTH_MAX_FAILURES` of them. Its dead letter never
    /// carries the line: the line holds a token, perhaps a valid one for another zipcode.
    #[cold]
    fn refuse_identify(&mut self, env: &Env<'_>, zipcode: &str) {
        let core = env.core;
        let code = ErrorCode::AuthFailed;
        self.replies.extend_from_slice(code.error_line().as_bytes());
        let (failures, limit) = self
            .policy
            .auth_failed(core.config.station_auth_max_failures);
        StationAuthFailed {
            connection_id: self.session.connection_id(),
            peer: self.peer,
            zipcode,
            failures,
        }
        .emit(&core.metrics, &core.logs.auth_failed);
        self.rejected(env, code, None);
        if self.policy.close_if(limit, Closing::AuthFailures) {
            // The same farewell as for too many bad lines: the station reads why, the rest of
            // what it sent is not read.
            self.send_error(core, ErrorCode::TooManyErrors);
        }
    }

    /// What follows every rejected line once the station has its answer: the dead letter,
    /// and the count of bad lines in a row.
    fn rejected(&mut self, env: &Env<'_>, code: ErrorCode, raw: Option<&[u8]>) {
        let core = env.core;
        if core.config.dead_letters && !self.policy.sink_gone() {
            self.dead_letter(env, code, raw);
        }
        if self.policy.rejected(core.config.max_errors_per_conn) {
            self.send_error(core, ErrorCode::TooManyErrors);
        }
    }

    /// Queues a dead-letter record for a rejected line; like a metrics record, it waits for
    /// room in the shard queue (then `self.blocked` says so) and is settled by the sink.
    #[cold]
    fn dead_letter(&mut self, env: &Env<'_>, code: ErrorCode, raw: Option<&[u8]>) {
        let core = env.core;
        let mut value = core.ledger.payloads.take();
        let peer = self.peer.to_string();
        let station = self.session.station();
        DeadLetter {
            connection_id: self.session.connection_id(),
            peer: &peer,
            zipcode: station.map(|s| s.zipcode()),
            received_at_ms: self.stamp.unix_ms,
            code,
            raw,
        }
        .encode(&mut value);
        let key = match station {
            Some(s) => Rc::clone(s.key()),
            None => Rc::from(self.session.connection_id()),
        };
        let ticket = core.ledger.open(Entry {
            read_at: self.stamp.at,
            flow: self.flow.as_ref(),
            dead_letter: true,
            bytes: value.capacity(),
            ack: None,
        });
        let record = Record {
            key,
            value,
            timestamp_ms: self.stamp.unix_ms,
            ticket,
            dead_letter: true,
        };
        core.metrics.dead_letters_enqueued.incr();
        match env.queue.try_send(record) {
            Ok(()) => core.gate.enqueued(),
            Err(GlommioError::WouldBlock(ResourceType::Channel(record))) => {
                self.blocked = Some(Blocked::Queue(Box::new(record)));
            }
            Err(e) => self.lost_sink(core, e),
        }
    }

    /// Queues `code`'s error line for the station, counts it and logs it (rate limited).
    pub(crate) fn send_error(&mut self, core: &ShardCore, code: ErrorCode) {
        self.replies.extend_from_slice(code.error_line().as_bytes());
        self.count_rejected(core, code);
    }

    /// Counts and logs (rate limited) a rejected line.
    fn count_rejected(&self, core: &ShardCore, code: ErrorCode) {
        LineRejected {
            code,
            connection_id: self.session.connection_id(),
            peer: self.peer,
        }
        .emit(&core.metrics, &core.logs.line_rejected);
    }
}

/// Asks `auth` about an identify; remembers the zipcode of a refused one in `refused`.
fn verify(auth: &dyn StationAuth, credentials: &Credentials<'_>, refused: &mut String) -> bool {
    let ok = auth.verify(credentials);
    if !ok {
        refused.clear();
        refused.push_str(credentials.zipcode);
    }
    ok
}

/// The read timeouts of `config`.
pub(crate) fn timeouts(config: &RuntimeConfig) -> Timeouts {
    Timeouts {
        idle: config.idle_timeout,
        line: config.line_timeout,
    }
}

/// The line handler driven without a socket, a task or a clock: bytes in, made-up read
/// times, and what it queued, answered, blocked on or decided looked at directly.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use glommio::channels::local_channel::{self, LocalReceiver};
    use stormgate_telemetry::ShardMetrics;

    use super::*;
    use crate::buffers::{BufPool, PoolSize};
    use crate::core::ConnectionLimit;
    use crate::ledger::{Ledger, Stage};

    const IDENTIFY: &[u8] =
        b"{\"type\":\"identify\",\"zipcode\":\"12345\",\"city\":\"TestCity\"}\n";
    const METRICS: &[u8] = b"{\"type\":\"metrics\",\"data\":\"temperature=25.5\"}\n";
    const BAD: &[u8] = b"{not json}\n";

    struct Bench {
        core: ShardCore,
        queue: LocalSender<Record>,
        records: LocalReceiver<Record>,
        lines: LineHandler,
        t0: Instant,
    }

    impl Bench {
        fn new(config: RuntimeConfig, queue_size: usize) -> Bench {
            let metrics = Arc::new(ShardMetrics::default());
            let pool = PoolSize {
                initial: 256,
                max_capacity: 4096,
                max_kept: 16,
            };
            let ledger = Rc::new(Ledger::new(
                Arc::clone(&metrics),
                BufPool::new(pool),
                config.max_bytes_in_flight,
                Stage::Memory,
            ));
            let limits = Arc::new(ConnectionLimit::new(10, 0));
            let core = ShardCore::new(Arc::new(config), metrics, limits, ledger, None).unwrap();
            let (queue, records) = local_channel::new_bounded(queue_size);
            let t0 = Instant::now();
            let peer = "127.0.0.1:5000".parse().unwrap();
            let lines = LineHandler::new(&core, "conn-1", peer, stamp(t0));
            Bench {
                core,
                queue,
                records,
                lines,
                t0,
            }
        }

        /// One read of `bytes` at `at` after the start, handled as the connection does:
        /// what was left over stays in the leftover. Returns where handling stopped.
        fn read(&mut self, at: Duration, bytes: &[u8]) -> usize {
            self.lines.leftover.push(bytes, &self.core.leftovers);
            self.lines.stamp_read(&self.core, stamp(self.t0 + at));
            let env = Env {
                core: &self.core,
                queue: &self.queue,
                certificate: None,
            };
            let before = self.lines.leftover.len();
            self.lines.handle_leftover(&env);
            if self.lines.blocked.is_none() {
                self.lines.track_partial_line(&self.core);
            }
            before - self.lines.leftover.len()
        }

        fn queued(&self) -> Vec<Record> {
            let mut out = Vec::new();
            while let Some(Some(r)) =
                futures_lite::future::block_on(futures_lite::future::poll_once(self.records.recv()))
            {
                out.push(r);
            }
            out
        }

        fn replies(&mut self) -> String {
            String::from_utf8(std::mem::take(&mut self.lines.replies)).unwrap()
        }
    }

    fn stamp(at: Instant) -> ReadStamp {
        ReadStamp {
            unix_ms: 1_795_755_441_000,
            at,
        }
    }

    fn config() -> RuntimeConfig {
        RuntimeConfig {
            idle_timeout: Some(Duration::from_secs(60)),
            line_timeout: Some(Duration::from_secs(10)),
            ..RuntimeConfig::default()
        }
    }

    #[test]
    fn an_identified_stations_metrics_line_becomes_one_record_and_no_answer() {
        let mut b = Bench::new(config(), 16);
        let all = [IDENTIFY, METRICS].concat();
        assert_eq!(b.read(Duration::ZERO, &all), all.len());
        let records = b.queued();
        assert_eq!(records.len(), 1);
        assert_eq!(&*records[0].key, "12345");
        let value = std::str::from_utf8(&records[0].value).unwrap();
        assert!(
            value.contains("TestCity") && value.contains("25.5"),
            "{value}"
        );
        assert_eq!(b.replies(), "");
        assert_eq!(b.core.metrics.records_enqueued.get(), 1);
        assert_eq!(b.core.metrics.lines_received.get(), 2);
    }

    #[test]
    fn a_bad_line_is_answered_counted_and_queues_nothing() {
        let mut b = Bench::new(config(), 16);
        b.read(Duration::ZERO, &[IDENTIFY, BAD].concat());
        assert!(b.queued().is_empty());
        assert_eq!(b.replies(), ErrorCode::MalformedJson.error_line());
        assert_eq!(b.lines.policy.closing(), None);
    }

    #[test]
    fn too_many_bad_lines_in_a_row_close_after_the_farewell_and_stop_handling() {
        let mut b = Bench::new(
            RuntimeConfig {
                max_errors_per_conn: 3,
                ..config()
            },
            16,
        );
        let all = [BAD, BAD, METRICS, IDENTIFY].concat();
        let handled = b.read(Duration::ZERO, &all);
        // A metrics line before identify is a bad line too (the third in a row); the identify
        // after it is not handled at all.
        assert_eq!(handled, all.len() - IDENTIFY.len());
        assert_eq!(b.lines.policy.closing(), Some(Closing::TooManyErrors));
        let replies = b.replies();
        assert!(
            replies.ends_with(ErrorCode::TooManyErrors.error_line()),
            "{replies}"
        );
        assert_eq!(
            replies.lines().count(),
            4,
            "three errors and the farewell: {replies}"
        );
        assert!(b.queued().is_empty());
    }

    #[test]
    fn an_accepted_identify_or_record_ends_the_bad_lines_in_a_row() {
        let strict = || RuntimeConfig {
            max_errors_per_conn: 3,
            ..config()
        };
        let mut b = Bench::new(strict(), 16);
        b.read(Duration::ZERO, &[BAD, BAD, IDENTIFY, BAD, BAD].concat());
        assert_eq!(
            b.lines.policy.closing(),
            None,
            "the identify reset the count"
        );
        let mut b = Bench::new(strict(), 16);
        b.read(
            Duration::ZERO,
            &[IDENTIFY, BAD, BAD, METRICS, BAD, BAD].concat(),
        );
        assert_eq!(b.lines.policy.closing(), None, "the record reset the count");
        b.read(Duration::ZERO, BAD);
        assert_eq!(b.lines.policy.closing(), Some(Closing::TooManyErrors));
    }

    #[test]
    fn acknowledgements_come_in_line_order_whatever_the_order_of_delivery() {
        let mut b = Bench::new(config(), 16);
        let lines = [
            &b"{\"type\":\"identify\",\"zipcode\":\"12345\",\"city\":\"C\",\"acks\":true}\n"[..],
            b"{\"type\":\"metrics\",\"seq\":1,\"data\":\"t=1\"}\n",
            b"{\"type\":\"metrics\",\"seq\":2,\"data\":\"t=2\"}\n",
        ]
        .concat();
        b.read(Duration::ZERO, &lines);
        let records = b.queued();
        assert_eq!(records.len(), 2);
        // The second line is delivered first: nothing may be answered yet.
        b.core.ledger.settle(records[1].ticket, Outcome::Delivered);
        b.lines.take_acks();
        assert_eq!(b.replies(), "");
        b.core.ledger.settle(records[0].ticket, Outcome::Delivered);
        b.lines.take_acks();
        let mut want = Vec::new();
        stormgate_protocol::reply::push_ack_upto(&mut want, 2);
        assert_eq!(b.replies(), String::from_utf8(want).unwrap());
    }

    #[test]
    fn a_full_queue_blocks_with_the_record_held_and_the_rest_left_over() {
        let mut b = Bench::new(config(), 1);
        let all = [IDENTIFY, METRICS, METRICS, METRICS].concat();
        let handled = b.read(Duration::ZERO, &all);
        // The first record went in; the second is held by the block; the third is unread.
        assert_eq!(handled, all.len() - METRICS.len());
        assert!(matches!(b.lines.blocked, Some(Blocked::Queue(_))));
        assert_eq!(b.lines.leftover.len(), METRICS.len());
    }

    #[test]
    fn a_connection_at_its_in_flight_cap_blocks_before_the_next_line() {
        let mut b = Bench::new(
            RuntimeConfig {
                max_in_flight_per_conn: 1,
                ..config()
            },
            16,
        );
        let all = [IDENTIFY, METRICS, METRICS].concat();
        let handled = b.read(Duration::ZERO, &all);
        assert_eq!(handled, IDENTIFY.len() + METRICS.len());
        assert!(matches!(b.lines.blocked, Some(Blocked::Flow)));
        let records = b.queued();
        b.core.ledger.settle(records[0].ticket, Outcome::Delivered);
        assert!(!b.lines.flow.as_ref().unwrap().is_full());
    }

    #[test]
    fn unwritten_answers_past_the_bound_block_handling() {
        let mut b = Bench::new(
            RuntimeConfig {
                max_errors_per_conn: 0,
                ..config()
            },
            16,
        );
        let bad_lines = REPLY_MAX / ErrorCode::MalformedJson.error_line().len() + 2;
        let all = [IDENTIFY]
            .into_iter()
            .chain(std::iter::repeat_n(BAD, bad_lines))
            .collect::<Vec<_>>()
            .concat();
        let handled = b.read(Duration::ZERO, &all);
        assert!(matches!(b.lines.blocked, Some(Blocked::Replies)));
        assert!(handled < all.len());
        assert!(b.lines.replies.len() >= REPLY_MAX);
    }

    #[test]
    fn a_partial_line_is_kept_and_brings_the_line_timeout_in() {
        let mut b = Bench::new(config(), 16);
        let half = &METRICS[..10];
        b.read(Duration::ZERO, IDENTIFY);
        assert_eq!(
            b.lines.policy.deadline(),
            Some(b.t0 + Duration::from_secs(60))
        );
        b.read(Duration::from_secs(5), half);
        assert_eq!(b.lines.leftover.len(), half.len());
        assert_eq!(
            b.lines.policy.deadline(),
            Some(b.t0 + Duration::from_secs(15))
        );
        // Its rest at 8 s completes it: the idle timeout from then.
        b.read(Duration::from_secs(8), &METRICS[10..]);
        assert_eq!(b.lines.leftover.len(), 0);
        assert_eq!(
            b.lines.policy.deadline(),
            Some(b.t0 + Duration::from_secs(68))
        );
        assert_eq!(b.queued().len(), 1);
    }

    #[test]
    fn an_oversized_line_is_answered_and_skipped_to_its_end() {
        let mut b = Bench::new(
            RuntimeConfig {
                max_line_bytes: 64,
                ..config()
            },
            16,
        );
        let long = [
            &b"{\"type\":\"metrics\",\"data\":\""[..],
            &[b'x'; 200],
            b"\"}\n",
        ]
        .concat();
        b.read(Duration::ZERO, &[IDENTIFY, &long, METRICS].concat());
        assert_eq!(b.replies(), ErrorCode::LineTooLong.error_line());
        assert_eq!(b.queued().len(), 1);
    }

    #[test]
    fn lines_past_the_rate_overdraw_the_budget_by_their_wait() {
        let mut b = Bench::new(
            RuntimeConfig {
                max_lines_per_sec: 10,
                ..config()
            },
            64,
        );
        let mut all = IDENTIFY.to_vec();
        for _ in 0..19 {
            all.extend_from_slice(METRICS);
        }
        b.read(Duration::ZERO, &all);
        // 20 lines against a bucket of 10: one second's wait.
        assert_eq!(b.lines.overdraft(&b.core), Some(Duration::from_secs(1)));
        // A read a second later has paid it.
        b.read(Duration::from_secs(1), b"");
        assert_eq!(b.lines.overdraft(&b.core), None);
    }
}
