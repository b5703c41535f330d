//! A bounded stack of idle things for reuse: large buffers handed back instead of freed, so a
//! steady stream of them costs no fresh mapping and no page faults per buffer (the engine's
//! unit buffers, the cachefiles frontend's aligned write buffers). Items idle for longer than
//! [`IDLE_TTL`] are freed by a background task, so a daemon at rest gives that memory back
//! (and then the heaps' free memory: `malloc::release_free`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock: the std one's, but pausable in tests
use tokio::time::Instant;

use crate::lock::lock;

/// How long an idle item is kept: a sequential reader hands its buffers back and takes them
/// again within microseconds; after this long without a taker they only hold memory.
pub const IDLE_TTL: Duration = Duration::from_secs(2);

/// Idle items, at most `keep` of them, the most recently handed back last.
pub struct Recycler<T> {
    free: Mutex<Vec<Idle<T>>>,
    keep: usize,
}

/// An item handed back, and when.
struct Idle<T> {
    item: T,
    since: Instant,
}

impl<T: Send + 'static> Recycler<T> {
    /// A recycler keeping at most `keep` idle items, each freed once idle for [`IDLE_TTL`]
    /// (by a task of the current tokio runtime; outside one, nothing is trimmed).
    pub fn new(keep: usize) -> Arc<Recycler<T>> {
        let r = Arc::new(Recycler {
            free: Mutex::new(Vec::new()),
            keep,
        });
        r.trim_in_background();
        r
    }

    /// Free items idle for [`IDLE_TTL`] from a task of the current tokio runtime, for as long
    /// as the recycler lives.
    fn trim_in_background(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(IDLE_TTL / 2).await;
                match weak.upgrade() {
                    // idle long enough to free buffers: the heaps' free memory goes too
                    Some(r) if r.trim(IDLE_TTL, Instant::now()) > 0 => crate::malloc::release_free(),
                    Some(_) => {}
                    None => break,
                };
            }
        });
    }
}

impl<T> Recycler<T> {
    /// An idle item that `fits`, taken out, if there is one; the most recently handed back
    /// first, so the others age and are freed when the demand drops.
    pub fn reuse(&self, fits: impl Fn(&T) -> bool) -> Option<T> {
        let mut free = lock(&self.free);
        free.iter().rposition(|i| fits(&i.item)).map(|i| free.remove(i).item)
    }

    /// Keep `item` for reuse, unless `keep` items are idle already (then it is dropped).
    pub fn give_back(&self, item: T) {
        let mut free = lock(&self.free);
        if free.len() < self.keep {
            free.push(Idle {
                item,
                since: Instant::now(),
            });
        }
    }

    /// Idle items held.
    pub fn idle(&self) -> usize {
        lock(&self.free).len()
    }

    /// Free the items idle for at least `ttl` as of `now`; returns how many went.
    pub fn trim(&self, ttl: Duration, now: Instant) -> usize {
        let aged: Vec<Idle<T>> = {
            let mut free = lock(&self.free);
            let (aged, kept) = std::mem::take(&mut *free)
                .into_iter()
                .partition(|i| now.saturating_duration_since(i.since) >= ttl);
            *free = kept;
            aged
        };
        aged.len() // dropped here, outside the lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_fitting_are_reused_and_the_idle_are_bounded() {
        let r = Recycler::new(2);
        for n in [10, 20, 30] {
            r.give_back(n);
        }
        assert_eq!(r.idle(), 2, "the third was dropped");
        assert_eq!(r.reuse(|&n| n > 15), Some(20));
        assert_eq!(r.reuse(|&n| n > 15), None);
        assert_eq!(r.reuse(|_| true), Some(10));
        assert_eq!(r.idle(), 0);
    }

    #[test]
    fn the_latest_is_reused_and_the_aged_are_freed() {
        let r = Recycler::new(4);
        r.give_back(1);
        r.give_back(2);
        assert_eq!(r.reuse(|_| true), Some(2), "the most recent first");
        r.give_back(3);
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(r.trim(Duration::from_secs(10), later), 0, "none idle that long");
        assert_eq!(r.trim(Duration::from_secs(5), later), 2);
        assert_eq!(r.idle(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_runtime_a_task_frees_the_idle_and_ends_with_the_recycler() {
        let r = Recycler::new(4);
        r.give_back(vec![0u8; 16]);
        tokio::time::sleep(IDLE_TTL / 4).await;
        assert_eq!(r.idle(), 1, "not idle long enough yet");
        tokio::time::sleep(IDLE_TTL * 2).await;
        assert_eq!(r.idle(), 0, "freed once idle for IDLE_TTL");
        let weak = Arc::downgrade(&r);
        drop(r);
        tokio::time::sleep(IDLE_TTL).await;
        assert!(weak.upgrade().is_none(), "the task holds no strong reference");
    }
}
