//! Back-pressure for kernel requests: at most a configured number are served at once. The
//! event loops stop reading the kernel's queue while every slot is taken, so further requests
//! wait there (their readers stay blocked; nothing is dropped), and the daemon's tasks, event
//! fds and buffers stay bounded however many readers arrive.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The slots of in-flight kernel requests.
#[derive(Debug, Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    /// Requests read from the kernel that wait for a slot, and a signal when none do.
    queue: Arc<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: AtomicUsize,
    drained: Notify,
}

/// A held slot; dropping it frees the slot.
pub type Slot = OwnedSemaphorePermit;

/// A request's claim on a slot.
#[derive(Debug)]
pub enum Ticket {
    /// A slot was free: the request runs now.
    Admitted(Slot),
    /// No slot was free when the request was read: wait for one.
    Queued(Admission),
}

impl Ticket {
    /// The slot, once there is one.
    pub async fn enter(self) -> Slot {
        match self {
            Ticket::Admitted(slot) => slot,
            Ticket::Queued(a) => {
                let slot = Arc::clone(&a.slots)
                    .acquire_owned()
                    .await
                    .expect("the admission semaphore is never closed");
                if a.queue.waiting.fetch_sub(1, SeqCst) == 1 {
                    a.queue.drained.notify_waiters();
                }
                slot
            }
        }
    }
}

impl Admission {
    /// `capacity` requests at once (at least one).
    pub fn new(capacity: usize) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(capacity.max(1))),
            queue: Arc::default(),
        }
    }

    /// Wait until no request read earlier waits for a slot and a slot is free (without
    /// taking it); returns the free slots.
    pub async fn room(&self) -> usize {
        loop {
            // registered before the check, so a wake-up in between is not lost
            let drained = self.queue.drained.notified();
            if self.queue.waiting.load(SeqCst) == 0 {
                break;
            }
            drained.await;
        }
        // The semaphore is never closed.
        if let Ok(p) = self.slots.acquire().await {
            drop(p);
        }
        self.slots.available_permits().max(1)
    }

    /// The free slots now, without waiting: 0 while a request read earlier waits for one.
    pub fn room_now(&self) -> usize {
        match self.queue.waiting.load(SeqCst) {
            0 => self.slots.available_permits(),
            _ => 0,
        }
    }

    /// Take a slot for one request read from the kernel, now (before the event loop asks
    /// for [`room`](Self::room) again). A batch may hold more requests than there were free
    /// slots: those get a [`Ticket::Queued`] and wait for theirs in [`Ticket::enter`].
    pub fn admit(&self) -> Ticket {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => Ticket::Admitted(slot),
            Err(_) => {
                self.queue.waiting.fetch_add(1, SeqCst);
                Ticket::Queued(self.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn room_waits_for_a_free_slot() {
        let a = Admission::new(2);
        let s1 = a.admit().enter().await;
        let s2 = a.admit().enter().await;
        assert_eq!(a.slots.available_permits(), 0, "both slots taken");
        let queued = a.admit();
        assert!(matches!(queued, Ticket::Queued(_)), "a third request got a slot");
        let waited = tokio::time::timeout(Duration::from_millis(50), a.room()).await;
        assert!(waited.is_err(), "room() returned while every slot was taken");
        drop(s1);
        // the queued request gets the freed slot before the event loop sees room
        let s3 = queued.enter().await;
        assert!(tokio::time::timeout(Duration::from_millis(50), a.room()).await.is_err());
        drop(s2);
        assert_eq!(a.room().await, 1);
        drop(s3);
        assert_eq!(a.room().await, 2);
        assert_eq!(a.slots.available_permits(), 2, "both slots free");
    }
}
