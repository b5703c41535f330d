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
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::fanotify::Fanotify;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::unix::AsyncFd;
use tracing::Instrument;

use super::event::{self, FAN_PRE_ACCESS};
use super::{cache, sys};
use crate::catalog::Image;
use crate::engine::{DataBlob, Engine};

/// Counters exported in `status`.
#[derive(Debug, Default, Serialize)]
pub struct FanotifyStats {
    pub events: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub chunks_filled: AtomicU64,
    pub chunks_present: AtomicU64,
    pub bad_events: AtomicU64,
}

/// A data blob's cache file and which of its chunks were verified in this run.
struct CachedBlob {
    blob: Arc<DataBlob>,
    path: PathBuf,
    verified: Mutex<HashSet<u64>>,
}

/// The fanotify frontend.
pub struct FanotifyFrontend {
    fan: AsyncFd<Fanotify>,
    engine: Arc<Engine>,
    cache_dir: PathBuf,
    /// (dev, ino) of a cache file -> its blob.
    files: Mutex<HashMap<(u64, u64), Arc<CachedBlob>>>,
    pub stats: FanotifyStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FanotifyFrontend {
    /// Create a pre-content group (or adopt one handed over by the guard).
    pub fn new(cache_dir: &Path, engine: Arc<Engine>, group: Option<Fanotify>) -> io::Result<Arc<FanotifyFrontend>> {
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
        let mut paths = Vec::with_capacity(image.data.len());
        for blob in &image.data {
            let path = cache::blob_path(&self.cache_dir, &blob.source.digest);
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
                })
            });
            paths.push(path);
        }
        Ok(paths)
    }

    /// Cache files currently served.
    pub fn served_paths(&self) -> Vec<PathBuf> {
        lock(&self.files).values().map(|c| c.path.clone()).collect()
    }

    /// Serve events until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = tokio::select! {
                g = self.fan.readable() => g?,
                _ = shutdown.changed() => return Ok(()),
            };
            loop {
                match sys::read_events(self.fan.get_ref(), &mut buf) {
                    Ok(0) => {
                        guard.clear_ready();
                        break;
                    }
                    Ok(n) => self.dispatch(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
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
            let me = Arc::clone(self);
            let span = tracing::info_span!("pre_access", pid = ev.pid, range = ?ev.range);
            tokio::spawn(async move { me.handle(ev, File::from(fd)).await }.instrument(span));
        }
    }

    async fn handle(self: Arc<Self>, ev: event::Event, file: File) {
        let t0 = Instant::now();
        let result = if ev.mask & FAN_PRE_ACCESS != 0 {
            self.fill(&file, ev.range).await
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
    async fn fill(&self, file: &File, range: Option<(u64, u64)>) -> io::Result<u64> {
        let md = file.metadata()?;
        let Some(cached) = lock(&self.files).get(&(md.dev(), md.ino())).cloned() else {
            // a marked file we do not know: never let a hole be read as zeros
            return Err(io::Error::other(
                "pre-content event for a file this daemon does not serve",
            ));
        };
        let size = cached.blob.source.size;
        let (off, count) = range.unwrap_or((0, size));
        if off >= size || count == 0 {
            return Ok(0);
        }
        let end = off.saturating_add(count).min(size);
        let unit = cached.blob.table_chunk;
        let first = off / unit;
        let last = (end - 1) / unit;
        let mut missing = Vec::new();
        for c in first..=last {
            let (s, e) = (c * unit, ((c + 1) * unit).min(size));
            if lock(&cached.verified).contains(&c) {
                continue;
            }
            if cache::is_data(file, s, e)? && self.verify_on_disk(&cached, file, c, s, e)? {
                self.stats.chunks_present.fetch_add(1, Relaxed);
                lock(&cached.verified).insert(c);
                continue;
            }
            missing.push(c);
        }
        let mut written = 0;
        let mut i = 0;
        while i < missing.len() {
            // one engine read per run of consecutive missing chunks
            let mut j = i;
            while j + 1 < missing.len() && missing[j + 1] == missing[j] + 1 {
                j += 1;
            }
            let s = missing[i] * unit;
            let e = ((missing[j] + 1) * unit).min(size);
            let pieces = self
                .engine
                .read(&cached.blob, s, e - s)
                .await
                .map_err(|err| io::Error::other(err.to_string()))?;
            for p in &pieces {
                file.write_all_at(&p.data, p.offset)?;
            }
            let mut v = lock(&cached.verified);
            for p in &pieces {
                let c0 = p.offset / unit;
                let n = (p.data.len() as u64).div_ceil(unit);
                for c in c0..c0 + n {
                    v.insert(c);
                }
            }
            written += (missing[j] - missing[i]) + 1;
            i = j + 1;
        }
        self.stats.chunks_filled.fetch_add(written, Relaxed);
        Ok(written)
    }

    /// A chunk found on disk (from an earlier run) is trusted only if it matches the table.
    /// Read through the event fd, which raises no further events.
    fn verify_on_disk(&self, cached: &CachedBlob, file: &File, c: u64, s: u64, e: u64) -> io::Result<bool> {
        let mut buf = vec![0u8; (e - s) as usize];
        file.read_exact_at(&mut buf, s)?;
        let got: [u8; 32] = Sha256::digest(&buf).into();
        let ok = cached.blob.digests.get(c as usize) == Some(&got);
        if !ok {
            tracing::warn!(path = %cached.path.display(), chunk = c, "cached chunk does not match its digest: fetching it again");
        }
        Ok(ok)
    }
}
