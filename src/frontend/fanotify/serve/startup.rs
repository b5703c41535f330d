//! Startup prefetch (fanotify): an image's prefetch list is fetched as soon as it is mounted,
//! up to 4 blobs side by side, each run of chunks not yet cached in merged requests of up to
//! `merge_max`, one request at a time per blob, beside the readers (whose own fetches never
//! wait for it; a chunk both want is fetched once, by the engine's single flight).
//!
//! A cache file is written only through a non-notifying event fd. A blob no reader has
//! touched yet has none, so the prefetch reads one byte of its first chunk itself: the
//! daemon's own event for it fills that chunk and keeps the blob's writer.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tracing::Instrument;

use super::blob::CachedBlob;
use super::FanotifyFrontend;
use crate::engine::DataBlob;
use crate::lock::lock;
use crate::prefetch::Plan;

/// Blobs of one image prefetched at once (half of `max_concurrent_fetches`' default 8: the
/// readers keep the rest).
const BLOBS_AT_ONCE: usize = 4;

impl FanotifyFrontend {
    /// Fetch `plan` (an image's prefetch list, checked against it) on its own task.
    pub fn replay(self: &Arc<Self>, reference: &str, plan: Plan) {
        let me = Arc::clone(self);
        let span = tracing::info_span!("startup_prefetch", image = %reference);
        tokio::spawn(
            async move {
                let t0 = Instant::now();
                // the blobs side by side (a startup reads across layers), each one request at
                // a time: at most BLOBS_AT_ONCE of the registry's connections
                let blobs = plan.into_iter().map(|(blob, runs)| {
                    let me = Arc::clone(&me);
                    async move {
                        me.replay_blob(&blob, &runs).await.unwrap_or_else(|e| {
                            tracing::warn!(blob = %blob.source.digest, error = %e, "startup prefetch of a blob stopped; readers fetch on demand");
                            0
                        })
                    }
                });
                let chunks: u64 = futures::stream::iter(blobs)
                    .buffer_unordered(BLOBS_AT_ONCE)
                    .collect::<Vec<u64>>()
                    .await
                    .into_iter()
                    .sum();
                tracing::info!(chunks, ms = t0.elapsed().as_millis() as u64, "startup prefetch done");
            }
            .instrument(span),
        );
    }

    /// One blob of a plan: the chunks fetched for it.
    async fn replay_blob(self: &Arc<Self>, blob: &DataBlob, runs: &[std::ops::Range<u64>]) -> std::io::Result<u64> {
        let Some(cached) = self.cached_of(blob) else {
            return Err(std::io::Error::other("the blob's cache file is not prepared"));
        };
        // readers' misses in these chunks fetch them whole, not their leaves: the prefetch
        // fetches them whole anyway
        *lock(&cached.planned) = runs.to_vec();
        let fetched = self.replay_runs(&cached, runs).await;
        lock(&cached.planned).clear();
        fetched
    }

    /// The runs of one blob's plan, fetched.
    async fn replay_runs(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        runs: &[std::ops::Range<u64>],
    ) -> std::io::Result<u64> {
        let blob = &cached.blob;
        let Some(first) = runs.first() else {
            return Ok(0);
        };
        let kept = lock(&cached.writer).clone();
        let via = match kept {
            Some(w) => w,
            None => self.writer_by_reading(cached, first.start).await?,
        };
        let unit = blob.table_chunk;
        let per_run = (self.engine.merge_max() / unit).max(1);
        let mut fetched = 0;
        for run in runs {
            let mut cursor = run.start;
            while cursor < run.end && !cached.complete.load(Relaxed) {
                let Some(r) = self.next_missing_run(cached, &via, cursor..run.end, per_run)? else {
                    break;
                };
                cursor = r.end;
                let (s, e) = (r.start * unit, (r.end * unit).min(blob.source.size));
                let n = self.fetch_and_store(cached, s, e, Arc::clone(&via), None).await?;
                self.stats.chunks_startup.fetch_add(n, Relaxed);
                fetched += n;
            }
        }
        self.unmark_if_complete(cached);
        Ok(fetched)
    }

    /// The prepared cache file of `blob`.
    fn cached_of(&self, blob: &DataBlob) -> Option<Arc<CachedBlob>> {
        lock(&self.files).values().find(|c| c.blob.key() == blob.key()).cloned()
    }

    /// Read one byte of chunk `c` of the cache file as a reader would: the daemon's own event
    /// fills that chunk and keeps the blob's writer, which is returned.
    async fn writer_by_reading(&self, cached: &Arc<CachedBlob>, c: u64) -> std::io::Result<Arc<std::fs::File>> {
        let (path, at) = (cached.path.clone(), c * cached.blob.table_chunk);
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            let mut one = [0u8; 1];
            f.read_exact_at(&mut one, at)
        })
        .await
        .map_err(std::io::Error::other)??;
        lock(&cached.writer)
            .clone()
            .ok_or_else(|| std::io::Error::other("no writer after reading the cache file"))
    }
}
