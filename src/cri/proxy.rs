//! The proxy itself: a CRI `ImageService` server whose every call is forwarded to
//! containerd's; `PullImage` first keeps its pull secret (before forwarding, so that the
//! snapshotter's work during the pull already has it).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::pull_secret::{scope_of, secret_of};
use crate::registry::captured::Captured;

/// The proxy: containerd's image service behind lazyblob's socket.
pub struct Proxy {
    upstream: ImageServiceClient<Channel>,
    captured: Arc<Captured>,
}

/// A channel to the unix socket `socket`, connected on first use (containerd may start
/// after lazyblob) and again after containerd restarts.
fn unix_channel(socket: &Path) -> Channel {
    let path: PathBuf = socket.to_path_buf();
    // the URI is required by tonic and ignored by the connector
    Endpoint::from_static("http://[::1]:0").connect_with_connector_lazy(tower::service_fn(
        move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        },
    ))
}

impl Proxy {
    /// A proxy to containerd's CRI socket `containerd`, keeping secrets in `captured`.
    pub fn new(containerd: &Path, captured: Arc<Captured>) -> Proxy {
        Proxy {
            upstream: ImageServiceClient::new(unix_channel(containerd)),
            captured,
        }
    }

    /// Serve on `socket` (root-only peers) until `shutdown` changes.
    pub async fn serve(
        self,
        socket: &Path,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), tonic::transport::Error> {
        let routes = tonic::service::Routes::new(ImageServiceServer::new(self));
        crate::api::peer::serve_grpc(socket, "CRI image-service proxy", routes, shutdown).await
    }

    /// Keep the pull secret of `req` for its image's repository (logged without the secret).
    fn capture(&self, req: &PullImageRequest) {
        let (Some(image), Some(auth)) = (&req.image, &req.auth) else {
            return;
        };
        let kept = scope_of(&image.image).and_then(|scope| Ok((scope, secret_of(auth)?)));
        match kept {
            Ok(((host, repository), Some(secret))) => match self.captured.capture(&host, &repository, secret) {
                Ok(()) => tracing::info!(host, repository, "kept the pull secret of an image pull"),
                Err(e) => tracing::warn!(host, repository, error = %e, "could not keep a pull secret"),
            },
            Ok((_, None)) => {}
            Err(e) => tracing::warn!(image = image.image, error = %e, "pull secret not kept"),
        }
    }
}

#[tonic::async_trait]
impl ImageService for Proxy {
    async fn list_images(&self, r: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        self.upstream.clone().list_images(r.into_inner()).await
    }

    async fn image_status(&self, r: Request<ImageStatusRequest>) -> Result<Response<ImageStatusResponse>, Status> {
        self.upstream.clone().image_status(r.into_inner()).await
    }

    async fn pull_image(&self, r: Request<PullImageRequest>) -> Result<Response<PullImageResponse>, Status> {
        let req = r.into_inner();
        self.capture(&req);
        self.upstream.clone().pull_image(req).await
    }

    async fn remove_image(&self, r: Request<RemoveImageRequest>) -> Result<Response<RemoveImageResponse>, Status> {
        self.upstream.clone().remove_image(r.into_inner()).await
    }

    async fn image_fs_info(&self, r: Request<ImageFsInfoRequest>) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.upstream.clone().image_fs_info(r.into_inner()).await
    }
}
