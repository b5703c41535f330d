//! In-memory content: blobs by digest, manifests by repository and tag/digest, uploads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Registry content, cheap to clone and share between instances.
#[derive(Debug, Default, Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    blobs: HashMap<String, Bytes>,
    /// (repository, tag or digest) -> (media type, body)
    manifests: HashMap<(String, String), (String, Bytes)>,
    uploads: HashMap<String, Vec<u8>>,
    next_upload: u64,
}

/// `sha256:<hex>`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

impl Store {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut crate::lock(&self.inner))
    }

    /// Add a blob; returns its digest.
    pub fn put_blob(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let d = digest_of(&data);
        self.with(|i| i.blobs.insert(d.clone(), data));
        d
    }

    pub fn blob(&self, digest: &str) -> Option<Bytes> {
        self.with(|i| i.blobs.get(digest).cloned())
    }

    /// Replace a blob's stored bytes without changing its digest key (a corrupt registry).
    pub fn corrupt_blob(&self, digest: &str, data: impl Into<Bytes>) {
        let data = data.into();
        self.with(|i| i.blobs.insert(digest.to_string(), data));
    }

    /// Store a manifest under a tag (and always under its digest); returns the digest.
    pub fn put_manifest(&self, repo: &str, tag: Option<&str>, media_type: &str, body: impl Into<Bytes>) -> String {
        let body = body.into();
        let d = digest_of(&body);
        self.with(|i| {
            let v = (media_type.to_string(), body);
            if let Some(t) = tag {
                i.manifests.insert((repo.to_string(), t.to_string()), v.clone());
            }
            i.manifests.insert((repo.to_string(), d.clone()), v);
        });
        d
    }

    /// Every manifest of `repo` once: (digest, media type, body).
    pub fn manifests_of(&self, repo: &str) -> Vec<(String, String, Bytes)> {
        self.with(|i| {
            i.manifests
                .iter()
                .filter(|((r, reference), _)| r == repo && reference.starts_with("sha256:"))
                .map(|((_, d), (t, b))| (d.clone(), t.clone(), b.clone()))
                .collect()
        })
    }

    pub fn manifest(&self, repo: &str, reference: &str) -> Option<(String, Bytes)> {
        self.with(|i| i.manifests.get(&(repo.to_string(), reference.to_string())).cloned())
    }

    pub(crate) fn start_upload(&self) -> String {
        self.with(|i| {
            i.next_upload += 1;
            let id = format!("u{}", i.next_upload);
            i.uploads.insert(id.clone(), Vec::new());
            id
        })
    }

    pub(crate) fn append_upload(&self, id: &str, data: &[u8]) -> Option<usize> {
        self.with(|i| {
            let u = i.uploads.get_mut(id)?;
            u.extend_from_slice(data);
            Some(u.len())
        })
    }

    /// Drop an upload; whether it was open.
    pub(crate) fn cancel_upload(&self, id: &str) -> bool {
        self.with(|i| i.uploads.remove(id).is_some())
    }

    /// Uploads open (started, neither finished nor cancelled).
    pub fn open_uploads(&self) -> usize {
        self.with(|i| i.uploads.len())
    }

    /// Finish an upload; `Err` names the problem (unknown upload, digest mismatch).
    pub(crate) fn finish_upload(&self, id: &str, data: &[u8], digest: &str) -> Result<(), String> {
        self.with(|i| {
            let mut u = i.uploads.remove(id).ok_or("unknown upload")?;
            u.extend_from_slice(data);
            let got = digest_of(&u);
            if got != digest {
                return Err(format!("digest mismatch: got {got}"));
            }
            i.blobs.insert(got, Bytes::from(u));
            Ok(())
        })
    }
}
