//! Work ahead of readers: read-ahead windows for sequential readers and the background fill
//! that completes a blob in use once its readers are quiet (then its events stop).

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tracing::Instrument;

use super::{CachedBlob, FanotifyFrontend};
use crate::engine::chunks::consecutive;
use crate::lock::lock;

/// Read-ahead state: the last chunk a reader missed, the window (0: not sequential), and the
/// chunk the scheduled read-ahead reaches (exclusive).
#[derive(Debug, Default)]
pub(super) struct Ahead {
    last_miss: Option<u64>,
    window: u64,
    until: u64,
}

impl FanotifyFrontend {
    /// Once a blob in use has been quiet for `fill_after`, fetch what it still misses, one
    /// merged run at a time, pausing whenever a reader misses; when it is complete its
    /// events stop, so reads of it cost what a local file costs.
    pub(super) fn start_background_fill(self: &Arc<Self>, cached: &Arc<CachedBlob>) {
        let Some(quiet) = self.fill_after else {
            return;
        };
        if cached.complete.load(Relaxed) || cached.filling.swap(true, Relaxed) {
            return;
        }
        let (me, cached) = (Arc::clone(self), Arc::clone(cached));
        let span = tracing::info_span!("background_fill", blob = %cached.blob.source.digest);
        tokio::spawn(
            async move {
                let unit = cached.blob.table_chunk;
                let per_run = (me.engine.merge_max() / unit).max(1);
                let n_chunks = cached.n_chunks();
                let (mut failures, mut cursor) = (0u32, 0u64);
                loop {
                    let idle = lock(&cached.last_miss).elapsed();
                    if idle < quiet {
                        tokio::time::sleep(quiet - idle).await;
                        continue;
                    }
                    let Ok(slot) = me.fill_slot.acquire().await else {
                        break;
                    };
                    let Some(via) = lock(&cached.writer).clone() else {
                        break;
                    };
                    // the next run of chunks neither verified nor on disk from an earlier run
                    let mut run: Option<std::ops::Range<u64>> = None;
                    while cursor < n_chunks && run.as_ref().is_none_or(|r| r.end - r.start < per_run) {
                        match me.present(&cached, &via, cursor) {
                            Ok(true) if run.is_none() => {}
                            Ok(true) => break,
                            Ok(false) => run.get_or_insert(cursor..cursor).end = cursor + 1,
                            Err(e) => {
                                tracing::warn!(error = %e, "background fill: cache file unreadable");
                                break;
                            }
                        }
                        cursor += 1;
                    }
                    let Some(run) = run else {
                        break;
                    };
                    let (s, e) = (run.start * unit, (run.end * unit).min(cached.blob.source.size));
                    let fetched = me.fetch_and_store(&cached, s, e, via, None).await;
                    drop(slot); // not held while backing off: other blobs may fill meanwhile
                    match fetched {
                        Ok(n) => {
                            failures = 0;
                            me.stats.chunks_background.fetch_add(n, Relaxed);
                        }
                        Err(err) => {
                            failures += 1;
                            cursor = run.start;
                            tracing::warn!(error = %err, failures, "background fill failed; readers still fetch on demand");
                            if failures >= 5 {
                                break;
                            }
                            tokio::time::sleep(quiet * failures).await;
                        }
                    }
                }
                me.unmark_if_complete(&cached);
                cached.filling.store(false, Relaxed);
            }
            .instrument(span),
        );
    }

    /// Sequential readers: after a miss right behind the previous one, fetch the next chunks
    /// in the background with a window that doubles up to the maximum.
    pub(super) fn read_ahead(self: &Arc<Self>, cached: &Arc<CachedBlob>, first_missing: u64, last_missing: u64) {
        if self.read_ahead_max == 0 {
            return;
        }
        let max = (self.read_ahead_max / cached.blob.table_chunk).max(2);
        let (from, to) = {
            let mut a = lock(&cached.ahead);
            let sequential = first_missing > 0 && a.last_miss.is_some_and(|l| first_missing <= l.max(a.until) + 1);
            a.window = if sequential { (a.window * 2).clamp(2, max) } else { 0 };
            a.last_miss = Some(last_missing);
            if a.window == 0 {
                return;
            }
            a.until = last_missing + 1 + a.window;
            (last_missing + 1, a.until)
        };
        self.prefetch(cached, from, to);
    }

    /// A reader inside the prefetched window: once it passes the middle, schedule the next
    /// window, so a sequential reader never waits for a cold chunk (the fast path calls this).
    pub(super) fn advance_read_ahead(self: &Arc<Self>, cached: &Arc<CachedBlob>, last_chunk: u64) {
        let (from, to) = {
            let mut a = lock(&cached.ahead);
            if a.window == 0 || last_chunk + a.window / 2 < a.until {
                return;
            }
            let from = a.until;
            a.until += a.window;
            (from, a.until)
        };
        self.prefetch(cached, from, to);
    }

    /// Fetch chunks `[from, to)` that are not cached yet and write them with our own handle;
    /// one task per merged range, so each is written as soon as it arrives.
    pub(super) fn prefetch(self: &Arc<Self>, cached: &Arc<CachedBlob>, from: u64, to: u64) {
        let unit = cached.blob.table_chunk;
        let n_chunks = cached.n_chunks();
        let todo: Vec<u64> = {
            let v = lock(&cached.verified);
            (from..to.min(n_chunks)).filter(|c| !v.contains(c)).collect()
        };
        let Some(via) = lock(&cached.writer).clone() else {
            return;
        };
        for run in consecutive(&todo, u64::MAX) {
            let s = run.start * unit;
            let e = (run.end * unit).min(cached.blob.source.size);
            let pending = match self.engine.fetch(&cached.blob, s, e - s) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "read-ahead not started");
                    return;
                }
            };
            // one task per unit: each is written the moment it is verified
            for p in pending {
                let (engine, offset) = (Arc::clone(&self.engine), p.offset);
                let piece = async move { p.wait(&engine).await.map_err(|e| io::Error::other(e.to_string())) };
                self.store_later(cached, &via, offset, piece, |s| &s.chunks_prefetched);
            }
        }
    }
}
