//! Blob bytes: whole blobs verified by digest, exact ranges streamed into a sink with
//! retries that resume where the sink stopped, mirrors and re-authentication (through
//! [`Registry::with_endpoints`]).

use std::sync::Mutex;

use bytes::Bytes;
use futures::StreamExt;
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

use super::error::redact_urls;
use super::manifest::refusal;
use super::{range, BlobSource, Registry, RegistryError};
use crate::image::digest::Digest;
use crate::lock::lock;

impl Registry {
    /// Fetch a whole blob and verify it against its digest and size.
    pub async fn fetch_blob(&self, src: &BlobSource) -> Result<Bytes, RegistryError> {
        self.fetch_range_checked(src, 0, src.size, |data| {
            let got = Digest::of(data);
            if got != src.digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("blob {}", src.digest),
                    expected: src.digest.to_string(),
                    got: got.to_string(),
                });
            }
            Ok(())
        })
        .await
    }

    /// Fetch exactly `[offset, offset + len)` of a blob. The bytes are NOT verified here: the
    /// blob engine checks them against the chunk digest table.
    pub async fn fetch_range(&self, src: &BlobSource, offset: u64, len: u64) -> Result<Bytes, RegistryError> {
        self.fetch_range_checked(src, offset, len, |_| Ok(())).await
    }

    /// Fetch `[offset, offset + len)` and run `check` on the body inside the retry loop, so a
    /// body that fails verification is fetched again like any other transient fault.
    pub async fn fetch_range_checked<C>(
        &self,
        src: &BlobSource,
        offset: u64,
        len: u64,
        check: C,
    ) -> Result<Bytes, RegistryError>
    where
        C: Fn(&[u8]) -> Result<(), RegistryError>,
    {
        if offset.checked_add(len).is_none_or(|end| end > src.size) {
            return Err(RegistryError::Range {
                start: offset,
                end: offset.saturating_add(len),
                blob: src.digest.to_string(),
                size: src.size,
            });
        }
        let sink = Mutex::new(range::Collect::new(offset, len, check));
        self.fetch_range_into(src, offset + len, &sink).await?;
        sink.into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .finish()
    }

    /// Stream `[sink.resume_at(), end)` of a blob into `sink` with retries, mirrors and
    /// re-authentication; each retry resumes where the sink says.
    pub async fn fetch_range_into<S: range::RangeSink>(
        &self,
        src: &BlobSource,
        end: u64,
        sink: &Mutex<S>,
    ) -> Result<(), RegistryError> {
        if end > src.size {
            return Err(RegistryError::Range {
                start: lock(sink).resume_at(),
                end,
                blob: src.digest.to_string(),
                size: src.size,
            });
        }
        let (bytes, need) = {
            let s = lock(sink);
            (end.saturating_sub(s.resume_at()), s.need())
        };
        self.with_endpoints(
            &src.repo,
            "range",
            bytes,
            need,
            |ep, auth, client, host_stats| async move {
                let r = self
                    .stream_range(&client, &ep, &auth, &host_stats, src, end, sink)
                    .await;
                if r.is_err() {
                    lock(sink).abort_attempt();
                }
                r
            },
        )
        .await
    }

    /// One range GET of `[sink.resume_at(), end)` on one endpoint, handing the body to `sink`
    /// as it arrives; an error if the body ends early or the sink refuses a piece. The
    /// request carries the repository's kept credential (see `kept`), so no auth round
    /// trip precedes it. Body bytes are counted in `host_stats` (the endpoint's, from
    /// `with_endpoints`).
    #[allow(clippy::too_many_arguments)]
    async fn stream_range<S: range::RangeSink>(
        &self,
        client: &oci_client::Client,
        ep: &Reference,
        auth: &RegistryAuth,
        host_stats: &super::HostStats,
        src: &BlobSource,
        end: u64,
        sink: &Mutex<S>,
    ) -> Result<(), RegistryError> {
        let offset = lock(sink).resume_at();
        if offset >= end {
            return Ok(());
        }
        let len = end - offset;
        let credential = self.kept.pull(client, ep, auth).await?;
        let url = self.blob_urls.get(ep, &src.digest, || {
            format!("{}/blobs/{}", self.repository_url(ep), src.digest)
        })?;
        let req = self
            .http(ep)
            .get(url.clone())
            .header(reqwest::header::RANGE, format!("bytes={offset}-{}", end - 1));
        let res = credential.apply(req).send().await?;
        if let Some(e) = refusal(res.status(), url.as_str(), "blob") {
            if matches!(e, RegistryError::Unauthorized(_)) {
                self.kept.forget(ep);
            }
            return Err(e);
        }
        let mut to_skip = match res.status() {
            reqwest::StatusCode::PARTIAL_CONTENT => 0,
            // the server ignored Range and sent the whole blob: skip to the offset
            reqwest::StatusCode::OK => offset,
            s => {
                return Err(RegistryError::Status {
                    status: s.as_u16(),
                    url: redact_urls(url.as_str()),
                })
            }
        };
        let mut body = res.bytes_stream();
        let mut at = offset;
        while at < end {
            let room = lock(sink).room();
            if let Some(wait) = room {
                wait.await;
            }
            let Some(piece) = body.next().await else {
                break;
            };
            let mut piece = piece.map_err(|e| RegistryError::Transport(format!("body: {e}")))?;
            if to_skip > 0 {
                let s = to_skip.min(piece.len() as u64);
                to_skip -= s;
                piece = piece.slice(s as usize..);
            }
            piece.truncate(piece.len().min((end - at) as usize));
            if piece.is_empty() {
                continue;
            }
            let n = piece.len() as u64;
            self.stats.bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            host_stats.bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            lock(sink).accept(at, piece)?;
            at += n;
        }
        if at < end {
            return Err(RegistryError::Truncated {
                expected: len,
                got: at - offset,
            });
        }
        Ok(())
    }
}
