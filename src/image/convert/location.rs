//! Where images come from and go to: a registry reference (`host/repo:tag`, optionally with
//! `docker://`) or an OCI image layout directory (`oci:DIR[:TAG]`). Every blob read is
//! verified against its digest; a layout's `index.json` is only rewritten after all blobs
//! are in place, so a failed conversion never leaves a half-written tag.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use oci_client::Reference;
use serde_json::json;

use super::source::{Spool, SpoolSink};
use crate::image::digest::Digest;
use crate::image::growing::Growing;
use crate::lock::lock;
use crate::registry::streamed::StreamedPush;
use crate::registry::{parse_reference, sha256_digest, BlobSource, Registry, RegistryError};

/// An image location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A registry reference.
    Registry(Reference),
    /// An OCI image layout directory (`oci:DIR[:TAG]`).
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The tag in it (`index.json` annotation), if given.
        tag: Option<String>,
    },
}

impl std::str::FromStr for Location {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Location, RegistryError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(RegistryError::Reference(s.into(), "empty layout directory".into()));
            }
            return Ok(Location::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        Ok(Location::Registry(parse_reference(
            s.strip_prefix("docker://").unwrap_or(s),
        )?))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Registry(r) => write!(f, "{r}"),
            Location::Layout { dir, tag } => {
                write!(f, "oci:{}:{}", dir.display(), tag.as_deref().unwrap_or(""))
            }
        }
    }
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn io_err(path: &Path, e: std::io::Error) -> RegistryError {
    RegistryError::Transport(format!("{}: {e}", path.display()))
}

fn layout_blob_path(dir: &Path, digest: &str) -> Result<PathBuf, RegistryError> {
    let d = parse_digest(digest)?;
    Ok(dir.join("blobs").join("sha256").join(d.hex()))
}

fn parse_digest(digest: &str) -> Result<Digest, RegistryError> {
    Digest::parse(digest).map_err(|e| RegistryError::Manifest(e.to_string()))
}

/// Largest piece of a growing data blob read at once for its push.
const GROWING_PIECE: u64 = 1 << 20;

impl Location {
    /// The root manifest or index (raw, digest).
    pub async fn root_manifest(&self, registry: &Registry) -> Result<(Bytes, String), RegistryError> {
        match self {
            Location::Registry(r) => registry
                .fetch_manifest_raw(r)
                .await
                .map(|(raw, d)| (raw, d.to_string())),
            Location::Layout { dir, tag } => {
                let path = dir.join("index.json");
                let index: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).map_err(|e| io_err(&path, e))?)
                        .map_err(|e| RegistryError::Manifest(format!("{}: {e}", path.display())))?;
                let entries = index["manifests"].as_array().cloned().unwrap_or_default();
                let chosen = match tag {
                    Some(t) => entries.iter().find(|m| m["annotations"][REF_NAME].as_str() == Some(t)),
                    None if entries.len() == 1 => entries.first(),
                    None => None,
                }
                .ok_or_else(|| RegistryError::NotFound {
                    what: "manifest",
                    url: self.to_string(),
                })?;
                let digest = chosen["digest"].as_str().unwrap_or_default().to_string();
                let raw = self.blob(registry, &digest, None).await?;
                Ok((raw, digest))
            }
        }
    }

    /// A manifest by digest.
    pub async fn manifest(&self, registry: &Registry, digest: &str) -> Result<Bytes, RegistryError> {
        match self {
            Location::Registry(r) => Ok(registry
                .fetch_manifest_raw(&r.clone_with_digest(digest.to_string()))
                .await?
                .0),
            Location::Layout { .. } => self.blob(registry, digest, None).await,
        }
    }

    /// A blob by digest, verified.
    pub async fn blob(&self, registry: &Registry, digest: &str, size: Option<u64>) -> Result<Bytes, RegistryError> {
        match self {
            Location::Registry(r) => {
                let size = size.ok_or_else(|| RegistryError::Manifest(format!("blob {digest} without size")))?;
                registry
                    .fetch_blob(&BlobSource {
                        repo: r.clone(),
                        digest: parse_digest(digest)?,
                        size,
                    })
                    .await
            }
            Location::Layout { dir, .. } => {
                let path = layout_blob_path(dir, digest)?;
                let data = Bytes::from(tokio::fs::read(&path).await.map_err(|e| io_err(&path, e))?);
                let got = sha256_digest(&data);
                if got != digest {
                    return Err(RegistryError::DigestMismatch {
                        what: path.display().to_string(),
                        expected: digest.to_string(),
                        got,
                    });
                }
                Ok(data)
            }
        }
    }

    /// Where layer `digest` will be read from: a layout's blob file in place, or for a
    /// registry an empty spool under `work` that [`Location::fetch_layer`] fills.
    pub fn layer_spool(&self, digest: &str, work: &Path) -> Result<Arc<Spool>, RegistryError> {
        match self {
            Location::Layout { dir, .. } => {
                let path = layout_blob_path(dir, digest)?;
                std::fs::File::open(&path)
                    .and_then(Spool::of_file)
                    .map_err(|e| io_err(&path, e))
            }
            Location::Registry(_) => Spool::new(work).map_err(|e| io_err(work, e)),
        }
    }

    /// Make `spool` (from [`Location::layer_spool`]) hold the `size` bytes of layer `digest`
    /// and check them against the digest; its reader is woken with the outcome. A registry's
    /// layer is fetched into it (retries resume where the file stopped); a layout's blob is
    /// hashed where it is.
    pub async fn fetch_layer(
        &self,
        registry: &Registry,
        digest: &Digest,
        size: u64,
        spool: Arc<Spool>,
    ) -> Result<(), RegistryError> {
        match self {
            Location::Registry(r) => {
                let src = BlobSource {
                    repo: r.clone(),
                    digest: digest.clone(),
                    size,
                };
                let sink = Mutex::new(SpoolSink::new(spool, digest.clone(), size));
                let fetched = registry.fetch_range_into(&src, size, &sink).await;
                let outcome = lock(&sink).finish(fetched);
                outcome
            }
            Location::Layout { .. } => {
                let digest = digest.clone();
                tokio::task::spawn_blocking(move || spool.verify(&digest, size))
                    .await
                    .map_err(|e| RegistryError::Transport(e.to_string()))?
            }
        }
    }

    /// Store `size` bytes of `file` (from offset 0) as the blob `digest`, streamed.
    pub async fn put_blob_file(
        &self,
        registry: &Registry,
        file: Arc<std::fs::File>,
        size: u64,
        digest: String,
    ) -> Result<String, RegistryError> {
        match self {
            Location::Registry(r) => registry.push_blob_file(r, file, size, digest).await,
            Location::Layout { dir, .. } => {
                let path = layout_blob_path(dir, &digest)?;
                if !path.exists() {
                    let tmp = path.with_extension("tmp");
                    let staged = tmp.clone();
                    tokio::task::spawn_blocking(move || link_or_copy(&file, size, &staged))
                        .await
                        .map_err(|e| RegistryError::Transport(e.to_string()))?
                        .map_err(|e| io_err(&tmp, e))?;
                    tokio::fs::rename(&tmp, &path).await.map_err(|e| io_err(&path, e))?;
                }
                Ok(digest)
            }
        }
    }

    /// Start pushing a data blob while it is written, where that pays: to a registry (a
    /// layout links the finished file instead). `None` when not, or when the push could not
    /// start; the finished blob is then stored as any other.
    pub async fn push_growing(&self, registry: &Registry, blob: Growing) -> Option<StreamedPush> {
        let Location::Registry(r) = self else {
            return None;
        };
        match registry.push_streamed(r, blob.stream(GROWING_PIECE)).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot push the data blob while it is written: it goes up once finished");
                None
            }
        }
    }

    /// Where data blobs bound for this location are best spooled: a layout's own blob
    /// directory (the finished file is then linked in place, not copied), else `work`.
    pub fn spool_dir(&self, work: &Path) -> PathBuf {
        match self {
            Location::Layout { dir, .. } => {
                let blobs = dir.join("blobs").join("sha256");
                match std::fs::create_dir_all(&blobs) {
                    Ok(()) => blobs,
                    Err(_) => work.to_path_buf(),
                }
            }
            Location::Registry(_) => work.to_path_buf(),
        }
    }

    /// Store a blob (no-op when present).
    pub async fn put_blob(&self, registry: &Registry, data: Bytes) -> Result<String, RegistryError> {
        let digest = sha256_digest(&data);
        self.put_blob_with_digest(registry, data, digest).await
    }

    /// Store a blob whose digest the caller computed from the same bytes.
    pub async fn put_blob_with_digest(
        &self,
        registry: &Registry,
        data: Bytes,
        digest: String,
    ) -> Result<String, RegistryError> {
        match self {
            Location::Registry(r) => registry.push_blob_with_digest(r, data, digest).await,
            Location::Layout { dir, .. } => {
                let path = layout_blob_path(dir, &digest)?;
                if !path.exists() {
                    let parent = path.parent().unwrap_or(dir);
                    tokio::fs::create_dir_all(parent).await.map_err(|e| io_err(parent, e))?;
                    let tmp = path.with_extension("tmp");
                    tokio::fs::write(&tmp, &data).await.map_err(|e| io_err(&tmp, e))?;
                    tokio::fs::rename(&tmp, &path).await.map_err(|e| io_err(&path, e))?;
                }
                Ok(digest)
            }
        }
    }

    /// Store a manifest; with `tag`, make it the location's tag. Returns its digest.
    pub async fn put_manifest(
        &self,
        registry: &Registry,
        raw: Bytes,
        media_type: &str,
        tag: bool,
    ) -> Result<String, RegistryError> {
        let digest = sha256_digest(&raw);
        match self {
            Location::Registry(r) => {
                let target = if tag {
                    r.clone()
                } else {
                    r.clone_with_digest(digest.clone())
                };
                registry.push_manifest(&target, raw, media_type).await
            }
            Location::Layout { dir, tag: name } => {
                let size = raw.len();
                self.put_blob(registry, raw).await?;
                if !tag {
                    return Ok(digest);
                }
                let layout = dir.join("oci-layout");
                std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(|e| io_err(&layout, e))?;
                let path = dir.join("index.json");
                let mut index: serde_json::Value = match std::fs::read(&path) {
                    Ok(b) => serde_json::from_slice(&b)
                        .map_err(|e| RegistryError::Manifest(format!("{}: {e}", path.display())))?,
                    Err(_) => {
                        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []})
                    }
                };
                let name = name.clone().unwrap_or_else(|| "latest".into());
                let mut entries: Vec<serde_json::Value> = index["manifests"].as_array().cloned().unwrap_or_default();
                entries.retain(|m| m["annotations"][REF_NAME].as_str() != Some(name.as_str()));
                entries.push(
                    json!({"mediaType": media_type, "digest": digest, "size": size, "annotations": {REF_NAME: name}}),
                );
                index["manifests"] = json!(entries);
                let tmp = path.with_extension("json.tmp");
                std::fs::write(&tmp, serde_json::to_vec_pretty(&index).unwrap_or_default())
                    .map_err(|e| io_err(&tmp, e))?;
                std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
                Ok(digest)
            }
        }
    }
}

/// Give the unnamed file `file` the name `to` (it was made with `O_TMPFILE` on the same
/// filesystem); else copy its first `size` bytes there.
fn link_or_copy(file: &std::fs::File, size: u64, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let _ = std::fs::remove_file(to);
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let cwd = nix::fcntl::AT_FDCWD;
    if nix::unistd::linkat(cwd, proc_path.as_str(), cwd, to, nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW).is_ok()
        && std::fs::metadata(to).is_ok_and(|m| m.len() == size)
    {
        return Ok(());
    }
    let _ = std::fs::remove_file(to);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut out = std::fs::File::create(to)?;
    std::io::Seek::rewind(&mut &*file)?;
    std::io::copy(&mut std::io::Read::take(&mut &*file, size), &mut out).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_locations() {
        assert_eq!(
            "oci:/tmp/x:v1".parse::<Location>().unwrap(),
            Location::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "oci:/tmp/x".parse::<Location>().unwrap(),
            Location::Layout {
                dir: "/tmp/x".into(),
                tag: None
            }
        );
        assert!(matches!(
            "docker://127.0.0.1:5000/a/b:1".parse::<Location>().unwrap(),
            Location::Registry(_)
        ));
        assert!(matches!(
            "127.0.0.1:5000/a/b:1".parse::<Location>().unwrap(),
            Location::Registry(_)
        ));
        assert!(layout_blob_path(Path::new("/x"), "sha256:../../etc").is_err());
    }
}
