//! What the registry client hands out: where a blob lives, a resolved manifest, counters.

#![forbid(unsafe_code)]

use bytes::Bytes;
use oci_client::manifest::OciImageManifest;
use oci_client::Reference;

use crate::image::digest::Digest;

/// Media types accepted when resolving a reference.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
    oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    oci_client::manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    oci_client::manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Where a blob lives: a repository and a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSource {
    /// Registry and repository (tag or digest of the reference is ignored).
    pub repo: Reference,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
}

/// An image manifest after index resolution.
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    /// The image manifest.
    pub manifest: OciImageManifest,
    /// Digest of the image manifest itself (not of an index that pointed to it).
    pub digest: Digest,
    /// The manifest's bytes as served.
    pub raw: Bytes,
}

/// Counters and request latency of one registry host for one kind of request.
#[derive(Debug)]
pub struct HostStats {
    /// HTTP requests sent.
    pub requests: std::sync::atomic::AtomicU64,
    /// Attempts repeated.
    pub retries: std::sync::atomic::AtomicU64,
    /// Operations that failed for good on this host.
    pub failures: std::sync::atomic::AtomicU64,
    /// Body bytes received.
    pub bytes: std::sync::atomic::AtomicU64,
    /// Seconds from sending a request to the end of its body.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for HostStats {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        HostStats {
            requests: Default::default(),
            retries: Default::default(),
            failures: Default::default(),
            bytes: Default::default(),
            // 1 ms to ~4 min
            latency: Histogram::new(exponential_buckets(0.001, 2.5, 14)),
        }
    }
}

/// Counters exported in `status`.
#[derive(Debug, Default)]
pub struct RegistryStats {
    /// HTTP requests sent.
    pub requests: std::sync::atomic::AtomicU64,
    /// Body bytes received.
    pub bytes: std::sync::atomic::AtomicU64,
    /// Attempts repeated.
    pub retries: std::sync::atomic::AtomicU64,
    /// Requests that failed for good.
    pub failures: std::sync::atomic::AtomicU64,
    /// The same by host and kind of request (`manifest`, `range`).
    hosts: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), std::sync::Arc<HostStats>>>,
}

impl RegistryStats {
    /// The statistics of `host` for requests of kind `op`.
    pub fn host(&self, host: &str, op: &'static str) -> std::sync::Arc<HostStats> {
        let mut hosts = crate::lock::lock(&self.hosts);
        std::sync::Arc::clone(hosts.entry((host.to_string(), op)).or_default())
    }

    /// Every host's statistics: (host, kind of request, statistics).
    pub fn hosts(&self) -> Vec<(String, &'static str, std::sync::Arc<HostStats>)> {
        crate::lock::lock(&self.hosts)
            .iter()
            .map(|((h, op), s)| (h.clone(), *op, std::sync::Arc::clone(s)))
            .collect()
    }
}
