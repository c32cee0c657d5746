//! One station connection: read, frame, parse, enqueue, reply.
//!
//! The task reads into its shard's read buffer and handles every complete line there, in
//! place, without awaiting. It awaits only to read, to write error lines back, and when it is
//! *blocked*: the shard queue is full, the connection has as many records (or bytes of
//! records) in flight as it may, the shard holds its byte budget of records, or the answers
//! the station has not read yet reached [`REPLY_MAX`]. Before it awaits, whatever it has not
//! finished moves into its own leftover, and it does not read again until that leftover holds
//! no complete line. That is the TCP backpressure: a blocked connection leaves its bytes in
//! the kernel, the kernel's receive window closes, and the station's sends slow down. Nothing
//! is dropped.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWriteExt, FutureExt};
use glommio::channels::local_channel::LocalSender;
use stormgate_protocol::ErrorCode;
use stormgate_telemetry::Event;

use crate::acks::ConnectionAcks;
use crate::contract::Record;
use crate::core::{Registration, ShardCore};
use crate::events::{CloseReason, ConnectionClosed, TlsHandshakeFailed};
use crate::lines::{Blocked, Env, LineHandler, REPLY_MAX, ReadStamp, timeouts};
use crate::policy::{Closing, Timeouts, after, earliest};
use crate::readiness::Socket;
use crate::tls::StationStream;

/// How much a read into a connection's own leftover asks for.
const LEFTOVER_READ: usize = 16 * 1024;
/// Longest partial line carried into the shard's read buffer; longer ones are read onto in
/// the connection's leftover (see `Connection::read_into`).
const CARRY_MAX: usize = 4 * 1024;
/// Reply buffers larger than this are freed after each flush rather than kept.
const REPLY_KEEP: usize = 1024;
/// How long the final error line of a connection the server closes may take to write.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one accepted connection until the station leaves or the shard shuts down.
///
/// The connection's state is built before the future, which then owns nothing else: an idle
/// connection costs the size of this future (plus its session's heap strings), so it is kept
/// small (see `Connection::run`).
pub(crate) fn serve(
    core: Rc<ShardCore>,
    stream: Socket,
    peer: SocketAddr,
    queue: Rc<LocalSender<Record>>,
) -> impl Future<Output = ()> + 'static {
    let mut id = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut id);
    let lines = LineHandler::new(&core, id, peer, ReadStamp::now());
    let registration = core.register(&stream);
    let mut conn = Connection {
        core,
        stream: StationStream::Plain(stream),
        registration,
        queue,
        lines,
    };
    async move {
        // A bug that panics while serving one connection ends that connection, not the shard:
        // the panic is caught here, logged and counted, and the connection's resources are
        // released as for any close. Shard-wide state it may have held borrowed (the read
        // buffer, the parser) is released by unwinding and is valid for the next user.
        let reason = match AssertUnwindSafe(conn.run()).catch_unwind().await {
            Ok(reason) => reason,
            Err(panic) => CloseReason::Panicked(panic_message(&*panic)),
        };
        conn.lines.leftover.release(&conn.core.leftovers);
        ConnectionClosed {
            connection_id: conn.lines.session.connection_id(),
            peer: conn.lines.peer,
            reason,
        }
        .emit_every(&conn.core.metrics);
        conn.core.limits.release(conn.lines.peer.ip());
    }
}

/// One connection's I/O: its socket, its entry in the shard's table, and the reads, waits and
/// writes around its [`LineHandler`].
struct Connection {
    core: Rc<ShardCore>,
    stream: StationStream,
    /// The socket's entry in the shard's table (shutdown, read deadlines, the drain's count
    /// of open connections); removed when the connection drops.
    registration: Registration,
    queue: Rc<LocalSender<Record>>,
    lines: LineHandler,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.core.deregister(&self.registration);
    }
}

impl Connection {
    /// The connection's life. Rare paths (blocks, replies, closing) are boxed futures: an
    /// idle connection's task is this future's size, so only the common states may be large.
    async fn run(&mut self) -> CloseReason {
        if self.core.config.tls.is_some()
            && let Err(reason) = Box::pin(self.start_tls()).await
        {
            return reason;
        }
        loop {
            if self.registration.drained(&self.core) {
                return Box::pin(self.reconnect()).await;
            }
            // Not one `match` on the read's result: the result would then be kept across the
            // flush's await, in every connection's task.
            let read = match self.read().await {
                Ok(read) => read.map(|n| self.handle_read(n)),
                Err(e) => return CloseReason::Io(e),
            };
            let Some(n) = read else {
                // Answers became ready while waiting for bytes.
                self.lines.take_acks();
                if let Err(e) = Box::pin(self.flush_replies()).await {
                    return CloseReason::Io(e);
                }
                continue;
            };
            if n == 0 && self.registration.expired(&self.core) {
                // The shard ended the reads at the deadline (not the station leaving):
                // a partial line in the leftover is cut, not completed.
                let code = if self.lines.policy.partial() {
                    ErrorCode::LineTimeout
                } else {
                    ErrorCode::IdleTimeout
                };
                return Box::pin(self.close_with(code)).await;
            }
            if n == 0 && !self.registration.drained(&self.core) && !self.lines.leftover.is_empty() {
                // The station closed without a final newline: its last line is complete.
                self.lines.leftover.push(b"\n", &self.core.leftovers);
                self.lines.handle_leftover(&Env {
                    core: &self.core,
                    queue: &self.queue,
                    certificate: self.stream.peer_certificate(),
                });
            }
            if self.lines.blocked.is_some()
                && let Err(e) = Box::pin(self.drain_blocks()).await
            {
                return CloseReason::Io(e);
            }
            if let Some(closing) = self.lines.policy.closing() {
                return match closing {
                    Closing::SinkStopped => CloseReason::SinkStopped,
                    Closing::TooManyErrors => {
                        Box::pin(self.farewell()).await;
                        CloseReason::TooManyErrors
                    }
                    Closing::AuthFailures => {
                        Box::pin(self.farewell()).await;
                        CloseReason::AuthFailures
                    }
                };
            }
            if n == 0 && self.lines.acks.as_ref().is_some_and(|a| !a.is_empty()) {
                // The station stopped sending; it may still wait for its answers.
                if let Err(e) = Box::pin(self.answer_the_rest()).await {
                    return CloseReason::Io(e);
                }
            }
            self.lines.take_acks();
            if !self.lines.replies.is_empty()
                && let Err(e) = Box::pin(self.flush_replies()).await
            {
                return CloseReason::Io(e);
            }
            self.lines.track_partial_line(&self.core);
            if let Some(wait) = self.lines.overdraft(&self.core) {
                Box::pin(self.throttle(wait)).await;
            }
            if n == 0 {
                return if self.registration.drained(&self.core) {
                    Box::pin(self.reconnect()).await
                } else {
                    CloseReason::PeerClosed
                };
            }
        }
    }

    /// Turns the connection into TLS: the handshake, bounded by `TLS_HANDSHAKE_TIMEOUT`,
    /// with the configuration current at this moment (a reload changes it for later
    /// connections only).
    async fn start_tls(&mut self) -> Result<(), CloseReason> {
        let core = Rc::clone(&self.core);
        let tls = core
            .config
            .tls
            .as_ref()
            .expect("called with TLS configured");
        let timeout = core.config.tls_handshake_timeout;
        match self.stream.start_tls(tls.server_config(), timeout).await {
            Ok(()) => {
                core.metrics.tls_handshakes.incr();
                Ok(())
            }
            Err(error) => {
                TlsHandshakeFailed {
                    connection_id: self.lines.session.connection_id(),
                    peer: self.lines.peer,
                    error: &error,
                }
                .emit(&core.metrics, &core.logs.tls_failed);
                Err(CloseReason::TlsHandshake)
            }
        }
    }

    fn timeouts(&self) -> Timeouts {
        timeouts(&self.core.config)
    }

    /// Sends `code`'s error line (best effort, bounded in time) and ends the connection.
    async fn close_with(&mut self, code: ErrorCode) -> CloseReason {
        self.lines.send_error(&self.core, code);
        self.farewell().await;
        match code {
            ErrorCode::IdleTimeout => CloseReason::IdleTimeout,
            ErrorCode::LineTimeout => CloseReason::LineTimeout,
            _ => CloseReason::TooManyErrors,
        }
    }

    /// Ends a connection shutdown reached (see `ShardCore::drain_connections`): answers every
    /// line it read (they settle by the shutdown deadline at the latest), then tells the
    /// station `reconnect`, best effort and bounded in time like any farewell.
    async fn reconnect(&mut self) -> CloseReason {
        if let Err(e) = self.answer_the_rest().await {
            return CloseReason::Io(e);
        }
        self.lines.take_acks();
        self.lines
            .replies
            .extend_from_slice(stormgate_protocol::RECONNECT_LINE.as_bytes());
        self.farewell().await;
        if let Some(socket) = self.stream.socket() {
            linger(socket, self.core.ledger.deadline.get()).await;
        }
        CloseReason::Shutdown
    }

    /// Writes the pending error lines of a connection the server is closing, giving up after
    /// [`FAREWELL_TIMEOUT`] (the station may not be reading).
    async fn farewell(&mut self) {
        let _ = glommio::timer::timeout(FAREWELL_TIMEOUT, async {
            self.flush_replies().await?;
            // TLS's close_notify, so that the station's TLS stack sees an orderly end rather
            // than a truncation. Queued and flushed, not `close`d: the socket closes when the
            // connection ends (for a drained one, after `linger`).
            if self.stream.queue_close_notify() {
                self.stream.flush().await?;
            }
            Ok(())
        })
        .await;
    }

    /// Waits out an overdrawn line budget without reading (the station's writes block in
    /// TCP: nothing is dropped), or until shutdown begins (once it has, until the deadline).
    async fn throttle(&mut self, wait: Duration) {
        self.core.metrics.rate_limited_waits.incr();
        // Held back by the shard, not idle: no read deadline while it waits.
        self.registration.set_deadline(&self.core, None);
        if self.core.draining.is_fired() {
            // Still served until its moment of the drain period: the limit holds, up to the
            // shutdown deadline.
            let left = self
                .core
                .ledger
                .deadline
                .get()
                .map_or(wait, |d| d.saturating_duration_since(Instant::now()));
            glommio::timer::sleep(wait.min(left)).await;
        } else {
            futures_lite::future::or(glommio::timer::sleep(wait), self.core.draining.wait()).await;
        }
        // The wait was the shard's doing: the station's clocks start again.
        self.lines.policy.restart(Instant::now(), self.timeouts());
    }

    /// After the station's end of stream: writes answers as they become ready until every
    /// line has one. The records settle by the delivery timeout at the latest, or at the
    /// shutdown deadline.
    async fn answer_the_rest(&mut self) -> io::Result<()> {
        let Some(acks) = self.lines.acks.clone() else {
            return Ok(());
        };
        while !acks.is_empty() {
            poll_fn(|cx| {
                if acks.is_ready() {
                    Poll::Ready(())
                } else {
                    acks.register(cx.waker());
                    Poll::Pending
                }
            })
            .await;
            acks.take_ready(&mut self.lines.replies, REPLY_MAX);
            self.flush_replies().await?;
        }
        Ok(())
    }

    /// Reads once: the bytes read (0 at EOF) for `handle_read` to handle, or `None` without
    /// reading when answers for the station are ready first.
    ///
    /// Normally the read goes into the shard's read buffer, behind room for the partial line
    /// the connection carries from its previous read (a few hundred bytes at most, usually):
    /// once the read completes, the partial line moves in front of the new bytes and
    /// everything is handled in place. So a busy connection holds only its partial line
    /// between reads, and an idle one nothing. Only an unusually long partial line (over
    /// [`CARRY_MAX`]) is read onto in the connection's own leftover.
    ///
    /// The read waits with the connection's read deadline (`deadline`) armed only while it
    /// waits on the socket, not while the shard's gate parks it. Two steps rather than one
    /// async fn: an idle connection's task holds the read future for as long as it waits,
    /// and a wrapping async fn would add its own state to every one.
    fn read(&mut self) -> Read<'_> {
        Read {
            conn: self,
            armed: None,
            turn: None,
        }
    }

    /// Where the next read goes: a function of the leftover, which no read changes until it
    /// completes, so the read future need not keep it.
    fn read_into(&self) -> ReadInto {
        let carry = self.lines.leftover.len();
        if carry <= CARRY_MAX.min(self.core.config.read_buffer_bytes / 2) {
            ReadInto::Shard { carry }
        } else {
            // The leftover holds a partial line (it holds no complete one when the connection
            // reads): read only what can complete it or prove it too long, so that the
            // leftover never grows past `TCP_MAX_LINE_BYTES` + 2 (+ padding).
            let want = (self.core.config.max_line_bytes + 2)
                .saturating_sub(carry)
                .clamp(1, LEFTOVER_READ);
            ReadInto::Leftover { want }
        }
    }

    /// Handles what `read` read; returns the bytes read (0 at EOF).
    fn handle_read(&mut self, n: usize) -> usize {
        match self.read_into() {
            ReadInto::Shard { carry } if n > 0 => {
                // No await since the read completed: the shard buffer still holds our bytes.
                self.lines.stamp_read(&self.core, ReadStamp::now());
                let core = &self.core;
                let mut buf = core.read_buf.borrow_mut();
                let buf = buf.as_mut();
                let end = carry + n;
                if carry > 0 {
                    buf[..carry].copy_from_slice(self.lines.leftover.bytes());
                    self.lines.leftover.release(&core.leftovers);
                }
                let env = Env {
                    core,
                    queue: &self.queue,
                    certificate: self.stream.peer_certificate(),
                };
                let done = self.lines.handle(&env, buf, 0, end);
                if done < end {
                    self.lines.leftover.push(&buf[done..end], &core.leftovers);
                }
            }
            ReadInto::Leftover { .. } if n > 0 => {
                self.lines.leftover.commit(n);
                self.lines.stamp_read(&self.core, ReadStamp::now());
                self.lines.handle_leftover(&Env {
                    core: &self.core,
                    queue: &self.queue,
                    certificate: self.stream.peer_certificate(),
                });
            }
            _ => {}
        }
        self.count_read(n);
        n
    }

    fn count_read(&self, n: usize) {
        self.core.metrics.bytes_received.add(n as u64);
    }

    /// Waits out every block, handling the leftover after each, until nothing blocks. Fails
    /// only when answers cannot be written.
    async fn drain_blocks(&mut self) -> io::Result<()> {
        // Held back by the shard, not idle: no read deadline while it waits.
        self.registration.set_deadline(&self.core, None);
        while let Some(blocked) = self.lines.blocked.take() {
            match blocked {
                Blocked::Flow => {
                    self.core.metrics.backpressure_waits.incr();
                    let flow = self.lines.flow.clone().expect("flow blocks need a flow");
                    flow.room().await;
                }
                Blocked::Bytes => {
                    self.core.metrics.backpressure_waits.incr();
                    let core = Rc::clone(&self.core);
                    core.ledger.byte_room().await;
                }
                Blocked::Replies => {
                    // Answers are written even to a station we stopped reading: it reads
                    // them, or its write timeout (`TCP_IDLE_TIMEOUT`) ends it.
                    self.lines.take_acks();
                    self.flush_replies().await?;
                }
                Blocked::Queue(record) => {
                    self.core.metrics.backpressure_waits.incr();
                    if let Err(e) = self.queue.send(*record).await {
                        self.lines.lost_sink(&self.core, e);
                        return Ok(());
                    }
                    self.core.gate.enqueued();
                }
            }
            self.lines.handle_leftover(&Env {
                core: &self.core,
                queue: &self.queue,
                certificate: self.stream.peer_certificate(),
            });
        }
        // The wait was the shard's doing: the station's clocks start again.
        self.lines.policy.restart(Instant::now(), self.timeouts());
        Ok(())
    }

    async fn flush_replies(&mut self) -> io::Result<()> {
        if self.lines.replies.is_empty() {
            return Ok(());
        }
        self.stream.write_all(&self.lines.replies).await?;
        // A no-op for a plain socket; TLS holds what it encrypted until flushed.
        self.stream.flush().await?;
        if self.lines.replies.capacity() > REPLY_KEEP {
            self.lines.replies = Vec::new();
        } else {
            self.lines.replies.clear();
        }
        Ok(())
    }
}

/// The text of a caught panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// How often, at most, [`linger`] drops what a station still sends: the pace at which the
/// station's receive window re-opens, which [`LINGER_MAX_BYTES`] counts on.
const LINGER_POLL: Duration = Duration::from_millis(10);
/// Most bytes [`linger`] discards: more than a station that reads its replies can still
/// have on its way when the `reconnect` line reaches it (the receive window is at most
/// `TCP_RECV_BUFFER`, 256 KiB by default, and re-opens at most once per [`LINGER_POLL`]
/// while the line travels).
const LINGER_MAX_BYTES: usize = 1024 * 1024;

/// After telling a drained station to reconnect: waits until the station closes its side
/// of the stream — at most [`FAREWELL_TIMEOUT`], not past `deadline`, and discarding at
/// most [`LINGER_MAX_BYTES`] of what it still sends — so that the server's close is the
/// orderly one that follows.
///
/// Closing a socket with received bytes unread makes the kernel answer with a reset instead
/// of an orderly close, and a reset destroys what is still on its way to the station: the
/// `reconnect` line itself, acknowledgements. A station that keeps writing until it reads
/// the line (as every busy one does) always has bytes in flight at that moment. The bytes
/// discarded are lines the server was never going to read: a station with acknowledgements
/// sends them again after reconnecting; one that does not read what the server writes
/// cannot learn of the reconnect, keeps sending past the bounds, and is reset as before.
///
/// Discarding re-opens the receive window, so a station with bytes still unsent gets them
/// through and its FIN follows; the socket's TCP state says when it came (`CLOSE_WAIT`).
/// The drain leaves the socket's read side open for this: on a socket whose read side is
/// shut Linux sends no window update as its queue empties (`tcp_cleanup_rbuf`), and such
/// a station would find the room only by its window probes, backing off past the
/// farewell's bound.
///
/// Between two looks it waits for the socket's next event (`Socket::arrival`), then for
/// [`LINGER_POLL`]: at shutdown every connection of the shard lingers at once, and the
/// silent ones — most of tens of thousands — cost no system call until their station
/// sends or closes (polling them every 10 ms took both cores of the 2-core VM for the
/// whole second with 15,000 of them), while one still sending is paced as the bound
/// assumes. (Dropping its bytes at every event instead failed one CI run: a flat-out TLS
/// station was reset before it read `reconnect`, most likely past the bound.) Plain
/// non-blocking `recv`s, off the hot path: this runs once per connection, at shutdown.
async fn linger(socket: &Socket, deadline: Option<Instant>) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    let until = earliest(after(Instant::now(), Some(FAREWELL_TIMEOUT)), deadline)
        .expect("a timeout is set");
    let mut discarded = 0;
    loop {
        discarded += discard_queued(fd);
        if peer_closed(fd) || discarded > LINGER_MAX_BYTES || Instant::now() >= until {
            // Whatever arrived since: a reset only if the station is still sending.
            discard_queued(fd);
            return;
        }
        let bound = until.saturating_duration_since(Instant::now());
        let arrived = futures_lite::future::or(
            async {
                socket.arrival().await;
                true
            },
            async {
                glommio::timer::sleep(bound).await;
                false
            },
        );
        if arrived.await {
            glommio::timer::sleep(LINGER_POLL.min(bound)).await;
        }
    }
}

/// Reads and drops whatever the socket holds now, without waiting; returns how much.
fn discard_queued(fd: std::os::fd::RawFd) -> usize {
    let mut scratch = [0u8; 4096];
    let mut total = 0;
    loop {
        // SAFETY: a valid fd and a buffer of the stated length.
        let n = unsafe {
            libc::recv(
                fd,
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 || total > LINGER_MAX_BYTES {
            return total;
        }
        total += n as usize;
    }
}

/// Whether the station closed its side, or the connection is no longer established.
fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, and a tcp_info buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    const TCP_ESTABLISHED: u8 = 1;
    rc != 0 || info.tcpi_state != TCP_ESTABLISHED
}

/// Where a read puts the station's bytes.
#[derive(Clone, Copy)]
enum ReadInto {
    /// The shard's read buffer, behind room for the `carry` bytes of partial line that
    /// move in front of them once the read completed.
    Shard { carry: usize },
    /// The connection's leftover, onto its long partial line: at most `want` more bytes.
    Leftover { want: usize },
}

/// The connection's one read, checked in this order at every poll: answers ready for the
/// station come first (`Ok(None)`: a station that waits for them before sending more would
/// otherwise wait on a read that waits on it); then the shard's gate (see
/// `gate_closed_to`); then the socket, with the read deadline armed.
///
/// A hand-written future rather than an async block: every idle connection's task holds
/// one for as long as it waits, and this one is the three fields below, 40 bytes (an
/// async fn around a `poll_fn` closure, which kept a reference per captured variable and
/// its locals twice, took 184).
struct Read<'a> {
    conn: &'a mut Connection,
    /// The deadline last written to the shard's table (`None`: none written yet).
    armed: Option<Option<Instant>>,
    /// This read's place in the gate's line, once parked.
    turn: Option<u64>,
}

impl Future for Read<'_> {
    type Output = io::Result<Option<usize>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Read { conn, armed, turn } = self.get_mut();
        let conn = &mut **conn;
        if acks_ready(conn.lines.acks.as_deref(), cx) {
            return Poll::Ready(Ok(None));
        }
        if gate_closed_to(&conn.core, &conn.registration, turn, cx) {
            arm(&conn.core, &conn.registration, None, armed);
            return Poll::Pending;
        }
        arm(
            &conn.core,
            &conn.registration,
            conn.lines.policy.deadline(),
            armed,
        );
        let into = conn.read_into();
        let stream = Pin::new(&mut conn.stream);
        match into {
            ReadInto::Shard { carry } => {
                let mut buf = conn.core.read_buf.borrow_mut();
                stream.poll_read(cx, &mut buf.read_area()[carry..])
            }
            ReadInto::Leftover { want } => {
                let area = conn.lines.leftover.read_area(want, &conn.core.leftovers);
                stream.poll_read(cx, area)
            }
        }
        .map_ok(Some)
    }
}

/// Sets the connection's read deadline in the shard's table to `deadline` unless `armed`
/// says it already is (`None`: not known), so a read that is polled many times writes it
/// only when it changes.
fn arm(
    core: &ShardCore,
    registration: &Registration,
    deadline: Option<Instant>,
    armed: &mut Option<Option<Instant>>,
) {
    if *armed != Some(deadline) {
        registration.set_deadline(core, deadline);
        *armed = Some(deadline);
    }
}

/// Whether answers for the station are ready; if not, the read's waker is woken when they
/// are. Answers come first: a station that waits for them before sending more would
/// otherwise wait on a read that waits on it.
fn acks_ready(acks: Option<&ConnectionAcks>, cx: &Context<'_>) -> bool {
    let Some(acks) = acks else { return false };
    if acks.is_ready() {
        return true;
    }
    acks.register(cx.waker());
    false
}

/// Whether a read must not take its bytes yet: the shard holds its byte budget of records
/// (`TCP_MAX_BYTES_IN_FLIGHT`; not once shutdown reached the connection, so that its read
/// sees its end of stream),
/// or its queue is half full (see `gate`).
/// Checked at every poll of the read, because the socket may turn readable long after the
/// read began, when the queue has filled meanwhile. `turn` is this read's place in the
/// gate's line, so that a wake-up by the socket does not queue the task twice.
fn gate_closed_to(
    core: &ShardCore,
    registration: &Registration,
    turn: &mut Option<u64>,
    cx: &Context<'_>,
) -> bool {
    if core.ledger.bytes_full() && !registration.drained(core) {
        // The shard holds its byte budget of records: reading now would only fill leftovers.
        core.metrics.backpressure_waits.incr();
        core.ledger.wait_bytes(cx.waker());
        return true;
    }
    if let Some(t) = *turn
        && core.gate.is_queued(t)
    {
        return true;
    }
    if core.gate.is_full() {
        core.metrics.backpressure_waits.incr();
        *turn = Some(core.gate.park(cx.waker()));
        return true;
    }
    false
}

/// Refuses a connection over the limit: one error line, then close. Bounded in time so a
/// client that never reads cannot pin the task.
///
/// Over TLS the connection is closed without a word: the line would have to follow a
/// handshake, and a refusal exists to spare the server work (a handshake costs more CPU than
/// thousands of lines). The station sees its handshake end early and retries later.
pub(crate) async fn refuse(mut stream: Socket, tls: bool) {
    let line = ErrorCode::TooManyConnections.error_line().as_bytes();
    let _ = glommio::timer::timeout(std::time::Duration::from_secs(1), async move {
        if !tls {
            stream.write_all(line).await?;
        }
        stream.close().await?;
        Ok(())
    })
    .await;
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::time::{Duration, Instant};

    use crate::{NullSinkFactory, RuntimeConfig, Server};

    use crate::lines::PANIC_LINE;

    /// A one-shard server on a free loopback port with the null sink.
    fn start_one_shard() -> crate::ServerHandle {
        Server::start(
            RuntimeConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                shards: 1,
                ..RuntimeConfig::default()
            },
            NullSinkFactory,
        )
        .unwrap()
    }

    /// The size of the last connection future spawned, in test builds.
    pub(crate) static TASK_BYTES: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    /// An idle connection costs its task (this state plus the small `run` future) and its
    /// slots in the shard's tables; nothing else stays allocated (docs/PERFORMANCE.md). A
    /// field added here is paid by every one of 50,000 idle connections: keep rare state
    /// boxed. 360 bytes; 464 while the socket was glommio's `TcpStream` (its two pending
    /// sources and two timeouts).
    #[test]
    fn a_connection_stays_small() {
        let size = std::mem::size_of::<super::Connection>();
        eprintln!("Connection: {size} bytes");
        assert!(size <= 360, "Connection grew to {size} bytes");
    }

    /// The whole future an idle connection's task holds: its `Connection` and the state of
    /// the read it waits in (440 bytes; 544 with glommio's `TcpStream`, 720 when the read
    /// was an async fn around a `poll_fn` closure, which kept a reference per captured
    /// variable, and the station kept its city apart from its record prefix).
    #[test]
    fn an_idle_connections_task_stays_small() {
        let server = start_one_shard();
        let s = std::net::TcpStream::connect(server.local_addr()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TASK_BYTES.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the connection was never served");
            std::thread::sleep(Duration::from_millis(5));
        }
        let size = TASK_BYTES.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("connection task future: {size} bytes");
        assert!(size > 360, "no connection future was measured ({size})");
        assert!(
            size <= 440,
            "an idle connection's future grew to {size} bytes"
        );
        drop(s);
        server.shutdown();
    }

    #[test]
    fn a_panicking_connection_ends_alone_and_the_shard_serves_on() {
        let server = start_one_shard();
        let connect = || {
            let s = std::net::TcpStream::connect(server.local_addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        };
        let identify = b"{\"type\":\"identify\",\"zipcode\":\"1\"}\n";
        let metrics = b"{\"type\":\"metrics\",\"data\":\"t=1\"}\n";
        let mut good = connect();
        good.write_all(identify).unwrap();
        good.write_all(metrics).unwrap();
        let mut bad = connect();
        bad.write_all(identify).unwrap();
        bad.write_all(metrics).unwrap();
        bad.write_all(PANIC_LINE).unwrap();
        bad.write_all(b"\n").unwrap();
        let mut rest = String::new();
        let _ = BufReader::new(bad).read_line(&mut rest);
        assert_eq!(rest, "", "the panicking connection is closed");
        // The same shard (only one) goes on serving the other connection and new ones.
        good.write_all(metrics).unwrap();
        let mut late = connect();
        late.write_all(identify).unwrap();
        late.write_all(metrics).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.totals().records_delivered < 4 {
            assert!(Instant::now() < deadline, "{:?}", server.totals());
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = server.totals();
        assert_eq!(t.connection_panics, 1);
        assert_eq!(t.connections_active, 2);
        assert_eq!(t.records_delivered, 4);
    }
}
