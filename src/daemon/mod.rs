//! The daemon: wires registry, engine, catalog, the kernel frontend and the admin API
//! together. [`Daemon::start`] brings the parts up (the demo and tests embed it), [`run`]
//! adds the admin socket and signal handling, [`Daemon::shutdown`] unmounts everything
//! before the frontend goes away, so no mount is left without its listener.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

mod snapshots;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::engine::Engine;
use crate::frontend::admission::Admission;
use crate::frontend::fanotify::{cache, guard, FanotifyFrontend};
use crate::frontend::{self, cachefiles::Cachefiles, mount, Frontend, KernelFacts};
use crate::registry::Registry;

/// A mount made by this daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountInfo {
    pub reference: String,
    pub target: PathBuf,
    pub fsid: String,
    pub frontend: Frontend,
    /// Whether setuid bits and device nodes take effect (`nosuid,nodev` unless honoured).
    #[serde(default)]
    pub special_files: mount::SpecialFiles,
    /// The mount's own kernel read-ahead (KiB) while a raised one is in force: it is put back
    /// once every blob of the image is complete, so a fully cached image reads like a local one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ahead_kb_after_fill: Option<u32>,
}

/// The running daemon's shared parts.
pub struct Daemon {
    pub config: Config,
    pub kernel: KernelFacts,
    pub frontend: Frontend,
    pub engine: Arc<Engine>,
    pub catalog: Arc<Catalog>,
    pub cachefiles: Option<Arc<Cachefiles>>,
    pub fanotify: Option<Arc<FanotifyFrontend>>,
    mounts: Mutex<Vec<MountInfo>>,
    guard: Mutex<Option<guard::Guard>>,
    stop: tokio::sync::watch::Sender<bool>,
    loops: Mutex<Vec<tokio::task::JoinHandle<std::io::Result<()>>>>,
}

impl Daemon {
    pub fn frontend_name(&self) -> &'static str {
        match self.frontend {
            Frontend::Cachefiles => "cachefiles",
            Frontend::Fanotify => "fanotify",
        }
    }

    /// Bring up registry client, engine, catalog (restoring persisted images) and the kernel
    /// frontend with its event loop. `group` is a fanotify group handed over by a guard.
    pub async fn start(config: Config, group: Option<nix::sys::fanotify::Fanotify>) -> Result<Arc<Daemon>> {
        for dir in [&config.daemon.state_dir, &config.daemon.cache_dir] {
            crate::private_fs::private_dir(dir).with_context(|| format!("creating {} (mode 0700)", dir.display()))?;
        }
        let kernel = KernelFacts::read();
        let frontend = frontend::choose(&kernel, config.daemon.frontend).context("choosing a kernel frontend")?;
        tracing::info!(kernel = %kernel.release, ?frontend, "starting lazyblob");
        let registry = Arc::new(
            Registry::new(&config.registry, config.engine.max_concurrent_fetches)
                .context("setting up the registry client")?,
        );
        let engine = Arc::new(Engine::new(Arc::clone(&registry), config.engine.clone()));
        let catalog = Arc::new(Catalog::new(Arc::clone(&registry), &config.daemon.state_dir));
        for (reference, err) in catalog.restore().await {
            tracing::error!(reference, error = %err, "a persisted image could not be restored");
        }
        for reference in &config.daemon.images {
            if let Err(e) = catalog.register(reference).await {
                tracing::error!(reference, error = %e, "an image from the config could not be registered");
            }
        }
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut loops = Vec::new();
        let mut adopted = false;
        let (cachefiles, fanotify) = match frontend {
            Frontend::Cachefiles => {
                let c = Cachefiles::bind(
                    &config.daemon.cache_dir,
                    &config.daemon.tag,
                    Arc::clone(&catalog),
                    Arc::clone(&engine),
                    Admission::new(config.engine.max_reads_in_flight),
                )
                .context("binding the cachefiles on-demand cache")?;
                loops.push(tokio::spawn(Arc::clone(&c).run(stop_rx.clone())));
                (Some(c), None)
            }
            Frontend::Fanotify => {
                let group = match group {
                    Some(g) => Some(g),
                    None => guard::reclaim(&config.daemon.state_dir).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "could not take over from a waiting guard");
                        None
                    }),
                };
                adopted = group.is_some();
                let f = FanotifyFrontend::new(
                    &config.daemon.cache_dir,
                    Arc::clone(&engine),
                    group,
                    config.engine.read_ahead_max,
                    (config.engine.fill_after_idle_ms > 0)
                        .then(|| std::time::Duration::from_millis(config.engine.fill_after_idle_ms)),
                    config.engine.pin_metadata,
                    Admission::new(config.engine.max_reads_in_flight),
                )
                .context("creating the fanotify pre-content group")?;
                loops.push(tokio::spawn(Arc::clone(&f).run(stop_rx.clone())));
                (None, Some(f))
            }
        };
        let guard = match &fanotify {
            Some(f) => Some(guard::Guard::spawn(f.group(), &config.daemon.state_dir).context("starting the guard")?),
            None => None,
        };
        let daemon = Arc::new(Daemon {
            config,
            kernel,
            frontend,
            engine,
            catalog,
            cachefiles,
            fanotify,
            mounts: Mutex::new(Vec::new()),
            guard: Mutex::new(guard),
            stop,
            loops: Mutex::new(loops),
        });
        daemon.recover_mounts(adopted).await;
        snapshots::start(&daemon)?;
        if let Some(f) = &daemon.fanotify {
            let (f, weak, mut stop) = (Arc::clone(f), Arc::downgrade(&daemon), daemon.stop.subscribe());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = f.blob_completed() => {}
                        _ = stop.changed() => return,
                    }
                    match weak.upgrade() {
                        Some(d) => d.settle_read_ahead().await,
                        None => return,
                    }
                }
            });
        }
        Ok(daemon)
    }

    fn mounts_file(&self) -> PathBuf {
        self.config.daemon.state_dir.join("mounts.json")
    }

    /// Write the mount table durably (on the blocking pool: it fsyncs).
    async fn persist_mounts(&self) {
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

    /// Mounts of a previous daemon: resume them when its fanotify group (with the marks) was
    /// handed over; otherwise they have no listener and are detached, so they cannot serve
    /// zeros from holes.
    async fn recover_mounts(&self, adopted: bool) {
        let old: Vec<MountInfo> = crate::catalog::state::load_records(&self.mounts_file(), None);
        for m in old {
            if !mount::is_erofs_mount(&m.target) {
                continue;
            }
            let resumed = adopted
                && m.frontend == Frontend::Fanotify
                && self
                    .catalog
                    .get(&m.fsid)
                    .and_then(|img| self.fanotify.as_ref().map(|f| f.prepare(&img)))
                    .is_some_and(|r| r.is_ok());
            if resumed {
                tracing::info!(target = %m.target.display(), "resumed serving a mount of the previous daemon");
                self.mounts.lock().unwrap_or_else(|p| p.into_inner()).push(m);
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
    pub fn mounts(&self) -> Vec<MountInfo> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Register `reference` if needed and mount it lazily on `target`.
    pub async fn mount(&self, reference: &str, target: &Path, special: mount::SpecialFiles) -> Result<MountInfo> {
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
        match self.frontend {
            Frontend::Cachefiles => {
                let fsid = image.fsid.clone();
                tokio::task::spawn_blocking(move || mount::mount_fscache(&fsid, &point, special)).await??;
            }
            Frontend::Fanotify => {
                let f = self.fanotify.as_ref().context("fanotify frontend missing")?;
                // creating files, marking them and `mlock`ing the metadata block: blocking pool
                let (f, img) = (Arc::clone(f), Arc::clone(&image));
                let devices = tokio::task::spawn_blocking(move || f.prepare(&img)).await??;
                let meta = image.meta_path.clone();
                tokio::task::spawn_blocking(move || mount::mount_file_backed(&meta, &devices, &point, special))
                    .await??;
            }
        }
        let info = MountInfo {
            reference: reference.to_string(),
            read_ahead_kb_after_fill: self.raise_read_ahead(&target),
            target,
            fsid: image.fsid.clone(),
            frontend: self.frontend,
            special_files: special,
        };
        self.mounts.lock().unwrap_or_else(|p| p.into_inner()).push(info.clone());
        self.persist_mounts().await;
        // an image whose blobs are all complete already (mounted before) raises no completion
        self.settle_read_ahead().await;
        tracing::info!(reference, target = %info.target.display(), fsid = %info.fsid, "mounted");
        Ok(info)
    }

    /// Raise the read-ahead of a new mount to `read_ahead_kb` (fewer, larger fetches while
    /// cold); returns the mount's own value to put back after the fill. Fanotify only: an
    /// fscache-mode EROFS mount's bdi is not named after anything the mount reports (its
    /// sysfs name is the fsid, its bdi `erofs-<n>`), and the cachefiles frontend never learns
    /// that an image is complete.
    fn raise_read_ahead(&self, target: &Path) -> Option<u32> {
        let kib = self.config.engine.read_ahead_kb;
        if kib == 0 || self.frontend != Frontend::Fanotify {
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
    async fn settle_read_ahead(&self) {
        let Some(f) = &self.fanotify else {
            return;
        };
        let mut changed = false;
        for m in self.mounts.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            let Some(kib) = m.read_ahead_kb_after_fill else {
                continue;
            };
            if !self.catalog.get(&m.fsid).is_some_and(|img| f.image_complete(&img)) {
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

    /// Unmount a mount of this daemon; `lazy` detaches it if busy.
    pub async fn umount(&self, target: &Path, lazy: bool) -> Result<()> {
        let target = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        if !self.mounts().iter().any(|m| m.target == target) {
            bail!("{} is not a lazyblob mount", target.display());
        }
        let t = target.clone();
        tokio::task::spawn_blocking(move || mount::unmount(&t, lazy)).await??;
        self.mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|m| m.target != target);
        self.persist_mounts().await;
        self.unpin_unused();
        self.evict().await;
        Ok(())
    }

    /// Release the pinned metadata of images no mount uses any more.
    fn unpin_unused(&self) {
        let Some(f) = &self.fanotify else {
            return;
        };
        let in_use: Vec<PathBuf> = self.mounted_images().iter().map(|i| i.meta_path.clone()).collect();
        f.unpin_except(&in_use);
    }

    /// The images the current mounts use.
    fn mounted_images(&self) -> Vec<Arc<crate::catalog::Image>> {
        self.mounts().iter().filter_map(|m| self.catalog.get(&m.fsid)).collect()
    }

    /// Apply the cache limit: drop blobs of images no mount uses.
    async fn evict(&self) {
        let limit = self.config.daemon.cache_limit_bytes;
        if limit == 0 || self.fanotify.is_none() {
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
        let evicted = tokio::task::spawn_blocking(move || cache::evict(&dir, limit, &keep))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = evicted {
            tracing::warn!(error = %e, "cache eviction failed");
        }
    }

    /// Bytes the blob cache holds on disk (fanotify frontend).
    pub fn cache_bytes(&self) -> u64 {
        let dir = self.config.daemon.cache_dir.join("blobs");
        std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| cache::allocated(&e.path())).sum())
            .unwrap_or(0)
    }

    /// Unmount everything (detaching busy mounts) while the frontend still serves, then stop
    /// the event loops.
    pub async fn shutdown(&self) {
        // a mount still in use (a container's overlay over a lazy image, an open file) stays
        // mounted and listed, and the guard keeps the frontend's group: readers get EIO,
        // never a hole's zeros, until the next daemon takes it over
        let mut busy = Vec::new();
        let lowers = self.snapshotter_root().join("images");
        for m in self.mounts() {
            if m.target.starts_with(&lowers) {
                // a container's lower layer: overlayfs holds a private clone of the mount, so
                // an unmount here would succeed and leave the container reading holes
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
        let keep_guard = !busy.is_empty();
        *self.mounts.lock().unwrap_or_else(|p| p.into_inner()) = busy;
        self.persist_mounts().await;
        let guard = self.guard.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (guard, keep_guard) {
            // nothing is mounted any more: the guard can go without taking over
            (Some(g), false) => g.release(),
            (Some(g), true) => {
                // kept until this process ends: then the guard takes the group over
                tracing::warn!("mounts in use: the guard keeps their group until the next daemon");
                *self.guard.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
            }
            (None, _) => {}
        }
        let _ = self.stop.send(true);
        let loops: Vec<_> = std::mem::take(&mut *self.loops.lock().unwrap_or_else(|p| p.into_inner()));
        for l in loops {
            let _ = l.await;
        }
    }

    /// Where the containerd snapshotter keeps its snapshots and image mounts.
    pub fn snapshotter_root(&self) -> PathBuf {
        self.config
            .snapshotter
            .root
            .clone()
            .unwrap_or_else(|| self.config.daemon.state_dir.join("snapshotter"))
    }

    /// Wait until an event loop ends on its own (an error), returning it.
    async fn failed_loop(&self) -> anyhow::Error {
        let l = self.loops.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match l {
            Some(h) => match h.await {
                Ok(Ok(())) => anyhow::anyhow!("frontend event loop stopped"),
                Ok(Err(e)) => anyhow::Error::new(e).context("frontend event loop failed"),
                Err(e) => anyhow::Error::new(e).context("frontend event loop panicked"),
            },
            None => std::future::pending().await,
        }
    }
}

/// Run the daemon with `config` until SIGINT/SIGTERM: start, serve the admin API, shut down.
pub async fn run(config: Config, group: Option<nix::sys::fanotify::Fanotify>) -> Result<()> {
    let daemon = Daemon::start(config.clone(), group).await?;
    let (api_stop, api_rx) = tokio::sync::watch::channel(false);
    let api = {
        let daemon = Arc::clone(&daemon);
        let socket = config.daemon.socket.clone();
        tokio::spawn(async move { crate::api::server::serve(daemon, &socket, api_rx).await })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT, shutting down"); Ok(()) }
        _ = term.recv() => { tracing::info!("SIGTERM, shutting down"); Ok(()) }
        e = daemon.failed_loop() => Err(e),
    };
    daemon.shutdown().await;
    let _ = api_stop.send(true);
    match api.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "admin API failed"),
        Err(e) => tracing::error!(error = %e, "admin API task failed"),
    }
    let _ = std::fs::remove_file(&config.daemon.socket);
    outcome
}
