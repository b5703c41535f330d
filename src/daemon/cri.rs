//! The CRI proxy's wiring: the store of captured pull secrets (shared with the registry
//! client, which uses them for lazy reads) and the proxy started on the configured socket.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::Daemon;
use crate::config::Config;
use crate::cri::proxy::Proxy;
use crate::registry::captured::Captured;

/// Where the captured pull secrets are kept.
const FILE: &str = "cri-auths.json";

/// The store of captured pull secrets, when the proxy is configured (read from the state
/// directory, so a restart still has them).
pub(super) fn captured(config: &Config) -> Result<Option<Arc<Captured>>> {
    if config.cri.socket.is_none() {
        return Ok(None);
    }
    let path = config.daemon.state_dir.join(FILE);
    let c = Captured::open(&path, config.cri.credentials_ttl)
        .with_context(|| format!("reading the captured pull secrets {}", path.display()))?;
    tracing::info!(kept = c.len(), "captured pull secrets loaded");
    Ok(Some(Arc::new(c)))
}

/// Serve the CRI image-service proxy if `[cri] socket` is set.
pub(super) fn start(daemon: &Arc<Daemon>, captured: Option<Arc<Captured>>) {
    let (Some(socket), Some(captured)) = (daemon.config.cri.socket.clone(), captured) else {
        return;
    };
    let proxy = Proxy::new(&daemon.config.cri.containerd_socket, captured);
    let stop = daemon.stopping();
    tokio::spawn(async move {
        if let Err(e) = proxy.serve(&socket, stop).await {
            tracing::error!(error = %e, "the CRI proxy stopped");
        }
    });
}
