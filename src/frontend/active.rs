//! The frontend a daemon runs: exactly one of the two, so a daemon cannot be without one or
//! hold both. What the rest of the daemon asks of it (mount an image, is an image complete,
//! pinned metadata, counters) is answered here for either kind.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use super::cachefiles::Cachefiles;
use super::fanotify::FanotifyFrontend;
use super::mount::{self, MountPoint, SpecialFiles};
use super::Frontend;
use crate::catalog::Image;

/// The running kernel frontend.
#[derive(Clone)]
pub enum ActiveFrontend {
    /// cachefiles on-demand (EROFS over fscache).
    Cachefiles(Arc<Cachefiles>),
    /// fanotify pre-content (file-backed EROFS).
    Fanotify(Arc<FanotifyFrontend>),
}

impl ActiveFrontend {
    /// Which kind this is.
    pub fn kind(&self) -> Frontend {
        match self {
            ActiveFrontend::Cachefiles(_) => Frontend::Cachefiles,
            ActiveFrontend::Fanotify(_) => Frontend::Fanotify,
        }
    }

    /// Serve kernel requests until `stop` fires.
    pub fn spawn(&self, stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<std::io::Result<()>> {
        match self {
            ActiveFrontend::Cachefiles(c) => tokio::spawn(Arc::clone(c).run(stop)),
            ActiveFrontend::Fanotify(f) => tokio::spawn(Arc::clone(f).run(stop)),
        }
    }

    /// The kernel fds (fanotify groups or `/dev/cachefiles`), for the guard to hold duplicates.
    pub fn kernel_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        match self {
            ActiveFrontend::Cachefiles(c) => vec![c.device()],
            ActiveFrontend::Fanotify(f) => f.groups().collect(),
        }
    }

    /// Hand the guard, through `keeper`, what the next daemon will need from now on.
    pub fn set_keeper(&self, keeper: std::os::unix::net::UnixStream) {
        match self {
            ActiveFrontend::Cachefiles(c) => c.set_keeper(keeper),
            ActiveFrontend::Fanotify(f) => f.set_keeper(keeper),
        }
    }

    /// Mount `image` lazily on `point` (on the blocking pool: cache files are created,
    /// marked and the metadata locked before the mount).
    pub async fn mount(&self, image: &Arc<Image>, point: MountPoint, special: SpecialFiles) -> std::io::Result<()> {
        let joined = match self {
            ActiveFrontend::Cachefiles(_) => {
                let fsid = image.fsid.clone();
                tokio::task::spawn_blocking(move || mount::mount_fscache(&fsid, &point, special)).await
            }
            ActiveFrontend::Fanotify(f) => {
                let (f, img) = (Arc::clone(f), Arc::clone(image));
                tokio::task::spawn_blocking(move || {
                    let devices = f.prepare(&img)?;
                    mount::mount_file_backed(&img.meta_path, &devices, &point, special)
                })
                .await
            }
        };
        joined.map_err(std::io::Error::other)?
    }

    /// Fetch the startup prefetch list of `image` (checked against it) beside its readers.
    pub fn replay(&self, image: &Image, plan: crate::prefetch::Plan) {
        match self {
            ActiveFrontend::Cachefiles(c) => c.replay(&image.manifest_digest, &image.reference, plan),
            ActiveFrontend::Fanotify(f) => f.replay(&image.reference, plan),
        }
    }

    /// Serve a mount a previous daemon left, if this frontend can (a fanotify group handed
    /// over with its marks); false: it has no listener here.
    pub fn resume(&self, image: &Image) -> bool {
        match self {
            // the cache, bound, was handed over with its objects
            ActiveFrontend::Cachefiles(_) => true,
            ActiveFrontend::Fanotify(f) => f.prepare(image).is_ok(),
        }
    }

    /// Whether every data blob of `image` is complete in the cache (fanotify: its events are
    /// off). The cachefiles frontend never learns it.
    pub fn image_complete(&self, image: &Image) -> bool {
        match self {
            ActiveFrontend::Cachefiles(_) => false,
            ActiveFrontend::Fanotify(f) => f.image_complete(image),
        }
    }

    /// Wait until some blob becomes complete (never, on cachefiles).
    pub async fn blob_completed(&self) {
        match self {
            ActiveFrontend::Cachefiles(_) => std::future::pending().await,
            ActiveFrontend::Fanotify(f) => f.blob_completed().await,
        }
    }

    /// Release the metadata locked in memory for images not in `in_use`.
    pub fn unpin_except(&self, in_use: &[PathBuf]) {
        if let ActiveFrontend::Fanotify(f) = self {
            f.unpin_except(in_use);
        }
    }

    /// Whether this frontend keeps blobs in lazyblob's own cache files (which the cache
    /// limit evicts); cachefiles' cache belongs to the kernel.
    pub fn owns_blob_cache(&self) -> bool {
        matches!(self, ActiveFrontend::Fanotify(_))
    }

    /// Objects the kernel has open (cachefiles).
    pub fn open_objects(&self) -> usize {
        match self {
            ActiveFrontend::Cachefiles(c) => c.open_objects(),
            ActiveFrontend::Fanotify(_) => 0,
        }
    }

    /// Reads this frontend answered with `EIO`.
    pub fn eio_answers(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            ActiveFrontend::Cachefiles(c) => c.stats.reads_failed.load(Relaxed),
            ActiveFrontend::Fanotify(f) => f.stats.denied.load(Relaxed),
        }
    }

    /// Chunks (cachefiles: units) fetched ahead of readers, by what fetched them: the
    /// read-ahead of sequential readers, a startup prefetch list, the background fill.
    pub fn fetched_ahead(&self) -> [(&'static str, u64); 3] {
        use std::sync::atomic::Ordering::Relaxed;
        let (read_ahead, startup, background) = match self {
            ActiveFrontend::Cachefiles(c) => (&c.stats.units_ahead, &c.stats.units_startup, &c.stats.units_background),
            ActiveFrontend::Fanotify(f) => (
                &f.stats.chunks_prefetched,
                &f.stats.chunks_startup,
                &f.stats.chunks_background,
            ),
        };
        [
            ("read_ahead", read_ahead.load(Relaxed)),
            ("startup", startup.load(Relaxed)),
            ("background", background.load(Relaxed)),
        ]
    }

    /// The frontend's read latencies.
    pub fn read_times(&self) -> &crate::metrics::ReadTimes {
        match self {
            ActiveFrontend::Cachefiles(c) => &c.stats.read_times,
            ActiveFrontend::Fanotify(f) => &f.stats.read_times,
        }
    }

    /// The frontend's own counters, as `status` shows them.
    pub fn counters(&self) -> serde_json::Value {
        match self {
            ActiveFrontend::Cachefiles(c) => serde_json::to_value(&c.stats).unwrap_or_default(),
            ActiveFrontend::Fanotify(f) => {
                let mut v = serde_json::to_value(&f.stats).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("metadata_pinned_bytes".into(), f.pinned_bytes().into());
                }
                v
            }
        }
    }
}
