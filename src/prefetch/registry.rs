//! Prefetch lists in registries. A list is pushed as an OCI artifact (artifact type
//! [`MEDIA_TYPE`], the empty config, the list as its one layer) whose `subject` is the image
//! manifest, and listed in the image's referrers tag `sha256-<hex>` (the OCI 1.1 fallback for
//! registries without the referrers API; every registry takes a tag, docker-registry 2.8
//! included), so a node finds it from the image's digest alone. What a node pulls is hostile
//! until checked: digests validated before they name anything, the artifact checked to
//! refer to this image, sizes bounded, the list's bytes verified against its digest.

#![forbid(unsafe_code)]

use bytes::Bytes;
use oci_client::Reference;
use serde_json::{json, Value};

use super::list::{PrefetchList, MAX_LIST_BYTES, MEDIA_TYPE};
use crate::image::digest::Digest;
use crate::registry::{BlobSource, Registry, RegistryError};

const OCI_MANIFEST: &str = oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
const OCI_INDEX: &str = oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE;
/// The OCI empty descriptor's media type and content (`{}`).
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";

/// The referrers tag of `image` in `repo`'s repository.
fn referrers_tag(repo: &Reference, image: &Digest) -> Reference {
    Reference::with_tag(
        repo.registry().to_string(),
        repo.repository().to_string(),
        format!("sha256-{}", image.hex()),
    )
}

fn bad(what: impl Into<String>) -> RegistryError {
    RegistryError::Manifest(what.into())
}

/// Push `list` as an artifact referring to its image in `repo`'s repository and add it to the
/// image's referrers tag; returns the artifact manifest's digest.
pub async fn push(reg: &Registry, repo: &Reference, list: &PrefetchList) -> Result<Digest, RegistryError> {
    let image_ref = repo.clone_with_digest(list.image.to_string());
    let (image_raw, _) = reg.fetch_manifest_raw(&image_ref).await?;
    let image_type = serde_json::from_slice::<Value>(&image_raw)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| OCI_MANIFEST.to_string());
    let body = Bytes::from(list.to_vec());
    let list_digest = Digest::of(&body);
    reg.push_blob(repo, Bytes::from_static(EMPTY)).await?;
    reg.push_blob(repo, body.clone()).await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MEDIA_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": Digest::of(EMPTY).to_string(), "size": EMPTY.len()},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": list_digest.to_string(), "size": body.len()}],
        "subject": {"mediaType": image_type, "digest": list.image.to_string(), "size": image_raw.len()},
    });
    let raw = Bytes::from(serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?);
    let digest = Digest::of(&raw);
    reg.push_manifest(&repo.clone_with_digest(digest.to_string()), raw.clone(), OCI_MANIFEST)
        .await?;
    // the referrers tag: the index there (if any) with this artifact added
    let tag = referrers_tag(repo, &list.image);
    let mut index = match reg.fetch_manifest_raw(&tag).await {
        Ok((raw, _)) => serde_json::from_slice::<Value>(&raw).map_err(|e| bad(format!("{tag}: {e}")))?,
        Err(RegistryError::NotFound { .. }) => json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
        Err(e) => return Err(e),
    };
    let entries = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| bad(format!("{tag} is not an image index")))?;
    entries.retain(|m| m["digest"].as_str() != Some(digest.as_str()));
    entries.push(
        json!({"mediaType": OCI_MANIFEST, "digest": digest.to_string(), "size": raw.len(), "artifactType": MEDIA_TYPE}),
    );
    let index = Bytes::from(serde_json::to_vec(&index).map_err(|e| bad(e.to_string()))?);
    reg.push_manifest(&tag, index, OCI_INDEX).await?;
    Ok(digest)
}

/// The list pushed last for `image` in `repo`'s repository, if any.
pub async fn pull(reg: &Registry, repo: &Reference, image: &Digest) -> Result<Option<PrefetchList>, RegistryError> {
    let tag = referrers_tag(repo, image);
    let index = match reg.fetch_manifest_raw(&tag).await {
        Ok((raw, _)) => serde_json::from_slice::<Value>(&raw).map_err(|e| bad(format!("{tag}: {e}")))?,
        Err(RegistryError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let newest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|m| m["artifactType"].as_str() == Some(MEDIA_TYPE));
    let Some(entry) = newest else {
        return Ok(None);
    };
    // validated before it names anything; the manifest's bytes are checked against it
    let digest = Digest::parse(entry["digest"].as_str().unwrap_or_default()).map_err(|e| bad(format!("{tag}: {e}")))?;
    let (raw, _) = reg
        .fetch_manifest_raw(&repo.clone_with_digest(digest.to_string()))
        .await?;
    let artifact: Value = serde_json::from_slice(&raw).map_err(|e| bad(format!("{digest}: {e}")))?;
    if artifact["subject"]["digest"].as_str() != Some(image.as_str()) {
        return Err(bad(format!("artifact {digest} does not refer to image {image}")));
    }
    let layer = &artifact["layers"][0];
    let size = layer["size"].as_u64().unwrap_or(u64::MAX);
    if layer["mediaType"].as_str() != Some(MEDIA_TYPE) || size > MAX_LIST_BYTES {
        return Err(bad(format!(
            "artifact {digest}: its layer is not a prefetch list of <= {MAX_LIST_BYTES} bytes"
        )));
    }
    let list_digest =
        Digest::parse(layer["digest"].as_str().unwrap_or_default()).map_err(|e| bad(format!("{digest}: {e}")))?;
    let source = BlobSource {
        repo: repo.clone(),
        digest: list_digest,
        size,
    };
    let body = reg.fetch_blob(&source).await?;
    PrefetchList::from_slice(&body)
        .map(Some)
        .map_err(|e| bad(format!("artifact {digest}: {e}")))
}
