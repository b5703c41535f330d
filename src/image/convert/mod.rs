//! `lazyblob convert`: an OCI or Docker image (registry or OCI layout) becomes a lazyblob
//! image. Each source layer is streamed (gzip, zstd or plain tar) into the merged tree and
//! its own data blob; then the metadata blob, chunk table, config and manifest are written.
//! Deterministic: the same source gives the same digests.

pub mod layer;
pub mod location;
pub mod paths;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_client::manifest::{OciImageManifest, OciManifest};
use serde_json::json;

use super::build::{assemble, BlobWriter, BuildError};
use super::format::{ChunkDigest, DEFAULT_CHUNK_SIZE};
use super::tree::{Meta, Tree};
use crate::registry::platform::Platform;
use crate::registry::{Registry, RegistryError};
pub use layer::Limits;
pub use location::Location;

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
    /// Ceilings on what the source may make the converter hold.
    pub limits: Limits,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            platform: None,
            all_platforms: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunk_digest: ChunkDigest::default(),
            limits: Limits::default(),
            progress: false,
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

/// Convert one image manifest; upload its blobs; return the new manifest (not yet tagged).
async fn convert_one(
    registry: &Registry,
    src: &Location,
    dst: &Location,
    m: &OciImageManifest,
    opts: &ConvertOptions,
    report: &mut ConvertReport,
) -> Result<(Bytes, String), ConvertError> {
    let config = src.blob(registry, &m.config.digest, Some(m.config.size as u64)).await?;
    let mut tree = Tree::new(Meta {
        perm: 0o755,
        ..Default::default()
    });
    let mut blobs = BlobWriter::new(m.layers.len().max(1));
    for (i, l) in m.layers.iter().enumerate() {
        if l.size < 0 {
            return Err(ConvertError::Source(format!("layer {i} has a negative size")));
        }
        let data = src.blob(registry, &l.digest, Some(l.size as u64)).await?;
        // room for the layer's file data: its size, or a multiple when compressed
        let compressed = !l.media_type.ends_with(".tar") && !l.media_type.ends_with("tar.v1");
        blobs.reserve(i, data.len().saturating_mul(if compressed { 3 } else { 1 }));
        let name = format!("{i} ({})", l.digest);
        let pb = progress(opts, data.len() as u64, format!("layer {i}"));
        let limits = opts.limits.clone();
        let stats = tokio::task::block_in_place(|| {
            let reader = pb.wrap_read(&data[..]);
            let decoded = layer::decoder(reader).map_err(|e| layer::LayerError::Archive {
                layer: name.clone(),
                what: e.to_string(),
            })?;
            layer::Applier::new(&mut tree, &mut blobs, i, name.clone(), limits).apply(decoded)
        })?;
        pb.finish_and_clear();
        report.layer_bytes += stats.file_bytes;
        report.files += stats.entries;
        tracing::info!(layer = %name, entries = stats.entries, bytes = stats.file_bytes, whiteouts = stats.whiteouts, "layer applied");
    }
    let chunk = opts.chunk_size;
    let built = tokio::task::block_in_place(|| blobs.finish_with(tree, chunk, opts.chunk_digest))?;
    let a = assemble(&built, &config).map_err(|e| ConvertError::Source(format!("image config is not JSON: {e}")))?;
    for (digest, b) in a.blobs {
        dst.put_blob_with_digest(registry, b, digest).await?;
    }
    report.images += 1;
    let digest = crate::registry::sha256_digest(&a.manifest);
    Ok((a.manifest, digest))
}
