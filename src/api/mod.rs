//! The admin API: HTTP with small JSON bodies over a unix socket. `server` answers it inside
//! the daemon, `client` is what the CLI verbs (`status`, `register`) use.

pub mod client;
pub mod peer;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::catalog::ImageInfo;

/// `POST /v1/images`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub reference: String,
}

/// `POST /v1/mounts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    pub reference: String,
    pub target: std::path::PathBuf,
    /// `nosuid,nodev` unless `honoured`.
    #[serde(default)]
    pub special_files: crate::frontend::mount::SpecialFiles,
}

/// `POST /v1/umount`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UmountRequest {
    pub target: std::path::PathBuf,
    #[serde(default)]
    pub lazy: bool,
}

/// An error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub frontend: String,
    pub kernel: String,
    pub images: Vec<ImageInfo>,
    pub mounts: Vec<crate::daemon::MountInfo>,
    /// Bytes held by the blob cache on disk (fanotify frontend).
    pub cache_bytes: u64,
    pub open_objects: usize,
    pub inflight_chunks: usize,
    pub engine: EngineCounters,
    pub registry: RegistryCounters,
    pub frontend_counters: serde_json::Value,
}

/// Blob engine counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineCounters {
    pub chunks_fetched: u64,
    pub range_requests: u64,
    pub shared_hits: u64,
    pub bytes_served: u64,
    pub failed_reads: u64,
}

/// Registry counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistryCounters {
    pub requests: u64,
    pub bytes: u64,
    pub retries: u64,
    pub failures: u64,
}
