//! A reference station client: what a weather station's firmware does, in a few calls.
//!
//! Blocking std I/O on purpose: it is what tests, examples and simple devices want. Lines are
//! built with serde_json, so any zipcode, city or metric name is escaped correctly.
//!
//! ```no_run
//! use stormgate_station::Station;
//! let mut s = Station::connect("127.0.0.1:8080").unwrap();
//! s.identify("12345", "TestCity").unwrap();
//! s.metrics(&[("temperature", 25.5), ("humidity", 60.0)]).unwrap();
//! ```
//!
//! [`Station`] sends and forgets. [`ReliableStation`] (module [`reliable`]) asks for
//! acknowledgements and delivers every line at least once: it keeps unanswered lines, resends
//! them after a nack or a lost connection, and reconnects with backoff.
//!
//! ```no_run
//! use std::time::Duration;
//! use stormgate_station::ReliableStation;
//! let mut s = ReliableStation::connect("127.0.0.1:8080", "12345", "TestCity").unwrap();
//! s.send(&[("temperature", 25.5)]);
//! s.flush(Duration::from_secs(30)).unwrap();
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

pub mod reliable;

pub use reliable::{FlushError, ReliableStation, ReliableStationBuilder, ReliableStats};
/// What the server answers: the protocol crate's reply vocabulary, read by [`read_reply`].
pub use stormgate_protocol::{ErrorCode, NackCode, Reply};

/// The `identify` line for a station.
pub fn identify_line(zipcode: &str, city: &str) -> String {
    let mut line =
        serde_json::json!({"type": "identify", "zipcode": zipcode, "city": city}).to_string();
    line.push('\n');
    line
}

/// A `metrics` line in the text form (`name=value,...`).
pub fn metrics_line(metrics: &[(&str, f64)]) -> String {
    let data: Vec<String> = metrics.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let mut line = serde_json::json!({"type": "metrics", "data": data.join(",")}).to_string();
    line.push('\n');
    line
}

/// Reads the next reply line from `replies` (the server's side of a connection, plain or
/// TLS) with [`Reply::parse`]; end of stream is `UnexpectedEof`, a line that is not a reply
/// `InvalidData`.
pub fn read_reply(replies: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if replies.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Reply::parse(line.as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line:?}")))
}

/// A connected station.
#[derive(Debug)]
pub struct Station {
    stream: TcpStream,
    replies: BufReader<TcpStream>,
}

impl Station {
    /// Connects; replies time out after 10 s.
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<Station> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let replies = BufReader::new(stream.try_clone()?);
        Ok(Station { stream, replies })
    }

    /// The underlying socket (for socket options, or to write from another thread).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends an identify.
    pub fn identify(&mut self, zipcode: &str, city: &str) -> io::Result<()> {
        self.send(identify_line(zipcode, city).as_bytes())
    }

    /// Sends one metrics line.
    pub fn metrics(&mut self, metrics: &[(&str, f64)]) -> io::Result<()> {
        self.send(metrics_line(metrics).as_bytes())
    }

    /// Reads the next reply line.
    pub fn reply(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.replies)
    }

    /// Stops sending (the server sees end of stream) but keeps reading.
    pub fn finish(&mut self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// Reads everything until the server closes the connection.
    pub fn read_to_close(&mut self) -> io::Result<String> {
        let mut rest = String::new();
        self.replies.read_to_string(&mut rest)?;
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_escaped_json() {
        let l = identify_line("1\"2", "São Paulo");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["zipcode"], "1\"2");
        assert_eq!(v["city"], "São Paulo");
        assert_eq!(
            metrics_line(&[("t", 25.5), ("h", 60.0)]),
            "{\"data\":\"t=25.5,h=60\",\"type\":\"metrics\"}\n"
        );
    }

    #[test]
    fn replies_are_read_line_by_line() {
        let mut replies: &[u8] =
            b"{\"type\":\"error\",\"code\":\"malformed_json\",\"message\":\"y\"}\n\
            {\"type\":\"ack\",\"upto\":7}\n{\"type\":\"nack\",\"seq\":3,\"code\":\"shutdown\"}\n\
            {\"type\":\"reconnect\"}\n{\"type\":\"hello\"}\n";
        let code = ErrorCode::MalformedJson;
        assert_eq!(
            read_reply(&mut replies).unwrap(),
            Reply::Error { code, seq: None }
        );
        assert_eq!(
            read_reply(&mut replies).unwrap(),
            Reply::AckUpto { upto: 7 }
        );
        let code = NackCode::Shutdown;
        assert_eq!(
            read_reply(&mut replies).unwrap(),
            Reply::Nack { seq: 3, code }
        );
        assert_eq!(read_reply(&mut replies).unwrap(), Reply::Reconnect);
        let kind = |r: io::Result<Reply>| r.unwrap_err().kind();
        assert_eq!(kind(read_reply(&mut replies)), io::ErrorKind::InvalidData);
        assert_eq!(kind(read_reply(&mut replies)), io::ErrorKind::UnexpectedEof);
    }
}
