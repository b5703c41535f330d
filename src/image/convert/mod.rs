//! `lazyblob convert`: an OCI or Docker image (registry or OCI layout) becomes a lazyblob
//! image. Each source layer is streamed (gzip, zstd or plain tar) into the merged tree and
//! its own data blob; then the metadata blob, chunk table, config and manifest are written.
//! Deterministic: the same source gives the same digests.

pub mod expansion;
pub mod layer;
pub mod location;
pub mod paths;
pub mod source;
mod uploads;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use serde_json::json;

use super::build::{assemble_parts, finish_tree, BuildError};
use super::digest::Digest;
use super::format::{ChunkDigest, Hashing, DEFAULT_CHUNK_SIZE};
use super::spool::BlobSpool;
use super::tree::{Meta, Tree};
use crate::registry::platform::Platform;
use crate::registry::{Registry, RegistryError};
pub use layer::Limits;
pub use location::Location;
use uploads::LayerBlob;

/// Why a conversion failed. Nothing is tagged at the destination when it does.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A layer could not be read or applied.
    #[error(transparent)]
    Layer(#[from] layer::LayerError),
    /// The image could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The source is not something to convert.
    #[error("{0}")]
    Source(String),
    /// The work directory (spooled layers and data blobs) failed.
    #[error("work directory {}: {source}", dir.display())]
    Work {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Conversion settings.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Platform to pick from an index (default: this node's).
    pub platform: Option<Platform>,
    /// Convert every platform of an index and write an index.
    pub all_platforms: bool,
    /// Verified chunk size of the data blobs.
    pub chunk_size: u64,
    /// Algorithm of the chunk digest table.
    pub chunk_digest: ChunkDigest,
    /// Write a leaves layer (BLAKE3 chunks of at least 32 KiB: 16 KiB leaves, format 3);
    /// without, the image is format 2.
    pub leaves: bool,
    /// Ceilings on what the source may make the converter hold.
    pub limits: Limits,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// Where layers and data blobs are spooled while converting (unnamed files; default:
    /// the system's temporary directory).
    pub work_dir: Option<PathBuf>,
}

impl ConvertOptions {
    /// How chunks are hashed.
    pub fn hashing(&self) -> Hashing {
        if self.leaves {
            Hashing::with_default_leaves(self.chunk_digest, self.chunk_size)
        } else {
            self.chunk_digest.into()
        }
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            platform: None,
            all_platforms: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunk_digest: ChunkDigest::default(),
            leaves: true,
            limits: Limits::default(),
            progress: false,
            work_dir: None,
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Digest of what the destination tag now names (manifest or index).
    pub digest: String,
    /// Uncompressed bytes of layer file data read.
    pub layer_bytes: u64,
    /// Regular files converted.
    pub files: u64,
    /// Images converted (several with an index).
    pub images: usize,
    /// Data blobs that went up to a registry while their layer converted.
    pub blobs_streamed: usize,
}

/// Convert `src` into a lazyblob image at `dst`.
pub async fn convert(
    registry: &Registry,
    src: &Location,
    dst: &Location,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let (root_raw, _) = src.root_manifest(registry).await?;
    let root: OciManifest =
        serde_json::from_slice(&root_raw).map_err(|e| ConvertError::Source(format!("{src}: bad manifest: {e}")))?;
    let platform = opts.platform.clone().unwrap_or_else(|| registry.platform().clone());
    let mut report = ConvertReport {
        digest: String::new(),
        layer_bytes: 0,
        files: 0,
        images: 0,
        blobs_streamed: 0,
    };
    match root {
        OciManifest::Image(m) if !opts.all_platforms => {
            let (raw, _) = convert_one(registry, src, dst, &m, opts, &mut report).await?;
            report.digest = dst
                .put_manifest(registry, raw, oci_client::manifest::OCI_IMAGE_MEDIA_TYPE, true)
                .await?;
        }
        OciManifest::Image(_) => {
            return Err(ConvertError::Source(format!(
                "{src} is a single image; --all-platforms needs an index"
            )))
        }
        OciManifest::ImageIndex(index) => {
            let chosen: Vec<_> = if opts.all_platforms {
                index
                    .manifests
                    .iter()
                    .filter(|e| e.platform.as_ref().is_some_and(|p| p.os.to_string() != "unknown"))
                    .cloned()
                    .collect()
            } else {
                let d = platform
                    .choose(&index.manifests)
                    .ok_or_else(|| ConvertError::Source(format!("{src}: no manifest for platform {platform}")))?;
                index
                    .manifests
                    .iter()
                    .filter(|e| e.digest == d)
                    .take(1)
                    .cloned()
                    .collect()
            };
            let mut entries = Vec::new();
            for e in &chosen {
                let raw = src.manifest(registry, &e.digest).await?;
                let m: OciImageManifest = serde_json::from_slice(&raw)
                    .map_err(|err| ConvertError::Source(format!("{src}@{}: bad manifest: {err}", e.digest)))?;
                let (raw, _) = convert_one(registry, src, dst, &m, opts, &mut report).await?;
                if !opts.all_platforms {
                    report.digest = dst
                        .put_manifest(registry, raw, oci_client::manifest::OCI_IMAGE_MEDIA_TYPE, true)
                        .await?;
                    return Ok(report);
                }
                let size = raw.len();
                let digest = dst
                    .put_manifest(registry, raw, oci_client::manifest::OCI_IMAGE_MEDIA_TYPE, false)
                    .await?;
                entries.push(
                    json!({"mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE, "digest": digest, "size": size,
                                    "platform": serde_json::to_value(&e.platform).unwrap_or_default()}),
                );
            }
            let index = json!({"schemaVersion": 2, "mediaType": oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE, "manifests": entries});
            let raw = Bytes::from(serde_json::to_vec(&index).map_err(|e| ConvertError::Source(e.to_string()))?);
            report.digest = dst
                .put_manifest(registry, raw, oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE, true)
                .await?;
        }
    }
    Ok(report)
}

fn progress(opts: &ConvertOptions, len: u64, msg: String) -> ProgressBar {
    use std::io::IsTerminal;
    let pb = ProgressBar::with_draw_target(
        Some(len),
        if opts.progress && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg);
    pb
}

/// Largest image config accepted (it is held in memory and rewritten).
const MAX_CONFIG: i64 = 16 << 20;

/// Convert one image manifest; upload its blobs; return the new manifest (not yet tagged).
async fn convert_one(
    registry: &Registry,
    src: &Location,
    dst: &Location,
    m: &OciImageManifest,
    opts: &ConvertOptions,
    report: &mut ConvertReport,
) -> Result<(Bytes, String), ConvertError> {
    if !(0..=MAX_CONFIG).contains(&m.config.size) {
        return Err(ConvertError::Source(format!("image config of {} bytes", m.config.size)));
    }
    let config = src.blob(registry, &m.config.digest, Some(m.config.size as u64)).await?;
    let work = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut tree = Tree::new(Meta {
        perm: 0o755,
        ..Default::default()
    });
    let mut limits = opts.limits.clone();
    let mut chunks = Vec::new();
    // each layer's data blob is stored while the next layers convert
    let mut uploads = uploads::Uploads::new(registry, dst);
    for (i, l) in m.layers.iter().enumerate() {
        let applying = apply_layer(registry, (src, dst), l, i, tree, &work, opts, limits.clone());
        let (t, blob, stats) = uploads.alongside(applying).await??;
        tree = t;
        chunks.push(blob.as_ref().map(|b| b.blob.chunks.clone()));
        limits.max_metadata = limits.max_metadata.saturating_sub(stats.metadata);
        report.layer_bytes += stats.file_bytes;
        report.files += stats.entries;
        if let Some(b) = blob {
            uploads.start(b).await?;
        }
    }
    let (meta, table) = tokio::task::block_in_place(|| finish_tree(tree, chunks, opts.chunk_size, opts.hashing()))?;
    report.blobs_streamed += uploads.finish().await?;
    let a = assemble_parts(&meta, &table, &config)
        .map_err(|e| ConvertError::Source(format!("image config is not JSON: {e}")))?;
    for (digest, b) in a.blobs {
        dst.put_blob_with_digest(registry, b, digest).await?;
    }
    report.images += 1;
    let digest = crate::registry::sha256_digest(&a.manifest);
    Ok((a.manifest, digest))
}

/// Apply layer `i` to `tree`: its bytes stream from `src` through a spool file, the decoder and
/// the tar parser (on the blocking pool) into a data blob, written and hashed on threads of
/// their own and pushed to `dst` as it grows where that pays. `work`: where the layer is
/// spooled. Returns the tree, the data blob (`None` if the layer holds no file data outside
/// the metadata) and the layer's counters.
#[allow(clippy::too_many_arguments)]
async fn apply_layer(
    registry: &Registry,
    (src, dst): (&Location, &Location),
    l: &OciDescriptor,
    i: usize,
    mut tree: Tree,
    work: &Path,
    opts: &ConvertOptions,
    limits: Limits,
) -> Result<(Tree, Option<LayerBlob>, layer::LayerStats), ConvertError> {
    let name = format!("{i} ({})", l.digest);
    let size = u64::try_from(l.size).map_err(|_| ConvertError::Source(format!("layer {i} has a negative size")))?;
    let digest = Digest::parse(&l.digest).map_err(|e| ConvertError::Source(format!("layer {i}: {e}")))?;
    // a compressed layer larger than what it may expand to is refused before a byte is
    // spooled (slack for incompressible data, which compression makes slightly larger)
    if size > limits.max_layer.saturating_add(limits.max_layer / 16) {
        return Err(ConvertError::Source(format!(
            "layer {name}: {size} bytes exceed the limit of {} bytes a layer may expand to",
            limits.max_layer
        )));
    }
    let device = u16::try_from(i + 1).map_err(|_| ConvertError::Source("more than 65535 layers".into()))?;
    tracing::info!(layer = %name, bytes = size, "applying layer");
    let spool = src.layer_spool(&l.digest, work)?;
    let blob_dir = dst.spool_dir(work);
    let spooled = BlobSpool::new(&blob_dir, device, opts.chunk_size, opts.hashing());
    let blob_err = move |source| ConvertError::Work { dir: blob_dir, source };
    let mut blob = spooled.map_err(blob_err.clone())?;
    let streamed = dst.push_growing(registry, blob.growing()).await;
    let reader = spool.reader();
    let pb = progress(opts, size, format!("layer {i}"));
    let layer_name = name.clone();
    let mut apply = tokio::task::spawn_blocking(move || {
        let decoded = layer::decoder(pb.wrap_read(reader)).map_err(|e| layer::LayerError::Archive {
            layer: layer_name.clone(),
            what: e.to_string(),
        })?;
        let stats = layer::Applier::new(&mut tree, &mut blob, layer_name, limits).apply(decoded)?;
        pb.finish_and_clear();
        let blob = blob.finish().map_err(blob_err)?;
        Ok::<_, ConvertError>((tree, blob, stats))
    });
    let download = src.fetch_layer(registry, &digest, size, spool);
    tokio::pin!(download);
    let joined = |r: Result<_, tokio::task::JoinError>| {
        r.map_err(|e| ConvertError::Source(format!("layer {name}: converter thread failed: {e}")))?
    };
    let (tree, blob, stats) = tokio::select! {
        fetched = &mut download => {
            let applied = joined((&mut apply).await);
            fetched?;
            applied?
        }
        // an applier that fails first has the error to report: the download stops
        applied = &mut apply => {
            let applied = joined(applied)?;
            download.await?;
            applied
        }
    };
    tracing::info!(layer = %name, entries = stats.entries, bytes = stats.file_bytes, whiteouts = stats.whiteouts, "layer applied");
    Ok((tree, blob.map(|blob| LayerBlob { blob, streamed }), stats))
}
