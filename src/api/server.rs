//! The admin API server (axum over a unix socket whose peers are checked, see `peer`).

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{ApiError, EngineCounters, MountRequest, RegisterRequest, RegistryCounters, Status, UmountRequest};
use crate::daemon::Daemon;

type ApiResult<T> = Result<Json<T>, (StatusCode, Json<ApiError>)>;

/// The routes of the admin API.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/images", post(register).get(images))
        .route("/v1/mounts", post(mount).get(mounts))
        .route("/v1/umount", post(umount))
        .layer(axum::middleware::from_fn(super::peer::enforce))
        .with_state(daemon)
}

/// Bind the socket (replacing a stale one) and serve until `shutdown` fires.
pub async fn serve(
    daemon: Arc<Daemon>,
    socket: &Path,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let group = match &daemon.config.daemon.socket_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)?
                .ok_or_else(|| std::io::Error::other(format!("daemon.socket_group {name:?}: no such group")))?
                .gid,
        ),
        None => None,
    };
    let listener = super::peer::PeerListener::bind(socket, group)?;
    tracing::info!(socket = %socket.display(), read_only_group = ?daemon.config.daemon.socket_group, "admin API listening");
    axum::serve(
        listener,
        router(daemon).into_make_service_with_connect_info::<super::peer::Access>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.changed().await;
    })
    .await
}

async fn status(State(d): State<Arc<Daemon>>) -> ApiResult<Status> {
    // the cache size is a directory scan: on the blocking pool
    tokio::task::spawn_blocking(move || snapshot(&d))
        .await
        .map(Json)
        .map_err(|e| failed(anyhow::anyhow!("status: {e}")))
}

/// The daemon's state as `status` reports it.
pub fn snapshot(d: &Daemon) -> Status {
    let e = &d.engine.stats;
    let r = &d.engine.registry().stats;
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        frontend: d.frontend_name().into(),
        kernel: d.kernel.release.clone(),
        images: d.catalog.list(),
        mounts: d.mounts(),
        cache_bytes: d.cache_bytes(),
        open_objects: d.cachefiles.as_ref().map_or(0, |c| c.open_objects()),
        inflight_chunks: d.engine.inflight_len(),
        engine: EngineCounters {
            chunks_fetched: e.chunks_fetched.load(Relaxed),
            range_requests: e.runs.load(Relaxed),
            shared_hits: e.shared_hits.load(Relaxed),
            bytes_served: e.bytes_served.load(Relaxed),
            failed_reads: e.failed_reads.load(Relaxed),
        },
        registry: RegistryCounters {
            requests: r.requests.load(Relaxed),
            bytes: r.bytes.load(Relaxed),
            retries: r.retries.load(Relaxed),
            failures: r.failures.load(Relaxed),
        },
        frontend_counters: match (&d.cachefiles, &d.fanotify) {
            (Some(c), _) => serde_json::to_value(&c.stats).unwrap_or_default(),
            (_, Some(f)) => {
                let mut v = serde_json::to_value(&f.stats).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("metadata_pinned_bytes".into(), f.pinned_bytes().into());
                }
                v
            }
            _ => serde_json::Value::Null,
        },
    }
}

async fn images(State(d): State<Arc<Daemon>>) -> Json<Vec<crate::catalog::ImageInfo>> {
    Json(d.catalog.list())
}

async fn register(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<crate::catalog::ImageInfo> {
    d.catalog
        .register(&req.reference)
        .await
        .map(|image| Json(image.info()))
        .map_err(|e| failed(anyhow::Error::new(e).context(req.reference.clone())))
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

async fn mounts(State(d): State<Arc<Daemon>>) -> Json<Vec<crate::daemon::MountInfo>> {
    Json(d.mounts())
}

async fn mount(State(d): State<Arc<Daemon>>, Json(req): Json<MountRequest>) -> ApiResult<crate::daemon::MountInfo> {
    d.mount(&req.reference, &req.target, req.special_files)
        .await
        .map(Json)
        .map_err(failed)
}

async fn umount(State(d): State<Arc<Daemon>>, Json(req): Json<UmountRequest>) -> ApiResult<serde_json::Value> {
    d.umount(&req.target, req.lazy)
        .await
        .map(|()| Json(serde_json::json!({"unmounted": req.target})))
        .map_err(failed)
}
