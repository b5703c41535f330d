//! Random reads served by their leaves (format 3): a reader's miss in a chunk that no
//! sequential reader is reading fetches only the leaves its range covers (16 KiB each by
//! default), verified on their own, and writes them into the cache file; the chunk stays
//! unverified. The chunk is fetched whole instead by a miss while its leaves are being read
//! (the engine's single flight fetches it once for every such reader), once a quarter of its
//! leaves are here (readers are reading around it), by a sequential reader, and by a miss in
//! a chunk a startup prefetch is fetching. So a random reader fetches about its own pages,
//! however often it comes back to a chunk. Leaves already written are served from the cache
//! file like verified chunks; leaves an earlier run wrote (a chunk with holes whose span is
//! all data) are read back and checked against the leaf values, not fetched again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::blob::CachedBlob;
use super::{cache, FanotifyFrontend};
use crate::engine::leaves::LeafSpan;
use crate::lock::lock;

impl CachedBlob {
    /// Whether every leaf of `span` was written in this run.
    pub(super) fn has_leaves(&self, span: LeafSpan) -> bool {
        let w = lock(&self.leaves_written);
        (span.first..span.end).all(|l| w.contains(&(span.chunk, l)))
    }

    /// Whether a miss of `span` (its chunk missing) is served by its leaves: no startup
    /// prefetch is about to fetch the chunk whole, no sequential reader reaches it, fewer
    /// than a quarter of its leaves would be here with these, and no leaf read of it is under
    /// way. The chunk is then taken until [`leaf_read_done`](Self::leaf_read_done), so a
    /// concurrent miss in it fetches it whole.
    fn leaves_first(&self, span: LeafSpan) -> bool {
        let leaves_per_chunk = self
            .blob
            .leaves
            .as_ref()
            .map_or(0, |l| l.layout.leaves_of(self.blob.table_chunk));
        if lock(&self.planned).iter().any(|r| r.contains(&span.chunk)) || lock(&self.ahead).continues(span.chunk) {
            return false;
        }
        let here = lock(&self.leaves_written)
            .range((span.chunk, 0)..(span.chunk + 1, 0))
            .count() as u64;
        if (here + span.end - span.first) * 4 > leaves_per_chunk {
            return false;
        }
        lock(&self.leaf_reads).insert(span.chunk)
    }

    /// The leaf read of `span`'s chunk ended (whatever its outcome).
    fn leaf_read_done(&self, span: LeafSpan) {
        lock(&self.leaf_reads).remove(&span.chunk);
    }

    /// Leaves of `span` are in the cache file: served from there from now on.
    fn leaves_are_written(&self, span: LeafSpan) {
        lock(&self.leaves_written).extend((span.first..span.end).map(|l| (span.chunk, l)));
    }
}

impl FanotifyFrontend {
    /// Fetch and write the leaves of `span` if that is how this miss is served; `false` when
    /// the whole chunk is to be fetched (not a leaf read, or the leaf read failed: the chunk
    /// fetch retries, and its bytes are checked against the chunk digest).
    pub(super) async fn fill_leaves(
        &self,
        cached: &Arc<CachedBlob>,
        span: LeafSpan,
        via: &Arc<File>,
    ) -> io::Result<bool> {
        if self.leaves_on_disk(cached, span, via).await? {
            cached.leaves_are_written(span);
            self.stats.leaves_present.fetch_add(1, Relaxed);
            return Ok(true);
        }
        if !cached.leaves_first(span) {
            return Ok(false);
        }
        let read = self.read_and_write_leaves(cached, span, via).await;
        cached.leaf_read_done(span);
        read
    }

    /// Fetch the leaves of `span` and write them; `false` if the leaf read failed.
    async fn read_and_write_leaves(
        &self,
        cached: &Arc<CachedBlob>,
        span: LeafSpan,
        via: &Arc<File>,
    ) -> io::Result<bool> {
        let piece = match self.engine.read_leaves(&cached.blob, span).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, chunk = span.chunk, "leaf read failed: fetching the whole chunk");
                return Ok(false);
            }
        };
        self.write_urgent(cached, piece.data, piece.offset, Arc::clone(via))
            .await?;
        cached.leaves_are_written(span);
        Ok(true)
    }

    /// Whether the leaves of `span` are in the cache file already (an earlier run wrote
    /// them) and verify; leaves that do not are fetched again.
    async fn leaves_on_disk(&self, cached: &CachedBlob, span: LeafSpan, via: &Arc<File>) -> io::Result<bool> {
        if !cache::is_data(via, span.start, span.stop)? {
            return Ok(false);
        }
        let (file, len) = (Arc::clone(via), (span.stop - span.start) as usize);
        let data = tokio::task::spawn_blocking(move || {
            let mut b = vec![0u8; len];
            file.read_exact_at(&mut b, span.start).map(|_| b)
        })
        .await
        .map_err(io::Error::other)??;
        match self.engine.verify_leaves(&cached.blob, span, &data).await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(error = %e, chunk = span.chunk, "leaves in the cache file do not verify: fetched again");
                Ok(false)
            }
        }
    }
}
