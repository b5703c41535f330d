//! READs served by their leaves (format 3). A short READ (at most 64 KiB: a random reader's)
//! inside one chunk, not where the last READ ended, that no sequential reader reaches, no
//! read-ahead is writing and no other READ is fetching whole fetches only the 16 KiB leaves it
//! covers (those not here yet), verified against the chunk's slot of leaf values, and writes
//! them through the object's anonymous fd. The kernel then reads them from the cache file and
//! asks only for the holes around them, so a re-read never reaches the daemon. Past the book's
//! quarter (`frontend::leaf_book`), or for a sequential reader, a chunk with leaves here gets
//! the runs of its missing leaves instead of the whole chunk, and a READ beside a leaf read
//! under way waits for it: no byte is fetched twice. A chunk without leaves is fetched whole.
//! A leaf read that fails is followed by the whole-chunk path, with its retries and its check
//! against the chunk digest.

#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::ahead::in_cache;
use super::buffers::{self, WriteBuf};
use super::device::DIO_ALIGN;
use super::serve::{Cachefiles, Object};
use crate::engine::leaves::LeafSpan;
use crate::engine::DataBlob;
use crate::frontend::fanotify::cache::{has_data, is_data};
use crate::frontend::leaf_book::LeafRead;
use crate::lock::lock;
use tokio::sync::futures::OwnedNotified;

/// The longest READ served by leaves: a longer one is the kernel's read-ahead for a reader it
/// sees as sequential (128 KiB for a file read from its start), which goes on into the rest
/// of the chunk; fetching its leaves first would fetch them twice.
const LEAF_READ_MAX: u64 = 64 << 10;

/// The leaves a READ or a fill writes (each span one request), with their chunk taken.
pub(super) struct LeafPlan<'a> {
    pub(super) spans: Vec<LeafSpan>,
    _taken: LeafRead<'a>,
}

/// How a READ of a data blob is served.
pub(super) enum ByLeaves<'a> {
    /// By these leaves.
    Leaves(LeafPlan<'a>),
    /// Its leaves were written since the kernel asked: nothing to write.
    Here,
    /// After the leaf read of its chunk under way ends (then asked again).
    Wait(OwnedNotified),
    /// By the whole chunks it touches.
    Whole,
}

impl Cachefiles {
    /// How a READ of `[offset, offset + len)` of `blob` is served (`follows`: it begins where
    /// the object's last READ ended). Asked before the READ counts as a miss for read-ahead,
    /// so a READ right behind a sequential reader's is seen as sequential.
    pub(super) fn leaf_read<'a>(
        &self,
        obj: &'a Object,
        blob: &DataBlob,
        offset: u64,
        len: u64,
        follows: bool,
    ) -> ByLeaves<'a> {
        let Some(span) = blob.leaf_span(offset, len) else {
            return ByLeaves::Whole;
        };
        // what is written must cover the READ (its last leaf rounded up for direct I/O)
        let covered = span.stop.div_ceil(DIO_ALIGN as u64) * DIO_ALIGN as u64;
        if offset.saturating_add(len) > covered || span.start % DIO_ALIGN as u64 != 0 {
            return ByLeaves::Whole;
        }
        // a chunk read ahead, or fetched whole for another READ: this one joins that fetch
        if lock(&obj.writing).contains(&span.chunk) || self.engine.fetching(blob, span.chunk) {
            return ByLeaves::Whole;
        }
        // a leaf read of the chunk under way: after it, this READ reads the rest (a whole
        // chunk now would fetch those leaves twice)
        if let Some(ended) = obj.leaves.wait_for(span.chunk) {
            return ByLeaves::Wait(ended);
        }
        // the leaves of the READ not here yet (a READ beside an earlier one shares a leaf)
        let Some(todo) = obj.leaves.unwritten(span) else {
            return ByLeaves::Here;
        };
        let random = !follows && len <= LEAF_READ_MAX && !lock(&obj.ahead).continues(span.chunk);
        if let (true, Some(todo)) = (random, blob.chunk_leaves(span.chunk, todo)) {
            if let Some(taken) = obj.leaves.take(todo, blob.leaves_per_chunk()) {
                return ByLeaves::Leaves(LeafPlan {
                    spans: vec![todo],
                    _taken: taken,
                });
            }
        }
        // a sequential reader, or a random one past the quarter, in a chunk some of whose
        // leaves are here: the rest of the chunk's leaves (fetched whole, the chunk would
        // bring those twice); a chunk without any is fetched whole
        match rest_plan(obj, blob, span.chunk) {
            Some(plan) => ByLeaves::Leaves(plan),
            None => obj.leaves.wait_for(span.chunk).map_or(ByLeaves::Whole, ByLeaves::Wait),
        }
    }

    /// The leaves of `plan`, fetched side by side and verified, each in an aligned buffer
    /// (zeros past the blob's end) with the offset it is written at.
    pub(super) async fn leaves_bufs(
        &self,
        blob: &Arc<DataBlob>,
        plan: &LeafPlan<'_>,
    ) -> io::Result<Vec<(WriteBuf, u64)>> {
        let reads = plan.spans.iter().map(|&span| async move {
            let piece = self.engine.read_leaves(blob, span).await.map_err(io::Error::other)?;
            let buf = buffers::holding(&self.bufs, piece.bytes().map_err(io::Error::other)?)?;
            self.stats.leaf_reads.fetch_add(1, Relaxed);
            Ok::<_, io::Error>((buf, span.start))
        });
        futures::future::try_join_all(reads).await
    }

    /// Complete chunk `c` of `blob`, some of whose leaves are here, by the rest of its leaves
    /// (checked by its leaves): what the background fill does with such a chunk instead of
    /// fetching it whole. `Ok(false)`: nothing to do, or a READ is reading its leaves now.
    pub(super) async fn write_rest(&self, obj: &Arc<Object>, blob: &Arc<DataBlob>, c: u64) -> io::Result<bool> {
        let Some(plan) = rest_plan(obj, blob, c) else {
            return Ok(false);
        };
        let bufs = self.leaves_bufs(blob, &plan).await?;
        let o = Arc::clone(obj);
        let n = tokio::task::spawn_blocking(move || write_bufs(&o, &bufs))
            .await
            .map_err(io::Error::other)??;
        for &s in &plan.spans {
            obj.leaves.written(blob, s);
        }
        self.stats.bytes_written.fetch_add(n, Relaxed);
        Ok(true)
    }
}

/// Write `bufs` (each with its offset) through `obj`'s anonymous fd; the bytes written.
pub(super) fn write_bufs(obj: &Object, bufs: &[(WriteBuf, u64)]) -> io::Result<u64> {
    let mut n = 0;
    for (buf, at) in bufs {
        obj.fd.write_all_at(buf, *at)?;
        n += buf.as_slice().len() as u64;
    }
    Ok(n)
}

/// The rest of chunk `c` by leaves (`LeafBook::rest`), with the chunk taken. `None` if none
/// of its leaves is here (in the book, or on disk from an earlier run), none is missing, or a
/// leaf read of it is under way.
fn rest_plan<'a>(obj: &'a Object, blob: &DataBlob, c: u64) -> Option<LeafPlan<'a>> {
    if !obj.leaves.any_written(c) {
        leaves_on_disk(obj, blob, c);
    }
    let spans = obj.leaves.rest(blob, c)?;
    let taken = obj.leaves.take_chunk(c)?;
    Some(LeafPlan { spans, _taken: taken })
}

/// Whether some but not all of chunk `c`'s leaves are here: in the book, or (not yet entered
/// there) on disk from an earlier run, which are then entered. The fill and read-ahead ask
/// this before fetching a chunk whole, which would bring those leaves twice.
pub(super) fn some_leaves_here(obj: &Object, blob: &DataBlob, c: u64) -> bool {
    if obj.leaves.any_written(c) {
        return true;
    }
    if blob.leaves_per_chunk() == 0 || in_cache(obj, blob, c) {
        return false;
    }
    leaves_on_disk(obj, blob, c);
    obj.leaves.any_written(c)
}

/// Enter in the book the leaves of chunk `c` an earlier run wrote: the ranges of the cache
/// file that hold data (the kernel reads those without asking, as it reads whole chunks a
/// daemon wrote before a restart). One `lseek` when the chunk holds no data.
fn leaves_on_disk(obj: &Object, blob: &DataBlob, c: u64) {
    let r = blob.chunk_range(c);
    if !has_data(&obj.fd, r.start, r.end).unwrap_or(false) {
        return;
    }
    for span in (0..blob.leaves_in(c)).filter_map(|l| blob.chunk_leaves(c, l..l + 1)) {
        if is_data(&obj.fd, span.start, span.stop).unwrap_or(false) {
            obj.leaves.written(blob, span);
        }
    }
}
