//! Station connections for tests. [`StationConn`] is the raw one a test of the server's
//! answers wants: every call panics on failure and replies come back as sent or parsed.
//! `stormgate_station::Station` is the reference client, with `io::Result`s; [`TlsStation`]
//! is its TLS counterpart.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use stormgate_protocol::{ErrorCode, Reply};
use stormgate_station::read_reply;

use crate::lines::seq_lines;

/// How long a read waits for a reply, unless the connection was opened with another.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain station connection whose every call panics on failure.
pub struct StationConn {
    stream: TcpStream,
    replies: BufReader<TcpStream>,
}

impl StationConn {
    /// Connects; reads time out after [`READ_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> StationConn {
        StationConn::connect_with_timeout(addr, READ_TIMEOUT)
    }

    /// Connects; reads time out after `read_timeout`.
    pub fn connect_with_timeout(addr: SocketAddr, read_timeout: Duration) -> StationConn {
        StationConn::from_stream(TcpStream::connect(addr).unwrap(), read_timeout)
    }

    /// Connects from loopback address `source` (e.g. `[127, 0, 0, 7]`), through
    /// [`crate::connect_from`]; reads time out after [`READ_TIMEOUT`].
    pub fn connect_from(addr: SocketAddr, source: impl Into<IpAddr>) -> StationConn {
        let socket = crate::connect_from(addr, Some(source.into()), |_| Ok(())).unwrap();
        StationConn::from_stream(socket.into(), READ_TIMEOUT)
    }

    fn from_stream(stream: TcpStream, read_timeout: Duration) -> StationConn {
        stream.set_read_timeout(Some(read_timeout)).unwrap();
        let replies = BufReader::new(stream.try_clone().unwrap());
        StationConn { stream, replies }
    }

    /// The socket (for socket options, or to write from another thread).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The reading side, for reads the calls below do not make (e.g. one that must see an
    /// error rather than panic on it).
    pub fn replies(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.replies
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).unwrap();
    }

    /// Stops sending (the server sees end of stream) but keeps reading.
    pub fn finish(&mut self) {
        self.stream.shutdown(std::net::Shutdown::Write).unwrap();
    }

    /// Sends an identify for `zipcode`, city `Town`, without acknowledgements.
    pub fn identify(&mut self, zipcode: &str) {
        self.send(
            format!("{{\"type\":\"identify\",\"zipcode\":\"{zipcode}\",\"city\":\"Town\"}}\n")
                .as_bytes(),
        );
    }

    /// Sends `n` metrics lines without a seq, in one write.
    pub fn metrics(&mut self, n: usize) {
        let mut batch = String::new();
        for i in 0..n {
            batch.push_str(&format!(
                "{{\"type\":\"metrics\",\"data\":\"temperature={i}.5,humidity=60\"}}\n"
            ));
        }
        self.send(batch.as_bytes());
    }

    /// Sends a metrics line for each seq of `seqs`, data `t=SEQ.5`, in one write.
    pub fn lines(&mut self, seqs: Range<u64>) {
        self.send(seq_lines(seqs, |n| format!("t={n}.5")));
    }

    /// The next reply line, as sent (empty at end of stream).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.replies.read_line(&mut line).unwrap();
        line
    }

    /// The next reply, parsed; end of stream fails.
    pub fn reply(&mut self) -> Reply {
        let line = self.line();
        assert!(!line.is_empty(), "closed");
        Reply::parse(line.as_bytes()).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    /// The next reply, which must be an error line without a seq.
    pub fn error_code(&mut self) -> ErrorCode {
        match self.reply() {
            Reply::Error { code, seq: None } => code,
            other => panic!("expected an error line, got {other:?}"),
        }
    }

    /// Reads until the server closes the connection; returns what it sent.
    pub fn read_to_close(&mut self) -> String {
        let mut rest = String::new();
        self.replies.read_to_string(&mut rest).unwrap();
        rest
    }
}

/// Reads replies with `next` until line `seq` is acknowledged (singly or by an `upto`); any
/// other reply, or none, fails.
pub fn wait_for_ack(mut next: impl FnMut() -> io::Result<Reply>, seq: u64) {
    loop {
        match next().expect("a reply") {
            Reply::Ack { seq: n } | Reply::AckUpto { upto: n } if n >= seq => return,
            Reply::Ack { .. } | Reply::AckUpto { .. } => {}
            other => panic!("waiting for the ack of {seq}: {other:?}"),
        }
    }
}

/// Completes a TLS handshake as a client of `localhost` on `tcp`, blocking: the session,
/// for a test that drives its I/O itself (e.g. reads and writes from two threads).
pub fn tls_handshake(
    tcp: &mut TcpStream,
    config: Arc<ClientConfig>,
) -> io::Result<ClientConnection> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(tcp)?;
    }
    Ok(conn)
}

/// A station over TLS, blocking, in the spirit of `stormgate_station::Station`.
pub struct TlsStation {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsStation {
    /// Connects and completes the handshake (with TLS 1.3 a refused client certificate is
    /// only seen at the first read: the server's alert follows the handshake).
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsStation> {
        let mut tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))?;
        let conn = tls_handshake(&mut tcp, config)?;
        Ok(TlsStation {
            stream: BufReader::new(StreamOwned::new(conn, tcp)),
        })
    }

    /// The TLS version the handshake settled on.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.get_ref().conn.protocol_version()
    }

    /// The server's certificate, DER.
    pub fn server_certificate(&self) -> Vec<u8> {
        self.stream.get_ref().conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let s = self.stream.get_mut();
        s.write_all(bytes)?;
        s.flush()
    }

    /// The next reply line, parsed.
    pub fn reply(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.stream)
    }

    /// Fails unless the server's next move is an orderly TLS close: its close_notify, with no
    /// more bytes before it (an abrupt TCP close is `UnexpectedEof`, silence a timeout).
    pub fn expect_close_notify(&mut self) {
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "bytes before the close: {rest:?}"),
            Err(e) => panic!("not an orderly TLS close: {e} ({:?})", e.kind()),
        }
    }

    /// Reads until `seq` is acknowledged; any other reply fails.
    pub fn wait_for_ack(&mut self, seq: u64) {
        wait_for_ack(|| self.reply(), seq);
    }
}
