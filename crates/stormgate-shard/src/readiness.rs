//! The shard's station sockets: read and written with non-blocking system calls, woken by
//! one shard-wide readiness source.
//!
//! glommio arms an io_uring poll for every socket read that has to wait (a
//! reference-counted source of ~495 bytes in two allocations) and one when the socket is
//! created, so every idle connection kept one for as long as it waited: a third of what an
//! idle station cost. Here each station socket is registered once, edge-triggered, with
//! the shard's epoll instance, and one task ([`Readiness::run`]) awaits that instance's
//! readiness on the shard's ring (`glommio::net::readable`, see vendor/README.md) and wakes
//! the connections whose sockets changed. An idle connection holds a slot of the table
//! here (a waker, a few flags, a write deadline) and the kernel's epoll item; nothing else.
//!
//! Readiness is edge-triggered, so a socket's flags say "may have bytes / room": they are
//! set by every event and cleared only when a system call says there is nothing (`EAGAIN`),
//! or when a read or write stopped short of its buffer, which on a TCP socket means the
//! kernel's queue ran dry (tokio clears its readiness on the same rule). Any byte that
//! arrives after that produces a new event. The shard is one thread, so no event can be
//! handled between a system call and the flag it clears. What produces no further event —
//! the station's end of stream (`EPOLLRDHUP`), a hang-up or an error — is kept for good
//! instead: a short read of the last bytes before a FIN must not hide the FIN.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use slab::Slab;

/// Events taken from the epoll instance per system call.
const EVENTS: usize = 256;

/// One shard's epoll instance and the table of the sockets registered with it.
pub(crate) struct Readiness {
    epoll: OwnedFd,
    slots: RefCell<Slab<Slot>>,
    /// How long a write may wait for room before it fails with `TimedOut` (`None`: forever).
    write_timeout: Option<Duration>,
    /// No slot's write deadline is earlier than this (`None`: no write waits).
    next_write_deadline: Cell<Option<Instant>>,
}

/// A registered socket, as the shard's readiness table knows it.
#[derive(Default)]
struct Slot {
    /// The task waiting on the socket, woken (once) by its next event.
    waker: Option<Waker>,
    /// The socket may have bytes to read, or an end of stream or error to report.
    readable: bool,
    /// The socket may have room to write.
    writable: bool,
    /// The station's end of stream, a hang-up or an error came: reads never wait again.
    read_closed: bool,
    /// A hang-up or an error came: writes never wait again.
    write_closed: bool,
    /// A write has waited for room since before this minus the write timeout.
    write_deadline: Option<Instant>,
    /// The write waited past its deadline: it fails.
    write_expired: bool,
    /// The shard ended the connection's reads (drained or expired, see
    /// [`Readiness::end_reads`]): every read returns end-of-file.
    reads_ended: bool,
}

impl Slot {
    fn park(&mut self, cx: &Context<'_>) {
        match &self.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
    }
}

impl Readiness {
    /// A new epoll instance; writes that wait longer than `write_timeout` for room fail.
    pub(crate) fn new(write_timeout: Option<Duration>) -> io::Result<Readiness> {
        // SAFETY: no pointer arguments; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Readiness {
            // SAFETY: a descriptor just created and owned by nothing else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            slots: RefCell::new(Slab::new()),
            write_timeout,
            next_write_deadline: Cell::new(None),
        })
    }

    /// Sockets registered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    /// Takes the events of the shard's sockets as they come and wakes the tasks waiting on
    /// them, until dropped. One io_uring poll on the epoll instance is armed at a time; each
    /// completion is followed by non-blocking `epoll_wait`s until the instance is empty.
    pub(crate) async fn run(self: Rc<Self>) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let mut woken = Vec::with_capacity(EVENTS);
        loop {
            if let Err(e) = glommio::net::readable(self.epoll.as_raw_fd()).await {
                // Cannot happen for an epoll instance the shard owns; never spin on it.
                tracing::error!(error = %e, "polling the shard's epoll instance failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            loop {
                // SAFETY: a buffer of `EVENTS` entries; timeout 0: never blocks the thread.
                let n = unsafe {
                    libc::epoll_wait(
                        self.epoll.as_raw_fd(),
                        events.as_mut_ptr(),
                        EVENTS as i32,
                        0,
                    )
                };
                if n < 0 {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    break;
                }
                let n = n as usize;
                self.mark(&events[..n], &mut woken);
                // Woken outside the table's borrow: a waker may run code that registers.
                for waker in woken.drain(..) {
                    waker.wake();
                }
                if n < EVENTS {
                    break;
                }
            }
        }
    }

    /// Sets the flags of the sockets `events` are about and collects their waiting tasks.
    fn mark(&self, events: &[libc::epoll_event], woken: &mut Vec<Waker>) {
        const READ: u32 =
            (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        const READ_CLOSED: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        const WRITE: u32 = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        const WRITE_CLOSED: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let mut slots = self.slots.borrow_mut();
        for event in events {
            let (bits, key) = (event.events, event.u64);
            // A socket that deregistered after its event was queued: nothing to wake. A
            // slot reused since only sees a spurious wake-up, which every poll tolerates.
            let Some(slot) = slots.get_mut(key as usize) else {
                continue;
            };
            slot.readable |= bits & READ != 0;
            slot.read_closed |= bits & READ_CLOSED != 0;
            slot.writable |= bits & WRITE != 0;
            slot.write_closed |= bits & WRITE_CLOSED != 0;
            if let Some(waker) = slot.waker.take() {
                woken.push(waker);
            }
        }
    }

    /// Ends the reads of socket `key` (the shard drained or expired its connection): from
    /// now on they return end-of-file, whatever the kernel still holds, and the task waiting
    /// on the socket is woken. The socket itself stays open both ways: shutting its read
    /// side would do the same for reads, but Linux then stops re-opening the receive window
    /// as the connection discards what still arrives (see `connection::linger`).
    pub(crate) fn end_reads(&self, key: u32) {
        let waker = self
            .slots
            .borrow_mut()
            .get_mut(key as usize)
            .and_then(|slot| {
                slot.reads_ended = true;
                slot.waker.take()
            });
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Fails the writes that waited past their deadline (see [`Readiness::new`]): marks them
    /// and wakes their tasks. Scans the table only when the earliest deadline may have
    /// passed; the shard's housekeeping tick calls it, so the timeout is as precise as the
    /// tick.
    pub(crate) fn expire_writes(&self, now: Instant) {
        if self.next_write_deadline.get().is_none_or(|t| t > now) {
            return;
        }
        let mut next: Option<Instant> = None;
        let mut woken = Vec::new();
        for (_, slot) in self.slots.borrow_mut().iter_mut() {
            match slot.write_deadline {
                Some(d) if d <= now && !slot.write_expired => {
                    slot.write_expired = true;
                    woken.extend(slot.waker.take());
                }
                Some(d) if !slot.write_expired => next = Some(next.map_or(d, |n| n.min(d))),
                _ => {}
            }
        }
        self.next_write_deadline.set(next);
        for waker in woken {
            waker.wake();
        }
    }

    fn register(&self, fd: RawFd) -> io::Result<usize> {
        let mut slots = self.slots.borrow_mut();
        let entry = slots.vacant_entry();
        let key = entry.key();
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: key as u64,
        };
        // SAFETY: a valid descriptor and event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) }
            < 0
        {
            return Err(io::Error::last_os_error());
        }
        // Bytes may be queued already: the first read tries.
        entry.insert(Slot {
            readable: true,
            writable: true,
            ..Slot::default()
        });
        Ok(key)
    }

    fn deregister(&self, key: usize, fd: RawFd) {
        // SAFETY: a valid descriptor; the event argument is ignored for a removal. Removed
        // explicitly rather than by the close: a duplicate of the descriptor would keep the
        // registration (and its events for a reused key) alive.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        self.slots.borrow_mut().try_remove(key);
    }

    fn arm_write_deadline(&self, slot: &mut Slot) {
        if slot.write_deadline.is_some() {
            return;
        }
        if let Some(timeout) = self.write_timeout
            && let Some(deadline) = Instant::now().checked_add(timeout)
        {
            slot.write_deadline = Some(deadline);
            if self.next_write_deadline.get().is_none_or(|n| deadline < n) {
                self.next_write_deadline.set(Some(deadline));
            }
        }
    }
}

/// A station's TCP socket, registered with its shard's [`Readiness`] until dropped (which
/// closes it). Reads and writes never block the thread: each is one non-blocking system
/// call when the socket may be ready, and a parked waker when it is not.
pub(crate) struct Socket {
    fd: OwnedFd,
    key: u32,
    readiness: Rc<Readiness>,
}

impl Socket {
    /// Takes `fd`, a connected TCP socket, and registers it with `readiness`.
    pub(crate) fn new(fd: OwnedFd, readiness: &Rc<Readiness>) -> io::Result<Socket> {
        let key = readiness.register(fd.as_raw_fd())?;
        Ok(Socket {
            fd,
            key: u32::try_from(key).expect("fewer than 2^32 sockets per shard"),
            readiness: Rc::clone(readiness),
        })
    }

    /// Its key in the readiness table (see [`Readiness::end_reads`]).
    pub(crate) fn key(&self) -> u32 {
        self.key
    }

    /// Waits until the socket may hold bytes, an end of stream or an error — whether or not
    /// the shard ended its reads — and takes the mark: the caller drains the socket with
    /// its own `recv`s next, and what arrives after that is a new event. A socket whose
    /// station closed keeps its mark (no further event comes). No system call.
    pub(crate) async fn arrival(&self) {
        std::future::poll_fn(|cx| {
            let mut slots = self.readiness.slots.borrow_mut();
            let slot = slots
                .get_mut(self.key as usize)
                .expect("a socket stays registered until dropped");
            if slot.readable {
                slot.readable = slot.read_closed;
                return Poll::Ready(());
            }
            slot.park(cx);
            Poll::Pending
        })
        .await;
    }

    fn io_poll(
        &self,
        cx: &Context<'_>,
        len: usize,
        write: bool,
        mut call: impl FnMut() -> isize,
    ) -> Poll<io::Result<usize>> {
        let mut slots = self.readiness.slots.borrow_mut();
        let slot = slots
            .get_mut(self.key as usize)
            .expect("a socket stays registered until dropped");
        if write && slot.write_expired {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the station took no bytes for the write timeout",
            )));
        }
        if len == 0 || (!write && slot.reads_ended) {
            return Poll::Ready(Ok(0));
        }
        let (ready, closed) = if write {
            (&mut slot.writable, slot.write_closed)
        } else {
            (&mut slot.readable, slot.read_closed)
        };
        while *ready {
            let n = call();
            if n >= 0 {
                let n = n as usize;
                if n > 0 && n < len {
                    // Short: the kernel's queue (or room) ran out; the next byte is an event.
                    *ready = closed;
                }
                if write {
                    slot.write_deadline = None;
                }
                return Poll::Ready(Ok(n));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => *ready = closed,
                _ => return Poll::Ready(Err(e)),
            }
        }
        slot.park(cx);
        if write {
            self.readiness.arm_write_deadline(slot);
        }
        Poll::Pending
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.readiness
            .deregister(self.key as usize, self.fd.as_raw_fd());
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.fd.as_raw_fd();
        self.io_poll(cx, buf.len(), false, || {
            // SAFETY: a valid descriptor and a buffer of the stated length.
            unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) }
        })
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.fd.as_raw_fd();
        self.io_poll(cx, buf.len(), true, || {
            // SAFETY: a valid descriptor and a buffer of the stated length. MSG_NOSIGNAL: a
            // station that left is an EPIPE, not a SIGPIPE.
            unsafe {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            }
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts the write side; the descriptor closes when the socket is dropped.
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: a valid descriptor.
        let rc = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOTCONN) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use glommio::LocalExecutor;

    use super::{Readiness, Socket};

    /// A connected pair: our `Socket` on the server side, a blocking std stream the test
    /// drives from another thread.
    fn pair(readiness: &Rc<Readiness>) -> (Socket, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // SAFETY: a descriptor taken out of its owner.
        let fd = unsafe { OwnedFd::from_raw_fd(server.into_raw_fd()) };
        (Socket::new(fd, readiness).unwrap(), client)
    }

    /// Runs `body` on an executor, with a readiness source whose writes time out after
    /// `write_timeout` and its pump running, as a shard has them.
    fn on_shard<F, Fut>(write_timeout: Option<Duration>, body: F)
    where
        F: FnOnce(Rc<Readiness>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        LocalExecutor::default().run(async {
            let readiness = Rc::new(Readiness::new(write_timeout).unwrap());
            let pump = glommio::spawn_local(Rc::clone(&readiness).run());
            body(readiness).await;
            drop(pump);
        });
    }

    #[test]
    fn a_waiting_read_is_woken_by_bytes_and_by_the_end_of_stream() {
        on_shard(None, |readiness| async move {
            let (mut socket, mut client) = pair(&readiness);
            let writer = std::thread::spawn(move || {
                for chunk in [&b"first\n"[..], b"second\n"] {
                    std::thread::sleep(Duration::from_millis(50));
                    client.write_all(chunk).unwrap();
                }
                std::thread::sleep(Duration::from_millis(50));
                drop(client);
            });
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, b"first\nsecond\n");
            writer.join().unwrap();
            assert_eq!(readiness.len(), 1);
            drop(socket);
            assert_eq!(readiness.len(), 0, "a dropped socket leaves the table");
        });
    }

    /// The last bytes and the FIN arrive together, and their events are taken before the
    /// read: the read of the bytes is short, and the end of stream must still be seen (it
    /// brings no further event).
    #[test]
    fn the_end_of_stream_behind_the_last_bytes_is_not_missed() {
        on_shard(None, |readiness| async move {
            let (mut socket, mut client) = pair(&readiness);
            client.write_all(b"last line\n").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            // The pump takes both events while nothing waits.
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let mut buf = [0u8; 64];
            assert_eq!(socket.read(&mut buf).await.unwrap(), 10);
            let eof = glommio::timer::timeout(Duration::from_secs(5), async {
                Ok(socket.read(&mut buf).await)
            })
            .await
            .expect("the end of stream was missed");
            assert_eq!(eof.unwrap(), 0);
        });
    }

    /// The shard ends a connection's reads (drain, read timeout): a read waiting on the
    /// socket is woken with end-of-file, and later reads return it too, even with bytes
    /// queued in the kernel; writes go on.
    #[test]
    fn ended_reads_return_end_of_file_and_wake_the_waiting_read() {
        on_shard(None, |readiness| async move {
            let (mut socket, mut client) = pair(&readiness);
            let key = socket.key();
            let ender = glommio::spawn_local({
                let readiness = Rc::clone(&readiness);
                async move {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    readiness.end_reads(key);
                }
            });
            let mut buf = [0u8; 64];
            let first = glommio::timer::timeout(Duration::from_secs(5), async {
                Ok(socket.read(&mut buf).await)
            })
            .await
            .expect("the waiting read was not woken");
            assert_eq!(first.unwrap(), 0);
            ender.await;
            client.write_all(b"more\n").unwrap();
            glommio::timer::sleep(Duration::from_millis(20)).await;
            assert_eq!(socket.read(&mut buf).await.unwrap(), 0);
            socket.write_all(b"answer\n").await.unwrap();
            let mut answer = [0u8; 7];
            client.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"answer\n");
        });
    }

    /// A lingering connection (`connection::linger`) waits for arrivals with its reads
    /// ended: each mark is taken once, nothing wakes it while the station is silent, and
    /// the station's end of stream stays marked.
    #[test]
    fn an_arrival_is_each_event_once_whether_or_not_reads_ended() {
        on_shard(None, |readiness| async move {
            let (socket, mut client) = pair(&readiness);
            readiness.end_reads(socket.key());
            let pending = || futures_lite::future::poll_once(socket.arrival());
            // A new socket is marked (bytes may have come before it was registered).
            assert_eq!(pending().await, Some(()));
            assert_eq!(pending().await, None, "the mark was taken");
            let arrived = |what: &'static str| {
                let socket = &socket;
                async move {
                    glommio::timer::timeout(Duration::from_secs(10), async {
                        socket.arrival().await;
                        Ok(())
                    })
                    .await
                    .unwrap_or_else(|_| panic!("{what} did not wake the wait"));
                }
            };
            client.write_all(b"still sending\n").unwrap();
            arrived("bytes").await;
            let mut scratch = [0u8; 64];
            // SAFETY: a valid descriptor and a buffer of the stated length.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            assert_eq!(n, 14);
            assert_eq!(pending().await, None, "silent again");
            client.shutdown(std::net::Shutdown::Write).unwrap();
            arrived("the end of stream").await;
            assert_eq!(pending().await, Some(()), "an end of stream stays marked");
        });
    }

    #[test]
    fn many_sockets_wait_on_one_source_and_each_gets_its_own_bytes() {
        on_shard(None, |readiness| async move {
            let mut clients = Vec::new();
            let mut tasks = Vec::new();
            for i in 0..300u32 {
                let (mut socket, client) = pair(&readiness);
                clients.push(client);
                tasks.push(glommio::spawn_local(async move {
                    let mut buf = [0u8; 4];
                    socket.read_exact(&mut buf).await.unwrap();
                    assert_eq!(u32::from_le_bytes(buf), i);
                }));
            }
            // More sockets become ready at once than one `epoll_wait` takes.
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                for (i, c) in clients.iter_mut().enumerate().rev() {
                    c.write_all(&(i as u32).to_le_bytes()).unwrap();
                }
                clients
            });
            for task in tasks {
                task.await;
            }
            drop(writer.join().unwrap());
        });
    }

    #[test]
    fn a_write_waits_for_room_and_fails_past_the_write_timeout() {
        on_shard(Some(Duration::from_millis(200)), |readiness| async move {
            let (mut socket, mut client) = pair(&readiness);
            // The station reads 1 MiB later: the write waits for room, then completes.
            let reader = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let mut buf = vec![0u8; 1 << 20];
                client.read_exact(&mut buf).unwrap();
                client
            });
            let expire = glommio::spawn_local({
                let readiness = Rc::clone(&readiness);
                async move {
                    loop {
                        glommio::timer::sleep(Duration::from_millis(20)).await;
                        readiness.expire_writes(Instant::now());
                    }
                }
            });
            socket.write_all(&vec![7u8; 1 << 20]).await.unwrap();
            let _client = reader.join().unwrap();
            // Now nobody reads: the write fills the buffers, waits, and fails at its timeout.
            let started = Instant::now();
            let err = socket.write_all(&vec![7u8; 64 << 20]).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
            assert!(started.elapsed() >= Duration::from_millis(200));
            drop(expire);
        });
    }
}
