//! The image catalog: images registered by reference, resolved to their metadata blob,
//! chunk table and data blobs, and the kernel keys that name them (EROFS fsid, device tags).
//! Registrations persist in `state.json`, and the manifest, metadata blob and chunk table of
//! each image are kept beside it, so a restarted daemon serves the same images without asking
//! the registry (it is only asked for what is missing or fails verification).

#![forbid(unsafe_code)]

pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::engine::leaves::BlobLeaves;
use crate::engine::DataBlob;
use crate::image::digest::Digest;
use crate::image::format::{device_tag, fsid_for, BlobRef, ChunkTable, FormatError, LazyManifest};
use crate::image::leaves::LeafLayout;
use crate::private_fs;
use crate::registry::{parse_reference, BlobSource, Registry, RegistryError, ResolvedManifest};

/// Why an image could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The registry failed (after retries).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The image is not a valid lazyblob image.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The state file could not be read or written.
    #[error("state file {path}: {source}")]
    State {
        /// The state file.
        path: PathBuf,
        /// Why it could not be read or written.
        source: std::io::Error,
    },
    /// A kept chunk table does not match the image's.
    #[error("chunk table does not describe data blob {0}")]
    TableMismatch(String),
    /// The leaves layer and the chunk table disagree.
    #[error("leaves layer: {0}")]
    Leaves(String),
}

/// A registered image.
#[derive(Debug)]
pub struct Image {
    /// The reference the user registered.
    pub reference: String,
    /// `repo@digest` of the resolved image manifest: what a restart re-resolves.
    pub pinned: String,
    /// Digest of its image manifest.
    pub manifest_digest: Digest,
    /// The EROFS fsid (`lb-<manifest digest prefix>`), also its cachefiles volume.
    pub fsid: String,
    /// Where the metadata blob comes from.
    pub meta: BlobSource,
    /// Where the verified metadata blob is stored locally.
    pub meta_path: PathBuf,
    /// The data blobs, in device order.
    pub data: Vec<Arc<DataBlob>>,
}

impl Image {
    /// Sum of all blob sizes: what a full pull would download.
    pub fn total_size(&self) -> u64 {
        self.meta.size + self.data.iter().map(|d| d.source.size).sum::<u64>()
    }
}

/// What a cachefiles (volume key, cookie key) pair names.
#[derive(Debug, Clone)]
pub enum Target {
    /// The image's metadata blob.
    Meta(Arc<Image>),
    /// One data blob of the image.
    Data(Arc<Image>, Arc<DataBlob>),
}

impl Target {
    /// Size in bytes of the blob named.
    pub fn size(&self) -> u64 {
        match self {
            Target::Meta(i) => i.meta.size,
            Target::Data(_, d) => d.source.size,
        }
    }
}

/// All registered images.
pub struct Catalog {
    registry: Arc<Registry>,
    state_dir: PathBuf,
    images: RwLock<HashMap<String, Arc<Image>>>,
}

impl Catalog {
    /// A catalog keeping its state in `state_dir`.
    pub fn new(registry: Arc<Registry>, state_dir: &Path) -> Catalog {
        Catalog {
            registry,
            state_dir: state_dir.to_owned(),
            images: RwLock::new(HashMap::new()),
        }
    }

    /// The registry client images are fetched with.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    /// Re-register every image of the state file; returns the ones that failed. A state file
    /// that cannot be read is set aside (logged, kept for inspection) and the daemon starts
    /// with the records it could read.
    pub async fn restore(&self) -> Vec<(String, CatalogError)> {
        let saved = state::load(&self.state_file());
        let mut failed = Vec::new();
        for entry in saved.images {
            if let Err(e) = self.register_pinned(&entry.reference, &entry.pinned).await {
                failed.push((entry.reference, e));
            }
        }
        failed
    }

    /// Register an image by reference: resolve, fetch and verify its metadata blob and chunk
    /// table, persist. Registering twice returns the existing image.
    pub async fn register(&self, reference: &str) -> Result<Arc<Image>, CatalogError> {
        self.register_pinned(reference, reference).await
    }

    async fn register_pinned(&self, reference: &str, resolve_as: &str) -> Result<Arc<Image>, CatalogError> {
        let r = parse_reference(resolve_as)?;
        let resolved = match self.stored_manifest(&r).await {
            Some(m) => m,
            None => {
                let m = self.registry.resolve(&r).await?;
                self.keep(&m.digest, &m.raw).await?;
                m
            }
        };
        let fsid = fsid_for(&resolved.digest);
        if let Some(img) = self.get(&fsid) {
            return Ok(img);
        }
        let limits = self.registry.limits();
        let lazy = LazyManifest::from_manifest_within(&resolved.manifest, limits)?;
        let repo = r.clone();
        let src = |d: &BlobRef| BlobSource {
            repo: repo.clone(),
            digest: d.digest.clone(),
            size: d.size,
        };
        // the table and the metadata blob side by side; the table parsed from the bytes just
        // verified, not read back from disk
        let (table, meta) = (src(&lazy.table), src(&lazy.meta));
        let ((_, table_bytes), (meta_path, _)) = tokio::try_join!(self.store_blob(&table), self.store_blob(&meta))?;
        let table = ChunkTable::parse_within(&table_bytes, limits)?;
        drop(table_bytes);
        let leaves = leaves_layer(&table, lazy.leaves.as_ref())?.map(|(l, layout)| (src(l), layout, Arc::default()));
        let mut data = Vec::with_capacity(lazy.data.len());
        for d in &lazy.data {
            let index = table
                .blobs
                .iter()
                .position(|b| b.digest == d.digest && b.size == d.size)
                .ok_or_else(|| CatalogError::TableMismatch(d.digest.to_string()))?;
            let entry = &table.blobs[index];
            let mut blob = DataBlob::new(
                src(d),
                table.chunk_size,
                entry.digests(table.chunk_size)?,
                table.chunk_digest,
            );
            if let Some((source, layout, local)) = &leaves {
                let first_slot = table.blobs[..index]
                    .iter()
                    .map(|b| b.size.div_ceil(table.chunk_size))
                    .sum();
                blob = blob.with_leaves(BlobLeaves {
                    source: source.clone(),
                    first_slot,
                    layout: *layout,
                    local: Arc::clone(local),
                });
            }
            data.push(Arc::new(blob));
        }
        // bounded like a metadata blob: it is fetched whole
        let keep = |s: &BlobSource| {
            limits
                .check(crate::config::Limit::Metadata, "leaves layer", s.size)
                .is_ok()
        };
        if let Some((source, _, local)) = leaves.filter(|(s, _, _)| keep(s)) {
            let (registry, path) = (Arc::clone(&self.registry), self.kept_path(&source.digest));
            tokio::spawn(keep_leaves(registry, path, source, local));
        }
        let image = Arc::new(Image {
            reference: reference.to_string(),
            pinned: format!("{}/{}@{}", r.registry(), r.repository(), resolved.digest),
            manifest_digest: resolved.digest.clone(),
            fsid: fsid.clone(),
            meta,
            meta_path,
            data,
        });
        crate::lock::write(&self.images).insert(fsid.clone(), Arc::clone(&image));
        self.persist()?;
        tracing::info!(reference, fsid, digest = %resolved.digest, "image registered");
        Ok(image)
    }

    /// Fetch a small blob (metadata, chunk table) whole, verify its digest, keep it under the
    /// state directory; a stored copy is reused after re-verification. Returns the kept file
    /// and the verified bytes.
    async fn store_blob(&self, blob: &BlobSource) -> Result<(PathBuf, Bytes), CatalogError> {
        if let Some(kept) = self.stored(&blob.digest, blob.size).await {
            return Ok(kept);
        }
        let data = self.registry.fetch_blob(blob).await?;
        let path = self.keep(&blob.digest, &data).await?;
        Ok((path, data))
    }

    /// The image manifest a digest reference names, from the copy kept when it was first
    /// registered: a restart needs no registry for the images it already has.
    async fn stored_manifest(&self, r: &oci_client::Reference) -> Option<ResolvedManifest> {
        let digest = Digest::parse(r.digest()?).ok()?;
        let max = self.registry.limits().max(crate::config::Limit::Manifest);
        let (_, raw) = self.stored(&digest, max).await?;
        match serde_json::from_slice(&raw) {
            Ok(oci_client::manifest::OciManifest::Image(manifest)) => Some(ResolvedManifest { manifest, digest, raw }),
            _ => None,
        }
    }

    /// A kept copy of the blob or manifest `digest` (path and bytes) if it is there, at most
    /// `max` bytes and intact.
    async fn stored(&self, digest: &Digest, max: u64) -> Option<(PathBuf, Bytes)> {
        let path = self.kept_path(digest);
        let bytes = read_kept(&path, digest, max).await?;
        Some((path, bytes))
    }

    /// Keep `data` (verified content of `digest`) under the state directory, root only,
    /// written atomically (unique temporary file, fsync, rename).
    async fn keep(&self, digest: &Digest, data: &Bytes) -> Result<PathBuf, CatalogError> {
        let path = self.kept_path(digest);
        write_kept(&path, data).await.map_err(|source| CatalogError::State {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Where a blob or manifest is kept: named only from a validated digest.
    fn kept_path(&self, digest: &Digest) -> PathBuf {
        self.state_dir.join("blobs").join(digest.file_name())
    }

    fn persist(&self) -> Result<(), CatalogError> {
        let images = crate::lock::read(&self.images);
        let mut entries: Vec<state::Entry> = images
            .values()
            .map(|i| state::Entry {
                reference: i.reference.clone(),
                pinned: i.pinned.clone(),
            })
            .collect();
        entries.sort_by(|a, b| a.reference.cmp(&b.reference));
        let path = self.state_file();
        state::save(&path, &state::State { images: entries }).map_err(|source| CatalogError::State { path, source })
    }

    /// The image of fsid `fsid`.
    pub fn get(&self, fsid: &str) -> Option<Arc<Image>> {
        crate::lock::read(&self.images).get(fsid).cloned()
    }

    /// Find the blob a cachefiles OPEN names: volume key `erofs,<fsid>`; cookie key the fsid
    /// (metadata blob) or a data blob's device tag.
    pub fn lookup(&self, fsid: &str, cookie_key: &[u8]) -> Option<Target> {
        let image = self.get(fsid)?;
        if cookie_key == image.fsid.as_bytes() {
            return Some(Target::Meta(image));
        }
        let blob = image
            .data
            .iter()
            .find(|d| device_tag(&d.source.digest).as_bytes() == cookie_key)?
            .clone();
        Some(Target::Data(image, blob))
    }

    /// Every registered image, by reference.
    pub fn list(&self) -> Vec<Arc<Image>> {
        let images = crate::lock::read(&self.images);
        let mut v: Vec<Arc<Image>> = images.values().cloned().collect();
        v.sort_by(|a, b| a.reference.cmp(&b.reference));
        v
    }
}

/// The leaves layer of an image and where its slots are, checked against the table: both
/// or neither have leaves, and the layer holds exactly one slot per chunk.
fn leaves_layer<'a>(
    table: &ChunkTable,
    layer: Option<&'a BlobRef>,
) -> Result<Option<(&'a BlobRef, LeafLayout)>, CatalogError> {
    match (table.leaf_layout(), layer) {
        (None, None) => Ok(None),
        (Some(layout), Some(l)) if table.leaves_len() == Some(l.size) => Ok(Some((l, layout))),
        (Some(_), Some(l)) => Err(CatalogError::Leaves(format!(
            "{} bytes where the chunk table needs {:?}",
            l.size,
            table.leaves_len()
        ))),
        (Some(_), None) => Err(CatalogError::Leaves(
            "the chunk table has leaves, the manifest no leaves layer".into(),
        )),
        (None, Some(_)) => Err(CatalogError::Leaves(
            "a leaves layer, but the chunk table has no leaf size".into(),
        )),
    }
}

/// Keep an image's leaves layer under the state directory (fetched whole and verified, or a
/// kept copy re-verified) and hand it to its blobs. Until then, and if this fails, leaf reads
/// fetch each slot with its leaves.
async fn keep_leaves(
    registry: Arc<Registry>,
    path: PathBuf,
    src: BlobSource,
    local: Arc<std::sync::OnceLock<std::fs::File>>,
) {
    if read_kept(&path, &src.digest, src.size).await.is_none() {
        let data = match registry.fetch_blob(&src).await {
            Ok(d) => d,
            Err(e) => {
                return tracing::warn!(error = %e, blob = %src.digest, "leaves layer not kept: leaf reads fetch their slots")
            }
        };
        if let Err(e) = write_kept(&path, &data).await {
            return tracing::warn!(error = %e, path = %path.display(), "leaves layer not kept");
        }
    }
    match std::fs::File::open(&path) {
        Ok(f) => {
            let _ = local.set(f);
            tracing::debug!(blob = %src.digest, "leaves layer kept");
        }
        Err(e) => tracing::warn!(error = %e, path = %path.display(), "leaves layer not opened"),
    }
}

/// The kept copy at `path` of the blob or manifest `digest`, if it is there, at most `max`
/// bytes and intact.
async fn read_kept(path: &Path, digest: &Digest, max: u64) -> Option<Bytes> {
    let len = tokio::fs::metadata(path).await.ok()?.len();
    if len > max {
        tracing::warn!(path = %path.display(), len, max, "a kept copy is larger than expected; it is fetched again");
        return None;
    }
    let bytes = tokio::fs::read(path).await.ok()?;
    if digest.matches(&bytes) {
        return Some(Bytes::from(bytes));
    }
    tracing::warn!(path = %path.display(), "a kept copy is corrupt; it is fetched again");
    None
}

/// Keep verified `data` at `path`, root only, written atomically (unique temporary file,
/// fsync, rename).
async fn write_kept(path: &Path, data: &Bytes) -> std::io::Result<()> {
    let (p, data) = (path.to_path_buf(), data.clone());
    tokio::task::spawn_blocking(move || private_fs::write_atomic(&p, &data))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
}
