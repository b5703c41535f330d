//! The daemon: wires registry, engine, catalog, kernel frontend and admin API together and
//! runs them until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::engine::Engine;
use crate::frontend::{self, cachefiles::Cachefiles, Frontend, KernelFacts};
use crate::registry::Registry;

/// The running daemon's shared parts.
pub struct Daemon {
    pub config: Config,
    pub kernel: KernelFacts,
    pub frontend: Frontend,
    pub engine: Arc<Engine>,
    pub catalog: Arc<Catalog>,
    pub cachefiles: Option<Arc<Cachefiles>>,
}

impl Daemon {
    pub fn frontend_name(&self) -> &'static str {
        match self.frontend {
            Frontend::Cachefiles => "cachefiles",
            Frontend::Fanotify => "fanotify",
        }
    }
}

/// Run the daemon with `config` until a signal arrives.
pub async fn run(config: Config) -> Result<()> {
    let kernel = KernelFacts::read();
    let frontend =
        frontend::choose(&kernel, config.daemon.frontend).context("choosing a kernel frontend")?;
    tracing::info!(kernel = %kernel.release, ?frontend, "starting lazyblob");

    let registry = Arc::new(
        Registry::new(&config.registry, config.engine.max_concurrent_fetches)
            .context("setting up the registry client")?,
    );
    let engine = Arc::new(Engine::new(Arc::clone(&registry), config.engine.clone()));
    let catalog = Arc::new(Catalog::new(
        Arc::clone(&registry),
        &config.daemon.state_dir,
    ));

    for (reference, err) in catalog
        .restore()
        .await
        .context("restoring registered images")?
    {
        tracing::error!(reference, error = %err, "a persisted image could not be restored");
    }
    for reference in &config.daemon.images {
        if let Err(e) = catalog.register(reference).await {
            tracing::error!(reference, error = %e, "an image from the config could not be registered");
        }
    }

    let cachefiles = match frontend {
        Frontend::Cachefiles => Some(
            Cachefiles::bind(
                &config.daemon.cache_dir,
                &config.daemon.tag,
                Arc::clone(&catalog),
                Arc::clone(&engine),
            )
            .context("binding the cachefiles on-demand cache")?,
        ),
        Frontend::Fanotify => None,
    };
    let daemon = Arc::new(Daemon {
        kernel,
        frontend,
        engine,
        catalog,
        cachefiles: cachefiles.clone(),
        config: config.clone(),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api = {
        let daemon = Arc::clone(&daemon);
        let socket = config.daemon.socket.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move { crate::api::server::serve(daemon, &socket, stop).await })
    };
    let serve = cachefiles.map(|c| tokio::spawn(c.run(stop_rx.clone())));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM, shutting down"),
        r = async { match serve { Some(s) => s.await, None => std::future::pending().await } } => {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(anyhow::Error::new(e).context("cachefiles event loop failed")),
                Err(e) => return Err(anyhow::Error::new(e).context("cachefiles event loop panicked")),
            }
        }
    }
    let _ = stop_tx.send(true);
    match api.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "admin API failed"),
        Err(e) => tracing::error!(error = %e, "admin API task failed"),
    }
    let _ = std::fs::remove_file(&config.daemon.socket);
    Ok(())
}
