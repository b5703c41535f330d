//! Manifest GETs with a size bound. `oci-client` reads a manifest body whole before anyone
//! can look at its size; here the body is streamed and refused as soon as it passes
//! `registry.limits.max_manifest_bytes` (or announces more in `Content-Length`), so a hostile
//! registry cannot make the daemon buffer an unbounded body. `oci-client` still does the
//! authentication (its token flow); the request itself is this module's. The credential a
//! request carries and the errors for refused requests serve blob GETs too (`blobs`, `kept`).

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use super::error::redact_urls;
use super::RegistryError;
use crate::config::{Limit, LimitsConfig};

/// What authenticates the request.
#[derive(Clone)]
pub(super) enum Credential {
    Anonymous,
    Bearer(String),
    Basic(String, String),
}

impl Credential {
    /// The credential for requests `op` on `repo`: `oci-client`'s auth step (a token fetched
    /// when the registry asks for one), then [`after_auth`](Self::after_auth).
    pub(super) async fn obtain(
        client: &oci_client::Client,
        repo: &Reference,
        auth: &RegistryAuth,
        op: RegistryOperation,
    ) -> Result<Credential, RegistryError> {
        let token = client.auth(repo, auth, op).await?;
        Ok(Credential::after_auth(token, auth))
    }

    /// The credential for a request after `oci-client`'s auth step: its bearer token if the
    /// registry asked for one, else the basic credentials the request was made with.
    fn after_auth(token: Option<String>, auth: &RegistryAuth) -> Credential {
        match (token, auth) {
            (Some(t), _) => Credential::Bearer(t),
            (None, RegistryAuth::Basic(u, p)) => Credential::Basic(u.clone(), p.clone()),
            _ => Credential::Anonymous,
        }
    }

    /// `req` with this credential.
    pub(super) fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Credential::Anonymous => req,
            Credential::Bearer(t) => req.bearer_auth(t),
            Credential::Basic(u, p) => req.basic_auth(u, Some(p)),
        }
    }
}

/// GET `url` accepting `accept`; returns the body (at most the manifest limit) and the
/// `Docker-Content-Digest` header if any.
pub(super) async fn get(
    http: &reqwest::Client,
    url: &str,
    accept: &str,
    credential: Credential,
    limits: &LimitsConfig,
) -> Result<(Bytes, Option<String>), RegistryError> {
    let what = || format!("manifest at {}", redact_urls(url));
    let req = credential.apply(http.get(url).header(reqwest::header::ACCEPT, accept));
    let res = req.send().await?;
    if let Some(e) = refusal(res.status(), url, "manifest") {
        return Err(e);
    }
    if let Some(n) = res.content_length() {
        limits.check(Limit::Manifest, &what(), n)?;
    }
    let digest = res
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = BytesMut::new();
    let mut stream = res.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        limits.check(Limit::Manifest, &what(), (body.len() + piece.len()) as u64)?;
        body.extend_from_slice(&piece);
    }
    Ok((body.freeze(), digest))
}

/// The error for a request to `url` for a `what` that the registry refused with `status`
/// (`None`: a success).
pub(super) fn refusal(status: reqwest::StatusCode, url: &str, what: &'static str) -> Option<RegistryError> {
    let url = redact_urls(url);
    match status {
        s if s.is_success() => None,
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => Some(RegistryError::Unauthorized(url)),
        reqwest::StatusCode::NOT_FOUND => Some(RegistryError::NotFound { what, url }),
        s => Some(RegistryError::Status {
            status: s.as_u16(),
            url,
        }),
    }
}
