//! TLS on the station listener, as the shard sees it: a configuration to hand each new
//! connection, and a stream that is plain TCP or TLS over it.
//!
//! The shard builds no TLS configuration and loads no file. With `TLS_CERT`/`TLS_KEY` the
//! binary hands it a [`StationTls`] (certificates reloaded in the background), and each
//! connection's task asks it once, at the start, for the configuration of its handshake. The
//! handshake runs in that task, on the shard that accepted the connection, like everything
//! else the connection does: no handshake thread, no hand-off between shards. Afterwards the
//! connection reads and writes through rustls exactly as it would through the socket.

use std::fmt::Debug;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::TlsAcceptor;
use futures_rustls::server::TlsStream;

use crate::readiness::Socket;

/// Where new connections get their TLS configuration.
///
/// Shared by every shard (`Arc`), and asked on the shard's own thread once per accepted
/// connection — never per line. So it must answer quickly and never block: no I/O, and no
/// lock another thread can hold for longer than a pointer swap. The answer may change over
/// time (a certificate reload); a connection keeps the configuration its handshake used.
pub trait StationTls: Send + Sync + Debug {
    /// The configuration for the next handshake.
    fn server_config(&self) -> Arc<rustls::ServerConfig>;
}

/// A station's byte stream: the socket itself, or TLS over it.
///
/// The TLS state is boxed so that a plain connection pays one word for the possibility, and
/// a TLS connection's task stays small while rustls keeps its buffers on the heap.
pub(crate) enum StationStream {
    Plain(Socket),
    Tls(Box<TlsStream<Socket>>),
    /// Only while [`StationStream::start_tls`] holds the socket, and after it failed.
    Gone,
}

impl StationStream {
    /// The end-entity certificate (DER) the station presented in its handshake: only with
    /// mutual TLS, and then verified against the client CAs.
    pub(crate) fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            StationStream::Tls(s) => s.get_ref().1.peer_certificates()?.first().map(|c| &c[..]),
            _ => None,
        }
    }

    /// Queues TLS's close_notify for the next flush; whether there was a TLS session to end.
    /// The socket stays open both ways until it is closed.
    pub(crate) fn queue_close_notify(&mut self) -> bool {
        match self {
            StationStream::Tls(s) => {
                s.get_mut().1.send_close_notify();
                true
            }
            _ => false,
        }
    }

    /// The TCP socket under the stream (`None` once gone).
    pub(crate) fn socket(&self) -> Option<&Socket> {
        match self {
            StationStream::Plain(s) => Some(s),
            StationStream::Tls(s) => Some(s.get_ref().0),
            StationStream::Gone => None,
        }
    }

    /// Runs the server side of a TLS handshake on the socket, giving up after `timeout`
    /// (a client that connects and stalls, or trickles its hello, holds a descriptor and
    /// rustls's buffers until then). On success the stream is TLS; on failure it is gone.
    pub(crate) async fn start_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> io::Result<()> {
        let StationStream::Plain(tcp) = std::mem::replace(self, StationStream::Gone) else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "not a plain socket",
            ));
        };
        let accept = TlsAcceptor::from(config).accept(tcp);
        let tls = glommio::timer::timeout(timeout, async { accept.await.map_err(Into::into) })
            .await
            .map_err(|e| match e {
                glommio::GlommioError::IoError(e) => e,
                other => io::Error::new(io::ErrorKind::TimedOut, other.to_string()),
            })?;
        *self = StationStream::Tls(Box::new(tls));
        Ok(())
    }
}

impl AsyncRead for StationStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            StationStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            StationStream::Tls(s) => match Pin::new(&mut **s).poll_read(cx, buf) {
                // The station closed its TCP side without TLS's close_notify. Most embedded
                // TLS stacks do, so it is the end of the stream like a plain FIN: the
                // truncation it could hide is a cut line, and a cut line is rejected by the
                // parser (or, as the last line without its newline, is still a whole JSON
                // value: the same rule as over plain TCP, see docs/PROTOCOL.md).
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(0))
                }
                other => other,
            },
            StationStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for StationStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            StationStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            StationStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            StationStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StationStream::Plain(s) => Pin::new(s).poll_flush(cx),
            StationStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            StationStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StationStream::Plain(s) => Pin::new(s).poll_close(cx),
            StationStream::Tls(s) => Pin::new(&mut **s).poll_close(cx),
            StationStream::Gone => Poll::Ready(Ok(())),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
}
