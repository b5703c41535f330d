//! The gRPC side: containerd's `Snapshots` service over the [`Store`], served on a unix
//! socket that only root may connect to (mode 0600, peers checked with `SO_PEERCRED`).
//! Errors carry the codes containerd acts on: NotFound, AlreadyExists, FailedPrecondition,
//! InvalidArgument.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use super::api::snapshots::{self as pb};
use super::filter::{self, Filter};
use super::mounts;
use super::store::{Kind, Snapshot, Store, StoreError};

/// The snapshots service.
pub struct Service {
    store: Arc<Store>,
}

impl Service {
    pub fn new(store: Arc<Store>) -> Service {
        Service { store }
    }

    /// Serve on `socket` until `shutdown` fires.
    pub async fn serve(
        self,
        socket: &Path,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), tonic::transport::Error> {
        let listener = match crate::api::peer::PeerListener::bind(socket, None) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(socket = %socket.display(), error = %e, "cannot bind the snapshotter socket");
                return Ok(());
            }
        };
        tracing::info!(socket = %socket.display(), "containerd snapshotter listening");
        let incoming = futures::stream::unfold(listener, |mut l| async move {
            let (stream, _) = axum::serve::Listener::accept(&mut l).await;
            Some((Ok::<_, std::io::Error>(stream), l))
        });
        tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(self))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown.changed().await;
            })
            .await
    }

    fn info(&self, name: &str, s: &Snapshot) -> pb::Info {
        pb::Info {
            name: name.to_string(),
            parent: s.parent.clone().unwrap_or_default(),
            kind: kind_of(s.kind) as i32,
            created_at: Some(s.created.into()),
            updated_at: Some(s.updated.into()),
            labels: s.labels.clone().into_iter().collect(),
        }
    }

    /// Prepare or View: create the snapshot and answer its mounts.
    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<Vec<super::api::Mount>, Status> {
        let parent = (!parent.is_empty()).then_some(parent);
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let s = self.store.create(kind, key, parent, labels).map_err(status)?;
        tracing::debug!(key, ?parent, ?kind, id = s.id, "snapshot created");
        mounts::for_snapshot(&self.store, key, &s).map_err(status)
    }
}

fn kind_of(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::View => "view",
        Kind::Active => "active",
        Kind::Committed => "committed",
    }
}

fn status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        StoreError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        StoreError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        StoreError::Io(_) => Status::internal(e.to_string()),
    }
}

/// Bytes allocated and inodes under `dir` (hard links counted once).
fn usage(dir: &Path) -> std::io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let md = e.path().symlink_metadata()?;
            if seen.insert((md.dev(), md.ino())) {
                bytes = bytes.saturating_add((md.blocks() * 512) as i64);
                inodes += 1;
            }
            if md.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.create(Kind::Active, &r.key, &r.parent, r.labels)?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(&self, req: Request<pb::ViewSnapshotRequest>) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.create(Kind::View, &r.key, &r.parent, r.labels)?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(&self, req: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let key = req.into_inner().key;
        let s = self.store.get(&key).map_err(status)?;
        let mounts = mounts::for_snapshot(&self.store, &key, &s).map_err(status)?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, req: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let s = self
            .store
            .commit(&r.name, &r.key, r.labels.into_iter().collect())
            .map_err(status)?;
        tracing::debug!(key = r.key, name = r.name, id = s.id, "snapshot committed");
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = req.into_inner().key;
        let store = Arc::clone(&self.store);
        let k = key.clone();
        let s = tokio::task::spawn_blocking(move || store.remove(&k))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        tracing::debug!(key, id = s.id, "snapshot removed");
        Ok(Response::new(()))
    }

    async fn stat(&self, req: Request<pb::StatSnapshotRequest>) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        let s = self.store.get(&key).map_err(status)?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(self.info(&key, &s)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r.info.ok_or_else(|| Status::invalid_argument("update without info"))?;
        let mut only = Vec::new();
        for path in r.update_mask.map(|m| m.paths).unwrap_or_default() {
            match path.as_str() {
                "labels" => only.clear(),
                p => match p.strip_prefix("labels.") {
                    Some(k) => only.push(k.to_string()),
                    None => return Err(Status::invalid_argument(format!("cannot update field {p:?}"))),
                },
            }
        }
        let s = self
            .store
            .set_labels(&info.name, info.labels.into_iter().collect(), &only)
            .map_err(status)?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(self.info(&info.name, &s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(&self, req: Request<pb::ListSnapshotsRequest>) -> Result<Response<ListStream>, Status> {
        let filters = req
            .into_inner()
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        let info: Vec<pb::Info> = self
            .store
            .all()
            .into_iter()
            .filter(|(name, s)| {
                filter::any_matches(
                    &filters,
                    &filter::Subject {
                        name,
                        parent: s.parent.as_deref().unwrap_or(""),
                        kind: kind_name(s.kind),
                        labels: &s.labels,
                    },
                )
            })
            .map(|(name, s)| self.info(&name, &s))
            .collect();
        let pages: Vec<Result<pb::ListSnapshotsResponse, Status>> = info
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }

    async fn usage(&self, req: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let key = req.into_inner().key;
        let s = self.store.get(&key).map_err(status)?;
        let dir = self.store.fs_dir(s.id);
        let (size, inodes) = tokio::task::spawn_blocking(move || usage(&dir))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("usage of {key}: {e}")))?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let store = Arc::clone(&self.store);
        let n = tokio::task::spawn_blocking(move || store.cleanup())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        tracing::info!(removed = n, "snapshotter cleanup");
        Ok(Response::new(()))
    }
}
