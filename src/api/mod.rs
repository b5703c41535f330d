//! The admin API: HTTP with small JSON bodies over a unix socket. This module holds its wire
//! types; `server` answers it for whatever implements [`server::Admin`] (the daemon, wired
//! in [`crate::service`]), `client` is what the CLI verbs (`status`, `register`) use.

#![forbid(unsafe_code)]

pub mod client;
pub mod peer;
pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::frontend::mount::SpecialFiles;
use crate::frontend::Frontend;

/// Where the daemon's admin socket is unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lazyblob/lazyblob.sock";

/// `POST /v1/images`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The image reference (`host/repo:tag` or `host/repo@digest`).
    pub reference: String,
}

/// `POST /v1/mounts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    /// The image reference.
    pub reference: String,
    /// The directory to mount on (canonical, existing).
    pub target: PathBuf,
    /// `nosuid,nodev` unless `honoured`.
    #[serde(default)]
    pub special_files: SpecialFiles,
}

/// `POST /v1/umount`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UmountRequest {
    /// The mount point.
    pub target: PathBuf,
    #[serde(default)]
    /// Detach the mount if it is busy.
    pub lazy: bool,
}

/// A registered image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The reference it was registered as.
    pub reference: String,
    /// Digest of its image manifest.
    pub manifest_digest: String,
    /// The EROFS fsid (`lb-<manifest digest prefix>`).
    pub fsid: String,
    /// Size of the metadata blob.
    pub meta_size: u64,
    /// Number of data blobs.
    pub data_blobs: usize,
    /// What a full pull would download.
    pub total_size: u64,
}

/// A lazy mount of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountInfo {
    /// The reference mounted.
    pub reference: String,
    /// The mount point.
    pub target: PathBuf,
    /// The image's fsid.
    pub fsid: String,
    /// The kernel frontend serving it.
    pub frontend: Frontend,
    /// Whether setuid bits and device nodes take effect.
    pub special_files: SpecialFiles,
}

/// An error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, with its context chain.
    pub error: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// lazyblob's version.
    pub version: String,
    /// The kernel frontend in use (`cachefiles` or `fanotify`).
    pub frontend: String,
    /// The running kernel's release.
    pub kernel: String,
    /// Registered images.
    pub images: Vec<ImageInfo>,
    /// Lazy mounts of the daemon.
    pub mounts: Vec<MountInfo>,
    /// Bytes held by the blob cache on disk (fanotify frontend).
    pub cache_bytes: u64,
    /// Objects the kernel has open (cachefiles).
    pub open_objects: usize,
    /// Chunk fetches in flight.
    pub inflight_chunks: usize,
    /// Blob engine counters.
    pub engine: EngineCounters,
    /// Registry client counters.
    pub registry: RegistryCounters,
    /// The frontend's own counters.
    pub frontend_counters: serde_json::Value,
}

/// Blob engine counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineCounters {
    /// Chunks fetched from a registry.
    pub chunks_fetched: u64,
    /// Range requests sent (merged runs of chunks).
    pub range_requests: u64,
    /// Reads served by a fetch another reader started.
    pub shared_hits: u64,
    /// Bytes handed to readers.
    pub bytes_served: u64,
    /// Reads that failed (the reader got EIO).
    pub failed_reads: u64,
    /// Reads served by their leaves, without the rest of their chunk (format 3).
    #[serde(default)]
    pub leaf_reads: u64,
    /// Times a fetch made ahead of readers paused until units waiting to be written were let
    /// go (`engine.ahead_buffer_max`).
    #[serde(default)]
    pub ahead_pauses: u64,
    /// Of those, pauses that ended after a second without room: units fetched ahead were held
    /// and not written.
    #[serde(default)]
    pub ahead_pauses_expired: u64,
}

/// Registry counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistryCounters {
    /// HTTP requests sent.
    pub requests: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Attempts repeated after a retryable fault.
    pub retries: u64,
    /// Requests that failed for good.
    pub failures: u64,
}
