//! Letting go of a cache file's page cache behind a sequential reader. The kernel copies
//! what a reader reads from the cache file's pages into the mount's own, so a cold read
//! would leave every byte cached twice; pages far enough behind a sequential reader (which
//! the kernel has read and will not ask for again) are advised out of the cache file's
//! cache. `POSIX_FADV_DONTNEED` starts the writeback of the dirty ones and drops the clean
//! ones, so each call also covers a stretch before the last one: the pages that were still
//! being written then. The bytes stay on disk, verified; a later read of them after the
//! mount's pages are gone reads the disk, as a read of any file would.

use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::{CachedBlob, FanotifyFrontend};
use crate::lock::lock;

/// How far before the last advised stretch each call reaches again.
const AGAIN: u64 = 64 << 20;

/// What to advise out when a sequential reader whose run began at byte `since` has reached
/// byte `at`, pages more than `distance` behind it going, given that the pages of this run
/// before `done` were advised already (a `done` outside the run is an earlier run's): the
/// range, and how many of its bytes were not advised before.
fn behind(since: u64, at: u64, distance: u64, done: u64) -> Option<(Range<u64>, u64)> {
    let done = if (since..=at).contains(&done) { done } else { since };
    let upto = at.checked_sub(distance)?;
    (upto > done).then(|| (done.saturating_sub(AGAIN).max(since)..upto, upto - done))
}

impl FanotifyFrontend {
    /// A sequential reader of `cached` whose run began at table chunk `run.start` reached
    /// chunk `run.end`: let go of the cache file's pages of that run further behind it than
    /// `engine.drop_behind`, on the blocking pool.
    pub(super) fn drop_behind(&self, cached: &Arc<CachedBlob>, run: Range<u64>) {
        let Some(distance) = self.drop_behind else {
            return;
        };
        let tc = cached.blob.table_chunk;
        let (since, at) = (run.start.saturating_mul(tc), run.end.saturating_mul(tc));
        let done = cached.dropped_to.load(Relaxed);
        let Some((range, fresh)) = behind(since, at, distance.get(), done) else {
            return;
        };
        // the blob's writer: without one nothing was written, and nothing is advanced
        let Some(via) = lock(&cached.writer).clone() else {
            return;
        };
        // one caller advises a stretch: a concurrent one with the same view does nothing
        if cached
            .dropped_to
            .compare_exchange(done, range.end, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        self.stats.drop_behind_bytes.fetch_add(fresh, Relaxed);
        tokio::task::spawn_blocking(move || {
            let (off, len) = (range.start as i64, (range.end - range.start) as i64);
            if let Err(e) =
                nix::fcntl::posix_fadvise(&*via, off, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
            {
                tracing::debug!(error = %e, "letting go of pages behind a reader failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_of_the_run_far_enough_behind_go_and_each_stretch_reaches_back() {
        const MIB: u64 = 1 << 20;
        assert_eq!(behind(0, 10 * MIB, 16 * MIB, 0), None, "not that far yet");
        assert_eq!(behind(0, 20 * MIB, 16 * MIB, 0), Some((0..4 * MIB, 4 * MIB)));
        assert_eq!(behind(0, 20 * MIB, 16 * MIB, 4 * MIB), None, "advised already");
        assert_eq!(
            behind(0, 100 * MIB, 16 * MIB, 70 * MIB),
            Some((6 * MIB..84 * MIB, 14 * MIB))
        );
        // a new run, before the last one: from its own start, never before it
        assert_eq!(
            behind(50 * MIB, 90 * MIB, 16 * MIB, 500 * MIB),
            Some((50 * MIB..74 * MIB, 24 * MIB))
        );
        assert_eq!(
            behind(50 * MIB, 200 * MIB, 16 * MIB, 120 * MIB),
            Some((56 * MIB..184 * MIB, 64 * MIB))
        );
    }
}
