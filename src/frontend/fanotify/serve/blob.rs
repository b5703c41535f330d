//! The blobs the frontend serves: each data blob's sparse cache file (created and marked
//! when an image is mounted, its metadata pinned in memory), which of its chunks are
//! verified, and its completion: once every chunk is there, its events stop.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{cache, sys, FanotifyFrontend};
use crate::catalog::Image;
use crate::engine::chunks::{consecutive, ChunkGeometry};
use crate::engine::DataBlob;
use crate::frontend::leaf_book::LeafBook;
use crate::frontend::readahead::ReadAhead;
use crate::lock::lock;

/// A data blob's cache file and which of its chunks were verified in this run.
pub(super) struct CachedBlob {
    pub(super) blob: Arc<DataBlob>,
    pub(super) path: PathBuf,
    /// The group its file is marked in.
    pub(super) group: usize,
    pub(super) verified: Mutex<HashSet<u64>>,
    /// A duplicate of an event fd for read-ahead writes. Pre-content events fire on writes
    /// too, so a marked file is only ever written through an event fd's file description,
    /// which the kernel opened without notifications.
    pub(super) writer: Mutex<Option<Arc<File>>>,
    /// Read-ahead state of sequential readers.
    pub(super) ahead: Mutex<ReadAhead>,
    /// Held while writing into the cache file.
    pub(super) write_lock: Mutex<()>,
    /// Offsets of the units a background store is pending for (one per unit, however many
    /// readers fetched it).
    pub(super) storing: Mutex<HashSet<u64>>,
    /// When a reader last needed this blob, a miss or a hit (the background fill waits for
    /// a quiet blob, so it never competes with a reader).
    pub(super) last_read: Mutex<Instant>,
    /// The runs of chunks a startup prefetch is fetching.
    pub(super) planned: Mutex<Vec<std::ops::Range<u64>>>,
    /// The leaves written in this run into chunks not verified whole, and the leaf reads
    /// under way.
    pub(super) leaves: LeafBook,
    /// A background fill task runs for this blob.
    pub(super) filling: AtomicBool,
    /// Every chunk is on disk and the mark is gone.
    pub(super) complete: AtomicBool,
    /// The cache file's pages before this byte were let go behind a sequential reader.
    pub(super) dropped_to: AtomicU64,
}

impl CachedBlob {
    /// The chunks (of the table's size) overlapping `range`, clamped to the blob; the whole
    /// blob when the event names no range.
    pub(super) fn chunks(&self, range: Option<(u64, u64)>) -> std::ops::Range<u64> {
        let (size, unit) = (self.blob.source.size, self.blob.table_chunk);
        let (off, count) = range.unwrap_or((0, size));
        ChunkGeometry::new(unit, unit, size).chunks_for(off, count)
    }

    /// Chunks (of the table's size) in the blob.
    pub(super) fn n_chunks(&self) -> u64 {
        self.blob.source.size.div_ceil(self.blob.table_chunk)
    }

    /// The byte ranges of the runs of chunks `chunks` (clamped to the blob) that are not
    /// verified in the cache now, leaving out those `left_out` names.
    pub(super) fn unverified_runs(
        &self,
        chunks: std::ops::Range<u64>,
        left_out: impl Fn(u64) -> bool,
    ) -> Vec<std::ops::Range<u64>> {
        let (unit, size) = (self.blob.table_chunk, self.blob.source.size);
        let todo: Vec<u64> = {
            let v = lock(&self.verified);
            (chunks.start..chunks.end.min(self.n_chunks()))
                .filter(|&c| !v.contains(&c) && !left_out(c))
                .collect()
        };
        consecutive(&todo, u64::MAX)
            .into_iter()
            .map(|run| run.start * unit..(run.end * unit).min(size))
            .collect()
    }

    /// Whether every table chunk overlapping `[at, at + len)` is verified in the cache.
    pub(super) fn all_marked(&self, at: u64, len: u64) -> bool {
        let chunks = self.chunks(Some((at, len)));
        let v = lock(&self.verified);
        chunks.into_iter().all(|c| v.contains(&c))
    }
}

/// Hand a cache file's writer to the guard, keyed by its file's identity (device, inode).
fn keep_writer(keeper: &std::os::unix::net::UnixStream, writer: &File) {
    use std::os::fd::AsFd;
    let (dev, ino) = writer.metadata().map(|m| (m.dev(), m.ino())).unwrap_or_default();
    let key = dev.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ino;
    crate::frontend::guard::keep(keeper, key, &[], writer.as_fd());
}

impl FanotifyFrontend {
    /// Create the sparse cache files of an image's data blobs and mark them; returns the
    /// `device=` paths in device order.
    pub fn prepare(&self, image: &Image) -> io::Result<Vec<PathBuf>> {
        if let Some(pinned) = &self.pinned {
            let mut pinned = lock(pinned);
            if !pinned.contains_key(&image.meta_path) {
                // best effort: an image whose metadata cannot be locked still mounts
                match crate::frontend::fanotify::pin::Pinned::new(&image.meta_path) {
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
            let id = (md.dev(), md.ino());
            let group = self.group_of(id);
            sys::mark_pre_access(self.group(group), &path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("fanotify_mark(FAN_PRE_ACCESS) on {}: {e}", path.display()),
                )
            })?;
            lock(&self.files).entry(id).or_insert_with(|| {
                // a writer the previous daemon handed its guard, if any: ours keeps it too
                let writer = lock(&self.adopted_writers).remove(&id).map(Arc::new);
                if let (Some(w), Some(k)) = (&writer, &*lock(&self.keeper)) {
                    keep_writer(k, w);
                }
                Arc::new(CachedBlob {
                    blob: Arc::clone(blob),
                    path: path.clone(),
                    group,
                    verified: Mutex::new(HashSet::new()),
                    writer: Mutex::new(writer),
                    ahead: Mutex::new(ReadAhead::of_bytes(self.read_ahead_max, blob.table_chunk)),
                    write_lock: Mutex::new(()),
                    storing: Mutex::new(HashSet::new()),
                    last_read: Mutex::new(Instant::now()),
                    leaves: LeafBook::default(),
                    planned: Mutex::new(Vec::new()),
                    filling: AtomicBool::new(false),
                    complete: AtomicBool::new(false),
                    dropped_to: AtomicU64::new(0),
                })
            });
            paths.push(path);
        }
        Ok(paths)
    }

    /// The blob's writer: a duplicate of an event fd (`file`) the first time, handed to the
    /// guard then, so that the next daemon can fill what this one leaves pending.
    pub(super) fn ensure_writer(&self, cached: &CachedBlob, file: &File) -> Option<Arc<File>> {
        let mut w = lock(&cached.writer);
        if let Some(v) = &*w {
            return Some(Arc::clone(v));
        }
        let dup = match file.try_clone() {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::warn!(error = %e, "could not keep a writer for a cache file");
                return None;
            }
        };
        if let Some(k) = &*lock(&self.keeper) {
            keep_writer(k, &dup);
        }
        Some(Arc::clone(w.insert(dup)))
    }

    /// Hand writers to this daemon's guard from now on, and the ones there are already.
    pub fn set_keeper(&self, keeper: std::os::unix::net::UnixStream) {
        for c in lock(&self.files).values() {
            if let Some(w) = &*lock(&c.writer) {
                keep_writer(&keeper, w);
            }
        }
        *lock(&self.keeper) = Some(keeper);
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

    /// Once every chunk of a blob is present and verified, stop its events: reads of its
    /// cache file then cost what a local file costs.
    pub(super) fn unmark_if_complete(&self, cached: &CachedBlob) {
        let n = cached.n_chunks() as usize;
        if lock(&cached.verified).len() >= n && !cached.complete.swap(true, Relaxed) {
            self.stats.blobs_complete.fetch_add(1, Relaxed);
            self.completions.notify_one();
            match sys::unmark(self.group(cached.group), &cached.path) {
                Ok(()) => tracing::info!(path = %cached.path.display(), "blob complete: pre-content events off"),
                Err(e) => tracing::debug!(error = %e, "unmark failed"),
            }
        }
    }
}
