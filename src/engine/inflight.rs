//! In-flight chunk fetches and a small LRU of recently completed chunks.
//!
//! A fetch in flight is a shared future in `running`: every reader of that chunk awaits the
//! same registry request. When its run delivers it (or fails), the run itself moves the entry
//! to `recent` whether or not anyone awaits it (a unit no one waits for any more is never
//! left behind). `recent`, an LRU bounded in entries (so in chunks of memory), covers readers
//! arriving just after completion, before the frontend has written the chunk into its cache;
//! a frontend that checks its own record of stored chunks before fetching (fanotify) takes
//! the entry out once it has (`Engine::stored`). A failed fetch is held in `failed` for a
//! short time (`engine.failed_fetch_hold_ms`): readers that were queued behind it (the kernel
//! makes readers of one page wait for each other, one request at a time) get its error at
//! once instead of one deadline each; after that the next read tries again. The
//! memory of fetched data is thus what is in flight plus the completed units not yet stored,
//! at most `recent`'s capacity.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use lru::LruCache;

use super::gate::{Delivered, RunGate};
use super::EngineError;

/// A fetch of one chunk that any number of readers can await.
pub type ChunkFuture = Shared<BoxFuture<'static, Result<Delivered, EngineError>>>;

/// (blob key, chunk index): the blob key covers the chunk digests the bytes were verified
/// against, so two images that claim one blob digest with different tables never share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    blob: super::BlobKey,
    index: u64,
}

impl ChunkKey {
    /// The blob the chunk belongs to.
    pub fn blob(&self) -> &super::BlobKey {
        &self.blob
    }

    pub fn new(blob: &super::BlobKey, index: u64) -> ChunkKey {
        ChunkKey {
            blob: blob.clone(),
            index,
        }
    }
}

/// A unit being fetched: its shared future and its run's gate (a reader that joins it
/// hurries the run, see `gate`).
pub struct Fetching {
    pub fut: ChunkFuture,
    pub run: Arc<RunGate>,
}

/// The two tables, behind one mutex held only for lookups and inserts (never across an await).
pub struct State {
    pub running: HashMap<ChunkKey, Fetching>,
    /// Completed units' bytes (never their share of the budget: see `settle`).
    pub recent: LruCache<ChunkKey, Bytes>,
    /// Fetches that failed lately: when, and why.
    failed: LruCache<ChunkKey, (Instant, EngineError)>,
    /// How long a failure is held (None: not at all).
    hold: Option<Duration>,
}

impl State {
    /// The error of a fetch of `key` that failed less than the hold time ago.
    pub fn recent_failure(&mut self, key: &ChunkKey) -> Option<EngineError> {
        let (at, err) = self.failed.get(key)?;
        if self.hold.is_some_and(|h| at.elapsed() < h) {
            return Some(err.clone());
        }
        self.failed.pop(key);
        None
    }

    /// Remember that a fetch of `key` failed with `err`, if failures are held.
    fn hold_failure(&mut self, key: &ChunkKey, err: &EngineError) {
        if self.hold.is_some() {
            self.failed.put(key.clone(), (Instant::now(), err.clone()));
        }
    }
}

/// How a run settled one of its units.
pub enum Outcome<'a> {
    /// Verified and handed out: these bytes.
    Delivered(&'a Bytes),
    /// Verified and written into its frontend's cache by the run (see `landing`).
    Landed,
    /// The fetch failed.
    Failed(&'a EngineError),
}

/// Failed fetches remembered at most (older ones are forgotten first).
const FAILED_CAPACITY: usize = 4096;

pub struct Inflight {
    state: Mutex<State>,
}

impl Inflight {
    /// `recent` holds at most `recent_capacity` completed chunks; a failure is held for `hold`.
    pub fn new(recent_capacity: usize, hold: Option<Duration>) -> Inflight {
        let cap = |n: usize| NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN);
        Inflight {
            state: Mutex::new(State {
                running: HashMap::new(),
                recent: LruCache::new(cap(recent_capacity)),
                failed: LruCache::new(cap(FAILED_CAPACITY)),
                hold,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock::lock(&self.state)
    }

    /// Fetches in flight.
    pub fn len(&self) -> usize {
        self.lock().running.len()
    }

    /// The run `run` has settled unit `key` (its waiters have the outcome): it leaves
    /// `running` at once, whether or not anyone awaits it, to `recent` (bytes only: the share
    /// of the budget a unit fetched ahead holds stays with those who will write it), to
    /// nowhere (landed: the frontend's cache has it) or to the failures held.
    pub fn settle(&self, key: &ChunkKey, run: &Arc<RunGate>, outcome: Outcome<'_>) {
        let mut st = self.lock();
        if !st.running.get(key).is_some_and(|f| Arc::ptr_eq(&f.run, run)) {
            return;
        }
        let fetch = st.running.remove(key);
        match outcome {
            // each unit is its own buffer (see `run`), so keeping it pins nothing else
            Outcome::Delivered(data) => {
                st.recent.put(key.clone(), data.clone());
            }
            Outcome::Landed => {}
            Outcome::Failed(e) => st.hold_failure(key, e),
        }
        // after the lock: the last handle on a unit no one awaits frees its bytes and share
        drop(st);
        drop(fetch);
    }

    /// A read of part of `key` (its leaves) failed with `err` at the registry: held like a
    /// failed fetch of the whole chunk, so the readers queued behind it fail at once too.
    pub fn hold_failure(&self, key: &ChunkKey, err: &EngineError) {
        self.lock().hold_failure(key, err);
    }
}
