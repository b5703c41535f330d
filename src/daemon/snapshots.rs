//! The containerd snapshotter's wiring: its service started on the configured socket, and
//! the daemon seen through the snapshotter's `Images` (registration and lazy mounts with the
//! same catalog, engine and kernel frontend as `lazyblob mount`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::Daemon;
use crate::frontend::mount;
use crate::snapshotter::remote::ImageError;

/// Serve containerd's snapshots API if `[snapshotter] socket` is set.
pub(super) fn start(daemon: &Arc<Daemon>) -> Result<()> {
    let Some(socket) = daemon.config.snapshotter.socket.clone() else {
        return Ok(());
    };
    let root = daemon.config.snapshotter_root();
    let store = crate::snapshotter::store::Store::open(&root)
        .with_context(|| format!("opening the snapshot store in {}", root.display()))?;
    let images = Arc::new(SnapshotImages(Arc::downgrade(daemon)));
    let service = crate::snapshotter::service::Service::new(Arc::new(store), &root, images);
    let stop = daemon.stopping();
    tokio::spawn(async move {
        if let Err(e) = service.serve(&socket, stop).await {
            tracing::error!(error = %e, "the containerd snapshotter stopped");
        }
    });
    Ok(())
}

/// The daemon as the snapshotter sees it: it registers lazyblob images and mounts them, with
/// the same catalog, engine and kernel frontend as `lazyblob mount`.
struct SnapshotImages(std::sync::Weak<Daemon>);

impl SnapshotImages {
    fn daemon(&self) -> Result<Arc<Daemon>, ImageError> {
        self.0.upgrade().ok_or(ImageError::ShuttingDown)
    }
}

#[tonic::async_trait]
impl crate::snapshotter::remote::Images for SnapshotImages {
    async fn register(&self, pinned: &str) -> Result<Vec<String>, ImageError> {
        let img = self.daemon()?.catalog.register(pinned).await?;
        let leaves = img.data.iter().find_map(|d| d.leaves.as_ref()).map(|l| &l.source);
        Ok(std::iter::once(&img.meta)
            .chain(leaves)
            .chain(img.data.iter().map(|d| &d.source))
            .map(|s| s.digest.to_string())
            .collect())
    }

    async fn ensure_mounted(&self, pinned: &str, target: &Path) -> Result<(), ImageError> {
        let d = self.daemon()?;
        let io = |source| ImageError::Io {
            path: target.to_path_buf(),
            source,
        };
        crate::private_fs::private_dir(target.parent().unwrap_or(target)).map_err(io)?;
        std::fs::create_dir_all(target).map_err(io)?;
        let target = &std::fs::canonicalize(target).map_err(io)?;
        let known = d.mounts().iter().any(|m| &m.target == target);
        if known && mount::is_erofs_mount(target) {
            return Ok(());
        }
        if known {
            // known but gone (detached while no daemon served it): forget it, mount again
            d.forget_mount(target);
        }
        // a container's lower layer: setuid binaries and device nodes of the image work, and
        // the mount lives under the snapshotter's root-only directory
        d.mount(pinned, target, mount::SpecialFiles::Honoured)
            .await
            .map(|_| ())
            .map_err(ImageError::Mount)
    }

    async fn unmount(&self, target: &Path) -> Result<(), ImageError> {
        self.daemon()?.umount(target, false).await.map_err(ImageError::Mount)
    }
}
