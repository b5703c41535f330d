//! The lazyblob image format, version 2 (see `docs/format.md`): an OCI image manifest whose
//! layers are an EROFS metadata blob, a chunk digest table, and one data blob per source
//! layer. Everything a reader sees is verified through the chain manifest digest ->
//! descriptor digests -> chunk digests. Version 2 gives the layers media types containerd
//! treats as layers and annotations that reach its snapshotter; version 1 images are read
//! too.

use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use super::chunk_hash::Hashing;
use super::digest::{Digest, DigestError};
use super::leaves::{is_valid_leaf_size, LeafLayout};
use crate::config::{Limit, LimitsConfig, TooLarge};

/// The EROFS metadata blob (4 KiB blocks, device table naming the data blobs).
pub const MEDIA_TYPE_META: &str = "application/vnd.oci.image.layer.lazyblob.meta.v2.erofs";
/// A data blob: file contents, each file starting on a 4 KiB boundary.
pub const MEDIA_TYPE_DATA: &str = "application/vnd.oci.image.layer.lazyblob.data.v2";
/// The chunk digest table (JSON, [`ChunkTable`]).
pub const MEDIA_TYPE_CHUNKS: &str = "application/vnd.oci.image.layer.lazyblob.chunks.v2+json";
/// The leaves layer (format 3): per chunk, the BLAKE3 chaining values of its leaves
/// ([`super::leaves`]).
pub const MEDIA_TYPE_LEAVES: &str = "application/vnd.oci.image.layer.lazyblob.leaves.v3";
/// Version 1 media types (read only).
pub const V1_MEDIA_TYPE_META: &str = "application/vnd.lazyblob.meta.v1.erofs";
/// Media type of a data layer (format version 1).
pub const V1_MEDIA_TYPE_DATA: &str = "application/vnd.lazyblob.data.v1";
/// Media type of the chunk table (format version 1).
pub const V1_MEDIA_TYPE_CHUNKS: &str = "application/vnd.lazyblob.chunks.v1+json";
/// Manifest annotation naming the format version.
pub const ANNOTATION_FORMAT: &str = "org.lazyblob.format";
/// The format version this build writes for images with leaves.
pub const FORMAT_VERSION: &str = "3";
/// The format version this build writes for images without leaves (SHA-256 chunks, or
/// leaves turned off): version 2 nodes read them.
pub const FORMAT_VERSION_NO_LEAVES: &str = "2";
/// Format versions this build reads.
pub const READ_VERSIONS: &[&str] = &["1", "2", "3"];
/// Layer annotation naming a layer's role (`meta`, `chunks`, `data`); containerd passes
/// `containerd.io/snapshot/` annotations to the snapshotter as labels.
pub const ANNOTATION_LAYER: &str = "containerd.io/snapshot/lazyblob.layer";
/// Default verified chunk size of data blobs.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Largest data blob the format accepts (guards size arithmetic against hostile tables).
pub const MAX_BLOB_SIZE: u64 = 1 << 44;
/// Smallest verified chunk: one page.
pub const MIN_CHUNK_SIZE: u64 = 4096;

/// The rule for chunk sizes (of images, and of the engine's fetch unit): a power of two of at
/// least [`MIN_CHUNK_SIZE`].
pub fn is_valid_chunk_size(n: u64) -> bool {
    n >= MIN_CHUNK_SIZE && n.is_power_of_two()
}

/// Errors in a manifest or chunk table that claims to be a lazyblob image.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FormatError {
    /// The manifest is not a lazyblob image.
    #[error("not a lazyblob image: {0}")]
    NotLazyblob(String),
    /// The chunk table is invalid.
    #[error("bad chunk table: {0}")]
    ChunkTable(String),
    /// A digest is invalid.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// A size exceeds its ceiling.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

/// How chunk digests are computed. BLAKE3 is the default for new images: per byte it costs a
/// fraction of SHA-256 (which every chunk a reader fetches pays); tables without the field
/// are SHA-256 (the first images of format 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkDigest {
    /// SHA-256.
    Sha256,
    #[default]
    /// BLAKE3.
    Blake3,
}

impl ChunkDigest {
    /// The algorithm of tables written before the field existed.
    fn legacy() -> ChunkDigest {
        ChunkDigest::Sha256
    }

    /// The digest of `data`.
    pub fn hash(self, data: &[u8]) -> [u8; 32] {
        match self {
            ChunkDigest::Sha256 => Sha256::digest(data).into(),
            ChunkDigest::Blake3 => blake3::hash(data).into(),
        }
    }
}

impl ChunkDigest {
    /// An incremental hasher, for bodies verified while they stream in.
    pub fn hasher(self) -> ChunkHasher {
        match self {
            ChunkDigest::Sha256 => ChunkHasher::Sha256(Sha256::new()),
            ChunkDigest::Blake3 => ChunkHasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

/// The state of one chunk digest being computed.
pub enum ChunkHasher {
    /// SHA-256.
    Sha256(Sha256),
    /// BLAKE3.
    Blake3(Box<blake3::Hasher>),
}

impl ChunkHasher {
    /// Hash `data` too.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ChunkHasher::Sha256(h) => h.update(data),
            ChunkHasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The digest.
    pub fn finalize(self) -> [u8; 32] {
        match self {
            ChunkHasher::Sha256(h) => h.finalize().into(),
            ChunkHasher::Blake3(h) => h.finalize().into(),
        }
    }
}

impl std::str::FromStr for ChunkDigest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sha256" => Ok(ChunkDigest::Sha256),
            "blake3" => Ok(ChunkDigest::Blake3),
            other => Err(format!("unknown chunk digest {other:?} (sha256 or blake3)")),
        }
    }
}

impl std::fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkDigest::Sha256 => "sha256",
            ChunkDigest::Blake3 => "blake3",
        })
    }
}

/// The digest of every chunk of every data blob, in manifest order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkTable {
    /// Table format version.
    pub version: u32,
    /// Verified chunk size in bytes.
    pub chunk_size: u64,
    #[serde(default = "ChunkDigest::legacy")]
    /// How chunks are hashed.
    pub chunk_digest: ChunkDigest,
    /// Leaf size of the leaves layer (format 3, BLAKE3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf_size: Option<u64>,
    /// Per data blob, its chunk digests.
    pub blobs: Vec<BlobChunks>,
}

/// The chunk digests of one data blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobChunks {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// Concatenated lowercase hex digests of each chunk (64 characters per chunk).
    pub chunks: String,
    /// When built with leaves: the blob's slots of the leaves layer (not part of the table).
    #[serde(skip)]
    pub leaves: Vec<u8>,
}

impl BlobChunks {
    /// Hash a whole data blob into its chunk digests.
    /// The chunk digests and the whole-blob digest; for large blobs the two are computed on
    /// two threads.
    pub fn of(data: &[u8], chunk_size: u64, hashing: impl Into<Hashing>) -> BlobChunks {
        let hashing = hashing.into();
        let chunk_hashes = || {
            let mut chunks = String::with_capacity(data.len().div_ceil(chunk_size as usize) * 64);
            let mut slots = Vec::new();
            for c in data.chunks(chunk_size as usize) {
                let mut h = hashing.chunk();
                h.update(c);
                chunks.push_str(&hex::encode(h.finish(hashing.layout(chunk_size), &mut slots)));
            }
            (chunks, slots)
        };
        let whole = || Digest::from_raw(Sha256::digest(data).into());
        let (digest, (chunks, leaves)) = if data.len() >= 8 << 20 {
            std::thread::scope(|s| {
                let w = s.spawn(whole);
                let c = chunk_hashes();
                (w.join().unwrap_or_else(|_| whole()), c)
            })
        } else {
            (whole(), chunk_hashes())
        };
        BlobChunks {
            digest,
            size: data.len() as u64,
            chunks,
            leaves,
        }
    }

    /// Decoded digests, validated against size and chunk size.
    pub fn digests(&self, chunk_size: u64) -> Result<Vec<[u8; 32]>, FormatError> {
        if self.size > MAX_BLOB_SIZE {
            return Err(FormatError::ChunkTable(format!(
                "blob {} size {} too large",
                self.digest, self.size
            )));
        }
        let want = self.size.div_ceil(chunk_size) as usize;
        if self.chunks.len() != want * 64 {
            return Err(FormatError::ChunkTable(format!(
                "blob {}: {} hex characters for {want} chunks",
                self.digest,
                self.chunks.len()
            )));
        }
        let raw =
            hex::decode(&self.chunks).map_err(|e| FormatError::ChunkTable(format!("blob {}: {e}", self.digest)))?;
        Ok(raw
            .chunks_exact(32)
            .map(|c| <[u8; 32]>::try_from(c).unwrap_or([0; 32]))
            .collect())
    }
}

impl ChunkTable {
    /// Parse and validate a table with the default limits (tools, tests).
    pub fn parse(bytes: &[u8]) -> Result<ChunkTable, FormatError> {
        ChunkTable::parse_within(bytes, &LimitsConfig::default())
    }

    /// Parse and validate a table fetched from a registry: every blob digest well formed,
    /// the chunk size a power of two within `limits.max_chunk_size`, one digest per chunk.
    pub fn parse_within(bytes: &[u8], limits: &LimitsConfig) -> Result<ChunkTable, FormatError> {
        limits.check(Limit::Table, "chunk table", bytes.len() as u64)?;
        let t: ChunkTable = serde_json::from_slice(bytes).map_err(|e| FormatError::ChunkTable(e.to_string()))?;
        if t.version != 1 {
            return Err(FormatError::ChunkTable(format!("unsupported version {}", t.version)));
        }
        if !is_valid_chunk_size(t.chunk_size) {
            return Err(FormatError::ChunkTable(format!("chunk size {} invalid", t.chunk_size)));
        }
        limits.check(Limit::ChunkSize, "chunk size", t.chunk_size)?;
        if let Some(leaf) = t.leaf_size {
            if t.chunk_digest != ChunkDigest::Blake3 || !is_valid_leaf_size(leaf, t.chunk_size) {
                return Err(FormatError::ChunkTable(format!(
                    "leaf size {leaf} invalid for {} chunks of {} bytes",
                    t.chunk_digest, t.chunk_size
                )));
            }
        }
        for b in &t.blobs {
            b.digests(t.chunk_size)?;
        }
        Ok(t)
    }

    /// Where the leaves layer keeps each chunk's leaves, if the table has leaves.
    pub fn leaf_layout(&self) -> Option<LeafLayout> {
        self.leaf_size.map(|leaf_size| LeafLayout {
            leaf_size,
            chunk_size: self.chunk_size,
        })
    }

    /// The leaves layer's size: one slot per chunk of every blob.
    pub fn leaves_len(&self) -> Option<u64> {
        let l = self.leaf_layout()?;
        Some(self.blobs.iter().map(|b| b.size.div_ceil(self.chunk_size)).sum::<u64>() * l.slot_len())
    }

    /// The table as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A blob a manifest names: its validated digest and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
}

impl BlobRef {
    /// Validate a descriptor's digest and size (not negative, at most [`MAX_BLOB_SIZE`]).
    pub fn from_descriptor(d: &OciDescriptor) -> Result<BlobRef, FormatError> {
        let digest = Digest::parse(&d.digest)?;
        if d.size < 0 || d.size as u64 > MAX_BLOB_SIZE {
            return Err(FormatError::NotLazyblob(format!("layer {digest} has size {}", d.size)));
        }
        Ok(BlobRef {
            digest,
            size: d.size as u64,
        })
    }
}

/// The blobs of a lazyblob manifest, by role.
#[derive(Debug, Clone)]
pub struct LazyManifest {
    /// The EROFS metadata layer.
    pub meta: BlobRef,
    /// The chunk table layer.
    pub table: BlobRef,
    /// The data layers, in device order.
    pub data: Vec<BlobRef>,
    /// The leaves layer (format 3).
    pub leaves: Option<BlobRef>,
}

impl LazyManifest {
    /// Pick the roles out of an image manifest with the default limits.
    pub fn from_manifest(m: &OciImageManifest) -> Result<LazyManifest, FormatError> {
        LazyManifest::from_manifest_within(m, &LimitsConfig::default())
    }

    /// Pick the roles out of an image manifest, rejecting anything else: every digest is
    /// validated and the metadata blob and chunk table are within `limits` before a byte
    /// of them is fetched.
    pub fn from_manifest_within(m: &OciImageManifest, limits: &LimitsConfig) -> Result<LazyManifest, FormatError> {
        let version = m.annotations.as_ref().and_then(|a| a.get(ANNOTATION_FORMAT));
        let Some(version) = version.filter(|v| READ_VERSIONS.contains(&v.as_str())) else {
            return Err(FormatError::NotLazyblob(format!(
                "annotation {ANNOTATION_FORMAT} is {version:?}, expected one of {READ_VERSIONS:?}"
            )));
        };
        let (meta_type, chunks_type, data_type) = match version.as_str() {
            "1" => (V1_MEDIA_TYPE_META, V1_MEDIA_TYPE_CHUNKS, V1_MEDIA_TYPE_DATA),
            _ => (MEDIA_TYPE_META, MEDIA_TYPE_CHUNKS, MEDIA_TYPE_DATA),
        };
        let mut meta = None;
        let mut table = None;
        let mut data = Vec::new();
        let mut leaves = None;
        for l in &m.layers {
            let blob = BlobRef::from_descriptor(l)?;
            match l.media_type.as_str() {
                t if t == meta_type && meta.is_none() => meta = Some(blob),
                t if t == chunks_type && table.is_none() => table = Some(blob),
                t if t == data_type => data.push(blob),
                MEDIA_TYPE_LEAVES if version == "3" && leaves.is_none() => leaves = Some(blob),
                other => return Err(FormatError::NotLazyblob(format!("unexpected layer media type {other}"))),
            }
        }
        let meta = meta.ok_or_else(|| FormatError::NotLazyblob("no metadata blob".into()))?;
        let table = table.ok_or_else(|| FormatError::NotLazyblob("no chunk table".into()))?;
        limits.check(Limit::Metadata, "metadata blob", meta.size)?;
        limits.check(Limit::Table, "chunk table", table.size)?;
        Ok(LazyManifest {
            meta,
            table,
            data,
            leaves,
        })
    }
}

/// The EROFS fsid under which an image is mounted over fscache: derived from the manifest
/// digest, so the same image always gets the same fsid and cache files.
pub fn fsid_for(manifest_digest: &Digest) -> String {
    format!("lb-{}", &manifest_digest.hex()[..32])
}

/// The 64-byte EROFS device tag of a data blob: its digest in hex.
pub fn device_tag(digest: &Digest) -> String {
    digest.hex().to_string()
}

#[cfg(test)]
mod tests;
