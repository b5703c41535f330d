//! `lazyblob daemon`: the daemon with its admin API on the configured socket, until SIGINT or
//! SIGTERM (or a failed frontend loop), then a clean shutdown. This is the one place that
//! wires the admin API to the daemon; neither knows the other.

#![forbid(unsafe_code)]

mod admin;

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::daemon::{Daemon, Takeover};

/// Run the daemon with `config` until SIGINT/SIGTERM: start (taking over from a daemon
/// that runs already: an upgrade), serve the admin API, shut down.
pub async fn run(config: Config) -> Result<()> {
    let read_only_group = match &config.daemon.socket_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .with_context(|| format!("daemon.socket_group {name:?}"))?
                .with_context(|| format!("daemon.socket_group {name:?}: no such group"))?
                .gid,
        ),
        None => None,
    };
    let takeover = if std::os::unix::net::UnixStream::connect(&config.daemon.socket).is_ok() {
        // another daemon serves: ask it to hand over (a planned upgrade)
        crate::api::client::ApiClient::new(&config.daemon.socket)?
            .hand_over()
            .await
            .context("another lazyblob daemon runs and did not hand over")?;
        tracing::warn!("taking over from the running daemon");
        Takeover::FromRunning
    } else {
        Takeover::IfWaiting
    };
    let daemon = Daemon::start(config.clone(), takeover).await?;
    let (api_stop, api_rx) = tokio::sync::watch::channel(false);
    let api = {
        let admin = Arc::new(admin::DaemonAdmin(Arc::clone(&daemon)));
        let socket = config.daemon.socket.clone();
        tokio::spawn(async move { crate::api::server::serve(admin, &socket, read_only_group, api_rx).await })
    };
    let metrics = config.metrics.address.map(|addr| {
        let (weak, stop) = (Arc::downgrade(&daemon), api_stop.subscribe());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, weak, stop).await {
                tracing::error!(error = %e, %addr, "the metrics endpoint failed");
            }
        })
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT, shutting down"); Ok(()) }
        _ = term.recv() => { tracing::info!("SIGTERM, shutting down"); Ok(()) }
        e = daemon.failed_loop() => Err(e),
    };
    daemon.shutdown().await;
    let _ = api_stop.send(true);
    if let Some(m) = metrics {
        let _ = m.await;
    }
    match api.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "admin API failed"),
        Err(e) => tracing::error!(error = %e, "admin API task failed"),
    }
    let _ = std::fs::remove_file(&config.daemon.socket);
    outcome
}
