//! Cutting a byte stream into lines.
//!
//! [`LineFramer`] works on the caller's buffer and returns positions, never copies: the
//! connection reads into its buffer, asks the framer for complete lines, and keeps whatever
//! partial line is left for the next read. Lines end with `\n`; a `\r` before it is dropped;
//! lines holding only ASCII whitespace are skipped.
//!
//! A line longer than the limit is reported once as [`Frame::TooLong`] and then discarded up
//! to its newline, however long it turns out to be, so a sender without newlines cannot make a
//! connection buffer grow past the limit.

use std::ops::Range;

/// One item cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete, non-blank line: its bytes in the buffer, without `\r\n`.
    Line(Range<usize>),
    /// A line exceeded the limit. Reported once per oversized line; its bytes are skipped.
    TooLong,
}

/// Finds complete lines in a buffer, with a bound on line length.
///
/// Shard-local, one per connection: the only state it keeps across reads is whether it is in
/// the middle of skipping an oversized line.
#[derive(Debug, Clone)]
pub struct LineFramer {
    max_line: usize,
    discarding: bool,
}

impl LineFramer {
    /// A framer that accepts lines of up to `max_line` bytes, not counting the `\n` or `\r\n`
    /// that ends them.
    pub fn new(max_line: usize) -> Self {
        LineFramer {
            max_line,
            discarding: false,
        }
    }

    /// The configured maximum line length.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Whether the framer is skipping the rest of an oversized line.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Returns the next frame in `buf[*pos..]` and advances `*pos` past it.
    ///
    /// Returns `None` when no complete line is left. `buf[*pos..]` is then a partial line the
    /// caller must keep and extend with the next read, or empty. When the partial line is
    /// already too long, the framer reports [`Frame::TooLong`] at once, consumes it, and keeps
    /// consuming until the newline that ends it.
    pub fn next_frame(&mut self, buf: &[u8], pos: &mut usize) -> Option<Frame> {
        loop {
            let rest = &buf[*pos..];
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                if self.discarding {
                    *pos = buf.len();
                    return None;
                }
                // A trailing `\r` may be the first half of `\r\n`: it does not count yet, so
                // the verdict does not depend on where the stream was split.
                let pending = rest.len() - usize::from(rest.last() == Some(&b'\r'));
                if pending > self.max_line {
                    self.discarding = true;
                    *pos = buf.len();
                    return Some(Frame::TooLong);
                }
                return None;
            };
            let start = *pos;
            *pos = start + nl + 1;
            if self.discarding {
                self.discarding = false;
                continue;
            }
            let mut end = start + nl;
            if end > start && buf[end - 1] == b'\r' {
                end -= 1;
            }
            if end - start > self.max_line {
                return Some(Frame::TooLong);
            }
            if buf[start..end].iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Frame::Line(start..end));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one read at a time through a buffer the way a connection does, and
    /// renders what came out: lines as text, `TooLong` as `!`.
    fn frames(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut framer = LineFramer::new(max);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            let mut pos = 0;
            while let Some(frame) = framer.next_frame(&buf, &mut pos) {
                out.push(match frame {
                    Frame::Line(r) => String::from_utf8_lossy(&buf[r]).into_owned(),
                    Frame::TooLong => "!".to_owned(),
                });
            }
            buf.drain(..pos);
            assert!(
                buf.len() <= max + 1,
                "buffer grew past the limit: {}",
                buf.len()
            );
        }
        out
    }

    fn check(max: usize, chunks: &[&[u8]], expect: &[&str]) {
        assert_eq!(frames(max, chunks), expect, "chunks {chunks:?}");
    }

    #[test]
    fn framing() {
        check(64, &[b"a\nb\n"], &["a", "b"]);
        check(64, &[b"a\r\nb\r\n"], &["a", "b"]);
        check(64, &[b"a\n\n\r\n  \t\nb\n"], &["a", "b"]);
        check(64, &[b"ab", b"c\nd", b"e\n"], &["abc", "de"]);
        check(64, &[b"abc\r", b"\n"], &["abc"]);
        check(64, &[b"no newline yet"], &[]);
        check(64, &[b"\r\n"], &[]);
        check(64, &[b"a\rb\n"], &["a\rb"]);
        check(64, &["città\n".as_bytes()], &["città"]);
    }

    #[test]
    fn oversized_lines_are_reported_once_and_skipped() {
        // Exactly at the limit is fine, one over is not.
        check(4, &[b"abcd\nabcde\nok\n"], &["abcd", "!", "ok"]);
        // The line ending does not count, even when split across reads.
        check(4, &[b"abcd\r\n"], &["abcd"]);
        check(4, &[b"abcd\r", b"\n"], &["abcd"]);
        check(4, &[b"abcd\r", b"x\n", b"ok\n"], &["!", "ok"]);
        // Detected before the newline arrives, then skipped across many reads.
        check(4, &[b"abcdefgh", b"ijklmnop", b"qrs\nok\n"], &["!", "ok"]);
        check(4, &[b"abcdefgh", b"\n", b"ok\n"], &["!", "ok"]);
        // Two oversized lines in a row are two reports.
        check(4, &[b"abcdefgh\nabcdefgh\n"], &["!", "!"]);
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_frames() {
        let stream: &[u8] = b"one\r\n\ntwo\nthreeeeeeeeeeee\nfour\r\neightchr\r\n";
        let whole = frames(8, &[stream]);
        assert_eq!(whole, ["one", "two", "!", "four", "eightchr"]);
        for a in 0..stream.len() {
            for b in a..stream.len() {
                let parts = [&stream[..a], &stream[a..b], &stream[b..]];
                assert_eq!(frames(8, &parts), whole, "split at {a},{b}");
            }
        }
    }
}
