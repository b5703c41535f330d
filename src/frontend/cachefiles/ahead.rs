//! Read-ahead for the cachefiles frontend. The kernel asks only for ranges missing from its
//! cache file and reads what is there without asking, so READs are the misses of the shared
//! read-ahead state machine (`frontend::readahead`): a READ right behind the previous one
//! opens a window, whose chunks are fetched in merged runs and written through the object's
//! anonymous fd before the reader gets there. The kernel then never asks for them. Best
//! effort: a unit that fails is left to a reader's own READ, which fetches it again.

#![forbid(unsafe_code)]

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use super::buffers;
use super::leaves::some_leaves_here;
use super::serve::{Cachefiles, CachefilesStats, Object};
use crate::catalog::Target;
use crate::engine::chunks::consecutive;
use crate::engine::{DataBlob, EngineError, Pending};
use crate::image::digest::Digest;
use crate::lock::lock;
use crate::prefetch::{fetch_pieces, Plan};

impl Cachefiles {
    /// A READ of table chunks `first..=last` of `obj`: a sequential reader's next window is
    /// fetched and written ahead of it (chunks already in the cache file or being written are
    /// skipped).
    pub(super) fn read_ahead(self: &Arc<Self>, obj: &Arc<Object>, first: u64, last: u64) {
        let Target::Data(_, blob) = &obj.target else {
            return;
        };
        let Some(window) = lock(&obj.ahead).on_miss(first, last) else {
            return;
        };
        let unit = blob.table_chunk;
        let todo = claim(obj, blob, window.start..window.end.min(blob.source.size.div_ceil(unit)));
        for run in consecutive(&todo, u64::MAX) {
            match self.fetch_units(blob, &run) {
                Ok(units) => {
                    for (p, end) in units {
                        let (me, obj) = (Arc::clone(self), Arc::clone(obj));
                        tokio::spawn(async move { me.write_ahead(&obj, p, end, |s| &s.units_ahead).await });
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, object = %obj.name, "read-ahead not started");
                    release(obj, run);
                }
            }
        }
    }

    /// Fetch table chunks `run` of `blob`: each unit with where it ends (where the next one
    /// begins, the last at the run's end).
    fn fetch_units(&self, blob: &Arc<DataBlob>, run: &Range<u64>) -> Result<Vec<(Pending, u64)>, EngineError> {
        let unit = blob.table_chunk;
        let (s, e) = (run.start * unit, (run.end * unit).min(blob.source.size));
        let pending = self.engine.fetch(blob, s, e - s, crate::engine::Need::Ahead)?;
        let ends: Vec<u64> = pending.iter().skip(1).map(|p| p.offset).chain([e]).collect();
        Ok(pending.into_iter().zip(ends).collect())
    }

    /// Wait for one fetched unit (`[p.offset, end)`) and write it into the cache file (padded
    /// with zeros to the direct-I/O alignment at the blob's end, as a READ of the last chunk
    /// is); its chunks are no longer being written, whatever the outcome.
    async fn write_ahead(
        self: &Arc<Self>,
        obj: &Arc<Object>,
        p: Pending,
        end: u64,
        counter: fn(&CachefilesStats) -> &AtomicU64,
    ) -> bool {
        let offset = p.offset;
        let written = match p.wait(&self.engine).await {
            Ok(piece) => {
                let (o, bufs) = (Arc::clone(obj), Arc::clone(&self.bufs));
                // the unit stays among the engine's recently completed ones (not `stored`): a
                // READ the kernel sent for it before this write landed is served from there,
                // and this frontend has no record of its own to check before a fetch
                tokio::task::spawn_blocking(move || -> io::Result<u64> {
                    // written or not, no one else writes it: its share is free
                    let written = piece
                        .bytes()
                        .map_err(io::Error::other)
                        .and_then(|data| buffers::holding(&bufs, data))
                        .and_then(|buf| o.fd.write_all_at(&buf, piece.offset));
                    piece.let_go();
                    written.map(|()| piece.body.len())
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
            }
            Err(e) => Err(io::Error::other(e)),
        };
        if let Target::Data(_, blob) = &obj.target {
            let unit = blob.table_chunk;
            let mut writing = lock(&obj.writing);
            for c in offset / unit..end.div_ceil(unit) {
                writing.remove(&c);
            }
        }
        match written {
            Ok(n) => {
                counter(&self.stats).fetch_add(1, Relaxed);
                self.stats.bytes_written.fetch_add(n, Relaxed);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, object = %obj.name, offset, "read-ahead unit not written");
                false
            }
        }
    }

    /// Fetch `plan` (the startup prefetch list of `image`, checked against it) into the cache
    /// files of the image's objects, on its own task: its pieces in the order the start read
    /// them, a few at a time (`prefetch::replay`), each the chunks not in the cache file yet, written
    /// through the object's anonymous fd as they arrive (the kernel then never asks for them).
    /// A blob whose fetch or write failed is left to its readers.
    pub fn replay(self: &Arc<Self>, image: &Digest, reference: &str, plan: Plan) {
        let (me, image) = (Arc::clone(self), image.clone());
        let span = tracing::info_span!("startup_prefetch", image = %reference);
        tokio::spawn(
            async move {
                let t0 = Instant::now();
                let objects: Arc<Vec<Option<Arc<Object>>>> = plan
                    .blobs
                    .iter()
                    .map(|(blob, _)| {
                        let obj = me.object_of(&image, blob);
                        if obj.is_none() {
                            tracing::warn!(blob = %blob.source.digest, "startup prefetch: the kernel has no object for the blob");
                        }
                        obj
                    })
                    .collect::<Vec<_>>()
                    .into();
                let fetch = |b: usize, piece: Range<u64>| {
                    let (me, objects) = (Arc::clone(&me), Arc::clone(&objects));
                    async move {
                        let Some(obj) = &objects[b] else {
                            return Ok(0);
                        };
                        let Target::Data(_, blob) = &obj.target else {
                            return Ok(0);
                        };
                        let written = me.write_runs(obj, blob, &[piece], |s| &s.units_startup).await;
                        written.ok_or_else(|| "a fetch or write failed".to_string())
                    }
                };
                let units = fetch_pieces(&plan, me.engine.merge_max(), fetch).await;
                tracing::info!(units, ms = t0.elapsed().as_millis() as u64, "startup prefetch done");
            }
            .instrument(span),
        );
    }

    /// Fetch the chunks of `runs` (of `obj`'s blob) that are neither in the cache file nor
    /// being written, in merged runs of up to `merge_max`, one at a time, and write them,
    /// counting units in `counter`; the units written, or None once a fetch or write failed
    /// (the chunks it claimed and did not write are released, for a later fill or READ).
    pub(super) async fn write_runs(
        self: &Arc<Self>,
        obj: &Arc<Object>,
        blob: &Arc<DataBlob>,
        runs: &[Range<u64>],
        counter: fn(&CachefilesStats) -> &AtomicU64,
    ) -> Option<u64> {
        let per_run = (self.engine.merge_max() / blob.table_chunk).max(1);
        let mut written = 0;
        for run in runs {
            // chunks a random reader left with some leaves: the rest of their leaves
            for c in run.clone().filter(|&c| some_leaves_here(obj, blob, c)) {
                match self.write_rest(obj, blob, c).await {
                    Ok(true) => {
                        counter(&self.stats).fetch_add(1, Relaxed);
                        written += 1;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, object = %obj.name, chunk = c, "the rest of a chunk's leaves not written");
                        return None;
                    }
                }
            }
            let todo = claim(obj, blob, run.clone());
            for sub in consecutive(&todo, per_run) {
                let units = match self.fetch_units(blob, &sub) {
                    Ok(units) => units,
                    Err(err) => {
                        tracing::debug!(error = %err, object = %obj.name, "fill run not started");
                        release(obj, todo.iter().copied().filter(|&c| c >= sub.start));
                        return None;
                    }
                };
                for (p, end) in units {
                    if !self.write_ahead(obj, p, end, counter).await {
                        // the units after this one are dropped, not awaited (the engine
                        // settles them): their chunks are released too
                        release(obj, todo.iter().copied().filter(|&c| c >= sub.start));
                        return None;
                    }
                    written += 1;
                }
            }
        }
        Some(written)
    }

    /// The object the kernel opened for `blob` of `image` (each image has its own volume).
    fn object_of(&self, image: &Digest, blob: &DataBlob) -> Option<Arc<Object>> {
        lock(&self.objects)
            .values()
            .find(|o| matches!(&o.target, Target::Data(i, b) if &i.manifest_digest == image && b.key() == blob.key()))
            .cloned()
    }
}

/// The chunks of `range` neither in the object's cache file (whole, or in part by leaves of
/// this run or an earlier one) nor being written, now marked as being written (by whoever calls: [`Cachefiles::write_ahead`]
/// unmarks each unit it handles).
fn claim(obj: &Object, blob: &DataBlob, range: Range<u64>) -> Vec<u64> {
    range
        .filter(|&c| !in_cache(obj, blob, c))
        // a chunk with leaves here is left to its reader, who reads the rest of its leaves
        .filter(|&c| !some_leaves_here(obj, blob, c) && !obj.leaves.reading(c))
        .filter(|&c| lock(&obj.writing).insert(c))
        .collect()
}

/// Claimed chunks that will not be written after all.
fn release(obj: &Object, chunks: impl IntoIterator<Item = u64>) {
    let mut writing = lock(&obj.writing);
    for c in chunks {
        writing.remove(&c);
    }
}

/// Whether table chunk `c` of `blob` is in the object's cache file already (asked through
/// the anonymous fd, which seeks in the cache file; an error counts as not there).
pub(super) fn in_cache(obj: &Object, blob: &DataBlob, c: u64) -> bool {
    let r = blob.chunk_range(c);
    crate::frontend::fanotify::cache::is_data(&obj.fd, r.start, r.end).unwrap_or(false)
}
