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
    pub reference: String,
}

/// `POST /v1/mounts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    pub reference: String,
    pub target: PathBuf,
    /// `nosuid,nodev` unless `honoured`.
    #[serde(default)]
    pub special_files: SpecialFiles,
}

/// `POST /v1/umount`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UmountRequest {
    pub target: PathBuf,
    #[serde(default)]
    pub lazy: bool,
}

/// A registered image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub reference: String,
    pub manifest_digest: String,
    pub fsid: String,
    pub meta_size: u64,
    pub data_blobs: usize,
    /// What a full pull would download.
    pub total_size: u64,
}

/// A lazy mount of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountInfo {
    pub reference: String,
    pub target: PathBuf,
    pub fsid: String,
    pub frontend: Frontend,
    /// Whether setuid bits and device nodes take effect.
    pub special_files: SpecialFiles,
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
    pub mounts: Vec<MountInfo>,
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
