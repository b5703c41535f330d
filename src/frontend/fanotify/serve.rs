//! The fanotify frontend's event loop: every `FAN_PRE_ACCESS` event names a range of a data
//! blob's sparse cache file; missing chunks are fetched through the blob engine (verified),
//! written through the event's fd, and the read is allowed. A failed fetch denies the read
//! with `EIO`: a reader never gets a hole's zeros. Writing into cache files lives in `store`,
//! read-ahead and the background fill in `ahead`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
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
use crate::frontend::admission::Admission;
use crate::lock::lock;
use ahead::Ahead;

mod ahead;
mod store;

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
    /// Offsets of the units a background store is pending for (one per unit, however many
    /// readers fetched it).
    storing: Mutex<HashSet<u64>>,
    /// When a reader last missed (the background fill waits for a quiet blob).
    last_miss: Mutex<Instant>,
    /// A background fill task runs for this blob.
    filling: AtomicBool,
    /// Every chunk is on disk and the mark is gone.
    complete: AtomicBool,
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
    /// Slots of events being served.
    admission: Admission,
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
        admission: Admission,
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
            admission,
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
                    storing: Mutex::new(HashSet::new()),
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
        let admission = self.admission.clone();
        // a buffer for about as many events as there are free slots (a pre-access event with
        // its range is 48 bytes; never less than 512, so one event always fits)
        let read = |fan: &Fanotify, b: &mut [u8], room: usize| {
            let len = room.saturating_mul(48).clamp(512, b.len());
            sys::read_events(fan, &mut b[..len])
        };
        crate::frontend::drain_loop(&self.fan, &mut buf, &admission, shutdown, read, |raw| {
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
            let ticket = self.admission.admit();
            tokio::spawn(
                async move {
                    let _slot = ticket.enter().await;
                    me.handle(ev, Arc::new(file), cached).await
                }
                .instrument(span),
            );
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
                    self.store_later(cached, &via, ps, async { Ok(piece) }, |s| &s.chunks_filled);
                }
                _ => written += self.store(cached, piece, Arc::clone(&via)).await?,
            }
        }
        Ok(written)
    }

    /// The chunks of `range` not yet verified in the cache. Those unknown to this run are
    /// looked for on disk and hashed if there, on the blocking pool.
    async fn missing(
        self: &Arc<Self>,
        cached: &Arc<CachedBlob>,
        file: &Arc<File>,
        range: Option<(u64, u64)>,
    ) -> io::Result<Vec<u64>> {
        let unknown: Vec<u64> = {
            let v = lock(&cached.verified);
            cached.chunks(range).filter(|c| !v.contains(c)).collect()
        };
        if unknown.is_empty() {
            return Ok(unknown);
        }
        let (me, cached, file) = (Arc::clone(self), Arc::clone(cached), Arc::clone(file));
        tokio::task::spawn_blocking(move || {
            let mut missing = Vec::with_capacity(unknown.len());
            for c in unknown {
                if !me.present(&cached, &file, c)? {
                    missing.push(c);
                }
            }
            Ok(missing)
        })
        .await
        .map_err(io::Error::other)?
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

    async fn handle(self: &Arc<Self>, ev: event::Event, file: Arc<File>, cached: Option<Arc<CachedBlob>>) {
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
        file: &Arc<File>,
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
        let missing = self.missing(&cached, file, range).await?;
        let mut written = 0;
        if !missing.is_empty() {
            *lock(&cached.last_miss) = Instant::now();
            // one writer per blob, kept: an event costs no fd beyond its own
            let via = {
                let mut w = lock(&cached.writer);
                match &*w {
                    Some(v) => Arc::clone(v),
                    None => Arc::clone(w.insert(Arc::new(file.try_clone()?))),
                }
            };
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
}
