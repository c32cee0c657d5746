//! A station that does not lose lines: acknowledgements, resends and reconnects.
//!
//! # Reliable stations
//!
//! [`ReliableStation`] identifies with `"acks":true` and numbers its metrics lines with `seq`
//! (0, 1, 2, … for the life of the value; [`ReliableStationBuilder::first_seq`] lets a device
//! that keeps state continue after a restart). It keeps every line it has not had an answer
//! for, in a window of at most [`ReliableStationBuilder::max_unacked`] lines; when the window is
//! full, [`ReliableStation::send`] blocks, processing answers, until there is room.
//!
//! One connection at a time. A reader thread per connection parses the server's answers and
//! hands them over a channel, so answers are always read while lines are written (the server
//! stops reading a connection whose answers it cannot write). Each answer settles lines that
//! were written *on that connection*:
//!
//! - `ack` `seq` N, or `upto` N (every line of this connection not yet answered with a seq up to
//!   N): the lines are in Kafka; they leave the window.
//! - `error` with a `seq`: the server rejected the line as bad input. That is final (sending it
//!   again would be rejected again); it leaves the window and counts as `rejected`.
//! - `nack` N: delivery finally failed, and the server wrote the record to its spill file. The
//!   line is sent again, with the same seq. To keep seqs increasing on every connection, no
//!   new line is written on this connection any more: once every line written on it is
//!   answered, the station opens a new one (without delay) and writes the nacked line there,
//!   before the lines that waited.
//! - `reconnect`: the server is stopping (its drain, `TCP_DRAIN_PERIOD`) and has answered
//!   every line it read on this connection. The station connects again at once, without a
//!   backoff — on an address several instances share, to one of the others — and writes the
//!   lines still unanswered there.
//!
//! A connection fails when a write fails, when its reader sees end of stream, an error or a
//! reply that is not one of the above, or when lines written on it get no answer for
//! [`ReliableStationBuilder::answer_timeout`]. The station then drops it and connects again
//! after a delay: the n-th failure in a row waits a random time between half and all of
//! `backoff_min · 2^(n-1)`, capped at `backoff_max` (50 ms doubling to 5 s by default; the
//! jitter keeps a fleet of stations cut off together from coming back together). The delay
//! starts over once a connection gets an answer. A new connection writes the identify and
//! then every line in the window, in seq order, then new lines as they come. Nothing is
//! written while disconnected: [`ReliableStation::send`] only adds to the window, and the next
//! call that finds the delay over connects. [`ReliableStation::flush`] waits, connecting as
//! needed, until every line has been answered.
//!
//! ## Guarantees
//!
//! - **At least once.** A line given to `send` leaves the window only when the server
//!   acknowledged it (its record is in Kafka, with the server's producer settings: `acks=all`
//!   by default) or rejected it (counted in `rejected`). So once `flush` returns `Ok`, every line
//!   not rejected is in Kafka. The window lives in memory: lines in it are lost if the process
//!   ends.
//! - **Duplicates** happen only for lines the station wrote more than once (each such write
//!   counts in `resent`, so duplicates ≤ `resent`), in two cases:
//!   1. A line written on a connection that failed (or timed out) before the line was
//!      answered. The server may have read it, and then it delivers it even though the
//!      connection is gone: the acknowledgement was lost with the connection, or not yet
//!      written, and the line arrives again from the next connection. (A line cut in the
//!      middle by a broken connection makes no record: the server takes the half line for a
//!      final line without newline, and it is not valid JSON; the server counts it as a
//!      rejected line, and dead-letters it if configured.)
//!   2. A nacked line. Its record is in the server's spill file, so a `stormgate replay` of
//!      that file publishes it a second time, besides the copy sent again.
//!
//!   A consumer can drop duplicates by (zipcode, `seq`); a station that restarts should go on
//!   from where it stopped ([`ReliableStationBuilder::first_seq`]) for that to hold.
//! - **Order.** With the server's default producer settings (idempotent, and a zipcode's
//!   records all go to one partition), each line's first copy in Kafka comes in seq order,
//!   unless a line was nacked: its new copy comes after lines sent later. Duplicates may come
//!   anywhere after their first copy. (Why: a connection's records reach the partition in the
//!   order it read them; a connection resends in seq order every line not acknowledged, and
//!   a line acknowledged before it opened is already in the partition.)

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::Reply;

/// Default [`ReliableStationBuilder::max_unacked`].
pub const DEFAULT_MAX_UNACKED: usize = 1000;
/// Default [`ReliableStationBuilder::answer_timeout`]: long enough for a broker that is slow
/// for a while (resending to a stalled server only adds duplicates), short enough to notice a
/// connection whose peer vanished without closing it.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`ReliableStationBuilder::backoff_min`].
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Default [`ReliableStationBuilder::backoff_max`].
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Default [`ReliableStationBuilder::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings for a [`ReliableStation`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ReliableStationBuilder {
    addr: String,
    zipcode: String,
    city: String,
    max_unacked: usize,
    answer_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
    first_seq: u64,
}

impl ReliableStationBuilder {
    /// Most lines kept unanswered; `send` blocks at this many. Default
    /// [`DEFAULT_MAX_UNACKED`] (1000); at least 1.
    #[must_use]
    pub fn max_unacked(mut self, lines: usize) -> Self {
        self.max_unacked = lines.max(1);
        self
    }

    /// How long lines written on a connection may go without any answer before the
    /// connection counts as failed; also the write timeout. Zero = no limit. Default
    /// [`DEFAULT_ANSWER_TIMEOUT`] (30 s).
    #[must_use]
    pub fn answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout;
        self
    }

    /// The longest delay before reconnecting after the first failure. Default
    /// [`DEFAULT_BACKOFF_MIN`] (50 ms).
    #[must_use]
    pub fn backoff_min(mut self, delay: Duration) -> Self {
        self.backoff_min = delay;
        self
    }

    /// The cap of the reconnect delay. Default [`DEFAULT_BACKOFF_MAX`] (5 s).
    #[must_use]
    pub fn backoff_max(mut self, delay: Duration) -> Self {
        self.backoff_max = delay;
        self
    }

    /// How long one connection attempt may take. Default [`DEFAULT_CONNECT_TIMEOUT`] (5 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The seq of the first line. Default 0. A device that remembers where it stopped can
    /// continue there, so that (zipcode, seq) stays unique across its restarts.
    #[must_use]
    pub fn first_seq(mut self, seq: u64) -> Self {
        self.first_seq = seq;
        self
    }

    /// Connects and identifies. Only this first attempt reports an error (a wrong address
    /// shows at once); later connection failures are retried for ever.
    pub fn connect(self) -> io::Result<ReliableStation> {
        let mut rng = Rng::seeded(&self.zipcode);
        let backoff = Backoff::new(self.backoff_min, self.backoff_max, rng.next());
        let mut station = ReliableStation {
            next_seq: self.first_seq,
            config: self,
            window: BTreeMap::new(),
            link: None,
            generation: 0,
            backoff,
            connect_at: Instant::now(),
            stats: ReliableStats::default(),
        };
        let link = station.open_link()?;
        station.start_link(link);
        Ok(station)
    }
}

/// What a [`ReliableStation`] has done so far. Each line is counted once in `acked` or
/// `rejected` when it leaves the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReliableStats {
    /// Lines written for the first time.
    pub sent: u64,
    /// Writes of a line already written before (after a failed connection, or a nack).
    pub resent: u64,
    /// Lines acknowledged: in Kafka.
    pub acked: u64,
    /// Nacks received: delivery failed, the server spilled the record, the line is sent again.
    pub nacked: u64,
    /// Lines answered with an error: bad input, dropped.
    pub rejected: u64,
    /// Error lines that name no line (`too_many_connections`, `idle_timeout`, …).
    pub errors: u64,
    /// Answers that named no unanswered line of their connection (should stay 0: it would be
    /// a server bug).
    pub unmatched: u64,
    /// Connections opened after the first one.
    pub reconnects: u64,
    /// `reconnect` answers: the server was stopping and closed the connection after
    /// answering every line it had read.
    pub told_to_reconnect: u64,
    /// Connection attempts that failed (refused, timed out, or the identify could not be
    /// written).
    pub connect_failures: u64,
    /// Lines in the window now: not yet answered.
    pub unanswered: u64,
}

/// [`ReliableStation::flush`] ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushError {
    /// Lines still unanswered.
    pub unanswered: usize,
}

impl fmt::Display for FlushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lines still unanswered", self.unanswered)
    }
}

impl std::error::Error for FlushError {}

/// A station with at-least-once delivery; see the [module docs](self). Blocking, for one
/// thread; its connection's reader runs on a thread of its own.
#[derive(Debug)]
pub struct ReliableStation {
    config: ReliableStationBuilder,
    next_seq: u64,
    /// Lines not yet answered, by seq.
    window: BTreeMap<u64, Pending>,
    link: Option<Link>,
    /// The last link's generation; links count from 1.
    generation: u64,
    backoff: Backoff,
    /// When to connect again, while there is no link.
    connect_at: Instant,
    stats: ReliableStats,
}

#[derive(Debug)]
struct Pending {
    line: String,
    /// Times written.
    writes: u32,
    /// The generation of the link it waits for an answer on; any other value (0 after a nack)
    /// means it waits to be written.
    link: u64,
}

impl ReliableStation {
    /// Settings with their defaults, for the station `zipcode` in `city` at `addr` (resolved
    /// again at every connection).
    pub fn builder(addr: &str, zipcode: &str, city: &str) -> ReliableStationBuilder {
        ReliableStationBuilder {
            addr: addr.to_owned(),
            zipcode: zipcode.to_owned(),
            city: city.to_owned(),
            max_unacked: DEFAULT_MAX_UNACKED,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            first_seq: 0,
        }
    }

    /// Connects with the default settings.
    pub fn connect(addr: &str, zipcode: &str, city: &str) -> io::Result<ReliableStation> {
        ReliableStation::builder(addr, zipcode, city).connect()
    }

    /// Sends one metrics line (text form, `name=value,...`) and returns its seq. Blocks while
    /// the window is full; returns once the line is written, or kept for the next connection.
    pub fn send(&mut self, metrics: &[(&str, f64)]) -> u64 {
        let data: Vec<String> = metrics.iter().map(|(n, v)| format!("{n}={v}")).collect();
        self.send_data(&data.join(","))
    }

    /// Sends one metrics line whose `data` field is the string `data` (`name=value,...`); see
    /// [`send`](Self::send).
    pub fn send_data(&mut self, data: &str) -> u64 {
        self.take_ready_answers();
        while self.window.len() >= self.config.max_unacked {
            self.step(Instant::now() + Duration::from_secs(1));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut line = serde_json::json!({"type": "metrics", "seq": seq, "data": data}).to_string();
        line.push('\n');
        self.window.insert(
            seq,
            Pending {
                line,
                writes: 0,
                link: 0,
            },
        );
        match &self.link {
            Some(link) if !link.rotating => self.write_new(seq),
            Some(_) => {}
            None => self.connect_if_due(),
        }
        seq
    }

    /// Waits until every line has been answered, connecting as needed, for at most `timeout`.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), FlushError> {
        let deadline = Instant::now() + timeout;
        while !self.window.is_empty() {
            if Instant::now() >= deadline {
                return Err(FlushError {
                    unanswered: self.window.len(),
                });
            }
            self.step(deadline);
        }
        Ok(())
    }

    /// The counters.
    pub fn stats(&self) -> ReliableStats {
        ReliableStats {
            unanswered: self.window.len() as u64,
            ..self.stats
        }
    }

    /// The seq the next line gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// One unit of progress, waiting no later than `until`: connect when due, or handle one
    /// event of the connection.
    fn step(&mut self, until: Instant) {
        let Some(link) = &self.link else {
            let now = Instant::now();
            if now < self.connect_at {
                thread::sleep(self.connect_at.min(until) - now);
            }
            self.connect_if_due();
            return;
        };
        // Past this, the lines in flight have waited too long for an answer.
        let stalled_at = (link.in_flight > 0 && !self.config.answer_timeout.is_zero())
            .then(|| link.progress_at + self.config.answer_timeout);
        let wake = stalled_at.map_or(until, |at| at.min(until));
        match link
            .events
            .recv_timeout(wake.saturating_duration_since(Instant::now()))
        {
            Ok(Event::Reply(reply)) => self.answer(reply),
            Ok(Event::Ended) | Err(RecvTimeoutError::Disconnected) => self.lose_link(),
            Err(RecvTimeoutError::Timeout) => {
                if stalled_at.is_some_and(|at| Instant::now() >= at) {
                    self.lose_link();
                }
            }
        }
    }

    /// Handles the answers that have arrived, without waiting.
    fn take_ready_answers(&mut self) {
        while let Some(link) = &self.link {
            match link.events.try_recv() {
                Ok(Event::Reply(reply)) => self.answer(reply),
                Ok(Event::Ended) | Err(TryRecvError::Disconnected) => self.lose_link(),
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// Applies one answer of the current link.
    fn answer(&mut self, reply: Reply) {
        let generation = self.generation;
        let settled = match reply {
            Reply::AckUpto { upto } => {
                let acked: Vec<u64> = self
                    .window
                    .range(..=upto)
                    .filter(|(_, p)| p.link == generation)
                    .map(|(&seq, _)| seq)
                    .collect();
                for seq in &acked {
                    self.window.remove(seq);
                }
                self.stats.acked += acked.len() as u64;
                acked.len()
            }
            Reply::Ack { seq } => {
                let n = self.settle(seq, generation);
                self.stats.acked += n as u64;
                n
            }
            // A code this version does not know is still a rejection or a nack.
            Reply::Error { seq: Some(seq), .. } | Reply::OtherError { seq: Some(seq), .. } => {
                let n = self.settle(seq, generation);
                self.stats.rejected += n as u64;
                n
            }
            Reply::Error { seq: None, .. } | Reply::OtherError { seq: None, .. } => {
                self.stats.errors += 1;
                return;
            }
            Reply::Nack { seq, .. } | Reply::OtherNack { seq, .. } => {
                match self.window.get_mut(&seq) {
                    Some(p) if p.link == generation => {
                        p.link = 0;
                        self.stats.nacked += 1;
                        if let Some(link) = &mut self.link {
                            link.rotating = true;
                        }
                        1
                    }
                    _ => 0,
                }
            }
            Reply::Reconnect => {
                // Every line the server read is answered; the rest were not read. Connect
                // again at once (the server spreads its stations' reconnects over its drain
                // period) and send them there, without a backoff.
                self.stats.told_to_reconnect += 1;
                self.backoff.reset();
                self.link = None;
                self.connect_at = Instant::now();
                self.connect_if_due();
                return;
            }
        };
        if settled == 0 {
            self.stats.unmatched += 1;
            return;
        }
        self.backoff.reset();
        let link = self.link.as_mut().expect("answers come from a link");
        link.in_flight -= settled;
        link.progress_at = Instant::now();
        if link.rotating && link.in_flight == 0 {
            // Every line written on it is answered: move on without a delay or duplicates.
            self.link = None;
            self.connect_at = Instant::now();
            self.connect_if_due();
        }
    }

    /// Removes line `seq` if it waits for an answer on link `generation`; returns how many
    /// lines that removed (0 or 1).
    fn settle(&mut self, seq: u64, generation: u64) -> usize {
        match self.window.get(&seq) {
            Some(p) if p.link == generation => {
                self.window.remove(&seq);
                1
            }
            _ => 0,
        }
    }

    /// Drops the link after a failure; the next connection waits for the backoff.
    fn lose_link(&mut self) {
        self.link = None;
        self.connect_at = Instant::now() + self.backoff.next_delay();
    }

    /// Connects if there is no link and the delay is over; a failed attempt sets the next.
    fn connect_if_due(&mut self) {
        if self.link.is_some() || Instant::now() < self.connect_at {
            return;
        }
        match self.open_link() {
            Ok(link) => self.start_link(link),
            Err(_) => {
                self.stats.connect_failures += 1;
                self.connect_at = Instant::now() + self.backoff.next_delay();
            }
        }
    }

    /// Connects, starts the reader and writes the identify.
    fn open_link(&mut self) -> io::Result<Link> {
        let c = &self.config;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
        for addr in c.addr.to_socket_addrs()? {
            match Link::open(addr, c) {
                Ok(link) => return Ok(link),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Makes `link` current and writes every line of the window on it, in seq order.
    fn start_link(&mut self, mut link: Link) {
        self.generation += 1;
        if self.generation > 1 {
            self.stats.reconnects += 1;
        }
        let mut bytes = Vec::new();
        for p in self.window.values_mut() {
            bytes.extend_from_slice(p.line.as_bytes());
            count_write(&mut self.stats, p);
            p.link = self.generation;
        }
        link.in_flight = self.window.len();
        link.progress_at = Instant::now();
        let written = link.stream.write_all(&bytes);
        self.link = Some(link);
        if written.is_err() {
            self.lose_link();
        }
    }

    /// Writes the new line `seq` on the current link.
    fn write_new(&mut self, seq: u64) {
        let (Some(link), Some(p)) = (&mut self.link, self.window.get_mut(&seq)) else {
            return;
        };
        count_write(&mut self.stats, p);
        p.link = self.generation;
        if link.in_flight == 0 {
            link.progress_at = Instant::now();
        }
        link.in_flight += 1;
        if link.stream.write_all(p.line.as_bytes()).is_err() {
            self.lose_link();
        }
    }
}

fn count_write(stats: &mut ReliableStats, p: &mut Pending) {
    if p.writes == 0 {
        stats.sent += 1;
    } else {
        stats.resent += 1;
    }
    p.writes += 1;
}

/// One connection: the socket we write, and the answers its reader thread hands over.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    events: Receiver<Event>,
    reader: Option<JoinHandle<()>>,
    /// Lines written on this link and not answered.
    in_flight: usize,
    /// When an answer last arrived, or the link began waiting for one.
    progress_at: Instant,
    /// A line was nacked: write nothing more here; reconnect once everything is answered.
    rotating: bool,
}

#[derive(Debug)]
enum Event {
    Reply(Reply),
    /// End of stream, a read error, or a reply we do not understand.
    Ended,
}

impl Link {
    fn open(addr: SocketAddr, c: &ReliableStationBuilder) -> io::Result<Link> {
        let mut stream = TcpStream::connect_timeout(&addr, c.connect_timeout)?;
        stream.set_write_timeout(Some(c.answer_timeout).filter(|d| !d.is_zero()))?;
        let (tx, events) = mpsc::channel();
        let read_half = stream.try_clone()?;
        let reader = thread::Builder::new()
            .name("station-replies".to_owned())
            .spawn(move || read_replies(read_half, tx))?;
        let link = Link {
            stream: stream.try_clone()?,
            events,
            reader: Some(reader),
            in_flight: 0,
            progress_at: Instant::now(),
            rotating: false,
        };
        let mut identify = serde_json::json!({
            "type": "identify", "zipcode": c.zipcode, "city": c.city, "acks": true
        })
        .to_string();
        identify.push('\n');
        stream.write_all(identify.as_bytes())?;
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Ends the reader's blocking read.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The reader thread: one event per reply line, then `Ended`.
fn read_replies(stream: TcpStream, tx: Sender<Event>) {
    let mut replies = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let event = match replies.read_line(&mut line) {
            Ok(0) | Err(_) => Event::Ended,
            Ok(_) => match Reply::parse(line.as_bytes()) {
                Ok(reply) => Event::Reply(reply),
                Err(_) => Event::Ended,
            },
        };
        let ended = matches!(event, Event::Ended);
        if tx.send(event).is_err() || ended {
            return;
        }
    }
}

/// Exponential backoff with "equal jitter": each delay is a random time between half and all
/// of a base that doubles from `min` up to `max`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
    rng: Rng,
}

impl Backoff {
    fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max,
            base: min,
            rng: Rng(seed | 1),
        }
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.base.min(self.max);
        self.base = base.saturating_mul(2).min(self.max);
        let half = base / 2;
        let jitter = self.rng.next() % (half.as_micros() as u64 + 1);
        half + Duration::from_micros(jitter)
    }

    fn reset(&mut self) {
        self.base = self.min;
    }
}

/// xorshift64*: plenty for jitter, and no dependency.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    /// Seeded from std's per-process random hasher keys, the time and `salt`, so that
    /// stations started together do not jitter alike.
    fn seeded(salt: &str) -> Rng {
        let mut h = RandomState::new().build_hasher();
        h.write(salt.as_bytes());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Rng(h.finish() | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// What the fake server sees.
    #[derive(Debug)]
    enum Seen<'a> {
        Accepted,
        /// A line; its seq if it is a metrics line.
        Line(&'a str, Option<u64>),
    }

    /// What the fake server does about it.
    enum Act {
        Reply(String),
        /// Close the connection (after reading what was sent so far).
        Cut,
    }

    fn ack(seq: u64) -> Act {
        Act::Reply(format!("{{\"type\":\"ack\",\"seq\":{seq}}}\n"))
    }

    /// A connection of the fake server: when it was accepted, the lines it read.
    type FakeConn = (Instant, Vec<String>);

    /// A scripted server: one connection at a time (the station has at most one), each
    /// event answered by `script(connection index, event)`.
    struct Fake {
        addr: String,
        conns: Arc<Mutex<Vec<FakeConn>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Fake {
        fn start(mut script: impl FnMut(usize, Seen<'_>) -> Vec<Act> + Send + 'static) -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let conns = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (c, s) = (Arc::clone(&conns), Arc::clone(&stop));
            let thread = thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let Ok((stream, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let i = {
                        let mut conns = c.lock().unwrap();
                        conns.push((Instant::now(), Vec::new()));
                        conns.len() - 1
                    };
                    serve(stream, &mut |seen| {
                        if let Seen::Line(line, _) = seen {
                            c.lock().unwrap()[i].1.push(line.to_owned());
                        }
                        script(i, seen)
                    });
                }
            });
            Fake {
                addr,
                conns,
                stop,
                thread: Some(thread),
            }
        }

        /// The seqs of the metrics lines connection `i` read.
        fn seqs(&self, i: usize) -> Vec<u64> {
            self.conns.lock().unwrap()[i]
                .1
                .iter()
                .filter_map(|l| seq_of(l))
                .collect()
        }

        fn accepted_at(&self) -> Vec<Instant> {
            self.conns.lock().unwrap().iter().map(|c| c.0).collect()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.thread.take().unwrap().join();
        }
    }

    fn seq_of(line: &str) -> Option<u64> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["type"] == "metrics").then(|| v["seq"].as_u64())?
    }

    fn serve(stream: TcpStream, script: &mut dyn FnMut(Seen<'_>) -> Vec<Act>) {
        let mut out = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream);
        let mut acts = script(Seen::Accepted);
        let mut line = String::new();
        loop {
            for act in acts {
                match act {
                    Act::Reply(r) => {
                        if out.write_all(r.as_bytes()).is_err() {
                            return;
                        }
                    }
                    Act::Cut => {
                        let _ = out.shutdown(Shutdown::Both);
                        return;
                    }
                }
            }
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end();
            acts = script(Seen::Line(line, seq_of(line)));
        }
    }

    /// Acknowledges every metrics line, one by one.
    fn ack_each(_: usize, seen: Seen<'_>) -> Vec<Act> {
        match seen {
            Seen::Line(_, Some(seq)) => vec![ack(seq)],
            _ => vec![],
        }
    }

    fn station(fake: &Fake) -> ReliableStation {
        ReliableStation::builder(&fake.addr, "12345", "Test")
            .answer_timeout(Duration::from_secs(5))
            .connect()
            .unwrap()
    }

    fn send_n(s: &mut ReliableStation, n: usize) {
        for i in 0..n {
            s.send(&[("t", i as f64)]);
        }
    }

    const FLUSH: Duration = Duration::from_secs(10);

    #[test]
    fn identifies_with_acks_and_numbers_lines() {
        let fake = Fake::start(ack_each);
        let mut s = ReliableStation::builder(&fake.addr, "1\"2", "São Paulo")
            .first_seq(7)
            .connect()
            .unwrap();
        assert_eq!(s.send(&[("t", 1.5), ("h", 2.0)]), 7);
        s.flush(FLUSH).unwrap();
        let lines = fake.conns.lock().unwrap()[0].1.clone();
        let v: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let identify = serde_json::json!(
            {"type": "identify", "zipcode": "1\"2", "city": "São Paulo", "acks": true}
        );
        let metrics = serde_json::json!({"type": "metrics", "seq": 7, "data": "t=1.5,h=2"});
        assert_eq!(v, [identify, metrics]);
    }

    #[test]
    fn acks_drop_lines() {
        let fake = Fake::start(ack_each);
        let mut s = station(&fake);
        send_n(&mut s, 50);
        s.flush(FLUSH).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.sent, st.acked, st.resent, st.unanswered),
            (50, 50, 0, 0)
        );
        assert_eq!((st.reconnects, st.unmatched), (0, 0));
        assert_eq!(fake.seqs(0), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn upto_drops_a_range_and_nothing_after_it() {
        // Lines 0..=3 are answered by one upto 3 when line 3 arrives, 4 and 5 one by one
        // after line 5 arrives.
        let fake = Fake::start(|_, seen| match seen {
            Seen::Line(_, Some(3)) => vec![Act::Reply("{\"type\":\"ack\",\"upto\":3}\n".into())],
            Seen::Line(_, Some(5)) => vec![ack(4), ack(5)],
            _ => vec![],
        });
        let mut s = station(&fake);
        send_n(&mut s, 4);
        wait_until(&mut s, |s| s.stats().acked == 4);
        assert_eq!(s.stats().unanswered, 0);
        send_n(&mut s, 2);
        s.flush(FLUSH).unwrap();
        assert_eq!(s.stats().acked, 6);
        assert_eq!(s.stats().unmatched, 0);
    }

    #[test]
    fn an_upto_for_a_lower_seq_leaves_later_lines() {
        let fake = Fake::start(|_, seen| match seen {
            Seen::Line(_, Some(3)) => vec![Act::Reply("{\"type\":\"ack\",\"upto\":1}\n".into())],
            _ => vec![],
        });
        let mut s = ReliableStation::builder(&fake.addr, "1", "")
            .answer_timeout(Duration::from_secs(60))
            .connect()
            .unwrap();
        send_n(&mut s, 4);
        wait_until(&mut s, |s| s.stats().acked == 2);
        assert_eq!(s.window.keys().copied().collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn a_nacked_line_is_sent_again_on_a_new_connection() {
        // Connection 0 nacks 1 and acknowledges the others; connection 1 acknowledges all.
        let fake = Fake::start(|conn, seen| match (conn, seen) {
            (0, Seen::Line(_, Some(1))) => vec![Act::Reply(
                "{\"type\":\"nack\",\"seq\":1,\"code\":\"delivery_failed\"}\n".into(),
            )],
            (_, Seen::Line(_, Some(seq))) => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = station(&fake);
        send_n(&mut s, 3);
        s.flush(FLUSH).unwrap();
        send_n(&mut s, 2);
        s.flush(FLUSH).unwrap();
        let st = s.stats();
        assert_eq!((st.nacked, st.resent, st.acked), (1, 1, 5));
        assert_eq!(st.reconnects, 1);
        // Connection 0 took 0, 1 and maybe 2 (whatever was sent before the nack arrived);
        // connection 1 the nacked line first, then the rest, seqs increasing on each.
        let first = fake.seqs(0);
        assert!(first.len() >= 2, "{first:?}");
        assert_eq!(first, (0..first.len() as u64).collect::<Vec<_>>());
        let second = fake.seqs(1);
        let rest: Vec<u64> = (first.len() as u64..5).collect();
        assert_eq!(second, [&[1][..], &rest].concat());
    }

    #[test]
    fn an_error_with_a_seq_drops_the_line() {
        let fake = Fake::start(|_, seen| match seen {
            Seen::Line(_, Some(2)) => vec![Act::Reply(
                "{\"type\":\"error\",\"code\":\"invalid_metric\",\"message\":\"m\",\"seq\":2}\n"
                    .into(),
            )],
            Seen::Line(_, Some(seq)) => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = station(&fake);
        send_n(&mut s, 5);
        s.flush(FLUSH).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.acked, st.rejected, st.resent, st.reconnects),
            (4, 1, 0, 0)
        );
    }

    /// Codes from a newer server: still a rejection and a nack, not a broken connection
    /// (which would send the lines again, to the same answers, forever).
    #[test]
    fn codes_this_version_does_not_know_still_settle_their_lines() {
        let fake = Fake::start(|conn, seen| match (conn, seen) {
            (0, Seen::Line(_, Some(1))) => vec![Act::Reply(
                "{\"type\":\"error\",\"code\":\"from_the_future\",\"message\":\"m\",\"seq\":1}\n"
                    .into(),
            )],
            (0, Seen::Line(_, Some(2))) => vec![Act::Reply(
                "{\"type\":\"nack\",\"seq\":2,\"code\":\"also_new\"}\n".into(),
            )],
            (_, Seen::Line(_, Some(seq))) => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = station(&fake);
        send_n(&mut s, 4);
        s.flush(FLUSH).unwrap();
        let st = s.stats();
        assert_eq!((st.rejected, st.nacked, st.resent), (1, 1, 1));
        assert_eq!(st.acked, 3, "0, 3 and the nacked 2 again");
    }

    #[test]
    fn a_cut_connection_is_reopened_and_exactly_the_unanswered_lines_are_resent() {
        // Connection 0 acknowledges 0..5 and 7, reads up to 9, and closes; connection 1
        // acknowledges all.
        let fake = Fake::start(|conn, seen| match (conn, seen) {
            (0, Seen::Line(_, Some(9))) => vec![Act::Cut],
            (0, Seen::Line(_, Some(seq))) if seq < 5 || seq == 7 => vec![ack(seq)],
            (0, _) => vec![],
            (_, Seen::Line(_, Some(seq))) => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = station(&fake);
        send_n(&mut s, 10);
        s.flush(FLUSH).unwrap();
        assert_eq!(fake.seqs(0), (0..10).collect::<Vec<_>>());
        assert_eq!(fake.seqs(1), [5, 6, 8, 9]);
        let lines = fake.conns.lock().unwrap()[1].1.clone();
        assert!(lines[0].contains("\"identify\""), "{lines:?}");
        let st = s.stats();
        assert_eq!(
            (st.sent, st.resent, st.acked, st.reconnects),
            (10, 4, 10, 1)
        );
        // The new connection carries on with new lines.
        send_n(&mut s, 2);
        s.flush(FLUSH).unwrap();
        assert_eq!(fake.seqs(1), [5, 6, 8, 9, 10, 11]);
    }

    #[test]
    fn lines_sent_while_disconnected_wait_for_the_next_connection() {
        // Connection 0 closes at once; lines sent meanwhile go out on connection 1 in order.
        let fake = Fake::start(|conn, seen| match (conn, seen) {
            (0, Seen::Accepted) => vec![Act::Cut],
            (_, Seen::Line(_, Some(seq))) => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = ReliableStation::builder(&fake.addr, "1", "")
            .backoff_min(Duration::from_millis(300))
            .connect()
            .unwrap();
        wait_until(&mut s, |s| s.link.is_none());
        send_n(&mut s, 3);
        s.flush(FLUSH).unwrap();
        assert_eq!(fake.seqs(1), [0, 1, 2]);
        let st = s.stats();
        assert_eq!((st.sent, st.resent, st.reconnects), (3, 0, 1));
    }

    #[test]
    fn no_answer_within_the_timeout_fails_the_connection() {
        let fake = Fake::start(|conn, seen| match (conn, seen) {
            (0, _) => vec![],
            (_, Seen::Line(_, Some(seq))) => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = ReliableStation::builder(&fake.addr, "1", "")
            .answer_timeout(Duration::from_millis(200))
            .connect()
            .unwrap();
        let t0 = Instant::now();
        send_n(&mut s, 3);
        s.flush(FLUSH).unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert_eq!(fake.seqs(1), [0, 1, 2]);
        assert_eq!(s.stats().resent, 3);
    }

    #[test]
    fn send_blocks_while_the_window_is_full() {
        // Lines 0..3 are answered only 300 ms after line 2 arrives.
        let fake = Fake::start(|_, seen| match seen {
            Seen::Line(_, Some(2)) => {
                thread::sleep(Duration::from_millis(300));
                vec![Act::Reply("{\"type\":\"ack\",\"upto\":2}\n".into())]
            }
            Seen::Line(_, Some(seq)) if seq > 2 => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = ReliableStation::builder(&fake.addr, "1", "")
            .max_unacked(3)
            .connect()
            .unwrap();
        send_n(&mut s, 3);
        let t0 = Instant::now();
        s.send(&[("t", 3.0)]);
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        s.flush(FLUSH).unwrap();
        assert_eq!(s.stats().acked, 4);
    }

    #[test]
    fn flush_times_out_when_lines_stay_unanswered() {
        let fake = Fake::start(|_, _| vec![]);
        let mut s = ReliableStation::builder(&fake.addr, "1", "")
            .answer_timeout(Duration::from_secs(60))
            .connect()
            .unwrap();
        send_n(&mut s, 2);
        assert_eq!(
            s.flush(Duration::from_millis(100)),
            Err(FlushError { unanswered: 2 })
        );
    }

    #[test]
    fn backoff_grows_and_resets_after_success() {
        // Connections 0..4 close at once; 4 acknowledges line 0 and closes on line 1; 5
        // closes at once; 6 acknowledges everything.
        let fake = Fake::start(|conn, seen| match (conn, seen) {
            (0..4 | 5, Seen::Accepted) => vec![Act::Cut],
            (4, Seen::Line(_, Some(1))) => vec![Act::Cut],
            (_, Seen::Line(_, Some(seq))) => vec![ack(seq)],
            _ => vec![],
        });
        let mut s = station(&fake);
        s.send(&[("t", 0.0)]);
        s.flush(FLUSH).unwrap();
        s.send(&[("t", 1.0)]);
        s.flush(FLUSH).unwrap();
        let at = fake.accepted_at();
        assert_eq!(at.len(), 7);
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        let ms = |n| Duration::from_millis(n);
        // Failures 1..4 wait at least 25, 50, 100, 200 ms (half of 50 ms doubling).
        for (k, gap) in gaps[..4].iter().enumerate() {
            assert!(*gap >= ms(25 << k), "gap {k}: {gaps:?}");
        }
        // After connection 4 got an answer, the delay starts over: at most 50 ms, where the
        // next one would have been at least 400 ms. Compared with the gap before it (at
        // least 200 ms, and stretched alike by a busy machine) rather than with a fixed bound.
        assert!(gaps[4] < gaps[3], "{gaps:?}");
        assert!(gaps[5] >= ms(50), "{gaps:?}");
        let st = s.stats();
        assert_eq!((st.reconnects, st.acked, st.unanswered), (6, 2, 0));
    }

    #[test]
    fn backoff_delays_are_jittered_within_half_to_all_of_a_doubling_base() {
        let ms = |n| Duration::from_millis(n);
        for seed in 0..50 {
            let mut b = Backoff::new(ms(50), ms(5000), seed);
            for round in 0..2 {
                for k in 0..10 {
                    let base = ms(50 << k).min(ms(5000));
                    let d = b.next_delay();
                    assert!(d >= base / 2 && d <= base, "{round} {k} {d:?}");
                }
                b.reset();
            }
        }
    }

    #[test]
    fn the_first_connection_failure_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(ReliableStation::connect(&addr, "1", "").is_err());
    }

    /// Handles answers until `cond` holds (10 s at most).
    fn wait_until(s: &mut ReliableStation, cond: impl Fn(&ReliableStation) -> bool) {
        let deadline = Instant::now() + FLUSH;
        while !cond(s) {
            assert!(Instant::now() < deadline, "{:?}", s.stats());
            s.step(Instant::now() + Duration::from_millis(10));
        }
    }
}
