//! Shard-local signals: a one-shot [`Signal`] and a [`Notify`] that wakes one waiter.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A one-shot event on one shard: once [`fire`](Signal::fire)d, every current and future
/// [`wait`](Signal::wait) completes. Not `Send`: it never leaves its shard.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
}

impl Signal {
    pub(crate) fn fire(&self) {
        self.fired.set(true);
        for w in self.waiters.borrow_mut().drain(..).flatten() {
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
            Some(i) => waiters[i] = Some(cx.waker().clone()),
            None => {
                waiters.push(Some(cx.waker().clone()));
                let i = waiters.len() - 1;
                drop(waiters);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot
            && let Some(w) = self.signal.waiters.borrow_mut().get_mut(i)
        {
            *w = None;
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
