//! lazyblob as a containerd proxy snapshotter (`[proxy_plugins.lazyblob] type = "snapshot"`):
//! containerd's snapshots API served on a unix socket, in the daemon's process. Layers of
//! lazyblob images are committed remotely and read through the image's lazy EROFS mount (the
//! daemon's blob engine and kernel frontend); every other snapshot is kept like containerd's
//! overlayfs snapshotter keeps it, so any image unpacks and runs.
//!
//! `store` keeps the snapshot table, `filter` reads containerd's list filters, `remote` tells
//! lazyblob layers apart, `mounts` turns a snapshot into the mounts containerd performs,
//! `service` answers the gRPC calls.

#![forbid(unsafe_code)]

pub mod api;
pub mod filter;
pub mod mounts;
pub mod remote;
pub mod service;
pub mod store;
