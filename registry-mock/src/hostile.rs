//! Hostile mode: images rewritten the way an attacker's registry would serve them. Start
//! from an image already in the store, change what its manifest and its JSON blobs (a chunk
//! table) say — digests that are paths, sizes that are lies, another image's blob digest, a
//! body padded to any size — and publish the result under a new tag. The registry then
//! serves it like any other image, so tests read as scenarios.

use bytes::Bytes;
use serde_json::Value;

use crate::store::{digest_of, Store};

/// A manifest being rewritten; see the module doc.
#[derive(Debug, Clone)]
pub struct HostileImage {
    store: Store,
    manifest: Value,
    media_type: String,
}

impl HostileImage {
    /// Start from the manifest stored at `repo:reference`.
    pub fn from_store(store: &Store, repo: &str, reference: &str) -> HostileImage {
        let (media_type, body) = store
            .manifest(repo, reference)
            .unwrap_or_else(|| panic!("no manifest {repo}:{reference} to start from"));
        HostileImage {
            store: store.clone(),
            manifest: serde_json::from_slice(&body).expect("stored manifest is JSON"),
            media_type,
        }
    }

    /// The manifest as it stands.
    pub fn manifest(&self) -> &Value {
        &self.manifest
    }

    /// The `n`th layer whose media type is `media_type`.
    fn layer(&mut self, media_type: &str, n: usize) -> &mut Value {
        self.manifest["layers"]
            .as_array_mut()
            .expect("manifest has layers")
            .iter_mut()
            .filter(|l| l["mediaType"] == media_type)
            .nth(n)
            .unwrap_or_else(|| panic!("no layer {n} of type {media_type}"))
    }

    /// The digest of the `n`th layer of `media_type`.
    pub fn layer_digest_of(&mut self, media_type: &str, n: usize) -> String {
        self.layer(media_type, n)["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Let the `n`th layer of `media_type` claim `digest` (any string: a path, another
    /// image's blob).
    pub fn layer_digest(mut self, media_type: &str, n: usize, digest: &str) -> HostileImage {
        self.layer(media_type, n)["digest"] = Value::from(digest);
        self
    }

    /// Let the `n`th layer of `media_type` claim `size` bytes.
    pub fn layer_size(mut self, media_type: &str, n: usize, size: i64) -> HostileImage {
        self.layer(media_type, n)["size"] = Value::from(size);
        self
    }

    /// Rewrite the JSON blob of the `n`th layer of `media_type` (a chunk table) with `edit`,
    /// store the result and point the layer at it.
    pub fn edit_json_blob(mut self, media_type: &str, n: usize, edit: impl FnOnce(&mut Value)) -> HostileImage {
        let digest = self.layer_digest_of(media_type, n);
        let body = self.store.blob(&digest).expect("layer blob in the store");
        let mut v: Value = serde_json::from_slice(&body).expect("layer blob is JSON");
        edit(&mut v);
        let body = serde_json::to_vec(&v).expect("JSON");
        let size = body.len() as i64;
        let digest = self.store.put_blob(body);
        let layer = self.layer(media_type, n);
        layer["digest"] = Value::from(digest);
        layer["size"] = Value::from(size);
        self
    }

    /// Store `data` under `digest` whatever its real digest (a registry that lies).
    pub fn serve_blob_as(self, digest: &str, data: impl Into<Bytes>) -> HostileImage {
        self.store.corrupt_blob(digest, data);
        self
    }

    /// Pad the manifest with an annotation so its body is at least `bytes` long.
    pub fn pad_to(mut self, bytes: usize) -> HostileImage {
        let annotations = self.manifest["annotations"]
            .as_object_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut annotations = Value::Object(annotations);
        annotations["org.example.padding"] = Value::from("x".repeat(bytes));
        self.manifest["annotations"] = annotations;
        self
    }

    /// Serve the rewritten manifest as `repo:tag`; returns its digest.
    pub fn publish(&self, repo: &str, tag: &str) -> String {
        let body = serde_json::to_vec(&self.manifest).expect("JSON");
        let digest = digest_of(&body);
        self.store.put_manifest(repo, Some(tag), &self.media_type, body);
        digest
    }
}
