//! On-demand fill: the chunks a reader's event names that are not verified in the cache
//! are fetched (merged runs, through the engine's single flight), the reader's own part
//! written first, and the range checked for holes before the read is allowed.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::blob::CachedBlob;
use super::store::{CacheLanding, Counter};
use super::{cache, FanotifyFrontend};
use crate::engine::chunks::consecutive;
use crate::engine::landing::Landing;
use crate::engine::Need;
use crate::lock::lock;

/// Who a fetch-and-store is for.
#[derive(Debug, Clone, Copy)]
pub(super) enum For {
    /// A reader, with the range its event names (if any): it is answered once its range is
    /// written; by the runs, which land every unit (in pieces once the blob's leaves are
    /// kept, and it waits for its own pieces only), or, for a range smaller than a chunk
    /// before the leaves are kept, by itself first.
    Reader(Option<(u64, u64)>),
    /// Nobody waits: a background fill or a startup prefetch (held to the engine's budget of
    /// bytes fetched ahead), whose chunks written count in this counter.
    Ahead(Counter),
}

impl FanotifyFrontend {
    /// Make `range` of the event's file present and verified; returns chunks written.
    pub(super) async fn fill(
        self: &Arc<Self>,
        file: &Arc<File>,
        cached: Option<Arc<CachedBlob>>,
        range: Option<(u64, u64)>,
    ) -> io::Result<u64> {
        let Some(cached) = cached else {
            // a marked file we do not know: never let a hole be read as zeros
            return Err(io::Error::other(
                "pre-content event for a file this daemon does not serve",
            ));
        };
        let (size, unit) = (cached.blob.source.size, cached.blob.table_chunk);
        // the leaves of a random read's chunk (format 3), if that is all it needs
        let span = range.and_then(|(o, n)| cached.blob.leaf_span(o, n));
        let missing = match span {
            Some(s) if cached.leaves.has(s) => Vec::new(),
            _ => self.missing(&cached, file, range).await?,
        };
        let mut written = 0;
        if !missing.is_empty() {
            *lock(&cached.last_read) = Instant::now();
            self.engine.reader_fetching();
            // one writer per blob, kept: an event costs no fd beyond its own
            let via = self
                .ensure_writer(&cached, file)
                .ok_or_else(|| io::Error::other("no writer for the cache file"))?;
            let leaves = match span {
                Some(s) if missing == [s.chunk] => self.fill_leaves(&cached, s, &via).await?,
                _ => false,
            };
            let urgent = range.map(|(o, n)| (o, o.saturating_add(n)));
            if !leaves {
                for run in consecutive(&missing, u64::MAX) {
                    let (s, e) = (run.start * unit, (run.end * unit).min(size));
                    written += self
                        .fetch_and_store(&cached, s, e, Arc::clone(&via), For::Reader(urgent))
                        .await?;
                }
            }
            self.start_background_fill(&cached);
        }
        // the last line of defence against zeros: whatever path wrote (or skipped) what,
        // the range the reader waits for must be on disk before it is allowed
        let (rs, re) = match range {
            Some((o, n)) => (o.min(size), o.saturating_add(n).min(size)),
            None => (0, size),
        };
        if !cache::is_data(file, rs, re)? {
            return Err(io::Error::other(format!(
                "range {rs}..{re} of {} still has holes after the fill",
                cached.path.display()
            )));
        }
        if let (Some(&f), Some(&l)) = (missing.first(), missing.last()) {
            self.read_ahead(&cached, f, l);
        }
        self.unmark_if_complete(&cached);
        Ok(written)
    }

    /// Fetch `[s, e)` of a blob and write each unit as soon as it is verified (by the run
    /// that fetched it), counted in the counter `who` names; returns chunks written. A unit
    /// that a reader's small range covers only in part gets that part written first and the
    /// whole unit written in the background, so a small random read waits for its own bytes
    /// only, not for a whole chunk to reach the page cache.
    pub(super) async fn fetch_and_store(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        s: u64,
        e: u64,
        via: Arc<File>,
        who: For,
    ) -> io::Result<u64> {
        let (need, urgent, counter): (_, _, Counter) = match who {
            For::Reader(range) => (Need::Reader, range, |s| &s.chunks_filled),
            For::Ahead(counter) => (Need::Ahead, None, counter),
        };
        // chunks some of whose leaves are here: the rest of their leaves
        let unit = cached.blob.table_chunk;
        // the runs started here write their units themselves, as each is verified (in pieces,
        // with the leaves kept: a reader waits for its own pieces only), unless a reader waits
        // for less than a chunk of a unit that would be written whole (it writes its part
        // first, below)
        let landing = CacheLanding::new(self, cached, &via, counter);
        let small = urgent.is_some_and(|(us, ue)| ue.saturating_sub(us) < unit);
        let to: Option<Arc<dyn Landing>> = (!small || cached.blob.leaves_kept()).then(|| Arc::clone(&landing) as _);
        let mut written = self
            .complete_by_leaves(cached, s / unit..e.div_ceil(unit), &via)
            .await?;
        // the chunks still missing now, not when the caller looked: another task (a
        // prefetch, a reader of a neighbouring range) may have stored some meanwhile, and the
        // engine lets a unit go once it is stored (no await from here to the fetch)
        let mut pending = Vec::new();
        for r in cached.unverified_runs(s / unit..e.div_ceil(unit), |_| false) {
            pending.extend(
                self.engine
                    .fetch_to(&cached.blob, r.start, r.end - r.start, need, to.as_ref())
                    .map_err(io::Error::other)?,
            );
        }
        // units not awaited when an error ends this are dropped: the engine settles them
        for p in pending {
            written += self.wait_and_store(cached, p, &via, urgent).await?;
        }
        // (what the runs landed is counted as they land it)
        counter(&self.stats).fetch_add(written, Relaxed);
        Ok(written + landing.landed())
    }

    /// Wait for unit `p` and store it; a reader's part of it (in `urgent`) first, if the
    /// reader needs only part of it. Returns chunks written now. A reader's part of a unit
    /// its run writes (in pieces, or whole) is there once the run has written that far: the
    /// run finishes the unit on its own.
    async fn wait_and_store(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        p: crate::engine::Pending,
        via: &Arc<File>,
        urgent: Option<(u64, u64)>,
    ) -> io::Result<u64> {
        if let Some((_, end)) = overlap(urgent, p.offset, p.end) {
            if p.placed_to(&self.engine, end).await {
                return Ok(0);
            }
        }
        let piece = p.wait(&self.engine).await.map_err(io::Error::other)?;
        let (ps, pe) = (piece.offset, piece.offset + piece.body.len());
        match overlap(urgent, ps, pe) {
            // (a unit its run landed is marked already: nothing to write first)
            Some((a, b)) if (a > ps || b < pe) && !cached.all_marked(ps, pe - ps) => {
                let part = piece
                    .bytes()
                    .map_err(io::Error::other)?
                    .slice((a - ps) as usize..(b - ps) as usize);
                self.write_urgent(cached, part, a, Arc::clone(via)).await?;
                self.store_later(cached, via, ps, async { Ok(piece) }, |s| &s.chunks_filled);
                Ok(0)
            }
            _ => self.store(cached, piece, Arc::clone(via)).await,
        }
    }

    /// The chunks of `range` not yet verified in the cache. Those unknown to this run are
    /// looked for on disk and hashed if there, on the blocking pool.
    async fn missing(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        file: &Arc<File>,
        range: Option<(u64, u64)>,
    ) -> io::Result<Vec<u64>> {
        let unknown: Vec<u64> = {
            let v = lock(&cached.verified);
            cached.chunks(range).filter(|c| !v.contains(c)).collect()
        };
        // a chunk with a hole in the cache file is missing, known from two lseeks on this
        // task; only chunks with data on disk (an earlier run's) are read and hashed, on the
        // blocking pool
        let mut any_data = false;
        for &c in &unknown {
            let r = cached.blob.chunk_range(c);
            if cache::is_data(file, r.start, r.end)? {
                any_data = true;
                break;
            }
        }
        if !any_data {
            return Ok(unknown);
        }
        let (me, cached, file) = (Arc::clone(self), Arc::clone(cached), Arc::clone(file));
        tokio::task::spawn_blocking(move || {
            let mut missing = Vec::with_capacity(unknown.len());
            for c in unknown {
                if !me.present(&cached, &file, c)? {
                    missing.push(c);
                }
            }
            Ok(missing)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Whether everything `range` asks for is cached and verified (its chunks, or the leaves
    /// of a random read written in this run); if so, keep a sequential reader's read-ahead
    /// going and the background fill waiting.
    pub(super) fn all_verified(self: &Arc<Self>, cached: Option<&Arc<CachedBlob>>, range: Option<(u64, u64)>) -> bool {
        let Some(cached) = cached else {
            return false;
        };
        let chunks = cached.chunks(range);
        let whole = {
            let v = lock(&cached.verified);
            chunks.clone().all(|c| v.contains(&c))
        };
        if whole && !chunks.is_empty() {
            *lock(&cached.last_read) = Instant::now();
            self.advance_read_ahead(cached, chunks.end - 1);
            return true;
        }
        let leaves = range
            .and_then(|(o, n)| cached.blob.leaf_span(o, n))
            .is_some_and(|span| cached.leaves.has(span));
        if leaves {
            *lock(&cached.last_read) = Instant::now();
        }
        leaves
    }
}

/// The part of `[s, e)` a reader's range covers, if any.
fn overlap(range: Option<(u64, u64)>, s: u64, e: u64) -> Option<(u64, u64)> {
    range.map(|(us, ue)| (us.max(s), ue.min(e))).filter(|(a, b)| a < b)
}

#[cfg(test)]
mod tests {
    use super::overlap;

    #[test]
    fn overlap_is_the_covered_part_or_none() {
        assert_eq!(overlap(Some((10, 20)), 0, 15), Some((10, 15)));
        assert_eq!(overlap(Some((10, 20)), 12, 18), Some((12, 18)));
        assert_eq!(overlap(Some((10, 20)), 20, 30), None, "touching is not covering");
        assert_eq!(overlap(None, 0, 100), None);
    }
}
