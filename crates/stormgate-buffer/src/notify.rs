//! Waking shard-local tasks: a list of wakers, woken all at once. No lock, not `Send`.

use std::cell::RefCell;
use std::task::Waker;

/// Tasks waiting for one kind of progress (durability, room, records to read).
#[derive(Debug, Default)]
pub(crate) struct Waiters(RefCell<Vec<Waker>>);

impl Waiters {
    /// Remembers `waker` until the next [`Waiters::wake_all`] (once, however often a task
    /// polls).
    pub(crate) fn register(&self, waker: &Waker) {
        let mut list = self.0.borrow_mut();
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }

    /// Wakes every registered task.
    pub(crate) fn wake_all(&self) {
        let list = std::mem::take(&mut *self.0.borrow_mut());
        for w in list {
            w.wake();
        }
    }

    /// Whether any task waits: lets the append path skip the wake-up call.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}
