//! Startup prefetch (fanotify): an image's prefetch list is fetched as soon as it is mounted,
//! beside the readers (whose own fetches never wait for it; a chunk both want is fetched
//! once, by the engine's single flight). The chunks go in the order the recorded start first
//! read them, across blobs, in pieces of a run, a few in flight (`prefetch::replay`): what a
//! start reads first, a large file's head say, arrives first and at the whole prefetch's
//! speed. A piece fetches only its chunks not yet cached.
//!
//! A cache file is written only through a non-notifying event fd. A blob no reader has
//! touched yet has none, so the prefetch reads one byte of its first chunk itself: the
//! daemon's own event for it fills that chunk and keeps the blob's writer.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::OnceCell;
use tracing::Instrument;

use super::blob::CachedBlob;
use super::FanotifyFrontend;
use crate::engine::DataBlob;
use crate::lock::lock;
use crate::prefetch::{fetch_pieces, Plan};

/// One blob of a plan being fetched.
struct PlannedBlob {
    cached: Arc<CachedBlob>,
    /// Its writer, found (or made, by reading) by the first piece that needs it.
    writer: OnceCell<Arc<File>>,
}

impl FanotifyFrontend {
    /// Fetch `plan` (an image's prefetch list, checked against it) on its own task.
    pub fn replay(self: &Arc<Self>, reference: &str, plan: Plan) {
        let me = Arc::clone(self);
        let span = tracing::info_span!("startup_prefetch", image = %reference);
        // readers' misses in planned chunks fetch them whole, not their leaves: the prefetch
        // fetches them whole anyway (set before any reader can miss in them)
        let blobs: Arc<Vec<Option<PlannedBlob>>> = plan
            .blobs
            .iter()
            .map(|(blob, runs)| {
                let cached = self.cached_of(blob);
                match &cached {
                    Some(c) => *lock(&c.planned) = runs.clone(),
                    None => tracing::warn!(blob = %blob.source.digest, "startup prefetch: the blob's cache file is not prepared"),
                }
                cached.map(|cached| PlannedBlob {
                    cached,
                    writer: OnceCell::new(),
                })
            })
            .collect::<Vec<_>>()
            .into();
        tokio::spawn(
            async move {
                let t0 = Instant::now();
                let fetch = |b: usize, piece: Range<u64>| {
                    let (me, blobs) = (Arc::clone(&me), Arc::clone(&blobs));
                    async move {
                        match &blobs[b] {
                            Some(blob) => me.fetch_piece(blob, piece).await.map_err(|e| e.to_string()),
                            None => Ok(0),
                        }
                    }
                };
                let chunks = fetch_pieces(&plan, me.engine.merge_max(), fetch).await;
                for b in blobs.iter().flatten() {
                    lock(&b.cached.planned).clear();
                    me.unmark_if_complete(&b.cached);
                }
                tracing::info!(chunks, ms = t0.elapsed().as_millis() as u64, "startup prefetch done");
            }
            .instrument(span),
        );
    }

    /// Fetch and write the chunks of `piece` of a planned blob not yet cached; the chunks
    /// written.
    async fn fetch_piece(self: &Arc<Self>, b: &PlannedBlob, piece: Range<u64>) -> std::io::Result<u64> {
        let cached = &b.cached;
        if cached.complete.load(Relaxed) {
            return Ok(0);
        }
        let via = b
            .writer
            .get_or_try_init(|| async {
                let kept = lock(&cached.writer).clone();
                match kept {
                    Some(w) => Ok(w),
                    None => self.writer_by_reading(cached, piece.start).await,
                }
            })
            .await?;
        let (unit, size) = (cached.blob.table_chunk, cached.blob.source.size);
        let per = piece.end - piece.start;
        let mut cursor = piece.start;
        let mut fetched = 0;
        while cursor < piece.end && !cached.complete.load(Relaxed) {
            let Some(r) = self.next_missing_run(cached, via, cursor..piece.end, per)? else {
                break;
            };
            cursor = r.end;
            let (s, e) = (r.start * unit, (r.end * unit).min(size));
            let n = self
                .fetch_and_store(
                    cached,
                    s,
                    e,
                    Arc::clone(via),
                    super::demand::For::Ahead(|s| &s.chunks_startup),
                )
                .await?;
            fetched += n;
        }
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
