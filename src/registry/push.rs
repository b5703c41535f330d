//! Pushes: blobs (skipped when the registry has them) and manifests, with the same
//! credentials and retries as pulls. A blob goes up streamed in one request, or in pieces
//! where the registry refuses a body that large. Used by `convert`, `mkfs --push` and
//! `prefetch push`.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use oci_client::errors::OciDistributionError;
use oci_client::{Reference, RegistryOperation};

use super::clients::Purpose;
use super::{sha256_digest, Registry, RegistryError};
use crate::image::growing::Growing;

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
        self.push_source(repo, Source::Memory(data), digest).await
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
        self.push_source(repo, Source::File(file, size), digest).await
    }

    async fn push_source(&self, repo: &Reference, source: Source, digest: String) -> Result<String, RegistryError> {
        self.push_unless_present(repo, digest, source.len(), |client, digest| {
            let source = source.clone();
            async move { upload(&client, repo, &source, &digest).await }
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
        let client = self.client(repo, &auth, scope, Purpose::Push)?;
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
        let client = self.client(reference, &auth, scope, Purpose::Push)?;
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

/// Piece sizes of a chunked upload, tried in turn while the registry refuses a piece as too
/// large (a proxy in front of it may cap request bodies at 1 MiB, nginx's default).
const PIECES: [u64; 2] = [4 << 20, 512 << 10];

/// The whole blob in one request, streamed (as containerd pushes: registries ingest one
/// request faster than many); a registry that refuses a body that large (413) gets it in
/// pieces, each one upload request.
async fn upload(
    client: &oci_client::Client,
    repo: &Reference,
    source: &Source,
    digest: &str,
) -> Result<(), OciDistributionError> {
    let mut refused = match client
        .push_blob_stream(repo, source.pieces(PIECES[0]), digest, Some(source.len()))
        .await
    {
        Err(e) if too_large(&e) => e,
        done => return done.map(drop),
    };
    for piece in PIECES {
        tracing::info!(digest, size = source.len(), piece, error = %refused, "the registry refused the upload as too large: pushing the blob in pieces");
        match client.push_blob_stream_chunked(repo, source.pieces(piece)).await {
            Ok(pushed) if pushed.blob_digest == digest => return Ok(()),
            Ok(pushed) => {
                return Err(OciDistributionError::GenericError(Some(format!(
                    "pushed {digest} in pieces, but they hash to {}",
                    pushed.blob_digest
                ))))
            }
            Err(e) if too_large(&e) => refused = e,
            Err(e) => return Err(e),
        }
    }
    Err(refused)
}

/// 413 Payload Too Large.
fn too_large(e: &OciDistributionError) -> bool {
    matches!(e, OciDistributionError::ServerError { code: 413, .. })
}

/// Where a pushed blob's bytes are, for each attempt.
#[derive(Clone)]
enum Source {
    Memory(Bytes),
    /// The first `.1` bytes of a file.
    File(Arc<File>, u64),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Memory(b) => b.len() as u64,
            Source::File(_, size) => *size,
        }
    }

    /// The bytes as a stream of `piece`-byte pieces (a file's read on the blocking pool).
    fn pieces(&self, piece: u64) -> BoxStream<'static, Result<Bytes, OciDistributionError>> {
        match self {
            Source::Memory(b) => {
                let b = b.clone();
                let at = (0..b.len()).step_by(piece as usize);
                futures::stream::iter(at.map(move |a| Ok(b.slice(a..b.len().min(a + piece as usize))))).boxed()
            }
            Source::File(file, size) => Growing::finished(Arc::clone(file), *size)
                .stream(piece)
                .map_err(|e| OciDistributionError::GenericError(Some(format!("reading the blob to push: {e}"))))
                .boxed(),
        }
    }
}
