//! A blob pushed while it is still being written (the converter's data blobs): one upload
//! session whose bytes go up in one streamed `PATCH` as they are produced (as `docker push`
//! streams a layer), committed with `PUT ?digest=` once the digest is known. The registry
//! ingests the blob while the layer converts instead of after it.
//!
//! It is a shortcut, not the only way: an upload that fails, or a commit the registry
//! refuses, ends here, and the caller pushes the finished file as any other blob (with its
//! retries and its fallback to pieces). Upload locations that point at another host are
//! refused: credentials go to the registry's own host only. No session is opened before the
//! first byte (a layer without file data has no blob); a session left uncommitted (a failed
//! conversion, a blob the registry had already) is cancelled with `DELETE`, best effort.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use oci_client::{Reference, RegistryOperation};
use reqwest::{StatusCode, Url};

use super::clients::Purpose;
use super::error::redact_urls;
use super::manifest::Credential;
use super::{Registry, RegistryError};
use crate::lock::lock;

/// Where an upload session stands.
enum Session {
    /// Not opened (yet, or ever: an empty body).
    Unopened,
    /// Open; the latest location the registry gave.
    Open(Url),
    /// Committed, or cancelled: nothing left to do.
    Closed,
}

/// How a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The streamed bytes are the blob now.
    Stored,
    /// The registry had the blob already; the stream was dropped.
    AlreadyThere,
}

/// An upload under way (see the module comment); dropped unfinished, it stops.
pub struct StreamedPush {
    /// Sends the body; ends with the location to commit at.
    sending: tokio::task::JoinHandle<Result<Url, RegistryError>>,
    /// The session, as the sending task left it.
    session: Arc<Mutex<Session>>,
    repo: Reference,
    client: oci_client::Client,
    http: reqwest::Client,
    /// What the requests carry, and what it was made from (for a new token at the commit).
    credential: Credential,
    auth: oci_client::secrets::RegistryAuth,
    /// Bounds the wait for the rest of the body and for the commit (no read timeout does:
    /// the client for pushes has none).
    policy: super::retry::RetryPolicy,
}

impl Drop for StreamedPush {
    fn drop(&mut self) {
        self.sending.abort();
        let Session::Open(at) = std::mem::replace(&mut *lock(&self.session), Session::Closed) else {
            return;
        };
        // best effort: registries purge stale sessions in time anyway
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let cancel = self.http.delete(at).timeout(self.policy.attempt_timeout);
            let cancel = self.credential.apply(cancel);
            rt.spawn(async move {
                if let Err(e) = cancel.send().await {
                    tracing::debug!(error = %RegistryError::from(e), "cancelling an upload session failed");
                }
            });
        }
    }
}

impl Registry {
    /// Start pushing `body`, a blob of unknown digest, to `repo`; it goes up as it comes
    /// (see [`StreamedPush::commit`]).
    pub async fn push_streamed<S>(&self, repo: &Reference, body: S) -> Result<StreamedPush, RegistryError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        let (auth, scope) = self.auth_for(repo).await?;
        let client = self.client(repo, &auth, scope, Purpose::Push)?;
        let credential = Credential::obtain(&client, repo, &auth, RegistryOperation::Push).await?;
        let http = self.clients_of(repo).http_for(Purpose::Push)?;
        let base = Url::parse(&format!("{}/blobs/uploads/", self.repository_url(repo)))
            .map_err(|e| RegistryError::Reference(repo.whole(), e.to_string()))?;
        let (h, c) = (http.clone(), credential.clone());
        let session = Arc::new(Mutex::new(Session::Unopened));
        let opened = Arc::clone(&session);
        let sending = tokio::spawn(async move {
            let mut body = Box::pin(body.peekable());
            if body.as_mut().peek().await.is_none() {
                return Err(RegistryError::Transport("nothing to push".into()));
            }
            let started = c.apply(h.post(base.clone()).header(reqwest::header::CONTENT_LENGTH, 0));
            let at = location(&base, started.send().await?, StatusCode::ACCEPTED)?;
            *lock(&opened) = Session::Open(at.clone());
            let patch = h
                .patch(at.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(body));
            let next = location(&at, c.apply(patch).send().await?, StatusCode::ACCEPTED)?;
            *lock(&opened) = Session::Open(next.clone());
            Ok(next)
        });
        Ok(StreamedPush {
            sending,
            session,
            repo: repo.clone(),
            client,
            http,
            credential,
            auth,
            policy: self.policy.clone(),
        })
    }
}

impl StreamedPush {
    /// The blob's `size` bytes were all produced and hash to `digest`: wait for them to be
    /// sent and commit the upload, each within one attempt's allowance for that size. A
    /// registry that already has the blob (a blob converted before) is not waited for: the
    /// upload is dropped. A token that expired while the layer converted (a commit answered
    /// 401) is renewed once.
    pub async fn commit(mut self, digest: &str, size: u64) -> Result<Committed, RegistryError> {
        if self.client.blob_exists(&self.repo, digest).await.unwrap_or(false) {
            return Ok(Committed::AlreadyThere);
        }
        let limit = self.policy.for_transfer(size).attempt_timeout;
        let sent = tokio::time::timeout(limit, &mut self.sending)
            .await
            .map_err(|_| RegistryError::Timeout(limit))?;
        let mut at = sent.map_err(|e| RegistryError::Transport(format!("upload task: {e}")))??;
        at.query_pairs_mut().append_pair("digest", digest);
        let put = |credential: &Credential| {
            let req = self.http.put(at.clone()).header(reqwest::header::CONTENT_LENGTH, 0);
            credential.apply(req.timeout(limit)).send()
        };
        let mut res = put(&self.credential).await?;
        if res.status() == StatusCode::UNAUTHORIZED {
            let renewed = Credential::obtain(&self.client, &self.repo, &self.auth, RegistryOperation::Push).await?;
            res = put(&renewed).await?;
        }
        if res.status() != StatusCode::CREATED {
            return Err(RegistryError::Status {
                status: res.status().as_u16(),
                url: redact_urls(at.as_str()),
            });
        }
        *lock(&self.session) = Session::Closed;
        Ok(Committed::Stored)
    }
}

/// The `Location` of an upload answer with status `expected`, resolved against `base`;
/// another host's location is refused.
fn location(base: &Url, res: reqwest::Response, expected: StatusCode) -> Result<Url, RegistryError> {
    let status = res.status();
    let bad = |why: &str| RegistryError::Transport(format!("upload at {}: {why}", redact_urls(base.as_str())));
    if status != expected {
        return Err(RegistryError::Status {
            status: status.as_u16(),
            url: redact_urls(base.as_str()),
        });
    }
    let header = res
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad("no Location"))?;
    let next = base.join(header).map_err(|_| bad("a malformed Location"))?;
    if next.origin() != base.origin() {
        return Err(bad("a Location on another host"));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, location: Option<&str>) -> reqwest::Response {
        let mut b = axum::http::Response::builder().status(status);
        if let Some(l) = location {
            b = b.header("Location", l);
        }
        reqwest::Response::from(b.body(Vec::new()).unwrap())
    }

    #[test]
    fn upload_locations_resolve_on_the_registry_and_never_leave_it() {
        let base = Url::parse("https://r.example:5000/v2/app/blobs/uploads/").unwrap();
        let at = |s, l| location(&base, answer(s, l), StatusCode::ACCEPTED);
        let rel = at(202, Some("/v2/app/blobs/uploads/u1?_state=x")).unwrap();
        assert_eq!(rel.as_str(), "https://r.example:5000/v2/app/blobs/uploads/u1?_state=x");
        let abs = at(202, Some("https://r.example:5000/v2/app/blobs/uploads/u2")).unwrap();
        assert_eq!(abs.path(), "/v2/app/blobs/uploads/u2");
        for elsewhere in [
            "https://attacker.example/v2/app/blobs/uploads/u3",
            "http://r.example:5000/v2/app/blobs/uploads/u3",
            "https://r.example:5001/u3",
            "//attacker.example/u3",
        ] {
            let e = at(202, Some(elsewhere)).unwrap_err();
            assert!(e.to_string().contains("another host"), "{elsewhere}: {e}");
        }
        assert!(at(202, None).unwrap_err().to_string().contains("no Location"));
        assert!(matches!(
            at(413, Some("/v2/app/blobs/uploads/u4")),
            Err(RegistryError::Status { status: 413, .. })
        ));
    }
}
