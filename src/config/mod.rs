//! The daemon's TOML configuration, read and validated once at start.
//!
//! Every field has a default, so an empty file is a valid configuration; see
//! `config/lazyblob.toml` for a documented example. Values are typed once, here, as the file
//! is read: milliseconds become `Duration`s, "0 means off" becomes `None`, the platform is
//! parsed; the rest of the daemon never decodes a setting again.

#![forbid(unsafe_code)]

use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod containerd_hosts;
mod registry;
mod units;

pub use registry::{HostConfig, Limit, LimitsConfig, RegistryConfig, TooLarge, Transport};

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What is wrong in it.
        source: toml::de::Error,
    },
    /// A value out of its range, or values that exclude each other.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where state, cache and sockets live; the kernel frontend.
    pub daemon: DaemonConfig,
    /// Blob engine tuning.
    pub engine: EngineConfig,
    /// Registry access.
    pub registry: RegistryConfig,
    /// The containerd snapshotter.
    pub snapshotter: SnapshotterConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// CRI image-service proxy (kubelet's pull secrets).
    pub cri: CriConfig,
    /// Startup prefetch: recording what an image's first start reads, fetching it first later.
    pub prefetch: PrefetchConfig,
}

/// Startup prefetch (`[prefetch]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// After mounting an image with no prefetch list, record the chunks its readers read for
    /// this long (`record_window_ms`, default 30 s; 0: never record); the list is kept under
    /// `<state_dir>/prefetch/` (an unmount within the window ends it early).
    #[serde(rename = "record_window_ms", deserialize_with = "units::millis_or_off")]
    pub record_window: Option<Duration>,
    /// On mount, fetch the image's prefetch list first (kept on this node, else pushed to its
    /// registry as an artifact referring to it), while the workload reads.
    pub replay: bool,
    /// Look for a list in the image's registry (its `sha256-<hex>` referrers tag, written by
    /// `lazyblob prefetch push`) when this node has none, while the mount proceeds.
    pub from_registry: bool,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            record_window: Some(Duration::from_secs(30)),
            replay: true,
            from_registry: true,
        }
    }
}

/// Prometheus metrics (`GET /metrics`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve metrics on this address (`127.0.0.1:9464`); unset: no endpoint. The metrics name
    /// images and counts reads: keep it on loopback or a node-local network.
    pub address: Option<std::net::SocketAddr>,
}

/// The CRI image-service proxy: kubelet's `--image-service-endpoint` points at `socket`,
/// every call goes on to containerd, and each `PullImage`'s credentials are kept for the
/// image's repository (root-only, `<state_dir>/cri-auths.json`) for lazy reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// Serve the CRI image service on this unix socket; unset: no proxy.
    pub socket: Option<PathBuf>,
    /// containerd's CRI socket, where every call is forwarded.
    pub containerd_socket: PathBuf,
    /// A captured credential is dropped once neither a pull nor a read of its repository
    /// used it for this long (`credentials_ttl_ms`, default 7 days).
    #[serde(rename = "credentials_ttl_ms", deserialize_with = "units::millis")]
    pub credentials_ttl: Duration,
}

impl Default for CriConfig {
    fn default() -> Self {
        CriConfig {
            socket: None,
            containerd_socket: PathBuf::from("/run/containerd/containerd.sock"),
            credentials_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// containerd's snapshots API (`[proxy_plugins.lazyblob] type = "snapshot"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// Serve the snapshots API on this unix socket (root only); unset: no snapshotter.
    pub socket: Option<PathBuf>,
    /// Snapshot directories and their table (default: `<state_dir>/snapshotter`).
    pub root: Option<PathBuf>,
}

/// Which kernel frontend serves mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendChoice {
    /// Probe the kernel: cachefiles on-demand if present, else fanotify pre-content.
    #[default]
    Auto,
    /// cachefiles on-demand only.
    Cachefiles,
    /// fanotify pre-content only.
    Fanotify,
}

/// Where the daemon keeps its state and how it talks to the kernel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Registered images (`state.json`) and verified metadata blobs.
    pub state_dir: PathBuf,
    /// The cachefiles cache directory (ext4 or xfs: the kernel refuses tmpfs).
    pub cache_dir: PathBuf,
    /// Admin API unix socket (mode 0600, root only; peers are checked with SO_PEERCRED).
    pub socket: PathBuf,
    /// A group whose members (by primary gid) may use the read-only part of the admin API
    /// (`lazyblob status`); the socket is then 0660 with this group.
    pub socket_group: Option<String>,
    /// The cachefiles cache tag.
    pub tag: String,
    /// Which kernel frontend serves mounts.
    pub frontend: FrontendChoice,
    /// Images registered at start, in addition to the persisted ones.
    pub images: Vec<String>,
    /// When this daemon stops or dies under mounts in use (fanotify), its guard holds their
    /// readers this long (`restart_hold_ms`) for the next daemon, which then serves them;
    /// past it they get `EIO` (never zeros).
    #[serde(rename = "restart_hold_ms", deserialize_with = "units::millis")]
    pub restart_hold: Duration,
    /// Upper bound of the fanotify frontend's blob cache in bytes (0 in the file: unlimited);
    /// blobs no mount uses are evicted, least recently written first.
    #[serde(deserialize_with = "units::nonzero_u64")]
    pub cache_limit_bytes: Option<NonZeroU64>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            state_dir: PathBuf::from("/var/lib/lazyblob"),
            cache_dir: PathBuf::from("/var/cache/lazyblob"),
            socket: PathBuf::from(crate::api::DEFAULT_SOCKET),
            socket_group: None,
            tag: "lazyblob".into(),
            frontend: FrontendChoice::Auto,
            images: Vec::new(),
            restart_hold: Duration::from_secs(30),
            cache_limit_bytes: None,
        }
    }
}

/// Most fanotify groups one daemon creates (`engine.fanotify_groups`).
pub const MAX_FANOTIFY_GROUPS: usize = 64;

/// Blob engine tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Fetch unit in bytes (rounded to a multiple of the image's verified chunk size).
    pub chunk_size: u64,
    /// Adjacent missing chunks are merged into one range request up to this many bytes.
    pub merge_max: u64,
    /// Recently completed chunks kept in memory (an LRU) beside the fetches in flight, until
    /// the frontend has stored them; each entry is one chunk, so this bounds the memory of
    /// fetched data.
    #[serde(alias = "inflight_capacity")]
    pub completed_chunks_kept: usize,
    /// Concurrent range requests per registry host; a quarter of them are kept for readers
    /// (fetches ahead of readers, which may pause, never hold them all).
    pub max_concurrent_fetches: usize,
    /// Kernel read requests (fanotify events, cachefiles READs) served at once. More wait in
    /// the kernel's queue, their readers blocked, until a slot frees: nothing is dropped, and
    /// the daemon's tasks, fds and buffers stay bounded however many readers arrive.
    pub max_reads_in_flight: usize,
    /// A chunk whose fetch failed fails at once for this long (`failed_fetch_hold_ms`, 0:
    /// never). Readers of one page queue behind each other in the kernel, one request at a
    /// time; without the hold, a stalled registry costs each of them a whole fetch deadline
    /// in turn.
    #[serde(rename = "failed_fetch_hold_ms", deserialize_with = "units::millis_or_off")]
    pub failed_fetch_hold: Option<Duration>,
    /// Read-ahead for sequential readers: the largest window in bytes (0 disables it). In
    /// bytes, not chunks, so images with small chunks still fetch in large runs.
    #[serde(deserialize_with = "units::nonzero_u64")]
    pub read_ahead_max: Option<NonZeroU64>,
    /// Sequential readers (fanotify frontend): the cache file's pages this many bytes behind
    /// the reader are let go (0: never), as the mount keeps its own copy of what was read.
    #[serde(deserialize_with = "units::nonzero_u64")]
    pub drop_behind: Option<NonZeroU64>,
    /// Bytes fetched ahead of readers (read-ahead, background fill, startup prefetch) that
    /// may wait to be written before those streams pause (0: no bound). Readers' own fetches
    /// never wait; a pause lasts at most a second.
    #[serde(deserialize_with = "units::nonzero_u64")]
    pub ahead_buffer_max: Option<NonZeroU64>,
    /// Kernel read-ahead of each lazyblob mount in KiB (0: leave the kernel's 128 KiB). A
    /// larger window means fewer, larger kernel requests for sequential readers.
    #[serde(deserialize_with = "units::nonzero_u32")]
    pub read_ahead_kb: Option<NonZeroU32>,
    /// Background fill: once a blob in use has seen no reader miss for this long
    /// (`fill_after_idle_ms`), and no reader of any blob has fetched for as long, the rest of
    /// it is fetched, one merged run at a time (fanotify:
    /// and its events stop; cachefiles: the kernel never asks for it again). 0 disables it
    /// (blobs then hold only what was read).
    #[serde(rename = "fill_after_idle_ms", deserialize_with = "units::millis_or_off")]
    pub fill_after_idle: Option<Duration>,
    /// Keep the metadata blob of each mounted image locked in memory (fanotify frontend), so
    /// lookups and directory reads never wait for the disk. Costs the metadata's size.
    pub pin_metadata: bool,
    /// fanotify groups the frontend spreads its cache files over (1-64). A reader blocked on
    /// a pre-content event sleeps on its group's one wait queue, which every answer wakes
    /// whole: with n readers waiting, n answers cost n² wake-ups. K groups divide that by K.
    /// Each group counts against `fs.fanotify.max_user_groups` (128 by default).
    pub fanotify_groups: usize,
    /// After an event answered from the cache (fanotify frontend), look for the next events
    /// without sleeping for this long (`busy_poll_us`, 0: never). Re-reads of cached data in
    /// a blob not complete yet raise an event per kernel read; waking for each costs more
    /// than answering it. Costs up to one core while such reads go on.
    #[serde(rename = "busy_poll_us", deserialize_with = "units::micros_or_off")]
    pub busy_poll: Option<Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunk_size: 1 << 20,
            // large: docker-registry spends milliseconds of CPU per request, and a run is
            // streamed unit by unit, so its size costs memory only for the units that arrived
            // and are not written yet, which `ahead_buffer_max` bounds for runs fetched ahead
            merge_max: 32 << 20,
            completed_chunks_kept: 8,
            max_concurrent_fetches: 8,
            max_reads_in_flight: 256,
            failed_fetch_hold: Some(Duration::from_secs(1)),
            read_ahead_max: NonZeroU64::new(64 << 20),
            drop_behind: NonZeroU64::new(16 << 20),
            ahead_buffer_max: NonZeroU64::new(4 << 20),
            read_ahead_kb: NonZeroU32::new(4096),
            fill_after_idle: Some(Duration::from_secs(1)),
            pin_metadata: true,
            fanotify_groups: 32,
            busy_poll: Some(Duration::from_micros(50)),
        }
    }
}

impl Config {
    /// Where the containerd snapshotter keeps its snapshots and image mounts
    /// (`[snapshotter] root`, default `<state_dir>/snapshotter`).
    pub fn snapshotter_root(&self) -> PathBuf {
        self.snapshotter
            .root
            .clone()
            .unwrap_or_else(|| self.daemon.state_dir.join("snapshotter"))
    }

    /// Read and validate `path`, or the defaults without one.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        path.map_or_else(|| Ok(Config::default()), Config::load)
    }

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if let Some(dir) = cfg.registry.containerd_hosts_dir.clone() {
            for h in containerd_hosts::read(&dir)? {
                // lazyblob's own settings for a host win
                if cfg.registry.host(&h.host).is_none() {
                    cfg.registry.hosts.push(h);
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.engine;
        if !crate::image::format::is_valid_chunk_size(e.chunk_size) {
            return Err(ConfigError::Invalid(format!(
                "engine.chunk_size {} must be a power of two >= 4096",
                e.chunk_size
            )));
        }
        if e.merge_max < e.chunk_size {
            return Err(ConfigError::Invalid(
                "engine.merge_max must be >= engine.chunk_size".into(),
            ));
        }
        if e.completed_chunks_kept == 0 || e.max_concurrent_fetches == 0 || e.max_reads_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "engine.completed_chunks_kept, engine.max_concurrent_fetches and engine.max_reads_in_flight must be > 0"
                    .into(),
            ));
        }
        if !(1..=MAX_FANOTIFY_GROUPS).contains(&e.fanotify_groups) {
            return Err(ConfigError::Invalid(format!(
                "engine.fanotify_groups {} must be between 1 and {MAX_FANOTIFY_GROUPS}",
                e.fanotify_groups
            )));
        }
        let r = &self.registry;
        let l = &r.limits;
        if l.max_manifest_bytes == 0 || l.max_metadata_bytes == 0 || l.max_table_bytes == 0 {
            return Err(ConfigError::Invalid("registry.limits must be > 0".into()));
        }
        if l.max_chunk_size < 4096 {
            return Err(ConfigError::Invalid(
                "registry.limits.max_chunk_size must be >= 4096".into(),
            ));
        }
        if r.max_attempts == 0 {
            return Err(ConfigError::Invalid("registry.max_attempts must be >= 1".into()));
        }
        for h in &r.hosts {
            if h.host.is_empty() {
                return Err(ConfigError::Invalid("registry.hosts entry without host".into()));
            }
            if h.insecure && h.ca_file.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "registry host {}: insecure (plain HTTP) and ca_file (TLS) are exclusive",
                    h.host
                )));
            }
            if h.token.is_some() && (h.username.is_some() || h.password.is_some()) {
                return Err(ConfigError::Invalid(format!(
                    "registry host {}: token and username/password are exclusive",
                    h.host
                )));
            }
        }
        if self.daemon.tag.is_empty() || self.daemon.tag.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid("daemon.tag must be a non-empty word".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
