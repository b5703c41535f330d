//! Pushes: blobs (skipped when the registry has them) and manifests, with the same
//! credentials and retries as pulls. Used by `convert` and `mkfs --push`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use oci_client::errors::OciDistributionError;
use oci_client::{Reference, RegistryOperation};

use super::{sha256_digest, Registry, RegistryError};

impl Registry {
    /// Push a blob unless the registry already has it.
    pub async fn push_blob(&self, repo: &Reference, data: Bytes) -> Result<String, RegistryError> {
        let digest = sha256_digest(&data);
        self.push_blob_with_digest(repo, data, digest).await
    }

    /// Push a blob whose digest the caller already computed (the registry verifies it).
    pub async fn push_blob_with_digest(
        &self,
        repo: &Reference,
        data: Bytes,
        digest: String,
    ) -> Result<String, RegistryError> {
        self.push_unless_present(repo, digest, data.len() as u64, |client, digest| {
            let data = data.clone();
            async move { client.push_blob(repo, data, &digest).await.map(drop) }
        })
        .await
    }

    /// Push `size` bytes of `file` from offset 0 as the blob `digest`, streamed (never held in
    /// memory whole); every retry reads the file again.
    pub async fn push_blob_file(
        &self,
        repo: &Reference,
        file: Arc<File>,
        size: u64,
        digest: String,
    ) -> Result<String, RegistryError> {
        self.push_unless_present(repo, digest, size, |client, digest| {
            let stream = file_stream(file.clone(), size);
            async move {
                client
                    .push_blob_stream(repo, stream, &digest, Some(size))
                    .await
                    .map(drop)
            }
        })
        .await
    }

    /// Authenticate for a push of `digest`; skip it when the registry has the blob; else run
    /// `push` with retries.
    async fn push_unless_present<'a, F, Fut>(
        &'a self,
        repo: &'a Reference,
        digest: String,
        size: u64,
        push: F,
    ) -> Result<String, RegistryError>
    where
        F: Fn(oci_client::Client, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), OciDistributionError>>,
    {
        let (auth, scope) = self.auth_for(repo).await?;
        let client = self.client(repo, &auth, scope)?;
        client.auth(repo, &auth, RegistryOperation::Push).await?;
        if client.blob_exists(repo, &digest).await.unwrap_or(false) {
            return Ok(digest);
        }
        self.policy
            .for_transfer(size)
            .run("push blob", |_| {
                // a clone shares the connection pool and tokens
                let attempt = push(client.clone(), digest.clone());
                async move { Ok(attempt.await?) }
            })
            .await?;
        Ok(digest)
    }

    /// Push a manifest under the reference's tag (or digest); returns the manifest digest.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        raw: Bytes,
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let (auth, scope) = self.auth_for(reference).await?;
        let client = self.client(reference, &auth, scope)?;
        client.auth(reference, &auth, RegistryOperation::Push).await?;
        let ct = reqwest::header::HeaderValue::from_str(media_type)
            .map_err(|_| RegistryError::Manifest(format!("bad media type {media_type:?}")))?;
        self.policy
            .run("push manifest", |_| {
                let raw = raw.clone();
                let ct = ct.clone();
                let client = &client;
                async move { Ok(client.push_manifest_raw(reference, raw, ct).await?) }
            })
            .await?;
        Ok(sha256_digest(&raw))
    }
}

/// Bytes of a pushed file per stream item: each becomes one upload request.
const PUSH_PIECE: u64 = 4 << 20;

/// `[0, size)` of `file` as a stream of pieces read on the blocking pool.
fn file_stream(file: Arc<File>, size: u64) -> impl Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static {
    let fail = |e: String| OciDistributionError::GenericError(Some(format!("reading the blob to push: {e}")));
    futures::stream::try_unfold(0u64, move |at| {
        let file = file.clone();
        async move {
            if at >= size {
                return Ok(None);
            }
            let n = (size - at).min(PUSH_PIECE);
            let piece = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, at).map(|()| buf)
            })
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
            Ok(Some((Bytes::from(piece), at + n)))
        }
    })
}
