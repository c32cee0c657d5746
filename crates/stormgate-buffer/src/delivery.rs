//! Which handed-out records are done: the delivered watermark as a pure data structure.
//!
//! Records are handed out in sequence order and reported done in any order. The watermark
//! is the end of the contiguous done prefix, never past the durable sequence number (a
//! checkpoint beyond durable data would make a crash reuse sequence numbers the checkpoint
//! calls delivered). Ranges the reader skipped (quarantined or missing) enter the window as
//! one done marker, so the watermark crosses them like any delivered record.

use std::collections::VecDeque;

/// Where a handed-out record lives, so that handing it out again costs a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    /// Its sequence number.
    pub seq: u64,
    /// The segment holding it (the segment's first sequence number).
    pub segment: u64,
    /// Its offset in the segment file.
    pub offset: u32,
    /// Its length, padding included.
    pub len: u32,
    /// Its timestamp (for the oldest-record gauge).
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Outstanding,
    RetryQueued,
    Done,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Location,
    state: State,
}

/// Why `done` or `retry` did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// Not handed out, or already covered by the watermark.
    NotOutstanding,
    /// Already reported done.
    AlreadyDone,
}

/// The window of handed-out records above the watermark.
#[derive(Debug)]
pub(crate) struct Delivery {
    window: VecDeque<Entry>,
    retry: VecDeque<u64>,
    watermark: u64,
    last_handed_out: u64,
    /// Entries not done.
    outstanding: usize,
}

impl Delivery {
    /// Nothing outstanding; every record up to `watermark` is delivered.
    pub(crate) fn new(watermark: u64) -> Delivery {
        Delivery {
            window: VecDeque::new(),
            retry: VecDeque::new(),
            watermark,
            last_handed_out: watermark,
            outstanding: 0,
        }
    }

    /// End of the contiguous done prefix (capped by durability when it advanced).
    pub(crate) fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Records handed out and not yet done. Kept as a count: the window holds up to the
    /// producer's queue of entries, too many to walk per call.
    pub(crate) fn outstanding(&self) -> usize {
        debug_assert_eq!(
            self.outstanding,
            self.window
                .iter()
                .filter(|e| e.state != State::Done)
                .count()
        );
        self.outstanding
    }

    /// Notes a record handed out for the first time. Sequence numbers only increase.
    pub(crate) fn handed_out(&mut self, at: Location) {
        assert!(
            at.seq > self.last_handed_out,
            "hand-out order: {} after {}",
            at.seq,
            self.last_handed_out
        );
        self.last_handed_out = at.seq;
        self.window.push_back(Entry {
            at,
            state: State::Outstanding,
        });
        self.outstanding += 1;
    }

    /// Notes that the reader skipped every sequence number up to `last` (a quarantined or
    /// missing range): they count as done.
    pub(crate) fn skipped_to(&mut self, last: u64) {
        if last <= self.last_handed_out {
            return;
        }
        self.last_handed_out = last;
        let at = Location {
            seq: last,
            segment: 0,
            offset: 0,
            len: 0,
            timestamp_ms: 0,
        };
        self.window.push_back(Entry {
            at,
            state: State::Done,
        });
    }

    fn find(&self, seq: u64) -> Option<usize> {
        let front = self.window.front()?.at.seq;
        let guess = usize::try_from(seq.checked_sub(front)?).ok()?;
        if self.window.get(guess).is_some_and(|e| e.at.seq == seq) {
            return Some(guess);
        }
        self.window.binary_search_by_key(&seq, |e| e.at.seq).ok()
    }

    /// Marks `seq` done. Returns its location (its segment and timestamp, for the caller's
    /// bookkeeping).
    pub(crate) fn done(&mut self, seq: u64) -> Result<Location, Unknown> {
        let i = self.find(seq).ok_or(Unknown::NotOutstanding)?;
        let e = &mut self.window[i];
        if e.state == State::Done {
            return Err(Unknown::AlreadyDone);
        }
        e.state = State::Done;
        self.outstanding -= 1;
        Ok(e.at)
    }

    /// Queues `seq` to be handed out again.
    pub(crate) fn retry(&mut self, seq: u64) -> Result<(), Unknown> {
        let i = self.find(seq).ok_or(Unknown::NotOutstanding)?;
        let e = &mut self.window[i];
        match e.state {
            State::Done => Err(Unknown::AlreadyDone),
            State::RetryQueued => Ok(()),
            State::Outstanding => {
                e.state = State::RetryQueued;
                self.retry.push_back(seq);
                Ok(())
            }
        }
    }

    /// The next record to hand out again, if any (it stays queued until
    /// [`Delivery::retried`]).
    pub(crate) fn peek_retry(&mut self) -> Option<Location> {
        while let Some(&seq) = self.retry.front() {
            match self.find(seq).map(|i| self.window[i]) {
                Some(e) if e.state == State::RetryQueued => return Some(e.at),
                // Reported done meanwhile: nothing to hand out.
                _ => {
                    self.retry.pop_front();
                }
            }
        }
        None
    }

    /// The record [`Delivery::peek_retry`] returned was handed out again.
    pub(crate) fn retried(&mut self, seq: u64) {
        debug_assert_eq!(self.retry.front(), Some(&seq));
        self.retry.pop_front();
        if let Some(i) = self.find(seq) {
            self.window[i].state = State::Outstanding;
        }
    }

    /// Moves the watermark over the done front of the window, never past `durable`.
    /// Returns whether it moved.
    pub(crate) fn advance(&mut self, durable: u64) -> bool {
        let before = self.watermark;
        while let Some(e) = self.window.front() {
            if e.state != State::Done || e.at.seq > durable {
                break;
            }
            self.watermark = e.at.seq;
            self.window.pop_front();
        }
        debug_assert!(self.watermark <= durable.max(before));
        self.watermark != before
    }

    /// Timestamp of the oldest record handed out and not done.
    pub(crate) fn oldest_timestamp_ms(&self) -> Option<i64> {
        self.window
            .iter()
            .find(|e| e.state != State::Done)
            .map(|e| e.at.timestamp_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64) -> Location {
        Location {
            seq,
            segment: 1,
            offset: 4096,
            len: 64,
            timestamp_ms: seq as i64,
        }
    }

    #[test]
    fn the_watermark_is_the_contiguous_done_prefix_capped_by_durability() {
        let mut d = Delivery::new(10);
        for s in 11..=20 {
            d.handed_out(at(s));
        }
        for s in [13, 11, 15, 12] {
            d.done(s).unwrap();
        }
        assert!(d.advance(100));
        assert_eq!(d.watermark(), 13);
        assert_eq!(d.oldest_timestamp_ms(), Some(14));
        d.done(14).unwrap();
        assert!(d.advance(14));
        assert_eq!(d.watermark(), 14, "15 is done but not durable");
        assert!(d.advance(15));
        assert_eq!(d.watermark(), 15);
        assert_eq!(d.done(15), Err(Unknown::NotOutstanding));
        assert_eq!(d.done(16).map(|l| l.seq), Ok(16));
        assert_eq!(d.done(16), Err(Unknown::AlreadyDone));
        assert_eq!(d.outstanding(), 4);
    }

    #[test]
    fn a_skipped_range_is_crossed_once_the_records_before_it_are_done() {
        let mut d = Delivery::new(0);
        d.handed_out(at(1));
        d.skipped_to(50);
        d.handed_out(at(51));
        d.done(51).unwrap();
        d.advance(u64::MAX);
        assert_eq!(d.watermark(), 0);
        d.done(1).unwrap();
        d.advance(u64::MAX);
        assert_eq!(d.watermark(), 51);
    }

    #[test]
    fn a_retried_record_is_handed_out_again_once_and_can_then_be_done() {
        let mut d = Delivery::new(0);
        for s in 1..=3 {
            d.handed_out(at(s));
        }
        d.retry(2).unwrap();
        d.retry(2).unwrap();
        assert_eq!(d.peek_retry().map(|l| l.seq), Some(2));
        d.retried(2);
        assert_eq!(d.peek_retry(), None);
        d.retry(3).unwrap();
        d.done(3).unwrap();
        assert_eq!(
            d.peek_retry(),
            None,
            "done after the retry request: nothing to resend"
        );
        for s in [1, 2] {
            d.done(s).unwrap();
        }
        d.advance(3);
        assert_eq!(d.watermark(), 3);
    }
}
