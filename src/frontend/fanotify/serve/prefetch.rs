//! Read-ahead fetches: the windows the `readahead` state machine opens are fetched in
//! merged runs, each unit written with the blob's own writer by its run (or by a task of its
//! own if the run could not).

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::blob::CachedBlob;
use super::store::CacheLanding;
use super::FanotifyFrontend;
use crate::engine::landing::Landing;
use crate::engine::Need;
use crate::frontend::readahead::ReadAhead;
use crate::lock::lock;

impl FanotifyFrontend {
    /// Sequential readers: the window after a reader's miss of chunks `first..=last`.
    pub(super) fn read_ahead(self: &Arc<Self>, cached: &Arc<CachedBlob>, first: u64, last: u64) {
        self.steer(cached, first, |state| state.on_miss(first, last));
    }

    /// A reader inside the prefetched window (the fast path calls this): the next window
    /// once it has passed the middle.
    pub(super) fn advance_read_ahead(self: &Arc<Self>, cached: &Arc<CachedBlob>, last_chunk: u64) {
        self.steer(cached, last_chunk, |state| state.on_hit(last_chunk));
    }

    /// A reader at chunk `at` moved `cached`'s read-ahead state (`step`): fetch the window it
    /// opens, and let go of the cache file's pages far behind it if it reads sequentially.
    fn steer(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        at: u64,
        step: impl FnOnce(&mut ReadAhead) -> Option<Range<u64>>,
    ) {
        let (ahead, run) = {
            let mut state = lock(&cached.ahead);
            (step(&mut state), state.sequential_since())
        };
        if let Some(since) = run {
            self.drop_behind(cached, since..at);
        }
        if let Some(r) = ahead {
            self.prefetch(cached, r.start, r.end);
        }
    }

    /// Fetch chunks `[from, to)` that are not cached yet and write them with our own handle;
    /// one task per merged range, so each is written as soon as it arrives. A chunk some of
    /// whose leaves a random reader wrote gets the rest of its leaves, on a task of its own.
    pub(super) fn prefetch(self: &Arc<Self>, cached: &Arc<CachedBlob>, from: u64, to: u64) {
        let Some(via) = lock(&cached.writer).clone() else {
            return;
        };
        let partial = |c: u64| cached.leaves.any_written(c);
        // (a chunk completed by its leaves stays in the book: verified, it needs no task)
        let to_complete: Vec<u64> = {
            let v = lock(&cached.verified);
            (from..to.min(cached.n_chunks()))
                .filter(|&c| !v.contains(&c) && partial(c))
                .collect()
        };
        let todo = cached.unverified_runs(from..to, partial);
        if !to_complete.is_empty() || !todo.is_empty() {
            // a reader's read-ahead fetches: the fills of every blob wait
            self.engine.reader_fetching();
        }
        for c in to_complete {
            let (me, cached, via) = (Arc::clone(self), Arc::clone(cached), Arc::clone(&via));
            tokio::spawn(async move {
                match me.complete_by_leaves(&cached, c..c + 1, &via).await {
                    Ok(n) => me.stats.chunks_prefetched.fetch_add(n, Relaxed),
                    Err(e) => {
                        return tracing::debug!(error = %e, chunk = c, "read-ahead of the rest of a chunk's leaves failed")
                    }
                };
                me.unmark_if_complete(&cached);
            });
        }
        // the runs write their units themselves; a unit's task then finds it written
        let landing: Arc<dyn Landing> = CacheLanding::new(self, cached, &via, |s| &s.chunks_prefetched);
        for run in todo {
            let pending = match self.engine.fetch_to(
                &cached.blob,
                run.start,
                run.end - run.start,
                Need::Ahead,
                Some(&landing),
            ) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "read-ahead not started");
                    return;
                }
            };
            // one task per unit: each is written the moment it is verified
            for p in pending {
                let (engine, offset) = (Arc::clone(&self.engine), p.offset);
                let piece = async move { p.wait(&engine).await.map_err(io::Error::other) };
                self.store_later(cached, &via, offset, piece, |s| &s.chunks_prefetched);
            }
        }
    }
}
