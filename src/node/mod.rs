//! Setting up a node for lazyblob (what the DaemonSet's init step runs, `lazyblob
//! containerd-config`): containerd's config gets the proxy snapshotter and the CRI settings,
//! idempotently, with backups to restore on uninstall.

#![forbid(unsafe_code)]

pub mod containerd_edit;
pub mod containerd_files;

use crate::config::Config;
use crate::registry::platform::Platform;
use containerd_edit::Settings;

/// What containerd must be told about this lazyblob: its snapshotter socket and root from
/// lazyblob's config, the node's platform. `None` when the config serves no snapshotter.
pub fn settings(config: &Config) -> Option<Settings> {
    let socket = config.snapshotter.socket.clone()?;
    let platform = Platform::current();
    Some(Settings {
        socket,
        root: config.snapshotter_root(),
        platform: format!("{}/{}", platform.os, platform.arch),
    })
}
