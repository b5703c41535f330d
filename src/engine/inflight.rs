//! The LRU of in-flight (and recently completed) chunk fetches.
//!
//! An entry is a shared future: whoever finds it awaits the same registry request. Completed
//! entries stay until evicted, so a burst of reads of one chunk costs one request even when
//! the readers arrive one after another; failed entries are removed by their waiters.

use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use lru::LruCache;

use super::EngineError;

/// A fetch of one chunk that any number of readers can await.
pub type ChunkFuture = Shared<BoxFuture<'static, Result<Bytes, EngineError>>>;

/// (blob digest, chunk index).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    digest: String,
    index: u64,
}

impl ChunkKey {
    pub fn new(digest: &str, index: u64) -> ChunkKey {
        ChunkKey {
            digest: digest.to_string(),
            index,
        }
    }
}

/// The LRU, behind a mutex held only for lookups and inserts (never across an await).
pub struct Inflight {
    lru: Mutex<LruCache<ChunkKey, ChunkFuture>>,
}

impl Inflight {
    pub fn new(capacity: usize) -> Inflight {
        Inflight {
            lru: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, LruCache<ChunkKey, ChunkFuture>> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove `key` if it still holds `fut` (not a newer fetch started since).
    pub fn remove_if_same(&self, key: &ChunkKey, fut: &ChunkFuture) {
        let mut lru = self.lock();
        if lru.peek(key).is_some_and(|f| f.ptr_eq(fut)) {
            lru.pop(key);
        }
    }
}
