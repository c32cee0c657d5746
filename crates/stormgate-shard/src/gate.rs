//! The read gate: connections do not read while their shard's record queue is full.
//!
//! Without it, every connection whose turn comes while the queue is nearly full would still
//! read a buffer's worth of lines (hundreds), find room for a few, and keep the rest in its
//! leftover: with thousands of busy connections, that is thousands of read buffers held while
//! the producer catches up (heaptrack showed 190 MiB of leftovers at 3,000 connections before
//! this gate existed). With it, a connection that finds the queue half full parks before
//! reading, holding nothing, and parked connections are let through one at a time, in
//! arrival order, as the sink takes records out of a queue that is at most half full. The
//! other half is room for the reads already in progress. Fair, and bounded: what a shard holds
//! outside the queue is the partial lines of its connections plus a few reads.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
#[cfg(test)]
use std::future::poll_fn;
#[cfg(test)]
use std::task::Poll;
use std::task::Waker;

/// Shard-local; shared by the shard's connections (which enqueue) and its sink's receiver.
#[derive(Debug)]
pub(crate) struct ReadGate {
    capacity: usize,
    depth: Cell<usize>,
    /// Parked tasks in arrival order, each with its turn.
    waiters: RefCell<VecDeque<(u64, Waker)>>,
    /// The turn the next parked task gets.
    next_turn: Cell<u64>,
    /// Every turn below this has left the queue (woken).
    released_below: Cell<u64>,
    closed: Cell<bool>,
}

impl ReadGate {
    /// A gate for a queue of `capacity` records.
    pub(crate) fn new(capacity: usize) -> ReadGate {
        ReadGate {
            capacity: capacity.max(1),
            depth: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            next_turn: Cell::new(0),
            released_below: Cell::new(0),
            closed: Cell::new(false),
        }
    }

    /// A record went into the queue.
    pub(crate) fn enqueued(&self) {
        self.depth.set(self.depth.get() + 1);
    }

    /// A record left the queue: below half full, let one parked connection read.
    pub(crate) fn dequeued(&self) {
        let depth = self.depth.get().saturating_sub(1);
        self.depth.set(depth);
        if depth == 0 {
            // Nothing left to pace by: everyone may read.
            self.wake_all();
        } else if depth <= self.capacity / 2 {
            let next = self.waiters.borrow_mut().pop_front();
            if let Some((turn, w)) = next {
                self.released_below.set(turn + 1);
                w.wake();
            }
        }
    }

    /// Whether a connection should park before reading: the queue is at least half full.
    pub(crate) fn is_full(&self) -> bool {
        !self.closed.get() && self.depth.get() >= self.capacity.div_ceil(2)
    }

    /// Parks the task of `waker` until its turn comes and returns that turn. For use inside a
    /// read's poll: a connection checks the gate when its socket is ready, not only before it
    /// starts waiting for data. A task polled again while its turn is still queued (the
    /// socket's readiness woke it) should not park again: see [`ReadGate::is_queued`].
    pub(crate) fn park(&self, waker: &Waker) -> u64 {
        let turn = self.next_turn.get();
        self.next_turn.set(turn + 1);
        self.waiters.borrow_mut().push_back((turn, waker.clone()));
        turn
    }

    /// Whether `turn` has not come yet.
    pub(crate) fn is_queued(&self, turn: u64) -> bool {
        !self.closed.get() && turn >= self.released_below.get()
    }

    /// Parks until this task's turn (or until the gate closes).
    #[cfg(test)]
    async fn wait(&self) {
        let mut parked = false;
        poll_fn(|cx| {
            if parked || self.closed.get() {
                Poll::Ready(())
            } else {
                parked = true;
                self.park(cx.waker());
                Poll::Pending
            }
        })
        .await;
    }

    /// Lets everyone through for good: the shard is draining or its sink is gone.
    pub(crate) fn close(&self) {
        self.closed.set(true);
        self.wake_all();
    }

    fn wake_all(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        self.released_below.set(self.next_turn.get());
        for (_, w) in waiters {
            w.wake();
        }
    }

    #[cfg(test)]
    fn parked(&self) -> usize {
        self.waiters.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::rc::Rc;
    use std::task::Poll;

    #[test]
    fn parked_connections_go_one_at_a_time_below_half_full() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let gate = Rc::new(ReadGate::new(4));
                for _ in 0..4 {
                    gate.enqueued();
                }
                assert!(gate.is_full());
                let order = Rc::new(RefCell::new(Vec::new()));
                let tasks: Vec<_> = (0..3)
                    .map(|i| {
                        let (gate, order) = (Rc::clone(&gate), Rc::clone(&order));
                        glommio::spawn_local(async move {
                            gate.wait().await;
                            order.borrow_mut().push(i);
                        })
                    })
                    .collect();
                glommio::yield_if_needed().await;
                glommio::executor().yield_task_queue_now().await;
                assert_eq!(gate.parked(), 3);
                gate.dequeued(); // 3 left: above half, nobody goes
                assert!(gate.is_full());
                glommio::executor().yield_task_queue_now().await;
                assert!(order.borrow().is_empty());
                gate.dequeued(); // 2 left: half full; one goes
                glommio::executor().yield_task_queue_now().await;
                assert_eq!(*order.borrow(), [0]);
                gate.dequeued(); // 1 left: the next
                glommio::executor().yield_task_queue_now().await;
                assert_eq!(*order.borrow(), [0, 1]);
                gate.close();
                for t in tasks {
                    t.await;
                }
                assert_eq!(*order.borrow(), [0, 1, 2]);
                assert!(!gate.is_full(), "a closed gate never parks anyone");
                let w =
                    futures_lite::future::block_on(poll_fn(|cx| Poll::Ready(cx.waker().clone())));
                assert!(!gate.is_queued(gate.park(&w)), "closed: nobody is queued");
            });
    }
}
