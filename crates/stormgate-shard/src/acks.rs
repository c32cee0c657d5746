//! Acknowledgements to a station: which of its lines Kafka has, in the order it sent them.
//!
//! A connection that asked for acknowledgements gets a [`ConnectionAcks`]. Each metrics line with a
//! `seq` that becomes a record opens a slot in its window; the shard's ledger marks the slot
//! when the sink settles the record; the connection task, woken when the oldest slot is
//! settled, turns the settled prefix of the window into reply lines:
//!
//! - a run of delivered slots becomes one `{"type":"ack","upto":N}` (or `{"type":"ack","seq":N}`
//!   for a run of one), N being the run's last seq;
//! - a failed slot becomes `{"type":"nack","seq":N,"code":"…"}`.
//!
//! The lines themselves are `stormgate_protocol::reply`'s.
//!
//! Answers therefore go out in the order the lines were read, whatever order the deliveries
//! complete in (records of different zipcodes go to different partitions). Shard-local.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::Waker;

use stormgate_protocol::NackCode;
use stormgate_protocol::reply::{push_ack, push_ack_upto, push_nack};

use crate::contract::{DeliveryFailure, Outcome};

/// How a slot ended, or that it has not. One byte: a window holds up to
/// `TCP_MAX_IN_FLIGHT_PER_CONN` slots per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pending,
    Delivered,
    Failed(NackCode),
}

/// Most slots answered as one run: a coalesced run is one line, one that cannot be
/// coalesced is one line per slot (~30 bytes each).
const MAX_RUN: usize = 256;

/// One connection's window of acknowledged lines. See the module doc.
#[derive(Default)]
pub(crate) struct ConnectionAcks {
    /// (seq, state, descent), oldest first. A *descent* is a slot whose seq is not above
    /// every seq opened before it (the station's seqs went down or repeated).
    window: RefCell<VecDeque<(u64, Slot, bool)>>,
    /// The highest seq opened so far.
    max_seq: Cell<Option<u64>>,
    /// Descents still in the window. While there are any, a run is not coalesced into
    /// `upto N`: `upto` answers every unanswered seq up to N, and a later slot may hold one
    /// (seqs 10, 5, 7, 3 must not answer 3 with `upto 7` before its own delivery report).
    descents: Cell<usize>,
    /// The id of the window's front slot; ids count every slot ever opened.
    front_id: Cell<u64>,
    /// The connection task, waiting for the front slot to settle.
    waker: Cell<Option<Waker>>,
}

impl ConnectionAcks {
    /// Opens a slot for a line with `seq`; the returned id settles it.
    pub(crate) fn open(&self, seq: u64) -> u64 {
        let mut window = self.window.borrow_mut();
        let id = self.front_id.get() + window.len() as u64;
        let descent = self.max_seq.get().is_some_and(|max| seq <= max);
        if descent {
            self.descents.set(self.descents.get() + 1);
        } else {
            self.max_seq.set(Some(seq));
        }
        window.push_back((seq, Slot::Pending, descent));
        id
    }

    /// Records the fate of slot `id`, waking the connection if the window's front is now
    /// settled.
    pub(crate) fn settle(&self, id: u64, outcome: &Outcome) {
        let mut window = self.window.borrow_mut();
        let Some(i) = id.checked_sub(self.front_id.get()) else {
            debug_assert!(false, "ack slot {id} settled after it was answered");
            return;
        };
        let Some(slot) = window.get_mut(i as usize) else {
            debug_assert!(false, "unknown ack slot {id}");
            return;
        };
        slot.1 = match outcome {
            Outcome::Delivered => Slot::Delivered,
            Outcome::Failed(DeliveryFailure::ShutdownDeadline) => Slot::Failed(NackCode::Shutdown),
            Outcome::Failed(DeliveryFailure::Rejected { .. }) => {
                Slot::Failed(NackCode::DeliveryFailed)
            }
            Outcome::Failed(DeliveryFailure::BufferFull) => Slot::Failed(NackCode::BufferFull),
        };
        if i == 0
            && let Some(w) = self.waker.take()
        {
            w.wake();
        }
    }

    /// Whether answers are ready to be written.
    pub(crate) fn is_ready(&self) -> bool {
        self.window
            .borrow()
            .front()
            .is_some_and(|(_, s, _)| *s != Slot::Pending)
    }

    /// Whether lines still wait for their answer.
    pub(crate) fn is_empty(&self) -> bool {
        self.window.borrow().is_empty()
    }

    /// Wakes `waker` when the front slot settles.
    pub(crate) fn register(&self, waker: &Waker) {
        self.waker.set(Some(waker.clone()));
    }

    /// Appends the answers for the settled front of the window to `out`, until `out` holds
    /// `limit` bytes (it may pass it by one run of at most [`MAX_RUN`] answers).
    pub(crate) fn take_ready(&self, out: &mut Vec<u8>, limit: usize) {
        let mut window = self.window.borrow_mut();
        // Slots [run.0, i) are a delivered run with increasing seqs, not answered yet; `run.1`
        // counts the descents among slots [0, i), which are answered once `i` passes them.
        let mut run = (0, 0);
        let mut i = 0;
        while let Some(&(seq, slot, descent)) = window.get(i) {
            if out.len() >= limit {
                // The rest stays ready: answered once these are written.
                break;
            }
            match slot {
                Slot::Pending => break,
                Slot::Delivered => {
                    // `upto` means every unanswered seq up to N: a run may only grow upwards.
                    // A run is cut at MAX_RUN slots, which bounds what it may add to `out`
                    // when it cannot be coalesced.
                    if i > run.0 && (seq <= window[i - 1].0 || i - run.0 >= MAX_RUN) {
                        self.push_run(out, &window, run.0..i, run.1);
                        run.0 = i;
                    }
                }
                Slot::Failed(nack) => {
                    self.push_run(out, &window, run.0..i, run.1);
                    push_nack(out, seq, nack);
                    run.0 = i + 1;
                }
            }
            run.1 += usize::from(descent);
            i += 1;
        }
        self.push_run(out, &window, run.0..i, run.1);
        window.drain(..i);
        self.descents.set(self.descents.get() - run.1);
        self.front_id.set(self.front_id.get() + i as u64);
    }

    /// Answers the delivered run `window[run]` (seqs increasing): one `upto` for all of it,
    /// unless a slot after it (`passed` of the descents are before its end) may hold a seq
    /// the `upto` would cover; then one ack each.
    fn push_run(
        &self,
        out: &mut Vec<u8>,
        window: &VecDeque<(u64, Slot, bool)>,
        run: std::ops::Range<usize>,
        passed: usize,
    ) {
        let coalesce = self.descents.get() == passed;
        match run.len() {
            0 => {}
            1 => push_ack(out, window[run.start].0),
            _ if coalesce => push_ack_upto(out, window[run.end - 1].0),
            _ => {
                for &(seq, _, _) in window.range(run) {
                    push_ack(out, seq);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(acks: &ConnectionAcks) -> String {
        let mut out = Vec::new();
        acks.take_ready(&mut out, usize::MAX);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn answers_go_out_in_line_order_and_delivered_runs_coalesce() {
        let acks = ConnectionAcks::default();
        let ids: Vec<u64> = [10, 11, 12, 20, 21].iter().map(|&s| acks.open(s)).collect();
        // Out of order: the later ones first.
        acks.settle(ids[4], &Outcome::Delivered);
        acks.settle(ids[1], &Outcome::Delivered);
        assert!(!acks.is_ready(), "the oldest line is still pending");
        assert_eq!(text(&acks), "");
        acks.settle(ids[0], &Outcome::Delivered);
        assert!(acks.is_ready());
        assert_eq!(text(&acks), "{\"type\":\"ack\",\"upto\":11}\n");
        let failure = DeliveryFailure::Rejected { reason: "x".into() };
        acks.settle(ids[2], &Outcome::Failed(failure));
        acks.settle(ids[3], &Outcome::Delivered);
        assert_eq!(
            text(&acks),
            "{\"type\":\"nack\",\"seq\":12,\"code\":\"delivery_failed\"}\n\
             {\"type\":\"ack\",\"upto\":21}\n"
        );
        assert!(acks.is_empty());
        let id = acks.open(22);
        acks.settle(id, &Outcome::Failed(DeliveryFailure::ShutdownDeadline));
        let id = acks.open(23);
        acks.settle(id, &Outcome::Delivered);
        assert_eq!(
            text(&acks),
            "{\"type\":\"nack\",\"seq\":22,\"code\":\"shutdown\"}\n{\"type\":\"ack\",\"seq\":23}\n"
        );
    }

    /// 5 and 6 are not coalesced: `upto 6` would answer the 3s after them too.
    #[test]
    fn a_seq_that_does_not_increase_ends_a_coalesced_run() {
        let acks = ConnectionAcks::default();
        for seq in [5, 6, 3, 3, 9] {
            let id = acks.open(seq);
            acks.settle(id, &Outcome::Delivered);
        }
        assert_eq!(
            text(&acks),
            "{\"type\":\"ack\",\"seq\":5}\n{\"type\":\"ack\",\"seq\":6}\n\
             {\"type\":\"ack\",\"seq\":3}\n{\"type\":\"ack\",\"upto\":9}\n"
        );
    }

    /// Rule 3 of the ack protocol: `upto N` answers every unanswered seq up to N, so it must
    /// not be sent while a later line with a lower seq waits for its own answer.
    #[test]
    fn an_upto_never_covers_a_later_lower_seq() {
        let acks = ConnectionAcks::default();
        for seq in [10, 5, 7, 3] {
            let id = acks.open(seq);
            acks.settle(id, &Outcome::Delivered);
        }
        assert_eq!(
            text(&acks),
            "{\"type\":\"ack\",\"seq\":10}\n{\"type\":\"ack\",\"seq\":5}\n\
             {\"type\":\"ack\",\"seq\":7}\n{\"type\":\"ack\",\"seq\":3}\n"
        );
        // A lower seq still pending: the run 105, 107 is answered one by one, 50 waits.
        let ids: Vec<u64> = [5, 7, 3].iter().map(|&s| acks.open(s + 100)).collect();
        let low = acks.open(50);
        for id in ids {
            acks.settle(id, &Outcome::Delivered);
        }
        assert_eq!(
            text(&acks),
            "{\"type\":\"ack\",\"seq\":105}\n{\"type\":\"ack\",\"seq\":107}\n\
             {\"type\":\"ack\",\"seq\":103}\n"
        );
        acks.settle(low, &Outcome::Delivered);
        assert_eq!(text(&acks), "{\"type\":\"ack\",\"seq\":50}\n");
        // Once no lower seq is left behind, runs coalesce again.
        for seq in [200, 201, 202] {
            let id = acks.open(seq);
            acks.settle(id, &Outcome::Delivered);
        }
        assert_eq!(text(&acks), "{\"type\":\"ack\",\"upto\":202}\n");
    }

    #[test]
    fn settling_the_front_wakes_the_connection() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let acks = ConnectionAcks::default();
        let a = acks.open(1);
        let b = acks.open(2);
        acks.register(&waker);
        acks.settle(b, &Outcome::Delivered);
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "not the front");
        acks.settle(a, &Outcome::Delivered);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }
}
