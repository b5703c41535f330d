//! lazyblob as a containerd proxy snapshotter (`[proxy_plugins.lazyblob] type = "snapshot"`):
//! containerd's snapshots API served on a unix socket, in the daemon's process. Snapshots
//! are kept like containerd's overlayfs snapshotter keeps them (a directory per snapshot,
//! overlay mounts of a snapshot over its committed ancestors), so any image unpacks and runs.
//!
//! `store` keeps the snapshot table, `filter` reads containerd's list filters, `mounts`
//! turns a snapshot into the mounts containerd performs, `service` answers the gRPC calls.

pub mod api;
pub mod filter;
pub mod mounts;
pub mod service;
pub mod store;
