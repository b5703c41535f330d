//! The `[registry]` table: timeouts, retries, size ceilings, per-host transport, mirrors and
//! credentials (lazyblob's own `[[registry.hosts]]`, then containerd's `hosts.toml` files).

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::units;
use crate::registry::platform::Platform;

/// Registry access: timeouts, retries, credentials, per-host settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// `connect_timeout_ms`.
    #[serde(rename = "connect_timeout_ms", deserialize_with = "units::millis")]
    pub connect_timeout: Duration,
    /// Limit for one HTTP request that moves no bulk data, and for a connection without a
    /// byte (`request_timeout_ms`); transfers get more (see `min_rate_kib_s`).
    #[serde(rename = "request_timeout_ms", deserialize_with = "units::millis")]
    pub request_timeout: Duration,
    /// Attempts per endpoint (first try included) on retryable faults.
    pub max_attempts: u32,
    /// First pause between attempts (`backoff_initial_ms`), doubling up to `backoff_max`.
    #[serde(rename = "backoff_initial_ms", deserialize_with = "units::millis")]
    pub backoff_initial: Duration,
    /// `backoff_max_ms`.
    #[serde(rename = "backoff_max_ms", deserialize_with = "units::millis")]
    pub backoff_max: Duration,
    /// Upper bound for one fetch across all retries and mirrors (`deadline_ms`): after it,
    /// readers get EIO.
    #[serde(rename = "deadline_ms", deserialize_with = "units::millis")]
    pub deadline: Duration,
    /// Slowest transfer rate (KiB/s) still taken for progress: a request moving `n` KiB gets
    /// `n / min_rate_kib_s` seconds on top of `request_timeout_ms` and of `deadline_ms`, so
    /// large blobs (layers, whole metadata blobs, pushes) are not cut off by limits sized for
    /// chunks. 0 gives no allowance. A connection that stalls is still dropped after
    /// `request_timeout_ms` without a byte.
    #[serde(deserialize_with = "units::nonzero_u64")]
    pub min_rate_kib_s: Option<NonZeroU64>,
    /// docker `config.json` for `auths`, `credHelpers` and `credsStore` (default: $DOCKER_CONFIG
    /// or ~/.docker/config.json when present).
    pub docker_config: Option<PathBuf>,
    /// containerd's registry hosts directory (`/etc/containerd/certs.d`): its `hosts.toml`
    /// files add mirrors, CAs and `skip_verify` for hosts `hosts` does not configure.
    pub containerd_hosts_dir: Option<PathBuf>,
    /// Platform picked from an image index, `os/arch[/variant]` (default: this node's).
    #[serde(deserialize_with = "units::parsed")]
    pub platform: Option<Platform>,
    /// Ceilings on what a registry may make the daemon hold, checked before allocating.
    pub limits: LimitsConfig,
    /// Per-host settings: transport, mirrors, credentials.
    pub hosts: Vec<HostConfig>,
}

/// Ceilings on sizes a registry announces (`[registry.limits]`), enforced before any buffer
/// is sized from them. The defaults fit real images with room to spare: a manifest of a
/// 100-layer image is about 30 KB, the metadata blob of 1.6 M files about 200 MB, the chunk
/// table of 1 TB of data at 1 MiB chunks 64 MB.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest manifest or index body (the distribution registry itself refuses over 4 MiB).
    pub max_manifest_bytes: u64,
    /// Largest EROFS metadata blob (fetched whole, kept and locked in memory while mounted).
    pub max_metadata_bytes: u64,
    /// Largest chunk digest table (fetched whole and parsed in memory).
    pub max_table_bytes: u64,
    /// Largest verified chunk a table may declare (sizes fetch units and their buffers).
    pub max_chunk_size: u64,
}

/// One ceiling of [`LimitsConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_manifest_bytes`.
    Manifest,
    /// `max_metadata_bytes`.
    Metadata,
    /// `max_table_bytes`.
    Table,
    /// `max_chunk_size`.
    ChunkSize,
}

impl Limit {
    /// The key under `[registry.limits]`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Manifest => "max_manifest_bytes",
            Limit::Metadata => "max_metadata_bytes",
            Limit::Table => "max_table_bytes",
            Limit::ChunkSize => "max_chunk_size",
        }
    }
}

/// A size a registry announced or sent over one of the [`LimitsConfig`] ceilings.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what} of {size} bytes exceeds registry.limits.{name} ({max} bytes)", name = .limit.name())]
pub struct TooLarge {
    /// What was too large (a manifest, a blob...).
    pub what: String,
    /// Its size.
    pub size: u64,
    /// The ceiling it exceeds.
    pub limit: Limit,
    /// That ceiling's value.
    pub max: u64,
}

impl LimitsConfig {
    /// The value of one ceiling.
    pub fn max(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Manifest => self.max_manifest_bytes,
            Limit::Metadata => self.max_metadata_bytes,
            Limit::Table => self.max_table_bytes,
            Limit::ChunkSize => self.max_chunk_size,
        }
    }

    /// `size` of `what` within `limit`?
    pub fn check(&self, limit: Limit, what: &str, size: u64) -> Result<(), TooLarge> {
        let max = self.max(limit);
        if size > max {
            return Err(TooLarge {
                what: what.to_string(),
                size,
                limit,
                max,
            });
        }
        Ok(())
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_manifest_bytes: 4 << 20,
            max_metadata_bytes: 512 << 20,
            max_table_bytes: 128 << 20,
            max_chunk_size: 16 << 20,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_attempts: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(4),
            deadline: Duration::from_secs(60),
            min_rate_kib_s: NonZeroU64::new(512),
            docker_config: None,
            containerd_hosts_dir: None,
            platform: None,
            limits: LimitsConfig::default(),
            hosts: Vec::new(),
        }
    }
}

impl RegistryConfig {
    /// Settings for one registry host, if configured.
    pub fn host(&self, host: &str) -> Option<&HostConfig> {
        self.hosts.iter().find(|h| h.host == host)
    }
}

/// Settings for one registry host (`host` or `host:port`).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The host (`host` or `host:port`) these settings are for.
    pub host: String,
    /// Plain HTTP instead of TLS. Only for registries you trust on a trusted network.
    pub insecure: bool,
    /// Extra PEM CA certificates to trust for this host only (with TLS).
    pub ca_file: Option<PathBuf>,
    /// TLS without verifying the host's certificate (containerd's `skip_verify`): anyone on
    /// the path can read and change the traffic; image data is still verified by digest.
    pub skip_verify: bool,
    /// Mirrors tried in order before the origin (`host[:port]`).
    pub mirrors: Vec<String>,
    /// Basic-auth user name.
    pub username: Option<String>,
    /// Basic-auth password (prefer `password_file`).
    pub password: Option<String>,
    /// Read the password from a file instead (trailing newline trimmed).
    pub password_file: Option<PathBuf>,
    /// A static bearer token.
    pub token: Option<String>,
}

/// How lazyblob talks to one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport<'a> {
    /// TLS verified against the system (or bundled) roots.
    Tls,
    /// TLS verified against those roots and this host's own CA file.
    TlsWithCa(&'a Path),
    /// Plain HTTP (`insecure = true`).
    Plain,
    /// TLS whose certificate is not verified (`skip_verify = true`).
    TlsUnverified,
}

impl HostConfig {
    /// The transport of this host (validation refuses `insecure` with a `ca_file`).
    pub fn transport(&self) -> Transport<'_> {
        match (self.insecure, self.skip_verify, &self.ca_file) {
            (true, _, _) => Transport::Plain,
            (false, true, _) => Transport::TlsUnverified,
            (false, false, Some(ca)) => Transport::TlsWithCa(ca),
            (false, false, None) => Transport::Tls,
        }
    }
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials are never printed.
        f.debug_struct("HostConfig")
            .field("host", &self.host)
            .field("insecure", &self.insecure)
            .field("ca_file", &self.ca_file)
            .field("skip_verify", &self.skip_verify)
            .field("mirrors", &self.mirrors)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}
