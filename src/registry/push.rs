//! Pushes: blobs (skipped when the registry has them) and manifests, with the same
//! credentials and retries as pulls. Used by `convert` and `mkfs --push`.

use bytes::Bytes;
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
        let (auth, scope) = self.auth_for(repo).await?;
        let client = self.client(repo, &auth, scope)?;
        client.auth(repo, &auth, RegistryOperation::Push).await?;
        if client.blob_exists(repo, &digest).await.unwrap_or(false) {
            return Ok(digest);
        }
        self.policy
            .for_transfer(data.len() as u64)
            .run("push blob", |_| {
                let data = data.clone();
                let digest = digest.clone();
                let client = &client;
                async move { Ok(client.push_blob(repo, data, &digest).await?) }
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
