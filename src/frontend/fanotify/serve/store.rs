//! Writing verified bytes into a blob's cache file (now, on a task of its own once per unit,
//! or by the run that fetched them: [`CacheLanding`]) and knowing which chunks are there:
//! whole units marked once written, a reader's part first, chunks found on disk from an
//! earlier run verified before they are trusted.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::{cache, CachedBlob, FanotifyFrontend, FanotifyStats, INLINE_WRITE_MAX};
use crate::engine::landing::Landing;
use crate::lock::lock;

/// Which of the frontend's counters chunks written for some purpose go to.
pub(super) type Counter = fn(&FanotifyStats) -> &AtomicU64;

/// A blob's cache file as the place where the engine's runs write their verified units
/// themselves (`engine::landing`), counted as written for the caller that started the runs.
pub(super) struct CacheLanding {
    front: Arc<FanotifyFrontend>,
    cached: Arc<CachedBlob>,
    via: Arc<File>,
    counter: Counter,
    /// Chunks landed here so far.
    landed: AtomicU64,
}

impl CacheLanding {
    /// Runs land into `cached`'s file through `via` (a non-notifying event fd).
    pub(super) fn new(
        front: &Arc<FanotifyFrontend>,
        cached: &Arc<CachedBlob>,
        via: &Arc<File>,
        counter: Counter,
    ) -> Arc<CacheLanding> {
        Arc::new(CacheLanding {
            front: Arc::clone(front),
            cached: Arc::clone(cached),
            via: Arc::clone(via),
            counter,
            landed: AtomicU64::new(0),
        })
    }

    /// Chunks the runs have landed here so far (all of theirs, once their units are awaited).
    pub(super) fn landed(&self) -> u64 {
        self.landed.load(Relaxed)
    }

    /// `n` chunks landed.
    fn count(&self, n: u64) {
        (self.counter)(&self.front.stats).fetch_add(n, Relaxed);
        self.landed.fetch_add(n, Relaxed);
    }
}

impl Landing for CacheLanding {
    fn land(&self, at: u64, data: &[u8]) -> io::Result<()> {
        let n = write_now(&self.cached, data, at, &self.via, Mark::Now)?;
        self.count(n);
        Ok(())
    }

    fn place(&self, at: u64, data: &[u8]) -> io::Result<()> {
        write_now(&self.cached, data, at, &self.via, Mark::Later)?;
        self.front.stats.pieces_placed.fetch_add(1, Relaxed);
        Ok(())
    }

    fn seal(&self, at: u64, len: u64) -> io::Result<()> {
        let c = &self.cached;
        let _one_writer = lock(&c.write_lock);
        if !c.all_marked(at, len) {
            self.count(record(c, at, len));
        }
        Ok(())
    }
}

/// When bytes written are recorded as cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    /// With the write (whole units; skipped if every chunk is cached already).
    Now,
    /// Not by this write (a reader's part, leaves, a piece of a unit not complete).
    Later,
}

/// Write verified bytes at `at` through `via`, one writer per file at a time; see
/// [`FanotifyFrontend::write`] for `mark` and what is returned.
fn write_now(c: &CachedBlob, data: &[u8], at: u64, via: &File, mark: Mark) -> io::Result<u64> {
    let len = data.len() as u64;
    let _one_writer = lock(&c.write_lock);
    if mark == Mark::Now && c.all_marked(at, len) {
        return Ok(0);
    }
    via.write_all_at(data, at)?;
    Ok(match mark {
        Mark::Now => record(c, at, len),
        Mark::Later => 0,
    })
}

/// Record the whole chunks `[at, at + len)` covers as cached (under the one-writer lock);
/// how many.
fn record(c: &CachedBlob, at: u64, len: u64) -> u64 {
    let unit = c.blob.table_chunk;
    let (c0, n) = (at / unit, len.div_ceil(unit));
    lock(&c.verified).extend(c0..c0 + n);
    n
}

impl FanotifyFrontend {
    /// Write a verified piece unless every one of its chunks is cached already, and mark
    /// them; returns chunks written. A unit may span several table chunks of which only some
    /// are on disk (a reader's part written first, a crash between writes): one missing
    /// chunk is enough to write the whole piece.
    pub(super) async fn store(
        &self,
        cached: &Arc<CachedBlob>,
        piece: crate::engine::Piece,
        via: Arc<File>,
    ) -> io::Result<u64> {
        if cached.all_marked(piece.offset, piece.body.len()) {
            self.engine.stored(&piece);
            return Ok(0); // written by another reader of the same unit
        }
        let data = piece.bytes().map_err(io::Error::other)?.clone();
        let n = self.write(cached, data, piece.offset, via, Mark::Now).await;
        match n {
            Ok(_) => self.engine.stored(&piece),
            // no one else writes it: its share of the budget is free, its bytes kept a while
            Err(_) => piece.let_go(),
        }
        n
    }

    /// Write the verified part of a unit that a reader waits for. A small part (a random
    /// read's few pages) is written from this task: a page-cache write of that size costs less
    /// than the trip to the blocking pool and back. No lock: a concurrent writer of the same
    /// range writes the same verified bytes.
    pub(super) async fn write_urgent(
        &self,
        cached: &Arc<CachedBlob>,
        part: bytes::Bytes,
        at: u64,
        via: Arc<File>,
    ) -> io::Result<()> {
        if part.len() <= INLINE_WRITE_MAX {
            return via.write_all_at(&part, at);
        }
        self.write(cached, part, at, via, Mark::Later).await.map(|_| ())
    }

    /// Write verified bytes at `at` through `via` (a non-notifying event fd), on the blocking
    /// pool so the event loop keeps dispatching, one writer per file at a time (writers sleep
    /// instead of spinning on the inode lock). With [`Mark::Now`], `data` is whole chunks:
    /// skipped if they are cached already, else marked once written; returns chunks written.
    /// With [`Mark::Later`], `data` is part of a chunk, which stays unmarked until the whole of
    /// it is written.
    pub(super) async fn write(
        &self,
        cached: &Arc<CachedBlob>,
        data: bytes::Bytes,
        at: u64,
        via: Arc<File>,
        mark: Mark,
    ) -> io::Result<u64> {
        let c = Arc::clone(cached);
        tokio::task::spawn_blocking(move || write_now(&c, &data, at, &via, mark))
            .await
            .map_err(io::Error::other)?
    }

    /// Whether chunk `c` is cached and verified: known from this run, or found on disk and
    /// matching the table (then remembered). `file` is a non-notifying event fd.
    pub(super) fn present(&self, cached: &CachedBlob, file: &File, c: u64) -> io::Result<bool> {
        if lock(&cached.verified).contains(&c) {
            return Ok(true);
        }
        let r = cached.blob.chunk_range(c);
        if cache::is_data(file, r.start, r.end)? && self.verify_on_disk(cached, file, c, r.start, r.end)? {
            self.stats.chunks_present.fetch_add(1, Relaxed);
            lock(&cached.verified).insert(c);
            return Ok(true);
        }
        Ok(false)
    }

    /// A chunk found on disk (from an earlier run) is trusted only if it matches the table.
    /// Read through the event fd, which raises no further events.
    pub(super) fn verify_on_disk(&self, cached: &CachedBlob, file: &File, c: u64, s: u64, e: u64) -> io::Result<bool> {
        let mut buf = vec![0u8; (e - s) as usize];
        file.read_exact_at(&mut buf, s)?;
        let ok = cached.blob.verify(s, &buf).is_ok();
        if !ok {
            tracing::warn!(path = %cached.path.display(), chunk = c, "cached chunk does not match its digest: fetching it again");
        }
        Ok(ok)
    }

    /// On its own task: await `piece` (the unit at `offset`), store it, count its chunks in
    /// `counter`; nothing if a store of that unit is pending already. A failure costs nothing
    /// but a later fetch: the chunk stays unmarked.
    pub(super) fn store_later<F>(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        via: &Arc<File>,
        offset: u64,
        piece: F,
        counter: Counter,
    ) where
        F: std::future::Future<Output = io::Result<crate::engine::Piece>> + Send + 'static,
    {
        if !lock(&cached.storing).insert(offset) {
            return;
        }
        let (me, cached, via) = (Arc::clone(self), Arc::clone(cached), Arc::clone(via));
        tokio::spawn(async move {
            let _pending = Unmark(&cached.storing, offset);
            let piece = match piece.await {
                Ok(p) => p,
                Err(e) => return tracing::debug!(error = %e, "read-ahead failed (the reader will fetch on demand)"),
            };
            match me.store(&cached, piece, via).await {
                Ok(n) => {
                    counter(&me.stats).fetch_add(n, Relaxed);
                    me.unmark_if_complete(&cached);
                }
                Err(e) => tracing::warn!(error = %e, "writing a fetched chunk failed (it is fetched again when read)"),
            }
        });
    }
}

/// Takes a unit's offset out of a blob's `storing` set when its store ends, however it ends.
struct Unmark<'a>(&'a Mutex<HashSet<u64>>, u64);

impl Drop for Unmark<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}
