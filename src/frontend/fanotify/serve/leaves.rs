//! Random reads served by their leaves (format 3): the first miss of a reader in a chunk
//! that no sequential reader is reading fetches only the leaves its range covers (16 KiB
//! each by default), verified on their own, and writes them into the cache file; the chunk
//! stays unverified. A second miss in the same chunk, or one while its leaves are being read,
//! fetches the whole chunk (readers are reading around it; the engine's single flight fetches
//! it once), as does a sequential reader, and a miss in a chunk a startup prefetch
//! is fetching. Leaves already written are served from the cache file like verified chunks;
//! leaves an earlier run wrote (a chunk with holes whose span is all data) are read back and
//! checked against the leaf values, not fetched again.

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

    /// Whether a miss of `span` (its chunk missing) is served by its leaves: the blob has
    /// them, no startup prefetch is about to fetch the chunk whole, no sequential reader
    /// reaches it, and no leaf of it was read (or is being read) before; the chunk is then
    /// taken, so that a concurrent miss in it fetches it whole (through the engine's single
    /// flight) instead of more leaves.
    fn leaves_first(&self, span: LeafSpan) -> bool {
        if lock(&self.planned).iter().any(|r| r.contains(&span.chunk)) || lock(&self.ahead).continues(span.chunk) {
            return false;
        }
        lock(&self.leaf_chunks).insert(span.chunk)
    }

    /// Leaves of `span` are in the cache file: served from there from now on.
    fn leaves_are_written(&self, span: LeafSpan) {
        lock(&self.leaves_written).extend((span.first..span.end).map(|l| (span.chunk, l)));
        lock(&self.leaf_chunks).insert(span.chunk);
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
