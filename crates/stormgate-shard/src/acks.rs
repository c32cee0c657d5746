//! Acknowledgements to a station: which of its lines Kafka has, in the order it sent them.
//!
//! A connection that asked for acknowledgements gets a [`ConnAcks`]. Each metrics line with a
//! `seq` that becomes a record opens a slot in its window; the shard's ledger marks the slot
//! when the sink settles the record; the connection task, woken when the oldest slot is
//! settled, turns the settled prefix of the window into reply lines:
//!
//! - a run of delivered slots becomes one `{"type":"ack","upto":N}` (or `{"type":"ack","seq":N}`
//!   for a run of one), N being the run's last seq;
//! - a failed slot becomes `{"type":"nack","seq":N,"code":"…"}`.
//!
//! Answers therefore go out in the order the lines were read, whatever order the deliveries
//! complete in (records of different zipcodes go to different partitions). Shard-local.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::Waker;

use crate::sink::{DeliveryFailure, Outcome};

/// How a slot ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pending,
    Delivered,
    Failed(&'static str),
}

/// One connection's window of acknowledged lines. See the module doc.
#[derive(Default)]
pub(crate) struct ConnAcks {
    /// (seq, state), oldest first.
    window: RefCell<VecDeque<(u64, Slot)>>,
    /// The id of the window's front slot; ids count every slot ever opened.
    front_id: Cell<u64>,
    /// The connection task, waiting for the front slot to settle.
    waker: Cell<Option<Waker>>,
}

impl ConnAcks {
    /// Opens a slot for a line with `seq`; the returned id settles it.
    pub(crate) fn open(&self, seq: u64) -> u64 {
        let mut window = self.window.borrow_mut();
        let id = self.front_id.get() + window.len() as u64;
        window.push_back((seq, Slot::Pending));
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
            Outcome::Failed(DeliveryFailure::ShutdownDeadline) => Slot::Failed("shutdown"),
            Outcome::Failed(DeliveryFailure::Rejected { .. }) => Slot::Failed("delivery_failed"),
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
            .is_some_and(|(_, s)| *s != Slot::Pending)
    }

    /// Whether lines still wait for their answer.
    pub(crate) fn is_empty(&self) -> bool {
        self.window.borrow().is_empty()
    }

    /// Wakes `waker` when the front slot settles.
    pub(crate) fn register(&self, waker: &Waker) {
        self.waker.set(Some(waker.clone()));
    }

    /// Appends the answers for the settled front of the window to `out`.
    pub(crate) fn take_ready(&self, out: &mut Vec<u8>) {
        let mut window = self.window.borrow_mut();
        let mut run: Option<(u64, usize)> = None;
        while let Some(&(seq, slot)) = window.front() {
            match slot {
                Slot::Pending => break,
                Slot::Delivered => {
                    // `upto` means every unanswered seq up to N: a run may only grow upwards.
                    if run.is_some_and(|(last, _)| seq <= last) {
                        push_ack(out, run.take());
                    }
                    run = Some((seq, run.map_or(1, |(_, n)| n + 1)));
                }
                Slot::Failed(code) => {
                    push_ack(out, run.take());
                    push_line(out, b"{\"type\":\"nack\",\"seq\":", seq, code);
                }
            }
            window.pop_front();
            self.front_id.set(self.front_id.get() + 1);
        }
        push_ack(out, run);
    }
}

fn push_ack(out: &mut Vec<u8>, run: Option<(u64, usize)>) {
    match run {
        None => {}
        Some((seq, 1)) => push_line(out, b"{\"type\":\"ack\",\"seq\":", seq, ""),
        Some((seq, _)) => push_line(out, b"{\"type\":\"ack\",\"upto\":", seq, ""),
    }
}

fn push_line(out: &mut Vec<u8>, head: &[u8], seq: u64, code: &str) {
    out.extend_from_slice(head);
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    if !code.is_empty() {
        out.extend_from_slice(b",\"code\":\"");
        out.extend_from_slice(code.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(acks: &ConnAcks) -> String {
        let mut out = Vec::new();
        acks.take_ready(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn answers_go_out_in_line_order_and_delivered_runs_coalesce() {
        let acks = ConnAcks::default();
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

    #[test]
    fn a_seq_that_does_not_increase_ends_a_coalesced_run() {
        let acks = ConnAcks::default();
        for seq in [5, 6, 3, 3, 9] {
            let id = acks.open(seq);
            acks.settle(id, &Outcome::Delivered);
        }
        assert_eq!(
            text(&acks),
            "{\"type\":\"ack\",\"upto\":6}\n{\"type\":\"ack\",\"seq\":3}\n\
             {\"type\":\"ack\",\"upto\":9}\n"
        );
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
        let acks = ConnAcks::default();
        let a = acks.open(1);
        let b = acks.open(2);
        acks.register(&waker);
        acks.settle(b, &Outcome::Delivered);
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "not the front");
        acks.settle(a, &Outcome::Delivered);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }
}
