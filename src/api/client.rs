//! The admin API client used by the CLI.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

use super::{ApiError, ImageInfo, MountInfo, MountRequest, RegisterRequest, Status, UmountRequest};

/// A connection to a running daemon's admin socket.
pub struct ApiClient {
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Result<ApiClient> {
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            // A unix socket needs no TLS: do not load (possibly absent) system CA roots.
            .tls_certs_only(Vec::new())
            .build()
            .context("building the admin API client")?;
        Ok(ApiClient { http })
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status> {
        decode(self.http.get("http://lazyblob/v1/status").send().await).await
    }

    /// `POST /v1/images`: register an image; its summary.
    pub async fn register(&self, reference: &str) -> Result<ImageInfo> {
        self.post(
            "/v1/images",
            &RegisterRequest {
                reference: reference.to_string(),
            },
        )
        .await
    }

    /// `POST /v1/mounts`: mount `reference` lazily on `target`.
    pub async fn mount(
        &self,
        reference: &str,
        target: &Path,
        special_files: crate::frontend::mount::SpecialFiles,
    ) -> Result<MountInfo> {
        self.post(
            "/v1/mounts",
            &MountRequest {
                reference: reference.to_string(),
                target: target.to_path_buf(),
                special_files,
            },
        )
        .await
    }

    /// `POST /v1/umount`: unmount `target` (`lazy`: detach it if busy).
    pub async fn umount(&self, target: &Path, lazy: bool) -> Result<serde_json::Value> {
        self.post(
            "/v1/umount",
            &UmountRequest {
                target: target.to_path_buf(),
                lazy,
            },
        )
        .await
    }

    /// `POST /v1/handover`: ask the daemon to hand its frontend over and exit.
    pub async fn hand_over(&self) -> Result<serde_json::Value> {
        self.post("/v1/handover", &serde_json::json!({})).await
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = serde_json::to_vec(body)?;
        decode(
            self.http
                .post(format!("http://lazyblob{path}"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await,
        )
        .await
    }
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Result<reqwest::Response>) -> Result<T> {
    let resp = resp.context("cannot reach the lazyblob daemon (is it running? see --socket)")?;
    let status = resp.status();
    let body = resp.bytes().await.context("reading the daemon's answer")?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        bail!("daemon answered {status}: {msg}");
    }
    serde_json::from_slice(&body).context("decoding the daemon's answer")
}
