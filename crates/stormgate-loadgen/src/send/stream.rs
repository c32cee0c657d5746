//! A connection's byte stream: the nonblocking socket itself, or TLS over it.
//!
//! Both kinds keep the socket's contract, so the worker drives them alike: `read` returns
//! `Ok(0)` at the end and `WouldBlock` when there is nothing now; `write` returns how many of
//! the bytes it took, or `WouldBlock` when it took none. Every `WouldBlock` comes from the
//! socket itself in that very call, so the socket's next edge (mio is edge-triggered) is
//! armed and the worker never has to poll again to find out.
//!
//! TLS ([`TlsStream`]) drives a rustls [`ClientConnection`] over the socket by hand:
//!
//! - **writing** sends what rustls still holds first, and takes no new bytes while the
//!   socket is full; otherwise rustls encrypts them at once and as much as the socket takes
//!   goes out. What it does not take stays queued in rustls, behind at most one write of
//!   plaintext (the worker writes at most `BATCH_BYTES`, well under rustls's 64 KiB buffer
//!   limit, so a write is always taken whole), and goes out first on the next write or
//!   [`Stream::flush`].
//! - **reading** hands out the plaintext rustls has decrypted, reading and decrypting more
//!   from the socket only when it has none.
//! - **closing** queues a `close_notify` alert behind the data and shuts the socket's write
//!   side once everything is out, so the server reads every line and then a clean end.
//!
//! The plain stream is a `match` arm that calls the socket; nothing else is added to its
//! path.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;
use rustls::ClientConnection;

use crate::tls::TlsClient;

/// A connection's stream.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP; boxed, so that plain connections stay small (a `ClientConnection` is
    /// about a kilobyte before its buffers).
    Tls(Box<TlsStream>),
}

/// TLS over a nonblocking socket.
#[derive(Debug)]
pub struct TlsStream {
    socket: TcpStream,
    conn: ClientConnection,
}

impl Stream {
    /// A stream over `socket` (its connect may still be in progress): TLS when `tls` is given,
    /// with the ClientHello queued, to go out by [`TlsStream::handshake`].
    pub fn new(socket: TcpStream, tls: Option<&TlsClient>) -> io::Result<Stream> {
        Ok(match tls {
            None => Stream::Plain(socket),
            Some(tls) => {
                let conn = tls.connection().map_err(io::Error::other)?;
                Stream::Tls(Box::new(TlsStream { socket, conn }))
            }
        })
    }

    /// The socket underneath (to register it, or to ask how its connect went).
    pub fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.socket,
        }
    }

    /// See [`Stream::socket`].
    pub fn socket_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.socket,
        }
    }

    /// The TLS stream, when this is one.
    pub fn tls_mut(&mut self) -> Option<&mut TlsStream> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => Some(t),
        }
    }

    /// Reads received bytes (plaintext); `Ok(0)` is the end of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }

    /// Writes some of `buf`; returns how much was taken.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    /// Sends what the stream itself still holds (TLS records; a plain stream holds nothing).
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(t) => t.flush(),
        }
    }

    /// Ends the sending side: with TLS, a `close_notify` first. `WouldBlock` means the socket
    /// could not take everything yet: call again when it is writable.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.shutdown(Shutdown::Write),
            Stream::Tls(t) => {
                // Queued once: rustls ignores a second call.
                t.conn.send_close_notify();
                t.flush()?;
                t.socket.shutdown(Shutdown::Write)
            }
        }
    }
}

impl TlsStream {
    /// Moves the handshake on with what the socket holds: reads until it would block, and
    /// sends what rustls has to say. `Ok(true)` once the handshake is complete.
    pub fn handshake(&mut self) -> io::Result<bool> {
        loop {
            match self.conn.read_tls(&mut self.socket) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection during the TLS handshake",
                    ));
                }
                Ok(_) => self.process()?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match self.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            // What did not go out goes when the socket is writable again, at the next event.
            _ => {}
        }
        Ok(!self.conn.is_handshaking())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                // 0: the server's close_notify.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without a close_notify. Lines carry their own ends, so a
                // truncated stream cannot pass for a shorter one: an end like any other.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // No plaintext left: decrypt more. At the socket's end rustls notes it, and the
            // reader above says so.
            if self.conn.read_tls(&mut self.socket)? > 0 {
                self.process()?;
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.flush()?;
        let n = self.conn.writer().write(buf)?;
        if n == 0 && !buf.is_empty() {
            // Never after a complete flush (rustls's buffer is empty then); returning 0 would
            // have the worker try again at once, forever.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "rustls took no plaintext",
            ));
        }
        match self.flush() {
            // Taken and encrypted: it goes out first on the next write.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            other => other.map(|()| n),
        }
    }

    /// Writes the TLS records rustls holds until there are none or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Decrypts what was read; a protocol error (a bad certificate, a bad record) is sent to
    /// the server as an alert when the socket takes it, and ends the connection.
    fn process(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(_) => {}
            Err(e) => {
                let _ = self.flush();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        if self.conn.wants_write() {
            // Handshake messages, or a key update's answer; what the socket does not take
            // now goes first on the next write or flush.
            match self.flush() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}
