//! The cache limit: after an unmount, blobs of images no mount uses are evicted (oldest
//! first) until the blob cache fits `cache_limit_bytes`, and their metadata is unpinned.
//! Only lazyblob's own blob cache (fanotify) is evicted; cachefiles' belongs to the kernel.

use std::path::PathBuf;
use std::sync::Arc;

use super::Daemon;
use crate::frontend::fanotify::cache;

/// What the cache limit removed since the daemon started.
#[derive(Debug, Default)]
pub struct EvictionStats {
    /// Cache files deleted.
    pub blobs: std::sync::atomic::AtomicU64,
    /// Bytes they held on disk.
    pub bytes: std::sync::atomic::AtomicU64,
}

impl Daemon {
    /// Release the pinned metadata of images no mount uses any more.
    pub(super) fn unpin_unused(&self) {
        let in_use: Vec<PathBuf> = self.mounted_images().iter().map(|i| i.meta_path.clone()).collect();
        self.frontend.unpin_except(&in_use);
    }

    /// The images the current mounts use.
    fn mounted_images(&self) -> Vec<Arc<crate::catalog::Image>> {
        self.mounts().iter().filter_map(|m| self.catalog.get(&m.fsid)).collect()
    }

    /// Apply the cache limit: drop blobs of images no mount uses.
    pub(super) async fn evict(&self) {
        let Some(limit) = self.config.daemon.cache_limit_bytes else {
            return;
        };
        if !self.frontend.owns_blob_cache() {
            return;
        }
        let keep: Vec<PathBuf> = self
            .mounted_images()
            .iter()
            .flat_map(|i| {
                i.data
                    .iter()
                    .map(|d| cache::blob_path(&self.config.daemon.cache_dir, d.key()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let dir = self.config.daemon.cache_dir.clone();
        let evicted = tokio::task::spawn_blocking(move || cache::evict(&dir, limit.get(), &keep))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match evicted {
            Ok(e) => {
                use std::sync::atomic::Ordering::Relaxed;
                self.evicted.blobs.fetch_add(e.blobs, Relaxed);
                self.evicted.bytes.fetch_add(e.bytes, Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "cache eviction failed"),
        }
    }

    /// Bytes the blob cache holds on disk (fanotify frontend).
    pub fn cache_bytes(&self) -> u64 {
        let dir = self.config.daemon.cache_dir.join("blobs");
        std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| cache::allocated(&e.path())).sum())
            .unwrap_or(0)
    }
}
