//! The read-ahead policy of lazy mounts (fanotify): a new mount's kernel read-ahead is
//! raised (fewer, larger fetches while cold) and put back once every blob of its image is
//! complete, so a fully cached image reads like a local one. An fscache-mode mount's bdi is
//! not named after anything the mount reports, and the cachefiles frontend never learns that
//! an image is complete: there the kernel's own read-ahead stays.

use std::path::Path;
use std::sync::Arc;

use super::Daemon;
use crate::frontend::active::ActiveFrontend;
use crate::frontend::mount;
use crate::lock::lock;

/// Settle the read-ahead of mounts each time a blob becomes complete, until the daemon stops.
pub(super) fn start_settling(daemon: &Arc<Daemon>) {
    if !matches!(daemon.frontend, ActiveFrontend::Fanotify(_)) {
        return;
    }
    let (frontend, weak, mut stop) = (daemon.frontend.clone(), Arc::downgrade(daemon), daemon.stopping());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = frontend.blob_completed() => {}
                _ = stop.changed() => return,
            }
            match weak.upgrade() {
                Some(d) => d.settle_read_ahead().await,
                None => return,
            }
        }
    });
}

impl Daemon {
    /// Raise the read-ahead of a new mount to `read_ahead_kb`; returns the mount's own value
    /// to put back after the fill.
    pub(super) fn raise_read_ahead(&self, target: &Path) -> Option<u32> {
        let kib = self.config.engine.read_ahead_kb?.get();
        if !matches!(self.frontend, ActiveFrontend::Fanotify(_)) {
            return None;
        }
        let own = mount::read_ahead(target).ok();
        if let Err(e) = mount::set_read_ahead(target, kib) {
            tracing::warn!(target = %target.display(), error = %e, "could not set the mount's read-ahead");
            return None;
        }
        own.filter(|&own| own != kib)
    }

    /// Put back the own read-ahead of mounts whose image is now complete in the cache.
    pub(super) async fn settle_read_ahead(&self) {
        let mut changed = false;
        for m in lock(&self.mounts).iter_mut() {
            let Some(kib) = m.read_ahead_kb_after_fill else {
                continue;
            };
            if !self
                .catalog
                .get(&m.fsid)
                .is_some_and(|img| self.frontend.image_complete(&img))
            {
                continue;
            }
            match mount::set_read_ahead(&m.target, kib) {
                Ok(()) => {
                    tracing::info!(target = %m.target.display(), kib, "image complete: the mount's own read-ahead is back")
                }
                Err(e) => {
                    tracing::warn!(target = %m.target.display(), error = %e, "could not restore the mount's read-ahead")
                }
            }
            m.read_ahead_kb_after_fill = None;
            changed = true;
        }
        if changed {
            self.persist_mounts().await;
        }
    }
}
