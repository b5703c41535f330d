//! Remote layers: what tells a lazyblob layer from any other in a Prepare, and the lazy
//! images behind such layers. containerd prepares each layer with
//! `containerd.io/snapshot.ref = <chainID>` and the layer's `containerd.io/snapshot/`
//! annotations (lazyblob's `lazyblob.layer`); its CRI plugin adds the image reference and
//! manifest digest (`cri.*`). A lazyblob layer is committed at once under its chain ID
//! (containerd then downloads nothing); the rootfs over such layers is an overlay over the
//! image's lazy EROFS mount.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::image::digest::Digest;
use crate::image::format::{fsid_for, ANNOTATION_LAYER};

/// The chain ID containerd prepares a layer as.
pub const LABEL_REF: &str = "containerd.io/snapshot.ref";
/// The image reference (set by CRI or the transfer service).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The image manifest's digest.
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer's digest.
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// Set on remotely committed layers (the convention of stargz and nydus).
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";

/// Why an image behind remote layers could not be registered, mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The image could not be registered.
    #[error(transparent)]
    Register(#[from] crate::catalog::CatalogError),
    /// The mount point could not be prepared.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A mount or unmount of the daemon failed (with its whole context chain).
    #[error("{0:#}")]
    Mount(anyhow::Error),
}

/// The lazy images behind remote layers: the daemon registers and mounts them.
#[tonic::async_trait]
pub trait Images: Send + Sync {
    /// Register (fetch and verify) the image `pinned` (`repo@digest`); the digests of its
    /// metadata and data layers.
    async fn register(&self, pinned: &str) -> Result<Vec<String>, ImageError>;
    /// Mount `pinned` lazily on `target` unless it is mounted there already.
    async fn ensure_mounted(&self, pinned: &str, target: &Path) -> Result<(), ImageError>;
    /// Unmount `target`, which no snapshot uses any more.
    async fn unmount(&self, target: &Path) -> Result<(), ImageError>;
}

/// Why a lazyblob layer's labels do not name an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error(
        "a lazyblob layer prepared without the {LABEL_IMAGE_REF} and {LABEL_MANIFEST} labels: pull through CRI \
         (kubelet, crictl) with disable_snapshot_annotations = false, or on containerd 2.1+ through the \
         transfer service with the unpack_config and enable_remote_snapshot_annotations export of \
         deploy/containerd/config-v3.toml"
    )]
    /// The layer has no image labels.
    Missing,
    /// The manifest digest label is invalid.
    #[error("{LABEL_MANIFEST}: {0}")]
    Manifest(String),
    /// The image reference label is invalid.
    #[error("{LABEL_IMAGE_REF}: {0}")]
    Reference(String),
}

/// What a Prepare asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Layer {
    /// Anything but a lazyblob layer: prepared and unpacked as overlayfs would.
    Plain,
    /// A layer of a lazyblob image, to commit under `chain`.
    Lazyblob {
        /// The chain ID to commit under.
        chain: String,
        /// The layer's role (`meta`, `chunks`, `leaves`, `data`).
        role: String,
        /// The image, pinned by digest (from the CRI labels), or why there is none.
        pinned: Result<String, LabelError>,
        /// The layer's digest, if labelled.
        layer: Option<String>,
    },
}

/// Read a Prepare's labels.
pub fn classify(labels: &HashMap<String, String>) -> Layer {
    let (Some(chain), Some(role)) = (labels.get(LABEL_REF), labels.get(ANNOTATION_LAYER)) else {
        return Layer::Plain;
    };
    let pinned = match (labels.get(LABEL_IMAGE_REF), labels.get(LABEL_MANIFEST)) {
        (Some(r), Some(m)) => pin(r, m),
        _ => Err(LabelError::Missing),
    };
    Layer::Lazyblob {
        chain: chain.clone(),
        role: role.clone(),
        pinned,
        layer: labels.get(LABEL_LAYER).cloned(),
    }
}

/// `registry/repo@<manifest digest>` for an image reference and its manifest digest.
fn pin(reference: &str, manifest: &str) -> Result<String, LabelError> {
    let digest = Digest::parse(manifest).map_err(|e| LabelError::Manifest(e.to_string()))?;
    let r = crate::registry::parse_reference(reference).map_err(|e| LabelError::Reference(e.to_string()))?;
    Ok(format!("{}/{}@{digest}", r.registry(), r.repository()))
}

/// Where the lazy mount of `pinned` lives under the snapshotter root (one per image, named
/// by its fsid; the root is root-only).
pub fn mount_point(root: &Path, pinned: &str) -> PathBuf {
    let name = pinned
        .rsplit_once('@')
        .and_then(|(_, d)| Digest::parse(d).ok())
        .map(|d| fsid_for(&d))
        .unwrap_or_else(|| "invalid".into());
    root.join("images").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazyblob_layers_are_told_apart() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let mut l: HashMap<String, String> = [(LABEL_REF.to_string(), "sha256:chain".to_string())].into();
        assert_eq!(classify(&l), Layer::Plain);
        l.insert(ANNOTATION_LAYER.into(), "data".into());
        let Layer::Lazyblob { pinned, .. } = classify(&l) else {
            panic!()
        };
        assert!(pinned.unwrap_err().to_string().contains("disable_snapshot_annotations"));
        l.insert(LABEL_IMAGE_REF.into(), "127.0.0.1:5000/lazy/app:v1".into());
        l.insert(LABEL_MANIFEST.into(), digest.clone());
        let Layer::Lazyblob { chain, pinned, .. } = classify(&l) else {
            panic!()
        };
        assert_eq!(chain, "sha256:chain");
        let pinned = pinned.unwrap();
        assert_eq!(pinned, format!("127.0.0.1:5000/lazy/app@{digest}"));
        assert!(mount_point(Path::new("/r"), &pinned).ends_with(format!("images/lb-{}", "ab".repeat(16))));
        l.insert(LABEL_MANIFEST.into(), "sha256:../../etc".into());
        let Layer::Lazyblob { pinned, .. } = classify(&l) else {
            panic!()
        };
        assert!(pinned.is_err());
    }
}
