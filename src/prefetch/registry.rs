//! Prefetch lists in registries. A list is pushed as an OCI artifact (artifact type
//! [`MEDIA_TYPE`], the empty config, the list as its one layer, the time of the push in its
//! `org.opencontainers.image.created` annotation) whose `subject` is the image manifest, so a
//! node finds it from the image's digest alone:
//! - a registry with the OCI 1.1 referrers API lists it there by itself;
//! - for every other registry (docker-registry 2.8 included) the push also adds it to the
//!   image's referrers tag `sha256-<hex>`, the OCI fallback, replacing the lists pushed
//!   before (other artifacts there stay).
//!
//! A node asks the referrers API first and reads the tag when the API has no list (or no
//! API, or answers with an error or junk). Of several lists the newest is used. What a node
//! pulls is hostile until checked: digests validated before they name anything, the artifact
//! checked to refer to this image, sizes bounded, the list's bytes verified against its
//! digest.

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
/// The annotation a list's push time is in (RFC 3339, UTC, whole seconds).
const CREATED: &str = "org.opencontainers.image.created";

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

/// Where a node found the lists of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The registry's referrers API.
    ReferrersApi,
    /// The image's referrers tag.
    ReferrersTag,
}

/// How a push listed the artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The artifact manifest's digest.
    pub digest: Digest,
    /// Where nodes find it: the registry's referrers API (no tag written) or the tag.
    pub listed_by: Found,
}

/// Push `list` as an artifact referring to its image in `repo`'s repository; unless the
/// registry's referrers API lists it, add it to the image's referrers tag.
pub async fn push(reg: &Registry, repo: &Reference, list: &PrefetchList) -> Result<Pushed, RegistryError> {
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
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MEDIA_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": Digest::of(EMPTY).to_string(), "size": EMPTY.len()},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": list_digest.to_string(), "size": body.len()}],
        "subject": {"mediaType": image_type, "digest": list.image.to_string(), "size": image_raw.len()},
        "annotations": {CREATED: created},
    });
    let raw = Bytes::from(serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?);
    let digest = Digest::of(&raw);
    reg.push_manifest(&repo.clone_with_digest(digest.to_string()), raw.clone(), OCI_MANIFEST)
        .await?;
    if let Some(entries) = api_entries(reg, repo, &list.image).await {
        if entries.iter().any(|m| m["digest"].as_str() == Some(digest.as_str())) {
            return Ok(Pushed {
                digest,
                listed_by: Found::ReferrersApi,
            });
        }
    }
    // the referrers tag: the index there (if any), this artifact in place of earlier lists
    let tag = referrers_tag(repo, &list.image);
    let mut index = match reg.fetch_manifest_raw(&tag).await {
        Ok((raw, _)) => serde_json::from_slice::<Value>(&raw).map_err(|e| bad(format!("{tag}: {e}")))?,
        Err(RegistryError::NotFound { .. }) => json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
        Err(e) => return Err(e),
    };
    let entries = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| bad(format!("{tag} is not an image index")))?;
    entries.retain(|m| m["artifactType"].as_str() != Some(MEDIA_TYPE));
    entries.push(
        json!({"mediaType": OCI_MANIFEST, "digest": digest.to_string(), "size": raw.len(),
        "artifactType": MEDIA_TYPE, "annotations": manifest["annotations"]}),
    );
    let index = Bytes::from(serde_json::to_vec(&index).map_err(|e| bad(e.to_string()))?);
    reg.push_manifest(&tag, index, OCI_INDEX).await?;
    Ok(Pushed {
        digest,
        listed_by: Found::ReferrersTag,
    })
}

/// The entries of an image index's `manifests` (none if it has no such array).
fn entries_of(index: &[u8], what: &str) -> Result<Vec<Value>, RegistryError> {
    let mut index: Value = serde_json::from_slice(index).map_err(|e| bad(format!("{what}: {e}")))?;
    Ok(match index["manifests"].take() {
        Value::Array(entries) => entries,
        _ => Vec::new(),
    })
}

/// The image's referrers by the registry's referrers API: `None` without the API, and when
/// its answer is an error or not an index (the referrers tag is read then: a registry's odd
/// answer to a route it may not know costs no list).
async fn api_entries(reg: &Registry, repo: &Reference, image: &Digest) -> Option<Vec<Value>> {
    let what = format!("referrers of {image}");
    let answer = reg
        .referrers(repo, image, MEDIA_TYPE)
        .await
        .and_then(|raw| raw.map(|raw| entries_of(&raw, &what)).transpose());
    match answer {
        Ok(entries) => entries,
        Err(e) => {
            tracing::debug!(error = %e, "{what}: no answer from the referrers API; the referrers tag is read");
            None
        }
    }
}

/// The newest prefetch list among referrers `entries`: the latest `created` annotation, the
/// last listed among equals (a tag's index lists in push order).
fn newest(entries: &[Value]) -> Option<&Value> {
    let created = |m: &Value| m["annotations"][CREATED].as_str().unwrap_or_default().to_string();
    entries
        .iter()
        .enumerate()
        .filter(|(_, m)| m["artifactType"].as_str() == Some(MEDIA_TYPE))
        .max_by_key(|(i, m)| (created(m), *i))
        .map(|(_, m)| m)
}

/// The newest list pushed for `image` in `repo`'s repository, if any, and where it was found.
pub async fn pull(
    reg: &Registry,
    repo: &Reference,
    image: &Digest,
) -> Result<Option<(PrefetchList, Found)>, RegistryError> {
    let from_api = api_entries(reg, repo, image).await.filter(|e| newest(e).is_some());
    let (found, entries) = match from_api {
        Some(entries) => (Found::ReferrersApi, entries),
        None => {
            let tag = referrers_tag(repo, image);
            match reg.fetch_manifest_raw(&tag).await {
                Ok((raw, _)) => (Found::ReferrersTag, entries_of(&raw, &tag.to_string())?),
                Err(RegistryError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    };
    let Some(entry) = newest(&entries) else {
        return Ok(None);
    };
    // validated before it names anything; the manifest's bytes are checked against it
    let digest = Digest::parse(entry["digest"].as_str().unwrap_or_default())
        .map_err(|e| bad(format!("referrers of {image}: {e}")))?;
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
        .map(|list| Some((list, found)))
        .map_err(|e| bad(format!("artifact {digest}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, artifact_type: &str, created: Option<&str>) -> Value {
        let mut m = json!({"digest": format!("sha256:{}", hex::encode([n; 32])), "artifactType": artifact_type});
        if let Some(c) = created {
            m["annotations"] = json!({CREATED: c});
        }
        m
    }

    #[test]
    fn the_newest_list_is_the_latest_created_then_the_last_listed() {
        let e = [
            entry(1, MEDIA_TYPE, Some("2026-12-04T10:00:00Z")),
            entry(2, MEDIA_TYPE, Some("2026-12-04T11:00:00Z")),
            entry(3, "application/vnd.other", Some("2027-01-01T00:00:00Z")),
            entry(4, MEDIA_TYPE, Some("2026-12-04T09:00:00Z")),
        ];
        assert_eq!(newest(&e), Some(&e[1]));
        // without annotations (lists pushed before them): the last listed
        let e = [entry(1, MEDIA_TYPE, None), entry(2, MEDIA_TYPE, None)];
        assert_eq!(newest(&e), Some(&e[1]));
        // an annotated list beats an older unannotated one listed after it
        let e = [
            entry(1, MEDIA_TYPE, Some("2026-12-04T10:00:00Z")),
            entry(2, MEDIA_TYPE, None),
        ];
        assert_eq!(newest(&e), Some(&e[0]));
        assert_eq!(newest(&[entry(3, "application/vnd.other", None)]), None);
        assert_eq!(newest(&[]), None);
    }

    #[test]
    fn an_index_without_manifests_has_no_entries_and_junk_is_an_error() {
        assert!(entries_of(br#"{"schemaVersion":2}"#, "x").unwrap().is_empty());
        assert!(entries_of(br#"{"manifests":{"a":1}}"#, "x").unwrap().is_empty());
        assert_eq!(entries_of(br#"{"manifests":[{"a":1}]}"#, "x").unwrap().len(), 1);
        assert!(matches!(entries_of(b"not json", "x"), Err(RegistryError::Manifest(_))));
    }
}
