//! The daemon: registry, engine, catalog and the kernel frontend wired together.
//! [`Daemon::start`] brings the parts up (the demo, tests and [`crate::service`] embed it),
//! [`Daemon::shutdown`] unmounts what it can before the frontend goes away, so no mount is
//! left without its listener. Its jobs live beside: the mount table (`mounts`), the
//! read-ahead policy of mounts (`read_ahead`), the cache limit (`eviction`) and the
//! containerd snapshotter's view of it (`snapshots`).

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

mod cri;
mod eviction;
pub use eviction::EvictionStats;
mod mounts;
mod prefetch;
mod read_ahead;
mod snapshots;

pub use mounts::MountRecord;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::engine::Engine;
use crate::frontend::active::ActiveFrontend;
use crate::frontend::admission::Admission;
use crate::frontend::fanotify::journal::Journal;
use crate::frontend::fanotify::serve::Settings;
use crate::frontend::fanotify::FanotifyFrontend;
use crate::frontend::guard;
use crate::frontend::{
    self,
    cachefiles::{Cachefiles, Serving},
    Frontend, KernelFacts,
};
use crate::lock::lock;
use crate::registry::Registry;

/// Where a starting daemon's fanotify group comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// From the guard of a daemon that stopped, if one waits; else a new group.
    IfWaiting,
    /// From the daemon that runs now, asked to hand over (an upgrade): its guard is waited for.
    FromRunning,
}

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
    /// What the cache limit evicted.
    pub evicted: eviction::EvictionStats,
    /// Records what images' first starts read (startup prefetch lists).
    pub recorder: Arc<crate::prefetch::Recorder>,
    mounts: Mutex<Vec<MountRecord>>,
    /// The fanotify group's keeper should this process die (None: cachefiles, or released).
    guard: Mutex<Option<guard::Guard>>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Whether this daemon took its kernel fd over from a stopped or upgraded one.
    took_over: bool,
    loops: Mutex<Vec<tokio::task::JoinHandle<std::io::Result<()>>>>,
}

/// Age past which a state file's temporary is a crashed writer's, never a live one's.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(600);

impl Daemon {
    /// Bring up registry client, engine, catalog (restoring persisted images) and the kernel
    /// frontend with its event loop; `takeover` says where a fanotify group may come from.
    pub async fn start(config: Config, takeover: Takeover) -> Result<Arc<Daemon>> {
        for dir in [&config.daemon.state_dir, &config.daemon.cache_dir] {
            crate::private_fs::private_dir(dir).with_context(|| format!("creating {} (mode 0700)", dir.display()))?;
        }
        // what a crash between creating a state file's temporary and renaming it left
        match crate::private_fs::sweep_temps(&config.daemon.state_dir, STALE_TEMP_AGE) {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, "removed temporary files a crashed daemon left"),
            Err(e) => tracing::warn!(error = %e, "could not sweep stale temporary files"),
        }
        let kernel = KernelFacts::read();
        let kind = frontend::choose(&kernel, config.daemon.frontend).context("choosing a kernel frontend")?;
        tracing::info!(kernel = %kernel.release, frontend = ?kind, "starting lazyblob");
        let captured = cri::captured(&config)?;
        let mut registry = Registry::new(&config.registry, config.engine.max_concurrent_fetches)
            .context("setting up the registry client")?;
        if let Some(c) = &captured {
            registry = registry.with_captured(Arc::clone(c));
        }
        let registry = Arc::new(registry);
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
        let recorder = Arc::new(crate::prefetch::Recorder::default());
        let (frontend, adopted) = bring_up(kind, &config, &catalog, &engine, &recorder, takeover).await?;
        let g = guard::Guard::spawn(
            kind,
            &frontend.kernel_fds(),
            &config.daemon.state_dir,
            config.daemon.restart_hold,
        )
        .context("starting the guard")?;
        frontend.set_keeper(g.keeper().context("the guard's keeper socket")?);
        let guard = Some(g);
        let daemon = Arc::new(Daemon {
            config,
            kernel,
            frontend,
            engine,
            catalog,
            evicted: Default::default(),
            recorder,
            mounts: Mutex::new(Vec::new()),
            guard: Mutex::new(guard),
            stop,
            took_over: adopted,
            loops: Mutex::new(Vec::new()),
        });
        daemon.recover_mounts().await;
        // what a stopped daemon left pending is answered before any new event is read
        if let ActiveFrontend::Fanotify(f) = &daemon.frontend {
            let served = f.resolve_orphans().await;
            if served > 0 {
                tracing::info!(readers = served, "readers of the stopped daemon served");
            }
        }
        lock(&daemon.loops).push(daemon.frontend.spawn(stop_rx));
        snapshots::start(&daemon)?;
        cri::start(&daemon, captured);
        read_ahead::start_settling(&daemon);
        Ok(daemon)
    }

    /// Unmount everything not in use while the frontend still serves, then stop the event
    /// loops. A mount still in use (a container's overlay over a lazy image, an open file)
    /// stays mounted and listed, and the guard keeps the kernel fd: it holds the readers
    /// (never a hole's zeros) until the next daemon takes it over.
    pub async fn shutdown(&self) {
        for m in self.mounts() {
            if let Some(image) = self.catalog.get(&m.fsid) {
                self.end_recording(&image);
            }
        }
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

    /// Whether this daemon took its kernel fd over from a stopped or upgraded one.
    pub fn took_over(&self) -> bool {
        self.took_over
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

/// The group (and writers) a guard hands over: one that waits already, or, in an upgrade,
/// the one the running daemon's guard starts waiting with once that daemon exits.
async fn reclaim(state_dir: &std::path::Path, kind: Frontend, takeover: Takeover) -> Result<Option<guard::Handover>> {
    let t0 = std::time::Instant::now();
    loop {
        match guard::reclaim(state_dir, kind) {
            Ok(Some(h)) => return Ok(Some(h)),
            Ok(None) if takeover == Takeover::FromRunning && t0.elapsed() < std::time::Duration::from_secs(20) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Ok(None) if takeover == Takeover::FromRunning => {
                anyhow::bail!("the running daemon's guard never offered its group")
            }
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "could not take over from a waiting guard");
                return Ok(None);
            }
        }
    }
}

/// Create the frontend of kind `kind`; whether it adopted a fanotify group (with its marks)
/// from a previous daemon.
async fn bring_up(
    kind: Frontend,
    config: &Config,
    catalog: &Arc<Catalog>,
    engine: &Arc<Engine>,
    recorder: &Arc<crate::prefetch::Recorder>,
    takeover: Takeover,
) -> Result<(ActiveFrontend, bool)> {
    let admission = Admission::new(config.engine.max_reads_in_flight);
    match kind {
        Frontend::Cachefiles => {
            let handover = reclaim(&config.daemon.state_dir, kind, takeover).await?;
            let adopted = handover.is_some();
            let how = Serving {
                catalog: Arc::clone(catalog),
                engine: Arc::clone(engine),
                admission,
                read_ahead_max: config.engine.read_ahead_max,
                recorder: Arc::clone(recorder),
                fill_after: config.engine.fill_after_idle,
            };
            let c = match handover {
                Some(h) => Cachefiles::adopt(h, how).context("taking over the cachefiles cache")?,
                None => Cachefiles::bind(&config.daemon.cache_dir, &config.daemon.tag, how)
                    .context("binding the cachefiles on-demand cache")?,
            };
            Ok((ActiveFrontend::Cachefiles(c), adopted))
        }
        Frontend::Fanotify => {
            for (dir, what) in [
                (&config.daemon.cache_dir, "cache_dir"),
                (&config.daemon.state_dir, "state_dir"),
            ] {
                crate::frontend::fanotify::cache::check_backing_dir(dir, what)?;
            }
            let handover = reclaim(&config.daemon.state_dir, kind, takeover).await?;
            let adopted = handover.is_some();
            let journal = Journal::open(
                &config
                    .daemon
                    .state_dir
                    .join(crate::frontend::fanotify::journal::FILE_NAME),
                config.engine.max_reads_in_flight + 2048,
            )
            .context("opening the journal of events in flight")?;
            let settings = Settings {
                read_ahead_max: config.engine.read_ahead_max,
                drop_behind: config.engine.drop_behind,
                fill_after: config.engine.fill_after_idle,
                pin_metadata: config.engine.pin_metadata,
                groups: config.engine.fanotify_groups,
                recorder: Arc::clone(recorder),
                busy_poll: config.engine.busy_poll,
            };
            let f = FanotifyFrontend::new(
                &config.daemon.cache_dir,
                Arc::clone(engine),
                handover,
                settings,
                admission,
                journal,
            )
            .context("creating the fanotify pre-content group")?;
            Ok((ActiveFrontend::Fanotify(f), adopted))
        }
    }
}
