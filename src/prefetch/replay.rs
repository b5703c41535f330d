//! Fetching a plan: its pieces (`Plan::pieces`) started in order, a few in flight, each
//! fetched by the frontend's own function; a blob whose fetch fails has its later pieces
//! left to its readers. Shared by both frontends.

#![forbid(unsafe_code)]

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use futures::StreamExt;

use super::Plan;

/// Pieces of a startup prefetch in flight at once (half of `max_concurrent_fetches`' default
/// 8: the readers keep the rest).
pub const FETCHES_AT_ONCE: usize = 4;

/// Largest piece of a run fetched as one request (and at most `merge_max`): a long run read
/// first (a large file's head) is fetched by several requests side by side. (Against
/// docker-registry, 4 MiB pieces made the whole prefetch slower than 8-32 MiB: each request
/// has its cost.)
pub const PIECE_BYTES: u64 = 8 << 20;

/// Fetch `plan` with `fetch` (given a blob's index in `plan.blobs` and a piece's chunks; what
/// it fetched, or why the blob can go no further), pieces of at most `merge_max` and
/// [`PIECE_BYTES`], [`FETCHES_AT_ONCE`] in flight. Returns the total fetched.
pub async fn fetch_pieces<F, Fut>(plan: &Plan, merge_max: u64, fetch: F) -> u64
where
    F: Fn(usize, Range<u64>) -> Fut,
    Fut: Future<Output = Result<u64, String>>,
{
    let piece_bytes = merge_max.min(PIECE_BYTES);
    let stopped: Vec<AtomicBool> = plan.blobs.iter().map(|_| AtomicBool::new(false)).collect();
    let (stopped, fetch) = (&stopped, &fetch);
    futures::stream::iter(plan.pieces(|blob| piece_bytes / blob.table_chunk))
        .map(|(b, piece)| async move {
            if stopped[b].load(Relaxed) {
                return 0;
            }
            fetch(b, piece).await.unwrap_or_else(|e| {
                if !stopped[b].swap(true, Relaxed) {
                    let blob = &plan.blobs[b].0.source.digest;
                    tracing::warn!(%blob, error = %e, "startup prefetch of a blob stopped; readers fetch on demand");
                }
                0
            })
        })
        .buffer_unordered(FETCHES_AT_ONCE)
        .fold(0, |sum, n| async move { sum + n })
        .await
}
