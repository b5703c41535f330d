//! Per-host limits on concurrent requests: `max_concurrent_fetches` slots per registry host,
//! a quarter of them kept for readers. Fetches made ahead of readers (read-ahead, background
//! fill, startup prefetch) may pause while their units wait to be written (`engine::gate`)
//! and hold their slot meanwhile; they never hold every slot, so a reader's miss does not
//! wait behind them for a connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::lock::lock;

/// Who a fetch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A reader waits for it: never paused, and it unpauses what it joins.
    Reader,
    /// Fetched ahead of readers: held to the engine's budget, and to the slots not kept for
    /// readers.
    Ahead,
}

/// One host's slots: every request takes one of `any`; one made ahead of readers takes one
/// of `ahead` first, of which there are fewer.
struct HostSlots {
    any: Arc<Semaphore>,
    ahead: Arc<Semaphore>,
}

/// A request's hold on its host's slots, given back when dropped.
pub struct Slot {
    _ahead: Option<OwnedSemaphorePermit>,
    _any: OwnedSemaphorePermit,
}

/// The slots of every host spoken to.
pub struct Slots {
    per_host: Mutex<HashMap<String, Arc<HostSlots>>>,
    max: usize,
}

impl Slots {
    /// `max` concurrent requests per host (at least 1), `max / 4` of them kept for readers.
    pub fn new(max: usize) -> Slots {
        Slots {
            per_host: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// Wait for a slot on `host` for a fetch for `need`.
    pub async fn acquire(&self, host: &str, need: Need) -> Slot {
        let slots = {
            let mut m = lock(&self.per_host);
            let max = self.max;
            Arc::clone(m.entry(host.to_string()).or_insert_with(|| {
                Arc::new(HostSlots {
                    any: Arc::new(Semaphore::new(max)),
                    ahead: Arc::new(Semaphore::new(max - max / 4)),
                })
            }))
        };
        // the semaphores are never closed, so acquiring cannot fail
        let ahead = match need {
            Need::Reader => None,
            Need::Ahead => Some(Arc::clone(&slots.ahead).acquire_owned().await.expect("never closed")),
        };
        let any = Arc::clone(&slots.any).acquire_owned().await.expect("never closed");
        Slot {
            _ahead: ahead,
            _any: any,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn fetches_ahead_leave_a_quarter_of_the_slots_to_readers() {
        let slots = Slots::new(4);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(slots.acquire("h", Need::Ahead).await);
        }
        assert!(
            slots.acquire("h", Need::Ahead).now_or_never().is_none(),
            "3 of 4 ahead at most"
        );
        let reader = slots.acquire("h", Need::Reader).now_or_never();
        assert!(reader.is_some(), "the kept slot is a reader's");
        assert!(slots.acquire("h", Need::Reader).now_or_never().is_none(), "all 4 taken");
        assert!(slots.acquire("other", Need::Ahead).now_or_never().is_some(), "per host");
        drop(reader);
        assert!(
            slots.acquire("h", Need::Ahead).now_or_never().is_none(),
            "a free slot, but a reader's"
        );
        assert!(slots.acquire("h", Need::Reader).now_or_never().is_some());
        held.pop();
        assert!(slots.acquire("h", Need::Ahead).now_or_never().is_some());
    }
}
