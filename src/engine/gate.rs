//! Back-pressure on fetches made ahead of readers (read-ahead, background fill, startup
//! prefetch): their units may wait to be written, and those that wait hold memory. A run
//! fetched for such a caller takes a share of one engine-wide budget of bytes for each unit
//! before it reads more of its body, and the unit carries that share until its consumer has
//! written it (or every holder has dropped it). With the budget spent, the stream pauses:
//! the registry's connection simply stops being read. A reader that needs a unit of a paused
//! run makes the run urgent up to that unit, which it then streams without waiting; runs
//! started for readers never wait. A unit waits at most [`PAUSE_MAX`] for its share and then
//! streams without one, so a unit held by someone waiting for a paused run (a caller that
//! holds later units while it awaits an earlier one) can slow a run down but never wedge it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::Body;
use crate::lock::lock;
pub use crate::registry::slots::Need;

/// Longest a stream waits for room before it goes on regardless.
pub const PAUSE_MAX: Duration = Duration::from_secs(1);

/// The engine-wide budget of bytes fetched ahead and not let go yet.
pub struct Budget {
    room: Arc<Semaphore>,
    /// Its size: a unit larger takes all of it.
    max: u32,
    /// Streams that had to wait for room.
    pub pauses: AtomicU64,
    /// Waits that ended after [`PAUSE_MAX`] without room (units held and not written).
    pub expired: AtomicU64,
}

impl Budget {
    /// A budget of `bytes` (at most `u32::MAX`).
    pub fn new(bytes: u64) -> Arc<Budget> {
        let max = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        Arc::new(Budget {
            room: Arc::new(Semaphore::new(max as usize)),
            max,
            pauses: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        })
    }

    /// Bytes of the budget not taken now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.room.available_permits()
    }
}

/// One run's side of the budget, shared by its sink and by the readers that join it.
pub struct RunGate {
    /// Who started the run.
    need: Need,
    /// The run's units before this index are wanted by a reader: stream them without waiting.
    urgent_until: AtomicU64,
    wake: Notify,
    /// Blob offset up to which the run has written its bytes into its landing, if it has one
    /// (`landing`, `pieces`): a reader of a range below it finds its bytes in the cache.
    placed: watch::Sender<u64>,
}

impl RunGate {
    /// A run for `need`: one for a reader is urgent throughout.
    pub fn new(need: Need) -> Arc<RunGate> {
        let until = match need {
            Need::Reader => u64::MAX,
            Need::Ahead => 0,
        };
        Arc::new(RunGate {
            need,
            urgent_until: AtomicU64::new(until),
            wake: Notify::new(),
            placed: watch::Sender::new(0),
        })
    }

    /// The run has written every byte before blob offset `to` into its landing.
    pub fn placed(&self, to: u64) {
        self.placed.send_if_modified(|p| {
            let more = to > *p;
            *p = (*p).max(to);
            more
        });
    }

    /// Wait until the run has written every byte before `to` into its landing (forever if
    /// it never does: wait for its units too).
    pub async fn placed_to(&self, to: u64) {
        let _ = self.placed.subscribe().wait_for(|&p| p >= to).await;
    }

    /// A reader waits for unit `index` of the run: no pause until it is delivered.
    pub fn hurry(&self, index: u64) {
        if self.urgent_until.fetch_max(index + 1, Relaxed) <= index {
            self.wake.notify_one();
        }
    }

    fn urgent(&self, index: u64) -> bool {
        index < self.urgent_until.load(Relaxed)
    }
}

/// What a run's sink holds of the budget: the share of the unit it assembles, once taken.
pub struct Share {
    /// None: no budget, never a pause.
    budget: Option<Arc<Budget>>,
    run: Arc<RunGate>,
    taken: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// One past the index of the last unit that waited [`PAUSE_MAX`] and went on without a
    /// share (0: none).
    waived: Arc<AtomicU64>,
}

impl Share {
    /// A run's share of `budget`.
    pub fn new(budget: Option<&Arc<Budget>>, run: &Arc<RunGate>) -> Share {
        Share {
            budget: budget.cloned(),
            run: Arc::clone(run),
            taken: Arc::new(Mutex::new(None)),
            waived: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Before the body of unit `index` (`len` bytes) is read on: `None` when it may go on at
    /// once (its share taken, or it is urgent), else a wait that ends once the share is taken,
    /// a reader hurries the run, or [`PAUSE_MAX`] has passed.
    pub fn room(&self, index: u64, len: usize) -> Option<BoxFuture<'static, ()>> {
        let budget = self.budget.as_ref()?;
        let waived = self.waived.load(Relaxed) == index + 1;
        if waived || self.run.urgent(index) || lock(&self.taken).is_some() {
            return None;
        }
        let n = u32::try_from(len).unwrap_or(u32::MAX).min(budget.max);
        match Arc::clone(&budget.room).try_acquire_many_owned(n) {
            Ok(p) => {
                *lock(&self.taken) = Some(p);
                None
            }
            Err(_) => {
                budget.pauses.fetch_add(1, Relaxed);
                let (room, run, taken) = (Arc::clone(&budget.room), Arc::clone(&self.run), Arc::clone(&self.taken));
                let (waived, budget) = (Arc::clone(&self.waived), Arc::clone(budget));
                Some(Box::pin(async move {
                    let hurried = run.wake.notified();
                    tokio::select! {
                        p = room.acquire_many_owned(n) => {
                            if let Ok(p) = p {
                                *lock(&taken) = Some(p);
                            }
                        }
                        () = hurried => {}
                        () = tokio::time::sleep(PAUSE_MAX) => {
                            waived.store(index + 1, Relaxed);
                            budget.expired.fetch_add(1, Relaxed);
                            tracing::debug!(bytes = n, "fetch ahead went on without room: units wait to be let go");
                        }
                    }
                }))
            }
        }
    }

    /// The run's gate.
    pub fn run(&self) -> &Arc<RunGate> {
        &self.run
    }

    /// Who the run was started for.
    pub fn need(&self) -> Need {
        self.run.need
    }

    /// A complete unit already written by its run: the share taken for it is free again.
    pub fn landed(&self, body: Body) -> Delivered {
        lock(&self.taken).take();
        Delivered { body, lease: None }
    }

    /// A complete unit, with the share taken for it (if any).
    pub fn attach(&self, data: Bytes) -> Delivered {
        let lease = lock(&self.taken).take().map(|p| Arc::new(Lease(Mutex::new(Some(p)))));
        Delivered {
            body: Body::Bytes(data),
            lease,
        }
    }
}

/// A unit as its run delivers it: the bytes and the share of the budget they hold.
#[derive(Clone)]
pub struct Delivered {
    /// The unit's verified bytes.
    pub body: Body,
    /// Its share of the budget (a unit fetched ahead, while the budget had room).
    pub lease: Option<Arc<Lease>>,
}

/// A unit's share of the budget: given back once the unit is written ([`Lease::let_go`]),
/// or when its last holder drops it.
#[derive(Debug)]
pub struct Lease(Mutex<Option<OwnedSemaphorePermit>>);

impl Lease {
    /// The unit is written: its share is free for the next unit fetched ahead, even while
    /// the unit itself is kept (the engine's recently completed units).
    pub fn let_go(&self) {
        lock(&self.0).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ahead_units_hold_the_budget_until_let_go_and_a_reader_unpauses() {
        let budget = Budget::new(2048);
        let run = RunGate::new(Need::Ahead);
        let share = Share::new(Some(&budget), &run);
        assert!(share.room(0, 1024).is_none(), "room for the first unit");
        let a = share.attach(Bytes::from(vec![1u8; 1024]));
        let kept = a.clone();
        assert!(share.room(1, 1024).is_none());
        let b = share.attach(Bytes::from(vec![2u8; 1024]));
        assert_eq!(budget.available(), 0);
        let wait = share.room(2, 1024).expect("the budget is spent: a pause");
        let t = tokio::spawn(wait);
        tokio::task::yield_now().await;
        assert!(!t.is_finished(), "paused while both units are held");
        drop(a);
        tokio::task::yield_now().await;
        assert!(!t.is_finished(), "a clone still holds the unit");
        kept.lease.as_ref().unwrap().let_go();
        t.await.unwrap();
        assert_eq!(kept.body.len(), 1024, "let go, still kept");
        assert_eq!(budget.available(), 0, "the third unit took the freed share");
        let _c = share.attach(Bytes::from(vec![3u8; 1024]));
        // a reader joins unit 4 of the paused run: it goes on at once
        let wait = share.room(3, 1024).expect("paused again");
        let t = tokio::spawn(wait);
        tokio::task::yield_now().await;
        run.hurry(4);
        t.await.unwrap();
        assert!(share.room(4, 1024).is_none(), "unit 4 is urgent");
        assert_eq!(budget.pauses.load(Relaxed), 2);
        drop(b);
        assert_eq!(budget.available(), 1024, "a dropped unit returns its share");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_after_pause_max_and_reader_runs_never_pause() {
        let budget = Budget::new(1024);
        let share = Share::new(Some(&budget), &RunGate::new(Need::Ahead));
        assert!(
            share.room(0, 4096).is_none(),
            "a unit larger than the budget takes all of it"
        );
        let _held = share.attach(Bytes::from(vec![0u8; 4096]));
        let t = tokio::time::Instant::now();
        share.room(1, 1024).expect("no room").await;
        assert!(t.elapsed() >= PAUSE_MAX, "went on after the longest pause");
        assert!(
            share.room(1, 1024).is_none(),
            "and the rest of that unit streams without a share"
        );
        assert!(share.room(2, 1024).is_some(), "the next unit waits again");
        assert_eq!(budget.expired.load(Relaxed), 1);
        let reader = Share::new(Some(&budget), &RunGate::new(Need::Reader));
        assert!(reader.room(0, 1024).is_none() && reader.room(9, 1024).is_none());
        assert!(
            reader.attach(Bytes::new()).lease.is_none(),
            "a reader's unit holds no share"
        );
    }
}
