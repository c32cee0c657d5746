//! Shard-local signals: a one-shot [`Signal`] and a [`Notify`] that wakes one waiter.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// A one-shot event on one shard: once [`fire`](Signal::fire)d, every current and future
/// [`wait`](Signal::wait) completes. Not `Send`: it never leaves its shard.
///
/// Bound: a slot per pending [`Wait`] that has been polled, freed when the `Wait` is dropped
/// and reused by the next, so the slab is as large as the most waits ever pending at once
/// (a throttled connection makes one per read, for as long as it lives).
#[derive(Debug, Default)]
pub(crate) struct Signal {
    fired: Cell<bool>,
    waiters: RefCell<Slab<Waker>>,
}

impl Signal {
    pub(crate) fn fire(&self) {
        self.fired.set(true);
        // Taken out first: a woken task may drop its `Wait`, which borrows the slab.
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, w) in waiters {
            w.wake();
        }
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Completes once the signal has fired. Polling the same `Wait` again reuses its slot, so
    /// a long-lived waiter raced against other futures does not grow the waiter list.
    pub(crate) fn wait(&self) -> Wait<'_> {
        Wait {
            signal: self,
            slot: None,
        }
    }
}

pub(crate) struct Wait<'a> {
    signal: &'a Signal,
    slot: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.is_fired() {
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        match self.slot {
            Some(i) => waiters[i].clone_from(cx.waker()),
            None => {
                let i = waiters.insert(cx.waker().clone());
                drop(waiters);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // After `fire` the slab is empty and the slot already gone.
        if let Some(i) = self.slot
            && !self.signal.is_fired()
        {
            let removed = self.signal.waiters.borrow_mut().try_remove(i);
            debug_assert!(removed.is_some(), "a pending wait owns its slot");
        }
    }
}

/// Wakes one waiting task, and remembers a notification nobody waited for (the next wait
/// completes at once). Shard-local, for one waiter: a second waiter replaces the first.
/// Sinks use it too (the Kafka sink's poller waits on one).
#[derive(Default)]
pub struct Notify {
    notified: Cell<bool>,
    waiter: Cell<Option<Waker>>,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("notified", &self.notified.get())
            .finish_non_exhaustive()
    }
}

impl Notify {
    /// Wakes the waiting task, or lets the next wait complete at once.
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }

    /// Completes after a [`Notify::notify`] made since the last wait completed.
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| {
            if self.notified.replace(false) {
                Poll::Ready(())
            } else {
                self.waiter.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn poll(wait: Pin<&mut Wait<'_>>, waker: &Waker) -> Poll<()> {
        wait.poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_dropped_wait_gives_its_slot_back() {
        // A throttled connection makes one wait per read, for as long as it lives.
        let signal = Signal::default();
        for _ in 0..10_000 {
            let mut wait = pin!(signal.wait());
            assert!(poll(wait.as_mut(), Waker::noop()).is_pending());
        }
        let slots = signal.waiters.borrow().capacity();
        assert!(
            slots <= 4,
            "10,000 waits, one at a time, left {slots} slots"
        );
    }

    #[test]
    fn slots_are_bounded_by_the_waits_alive_at_once() {
        let signal = Signal::default();
        let mut kept = Vec::new();
        for round in 0..1_000 {
            let mut waits: Vec<_> = (0..8).map(|_| Box::pin(signal.wait())).collect();
            for w in &mut waits {
                assert!(poll(w.as_mut(), Waker::noop()).is_pending());
            }
            if round % 100 == 0 {
                kept.push(waits.pop().expect("eight waits"));
            }
        }
        let slots = signal.waiters.borrow().capacity();
        assert!(slots <= 32, "at most 18 waits alive at once, {slots} slots");
    }

    #[test]
    fn fire_wakes_every_live_wait_once_and_completes_later_ones() {
        let signal = Signal::default();
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut first = pin!(signal.wait());
        let mut second = pin!(signal.wait());
        let mut dropped = Box::pin(signal.wait());
        assert!(poll(first.as_mut(), &waker).is_pending());
        // Polled again: the same slot, not a second wake.
        assert!(poll(first.as_mut(), &waker).is_pending());
        assert!(poll(second.as_mut(), &waker).is_pending());
        assert!(poll(dropped.as_mut(), &waker).is_pending());
        drop(dropped);

        signal.fire();
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        assert!(poll(first.as_mut(), &waker).is_ready());
        assert!(poll(second.as_mut(), &waker).is_ready());
        assert!(poll(pin!(signal.wait()), Waker::noop()).is_ready());
        assert_eq!(signal.waiters.borrow().len(), 0);
    }
}
