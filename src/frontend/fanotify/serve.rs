//! The fanotify frontend's event loop: every `FAN_PRE_ACCESS` event names a range of a data
//! blob's sparse cache file; missing chunks are fetched through the blob engine (verified),
//! written through the event's fd, and the read is allowed. A failed fetch denies the read
//! with `EIO`: a reader never gets a hole's zeros.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::fanotify::Fanotify;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tracing::Instrument;

use super::event::{self, FAN_PRE_ACCESS};
use super::{cache, sys};
use crate::catalog::Image;
use crate::engine::chunks::{consecutive, ChunkGeometry};
use crate::engine::{DataBlob, Engine};
use crate::lock::lock;

/// Largest part of a unit a reader waits for that is written without the blocking pool.
const INLINE_WRITE_MAX: usize = 128 << 10;

/// Counters exported in `status`.
#[derive(Debug, Default, Serialize)]
pub struct FanotifyStats {
    pub events: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub chunks_filled: AtomicU64,
    pub chunks_prefetched: AtomicU64,
    pub chunks_present: AtomicU64,
    /// Chunks fetched by the background fill of idle blobs.
    pub chunks_background: AtomicU64,
    /// Blobs complete on disk (their events are off).
    pub blobs_complete: AtomicU64,
    pub bad_events: AtomicU64,
}

/// A data blob's cache file and which of its chunks were verified in this run.
struct CachedBlob {
    blob: Arc<DataBlob>,
    path: PathBuf,
    verified: Mutex<HashSet<u64>>,
    /// A duplicate of an event fd for read-ahead writes. Pre-content events fire on writes
    /// too, so a marked file is only ever written through an event fd's file description,
    /// which the kernel opened without notifications.
    writer: Mutex<Option<Arc<File>>>,
    /// Read-ahead state of sequential readers.
    ahead: Mutex<Ahead>,
    /// Held while writing into the cache file.
    write_lock: Mutex<()>,
    /// When a reader last missed (the background fill waits for a quiet blob).
    last_miss: Mutex<Instant>,
    /// A background fill task runs for this blob.
    filling: AtomicBool,
    /// Every chunk is on disk and the mark is gone.
    complete: AtomicBool,
}

/// Read-ahead state: the last chunk a reader missed, the window (0: not sequential), and the
/// chunk the scheduled read-ahead reaches (exclusive).
#[derive(Debug, Default)]
struct Ahead {
    last_miss: Option<u64>,
    window: u64,
    until: u64,
}

impl CachedBlob {
    /// The chunks (of the table's size) overlapping `range`, clamped to the blob; the whole
    /// blob when the event names no range.
    fn chunks(&self, range: Option<(u64, u64)>) -> std::ops::Range<u64> {
        let (size, unit) = (self.blob.source.size, self.blob.table_chunk);
        let (off, count) = range.unwrap_or((0, size));
        ChunkGeometry::new(unit, unit, size).chunks_for(off, count)
    }

    /// Chunks (of the table's size) in the blob.
    fn n_chunks(&self) -> u64 {
        self.blob.source.size.div_ceil(self.blob.table_chunk)
    }

    /// Whether every table chunk overlapping `[at, at + len)` is verified in the cache.
    fn all_marked(&self, at: u64, len: u64) -> bool {
        let chunks = self.chunks(Some((at, len)));
        let v = lock(&self.verified);
        chunks.into_iter().all(|c| v.contains(&c))
    }
}

/// The fanotify frontend.
pub struct FanotifyFrontend {
    fan: AsyncFd<Fanotify>,
    engine: Arc<Engine>,
    cache_dir: PathBuf,
    /// (dev, ino) of a cache file -> its blob.
    files: Mutex<HashMap<(u64, u64), Arc<CachedBlob>>>,
    /// Largest read-ahead window in bytes (0: no read-ahead).
    read_ahead_max: u64,
    /// Quiet time after which a blob in use is fetched to the end (None: never).
    fill_after: Option<Duration>,
    /// One background fill request at a time, daemon-wide: readers come first.
    fill_slot: tokio::sync::Semaphore,
    /// Metadata blobs of mounted images, locked in memory (None: not pinned).
    pinned: Option<Mutex<HashMap<PathBuf, super::pin::Pinned>>>,
    /// Signalled each time a blob becomes complete.
    completions: tokio::sync::Notify,
    pub stats: FanotifyStats,
}

impl FanotifyFrontend {
    /// Create a pre-content group (or adopt one handed over by the guard).
    pub fn new(
        cache_dir: &Path,
        engine: Arc<Engine>,
        group: Option<Fanotify>,
        read_ahead_max: u64,
        fill_after: Option<Duration>,
        pin_metadata: bool,
    ) -> io::Result<Arc<FanotifyFrontend>> {
        let fan = match group {
            Some(g) => g,
            None => sys::init().map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("fanotify_init(FAN_CLASS_PRE_CONTENT): {e} (needs Linux 6.14+ with CONFIG_FANOTIFY_ACCESS_PERMISSIONS, and root)"),
                )
            })?,
        };
        Ok(Arc::new(FanotifyFrontend {
            fan: sys::into_async(fan)?,
            engine,
            cache_dir: cache_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            read_ahead_max,
            fill_after,
            fill_slot: tokio::sync::Semaphore::new(1),
            pinned: pin_metadata.then(|| Mutex::new(HashMap::new())),
            completions: tokio::sync::Notify::new(),
            stats: FanotifyStats::default(),
        }))
    }

    /// The group fd (for the guard that keeps it alive if the daemon dies).
    pub fn group(&self) -> &Fanotify {
        self.fan.get_ref()
    }

    /// Create the sparse cache files of an image's data blobs and mark them; returns the
    /// `device=` paths in device order.
    pub fn prepare(&self, image: &Image) -> io::Result<Vec<PathBuf>> {
        if let Some(pinned) = &self.pinned {
            let mut pinned = lock(pinned);
            if !pinned.contains_key(&image.meta_path) {
                // best effort: an image whose metadata cannot be locked still mounts
                match super::pin::Pinned::new(&image.meta_path) {
                    Ok(Some(p)) => {
                        tracing::debug!(path = %image.meta_path.display(), bytes = p.len(), "metadata blob pinned");
                        pinned.insert(image.meta_path.clone(), p);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "metadata blob not pinned in memory"),
                }
            }
        }
        let mut paths = Vec::with_capacity(image.data.len());
        for blob in &image.data {
            let path = cache::blob_path(&self.cache_dir, blob.key());
            let f = cache::ensure_file(&path, blob.source.size)?;
            let md = f.metadata()?;
            sys::mark_pre_access(self.fan.get_ref(), &path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("fanotify_mark(FAN_PRE_ACCESS) on {}: {e}", path.display()),
                )
            })?;
            lock(&self.files).entry((md.dev(), md.ino())).or_insert_with(|| {
                Arc::new(CachedBlob {
                    blob: Arc::clone(blob),
                    path: path.clone(),
                    verified: Mutex::new(HashSet::new()),
                    writer: Mutex::new(None),
                    ahead: Mutex::new(Ahead::default()),
                    write_lock: Mutex::new(()),
                    last_miss: Mutex::new(Instant::now()),
                    filling: AtomicBool::new(false),
                    complete: AtomicBool::new(false),
                })
            });
            paths.push(path);
        }
        Ok(paths)
    }

    /// Unlock the metadata blobs of images not in `in_use` (after unmounts).
    pub fn unpin_except(&self, in_use: &[PathBuf]) {
        if let Some(pinned) = &self.pinned {
            lock(pinned).retain(|p, _| in_use.contains(p));
        }
    }

    /// Bytes of metadata locked in memory.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned
            .as_ref()
            .map_or(0, |p| lock(p).values().map(|x| x.len() as u64).sum())
    }

    /// Wait until some blob becomes complete (a completion while nobody waits is kept for
    /// the next call).
    pub async fn blob_completed(&self) {
        self.completions.notified().await
    }

    /// Whether every data blob of `image` is complete in the cache (its events are off).
    pub fn image_complete(&self, image: &Image) -> bool {
        let files = lock(&self.files);
        image.data.iter().all(|blob| {
            files
                .values()
                .any(|c| c.blob.key() == blob.key() && c.complete.load(Relaxed))
        })
    }

    /// Cache files currently served.
    pub fn served_paths(&self) -> Vec<PathBuf> {
        lock(&self.files).values().map(|c| c.path.clone()).collect()
    }

    /// Serve events until `shutdown` fires.
    pub async fn run(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        crate::frontend::drain_loop(&self.fan, &mut buf, shutdown, sys::read_events, |raw| {
            self.dispatch(raw)
        })
        .await
    }

    fn dispatch(self: &Arc<Self>, raw: &[u8]) {
        let (events, err) = event::parse(raw);
        if let Some(e) = err {
            self.stats.bad_events.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "malformed fanotify event buffer");
        }
        for ev in events {
            self.stats.events.fetch_add(1, Relaxed);
            let Some(fd) = sys::adopt_event_fd(ev.fd) else {
                tracing::warn!(mask = ev.mask, "fanotify event without fd (queue overflow?)");
                continue;
            };
            let file = File::from(fd);
            let cached = self.cached(&file);
            if ev.mask & FAN_PRE_ACCESS != 0 && self.all_verified(cached.as_ref(), ev.range) {
                // fast path: everything asked for is already in the cache and verified
                if let Err(e) = sys::respond(self.fan.get_ref().as_fd(), file.as_fd(), sys::FAN_ALLOW) {
                    tracing::error!(error = %e, "fanotify response failed");
                }
                self.stats.allowed.fetch_add(1, Relaxed);
                continue;
            }
            let me = Arc::clone(self);
            let span = tracing::info_span!("pre_access", pid = ev.pid, range = ?ev.range);
            tokio::spawn(async move { me.handle(ev, file, cached).await }.instrument(span));
        }
    }

    /// Once every chunk of a blob is present and verified, stop its events: reads of its
    /// cache file then cost what a local file costs.
    fn unmark_if_complete(&self, cached: &CachedBlob) {
        let n = cached.n_chunks() as usize;
        if lock(&cached.verified).len() >= n && !cached.complete.swap(true, Relaxed) {
            self.stats.blobs_complete.fetch_add(1, Relaxed);
            self.completions.notify_one();
            match sys::unmark(self.fan.get_ref(), &cached.path) {
                Ok(()) => tracing::info!(path = %cached.path.display(), "blob complete: pre-content events off"),
                Err(e) => tracing::debug!(error = %e, "unmark failed"),
            }
        }
    }

    /// Once a blob in use has been quiet for `fill_after`, fetch what it still misses, one
    /// merged run at a time, pausing whenever a reader misses; when it is complete its
    /// events stop, so reads of it cost what a local file costs.
    fn start_background_fill(self: &Arc<Self>, cached: &Arc<CachedBlob>) {
        let Some(quiet) = self.fill_after else {
            return;
        };
        if cached.complete.load(Relaxed) || cached.filling.swap(true, Relaxed) {
            return;
        }
        let (me, cached) = (Arc::clone(self), Arc::clone(cached));
        let span = tracing::info_span!("background_fill", blob = %cached.blob.source.digest);
        tokio::spawn(
            async move {
                let unit = cached.blob.table_chunk;
                let per_run = (me.engine.merge_max() / unit).max(1);
                let n_chunks = cached.n_chunks();
                let (mut failures, mut cursor) = (0u32, 0u64);
                loop {
                    let idle = lock(&cached.last_miss).elapsed();
                    if idle < quiet {
                        tokio::time::sleep(quiet - idle).await;
                        continue;
                    }
                    let Ok(slot) = me.fill_slot.acquire().await else {
                        break;
                    };
                    let Some(via) = lock(&cached.writer).clone() else {
                        break;
                    };
                    // the next run of chunks neither verified nor on disk from an earlier run
                    let mut run: Option<std::ops::Range<u64>> = None;
                    while cursor < n_chunks && run.as_ref().is_none_or(|r| r.end - r.start < per_run) {
                        match me.present(&cached, &via, cursor) {
                            Ok(true) if run.is_none() => {}
                            Ok(true) => break,
                            Ok(false) => run.get_or_insert(cursor..cursor).end = cursor + 1,
                            Err(e) => {
                                tracing::warn!(error = %e, "background fill: cache file unreadable");
                                break;
                            }
                        }
                        cursor += 1;
                    }
                    let Some(run) = run else {
                        break;
                    };
                    let (s, e) = (run.start * unit, (run.end * unit).min(cached.blob.source.size));
                    let fetched = me.fetch_and_store(&cached, s, e, via, None).await;
                    drop(slot); // not held while backing off: other blobs may fill meanwhile
                    match fetched {
                        Ok(n) => {
                            failures = 0;
                            me.stats.chunks_background.fetch_add(n, Relaxed);
                        }
                        Err(err) => {
                            failures += 1;
                            cursor = run.start;
                            tracing::warn!(error = %err, failures, "background fill failed; readers still fetch on demand");
                            if failures >= 5 {
                                break;
                            }
                            tokio::time::sleep(quiet * failures).await;
                        }
                    }
                }
                me.unmark_if_complete(&cached);
                cached.filling.store(false, Relaxed);
            }
            .instrument(span),
        );
    }

    /// Fetch `[s, e)` of a blob and write each unit as soon as it is verified; returns
    /// chunks written. A unit that `urgent` (a reader's range) covers only in part gets that
    /// part written first and the whole unit written in the background, so a small random
    /// read waits for its own bytes only, not for a whole chunk to reach the page cache.
    async fn fetch_and_store(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        s: u64,
        e: u64,
        via: Arc<File>,
        urgent: Option<(u64, u64)>,
    ) -> io::Result<u64> {
        let pending = self
            .engine
            .fetch(&cached.blob, s, e - s)
            .map_err(|err| io::Error::other(err.to_string()))?;
        let mut written = 0;
        for p in pending {
            let piece = p
                .wait(&self.engine)
                .await
                .map_err(|err| io::Error::other(err.to_string()))?;
            let (ps, pe) = (piece.offset, piece.offset + piece.data.len() as u64);
            match urgent {
                Some((us, ue)) if us.max(ps) < ue.min(pe) && (us > ps || ue < pe) => {
                    let (a, b) = (us.max(ps), ue.min(pe));
                    let part = piece.data.slice((a - ps) as usize..(b - ps) as usize);
                    self.write_urgent(cached, part, a, Arc::clone(&via)).await?;
                    self.store_later(cached, &via, async { Ok(piece) }, |s| &s.chunks_filled);
                }
                _ => written += self.store(cached, piece, Arc::clone(&via)).await?,
            }
        }
        Ok(written)
    }

    fn cached(&self, file: &File) -> Option<Arc<CachedBlob>> {
        let md = file.metadata().ok()?;
        lock(&self.files).get(&(md.dev(), md.ino())).cloned()
    }

    /// Whether everything `range` asks for is cached and verified; if so, keep a sequential
    /// reader's read-ahead going.
    fn all_verified(self: &Arc<Self>, cached: Option<&Arc<CachedBlob>>, range: Option<(u64, u64)>) -> bool {
        let Some(cached) = cached else {
            return false;
        };
        let chunks = cached.chunks(range);
        let ok = {
            let v = lock(&cached.verified);
            chunks.clone().all(|c| v.contains(&c))
        };
        if ok && !chunks.is_empty() {
            self.advance_read_ahead(cached, chunks.end - 1);
        }
        ok
    }

    /// Sequential readers: after a miss right behind the previous one, fetch the next chunks
    /// in the background with a window that doubles up to the maximum.
    fn read_ahead(self: &Arc<Self>, cached: &Arc<CachedBlob>, first_missing: u64, last_missing: u64) {
        if self.read_ahead_max == 0 {
            return;
        }
        let max = (self.read_ahead_max / cached.blob.table_chunk).max(2);
        let (from, to) = {
            let mut a = lock(&cached.ahead);
            let sequential = first_missing > 0 && a.last_miss.is_some_and(|l| first_missing <= l.max(a.until) + 1);
            a.window = if sequential { (a.window * 2).clamp(2, max) } else { 0 };
            a.last_miss = Some(last_missing);
            if a.window == 0 {
                return;
            }
            a.until = last_missing + 1 + a.window;
            (last_missing + 1, a.until)
        };
        self.prefetch(cached, from, to);
    }

    /// A reader inside the prefetched window: once it passes the middle, schedule the next
    /// window, so a sequential reader never waits for a cold chunk (the fast path calls this).
    fn advance_read_ahead(self: &Arc<Self>, cached: &Arc<CachedBlob>, last_chunk: u64) {
        let (from, to) = {
            let mut a = lock(&cached.ahead);
            if a.window == 0 || last_chunk + a.window / 2 < a.until {
                return;
            }
            let from = a.until;
            a.until += a.window;
            (from, a.until)
        };
        self.prefetch(cached, from, to);
    }

    /// Fetch chunks `[from, to)` that are not cached yet and write them with our own handle;
    /// one task per merged range, so each is written as soon as it arrives.
    fn prefetch(self: &Arc<Self>, cached: &Arc<CachedBlob>, from: u64, to: u64) {
        let unit = cached.blob.table_chunk;
        let n_chunks = cached.n_chunks();
        let todo: Vec<u64> = {
            let v = lock(&cached.verified);
            (from..to.min(n_chunks)).filter(|c| !v.contains(c)).collect()
        };
        let Some(via) = lock(&cached.writer).clone() else {
            return;
        };
        for run in consecutive(&todo, u64::MAX) {
            let s = run.start * unit;
            let e = (run.end * unit).min(cached.blob.source.size);
            let pending = match self.engine.fetch(&cached.blob, s, e - s) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "read-ahead not started");
                    return;
                }
            };
            // one task per unit: each is written the moment it is verified
            for p in pending {
                let engine = Arc::clone(&self.engine);
                let piece = async move { p.wait(&engine).await.map_err(|e| io::Error::other(e.to_string())) };
                self.store_later(cached, &via, piece, |s| &s.chunks_prefetched);
            }
        }
    }

    /// On its own task: await `piece`, store it, count its chunks in `counter`. A failure
    /// costs nothing but a later fetch: the chunk stays unmarked.
    fn store_later<F>(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        via: &Arc<File>,
        piece: F,
        counter: fn(&FanotifyStats) -> &AtomicU64,
    ) where
        F: std::future::Future<Output = io::Result<crate::engine::Piece>> + Send + 'static,
    {
        let (me, cached, via) = (Arc::clone(self), Arc::clone(cached), Arc::clone(via));
        tokio::spawn(async move {
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

    async fn handle(self: Arc<Self>, ev: event::Event, file: File, cached: Option<Arc<CachedBlob>>) {
        let t0 = Instant::now();
        let result = if ev.mask & FAN_PRE_ACCESS != 0 {
            self.fill(&file, cached, ev.range).await
        } else {
            Ok(0)
        };
        let response = match &result {
            Ok(_) => sys::FAN_ALLOW,
            Err(_) => sys::deny_with(libc::EIO),
        };
        if let Err(e) = sys::respond(self.fan.get_ref().as_fd(), file.as_fd(), response) {
            tracing::error!(error = %e, "fanotify response failed");
        }
        match result {
            Ok(filled) => {
                self.stats.allowed.fetch_add(1, Relaxed);
                tracing::debug!(latency_us = t0.elapsed().as_micros() as u64, filled, "allowed");
            }
            Err(e) => {
                self.stats.denied.fetch_add(1, Relaxed);
                tracing::warn!(latency_us = t0.elapsed().as_micros() as u64, error = %e, "read denied with EIO");
            }
        }
        // `file` (the event fd) is closed here, after the response.
    }

    /// Make `range` of the event's file present and verified; returns chunks written.
    async fn fill(
        self: &Arc<Self>,
        file: &File,
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
        let mut missing = Vec::new();
        for c in cached.chunks(range) {
            if !self.present(&cached, file, c)? {
                missing.push(c);
            }
        }
        let mut written = 0;
        if !missing.is_empty() {
            *lock(&cached.last_miss) = Instant::now();
            let via = Arc::new(file.try_clone()?);
            lock(&cached.writer).get_or_insert_with(|| Arc::clone(&via));
            let urgent = range.map(|(o, n)| (o, o.saturating_add(n)));
            for run in consecutive(&missing, u64::MAX) {
                let (s, e) = (run.start * unit, (run.end * unit).min(size));
                written += self.fetch_and_store(&cached, s, e, Arc::clone(&via), urgent).await?;
            }
            self.start_background_fill(&cached);
        }
        self.stats.chunks_filled.fetch_add(written, Relaxed);
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

    /// Write a verified piece unless every one of its chunks is cached already, and mark
    /// them; returns chunks written. A unit may span several table chunks of which only some
    /// are on disk (a reader's part written first, a crash between writes): one missing
    /// chunk is enough to write the whole piece.
    async fn store(&self, cached: &Arc<CachedBlob>, piece: crate::engine::Piece, via: Arc<File>) -> io::Result<u64> {
        if cached.all_marked(piece.offset, piece.data.len() as u64) {
            return Ok(0); // written by another reader of the same unit
        }
        self.write(cached, piece.data, piece.offset, via, true).await
    }

    /// Write the verified part of a unit that a reader waits for. A small part (a random
    /// read's few pages) is written from this task: a page-cache write of that size costs less
    /// than the trip to the blocking pool and back. No lock: a concurrent writer of the same
    /// range writes the same verified bytes.
    async fn write_urgent(
        &self,
        cached: &Arc<CachedBlob>,
        part: bytes::Bytes,
        at: u64,
        via: Arc<File>,
    ) -> io::Result<()> {
        if part.len() <= INLINE_WRITE_MAX {
            return via.write_all_at(&part, at);
        }
        self.write(cached, part, at, via, false).await.map(|_| ())
    }

    /// Write verified bytes at `at` through `via` (a non-notifying event fd), on the blocking
    /// pool so the event loop keeps dispatching, one writer per file at a time (writers sleep
    /// instead of spinning on the inode lock). With `mark`, `data` is whole chunks: skipped if
    /// they are cached already, else marked once written; returns chunks written. Without,
    /// `data` is part of a chunk, which stays unmarked until the whole of it is written.
    async fn write(
        &self,
        cached: &Arc<CachedBlob>,
        data: bytes::Bytes,
        at: u64,
        via: Arc<File>,
        mark: bool,
    ) -> io::Result<u64> {
        let c = Arc::clone(cached);
        tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let unit = c.blob.table_chunk;
            let c0 = at / unit;
            let _one_writer = lock(&c.write_lock);
            if mark && c.all_marked(at, data.len() as u64) {
                return Ok(0);
            }
            via.write_all_at(&data, at)?;
            if !mark {
                return Ok(0);
            }
            let n = (data.len() as u64).div_ceil(unit);
            lock(&c.verified).extend(c0..c0 + n);
            Ok(n)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Whether chunk `c` is cached and verified: known from this run, or found on disk and
    /// matching the table (then remembered). `file` is a non-notifying event fd.
    fn present(&self, cached: &CachedBlob, file: &File, c: u64) -> io::Result<bool> {
        if lock(&cached.verified).contains(&c) {
            return Ok(true);
        }
        let unit = cached.blob.table_chunk;
        let (s, e) = (c * unit, ((c + 1) * unit).min(cached.blob.source.size));
        if cache::is_data(file, s, e)? && self.verify_on_disk(cached, file, c, s, e)? {
            self.stats.chunks_present.fetch_add(1, Relaxed);
            lock(&cached.verified).insert(c);
            return Ok(true);
        }
        Ok(false)
    }

    /// A chunk found on disk (from an earlier run) is trusted only if it matches the table.
    /// Read through the event fd, which raises no further events.
    fn verify_on_disk(&self, cached: &CachedBlob, file: &File, c: u64, s: u64, e: u64) -> io::Result<bool> {
        let mut buf = vec![0u8; (e - s) as usize];
        file.read_exact_at(&mut buf, s)?;
        let ok = cached.blob.verify(s, &buf).is_ok();
        if !ok {
            tracing::warn!(path = %cached.path.display(), chunk = c, "cached chunk does not match its digest: fetching it again");
        }
        Ok(ok)
    }
}
