//! The admin API server (axum over a unix socket whose peers are checked, see `peer`): the
//! routes, each answered by an [`Admin`] implementation.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{ApiError, ImageInfo, MountInfo, MountRequest, RegisterRequest, Status, UmountRequest};

/// What answers the admin API (the daemon). Errors are reported to the client with their
/// whole context chain.
pub trait Admin: Send + Sync + 'static {
    /// The daemon's state and counters.
    fn status(&self) -> impl Future<Output = anyhow::Result<Status>> + Send;
    /// Registered images.
    fn images(&self) -> Vec<ImageInfo>;
    /// Register `reference` (fetch and verify its metadata).
    fn register(&self, reference: &str) -> impl Future<Output = anyhow::Result<ImageInfo>> + Send;
    /// The daemon's lazy mounts.
    fn mounts(&self) -> Vec<MountInfo>;
    /// Mount an image lazily.
    fn mount(&self, req: MountRequest) -> impl Future<Output = anyhow::Result<MountInfo>> + Send;
    /// Unmount a lazy mount.
    fn umount(&self, req: &UmountRequest) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Hand the kernel frontend over to a new daemon (an upgrade): stop serving now, leave
    /// every mount in place, and exit.
    fn hand_over(&self) -> anyhow::Result<()>;
}

type ApiResult<T> = Result<Json<T>, (StatusCode, Json<ApiError>)>;

/// The routes of the admin API.
pub fn router<A: Admin>(admin: Arc<A>) -> Router {
    Router::new()
        .route("/v1/status", get(status::<A>))
        .route("/v1/images", post(register::<A>).get(images::<A>))
        .route("/v1/mounts", post(mount::<A>).get(mounts::<A>))
        .route("/v1/umount", post(umount::<A>))
        .route("/v1/handover", post(hand_over::<A>))
        .layer(axum::middleware::from_fn(super::peer::enforce))
        .with_state(admin)
}

/// Bind the socket (replacing a stale one; `read_only_group` may read status) and serve
/// until `shutdown` fires.
pub async fn serve<A: Admin>(
    admin: Arc<A>,
    socket: &Path,
    read_only_group: Option<nix::unistd::Gid>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = super::peer::PeerListener::bind(socket, read_only_group)?;
    tracing::info!(socket = %socket.display(), ?read_only_group, "admin API listening");
    axum::serve(
        listener,
        router(admin).into_make_service_with_connect_info::<super::peer::Access>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.changed().await;
    })
    .await
}

async fn status<A: Admin>(State(a): State<Arc<A>>) -> ApiResult<Status> {
    a.status().await.map(Json).map_err(failed)
}

async fn images<A: Admin>(State(a): State<Arc<A>>) -> Json<Vec<ImageInfo>> {
    Json(a.images())
}

async fn register<A: Admin>(State(a): State<Arc<A>>, Json(req): Json<RegisterRequest>) -> ApiResult<ImageInfo> {
    a.register(&req.reference)
        .await
        .map(Json)
        .map_err(|e| failed(e.context(req.reference.clone())))
}

async fn mounts<A: Admin>(State(a): State<Arc<A>>) -> Json<Vec<MountInfo>> {
    Json(a.mounts())
}

async fn mount<A: Admin>(State(a): State<Arc<A>>, Json(req): Json<MountRequest>) -> ApiResult<MountInfo> {
    a.mount(req).await.map(Json).map_err(failed)
}

async fn umount<A: Admin>(State(a): State<Arc<A>>, Json(req): Json<UmountRequest>) -> ApiResult<serde_json::Value> {
    a.umount(&req)
        .await
        .map(|()| Json(serde_json::json!({"unmounted": req.target})))
        .map_err(failed)
}

async fn hand_over<A: Admin>(State(a): State<Arc<A>>) -> ApiResult<serde_json::Value> {
    a.hand_over()
        .map(|()| Json(serde_json::json!({"handing_over": true})))
        .map_err(failed)
}

fn failed(e: anyhow::Error) -> (StatusCode, Json<ApiError>) {
    tracing::warn!(error = %format!("{e:#}"), "admin request failed");
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(ApiError {
            error: format!("{e:#}"),
        }),
    )
}
