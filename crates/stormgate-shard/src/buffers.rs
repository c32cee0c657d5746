//! Buffers that keep an idle connection small.
//!
//! A connection does not own a read buffer. It reads into its shard's [`ReadBuf`], handles
//! every complete line in place, and copies into its own [`Leftover`] only what it could not
//! finish: a partial line, or lines it stopped at because of backpressure. A leftover returns
//! its memory to the shard's [`BufPool`] as soon as it is empty, so an idle connection holds no
//! buffer at all.

use std::cell::RefCell;
use std::ops::Range;

use stormgate_protocol::PARSE_PADDING;

/// The shard's read buffer: `capacity` readable bytes followed by [`PARSE_PADDING`], so every
/// line in it can be parsed in place. Shard-local; borrowed only between awaits.
#[derive(Debug)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    capacity: usize,
}

impl ReadBuf {
    pub(crate) fn new(capacity: usize) -> ReadBuf {
        ReadBuf {
            buf: vec![0; capacity + PARSE_PADDING],
            capacity,
        }
    }

    /// Where a read may write.
    pub(crate) fn read_area(&mut self) -> &mut [u8] {
        &mut self.buf[..self.capacity]
    }

    /// The whole buffer, padding included, for in-place parsing.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// The sizes of a [`BufPool`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSize {
    /// Capacity of a fresh buffer.
    pub(crate) initial: usize,
    /// Buffers that grew beyond this are dropped rather than kept.
    pub(crate) max_capacity: usize,
    /// Most buffers kept.
    pub(crate) max_kept: usize,
}

/// A shard-local free list of byte buffers.
#[derive(Debug)]
pub(crate) struct BufPool {
    free: RefCell<Vec<Vec<u8>>>,
    size: PoolSize,
}

impl BufPool {
    pub(crate) fn new(size: PoolSize) -> BufPool {
        BufPool {
            free: RefCell::new(Vec::new()),
            size,
        }
    }

    /// An empty buffer with at least the pool's initial capacity.
    pub(crate) fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size.initial))
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        if buf.capacity() <= self.size.max_capacity && free.len() < self.size.max_kept {
            buf.clear();
            free.push(buf);
        }
    }
}

/// Bytes a connection received but has not finished with, between `head` and `tail`.
///
/// The vector is kept zero-filled to its full length so that slices past `tail` are always
/// valid padding. Empty and unallocated while the connection is idle.
#[derive(Debug, Default)]
pub(crate) struct Leftover {
    buf: Vec<u8>,
    head: usize,
    tail: usize,
}

impl Leftover {
    pub(crate) fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    pub(crate) fn len(&self) -> usize {
        self.tail - self.head
    }

    /// The unfinished bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[self.head..self.tail]
    }

    /// Appends `data`.
    pub(crate) fn push(&mut self, data: &[u8], pool: &BufPool) {
        self.reserve(data.len(), pool);
        self.buf[self.tail..self.tail + data.len()].copy_from_slice(data);
        self.tail += data.len();
    }

    /// Makes room for `want` more bytes and returns where a read may write them.
    pub(crate) fn read_area(&mut self, want: usize, pool: &BufPool) -> &mut [u8] {
        self.reserve(want, pool);
        let end = self.buf.len() - PARSE_PADDING;
        &mut self.buf[self.tail..end]
    }

    /// Records that a read wrote `n` bytes into [`read_area`](Self::read_area).
    pub(crate) fn commit(&mut self, n: usize) {
        self.tail += n;
    }

    /// The buffer with its padding, and the range holding unfinished bytes.
    pub(crate) fn parts(&mut self) -> (&mut [u8], Range<usize>) {
        (&mut self.buf, self.head..self.tail)
    }

    /// Drops everything before `pos`; gives the buffer back once nothing is left.
    pub(crate) fn consume_to(&mut self, pos: usize, pool: &BufPool) {
        debug_assert!(pos >= self.head && pos <= self.tail);
        self.head = pos;
        if self.head == self.tail {
            self.release(pool);
        }
    }

    /// Gives the buffer back to the pool, discarding any content.
    pub(crate) fn release(&mut self, pool: &BufPool) {
        self.head = 0;
        self.tail = 0;
        if self.buf.capacity() > 0 {
            pool.give(std::mem::take(&mut self.buf));
        }
    }

    fn reserve(&mut self, extra: usize, pool: &BufPool) {
        if self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        let needed = self.tail + extra + PARSE_PADDING;
        if self.buf.is_empty() {
            self.buf = pool.take();
        }
        if self.buf.len() < needed {
            // Exactly what is needed (to the next KiB), not double: a leftover holds one
            // partial line or one read's worth of lines behind a block, and doubling made a
            // 64 KiB partial line cost 128 KiB per connection.
            let size = needed.next_multiple_of(1024).max(self.buf.capacity());
            self.buf.reserve_exact(size - self.buf.len());
            self.buf.resize(size, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_keeps_padding_and_releases_when_empty() {
        let pool = BufPool::new(PoolSize {
            initial: 64,
            max_capacity: 1 << 20,
            max_kept: 4,
        });
        let mut b = Leftover::default();
        assert!(b.is_empty());
        b.push(b"hello ", &pool);
        let area = b.read_area(5, &pool);
        area[..5].copy_from_slice(b"world");
        b.commit(5);
        let (buf, range) = b.parts();
        assert_eq!(&buf[range.clone()], b"hello world");
        assert!(buf.len() - range.end >= PARSE_PADDING);
        b.consume_to(6, &pool);
        assert_eq!(b.len(), 5);
        b.push(b"!", &pool);
        let (buf, range) = b.parts();
        assert_eq!(&buf[range.clone()], b"world!");
        let end = range.end;
        b.consume_to(end, &pool);
        assert!(b.is_empty());
        assert_eq!(b.buf.capacity(), 0, "an empty leftover holds no memory");
        assert_eq!(
            pool.free.borrow().len(),
            1,
            "its buffer went back to the pool"
        );
    }

    #[test]
    fn a_growing_leftover_holds_what_it_needs_not_double() {
        let pool = BufPool::new(PoolSize {
            initial: 1024,
            max_capacity: 4096,
            max_kept: 4,
        });
        let mut b = Leftover::default();
        b.push(&[b'x'; 5000], &pool);
        // As a connection reads onto a long partial line: never more than completes it.
        while b.len() < 65_002 {
            let want = (16 * 1024).min(65_002 - b.len());
            b.read_area(want, &pool);
            b.commit(want);
        }
        let most = 65_002 + PARSE_PADDING + 1024;
        assert!(b.buf.capacity() <= most, "{} > {most}", b.buf.capacity());
    }

    #[test]
    fn pool_drops_oversized_and_excess_buffers() {
        let pool = BufPool::new(PoolSize {
            initial: 8,
            max_capacity: 16,
            max_kept: 1,
        });
        pool.give(Vec::with_capacity(32));
        assert_eq!(pool.free.borrow().len(), 0);
        pool.give(Vec::with_capacity(8));
        pool.give(Vec::with_capacity(8));
        assert_eq!(pool.free.borrow().len(), 1);
        assert!(pool.take().capacity() >= 8);
    }
}
