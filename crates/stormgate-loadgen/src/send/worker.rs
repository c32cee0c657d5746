//! One sending thread: its share of the connections as nonblocking sockets on one mio `Poll`.
//!
//! A connection goes `Waiting → Connecting → Open → ShutDown → Closed` (or `Failed`), with
//! TLS through `Handshaking` between `Connecting` and `Open`. At most
//! [`MAX_CONNECTS_IN_FLIGHT`] connects (TLS: connects and handshakes) are outstanding, and
//! each has [`CONNECT_TIMEOUT`]; a connect refused or out of addresses is retried once after
//! [`RETRY_DELAY`]. An open connection writes its identify line at once; metrics start when
//! every connection of the thread has been attempted, so the measured interval has them all
//! sending. With TLS the connection writes through rustls ([`Stream`]), which says
//! `WouldBlock` exactly when the socket does; lines rustls has taken count as written.
//!
//! Writing: a connection that is writable and has work sits in the `ready` queue. Its turn
//! writes whatever it still holds, then fills the thread's one batch buffer with up to
//! [`BATCH_BYTES`] of lines and writes that; whatever the socket does not take is copied into
//! the connection's own buffer (allocated only then, freed once written). `WouldBlock` is the
//! server's TCP backpressure: the connection leaves the queue, the block is counted, and mio
//! reports when it is writable again. A turn is at most [`WRITES_PER_TURN`] writes, so a fast
//! connection cannot starve the others.
//!
//! A housekeeping tick ([`TICK`], or [`RATE_TICK`] with `--rate`) refills the token buckets,
//! times out connects, starts retries and moves the phase on; the poll timeout is the time to
//! the next tick, so there is no sleep anywhere.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use socket2::Socket;
use stormgate_protocol::Reply;

use super::stream::Stream;
use crate::latency::Latency;
use crate::lines::{self, MetricsLines};
use crate::plan;
use crate::tls::TlsClient;

/// Connects outstanding at once, per thread.
pub const MAX_CONNECTS_IN_FLIGHT: usize = 256;
/// Wait before the one retry of a refused connect (a full accept queue) or one that found no
/// free local port.
pub const RETRY_DELAY: Duration = Duration::from_millis(100);
/// A connect (with TLS: connect and handshake) not finished after this long counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of lines a turn builds at once.
pub const BATCH_BYTES: usize = 16 * 1024;
/// Writes per connection per turn.
pub const WRITES_PER_TURN: usize = 4;
/// Housekeeping interval without `--rate`.
pub const TICK: Duration = Duration::from_millis(20);
/// Housekeeping (and token refill) interval with `--rate`.
pub const RATE_TICK: Duration = Duration::from_millis(5);
/// A token bucket holds at most this much time's worth of lines: a connection that was
/// blocked catches up by at most this much.
pub const RATE_BURST: Duration = Duration::from_millis(100);
/// Longest the end of a run may take beyond `--drain-timeout`, for connections whose last
/// bytes the server never takes.
pub const FINISH_CAP: Duration = Duration::from_secs(30);

/// What every thread of a process sends, and how.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Server address.
    pub target: SocketAddr,
    /// Loopback source addresses (see [`plan::source_addr`]).
    pub sources: usize,
    /// SO_SNDBUF of each connection; 0 = autotuning.
    pub send_buffer: usize,
    /// Lines per second per connection; 0 = unlimited.
    pub rate: f64,
    /// How long to send (or hold, when idle) after the connect phase.
    pub duration: Option<Duration>,
    /// Lines per connection.
    pub lines_per_conn: Option<u64>,
    /// Identify only, then hold.
    pub idle: bool,
    /// How long to wait for the server's close after the last connection shut down.
    pub drain_timeout: Duration,
    /// Zipcode of connection 0 of this process.
    pub zip_base: u64,
    /// The metrics line builder.
    pub lines: MetricsLines,
    /// Ask for acknowledgements in identify.
    pub acks: bool,
    /// Speak TLS, made with this; `None` = plain TCP.
    pub tls: Option<TlsClient>,
}

/// A thread's counters, published as it goes for the progress printer (single writer,
/// relaxed).
#[derive(Debug, Default)]
pub struct Live {
    /// Connections established so far.
    pub connected: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Metrics lines built into writes so far.
    pub lines: AtomicU64,
    /// Bytes written so far.
    pub bytes: AtomicU64,
    /// Writes that found the socket full.
    pub blocked: AtomicU64,
    /// Error lines received.
    pub errors: AtomicU64,
}

/// What a sender counts: a thread in its [`WorkerReport`], a process and a whole run in
/// their `SendSummary`, which adds its parts' up with [`Counts::add`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Connections established (with TLS: handshake done).
    pub connected: u64,
    /// Connections that could not be established (after the retry), TLS handshakes
    /// included.
    pub connect_errors: u64,
    /// Metrics lines fully written.
    pub lines_sent: u64,
    /// Bytes written, identify lines included.
    pub bytes_sent: u64,
    /// Writes that found the socket full (the server's backpressure).
    pub blocked_writes: u64,
    /// Error lines from the server, by code.
    pub error_replies: BTreeMap<String, u64>,
    /// The first error: a connect error, an I/O error, or an error line.
    pub first_error: Option<String>,
    /// Connections the server closed while we were still sending.
    pub closed_by_server: u64,
    /// Connections lost to a read or write error.
    pub io_errors: u64,
    /// Connections the server had not closed when the drain gave up.
    pub drain_timeouts: u64,
    /// With --acks: lines acknowledged (`upto` ranges counted in full).
    pub acked_lines: u64,
    /// With --acks: `ack` reply lines (several lines each when coalesced).
    pub ack_replies: u64,
    /// With --acks: lines that failed delivery (`nack`).
    pub nacks: u64,
    /// `reconnect` replies (a draining server's request to connect again; the senders do
    /// not), apart from `error_replies`: the server stopping is not the stations' error.
    pub reconnects: u64,
}

impl Counts {
    /// Adds `other`'s counts to these; the first error stays the earliest part's.
    pub fn add(&mut self, other: &Counts) {
        self.connected += other.connected;
        self.connect_errors += other.connect_errors;
        self.lines_sent += other.lines_sent;
        self.bytes_sent += other.bytes_sent;
        self.blocked_writes += other.blocked_writes;
        for (code, n) in &other.error_replies {
            *self.error_replies.entry(code.clone()).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.closed_by_server += other.closed_by_server;
        self.io_errors += other.io_errors;
        self.drain_timeouts += other.drain_timeouts;
        self.acked_lines += other.acked_lines;
        self.ack_replies += other.ack_replies;
        self.nacks += other.nacks;
        self.reconnects += other.reconnects;
    }
}

/// What a thread did.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// Its counts.
    pub counts: Counts,
    /// Each acknowledged line's time from being built to its `ack` read, in µs.
    pub ack_latency: Latency,
    /// When metrics sending (or holding) began.
    pub started: Option<Instant>,
    /// When the last line went out (or holding ended).
    pub finished: Option<Instant>,
    /// When the thread was done.
    pub ended: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Waiting,
    Connecting {
        since: Instant,
    },
    /// TLS: connected, handshake under way (still counted in `connecting`).
    Handshaking {
        since: Instant,
    },
    RetryAt(Instant),
    Open,
    ShutDown,
    Closed,
    Failed,
}

struct Conn {
    /// Index of the connection within the process (its zipcode offset).
    index: usize,
    stream: Option<Stream>,
    state: State,
    retried: bool,
    /// Known writable: the last write did not block.
    writable: bool,
    /// In the ready queue.
    queued: bool,
    /// Bytes built but not yet written.
    out: Vec<u8>,
    out_pos: usize,
    /// Metrics lines built.
    lines: u64,
    /// Token bucket, in lines.
    tokens: f64,
    /// A reply line not complete yet.
    reply: Vec<u8>,
    /// With --acks: the lines without an answer yet.
    unanswered: Unanswered,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Connecting,
    Running { until: Option<Instant> },
    Finishing { since: Instant },
}

/// Runs connections `range` (indices within the process) to the end; publishes progress into
/// `live`.
pub fn run(cfg: &WorkerConfig, range: Range<usize>, live: &Live) -> io::Result<WorkerReport> {
    let mut w = Worker::new(cfg, range, live)?;
    w.run()?;
    Ok(w.report)
}

struct Worker<'a> {
    cfg: &'a WorkerConfig,
    live: &'a Live,
    poll: Poll,
    conns: Vec<Conn>,
    ready: VecDeque<usize>,
    next_connect: usize,
    connecting: usize,
    retries: usize,
    open: u64,
    phase: Phase,
    last_shutdown: Option<Instant>,
    tick: Duration,
    last_refill: Instant,
    batch: Vec<u8>,
    read_buf: Vec<u8>,
    report: WorkerReport,
}

impl<'a> Worker<'a> {
    fn new(cfg: &'a WorkerConfig, range: Range<usize>, live: &'a Live) -> io::Result<Self> {
        let conns = range
            .map(|index| Conn {
                index,
                stream: None,
                state: State::Waiting,
                retried: false,
                writable: false,
                queued: false,
                out: Vec::new(),
                out_pos: 0,
                lines: 0,
                tokens: 0.0,
                reply: Vec::new(),
                unanswered: Unanswered::default(),
            })
            .collect();
        Ok(Worker {
            cfg,
            live,
            poll: Poll::new()?,
            conns,
            ready: VecDeque::new(),
            next_connect: 0,
            connecting: 0,
            retries: 0,
            open: 0,
            phase: Phase::Connecting,
            last_shutdown: None,
            tick: if cfg.rate > 0.0 { RATE_TICK } else { TICK },
            last_refill: Instant::now(),
            batch: Vec::with_capacity(BATCH_BYTES + cfg.lines.max_line_len()),
            read_buf: vec![0; 64 * 1024],
            report: WorkerReport::default(),
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now();
        loop {
            self.start_connects();
            let now = Instant::now();
            if now >= next_tick {
                if self.housekeeping(now) {
                    break;
                }
                next_tick = now + self.tick;
            }
            self.publish();
            let timeout = if self.ready.is_empty() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                let i = event.token().0;
                // The same event may also say the server already replied or closed (a
                // refusal at its connection limit); the edge will not come again.
                match self.conns[i].state {
                    State::Connecting { .. } => self.finish_connect(i),
                    State::Handshaking { .. } => self.handshake(i),
                    _ => {}
                }
                if !matches!(self.conns[i].state, State::Open | State::ShutDown) {
                    continue;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read_replies(i);
                }
                if event.is_writable() && self.conns[i].state == State::Open {
                    self.conns[i].writable = true;
                    self.enqueue(i);
                }
            }
            for _ in 0..self.ready.len() {
                let Some(i) = self.ready.pop_front() else {
                    break;
                };
                self.conns[i].queued = false;
                if self.turn(i) {
                    self.enqueue(i);
                }
            }
        }
        self.finish();
        Ok(())
    }

    // ---- connecting --------------------------------------------------------------------

    fn start_connects(&mut self) {
        while self.connecting < MAX_CONNECTS_IN_FLIGHT && self.next_connect < self.conns.len() {
            let i = self.next_connect;
            self.next_connect += 1;
            self.connect(i);
        }
    }

    fn connect(&mut self, i: usize) {
        let source = plan::source_addr(self.cfg.target, self.conns[i].index, self.cfg.sources);
        let opened =
            open_socket(self.cfg.target, source, self.cfg.send_buffer).and_then(|socket| {
                Stream::new(TcpStream::from_std(socket.into()), self.cfg.tls.as_ref())
            });
        match opened {
            Ok(mut stream) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) =
                    self.poll
                        .registry()
                        .register(stream.socket_mut(), Token(i), interest)
                {
                    self.connect_failed(i, e);
                    return;
                }
                self.conns[i].stream = Some(stream);
                self.conns[i].state = State::Connecting {
                    since: Instant::now(),
                };
                self.connecting += 1;
            }
            Err(e) => self.connect_failed(i, e),
        }
    }

    fn finish_connect(&mut self, i: usize) {
        let stream = self.conns[i]
            .stream
            .as_ref()
            .expect("connecting has a socket")
            .socket();
        let result = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => Ok(()),
                // Not finished yet: a spurious wakeup.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => return,
                Err(e) => Err(e),
            },
        };
        let c = &mut self.conns[i];
        match result {
            Ok(()) if matches!(c.stream, Some(Stream::Tls(_))) => {
                // The handshake has what is left of the connect's CONNECT_TIMEOUT.
                let since = match c.state {
                    State::Connecting { since } => since,
                    _ => Instant::now(),
                };
                c.state = State::Handshaking { since };
                self.handshake(i);
            }
            Ok(()) => {
                self.connecting -= 1;
                self.opened(i);
            }
            Err(e) => {
                self.connecting -= 1;
                self.drop_stream(i);
                self.connect_failed(i, e);
            }
        }
    }

    /// Moves connection `i`'s TLS handshake on; it opens when the handshake is done.
    fn handshake(&mut self, i: usize) {
        let tls = self.conns[i]
            .stream
            .as_mut()
            .and_then(Stream::tls_mut)
            .expect("handshaking has a TLS stream");
        match tls.handshake() {
            Ok(false) => {}
            Ok(true) => {
                self.connecting -= 1;
                self.opened(i);
            }
            Err(e) => {
                self.connecting -= 1;
                self.drop_stream(i);
                let e = io::Error::new(e.kind(), format!("TLS handshake: {e}"));
                self.connect_failed(i, e);
            }
        }
    }

    fn opened(&mut self, i: usize) {
        let zipcode = lines::zipcode(self.cfg.zip_base, self.conns[i].index);
        let c = &mut self.conns[i];
        c.state = State::Open;
        c.out = lines::identify_line(&zipcode, lines::CITY, self.cfg.acks);
        c.out_pos = 0;
        c.writable = true;
        self.open += 1;
        self.report.counts.connected += 1;
        self.enqueue(i);
    }

    fn connect_failed(&mut self, i: usize, e: io::Error) {
        let retryable = matches!(
            e.raw_os_error(),
            Some(libc::EADDRNOTAVAIL | libc::ECONNREFUSED | libc::EADDRINUSE)
        );
        let c = &mut self.conns[i];
        if retryable && !c.retried {
            c.retried = true;
            c.state = State::RetryAt(Instant::now() + RETRY_DELAY);
            self.retries += 1;
        } else {
            c.state = State::Failed;
            self.report.counts.connect_errors += 1;
            self.note_error(|| format!("connect: {e}"));
        }
    }

    // ---- writing -----------------------------------------------------------------------

    fn enqueue(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if !c.queued && c.writable && c.state == State::Open {
            c.queued = true;
            self.ready.push_back(i);
        }
    }

    /// Whether connection `c` may build more lines now, and how many.
    fn allowance(&self, c: &Conn) -> u64 {
        if !matches!(self.phase, Phase::Running { .. }) {
            return 0;
        }
        if self.cfg.idle {
            // Its lines at once, then nothing: held until the end.
            return self
                .cfg
                .lines_per_conn
                .map_or(0, |limit| limit.saturating_sub(c.lines));
        }
        let mut n = self
            .cfg
            .lines_per_conn
            .map_or(u64::MAX, |limit| limit.saturating_sub(c.lines));
        if self.cfg.rate > 0.0 {
            n = n.min(c.tokens as u64);
        }
        n
    }

    /// Whether connection `c` has sent all it ever will.
    fn done_sending(&self, c: &Conn) -> bool {
        match self.phase {
            Phase::Connecting => false,
            Phase::Finishing { .. } => true,
            Phase::Running { .. } => {
                !self.cfg.idle && self.cfg.lines_per_conn.is_some_and(|n| c.lines >= n)
            }
        }
    }

    /// One connection's turn; returns whether it should stay in the ready queue.
    fn turn(&mut self, i: usize) -> bool {
        for _ in 0..WRITES_PER_TURN {
            if self.conns[i].state != State::Open {
                return false;
            }
            if self.conns[i].out_pos < self.conns[i].out.len() {
                if !self.write_pending(i) {
                    return false;
                }
                continue;
            }
            let allowance = self.allowance(&self.conns[i]);
            if allowance == 0 {
                // TLS records rustls still holds go out before the connection waits or ends.
                if self.flush(i) && self.done_sending(&self.conns[i]) {
                    self.shutdown(i);
                }
                return false;
            }
            if !self.write_batch(i, allowance) {
                return false;
            }
        }
        true
    }

    /// Writes what connection `i` holds; false when it blocked or failed.
    fn write_pending(&mut self, i: usize) -> bool {
        let c = &mut self.conns[i];
        let stream = c.stream.as_mut().expect("open has a socket");
        match stream.write(&c.out[c.out_pos..]) {
            Ok(n) => {
                c.out_pos += n;
                self.report.counts.bytes_sent += n as u64;
                if c.out_pos == c.out.len() {
                    // Freed rather than kept: under backpressure thousands of connections
                    // would otherwise each hold a batch.
                    c.out = Vec::new();
                    c.out_pos = 0;
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.writable = false;
                self.report.counts.blocked_writes += 1;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                self.io_failed(i, "write", &e);
                false
            }
        }
    }

    /// Sends what connection `i`'s stream holds (TLS records); false when it blocked or failed.
    fn flush(&mut self, i: usize) -> bool {
        let c = &mut self.conns[i];
        match c.stream.as_mut().expect("open has a socket").flush() {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.writable = false;
                self.report.counts.blocked_writes += 1;
                false
            }
            Err(e) => {
                self.io_failed(i, "write", &e);
                false
            }
        }
    }

    /// Builds up to `allowance` lines for connection `i` and writes them; false when it
    /// blocked or failed.
    fn write_batch(&mut self, i: usize, allowance: u64) -> bool {
        let c = &mut self.conns[i];
        self.batch.clear();
        let sent_us = if self.cfg.lines.has_timestamps() {
            lines::unix_micros()
        } else {
            0
        };
        let first = c.lines;
        while self.batch.len() < BATCH_BYTES && c.lines - first < allowance {
            self.cfg.lines.push(&mut self.batch, c.lines, sent_us);
            c.lines += 1;
        }
        let built = c.lines - first;
        self.report.counts.lines_sent += built;
        if self.cfg.acks {
            c.unanswered.built(first..c.lines, Instant::now());
        }
        if self.cfg.rate > 0.0 {
            c.tokens -= built as f64;
        }
        let stream = c.stream.as_mut().expect("open has a socket");
        let written = match stream.write(&self.batch) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.writable = false;
                self.report.counts.blocked_writes += 1;
                0
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                c.out.extend_from_slice(&self.batch);
                self.io_failed(i, "write", &e);
                return false;
            }
        };
        self.report.counts.bytes_sent += written as u64;
        if written < self.batch.len() {
            c.out.extend_from_slice(&self.batch[written..]);
            c.out_pos = 0;
        }
        c.writable
    }

    fn shutdown(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let stream = c.stream.as_mut().expect("open has a socket");
        match stream.shutdown_write() {
            Ok(()) => {
                c.state = State::ShutDown;
                self.last_shutdown = Some(Instant::now());
            }
            // TLS: the close_notify waits for room; the next turn sends it and shuts down.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.writable = false;
                self.report.counts.blocked_writes += 1;
            }
            Err(e) => self.io_failed(i, "shutdown", &e),
        }
    }

    // ---- reading -----------------------------------------------------------------------

    fn read_replies(&mut self, i: usize) {
        loop {
            let c = &mut self.conns[i];
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            match stream.read(&mut self.read_buf) {
                Ok(0) => {
                    if c.state == State::Open {
                        self.report.counts.closed_by_server += 1;
                        self.note_error(|| "server closed a connection".to_owned());
                    }
                    self.close(i);
                    return;
                }
                Ok(n) => self.handle_replies(i, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.io_failed(i, "read", &e);
                    return;
                }
            }
        }
    }

    /// Counts the error lines among the `n` bytes just read into the read buffer.
    fn handle_replies(&mut self, i: usize, n: usize) {
        let now = Instant::now();
        let mut data = &self.read_buf[..n];
        while let Some(end) = data.iter().position(|&b| b == b'\n') {
            let (line, rest) = data.split_at(end + 1);
            data = rest;
            let c = &mut self.conns[i];
            if c.reply.is_empty() {
                count_reply(&mut self.report, &mut c.unanswered, &line[..end], now);
            } else {
                c.reply.extend_from_slice(line);
                let full = std::mem::take(&mut c.reply);
                count_reply(
                    &mut self.report,
                    &mut c.unanswered,
                    &full[..full.len() - 1],
                    now,
                );
            }
        }
        self.conns[i].reply.extend_from_slice(data);
    }

    // ---- ending ------------------------------------------------------------------------

    fn io_failed(&mut self, i: usize, what: &str, e: &io::Error) {
        self.report.counts.io_errors += 1;
        self.note_error(|| format!("{what}: {e}"));
        self.close(i);
    }

    fn close(&mut self, i: usize) {
        if matches!(self.conns[i].state, State::Open | State::ShutDown) {
            self.open -= 1;
        }
        let c = &mut self.conns[i];
        c.state = State::Closed;
        // Lines built but never written were not sent. (Metrics are built only once the
        // identify line is out, so every newline left is a metrics line's.) With TLS, lines
        // rustls took count as written: a connection lost, or cut at the end of the drain,
        // may have had up to one write of them still queued in rustls.
        if c.lines > 0 {
            self.report.counts.lines_sent -= unsent_lines(&c.out[c.out_pos..]);
        }
        c.out = Vec::new();
        c.out_pos = 0;
        c.reply = Vec::new();
        c.unanswered.built = VecDeque::new();
        self.drop_stream(i);
    }

    fn drop_stream(&mut self, i: usize) {
        if let Some(mut stream) = self.conns[i].stream.take() {
            let _ = self.poll.registry().deregister(stream.socket_mut());
        }
    }

    fn note_error(&mut self, message: impl FnOnce() -> String) {
        if self.report.counts.first_error.is_none() {
            self.report.counts.first_error = Some(message());
        }
    }

    /// Timers, token refills and phase changes; returns true when the thread is done.
    fn housekeeping(&mut self, now: Instant) -> bool {
        self.expire_connects(now);
        match self.phase {
            Phase::Connecting => {
                if self.next_connect == self.conns.len()
                    && self.connecting == 0
                    && self.retries == 0
                {
                    let until = self.cfg.duration.map(|d| now + d);
                    self.phase = Phase::Running { until };
                    self.report.started = Some(now);
                    self.last_refill = now;
                    // Spread the buckets' phases (golden-ratio offsets) so that connections
                    // do not all reach a whole token on the same tick.
                    for c in &mut self.conns {
                        c.tokens = (c.index as f64 * 0.618_033_988_75).fract();
                    }
                    self.wake_all();
                }
            }
            Phase::Running { until } => {
                if self.cfg.rate > 0.0 {
                    self.refill(now);
                }
                // With --lines-per-conn a connection leaves Open only once it has sent them
                // all (or was lost), whether or not --duration has run out.
                let all_done = self.open == 0
                    || (self.cfg.lines_per_conn.is_some()
                        && !self.conns.iter().any(|c| c.state == State::Open));
                if until.is_some_and(|u| now >= u) || all_done {
                    self.report.finished = Some(match (all_done, self.last_shutdown) {
                        (true, Some(t)) => t,
                        _ => now,
                    });
                    self.phase = Phase::Finishing { since: now };
                    self.wake_all();
                }
            }
            Phase::Finishing { since } => {
                if self.open == 0 {
                    return true;
                }
                let flushed = !self.conns.iter().any(|c| c.state == State::Open);
                let drained = self
                    .last_shutdown
                    .is_some_and(|t| now >= t + self.cfg.drain_timeout);
                if (flushed && drained) || now >= since + self.cfg.drain_timeout + FINISH_CAP {
                    return true;
                }
            }
        }
        false
    }

    fn expire_connects(&mut self, now: Instant) {
        if self.connecting == 0 && self.retries == 0 {
            return;
        }
        for i in 0..self.conns.len() {
            match self.conns[i].state {
                State::Connecting { since } | State::Handshaking { since }
                    if now >= since + CONNECT_TIMEOUT =>
                {
                    self.connecting -= 1;
                    self.drop_stream(i);
                    self.conns[i].retried = true;
                    self.connect_failed(i, io::Error::from(io::ErrorKind::TimedOut));
                }
                State::RetryAt(at) if now >= at && self.connecting < MAX_CONNECTS_IN_FLIGHT => {
                    self.retries -= 1;
                    self.connect(i);
                }
                _ => {}
            }
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        let add = self.cfg.rate * dt;
        let cap = (self.cfg.rate * RATE_BURST.as_secs_f64()).max(1.0);
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            if c.state == State::Open {
                c.tokens = (c.tokens + add).min(cap);
                if c.tokens >= 1.0 {
                    self.enqueue(i);
                }
            }
        }
    }

    /// Gives every open connection a turn (a phase changed).
    fn wake_all(&mut self) {
        for i in 0..self.conns.len() {
            self.enqueue(i);
        }
    }

    fn publish(&self) {
        let r = &self.report;
        let live = self.live;
        live.connected.store(r.counts.connected, Ordering::Relaxed);
        live.open.store(self.open, Ordering::Relaxed);
        live.lines.store(r.counts.lines_sent, Ordering::Relaxed);
        live.bytes.store(r.counts.bytes_sent, Ordering::Relaxed);
        live.blocked
            .store(r.counts.blocked_writes, Ordering::Relaxed);
        live.errors
            .store(r.counts.error_replies.values().sum(), Ordering::Relaxed);
    }

    /// Closes what is left when the drain ends.
    fn finish(&mut self) {
        for i in 0..self.conns.len() {
            if matches!(self.conns[i].state, State::Open | State::ShutDown) {
                self.report.counts.drain_timeouts += 1;
                self.close(i);
            }
        }
        let now = Instant::now();
        self.report.finished.get_or_insert(now);
        self.report.ended = Some(now);
        self.publish();
    }
}

/// A nonblocking TCP socket, bound to `source` if given (its port picked at connect time,
/// per destination: see [`stormgate_testkit::connect_from`]), with a connect to `target`
/// started.
fn open_socket(
    target: SocketAddr,
    source: Option<SocketAddr>,
    send_buffer: usize,
) -> io::Result<Socket> {
    stormgate_testkit::connect_from(target, source.map(|s| s.ip()), |socket| {
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if send_buffer > 0 {
            socket.set_send_buffer_size(send_buffer)?;
        }
        Ok(())
    })
}

/// Lines in bytes never written: the newlines in them.
fn unsent_lines(rest: &[u8]) -> u64 {
    rest.iter().filter(|&&b| b == b'\n').count() as u64
}

/// An acknowledging connection's lines without an answer yet: the next seq to be answered
/// and, per batch of lines built, their seqs and when they were built. An `ack` times every
/// line it covers as a station sees it: from building the line, through any wait for room
/// in the socket and the server's work, to reading the reply.
#[derive(Debug, Default)]
struct Unanswered {
    next: u64,
    built: VecDeque<(Range<u64>, Instant)>,
}

impl Unanswered {
    fn built(&mut self, seqs: Range<u64>, at: Instant) {
        if !seqs.is_empty() {
            self.built.push_back((seqs, at));
        }
    }

    /// Answers every line up to seq `last`, timing them into `latency` if given (acks, not
    /// nacks); returns how many lines that answered for the first time.
    fn answer(&mut self, last: u64, now: Instant, mut latency: Option<&mut Latency>) -> u64 {
        let end = last + 1;
        let newly = end.saturating_sub(self.next);
        self.next = self.next.max(end);
        while let Some((seqs, at)) = self.built.front_mut() {
            let covered = seqs.start..seqs.end.min(end);
            if covered.is_empty() {
                break;
            }
            if let Some(latency) = latency.as_deref_mut() {
                let us = now.saturating_duration_since(*at).as_micros() as u64;
                latency.record_n(us, covered.end - covered.start);
            }
            if covered.end < seqs.end {
                seqs.start = covered.end;
                break;
            }
            self.built.pop_front();
        }
        newly
    }
}

/// Counts one reply line, read at `now`.
fn count_reply(report: &mut WorkerReport, unanswered: &mut Unanswered, line: &[u8], now: Instant) {
    let code: Cow<'_, str> = match Reply::parse(line) {
        Ok(Reply::Error { code, .. }) => code.as_str().into(),
        // A newer server's code is still counted under its own name.
        Ok(Reply::OtherError { code, .. }) => String::from(code).into(),
        Ok(Reply::Ack { seq: last } | Reply::AckUpto { upto: last }) => {
            report.counts.ack_replies += 1;
            report.counts.acked_lines +=
                unanswered.answer(last, now, Some(&mut report.ack_latency));
            return;
        }
        Ok(Reply::Nack { seq, .. } | Reply::OtherNack { seq, .. }) => {
            report.counts.nacks += 1;
            unanswered.answer(seq, now, None);
            return;
        }
        Ok(Reply::Reconnect) => {
            report.counts.reconnects += 1;
            return;
        }
        Err(_) => "unrecognized_reply".into(),
    };
    *report
        .counts
        .error_replies
        .entry(code.into_owned())
        .or_default() += 1;
    if report.counts.first_error.is_none() {
        report.counts.first_error = Some(String::from_utf8_lossy(line).into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_counted_per_code() {
        let mut r = WorkerReport::default();
        for line in [
            &br#"{"type":"error","code":"malformed_json","message":"line is not valid JSON"}"#[..],
            br#"{"type":"error","code":"malformed_json","message":"x"}"#,
            br#"{"type":"error","code":"line_too_long","message":"x"}"#,
            br#"{"type":"error","code":"from_a_newer_server","message":"x"}"#,
            b"garbage\r",
        ] {
            count_reply(&mut r, &mut Unanswered::default(), line, Instant::now());
        }
        assert_eq!(r.counts.error_replies["from_a_newer_server"], 1);
        assert_eq!(r.counts.error_replies["malformed_json"], 2);
        assert_eq!(r.counts.error_replies["line_too_long"], 1);
        assert_eq!(r.counts.error_replies["unrecognized_reply"], 1);
        assert!(
            r.counts
                .first_error
                .unwrap()
                .contains("line is not valid JSON")
        );
    }

    #[test]
    fn reconnect_replies_are_counted_apart_and_are_not_errors() {
        let mut r = WorkerReport::default();
        let mut unanswered = Unanswered {
            next: 3,
            ..Unanswered::default()
        };
        for line in [&br#"{"type":"reconnect"}"#[..], br#"{"type":"reconnect"}"#] {
            count_reply(&mut r, &mut unanswered, line, Instant::now());
        }
        assert_eq!(r.counts.reconnects, 2);
        assert_eq!(unanswered.next, 3, "a reconnect answers no line");
        assert!(r.counts.error_replies.is_empty());
        assert_eq!(r.counts.first_error, None);
    }

    #[test]
    fn acks_count_lines_and_upto_counts_the_range() {
        let mut r = WorkerReport::default();
        let mut unanswered = Unanswered::default();
        for line in [
            &br#"{"type":"ack","seq":0}"#[..],
            br#"{"type":"ack","upto":9}"#,
            br#"{"type":"nack","seq":10,"code":"delivery_failed"}"#,
            br#"{"type":"ack","upto":14}"#,
        ] {
            count_reply(&mut r, &mut unanswered, line, Instant::now());
        }
        assert_eq!(
            (r.counts.acked_lines, r.counts.ack_replies, r.counts.nacks),
            (14, 3, 1)
        );
        assert_eq!(unanswered.next, 15);
        assert!(r.counts.error_replies.is_empty());
    }

    #[test]
    fn an_ack_times_each_line_it_covers_from_its_batch_and_a_nack_times_none() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut u = Unanswered::default();
        u.built(0..4, t0);
        u.built(4..4, t0 + ms(1));
        u.built(4..10, t0 + ms(2));
        u.built(10..12, t0 + ms(3));
        let mut latency = Latency::new();
        // Lines 0-5 at 10 ms: four built at t0, two at 2 ms; the batch 4..10 stays, from 6.
        assert_eq!(u.answer(5, t0 + ms(10), Some(&mut latency)), 6);
        // Three significant figures: a value reads back as at most 0.1% more.
        let near =
            |got: Option<u64>, us: u64| got.is_some_and(|v| v >= us && v <= us * 1001 / 1000);
        let s = latency.summary();
        assert_eq!(s.count, 6);
        assert!(near(latency.summary().p50, 10_000), "{s:?}");
        assert!(near(s.p90, 10_000) && near(s.max, 10_000), "{s:?}");
        let mut early = Latency::new();
        early.record_n(8_000, 2);
        early.record_n(10_000, 4);
        assert_eq!(s, early.summary());
        assert_eq!(u.built.front(), Some(&(6..10, t0 + ms(2))));
        // A nack of line 9 answers 6-9 untimed; a repeated ack answers nothing more.
        assert_eq!(u.answer(9, t0 + ms(20), None), 4);
        assert_eq!(u.answer(3, t0 + ms(20), Some(&mut latency)), 0);
        assert_eq!(u.answer(11, t0 + ms(23), Some(&mut latency)), 2);
        let s = latency.summary();
        assert_eq!(s.count, 8, "the nack's four lines are not timed");
        assert!(
            near(s.p999, 20_000),
            "lines 10 and 11, built at 3 ms: {s:?}"
        );
        assert!(u.built.is_empty() && u.next == 12);
    }

    #[test]
    fn unsent_lines_count_complete_lines_only() {
        assert_eq!(unsent_lines(b""), 0);
        assert_eq!(unsent_lines(b"ics\"}\n{\"type\":\"metrics\"}\n{\"ty"), 2);
    }
}
