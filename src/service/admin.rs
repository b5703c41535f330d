//! The daemon as the admin API sees it: its state turned into the API's wire types.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::api::server::Admin;
use crate::api::{EngineCounters, ImageInfo, MountInfo, MountRequest, RegistryCounters, Status, UmountRequest};
use crate::catalog::Image;
use crate::daemon::{Daemon, MountRecord};

/// The admin API's view of a running daemon.
pub struct DaemonAdmin(pub Arc<Daemon>);

impl Admin for DaemonAdmin {
    async fn status(&self) -> Result<Status> {
        // the cache size is a directory scan: on the blocking pool
        let d = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || status(&d)).await.context("status")
    }

    fn images(&self) -> Vec<ImageInfo> {
        self.0.catalog.list().iter().map(|i| image_info(i)).collect()
    }

    async fn register(&self, reference: &str) -> Result<ImageInfo> {
        let image = self.0.catalog.register(reference).await?;
        Ok(image_info(&image))
    }

    fn mounts(&self) -> Vec<MountInfo> {
        self.0.mounts().into_iter().map(mount_info).collect()
    }

    async fn mount(&self, req: MountRequest) -> Result<MountInfo> {
        self.0
            .mount(&req.reference, &req.target, req.special_files)
            .await
            .map(mount_info)
    }

    async fn umount(&self, req: &UmountRequest) -> Result<()> {
        self.0.umount(&req.target, req.lazy).await
    }

    fn hand_over(&self) -> Result<()> {
        tracing::warn!("a new daemon takes over: exiting with every mount in place");
        tokio::spawn(async {
            // the answer goes out first; then this process ends as if it had crashed: its
            // guard holds the readers, the new daemon takes the group from it and serves
            // what this one left pending
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            std::process::exit(0);
        });
        Ok(())
    }
}

/// The daemon's state as `status` reports it.
fn status(d: &Daemon) -> Status {
    let e = &d.engine.stats;
    let r = &d.engine.registry().stats;
    let (ahead_pauses, ahead_pauses_expired) = d.engine.ahead_pauses();
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        frontend: d.frontend.kind().name().into(),
        kernel: d.kernel.release.clone(),
        images: d.catalog.list().iter().map(|i| image_info(i)).collect(),
        mounts: d.mounts().into_iter().map(mount_info).collect(),
        cache_bytes: d.cache_bytes(),
        open_objects: d.frontend.open_objects(),
        inflight_chunks: d.engine.inflight_len(),
        engine: EngineCounters {
            chunks_fetched: e.chunks_fetched.load(Relaxed),
            range_requests: e.runs.load(Relaxed),
            shared_hits: e.shared_hits.load(Relaxed),
            bytes_served: e.bytes_served.load(Relaxed),
            failed_reads: e.failed_reads.load(Relaxed),
            leaf_reads: e.leaf_reads.load(Relaxed),
            ahead_pauses,
            ahead_pauses_expired,
        },
        registry: RegistryCounters {
            requests: r.requests.load(Relaxed),
            bytes: r.bytes.load(Relaxed),
            retries: r.retries.load(Relaxed),
            failures: r.failures.load(Relaxed),
        },
        frontend_counters: d.frontend.counters(),
    }
}

fn image_info(i: &Image) -> ImageInfo {
    ImageInfo {
        reference: i.reference.clone(),
        manifest_digest: i.manifest_digest.to_string(),
        fsid: i.fsid.clone(),
        meta_size: i.meta.size,
        data_blobs: i.data.len(),
        total_size: i.total_size(),
    }
}

fn mount_info(m: MountRecord) -> MountInfo {
    MountInfo {
        reference: m.reference,
        target: m.target,
        fsid: m.fsid,
        frontend: m.frontend,
        special_files: m.special_files,
    }
}
