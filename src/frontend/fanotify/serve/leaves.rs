//! Random reads served by their leaves (format 3): a reader's miss in a chunk that no
//! sequential reader is reading fetches only the leaves its range covers (16 KiB each by
//! default), verified on their own, and writes them into the cache file; the chunk stays
//! unverified. The chunk is fetched whole instead by a miss while its leaves are being read
//! (the engine's single flight fetches it once for every such reader) and by a miss in a
//! chunk a startup prefetch is fetching. Once a quarter of its leaves are here (readers are
//! reading around it), or a sequential reader, read-ahead, the fill or a startup prefetch
//! reaches it, the chunk is completed by the runs of its missing leaves instead
//! (`complete_by_leaves`), so no leaf comes twice, then verified. So a random reader fetches
//! about its own pages, however often it comes back to a chunk. Leaves already written are
//! served from the cache file like verified chunks; leaves an earlier run wrote (a chunk
//! with holes whose span is all data) are read back and checked against the leaf values,
//! not fetched again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::blob::CachedBlob;
use super::{cache, FanotifyFrontend};
use crate::engine::leaves::LeafSpan;
use crate::engine::Engine;
use crate::frontend::leaf_book::LeafRead;
use crate::lock::lock;

impl CachedBlob {
    /// The chunk of `span` taken for a leaf read, if that is how its miss (its chunk
    /// missing) is served: no startup prefetch is about to fetch the chunk whole, no
    /// sequential reader reaches it, no fetch of it whole is under way, and the book's rule (a quarter of the chunk, one leaf
    /// read at a time) allows it.
    fn leaves_first(&self, span: LeafSpan, engine: &Engine) -> Option<LeafRead<'_>> {
        let planned = lock(&self.planned).iter().any(|r| r.contains(&span.chunk));
        if planned || lock(&self.ahead).continues(span.chunk) || engine.fetching(&self.blob, span.chunk) {
            return None;
        }
        self.leaves.take(span, self.blob.leaves_per_chunk())
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
        // a chunk being fetched whole (or fetched and its store pending): joined
        if self.engine.fetching(&cached.blob, span.chunk) {
            return Ok(false);
        }
        // leaves an earlier run wrote into the chunk, entered in the book at its first miss
        if !cached.leaves.any_written(span.chunk) {
            self.found_leaves(cached, span.chunk, via).await?;
        }
        let Some(todo) = cached.leaves.unwritten(span) else {
            return Ok(true);
        };
        let Some(todo) = cached.blob.chunk_leaves(span.chunk, todo) else {
            return Ok(false);
        };
        let Some(_taken) = cached.leaves_first(todo, &self.engine) else {
            return Ok(false);
        };
        self.read_and_write_leaves(cached, todo, via).await
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
        let data = piece.bytes().map_err(io::Error::other)?.clone();
        self.write_urgent(cached, data, piece.offset, Arc::clone(via)).await?;
        cached.leaves.written(&cached.blob, span);
        Ok(true)
    }

    /// Complete the chunks of `chunks` (those not verified) some of whose leaves are here,
    /// written in this run or found on disk from an earlier one, by the rest of their leaves
    /// (`LeafBook::rest`), each request checked against the chunk's leaf values: a whole-chunk
    /// fetch would bring those leaves twice. The chunks completed are verified; one whose
    /// leaves could not be read is left to the whole-chunk fetch, with its retries. Returns
    /// the chunks completed.
    pub(super) async fn complete_by_leaves(
        &self,
        cached: &Arc<CachedBlob>,
        chunks: std::ops::Range<u64>,
        via: &Arc<File>,
    ) -> io::Result<u64> {
        if cached.blob.leaves_per_chunk() == 0 {
            return Ok(0);
        }
        let mut completed = 0;
        for c in chunks.start..chunks.end.min(cached.n_chunks()) {
            // a chunk being fetched whole: joined, not read again by leaves
            if lock(&cached.verified).contains(&c) || self.engine.fetching(&cached.blob, c) {
                continue;
            }
            if (cached.leaves.any_written(c) || self.found_leaves(cached, c, via).await?)
                && self.write_rest(cached, c, via).await?
            {
                completed += 1;
            }
        }
        Ok(completed)
    }

    /// Fetch and write the rest of chunk `c`'s leaves, then mark it verified; `false` if
    /// another task completed it meanwhile or the leaves could not be read. A leaf read of
    /// the chunk under way is waited for first.
    async fn write_rest(&self, cached: &Arc<CachedBlob>, c: u64, via: &Arc<File>) -> io::Result<bool> {
        let verified = || lock(&cached.verified).contains(&c);
        let _taken = loop {
            if verified() {
                return Ok(false);
            }
            if let Some(t) = cached.leaves.take_chunk(c) {
                break t;
            }
            if let Some(ended) = cached.leaves.wait_for(c) {
                ended.await;
            }
        };
        let spans = cached.leaves.rest(&cached.blob, c).unwrap_or_default();
        let reads = spans.iter().map(|&span| self.engine.read_leaves(&cached.blob, span));
        let pieces = match futures::future::try_join_all(reads).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, chunk = c, "the rest of a chunk's leaves not read: fetched whole");
                return Ok(false);
            }
        };
        for (piece, span) in pieces.into_iter().zip(spans) {
            let data = piece.bytes().map_err(io::Error::other)?.clone();
            self.write(cached, data, piece.offset, Arc::clone(via), super::store::Mark::Later)
                .await?;
            cached.leaves.written(&cached.blob, span);
        }
        // a verified chunk is answered without a look at the disk: it must hold no hole
        let r = cached.blob.chunk_range(c);
        if !cache::is_data(via, r.start, r.end)? {
            tracing::warn!(
                chunk = c,
                "a chunk completed by its leaves still has holes: fetched whole"
            );
            return Ok(false);
        }
        lock(&cached.verified).insert(c);
        Ok(true)
    }

    /// Whether some leaves of chunk `c` are on disk from an earlier run (the chunk has data
    /// but holes) and verify; those that do are entered in the book (and the chunk counted).
    async fn found_leaves(&self, cached: &Arc<CachedBlob>, c: u64, via: &Arc<File>) -> io::Result<bool> {
        let blob = &cached.blob;
        let r = blob.chunk_range(c);
        if !cache::has_data(via, r.start, r.end)? {
            return Ok(false);
        }
        let mut found = false;
        for l in 0..blob.leaves_in(c) {
            let Some(span) = blob.chunk_leaves(c, l..l + 1) else {
                continue;
            };
            if self.leaves_on_disk(cached, span, via).await? {
                cached.leaves.written(&cached.blob, span);
                found = true;
            }
        }
        if found {
            self.stats.leaves_present.fetch_add(1, Relaxed);
        }
        Ok(found)
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
