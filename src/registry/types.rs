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
}
