//! The daemon's mount table: lazy mounts made through the admin API or the snapshotter,
//! persisted in `mounts.json` (root-only, written atomically) so that a restarted daemon
//! knows what a previous one left mounted.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Daemon;
use crate::frontend::mount;
use crate::frontend::Frontend;
use crate::lock::lock;

/// A mount made by this daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// The image reference mounted.
    pub reference: String,
    /// The mount point.
    pub target: PathBuf,
    /// The image's fsid.
    pub fsid: String,
    /// The frontend that serves it.
    pub frontend: Frontend,
    /// Whether setuid bits and device nodes take effect (`nosuid,nodev` unless honoured).
    #[serde(default)]
    pub special_files: mount::SpecialFiles,
    /// The mount's own kernel read-ahead (KiB) while a raised one is in force: it is put back
    /// once every blob of the image is complete, so a fully cached image reads like a local one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ahead_kb_after_fill: Option<u32>,
}

impl Daemon {
    fn mounts_file(&self) -> PathBuf {
        self.config.daemon.state_dir.join("mounts.json")
    }

    /// Write the mount table durably (on the blocking pool: it fsyncs).
    pub(super) async fn persist_mounts(&self) {
        let body = serde_json::to_vec_pretty(&self.mounts()).unwrap_or_default();
        let path = self.mounts_file();
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || crate::private_fs::write_atomic(&p, &body))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            tracing::error!(error = %e, path = %path.display(), "could not persist the mount table");
        }
    }

    /// Mounts of a previous daemon: resume them when its kernel fd was handed over (see
    /// [`Daemon::took_over`]); otherwise they have no listener and are detached, so they
    /// cannot serve zeros from holes.
    pub(super) async fn recover_mounts(&self) {
        let adopted = self.took_over;
        let old: Vec<MountRecord> = crate::catalog::state::load_records(&self.mounts_file(), None);
        for m in old {
            if !mount::is_erofs_mount(&m.target) {
                continue;
            }
            let resumed = adopted
                && m.frontend == self.frontend.kind()
                && self.catalog.get(&m.fsid).is_some_and(|img| self.frontend.resume(&img));
            if resumed {
                tracing::info!(target = %m.target.display(), "resumed serving a mount of the previous daemon");
                lock(&self.mounts).push(m);
            } else {
                tracing::warn!(target = %m.target.display(), "detaching a mount left without its listener");
                if let Err(e) = mount::unmount(&m.target, true) {
                    tracing::error!(target = %m.target.display(), error = %e, "could not detach an orphaned mount");
                }
            }
        }
        self.persist_mounts().await;
    }

    /// Mounts made by this daemon.
    pub fn mounts(&self) -> Vec<MountRecord> {
        lock(&self.mounts).clone()
    }

    /// Forget the record of `target` (a mount that went away while no daemon served it).
    pub(super) fn forget_mount(&self, target: &Path) {
        lock(&self.mounts).retain(|m| m.target != target);
    }

    /// Register `reference` if needed and mount it lazily on `target`.
    pub async fn mount(&self, reference: &str, target: &Path, special: mount::SpecialFiles) -> Result<MountRecord> {
        // opened now, mounted on later by fd: the path cannot be swapped during registration
        let point = mount::MountPoint::open(target)?;
        let target = point.path().to_path_buf();
        if self.mounts().iter().any(|m| m.target == target) {
            bail!("{} is already a lazyblob mount", target.display());
        }
        let image = self
            .catalog
            .register(reference)
            .await
            .with_context(|| format!("registering {reference}"))?;
        self.frontend.mount(&image, point, special).await?;
        let info = MountRecord {
            reference: reference.to_string(),
            read_ahead_kb_after_fill: self.raise_read_ahead(&target),
            target,
            fsid: image.fsid.clone(),
            frontend: self.frontend.kind(),
            special_files: special,
        };
        lock(&self.mounts).push(info.clone());
        // the startup prefetch first: it runs beside the mount table's write
        self.start_prefetch(&image);
        self.persist_mounts().await;
        // an image whose blobs are all complete already (mounted before) raises no completion
        self.settle_read_ahead().await;
        tracing::info!(reference, target = %info.target.display(), fsid = %info.fsid, "mounted");
        Ok(info)
    }

    /// Unmount a mount of this daemon; `lazy` detaches it if busy.
    pub async fn umount(&self, target: &Path, lazy: bool) -> Result<()> {
        let target = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        if !self.mounts().iter().any(|m| m.target == target) {
            bail!("{} is not a lazyblob mount", target.display());
        }
        let t = target.clone();
        tokio::task::spawn_blocking(move || mount::unmount(&t, lazy)).await??;
        let fsid = self.mounts().into_iter().find(|m| m.target == target).map(|m| m.fsid);
        self.forget_mount(&target);
        if let Some(image) = fsid
            .filter(|f| !self.mounts().iter().any(|m| &m.fsid == f))
            .and_then(|f| self.catalog.get(&f))
        {
            self.end_recording(&image);
        }
        self.persist_mounts().await;
        self.unpin_unused();
        self.evict().await;
        Ok(())
    }

    /// Unmount every mount that is not in use (at shutdown); the ones kept. A container's
    /// lower layer is always kept: overlayfs holds a private clone of the mount, so an
    /// unmount here would succeed and leave the container reading holes.
    pub(super) async fn unmount_all_unused(&self) -> Vec<MountRecord> {
        let mut busy = Vec::new();
        let lowers = self.config.snapshotter_root().join("images");
        for m in self.mounts() {
            if m.target.starts_with(&lowers) {
                tracing::info!(target = %m.target.display(), "a container image mount: kept for the next daemon");
                busy.push(m);
                continue;
            }
            let t = m.target.clone();
            match tokio::task::spawn_blocking(move || mount::unmount(&t, false)).await {
                Ok(Ok(())) => tracing::info!(target = %m.target.display(), "unmounted"),
                Ok(Err(e)) => {
                    tracing::warn!(target = %m.target.display(), error = %e, "still in use: left mounted for the next daemon");
                    busy.push(m);
                }
                Err(e) => {
                    tracing::error!(error = %e, "unmount task failed");
                    busy.push(m);
                }
            }
        }
        busy
    }
}
