//! A bounded stack of idle things for reuse: large buffers handed back instead of freed, so a
//! steady stream of them costs no fresh mapping and no page faults per buffer (the engine's
//! unit buffers, the cachefiles frontend's aligned write buffers).

use std::sync::{Arc, Mutex};

use crate::lock::lock;

/// Idle items, at most `keep` of them.
pub struct Recycler<T> {
    free: Mutex<Vec<T>>,
    keep: usize,
}

impl<T> Recycler<T> {
    /// A recycler keeping at most `keep` idle items.
    pub fn new(keep: usize) -> Arc<Recycler<T>> {
        Arc::new(Recycler {
            free: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// An idle item that `fits`, taken out, if there is one.
    pub fn reuse(&self, fits: impl Fn(&T) -> bool) -> Option<T> {
        let mut free = lock(&self.free);
        free.iter().position(fits).map(|i| free.swap_remove(i))
    }

    /// Keep `item` for reuse, unless `keep` items are idle already (then it is dropped).
    pub fn give_back(&self, item: T) {
        let mut free = lock(&self.free);
        if free.len() < self.keep {
            free.push(item);
        }
    }

    /// Idle items held.
    pub fn idle(&self) -> usize {
        lock(&self.free).len()
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
}
