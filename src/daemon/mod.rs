//! The daemon: registry, engine, catalog and the kernel frontend wired together.
//! [`Daemon::start`] brings the parts up (the demo, tests and [`crate::service`] embed it),
//! [`Daemon::shutdown`] unmounts what it can before the frontend goes away, so no mount is
//! left without its listener. Its jobs live beside: the mount table (`mounts`), the
//! read-ahead policy of mounts (`read_ahead`), the cache limit (`eviction`) and the
//! containerd snapshotter's view of it (`snapshots`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

mod eviction;
mod mounts;
mod read_ahead;
mod snapshots;

pub use mounts::MountRecord;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::engine::Engine;
use crate::frontend::active::ActiveFrontend;
use crate::frontend::admission::Admission;
use crate::frontend::fanotify::{guard, FanotifyFrontend};
use crate::frontend::{self, cachefiles::Cachefiles, Frontend, KernelFacts};
use crate::lock::lock;
use crate::registry::Registry;

/// The running daemon's shared parts.
pub struct Daemon {
    /// The configuration it started with.
    pub config: Config,
    /// What the running kernel offers.
    pub kernel: KernelFacts,
    /// The kernel frontend serving its mounts.
    pub frontend: ActiveFrontend,
    /// The blob engine.
    pub engine: Arc<Engine>,
    /// The registered images.
    pub catalog: Arc<Catalog>,
    mounts: Mutex<Vec<MountRecord>>,
    /// The fanotify group's keeper should this process die (None: cachefiles, or released).
    guard: Mutex<Option<guard::Guard>>,
    stop: tokio::sync::watch::Sender<bool>,
    loops: Mutex<Vec<tokio::task::JoinHandle<std::io::Result<()>>>>,
}

impl Daemon {
    /// Bring up registry client, engine, catalog (restoring persisted images) and the kernel
    /// frontend with its event loop. `group` is a fanotify group handed over by a guard.
    pub async fn start(config: Config, group: Option<nix::sys::fanotify::Fanotify>) -> Result<Arc<Daemon>> {
        for dir in [&config.daemon.state_dir, &config.daemon.cache_dir] {
            crate::private_fs::private_dir(dir).with_context(|| format!("creating {} (mode 0700)", dir.display()))?;
        }
        let kernel = KernelFacts::read();
        let kind = frontend::choose(&kernel, config.daemon.frontend).context("choosing a kernel frontend")?;
        tracing::info!(kernel = %kernel.release, frontend = ?kind, "starting lazyblob");
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
        let (frontend, adopted) = bring_up(kind, &config, &catalog, &engine, group)?;
        let guard = match &frontend {
            ActiveFrontend::Fanotify(f) => {
                Some(guard::Guard::spawn(f.group(), &config.daemon.state_dir).context("starting the guard")?)
            }
            ActiveFrontend::Cachefiles(_) => None,
        };
        let loops = vec![frontend.spawn(stop_rx)];
        let daemon = Arc::new(Daemon {
            config,
            kernel,
            frontend,
            engine,
            catalog,
            mounts: Mutex::new(Vec::new()),
            guard: Mutex::new(guard),
            stop,
            loops: Mutex::new(loops),
        });
        daemon.recover_mounts(adopted).await;
        snapshots::start(&daemon)?;
        read_ahead::start_settling(&daemon);
        Ok(daemon)
    }

    /// Unmount everything not in use while the frontend still serves, then stop the event
    /// loops. A mount still in use (a container's overlay over a lazy image, an open file)
    /// stays mounted and listed, and the guard keeps the frontend's group: readers get EIO,
    /// never a hole's zeros, until the next daemon takes it over.
    pub async fn shutdown(&self) {
        let busy = self.unmount_all_unused().await;
        let keep_guard = !busy.is_empty();
        *lock(&self.mounts) = busy;
        self.persist_mounts().await;
        let guard = lock(&self.guard).take();
        match (guard, keep_guard) {
            // nothing is mounted any more: the guard can go without taking over
            (Some(g), false) => g.release(),
            (Some(g), true) => {
                // kept until this process ends: then the guard takes the group over
                tracing::warn!("mounts in use: the guard keeps their group until the next daemon");
                *lock(&self.guard) = Some(g);
            }
            (None, _) => {}
        }
        let _ = self.stop.send(true);
        let loops: Vec<_> = std::mem::take(&mut *lock(&self.loops));
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

    /// A receiver that fires when the daemon stops.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Wait until an event loop ends on its own (an error), returning it.
    pub async fn failed_loop(&self) -> anyhow::Error {
        let l = lock(&self.loops).pop();
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

/// Create the frontend of kind `kind`; whether it adopted a fanotify group (with its marks)
/// from a previous daemon.
fn bring_up(
    kind: Frontend,
    config: &Config,
    catalog: &Arc<Catalog>,
    engine: &Arc<Engine>,
    group: Option<nix::sys::fanotify::Fanotify>,
) -> Result<(ActiveFrontend, bool)> {
    let admission = Admission::new(config.engine.max_reads_in_flight);
    match kind {
        Frontend::Cachefiles => {
            let c = Cachefiles::bind(
                &config.daemon.cache_dir,
                &config.daemon.tag,
                Arc::clone(catalog),
                Arc::clone(engine),
                admission,
            )
            .context("binding the cachefiles on-demand cache")?;
            Ok((ActiveFrontend::Cachefiles(c), false))
        }
        Frontend::Fanotify => {
            let group = match group {
                Some(g) => Some(g),
                None => guard::reclaim(&config.daemon.state_dir).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "could not take over from a waiting guard");
                    None
                }),
            };
            let adopted = group.is_some();
            let f = FanotifyFrontend::new(
                &config.daemon.cache_dir,
                Arc::clone(engine),
                group,
                config.engine.read_ahead_max,
                config.engine.fill_after_idle,
                config.engine.pin_metadata,
                admission,
            )
            .context("creating the fanotify pre-content group")?;
            Ok((ActiveFrontend::Fanotify(f), adopted))
        }
    }
}
