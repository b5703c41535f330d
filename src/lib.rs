//! lazyblob: lazy-loading EROFS images from OCI registries.
//!
//! The data path of one cold read, top to bottom:
//! `frontend` (kernel requests) -> `catalog` (which blob) -> `engine` (chunks, single-flight,
//! verification) -> `registry` (auth, mirrors, retries). `image` holds the format and the
//! EROFS writer; `daemon` wires them together, `snapshotter` serves containerd, `api` is the
//! admin socket and `service` runs the daemon with it (what `lazyblob daemon` does).

pub mod api;
pub mod catalog;
pub mod commands;
pub mod config;
pub mod cri;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod engine;
pub mod frontend;
pub mod image;
pub mod lock;
pub mod malloc;
pub mod metrics;
pub mod node;
pub mod prefetch;
pub mod private_fs;
pub mod recycle;
pub mod registry;
pub mod service;
pub mod snapshotter;
