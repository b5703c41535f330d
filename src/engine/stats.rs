//! The engine's counters: totals for `status`, and bytes served and fetched per blob for
//! the per-image metrics.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use super::BlobKey;
use crate::lock::lock;

/// Counters exported in `status` and used by tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Chunks whose fetch this engine started.
    pub chunks_fetched: AtomicU64,
    /// Range requests (runs of merged chunks) started.
    pub runs: AtomicU64,
    /// Chunk lookups answered by an in-flight or recently completed fetch.
    pub shared_hits: AtomicU64,
    /// Verified bytes handed to frontends.
    pub bytes_served: AtomicU64,
    /// Reads that failed.
    pub failed_reads: AtomicU64,
    /// Reads served by their leaves, without the rest of their chunk.
    pub leaf_reads: AtomicU64,
    /// Bytes served and requested by blob.
    by_blob: Mutex<HashMap<BlobKey, BlobCounters>>,
}

/// What one blob's readers got and what was requested from registries for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobCounters {
    /// Verified bytes handed to frontends.
    pub served: u64,
    /// Bytes of the range requests started for it.
    pub fetched: u64,
}

impl EngineStats {
    /// `n` verified bytes of `blob` were handed to a frontend.
    pub(super) fn served(&self, blob: &BlobKey, n: u64) {
        self.bytes_served.fetch_add(n, Relaxed);
        self.add(blob, |c| c.served += n);
    }

    /// A range request of `n` bytes of `blob` was started.
    pub(super) fn fetched(&self, blob: &BlobKey, n: u64) {
        self.add(blob, |c| c.fetched += n);
    }

    /// Update `blob`'s counters; the key is cloned only the first time (this runs for every
    /// chunk served).
    fn add(&self, blob: &BlobKey, f: impl FnOnce(&mut BlobCounters)) {
        let mut by_blob = lock(&self.by_blob);
        match by_blob.get_mut(blob) {
            Some(c) => f(c),
            None => f(by_blob.entry(blob.clone()).or_default()),
        }
    }

    /// The counters of `blob` (zero if it was never read).
    pub fn of_blob(&self, blob: &BlobKey) -> BlobCounters {
        lock(&self.by_blob).get(blob).copied().unwrap_or_default()
    }
}
